#include "h2/server.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/error.h"
#include "common/limits.h"
#include "common/log.h"
#include "common/metrics.h"
#include "common/service.h"
#include "h2/conn.h"
#include "h2/tls.h"

/* Connections past a limit are still accepted (up to this many at once)
 * so they can be told why in HTTP, then closed. */
#define REJECT_MARGIN 64

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents);

/* The port and the address bytes of an IPv4/IPv6 address. */
static unsigned sockaddr_parts(const struct sockaddr *a, const void **ip,
                               size_t *iplen) {
  if (a->sa_family == AF_INET) {
    const struct sockaddr_in *v4 = (const struct sockaddr_in *)(const void *)a;
    *ip = &v4->sin_addr;
    *iplen = sizeof(v4->sin_addr);
    return ntohs(v4->sin_port);
  }
  const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)(const void *)a;
  *ip = &v6->sin6_addr;
  *iplen = sizeof(v6->sin6_addr);
  return ntohs(v6->sin6_port);
}

static bool all_zero(const void *p, size_t n) {
  const unsigned char *b = p;
  while (n && !*b)
    b++, n--;
  return n == 0;
}

/* Whether a connection to addr could reach an existing listener of ours.
 * SO_REUSEPORT (for several processes on one address) would let the bind
 * succeed, and the kernel would then spread connections over both
 * listeners: client requests reaching the admin listener, TLS clients the
 * cleartext one. Two listeners of one process on one address are always
 * a configuration mistake. */
static const mx_listener *listener_at(const mx_server *s,
                                      const struct sockaddr *addr) {
  const void *ip;
  size_t iplen;
  unsigned port = sockaddr_parts(addr, &ip, &iplen);
  for (size_t i = 0; i < s->nlisteners; i++) {
    struct sockaddr_storage have;
    socklen_t len = sizeof(have);
    if (getsockname(s->listeners[i].fd, (struct sockaddr *)&have, &len) ||
        (have.ss_family != AF_INET && have.ss_family != AF_INET6))
      continue;
    const void *hip;
    size_t hlen;
    if (sockaddr_parts((struct sockaddr *)&have, &hip, &hlen) != port)
      continue;
    /* A wildcard overlaps every address of its port (an IPv6 one with
     * dual stack covers IPv4 too); otherwise only the same address. */
    if (all_zero(ip, iplen) || all_zero(hip, hlen) ||
        (hlen == iplen && !memcmp(hip, ip, iplen)))
      return &s->listeners[i];
  }
  return NULL;
}

static int listen_on(mx_server *s, const char *spec, bool tls, bool admin) {
  if (s->nlisteners == MX_MAX_LISTENERS)
    return MX_ERR_LIMIT;
  char host[256];
  unsigned port;
  if (mx_config_split_hostport(spec, host, sizeof(host), &port))
    return MX_ERR_INVALID;
  char portstr[8];
  snprintf(portstr, sizeof(portstr), "%u", port);
  struct addrinfo hints = {.ai_family = AF_UNSPEC,
                           .ai_socktype = SOCK_STREAM,
                           .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
  struct addrinfo *res = NULL;
  int gai = getaddrinfo(host[0] ? host : NULL, portstr, &hints, &res);
  if (gai) {
    MX_LOG_ERR("listen.failed", "addr=%s error=\"%s\"", spec,
               gai_strerror(gai));
    return MX_ERR_IO;
  }
  int fd = -1, saved = 0;
  /* For a wildcard address prefer IPv6 with dual stack. */
  for (int pass = 0; pass < 2 && fd < 0; pass++) {
    for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
      if (!host[0] && pass == 0 && ai->ai_family != AF_INET6)
        continue;
      if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6)
        continue;
      const mx_listener *clash = listener_at(s, ai->ai_addr);
      if (clash) {
        MX_LOG_ERR("listen.failed",
                   "addr=%s error=\"the same address as the listener %s\"",
                   spec, clash->name);
        freeaddrinfo(res);
        return MX_ERR_INVALID;
      }
      fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                  0);
      if (fd < 0) {
        saved = errno;
        continue;
      }
      int one = 1, zero = 0;
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
      setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
      if (ai->ai_family == AF_INET6 && !host[0])
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
      if (bind(fd, ai->ai_addr, ai->ai_addrlen) || listen(fd, 1024)) {
        saved = errno;
        close(fd);
        fd = -1;
      }
    }
  }
  freeaddrinfo(res);
  if (fd < 0) {
    MX_LOG_ERR("listen.failed", "addr=%s error=\"%s\"", spec,
               strerror(saved));
    return MX_ERR_IO;
  }
  mx_listener *l = &s->listeners[s->nlisteners++];
  l->fd = fd;
  l->tls = tls;
  l->admin = admin;
  l->server = s;
  snprintf(l->name, sizeof(l->name), "%s", spec);
  ev_io_init(&l->io, accept_cb, fd, EV_READ);
  l->io.data = l;
  ev_io_start(s->loop, &l->io);
  MX_LOG_INFO("listen", "addr=%s kind=%s", spec,
              admin ? "admin" : tls ? "tls" : "cleartext");
  return 0;
}

