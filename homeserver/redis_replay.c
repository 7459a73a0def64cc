/*
 * The replay store in Redis: see redis_replay.h. One connection; every
 * call is one command (two for a put: the batch, then its marker) whose
 * reply answers the caller. Calls in flight are kept in send order (Redis
 * answers in order), so the oldest is the list's head: a periodic check
 * drops a link whose oldest command waited over op_timeout, since hiredis
 * 0.14 has no command timeout of its own.
 */
#include "homeserver/redis_replay.h"

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

#include "common/backoff.h"
#include "common/error.h"
#include "common/limits.h"
#include "common/list.h"
#include "common/log.h"
#include "common/metrics.h"
#include "homeserver/redis_feed.h"

#define CONNECT_TIMEOUT 5.0
#define BACKOFF_MIN 0.25
#define BACKOFF_MAX 10.0
#define DEFAULT_PREFIX "mxsse:replay:"
#define DEFAULT_OP_TIMEOUT 2.0
#define MAX_KEY (256 + FEED_KEY_MAX + MX_SYNC_MAX_POSITION)
#define FEED_KEY_MAX 128

typedef struct op {
  mx_redis_replay *r;
  mx_replay_done_fn done;
  void *ud;
  mx_batch *batch; /* put: the caller's batch (our reference) */
  double sent;
  bool answered;   /* done was called (the reply may still come) */
  mx_list_node node; /* in r->ops, in send order */
} op;

struct mx_redis_replay {
  struct ev_loop *loop;
  char *host, *user, *password, *prefix;
  int port;
  long long ttl_ms, marker_ms;
  size_t max_batch;
  double op_timeout;
  redisAsyncContext *ac;
  bool connected; /* TCP connected */
  bool up;        /* connected and authenticated */
  bool freeing;
  int failures;
  mx_list ops;
  ev_timer retry, connect_timeout, watchdog;
  mx_replay_stats stats;
};

static void connect_now(mx_redis_replay *r);

/* --- answers ---------------------------------------------------------- */

static void answer(op *o, int rv, mx_batch *b) {
  if (o->answered)
    return;
  o->answered = true;
  if (rv == MX_ERR_UNAVAILABLE)
    mx_stats.replay_store_unavailable++;
  o->done(o->ud, rv, b);
}

static void op_free(op *o) {
  mx_list_remove(&o->node);
  mx_batch_unref(o->batch);
  free(o);
}

static op *op_new(mx_redis_replay *r, mx_replay_done_fn done, void *ud,
                  mx_batch *batch) {
  op *o = calloc(1, sizeof(*o));
  if (!o)
    return NULL;
  o->r = r;
  o->done = done;
  o->ud = ud;
  o->batch = batch ? mx_batch_ref(batch) : NULL;
  o->sent = ev_time(); /* not ev_now: a long callback must not count */
  mx_list_push_back(&r->ops, &o->node);
  return o;
}

/* "next_batch LF body" -> a new batch (NULL when malformed). */
static mx_batch *decode(const char *v, size_t len) {
  const char *lf = memchr(v, '\n', len);
  if (!lf || lf == v || (size_t)(lf - v) >= MX_SYNC_MAX_POSITION)
    return NULL;
  size_t nlen = (size_t)(lf - v);
  return mx_batch_new(v, nlen, lf + 1, len - nlen - 1);
}

/* --- the link ----------------------------------------------------------- */

static void schedule_retry(mx_redis_replay *r) {
  if (r->freeing)
    return;
  double delay = mx_backoff_delay(BACKOFF_MIN, BACKOFF_MAX, r->failures);
  r->failures++;
  ev_timer_stop(r->loop, &r->retry);
  ev_timer_set(&r->retry, delay, 0.);
  ev_timer_start(r->loop, &r->retry);
}

/* The link is gone (hiredis frees the context): every call still waiting
 * was answered UNAVAILABLE by its reply callback (reply NULL). */
static void went_down(mx_redis_replay *r, const char *why) {
  bool was_up = r->up;
  r->ac = NULL;
  r->connected = r->up = false;
  mx_stats.replay_store_up = 0;
  ev_timer_stop(r->loop, &r->connect_timeout);
  /* Normally empty by now; a context that never connected calls no
   * reply callback. */
  MX_LIST_FOREACH_SAFE(n, nx, &r->ops) {
    op *o = MX_CONTAINER_OF(n, op, node);
    answer(o, MX_ERR_UNAVAILABLE, NULL);
    op_free(o);
  }
  if (r->freeing)
    return;
  if (was_up || r->failures == 0)
    MX_LOG_WARN("replay.store_down", "host=%s port=%d reason=\"%s\"",
                r->host, r->port, why);
  schedule_retry(r);
}

