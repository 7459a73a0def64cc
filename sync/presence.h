/*
 * mx_presence: when to tell Synapse that a device is syncing here, and
 * when to refresh its user's presence, so that a user with an open SSE
 * stream shows what a long-polling client shows (online, currently
 * active) without a /sync per device. The timing logic only: events and
 * the current time in, actions out; no socket, no clock, no randomness
 * but a seeded generator, so every sequence replays exactly (unit tests,
 * fuzzing). homeserver/presence_relay.c carries the actions out (Redis
 * PUBLISH, Synapse's presence_set_state over HTTP, or a keepalive /sync).
 * docs/presence.md has the Synapse side and the measured timings.
 *
 * Rules, per device (user, device id) of this node:
 *  - its first stream opens: USER_SYNC start at once (link up), or 2 s
 *    after the set_state when its user opens with it (Synapse loses a
 *    set_state racing with a start for a user it has no presence for);
 *  - its last stream closes: USER_SYNC end, carrying the close time, a
 *    random 10-20 s later; a stream of the device opening before that
 *    cancels it (nothing is sent);
 *  - while open (or closing): start again every 60-120 s (random per
 *    device, so that re-announcements are spread, never one burst), and
 *    within a few seconds after the publishing link comes (back) up, the
 *    feed reconnects, or REPLICATE shows that a Synapse process
 *    (re)subscribed (it lost its in-memory syncing sets; its users'
 *    set_states then follow within 20 s, see presence.c);
 *  - the link comes up: CLEAR_USER_SYNC <instance> first (drops whatever
 *    an earlier run or a lost `end` left behind); shutdown: the same.
 * Per user, while any of its devices has an open stream: one set_state
 * (or, without Synapse's replication listener, one keepalive /sync) at
 * once when the user opens, then every set_state_interval (45 s: Synapse
 * counts a user currently active for 60 s after the last one). The
 * strongest state of the user's open streams is sent (online wins over
 * unavailable); streams with set_presence=offline are not reported here.
 *
 * A device or user id that cannot be carried on a USER_SYNC line (space,
 * control or non-ASCII bytes, the device id "None", too long) is refused:
 * the caller keeps its keepalive syncs for that stream.
 */
#ifndef MX_PRESENCE_H
#define MX_PRESENCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Caps (they belong in common/limits.h; kept here until they move). */
#define MX_PRESENCE_MAX_ID 255        /* bytes in a user or device id */
#define MX_PRESENCE_MAX_INSTANCE 64   /* bytes in the instance id */
#define MX_PRESENCE_MAX_DEVICES 1000000
/* Longest command line: "USER_SYNC " instance user device "start" ms. */
#define MX_PRESENCE_MAX_LINE                                                 \
  (10 + MX_PRESENCE_MAX_INSTANCE + 1 + 2 * (MX_PRESENCE_MAX_ID + 1) + 6 + 21)

typedef enum mx_presence_state {
  MX_PRESENCE_UNAVAILABLE = 0,
  MX_PRESENCE_ONLINE = 1,
} mx_presence_state;

typedef enum mx_presence_kind {
  MX_PRESENCE_START = 0, /* publish USER_SYNC ... start */
  MX_PRESENCE_END,       /* publish USER_SYNC ... end */
  MX_PRESENCE_CLEAR,     /* publish CLEAR_USER_SYNC */
  MX_PRESENCE_SET_STATE, /* presence_set_state(user, device, state) */
  MX_PRESENCE_KEEPALIVE, /* one /sync?timeout=0&set_presence=state for user */
} mx_presence_kind;

/* One thing to do. Strings are borrowed for the emit call only. */
typedef struct mx_presence_action {
  mx_presence_kind kind;
  const char *user; /* NULL for CLEAR */
  size_t ulen;
  const char *device; /* START, END; SET_STATE and KEEPALIVE: one open
                         device of the user (the one whose state is sent) */
  size_t dlen;
  mx_presence_state state; /* SET_STATE, KEEPALIVE */
  int64_t ms;              /* START: now; END: when the last stream closed
                              (milliseconds, the clock `now` is given in) */
} mx_presence_action;

/* Called synchronously from the event functions below; must not call
 * back into the same mx_presence. */
typedef void (*mx_presence_emit_fn)(const mx_presence_action *a, void *ud);

typedef struct mx_presence_opts {
  const char *instance;      /* required, copied: 1-64 bytes 0x21-0x7e */
  bool keepalive_sync;       /* KEEPALIVE instead of SET_STATE */
  double end_delay_min;      /* seconds (default 10) */
  double end_delay_max;      /* (default 20) */
  double announce_min;       /* seconds between starts (default 60) */
  double announce_max;       /* (default 120) */
  double resync_spread;      /* starts after a resync within (default 5) */
  double resync_state_spread; /* set_states after a resync (default 20) */
  double set_state_interval; /* seconds (default 45) */
  double set_state_retry;    /* after a failed set_state (default 5) */
  double start_delay;        /* a new user's first start after its
                                set_state (default 2; see presence.c) */
  size_t max_devices;        /* 0: MX_PRESENCE_MAX_DEVICES */
  uint64_t seed;             /* of the delay generator */
} mx_presence_opts;

