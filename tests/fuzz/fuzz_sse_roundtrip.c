/* Arbitrary payloads through the SSE encoder and back through the parser
 * (h2/sse_event.c, h2/sse_parse.c): exactly one event must come out,
 * with the id and type that went in and the payload with its line breaks
 * (CRLF, CR) turned into LF, which is all SSE can carry. */
#include <stdlib.h>
#include <string.h>

#include "common/chunk.h"
#include "h2/sse_event.h"
#include "h2/sse_parse.h"
#include "tests/fuzz/fuzz.h"

#define ID "s72594_4483_1934"

typedef struct expect {
  const char *data;
  size_t len;
  const char *type;
  int events;
} expect;

static int on_event(void *ud, const mx_sse_parse_event *ev) {
  expect *e = ud;
  if (ev->datalen != e->len || memcmp(ev->data, e->data, e->len) ||
      ev->idlen != strlen(ID) || memcmp(ev->id, ID, ev->idlen) ||
      ev->typelen != strlen(e->type) || memcmp(ev->type, e->type, ev->typelen))
    abort();
  e->events++;
  return 0;
}

static void roundtrip(const char *in, size_t n, const char *type,
                      const char *want, size_t wantlen, size_t step) {
  mx_chunk *c;
  if (mx_sse_event_encode(ID, strlen(ID), type, in, n, &c) != 0)
    abort();
  expect e = {want, wantlen, type ? type : "message", 0};
  static const mx_sse_parse_cbs cbs = {on_event, NULL, NULL};
  mx_sse_parser p;
  mx_sse_parse_init(&p, n + 64, n + 64, &cbs, &e);
  for (size_t off = 0; off < c->len; off += step) {
    size_t k = c->len - off < step ? c->len - off : step;
    if (mx_sse_parse_feed(&p, c->data + off, k) != 0)
      abort();
  }
  if (e.events != 1)
    abort();
  mx_sse_parse_free(&p);
  mx_chunk_unref(c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *in = (const char *)data;
  char *want = calloc(1, size + 1);
  if (!want)
    return 0;
  size_t w = 0;
  for (size_t i = 0; i < size; i++) {
    if (in[i] == '\r') {
      want[w++] = '\n';
      if (i + 1 < size && in[i + 1] == '\n')
        i++;
    } else {
      want[w++] = in[i];
    }
  }
  roundtrip(in, size, NULL, want, w, size + 64);
  roundtrip(in, size, "error", want, w, 1 + (size ? data[0] % 7 : 0));
  free(want);
  return 0;
}
