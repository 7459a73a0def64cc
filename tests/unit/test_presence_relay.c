/*
 * homeserver/presence_relay.c against a real redis-server (started here
 * on a free loopback port, with an ACL account that may only PUBLISH on
 * the channel, as docs/presence.md recommends): the CLEAR on connect, the
 * starts and ends, a Redis restart (CLEAR and every start again), a wrong
 * password (never up), the CLEAR of a clean shutdown. The HTTP side
 * (presence_set_state) is proven against Synapse in
 * tests/integration/test_presence.py.
 */
#include <arpa/inet.h>
#include <ev.h>
#include <hiredis/adapters/libev.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/config.h"
#include "common/error.h"
#include "common/log.h"
#include "homeserver/presence_relay.h"
#include "tests/unit/tap.h"

#define CHANNEL "relay.test"
#define MAXLINES 512

static struct ev_loop *loop;
static int port;
static pid_t redis_pid;
static char *lines[MAXLINES];
static size_t nlines;
static redisAsyncContext *sub;

static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t l = sizeof(a);
  if (bind(fd, (struct sockaddr *)&a, sizeof(a)) || getsockname(fd, (struct sockaddr *)&a, &l))
    abort();
  close(fd);
  return ntohs(a.sin_port);
}

static void start_redis(void) {
  char p[16];
  snprintf(p, sizeof(p), "%d", port);
  redis_pid = fork();
  if (redis_pid == 0) {
    freopen("/dev/null", "w", stdout);
    execlp("redis-server", "redis-server", "--port", p, "--bind", "127.0.0.1",
           "--save", "", "--appendonly", "no", "--user", "pub", "on", ">pw",
           "resetkeys", "resetchannels", "&" CHANNEL, "-@all", "+publish",
           "+ping", (char *)NULL);
    _exit(127);
  }
  /* Wait until it answers. */
  for (int i = 0; i < 100; i++) {
    redisContext *c = redisConnect("127.0.0.1", port);
    if (c && !c->err) {
      redisReply *r = redisCommand(c, "PING");
      bool ok = r && r->type == REDIS_REPLY_STATUS;
      freeReplyObject(r);
      redisFree(c);
      if (ok)
        return;
    } else if (c) {
      redisFree(c);
    }
    usleep(50000);
  }
  printf("Bail out! redis-server did not start (is it installed?)\n");
  exit(1);
}

static void stop_redis(void) {
  if (redis_pid > 0) {
    kill(redis_pid, SIGTERM);
    waitpid(redis_pid, NULL, 0);
    redis_pid = 0;
  }
}

static void on_sub(redisAsyncContext *ac, void *r, void *priv) {
  redisReply *reply = r;
  if (!reply || reply->type != REDIS_REPLY_ARRAY || reply->elements < 3)
    return;
  if (!strcmp(reply->element[0]->str, "message") && nlines < MAXLINES)
    lines[nlines++] = strndup(reply->element[2]->str, reply->element[2]->len);
}

static void on_sub_gone(const redisAsyncContext *ac, int status) { sub = NULL; }

static void subscribe(void) {
  sub = redisAsyncConnect("127.0.0.1", port);
  redisLibevAttach(loop, sub);
  redisAsyncSetDisconnectCallback(sub, on_sub_gone);
  redisAsyncCommand(sub, on_sub, NULL, "SUBSCRIBE " CHANNEL);
}

static void clear_lines(void) {
  for (size_t i = 0; i < nlines; i++)
    free(lines[i]);
  nlines = 0;
}

static void stop_cb(struct ev_loop *l, ev_timer *w, int revents) {
  ev_break(l, EVBREAK_ONE);
}

static void run_for(double seconds) {
  ev_timer t;
  ev_timer_init(&t, stop_cb, seconds, 0.);
  ev_timer_start(loop, &t);
  ev_run(loop, 0);
  ev_timer_stop(loop, &t);
}

/* Runs the loop until pred or timeout; returns pred. */
static bool run_until(bool (*pred)(const void *), const void *arg,
                      double timeout) {
  for (double t = 0; t < timeout; t += 0.05) {
    if (pred(arg))
      return true;
    run_for(0.05);
  }
  return pred(arg);
}

