/*
 * The replication adapter end to end: replication lines in (as Synapse
 * publishes them), through the parser and the wake rules, to a real hub
 * whose upstream requests go to a fake fetcher on a real libev loop (the
 * one of test_hub.c, hub_fake.h). The room index is only seen through its
 * effects: which streams a line wakes (a timeout=0 /sync after the
 * debounce) and which it leaves parked.
 */
#include "sync/replication.h"

#include <ev.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "common/chunk.h"
#include "common/log.h"
#include "common/metrics.h"
#include "sync/hub.h"
#include "tests/unit/hub_fake.h"
#include "tests/unit/tap.h"

#define DEBOUNCE 0.01
#define QUIET 0.1 /* how long "nothing happens" is watched */

/* A /sync answer: next_batch, then the rest of the object (rooms...). */
static const char *sync_body(const char *next, const char *rest) {
  static char b[4][512];
  static int n;
  char *s = b[n++ % 4];
  snprintf(s, 512, "{\"next_batch\":\"%s\"%s%s}", next, rest ? "," : "",
           rest ? rest : "");
  return s;
}

/* ---------------------------------------------------------------------- */
/* Loop, hub and adapter per test */

static mx_replication *repl;

/* The streams ready() opened: teardown drops their events (the cases here
 * count events, they never look inside them). */
static rec *opened[4];
static int nopened;

static void setup(bool fallback) {
  mx_sync_hub_opts o = hf_opts();
  o.replication = true;
  o.longpoll_fallback = fallback;
  o.max_fetches = 64;
  o.wake_debounce = DEBOUNCE;
  repl = mx_replication_new(&o.hooks);
  CHECK(repl != NULL);
  CHECK(o.hooks.user_open && o.hooks.user_close && o.hooks.batch);
  hf_setup(&o, &tap_failed_checks);
  mx_replication_attach(repl, hub, loop);
  mx_replication_up(repl);
}

static void teardown(void) {
  /* The hub calls the adapter's hooks while it closes streams: the
   * adapter goes after it. */
  hf_teardown();
  mx_replication_free(repl);
  repl = NULL;
  while (nopened > 0)
    rec_free(opened[--nopened]);
}

static void feed(const char *line) {
  mx_replication_feed(repl, line, strlen(line));
}

/* RDATA events: a message in room (the next token of master). */
static int next_token = 1;
static void message(const char *room) {
  char line[512];
  int t = next_token++;
  snprintf(line, sizeof(line),
           "RDATA events master %d [\"ev\",[\"$m%d\",\"%s\","
           "\"m.room.message\",null,null,null,null,false,false]]",
           t, t, room);
  feed(line);
}

/* RDATA events: user's membership in room becomes `membership`. */
static void membership(const char *room, const char *user,
                       const char *membership_) {
  char line[512];
  int t = next_token++;
  snprintf(line, sizeof(line),
           "RDATA events master %d [\"ev\",[\"$j%d\",\"%s\","
           "\"m.room.member\",\"%s\",null,null,\"%s\",false,false]]",
           t, t, room, user, membership_);
  feed(line);
}

/* Opens a stream for token/user whose joined_rooms answer is `rooms`, and
 * brings it to its first batch (next_batch `first`, rooms.join from
 * `join`), taken: parked. */
static void ready(rec *r, const char *token, const char *user,
                  const char *rooms, const char *first, const char *join) {
  mx_sync_stream_params p = {.token = token, .query = "q"};
  hf_open_params(r, token, &p);
  CHECK(nopened < 4);
  if (nopened < 4)
    opened[nopened++] = r;
  char who[128], rest[256];
  snprintf(who, sizeof(who), "{\"user_id\":\"%s\"}", user);
  snprintf(rest, sizeof(rest), "\"rooms\":{\"join\":%s}", join);
  hf_answer_start(r, who, rooms, sync_body(first, rest));
  CHECK_INT(r->nevents, 1);
  mx_sync_stream_taken(r->st);
  spin();
  CHECK_INT(live_reqs(), 0); /* parked */
}

/* Runs the loop until a woken fetch (timeout=0, with since) of r's token
 * is in flight, or a second passes. Returns its index or -1. */
