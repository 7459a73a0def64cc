#include "sync/wake.h"

#include <json-c/json.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/strmap.h"

#define MALLOC_OVERHEAD 16
#define STRMAP_ENT(len) (4 * sizeof(void *) + (len) + 1 + MALLOC_OVERHEAD)

/* The last presence state of a user, as far as should_notify() cares. */
typedef struct pres_state {
  uint64_t state;         /* hash of the state string */
  uint64_t status;        /* hash of status_msg */
  int64_t last_active_ts;
  int64_t last_federation_update_ts;
  int64_t last_user_sync_ts;
  bool has_status;        /* status_msg is not null */
  bool currently_active;
  bool online;
} pres_state;

struct mx_wake {
  mx_room_index *ix;
  mx_room_mates *mates; /* may be NULL */
  mx_wake_opts opts;
  json_tokener *tok;
  mx_strmap presence; /* user id -> pres_state */
  size_t presence_key_bytes;
  mx_wake_stats stats;
};

/* One row being applied. */
typedef struct wake_ctx {
  mx_wake *w;
  const mx_wake_cb *cb;
  uint64_t visit;
  size_t n; /* users reported */
} wake_ctx;

mx_wake *mx_wake_new(mx_room_index *ix, const mx_wake_opts *opts) {
  mx_wake *w = calloc(1, sizeof(*w));
  if (!w)
    return NULL;
  w->ix = ix;
  if (opts)
    w->opts = *opts;
  if (w->opts.last_active_granularity_ms <= 0)
    w->opts.last_active_granularity_ms = MX_WAKE_LAST_ACTIVE_GRANULARITY;
  if (!w->opts.presence_cache_max)
    w->opts.presence_cache_max = MX_WAKE_PRESENCE_CACHE_MAX;
  /* Rows are validated with depth MX_REPL_JSON_MAX_DEPTH already. */
  w->tok = json_tokener_new_ex(MX_REPL_JSON_MAX_DEPTH + 1);
  if (!w->tok) {
    free(w);
    return NULL;
  }
  mx_strmap_init(&w->presence);
  return w;
}

static int free_pres(const char *k, size_t len, void *v, void *ud) {
  free(v);
  return 0;
}

void mx_wake_reset(mx_wake *w) {
  mx_strmap_each(&w->presence, free_pres, NULL);
  mx_strmap_free(&w->presence);
  w->presence_key_bytes = 0;
}

void mx_wake_free(mx_wake *w) {
  if (!w)
    return;
  mx_wake_reset(w);
  json_tokener_free(w->tok);
  free(w);
}

void mx_wake_set_room_mates(mx_wake *w, mx_room_mates *rm) { w->mates = rm; }

void mx_wake_stats_get(const mx_wake *w, mx_wake_stats *out) {
  *out = w->stats;
  out->presence_cached = w->presence.count;
  out->presence_bytes =
      w->presence_key_bytes + w->presence.nslots * sizeof(void *) +
      w->presence.count * (sizeof(pres_state) + MALLOC_OVERHEAD);
}

/* ---------------------------------------------------------------------
 * Row fields */

static json_object *field(json_object *arr, size_t i) {
  if (!json_object_is_type(arr, json_type_array) ||
      i >= json_object_array_length(arr))
    return NULL;
  return json_object_array_get_idx(arr, i);
}

/* A string field: true and the bytes, or false (absent, other type). */
static bool str_field(json_object *arr, size_t i, const char **s,
                      size_t *len) {
  json_object *o = field(arr, i);
  if (!json_object_is_type(o, json_type_string))
    return false;
  *s = json_object_get_string(o);
  *len = (size_t)json_object_get_string_len(o);
  return true;
}

/* A boolean: JSON true/false, or 0/1 (SQLite has no boolean type). Absent
 * or null counts as false; anything else is invalid. */
static bool bool_field(json_object *arr, size_t i, bool *out) {
  json_object *o = field(arr, i);
  *out = false;
  if (!o)
    return true;
  if (json_object_is_type(o, json_type_boolean)) {
    *out = json_object_get_boolean(o);
    return true;
  }
  if (json_object_is_type(o, json_type_int)) {
    *out = json_object_get_int64(o) != 0;
    return true;
  }
  return false;
}

/* An integer (timestamps): absent or null is 0; a float is truncated. */
static bool int_field(json_object *arr, size_t i, int64_t *out) {
  json_object *o = field(arr, i);
  *out = 0;
  if (!o)
    return true;
  if (json_object_is_type(o, json_type_int) ||
      json_object_is_type(o, json_type_double)) {
    *out = json_object_get_int64(o);
    return true;
  }
  return false;
}

