/*
 * One file on purpose: the cases share one fake front and read as the
 * handlers' specification.
 *
 * Unit tests of the front's handlers (h2/router.c, h2/admin.c, h2/sse.c)
 * on exchanges with a recording backend (front_fake.h): no socket, no
 * protocol, the handlers' answers read back from the exchange. The SSE
 * endpoint runs on a real sync hub whose homeserver is the scripted
 * fetcher of hub_fake.h.
 */
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/log.h"
#include "common/metrics.h"
#include "homeserver/upstream.h"
#include "h2/router.h"
#include "tests/unit/front_fake.h"
#include "tests/unit/hub_fake.h"
#include "h2/sse_event.h"
#include "tests/unit/tap.h"

#define SSE "/_matrix/client/v3/sync/sse"
#define WHO_BODY "{\"user_id\":\"@alice:example.org\"}"

static ff_front f;
static ff_conn *conn;

static void setup(void) {
  mx_sync_hub_opts o = hf_opts();
  hf_setup(&o, &tap_failed_checks);
  ff_front_init(&f, loop);
  f.server.sync = hub;
  conn = ff_conn_new(&f, false, false);
  CHECK(conn != NULL);
}

static void teardown(void) {
  ff_conn_free(conn);
  conn = NULL;
  ff_front_free(&f);
  hf_teardown();
}

/* A request through the router; what it answered at once is taken. */
static ff_exchange *request(const char *method, const char *target,
                            const mx_header *hs, size_t n) {
  ff_exchange *x = ff_exchange_new(&conn->c, method, target, hs, n, NULL, 0);
  CHECK(x != NULL);
  if (!x)
    abort();
  ff_exchange_dispatch(&f, x);
  ff_exchange_take(x);
  return x;
}

static bool body_has(const ff_exchange *x, const char *s) {
  return x->body.data && strstr(x->body.data, s) != NULL;
}

/* Checks a complete Matrix error answer. */
static void check_error(const ff_exchange *x, int status, const char *errcode) {
  CHECK_INT(x->ex.status, status);
  CHECK(ff_exchange_complete(x));
  CHECK_INT(x->heads, 1);
  CHECK_STREQ(ff_exchange_resp_header(x, "content-type"), "application/json");
  char want[64];
  snprintf(want, sizeof(want), "\"errcode\":\"%s\"", errcode);
  if (!body_has(x, want))
    printf("# body: %s\n", x->body.data ? x->body.data : "(none)");
  CHECK(body_has(x, want));
  char len[24];
  snprintf(len, sizeof(len), "%zu", x->body.len);
  CHECK_STREQ(ff_exchange_resp_header(x, "content-length"), len);
}

/* --- router --------------------------------------------------------- */

static void test_router_unknown_path(void) {
  setup();
  ff_exchange *x = request("GET", "/nope", NULL, 0);
  check_error(x, 404, "M_UNRECOGNIZED");
  CHECK(x->ex.handler == NULL);
  ff_exchange_free(x, 0);
  /* "/_matrixx" is not under "/_matrix/". */
  x = request("GET", "/_matrixx/client", NULL, 0);
  check_error(x, 404, "M_UNRECOGNIZED");
  ff_exchange_free(x, 0);
  teardown();
}

/* A sealed head is fixed: fields arriving after it (HTTP/1.1 trailers)
 * are not added, and what the request points at stays where it is. The
 * response head's copy goes once the backend has sent it. */
