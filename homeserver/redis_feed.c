#include "homeserver/redis_feed.h"

#include <errno.h>
#include <ev.h>
#include <hiredis/adapters/libev.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "common/backoff.h"
#include "common/error.h"
#include "common/log.h"
#include "common/metrics.h"

#define CONNECT_TIMEOUT 5.0  /* hiredis 0.14 has none of its own */
#define BACKOFF_MIN 0.25
#define BACKOFF_MAX 15.0

struct mx_redis_feed {
  struct ev_loop *loop;
  char *host, *user, *password, *channel;
  int port;
  const mx_redis_feed_ops *ops;
  void *ud;
  redisAsyncContext *ac;
  bool connected;  /* TCP connected */
  bool subscribed;
  bool freeing;
  int failures;    /* consecutive, for backoff */
  ev_timer retry;
  ev_timer connect_timeout;
};

static void connect_now(mx_redis_feed *f);

int mx_redis_feed_parse_url(const char *url, char **host, int *port,
                            char **user, char **password) {
  *host = *user = *password = NULL;
  *port = 6379;
  if (strncmp(url, "redis://", 8) != 0)
    return MX_ERR_INVALID;
  const char *p = url + 8;
  const char *end = p + strcspn(p, "/?#");
  const char *at = memchr(p, '@', (size_t)(end - p));
  if (at) {
    const char *colon = memchr(p, ':', (size_t)(at - p));
    if (colon) {
      if (colon > p)
        *user = strndup(p, (size_t)(colon - p));
      *password = strndup(colon + 1, (size_t)(at - colon - 1));
    } else {
      *password = strndup(p, (size_t)(at - p));
    }
    p = at + 1;
  }
  const char *colon = memchr(p, ':', (size_t)(end - p));
  const char *hend = colon ? colon : end;
  if (hend == p)
    goto bad;
  *host = strndup(p, (size_t)(hend - p));
  if (colon) {
    char *e;
    long v = strtol(colon + 1, &e, 10);
    if (e != end || v <= 0 || v > 65535)
      goto bad;
    *port = (int)v;
  }
  return 0;
bad:
  free(*host);
  free(*user);
  free(*password);
  *host = *user = *password = NULL;
  return MX_ERR_INVALID;
}

static void schedule_retry(mx_redis_feed *f) {
  if (f->freeing)
    return;
  double delay = mx_backoff_delay(BACKOFF_MIN, BACKOFF_MAX, f->failures);
  f->failures++;
  ev_timer_stop(f->loop, &f->retry);
  ev_timer_set(&f->retry, delay, 0.);
  ev_timer_start(f->loop, &f->retry);
}

static void went_down(mx_redis_feed *f, const char *why) {
  bool was_up = f->subscribed;
  f->ac = NULL;
  f->connected = f->subscribed = false;
  mx_stats.repl_connected = 0;
  ev_timer_stop(f->loop, &f->connect_timeout);
  if (f->freeing)
    return;
  MX_LOG_WARN("replication.down", "host=%s port=%d reason=\"%s\"", f->host,
              f->port, why);
  if (was_up || f->failures == 0)
    f->ops->on_down(f->ud);
  schedule_retry(f);
}

static void on_subscribe_reply(redisAsyncContext *ac, void *r, void *priv) {
  mx_redis_feed *f = priv;
  redisReply *reply = r;
  if (!reply || f->freeing)
    return; /* link dropped: the disconnect callback handles it */
  if (reply->type == REDIS_REPLY_ERROR) {
    MX_LOG_ERR("replication.subscribe_failed", "error=\"%.*s\"",
               (int)reply->len, reply->str);
    redisAsyncDisconnect(ac);
    return;
  }
  if (reply->type != REDIS_REPLY_ARRAY || reply->elements < 3)
    return;
  redisReply *kind = reply->element[0];
  if (kind->type != REDIS_REPLY_STRING)
    return;
  if (!strcmp(kind->str, "subscribe")) {
    f->subscribed = true;
    f->failures = 0;
    mx_stats.repl_connected = 1;
    MX_LOG_INFO("replication.up", "host=%s port=%d channel=%s", f->host,
                f->port, f->channel);
    f->ops->on_up(f->ud);
  } else if (!strcmp(kind->str, "message")) {
    redisReply *payload = reply->element[2];
    if (payload->type == REDIS_REPLY_STRING) {
      mx_stats.repl_last_line = ev_now(f->loop);
      f->ops->on_message(payload->str, payload->len, f->ud);
    }
  }
}

