#include "common/chunk.h"
#include "tests/unit/tap.h"

static void test_refcount_shared(void) {
  mx_chunk *c = mx_chunk_new("event", 5);
  mx_chunkq a, b;
  mx_chunkq_init(&a);
  mx_chunkq_init(&b);
  CHECK_INT(mx_chunkq_push(&a, c), 0);
  CHECK_INT(mx_chunkq_push(&b, c), 0);
  CHECK_INT(c->refs, 3);
  mx_chunk_unref(c);
  mx_chunkq_clear(&a);
  CHECK_INT(c->refs, 1); /* still alive: b holds it */
  char out[8] = {0};
  CHECK_INT(mx_chunkq_read(&b, out, sizeof(out)), 5);
  CHECK_STREQ(out, "event");
  CHECK_INT(b.bytes, 0);
  CHECK(b.head == NULL && b.tail == NULL);
}

static void test_partial_consume(void) {
  mx_chunkq q;
  mx_chunkq_init(&q);
  mx_chunkq_push_copy(&q, "abc", 3);
  mx_chunkq_push_copy(&q, "", 0); /* ignored */
  mx_chunkq_push_copy(&q, "defg", 4);
  CHECK_INT(q.bytes, 7);
  CHECK_INT(q.count, 2);
  mx_chunkq_consume(&q, 2);
  const char *p;
  size_t n = mx_chunkq_peek(&q, &p);
  CHECK_MEMEQ(p, n, "c", 1);
  mx_chunkq_consume(&q, 3);
  n = mx_chunkq_peek(&q, &p);
  CHECK_MEMEQ(p, n, "fg", 2);
  CHECK_INT(q.count, 1);
  mx_chunkq_clear(&q);
  CHECK_INT(mx_chunkq_peek(&q, &p), 0);
  CHECK(p == NULL);
}

/* Moving bytes between queues references them: a chunk moved in parts
 * is shared by both queues until each has consumed its part. */
static void test_move_slices(void) {
  mx_chunk *c1 = mx_chunk_new("abcdef", 6), *c2 = mx_chunk_new("XYZ", 3);
  mx_chunkq src, dst;
  mx_chunkq_init(&src);
  mx_chunkq_init(&dst);
  CHECK_INT(mx_chunkq_push(&src, c1), 0);
  CHECK_INT(mx_chunkq_push(&src, c2), 0);
  mx_chunkq_consume(&src, 1); /* "bcdef" "XYZ" */
  CHECK_INT(mx_chunkq_move(&dst, &src, 2), 0); /* "bc" */
  CHECK_INT(c1->refs, 3);
  CHECK_INT(dst.bytes, 2);
  CHECK_INT(src.bytes, 6);
  CHECK_INT(mx_chunkq_move(&dst, &src, 5), 0); /* "def" "XY" */
  CHECK_INT(dst.bytes, 7);
  CHECK_INT(src.bytes, 1);
  char out[16] = {0};
  CHECK_INT(mx_chunkq_read(&dst, out, sizeof(out)), 7);
  CHECK_STREQ(out, "bcdefXY");
  CHECK_INT(c1->refs, 1);
  const char *p;
  CHECK_INT(mx_chunkq_peek(&src, &p), 1);
  CHECK(*p == 'Z');
  CHECK_INT(c2->refs, 2);
  mx_chunkq_clear(&src);
  CHECK_INT(c2->refs, 1);
  mx_chunk_unref(c1);
  mx_chunk_unref(c2);
}

int main(void) {
  TAP_RUN(TAP_CASE(test_refcount_shared), TAP_CASE(test_partial_consume),
          TAP_CASE(test_move_slices));
}
