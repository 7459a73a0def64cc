/*
 * mx_strmap: a hash map from byte-string keys to pointers. Keys are
 * copied; values are borrowed (the map never frees them). Keys come from
 * peers (user ids, room ids, tokens), so the hash is SipHash keyed with a
 * per-process random seed: crafted keys cannot force collisions.
 */
#ifndef MX_STRMAP_H
#define MX_STRMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

typedef struct mx_strmap_ent mx_strmap_ent;

typedef struct mx_strmap {
  mx_strmap_ent **slots;
  size_t nslots; /* power of two, or 0 before the first insert */
  size_t count;
} mx_strmap;

void mx_strmap_init(mx_strmap *m);

/* Frees the map's memory (keys included, values untouched). */
void mx_strmap_free(mx_strmap *m);

/* Returns the value stored under key, or NULL. */
void *mx_strmap_get(const mx_strmap *m, const char *key, size_t len);

/* Stores value under key, replacing any previous value (returned through
 * *old when old is not NULL). Returns 0 or MX_ERR_NOMEM. */
int mx_strmap_put(mx_strmap *m, const char *key, size_t len, void *value,
                  void **old) MX_MUST_CHECK;

/* Removes key; returns its value or NULL when absent. */
void *mx_strmap_del(mx_strmap *m, const char *key, size_t len);

/* Calls fn for every entry until it returns non-zero (that value is
 * returned). fn must not add or remove entries (collect keys first). */
int mx_strmap_each(const mx_strmap *m,
                   int (*fn)(const char *key, size_t len, void *value,
                             void *ud),
                   void *ud);

/* SipHash-2-4 of data with the process seed (exposed for other tables). */
uint64_t mx_hash(const void *data, size_t len);

/* Sets the seed (tests use a fixed one; the daemon seeds from
 * getrandom() at start-up, and the map seeds itself lazily otherwise). */
void mx_hash_seed(uint64_t k0, uint64_t k1);

#endif
