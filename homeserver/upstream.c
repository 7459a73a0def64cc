/*
 * One file on purpose (~950 lines): curl's callbacks, the loop watchers
 * and the request life cycle share the depth/deferred-free rules below,
 * which are only safe when every path that runs inside curl is in view.
 *
 * mx_upstream: libcurl's multi_socket API on the libev loop. See
 * docs/internals/upstream.md for the picture; the short version:
 *
 *  - curl tells us which sockets to watch (sock_fn -> one ev_io each) and
 *    when to wake it (timer_fn -> one one-shot ev_timer); both watchers
 *    call curl_multi_socket_action() and then reap finished transfers.
 *  - User callbacks run inside curl calls (depth > 0). Nothing that curl
 *    forbids there (removing or adding easy handles) is done at that
 *    point: cancels, starts and resumes are queued on u->work and carried
 *    out by a zero-delay timer ("kick") on the next loop iteration.
 *  - curl_easy_pause(CONT) delivers held-back body bytes synchronously, so
 *    it is only ever called from the kick, never from mx_upstream_resume_*.
 */
#include "homeserver/upstream.h"

#include <assert.h>
#include <curl/curl.h>
#include <ev.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/error.h"
#include "common/limits.h"
#include "common/list.h"
#include "common/log.h"
#include "common/metrics.h"

#define DEFAULT_CONNECT_TIMEOUT_MS 5000L
/* Idle pooled connections older than this are not reused: well below the
 * keep-alive timeouts of common servers and reverse proxies (60-75 s), so
 * a request rarely lands on a connection the server is closing. */
#define MAX_IDLE_AGE_S 30L

struct mx_upstream {
  struct ev_loop *loop;
  CURLM *multi;
  char *base_url; /* owned, no trailing slash */
  size_t base_len;
  long connect_timeout_ms;
  ev_timer timer; /* curl's timeout (one-shot by curl's contract) */
  ev_timer kick;  /* zero-delay: runs u->work outside curl calls */
  mx_list reqs;    /* every request not yet freed */
  mx_list work;    /* requests to add, resume or free (req.work) */
  mx_list socks;     /* sock structs, freed with the client if curl did not */
  int depth;      /* > 0 while inside a curl call that can call us back */
  size_t active;  /* started, neither finished nor cancelled */
};

/* One per socket curl asks us to watch. */
typedef struct sock {
  ev_io io;
  mx_upstream *u;
  mx_list_node link;
} sock;

struct mx_upstream_req {
  mx_upstream *u;
  CURL *easy;
  mx_upstream_ops ops;
  void *ud;
  mx_list_node all;  /* u->reqs */
  mx_list_node work; /* u->work while queued */
  const char *path; /* into the URL stored after this struct, for logs */
  const char *method;
  double started;           /* ev_time() at start, for the latency metric */
  int64_t content_length;   /* request body, -1: chunked */
  int64_t body_sent;        /* request body bytes handed to curl */
  size_t buffer_body_max;
  size_t head_bytes;        /* raw response head bytes seen (capped) */
  size_t nheaders;          /* header fields stored in head */
  mx_buf head;              /* "name\0value\0"..., freed after on_head */
  mx_buf body;              /* buffer_body_max mode only */
  int status;               /* of the response being read, 0: none yet */
  int err;                  /* our own failure, overrides curl's result */
  const char *detail;       /* static text for err */
  bool queued;              /* on u->work */
  bool added;               /* in the multi handle */
  bool live;                /* will get on_done unless cancelled */
  bool cancelled;           /* no callback may follow */
  bool busy;                /* inside a callback made from finish() */
  bool head_sent;           /* on_head was delivered */
  bool paused_recv, paused_send;   /* curl holds that direction */
  bool resume_recv, resume_send;   /* the owner asked to resume it */
  /* followed by: struct curl_slist[] then the strings (URL, headers) */
};

static void kick_cb(struct ev_loop *loop, ev_timer *w, int revents);
static void reap(mx_upstream_req *r);

/* ---------------------------------------------------------------------- */
/* Deferred work */

static void queue_work(mx_upstream_req *r) {
  mx_upstream *u = r->u;
  if (!r->queued) {
    r->queued = true;
    mx_list_push_back(&u->work, &r->work);
  }
  if (!ev_is_active(&u->kick)) {
    ev_timer_set(&u->kick, 0., 0.);
    ev_timer_start(u->loop, &u->kick);
  }
}

/* ---------------------------------------------------------------------- */
/* Finishing */

