/*
 * mx_presence_relay: keeps the users of this node's SSE streams present
 * in Synapse the way Synapse's own sync workers do, instead of a /sync
 * per device every 25 s. sync/presence.c decides what to send and when;
 * this module sends it:
 *
 *  - USER_SYNC / CLEAR_USER_SYNC: PUBLISH on Synapse's replication channel
 *    over a Redis connection of its own (its own URL and credentials: the
 *    feed's connection stays subscribe-only). Whoever may publish there
 *    has worker-level trust in Synapse: docs/presence.md says what that
 *    grants and the Redis ACL for each connection.
 *  - set_state: POST /_synapse/replication/presence_set_state/<user> to
 *    Synapse's replication listener with worker_replication_secret, through
 *    the pooled upstream client (homeserver/upstream.h); or, when no listener
 *    is configured, the hub's keepalive /sync for the user (hooks).
 *
 * The hub tells it which (user, device) streams open and close, and the
 * replication feed hands it every line (REPLICATE re-announces) and its
 * reconnects. Without this module (no --presence-redis) nothing changes.
 */
#ifndef MX_PRESENCE_RELAY_H
#define MX_PRESENCE_RELAY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sync/presence.h"

struct ev_loop;

/* In-flight caps: past them the link is reset (and resynchronised) or
 * the set_state retried later. */
#define MX_PRESENCE_RELAY_MAX_PUBLISHES 100000
#define MX_PRESENCE_RELAY_MAX_CALLS 256
#define MX_PRESENCE_RELAY_MAX_SECRET 512

typedef struct mx_presence_relay mx_presence_relay;

typedef struct mx_presence_relay_hooks {
  /* Keepalive mode (no replication_url): one /sync?timeout=0 with
   * set_presence=presence ("online" or "unavailable") on behalf of user,
   * with the token of any of its streams. Report a failure with
   * mx_presence_relay_keepalive_failed. May be NULL in set_state mode. */
  void (*keepalive)(const char *user, size_t ulen, const char *presence,
                    void *ud);
  void *ud;
} mx_presence_relay_hooks;

typedef struct mx_presence_relay_opts {
  const char *redis_url;  /* redis://[USER:PASSWORD@]HOST:PORT, required */
  const char *channel;    /* Synapse's server_name, required */
  const char *instance;   /* NULL: mxsse-<hostname>-<pid> */
  /* http://HOST:PORT of a Synapse listener with the `replication`
   * resource; NULL: keepalive syncs through hooks. */
  const char *replication_url;
  const char *secret;     /* worker_replication_secret (copied, wiped) */
  double set_state_interval; /* 0: 45 s */
  double tick;               /* 0: 1 s */
  /* sync/presence.c delays; zero fields take its defaults. Tests
   * shorten them. */
  double end_delay_min, end_delay_max, announce_min, announce_max;
  double resync_spread;
  uint64_t seed;             /* 0: from the clock and pid */
} mx_presence_relay_opts;

typedef struct mx_presence_relay_stats {
  uint64_t published;       /* PUBLISH commands answered */
  uint64_t publish_errors;  /* refused (NOPERM...) or lost with the link */
  uint64_t dropped;         /* actions while the link was down */
  uint64_t calls, call_errors; /* presence_set_state requests */
  uint64_t reconnects;
  bool up;
} mx_presence_relay_stats;

/* Creates the relay and starts connecting. Strings are copied. Returns
 * NULL on invalid options (bad URL, instance or secret; set_state mode
 * without a secret is allowed: Synapse without worker_replication_secret)
 * or no memory; the reason is logged. */
mx_presence_relay *mx_presence_relay_new(struct ev_loop *loop,
                                         const mx_presence_relay_opts *opts,
                                         const mx_presence_relay_hooks *hooks);

/* Cancels everything (no callbacks, nothing published) and frees. Call
 * mx_presence_relay_shutdown first for a clean stop. NULL is fine. */
void mx_presence_relay_free(mx_presence_relay *r);

/* Clean shutdown: publishes CLEAR_USER_SYNC and runs the loop until Redis
 * acknowledged it or timeout seconds passed. Returns 0 when acknowledged,
 * MX_ERR_CLOSED when the link was down, MX_ERR_TIMEOUT. Call after the
 * main ev_run returned (it runs the loop itself). */
int mx_presence_relay_shutdown(mx_presence_relay *r, double timeout);

/* A stream of (user, device) opened / closed (state: its set_presence,
 * online or unavailable; streams with set_presence=offline are not
 * reported). open returns 0 when the relay keeps that device present
 * (the caller may skip its presence syncs for the stream while
 * mx_presence_relay_up), or a negative MX_ERR_* (ids that cannot be put
 * on a USER_SYNC line, caps): keep syncing for it. */
int mx_presence_relay_open(mx_presence_relay *r, const char *user,
                           size_t ulen, const char *device, size_t dlen,
                           mx_presence_state state);
void mx_presence_relay_close(mx_presence_relay *r, const char *user,
                             size_t ulen, const char *device, size_t dlen,
                             mx_presence_state state);

/* Every payload of the replication feed (borrowed), and its (re)subscribe. */
void mx_presence_relay_feed_line(mx_presence_relay *r, const char *line,
                                 size_t len);
void mx_presence_relay_feed_up(mx_presence_relay *r);

/* The keepalive /sync asked through hooks failed. */
void mx_presence_relay_keepalive_failed(mx_presence_relay *r,
                                        const char *user, size_t ulen);

/* True while publishing works (AUTH and PING answered). */
bool mx_presence_relay_up(const mx_presence_relay *r);

const char *mx_presence_relay_instance(const mx_presence_relay *r);
mx_presence_relay_stats mx_presence_relay_stats_get(const mx_presence_relay *r);
const mx_presence_stats *mx_presence_relay_logic_stats(const mx_presence_relay *r);

/* Reads a secret file: its first line, without the line end. Returns 0
 * and a malloc'ed *out, or MX_ERR_INVALID (unreadable, empty, longer than
 * MX_PRESENCE_RELAY_MAX_SECRET, or bytes outside 0x21-0x7e). The file
 * name may be logged, never the contents. */
int mx_presence_relay_read_secret(const char *path, char **out);

/* Percent-encodes a path segment (RFC 3986 unreserved kept) into out
 * (cap bytes, NUL-terminated). Returns the length or MX_ERR_LIMIT. */
int mx_presence_relay_escape(const char *s, size_t len, char *out,
                             size_t cap);

#endif
