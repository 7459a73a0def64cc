/* The SSE endpoint's request parsing (h2/sse.c: access token, since,
 * Last-Event-ID, heartbeat_interval, full_state, forwarded parameters),
 * driven through the router on an exchange with a recording backend
 * (tests/unit/front_fake.h) in front of a real sync hub whose fetcher
 * records every homeserver request (tests/unit/hub_fake.h).
 *
 * Input: a flags byte (bit 0: an Authorization header, bit 1: a
 * Last-Event-ID header, bit 2: the r0 path), then up to three lines: the
 * query string, the Authorization value, the Last-Event-ID value.
 *
 * Properties:
 *  - the parameters forwarded to the homeserver never include one that
 *    the homeserver reads (percent-decoded, '+' as space) as
 *    access_token, since, timeout or full_state: the token travels only
 *    in the Authorization header mxsse sets, and the position and
 *    timeout are mxsse's own; each forwarded parameter was in the query;
 *  - every homeserver request carries the token the client gave (the
 *    access_token parameter, decoded, or the bearer token);
 *  - a request that is refused is answered with a 4xx/5xx and starts
 *    nothing upstream. */
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "tests/fuzz/fuzz.h"
#include "tests/unit/front_fake.h"
#include "tests/unit/hub_fake.h"

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* Decodes like Python's unquote_plus (what the homeserver runs): a '%'
 * without two hex digits stays. Returns the length written to out. */
static size_t lenient_decode(const char *s, size_t n, char *out) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] == '%' && n - i >= 3 && hexval(s[i + 1]) >= 0 &&
        hexval(s[i + 2]) >= 0) {
      out[o++] = (char)(hexval(s[i + 1]) * 16 + hexval(s[i + 2]));
      i += 2;
    } else {
      out[o++] = s[i] == '+' ? ' ' : s[i];
    }
  }
  return o;
}

/* Aborts when a forwarded parameter is one mxsse must own, or was not in
 * the client's query. */
static void check_forwarded(const char *fwd, const char *query, size_t qlen) {
  static const char *const owned[] = {"access_token", "since", "timeout",
                                      "full_state"};
  const char *end = fwd + strlen(fwd);
  for (const char *p = fwd; p < end;) {
    const char *amp = memchr(p, '&', (size_t)(end - p));
    const char *pend = amp ? amp : end;
    const char *eq = memchr(p, '=', (size_t)(pend - p));
    size_t klen = (size_t)((eq ? eq : pend) - p);
    char *key = malloc(klen + 1);
    if (!key)
      abort();
    size_t dl = lenient_decode(p, klen, key);
    for (size_t i = 0; i < sizeof(owned) / sizeof(owned[0]); i++)
      if (dl == strlen(owned[i]) && !memcmp(key, owned[i], dl))
        abort();
    free(key);
    /* The same bytes, as a whole parameter of the client's query. */
    size_t plen = (size_t)(pend - p);
    bool found = false;
    for (const char *s = query; s + plen <= query + qlen && !found; s++)
      found = !memcmp(s, p, plen) && (s == query || s[-1] == '&') &&
              (s + plen == query + qlen || s[plen] == '&');
    if (!found)
      abort();
    p = pend + 1;
  }
}

/* The token the client gave: the first access_token parameter (decoded)
 * or the bearer token; NULL when none can be told. */
static char *given_token(const char *target, size_t tlen, const char *auth,
                         size_t alen) {
  const char *v;
  long n = mx_http_query_param(target, tlen, "access_token", &v);
  if (n >= 0) {
    char *t = malloc((size_t)n + 1);
    if (!t)
      abort();
    memcpy(t, v, (size_t)n);
    long m = mx_http_percent_decode(t, (size_t)n, true);
    if (m < 0) {
      free(t);
      return NULL;
    }
    t[m] = '\0';
    return t;
  }
  if (auth && alen > 7 && !strncasecmp(auth, "Bearer ", 7)) {
    const char *t = auth + 7;
    size_t k = alen - 7;
    while (k && *t == ' ')
      t++, k--;
    return strndup(t, k);
  }
  return NULL;
}

static int failed_checks;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  uint8_t flags = data[0];
  const char *in = (const char *)data + 1, *end = (const char *)data + size;
  const char *line[3] = {"", "", ""};
  size_t len[3] = {0, 0, 0};
  for (int i = 0; i < 3 && in <= end; i++) {
    const char *nl = memchr(in, '\n', (size_t)(end - in));
    line[i] = in;
    len[i] = (size_t)((nl ? nl : end) - in);
    in = (nl ? nl : end) + 1;
  }
  /* Request strings are C strings in the exchange: stop at a NUL. */
  for (int i = 0; i < 3; i++)
    len[i] = strnlen(line[i], len[i]);

  mx_buf target;
  mx_buf_init(&target, 1 << 20);
  mx_buf_appendf(&target, "/_matrix/client/%s/sync/sse?%.*s",
                 flags & 4 ? "r0" : "v3", (int)len[0], line[0]);
  mx_header hs[2];
  size_t nh = 0;
  if (flags & 1)
    hs[nh++] = (mx_header){"authorization", 13, line[1], len[1]};
  if (flags & 2)
    hs[nh++] = (mx_header){"last-event-id", 13, line[2], len[2]};

  mx_sync_hub_opts o = hf_opts();
  hf_setup(&o, &failed_checks);
  ff_front f;
  ff_front_init(&f, loop);
  f.server.sync = hub;
  ff_conn *fc = ff_conn_new(&f, false, false);
  ff_exchange *x =
      fc ? ff_exchange_new(&fc->c, "GET", target.data, hs, nh, NULL, 0)
         : NULL;
  if (x) {
    ff_exchange_dispatch(&f, x);
    bool taken = x->ex.handler != NULL;
    if (!taken && (!x->ex.responded || x->ex.status < 400))
      abort();
    /* Let the hub ask who the token is, and answer it. */
    for (int round = 0; round < 4; round++) {
      spin();
      for (int k = 0; k < F.nreqs; k++)
        if (F.reqs[k].live && F.reqs[k].path &&
            !strcmp(F.reqs[k].path, WHOAMI))
          answer(k, 200, "{\"user_id\":\"@u:example.org\"}");
    }
    if (!taken && F.nreqs)
      abort(); /* refused, yet something went upstream */
    const char *q = memchr(target.data, '?', target.len);
    char *token = given_token(target.data, target.len, flags & 1 ? line[1]
                                                                 : NULL,
                              len[1]);
    for (int k = 0; k < F.nreqs; k++) {
      if (!token || !F.reqs[k].token || strcmp(token, F.reqs[k].token))
        abort();
      check_forwarded(F.reqs[k].query ? F.reqs[k].query : "", q + 1,
                      target.len - (size_t)(q + 1 - target.data));
    }
    free(token);
    ff_exchange_take(x);
    ff_exchange_free(x, MX_ERR_CLOSED);
  }
  ff_conn_free(fc);
  ff_front_free(&f);
  hf_teardown();
  mx_buf_free(&target);
  if (failed_checks)
    abort();
  return 0;
}
