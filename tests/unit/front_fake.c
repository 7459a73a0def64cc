/* A client-facing front without sockets: see front_fake.h. */
#include "tests/unit/front_fake.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/error.h"
#include "common/limits.h"
#include "common/metrics.h"
#include "h2/h1_session.h"
#include "h2/h2_session.h"

void ff_front_init(ff_front *f, struct ev_loop *loop) {
  mx_config_defaults(&f->cfg);
  f->cfg.access_log = false;
  memset(&f->server, 0, sizeof(f->server));
  f->server.loop = loop;
  f->server.cfg = &f->cfg;
}

void ff_front_free(ff_front *f) { mx_config_free(&f->cfg); }

/* --- connections ---------------------------------------------------- */

/* libev wants a real descriptor behind every io watcher the protocols
 * start; one pipe serves every fake connection. Its read end never has
 * data and nothing ever waits on the write end: the watchers are only
 * started, fed and stopped, and their callbacks flush by hand. */
static int pipe_fds[2] = {-1, -1};

static void write_cb(struct ev_loop *loop, ev_io *w, int revents) {
  ff_conn *fc = w->data;
  ff_conn_flush(fc);
  ev_io_stop(loop, w);
}

static void read_cb(struct ev_loop *loop, ev_io *w, int revents) {
  ev_io_stop(loop, w);
}

/* Stub protocol for connections that only carry fake exchanges (the
 * router calls shutdown when it refuses a connection). */
static int stub_read(mx_conn *c, const char *d, size_t n) { return 0; }
static int stub_write(mx_conn *c) { return 0; }
static bool stub_want_close(mx_conn *c) { return false; }
static size_t stub_active(mx_conn *c) { return 0; }
static bool stub_reading_head(mx_conn *c) { return false; }
static void stub_shutdown(mx_conn *c, bool final) {
  ((ff_conn *)(void *)c)->shutdowns++;
}
static void stub_free(mx_conn *c) {}

static const mx_proto_ops stub_ops = {
    stub_read,         stub_write,    stub_want_close, stub_active,
    stub_reading_head, stub_shutdown, stub_free,
};

ff_conn *ff_conn_new(ff_front *f, bool admin, bool capture) {
  if (pipe_fds[0] < 0 && pipe(pipe_fds) != 0)
    return NULL;
  ff_conn *fc = calloc(1, sizeof(*fc));
  if (!fc)
    return NULL;
  mx_conn *c = &fc->c;
  c->server = &f->server;
  c->loop = f->server.loop;
  c->fd = -1;
  c->admin = admin;
  c->state = MX_CONN_OPEN;
  c->proto = MX_PROTO_H1;
  c->ops = &stub_ops;
  strcpy(c->peer_ip, "192.0.2.7");
  c->peer_port = 40000;
  mx_chunkq_init(&c->out);
  ev_io_init(&c->rio, read_cb, pipe_fds[0], EV_READ);
  ev_io_init(&c->wio, write_cb, pipe_fds[1], EV_WRITE);
  c->rio.data = c->wio.data = fc;
  ev_init(&c->timer, NULL);
  c->opened = c->last_read = c->last_write = ev_now(c->loop);
  fc->capture = capture;
  mx_buf_init(&fc->wire, 64u << 20);
  return fc;
}

int ff_conn_start(ff_conn *fc, int proto) {
  mx_conn *c = &fc->c;
  c->proto = proto;
  c->ops = NULL;
  mx_stats.conns_accepted[proto]++;
  mx_stats.conns_open[proto]++;
  int rv = proto == MX_PROTO_H2 ? mx_h2_session_start(c)
                                : mx_h1_session_start(c);
  if (rv)
    c->ops = &stub_ops;
  return rv;
}

int ff_conn_read(ff_conn *fc, const char *data, size_t len) {
  mx_conn *c = &fc->c;
  if (c->state != MX_CONN_OPEN)
    return 0;
  int rv = c->ops->on_read(c, data, len);
  if (rv)
    c->state = MX_CONN_CLOSING; /* as conn.c: flush the last words */
  return rv;
}

