/*
 * One file on purpose: every case shares the redis-server started here.
 *
 * The replay store in Redis (homeserver/redis_replay.c) against a real
 * redis-server started here (Debian's; a missing one is a failure), and
 * what the hub does with a store that cannot be asked:
 *
 *  - the store alone: put-if-absent (the first answer wins, binary-safe),
 *    TTL = replay age, the marker that tells "history gone", the size cap,
 *    Redis killed / stopped / restarted, an ACL user limited to the prefix;
 *  - the hub over the deferring store of hub_fake.c answering UNAVAILABLE:
 *    a resume it cannot prove is refused (503, no upstream fetch), a batch
 *    whose put fails is held (not delivered, nothing fetched past it) and
 *    its put retried until the store answers;
 *  - the hub over the Redis store, one "node" after another on the same
 *    server: a resume on the second node is served from Redis without an
 *    upstream request, and a resume whose batch expired is flagged.
 */
#include "homeserver/redis_replay.h"

#include <ev.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/error.h"
#include "common/log.h"
#include "common/metrics.h"
#include "tests/unit/hub_fake.h"
#include "tests/unit/tap.h"

#define FEED "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
#define FEED2 "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"

/* ---------------------------------------------------------------------- */
/* A redis-server of our own */

static pid_t redis_pid;
static int redis_port;
static char redis_url[128];

static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET,
                          .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t l = sizeof(a);
  int port = 0;
  if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
      getsockname(fd, (struct sockaddr *)&a, &l) == 0)
    port = ntohs(a.sin_port);
  if (fd >= 0)
    close(fd);
  return port;
}

static redisContext *sync_conn(void) {
  struct timeval tv = {1, 0};
  redisContext *c = redisConnectWithTimeout("127.0.0.1", redis_port, tv);
  if (c && c->err) {
    redisFree(c);
    return NULL;
  }
  return c;
}

/* A synchronous command's integer (or -2 when it failed). */
static long long sync_int(const char *fmt, const char *arg) {
  redisContext *c = sync_conn();
  if (!c)
    return -2;
  redisReply *r = redisCommand(c, fmt, arg);
  long long v = r && r->type == REDIS_REPLY_INTEGER ? r->integer : -2;
  if (r)
    freeReplyObject(r);
  redisFree(c);
  return v;
}

static void sync_cmd(const char *cmd) {
  redisContext *c = sync_conn();
  if (!c)
    return;
  redisReply *r = redisCommand(c, cmd);
  if (r)
    freeReplyObject(r);
  redisFree(c);
}

/* Starts redis-server on redis_port (a new one when 0), extra config
 * lines as arguments; waits until it answers. */
static bool redis_start(const char *const *extra) {
  if (!redis_port)
    redis_port = free_port();
  snprintf(redis_url, sizeof(redis_url), "redis://127.0.0.1:%d", redis_port);
  char port[16];
  snprintf(port, sizeof(port), "%d", redis_port);
  const char *argv[32] = {"redis-server", "--port", port, "--bind",
                          "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--loglevel", "warning", "--daemonize", "no"};
  int n = 13;
  for (int i = 0; extra && extra[i] && n < 31; i++)
    argv[n++] = extra[i];
  argv[n] = NULL;
  redis_pid = fork();
  if (redis_pid == 0) {
    int null = open("/dev/null", 1);
    dup2(null, 1);
    execvp("redis-server", (char **)argv);
    _exit(127);
  }
  for (int i = 0; i < 200; i++) {
    redisContext *c = sync_conn();
    if (c) {
      redisFree(c);
      return true;
    }
    int st;
    if (waitpid(redis_pid, &st, WNOHANG) == redis_pid) {
      redis_pid = 0;
      return false;
    }
    usleep(20000);
  }
  return false;
}

static void redis_kill(void) {
  if (redis_pid > 0) {
    kill(redis_pid, SIGKILL);
    waitpid(redis_pid, NULL, 0);
  }
  redis_pid = 0;
}

/* ---------------------------------------------------------------------- */
/* The store alone */

