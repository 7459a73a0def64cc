#include "common/log.h"
#include "tests/unit/tap.h"

static void redact(const char *in, char *out, size_t outlen) {
  mx_log_redact_target(in, strlen(in), out, outlen);
}

static void test_redacts_access_token(void) {
  char out[256];
  redact("/_matrix/client/v3/sync?access_token=syt_secret&since=s1", out,
         sizeof(out));
  CHECK_STREQ(out,
              "/_matrix/client/v3/sync?access_token=<redacted>&since=s1");
  redact("/x?a=1&ACCESS_TOKEN=abc", out, sizeof(out));
  CHECK_STREQ(out, "/x?a=1&access_token=<redacted>");
  CHECK(strstr(out, "abc") == NULL);
}

static void test_redacts_other_spellings(void) {
  char out[256];
  /* The homeserver splits on ';' too and percent-decodes names. */
  redact("/x?a=1;access_token=T1&b=2", out, sizeof(out));
  CHECK_STREQ(out, "/x?a=1;access_token=<redacted>&b=2");
  redact("/x?%61ccess_token=T2", out, sizeof(out));
  CHECK_STREQ(out, "/x?access_token=<redacted>");
  redact("/x?access%5Ftoken=T3;y=1", out, sizeof(out));
  CHECK_STREQ(out, "/x?access_token=<redacted>;y=1");
  redact("/x?access_token", out, sizeof(out)); /* no value */
  CHECK_STREQ(out, "/x?access_token=<redacted>");
  redact("/x?access_tokens=1&%zz=2", out, sizeof(out));
  CHECK_STREQ(out, "/x?access_tokens=1&%zz=2");
}

static void test_keeps_other_params(void) {
  char out[256];
  redact("/x?my_access_token=1", out, sizeof(out));
  CHECK_STREQ(out, "/x?my_access_token=1");
  redact("/access_token=1", out, sizeof(out)); /* path, not query */
  CHECK_STREQ(out, "/access_token=1");
}

static void test_escapes_and_truncates(void) {
  char out[256];
  redact("/a b\"\n", out, sizeof(out));
  CHECK_STREQ(out, "/a%20b%22%0A");
  char tiny[5];
  redact("/abcdefgh", tiny, sizeof(tiny));
  CHECK_STREQ(tiny, "/abc");
  /* Truncation never leaves a token prefix behind. */
  char small[20];
  redact("/x?access_token=secretsecret", small, sizeof(small));
  CHECK(strstr(small, "secret") == NULL);
}

static void test_level_parse(void) {
  mx_log_level l;
  CHECK_INT(mx_log_level_parse("debug", &l), 0);
  CHECK_INT(l, MX_LOG_DEBUG);
  CHECK_INT(mx_log_level_parse("WARN", &l), 0);
  CHECK_INT(l, MX_LOG_WARN);
  CHECK(mx_log_level_parse("loud", &l) != 0);
}

int main(void) {
  TAP_RUN(TAP_CASE(test_redacts_access_token),
          TAP_CASE(test_redacts_other_spellings),
          TAP_CASE(test_keeps_other_params),
          TAP_CASE(test_escapes_and_truncates), TAP_CASE(test_level_parse));
}
