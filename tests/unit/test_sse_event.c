#include <stdlib.h>
#include <string.h>

#include "common/chunk.h"
#include "common/error.h"
#include "h2/sse_event.h"
#include "tests/unit/tap.h"

#define S(lit) (lit), (sizeof(lit) - 1)

/* Encodes and compares with the expected bytes. */
static void expect(const char *id, const char *event, const char *data,
                   size_t len, const char *want, size_t wantlen) {
  mx_chunk *c = NULL;
  int rv = mx_sse_event_encode(id, id ? strlen(id) : 0, event, data, len, &c);
  CHECK_INT(rv, 0);
  if (c) {
    CHECK_MEMEQ(c->data, c->len, want, wantlen);
    CHECK_INT(c->refs, 1);
    CHECK_INT(c->data[c->len], '\0');
  }
  mx_chunk_unref(c);
}

static void test_basic(void) {
  expect("s1_2_3", NULL, S("{\"next_batch\":\"s1_2_3\"}"),
         S("id: s1_2_3\ndata: {\"next_batch\":\"s1_2_3\"}\n\n"));
  expect(NULL, NULL, S("x"), S("data: x\n\n"));
  expect(NULL, "error", S("{}"), S("event: error\ndata: {}\n\n"));
  expect("7", "sync", S("a"), S("id: 7\nevent: sync\ndata: a\n\n"));
  /* An empty id is legal (it resets the client's last event id). */
  expect("", NULL, S("a"), S("id: \ndata: a\n\n"));
  /* Leading spaces survive: the receiver strips only the one we add. */
  expect(" x", NULL, S(" y"), S("id:  x\ndata:  y\n\n"));
}

static void test_empty_payload(void) {
  expect(NULL, NULL, S(""), S("data: \n\n"));
  expect("q", NULL, NULL, 0, S("id: q\ndata: \n\n"));
}

static void test_line_breaks(void) {
  expect(NULL, NULL, S("a\nb"), S("data: a\ndata: b\n\n"));
  expect(NULL, NULL, S("a\r\nb"), S("data: a\ndata: b\n\n"));
  /* A lone CR ends a line for every SSE receiver. */
  expect(NULL, NULL, S("a\rb"), S("data: a\ndata: b\n\n"));
  expect(NULL, NULL, S("a\r\rb"), S("data: a\ndata: \ndata: b\n\n"));
  expect(NULL, NULL, S("a\n\rb"), S("data: a\ndata: \ndata: b\n\n"));
  expect(NULL, NULL, S("a\r\r\nb"), S("data: a\ndata: \ndata: b\n\n"));
  expect(NULL, NULL, S("\n"), S("data: \ndata: \n\n"));
  expect(NULL, NULL, S("\r"), S("data: \ndata: \n\n"));
  expect(NULL, NULL, S("\r\n"), S("data: \ndata: \n\n"));
  expect(NULL, NULL, S("x\r"), S("data: x\ndata: \n\n"));
  expect(NULL, NULL, S("{\"a\":\n1}\r\n"),
         S("data: {\"a\":\ndata: 1}\ndata: \n\n"));
  /* Bytes other than CR and LF pass through, NUL included. */
  expect(NULL, NULL, S("a\0b:\xc3\xa9"), S("data: a\0b:\xc3\xa9\n\n"));
}

static void test_rejects_injection(void) {
  mx_chunk *c = (mx_chunk *)1;
  CHECK_INT(mx_sse_event_encode(S("s1\nevent: x"), NULL, S("d"), &c),
            MX_ERR_INVALID);
  CHECK(c == NULL);
  CHECK_INT(mx_sse_event_encode(S("s1\r"), NULL, S("d"), &c), MX_ERR_INVALID);
  CHECK_INT(mx_sse_event_encode(S("s\0001"), NULL, S("d"), &c),
            MX_ERR_INVALID);
  CHECK_INT(mx_sse_event_encode(NULL, 0, "a\nb", S("d"), &c), MX_ERR_INVALID);
  CHECK_INT(mx_sse_event_encode(NULL, 0, "a\rb", S("d"), &c), MX_ERR_INVALID);
  CHECK(c == NULL);
}