static void map_result(CURLcode rc, int *err, const char **detail) {
  *err = MX_ERR_UPSTREAM;
  switch (rc) {
  case CURLE_OK:
    *err = 0;
    *detail = "";
    return;
  case CURLE_OPERATION_TIMEDOUT:
    *err = MX_ERR_TIMEOUT;
    *detail = "timed out";
    return;
  case CURLE_OUT_OF_MEMORY:
    *err = MX_ERR_NOMEM;
    *detail = "out of memory";
    return;
  case CURLE_COULDNT_CONNECT: *detail = "connect failed"; return;
  case CURLE_COULDNT_RESOLVE_HOST: *detail = "name resolution failed"; return;
  case CURLE_GOT_NOTHING: *detail = "empty reply"; return;
  case CURLE_RECV_ERROR: *detail = "receive failed"; return;
  case CURLE_SEND_ERROR: *detail = "send failed"; return;
  case CURLE_PARTIAL_FILE: *detail = "response truncated"; return;
  case CURLE_WEIRD_SERVER_REPLY: *detail = "malformed response"; return;
  case CURLE_SEND_FAIL_REWIND: *detail = "request body cannot be resent"; return;
  default:
    /* curl's own messages are static strings too. */
    *detail = curl_easy_strerror(rc);
    return;
  }
}

static void log_done(const mx_upstream_req *r, int err, const char *detail) {
  if (!mx_log_enabled(MX_LOG_DEBUG))
    return;
  char target[MX_UPSTREAM_LOG_TARGET_MAX];
  mx_log_redact_target(r->path, strlen(r->path), target, sizeof(target));
  MX_LOG_DEBUG("upstream.done", "method=%s target=%s status=%d err=%d "
               "detail=\"%s\" ms=%.1f", r->method, target, r->status, err,
               detail, (ev_time() - r->started) * 1000.0);
}

/* The transfer ended (res from curl, or our own r->err): delivers the
 * buffered body and on_done, then frees r. Runs outside curl calls. */
static void finish(mx_upstream_req *r, CURLcode res) {
  mx_upstream *u = r->u;
  assert(u->depth == 0 && !r->cancelled);
  if (r->added) {
    /* Before on_done, so the connection is back in the pool for any
     * request on_done starts. */
    curl_multi_remove_handle(u->multi, r->easy);
    r->added = false;
  }
  int err = r->err;
  const char *detail = r->detail;
  if (!err)
    map_result(res, &err, &detail);
  if (!err && !r->head_sent) {
    err = MX_ERR_UPSTREAM;
    detail = "no response head";
  }
  r->busy = true; /* mx_upstream_cancel() only marks from here on */
  if (!err && r->buffer_body_max > 0 && r->ops.on_body) {
    int rv = r->ops.on_body(r, r->body.data ? r->body.data : "", r->body.len,
                            r->ud);
    if (!r->cancelled && rv != 0 && rv != MX_ERR_AGAIN)
      mx_upstream_cancel(r);
  }
  if (!r->cancelled) {
    r->live = false;
    u->active--;
    if (err == MX_ERR_UPSTREAM || err == MX_ERR_TIMEOUT)
      mx_stats.upstream_errors++;
    if (err == MX_ERR_TIMEOUT)
      mx_stats.upstream_timeouts++;
    log_done(r, err, detail);
    if (r->ops.on_done)
      r->ops.on_done(r, err, detail, r->ud);
  }
  reap(r);
}

/* Hands every finished transfer to finish(). Called after each curl call
 * made from the loop, with depth back at 0. */
static void drain(mx_upstream *u) {
  CURLMsg *m;
  int left;
  assert(u->depth == 0);
  while ((m = curl_multi_info_read(u->multi, &left))) {
    if (m->msg != CURLMSG_DONE)
      continue;
    CURLcode res = m->data.result;
    char *p = NULL;
    curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, &p);
    mx_upstream_req *r = (mx_upstream_req *)(void *)p;
    /* A request cancelled inside a callback is already queued for reaping;
     * curl just reports the error our callback returned. */
    if (r && !r->cancelled)
      finish(r, res);
  }
}

/* Frees r without any callback. Never called inside a curl call. */
static void reap(mx_upstream_req *r) {
  mx_upstream *u = r->u;
  assert(u->depth == 0);
  if (r->queued)
    mx_list_remove(&r->work);
  mx_list_remove(&r->all);
  if (r->live)
    u->active--;
  if (r->added)
    curl_multi_remove_handle(u->multi, r->easy); /* mid-transfer: closes */
  curl_easy_cleanup(r->easy);
  mx_buf_free(&r->head);
  mx_buf_free(&r->body);
  free(r);
}