static bool streq(const char *s, size_t len, const char *lit) {
  return strlen(lit) == len && memcmp(s, lit, len) == 0;
}

/* ---------------------------------------------------------------------
 * Reporting */

static void on_user(const char *user, size_t len, void *ud) {
  wake_ctx *c = ud;
  c->n++;
  c->cb->wake(user, len, c->cb->ud);
}

static void wake_user(wake_ctx *c, const char *user, size_t len) {
  mx_room_index_visit_user(c->w->ix, c->visit, user, len, on_user, c);
}

static void wake_room(wake_ctx *c, const char *room, size_t len) {
  mx_room_index_visit_room(c->w->ix, c->visit, room, len, on_user, c);
}

static void on_mates_room(const char *room, size_t len, void *ud) {
  wake_room(ud, room, len);
}

/* The user and everyone sharing a room with them. */
static void wake_sharers(wake_ctx *c, mx_repl_stream s, const char *user,
                         size_t len) {
  mx_wake *w = c->w;
  if (mx_room_index_has_user(w->ix, user, len)) {
    wake_user(c, user, len);
    mx_room_index_visit_sharers(w->ix, c->visit, user, len, on_user, c);
    return;
  }
  if (w->mates) {
    /* No stream here: the tracked rooms they are in, if any. While some
     * list is still loading they may be in one more of those rooms. */
    mx_room_mates_each_room(w->mates, user, len, on_mates_room, c);
    if (mx_room_mates_complete(w->mates))
      return;
  }
  w->stats.unresolved++;
  if (c->cb->unresolved)
    c->cb->unresolved(s, user, len, c->cb->ud);
}

/* ---------------------------------------------------------------------
 * Streams */

/* events: ["ev", [event_id, room_id, type, state_key, redacts, relates_to,
 * membership, rejected, outlier]] (streams/events.py EventsStreamEventRow;
 * older Synapses sent fewer fields, so the tail is optional). */
static int on_events(wake_ctx *c, json_object *row) {
  const char *kind, *room, *type, *sk = NULL, *ms = NULL;
  size_t klen, rlen, tlen, sklen = 0, mslen = 0;
  json_object *data = field(row, 1);
  if (!str_field(row, 0, &kind, &klen) ||
      !json_object_is_type(data, json_type_array))
    return MX_ERR_INVALID;
  if (streq(kind, klen, "state") || streq(kind, klen, "state-all")) {
    /* Current-state bookkeeping; Synapse only pokes replication. */
    return str_field(data, 0, &room, &rlen) ? 0 : MX_ERR_INVALID;
  }
  if (!streq(kind, klen, "ev"))
    return MX_ERR_INVALID;
  bool rejected, outlier;
  if (!str_field(data, 1, &room, &rlen) || !str_field(data, 2, &type, &tlen) ||
      !bool_field(data, 7, &rejected) || !bool_field(data, 8, &outlier))
    return MX_ERR_INVALID;
  if (!str_field(data, 3, &sk, &sklen) && field(data, 3))
    return MX_ERR_INVALID;
  if (!str_field(data, 6, &ms, &mslen) && field(data, 6))
    return MX_ERR_INVALID;
  if (rejected)
    return 0; /* client.py: "if row.data.rejected: continue" */
  wake_room(c, room, rlen);
  if (!streq(type, tlen, "m.room.member") || !sk || sklen == 0)
    return 0;
  /* The target of a membership change hears of it (remote invites are
   * outliers and still wake the invitee, as in Synapse). */
  wake_user(c, sk, sklen);
  if (outlier || !ms)
    return 0;
  mx_room_mates *mates = c->w->mates;
  if (streq(ms, mslen, "join")) {
    if (mx_room_index_join(c->w->ix, sk, sklen, room, rlen) < 0)
      return MX_ERR_NOMEM;
    /* The room mates mark the room incomplete when full: no error. */
    if (mates)
      mx_room_mates_join(mates, sk, sklen, room, rlen);
  } else if (streq(ms, mslen, "leave") || streq(ms, mslen, "ban")) {
    mx_room_index_leave(c->w->ix, sk, sklen, room, rlen);
    if (mates)
      mx_room_mates_leave(mates, sk, sklen, room, rlen);
  }
  return 0;
}

