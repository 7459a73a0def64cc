#include <json-c/json.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "sync/json_scan.h"
#include "tests/unit/tap.h"

#define S(lit) (lit), (sizeof(lit) - 1)
#define CHECK_SPAN(v, lit) CHECK_MEMEQ((v).p, (v).len, lit, strlen(lit))
#define PATH(...) ((const char *const[]){__VA_ARGS__}), \
  (sizeof((const char *const[]){__VA_ARGS__}) / sizeof(const char *))

static int valid(const char *s) { return mx_json_scan_validate(s, strlen(s)); }

static void test_validate_accepts(void) {
  static const char *const ok[] = {
      "{}",
      " \t\r\n{ } \n",
      "{\"a\":1}",
      "{\"a\":-0.5e+10,\"b\":[1,2.0,-3E2,0],\"c\":true,\"d\":false,\"e\":null}",
      "{\"s\":\"x\\\"y\\\\z\\/\\b\\f\\n\\r\\t\\u00e9\\uD83D\\uDE00\"}",
      "{\"nested\":{\"a\":[{\"b\":[[]]},{}]}}",
      "{\"k\":\"}{][\"}",
      "{\"\":\"\"}",
      "{\"u\":\"\xc3\xa9 raw utf-8\"}",
  };
  for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
    if (valid(ok[i]) != 0)
      printf("# rejected: %s\n", ok[i]);
    CHECK_INT(valid(ok[i]), 0);
  }
}

static void test_validate_rejects(void) {
  static const char *const bad[] = {
      "",
      "   ",
      "[]",            /* not an object */
      "\"x\"",
      "1",
      "{",             /* truncated */
      "{\"a\":",
      "{\"a\":1",
      "{\"a\":\"xy",
      "{\"a\":\"x\\",
      "{\"a\":\"\\u12\"}",
      "{\"a\":1}x",    /* trailing garbage */
      "{\"a\":1}{}",
      "{\"a\":1}}",
      "{\"a\":1,}",    /* trailing comma */
      "{,}",
      "{\"a\" 1}",
      "{\"a\":1 \"b\":2}",
      "{a:1}",         /* unquoted key */
      "{1:1}",
      "{\"a\":[1,]}",
      "{\"a\":[1 2]}",
      "{\"a\":[}",
      "{\"a\":{]}",
      "{\"a\":]",
      "{\"a\":01}",    /* numbers */
      "{\"a\":-}",
      "{\"a\":1.}",
      "{\"a\":.5}",
      "{\"a\":1e}",
      "{\"a\":+1}",
      "{\"a\":0x10}",
      "{\"a\":tru}",   /* literals */
      "{\"a\":True}",
      "{\"a\":nul}",
      "{\"a\":\"\\x\"}",  /* bad escape */
      "{\"a\":\"\\U0041\"}",
      "{\"a\":\"tab\there\"}", /* raw control character */
      "{\"a\":\"line\nbreak\"}",
      "\xef\xbb\xbf{}",        /* BOM */
      "{'a':1}",
  };
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    if (valid(bad[i]) != MX_ERR_INVALID)
      printf("# accepted: %s\n", bad[i]);
    CHECK_INT(valid(bad[i]), MX_ERR_INVALID);
  }
  /* A NUL byte is a control character, inside or outside strings. */
  CHECK_INT(mx_json_scan_validate(S("{\"a\":\"\0\"}")), MX_ERR_INVALID);
  CHECK_INT(mx_json_scan_validate(S("{}\0")), MX_ERR_INVALID);
}

/* {"a":[[...]]} with `depth` containers in total (the object counts). */
static char *nested_arrays(unsigned depth) {
  size_t n = 5 + 2 * (size_t)(depth - 1) + 1;
  char *s = malloc(n + 1), *w = s;
  memcpy(w, "{\"a\":", 5);
  w += 5;
  memset(w, '[', depth - 1);
  w += depth - 1;
  memset(w, ']', depth - 1);
  w += depth - 1;
  *w++ = '}';
  *w = '\0';
  return s;
}

/* {"a":{"a":...{}}} with `depth` objects. */
static char *nested_objects(unsigned depth) {
  size_t n = 5 * (size_t)(depth - 1) + 1 + depth;
  char *s = malloc(n + 1), *w = s;
  for (unsigned i = 1; i < depth; i++, w += 5)
    memcpy(w, "{\"a\":", 5);
  *w++ = '{';
  memset(w, '}', depth);
  w[depth] = '\0';
  return s;
}

