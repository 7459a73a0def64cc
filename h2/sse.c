/*
 * One file on purpose (~730 lines): the endpoint's request checks, the
 * heartbeat wheel, compression and shutdown all act on one sse_stream and
 * its exchange, whose rules are easier to keep in one view.
 *
 * GET /_matrix/client/{v3,r0,unstable/org.matrix.msc2108}/sync/sse
 * (MSC2108): validates the request, then bridges one exchange to one
 * mx_sync_stream of the sync hub. The response starts only when the
 * first /sync answer is in, so a bad token or filter is an ordinary HTTP
 * error and EventSource gives up instead of retrying forever.
 *
 * Heartbeats (": \n\n") come from one timer wheel for all streams: a
 * 250 ms tick walks one slot, not a timer per stream.
 *
 * Compression (docs/sse.md): a client whose Accept-Encoding takes gzip
 * gets its own deflate context (h2/sse_gzip.c) for the life of the
 * stream; each frame, heartbeat included, becomes a private flushed
 * chunk. Without it the shared frames are queued by reference as they
 * are.
 */
#include "h2/sse.h"

#include <ev.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/error.h"
#include "common/limits.h"
#include "common/list.h"
#include "common/log.h"
#include "common/metrics.h"
#include "h2/conn.h"
#include "sync/hub.h"
#include "h2/sse_event.h"
#include "h2/sse_gzip.h"

#define WHEEL_SLOTS 4096
#define WHEEL_TICK 0.25 /* seconds */

typedef struct sse_stream {
  mx_exchange *ex;
  mx_server *server;
  mx_sync_stream *sync;
  unsigned heartbeat_ticks; /* interval in wheel ticks */
  unsigned rounds;          /* full wheel turns left before firing */
  size_t slot;
  bool started;
  bool waiting_taken;       /* an event is queued; tell the hub once out */
  bool accepts_gzip;        /* the request's Accept-Encoding takes gzip */
  mx_sse_gzip *gz;          /* this stream's compressor, or NULL */
  bool ending;              /* shutdown: ends when its wheel slot comes */
  double queued_at;         /* when that event was queued */
  mx_list_node wnode;        /* in a wheel slot */
} sse_stream;

/* --- heartbeat wheel ------------------------------------------------ */

static struct {
  mx_list slots[WHEEL_SLOTS];
  size_t now; /* current slot */
  size_t count;
  ev_timer tick;
  struct ev_loop *loop;
} wheel;

static void wheel_remove(sse_stream *s) {
  if (!mx_list_linked(&s->wnode))
    return;
  mx_list_remove(&s->wnode);
  if (--wheel.count == 0)
    ev_timer_stop(wheel.loop, &wheel.tick);
}

static void wheel_tick_cb(struct ev_loop *loop, ev_timer *w, int revents);

static void wheel_link(sse_stream *s) {
  mx_list_push_front(&wheel.slots[s->slot], &s->wnode);
  wheel.count++;
}

static void wheel_insert(sse_stream *s) {
  if (!wheel.loop || (wheel.count == 0 && wheel.loop != s->server->loop)) {
    /* Idle, the wheel follows its streams' loop (one per process, except
     * in tests that make a loop per case). */
    for (size_t i = 0; i < WHEEL_SLOTS; i++)
      mx_list_init(&wheel.slots[i]);
    wheel.loop = s->server->loop;
    ev_timer_init(&wheel.tick, wheel_tick_cb, WHEEL_TICK, WHEEL_TICK);
  }
  unsigned ticks = s->heartbeat_ticks ? s->heartbeat_ticks : 1;
  s->rounds = (ticks - 1) / WHEEL_SLOTS;
  s->slot = (wheel.now + ticks) % WHEEL_SLOTS;
  wheel_link(s);
  if (wheel.count == 1)
    ev_timer_start(wheel.loop, &wheel.tick);
}

/* --- compression -------------------------------------------------- */

static long gzip_streams; /* streams compressing now (one loop) */

/* Gives the stream a compressor if it asked for gzip and the operator
 * allows one more; otherwise it stays identity. Returns 0 or
 * MX_ERR_NOMEM. */