static void test_exchange_head_sealed(void) {
  setup();
  mx_header hs[] = {MX_HEADER_LIT("Accept", "text/event-stream"),
                    MX_HEADER_LIT("user-agent", "test")};
  ff_exchange *x = ff_exchange_new(&conn->c, "GET", "/a?b=c", hs, 2, NULL, 0);
  CHECK(x != NULL);
  const mx_request *r = mx_exchange_request(&x->ex);
  const char *target = r->target;
  const mx_header *h = mx_exchange_header(&x->ex, "accept");
  CHECK(h != NULL);
  const char *accept = h ? h->value : NULL;
  for (int i = 0; i < 40; i++)
    CHECK_INT(mx_exchange_add_header(&x->ex, "x-trailer", 9, "v", 1), 0);
  CHECK_INT(r->nheaders, 2);
  CHECK(r->target == target && r->headers == x->ex.hdrs);
  CHECK(mx_exchange_header(&x->ex, "x-trailer") == NULL);
  h = mx_exchange_header(&x->ex, "accept");
  CHECK(h && h->value == accept);
  CHECK_STREQ(r->target, "/a?b=c");
  CHECK_INT(mx_exchange_respond(&x->ex, 200, hs, 2, false), 0);
  CHECK_INT(x->ex.resp_nheaders, 2);
  mx_exchange_head_sent(&x->ex);
  CHECK(x->ex.resp_headers == NULL && x->ex.resp_nheaders == 0);
  CHECK(x->ex.resp_arena.data == NULL);
  ff_exchange_free(x, 0);
  teardown();
}

static void test_router_head_error_has_no_body(void) {
  setup();
  ff_exchange *x = request("HEAD", "/nope", NULL, 0);
  CHECK_INT(x->ex.status, 404);
  CHECK(x->ex.resp_end_with_head);
  CHECK_INT(x->body.len, 0);
  CHECK(ff_exchange_resp_header(x, "content-length") != NULL);
  ff_exchange_free(x, 0);
  teardown();
}

static void test_router_dot_segments(void) {
  static const char *const bad[] = {
      "/_matrix/client/v3/../../admin", "/_matrix/./client",
      "/_matrix/%2e%2E/x",              "/_matrix/.%2e",
      "/_matrix/x%2f..%2fy",            "/..",
      SSE "/..",
  };
  setup();
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    ff_exchange *x = request("GET", bad[i], NULL, 0);
    check_error(x, 400, "M_UNRECOGNIZED");
    CHECK(x->ex.handler == NULL);
    ff_exchange_free(x, 0);
  }
  /* Dots in the query or inside a segment are not dot segments. */
  CHECK(!mx_router_has_dot_segment("/a/...", 6));
  CHECK(!mx_router_has_dot_segment("/a/.b", 5));
  CHECK(!mx_router_has_dot_segment("/a/%2e%2e%2e", 12));
  CHECK(!mx_router_has_dot_segment("/a/%252e", 8));
  CHECK(mx_router_has_dot_segment("/a/%2E", 6));
  ff_exchange *x = request("GET", "/nope?x=../..", NULL, 0);
  CHECK_INT(x->ex.status, 404);
  ff_exchange_free(x, 0);
  teardown();
}

static void test_router_prefix(void) {
  CHECK(mx_router_prefix("/_matrix", 8, "/_matrix"));
  CHECK(mx_router_prefix("/_matrix/x", 10, "/_matrix"));
  CHECK(!mx_router_prefix("/_matrixx", 9, "/_matrix"));
  CHECK(mx_router_prefix("/_matrix/x", 10, "/_matrix/"));
  CHECK(!mx_router_prefix("/_matri", 7, "/_matrix"));
}

static void test_router_over_limit(void) {
  setup();
  conn->c.reject_status = 429;
  ff_exchange *x = request("GET", SSE, NULL, 0);
  check_error(x, 429, "M_LIMIT_EXCEEDED");
  CHECK_STREQ(ff_exchange_resp_header(x, "retry-after"), "5");
  CHECK_INT(conn->shutdowns, 1); /* the connection ends after it */
  CHECK_INT(F.nreqs, 0);
  ff_exchange_free(x, 0);
  conn->c.reject_status = 503;
  x = request("GET", "/nope", NULL, 0);
  check_error(x, 503, "M_UNKNOWN");
  CHECK_INT(conn->shutdowns, 2);
  ff_exchange_free(x, 0);
  teardown();
}

/* --- admin ---------------------------------------------------------- */

