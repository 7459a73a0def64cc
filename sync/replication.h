/*
 * mx_replication: the replication adapter. Reads the homeserver's
 * replication commands (one pub/sub payload at a time), maps each row to
 * the users it concerns (sync/wake.c, following Synapse's notifier) and
 * wakes their streams in the hub; gaps, restarts and unreadable lines run
 * the safety net (every stream fetches). It keeps the room index from
 * the hub's hooks: a user's joined rooms when their first stream opens,
 * joins and leaves from each batch, membership rows in between.
 *
 * No sockets: the Redis connection (common/redis_feed.c) feeds it.
 */
#ifndef MX_REPLICATION_H
#define MX_REPLICATION_H

#include <stddef.h>

#include "sync/hub.h"

typedef struct mx_replication mx_replication;

/* Creates the adapter and fills hooks with its room-index hooks (to pass
 * in mx_sync_hub_opts before creating the hub). */
mx_replication *mx_replication_new(mx_sync_hub_hooks *hooks);

struct ev_loop;

/* Tells the adapter which hub to wake (after mx_sync_hub_new) and its
 * loop (for coalescing wakes). */
void mx_replication_attach(mx_replication *r, mx_sync_hub *hub,
                           struct ev_loop *loop);

void mx_replication_free(mx_replication *r);

/* One replication command line (borrowed). */
void mx_replication_feed(mx_replication *r, const char *line, size_t len);

/* The feed is subscribed (again): positions are forgotten and the hub
 * runs the safety net. */
void mx_replication_up(mx_replication *r);

/* The feed is lost: the hub falls back to long-polls (if allowed). */
void mx_replication_down(mx_replication *r);

#endif
