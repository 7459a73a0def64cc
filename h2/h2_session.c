/*
 * One file on purpose (~600 lines): nghttp2's callbacks, the exchange
 * backend and the send path share the session's state and its rules on
 * what may run inside a callback.
 *
 * HTTP/2 through nghttp2's v1 server API (Debian's 1.52). Each request
 * stream carries an mx_exchange; nghttp2 does framing, HPACK, flow
 * control and HTTP messaging checks, we move bytes between it and the
 * connection and between streams and their handlers.
 *
 * Flow control: the connection window is credited as soon as DATA
 * arrives (it is bounded by the per-stream windows anyway); a stream's
 * window only when its handler reads the body, so a slow upstream slows
 * that one upload and nothing else.
 */
#include "h2/h2_session.h"

#include <nghttp2/nghttp2.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "common/error.h"
#include "common/limits.h"
#include "common/log.h"
#include "common/metrics.h"
#include "h2/exchange.h"
#include "h2/server.h"

typedef struct h2_stream {
  mx_exchange ex; /* first: an exchange is its stream */
  int32_t id;
  struct h2_session *sess;
  char method[32];
  size_t method_len;
  mx_buf path;
  size_t header_bytes;
  bool too_large;  /* header list over our cap: answered with 431 */
  bool dispatched;
  bool deferred;   /* the data source said DEFERRED */
  struct h2_stream *prev, *next;
} h2_stream;

/* Frames nghttp2 serialises are gathered here (copied) while h2_on_write
 * runs, so the connection queue holds few entries; DATA payloads above
 * SMALL_DATA go to the queue as references to the shared chunks. */
typedef struct write_batch {
  char data[16384];
  size_t len;
} write_batch;
#define SMALL_DATA 1024

typedef struct h2_session {
  mx_conn *conn;
  nghttp2_session *ng;
  write_batch *wb; /* during h2_on_write only */
  h2_stream *streams; /* open streams */
  size_t nstreams;
  bool notice_sent, goaway_sent;
  bool bad_stream_id;
} h2_session;

static const mx_exchange_backend backend;

static h2_session *session_of(mx_conn *c) { return c->proto_data; }

static h2_stream *stream_get(h2_session *s, int32_t id) {
  return nghttp2_session_get_stream_user_data(s->ng, id);
}

/* --- nghttp2 callbacks ---------------------------------------------- */

static int on_begin_frame(nghttp2_session *ng, const nghttp2_frame_hd *hd,
                          void *ud) {
  h2_session *s = ud;
  if (hd->type == NGHTTP2_HEADERS && (hd->stream_id & 1) &&
      hd->stream_id < nghttp2_session_get_last_proc_stream_id(ng) &&
      !nghttp2_session_find_stream(ng, hd->stream_id))
    s->bad_stream_id = true;
  return 0;
}

static int on_begin_headers(nghttp2_session *ng, const nghttp2_frame *frame,
                            void *ud) {
  h2_session *s = ud;
  if (frame->hd.type != NGHTTP2_HEADERS ||
      frame->headers.cat != NGHTTP2_HCAT_REQUEST)
    return 0;
  h2_stream *st = calloc(1, sizeof(*st));
  if (!st)
    return NGHTTP2_ERR_CALLBACK_FAILURE;
  st->id = frame->hd.stream_id;
  st->sess = s;
  mx_buf_init(&st->path, MX_H1_MAX_REQUEST_LINE);
  mx_exchange_init(&st->ex, s->conn, &backend, st);
  st->next = s->streams;
  if (s->streams)
    s->streams->prev = st;
  s->streams = st;
  s->nstreams++;
  nghttp2_session_set_stream_user_data(ng, st->id, st);
  return 0;
}