static void test_admin_pages(void) {
  setup();
  conn->c.admin = true;
  ff_exchange *x = request("GET", "/healthz", NULL, 0);
  CHECK_INT(x->ex.status, 200);
  CHECK(ff_exchange_complete(x));
  CHECK_STREQ(x->body.data, "ok\n");
  CHECK_STREQ(ff_exchange_resp_header(x, "content-type"), "text/plain");
  CHECK_STREQ(ff_exchange_resp_header(x, "content-length"), "3");
  CHECK_STREQ(ff_exchange_resp_header(x, "cache-control"), "no-store");
  ff_exchange_free(x, 0);

  x = request("GET", "/readyz?verbose=1", NULL, 0);
  CHECK_INT(x->ex.status, 200);
  CHECK_STREQ(x->body.data, "ready\n");
  ff_exchange_free(x, 0);
  f.server.draining = true;
  x = request("GET", "/readyz", NULL, 0);
  CHECK_INT(x->ex.status, 503);
  CHECK_STREQ(x->body.data, "draining\n");
  ff_exchange_free(x, 0);

  x = request("GET", "/metrics", NULL, 0);
  CHECK_INT(x->ex.status, 200);
  CHECK(ff_exchange_complete(x));
  CHECK(body_has(x, "mxsse_streams_open"));
  CHECK_STREQ(ff_exchange_resp_header(x, "content-type"),
              "text/plain; version=0.0.4");
  ff_exchange_free(x, 0);

  /* The admin listener serves only its pages, whatever the path. */
  x = request("GET", SSE "?access_token=a", NULL, 0);
  check_error(x, 404, "M_UNRECOGNIZED");
  CHECK_INT(F.nreqs, 0);
  ff_exchange_free(x, 0);
  x = request("GET", "/_matrix/../healthz", NULL, 0);
  check_error(x, 404, "M_UNRECOGNIZED");
  ff_exchange_free(x, 0);
  teardown();
}

static void test_admin_methods(void) {
  setup();
  conn->c.admin = true;
  ff_exchange *x = request("HEAD", "/healthz", NULL, 0);
  CHECK_INT(x->ex.status, 200);
  CHECK(x->ex.resp_end_with_head);
  CHECK_INT(x->body.len, 0);
  CHECK_STREQ(ff_exchange_resp_header(x, "content-length"), "3");
  ff_exchange_free(x, 0);
  x = request("POST", "/healthz", NULL, 0);
  check_error(x, 405, "M_UNRECOGNIZED");
  CHECK_STREQ(ff_exchange_resp_header(x, "allow"), "GET, HEAD");
  ff_exchange_free(x, 0);
  teardown();
}

/* --- SSE: refusals -------------------------------------------------- */

static void test_sse_preflight(void) {
  setup();
  f.cfg.cors_origin = strdup("https://app.example");
  ff_exchange *x = request("OPTIONS", SSE, NULL, 0);
  CHECK_INT(x->ex.status, 204);
  CHECK(ff_exchange_complete(x));
  CHECK_INT(x->body.len, 0);
  CHECK_STREQ(ff_exchange_resp_header(x, "access-control-allow-origin"),
              "https://app.example");
  CHECK_STREQ(ff_exchange_resp_header(x, "access-control-allow-methods"),
              "GET, OPTIONS");
  const char *h = ff_exchange_resp_header(x, "access-control-allow-headers");
  CHECK(h && strstr(h, "Authorization") && strstr(h, "Last-Event-ID"));
  CHECK_INT(F.nreqs, 0);
  ff_exchange_free(x, 0);
  teardown();
}

