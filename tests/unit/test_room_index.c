/* Room index: open users, memberships both ways, deduplicated visits,
 * memory accounting, and a randomized run checked against a plain model. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/error.h"
#include "common/strmap.h"
#include "sync/room_index.h"
#include "tests/unit/sorted_ids.h"
#include "tests/unit/tap.h"

#define S(x) x, strlen(x)

static mx_buf seen;

static void record(const char *user, size_t len, void *ud) {
  mx_buf_appendf(&seen, "%.*s;", (int)len, user);
}

/* The visited users, sorted, as "a;b;c;". */
static const char *visited(void) { return sorted_ids(&seen); }

static void test_open_close_refcount(void) {
  mx_room_index *ix = mx_room_index_new();
  CHECK_INT(mx_room_index_user_open(ix, S("@a:hs")), 0);
  CHECK_INT(mx_room_index_user_open(ix, S("@a:hs")), 0);
  CHECK_INT(mx_room_index_join(ix, S("@a:hs"), S("!r:hs")), 1);
  CHECK_INT(mx_room_index_user_close(ix, S("@a:hs")), 0);
  /* One stream still open: the user and the membership stay. */
  CHECK(mx_room_index_has_user(ix, S("@a:hs")));
  CHECK(mx_room_index_is_member(ix, S("@a:hs"), S("!r:hs")));
  CHECK_INT(mx_room_index_user_close(ix, S("@a:hs")), 0);
  CHECK(!mx_room_index_has_user(ix, S("@a:hs")));
  CHECK_INT(mx_room_index_room_size(ix, S("!r:hs")), 0);
  CHECK_INT(mx_room_index_user_close(ix, S("@a:hs")), MX_ERR_NOTFOUND);
  mx_room_index_stats st;
  mx_room_index_stats_get(ix, &st);
  CHECK_INT(st.users, 0);
  CHECK_INT(st.rooms, 0);
  CHECK_INT(st.memberships, 0);
  mx_room_index_free(ix);
}

static void test_join_leave(void) {
  mx_room_index *ix = mx_room_index_new();
  /* Users without a stream are not indexed. */
  CHECK_INT(mx_room_index_join(ix, S("@x:hs"), S("!r:hs")), 0);
  CHECK_INT(mx_room_index_room_size(ix, S("!r:hs")), 0);
  mx_room_index_user_open(ix, S("@a:hs"));
  mx_room_index_user_open(ix, S("@b:hs"));
  CHECK_INT(mx_room_index_join(ix, S("@a:hs"), S("!r:hs")), 1);
  CHECK_INT(mx_room_index_join(ix, S("@a:hs"), S("!r:hs")), 0);
  CHECK_INT(mx_room_index_join(ix, S("@b:hs"), S("!r:hs")), 1);
  CHECK_INT(mx_room_index_join(ix, S("@b:hs"), S("!s:hs")), 1);
  CHECK_INT(mx_room_index_room_size(ix, S("!r:hs")), 2);
  CHECK_INT(mx_room_index_user_rooms(ix, S("@b:hs")), 2);
  CHECK(mx_room_index_is_member(ix, S("@b:hs"), S("!s:hs")));
  CHECK(!mx_room_index_is_member(ix, S("@a:hs"), S("!s:hs")));
  /* Prefixes are other keys. */
  CHECK(!mx_room_index_is_member(ix, S("@b:h"), S("!s:hs")));
  CHECK(!mx_room_index_is_member(ix, S("@b:hs"), S("!s:h")));
  CHECK_INT(mx_room_index_leave(ix, S("@b:hs"), S("!s:hs")), 1);
  CHECK_INT(mx_room_index_leave(ix, S("@b:hs"), S("!s:hs")), 0);
  CHECK_INT(mx_room_index_leave(ix, S("@z:hs"), S("!r:hs")), 0);
  CHECK_INT(mx_room_index_leave(ix, S("@a:hs"), S("!nope:hs")), 0);
  mx_room_index_stats st;
  mx_room_index_stats_get(ix, &st);
  CHECK_INT(st.rooms, 1); /* !s emptied and freed */
  CHECK_INT(st.memberships, 2);
  CHECK_INT(st.users, 2);
  mx_room_index_free(ix);
}