static uintptr_t ip_count(mx_server *s, const char *ip) {
  return (uintptr_t)mx_strmap_get(&s->per_ip, ip, strlen(ip));
}

/* Returns 0, or MX_ERR_NOMEM (a new address could not be counted). */
static int ip_adjust(mx_server *s, const char *ip, int delta) {
  uintptr_t have = ip_count(s, ip);
  if (delta < 0 && have == 0)
    return 0; /* never counted (no memory when it connected) */
  uintptr_t n = have + (uintptr_t)(intptr_t)delta;
  if (n == 0) {
    mx_strmap_del(&s->per_ip, ip, strlen(ip));
    return 0;
  }
  return mx_strmap_put(&s->per_ip, ip, strlen(ip), (void *)n, NULL);
}

static void accept_retry_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_server *s = w->data;
  if (s->closing)
    return;
  if (s->handshakes < MX_TLS_MAX_HANDSHAKES + s->handshake_extra)
    s->tls_paused = false;
  for (size_t i = 0; i < s->nlisteners; i++)
    if (!s->listeners[i].tls || !s->tls_paused)
      ev_io_start(loop, &s->listeners[i].io);
}

/*
 * The handshake bound: past MX_TLS_MAX_HANDSHAKES in progress the TLS
 * listeners stop, and a finished handshake restarts them. Handshakes
 * that stall (clients that connect and send nothing, or stop midway)
 * must not close the door for everyone until the handshake timeout
 * ends them: each second the listeners stay stopped with no handshake
 * finishing lets that many more in; the allowance ends as soon as one
 * finishes.
 */
static void tls_accepting(mx_server *s, bool on) {
  s->tls_paused = !on;
  for (size_t i = 0; i < s->nlisteners; i++)
    if (s->listeners[i].tls) {
      if (on)
        ev_io_start(s->loop, &s->listeners[i].io);
      else
        ev_io_stop(s->loop, &s->listeners[i].io);
    }
  if (!on && !ev_is_active(&s->handshake_relief)) {
    ev_timer_set(&s->handshake_relief, 1.0, 0.);
    ev_timer_start(s->loop, &s->handshake_relief);
  }
}

static void handshake_relief_cb(struct ev_loop *loop, ev_timer *w,
                                int revents) {
  mx_server *s = w->data;
  if (!s->tls_paused || s->draining || ev_is_active(&s->accept_retry))
    return;
  s->handshake_extra += MX_TLS_MAX_HANDSHAKES;
  tls_accepting(s, true);
}