static int gzip_begin(sse_stream *s) {
  const mx_config *cfg = s->server->cfg;
  if (!cfg->sse_gzip || !s->accepts_gzip || s->gz)
    return 0;
  if (gzip_streams >= cfg->sse_gzip_max_streams) {
    mx_stats.sse_gzip_refused++;
    return 0;
  }
  mx_sse_gzip_params p = {.level = (int)cfg->sse_gzip_level,
                          .window_bits = (int)cfg->sse_gzip_window_bits,
                          .mem_level = (int)cfg->sse_gzip_mem_level};
  int rv = mx_sse_gzip_new(&p, &s->gz);
  if (rv)
    return rv;
  gzip_streams++;
  mx_stats.sse_gzip_streams = gzip_streams;
  mx_stats.sse_gzip_memory = (int64_t)mx_sse_gzip_total_memory();
  return 0;
}

static void gzip_release(sse_stream *s) {
  if (!s->gz)
    return;
  mx_sse_gzip_free(s->gz);
  s->gz = NULL;
  gzip_streams--;
  mx_stats.sse_gzip_streams = gzip_streams;
  mx_stats.sse_gzip_memory = (int64_t)mx_sse_gzip_total_memory();
}

/* Queues one SSE chunk (borrowed): by reference, or compressed into a
 * private chunk. Returns 0 or a negative MX_ERR_*. */
static int stream_write(sse_stream *s, mx_chunk *c) {
  if (!s->gz)
    return mx_exchange_write_chunk(s->ex, c);
  mx_chunk *z = NULL;
  int rv = mx_sse_gzip_chunk(s->gz, c->data, c->len, &z);
  if (rv == 0) {
    mx_stats.sse_gzip_bytes_in += c->len;
    mx_stats.sse_gzip_bytes_out += z->len;
    rv = mx_exchange_write_chunk(s->ex, z);
  }
  mx_chunk_unref(z);
  return rv;
}

/* Ends the response; a gzip stream gets its trailer first, so clients
 * that check it see a complete body. */
static int stream_finish(sse_stream *s) {
  if (s->gz) {
    mx_chunk *z = NULL;
    int rv = mx_sse_gzip_finish(s->gz, &z);
    if (rv == 0) {
      mx_stats.sse_gzip_bytes_out += z->len;
      rv = mx_exchange_write_chunk(s->ex, z);
    }
    mx_chunk_unref(z);
    gzip_release(s);
    if (rv)
      return rv;
  }
  return mx_exchange_end(s->ex);
}

/* A stream's heartbeat is due: send it, or cut a stream that stays
 * behind; then schedule the next one. */
static void end_now(mx_exchange *ex, sse_stream *s);

static void heartbeat_due(sse_stream *s, struct ev_loop *loop) {
  if (s->ending) {
    end_now(s->ex, s);
    return;
  }
  if (s->waiting_taken &&
      ev_now(loop) - s->queued_at >= (double)s->server->cfg->write_timeout) {
    /* Too far behind: its next batch would wait on it forever. Cut it;
     * the client resumes from its last id (the batch is in the replay
     * store). On HTTP/2 the connection's other streams live on. */
    MX_LOG_INFO("sse.cut", "peer=%s reason=behind", s->ex->req.peer_ip);
    s->waiting_taken = false;
    mx_exchange_reset(s->ex);
    return;
  }
  /* A client that reads nothing gets no more heartbeats queued: the
   * write-stall timeout will end it. */
  if (mx_exchange_queued(s->ex) < MX_BODYQ_HIGH) {
    mx_chunk *hb = mx_sse_heartbeat();
    if (!hb || stream_write(s, hb)) {
      /* No memory: a stream without heartbeats would be cut by a proxy
       * anyway; end it, the client resumes. */
      mx_exchange_reset(s->ex);
      return;
    }
    mx_stats.sse_heartbeats_sent++;
  }
  wheel_insert(s);
}

