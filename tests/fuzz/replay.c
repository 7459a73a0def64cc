/*
 * Replays a fuzz target's corpus (tests/fuzz/corpus/<program name>/) as a
 * TAP test: one test per file. Linked instead of libFuzzer in ordinary
 * builds, so make check runs every input that ever mattered, under the
 * sanitizers when configured with --enable-asan.
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/fuzz/fuzz.h"

static int by_name(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

static unsigned char *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f)
    return NULL;
  size_t cap = 4096, n = 0;
  unsigned char *buf = malloc(cap);
  size_t got;
  while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
    n += got;
    if (n == cap) {
      unsigned char *nb = realloc(buf, cap * 2);
      if (!nb) {
        free(buf);
        buf = NULL;
        break;
      }
      buf = nb;
      cap *= 2;
    }
  }
  fclose(f);
  *len = n;
  return buf;
}

int main(int argc, char **argv) {
  const char *name = strrchr(argv[0], '/');
  name = name ? name + 1 : argv[0];
  /* libtool-less builds may prefix "lt-"; tolerate it. */
  if (!strncmp(name, "lt-", 3))
    name += 3;
  const char *srcdir = getenv("srcdir");
  char dir[4096];
  if (argc > 1)
    snprintf(dir, sizeof(dir), "%s", argv[1]);
  else
    snprintf(dir, sizeof(dir), "%s/tests/fuzz/corpus/%s",
             srcdir ? srcdir : ".", name);
  /* A target without its corpus tests nothing: that is a failure, not a
   * skip (a renamed target or a corpus left out of a tarball). */
  DIR *d = opendir(dir);
  if (!d) {
    printf("1..1\nnot ok 1 - no corpus at %s: %s\n", dir, strerror(errno));
    return 1;
  }
  char **files = NULL;
  size_t n = 0;
  struct dirent *de;
  while ((de = readdir(d))) {
    if (de->d_name[0] == '.')
      continue;
    char **nf = realloc(files, (n + 1) * sizeof(*files));
    if (!nf)
      return 99;
    files = nf;
    files[n++] = strdup(de->d_name);
  }
  closedir(d);
  if (n == 0) {
    printf("1..1\nnot ok 1 - empty corpus at %s\n", dir);
    free(files);
    return 1;
  }
  qsort(files, n, sizeof(*files), by_name);
  /* One TAP line per input; a crash aborts the program, which the
   * driver reports as an error. */
  printf("1..%zu\n", n);
  int status = 0;
  for (size_t i = 0; i < n; i++) {
    char path[8192];
    snprintf(path, sizeof(path), "%s/%s", dir, files[i]);
    size_t len = 0;
    unsigned char *data = slurp(path, &len);
    if (!data) {
      printf("not ok %zu - %s (unreadable)\n", i + 1, files[i]);
      free(files[i]);
      status = 1;
      continue;
    }
    printf("# %s\n", files[i]);
    fflush(stdout);
    LLVMFuzzerTestOneInput(data, len);
    free(data);
    printf("ok %zu - %s\n", i + 1, files[i]);
    fflush(stdout);
    free(files[i]);
  }
  free(files);
  return status;
}
