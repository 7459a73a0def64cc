/*
 * The presence relay's I/O (sync/presence.c decides what to send). One
 * file on purpose (~700 lines): the publishing Redis link, the HTTP
 * set_state calls and the shutdown handshake share the relay's state.
 */
#include "homeserver/presence_relay.h"

#include <errno.h>
#include <ev.h>
#include <hiredis/adapters/libev.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/error.h"
#include "common/log.h"
#include "homeserver/redis_feed.h"
#include "homeserver/upstream.h"

#define CONNECT_TIMEOUT 5.0 /* hiredis 0.14 has none of its own */
#define BACKOFF_MIN 0.25
#define BACKOFF_MAX 15.0
#define PING_EVERY 15.0 /* a publishing connection can PING: dead links */
#define PING_TIMEOUT 10.0
#define CALL_TIMEOUT_MS 10000
#define SET_STATE_PATH "/_synapse/replication/presence_set_state/"

typedef struct call call;

struct mx_presence_relay {
  struct ev_loop *loop;
  mx_presence *logic;
  mx_presence_relay_hooks hooks;
  char *host, *user, *password, *channel;
  int port;
  char *secret;            /* NULL: keepalive mode or no secret */
  bool set_state_mode;
  mx_upstream *http;
  call *calls;             /* in flight */
  size_t ncalls;
  redisAsyncContext *ac;
  bool connected, up, freeing, auth_failed_logged;
  int failures;
  size_t inflight;         /* PUBLISH/PING without reply */
  double ping_sent;        /* 0: none outstanding */
  double last_ping;
  bool *shutdown_ack;      /* set by the CLEAR reply during shutdown */
  ev_timer retry, connect_timeout, tick;
  mx_presence_relay_stats stats;
};

struct call {
  mx_presence_relay *r;
  mx_upstream_req *req;
  char *user;
  size_t ulen;
  char body[2 * MX_PRESENCE_MAX_ID + 128];
  size_t blen, sent;
  int status;
  call *prev, *next;
};

static void connect_now(mx_presence_relay *r);

/* --- Redis: the publishing connection ----------------------------- */

static void schedule_retry(mx_presence_relay *r) {
  if (r->freeing)
    return;
  double delay = BACKOFF_MIN;
  for (int i = 0; i < r->failures && delay < BACKOFF_MAX; i++)
    delay *= 2;
  if (delay > BACKOFF_MAX)
    delay = BACKOFF_MAX;
  delay *= 0.5 + (double)(random() % 1000) / 1000.0;
  r->failures++;
  ev_timer_stop(r->loop, &r->retry);
  ev_timer_set(&r->retry, delay, 0.);
  ev_timer_start(r->loop, &r->retry);
}

static void went_down(mx_presence_relay *r, const char *why) {
  bool was_up = r->up;
  r->ac = NULL;
  r->connected = r->up = false;
  r->inflight = 0;
  r->ping_sent = 0;
  ev_timer_stop(r->loop, &r->connect_timeout);
  if (r->freeing)
    return;
  mx_presence_link(r->logic, false, ev_now(r->loop));
  if (was_up || r->failures == 0)
    MX_LOG_WARN("presence.down", "host=%s port=%d reason=\"%s\"", r->host,
                r->port, why);
  schedule_retry(r);
}

/* Drops the link from inside a callback: hiredis calls on_disconnect. */
static void reset_link(mx_presence_relay *r, const char *why) {
  if (!r->ac)
    return;
  MX_LOG_WARN("presence.reset", "reason=\"%s\"", why);
  redisAsyncDisconnect(r->ac);
}

static void on_publish_reply(redisAsyncContext *ac, void *rep, void *priv) {
  mx_presence_relay *r = priv;
  redisReply *reply = rep;
  if (r->inflight)
    r->inflight--;
  if (!reply) {
    r->stats.publish_errors++;
    return; /* link dropped: on_disconnect follows */
  }
  if (reply->type == REDIS_REPLY_ERROR) {
    r->stats.publish_errors++;
    MX_LOG_ERR("presence.publish_refused", "error=\"%.*s\"", (int)reply->len,
               reply->str);
    reset_link(r, "publish refused");
    return;
  }
  r->stats.published++;
}

