#include "homeserver/client_api.h"

#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/error.h"
#include "common/limits.h"


typedef struct api_call {
  mx_upstream_req *req;
  mx_hs_done_fn done;
  void *ud;
  int status;
  bool answered;
} api_call;

static void answer(api_call *f, const mx_hs_response *resp) {
  if (f->answered)
    return;
  f->answered = true;
  f->req = NULL;
  f->done(f->ud, resp);
}

static int on_head(mx_upstream_req *r, int status, const mx_header *h,
                   size_t n, void *ud) {
  api_call *f = ud;
  f->status = status;
  return 0;
}

static int on_body(mx_upstream_req *r, const char *data, size_t len,
                   void *ud) {
  api_call *f = ud;
  /* Buffered mode: the whole body, once, right before on_done. */
  mx_hs_response resp = {.status = f->status, .body = data, .len = len,
                           .retry_after_ms = -1};
  answer(f, &resp);
  return 0;
}

static void on_done(mx_upstream_req *r, int err, const char *detail,
                    void *ud) {
  api_call *f = ud;
  if (!f->answered) {
    mx_hs_response resp = {.status = err ? 0 : f->status,
                             .err = err,
                             .body = "",
                             .len = 0,
                             .retry_after_ms = -1};
    answer(f, &resp);
  }
  free(f);
}

static const mx_upstream_ops ops = {
    .on_head = on_head, .on_body = on_body, .on_done = on_done};

/* Appends the forwarded parameters (encoded, '&'-separated; the front
 * wrote their names canonically), without set_presence when the request
 * sets its own. */
static int append_query(mx_buf *path, const char *query, bool presence_off) {
  static const char key[] = "set_presence";
  const size_t klen = sizeof(key) - 1;
  for (const char *p = query; *p;) {
    const char *end = strchr(p, '&');
    size_t len = end ? (size_t)(end - p) : strlen(p);
    bool drop = presence_off && len >= klen && !memcmp(p, key, klen) &&
                (len == klen || p[klen] == '=');
    if (len && !drop) {
      int rv = mx_buf_append(path, "&", 1);
      if (!rv)
        rv = mx_buf_append(path, p, len);
      if (rv)
        return rv;
    }
    p += len + (end ? 1 : 0);
  }
  return presence_off ? mx_buf_append(path, "&set_presence=offline", 21) : 0;
}

/* The request's path and query. Returns 0, MX_ERR_LIMIT (over the
 * client's cap on a request line) or MX_ERR_NOMEM. */
static int build_path(mx_buf *path, const mx_hs_request *req) {
  switch (req->call) {
  case MX_HS_WHOAMI:
    return mx_buf_append(path, "/_matrix/client/v3/account/whoami", 33);
  case MX_HS_JOINED_ROOMS:
    return mx_buf_append(path, "/_matrix/client/v3/joined_rooms", 31);
  case MX_HS_JOINED_MEMBERS: {
    int rv = mx_buf_append(path, "/_matrix/client/v3/rooms/", 25);
    if (!rv)
      rv = mx_buf_append_urlencoded(path, req->room_id, req->room_len);
    return rv ? rv : mx_buf_append(path, "/joined_members", 15);
  }
  case MX_HS_SYNC:
    break;
  }
  int rv = mx_buf_appendf(path, "/_matrix/client/v3/sync?timeout=%ld",
                          req->timeout_ms);
  if (!rv)
    rv = append_query(path, req->query ? req->query : "", req->presence_off);
  if (!rv && req->since) {
    rv = mx_buf_append(path, "&since=", 7);
    if (!rv)
      rv = mx_buf_append_urlencoded(path, req->since, strlen(req->since));
  }
  if (!rv && req->full_state)
    rv = mx_buf_append(path, "&full_state=true", 16);
  return rv;
}

static int start(void *impl, const mx_hs_request *req, mx_hs_done_fn done,
                 void *ud, void **handle) {
  mx_upstream *u = impl;
  *handle = NULL;
  api_call *f = calloc(1, sizeof(*f));
  if (!f)
    return MX_ERR_NOMEM;
  f->done = done;
  f->ud = ud;
  mx_buf path, auth;
  mx_buf_init(&path, MX_UPSTREAM_MAX_PATH);
  mx_buf_init(&auth, MX_UPSTREAM_MAX_AUTH);
  int rv = build_path(&path, req);
  if (!rv)
    rv = mx_buf_appendf(&auth, "Bearer %s", req->token);
  if (rv) {
    mx_buf_free(&path);
    mx_buf_free(&auth);
    free(f);
    return rv;
  }
  mx_header hs[4];
  size_t n = 0;
  hs[n++] = (mx_header){"authorization", 13, auth.data, auth.len};
  hs[n++] = (mx_header)MX_HEADER_LIT("accept", "application/json");
  if (req->peer_ip)
    hs[n++] = (mx_header){"x-forwarded-for", 15, req->peer_ip,
                          strlen(req->peer_ip)};
  if (req->user_agent)
    hs[n++] = (mx_header){"user-agent", 10, req->user_agent,
                          strlen(req->user_agent)};
  mx_upstream_reqinfo info = {
      .method = "GET",
      .path = path.data,
      .headers = hs,
      .nheaders = n,
      .timeout_ms = req->timeout_ms + MX_UPSTREAM_SYNC_MARGIN_MS,
      .buffer_body_max = MX_UPSTREAM_MAX_JSON,
  };
  rv = mx_upstream_start(u, &info, &ops, f, &f->req);
  mx_buf_free(&path);
  mx_buf_free(&auth);
  if (rv) {
    free(f);
    return rv;
  }
  *handle = f;
  return 0;
}

static void cancel(void *impl, void *handle) {
  api_call *f = handle;
  if (f->req)
    mx_upstream_cancel(f->req);
  free(f);
}

void mx_client_api_init(mx_hs_api *api, mx_upstream *u) {
  api->start = start;
  api->cancel = cancel;
  api->impl = u;
}
