#include "sync/json_scan.h"

#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common/error.h"

typedef const unsigned char *cur;

/* Bytes that end the fast path inside a string: the closing quote, an
 * escape, or a raw control character (invalid in JSON strings). */
#define C8(x) [x] = 1, [x + 1] = 1, [x + 2] = 1, [x + 3] = 1, \
              [x + 4] = 1, [x + 5] = 1, [x + 6] = 1, [x + 7] = 1
static const unsigned char str_stop[256] = {
    C8(0), C8(8), C8(16), C8(24), ['"'] = 1, ['\\'] = 1,
};
#undef C8

/* Bytes a container skip must look at. */
static const unsigned char structural[256] = {
    ['"'] = 1, ['{'] = 1, ['}'] = 1, ['['] = 1, [']'] = 1,
};

static inline int hex(unsigned char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  c |= 0x20;
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  return -1;
}

static inline cur skip_ws(cur p, cur end) {
  while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
    p++;
  return p;
}

/* First byte in [p, end) that ends the fast path of a string (see
 * str_stop), or end. Most of a /sync body is string contents, so this is
 * the hot loop: 16 bytes at a time with SSE2 (baseline on x86-64), else
 * 8 at a time in a word. */
static inline cur string_stop(cur p, cur end) {
#if defined(__SSE2__)
  const __m128i quote = _mm_set1_epi8('"'), bslash = _mm_set1_epi8('\\'),
                ctl = _mm_set1_epi8(0x1F);
  while (end - p >= 16) {
    __m128i v = _mm_loadu_si128((const __m128i *)(const void *)p);
    __m128i hit = _mm_or_si128(
        _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, bslash)),
        _mm_cmpeq_epi8(_mm_min_epu8(v, ctl), v)); /* v <= 0x1F */
    int mask = _mm_movemask_epi8(hit);
    if (mask)
      return p + __builtin_ctz((unsigned)mask);
    p += 16;
  }
#elif defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL
/* Non-zero when some byte of v is zero / below n (n <= 128). */
#define has_zero(v) (((v) - ONES) & ~(v) & HIGHS)
#define has_below(v, n) (((v) - ONES * (n)) & ~(v) & HIGHS)
  while (end - p >= 8) {
    uint64_t w;
    memcpy(&w, p, 8);
    /* The lowest flagged byte is exact (only bytes above it may be
     * false positives), and on little-endian it comes first. */
    uint64_t hit = has_zero(w ^ (ONES * '"')) | has_zero(w ^ (ONES * '\\')) |
                   has_below(w, 0x20);
    if (hit)
      return p + (__builtin_ctzll(hit) >> 3);
    p += 8;
  }
#endif
  while (p < end && !str_stop[*p])
    p++;
  return p;
}

/* p is just after an opening quote. Returns the byte after the closing
 * quote, or NULL for a bad escape, a control character or truncation. */
static cur scan_string(cur p, cur end) {
  for (;;) {
    p = string_stop(p, end);
    if (p >= end)
      return NULL;
    if (*p == '"')
      return p + 1;
    if (*p != '\\')
      return NULL; /* raw control character */
    if (++p >= end)
      return NULL;
    switch (*p) {
    case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r':
    case 't':
      p++;
      break;
    case 'u':
      if (end - p < 5 || hex(p[1]) < 0 || hex(p[2]) < 0 || hex(p[3]) < 0 ||
          hex(p[4]) < 0)
        return NULL;
      p += 5;
      break;
    default:
      return NULL;
    }
  }
}

static inline bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

/* RFC 8259 number starting at p; returns the byte after it or NULL. */
static cur scan_number(cur p, cur end) {
  if (p < end && *p == '-')
    p++;
  if (p >= end)
    return NULL;
  if (*p == '0')
    p++;
  else if (*p >= '1' && *p <= '9')
    while (++p < end && is_digit(*p))
      ;
  else
    return NULL;
  if (p < end && *p == '.') {
    if (++p >= end || !is_digit(*p))
      return NULL;
    while (++p < end && is_digit(*p))
      ;
  }
  if (p < end && (*p == 'e' || *p == 'E')) {
    if (++p < end && (*p == '+' || *p == '-'))
      p++;
    if (p >= end || !is_digit(*p))
      return NULL;
    while (++p < end && is_digit(*p))
      ;
  }
  return p;
}

static cur scan_literal(cur p, cur end, const char *lit, size_t n) {
  if ((size_t)(end - p) < n || memcmp(p, lit, n) != 0)
    return NULL;
  return p + n;
}

