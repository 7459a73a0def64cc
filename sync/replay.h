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
 * Entries map (stream key, since) -> (encoded event chunk, next_batch).
 * The stream key is opaque bytes computed by the caller so that it
 * identifies one request class: same access token / device, same filter
 * and parameters (e.g. a hash of token + normalised query).
 *
 * Chains: after a replayed batch P -> Q the caller looks up since=Q, and
 * so on, until a lookup misses; then it resumes fetching from the
 * homeserver at the last next_batch. Lookups do not consume entries
 * (several tabs of one device may replay the same batches) and eviction
 * is oldest-first, so a chain loses its head before its successors.
 *
 * Storage interface: mx_replay dispatches every call through a small
 * table of functions (mx_replay_store_ops) over an opaque store. The
 * default store is in memory (one process); a deployment with several
 * mxsse instances behind one balancer can provide a shared store (e.g.
 * Redis SET with PX expiry) through mx_replay_new_store without changing
 * the callers. The interface is synchronous; a remote store would answer
 * from a local read-through cache or the interface grows a completion
 * callback for get.
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

#include "common/buf.h"
#include "common/chunk.h"

/* Defaults when mx_replay_opts leaves a field 0. Sized for reconnects
 * after a network change (seconds to a few minutes). */
#define MX_REPLAY_DEFAULT_MAX_BYTES (64 * 1024 * 1024)
#define MX_REPLAY_DEFAULT_MAX_AGE 300.0 /* seconds */

typedef struct mx_replay_opts {
  size_t max_bytes; /* cap on accounted bytes (see mx_replay_stats) */
  double max_age;   /* entries older than this are never served */
} mx_replay_opts;

typedef struct mx_replay_stats {
  size_t bytes;          /* accounted memory: event chunks (whole, even when
                            shared with stream queues), entries with their
                            keys and tokens, allocator overhead, hash table */
  size_t entries;
  uint64_t evictions;    /* entries dropped to stay under max_bytes */
  uint64_t expirations;  /* entries dropped for age */
  uint64_t hits, misses; /* mx_replay_get outcomes */
} mx_replay_stats;

/*
 * A store. Each function has the contract of the mx_replay_* function of
 * the same name, with the store pointer in place of the mx_replay.
 * free releases the store and every reference it holds.
 */
typedef struct mx_replay_store_ops {
  int (*put)(void *store, const char *key, size_t klen, const char *since,
             size_t slen, const char *next_batch, size_t nlen,
             mx_chunk *event, double now);
  int (*get)(void *store, const char *key, size_t klen, const char *since,
             size_t slen, double now, mx_chunk **event, mx_buf *next_batch);
  int (*del)(void *store, const char *key, size_t klen, const char *since,
             size_t slen);
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

/* Frees the buffer and drops every chunk reference it holds. NULL is
 * fine. */
void mx_replay_free(mx_replay *rb);

/*
 * Stores the batch fetched with since[0..slen) for stream key[0..klen):
 * its encoded event and its next_batch token. Takes its own reference on
 * event (the caller keeps its own); key, since and next_batch are copied.
 * An entry with the same key and since is replaced. Evicts the oldest
 * entries (of any key) to stay under max_bytes, and drops expired ones.
 * Returns 0, MX_ERR_LIMIT (this entry alone exceeds max_bytes: nothing is
 * stored and any older entry for the same key and since is removed, so a
 * stale batch is never served) or MX_ERR_NOMEM (nothing changed).
 */
int mx_replay_put(mx_replay *rb, const char *key, size_t klen,
                  const char *since, size_t slen, const char *next_batch,
                  size_t nlen, mx_chunk *event, double now);

/*
 * Looks up the batch for (key, since). On success *event is a new
 * reference (the caller unrefs it) and, when next_batch is not NULL, it
 * is reset to hold the batch's next_batch token. Returns 0,
 * MX_ERR_NOTFOUND (absent or older than max_age), or MX_ERR_LIMIT
 * (next_batch cannot hold the token; *event is NULL).
 */
int mx_replay_get(mx_replay *rb, const char *key, size_t klen,
                  const char *since, size_t slen, double now,
                  mx_chunk **event, mx_buf *next_batch);

/* Removes the entry for (key, since), e.g. once a client resumed past it.
 * Returns 0 or MX_ERR_NOTFOUND. */
int mx_replay_del(mx_replay *rb, const char *key, size_t klen,
                  const char *since, size_t slen);

/* Drops entries older than max_age; returns how many. Call it from one
 * periodic sweep. */
size_t mx_replay_expire(mx_replay *rb, double now);

/* Fills *out with the current counters. */
void mx_replay_get_stats(const mx_replay *rb, mx_replay_stats *out);

/* The in-memory store, for composing (e.g. a two-level store). */
extern const mx_replay_store_ops mx_replay_memory_ops;
void *mx_replay_memory_new(const mx_replay_opts *opts);

#endif
