#include "common/buf.h"
#include "common/error.h"
#include "tests/unit/tap.h"

static void test_append_and_nul(void) {
  mx_buf b;
  mx_buf_init(&b, 64);
  CHECK_INT(mx_buf_append(&b, "hello", 5), 0);
  CHECK_INT(mx_buf_appendf(&b, " %d", 42), 0);
  CHECK_STREQ(b.data, "hello 42");
  CHECK_INT(b.len, 8);
  mx_buf_free(&b);
}

static void test_cap_is_enforced(void) {
  mx_buf b;
  mx_buf_init(&b, 8);
  CHECK_INT(mx_buf_append(&b, "12345678", 8), 0);
  CHECK_INT(mx_buf_append(&b, "9", 1), MX_ERR_LIMIT);
  CHECK_INT(b.len, 8); /* nothing partial was appended */
  CHECK(mx_buf_reserve(&b, 1) == NULL);
  mx_buf_free(&b);
}

static void test_appendf_long(void) {
  mx_buf b;
  mx_buf_init(&b, 4096);
  char big[1000];
  memset(big, 'x', sizeof(big) - 1);
  big[sizeof(big) - 1] = '\0';
  CHECK_INT(mx_buf_appendf(&b, "<%s>", big), 0);
  CHECK_INT(b.len, 1001);
  CHECK(b.data[0] == '<' && b.data[1000] == '>');
  mx_buf_free(&b);
  mx_buf_init(&b, 10);
  CHECK_INT(mx_buf_appendf(&b, "%s", big), MX_ERR_LIMIT);
  mx_buf_free(&b);
}

static void test_consume_and_steal(void) {
  mx_buf b;
  mx_buf_init(&b, 100);
  mx_buf_append(&b, "abcdef", 6);
  mx_buf_consume(&b, 2);
  CHECK_STREQ(b.data, "cdef");
  size_t len;
  char *p = mx_buf_steal(&b, &len);
  CHECK_INT(len, 4);
  CHECK_STREQ(p, "cdef");
  free(p);
  CHECK(b.data == NULL && b.len == 0);
  mx_buf_consume(&b, 0); /* empty buffer: no-op */
  mx_buf_free(&b);
}

static void test_reserve_commit(void) {
  mx_buf b;
  mx_buf_init(&b, 1 << 20);
  char *p = mx_buf_reserve(&b, 5000);
  CHECK(p != NULL);
  memset(p, 'a', 5000);
  mx_buf_commit(&b, 5000);
  CHECK_INT(b.len, 5000);
  CHECK(b.data[5000] == '\0');
  mx_buf_free(&b);
}

int main(void) {
  TAP_RUN(TAP_CASE(test_append_and_nul), TAP_CASE(test_cap_is_enforced),
          TAP_CASE(test_appendf_long), TAP_CASE(test_consume_and_steal),
          TAP_CASE(test_reserve_commit));
}
