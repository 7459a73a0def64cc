/* Request targets through the router (h2/router.c), on an exchange with
 * a recording backend (tests/unit/front_fake.h) and a real upstream
 * client that never runs.
 *
 * Properties:
 *  - mx_router_has_dot_segment() is true exactly when the path, percent-
 *    decoded once as the homeserver decodes it ('%' not followed by two
 *    hex digits stays as it is), has a "." or ".." segment;
 *  - a request the router hands to the proxy never has such a path;
 *  - every request is answered or taken by a handler, and its exchange
 *    ends with every handler's state freed (leaks show under ASan). */
#include <stdlib.h>
#include <string.h>

#include "homeserver/upstream.h"
#include "h2/router.h"
#include "tests/fuzz/fuzz.h"
#include "tests/unit/front_fake.h"

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* The path decoded once, then split on '/'. */
static bool decoded_has_dot(const char *p, size_t n) {
  char *d = malloc(n + 1);
  if (!d)
    abort();
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    if (p[i] == '%' && n - i >= 3 && hexval(p[i + 1]) >= 0 &&
        hexval(p[i + 2]) >= 0) {
      d[o++] = (char)(hexval(p[i + 1]) * 16 + hexval(p[i + 2]));
      i += 2;
    } else {
      d[o++] = p[i];
    }
  }
  bool dot = false;
  size_t start = 0;
  for (size_t i = 0; i <= o && !dot; i++) {
    if (i == o || d[i] == '/') {
      size_t len = i - start;
      dot = (len == 1 && d[start] == '.') ||
            (len == 2 && d[start] == '.' && d[start + 1] == '.');
      start = i + 1;
    }
  }
  free(d);
  return dot;
}

static struct ev_loop *loop;
static mx_upstream *upstream;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!loop) {
    loop = ev_default_loop(0);
    /* Requests are started and cancelled, never sent: the loop never
     * runs, so nothing connects. */
    upstream = mx_upstream_new(loop, "http://127.0.0.1:9", NULL);
    if (!upstream)
      abort();
  }
  /* The target is the input up to its first NUL, as a C string. */
  size_t n = strnlen((const char *)data, size);
  char *target = malloc(n + 1);
  if (!target)
    return 0;
  memcpy(target, data, n);
  target[n] = '\0';
  const char *q = memchr(target, '?', n);
  size_t plen = q ? (size_t)(q - target) : n;

  bool dot = mx_router_has_dot_segment(target, plen);
  if (dot != decoded_has_dot(target, plen))
    abort();

  ff_front f;
  ff_front_init(&f, loop);
  f.server.upstream = upstream;
  ff_conn *fc = ff_conn_new(&f, false, false);
  ff_exchange *x = fc ? ff_exchange_new(&fc->c, "GET", target, NULL, 0, NULL,
                                        0)
                      : NULL;
  if (x) {
    ff_exchange_dispatch(&f, x);
    const mx_handler *h = x->ex.handler;
    if (h && !strcmp(h->name, "proxy") && dot)
      abort(); /* a dot segment reached the homeserver */
    if (!h && !x->ex.responded)
      abort(); /* nobody answers */
    if (dot && (!x->ex.responded || x->ex.status != 400))
      abort();
    ff_exchange_take(x);
    ff_exchange_free(x, 0);
  }
  ff_conn_free(fc);
  ff_front_free(&f);
  free(target);
  return 0;
}
