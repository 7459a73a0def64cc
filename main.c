/*
 * mxsse: HTTP/2 Server-Sent-Events sync streams (MSC2108) in front of a
 * Matrix homeserver.
 */
#include <ev.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "common/config.h"
#include "common/error.h"
#include "common/log.h"
#include "common/service.h"
#include "common/strmap.h"
#include "h2/server.h"
#include "h2/sse_event.h"
#include "homeserver/client_api.h"
#include "homeserver/presence_relay.h"
#include "homeserver/redis_feed.h"
#include "homeserver/redis_replay.h"
#include "homeserver/upstream.h"
#include "sync/hub.h"
#include "sync/replication.h"

#define EXIT_USAGE 64

/* Everything the daemon runs, wired in dependency order: the homeserver
 * client, the hub on it, the replication adapter and its feed (if
 * configured), the client-facing server on top. */
typedef struct mxsse_daemon {
  struct ev_loop *loop;
  mx_server server;
  bool server_init;
  mx_upstream *upstream;
  mx_hs_api api;
  mx_sync_hub *hub;
  mx_replication *repl;
  mx_redis_feed *feed;
  mx_presence_relay *relay;
} mxsse_daemon;

/* The Redis connection feeds the replication adapter, and the presence
 * relay (REPLICATE: Synapse restarted, re-announce). */
static void feed_message(const char *payload, size_t len, void *ud) {
  mxsse_daemon *d = ud;
  mx_replication_feed(d->repl, payload, len);
  if (d->relay)
    mx_presence_relay_feed_line(d->relay, payload, len);
}
static void feed_up(void *ud) {
  mxsse_daemon *d = ud;
  mx_replication_up(d->repl);
  if (d->relay)
    mx_presence_relay_feed_up(d->relay);
  mx_service_feed_up(); /* READY=1 waits for the first one */
}
static void feed_down(void *ud) {
  mxsse_daemon *d = ud;
  mx_replication_down(d->repl);
}

/* The hub and the presence relay, wired both ways. */
static int relay_open(void *ud, const char *user, size_t ulen,
                      const char *device, size_t dlen, bool online) {
  mxsse_daemon *d = ud;
  return mx_presence_relay_open(d->relay, user, ulen, device, dlen,
                                online ? MX_PRESENCE_ONLINE
                                       : MX_PRESENCE_UNAVAILABLE);
}
static void relay_close(void *ud, const char *user, size_t ulen,
                        const char *device, size_t dlen, bool online) {
  mxsse_daemon *d = ud;
  mx_presence_relay_close(d->relay, user, ulen, device, dlen,
                          online ? MX_PRESENCE_ONLINE
                                 : MX_PRESENCE_UNAVAILABLE);
}
static bool relay_up(void *ud) {
  return mx_presence_relay_up(((mxsse_daemon *)ud)->relay);
}
static void relay_keepalive(const char *user, size_t ulen,
                            const char *presence, void *ud) {
  mxsse_daemon *d = ud;
  if (mx_sync_hub_presence_keepalive(d->hub, user, ulen))
    mx_presence_relay_keepalive_failed(d->relay, user, ulen);
}

/* The presence relay, when --presence-redis is set. Returns 0 or an exit
 * status (logged). */
static int relay_init(mxsse_daemon *d, const mx_config *cfg) {
  char *secret = NULL;
  if (cfg->presence_replication_secret_file &&
      mx_presence_relay_read_secret(cfg->presence_replication_secret_file,
                                    &secret)) {
    MX_LOG_ERR("presence.failed", "error=\"unreadable secret file\"");
    return EXIT_USAGE;
  }
  mx_presence_relay_opts ro = {
      .redis_url = cfg->presence_redis,
      .channel = cfg->server_name,
      .instance = cfg->presence_instance,
      .replication_url = cfg->presence_replication_url,
      .secret = secret,
      .set_state_interval = (double)cfg->presence_interval,
  };
  mx_presence_relay_hooks hooks = {.keepalive = relay_keepalive, .ud = d};
  d->relay = mx_presence_relay_new(d->loop, &ro, &hooks);
  if (secret) {
    explicit_bzero(secret, strlen(secret));
    free(secret);
  }
  if (!d->relay) {
    MX_LOG_ERR("presence.failed", "error=\"invalid settings\"");
    return EXIT_USAGE;
  }
  mx_sync_presence_ops ops = {.open = relay_open,
                              .close = relay_close,
                              .up = relay_up,
                              .ud = d};
  mx_sync_hub_set_presence(d->hub, &ops);
  return 0;
}

/* Frees what daemon_init made, in reverse order: connections first (their
 * handlers close sync streams and cancel upstream transfers), then the
 * feed, the adapter, the hub and the upstream client. */
