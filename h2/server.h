/*
 * mx_server: the listeners, the connection table and the process-wide
 * pieces connections share (TLS context, upstream client, configuration).
 */
#ifndef MX_SERVER_H
#define MX_SERVER_H

#include <ev.h>
#include <openssl/ssl.h>
#include <stdbool.h>
#include <stddef.h>

#include "common/config.h"
#include "common/error.h"
#include "common/limits.h"
#include "common/strmap.h"

typedef struct mx_conn mx_conn;
typedef struct mx_server mx_server;
typedef struct mx_upstream mx_upstream;
typedef struct mx_exchange mx_exchange;

typedef struct mx_listener {
  ev_io io;
  int fd;
  bool tls;
  bool admin;
  struct mx_server *server;
  char name[128]; /* HOST:PORT as configured */
} mx_listener;

typedef struct mx_server {
  struct ev_loop *loop;
  const mx_config *cfg;
  SSL_CTX *tls;          /* for new TLS connections; reloaded on SIGHUP */
  mx_upstream *upstream; /* the homeserver client */
  void *sync;            /* the sync adapter, when running */

  mx_listener listeners[MX_MAX_LISTENERS];
  size_t nlisteners;

  mx_conn *conns; /* every open connection */
  size_t nconns;
  size_t nadmin; /* of nconns, on the admin listener */
  mx_strmap per_ip; /* peer address -> open connection count */

  mx_conn *reap; /* closed connections awaiting free */
  ev_prepare reaper;

  ev_signal sigterm, sigint, sighup;
  bool draining;
  bool drained; /* every connection gone: the loop was stopped */
  bool closing; /* client listeners closed, connections asked to end */
  ev_timer ready_timer; /* SIGTERM -> closing: /readyz is 503 meanwhile */
  ev_timer drain_timer; /* grace period end */
  ev_timer notice_timer; /* GOAWAY notice -> final GOAWAY */
  ev_timer accept_retry; /* after EMFILE */
  size_t handshakes;     /* TLS handshakes in progress */
  size_t handshake_extra; /* allowance past the bound while stalled */
  bool tls_paused;       /* TLS listeners stopped: too many handshakes */
  ev_timer handshake_relief; /* lets more in while the bound stays hit */
} mx_server;

/* Binds every listener in cfg and prepares the loop. Returns 0, or
 * MX_ERR_IO after logging which address failed, or MX_ERR_TLS. */
int mx_server_init(mx_server *s, struct ev_loop *loop, const mx_config *cfg) MX_MUST_CHECK;

/* Closes listeners and connections and frees everything. */
void mx_server_free(mx_server *s);

/* Turns /readyz not-ready at once; after shutdown_ready_delay (the
 * balancer's health checks notice meanwhile) stops accepting on the client
 * listeners, asks every connection to finish (SSE streams end spread over
 * shutdown_spread) and leaves the loop once they are gone or the grace
 * period ends. The admin listener answers until then. */
void mx_server_shutdown(mx_server *s);

/* Reloads the certificate and key; existing connections keep theirs.
 * Returns 0 or MX_ERR_TLS (the old context stays in use). */
int mx_server_reload_tls(mx_server *s);

/* Connection accounting (called by mx_conn). */
void mx_server_conn_closed(mx_server *s, mx_conn *c);

/* A TLS handshake counted at accept finished or was abandoned (called
 * once per TLS connection by mx_conn). */
void mx_server_handshake_done(mx_server *s);

/* True until a shutdown starts (for /readyz). */
bool mx_server_ready(const mx_server *s);

/* Routes a request whose head is complete to its handler. Defined in
 * h2/router.c. */
void mx_router_dispatch(mx_server *s, mx_exchange *ex);

#endif