static void wheel_tick_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  wheel.now = (wheel.now + 1) % WHEEL_SLOTS;
  mx_list due;
  mx_list_init(&due);
  mx_list_move_all(&due, &wheel.slots[wheel.now]);
  /* Re-inserting lands in later slots, never in this one (ticks >= 1),
   * except for streams with whole turns left, which stay here. */
  for (mx_list_node *n; (n = mx_list_pop_front(&due));) {
    sse_stream *s = MX_CONTAINER_OF(n, sse_stream, wnode);
    wheel.count--;
    if (s->rounds) {
      s->rounds--;
      wheel_link(s);
    } else {
      heartbeat_due(s, loop);
    }
  }
  if (wheel.count == 0)
    ev_timer_stop(loop, w);
}

/* --- request parsing ------------------------------------------------ */

static bool path_is_sse(const char *p, size_t n) {
  static const char *const paths[] = {
      "/_matrix/client/v3/sync/sse",
      "/_matrix/client/r0/sync/sse",
      "/_matrix/client/unstable/org.matrix.msc2108/sync/sse",
  };
  for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++)
    if (n == strlen(paths[i]) && !memcmp(p, paths[i], n))
      return true;
  return false;
}

static const char *cors_origin(const mx_server *s) {
  return s->cfg->cors_origin ? s->cfg->cors_origin : "*";
}

static void sse_error(mx_server *s, mx_exchange *ex, int status,
                      const char *errcode, const char *error) {
  const char *origin = cors_origin(s);
  mx_header extra[] = {
      {"access-control-allow-origin", 27, origin, strlen(origin)},
      MX_HEADER_LIT("allow", "GET, OPTIONS")};
  mx_exchange_error(ex, status, errcode, error, extra, status == 405 ? 2 : 1);
}

/* Decodes a parameter value into a NUL-terminated copy (caller frees). */
static char *param(const mx_request *r, const char *name, bool *present) {
  const char *v;
  long n = mx_http_query_param(r->target, r->target_len, name, &v);
  *present = n >= 0;
  if (n < 0)
    return NULL;
  char *copy = malloc((size_t)n + 1);
  if (!copy)
    return NULL;
  memcpy(copy, v, (size_t)n);
  long m = mx_http_percent_decode(copy, (size_t)n, true);
  if (m < 0) {
    free(copy);
    return NULL;
  }
  copy[m] = '\0';
  return copy;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  c = (char)(c | 0x20);
  return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* A parameter's name as the homeserver decodes it ('%' escapes, '+' as
 * space) into name[24]; 0 when it is longer than any name mxsse knows. */
static size_t decoded_name(const char *k, size_t n, char name[24]) {
  size_t len = 0;
  for (size_t i = 0; i < n; i++) {
    char c = k[i];
    if (c == '%' && n - i >= 3 && hexval(k[i + 1]) >= 0 &&
        hexval(k[i + 2]) >= 0) {
      c = (char)(hexval(k[i + 1]) * 16 + hexval(k[i + 2]));
      i += 2;
    } else if (c == '+') {
      c = ' ';
    }
    if (len == 24)
      return 0;
    name[len++] = c;
  }
  return len;
}

/* True for parameters mxsse consumes instead of forwarding, by the name
 * the homeserver decodes: forwarded, "access%5Ftoken" or "tim%65out"
 * would reach it as access_token or timeout. */
