/* Request targets from clients: query lookup, percent-decoding and the
 * token redaction every log line goes through.
 *
 * Properties:
 *  - a parameter's value lies inside the target;
 *  - decoding writes only inside the value (a guard after it stays
 *    intact) and agrees with a reference decoder;
 *  - the redacted copy stays inside its buffer (any size, guard after
 *    it), is NUL-terminated, and every parameter in it that names
 *    access_token (percent-decoded, any case, as the homeserver reads
 *    it) has the value "<redacted>"; when nothing was cut, it holds as
 *    many of them as the target had parameters naming access_token. */
#include <stdlib.h>
#include <string.h>

#include "common/http.h"
#include "common/log.h"
#include "tests/fuzz/fuzz.h"

#define GUARD 16
#define REPL "<redacted>"

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* The reference: -1 on a malformed escape, else the decoded length. */
static long ref_decode(const char *s, size_t n, char *out) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] == '%') {
      if (n - i < 3 || hexval(s[i + 1]) < 0 || hexval(s[i + 2]) < 0)
        return -1;
      out[o++] = (char)(hexval(s[i + 1]) * 16 + hexval(s[i + 2]));
      i += 2;
    } else {
      out[o++] = s[i] == '+' ? ' ' : s[i];
    }
  }
  return (long)o;
}

/* True when the name p..end, decoded leniently (a malformed escape stays
 * as it is, '+' is a space), is access_token in any case. */
static bool names_token(const char *p, const char *end) {
  static const char want[] = "access_token";
  size_t w = 0;
  while (p < end) {
    char c = *p++;
    if (c == '%' && end - p >= 2 && hexval(p[0]) >= 0 && hexval(p[1]) >= 0) {
      c = (char)(hexval(p[0]) * 16 + hexval(p[1]));
      p += 2;
    } else if (c == '+') {
      c = ' ';
    }
    if (c >= 'A' && c <= 'Z')
      c = (char)(c + 32);
    if (w == sizeof(want) - 1 || c != want[w])
      return false;
    w++;
  }
  return w == sizeof(want) - 1;
}

/* Walks the parameters of s as the homeserver splits them (after the
 * first '?', on '&' and ';'). Counts those naming access_token; with
 * check, aborts when one of them has a value other than REPL, except a
 * cut-off last one without '='. */
static size_t token_params(const char *s, size_t n, bool check) {
  const char *q = memchr(s, '?', n);
  if (!q)
    return 0;
  const char *end = s + n;
  size_t count = 0;
  for (const char *p = q + 1; p <= end;) {
    const char *pend = p;
    while (pend < end && *pend != '&' && *pend != ';')
      pend++;
    const char *eq = memchr(p, '=', (size_t)(pend - p));
    if (names_token(p, eq ? eq : pend)) {
      count++;
      if (check && eq &&
          ((size_t)(pend - eq - 1) != strlen(REPL) ||
           memcmp(eq + 1, REPL, strlen(REPL))))
        abort();
      if (check && !eq && pend != end)
        abort();
    }
    p = pend + 1;
  }
  return count;
}

static void check_redaction(const char *t, size_t size, size_t outlen) {
  char *out = malloc(outlen + GUARD);
  if (!out)
    return;
  memset(out, 0x5a, outlen + GUARD);
  mx_log_redact_target(t, size, out, outlen);
  for (size_t i = 0; i < GUARD; i++)
    if ((unsigned char)out[outlen + i] != 0x5a)
      abort(); /* wrote past the buffer */
  const char *nul = memchr(out, '\0', outlen);
  if (!nul)
    abort();
  size_t olen = (size_t)(nul - out);
  size_t redacted = token_params(out, olen, true);
  /* Nothing was cut when the copy ended this far from the buffer's end
   * (the redactor stops early only for lack of room). */
  if (olen + sizeof("access_token=" REPL) + 4 < outlen &&
      redacted != token_params(t, size, false))
    abort();
  free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *t = (const char *)data;
  static const char *const names[] = {"access_token", "since", "filter",
                                      "heartbeat_interval", ""};
  for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
    const char *v;
    long n = mx_http_query_param(t, size, names[i], &v);
    if (n < 0)
      continue;
    if (v < t || v > t + size || (size_t)n > (size_t)(t + size - v))
      abort(); /* the value must lie inside the target */
    char *copy = malloc((size_t)n + GUARD);
    char *ref = malloc((size_t)n + 1);
    if (!copy || !ref) {
      free(copy);
      free(ref);
      return 0;
    }
    memcpy(copy, v, (size_t)n);
    memset(copy + n, 0x5a, GUARD);
    long m = mx_http_percent_decode(copy, (size_t)n, true);
    for (size_t g = 0; g < GUARD; g++)
      if ((unsigned char)copy[n + g] != 0x5a)
        abort(); /* wrote past the value */
    long r = ref_decode(v, (size_t)n, ref);
    if (m != r || (m >= 0 && memcmp(copy, ref, (size_t)m)))
      abort();
    free(copy);
    free(ref);
  }
  check_redaction(t, size, 512);
  /* Every size, down to one byte, cuts the copy somewhere else. */
  check_redaction(t, size, 1 + (size ? data[0] : 0) % 96);
  return 0;
}