static int on_header(nghttp2_session *ng, const nghttp2_frame *frame,
                     const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *ud) {
  h2_session *s = ud;
  if (frame->hd.type != NGHTTP2_HEADERS ||
      frame->headers.cat != NGHTTP2_HCAT_REQUEST)
    return 0; /* trailers are ignored */
  h2_stream *st = stream_get(s, frame->hd.stream_id);
  if (!st || st->too_large)
    return 0;
  st->header_bytes += namelen + valuelen + 32;
  if (st->header_bytes > MX_H2_MAX_HEADER_LIST) {
    st->too_large = true;
    return 0;
  }
  const char *n = (const char *)name, *v = (const char *)value;
  if (namelen && n[0] == ':') {
    if (namelen == 7 && !memcmp(n, ":method", 7)) {
      if (valuelen >= sizeof(st->method)) {
        st->too_large = true;
        return 0;
      }
      memcpy(st->method, v, valuelen);
      st->method_len = valuelen;
    } else if (namelen == 5 && !memcmp(n, ":path", 5)) {
      if (mx_buf_append(&st->path, v, valuelen))
        st->too_large = true;
    } else if (namelen == 10 && !memcmp(n, ":authority", 10)) {
      if (mx_exchange_set_authority(&st->ex, v, valuelen))
        st->too_large = true;
    }
    return 0;
  }
  if (mx_exchange_add_header(&st->ex, n, namelen, v, valuelen))
    st->too_large = true;
  return 0;
}

static void dispatch(h2_session *s, h2_stream *st, bool end_stream) {
  st->dispatched = true;
  st->ex.req.has_body = !end_stream;
  if (st->too_large ||
      mx_exchange_set_line(&st->ex, st->method, st->method_len,
                           st->path.data ? st->path.data : "",
                           st->path.len)) {
    mx_exchange_seal_head(&st->ex);
    mx_exchange_error(&st->ex, 431, "M_TOO_LARGE",
                      "Request header fields too large", NULL, 0);
    return;
  }
  mx_buf_free(&st->path);
  mx_exchange_seal_head(&st->ex);
  if (s->goaway_sent) {
    mx_exchange_error(&st->ex, 503, "M_UNKNOWN", "Server is shutting down",
                      NULL, 0);
    return;
  }
  mx_router_dispatch(s->conn->server, &st->ex);
  if (end_stream && !st->ex.closed)
    mx_exchange_push_body_end(&st->ex);
}

static int on_frame_recv(nghttp2_session *ng, const nghttp2_frame *frame,
                         void *ud) {
  h2_session *s = ud;
  h2_stream *st;
  bool end = frame->hd.flags & NGHTTP2_FLAG_END_STREAM;
  switch (frame->hd.type) {
  case NGHTTP2_HEADERS:
    st = stream_get(s, frame->hd.stream_id);
    if (!st)
      return 0;
    if (frame->headers.cat == NGHTTP2_HCAT_REQUEST && !st->dispatched)
      dispatch(s, st, end);
    else if (end && !st->ex.closed) /* trailers end the body */
      mx_exchange_push_body_end(&st->ex);
    break;
  case NGHTTP2_DATA:
    st = stream_get(s, frame->hd.stream_id);
    if (st && end && !st->ex.closed)
      mx_exchange_push_body_end(&st->ex);
    break;
  default:
    break;
  }
  return 0;
}

static int on_data_chunk(nghttp2_session *ng, uint8_t flags, int32_t id,
                         const uint8_t *data, size_t len, void *ud) {
  h2_session *s = ud;
  nghttp2_session_consume_connection(ng, len);
  h2_stream *st = stream_get(s, id);
  if (!st || st->ex.closed)
    return 0;
  if (!st->ex.handler || !st->ex.handler->on_request_body) {
    /* Nobody reads this body (the answer was already given): discard it
     * without stalling the stream's window. */
    nghttp2_session_consume_stream(ng, id, len);
    return 0;
  }
  if (mx_exchange_push_body(&st->ex, (const char *)data, len))
    return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
  return 0;
}

