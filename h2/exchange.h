/*
 * mx_exchange: one request and its response, the same whether it arrived
 * over HTTP/1.1 or as an HTTP/2 stream. Handlers (the proxy, the SSE sync
 * stream, the admin pages) are written once against this interface; the
 * protocol code in h1_session.c and h2_session.c implements the backend.
 *
 * Life cycle: the front creates an exchange when a request head is
 * complete and hands it to the router, which installs a handler. The
 * handler responds (now or later, from any loop callback), writes the body
 * and ends it. The exchange stays valid until the handler's on_close,
 * which comes exactly once: after the response was fully handed to the
 * connection, or when the client reset the stream or went away. Calls
 * into the exchange never call back into the handler synchronously.
 *
 * Backpressure: response bytes wait in a per-exchange queue of chunk
 * references. When mx_exchange_queued() passes MX_BODYQ_HIGH the producer
 * should stop; on_writable fires once the queue drains below MX_BODYQ_LOW.
 * Request bodies are read with mx_exchange_body_read(); the client is
 * flow-controlled until the handler reads (HTTP/2 window updates, HTTP/1.1
 * socket reads).
 */
#ifndef MX_EXCHANGE_H
#define MX_EXCHANGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"
#include "common/chunk.h"
#include "common/error.h"
#include "common/http.h"

typedef struct mx_exchange mx_exchange;
typedef struct mx_conn mx_conn;

typedef struct mx_request {
  const char *method;
  size_t method_len;
  const char *target; /* origin-form path and query, as received */
  size_t target_len;
  const char *path_end; /* end of the path part of target ('?' or end) */
  const char *authority; /* Host or :authority; NULL when absent */
  size_t authority_len;
  const char *scheme;   /* "https" or "http" */
  const mx_header *headers; /* lower-case names; pseudo-headers excluded */
  size_t nheaders;
  int64_t content_length;   /* -1 when unknown */
  bool has_body;            /* more than the head will arrive */
  int proto;                /* MX_PROTO_H1 or MX_PROTO_H2 */
  int http_minor;           /* HTTP/1.x minor version (1 for h2) */
  const char *peer_ip;      /* textual peer address */
  bool tls;
} mx_request;

typedef struct mx_handler {
  const char *name; /* for logs */
  /* Request body bytes (or its end) became available. May be NULL. */
  void (*on_request_body)(mx_exchange *ex, void *ctx);
  /* The response queue fell below MX_BODYQ_LOW. May be NULL. */
  void (*on_writable)(mx_exchange *ex, void *ctx);
  /* The server is shutting down: a long-lived response should end soon.
   * May be NULL. */
  void (*on_shutdown)(mx_exchange *ex, void *ctx);
  /* Last callback: reason 0 when the response was completely handed to
   * the connection, MX_ERR_CLOSED when the client reset or went away
   * first. The handler frees ctx here and never touches ex again. */
  void (*on_close)(mx_exchange *ex, void *ctx, int reason);
} mx_handler;

/* --- for handlers --------------------------------------------------- */

const mx_request *mx_exchange_request(const mx_exchange *ex);

/* Returns the first request header named name (lower case) or NULL. */
const mx_header *mx_exchange_header(const mx_exchange *ex, const char *name);

/* Installs the handler (borrowed, usually static) and its context. */
void mx_exchange_set_handler(mx_exchange *ex, const mx_handler *h, void *ctx);

/* Copies up to max request body bytes into dst; returns the count. */
size_t mx_exchange_body_read(mx_exchange *ex, void *dst, size_t max);
size_t mx_exchange_body_available(const mx_exchange *ex);
/* True once the whole request body arrived and was read. */
bool mx_exchange_body_done(const mx_exchange *ex);

/*
 * Sends the response head. Headers are copied; hop-by-hop headers are
 * dropped. Without a content-length header the body is streamed (HTTP/1.1
 * chunked). With end, the response has no body. Returns 0, MX_ERR_INVALID
 * if a head was already sent, or MX_ERR_NOMEM.
 */
int mx_exchange_respond(mx_exchange *ex, int status, const mx_header *headers,
                        size_t n, bool end) MX_MUST_CHECK;

/* Queues body bytes (copied) or a shared chunk (referenced). Returns 0,
 * MX_ERR_INVALID after end or before respond, or MX_ERR_NOMEM. */
int mx_exchange_write(mx_exchange *ex, const void *data, size_t len) MX_MUST_CHECK;
int mx_exchange_write_chunk(mx_exchange *ex, mx_chunk *chunk) MX_MUST_CHECK;

