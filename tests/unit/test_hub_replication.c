/*
 * One file on purpose: the cases are replication mode's specification,
 * in the order of docs/internals/sync-hub.md, over one shared fake.
 *
 * Unit tests of the sync hub's replication mode, on a real libev loop with
 * the fake homeserver API test_hub.c uses (hub_fake.h): every upstream request the
 * hub starts (account/whoami, joined_rooms, /sync) is recorded and stays
 * in flight until the test answers it or the hub cancels it. Covered:
 * identity resolution, parking between batches, wakes and their debounce,
 * fetch sharing and the concurrency cap, the feed going down and up,
 * presence syncs, the room-index hooks and the metrics.
 *
 * Time: debounces of 10-300 ms and presence intervals of 200 ms, with
 * bounded loop runs; timing checks compare the fake's start times with
 * the wake, never the wall clock of the whole test.
 */
#include "sync/hub.h"

#include <ev.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "common/chunk.h"
#include "common/log.h"
#include "common/metrics.h"
#include "sync/json_scan.h"
#include "tests/unit/hub_fake.h"
#include "tests/unit/tap.h"

#define NO_ROOMS "{\"joined_rooms\":[]}"

static const char *whoami(const char *user) {
  static char b[4][128];
  static int n;
  char *s = b[n++ % 4];
  snprintf(s, 128, "{\"user_id\":\"%s\",\"device_id\":\"D\"}", user);
  return s;
}

/* ---------------------------------------------------------------------- */
/* The hub's hooks, recorded */

static struct {
  int nopen, nclose, nbatch;
  char open_user[64], open_rooms[256], close_user[64], batch_user[64];
  bool batch_initial;
} H;

static void copy(char *dst, size_t cap, const char *s, size_t len) {
  snprintf(dst, cap, "%.*s", (int)len, s);
}

static void hook_open(const char *user, size_t len, const char *rooms,
                      size_t rlen, void *ud) {
  H.nopen++;
  copy(H.open_user, sizeof(H.open_user), user, len);
  copy(H.open_rooms, sizeof(H.open_rooms), rooms, rlen);
}

static void hook_close(const char *user, size_t len, void *ud) {
  H.nclose++;
  copy(H.close_user, sizeof(H.close_user), user, len);
}

static void hook_batch(const char *user, size_t len, const char *body,
                       size_t blen, bool initial, void *ud) {
  H.nbatch++;
  copy(H.batch_user, sizeof(H.batch_user), user, len);
  H.batch_initial = initial;
}

/* ---------------------------------------------------------------------- */
/* Loop and hub per test */

typedef struct hub_cfg {
  bool fallback;
  long max_fetches;
  double debounce;
  double presence; /* seconds; 0: the hub's default (25) */
  bool feed_up;    /* set_feed_up(true) once created */
  double background_max_wait; /* 0: the hub's default */
} hub_cfg;

static const hub_cfg default_cfg = {
    .fallback = true, .max_fetches = 64, .debounce = 0.01, .feed_up = true};

static void setup_cfg(const hub_cfg *c) {
  memset(&H, 0, sizeof(H));
  mx_sync_hub_opts o = hf_opts();
  o.replication = true;
  o.longpoll_fallback = c->fallback;
  o.max_fetches = c->max_fetches;
  o.wake_debounce = c->debounce;
  o.presence_interval = c->presence;
  o.background_max_wait = c->background_max_wait;
  hf_setup(&o, &tap_failed_checks);
  mx_sync_hub_set_hooks(
      hub, &(mx_sync_hub_hooks){hook_open, hook_close, hook_batch, NULL});
  if (c->feed_up)
    mx_sync_hub_set_feed_up(hub, true);
}

static void setup(void) { setup_cfg(&default_cfg); }

static void teardown(void) { hf_teardown(); }

/* Streams here start fresh: no since, no full_state. */
static mx_sync_stream *open_rec(rec *r, const char *name, const char *token,
                                const char *query) {
  return hf_open(r, name, token, query, NULL, false);
}

/* Answers the fetch a stream makes after its first batch (that batch may
 * be older than the present) with an empty answer at `at`: it parks. A
 * stream that long-polls (the feed is down) makes none. */
static void settle(rec *r, const char *at) {
  double end = ev_time() + 0.2;
  int i;
  while ((i = find_woken(r->token)) < 0 && ev_time() < end)
    run_for(0.005);
  if (i >= 0)
    answer(i, 200, batch(at));
  spin();
}

/* Opens a stream and walks it through whatever the hub asks for: whoami
 * (user), joined_rooms (rooms, when the hub wants them) and the first
 * /sync (next_batch `first`). The client takes the batch. */
static void ready(rec *r, const char *name, const char *token,
                  const char *query, const char *user, const char *rooms,
                  const char *first) {
  open_rec(r, name, token, query);
  hf_answer_start(r, whoami(user), rooms, batch(first));
  CHECK_INT(r->nevents, 1);
  CHECK_STREQ(event_id(r), first);
  taken(r);
  spin();
  settle(r, first);
}

/* Answers every live woken fetch of token with batch(next). Returns how
 * many it answered. */
static int answer_woken(const char *token, const char *next) {
  int n = 0, i;
  while ((i = find_woken(token)) >= 0) {
    answer(i, 200, batch(next));
    n++;
  }
  return n;
}

/* ---------------------------------------------------------------------- */
/* Identities */

static void test_identity_order(void) {
  setup();
  rec a = {0};
  uint64_t initial0 = mx_stats.sync_requests[MX_SYNC_REASON_INITIAL];
  open_rec(&a, "a", "tokA", "filter=1");
  spin();
  /* Who the token is, before anything else. */
  CHECK_INT(F.nreqs, 1);
  CHECK_STREQ(F.reqs[0].path, WHOAMI);
  CHECK_STREQ(F.reqs[0].token, "tokA");
  answer(0, 200, whoami("@u:hs"));
  spin();
  /* The user's rooms, for the index, before the first /sync. */
  CHECK_INT(F.nreqs, 2);
  CHECK_STREQ(F.reqs[1].path, JOINED);
  CHECK_STREQ(F.reqs[1].token, "tokA");
  CHECK_INT(H.nopen, 0);
  const char *rooms = "{\"joined_rooms\":[\"!r:hs\",\"!s:hs\"]}";
  answer(1, 200, rooms);
  CHECK_INT(H.nopen, 1);
  CHECK_STREQ(H.open_user, "@u:hs");
  CHECK_STREQ(H.open_rooms, rooms);
  CHECK_INT(a.ncalls, 0);
  spin();
  /* Only now the first /sync, with the stream's own parameters. */
  CHECK_INT(F.nreqs, 3);
  freq *r = &F.reqs[2];
  CHECK(r->path == NULL);
  CHECK_STREQ(r->token, "tokA");
  CHECK_STREQ(r->query, "filter=1");
  CHECK(r->since == NULL);
  CHECK_INT(r->timeout_ms, 0);
  CHECK_INT(mx_stats.sync_requests[MX_SYNC_REASON_INITIAL], initial0 + 1);
  answer(2, 200, batch("s1"));
  CHECK_INT(a.nstart, 1);
  CHECK_INT(a.start_status, 200);
  CHECK_INT(a.nevents, 1);
  /* The batch hook: the index learns memberships from every batch. */
  CHECK_INT(H.nbatch, 1);
  CHECK_STREQ(H.batch_user, "@u:hs");
  CHECK(H.batch_initial);
  taken(&a);
  spin();
  settle(&a, "s1"); /* the first batch may be an old one: one more fetch */
  CHECK_INT(F.nreqs, 4); /* parked */
  CHECK_INT(live_reqs(), 0);
  mx_sync_hub_wake_user(hub, "@u:hs", 5);
  CHECK(wait_reqs(5, 1.0));
  answer(4, 200, batch("s2"));
  CHECK_INT(H.nbatch, 2);
  CHECK(!H.batch_initial);
  CHECK_INT(H.nclose, 0);
  close_rec(&a);
  CHECK_INT(H.nclose, 1);
  CHECK_STREQ(H.close_user, "@u:hs");
  teardown();
  rec_free(&a);
}