/* ReceiptsStreamRow: [room_id, receipt_type, user_id, event_id, thread_id,
 * data]. A private receipt only shows in its owner's sync. */
static int on_receipts(wake_ctx *c, json_object *row) {
  const char *room, *rtype, *user;
  size_t rlen, tlen, ulen;
  if (!str_field(row, 0, &room, &rlen) || !str_field(row, 1, &rtype, &tlen) ||
      !str_field(row, 2, &user, &ulen))
    return MX_ERR_INVALID;
  if (streq(rtype, tlen, "m.read.private"))
    wake_user(c, user, ulen);
  else
    wake_room(c, room, rlen);
  return 0;
}

/* A row whose first field is a room id. */
static int on_room_row(wake_ctx *c, json_object *row) {
  const char *room;
  size_t rlen;
  if (!str_field(row, 0, &room, &rlen))
    return MX_ERR_INVALID;
  wake_room(c, room, rlen);
  return 0;
}

/* A row whose first field is a user id. */
static int on_user_row(wake_ctx *c, json_object *row) {
  const char *user;
  size_t ulen;
  if (!str_field(row, 0, &user, &ulen))
    return MX_ERR_INVALID;
  wake_user(c, user, ulen);
  return 0;
}

/* ToDeviceStreamRow: [entity]; a user id, or a server to send to. */
static int on_to_device(wake_ctx *c, json_object *row) {
  const char *e;
  size_t elen;
  if (!str_field(row, 0, &e, &elen))
    return MX_ERR_INVALID;
  if (elen > 0 && e[0] == '@')
    wake_user(c, e, elen);
  return 0;
}

/* DeviceListsStreamRow: [user_id, is_signature, hosts_calculated]. */
static int on_device_lists(wake_ctx *c, json_object *row) {
  const char *user;
  size_t ulen;
  bool sig, hosts;
  if (!str_field(row, 0, &user, &ulen) || !bool_field(row, 1, &sig) ||
      !bool_field(row, 2, &hosts))
    return MX_ERR_INVALID;
  if (hosts)
    return 0; /* outbound federation bookkeeping */
  if (sig)
    wake_user(c, user, ulen); /* notify_user_signature_update: the signer */
  else
    wake_sharers(c, MX_REPL_DEVICE_LISTS, user, ulen);
  return 0;
}

/* ProfileUpdatesStreamRow: [user_id, action, affected_fields]. */
static int on_profile(wake_ctx *c, json_object *row) {
  const char *user;
  size_t ulen;
  if (!str_field(row, 0, &user, &ulen))
    return MX_ERR_INVALID;
  wake_sharers(c, MX_REPL_PROFILE_UPDATES, user, ulen);
  return 0;
}

/* handlers/presence.py should_notify(), old state known. */
static bool should_notify(const pres_state *o, const pres_state *n,
                          int64_t gran) {
  if (memcmp(o, n, sizeof(*o)) == 0)
    return false;
  if (o->has_status != n->has_status || o->status != n->status)
    return true;
  if (o->state != n->state)
    return true;
  if (o->online) {
    if (o->currently_active != n->currently_active)
      return true;
    return n->last_active_ts - o->last_active_ts > gran &&
           !n->currently_active;
  }
  return n->last_active_ts - o->last_active_ts > gran;
}

/* PresenceStreamRow: [user_id, state, last_active_ts,
 * last_federation_update_ts, last_user_sync_ts, status_msg,
 * currently_active]. The writer also publishes flushes of changes nobody
 * is told about; Synapse's workers filter them with should_notify(). */
