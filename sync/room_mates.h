/*
 * mx_room_mates: the members of the rooms connected users are in,
 * including users with no stream here, so that a presence, device-list
 * or profile row about such a user wakes the connected users who share
 * a room with them (Synapse's get_users_who_share_room_with_user). The
 * room index (room_index.h) knows connected users only; this is its
 * complement.
 *
 * A room is tracked while at least one connected user is joined to it
 * (the adapter follows the room index's room hook). Its member list comes
 * from the homeserver's /rooms/{id}/joined_members answer, fetched with a
 * connected member's token, and is kept current by membership rows on the
 * events stream; rows apply from the moment the room is tracked, before
 * the list arrives, and the list is merged in (union: a member who left
 * between the homeserver's answer and our reading it stays until their
 * next leave; that only wakes too many). A room is complete once its list
 * arrived; until every tracked room is, rows about unknown users may
 * concern someone here (mx_room_mates_complete).
 *
 * Cost: the room index's (about 32 bytes per membership plus each id
 * twice); memberships are capped (MX_ROOM_MATES_MAX_MEMBERSHIPS): a room
 * whose list does not fit is marked failed (incomplete) rather than
 * grow memory without bound.
 */
#ifndef MX_ROOM_MATES_H
#define MX_ROOM_MATES_H

#include <stdbool.h>
#include <stddef.h>

#include "common/error.h"
#include "common/limits.h"

typedef struct mx_room_mates mx_room_mates;

/* Reports one room (id borrowed, NUL-terminated, for the call only).
 * Must not modify the room mates. */
typedef void (*mx_room_mates_fn)(const char *room, size_t len, void *ud);

/* max_memberships 0: MX_ROOM_MATES_MAX_MEMBERSHIPS. NULL: no memory. */
mx_room_mates *mx_room_mates_new(size_t max_memberships);

/* NULL is fine. */
void mx_room_mates_free(mx_room_mates *rm);

/* Starts tracking room (no members known yet: incomplete). Returns 1 when
 * newly tracked (the caller fetches its members), 0 when it already was,
 * MX_ERR_NOMEM. */
int mx_room_mates_track(mx_room_mates *rm, const char *room, size_t len);

/* Stops tracking room and forgets its members. */
void mx_room_mates_untrack(mx_room_mates *rm, const char *room, size_t len);

bool mx_room_mates_tracked(const mx_room_mates *rm, const char *room,
                           size_t len);

/*
 * Merges a joined_members answer ({"joined": {"@user": {...}, ...}}) into
 * a tracked room and marks it complete. Keys are unescaped; keys that are
 * not user ids (no leading '@', longer than 255 bytes) are skipped. Returns
 * the number of members read, MX_ERR_NOTFOUND when the room is not
 * tracked (the answer is ignored), MX_ERR_INVALID when the body does not
 * have that shape (invalid JSON, "joined" missing or not an object, a
 * member whose value is not an object), or MX_ERR_LIMIT / MX_ERR_NOMEM
 * when the members do not fit. On any error the room is marked failed
 * and the members known so far are kept.
 */
int mx_room_mates_load(mx_room_mates *rm, const char *room, size_t rlen,
                       const char *body, size_t blen) MX_MUST_CHECK;

/* The room's member list could not be had: failed (incomplete) until a
 * later load. No effect on an untracked room. */
void mx_room_mates_failed(mx_room_mates *rm, const char *room, size_t len);

/* Rows may have been missed (a gap, a reconnect): every tracked room
 * forgets its members and becomes incomplete; each is reported to fn so
 * the caller fetches its list again (fn may be NULL). Returns the number
 * of rooms. */
size_t mx_room_mates_reload_all(mx_room_mates *rm, mx_room_mates_fn fn,
                                void *ud);

/* A membership row: user joined / left (or was kicked or banned from)
 * room. No effect unless the room is tracked. Return 1 when the member
 * set changed, 0 when not, MX_ERR_NOMEM or MX_ERR_LIMIT (the join is not
 * recorded and the room is marked failed). */
int mx_room_mates_join(mx_room_mates *rm, const char *user, size_t ulen,
                       const char *room, size_t rlen);
int mx_room_mates_leave(mx_room_mates *rm, const char *user, size_t ulen,
                        const char *room, size_t rlen);

bool mx_room_mates_is_member(const mx_room_mates *rm, const char *user,
                             size_t ulen, const char *room, size_t rlen);

/* Reports each tracked room user is joined to; returns how many. */
size_t mx_room_mates_each_room(mx_room_mates *rm, const char *user,
                               size_t ulen, mx_room_mates_fn fn, void *ud);

/* True when every tracked room's member list is known. */
bool mx_room_mates_complete(const mx_room_mates *rm);

typedef struct mx_room_mates_stats {
  size_t rooms;       /* tracked */
  size_t incomplete;  /* tracked rooms still loading or failed */
  size_t users;       /* distinct members */
  size_t memberships;
  size_t bytes;       /* heap, estimated */
} mx_room_mates_stats;

void mx_room_mates_stats_get(const mx_room_mates *rm,
                             mx_room_mates_stats *out);

#endif
