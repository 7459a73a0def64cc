#include "common/strmap.h"

#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "common/error.h"

struct mx_strmap_ent {
  mx_strmap_ent *next;
  uint64_t hash;
  void *value;
  size_t len;
  char key[]; /* len bytes + NUL */
};

static uint64_t seed0, seed1;
static bool seeded;

void mx_hash_seed(uint64_t k0, uint64_t k1) {
  seed0 = k0;
  seed1 = k1;
  seeded = true;
}

static void ensure_seed(void) {
  if (seeded)
    return;
  uint64_t k[2] = {0x736f6d6570736575ULL, 0x646f72616e646f6dULL};
  if (getrandom(k, sizeof(k), 0) != (ssize_t)sizeof(k)) {
    /* Fall back to the fixed key; only hash flooding protection is lost. */
  }
  mx_hash_seed(k[0], k[1]);
}

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                             \
  do {                                                                       \
    v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                \
    v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                   \
    v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                   \
    v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                \
  } while (0)

uint64_t mx_hash(const void *data, size_t len) {
  ensure_seed();
  const unsigned char *in = data;
  uint64_t v0 = 0x736f6d6570736575ULL ^ seed0;
  uint64_t v1 = 0x646f72616e646f6dULL ^ seed1;
  uint64_t v2 = 0x6c7967656e657261ULL ^ seed0;
  uint64_t v3 = 0x7465646279746573ULL ^ seed1;
  uint64_t b = (uint64_t)len << 56;
  size_t full = len & ~(size_t)7;
  for (size_t i = 0; i < full; i += 8) {
    uint64_t m;
    memcpy(&m, in + i, 8); /* little-endian hosts; the value is only a hash */
    v3 ^= m;
    SIPROUND;
    SIPROUND;
    v0 ^= m;
  }
  for (size_t i = 0; i < (len & 7); i++)
    b |= (uint64_t)in[full + i] << (8 * i);
  v3 ^= b;
  SIPROUND;
  SIPROUND;
  v0 ^= b;
  v2 ^= 0xff;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  return v0 ^ v1 ^ v2 ^ v3;
}

void mx_strmap_init(mx_strmap *m) { memset(m, 0, sizeof(*m)); }

void mx_strmap_free(mx_strmap *m) {
  for (size_t i = 0; i < m->nslots; i++) {
    mx_strmap_ent *e = m->slots[i];
    while (e) {
      mx_strmap_ent *next = e->next;
      free(e);
      e = next;
    }
  }
  free(m->slots);
  mx_strmap_init(m);
}

static mx_strmap_ent **find_slot(const mx_strmap *m, const char *key,
                                 size_t len, uint64_t h) {
  mx_strmap_ent **pp = &m->slots[h & (m->nslots - 1)];
  for (; *pp; pp = &(*pp)->next)
    if ((*pp)->hash == h && (*pp)->len == len &&
        memcmp((*pp)->key, key, len) == 0)
      return pp;
  return pp;
}

void *mx_strmap_get(const mx_strmap *m, const char *key, size_t len) {
  if (m->count == 0)
    return NULL;
  mx_strmap_ent **pp = find_slot(m, key, len, mx_hash(key, len));
  return *pp ? (*pp)->value : NULL;
}

static int resize(mx_strmap *m, size_t nslots) {
  mx_strmap_ent **slots = calloc(nslots, sizeof(*slots));
  if (!slots)
    return MX_ERR_NOMEM;
  for (size_t i = 0; i < m->nslots; i++) {
    mx_strmap_ent *e = m->slots[i];
    while (e) {
      mx_strmap_ent *next = e->next;
      size_t s = e->hash & (nslots - 1);
      e->next = slots[s];
      slots[s] = e;
      e = next;
    }
  }
  free(m->slots);
  m->slots = slots;
  m->nslots = nslots;
  return 0;
}

int mx_strmap_put(mx_strmap *m, const char *key, size_t len, void *value,
                  void **old) {
  if (old)
    *old = NULL;
  if (m->nslots == 0 && resize(m, 16) != 0)
    return MX_ERR_NOMEM;
  uint64_t h = mx_hash(key, len);
  mx_strmap_ent **pp = find_slot(m, key, len, h);
  if (*pp) {
    if (old)
      *old = (*pp)->value;
    (*pp)->value = value;
    return 0;
  }
  mx_strmap_ent *e = malloc(sizeof(*e) + len + 1);
  if (!e)
    return MX_ERR_NOMEM;
  e->hash = h;
  e->value = value;
  e->len = len;
  memcpy(e->key, key, len);
  e->key[len] = '\0';
  e->next = NULL;
  *pp = e;
  m->count++;
  /* Grow at load factor 1; a failed resize leaves a valid, denser map. */
  if (m->count > m->nslots)
    (void)resize(m, m->nslots * 2);
  return 0;
}

void *mx_strmap_del(mx_strmap *m, const char *key, size_t len) {
  if (m->count == 0)
    return NULL;
  mx_strmap_ent **pp = find_slot(m, key, len, mx_hash(key, len));
  mx_strmap_ent *e = *pp;
  if (!e)
    return NULL;
  void *v = e->value;
  *pp = e->next;
  free(e);
  m->count--;
  return v;
}

int mx_strmap_each(const mx_strmap *m,
                   int (*fn)(const char *key, size_t len, void *value,
                             void *ud),
                   void *ud) {
  for (size_t i = 0; i < m->nslots; i++)
    for (mx_strmap_ent *e = m->slots[i]; e; e = e->next) {
      int rv = fn(e->key, e->len, e->value, ud);
      if (rv)
        return rv;
    }
  return 0;
}