static bool consumed_param(const char *k, size_t n) {
  static const char *const own[] = {"access_token", "since", "timeout",
                                    "heartbeat_interval", "full_state"};
  char name[24];
  size_t len = decoded_name(k, n, name);
  for (size_t i = 0; i < sizeof(own) / sizeof(own[0]); i++)
    if (len == strlen(own[i]) && !memcmp(name, own[i], len))
      return true;
  return false;
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Every other parameter, still encoded, sorted so equal requests share a
 * feed key: "filter=...&set_presence=...". */
static int forwarded_query(const mx_request *r, mx_buf *out) {
  const char *q = memchr(r->target, '?', r->target_len);
  if (!q)
    return 0;
  const char *end = r->target + r->target_len;
  char *parts[MX_SSE_MAX_PARAMS];
  size_t n = 0;
  int rv = 0;
  for (const char *p = q + 1; p < end && rv == 0;) {
    const char *amp = memchr(p, '&', (size_t)(end - p));
    const char *pend = amp ? amp : end;
    const char *eq = memchr(p, '=', (size_t)(pend - p));
    size_t klen = (size_t)((eq ? eq : pend) - p);
    if (pend > p && !consumed_param(p, klen)) {
      /* set_presence under its plain name, however the client encoded it:
       * the hub and the homeserver API read it by that name. */
      char name[24];
      static const char sp[] = "set_presence";
      bool canon = decoded_name(p, klen, name) == sizeof(sp) - 1 &&
                   !memcmp(name, sp, sizeof(sp) - 1);
      size_t vlen = (size_t)(pend - p) - klen; /* "=value", or none */
      if (n == sizeof(parts) / sizeof(parts[0]))
        rv = MX_ERR_LIMIT;
      else if (!(parts[n] = canon ? malloc(sizeof(sp) + vlen)
                                  : strndup(p, (size_t)(pend - p))))
        rv = MX_ERR_NOMEM;
      else {
        if (canon) {
          memcpy(parts[n], sp, sizeof(sp) - 1);
          memcpy(parts[n] + sizeof(sp) - 1, p + klen, vlen);
          parts[n][sizeof(sp) - 1 + vlen] = '\0';
        }
        n++;
      }
    }
    p = pend + 1;
  }
  qsort(parts, n, sizeof(parts[0]), cmp_str);
  for (size_t i = 0; i < n; i++) {
    if (rv == 0 && i)
      rv = mx_buf_append(out, "&", 1);
    if (rv == 0)
      rv = mx_buf_append(out, parts[i], strlen(parts[i]));
    free(parts[i]);
  }
  return rv;
}

static bool valid_position(const char *p) {
  size_t n = strlen(p);
  if (n == 0 || n >= MX_SYNC_MAX_POSITION)
    return false;
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)p[i] < 0x20 || p[i] == 0x7f)
      return false;
  return true;
}

/* --- stream callbacks ----------------------------------------------- */

static void stream_end(sse_stream *s) {
  if (s->sync) {
    mx_sync_stream_close(s->sync);
    s->sync = NULL;
  }
  wheel_remove(s);
  gzip_release(s);
}

/* The 200 head and the retry: field. Returns 0 or a negative MX_ERR_*. */
static int start_empty_stream(sse_stream *s) {
  const char *origin = cors_origin(s->server);
  int rv = gzip_begin(s);
  if (rv)
    return rv;
  /* no-transform also keeps middleboxes from compressing on their own,
   * without a flush per event. */
  mx_header hs[] = {
      MX_HEADER_LIT("content-type", "text/event-stream"),
      MX_HEADER_LIT("cache-control", "no-cache, no-transform"),
      MX_HEADER_LIT("x-accel-buffering", "no"),
      {"access-control-allow-origin", 27, origin, strlen(origin)},
      MX_HEADER_LIT("vary", "Accept-Encoding"),
      MX_HEADER_LIT("content-encoding", "gzip"),
  };
  size_t nhs = 4;
  if (s->server->cfg->sse_gzip)
    nhs++; /* the answer depends on Accept-Encoding */
  if (s->gz)
    nhs++;
  rv = mx_exchange_respond(s->ex, 200, hs, nhs, false);
  if (rv)
    return rv;
  /* Spread reconnects after a restart: each connection gets its own
   * retry in [base, 2*base). */
  long base = s->server->cfg->sse_retry_ms;
  unsigned long retry =
      (unsigned long)base + (base > 0 ? (unsigned long)(random() % base) : 0);
  mx_chunk *r = NULL;
  if (mx_sse_retry_encode(retry, &r))
    return MX_ERR_NOMEM;
  rv = stream_write(s, r);
  mx_chunk_unref(r);
  return rv;
}

/* The resume cannot be honoured: the batch after the client's position
 * expired from the shared store, so to-device messages it carried may be
 * gone (docs/deployment.md). Said before the first event, which follows
 * from that position as usual. Returns 0 or a negative MX_ERR_*. */
