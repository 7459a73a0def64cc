#include "sync/hub.h"

#include <assert.h>
#include <ev.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/error.h"
#include "common/http.h"
#include "common/log.h"
#include "common/metrics.h"
#include "common/strmap.h"
#include "sync/json_scan.h"
#include "sync/replay.h"
#include "sync/sse_event.h"

#define FEED_KEY_LEN 64 /* hex SHA-256 */
#define MAX_POSITION 4096
#define MIN_LONGPOLL_SECONDS 1.0

typedef enum { FETCH_IMMEDIATE, FETCH_LONGPOLL } fetch_kind;

typedef struct fetch fetch;

struct mx_sync_stream {
  mx_sync_hub *hub;
  const mx_sync_stream_ops *ops;
  void *ud;
  char feed[FEED_KEY_LEN + 1];
  char *token, *query, *peer_ip, *user_agent;
  mx_buf position; /* empty: no position yet (initial sync) */
  bool full_state; /* still to be applied to the first batch */
  bool started;    /* on_start(200) was called */
  bool delivered;  /* an event is out, waiting for taken() */
  bool closed;     /* closed by the owner; freed from the loop */
  fetch *fetch;    /* the fetch this stream waits on */
  mx_sync_stream *fprev, *fnext; /* in fetch->waiters */
  mx_sync_stream *prev, *next;   /* in hub->streams */
  mx_sync_stream *next_dead;
  mx_sync_stream *next_out; /* in a list taken off a fetch for answers */
  bool kicked;     /* queued in hub->kicks */
  mx_sync_stream *next_kick;
};

struct fetch {
  mx_sync_hub *hub;
  char *key; /* map key: feed|kind|full_state|since */
  size_t klen;
  char feed[FEED_KEY_LEN + 1];
  char *since; /* NULL: initial */
  fetch_kind kind;
  bool full_state;
  /* request strings, copied from the stream that created the fetch */
  char *token, *query, *peer_ip, *user_agent;
  void *handle; /* in flight */
  mx_sync_stream *waiters;
  size_t nwaiters;
  int attempts;
  double started; /* when the request in flight was sent */
  ev_timer retry;
};

struct mx_sync_hub {
  struct ev_loop *loop;
  mx_sync_hub_opts opts;
  mx_sync_fetcher fetcher;
  mx_replay *replay;
  mx_strmap fetches;
  size_t nfetches;
  mx_sync_stream *streams;
  size_t nstreams;
  mx_sync_stream *dead;  /* closed, to free */
  mx_sync_stream *kicks, *kicks_tail; /* to advance from the loop */
  ev_prepare runner;     /* runs kicks and frees dead streams */
  ev_timer expire;       /* replay buffer expiry */
};

static void stream_advance(mx_sync_stream *st);
static void fetch_start(fetch *f);

/* --- small helpers -------------------------------------------------- */

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

static void feed_key(const char *token, const char *query, char out[65]) {
  unsigned char md[32];
  unsigned int mdlen = 0;
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  if (ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) &&
      EVP_DigestUpdate(ctx, token, strlen(token) + 1) &&
      EVP_DigestUpdate(ctx, query, strlen(query)) &&
      EVP_DigestFinal_ex(ctx, md, &mdlen) && mdlen == 32) {
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
      out[2 * i] = hex[md[i] >> 4];
      out[2 * i + 1] = hex[md[i] & 15];
    }
    out[64] = '\0';
  } else {
    /* Without a digest, fall back to no sharing: a unique key. */
    snprintf(out, 65, "%p", (void *)out);
  }
  EVP_MD_CTX_free(ctx);
}

static void kick(mx_sync_stream *st) {
  if (st->kicked || st->closed)
    return;
  st->kicked = true;
  st->next_kick = NULL;
  mx_sync_hub *hub = st->hub;
  if (hub->kicks_tail)
    hub->kicks_tail->next_kick = st;
  else
    hub->kicks = st;
  hub->kicks_tail = st;
  ev_prepare_start(hub->loop, &hub->runner);
}

/* --- fetches -------------------------------------------------------- */