static void test_depth_cap(void) {
  char *s = nested_arrays(MX_JSON_MAX_DEPTH);
  CHECK_INT(valid(s), 0);
  free(s);
  s = nested_arrays(MX_JSON_MAX_DEPTH + 1);
  CHECK_INT(valid(s), MX_ERR_INVALID);
  /* The lookups skip values with the same cap. */
  mx_json_span v;
  CHECK_INT(mx_json_scan_find(s, strlen(s), PATH("a"), &v), MX_ERR_INVALID);
  free(s);
  s = nested_objects(MX_JSON_MAX_DEPTH);
  CHECK_INT(valid(s), 0);
  free(s);
  s = nested_objects(MX_JSON_MAX_DEPTH + 1);
  CHECK_INT(valid(s), MX_ERR_INVALID);
  free(s);
  /* 100000 opening brackets: rejected without recursion. */
  size_t n = 100000;
  s = malloc(n + 6);
  memcpy(s, "{\"a\":", 5);
  memset(s + 5, '[', n);
  s[n + 5] = '\0';
  CHECK_INT(valid(s), MX_ERR_INVALID);
  CHECK_INT(mx_json_scan_find(s, strlen(s), PATH("a"), &v), MX_ERR_INVALID);
  free(s);
}

static void test_find_top_level(void) {
  const char *body =
      "{\"rooms\":{\"join\":{\"!a:x\":{\"timeline\":{\"events\":[{\"body\":"
      "\"}\\\"next_batch\\\":\\\"evil\\\"{\"}]}}}},"
      "\"next_batch\":\"s72594_4483_1934\",\"n\":-1.5e3,\"t\":true}";
  CHECK_INT(valid(body), 0);
  mx_json_span v;
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("next_batch"), &v), 0);
  CHECK_INT(v.type, MX_JSON_STRING);
  CHECK_SPAN(v, "\"s72594_4483_1934\"");
  const char *s;
  size_t n;
  bool esc = true;
  CHECK_INT(mx_json_scan_string(&v, &s, &n, &esc), 0);
  CHECK_MEMEQ(s, n, "s72594_4483_1934", 16);
  CHECK(!esc);
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("n"), &v), 0);
  CHECK_INT(v.type, MX_JSON_NUMBER);
  CHECK_SPAN(v, "-1.5e3");
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("t"), &v), 0);
  CHECK_INT(v.type, MX_JSON_TRUE);
  CHECK_INT(v.len, 4);
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("missing"), &v),
            MX_ERR_NOTFOUND);
  /* Not a string: mx_json_scan_string refuses. */
  CHECK_INT(v.type, MX_JSON_TRUE); /* a miss leaves *out alone */
  CHECK_INT(mx_json_scan_string(&v, &s, &n, NULL), MX_ERR_INVALID);
  mx_json_span num = {"12", 2, MX_JSON_NUMBER};
  CHECK_INT(mx_json_scan_string(&num, &s, &n, NULL), MX_ERR_INVALID);
}

static void test_find_path(void) {
  const char *body =
      " {\"rooms\":{\"invite\":{},\"join\":{\"!a:x\":{\"k\":[1,{\"z\":2}]},"
      "\"!b:y\":{}}},\"next_batch\":\"t\"} \n";
  mx_json_span v;
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("rooms", "join"), &v),
            0);
  CHECK_INT(v.type, MX_JSON_OBJECT);
  CHECK_SPAN(v, "{\"!a:x\":{\"k\":[1,{\"z\":2}]},\"!b:y\":{}}");
  CHECK_INT(mx_json_scan_find(body, strlen(body),
                              PATH("rooms", "join", "!a:x", "k"), &v),
            0);
  CHECK_INT(v.type, MX_JSON_ARRAY);
  CHECK_SPAN(v, "[1,{\"z\":2}]");
  /* A span found earlier works as the root of the next lookup. */
  mx_json_span rooms, inv;
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("rooms"), &rooms), 0);
  CHECK_INT(mx_json_scan_find(rooms.p, rooms.len, PATH("invite"), &inv), 0);
  CHECK_SPAN(inv, "{}");
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("rooms", "leave"), &v),
            MX_ERR_NOTFOUND);
  /* Through a non-object. */
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("next_batch", "x"), &v),
            MX_ERR_NOTFOUND);
  CHECK_INT(mx_json_scan_find(body, strlen(body),
                              PATH("rooms", "join", "!a:x", "k", "z"), &v),
            MX_ERR_NOTFOUND);
  /* Zero-length path: the object itself, blanks trimmed. */
  CHECK_INT(mx_json_scan_find(body, strlen(body), NULL, 0, &v), 0);
  CHECK_INT(v.type, MX_JSON_OBJECT);
  CHECK(v.p == body + 1 && v.p[v.len - 1] == '}' && v.len == strlen(body) - 3);
}

