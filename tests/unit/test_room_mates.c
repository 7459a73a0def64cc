/* Room mates: tracking, completeness and reload_all, joined_members loads
 * (shape checks, union with rows, escaped keys), join/leave rows, the
 * membership cap, stats, and a randomized run checked against a model. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/error.h"
#include "common/strmap.h"
#include "sync/room_mates.h"
#include "tests/unit/sorted_ids.h"
#include "tests/unit/tap.h"

#define S(x) x, strlen(x)

static mx_buf seen, body;

static void record(const char *room, size_t len, void *ud) {
  (void)ud;
  CHECK_INT(strlen(room), len); /* ids are NUL-terminated */
  mx_buf_appendf(&seen, "%.*s;", (int)len, room);
}

/* The reported rooms, sorted, as "a;b;c;". */
static const char *visited(void) { return sorted_ids(&seen); }

/* The tracked rooms user is in, sorted (the count is checked at random). */
static const char *rooms_of(mx_room_mates *rm, const char *user) {
  mx_room_mates_each_room(rm, S(user), record, NULL);
  return visited();
}

static mx_room_mates_stats stats(const mx_room_mates *rm) {
  mx_room_mates_stats st;
  mx_room_mates_stats_get(rm, &st);
  return st;
}

/* Tracked room counts, incomplete ones, distinct users, memberships. */
static int stats_are(const mx_room_mates *rm, size_t rooms, size_t incomplete,
                     size_t users, size_t memberships) {
  mx_room_mates_stats st = stats(rm);
  if (st.rooms == rooms && st.incomplete == incomplete &&
      st.users == users && st.memberships == memberships)
    return 1;
  printf("# stats %zu %zu %zu %zu, want %zu %zu %zu %zu\n", st.rooms,
         st.incomplete, st.users, st.memberships, rooms, incomplete, users,
         memberships);
  return 0;
}

/* Short forms for NUL-terminated ids. */
static int track(mx_room_mates *rm, const char *room) {
  return mx_room_mates_track(rm, S(room));
}
static bool tracked(const mx_room_mates *rm, const char *room) {
  return mx_room_mates_tracked(rm, S(room));
}
static int load(mx_room_mates *rm, const char *room, const char *text) {
  return mx_room_mates_load(rm, S(room), S(text));
}
static int join(mx_room_mates *rm, const char *user, const char *room) {
  return mx_room_mates_join(rm, S(user), S(room));
}
static int leave(mx_room_mates *rm, const char *user, const char *room) {
  return mx_room_mates_leave(rm, S(user), S(room));
}
static bool member(const mx_room_mates *rm, const char *user,
                   const char *room) {
  return mx_room_mates_is_member(rm, S(user), S(room));
}

static size_t user_id(char *out, int i) {
  return (size_t)sprintf(out, "@u%d:hs", i);
}
static size_t room_id(char *out, int i) {
  return (size_t)sprintf(out, "!r%d:hs", i);
}

/* A joined_members answer (Synapse's shape) listing @u<id>:hs per id. */
static const char *joined_body(const int *ids, size_t n) {
  mx_buf_reset(&body);
  mx_buf_appendf(&body, "{\"joined\":{");
  for (size_t i = 0; i < n; i++)
    mx_buf_appendf(&body,
                   "%s\"@u%d:hs\":{\"display_name\":\"U%d\","
                   "\"avatar_url\":%s}",
                   i ? "," : "", ids[i], ids[i],
                   ids[i] % 2 ? "null" : "\"mxc://hs/x\"");
  mx_buf_appendf(&body, "}}");
  return body.data;
}

static const char *synapse =
    "{\"joined\":{\"@a:hs\":{\"display_name\":\"A\",\"avatar_url\":null},"
    "\"@b:hs\":{}}}";