void mx_server_handshake_done(mx_server *s) {
  s->handshakes--;
  /* Handshakes are finishing: no allowance. Kept while they are not, it
   * would let a slow storm creep past the bound. */
  s->handshake_extra = 0;
  if (s->handshakes < MX_TLS_MAX_HANDSHAKES)
    ev_timer_stop(s->loop, &s->handshake_relief);
  if (s->tls_paused &&
      s->handshakes < MX_TLS_MAX_HANDSHAKES + s->handshake_extra &&
      !s->draining && !ev_is_active(&s->accept_retry))
    tls_accepting(s, true);
}

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents) {
  mx_listener *l = w->data;
  mx_server *s = l->server;
  const mx_config *cfg = s->cfg;
  for (int i = 0; i < 64; i++) {
    if (l->tls &&
        s->handshakes >= MX_TLS_MAX_HANDSHAKES + s->handshake_extra) {
      tls_accepting(s, false);
      return;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    int fd = accept4(l->fd, (struct sockaddr *)&ss, &sl,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE) {
        /* Out of descriptors: pause accepting briefly instead of
         * spinning on a listener that stays readable. */
        MX_LOG_WARN("accept.fd_exhausted", "addr=%s", l->name);
        for (size_t k = 0; k < s->nlisteners; k++)
          ev_io_stop(loop, &s->listeners[k].io);
        ev_timer_stop(loop, &s->accept_retry);
        ev_timer_set(&s->accept_retry, 0.1, 0.);
        ev_timer_start(loop, &s->accept_retry);
      }
      return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    mx_conn *c = mx_conn_new(s, fd, (struct sockaddr *)&ss,
                             l->tls ? s->tls : NULL, l->admin);
    if (!c)
      continue;
    if (c->ssl)
      s->handshakes++;
    c->next = s->conns;
    if (s->conns)
      s->conns->prev = c;
    s->conns = c;
    s->nconns++;
    bool counted = true;
    if (l->admin)
      s->nadmin++;
    else
      counted = ip_adjust(s, c->peer_ip, +1) == 0;
    if (!l->admin) {
      size_t limit = (size_t)cfg->max_connections;
      if (!counted || s->nconns - s->nadmin > limit + REJECT_MARGIN ||
          ip_count(s, c->peer_ip) >
              (uintptr_t)cfg->max_connections_per_ip + REJECT_MARGIN) {
        mx_stats.conns_rejected++;
        mx_conn_close(c);
        continue;
      }
      if (s->nconns - s->nadmin > limit)
        c->reject_status = 503;
      else if (ip_count(s, c->peer_ip) >
               (uintptr_t)cfg->max_connections_per_ip)
        c->reject_status = 429;
      if (c->reject_status)
        mx_stats.conns_rejected++;
    }
  }
}

static void reap_cb(struct ev_loop *loop, ev_prepare *w, int revents) {
  mx_server *s = w->data;
  while (s->reap) {
    mx_conn *c = s->reap;
    s->reap = c->next_free;
    free(c);
  }
  ev_prepare_stop(loop, w);
  if (s->closing && s->nconns == s->nadmin && !s->drained) {
    s->drained = true;
    MX_LOG_INFO("shutdown.done", NULL);
    ev_break(loop, EVBREAK_ALL);
  }
}

void mx_server_conn_closed(mx_server *s, mx_conn *c) {
  if (c->prev)
    c->prev->next = c->next;
  else
    s->conns = c->next;
  if (c->next)
    c->next->prev = c->prev;
  s->nconns--;
  if (c->admin)
    s->nadmin--;
  else
    ip_adjust(s, c->peer_ip, -1);
  c->next_free = s->reap;
  s->reap = c;
  ev_prepare_start(s->loop, &s->reaper);
}

static void for_each_conn(mx_server *s, bool final) {
  for (mx_conn *c = s->conns, *next; c; c = next) {
    next = c->next;
    mx_conn_shutdown(c, final);
  }
}

static void notice_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_server *s = w->data;
  /* Clients had a moment to stop sending: now the final GOAWAY, and
   * long-lived streams are asked to end. */
  for_each_conn(s, true);
  ev_prepare_start(loop, &s->reaper);
}

static void drain_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_server *s = w->data;
  MX_LOG_WARN("shutdown.grace_expired", "connections=%zu", s->nconns);
  while (s->conns)
    mx_conn_close(s->conns);
  ev_prepare_start(loop, &s->reaper);
}

/* The balancer had shutdown_ready_delay to see /readyz fail: stop taking
 * connections and ask the open ones to finish. The admin listener stays
 * (it answers /readyz 503 until the process exits). */
static void begin_closing(mx_server *s) {
  s->closing = true;
  MX_LOG_INFO("shutdown.closing", "connections=%zu grace=%ld spread=%ld",
              s->nconns - s->nadmin, s->cfg->shutdown_grace,
              s->cfg->shutdown_spread);
  size_t kept = 0;
  for (size_t i = 0; i < s->nlisteners; i++) {
    mx_listener *l = &s->listeners[i];
    if (l->admin) {
      if (kept != i) {
        s->listeners[kept] = *l;
        ev_io_init(&s->listeners[kept].io, accept_cb, l->fd, EV_READ);
        s->listeners[kept].io.data = &s->listeners[kept];
        if (ev_is_active(&l->io)) {
          ev_io_stop(s->loop, &l->io);
          ev_io_start(s->loop, &s->listeners[kept].io);
        }
      }
      kept++;
      continue;
    }
    ev_io_stop(s->loop, &l->io);
    close(l->fd);
    l->fd = -1;
  }
  s->nlisteners = kept;
  ev_timer_stop(s->loop, &s->accept_retry);
  ev_timer_stop(s->loop, &s->handshake_relief);
  for_each_conn(s, false);
  ev_timer_set(&s->notice_timer, 1.0, 0.);
  ev_timer_start(s->loop, &s->notice_timer);
  ev_timer_set(&s->drain_timer, (double)s->cfg->shutdown_grace, 0.);
  ev_timer_start(s->loop, &s->drain_timer);
  ev_prepare_start(s->loop, &s->reaper); /* exits at once when idle */
}

static void ready_timer_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  begin_closing(w->data);
}

void mx_server_shutdown(mx_server *s) {
  if (s->draining)
    return;
  s->draining = true; /* /readyz: 503 from now on */
  mx_service_stopping();
  MX_LOG_INFO("shutdown.start", "connections=%zu grace=%ld ready_delay=%ld",
              s->nconns - s->nadmin, s->cfg->shutdown_grace,
              s->cfg->shutdown_ready_delay);
  if (s->cfg->shutdown_ready_delay > 0) {
    ev_timer_set(&s->ready_timer, (double)s->cfg->shutdown_ready_delay, 0.);
    ev_timer_start(s->loop, &s->ready_timer);
    return;
  }
  begin_closing(s);
}

