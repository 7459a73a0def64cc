/*
 * One file on purpose: the cases are the hub's specification, numbered
 * in the order of sync/hub.h's rules, over one shared fake.
 *
 * Unit tests of the sync hub on a real libev loop with a fake homeserver API
 * (hub_fake.h): every upstream /sync request the hub starts is recorded
 * (parameters, start time) and stays in flight until the test answers or
 * the hub cancels it. Streams record their callbacks and keep a reference
 * to every event they get, so tests compare chunk pointers (sharing) and
 * bytes (framing).
 */
#include "sync/hub.h"

#include <ev.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "common/chunk.h"
#include "common/error.h"
#include "common/log.h"
#include "sync/json_scan.h"
#include "tests/unit/hub_fake.h"
#include "tests/unit/tap.h"

#define BACKOFF_BASE 0.01

/* ---------------------------------------------------------------------- */
/* Loop and hub per test */

static double start_window = -1; /* mx_sync_hub_opts.start_retry_window */

static void setup_opts(double backoff_base, double backoff_max) {
  mx_sync_hub_opts o = hf_opts();
  o.backoff_base = backoff_base;
  /* failures before the start answer at once here;
   * test_start_retry_window covers the window */
  o.start_retry_window = start_window;
  o.backoff_max = backoff_max;
  hf_setup(&o, &tap_failed_checks);
}

static void setup(void) { setup_opts(BACKOFF_BASE, 1.0); }

static void teardown(void) { hf_teardown(); }

static mx_sync_stream *open_rec(rec *r, const char *name, const char *token,
                                const char *query, const char *since,
                                bool full_state) {
  return hf_open(r, name, token, query, since, full_state);
}

/* A stream opened without since, started with batch `first`; returns the
 * index of its long-poll request after taken. */
static int started_longpolling(rec *r, const char *token, const char *first) {
  int base = F.nreqs;
  open_rec(r, "s", token, "filter=0", NULL, false);
  spin();
  CHECK_INT(F.nreqs, base + 1);
  answer(base, 200, batch(first));
  CHECK_INT(r->nevents, 1);
  taken(r);
  spin();
  CHECK_INT(F.nreqs, base + 2);
  CHECK_STREQ(F.reqs[base + 1].since, first);
  CHECK_INT(F.reqs[base + 1].timeout_ms, LONGPOLL_MS);
  return base + 1;
}

/* ---------------------------------------------------------------------- */
/* 1, 2: first fetch, first event, long-poll after taken */

