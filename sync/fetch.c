/*
 * Shared fetches: one upstream /sync per (feed, kind, full_state, since),
 * whatever number of streams wait on it; retries with backoff; the
 * answer's handling (batch, empty, error); the replay store in between,
 * so that the first answer from a position is the one every stream gets.
 */
#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "common/backoff.h"
#include "common/error.h"
#include "common/limits.h"
#include "common/log.h"
#include "common/metrics.h"
#include "sync/hub_internal.h"
#include "sync/json_scan.h"

static void fetch_start(fetch *f);

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

static void waiter_remove(fetch *f, mx_sync_stream *st) {
  mx_list_remove(&st->fnode);
  st->fetch = NULL;
  f->nwaiters--;
}

/* Frees a fetch's memory (it is no longer in the map). */
static void fetch_release(fetch *f) {
  mx_batch_unref(f->answer); /* a put waiting to be retried */
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
  if (f->storing) {
    f->orphan = true; /* the store's answer frees it */
    return;
  }
  if (f->handle)
    hub->api.cancel(hub->api.impl, f->handle);
  ev_timer_stop(hub->loop, &f->retry);
  mx_strmap_del(&hub->fetches, f->key, f->klen);
  hub->nfetches--;
  if (f->counted) {
    hub->nimmediate--;
    park_slot_freed(hub);
  }
  fetch_release(f);
}

void fetch_detach(mx_sync_stream *st) {
  fetch *f = st->fetch;
  if (!f)
    return;
  waiter_remove(f, st);
  /* Nobody waits any more: stop holding the homeserver's long-poll (and
   * stop syncing, for presence, on the client's behalf). */
  if (f->nwaiters == 0)
    fetch_free(f);
}

static void store_again(fetch *f);

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  fetch *f = w->data;
  if (f->answer || f->relook) {
    store_again(f);
    return;
  }
  if (f->attempts) /* else a paced long-poll, counted when decided */
    mx_stats.sync_requests[MX_SYNC_REASON_RETRY]++;
  fetch_start(f);
}

/* Takes waiters off a fetch into out, for answering after the fetch is
 * settled (answer callbacks may close streams, which may free the fetch):
 * all of them, or only those not started whose start-retry window is
 * over. */
static void take_waiters(fetch *f, bool only_unstarted, mx_list *out) {
  double now = ev_now(f->hub->loop);
  mx_list_init(out);
  MX_LIST_FOREACH_SAFE(n, nx, &f->waiters) {
    mx_sync_stream *st = MX_CONTAINER_OF(n, mx_sync_stream, fnode);
    if (only_unstarted &&
        (st->started ||
         now - st->opened < f->hub->opts.start_retry_window))
      continue;
    waiter_remove(f, st);
    mx_list_push_back(out, &st->fnode);
  }
}

/* Pops the next stream of a list made by take_waiters. A stream closed
 * meanwhile has left the list (mx_sync_stream_close unlinks fnode). */
static mx_sync_stream *next_out(mx_list *out) {
  mx_list_node *n = mx_list_pop_front(out);
  return n ? MX_CONTAINER_OF(n, mx_sync_stream, fnode) : NULL;
}

static void answer_all(mx_list *out, int status, const char *body,
                       size_t len, const char *fallback) {
  for (mx_sync_stream *st; (st = next_out(out));) {
    if (hub_is_json_object(body, len))
      hub_answer_error(st, status, body, len);
    else
      hub_answer_own_error(st, status, "M_UNKNOWN", fallback);
  }
}

static void fetch_done(void *ud, const mx_hs_response *resp);

static void fetch_start(fetch *f) {
  mx_sync_hub *hub = f->hub;
  mx_hs_request req = {
      .call = MX_HS_SYNC,
      .token = f->token,
      .query = f->query,
      .since = f->since,
      .timeout_ms = f->kind == FETCH_LONGPOLL ? hub->opts.longpoll_timeout_ms
                                              : 0,
      .full_state = f->full_state,
      .presence_off = f->quiet,
      .peer_ip = f->peer_ip,
      .user_agent = f->user_agent,
  };
  f->started = ev_now(hub->loop);
  int rv = hub->api.start(hub->api.impl, &req, fetch_done, f, &f->handle);
  if (rv == MX_ERR_LIMIT) {
    /* The request cannot be sent as it is (its URL is over the client's
     * cap): retrying cannot help, so it is every waiter's answer. */
    f->handle = NULL;
    MX_LOG_WARN("sync.too_long", "since_len=%zu",
                f->since ? strlen(f->since) : 0);
    mx_list out;
    take_waiters(f, false, &out);
    fetch_free(f);
    for (mx_sync_stream *st; (st = next_out(&out));)
      hub_answer_own_error(st, 414, "M_TOO_LARGE",
                           "The sync parameters and position are too long");
    return;
  }
  if (rv) {
    /* Out of memory: try again later rather than fail the streams. */
    f->handle = NULL;
    f->attempts++;
    ev_timer_set(&f->retry, hub->opts.backoff_max, 0.);
    ev_timer_start(hub->loop, &f->retry);
  }
}

