#include "h2/sse_gzip.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <zlib.h>

#include "common/error.h"

struct mx_sse_gzip {
  z_stream zs;
  size_t mem; /* bytes zlib allocated for this context */
  bool dead;  /* finished, or zlib failed */
};

static size_t total_mem; /* all contexts, structs included (one loop) */

/* zlib's allocations, counted. A header before each block records its
 * size; 16 bytes keep the block aligned for any type. */
#define HDR 16

static voidpf count_alloc(voidpf opaque, uInt items, uInt size) {
  mx_sse_gzip *z = opaque;
  if (size && items > (SIZE_MAX - HDR) / size)
    return Z_NULL;
  size_t n = (size_t)items * size;
  unsigned char *p = malloc(HDR + n);
  if (!p)
    return Z_NULL;
  memcpy(p, &n, sizeof(n));
  z->mem += n;
  total_mem += n;
  return p + HDR;
}

static void count_free(voidpf opaque, voidpf addr) {
  mx_sse_gzip *z = opaque;
  if (!addr)
    return;
  unsigned char *p = (unsigned char *)addr - HDR;
  size_t n;
  memcpy(&n, p, sizeof(n));
  z->mem -= n;
  total_mem -= n;
  free(p);
}

int mx_sse_gzip_new(const mx_sse_gzip_params *p, mx_sse_gzip **out) {
  *out = NULL;
  if (p->level < 1 || p->level > 9 || p->window_bits < 9 ||
      p->window_bits > 15 || p->mem_level < 1 || p->mem_level > 9)
    return MX_ERR_INVALID;
  mx_sse_gzip *z = calloc(1, sizeof(*z));
  if (!z)
    return MX_ERR_NOMEM;
  z->zs.zalloc = count_alloc;
  z->zs.zfree = count_free;
  z->zs.opaque = z;
  /* +16: a gzip wrapper (header, CRC-32 and length trailer). */
  int rv = deflateInit2(&z->zs, p->level, Z_DEFLATED, p->window_bits + 16,
                        p->mem_level, Z_DEFAULT_STRATEGY);
  if (rv != Z_OK) {
    free(z);
    return rv == Z_MEM_ERROR ? MX_ERR_NOMEM : MX_ERR_INVALID;
  }
  total_mem += sizeof(*z);
  *out = z;
  return 0;
}

/* Runs deflate over data with flush until the output is complete, into
 * a chunk sized from deflateBound and grown if a flush marker overflows
 * it. A chunk much larger than its contents is copied to fit, so a queue
 * never holds the bound of a large frame for its compressed bytes. */
static int run(mx_sse_gzip *z, const void *data, size_t len, int flush,
               mx_chunk **out) {
  *out = NULL;
  if (z->dead)
    return MX_ERR_INVALID;
  /* The bound covers a Z_FINISH of this input; sync-flush markers (5
   * bytes each, two at most here), the gzip header and trailer and the
   * empty-block case get a margin. */
  size_t cap = (size_t)deflateBound(&z->zs, (uLong)len) + 64;
  mx_chunk *c = mx_chunk_alloc(cap);
  if (!c)
    return MX_ERR_NOMEM;
  size_t used = 0;
  z->zs.next_in = (Bytef *)(uintptr_t)data;
  z->zs.avail_in = (uInt)len;
  for (;;) {
    z->zs.next_out = (Bytef *)c->data + used;
    z->zs.avail_out = (uInt)(cap - used);
    int rv = deflate(&z->zs, flush);
    used = cap - z->zs.avail_out;
    if (rv == Z_STREAM_END)
      break;
    if (rv != Z_OK && rv != Z_BUF_ERROR) {
      mx_chunk_unref(c);
      z->dead = true;
      return MX_ERR_INVALID;
    }
    /* Room left after a flush: everything is out (Z_BUF_ERROR here only
     * says there was nothing to do). */
    if (z->zs.avail_out > 0) {
      if (flush != Z_FINISH)
        break;
      mx_chunk_unref(c); /* Z_FINISH stops only at Z_STREAM_END */
      z->dead = true;
      return MX_ERR_INVALID;
    }
    /* Output full: grow and go on. */
    mx_chunk *bigger = mx_chunk_alloc(cap * 2);
    if (!bigger) {
      mx_chunk_unref(c);
      z->dead = true; /* the stream lost bytes: it cannot go on */
      return MX_ERR_NOMEM;
    }
    memcpy(bigger->data, c->data, used);
    mx_chunk_unref(c);
    c = bigger;
    cap *= 2;
  }
  z->zs.next_in = NULL;
  z->zs.next_out = NULL;
  if (flush == Z_FINISH)
    z->dead = true;
  if (cap - used > 4096 && used < cap / 2) {
    mx_chunk *fit = mx_chunk_new(c->data, used);
    if (fit) {
      mx_chunk_unref(c);
      c = fit;
    }
  }
  c->len = used;
  c->data[used] = '\0';
  *out = c;
  return 0;
}

