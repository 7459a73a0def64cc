/*
 * mx_buf: a growable byte buffer with a maximum fixed at init. Every
 * buffer a peer can grow is an mx_buf (or an mx_chunkq) with a cap from
 * common/limits.h, so no peer can make mxsse allocate without bound.
 * The data is always followed by a NUL byte (not counted in len), so a
 * buffer holding text can be used as a C string.
 */
#ifndef MX_BUF_H
#define MX_BUF_H

#include <stddef.h>

#include "common/error.h"

typedef struct mx_buf {
  char *data;   /* owned; NULL until the first append */
  size_t len;   /* bytes in use */
  size_t cap;   /* bytes allocated (excluding the NUL) */
  size_t max;   /* len never exceeds this */
} mx_buf;

void mx_buf_init(mx_buf *b, size_t max);

/* Appends n bytes. Returns 0, MX_ERR_LIMIT (nothing appended) when len
 * would pass max, or MX_ERR_NOMEM. */
int mx_buf_append(mx_buf *b, const void *data, size_t n) MX_MUST_CHECK;

/* Appends a formatted string; same returns as mx_buf_append. */
int mx_buf_appendf(mx_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3))) MX_MUST_CHECK;

/* Appends s[0..n) percent-encoded for a URL path segment or query value
 * (everything but RFC 3986 unreserved characters is escaped). Same
 * returns as mx_buf_append. */
int mx_buf_append_urlencoded(mx_buf *b, const char *s, size_t n) MX_MUST_CHECK;

/* Makes room for at least n more bytes and returns a pointer to them
 * (commit them with mx_buf_commit). NULL on MX_ERR_LIMIT or no memory. */
char *mx_buf_reserve(mx_buf *b, size_t n);
void mx_buf_commit(mx_buf *b, size_t n);

/* Drops the first n bytes (n <= len). */
void mx_buf_consume(mx_buf *b, size_t n);

/* Empties the buffer, keeping its memory. */
void mx_buf_reset(mx_buf *b);

/* Releases the memory; the buffer can be reused after mx_buf_init. */
void mx_buf_free(mx_buf *b);

/* Hands the data to the caller (free() it); the buffer becomes empty. */
char *mx_buf_steal(mx_buf *b, size_t *len);

#endif
