/*
 * mx_mates_loader: fetches the member lists the room mates need
 * (room_mates.h). When a room gets its first connected member it is
 * tracked and queued; the loader asks the homeserver for
 * /rooms/{id}/joined_members on behalf of one of the room's connected
 * members (mx_sync_hub_get_as), at most MX_MATES_LOADER_CONCURRENCY at a
 * time, and merges the answer. A failed fetch is retried (another member
 * may be asked) with backoff, MX_MATES_LOADER_ATTEMPTS times; after that
 * the room stays incomplete until the next reload. A room that loses its
 * last connected member is untracked and its fetch cancelled.
 *
 * Cost: one request per room connected users are in, when the first of
 * them connects, and one per tracked room after a reload (a replication
 * gap or reconnect).
 */
#ifndef MX_MATES_LOADER_H
#define MX_MATES_LOADER_H

#include <stddef.h>

#include "common/limits.h"
#include "sync/hub.h"
#include "sync/room_index.h"
#include "sync/room_mates.h"

struct ev_loop;
typedef struct mx_mates_loader mx_mates_loader;

typedef struct mx_mates_loader_stats {
  unsigned long long fetches;  /* requests sent */
  unsigned long long failures; /* failed requests and unreadable lists */
  size_t queued, in_flight;
} mx_mates_loader_stats;

/* Borrowed: the hub, the index of connected users and the room mates
 * must outlive the loader. NULL: no memory. */
mx_mates_loader *mx_mates_loader_new(struct ev_loop *loop, mx_sync_hub *hub,
                                     mx_room_index *ix, mx_room_mates *rm);

/* Cancels what is in flight; frees. NULL is fine. */
void mx_mates_loader_free(mx_mates_loader *l);

/* The room index's room hook (mx_room_index_room_fn; ud is the loader):
 * a room got its first connected member (track, fetch) or lost its last
 * (untrack, cancel). */
void mx_mates_loader_room_hook(const char *room, size_t len, bool added,
                               void *ud);

/* Rows may have been missed: every tracked room is fetched again. */
void mx_mates_loader_reload_all(mx_mates_loader *l);

/* Sets the room mates' metrics gauges (after rows changed them). */
void mx_mates_loader_publish(const mx_mates_loader *l);

void mx_mates_loader_stats_get(const mx_mates_loader *l,
                               mx_mates_loader_stats *out);

#endif