/* Container kinds on a bit stack: 1 = object, 0 = array. */
typedef struct nest {
  uint64_t bits[MX_JSON_MAX_DEPTH / 64];
  unsigned depth;
} nest;

static inline bool nest_push(nest *n, bool object) {
  if (n->depth >= MX_JSON_MAX_DEPTH)
    return false;
  uint64_t m = 1ULL << (n->depth & 63);
  if (object)
    n->bits[n->depth >> 6] |= m;
  else
    n->bits[n->depth >> 6] &= ~m;
  n->depth++;
  return true;
}

static inline bool nest_top_is_object(const nest *n) {
  unsigned d = n->depth - 1;
  return (n->bits[d >> 6] >> (d & 63)) & 1;
}

int mx_json_scan_validate(const char *buf, size_t len) {
  cur p = (cur)buf, end = p + len;
  nest n = {{0}, 0};
  p = skip_ws(p, end);
  if (p >= end || *p != '{')
    return MX_ERR_INVALID;
  p++;
  nest_push(&n, true);
  goto object_open;

value:
  p = skip_ws(p, end);
  if (p >= end)
    return MX_ERR_INVALID;
  switch (*p) {
  case '{':
    if (!nest_push(&n, true))
      return MX_ERR_INVALID;
    p++;
  object_open:
    p = skip_ws(p, end);
    if (p < end && *p == '}') {
      p++;
      n.depth--;
      goto after_value;
    }
    goto key;
  case '[':
    if (!nest_push(&n, false))
      return MX_ERR_INVALID;
    p = skip_ws(p + 1, end);
    if (p < end && *p == ']') {
      p++;
      n.depth--;
      goto after_value;
    }
    goto value;
  case '"':
    p = scan_string(p + 1, end);
    break;
  case 't':
    p = scan_literal(p, end, "true", 4);
    break;
  case 'f':
    p = scan_literal(p, end, "false", 5);
    break;
  case 'n':
    p = scan_literal(p, end, "null", 4);
    break;
  default:
    p = scan_number(p, end);
    break;
  }
  if (!p)
    return MX_ERR_INVALID;

after_value:
  if (n.depth == 0)
    return skip_ws(p, end) == end ? 0 : MX_ERR_INVALID;
  p = skip_ws(p, end);
  if (p >= end)
    return MX_ERR_INVALID;
  if (*p == ',') {
    p = skip_ws(p + 1, end);
    if (nest_top_is_object(&n))
      goto key;
    goto value;
  }
  if (*p == (nest_top_is_object(&n) ? '}' : ']')) {
    p++;
    n.depth--;
    goto after_value;
  }
  return MX_ERR_INVALID;

key:
  /* p is at a non-blank byte (or end). */
  if (p >= end || *p != '"')
    return MX_ERR_INVALID;
  p = scan_string(p + 1, end);
  if (!p)
    return MX_ERR_INVALID;
  p = skip_ws(p, end);
  if (p >= end || *p != ':')
    return MX_ERR_INVALID;
  p++;
  goto value;
}

/* Skips the container opening at p (nested `base` levels deep already):
 * strings are scanned properly, brackets must match, everything else
 * (commas, colons, scalars) is passed over unchecked. Returns the byte
 * after the closing bracket or NULL. */
static cur skip_container(cur p, cur end, unsigned base) {
  nest n = {{0}, base};
  for (; p < end; p++) {
    if (!structural[*p])
      continue;
    switch (*p) {
    case '"':
      p = scan_string(p + 1, end);
      if (!p)
        return NULL;
      p--; /* the loop steps past the closing quote */
      break;
    case '{':
    case '[':
      if (!nest_push(&n, *p == '{'))
        return NULL;
      break;
    default: /* '}' or ']' */
      if (n.depth == base || nest_top_is_object(&n) != (*p == '}'))
        return NULL;
      if (--n.depth == base)
        return p + 1;
      break;
    }
  }
  return NULL;
}

/* Reads the value at p (non-blank) into *out and returns the byte after
 * it, or NULL. depth is the nesting level of the enclosing object. */
