/*
 * The replication adapter end to end: replication lines in (as Synapse
 * publishes them), through the parser and the wake rules, to a real hub
 * whose upstream requests go to a fake homeserver API on a real libev loop (the
 * one of test_hub.c, hub_fake.h). The room index and the room mates are
 * only seen through their effects: which streams a line wakes (a
 * timeout=0 /sync after the debounce) and which it leaves parked, and the
 * joined_members requests the adapter makes for the rooms it tracks.
 */
#include "sync/replication.h"

#include <ev.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "common/buf.h"
#include "common/chunk.h"
#include "common/limits.h"
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
  hf_setup(&o, &tap_failed_checks);
  repl = mx_replication_new(hub, loop);
  CHECK(repl != NULL);
  mx_replication_up(repl);
}

static void teardown(void) {
  /* The adapter goes first (it removes its hooks and cancels its member
   * lookups through the hub), then the hub, then the loop. */
  mx_replication_free(repl);
  repl = NULL;
  mx_sync_hub_free(hub);
  hub = NULL;
  hf_teardown();
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

/* The path of room's member list (static buffer). */
static const char *members_path(const char *room) {
  static char path[256];
  mx_buf b;
  mx_buf_init(&b, sizeof(path) - 1);
  mx_buf_append_urlencoded(&b, room, strlen(room));
  snprintf(path, sizeof(path), "/_matrix/client/v3/rooms/%s/joined_members",
           b.data ? b.data : "");
  mx_buf_free(&b);
  return path;
}

/* The member-list request of room in flight, or -1. */
static int members_req(const char *room) {
  const char *path = members_path(room);
  for (int i = 0; i < F.nreqs; i++)
    if (F.reqs[i].live && same(F.reqs[i].path, path))
      return i;
  return -1;
}

static bool is_members_req(const freq *r) {
  return r->path && strstr(r->path, "/joined_members");
}

/* Answers every member-list request in flight with no members (the cases
 * that are not about room mates). */
static void members_none(void) {
  spin();
  for (int i = 0; i < F.nreqs; i++)
    if (F.reqs[i].live && is_members_req(&F.reqs[i]))
      answer(i, 200, "{\"joined\":{}}");
}

/* /sync requests ever started, and in flight. */
static int sync_reqs(void) {
  int n = 0;
  for (int i = 0; i < F.nreqs; i++)
    n += F.reqs[i].path == NULL;
  return n;
}

static int live_syncs(void) {
  int n = 0;
  for (int i = 0; i < F.nreqs; i++)
    n += F.reqs[i].live && F.reqs[i].path == NULL;
  return n;
}

static int woken(const rec *r);

/* Opens a stream for token/user whose joined_rooms answer is `rooms`, and
 * brings it to its first batch (next_batch `first`, rooms.join from
 * `join`), taken, and through the catch-up fetch that shows it is at the
 * present (an empty answer): parked. */
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
  int i = woken(r);
  CHECK(i >= 0);
  if (i >= 0)
    answer(i, 200, sync_body(first, NULL));
  spin();
  CHECK_INT(r->nevents, 1);
  CHECK_INT(live_syncs(), 0); /* parked */
}

/* Runs the loop until a woken fetch (timeout=0, with since) of r's token
 * is in flight, or two seconds pass (a coalesced wake of everyone may wait
 * MX_REPL_UNRESOLVED_WAKE_INTERVAL). Returns its index or -1. */