static void test_identity_shared_by_token(void) {
  setup();
  rec a = {0}, b = {0}, c = {0};
  /* Two streams of one token (other parameters, so other feeds). */
  open_rec(&a, "a", "tokA", "filter=1");
  open_rec(&b, "b", "tokA", "filter=2");
  spin();
  CHECK_INT(F.nreqs, 1);
  CHECK_INT(count_reqs(WHOAMI, "tokA"), 1);
  answer(0, 200, whoami("@u:hs"));
  spin();
  CHECK_INT(count_reqs(JOINED, "tokA"), 1);
  CHECK_INT(F.nreqs, 2);
  answer(1, 200, NO_ROOMS);
  spin();
  /* Both go on: one /sync each. */
  CHECK_INT(count_reqs(NULL, "tokA"), 2);
  CHECK_INT(F.nreqs, 4);
  CHECK_INT(H.nopen, 1);
  /* A third stream of the token, once resolved: straight to /sync. */
  open_rec(&c, "c", "tokA", "filter=3");
  spin();
  CHECK_INT(F.nreqs, 5);
  CHECK(F.reqs[4].path == NULL);
  CHECK_STREQ(F.reqs[4].query, "filter=3");
  CHECK_INT(count_reqs(WHOAMI, "tokA"), 1);
  CHECK_INT(H.nopen, 1);
  /* The user closes with its last stream only. */
  close_rec(&a);
  close_rec(&b);
  CHECK_INT(H.nclose, 0);
  close_rec(&c);
  CHECK_INT(H.nclose, 1);
  CHECK_INT(live_reqs(), 0);
  teardown();
  rec_free(&a);
  rec_free(&b);
  rec_free(&c);
}

static void test_second_device(void) {
  setup();
  rec a = {0}, b = {0};
  ready(&a, "a", "tokA", "q", "@u:hs", "{\"joined_rooms\":[\"!r:hs\"]}",
        "a1");
  CHECK_INT(H.nopen, 1);
  int base = F.nreqs;
  /* Another device (token) of the same user: who it is, but the user's
   * rooms are known already. */
  open_rec(&b, "b", "tokB", "q");
  spin();
  CHECK_INT(F.nreqs, base + 1);
  CHECK_STREQ(F.reqs[base].path, WHOAMI);
  CHECK_STREQ(F.reqs[base].token, "tokB");
  answer(base, 200, whoami("@u:hs"));
  spin();
  CHECK_INT(count_reqs(JOINED, "tokB"), 0);
  CHECK_INT(F.nreqs, base + 2);
  CHECK(F.reqs[base + 1].path == NULL);
  CHECK_STREQ(F.reqs[base + 1].token, "tokB");
  CHECK_INT(H.nopen, 1);
  answer(base + 1, 200, batch("b1"));
  taken(&b);
  spin();
  settle(&b, "b1");
  CHECK_INT(F.nreqs, base + 3); /* parked */
  /* One wake of the user reaches both devices. */
  mx_sync_hub_wake_user(hub, "@u:hs", 5);
  CHECK(wait_reqs(base + 5, 1.0));
  CHECK_INT(F.nreqs, base + 5);
  CHECK_INT(answer_woken("tokA", "a2"), 1);
  CHECK_INT(answer_woken("tokB", "b2"), 1);
  CHECK_INT(a.nevents, 2);
  CHECK_INT(b.nevents, 2);
  close_rec(&a);
  CHECK_INT(H.nclose, 0);
  close_rec(&b);
  CHECK_INT(H.nclose, 1);
  teardown();
  rec_free(&a);
  rec_free(&b);
}

static void test_whoami_401(void) {
  setup();
  rec a = {0}, b = {0};
  open_rec(&a, "a", "tokA", "q");
  spin();
  CHECK_INT(F.nreqs, 1);
  const char *err = "{\"errcode\":\"M_UNKNOWN_TOKEN\",\"error\":\"nope\"}";
  answer(0, 401, err);
  spin();
  /* The token's answer is the stream's answer: no rooms, no /sync. */
  CHECK_INT(a.nstart, 1);
  CHECK_INT(a.start_status, 401);
  CHECK_STREQ(a.start_body, err);
  CHECK_INT(a.nevents, 0);
  CHECK_INT(F.nreqs, 1);
  CHECK_INT(H.nopen, 0);
  /* Another stream of the token while the first is still open: the same
   * answer, without asking again. */
  open_rec(&b, "b", "tokA", "q2");
  spin();
  CHECK_INT(b.nstart, 1);
  CHECK_INT(b.start_status, 401);
  CHECK_STREQ(b.start_body, err);
  CHECK_INT(F.nreqs, 1);
  /* Wakes and safety nets change nothing for answered streams. */
  mx_sync_hub_wake_all(hub, MX_SYNC_REASON_SAFETY);
  run_for(0.05);
  CHECK_INT(F.nreqs, 1);
  CHECK_INT(a.ncalls + b.ncalls, 2);
  close_rec(&a);
  close_rec(&b);
  CHECK_INT(H.nclose, 0);
  teardown();
  rec_free(&a);
  rec_free(&b);
}

/* The body a refused token gets is a Matrix error, like a refused /sync's
 * (hub.h, on_start), even when the homeserver's is empty or not JSON. */