static void test_close_drops_memberships(void) {
  mx_room_index *ix = mx_room_index_new();
  mx_room_index_user_open(ix, S("@a:hs"));
  mx_room_index_user_open(ix, S("@b:hs"));
  mx_room_index_join(ix, S("@a:hs"), S("!1"));
  mx_room_index_join(ix, S("@a:hs"), S("!2"));
  mx_room_index_join(ix, S("@a:hs"), S("!3"));
  mx_room_index_join(ix, S("@b:hs"), S("!2"));
  mx_room_index_user_close(ix, S("@a:hs"));
  CHECK_INT(mx_room_index_room_size(ix, S("!1")), 0);
  CHECK_INT(mx_room_index_room_size(ix, S("!2")), 1);
  CHECK_INT(mx_room_index_room_size(ix, S("!3")), 0);
  mx_room_index_stats st;
  mx_room_index_stats_get(ix, &st);
  CHECK_INT(st.rooms, 1);
  CHECK_INT(st.memberships, 1);
  /* Reopening starts from no rooms. */
  mx_room_index_user_open(ix, S("@a:hs"));
  CHECK_INT(mx_room_index_user_rooms(ix, S("@a:hs")), 0);
  mx_room_index_free(ix);
}

static void test_set_rooms(void) {
  mx_room_index *ix = mx_room_index_new();
  mx_ri_key first[] = {{S("!a")}, {S("!b")}, {S("!c")}, {S("!b")}};
  mx_ri_key second[] = {{S("!b")}, {S("!d")}};
  CHECK_INT(mx_room_index_set_rooms(ix, S("@u"), first, 4), MX_ERR_NOTFOUND);
  mx_room_index_user_open(ix, S("@u"));
  mx_room_index_user_open(ix, S("@v"));
  mx_room_index_join(ix, S("@v"), S("!a"));
  CHECK_INT(mx_room_index_set_rooms(ix, S("@u"), first, 4), 0);
  CHECK_INT(mx_room_index_user_rooms(ix, S("@u")), 3);
  CHECK_INT(mx_room_index_set_rooms(ix, S("@u"), second, 2), 0);
  CHECK_INT(mx_room_index_user_rooms(ix, S("@u")), 2);
  CHECK(!mx_room_index_is_member(ix, S("@u"), S("!a")));
  CHECK(mx_room_index_is_member(ix, S("@u"), S("!b")));
  CHECK(!mx_room_index_is_member(ix, S("@u"), S("!c")));
  CHECK(mx_room_index_is_member(ix, S("@u"), S("!d")));
  CHECK_INT(mx_room_index_room_size(ix, S("!a")), 1); /* @v stays */
  CHECK_INT(mx_room_index_set_rooms(ix, S("@u"), NULL, 0), 0);
  CHECK_INT(mx_room_index_user_rooms(ix, S("@u")), 0);
  mx_room_index_stats st;
  mx_room_index_stats_get(ix, &st);
  CHECK_INT(st.rooms, 1);
  mx_room_index_free(ix);
}

