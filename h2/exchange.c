#include "h2/exchange.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/error.h"
#include "common/limits.h"
#include "common/log.h"
#include "common/metrics.h"
#include "h2/conn.h"
#include "h2/server.h"

/* While parsing, header strings live in the arena at these offsets; the
 * pointers in ex->hdrs are resolved by mx_exchange_seal_head(). */
typedef struct hoff {
  size_t name, nlen, value, vlen;
} hoff;

void mx_exchange_init(mx_exchange *ex, mx_conn *conn,
                      const mx_exchange_backend *backend, void *backend_ctx) {
  memset(ex, 0, sizeof(*ex));
  ex->conn = conn;
  ex->backend = backend;
  ex->backend_ctx = backend_ctx;
  mx_buf_init(&ex->arena, MX_H1_MAX_REQUEST_LINE + MX_H2_MAX_HEADER_LIST);
  mx_buf_init(&ex->resp_arena, 64 * 1024);
  mx_chunkq_init(&ex->reqbody);
  mx_chunkq_init(&ex->respbody);
  ex->req.content_length = -1;
  ex->req.proto = conn->proto;
  ex->req.http_minor = 1;
  ex->req.peer_ip = conn->peer_ip;
  ex->req.tls = conn->ssl != NULL;
  ex->req.scheme = conn->ssl ? "https" : "http";
  ex->resp_content_length = -1;
  ex->started = ev_now(conn->loop);
  mx_stats.streams_open++;
}

static int arena_add(mx_exchange *ex, const char *s, size_t len,
                     size_t *off) {
  *off = ex->arena.len;
  int rv = mx_buf_append(&ex->arena, s, len);
  if (rv == 0)
    rv = mx_buf_append(&ex->arena, "", 1); /* NUL-terminate each string */
  return rv ? MX_ERR_LIMIT : 0;
}

int mx_exchange_add_header(mx_exchange *ex, const char *name, size_t nlen,
                           const char *value, size_t vlen) {
  if (ex->sealed)
    return 0; /* trailers: not part of the request head */
  if (ex->nhdrs == ex->hdrs_cap) {
    size_t cap = ex->hdrs_cap ? ex->hdrs_cap * 2 : 16;
    if (cap > MX_H1_MAX_HEADERS * 2)
      return MX_ERR_LIMIT;
    /* hdrs doubles as the offset table until sealed. */
    void *p = realloc(ex->hdrs, cap * (sizeof(mx_header) > sizeof(hoff)
                                           ? sizeof(mx_header)
                                           : sizeof(hoff)));
    if (!p)
      return MX_ERR_NOMEM;
    ex->hdrs = p;
    ex->hdrs_cap = cap;
  }
  hoff o;
  if (arena_add(ex, name, nlen, &o.name) || arena_add(ex, value, vlen, &o.value))
    return MX_ERR_LIMIT;
  o.nlen = nlen;
  o.vlen = vlen;
  /* Header names are case-insensitive: store them lower case. */
  for (size_t i = 0; i < nlen; i++) {
    char *ch = ex->arena.data + o.name + i;
    if (*ch >= 'A' && *ch <= 'Z')
      *ch = (char)(*ch + 32);
  }
  memcpy((hoff *)(void *)ex->hdrs + ex->nhdrs, &o, sizeof(o));
  ex->nhdrs++;
  return 0;
}

int mx_exchange_set_line(mx_exchange *ex, const char *method, size_t mlen,
                         const char *target, size_t tlen) {
  if (arena_add(ex, method, mlen, &ex->off_method) ||
      arena_add(ex, target, tlen, &ex->off_target))
    return MX_ERR_LIMIT;
  ex->req.method_len = mlen;
  ex->req.target_len = tlen;
  ex->has_line = true;
  return 0;
}

int mx_exchange_set_authority(mx_exchange *ex, const char *v, size_t len) {
  if (arena_add(ex, v, len, &ex->off_authority))
    return MX_ERR_LIMIT;
  ex->req.authority_len = len;
  ex->has_authority = true;
  return 0;
}

/* A long-lived exchange (an SSE stream) keeps its request head for its
 * whole life: give back the slack the doubling growth left, before any
 * pointer into the arena is taken. Shrinking never fails for good: a
 * refused realloc leaves the larger block. */