static cur read_value(cur p, cur end, unsigned depth, mx_json_span *out) {
  cur q;
  mx_json_type t;
  switch (*p) {
  case '{':
    t = MX_JSON_OBJECT;
    q = skip_container(p, end, depth);
    break;
  case '[':
    t = MX_JSON_ARRAY;
    q = skip_container(p, end, depth);
    break;
  case '"':
    t = MX_JSON_STRING;
    q = scan_string(p + 1, end);
    break;
  case 't':
    t = MX_JSON_TRUE;
    q = scan_literal(p, end, "true", 4);
    break;
  case 'f':
    t = MX_JSON_FALSE;
    q = scan_literal(p, end, "false", 5);
    break;
  case 'n':
    t = MX_JSON_NULL;
    q = scan_literal(p, end, "null", 4);
    break;
  default:
    t = MX_JSON_NUMBER;
    q = scan_number(p, end);
    break;
  }
  if (!q)
    return NULL;
  out->p = (const char *)p;
  out->len = (size_t)(q - p);
  out->type = t;
  return q;
}

typedef int (*member_fn)(const mx_json_span *key, const mx_json_span *value,
                         void *ud);

/* Walks the members of the object in buf; depth is its nesting level. */
static int walk(const char *buf, size_t len, unsigned depth, member_fn fn,
                void *ud) {
  cur p = skip_ws((cur)buf, (cur)buf + len), end = (cur)buf + len;
  if (p >= end || *p != '{' || depth >= MX_JSON_MAX_DEPTH)
    return MX_ERR_INVALID;
  depth++;
  p = skip_ws(p + 1, end);
  if (p < end && *p == '}')
    return skip_ws(p + 1, end) == end ? 0 : MX_ERR_INVALID;
  for (;;) {
    mx_json_span key, value;
    if (p >= end || *p != '"')
      return MX_ERR_INVALID;
    cur q = scan_string(p + 1, end);
    if (!q)
      return MX_ERR_INVALID;
    key.p = (const char *)p;
    key.len = (size_t)(q - p);
    key.type = MX_JSON_STRING;
    p = skip_ws(q, end);
    if (p >= end || *p != ':')
      return MX_ERR_INVALID;
    p = skip_ws(p + 1, end);
    if (p >= end || !(p = read_value(p, end, depth, &value)))
      return MX_ERR_INVALID;
    int rv = fn(&key, &value, ud);
    if (rv)
      return rv;
    p = skip_ws(p, end);
    if (p >= end)
      return MX_ERR_INVALID;
    if (*p == '}')
      return skip_ws(p + 1, end) == end ? 0 : MX_ERR_INVALID;
    if (*p != ',')
      return MX_ERR_INVALID;
    p = skip_ws(p + 1, end);
  }
}

int mx_json_scan_members(const char *buf, size_t len, member_fn fn,
                         void *ud) {
  return walk(buf, len, 0, fn, ud);
}

typedef struct find_ctx {
  const char *want;
  size_t wlen;
  mx_json_span *out;
} find_ctx;

static int find_cb(const mx_json_span *key, const mx_json_span *value,
                   void *ud) {
  find_ctx *c = ud;
  if (!mx_json_scan_equals(key, c->want, c->wlen))
    return 0;
  *c->out = *value;
  return 1; /* first occurrence wins */
}

int mx_json_scan_find(const char *buf, size_t len, const char *const *path,
                      size_t npath, mx_json_span *out) {
  cur p = skip_ws((cur)buf, (cur)buf + len), end = (cur)buf + len;
  /* Trim trailing blanks so the result span is exact. */
  while (end > p && (end[-1] == ' ' || end[-1] == '\n' || end[-1] == '\r' ||
                     end[-1] == '\t'))
    end--;
  if (p >= end || *p != '{' || end[-1] != '}')
    return MX_ERR_INVALID;
  mx_json_span cur_obj = {(const char *)p, (size_t)(end - p), MX_JSON_OBJECT};
  for (size_t i = 0; i < npath; i++) {
    if (cur_obj.type != MX_JSON_OBJECT)
      return MX_ERR_NOTFOUND;
    mx_json_span v;
    find_ctx c = {path[i], strlen(path[i]), &v};
    int rv = walk(cur_obj.p, cur_obj.len, (unsigned)i, find_cb, &c);
    if (rv < 0)
      return rv;
    if (rv == 0)
      return MX_ERR_NOTFOUND;
    cur_obj = v;
  }
  *out = cur_obj;
  return 0;
}

int mx_json_scan_string(const mx_json_span *str, const char **s, size_t *n,
                        bool *escaped) {
  if (str->type != MX_JSON_STRING || str->len < 2)
    return MX_ERR_INVALID;
  *s = str->p + 1;
  *n = str->len - 2;
  if (escaped)
    *escaped = memchr(*s, '\\', *n) != NULL;
  return 0;
}

/* Decodes the escape at *pp (a backslash) into u8[0..*n), advancing *pp.
 * Returns false on a malformed escape. */
