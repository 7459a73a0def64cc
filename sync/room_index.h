/*
 * mx_room_index: which local users with an open stream are joined to which
 * rooms, both ways (room -> members, user -> rooms), so that a replication
 * row about a room or a user turns into the few streams to wake.
 *
 * Only users with an open stream are indexed: the caller opens a user when
 * a stream opens and closes it when it closes (refcounted, one user may
 * have several streams); memberships of users that are not open are
 * ignored. Memberships come from sync responses (rooms.join keys: the
 * caller joins them, rooms.leave keys: leaves; an initial or full_state
 * sync can replace the whole set) and from membership rows on the
 * replication stream (wake.c).
 *
 * Sizes: a user or room costs its id twice (struct + map key) plus ~100
 * bytes; a membership costs 8 bytes in the user's room array and 8 bytes
 * per member-set slot (open addressing, load 3/8..3/4). Measured: 100k
 * users x 100 rooms among 200k rooms (10M memberships) takes 320 MB,
 * about 1 us per join, and a presence fan-out over a user's 100 rooms
 * (~4900 room-mates) about 0.2 ms. mx_room_index_bytes() reports what is
 * allocated (within 1% of malloc's count in that run).
 *
 * Keys are byte strings (user ids, room ids as received, unescaped); the
 * maps are seeded (common/strmap.h), so crafted ids cannot collide.
 */
#ifndef MX_ROOM_INDEX_H
#define MX_ROOM_INDEX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

typedef struct mx_room_index mx_room_index;

/* A borrowed byte string (for mx_room_index_set_rooms). */
typedef struct mx_ri_key {
  const char *p;
  size_t len;
} mx_ri_key;

/* Reports one user (id borrowed, NUL-terminated, valid until the user is
 * closed). Must not modify the index. */
typedef void (*mx_room_index_fn)(const char *user_id, size_t len, void *ud);

/* Returns an empty index, or NULL when out of memory. */
mx_room_index *mx_room_index_new(void);

/* Called when a room gets its first member (added) and when it loses its
 * last one (room id borrowed for the call). Must not modify the index. */
typedef void (*mx_room_index_room_fn)(const char *room, size_t len,
                                      bool added, void *ud);

/* Sets (or, fn NULL, clears) the room hook. */
void mx_room_index_set_room_hook(mx_room_index *ix, mx_room_index_room_fn fn,
                                 void *ud);

/* Frees everything. NULL is fine. */
void mx_room_index_free(mx_room_index *ix);

/* A stream of user opened: indexes the user (refcount + 1). Returns 0 or
 * MX_ERR_NOMEM. */
int mx_room_index_user_open(mx_room_index *ix, const char *user, size_t len) MX_MUST_CHECK;

/* A stream of user closed: refcount - 1; at zero the user and all their
 * memberships are forgotten (rooms left empty are freed). Returns 0, or
 * MX_ERR_NOTFOUND when the user is not open. */
int mx_room_index_user_close(mx_room_index *ix, const char *user,
                             size_t len);

/* True when the user has at least one open stream. */
bool mx_room_index_has_user(const mx_room_index *ix, const char *user,
                            size_t len);

/* Records that user is joined to room. Returns 1 when added, 0 when the
 * user is not open or already joined, MX_ERR_NOMEM. */
int mx_room_index_join(mx_room_index *ix, const char *user, size_t ulen,
                       const char *room, size_t rlen) MX_MUST_CHECK;

/* Records that user left (or was kicked or banned from) room. Returns 1
 * when removed, 0 when there was nothing to remove. */
int mx_room_index_leave(mx_room_index *ix, const char *user, size_t ulen,
                        const char *room, size_t rlen);

/* Replaces the user's rooms with rooms[0..n) (duplicates are fine).
 * Returns 0, MX_ERR_NOTFOUND when the user is not open, or MX_ERR_NOMEM
 * (then the set holds the old rooms plus part of the new ones: a superset
 * only wakes too many). */
int mx_room_index_set_rooms(mx_room_index *ix, const char *user, size_t ulen,
                            const mx_ri_key *rooms, size_t n) MX_MUST_CHECK;

bool mx_room_index_is_member(const mx_room_index *ix, const char *user,
                             size_t ulen, const char *room, size_t rlen);

/* Reports each room of an open user to fn (which receives room ids where
 * it usually receives user ids; borrowed for the call). Returns how many.
 * fn must not modify the index. */
size_t mx_room_index_each_room(mx_room_index *ix, const char *user,
                               size_t len, mx_room_index_fn fn, void *ud);

/* Number of open users joined to room / rooms of an open user. */
size_t mx_room_index_room_size(const mx_room_index *ix, const char *room,
                               size_t len);
size_t mx_room_index_user_rooms(const mx_room_index *ix, const char *user,
                                size_t len);

/*
 * Deduplicated visits: within one visit (started by
 * mx_room_index_visit_begin) every user is reported at most once, however
 * many rooms lead to them. Each function returns how many users it
 * reported. fn must not modify the index.
 */
uint64_t mx_room_index_visit_begin(mx_room_index *ix);
/* The user, if open. */
size_t mx_room_index_visit_user(mx_room_index *ix, uint64_t visit,
                                const char *user, size_t len,
                                mx_room_index_fn fn, void *ud);
/* Every open member of room. */
size_t mx_room_index_visit_room(mx_room_index *ix, uint64_t visit,
                                const char *room, size_t len,
                                mx_room_index_fn fn, void *ud);
/* Every open member of every room of user (user included when joined to
 * any room), when user is open; 0 otherwise (its rooms are unknown). */
size_t mx_room_index_visit_sharers(mx_room_index *ix, uint64_t visit,
                                   const char *user, size_t len,
                                   mx_room_index_fn fn, void *ud);

typedef struct mx_room_index_stats {
  size_t users;       /* open users */
  size_t rooms;       /* rooms with at least one open member */
  size_t memberships; /* (user, room) pairs */
  size_t bytes;       /* heap allocated by the index, estimated */
} mx_room_index_stats;

void mx_room_index_stats_get(const mx_room_index *ix,
                             mx_room_index_stats *out);

/* Heap allocated by the index (same as stats.bytes). */
size_t mx_room_index_bytes(const mx_room_index *ix);

#endif
