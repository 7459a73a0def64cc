#include "sync/room_mates.h"

#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/limits.h"
#include "common/strmap.h"
#include "sync/json_scan.h"
#include "sync/room_index.h"

/* Matrix ids are at most 255 bytes; a longer key is no user of ours. */

typedef enum { ROOM_LOADING, ROOM_LOADED, ROOM_FAILED } room_state;

/*
 * The memberships live in a private room index whose "open" count of a
 * user is the number of tracked rooms they are in: a user exists exactly
 * while they are a member of some tracked room. The tracked rooms and
 * their state live in a map of their own (a tracked room may have no
 * member yet, which the index cannot hold).
 */
struct mx_room_mates {
  mx_room_index *members;
  mx_strmap rooms; /* room id -> room_state (stored in the pointer) */
  size_t room_key_bytes;
  size_t incomplete;
  size_t max_memberships;
};

#define STATE_PTR(s) ((void *)(uintptr_t)((s) + 1))
#define PTR_STATE(p) ((room_state)((uintptr_t)(p)-1))

mx_room_mates *mx_room_mates_new(size_t max_memberships) {
  mx_room_mates *rm = calloc(1, sizeof(*rm));
  if (!rm)
    return NULL;
  rm->members = mx_room_index_new();
  if (!rm->members) {
    free(rm);
    return NULL;
  }
  mx_strmap_init(&rm->rooms);
  rm->max_memberships =
      max_memberships ? max_memberships : MX_ROOM_MATES_MAX_MEMBERSHIPS;
  return rm;
}

void mx_room_mates_free(mx_room_mates *rm) {
  if (!rm)
    return;
  mx_room_index_free(rm->members);
  mx_strmap_free(&rm->rooms);
  free(rm);
}

static bool get_state(const mx_room_mates *rm, const char *room, size_t len,
                      room_state *out) {
  void *p = mx_strmap_get(&rm->rooms, room, len);
  if (p)
    *out = PTR_STATE(p);
  return p != NULL;
}

static void set_state(mx_room_mates *rm, const char *room, size_t len,
                      room_state s) {
  room_state old;
  if (!get_state(rm, room, len, &old) || old == s)
    return;
  rm->incomplete += (s != ROOM_LOADED) - (old != ROOM_LOADED);
  /* Replacing an existing key allocates nothing: it cannot fail. */
  int rv = mx_strmap_put(&rm->rooms, room, len, STATE_PTR(s), NULL);
  assert(rv == 0);
  (void)rv;
}

bool mx_room_mates_tracked(const mx_room_mates *rm, const char *room,
                           size_t len) {
  room_state s;
  return get_state(rm, room, len, &s);
}

int mx_room_mates_track(mx_room_mates *rm, const char *room, size_t len) {
  if (mx_room_mates_tracked(rm, room, len))
    return 0;
  if (mx_strmap_put(&rm->rooms, room, len, STATE_PTR(ROOM_LOADING), NULL))
    return MX_ERR_NOMEM;
  rm->room_key_bytes += len + 1 + 4 * sizeof(void *);
  rm->incomplete++;
  return 1;
}

/* --- members --------------------------------------------------------- */

static int add_member(mx_room_mates *rm, const char *user, size_t ulen,
                      const char *room, size_t rlen) {
  if (mx_room_index_is_member(rm->members, user, ulen, room, rlen))
    return 0;
  mx_room_index_stats st;
  mx_room_index_stats_get(rm->members, &st);
  if (st.memberships >= rm->max_memberships)
    return MX_ERR_LIMIT;
  int rv = mx_room_index_user_open(rm->members, user, ulen);
  if (rv)
    return rv;
  rv = mx_room_index_join(rm->members, user, ulen, room, rlen);
  if (rv != 1) {
    mx_room_index_user_close(rm->members, user, ulen);
    return rv < 0 ? rv : MX_ERR_NOMEM;
  }
  return 1;
}

static int remove_member(mx_room_mates *rm, const char *user, size_t ulen,
                         const char *room, size_t rlen) {
  if (mx_room_index_leave(rm->members, user, ulen, room, rlen) != 1)
    return 0;
  mx_room_index_user_close(rm->members, user, ulen);
  return 1;
}

/* Ids copied out of a map or the index (neither may change while it
 * reports them). Ids may hold NUL bytes: lengths are kept. */
typedef struct id_list {
  mx_ri_key *ids;
  size_t n, cap;
  bool nomem;
} id_list;

static void collect(const char *id, size_t len, void *ud) {
  id_list *l = ud;
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 16;
    mx_ri_key *ids = realloc(l->ids, cap * sizeof(*ids));
    if (!ids) {
      l->nomem = true;
      return;
    }
    l->ids = ids;
    l->cap = cap;
  }
  char *copy = malloc(len + 1);
  if (!copy) {
    l->nomem = true;
    return;
  }
  memcpy(copy, id, len);
  copy[len] = '\0';
  l->ids[l->n].p = copy;
  l->ids[l->n++].len = len;
}

static void id_list_free(id_list *l) {
  for (size_t i = 0; i < l->n; i++)
    free((char *)l->ids[i].p);
  free(l->ids);
}

/* Forgets every member of room. */
static void clear_members(mx_room_mates *rm, const char *room, size_t len) {
  for (;;) {
    id_list l = {0};
    mx_room_index_visit_room(rm->members,
                             mx_room_index_visit_begin(rm->members), room,
                             len, collect, &l);
    for (size_t i = 0; i < l.n; i++)
      remove_member(rm, l.ids[i].p, l.ids[i].len, room, len);
    id_list_free(&l);
    /* Short of memory, the copy was partial: go round again (each round
     * removes at least what it copied; none copied means none left or no
     * memory at all, and then the members stay: they only wake too
     * many). */
    if (!l.nomem || l.n == 0)
      return;
  }
}