static void mark_up(mx_redis_replay *r) {
  r->up = true;
  r->failures = 0;
  mx_stats.replay_store_up = 1;
  MX_LOG_INFO("replay.store_up", "host=%s port=%d", r->host, r->port);
}

static void on_auth_reply(redisAsyncContext *ac, void *rp, void *priv) {
  mx_redis_replay *r = priv;
  redisReply *reply = rp;
  if (!reply || r->freeing)
    return;
  if (reply->type == REDIS_REPLY_ERROR) {
    /* Never log the password; the error text does not contain it. */
    MX_LOG_ERR("replay.store_auth_failed", "error=\"%.*s\"",
               (int)reply->len, reply->str);
    redisAsyncDisconnect(ac);
    return;
  }
  mark_up(r);
}

static void on_connect(const redisAsyncContext *cac, int status) {
  mx_redis_replay *r = cac->data;
  redisAsyncContext *ac = (redisAsyncContext *)cac;
  ev_timer_stop(r->loop, &r->connect_timeout);
  if (status != REDIS_OK) {
    went_down(r, cac->errstr[0] ? cac->errstr : "connect failed");
    return;
  }
  r->connected = true;
  mx_redis_tune_socket(ac->c.fd, 10000);
  if (!r->password) {
    mark_up(r);
    return;
  }
  if (r->user)
    redisAsyncCommand(ac, on_auth_reply, r, "AUTH %s %s", r->user,
                      r->password);
  else
    redisAsyncCommand(ac, on_auth_reply, r, "AUTH %s", r->password);
}

static void on_disconnect(const redisAsyncContext *ac, int status) {
  mx_redis_replay *r = ac->data;
  went_down(r, ac->errstr[0] ? ac->errstr : "connection closed");
}

static void connect_timeout_cb(struct ev_loop *loop, ev_timer *w, int rev) {
  mx_redis_replay *r = w->data;
  if (r->ac && !r->connected) {
    redisAsyncContext *ac = r->ac;
    r->ac = NULL;
    redisAsyncFree(ac);
    went_down(r, "connect timed out");
  }
}

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  connect_now(w->data);
}

/* A command without a reply for op_timeout: the link is dead or Redis is
 * stuck. Dropping it answers everything waiting, and reconnects. */
static void watchdog_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_redis_replay *r = w->data;
  mx_list_node *n = mx_list_first(&r->ops);
  if (!n || !r->ac)
    return;
  op *o = MX_CONTAINER_OF(n, op, node);
  double waited = ev_time() - o->sent;
  if (waited < r->op_timeout)
    return;
  MX_LOG_WARN("replay.store_timeout", "host=%s port=%d waited=%.1f",
              r->host, r->port, waited);
  /* Not redisAsyncDisconnect, which waits for the replies: replies
   * NULL, then on_disconnect. */
  redisAsyncFree(r->ac);
}