typedef struct got {
  int n, rv;
  mx_batch *b;
} got;

static void on_done(void *ud, int rv, mx_batch *b) {
  got *g = ud;
  g->n++;
  g->rv = rv;
  mx_batch_unref(g->b);
  g->b = b ? mx_batch_ref(b) : NULL;
}

static void got_reset(got *g) {
  mx_batch_unref(g->b);
  memset(g, 0, sizeof(*g));
}

static struct ev_loop *sl; /* the store tests' loop */

static bool wait_for(bool (*pred)(void *), void *arg, double max) {
  double end = ev_time() + max;
  while (!pred(arg) && ev_time() < end) {
    ev_run(sl, EVRUN_NOWAIT);
    usleep(1000);
  }
  return pred(arg);
}

static bool answered(void *g) { return ((got *)g)->n > 0; }
static bool store_up(void *r) { return mx_redis_replay_is_up(r); }

static mx_redis_replay *new_store(double max_age, size_t max_batch,
                                  const char *url) {
  mx_redis_replay_opts o = {.url = url ? url : redis_url,
                            .max_age = max_age,
                            .max_batch = max_batch,
                            .op_timeout = 0.3};
  mx_redis_replay *r = mx_redis_replay_new(sl, &o);
  CHECK(r != NULL);
  return r;
}

static void put(mx_redis_replay *r, const char *feed, const char *since,
                mx_batch *b, got *g) {
  got_reset(g);
  mx_redis_replay_ops.put_if_absent(r, feed, 64, since, strlen(since), b,
                                    ev_now(sl), on_done, g);
  CHECK(wait_for(answered, g, 3));
}

static void get(mx_redis_replay *r, const char *feed, const char *since,
                got *g) {
  got_reset(g);
  mx_redis_replay_ops.get(r, feed, 64, since, strlen(since), ev_now(sl),
                          on_done, g);
  CHECK(wait_for(answered, g, 3));
}

static void store_setup(void) {
  sl = ev_loop_new(EVFLAG_AUTO);
  sync_cmd("FLUSHALL");
}

static void store_teardown(mx_redis_replay *r) {
  if (r)
    mx_redis_replay_ops.free(r);
  ev_loop_destroy(sl);
  sl = NULL;
}

static void test_first_answer_wins(void) {
  store_setup();
  mx_redis_replay *r = new_store(60, 0, NULL);
  CHECK(wait_for(store_up, r, 3));
  static const char body1[] = "{\"next_batch\":\"s2\"}\n\0binary\r\n";
  mx_batch *b1 = mx_batch_new("s2", 2, body1, sizeof(body1) - 1);
  mx_batch *b2 = mx_batch_new("s2other", 7, "{}", 2);
  got g = {0};
  put(r, FEED, "s1", b1, &g);
  CHECK_INT(g.rv, 0);
  CHECK(g.b == b1); /* stored: the caller's own batch */
  put(r, FEED, "s1", b2, &g);
  CHECK_INT(g.rv, 0); /* the first one stands */
  CHECK(g.b && g.b != b1 && g.b != b2);
  CHECK_MEMEQ(g.b->next_batch, g.b->nlen, "s2", 2);
  CHECK_MEMEQ(g.b->body, g.b->len, body1, sizeof(body1) - 1);
  get(r, FEED, "s1", &g);
  CHECK_INT(g.rv, 0);
  CHECK(g.b && g.b->len == sizeof(body1) - 1 &&
        !memcmp(g.b->body, body1, g.b->len));
  get(r, FEED, "s9", &g);
  CHECK_INT(g.rv, MX_ERR_NOTFOUND);
  get(r, FEED2, "s1", &g);
  CHECK_INT(g.rv, MX_ERR_NOTFOUND);
  mx_replay_stats st;
  mx_redis_replay_ops.stats(r, &st);
  CHECK_INT(st.hits, 1);
  CHECK_INT(st.misses, 2);
  got_reset(&g);
  mx_batch_unref(b1);
  mx_batch_unref(b2);
  store_teardown(r);
}