static void test_track_untrack(void) {
  mx_room_mates *rm = mx_room_mates_new(0);
  CHECK(rm != NULL);
  CHECK(!tracked(rm, "!r:hs"));
  CHECK_INT(track(rm, "!r:hs"), 1);
  CHECK_INT(track(rm, "!r:hs"), 0);
  CHECK(tracked(rm, "!r:hs"));
  /* Lengths count, not NULs; a prefix is another room. */
  CHECK(mx_room_mates_tracked(rm, "!r:hs!junk", 5));
  CHECK(!tracked(rm, "!r:h"));
  CHECK_INT(join(rm, "@a:hs", "!r:hs"), 1);
  CHECK_STREQ(rooms_of(rm, "@a:hs"), "!r:hs;");
  mx_room_mates_untrack(rm, S("!r:hs"));
  CHECK(!tracked(rm, "!r:hs"));
  CHECK(!member(rm, "@a:hs", "!r:hs"));
  CHECK_STREQ(rooms_of(rm, "@a:hs"), "");
  mx_room_mates_untrack(rm, S("!r:hs")); /* twice, and unknown: no-ops */
  mx_room_mates_untrack(rm, S("!nope:hs"));
  CHECK(stats_are(rm, 0, 0, 0, 0));
  /* Tracking again starts from no members. */
  CHECK_INT(track(rm, "!r:hs"), 1);
  CHECK(!member(rm, "@a:hs", "!r:hs"));
  mx_room_mates_free(rm);
}

static void test_complete(void) {
  mx_room_mates *rm = mx_room_mates_new(0);
  CHECK(mx_room_mates_complete(rm));
  track(rm, "!r:hs");
  CHECK(!mx_room_mates_complete(rm));
  CHECK(stats_are(rm, 1, 1, 0, 0));
  CHECK_INT(load(rm, "!r:hs", "{\"joined\":{}}"), 0);
  CHECK(mx_room_mates_complete(rm));
  CHECK(stats_are(rm, 1, 0, 0, 0));
  /* Rows do not change completeness. */
  join(rm, "@a:hs", "!r:hs");
  CHECK(mx_room_mates_complete(rm));
  mx_room_mates_failed(rm, S("!r:hs"));
  CHECK(!mx_room_mates_complete(rm));
  CHECK(member(rm, "@a:hs", "!r:hs"));
  CHECK_INT(load(rm, "!r:hs", synapse), 2);
  CHECK(mx_room_mates_complete(rm));
  mx_room_mates_failed(rm, S("!nope:hs")); /* untracked: no effect */
  CHECK(mx_room_mates_complete(rm));
  CHECK(!tracked(rm, "!nope:hs"));
  /* Dropping the only incomplete room completes the set. */
  track(rm, "!s:hs");
  CHECK(!mx_room_mates_complete(rm));
  mx_room_mates_untrack(rm, S("!s:hs"));
  CHECK(mx_room_mates_complete(rm));
  mx_room_mates_free(rm);
}

static void test_reload_all(void) {
  mx_room_mates *rm = mx_room_mates_new(0);
  CHECK_INT(mx_room_mates_reload_all(rm, record, NULL), 0);
  CHECK_STREQ(visited(), "");
  const char *rooms[] = {"!c:hs", "!a:hs", "!b:hs"};
  for (int i = 0; i < 3; i++) {
    track(rm, rooms[i]);
    CHECK_INT(load(rm, rooms[i], synapse), 2);
  }
  join(rm, "@x:hs", "!a:hs");
  CHECK(mx_room_mates_complete(rm));
  CHECK_INT(mx_room_mates_reload_all(rm, record, NULL), 3);
  CHECK_STREQ(visited(), "!a:hs;!b:hs;!c:hs;");
  CHECK(!mx_room_mates_complete(rm));
  CHECK(stats_are(rm, 3, 3, 0, 0));
  CHECK(!member(rm, "@x:hs", "!a:hs"));
  CHECK_STREQ(rooms_of(rm, "@a:hs"), "");
  CHECK(tracked(rm, "!b:hs"));
  mx_room_mates_free(rm);
}

static void test_load(void) {
  mx_room_mates *rm = mx_room_mates_new(0);
  track(rm, "!r:hs");
  /* A row before the list arrives: the list is merged in. */
  CHECK_INT(join(rm, "@c:hs", "!r:hs"), 1);
  CHECK_INT(load(rm, "!r:hs", synapse), 2);
  CHECK(member(rm, "@a:hs", "!r:hs"));
  CHECK(member(rm, "@b:hs", "!r:hs"));
  CHECK(member(rm, "@c:hs", "!r:hs"));
  CHECK(stats_are(rm, 1, 0, 3, 3));
  /* Only "joined"'s keys count: not nested ones, not other members. */
  CHECK_INT(load(rm, "!r:hs",
                 " { \"x\" : {\"joined\":{\"@y:hs\":{}}}, \"joined\" : {"
                 "\"@d:hs\" : {\"display_name\":\"@z:hs\",\"avatar_url\":"
                 "\"mxc://hs/d\"}}, \"@w:hs\": {} } "),
            1);
  CHECK(member(rm, "@d:hs", "!r:hs"));
  CHECK(!member(rm, "@y:hs", "!r:hs"));
  CHECK(!member(rm, "@z:hs", "!r:hs"));
  CHECK(!member(rm, "@w:hs", "!r:hs"));
  CHECK(stats_are(rm, 1, 0, 4, 4));
  /* An untracked room's answer is ignored. */
  CHECK_INT(load(rm, "!nope:hs", synapse), MX_ERR_NOTFOUND);
  CHECK(!tracked(rm, "!nope:hs"));
  CHECK(!member(rm, "@a:hs", "!nope:hs"));
  CHECK(stats_are(rm, 1, 0, 4, 4));
  mx_room_mates_free(rm);
}