static void shrink_head(mx_exchange *ex) {
  if (ex->arena.data && ex->arena.cap > ex->arena.len) {
    char *p = realloc(ex->arena.data, ex->arena.len + 1);
    if (p) {
      ex->arena.data = p;
      ex->arena.cap = ex->arena.len;
    }
  }
  if (ex->hdrs && ex->hdrs_cap > ex->nhdrs && ex->nhdrs) {
    mx_header *p = realloc(ex->hdrs, ex->nhdrs * sizeof(mx_header));
    if (p) {
      ex->hdrs = p;
      ex->hdrs_cap = ex->nhdrs;
    }
  }
}

void mx_exchange_seal_head(mx_exchange *ex) {
  if (ex->sealed)
    return;
  ex->sealed = true;
  shrink_head(ex);
  if (ex->has_line) {
    ex->req.method = ex->arena.data + ex->off_method;
    ex->req.target = ex->arena.data + ex->off_target;
  }
  if (ex->has_authority)
    ex->req.authority = ex->arena.data + ex->off_authority;
  for (size_t i = 0; i < ex->nhdrs; i++) {
    hoff o;
    memcpy(&o, (hoff *)(void *)ex->hdrs + i, sizeof(o));
    ex->hdrs[i].name = ex->arena.data + o.name;
    ex->hdrs[i].namelen = o.nlen;
    ex->hdrs[i].value = ex->arena.data + o.value;
    ex->hdrs[i].valuelen = o.vlen;
  }
  ex->req.headers = ex->hdrs;
  ex->req.nheaders = ex->nhdrs;
  if (!ex->req.target) {
    ex->req.method = "";
    ex->req.target = "";
  }
  const char *q = memchr(ex->req.target, '?', ex->req.target_len);
  ex->req.path_end = q ? q : ex->req.target + ex->req.target_len;
  if (!ex->req.authority) {
    const mx_header *host = mx_http_find(ex->hdrs, ex->nhdrs, "host");
    if (host) {
      ex->req.authority = host->value;
      ex->req.authority_len = host->valuelen;
    }
  }
  const mx_header *cl = mx_http_find(ex->hdrs, ex->nhdrs, "content-length");
  if (cl) {
    char *end;
    long long v = strtoll(cl->value, &end, 10);
    if (end != cl->value && *end == '\0' && v >= 0)
      ex->req.content_length = v;
  }
  mx_stats.requests[ex->req.proto]++;
}

const mx_request *mx_exchange_request(const mx_exchange *ex) {
  return &ex->req;
}

const mx_header *mx_exchange_header(const mx_exchange *ex, const char *name) {
  return mx_http_find(ex->req.headers, ex->req.nheaders, name);
}

void mx_exchange_set_handler(mx_exchange *ex, const mx_handler *h,
                             void *ctx) {
  ex->handler = h;
  ex->handler_ctx = ctx;
}

/* --- request body --------------------------------------------------- */

int mx_exchange_push_body(mx_exchange *ex, const char *data, size_t len) {
  int rv = mx_chunkq_push_copy(&ex->reqbody, data, len);
  if (rv == 0 && ex->handler && ex->handler->on_request_body)
    ex->handler->on_request_body(ex, ex->handler_ctx);
  return rv;
}

void mx_exchange_push_body_end(mx_exchange *ex) {
  ex->reqbody_ended = true;
  if (ex->handler && ex->handler->on_request_body)
    ex->handler->on_request_body(ex, ex->handler_ctx);
}

size_t mx_exchange_body_read(mx_exchange *ex, void *dst, size_t max) {
  size_t n = mx_chunkq_read(&ex->reqbody, dst, max);
  if (n && ex->backend->body_consumed && !ex->closed)
    ex->backend->body_consumed(ex, n);
  return n;
}

size_t mx_exchange_body_available(const mx_exchange *ex) {
  return ex->reqbody.bytes;
}

bool mx_exchange_body_done(const mx_exchange *ex) {
  return ex->reqbody_ended && ex->reqbody.bytes == 0;
}

/* --- response ------------------------------------------------------- */

