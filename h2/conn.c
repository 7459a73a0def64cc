#include "h2/conn.h"

#include <arpa/inet.h>
#include <errno.h>
#include <openssl/err.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "common/error.h"
#include "common/limits.h"
#include "common/log.h"
#include "common/metrics.h"
#include "h2/h1_session.h"
#include "h2/h2_session.h"
#include "h2/server.h"

static const char h2_preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

static void read_cb(struct ev_loop *loop, ev_io *w, int revents);
static void write_cb(struct ev_loop *loop, ev_io *w, int revents);
static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents);
static void flush(mx_conn *c);
static void conn_close(mx_conn *c, bool graceful);

mx_conn *mx_conn_new(mx_server *s, int fd, const struct sockaddr *peer,
                     SSL_CTX *tls, bool admin) {
  mx_conn *c = calloc(1, sizeof(*c));
  if (!c) {
    close(fd);
    return NULL;
  }
  c->server = s;
  c->loop = s->loop;
  c->fd = fd;
  c->admin = admin;
  c->state = MX_CONN_HANDSHAKE;
  c->proto = MX_PROTO_H1;
  mx_chunkq_init(&c->out);
  /* Copies, not casts: struct sockaddr is less aligned than its kinds. */
  if (peer->sa_family == AF_INET) {
    struct sockaddr_in in;
    memcpy(&in, peer, sizeof(in));
    inet_ntop(AF_INET, &in.sin_addr, c->peer_ip, sizeof(c->peer_ip));
    c->peer_port = ntohs(in.sin_port);
  } else if (peer->sa_family == AF_INET6) {
    struct sockaddr_in6 in6;
    memcpy(&in6, peer, sizeof(in6));
    inet_ntop(AF_INET6, &in6.sin6_addr, c->peer_ip, sizeof(c->peer_ip));
    c->peer_port = ntohs(in6.sin6_port);
    /* Report v4-mapped peers as plain IPv4, as the homeserver would. */
    if (!strncmp(c->peer_ip, "::ffff:", 7) && strchr(c->peer_ip + 7, '.'))
      memmove(c->peer_ip, c->peer_ip + 7, strlen(c->peer_ip + 7) + 1);
  }
  if (tls) {
    c->ssl = SSL_new(tls);
    if (!c->ssl || SSL_set_fd(c->ssl, fd) != 1) {
      SSL_free(c->ssl);
      close(fd);
      free(c);
      return NULL;
    }
    SSL_set_accept_state(c->ssl);
    c->handshaking = true;
  }
  c->opened = c->last_read = c->last_write = ev_now(c->loop);
  ev_io_init(&c->rio, read_cb, fd, EV_READ);
  ev_io_init(&c->wio, write_cb, fd, EV_WRITE);
  c->rio.data = c->wio.data = c;
  ev_init(&c->timer, timer_cb);
  c->timer.data = c;
  ev_io_start(c->loop, &c->rio);
  mx_conn_touch(c);
  return c;
}

/* --- protocol selection --------------------------------------------- */

/* The TLS handshake is over, done or abandoned. */
static void handshake_over(mx_conn *c) {
  if (c->handshaking) {
    c->handshaking = false;
    mx_server_handshake_done(c->server);
  }
}

static int start_proto(mx_conn *c, int proto) {
  handshake_over(c);
  c->proto = proto;
  c->state = MX_CONN_OPEN;
  mx_stats.conns_accepted[proto]++;
  mx_stats.conns_open[proto]++;
  int rv = proto == MX_PROTO_H2 ? mx_h2_session_start(c)
                                : mx_h1_session_start(c);
  if (rv)
    MX_LOG_WARN("conn.proto_failed", "peer=%s err=%s", c->peer_ip,
                mx_strerror(rv));
  return rv;
}

/* Cleartext: the HTTP/2 preface selects h2c (prior knowledge); anything
 * else is HTTP/1.1. Decided as soon as the bytes differ. */
static int sniff(mx_conn *c, const char *data, size_t len, size_t *used) {
  size_t take = sizeof(h2_preface) - 1 - c->sniff_len;
  if (take > len)
    take = len;
  memcpy(c->sniff + c->sniff_len, data, take);
  c->sniff_len += take;
  *used = take;
  if (memcmp(c->sniff, h2_preface, c->sniff_len) != 0)
    return MX_PROTO_H1;
  if (c->sniff_len == sizeof(h2_preface) - 1)
    return MX_PROTO_H2;
  return -1; /* undecided */
}