static int resume_gap_event(sse_stream *s) {
  static const char data[] =
      "{\"errcode\":\"ORG.MXSSE.HISTORY_GONE\",\"error\":\"The batches "
      "after this position expired; to-device messages may be missing\"}";
  mx_chunk *ev = NULL;
  int rv = mx_sse_event_encode(NULL, 0, "gap", data, sizeof(data) - 1, &ev);
  if (rv == 0)
    rv = stream_write(s, ev);
  mx_chunk_unref(ev);
  return rv;
}

static void on_start(mx_sync_stream *st, int status, const char *body,
                     size_t len, void *ud) {
  sse_stream *s = ud;
  mx_server *srv = s->server;
  const char *origin = cors_origin(srv);
  if (status != 200) {
    /* Before the stream: the homeserver's (or our) error, as is. */
    char cl[24];
    snprintf(cl, sizeof(cl), "%zu", len);
    /* 503 (the replay store cannot prove a resume): come back after the
     * retry: delay, maybe through another node. */
    char ra[24];
    snprintf(ra, sizeof(ra), "%ld", 1 + srv->cfg->sse_retry_ms / 1000);
    mx_header hs[] = {MX_HEADER_LIT("content-type", "application/json"),
                      {"content-length", 14, cl, strlen(cl)},
                      MX_HEADER_LIT("cache-control", "no-cache"),
                      {"access-control-allow-origin", 27, origin,
                       strlen(origin)},
                      {"retry-after", 11, ra, strlen(ra)}};
    int rv = mx_exchange_respond(s->ex, status, hs, status == 503 ? 5 : 4,
                                 len == 0);
    if (rv == 0 && len)
      rv = mx_exchange_write(s->ex, body, len);
    if (rv == 0 && len)
      rv = mx_exchange_end(s->ex);
    if (rv)
      mx_exchange_reset(s->ex);
    stream_end(s);
    return;
  }
  if (start_empty_stream(s)) {
    mx_exchange_reset(s->ex);
    stream_end(s);
    return;
  }
  if (mx_sync_stream_resume_gap(st) && resume_gap_event(s)) {
    mx_exchange_reset(s->ex);
    stream_end(s);
    return;
  }
  s->started = true;
  mx_stats.sse_streams_open++;
  wheel_insert(s);
}

static void on_event(mx_sync_stream *st, mx_batch *batch, void *ud) {
  sse_stream *s = ud;
  /* The frame is made once per batch and shared by its streams. */
  mx_chunk *frame = mx_sse_batch_frame(batch);
  if (!frame || stream_write(s, frame)) {
    mx_exchange_reset(s->ex);
    stream_end(s);
    return;
  }
  /* The next batch is fetched once this one has left the queue. */
  s->waiting_taken = true;
  s->queued_at = ev_now(s->server->loop);
  mx_exchange_notify_drained(s->ex);
}

static void on_fatal(mx_sync_stream *st, const char *body, size_t len,
                     void *ud) {
  sse_stream *s = ud;
  mx_chunk *ev = NULL;
  int rv = mx_sse_event_encode(NULL, 0, "error", body, len, &ev);
  if (rv == 0)
    rv = stream_write(s, ev);
  mx_chunk_unref(ev);
  if (rv || stream_finish(s))
    mx_exchange_reset(s->ex); /* the client reconnects and learns */
  stream_end(s);
}

static const mx_sync_stream_ops sync_ops = {
    .on_start = on_start, .on_event = on_event, .on_fatal = on_fatal};

/* --- exchange handler ----------------------------------------------- */

static void on_writable(mx_exchange *ex, void *ctx) {
  sse_stream *s = ctx;
  if (s->waiting_taken && s->sync) {
    s->waiting_taken = false;
    mx_sync_stream_taken(s->sync);
  }
}

static void end_now(mx_exchange *ex, sse_stream *s) {
  /* Ending the response makes EventSource reconnect (elsewhere, with its
   * Last-Event-ID): nothing is lost. */
  /* Not started yet: any non-200 would stop EventSource for good, so
   * answer an empty stream that only says when to come back. */
  if ((!mx_exchange_responded(ex) && start_empty_stream(s)) ||
      stream_finish(s))
    mx_exchange_reset(ex);
  stream_end(s);
}