static void test_whoami_4xx_body(void) {
  setup();
  rec a = {0};
  open_rec(&a, "a", "tokA", "q");
  spin();
  answer(0, 403, "");
  spin();
  CHECK_INT(a.nstart, 1);
  CHECK_INT(a.start_status, 403);
  size_t n = strlen(a.start_body);
  CHECK(n > 0 && mx_json_scan_validate(a.start_body, n) == 0);
  CHECK(strstr(a.start_body, "\"errcode\"") != NULL);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

static void test_whoami_500_longpolls(void) {
  setup(); /* feed up, fallback on */
  rec a = {0};
  open_rec(&a, "a", "tokA", "q");
  spin();
  answer(0, 500, "{\"errcode\":\"M_UNKNOWN\"}");
  spin();
  /* Not the stream's answer: it goes on without a user. */
  CHECK_INT(a.ncalls, 0);
  CHECK_INT(count_reqs(JOINED, "tokA"), 0);
  CHECK_INT(F.nreqs, 2);
  CHECK(F.reqs[1].path == NULL);
  CHECK(F.reqs[1].since == NULL);
  answer(1, 200, batch("s1"));
  CHECK_INT(a.start_status, 200);
  CHECK_INT(a.nevents, 1);
  CHECK_INT(H.nopen, 0);
  CHECK_INT(H.nbatch, 0); /* no user to tell the index about */
  taken(&a);
  spin();
  /* Nothing can wake it: it long-polls. */
  CHECK_INT(F.nreqs, 3);
  CHECK(F.reqs[2].path == NULL);
  CHECK_STREQ(F.reqs[2].since, "s1");
  CHECK_INT(F.reqs[2].timeout_ms, LONGPOLL_MS);
  answer(2, 200, batch("s2"));
  CHECK_INT(a.nevents, 2);
  taken(&a);
  spin();
  CHECK_INT(F.nreqs, 4);
  CHECK_INT(F.reqs[3].timeout_ms, LONGPOLL_MS);
  close_rec(&a);
  CHECK(F.reqs[3].cancelled);
  CHECK_INT(H.nclose, 0);
  teardown();
  rec_free(&a);
}

/* Unknown user, feed up, no fallback: nothing can wake it but safety nets
 * (and presence), so it parks rather than long-polls. */
static void test_unknown_user_no_fallback_parks(void) {
  hub_cfg c = default_cfg;
  c.fallback = false;
  setup_cfg(&c);
  rec a = {0};
  open_rec(&a, "a", "tokA", "q");
  spin();
  answer(0, 502, "");
  spin();
  answer(find_live(NULL, "tokA"), 200, batch("s1"));
  CHECK_INT(a.nevents, 1);
  taken(&a);
  spin();
  settle(&a, "s1");
  run_for(0.1);
  CHECK_INT(F.nreqs, 3);
  CHECK_INT(live_reqs(), 0);
  mx_sync_hub_wake_all(hub, MX_SYNC_REASON_SAFETY);
  CHECK(wait_reqs(4, 1.0));
  CHECK(is_woken(&F.reqs[3]));
  CHECK_INT(answer_woken("tokA", "s2"), 1);
  CHECK_INT(a.nevents, 2);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

/* joined_rooms fails: the index does not know the user's rooms, so room
 * rows cannot wake the stream. It must behave as if the user were unknown
 * (long-poll, with the fallback), and the user's next device must seed the
 * index. */
static void test_joined_rooms_500_longpolls(void) {
  setup(); /* feed up, fallback on */
  rec a = {0}, b = {0};
  open_rec(&a, "a", "tokA", "q");
  spin();
  answer(0, 200, whoami("@u:hs"));
  spin();
  CHECK_INT(find_live(JOINED, "tokA"), 1);
  answer(1, 503, "{\"errcode\":\"M_UNKNOWN\"}");
  spin();
  CHECK_INT(H.nopen, 0);
  CHECK_INT(a.ncalls, 0);
  int i = find_live(NULL, "tokA");
  CHECK_INT(i, 2);
  answer(i, 200, batch("s1"));
  CHECK_INT(a.nevents, 1);
  taken(&a);
  spin();
  int lp = find_live(NULL, "tokA");
  CHECK(lp >= 0);
  if (lp >= 0) {
    CHECK_STREQ(F.reqs[lp].since, "s1");
    CHECK_INT(F.reqs[lp].timeout_ms, LONGPOLL_MS);
  }
  /* A second device of the user: the index has no rooms for the user
   * yet, so the hub asks for them. */
  open_rec(&b, "b", "tokB", "q");
  spin();
  answer(find_live(WHOAMI, "tokB"), 200, whoami("@u:hs"));
  spin();
  CHECK_INT(count_reqs(JOINED, "tokB"), 1);
  int j = find_live(JOINED, "tokB");
  if (j >= 0)
    answer(j, 200, NO_ROOMS);
  CHECK_INT(H.nopen, 1);
  close_rec(&a);
  close_rec(&b);
  CHECK_INT(H.nclose, H.nopen); /* every close matches an open */
  teardown();
  rec_free(&a);
  rec_free(&b);
}

/* ---------------------------------------------------------------------- */
/* Parking and wakes */

static void test_parks_after_taken(void) {
  setup();
  rec a = {0};
  open_rec(&a, "a", "tokA", "q");
  spin();
  answer(0, 200, whoami("@u:hs"));
  spin();
  answer(1, 200, NO_ROOMS);
  spin();
  answer(2, 200, batch("s1"));
  CHECK_INT(a.nevents, 1);
  /* Not taken: nothing. */
  run_for(0.05);
  CHECK_INT(F.nreqs, 3);
  taken(&a);
  spin();
  /* Taken: one fetch from its position (the first batch may be an old
   * one, from the store or the homeserver's cache); empty: parked, no
   * long-poll, no fetch, for a while. */
  CHECK_INT(F.nreqs, 4);
  CHECK(is_woken(&F.reqs[3]));
  CHECK_STREQ(F.reqs[3].since, "s1");
  answer(3, 200, batch("s1"));
  CHECK_INT(a.nevents, 1);
  run_for(0.3);
  CHECK_INT(F.nreqs, 4);
  CHECK_INT(live_reqs(), 0);
  CHECK_INT(mx_sync_hub_fetches(hub), 0);
  CHECK_INT(a.ncalls, 2);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

static void test_wake_after_debounce(void) {
  hub_cfg c = default_cfg;
  c.debounce = 0.05;
  setup_cfg(&c);
  rec a = {0};
  ready(&a, "a", "tokA", "q", "@u:hs", NO_ROOMS, "s1");
  int base = F.nreqs;
  uint64_t wake0 = mx_stats.sync_requests[MX_SYNC_REASON_WAKE];
  /* Another user's wake, and an unknown user's: nothing. */
  mx_sync_hub_wake_user(hub, "@other:hs", 9);
  mx_sync_hub_wake_user(hub, "@u:hs2", 6);
  run_for(0.1);
  CHECK_INT(F.nreqs, base);

  ev_now_update(loop);
  double t0 = ev_time();
  mx_sync_hub_wake_user(hub, "@u:hs", 5);
  CHECK_INT(F.nreqs, base); /* nothing from inside the wake */
  CHECK(wait_reqs(base + 1, 1.0));
  CHECK_INT(F.nreqs, base + 1);
  freq *r = &F.reqs[base];
  CHECK(r->path == NULL);
  CHECK_STREQ(r->token, "tokA");
  CHECK_STREQ(r->query, "q");
  CHECK_STREQ(r->since, "s1");
  CHECK_INT(r->timeout_ms, 0);
  CHECK(!r->full_state);
  /* Not before the debounce. */
  if (r->t_start - t0 < 0.045)
    printf("# fetched %.3f s after the wake\n", r->t_start - t0);
  CHECK(r->t_start - t0 >= 0.045);
  CHECK_INT(mx_stats.sync_requests[MX_SYNC_REASON_WAKE], wake0 + 1);
  answer(base, 200, batch("s2"));
  CHECK_INT(a.nevents, 2);
  CHECK_STREQ(event_id(&a), "s2");
  taken(&a);
  run_for(0.15);
  CHECK_INT(F.nreqs, base + 1); /* parked again */
  close_rec(&a);
  teardown();
  rec_free(&a);
}

static void test_wake_burst_one_fetch(void) {
  hub_cfg c = default_cfg;
  c.debounce = 0.05;
  setup_cfg(&c);
  rec a = {0};
  ready(&a, "a", "tokA", "q", "@u:hs", NO_ROOMS, "s1");
  int base = F.nreqs;
  for (int i = 0; i < 5; i++) {
    mx_sync_hub_wake_user(hub, "@u:hs", 5);
    ev_run(loop, EVRUN_NOWAIT);
  }
  run_for(0.15);
  CHECK_INT(F.nreqs, base + 1);
  CHECK_INT(live_woken(), 1);
  CHECK_INT(answer_woken("tokA", "s2"), 1);
  taken(&a);
  /* The burst was one change: no second fetch. */
  run_for(0.15);
  CHECK_INT(F.nreqs, base + 1);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

/* A woken fetch that finds nothing: no event, parked again. */
static void test_empty_wake_parks(void) {
  setup();
  rec a = {0};
  ready(&a, "a", "tokA", "q", "@u:hs", NO_ROOMS, "s1");
  int base = F.nreqs;
  mx_sync_hub_wake_user(hub, "@u:hs", 5);
  CHECK(wait_reqs(base + 1, 1.0));
  CHECK_INT(answer_woken("tokA", "s1"), 1);
  CHECK_INT(a.nevents, 1);
  run_for(0.1);
  CHECK_INT(F.nreqs, base + 1);
  mx_sync_hub_wake_user(hub, "@u:hs", 5);
  CHECK(wait_reqs(base + 2, 1.0));
  CHECK_STREQ(F.reqs[base + 1].since, "s1");
  CHECK_INT(answer_woken("tokA", "s2"), 1);
  CHECK_INT(a.nevents, 2);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

/* A first batch, and what follows it, may be older than the present: a
 * batch from the replay store, or an answer the homeserver had cached for
 * this device and position (another node asked before a failover). Had
 * the stream parked on it, what happened since would wait for the next
 * wake. It fetches from each new position until an answer is empty, and
 * only then parks; later wakes cost one fetch each. */
static void test_catches_up_before_parking(void) {
  setup();
  rec a = {0};
  open_rec(&a, "a", "tokA", "q");
  hf_answer_start(&a, whoami("@u:hs"), NO_ROOMS, batch("s1"));
  CHECK_INT(a.nevents, 1);
  taken(&a);
  spin();
  int i = find_woken("tokA");
  CHECK(i >= 0 && same(F.reqs[i].since, "s1"));
  answer(i, 200, batch("s2")); /* the homeserver's cached answer */
  CHECK_INT(a.nevents, 2);
  taken(&a);
  spin();
  i = find_woken("tokA");
  CHECK(i >= 0 && same(F.reqs[i].since, "s2"));
  answer(i, 200, batch("s2")); /* empty: the present */
  CHECK_INT(a.nevents, 2);
  int n = F.nreqs;
  run_for(0.1);
  CHECK_INT(F.nreqs, n); /* parked */
  mx_sync_hub_wake_user(hub, "@u:hs", 5);
  CHECK(wait_reqs(n + 1, 1.0));
  CHECK_INT(answer_woken("tokA", "s3"), 1);
  CHECK_INT(a.nevents, 3);
  taken(&a);
  run_for(0.1);
  CHECK_INT(F.nreqs, n + 1); /* one fetch for the wake */
  close_rec(&a);
  teardown();
  rec_free(&a);
}

static void test_two_tabs_one_fetch(void) {
  setup();
  rec a = {0}, b = {0};
  open_rec(&a, "a", "tokA", "q");
  open_rec(&b, "b", "tokA", "q");
  spin();
  CHECK_INT(F.nreqs, 1);
  answer(0, 200, whoami("@u:hs"));
  spin();
  answer(1, 200, NO_ROOMS);
  spin();
  CHECK_INT(F.nreqs, 3); /* one first /sync for both tabs */
  answer(2, 200, batch("s1"));
  CHECK_INT(a.nevents, 1);
  CHECK_INT(b.nevents, 1);
  taken(&a);
  taken(&b);
  spin();
  settle(&a, "s1"); /* one catch-up fetch for both tabs */
  CHECK_INT(F.nreqs, 4);
  uint64_t wake0 = mx_stats.sync_requests[MX_SYNC_REASON_WAKE];
  mx_sync_hub_wake_user(hub, "@u:hs", 5);
  CHECK(wait_reqs(5, 1.0));
  run_for(0.05);
  CHECK_INT(F.nreqs, 5);
  CHECK_INT(mx_stats.sync_requests[MX_SYNC_REASON_WAKE], wake0 + 1);
  CHECK_INT(answer_woken("tokA", "s2"), 1);
  CHECK_INT(a.nevents, 2);
  CHECK_INT(b.nevents, 2);
  CHECK(a.events[1] != NULL && a.events[1] == b.events[1]);
  CHECK_STREQ(event_id(&b), "s2");
  close_rec(&a);
  close_rec(&b);
  teardown();
  rec_free(&a);
  rec_free(&b);
}

static void test_wake_in_flight_refetch(void) {
  hub_cfg c = default_cfg;
  c.debounce = 0.3; /* a refetch through the queue would come this late */
  setup_cfg(&c);
  rec a = {0};
  ready(&a, "a", "tokA", "q", "@u:hs", NO_ROOMS, "s1");
  int base = F.nreqs;
  mx_sync_hub_wake_user(hub, "@u:hs", 5);
  CHECK(wait_reqs(base + 1, 2.0));
  /* Woken again while its fetch is in flight: no second fetch now. */
  mx_sync_hub_wake_user(hub, "@u:hs", 5);
  run_for(0.05);
  CHECK_INT(F.nreqs, base + 1);
  CHECK_INT(answer_woken("tokA", "s2"), 1);
  CHECK_INT(a.nevents, 2);
  run_for(0.05);
  CHECK_INT(F.nreqs, base + 1); /* not before taken */
  taken(&a);
  spin();
  /* Right after taken, without another debounce. */
  CHECK_INT(F.nreqs, base + 2);
  CHECK(is_woken(&F.reqs[base + 1]));
  CHECK_STREQ(F.reqs[base + 1].since, "s2");
  CHECK_INT(answer_woken("tokA", "s3"), 1);
  /* Woken while holding an event it has not taken: the same. */
  mx_sync_hub_wake_user(hub, "@u:hs", 5);
  run_for(0.05);
  CHECK_INT(F.nreqs, base + 2);
  taken(&a);
  spin();
  CHECK_INT(F.nreqs, base + 3);
  CHECK_STREQ(F.reqs[base + 2].since, "s3");
  CHECK_INT(answer_woken("tokA", "s4"), 1);
  taken(&a);
  run_for(0.4);
  CHECK_INT(F.nreqs, base + 3); /* clean again: parked */
  close_rec(&a);
  teardown();
  rec_free(&a);
}

/* A woken stream's initial /sync still in flight: refetch once taken. */
static void test_wake_during_first_sync(void) {
  hub_cfg c = default_cfg;
  c.debounce = 0.3;
  setup_cfg(&c);
  rec a = {0};
  open_rec(&a, "a", "tokA", "q");
  spin();
  answer(0, 200, whoami("@u:hs"));
  spin();
  answer(1, 200, NO_ROOMS);
  spin();
  CHECK_INT(F.nreqs, 3);
  mx_sync_hub_wake_user(hub, "@u:hs", 5);
  run_for(0.05);
  CHECK_INT(F.nreqs, 3);
  answer(2, 200, batch("s1"));
  taken(&a);
  spin();
  CHECK_INT(F.nreqs, 4);
  CHECK(is_woken(&F.reqs[3]));
  CHECK_INT(answer_woken("tokA", "s2"), 1);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

/* ---------------------------------------------------------------------- */
/* The cap on concurrent woken fetches */

#define NUSERS 5
static const char *const tokens[NUSERS] = {"t0", "t1", "t2", "t3", "t4"};
static const char *const users[NUSERS] = {"@u0:hs", "@u1:hs", "@u2:hs",
                                          "@u3:hs", "@u4:hs"};

/* Answers live woken fetches (each with a new batch, taken at once) until
 * every stream got `want` events or max seconds pass. */
static void serve_all(rec *r, int want, double max) {
  double end = ev_time() + max;
  for (;;) {
    bool done = true;
    for (int u = 0; u < NUSERS; u++)
      done = done && r[u].nevents >= want;
    if (done || ev_time() >= end)
      break;
    for (int u = 0; u < NUSERS; u++) {
      int i = find_live(NULL, tokens[u]);
      if (i >= 0 && is_woken(&F.reqs[i])) {
        char next[16];
        snprintf(next, sizeof(next), "w%d", u);
        answer(i, 200, batch(next));
        taken(&r[u]);
        break; /* one at a time: the others keep waiting */
      }
    }
    ev_run(loop, EVRUN_NOWAIT);
    usleep(500);
  }
}

static void test_max_fetches(void) {
  hub_cfg c = default_cfg;
  c.max_fetches = 2;
  setup_cfg(&c);
  rec r[NUSERS] = {{0}};
  for (int u = 0; u < NUSERS; u++)
    ready(&r[u], "r", tokens[u], "q", users[u], NO_ROOMS, "s1");
  int base = F.nreqs;
  F.max_live_woken = 0;
  for (int u = 0; u < NUSERS; u++)
    mx_sync_hub_wake_user(hub, users[u], strlen(users[u]));
  CHECK(wait_reqs(base + 2, 1.0));
  run_for(0.1);
  /* Two in flight, three waiting for a slot. */
  CHECK_INT(F.nreqs, base + 2);
  CHECK_INT(live_woken(), 2);
  serve_all(r, 2, 3.0);
  for (int u = 0; u < NUSERS; u++) {
    CHECK_INT(r[u].nevents, 2);
    CHECK_STREQ(event_id(&r[u]), u == 0   ? "w0"
                                 : u == 1 ? "w1"
                                 : u == 2 ? "w2"
                                 : u == 3 ? "w3"
                                          : "w4");
  }
  CHECK_INT(F.nreqs, base + NUSERS); /* one fetch each */
  CHECK(F.max_live_woken <= 2);
  if (F.max_live_woken > 2)
    printf("# %d woken fetches at once\n", F.max_live_woken);
  for (int u = 0; u < NUSERS; u++)
    close_rec(&r[u]);
  teardown();
  for (int u = 0; u < NUSERS; u++)
    rec_free(&r[u]);
}

/* The feed comes back while every stream long-polls: the safety net is a
 * woken fetch per stream and must respect the cap like any wake (this is
 * when every stream fetches at once: a Redis reconnect). */
static void test_max_fetches_safety_net(void) {
  hub_cfg c = default_cfg;
  c.max_fetches = 2;
  c.feed_up = false;
  setup_cfg(&c);
  rec r[NUSERS] = {{0}};
  for (int u = 0; u < NUSERS; u++)
    ready(&r[u], "r", tokens[u], "q", users[u], NO_ROOMS, "s1");
  for (int u = 0; u < NUSERS; u++) {
    int i = find_live(NULL, tokens[u]);
    CHECK(i >= 0 && F.reqs[i].timeout_ms == LONGPOLL_MS);
  }
  F.max_live_woken = 0;
  mx_sync_hub_set_feed_up(hub, true);
  spin();
  run_for(0.1);
  CHECK(live_woken() <= 2);
  serve_all(r, 2, 3.0);
  for (int u = 0; u < NUSERS; u++)
    CHECK_INT(r[u].nevents, 2);
  if (F.max_live_woken > 2)
    printf("# %d woken fetches at once\n", F.max_live_woken);
  CHECK(F.max_live_woken <= 2);
  for (int u = 0; u < NUSERS; u++)
    close_rec(&r[u]);
  teardown();
  for (int u = 0; u < NUSERS; u++)
    rec_free(&r[u]);
}

/* A stream woken while holding an event refetches once taken; that fetch
 * is a woken fetch too and waits for a slot when the cap is reached. */
static void test_max_fetches_dirty_refetch(void) {
  hub_cfg c = default_cfg;
  c.max_fetches = 1;
  setup_cfg(&c);
  rec a = {0}, b = {0};
  ready(&a, "a", "tA", "q", "@a:hs", NO_ROOMS, "a1");
  /* b gets its first batch but does not take it yet. */
  open_rec(&b, "b", "tB", "q");
  for (int guard = 0; guard < 8 && b.nevents == 0; guard++) {
    spin();
    int i;
    if ((i = find_live(WHOAMI, "tB")) >= 0)
      answer(i, 200, whoami("@b:hs"));
    else if ((i = find_live(JOINED, "tB")) >= 0)
      answer(i, 200, NO_ROOMS);
    else if ((i = find_live(NULL, "tB")) >= 0)
      answer(i, 200, batch("b1"));
  }
  CHECK_INT(b.nevents, 1);
  F.max_live_woken = 0;
  mx_sync_hub_wake_user(hub, "@a:hs", 5);
  mx_sync_hub_wake_user(hub, "@b:hs", 5);
  run_for(0.05);
  CHECK_INT(live_woken(), 1); /* a's */
  taken(&b);
  run_for(0.05);
  CHECK_INT(live_woken(), 1); /* b waits for a's slot */
  CHECK(F.max_live_woken <= 1);
  CHECK_INT(answer_woken("tA", "a2"), 1);
  run_for(0.05);
  CHECK_INT(answer_woken("tB", "b2"), 1);
  CHECK_INT(a.nevents, 2);
  CHECK_INT(b.nevents, 2);
  close_rec(&a);
  close_rec(&b);
  teardown();
  rec_free(&a);
  rec_free(&b);
}

/* Urgent wakes (news in a stream's rooms) take the slots before
 * background ones (a room-mate's presence): one presence change of a user
 * in many rooms must not make the messages behind it wait for all of it.
 * A background wake waits a little first; an urgent wake of a stream in
 * the background queue moves it to the urgent one. */
static void test_urgent_before_background(void) {
  hub_cfg c = default_cfg;
  c.max_fetches = 1;
  c.debounce = 0;
  setup_cfg(&c);
  rec r[NUSERS] = {{0}};
  for (int u = 0; u < NUSERS; u++)
    ready(&r[u], "r", tokens[u], "q", users[u], NO_ROOMS, "s1");
  uint64_t bg0 = mx_stats.wakes_background, ur0 = mx_stats.wakes_urgent;
  for (int u = 0; u < 3; u++)
    mx_sync_hub_wake_user_background(hub, users[u], strlen(users[u]));
  mx_sync_hub_wake_user(hub, users[3], strlen(users[3]));
  run_for(0.03);
  /* The urgent one goes first, the background ones have not waited
   * long enough yet. */
  CHECK_INT(live_woken(), 1);
  CHECK_INT(find_woken(tokens[3]) >= 0, 1);
  CHECK_INT(answer_woken(tokens[3], "w3"), 1);
  taken(&r[3]);
  /* u1 gets news of its own while it waits in the background queue. */
  mx_sync_hub_wake_user(hub, users[1], strlen(users[1]));
  run_for(0.03);
  CHECK_INT(live_woken(), 1);
  CHECK_INT(find_woken(tokens[1]) >= 0, 1);
  CHECK_INT(answer_woken(tokens[1], "w1"), 1);
  taken(&r[1]);
  /* Now the background queue: u0, then u2 -- but u4's message, woken
   * while u0's fetch is in flight, goes before u2. */
  double end = ev_time() + 1.0;
  while (find_woken(tokens[0]) < 0 && ev_time() < end)
    run_for(0.01);
  CHECK_INT(live_woken(), 1);
  mx_sync_hub_wake_user(hub, users[4], strlen(users[4]));
  CHECK_INT(answer_woken(tokens[0], "w0"), 1);
  taken(&r[0]);
  run_for(0.03);
  CHECK_INT(find_woken(tokens[4]) >= 0, 1);
  CHECK_INT(find_woken(tokens[2]) < 0, 1);
  CHECK_INT(answer_woken(tokens[4], "w4"), 1);
  taken(&r[4]);
  end = ev_time() + 1.0;
  while (find_woken(tokens[2]) < 0 && ev_time() < end)
    run_for(0.01);
  CHECK_INT(answer_woken(tokens[2], "w2"), 1);
  taken(&r[2]);
  spin();
  for (int u = 0; u < NUSERS; u++)
    CHECK_INT(r[u].nevents, 2);
  CHECK(F.max_live_woken <= 1);
  CHECK_INT(mx_stats.wakes_background - bg0, 3);
  CHECK_INT(mx_stats.wakes_urgent - ur0, 3);
  for (int u = 0; u < NUSERS; u++)
    close_rec(&r[u]);
  teardown();
  for (int u = 0; u < NUSERS; u++)
    rec_free(&r[u]);
}

/* A flood of background wakes that waited long gets one slot in
 * MX_SYNC_BACKGROUND_SHARE while urgent wakes queue: neither starves the
 * other. One slot; u0 waits in the background queue past its max wait
 * while u1..u4 keep sending messages. */
static void test_background_share(void) {
  hub_cfg c = default_cfg;
  c.max_fetches = 1;
  c.debounce = 0;
  c.background_max_wait = 0.15;
  setup_cfg(&c);
  rec r[NUSERS] = {{0}};
  for (int u = 0; u < NUSERS; u++)
    ready(&r[u], "r", tokens[u], "q", users[u], NO_ROOMS, "s1");
  /* u1 holds the only slot while u0's background wake ages. */
  mx_sync_hub_wake_user(hub, users[1], strlen(users[1]));
  run_for(0.02);
  CHECK_INT(find_woken(tokens[1]) >= 0, 1);
  mx_sync_hub_wake_user_background(hub, users[0], strlen(users[0]));
  for (int u = 2; u < NUSERS; u++)
    mx_sync_hub_wake_user(hub, users[u], strlen(users[u]));
  run_for(0.2);
  /* Answer in turn; record who got each slot. */
  char order[8] = {0};
  int k = 0, round = 0;
  for (; k < 5 && round < 200; round++) {
    int got = -1;
    for (int u = 0; u < NUSERS && got < 0; u++)
      if (find_woken(tokens[u]) >= 0)
        got = u;
    if (got < 0) {
      run_for(0.01);
      continue;
    }
    order[k++] = (char)('0' + got);
    char next[16];
    snprintf(next, sizeof(next), "w%d", got);
    CHECK_INT(answer_woken(tokens[got], next), 1);
    taken(&r[got]);
    /* u1 keeps getting news: the urgent queue never empties. */
    if (got == 1)
      mx_sync_hub_wake_user(hub, users[1], strlen(users[1]));
    run_for(0.01);
  }
  /* u1's slot, then three urgent ones (u2, u3, u4 or u1 again) before
   * the old background wake's turn, not after all urgent ones. */
  CHECK_INT(k, 5);
  CHECK_INT(order[0], '1');
  CHECK_INT(order[4] == '0' || order[3] == '0', 1);
  if (!(order[4] == '0' || order[3] == '0'))
    printf("# order %s\n", order);
  for (int u = 0; u < NUSERS; u++)
    close_rec(&r[u]);
  teardown();
  for (int u = 0; u < NUSERS; u++)
    rec_free(&r[u]);
}

/* The catch-up check after a stream's first batches is a background
 * fetch: it does not take a free slot past a background wake queued
 * before it (while many streams connect, the checks must not hold back
 * the messages either). */
static void test_catch_up_check_in_background(void) {
  hub_cfg c = default_cfg;
  c.max_fetches = 1;
  c.debounce = 0;
  setup_cfg(&c);
  rec a = {0}, b = {0};
  ready(&b, "b", "tokB", "q", "@b:hs", NO_ROOMS, "b1");
  open_rec(&a, "a", "tokA", "q");
  hf_answer_start(&a, whoami("@a:hs"), NO_ROOMS, batch("a1"));
  CHECK_INT(a.nevents, 1);
  mx_sync_hub_wake_user_background(hub, "@b:hs", 5);
  taken(&a); /* its check waits behind b's wake */
  spin();
  CHECK_INT(live_woken(), 0);
  double end = ev_time() + 1.0;
  while (live_woken() == 0 && ev_time() < end)
    run_for(0.01);
  CHECK_INT(find_woken("tokB") >= 0, 1);
  CHECK_INT(find_woken("tokA") < 0, 1);
  CHECK_INT(answer_woken("tokB", "b1"), 1); /* empty */
  end = ev_time() + 1.0;
  while (find_woken("tokA") < 0 && ev_time() < end)
    run_for(0.01);
  CHECK_INT(answer_woken("tokA", "a1"), 1); /* empty: the present */
  close_rec(&a);
  close_rec(&b);
  teardown();
  rec_free(&a);
  rec_free(&b);
}

/* A presence row and the message row right behind it (Synapse publishes
 * both when a user sends): one fetch, timed from the message's wake. */
static void test_background_then_urgent_one_fetch(void) {
  hub_cfg c = default_cfg;
  c.debounce = 0;
  setup_cfg(&c);
  rec a = {0};
  ready(&a, "a", "tokA", "q", "@a:hs", NO_ROOMS, "a1");
  int base = F.nreqs;
  mx_sync_hub_wake_user_background(hub, "@a:hs", 5);
  run_for(0.02);
  CHECK_INT(F.nreqs, base); /* the background delay */
  mx_sync_hub_wake_user(hub, "@a:hs", 5);
  CHECK(wait_reqs(base + 1, 1.0));
  run_for(0.15);
  CHECK_INT(F.nreqs, base + 1);
  CHECK_INT(answer_woken("tokA", "a2"), 1);
  taken(&a);
  spin();
  CHECK_INT(a.nevents, 2);
  CHECK_INT(F.nreqs, base + 1);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

/* ---------------------------------------------------------------------- */
/* The feed going down and up */

static void test_feed_down_longpolls(void) {
  setup(); /* feed up, fallback on */
  rec a = {0}, b = {0};
  ready(&a, "a", "tokA", "q", "@a:hs", NO_ROOMS, "a1");
  ready(&b, "b", "tokB", "q", "@b:hs", NO_ROOMS, "b1");
  int base = F.nreqs;
  run_for(0.05);
  CHECK_INT(F.nreqs, base);
  mx_sync_hub_set_feed_up(hub, false);
  spin();
  /* Parked streams long-poll from their positions. */
  CHECK_INT(F.nreqs, base + 2);
  int ia = find_live(NULL, "tokA"), ib = find_live(NULL, "tokB");
  CHECK(ia >= 0 && ib >= 0);
  if (ia >= 0 && ib >= 0) {
    CHECK_INT(F.reqs[ia].timeout_ms, LONGPOLL_MS);
    CHECK_STREQ(F.reqs[ia].since, "a1");
    CHECK_INT(F.reqs[ib].timeout_ms, LONGPOLL_MS);
    CHECK_STREQ(F.reqs[ib].since, "b1");
    answer(ia, 200, batch("a2"));
  }
  CHECK_INT(a.nevents, 2);
  taken(&a);
  spin();
  /* And keep long-polling while the feed is down. */
  int ia2 = find_live(NULL, "tokA");
  CHECK(ia2 > ia);
  if (ia2 >= 0) {
    CHECK_INT(F.reqs[ia2].timeout_ms, LONGPOLL_MS);
    CHECK_STREQ(F.reqs[ia2].since, "a2");
  }
  close_rec(&a);
  close_rec(&b);
  teardown();
  rec_free(&a);
  rec_free(&b);
}

static void test_feed_up_cancels_longpolls(void) {
  hub_cfg c = default_cfg;
  c.feed_up = false; /* starts down: streams long-poll */
  setup_cfg(&c);
  rec a = {0}, b = {0};
  ready(&a, "a", "tokA", "q", "@a:hs", NO_ROOMS, "a1");
  ready(&b, "b", "tokB", "q", "@b:hs", NO_ROOMS, "b1");
  int la = find_live(NULL, "tokA"), lb = find_live(NULL, "tokB");
  CHECK(la >= 0 && F.reqs[la].timeout_ms == LONGPOLL_MS);
  CHECK(lb >= 0 && F.reqs[lb].timeout_ms == LONGPOLL_MS);
  int base = F.nreqs;
  int cancels = F.ncancels;
  uint64_t safety0 = mx_stats.sync_requests[MX_SYNC_REASON_SAFETY];
  mx_sync_hub_set_feed_up(hub, true);
  /* The long-polls are left at once... */
  CHECK(la >= 0 && F.reqs[la].cancelled);
  CHECK(lb >= 0 && F.reqs[lb].cancelled);
  CHECK_INT(F.ncancels, cancels + 2);
  spin();
  /* ...and each stream fetches what the feed may have missed. */
  CHECK_INT(F.nreqs, base + 2);
  CHECK_INT(live_woken(), 2);
  CHECK_INT(mx_stats.sync_requests[MX_SYNC_REASON_SAFETY], safety0 + 2);
  int sa = find_live(NULL, "tokA"), sb = find_live(NULL, "tokB");
  CHECK(sa >= 0 && same(F.reqs[sa].since, "a1"));
  CHECK(sb >= 0 && same(F.reqs[sb].since, "b1"));
  CHECK_INT(answer_woken("tokA", "a2"), 1); /* something was missed */
  CHECK_INT(answer_woken("tokB", "b1"), 1); /* nothing */
  CHECK_INT(a.nevents, 2);
  CHECK_INT(b.nevents, 1);
  taken(&a);
  /* a's answer may be an old one (it never had an empty answer): once
   * more from its position. Then both park. */
  spin();
  settle(&a, "a2");
  run_for(0.15);
  CHECK_INT(F.nreqs, base + 3);
  CHECK_INT(live_reqs(), 0);
  close_rec(&a);
  close_rec(&b);
  teardown();
  rec_free(&a);
  rec_free(&b);
}

/* Parked streams woken by the safety net when the feed comes up. */
static void test_feed_up_wakes_parked(void) {
  hub_cfg c = default_cfg;
  c.fallback = false;
  c.feed_up = false;
  setup_cfg(&c);
  rec a = {0};
  ready(&a, "a", "tokA", "q", "@a:hs", NO_ROOMS, "a1");
  int base = F.nreqs;
  run_for(0.05);
  CHECK_INT(F.nreqs, base); /* down, no fallback: parked */
  mx_sync_hub_set_feed_up(hub, true);
  CHECK(wait_reqs(base + 1, 1.0));
  CHECK(is_woken(&F.reqs[base]));
  CHECK_INT(answer_woken("tokA", "a2"), 1);
  taken(&a);
  run_for(0.05);
  CHECK_INT(F.nreqs, base + 1);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

static void test_no_fallback_parks_when_down(void) {
  hub_cfg c = default_cfg;
  c.fallback = false;
  setup_cfg(&c);
  rec a = {0}, b = {0};
  ready(&a, "a", "tokA", "q", "@a:hs", NO_ROOMS, "a1");
  int base = F.nreqs;
  mx_sync_hub_set_feed_up(hub, false);
  run_for(0.15);
  CHECK_INT(F.nreqs, base);
  CHECK_INT(live_reqs(), 0);
  /* A stream opened while the feed is down parks too. */
  ready(&b, "b", "tokB", "q", "@b:hs", NO_ROOMS, "b1");
  base = F.nreqs;
  run_for(0.15);
  CHECK_INT(F.nreqs, base);
  /* So does one whose user is unknown (whoami failed)... */
  rec d = {0};
  open_rec(&d, "d", "tokD", "q");
  spin();
  answer(find_live(WHOAMI, "tokD"), 502, "");
  spin();
  answer(find_live(NULL, "tokD"), 200, batch("d1"));
  CHECK_INT(d.nevents, 1);
  taken(&d);
  spin();
  settle(&d, "d1");
  base = F.nreqs;
  run_for(0.15);
  CHECK_INT(F.nreqs, base);
  /* ...and the safety net still reaches it. */
  mx_sync_hub_wake_all(hub, MX_SYNC_REASON_SAFETY);
  CHECK(wait_reqs(base + 3, 1.0));
  CHECK_INT(live_woken(), 3);
  CHECK_INT(answer_woken("tokD", "d2"), 1);
  CHECK_INT(d.nevents, 2);
  close_rec(&a);
  close_rec(&b);
  close_rec(&d);
  teardown();
  rec_free(&a);
  rec_free(&b);
  rec_free(&d);
}

/* ---------------------------------------------------------------------- */
/* Presence */

static void test_presence_wake(void) {
  hub_cfg c = default_cfg;
  c.presence = 0.2;
  setup_cfg(&c);
  rec a = {0}, b = {0};
  ready(&a, "a", "tokA", "filter=1", "@a:hs", NO_ROOMS, "a1");
  double parked = ev_time();
  ready(&b, "b", "tokB", "filter=1&set_presence=offline", "@b:hs", NO_ROOMS,
        "b1");
  int base = F.nreqs;
  uint64_t pres0 = mx_stats.sync_requests[MX_SYNC_REASON_PRESENCE];
  uint64_t w0 = mx_stats.wake_to_delivery.count;
  CHECK(wait_reqs(base + 1, 1.0));
  int i = find_live(NULL, "tokA");
  CHECK(i >= 0);
  if (i >= 0) {
    /* About one interval after its last sync, not earlier. */
    double after = F.reqs[i].t_start - parked;
    if (after < 0.15)
      printf("# presence sync %.3f s after parking\n", after);
    CHECK(after >= 0.15);
    CHECK(is_woken(&F.reqs[i]));
    CHECK_STREQ(F.reqs[i].since, "a1");
  }
  CHECK_INT(mx_stats.sync_requests[MX_SYNC_REASON_PRESENCE], pres0 + 1);
  CHECK_INT(answer_woken("tokA", "a1"), 1); /* nothing new */
  CHECK_INT(a.nevents, 1);
  /* Again one interval later; never for the offline stream. */
  CHECK(wait_reqs(base + 2, 1.0));
  CHECK_INT(answer_woken("tokA", "a2"), 1);
  CHECK_INT(a.nevents, 2);
  /* A presence sync is not a wake: no wake-to-delivery sample. */
  CHECK_INT(mx_stats.wake_to_delivery.count, w0);
  taken(&a);
  run_for(0.1);
  CHECK_INT(count_reqs(NULL, "tokB"), 2); /* its first /sync and the
                                           * catch-up only */
  CHECK_INT(b.nevents, 1);
  close_rec(&a);
  close_rec(&b);
  teardown();
  rec_free(&a);
  rec_free(&b);
}

/* The presence relay: streams that show presence are handed to it with
 * their device (online or unavailable), their keep-online syncs stop while
 * it is up and come back when it is not, a device it cannot take keeps
 * syncing, and closing hands the stream back. */
static struct {
  int opens, closes, refuse;
  bool up;
  char user[64], device[64];
  bool online;
} R;

static int relay_open(void *ud, const char *u, size_t ul, const char *d,
                      size_t dl, bool online) {
  if (dl == 3 && !memcmp(d, "BAD", 3))
    return R.refuse++, -1;
  R.opens++;
  copy(R.user, sizeof(R.user), u, ul);
  copy(R.device, sizeof(R.device), d, dl);
  R.online = online;
  return 0;
}
static void relay_close(void *ud, const char *u, size_t ul, const char *d,
                        size_t dl, bool online) {
  R.closes++;
  CHECK(dl == 3 && !memcmp(d, "DEV", 3) && online == R.online);
}
static bool relay_up(void *ud) { return R.up; }

static const char *whoami_dev(const char *user, const char *device) {
  static char b[2][128];
  static int n;
  char *o = b[n++ % 2];
  snprintf(o, 128, "{\"user_id\":\"%s\",\"device_id\":\"%s\"}", user,
           device);
  return o;
}

static void relay_ready(rec *r, const char *token, const char *query,
                        const char *user, const char *device) {
  open_rec(r, token, token, query);
  hf_answer_start(r, whoami_dev(user, device), NO_ROOMS, batch("x1"));
  CHECK_INT(r->nevents, 1);
  taken(r);
  spin();
  settle(r, "x1");
}

static void test_presence_relay(void) {
  hub_cfg c = default_cfg;
  c.presence = 0.2;
  setup_cfg(&c);
  memset(&R, 0, sizeof(R));
  R.up = true;
  mx_sync_presence_ops ops = {relay_open, relay_close, relay_up, NULL};
  mx_sync_hub_set_presence(hub, &ops);
  rec a = {0}, b = {0}, u = {0}, bad = {0};
  relay_ready(&a, "tokA", "filter=1", "@a:hs", "DEV");
  CHECK_INT(R.opens, 1);
  CHECK_STREQ(R.user, "@a:hs");
  CHECK_STREQ(R.device, "DEV");
  CHECK(R.online);
  relay_ready(&b, "tokB", "set_presence=offline", "@b:hs", "DEV");
  CHECK_INT(R.opens, 1); /* offline streams show no presence */
  relay_ready(&bad, "tokX", "filter=1", "@x:hs", "BAD");
  CHECK_INT(R.refuse, 1);
  /* Relayed and up: no keep-online syncs (the first /sync and the
   * catch-up only); the refused one keeps them. */
  run_for(0.5);
  CHECK_INT(count_reqs(NULL, "tokA"), 2);
  CHECK(count_reqs(NULL, "tokX") >= 2);
  answer_woken("tokX", "x1");
  /* The relay down: the syncs come back. */
  R.up = false;
  run_for(0.4);
  CHECK(count_reqs(NULL, "tokA") >= 2);
  answer_woken("tokA", "x1");
  R.up = true;
  /* Keepalive mode: one sync on one of the user's presence streams. */
  int before = count_reqs(NULL, "tokA");
  CHECK_INT(mx_sync_hub_presence_keepalive(hub, "@a:hs", 5), 0);
  CHECK(wait_reqs(F.nreqs + 1, 1.0));
  CHECK_INT(count_reqs(NULL, "tokA"), before + 1);
  answer_woken("tokA", "x1");
  CHECK_INT(mx_sync_hub_presence_keepalive(hub, "@nobody:hs", 10),
            MX_ERR_NOTFOUND);
  CHECK_INT(mx_sync_hub_presence_keepalive(hub, "@b:hs", 5),
            MX_ERR_NOTFOUND); /* only offline streams */
  /* Unavailable streams are handed over as such. */
  relay_ready(&u, "tokU", "set_presence=unavailable", "@u:hs", "DEV");
  CHECK_INT(R.opens, 2);
  CHECK(!R.online);
  close_rec(&u);
  spin();
  CHECK_INT(R.closes, 1);
  R.online = true;
  close_rec(&a);
  spin();
  CHECK_INT(R.closes, 2);
  close_rec(&b);
  close_rec(&bad);
  teardown();
  rec_free(&a);
  rec_free(&b);
  rec_free(&u);
  rec_free(&bad);
}

/* Wakes user (whose only stream is r), checks whether the woken fetch
 * leaves presence alone, answers it with `next` and takes the event. */
static void wake_expect_presence(rec *r, const char *user, const char *next,
                                 bool off) {
  mx_sync_hub_wake_user(hub, user, strlen(user));
  CHECK(wait_reqs(F.nreqs + 1, 1.0));
  int i = find_woken(r->token);
  CHECK(i >= 0);
  if (i < 0)
    return;
  CHECK(F.reqs[i].presence_off == off);
  answer(i, 200, batch(next));
  taken(r);
  spin();
}

/* While the relay shows a stream's presence, its woken fetches leave
 * presence alone (set_presence=offline); a keepalive the relay asks for,
 * a first batch and every fetch while the relay is down show it, and so
 * do the fetches of a device the relay did not take. */
static void test_woken_fetch_presence(void) {
  setup();
  memset(&R, 0, sizeof(R));
  R.up = true;
  mx_sync_presence_ops ops = {relay_open, relay_close, relay_up, NULL};
  mx_sync_hub_set_presence(hub, &ops);
  rec a = {0}, x = {0};
  relay_ready(&a, "tokA", "filter=1", "@a:hs", "DEV");
  for (int k = 0; k < F.nreqs; k++)
    if (!F.reqs[k].path && same(F.reqs[k].token, "tokA") && !F.reqs[k].since)
      CHECK(!F.reqs[k].presence_off); /* the first batch */
  relay_ready(&x, "tokX", "filter=1", "@x:hs", "BAD");
  /* A wake: quiet. */
  mx_sync_hub_wake_user(hub, "@a:hs", 5);
  mx_sync_hub_wake_user(hub, "@x:hs", 5);
  CHECK(wait_reqs(F.nreqs + 2, 1.0));
  int i = find_woken("tokA"), j = find_woken("tokX");
  CHECK(i >= 0 && j >= 0);
  CHECK(F.reqs[i].presence_off);
  CHECK(!F.reqs[j].presence_off); /* not relayed: it keeps the user online */
  answer(i, 200, batch("x2"));
  answer(j, 200, batch("x2"));
  taken(&a);
  taken(&x);
  spin();
  /* A keepalive the relay asked for shows presence, even when a wake
   * arrives before it is sent. */
  CHECK_INT(mx_sync_hub_presence_keepalive(hub, "@a:hs", 5), 0);
  wake_expect_presence(&a, "@a:hs", "x3", false);
  /* The next wake is quiet again. */
  wake_expect_presence(&a, "@a:hs", "x4", true);
  /* The relay down: woken fetches show presence. */
  R.up = false;
  wake_expect_presence(&a, "@a:hs", "x5", false);
  close_rec(&a);
  close_rec(&x);
  teardown();
  rec_free(&a);
  rec_free(&x);
}

/* ---------------------------------------------------------------------- */
/* Metrics */

static void test_wake_to_delivery(void) {
  hub_cfg c = default_cfg;
  c.debounce = 0.05;
  setup_cfg(&c);
  rec a = {0};
  ready(&a, "a", "tokA", "q", "@a:hs", NO_ROOMS, "a1");
  int base = F.nreqs;
  uint64_t n0 = mx_stats.wake_to_delivery.count;
  double s0 = mx_stats.wake_to_delivery.sum;
  ev_now_update(loop);
  mx_sync_hub_wake_user(hub, "@a:hs", 5);
  CHECK(wait_reqs(base + 1, 1.0));
  run_for(0.03); /* the homeserver takes its time */
  CHECK_INT(mx_stats.wake_to_delivery.count, n0);
  CHECK_INT(answer_woken("tokA", "a2"), 1);
  CHECK_INT(mx_stats.wake_to_delivery.count, n0 + 1);
  double took = mx_stats.wake_to_delivery.sum - s0;
  if (took < 0.075 || took > 1.0)
    printf("# wake to delivery: %.3f s\n", took);
  CHECK(took >= 0.075 && took < 1.0);
  /* An empty answer delivers nothing and leaves no stale start: the next
   * sample is measured from the next wake. */
  taken(&a);
  mx_sync_hub_wake_user(hub, "@a:hs", 5);
  CHECK(wait_reqs(base + 2, 1.0));
  CHECK_INT(answer_woken("tokA", "a2"), 1);
  CHECK_INT(mx_stats.wake_to_delivery.count, n0 + 1);
  run_for(0.2);
  s0 = mx_stats.wake_to_delivery.sum;
  ev_now_update(loop);
  mx_sync_hub_wake_user(hub, "@a:hs", 5);
  CHECK(wait_reqs(base + 3, 1.0));
  CHECK_INT(answer_woken("tokA", "a3"), 1);
  CHECK_INT(mx_stats.wake_to_delivery.count, n0 + 2);
  took = mx_stats.wake_to_delivery.sum - s0;
  if (took >= 0.2)
    printf("# wake to delivery: %.3f s\n", took);
  CHECK(took < 0.2);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

/* Where the time of a wake goes: the queue (debounce, the fetch cap)
 * and the homeserver's answer, each in its own histogram. */
static void test_wake_delay_parts(void) {
  hub_cfg c = default_cfg;
  c.debounce = 0.05;
  setup_cfg(&c);
  rec a = {0};
  ready(&a, "a", "tokA", "q", "@a:hs", NO_ROOMS, "a1");
  int base = F.nreqs;
  mx_hist q0 = mx_stats.wake_queue, f0 = mx_stats.woken_fetch;
  ev_now_update(loop);
  mx_sync_hub_wake_user(hub, "@a:hs", 5);
  CHECK(wait_reqs(base + 1, 1.0));
  CHECK_INT(mx_stats.wake_queue.count, q0.count + 1);
  double queued = mx_stats.wake_queue.sum - q0.sum;
  CHECK(queued >= 0.045 && queued < 1.0); /* the debounce */
  run_for(0.03); /* the homeserver takes its time */
  CHECK_INT(answer_woken("tokA", "a2"), 1);
  CHECK_INT(mx_stats.woken_fetch.count, f0.count + 1);
  double fetched = mx_stats.woken_fetch.sum - f0.sum;
  CHECK(fetched >= 0.025 && fetched < 1.0);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

/* ---------------------------------------------------------------------- */
/* Closing */

static void test_close_queued_parked(void) {
  hub_cfg c = default_cfg;
  c.debounce = 0.05;
  c.max_fetches = 1;
  setup_cfg(&c);
  rec a = {0}, b = {0}, d = {0}, e = {0}, g = {0};
  ready(&a, "a", "tA", "q", "@a:hs", NO_ROOMS, "a1");
  ready(&b, "b", "tB", "q", "@b:hs", NO_ROOMS, "b1");
  ready(&d, "d", "tD", "q", "@d:hs", NO_ROOMS, "d1");
  ready(&e, "e", "tE", "q", "@e:hs", NO_ROOMS, "e1");
  open_rec(&g, "g", "tG", "q"); /* whoami in flight */
  spin();
  int who = find_live(WHOAMI, "tG");
  CHECK(who >= 0);
  int calls = a.ncalls + b.ncalls + d.ncalls + e.ncalls + g.ncalls;
  int base = F.nreqs;
  /* d's woken fetch takes the only slot; a and e wait behind it. */
  mx_sync_hub_wake_user(hub, "@d:hs", 5);
  CHECK(wait_reqs(base + 1, 1.0));
  mx_sync_hub_wake_user(hub, "@a:hs", 5);
  mx_sync_hub_wake_user(hub, "@e:hs", 5);
  run_for(0.1);
  CHECK_INT(F.nreqs, base + 1);
  close_rec(&a); /* queued */
  close_rec(&b); /* parked */
  close_rec(&g); /* resolving */
  CHECK(who >= 0 && F.reqs[who].cancelled);
  CHECK_INT(H.nclose, 2);
  /* Closing d cancels its fetch and frees the slot: e goes next. */
  int df = find_live(NULL, "tD");
  close_rec(&d);
  CHECK(df >= 0 && F.reqs[df].cancelled);
  CHECK(wait_reqs(base + 2, 1.0));
  CHECK_STREQ(F.reqs[base + 1].token, "tE");
  run_for(0.1);
  CHECK_INT(F.nreqs, base + 2); /* nothing for the closed ones */
  CHECK_INT(a.ncalls + b.ncalls + d.ncalls + g.ncalls + e.ncalls, calls);
  CHECK_INT(answer_woken("tE", "e2"), 1);
  CHECK_INT(e.nevents, 2);
  close_rec(&e);
  CHECK_INT(H.nclose, 4);
  CHECK_INT(mx_sync_hub_streams(hub), 0);
  CHECK_INT(mx_sync_hub_fetches(hub), 0);
  /* Wakes for users who left find nobody. */
  mx_sync_hub_wake_user(hub, "@a:hs", 5);
  mx_sync_hub_wake_all(hub, MX_SYNC_REASON_SAFETY);
  run_for(0.1);
  CHECK_INT(F.nreqs, base + 2);
  teardown();
  rec_free(&a);
  rec_free(&b);
  rec_free(&d);
  rec_free(&e);
  rec_free(&g);
}

/* Freeing the hub with streams parked, queued and resolving. */
static void test_free_with_parked_and_queued(void) {
  hub_cfg c = default_cfg;
  c.debounce = 5.0; /* the queued wake cannot fire during the test */
  c.presence = 0.2;
  setup_cfg(&c);
  rec a = {0}, b = {0}, d = {0};
  ready(&a, "a", "tA", "q", "@a:hs", NO_ROOMS, "a1");
  ready(&b, "b", "tB", "q", "@b:hs", NO_ROOMS, "b1");
  open_rec(&d, "d", "tD", "q");
  spin();
  mx_sync_hub_wake_user(hub, "@a:hs", 5);
  int calls = a.ncalls + b.ncalls + d.ncalls;
  int nreqs = F.nreqs;
  mx_sync_hub_free(hub);
  hub = NULL;
  CHECK_INT(live_reqs(), 0); /* whoami cancelled */
  CHECK_INT(a.ncalls + b.ncalls + d.ncalls, calls);
  run_for(0.3); /* no presence tick, no debounce without the hub */
  CHECK_INT(F.nreqs, nreqs);
  teardown();
  rec_free(&a);
  rec_free(&b);
  rec_free(&d);
}

int main(void) {
  mx_log_init(MX_LOG_ERROR, NULL);
  TAP_RUN(TAP_CASE(test_identity_order),
          TAP_CASE(test_identity_shared_by_token),
          TAP_CASE(test_second_device), TAP_CASE(test_whoami_401),
          TAP_CASE(test_whoami_4xx_body),
          TAP_CASE(test_whoami_500_longpolls),
          TAP_CASE(test_unknown_user_no_fallback_parks),
          TAP_CASE(test_joined_rooms_500_longpolls),
          TAP_CASE(test_parks_after_taken),
          TAP_CASE(test_wake_after_debounce),
          TAP_CASE(test_wake_burst_one_fetch),
          TAP_CASE(test_empty_wake_parks), TAP_CASE(test_catches_up_before_parking), TAP_CASE(test_two_tabs_one_fetch),
          TAP_CASE(test_wake_in_flight_refetch),
          TAP_CASE(test_wake_during_first_sync), TAP_CASE(test_max_fetches),
          TAP_CASE(test_max_fetches_safety_net),
          TAP_CASE(test_max_fetches_dirty_refetch),
          TAP_CASE(test_urgent_before_background),
          TAP_CASE(test_background_share),
          TAP_CASE(test_catch_up_check_in_background),
          TAP_CASE(test_background_then_urgent_one_fetch),
          TAP_CASE(test_feed_down_longpolls),
          TAP_CASE(test_feed_up_cancels_longpolls),
          TAP_CASE(test_feed_up_wakes_parked),
          TAP_CASE(test_no_fallback_parks_when_down),
          TAP_CASE(test_presence_wake), TAP_CASE(test_presence_relay), TAP_CASE(test_woken_fetch_presence), TAP_CASE(test_wake_to_delivery), TAP_CASE(test_wake_delay_parts),
          TAP_CASE(test_close_queued_parked),
          TAP_CASE(test_free_with_parked_and_queued));
}
