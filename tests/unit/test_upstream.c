/*
 * One file on purpose: every case runs against the same scripted server
 * defined here; splitting would copy it.
 *
 * Unit tests of the upstream client against a scripted HTTP/1.1 server
 * that runs on the same libev loop (127.0.0.1, port 0). Each test sets a
 * handler that answers the requests the server has parsed; the server
 * records what it received (heads, bodies, accepts, closes) for checks.
 */
#include "homeserver/upstream.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ev.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/buf.h"
#include "common/error.h"
#include "common/http.h"
#include "common/limits.h"
#include "common/log.h"
#include "common/metrics.h"
#include "tests/unit/tap.h"

/* ---------------------------------------------------------------------- */
/* The scripted server */

#define SRV_MAX_CONNS 16

typedef struct fconn {
  int fd;
  ev_io rio, wio;
  ev_timer reset_timer;
  mx_buf in, out;
  size_t out_off;
  bool close_after_write;
  bool open;
} fconn;

typedef void (*srv_handler)(fconn *c, const char *head, const char *body,
                            size_t bodylen);

static struct {
  struct ev_loop *loop;
  int lfd;
  int port;
  ev_io lio;
  int accepts;
  int closes;   /* connections the client closed (EOF or reset) */
  int requests; /* complete requests parsed */
  srv_handler handler;
  fconn conns[SRV_MAX_CONNS];
  mx_buf heads; /* every request head received, in order */
  mx_buf body;  /* the last request body (de-chunked) */
} S;

static struct ev_loop *L;
static mx_upstream *U;

static void conn_close(fconn *c, bool reset) {
  if (!c->open)
    return;
  if (reset) {
    struct linger lg = {1, 0};
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
  }
  ev_io_stop(S.loop, &c->rio);
  ev_io_stop(S.loop, &c->wio);
  ev_timer_stop(S.loop, &c->reset_timer);
  close(c->fd);
  c->open = false;
}

static void conn_write_cb(struct ev_loop *loop, ev_io *w, int revents) {
  fconn *c = w->data;
  while (c->out_off < c->out.len) {
    ssize_t n = send(c->fd, c->out.data + c->out_off, c->out.len - c->out_off,
                     MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK)
        return;
      S.closes++;
      conn_close(c, false);
      return;
    }
    c->out_off += (size_t)n;
  }
  mx_buf_reset(&c->out);
  c->out_off = 0;
  ev_io_stop(loop, &c->wio);
  if (c->close_after_write)
    conn_close(c, false);
}

static void srv_send(fconn *c, const void *data, size_t len) {
  if (mx_buf_append(&c->out, data, len) != 0)
    abort();
  ev_io_start(S.loop, &c->wio);
}

static void srv_sendf(fconn *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void srv_sendf(fconn *c, const char *fmt, ...) {
  char tmp[64 * 1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= sizeof(tmp))
    abort();
  srv_send(c, tmp, (size_t)n);
}

/* Returns the length of a complete chunked body at p (decoded into out),
 * 0 when incomplete, -1 when malformed. */
static long dechunk(const char *p, size_t n, mx_buf *out) {
  size_t i = 0;
  mx_buf_reset(out);
  for (;;) {
    const char *eol = memmem(p + i, n - i, "\r\n", 2);
    if (!eol)
      return 0;
    char *end;
    unsigned long sz = strtoul(p + i, &end, 16);
    if (end == p + i)
      return -1;
    i = (size_t)(eol - p) + 2;
    if (sz == 0) {
      if (n - i < 2)
        return 0;
      return memcmp(p + i, "\r\n", 2) == 0 ? (long)(i + 2) : -1;
    }
    if (n - i < sz + 2)
      return 0;
    mx_buf_append(out, p + i, sz);
    i += sz + 2;
  }
}

/* Parses every complete request in c->in and hands it to the handler. */
static void srv_parse(fconn *c) {
  for (;;) {
    if (!c->in.data)
      return;
    char *end = memmem(c->in.data, c->in.len, "\r\n\r\n", 4);
    if (!end)
      return;
    size_t headlen = (size_t)(end - c->in.data) + 4;
    char head[16 * 1024];
    if (headlen >= sizeof(head))
      abort();
    memcpy(head, c->in.data, headlen);
    head[headlen] = '\0';
    const char *body = c->in.data + headlen;
    size_t avail = c->in.len - headlen, bodylen = 0, used = 0;
    const char *cl = strcasestr(head, "\r\ncontent-length:");
    if (strcasestr(head, "\r\ntransfer-encoding: chunked")) {
      long n = dechunk(body, avail, &S.body);
      if (n == 0)
        return;
      if (n < 0)
        abort();
      used = (size_t)n;
      bodylen = S.body.len;
    } else {
      if (cl)
        bodylen = strtoul(cl + 17, NULL, 10);
      if (avail < bodylen)
        return;
      used = bodylen;
      mx_buf_reset(&S.body);
      mx_buf_append(&S.body, body, bodylen);
    }
    mx_buf_append(&S.heads, head, headlen);
    S.requests++;
    mx_buf_consume(&c->in, headlen + used);
    if (S.handler)
      S.handler(c, head, S.body.data ? S.body.data : "", bodylen);
    if (!c->open)
      return;
  }
}

static void conn_read_cb(struct ev_loop *loop, ev_io *w, int revents) {
  fconn *c = w->data;
  char buf[64 * 1024];
  ssize_t n = recv(c->fd, buf, sizeof(buf), 0);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
    return;
  if (n <= 0) {
    S.closes++;
    conn_close(c, false);
    return;
  }
  if (mx_buf_append(&c->in, buf, (size_t)n) != 0)
    abort();
  srv_parse(c);
}

static void conn_reset_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  conn_close(w->data, true);
}

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents) {
  int fd = accept4(S.lfd, NULL, NULL, SOCK_NONBLOCK);
  if (fd < 0)
    return;
  S.accepts++;
  for (int i = 0; i < SRV_MAX_CONNS; i++) {
    fconn *c = &S.conns[i];
    if (c->open || c->fd > 0)
      continue;
    c->fd = fd;
    c->open = true;
    ev_io_init(&c->rio, conn_read_cb, fd, EV_READ);
    ev_io_init(&c->wio, conn_write_cb, fd, EV_WRITE);
    ev_timer_init(&c->reset_timer, conn_reset_cb, 0., 0.);
    c->rio.data = c->wio.data = c->reset_timer.data = c;
    ev_io_start(loop, &c->rio);
    return;
  }
  abort();
}