static int woken(const rec *r) {
  double end = ev_time() + 1.0;
  for (;;) {
    int i = find_woken(r->token);
    if (i >= 0)
      return i;
    if (ev_time() >= end)
      return -1;
    ev_run(loop, EVRUN_NOWAIT);
    usleep(500);
  }
}

/* Answers r's woken fetch with next (and optional rooms JSON), and takes
 * the event: parked again. */
static void serve(rec *r, const char *next, const char *rest) {
  int i = woken(r);
  CHECK(i >= 0);
  if (i < 0)
    return;
  int n = r->nevents;
  answer(i, 200, sync_body(next, rest));
  CHECK_INT(r->nevents, n + 1);
  mx_sync_stream_taken(r->st);
  spin();
}

/* Nothing is fetched for QUIET seconds. */
static void check_quiet(int line) {
  int n = F.nreqs;
  run_for(QUIET);
  if (F.nreqs != n)
    printf("# line %d: %d unexpected request(s)\n", line, F.nreqs - n);
  CHECK_INT(F.nreqs, n);
}

/* ---------------------------------------------------------------------- */

static void test_message_wakes_member(void) {
  setup(true);
  rec a = {0};
  ready(&a, "tokA", "@a:hs", "{\"joined_rooms\":[\"!r:hs\"]}", "a1", "{}");
  int n = F.nreqs;
  message("!r:hs");
  CHECK_INT(F.nreqs, n); /* after the debounce, not from inside the feed */
  int i = woken(&a);
  CHECK(i >= 0);
  if (i >= 0)
    CHECK_STREQ(F.reqs[i].since, "a1");
  serve(&a, "a2", NULL);
  check_quiet(__LINE__);
  close_rec(&a);
  teardown();
}

static void test_other_room_wakes_nobody(void) {
  setup(true);
  rec a = {0}, b = {0};
  ready(&a, "tokA", "@a:hs", "{\"joined_rooms\":[\"!r:hs\"]}", "a1", "{}");
  ready(&b, "tokB", "@b:hs", "{\"joined_rooms\":[\"!b:hs\"]}", "b1", "{}");
  message("!x:hs");
  check_quiet(__LINE__);
  /* b's room wakes b, not a. */
  message("!b:hs");
  serve(&b, "b2", NULL);
  check_quiet(__LINE__);
  CHECK_INT(a.nevents, 1);
  close_rec(&a);
  close_rec(&b);
  teardown();
}

static void test_membership_row_joins_and_leaves(void) {
  setup(true);
  rec a = {0};
  ready(&a, "tokA", "@a:hs", "{\"joined_rooms\":[\"!r:hs\"]}", "a1", "{}");
  message("!s:hs");
  check_quiet(__LINE__); /* not a member yet */
  /* @a joins !s: the target of a membership event is woken... */
  membership("!s:hs", "@a:hs", "join");
  serve(&a, "a2", NULL); /* (a batch that says nothing about !s) */
  check_quiet(__LINE__);
  /* ...and the row alone taught the index: messages in !s wake @a. */
  message("!s:hs");
  serve(&a, "a3", NULL);
  /* Leaving: woken once more for the leave, then no longer. */
  membership("!s:hs", "@a:hs", "leave");
  serve(&a, "a4", NULL);
  message("!s:hs");
  check_quiet(__LINE__);
  /* !r is still there. */
  message("!r:hs");
  serve(&a, "a5", NULL);
  close_rec(&a);
  teardown();
}

static void test_batches_join_and_leave(void) {
  setup(true);
  rec a = {0};
  /* joined_rooms is older than the first batch: the batch adds !t. */
  ready(&a, "tokA", "@a:hs", "{\"joined_rooms\":[\"!r:hs\"]}", "a1",
        "{\"!t:hs\":{}}");
  message("!t:hs");
  serve(&a, "a2", NULL);
  message("!r:hs");
  serve(&a, "a3", "\"rooms\":{\"leave\":{\"!r:hs\":{}}}");
  /* The batch said @a left !r: messages there wake nobody. */
  message("!r:hs");
  check_quiet(__LINE__);
  message("!t:hs");
  serve(&a, "a4", NULL);
  close_rec(&a);
  teardown();
}

