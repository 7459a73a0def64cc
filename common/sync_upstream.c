#include "common/sync_upstream.h"

#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/error.h"
#include "common/limits.h"

/* Long-polls get this much longer than their timeout= before the
 * transfer is considered dead; first (timeout=0) syncs of big accounts
 * can take a while too. */
#define SYNC_TRANSFER_MARGIN_MS 120000

typedef struct sync_fetch {
  mx_upstream_req *req;
  mx_sync_done_fn done;
  void *ud;
  int status;
  bool answered;
} sync_fetch;

static void answer(sync_fetch *f, const mx_sync_response *resp) {
  if (f->answered)
    return;
  f->answered = true;
  f->req = NULL;
  f->done(f->ud, resp);
}

static int on_head(mx_upstream_req *r, int status, const mx_header *h,
                   size_t n, void *ud) {
  sync_fetch *f = ud;
  f->status = status;
  return 0;
}

static int on_body(mx_upstream_req *r, const char *data, size_t len,
                   void *ud) {
  sync_fetch *f = ud;
  /* Buffered mode: the whole body, once, right before on_done. */
  mx_sync_response resp = {.status = f->status, .body = data, .len = len,
                           .retry_after_ms = -1};
  answer(f, &resp);
  return 0;
}

static void on_done(mx_upstream_req *r, int err, const char *detail,
                    void *ud) {
  sync_fetch *f = ud;
  if (!f->answered) {
    mx_sync_response resp = {.status = err ? 0 : f->status,
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

static void *start(void *impl, const mx_sync_request *req,
                   mx_sync_done_fn done, void *ud) {
  mx_upstream *u = impl;
  sync_fetch *f = calloc(1, sizeof(*f));
  if (!f)
    return NULL;
  f->done = done;
  f->ud = ud;
  mx_buf path, auth;
  mx_buf_init(&path, MX_H1_MAX_REQUEST_LINE * 2);
  mx_buf_init(&auth, 8192);
  int rv;
  if (req->path) {
    /* A plain authenticated GET (whoami, joined_rooms). */
    rv = mx_buf_append(&path, req->path, strlen(req->path));
    if (!rv)
      rv = mx_buf_appendf(&auth, "Bearer %s", req->token);
    goto send;
  }
  rv = mx_buf_appendf(&path, "/_matrix/client/v3/sync?timeout=%ld",
                      req->timeout_ms);
  if (!rv && req->query && *req->query)
    rv = mx_buf_appendf(&path, "&%s", req->query);
  if (!rv && req->since) {
    rv = mx_buf_append(&path, "&since=", 7);
    if (!rv)
      rv = mx_buf_append_urlencoded(&path, req->since, strlen(req->since));
  }
  if (!rv && req->full_state)
    rv = mx_buf_append(&path, "&full_state=true", 16);
  if (!rv)
    rv = mx_buf_appendf(&auth, "Bearer %s", req->token);
send:
  if (rv) {
    mx_buf_free(&path);
    mx_buf_free(&auth);
    free(f);
    return NULL;
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
      .timeout_ms = req->timeout_ms + SYNC_TRANSFER_MARGIN_MS,
      .buffer_body_max = MX_UPSTREAM_MAX_JSON,
  };
  f->req = mx_upstream_start(u, &info, &ops, f);
  mx_buf_free(&path);
  mx_buf_free(&auth);
  if (!f->req) {
    free(f);
    return NULL;
  }
  return f;
}

static void cancel(void *impl, void *handle) {
  sync_fetch *f = handle;
  if (f->req)
    mx_upstream_cancel(f->req);
  free(f);
}

void mx_sync_upstream_fetcher(mx_upstream *u, mx_sync_fetcher *f) {
  f->start = start;
  f->cancel = cancel;
  f->impl = u;
}
