#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/chunk.h"
#include "common/error.h"
#include "h2/sse_event.h"
#include "h2/sse_parse.h"
#include "tests/unit/tap.h"

#define S(lit) (lit), (sizeof(lit) - 1)

/* Everything the parser reports, as one text transcript:
 *   E<type>|<id>|<data>\n  R<ms>\n  C<text>\n */
typedef struct transcript {
  mx_buf t;
  int events;
  int stop_after; /* stop (return 42) after this many events; 0: never */
} log_t;

static int on_event(void *ud, const mx_sse_parse_event *ev) {
  log_t *l = ud;
  mx_buf_append(&l->t, "E", 1);
  mx_buf_append(&l->t, ev->type, ev->typelen);
  mx_buf_append(&l->t, "|", 1);
  mx_buf_append(&l->t, ev->id, ev->idlen);
  mx_buf_append(&l->t, "|", 1);
  mx_buf_append(&l->t, ev->data, ev->datalen);
  mx_buf_append(&l->t, "\n", 1);
  CHECK_INT(ev->data[ev->datalen], '\0');
  l->events++;
  return l->stop_after && l->events == l->stop_after ? 42 : 0;
}

static int on_retry(void *ud, uint64_t ms) {
  return mx_buf_appendf(&((log_t *)ud)->t, "R%llu\n", (unsigned long long)ms);
}

static int on_comment(void *ud, const char *text, size_t len) {
  log_t *l = ud;
  mx_buf_append(&l->t, "C", 1);
  mx_buf_append(&l->t, text, len);
  return mx_buf_append(&l->t, "\n", 1);
}

static const mx_sse_parse_cbs cbs = {on_event, on_retry, on_comment};

/* Parses in pieces of `step` bytes (0: all at once); returns the final
 * feed result and leaves the transcript in l. */
static int parse(log_t *l, const char *s, size_t n, size_t step,
                 size_t max_line, size_t max_data) {
  mx_buf_init(&l->t, 1 << 24);
  l->events = 0;
  mx_sse_parser p;
  mx_sse_parse_init(&p, max_line, max_data, &cbs, l);
  int rv = 0;
  if (step == 0)
    rv = mx_sse_parse_feed(&p, s, n);
  for (size_t off = 0; step && off < n && rv == 0; off += step)
    rv = mx_sse_parse_feed(&p, s + off, n - off < step ? n - off : step);
  mx_sse_parse_free(&p);
  return rv;
}

/* Checks the transcript for every way of splitting s in two, and
 * byte by byte. */
static void expect(const char *s, size_t n, const char *want) {
  log_t l = {.stop_after = 0};
  for (size_t cut = 0; cut <= n; cut++) {
    mx_buf_init(&l.t, 1 << 20);
    l.events = 0;
    mx_sse_parser p;
    mx_sse_parse_init(&p, 1024, 4096, &cbs, &l);
    CHECK_INT(mx_sse_parse_feed(&p, s, cut), 0);
    CHECK_INT(mx_sse_parse_feed(&p, s + cut, n - cut), 0);
    mx_sse_parse_free(&p);
    if (!l.t.data || strcmp(l.t.data, want) != 0) {
      printf("# cut at %zu: got \"%s\"\n", cut, l.t.data ? l.t.data : "");
      CHECK_STREQ(l.t.data ? l.t.data : "", want);
      mx_buf_free(&l.t);
      return;
    }
    mx_buf_free(&l.t);
  }
  CHECK_INT(parse(&l, s, n, 1, 1024, 4096), 0);
  CHECK_STREQ(l.t.data ? l.t.data : "", want);
  mx_buf_free(&l.t);
}

