/*
 * Routing. The admin listener serves only its own pages. On client
 * listeners: the SSE sync endpoint is ours, client-API prefixes go to the
 * homeserver, anything else is a Matrix 404.
 */
#include "h2/router.h"

#include <string.h>
#include <strings.h>

#include "h2/admin.h"
#include "h2/conn.h"
#include "h2/exchange.h"
#include "h2/proxy.h"
#include "h2/server.h"
#include "h2/sse.h"

bool mx_router_prefix(const char *path, size_t len, const char *prefix) {
  size_t pl = strlen(prefix);
  if (len < pl || memcmp(path, prefix, pl) != 0)
    return false;
  /* "/_matrix" matches "/_matrix" and "/_matrix/x", not "/_matrixx". */
  return len == pl || prefix[pl - 1] == '/' || path[pl] == '/';
}

static bool is_dot(const char *s, size_t n) {
  /* ".", "%2e" (any case), and pairs of them. */
  size_t dots = 0, i = 0;
  while (i < n) {
    if (s[i] == '.') {
      i++;
    } else if (n - i >= 3 && s[i] == '%' && s[i + 1] == '2' &&
               (s[i + 2] == 'e' || s[i + 2] == 'E')) {
      i += 3;
    } else {
      return false;
    }
    dots++;
  }
  return dots == 1 || dots == 2;
}

bool mx_router_has_dot_segment(const char *path, size_t len) {
  size_t start = 0;
  for (size_t i = 0; i <= len; i++) {
    if (i == len || path[i] == '/' ||
        (len - i >= 3 && path[i] == '%' && path[i + 1] == '2' &&
         (path[i + 2] == 'f' || path[i + 2] == 'F'))) {
      if (i > start && is_dot(path + start, i - start))
        return true;
      if (i < len && path[i] == '%')
        i += 2;
      start = i + 1;
    }
  }
  return false;
}

static bool proxied(const mx_server *s, const char *path, size_t len) {
  if (mx_router_prefix(path, len, "/_matrix/") ||
      mx_router_prefix(path, len, "/.well-known/matrix/"))
    return true;
  const mx_strlist *extra = &s->cfg->proxy_prefix;
  for (size_t i = 0; i < extra->count; i++)
    if (mx_router_prefix(path, len, extra->items[i]))
      return true;
  return false;
}

void mx_router_dispatch(mx_server *s, mx_exchange *ex) {
  const mx_request *r = mx_exchange_request(ex);
  mx_conn *c = ex->conn;
  if (c->reject_status) {
    /* Over a connection limit: say so, then end the connection. */
    const mx_header retry = MX_HEADER_LIT("retry-after", "5");
    if (c->reject_status == 429)
      mx_exchange_error(ex, 429, "M_LIMIT_EXCEEDED",
                        "Too many connections from this address", &retry, 1);
    else
      mx_exchange_error(ex, 503, "M_UNKNOWN", "Server is at capacity",
                        &retry, 1);
    c->ops->shutdown(c, true);
    return;
  }
  const char *path = r->target;
  size_t plen = (size_t)(r->path_end - r->target);
  if (c->admin) {
    mx_admin_handle(s, ex);
    return;
  }
  if (mx_router_has_dot_segment(path, plen)) {
    mx_exchange_error(ex, 400, "M_UNRECOGNIZED",
                      "Path segments '.' and '..' are not allowed", NULL, 0);
    return;
  }
  if (mx_sse_route(s, ex))
    return;
  if (proxied(s, path, plen)) {
    mx_proxy_handle(s, ex);
    return;
  }
  mx_exchange_error(ex, 404, "M_UNRECOGNIZED", "Unrecognized request", NULL,
                    0);
}
