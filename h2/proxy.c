/*
 * The reverse proxy: a client-API request goes to the homeserver over the
 * pooled HTTP/1.1 upstream client, bodies streaming both ways.
 *
 * Backpressure: the upstream response is paused while the client's
 * queue is above its high mark (resumed on on_writable); the upload is
 * pulled only as fast as the homeserver reads it (the client is
 * flow-controlled meanwhile). Neither direction holds a whole body.
 */
#include "h2/proxy.h"

#include <json-c/json.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/error.h"
#include "common/limits.h"
#include "common/log.h"
#include "h2/conn.h"
#include "h2/router.h"
#include "homeserver/upstream.h"

/* The versions document is small; we add our feature flag to it. */

typedef struct proxy {
  mx_exchange *ex;
  mx_server *server;
  mx_upstream_req *up;
  bool waiting_body;    /* read_body said AGAIN */
  bool rewrite_versions;
  int status;           /* kept for the versions rewrite */
  mx_buf head_arena;    /* header strings kept for the versions rewrite */
  mx_header *heads;
  size_t nheads;
} proxy;

static void proxy_free(proxy *p) {
  mx_buf_free(&p->head_arena);
  free(p->heads);
  free(p);
}

/* --- upstream side -------------------------------------------------- */

static bool skip_response_header(const mx_header *h, const mx_header *all,
                                 size_t n) {
  if (mx_http_is_hop_by_hop(h->name, h->namelen))
    return true;
  const mx_header *conn = mx_http_find(all, n, "connection");
  return conn && mx_http_connection_lists(conn->value, conn->valuelen,
                                          h->name, h->namelen);
}

static int up_head(mx_upstream_req *r, int status, const mx_header *hs,
                   size_t n, void *ud) {
  proxy *p = ud;
  mx_header *out = calloc(n ? n : 1, sizeof(*out));
  if (!out)
    return MX_ERR_NOMEM;
  size_t k = 0;
  for (size_t i = 0; i < n; i++) {
    if (skip_response_header(&hs[i], hs, n))
      continue;
    if (p->rewrite_versions && mx_http_name_is(&hs[i], "content-length"))
      continue;
    out[k++] = hs[i];
  }
  /* We asked for identity; a homeserver that encodes anyway gets its
   * answer passed through untouched rather than mangled. */
  const mx_header *ce = mx_http_find(hs, n, "content-encoding");
  if (p->rewrite_versions && ce &&
      !(ce->valuelen == 8 && !strncasecmp(ce->value, "identity", 8))) {
    p->rewrite_versions = false;
    k = 0;
    for (size_t i = 0; i < n; i++)
      if (!skip_response_header(&hs[i], hs, n))
        out[k++] = hs[i];
  }
  int rv;
  if (p->rewrite_versions && status == 200) {
    /* Keep the head until the body is rewritten. */
    p->status = status;
    mx_buf_init(&p->head_arena, MX_UPSTREAM_MAX_HEADER * 2);
    size_t *offs = calloc(k ? 2 * k : 1, sizeof(size_t));
    rv = offs ? 0 : MX_ERR_NOMEM;
    for (size_t i = 0; rv == 0 && i < k; i++) {
      offs[2 * i] = p->head_arena.len;
      rv = mx_buf_append(&p->head_arena, out[i].name, out[i].namelen);
      offs[2 * i + 1] = p->head_arena.len;
      if (!rv)
        rv = mx_buf_append(&p->head_arena, out[i].value, out[i].valuelen);
    }
    for (size_t i = 0; rv == 0 && i < k; i++) {
      out[i].name = p->head_arena.data + offs[2 * i];
      out[i].value = p->head_arena.data + offs[2 * i + 1];
    }
    free(offs);
    if (rv) {
      free(out);
      return rv;
    }
    p->heads = out;
    p->nheads = k;
    return 0;
  }
  p->rewrite_versions = false;
  const mx_request *req = mx_exchange_request(p->ex);
  bool head = req->method_len == 4 && !memcmp(req->method, "HEAD", 4);
  rv = mx_exchange_respond(p->ex, status, out, k, head);
  free(out);
  return rv;
}

static int up_body(mx_upstream_req *r, const char *data, size_t len,
                   void *ud) {
  proxy *p = ud;
  if (p->rewrite_versions)
    return 0; /* delivered whole at the end (buffer_body_max) */
  if (mx_exchange_should_pause(p->ex))
    return MX_ERR_AGAIN; /* re-delivered after on_writable */
  if (!mx_exchange_responded(p->ex) || p->ex->resp_ended)
    return 0;
  return mx_exchange_write(p->ex, data, len);
}