static void test_sse_refusals(void) {
  static const struct {
    const char *method, *target, *auth;
    int status;
    const char *errcode;
  } cases[] = {
      {"POST", SSE "?access_token=a", NULL, 405, "M_UNRECOGNIZED"},
      {"GET", SSE, NULL, 401, "M_MISSING_TOKEN"},
      {"GET", SSE "?access_token=", NULL, 401, "M_MISSING_TOKEN"},
      {"GET", SSE, "Basic dTpw", 401, "M_MISSING_TOKEN"},
      {"GET", SSE, "Bearer a b", 401, "M_MISSING_TOKEN"},
      {"GET", SSE "?access_token=a", "Bearer a", 401, "M_MISSING_TOKEN"},
      {"GET", SSE "?access_token=%zz", NULL, 400, "M_INVALID_PARAM"},
      {"GET", SSE "?access_token=a&heartbeat_interval=0", NULL, 400,
       "M_INVALID_PARAM"},
      {"GET", SSE "?access_token=a&heartbeat_interval=5s", NULL, 400,
       "M_INVALID_PARAM"},
      {"GET", SSE "?access_token=a&heartbeat_interval=301", NULL, 400,
       "M_INVALID_PARAM"},
      {"GET", SSE "?access_token=a&full_state=yes", NULL, 400,
       "M_INVALID_PARAM"},
      {"GET", SSE "?access_token=a&since=%01", NULL, 400, "M_INVALID_PARAM"},
      {"GET", SSE "?access_token=a&since=%zz", NULL, 400, "M_INVALID_PARAM"},
  };
  setup();
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    mx_header h = {"authorization", 13, cases[i].auth,
                   cases[i].auth ? strlen(cases[i].auth) : 0};
    ff_exchange *x =
        request(cases[i].method, cases[i].target, &h, cases[i].auth ? 1 : 0);
    int failed = tap_failed_checks;
    check_error(x, cases[i].status, cases[i].errcode);
    if (tap_failed_checks != failed)
      printf("# in case %s %s\n", cases[i].method, cases[i].target);
    CHECK_STREQ(ff_exchange_resp_header(x, "access-control-allow-origin"),
                "*");
    if (cases[i].status == 405)
      CHECK_STREQ(ff_exchange_resp_header(x, "allow"), "GET, OPTIONS");
    ff_exchange_free(x, 0);
  }
  spin();
  CHECK_INT(F.nreqs, 0); /* nothing refused went upstream */
  teardown();
}

static void test_sse_too_many_params(void) {
  setup();
  mx_buf t;
  mx_buf_init(&t, 1 << 16);
  mx_buf_append(&t, SSE "?access_token=a", strlen(SSE "?access_token=a"));
  for (int i = 0; i < 65; i++)
    mx_buf_appendf(&t, "&p%d=1", i);
  ff_exchange *x = request("GET", t.data, NULL, 0);
  check_error(x, 400, "M_INVALID_PARAM");
  ff_exchange_free(x, 0);
  mx_buf_free(&t);
  teardown();
}

static void test_sse_without_hub(void) {
  setup();
  f.server.sync = NULL;
  ff_exchange *x = request("GET", SSE "?access_token=a", NULL, 0);
  check_error(x, 503, "M_UNKNOWN");
  ff_exchange_free(x, 0);
  teardown();
}

/* --- SSE: streams --------------------------------------------------- */

/* Answers whoami (and joined_rooms) for token until a /sync for it is in
 * flight; returns that request's index or -1. */
static int until_sync(const char *token) {
  for (int round = 0; round < 8; round++) {
    spin();
    int i;
    if ((i = find_live(NULL, token)) >= 0)
      return i;
    if ((i = find_live(WHOAMI, token)) >= 0)
      answer(i, 200, WHO_BODY);
    else if ((i = find_live(JOINED, token)) >= 0)
      answer(i, 200, "{\"joined_rooms\":[]}");
  }
  return -1;
}