static void stream_free(h2_session *s, h2_stream *st, int reason) {
  if (st->prev)
    st->prev->next = st->next;
  else
    s->streams = st->next;
  if (st->next)
    st->next->prev = st->prev;
  s->nstreams--;
  mx_exchange_finish(&st->ex, reason);
  mx_buf_free(&st->path);
  free(st);
}

static int on_stream_close(nghttp2_session *ng, int32_t id,
                           uint32_t error_code, void *ud) {
  h2_session *s = ud;
  h2_stream *st = stream_get(s, id);
  if (!st)
    return 0;
  nghttp2_session_set_stream_user_data(ng, id, NULL);
  bool complete = error_code == NGHTTP2_NO_ERROR && st->ex.resp_ended &&
                  st->ex.respbody.bytes == 0;
  stream_free(s, st, complete ? 0 : MX_ERR_CLOSED);
  return 0;
}

/* Response bytes are not copied into nghttp2's buffer: the read callback
 * only says how many to send (NO_COPY), and send_data below queues the
 * frame header and references to the queued chunks, so one encoded event
 * shared by many streams is never copied per stream. */
static ssize_t read_body(nghttp2_session *ng, int32_t id, uint8_t *buf,
                         size_t length, uint32_t *flags,
                         nghttp2_data_source *src, void *ud) {
  h2_stream *st = src->ptr;
  size_t queued = st->ex.respbody.bytes;
  size_t n = queued < length ? queued : length;
  if (n == queued && st->ex.resp_ended)
    *flags |= NGHTTP2_DATA_FLAG_EOF;
  else if (n == 0) {
    st->deferred = true;
    return NGHTTP2_ERR_DEFERRED;
  }
  if (n)
    *flags |= NGHTTP2_DATA_FLAG_NO_COPY;
  return (ssize_t)n;
}

static int batch_flush(mx_conn *c, write_batch *wb) {
  if (wb->len && mx_chunkq_push_copy(&c->out, wb->data, wb->len))
    return MX_ERR_NOMEM;
  wb->len = 0;
  return 0;
}

/* Copies bytes into the batch, flushing it when full. */
static int batch_add(mx_conn *c, write_batch *wb, const void *data,
                     size_t len) {
  if (wb->len + len > sizeof(wb->data) && batch_flush(c, wb))
    return MX_ERR_NOMEM;
  if (len > sizeof(wb->data))
    return mx_chunkq_push_copy(&c->out, data, len);
  memcpy(wb->data + wb->len, data, len);
  wb->len += len;
  return 0;
}

static int send_data(nghttp2_session *ng, nghttp2_frame *frame,
                     const uint8_t *framehd, size_t length,
                     nghttp2_data_source *src, void *ud) {
  h2_session *s = ud;
  h2_stream *st = src->ptr;
  mx_conn *c = s->conn;
  write_batch *wb = s->wb;
  /* Padding is never asked for (no select_padding callback). */
  if (!wb || frame->data.padlen || length > st->ex.respbody.bytes)
    return NGHTTP2_ERR_CALLBACK_FAILURE;
  if (batch_add(c, wb, framehd, 9))
    return NGHTTP2_ERR_CALLBACK_FAILURE;
  if (length <= SMALL_DATA) {
    /* Heartbeats and the like: copying beats a queue entry. */
    if (wb->len + length > sizeof(wb->data) && batch_flush(c, wb))
      return NGHTTP2_ERR_CALLBACK_FAILURE;
    mx_chunkq_read(&st->ex.respbody, wb->data + wb->len, length);
    wb->len += length;
    return 0;
  }
  if (batch_flush(c, wb) || mx_chunkq_move(&c->out, &st->ex.respbody, length))
    return NGHTTP2_ERR_CALLBACK_FAILURE;
  return 0;
}

/* --- exchange backend ----------------------------------------------- */

