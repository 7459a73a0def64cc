#include <stdlib.h>
#include <unistd.h>

#include "common/config.h"
#include "common/error.h"
#include "tests/unit/tap.h"

static char errbuf[1024];

static int load(mx_config *cfg, int argc, const char **argv) {
  mx_config_defaults(cfg);
  FILE *err = fmemopen(errbuf, sizeof(errbuf), "w");
  FILE *out = fopen("/dev/null", "w");
  memset(errbuf, 0, sizeof(errbuf));
  int rv = mx_config_load(cfg, argc, (char **)argv, out, err);
  fclose(err);
  fclose(out);
  return rv;
}

#define ARGV(...) (const char *[]){"mxsse", __VA_ARGS__, NULL}
#define ARGC(...) \
  ((int)(sizeof((const char *[]){"mxsse", __VA_ARGS__}) / sizeof(char *)))
#define LOAD(cfg, ...) load(cfg, ARGC(__VA_ARGS__), ARGV(__VA_ARGS__))

static void test_flags(void) {
  mx_config c;
  CHECK_INT(LOAD(&c, "--upstream", "http://127.0.0.1:8008/", "--listen",
                 "127.0.0.1:8080", "--listen=[::1]:8081",
                 "--max-concurrent-streams", "7", "--access-log"),
            0);
  CHECK_STREQ(c.upstream, "http://127.0.0.1:8008");
  CHECK_INT(c.listen.count, 2);
  CHECK_STREQ(c.listen.items[1], "[::1]:8081");
  CHECK_INT(c.max_concurrent_streams, 7);
  CHECK(c.access_log);
  mx_config_free(&c);
}

static void test_errors(void) {
  mx_config c;
  CHECK_INT(LOAD(&c, "--upstream", "http://x", "--listen", "1:2", "--bogus"),
            MX_ERR_INVALID);
  CHECK(strstr(errbuf, "unknown option '--bogus'") != NULL);
  mx_config_free(&c);
  CHECK_INT(LOAD(&c, "--upstream", "http://x", "--listen", "1:2",
                 "--max-concurrent-streams", "0"),
            MX_ERR_INVALID);
  CHECK(strstr(errbuf, "max-concurrent-streams") != NULL);
  mx_config_free(&c);
  CHECK_INT(LOAD(&c, "--upstream", "ftp://x", "--listen", "1:2"),
            MX_ERR_INVALID);
  mx_config_free(&c);
  CHECK_INT(LOAD(&c, "--upstream", "http://x", "--listen", "nocolon"),
            MX_ERR_INVALID);
  mx_config_free(&c);
  CHECK_INT(LOAD(&c, "--upstream", "http://x", "--tls-listen", ":443"),
            MX_ERR_INVALID); /* no cert */
  CHECK(strstr(errbuf, "--cert") != NULL);
  mx_config_free(&c);
  CHECK_INT(LOAD(&c, "--listen", ":1"), MX_ERR_INVALID); /* no upstream */
  mx_config_free(&c);
  /* one line, newline-terminated */
  CHECK(strchr(errbuf, '\n') == errbuf + strlen(errbuf) - 1);
}

static void test_file_and_override(void) {
  char path[] = "/tmp/mxsse-test-config-XXXXXX";
  int fd = mkstemp(path);
  const char *text = "# comment\n"
                     "upstream = http://a:1\n"
                     "listen = 127.0.0.1:1\n"
                     "listen = 127.0.0.1:2\n"
                     "heartbeat-interval = \"9\"\n"
                     "longpoll-fallback = false\n";
  CHECK(write(fd, text, strlen(text)) == (ssize_t)strlen(text));
  close(fd);
  mx_config c;
  CHECK_INT(LOAD(&c, "--config", path, "--upstream", "http://b:2"), 0);
  CHECK_STREQ(c.upstream, "http://b:2");
  CHECK_INT(c.listen.count, 2);
  CHECK_INT(c.heartbeat_default, 9);
  CHECK(!c.longpoll_fallback);
  mx_config_free(&c);
  /* A list on the command line replaces the file's list. */
  CHECK_INT(LOAD(&c, "--config", path, "--listen", "127.0.0.1:3"), 0);
  CHECK_INT(c.listen.count, 1);
  mx_config_free(&c);
  unlink(path);
}

static void test_bad_file(void) {
  char path[] = "/tmp/mxsse-test-config-XXXXXX";
  int fd = mkstemp(path);
  const char *text = "upstream = http://a:1\nnonsense\n";
  CHECK(write(fd, text, strlen(text)) == (ssize_t)strlen(text));
  close(fd);
  mx_config c;
  CHECK_INT(LOAD(&c, "--config", path, "--listen", ":1"), MX_ERR_INVALID);
  CHECK(strstr(errbuf, ":2: expected") != NULL);
  mx_config_free(&c);
  unlink(path);
  CHECK_INT(LOAD(&c, "--config", "/nonexistent/x.conf"), MX_ERR_INVALID);
  mx_config_free(&c);
}

static void test_help_version(void) {
  mx_config c;
  CHECK_INT(LOAD(&c, "--version"), 1);
  CHECK_INT(LOAD(&c, "--help"), 1);
  mx_config_free(&c);
}

static void test_hostport(void) {
  char host[64];
  unsigned port;
  CHECK_INT(mx_config_split_hostport("[::1]:80", host, sizeof(host), &port), 0);
  CHECK_STREQ(host, "::1");
  CHECK_INT(port, 80);
  CHECK_INT(mx_config_split_hostport(":8080", host, sizeof(host), &port), 0);
  CHECK_STREQ(host, "");
  CHECK(mx_config_split_hostport("::1:80", host, sizeof(host), &port) != 0);
  CHECK(mx_config_split_hostport("h:99999", host, sizeof(host), &port) != 0);
  CHECK(mx_config_split_hostport("h:", host, sizeof(host), &port) != 0);
}

int main(void) {
  TAP_RUN(TAP_CASE(test_flags), TAP_CASE(test_errors),
          TAP_CASE(test_file_and_override), TAP_CASE(test_bad_file),
          TAP_CASE(test_help_version), TAP_CASE(test_hostport));
}
