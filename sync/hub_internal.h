/*
 * The sync hub's private structures, shared by its parts:
 *
 *   hub.c       the hub and its streams: the public API, the runner that
 *               advances streams from the loop, delivery and answers;
 *   fetch.c     fetches shared by the streams of one feed and position:
 *               the request, retry with backoff, the answer's handling,
 *               the replay store in between;
 *   identity.c  who a token belongs to (replication mode);
 *   park.c      the replication policy: parked streams, wakes, the
 *               woken-fetch cap and debounce, feed up/down, presence.
 *
 * How a started stream waits for its next batch is the policy's choice
 * (mx_sync_policy below): the long-poll policy always long-polls; the
 * replication policy parks the stream until a wake.
 *
 * Not for use outside sync/hub*.c, sync/fetch.c, sync/identity.c and
 * sync/park.c.
 */
#ifndef MX_SYNC_HUB_INTERNAL_H
#define MX_SYNC_HUB_INTERNAL_H

#include <ev.h>
#include <stdbool.h>

#include "common/buf.h"
#include "common/list.h"
#include "common/strmap.h"
#include "sync/batch.h"
#include "sync/hub.h"
#include "sync/replay.h"

#define FEED_KEY_LEN 64 /* hex SHA-256 */

typedef enum { FETCH_IMMEDIATE, FETCH_LONGPOLL } fetch_kind;

typedef struct fetch fetch;
typedef struct identity identity;

/* Who a token belongs to, resolved once per token in replication mode
 * (account/whoami, then joined_rooms to seed the room index). */
struct identity {
  mx_sync_hub *hub;
  char *token;
  char *user;          /* once resolved */
  size_t ulen;
  char *device;        /* whoami's device_id, when it gave one */
  size_t dlen;
  mx_list streams;     /* the streams using it (mx_sync_stream.inode) */
  int step;            /* 0: whoami in flight, 1: joined_rooms, 2: done */
  bool failed;         /* transient failure: its streams long-poll */
  int error_status;    /* 4xx: the streams' answer */
  char *error_body;
  size_t error_len;
  void *handle;
};

/* The streams of one user (all its devices and tabs). */
typedef struct user_entry {
  mx_list streams; /* mx_sync_stream.unode */
  size_t count;
} user_entry;

struct mx_sync_stream {
  mx_sync_hub *hub;
  const mx_sync_stream_ops *ops;
  void *ud;
  char feed[FEED_KEY_LEN + 1];
  char *token, *query, *peer_ip, *user_agent;
  mx_buf position; /* empty: no position yet (initial sync) */
  bool full_state; /* still to be applied to the first batch */
  bool started;    /* on_start(200) was called */
  bool delivered;  /* an event is out, waiting for taken() */
  bool closed;     /* closed by the owner; freed from the loop */
  bool looking;    /* a replay lookup is in flight */
  bool replay_missed; /* the store had nothing for this position */
  bool resume_gap; /* the store had this position's batch once, no more */
  double opened;   /* ev_now at open */
  mx_list_node node;  /* in hub->streams; in hub->dead once closed */
  fetch *fetch;       /* the fetch this stream waits on */
  mx_list_node fnode; /* in fetch->waiters, or a list taken off it */
  mx_list_node knode; /* in hub->kicks */
  /* replication mode */
  identity *id;
  mx_list_node inode; /* in id->streams */
  mx_list_node unode; /* in its user_entry, once the user is known */
  mx_list_node pnode; /* in hub->pending or pending_background: woken,
                       * waiting for a slot (the queue st->background
                       * names) */
  bool parked;     /* waiting for a wake */
  bool dirty;      /* woken while not parked: fetch again at once */
  bool background; /* every wake since the last fetch was a background
                    * one (park.c) */
  bool catching_up; /* what it delivered may be older than the present: a
                     * resume, or an answer the homeserver computed earlier
                     * for the same device and position (its /sync cache);
                     * it fetches again until an answer is empty */
  bool presence;   /* set_presence is not offline */
  bool online;     /* ... and not unavailable either */
  bool relayed;    /* the presence relay keeps its user online */
  bool presence_due; /* the relay asked for a keepalive: the next fetch
                      * shows presence (mx_sync_hub_presence_keepalive) */
  int reason;      /* MX_SYNC_REASON_* of the next timeout=0 fetch */
  double last_fetch, woken_at;
  double queued_at; /* when it joined a pending queue */
};