static bool has_prefix(const void *arg) {
  for (size_t i = 0; i < nlines; i++)
    if (!strncmp(lines[i], arg, strlen(arg)))
      return true;
  return false;
}

static size_t count_prefix(const char *prefix) {
  size_t n = 0;
  for (size_t i = 0; i < nlines; i++)
    n += !strncmp(lines[i], prefix, strlen(prefix));
  return n;
}

static bool relay_up(const void *arg) { return mx_presence_relay_up(arg); }

static mx_presence_relay *make_relay(const char *password) {
  char url[128];
  snprintf(url, sizeof(url), "redis://pub:%s@127.0.0.1:%d", password, port);
  mx_presence_relay_opts o = {
      .redis_url = url,
      .channel = CHANNEL,
      .instance = "unit1",
      /* no replication_url: keepalive mode, no hook needed here */
      .end_delay_min = 0.2,
      .end_delay_max = 0.4,
      .resync_spread = 0.2,
      .tick = 0.05,
      .seed = 7,
  };
  return mx_presence_relay_new(loop, &o, NULL);
}

static void test_publishes_clear_start_end(void) {
  clear_lines();
  mx_presence_relay *r = make_relay("pw");
  CHECK(r != NULL);
  CHECK(run_until(relay_up, r, 5));
  CHECK(run_until(has_prefix, "CLEAR_USER_SYNC unit1", 5));
  CHECK_INT(mx_presence_relay_open(r, "@a:hs", 5, "DEV", 3, MX_PRESENCE_ONLINE), 0);
  CHECK(run_until(has_prefix, "USER_SYNC unit1 @a:hs DEV start ", 5));
  CHECK_INT(mx_presence_relay_open(r, "@a:hs", 5, "A B", 3, MX_PRESENCE_ONLINE),
            MX_ERR_INVALID);
  mx_presence_relay_close(r, "@a:hs", 5, "DEV", 3, MX_PRESENCE_ONLINE);
  CHECK(run_until(has_prefix, "USER_SYNC unit1 @a:hs DEV end ", 5));
  /* Our own echo, fed back as the replication feed would. */
  mx_presence_relay_feed_line(r, lines[0], strlen(lines[0]));
  CHECK_INT(mx_presence_relay_logic_stats(r)->echoes, 1);
  mx_presence_relay_stats s = mx_presence_relay_stats_get(r);
  CHECK(s.published >= 3);
  CHECK_INT(s.publish_errors, 0);
  mx_presence_relay_free(r);
}

static void test_redis_restart_resends(void) {
  clear_lines();
  mx_presence_relay *r = make_relay("pw");
  CHECK(run_until(relay_up, r, 5));
  mx_presence_relay_open(r, "@a:hs", 5, "D1", 2, MX_PRESENCE_ONLINE);
  mx_presence_relay_open(r, "@b:hs", 5, "D2", 2, MX_PRESENCE_UNAVAILABLE);
  CHECK(run_until(has_prefix, "USER_SYNC unit1 @b:hs D2 start", 5));
  stop_redis();
  run_for(0.5);
  CHECK(!mx_presence_relay_up(r));
  start_redis();
  subscribe();
  clear_lines();
  CHECK(run_until(relay_up, r, 20));
  CHECK(run_until(has_prefix, "USER_SYNC unit1 @b:hs D2 start", 5));
  CHECK(run_until(has_prefix, "USER_SYNC unit1 @a:hs D1 start", 5));
  /* The CLEAR comes before the starts. */
  CHECK(nlines > 0 && !strcmp(lines[0], "CLEAR_USER_SYNC unit1"));
  CHECK(mx_presence_relay_stats_get(r).reconnects >= 1);
  mx_presence_relay_free(r);
}

static void test_wrong_password_never_up(void) {
  clear_lines();
  mx_presence_relay *r = make_relay("wrong");
  run_for(1.5);
  CHECK(!mx_presence_relay_up(r));
  CHECK_INT(count_prefix("CLEAR_USER_SYNC"), 0);
  mx_presence_relay_free(r);
}

