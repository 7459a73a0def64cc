/*
 * The replication policy: between batches a stream is parked (no request
 * upstream) until the replication adapter names its user
 * (mx_sync_hub_wake_user) or runs a safety net (mx_sync_hub_wake_all).
 * Woken streams fetch with timeout=0, at most max_fetches at a time,
 * after a short debounce that merges a burst (message, receipt, typing).
 * While the feed is down streams long-poll (if the fallback is on).
 * Parked streams that show presence get a timeout=0 sync every
 * presence_interval, which keeps their user online as long-polling would.
 *
 * Woken streams wait for a slot in one of two queues. Urgent: something
 * happened in one of the stream's rooms or to its user (a message, a
 * receipt, typing, a to-device message). Background: what wakes many
 * streams at once and can wait a little -- a room-mate's presence, device
 * list or profile, a safety net, a keep-online sync. One presence change
 * of a user in many rooms wakes every stream that shares a room with
 * them; in a FIFO the messages behind that flood waited for all of it
 * (docs/benchmarks.md, "Where delivery time goes"). Urgent wakes are
 * served first; a background wake waits MX_SYNC_BACKGROUND_DELAY (a
 * message row following it makes it urgent: one fetch, not two); once it
 * waited background_max_wait it gets one slot in MX_SYNC_BACKGROUND_SHARE
 * while urgent wakes queue.
 */
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/limits.h"
#include "common/metrics.h"
#include "sync/hub_internal.h"

/* The next queued stream to give a slot to, or NULL when none may take
 * one yet (*wait: seconds until a background wake may, or 0). */
static mx_sync_stream *pending_next(mx_sync_hub *hub, double now,
                                    double *wait) {
  *wait = 0;
  mx_list_node *low = mx_list_first(&hub->pending_background);
  mx_sync_stream *bg = low ? MX_CONTAINER_OF(low, mx_sync_stream, pnode)
                           : NULL;
  mx_list_node *n = mx_list_first(&hub->pending);
  if (n) {
    /* A background wake that waited long enough gets one slot in
     * MX_SYNC_BACKGROUND_SHARE while urgent ones queue: presence keeps
     * moving however busy the rooms are, and the messages keep the
     * rest (an absolute priority for old background wakes would hand
     * every slot to a flood of them). */
    if (bg && now - bg->queued_at >= hub->opts.background_max_wait &&
        ++hub->urgent_streak >= MX_SYNC_BACKGROUND_SHARE) {
      hub->urgent_streak = 0;
      return bg;
    }
    return MX_CONTAINER_OF(n, mx_sync_stream, pnode);
  }
  if (!bg)
    return NULL;
  double ready = bg->queued_at + MX_SYNC_BACKGROUND_DELAY;
  if (now >= ready)
    return bg;
  *wait = ready - now;
  return NULL;
}

static void pending_schedule(mx_sync_hub *hub, double delay) {
  if (ev_is_active(&hub->debounce)) {
    if (ev_timer_remaining(hub->loop, &hub->debounce) <= delay)
      return;
    ev_timer_stop(hub->loop, &hub->debounce);
  }
  ev_timer_set(&hub->debounce, delay, 0.);
  ev_timer_start(hub->loop, &hub->debounce);
}

static void pending_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_sync_hub *hub = w->data;
  size_t cap = (size_t)hub->opts.max_fetches;
  double wait = 0;
  while (hub->nimmediate < cap) {
    mx_sync_stream *st = pending_next(hub, ev_now(loop), &wait);
    if (!st)
      break;
    mx_list_remove(&st->pnode);
    hub->dispatching = st; /* its turn: it takes the slot */
    hub_advance(st);
    hub->dispatching = NULL;
  }
  if (wait > 0)
    pending_schedule(hub, wait);
}

/* A woken fetch finished: a slot for a queued stream. */
void park_slot_freed(mx_sync_hub *hub) {
  if (!mx_list_empty(&hub->pending) ||
      !mx_list_empty(&hub->pending_background))
    pending_schedule(hub, 0.);
}

