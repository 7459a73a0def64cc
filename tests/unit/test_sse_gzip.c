#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "common/chunk.h"
#include "common/error.h"
#include "h2/sse_gzip.h"
#include "tests/unit/tap.h"

/* --- Accept-Encoding ------------------------------------------------ */

static bool accepts(const char *v) {
  mx_sse_accept a;
  mx_sse_accept_init(&a);
  mx_sse_accept_scan(&a, v, strlen(v));
  return mx_sse_accept_gzip(&a);
}

static void test_accept_plain(void) {
  CHECK(accepts("gzip"));
  CHECK(accepts("GZip"));
  CHECK(accepts("x-gzip"));
  CHECK(accepts("gzip, deflate, br, zstd")); /* Chromium */
  CHECK(accepts("deflate, gzip"));
  CHECK(accepts(" ,, gzip ,"));
  CHECK(!accepts(""));
  CHECK(!accepts("identity"));
  CHECK(!accepts("deflate, br"));
  CHECK(!accepts("gzipx"));
  CHECK(!accepts("xgzip"));
  CHECK(!accepts("gz"));
}

static void test_accept_qvalues(void) {
  CHECK(accepts("gzip;q=1"));
  CHECK(accepts("gzip;q=1.000"));
  CHECK(accepts("gzip ; q=0.5"));
  CHECK(accepts("gzip;Q=0.001"));
  CHECK(accepts("gzip;q=0.5 , br;q=1"));
  CHECK(!accepts("gzip;q=0"));
  CHECK(!accepts("gzip;q=0.0"));
  CHECK(!accepts("gzip;q=0.000"));
  CHECK(!accepts("gzip; q=0 , deflate"));
  /* A malformed weight never enables gzip. */
  CHECK(!accepts("gzip;q=1.5"));
  CHECK(!accepts("gzip;q=1.001"));
  CHECK(!accepts("gzip;q=2"));
  CHECK(!accepts("gzip;q=0.0001"));
  CHECK(!accepts("gzip;q="));
  CHECK(!accepts("gzip;q=abc"));
  CHECK(!accepts("gzip;q=.5"));
  /* Other parameters are ignored. */
  CHECK(accepts("gzip;level=1"));
  CHECK(!accepts("gzip;level=1;q=0"));
}

static void test_accept_star(void) {
  CHECK(accepts("*"));
  CHECK(accepts("br, *;q=0.1"));
  CHECK(!accepts("*;q=0"));
  /* A named coding wins over the wildcard, either way. */
  CHECK(!accepts("gzip;q=0, *"));
  CHECK(!accepts("*, gzip;q=0"));
  CHECK(accepts("gzip, *;q=0"));
  CHECK(!accepts("identity;q=0"));
  CHECK(!accepts("identity, *;q=0"));
}

static void test_accept_several_fields(void) {
  mx_sse_accept a;
  mx_sse_accept_init(&a);
  mx_sse_accept_scan(&a, "br", 2);
  CHECK(!mx_sse_accept_gzip(&a));
  mx_sse_accept_scan(&a, "gzip;q=0.2", 10);
  CHECK(mx_sse_accept_gzip(&a));
  /* A length, not a NUL, ends the value. */
  mx_sse_accept_init(&a);
  mx_sse_accept_scan(&a, "gzip;q=0", 4);
  CHECK(mx_sse_accept_gzip(&a));
}

/* --- compression ---------------------------------------------------- */

typedef struct reader {
  z_stream zs;
  char out[1 << 20];
  size_t used;
} reader;

static void reader_init(reader *r) {
  memset(&r->zs, 0, sizeof(r->zs));
  r->used = 0;
  CHECK_INT(inflateInit2(&r->zs, 15 + 16), Z_OK);
}