struct fetch {
  mx_sync_hub *hub;
  char *key; /* map key: feed|kind|full_state|quiet|since */
  size_t klen;
  char feed[FEED_KEY_LEN + 1];
  char *since; /* NULL: initial */
  fetch_kind kind;
  bool full_state;
  bool quiet;    /* set_presence=offline: the relay shows the presence */
  bool counted;  /* in hub->nimmediate */
  bool storing;  /* its answer is being put in the replay store */
  bool orphan;   /* every waiter left while storing: freed after */
  mx_batch *answer; /* the batch being stored (or waiting to be) */
  bool relook;   /* an empty answer's lookup waits to be retried */
  int store_attempts; /* store calls answered unavailable, in a row */
  /* request strings, copied from the stream that created the fetch */
  char *token, *query, *peer_ip, *user_agent;
  void *handle; /* in flight */
  mx_list waiters; /* mx_sync_stream.fnode */
  size_t nwaiters;
  int attempts;
  double started; /* when the request in flight was sent */
  ev_timer retry;
};

/* What a started stream with nothing to deliver does next. */
typedef enum {
  NEXT_PARK,     /* wait for a wake */
  NEXT_QUEUE,    /* woken, but the fetch cap is reached: wait for a slot */
  NEXT_FETCH,    /* a timeout=0 fetch now (reason in st->reason) */
  NEXT_LONGPOLL, /* a long-poll */
} next_step;

typedef struct mx_sync_policy {
  /* The stream may fetch: its token's user is known (or cannot be).
   * False: it is kicked again later (or was answered with an error). */
  bool (*ready)(mx_sync_stream *st);
  next_step (*next)(mx_sync_stream *st);
  /* The stream closes: leave every policy structure. */
  void (*closed)(mx_sync_stream *st);
} mx_sync_policy;

struct mx_sync_hub {
  struct ev_loop *loop;
  mx_sync_hub_opts opts;
  mx_hs_api api;
  const mx_sync_policy *policy;
  mx_sync_hub_hooks hooks; /* the replication adapter's, or none */
  mx_sync_presence_ops presence_ops; /* the presence relay's, or none */
  mx_replay *replay;
  mx_strmap fetches;
  size_t nfetches;
  mx_list streams;
  size_t nstreams;
  size_t npresence; /* open streams that show presence */
  size_t nrelayed;  /* of which the relay took */
  mx_list dead;          /* closed, to free once nothing refers to them */
  mx_list kicks;         /* streams to advance from the loop */
  ev_prepare runner;     /* runs kicks and frees dead streams */
  ev_timer expire;       /* replay store expiry */
  /* replication mode */
  bool feed_up;
  mx_strmap identities;  /* token -> identity */
  mx_strmap users;       /* user id -> user_entry */
  mx_list pending;       /* woken (urgent), waiting for a fetch slot */
  mx_list pending_background; /* woken (background), the same */
  unsigned urgent_streak; /* urgent slots given while an old background
                           * wake waited (park.c) */
  mx_sync_stream *dispatching; /* taken off a queue for a slot, now */
  size_t nimmediate;     /* timeout=0 fetches in flight */
  ev_timer debounce;
  ev_timer presence;
};

/* hub.c */
void hub_kick(mx_sync_stream *st);
void hub_advance(mx_sync_stream *st);
void hub_start_stream(mx_sync_stream *st);
void hub_deliver(mx_sync_stream *st, mx_batch *batch);
void hub_answer_error(mx_sync_stream *st, int status, const char *body,
                      size_t len);
void hub_answer_own_error(mx_sync_stream *st, int status,
                          const char *errcode, const char *error);
bool hub_is_json_object(const char *body, size_t len);

/* fetch.c */
int fetch_attach(mx_sync_stream *st, fetch_kind kind, int reason);
void fetch_detach(mx_sync_stream *st);

/* identity.c */
bool identity_ready(mx_sync_stream *st);
void identity_unref(mx_sync_stream *st);
void identity_user_link(mx_sync_stream *st);

/* park.c */
extern const mx_sync_policy mx_sync_replication_policy;
void park_init(mx_sync_hub *hub);
void park_free(mx_sync_hub *hub);
void park_slot_freed(mx_sync_hub *hub);


#endif