static int deliver(mx_conn *c, const char *data, size_t len) {
  if (c->state == MX_CONN_HANDSHAKE) {
    size_t used;
    int proto = sniff(c, data, len, &used);
    if (proto < 0)
      return 0;
    int rv = start_proto(c, proto);
    if (rv)
      return rv;
    /* Replay the sniffed bytes, then the rest. */
    rv = c->ops->on_read(c, c->sniff, c->sniff_len);
    if (rv == 0 && len > used && c->state == MX_CONN_OPEN)
      rv = c->ops->on_read(c, data + used, len - used);
    return rv;
  }
  if (c->state != MX_CONN_OPEN)
    return 0; /* closing: input is dropped */
  return c->ops->on_read(c, data, len);
}

static void tls_failed(mx_conn *c, const char *what) {
  char err[256] = "";
  unsigned long e = ERR_get_error();
  if (e)
    ERR_error_string_n(e, err, sizeof(err));
  ERR_clear_error();
  if (c->state == MX_CONN_HANDSHAKE)
    mx_stats.tls_handshake_failures++;
  MX_LOG_DEBUG("tls.failed", "peer=%s stage=%s error=\"%s\"", c->peer_ip,
               what, err);
}

/* Returns 1 when done, 0 when waiting, <0 on failure. */
static int handshake(mx_conn *c) {
  ERR_clear_error();
  int r = SSL_do_handshake(c->ssl);
  if (r == 1) {
    const unsigned char *alpn = NULL;
    unsigned alpnlen = 0;
    SSL_get0_alpn_selected(c->ssl, &alpn, &alpnlen);
    /* No ALPN (CDN origin pulls often send none) means HTTP/1.1. */
    int proto = alpnlen == 2 && !memcmp(alpn, "h2", 2) ? MX_PROTO_H2
                                                       : MX_PROTO_H1;
    return start_proto(c, proto) == 0 ? 1 : MX_ERR_PROTO;
  }
  int e = SSL_get_error(c->ssl, r);
  if (e == SSL_ERROR_WANT_READ)
    return 0;
  if (e == SSL_ERROR_WANT_WRITE) {
    ev_io_start(c->loop, &c->wio);
    return 0;
  }
  tls_failed(c, "handshake");
  return MX_ERR_TLS;
}

/* --- reading -------------------------------------------------------- */

/* Reads once. Returns bytes read, 0 at EOF, MX_ERR_AGAIN, or MX_ERR_IO. */
static ssize_t read_some(mx_conn *c, char *buf, size_t len) {
  if (!c->ssl) {
    ssize_t n = read(c->fd, buf, len);
    if (n < 0)
      return errno == EAGAIN || errno == EINTR ? MX_ERR_AGAIN : MX_ERR_IO;
    return n;
  }
  ERR_clear_error();
  int n = SSL_read(c->ssl, buf, (int)len);
  if (n > 0)
    return n;
  int e = SSL_get_error(c->ssl, n);
  if (e == SSL_ERROR_WANT_READ)
    return MX_ERR_AGAIN;
  if (e == SSL_ERROR_WANT_WRITE) {
    ev_io_start(c->loop, &c->wio);
    return MX_ERR_AGAIN;
  }
  if (e == SSL_ERROR_ZERO_RETURN)
    return 0;
  if (e != SSL_ERROR_SYSCALL)
    tls_failed(c, "read");
  ERR_clear_error();
  return e == SSL_ERROR_SYSCALL && errno == 0 ? 0 : MX_ERR_IO;
}

/* Drives an unfinished TLS handshake. Returns true when the connection
 * can go on (handshake done, or none), false when it waits or closed. */
static bool handshake_done(mx_conn *c) {
  if (!c->ssl || SSL_is_init_finished(c->ssl))
    return true;
  int rv = handshake(c);
  if (rv < 0)
    mx_conn_close(c);
  return rv > 0;
}

