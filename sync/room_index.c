#include "sync/room_index.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/strmap.h"

/* Per-allocation overhead assumed by the accounting (glibc malloc). */
#define MALLOC_OVERHEAD 16
/* A strmap entry: next, hash, value, len, then the key and a NUL. */
#define STRMAP_ENT(len) (4 * sizeof(void *) + (len) + 1 + MALLOC_OVERHEAD)

typedef struct ri_room ri_room;

typedef struct ri_user {
  uint64_t hash;   /* seeded hash of the id: the member sets' key */
  uint64_t visit;  /* last visit that reported this user */
  uint32_t refs;   /* open streams */
  uint32_t nrooms, caprooms;
  ri_room **rooms; /* unordered */
  size_t len;
  char id[];       /* len bytes + NUL */
} ri_user;

struct ri_room {
  uint64_t mark;   /* set_rooms epoch */
  uint32_t n, cap; /* cap is 0 or a power of two */
  ri_user **set;   /* open addressing on ri_user.hash, linear probing */
  size_t len;
  char id[];
};

struct mx_room_index {
  mx_strmap users; /* id -> ri_user */
  mx_strmap rooms; /* id -> ri_room */
  uint64_t visit;
  uint64_t mark;
  size_t memberships;
  size_t bytes;    /* structs, arrays, map entries (slots added on read) */
  bool busy;       /* inside a visit callback */
  mx_room_index_room_fn room_hook;
  void *room_hook_ud;
};

mx_room_index *mx_room_index_new(void) {
  mx_room_index *ix = calloc(1, sizeof(*ix));
  if (!ix)
    return NULL;
  mx_strmap_init(&ix->users);
  mx_strmap_init(&ix->rooms);
  return ix;
}

/* ---------------------------------------------------------------------
 * Member sets */

static long set_find(const ri_room *r, const ri_user *u) {
  if (!r->cap)
    return -1;
  size_t mask = r->cap - 1;
  for (size_t i = u->hash & mask;; i = (i + 1) & mask) {
    if (!r->set[i])
      return -1;
    if (r->set[i] == u)
      return (long)i;
  }
}

static void set_place(ri_user **set, uint32_t cap, ri_user *u) {
  size_t mask = cap - 1;
  size_t i = u->hash & mask;
  while (set[i])
    i = (i + 1) & mask;
  set[i] = u;
}

static int set_resize(mx_room_index *ix, ri_room *r, uint32_t cap) {
  ri_user **set = calloc(cap, sizeof(*set));
  if (!set)
    return MX_ERR_NOMEM;
  for (uint32_t i = 0; i < r->cap; i++)
    if (r->set[i])
      set_place(set, cap, r->set[i]);
  free(r->set);
  ix->bytes -= r->cap ? r->cap * sizeof(*set) + MALLOC_OVERHEAD : 0;
  ix->bytes += cap * sizeof(*set) + MALLOC_OVERHEAD;
  r->set = set;
  r->cap = cap;
  return 0;
}

static int set_add(mx_room_index *ix, ri_room *r, ri_user *u) {
  if ((size_t)(r->n + 1) * 4 > (size_t)r->cap * 3) {
    if (r->cap >= (UINT32_MAX >> 1) + 1)
      return MX_ERR_NOMEM;
    int rv = set_resize(ix, r, r->cap ? r->cap * 2 : 4);
    if (rv)
      return rv;
  }
  set_place(r->set, r->cap, u);
  r->n++;
  return 0;
}

/* Backward-shift deletion: no tombstones, probes stay short. */
static void set_remove_at(mx_room_index *ix, ri_room *r, size_t i) {
  size_t mask = r->cap - 1;
  r->set[i] = NULL;
  for (size_t j = (i + 1) & mask; r->set[j]; j = (j + 1) & mask) {
    size_t k = r->set[j]->hash & mask; /* home slot of the entry at j */
    bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
    if (stays)
      continue;
    r->set[i] = r->set[j];
    r->set[j] = NULL;
    i = j;
  }
  r->n--;
  /* Give memory back when a big room empties out (failure is harmless). */
  if (r->cap > 8 && r->n < r->cap / 8)
    (void)set_resize(ix, r, r->cap / 4);
}