static void test_find_strings_with_braces(void) {
  /* Keys and values full of structural characters and escaped quotes:
   * a scanner that is not string-aware would match the inner text. */
  const char *body = "{\"a\\\"}\":\"{\\\"next_batch\\\":1}\","
                     "\"b\":[\"]\",\"\\\\\",\"\\\\\\\"\"],"
                     "\"next_batch\":\"real\"}";
  CHECK_INT(valid(body), 0);
  mx_json_span v;
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("next_batch"), &v), 0);
  CHECK_SPAN(v, "\"real\"");
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("a\"}"), &v), 0);
  CHECK_INT(v.type, MX_JSON_STRING);
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("b"), &v), 0);
  CHECK_SPAN(v, "[\"]\",\"\\\\\",\"\\\\\\\"\"]");
}

static void test_duplicate_keys_first_wins(void) {
  const char *body = "{\"next_batch\":\"first\",\"next_batch\":\"second\"}";
  CHECK_INT(valid(body), 0);
  mx_json_span v;
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("next_batch"), &v), 0);
  CHECK_SPAN(v, "\"first\"");
}

static void test_escaped_keys(void) {
  /* "next\u005fbatch" is next_batch; "\u00e9" is U+00E9 (c3 a9). */
  const char *body = "{\"next\\u005fbatch\":\"x\",\"caf\\u00e9\":1,"
                     "\"\\ud83d\\ude00\":2,\"a\\/b\":3}";
  CHECK_INT(valid(body), 0);
  mx_json_span v;
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("next_batch"), &v), 0);
  CHECK_SPAN(v, "\"x\"");
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("caf\xc3\xa9"), &v), 0);
  CHECK_SPAN(v, "1");
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("\xf0\x9f\x98\x80"), &v),
            0);
  CHECK_SPAN(v, "2");
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("a/b"), &v), 0);
  CHECK_SPAN(v, "3");
  /* Prefixes and longer names do not match. */
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("next_batc"), &v),
            MX_ERR_NOTFOUND);
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("next_batchx"), &v),
            MX_ERR_NOTFOUND);
  CHECK_INT(mx_json_scan_find(body, strlen(body), PATH("caf"), &v),
            MX_ERR_NOTFOUND);
}

static void test_find_malformed(void) {
  mx_json_span v;
  static const char *const bad[] = {
      "{\"a\":1,\"b\":[}", "{\"a\":1,\"b\"", "{\"a\" 1}", "[\"next_batch\"]",
      "{\"a\":\"x", "", "{\"a\":{\"c\":1]}", "x",
  };
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
    CHECK_INT(mx_json_scan_find(bad[i], strlen(bad[i]), PATH("next_batch"),
                                &v),
              MX_ERR_INVALID);
  /* Truncation at every length of a valid body: never a wrong answer. */
  const char *body = "{\"a\":[1,\"}\",{\"b\":null}],\"next_batch\":\"tok\"}";
  size_t n = strlen(body);
  for (size_t k = 0; k < n; k++) {
    char *t = malloc(k ? k : 1); /* exact size so ASan sees over-reads */
    memcpy(t, body, k);
    CHECK_INT(mx_json_scan_validate(t, k), MX_ERR_INVALID);
    int rv = mx_json_scan_find(t, k, PATH("next_batch"), &v);
    CHECK(rv == MX_ERR_INVALID || rv == MX_ERR_NOTFOUND);
    free(t);
  }
}

typedef struct collect {
  char keys[8][32];
  int n;
  int stop_at;
} collect;

static int collect_cb(const mx_json_span *key, const mx_json_span *value,
                      void *ud) {
  collect *c = ud;
  const char *s;
  size_t n;
  bool esc;
  if (mx_json_scan_string(key, &s, &n, &esc) != 0 || c->n >= 8)
    return -100;
  size_t out;
  if (mx_json_scan_unescape(s, n, c->keys[c->n], 31, &out) != 0)
    return -101;
  c->keys[c->n][out] = '\0';
  c->n++;
  if (value->type == MX_JSON_NONE)
    return -102;
  return c->n == c->stop_at ? 7 : 0;
}

