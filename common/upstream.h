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
 */
#ifndef MX_UPSTREAM_H
#define MX_UPSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

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
  const mx_header *headers; /* sent as given (caller filters hop-by-hop) */
  size_t nheaders;
  /* Request body: none when !has_body; otherwise pulled through read_body.
   * content_length >= 0 sends Content-Length, -1 sends chunked. */
  bool has_body;
  int64_t content_length;
  long timeout_ms; /* whole transfer, 0: none */
  /* Bodies up to this size are delivered in one on_body call at the end
   * instead of streamed (0: stream). Larger bodies fail with
   * MX_ERR_LIMIT. Used for JSON the caller parses. */
  size_t buffer_body_max;
} mx_upstream_reqinfo;

typedef struct mx_upstream_ops {
  /* The response head. Headers (hop-by-hop included) are borrowed for the
   * call only. Return 0 to continue, anything else cancels the request
   * (no on_done). May be NULL. */
  int (*on_head)(mx_upstream_req *r, int status, const mx_header *headers,
                 size_t n, void *ud);
  /* Response body bytes. Return 0 when consumed, or MX_ERR_AGAIN to
   * pause: the same bytes are delivered again after
   * mx_upstream_resume_response(). Return anything else to cancel the
   * request (no on_done). May be NULL. */
  int (*on_body)(mx_upstream_req *r, const char *data, size_t len, void *ud);
  /* The transfer ended: err is 0 (complete response), MX_ERR_TIMEOUT,
   * MX_ERR_LIMIT (buffer_body_max passed) or MX_ERR_UPSTREAM (connect
   * failure, reset, malformed response); detail is a short static text for
   * logs. Called once, unless the request was cancelled. */
  void (*on_done)(mx_upstream_req *r, int err, const char *detail, void *ud);
  /* Fills buf with up to max request body bytes. Returns the count, 0 at
   * the end of the body, or MX_ERR_AGAIN when none is available yet (then
   * call mx_upstream_resume_request() when there is). */
  ssize_t (*read_body)(mx_upstream_req *r, char *buf, size_t max, void *ud);
} mx_upstream_ops;

/* Creates the client for base_url (http://host:port, no trailing slash;
 * copied). Returns NULL on failure. */
mx_upstream *mx_upstream_new(struct ev_loop *loop, const char *base_url,
                             const mx_upstream_opts *opts);

/* Cancels every transfer (no callbacks) and frees the client. */
void mx_upstream_free(mx_upstream *u);

/* Starts a request. ud is passed to every callback (borrowed). Returns
 * NULL when out of memory. */
mx_upstream_req *mx_upstream_start(mx_upstream *u,
                                   const mx_upstream_reqinfo *info,
                                   const mx_upstream_ops *ops, void *ud);

/* Request body bytes became available after read_body said MX_ERR_AGAIN. */
void mx_upstream_resume_request(mx_upstream_req *r);

/* The consumer can take body bytes again after on_body said MX_ERR_AGAIN. */
void mx_upstream_resume_response(mx_upstream_req *r);

/* Stops the transfer; no callback follows. The connection is closed (not
 * returned to the pool) when the transfer was in the middle. */
void mx_upstream_cancel(mx_upstream_req *r);

/* Transfers in progress (for metrics and readiness). */
size_t mx_upstream_active(const mx_upstream *u);

#endif
