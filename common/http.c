#include "common/http.h"

#include <string.h>
#include <strings.h>

bool mx_http_name_is(const mx_header *h, const char *name) {
  size_t n = strlen(name);
  return h->namelen == n && strncasecmp(h->name, name, n) == 0;
}

const mx_header *mx_http_find(const mx_header *hs, size_t n,
                              const char *name) {
  for (size_t i = 0; i < n; i++)
    if (mx_http_name_is(&hs[i], name))
      return &hs[i];
  return NULL;
}

bool mx_http_is_hop_by_hop(const char *name, size_t len) {
  static const char *const hop[] = {
      "connection", "keep-alive", "proxy-connection", "transfer-encoding",
      "upgrade",    "te",         "trailer",          "proxy-authenticate",
      "proxy-authorization", "http2-settings"};
  for (size_t i = 0; i < sizeof(hop) / sizeof(hop[0]); i++)
    if (strlen(hop[i]) == len && strncasecmp(hop[i], name, len) == 0)
      return true;
  return false;
}

bool mx_http_connection_lists(const char *v, size_t vlen, const char *name,
                              size_t len) {
  size_t i = 0;
  while (i < vlen) {
    while (i < vlen && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
      i++;
    size_t start = i;
    while (i < vlen && v[i] != ',' && v[i] != ' ' && v[i] != '\t')
      i++;
    if (i - start == len && len && strncasecmp(v + start, name, len) == 0)
      return true;
  }
  return false;
}

const char *mx_http_reason(int status) {
  switch (status) {
  case 100: return "Continue";
  case 101: return "Switching Protocols";
  case 200: return "OK";
  case 201: return "Created";
  case 202: return "Accepted";
  case 204: return "No Content";
  case 206: return "Partial Content";
  case 301: return "Moved Permanently";
  case 302: return "Found";
  case 304: return "Not Modified";
  case 307: return "Temporary Redirect";
  case 308: return "Permanent Redirect";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 408: return "Request Timeout";
  case 409: return "Conflict";
  case 411: return "Length Required";
  case 413: return "Content Too Large";
  case 414: return "URI Too Long";
  case 415: return "Unsupported Media Type";
  case 421: return "Misdirected Request";
  case 429: return "Too Many Requests";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 502: return "Bad Gateway";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  case 505: return "HTTP Version Not Supported";
  default: return status < 300 ? "OK" : status < 500 ? "Error" : "Server Error";
  }
}

static int append_json_string(mx_buf *out, const char *s) {
  static const char hex[] = "0123456789abcdef";
  int rv = mx_buf_append(out, "\"", 1);
  for (; rv == 0 && *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') {
      char esc[2] = {'\\', (char)c};
      rv = mx_buf_append(out, esc, 2);
    } else if (c < 0x20) {
      char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
      rv = mx_buf_append(out, esc, 6);
    } else {
      rv = mx_buf_append(out, s, 1);
    }
  }
  return rv ? rv : mx_buf_append(out, "\"", 1);
}

int mx_http_matrix_error(mx_buf *out, const char *errcode, const char *error) {
  int rv = mx_buf_append(out, "{\"errcode\":", 11);
  if (!rv)
    rv = append_json_string(out, errcode);
  if (!rv)
    rv = mx_buf_append(out, ",\"error\":", 9);
  if (!rv)
    rv = append_json_string(out, error);
  if (!rv)
    rv = mx_buf_append(out, "}", 1);
  return rv;
}

long mx_http_query_param(const char *target, size_t len, const char *name,
                         const char **value) {
  const char *q = memchr(target, '?', len);
  if (!q)
    return -1;
  size_t nl = strlen(name);
  const char *end = target + len;
  const char *p = q + 1;
  while (p < end) {
    const char *amp = memchr(p, '&', (size_t)(end - p));
    const char *pend = amp ? amp : end;
    const char *eq = memchr(p, '=', (size_t)(pend - p));
    const char *kend = eq ? eq : pend;
    if ((size_t)(kend - p) == nl && memcmp(p, name, nl) == 0) {
      *value = eq ? eq + 1 : pend;
      return eq ? (long)(pend - eq - 1) : 0;
    }
    p = pend + 1;
  }
  return -1;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

long mx_http_percent_decode(char *s, size_t len, bool plus_is_space) {
  size_t o = 0;
  for (size_t i = 0; i < len; i++) {
    if (s[i] == '%') {
      if (len - i < 3)
        return -1;
      int hi = hexval(s[i + 1]), lo = hexval(s[i + 2]);
      if (hi < 0 || lo < 0)
        return -1;
      s[o++] = (char)(hi * 16 + lo);
      i += 2;
    } else if (s[i] == '+' && plus_is_space) {
      s[o++] = ' ';
    } else {
      s[o++] = s[i];
    }
  }
  return (long)o;
}