static void on_readable(mx_conn *c) {
  if (!handshake_done(c))
    return;
  char buf[MX_CONN_READ_CHUNK];
  /* A bounded number of reads per wake-up keeps one busy client from
   * starving the others. */
  for (int round = 0; round < 4 && !c->read_paused; round++) {
    if (c->state == MX_CONN_CLOSED)
      return;
    ssize_t n = read_some(c, buf, sizeof(buf));
    if (n == MX_ERR_AGAIN)
      break;
    if (n <= 0) {
      /* EOF or error: whatever is in flight is abandoned. */
      mx_conn_close(c);
      return;
    }
    c->last_read = ev_now(c->loop);
    mx_stats.bytes_in += (uint64_t)n;
    int rv = deliver(c, buf, (size_t)n);
    if (c->state == MX_CONN_CLOSED)
      return;
    if (rv) {
      mx_conn_close_after_flush(c);
      break;
    }
    if ((size_t)n < sizeof(buf) && !c->ssl)
      break;
  }
  flush(c);
}

static void read_cb(struct ev_loop *loop, ev_io *w, int revents) {
  mx_conn *c = w->data;
  on_readable(c);
  if (c->state != MX_CONN_CLOSED)
    mx_conn_touch(c);
}

/* --- writing -------------------------------------------------------- */

/* Writes from c->out. Returns 0 (all or some written, or would block) or
 * MX_ERR_IO. */
static int write_out(mx_conn *c) {
  while (c->out.bytes) {
    ssize_t n;
    if (!c->ssl) {
      struct iovec iov[16];
      size_t cnt = mx_chunkq_peekv(&c->out, iov, 16);
      n = writev(c->fd, iov, (int)cnt);
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
          return MX_ERR_AGAIN;
        return MX_ERR_IO;
      }
    } else {
      /* Coalesce small pieces into one TLS record. A retry after
       * WANT_WRITE resends the same leading bytes (possibly more), which
       * OpenSSL accepts with ACCEPT_MOVING_WRITE_BUFFER. */
      char rec[16384];
      struct iovec iov[16];
      size_t cnt = mx_chunkq_peekv(&c->out, iov, 16), len = 0;
      for (size_t i = 0; i < cnt && len < sizeof(rec); i++) {
        size_t take = iov[i].iov_len < sizeof(rec) - len ? iov[i].iov_len
                                                         : sizeof(rec) - len;
        memcpy(rec + len, iov[i].iov_base, take);
        len += take;
      }
      ERR_clear_error();
      int r = SSL_write(c->ssl, rec, (int)len);
      if (r <= 0) {
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ)
          return MX_ERR_AGAIN;
        ERR_clear_error();
        return MX_ERR_IO;
      }
      n = r;
    }
    mx_chunkq_consume(&c->out, (size_t)n);
    mx_stats.bytes_out += (uint64_t)n;
    c->last_write = ev_now(c->loop);
  }
  return 0;
}

static void flush(mx_conn *c) {
  if (c->state == MX_CONN_CLOSED || !handshake_done(c))
    return;
  for (;;) {
    /* Closing still lets the protocol queue its last words (an HTTP/1.1
     * error answer, an HTTP/2 GOAWAY). */
    if (c->ops && (c->state == MX_CONN_OPEN || c->state == MX_CONN_CLOSING) &&
        c->out.bytes < MX_CONN_WRITE_HIGH) {
      if (c->ops->on_write(c) != 0)
        c->state = MX_CONN_CLOSING;
      if (c->state == MX_CONN_CLOSED)
        return;
    }
    if (c->out.bytes == 0)
      break;
    int rv = write_out(c);
    if (rv == MX_ERR_AGAIN)
      break;
    if (rv) {
      mx_conn_close(c);
      return;
    }
  }
  bool pending = c->out.bytes > 0;
  if (pending)
    ev_io_start(c->loop, &c->wio);
  else
    ev_io_stop(c->loop, &c->wio);
  /* Stop reading while the client does not read what we send. */
  bool congested = c->out.bytes >= MX_CONN_WRITE_HIGH;
  if (!c->read_paused && c->state == MX_CONN_OPEN) {
    if (congested)
      ev_io_stop(c->loop, &c->rio);
    else
      ev_io_start(c->loop, &c->rio);
  }
  if (!pending && (c->state == MX_CONN_CLOSING ||
                   (c->ops && c->ops->want_close(c))))
    conn_close(c, true); /* everything said: let the peer read it */
}