/* Ends the response body. */
int mx_exchange_end(mx_exchange *ex) MX_MUST_CHECK;

/* Response bytes queued and not yet handed to the connection. */
size_t mx_exchange_queued(const mx_exchange *ex);

/* True when the producer should pause (queued above MX_BODYQ_HIGH); arms
 * on_writable. */
bool mx_exchange_should_pause(mx_exchange *ex);

/* Arms on_writable for when the queued response bytes have been handed
 * to the connection (queue below MX_BODYQ_LOW): "the client took it". */
void mx_exchange_notify_drained(mx_exchange *ex);

/* Aborts the exchange: RST_STREAM on HTTP/2, connection close on
 * HTTP/1.1 (the only way to signal a broken body there). on_close follows
 * from the loop. */
void mx_exchange_reset(mx_exchange *ex);

/*
 * Responds with a Matrix error body {"errcode":..,"error":..} and ends.
 * extra headers (may be NULL) are added. If a head was already sent, or
 * the answer cannot be made (no memory), the exchange is reset instead:
 * either way the client is answered.
 */
void mx_exchange_error(mx_exchange *ex, int status, const char *errcode,
                       const char *error, const mx_header *extra,
                       size_t nextra);

/* True once a head was sent (or queued). */
bool mx_exchange_responded(const mx_exchange *ex);

/* --- for the protocol code (h1_session.c, h2_session.c) ------------- */

typedef struct mx_exchange_backend {
  void (*head_ready)(mx_exchange *ex);  /* respond() was called */
  void (*body_ready)(mx_exchange *ex);  /* write() or end() was called */
  void (*body_consumed)(mx_exchange *ex, size_t n); /* request bytes read */
  void (*reset)(mx_exchange *ex);
} mx_exchange_backend;

struct mx_exchange {
  mx_conn *conn;
  const mx_exchange_backend *backend;
  void *backend_ctx; /* the protocol's stream */

  mx_request req;
  mx_buf arena;       /* request strings; req points into it */
  size_t off_method, off_target, off_authority; /* until sealed */
  bool has_line, has_authority;
  mx_header *hdrs;    /* array into arena */
  size_t nhdrs, hdrs_cap;
  bool sealed;        /* the head is complete: arena and hdrs are fixed */

  const mx_handler *handler;
  void *handler_ctx;

  /* request body */
  mx_chunkq reqbody;
  bool reqbody_ended;

  /* response */
  int status;
  mx_header *resp_headers; /* owned copy, strings in resp_arena */
  size_t resp_nheaders;
  mx_buf resp_arena;
  bool responded, resp_end_with_head, resp_ended, resp_chunked;
  int64_t resp_content_length;
  mx_chunkq respbody;
  uint64_t resp_bytes; /* body bytes queued so far */
  bool want_writable;

  bool closed;
  double started; /* ev_now at creation, for access logs */
};

/* Initialises an exchange for conn (strings go to the arena). */
void mx_exchange_init(mx_exchange *ex, mx_conn *conn,
                      const mx_exchange_backend *backend, void *backend_ctx);

/* Records request parts while parsing. Returns 0 or MX_ERR_LIMIT. */
int mx_exchange_add_header(mx_exchange *ex, const char *name, size_t nlen,
                           const char *value, size_t vlen) MX_MUST_CHECK;
int mx_exchange_set_line(mx_exchange *ex, const char *method, size_t mlen,
                         const char *target, size_t tlen) MX_MUST_CHECK;
int mx_exchange_set_authority(mx_exchange *ex, const char *v, size_t len) MX_MUST_CHECK;

/* Resolves string pointers once the head is complete. */
void mx_exchange_seal_head(mx_exchange *ex);

/* The backend has serialised (or copied) the response head: the
 * exchange's own copy of it is dropped. resp_headers is NULL after. */
void mx_exchange_head_sent(mx_exchange *ex);

/* Appends request body bytes (copied) / marks its end; notifies the
 * handler. */
int mx_exchange_push_body(mx_exchange *ex, const char *data, size_t len) MX_MUST_CHECK;
void mx_exchange_push_body_end(mx_exchange *ex);

/* The backend took n response bytes from respbody: fires on_writable when
 * the queue crosses MX_BODYQ_LOW. */
void mx_exchange_after_send(mx_exchange *ex);

/* Tells the handler the server is shutting down. */
void mx_exchange_shutdown(mx_exchange *ex);

/* Ends the exchange: calls on_close (once) and frees everything except
 * the struct itself, which belongs to the backend. */
void mx_exchange_finish(mx_exchange *ex, int reason);

#endif