static void srv_start(struct ev_loop *loop) {
  memset(&S, 0, sizeof(S));
  S.loop = loop;
  for (int i = 0; i < SRV_MAX_CONNS; i++) {
    mx_buf_init(&S.conns[i].in, 16 * 1024 * 1024);
    mx_buf_init(&S.conns[i].out, 64 * 1024 * 1024);
  }
  mx_buf_init(&S.heads, 1024 * 1024);
  mx_buf_init(&S.body, 16 * 1024 * 1024);
  mx_buf_append(&S.heads, "", 0); /* a string even before any request */
  S.lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t alen = sizeof(a);
  if (S.lfd < 0 || bind(S.lfd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
      listen(S.lfd, 16) != 0 ||
      getsockname(S.lfd, (struct sockaddr *)&a, &alen) != 0)
    abort();
  S.port = ntohs(a.sin_port);
  ev_io_init(&S.lio, accept_cb, S.lfd, EV_READ);
  ev_io_start(loop, &S.lio);
}

static void srv_stop(void) {
  ev_io_stop(S.loop, &S.lio);
  close(S.lfd);
  for (int i = 0; i < SRV_MAX_CONNS; i++) {
    conn_close(&S.conns[i], false);
    mx_buf_free(&S.conns[i].in);
    mx_buf_free(&S.conns[i].out);
  }
  mx_buf_free(&S.heads);
  mx_buf_free(&S.body);
}

/* ---------------------------------------------------------------------- */
/* Client side: one result record per request */

typedef struct res {
  mx_upstream_req *r;
  int order; /* bit per event, to check on_head < on_body < on_done */
  int head_calls, body_calls, done_calls, again_calls;
  int status;
  int err;
  const char *detail;
  char headers[4096]; /* "name: value\n"... */
  mx_buf body;
  int seq; /* event counter: head/body/done sequence numbers */
  int head_seq, first_body_seq, last_body_seq, done_seq;
  /* scripted behaviour */
  int pause_every;       /* MX_ERR_AGAIN on every n-th on_body call */
  bool pause_at_end;     /* and once on the delivery ending the body */
  size_t expect_total;   /* pattern-checked size, 0: no pattern check */
  bool pattern_ok;
  char held[64];         /* start of the bytes refused with MX_ERR_AGAIN */
  size_t held_len;
  bool redelivery_ok;
  int cancel_in_head;    /* 1: mx_upstream_cancel, 2: return an error */
  int cancel_at_body;    /* cancel on this on_body call (1-based) */
  bool end_loop;         /* ev_break when done */
  ev_timer resume;
  /* request body source */
  size_t up_total, up_sent, up_piece;
  int up_again_every, up_calls, up_again;
  ev_timer resume_up;
  /* chained requests */
  const mx_upstream_reqinfo *next_info;
  struct res *next;
  bool start_in_head;
  bool returned; /* mx_upstream_start has returned */
  int last_rv;   /* what it returned */
} res;

static unsigned char pattern(size_t i) {
  return (unsigned char)(i * 131u + (i >> 12) + (i >> 20));
}

static void resume_cb(struct ev_loop *loop, ev_timer *w, int revents);
static void resume_up_cb(struct ev_loop *loop, ev_timer *w, int revents);

static void res_init(res *t) {
  memset(t, 0, sizeof(*t));
  mx_buf_init(&t->body, 64 * 1024 * 1024);
  ev_timer_init(&t->resume, resume_cb, 0.001, 0.);
  ev_timer_init(&t->resume_up, resume_up_cb, 0.001, 0.);
  t->resume.data = t->resume_up.data = t;
  t->status = -1;
  t->err = 1;
  t->pattern_ok = true;
  t->redelivery_ok = true;
}

static void res_free(res *t) {
  ev_timer_stop(L, &t->resume);
  ev_timer_stop(L, &t->resume_up);
  mx_buf_free(&t->body);
}

static const mx_upstream_ops OPS;

static int on_head(mx_upstream_req *r, int status, const mx_header *hs,
                   size_t n, void *ud) {
  res *t = ud;
  CHECK(t->returned); /* never from inside mx_upstream_start */
  CHECK(r == t->r);
  t->head_calls++;
  t->head_seq = ++t->seq;
  t->status = status;
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    int w = snprintf(t->headers + o, sizeof(t->headers) - o, "%.*s: %.*s\n",
                     (int)hs[i].namelen, hs[i].name, (int)hs[i].valuelen,
                     hs[i].value);
    if (w > 0 && (size_t)w < sizeof(t->headers) - o)
      o += (size_t)w;
  }
  if (t->start_in_head && t->next) {
    CHECK_INT(mx_upstream_start(U, t->next_info, &OPS, t->next, &t->next->r),
              0);
    t->next->returned = true;
    CHECK(t->next->r != NULL);
  }
  if (t->cancel_in_head == 1) {
    mx_upstream_cancel(r);
    mx_upstream_cancel(r); /* twice is harmless */
    return 0;
  }
  if (t->cancel_in_head == 2)
    return MX_ERR_CLOSED;
  return 0;
}