static void write_cb(struct ev_loop *loop, ev_io *w, int revents) {
  mx_conn *c = w->data;
  if (c->ssl && c->state == MX_CONN_HANDSHAKE &&
      !SSL_is_init_finished(c->ssl)) {
    ev_io_stop(loop, w);
    on_readable(c); /* continues the handshake */
    return;
  }
  flush(c);
  if (c->state != MX_CONN_CLOSED)
    mx_conn_touch(c);
}

void mx_conn_schedule_write(mx_conn *c) {
  if (c->state != MX_CONN_CLOSED && c->state != MX_CONN_HANDSHAKE) {
    ev_io_start(c->loop, &c->wio);
    ev_feed_event(c->loop, &c->wio, EV_WRITE);
  }
}

void mx_conn_pause_read(mx_conn *c, bool pause) {
  if (c->state == MX_CONN_CLOSED || c->read_paused == pause)
    return;
  c->read_paused = pause;
  if (pause) {
    ev_io_stop(c->loop, &c->rio);
  } else {
    ev_io_start(c->loop, &c->rio);
    /* TLS may hold decrypted bytes the socket will not signal again. */
    if (c->ssl && SSL_pending(c->ssl))
      ev_feed_event(c->loop, &c->rio, EV_READ);
  }
}

/* --- timers --------------------------------------------------------- */

/* One timer per connection, set to the nearest deadline that applies in
 * the current state; when it fires the state is re-examined. */
void mx_conn_touch(mx_conn *c) {
  if (c->state == MX_CONN_CLOSED)
    return;
  const mx_config *cfg = c->server->cfg;
  double now = ev_now(c->loop);
  double deadline;
  if (c->ops && !c->ops->reading_head(c))
    c->head_start = 0;
  if (c->state == MX_CONN_HANDSHAKE) {
    deadline = c->opened + (double)(c->ssl ? cfg->handshake_timeout
                                           : cfg->header_timeout);
  } else {
    deadline = now + (double)cfg->idle_timeout;
    if (c->out.bytes)
      deadline = c->last_write + (double)cfg->write_timeout;
    else if (c->ops && c->ops->reading_head(c)) {
      if (c->head_start == 0)
        c->head_start = c->last_read;
      deadline = c->head_start + (double)cfg->header_timeout;
    }
    else if (c->ops && c->ops->active(c) == 0)
      deadline = (c->last_read > c->last_write ? c->last_read : c->last_write) +
                 (double)cfg->idle_timeout;
  }
  double after = deadline - now;
  if (after < 0.001)
    after = 0.001;
  ev_timer_stop(c->loop, &c->timer);
  ev_timer_set(&c->timer, after, 0.);
  ev_timer_start(c->loop, &c->timer);
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_conn *c = w->data;
  const mx_config *cfg = c->server->cfg;
  double now = ev_now(loop);
  const char *why = NULL;
  if (c->state == MX_CONN_HANDSHAKE) {
    why = c->ssl ? "handshake_timeout" : "header_timeout";
    if (c->ssl)
      mx_stats.tls_handshake_failures++;
  } else if (c->out.bytes &&
             now - c->last_write >= (double)cfg->write_timeout) {
    why = "write_timeout";
  } else if (!c->out.bytes && c->ops && c->ops->reading_head(c) &&
             now - (c->head_start ? c->head_start : c->last_read) >=
                 (double)cfg->header_timeout - 0.001) {
    why = "header_timeout";
  } else if (c->ops && c->ops->active(c) == 0 && !c->out.bytes &&
             now - (c->last_read > c->last_write ? c->last_read
                                                 : c->last_write) >=
                 (double)cfg->idle_timeout - 0.001) {
    why = "idle_timeout";
  }
  if (!why) {
    mx_conn_touch(c);
    return;
  }
  MX_LOG_DEBUG("conn.timeout", "peer=%s reason=%s", c->peer_ip, why);
  if (!strcmp(why, "idle_timeout") && c->ops && c->state == MX_CONN_OPEN) {
    /* Idle: say goodbye properly (GOAWAY on h2), then close. */
    c->ops->shutdown(c, true);
    c->state = MX_CONN_CLOSING;
    flush(c);
    if (c->state != MX_CONN_CLOSED)
      mx_conn_close(c);
    return;
  }
  mx_conn_close(c);
}

/* --- closing -------------------------------------------------------- */