/* Queues a woken stream for a slot, in the queue its wake asks for. */
static void pending_push(mx_sync_stream *st) {
  mx_sync_hub *hub = st->hub;
  st->queued_at = ev_now(hub->loop);
  if (st->background) {
    mx_list_push_back(&hub->pending_background, &st->pnode);
    pending_schedule(hub, MX_SYNC_BACKGROUND_DELAY);
  } else {
    mx_list_push_back(&hub->pending, &st->pnode);
    /* A short debounce merges a burst (message, receipt, typing). */
    pending_schedule(hub, hub->opts.wake_debounce);
  }
}

static void stream_wake(mx_sync_stream *st, int reason, bool background) {
  mx_sync_hub *hub = st->hub;
  if (st->closed)
    return;
  if (background)
    mx_stats.wakes_background++;
  else
    mx_stats.wakes_urgent++;
  /* The wake-to-delivery histograms time what a user waits for: urgent
   * wakes only. */
  if (!background && st->woken_at == 0)
    st->woken_at = ev_now(hub->loop);
  if (reason == MX_SYNC_REASON_PRESENCE)
    st->presence_due = true; /* even if a wake's fetch takes it along */
  if (!st->dirty || st->reason == MX_SYNC_REASON_PRESENCE)
    st->reason = reason;
  /* One urgent wake makes the next fetch urgent. */
  bool in_background_queue = mx_list_linked(&st->pnode) && st->background;
  st->background = st->dirty ? st->background && background : background;
  st->dirty = true;
  if (st->parked) {
    st->parked = false;
    pending_push(st);
  } else if (in_background_queue && !st->background) {
    mx_list_remove(&st->pnode); /* to the urgent queue */
    pending_push(st);
  }
  /* Otherwise in flight or not taken yet: it fetches again when done. */
}

static void wake_user(mx_sync_hub *hub, const char *user, size_t len,
                      bool background) {
  user_entry *u = mx_strmap_get(&hub->users, user, len);
  if (!u)
    return;
  MX_LIST_FOREACH_SAFE(n, nx, &u->streams)
    stream_wake(MX_CONTAINER_OF(n, mx_sync_stream, unode),
                MX_SYNC_REASON_WAKE, background);
}

void mx_sync_hub_wake_user(mx_sync_hub *hub, const char *user, size_t len) {
  wake_user(hub, user, len, false);
}

void mx_sync_hub_wake_user_background(mx_sync_hub *hub, const char *user,
                                      size_t len) {
  wake_user(hub, user, len, true);
}

int mx_sync_hub_presence_keepalive(mx_sync_hub *hub, const char *user,
                                   size_t len) {
  user_entry *u = mx_strmap_get(&hub->users, user, len);
  if (!u)
    return MX_ERR_NOTFOUND;
  MX_LIST_FOREACH_SAFE(n, nx, &u->streams) {
    mx_sync_stream *st = MX_CONTAINER_OF(n, mx_sync_stream, unode);
    if (st->presence && st->started && !st->closed) {
      stream_wake(st, MX_SYNC_REASON_PRESENCE, true);
      return 0;
    }
  }
  return MX_ERR_NOTFOUND;
}

void mx_sync_hub_wake_all(mx_sync_hub *hub, int reason) {
  MX_LIST_FOREACH_SAFE(n, nx, &hub->streams) {
    mx_sync_stream *st = MX_CONTAINER_OF(n, mx_sync_stream, node);
    if (st->started)
      stream_wake(st, reason, true);
  }
}