static void test_sse_stream(void) {
  setup();
  mx_header hs[] = {MX_HEADER_LIT("user-agent", "test-agent/1")};
  ff_exchange *x = request(
      "GET",
      SSE "?set%5Fpresence=offline&access_token=syt%5Fa&filter=%7B%7D&"
          "heartbeat_interval=30&timeout=0",
      hs, 1);
  CHECK(x->ex.handler != NULL);
  CHECK(!x->ex.responded); /* the answer waits for the first batch */
  int i = until_sync("syt_a");
  CHECK(i >= 0);
  if (i < 0)
    abort();
  /* Sorted, still encoded, without what mxsse consumes; set_presence by
   * its plain name (the hub and the homeserver API read it so). */
  CHECK_STREQ(F.reqs[i].query, "filter=%7B%7D&set_presence=offline");
  CHECK(F.reqs[i].since == NULL);
  CHECK(!F.reqs[i].full_state);
  CHECK_STREQ(F.reqs[i].peer_ip, "192.0.2.7");
  CHECK_STREQ(F.reqs[i].user_agent, "test-agent/1");
  answer(i, 200, batch("s1"));
  spin();
  ff_exchange_take(x);
  CHECK_INT(x->ex.status, 200);
  CHECK(!x->ex.resp_ended);
  CHECK_STREQ(ff_exchange_resp_header(x, "content-type"),
              "text/event-stream");
  CHECK_STREQ(ff_exchange_resp_header(x, "cache-control"),
              "no-cache, no-transform");
  CHECK(ff_exchange_resp_header(x, "content-length") == NULL);
  CHECK(!strncmp(x->body.data, "retry: ", 7));
  CHECK(body_has(x, "id: s1\ndata: {\"next_batch\":\"s1\""));
  CHECK_INT(mx_stats.sse_streams_open, 1);
  /* Taken by the client: the next batch is asked for, from s1. */
  spin();
  i = find_live(NULL, "syt_a");
  CHECK(i >= 0);
  if (i >= 0) {
    CHECK_STREQ(F.reqs[i].since, "s1");
    answer(i, 200, batch("s2"));
  }
  spin();
  ff_exchange_take(x);
  CHECK(body_has(x, "id: s2\n"));
  /* The client goes away: the stream closes, its fetch is cancelled. */
  ff_exchange_free(x, MX_ERR_CLOSED);
  CHECK_INT(mx_stats.sse_streams_open, 0);
  spin();
  CHECK_INT(live_reqs(), 0);
  teardown();
}

static void test_sse_encoded_names_stay_here(void) {
  setup();
  mx_header auth = MX_HEADER_LIT("authorization", "Bearer syt_b");
  ff_exchange *x = request(
      "GET",
      SSE "?access%5Ftoken=other&tim%65out=0&sinc%65=s0&full%5fstate=true&"
          "heartbeat%5finterval=3&x=1",
      &auth, 1);
  int i = until_sync("syt_b");
  CHECK(i >= 0);
  if (i >= 0) {
    CHECK_STREQ(F.reqs[i].query, "x=1");
    CHECK(F.reqs[i].since == NULL);
    CHECK(!F.reqs[i].full_state);
  }
  ff_exchange_free(x, MX_ERR_CLOSED);
  teardown();
}

static void test_sse_last_event_id_wins(void) {
  setup();
  mx_header hs[] = {MX_HEADER_LIT("authorization", "Bearer  syt_c"),
                    MX_HEADER_LIT("last-event-id", "s7")};
  ff_exchange *x =
      request("GET", SSE "?since=s1&full_state=true", hs, 2);
  int i = until_sync("syt_c");
  CHECK(i >= 0);
  if (i >= 0) {
    CHECK_STREQ(F.reqs[i].since, "s7");
    CHECK(!F.reqs[i].full_state); /* a reconnect has the state */
    CHECK_STREQ(F.reqs[i].query, "");
  }
  ff_exchange_free(x, MX_ERR_CLOSED);
  /* Without Last-Event-ID, since and full_state count. */
  x = request("GET", SSE "?since=s1&full_state=true&access_token=syt_c", NULL,
              0);
  i = until_sync("syt_c");
  CHECK(i >= 0);
  if (i >= 0) {
    CHECK_STREQ(F.reqs[i].since, "s1");
    CHECK(F.reqs[i].full_state);
  }
  ff_exchange_free(x, MX_ERR_CLOSED);
  teardown();
}