static void test_ttl_and_history_gone(void) {
  store_setup();
  mx_redis_replay *r = new_store(60, 0, NULL);
  CHECK(wait_for(store_up, r, 3));
  mx_batch *b = mx_batch_new("s2", 2, "{}", 2);
  got g = {0};
  put(r, FEED, "s1", b, &g);
  CHECK_INT(g.rv, 0);
  long long ttl = sync_int("PTTL %s", "mxsse:replay:b:" FEED ":s1");
  CHECK(ttl > 58000 && ttl <= 60000);
  long long mttl = sync_int("PTTL %s", "mxsse:replay:m:" FEED ":s1");
  CHECK(mttl > 470000 && mttl <= 480000); /* 8 x the age */
  /* The batch goes (evicted or expired), the marker stays: the resume
   * cannot be honoured, and the store says so. */
  CHECK_INT(sync_int("DEL %s", "mxsse:replay:b:" FEED ":s1"), 1);
  get(r, FEED, "s1", &g);
  CHECK_INT(g.rv, MX_ERR_CLOSED);
  mx_redis_replay_ops.free(r);
  /* Real expiry. */
  r = new_store(1, 0, NULL);
  CHECK(wait_for(store_up, r, 3));
  put(r, FEED, "s5", b, &g);
  CHECK_INT(g.rv, 0);
  get(r, FEED, "s5", &g);
  CHECK_INT(g.rv, 0);
  usleep(1200 * 1000);
  get(r, FEED, "s5", &g);
  CHECK_INT(g.rv, MX_ERR_CLOSED);
  got_reset(&g);
  mx_batch_unref(b);
  store_teardown(r);
}

static void test_size_cap(void) {
  store_setup();
  mx_redis_replay *r = new_store(60, 64, NULL);
  CHECK(wait_for(store_up, r, 3));
  char big[100];
  memset(big, 'x', sizeof(big));
  mx_batch *b = mx_batch_new("s2", 2, big, sizeof(big));
  got g = {0};
  mx_redis_replay_ops.put_if_absent(r, FEED, 64, "s1", 2, b, ev_now(sl),
                                    on_done, &g);
  CHECK_INT(g.n, 1); /* at once */
  CHECK_INT(g.rv, MX_ERR_LIMIT);
  CHECK(g.b == NULL);
  got_reset(&g);
  mx_batch_unref(b);
  store_teardown(r);
}

static void test_down_stopped_and_back(void) {
  store_setup();
  mx_redis_replay *r = new_store(60, 0, NULL);
  CHECK(wait_for(store_up, r, 3));
  CHECK_INT(mx_stats.replay_store_up, 1);
  mx_batch *b = mx_batch_new("s2", 2, "{}", 2);
  got g = {0};
  uint64_t unavailable = mx_stats.replay_store_unavailable;
  /* Killed: calls in flight and later ones answer UNAVAILABLE. */
  redis_kill();
  get(r, FEED, "s1", &g);
  CHECK_INT(g.rv, MX_ERR_UNAVAILABLE);
  put(r, FEED, "s1", b, &g);
  CHECK_INT(g.rv, MX_ERR_UNAVAILABLE);
  CHECK(g.b == NULL);
  CHECK_INT(mx_stats.replay_store_up, 0);
  CHECK(mx_stats.replay_store_unavailable >= unavailable + 2);
  /* Back on the same port: the store reconnects by itself. */
  CHECK(redis_start(NULL));
  CHECK(wait_for(store_up, r, 15));
  put(r, FEED, "s1", b, &g);
  CHECK_INT(g.rv, 0);
  /* Stopped (no reply at all): answered after op_timeout, reconnected
   * once it answers again. */
  kill(redis_pid, SIGSTOP);
  double t0 = ev_time();
  get(r, FEED, "s1", &g);
  CHECK_INT(g.rv, MX_ERR_UNAVAILABLE);
  CHECK(ev_time() - t0 < 2.0);
  kill(redis_pid, SIGCONT);
  CHECK(wait_for(store_up, r, 15));
  get(r, FEED, "s1", &g);
  CHECK_INT(g.rv, 0);
  /* Freed with a call in flight: answered once, UNAVAILABLE. */
  got_reset(&g);
  mx_redis_replay_ops.get(r, FEED, 64, "s1", 2, ev_now(sl), on_done, &g);
  CHECK_INT(g.n, 0);
  mx_redis_replay_ops.free(r);
  CHECK_INT(g.n, 1);
  CHECK_INT(g.rv, MX_ERR_UNAVAILABLE);
  got_reset(&g);
  mx_batch_unref(b);
  store_teardown(NULL);
}

