/*
 * mx_redis_feed: the homeserver's replication feed, read from Redis
 * pub/sub. It only ever sends AUTH and SUBSCRIBE <channel>: the homeserver
 * trusts everything on that channel, so mxsse never publishes and never
 * touches keys (a Redis ACL user limited to +subscribe on the channel is
 * enough; see docs/replication.md).
 *
 * hiredis 0.14 cannot PING a subscribed connection, so a dead link is
 * found by TCP keepalive and TCP_USER_TIMEOUT. A lost link is retried
 * with capped, jittered backoff; every (re)subscription is reported
 * through on_up, because rows published while we were away are lost and
 * the caller must resynchronise (the safety net).
 */
#ifndef MX_REDIS_FEED_H
#define MX_REDIS_FEED_H

#include <stdbool.h>
#include <stddef.h>

#include "common/error.h"

struct ev_loop;

typedef struct mx_redis_feed mx_redis_feed;

typedef struct mx_redis_feed_ops {
  /* One published message (a replication command line). The bytes are
   * borrowed for the call. */
  void (*on_message)(const char *payload, size_t len, void *ud);
  /* Subscribed: after the first connection and after every reconnect. */
  void (*on_up)(void *ud);
  /* The link was lost (or could not be made). */
  void (*on_down)(void *ud);
} mx_redis_feed_ops;

/* Parses redis://[[USER]:PASSWORD@]HOST:PORT[/...] into its parts
 * (strings malloc'ed, NULL when absent). Returns 0 or MX_ERR_INVALID. */
/* TCP keepalive (10 s idle, 5 s apart, 3 probes) and a user timeout
 * (unacknowledged writes end the link) on a Redis connection's socket:
 * hiredis 0.14 has neither, and PING on a subscribed link is broken.
 * Shared by every Redis connection mxsse makes. */
void mx_redis_tune_socket(int fd, unsigned user_timeout_ms);

int mx_redis_feed_parse_url(const char *url, char **host, int *port,
                            char **user, char **password) MX_MUST_CHECK;

/* Starts connecting. url as above; channel copied. Returns NULL on a bad
 * URL or no memory. */
mx_redis_feed *mx_redis_feed_new(struct ev_loop *loop, const char *url,
                                 const char *channel,
                                 const mx_redis_feed_ops *ops, void *ud);

/* Disconnects (no callbacks) and frees. */
void mx_redis_feed_free(mx_redis_feed *f);

/* True while subscribed. */
bool mx_redis_feed_is_up(const mx_redis_feed *f);

#endif
