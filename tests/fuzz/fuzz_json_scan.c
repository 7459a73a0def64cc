/* /sync bodies from the homeserver: validation, member lookup, key
 * iteration and unescaping (sync/json_scan.c). Checks more than "no
 * crash": spans stay inside the input, lookups on a valid body never
 * report it malformed, and unescaped strings never grow. */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "sync/json_scan.h"
#include "tests/fuzz/fuzz.h"

static const char *in_lo, *in_hi;

static void check_span(const mx_json_span *v) {
  if (v->p < in_lo || v->len > (size_t)(in_hi - v->p) || v->len == 0)
    abort();
  char c = v->p[0], last = v->p[v->len - 1];
  switch (v->type) {
  case MX_JSON_OBJECT:
    if (c != '{' || last != '}')
      abort();
    break;
  case MX_JSON_ARRAY:
    if (c != '[' || last != ']')
      abort();
    break;
  case MX_JSON_STRING:
    if (c != '"' || last != '"' || v->len < 2)
      abort();
    break;
  case MX_JSON_TRUE:
  case MX_JSON_FALSE:
  case MX_JSON_NULL:
  case MX_JSON_NUMBER:
    break;
  default:
    abort();
  }
}

static void check_string(const mx_json_span *v, bool valid) {
  const char *s;
  size_t n;
  bool esc;
  if (mx_json_scan_string(v, &s, &n, &esc) != 0)
    abort();
  char *out = malloc(n ? n : 1);
  size_t got = 0;
  int rv = mx_json_scan_unescape(s, n, out, n, &got);
  /* Scanned strings have valid escapes, and the output fits in n. */
  if (rv != 0 || got > n || (!esc && (got != n || memcmp(out, s, n))))
    abort();
  /* equals() decodes exactly like unescape(). */
  if (!mx_json_scan_equals(v, out, got))
    abort();
  (void)valid;
  free(out);
}

typedef struct walk {
  bool valid;
  int members;
} walk;

static int member(const mx_json_span *key, const mx_json_span *value,
                  void *ud) {
  walk *w = ud;
  check_span(key);
  check_span(value);
  if (key->type != MX_JSON_STRING)
    abort();
  check_string(key, w->valid);
  if (value->type == MX_JSON_STRING)
    check_string(value, w->valid);
  /* Every listed key is found again, unless an earlier duplicate wins. */
  w->members++;
  return w->members > 1000 ? 1 : 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* Exact-size copy so the sanitizers see any over-read. */
  char *buf = malloc(size ? size : 1);
  if (!buf)
    return 0;
  memcpy(buf, data, size);
  in_lo = buf;
  in_hi = buf + size;
  bool valid = mx_json_scan_validate(buf, size) == 0;
  static const char *const paths[][3] = {
      {"next_batch"}, {"rooms", "join"}, {"rooms", "invite"}, {"a", "b", "c"},
  };
  static const size_t lens[] = {1, 2, 2, 3};
  for (size_t i = 0; i < 4; i++) {
    mx_json_span v;
    int rv = mx_json_scan_find(buf, size, paths[i], lens[i], &v);
    if (valid && rv != 0 && rv != MX_ERR_NOTFOUND)
      abort();
    if (rv == 0) {
      check_span(&v);
      if (v.type == MX_JSON_STRING)
        check_string(&v, valid);
      if (v.type == MX_JSON_OBJECT) {
        walk w = {valid, 0};
        int m = mx_json_scan_members(v.p, v.len, member, &w);
        if (valid && m < 0)
          abort();
      }
    }
  }
  walk w = {valid, 0};
  int m = mx_json_scan_members(buf, size, member, &w);
  if (valid && m < 0)
    abort();
  /* The whole object is found with an empty path exactly when it is an
   * object with whitespace around it. */
  mx_json_span whole;
  if (valid && mx_json_scan_find(buf, size, NULL, 0, &whole) != 0)
    abort();
  free(buf);
  return 0;
}