static void waiter_remove(fetch *f, mx_sync_stream *st) {
  if (st->fprev)
    st->fprev->fnext = st->fnext;
  else
    f->waiters = st->fnext;
  if (st->fnext)
    st->fnext->fprev = st->fprev;
  st->fprev = st->fnext = NULL;
  st->fetch = NULL;
  f->nwaiters--;
}

static void fetch_free(fetch *f) {
  mx_sync_hub *hub = f->hub;
  assert(f->nwaiters == 0);
  if (f->handle)
    hub->fetcher.cancel(hub->fetcher.impl, f->handle);
  ev_timer_stop(hub->loop, &f->retry);
  mx_strmap_del(&hub->fetches, f->key, f->klen);
  hub->nfetches--;
  free(f->key);
  free(f->since);
  free(f->token);
  free(f->query);
  free(f->peer_ip);
  free(f->user_agent);
  free(f);
}

static void fetch_detach(mx_sync_stream *st) {
  fetch *f = st->fetch;
  if (!f)
    return;
  waiter_remove(f, st);
  /* Nobody waits any more: stop holding the homeserver's long-poll (and
   * stop syncing, for presence, on the client's behalf). */
  if (f->nwaiters == 0)
    fetch_free(f);
}

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  fetch *f = w->data;
  if (f->attempts) /* else a paced long-poll, counted when decided */
    mx_stats.sync_requests[MX_SYNC_REASON_RETRY]++;
  fetch_start(f);
}

static void fetch_done(void *ud, const mx_sync_response *resp);

static void fetch_start(fetch *f) {
  mx_sync_hub *hub = f->hub;
  mx_sync_request req = {
      .token = f->token,
      .query = f->query,
      .since = f->since,
      .timeout_ms = f->kind == FETCH_LONGPOLL ? hub->opts.longpoll_timeout_ms
                                              : 0,
      .full_state = f->full_state,
      .peer_ip = f->peer_ip,
      .user_agent = f->user_agent,
  };
  f->started = ev_now(hub->loop);
  f->handle = hub->fetcher.start(hub->fetcher.impl, &req, fetch_done, f);
  if (!f->handle) {
    /* Out of memory: try again later rather than fail the streams. */
    f->attempts++;
    ev_timer_set(&f->retry, hub->opts.backoff_max, 0.);
    ev_timer_start(hub->loop, &f->retry);
  }
}

/* Finds or creates the fetch a stream needs and adds the stream to it. */
static int fetch_attach(mx_sync_stream *st, fetch_kind kind) {
  mx_sync_hub *hub = st->hub;
  bool fs = kind == FETCH_IMMEDIATE && st->full_state;
  const char *since = st->position.len ? st->position.data : NULL;
  mx_buf key;
  mx_buf_init(&key, FEED_KEY_LEN + MAX_POSITION + 16);
  int rv = mx_buf_appendf(&key, "%s|%c%c|%s", st->feed,
                          kind == FETCH_LONGPOLL ? 'L' : 'I', fs ? 'f' : '-',
                          since ? since : "");
  if (rv) {
    mx_buf_free(&key);
    return rv;
  }
  fetch *f = mx_strmap_get(&hub->fetches, key.data, key.len);
  if (!f) {
    f = calloc(1, sizeof(*f));
    if (!f) {
      mx_buf_free(&key);
      return MX_ERR_NOMEM;
    }
    f->hub = hub;
    f->kind = kind;
    f->full_state = fs;
    memcpy(f->feed, st->feed, sizeof(f->feed));
    f->since = dup_or_null(since);
    f->token = strdup(st->token);
    f->query = strdup(st->query);
    f->peer_ip = dup_or_null(st->peer_ip);
    f->user_agent = dup_or_null(st->user_agent);
    f->klen = key.len;
    f->key = mx_buf_steal(&key, NULL);
    ev_init(&f->retry, retry_cb);
    f->retry.data = f;
    if (!f->token || !f->query || (since && !f->since) || !f->key ||
        mx_strmap_put(&hub->fetches, f->key, f->klen, f, NULL)) {
      free(f->key);
      free(f->since);
      free(f->token);
      free(f->query);
      free(f->peer_ip);
      free(f->user_agent);
      free(f);
      return MX_ERR_NOMEM;
    }
    hub->nfetches++;
    mx_stats.sync_requests[kind == FETCH_LONGPOLL
                               ? MX_SYNC_REASON_LONGPOLL
                               : MX_SYNC_REASON_INITIAL]++;
    fetch_start(f);
  }
  mx_buf_free(&key);
  st->fetch = f;
  st->fnext = f->waiters;
  st->fprev = NULL;
  if (f->waiters)
    f->waiters->fprev = st;
  f->waiters = st;
  f->nwaiters++;
  if (fs)
    st->full_state = false;
  return 0;
}

