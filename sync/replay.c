#include "sync/replay.h"

#include <assert.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/strmap.h"

struct mx_replay {
  const mx_replay_store_ops *ops;
  void *store;
};

mx_replay *mx_replay_new_store(const mx_replay_store_ops *ops, void *store) {
  if (!store)
    return NULL;
  mx_replay *rb = malloc(sizeof(*rb));
  if (!rb) {
    ops->free(store);
    return NULL;
  }
  rb->ops = ops;
  rb->store = store;
  return rb;
}

mx_replay *mx_replay_new(const mx_replay_opts *opts) {
  return mx_replay_new_store(&mx_replay_memory_ops,
                             mx_replay_memory_new(opts));
}

void mx_replay_free(mx_replay *rb) {
  if (!rb)
    return;
  rb->ops->free(rb->store);
  free(rb);
}

void mx_replay_put_if_absent(mx_replay *rb, const char *key, size_t klen,
                             const char *since, size_t slen, mx_batch *batch,
                             double now, mx_replay_done_fn done, void *ud) {
  rb->ops->put_if_absent(rb->store, key, klen, since, slen, batch, now, done,
                         ud);
}

void mx_replay_get(mx_replay *rb, const char *key, size_t klen,
                   const char *since, size_t slen, double now,
                   mx_replay_done_fn done, void *ud) {
  rb->ops->get(rb->store, key, klen, since, slen, now, done, ud);
}

size_t mx_replay_expire(mx_replay *rb, double now) {
  return rb->ops->expire(rb->store, now);
}

void mx_replay_get_stats(const mx_replay *rb, mx_replay_stats *out) {
  rb->ops->stats(rb->store, out);
}

/* ------------------------------------------------------------------ */
/* The in-memory store: a hash table of entries chained by (key, since),
 * plus a list in insertion order for oldest-first eviction and expiry. */

/* What malloc spends per block beyond the bytes asked for (glibc: a
 * size word, rounded to 16). Counted so many small entries cannot hide. */
#define ALLOC_OVERHEAD 16
#define INITIAL_BUCKETS 16

typedef struct entry entry;
struct entry {
  entry *hnext;         /* hash chain */
  entry *older, *newer; /* insertion order */
  uint64_t hash;
  mx_batch *batch; /* one reference held */
  double at;       /* when it was stored */
  size_t cost;     /* bytes accounted to this entry */
  size_t klen, slen;
  char bytes[]; /* key, since */
};

typedef struct memstore {
  entry **buckets;
  size_t nbuckets; /* power of two */
  entry *oldest, *newest;
  size_t max_bytes;
  double max_age;
  mx_replay_stats st;
} memstore;

static size_t table_cost(size_t nbuckets) {
  return nbuckets * sizeof(entry *) + ALLOC_OVERHEAD;
}

void *mx_replay_memory_new(const mx_replay_opts *opts) {
  memstore *m = calloc(1, sizeof(*m));
  if (!m)
    return NULL;
  m->buckets = calloc(INITIAL_BUCKETS, sizeof(entry *));
  if (!m->buckets) {
    free(m);
    return NULL;
  }
  m->nbuckets = INITIAL_BUCKETS;
  m->max_bytes = opts && opts->max_bytes ? opts->max_bytes
                                         : MX_REPLAY_DEFAULT_MAX_BYTES;
  m->max_age = opts && opts->max_age > 0 ? opts->max_age
                                         : MX_REPLAY_DEFAULT_MAX_AGE;
  m->st.bytes = sizeof(*m) + ALLOC_OVERHEAD + table_cost(m->nbuckets);
  return m;
}

/* Keys and positions are both variable-length; hashing them apart keeps
 * ("ab","c") and ("a","bc") distinct without copying them together. */
static uint64_t hash_of(const char *key, size_t klen, const char *since,
                        size_t slen) {
  return mx_hash(key, klen) * 0x9E3779B97F4A7C15ULL ^ mx_hash(since, slen);
}

static entry **slot_of(memstore *m, const char *key, size_t klen,
                       const char *since, size_t slen, uint64_t h) {
  entry **pp = &m->buckets[h & (m->nbuckets - 1)];
  for (; *pp; pp = &(*pp)->hnext) {
    entry *e = *pp;
    if (e->hash == h && e->klen == klen && e->slen == slen &&
        (!klen || memcmp(e->bytes, key, klen) == 0) &&
        (!slen || memcmp(e->bytes + klen, since, slen) == 0))
      break;
  }
  return pp;
}

/* Unlinks e (found at *pp in its chain) and releases it. */
static void drop(memstore *m, entry **pp) {
  entry *e = *pp;
  *pp = e->hnext;
  if (e->older)
    e->older->newer = e->newer;
  else
    m->oldest = e->newer;
  if (e->newer)
    e->newer->older = e->older;
  else
    m->newest = e->older;
  assert(m->st.bytes >= e->cost && m->st.entries > 0);
  m->st.bytes -= e->cost;
  m->st.entries--;
  mx_batch_unref(e->batch);
  free(e);
}