static void test_basic_fields(void) {
  expect(S("data: hello\n\n"), "Emessage||hello\n");
  expect(S("id: 1\nevent: sync\ndata: a\ndata: b\n\n"), "Esync|1|a\nb\n");
  /* No space after the colon, or two spaces (one is kept). */
  expect(S("data:x\n\ndata:  y\n\n"), "Emessage||x\nEmessage|| y\n");
  /* A field name alone is an empty value: "data" adds an empty line. */
  expect(S("data\ndata\n\n"), "Emessage||\n\n");
  expect(S("data\n\n"), "Emessage||\n");
  /* Values may contain colons. */
  expect(S("data: a:b: c\n\n"), "Emessage||a:b: c\n");
  /* Unknown fields and fields with other cases are ignored. */
  expect(S("foo: bar\nData: x\ndata: y\n\n"), "Emessage||y\n");
}

static void test_id_rules(void) {
  /* The id persists across events until changed; an empty id resets. */
  expect(S("id: a\ndata: 1\n\ndata: 2\n\nid\ndata: 3\n\n"),
         "Emessage|a|1\nEmessage|a|2\nEmessage||3\n");
  /* An id containing NUL is ignored entirely. */
  expect(S("id: a\ndata: 1\n\nid: b\0c\ndata: 2\n\n"),
         "Emessage|a|1\nEmessage|a|2\n");
  /* An id-only block dispatches nothing but still sets the id. */
  expect(S("id: z\n\ndata: 1\n\n"), "Emessage|z|1\n");
}

static void test_last_id_string(void) {
  log_t l = {.stop_after = 0};
  mx_buf_init(&l.t, 1 << 20);
  mx_sse_parser p;
  mx_sse_parse_init(&p, 1024, 4096, &cbs, &l);
  size_t n;
  CHECK_STREQ(mx_sse_parse_last_id(&p, &n), "");
  CHECK_INT(mx_sse_parse_feed(&p, S("id: s1\ndata: x\n\nid: s2\ndata: y\n")),
            0);
  /* s2's event is not complete: a reconnect must resume from s1. */
  const char *id = mx_sse_parse_last_id(&p, &n);
  CHECK_MEMEQ(id, n, "s1", 2);
  CHECK_INT(mx_sse_parse_feed(&p, S("\n")), 0);
  id = mx_sse_parse_last_id(&p, &n);
  CHECK_MEMEQ(id, n, "s2", 2);
  mx_sse_parse_free(&p);
  mx_buf_free(&l.t);
}

static void test_retry_and_comments(void) {
  expect(S(": \n\n: hi\nretry: 3000\nretry: 12a\nretry:\nretry: -1\n"
           "retry: 99999999999999999999999\n"),
         "C \nC hi\nR3000\nR18446744073709551615\n");
  /* A heartbeat between events changes nothing. */
  expect(S("data: a\n: \ndata: b\n\n: \n\n"), "C \nEmessage||a\nb\nC \n");
}

static void test_line_endings(void) {
  expect(S("data: a\rdata: b\r\r"), "Emessage||a\nb\n");
  expect(S("data: a\r\ndata: b\r\n\r\n"), "Emessage||a\nb\n");
  expect(S("data: a\ndata: b\r\n\r"), "Emessage||a\nb\n");
  /* CR CR is two line ends (a blank line), CR LF only one. */
  expect(S("data: a\r\rdata: b\r\n\r\n"), "Emessage||a\nEmessage||b\n");
  expect(S("data: a\n\r\ndata: b\n\r"), "Emessage||a\nEmessage||b\n");
}

static void test_bom(void) {
  expect(S("\xEF\xBB\xBF" "data: a\n\n"), "Emessage||a\n");
  /* Only one, only at the start: a second BOM is part of the field name,
   * making it an unknown field. */
  expect(S("\xEF\xBB\xBF\xEF\xBB\xBF" "data: a\n\ndata: b\n\n"),
         "Emessage||b\n");
  /* A partial BOM is ordinary input. */
  expect(S("\xEF\xBB" "data: a\n\ndata: b\n\n"), "Emessage||b\n");
  expect(S("\xEF\n" "data: b\n\n"), "Emessage||b\n");
  expect(S("\xEF\xBB\xBF"), "");
}