/* Takes the waiters (all, or only those not started yet) off a fetch,
 * for answering after the fetch is settled: answer callbacks may close
 * streams, which may free the fetch. */
static mx_sync_stream *take_waiters(fetch *f, bool only_unstarted) {
  mx_sync_stream *list = NULL, **tail = &list;
  for (mx_sync_stream *st = f->waiters, *next; st; st = next) {
    next = st->fnext;
    if (only_unstarted && st->started)
      continue;
    waiter_remove(f, st);
    st->next_out = NULL;
    *tail = st;
    tail = &st->next_out;
  }
  return list;
}

static void start_stream(mx_sync_stream *st) {
  if (st->started || st->closed)
    return;
  st->started = true;
  st->ops->on_start(st, 200, NULL, 0, st->ud);
}

static void deliver(mx_sync_stream *st, mx_chunk *event, const char *next,
                    size_t nlen) {
  if (st->closed)
    return;
  start_stream(st);
  if (st->closed)
    return;
  mx_buf_reset(&st->position);
  if (mx_buf_append(&st->position, next, nlen)) {
    /* An absurd next_batch: the stream cannot continue. */
    mx_chunk *err = NULL;
    if (mx_sse_error_encode("M_UNKNOWN", "Invalid position from homeserver",
                            &err) == 0) {
      st->ops->on_fatal(st, err, st->ud);
      mx_chunk_unref(err);
    }
    return;
  }
  st->delivered = true;
  mx_stats.sse_events_sent++;
  st->ops->on_event(st, event, st->ud);
}

static void answer_error(mx_sync_stream *st, int status, const char *body,
                         size_t len) {
  if (st->closed)
    return;
  if (!st->started) {
    st->started = true; /* the answer is given: no second one */
    st->ops->on_start(st, status, body, len, st->ud);
    return;
  }
  mx_chunk *ev = NULL;
  if (mx_sse_event_encode(NULL, 0, "error", body, len, &ev) == 0) {
    st->ops->on_fatal(st, ev, st->ud);
    mx_chunk_unref(ev);
  }
}

static bool is_json_object(const char *body, size_t len) {
  return body && len && mx_json_scan_validate(body, len) == 0;
}

/* Our own Matrix error for a failure that has no usable upstream body. */
static void answer_own_error(mx_sync_stream *st, int status,
                             const char *error) {
  mx_buf b;
  mx_buf_init(&b, 1024);
  mx_http_matrix_error(&b, "M_UNKNOWN", error);
  answer_error(st, status, b.data, b.len);
  mx_buf_free(&b);
}

static long retry_after_ms(const mx_sync_response *resp) {
  if (resp->retry_after_ms >= 0)
    return resp->retry_after_ms;
  if (resp->status != 429 || !is_json_object(resp->body, resp->len))
    return -1;
  static const char *const path[] = {"retry_after_ms"};
  mx_json_span v;
  if (mx_json_scan_find(resp->body, resp->len, path, 1, &v) == 0 &&
      v.type == MX_JSON_NUMBER)
    return strtol(v.p, NULL, 10);
  return -1;
}