/* ---------------------------------------------------------------------- */
/* curl <-> libev */

static void io_cb(struct ev_loop *loop, ev_io *w, int revents) {
  sock *s = w->data;
  mx_upstream *u = s->u; /* s may be freed inside socket_action */
  int flags = ((revents & EV_READ) ? CURL_CSELECT_IN : 0) |
              ((revents & EV_WRITE) ? CURL_CSELECT_OUT : 0);
  int running;
  u->depth++;
  curl_multi_socket_action(u->multi, w->fd, flags, &running);
  u->depth--;
  drain(u);
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_upstream *u = w->data;
  int running;
  u->depth++;
  curl_multi_socket_action(u->multi, CURL_SOCKET_TIMEOUT, 0, &running);
  u->depth--;
  drain(u);
}

/* CURLMOPT_TIMERFUNCTION: one one-shot timer. 0 means "now": a zero-delay
 * timer runs it on the next iteration (calling socket_action from here
 * would re-enter curl). */
static int timer_fn(CURLM *multi, long timeout_ms, void *userp) {
  mx_upstream *u = userp;
  ev_timer_stop(u->loop, &u->timer);
  if (timeout_ms >= 0) {
    /* Floating point: integer division would turn 999 ms into 0 s. */
    ev_timer_set(&u->timer, (double)timeout_ms / 1000.0, 0.);
    ev_timer_start(u->loop, &u->timer);
  }
  return 0;
}

/* CURLMOPT_SOCKETFUNCTION: keeps one ev_io per socket in step with what
 * curl wants to wait for. */
static int sock_fn(CURL *easy, curl_socket_t fd, int what, void *userp,
                   void *socketp) {
  mx_upstream *u = userp;
  sock *s = socketp;
  if (what == CURL_POLL_REMOVE) {
    if (s) {
      ev_io_stop(u->loop, &s->io);
      mx_list_remove(&s->link);
      free(s);
    }
    return 0;
  }
  int events = ((what & CURL_POLL_IN) ? EV_READ : 0) |
               ((what & CURL_POLL_OUT) ? EV_WRITE : 0);
  if (!s) {
    s = calloc(1, sizeof(*s));
    if (!s) {
      MX_LOG_ERR("upstream.nomem", "what=socket");
      return -1;
    }
    s->u = u;
    ev_init(&s->io, io_cb);
    s->io.data = s;
    mx_list_push_back(&u->socks, &s->link);
    curl_multi_assign(u->multi, fd, s);
  } else {
    ev_io_stop(u->loop, &s->io);
  }
  if (events) {
    ev_io_set(&s->io, fd, events);
    ev_io_start(u->loop, &s->io);
  }
  return 0;
}

/* ---------------------------------------------------------------------- */
/* Response head */

/* Fails the transfer from inside a curl callback: the callback then
 * returns an error to curl and finish() reports err. */
static size_t fail(mx_upstream_req *r, int err, const char *detail) {
  if (!r->err) {
    r->err = err;
    r->detail = detail;
  }
  return 0;
}

static bool is_tchar(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         (c >= '0' && c <= '9') || (c && strchr("!#$%&'*+-.^_`|~", c));
}

static bool is_token(const char *s, size_t n) {
  if (n == 0)
    return false;
  for (size_t i = 0; i < n; i++)
    if (!is_tchar((unsigned char)s[i]))
      return false;
  return true;
}

/* "HTTP/1.1 200 OK" -> 200; -1 when malformed. */
static int parse_status(const char *p, size_t n) {
  if (n < 12 || memcmp(p, "HTTP/", 5) != 0)
    return -1;
  const char *sp = memchr(p, ' ', n);
  if (!sp || (size_t)(p + n - sp) < 4)
    return -1;
  const char *d = sp + 1;
  if (d[0] < '1' || d[0] > '5' || d[1] < '0' || d[1] > '9' || d[2] < '0' ||
      d[2] > '9')
    return -1;
  if (d + 3 < p + n && d[3] != ' ')
    return -1;
  return (d[0] - '0') * 100 + (d[1] - '0') * 10 + (d[2] - '0');
}

/* Delivers the stored head through on_head. Returns false when the
 * transfer must stop (cancelled or out of memory; r->err says which). */