static void head_ready(mx_exchange *ex) {
  h2_stream *st = ex->backend_ctx;
  h2_session *s = st->sess;
  size_t n = ex->resp_nheaders + 1;
  nghttp2_nv *nva = calloc(n, sizeof(*nva));
  if (!nva) {
    nghttp2_submit_rst_stream(s->ng, NGHTTP2_FLAG_NONE, st->id,
                              NGHTTP2_INTERNAL_ERROR);
    mx_conn_schedule_write(s->conn);
    return;
  }
  char status[8];
  snprintf(status, sizeof(status), "%d", ex->status);
  nva[0] = (nghttp2_nv){(uint8_t *)":status", (uint8_t *)status, 7,
                        strlen(status), NGHTTP2_NV_FLAG_NONE};
  for (size_t i = 0; i < ex->resp_nheaders; i++) {
    const mx_header *h = &ex->resp_headers[i];
    nva[i + 1] = (nghttp2_nv){(uint8_t *)h->name, (uint8_t *)h->value,
                              h->namelen, h->valuelen, NGHTTP2_NV_FLAG_NONE};
  }
  nghttp2_data_provider prd = {.source.ptr = st, .read_callback = read_body};
  int rv = nghttp2_submit_response(s->ng, st->id, nva, n,
                                   ex->resp_end_with_head ? NULL : &prd);
  free(nva);
  mx_exchange_head_sent(ex); /* nghttp2 copied the header fields */
  if (rv)
    nghttp2_submit_rst_stream(s->ng, NGHTTP2_FLAG_NONE, st->id,
                              NGHTTP2_INTERNAL_ERROR);
  mx_conn_schedule_write(s->conn);
}

static void body_ready(mx_exchange *ex) {
  h2_stream *st = ex->backend_ctx;
  if (st->deferred) {
    st->deferred = false;
    nghttp2_session_resume_data(st->sess->ng, st->id);
  }
  mx_conn_schedule_write(st->sess->conn);
}

static void body_consumed(mx_exchange *ex, size_t n) {
  h2_stream *st = ex->backend_ctx;
  nghttp2_session_consume_stream(st->sess->ng, st->id, n);
  mx_conn_schedule_write(st->sess->conn);
}

static void reset(mx_exchange *ex) {
  h2_stream *st = ex->backend_ctx;
  nghttp2_submit_rst_stream(st->sess->ng, NGHTTP2_FLAG_NONE, st->id,
                            NGHTTP2_INTERNAL_ERROR);
  mx_conn_schedule_write(st->sess->conn);
}

static const mx_exchange_backend backend = {
    .head_ready = head_ready,
    .body_ready = body_ready,
    .body_consumed = body_consumed,
    .reset = reset,
};

/* --- connection protocol -------------------------------------------- */

static int h2_on_read(mx_conn *c, const char *data, size_t len) {
  h2_session *s = session_of(c);
  ssize_t rv = nghttp2_session_mem_recv(s->ng, (const uint8_t *)data, len);
  if (rv < 0) {
    MX_LOG_DEBUG("h2.recv_error", "peer=%s error=\"%s\"", c->peer_ip,
                 nghttp2_strerror((int)rv));
    /* nghttp2 queued a GOAWAY for protocol errors; flush it, then close. */
    return MX_ERR_PROTO;
  }
  if (s->bad_stream_id)
    nghttp2_session_terminate_session(s->ng, NGHTTP2_PROTOCOL_ERROR);
  return 0;
}