static void schedule_retry(fetch *f, const mx_sync_response *resp) {
  mx_sync_hub *hub = f->hub;
  double delay = hub->opts.backoff_base;
  for (int i = 0; i < f->attempts && delay < hub->opts.backoff_max; i++)
    delay *= 2;
  if (delay > hub->opts.backoff_max)
    delay = hub->opts.backoff_max;
  /* Jitter in [0.5, 1.5): a restarted homeserver is not hit by every
   * stream at the same instant. The cap holds after the jitter. */
  delay *= 0.5 + (double)(random() % 1000) / 1000.0;
  if (delay > hub->opts.backoff_max)
    delay = hub->opts.backoff_max;
  long ra = retry_after_ms(resp);
  if (ra >= 0 && (double)ra / 1000.0 > delay)
    delay = (double)ra / 1000.0;
  f->attempts++;
  MX_LOG_INFO("sync.retry", "status=%d attempt=%d delay=%.2f", resp->status,
              f->attempts, delay);
  ev_timer_set(&f->retry, delay, 0.);
  ev_timer_start(hub->loop, &f->retry);
}

static void transient_failure(fetch *f, const mx_sync_response *resp) {
  /* Streams not started yet get the failure as their HTTP answer; started
   * ones keep waiting (and heartbeating) while we retry. */
  mx_sync_stream *list = take_waiters(f, true);
  if (f->nwaiters == 0)
    fetch_free(f);
  else
    schedule_retry(f, resp);
  for (mx_sync_stream *st = list, *next; st; st = next) {
    next = st->next_out;
    if (resp->status >= 500 || resp->status == 429) {
      if (is_json_object(resp->body, resp->len))
        answer_error(st, resp->status, resp->body, resp->len);
      else
        answer_own_error(st, resp->status, "The homeserver failed");
    } else if (resp->status == 0 && resp->err == MX_ERR_TIMEOUT) {
      answer_own_error(st, 504, "The homeserver did not answer in time");
    } else {
      answer_own_error(st, 502, resp->status
                                    ? "The homeserver sent an invalid answer"
                                    : "The homeserver is unreachable");
    }
  }
}

static void fetch_done(void *ud, const mx_sync_response *resp) {
  fetch *f = ud;
  mx_sync_hub *hub = f->hub;
  f->handle = NULL;
  static const char *const nb_path[] = {"next_batch"};
  mx_json_span nb = {0};
  const char *next = NULL;
  size_t nlen = 0;
  bool escaped = false;
  bool ok_body = resp->status == 200 && is_json_object(resp->body, resp->len) &&
                 mx_json_scan_find(resp->body, resp->len, nb_path, 1, &nb) ==
                     0 &&
                 nb.type == MX_JSON_STRING &&
                 mx_json_scan_string(&nb, &next, &nlen, &escaped) == 0 &&
                 !escaped && nlen > 0 && nlen < MAX_POSITION;
  if (resp->status == 0 || resp->status >= 500 || resp->status == 429 ||
      (resp->status == 200 && !ok_body)) {
    if (resp->status == 200)
      MX_LOG_WARN("sync.bad_body", "len=%zu", resp->len);
    transient_failure(f, resp);
    return;
  }
  f->attempts = 0;
  if (resp->status != 200) {
    /* 4xx: bad token, bad filter, logged out... final for these streams. */
    const char *body = resp->body;
    size_t len = resp->len;
    mx_sync_stream *list = take_waiters(f, false);
    fetch_free(f);
    for (mx_sync_stream *st = list, *n; st; st = n) {
      n = st->next_out;
      if (is_json_object(body, len))
        answer_error(st, resp->status, body, len);
      else
        answer_own_error(st, resp->status, "The homeserver refused the request");
    }
    return;
  }
  bool empty = f->since && strlen(f->since) == nlen &&
               memcmp(f->since, next, nlen) == 0;
  if (empty) {
    mx_stats.sync_empty++;
    if (f->kind == FETCH_LONGPOLL) {
      /* Nothing happened within the long-poll: poll again. */
      for (mx_sync_stream *st = f->waiters; st; st = st->fnext)
        start_stream(st);
      if (f->nwaiters == 0) {
        fetch_free(f);
        return;
      }
      mx_stats.sync_requests[MX_SYNC_REASON_LONGPOLL]++;
      /* A homeserver that answers long-polls at once (one that ignores
       * timeout=) must not be polled in a tight loop. */
      if (ev_now(hub->loop) - f->started < MIN_LONGPOLL_SECONDS) {
        ev_timer_set(&f->retry, MIN_LONGPOLL_SECONDS, 0.);
        ev_timer_start(hub->loop, &f->retry);
        return;
      }
      fetch_start(f);
      return;
    }
    /* A stream's first answer was empty: it starts, then waits. */
    mx_sync_stream *list = take_waiters(f, false);
    fetch_free(f);
    for (mx_sync_stream *st = list, *n; st; st = n) {
      n = st->next_out;
      start_stream(st);
      if (!st->closed)
        stream_advance(st);
    }
    return;
  }
  /* One encoded event for every waiter, kept for replay. */
  mx_chunk *event = NULL;
  if (mx_sse_event_encode(next, nlen, NULL, resp->body, resp->len, &event)) {
    transient_failure(f, &(mx_sync_response){.status = 0, .err = MX_ERR_NOMEM,
                                             .retry_after_ms = -1});
    return;
  }
  if (f->since)
    mx_replay_put(hub->replay, f->feed, FEED_KEY_LEN, f->since,
                  strlen(f->since), next, nlen, event, ev_now(hub->loop));
  mx_sync_stream *list = take_waiters(f, false);
  fetch_free(f);
  for (mx_sync_stream *st = list, *n; st; st = n) {
    n = st->next_out;
    deliver(st, event, next, nlen);
  }
  mx_chunk_unref(event);
}