static bool deliver_head(mx_upstream_req *r) {
  r->head_sent = true;
  mx_hist_observe(&mx_stats.upstream_latency, ev_time() - r->started);
  int rv = 0;
  if (r->ops.on_head) {
    mx_header *hs = NULL;
    if (r->nheaders) {
      /* Bounded by MX_UPSTREAM_MAX_HEADER: each field took >= 3 bytes. */
      hs = malloc(r->nheaders * sizeof(*hs));
      if (!hs) {
        fail(r, MX_ERR_NOMEM, "out of memory");
        return false;
      }
      const char *p = r->head.data;
      for (size_t i = 0; i < r->nheaders; i++) {
        hs[i].name = p;
        hs[i].namelen = strlen(p);
        p += hs[i].namelen + 1;
        hs[i].value = p;
        hs[i].valuelen = strlen(p);
        p += hs[i].valuelen + 1;
      }
    }
    rv = r->ops.on_head(r, r->status, hs, r->nheaders, r->ud);
    free(hs);
  }
  mx_buf_free(&r->head);
  r->nheaders = 0;
  if (r->cancelled)
    return false;
  if (rv != 0) {
    mx_upstream_cancel(r);
    return false;
  }
  bool bodyless = strcmp(r->method, "HEAD") == 0 || r->status == 204 ||
                  r->status == 304;
  if (r->buffer_body_max > 0 && !bodyless) {
    /* Refuse a too large body before reading it, and size the buffer once
     * instead of doubling through a big sync response. */
    curl_off_t cl = -1;
    curl_easy_getinfo(r->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
    if (cl > 0 && (uint64_t)cl > r->buffer_body_max) {
      fail(r, MX_ERR_LIMIT, "response body too large");
      return false;
    }
    if (cl > 0 && !mx_buf_reserve(&r->body, (size_t)cl)) {
      fail(r, MX_ERR_NOMEM, "out of memory");
      return false;
    }
  }
  return true;
}

/* Stores one "name: value" line (CRLF stripped) as "name\0value\0". */
static bool store_field(mx_upstream_req *r, const char *p, size_t n) {
  if (p[0] == ' ' || p[0] == '\t') {
    /* Obsolete line folding: RFC 9112 5.2 lets a recipient replace it with
     * a space. */
    if (r->nheaders == 0)
      return false;
    while (n && (*p == ' ' || *p == '\t'))
      p++, n--;
    while (n && (p[n - 1] == ' ' || p[n - 1] == '\t'))
      n--; /* values are trimmed, folded ones too */
    if (n == 0)
      return true;
    r->head.len--; /* drop the value's NUL, append " more\0" */
    /* An empty first value takes the continuation without a space. */
    bool empty = r->head.len > 0 && r->head.data[r->head.len - 1] == '\0';
    return (empty || mx_buf_append(&r->head, " ", 1) == 0) &&
           mx_buf_append(&r->head, p, n) == 0 &&
           mx_buf_append(&r->head, "", 1) == 0;
  }
  const char *colon = memchr(p, ':', n);
  if (!colon || !is_token(p, (size_t)(colon - p)))
    return false;
  const char *v = colon + 1, *end = p + n;
  while (v < end && (*v == ' ' || *v == '\t'))
    v++;
  while (end > v && (end[-1] == ' ' || end[-1] == '\t'))
    end--;
  if (mx_buf_append(&r->head, p, (size_t)(colon - p)) != 0 ||
      mx_buf_append(&r->head, "", 1) != 0 ||
      mx_buf_append(&r->head, v, (size_t)(end - v)) != 0 ||
      mx_buf_append(&r->head, "", 1) != 0)
    return false;
  r->nheaders++;
  return true;
}

/* CURLOPT_HEADERFUNCTION: one line per call, status line first. */
static size_t header_cb(char *p, size_t size, size_t nmemb, void *ud) {
  mx_upstream_req *r = ud;
  size_t total = size * nmemb, n = total;
  if (r->cancelled || r->err)
    return 0;
  /* Counted across interim responses and trailers too, so no sequence of
   * them can grow without bound. */
  r->head_bytes += total;
  if (r->head_bytes > MX_UPSTREAM_MAX_HEADER)
    return fail(r, MX_ERR_UPSTREAM, "response head too large");
  if (r->head_sent)
    return total; /* trailers: not forwarded */
  if (n && p[n - 1] == '\n')
    n--;
  if (n && p[n - 1] == '\r')
    n--;
  if (memchr(p, '\0', n) || memchr(p, '\r', n))
    return fail(r, MX_ERR_UPSTREAM, "malformed response head");
  if (r->status == 0) {
    r->status = parse_status(p, n);
    if (r->status < 0)
      return fail(r, MX_ERR_UPSTREAM, "malformed status line");
    return total;
  }
  if (n > 0) {
    if (!store_field(r, p, n))
      return fail(r, MX_ERR_UPSTREAM, "malformed response head");
    return total;
  }
  /* The blank line. 1xx heads are interim: the final one follows. */
  if (r->status < 200) {
    r->status = 0;
    r->nheaders = 0;
    mx_buf_reset(&r->head);
    return total;
  }
  return deliver_head(r) ? total : 0;
}

/* ---------------------------------------------------------------------- */
/* Bodies */

/* CURLOPT_WRITEFUNCTION: response body bytes. */
static size_t write_cb(char *p, size_t size, size_t nmemb, void *ud) {
  mx_upstream_req *r = ud;
  size_t n = size * nmemb;
  if (r->cancelled || r->err)
    return 0;
  if (!r->head_sent) {
    /* curl always ends the head with its blank line first; this is only a
     * safety net. */
    if (r->status < 200)
      return fail(r, MX_ERR_UPSTREAM, "body before response head");
    if (!deliver_head(r))
      return 0;
  }
  if (r->buffer_body_max > 0) {
    int rv = mx_buf_append(&r->body, p, n);
    if (rv == MX_ERR_LIMIT)
      return fail(r, MX_ERR_LIMIT, "response body too large");
    if (rv != 0)
      return fail(r, MX_ERR_NOMEM, "out of memory");
    return n;
  }
  if (!r->ops.on_body)
    return n;
  int rv = r->ops.on_body(r, p, n, r->ud);
  if (r->cancelled)
    return 0;
  if (rv == MX_ERR_AGAIN) {
    /* curl keeps these bytes and offers them again after unpausing. */
    r->paused_recv = true;
    return CURL_WRITEFUNC_PAUSE;
  }
  if (rv != 0) {
    mx_upstream_cancel(r);
    return 0;
  }
  return n;
}

/* CURLOPT_READFUNCTION: request body bytes. */
static size_t read_cb(char *buf, size_t size, size_t nmemb, void *ud) {
  mx_upstream_req *r = ud;
  size_t max = size * nmemb;
  if (r->cancelled || r->err)
    return CURL_READFUNC_ABORT;
  if (r->content_length >= 0) {
    /* Never send more than announced: extra bytes would be read by the
     * server as the start of another request. */
    int64_t left = r->content_length - r->body_sent;
    if (left == 0)
      return 0;
    if ((uint64_t)left < max)
      max = (size_t)left;
  }
  ssize_t got = r->ops.read_body(r, buf, max, r->ud);
  if (r->cancelled)
    return CURL_READFUNC_ABORT;
  if (got == MX_ERR_AGAIN) {
    r->paused_send = true;
    return CURL_READFUNC_PAUSE;
  }
  if (got < 0) {
    mx_upstream_cancel(r);
    return CURL_READFUNC_ABORT;
  }
  assert((size_t)got <= max);
  if (got == 0 && r->content_length >= 0) {
    /* Ending early would leave the server waiting for the rest. */
    fail(r, MX_ERR_UPSTREAM, "request body shorter than its length");
    return CURL_READFUNC_ABORT;
  }
  r->body_sent += got;
  return (size_t)got;
}

/* ---------------------------------------------------------------------- */
/* The kick: deferred adds, resumes and frees */

static void run_one(mx_upstream_req *r) {
  mx_upstream *u = r->u;
  if (r->cancelled) {
    reap(r);
    return;
  }
  if (!r->added) {
    /* Started from inside a callback, where curl refuses new handles. */
    if (curl_multi_add_handle(u->multi, r->easy) != CURLM_OK) {
      r->err = MX_ERR_NOMEM;
      r->detail = "out of memory";
      finish(r, CURLE_OUT_OF_MEMORY);
      return;
    }
    r->added = true;
    return;
  }
  bool change = false;
  if (r->resume_recv && r->paused_recv) {
    r->paused_recv = false;
    change = true;
  }
  if (r->resume_send && r->paused_send) {
    r->paused_send = false;
    change = true;
  }
  r->resume_recv = r->resume_send = false;
  if (!change)
    return;
  /* May call write_cb right here with the held-back bytes (curl 7.88
   * does), which may pause again or cancel: r is not freed before depth
   * is back to 0. */
  int state = (r->paused_recv ? CURLPAUSE_RECV : 0) |
              (r->paused_send ? CURLPAUSE_SEND : 0);
  u->depth++;
  CURLcode rc = curl_easy_pause(r->easy, state);
  u->depth--;
  if (rc != CURLE_OK && !r->cancelled) {
    /* curl_easy_pause() errors do not reach the multi handle: end the
     * transfer ourselves. */
    finish(r, rc);
  }
}

static void kick_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_upstream *u = w->data;
  /* Only what is queued now: work queued while running (a callback that
   * resumes at once) waits for the next iteration, so it cannot spin. */
  mx_list batch;
  mx_list_init(&batch);
  mx_list_move_all(&batch, &u->work);
  for (mx_list_node *n; (n = mx_list_pop_front(&batch));) {
    mx_upstream_req *r = MX_CONTAINER_OF(n, mx_upstream_req, work);
    r->queued = false;
    run_one(r);
  }
  drain(u);
}

