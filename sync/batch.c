#include "sync/batch.h"

#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

mx_batch *mx_batch_new(const char *next_batch, size_t nlen, const char *body,
                       size_t len) {
  if (nlen > SIZE_MAX / 2 || len > SIZE_MAX / 2 - nlen - sizeof(mx_batch) - 2)
    return NULL;
  /* One allocation: the struct, then next_batch, then the body. */
  mx_batch *b = malloc(sizeof(*b) + nlen + 1 + len + 1);
  if (!b)
    return NULL;
  memset(b, 0, sizeof(*b));
  char *p = (char *)(b + 1);
  memcpy(p, next_batch, nlen);
  p[nlen] = '\0';
  b->next_batch = p;
  b->nlen = nlen;
  p += nlen + 1;
  if (len)
    memcpy(p, body, len);
  p[len] = '\0';
  b->body = p;
  b->len = len;
  b->refs = 1;
  return b;
}

mx_batch *mx_batch_ref(mx_batch *b) {
  assert(b->refs > 0);
  b->refs++;
  return b;
}

void mx_batch_unref(mx_batch *b) {
  if (!b)
    return;
  assert(b->refs > 0);
  if (--b->refs)
    return;
  for (unsigned i = 0; i < MX_BATCH_ENC_MAX; i++)
    mx_chunk_unref(b->enc[i]);
  free(b);
}

void mx_batch_set_encoding(mx_batch *b, unsigned slot, mx_chunk *c) {
  assert(slot < MX_BATCH_ENC_MAX && !b->enc[slot]);
  b->enc[slot] = mx_chunk_ref(c);
}

size_t mx_batch_size(const mx_batch *b) {
  size_t n = sizeof(*b) + b->nlen + 1 + b->len + 1;
  for (unsigned i = 0; i < MX_BATCH_ENC_MAX; i++)
    if (b->enc[i])
      n += sizeof(mx_chunk) + b->enc[i]->len;
  return n;
}