static void resume_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  res *t = w->data;
  mx_upstream_resume_response(t->r);
}

static int on_body(mx_upstream_req *r, const char *data, size_t len,
                   void *ud) {
  res *t = ud;
  CHECK(r == t->r);
  t->body_calls++;
  if (!t->first_body_seq)
    t->first_body_seq = ++t->seq;
  else
    t->last_body_seq = ++t->seq;
  if (t->held_len) {
    /* The bytes refused last time come first again. */
    if (len < t->held_len || memcmp(data, t->held, t->held_len) != 0)
      t->redelivery_ok = false;
    t->held_len = 0;
  }
  if (t->cancel_at_body && t->body_calls == t->cancel_at_body) {
    mx_upstream_cancel(r);
    return 0;
  }
  bool ends = t->expect_total && t->body.len + len == t->expect_total;
  if ((t->pause_every && t->body_calls % t->pause_every == 0) ||
      (t->pause_at_end && ends)) {
    if (ends)
      t->pause_at_end = false;
    t->again_calls++;
    t->held_len = len < sizeof(t->held) ? len : sizeof(t->held);
    memcpy(t->held, data, t->held_len);
    if (t->again_calls % 2) {
      ev_timer_start(L, &t->resume);
    } else {
      /* Resuming before returning MX_ERR_AGAIN must work too: the resume
       * only takes effect on the loop. */
      mx_upstream_resume_response(r);
    }
    return MX_ERR_AGAIN;
  }
  if (t->expect_total)
    for (size_t i = 0; i < len && t->pattern_ok; i++)
      if ((unsigned char)data[i] != pattern(t->body.len + i))
        t->pattern_ok = false;
  if (mx_buf_append(&t->body, data, len) != 0)
    t->pattern_ok = false;
  return 0;
}

static void on_done(mx_upstream_req *r, int err, const char *detail,
                    void *ud) {
  res *t = ud;
  CHECK(t->returned);
  CHECK(r == t->r);
  t->done_calls++;
  t->done_seq = ++t->seq;
  t->err = err;
  t->detail = detail;
  mx_upstream_cancel(r); /* a no-op inside on_done */
  if (t->next && !t->start_in_head) {
    CHECK_INT(mx_upstream_start(U, t->next_info, &OPS, t->next, &t->next->r),
              0);
    t->next->returned = true;
    CHECK(t->next->r != NULL);
  }
  if (t->end_loop)
    ev_break(L, EVBREAK_ONE);
}

static void resume_up_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  res *t = w->data;
  mx_upstream_resume_request(t->r);
}

static ssize_t read_body(mx_upstream_req *r, char *buf, size_t max,
                         void *ud) {
  res *t = ud;
  t->up_calls++;
  if (t->up_again_every && t->up_calls % t->up_again_every == 0) {
    t->up_again++;
    ev_timer_start(L, &t->resume_up);
    return MX_ERR_AGAIN;
  }
  size_t n = t->up_total - t->up_sent;
  if (n > max)
    n = max;
  if (n > t->up_piece)
    n = t->up_piece;
  for (size_t i = 0; i < n; i++)
    buf[i] = (char)pattern(t->up_sent + i);
  t->up_sent += n;
  return (ssize_t)n;
}

static const mx_upstream_ops OPS = {on_head, on_body, on_done, read_body};

/* ---------------------------------------------------------------------- */
/* Harness */

static void guard_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  *(bool *)w->data = true;
}

/* Runs the loop until *flag is non-zero or max seconds passed. */
static bool run_until(const int *flag, double max) {
  bool expired = false;
  ev_timer guard;
  ev_timer_init(&guard, guard_cb, max, 0.);
  guard.data = &expired;
  /* The loop's clock is stale after a slow setup (valgrind): without this
   * the guard fires early. */
  ev_now_update(L);
  ev_timer_start(L, &guard);
  while (!*flag && !expired)
    ev_run(L, EVRUN_ONCE);
  ev_timer_stop(L, &guard);
  return *flag != 0;
}

static void run_for(double seconds) {
  int never = 0;
  run_until(&never, seconds);
}

static void setup(void) {
  L = ev_loop_new(EVFLAG_AUTO);
  srv_start(L);
  char base[64];
  snprintf(base, sizeof(base), "http://127.0.0.1:%d", S.port);
  mx_upstream_opts o = {.connect_timeout_ms = 2000, .max_connections = 4};
  U = mx_upstream_new(L, base, &o);
  if (!U)
    abort();
}

static void teardown(void) {
  mx_upstream_free(U);
  U = NULL;
  srv_stop();
  ev_loop_destroy(L);
  L = NULL;
}

static mx_upstream_req *start(res *t, const mx_upstream_reqinfo *info) {
  t->last_rv = mx_upstream_start(U, info, &OPS, t, &t->r);
  t->returned = true;
  return t->r;
}

