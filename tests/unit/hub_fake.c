/*
 * The hub tests' fake homeserver API, recording streams and loop helpers: see
 * hub_fake.h.
 */
#include "tests/unit/hub_fake.h"

#include <assert.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/buf.h"
#include "common/error.h"
#include "h2/sse_event.h"

hf_fake F;
struct ev_loop *loop;
mx_sync_hub *hub;

/* The test program's tap_failed_checks (see hf_setup). */
static int *failed_checks;

/* A failed check: a TAP diagnostic, counted for the running test. */
static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...) {
  assert(failed_checks); /* hf_setup first */
  va_list ap;
  va_start(ap, fmt);
  printf("# ");
  vprintf(fmt, ap);
  printf("\n");
  va_end(ap);
  (*failed_checks)++;
}

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond))                                                             \
      fail("%s:%d: check failed: %s", __FILE__, __LINE__, #cond);            \
  } while (0)

/* ---------------------------------------------------------------------- */
/* The fake homeserver API */

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

/* The path a call would have, as the tests name requests by it. */
static char *path_of(const mx_hs_request *req) {
  switch (req->call) {
  case MX_HS_WHOAMI:
    return strdup(WHOAMI);
  case MX_HS_JOINED_ROOMS:
    return strdup(JOINED);
  case MX_HS_JOINED_MEMBERS: {
    mx_buf b;
    mx_buf_init(&b, 1024);
    mx_buf_append(&b, "/_matrix/client/v3/rooms/", 25);
    mx_buf_append_urlencoded(&b, req->room_id, req->room_len);
    mx_buf_append(&b, "/joined_members", 15);
    return mx_buf_steal(&b, NULL);
  }
  case MX_HS_SYNC:
    break;
  }
  return NULL;
}

static int fake_start(void *impl, const mx_hs_request *req,
                      mx_hs_done_fn done, void *ud, void **handle) {
  *handle = NULL;
  if (F.fail_start || F.nreqs == MAX_REQS)
    return MX_ERR_NOMEM;
  if (F.fail_limit && req->call == MX_HS_SYNC)
    return MX_ERR_LIMIT;
  freq *r = &F.reqs[F.nreqs++];
  r->path = path_of(req);
  r->token = dup_or_null(req->token);
  r->query = dup_or_null(req->query);
  r->since = dup_or_null(req->since);
  r->peer_ip = dup_or_null(req->peer_ip);
  r->user_agent = dup_or_null(req->user_agent);
  r->timeout_ms = req->timeout_ms;
  r->full_state = req->full_state;
  r->presence_off = req->presence_off;
  r->done = done;
  r->ud = ud;
  r->live = true;
  r->cancelled = false;
  r->t_start = ev_time();
  int w = live_woken();
  if (w > F.max_live_woken)
    F.max_live_woken = w;
  *handle = r;
  return 0;
}

static void fake_cancel(void *impl, void *handle) {
  freq *r = handle;
  if (!r->live) {
    F.bad_cancels++;
    return;
  }
  r->live = false;
  r->cancelled = true;
  F.ncancels++;
}

static const mx_hs_api fake_api = {fake_start, fake_cancel, NULL};

static void fake_reset(void) {
  for (int i = 0; i < F.nreqs; i++) {
    freq *r = &F.reqs[i];
    free(r->path);
    free(r->token);
    free(r->query);
    free(r->since);
    free(r->peer_ip);
    free(r->user_agent);
  }
  memset(&F, 0, sizeof(F));
}

int live_reqs(void) {
  int n = 0;
  for (int i = 0; i < F.nreqs; i++)
    n += F.reqs[i].live;
  return n;
}

int reqs_since(const char *since) {
  int n = 0;
  for (int i = 0; i < F.nreqs; i++)
    n += same(F.reqs[i].since, since);
  return n;
}

bool same(const char *a, const char *b) {
  return a ? b && strcmp(a, b) == 0 : b == NULL;
}

bool is_woken(const freq *r) {
  return !r->path && r->since && r->timeout_ms == 0;
}

int live_woken(void) {
  int n = 0;
  for (int i = 0; i < F.nreqs; i++)
    n += F.reqs[i].live && is_woken(&F.reqs[i]);
  return n;
}