static void connect_now(mx_redis_replay *r) {
  redisAsyncContext *ac = redisAsyncConnect(r->host, r->port);
  if (!ac || ac->err) {
    MX_LOG_WARN("replay.store_connect_failed",
                "host=%s port=%d error=\"%s\"", r->host, r->port,
                ac ? ac->errstr : "out of memory");
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

/* --- keys ----------------------------------------------------------------- */

/* PREFIX kind ':' feed ':' since into buf; returns the length or 0. */
static size_t make_key(const mx_redis_replay *r, char kind, const char *key,
                       size_t klen, const char *since, size_t slen,
                       char *buf, size_t cap) {
  int n = snprintf(buf, cap, "%s%c:%.*s:%.*s", r->prefix, kind, (int)klen,
                   key, (int)slen, since);
  return n > 0 && (size_t)n < cap ? (size_t)n : 0;
}

/* --- the store operations ------------------------------------------------ */

static void get_reply(redisAsyncContext *ac, void *rp, void *priv) {
  op *o = priv;
  mx_redis_replay *r = o->r;
  redisReply *reply = rp;
  if (!reply || reply->type != REDIS_REPLY_ARRAY || reply->elements != 2) {
    if (reply)
      MX_LOG_WARN("replay.store_error", "op=get error=\"%.*s\"",
                  reply->type == REDIS_REPLY_ERROR ? (int)reply->len : 0,
                  reply->type == REDIS_REPLY_ERROR ? reply->str : "");
    answer(o, MX_ERR_UNAVAILABLE, NULL);
    op_free(o);
    return;
  }
  redisReply *b = reply->element[0], *m = reply->element[1];
  if (b->type == REDIS_REPLY_STRING) {
    mx_batch *batch = decode(b->str, b->len);
    if (batch) {
      r->stats.hits++;
      answer(o, 0, batch);
      mx_batch_unref(batch);
    } else {
      MX_LOG_WARN("replay.store_bad_entry", "len=%zu", (size_t)b->len);
      r->stats.misses++;
      answer(o, MX_ERR_NOTFOUND, NULL);
    }
  } else {
    r->stats.misses++;
    /* The marker outlives the batch: a batch was stored here and is
     * gone, so whatever it carried may be acknowledged upstream. */
    answer(o, m->type == REDIS_REPLY_STRING ? MX_ERR_CLOSED : MX_ERR_NOTFOUND,
           NULL);
  }
  op_free(o);
}

static void rr_get(void *store, const char *key, size_t klen,
                   const char *since, size_t slen, double now,
                   mx_replay_done_fn done, void *ud) {
  mx_redis_replay *r = store;
  char bk[MAX_KEY], mk[MAX_KEY];
  size_t bl = make_key(r, 'b', key, klen, since, slen, bk, sizeof(bk));
  size_t ml = make_key(r, 'm', key, klen, since, slen, mk, sizeof(mk));
  if (!bl || !ml) {
    done(ud, MX_ERR_NOTFOUND, NULL);
    return;
  }
  op *o = r->up ? op_new(r, done, ud, NULL) : NULL;
  if (!o) {
    mx_stats.replay_store_unavailable++;
    done(ud, MX_ERR_UNAVAILABLE, NULL);
    return;
  }
  if (redisAsyncCommand(r->ac, get_reply, o, "MGET %b %b", bk, bl, mk, ml) !=
      REDIS_OK) {
    answer(o, MX_ERR_UNAVAILABLE, NULL);
    op_free(o);
  }
}

static void put_reply(redisAsyncContext *ac, void *rp, void *priv) {
  op *o = priv;
  mx_redis_replay *r = o->r;
  redisReply *reply = rp;
  if (reply && reply->type == REDIS_REPLY_NIL) {
    r->stats.entries++; /* puts that stored (Redis expires them) */
    answer(o, 0, o->batch);
  } else if (reply && reply->type == REDIS_REPLY_STRING) {
    mx_batch *winner = decode(reply->str, reply->len);
    if (winner) {
      answer(o, 0, winner);
      mx_batch_unref(winner);
    } else {
      MX_LOG_WARN("replay.store_bad_entry", "len=%zu", (size_t)reply->len);
      answer(o, MX_ERR_UNAVAILABLE, NULL);
    }
  } else {
    /* An error (OOM under maxmemory noeviction, ACL...) proves nothing
     * was stored: the caller must not go past this batch. */
    if (reply && reply->type == REDIS_REPLY_ERROR)
      MX_LOG_WARN("replay.store_error", "op=put error=\"%.*s\"",
                  (int)reply->len, reply->str);
    answer(o, MX_ERR_UNAVAILABLE, NULL);
  }
  op_free(o);
}

static void ignore_reply(redisAsyncContext *ac, void *rp, void *priv) {
  redisReply *reply = rp;
  if (reply && reply->type == REDIS_REPLY_ERROR)
    MX_LOG_WARN("replay.store_error", "op=mark error=\"%.*s\"",
                (int)reply->len, reply->str);
}

static void rr_put(void *store, const char *key, size_t klen,
                   const char *since, size_t slen, mx_batch *batch,
                   double now, mx_replay_done_fn done, void *ud) {
  mx_redis_replay *r = store;
  size_t vlen = batch->nlen + 1 + batch->len;
  if (vlen > r->max_batch) {
    done(ud, MX_ERR_LIMIT, NULL);
    return;
  }
  char bk[MAX_KEY], mk[MAX_KEY];
  size_t bl = make_key(r, 'b', key, klen, since, slen, bk, sizeof(bk));
  size_t ml = make_key(r, 'm', key, klen, since, slen, mk, sizeof(mk));
  if (!bl || !ml) {
    done(ud, MX_ERR_LIMIT, NULL);
    return;
  }
  char *value = r->up ? malloc(vlen) : NULL;
  op *o = value ? op_new(r, done, ud, batch) : NULL;
  if (!o) {
    free(value);
    mx_stats.replay_store_unavailable++;
    done(ud, r->up ? MX_ERR_NOMEM : MX_ERR_UNAVAILABLE, NULL);
    return;
  }
  memcpy(value, batch->next_batch, batch->nlen);
  value[batch->nlen] = '\n';
  memcpy(value + batch->nlen + 1, batch->body, batch->len);
  char ttl[24], mttl[24];
  snprintf(ttl, sizeof(ttl), "%lld", r->ttl_ms);
  snprintf(mttl, sizeof(mttl), "%lld", r->marker_ms);
  int rv = redisAsyncCommand(r->ac, put_reply, o, "SET %b %b NX GET PX %s",
                             bk, bl, value, vlen, ttl);
  free(value);
  if (rv != REDIS_OK) {
    answer(o, MX_ERR_UNAVAILABLE, NULL);
    op_free(o);
    return;
  }
  /* After the batch on the same link: a marker never exists without its
   * batch having been written first. */
  redisAsyncCommand(r->ac, ignore_reply, NULL, "SET %b 1 PX %s", mk, ml,
                    mttl);
}

static size_t rr_expire(void *store, double now) { return 0; }

static void rr_stats(void *store, mx_replay_stats *out) {
  *out = ((mx_redis_replay *)store)->stats;
}

static void rr_free(void *store) {
  mx_redis_replay *r = store;
  if (!r)
    return;
  r->freeing = true;
  if (r->loop) {
    ev_timer_stop(r->loop, &r->retry);
    ev_timer_stop(r->loop, &r->connect_timeout);
    if (ev_is_active(&r->watchdog)) {
      ev_ref(r->loop);
      ev_timer_stop(r->loop, &r->watchdog);
    }
  }
  if (r->ac) {
    /* Reply callbacks run with NULL (answering UNAVAILABLE), then
     * on_disconnect; hiredis frees the context. */
    redisAsyncContext *ac = r->ac;
    redisAsyncFree(ac);
  }
  MX_LIST_FOREACH_SAFE(n, nx, &r->ops) {
    op *o = MX_CONTAINER_OF(n, op, node);
    answer(o, MX_ERR_UNAVAILABLE, NULL);
    op_free(o);
  }
  mx_stats.replay_store_up = 0;
  free(r->host);
  free(r->user);
  if (r->password) {
    memset(r->password, 0, strlen(r->password));
    free(r->password);
  }
  free(r->prefix);
  free(r);
}

const mx_replay_store_ops mx_redis_replay_ops = {
    .get = rr_get,
    .put_if_absent = rr_put,
    .expire = rr_expire,
    .stats = rr_stats,
    .free = rr_free,
};

mx_redis_replay *mx_redis_replay_new(struct ev_loop *loop,
                                     const mx_redis_replay_opts *opts) {
  mx_redis_replay *r = calloc(1, sizeof(*r));
  if (!r)
    return NULL;
  mx_list_init(&r->ops);
  if (mx_redis_feed_parse_url(opts->url, &r->host, &r->port, &r->user,
                              &r->password) ||
      !(r->prefix = strdup(opts->prefix ? opts->prefix : DEFAULT_PREFIX)) ||
      strlen(r->prefix) > 200) {
    rr_free(r);
    return NULL;
  }
  r->loop = loop;
  double age = opts->max_age > 0 ? opts->max_age : 600;
  double mage = opts->marker_age > age ? opts->marker_age : 8 * age;
  r->ttl_ms = (long long)(age * 1000);
  r->marker_ms = (long long)(mage * 1000);
  r->max_batch = opts->max_batch ? opts->max_batch : 8u << 20;
  r->op_timeout = opts->op_timeout > 0 ? opts->op_timeout : DEFAULT_OP_TIMEOUT;
  ev_init(&r->retry, retry_cb);
  r->retry.data = r;
  ev_init(&r->connect_timeout, connect_timeout_cb);
  r->connect_timeout.data = r;
  double tick = r->op_timeout / 4;
  ev_timer_init(&r->watchdog, watchdog_cb, tick, tick);
  r->watchdog.data = r;
  ev_timer_start(loop, &r->watchdog);
  ev_unref(loop); /* the watchdog alone must not keep the loop alive */
  connect_now(r);
  return r;
}

bool mx_redis_replay_is_up(const mx_redis_replay *r) { return r->up; }
