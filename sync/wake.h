/*
 * mx_wake: Synapse's notifier rules applied to replication rows. For each
 * row (from mx_repl_proto) it reports the users with an open stream whose
 * /sync may have changed, and keeps the room index up to date with
 * membership events. Rules and their sources in Synapse 1.163
 * (synapse/replication/tcp/client.py on_rdata, synapse/notifier.py,
 * synapse/handlers/presence.py) are in docs/internals/replication.md.
 *
 *   events        ev row: open members of room_id; for m.room.member also
 *                 state_key (invite, join, leave, kick, ban, knock). Rejected
 *                 events wake nobody. Non-outlier joins add state_key to
 *                 the index and the room mates, leaves and bans remove it
 *                 (after the wake).
 *                 state / state-all rows: nobody.
 *   typing, un_partial_stated_room, sticky_events: open members of the room
 *   receipts      the room; m.read.private: its user only
 *   to_device     the entity when it is a user ("@..."); servers: nobody
 *   account_data, push_rules, thread_subscriptions: the user
 *   presence      the user and everyone sharing a room with them, only when
 *                 Synapse's should_notify() says the change is visible
 *   device_lists  the user and room-mates; is_signature: the user only;
 *                 hosts_calculated: nobody
 *   profile_updates: the user and room-mates
 *   everything else (caches, pushers, backfill, federation,
 *   presence_federation, un_partial_stated_event, quarantined_media):
 *                 nobody, and the row is not even parsed (caches rows are
 *                 never looked at, let alone logged)
 *
 * Room-mates of an open user come from the index. For a user with no
 * stream here they come from the room mates (room_mates.h, when set with
 * mx_wake_set_room_mates): the tracked rooms the user is in. Membership
 * events update both. When the user has no stream here and the room mates
 * are incomplete (a member list still loading or failed: the user may be
 * in one more room than they know), the optional unresolved callback says
 * so after the known room-mates were woken: the caller may wake more
 * widely, or accept the latency.
 */
#ifndef MX_WAKE_H
#define MX_WAKE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "common/limits.h"
#include "sync/repl_proto.h"
#include "sync/room_index.h"
#include "sync/room_mates.h"

/* Caps: MX_WAKE_MAX_ROW, rows longer than this on a stream we act on are
 * refused (they are a few hundred bytes; typing grows with the number of
 * typists); MX_WAKE_PRESENCE_CACHE_MAX, presence states remembered for
 * should_notify(), emptied when full (forgotten users are notified once,
 * like Synapse does for a user it has no state for). Both in
 * common/limits.h. */

/* Synapse's presence.last_active_granularity default (ms). */
#define MX_WAKE_LAST_ACTIVE_GRANULARITY 60000

typedef struct mx_wake mx_wake;

typedef struct mx_wake_opts {
  int64_t last_active_granularity_ms; /* 0: the Synapse default */
  size_t presence_cache_max;          /* 0: MX_WAKE_PRESENCE_CACHE_MAX */
} mx_wake_opts;

typedef struct mx_wake_cb {
  /* One call per user to wake, at most once per row (id borrowed for the
   * call). Must not modify the index or call mx_wake_row. */
  void (*wake)(const char *user, size_t len, void *ud);
  /* Optional: a presence / device_lists / profile_updates row is about a
   * user who may share a room with someone here, but whose rooms are not
   * known yet (see above), so their room-mates were not woken. user is
   * borrowed for the call. */
  void (*unresolved)(mx_repl_stream s, const char *user, size_t len,
                     void *ud);
  void *ud;
} mx_wake_cb;

typedef struct mx_wake_stats {
  uint64_t rows;              /* rows looked at */
  uint64_t woken;             /* wake callbacks */
  uint64_t invalid;           /* rows refused (shape, size) */
  uint64_t presence_filtered; /* presence rows should_notify() dropped */
  uint64_t presence_cache_clears;
  uint64_t unresolved;
  size_t presence_cached;     /* users in the presence cache */
  size_t presence_bytes;      /* its heap, estimated */
} mx_wake_stats;

/* Returns the rule engine over ix (borrowed; it must outlive the engine),
 * or NULL when out of memory. opts NULL: defaults. */
mx_wake *mx_wake_new(mx_room_index *ix, const mx_wake_opts *opts);

void mx_wake_free(mx_wake *w);

/* The members of connected users' rooms, for rows about users with no
 * stream here (borrowed; must outlive the engine; NULL: none). */
void mx_wake_set_room_mates(mx_wake *w, mx_room_mates *rm);

/*
 * Applies one row: calls cb->wake for each open user to wake, updates the
 * index for membership events. Returns the number of users woken (>= 0),
 * MX_ERR_INVALID when the row does not have its stream's shape or is too
 * long, MX_ERR_NOTFOUND for a stream value outside mx_repl_stream, or
 * MX_ERR_NOMEM when the index could not be updated. On any error the
 * caller runs its safety net for row->stream.
 */
int mx_wake_row(mx_wake *w, const mx_repl_row *row, const mx_wake_cb *cb) MX_MUST_CHECK;

/* True for the streams whose rows can wake someone. A safety net scoped
 * to any other stream (a gap in caches, a bad backfill row) needs no
 * wake-up: the caller may drop it. */
bool mx_wake_stream_matters(mx_repl_stream s);

/* Forgets the presence cache (after a reconnect the next state of every
 * user is notified). */
void mx_wake_reset(mx_wake *w);

void mx_wake_stats_get(const mx_wake *w, mx_wake_stats *out);

#endif