int ff_conn_flush(ff_conn *fc) {
  mx_conn *c = &fc->c;
  int rv = 0;
  for (int round = 0; round < 10000; round++) {
    int r = c->ops->on_write(c);
    if (r && !rv)
      rv = r;
    if (c->out.bytes == 0)
      break;
    while (c->out.bytes) {
      const char *p;
      size_t n = mx_chunkq_peek(&c->out, &p);
      if (fc->capture)
        mx_buf_append(&fc->wire, p, n);
      fc->sent += n;
      mx_chunkq_consume(&c->out, n);
    }
    if (r)
      break;
  }
  fc->want_close = c->ops->want_close(c);
  return rv;
}

void ff_conn_free(ff_conn *fc) {
  if (!fc)
    return;
  mx_conn *c = &fc->c;
  bool had_proto = c->ops != &stub_ops;
  c->state = MX_CONN_CLOSED;
  ev_io_stop(c->loop, &c->rio);
  ev_io_stop(c->loop, &c->wio);
  c->ops->free(c);
  if (had_proto)
    mx_stats.conns_open[c->proto]--;
  mx_chunkq_clear(&c->out);
  mx_buf_free(&fc->wire);
  free(fc);
}

/* --- exchanges ------------------------------------------------------ */

static void head_ready(mx_exchange *ex) {
  ((ff_exchange *)(void *)ex)->heads++;
}

static void body_ready(mx_exchange *ex) {
  ((ff_exchange *)(void *)ex)->body_calls++;
}

static void body_consumed(mx_exchange *ex, size_t n) {
  ((ff_exchange *)(void *)ex)->consumed += n;
}

static void reset(mx_exchange *ex) {
  ((ff_exchange *)(void *)ex)->resets++;
}

static const mx_exchange_backend backend = {head_ready, body_ready,
                                            body_consumed, reset};

ff_exchange *ff_exchange_new(mx_conn *c, const char *method,
                             const char *target, const mx_header *hs,
                             size_t n, const char *body, size_t blen) {
  ff_exchange *x = calloc(1, sizeof(*x));
  if (!x)
    return NULL;
  mx_exchange_init(&x->ex, c, &backend, x);
  mx_buf_init(&x->body, 64u << 20);
  int rv = mx_exchange_set_line(&x->ex, method, strlen(method), target,
                                strlen(target));
  for (size_t i = 0; rv == 0 && i < n; i++)
    rv = mx_exchange_add_header(&x->ex, hs[i].name, hs[i].namelen,
                                hs[i].value, hs[i].valuelen);
  mx_exchange_seal_head(&x->ex);
  x->ex.req.has_body = body != NULL;
  if (rv == 0 && body && blen)
    rv = mx_exchange_push_body(&x->ex, body, blen);
  if (rv) {
    ff_exchange_free(x, MX_ERR_CLOSED);
    return NULL;
  }
  return x;
}

void ff_exchange_dispatch(ff_front *f, ff_exchange *x) {
  mx_router_dispatch(&f->server, &x->ex);
  if (!x->ex.closed)
    mx_exchange_push_body_end(&x->ex);
}

size_t ff_exchange_take(ff_exchange *x) {
  size_t total = 0;
  while (x->ex.respbody.bytes) {
    const char *p;
    size_t n = mx_chunkq_peek(&x->ex.respbody, &p);
    mx_buf_append(&x->body, p, n);
    mx_chunkq_consume(&x->ex.respbody, n);
    total += n;
  }
  mx_exchange_after_send(&x->ex);
  return total;
}

const char *ff_exchange_resp_header(const ff_exchange *x, const char *name) {
  const mx_header *h =
      mx_http_find(x->ex.resp_headers, x->ex.resp_nheaders, name);
  /* Response header strings are NUL-terminated in the exchange's arena. */
  return h ? h->value : NULL;
}

bool ff_exchange_complete(const ff_exchange *x) {
  return x->ex.responded && x->ex.resp_ended && x->ex.respbody.bytes == 0;
}

void ff_exchange_free(ff_exchange *x, int reason) {
  if (!x)
    return;
  mx_exchange_finish(&x->ex, reason);
  mx_buf_free(&x->body);
  free(x);
}