/* ---------------------------------------------------------------------- */
/* Public API */

mx_upstream *mx_upstream_new(struct ev_loop *loop, const char *base_url,
                             const mx_upstream_opts *opts) {
  if (!loop || !base_url ||
      (strncmp(base_url, "http://", 7) != 0 &&
       strncmp(base_url, "https://", 8) != 0))
    return NULL;
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
    return NULL;
  mx_upstream *u = calloc(1, sizeof(*u));
  if (!u)
    goto fail_global;
  u->loop = loop;
  u->base_len = strlen(base_url);
  while (u->base_len > 0 && base_url[u->base_len - 1] == '/')
    u->base_len--;
  u->base_url = malloc(u->base_len + 1);
  if (!u->base_url)
    goto fail_u;
  memcpy(u->base_url, base_url, u->base_len);
  u->base_url[u->base_len] = '\0';
  long maxconn = opts && opts->max_connections > 0 ? opts->max_connections
                                                   : MX_UPSTREAM_DEFAULT_MAX_CONNECTIONS;
  u->connect_timeout_ms = opts && opts->connect_timeout_ms > 0
                              ? opts->connect_timeout_ms
                              : DEFAULT_CONNECT_TIMEOUT_MS;
  mx_list_init(&u->reqs);
  mx_list_init(&u->work);
  mx_list_init(&u->socks);
  ev_timer_init(&u->timer, timer_cb, 0., 0.);
  u->timer.data = u;
  ev_timer_init(&u->kick, kick_cb, 0., 0.);
  u->kick.data = u;

  u->multi = curl_multi_init();
  if (!u->multi)
    goto fail_url;
  CURLMcode mc = CURLM_OK;
#define MSET(opt, val)                                                       \
  do {                                                                       \
    if (mc == CURLM_OK)                                                      \
      mc = curl_multi_setopt(u->multi, opt, val);                            \
  } while (0)
  MSET(CURLMOPT_SOCKETFUNCTION, sock_fn);
  MSET(CURLMOPT_SOCKETDATA, u);
  MSET(CURLMOPT_TIMERFUNCTION, timer_fn);
  MSET(CURLMOPT_TIMERDATA, u);
  MSET(CURLMOPT_PIPELINING, (long)CURLPIPE_NOTHING);
  MSET(CURLMOPT_MAX_HOST_CONNECTIONS, maxconn);
  MSET(CURLMOPT_MAX_TOTAL_CONNECTIONS, maxconn);
  MSET(CURLMOPT_MAXCONNECTS, maxconn); /* idle ones kept in the pool */
#undef MSET
  if (mc != CURLM_OK)
    goto fail_multi;
  return u;

fail_multi:
  curl_multi_cleanup(u->multi);
fail_url:
  free(u->base_url);
fail_u:
  free(u);
fail_global:
  curl_global_cleanup();
  return NULL;
}