static void test_sse_homeserver_refuses(void) {
  setup();
  ff_exchange *x = request("GET", SSE "?access_token=bad", NULL, 0);
  for (int round = 0; round < 8 && !x->ex.responded; round++) {
    spin();
    int i = find_live(WHOAMI, "bad");
    if (i < 0)
      i = find_live(NULL, "bad");
    if (i >= 0)
      answer(i, 401,
             "{\"errcode\":\"M_UNKNOWN_TOKEN\",\"error\":\"Unknown token\"}");
  }
  ff_exchange_take(x);
  /* The homeserver's answer, as it is: EventSource stops on it. */
  check_error(x, 401, "M_UNKNOWN_TOKEN");
  CHECK_STREQ(ff_exchange_resp_header(x, "access-control-allow-origin"), "*");
  CHECK_INT(mx_stats.sse_streams_open, 0);
  ff_exchange_free(x, 0);
  teardown();
}

static void test_sse_fatal_after_start(void) {
  setup();
  ff_exchange *x = request("GET", SSE "?access_token=t", NULL, 0);
  int i = until_sync("t");
  CHECK(i >= 0);
  if (i >= 0)
    answer(i, 200, batch("s1"));
  spin();
  ff_exchange_take(x);
  CHECK_INT(x->ex.status, 200);
  spin();
  i = find_live(NULL, "t");
  CHECK(i >= 0);
  if (i >= 0)
    answer(i, 401, "{\"errcode\":\"M_UNKNOWN_TOKEN\",\"error\":\"gone\"}");
  spin();
  ff_exchange_take(x);
  /* Logged out while streaming: an error event, then the end. */
  CHECK(body_has(x, "event: error\ndata: {\"errcode\":\"M_UNKNOWN_TOKEN\""));
  CHECK(ff_exchange_complete(x));
  CHECK_INT(x->resets, 0);
  ff_exchange_free(x, 0);
  CHECK_INT(mx_stats.sse_streams_open, 0);
  teardown();
}

static void test_sse_heartbeat(void) {
  setup();
  ff_exchange *x =
      request("GET", SSE "?access_token=h&heartbeat_interval=1", NULL, 0);
  int i = until_sync("h");
  CHECK(i >= 0);
  if (i >= 0)
    answer(i, 200, batch("s1"));
  spin();
  ff_exchange_take(x);
  size_t before = x->body.len;
  run_for(1.6);
  ff_exchange_take(x);
  CHECK(x->body.len > before);
  CHECK(x->body.data && !strcmp(x->body.data + x->body.len - 4, ": \n\n"));
  ff_exchange_free(x, MX_ERR_CLOSED);
  teardown();
}

static void test_sse_shutdown(void) {
  setup();
  /* Not started yet: an empty stream that only says when to return. */
  ff_exchange *x = request("GET", SSE "?access_token=s", NULL, 0);
  spin();
  mx_exchange_shutdown(&x->ex);
  ff_exchange_take(x);
  CHECK_INT(x->ex.status, 200);
  CHECK(ff_exchange_complete(x));
  CHECK(!strncmp(x->body.data, "retry: ", 7));
  CHECK(!body_has(x, "id: "));
  ff_exchange_free(x, 0);
  spin();
  CHECK_INT(live_reqs(), 0);

  /* Streaming: the response ends (EventSource comes back elsewhere),
   * at a random moment within --shutdown-spread (2 s by default) so that
   * a node's clients do not all come back at once. */
  x = request("GET", SSE "?access_token=s", NULL, 0);
  int i = until_sync("s");
  CHECK(i >= 0);
  if (i >= 0)
    answer(i, 200, batch("s1"));
  spin();
  ff_exchange_take(x);
  CHECK_INT(x->ex.status, 200);
  CHECK(!x->ex.resp_ended);
  double t0 = ev_time();
  mx_exchange_shutdown(&x->ex);
  while (!ff_exchange_complete(x) && ev_time() - t0 < 3.0) {
    run_for(0.05);
    ff_exchange_take(x);
  }
  CHECK(ff_exchange_complete(x));
  CHECK(ev_time() - t0 < 2.5);
  ff_exchange_free(x, 0);
  spin();
  CHECK_INT(live_reqs(), 0);
  CHECK_INT(mx_stats.sse_streams_open, 0);
  teardown();
}

