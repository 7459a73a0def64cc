/*
 * Drives homeserver/presence_relay.c by hand, for
 * tests/integration/test_presence.py (the relay against the real Synapse
 * before the daemon's hub calls it):
 *
 *   presence_driver --redis URL --channel NAME [--instance ID]
 *       [--feed URL] [--replication-url URL --secret-file FILE]
 *       [--interval S] [--end-min S --end-max S]
 *
 * Commands on stdin, one per line:
 *   open USER DEVICE [online|unavailable]   a stream opened
 *   close USER DEVICE [online|unavailable]  it closed
 *   stats                                   one JSON line of counters
 *   quit                                    clean shutdown (CLEAR), exit 0
 * End of input is quit. Prints "up", "down", "keepalive USER STATE" (the
 * keepalive /sync the caller must make in keepalive mode) and the answers
 * to commands on stdout, one line each, flushed. --feed subscribes to the
 * channel with mx_redis_feed and hands every line to the relay, as the
 * daemon's replication feed will (REPLICATE re-announces).
 */
#include <ev.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/error.h"
#include "common/log.h"
#include "homeserver/redis_feed.h"
#include "homeserver/presence_relay.h"

static mx_presence_relay *relay;
static bool was_up;
static char inbuf[4096];
static size_t inlen;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  putchar('\n');
  fflush(stdout);
}

static void keepalive(const char *user, size_t ulen, const char *presence,
                      void *ud) {
  say("keepalive %.*s %s", (int)ulen, user, presence);
}

static void feed_message(const char *payload, size_t len, void *ud) {
  mx_presence_relay_feed_line(relay, payload, len);
}
static void feed_up(void *ud) { mx_presence_relay_feed_up(relay); }
static void feed_down(void *ud) {}

static mx_presence_state parse_state(const char *s) {
  return s && !strcmp(s, "unavailable") ? MX_PRESENCE_UNAVAILABLE
                                        : MX_PRESENCE_ONLINE;
}

static void stats(void) {
  mx_presence_relay_stats s = mx_presence_relay_stats_get(relay);
  const mx_presence_stats *l = mx_presence_relay_logic_stats(relay);
  say("{\"up\":%s,\"published\":%llu,\"publish_errors\":%llu,"
      "\"dropped\":%llu,\"calls\":%llu,\"call_errors\":%llu,"
      "\"reconnects\":%llu,\"starts\":%llu,\"ends\":%llu,\"clears\":%llu,"
      "\"set_states\":%llu,\"keepalives\":%llu,\"echoes\":%llu,"
      "\"replicates\":%llu,\"devices\":%zu,\"users\":%zu,"
      "\"instance\":\"%s\"}",
      s.up ? "true" : "false", (unsigned long long)s.published,
      (unsigned long long)s.publish_errors, (unsigned long long)s.dropped,
      (unsigned long long)s.calls, (unsigned long long)s.call_errors,
      (unsigned long long)s.reconnects, (unsigned long long)l->starts,
      (unsigned long long)l->ends, (unsigned long long)l->clears,
      (unsigned long long)l->set_states, (unsigned long long)l->keepalives,
      (unsigned long long)l->echoes, (unsigned long long)l->replicates,
      l->devices, l->users, mx_presence_relay_instance(relay));
}

static void command(struct ev_loop *loop, char *line) {
  char *save = NULL;
  char *verb = strtok_r(line, " ", &save);
  char *user = strtok_r(NULL, " ", &save);
  char *device = strtok_r(NULL, " ", &save);
  char *state = strtok_r(NULL, " ", &save);
  if (!verb)
    return;
  if (!strcmp(verb, "quit")) {
    ev_break(loop, EVBREAK_ALL);
  } else if (!strcmp(verb, "stats")) {
    stats();
  } else if (user && device && !strcmp(verb, "open")) {
    int rv = mx_presence_relay_open(relay, user, strlen(user), device,
                                    strlen(device), parse_state(state));
    say("open %d", rv);
  } else if (user && device && !strcmp(verb, "close")) {
    mx_presence_relay_close(relay, user, strlen(user), device, strlen(device),
                            parse_state(state));
    say("close 0");
  } else {
    say("error unknown command");
  }
}

