#include "common/buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"

void mx_buf_init(mx_buf *b, size_t max) {
  b->data = NULL;
  b->len = b->cap = 0;
  b->max = max;
}

static int grow(mx_buf *b, size_t need) {
  if (need > b->max || need < b->len)
    return MX_ERR_LIMIT;
  if (need <= b->cap && b->data)
    return 0;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < need)
    cap = cap > b->max / 2 ? b->max : cap * 2;
  char *p = realloc(b->data, cap + 1);
  if (!p)
    return MX_ERR_NOMEM;
  b->data = p;
  b->cap = cap;
  return 0;
}

char *mx_buf_reserve(mx_buf *b, size_t n) {
  if (n > b->max - b->len || grow(b, b->len + n) != 0)
    return NULL;
  return b->data + b->len;
}

void mx_buf_commit(mx_buf *b, size_t n) {
  b->len += n;
  b->data[b->len] = '\0';
}

int mx_buf_append(mx_buf *b, const void *data, size_t n) {
  if (n > b->max - b->len)
    return MX_ERR_LIMIT;
  int rv = grow(b, b->len + n);
  if (rv != 0)
    return rv;
  if (n)
    memcpy(b->data + b->len, data, n);
  b->len += n;
  b->data[b->len] = '\0';
  return 0;
}

int mx_buf_appendf(mx_buf *b, const char *fmt, ...) {
  char small[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(small, sizeof(small), fmt, ap);
  va_end(ap);
  if (n < 0)
    return MX_ERR_INVALID;
  if ((size_t)n < sizeof(small))
    return mx_buf_append(b, small, (size_t)n);
  char *dst = mx_buf_reserve(b, (size_t)n + 1);
  if (!dst)
    return (size_t)n + 1 > b->max - b->len ? MX_ERR_LIMIT : MX_ERR_NOMEM;
  va_start(ap, fmt);
  vsnprintf(dst, (size_t)n + 1, fmt, ap);
  va_end(ap);
  mx_buf_commit(b, (size_t)n);
  return 0;
}

void mx_buf_consume(mx_buf *b, size_t n) {
  if (n >= b->len) {
    mx_buf_reset(b);
    return;
  }
  memmove(b->data, b->data + n, b->len - n);
  b->len -= n;
  b->data[b->len] = '\0';
}

void mx_buf_reset(mx_buf *b) {
  b->len = 0;
  if (b->data)
    b->data[0] = '\0';
}

void mx_buf_free(mx_buf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

char *mx_buf_steal(mx_buf *b, size_t *len) {
  char *p = b->data;
  if (len)
    *len = b->len;
  b->data = NULL;
  b->len = b->cap = 0;
  return p;
}

int mx_buf_append_urlencoded(mx_buf *b, const char *s, size_t n) {
  static const char hex[] = "0123456789ABCDEF";
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    int rv;
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
        (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.' ||
        c == '~') {
      rv = mx_buf_append(b, &s[i], 1);
    } else {
      char e[3] = {'%', hex[c >> 4], hex[c & 15]};
      rv = mx_buf_append(b, e, 3);
    }
    if (rv)
      return rv;
  }
  return 0;
}
