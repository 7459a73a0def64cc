#include "common/http.h"
#include "tests/unit/tap.h"

static void test_query_param(void) {
  const char *t = "/sync?filter=%7B%7D&since=s1_2&full_state&x=";
  const char *v;
  long n = mx_http_query_param(t, strlen(t), "since", &v);
  CHECK_MEMEQ(v, (size_t)n, "s1_2", 4);
  CHECK_INT(mx_http_query_param(t, strlen(t), "full_state", &v), 0);
  CHECK_INT(mx_http_query_param(t, strlen(t), "x", &v), 0);
  CHECK_INT(mx_http_query_param(t, strlen(t), "sinc", &v), -1);
  CHECK_INT(mx_http_query_param("/sync", 5, "since", &v), -1);
}

static void test_percent_decode(void) {
  char s[] = "%7B%22a%22%7D+x";
  long n = mx_http_percent_decode(s, strlen(s), true);
  CHECK_MEMEQ(s, (size_t)n, "{\"a\"} x", 7);
  char bad1[] = "%7";
  CHECK_INT(mx_http_percent_decode(bad1, 2, false), -1);
  char bad2[] = "%zz";
  CHECK_INT(mx_http_percent_decode(bad2, 3, false), -1);
  char end[] = "a%";
  CHECK_INT(mx_http_percent_decode(end, 2, false), -1);
}

static void test_matrix_error(void) {
  mx_buf b;
  mx_buf_init(&b, 1024);
  CHECK_INT(mx_http_matrix_error(&b, "M_UNKNOWN", "bad \"x\"\n"), 0);
  CHECK_STREQ(b.data, "{\"errcode\":\"M_UNKNOWN\",\"error\":\"bad \\\"x\\\"\\u000a\"}");
  mx_buf_free(&b);
}

static void test_hop_by_hop(void) {
  CHECK(mx_http_is_hop_by_hop("Connection", 10));
  CHECK(mx_http_is_hop_by_hop("transfer-encoding", 17));
  CHECK(!mx_http_is_hop_by_hop("content-length", 14));
  CHECK(mx_http_connection_lists("close, X-Foo", 12, "x-foo", 5));
  CHECK(!mx_http_connection_lists("close, X-Foo", 12, "x-fo", 4));
}

int main(void) {
  TAP_RUN(TAP_CASE(test_query_param), TAP_CASE(test_percent_decode),
          TAP_CASE(test_matrix_error), TAP_CASE(test_hop_by_hop));
}