/* Feeds a chunk; returns inflate's last result. */
static int reader_feed(reader *r, const mx_chunk *c) {
  r->zs.next_in = (Bytef *)c->data;
  r->zs.avail_in = (uInt)c->len;
  int rv;
  do {
    r->zs.next_out = (Bytef *)r->out + r->used;
    r->zs.avail_out = (uInt)(sizeof(r->out) - r->used);
    rv = inflate(&r->zs, Z_SYNC_FLUSH);
    r->used = sizeof(r->out) - r->zs.avail_out;
  } while (rv == Z_OK && r->zs.avail_in > 0);
  return rv;
}

static mx_sse_gzip *new_ctx(int wb, int ml) {
  mx_sse_gzip_params p = {.level = 6, .window_bits = wb, .mem_level = ml};
  mx_sse_gzip *z = NULL;
  CHECK_INT(mx_sse_gzip_new(&p, &z), 0);
  return z;
}

/* Each chunk decodes, on its own arrival, to exactly the bytes given so
 * far: an event (or a heartbeat) is never held back in the context. */
static void test_each_event_decodes_at_once(void) {
  static const char *const frames[] = {
      "retry: 2345\n\n",
      "id: s1_2\ndata: {\"next_batch\":\"s1_2\",\"rooms\":{}}\n\n",
      ": \n\n",
      "id: s1_3\ndata: {\"next_batch\":\"s1_3\",\"rooms\":{\"join\":{}}}\n\n",
      ": \n\n",
      ": \n\n",
  };
  mx_sse_gzip *z = new_ctx(15, 8);
  reader r;
  reader_init(&r);
  char want[4096];
  size_t wantlen = 0;
  for (size_t i = 0; z && i < sizeof(frames) / sizeof(frames[0]); i++) {
    mx_chunk *c = NULL;
    size_t n = strlen(frames[i]);
    CHECK_INT(mx_sse_gzip_chunk(z, frames[i], n, &c), 0);
    if (!c)
      break;
    CHECK_INT(c->refs, 1);
    /* A sync flush ends in an empty stored block: 00 00 ff ff. */
    CHECK(c->len >= 4 && !memcmp(c->data + c->len - 4, "\0\0\xff\xff", 4));
    CHECK_INT(reader_feed(&r, c), Z_OK);
    memcpy(want + wantlen, frames[i], n);
    wantlen += n;
    CHECK_MEMEQ(r.out, r.used, want, wantlen);
    mx_chunk_unref(c);
  }
  mx_chunk *end = NULL;
  CHECK_INT(mx_sse_gzip_finish(z, &end), 0);
  if (end)
    CHECK_INT(reader_feed(&r, end), Z_STREAM_END);
  CHECK_MEMEQ(r.out, r.used, want, wantlen);
  mx_chunk_unref(end);
  /* Finished: nothing more may be written. */
  mx_chunk *c = (mx_chunk *)1;
  CHECK_INT(mx_sse_gzip_chunk(z, "x", 1, &c), MX_ERR_INVALID);
  CHECK(c == NULL);
  inflateEnd(&r.zs);
  mx_sse_gzip_free(z);
}

/* The context carries across events: a batch like the last one costs a
 * fraction of the first. A heartbeat is a few bytes. */
static void test_context_is_kept(void) {
  char ev[2048];
  int n = snprintf(ev, sizeof(ev), "id: s9\ndata: {\"rooms\":{\"join\":{");
  for (int i = 0; i < 20; i++)
    n += snprintf(ev + n, sizeof(ev) - (size_t)n,
                  "\"!room%d:example.org\":{\"timeline\":{\"events\":[]}},",
                  i * 7919);
  n += snprintf(ev + n, sizeof(ev) - (size_t)n, "}}}\n\n");
  mx_sse_gzip *z = new_ctx(15, 8);
  mx_chunk *a = NULL, *b = NULL, *hb = NULL;
  CHECK_INT(mx_sse_gzip_chunk(z, ev, (size_t)n, &a), 0);
  CHECK_INT(mx_sse_gzip_chunk(z, ev, (size_t)n, &b), 0);
  CHECK_INT(mx_sse_gzip_chunk(z, ": \n\n", 4, &hb), 0);
  if (a && b && hb) {
    CHECK(b->len * 5 < a->len);
    CHECK(hb->len <= 12);
  }
  mx_chunk_unref(a);
  mx_chunk_unref(b);
  mx_chunk_unref(hb);
  mx_sse_gzip_free(z);
}