void mx_upstream_free(mx_upstream *u) {
  if (!u)
    return;
  assert(u->depth == 0);
  while (!mx_list_empty(&u->reqs)) {
    mx_upstream_req *r = MX_CONTAINER_OF(u->reqs.next, mx_upstream_req, all);
    assert(!r->busy); /* not from inside a callback */
    reap(r);
  }
  /* curl may still call timer_fn and sock_fn from here. */
  curl_multi_cleanup(u->multi); /* closes the pooled connections */
  ev_timer_stop(u->loop, &u->timer);
  ev_timer_stop(u->loop, &u->kick);
  while (!mx_list_empty(&u->socks)) {
    sock *s = MX_CONTAINER_OF(u->socks.next, sock, link);
    ev_io_stop(u->loop, &s->io);
    mx_list_remove(&s->link);
    free(s);
  }
  free(u->base_url);
  free(u);
  curl_global_cleanup();
}

static bool valid_value(const char *v, size_t n) {
  /* CR or LF would let a header value smuggle in fields or requests. */
  for (size_t i = 0; i < n; i++)
    if (v[i] == '\r' || v[i] == '\n' || v[i] == '\0')
      return false;
  return true;
}

/* Framing is ours: curl writes Content-Length or chunked from has_body and
 * content_length, and a second, disagreeing one from the caller would make
 * the request ambiguous. */