static void on_clear_reply(redisAsyncContext *ac, void *rep, void *priv) {
  mx_presence_relay *r = priv;
  on_publish_reply(ac, rep, priv);
  if (rep && ((redisReply *)rep)->type == REDIS_REPLY_INTEGER &&
      r->shutdown_ack)
    *r->shutdown_ack = true;
}

static int publish(mx_presence_relay *r, const char *line, size_t len,
                   redisCallbackFn *cb) {
  if (!r->up || !r->ac) {
    r->stats.dropped++;
    return MX_ERR_CLOSED;
  }
  if (r->inflight >= MX_PRESENCE_RELAY_MAX_PUBLISHES) {
    /* Redis does not keep up: start over (CLEAR + every start). */
    r->stats.dropped++;
    reset_link(r, "too many publishes in flight");
    return MX_ERR_LIMIT;
  }
  if (redisAsyncCommand(r->ac, cb, r, "PUBLISH %b %b", r->channel,
                        strlen(r->channel), line, len) != REDIS_OK) {
    r->stats.dropped++;
    return MX_ERR_IO;
  }
  r->inflight++;
  return 0;
}

static void on_ping_reply(redisAsyncContext *ac, void *rep, void *priv) {
  mx_presence_relay *r = priv;
  redisReply *reply = rep;
  if (r->inflight)
    r->inflight--;
  if (!reply || r->freeing)
    return;
  if (reply->type == REDIS_REPLY_ERROR) {
    /* AUTH refused, or the account may not PING. */
    MX_LOG_ERR("presence.auth_failed", "error=\"%.*s\"", (int)reply->len,
               reply->str);
    reset_link(r, "ping refused");
    return;
  }
  r->ping_sent = 0;
  if (!r->up) {
    r->up = true;
    r->failures = 0;
    MX_LOG_INFO("presence.up", "host=%s port=%d channel=%s instance=%s",
                r->host, r->port, r->channel,
                mx_presence_instance(r->logic));
    /* CLEAR_USER_SYNC, then every device's start. */
    mx_presence_link(r->logic, true, ev_now(r->loop));
  }
}

static void on_auth_reply(redisAsyncContext *ac, void *rep, void *priv) {
  mx_presence_relay *r = priv;
  redisReply *reply = rep;
  if (r->inflight)
    r->inflight--;
  if (reply && reply->type == REDIS_REPLY_ERROR && !r->freeing) {
    /* Never log the password; the error text does not contain it. */
    MX_LOG_ERR("presence.auth_failed", "error=\"%.*s\"", (int)reply->len,
               reply->str);
    reset_link(r, "auth refused");
  }
}

static void send_ping(mx_presence_relay *r) {
  if (redisAsyncCommand(r->ac, on_ping_reply, r, "PING") == REDIS_OK) {
    r->inflight++;
    r->ping_sent = r->last_ping = ev_now(r->loop);
  }
}

static void on_connect(const redisAsyncContext *cac, int status) {
  mx_presence_relay *r = cac->data;
  redisAsyncContext *ac = (redisAsyncContext *)cac;
  ev_timer_stop(r->loop, &r->connect_timeout);
  if (status != REDIS_OK) {
    went_down(r, cac->errstr[0] ? cac->errstr : "connect failed");
    return;
  }
  r->connected = true;
  mx_redis_tune_socket(ac->c.fd, 30000);
  if (r->password) {
    int rv = r->user ? redisAsyncCommand(ac, on_auth_reply, r, "AUTH %s %s",
                                         r->user, r->password)
                     : redisAsyncCommand(ac, on_auth_reply, r, "AUTH %s",
                                         r->password);
    if (rv == REDIS_OK)
      r->inflight++;
  }
  /* Up once PING answers: AUTH (pipelined before it) went through. */
  send_ping(r);
}

static void on_disconnect(const redisAsyncContext *ac, int status) {
  mx_presence_relay *r = ac->data;
  went_down(r, ac->errstr[0] ? ac->errstr : "connection closed");
}

static void connect_timeout_cb(struct ev_loop *loop, ev_timer *w,
                               int revents) {
  mx_presence_relay *r = w->data;
  if (r->ac && !r->connected) {
    redisAsyncContext *ac = r->ac;
    r->ac = NULL;
    redisAsyncFree(ac); /* no callback for a context that never connected */
    went_down(r, "connect timed out");
  }
}

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_presence_relay *r = w->data;
  r->stats.reconnects++;
  connect_now(r);
}