static void test_up_runs_safety_net(void) {
  setup(false); /* no fallback: parked streams stay parked while down */
  rec a = {0}, b = {0};
  ready(&a, "tokA", "@a:hs", "{\"joined_rooms\":[\"!r:hs\"]}", "a1", "{}");
  ready(&b, "tokB", "@b:hs", "{\"joined_rooms\":[]}", "b1", "{}");
  mx_replication_down(repl);
  check_quiet(__LINE__);
  uint64_t safety0 = mx_stats.sync_requests[MX_SYNC_REASON_SAFETY];
  mx_replication_up(repl);
  /* Rows may have been lost meanwhile: everyone fetches. */
  serve(&a, "a2", NULL);
  serve(&b, "b2", NULL);
  CHECK_INT(mx_stats.sync_requests[MX_SYNC_REASON_SAFETY], safety0 + 2);
  check_quiet(__LINE__);
  /* And rows wake their users again. */
  message("!r:hs");
  serve(&a, "a3", NULL);
  CHECK_INT(b.nevents, 2);
  close_rec(&a);
  close_rec(&b);
  teardown();
}

static void test_up_after_fallback(void) {
  setup(true);
  rec a = {0};
  ready(&a, "tokA", "@a:hs", "{\"joined_rooms\":[\"!r:hs\"]}", "a1", "{}");
  mx_replication_down(repl);
  spin();
  int lp = find_live(NULL, "tokA");
  CHECK(lp >= 0 && F.reqs[lp].timeout_ms == LONGPOLL_MS);
  mx_replication_up(repl);
  CHECK(lp >= 0 && F.reqs[lp].cancelled);
  serve(&a, "a2", NULL);
  check_quiet(__LINE__);
  message("!r:hs");
  serve(&a, "a3", NULL);
  close_rec(&a);
  teardown();
}

static void test_position_gap_wakes_all(void) {
  setup(true);
  rec a = {0}, b = {0};
  ready(&a, "tokA", "@a:hs", "{\"joined_rooms\":[\"!r:hs\"]}", "a1", "{}");
  ready(&b, "tokB", "@b:hs", "{\"joined_rooms\":[]}", "b1", "{}");
  feed("RDATA events master 5 [\"ev\",[\"$x\",\"!x:hs\",\"m.room.message\","
       "null,null,null,null,false,false]]");
  feed("POSITION events master 5 7"); /* continuous: nothing missed */
  check_quiet(__LINE__);
  /* A gap in a stream that wakes nobody is no reason to sync. */
  feed("RDATA caches master 3 [\"get_user_by_id\",[\"@x:hs\"],1]");
  feed("POSITION caches master 9 10");
  check_quiet(__LINE__);
  uint64_t safety0 = mx_stats.sync_requests[MX_SYNC_REASON_SAFETY];
  feed("POSITION events master 10 12"); /* rows 8..10 never arrived */
  serve(&a, "a2", NULL);
  serve(&b, "b2", NULL);
  CHECK_INT(mx_stats.sync_requests[MX_SYNC_REASON_SAFETY], safety0 + 2);
  check_quiet(__LINE__);
  close_rec(&a);
  close_rec(&b);
  teardown();
}

static void test_unreadable_row_wakes_all(void) {
  setup(true);
  rec a = {0}, b = {0};
  ready(&a, "tokA", "@a:hs", "{\"joined_rooms\":[\"!r:hs\"]}", "a1", "{}");
  ready(&b, "tokB", "@b:hs", "{\"joined_rooms\":[]}", "b1", "{}");
  /* Valid JSON, not an events row: it could concern anyone. */
  feed("RDATA events master 30 [\"ev\",{\"room_id\":\"!r:hs\"}]");
  serve(&a, "a2", NULL);
  serve(&b, "b2", NULL);
  check_quiet(__LINE__);
  close_rec(&a);
  close_rec(&b);
  teardown();
}

int main(void) {
  mx_log_init(MX_LOG_ERROR, NULL);
  TAP_RUN(TAP_CASE(test_message_wakes_member),
          TAP_CASE(test_other_room_wakes_nobody),
          TAP_CASE(test_membership_row_joins_and_leaves),
          TAP_CASE(test_batches_join_and_leave),
          TAP_CASE(test_up_runs_safety_net), TAP_CASE(test_up_after_fallback),
          TAP_CASE(test_position_gap_wakes_all),
          TAP_CASE(test_unreadable_row_wakes_all));
}