static void send_versions(proxy *p, const char *body, size_t len) {
  json_tokener *tok = json_tokener_new();
  json_object *doc = tok ? json_tokener_parse_ex(tok, body, (int)len) : NULL;
  const char *out = body;
  size_t outlen = len;
  if (doc && json_object_is_type(doc, json_type_object)) {
    json_object *uf;
    if (!json_object_object_get_ex(doc, "unstable_features", &uf) ||
        !json_object_is_type(uf, json_type_object)) {
      uf = json_object_new_object();
      json_object_object_add(doc, "unstable_features", uf);
    }
    json_object_object_add(uf, "org.matrix.msc2108",
                           json_object_new_boolean(1));
    out = json_object_to_json_string_ext(doc, JSON_C_TO_STRING_PLAIN);
    outlen = strlen(out);
  }
  char cl[24];
  snprintf(cl, sizeof(cl), "%zu", outlen);
  mx_header *hs = realloc(p->heads, (p->nheads + 1) * sizeof(*hs));
  if (hs) {
    p->heads = hs;
    hs[p->nheads] = (mx_header){"content-length", 14, cl, strlen(cl)};
    if (mx_exchange_respond(p->ex, p->status, hs, p->nheads + 1, false) == 0) {
      if (mx_exchange_write(p->ex, out, outlen) || mx_exchange_end(p->ex))
        mx_exchange_reset(p->ex);
    }
  } else {
    mx_exchange_reset(p->ex);
  }
  json_object_put(doc);
  json_tokener_free(tok);
}

static int up_versions_body(mx_upstream_req *r, const char *data, size_t len,
                            void *ud) {
  proxy *p = ud;
  if (p->rewrite_versions)
    send_versions(p, data, len);
  else
    return up_body(r, data, len, ud);
  return 0;
}

static void up_done(mx_upstream_req *r, int err, const char *detail,
                    void *ud) {
  proxy *p = ud;
  p->up = NULL;
  if (err == 0) {
    if (mx_exchange_responded(p->ex)) {
      if (mx_exchange_end(p->ex))
        mx_exchange_reset(p->ex);
    } else
      mx_exchange_error(p->ex, 502, "M_UNKNOWN",
                        "The homeserver sent an incomplete response", NULL, 0);
    return;
  }
  MX_LOG_WARN("proxy.upstream_failed", "peer=%s error=\"%s\"",
              p->ex->req.peer_ip, detail ? detail : mx_strerror(err));
  if (err == MX_ERR_TIMEOUT)
    mx_exchange_error(p->ex, 504, "M_UNKNOWN",
                      "The homeserver did not answer in time", NULL, 0);
  else if (err == MX_ERR_LIMIT)
    mx_exchange_error(p->ex, 502, "M_UNKNOWN",
                      "The homeserver's response was too large", NULL, 0);
  else
    mx_exchange_error(p->ex, 502, "M_UNKNOWN",
                      "The homeserver is unreachable", NULL, 0);
}

static ssize_t up_read_body(mx_upstream_req *r, char *buf, size_t max,
                            void *ud) {
  proxy *p = ud;
  size_t n = mx_exchange_body_read(p->ex, buf, max);
  if (n)
    return (ssize_t)n;
  if (mx_exchange_body_done(p->ex))
    return 0;
  p->waiting_body = true;
  return MX_ERR_AGAIN;
}

static const mx_upstream_ops up_ops = {
    .on_head = up_head,
    .on_body = up_body,
    .on_done = up_done,
    .read_body = up_read_body,
};

static const mx_upstream_ops up_versions_ops = {
    .on_head = up_head,
    .on_body = up_versions_body,
    .on_done = up_done,
};

/* --- client side ---------------------------------------------------- */

static void on_request_body(mx_exchange *ex, void *ctx) {
  proxy *p = ctx;
  if (p->waiting_body && p->up) {
    p->waiting_body = false;
    mx_upstream_resume_request(p->up);
  }
}

static void on_writable(mx_exchange *ex, void *ctx) {
  proxy *p = ctx;
  if (p->up)
    mx_upstream_resume_response(p->up);
}

static void on_close(mx_exchange *ex, void *ctx, int reason) {
  proxy *p = ctx;
  /* A client that goes away cancels its upstream transfer. */
  if (p->up)
    mx_upstream_cancel(p->up);
  proxy_free(p);
}

static const mx_handler proxy_handler = {
    .name = "proxy",
    .on_request_body = on_request_body,
    .on_writable = on_writable,
    .on_close = on_close,
};

/* Headers the proxy sets itself or that describe the client connection. */
static bool drop_request_header(const mx_header *h, const mx_request *r,
                                bool trusted) {
  if (mx_http_is_hop_by_hop(h->name, h->namelen))
    return true;
  const mx_header *conn = mx_http_find(r->headers, r->nheaders, "connection");
  if (conn && mx_http_connection_lists(conn->value, conn->valuelen, h->name,
                                       h->namelen))
    return true;
  static const char *const own[] = {"host", "content-length", "expect",
                                    "x-forwarded-proto",
                                    "x-forwarded-host", "x-real-ip",
                                    "forwarded"};
  for (size_t i = 0; i < sizeof(own) / sizeof(own[0]); i++)
    if (mx_http_name_is(h, own[i]))
      return true;
  return !trusted && mx_http_name_is(h, "x-forwarded-for");
}

