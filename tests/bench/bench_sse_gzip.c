/*
 * What a stream's compressor costs and saves, for every window (9..15)
 * and memory level (1..9), on a captured SSE stream (bench/gzip writes
 * one; any file of SSE frames works: it is split after each blank line).
 *
 *   make tests/bench/bench_sse_gzip
 *   tests/bench/bench_sse_gzip CAPTURE [STREAMS]
 *
 * For each pair it prints one JSON line:
 *   requested  bytes zlib asked for (h2/sse_gzip.c's counting allocator)
 *   heap       malloc's in-use bytes per context, from mallinfo2 over
 *              STREAMS live contexts (allocator overhead and the
 *              context struct included)
 *   resident   RSS growth per context once STREAMS contexts have each
 *              compressed the whole capture, frame by frame
 *   bytes_in / bytes_out  the capture, and what one context made of it
 *              with a sync flush per frame (level 6)
 * Build it without sanitizers (they change malloc and RSS).
 */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/chunk.h"
#include "h2/sse_gzip.h"

/* In-use heap: arena blocks plus mmap'd ones (large blocks). */
static size_t heap_in_use(void) {
  struct mallinfo2 mi = mallinfo2();
  return mi.uordblks + mi.hblkhd;
}

static long rss_kb(void) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  long kb = -1;
  while (f && fgets(line, sizeof(line), f))
    if (!strncmp(line, "VmRSS:", 6))
      kb = strtol(line + 6, NULL, 10);
  if (f)
    fclose(f);
  return kb;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s CAPTURE [STREAMS]\n", argv[0]);
    return 64;
  }
  size_t nstreams = argc > 2 ? strtoul(argv[2], NULL, 10) : 100;
  FILE *f = fopen(argv[1], "rb");
  if (!f) {
    perror(argv[1]);
    return 1;
  }
  static char data[64 << 20];
  size_t len = fread(data, 1, sizeof(data), f);
  fclose(f);
  /* Frame ends: after each "\n\n". */
  size_t *ends = malloc(sizeof(size_t) * (len / 2 + 1)), nframes = 0;
  for (size_t i = 1; i < len; i++)
    if (data[i] == '\n' && data[i - 1] == '\n')
      ends[nframes++] = i + 1;
  mx_sse_gzip **zs = calloc(nstreams, sizeof(*zs));
  if (!ends || !zs)
    return 1;
  for (int wb = 9; wb <= 15; wb++)
    for (int ml = 1; ml <= 9; ml++) {
      mx_sse_gzip_params p = {.level = 6, .window_bits = wb, .mem_level = ml};
      malloc_trim(0);
      long rss0 = rss_kb();
      size_t heap0 = heap_in_use();
      for (size_t s = 0; s < nstreams; s++)
        if (mx_sse_gzip_new(&p, &zs[s]))
          return 1;
      size_t heap1 = heap_in_use();
      size_t requested = mx_sse_gzip_memory(zs[0]);
      size_t out = 0;
      for (size_t s = 0; s < nstreams; s++) {
        size_t start = 0;
        for (size_t k = 0; k < nframes; k++) {
          mx_chunk *c = NULL;
          if (mx_sse_gzip_chunk(zs[s], data + start, ends[k] - start, &c))
            return 1;
          if (s == 0)
            out += c->len;
          mx_chunk_unref(c);
          start = ends[k];
        }
      }
      long rss1 = rss_kb();
      for (size_t s = 0; s < nstreams; s++)
        mx_sse_gzip_free(zs[s]);
      printf("{\"window_bits\": %d, \"mem_level\": %d, \"requested\": %zu, "
             "\"heap\": %zu, \"resident\": %ld, \"bytes_in\": %zu, "
             "\"bytes_out\": %zu, \"frames\": %zu, \"streams\": %zu}\n",
             wb, ml, requested, (heap1 - heap0) / nstreams,
             (rss1 - rss0) * 1024 / (long)nstreams, ends[nframes ? nframes - 1 : 0],
             out, nframes, nstreams);
      fflush(stdout);
    }
  free(zs);
  free(ends);
  return 0;
}
