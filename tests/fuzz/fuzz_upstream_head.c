/* Response heads from the homeserver, through the upstream client's head
 * parser (header_cb and what it calls, file-local in the client: the
 * client's source is included here). Lines are handed over the way curl
 * hands them: one call per line, its CRLF or LF included, the status line
 * first, interim 1xx heads and trailers as they come.
 *
 * Properties:
 *  - every call either takes the whole line or fails the transfer with an
 *    error and a detail;
 *  - the head reaches on_head at most once, with a final status
 *    (200..599) and fields that are HTTP tokens with values free of CR,
 *    LF and NUL (what the proxy forwards cannot split a header), no more
 *    fields than it had lines, values trimmed of spaces and tabs (also
 *    across an obsolete line fold);
 *  - no more head bytes are taken than MX_UPSTREAM_MAX_HEADER. */
#include "homeserver/upstream.c"

#include "tests/fuzz/fuzz.h"

typedef struct seen {
  int heads;
  size_t lines; /* lines of the head being read */
} seen;

static bool blank(char c) { return c == ' ' || c == '\t'; }

static bool clean_value(const char *v, size_t n) {
  return !memchr(v, '\r', n) && !memchr(v, '\n', n) && !memchr(v, '\0', n) &&
         v[n] == '\0' && (n == 0 || (!blank(v[0]) && !blank(v[n - 1])));
}

static int on_head(mx_upstream_req *r, int status, const mx_header *hs,
                   size_t n, void *ud) {
  seen *s = ud;
  if (++s->heads > 1 || status < 200 || status > 599 || n + 2 > s->lines)
    abort();
  for (size_t i = 0; i < n; i++)
    if (!is_token(hs[i].name, hs[i].namelen) ||
        hs[i].name[hs[i].namelen] != '\0' ||
        !clean_value(hs[i].value, hs[i].valuelen))
      abort();
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  /* The first byte picks the request: HEAD or GET, buffered or not. */
  uint8_t flags = data[0];
  data++;
  size--;
  mx_upstream_req *r = calloc(1, sizeof(*r));
  if (!r)
    return 0;
  seen s = {0, 0};
  r->ops.on_head = on_head;
  r->ud = &s;
  r->method = flags & 1 ? "HEAD" : "GET";
  r->path = "/_matrix/client/v3/sync";
  r->buffer_body_max = flags & 2 ? 4096 : 0;
  r->content_length = -1;
  r->started = ev_time();
  mx_buf_init(&r->head, MX_UPSTREAM_MAX_HEADER);
  mx_buf_init(&r->body, r->buffer_body_max);

  size_t taken = 0;
  for (size_t off = 0; off < size;) {
    const uint8_t *nl = memchr(data + off, '\n', size - off);
    size_t len = nl ? (size_t)(nl - (data + off)) + 1 : size - off;
    char *line = malloc(len); /* exact size: ASan sees any overread */
    if (!line)
      break;
    memcpy(line, data + off, len);
    off += len;
    bool in_head = !r->head_sent;
    if (in_head)
      s.lines++;
    int before = r->status;
    size_t rv = header_cb(line, 1, len, r);
    free(line);
    if (rv != 0 && rv != len)
      abort();
    if (rv == 0) {
      if (!r->err || !r->detail)
        abort(); /* a refusal always says why */
      break;
    }
    taken += len;
    if (in_head && before < 200 && before > 0 && r->status == 0)
      s.lines = 0; /* an interim head ended: a new one starts */
    if (r->head_sent != (s.heads == 1))
      abort();
  }
  if (taken > MX_UPSTREAM_MAX_HEADER)
    abort();
  mx_buf_free(&r->head);
  mx_buf_free(&r->body);
  free(r);
  return 0;
}