int find_live(const char *path, const char *token) {
  for (int i = 0; i < F.nreqs; i++)
    if (F.reqs[i].live && same(F.reqs[i].path, path) &&
        same(F.reqs[i].token, token))
      return i;
  return -1;
}

int find_woken(const char *token) {
  for (int i = 0; i < F.nreqs; i++)
    if (F.reqs[i].live && is_woken(&F.reqs[i]) &&
        same(F.reqs[i].token, token))
      return i;
  return -1;
}

int count_reqs(const char *path, const char *token) {
  int n = 0;
  for (int i = 0; i < F.nreqs; i++)
    n += same(F.reqs[i].path, path) && same(F.reqs[i].token, token);
  return n;
}

void answer_full(int i, int status, int err, const char *body,
                 long retry_after_ms) {
  if (i < 0 || i >= F.nreqs || !F.reqs[i].live) {
    fail("answer: request %d is not in flight", i);
    return;
  }
  freq *r = &F.reqs[i];
  r->live = false;
  mx_hs_response resp = {.status = status,
                           .err = err,
                           .body = body,
                           .len = body ? strlen(body) : 0,
                           .retry_after_ms = retry_after_ms};
  r->done(r->ud, &resp);
}

void answer(int i, int status, const char *body) {
  answer_full(i, status, 0, body, -1);
}

const char *batch(const char *next) {
  static char bodybuf[8][256];
  static int n;
  char *b = bodybuf[n++ % 8];
  snprintf(b, 256, "{\"next_batch\":\"%s\",\"rooms\":{\"join\":{}}}", next);
  return b;
}

/* ---------------------------------------------------------------------- */
/* Streams that record their callbacks */

void close_rec(rec *r) {
  if (r && r->st) {
    mx_sync_stream_close(r->st);
    r->st = NULL;
  }
}

static void on_start(mx_sync_stream *st, int status, const char *body,
                     size_t len, void *ud) {
  rec *r = ud;
  CHECK(r->st == st);
  r->ncalls++;
  r->nstart++;
  r->start_status = status;
  snprintf(r->start_body, sizeof(r->start_body), "%.*s", (int)len,
           body ? body : "");
  if (r->close_on_start)
    close_rec(r->close_on_start);
}

static void on_event(mx_sync_stream *st, mx_batch *b, void *ud) {
  rec *r = ud;
  CHECK(r->st == st);
  r->ncalls++;
  /* The SSE frame, as the front would send it: made once per batch, so
   * streams sharing a batch share the chunk. */
  mx_chunk *ev = mx_sse_batch_frame(b);
  CHECK(ev != NULL);
  if (r->nevents < MAX_EVENTS && ev)
    r->events[r->nevents] = mx_chunk_ref(ev);
  r->nevents++;
  if (r->close_on_event)
    close_rec(r->close_on_event);
  if (r->take_on_event && r->st)
    mx_sync_stream_taken(r->st);
}

static void on_fatal(mx_sync_stream *st, const char *body, size_t len,
                     void *ud) {
  rec *r = ud;
  CHECK(r->st == st);
  r->ncalls++;
  r->nfatal++;
  mx_chunk_unref(r->fatal);
  r->fatal = NULL;
  CHECK(mx_sse_event_encode(NULL, 0, "error", body, len, &r->fatal) == 0);
  if (r->close_on_fatal)
    close_rec(r->close_on_fatal);
  if (r->close_self_on_fatal)
    close_rec(r);
}

static const mx_sync_stream_ops ops = {on_start, on_event, on_fatal};

mx_sync_stream *hf_open_params(rec *r, const char *name,
                               const mx_sync_stream_params *p) {
  r->name = name;
  r->token = p->token;
  r->st = mx_sync_stream_open(hub, p, &ops, r);
  CHECK(r->st != NULL);
  return r->st;
}

mx_sync_stream *hf_open(rec *r, const char *name, const char *token,
                        const char *query, const char *since,
                        bool full_state) {
  mx_sync_stream_params p = {.token = token,
                             .query = query,
                             .since = since,
                             .full_state = full_state,
                             .peer_ip = "192.0.2.7",
                             .user_agent = "test-agent"};
  return hf_open_params(r, name, &p);
}

void taken(rec *r) { mx_sync_stream_taken(r->st); }