/*
 * Lingering close. Closing a socket whose receive queue holds unread
 * bytes makes the kernel answer with a reset, and a reset makes the
 * peer's kernel drop what it has not delivered yet: our last response or
 * GOAWAY. So a connection that ends after its last words shuts down its
 * sending side and reads (discarding) until the peer closes too, for at
 * most MX_CONN_LINGER seconds and MX_CONN_LINGER_BYTES, with at most
 * MX_CONN_LINGER_MAX sockets lingering at once (more close at once).
 */
typedef struct lingerer {
  ev_io io;
  ev_timer timer;
  int fd;
  size_t read;
  struct lingerer *prev, *next;
} lingerer;

static lingerer *lingerers; /* one process, one loop */
static size_t lingering;

static void linger_end(struct ev_loop *loop, lingerer *l) {
  ev_io_stop(loop, &l->io);
  ev_timer_stop(loop, &l->timer);
  close(l->fd);
  if (l->prev)
    l->prev->next = l->next;
  else
    lingerers = l->next;
  if (l->next)
    l->next->prev = l->prev;
  lingering--;
  free(l);
}

void mx_conn_lingering_close_all(struct ev_loop *loop) {
  while (lingerers)
    linger_end(loop, lingerers);
}

static void linger_read_cb(struct ev_loop *loop, ev_io *w, int revents) {
  lingerer *l = w->data;
  char buf[4096];
  for (;;) {
    ssize_t n = read(l->fd, buf, sizeof(buf));
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
      return;
    if (n <= 0 || (l->read += (size_t)n) > MX_CONN_LINGER_BYTES) {
      linger_end(loop, l);
      return;
    }
  }
}

static void linger_timer_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  linger_end(loop, w->data);
}

/* Closes fd now, or after the peer's FIN (see above). */
static void close_lingering(struct ev_loop *loop, int fd) {
  lingerer *l = lingering < MX_CONN_LINGER_MAX ? calloc(1, sizeof(*l)) : NULL;
  if (!l || shutdown(fd, SHUT_WR) != 0) {
    free(l);
    close(fd);
    return;
  }
  l->fd = fd;
  l->next = lingerers;
  if (lingerers)
    lingerers->prev = l;
  lingerers = l;
  lingering++;
  ev_io_init(&l->io, linger_read_cb, fd, EV_READ);
  l->io.data = l;
  ev_timer_init(&l->timer, linger_timer_cb, MX_CONN_LINGER, 0.);
  l->timer.data = l;
  ev_io_start(loop, &l->io);
  ev_timer_start(loop, &l->timer);
}


void mx_conn_close_after_flush(mx_conn *c) {
  if (c->state == MX_CONN_CLOSED)
    return;
  c->state = MX_CONN_CLOSING;
  ev_io_stop(c->loop, &c->rio);
  ev_io_start(c->loop, &c->wio);
}

void mx_conn_shutdown(mx_conn *c, bool final) {
  if (c->state == MX_CONN_CLOSED)
    return;
  c->shutting_down = true;
  if (c->state == MX_CONN_HANDSHAKE) {
    mx_conn_close(c);
    return;
  }
  if (c->ops)
    c->ops->shutdown(c, final);
  flush(c);
}

void mx_conn_close(mx_conn *c) { conn_close(c, false); }

static void conn_close(mx_conn *c, bool graceful) {
  if (c->state == MX_CONN_CLOSED)
    return;
  bool had_proto = c->ops != NULL;
  handshake_over(c);
  c->state = MX_CONN_CLOSED;
  ev_io_stop(c->loop, &c->rio);
  ev_io_stop(c->loop, &c->wio);
  ev_timer_stop(c->loop, &c->timer);
  /* Exchanges are told (their handlers cancel upstream work) before the
   * memory goes; the struct itself is freed from the loop. */
  if (c->ops)
    c->ops->free(c);
  c->ops = NULL;
  mx_chunkq_clear(&c->out);
  if (c->ssl) {
    SSL_free(c->ssl);
    c->ssl = NULL;
  }
  if (graceful)
    close_lingering(c->loop, c->fd);
  else
    close(c->fd);
  c->fd = -1;
  if (had_proto)
    mx_stats.conns_open[c->proto]--;
  mx_server_conn_closed(c->server, c);
}
