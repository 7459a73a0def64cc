/* sync/presence.c: the presence relay's timing rules, on a simulated clock. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "sync/presence.h"
#include "tests/unit/tap.h"

#define MAXREC 4096

typedef struct rec {
  mx_presence_kind kind;
  char user[64], device[64];
  mx_presence_state state;
  long long ms;
  double at;
  char line[MX_PRESENCE_MAX_LINE + 1];
} rec;

static rec recs[MAXREC];
static size_t nrec;
static double clock_now;
static mx_presence *cur;

static void on_emit(const mx_presence_action *a, void *ud) {
  if (nrec == MAXREC)
    abort();
  rec *r = &recs[nrec++];
  memset(r, 0, sizeof(*r));
  r->kind = a->kind;
  r->state = a->state;
  r->ms = a->ms;
  r->at = clock_now;
  if (a->user)
    snprintf(r->user, sizeof(r->user), "%.*s", (int)a->ulen, a->user);
  if (a->device)
    snprintf(r->device, sizeof(r->device), "%.*s", (int)a->dlen, a->device);
  if (a->kind <= MX_PRESENCE_CLEAR && cur)
    mx_presence_format(cur, a, r->line, sizeof(r->line));
}

static mx_presence *make(bool keepalive, uint64_t seed) {
  nrec = 0;
  clock_now = 1000;
  mx_presence_opts o = {.instance = "node1", .keepalive_sync = keepalive,
                        .seed = seed};
  mx_presence *p = NULL;
  CHECK_INT(mx_presence_new(&p, &o, on_emit, NULL), 0);
  cur = p;
  return p;
}

static void run_until(mx_presence *p, double t) {
  while (clock_now < t) {
    clock_now += 0.5;
    mx_presence_tick(p, clock_now);
  }
}

static size_t count(mx_presence_kind k, const char *user, const char *dev) {
  size_t n = 0;
  for (size_t i = 0; i < nrec; i++)
    if (recs[i].kind == k && (!user || !strcmp(recs[i].user, user)) &&
        (!dev || !strcmp(recs[i].device, dev)))
      n++;
  return n;
}

static const rec *last(mx_presence_kind k, const char *dev) {
  for (size_t i = nrec; i-- > 0;)
    if (recs[i].kind == k && (!dev || !strcmp(recs[i].device, dev)))
      return &recs[i];
  return NULL;
}

#define OPEN(p, u, d, st)                                                    \
  mx_presence_open(p, u, strlen(u), d, strlen(d), st, clock_now)
#define CLOSE(p, u, d, st)                                                   \
  mx_presence_close(p, u, strlen(u), d, strlen(d), st, clock_now)

static void test_new_rejects_bad_options(void) {
  mx_presence *p = NULL;
  mx_presence_opts o = {.instance = "has space"};
  CHECK_INT(mx_presence_new(&p, &o, on_emit, NULL), MX_ERR_INVALID);
  o.instance = "";
  CHECK_INT(mx_presence_new(&p, &o, on_emit, NULL), MX_ERR_INVALID);
  o.instance = "x";
  o.end_delay_min = 30;
  o.end_delay_max = 20;
  CHECK_INT(mx_presence_new(&p, &o, on_emit, NULL), MX_ERR_INVALID);
  o.end_delay_min = 0;
  o.announce_min = -1;
  CHECK_INT(mx_presence_new(&p, &o, on_emit, NULL), MX_ERR_INVALID);
  char longname[MX_PRESENCE_MAX_INSTANCE + 2];
  memset(longname, 'a', sizeof(longname) - 1);
  longname[sizeof(longname) - 1] = '\0';
  o.announce_min = 0;
  o.instance = longname;
  CHECK_INT(mx_presence_new(&p, &o, on_emit, NULL), MX_ERR_INVALID);
  CHECK(p == NULL);
}

static void test_link_up_clears_first(void) {
  mx_presence *p = make(false, 1);
  CHECK_INT(nrec, 0); /* the link starts down */
  mx_presence_link(p, true, clock_now);
  CHECK_INT(nrec, 1);
  CHECK_INT(recs[0].kind, MX_PRESENCE_CLEAR);
  CHECK_STREQ(recs[0].line, "CLEAR_USER_SYNC node1");
  mx_presence_free(p);
}

