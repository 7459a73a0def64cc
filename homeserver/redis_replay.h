/*
 * mx_redis_replay: a replay store (sync/replay.h) in Redis, shared by
 * every mxsse node behind one balancer, so a client whose node died, or
 * whose reconnect lands elsewhere, resumes from the batches the first
 * node fetched (and acknowledged upstream) on its behalf.
 *
 * Keys (PREFIX defaults to "mxsse:replay:"):
 *   PREFIX b:<feed>:<since>  the batch fetched from since: next_batch, LF,
 *                            body (binary-safe); expires after max_age
 *   PREFIX m:<feed>:<since>  a marker "a batch from since was stored",
 *                            kept marker_age (longer): a lookup that finds
 *                            the marker but not the batch is a resume that
 *                            cannot be honoured (history gone), answered
 *                            MX_ERR_CLOSED rather than NOTFOUND
 * put_if_absent is SET ... NX GET PX (Redis >= 7.0): the first answer
 * wins across nodes and the reply is the winner. get is one MGET of both
 * keys. Redis expires entries itself; memory is bounded by max_batch per
 * entry and by the server's maxmemory with the volatile-ttl policy
 * (batches, the shorter TTL, go before markers; docs/deployment.md).
 *
 * Asynchronous on the loop (hiredis). When the store cannot be asked (not
 * connected, an error reply, no reply within op_timeout) the answer is
 * MX_ERR_UNAVAILABLE, and the link is retried with capped, jittered
 * backoff. The hub decides what that means (docs/internals/sync-hub.md).
 *
 * Commands used: AUTH, SET, MGET on PREFIX* (a Redis ACL user with
 * "~PREFIX* +set +mget" is enough). Not thread-safe (one event loop).
 */
#ifndef MX_REDIS_REPLAY_H
#define MX_REDIS_REPLAY_H

#include <stdbool.h>
#include <stddef.h>

#include "sync/replay.h"

struct ev_loop;

typedef struct mx_redis_replay mx_redis_replay;

typedef struct mx_redis_replay_opts {
  const char *url;     /* redis://[[USER]:PASSWORD@]HOST:PORT (copied) */
  const char *prefix;  /* key prefix (copied); NULL: "mxsse:replay:" */
  double max_age;      /* seconds a batch is served (its TTL) */
  double marker_age;   /* seconds a marker lives; <= max_age: 8 x max_age */
  size_t max_batch;    /* bytes of one entry; larger ones: MX_ERR_LIMIT */
  double op_timeout;   /* seconds a command may wait (0: 2 s) */
} mx_redis_replay_opts;

/* The store's operations, for mx_sync_hub_opts.replay_ops. */
extern const mx_replay_store_ops mx_redis_replay_ops;

/* Starts connecting. Returns NULL on a bad URL or no memory. The store is
 * released through mx_redis_replay_ops.free (by the hub that owns it):
 * commands in flight are answered MX_ERR_UNAVAILABLE first. */
mx_redis_replay *mx_redis_replay_new(struct ev_loop *loop,
                                     const mx_redis_replay_opts *opts);

/* True while connected (and authenticated). */
bool mx_redis_replay_is_up(const mx_redis_replay *r);

#endif