/* ---------------------------------------------------------------------
 * Users and rooms */

static ri_user *get_user(const mx_room_index *ix, const char *id,
                         size_t len) {
  return mx_strmap_get(&ix->users, id, len);
}

static ri_room *get_room(const mx_room_index *ix, const char *id,
                         size_t len) {
  return mx_strmap_get(&ix->rooms, id, len);
}

static ri_room *room_create(mx_room_index *ix, const char *id, size_t len) {
  ri_room *r = calloc(1, sizeof(*r) + len + 1);
  if (!r)
    return NULL;
  memcpy(r->id, id, len);
  r->len = len;
  if (mx_strmap_put(&ix->rooms, id, len, r, NULL) != 0) {
    free(r);
    return NULL;
  }
  ix->bytes += sizeof(*r) + len + 1 + MALLOC_OVERHEAD + STRMAP_ENT(len);
  return r;
}

static void room_hook(mx_room_index *ix, const ri_room *r, bool added) {
  if (!ix->room_hook)
    return;
  ix->busy = true;
  ix->room_hook(r->id, r->len, added, ix->room_hook_ud);
  ix->busy = false;
}

static void room_destroy(mx_room_index *ix, ri_room *r) {
  assert(r->n == 0);
  mx_strmap_del(&ix->rooms, r->id, r->len);
  ix->bytes -= sizeof(*r) + r->len + 1 + MALLOC_OVERHEAD + STRMAP_ENT(r->len);
  if (r->cap)
    ix->bytes -= r->cap * sizeof(*r->set) + MALLOC_OVERHEAD;
  free(r->set);
  free(r);
}

static int user_rooms_push(mx_room_index *ix, ri_user *u, ri_room *r) {
  if (u->nrooms == u->caprooms) {
    if (u->caprooms >= (UINT32_MAX >> 1))
      return MX_ERR_NOMEM;
    uint32_t cap = u->caprooms ? u->caprooms * 2 : 4;
    ri_room **rooms = realloc(u->rooms, cap * sizeof(*rooms));
    if (!rooms)
      return MX_ERR_NOMEM;
    ix->bytes += (size_t)(cap - u->caprooms) * sizeof(*rooms) +
                 (u->caprooms ? 0 : MALLOC_OVERHEAD);
    u->rooms = rooms;
    u->caprooms = cap;
  }
  u->rooms[u->nrooms++] = r;
  return 0;
}

static void user_rooms_remove_at(mx_room_index *ix, ri_user *u, uint32_t i) {
  u->rooms[i] = u->rooms[--u->nrooms];
  if (u->caprooms > 8 && u->nrooms < u->caprooms / 4) {
    uint32_t cap = u->caprooms / 2;
    ri_room **rooms = realloc(u->rooms, cap * sizeof(*rooms));
    if (rooms) {
      ix->bytes -= (size_t)(u->caprooms - cap) * sizeof(*rooms);
      u->rooms = rooms;
      u->caprooms = cap;
    }
  }
}

/* Removes the membership (u, r): r's set, u's array, r if now empty. */
static void unlink_member(mx_room_index *ix, ri_user *u, ri_room *r,
                          uint32_t user_slot) {
  long i = set_find(r, u);
  assert(i >= 0);
  set_remove_at(ix, r, (size_t)i);
  user_rooms_remove_at(ix, u, user_slot);
  ix->memberships--;
  if (r->n == 0) {
    room_hook(ix, r, false);
    room_destroy(ix, r);
  }
}

static void user_clear_rooms(mx_room_index *ix, ri_user *u) {
  while (u->nrooms)
    unlink_member(ix, u, u->rooms[u->nrooms - 1], u->nrooms - 1);
}

static void user_destroy(mx_room_index *ix, ri_user *u) {
  user_clear_rooms(ix, u);
  mx_strmap_del(&ix->users, u->id, u->len);
  ix->bytes -= sizeof(*u) + u->len + 1 + MALLOC_OVERHEAD + STRMAP_ENT(u->len);
  if (u->caprooms)
    ix->bytes -= u->caprooms * sizeof(*u->rooms) + MALLOC_OVERHEAD;
  free(u->rooms);
  free(u);
}

