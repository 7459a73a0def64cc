/*
 * The hub and its streams: the public API (sync/hub.h), the runner that
 * advances streams from the loop, delivery of batches and answers. The
 * shared fetches are in fetch.c, identities in identity.c and the
 * replication policy in park.c (sync/hub_internal.h explains the parts).
 */
#include "sync/hub.h"

#include <assert.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/http.h"
#include "common/limits.h"
#include "common/log.h"
#include "common/metrics.h"
#include "sync/hub_internal.h"
#include "sync/json_scan.h"

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

bool hub_is_json_object(const char *body, size_t len) {
  return body && len && mx_json_scan_validate(body, len) == 0;
}

/* Whether set_presence (absent: online) is value. */
static bool set_presence_is(const char *query, const char *value) {
  static const char key[] = "set_presence=";
  size_t vlen = strlen(value);
  for (const char *p = query; p && *p;) {
    if (!strncmp(p, key, sizeof(key) - 1)) {
      const char *v = p + sizeof(key) - 1;
      return strncmp(v, value, vlen) == 0 && (v[vlen] == '&' || !v[vlen]);
    }
    p = strchr(p, '&');
    if (p)
      p++;
  }
  return strcmp(value, "online") == 0;
}

void hub_kick(mx_sync_stream *st) {
  if (mx_list_linked(&st->knode) || st->closed)
    return;
  mx_list_push_back(&st->hub->kicks, &st->knode);
  ev_prepare_start(st->hub->loop, &st->hub->runner);
}

/* --- answers -------------------------------------------------------- */

void hub_start_stream(mx_sync_stream *st) {
  if (st->started || st->closed)
    return;
  st->started = true;
  st->ops->on_start(st, 200, NULL, 0, st->ud);
}

void hub_deliver(mx_sync_stream *st, mx_batch *batch) {
  if (st->closed)
    return;
  hub_start_stream(st);
  if (st->closed)
    return;
  mx_buf_reset(&st->position);
  if (mx_buf_append(&st->position, batch->next_batch, batch->nlen)) {
    /* An absurd next_batch: the stream cannot continue. */
    mx_buf b;
    mx_buf_init(&b, 1024);
    if (mx_http_matrix_error(&b, "M_UNKNOWN",
                             "Invalid position from homeserver") == 0)
      st->ops->on_fatal(st, b.data, b.len, st->ud);
    mx_buf_free(&b);
    return;
  }
  st->delivered = true;
  if (st->catching_up && !st->dirty) {
    /* Not known to be the present yet: fetch again once it is taken,
     * after the streams with news (a check, like a safety net: while
     * 1,200 streams connect in a presence storm, these refetches must
     * not hold back the messages). */
    st->dirty = true;
    st->background = true;
    st->reason = MX_SYNC_REASON_SAFETY;
  }
  if (st->woken_at > 0) {
    mx_hist_observe(&mx_stats.wake_to_delivery,
                    ev_now(st->hub->loop) - st->woken_at);
    st->woken_at = 0;
  }
  mx_stats.sse_events_sent++;
  st->ops->on_event(st, batch, st->ud);
}

void hub_answer_error(mx_sync_stream *st, int status, const char *body,
                      size_t len) {
  if (st->closed)
    return;
  if (!st->started) {
    st->started = true; /* the answer is given: no second one */
    st->ops->on_start(st, status, body, len, st->ud);
    return;
  }
  st->ops->on_fatal(st, body, len, st->ud);
}

/* Our own Matrix error for a failure that has no usable upstream body. */
void hub_answer_own_error(mx_sync_stream *st, int status, const char *errcode,
                          const char *error) {
  mx_buf b;
  mx_buf_init(&b, 1024);
  if (mx_http_matrix_error(&b, errcode, error) == 0)
    hub_answer_error(st, status, b.data, b.len);
  mx_buf_free(&b);
}

/* --- the long-poll policy ------------------------------------------- */

static bool always_ready(mx_sync_stream *st) { return true; }
static next_step always_longpoll(mx_sync_stream *st) {
  st->dirty = false;
  return NEXT_LONGPOLL;
}
static void nothing_to_leave(mx_sync_stream *st) {}

static const mx_sync_policy longpoll_policy = {
    .ready = always_ready,
    .next = always_longpoll,
    .closed = nothing_to_leave,
};

/* --- advancing a stream --------------------------------------------- */