static void test_load_invalid(void) {
  const char *bad[] = {
      "not json", "", "[]", "{}", "{\"joined\":[]}", "{\"joined\":null}",
      "{\"joined\":\"@a:hs\"}", "{\"chunk\":{\"@a:hs\":{}}}",
      "{\"joined\":{\"@a:hs\":{}}", "{\"joined\":{\"@a:hs\"",
      "{\"joined\":{\"@a:hs\":{}}} x"};
  mx_room_mates *rm = mx_room_mates_new(0);
  track(rm, "!r:hs");
  for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
    CHECK_INT(load(rm, "!r:hs", synapse), 2);
    CHECK(mx_room_mates_complete(rm));
    int rv = load(rm, "!r:hs", bad[i]);
    if (rv != MX_ERR_INVALID)
      printf("# body %zu: %s\n", i, bad[i]);
    CHECK_INT(rv, MX_ERR_INVALID);
    CHECK(!mx_room_mates_complete(rm));
    CHECK(stats_are(rm, 1, 1, 2, 2));
  }
  mx_room_mates_free(rm);
}

/* The header does not say how escaped keys are read: either unescaped
 * (the real user id) or refused; never stored as the raw token. */
static void test_load_escaped_keys(void) {
  mx_room_mates *rm = mx_room_mates_new(0);
  track(rm, "!r:hs");
  int rv = load(rm, "!r:hs",
                "{\"joined\":{\"@\\u0061:hs\":{},\"@q\\\"x\\/y:hs\":{}}}");
  CHECK(rv == 2 || rv < 0);
  CHECK(mx_room_mates_complete(rm) == (rv == 2));
  CHECK(member(rm, "@a:hs", "!r:hs") == (rv == 2));
  CHECK(member(rm, "@q\"x/y:hs", "!r:hs") == (rv == 2));
  CHECK(!member(rm, "@\\u0061:hs", "!r:hs"));
  CHECK(!member(rm, "@q\\\"x\\/y:hs", "!r:hs"));
  mx_room_mates_free(rm);
}

static void test_join_leave(void) {
  mx_room_mates *rm = mx_room_mates_new(0);
  /* Untracked rooms: rows are ignored. */
  CHECK_INT(join(rm, "@a:hs", "!r:hs"), 0);
  CHECK_INT(leave(rm, "@a:hs", "!r:hs"), 0);
  CHECK(!member(rm, "@a:hs", "!r:hs"));
  CHECK_STREQ(rooms_of(rm, "@a:hs"), "");
  track(rm, "!r:hs");
  track(rm, "!s:hs");
  CHECK_INT(join(rm, "@a:hs", "!r:hs"), 1);
  CHECK_INT(join(rm, "@a:hs", "!r:hs"), 0);
  CHECK_INT(join(rm, "@a:hs", "!s:hs"), 1);
  CHECK_INT(join(rm, "@b:hs", "!r:hs"), 1);
  CHECK_INT(join(rm, "@a:hs", "!t:hs"), 0);
  CHECK(member(rm, "@b:hs", "!r:hs"));
  CHECK(!member(rm, "@b:hs", "!s:hs"));
  CHECK(!member(rm, "@b:h", "!r:hs"));
  CHECK(!member(rm, "@b:hs", "!r:h"));
  CHECK_STREQ(rooms_of(rm, "@a:hs"), "!r:hs;!s:hs;");
  CHECK_STREQ(rooms_of(rm, "@b:hs"), "!r:hs;");
  CHECK_STREQ(rooms_of(rm, "@z:hs"), "");
  CHECK_INT(leave(rm, "@a:hs", "!s:hs"), 1);
  CHECK_INT(leave(rm, "@a:hs", "!s:hs"), 0);
  CHECK_INT(leave(rm, "@z:hs", "!r:hs"), 0);
  CHECK_STREQ(rooms_of(rm, "@a:hs"), "!r:hs;");
  CHECK(stats_are(rm, 2, 2, 2, 2)); /* rows do not complete a room */
  CHECK_INT(leave(rm, "@b:hs", "!r:hs"), 1);
  CHECK(stats_are(rm, 2, 2, 1, 1));
  mx_room_mates_free(rm);
}

