/*
 * mx_conn: one client connection. Owns the socket, the optional TLS
 * session, the output queue and the connection timer; the protocol
 * (HTTP/1.1 or HTTP/2) is chosen by ALPN or, on cleartext listeners, by
 * the HTTP/2 connection preface.
 *
 * A connection is never freed inside one of its own callbacks:
 * mx_conn_close() marks it and the loop frees it afterwards.
 */
#ifndef MX_CONN_H
#define MX_CONN_H

#include <ev.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

#include "common/chunk.h"

typedef struct mx_server mx_server;
typedef struct mx_conn mx_conn;

/* What a protocol implementation provides to its connection. */
typedef struct mx_proto_ops {
  /* Bytes from the client. Returns 0, or a negative MX_ERR_* to close
   * the connection (after flushing what is queued). */
  int (*on_read)(mx_conn *c, const char *data, size_t len);
  /* Room in the output queue: move pending output into c->out (up to
   * about MX_CONN_WRITE_HIGH). Returns 0 or MX_ERR_* to close. */
  int (*on_write)(mx_conn *c);
  /* True when the protocol has nothing left to send and wants the
   * connection closed (after the output queue drains). */
  bool (*want_close)(mx_conn *c);
  /* Requests in progress (keeps the connection out of idle timeouts). */
  size_t (*active)(mx_conn *c);
  /* A request head is partially received (header timeout applies). */
  bool (*reading_head)(mx_conn *c);
  /* Graceful shutdown: stop taking new requests. The first call may only
   * announce it (HTTP/2 GOAWAY notice); final refuses anything new. */
  void (*shutdown)(mx_conn *c, bool final);
  /* The connection is going away: release every exchange and the
   * protocol state. */
  void (*free)(mx_conn *c);
} mx_proto_ops;

typedef enum {
  MX_CONN_HANDSHAKE, /* TLS handshake or protocol detection */
  MX_CONN_OPEN,
  MX_CONN_CLOSING, /* flushing, then closing */
  MX_CONN_CLOSED,
} mx_conn_state;

struct mx_conn {
  mx_server *server;
  struct ev_loop *loop;
  int fd;
  SSL *ssl;        /* NULL on cleartext listeners */
  bool admin;      /* accepted on the admin listener */
  int reject_status; /* over a connection limit: every request gets this */
  mx_conn_state state;
  int proto;       /* MX_PROTO_H1 or MX_PROTO_H2, once chosen */
  const mx_proto_ops *ops;
  void *proto_data;

  char peer_ip[INET6_ADDRSTRLEN];
  unsigned peer_port;

  ev_io rio, wio;
  ev_timer timer;  /* handshake, header, idle and write-stall deadlines */
  double last_read, last_write, opened;
  double head_start; /* 0, or when the request head being read began */

  mx_chunkq out;   /* bytes waiting for the socket */
  bool read_paused;  /* the protocol asked for no more input */
  bool shutting_down;
  bool handshaking; /* counted in the server's TLS handshakes */

  /* preface detection on cleartext listeners */
  char sniff[24];
  size_t sniff_len;

  mx_conn *prev, *next; /* the server's list */
  mx_conn *next_free;   /* deferred free list */
};

/* Starts a connection on an accepted socket (takes ownership of fd). */
mx_conn *mx_conn_new(mx_server *s, int fd, const struct sockaddr *peer,
                     SSL_CTX *tls, bool admin);

/* Asks for the write callback soon (output or protocol work pending). */
void mx_conn_schedule_write(mx_conn *c);

/* Stops or resumes reading from the client (protocol backpressure). */
void mx_conn_pause_read(mx_conn *c, bool pause);

/* Flushes what is queued, then closes. */
void mx_conn_close_after_flush(mx_conn *c);

/* Closes the sockets still lingering after their connection ended (see
 * conn.c), at exit. */
void mx_conn_lingering_close_all(struct ev_loop *loop);

/* Closes now (deferred to the loop; no callback runs after). */
void mx_conn_close(mx_conn *c);

/* Re-arms the connection timer after state changes. */
void mx_conn_touch(mx_conn *c);

/* Starts a graceful shutdown of this connection (final: refuse new
 * requests now, and tell long-lived exchanges to end). */
void mx_conn_shutdown(mx_conn *c, bool final);

#endif