static void connect_now(mx_presence_relay *r) {
  redisAsyncContext *ac = redisAsyncConnect(r->host, r->port);
  if (!ac || ac->err) {
    MX_LOG_WARN("presence.connect_failed", "host=%s port=%d error=\"%s\"",
                r->host, r->port, ac ? ac->errstr : "out of memory");
    if (ac)
      redisAsyncFree(ac);
    r->ac = NULL;
    schedule_retry(r);
    return;
  }
  ac->data = r;
  r->ac = ac;
  redisLibevAttach(r->loop, ac);
  redisAsyncSetConnectCallback(ac, on_connect);
  redisAsyncSetDisconnectCallback(ac, on_disconnect);
  ev_timer_set(&r->connect_timeout, CONNECT_TIMEOUT, 0.);
  ev_timer_start(r->loop, &r->connect_timeout);
}

/* --- HTTP: presence_set_state ------------------------------------- */

int mx_presence_relay_escape(const char *s, size_t len, char *out,
                             size_t cap) {
  static const char hex[] = "0123456789ABCDEF";
  size_t n = 0;
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    bool keep = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' ||
                c == '~';
    if (n + (keep ? 1 : 3) >= cap)
      return MX_ERR_LIMIT;
    if (keep) {
      out[n++] = (char)c;
    } else {
      out[n++] = '%';
      out[n++] = hex[c >> 4];
      out[n++] = hex[c & 15];
    }
  }
  if (n >= cap)
    return MX_ERR_LIMIT;
  out[n] = '\0';
  return (int)n;
}

/* JSON string body of printable ASCII (ids are checked on open). */
static size_t json_str(char *out, const char *s, size_t len) {
  size_t n = 0;
  out[n++] = '"';
  for (size_t i = 0; i < len; i++) {
    if (s[i] == '"' || s[i] == '\\')
      out[n++] = '\\';
    out[n++] = s[i];
  }
  out[n++] = '"';
  return n;
}

static void call_unlink(mx_presence_relay *r, call *c) {
  if (c->prev)
    c->prev->next = c->next;
  else
    r->calls = c->next;
  if (c->next)
    c->next->prev = c->prev;
  r->ncalls--;
}

static void call_free(call *c) {
  free(c->user);
  free(c);
}

static int call_head(mx_upstream_req *req, int status, const mx_header *h,
                     size_t n, void *ud) {
  ((call *)ud)->status = status;
  return 0;
}

static ssize_t call_read(mx_upstream_req *req, char *buf, size_t max,
                         void *ud) {
  call *c = ud;
  size_t left = c->blen - c->sent;
  if (left > max)
    left = max;
  memcpy(buf, c->body + c->sent, left);
  c->sent += left;
  return (ssize_t)left;
}

static void call_done(mx_upstream_req *req, int err, const char *detail,
                      void *ud) {
  call *c = ud;
  mx_presence_relay *r = c->r;
  call_unlink(r, c);
  if (err || c->status != 200) {
    r->stats.call_errors++;
    /* Synapse answers 500 to a wrong secret: say so, never the secret. */
    MX_LOG_WARN("presence.set_state_failed", "user=%s status=%d error=\"%s\"%s",
                c->user, err ? 0 : c->status, err ? detail : "",
                !err && c->status == 500 ? " hint=\"check the replication "
                                           "secret\""
                                         : "");
    mx_presence_set_state_failed(r->logic, c->user, c->ulen, ev_now(r->loop));
  }
  call_free(c);
}

static const mx_upstream_ops call_ops = {
    .on_head = call_head, .on_done = call_done, .read_body = call_read};

