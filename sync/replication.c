#include "sync/replication.h"

#include <ev.h>
#include <json-c/json.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/limits.h"
#include "common/log.h"
#include "common/metrics.h"
#include "sync/json_scan.h"
#include "sync/mates_loader.h"
#include "sync/repl_proto.h"
#include "sync/room_index.h"
#include "sync/room_mates.h"
#include "sync/wake.h"

struct mx_replication {
  mx_sync_hub *hub;
  struct ev_loop *loop;
  ev_timer unresolved_timer;
  double last_unresolved_wake;
  mx_repl_proto *proto;
  mx_room_index *index;
  mx_room_mates *mates;
  mx_mates_loader *loader;
  mx_wake *wake;
};

/* --- rows and safety nets ------------------------------------------- */

static void wake_user(const char *user, size_t len, void *ud) {
  mx_replication *r = ud;
  if (r->hub)
    mx_sync_hub_wake_user(r->hub, user, len);
}

static void wake_user_background(const char *user, size_t len, void *ud) {
  mx_replication *r = ud;
  if (r->hub)
    mx_sync_hub_wake_user_background(r->hub, user, len);
}

/* Rows about one user that wake everyone sharing a room with them: a
 * presence change of a user in many rooms wakes most streams of a node.
 * They can wait for the streams woken by messages (sync/park.c). */
static bool wakes_in_background(mx_repl_stream s) {
  return s == MX_REPL_PRESENCE || s == MX_REPL_DEVICE_LISTS ||
         s == MX_REPL_PROFILE_UPDATES;
}

/* A device-list or profile row about a user with no stream here who is
 * in none of the rooms whose member lists we hold, while some list is
 * still loading (or failed): they may share one of those rooms with a
 * connected user. Every stream is woken -- at most once per
 * MX_REPL_UNRESOLVED_WAKE_INTERVAL, bursts coalesced: missing a device
 * list change would break encryption for the room-mates. Presence rows
 * are frequent and would wake everyone all the time: in that window they
 * reach room-mates with their next batch (docs/replication.md). */
static void unresolved(mx_repl_stream s, const char *user, size_t len,
                       void *ud) {
  mx_replication *r = ud;
  if (!r->hub || !r->loop || s == MX_REPL_PRESENCE)
    return;
  if (!ev_is_active(&r->unresolved_timer)) {
    double now = ev_now(r->loop);
    double wait = r->last_unresolved_wake + MX_REPL_UNRESOLVED_WAKE_INTERVAL -
                  now;
    ev_timer_set(&r->unresolved_timer, wait > 0 ? wait : 0., 0.);
    ev_timer_start(r->loop, &r->unresolved_timer);
  }
}

static void unresolved_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_replication *r = w->data;
  r->last_unresolved_wake = ev_now(loop);
  if (r->hub)
    mx_sync_hub_wake_all(r->hub, MX_SYNC_REASON_WAKE);
}

static void on_row(const mx_repl_row *row, void *ud) {
  mx_replication *r = ud;
  mx_wake_cb cb = {.wake = wakes_in_background(row->stream)
                              ? wake_user_background
                              : wake_user,
                   .unresolved = unresolved,
                   .ud = r};
  int rv = mx_wake_row(r->wake, row, &cb);
  if (r->loader && row->stream == MX_REPL_EVENTS)
    mx_mates_loader_publish(r->loader); /* membership rows */
  if (rv == MX_ERR_INVALID || rv == MX_ERR_NOTFOUND) {
    /* A row we cannot read could concern anyone. */
    MX_LOG_WARN("replication.bad_row", "stream=%s",
                mx_repl_stream_name(row->stream));
    if (r->hub)
      mx_sync_hub_wake_all(r->hub, MX_SYNC_REASON_SAFETY);
  }
}

static void on_safety_net(int scope, mx_repl_reason reason, void *ud) {
  mx_replication *r = ud;
  if (scope != MX_REPL_SCOPE_ALL &&
      !mx_wake_stream_matters((mx_repl_stream)scope))
    return; /* a gap in a stream that wakes nobody (caches, backfill) */
  MX_LOG_INFO("replication.safety_net", "scope=%s reason=%s",
              scope == MX_REPL_SCOPE_ALL
                  ? "all"
                  : mx_repl_stream_name((mx_repl_stream)scope),
              mx_repl_reason_name(reason));
  /* Membership rows may be among the missed ones. */
  if (r->loader &&
      (scope == MX_REPL_SCOPE_ALL || scope == MX_REPL_EVENTS))
    mx_mates_loader_reload_all(r->loader);
  if (r->hub)
    mx_sync_hub_wake_all(r->hub, MX_SYNC_REASON_SAFETY);
}

void mx_replication_feed(mx_replication *r, const char *line, size_t len) {
  mx_repl_proto_feed(r->proto, line, len);
}

void mx_replication_up(mx_replication *r) {
  /* Positions are kept: a writer that reconnects after us announces its
   * positions, and what moved while it was away shows as a gap. Rows
   * published while we were away are covered by the safety net below. */
  mx_repl_proto_drop_batches(r->proto);
  mx_wake_reset(r->wake);
  if (r->hub)
    mx_sync_hub_set_feed_up(r->hub, true);
}

void mx_replication_down(mx_replication *r) {
  if (r->hub)
    mx_sync_hub_set_feed_up(r->hub, false);
}

/* --- room index hooks ----------------------------------------------- */

/* The index could not learn a user's rooms (no memory, or a batch it
 * could not read): wakes for those rooms may be missed, so every stream
 * fetches once, and the next batches teach the index again. */
