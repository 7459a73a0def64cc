#include "h2/sse_parse.h"

#include <string.h>

#include "common/error.h"

static const unsigned char bom[3] = {0xEF, 0xBB, 0xBF};

void mx_sse_parse_init(mx_sse_parser *p, size_t max_line, size_t max_data,
                       const mx_sse_parse_cbs *cbs, void *ud) {
  memset(p, 0, sizeof(*p));
  p->cbs = *cbs;
  p->ud = ud;
  p->max_line = max_line;
  mx_buf_init(&p->line, max_line);
  mx_buf_init(&p->data, max_data);
  mx_buf_init(&p->type, max_line);
  mx_buf_init(&p->idbuf, max_line);
  mx_buf_init(&p->lastid, max_line);
}

void mx_sse_parse_free(mx_sse_parser *p) {
  mx_buf_free(&p->line);
  mx_buf_free(&p->data);
  mx_buf_free(&p->type);
  mx_buf_free(&p->idbuf);
  mx_buf_free(&p->lastid);
}

const char *mx_sse_parse_last_id(const mx_sse_parser *p, size_t *len) {
  *len = p->lastid.len;
  return p->lastid.len ? p->lastid.data : "";
}

/* Replaces b's contents with s[0..n). */
static int set(mx_buf *b, const char *s, size_t n) {
  mx_buf_reset(b);
  return mx_buf_append(b, s, n);
}

static int dispatch(mx_sse_parser *p) {
  int rv = set(&p->lastid, p->idbuf.data, p->idbuf.len);
  if (rv)
    return rv;
  if (p->data.len == 0) {
    mx_buf_reset(&p->type);
    return 0;
  }
  /* Every data line appended an LF; the last one is not part of it. */
  p->data.data[--p->data.len] = '\0';
  mx_sse_parse_event ev;
  if (p->type.len) {
    ev.type = p->type.data;
    ev.typelen = p->type.len;
  } else {
    ev.type = "message";
    ev.typelen = 7;
  }
  ev.data = p->data.data;
  ev.datalen = p->data.len;
  ev.id = p->lastid.len ? p->lastid.data : "";
  ev.idlen = p->lastid.len;
  rv = p->cbs.on_event(p->ud, &ev);
  mx_buf_reset(&p->data);
  mx_buf_reset(&p->type);
  return rv;
}

static bool field_is(const char *f, size_t n, const char *name) {
  size_t k = strlen(name);
  return n == k && memcmp(f, name, k) == 0;
}

static int process_line(mx_sse_parser *p, const char *s, size_t n) {
  if (n == 0)
    return dispatch(p);
  if (s[0] == ':')
    return p->cbs.on_comment ? p->cbs.on_comment(p->ud, s + 1, n - 1) : 0;
  const char *colon = memchr(s, ':', n);
  const char *v = "";
  size_t fn = n, vn = 0;
  if (colon) {
    fn = (size_t)(colon - s);
    v = colon + 1;
    vn = n - fn - 1;
    if (vn && *v == ' ') {
      v++;
      vn--;
    }
  }
  if (field_is(s, fn, "data")) {
    int rv = mx_buf_append(&p->data, v, vn);
    return rv ? rv : mx_buf_append(&p->data, "\n", 1);
  }
  if (field_is(s, fn, "event"))
    return set(&p->type, v, vn);
  if (field_is(s, fn, "id"))
    return memchr(v, '\0', vn) ? 0 : set(&p->idbuf, v, vn);
  if (field_is(s, fn, "retry")) {
    if (vn == 0)
      return 0;
    uint64_t ms = 0;
    for (size_t i = 0; i < vn; i++) {
      if (v[i] < '0' || v[i] > '9')
        return 0;
      unsigned d = (unsigned)(v[i] - '0');
      ms = ms > (UINT64_MAX - d) / 10 ? UINT64_MAX : ms * 10 + d;
    }
    return p->cbs.on_retry ? p->cbs.on_retry(p->ud, ms) : 0;
  }
  return 0; /* unknown fields are ignored */
}

/* Next CR or LF in [s, end), or NULL. The next position of each is
 * cached, so a feed costs two vectorised memchr passes overall even when
 * one of the two never occurs. */
typedef struct breaks {
  const char *cr, *lf;
  bool cr_done, lf_done; /* no more of that byte before end */
} breaks;

static const char *find_break(breaks *b, const char *s, const char *end) {
  if (!b->cr_done && (!b->cr || b->cr < s)) {
    b->cr = memchr(s, '\r', (size_t)(end - s));
    b->cr_done = !b->cr;
  }
  if (!b->lf_done && (!b->lf || b->lf < s)) {
    b->lf = memchr(s, '\n', (size_t)(end - s));
    b->lf_done = !b->lf;
  }
  if (b->cr_done)
    return b->lf_done ? NULL : b->lf;
  if (b->lf_done)
    return b->cr;
  return b->cr < b->lf ? b->cr : b->lf;
}

static int feed_lines(mx_sse_parser *p, const char *s, size_t len) {
  const char *end = s + len;
  if (p->cr && s < end) {
    p->cr = false;
    if (*s == '\n')
      s++; /* second half of a CRLF split across feeds */
  }
  breaks b = {NULL, NULL, false, false};
  while (s < end) {
    const char *e = find_break(&b, s, end);
    if (!e)
      return mx_buf_append(&p->line, s, (size_t)(end - s));
    int rv;
    if (p->line.len) {
      rv = mx_buf_append(&p->line, s, (size_t)(e - s));
      if (rv == 0)
        rv = process_line(p, p->line.data, p->line.len);
      mx_buf_reset(&p->line);
    } else if ((size_t)(e - s) > p->max_line) {
      rv = MX_ERR_LIMIT;
    } else {
      rv = process_line(p, s, (size_t)(e - s));
    }
    if (rv)
      return rv;
    if (*e == '\r') {
      if (e + 1 == end)
        p->cr = true;
      else if (e[1] == '\n')
        e++;
    }
    s = e + 1;
  }
  return 0;
}

int mx_sse_parse_feed(mx_sse_parser *p, const char *buf, size_t len) {
  if (p->err)
    return p->err;
  const unsigned char *u = (const unsigned char *)buf;
  int rv = 0;
  while (p->bom < 3 && len > 0) {
    if (*u == bom[p->bom]) {
      p->bom++;
      u++;
      len--;
      continue;
    }
    /* Not a BOM after all: the bytes taken so far are ordinary input. */
    unsigned char taken = p->bom;
    p->bom = 3;
    if (taken)
      rv = feed_lines(p, (const char *)bom, taken);
  }
  if (rv == 0 && len)
    rv = feed_lines(p, (const char *)u, len);
  if (rv)
    p->err = rv;
  return rv;
}