/* Whether a fetch leaves presence alone (set_presence=offline). While the
 * relay keeps the stream's device syncing in Synapse (USER_SYNC) and its
 * user online (set_state), a woken sync that also showed presence would
 * only make Synapse count the device syncing and not syncing again, and
 * update the user's presence twice, for every woken fetch
 * (docs/presence.md, "Woken fetches"). A first batch, a long-poll (the
 * feed is down) and a keepalive the relay asked for still show it. */
static bool fetch_quiet(const mx_sync_stream *st, fetch_kind kind,
                        int reason) {
  const mx_sync_presence_ops *p = &st->hub->presence_ops;
  if (kind != FETCH_IMMEDIATE || !st->presence || !st->relayed ||
      st->presence_due)
    return false;
  if (reason != MX_SYNC_REASON_WAKE && reason != MX_SYNC_REASON_SAFETY)
    return false;
  return p->up && p->up(p->ud);
}

/* Finds or creates the fetch a stream needs and adds the stream to it.
 * reason: why (MX_SYNC_REASON_*), for the metrics. The fetch may answer
 * the stream before this returns (a request that cannot be sent). */
int fetch_attach(mx_sync_stream *st, fetch_kind kind, int reason) {
  mx_sync_hub *hub = st->hub;
  bool fs = kind == FETCH_IMMEDIATE && st->full_state;
  bool quiet = fetch_quiet(st, kind, reason);
  const char *since = st->position.len ? st->position.data : NULL;
  mx_buf key;
  mx_buf_init(&key, FEED_KEY_LEN + MX_SYNC_MAX_POSITION + 16);
  int rv = mx_buf_appendf(&key, "%s|%c%c%c|%s", st->feed,
                          kind == FETCH_LONGPOLL ? 'L' : 'I', fs ? 'f' : '-',
                          quiet ? 'q' : '-', since ? since : "");
  if (rv) {
    mx_buf_free(&key);
    return rv;
  }
  fetch *f = mx_strmap_get(&hub->fetches, key.data, key.len);
  bool created = false;
  if (!f) {
    f = calloc(1, sizeof(*f));
    if (!f) {
      mx_buf_free(&key);
      return MX_ERR_NOMEM;
    }
    f->hub = hub;
    f->kind = kind;
    f->full_state = fs;
    f->quiet = quiet;
    mx_list_init(&f->waiters);
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
    created = true;
  }
  mx_buf_free(&key);
  st->fetch = f;
  if (!quiet)
    st->presence_due = false; /* this fetch shows presence */
  mx_list_push_front(&f->waiters, &st->fnode);
  f->nwaiters++;
  st->last_fetch = ev_now(hub->loop);
  if (fs)
    st->full_state = false;
  if (created)
    fetch_start(f);
  return 0;
}

static long retry_after_ms(const mx_hs_response *resp) {
  if (resp->retry_after_ms >= 0)
    return resp->retry_after_ms;
  if (resp->status != 429 || !hub_is_json_object(resp->body, resp->len))
    return -1;
  static const char *const path[] = {"retry_after_ms"};
  mx_json_span v;
  if (mx_json_scan_find(resp->body, resp->len, path, 1, &v) == 0 &&
      v.type == MX_JSON_NUMBER)
    return strtol(v.p, NULL, 10);
  return -1;
}

static void schedule_retry(fetch *f, const mx_hs_response *resp) {
  mx_sync_hub *hub = f->hub;
  double delay = mx_backoff_delay(hub->opts.backoff_base,
                                  hub->opts.backoff_max, f->attempts);
  long ra = retry_after_ms(resp);
  if (ra >= 0 && (double)ra / 1000.0 > delay)
    delay = (double)ra / 1000.0;
  f->attempts++;
  MX_LOG_INFO("sync.retry", "status=%d attempt=%d delay=%.2f", resp->status,
              f->attempts, delay);
  ev_timer_set(&f->retry, delay, 0.);
  ev_timer_start(hub->loop, &f->retry);
}