static void test_members(void) {
  const char *join = "{ \"!a:x\" : {\"t\":[]} , \"!b\\u003ay\":{},\"!c:z\":1 }";
  collect c = {.stop_at = 0};
  CHECK_INT(mx_json_scan_members(join, strlen(join), collect_cb, &c), 0);
  CHECK_INT(c.n, 3);
  CHECK_STREQ(c.keys[0], "!a:x");
  CHECK_STREQ(c.keys[1], "!b:y");
  CHECK_STREQ(c.keys[2], "!c:z");
  /* A non-zero callback value stops the walk and is returned. */
  collect d = {.stop_at = 2};
  CHECK_INT(mx_json_scan_members(join, strlen(join), collect_cb, &d), 7);
  CHECK_INT(d.n, 2);
  collect e = {.stop_at = 0};
  CHECK_INT(mx_json_scan_members("{}", 2, collect_cb, &e), 0);
  CHECK_INT(e.n, 0);
  CHECK_INT(mx_json_scan_members("[]", 2, collect_cb, &e), MX_ERR_INVALID);
  /* Malformed after two good members: those were reported. */
  collect f = {.stop_at = 0};
  const char *bad = "{\"a\":1,\"b\":2,\"c\"}";
  CHECK_INT(mx_json_scan_members(bad, strlen(bad), collect_cb, &f),
            MX_ERR_INVALID);
  CHECK_INT(f.n, 2);
  CHECK_INT(mx_json_scan_members("{\"a\":1} x", 9, collect_cb, &f),
            MX_ERR_INVALID);
}

static void test_unescape(void) {
  char out[64];
  size_t n;
  const char *in = "a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\\u0041\\u00e9\\u20ac"
                   "\\uD83D\\uDE00";
  CHECK_INT(mx_json_scan_unescape(in, strlen(in), out, sizeof(out), &n), 0);
  CHECK_MEMEQ(out, n,
              "a\"b\\c/d\b\f\n\r\tA\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 22);
  /* Lone surrogates become U+FFFD. */
  CHECK_INT(mx_json_scan_unescape(S("\\uD800x"), out, sizeof(out), &n), 0);
  CHECK_MEMEQ(out, n, "\xef\xbf\xbdx", 4);
  CHECK_INT(mx_json_scan_unescape(S("\\uDC00"), out, sizeof(out), &n), 0);
  CHECK_MEMEQ(out, n, "\xef\xbf\xbd", 3);
  CHECK_INT(mx_json_scan_unescape(S("\\uD800\\u0041"), out, sizeof(out), &n),
            0);
  CHECK_MEMEQ(out, n, "\xef\xbf\xbd" "A", 4);
  /* \u0000 gives a NUL byte. */
  CHECK_INT(mx_json_scan_unescape(S("a\\u0000b"), out, sizeof(out), &n), 0);
  CHECK_MEMEQ(out, n, "a\0b", 3);
  /* Too small: MX_ERR_LIMIT with a prefix, never an overflow. */
  CHECK_INT(mx_json_scan_unescape(S("abcdef"), out, 3, &n), MX_ERR_LIMIT);
  CHECK_MEMEQ(out, n, "abc", 3);
  CHECK_INT(mx_json_scan_unescape(S("ab\\u00e9"), out, 3, &n), MX_ERR_LIMIT);
  CHECK_MEMEQ(out, n, "ab", 2);
  /* Bad escapes. */
  CHECK_INT(mx_json_scan_unescape(S("\\x"), out, sizeof(out), &n),
            MX_ERR_INVALID);
  CHECK_INT(mx_json_scan_unescape(S("\\u12g4"), out, sizeof(out), &n),
            MX_ERR_INVALID);
  CHECK_INT(mx_json_scan_unescape(S("abc\\"), out, sizeof(out), &n),
            MX_ERR_INVALID);
  /* Output never longer than input. */
  const char *w = "\\u00e9\\u20ac\\uD83D\\uDE00\\uDFFF";
  CHECK_INT(mx_json_scan_unescape(w, strlen(w), out, strlen(w), &n), 0);
  CHECK(n <= strlen(w));
}

static void test_equals(void) {
  mx_json_span k = {"\"a\\u0062c\"", 10, MX_JSON_STRING};
  CHECK(mx_json_scan_equals(&k, "abc", 3));
  CHECK(!mx_json_scan_equals(&k, "ab", 2));
  CHECK(!mx_json_scan_equals(&k, "abcd", 4));
  CHECK(!mx_json_scan_equals(&k, "abd", 3));
  mx_json_span plain = {"\"abc\"", 5, MX_JSON_STRING};
  CHECK(mx_json_scan_equals(&plain, "abc", 3));
  CHECK(!mx_json_scan_equals(&plain, "abC", 3));
  mx_json_span nul = {"\"a\\u0000\"", 9, MX_JSON_STRING};
  CHECK(mx_json_scan_equals(&nul, "a\0", 2));
  CHECK(!mx_json_scan_equals(&nul, "a", 1));
}

/* The scanner and json-c agree on which random near-JSON texts are valid
 * objects and on the value of next_batch when both accept. */
static uint64_t rng = 0x9E3779B97F4A7C15ULL;
static unsigned rnd(unsigned n) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (unsigned)(rng % n);
}