static void stdin_cb(struct ev_loop *loop, ev_io *w, int revents) {
  ssize_t n = read(0, inbuf + inlen, sizeof(inbuf) - 1 - inlen);
  if (n <= 0) {
    ev_io_stop(loop, w);
    ev_break(loop, EVBREAK_ALL);
    return;
  }
  inlen += (size_t)n;
  char *nl;
  while ((nl = memchr(inbuf, '\n', inlen))) {
    *nl = '\0';
    command(loop, inbuf);
    size_t used = (size_t)(nl + 1 - inbuf);
    memmove(inbuf, nl + 1, inlen - used);
    inlen -= used;
  }
  if (inlen == sizeof(inbuf) - 1)
    inlen = 0; /* an absurd line: drop it */
}

static void watch_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  bool up = mx_presence_relay_up(relay);
  if (up != was_up)
    say(up ? "up" : "down");
  was_up = up;
}

static void term_cb(struct ev_loop *loop, ev_signal *w, int revents) {
  ev_break(loop, EVBREAK_ALL);
}

int main(int argc, char **argv) {
  mx_presence_relay_opts o = {0};
  const char *feed_url = NULL, *secret_file = NULL;
  char *secret = NULL;
  for (int i = 1; i + 1 < argc; i += 2) {
    const char *k = argv[i], *v = argv[i + 1];
    if (!strcmp(k, "--redis"))
      o.redis_url = v;
    else if (!strcmp(k, "--channel"))
      o.channel = v;
    else if (!strcmp(k, "--instance"))
      o.instance = v;
    else if (!strcmp(k, "--feed"))
      feed_url = v;
    else if (!strcmp(k, "--replication-url"))
      o.replication_url = v;
    else if (!strcmp(k, "--secret-file"))
      secret_file = v;
    else if (!strcmp(k, "--interval"))
      o.set_state_interval = atof(v);
    else if (!strcmp(k, "--end-min"))
      o.end_delay_min = atof(v);
    else if (!strcmp(k, "--end-max"))
      o.end_delay_max = atof(v);
    else {
      fprintf(stderr, "unknown option %s\n", k);
      return 64;
    }
  }
  mx_log_init(MX_LOG_INFO, NULL);
  signal(SIGPIPE, SIG_IGN);
  if (secret_file && mx_presence_relay_read_secret(secret_file, &secret))
    return 64;
  o.secret = secret;
  struct ev_loop *loop = ev_default_loop(0);
  mx_presence_relay_hooks hooks = {.keepalive = keepalive};
  relay = mx_presence_relay_new(loop, &o, &hooks);
  if (secret) {
    memset(secret, 0, strlen(secret));
    free(secret);
  }
  if (!relay)
    return 64;
  mx_redis_feed *feed = NULL;
  static const mx_redis_feed_ops feed_ops = {
      .on_message = feed_message, .on_up = feed_up, .on_down = feed_down};
  if (feed_url &&
      !(feed = mx_redis_feed_new(loop, feed_url, o.channel, &feed_ops, NULL)))
    return 64;
  ev_io in;
  ev_io_init(&in, stdin_cb, 0, EV_READ);
  ev_io_start(loop, &in);
  ev_timer watch;
  ev_timer_init(&watch, watch_cb, 0.05, 0.05);
  ev_timer_start(loop, &watch);
  ev_signal term;
  ev_signal_init(&term, term_cb, SIGTERM);
  ev_signal_start(loop, &term);
  ev_run(loop, 0);
  ev_io_stop(loop, &in);
  ev_timer_stop(loop, &watch);
  ev_signal_stop(loop, &term);
  int rv = mx_presence_relay_shutdown(relay, 5);
  say("shutdown %d", rv);
  mx_redis_feed_free(feed);
  mx_presence_relay_free(relay);
  ev_loop_destroy(loop);
  return 0;
}