/* The replay store's answer for the stream's position. */
static void replay_looked_up(void *ud, int rv, mx_batch *batch) {
  mx_sync_stream *st = ud;
  st->looking = false;
  if (st->closed) {
    ev_prepare_start(st->hub->loop, &st->hub->runner); /* frees it */
    return;
  }
  if (rv == 0) {
    hub_deliver(st, batch);
    return;
  }
  if (!st->started && rv == MX_ERR_UNAVAILABLE) {
    /* A resume the store cannot prove: fetching upstream could hand the
     * client a batch without to-device messages another node already
     * acknowledged. The client retries (maybe on another node). A started
     * stream goes on: its next batch is not delivered before it is in
     * the store, which answers with the first one stored. */
    mx_stats.replay_resumes_refused++;
    MX_LOG_WARN("replay.resume_refused", "reason=store_unavailable");
    hub_answer_own_error(st, 503, "M_UNKNOWN",
                         "The replay store is unavailable; retry later");
    return;
  }
  if (!st->started && rv == MX_ERR_CLOSED) {
    /* The store held this position's batch and it expired: what it
     * carried may be acknowledged upstream. Resume, and say so. */
    st->resume_gap = true;
    mx_stats.replay_resume_gaps++;
    MX_LOG_INFO("replay.resume_gap", "since_len=%zu", st->position.len);
  }
  /* Not there (or the store cannot say): ask the homeserver. The flag
   * keeps this stream from asking the store again for this position. */
  st->replay_missed = true;
  hub_advance(st);
}

/* The stream needs its next batch: from the replay store when another
 * stream of the feed already fetched it, else from the homeserver. */
void hub_advance(mx_sync_stream *st) {
  mx_sync_hub *hub = st->hub;
  if (st->closed || st->delivered || st->fetch || st->parked ||
      st->looking || mx_list_linked(&st->pnode))
    return;
  /* A first batch asked with full_state must come from the homeserver
   * (the endpoint drops full_state on Last-Event-ID reconnects). */
  if (st->position.len && !st->full_state && !st->replay_missed) {
    st->looking = true;
    mx_replay_get(hub->replay, st->feed, FEED_KEY_LEN, st->position.data,
                  st->position.len, ev_now(hub->loop), replay_looked_up, st);
    return;
  }
  st->replay_missed = false;
  if (!hub->policy->ready(st))
    return; /* kicked again once the token's user is known */
  int rv;
  if (!st->started) {
    rv = fetch_attach(st, FETCH_IMMEDIATE, MX_SYNC_REASON_INITIAL);
  } else {
    switch (hub->policy->next(st)) {
    case NEXT_PARK:
    case NEXT_QUEUE:
      return;
    case NEXT_FETCH:
      if (st->woken_at > 0)
        mx_hist_observe(&mx_stats.wake_queue,
                        ev_now(hub->loop) - st->woken_at);
      rv = fetch_attach(st, FETCH_IMMEDIATE, st->reason);
      break;
    case NEXT_LONGPOLL:
    default:
      rv = fetch_attach(st, FETCH_LONGPOLL, MX_SYNC_REASON_LONGPOLL);
      break;
    }
  }
  if (rv)
    hub_answer_own_error(st, 503, "M_UNKNOWN", "Out of memory");
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
  for (int i = 0; i < 1024; i++) {
    mx_list_node *n = mx_list_pop_front(&hub->kicks);
    if (!n)
      break;
    hub_advance(MX_CONTAINER_OF(n, mx_sync_stream, knode));
  }
  /* A closed stream whose replay lookup is in flight is freed after the
   * store answers (replay_looked_up kicks the runner). */
  MX_LIST_FOREACH_SAFE(n, nx, &hub->dead) {
    mx_sync_stream *st = MX_CONTAINER_OF(n, mx_sync_stream, node);
    if (st->looking)
      continue;
    mx_list_remove(n);
    free_stream(st);
  }
  if (mx_list_empty(&hub->kicks))
    ev_prepare_stop(loop, w);
}

static void expire_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_sync_hub *hub = w->data;
  mx_replay_expire(hub->replay, ev_now(loop));
  mx_replay_stats st;
  mx_replay_get_stats(hub->replay, &st);
  mx_stats.replay_bytes = (int64_t)st.bytes;
  mx_stats.replay_entries = (int64_t)st.entries;
}

/* --- the API --------------------------------------------------------- */

