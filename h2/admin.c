#include "h2/admin.h"

#include <string.h>

#include "common/error.h"
#include "common/metrics.h"

static void reply(mx_exchange *ex, int status, const char *type,
                  const char *body, size_t len) {
  char cl[24];
  snprintf(cl, sizeof(cl), "%zu", len);
  mx_header hs[] = {{"content-type", 12, type, strlen(type)},
                    {"content-length", 14, cl, strlen(cl)},
                    MX_HEADER_LIT("cache-control", "no-store")};
  const mx_request *r = mx_exchange_request(ex);
  bool head = r->method_len == 4 && !memcmp(r->method, "HEAD", 4);
  if (mx_exchange_respond(ex, status, hs, 3, head || len == 0) == 0 && !head &&
      len) {
    if (mx_exchange_write(ex, body, len) || mx_exchange_end(ex))
      mx_exchange_reset(ex);
  }
}

static bool path_is(const mx_request *r, const char *p) {
  size_t len = (size_t)(r->path_end - r->target);
  return len == strlen(p) && !memcmp(r->target, p, len);
}

void mx_admin_handle(mx_server *s, mx_exchange *ex) {
  const mx_request *r = mx_exchange_request(ex);
  bool get = (r->method_len == 3 && !memcmp(r->method, "GET", 3)) ||
             (r->method_len == 4 && !memcmp(r->method, "HEAD", 4));
  if (!get) {
    const mx_header allow = MX_HEADER_LIT("allow", "GET, HEAD");
    mx_exchange_error(ex, 405, "M_UNRECOGNIZED", "Method not allowed",
                      &allow, 1);
    return;
  }
  if (path_is(r, "/healthz")) {
    reply(ex, 200, "text/plain", "ok\n", 3);
  } else if (path_is(r, "/readyz")) {
    if (mx_server_ready(s))
      reply(ex, 200, "text/plain", "ready\n", 6);
    else
      reply(ex, 503, "text/plain", "draining\n", 9);
  } else if (path_is(r, "/metrics")) {
    mx_buf out;
    mx_buf_init(&out, 1024 * 1024);
    if (mx_metrics_render(&out) == 0)
      reply(ex, 200, "text/plain; version=0.0.4", out.data, out.len);
    else
      mx_exchange_error(ex, 500, "M_UNKNOWN", "Metrics unavailable", NULL, 0);
    mx_buf_free(&out);
  } else {
    mx_exchange_error(ex, 404, "M_UNRECOGNIZED", "Unrecognized request", NULL,
                      0);
  }
}
