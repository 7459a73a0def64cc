/*
 * mx_replication: the replication adapter. Reads the homeserver's
 * replication commands (one pub/sub payload at a time), maps each row to
 * the users it concerns (sync/wake.c, following Synapse's notifier) and
 * wakes their streams in the hub; gaps, restarts and unreadable lines run
 * the safety net (every stream fetches). It keeps the room index from
 * the hub's hooks: a user's joined rooms when their first stream opens,
 * joins and leaves from each batch, membership rows in between.
 *
 * No sockets: the Redis connection (homeserver/redis_feed.c) feeds it.
 */
#ifndef MX_REPLICATION_H
#define MX_REPLICATION_H

#include <stddef.h>

#include "sync/hub.h"

typedef struct mx_replication mx_replication;

struct ev_loop;

/* Creates the adapter for hub (borrowed: it must outlive the adapter),
 * which it wakes and whose hooks it installs (the room index learns from
 * them); the loop coalesces wakes. The hub must be in replication mode.
 * Returns NULL when out of memory. */
mx_replication *mx_replication_new(mx_sync_hub *hub, struct ev_loop *loop);

/* Removes the hooks and frees. NULL is fine. */
void mx_replication_free(mx_replication *r);

/* One replication command line (borrowed). */
void mx_replication_feed(mx_replication *r, const char *line, size_t len);

/* The feed is subscribed (again): positions are forgotten and the hub
 * runs the safety net. */
void mx_replication_up(mx_replication *r);

/* The feed is lost: the hub falls back to long-polls (if allowed). */
void mx_replication_down(mx_replication *r);

#endif