void mx_room_mates_untrack(mx_room_mates *rm, const char *room, size_t len) {
  room_state s;
  if (!get_state(rm, room, len, &s))
    return;
  clear_members(rm, room, len);
  if (s != ROOM_LOADED)
    rm->incomplete--;
  mx_strmap_del(&rm->rooms, room, len);
  rm->room_key_bytes -= len + 1 + 4 * sizeof(void *);
}

int mx_room_mates_join(mx_room_mates *rm, const char *user, size_t ulen,
                       const char *room, size_t rlen) {
  if (!mx_room_mates_tracked(rm, room, rlen))
    return 0;
  int rv = add_member(rm, user, ulen, room, rlen);
  if (rv < 0)
    set_state(rm, room, rlen, ROOM_FAILED);
  return rv;
}

int mx_room_mates_leave(mx_room_mates *rm, const char *user, size_t ulen,
                        const char *room, size_t rlen) {
  return remove_member(rm, user, ulen, room, rlen);
}

bool mx_room_mates_is_member(const mx_room_mates *rm, const char *user,
                             size_t ulen, const char *room, size_t rlen) {
  return mx_room_index_is_member(rm->members, user, ulen, room, rlen);
}

size_t mx_room_mates_each_room(mx_room_mates *rm, const char *user,
                               size_t ulen, mx_room_mates_fn fn, void *ud) {
  return mx_room_index_each_room(rm->members, user, ulen, fn, ud);
}

/* --- member lists ---------------------------------------------------- */

typedef struct load_ctx {
  mx_room_mates *rm;
  const char *room;
  size_t rlen;
  int n;
  int err;
} load_ctx;

static int load_member(const mx_json_span *key, const mx_json_span *value,
                       void *ud) {
  load_ctx *c = ud;
  const char *raw;
  size_t rawlen, len;
  bool esc;
  char id[MX_MAX_USER_ID];
  if (value->type != MX_JSON_OBJECT ||
      mx_json_scan_string(key, &raw, &rawlen, &esc)) {
    c->err = MX_ERR_INVALID;
    return 1;
  }
  if (!esc) {
    if (rawlen > MX_MAX_USER_ID)
      return 0;
    memcpy(id, raw, rawlen);
    len = rawlen;
  } else if (mx_json_scan_unescape(raw, rawlen, id, sizeof(id), &len)) {
    return 0; /* too long or undecodable: not a user id */
  }
  if (len == 0 || id[0] != '@')
    return 0;
  int rv = add_member(c->rm, id, len, c->room, c->rlen);
  if (rv < 0) {
    c->err = rv;
    return 1;
  }
  c->n++;
  return 0;
}

int mx_room_mates_load(mx_room_mates *rm, const char *room, size_t rlen,
                       const char *body, size_t blen) {
  static const char *const path[] = {"joined"};
  if (!mx_room_mates_tracked(rm, room, rlen))
    return MX_ERR_NOTFOUND;
  mx_json_span joined;
  load_ctx c = {.rm = rm, .room = room, .rlen = rlen};
  if (mx_json_scan_validate(body, blen) ||
      mx_json_scan_find(body, blen, path, 1, &joined) ||
      joined.type != MX_JSON_OBJECT) {
    c.err = MX_ERR_INVALID;
  } else if (mx_json_scan_members(joined.p, joined.len, load_member, &c) < 0 &&
             !c.err) {
    c.err = MX_ERR_INVALID;
  }
  if (c.err) {
    set_state(rm, room, rlen, ROOM_FAILED);
    return c.err;
  }
  set_state(rm, room, rlen, ROOM_LOADED);
  return c.n;
}

void mx_room_mates_failed(mx_room_mates *rm, const char *room, size_t len) {
  set_state(rm, room, len, ROOM_FAILED);
}

/* --- reload ---------------------------------------------------------- */

static int collect_room(const char *k, size_t len, void *v, void *ud) {
  collect(k, len, ud);
  return 0;
}

size_t mx_room_mates_reload_all(mx_room_mates *rm, mx_room_mates_fn fn,
                                void *ud) {
  id_list rooms = {0};
  mx_strmap_each(&rm->rooms, collect_room, &rooms);
  for (size_t i = 0; i < rooms.n; i++) {
    clear_members(rm, rooms.ids[i].p, rooms.ids[i].len);
    set_state(rm, rooms.ids[i].p, rooms.ids[i].len, ROOM_LOADING);
    if (fn)
      fn(rooms.ids[i].p, rooms.ids[i].len, ud);
  }
  size_t n = rooms.n;
  id_list_free(&rooms);
  /* Rooms that could not be copied (no memory) keep their members and
   * state: they only wake too many. */
  return n;
}

bool mx_room_mates_complete(const mx_room_mates *rm) {
  return rm->incomplete == 0;
}

void mx_room_mates_stats_get(const mx_room_mates *rm,
                             mx_room_mates_stats *out) {
  mx_room_index_stats st;
  mx_room_index_stats_get(rm->members, &st);
  out->rooms = rm->rooms.count;
  out->incomplete = rm->incomplete;
  out->users = st.users;
  out->memberships = st.memberships;
  out->bytes = sizeof(*rm) + st.bytes + rm->room_key_bytes +
               rm->rooms.nslots * sizeof(void *);
}