static void test_large_payload(void) {
  size_t n = 3 * 1024 * 1024;
  char *big = malloc(n);
  memset(big, 'x', n);
  big[n / 2] = '\n';
  mx_chunk *c;
  CHECK_INT(mx_sse_event_encode(S("tok"), NULL, big, n, &c), 0);
  /* "id: tok\n", two "data: ...\n" lines without the break, "\n" */
  CHECK_INT(c->len, 8 + 2 * 7 + (n - 1) + 1);
  CHECK(memcmp(c->data + c->len - 3, "x\n\n", 3) == 0);
  mx_chunk_unref(c);
  free(big);
}

static void test_retry(void) {
  mx_chunk *c;
  CHECK_INT(mx_sse_retry_encode(3000, &c), 0);
  CHECK_MEMEQ(c->data, c->len, "retry: 3000\n\n", 13);
  mx_chunk_unref(c);
  CHECK_INT(mx_sse_retry_encode(0, &c), 0);
  CHECK_MEMEQ(c->data, c->len, "retry: 0\n\n", 10);
  mx_chunk_unref(c);
}

static void test_error_event(void) {
  mx_chunk *c;
  CHECK_INT(mx_sse_error_encode("M_UNKNOWN_TOKEN", "Bad \"token\"\n", &c), 0);
  const char want[] = "event: error\n"
                      "data: {\"errcode\":\"M_UNKNOWN_TOKEN\","
                      "\"error\":\"Bad \\\"token\\\"\\u000a\"}\n\n";
  CHECK_MEMEQ(c->data, c->len, want, sizeof(want) - 1);
  mx_chunk_unref(c);
  CHECK_INT(mx_sse_error_encode("M_UNKNOWN", NULL, &c), 0);
  const char want2[] =
      "event: error\ndata: {\"errcode\":\"M_UNKNOWN\",\"error\":\"\"}\n\n";
  CHECK_MEMEQ(c->data, c->len, want2, sizeof(want2) - 1);
  mx_chunk_unref(c);
  char *huge = malloc(20000);
  memset(huge, 'a', 19999);
  huge[19999] = '\0';
  c = (mx_chunk *)1;
  CHECK_INT(mx_sse_error_encode("M_UNKNOWN", huge, &c), MX_ERR_LIMIT);
  CHECK(c == NULL);
  free(huge);
}

static void test_heartbeat_shared(void) {
  mx_chunk *h = mx_sse_heartbeat();
  CHECK(h != NULL);
  CHECK(h == mx_sse_heartbeat());
  CHECK_MEMEQ(h->data, h->len, ": \n\n", 4);
  CHECK_MEMEQ(h->data, h->len, MX_SSE_HEARTBEAT, MX_SSE_HEARTBEAT_LEN);
  mx_chunkq a, b;
  mx_chunkq_init(&a);
  mx_chunkq_init(&b);
  CHECK_INT(mx_chunkq_push(&a, h), 0);
  CHECK_INT(mx_chunkq_push(&b, h), 0);
  CHECK_INT(h->refs, 3);
  /* Queued copies outlive the module's own reference. */
  mx_sse_event_shutdown();
  CHECK_INT(h->refs, 2);
  char out[8] = {0};
  CHECK_INT(mx_chunkq_read(&a, out, sizeof(out)), 4);
  CHECK_STREQ(out, ": \n\n");
  mx_chunkq_clear(&b);
  /* A fresh singleton after shutdown. */
  mx_chunk *h2 = mx_sse_heartbeat();
  CHECK(h2 != NULL && h2->refs == 1);
  mx_sse_event_shutdown();
}

int main(void) {
  TAP_RUN(TAP_CASE(test_basic), TAP_CASE(test_empty_payload),
          TAP_CASE(test_line_breaks), TAP_CASE(test_rejects_injection),
          TAP_CASE(test_large_payload), TAP_CASE(test_retry),
          TAP_CASE(test_error_event), TAP_CASE(test_heartbeat_shared));
}
