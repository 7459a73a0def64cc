/*
 * mx_upstream: the HTTP/1.1 client mxsse uses to talk to the homeserver.
 * libcurl's multi_socket API driven by the libev loop; connections are
 * pooled and kept alive. Both the proxy (streaming bodies, both ways, with
 * backpressure) and the sync adapter (small JSON requests, whole bodies)
 * use it.
 *
 * Callbacks run on the loop, never from inside an mx_upstream_* call made
 * by the owner of the request (so a callback may cancel its own request
 * or start others). After on_done, or after mx_upstream_cancel(), the
 * request handle is invalid and no further callback is made.
 *
 * This holds for resuming too, although libcurl's curl_easy_pause() calls
 * the write callback synchronously with the bytes it held back: the resume
 * functions only take note, and the transfer is unpaused from the loop on
 * its next iteration (docs/internals/upstream.md).
 */
#ifndef MX_UPSTREAM_H
#define MX_UPSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "common/error.h"
#include "common/http.h"

struct ev_loop;

typedef struct mx_upstream mx_upstream;
typedef struct mx_upstream_req mx_upstream_req;

typedef struct mx_upstream_opts {
  long connect_timeout_ms; /* 0: 5000 */
  long max_connections;    /* pooled connections, 0: 256 */
} mx_upstream_opts;

/* What to send. Everything is copied by mx_upstream_start(). */
typedef struct mx_upstream_reqinfo {
  const char *method;       /* "GET", "POST", ... */
  const char *path;         /* path and query, appended to the base URL */
  /* Sent as given, in order (the caller filters hop-by-hop fields), with
   * three rules: Content-Length and Transfer-Encoding are dropped (framing
   * follows has_body and content_length below); no Accept, Expect or
   * User-Agent is added when absent; a Host given here replaces the one
   * derived from the base URL. */
  const mx_header *headers;
  size_t nheaders;
  /* Request body: none when !has_body; otherwise pulled through read_body.
   * content_length >= 0 sends Content-Length, -1 sends chunked. */
  bool has_body;
  int64_t content_length;
  long timeout_ms; /* whole transfer, 0: none */
  /* Bodies up to this size are delivered in one on_body call at the end,
   * just before on_done, instead of streamed (0: stream). That call is made
   * even for an empty body, and data[len] is '\0' there. Larger bodies
   * fail with MX_ERR_LIMIT (at the head when Content-Length says so). Used
   * for JSON the caller parses. */
  size_t buffer_body_max;
} mx_upstream_reqinfo;

typedef struct mx_upstream_ops {
  /* The final response head (1xx interim heads are skipped). Headers
   * (hop-by-hop included, names as the server sent them, values trimmed)
   * are borrowed for the call only. Return 0 to continue, anything else
   * cancels the request (no on_done). May be NULL. */
  int (*on_head)(mx_upstream_req *r, int status, const mx_header *headers,
                 size_t n, void *ud);
  /* Response body bytes, as sent (no content decoding). Return 0 when
   * consumed, or MX_ERR_AGAIN to pause: the same bytes (possibly followed
   * by more) are delivered again after mx_upstream_resume_response().
   * Return anything else to cancel the request (no on_done). In
   * buffer_body_max mode MX_ERR_AGAIN counts as consumed. May be NULL. */
  int (*on_body)(mx_upstream_req *r, const char *data, size_t len, void *ud);
  /* The transfer ended: err is 0 (complete response), MX_ERR_TIMEOUT,
   * MX_ERR_LIMIT (buffer_body_max passed), MX_ERR_NOMEM or MX_ERR_UPSTREAM
   * (connect failure, reset, malformed or oversized head, request body
   * shorter than content_length); detail is a short static text for logs
   * (never a header or the target). Called once, unless the request was
   * cancelled; r is freed when it returns. */
  void (*on_done)(mx_upstream_req *r, int err, const char *detail, void *ud);
  /* Fills buf with up to max request body bytes. Returns the count, 0 at
   * the end of the body, or MX_ERR_AGAIN when none is available yet (then
   * call mx_upstream_resume_request() when there is). Any other negative
   * value cancels the request (no on_done). With content_length >= 0, max
   * never reaches past it and it is not called once it is all sent.
   * Required when has_body. */
  ssize_t (*read_body)(mx_upstream_req *r, char *buf, size_t max, void *ud);
} mx_upstream_ops;

/* Creates the client for base_url (http://host:port, no trailing slash;
 * copied). opts may be NULL (defaults). The loop is borrowed and must
 * outlive the client. Returns NULL on failure (out of memory, base_url not
 * http:// or https://). */
mx_upstream *mx_upstream_new(struct ev_loop *loop, const char *base_url,
                             const mx_upstream_opts *opts);

/* Cancels every transfer (no callbacks), closes the pooled connections
 * and frees the client. Not from inside one of its callbacks. */
void mx_upstream_free(mx_upstream *u);

/* Starts a request; *out is its handle. ud is passed to every callback
 * (borrowed). The first callback comes from the loop, never from inside
 * this call. Returns 0, MX_ERR_NOMEM, or MX_ERR_INVALID when info cannot
 * be sent safely: path not starting with '/' or holding a space, '#', CR,
 * LF or NUL; method or a header name not an HTTP token; a header value
 * with CR, LF or NUL; has_body without read_body. */
int mx_upstream_start(mx_upstream *u, const mx_upstream_reqinfo *info,
                      const mx_upstream_ops *ops, void *ud,
                      mx_upstream_req **out) MX_MUST_CHECK;

/* Request body bytes became available after read_body said MX_ERR_AGAIN.
 * Takes effect on the next loop iteration (no callback from inside this
 * call). Harmless when not paused. */
void mx_upstream_resume_request(mx_upstream_req *r);

/* The consumer can take body bytes again after on_body said MX_ERR_AGAIN.
 * Takes effect on the next loop iteration: on_body is not called from
 * inside this call, which may therefore be made from anywhere, including
 * on_body itself. Harmless when not paused. */
void mx_upstream_resume_response(mx_upstream_req *r);

/* Stops the transfer; no callback follows and r is invalid on return. The
 * connection is closed (not returned to the pool) when the transfer was in
 * the middle. Safe from inside any callback of any request (inside curl's
 * callbacks the memory is freed a loop iteration later); inside r's own
 * on_done it does nothing. NULL is ignored. */
void mx_upstream_cancel(mx_upstream_req *r);

/* Transfers in progress (for metrics and readiness). */
size_t mx_upstream_active(const mx_upstream *u);

#endif