static void test_acl_user(void) {
  /* The ACL docs/deployment.md gives: SET and MGET on the prefix only. */
  sync_cmd("ACL SETUSER mxsse-replay reset on >s3cret ~mxsse:replay:* "
           "+set +mget");
  char url[160];
  snprintf(url, sizeof(url), "redis://mxsse-replay:s3cret@127.0.0.1:%d",
           redis_port);
  store_setup();
  mx_redis_replay *r = new_store(60, 0, url);
  CHECK(wait_for(store_up, r, 3));
  mx_batch *b = mx_batch_new("s2", 2, "{}", 2);
  got g = {0};
  put(r, FEED, "s1", b, &g);
  CHECK_INT(g.rv, 0);
  get(r, FEED, "s1", &g);
  CHECK_INT(g.rv, 0);
  mx_redis_replay_ops.free(r);
  /* Outside the prefix the server refuses: a put that cannot be proven
   * stored is UNAVAILABLE, never a silent success. */
  mx_redis_replay_opts o = {.url = url, .prefix = "other:", .max_age = 60};
  r = mx_redis_replay_new(sl, &o);
  CHECK(wait_for(store_up, r, 3));
  put(r, FEED, "s1", b, &g);
  CHECK_INT(g.rv, MX_ERR_UNAVAILABLE);
  mx_redis_replay_ops.free(r);
  /* A wrong password: never up. */
  snprintf(url, sizeof(url), "redis://mxsse-replay:wrong@127.0.0.1:%d",
           redis_port);
  r = new_store(60, 0, url);
  for (int i = 0; i < 100; i++) {
    ev_run(sl, EVRUN_NOWAIT);
    usleep(2000);
  }
  CHECK(!mx_redis_replay_is_up(r));
  get(r, FEED, "s1", &g);
  CHECK_INT(g.rv, MX_ERR_UNAVAILABLE);
  got_reset(&g);
  mx_batch_unref(b);
  sync_cmd("ACL DELUSER mxsse-replay");
  store_teardown(r);
}

/* ---------------------------------------------------------------------- */
/* The hub with a store that cannot be asked (hub_fake's deferring store) */

static void hub_setup(void) {
  mx_sync_hub_opts o = hf_opts();
  o.start_retry_window = -1; /* failures before the start answer at once */
  hf_deferred_store = true;
  hf_setup(&o, &tap_failed_checks);
}

static void hub_teardown(void) {
  hf_teardown();
  hf_deferred_store = false;
  hf_deferred_unavailable = false;
}

/* A stream started with s1 whose long-poll since=s1 is in flight: its
 * index. */
static int longpolling(rec *a) {
  hf_open(a, "a", "tokA", "filter=1", NULL, false);
  spin();
  CHECK_INT(F.nreqs, 1);
  answer(0, 200, batch("s1"));
  CHECK_INT(a->nevents, 1);
  taken(a);
  CHECK(wait_reqs(2, 3)); /* after a lookup in the store */
  CHECK_INT(F.nreqs, 2);
  CHECK_STREQ(F.reqs[1].since, "s1");
  return 1;
}

static void test_hub_resume_refused(void) {
  hub_setup();
  hf_deferred_unavailable = true;
  uint64_t refused = mx_stats.replay_resumes_refused;
  rec a = {0};
  hf_open(&a, "a", "tokA", "filter=1", "s7", false);
  run_for(0.05);
  CHECK_INT(a.nstart, 1);
  CHECK_INT(a.start_status, 503);
  CHECK(strstr(a.start_body, "replay store") != NULL);
  CHECK_INT(F.nreqs, 0); /* no silent upstream fetch */
  CHECK_INT(mx_stats.replay_resumes_refused, refused + 1);
  close_rec(&a);
  hub_teardown();
  rec_free(&a);
}