static double cpu_seconds(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
         (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static size_t count_lines_with(const char *hay, const char *needle) {
  size_t n = 0;
  for (const char *p = hay ? hay : ""; (p = strcasestr(p, needle)); p++)
    n++;
  return n;
}

/* ---------------------------------------------------------------------- */
/* Handlers */

static void h_hello(fconn *c, const char *head, const char *body,
                    size_t bodylen) {
  srv_sendf(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
               "X-Multi: a\r\nX-Multi:  b \r\nContent-Length: 5\r\n\r\n"
               "hello");
}

static size_t big_len;
static bool big_chunked;

static void h_big(fconn *c, const char *head, const char *body,
                  size_t bodylen) {
  char *p = malloc(big_len);
  for (size_t i = 0; i < big_len; i++)
    p[i] = (char)pattern(i);
  if (!big_chunked) {
    srv_sendf(c, "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n\r\n", big_len);
    srv_send(c, p, big_len);
  } else {
    srv_sendf(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
    size_t off = 0, step = 1000;
    while (off < big_len) {
      size_t n = big_len - off < step ? big_len - off : step;
      srv_sendf(c, "%zx\r\n", n);
      srv_send(c, p + off, n);
      srv_sendf(c, "\r\n");
      off += n;
      step = step * 7 % 40000 + 1; /* uneven chunk sizes */
    }
    srv_sendf(c, "0\r\n\r\n");
  }
  free(p);
}

static void h_echo_len(fconn *c, const char *head, const char *body,
                       size_t bodylen) {
  char msg[64];
  int n = snprintf(msg, sizeof(msg), "got %zu", bodylen);
  srv_sendf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", n, msg);
}

static void h_never(fconn *c, const char *head, const char *body,
                    size_t bodylen) {}

static void h_reset_mid_body(fconn *c, const char *head, const char *body,
                             size_t bodylen) {
  char part[1000];
  memset(part, 'x', sizeof(part));
  srv_sendf(c, "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
  srv_send(c, part, sizeof(part));
  ev_timer_set(&c->reset_timer, 0.05, 0.);
  ev_timer_start(S.loop, &c->reset_timer);
}

static void h_interim(fconn *c, const char *head, const char *body,
                      size_t bodylen) {
  srv_sendf(c, "HTTP/1.1 100 Continue\r\n\r\n"
               "HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n"
               "HTTP/1.1 201 Created\r\nX-Final: yes\r\n"
               "Content-Length: 2\r\n\r\nok");
}

static void h_head(fconn *c, const char *head, const char *body,
                   size_t bodylen) {
  if (strncmp(head, "HEAD ", 5) == 0)
    srv_sendf(c, "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n");
  else
    h_hello(c, head, body, bodylen);
}

static void h_huge_head(fconn *c, const char *head, const char *body,
                        size_t bodylen) {
  srv_sendf(c, "HTTP/1.1 200 OK\r\n");
  char line[120];
  for (int i = 0; i < 200; i++) {
    memset(line, 'v', sizeof(line));
    srv_sendf(c, "X-Filler-%d: %.*s\r\n", i, (int)sizeof(line), line);
  }
  srv_sendf(c, "Content-Length: 2\r\n\r\nok");
}

static size_t sized_len;
static void h_sized(fconn *c, const char *head, const char *body,
                    size_t bodylen) {
  char *p = malloc(sized_len + 1);
  for (size_t i = 0; i < sized_len; i++)
    p[i] = (char)pattern(i);
  srv_sendf(c, "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n\r\n", sized_len);
  srv_send(c, p, sized_len);
  free(p);
}

static void h_chunked_20k(fconn *c, const char *head, const char *body,
                          size_t bodylen) {
  char p[4000];
  memset(p, 'z', sizeof(p));
  srv_sendf(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
  for (int i = 0; i < 5; i++) {
    srv_sendf(c, "%zx\r\n", sizeof(p));
    srv_send(c, p, sizeof(p));
    srv_sendf(c, "\r\n");
  }
  srv_sendf(c, "0\r\n\r\n");
}

/* ---------------------------------------------------------------------- */
/* Tests */

static void test_get(void) {
  setup();
  S.handler = h_hello;
  uint64_t reqs0 = mx_stats.upstream_requests;
  uint64_t lat0 = mx_stats.upstream_latency.count;
  res t;
  res_init(&t);
  mx_upstream_reqinfo info = {.method = "GET",
                              .path = "/_matrix/client/versions?x=1"};
  CHECK(start(&t, &info) != NULL);
  CHECK_INT(mx_upstream_active(U), 1);
  CHECK_INT(t.head_calls + t.body_calls + t.done_calls, 0);
  CHECK(run_until(&t.done_calls, 2.0));
  CHECK_INT(t.err, 0);
  CHECK_INT(t.status, 200);
  CHECK_STREQ(t.headers, "Content-Type: text/plain\nX-Multi: a\n"
                         "X-Multi: b\nContent-Length: 5\n");
  CHECK_MEMEQ(t.body.data, t.body.len, "hello", 5);
  CHECK_INT(t.head_calls, 1);
  CHECK_INT(t.done_calls, 1);
  CHECK(t.head_seq < t.first_body_seq && t.first_body_seq < t.done_seq);
  CHECK_INT(mx_upstream_active(U), 0);
  CHECK(strncmp(S.heads.data, "GET /_matrix/client/versions?x=1 HTTP/1.1\r\n",
                43) == 0);
  CHECK_INT(mx_stats.upstream_requests, reqs0 + 1);
  CHECK_INT(mx_stats.upstream_latency.count, lat0 + 1);
  res_free(&t);
  teardown();
}

static void test_headers_exact(void) {
  setup();
  S.handler = h_hello;
  res t;
  res_init(&t);
  const mx_header hs[] = {
      MX_HEADER_LIT("Host", "matrix.example.org"),
      MX_HEADER_LIT("x-custom", "v1"),
      MX_HEADER_LIT("authorization", "Bearer s3cret"),
      MX_HEADER_LIT("x-empty", ""),
      MX_HEADER_LIT("content-length", "99"), /* framing is the client's */
  };
  mx_upstream_reqinfo info = {.method = "GET", .path = "/p",
                              .headers = hs, .nheaders = 5};
  CHECK(start(&t, &info) != NULL);
  CHECK(run_until(&t.done_calls, 2.0));
  CHECK_INT(t.err, 0);
  /* Exactly these lines, in this order: no Accept, Expect, User-Agent,
   * second Host or Content-Length. */
  CHECK_STREQ(S.heads.data, "GET /p HTTP/1.1\r\n"
                            "Host: matrix.example.org\r\n"
                            "x-custom: v1\r\n"
                            "authorization: Bearer s3cret\r\n"
                            "x-empty:\r\n\r\n");

  /* Without a Host header, curl derives it from the base URL. */
  res t2;
  res_init(&t2);
  mx_upstream_reqinfo info2 = {.method = "DELETE", .path = "/q"};
  CHECK(start(&t2, &info2) != NULL);
  CHECK(run_until(&t2.done_calls, 2.0));
  char want[128];
  snprintf(want, sizeof(want), "DELETE /q HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n",
           S.port);
  CHECK(S.heads.data && strstr(S.heads.data, want) != NULL);
  CHECK_INT(count_lines_with(S.heads.data, "\r\naccept:"), 0);
  CHECK_INT(count_lines_with(S.heads.data, "\r\nuser-agent:"), 0);

  /* Input that cannot be sent safely is refused. */
  res t3;
  res_init(&t3);
  const mx_header bad[] = {MX_HEADER_LIT("x-a", "1\r\nX-Injected: 1")};
  mx_upstream_reqinfo i3 = {.method = "GET", .path = "/", .headers = bad,
                            .nheaders = 1};
  CHECK(start(&t3, &i3) == NULL);
  CHECK_INT(t3.last_rv, MX_ERR_INVALID);
  const mx_header badname[] = {MX_HEADER_LIT("x a", "1")};
  i3.headers = badname;
  CHECK(start(&t3, &i3) == NULL);
  mx_upstream_reqinfo i4 = {.method = "GET", .path = "no-slash"};
  CHECK(start(&t3, &i4) == NULL);
  i4.path = "/a b";
  CHECK(start(&t3, &i4) == NULL);
  mx_upstream_reqinfo i5 = {.method = "GE T", .path = "/"};
  CHECK(start(&t3, &i5) == NULL);
  mx_upstream_reqinfo i6 = {.method = "POST", .path = "/", .has_body = true};
  const mx_upstream_ops no_reader = {on_head, on_body, on_done, NULL};
  mx_upstream_req *r6 = NULL;
  CHECK_INT(mx_upstream_start(U, &i6, &no_reader, &t3, &r6), MX_ERR_INVALID);
  CHECK(r6 == NULL);
  CHECK_INT(mx_upstream_active(U), 0);
  res_free(&t);
  res_free(&t2);
  res_free(&t3);
  teardown();
}

static void stream_case(bool chunked) {
  setup();
  big_len = 4 * 1024 * 1024 + 123;
  big_chunked = chunked;
  S.handler = h_big;
  res t;
  res_init(&t);
  t.pause_every = 17;
  t.pause_at_end = true;
  t.expect_total = big_len;
  mx_upstream_reqinfo info = {.method = "GET", .path = "/big"};
  CHECK(start(&t, &info) != NULL);
  CHECK(run_until(&t.done_calls, 4.0));
  CHECK_INT(t.err, 0);
  CHECK_INT(t.body.len, big_len);
  CHECK(t.pattern_ok);
  CHECK(t.redelivery_ok);
  CHECK(t.again_calls >= 3);
  CHECK(!t.pause_at_end); /* paused on the last bytes too */
  CHECK_INT(t.done_calls, 1);
  res_free(&t);
  teardown();
}

static void test_stream_pause(void) { stream_case(false); }
static void test_stream_pause_chunked(void) { stream_case(true); }

static void test_buffered_whole(void) {
  setup();
  sized_len = 300000;
  S.handler = h_sized;
  res t;
  res_init(&t);
  t.expect_total = sized_len;
  mx_upstream_reqinfo info = {.method = "GET", .path = "/json",
                              .buffer_body_max = 1024 * 1024};
  CHECK(start(&t, &info) != NULL);
  CHECK(run_until(&t.done_calls, 2.0));
  CHECK_INT(t.err, 0);
  CHECK_INT(t.body_calls, 1);
  CHECK_INT(t.body.len, sized_len);
  CHECK(t.pattern_ok);
  CHECK(t.head_seq < t.first_body_seq && t.first_body_seq < t.done_seq);

  /* An empty body is delivered too, as one empty call. */
  sized_len = 0;
  res t2;
  res_init(&t2);
  CHECK(start(&t2, &info) != NULL);
  CHECK(run_until(&t2.done_calls, 2.0));
  CHECK_INT(t2.err, 0);
  CHECK_INT(t2.body_calls, 1);
  CHECK_INT(t2.body.len, 0);
  res_free(&t);
  res_free(&t2);
  teardown();
}

static void test_buffered_limit(void) {
  setup();
  /* Content-Length says too much: refused at the head. */
  sized_len = 20000;
  S.handler = h_sized;
  res t;
  res_init(&t);
  mx_upstream_reqinfo info = {.method = "GET", .path = "/json",
                              .buffer_body_max = 10000};
  CHECK(start(&t, &info) != NULL);
  CHECK(run_until(&t.done_calls, 2.0));
  CHECK_INT(t.err, MX_ERR_LIMIT);
  CHECK_INT(t.body_calls, 0);
  CHECK_INT(t.status, 200);
  /* No length: refused while reading. */
  S.handler = h_chunked_20k;
  res t2;
  res_init(&t2);
  CHECK(start(&t2, &info) != NULL);
  CHECK(run_until(&t2.done_calls, 2.0));
  CHECK_INT(t2.err, MX_ERR_LIMIT);
  CHECK_INT(t2.body_calls, 0);
  /* Exactly at the limit is fine. */
  sized_len = 10000;
  S.handler = h_sized;
  res t3;
  res_init(&t3);
  CHECK(start(&t3, &info) != NULL);
  CHECK(run_until(&t3.done_calls, 2.0));
  CHECK_INT(t3.err, 0);
  CHECK_INT(t3.body.len, 10000);
  /* A connection left with unread body bytes is never reused. */
  CHECK_INT(S.accepts, 3);
  res_free(&t);
  res_free(&t2);
  res_free(&t3);
  teardown();
}

static void upload_case(const char *method, int64_t content_length) {
  setup();
  S.handler = h_echo_len;
  res t;
  res_init(&t);
  t.up_total = 300000;
  t.up_piece = 7000;
  t.up_again_every = 3;
  mx_upstream_reqinfo info = {.method = method, .path = "/upload",
                              .has_body = true,
                              .content_length = content_length};
  CHECK(start(&t, &info) != NULL);
  CHECK(run_until(&t.done_calls, 3.0));
  CHECK_INT(t.err, 0);
  CHECK_INT(t.status, 200);
  CHECK_MEMEQ(t.body.data, t.body.len, "got 300000", 10);
  CHECK(t.up_again >= 2);
  CHECK_INT(S.body.len, 300000);
  bool same = S.body.len == 300000;
  for (size_t i = 0; same && i < S.body.len; i++)
    same = (unsigned char)S.body.data[i] == pattern(i);
  CHECK(same);
  char line[64];
  snprintf(line, sizeof(line), "%s /upload HTTP/1.1\r\n", method);
  CHECK(S.heads.data && strncmp(S.heads.data, line, strlen(line)) == 0);
  if (content_length >= 0) {
    CHECK_INT(count_lines_with(S.heads.data, "\r\nContent-Length: 300000\r\n"),
              1);
    CHECK_INT(count_lines_with(S.heads.data, "\r\ntransfer-encoding:"), 0);
  } else {
    CHECK_INT(count_lines_with(S.heads.data,
                               "\r\nTransfer-Encoding: chunked\r\n"), 1);
    CHECK_INT(count_lines_with(S.heads.data, "\r\ncontent-length:"), 0);
  }
  CHECK_INT(count_lines_with(S.heads.data, "\r\nexpect:"), 0);
  CHECK_INT(count_lines_with(S.heads.data, "\r\ncontent-type:"), 0);
  res_free(&t);
  teardown();
}

static void test_post_body_pieces(void) { upload_case("POST", 300000); }
static void test_chunked_upload(void) { upload_case("PUT", -1); }

static void test_refused(void) {
  setup();
  /* A bound socket that never listens: connecting to it is refused. */
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t alen = sizeof(a);
  CHECK(bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
  CHECK(getsockname(fd, (struct sockaddr *)&a, &alen) == 0);
  char base[64];
  snprintf(base, sizeof(base), "http://127.0.0.1:%d/", ntohs(a.sin_port));
  mx_upstream *u = mx_upstream_new(L, base, NULL);
  CHECK(u != NULL);
  mx_upstream *saved = U;
  U = u;
  uint64_t errs0 = mx_stats.upstream_errors;
  res t;
  res_init(&t);
  mx_upstream_reqinfo info = {.method = "GET", .path = "/"};
  CHECK(start(&t, &info) != NULL);
  CHECK_INT(t.done_calls, 0); /* not synchronously */
  CHECK(run_until(&t.done_calls, 2.0));
  CHECK_INT(t.err, MX_ERR_UPSTREAM);
  CHECK_STREQ(t.detail, "connect failed");
  CHECK_INT(t.head_calls, 0);
  CHECK_INT(mx_stats.upstream_errors, errs0 + 1);
  U = saved;
  mx_upstream_free(u);
  close(fd);
  CHECK(mx_upstream_new(L, "ftp://x", NULL) == NULL);
  res_free(&t);
  teardown();
}

static void test_timeout(void) {
  setup();
  S.handler = h_never;
  uint64_t to0 = mx_stats.upstream_timeouts;
  res t;
  res_init(&t);
  mx_upstream_reqinfo info = {.method = "GET", .path = "/slow",
                              .timeout_ms = 200};
  double t0 = ev_time();
  CHECK(start(&t, &info) != NULL);
  CHECK(run_until(&S.requests, 2.0));
  double cpu0 = cpu_seconds();
  CHECK(run_until(&t.done_calls, 2.0));
  double took = ev_time() - t0;
  /* Waiting must be idle: a timer armed with whole seconds (999 ms -> 0)
   * would spin the loop until the deadline instead. */
  CHECK(cpu_seconds() - cpu0 < 0.08);
  CHECK_INT(t.err, MX_ERR_TIMEOUT);
  CHECK_INT(S.requests, 1);
  CHECK(took >= 0.19 && took < 1.0);
  CHECK_INT(mx_stats.upstream_timeouts, to0 + 1);
  res_free(&t);
  teardown();
}

static void test_reset_mid_body(void) {
  setup();
  S.handler = h_reset_mid_body;
  res t;
  res_init(&t);
  mx_upstream_reqinfo info = {.method = "GET", .path = "/r"};
  CHECK(start(&t, &info) != NULL);
  CHECK(run_until(&t.done_calls, 2.0));
  CHECK_INT(t.head_calls, 1);
  CHECK_INT(t.body.len, 1000);
  CHECK_INT(t.err, MX_ERR_UPSTREAM);
  CHECK(t.detail && *t.detail);
  res_free(&t);
  teardown();
}

/* After a cancel mid-response, the client closes the connection and no
 * callback follows; the client keeps working. */
static void check_cancelled(res *t) {
  CHECK(run_until(&S.closes, 2.0));
  run_for(0.02);
  CHECK_INT(t->done_calls, 0);
  CHECK_INT(mx_upstream_active(U), 0);
  res t2;
  res_init(&t2);
  S.handler = h_hello;
  mx_upstream_reqinfo info = {.method = "GET", .path = "/after"};
  CHECK(start(&t2, &info) != NULL);
  CHECK(run_until(&t2.done_calls, 2.0));
  CHECK_INT(t2.err, 0);
  CHECK_MEMEQ(t2.body.data, t2.body.len, "hello", 5);
  res_free(&t2);
}

static void test_cancel_in_head(void) {
  for (int how = 1; how <= 2; how++) {
    setup();
    big_len = 2 * 1024 * 1024;
    big_chunked = false;
    S.handler = h_big;
    res t;
    res_init(&t);
    t.cancel_in_head = how;
    mx_upstream_reqinfo info = {.method = "GET", .path = "/big"};
    CHECK(start(&t, &info) != NULL);
    check_cancelled(&t);
    CHECK_INT(t.head_calls, 1);
    CHECK_INT(t.body_calls, 0);
    res_free(&t);
    teardown();
  }
}

static void test_cancel_in_body(void) {
  setup();
  big_len = 2 * 1024 * 1024;
  big_chunked = false;
  S.handler = h_big;
  res t;
  res_init(&t);
  t.cancel_at_body = 1;
  mx_upstream_reqinfo info = {.method = "GET", .path = "/big"};
  CHECK(start(&t, &info) != NULL);
  check_cancelled(&t);
  CHECK_INT(t.body_calls, 1);
  res_free(&t);
  teardown();
}

/* The redelivery after a resume happens inside curl_easy_pause(): a cancel
 * there must not free what curl is still using. */
static void test_cancel_in_resumed_body(void) {
  setup();
  big_len = 2 * 1024 * 1024;
  big_chunked = false;
  S.handler = h_big;
  res t;
  res_init(&t);
  t.pause_every = 1;     /* first call: MX_ERR_AGAIN, resumed by a timer */
  t.cancel_at_body = 2;  /* the redelivery: cancel */
  mx_upstream_reqinfo info = {.method = "GET", .path = "/big"};
  CHECK(start(&t, &info) != NULL);
  check_cancelled(&t);
  CHECK_INT(t.body_calls, 2);
  CHECK(t.redelivery_ok);
  res_free(&t);
  teardown();
}

static void test_cancel_before_callbacks(void) {
  setup();
  S.handler = h_hello;
  res t;
  res_init(&t);
  mx_upstream_reqinfo info = {.method = "GET", .path = "/"};
  CHECK(start(&t, &info) != NULL);
  mx_upstream_resume_response(t.r); /* queued work for a cancelled request */
  mx_upstream_cancel(t.r);
  mx_upstream_cancel(NULL);
  CHECK_INT(mx_upstream_active(U), 0);
  run_for(0.05);
  CHECK_INT(t.head_calls + t.body_calls + t.done_calls, 0);
  CHECK_INT(S.requests, 0);
  res t2;
  res_init(&t2);
  CHECK(start(&t2, &info) != NULL);
  CHECK(run_until(&t2.done_calls, 2.0));
  CHECK_INT(t2.err, 0);
  res_free(&t);
  res_free(&t2);
  teardown();
}

static void test_keepalive(void) {
  setup();
  S.handler = h_hello;
  res a, b, c;
  res_init(&a);
  res_init(&b);
  res_init(&c);
  mx_upstream_reqinfo info = {.method = "GET", .path = "/ka"};
  a.next = &b; /* b starts from a's on_done, c later from the loop */
  a.next_info = &info;
  CHECK(start(&a, &info) != NULL);
  CHECK(run_until(&b.done_calls, 2.0));
  CHECK(start(&c, &info) != NULL);
  CHECK(run_until(&c.done_calls, 2.0));
  CHECK_INT(a.err, 0);
  CHECK_INT(b.err, 0);
  CHECK_INT(c.err, 0);
  CHECK_INT(S.requests, 3);
  CHECK_INT(S.accepts, 1);
  res_free(&a);
  res_free(&b);
  res_free(&c);
  teardown();
}

static void test_interim_skipped(void) {
  setup();
  S.handler = h_interim;
  res t;
  res_init(&t);
  mx_upstream_reqinfo info = {.method = "GET", .path = "/i"};
  CHECK(start(&t, &info) != NULL);
  CHECK(run_until(&t.done_calls, 2.0));
  CHECK_INT(t.err, 0);
  CHECK_INT(t.head_calls, 1);
  CHECK_INT(t.status, 201);
  CHECK_STREQ(t.headers, "X-Final: yes\nContent-Length: 2\n");
  CHECK_MEMEQ(t.body.data, t.body.len, "ok", 2);
  res_free(&t);
  teardown();
}

static void test_head_request(void) {
  setup();
  S.handler = h_head;
  res t, t2;
  res_init(&t);
  res_init(&t2);
  mx_upstream_reqinfo info = {.method = "HEAD", .path = "/h"};
  mx_upstream_reqinfo get = {.method = "GET", .path = "/h"};
  t.next = &t2;
  t.next_info = &get;
  CHECK(start(&t, &info) != NULL);
  CHECK(run_until(&t2.done_calls, 2.0));
  CHECK_INT(t.err, 0);
  CHECK_INT(t.status, 200);
  CHECK_STREQ(t.headers, "Content-Length: 1234\n");
  CHECK_INT(t.body_calls, 0);
  CHECK(strncmp(S.heads.data, "HEAD /h HTTP/1.1\r\n", 18) == 0);
  /* The connection stays usable after a body-less response. */
  CHECK_INT(t2.err, 0);
  CHECK_MEMEQ(t2.body.data, t2.body.len, "hello", 5);
  CHECK_INT(S.accepts, 1);
  res_free(&t);
  res_free(&t2);
  teardown();
}

static void test_head_too_large(void) {
  setup();
  S.handler = h_huge_head;
  res t;
  res_init(&t);
  mx_upstream_reqinfo info = {.method = "GET", .path = "/"};
  CHECK(start(&t, &info) != NULL);
  CHECK(run_until(&t.done_calls, 2.0));
  CHECK_INT(t.err, MX_ERR_UPSTREAM);
  CHECK_STREQ(t.detail, "response head too large");
  CHECK_INT(t.head_calls, 0);
  res_free(&t);
  teardown();
}

static void test_start_inside_callback(void) {
  setup();
  S.handler = h_hello;
  res a, b;
  res_init(&a);
  res_init(&b);
  mx_upstream_reqinfo info = {.method = "GET", .path = "/nested"};
  a.next = &b;
  a.next_info = &info;
  a.start_in_head = true;
  CHECK(start(&a, &info) != NULL);
  CHECK(run_until(&b.done_calls, 2.0));
  CHECK(run_until(&a.done_calls, 2.0));
  CHECK_INT(a.err, 0);
  CHECK_INT(b.err, 0);
  CHECK_MEMEQ(b.body.data, b.body.len, "hello", 5);
  res_free(&a);
  res_free(&b);
  teardown();
}

static void test_free_with_active(void) {
  setup();
  S.handler = h_never;
  res t, t2;
  res_init(&t);
  res_init(&t2);
  t2.pause_every = 1;
  big_len = 1024 * 1024;
  mx_upstream_reqinfo info = {.method = "GET", .path = "/"};
  CHECK(start(&t, &info) != NULL);
  CHECK(run_until(&S.requests, 2.0));
  S.handler = h_big;
  CHECK(start(&t2, &info) != NULL); /* paused mid-body */
  CHECK(run_until(&t2.again_calls, 2.0));
  CHECK_INT(mx_upstream_active(U), 2);
  mx_upstream_free(U); /* no callbacks, nothing leaked */
  ev_timer_stop(L, &t2.resume); /* t2.r is gone */
  U = mx_upstream_new(L, "http://127.0.0.1:1", NULL);
  run_for(0.02);
  CHECK_INT(t.head_calls + t.done_calls, 0);
  CHECK_INT(t2.done_calls, 0);
  res_free(&t);
  res_free(&t2);
  teardown();
}

static void test_no_secrets_in_log(void) {
  char *logbuf = NULL;
  size_t loglen = 0;
  FILE *lf = open_memstream(&logbuf, &loglen);
  CHECK(lf != NULL);
  mx_log_init(MX_LOG_DEBUG, lf);
  setup();
  S.handler = h_hello;
  res t;
  res_init(&t);
  const mx_header hs[] = {
      MX_HEADER_LIT("authorization", "Bearer SECRETAUTH")};
  mx_upstream_reqinfo info = {
      .method = "GET",
      .path = "/_matrix/client/v3/sync?access_token=SECRETTOKEN&timeout=0",
      .headers = hs, .nheaders = 1};
  CHECK(start(&t, &info) != NULL);
  CHECK(run_until(&t.done_calls, 2.0));
  CHECK_INT(t.err, 0);
  res_free(&t);
  teardown();
  mx_log_init(MX_LOG_ERROR, NULL);
  fclose(lf);
  CHECK(logbuf && strstr(logbuf, "upstream.start") != NULL);
  CHECK(logbuf && strstr(logbuf, "upstream.done") != NULL);
  CHECK(logbuf && strstr(logbuf, "access_token=<redacted>") != NULL);
  CHECK(logbuf && strstr(logbuf, "SECRETTOKEN") == NULL);
  CHECK(logbuf && strstr(logbuf, "SECRETAUTH") == NULL);
  free(logbuf);
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  mx_log_init(MX_LOG_ERROR, NULL);
  TAP_RUN(TAP_CASE(test_get), TAP_CASE(test_headers_exact),
          TAP_CASE(test_stream_pause), TAP_CASE(test_stream_pause_chunked),
          TAP_CASE(test_buffered_whole), TAP_CASE(test_buffered_limit),
          TAP_CASE(test_post_body_pieces), TAP_CASE(test_chunked_upload),
          TAP_CASE(test_refused), TAP_CASE(test_timeout),
          TAP_CASE(test_reset_mid_body), TAP_CASE(test_cancel_in_head),
          TAP_CASE(test_cancel_in_body),
          TAP_CASE(test_cancel_in_resumed_body),
          TAP_CASE(test_cancel_before_callbacks), TAP_CASE(test_keepalive),
          TAP_CASE(test_interim_skipped), TAP_CASE(test_head_request),
          TAP_CASE(test_head_too_large), TAP_CASE(test_start_inside_callback),
          TAP_CASE(test_free_with_active), TAP_CASE(test_no_secrets_in_log));
}
