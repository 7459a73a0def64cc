/* Request routing: which handler serves a request. */
#ifndef MX_ROUTER_H
#define MX_ROUTER_H

#include <stdbool.h>
#include <stddef.h>

/* True when the path (no query) has a "." or ".." segment, literally or
 * percent-encoded: such paths could escape a proxied prefix upstream. */
bool mx_router_has_dot_segment(const char *path, size_t len);

/* True when path starts with prefix on a segment boundary. */
bool mx_router_prefix(const char *path, size_t len, const char *prefix);

#endif
