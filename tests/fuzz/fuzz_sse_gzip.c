/* Accept-Encoding values (a peer's bytes) and the stream compressor
 * (h2/sse_gzip.c).
 *
 * Negotiation: scanning the whole value must agree with scanning each
 * comma-separated element on its own (elements are independent), and
 * the q-values stay in [-1, 1000].
 *
 * Compression: the input, cut into frames at bytes chosen by the input,
 * goes through one context with the smallest window (so matches span
 * frames and the window slides); each output chunk, inflated on arrival,
 * must give back exactly its frame; the trailer must end the stream. */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "common/chunk.h"
#include "h2/sse_gzip.h"
#include "tests/fuzz/fuzz.h"

static void negotiation(const char *v, size_t n) {
  mx_sse_accept whole, parts;
  mx_sse_accept_init(&whole);
  mx_sse_accept_init(&parts);
  mx_sse_accept_scan(&whole, v, n);
  const char *p = v, *end = v + n;
  while (p <= end) {
    const char *c = memchr(p, ',', (size_t)(end - p));
    const char *e = c ? c : end;
    mx_sse_accept_scan(&parts, p, (size_t)(e - p));
    p = e + 1;
  }
  if (whole.gzip != parts.gzip || whole.star != parts.star)
    abort();
  if (whole.gzip < -1 || whole.gzip > 1000 || whole.star < -1 ||
      whole.star > 1000)
    abort();
  (void)mx_sse_accept_gzip(&whole);
}

static void compression(const uint8_t *data, size_t size) {
  mx_sse_gzip_params p = {.level = 6, .window_bits = 9, .mem_level = 1};
  mx_sse_gzip *z = NULL;
  if (mx_sse_gzip_new(&p, &z))
    abort();
  z_stream in;
  memset(&in, 0, sizeof(in));
  if (inflateInit2(&in, 16 + 15) != Z_OK)
    abort();
  static unsigned char out[1 << 20];
  size_t start = 0;
  for (size_t i = 0; i <= size; i++) {
    bool last = i == size;
    if (!last && data[i] != '\n')
      continue;
    size_t flen = last ? size - start : i + 1 - start;
    mx_chunk *c = NULL;
    int rv = last ? mx_sse_gzip_finish(z, &c)
                  : mx_sse_gzip_chunk(z, data + start, flen, &c);
    if (rv)
      abort();
    in.next_in = (Bytef *)c->data;
    in.avail_in = (uInt)c->len;
    in.next_out = out;
    in.avail_out = sizeof(out);
    int zr = inflate(&in, Z_SYNC_FLUSH);
    size_t got = sizeof(out) - in.avail_out;
    if (in.avail_in != 0 || (last ? zr != Z_STREAM_END : zr != Z_OK))
      abort();
    /* The finish carries no data (the tail after the last LF is not
     * sent: the daemon never finishes with data). */
    if (got != (last ? 0 : flen) ||
        (!last && memcmp(out, data + start, flen)))
      abort();
    mx_chunk_unref(c);
    start = i + 1;
  }
  inflateEnd(&in);
  mx_sse_gzip_free(z);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size == 0)
    return 0;
  if (data[0] & 1)
    negotiation((const char *)data + 1, size - 1);
  else
    compression(data + 1, size - 1);
  return 0;
}