static void test_hub_put_held_until_stored(void) {
  hub_setup();
  rec a = {0}, b = {0};
  int lp = longpolling(&a);
  spin();
  hf_deferred_unavailable = true;
  uint64_t retries = mx_stats.replay_put_retries;
  answer(lp, 200, batch("s2"));
  run_for(0.3);
  /* Not delivered, nothing fetched past it, the put retried. */
  CHECK_INT(a.nevents, 1);
  CHECK_INT(F.nreqs, 2);
  CHECK(mx_stats.replay_put_retries >= retries + 2);
  CHECK_INT(live_reqs(), 0);
  /* A second tab resuming from s1 meanwhile is refused. */
  hf_open(&b, "b", "tokA", "filter=1", "s1", false);
  run_for(0.05);
  CHECK_INT(b.start_status, 503);
  CHECK_INT(a.nfatal, 0);
  /* The store is back: the batch is stored, then delivered. */
  hf_deferred_unavailable = false;
  run_for(1.2);
  CHECK_INT(a.nevents, 2);
  CHECK_STREQ(event_id(&a), "s2");
  taken(&a);
  spin();
  CHECK_INT(F.nreqs, 3);
  CHECK_STREQ(F.reqs[2].since, "s2");
  /* and a resume from s1 now gets it from the store */
  rec c = {0};
  hf_open(&c, "c", "tokA", "filter=1", "s1", false);
  run_for(0.05);
  CHECK_INT(c.nevents, 1);
  CHECK_STREQ(event_id(&c), "s2");
  CHECK_INT(F.nreqs, 3);
  close_rec(&a);
  close_rec(&b);
  close_rec(&c);
  hub_teardown();
  rec_free(&a);
  rec_free(&b);
  rec_free(&c);
}

static void test_hub_empty_answer_waits_for_store(void) {
  hub_setup();
  rec a = {0};
  int lp = longpolling(&a);
  spin();
  hf_deferred_unavailable = true;
  answer(lp, 200, batch("s1")); /* nothing new: proven only by the store */
  run_for(0.2);
  CHECK_INT(F.nreqs, 2); /* no new long-poll yet */
  hf_deferred_unavailable = false;
  CHECK(wait_reqs(3, 3)); /* the lookup retried, then the long-poll */
  CHECK_INT(F.nreqs, 3);
  CHECK_STREQ(F.reqs[2].since, "s1");
  CHECK_INT(a.nevents, 1);
  close_rec(&a);
  hub_teardown();
  rec_free(&a);
}

static void test_hub_unstarted_put_unavailable(void) {
  hub_setup();
  rec a = {0};
  hf_open(&a, "a", "tokA", "filter=1", "s4", false);
  run_for(0.05);
  CHECK_INT(F.nreqs, 1); /* the store had nothing: fetched */
  hf_deferred_unavailable = true;
  answer(0, 200, batch("s5"));
  run_for(0.05);
  CHECK_INT(a.nevents, 0);
  CHECK_INT(a.start_status, 503);
  close_rec(&a);
  hub_teardown();
  rec_free(&a);
}

/* ---------------------------------------------------------------------- */
/* The hub over the Redis store: one node after another */

static double node_age = 60;

static void redis_store_setup(mx_sync_hub_opts *o, struct ev_loop *l) {
  mx_redis_replay_opts ro = {.url = redis_url, .max_age = node_age};
  mx_redis_replay *r = mx_redis_replay_new(l, &ro);
  CHECK(r != NULL);
  for (int i = 0; i < 1000 && !mx_redis_replay_is_up(r); i++) {
    ev_run(l, EVRUN_NOWAIT);
    usleep(1000);
  }
  CHECK(mx_redis_replay_is_up(r));
  o->replay_ops = &mx_redis_replay_ops;
  o->replay_store = r;
}