/* --- streams -------------------------------------------------------- */

/* The stream needs its next batch: from the replay buffer when another
 * stream of the feed already fetched it, else from the homeserver. */
static void stream_advance(mx_sync_stream *st) {
  mx_sync_hub *hub = st->hub;
  if (st->closed || st->delivered || st->fetch)
    return;
  if (st->position.len) {
    mx_chunk *event = NULL;
    mx_buf next;
    mx_buf_init(&next, MAX_POSITION);
    if (mx_replay_get(hub->replay, st->feed, FEED_KEY_LEN, st->position.data,
                      st->position.len, ev_now(hub->loop), &event,
                      &next) == 0 &&
        event) {
      deliver(st, event, next.data, next.len);
      mx_chunk_unref(event);
      mx_buf_free(&next);
      return;
    }
    mx_buf_free(&next);
  }
  int rv = fetch_attach(st, st->started ? FETCH_LONGPOLL : FETCH_IMMEDIATE);
  if (rv)
    answer_own_error(st, 503, "Out of memory");
}

static void free_stream(mx_sync_stream *st) {
  mx_buf_free(&st->position);
  free(st->token);
  free(st->query);
  free(st->peer_ip);
  free(st->user_agent);
  free(st);
}

static void runner_cb(struct ev_loop *loop, ev_prepare *w, int revents) {
  mx_sync_hub *hub = w->data;
  /* Kicks may queue more kicks (replay chains): bounded per round. */
  for (int i = 0; i < 1024 && hub->kicks; i++) {
    mx_sync_stream *st = hub->kicks;
    hub->kicks = st->next_kick;
    if (!hub->kicks)
      hub->kicks_tail = NULL;
    st->kicked = false;
    stream_advance(st);
  }
  while (hub->dead) {
    mx_sync_stream *st = hub->dead;
    hub->dead = st->next_dead;
    free_stream(st);
  }
  if (!hub->kicks)
    ev_prepare_stop(loop, w);
}

static void expire_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_sync_hub *hub = w->data;
  mx_replay_expire(hub->replay, ev_now(loop));
}

