/*
 * mxsse: HTTP/2 Server-Sent-Events sync streams (MSC2108) in front of a
 * Matrix homeserver.
 */
#include <ev.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/random.h>

#include "common/config.h"
#include "common/error.h"
#include "common/log.h"
#include "common/redis_feed.h"
#include "common/service.h"
#include "common/strmap.h"
#include "common/sync_upstream.h"
#include "common/upstream.h"
#include "h2/server.h"
#include "sync/hub.h"
#include "sync/replication.h"
#include "sync/sse_event.h"

#define EXIT_USAGE 64

/* The Redis connection feeds the replication adapter. */
static void feed_message(const char *payload, size_t len, void *ud) {
  mx_replication_feed(ud, payload, len);
}
static void feed_up(void *ud) {
  mx_replication_up(ud);
  mx_service_feed_up(); /* READY=1 waits for the first one */
}
static void feed_down(void *ud) { mx_replication_down(ud); }

int main(int argc, char **argv) {
  mx_config cfg;
  mx_config_defaults(&cfg);
  int rv = mx_config_load(&cfg, argc, argv, stdout, stderr);
  if (rv != 0) {
    mx_config_free(&cfg);
    return rv > 0 ? EXIT_SUCCESS : EXIT_USAGE;
  }
  mx_log_level level = MX_LOG_INFO;
  if (cfg.log_level)
    mx_log_level_parse(cfg.log_level, &level);
  mx_log_init(level, NULL);

  /* Hash tables are keyed by peer data: seed them unpredictably. */
  uint64_t seed[2] = {0, 0};
  if (getrandom(seed, sizeof(seed), 0) == (ssize_t)sizeof(seed))
    mx_hash_seed(seed[0], seed[1]);
  signal(SIGPIPE, SIG_IGN);

  struct ev_loop *loop = ev_default_loop(EVFLAG_AUTO);
  mx_server server;
  rv = mx_server_init(&server, loop, &cfg);
  if (rv != 0) {
    mx_server_free(&server);
    mx_config_free(&cfg);
    return rv == MX_ERR_TLS ? EXIT_USAGE : EXIT_FAILURE;
  }
  mx_upstream_opts uopts = {
      .connect_timeout_ms = cfg.upstream_connect_timeout * 1000,
      .max_connections = cfg.upstream_max_connections,
  };
  server.upstream = mx_upstream_new(loop, cfg.upstream, &uopts);
  if (!server.upstream) {
    MX_LOG_ERR("upstream.failed", "url=%s", cfg.upstream);
    mx_server_free(&server);
    mx_config_free(&cfg);
    return EXIT_FAILURE;
  }
  mx_sync_fetcher fetcher;
  mx_sync_upstream_fetcher(server.upstream, &fetcher);
  mx_sync_hub_opts hopts = {
      .longpoll_timeout_ms = cfg.longpoll_timeout_ms,
      .replay_max_bytes = (size_t)cfg.replay_max_bytes,
      .replay_max_age = (double)cfg.replay_max_age,
      /* 0 means "answer at once" here, negative in the hub */
      .start_retry_window = cfg.start_retry_window ? (double)cfg.start_retry_window : -1,
      .replication = cfg.replication != NULL,
      .longpoll_fallback = cfg.longpoll_fallback,
      .max_fetches = cfg.max_upstream_fetches,
      .wake_debounce = (double)cfg.wake_debounce_ms / 1000.0,
  };
  mx_replication *repl = NULL;
  if (cfg.replication && !(repl = mx_replication_new(&hopts.hooks))) {
    MX_LOG_ERR("replication.failed", "error=\"out of memory\"");
    return EXIT_FAILURE;
  }
  mx_sync_hub *hub = mx_sync_hub_new(loop, &hopts, &fetcher);
  if (!hub) {
    MX_LOG_ERR("sync.failed", "error=\"out of memory\"");
    mx_server_free(&server);
    mx_upstream_free(server.upstream);
    mx_config_free(&cfg);
    return EXIT_FAILURE;
  }
  server.sync = hub;
  mx_redis_feed *feed = NULL;
  if (repl) {
    mx_replication_attach(repl, hub, loop);
    static const mx_redis_feed_ops feed_ops = {
        .on_message = feed_message, .on_up = feed_up, .on_down = feed_down};
    feed = mx_redis_feed_new(loop, cfg.replication, cfg.server_name,
                             &feed_ops, repl);
    if (!feed) {
      MX_LOG_ERR("replication.failed", "url=\"invalid\"");
      return EXIT_FAILURE;
    }
  }
  srandom((unsigned)(seed[0] ^ seed[1]));
  MX_LOG_INFO("start", "version=%s upstream=%s", PACKAGE_VERSION,
              cfg.upstream);
  mx_service_start(loop, feed != NULL); /* READY=1, watchdog */
  ev_run(loop, 0);

  /* Connections first (their handlers close sync streams and cancel
   * upstream transfers), then the hub, then the upstream client. */
  mx_server_free(&server);
  mx_redis_feed_free(feed);
  mx_sync_hub_free(hub);
  mx_replication_free(repl);
  mx_upstream_free(server.upstream);
  mx_sse_event_shutdown();
  ev_loop_destroy(loop);
  mx_config_free(&cfg);
  MX_LOG_INFO("exit", NULL);
  return EXIT_SUCCESS;
}