typedef struct mx_presence_stats {
  uint64_t starts, ends, clears, set_states, keepalives;
  uint64_t set_state_failures;
  uint64_t refused;   /* open() of ids that cannot be encoded, or over cap */
  uint64_t echoes;    /* our own USER_SYNC/CLEAR_USER_SYNC seen on the feed */
  uint64_t foreign;   /* other instances' USER_SYNC/CLEAR_USER_SYNC */
  uint64_t replicates;
  uint64_t resyncs;
  size_t users, devices; /* tracked now (closing ones included) */
} mx_presence_stats;

typedef struct mx_presence mx_presence;

/* Creates the logic. opts is copied (instance included); zero fields take
 * the defaults. The link starts down. Returns 0, MX_ERR_INVALID (bad
 * instance id or delays: min > max, negative) or MX_ERR_NOMEM; *out is
 * set only on 0. */
int mx_presence_new(mx_presence **out, const mx_presence_opts *opts,
                    mx_presence_emit_fn emit, void *ud);

/* Forgets everything, emits nothing. NULL is fine. */
void mx_presence_free(mx_presence *p);

/* True when user/device can be carried on a USER_SYNC line. */
bool mx_presence_id_ok(const char *id, size_t len, bool is_device);

/* A stream of (user, device) with the given state opened. Returns 0 (the
 * device is relayed: the caller may stop syncing for its presence),
 * MX_ERR_INVALID (ids cannot be encoded), MX_ERR_LIMIT (max_devices) or
 * MX_ERR_NOMEM; on error nothing is tracked. */
int mx_presence_open(mx_presence *p, const char *user, size_t ulen,
                     const char *device, size_t dlen, mx_presence_state state,
                     double now);

/* A stream opened with mx_presence_open (same ids and state) closed.
 * Returns 0, or MX_ERR_NOTFOUND when no such stream is open. */
int mx_presence_close(mx_presence *p, const char *user, size_t ulen,
                      const char *device, size_t dlen, mx_presence_state state,
                      double now);

/* Runs what is due at now (the caller ticks about once a second). */
void mx_presence_tick(mx_presence *p, double now);

/* The publishing link is up (emits CLEAR, then schedules every device's
 * start within resync_spread) or down (publish actions stop; closing
 * devices whose end falls due meanwhile are dropped: the CLEAR on the
 * next link-up covers them). */
void mx_presence_link(mx_presence *p, bool up, double now);

/* Synapse may have lost its syncing sets (the feed reconnected, or a
 * REPLICATE was seen): every device's start within resync_spread, every
 * open user's set_state within resync_state_spread. */
void mx_presence_resync(mx_presence *p, double now);

/* Lines of the replication feed this module cares about. */
typedef enum mx_presence_line {
  MX_PRESENCE_LINE_OTHER = 0,  /* anything else (RDATA, POSITION, ...) */
  MX_PRESENCE_LINE_REPLICATE,  /* "REPLICATE" (a process subscribed) */
  MX_PRESENCE_LINE_ECHO,       /* USER_SYNC/CLEAR_USER_SYNC of our instance */
  MX_PRESENCE_LINE_FOREIGN,    /* USER_SYNC/CLEAR_USER_SYNC of another */
} mx_presence_line;

/* Classifies one feed payload (any bytes). */
mx_presence_line mx_presence_classify(const mx_presence *p, const char *line,
                                      size_t len);

/* Feeds one replication payload: REPLICATE runs mx_presence_resync, our
 * own echoes and other instances' presence commands are counted and
 * otherwise ignored. Returns the classification. */
mx_presence_line mx_presence_feed_line(mx_presence *p, const char *line,
                                       size_t len, double now);

/* The set_state (or keepalive sync) for user failed: retried after
 * set_state_retry instead of a whole interval. */
void mx_presence_set_state_failed(mx_presence *p, const char *user,
                                  size_t ulen, double now);

/* Clean shutdown: emits CLEAR (link up) and forgets every device. */
void mx_presence_shutdown(mx_presence *p);

/* Formats a START, END or CLEAR action as the command line to PUBLISH
 * (no newline) into buf (cap bytes, NUL-terminated). Returns its length,
 * MX_ERR_INVALID for another kind, or MX_ERR_LIMIT when cap is short
 * (MX_PRESENCE_MAX_LINE + 1 is always enough). */
int mx_presence_format(const mx_presence *p, const mx_presence_action *a,
                       char *buf, size_t cap);

/* The instance id (NUL-terminated, valid until free). */
const char *mx_presence_instance(const mx_presence *p);

const mx_presence_stats *mx_presence_stats_get(const mx_presence *p);

/* True when (user, device) has an open stream here (tests, metrics). */
bool mx_presence_is_open(const mx_presence *p, const char *user, size_t ulen,
                         const char *device, size_t dlen);

#endif