static bool is_connection_specific(const mx_header *h) {
  return mx_http_is_hop_by_hop(h->name, h->namelen);
}

int mx_exchange_respond(mx_exchange *ex, int status, const mx_header *headers,
                        size_t n, bool end) {
  if (ex->responded || ex->closed)
    return MX_ERR_INVALID;
  mx_header *copy = calloc(n ? n : 1, sizeof(*copy));
  if (!copy)
    return MX_ERR_NOMEM;
  size_t kept = 0;
  /* Two passes: copy strings, then point into the settled arena. */
  size_t *offs = calloc(n ? n * 2 : 1, sizeof(size_t));
  if (!offs) {
    free(copy);
    return MX_ERR_NOMEM;
  }
  for (size_t i = 0; i < n; i++) {
    const mx_header *h = &headers[i];
    if (is_connection_specific(h))
      continue;
    size_t no = ex->resp_arena.len;
    int rv = mx_buf_append(&ex->resp_arena, h->name, h->namelen);
    if (!rv)
      rv = mx_buf_append(&ex->resp_arena, "", 1);
    size_t vo = ex->resp_arena.len;
    if (!rv)
      rv = mx_buf_append(&ex->resp_arena, h->value, h->valuelen);
    if (!rv)
      rv = mx_buf_append(&ex->resp_arena, "", 1);
    if (rv) {
      free(copy);
      free(offs);
      return rv;
    }
    for (size_t k = 0; k < h->namelen; k++) {
      char *ch = ex->resp_arena.data + no + k;
      if (*ch >= 'A' && *ch <= 'Z')
        *ch = (char)(*ch + 32);
    }
    copy[kept].namelen = h->namelen;
    copy[kept].valuelen = h->valuelen;
    offs[2 * kept] = no;
    offs[2 * kept + 1] = vo;
    if (mx_http_name_is(h, "content-length")) {
      char tmp[32];
      size_t l = h->valuelen < sizeof(tmp) - 1 ? h->valuelen : sizeof(tmp) - 1;
      memcpy(tmp, h->value, l);
      tmp[l] = '\0';
      ex->resp_content_length = strtoll(tmp, NULL, 10);
    }
    kept++;
  }
  for (size_t i = 0; i < kept; i++) {
    copy[i].name = ex->resp_arena.data + offs[2 * i];
    copy[i].value = ex->resp_arena.data + offs[2 * i + 1];
  }
  free(offs);
  ex->resp_headers = copy;
  ex->resp_nheaders = kept;
  ex->status = status;
  ex->responded = true;
  ex->resp_end_with_head = end;
  ex->resp_ended = end;
  int cls = status / 100;
  mx_stats.responses_by_class[cls >= 1 && cls <= 5 ? cls : 0]++;
  ex->backend->head_ready(ex);
  return 0;
}

void mx_exchange_head_sent(mx_exchange *ex) {
  free(ex->resp_headers);
  ex->resp_headers = NULL;
  ex->resp_nheaders = 0;
  mx_buf_free(&ex->resp_arena);
}

int mx_exchange_write(mx_exchange *ex, const void *data, size_t len) {
  if (!ex->responded || ex->resp_ended || ex->closed)
    return MX_ERR_INVALID;
  if (len == 0)
    return 0;
  int rv = mx_chunkq_push_copy(&ex->respbody, data, len);
  if (rv)
    return rv;
  ex->resp_bytes += len;
  ex->backend->body_ready(ex);
  return 0;
}

int mx_exchange_write_chunk(mx_exchange *ex, mx_chunk *chunk) {
  if (!ex->responded || ex->resp_ended || ex->closed)
    return MX_ERR_INVALID;
  int rv = mx_chunkq_push(&ex->respbody, chunk);
  if (rv)
    return rv;
  ex->resp_bytes += chunk->len;
  ex->backend->body_ready(ex);
  return 0;
}

int mx_exchange_end(mx_exchange *ex) {
  if (!ex->responded || ex->closed)
    return MX_ERR_INVALID;
  if (ex->resp_ended)
    return 0;
  ex->resp_ended = true;
  ex->backend->body_ready(ex);
  return 0;
}

