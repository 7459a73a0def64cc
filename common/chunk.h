/*
 * mx_chunk: an immutable, reference-counted byte block. One encoded SSE
 * event is one chunk shared by every stream that sends it; queues hold
 * references, never copies. Not thread-safe (one event loop).
 *
 * mx_chunkq: a FIFO of chunk references with a read offset, used for
 * per-stream output. The byte count is tracked so callers can apply
 * high/low marks (common/limits.h).
 */
#ifndef MX_CHUNK_H
#define MX_CHUNK_H

#include <stddef.h>

#include "common/error.h"

typedef struct mx_chunk {
  unsigned refs;
  size_t len;
  char data[]; /* len bytes, then a NUL */
} mx_chunk;

/* New chunk holding a copy of data (refs = 1); NULL if out of memory. */
mx_chunk *mx_chunk_new(const void *data, size_t len);

/* New chunk of len uninitialised bytes for the caller to fill (refs = 1). */
mx_chunk *mx_chunk_alloc(size_t len);

mx_chunk *mx_chunk_ref(mx_chunk *c);
void mx_chunk_unref(mx_chunk *c); /* frees at zero; NULL is fine */

typedef struct mx_chunkq_ent mx_chunkq_ent;

typedef struct mx_chunkq {
  mx_chunkq_ent *head, *tail;
  size_t bytes; /* unread bytes across all entries */
  size_t count; /* entries */
} mx_chunkq;

void mx_chunkq_init(mx_chunkq *q);

/* Appends a reference to c (the queue takes its own reference).
 * Returns 0 or MX_ERR_NOMEM. Empty chunks are ignored. */
int mx_chunkq_push(mx_chunkq *q, mx_chunk *c) MX_MUST_CHECK;

/* Appends a copy of data. Returns 0 or MX_ERR_NOMEM. */
int mx_chunkq_push_copy(mx_chunkq *q, const void *data, size_t len) MX_MUST_CHECK;

/* Points *data at the contiguous unread bytes of the first entry and
 * returns their count (0 when empty). Valid until the next consume. */
size_t mx_chunkq_peek(const mx_chunkq *q, const char **data);

struct iovec;

/* Fills up to max iovecs with the unread bytes, in order; returns the
 * count. Valid until the next consume. */
size_t mx_chunkq_peekv(const mx_chunkq *q, struct iovec *iov, size_t max);

/* Moves the first entry (its unread part) from src to the end of dst
 * without copying (the entry is relinked); returns its unread byte
 * count, 0 when src is empty. */
size_t mx_chunkq_move_one(mx_chunkq *dst, mx_chunkq *src);

/* Moves the first n unread bytes (n <= src->bytes) from src to the end of
 * dst without copying them: whole entries are relinked, a partly moved
 * one is referenced by both queues. Returns 0, or MX_ERR_NOMEM (some bytes
 * may have moved; the rest stay in src). */
int mx_chunkq_move(mx_chunkq *dst, mx_chunkq *src, size_t n) MX_MUST_CHECK;

/* Marks n unread bytes as read, dropping finished entries. */
void mx_chunkq_consume(mx_chunkq *q, size_t n);

/* Copies up to max unread bytes to dst, consuming them; returns the count. */
size_t mx_chunkq_read(mx_chunkq *q, void *dst, size_t max);

/* Drops every entry. */
void mx_chunkq_clear(mx_chunkq *q);

#endif