static void test_open_starts_and_sets_state_at_once(void) {
  mx_presence *p = make(false, 1);
  mx_presence_link(p, true, clock_now);
  nrec = 0;
  /* A new user: set_state at once, its first start 2 s later (Synapse
   * drops a set_state racing with a start for a user it does not know). */
  CHECK_INT(OPEN(p, "@a:hs", "DEV1", MX_PRESENCE_ONLINE), 0);
  CHECK_INT(nrec, 1);
  CHECK_INT(recs[0].kind, MX_PRESENCE_SET_STATE);
  CHECK_STREQ(recs[0].user, "@a:hs");
  CHECK_STREQ(recs[0].device, "DEV1");
  CHECK_INT(recs[0].state, MX_PRESENCE_ONLINE);
  run_until(p, 1001.5);
  CHECK_INT(nrec, 1);
  run_until(p, 1002);
  CHECK_INT(nrec, 2);
  CHECK_INT(recs[1].kind, MX_PRESENCE_START);
  CHECK_STREQ(recs[1].line, "USER_SYNC node1 @a:hs DEV1 start 1002000");
  /* A second tab of the device: nothing. Another device: its start at
   * once (the user is known to Synapse by now). */
  CHECK_INT(OPEN(p, "@a:hs", "DEV1", MX_PRESENCE_ONLINE), 0);
  CHECK_INT(nrec, 2);
  CHECK_INT(OPEN(p, "@a:hs", "DEV2", MX_PRESENCE_ONLINE), 0);
  CHECK_INT(nrec, 3);
  CHECK_INT(recs[2].kind, MX_PRESENCE_START);
  CHECK_STREQ(recs[2].device, "DEV2");
  CHECK(mx_presence_is_open(p, "@a:hs", 5, "DEV1", 4));
  CHECK_INT(mx_presence_stats_get(p)->users, 1);
  CHECK_INT(mx_presence_stats_get(p)->devices, 2);
  mx_presence_free(p);
}

static void test_end_after_10_to_20_seconds(void) {
  for (uint64_t seed = 1; seed <= 20; seed++) {
    mx_presence *p = make(false, seed);
    mx_presence_link(p, true, clock_now);
    OPEN(p, "@a:hs", "D", MX_PRESENCE_ONLINE);
    OPEN(p, "@a:hs", "D", MX_PRESENCE_ONLINE);
    run_until(p, 1005);
    CHECK_INT(CLOSE(p, "@a:hs", "D", MX_PRESENCE_ONLINE), 0);
    run_until(p, 1020);
    CHECK_INT(count(MX_PRESENCE_END, NULL, NULL), 0); /* a stream is open */
    double closed = clock_now;
    CHECK_INT(CLOSE(p, "@a:hs", "D", MX_PRESENCE_ONLINE), 0);
    CHECK(!mx_presence_is_open(p, "@a:hs", 5, "D", 1));
    run_until(p, closed + 9.5);
    CHECK_INT(count(MX_PRESENCE_END, NULL, NULL), 0);
    run_until(p, closed + 21);
    CHECK_INT(count(MX_PRESENCE_END, NULL, NULL), 1);
    const rec *e = last(MX_PRESENCE_END, "D");
    CHECK(e && e->at >= closed + 10 && e->at <= closed + 20.5);
    /* It carries the close time, as Synapse's workers do. */
    CHECK(e && e->ms == (long long)(closed * 1000));
    char want[128];
    snprintf(want, sizeof(want), "USER_SYNC node1 @a:hs D end %lld",
             (long long)(closed * 1000));
    CHECK(e && !strcmp(e->line, want));
    CHECK_INT(mx_presence_stats_get(p)->devices, 0);
    CHECK_INT(mx_presence_stats_get(p)->users, 0);
    CHECK_INT(CLOSE(p, "@a:hs", "D", MX_PRESENCE_ONLINE), MX_ERR_NOTFOUND);
    mx_presence_free(p);
  }
}

static void test_reconnect_within_grace_sends_nothing(void) {
  mx_presence *p = make(false, 3);
  mx_presence_link(p, true, clock_now);
  OPEN(p, "@a:hs", "D", MX_PRESENCE_ONLINE);
  CLOSE(p, "@a:hs", "D", MX_PRESENCE_ONLINE);
  run_until(p, 1009);
  size_t before = nrec;
  CHECK_INT(OPEN(p, "@a:hs", "D", MX_PRESENCE_ONLINE), 0);
  CHECK_INT(nrec, before); /* no start, no set_state (not due yet) */
  run_until(p, 1040);
  CHECK_INT(count(MX_PRESENCE_END, NULL, NULL), 0);
  CHECK_INT(count(MX_PRESENCE_START, NULL, NULL), 1);
  mx_presence_free(p);
}

