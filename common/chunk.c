#include "common/chunk.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "common/error.h"

struct mx_chunkq_ent {
  mx_chunk *chunk;
  size_t off, end; /* the unread part is [off, end) of the chunk */
  mx_chunkq_ent *next;
};

mx_chunk *mx_chunk_alloc(size_t len) {
  mx_chunk *c = malloc(sizeof(*c) + len + 1);
  if (!c)
    return NULL;
  c->refs = 1;
  c->len = len;
  c->data[len] = '\0';
  return c;
}

mx_chunk *mx_chunk_new(const void *data, size_t len) {
  mx_chunk *c = mx_chunk_alloc(len);
  if (c && len)
    memcpy(c->data, data, len);
  return c;
}

mx_chunk *mx_chunk_ref(mx_chunk *c) {
  assert(c->refs > 0);
  c->refs++;
  return c;
}

void mx_chunk_unref(mx_chunk *c) {
  if (!c)
    return;
  assert(c->refs > 0);
  if (--c->refs == 0)
    free(c);
}

void mx_chunkq_init(mx_chunkq *q) { memset(q, 0, sizeof(*q)); }

/* Appends a reference to bytes [off, end) of c. */
static int push_range(mx_chunkq *q, mx_chunk *c, size_t off, size_t end) {
  if (end == off)
    return 0;
  mx_chunkq_ent *e = malloc(sizeof(*e));
  if (!e)
    return MX_ERR_NOMEM;
  e->chunk = mx_chunk_ref(c);
  e->off = off;
  e->end = end;
  e->next = NULL;
  if (q->tail)
    q->tail->next = e;
  else
    q->head = e;
  q->tail = e;
  q->bytes += end - off;
  q->count++;
  return 0;
}

int mx_chunkq_push(mx_chunkq *q, mx_chunk *c) {
  return push_range(q, c, 0, c->len);
}

int mx_chunkq_push_copy(mx_chunkq *q, const void *data, size_t len) {
  if (len == 0)
    return 0;
  mx_chunk *c = mx_chunk_new(data, len);
  if (!c)
    return MX_ERR_NOMEM;
  int rv = mx_chunkq_push(q, c);
  mx_chunk_unref(c);
  return rv;
}

size_t mx_chunkq_peek(const mx_chunkq *q, const char **data) {
  if (!q->head) {
    *data = NULL;
    return 0;
  }
  *data = q->head->chunk->data + q->head->off;
  return q->head->end - q->head->off;
}

size_t mx_chunkq_peekv(const mx_chunkq *q, struct iovec *iov, size_t max) {
  size_t n = 0;
  for (const mx_chunkq_ent *e = q->head; e && n < max; e = e->next, n++) {
    iov[n].iov_base = e->chunk->data + e->off;
    iov[n].iov_len = e->end - e->off;
  }
  return n;
}

size_t mx_chunkq_move_one(mx_chunkq *dst, mx_chunkq *src) {
  mx_chunkq_ent *e = src->head;
  if (!e)
    return 0;
  size_t n = e->end - e->off;
  src->head = e->next;
  if (!src->head)
    src->tail = NULL;
  src->count--;
  src->bytes -= n;
  e->next = NULL;
  if (dst->tail)
    dst->tail->next = e;
  else
    dst->head = e;
  dst->tail = e;
  dst->count++;
  dst->bytes += n;
  return n;
}

void mx_chunkq_consume(mx_chunkq *q, size_t n) {
  assert(n <= q->bytes);
  while (n > 0 && q->head) {
    mx_chunkq_ent *e = q->head;
    size_t avail = e->end - e->off;
    size_t take = n < avail ? n : avail;
    e->off += take;
    q->bytes -= take;
    n -= take;
    if (e->off == e->end) {
      q->head = e->next;
      if (!q->head)
        q->tail = NULL;
      q->count--;
      mx_chunk_unref(e->chunk);
      free(e);
    }
  }
}

int mx_chunkq_move(mx_chunkq *dst, mx_chunkq *src, size_t n) {
  assert(n <= src->bytes);
  while (n > 0) {
    mx_chunkq_ent *e = src->head;
    size_t avail = e->end - e->off;
    if (n >= avail) {
      n -= mx_chunkq_move_one(dst, src);
      continue;
    }
    /* Part of the entry: dst references the same chunk. */
    if (push_range(dst, e->chunk, e->off, e->off + n))
      return MX_ERR_NOMEM;
    mx_chunkq_consume(src, n);
    n = 0;
  }
  return 0;
}

size_t mx_chunkq_read(mx_chunkq *q, void *dst, size_t max) {
  size_t done = 0;
  while (done < max && q->head) {
    const char *p;
    size_t avail = mx_chunkq_peek(q, &p);
    size_t take = max - done < avail ? max - done : avail;
    memcpy((char *)dst + done, p, take);
    mx_chunkq_consume(q, take);
    done += take;
  }
  return done;
}

void mx_chunkq_clear(mx_chunkq *q) { mx_chunkq_consume(q, q->bytes); }