static void set_state(mx_presence_relay *r, const mx_presence_action *a) {
  double now = ev_now(r->loop);
  if (r->ncalls >= MX_PRESENCE_RELAY_MAX_CALLS) {
    mx_presence_set_state_failed(r->logic, a->user, a->ulen, now);
    return;
  }
  call *c = calloc(1, sizeof(*c));
  if (!c || !(c->user = strndup(a->user, a->ulen))) {
    free(c);
    mx_presence_set_state_failed(r->logic, a->user, a->ulen, now);
    return;
  }
  c->r = r;
  c->ulen = a->ulen;
  char *b = c->body;
  size_t n = 0;
  memcpy(b + n, "{\"device_id\":", 13);
  n += 13;
  n += json_str(b + n, a->device, a->dlen);
  n += (size_t)sprintf(b + n, ",\"state\":{\"presence\":\"%s\"},"
                              "\"force_notify\":false,\"is_sync\":true}",
                       a->state == MX_PRESENCE_ONLINE ? "online"
                                                      : "unavailable");
  c->blen = n;
  char path[sizeof(SET_STATE_PATH) + 3 * MX_PRESENCE_MAX_ID + 1];
  memcpy(path, SET_STATE_PATH, sizeof(SET_STATE_PATH) - 1);
  mx_presence_relay_escape(a->user, a->ulen, path + sizeof(SET_STATE_PATH) - 1,
                           sizeof(path) - sizeof(SET_STATE_PATH) + 1);
  char auth[8 + MX_PRESENCE_RELAY_MAX_SECRET];
  mx_header hs[3];
  size_t nh = 0;
  hs[nh++] = (mx_header)MX_HEADER_LIT("content-type", "application/json");
  hs[nh++] = (mx_header)MX_HEADER_LIT("accept", "application/json");
  if (r->secret) {
    int al = snprintf(auth, sizeof(auth), "Bearer %s", r->secret);
    hs[nh++] = (mx_header){"authorization", 13, auth, (size_t)al};
  }
  mx_upstream_reqinfo info = {
      .method = "POST",
      .path = path,
      .headers = hs,
      .nheaders = nh,
      .has_body = true,
      .content_length = (int64_t)c->blen,
      .timeout_ms = CALL_TIMEOUT_MS,
      .buffer_body_max = 4096,
  };
  int rv = mx_upstream_start(r->http, &info, &call_ops, c, &c->req);
  memset(auth, 0, sizeof(auth));
  if (rv) {
    call_free(c);
    mx_presence_set_state_failed(r->logic, a->user, a->ulen, now);
    return;
  }
  r->stats.calls++;
  c->next = r->calls;
  if (r->calls)
    r->calls->prev = c;
  r->calls = c;
  r->ncalls++;
}

/* --- the logic's actions ------------------------------------------ */

static void on_action(const mx_presence_action *a, void *ud) {
  mx_presence_relay *r = ud;
  switch (a->kind) {
  case MX_PRESENCE_START:
  case MX_PRESENCE_END:
  case MX_PRESENCE_CLEAR: {
    char line[MX_PRESENCE_MAX_LINE + 1];
    int n = mx_presence_format(r->logic, a, line, sizeof(line));
    if (n > 0)
      publish(r, line, (size_t)n,
              a->kind == MX_PRESENCE_CLEAR ? on_clear_reply : on_publish_reply);
    break;
  }
  case MX_PRESENCE_SET_STATE:
    set_state(r, a);
    break;
  case MX_PRESENCE_KEEPALIVE:
    if (r->hooks.keepalive)
      r->hooks.keepalive(a->user, a->ulen,
                         a->state == MX_PRESENCE_ONLINE ? "online"
                                                        : "unavailable",
                         r->hooks.ud);
    break;
  }
}

static void tick_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_presence_relay *r = w->data;
  double now = ev_now(loop);
  if (r->up && r->ac) {
    if (r->ping_sent && now - r->ping_sent > PING_TIMEOUT)
      reset_link(r, "ping timed out");
    else if (!r->ping_sent && now - r->last_ping >= PING_EVERY)
      send_ping(r);
  }
  mx_presence_tick(r->logic, now);
}

/* --- life cycle ---------------------------------------------------- */

static char *default_instance(void) {
  char host[256] = "";
  if (gethostname(host, sizeof(host) - 1) != 0)
    host[0] = '\0';
  char buf[MX_PRESENCE_MAX_INSTANCE + 1];
  snprintf(buf, sizeof(buf), "mxsse-%.40s-%ld", host[0] ? host : "node",
           (long)getpid());
  for (char *c = buf; *c; c++)
    if ((unsigned char)*c < 0x21 || (unsigned char)*c > 0x7e)
      *c = '_';
  return strdup(buf);
}