static int woken(const rec *r) {
  double end = ev_time() + 1.0 + MX_REPL_UNRESOLVED_WAKE_INTERVAL;
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

/* No /sync is fetched for QUIET seconds. */
static void check_quiet(int line) {
  int n = sync_reqs();
  run_for(QUIET);
  if (sync_reqs() != n)
    printf("# line %d: %d unexpected request(s)\n", line, sync_reqs() - n);
  CHECK_INT(sync_reqs(), n);
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

/* RDATA presence: user comes online (a state nobody has seen: notified). */
static void presence_online(const char *user) {
  char line[512];
  snprintf(line, sizeof(line),
           "RDATA presence master %d [\"%s\",\"online\",1795508772723,0,"
           "1795508772739,null,true]",
           next_token++, user);
  feed(line);
}

/* RDATA device_lists: user changed their devices. */
static void device_change(const char *user) {
  char line[512];
  snprintf(line, sizeof(line),
           "RDATA device_lists master %d [\"%s\",false,false]", next_token++,
           user);
  feed(line);
}

static void test_members_fetched_per_room(void) {
  setup(true);
  rec a = {0}, b = {0};
  ready(&a, "tokA", "@a:hs",
        "{\"joined_rooms\":[\"!r:hs\",\"!s:hs\"]}", "a1", "{}");
  spin();
  /* One request per room, on behalf of its connected member. */
  int ir = members_req("!r:hs"), is = members_req("!s:hs");
  CHECK(ir >= 0 && is >= 0);
  if (ir >= 0)
    CHECK_STREQ(F.reqs[ir].token, "tokA");
  CHECK_INT(mx_stats.repl_rooms_tracked, 2);
  CHECK_INT(mx_stats.repl_rooms_incomplete, 2);
  /* A second member of !r costs no second request. */
  ready(&b, "tokB", "@b:hs", "{\"joined_rooms\":[\"!r:hs\"]}", "b1", "{}");
  spin();
  CHECK_INT(count_reqs(members_path("!r:hs"), "tokB"), 0);
  uint64_t fetches = mx_stats.repl_member_fetches;
  members_none();
  CHECK_INT(mx_stats.repl_member_fetches, fetches); /* no retries */
  CHECK_INT(mx_stats.repl_rooms_incomplete, 0);
  /* The room's last connected member leaves: no request is left over,
   * and a newcomer has it fetched again. */
  close_rec(&a);
  close_rec(&b);
  spin();
  CHECK_INT(live_reqs(), 0);
  CHECK_INT(mx_stats.repl_rooms_tracked, 0);
  rec c = {0};
  ready(&c, "tokC", "@c:hs", "{\"joined_rooms\":[\"!r:hs\"]}", "c1", "{}");
  spin();
  CHECK(members_req("!r:hs") >= 0);
  close_rec(&c);
  teardown();
}

static void test_stranger_presence_wakes_room_mates(void) {
  setup(true);
  rec a = {0}, b = {0};
  ready(&a, "tokA", "@a:hs", "{\"joined_rooms\":[\"!r:hs\"]}", "a1", "{}");
  ready(&b, "tokB", "@b:hs", "{\"joined_rooms\":[\"!b:hs\"]}", "b1", "{}");
  spin();
  int i = members_req("!r:hs");
  CHECK(i >= 0);
  if (i >= 0)
    answer(i, 200,
           "{\"joined\":{\"@a:hs\":{\"display_name\":\"A\"},"
           "\"@s:hs\":{\"display_name\":null,\"avatar_url\":null}}}");
  members_none();
  CHECK_INT(mx_stats.repl_room_memberships, 2);
  /* @s has no stream here; @a shares !r with them, @b does not. */
  presence_online("@s:hs");
  serve(&a, "a2", NULL);
  check_quiet(__LINE__);
  CHECK_INT(b.nevents, 1);
  device_change("@s:hs");
  serve(&a, "a3", NULL);
  check_quiet(__LINE__);
  /* Every list is known: a stranger in none of the rooms wakes nobody. */
  presence_online("@t:hs");
  device_change("@t:hs");
  check_quiet(__LINE__);
  close_rec(&a);
  close_rec(&b);
  teardown();
}

static void test_stranger_membership_rows(void) {
  setup(true);
  rec a = {0};
  ready(&a, "tokA", "@a:hs", "{\"joined_rooms\":[\"!r:hs\"]}", "a1", "{}");
  members_none();
  /* @s joins !r (the join wakes @a), then their presence does too. */
  membership("!r:hs", "@s:hs", "join");
  serve(&a, "a2", NULL);
  presence_online("@s:hs");
  serve(&a, "a3", NULL);
  /* After @s left, their device changes are none of @a's business. */
  membership("!r:hs", "@s:hs", "leave");
  serve(&a, "a4", NULL);
  device_change("@s:hs");
  check_quiet(__LINE__);
  close_rec(&a);
  teardown();
}

static void test_unknown_members_while_loading(void) {
  setup(true);
  rec a = {0}, b = {0};
  ready(&a, "tokA", "@a:hs", "{\"joined_rooms\":[\"!r:hs\"]}", "a1", "{}");
  ready(&b, "tokB", "@b:hs", "{\"joined_rooms\":[]}", "b1", "{}");
  spin();
  CHECK(members_req("!r:hs") >= 0); /* not answered: !r is incomplete */
  /* A device change of someone unknown may concern !r: everyone syncs
   * (coalesced); their presence waits for the next batch. */
  presence_online("@s:hs");
  check_quiet(__LINE__);
  device_change("@s:hs");
  serve(&a, "a2", NULL);
  serve(&b, "b2", NULL);
  /* A list that cannot be read leaves the room incomplete too. */
  int i = members_req("!r:hs");
  if (i >= 0)
    answer(i, 200, "{\"joined\":[]}");
  device_change("@u:hs");
  serve(&a, "a3", NULL);
  serve(&b, "b3", NULL);
  close_rec(&a);
  close_rec(&b);
  teardown();
}

static void test_known_mate_while_another_list_loads(void) {
  setup(true);
  rec a = {0}, b = {0};
  ready(&a, "tokA", "@a:hs", "{\"joined_rooms\":[\"!r:hs\"]}", "a1", "{}");
  ready(&b, "tokB", "@b:hs", "{\"joined_rooms\":[\"!t:hs\"]}", "b1", "{}");
  spin();
  int i = members_req("!r:hs");
  if (i >= 0)
    answer(i, 200, "{\"joined\":{\"@a:hs\":{},\"@s:hs\":{}}}");
  /* @s shares !r with @a; !t's list is still out, @s may be there too:
   * @a is woken at once, everyone else by the coalesced wake. */
  device_change("@s:hs");
  serve(&a, "a2", NULL);
  serve(&b, "b2", NULL);
  members_none();
  close_rec(&a);
  close_rec(&b);
  teardown();
}

static void test_gap_reloads_members(void) {
  setup(true);
  rec a = {0};
  ready(&a, "tokA", "@a:hs", "{\"joined_rooms\":[\"!r:hs\"]}", "a1", "{}");
  members_none();
  CHECK_INT(count_reqs(members_path("!r:hs"), "tokA"), 1);
  message("!x:hs");
  char line[64];
  snprintf(line, sizeof(line), "POSITION events master %d %d", next_token + 5,
           next_token + 6); /* rows never arrived */
  feed(line);
  serve(&a, "a2", NULL);
  spin();
  CHECK_INT(count_reqs(members_path("!r:hs"), "tokA"), 2);
  members_none();
  close_rec(&a);
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
          TAP_CASE(test_unreadable_row_wakes_all),
          TAP_CASE(test_members_fetched_per_room),
          TAP_CASE(test_stranger_presence_wakes_room_mates),
          TAP_CASE(test_stranger_membership_rows),
          TAP_CASE(test_unknown_members_while_loading),
          TAP_CASE(test_known_mate_while_another_list_loads),
          TAP_CASE(test_gap_reloads_members));
}