static void test_shutdown_clears(void) {
  mx_presence_relay *r = make_relay("pw");
  CHECK(run_until(relay_up, r, 5));
  mx_presence_relay_open(r, "@a:hs", 5, "D1", 2, MX_PRESENCE_ONLINE);
  run_for(0.2);
  clear_lines();
  CHECK_INT(mx_presence_relay_shutdown(r, 5), 0);
  CHECK(run_until(has_prefix, "CLEAR_USER_SYNC unit1", 5));
  mx_presence_relay_free(r);
  /* Link down: nothing to clear. */
  r = make_relay("wrong");
  run_for(0.3);
  CHECK_INT(mx_presence_relay_shutdown(r, 1), MX_ERR_CLOSED);
  mx_presence_relay_free(r);
}

static void test_bad_options(void) {
  mx_presence_relay_opts o = {.redis_url = "http://x", .channel = "c"};
  CHECK(mx_presence_relay_new(loop, &o, NULL) == NULL);
  o.redis_url = "redis://127.0.0.1:1";
  o.instance = "has space";
  CHECK(mx_presence_relay_new(loop, &o, NULL) == NULL);
  o.instance = NULL;
  o.secret = "two words";
  CHECK(mx_presence_relay_new(loop, &o, NULL) == NULL);
  o.secret = NULL;
  o.replication_url = "ftp://x";
  CHECK(mx_presence_relay_new(loop, &o, NULL) == NULL);
  /* Default instance: mxsse-<host>-<pid>. */
  o.replication_url = NULL;
  mx_presence_relay *r = mx_presence_relay_new(loop, &o, NULL);
  CHECK(r && !strncmp(mx_presence_relay_instance(r), "mxsse-", 6));
  char pid[32];
  snprintf(pid, sizeof(pid), "-%ld", (long)getpid());
  const char *inst = r ? mx_presence_relay_instance(r) : "";
  CHECK(strlen(inst) > strlen(pid) &&
        !strcmp(inst + strlen(inst) - strlen(pid), pid));
  mx_presence_relay_free(r);
}

static void test_escape(void) {
  char out[64];
  CHECK_INT(mx_presence_relay_escape("@a:hs.org", 9, out, sizeof(out)), 13);
  CHECK_STREQ(out, "%40a%3Ahs.org");
  CHECK_INT(mx_presence_relay_escape("a/b c", 5, out, sizeof(out)), 9);
  CHECK_STREQ(out, "a%2Fb%20c");
  CHECK_INT(mx_presence_relay_escape("@@@@", 4, out, 12), MX_ERR_LIMIT);
  CHECK_INT(mx_presence_relay_escape("@@@@", 4, out, 13), 12);
}

static void test_read_secret(void) {
  char path[] = "/tmp/mxsse-secret-XXXXXX";
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  CHECK(write(fd, "s3cr3t\n", 7) == 7);
  close(fd);
  char *s = NULL;
  CHECK_INT(mx_presence_relay_read_secret(path, &s), 0);
  CHECK_STREQ(s, "s3cr3t");
  free(s);
  s = NULL;
  FILE *f = fopen(path, "w");
  fputs("two words\n", f);
  fclose(f);
  CHECK_INT(mx_presence_relay_read_secret(path, &s), MX_ERR_INVALID);
  f = fopen(path, "w");
  fclose(f);
  CHECK_INT(mx_presence_relay_read_secret(path, &s), MX_ERR_INVALID);
  unlink(path);
  CHECK_INT(mx_presence_relay_read_secret(path, &s), MX_ERR_INVALID);
  CHECK(s == NULL);
}

/* The relay's options in common/config.c: off by default, and the
 * combinations that cannot work are refused before start-up. */