static bool is_framing(const mx_header *h) {
  return mx_http_name_is(h, "content-length") ||
         mx_http_name_is(h, "transfer-encoding");
}

int mx_upstream_start(mx_upstream *u, const mx_upstream_reqinfo *info,
                      const mx_upstream_ops *ops, void *ud,
                      mx_upstream_req **out) {
  *out = NULL;
  if (!u || !info || !ops || !info->method || !info->path ||
      info->path[0] != '/' || (info->has_body && !ops->read_body) ||
      (info->has_body && info->content_length < -1))
    return MX_ERR_INVALID;
  size_t mlen = strlen(info->method);
  if (mlen > MX_UPSTREAM_MAX_METHOD || !is_token(info->method, mlen))
    return MX_ERR_INVALID;
  size_t plen = strlen(info->path);
  if (!valid_value(info->path, plen) || memchr(info->path, ' ', plen) ||
      memchr(info->path, '#', plen))
    return MX_ERR_INVALID;

  /* One allocation: the request, the header list curl reads (curl never
   * frees CURLOPT_HTTPHEADER lists, so it need not come from
   * curl_slist_append) and the strings. */
  bool has_accept = mx_http_find(info->headers, info->nheaders, "accept");
  bool has_expect = mx_http_find(info->headers, info->nheaders, "expect");
  size_t nlist = 0, strbytes = u->base_len + plen + 1 + mlen + 1;
  for (size_t i = 0; i < info->nheaders; i++) {
    const mx_header *h = &info->headers[i];
    if (!is_token(h->name, h->namelen) || !valid_value(h->value, h->valuelen))
      return MX_ERR_INVALID;
    if (is_framing(h))
      continue;
    nlist++;
    strbytes += h->namelen + 2 + h->valuelen + 1;
  }
  /* curl adds "Accept: * / *" and, on uploads, "Expect: 100-continue"
   * unless the list names them; an empty "Name:" entry suppresses one. */
  if (!has_accept)
    nlist++, strbytes += sizeof("Accept:");
  if (!has_expect)
    nlist++, strbytes += sizeof("Expect:");

  mx_upstream_req *r =
      calloc(1, sizeof(*r) + nlist * sizeof(struct curl_slist) + strbytes);
  if (!r)
    return MX_ERR_NOMEM;
  struct curl_slist *list = (struct curl_slist *)(void *)(r + 1);
  char *s = (char *)(list + nlist);
  char *url = s;
  memcpy(s, u->base_url, u->base_len);
  memcpy(s + u->base_len, info->path, plen + 1);
  r->path = s + u->base_len;
  s += u->base_len + plen + 1;
  memcpy(s, info->method, mlen + 1);
  r->method = s;
  s += mlen + 1;
  size_t k = 0;
  for (size_t i = 0; i < info->nheaders; i++) {
    const mx_header *h = &info->headers[i];
    if (is_framing(h))
      continue;
    list[k].data = s;
    memcpy(s, h->name, h->namelen);
    s += h->namelen;
    if (h->valuelen == 0) {
      *s++ = ';'; /* "Name;" is curl's way to send an empty value */
    } else {
      *s++ = ':';
      *s++ = ' ';
      memcpy(s, h->value, h->valuelen);
      s += h->valuelen;
    }
    *s++ = '\0';
    k++;
  }
  if (!has_accept) {
    list[k++].data = s;
    memcpy(s, "Accept:", sizeof("Accept:"));
    s += sizeof("Accept:");
  }
  if (!has_expect) {
    list[k++].data = s;
    memcpy(s, "Expect:", sizeof("Expect:"));
    s += sizeof("Expect:");
  }
  assert(k == nlist);
  for (size_t i = 0; i < nlist; i++)
    list[i].next = i + 1 < nlist ? &list[i + 1] : NULL;

  r->u = u;
  r->ops = *ops;
  r->ud = ud;
  r->content_length = info->has_body ? info->content_length : 0;
  r->buffer_body_max = info->buffer_body_max;
  mx_buf_init(&r->head, MX_UPSTREAM_MAX_HEADER);
  mx_buf_init(&r->body, info->buffer_body_max);

  r->easy = curl_easy_init();
  if (!r->easy) {
    free(r);
    return MX_ERR_NOMEM;
  }
  CURL *e = r->easy;
  CURLcode rc = CURLE_OK;
#define SET(opt, val)                                                        \
  do {                                                                       \
    if (rc == CURLE_OK)                                                      \
      rc = curl_easy_setopt(e, opt, val);                                    \
  } while (0)
  SET(CURLOPT_URL, url);
  SET(CURLOPT_PRIVATE, (void *)r);
  SET(CURLOPT_PROTOCOLS_STR, "http,https");
  SET(CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
  SET(CURLOPT_NOSIGNAL, 1L);
  SET(CURLOPT_PROXY, ""); /* ignore http_proxy & co. */
  SET(CURLOPT_FOLLOWLOCATION, 0L);
  SET(CURLOPT_PATH_AS_IS, 1L); /* the homeserver sees the client's path */
  SET(CURLOPT_HTTP_CONTENT_DECODING, 0L); /* bodies pass through as is */
  SET(CURLOPT_CONNECTTIMEOUT_MS, u->connect_timeout_ms);
  if (info->timeout_ms > 0)
    SET(CURLOPT_TIMEOUT_MS, info->timeout_ms);
  SET(CURLOPT_TCP_NODELAY, 1L);
  SET(CURLOPT_TCP_KEEPALIVE, 1L);
  SET(CURLOPT_TCP_KEEPIDLE, 30L);
  SET(CURLOPT_TCP_KEEPINTVL, 10L);
  SET(CURLOPT_MAXAGE_CONN, MAX_IDLE_AGE_S);
  SET(CURLOPT_HTTPHEADER, nlist ? list : NULL);
  SET(CURLOPT_HEADERFUNCTION, header_cb);
  SET(CURLOPT_HEADERDATA, (void *)r);
  SET(CURLOPT_WRITEFUNCTION, write_cb);
  SET(CURLOPT_WRITEDATA, (void *)r);
  if (strcmp(r->method, "HEAD") == 0) {
    SET(CURLOPT_NOBODY, 1L);
  } else if (info->has_body) {
    /* Upload mode sends the body from read_cb for any method and, unlike
     * CURLOPT_POST, adds no Content-Type. Unknown length: chunked. */
    SET(CURLOPT_UPLOAD, 1L);
    SET(CURLOPT_READFUNCTION, read_cb);
    SET(CURLOPT_READDATA, (void *)r);
    SET(CURLOPT_INFILESIZE_LARGE, (curl_off_t)info->content_length);
    if (strcmp(r->method, "PUT") != 0)
      SET(CURLOPT_CUSTOMREQUEST, r->method);
  } else if (strcmp(r->method, "GET") == 0) {
    SET(CURLOPT_HTTPGET, 1L);
  } else {
    SET(CURLOPT_CUSTOMREQUEST, r->method);
  }
#undef SET
  if (rc != CURLE_OK) {
    curl_easy_cleanup(e);
    free(r);
    return MX_ERR_NOMEM;
  }

  if (u->depth == 0) {
    /* curl only calls timer_fn from here: the transfer starts on the
     * loop, so on_done cannot run before this returns. */
    if (curl_multi_add_handle(u->multi, e) != CURLM_OK) {
      curl_easy_cleanup(e);
      free(r);
      return MX_ERR_NOMEM;
    }
    r->added = true;
  } else {
    queue_work(r); /* curl refuses new handles inside its callbacks */
  }
  r->started = ev_time();
  r->live = true;
  u->active++;
  mx_list_push_back(&u->reqs, &r->all);
  mx_stats.upstream_requests++;
  if (mx_log_enabled(MX_LOG_DEBUG)) {
    char target[MX_UPSTREAM_LOG_TARGET_MAX];
    mx_log_redact_target(r->path, plen, target, sizeof(target));
    MX_LOG_DEBUG("upstream.start", "method=%s target=%s", r->method, target);
  }
  *out = r;
  return 0;
}

void mx_upstream_resume_request(mx_upstream_req *r) {
  if (!r || r->cancelled || !r->live)
    return;
  r->resume_send = true;
  queue_work(r);
}

void mx_upstream_resume_response(mx_upstream_req *r) {
  if (!r || r->cancelled || !r->live)
    return;
  r->resume_recv = true;
  queue_work(r);
}

void mx_upstream_cancel(mx_upstream_req *r) {
  if (!r || !r->live)
    return; /* already cancelled, or inside its on_done */
  mx_upstream *u = r->u;
  r->live = false;
  r->cancelled = true;
  u->active--;
  if (r->busy)
    return; /* finish() frees it when the callback returns */
  if (u->depth > 0) {
    /* Inside a curl call: curl may still hold r's pointers on its stack
     * (curl_easy_pause, the socket action). Free it from the kick. */
    queue_work(r);
    return;
  }
  reap(r);
}

size_t mx_upstream_active(const mx_upstream *u) { return u ? u->active : 0; }