static void test_set_state_per_user_every_interval(void) {
  mx_presence *p = make(false, 4);
  mx_presence_link(p, true, clock_now);
  OPEN(p, "@a:hs", "D1", MX_PRESENCE_ONLINE);
  OPEN(p, "@a:hs", "D2", MX_PRESENCE_ONLINE);
  OPEN(p, "@b:hs", "E1", MX_PRESENCE_ONLINE);
  run_until(p, 1000 + 600);
  /* One per user (not per device): at 0, 45, ..., 585. */
  CHECK_INT(count(MX_PRESENCE_SET_STATE, "@a:hs", NULL), 14);
  CHECK_INT(count(MX_PRESENCE_SET_STATE, "@b:hs", NULL), 14);
  double prev = -1;
  for (size_t i = 0; i < nrec; i++) {
    if (recs[i].kind != MX_PRESENCE_SET_STATE || strcmp(recs[i].user, "@a:hs"))
      continue;
    if (prev >= 0)
      CHECK(recs[i].at - prev <= 45.5 && recs[i].at - prev >= 45);
    prev = recs[i].at;
  }
  /* The user closes: no set_state while only closing devices remain. */
  CLOSE(p, "@a:hs", "D1", MX_PRESENCE_ONLINE);
  CLOSE(p, "@a:hs", "D2", MX_PRESENCE_ONLINE);
  size_t n = count(MX_PRESENCE_SET_STATE, "@a:hs", NULL);
  run_until(p, clock_now + 100);
  CHECK_INT(count(MX_PRESENCE_SET_STATE, "@a:hs", NULL), n);
  CHECK_INT(count(MX_PRESENCE_END, "@a:hs", NULL), 2);
  /* Back later: a new user, set_state at once. */
  OPEN(p, "@a:hs", "D1", MX_PRESENCE_ONLINE);
  CHECK_INT(count(MX_PRESENCE_SET_STATE, "@a:hs", NULL), n + 1);
  mx_presence_free(p);
}

static void test_overdue_set_state_on_reopen(void) {
  mx_presence *p = make(false, 5);
  mx_presence_link(p, true, clock_now);
  OPEN(p, "@a:hs", "D", MX_PRESENCE_ONLINE);
  run_until(p, 1030);
  CLOSE(p, "@a:hs", "D", MX_PRESENCE_ONLINE);
  run_until(p, 1046); /* set_state was due at 1045, but nothing is open */
  size_t n = count(MX_PRESENCE_SET_STATE, NULL, NULL);
  CHECK_INT(n, 1);
  if (!count(MX_PRESENCE_END, NULL, NULL)) {
    OPEN(p, "@a:hs", "D", MX_PRESENCE_ONLINE); /* reconnect in the grace */
    CHECK_INT(count(MX_PRESENCE_SET_STATE, NULL, NULL), 2);
  }
  mx_presence_free(p);
}

static void test_reannounce_spread_60_to_120(void) {
  mx_presence *p = make(false, 6);
  mx_presence_link(p, true, clock_now);
  char dev[16];
  for (int i = 0; i < 200; i++) {
    snprintf(dev, sizeof(dev), "D%d", i);
    OPEN(p, "@a:hs", dev, MX_PRESENCE_ONLINE);
  }
  run_until(p, 1000 + 1200);
  /* Per device, starts at most 120 s (+ tick) and at least 60 s apart. */
  double min_gap = 1e9, max_gap = 0;
  size_t per_tick_max = 0;
  for (int i = 0; i < 200; i++) {
    snprintf(dev, sizeof(dev), "D%d", i);
    double prev = -1;
    for (size_t k = 0; k < nrec; k++) {
      if (recs[k].kind != MX_PRESENCE_START || strcmp(recs[k].device, dev))
        continue;
      if (prev >= 0) {
        double g = recs[k].at - prev;
        if (g < min_gap)
          min_gap = g;
        if (g > max_gap)
          max_gap = g;
      }
      prev = recs[k].at;
    }
  }
  CHECK(min_gap >= 60);
  CHECK(max_gap <= 120.5);
  /* Spread: after the opening, no half-second tick carries many starts. */
  for (size_t k = 0; k < nrec;) {
    size_t j = k, n = 0;
    for (; j < nrec && recs[j].at == recs[k].at; j++)
      n += recs[j].kind == MX_PRESENCE_START;
    if (recs[k].at > 1000 && n > per_tick_max)
      per_tick_max = n;
    k = j;
  }
  CHECK(per_tick_max <= 10);
  mx_presence_free(p);
}