static void test_dispatch_rules(void) {
  /* No data: nothing dispatched, and the event type is reset. */
  expect(S("event: x\n\ndata: a\n\n"), "Emessage||a\n");
  /* An unterminated event at the end is never dispatched. */
  expect(S("data: a\n\ndata: b\n"), "Emessage||a\n");
  expect(S("data: a\n\ndata: b"), "Emessage||a\n");
  /* event: with an empty value means "message". */
  expect(S("event:\ndata: a\n\n"), "Emessage||a\n");
}

static void test_line_cap(void) {
  log_t l = {.stop_after = 0};
  char line[64];
  memset(line, 'x', sizeof(line));
  memcpy(line, "data: ", 6);
  /* A 32-byte line fits a 32-byte cap, a 33-byte one does not, however
   * it is split. */
  char s[80];
  memcpy(s, line, 32);
  memcpy(s + 32, "\n\n", 2);
  for (size_t step = 0; step <= 5; step++) {
    CHECK_INT(parse(&l, s, 34, step, 32, 4096), 0);
    CHECK_INT(l.events, 1);
    mx_buf_free(&l.t);
  }
  memcpy(s, line, 33);
  memcpy(s + 33, "\n\n", 2);
  for (size_t step = 0; step <= 5; step++) {
    CHECK_INT(parse(&l, s, 35, step, 32, 4096), MX_ERR_LIMIT);
    CHECK_INT(l.events, 0);
    mx_buf_free(&l.t);
  }
  /* No terminator at all: caught while buffering. */
  CHECK_INT(parse(&l, line, 64, 7, 32, 4096), MX_ERR_LIMIT);
  mx_buf_free(&l.t);
  /* Errors are sticky. */
  mx_sse_parser p;
  mx_buf_init(&l.t, 1024);
  mx_sse_parse_init(&p, 8, 4096, &cbs, &l);
  CHECK_INT(mx_sse_parse_feed(&p, S("data: 123456789")), MX_ERR_LIMIT);
  CHECK_INT(mx_sse_parse_feed(&p, S("\n\ndata: a\n\n")), MX_ERR_LIMIT);
  CHECK(p.line.cap <= 8 && p.data.cap <= 4096);
  mx_sse_parse_free(&p);
  mx_buf_free(&l.t);
}

static void test_data_cap(void) {
  log_t l = {.stop_after = 0};
  /* 3 lines of 4 bytes: 15 bytes with the LFs. */
  const char s[] = "data: abcd\ndata: efgh\ndata: ijkl\n\n";
  CHECK_INT(parse(&l, S(s), 0, 64, 15), 0);
  CHECK_INT(l.events, 1);
  mx_buf_free(&l.t);
  CHECK_INT(parse(&l, S(s), 0, 64, 14), MX_ERR_LIMIT);
  CHECK_INT(l.events, 0);
  mx_buf_free(&l.t);
}

static void test_callback_stop(void) {
  log_t l = {.stop_after = 1};
  mx_buf_init(&l.t, 1024);
  mx_sse_parser p;
  mx_sse_parse_init(&p, 64, 64, &cbs, &l);
  CHECK_INT(mx_sse_parse_feed(&p, S("data: a\n\ndata: b\n\n")), 42);
  CHECK_INT(l.events, 1);
  CHECK_INT(mx_sse_parse_feed(&p, S("data: c\n\n")), 42);
  CHECK_INT(l.events, 1);
  mx_sse_parse_free(&p);
  mx_buf_free(&l.t);
}

/* --- round trip: parse(encode(x)) == x with line breaks as LF -------- */

static uint64_t rng = 0x2545F4914F6CDD1DULL;
static unsigned rnd(unsigned n) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (unsigned)(rng % n);
}

/* Random payload from pieces that stress the framing. */
static size_t random_payload(char *out, size_t cap) {
  static const char *const pieces[] = {
      "\r", "\n", "\r\n", "\n\r", "a", "{\"k\":\"v\"}", " ", ":", "data: ",
      "\xc3\xa9", "\xf0\x9f\x98\x80", "\xe2\x80\xa8", "\xEF\xBB\xBF", "id: x",
      "\0", "\t", "event: e",
  };
  size_t n = 0, k = rnd(24);
  for (size_t i = 0; i < k; i++) {
    size_t j = rnd(sizeof(pieces) / sizeof(pieces[0]));
    size_t l = pieces[j][0] ? strlen(pieces[j]) : 1;
    if (n + l > cap)
      break;
    memcpy(out + n, pieces[j], l);
    n += l;
  }
  return n;
}

