/*
 * For the tests that collect ids into an mx_buf as "a;b;c;" (visits of
 * the room index, the room mates, the wake rules): the ids sorted, so a
 * test compares sets without caring for visiting order. Duplicates are
 * kept, so they show. Included by a test program, like tap.h.
 */
#ifndef MX_TESTS_UNIT_SORTED_IDS_H
#define MX_TESTS_UNIT_SORTED_IDS_H

#include <stdlib.h>
#include <string.h>

#include "common/buf.h"

static int sorted_ids_cmp(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* b's ids, sorted, as "a;b;c;" (static buffer); empties b. */
static const char *sorted_ids(mx_buf *b) {
  static char out[8192];
  char *copy = strdup(b->data ? b->data : "");
  char *parts[512];
  size_t n = 0;
  for (char *t = strtok(copy, ";"); t && n < 512; t = strtok(NULL, ";"))
    parts[n++] = t;
  qsort(parts, n, sizeof(*parts), sorted_ids_cmp);
  out[0] = '\0';
  for (size_t i = 0; i < n; i++) {
    strncat(out, parts[i], sizeof(out) - strlen(out) - 2);
    strcat(out, ";");
  }
  free(copy);
  mx_buf_reset(b);
  return out;
}

#endif