static void transient_failure(fetch *f, const mx_hs_response *resp) {
  /* Streams not started within their window get the failure as their
   * HTTP answer (the homeserver is really down); the others keep waiting
   * (started ones heartbeating) while we retry. */
  mx_list out;
  take_waiters(f, true, &out);
  if (f->nwaiters == 0)
    fetch_free(f);
  else
    schedule_retry(f, resp);
  if (resp->status >= 500 || resp->status == 429)
    answer_all(&out, resp->status, resp->body, resp->len,
               "The homeserver failed");
  else if (resp->status == 0 && resp->err == MX_ERR_TIMEOUT)
    answer_all(&out, 504, NULL, 0, "The homeserver did not answer in time");
  else
    answer_all(&out, 502, NULL, 0,
               resp->status ? "The homeserver sent an invalid answer"
                            : "The homeserver is unreachable");
}

/* Delivers the batch that stands for f's position to all its waiters and
 * frees f. */
static void deliver_all(fetch *f, mx_batch *batch) {
  mx_sync_hub *hub = f->hub;
  /* The room index learns joins and leaves from the batch itself. */
  if (hub->hooks.batch) {
    MX_LIST_FOREACH_SAFE(n, nx, &f->waiters) {
      mx_sync_stream *st = MX_CONTAINER_OF(n, mx_sync_stream, fnode);
      if (st->id && st->id->user) {
        hub->hooks.batch(st->id->user, st->id->ulen, batch->body,
                         batch->len, f->since == NULL, hub->hooks.ud);
        break; /* one feed, one user */
      }
    }
  }
  mx_list out;
  take_waiters(f, false, &out);
  fetch_free(f);
  for (mx_sync_stream *st; (st = next_out(&out));)
    hub_deliver(st, batch);
}

/* The replay store could not be asked. Nothing may be fetched past this
 * position before its batch is proven stored (another node's client may
 * resume from it), so the batch, or the empty answer's lookup, waits and
 * is retried with backoff, started streams heartbeating meanwhile; streams
 * not started within their window are answered 503. */
static void store_later(fetch *f) {
  mx_sync_hub *hub = f->hub;
  mx_list out;
  take_waiters(f, true, &out);
  if (f->nwaiters == 0) {
    fetch_free(f);
  } else {
    double delay = mx_backoff_delay(hub->opts.backoff_base,
                                    hub->opts.backoff_max, f->store_attempts);
    f->store_attempts++;
    mx_stats.replay_put_retries++;
    MX_LOG_WARN("replay.store_retry", "op=%s attempt=%d delay=%.2f",
                f->relook ? "lookup" : "put", f->store_attempts, delay);
    ev_timer_set(&f->retry, delay, 0.);
    ev_timer_start(hub->loop, &f->retry);
  }
  for (mx_sync_stream *st; (st = next_out(&out));)
    hub_answer_own_error(st, 503, "M_UNKNOWN",
                         "The replay store is unavailable");
}

/* The store answered while f waited for it: whether f is still wanted. */
static bool store_answered(fetch *f) {
  f->storing = false;
  if (!f->orphan)
    return true;
  f->orphan = false;
  if (f->nwaiters) /* a stream came to the same position meanwhile */
    return true;
  fetch_free(f);
  return false;
}

/* The replay store's answer to putting f's batch: what it holds for the
 * position now is the truth (another stream, or node, may have fetched
 * past an earlier answer, which deleted its to-device messages upstream,
 * so this later answer can lack them). Not stored (too big for the store,
 * no memory): the batch is still this position's answer. */
static void stored(void *ud, int rv, mx_batch *winner) {
  fetch *f = ud;
  mx_batch *mine = f->answer;
  f->answer = NULL;
  if (!store_answered(f)) {
    mx_batch_unref(mine);
    return;
  }
  if (rv == MX_ERR_UNAVAILABLE) {
    f->answer = mine; /* kept, until a put is answered */
    store_later(f);
    return;
  }
  deliver_all(f, rv == 0 ? winner : mine);
  mx_batch_unref(mine);
}

