/*
 * mx_sync_hub: turns upstream /sync answers into SSE event sequences.
 *
 * A stream is one client's SSE sync stream: an access token, its /sync
 * parameters and a position (the next_batch of the last event the client
 * has). Streams with the same token and parameters share a feed key;
 * streams of one feed waiting at the same position share one upstream
 * fetch and one encoded event (two tabs of a device cost one /sync).
 *
 * Rules the hub keeps:
 *  - a stream's next batch is fetched only after its client took the
 *    previous one (mx_sync_stream_taken);
 *  - every delivered batch is kept in the replay buffer under
 *    (feed key, since), because fetching the batch after it acknowledges
 *    its to-device messages upstream: a client resuming from an older id
 *    gets it from memory;
 *  - empty answers (next_batch == since) produce no event;
 *  - transient failures (transfer errors, 5xx, 429) are retried with
 *    capped, jittered backoff and the same parameters, once the stream has
 *    started; before that they are the stream's HTTP answer.
 *
 * How a stream waits for its next batch depends on the mode: a long-poll
 * fetch (timeout=T), or, with a replication feed, parking until
 * mx_sync_hub_wake_user names its user (then a timeout=0 fetch). Parked
 * streams that asked for presence get a timeout=0 sync every
 * presence_interval, which keeps their user online as long-polling
 * would.
 *
 * The hub never touches sockets: upstream requests go through the
 * mx_hs_api given at creation (sync/homeserver_api.h). It emits batches
 * (sync/batch.h), not bytes: the wire encoding is the caller's. It uses
 * libev timers for backoff.
 */
#ifndef MX_SYNC_HUB_H
#define MX_SYNC_HUB_H

#include <stdbool.h>
#include <stddef.h>

#include "sync/batch.h"
#include "sync/homeserver_api.h"
#include "sync/replay.h"

struct ev_loop;

/* --- the hub ---------------------------------------------------------- */

typedef struct mx_sync_hub mx_sync_hub;
typedef struct mx_sync_stream mx_sync_stream;

typedef struct mx_sync_hub_hooks {
  /* A user's first stream opened (rooms: the joined_rooms JSON answer)
   * or last stream closed: the replication adapter keeps its room index
   * from these. */
  void (*user_open)(const char *user, size_t len, const char *rooms,
                    size_t rlen, void *ud);
  void (*user_close)(const char *user, size_t len, void *ud);
  /* A non-empty batch for user (initial: no since): membership changes
   * the index should learn. */
  void (*batch)(const char *user, size_t len, const char *body, size_t blen,
                bool initial, void *ud);
  void *ud;
} mx_sync_hub_hooks;

typedef struct mx_sync_hub_opts {
  long longpoll_timeout_ms; /* timeout= of long-polls */
  /* Replication mode: streams park between batches and are woken by
   * mx_sync_hub_wake_user/_all instead of long-polling. */
  bool replication;
  bool longpoll_fallback;   /* long-poll while the feed is down */
  long max_fetches;         /* concurrent woken fetches (default 16) */
  double wake_debounce;     /* seconds; 0: the wakes of one loop iteration */
  /* seconds a background wake waits before it gets a share of the slots
   * while urgent wakes queue (sync/park.c); 0: MX_SYNC_BACKGROUND_MAX_WAIT */
  double background_max_wait;
  double presence_interval; /* seconds between presence syncs (25) */
  size_t replay_max_bytes;
  double replay_max_age;    /* seconds */
  /* A replay store of the caller's (sync/replay.h), e.g. one shared by
   * several nodes; NULL: an in-memory store sized by the two fields
   * above. The hub takes ownership (also when creating it fails). */
  const mx_replay_store_ops *replay_ops;
  void *replay_store;
  double backoff_base;      /* seconds, first retry delay (default 0.5) */
  /* Before a stream has started, transient failures are retried for this
   * long (seconds) before they become its HTTP answer: a blip must not
   * end an EventSource for good. Negative: answer at once. Default 5. */
  double start_retry_window;
  double backoff_max;       /* seconds (default 30) */
} mx_sync_hub_opts;

typedef struct mx_sync_stream_ops {
  /* The first answer: status 200 starts the SSE response (events may
   * follow at once); anything else is the HTTP error to send, with the
   * homeserver's (or our) Matrix error body, and the stream is over: the
   * caller closes it. */
  void (*on_start)(mx_sync_stream *st, int status, const char *body,
                   size_t len, void *ud);
  /* The next batch (borrowed: the caller takes a reference if it keeps
   * it). The caller calls mx_sync_stream_taken() once the client has
   * taken it. */
  void (*on_event)(mx_sync_stream *st, mx_batch *batch, void *ud);
  /* A fatal error after the start (the token was logged out...): the
   * Matrix error body (borrowed); the caller sends it as the stream's
   * last words, ends the response and closes the stream. */
  void (*on_fatal)(mx_sync_stream *st, const char *body, size_t len,
                   void *ud);
} mx_sync_stream_ops;