static void test_visits_dedup(void) {
  mx_room_index *ix = mx_room_index_new();
  const char *users[] = {"@1", "@2", "@3", "@4"};
  for (int i = 0; i < 4; i++)
    mx_room_index_user_open(ix, users[i], 2);
  mx_room_index_join(ix, S("@1"), S("!r1"));
  mx_room_index_join(ix, S("@2"), S("!r1"));
  mx_room_index_join(ix, S("@2"), S("!r2"));
  mx_room_index_join(ix, S("@3"), S("!r2"));
  mx_room_index_join(ix, S("@3"), S("!r1"));
  uint64_t v = mx_room_index_visit_begin(ix);
  CHECK_INT(mx_room_index_visit_sharers(ix, v, S("@2"), record, NULL), 3);
  CHECK_STREQ(visited(), "@1;@2;@3;");
  /* Same visit: nobody twice. */
  CHECK_INT(mx_room_index_visit_room(ix, v, S("!r1"), record, NULL), 0);
  CHECK_INT(mx_room_index_visit_user(ix, v, S("@2"), record, NULL), 0);
  CHECK_INT(mx_room_index_visit_user(ix, v, S("@4"), record, NULL), 1);
  CHECK_STREQ(visited(), "@4;");
  v = mx_room_index_visit_begin(ix);
  CHECK_INT(mx_room_index_visit_room(ix, v, S("!r2"), record, NULL), 2);
  CHECK_STREQ(visited(), "@2;@3;");
  /* Unknown room, unknown user, user in no room. */
  CHECK_INT(mx_room_index_visit_room(ix, v, S("!zz"), record, NULL), 0);
  CHECK_INT(mx_room_index_visit_user(ix, v, S("@9"), record, NULL), 0);
  CHECK_INT(mx_room_index_visit_sharers(ix, v, S("@9"), record, NULL), 0);
  CHECK_INT(mx_room_index_visit_sharers(ix, v, S("@4"), record, NULL), 0);
  CHECK_STREQ(visited(), "");
  mx_room_index_free(ix);
}

/* Random joins, leaves, opens and closes, checked against a bitmap. */
#define NU 300
#define NR 40
static unsigned char model[NU][NR];
static int model_open[NU];

static unsigned rnd_state = 12345;
static unsigned rnd(void) {
  rnd_state = rnd_state * 1103515245u + 12345u;
  return (rnd_state >> 8) & 0xffffff;
}

static void test_random_against_model(void) {
  mx_room_index *ix = mx_room_index_new();
  memset(model, 0, sizeof(model));
  memset(model_open, 0, sizeof(model_open));
  char u[32], r[32];
  int bad = 0;
  for (int step = 0; step < 60000; step++) {
    int ui = (int)(rnd() % NU), ri = (int)(rnd() % NR);
    int ul = snprintf(u, sizeof(u), "@user%d:example.org", ui);
    int rl = snprintf(r, sizeof(r), "!room%d:example.org", ri);
    unsigned op = rnd() % 100;
    if (op < 8) {
      mx_room_index_user_open(ix, u, (size_t)ul);
      model_open[ui]++;
    } else if (op < 12) {
      int rv = mx_room_index_user_close(ix, u, (size_t)ul);
      if (model_open[ui]) {
        bad += rv != 0;
        if (--model_open[ui] == 0)
          memset(model[ui], 0, NR);
      } else {
        bad += rv != MX_ERR_NOTFOUND;
      }
    } else if (op < 70) {
      int rv = mx_room_index_join(ix, u, (size_t)ul, r, (size_t)rl);
      int want = model_open[ui] && !model[ui][ri];
      bad += rv != want;
      if (model_open[ui])
        model[ui][ri] = 1;
    } else {
      int rv = mx_room_index_leave(ix, u, (size_t)ul, r, (size_t)rl);
      bad += rv != model[ui][ri];
      model[ui][ri] = 0;
    }
  }
  size_t memberships = 0;
  for (int ri = 0; ri < NR; ri++) {
    int rl = snprintf(r, sizeof(r), "!room%d:example.org", ri);
    size_t want = 0;
    for (int ui = 0; ui < NU; ui++)
      want += model[ui][ri];
    memberships += want;
    bad += mx_room_index_room_size(ix, r, (size_t)rl) != want;
    /* Every member once, members only. */
    uint64_t v = mx_room_index_visit_begin(ix);
    bad += mx_room_index_visit_room(ix, v, r, (size_t)rl, record, NULL) != want;
    mx_buf_reset(&seen);
  }
  for (int ui = 0; ui < NU; ui++) {
    int ul = snprintf(u, sizeof(u), "@user%d:example.org", ui);
    bad += mx_room_index_has_user(ix, u, (size_t)ul) != (model_open[ui] > 0);
    for (int ri = 0; ri < NR; ri++) {
      int rl = snprintf(r, sizeof(r), "!room%d:example.org", ri);
      bad += mx_room_index_is_member(ix, u, (size_t)ul, r, (size_t)rl) !=
             model[ui][ri];
    }
  }
  CHECK_INT(bad, 0);
  mx_room_index_stats st;
  mx_room_index_stats_get(ix, &st);
  CHECK_INT(st.memberships, memberships);
  CHECK(memberships > 1000); /* the run did build a sizeable index */
  mx_room_index_free(ix);
}