/* Nothing happened since f's position, for the homeserver. */
static void answer_empty(fetch *f) {
  mx_sync_hub *hub = f->hub;
  mx_stats.sync_empty++;
  if (f->kind == FETCH_LONGPOLL) {
    /* Nothing happened within the long-poll: poll again. */
    MX_LIST_FOREACH_SAFE(n, nx, &f->waiters)
      hub_start_stream(MX_CONTAINER_OF(n, mx_sync_stream, fnode));
    if (f->nwaiters == 0) {
      fetch_free(f);
      return;
    }
    mx_stats.sync_requests[MX_SYNC_REASON_LONGPOLL]++;
    /* A homeserver that answers long-polls at once (one that ignores
     * timeout=) must not be polled in a tight loop. */
    if (ev_now(hub->loop) - f->started < MX_SYNC_MIN_LONGPOLL) {
      ev_timer_set(&f->retry, MX_SYNC_MIN_LONGPOLL, 0.);
      ev_timer_start(hub->loop, &f->retry);
      return;
    }
    fetch_start(f);
    return;
  }
  /* A first answer, or a woken fetch, was empty: the stream starts if it
   * had not, then waits again. */
  mx_list out;
  take_waiters(f, false, &out);
  fetch_free(f);
  for (mx_sync_stream *st; (st = next_out(&out));) {
    st->woken_at = 0;
    st->catching_up = false; /* an empty answer is never a cached one */
    hub_start_stream(st);
    if (!st->closed)
      hub_advance(st);
  }
}

/* An empty answer, unless a batch from this position was delivered
 * already (to another stream of the feed): that one is the truth. */
static void empty_looked_up(void *ud, int rv, mx_batch *batch) {
  fetch *f = ud;
  if (!store_answered(f))
    return;
  if (rv == 0) {
    deliver_all(f, batch);
  } else if (rv == MX_ERR_UNAVAILABLE) {
    /* Another node may have stored (and gone past) this position's
     * batch: an empty answer proves nothing until the store says. */
    f->relook = true;
    store_later(f);
  } else {
    answer_empty(f);
  }
}

/* The retry of a store call that could not be made. */
static void store_again(fetch *f) {
  mx_sync_hub *hub = f->hub;
  f->storing = true;
  if (f->answer) {
    mx_replay_put_if_absent(hub->replay, f->feed, FEED_KEY_LEN, f->since,
                            strlen(f->since), f->answer, ev_now(hub->loop),
                            stored, f);
  } else {
    f->relook = false;
    mx_replay_get(hub->replay, f->feed, FEED_KEY_LEN, f->since,
                  strlen(f->since), ev_now(hub->loop), empty_looked_up, f);
  }
}

static void fetch_done(void *ud, const mx_hs_response *resp) {
  fetch *f = ud;
  mx_sync_hub *hub = f->hub;
  f->handle = NULL;
  if (f->counted) /* a woken fetch: the homeserver's share of the delay */
    mx_hist_observe(&mx_stats.woken_fetch, ev_now(hub->loop) - f->started);
  static const char *const nb_path[] = {"next_batch"};
  mx_json_span nb = {0};
  const char *next = NULL;
  size_t nlen = 0;
  bool escaped = false;
  bool ok_body =
      resp->status == 200 && hub_is_json_object(resp->body, resp->len) &&
      mx_json_scan_find(resp->body, resp->len, nb_path, 1, &nb) == 0 &&
      nb.type == MX_JSON_STRING &&
      mx_json_scan_string(&nb, &next, &nlen, &escaped) == 0 && !escaped &&
      nlen > 0 && nlen < MX_SYNC_MAX_POSITION;
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
    mx_list out;
    take_waiters(f, false, &out);
    fetch_free(f);
    answer_all(&out, resp->status, resp->body, resp->len,
               "The homeserver refused the request");
    return;
  }
  bool empty = f->since && strlen(f->since) == nlen &&
               memcmp(f->since, next, nlen) == 0;
  bool resumable = f->since && !f->full_state;
  if (empty) {
    if (!resumable) {
      answer_empty(f);
      return;
    }
    f->storing = true;
    mx_replay_get(hub->replay, f->feed, FEED_KEY_LEN, f->since,
                  strlen(f->since), ev_now(hub->loop), empty_looked_up, f);
    return;
  }
  /* One batch for every waiter. */
  mx_batch *batch = mx_batch_new(next, nlen, resp->body, resp->len);
  if (!batch) {
    transient_failure(f, &(mx_hs_response){.status = 0, .err = MX_ERR_NOMEM,
                                           .retry_after_ms = -1});
    return;
  }
  if (resumable) {
    /* Kept for replay before anyone can fetch past it. A full_state
     * answer is not the batch other streams resume with. */
    f->storing = true;
    f->answer = batch; /* our reference, until stored() */
    mx_replay_put_if_absent(hub->replay, f->feed, FEED_KEY_LEN, f->since,
                            strlen(f->since), batch, ev_now(hub->loop),
                            stored, f);
    return;
  }
  deliver_all(f, batch);
  mx_batch_unref(batch);
}