/* json-c accepts numbers with leading zeros ("01") even in strict mode;
 * RFC 8259 does not, and neither do we. */
static bool has_leading_zero(const char *s) {
  bool in_str = false;
  for (size_t i = 1; s[i] && s[i + 1]; i++) {
    if (in_str) {
      if (s[i] == '\\')
        i++;
      else if (s[i] == '"')
        in_str = false;
    } else if (s[i] == '"') {
      in_str = true;
    } else if (s[i] == '0' && s[i + 1] >= '0' && s[i + 1] <= '9' &&
               !(s[i - 1] >= '0' && s[i - 1] <= '9') && s[i - 1] != '.' &&
               s[i - 1] != 'e') {
      return true;
    }
  }
  return false;
}

static void test_agrees_with_json_c(void) {
  static const char *const atoms[] = {
      "{", "}", "[", "]", ",", ":", "\"next_batch\"", "\"a\"", "\"\\u0041\"",
      "1", "-2.5e3", "true", "null", " ", "\"x\\\"}\"", "0", "\"\"",
  };
  int both = 0, agreed = 0;
  for (int iter = 0; iter < 20000; iter++) {
    char buf[256];
    size_t n = 0;
    buf[n++] = '{';
    if (rnd(2)) {
      memcpy(buf + n, "\"next_batch\":", 13);
      n += 13;
    }
    int k = (int)rnd(12);
    for (int i = 0; i < k; i++) {
      const char *a = atoms[rnd(sizeof(atoms) / sizeof(atoms[0]))];
      size_t l = strlen(a);
      if (n + l + 2 >= sizeof(buf))
        break;
      memcpy(buf + n, a, l);
      n += l;
    }
    buf[n++] = '}';
    buf[n] = '\0';
    int ours = mx_json_scan_validate(buf, n);
    json_tokener *tok = json_tokener_new();
    json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
    json_object *o = json_tokener_parse_ex(tok, buf, (int)n);
    bool theirs = o && json_tokener_get_error(tok) == json_tokener_success &&
                  tok->char_offset == (int)n &&
                  json_object_is_type(o, json_type_object);
    if (theirs && has_leading_zero(buf)) {
      CHECK_INT(ours, MX_ERR_INVALID);
      theirs = false;
    }
    if ((ours == 0) != theirs)
      printf("# disagree (ours %d, json-c %d): %s\n", ours, theirs, buf);
    CHECK((ours == 0) == theirs);
    if (ours == 0 && theirs) {
      both++;
      json_object *nb = NULL;
      mx_json_span v;
      int f = mx_json_scan_find(buf, n, PATH("next_batch"), &v);
      /* json-c keeps the last duplicate; compare only single keys. */
      int count = 0;
      json_object_object_foreach(o, key, val) {
        (void)val;
        count += strcmp(key, "next_batch") == 0;
      }
      if (count <= 1 && json_object_object_get_ex(o, "next_batch", &nb) &&
          strstr(buf, "\\u0041") == NULL) {
        const char *js = json_object_to_json_string_ext(nb,
                                                        JSON_C_TO_STRING_PLAIN);
        CHECK_INT(f, 0);
        if (f == 0 && v.type != MX_JSON_STRING && v.type != MX_JSON_OBJECT &&
            v.type != MX_JSON_ARRAY)
          CHECK_MEMEQ(v.p, v.len, js, strlen(js));
        agreed++;
      } else if (count == 0) {
        CHECK_INT(f, MX_ERR_NOTFOUND);
      }
    }
    json_object_put(o);
    json_tokener_free(tok);
  }
  printf("# %d valid texts, %d with a next_batch compared\n", both, agreed);
  CHECK(both > 100);
}

int main(void) {
  TAP_RUN(TAP_CASE(test_validate_accepts), TAP_CASE(test_validate_rejects),
          TAP_CASE(test_depth_cap), TAP_CASE(test_find_top_level),
          TAP_CASE(test_find_path), TAP_CASE(test_find_strings_with_braces),
          TAP_CASE(test_duplicate_keys_first_wins),
          TAP_CASE(test_escaped_keys), TAP_CASE(test_find_malformed),
          TAP_CASE(test_members), TAP_CASE(test_unescape),
          TAP_CASE(test_equals), TAP_CASE(test_agrees_with_json_c));
}