static int join(mx_room_index *ix, ri_user *u, const char *room,
                size_t rlen, ri_room **out) {
  ri_room *r = get_room(ix, room, rlen);
  if (r && set_find(r, u) >= 0) {
    *out = r;
    return 0;
  }
  bool created = false;
  if (!r) {
    r = room_create(ix, room, rlen);
    if (!r)
      return MX_ERR_NOMEM;
    created = true;
  }
  if (user_rooms_push(ix, u, r) != 0) {
    if (created)
      room_destroy(ix, r);
    return MX_ERR_NOMEM;
  }
  if (set_add(ix, r, u) != 0) {
    u->nrooms--;
    if (created)
      room_destroy(ix, r);
    return MX_ERR_NOMEM;
  }
  ix->memberships++;
  *out = r;
  if (created)
    room_hook(ix, r, true);
  return 1;
}

/* ---------------------------------------------------------------------
 * Public */

static int free_user_cb(const char *k, size_t len, void *v, void *ud) {
  ri_user *u = v;
  free(u->rooms);
  free(u);
  return 0;
}

static int free_room_cb(const char *k, size_t len, void *v, void *ud) {
  ri_room *r = v;
  free(r->set);
  free(r);
  return 0;
}

void mx_room_index_free(mx_room_index *ix) {
  if (!ix)
    return;
  assert(!ix->busy);
  mx_strmap_each(&ix->users, free_user_cb, NULL);
  mx_strmap_each(&ix->rooms, free_room_cb, NULL);
  mx_strmap_free(&ix->users);
  mx_strmap_free(&ix->rooms);
  free(ix);
}

void mx_room_index_set_room_hook(mx_room_index *ix, mx_room_index_room_fn fn,
                                 void *ud) {
  ix->room_hook = fn;
  ix->room_hook_ud = ud;
}

int mx_room_index_user_open(mx_room_index *ix, const char *user, size_t len) {
  assert(!ix->busy);
  ri_user *u = get_user(ix, user, len);
  if (u) {
    if (u->refs == UINT32_MAX)
      return MX_ERR_LIMIT;
    u->refs++;
    return 0;
  }
  u = calloc(1, sizeof(*u) + len + 1);
  if (!u)
    return MX_ERR_NOMEM;
  memcpy(u->id, user, len);
  u->len = len;
  u->hash = mx_hash(user, len);
  u->refs = 1;
  if (mx_strmap_put(&ix->users, user, len, u, NULL) != 0) {
    free(u);
    return MX_ERR_NOMEM;
  }
  ix->bytes += sizeof(*u) + len + 1 + MALLOC_OVERHEAD + STRMAP_ENT(len);
  return 0;
}

int mx_room_index_user_close(mx_room_index *ix, const char *user,
                             size_t len) {
  assert(!ix->busy);
  ri_user *u = get_user(ix, user, len);
  if (!u)
    return MX_ERR_NOTFOUND;
  if (--u->refs == 0)
    user_destroy(ix, u);
  return 0;
}

bool mx_room_index_has_user(const mx_room_index *ix, const char *user,
                            size_t len) {
  return get_user(ix, user, len) != NULL;
}

int mx_room_index_join(mx_room_index *ix, const char *user, size_t ulen,
                       const char *room, size_t rlen) {
  assert(!ix->busy);
  ri_user *u = get_user(ix, user, ulen);
  if (!u)
    return 0;
  ri_room *r;
  return join(ix, u, room, rlen, &r);
}

int mx_room_index_leave(mx_room_index *ix, const char *user, size_t ulen,
                        const char *room, size_t rlen) {
  assert(!ix->busy);
  ri_user *u = get_user(ix, user, ulen);
  ri_room *r = u ? get_room(ix, room, rlen) : NULL;
  if (!r || set_find(r, u) < 0)
    return 0;
  for (uint32_t i = 0; i < u->nrooms; i++)
    if (u->rooms[i] == r) {
      unlink_member(ix, u, r, i);
      return 1;
    }
  assert(!"member set and room array disagree");
  return 0;
}

