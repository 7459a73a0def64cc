/*
 * Server-Sent Events encoding. Every function produces one immutable,
 * refcounted mx_chunk holding a complete event (through its blank line),
 * so one encoded /sync batch is shared by every stream that sends it:
 * queues take references, never copies.
 *
 * Framing (WHATWG HTML, "server-sent events"): a receiver ends a line at
 * CRLF, LF or a lone CR, and joins the data: lines of one event with LF.
 * The encoder therefore starts a new "data: " line at each of the three,
 * which means a payload comes back with every CRLF or CR turned into LF:
 * SSE cannot carry a CR. A valid JSON body (see sync/json_scan.h) has line
 * breaks only between tokens, so its meaning survives.
 *
 * Not thread-safe (one event loop), like mx_chunk.
 */
#ifndef MX_SSE_EVENT_H
#define MX_SSE_EVENT_H

#include <stddef.h>

#include "common/chunk.h"
#include "common/error.h"
#include "sync/batch.h"

/* The heartbeat payload MSC2108 specifies: an empty comment. */
#define MX_SSE_HEARTBEAT ": \n\n"
#define MX_SSE_HEARTBEAT_LEN 4

/*
 * Encodes one event:
 *   id: <id>\n          (only when id is not NULL; idlen may be 0)
 *   event: <event>\n    (only when event is not NULL; NULL means "message")
 *   data: <line>\n      (one per line of data; at least one)
 *   \n
 * data may be NULL when len is 0. On success *out is a new chunk (refs 1,
 * the caller owns that reference). Returns 0, MX_ERR_INVALID when id
 * holds CR, LF or NUL or event holds CR or LF (either would inject
 * fields), MX_ERR_LIMIT when the size overflows, or MX_ERR_NOMEM.
 */
int mx_sse_event_encode(const char *id, size_t idlen, const char *event,
                        const char *data, size_t len, mx_chunk **out) MX_MUST_CHECK;

/*
 * The SSE frame of a batch (id: next_batch, data: body), made on first use
 * and attached to the batch (MX_BATCH_ENC_SSE), so every stream sending
 * the batch shares one frame. Borrowed: valid while the batch is; queues
 * take their own references. Returns NULL when out of memory (or when the
 * batch's next_batch cannot be an id: the hub never delivers such one).
 */
mx_chunk *mx_sse_batch_frame(mx_batch *batch);

/* Encodes "retry: <ms>\n\n" (the client's reconnect delay). *out as above.
 * Returns 0 or MX_ERR_NOMEM. */
int mx_sse_retry_encode(unsigned long ms, mx_chunk **out) MX_MUST_CHECK;

/*
 * Encodes "event: error\ndata: {"errcode":..,"error":..}\n\n" with both
 * strings JSON-escaped (error may be NULL for ""). *out as above.
 * Returns 0, MX_ERR_LIMIT (strings over 16 KB) or MX_ERR_NOMEM.
 */
int mx_sse_error_encode(const char *errcode, const char *error,
                        mx_chunk **out) MX_MUST_CHECK;

/*
 * The shared heartbeat chunk (MX_SSE_HEARTBEAT), created on first use.
 * Borrowed: push it to queues (which take their own references) but do
 * not unref it. Returns NULL only when the first allocation fails.
 */
mx_chunk *mx_sse_heartbeat(void);

/* Drops the module's reference to the heartbeat chunk (at exit, so leak
 * checkers stay quiet); chunks still queued stay valid. */
void mx_sse_event_shutdown(void);

#endif