size_t mx_exchange_queued(const mx_exchange *ex) { return ex->respbody.bytes; }

bool mx_exchange_should_pause(mx_exchange *ex) {
  if (ex->respbody.bytes >= MX_BODYQ_HIGH) {
    ex->want_writable = true;
    return true;
  }
  return false;
}

bool mx_exchange_responded(const mx_exchange *ex) { return ex->responded; }

void mx_exchange_notify_drained(mx_exchange *ex) { ex->want_writable = true; }

void mx_exchange_reset(mx_exchange *ex) {
  if (!ex->closed)
    ex->backend->reset(ex);
}

void mx_exchange_error(mx_exchange *ex, int status, const char *errcode,
                       const char *error, const mx_header *extra,
                       size_t nextra) {
  if (ex->responded) {
    mx_exchange_reset(ex);
    return;
  }
  mx_buf body;
  mx_buf_init(&body, 4096);
  int rv = mx_http_matrix_error(&body, errcode, error);
  if (rv) {
    mx_buf_free(&body);
    mx_exchange_reset(ex); /* no memory for even an error */
    return;
  }
  char len[24];
  snprintf(len, sizeof(len), "%zu", body.len);
  mx_header hs[16];
  size_t n = 0;
  hs[n++] = (mx_header)MX_HEADER_LIT("content-type", "application/json");
  hs[n++] = (mx_header){"content-length", 14, len, strlen(len)};
  hs[n++] = (mx_header)MX_HEADER_LIT("cache-control", "no-cache");
  for (size_t i = 0; i < nextra && n < sizeof(hs) / sizeof(hs[0]); i++)
    hs[n++] = extra[i];
  bool head = ex->req.method_len == 4 && !memcmp(ex->req.method, "HEAD", 4);
  rv = mx_exchange_respond(ex, status, hs, n, head);
  if (rv == 0 && !head) {
    rv = mx_exchange_write(ex, body.data, body.len);
    if (rv == 0)
      rv = mx_exchange_end(ex);
  }
  mx_buf_free(&body);
  if (rv)
    mx_exchange_reset(ex);
}

/* --- protocol side -------------------------------------------------- */

void mx_exchange_after_send(mx_exchange *ex) {
  if (ex->want_writable && ex->respbody.bytes < MX_BODYQ_LOW && !ex->closed) {
    ex->want_writable = false;
    if (ex->handler && ex->handler->on_writable)
      ex->handler->on_writable(ex, ex->handler_ctx);
  }
}

void mx_exchange_shutdown(mx_exchange *ex) {
  if (!ex->closed && ex->handler && ex->handler->on_shutdown)
    ex->handler->on_shutdown(ex, ex->handler_ctx);
}

static void access_log(const mx_exchange *ex, int reason) {
  char target[512];
  mx_log_redact_target(ex->req.target ? ex->req.target : "",
                       ex->req.target_len, target, sizeof(target));
  double ms = (ev_now(ex->conn->loop) - ex->started) * 1000.0;
  MX_LOG_INFO("access",
              "peer=%s proto=%s method=%.*s target=%s status=%d bytes=%llu "
              "ms=%.1f%s",
              ex->req.peer_ip, ex->req.proto == MX_PROTO_H2 ? "h2" : "h1",
              (int)ex->req.method_len, ex->req.method ? ex->req.method : "-",
              target, ex->status, (unsigned long long)ex->resp_bytes, ms,
              reason ? " aborted=1" : "");
}

void mx_exchange_finish(mx_exchange *ex, int reason) {
  if (ex->closed)
    return;
  ex->closed = true;
  mx_stats.streams_open--;
  if (ex->req.method && ex->conn->server->cfg->access_log)
    access_log(ex, reason);
  if (ex->handler && ex->handler->on_close)
    ex->handler->on_close(ex, ex->handler_ctx, reason);
  ex->handler = NULL;
  mx_chunkq_clear(&ex->reqbody);
  mx_chunkq_clear(&ex->respbody);
  mx_buf_free(&ex->arena);
  mx_buf_free(&ex->resp_arena);
  free(ex->hdrs);
  free(ex->resp_headers);
  ex->hdrs = NULL;
  ex->resp_headers = NULL;
}