static void node_setup(void) {
  mx_sync_hub_opts o = hf_opts();
  o.start_retry_window = -1;
  hf_store_setup = redis_store_setup;
  hf_setup(&o, &tap_failed_checks);
}

static void node_teardown(void) {
  hf_teardown();
  hf_store_setup = NULL;
}

static void wait_events(rec *r, int n) {
  for (int i = 0; i < 2000 && r->nevents < n; i++) {
    ev_run(loop, EVRUN_NOWAIT);
    usleep(1000);
  }
}

/* Node 1: a stream goes s1 -> s2 (stored in Redis), its client takes it
 * and node 1 fetches since=s2 (acknowledging s2's to-device messages);
 * then the node dies. */
static void node1_delivers_s2(void) {
  node_setup();
  rec a = {0};
  int lp = longpolling(&a);
  answer(lp, 200, batch("s2"));
  wait_events(&a, 2);
  CHECK_INT(a.nevents, 2);
  CHECK_STREQ(event_id(&a), "s2");
  taken(&a);
  CHECK(wait_reqs(3, 3));
  CHECK_STREQ(F.reqs[F.nreqs - 1].since, "s2");
  close_rec(&a);
  node_teardown();
  rec_free(&a);
}

static void test_resume_on_another_node(void) {
  sync_cmd("FLUSHALL");
  node_age = 60;
  node1_delivers_s2();
  /* Node 2: the client, which never read s2, resumes from s1. */
  node_setup();
  rec b = {0};
  hf_open(&b, "b", "tokA", "filter=1", "s1", false);
  wait_events(&b, 1);
  CHECK_INT(b.nevents, 1);
  CHECK_STREQ(event_id(&b), "s2");
  CHECK_INT(F.nreqs, 0); /* from Redis, not from the homeserver */
  CHECK(!mx_sync_stream_resume_gap(b.st));
  close_rec(&b);
  node_teardown();
  rec_free(&b);
}

static void test_resume_gap_flagged(void) {
  sync_cmd("FLUSHALL");
  node_age = 1;
  node1_delivers_s2();
  usleep(1300 * 1000); /* s1 -> s2 expired; its marker has not */
  node_setup();
  uint64_t gaps = mx_stats.replay_resume_gaps;
  rec b = {0};
  hf_open(&b, "b", "tokA", "filter=1", "s1", false);
  for (int i = 0; i < 2000 && F.nreqs == 0; i++) {
    ev_run(loop, EVRUN_NOWAIT);
    usleep(1000);
  }
  CHECK_INT(F.nreqs, 1); /* the homeserver's answer is all there is */
  CHECK_STREQ(F.reqs[0].since, "s1");
  answer(0, 200, batch("s2b"));
  wait_events(&b, 1);
  CHECK_INT(b.nstart, 1);
  CHECK(mx_sync_stream_resume_gap(b.st));
  CHECK_INT(mx_stats.replay_resume_gaps, gaps + 1);
  close_rec(&b);
  node_teardown();
  rec_free(&b);
  node_age = 60;
}

static void setup_all(void) {
  mx_log_init(MX_LOG_ERROR, NULL);
  signal(SIGPIPE, SIG_IGN);
  if (!redis_start(NULL)) {
    printf("Bail out! cannot start redis-server (Debian's redis-server "
           "package is required)\n");
    exit(1);
  }
}

static int run_all(void) {
  TAP_RUN(TAP_CASE(test_first_answer_wins),
          TAP_CASE(test_ttl_and_history_gone), TAP_CASE(test_size_cap),
          TAP_CASE(test_down_stopped_and_back), TAP_CASE(test_acl_user),
          TAP_CASE(test_hub_resume_refused),
          TAP_CASE(test_hub_put_held_until_stored),
          TAP_CASE(test_hub_empty_answer_waits_for_store),
          TAP_CASE(test_hub_unstarted_put_unavailable),
          TAP_CASE(test_resume_on_another_node),
          TAP_CASE(test_resume_gap_flagged));
}

int main(void) {
  setup_all();
  int rv = run_all();
  redis_kill();
  return rv;
}