static int on_presence(wake_ctx *c, json_object *row) {
  mx_wake *w = c->w;
  const char *user, *state, *status = NULL;
  size_t ulen, slen, stlen = 0;
  pres_state n;
  memset(&n, 0, sizeof(n)); /* compared with memcmp: no stray padding */
  if (!str_field(row, 0, &user, &ulen) || !str_field(row, 1, &state, &slen) ||
      !int_field(row, 2, &n.last_active_ts) ||
      !int_field(row, 3, &n.last_federation_update_ts) ||
      !int_field(row, 4, &n.last_user_sync_ts) ||
      !bool_field(row, 6, &n.currently_active))
    return MX_ERR_INVALID;
  if (str_field(row, 5, &status, &stlen)) {
    n.has_status = true;
    n.status = mx_hash(status, stlen);
  } else if (field(row, 5)) {
    return MX_ERR_INVALID;
  }
  n.state = mx_hash(state, slen);
  n.online = streq(state, slen, "online");

  pres_state *old = mx_strmap_get(&w->presence, user, ulen);
  if (old) {
    bool notify = should_notify(old, &n, w->opts.last_active_granularity_ms);
    memcpy(old, &n, sizeof(n)); /* padding included, for memcmp */
    if (!notify) {
      w->stats.presence_filtered++;
      return 0;
    }
  } else {
    if (w->presence.count >= w->opts.presence_cache_max) {
      mx_wake_reset(w);
      w->stats.presence_cache_clears++;
    }
    pres_state *ps = malloc(sizeof(*ps));
    if (ps) {
      memcpy(ps, &n, sizeof(n));
      if (mx_strmap_put(&w->presence, user, ulen, ps, NULL) == 0)
        w->presence_key_bytes += STRMAP_ENT(ulen);
      else
        free(ps); /* not remembered: the next change notifies again */
    }
  }
  wake_sharers(c, MX_REPL_PRESENCE, user, ulen);
  return 0;
}

bool mx_wake_stream_matters(mx_repl_stream s) {
  switch (s) {
  case MX_REPL_EVENTS:
  case MX_REPL_TYPING:
  case MX_REPL_UN_PARTIAL_STATED_ROOM:
  case MX_REPL_STICKY_EVENTS:
  case MX_REPL_RECEIPTS:
  case MX_REPL_TO_DEVICE:
  case MX_REPL_ACCOUNT_DATA:
  case MX_REPL_PUSH_RULES:
  case MX_REPL_THREAD_SUBSCRIPTIONS:
  case MX_REPL_PRESENCE:
  case MX_REPL_DEVICE_LISTS:
  case MX_REPL_PROFILE_UPDATES:
    return true;
  default:
    return false;
  }
}

int mx_wake_row(mx_wake *w, const mx_repl_row *row, const mx_wake_cb *cb) {
  int (*rule)(wake_ctx *, json_object *) = NULL;
  switch (row->stream) {
  case MX_REPL_EVENTS:
    rule = on_events;
    break;
  case MX_REPL_TYPING:
  case MX_REPL_UN_PARTIAL_STATED_ROOM:
  case MX_REPL_STICKY_EVENTS:
    rule = on_room_row;
    break;
  case MX_REPL_RECEIPTS:
    rule = on_receipts;
    break;
  case MX_REPL_TO_DEVICE:
    rule = on_to_device;
    break;
  case MX_REPL_ACCOUNT_DATA:
  case MX_REPL_PUSH_RULES:
  case MX_REPL_THREAD_SUBSCRIPTIONS:
    rule = on_user_row;
    break;
  case MX_REPL_PRESENCE:
    rule = on_presence;
    break;
  case MX_REPL_DEVICE_LISTS:
    rule = on_device_lists;
    break;
  case MX_REPL_PROFILE_UPDATES:
    rule = on_profile;
    break;
  case MX_REPL_BACKFILL:
  case MX_REPL_PRESENCE_FEDERATION:
  case MX_REPL_PUSHERS:
  case MX_REPL_CACHES:
  case MX_REPL_FEDERATION:
  case MX_REPL_UN_PARTIAL_STATED_EVENT:
  case MX_REPL_QUARANTINED_MEDIA:
    /* Nothing a /sync shows; do not even parse (caches rows may carry
     * secrets in their keys). */
    w->stats.rows++;
    return 0;
  default:
    return MX_ERR_NOTFOUND;
  }
  w->stats.rows++;
  if (row->json_len > MX_WAKE_MAX_ROW) {
    w->stats.invalid++;
    return MX_ERR_INVALID;
  }
  json_tokener_reset(w->tok);
  json_object *o = json_tokener_parse_ex(w->tok, row->json, (int)row->json_len);
  if (!o || json_tokener_get_error(w->tok) != json_tokener_success ||
      !json_object_is_type(o, json_type_array)) {
    json_object_put(o);
    w->stats.invalid++;
    return MX_ERR_INVALID;
  }
  wake_ctx c = {.w = w, .cb = cb, .visit = mx_room_index_visit_begin(w->ix)};
  int rv = rule(&c, o);
  json_object_put(o);
  w->stats.woken += c.n;
  if (rv < 0) {
    if (rv == MX_ERR_INVALID)
      w->stats.invalid++;
    return rv;
  }
  return (int)(c.n > INT32_MAX ? INT32_MAX : c.n);
}