static void test_first_fetch_and_event(void) {
  setup();
  rec a = {0};
  open_rec(&a, "a", "tokA", "filter=1&set_presence=online", NULL, true);
  /* Nothing from inside open: no callback (and no fetch yet). */
  CHECK_INT(a.ncalls, 0);
  spin();
  CHECK_INT(F.nreqs, 1);
  CHECK_INT(mx_sync_hub_fetches(hub), 1);
  freq *r = &F.reqs[0];
  CHECK_STREQ(r->token, "tokA");
  CHECK_STREQ(r->query, "filter=1&set_presence=online");
  CHECK(r->since == NULL);
  CHECK_INT(r->timeout_ms, 0);
  CHECK(r->full_state);
  CHECK_STREQ(r->peer_ip, "192.0.2.7");
  CHECK_STREQ(r->user_agent, "test-agent");
  CHECK_INT(a.ncalls, 0); /* no answer yet */

  const char *body = batch("s1");
  answer(0, 200, body);
  CHECK_INT(a.nstart, 1);
  CHECK_INT(a.start_status, 200);
  CHECK_INT(a.nevents, 1);
  char want[512];
  snprintf(want, sizeof(want), "id: s1\ndata: %s\n\n", body);
  CHECK_STREQ(last_event(&a), want);
  CHECK_STREQ(mx_sync_stream_position(a.st), "s1");
  CHECK_INT(mx_sync_hub_fetches(hub), 0);
  CHECK_INT(mx_sync_hub_streams(hub), 1);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

static void test_longpoll_after_taken(void) {
  setup();
  rec a = {0};
  open_rec(&a, "a", "tokA", "filter=1", NULL, true);
  spin();
  answer(0, 200, batch("s1"));
  CHECK_INT(a.nevents, 1);
  /* The client has not taken the event: nothing is fetched. */
  spin();
  run_for(0.02);
  CHECK_INT(F.nreqs, 1);
  CHECK_INT(mx_sync_hub_fetches(hub), 0);

  taken(&a);
  CHECK_INT(a.ncalls, 2); /* nothing from inside taken */
  spin();
  CHECK_INT(F.nreqs, 2);
  freq *r = &F.reqs[1];
  CHECK_STREQ(r->since, "s1");
  CHECK_INT(r->timeout_ms, LONGPOLL_MS);
  CHECK(!r->full_state); /* first batch only */
  CHECK_STREQ(r->token, "tokA");
  CHECK_STREQ(r->query, "filter=1");

  /* A second taken without a new event changes nothing. */
  taken(&a);
  spin();
  CHECK_INT(F.nreqs, 2);

  answer(1, 200, batch("s2"));
  CHECK_INT(a.nstart, 1); /* started once */
  CHECK_INT(a.nevents, 2);
  CHECK_STREQ(event_id(&a), "s2");
  CHECK_STREQ(mx_sync_stream_position(a.st), "s2");
  taken(&a);
  spin();
  CHECK_INT(F.nreqs, 3);
  CHECK_STREQ(F.reqs[2].since, "s2");
  CHECK(!F.reqs[2].full_state);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

/* ---------------------------------------------------------------------- */
/* 3: empty answers */

static void test_empty_answers(void) {
  setup();
  rec a = {0}, b = {0};
  int lp = started_longpolling(&a, "tokA", "s1");
  /* Nothing new within the long-poll: no event, the same poll again --
   * paced, since this one came back at once (a homeserver ignoring
   * timeout= must not be polled in a tight loop). */
  answer(lp, 200, batch("s1"));
  spin();
  CHECK_INT(a.nevents, 1);
  CHECK_INT(F.nreqs, lp + 1); /* not re-issued yet */
  run_for(0.5);
  CHECK_INT(F.nreqs, lp + 1);
  run_for(0.7);
  CHECK_INT(F.nreqs, lp + 2);
  CHECK_STREQ(F.reqs[lp + 1].since, "s1");
  CHECK_INT(F.reqs[lp + 1].timeout_ms, LONGPOLL_MS);
  CHECK(F.reqs[lp + 1].live);
  CHECK_INT(mx_sync_hub_fetches(hub), 1);
  answer(lp + 1, 200, batch("s2"));
  CHECK_INT(a.nevents, 2);
  CHECK_STREQ(event_id(&a), "s2");

  /* An empty first answer starts the stream without an event, then the
   * stream long-polls at its start position. */
  int base = F.nreqs;
  open_rec(&b, "b", "tokB", "filter=0", "s5", false);
  spin();
  CHECK_INT(F.nreqs, base + 1);
  CHECK_STREQ(F.reqs[base].since, "s5");
  CHECK_INT(F.reqs[base].timeout_ms, 0);
  answer(base, 200, batch("s5"));
  CHECK_INT(b.nstart, 1);
  CHECK_INT(b.start_status, 200);
  CHECK_INT(b.nevents, 0);
  spin();
  CHECK_INT(b.nevents, 0);
  CHECK_INT(F.nreqs, base + 2);
  CHECK_STREQ(F.reqs[base + 1].since, "s5");
  CHECK_INT(F.reqs[base + 1].timeout_ms, LONGPOLL_MS);
  CHECK_STREQ(mx_sync_stream_position(b.st), "s5");
  answer(base + 1, 200, batch("s6"));
  CHECK_INT(b.nstart, 1);
  CHECK_INT(b.nevents, 1);
  CHECK_STREQ(event_id(&b), "s6");
  close_rec(&a);
  close_rec(&b);
  teardown();
  rec_free(&a);
  rec_free(&b);
}

/* ---------------------------------------------------------------------- */
/* 4, 5: sharing */

static void test_shared_fetch_and_chunk(void) {
  setup();
  rec a = {0}, b = {0};
  open_rec(&a, "a", "tok", "filter=1", NULL, false);
  open_rec(&b, "b", "tok", "filter=1", NULL, false);
  spin();
  CHECK_INT(F.nreqs, 1);
  CHECK_INT(mx_sync_hub_fetches(hub), 1);
  answer(0, 200, batch("s1"));
  CHECK_INT(a.nevents, 1);
  CHECK_INT(b.nevents, 1);
  CHECK(a.events[0] != NULL && a.events[0] == b.events[0]);
  /* One reference each (an initial batch has no since, so the replay
   * buffer keeps none). */
  if (a.events[0])
    CHECK_INT(a.events[0]->refs, 2);

  /* Both take: one shared long-poll, one shared event again. */
  taken(&a);
  taken(&b);
  spin();
  CHECK_INT(F.nreqs, 2);
  answer(1, 200, batch("s2"));
  CHECK_INT(a.nevents, 2);
  CHECK_INT(b.nevents, 2);
  CHECK(a.events[1] != NULL && a.events[1] == b.events[1]);
  /* Ours, plus the replay buffer's entry for since=s1. */
  if (a.events[1])
    CHECK_INT(a.events[1]->refs, 3);
  close_rec(&a);
  close_rec(&b);
  teardown();
  rec_free(&a);
  rec_free(&b);
}

static void test_different_feeds_not_shared(void) {
  setup();
  rec r[5] = {{0}};
  /* Same token, other query; other token; token and query that a naive
   * concatenation would confuse; same feed but full_state. */
  static const struct {
    const char *tok, *q;
    bool fs;
  } p[5] = {{"tok", "filter=1", false},
            {"tok", "filter=2", false},
            {"tok2", "filter=1", false},
            {"tokf", "ilter=1", false},
            {"tok", "filter=1", true}};
  for (int i = 0; i < 5; i++)
    open_rec(&r[i], "r", p[i].tok, p[i].q, NULL, p[i].fs);
  spin();
  CHECK_INT(F.nreqs, 5);
  CHECK_INT(mx_sync_hub_fetches(hub), 5);
  /* Answer each request with its own batch; only its stream gets it. */
  for (int i = 0; i < F.nreqs; i++) {
    char next[16];
    snprintf(next, sizeof(next), "n%d", i);
    int who = -1;
    for (int j = 0; j < 5; j++)
      if (strcmp(F.reqs[i].token, p[j].tok) == 0 &&
          strcmp(F.reqs[i].query, p[j].q) == 0 &&
          F.reqs[i].full_state == p[j].fs)
        who = j;
    CHECK(who >= 0);
    answer(i, 200, batch(next));
    if (who >= 0) {
      CHECK_INT(r[who].nevents, 1);
      CHECK_STREQ(event_id(&r[who]), next);
    }
  }
  for (int i = 0; i < 5; i++) {
    CHECK_INT(r[i].nevents, 1);
    close_rec(&r[i]);
  }
  teardown();
  for (int i = 0; i < 5; i++)
    rec_free(&r[i]);
}

/* ---------------------------------------------------------------------- */
/* 6, 7: replay */

static void test_replay_resume(void) {
  setup();
  rec a = {0}, b = {0}, c = {0}, d = {0};
  open_rec(&a, "a", "tok", "filter=1", "s1", false);
  spin();
  CHECK_INT(F.nreqs, 1);
  answer(0, 200, batch("s2"));
  taken(&a);
  spin();
  CHECK_INT(F.nreqs, 2);
  answer(1, 200, batch("s3"));
  CHECK_INT(a.nevents, 2);
  /* a does not take s3: nothing upstream is in flight now. */
  CHECK_INT(mx_sync_hub_fetches(hub), 0);

  /* b resumes from s1 (a reconnect): s2 and s3 from memory. */
  open_rec(&b, "b", "tok", "filter=1", "s1", false);
  CHECK_INT(b.ncalls, 0); /* not from inside open */
  spin();
  CHECK_INT(F.nreqs, 2);
  CHECK_INT(b.nstart, 1);
  CHECK_INT(b.start_status, 200);
  CHECK_INT(b.nevents, 1);
  CHECK_STREQ(event_id(&b), "s2");
  CHECK(b.events[0] == a.events[0]); /* the same encoded event */
  CHECK_STREQ(mx_sync_stream_position(b.st), "s2");
  spin();
  CHECK_INT(b.nevents, 1); /* the next one only after taken */
  taken(&b);
  CHECK_INT(b.nevents, 1); /* not from inside taken */
  spin();
  CHECK_INT(F.nreqs, 2);
  CHECK_INT(b.nevents, 2);
  CHECK_STREQ(event_id(&b), "s3");
  CHECK(b.events[1] == a.events[1]);
  /* End of the chain: a long-poll at s3. */
  taken(&b);
  spin();
  CHECK_INT(F.nreqs, 3);
  CHECK_STREQ(F.reqs[2].since, "s3");
  CHECK_INT(F.reqs[2].timeout_ms, LONGPOLL_MS);
  CHECK_INT(reqs_since("s1"), 1);
  CHECK_INT(reqs_since("s2"), 1);

  /* An unknown position goes upstream. */
  open_rec(&c, "c", "tok", "filter=1", "s9", false);
  spin();
  CHECK_INT(F.nreqs, 4);
  CHECK_STREQ(F.reqs[3].since, "s9");
  CHECK_INT(F.reqs[3].timeout_ms, 0);
  CHECK_INT(c.ncalls, 0);
  /* The replay buffer is per feed: another query does not see it. */
  open_rec(&d, "d", "tok", "filter=2", "s1", false);
  spin();
  CHECK_INT(F.nreqs, 5);
  CHECK_STREQ(F.reqs[4].since, "s1");
  CHECK_STREQ(F.reqs[4].query, "filter=2");
  CHECK_INT(d.ncalls, 0);
  close_rec(&a);
  close_rec(&b);
  close_rec(&c);
  close_rec(&d);
  teardown();
  rec_free(&a);
  rec_free(&b);
  rec_free(&c);
  rec_free(&d);
}

static void test_slow_and_fast_tabs(void) {
  setup();
  rec a = {0}, b = {0};
  open_rec(&a, "a", "tok", "filter=1", "s1", false);
  open_rec(&b, "b", "tok", "filter=1", "s1", false);
  spin();
  CHECK_INT(F.nreqs, 1);
  answer(0, 200, batch("s2"));
  CHECK_INT(a.nevents, 1);
  CHECK_INT(b.nevents, 1);

  /* a is fast: takes s2, its long-poll at s2 brings s3. */
  taken(&a);
  spin();
  CHECK_INT(F.nreqs, 2);
  CHECK_STREQ(F.reqs[1].since, "s2");
  answer(1, 200, batch("s3"));
  CHECK_INT(a.nevents, 2);
  CHECK_INT(b.nevents, 1);

  /* b is slow: it takes s2 now and gets s3 from memory (fetching since=s2
   * again would miss to-device messages acknowledged by a's next poll). */
  taken(&b);
  spin();
  CHECK_INT(b.nevents, 2);
  CHECK_STREQ(event_id(&b), "s3");
  CHECK(b.events[1] == a.events[1]);
  CHECK_INT(reqs_since("s2"), 1);
  CHECK_INT(F.nreqs, 2);

  /* a takes s3 and long-polls; b takes while that poll is in flight and
   * joins it instead of sending its own. */
  taken(&a);
  spin();
  CHECK_INT(F.nreqs, 3);
  taken(&b);
  spin();
  CHECK_INT(F.nreqs, 3);
  CHECK_INT(reqs_since("s3"), 1);
  CHECK_INT(mx_sync_hub_fetches(hub), 1);
  answer(2, 200, batch("s4"));
  CHECK_INT(a.nevents, 3);
  CHECK_INT(b.nevents, 3);
  CHECK(a.events[2] == b.events[2]);
  close_rec(&a);
  close_rec(&b);
  teardown();
  rec_free(&a);
  rec_free(&b);
}

/* ---------------------------------------------------------------------- */
/* 8: final errors */

static void test_4xx(void) {
  setup();
  rec a = {0}, b = {0};
  static const char unknown[] =
      "{\"errcode\":\"M_UNKNOWN_TOKEN\",\"error\":\"Unknown token\","
      "\"soft_logout\":false}";
  open_rec(&a, "a", "bad", "filter=1", NULL, false);
  spin();
  answer(0, 401, unknown);
  CHECK_INT(a.nstart, 1);
  CHECK_INT(a.start_status, 401);
  CHECK_STREQ(a.start_body, unknown);
  CHECK_INT(a.nevents + a.nfatal, 0);
  CHECK_INT(mx_sync_hub_fetches(hub), 0);
  spin();
  CHECK_INT(F.nreqs, 1); /* no retry */
  close_rec(&a);

  /* Logged out while long-polling: an error event. */
  int lp = started_longpolling(&b, "tokB", "s1");
  answer(lp, 401, unknown);
  CHECK_INT(b.nfatal, 1);
  CHECK_INT(b.nstart, 1);
  CHECK_INT(b.nevents, 1);
  char want[512];
  snprintf(want, sizeof(want), "event: error\ndata: %s\n\n", unknown);
  if (b.fatal)
    CHECK_MEMEQ(b.fatal->data, b.fatal->len, want, strlen(want));
  CHECK_INT(mx_sync_hub_fetches(hub), 0);
  spin();
  run_for(0.05);
  CHECK_INT(F.nreqs, lp + 1);
  close_rec(&b);
  teardown();
  rec_free(&a);
  rec_free(&b);
}

/* ---------------------------------------------------------------------- */
/* 9, 10: transient failures */

/* The Matrix errcode of a JSON error body, or "". */
static const char *errcode_of(const char *body) {
  static char out[64];
  static const char *const path[] = {"errcode"};
  mx_json_span v;
  const char *s;
  size_t n;
  bool esc;
  out[0] = '\0';
  if (mx_json_scan_validate(body, strlen(body)) == 0 &&
      mx_json_scan_find(body, strlen(body), path, 1, &v) == 0 &&
      v.type == MX_JSON_STRING && mx_json_scan_string(&v, &s, &n, &esc) == 0)
    snprintf(out, sizeof(out), "%.*s", (int)n, s);
  return out;
}

/* Before the start, a transient failure is retried within the window
 * (a blip must not end an EventSource for good); one that lasts past it
 * becomes the stream's HTTP answer. */
static void test_start_retry_window(void) {
  start_window = 0.3;
  setup_opts(0.01, 0.05);
  start_window = -1;
  rec a = {0}, b = {0};
  open_rec(&a, "a", "tokA", "filter=1", NULL, false);
  spin();
  CHECK_INT(F.nreqs, 1);
  answer(0, 502, "{\"errcode\":\"M_UNKNOWN\",\"error\":\"blip\"}");
  CHECK_INT(a.nstart, 0); /* still waiting */
  run_for(0.1);
  CHECK_INT(F.nreqs, 2); /* retried, same request */
  CHECK(F.reqs[1].since == NULL);
  answer(1, 200, batch("s1"));
  CHECK_INT(a.nstart, 1);
  CHECK_INT(a.start_status, 200);
  CHECK_INT(a.nevents, 1);
  /* A homeserver down for longer than the window: the error answer. */
  int base = F.nreqs;
  open_rec(&b, "b", "tokB", "filter=1", NULL, false);
  spin();
  for (int i = 0; i < 100 && b.nstart == 0; i++) {
    if (F.nreqs > base && F.reqs[F.nreqs - 1].live)
      answer_full(F.nreqs - 1, 0, MX_ERR_UPSTREAM, NULL, -1);
    run_for(0.02);
  }
  CHECK_INT(b.nstart, 1);
  CHECK_INT(b.start_status, 502);
  CHECK(F.nreqs - base >= 3); /* retried within the window first */
  close_rec(&a);
  close_rec(&b);
  teardown();
  rec_free(&a);
  rec_free(&b);
}

static void test_transient_before_start(void) {
  setup();
  static const char bad_gw[] =
      "{\"errcode\":\"M_UNKNOWN\",\"error\":\"Bad gateway upstream\"}";
  static const char limited[] =
      "{\"errcode\":\"M_LIMIT_EXCEEDED\",\"retry_after_ms\":2000}";
  static const struct {
    int status, err;
    const char *body;
    int want_status;       /* -1: 502, or the upstream 5xx */
    const char *want_body; /* NULL: our own Matrix error */
  } cases[] = {
      {502, 0, bad_gw, 502, bad_gw},
      {429, 0, limited, 429, limited},
      {500, 0, "<html>oops</html>", -1, NULL},
      {0, MX_ERR_UPSTREAM, NULL, 502, NULL},
      {0, MX_ERR_TIMEOUT, NULL, 504, NULL},
      {200, 0, "not json", 502, NULL},
      {200, 0, "{\"rooms\":{}}", 502, NULL},
  };
  size_t n = sizeof(cases) / sizeof(cases[0]);
  for (size_t i = 0; i < n; i++) {
    rec a = {0};
    char tok[16];
    snprintf(tok, sizeof(tok), "t%zu", i);
    int failed = tap_failed_checks;
    int base = F.nreqs;
    open_rec(&a, "a", tok, "filter=1", NULL, false);
    spin();
    CHECK_INT(F.nreqs, base + 1);
    answer_full(base, cases[i].status, cases[i].err, cases[i].body, -1);
    CHECK_INT(a.nstart, 1);
    if (cases[i].want_status < 0)
      CHECK(a.start_status == 502 || a.start_status == cases[i].status);
    else
      CHECK_INT(a.start_status, cases[i].want_status);
    if (cases[i].want_body)
      CHECK_STREQ(a.start_body, cases[i].want_body);
    else
      CHECK_STREQ(errcode_of(a.start_body), "M_UNKNOWN");
    CHECK_INT(a.nevents + a.nfatal, 0);
    CHECK_INT(mx_sync_hub_fetches(hub), 0);
    run_for(0.03); /* > backoff: no retry for a stream that was answered */
    CHECK_INT(F.nreqs, base + 1);
    if (tap_failed_checks != failed)
      printf("# case %zu (status %d)\n", i, cases[i].status);
    close_rec(&a);
    rec_free(&a);
  }
  teardown();
}

static void test_transient_after_start_retries(void) {
  setup();
  static const struct {
    int status, err;
    const char *body;
  } fails[] = {
      {503, 0, "{\"errcode\":\"M_UNKNOWN\",\"error\":\"down\"}"},
      {502, 0, "<html>bad gateway</html>"},
      {0, MX_ERR_UPSTREAM, NULL},
      {0, MX_ERR_TIMEOUT, NULL},
      {429, 0, "{\"errcode\":\"M_LIMIT_EXCEEDED\"}"},
      {200, 0, "not json"},
      {200, 0, "{\"rooms\":{}}"},
      {200, 0, "{\"next_batch\":5}"},
      {200, 0, "{\"next_batch\":\"\"}"},
  };
  size_t n = sizeof(fails) / sizeof(fails[0]);
  for (size_t i = 0; i < n; i++) {
    rec a = {0};
    char tok[16], next[16];
    int failed = tap_failed_checks;
    snprintf(tok, sizeof(tok), "t%zu", i);
    snprintf(next, sizeof(next), "s2_%zu", i);
    int lp = started_longpolling(&a, tok, "s1");
    answer_full(lp, fails[i].status, fails[i].err, fails[i].body, -1);
    /* The stream keeps waiting: no callback, the fetch is kept. */
    CHECK_INT(a.ncalls, 2);
    CHECK_INT(mx_sync_hub_fetches(hub), 1);
    CHECK(wait_reqs(lp + 2, 2.0));
    CHECK_INT(F.nreqs, lp + 2);
    freq *r = &F.reqs[lp + 1];
    if (F.nreqs == lp + 2) {
      /* The same request again. */
      CHECK_STREQ(r->since, "s1");
      CHECK_INT(r->timeout_ms, LONGPOLL_MS);
      CHECK_STREQ(r->token, tok);
      CHECK_STREQ(r->query, "filter=0");
      CHECK(!r->full_state);
      CHECK_STREQ(r->peer_ip, "192.0.2.7");
      answer(lp + 1, 200, batch(next));
    }
    CHECK_INT(a.nevents, 2);
    CHECK_INT(a.nfatal, 0);
    CHECK_STREQ(event_id(&a), next);
    CHECK_INT(reqs_since("s1") - 2 * (int)i, 2); /* earlier cases: two each */
    if (tap_failed_checks != failed)
      printf("# case %zu (status %d)\n", i, fails[i].status);
    close_rec(&a);
    rec_free(&a);
  }
  teardown();
}

/* Answers request i with a failure after bringing the loop clock to now,
 * so the retry delay is measured from the answer. Returns that time. */
static double fail_now(int i, int status, const char *body, long ra) {
  ev_now_update(loop);
  double t = ev_time();
  answer_full(i, status, 0, body, ra);
  return t;
}

static void test_429_retry_after(void) {
  setup();
  rec a = {0};
  int lp = started_longpolling(&a, "tok", "s1");
  /* retry_after_ms in the body (the API did not parse it). */
  double t = fail_now(
      lp, 429, "{\"errcode\":\"M_LIMIT_EXCEEDED\",\"retry_after_ms\":150}", -1);
  CHECK(wait_reqs(lp + 2, 3.0));
  if (F.nreqs >= lp + 2) {
    double gap = F.reqs[lp + 1].t_start - t;
    if (gap < 0.149)
      printf("# retry after %.3f s, wanted >= 0.150\n", gap);
    CHECK(gap >= 0.149);
    /* retry_after_ms given by the API, no body field. */
    t = fail_now(lp + 1, 429, "{\"errcode\":\"M_LIMIT_EXCEEDED\"}", 120);
    CHECK(wait_reqs(lp + 3, 3.0));
  }
  if (F.nreqs >= lp + 3) {
    double gap = F.reqs[lp + 2].t_start - t;
    if (gap < 0.119)
      printf("# retry after %.3f s, wanted >= 0.120\n", gap);
    CHECK(gap >= 0.119);
    answer(lp + 2, 200, batch("s2"));
  }
  CHECK_INT(a.nevents, 2);
  CHECK_INT(reqs_since("s1"), 3);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

static void test_backoff_grows(void) {
  setup_opts(BACKOFF_BASE, 1.0);
  rec a = {0};
  int lp = started_longpolling(&a, "tok", "s1");
  /* Five failures in a row; gap k follows failure k (delay base * 2^k
   * times a jitter in [0.5, 1.5)). */
  double gaps[5] = {0};
  int cur = lp;
  for (int k = 0; k < 5; k++) {
    double t = fail_now(cur, 503, "{\"errcode\":\"M_UNKNOWN\"}", -1);
    if (!wait_reqs(cur + 2, 3.0)) {
      CHECK(!"retry did not come");
      break;
    }
    gaps[k] = F.reqs[cur + 1].t_start - t;
    cur++;
  }
  printf("# gaps: %.3f %.3f %.3f %.3f %.3f\n", gaps[0], gaps[1], gaps[2],
         gaps[3], gaps[4]);
  /* Delays only grow by the loop's latency, so lower bounds are exact and
   * comparisons leave room for a loaded machine. Jitter makes neighbours
   * overlap; four doublings apart never do. */
  CHECK(gaps[0] >= 0.5 * BACKOFF_BASE - 0.001);
  CHECK(gaps[2] >= 4 * BACKOFF_BASE * 0.5 - 0.001);
  CHECK(gaps[4] >= 16 * BACKOFF_BASE * 0.5 - 0.001);
  CHECK(gaps[4] > 2 * gaps[0]);
  /* The stream still gets its batch. */
  if (F.nreqs == cur + 1 && F.reqs[cur].live)
    answer(cur, 200, batch("s2"));
  CHECK_INT(a.nevents, 2);
  CHECK_INT(a.nfatal, 0);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

static void test_backoff_capped(void) {
  /* backoff_max bounds every delay, jitter included: test_backoff.c
   * proves it on the delays themselves. Here the hub must use that
   * backoff: with base = max each retry is due after at most 200 ms, and
   * an uncapped jitter would reach 300 ms; wall clock only allows a
   * loose check (valgrind on a loaded machine adds tens of ms). */
  setup_opts(0.2, 0.2);
  rec a = {0};
  int lp = started_longpolling(&a, "tok", "s1");
  int cur = lp;
  double worst = 0;
  for (int k = 0; k < 6; k++) {
    double t = fail_now(cur, 503, "{\"errcode\":\"M_UNKNOWN\"}", -1);
    if (!wait_reqs(cur + 2, 3.0)) {
      CHECK(!"retry did not come");
      break;
    }
    double gap = F.reqs[cur + 1].t_start - t;
    if (gap > worst)
      worst = gap;
    cur++;
  }
  if (worst >= 0.2 + 0.08)
    printf("# longest retry delay %.3f s with backoff_max 0.200\n", worst);
  CHECK(worst < 0.2 + 0.08);
  if (F.nreqs == cur + 1 && F.reqs[cur].live)
    answer(cur, 200, batch("s2"));
  CHECK_INT(a.nevents, 2);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

/* The API cannot start a request (out of memory): the hub tries again
 * later instead of failing the stream. */
static void test_api_start_fails(void) {
  setup_opts(0.01, 0.05);
  rec a = {0};
  F.fail_start = true;
  open_rec(&a, "a", "tok", "q", NULL, false);
  spin();
  CHECK_INT(F.nreqs, 0);
  CHECK_INT(mx_sync_hub_fetches(hub), 1);
  CHECK_INT(a.ncalls, 0);
  F.fail_start = false;
  CHECK(wait_reqs(1, 2.0));
  if (F.nreqs == 1)
    answer(0, 200, batch("s1"));
  CHECK_INT(a.nstart, 1);
  CHECK_INT(a.nevents, 1);
  close_rec(&a);
  teardown();
  rec_free(&a);
}

/* A position so long that the /sync URL is over the upstream client's cap:
 * retrying cannot help, so it is the stream's answer (414 M_TOO_LARGE),
 * not a retry loop as if memory were short. */
static void test_url_too_long(void) {
  setup();
  rec a = {0};
  F.fail_limit = true;
  open_rec(&a, "a", "tok", "q", "s1", false);
  spin();
  run_for(0.1);
  CHECK_INT(F.nreqs, 0);
  CHECK_INT(a.nstart, 1);
  CHECK_INT(a.start_status, 414);
  CHECK(strstr(a.start_body, "M_TOO_LARGE") != NULL);
  CHECK_INT(mx_sync_hub_fetches(hub), 0);
  F.fail_limit = false;
  close_rec(&a);
  teardown();
  rec_free(&a);
}

/* The replay store answering later (as a remote one does): a batch is
 * delivered only once it is stored, and a resume is served from the store
 * with the same shared events, every answer through the loop. */
static void test_deferred_store(void) {
  hf_deferred_store = true;
  setup();
  rec a = {0}, b = {0};
  open_rec(&a, "a", "tok", "filter=1", "s1", false);
  spin();
  CHECK_INT(F.nreqs, 1); /* the store had nothing for s1 */
  answer(0, 200, batch("s2"));
  CHECK_INT(a.nevents, 0); /* not before it is stored */
  spin();
  CHECK_INT(a.nevents, 1);
  taken(&a);
  spin();
  CHECK_INT(F.nreqs, 2);
  answer(1, 200, batch("s3"));
  spin();
  CHECK_INT(a.nevents, 2);
  /* b resumes from s1: s2 and s3 from the store, no request. */
  open_rec(&b, "b", "tok", "filter=1", "s1", false);
  spin();
  CHECK_INT(b.nevents, 1);
  CHECK(b.nevents >= 1 && b.events[0] == a.events[0]);
  taken(&b);
  spin();
  CHECK_INT(b.nevents, 2);
  CHECK(b.nevents >= 2 && b.events[1] == a.events[1]);
  CHECK_INT(F.nreqs, 2);
  CHECK(hf_deferred_answers >= 5);
  close_rec(&a);
  close_rec(&b);
  teardown();
  rec_free(&a);
  rec_free(&b);
  hf_deferred_store = false;
}

/* A stream closed while its replay lookup is in flight, and a fetch whose
 * streams all left while its batch was being stored: nothing is touched
 * after it is gone (ASan and valgrind watch), nothing is delivered. */
static void test_deferred_store_close_races(void) {
  hf_deferred_store = true;
  setup();
  rec a = {0}, b = {0};
  open_rec(&a, "a", "tok", "filter=1", "s1", false);
  spin();
  answer(0, 200, batch("s2"));
  spin();
  CHECK_INT(a.nevents, 1);
  /* b resumes at s1: its lookup is in flight when it closes. */
  hf_deferred_hold(true);
  open_rec(&b, "b", "tok", "filter=1", "s1", false);
  spin();
  close_rec(&b);
  spin();
  hf_deferred_hold(false);
  spin();
  CHECK_INT(b.nevents, 0);
  /* a's next batch is being stored when a closes. */
  taken(&a);
  spin();
  int i = find_live(NULL, "tok");
  CHECK(i >= 0);
  hf_deferred_hold(true);
  answer(i, 200, batch("s3"));
  spin();
  close_rec(&a);
  spin();
  hf_deferred_hold(false);
  spin();
  CHECK_INT(a.nevents, 1);
  CHECK_INT(mx_sync_hub_fetches(hub), 0);
  teardown();
  rec_free(&a);
  rec_free(&b);
  hf_deferred_store = false;
}

/* ---------------------------------------------------------------------- */
/* 11: closing */

static void test_close_cancels(void) {
  setup();
  rec a = {0}, b = {0}, c = {0}, d = {0};
  open_rec(&a, "a", "tokA", "filter=1", NULL, false);
  spin();
  CHECK_INT(F.nreqs, 1);
  close_rec(&a);
  CHECK_INT(F.ncancels, 1);
  CHECK(F.reqs[0].cancelled);
  CHECK_INT(mx_sync_hub_fetches(hub), 0);
  spin();
  CHECK_INT(a.ncalls, 0);

  /* Two streams share a fetch: closing one keeps it. */
  open_rec(&b, "b", "tokB", "filter=1", NULL, false);
  open_rec(&c, "c", "tokB", "filter=1", NULL, false);
  spin();
  CHECK_INT(F.nreqs, 2);
  close_rec(&b);
  CHECK_INT(F.ncancels, 1);
  CHECK(F.reqs[1].live);
  CHECK_INT(mx_sync_hub_fetches(hub), 1);
  spin();
  answer(1, 200, batch("s1"));
  CHECK_INT(b.ncalls, 0);
  CHECK_INT(c.nevents, 1);
  /* The survivor's long-poll, then closing it cancels it. */
  taken(&c);
  spin();
  CHECK_INT(F.nreqs, 3);
  close_rec(&c);
  CHECK_INT(F.ncancels, 2);
  CHECK(F.reqs[2].cancelled);

  /* Closed while a retry is pending: nothing in flight to cancel, and the
   * retry never comes. */
  int lp = started_longpolling(&d, "tokD", "s1");
  answer(lp, 503, "{\"errcode\":\"M_UNKNOWN\"}");
  CHECK_INT(mx_sync_hub_fetches(hub), 1);
  close_rec(&d);
  CHECK_INT(F.ncancels, 2);
  CHECK_INT(mx_sync_hub_fetches(hub), 0);
  run_for(0.1);
  CHECK_INT(F.nreqs, lp + 1);
  CHECK_INT(d.ncalls, 2);
  CHECK_INT(mx_sync_hub_streams(hub), 0);
  teardown();
  rec_free(&a);
  rec_free(&b);
  rec_free(&c);
  rec_free(&d);
}

/* ---------------------------------------------------------------------- */
/* 12: closing the other stream of a shared delivery from a callback */

/* Opens a pair sharing one fetch; the first one called closes the other
 * from the callback chosen by how. Returns the index of the pair's
 * pending request. */
enum { ON_START, ON_EVENT, ON_FATAL };

static int open_pair(rec *x, rec *y, const char *tok, int how, bool started) {
  int base = F.nreqs;
  if (started) {
    open_rec(x, "x", tok, "q", NULL, false);
    open_rec(y, "y", tok, "q", NULL, false);
    spin();
    CHECK_INT(F.nreqs, base + 1);
    answer(base, 200, batch("s1"));
    taken(x);
    taken(y);
    spin();
    CHECK_INT(F.nreqs, base + 2);
    base++;
  } else {
    open_rec(x, "x", tok, "q", "s0", false);
    open_rec(y, "y", tok, "q", "s0", false);
    spin();
    CHECK_INT(F.nreqs, base + 1);
  }
  if (how == ON_START) {
    x->close_on_start = y;
    y->close_on_start = x;
  } else if (how == ON_EVENT) {
    x->close_on_event = y;
    y->close_on_event = x;
  } else {
    x->close_on_fatal = y;
    y->close_on_fatal = x;
    x->close_self_on_fatal = y->close_self_on_fatal = true;
  }
  return base;
}

/* Exactly one of the pair saw callbacks (after the setup's) and the other
 * none. */
static void check_one_called(const rec *x, const rec *y, int before) {
  int xc = x->ncalls - before, yc = y->ncalls - before;
  if (!((xc > 0 && yc == 0) || (yc > 0 && xc == 0)))
    printf("# x got %d callbacks, y %d\n", xc, yc);
  CHECK((xc > 0 && yc == 0) || (yc > 0 && xc == 0));
}

static void test_close_other_in_callbacks(void) {
  setup();
  static const char unknown[] = "{\"errcode\":\"M_UNKNOWN_TOKEN\"}";
  for (int round = 0; round < 7; round++) {
    rec x = {0}, y = {0};
    int failed = tap_failed_checks;
    char tok[16];
    snprintf(tok, sizeof(tok), "pair%d", round);
    bool started = round >= 4;
    int how = round == 0 || round == 2 || round == 3 ? ON_START
              : round == 1 || round == 4           ? ON_EVENT
                                                   : ON_FATAL;
    int before = started ? 2 : 0; /* on_start + first event */
    int i = open_pair(&x, &y, tok, how, started);
    switch (round) {
    case 0: /* first batch: on_start of one closes the other */
    case 1: /* first batch: on_event */
    case 4: /* a long-poll batch: on_event */
      answer(i, 200, batch("s9"));
      break;
    case 2: /* empty first answer: started without event */
      answer(i, 200, batch("s0"));
      break;
    case 3: /* transient failure before start */
      answer(i, 502, "{\"errcode\":\"M_UNKNOWN\"}");
      break;
    case 5: /* logged out while long-polling */
      answer(i, 401, unknown);
      break;
    case 6: /* logged out after a retry */
      answer(i, 503, "{\"errcode\":\"M_UNKNOWN\"}");
      CHECK(wait_reqs(i + 2, 2.0));
      i++;
      answer(i, 401, unknown);
      break;
    }
    check_one_called(&x, &y, before);
    spin();
    /* The survivor carries on (or is over); nothing is left for the
     * closed one. */
    rec *alive = x.st ? &x : &y;
    CHECK(!(x.st && y.st));
    if (round == 2) {
      /* The survivor long-polls at s0, alone. */
      CHECK_INT(mx_sync_hub_fetches(hub), 1);
      CHECK_STREQ(F.reqs[F.nreqs - 1].since, "s0");
      CHECK_INT(F.reqs[F.nreqs - 1].timeout_ms, LONGPOLL_MS);
    } else if (round == 0 || round == 1 || round == 4) {
      CHECK_INT(mx_sync_hub_fetches(hub), 0);
      taken(alive);
      spin();
      CHECK_INT(mx_sync_hub_fetches(hub), 1);
      CHECK_STREQ(F.reqs[F.nreqs - 1].since, "s9");
    } else {
      CHECK_INT(mx_sync_hub_fetches(hub), 0);
    }
    if (tap_failed_checks != failed)
      printf("# round %d\n", round);
    close_rec(&x);
    close_rec(&y);
    spin();
    CHECK_INT(mx_sync_hub_streams(hub), 0);
    CHECK_INT(mx_sync_hub_fetches(hub), 0);
    rec_free(&x);
    rec_free(&y);
  }
  teardown();
}

/* Two streams resuming from the same position are served from the replay
 * buffer in one runner round; the first one's on_start closes the other,
 * which is still queued to run. The survivor takes every event inside
 * on_event and follows the chain to its end, then long-polls. */
static void test_close_other_in_replay_delivery(void) {
  setup();
  rec z = {0}, x = {0}, y = {0};
  open_rec(&z, "z", "tok", "q", "s0", false);
  spin();
  answer(0, 200, batch("s1"));
  taken(&z);
  spin();
  answer(1, 200, batch("s2"));
  close_rec(&z);
  CHECK_INT(mx_sync_hub_fetches(hub), 0);

  open_rec(&x, "x", "tok", "q", "s0", false);
  open_rec(&y, "y", "tok", "q", "s0", false);
  x.close_on_start = &y;
  y.close_on_start = &x;
  x.take_on_event = y.take_on_event = true;
  spin();
  check_one_called(&x, &y, 0);
  rec *alive = x.st ? &x : &y;
  CHECK(!(x.st && y.st));
  CHECK_INT(alive->nstart, 1);
  CHECK_INT(alive->nevents, 2); /* s1, s2 from memory */
  CHECK_STREQ(event_id(alive), "s2");
  CHECK_INT(F.nreqs, 3);        /* then the long-poll at s2 */
  CHECK_STREQ(F.reqs[2].since, "s2");
  CHECK_INT(F.reqs[2].timeout_ms, LONGPOLL_MS);
  CHECK_INT(mx_sync_hub_streams(hub), 1);
  close_rec(&x);
  close_rec(&y);
  teardown();
  rec_free(&z);
  rec_free(&x);
  rec_free(&y);
}

/* A stream that closes itself from on_event (the client went away while
 * the event was being queued) next to one that takes it at once. */
static void test_close_self_and_take_in_callback(void) {
  setup();
  rec a = {0}, b = {0};
  open_rec(&a, "a", "tok", "q", NULL, false);
  open_rec(&b, "b", "tok", "q", NULL, false);
  a.close_on_event = &a;
  b.take_on_event = true;
  spin();
  answer(0, 200, batch("s1"));
  CHECK_INT(a.nevents, 1);
  CHECK_INT(b.nevents, 1);
  CHECK(a.st == NULL);
  spin();
  CHECK_INT(F.nreqs, 2); /* b's long-poll, without another taken */
  CHECK_STREQ(F.reqs[1].since, "s1");
  CHECK_INT(mx_sync_hub_streams(hub), 1);
  answer(1, 200, batch("s2"));
  CHECK_INT(a.nevents, 1);
  CHECK_INT(b.nevents, 2);
  spin();
  CHECK_INT(F.nreqs, 3);
  close_rec(&b);
  teardown();
  rec_free(&a);
  rec_free(&b);
}

/* ---------------------------------------------------------------------- */
/* 13: freeing the hub with work in flight */

static void test_free_in_flight(void) {
  setup_opts(5.0, 10.0); /* the pending retry cannot fire during the test */
  rec a = {0}, b = {0}, c = {0}, d = {0}, e = {0}, g = {0};
  int lp = started_longpolling(&a, "tokA", "s1"); /* long-poll in flight */
  open_rec(&b, "b", "tokB", "q", NULL, false);      /* first fetch */
  open_rec(&e, "e", "tokB", "q", NULL, false);      /* shares it */
  spin();
  int lpc = started_longpolling(&c, "tokC", "s1");
  answer(lpc, 503, "{\"errcode\":\"M_UNKNOWN\"}"); /* retry pending */
  close_rec(&e); /* closed, not freed yet */
  open_rec(&d, "d", "tokD", "q", NULL, false);          /* kick pending */
  open_rec(&g, "g", "tokA", "filter=0", "s0", false); /* kick pending */
  int live = live_reqs();
  CHECK_INT(live, 2); /* a's long-poll, b's first fetch */
  CHECK(F.reqs[lp].live);
  int calls = a.ncalls + b.ncalls + c.ncalls + d.ncalls + e.ncalls + g.ncalls;
  int nreqs = F.nreqs;

  mx_sync_hub_free(hub);
  hub = NULL;
  CHECK_INT(F.ncancels, 2);
  CHECK_INT(live_reqs(), 0);
  CHECK_INT(F.nreqs, nreqs);
  CHECK_INT(a.ncalls + b.ncalls + c.ncalls + d.ncalls + e.ncalls + g.ncalls,
            calls);
  /* The loop runs on without the hub: no retry, no kick. */
  run_for(0.05);
  CHECK_INT(F.nreqs, nreqs);
  teardown();
  rec_free(&a);
  rec_free(&b);
  rec_free(&c);
  rec_free(&d);
  rec_free(&e);
  rec_free(&g);
}

int main(void) {
  mx_log_init(MX_LOG_ERROR, NULL);
  TAP_RUN(TAP_CASE(test_first_fetch_and_event),
          TAP_CASE(test_longpoll_after_taken), TAP_CASE(test_empty_answers),
          TAP_CASE(test_shared_fetch_and_chunk),
          TAP_CASE(test_different_feeds_not_shared),
          TAP_CASE(test_replay_resume), TAP_CASE(test_slow_and_fast_tabs),
          TAP_CASE(test_4xx), TAP_CASE(test_start_retry_window), TAP_CASE(test_transient_before_start),
          TAP_CASE(test_transient_after_start_retries),
          TAP_CASE(test_429_retry_after), TAP_CASE(test_backoff_grows),
          TAP_CASE(test_backoff_capped), TAP_CASE(test_api_start_fails),
          TAP_CASE(test_url_too_long), TAP_CASE(test_deferred_store),
          TAP_CASE(test_deferred_store_close_races),
          TAP_CASE(test_close_cancels),
          TAP_CASE(test_close_other_in_callbacks),
          TAP_CASE(test_close_other_in_replay_delivery),
          TAP_CASE(test_close_self_and_take_in_callback),
          TAP_CASE(test_free_in_flight));
}