int mx_server_reload_tls(mx_server *s) {
  const mx_config *cfg = s->cfg;
  if (!cfg->tls_listen.count)
    return 0;
  char err[512];
  SSL_CTX *ctx = mx_tls_ctx_new(cfg->cert, cfg->key, s->tls, err, sizeof(err));
  if (!ctx) {
    MX_LOG_ERR("tls.reload_failed", "error=\"%s\"", err);
    return MX_ERR_TLS;
  }
  /* Connections hold their own reference through their SSL objects. */
  SSL_CTX_free(s->tls);
  s->tls = ctx;
  MX_LOG_INFO("tls.reloaded", "cert=%s", cfg->cert);
  return 0;
}

/* SIGHUP: the configuration, then the certificate, without touching a
 * connection. The configuration is main's (not const there); a reload is
 * its one writer, between two callbacks of this loop. */
static void reload(mx_server *s) {
  mx_service_reloading();
  mx_config_reload((mx_config *)s->cfg, NULL);
  mx_server_reload_tls(s);
  mx_service_reloaded();
}

static void signal_cb(struct ev_loop *loop, ev_signal *w, int revents) {
  mx_server *s = w->data;
  if (w->signum == SIGHUP)
    reload(s);
  else
    mx_server_shutdown(s);
}

bool mx_server_ready(const mx_server *s) { return !s->draining; }

int mx_server_init(mx_server *s, struct ev_loop *loop, const mx_config *cfg) {
  memset(s, 0, sizeof(*s));
  s->loop = loop;
  s->cfg = cfg;
  mx_strmap_init(&s->per_ip);
  ev_prepare_init(&s->reaper, reap_cb);
  s->reaper.data = s;
  ev_init(&s->notice_timer, notice_cb);
  s->notice_timer.data = s;
  ev_init(&s->drain_timer, drain_cb);
  s->drain_timer.data = s;
  ev_init(&s->accept_retry, accept_retry_cb);
  s->accept_retry.data = s;
  ev_init(&s->ready_timer, ready_timer_cb);
  s->ready_timer.data = s;
  ev_init(&s->handshake_relief, handshake_relief_cb);
  s->handshake_relief.data = s;
  if (cfg->tls_listen.count) {
    char err[512];
    s->tls = mx_tls_ctx_new(cfg->cert, cfg->key, NULL, err, sizeof(err));
    if (!s->tls) {
      MX_LOG_ERR("tls.failed", "error=\"%s\"", err);
      return MX_ERR_TLS;
    }
  }
  for (size_t i = 0; i < cfg->listen.count; i++)
    if (listen_on(s, cfg->listen.items[i], false, false))
      return MX_ERR_IO;
  for (size_t i = 0; i < cfg->tls_listen.count; i++)
    if (listen_on(s, cfg->tls_listen.items[i], true, false))
      return MX_ERR_IO;
  if (cfg->admin_listen && listen_on(s, cfg->admin_listen, false, true))
    return MX_ERR_IO;
  ev_signal_init(&s->sigterm, signal_cb, SIGTERM);
  ev_signal_init(&s->sigint, signal_cb, SIGINT);
  ev_signal_init(&s->sighup, signal_cb, SIGHUP);
  s->sigterm.data = s->sigint.data = s->sighup.data = s;
  ev_signal_start(loop, &s->sigterm);
  ev_signal_start(loop, &s->sigint);
  ev_signal_start(loop, &s->sighup);
  return 0;
}

void mx_server_free(mx_server *s) {
  while (s->conns)
    mx_conn_close(s->conns);
  reap_cb(s->loop, &s->reaper, 0);
  for (size_t i = 0; i < s->nlisteners; i++) {
    ev_io_stop(s->loop, &s->listeners[i].io);
    close(s->listeners[i].fd);
  }
  s->nlisteners = 0;
  ev_signal_stop(s->loop, &s->sigterm);
  ev_signal_stop(s->loop, &s->sigint);
  ev_signal_stop(s->loop, &s->sighup);
  ev_timer_stop(s->loop, &s->notice_timer);
  ev_timer_stop(s->loop, &s->drain_timer);
  ev_timer_stop(s->loop, &s->accept_retry);
  ev_timer_stop(s->loop, &s->ready_timer);
  ev_timer_stop(s->loop, &s->handshake_relief);
  mx_conn_lingering_close_all(s->loop);
  mx_strmap_free(&s->per_ip);
  SSL_CTX_free(s->tls);
  s->tls = NULL;
}
