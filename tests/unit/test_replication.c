/*
 * The replication adapter end to end: replication lines in (as Synapse
 * publishes them), through the parser and the wake rules, to a real hub
 * whose upstream requests go to a fake fetcher on a real libev loop (the
 * approach of test_hub.c). The room index is only seen through its
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
#include "tests/unit/tap.h"

#define LONGPOLL_MS 30000
#define DEBOUNCE 0.01
#define QUIET 0.1 /* how long "nothing happens" is watched */
#define WHOAMI "/_matrix/client/v3/account/whoami"
#define JOINED "/_matrix/client/v3/joined_rooms"

/* ---------------------------------------------------------------------- */
/* The fake fetcher */

#define MAX_REQS 128

typedef struct freq {
  char *path; /* NULL: /sync */
  char *token, *since;
  long timeout_ms;
  mx_sync_done_fn done;
  void *ud;
  bool live;
  bool cancelled;
} freq;

static struct {
  freq reqs[MAX_REQS];
  int nreqs;
  int bad_cancels;
} F;

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

static void *fake_start(void *impl, const mx_sync_request *req,
                        mx_sync_done_fn done, void *ud) {
  if (F.nreqs == MAX_REQS)
    return NULL;
  freq *r = &F.reqs[F.nreqs++];
  r->path = dup_or_null(req->path);
  r->token = dup_or_null(req->token);
  r->since = dup_or_null(req->since);
  r->timeout_ms = req->timeout_ms;
  r->done = done;
  r->ud = ud;
  r->live = true;
  r->cancelled = false;
  return r;
}

static void fake_cancel(void *impl, void *handle) {
  freq *r = handle;
  if (!r->live) {
    F.bad_cancels++;
    return;
  }
  r->live = false;
  r->cancelled = true;
}

static const mx_sync_fetcher fetcher = {fake_start, fake_cancel, NULL};

static void fake_reset(void) {
  for (int i = 0; i < F.nreqs; i++) {
    free(F.reqs[i].path);
    free(F.reqs[i].token);
    free(F.reqs[i].since);
  }
  memset(&F, 0, sizeof(F));
}

static int live_reqs(void) {
  int n = 0;
  for (int i = 0; i < F.nreqs; i++)
    n += F.reqs[i].live;
  return n;
}

static bool same(const char *a, const char *b) {
  return a ? b && strcmp(a, b) == 0 : b == NULL;
}

static int find_live(const char *path, const char *token) {
  for (int i = 0; i < F.nreqs; i++)
    if (F.reqs[i].live && same(F.reqs[i].path, path) &&
        same(F.reqs[i].token, token))
      return i;
  return -1;
}

static void answer(int i, int status, const char *body) {
  if (i < 0 || i >= F.nreqs || !F.reqs[i].live) {
    printf("# answer: request %d is not in flight\n", i);
    tap_failed_checks++;
    return;
  }
  freq *r = &F.reqs[i];
  r->live = false;
  mx_sync_response resp = {.status = status,
                           .body = body,
                           .len = body ? strlen(body) : 0,
                           .retry_after_ms = -1};
  r->done(r->ud, &resp);
}

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
/* Streams */


typedef struct rec {
  mx_sync_stream *st;
  const char *token;
  int nstart, start_status;
  int nevents;
  int ncalls;
} rec;

static void on_start(mx_sync_stream *st, int status, const char *body,
                     size_t len, void *ud) {
  rec *r = ud;
  r->ncalls++;
  r->nstart++;
  r->start_status = status;
}

static void on_event(mx_sync_stream *st, mx_chunk *ev, void *ud) {
  rec *r = ud;
  r->ncalls++;
  r->nevents++;
}

static void on_fatal(mx_sync_stream *st, mx_chunk *ev, void *ud) {
  rec *r = ud;
  r->ncalls++;
}

static const mx_sync_stream_ops ops = {on_start, on_event, on_fatal};

static void close_rec(rec *r) {
  if (r->st) {
    mx_sync_stream_close(r->st);
    r->st = NULL;
  }
}

/* ---------------------------------------------------------------------- */
/* Loop, hub and adapter per test */

static struct ev_loop *loop;
static mx_sync_hub *hub;
static mx_replication *repl;

static void setup(bool fallback) {
  fake_reset();
  loop = ev_loop_new(EVFLAG_AUTO);
  mx_sync_hub_opts o = {.longpoll_timeout_ms = LONGPOLL_MS,
                        .replication = true,
                        .longpoll_fallback = fallback,
                        .max_fetches = 64,
                        .wake_debounce = DEBOUNCE,
                        .replay_max_bytes = 1 << 20,
                        .replay_max_age = 300,
                        .backoff_base = 0.01,
                        .backoff_max = 1.0};
  repl = mx_replication_new(&o.hooks);
  CHECK(repl != NULL);
  CHECK(o.hooks.user_open && o.hooks.user_close && o.hooks.batch);
  hub = mx_sync_hub_new(loop, &o, &fetcher);
  CHECK(hub != NULL);
  mx_replication_attach(repl, hub);
  mx_replication_up(repl);
}

static void spin(void) {
  for (int i = 0; i < 5; i++)
    ev_run(loop, EVRUN_NOWAIT);
}

static void run_for(double t) {
  double end = ev_time() + t;
  while (ev_time() < end) {
    ev_run(loop, EVRUN_NOWAIT);
    usleep(500);
  }
}

static void teardown(void) {
  /* The hub calls the adapter's hooks while it closes streams: the
   * adapter goes after it. */
  mx_sync_hub_free(hub);
  hub = NULL;
  mx_replication_free(repl);
  repl = NULL;
  CHECK_INT(live_reqs(), 0);
  CHECK_INT(F.bad_cancels, 0);
  ev_loop_destroy(loop);
  loop = NULL;
  fake_reset();
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
  r->token = token;
  mx_sync_stream_params p = {.token = token, .query = "q"};
  r->st = mx_sync_stream_open(hub, &p, &ops, r);
  CHECK(r->st != NULL);
  char who[128], rest[256];
  snprintf(who, sizeof(who), "{\"user_id\":\"%s\"}", user);
  snprintf(rest, sizeof(rest), "\"rooms\":{\"join\":%s}", join);
  for (int guard = 0; guard < 8 && r->nevents == 0; guard++) {
    spin();
    int i;
    if ((i = find_live(WHOAMI, token)) >= 0)
      answer(i, 200, who);
    else if ((i = find_live(JOINED, token)) >= 0)
      answer(i, 200, rooms);
    else if ((i = find_live(NULL, token)) >= 0)
      answer(i, 200, sync_body(first, rest));
  }
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
    for (int i = 0; i < F.nreqs; i++) {
      const freq *q = &F.reqs[i];
      if (q->live && !q->path && same(q->token, r->token) && q->since &&
          q->timeout_ms == 0)
        return i;
    }
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