/* --- proxy ----------------------------------------------------------- */

/* The upstream client runs on a loop of its own that never runs: its
 * requests are started and cancelled, never sent (the proxy's exchanges
 * with a homeserver are in tests/integration/test_proxy.py). */
static struct ev_loop *uloop;

static void proxy_setup(void) {
  setup();
  uloop = ev_loop_new(EVFLAG_AUTO);
  f.server.upstream = mx_upstream_new(uloop, "http://127.0.0.1:9", NULL);
  CHECK(f.server.upstream != NULL);
}

static void proxy_teardown(void) {
  mx_upstream_free(f.server.upstream);
  f.server.upstream = NULL;
  ev_loop_destroy(uloop);
  teardown();
}

static void test_proxy_takes_client_api(void) {
  static const char *const proxied[] = {
      "/_matrix/client/v3/profile/@a:b", "/.well-known/matrix/client",
      "/_matrix/client/versions", "/_synapse/admin/v1/x"};
  proxy_setup();
  f.cfg.proxy_prefix.items[0] = strdup("/_synapse/admin");
  f.cfg.proxy_prefix.count = 1;
  for (size_t i = 0; i < sizeof(proxied) / sizeof(proxied[0]); i++) {
    ff_exchange *x = request("GET", proxied[i], NULL, 0);
    CHECK(x->ex.handler && !strcmp(x->ex.handler->name, "proxy"));
    CHECK(!x->ex.responded); /* the homeserver answers, later */
    CHECK_INT(mx_upstream_active(f.server.upstream), 1);
    /* A client that goes away cancels its upstream request. */
    ff_exchange_free(x, MX_ERR_CLOSED);
    CHECK_INT(mx_upstream_active(f.server.upstream), 0);
  }
  /* Not configured: "/_synapse" is not proxied. */
  ff_exchange *x = request("GET", "/_synapse/other", NULL, 0);
  check_error(x, 404, "M_UNRECOGNIZED");
  ff_exchange_free(x, 0);
  proxy_teardown();
}

static void test_proxy_unsendable_request(void) {
  proxy_setup();
  /* A header value the upstream client refuses to send (a bare CR could
   * smuggle a header): answered here with a 400 that says so (it was a
   * 503 "Out of memory"), nothing left in flight. */
  mx_header bad = {"x-evil", 6, "a\rb", 3};
  ff_exchange *x = request("GET", "/_matrix/client/v3/x", &bad, 1);
  CHECK(x->ex.responded);
  check_error(x, 400, "M_UNRECOGNIZED");
  CHECK(ff_exchange_complete(x));
  CHECK_INT(mx_upstream_active(f.server.upstream), 0);
  ff_exchange_free(x, 0);
  proxy_teardown();
}

/* --- HTTP/1.1 session on a socket-less connection --------------------- */

static ff_conn *h1_start(void) {
  ff_conn *c = ff_conn_new(&f, false, true);
  CHECK(c != NULL);
  if (!c || ff_conn_start(c, MX_PROTO_H1) != 0)
    abort();
  return c;
}

static const char *wire(const ff_conn *c) {
  return c->wire.data ? c->wire.data : "";
}

static void test_h1_pipelined_in_order(void) {
  setup();
  ff_conn *c = h1_start();
  static const char req[] = "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
                            "GET /_matrix/../x HTTP/1.1\r\nHost: x\r\n\r\n";
  CHECK_INT(ff_conn_read(c, req, sizeof(req) - 1), 0);
  ff_conn_flush(c);
  const char *a = strstr(wire(c), "HTTP/1.1 404 Not Found\r\n");
  const char *b = strstr(wire(c), "HTTP/1.1 400 Bad Request\r\n");
  CHECK(a && b && a < b); /* answered one at a time, in order */
  CHECK(!strstr(wire(c), "connection: close"));
  CHECK(!c->want_close);
  CHECK_INT(c->c.ops->active(&c->c), 0);
  ff_conn_free(c);
  teardown();
}