static void index_failed(mx_replication *r, const char *what) {
  MX_LOG_WARN("replication.index_failed", "from=%s", what);
  mx_sync_hub_wake_all(r->hub, MX_SYNC_REASON_SAFETY);
}

static void user_open(const char *user, size_t len, const char *rooms,
                      size_t rlen, void *ud) {
  mx_replication *r = ud;
  if (mx_room_index_user_open(r->index, user, len)) {
    index_failed(r, "user_open");
    return;
  }
  /* {"joined_rooms": ["!a", ...]}: small, so a DOM parse is fine. */
  json_tokener *tok = json_tokener_new();
  json_object *doc = tok ? json_tokener_parse_ex(tok, rooms, (int)rlen) : NULL;
  json_object *list;
  if (doc && json_object_object_get_ex(doc, "joined_rooms", &list) &&
      json_object_is_type(list, json_type_array)) {
    size_t n = json_object_array_length(list);
    mx_ri_key *keys = calloc(n ? n : 1, sizeof(*keys));
    size_t k = 0;
    for (size_t i = 0; keys && i < n; i++) {
      json_object *e = json_object_array_get_idx(list, i);
      if (json_object_is_type(e, json_type_string)) {
        keys[k].p = json_object_get_string(e);
        keys[k].len = (size_t)json_object_get_string_len(e);
        k++;
      }
    }
    if (!keys || mx_room_index_set_rooms(r->index, user, len, keys, k))
      index_failed(r, "joined_rooms");
    free(keys);
  }
  json_object_put(doc);
  json_tokener_free(tok);
}

static void user_close(const char *user, size_t len, void *ud) {
  mx_replication *r = ud;
  mx_room_index_user_close(r->index, user, len);
}

typedef struct member_ctx {
  mx_replication *r;
  const char *user;
  size_t ulen;
  bool join;
  bool failed; /* a join could not be recorded (no memory) */
} member_ctx;

static int room_member(const mx_json_span *key, const mx_json_span *value,
                       void *ud) {
  member_ctx *m = ud;
  const char *room;
  size_t rlen;
  bool esc;
  if (mx_json_scan_string(key, &room, &rlen, &esc) || esc)
    return 0;
  if (m->join) {
    if (mx_room_index_join(m->r->index, m->user, m->ulen, room, rlen) < 0)
      m->failed = true;
  } else
    mx_room_index_leave(m->r->index, m->user, m->ulen, room, rlen);
  return 0;
}

static void batch(const char *user, size_t len, const char *body, size_t blen,
                  bool initial, void *ud) {
  mx_replication *r = ud;
  static const char *const join_path[] = {"rooms", "join"};
  static const char *const leave_path[] = {"rooms", "leave"};
  member_ctx m = {.r = r, .user = user, .ulen = len};
  mx_json_span span;
  if (mx_json_scan_find(body, blen, join_path, 2, &span) == 0 &&
      span.type == MX_JSON_OBJECT) {
    m.join = true;
    if (mx_json_scan_members(span.p, span.len, room_member, &m) < 0)
      m.failed = true;
  }
  if (mx_json_scan_find(body, blen, leave_path, 2, &span) == 0 &&
      span.type == MX_JSON_OBJECT) {
    m.join = false;
    if (mx_json_scan_members(span.p, span.len, room_member, &m) < 0)
      m.failed = true;
  }
  if (m.failed)
    index_failed(r, "batch");
}

/* --- life cycle ----------------------------------------------------- */

mx_replication *mx_replication_new(mx_sync_hub *hub, struct ev_loop *loop) {
  mx_replication *r = calloc(1, sizeof(*r));
  if (!r)
    return NULL;
  r->hub = hub;
  r->loop = loop;
  ev_init(&r->unresolved_timer, unresolved_cb);
  r->unresolved_timer.data = r;
  mx_repl_callbacks cb = {.on_row = on_row, .on_safety_net = on_safety_net,
                          .ud = r};
  r->proto = mx_repl_proto_new(&cb, NULL);
  r->index = mx_room_index_new();
  r->mates = mx_room_mates_new(0);
  r->wake = r->index ? mx_wake_new(r->index, NULL) : NULL;
  if (!r->proto || !r->index || !r->mates || !r->wake) {
    mx_replication_free(r);
    return NULL;
  }
  mx_wake_set_room_mates(r->wake, r->mates);
  /* Without a loader (no memory) the room mates stay empty and complete,
   * and strangers' rows reach room-mates with the next batch. */
  r->loader = mx_mates_loader_new(loop, hub, r->index, r->mates);
  if (r->loader)
    mx_room_index_set_room_hook(r->index, mx_mates_loader_room_hook,
                                r->loader);
  mx_sync_hub_hooks hooks = {.user_open = user_open,
                             .user_close = user_close,
                             .batch = batch,
                             .ud = r};
  mx_sync_hub_set_hooks(hub, &hooks);
  return r;
}

void mx_replication_free(mx_replication *r) {
  if (!r)
    return;
  if (r->hub)
    mx_sync_hub_set_hooks(r->hub, NULL);
  ev_timer_stop(r->loop, &r->unresolved_timer);
  if (r->index)
    mx_room_index_set_room_hook(r->index, NULL, NULL);
  mx_mates_loader_free(r->loader);
  mx_wake_free(r->wake);
  mx_room_index_free(r->index);
  mx_room_mates_free(r->mates);
  mx_repl_proto_free(r->proto);
  free(r);
}
