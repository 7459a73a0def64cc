/*
 * Per-stream compression of an SSE response (Content-Encoding: gzip).
 *
 * One deflate context lives as long as its stream, so each event is
 * compressed against the ones before it (a sync batch repeats the room
 * ids, event keys and user ids of the last one). Every call ends with
 * Z_SYNC_FLUSH: the bytes returned decode to exactly the input, so the
 * client can dispatch the event at once. The output is the stream's own,
 * never shared: each shared frame becomes a small private chunk.
 *
 * Memory: zlib's allocations go through a counting allocator, so the
 * cost of each context is known (mx_sse_gzip_memory) and the sum over all
 * contexts is mx_sse_gzip_total_memory(). docs/benchmarks.md ("Compressed
 * streams") has the measured figures behind the default window and
 * memory level.
 *
 * Negotiation helpers read Accept-Encoding (RFC 9110 12.5.3): codings
 * with q-values, "x-gzip" as "gzip", "*" for codings not named.
 */
#ifndef MX_SSE_GZIP_H
#define MX_SSE_GZIP_H

#include <stdbool.h>
#include <stddef.h>

#include "common/chunk.h"
#include "common/error.h"

typedef struct mx_sse_gzip mx_sse_gzip;

typedef struct mx_sse_gzip_params {
  int level;       /* 1..9 (zlib's compression level) */
  int window_bits; /* 9..15: the window is 2^window_bits bytes */
  int mem_level;   /* 1..9: hash table and pending buffer size */
} mx_sse_gzip_params;

/*
 * New context writing a gzip stream (header in the first output).
 * Returns 0, MX_ERR_INVALID for parameters out of range, or
 * MX_ERR_NOMEM. *out is owned by the caller (mx_sse_gzip_free).
 */
int mx_sse_gzip_new(const mx_sse_gzip_params *p,
                    mx_sse_gzip **out) MX_MUST_CHECK;

/*
 * Compresses len bytes of data and flushes (Z_SYNC_FLUSH). *out is a new
 * chunk (refs = 1, the caller's) that completes everything the context
 * has produced so far: the concatenation of the outputs decodes to the
 * concatenation of the inputs. Returns 0, MX_ERR_NOMEM, or MX_ERR_INVALID
 * after mx_sse_gzip_finish or a zlib failure (the context is then dead:
 * end the stream).
 */
int mx_sse_gzip_chunk(mx_sse_gzip *z, const void *data, size_t len,
                      mx_chunk **out) MX_MUST_CHECK;

/* Ends the gzip stream: *out holds the final block and the trailer
 * (CRC-32, length). Returns 0, MX_ERR_NOMEM or MX_ERR_INVALID. */
int mx_sse_gzip_finish(mx_sse_gzip *z, mx_chunk **out) MX_MUST_CHECK;

/* Bytes zlib holds for this context (its allocations, as requested). */
size_t mx_sse_gzip_memory(const mx_sse_gzip *z);

/* Bytes held by all live contexts, the structs included. */
size_t mx_sse_gzip_total_memory(void);

/* Frees the context (NULL is fine). */
void mx_sse_gzip_free(mx_sse_gzip *z);

/* --- Accept-Encoding ------------------------------------------------ */

/* What the request's Accept-Encoding fields say about gzip: q-values in
 * thousandths, -1 for a coding not named. */
typedef struct mx_sse_accept {
  int gzip; /* "gzip" or "x-gzip" (the highest if both appear) */
  int star; /* "*" */
} mx_sse_accept;

void mx_sse_accept_init(mx_sse_accept *a);

/* Reads one Accept-Encoding field value (several fields: call once per
 * field). Malformed elements are skipped; a malformed q-value counts as
 * q=0. Never fails. */
void mx_sse_accept_scan(mx_sse_accept *a, const char *value, size_t len);

/* True when gzip is acceptable: named with q > 0, or not named and "*"
 * has q > 0. Identity is always acceptable to mxsse's fallback (a 406
 * would stop EventSource for good). */
bool mx_sse_accept_gzip(const mx_sse_accept *a);

#endif