static int load(const char *extra[], size_t n, char *errbuf, size_t cap) {
  const char *base[] = {"mxsse", "--upstream", "http://127.0.0.1:8008",
                        "--listen", "127.0.0.1:0"};
  char *argv[32];
  size_t argc = 0;
  for (size_t i = 0; i < 5; i++)
    argv[argc++] = (char *)base[i];
  for (size_t i = 0; i < n; i++)
    argv[argc++] = (char *)extra[i];
  mx_config cfg;
  mx_config_defaults(&cfg);
  FILE *err = fmemopen(errbuf, cap, "w");
  int rv = mx_config_load(&cfg, (int)argc, argv, stdout, err);
  fclose(err);
  mx_config_free(&cfg);
  return rv;
}

static void test_config_options(void) {
  char e[512];
  const char *repl[] = {"--replication", "redis://127.0.0.1:6379",
                        "--server-name", "hs"};
  mx_config cfg;
  mx_config_defaults(&cfg);
  CHECK(cfg.presence_redis == NULL);
  CHECK_INT(cfg.presence_interval, 45);
  const char *ok[] = {repl[0], repl[1], repl[2], repl[3], "--presence-redis",
                      "redis://u:p@127.0.0.1:6379", "--presence-instance",
                      "node-1", "--presence-replication-url",
                      "http://127.0.0.1:9093", "--presence-interval", "30"};
  CHECK_INT(load(ok, 12, e, sizeof(e)), 0);
  const char *no_feed[] = {"--presence-redis", "redis://127.0.0.1:6379"};
  CHECK_INT(load(no_feed, 2, e, sizeof(e)), MX_ERR_INVALID);
  CHECK(strstr(e, "needs --replication") != NULL);
  const char *bad_url[] = {repl[0], repl[1], repl[2], repl[3],
                           "--presence-redis", "http://u:secretpw@x:1"};
  CHECK_INT(load(bad_url, 6, e, sizeof(e)), MX_ERR_INVALID);
  CHECK(strstr(e, "secretpw") == NULL); /* never echoed */
  const char *bad_inst[] = {repl[0], repl[1], repl[2], repl[3],
                            "--presence-redis", "redis://x:1",
                            "--presence-instance", "a b"};
  CHECK_INT(load(bad_inst, 8, e, sizeof(e)), MX_ERR_INVALID);
  const char *orphan[] = {repl[0], repl[1], repl[2], repl[3],
                          "--presence-replication-url", "http://x:1"};
  CHECK_INT(load(orphan, 6, e, sizeof(e)), MX_ERR_INVALID);
  const char *secret_no_url[] = {repl[0], repl[1], repl[2], repl[3],
                                 "--presence-redis", "redis://x:1",
                                 "--presence-replication-secret-file",
                                 "/etc/hostname"};
  CHECK_INT(load(secret_no_url, 8, e, sizeof(e)), MX_ERR_INVALID);
  const char *missing[] = {repl[0], repl[1], repl[2], repl[3],
                           "--presence-redis", "redis://x:1",
                           "--presence-replication-url", "http://x:1",
                           "--presence-replication-secret-file",
                           "/nonexistent/secret"};
  CHECK_INT(load(missing, 10, e, sizeof(e)), MX_ERR_INVALID);
  const char *interval[] = {repl[0], repl[1], repl[2], repl[3],
                            "--presence-redis", "redis://x:1",
                            "--presence-interval", "70"};
  CHECK_INT(load(interval, 8, e, sizeof(e)), MX_ERR_INVALID);
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  /* The refused AUTH of the wrong-password test is logged as an error. */
  mx_log_init(MX_LOG_ERROR, NULL);
  loop = ev_default_loop(0);
  port = free_port();
  start_redis();
  subscribe();
  run_for(0.2);
  int rv;
  {
    static const tap_case cases[] = {
        TAP_CASE(test_publishes_clear_start_end),
        TAP_CASE(test_redis_restart_resends),
        TAP_CASE(test_wrong_password_never_up), TAP_CASE(test_shutdown_clears),
        TAP_CASE(test_bad_options), TAP_CASE(test_escape),
        TAP_CASE(test_read_secret), TAP_CASE(test_config_options)};
    rv = tap_run(cases, sizeof(cases) / sizeof(cases[0]));
  }
  if (sub)
    redisAsyncFree(sub);
  clear_lines();
  stop_redis();
  ev_loop_destroy(loop);
  return rv;
}