static bool peer_trusted(const mx_server *s, const char *ip) {
  const mx_strlist *l = &s->cfg->trusted_proxy;
  for (size_t i = 0; i < l->count; i++)
    if (!strcmp(l->items[i], ip))
      return true;
  return false;
}

void mx_proxy_handle(mx_server *s, mx_exchange *ex) {
  const mx_request *r = mx_exchange_request(ex);
  proxy *p = calloc(1, sizeof(*p));
  mx_header *hs = calloc(r->nheaders + 8, sizeof(*hs));
  mx_buf cookie; /* HTTP/2 may split cookies; HTTP/1.1 wants one field */
  mx_buf_init(&cookie, MX_H2_MAX_HEADER_LIST);
  if (!p || !hs) {
    free(p);
    free(hs);
    mx_exchange_error(ex, 503, "M_UNKNOWN", "Out of memory", NULL, 0);
    return;
  }
  p->ex = ex;
  p->server = s;
  bool trusted = peer_trusted(s, r->peer_ip);
  size_t plen = (size_t)(r->path_end - r->target);
  p->rewrite_versions = r->method_len == 3 && !memcmp(r->method, "GET", 3) &&
                        plen == strlen("/_matrix/client/versions") &&
                        !memcmp(r->target, "/_matrix/client/versions", plen);
  size_t n = 0;
  bool cookie_failed = false;
  for (size_t i = 0; i < r->nheaders; i++) {
    const mx_header *h = &r->headers[i];
    /* The versions answer is rewritten: ask for it unencoded. */
    if (p->rewrite_versions && mx_http_name_is(h, "accept-encoding"))
      continue;
    if (mx_http_name_is(h, "cookie")) {
      if ((cookie.len && mx_buf_append(&cookie, "; ", 2)) ||
          mx_buf_append(&cookie, h->value, h->valuelen))
        cookie_failed = true;
    } else if (!drop_request_header(h, r, trusted)) {
      hs[n++] = *h;
    }
  }
  if (cookie_failed) {
    /* The cookies do not fit in one header field (the decoded header
     * list is capped, so only memory can fail here). */
    free(p);
    free(hs);
    mx_buf_free(&cookie);
    mx_exchange_error(ex, 503, "M_UNKNOWN", "Out of memory", NULL, 0);
    return;
  }
  if (cookie.len)
    hs[n++] = (mx_header){"cookie", 6, cookie.data, cookie.len};
  /* The homeserver takes the leftmost X-Forwarded-For as the client:
   * overwrite it with the peer, unless the peer is a trusted proxy (its
   * header is then forwarded as is). */
  if (!trusted || !mx_http_find(r->headers, r->nheaders, "x-forwarded-for"))
    hs[n++] = (mx_header){"x-forwarded-for", 15, r->peer_ip,
                          strlen(r->peer_ip)};
  hs[n++] = (mx_header){"x-forwarded-proto", 17, r->tls ? "https" : "http",
                        r->tls ? 5 : 4};
  if (r->authority) {
    hs[n++] = (mx_header){"host", 4, r->authority, r->authority_len};
    hs[n++] = (mx_header){"x-forwarded-host", 16, r->authority,
                          r->authority_len};
  }
  char method[32];
  snprintf(method, sizeof(method), "%.*s", (int)r->method_len, r->method);
  mx_upstream_reqinfo info = {
      .method = method,
      .path = r->target,
      .headers = hs,
      .nheaders = n,
      .has_body = r->has_body,
      .content_length = r->content_length,
      .timeout_ms = s->cfg->upstream_timeout * 1000,
      .buffer_body_max = p->rewrite_versions ? MX_PROXY_VERSIONS_MAX : 0,
  };
  mx_exchange_set_handler(ex, &proxy_handler, p);
  int rv = mx_upstream_start(s->upstream, &info,
                             p->rewrite_versions ? &up_versions_ops : &up_ops,
                             p, &p->up);
  free(hs);
  mx_buf_free(&cookie);
  if (rv == MX_ERR_INVALID)
    /* The request line or a header cannot be forwarded as it is (a byte
     * HTTP/1.1 cannot carry to the homeserver). */
    mx_exchange_error(ex, 400, "M_UNRECOGNIZED",
                      "The request cannot be forwarded as sent", NULL, 0);
  else if (rv)
    mx_exchange_error(ex, 503, "M_UNKNOWN", "Out of memory", NULL, 0);
}