void mx_sync_hub_set_feed_up(mx_sync_hub *hub, bool up) {
  if (!hub->opts.replication || hub->feed_up == up)
    return;
  hub->feed_up = up;
  MX_LIST_FOREACH_SAFE(n, nx, &hub->streams) {
    mx_sync_stream *st = MX_CONTAINER_OF(n, mx_sync_stream, node);
    if (!st->started || st->closed)
      continue;
    if (up && st->fetch && st->fetch->kind == FETCH_LONGPOLL) {
      /* Back to parking: leave the long-poll, fetch what was missed. */
      fetch_detach(st);
      st->dirty = true;
      st->reason = MX_SYNC_REASON_SAFETY;
      hub_kick(st);
    } else if (!up && st->parked && hub->opts.longpoll_fallback) {
      st->parked = false;
      hub_kick(st); /* long-polls from now on */
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
   * (sync_online_timeout) unless it syncs now and then. Checked every
   * interval/5: wake from 4/5 of the interval on, so the sync lands
   * within the interval (Synapse's 30 s sync_online_timeout keeps its
   * margin) whatever the debounce and the tick phase. */
  double due = hub->opts.presence_interval * 4 / 5;
  const mx_sync_presence_ops *p = &hub->presence_ops;
  bool relay_up = p->up && p->up(p->ud);
  /* Nothing to keep online: no walk over every stream (with many idle
   * streams it showed in the heartbeat profile). */
  if (hub->npresence == 0 || (relay_up && hub->nrelayed == hub->npresence))
    return;
  MX_LIST_FOREACH_SAFE(n, nx, &hub->streams) {
    mx_sync_stream *st = MX_CONTAINER_OF(n, mx_sync_stream, node);
    if (st->parked && st->presence && !(st->relayed && relay_up) &&
        now - st->last_fetch >= due)
      stream_wake(st, MX_SYNC_REASON_PRESENCE, true);
  }
}

/* --- the policy ------------------------------------------------------ */

/* Whether a started stream waits for wakes rather than long-polling. */
static bool parks(const mx_sync_stream *st) {
  const mx_sync_hub *hub = st->hub;
  bool known = st->id && st->id->user && mx_list_linked(&st->unode);
  if (hub->feed_up)
    return known || !hub->opts.longpoll_fallback;
  return !hub->opts.longpoll_fallback;
}

static next_step replication_next(mx_sync_stream *st) {
  mx_sync_hub *hub = st->hub;
  if (mx_list_linked(&st->pnode))
    return NEXT_QUEUE; /* already waiting for a slot */
  if (!parks(st)) {
    st->dirty = false;
    return NEXT_LONGPOLL;
  }
  if (!st->dirty) {
    st->parked = true;
    return NEXT_PARK;
  }
  /* Every woken fetch counts against the cap, however it was started (a
   * safety net, a refetch after taken): wait for a slot; a finishing
   * fetch runs the queue. A free slot is not taken past streams queued
   * before it (urgent ones, or any for a background refetch). */
  bool queued_before = hub->dispatching != st &&
                       (!mx_list_empty(&hub->pending) ||
                        (st->background &&
                         !mx_list_empty(&hub->pending_background)));
  if (hub->nimmediate >= (size_t)hub->opts.max_fetches || queued_before) {
    pending_push(st);
    return NEXT_QUEUE;
  }
  st->dirty = false;
  return NEXT_FETCH;
}

static void replication_closed(mx_sync_stream *st) {
  mx_list_remove(&st->pnode);
  identity_unref(st);
}

const mx_sync_policy mx_sync_replication_policy = {
    .ready = identity_ready,
    .next = replication_next,
    .closed = replication_closed,
};

void park_init(mx_sync_hub *hub) {
  mx_strmap_init(&hub->identities);
  mx_strmap_init(&hub->users);
  mx_list_init(&hub->pending);
  mx_list_init(&hub->pending_background);
  ev_init(&hub->debounce, pending_cb);
  hub->debounce.data = hub;
  ev_init(&hub->presence, presence_cb);
  hub->presence.data = hub;
  if (hub->opts.replication) {
    double every = hub->opts.presence_interval / 5;
    ev_timer_set(&hub->presence, every, every);
    ev_timer_start(hub->loop, &hub->presence);
    ev_unref(hub->loop);
  }
}

void park_free(mx_sync_hub *hub) {
  if (ev_is_active(&hub->presence)) {
    ev_ref(hub->loop);
    ev_timer_stop(hub->loop, &hub->presence);
  }
  ev_timer_stop(hub->loop, &hub->debounce);
  mx_strmap_free(&hub->identities); /* emptied as the streams closed */
  mx_strmap_free(&hub->users);
}