mx_sync_hub *mx_sync_hub_new(struct ev_loop *loop,
                             const mx_sync_hub_opts *opts,
                             const mx_sync_fetcher *fetcher) {
  mx_sync_hub *hub = calloc(1, sizeof(*hub));
  if (!hub)
    return NULL;
  hub->loop = loop;
  hub->opts = *opts;
  if (hub->opts.backoff_base <= 0)
    hub->opts.backoff_base = 0.5;
  if (hub->opts.backoff_max <= 0)
    hub->opts.backoff_max = 30;
  hub->fetcher = *fetcher;
  mx_replay_opts ropts = {.max_bytes = opts->replay_max_bytes,
                          .max_age = opts->replay_max_age};
  hub->replay = mx_replay_new(&ropts);
  if (!hub->replay) {
    free(hub);
    return NULL;
  }
  mx_strmap_init(&hub->fetches);
  ev_prepare_init(&hub->runner, runner_cb);
  hub->runner.data = hub;
  ev_timer_init(&hub->expire, expire_cb, 10., 10.);
  hub->expire.data = hub;
  ev_timer_start(loop, &hub->expire);
  ev_unref(loop); /* the expiry timer alone must not keep the loop alive */
  return hub;
}

void mx_sync_hub_free(mx_sync_hub *hub) {
  if (!hub)
    return;
  while (hub->streams)
    mx_sync_stream_close(hub->streams);
  hub->kicks = hub->kicks_tail = NULL;
  runner_cb(hub->loop, &hub->runner, 0);
  ev_prepare_stop(hub->loop, &hub->runner);
  ev_ref(hub->loop);
  ev_timer_stop(hub->loop, &hub->expire);
  mx_strmap_free(&hub->fetches);
  mx_replay_free(hub->replay);
  free(hub);
}

mx_sync_stream *mx_sync_stream_open(mx_sync_hub *hub,
                                    const mx_sync_stream_params *p,
                                    const mx_sync_stream_ops *ops, void *ud) {
  mx_sync_stream *st = calloc(1, sizeof(*st));
  if (!st)
    return NULL;
  st->hub = hub;
  st->ops = ops;
  st->ud = ud;
  st->token = strdup(p->token);
  st->query = strdup(p->query ? p->query : "");
  st->peer_ip = dup_or_null(p->peer_ip);
  st->user_agent = dup_or_null(p->user_agent);
  st->full_state = p->full_state;
  mx_buf_init(&st->position, MAX_POSITION);
  if (!st->token || !st->query || (p->peer_ip && !st->peer_ip) ||
      (p->user_agent && !st->user_agent) ||
      (p->since && mx_buf_append(&st->position, p->since, strlen(p->since)))) {
    free_stream(st);
    return NULL;
  }
  feed_key(st->token, st->query, st->feed);
  st->next = hub->streams;
  if (hub->streams)
    hub->streams->prev = st;
  hub->streams = st;
  hub->nstreams++;
  kick(st);
  return st;
}

void mx_sync_stream_taken(mx_sync_stream *st) {
  if (st->closed || !st->delivered)
    return;
  st->delivered = false;
  kick(st);
}

void mx_sync_stream_close(mx_sync_stream *st) {
  if (st->closed)
    return;
  st->closed = true;
  mx_sync_hub *hub = st->hub;
  fetch_detach(st);
  if (st->prev)
    st->prev->next = st->next;
  else
    hub->streams = st->next;
  if (st->next)
    st->next->prev = st->prev;
  hub->nstreams--;
  /* Unqueue a pending kick: the runner must not see a freed stream. */
  mx_sync_stream **pp = &hub->kicks;
  mx_sync_stream *prev = NULL;
  while (*pp) {
    if (*pp == st) {
      *pp = st->next_kick;
      if (hub->kicks_tail == st)
        hub->kicks_tail = prev;
      break;
    }
    prev = *pp;
    pp = &(*pp)->next_kick;
  }
  st->next_dead = hub->dead;
  hub->dead = st;
  ev_prepare_start(hub->loop, &hub->runner);
}

const char *mx_sync_stream_position(const mx_sync_stream *st) {
  return st->position.len ? st->position.data : "";
}

size_t mx_sync_hub_streams(const mx_sync_hub *hub) { return hub->nstreams; }
size_t mx_sync_hub_fetches(const mx_sync_hub *hub) { return hub->nfetches; }