static void on_auth_reply(redisAsyncContext *ac, void *r, void *priv) {
  mx_redis_feed *f = priv;
  redisReply *reply = r;
  if (reply && reply->type == REDIS_REPLY_ERROR && !f->freeing) {
    /* Never log the password; the error text does not contain it. */
    MX_LOG_ERR("replication.auth_failed", "error=\"%.*s\"", (int)reply->len,
               reply->str);
    redisAsyncDisconnect(ac);
  }
}

void mx_redis_tune_socket(int fd, unsigned user_timeout_ms) {
  int one = 1, idle = 10, intvl = 5, cnt = 3;
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
  /* Unacknowledged writes (our few commands) also end a dead link. */
  setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms,
             sizeof(user_timeout_ms));
}

static void on_connect(const redisAsyncContext *cac, int status) {
  mx_redis_feed *f = cac->data;
  redisAsyncContext *ac = (redisAsyncContext *)cac;
  ev_timer_stop(f->loop, &f->connect_timeout);
  if (status != REDIS_OK) {
    /* hiredis frees the context after this callback. */
    went_down(f, cac->errstr[0] ? cac->errstr : "connect failed");
    return;
  }
  f->connected = true;
  mx_redis_tune_socket(ac->c.fd, 30000);
  if (f->password) {
    if (f->user)
      redisAsyncCommand(ac, on_auth_reply, f, "AUTH %s %s", f->user,
                        f->password);
    else
      redisAsyncCommand(ac, on_auth_reply, f, "AUTH %s", f->password);
  }
  redisAsyncCommand(ac, on_subscribe_reply, f, "SUBSCRIBE %b", f->channel,
                    strlen(f->channel));
}

static void on_disconnect(const redisAsyncContext *ac, int status) {
  mx_redis_feed *f = ac->data;
  went_down(f, ac->errstr[0] ? ac->errstr : "connection closed");
}

static void connect_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_redis_feed *f = w->data;
  if (f->ac && !f->connected) {
    /* hiredis calls no callback when freeing a context that never
     * connected: report the failure ourselves. */
    redisAsyncContext *ac = f->ac;
    f->ac = NULL;
    redisAsyncFree(ac);
    went_down(f, "connect timed out");
  }
}

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_redis_feed *f = w->data;
  mx_stats.repl_reconnects++;
  connect_now(f);
}

static void connect_now(mx_redis_feed *f) {
  redisAsyncContext *ac = redisAsyncConnect(f->host, f->port);
  if (!ac || ac->err) {
    MX_LOG_WARN("replication.connect_failed", "host=%s port=%d error=\"%s\"",
                f->host, f->port, ac ? ac->errstr : "out of memory");
    if (ac)
      redisAsyncFree(ac);
    f->ac = NULL;
    schedule_retry(f);
    return;
  }
  ac->data = f;
  f->ac = ac;
  redisLibevAttach(f->loop, ac);
  redisAsyncSetConnectCallback(ac, on_connect);
  redisAsyncSetDisconnectCallback(ac, on_disconnect);
  ev_timer_set(&f->connect_timeout, CONNECT_TIMEOUT, 0.);
  ev_timer_start(f->loop, &f->connect_timeout);
}

mx_redis_feed *mx_redis_feed_new(struct ev_loop *loop, const char *url,
                                 const char *channel,
                                 const mx_redis_feed_ops *ops, void *ud) {
  mx_redis_feed *f = calloc(1, sizeof(*f));
  if (!f)
    return NULL;
  if (mx_redis_feed_parse_url(url, &f->host, &f->port, &f->user,
                              &f->password) ||
      !(f->channel = strdup(channel))) {
    mx_redis_feed_free(f);
    return NULL;
  }
  f->loop = loop;
  f->ops = ops;
  f->ud = ud;
  ev_init(&f->retry, retry_cb);
  f->retry.data = f;
  ev_init(&f->connect_timeout, connect_timeout_cb);
  f->connect_timeout.data = f;
  connect_now(f);
  return f;
}

void mx_redis_feed_free(mx_redis_feed *f) {
  if (!f)
    return;
  f->freeing = true;
  if (f->loop) {
    ev_timer_stop(f->loop, &f->retry);
    ev_timer_stop(f->loop, &f->connect_timeout);
  }
  if (f->ac) {
    /* Calls on_disconnect (ignored while freeing); hiredis frees ac. */
    redisAsyncContext *ac = f->ac;
    f->ac = NULL;
    redisAsyncFree(ac);
  }
  free(f->host);
  free(f->user);
  if (f->password) {
    memset(f->password, 0, strlen(f->password));
    free(f->password);
  }
  free(f->channel);
  free(f);
}

bool mx_redis_feed_is_up(const mx_redis_feed *f) { return f->subscribed; }
