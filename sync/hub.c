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
typedef struct identity identity;

/* Who a token belongs to, resolved once per token in replication mode
 * (account/whoami, then joined_rooms to seed the room index). */
struct identity {
  mx_sync_hub *hub;
  char *token;
  char *user;          /* once resolved */
  size_t ulen;
  unsigned refs;       /* streams using it */
  int step;            /* 0: whoami in flight, 1: joined_rooms, 2: done */
  bool failed;         /* transient failure: its streams long-poll */
  int error_status;    /* 4xx: the streams' answer */
  char *error_body;
  size_t error_len;
  void *handle;
};

/* The streams of one user (all its devices and tabs). */
typedef struct user_entry {
  mx_sync_stream *streams;
  size_t count;
} user_entry;

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
  double opened;   /* ev_now at open */
  fetch *fetch;    /* the fetch this stream waits on */
  mx_sync_stream *fprev, *fnext; /* in fetch->waiters */
  mx_sync_stream *prev, *next;   /* in hub->streams */
  mx_sync_stream *next_dead;
  mx_sync_stream *next_out; /* in a list taken off a fetch for answers */
  bool kicked;     /* queued in hub->kicks */
  mx_sync_stream *next_kick;
  /* replication mode */
  identity *id;
  bool in_user;    /* linked in its user_entry */
  mx_sync_stream *uprev, *unext;
  bool parked;     /* waiting for a wake */
  bool dirty;      /* woken while not parked: fetch again at once */
  bool queued;     /* in hub->pending */
  mx_sync_stream *next_pending;
  bool presence;   /* set_presence is not offline */
  int reason;      /* MX_SYNC_REASON_* of the next timeout=0 fetch */
  double last_fetch, woken_at;
};

struct fetch {
  mx_sync_hub *hub;
  char *key; /* map key: feed|kind|full_state|since */
  size_t klen;
  char feed[FEED_KEY_LEN + 1];
  char *since; /* NULL: initial */
  fetch_kind kind;
  bool full_state;
  bool counted;  /* in hub->nimmediate */
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
  /* replication mode */
  bool feed_up;
  mx_strmap identities; /* token -> identity */
  mx_strmap users;      /* user id -> user_entry */
  mx_sync_stream *pending, *pending_tail; /* woken, waiting for a slot */
  size_t nimmediate;    /* timeout=0 fetches in flight */
  ev_timer debounce;
  ev_timer presence;
  mx_sync_stream *kicks, *kicks_tail; /* to advance from the loop */
  ev_prepare runner;     /* runs kicks and frees dead streams */
  ev_timer expire;       /* replay buffer expiry */
};

static void stream_advance(mx_sync_stream *st);
static void fetch_start(fetch *f);
static void pending_schedule(mx_sync_hub *hub, double delay);

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

/* Frees a fetch's memory (it is no longer in the map). */
static void fetch_release(fetch *f) {
  free(f->key);
  free(f->since);
  free(f->token);
  free(f->query);
  free(f->peer_ip);
  free(f->user_agent);
  free(f);
}

static void fetch_free(fetch *f) {
  mx_sync_hub *hub = f->hub;
  assert(f->nwaiters == 0);
  if (f->handle)
    hub->fetcher.cancel(hub->fetcher.impl, f->handle);
  ev_timer_stop(hub->loop, &f->retry);
  mx_strmap_del(&hub->fetches, f->key, f->klen);
  hub->nfetches--;
  if (f->counted) {
    hub->nimmediate--;
    if (hub->pending) /* a slot for a woken stream */
      pending_schedule(hub, 0.);
  }
  fetch_release(f);
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

/* Finds or creates the fetch a stream needs and adds the stream to it.
 * reason: why (MX_SYNC_REASON_*), for the metrics. */
static int fetch_attach(mx_sync_stream *st, fetch_kind kind, int reason) {
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
      fetch_release(f);
      return MX_ERR_NOMEM;
    }
    hub->nfetches++;
    if (kind == FETCH_IMMEDIATE && st->started) {
      f->counted = true;
      hub->nimmediate++;
    }
    mx_stats.sync_requests[reason]++;
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
  st->last_fetch = ev_now(hub->loop);
  if (fs)
    st->full_state = false;
  return 0;
}