/* Memory is accounted and given back. */
static void test_memory_accounting(void) {
  mx_room_index *ix = mx_room_index_new();
  size_t empty = mx_room_index_bytes(ix);
  char u[32], r[32];
  size_t peak = 0, after[2];
  for (int round = 0; round < 2; round++) {
    for (int i = 0; i < 2000; i++) {
      int ul = snprintf(u, sizeof(u), "@u%d:hs", i);
      mx_room_index_user_open(ix, u, (size_t)ul);
      for (int k = 0; k < 20; k++) {
        int rl = snprintf(r, sizeof(r), "!r%d:hs", (i * 7 + k * 13) % 500);
        mx_room_index_join(ix, u, (size_t)ul, r, (size_t)rl);
      }
    }
    mx_room_index_stats st;
    mx_room_index_stats_get(ix, &st);
    CHECK_INT(st.users, 2000);
    CHECK(st.memberships > 30000);
    /* At least the two pointers per membership and the ids. */
    CHECK(st.bytes > empty + st.memberships * 16 + 2500 * 8);
    peak = st.bytes;
    for (int i = 0; i < 2000; i++) {
      int ul = snprintf(u, sizeof(u), "@u%d:hs", i);
      mx_room_index_user_close(ix, u, (size_t)ul);
    }
    after[round] = mx_room_index_bytes(ix);
  }
  /* Only the two maps' slot arrays remain (they do not shrink). */
  CHECK(after[0] == after[1]);
  CHECK(after[0] < empty + (4096 + 1024) * sizeof(void *));
  CHECK(peak > after[0] * 10);
  mx_room_index_free(ix);
}

/* One big room: member set growth, shrink and backward-shift deletion
 * with many collisions in between. */
static void test_big_room(void) {
  mx_room_index *ix = mx_room_index_new();
  char u[32];
  for (int i = 0; i < 5000; i++) {
    int ul = snprintf(u, sizeof(u), "@m%d", i);
    mx_room_index_user_open(ix, u, (size_t)ul);
    mx_room_index_join(ix, u, (size_t)ul, S("!big"));
  }
  CHECK_INT(mx_room_index_room_size(ix, S("!big")), 5000);
  int bad = 0;
  for (int i = 0; i < 5000; i += 2) {
    int ul = snprintf(u, sizeof(u), "@m%d", i);
    bad += mx_room_index_leave(ix, u, (size_t)ul, S("!big")) != 1;
  }
  for (int i = 0; i < 5000; i++) {
    int ul = snprintf(u, sizeof(u), "@m%d", i);
    bad += mx_room_index_is_member(ix, u, (size_t)ul, S("!big")) != (i & 1);
  }
  for (int i = 1; i < 4990; i += 2) {
    int ul = snprintf(u, sizeof(u), "@m%d", i);
    bad += mx_room_index_leave(ix, u, (size_t)ul, S("!big")) != 1;
  }
  CHECK_INT(bad, 0);
  CHECK_INT(mx_room_index_room_size(ix, S("!big")), 5);
  uint64_t v = mx_room_index_visit_begin(ix);
  CHECK_INT(mx_room_index_visit_room(ix, v, S("!big"), record, NULL), 5);
  CHECK_STREQ(visited(), "@m4991;@m4993;@m4995;@m4997;@m4999;");
  mx_room_index_free(ix);
}

static void cleanup(void) { mx_buf_free(&seen); }

int main(void) {
  mx_hash_seed(3, 4);
  mx_buf_init(&seen, 1 << 24);
  atexit(cleanup);
  TAP_RUN(TAP_CASE(test_open_close_refcount), TAP_CASE(test_join_leave),
          TAP_CASE(test_close_drops_memberships), TAP_CASE(test_set_rooms),
          TAP_CASE(test_visits_dedup), TAP_CASE(test_random_against_model),
          TAP_CASE(test_memory_accounting), TAP_CASE(test_big_room));
}