static int h2_on_write(mx_conn *c) {
  h2_session *s = session_of(c);
  write_batch wb; /* not zeroed: 16 KiB per call, per heartbeat */
  wb.len = 0;
  s->wb = &wb;
  int rv = 0;
  while (c->out.bytes + wb.len < MX_CONN_WRITE_HIGH) {
    const uint8_t *data;
    ssize_t n = nghttp2_session_mem_send(s->ng, &data);
    if (n < 0) {
      MX_LOG_DEBUG("h2.send_error", "peer=%s error=\"%s\"", c->peer_ip,
                   nghttp2_strerror((int)n));
      rv = n == NGHTTP2_ERR_NOMEM || n == NGHTTP2_ERR_CALLBACK_FAILURE
               ? MX_ERR_NOMEM
               : MX_ERR_PROTO;
      break;
    }
    if (n == 0)
      break;
    if ((rv = batch_add(c, &wb, data, (size_t)n)))
      break;
  }
  s->wb = NULL;
  if (rv || batch_flush(c, &wb))
    return rv ? rv : MX_ERR_NOMEM;
  /* Producers paused on a full queue may go on now. Collected after the
   * send loop so handlers never run inside nghttp2 callbacks. */
  for (h2_stream *st = s->streams, *next; st; st = next) {
    next = st->next;
    mx_exchange_after_send(&st->ex);
  }
  return 0;
}

static bool h2_want_close(mx_conn *c) {
  h2_session *s = session_of(c);
  return !nghttp2_session_want_read(s->ng) &&
         !nghttp2_session_want_write(s->ng);
}

static size_t h2_active(mx_conn *c) { return session_of(c)->nstreams; }

static bool h2_reading_head(mx_conn *c) { return false; }

static void h2_shutdown(mx_conn *c, bool final) {
  h2_session *s = session_of(c);
  if (!s->notice_sent && !final) {
    s->notice_sent = true;
    nghttp2_submit_shutdown_notice(s->ng);
    return;
  }
  if (!s->goaway_sent) {
    s->goaway_sent = true;
    nghttp2_submit_goaway(s->ng, NGHTTP2_FLAG_NONE,
                          nghttp2_session_get_last_proc_stream_id(s->ng),
                          NGHTTP2_NO_ERROR, NULL, 0);
    for (h2_stream *st = s->streams, *next; st; st = next) {
      next = st->next;
      mx_exchange_shutdown(&st->ex);
    }
  }
}

static void h2_free(mx_conn *c) {
  h2_session *s = session_of(c);
  while (s->streams)
    stream_free(s, s->streams, MX_ERR_CLOSED);
  nghttp2_session_del(s->ng);
  free(s);
  c->proto_data = NULL;
}

static const mx_proto_ops h2_ops = {
    .on_read = h2_on_read,
    .on_write = h2_on_write,
    .want_close = h2_want_close,
    .active = h2_active,
    .reading_head = h2_reading_head,
    .shutdown = h2_shutdown,
    .free = h2_free,
};

/* --- session memory ------------------------------------------------ */

/*
 * nghttp2 (1.52) allocates a 16 KiB frame buffer per session up front and
 * writes each outgoing frame at its start: an idle SSE connection only
 * ever writes small frames there. From the heap that buffer is usually
 * the TLS record buffer the handshake has just freed, every page of it
 * resident. Blocks this large come from mmap instead, so only the pages
 * nghttp2 writes cost memory (docs/benchmarks.md, "What one node holds").
 * Each block carries a header saying where it came from.
 */
#define NG_MMAP_MIN (8 * 1024)

typedef struct {
  size_t size;   /* what nghttp2 asked for */
  size_t mapped; /* mmap length, 0 when from malloc */
} ng_block;

static void *ng_malloc(size_t size, void *ud) {
  (void)ud;
  if (size > SIZE_MAX - sizeof(ng_block))
    return NULL;
  size_t total = sizeof(ng_block) + size;
  ng_block *b = NULL;
  size_t mapped = 0;
  if (size >= NG_MMAP_MIN) {
    void *p = mmap(NULL, total, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED) {
      b = p;
      mapped = total;
    }
  }
  if (!b)
    b = malloc(total);
  if (!b)
    return NULL;
  b->size = size;
  b->mapped = mapped;
  return b + 1;
}

static void ng_free(void *ptr, void *ud) {
  (void)ud;
  if (!ptr)
    return;
  ng_block *b = (ng_block *)ptr - 1;
  if (b->mapped)
    munmap(b, b->mapped);
  else
    free(b);
}