static bool decode_escape(cur *pp, cur end, unsigned char u8[4], size_t *n) {
  cur p = *pp + 1;
  if (p >= end)
    return false;
  unsigned c = *p++;
  switch (c) {
  case '"': case '\\': case '/':
    break;
  case 'b': c = '\b'; break;
  case 'f': c = '\f'; break;
  case 'n': c = '\n'; break;
  case 'r': c = '\r'; break;
  case 't': c = '\t'; break;
  case 'u': {
    if (end - p < 4)
      return false;
    int h0 = hex(p[0]), h1 = hex(p[1]), h2 = hex(p[2]), h3 = hex(p[3]);
    if ((h0 | h1 | h2 | h3) < 0)
      return false;
    c = (unsigned)(h0 << 12 | h1 << 8 | h2 << 4 | h3);
    p += 4;
    if (c >= 0xD800 && c <= 0xDBFF) {
      /* A high surrogate pairs with a following \uDC00-\uDFFF. */
      unsigned lo = 0;
      if (end - p >= 6 && p[0] == '\\' && p[1] == 'u') {
        int l0 = hex(p[2]), l1 = hex(p[3]), l2 = hex(p[4]), l3 = hex(p[5]);
        if ((l0 | l1 | l2 | l3) >= 0)
          lo = (unsigned)(l0 << 12 | l1 << 8 | l2 << 4 | l3);
      }
      if (lo >= 0xDC00 && lo <= 0xDFFF) {
        c = 0x10000 + ((c - 0xD800) << 10) + (lo - 0xDC00);
        p += 6;
      } else {
        c = 0xFFFD;
      }
    } else if (c >= 0xDC00 && c <= 0xDFFF) {
      c = 0xFFFD;
    }
    break;
  }
  default:
    return false;
  }
  if (c < 0x80) {
    u8[0] = (unsigned char)c;
    *n = 1;
  } else if (c < 0x800) {
    u8[0] = (unsigned char)(0xC0 | c >> 6);
    u8[1] = (unsigned char)(0x80 | (c & 0x3F));
    *n = 2;
  } else if (c < 0x10000) {
    u8[0] = (unsigned char)(0xE0 | c >> 12);
    u8[1] = (unsigned char)(0x80 | (c >> 6 & 0x3F));
    u8[2] = (unsigned char)(0x80 | (c & 0x3F));
    *n = 3;
  } else {
    u8[0] = (unsigned char)(0xF0 | c >> 18);
    u8[1] = (unsigned char)(0x80 | (c >> 12 & 0x3F));
    u8[2] = (unsigned char)(0x80 | (c >> 6 & 0x3F));
    u8[3] = (unsigned char)(0x80 | (c & 0x3F));
    *n = 4;
  }
  *pp = p;
  return true;
}

int mx_json_scan_unescape(const char *s, size_t n, char *out, size_t outcap,
                          size_t *outlen) {
  cur p = (cur)s, end = p + n;
  size_t o = 0;
  int rv = 0;
  while (p < end) {
    cur bs = memchr(p, '\\', (size_t)(end - p));
    size_t run = (size_t)((bs ? bs : end) - p);
    if (run > outcap - o) {
      memcpy(out + o, p, outcap - o);
      o = outcap;
      rv = MX_ERR_LIMIT;
      break;
    }
    memcpy(out + o, p, run);
    o += run;
    p += run;
    if (!bs)
      break;
    unsigned char u8[4];
    size_t k;
    if (!decode_escape(&p, end, u8, &k)) {
      rv = MX_ERR_INVALID;
      break;
    }
    if (k > outcap - o) {
      rv = MX_ERR_LIMIT;
      break;
    }
    memcpy(out + o, u8, k);
    o += k;
  }
  *outlen = o;
  return rv;
}

bool mx_json_scan_equals(const mx_json_span *str, const char *want,
                         size_t wlen) {
  const char *s;
  size_t n;
  bool esc;
  if (mx_json_scan_string(str, &s, &n, &esc) != 0)
    return false;
  if (!esc)
    return n == wlen && memcmp(s, want, n) == 0;
  cur p = (cur)s, end = p + n;
  const unsigned char *w = (const unsigned char *)want, *wend = w + wlen;
  while (p < end) {
    if (*p != '\\') {
      if (w >= wend || *w++ != *p++)
        return false;
      continue;
    }
    unsigned char u8[4];
    size_t k;
    if (!decode_escape(&p, end, u8, &k) || (size_t)(wend - w) < k ||
        memcmp(w, u8, k) != 0)
      return false;
    w += k;
  }
  return w == wend;
}