mx_sync_hub *mx_sync_hub_new(struct ev_loop *loop,
                             const mx_sync_hub_opts *opts,
                             const mx_hs_api *api) {
  mx_sync_hub *hub = calloc(1, sizeof(*hub));
  if (!hub) {
    if (opts->replay_ops && opts->replay_store)
      opts->replay_ops->free(opts->replay_store);
    return NULL;
  }
  hub->loop = loop;
  hub->opts = *opts;
  if (hub->opts.backoff_base <= 0)
    hub->opts.backoff_base = 0.5;
  if (hub->opts.backoff_max <= 0)
    hub->opts.backoff_max = 30;
  if (hub->opts.start_retry_window == 0)
    hub->opts.start_retry_window = 5;
  if (hub->opts.max_fetches <= 0)
    hub->opts.max_fetches = 16;
  if (hub->opts.background_max_wait <= 0)
    hub->opts.background_max_wait = MX_SYNC_BACKGROUND_MAX_WAIT;
  if (hub->opts.wake_debounce < 0)
    hub->opts.wake_debounce = 0;
  if (hub->opts.presence_interval <= 0)
    hub->opts.presence_interval = 25;
  hub->api = *api;
  hub->policy = hub->opts.replication ? &mx_sync_replication_policy
                                      : &longpoll_policy;
  if (opts->replay_ops) {
    hub->replay = mx_replay_new_store(opts->replay_ops, opts->replay_store);
  } else {
    mx_replay_opts ropts = {.max_bytes = opts->replay_max_bytes,
                            .max_age = opts->replay_max_age};
    hub->replay = mx_replay_new(&ropts);
  }
  if (!hub->replay) {
    free(hub);
    return NULL;
  }
  mx_strmap_init(&hub->fetches);
  mx_list_init(&hub->streams);
  mx_list_init(&hub->dead);
  mx_list_init(&hub->kicks);
  park_init(hub);
  ev_prepare_init(&hub->runner, runner_cb);
  hub->runner.data = hub;
  ev_timer_init(&hub->expire, expire_cb, 10., 10.);
  hub->expire.data = hub;
  ev_timer_start(loop, &hub->expire);
  ev_unref(loop); /* the expiry timer alone must not keep the loop alive */
  return hub;
}

void mx_sync_hub_set_hooks(mx_sync_hub *hub, const mx_sync_hub_hooks *hooks) {
  hub->hooks = hooks ? *hooks : (mx_sync_hub_hooks){0};
}

void mx_sync_hub_free(mx_sync_hub *hub) {
  if (!hub)
    return;
  mx_list_node *n;
  while ((n = mx_list_first(&hub->streams)))
    mx_sync_stream_close(MX_CONTAINER_OF(n, mx_sync_stream, node));
  /* A remote store answers what is in flight as it goes. */
  mx_replay_free(hub->replay);
  hub->replay = NULL;
  runner_cb(hub->loop, &hub->runner, 0);
  ev_prepare_stop(hub->loop, &hub->runner);
  ev_ref(hub->loop);
  ev_timer_stop(hub->loop, &hub->expire);
  park_free(hub);
  mx_strmap_free(&hub->fetches);
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
  mx_buf_init(&st->position, MX_SYNC_MAX_POSITION);
  if (!st->token || !st->query || (p->peer_ip && !st->peer_ip) ||
      (p->user_agent && !st->user_agent) ||
      (p->since && mx_buf_append(&st->position, p->since, strlen(p->since)))) {
    free_stream(st);
    return NULL;
  }
  feed_key(st->token, st->query, st->feed);
  /* Anything but offline keeps the user online (Synapse treats unknown
   * values as online too); unavailable shows them away. */
  st->presence = !set_presence_is(st->query, "offline");
  st->online = st->presence && !set_presence_is(st->query, "unavailable");
  /* A first batch may come from the replay store or from the
   * homeserver's /sync cache (this device asked from this position
   * within its sync_response_cache_duration, e.g. through another node
   * before a failover): in replication mode the stream only parks once an
   * answer shows it is at the present. */
  st->catching_up = true;
  mx_list_push_front(&hub->streams, &st->node);
  hub->nstreams++;
  hub->npresence += st->presence;
  hub_kick(st);
  return st;
}

void mx_sync_stream_taken(mx_sync_stream *st) {
  if (st->closed || !st->delivered)
    return;
  st->delivered = false;
  hub_kick(st);
}

void mx_sync_stream_close(mx_sync_stream *st) {
  if (st->closed)
    return;
  st->closed = true;
  mx_sync_hub *hub = st->hub;
  fetch_detach(st);
  mx_list_remove(&st->fnode); /* from a list being answered */
  mx_list_remove(&st->knode);
  hub->policy->closed(st); /* hands a relayed stream back first */
  mx_list_remove(&st->node);
  hub->nstreams--;
  hub->npresence -= st->presence;
  mx_list_push_back(&hub->dead, &st->node);
  ev_prepare_start(hub->loop, &hub->runner);
}

const char *mx_sync_stream_position(const mx_sync_stream *st) {
  return st->position.len ? st->position.data : "";
}

bool mx_sync_stream_resume_gap(const mx_sync_stream *st) {
  return st->resume_gap;
}

size_t mx_sync_hub_streams(const mx_sync_hub *hub) { return hub->nstreams; }
size_t mx_sync_hub_fetches(const mx_sync_hub *hub) { return hub->nfetches; }