/* Takes waiters off a fetch, for answering after the fetch is settled
 * (answer callbacks may close streams, which may free the fetch): all of
 * them, or only those not started whose start-retry window is over. */
static mx_sync_stream *take_waiters(fetch *f, bool only_unstarted) {
  mx_sync_stream *list = NULL, **tail = &list;
  double now = ev_now(f->hub->loop);
  for (mx_sync_stream *st = f->waiters, *next; st; st = next) {
    next = st->fnext;
    if (only_unstarted &&
        (st->started ||
         now - st->opened < f->hub->opts.start_retry_window))
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
  if (st->woken_at > 0) {
    mx_hist_observe(&mx_stats.wake_to_delivery,
                    ev_now(st->hub->loop) - st->woken_at);
    st->woken_at = 0;
  }
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
  /* Streams not started within their window get the failure as their
   * HTTP answer (the homeserver is really down); the others keep waiting
   * (started ones heartbeating) while we retry. */
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

/* Delivers the replay buffer's batch for f's position to its waiters, if
 * there is one; frees f. Returns false (f untouched) when there is none. */
static bool deliver_replayed(fetch *f) {
  mx_sync_hub *hub = f->hub;
  mx_chunk *event = NULL;
  mx_buf next;
  mx_buf_init(&next, MAX_POSITION);
  if (mx_replay_get(hub->replay, f->feed, FEED_KEY_LEN, f->since,
                    strlen(f->since), ev_now(hub->loop), &event, &next) ||
      !event) {
    mx_buf_free(&next);
    return false;
  }
  f->attempts = 0;
  mx_sync_stream *list = take_waiters(f, false);
  fetch_free(f);
  for (mx_sync_stream *st = list, *n; st; st = n) {
    n = st->next_out;
    deliver(st, event, next.data, next.len);
  }
  mx_chunk_unref(event);
  mx_buf_free(&next);
  return true;
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
  /* A batch already delivered from this position is the truth: another
   * stream may have fetched past it since, which deleted its to-device
   * messages upstream, so this later answer can lack them. */
  if (f->since && !f->full_state && deliver_replayed(f))
    return;
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
    /* A first answer, or a woken fetch, was empty: the stream starts if
     * it had not, then waits again. */
    mx_sync_stream *list = take_waiters(f, false);
    fetch_free(f);
    for (mx_sync_stream *st = list, *n; st; st = n) {
      n = st->next_out;
      st->woken_at = 0;
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
  /* A full_state answer is not the batch other streams resume with. */
  if (f->since && !f->full_state)
    mx_replay_put(hub->replay, f->feed, FEED_KEY_LEN, f->since,
                  strlen(f->since), next, nlen, event, ev_now(hub->loop));
  /* The room index learns joins and leaves from the batch itself. */
  for (mx_sync_stream *st = f->waiters; st; st = st->fnext) {
    if (st->id && st->id->user && hub->opts.hooks.batch) {
      hub->opts.hooks.batch(st->id->user, st->id->ulen, resp->body,
                            resp->len, f->since == NULL, hub->opts.hooks.ud);
      break; /* one feed, one user */
    }
  }
  mx_sync_stream *list = take_waiters(f, false);
  fetch_free(f);
  for (mx_sync_stream *st = list, *n; st; st = n) {
    n = st->next_out;
    deliver(st, event, next, nlen);
  }
  mx_chunk_unref(event);
}

/* --- replication mode: identities, users, wakes ---------------------- */

static void user_link(mx_sync_stream *st) {
  mx_sync_hub *hub = st->hub;
  identity *id = st->id;
  if (st->in_user || !id || !id->user)
    return;
  user_entry *u = mx_strmap_get(&hub->users, id->user, id->ulen);
  if (!u) {
    u = calloc(1, sizeof(*u));
    if (!u || mx_strmap_put(&hub->users, id->user, id->ulen, u, NULL)) {
      free(u);
      return; /* out of memory: the stream is only reached by safety nets */
    }
  }
  st->uprev = NULL;
  st->unext = u->streams;
  if (u->streams)
    u->streams->uprev = st;
  u->streams = st;
  u->count++;
  st->in_user = true;
}

static void user_unlink(mx_sync_stream *st) {
  mx_sync_hub *hub = st->hub;
  if (!st->in_user)
    return;
  identity *id = st->id;
  user_entry *u = mx_strmap_get(&hub->users, id->user, id->ulen);
  st->in_user = false;
  if (!u)
    return;
  if (st->uprev)
    st->uprev->unext = st->unext;
  else
    u->streams = st->unext;
  if (st->unext)
    st->unext->uprev = st->uprev;
  st->uprev = st->unext = NULL;
  if (--u->count == 0) {
    mx_strmap_del(&hub->users, id->user, id->ulen);
    free(u);
    if (hub->opts.hooks.user_close)
      hub->opts.hooks.user_close(id->user, id->ulen, hub->opts.hooks.ud);
  }
}

static void identity_step(identity *id);

static void identity_free(identity *id) {
  mx_sync_hub *hub = id->hub;
  if (id->handle)
    hub->fetcher.cancel(hub->fetcher.impl, id->handle);
  mx_strmap_del(&hub->identities, id->token, strlen(id->token));
  free(id->token);
  free(id->user);
  free(id->error_body);
  free(id);
}

static void identity_unref(mx_sync_stream *st) {
  identity *id = st->id;
  if (!id)
    return;
  user_unlink(st);
  st->id = NULL;
  if (--id->refs == 0)
    identity_free(id);
}

/* Every stream of the identity may go on (or take its error). */
static void identity_settled(identity *id) {
  for (mx_sync_stream *st = id->hub->streams; st; st = st->next) {
    if (st->id != id)
      continue;
    if (id->user && !st->in_user)
      user_link(st);
    kick(st);
  }
}

static void identity_done(void *ud, const mx_sync_response *resp) {
  identity *id = ud;
  mx_sync_hub *hub = id->hub;
  id->handle = NULL;
  if (resp->status >= 400 && resp->status < 500 && resp->status != 429) {
    /* The token itself is refused: that is every stream's answer. */
    id->error_status = resp->status;
    id->error_body = malloc(resp->len ? resp->len : 1);
    if (id->error_body) {
      memcpy(id->error_body, resp->body, resp->len);
      id->error_len = resp->len;
    }
    id->step = 2;
    identity_settled(id);
    return;
  }
  if (resp->status != 200 || !is_json_object(resp->body, resp->len)) {
    /* Transient: these streams long-poll (or, without the fallback, wait
     * for safety nets) rather than fail. */
    MX_LOG_WARN("sync.identity_failed", "status=%d step=%d", resp->status,
                id->step);
    /* Without the user's rooms the index cannot wake them: treat the
     * user as unknown (long-polls), and let the next device retry. */
    free(id->user);
    id->user = NULL;
    id->ulen = 0;
    id->failed = true;
    id->step = 2;
    identity_settled(id);
    return;
  }
  if (id->step == 0) {
    static const char *const path[] = {"user_id"};
    mx_json_span v;
    const char *u;
    size_t ulen;
    bool esc;
    if (mx_json_scan_find(resp->body, resp->len, path, 1, &v) == 0 &&
        v.type == MX_JSON_STRING &&
        mx_json_scan_string(&v, &u, &ulen, &esc) == 0 && !esc && ulen &&
        (id->user = strndup(u, ulen))) {
      id->ulen = ulen;
      if (mx_strmap_get(&hub->users, u, ulen)) {
        id->step = 2; /* another device of the user: rooms are known */
        identity_settled(id);
        return;
      }
      id->step = 1;
      identity_step(id);
      return;
    }
    id->failed = true;
    id->step = 2;
    identity_settled(id);
    return;
  }
  /* joined_rooms: the index starts from the full list, so a stream that
   * resumes from an old position is woken for rooms it joined long ago. */
  id->step = 2;
  if (hub->opts.hooks.user_open &&
      !mx_strmap_get(&hub->users, id->user, id->ulen))
    hub->opts.hooks.user_open(id->user, id->ulen, resp->body, resp->len,
                              hub->opts.hooks.ud);
  identity_settled(id);
}

static void identity_step(identity *id) {
  mx_sync_hub *hub = id->hub;
  mx_sync_request req = {
      .path = id->step == 0 ? "/_matrix/client/v3/account/whoami"
                            : "/_matrix/client/v3/joined_rooms",
      .token = id->token,
  };
  id->handle = hub->fetcher.start(hub->fetcher.impl, &req, identity_done, id);
  if (!id->handle) {
    id->failed = true;
    id->step = 2;
    identity_settled(id);
  }
}

/* True once the stream may fetch: its token's user is known (or could
 * not be, and the stream falls back to long-polls). Answers a refused
 * token. */
static bool identity_ready(mx_sync_stream *st) {
  mx_sync_hub *hub = st->hub;
  if (!st->id) {
    identity *id = mx_strmap_get(&hub->identities, st->token,
                                 strlen(st->token));
    if (!id) {
      id = calloc(1, sizeof(*id));
      if (!id || !(id->token = strdup(st->token)) ||
          mx_strmap_put(&hub->identities, id->token, strlen(id->token), id,
                        NULL)) {
        if (id)
          free(id->token);
        free(id);
        return true; /* no memory: do without */
      }
      id->hub = hub;
      st->id = id;
      id->refs++;
      identity_step(id);
      return false;
    }
    st->id = id;
    id->refs++;
    if (id->step < 2)
      return false;
    user_link(st);
  }
  if (st->id->step < 2)
    return false;
  if (st->id->error_status) {
    if (is_json_object(st->id->error_body, st->id->error_len))
      answer_error(st, st->id->error_status, st->id->error_body,
                   st->id->error_len);
    else
      answer_own_error(st, st->id->error_status,
                       "The homeserver refused the access token");
    return false;
  }
  return true;
}

/* Whether a started stream waits for wakes rather than long-polling. */
static bool parks(const mx_sync_stream *st) {
  const mx_sync_hub *hub = st->hub;
  if (!hub->opts.replication)
    return false;
  bool known = st->id && st->id->user && st->in_user;
  if (hub->feed_up)
    return known || !hub->opts.longpoll_fallback;
  return !hub->opts.longpoll_fallback;
}

static void pending_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_sync_hub *hub = w->data;
  size_t cap = (size_t)hub->opts.max_fetches;
  while (hub->pending && hub->nimmediate < cap) {
    mx_sync_stream *st = hub->pending;
    hub->pending = st->next_pending;
    if (!hub->pending)
      hub->pending_tail = NULL;
    st->queued = false;
    st->next_pending = NULL;
    stream_advance(st);
  }
}

static void pending_schedule(mx_sync_hub *hub, double delay) {
  if (ev_is_active(&hub->debounce))
    return;
  ev_timer_set(&hub->debounce, delay, 0.);
  ev_timer_start(hub->loop, &hub->debounce);
}

/* Queues a woken stream for a fetch slot. */
static void pending_add(mx_sync_stream *st) {
  mx_sync_hub *hub = st->hub;
  st->queued = true;
  st->next_pending = NULL;
  if (hub->pending_tail)
    hub->pending_tail->next_pending = st;
  else
    hub->pending = st;
  hub->pending_tail = st;
}

static void pending_remove(mx_sync_stream *st) {
  mx_sync_hub *hub = st->hub;
  if (!st->queued)
    return;
  mx_sync_stream **pp = &hub->pending, *prev = NULL;
  while (*pp && *pp != st) {
    prev = *pp;
    pp = &(*pp)->next_pending;
  }
  if (*pp) {
    *pp = st->next_pending;
    if (hub->pending_tail == st)
      hub->pending_tail = prev;
  }
  st->queued = false;
  st->next_pending = NULL;
}

static void stream_wake(mx_sync_stream *st, int reason) {
  mx_sync_hub *hub = st->hub;
  if (st->closed)
    return;
  if (reason != MX_SYNC_REASON_PRESENCE && st->woken_at == 0)
    st->woken_at = ev_now(hub->loop);
  if (!st->dirty || st->reason == MX_SYNC_REASON_PRESENCE)
    st->reason = reason;
  st->dirty = true;
  if (!st->parked)
    return; /* in flight or not taken yet: it fetches again when done */
  st->parked = false;
  pending_add(st);
  /* A short debounce merges a burst (message, receipt, typing). */
  pending_schedule(hub, hub->opts.wake_debounce);
}

void mx_sync_hub_wake_user(mx_sync_hub *hub, const char *user, size_t len) {
  user_entry *u = mx_strmap_get(&hub->users, user, len);
  if (!u)
    return;
  for (mx_sync_stream *st = u->streams; st; st = st->unext)
    stream_wake(st, MX_SYNC_REASON_WAKE);
}

void *mx_sync_hub_get_as(mx_sync_hub *hub, const char *user, size_t len,
                         const char *path, mx_sync_done_fn done, void *ud) {
  user_entry *u = mx_strmap_get(&hub->users, user, len);
  mx_sync_stream *st = u ? u->streams : NULL;
  if (!st)
    return NULL;
  mx_sync_request req = {.path = path,
                         .token = st->token,
                         .peer_ip = st->peer_ip,
                         .user_agent = st->user_agent};
  return hub->fetcher.start(hub->fetcher.impl, &req, done, ud);
}

void mx_sync_hub_get_cancel(mx_sync_hub *hub, void *handle) {
  if (handle)
    hub->fetcher.cancel(hub->fetcher.impl, handle);
}

void mx_sync_hub_wake_all(mx_sync_hub *hub, int reason) {
  for (mx_sync_stream *st = hub->streams; st; st = st->next)
    if (st->started)
      stream_wake(st, reason);
}

void mx_sync_hub_set_feed_up(mx_sync_hub *hub, bool up) {
  if (!hub->opts.replication || hub->feed_up == up)
    return;
  hub->feed_up = up;
  for (mx_sync_stream *st = hub->streams; st; st = st->next) {
    if (!st->started || st->closed)
      continue;
    if (up && st->fetch && st->fetch->kind == FETCH_LONGPOLL) {
      /* Back to parking: leave the long-poll, fetch what was missed. */
      fetch_detach(st);
      st->dirty = true;
      st->reason = MX_SYNC_REASON_SAFETY;
      kick(st);
    } else if (!up && st->parked && hub->opts.longpoll_fallback) {
      st->parked = false;
      kick(st); /* long-polls from now on */
    }
  }
  /* Rows published while the feed was away are lost: the safety net. */
  if (up)
    mx_sync_hub_wake_all(hub, MX_SYNC_REASON_SAFETY);
}

static void presence_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_sync_hub *hub = w->data;
  double now = ev_now(loop);
  /* A parked stream makes no request; its user would go offline
   * (sync_online_timeout) unless it syncs now and then. */
  /* Checked every interval/5: wake from 4/5 of the interval on, so the
   * sync lands within the interval (Synapse's 30 s sync_online_timeout
   * keeps its margin) whatever the debounce and the tick phase. */
  double due = hub->opts.presence_interval * 4 / 5;
  for (mx_sync_stream *st = hub->streams; st; st = st->next)
    if (st->parked && st->presence && now - st->last_fetch >= due)
      stream_wake(st, MX_SYNC_REASON_PRESENCE);
}

/* set_presence absent or anything but offline keeps the user online. */
static bool wants_presence(const char *query) {
  static const char key[] = "set_presence=";
  for (const char *p = query; p && *p;) {
    if (!strncmp(p, key, sizeof(key) - 1)) {
      const char *v = p + sizeof(key) - 1;
      return !(strncmp(v, "offline", 7) == 0 && (v[7] == '&' || !v[7]));
    }
    p = strchr(p, '&');
    if (p)
      p++;
  }
  return true;
}

/* --- streams -------------------------------------------------------- */

/* The stream needs its next batch: from the replay buffer when another
 * stream of the feed already fetched it, else from the homeserver. */
static void stream_advance(mx_sync_stream *st) {
  mx_sync_hub *hub = st->hub;
  if (st->closed || st->delivered || st->fetch || st->parked || st->queued)
    return;
  /* A first batch asked with full_state must come from the homeserver
   * (the endpoint drops full_state on Last-Event-ID reconnects). */
  if (st->position.len && !st->full_state) {
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
  int rv;
  if (hub->opts.replication && !identity_ready(st))
    return; /* kicked again once the token's user is known */
  if (!st->started) {
    rv = fetch_attach(st, FETCH_IMMEDIATE, MX_SYNC_REASON_INITIAL);
  } else if (parks(st)) {
    if (!st->dirty) {
      st->parked = true;
      return;
    }
    if (hub->nimmediate >= (size_t)hub->opts.max_fetches) {
      /* Every woken fetch counts against the cap, however it was
       * started (a safety net, a refetch after taken): wait for a slot;
       * a finishing fetch runs the queue. */
      pending_add(st);
      return;
    }
    st->dirty = false;
    rv = fetch_attach(st, FETCH_IMMEDIATE, st->reason);
  } else {
    st->dirty = false;
    rv = fetch_attach(st, FETCH_LONGPOLL, MX_SYNC_REASON_LONGPOLL);
  }
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
  if (hub->opts.start_retry_window == 0)
    hub->opts.start_retry_window = 5;
  hub->fetcher = *fetcher;
  mx_replay_opts ropts = {.max_bytes = opts->replay_max_bytes,
                          .max_age = opts->replay_max_age};
  hub->replay = mx_replay_new(&ropts);
  if (!hub->replay) {
    free(hub);
    return NULL;
  }
  if (hub->opts.max_fetches <= 0)
    hub->opts.max_fetches = 8;
  if (hub->opts.wake_debounce < 0)
    hub->opts.wake_debounce = 0;
  if (hub->opts.presence_interval <= 0)
    hub->opts.presence_interval = 25;
  mx_strmap_init(&hub->fetches);
  mx_strmap_init(&hub->identities);
  mx_strmap_init(&hub->users);
  ev_init(&hub->debounce, pending_cb);
  hub->debounce.data = hub;
  ev_init(&hub->presence, presence_cb);
  hub->presence.data = hub;
  if (hub->opts.replication) {
    double every = hub->opts.presence_interval / 5;
    ev_timer_set(&hub->presence, every, every);
    ev_timer_start(loop, &hub->presence);
    ev_unref(loop);
  }
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
  if (ev_is_active(&hub->presence)) {
    ev_ref(hub->loop);
    ev_timer_stop(hub->loop, &hub->presence);
  }
  ev_timer_stop(hub->loop, &hub->debounce);
  mx_strmap_free(&hub->fetches);
  mx_strmap_free(&hub->identities); /* emptied as the streams closed */
  mx_strmap_free(&hub->users);
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
  st->opened = ev_now(hub->loop);
  mx_buf_init(&st->position, MAX_POSITION);
  if (!st->token || !st->query || (p->peer_ip && !st->peer_ip) ||
      (p->user_agent && !st->user_agent) ||
      (p->since && mx_buf_append(&st->position, p->since, strlen(p->since)))) {
    free_stream(st);
    return NULL;
  }
  feed_key(st->token, st->query, st->feed);
  st->presence = wants_presence(st->query);
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
  pending_remove(st);
  identity_unref(st);
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
