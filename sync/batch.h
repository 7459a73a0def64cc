/*
 * mx_batch: one /sync answer as the hub delivers it, its next_batch (the
 * event id) and its body, immutable and reference-counted. One batch is
 * shared by every stream of a device that waits at the same position and
 * by the replay store: queues hold references, never copies.
 *
 * The sync adapter knows nothing of the wire. Encodings of a batch (the
 * SSE frame, h2/sse_event.c; later others) attach to it in numbered slots
 * the first time a stream needs them, so each is made once per batch
 * however many streams send it.
 *
 * Not thread-safe (one event loop).
 */
#ifndef MX_BATCH_H
#define MX_BATCH_H

#include <stddef.h>

#include "common/chunk.h"

/* Encoding slots (owned by the modules that fill them). */
enum { MX_BATCH_ENC_SSE = 0, MX_BATCH_ENC_MAX = 2 };

typedef struct mx_batch {
  unsigned refs;
  const char *next_batch; /* NUL-terminated, inside the allocation */
  size_t nlen;
  const char *body;       /* NUL-terminated, inside the allocation */
  size_t len;
  mx_chunk *enc[MX_BATCH_ENC_MAX]; /* lazily made encodings, or NULL */
} mx_batch;

/* A new batch (refs 1, the caller's) holding copies of next_batch and
 * body. Returns NULL when out of memory. */
mx_batch *mx_batch_new(const char *next_batch, size_t nlen, const char *body,
                       size_t len);

mx_batch *mx_batch_ref(mx_batch *b);
void mx_batch_unref(mx_batch *b); /* frees at zero; NULL is fine */

/* The encoding in slot (borrowed) or NULL. */
static inline mx_chunk *mx_batch_encoding(const mx_batch *b, unsigned slot) {
  return slot < MX_BATCH_ENC_MAX ? b->enc[slot] : NULL;
}

/* Attaches an encoding (the batch takes its own reference); a slot is
 * filled once. */
void mx_batch_set_encoding(mx_batch *b, unsigned slot, mx_chunk *c);

/* Bytes the batch holds, with its encodings (for memory accounting). */
size_t mx_batch_size(const mx_batch *b);

#endif