static void test_cap(void) {
  int five[] = {1, 2, 3, 4, 5}, two[] = {1, 2};
  mx_room_mates *rm = mx_room_mates_new(3);
  track(rm, "!r:hs");
  CHECK_INT(load(rm, "!r:hs", joined_body(five, 5)), MX_ERR_LIMIT);
  CHECK(!mx_room_mates_complete(rm));
  CHECK(stats(rm).memberships <= 3);
  mx_room_mates_free(rm);

  /* Rows over the cap: refused, not recorded, the room fails. */
  rm = mx_room_mates_new(3);
  track(rm, "!r:hs");
  track(rm, "!s:hs");
  CHECK_INT(load(rm, "!r:hs", joined_body(two, 2)), 2);
  CHECK_INT(load(rm, "!s:hs", "{\"joined\":{}}"), 0);
  CHECK(mx_room_mates_complete(rm));
  CHECK_INT(join(rm, "@c:hs", "!s:hs"), 1);
  CHECK_INT(join(rm, "@d:hs", "!s:hs"), MX_ERR_LIMIT);
  CHECK(!member(rm, "@d:hs", "!s:hs"));
  CHECK(!mx_room_mates_complete(rm));
  CHECK(stats_are(rm, 2, 1, 3, 3));
  /* A repeated join records nothing, so it is no error at the cap. */
  CHECK_INT(join(rm, "@c:hs", "!s:hs"), 0);
  CHECK_INT(leave(rm, "@u1:hs", "!r:hs"), 1);
  CHECK_INT(join(rm, "@d:hs", "!s:hs"), 1);
  CHECK(stats_are(rm, 2, 1, 3, 3));
  mx_room_mates_free(rm);
}

/* Memory is accounted and given back. */
static void test_stats_bytes(void) {
  mx_room_mates *rm = mx_room_mates_new(0);
  char room[32];
  int ids[200];
  size_t peak = 0, after[2];
  for (int round = 0; round < 2; round++) {
    for (int r = 0; r < 8; r++) {
      room_id(room, r);
      for (int j = 0; j < 200; j++)
        ids[j] = r * 50 + j; /* rooms overlap: users @u0..@u549 */
      CHECK_INT(track(rm, room), 1);
      CHECK_INT(load(rm, room, joined_body(ids, 200)), 200);
    }
    CHECK(stats_are(rm, 8, 0, 550, 1600));
    peak = stats(rm).bytes;
    CHECK(peak > 1600 * 16 + 550 * 8); /* two pointers a membership */
    for (int r = 0; r < 8; r++)
      mx_room_mates_untrack(rm, room, room_id(room, r));
    CHECK(stats_are(rm, 0, 0, 0, 0));
    after[round] = stats(rm).bytes;
  }
  CHECK(after[1] <= after[0]);
  CHECK(peak > after[0] * 4);
  mx_room_mates_free(rm);
}

/* Random operations checked against a plain model after every step. */
#define NU 20
#define NR 8
static unsigned char m_tracked[NR], m_loaded[NR], m_member[NU][NR];

static unsigned rnd_state = 4242;
static unsigned rnd(void) {
  rnd_state = rnd_state * 1103515245u + 12345u;
  return (rnd_state >> 8) & 0xffffff;
}

/* Reported rooms as a bit set; a repeat or a foreign id is counted. */
typedef struct room_set {
  unsigned mask;
  int bad;
} room_set;

static void collect(const char *room, size_t len, void *ud) {
  room_set *s = ud;
  int k = -1;
  if (sscanf(room, "!r%d:hs", &k) != 1 || k < 0 || k >= NR ||
      (s->mask & (1u << k)) || len != strlen(room))
    s->bad++;
  else
    s->mask |= 1u << k;
}

/* One random operation on rm and on the model; 1 when the answers
 * differ. */