static void test_link_down_then_up(void) {
  mx_presence *p = make(false, 7);
  mx_presence_link(p, true, clock_now);
  OPEN(p, "@a:hs", "D1", MX_PRESENCE_ONLINE);
  OPEN(p, "@a:hs", "D2", MX_PRESENCE_ONLINE);
  run_until(p, 1010);
  mx_presence_link(p, false, clock_now);
  CLOSE(p, "@a:hs", "D2", MX_PRESENCE_ONLINE);
  OPEN(p, "@b:hs", "E", MX_PRESENCE_ONLINE); /* opened while down */
  size_t before = nrec;
  run_until(p, 1300);
  /* No publish while down; set_state (HTTP) goes on. */
  for (size_t i = before; i < nrec; i++)
    CHECK(recs[i].kind == MX_PRESENCE_SET_STATE);
  CHECK(count(MX_PRESENCE_SET_STATE, "@b:hs", NULL) >= 6);
  CHECK_INT(mx_presence_stats_get(p)->devices, 2); /* D2 dropped */
  before = nrec;
  mx_presence_link(p, true, clock_now);
  CHECK_INT(recs[before].kind, MX_PRESENCE_CLEAR);
  CHECK_INT(nrec, before + 1);
  run_until(p, 1305.5);
  CHECK_INT(count(MX_PRESENCE_START, NULL, "D1"), 2);
  CHECK_INT(count(MX_PRESENCE_START, NULL, "E"), 1);
  CHECK_INT(count(MX_PRESENCE_START, NULL, "D2"), 1);
  CHECK_INT(count(MX_PRESENCE_END, NULL, NULL), 0);
  mx_presence_free(p);
}

static void test_replicate_reannounces_soon(void) {
  mx_presence *p = make(false, 8);
  mx_presence_link(p, true, clock_now);
  OPEN(p, "@a:hs", "D1", MX_PRESENCE_ONLINE);
  OPEN(p, "@b:hs", "E1", MX_PRESENCE_UNAVAILABLE);
  run_until(p, 1010);
  size_t before = nrec;
  const char line[] = "REPLICATE ";
  CHECK_INT(mx_presence_feed_line(p, line, sizeof(line) - 1, clock_now),
            MX_PRESENCE_LINE_REPLICATE);
  run_until(p, 1015.5);
  size_t starts = 0, states = 0;
  for (size_t i = before; i < nrec; i++) {
    starts += recs[i].kind == MX_PRESENCE_START;
    states += recs[i].kind == MX_PRESENCE_SET_STATE;
  }
  CHECK_INT(starts, 2);
  run_until(p, 1030.5);
  for (size_t i = before; i < nrec; i++)
    states += recs[i].kind == MX_PRESENCE_SET_STATE;
  CHECK_INT(states, 2); /* within 20 s, before the 45 s schedule */
  CHECK_INT(count(MX_PRESENCE_CLEAR, NULL, NULL), 1); /* only the first */
  CHECK_INT(mx_presence_stats_get(p)->replicates, 1);
  mx_presence_free(p);
}

static void test_classify(void) {
  mx_presence *p = make(false, 9);
  struct {
    const char *line;
    mx_presence_line want;
  } cases[] = {
      {"REPLICATE", MX_PRESENCE_LINE_REPLICATE},
      {"REPLICATE ", MX_PRESENCE_LINE_REPLICATE},
      {"REPLICATEX", MX_PRESENCE_LINE_OTHER},
      {"USER_SYNC node1 @a:hs D start 1", MX_PRESENCE_LINE_ECHO},
      {"USER_SYNC node12 @a:hs D start 1", MX_PRESENCE_LINE_FOREIGN},
      {"USER_SYNC node @a:hs D start 1", MX_PRESENCE_LINE_FOREIGN},
      {"USER_SYNC", MX_PRESENCE_LINE_FOREIGN},
      {"CLEAR_USER_SYNC node1", MX_PRESENCE_LINE_ECHO},
      {"CLEAR_USER_SYNC node1 ", MX_PRESENCE_LINE_FOREIGN},
      {"CLEAR_USER_SYNC worker1", MX_PRESENCE_LINE_FOREIGN},
      {"RDATA events master 5 [\"ev\"]", MX_PRESENCE_LINE_OTHER},
      {"POSITION events master 1 2", MX_PRESENCE_LINE_OTHER},
      {"", MX_PRESENCE_LINE_OTHER},
      {" REPLICATE", MX_PRESENCE_LINE_OTHER},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    mx_presence_line got =
        mx_presence_classify(p, cases[i].line, strlen(cases[i].line));
    if (got != cases[i].want)
      printf("# line \"%s\": %d, want %d\n", cases[i].line, got, cases[i].want);
    CHECK_INT(got, cases[i].want);
  }
  mx_presence_feed_line(p, "USER_SYNC node1 @a:hs D start 1", 31, clock_now);
  mx_presence_feed_line(p, "USER_SYNC w @a:hs D start 1", 27, clock_now);
  CHECK_INT(mx_presence_stats_get(p)->echoes, 1);
  CHECK_INT(mx_presence_stats_get(p)->foreign, 1);
  CHECK_INT(nrec, 0);
  mx_presence_free(p);
}