static void on_shutdown(mx_exchange *ex, void *ctx) {
  sse_stream *s = ctx;
  /* Streams end at random times over shutdown_spread (within what the
   * grace period leaves), so their clients do not all reconnect to the
   * other nodes in the same instant (their retry: adds its own jitter). */
  const mx_config *cfg = s->server->cfg;
  double spread = (double)cfg->shutdown_spread;
  double room = (double)cfg->shutdown_grace - 1.5; /* after the notice */
  if (spread > room)
    spread = room;
  unsigned ticks = spread > 0 ? (unsigned)(spread / WHEEL_TICK) : 0;
  if (s->started && !s->ending && ticks > 1) {
    s->ending = true;
    wheel_remove(s);
    s->heartbeat_ticks = 1 + (unsigned)(random() % ticks);
    wheel_insert(s);
    return;
  }
  end_now(ex, s);
}

static void on_close(mx_exchange *ex, void *ctx, int reason) {
  sse_stream *s = ctx;
  if (s->started)
    mx_stats.sse_streams_open--;
  stream_end(s);
  free(s);
}

static const mx_handler sse_handler = {
    .name = "sse",
    .on_writable = on_writable,
    .on_shutdown = on_shutdown,
    .on_close = on_close,
};

static void preflight(mx_server *s, mx_exchange *ex) {
  const char *origin = cors_origin(s);
  mx_header hs[] = {
      {"access-control-allow-origin", 27, origin, strlen(origin)},
      MX_HEADER_LIT("access-control-allow-methods", "GET, OPTIONS"),
      MX_HEADER_LIT("access-control-allow-headers",
                    "Authorization, Last-Event-ID, Cache-Control, "
                    "Content-Type, X-Requested-With"),
      MX_HEADER_LIT("access-control-max-age", "86400"),
      MX_HEADER_LIT("content-length", "0"),
  };
  if (mx_exchange_respond(ex, 204, hs, 5, true))
    mx_exchange_reset(ex);
}

/* Extracts the access token: header or query, never both. Returns the
 * token (caller frees) or NULL after answering the error. */
static char *access_token(mx_server *s, mx_exchange *ex) {
  const mx_request *r = mx_exchange_request(ex);
  bool in_query;
  char *q = param(r, "access_token", &in_query);
  const mx_header *h = mx_exchange_header(ex, "authorization");
  if (in_query && !q) {
    sse_error(s, ex, 400, "M_INVALID_PARAM", "Malformed access_token");
    return NULL;
  }
  if (h && in_query) {
    free(q);
    sse_error(s, ex, 401, "M_MISSING_TOKEN",
              "Mixing Authorization headers and access_token query "
              "parameters");
    return NULL;
  }
  if (in_query) {
    if (!*q) {
      free(q);
      sse_error(s, ex, 401, "M_MISSING_TOKEN", "Missing access token");
      return NULL;
    }
    return q;
  }
  if (h && h->valuelen > 7 && !strncasecmp(h->value, "Bearer ", 7)) {
    const char *t = h->value + 7;
    size_t n = h->valuelen - 7;
    while (n && *t == ' ')
      t++, n--;
    bool clean = n > 0;
    for (size_t i = 0; i < n; i++)
      if ((unsigned char)t[i] <= 0x20 || t[i] == 0x7f)
        clean = false;
    if (clean)
      return strndup(t, n);
  }
  sse_error(s, ex, 401, "M_MISSING_TOKEN", "Missing access token");
  return NULL;
}