static void drop_entry(memstore *m, entry *e) {
  entry **pp = &m->buckets[e->hash & (m->nbuckets - 1)];
  while (*pp != e)
    pp = &(*pp)->hnext;
  drop(m, pp);
}

/* Doubles the table; on allocation failure chains just get longer. */
static void grow(memstore *m) {
  size_t n = m->nbuckets * 2;
  entry **b = calloc(n, sizeof(*b));
  if (!b)
    return;
  for (size_t i = 0; i < m->nbuckets; i++) {
    for (entry *e = m->buckets[i], *next; e; e = next) {
      next = e->hnext;
      entry **slot = &b[e->hash & (n - 1)];
      e->hnext = *slot;
      *slot = e;
    }
  }
  free(m->buckets);
  m->st.bytes += table_cost(n) - table_cost(m->nbuckets);
  m->buckets = b;
  m->nbuckets = n;
}

static bool expired(const memstore *m, const entry *e, double now) {
  return now - e->at > m->max_age;
}

static size_t mem_expire(void *store, double now) {
  memstore *m = store;
  size_t n = 0;
  while (m->oldest && expired(m, m->oldest, now)) {
    drop_entry(m, m->oldest);
    m->st.expirations++;
    n++;
  }
  return n;
}

static void mem_put_if_absent(void *store, const char *key, size_t klen,
                              const char *since, size_t slen,
                              mx_batch *batch, double now,
                              mx_replay_done_fn done, void *ud) {
  memstore *m = store;
  mem_expire(m, now);
  uint64_t h = hash_of(key, klen, since, slen);
  entry **old = slot_of(m, key, klen, since, slen, h);
  if (*old) {
    done(ud, 0, (*old)->batch); /* the first answer wins */
    return;
  }
  size_t size = mx_batch_size(batch);
  size_t cost = 0;
  bool fits = klen <= m->max_bytes && slen <= m->max_bytes &&
              size <= m->max_bytes;
  if (fits) {
    /* Each term is at most max_bytes, so only a huge cap can overflow. */
    size_t fixed = sizeof(entry) + ALLOC_OVERHEAD + ALLOC_OVERHEAD;
    cost = klen + slen;
    fits = cost >= klen && (cost += size) >= size &&
           (cost += fixed) >= fixed && cost <= m->max_bytes;
  }
  if (!fits) {
    done(ud, MX_ERR_LIMIT, NULL);
    return;
  }
  entry *e = malloc(sizeof(*e) + klen + slen);
  if (!e) {
    done(ud, MX_ERR_NOMEM, NULL);
    return;
  }
  e->hash = h;
  e->batch = mx_batch_ref(batch);
  e->at = now;
  e->cost = cost;
  e->klen = klen;
  e->slen = slen;
  if (klen)
    memcpy(e->bytes, key, klen);
  if (slen)
    memcpy(e->bytes + klen, since, slen);
  if (m->st.entries >= m->nbuckets)
    grow(m);
  entry **slot = &m->buckets[h & (m->nbuckets - 1)];
  e->hnext = *slot;
  *slot = e;
  e->older = m->newest;
  e->newer = NULL;
  if (m->newest)
    m->newest->newer = e;
  else
    m->oldest = e;
  m->newest = e;
  m->st.bytes += cost;
  m->st.entries++;
  /* Oldest first; the new entry fits on its own, so this stops. */
  while (m->st.bytes > m->max_bytes && m->oldest != e) {
    drop_entry(m, m->oldest);
    m->st.evictions++;
  }
  done(ud, 0, batch);
}

static void mem_get(void *store, const char *key, size_t klen,
                    const char *since, size_t slen, double now,
                    mx_replay_done_fn done, void *ud) {
  memstore *m = store;
  entry **pp = slot_of(m, key, klen, since, slen,
                       hash_of(key, klen, since, slen));
  entry *e = *pp;
  if (e && expired(m, e, now)) {
    drop(m, pp);
    m->st.expirations++;
    e = NULL;
  }
  if (!e) {
    m->st.misses++;
    done(ud, MX_ERR_NOTFOUND, NULL);
    return;
  }
  m->st.hits++;
  done(ud, 0, e->batch);
}

static void mem_stats(void *store, mx_replay_stats *out) {
  *out = ((memstore *)store)->st;
}

static void mem_free(void *store) {
  memstore *m = store;
  while (m->oldest)
    drop_entry(m, m->oldest);
  free(m->buckets);
  free(m);
}

const mx_replay_store_ops mx_replay_memory_ops = {
    .get = mem_get,
    .put_if_absent = mem_put_if_absent,
    .expire = mem_expire,
    .stats = mem_stats,
    .free = mem_free,
};