/* What an SSE receiver gives back: CRLF and CR become LF. */
static size_t normalise(const char *in, size_t n, char *out) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    if (in[i] == '\r') {
      out[o++] = '\n';
      if (i + 1 < n && in[i + 1] == '\n')
        i++;
    } else {
      out[o++] = in[i];
    }
  }
  return o;
}

typedef struct rt {
  char want[32][256];
  size_t wantlen[32];
  char id[32][16];
  const char *type[32];
  int n, got, bad;
} rt;

static int rt_event(void *ud, const mx_sse_parse_event *ev) {
  rt *r = ud;
  int i = r->got++;
  if (i >= r->n || ev->datalen != r->wantlen[i] ||
      memcmp(ev->data, r->want[i], ev->datalen) != 0 ||
      ev->idlen != strlen(r->id[i]) || memcmp(ev->id, r->id[i], ev->idlen) ||
      ev->typelen != strlen(r->type[i]) ||
      memcmp(ev->type, r->type[i], ev->typelen)) {
    r->bad++;
    printf("# event %d differs (%zu bytes)\n", i, ev->datalen);
  }
  return 0;
}

static void test_roundtrip_property(void) {
  static const mx_sse_parse_cbs rcbs = {rt_event, NULL, NULL};
  int total = 0;
  for (int iter = 0; iter < 2000; iter++) {
    rt r;
    memset(&r, 0, sizeof(r));
    mx_chunkq stream;
    mx_chunkq_init(&stream);
    r.n = 1 + (int)rnd(31);
    for (int i = 0; i < r.n; i++) {
      char payload[200];
      size_t len = random_payload(payload, sizeof(payload));
      r.wantlen[i] = normalise(payload, len, r.want[i]);
      snprintf(r.id[i], sizeof(r.id[i]), "s%d_%u", i, rnd(100000));
      const char *type = rnd(4) == 0 ? "error" : NULL;
      r.type[i] = type ? type : "message";
      mx_chunk *c;
      CHECK_INT(mx_sse_event_encode(r.id[i], strlen(r.id[i]), type, payload,
                                    len, &c),
                0);
      mx_chunkq_push(&stream, c);
      mx_chunk_unref(c);
      /* Heartbeats and retries between events must not disturb them. */
      if (rnd(3) == 0)
        mx_chunkq_push(&stream, mx_sse_heartbeat());
      if (rnd(8) == 0) {
        CHECK_INT(mx_sse_retry_encode(rnd(10000), &c), 0);
        mx_chunkq_push(&stream, c);
        mx_chunk_unref(c);
      }
    }
    mx_sse_parser p;
    mx_sse_parse_init(&p, 4096, 4096, &rcbs, &r);
    /* Feed in random pieces, splitting CRLFs and BOMs anywhere. */
    char piece[64];
    while (stream.bytes) {
      size_t k = mx_chunkq_read(&stream, piece, 1 + rnd(sizeof(piece)));
      CHECK_INT(mx_sse_parse_feed(&p, piece, k), 0);
    }
    mx_sse_parse_free(&p);
    CHECK_INT(r.got, r.n);
    CHECK_INT(r.bad, 0);
    total += r.n;
    if (r.bad || r.got != r.n)
      break;
  }
  printf("# %d events round-tripped\n", total);
  mx_sse_event_shutdown();
}

int main(void) {
  TAP_RUN(TAP_CASE(test_basic_fields), TAP_CASE(test_id_rules),
          TAP_CASE(test_last_id_string), TAP_CASE(test_retry_and_comments),
          TAP_CASE(test_line_endings), TAP_CASE(test_bom),
          TAP_CASE(test_dispatch_rules), TAP_CASE(test_line_cap),
          TAP_CASE(test_data_cap), TAP_CASE(test_callback_stop),
          TAP_CASE(test_roundtrip_property));
}