static void *ng_calloc(size_t n, size_t size, void *ud) {
  if (size && n > (SIZE_MAX - sizeof(ng_block)) / size)
    return NULL;
  void *p = ng_malloc(n * size, ud);
  ng_block *b = p ? (ng_block *)p - 1 : NULL;
  if (b && !b->mapped) /* fresh mappings are zero already */
    memset(p, 0, n * size);
  return p;
}

static void *ng_realloc(void *ptr, size_t size, void *ud) {
  if (!ptr)
    return ng_malloc(size, ud);
  ng_block *b = (ng_block *)ptr - 1;
  if (!b->mapped && size < NG_MMAP_MIN) {
    ng_block *nb = realloc(b, sizeof(ng_block) + size);
    if (!nb)
      return NULL;
    nb->size = size;
    return nb + 1;
  }
  void *np = ng_malloc(size, ud);
  if (!np)
    return NULL;
  memcpy(np, ptr, b->size < size ? b->size : size);
  ng_free(ptr, ud);
  return np;
}

static nghttp2_mem ng_mem = {NULL, ng_malloc, ng_free, ng_calloc,
                             ng_realloc};

int mx_h2_session_start(mx_conn *c) {
  h2_session *s = calloc(1, sizeof(*s));
  if (!s)
    return MX_ERR_NOMEM;
  s->conn = c;
  nghttp2_session_callbacks *cbs;
  if (nghttp2_session_callbacks_new(&cbs)) {
    free(s);
    return MX_ERR_NOMEM;
  }
  nghttp2_session_callbacks_set_on_begin_headers_callback(cbs,
                                                          on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
  nghttp2_session_callbacks_set_on_begin_frame_callback(cbs, on_begin_frame);
  nghttp2_session_callbacks_set_send_data_callback(cbs, send_data);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs,
                                                            on_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs,
                                                         on_stream_close);
  nghttp2_option *opt;
  if (nghttp2_option_new(&opt)) {
    nghttp2_session_callbacks_del(cbs);
    free(s);
    return MX_ERR_NOMEM;
  }
  nghttp2_option_set_no_auto_window_update(opt, 1);
  /* Flood limits (CVE-2019-9511..9518, CVE-2023-44487 rapid reset,
   * CVE-2024-27316 CONTINUATION flood). */
  nghttp2_option_set_stream_reset_rate_limit(opt, MX_H2_RESET_BURST,
                                             MX_H2_RESET_RATE);
  nghttp2_option_set_max_continuations(opt, MX_H2_MAX_CONTINUATIONS);
  nghttp2_option_set_max_settings(opt, MX_H2_MAX_SETTINGS);
  nghttp2_option_set_max_outbound_ack(opt, MX_H2_MAX_OUTBOUND_ACK);
  /* Our responses repeat few header fields per connection (one SSE
   * stream each, mostly): no HPACK table of our own, ~0.9 KiB less per
   * connection (docs/benchmarks.md). The first response head then opens
   * with a table size update, which every decoder must accept. */
  nghttp2_option_set_max_deflate_dynamic_table_size(opt, 0);
  int rv = nghttp2_session_server_new3(&s->ng, cbs, s, opt, &ng_mem);
  nghttp2_option_del(opt);
  nghttp2_session_callbacks_del(cbs);
  if (rv) {
    free(s);
    return MX_ERR_NOMEM;
  }
  const mx_config *cfg = c->server->cfg;
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS,
       (uint32_t)cfg->max_concurrent_streams},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, MX_H2_WINDOW},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, MX_H2_MAX_HEADER_LIST},
  };
  rv = nghttp2_submit_settings(s->ng, NGHTTP2_FLAG_NONE, iv,
                               sizeof(iv) / sizeof(iv[0]));
  if (rv) {
    nghttp2_session_del(s->ng);
    free(s);
    return MX_ERR_NOMEM;
  }
  c->proto_data = s;
  c->ops = &h2_ops;
  mx_conn_schedule_write(c);
  return 0;
}
