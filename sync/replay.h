/*
 * mx_replay: the batches a client may not have received.
 *
 * For each SSE stream mxsse fetches /sync?since=P and sends the answer as
 * the event with id Q (its next_batch). Fetching since=Q next tells the
 * homeserver that Q's to-device messages were delivered, and it deletes
 * them. If the client never got event Q and reconnects with
 * Last-Event-ID: P, asking the homeserver for since=P again would lose
 * those messages, so the batch is served from here instead.
 *
 * Entries map (stream key, since) -> batch (sync/batch.h: the body and
 * its next_batch). The stream key is opaque bytes computed by the caller
 * so that it identifies one request class: same access token / device,
 * same filter and parameters (e.g. a hash of token + normalised query).
 *
 * Chains: after a replayed batch P -> Q the caller looks up since=Q, and
 * so on, until a lookup misses; then it resumes fetching from the
 * homeserver at the last next_batch. Lookups do not consume entries
 * (several tabs of one device may replay the same batches) and eviction
 * is oldest-first, so a chain loses its head before its successors.
 *
 * First answer wins: a batch is stored with put-if-absent. When two
 * fetches from one position race (two tabs, two nodes), the first stored
 * batch is what every stream gets, because fetching past it already
 * acknowledged its to-device messages upstream and a later answer from
 * the same position can lack them.
 *
 * Storage interface: mx_replay dispatches every call through a table of
 * functions (mx_replay_store_ops) over an opaque store. The default store
 * is in memory (one process); several nodes behind one balancer share a
 * remote one. get and put_if_absent are asynchronous: they answer through
 * a callback, which the memory store calls before returning and a remote
 * store calls later from the loop. Callers handle both.
 *
 * Time: every call takes `now` in seconds from the caller's one clock
 * (the event loop's), which keeps tests deterministic and avoids mixing
 * clocks. It should not go backwards.
 *
 * Not thread-safe (one event loop).
 */
#ifndef MX_REPLAY_H
#define MX_REPLAY_H

#include <stddef.h>
#include <stdint.h>

#include "common/limits.h"
#include "sync/batch.h"

typedef struct mx_replay_opts {
  size_t max_bytes; /* cap on accounted bytes (see mx_replay_stats) */
  double max_age;   /* entries older than this are never served */
} mx_replay_opts;

typedef struct mx_replay_stats {
  size_t bytes;          /* accounted memory: batches (whole, even when
                            shared with stream queues), entries with their
                            keys, allocator overhead, hash table */
  size_t entries;
  uint64_t evictions;    /* entries dropped to stay under max_bytes */
  uint64_t expirations;  /* entries dropped for age */
  uint64_t hits, misses; /* mx_replay_get outcomes */
} mx_replay_stats;

/*
 * The answer to a get or a put_if_absent, called exactly once. rv:
 *  - get: 0 (batch is the entry, borrowed for the call: take a reference
 *    to keep it), MX_ERR_NOTFOUND (absent or older than max_age),
 *    MX_ERR_CLOSED (absent, but a store that can tell knows a batch was
 *    stored there once: history gone), or MX_ERR_UNAVAILABLE (a remote
 *    store could not be asked).
 *  - put_if_absent: 0 (batch is what the store holds for (key, since) now:
 *    the given batch, or the one stored first, which wins), MX_ERR_LIMIT
 *    (the batch alone exceeds max_bytes: nothing stored, batch NULL),
 *    MX_ERR_NOMEM or MX_ERR_UNAVAILABLE (batch NULL).
 */
typedef void (*mx_replay_done_fn)(void *ud, int rv, mx_batch *batch);

/*
 * A store. Each function has the contract of the mx_replay_* function of
 * the same name, with the store pointer in place of the mx_replay.
 * free releases the store and every reference it holds; a remote store
 * answers what is still in flight with MX_ERR_UNAVAILABLE first.
 */
typedef struct mx_replay_store_ops {
  void (*get)(void *store, const char *key, size_t klen, const char *since,
              size_t slen, double now, mx_replay_done_fn done, void *ud);
  void (*put_if_absent)(void *store, const char *key, size_t klen,
                        const char *since, size_t slen, mx_batch *batch,
                        double now, mx_replay_done_fn done, void *ud);
  size_t (*expire)(void *store, double now);
  void (*stats)(void *store, mx_replay_stats *out);
  void (*free)(void *store);
} mx_replay_store_ops;

typedef struct mx_replay mx_replay;

/* New replay buffer over the in-memory store; opts may be NULL for the
 * defaults. Returns NULL when out of memory. Free with mx_replay_free. */
mx_replay *mx_replay_new(const mx_replay_opts *opts);

/* New replay buffer over a caller-provided store; takes ownership of
 * store (released through ops->free by mx_replay_free, or at once when
 * this returns NULL). ops is borrowed and must outlive the buffer. */
mx_replay *mx_replay_new_store(const mx_replay_store_ops *ops, void *store);

/* Frees the buffer and drops every reference it holds. NULL is fine. */
void mx_replay_free(mx_replay *rb);

/*
 * Stores batch, fetched with since[0..slen) for stream key[0..klen),
 * unless an entry for (key, since) is there already; answers through done
 * (see mx_replay_done_fn) with the entry that stands. The store takes its
 * own reference on batch; key and since are copied. Evicts the oldest
 * entries (of any key) to stay under max_bytes, and drops expired ones.
 */
void mx_replay_put_if_absent(mx_replay *rb, const char *key, size_t klen,
                             const char *since, size_t slen, mx_batch *batch,
                             double now, mx_replay_done_fn done, void *ud);

/* Looks up the batch for (key, since); answers through done. */
void mx_replay_get(mx_replay *rb, const char *key, size_t klen,
                   const char *since, size_t slen, double now,
                   mx_replay_done_fn done, void *ud);

/* Drops entries older than max_age; returns how many. Call it from one
 * periodic sweep. */
size_t mx_replay_expire(mx_replay *rb, double now);

/* Fills *out with the current counters. */
void mx_replay_get_stats(const mx_replay *rb, mx_replay_stats *out);

/* The in-memory store, for composing (e.g. a two-level store). */
extern const mx_replay_store_ops mx_replay_memory_ops;
void *mx_replay_memory_new(const mx_replay_opts *opts);

#endif
