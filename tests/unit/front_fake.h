/*
 * A client-facing front without sockets, for the h2/ handler tests
 * (test_front) and the front's fuzz targets (tests/fuzz/fuzz_h1_session,
 * fuzz_h2_session, fuzz_sse_params, fuzz_router_path).
 *
 *  - ff_front: a configuration (mx_config_defaults) and an mx_server on a
 *    loop; the test plugs in the sync hub (server.sync) and the upstream
 *    client (server.upstream) it wants, or none.
 *  - ff_conn: an mx_conn that no socket backs. Either a protocol runs on
 *    it (ff_conn_start: the real h1_session.c or h2_session.c, fed with
 *    ff_conn_read) and ff_conn_flush collects what it sends, or it only
 *    carries fake exchanges.
 *  - ff_exchange: an mx_exchange on a recording backend: the router and
 *    the handlers run against it as they would against a stream, and the
 *    test reads back the status, headers and body they produced.
 *
 * Nothing here checks anything: the callers assert.
 */
#ifndef MX_TESTS_UNIT_FRONT_FAKE_H
#define MX_TESTS_UNIT_FRONT_FAKE_H

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>

#include "common/buf.h"
#include "common/config.h"
#include "common/http.h"
#include "h2/conn.h"
#include "h2/exchange.h"
#include "h2/server.h"

/* Tests call functions for their effects and CHECK the results that
 * matter; the daemon's own code may ignore none (MX_MUST_CHECK). */
#pragma GCC diagnostic ignored "-Wunused-result"

typedef struct ff_front {
  mx_config cfg;
  mx_server server;
} ff_front;

/* Default configuration (access log off), a server on loop with no
 * listeners, no hub and no upstream. */
void ff_front_init(ff_front *f, struct ev_loop *loop);

/* Frees the configuration (not the hub or upstream the caller set). */
void ff_front_free(ff_front *f);

typedef struct ff_conn {
  mx_conn c;
  mx_buf wire;     /* everything the protocol sent (when capture) */
  bool capture;
  size_t sent;     /* bytes the protocol sent, captured or not */
  int shutdowns;   /* ops->shutdown calls on a protocol-less connection */
  bool want_close; /* the protocol's want_close after the last flush */
} ff_conn;

/* A connection from 192.0.2.7 (admin: on the admin listener), no protocol
 * yet: exchanges on it see stub ops. Returns NULL when out of memory. */
ff_conn *ff_conn_new(ff_front *f, bool admin, bool capture);

/* Runs HTTP/1.1 or HTTP/2 (MX_PROTO_H1, MX_PROTO_H2) on the connection,
 * as conn.c does once the protocol is known. Returns 0 or MX_ERR_*. */
int ff_conn_start(ff_conn *fc, int proto);

/* Client bytes to the protocol. Returns its on_read result; 0 (ignored)
 * once the connection is closing. */
int ff_conn_read(ff_conn *fc, const char *data, size_t len);

/* Lets the protocol write until it has nothing more, taking its output
 * as a client that reads everything would. Returns 0 or the first
 * on_write error. */
int ff_conn_flush(ff_conn *fc);

/* Tears the protocol down (its exchanges end with MX_ERR_CLOSED) and
 * frees the connection. */
void ff_conn_free(ff_conn *fc);

typedef struct ff_exchange {
  mx_exchange ex;
  int heads;       /* head_ready calls */
  int body_calls;  /* body_ready calls */
  int resets;      /* reset calls */
  size_t consumed; /* request body bytes the handler read */
  mx_buf body;     /* response body taken so far (ff_exchange_take) */
  bool finished;
} ff_exchange;

/*
 * An exchange on c with this request line and headers (copied). body,
 * when not NULL, is the whole request body, pushed before the handler
 * runs (has_body is set; the end is pushed by ff_exchange_dispatch).
 * Returns NULL when out of memory or over a request limit.
 */
ff_exchange *ff_exchange_new(mx_conn *c, const char *method,
                             const char *target, const mx_header *hs,
                             size_t n, const char *body, size_t blen);

/* Routes the exchange (mx_router_dispatch), then ends its request body,
 * as the protocols do for a request that arrived whole. */
void ff_exchange_dispatch(ff_front *f, ff_exchange *x);

/* Takes every queued response byte into x->body, as a connection would
 * (fires on_writable when the handler asked for it). Returns the count. */
size_t ff_exchange_take(ff_exchange *x);

/* The response header named name, as a NUL-terminated string (borrowed
 * until the exchange is freed), or NULL. */
const char *ff_exchange_resp_header(const ff_exchange *x, const char *name);

/* True once the whole response was produced and taken. */
bool ff_exchange_complete(const ff_exchange *x);

/* Ends the exchange (on_close with reason, unless it already ran) and
 * frees it. */
void ff_exchange_free(ff_exchange *x, int reason);

#endif
