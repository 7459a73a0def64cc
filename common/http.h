/*
 * HTTP vocabulary shared by the front (h2/) and the upstream client:
 * header fields, hop-by-hop rules, reason phrases and Matrix error bodies.
 */
#ifndef MX_HTTP_H
#define MX_HTTP_H

#include <stdbool.h>
#include <stddef.h>

#include "common/buf.h"
#include "common/error.h"

/* One header field. Names from clients are lower case (HTTP/2 requires
 * it; the HTTP/1.1 front lowers them). Pointers are borrowed. */
typedef struct mx_header {
  const char *name;
  size_t namelen;
  const char *value;
  size_t valuelen;
} mx_header;

#define MX_HEADER_LIT(n, v)                                                  \
  { (n), sizeof(n) - 1, (v), sizeof(v) - 1 }

/* Case-insensitive comparison of a header name with a C string. */
bool mx_http_name_is(const mx_header *h, const char *name);

/* Returns the first header named `name` or NULL. */
const mx_header *mx_http_find(const mx_header *hs, size_t n, const char *name);

/* True for connection-specific (hop-by-hop) headers a proxy must not
 * forward: connection, keep-alive, proxy-connection, transfer-encoding,
 * upgrade, te, trailer, proxy-authenticate, proxy-authorization. */
bool mx_http_is_hop_by_hop(const char *name, size_t len);

/* True when `name` appears as a token in a Connection header value, which
 * makes that header hop-by-hop too (RFC 9110 7.6.1). */
bool mx_http_connection_lists(const char *conn_value, size_t conn_len,
                              const char *name, size_t len);

/* Reason phrase for HTTP/1.1 status lines ("OK", "Bad Gateway", ...). */
const char *mx_http_reason(int status);

/*
 * Appends a Matrix error body {"errcode":..,"error":..} to out, with the
 * strings JSON-escaped. Returns 0 or a buffer error.
 */
int mx_http_matrix_error(mx_buf *out, const char *errcode, const char *error) MX_MUST_CHECK;

/*
 * Finds query parameter `name` in target (path?query). On success points
 * *value at the raw (still percent-encoded) value and returns its length;
 * returns -1 when absent. A parameter given without '=' has length 0.
 */
long mx_http_query_param(const char *target, size_t len, const char *name,
                         const char **value);

/* Percent-decodes in place ('+' is a space in queries); returns the new
 * length, or -1 on a malformed escape. */
long mx_http_percent_decode(char *s, size_t len, bool plus_is_space);

#endif