bool mx_sse_route(mx_server *s, mx_exchange *ex) {
  const mx_request *r = mx_exchange_request(ex);
  if (!path_is_sse(r->target, (size_t)(r->path_end - r->target)))
    return false;
  if (r->method_len == 7 && !memcmp(r->method, "OPTIONS", 7)) {
    preflight(s, ex);
    return true;
  }
  if (!(r->method_len == 3 && !memcmp(r->method, "GET", 3))) {
    sse_error(s, ex, 405, "M_UNRECOGNIZED", "Only GET is supported");
    return true;
  }
  if (!s->sync) {
    sse_error(s, ex, 503, "M_UNKNOWN", "Sync streams are not available");
    return true;
  }
  const mx_config *cfg = s->cfg;
  bool present;
  long heartbeat = cfg->heartbeat_default;
  char *hb = param(r, "heartbeat_interval", &present);
  if (present) {
    char *end = NULL;
    long v = hb ? strtol(hb, &end, 10) : -1;
    bool ok = hb && end != hb && *end == '\0' && v >= cfg->heartbeat_min &&
              v <= cfg->heartbeat_max;
    free(hb);
    if (!ok) {
      char msg[160];
      snprintf(msg, sizeof(msg),
               "heartbeat_interval must be an integer from %ld to %ld "
               "(seconds)",
               cfg->heartbeat_min, cfg->heartbeat_max);
      sse_error(s, ex, 400, "M_INVALID_PARAM", msg);
      return true;
    }
    heartbeat = v;
  }
  bool full_state = false;
  char *fs = param(r, "full_state", &present);
  if (present) {
    if (fs && !strcmp(fs, "true"))
      full_state = true;
    else if (!fs || strcmp(fs, "false")) {
      free(fs);
      sse_error(s, ex, 400, "M_INVALID_PARAM",
                "full_state must be true or false");
      return true;
    }
  }
  free(fs);
  /* Position: Last-Event-ID wins; `since` serves EventSource's first
   * request, which cannot carry the header. */
  char *since = NULL;
  const mx_header *lei = mx_exchange_header(ex, "last-event-id");
  if (lei && lei->valuelen) {
    since = strndup(lei->value, lei->valuelen);
    /* A reconnect: the client has the state, and EventSource repeats
     * its URL (full_state=true included) on every reconnect. The replay
     * buffer must win, or to-device messages could be lost. */
    full_state = false;
  } else {
    since = param(r, "since", &present);
    if (present && !since) {
      sse_error(s, ex, 400, "M_INVALID_PARAM", "Malformed since");
      return true;
    }
  }
  if (since && !*since) {
    free(since);
    since = NULL;
  }
  if (since && !valid_position(since)) {
    free(since);
    sse_error(s, ex, 400, "M_INVALID_PARAM", "Invalid stream position");
    return true;
  }
  char *token = access_token(s, ex);
  if (!token) {
    free(since);
    return true;
  }
  mx_buf query;
  mx_buf_init(&query, MX_H1_MAX_REQUEST_LINE);
  sse_stream *st = calloc(1, sizeof(*st));
  int qrv = st ? forwarded_query(r, &query) : MX_ERR_NOMEM;
  if (qrv) {
    free(st);
    free(token);
    free(since);
    mx_buf_free(&query);
    if (qrv == MX_ERR_LIMIT)
      sse_error(s, ex, 400, "M_INVALID_PARAM", "Too many parameters");
    else
      sse_error(s, ex, 503, "M_UNKNOWN", "Out of memory");
    return true;
  }
  st->ex = ex;
  st->server = s;
  st->heartbeat_ticks = (unsigned)((double)heartbeat / WHEEL_TICK + 0.5);
  mx_sse_accept acc;
  mx_sse_accept_init(&acc);
  for (size_t i = 0; i < r->nheaders; i++)
    if (r->headers[i].namelen == 15 &&
        !memcmp(r->headers[i].name, "accept-encoding", 15))
      mx_sse_accept_scan(&acc, r->headers[i].value, r->headers[i].valuelen);
  st->accepts_gzip = mx_sse_accept_gzip(&acc);
  const mx_header *ua = mx_exchange_header(ex, "user-agent");
  char *ua_copy = ua ? strndup(ua->value, ua->valuelen) : NULL;
  mx_sync_stream_params p = {
      .token = token,
      .query = query.data ? query.data : "",
      .since = since,
      .full_state = full_state,
      .peer_ip = r->peer_ip,
      .user_agent = ua_copy,
  };
  mx_exchange_set_handler(ex, &sse_handler, st);
  st->sync = mx_sync_stream_open(s->sync, &p, &sync_ops, st);
  free(ua_copy);
  free(token);
  free(since);
  mx_buf_free(&query);
  if (!st->sync)
    sse_error(s, ex, 503, "M_UNKNOWN", "Out of memory");
  return true;
}