static void test_h1_head_and_http10(void) {
  setup();
  ff_conn *c = h1_start();
  static const char req[] = "HEAD /nope HTTP/1.1\r\n\r\n";
  ff_conn_read(c, req, sizeof(req) - 1);
  ff_conn_flush(c);
  /* The length of the body a GET would get, and no body. */
  CHECK(strstr(wire(c), "content-length: "));
  size_t len = strlen(wire(c));
  CHECK(len >= 4 && !strcmp(wire(c) + len - 4, "\r\n\r\n"));
  ff_conn_free(c);

  c = h1_start();
  static const char req10[] = "GET /nope HTTP/1.0\r\n\r\n";
  ff_conn_read(c, req10, sizeof(req10) - 1);
  ff_conn_flush(c);
  CHECK(!strncmp(wire(c), "HTTP/1.0 404 ", 13));
  CHECK(strstr(wire(c), "connection: close\r\n"));
  CHECK(c->want_close);
  ff_conn_free(c);
  teardown();
}

static void test_h1_sse_events_are_chunks(void) {
  setup();
  ff_conn *c = h1_start();
  static const char req[] =
      "GET " SSE "?access_token=w HTTP/1.1\r\nHost: x\r\n\r\n";
  ff_conn_read(c, req, sizeof(req) - 1);
  int i = until_sync("w");
  CHECK(i >= 0);
  if (i >= 0)
    answer(i, 200, batch("s1"));
  spin();
  ff_conn_flush(c);
  CHECK(strstr(wire(c), "HTTP/1.1 200 OK\r\n"));
  CHECK(strstr(wire(c), "transfer-encoding: chunked\r\n"));
  /* One HTTP chunk per event: its size line, then the event whole. */
  char want[128];
  const char *ev = "id: s1\ndata: {\"next_batch\":\"s1\",\"rooms\":{\"join\":{}}}\n\n";
  snprintf(want, sizeof(want), "\r\n%zx\r\n%s\r\n", strlen(ev), ev);
  CHECK(strstr(wire(c), want));
  CHECK_INT(c->c.ops->active(&c->c), 1);
  /* The connection goes: the stream closes, its fetch is cancelled. */
  ff_conn_free(c);
  spin();
  CHECK_INT(live_reqs(), 0);
  CHECK_INT(mx_stats.sse_streams_open, 0);
  teardown();
}

static void test_zz_cleanup(void) {
  /* The shared heartbeat chunk, so leak checkers stay quiet. */
  mx_sse_event_shutdown();
}

int main(void) {
  mx_log_init(MX_LOG_ERROR, stderr);
  TAP_RUN(TAP_CASE(test_router_unknown_path),
          TAP_CASE(test_exchange_head_sealed),
          TAP_CASE(test_router_head_error_has_no_body),
          TAP_CASE(test_router_dot_segments), TAP_CASE(test_router_prefix),
          TAP_CASE(test_router_over_limit), TAP_CASE(test_admin_pages),
          TAP_CASE(test_admin_methods), TAP_CASE(test_sse_preflight),
          TAP_CASE(test_sse_refusals), TAP_CASE(test_sse_too_many_params),
          TAP_CASE(test_sse_without_hub), TAP_CASE(test_sse_stream),
          TAP_CASE(test_sse_encoded_names_stay_here),
          TAP_CASE(test_sse_last_event_id_wins),
          TAP_CASE(test_sse_homeserver_refuses),
          TAP_CASE(test_sse_fatal_after_start), TAP_CASE(test_sse_heartbeat),
          TAP_CASE(test_sse_shutdown),
          TAP_CASE(test_proxy_takes_client_api),
          TAP_CASE(test_proxy_unsendable_request),
          TAP_CASE(test_h1_pipelined_in_order),
          TAP_CASE(test_h1_head_and_http10),
          TAP_CASE(test_h1_sse_events_are_chunks), TAP_CASE(test_zz_cleanup));
}
