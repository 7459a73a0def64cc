/* Event streams from an upstream or a server under test, through the
 * SSE parser (h2/sse_parse.c). The input is parsed twice, at once and
 * in pieces whose sizes come from the input itself: both transcripts and
 * results must be identical (CRLF and BOM split across feeds, caps hit
 * at the same line), and no buffer may pass its cap. */
#include <stdlib.h>
#include <string.h>

#include "h2/sse_parse.h"
#include "tests/fuzz/fuzz.h"

#define MAX_LINE 256
#define MAX_DATA 1024

typedef struct transcript {
  uint64_t hash;
  size_t events, retries, comments;
} transcript;

static void mix(transcript *t, const void *p, size_t n) {
  const unsigned char *s = p;
  for (size_t i = 0; i < n; i++)
    t->hash = (t->hash ^ s[i]) * 0x100000001b3ULL;
  t->hash = (t->hash ^ 0xff) * 0x100000001b3ULL; /* field separator */
}

static int on_event(void *ud, const mx_sse_parse_event *ev) {
  transcript *t = ud;
  if (ev->datalen >= MAX_DATA || ev->idlen > MAX_LINE ||
      ev->typelen > MAX_LINE || ev->data[ev->datalen] != '\0')
    abort();
  mix(t, ev->type, ev->typelen);
  mix(t, ev->id, ev->idlen);
  mix(t, ev->data, ev->datalen);
  if (memchr(ev->id, '\0', ev->idlen))
    abort(); /* ids with NUL are ignored */
  t->events++;
  return 0;
}

static int on_retry(void *ud, uint64_t ms) {
  transcript *t = ud;
  mix(t, &ms, sizeof(ms));
  t->retries++;
  return 0;
}

static int on_comment(void *ud, const char *text, size_t len) {
  transcript *t = ud;
  if (len >= MAX_LINE)
    abort();
  mix(t, text, len);
  t->comments++;
  return 0;
}

static const mx_sse_parse_cbs cbs = {on_event, on_retry, on_comment};

static void check_caps(const mx_sse_parser *p) {
  if (p->line.len > MAX_LINE || p->line.cap > MAX_LINE ||
      p->data.cap > MAX_DATA || p->type.cap > MAX_LINE ||
      p->idbuf.cap > MAX_LINE || p->lastid.cap > MAX_LINE)
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *s = (const char *)data;
  transcript a = {0xcbf29ce484222325ULL, 0, 0, 0};
  transcript b = a;
  mx_sse_parser p;
  mx_sse_parse_init(&p, MAX_LINE, MAX_DATA, &cbs, &a);
  int ra = mx_sse_parse_feed(&p, s, size);
  check_caps(&p);
  size_t alen;
  const char *aid = mx_sse_parse_last_id(&p, &alen);
  char last[MAX_LINE];
  memcpy(last, aid, alen);

  mx_sse_parser q;
  mx_sse_parse_init(&q, MAX_LINE, MAX_DATA, &cbs, &b);
  int rb = 0;
  size_t off = 0, i = 0;
  while (off < size && rb == 0) {
    size_t step = 1 + (size ? data[i++ % size] % 17 : 0);
    if (step > size - off)
      step = size - off;
    rb = mx_sse_parse_feed(&q, s + off, step);
    check_caps(&q);
    off += step;
  }
  size_t blen;
  const char *bid = mx_sse_parse_last_id(&q, &blen);
  if (ra != rb || a.hash != b.hash || a.events != b.events ||
      a.retries != b.retries || a.comments != b.comments ||
      (ra == 0 && (alen != blen || memcmp(last, bid, alen))))
    abort();
  mx_sse_parse_free(&p);
  mx_sse_parse_free(&q);
  return 0;
}