typedef struct mx_sync_stream_params {
  const char *token;
  const char *query;      /* normalised forwarded parameters */
  const char *since;      /* resume position, or NULL */
  bool full_state;        /* first batch only */
  const char *peer_ip;
  const char *user_agent;
} mx_sync_stream_params;

/* Creates a hub. The api table is copied. Returns NULL on no memory. */
mx_sync_hub *mx_sync_hub_new(struct ev_loop *loop,
                             const mx_sync_hub_opts *opts,
                             const mx_hs_api *api);

/* Installs the replication adapter's hooks (copied; NULL removes them). */
void mx_sync_hub_set_hooks(mx_sync_hub *hub, const mx_sync_hub_hooks *hooks);

/* Closes every stream (no callbacks) and frees the hub. */
void mx_sync_hub_free(mx_sync_hub *hub);

/* Opens a stream; callbacks start from the loop (never from inside this
 * call). Strings are copied. Returns NULL on no memory. */
mx_sync_stream *mx_sync_stream_open(mx_sync_hub *hub,
                                    const mx_sync_stream_params *p,
                                    const mx_sync_stream_ops *ops, void *ud);

/* The client took the last event: the stream may get its next one. */
void mx_sync_stream_taken(mx_sync_stream *st);

/* Closes a stream; no callback follows. Upstream work nobody else waits
 * for is cancelled. */
void mx_sync_stream_close(mx_sync_stream *st);

/* Replication mode. The feed is up (streams park) or down (streams
 * long-poll, if the fallback is on). Going up runs the safety net. */
void mx_sync_hub_set_feed_up(mx_sync_hub *hub, bool up);

/* Something changed for user: its streams fetch (timeout=0) soon. */
void mx_sync_hub_wake_user(mx_sync_hub *hub, const char *user, size_t len);

/* The same for a change that can wait a little (a room-mate's presence,
 * device list or profile): its fetches go after the urgent wakes queued
 * for a slot (sync/park.c says how long they may wait). */
void mx_sync_hub_wake_user_background(mx_sync_hub *hub, const char *user,
                                      size_t len);

/* The safety net: every stream fetches (rows may have been missed), as
 * background wakes: streams with news of their own go first. */
void mx_sync_hub_wake_all(mx_sync_hub *hub, int reason);

/* Replication mode: a homeserver call (req->call and its own fields) on
 * behalf of user, with the token of one of their streams (the room mates'
 * joined_members lookups; tokens never leave the hub). done is called
 * once, later, unless cancelled. Returns a handle for
 * mx_sync_hub_get_cancel, or NULL when the user has no stream here or the
 * call cannot be made. */
void *mx_sync_hub_get_as(mx_sync_hub *hub, const char *user, size_t len,
                         const mx_hs_request *req, mx_hs_done_fn done,
                         void *ud);
void mx_sync_hub_get_cancel(mx_sync_hub *hub, void *handle);

/* The position of the last event delivered (or the start position). */
const char *mx_sync_stream_position(const mx_sync_stream *st);

/* --- a presence relay (homeserver/presence_relay.c), when configured -- */

/* The hub tells the relay which (user, device) has streams here that show
 * presence, and leaves those streams' keep-online syncs to it while it is
 * up (its USER_SYNC and set_state keep the user online instead). */
typedef struct mx_sync_presence_ops {
  /* A stream of (user, device) that shows presence (online: set_presence
   * online, else unavailable) has its user known. Returns 0 when the
   * relay takes it (the stream is then relayed), anything else when it
   * cannot (an id it cannot encode): the stream keeps syncing. */
  int (*open)(void *ud, const char *user, size_t ulen, const char *device,
              size_t dlen, bool online);
  /* A relayed stream closed (the same arguments as its open). */
  void (*close)(void *ud, const char *user, size_t ulen, const char *device,
                size_t dlen, bool online);
  /* Whether the relay works now; while it does not, relayed streams keep
   * their users online with syncs, as without a relay. */
  bool (*up)(void *ud);
  void *ud;
} mx_sync_presence_ops;

/* Installs the relay's interface (copied; NULL removes it). Before any
 * stream opens. */
void mx_sync_hub_set_presence(mx_sync_hub *hub,
                              const mx_sync_presence_ops *ops);

/* The relay's keepalive mode (no replication listener configured): one
 * timeout=0 sync with the stream's set_presence for user, on one of the
 * user's presence streams (reason presence). Returns 0, or
 * MX_ERR_NOTFOUND when the user has no such stream here. */
int mx_sync_hub_presence_keepalive(mx_sync_hub *hub, const char *user,
                                   size_t len);

/* True when the stream resumed from a position whose batch the replay
 * store had once and no longer has (history gone: to-device messages it
 * carried may be lost); the front tells the client. Valid from on_start. */
bool mx_sync_stream_resume_gap(const mx_sync_stream *st);

/* Streams and fetches in progress (metrics, tests). */
size_t mx_sync_hub_streams(const mx_sync_hub *hub);
size_t mx_sync_hub_fetches(const mx_sync_hub *hub);

#endif