void rec_free(rec *r) {
  int n = r->nevents < MAX_EVENTS ? r->nevents : MAX_EVENTS;
  for (int i = 0; i < n; i++)
    mx_chunk_unref(r->events[i]);
  mx_chunk_unref(r->fatal);
  memset(r, 0, sizeof(*r));
}

const char *last_event(const rec *r) {
  static char out[1024];
  if (r->nevents == 0 || r->nevents > MAX_EVENTS)
    return "(none)";
  const mx_chunk *c = r->events[r->nevents - 1];
  snprintf(out, sizeof(out), "%.*s", (int)c->len, c->data);
  return out;
}

/* From the chunk, not last_event: an id past its buffer still counts. */
const char *event_id(const rec *r) {
  static char id[256];
  if (r->nevents == 0 || r->nevents > MAX_EVENTS)
    return "(none)";
  const mx_chunk *c = r->events[r->nevents - 1];
  if (c->len < 4 || memcmp(c->data, "id: ", 4) != 0)
    return "(no id)";
  size_t n = 0;
  while (4 + n < c->len && c->data[4 + n] != '\n')
    n++;
  snprintf(id, sizeof(id), "%.*s", (int)n, (const char *)c->data + 4);
  return id;
}

void hf_answer_start(rec *r, const char *who, const char *rooms,
                     const char *sync) {
  for (int guard = 0; guard < 8 && r->nevents == 0; guard++) {
    spin();
    int i;
    if ((i = find_live(WHOAMI, r->token)) >= 0)
      answer(i, 200, who);
    else if ((i = find_live(JOINED, r->token)) >= 0)
      answer(i, 200, rooms);
    else if ((i = find_live(NULL, r->token)) >= 0)
      answer(i, 200, sync);
  }
}

/* ---------------------------------------------------------------------- */
/* The deferring replay store */

int hf_deferred_answers;
bool hf_deferred_store;
bool hf_deferred_unavailable;
void (*hf_store_setup)(mx_sync_hub_opts *o, struct ev_loop *l);
static bool deferred_held;
static struct deferred_store *the_deferred;

typedef struct deferred_op deferred_op;
typedef struct deferred_store {
  struct ev_loop *loop;
  void *mem;
  deferred_op *ops;
} deferred_store;

struct deferred_op {
  ev_timer t;
  deferred_store *ds;
  bool put;
  char *key, *since;
  size_t klen, slen;
  mx_batch *batch;
  double now;
  mx_replay_done_fn done;
  void *ud;
  deferred_op *next;
};

static void op_unlink_free(deferred_op *op) {
  deferred_store *ds = op->ds;
  for (deferred_op **pp = &ds->ops; *pp; pp = &(*pp)->next)
    if (*pp == op) {
      *pp = op->next;
      break;
    }
  ev_timer_stop(ds->loop, &op->t);
  mx_batch_unref(op->batch);
  free(op->key);
  free(op->since);
  free(op);
}

static void op_fire(struct ev_loop *l, ev_timer *w, int revents) {
  deferred_op *op = w->data;
  deferred_store *ds = op->ds;
  hf_deferred_answers++;
  if (hf_deferred_unavailable)
    op->done(op->ud, MX_ERR_UNAVAILABLE, NULL);
  else if (op->put)
    mx_replay_memory_ops.put_if_absent(ds->mem, op->key, op->klen, op->since,
                                       op->slen, op->batch, op->now,
                                       op->done, op->ud);
  else
    mx_replay_memory_ops.get(ds->mem, op->key, op->klen, op->since,
                             op->slen, op->now, op->done, op->ud);
  op_unlink_free(op);
}

static void op_queue(deferred_store *ds, bool put, const char *key,
                     size_t klen, const char *since, size_t slen,
                     mx_batch *batch, double now, mx_replay_done_fn done,
                     void *ud) {
  deferred_op *op = calloc(1, sizeof(*op));
  CHECK(op != NULL);
  op->ds = ds;
  op->put = put;
  op->key = strndup(key, klen);
  op->since = strndup(since, slen);
  op->klen = klen;
  op->slen = slen;
  op->batch = batch ? mx_batch_ref(batch) : NULL;
  op->now = now;
  op->done = done;
  op->ud = ud;
  op->next = ds->ops;
  ds->ops = op;
  ev_timer_init(&op->t, op_fire, 0., 0.);
  op->t.data = op;
  if (!deferred_held)
    ev_timer_start(ds->loop, &op->t);
}