int mx_room_index_set_rooms(mx_room_index *ix, const char *user, size_t ulen,
                            const mx_ri_key *rooms, size_t n) {
  assert(!ix->busy);
  ri_user *u = get_user(ix, user, ulen);
  if (!u)
    return MX_ERR_NOTFOUND;
  uint64_t mark = ++ix->mark;
  for (size_t i = 0; i < n; i++) {
    ri_room *r;
    if (join(ix, u, rooms[i].p, rooms[i].len, &r) < 0)
      return MX_ERR_NOMEM;
    r->mark = mark;
  }
  /* Drop the rooms that were not listed (walk down: removal swaps the
   * last element into the hole). */
  for (uint32_t i = u->nrooms; i-- > 0;)
    if (u->rooms[i]->mark != mark)
      unlink_member(ix, u, u->rooms[i], i);
  return 0;
}

bool mx_room_index_is_member(const mx_room_index *ix, const char *user,
                             size_t ulen, const char *room, size_t rlen) {
  const ri_user *u = get_user(ix, user, ulen);
  const ri_room *r = u ? get_room(ix, room, rlen) : NULL;
  return r && set_find(r, u) >= 0;
}

size_t mx_room_index_each_room(mx_room_index *ix, const char *user,
                               size_t len, mx_room_index_fn fn, void *ud) {
  ri_user *u = get_user(ix, user, len);
  if (!u)
    return 0;
  ix->busy = true;
  for (uint32_t i = 0; i < u->nrooms; i++)
    fn(u->rooms[i]->id, u->rooms[i]->len, ud);
  ix->busy = false;
  return u->nrooms;
}

size_t mx_room_index_room_size(const mx_room_index *ix, const char *room,
                               size_t len) {
  const ri_room *r = get_room(ix, room, len);
  return r ? r->n : 0;
}

size_t mx_room_index_user_rooms(const mx_room_index *ix, const char *user,
                                size_t len) {
  const ri_user *u = get_user(ix, user, len);
  return u ? u->nrooms : 0;
}

uint64_t mx_room_index_visit_begin(mx_room_index *ix) { return ++ix->visit; }

static size_t report(mx_room_index *ix, uint64_t visit, ri_user *u,
                     mx_room_index_fn fn, void *ud) {
  if (u->visit == visit)
    return 0;
  u->visit = visit;
  ix->busy = true;
  fn(u->id, u->len, ud);
  ix->busy = false;
  return 1;
}

static size_t report_room(mx_room_index *ix, uint64_t visit, ri_room *r,
                          mx_room_index_fn fn, void *ud) {
  size_t n = 0;
  for (uint32_t i = 0; i < r->cap; i++)
    if (r->set[i])
      n += report(ix, visit, r->set[i], fn, ud);
  return n;
}

size_t mx_room_index_visit_user(mx_room_index *ix, uint64_t visit,
                                const char *user, size_t len,
                                mx_room_index_fn fn, void *ud) {
  ri_user *u = get_user(ix, user, len);
  return u ? report(ix, visit, u, fn, ud) : 0;
}

size_t mx_room_index_visit_room(mx_room_index *ix, uint64_t visit,
                                const char *room, size_t len,
                                mx_room_index_fn fn, void *ud) {
  ri_room *r = get_room(ix, room, len);
  return r ? report_room(ix, visit, r, fn, ud) : 0;
}

size_t mx_room_index_visit_sharers(mx_room_index *ix, uint64_t visit,
                                   const char *user, size_t len,
                                   mx_room_index_fn fn, void *ud) {
  ri_user *u = get_user(ix, user, len);
  if (!u)
    return 0;
  size_t n = 0;
  for (uint32_t i = 0; i < u->nrooms; i++)
    n += report_room(ix, visit, u->rooms[i], fn, ud);
  return n;
}

size_t mx_room_index_bytes(const mx_room_index *ix) {
  return sizeof(*ix) + ix->bytes +
         (ix->users.nslots + ix->rooms.nslots) * sizeof(void *);
}

void mx_room_index_stats_get(const mx_room_index *ix,
                             mx_room_index_stats *out) {
  out->users = ix->users.count;
  out->rooms = ix->rooms.count;
  out->memberships = ix->memberships;
  out->bytes = mx_room_index_bytes(ix);
}