static void daemon_free(mxsse_daemon *d) {
  if (d->server_init)
    mx_server_free(&d->server);
  /* Synapse forgets this node's devices at once (CLEAR_USER_SYNC). */
  if (d->relay)
    mx_presence_relay_shutdown(d->relay, 2.0);
  mx_redis_feed_free(d->feed);
  mx_replication_free(d->repl);
  mx_sync_hub_free(d->hub);
  mx_presence_relay_free(d->relay);
  mx_upstream_free(d->upstream);
  mx_sse_event_shutdown();
}

/* Returns 0, or the process exit status of a failure (logged). */
static int daemon_init(mxsse_daemon *d, struct ev_loop *loop,
                       const mx_config *cfg) {
  d->loop = loop;
  int rv = mx_server_init(&d->server, loop, cfg);
  d->server_init = true;
  if (rv != 0)
    return rv == MX_ERR_TLS ? EXIT_USAGE : EXIT_FAILURE;
  mx_upstream_opts uopts = {
      .connect_timeout_ms = cfg->upstream_connect_timeout * 1000,
      .max_connections = cfg->upstream_max_connections,
  };
  d->upstream = mx_upstream_new(loop, cfg->upstream, &uopts);
  if (!d->upstream) {
    MX_LOG_ERR("upstream.failed", "url=%s", cfg->upstream);
    return EXIT_FAILURE;
  }
  mx_client_api_init(&d->api, d->upstream);
  mx_sync_hub_opts hopts = {
      .longpoll_timeout_ms = cfg->longpoll_timeout_ms,
      .replay_max_bytes = (size_t)cfg->replay_max_bytes,
      .replay_max_age = (double)cfg->replay_max_age,
      /* 0 means "answer at once" here, negative in the hub */
      .start_retry_window =
          cfg->start_retry_window ? (double)cfg->start_retry_window : -1,
      .replication = cfg->replication != NULL,
      .longpoll_fallback = cfg->longpoll_fallback,
      .max_fetches = cfg->max_upstream_fetches,
      .wake_debounce = (double)cfg->wake_debounce_ms / 1000.0,
  };
  if (cfg->replay_store) {
    /* Shared by every node behind the balancer; the hub owns it. */
    mx_redis_replay_opts ropts = {
        .url = cfg->replay_store,
        .prefix = cfg->replay_store_prefix,
        .max_age = (double)cfg->replay_max_age,
        .marker_age = (double)cfg->replay_store_marker_age,
        .max_batch = (size_t)cfg->replay_store_max_batch,
    };
    hopts.replay_ops = &mx_redis_replay_ops;
    hopts.replay_store = mx_redis_replay_new(loop, &ropts);
    if (!hopts.replay_store) {
      MX_LOG_ERR("replay.failed", "url=\"invalid\"");
      return EXIT_USAGE;
    }
  }
  d->hub = mx_sync_hub_new(loop, &hopts, &d->api);
  if (!d->hub) {
    MX_LOG_ERR("sync.failed", "error=\"out of memory\"");
    return EXIT_FAILURE;
  }
  d->server.upstream = d->upstream;
  d->server.sync = d->hub;
  if (!cfg->replication)
    return 0;
  d->repl = mx_replication_new(d->hub, loop);
  if (!d->repl) {
    MX_LOG_ERR("replication.failed", "error=\"out of memory\"");
    return EXIT_FAILURE;
  }
  if (cfg->presence_redis && (rv = relay_init(d, cfg)))
    return rv;
  static const mx_redis_feed_ops feed_ops = {
      .on_message = feed_message, .on_up = feed_up, .on_down = feed_down};
  d->feed = mx_redis_feed_new(loop, cfg->replication, cfg->server_name,
                              &feed_ops, d);
  if (!d->feed) {
    MX_LOG_ERR("replication.failed", "url=\"invalid\"");
    return EXIT_FAILURE;
  }
  return 0;
}

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
  srandom((unsigned)(seed[0] ^ seed[1]));
  signal(SIGPIPE, SIG_IGN);

  struct ev_loop *loop = ev_default_loop(EVFLAG_AUTO);
  mxsse_daemon d = {0};
  int status = daemon_init(&d, loop, &cfg);
  if (status == 0) {
    MX_LOG_INFO("start", "version=%s upstream=%s", PACKAGE_VERSION,
                cfg.upstream);
    mx_service_start(loop, d.feed != NULL); /* READY=1, watchdog */
    ev_run(loop, 0);
  }
  daemon_free(&d);
  ev_loop_destroy(loop);
  mx_config_free(&cfg);
  if (status == 0)
    MX_LOG_INFO("exit", NULL);
  return status ? status : EXIT_SUCCESS;
}