static int random_step(mx_room_mates *rm) {
  char u[32], r[32];
  int ui = (int)(rnd() % NU), ri = (int)(rnd() % NR), ids[NU], want = 0,
      rv = 0;
  size_t ul = user_id(u, ui), rl = room_id(r, ri), n = 0;
  unsigned char *on = &m_tracked[ri], *mem = &m_member[ui][ri]; /* model */
  unsigned op = rnd() % 100;
  if (op < 12) {
    want = !*on;
    rv = mx_room_mates_track(rm, r, rl);
    m_loaded[ri] &= !want;
    *on = 1;
  } else if (op < 17) {
    mx_room_mates_untrack(rm, r, rl);
    *on = m_loaded[ri] = 0;
    for (int i = 0; i < NU; i++)
      m_member[i][ri] = 0;
  } else if (op < 55) {
    want = *on && !*mem;
    rv = mx_room_mates_join(rm, u, ul, r, rl);
    *mem |= *on;
  } else if (op < 80) {
    want = *mem; /* members are of tracked rooms only */
    rv = mx_room_mates_leave(rm, u, ul, r, rl);
    *mem = 0;
  } else if (op < 94) {
    for (int i = 0; i < NU; i++)
      if (rnd() % 3 == 0)
        ids[n++] = i;
    want = *on ? (int)n : MX_ERR_NOTFOUND;
    rv = load(rm, r, joined_body(ids, n));
    for (size_t i = 0; *on && i < n; i++)
      m_member[ids[i]][ri] = 1;
    m_loaded[ri] |= *on;
  } else if (op < 99) {
    mx_room_mates_failed(rm, r, rl);
    m_loaded[ri] = 0;
  } else {
    room_set s = {0, 0};
    for (int k = 0; k < NR; k++)
      want |= m_tracked[k] << k;
    n = mx_room_mates_reload_all(rm, collect, &s);
    rv = !s.bad && n == (size_t)__builtin_popcount((unsigned)want)
             ? (int)s.mask
             : -1;
    memset(m_loaded, 0, sizeof(m_loaded));
    memset(m_member, 0, sizeof(m_member));
  }
  if (rv != want)
    printf("# op %u (%s, %s): %d, want %d\n", op, u, r, rv, want);
  return rv != want;
}

/* Differences between rm and the model: membership both ways, stats,
 * completeness. */
static int model_differs(mx_room_mates *rm) {
  char u[32], r[32];
  size_t rooms = 0, incomplete = 0, users = 0, memberships = 0;
  int bad = 0;
  for (int k = 0; k < NR; k++) {
    rooms += m_tracked[k];
    incomplete += m_tracked[k] && !m_loaded[k];
  }
  for (int i = 0; i < NU; i++) {
    size_t ul = user_id(u, i);
    unsigned want = 0;
    for (int k = 0; k < NR; k++) {
      size_t rl = room_id(r, k);
      bad += mx_room_mates_is_member(rm, u, ul, r, rl) != m_member[i][k];
      want |= (unsigned)m_member[i][k] << k;
    }
    room_set s = {0, 0};
    size_t n = mx_room_mates_each_room(rm, u, ul, collect, &s);
    bad += s.bad || s.mask != want || n != (size_t)__builtin_popcount(want);
    users += want != 0;
    memberships += (size_t)__builtin_popcount(want);
  }
  bad += !stats_are(rm, rooms, incomplete, users, memberships);
  bad += mx_room_mates_complete(rm) != (incomplete == 0);
  return bad;
}

static void test_random_against_model(void) {
  mx_room_mates *rm = mx_room_mates_new(0);
  size_t most = 0;
  for (int step = 0; step < 4000; step++) {
    int bad = random_step(rm);
    bad += model_differs(rm);
    if (bad) {
      printf("# mismatch at step %d\n", step);
      CHECK_INT(bad, 0);
      break;
    }
    if (stats(rm).memberships > most)
      most = stats(rm).memberships;
  }
  CHECK(most > 40); /* the run did fill rooms */
  mx_room_mates_free(rm);
}

static void cleanup(void) {
  mx_buf_free(&seen);
  mx_buf_free(&body);
}

int main(void) {
  mx_hash_seed(3, 4);
  mx_buf_init(&seen, 1 << 20);
  mx_buf_init(&body, 1 << 20);
  atexit(cleanup);
  TAP_RUN(TAP_CASE(test_track_untrack), TAP_CASE(test_complete),
          TAP_CASE(test_reload_all), TAP_CASE(test_load),
          TAP_CASE(test_load_invalid), TAP_CASE(test_load_escaped_keys),
          TAP_CASE(test_join_leave), TAP_CASE(test_cap),
          TAP_CASE(test_stats_bytes), TAP_CASE(test_random_against_model));
}