/* Incompressible and large inputs come out whole (the output chunk is
 * sized from deflateBound, grown or trimmed as needed). */
static void test_sizes(void) {
  static char buf[600 * 1024];
  unsigned x = 12345;
  for (size_t i = 0; i < sizeof(buf); i++) {
    x = x * 1103515245u + 12345u;
    buf[i] = (char)(x >> 16);
  }
  static const size_t sizes[] = {1, 100, 4096, 70000, sizeof(buf)};
  for (int text = 0; text < 2; text++) {
    if (text)
      for (size_t i = 0; i < sizeof(buf); i++)
        buf[i] = "abcab\n"[i % 6];
    mx_sse_gzip *z = new_ctx(9, 1);
    static reader r;
    reader_init(&r);
    size_t total = 0;
    for (size_t i = 0; z && i < sizeof(sizes) / sizeof(sizes[0]); i++) {
      mx_chunk *c = NULL;
      CHECK_INT(mx_sse_gzip_chunk(z, buf, sizes[i], &c), 0);
      if (!c)
        break;
      /* Trimmed: text compresses; a chunk never holds much slack. */
      if (text && sizes[i] > 4096)
        CHECK(c->len < sizes[i] / 10);
      CHECK_INT(reader_feed(&r, c), Z_OK);
      CHECK(r.used == total + sizes[i] &&
            !memcmp(r.out + total, buf, sizes[i]));
      total = r.used;
      mx_chunk_unref(c);
    }
    inflateEnd(&r.zs);
    mx_sse_gzip_free(z);
  }
}

/* What a context costs: zlib's documented formula for deflate,
 * 2^(windowBits+2) + 2^(memLevel+9), plus its state (under 8 KB). */
static void test_memory(void) {
  CHECK_INT(mx_sse_gzip_total_memory(), 0);
  for (int wb = 9; wb <= 15; wb++)
    for (int ml = 1; ml <= 9; ml++) {
      mx_sse_gzip *z = new_ctx(wb, ml);
      if (!z)
        continue;
      size_t formula = ((size_t)1 << (wb + 2)) + ((size_t)1 << (ml + 9));
      size_t m = mx_sse_gzip_memory(z);
      CHECK(m >= formula && m < formula + 8192);
      CHECK(mx_sse_gzip_total_memory() > m);
      mx_sse_gzip_free(z);
      CHECK_INT(mx_sse_gzip_total_memory(), 0);
    }
}

static void test_invalid_params(void) {
  mx_sse_gzip_params bad[] = {{0, 15, 8}, {10, 15, 8}, {6, 8, 8},
                              {6, 16, 8}, {6, 15, 0}, {6, 15, 10}};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    mx_sse_gzip *z = (mx_sse_gzip *)1;
    CHECK_INT(mx_sse_gzip_new(&bad[i], &z), MX_ERR_INVALID);
    CHECK(z == NULL);
  }
  mx_sse_gzip_free(NULL);
}

int main(void) {
  TAP_RUN(TAP_CASE(test_accept_plain),
          TAP_CASE(test_accept_qvalues),
          TAP_CASE(test_accept_star),
          TAP_CASE(test_accept_several_fields),
          TAP_CASE(test_each_event_decodes_at_once),
          TAP_CASE(test_context_is_kept),
          TAP_CASE(test_sizes),
          TAP_CASE(test_memory),
          TAP_CASE(test_invalid_params));
}
