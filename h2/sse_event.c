#include "h2/sse_event.h"

#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "common/buf.h"
#include "common/error.h"
#include "common/http.h"
#include "common/limits.h"


static mx_chunk *heartbeat;

/* Next line break in [p, end): CR or LF, whichever comes first. Two
 * memchr scans beat a byte loop on multi-megabyte bodies with no breaks;
 * the cached positions keep the whole walk linear. */
typedef struct breaks {
  const char *cr, *lf; /* next CR / LF at or after the cursor, or NULL */
} breaks;

static const char *next_break(breaks *b, const char *p, const char *end) {
  if (b->cr && b->cr < p)
    b->cr = memchr(p, '\r', (size_t)(end - p));
  if (b->lf && b->lf < p)
    b->lf = memchr(p, '\n', (size_t)(end - p));
  if (!b->cr)
    return b->lf;
  if (!b->lf)
    return b->cr;
  return b->cr < b->lf ? b->cr : b->lf;
}

static void breaks_init(breaks *b, const char *p, const char *end) {
  b->cr = memchr(p, '\r', (size_t)(end - p));
  b->lf = memchr(p, '\n', (size_t)(end - p));
}

/* Length of the break at e (2 for CRLF). */
static size_t break_len(const char *e, const char *end) {
  return (e[0] == '\r' && e + 1 < end && e[1] == '\n') ? 2 : 1;
}

int mx_sse_event_encode(const char *id, size_t idlen, const char *event,
                        const char *data, size_t len, mx_chunk **out) {
  *out = NULL;
  if (id && (memchr(id, '\r', idlen) || memchr(id, '\n', idlen) ||
             memchr(id, '\0', idlen)))
    return MX_ERR_INVALID;
  size_t elen = event ? strlen(event) : 0;
  if (event && strpbrk(event, "\r\n"))
    return MX_ERR_INVALID;
  if (!data)
    len = 0;
  /* Worst case every byte is a break: 7 bytes ("data: " + LF) each. */
  if (len > (SIZE_MAX - 64) / 8 || idlen > SIZE_MAX / 4 ||
      elen > SIZE_MAX / 4)
    return MX_ERR_LIMIT;

  const char *end = data ? data + len : NULL;
  size_t lines = 1, broken = 0;
  breaks b = {NULL, NULL};
  if (len) {
    breaks_init(&b, data, end);
    for (const char *p = data, *e; (e = next_break(&b, p, end));) {
      size_t bl = break_len(e, end);
      lines++;
      broken += bl;
      p = e + bl;
    }
  }
  size_t total = (id ? 4 + idlen + 1 : 0) + (event ? 7 + elen + 1 : 0) +
                 lines * 7 + (len - broken) + 1;
  mx_chunk *c = mx_chunk_alloc(total);
  if (!c)
    return MX_ERR_NOMEM;
  char *w = c->data;
  if (id) {
    memcpy(w, "id: ", 4);
    if (idlen)
      memcpy(w + 4, id, idlen);
    w += 4 + idlen;
    *w++ = '\n';
  }
  if (event) {
    memcpy(w, "event: ", 7);
    memcpy(w + 7, event, elen);
    w += 7 + elen;
    *w++ = '\n';
  }
  const char *p = data;
  if (len) {
    breaks_init(&b, data, end);
    for (const char *e; (e = next_break(&b, p, end));) {
      memcpy(w, "data: ", 6);
      memcpy(w + 6, p, (size_t)(e - p));
      w += 6 + (size_t)(e - p);
      *w++ = '\n';
      p = e + break_len(e, end);
    }
  }
  size_t rest = len ? (size_t)(end - p) : 0;
  memcpy(w, "data: ", 6);
  if (rest)
    memcpy(w + 6, p, rest);
  w += 6 + rest;
  *w++ = '\n';
  *w++ = '\n';
  assert(w == c->data + total);
  *out = c;
  return 0;
}

int mx_sse_retry_encode(unsigned long ms, mx_chunk **out) {
  char tmp[48];
  int n = snprintf(tmp, sizeof(tmp), "retry: %lu\n\n", ms);
  *out = mx_chunk_new(tmp, (size_t)n);
  return *out ? 0 : MX_ERR_NOMEM;
}

int mx_sse_error_encode(const char *errcode, const char *error,
                        mx_chunk **out) {
  *out = NULL;
  mx_buf json;
  mx_buf_init(&json, MX_SSE_ERROR_JSON_MAX);
  int rv = mx_http_matrix_error(&json, errcode, error ? error : "");
  if (rv == 0)
    rv = mx_sse_event_encode(NULL, 0, "error", json.data, json.len, out);
  mx_buf_free(&json);
  return rv;
}

mx_chunk *mx_sse_heartbeat(void) {
  if (!heartbeat)
    heartbeat = mx_chunk_new(MX_SSE_HEARTBEAT, MX_SSE_HEARTBEAT_LEN);
  return heartbeat;
}

void mx_sse_event_shutdown(void) {
  mx_chunk_unref(heartbeat);
  heartbeat = NULL;
}

mx_chunk *mx_sse_batch_frame(mx_batch *batch) {
  mx_chunk *frame = mx_batch_encoding(batch, MX_BATCH_ENC_SSE);
  if (frame)
    return frame;
  if (mx_sse_event_encode(batch->next_batch, batch->nlen, NULL, batch->body,
                          batch->len, &frame))
    return NULL;
  mx_batch_set_encoding(batch, MX_BATCH_ENC_SSE, frame);
  mx_chunk_unref(frame); /* the batch holds it */
  return frame;
}