void hf_deferred_hold(bool hold) {
  deferred_held = hold;
  if (hold || !the_deferred)
    return;
  for (deferred_op *op = the_deferred->ops; op; op = op->next)
    ev_timer_start(the_deferred->loop, &op->t);
}

static void ds_get(void *store, const char *key, size_t klen,
                   const char *since, size_t slen, double now,
                   mx_replay_done_fn done, void *ud) {
  op_queue(store, false, key, klen, since, slen, NULL, now, done, ud);
}

static void ds_put(void *store, const char *key, size_t klen,
                   const char *since, size_t slen, mx_batch *batch,
                   double now, mx_replay_done_fn done, void *ud) {
  op_queue(store, true, key, klen, since, slen, batch, now, done, ud);
}

static size_t ds_expire(void *store, double now) {
  return mx_replay_memory_ops.expire(((deferred_store *)store)->mem, now);
}

static void ds_stats(void *store, mx_replay_stats *out) {
  mx_replay_memory_ops.stats(((deferred_store *)store)->mem, out);
}

static void ds_free(void *store) {
  deferred_store *ds = store;
  while (ds->ops) {
    deferred_op *op = ds->ops;
    op->done(op->ud, MX_ERR_UNAVAILABLE, NULL);
    op_unlink_free(op);
  }
  mx_replay_memory_ops.free(ds->mem);
  if (the_deferred == ds)
    the_deferred = NULL;
  free(ds);
}

static const mx_replay_store_ops deferred_ops = {ds_get, ds_put, ds_expire,
                                                 ds_stats, ds_free};

void hf_use_deferred_store(mx_sync_hub_opts *o, struct ev_loop *l) {
  deferred_store *ds = calloc(1, sizeof(*ds));
  CHECK(ds != NULL);
  ds->loop = l;
  mx_replay_opts ro = {.max_bytes = o->replay_max_bytes,
                       .max_age = o->replay_max_age};
  ds->mem = mx_replay_memory_new(&ro);
  the_deferred = ds;
  o->replay_ops = &deferred_ops;
  o->replay_store = ds;
}

/* ---------------------------------------------------------------------- */
/* Loop and hub per test */

mx_sync_hub_opts hf_opts(void) {
  return (mx_sync_hub_opts){.longpoll_timeout_ms = LONGPOLL_MS,
                            .replay_max_bytes = 1 << 20,
                            .replay_max_age = 300,
                            .backoff_base = 0.01,
                            .backoff_max = 1.0};
}

void hf_setup(const mx_sync_hub_opts *o, int *failed) {
  failed_checks = failed;
  fake_reset();
  srandom(20240601); /* the hub's jitter: the same draws every run */
  loop = ev_loop_new(EVFLAG_AUTO);
  mx_sync_hub_opts opts = *o;
  hf_deferred_answers = 0;
  if (hf_deferred_store)
    hf_use_deferred_store(&opts, loop);
  if (hf_store_setup)
    hf_store_setup(&opts, loop);
  hub = mx_sync_hub_new(loop, &opts, &fake_api);
  CHECK(hub != NULL);
}

void hf_teardown(void) {
  mx_sync_hub_free(hub);
  hub = NULL;
  int live = live_reqs();
  if (live != 0) /* everything answered or cancelled */
    fail("%s:%d: %d request(s) still in flight", __FILE__, __LINE__, live);
  if (F.bad_cancels != 0)
    fail("%s:%d: %d cancel(s) of a request not in flight", __FILE__,
         __LINE__, F.bad_cancels);
  ev_loop_destroy(loop);
  loop = NULL;
  fake_reset();
}

void spin(void) {
  for (int i = 0; i < 5; i++)
    ev_run(loop, EVRUN_NOWAIT);
}

bool wait_reqs(int n, double max) {
  double end = ev_time() + max;
  while (F.nreqs < n && ev_time() < end) {
    ev_run(loop, EVRUN_NOWAIT);
    usleep(500);
  }
  return F.nreqs >= n;
}

void run_for(double t) {
  double end = ev_time() + t;
  while (ev_time() < end) {
    ev_run(loop, EVRUN_NOWAIT);
    usleep(500);
  }
}