static void test_unencodable_ids_refused(void) {
  mx_presence *p = make(false, 10);
  mx_presence_link(p, true, clock_now);
  nrec = 0;
  CHECK_INT(OPEN(p, "@a:hs", "None", MX_PRESENCE_ONLINE), MX_ERR_INVALID);
  CHECK_INT(OPEN(p, "@a:hs", "A B", MX_PRESENCE_ONLINE), MX_ERR_INVALID);
  CHECK_INT(OPEN(p, "@a:hs", "", MX_PRESENCE_ONLINE), MX_ERR_INVALID);
  CHECK_INT(OPEN(p, "@a:hs", "D\xc3\xa9", MX_PRESENCE_ONLINE), MX_ERR_INVALID);
  CHECK_INT(OPEN(p, "@a:hs", "D\n", MX_PRESENCE_ONLINE), MX_ERR_INVALID);
  CHECK_INT(OPEN(p, "@a b:hs", "D", MX_PRESENCE_ONLINE), MX_ERR_INVALID);
  char big[MX_PRESENCE_MAX_ID + 2];
  memset(big, 'D', sizeof(big) - 1);
  big[sizeof(big) - 1] = '\0';
  CHECK_INT(OPEN(p, "@a:hs", big, MX_PRESENCE_ONLINE), MX_ERR_INVALID);
  big[MX_PRESENCE_MAX_ID] = '\0';
  CHECK_INT(OPEN(p, "@a:hs", big, MX_PRESENCE_ONLINE), 0);
  CHECK_INT(OPEN(p, "@a:hs", "NONE", MX_PRESENCE_ONLINE), 0);
  CHECK_INT(mx_presence_stats_get(p)->refused, 7);
  run_until(p, 1003);
  CHECK_INT(count(MX_PRESENCE_START, NULL, NULL), 2);
  /* The longest line fits the documented buffer. */
  const rec *s = last(MX_PRESENCE_START, NULL);
  CHECK(s != NULL);
  mx_presence_free(p);
}

static void test_keepalive_mode_and_states(void) {
  mx_presence *p = make(true, 11);
  OPEN(p, "@a:hs", "D1", MX_PRESENCE_UNAVAILABLE);
  CHECK_INT(nrec, 1); /* link down: no start; the keepalive still goes */
  CHECK_INT(recs[0].kind, MX_PRESENCE_KEEPALIVE);
  CHECK_INT(recs[0].state, MX_PRESENCE_UNAVAILABLE);
  OPEN(p, "@a:hs", "D2", MX_PRESENCE_ONLINE);
  run_until(p, 1046);
  const rec *k = last(MX_PRESENCE_KEEPALIVE, NULL);
  CHECK(k && k->state == MX_PRESENCE_ONLINE && !strcmp(k->device, "D2"));
  CHECK_INT(count(MX_PRESENCE_SET_STATE, NULL, NULL), 0);
  /* The online stream goes: back to unavailable. */
  CLOSE(p, "@a:hs", "D2", MX_PRESENCE_ONLINE);
  CHECK_INT(CLOSE(p, "@a:hs", "D1", MX_PRESENCE_ONLINE), MX_ERR_NOTFOUND);
  run_until(p, 1091);
  k = last(MX_PRESENCE_KEEPALIVE, NULL);
  CHECK(k && k->state == MX_PRESENCE_UNAVAILABLE && !strcmp(k->device, "D1"));
  mx_presence_free(p);
}