mx_presence_relay *mx_presence_relay_new(struct ev_loop *loop,
                                         const mx_presence_relay_opts *opts,
                                         const mx_presence_relay_hooks *hooks) {
  if (!opts->redis_url || !opts->channel) {
    MX_LOG_ERR("presence.failed", "error=\"redis URL and channel needed\"");
    return NULL;
  }
  mx_presence_relay *r = calloc(1, sizeof(*r));
  char *instance = NULL;
  if (!r)
    return NULL;
  r->loop = loop;
  if (hooks)
    r->hooks = *hooks;
  ev_init(&r->retry, retry_cb);
  r->retry.data = r;
  ev_init(&r->connect_timeout, connect_timeout_cb);
  r->connect_timeout.data = r;
  ev_init(&r->tick, tick_cb);
  r->tick.data = r;
  if (mx_redis_feed_parse_url(opts->redis_url, &r->host, &r->port, &r->user,
                              &r->password)) {
    MX_LOG_ERR("presence.failed", "error=\"bad redis URL\"");
    goto fail;
  }
  if (!(r->channel = strdup(opts->channel)))
    goto fail;
  r->set_state_mode = opts->replication_url != NULL;
  if (opts->secret) {
    size_t sl = strlen(opts->secret);
    if (sl == 0 || sl > MX_PRESENCE_RELAY_MAX_SECRET ||
        strspn(opts->secret, "!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLM"
                             "NOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~") !=
            sl) {
      MX_LOG_ERR("presence.failed", "error=\"bad replication secret\"");
      goto fail;
    }
    if (!(r->secret = strdup(opts->secret)))
      goto fail;
  }
  if (r->set_state_mode) {
    mx_upstream_opts uo = {.connect_timeout_ms = 5000, .max_connections = 8};
    char base[512];
    int bl = snprintf(base, sizeof(base), "%s", opts->replication_url);
    if (bl > 0 && (size_t)bl < sizeof(base) && base[bl - 1] == '/')
      base[bl - 1] = '\0'; /* paths are appended */
    if ((size_t)bl >= sizeof(base) ||
        !(r->http = mx_upstream_new(loop, base, &uo))) {
      MX_LOG_ERR("presence.failed", "error=\"bad replication URL\"");
      goto fail;
    }
  }
  if (!(instance = opts->instance ? strdup(opts->instance) : default_instance()))
    goto fail;
  mx_presence_opts po = {
      .instance = instance,
      .keepalive_sync = !r->set_state_mode,
      .end_delay_min = opts->end_delay_min,
      .end_delay_max = opts->end_delay_max,
      .announce_min = opts->announce_min,
      .announce_max = opts->announce_max,
      .resync_spread = opts->resync_spread,
      .set_state_interval = opts->set_state_interval,
      .seed = opts->seed ? opts->seed
                         : (uint64_t)(ev_time() * 1e6) ^
                               ((uint64_t)getpid() << 32),
  };
  if (mx_presence_new(&r->logic, &po, on_action, r)) {
    MX_LOG_ERR("presence.failed", "error=\"bad instance id or delays\"");
    goto fail;
  }
  free(instance);
  double tick = opts->tick > 0 ? opts->tick : 1.0;
  ev_timer_set(&r->tick, tick, tick);
  ev_timer_start(loop, &r->tick);
  ev_unref(loop); /* the tick alone must not keep the loop alive */
  MX_LOG_INFO("presence.start", "instance=%s mode=%s",
              mx_presence_instance(r->logic),
              r->set_state_mode ? "set_state" : "keepalive_sync");
  connect_now(r);
  return r;
fail:
  free(instance);
  mx_presence_relay_free(r);
  return NULL;
}

static void wipe(char *s) {
  if (s) {
    memset(s, 0, strlen(s));
    free(s);
  }
}

void mx_presence_relay_free(mx_presence_relay *r) {
  if (!r)
    return;
  r->freeing = true;
  if (ev_is_active(&r->tick)) {
    ev_ref(r->loop);
    ev_timer_stop(r->loop, &r->tick);
  }
  ev_timer_stop(r->loop, &r->retry);
  ev_timer_stop(r->loop, &r->connect_timeout);
  if (r->ac) {
    redisAsyncContext *ac = r->ac;
    r->ac = NULL;
    redisAsyncFree(ac); /* pending callbacks run with NULL replies */
  }
  if (r->http)
    mx_upstream_free(r->http); /* no callbacks */
  for (call *c = r->calls, *n; c; c = n) {
    n = c->next;
    call_free(c);
  }
  mx_presence_free(r->logic);
  free(r->host);
  free(r->user);
  wipe(r->password);
  wipe(r->secret);
  free(r->channel);
  free(r);
}