int mx_sse_gzip_chunk(mx_sse_gzip *z, const void *data, size_t len,
                      mx_chunk **out) {
  if (len > UINT32_MAX) {
    *out = NULL;
    return MX_ERR_LIMIT;
  }
  return run(z, data, len, Z_SYNC_FLUSH, out);
}

int mx_sse_gzip_finish(mx_sse_gzip *z, mx_chunk **out) {
  return run(z, NULL, 0, Z_FINISH, out);
}

size_t mx_sse_gzip_memory(const mx_sse_gzip *z) { return z->mem; }

size_t mx_sse_gzip_total_memory(void) { return total_mem; }

void mx_sse_gzip_free(mx_sse_gzip *z) {
  if (!z)
    return;
  deflateEnd(&z->zs);
  total_mem -= sizeof(*z);
  free(z);
}

/* --- Accept-Encoding ------------------------------------------------ */

void mx_sse_accept_init(mx_sse_accept *a) { a->gzip = a->star = -1; }

static bool ows(char c) { return c == ' ' || c == '\t'; }

/* qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] ), in
 * thousandths; -1 when malformed. */
static int qvalue(const char *s, size_t n) {
  if (n == 0 || (s[0] != '0' && s[0] != '1'))
    return -1;
  int q = (s[0] - '0') * 1000;
  if (n == 1)
    return q;
  if (s[1] != '.' || n > 5)
    return -1;
  int scale = 100;
  for (size_t i = 2; i < n; i++, scale /= 10) {
    if (s[i] < '0' || s[i] > '9')
      return -1;
    q += (s[i] - '0') * scale;
  }
  return q > 1000 ? -1 : q;
}

static bool token_is(const char *t, size_t n, const char *lit) {
  return n == strlen(lit) && !strncasecmp(t, lit, n);
}

/* One element: coding *( OWS ";" OWS name "=" value ). */
static void element(mx_sse_accept *a, const char *p, const char *end) {
  while (p < end && ows(*p))
    p++;
  const char *t = p;
  while (p < end && !ows(*p) && *p != ';')
    p++;
  size_t tn = (size_t)(p - t);
  if (tn == 0)
    return;
  int q = 1000;
  while (p < end) {
    const char *semi = memchr(p, ';', (size_t)(end - p));
    if (!semi)
      break; /* trailing OWS, or junk without a parameter */
    p = semi + 1;
    const char *pend = memchr(p, ';', (size_t)(end - p));
    if (!pend)
      pend = end;
    const char *k = p;
    while (k < pend && ows(*k))
      k++;
    const char *v = pend;
    while (v > k && ows(v[-1]))
      v--;
    if (v - k >= 2 && (k[0] == 'q' || k[0] == 'Q') && k[1] == '=')
      q = qvalue(k + 2, (size_t)(v - k - 2));
    p = pend;
  }
  if (q < 0)
    q = 0; /* a broken weight never enables a coding */
  if (token_is(t, tn, "gzip") || token_is(t, tn, "x-gzip")) {
    if (q > a->gzip)
      a->gzip = q;
  } else if (token_is(t, tn, "*")) {
    if (q > a->star)
      a->star = q;
  }
}

void mx_sse_accept_scan(mx_sse_accept *a, const char *value, size_t len) {
  const char *p = value, *end = value + len;
  while (p < end) {
    const char *comma = memchr(p, ',', (size_t)(end - p));
    const char *e = comma ? comma : end;
    element(a, p, e);
    p = comma ? comma + 1 : end;
  }
}

bool mx_sse_accept_gzip(const mx_sse_accept *a) {
  if (a->gzip >= 0)
    return a->gzip > 0;
  return a->star > 0;
}
