/*
 * mx_json_scan: a string-aware JSON scanner for /sync bodies. It never
 * builds a DOM and never allocates: it validates a body once and then
 * answers "where is member X" with spans pointing into the caller's
 * buffer. A json-c DOM costs about ten times the input in heap; a
 * multi-megabyte initial sync must not.
 *
 * Spans are borrowed: they point into the buffer that was scanned and are
 * valid as long as it is.
 *
 * Strictness: mx_json_scan_validate checks the whole JSON grammar (RFC
 * 8259) of one top-level object: tokens in order, string escapes, no raw
 * control characters in strings, numbers, literals, nesting at most
 * MX_JSON_MAX_DEPTH, nothing but whitespace after. It does not check that
 * strings are well-formed UTF-8 and accepts lone \uD800-style surrogate
 * escapes (both are grammatical JSON; mx_json_scan_unescape turns a lone
 * surrogate into U+FFFD). Because raw control characters are rejected, a
 * valid body has line breaks only between tokens, so the SSE framing may
 * rewrite them (CR -> LF) without changing its meaning.
 *
 * The lookup functions (find, members) are safe on any input: they never
 * read outside the buffer, recurse or pass MX_JSON_MAX_DEPTH, but they only
 * check the parts they walk through. Validate first to know the whole body
 * is JSON.
 *
 * Duplicate keys: lookups return the first occurrence (RFC 8259 leaves the
 * choice open; json-c keeps the last one). Keys are compared after
 * unescaping, so "next\u005fbatch" matches next_batch.
 */
#ifndef MX_JSON_SCAN_H
#define MX_JSON_SCAN_H

#include <stdbool.h>
#include <stddef.h>

#include "common/error.h"
#include "common/limits.h"

typedef enum mx_json_type {
  MX_JSON_NONE = 0,
  MX_JSON_OBJECT,
  MX_JSON_ARRAY,
  MX_JSON_STRING,
  MX_JSON_NUMBER,
  MX_JSON_TRUE,
  MX_JSON_FALSE,
  MX_JSON_NULL,
} mx_json_type;

/* A raw value: p points at its first byte ('{', '[', '"', '-', digit,
 * t/f/n) and len covers it through its last byte (closing quote or
 * bracket included). Borrowed from the scanned buffer. */
typedef struct mx_json_span {
  const char *p;
  size_t len;
  mx_json_type type;
} mx_json_span;

/* Checks that buf[0..len) is exactly one JSON object, optionally
 * surrounded by whitespace. Returns 0 or MX_ERR_INVALID (any grammar
 * error, truncation, trailing bytes, or nesting past MX_JSON_MAX_DEPTH). */
int mx_json_scan_validate(const char *buf, size_t len) MX_MUST_CHECK;

/*
 * Finds the member at path (npath keys, outermost first) starting from
 * the object in buf[0..len) (leading/trailing whitespace allowed, so an
 * object span from an earlier lookup works too). On success fills *out.
 * Returns 0, MX_ERR_NOTFOUND (a key is absent or an intermediate value is
 * not an object) or MX_ERR_INVALID (malformed text on the way).
 * npath == 0 returns the object itself.
 */
int mx_json_scan_find(const char *buf, size_t len, const char *const *path,
                      size_t npath, mx_json_span *out) MX_MUST_CHECK;

/*
 * Calls fn for each member of the object in buf[0..len) in document order.
 * key is the raw key token (a STRING span, quotes included; decode it with
 * mx_json_scan_string), value the raw value. Both are borrowed.
 * Returns 0 after the last member, MX_ERR_INVALID on malformed text (fn
 * may have been called for the members before it), or the first non-zero
 * value fn returns, which stops the walk (use positive values to tell a
 * stop from a scan error).
 */
int mx_json_scan_members(const char *buf, size_t len,
                         int (*fn)(const mx_json_span *key,
                                   const mx_json_span *value, void *ud),
                         void *ud) MX_MUST_CHECK;

/*
 * Raw contents of a STRING span, quotes stripped: *s points into the
 * span (borrowed), *n is its length, and *escaped (may be NULL) tells
 * whether it holds backslash escapes, i.e. whether it must go through
 * mx_json_scan_unescape before use. Returns 0 or MX_ERR_INVALID when the
 * span is not a string.
 */
int mx_json_scan_string(const mx_json_span *str, const char **s, size_t *n,
                        bool *escaped) MX_MUST_CHECK;

/*
 * Decodes raw string contents s[0..n) (as returned by mx_json_scan_string)
 * into out as UTF-8; *outlen receives the length. The result is never
 * longer than n, so outcap >= n always suffices. \u0000 yields a NUL
 * byte; a lone surrogate yields U+FFFD. Returns 0, MX_ERR_LIMIT (out too
 * small; out holds a prefix) or MX_ERR_INVALID (bad escape).
 */
int mx_json_scan_unescape(const char *s, size_t n, char *out, size_t outcap,
                          size_t *outlen) MX_MUST_CHECK;

/* True when the STRING span str, unescaped, equals want[0..wlen). */
bool mx_json_scan_equals(const mx_json_span *str, const char *want,
                         size_t wlen);

#endif