static void test_failed_set_state_retried(void) {
  mx_presence *p = make(false, 12);
  OPEN(p, "@a:hs", "D", MX_PRESENCE_ONLINE);
  CHECK_INT(count(MX_PRESENCE_SET_STATE, NULL, NULL), 1);
  mx_presence_set_state_failed(p, "@a:hs", 5, clock_now);
  run_until(p, 1004.5);
  CHECK_INT(count(MX_PRESENCE_SET_STATE, NULL, NULL), 1);
  run_until(p, 1005.5);
  CHECK_INT(count(MX_PRESENCE_SET_STATE, NULL, NULL), 2);
  mx_presence_set_state_failed(p, "@nobody:hs", 10, clock_now);
  CHECK_INT(mx_presence_stats_get(p)->set_state_failures, 2);
  mx_presence_free(p);
}

static void test_shutdown_clears_and_forgets(void) {
  mx_presence *p = make(false, 13);
  mx_presence_link(p, true, clock_now);
  OPEN(p, "@a:hs", "D", MX_PRESENCE_ONLINE);
  nrec = 0;
  mx_presence_shutdown(p);
  CHECK_INT(nrec, 1);
  CHECK_INT(recs[0].kind, MX_PRESENCE_CLEAR);
  run_until(p, 1500);
  CHECK_INT(nrec, 1);
  CHECK_INT(mx_presence_stats_get(p)->devices, 0);
  mx_presence_free(p);
  /* Link down at shutdown: nothing to send. */
  p = make(false, 13);
  OPEN(p, "@a:hs", "D", MX_PRESENCE_ONLINE);
  nrec = 0;
  mx_presence_shutdown(p);
  CHECK_INT(nrec, 0);
  mx_presence_free(p);
}

static void test_device_cap(void) {
  nrec = 0;
  mx_presence_opts o = {.instance = "n", .max_devices = 2};
  mx_presence *p = NULL;
  CHECK_INT(mx_presence_new(&p, &o, on_emit, NULL), 0);
  cur = p;
  CHECK_INT(mx_presence_open(p, "@a:hs", 5, "A", 1, MX_PRESENCE_ONLINE, 1), 0);
  CHECK_INT(mx_presence_open(p, "@a:hs", 5, "B", 1, MX_PRESENCE_ONLINE, 1), 0);
  CHECK_INT(mx_presence_open(p, "@a:hs", 5, "C", 1, MX_PRESENCE_ONLINE, 1),
            MX_ERR_LIMIT);
  CHECK_INT(mx_presence_open(p, "@a:hs", 5, "A", 1, MX_PRESENCE_ONLINE, 1), 0);
  mx_presence_free(p);
}

static void test_deterministic(void) {
  rec first[64];
  size_t n1 = 0;
  for (int round = 0; round < 2; round++) {
    mx_presence *p = make(false, 42);
    mx_presence_link(p, true, clock_now);
    OPEN(p, "@a:hs", "D1", MX_PRESENCE_ONLINE);
    OPEN(p, "@b:hs", "D2", MX_PRESENCE_ONLINE);
    CLOSE(p, "@b:hs", "D2", MX_PRESENCE_ONLINE);
    run_until(p, 1300);
    if (round == 0) {
      n1 = nrec < 64 ? nrec : 64;
      memcpy(first, recs, n1 * sizeof(rec));
    } else {
      CHECK_INT(nrec < 64 ? nrec : 64, n1);
      CHECK(memcmp(first, recs, n1 * sizeof(rec)) == 0);
    }
    mx_presence_free(p);
  }
}

int main(void) {
  TAP_RUN(TAP_CASE(test_new_rejects_bad_options),
          TAP_CASE(test_link_up_clears_first),
          TAP_CASE(test_open_starts_and_sets_state_at_once),
          TAP_CASE(test_end_after_10_to_20_seconds),
          TAP_CASE(test_reconnect_within_grace_sends_nothing),
          TAP_CASE(test_set_state_per_user_every_interval),
          TAP_CASE(test_overdue_set_state_on_reopen),
          TAP_CASE(test_reannounce_spread_60_to_120),
          TAP_CASE(test_link_down_then_up),
          TAP_CASE(test_replicate_reannounces_soon),
          TAP_CASE(test_classify),
          TAP_CASE(test_unencodable_ids_refused),
          TAP_CASE(test_keepalive_mode_and_states),
          TAP_CASE(test_failed_set_state_retried),
          TAP_CASE(test_shutdown_clears_and_forgets),
          TAP_CASE(test_device_cap),
          TAP_CASE(test_deterministic));
}
