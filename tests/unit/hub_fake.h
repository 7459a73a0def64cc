/*
 * What the hub's unit tests share (test_hub, test_hub_replication,
 * test_replication): a real libev loop, a hub on it and a fake homeserver
 * API (sync/homeserver_api.h).
 * Every upstream request the hub starts (/sync, account/whoami,
 * joined_rooms) is recorded (parameters, start time) and stays in flight
 * until the test answers it or the hub cancels it. Streams record their
 * callbacks and keep a reference to every event they get, so tests compare
 * chunk pointers (sharing) and bytes (framing).
 *
 * One test program, one hub at a time: the state is global. The names the
 * test cases use (F, hub, answer, spin...) are kept as they were, so the
 * cases read the same in every program; what the programs' own setup and
 * helpers build on carries hf_.
 */
#ifndef MX_TESTS_UNIT_HUB_FAKE_H
#define MX_TESTS_UNIT_HUB_FAKE_H

#include <ev.h>
#include <stdbool.h>

#include "common/chunk.h"
#include "sync/hub.h"

/* Tests call functions for their effects and CHECK the results that
 * matter; the daemon's own code may ignore none (MX_MUST_CHECK). */
#pragma GCC diagnostic ignored "-Wunused-result"

#define LONGPOLL_MS 30000
#define WHOAMI "/_matrix/client/v3/account/whoami"
#define JOINED "/_matrix/client/v3/joined_rooms"

/* ---------------------------------------------------------------------- */
/* The fake homeserver API */

#define MAX_REQS 256

typedef struct freq {
  char *path; /* NULL: /sync */
  char *token, *query, *since, *peer_ip, *user_agent;
  long timeout_ms;
  bool full_state;
  bool presence_off;
  mx_hs_done_fn done;
  void *ud;
  bool live; /* started, not answered, not cancelled */
  bool cancelled;
  double t_start; /* ev_time() when the hub started it */
} freq;

typedef struct hf_fake {
  freq reqs[MAX_REQS];
  int nreqs;
  int ncancels;
  int bad_cancels;    /* cancel of a handle that was not in flight */
  int max_live_woken; /* most woken (timeout=0, since) /sync at once */
  bool fail_start;    /* start fails with MX_ERR_NOMEM */
  bool fail_limit;    /* /sync starts fail with MX_ERR_LIMIT (URL too long) */
} hf_fake;

/* Every request of the current test; hf_setup and hf_teardown empty it. */
extern hf_fake F;

/* Requests in flight. */
int live_reqs(void);

/* Requests started with this since (NULL: initial ones). */
int reqs_since(const char *since);

/* Both NULL or equal strings. */
bool same(const char *a, const char *b);

/* A /sync with a position and timeout=0: what a wake (or a safety net, or
 * a presence tick) makes a parked stream fetch. */
bool is_woken(const freq *r);

/* Woken fetches in flight. */
int live_woken(void);

/* The first live request of this path (NULL: /sync) and token, or -1. */
int find_live(const char *path, const char *token);

/* The first live woken fetch of token, or -1. */
int find_woken(const char *token);

/* Requests ever started with this path and token. */
int count_reqs(const char *path, const char *token);

/* Answers request i (it must be in flight; otherwise a failed check).
 * body is borrowed for the call. */
void answer_full(int i, int status, int err, const char *body,
                 long retry_after_ms);

/* answer_full without a transport error or Retry-After. */
void answer(int i, int status, const char *body);

/* A /sync answer with this next_batch (one of 8 rotating static buffers). */
const char *batch(const char *next);

/* ---------------------------------------------------------------------- */
/* Streams that record their callbacks */

#define MAX_EVENTS 16

typedef struct rec {
  const char *name;
  const char *token; /* the one it was opened with */
  mx_sync_stream *st;
  int nstart;
  int start_status;
  char start_body[1024];
  int nevents;
  mx_chunk *events[MAX_EVENTS]; /* our references */
  int nfatal;
  mx_chunk *fatal; /* our reference */
  int ncalls;      /* every callback */
  /* behaviour inside callbacks */
  struct rec *close_on_start, *close_on_event, *close_on_fatal;
  bool close_self_on_fatal;
  bool take_on_event; /* the client takes every event at once */
} rec;

/* Opens a stream on hub with these parameters (borrowed for the call),
 * recording into r (which must outlive the stream). */
mx_sync_stream *hf_open_params(rec *r, const char *name,
                               const mx_sync_stream_params *p);

/* hf_open_params for the test client (192.0.2.7, "test-agent"). */
mx_sync_stream *hf_open(rec *r, const char *name, const char *token,
                        const char *query, const char *since,
                        bool full_state);

/* Closes r's stream if it is open (also from inside a callback). */
void close_rec(rec *r);

/* The client took the last event. */
void taken(rec *r);

/* Drops r's references and zeroes it; once its stream is closed. */
void rec_free(rec *r);

/* The last event's bytes as a string (static buffer). */
const char *last_event(const rec *r);

/* The last event's id (static buffer). */
const char *event_id(const rec *r);

/* Walks r, just opened, through whatever the hub asks for its token:
 * whoami (who), joined_rooms (rooms, when the hub wants them) and the
 * first /sync (sync), until r has an event or 8 rounds pass. Bodies are
 * borrowed for the call. */
void hf_answer_start(rec *r, const char *who, const char *rooms,
                     const char *sync);

/* ---------------------------------------------------------------------- */
/* A replay store that answers later, from the loop, as a remote one does:
 * the in-memory store behind a zero-delay timer per call. Free answers
 * what is still pending with MX_ERR_UNAVAILABLE. */

/* Sets o's replay store to a new deferring store on loop (call after
 * hf_setup has made the loop, or pass the loop). */
void hf_use_deferred_store(mx_sync_hub_opts *o, struct ev_loop *l);

/* Calls the deferring store has answered so far. */
extern int hf_deferred_answers;

/* While set, the deferring store answers every call MX_ERR_UNAVAILABLE
 * (from the loop, storing nothing), as a remote store that is down. */
extern bool hf_deferred_unavailable;

/* When set, hf_setup calls it with the options and the new loop before
 * creating the hub (e.g. to give the hub a store of the test's). */
extern void (*hf_store_setup)(mx_sync_hub_opts *o, struct ev_loop *l);

/* While held, the deferring store queues calls without answering them;
 * releasing answers them from the loop. */
void hf_deferred_hold(bool hold);

/* ---------------------------------------------------------------------- */
/* Loop and hub per test */

extern struct ev_loop *loop;
extern mx_sync_hub *hub;
extern bool hf_deferred_store; /* hf_setup gives the hub a deferring store */

/* The options every test starts from: long-poll LONGPOLL_MS, a 1 MiB,
 * 5 minute replay buffer, backoff from 10 ms to 1 s. */
mx_sync_hub_opts hf_opts(void);

/* Empties the fake, seeds the hub's jitter (the same draws every run) and
 * creates loop and hub with o (borrowed; with hf_deferred_store set, the
 * hub gets a deferring replay store). tap.h's counter is static to
 * each test file: the checks made here count in failed_checks, the
 * caller's tap_failed_checks. */
void hf_setup(const mx_sync_hub_opts *o, int *failed_checks);

/* Frees hub (if the test has not) and loop, checking that every request
 * was answered or cancelled, and once only. */
void hf_teardown(void);

/* Runs the loop a few times without waiting. */
void spin(void);

/* Runs the loop until the fake has seen n requests or max seconds pass. */
bool wait_reqs(int n, double max);

/* Runs the loop for about t seconds. */
void run_for(double t);

#endif