static void shutdown_timeout_cb(struct ev_loop *loop, ev_timer *w,
                                int revents) {
  *(bool *)w->data = true;
}

int mx_presence_relay_shutdown(mx_presence_relay *r, double timeout) {
  if (!r->up) {
    mx_presence_shutdown(r->logic);
    return MX_ERR_CLOSED;
  }
  bool acked = false, timed_out = false;
  r->shutdown_ack = &acked;
  mx_presence_shutdown(r->logic); /* publishes CLEAR_USER_SYNC */
  ev_timer t;
  ev_timer_init(&t, shutdown_timeout_cb, timeout, 0.);
  t.data = &timed_out;
  ev_timer_start(r->loop, &t);
  while (!acked && !timed_out && r->ac)
    ev_run(r->loop, EVRUN_ONCE);
  ev_timer_stop(r->loop, &t);
  r->shutdown_ack = NULL;
  if (acked)
    MX_LOG_INFO("presence.cleared", "instance=%s",
                mx_presence_instance(r->logic));
  return acked ? 0 : r->ac ? MX_ERR_TIMEOUT : MX_ERR_CLOSED;
}

int mx_presence_relay_open(mx_presence_relay *r, const char *user,
                           size_t ulen, const char *device, size_t dlen,
                           mx_presence_state state) {
  return mx_presence_open(r->logic, user, ulen, device, dlen, state,
                          ev_now(r->loop));
}

void mx_presence_relay_close(mx_presence_relay *r, const char *user,
                             size_t ulen, const char *device, size_t dlen,
                             mx_presence_state state) {
  mx_presence_close(r->logic, user, ulen, device, dlen, state,
                    ev_now(r->loop));
}

void mx_presence_relay_feed_line(mx_presence_relay *r, const char *line,
                                 size_t len) {
  mx_presence_feed_line(r->logic, line, len, ev_now(r->loop));
}

void mx_presence_relay_feed_up(mx_presence_relay *r) {
  /* A REPLICATE may have gone by while the feed was away. */
  mx_presence_resync(r->logic, ev_now(r->loop));
}

void mx_presence_relay_keepalive_failed(mx_presence_relay *r,
                                        const char *user, size_t ulen) {
  mx_presence_set_state_failed(r->logic, user, ulen, ev_now(r->loop));
}

bool mx_presence_relay_up(const mx_presence_relay *r) { return r->up; }

const char *mx_presence_relay_instance(const mx_presence_relay *r) {
  return mx_presence_instance(r->logic);
}

mx_presence_relay_stats mx_presence_relay_stats_get(const mx_presence_relay *r) {
  mx_presence_relay_stats s = r->stats;
  s.up = r->up;
  return s;
}

const mx_presence_stats *mx_presence_relay_logic_stats(const mx_presence_relay *r) {
  return mx_presence_stats_get(r->logic);
}

int mx_presence_relay_read_secret(const char *path, char **out) {
  FILE *f = fopen(path, "r");
  if (!f) {
    MX_LOG_ERR("presence.secret_unreadable", "file=\"%s\" error=\"%s\"", path,
               strerror(errno));
    return MX_ERR_INVALID;
  }
  char buf[MX_PRESENCE_RELAY_MAX_SECRET + 3];
  size_t n = fread(buf, 1, sizeof(buf) - 1, f);
  fclose(f);
  buf[n] = '\0';
  size_t len = strcspn(buf, "\r\n");
  bool ok = len > 0 && len <= MX_PRESENCE_RELAY_MAX_SECRET;
  for (size_t i = 0; ok && i < len; i++)
    ok = (unsigned char)buf[i] >= 0x21 && (unsigned char)buf[i] <= 0x7e;
  if (ok)
    *out = strndup(buf, len);
  memset(buf, 0, sizeof(buf));
  if (!ok) {
    MX_LOG_ERR("presence.secret_invalid",
               "file=\"%s\" error=\"want one line of printable ASCII, "
               "1-%d bytes\"",
               path, MX_PRESENCE_RELAY_MAX_SECRET);
    return MX_ERR_INVALID;
  }
  return *out ? 0 : MX_ERR_NOMEM;
}
