#include <stdlib.h>
#include <unistd.h>

#include "common/config.h"
#include "common/error.h"
#include "common/log.h"
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


static void write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  CHECK(f != NULL);
  if (!f)
    return;
  fputs(text, f);
  fclose(f);
}

static void test_check_config(void) {
  char path[] = "/tmp/mxsse-test-config-XXXXXX";
  close(mkstemp(path));
  write_file(path, "upstream = http://a:1\nlisten = 127.0.0.1:1\n");
  mx_config c;
  /* Valid: exit 0 (1 here) without running. */
  CHECK_INT(LOAD(&c, "--check-config", path), 1);
  CHECK_STREQ(c.config_file, path);
  mx_config_free(&c);
  CHECK_INT(LOAD(&c, "--config", path, "--check-config"), 1);
  mx_config_free(&c);
  char eq[128];
  snprintf(eq, sizeof(eq), "--check-config=%s", path);
  CHECK_INT(LOAD(&c, eq, "--max-connections", "5"), 1);
  mx_config_free(&c);
  /* Flags still apply, and are validated. */
  CHECK_INT(LOAD(&c, "--check-config", path, "--max-connections", "0"),
            MX_ERR_INVALID);
  CHECK(strstr(errbuf, "max-connections") != NULL);
  mx_config_free(&c);
  write_file(path, "upstream = http://a:1\nlisten = 127.0.0.1:1\n"
                   "heartbeat-min = 10\nheartbeat-max = 5\n");
  CHECK_INT(LOAD(&c, "--check-config", path), MX_ERR_INVALID);
  CHECK(strstr(errbuf, "heartbeat") != NULL);
  mx_config_free(&c);
  CHECK_INT(LOAD(&c, "--check-config", "/nonexistent/mxsse.conf"),
            MX_ERR_INVALID);
  mx_config_free(&c);
  /* Without a file: the flags alone. */
  CHECK_INT(LOAD(&c, "--check-config", "--upstream", "http://a", "--listen",
                 ":1"),
            1);
  mx_config_free(&c);
  unlink(path);
}

/* The log lines a reload writes, captured. */
static char logbuf[8192];

static int reload_logged(mx_config *c, mx_config_changes *ch) {
  memset(logbuf, 0, sizeof(logbuf));
  FILE *f = fmemopen(logbuf, sizeof(logbuf) - 1, "w");
  mx_log_init(MX_LOG_INFO, f);
  int rv = mx_config_reload(c, ch);
  fflush(f);
  mx_log_init(MX_LOG_INFO, NULL);
  fclose(f);
  return rv;
}

static void test_reload(void) {
  char path[] = "/tmp/mxsse-test-config-XXXXXX";
  close(mkstemp(path));
  write_file(path, "upstream = http://a:1\nlisten = 127.0.0.1:1\n"
                   "heartbeat-max = 300\nmax-connections = 100\n"
                   "replication = redis://:secret@127.0.0.1:6379\n"
                   "server-name = example.org\n");
  mx_config c;
  mx_config_changes ch;
  /* A flag keeps winning over the file. The argv must outlive the
   * configuration (a reload reads it again), as main's does. */
  const char *argv[] = {"mxsse", "--config", path, "--max-connections-per-ip",
                        "7", NULL};
  CHECK_INT(load(&c, 5, argv), 0);

  /* Nothing changed: nothing applied, nothing to restart. */
  CHECK_INT(reload_logged(&c, &ch), 0);
  CHECK_INT(ch.napplied, 0);
  CHECK_INT(ch.nrestart, 0);
  CHECK(strstr(logbuf, "event=config.reloaded") != NULL);

  write_file(path, "upstream = http://b:2\nlisten = 127.0.0.1:1\n"
                   "listen = 127.0.0.1:2\n"
                   "heartbeat-min = 2\nheartbeat-max = 600\n"
                   "max-connections = 50\nmax-connections-per-ip = 9\n"
                   "log-level = debug\nproxy-prefix = /_synapse/admin\n"
                   "replication = redis://:other@127.0.0.1:6380\n"
                   "server-name = example.org\n");
  CHECK_INT(reload_logged(&c, &ch), 0);
  /* Applied now. */
  CHECK_INT(c.heartbeat_min, 2);
  CHECK_INT(c.heartbeat_max, 600);
  CHECK_INT(c.max_connections, 50);
  CHECK_STREQ(c.log_level, "debug");
  CHECK(mx_log_enabled(MX_LOG_DEBUG) == false); /* reset by the helper */
  CHECK_INT(c.proxy_prefix.count, 1);
  CHECK_STREQ(c.proxy_prefix.items[0], "/_synapse/admin");
  CHECK_STREQ(ch.applied, "log-level,max-connections,proxy-prefix,"
                          "heartbeat-min,heartbeat-max");
  CHECK_INT(ch.napplied, 5);
  /* The flag still wins over the file's 9. */
  CHECK_INT(c.max_connections_per_ip, 7);
  /* Kept until a restart. */
  CHECK_STREQ(c.upstream, "http://a:1");
  CHECK_INT(c.listen.count, 1);
  CHECK_STREQ(c.replication, "redis://:secret@127.0.0.1:6379");
  CHECK_STREQ(ch.restart, "upstream,listen,replication");
  CHECK_INT(ch.nrestart, 3);
  /* The log says what changed and what needs a restart, and never a
   * value that may hold a secret. */
  CHECK(strstr(logbuf, "event=config.changed key=heartbeat-max from=300 "
                       "to=600") != NULL);
  CHECK(strstr(logbuf, "event=config.changed key=log-level from=info "
                       "to=debug") != NULL);
  CHECK(strstr(logbuf, "event=config.needs_restart key=listen") != NULL);
  CHECK(strstr(logbuf, "event=config.needs_restart key=replication") !=
        NULL);
  CHECK(strstr(logbuf, "restart_keys=\"upstream,listen,replication\"") !=
        NULL);
  CHECK(strstr(logbuf, "secret") == NULL && strstr(logbuf, "other") == NULL);

  /* An invalid file: logged, and the running configuration kept. */
  write_file(path, "upstream = http://b:2\nlisten = 127.0.0.1:1\n"
                   "heartbeat-max = lots\n");
  CHECK_INT(reload_logged(&c, &ch), MX_ERR_INVALID);
  CHECK_INT(c.heartbeat_max, 600);
  CHECK(strstr(logbuf, "event=config.reload_failed") != NULL);
  CHECK(strstr(logbuf, "heartbeat-max") != NULL);
  CHECK(strchr(logbuf, '\n') == logbuf + strlen(logbuf) - 1); /* one line */
  /* A reload of the file removed: refused too. */
  unlink(path);
  CHECK_INT(reload_logged(&c, &ch), MX_ERR_INVALID);
  CHECK_STREQ(c.upstream, "http://a:1");
  mx_config_free(&c);

  CHECK(mx_config_reloadable("heartbeat-max"));
  CHECK(mx_config_reloadable("cert"));
  CHECK(!mx_config_reloadable("listen"));
  CHECK(!mx_config_reloadable("bogus"));
}

/* Every key --help lists is in both manual pages and in the shipped file,
 * and the shipped file is a valid configuration. */
static void test_generated(void) {
  static char help[16384], man8[65536], man5[65536], conf[16384];
  struct {
    char *buf;
    size_t size;
    const char *arg;
  } docs[] = {{help, sizeof(help), "--help"},
              {man8, sizeof(man8), "--print-man=8"},
              {man5, sizeof(man5), "--print-man=5"},
              {conf, sizeof(conf), "--print-config"}};
  for (size_t i = 0; i < sizeof(docs) / sizeof(docs[0]); i++) {
    memset(docs[i].buf, 0, docs[i].size);
    FILE *out = fmemopen(docs[i].buf, docs[i].size - 1, "w");
    mx_config c;
    mx_config_defaults(&c);
    const char *argv[] = {"mxsse", docs[i].arg, NULL};
    CHECK_INT(mx_config_load(&c, 2, (char **)argv, out, stderr), 1);
    fclose(out);
    mx_config_free(&c);
    CHECK(strlen(docs[i].buf) > 100);
  }
  size_t nkeys = 0;
  for (char *line = help; (line = strstr(line, "\n  --")); line++) {
    char key[64];
    if (sscanf(line + 5, "%63[a-z-]", key) != 1)
      continue;
    char want[160];
    /* mxsse(8): .BI "\-\-key ..." with roff minus signs. */
    char escaped[128] = "";
    for (const char *k = key; *k; k++)
      strncat(escaped, *k == '-' ? "\\-" : (char[]){*k, 0},
              sizeof(escaped) - strlen(escaped) - 1);
    snprintf(want, sizeof(want), "\n.BI \"\\-\\-%s", escaped);
    if (!strstr(man8, want))
      printf("# %s not in mxsse(8)\n", key);
    CHECK(strstr(man8, want) != NULL);
    if (!strcmp(key, "config") || !strcmp(key, "check-config") ||
        !strcmp(key, "help") || !strcmp(key, "version"))
      continue;
    nkeys++;
    snprintf(want, sizeof(want), "\n.BI \"%s = ", escaped);
    CHECK(strstr(man5, want) != NULL);
    /* The file names every key, set or commented out. */
    char set[80], commented[80];
    snprintf(set, sizeof(set), "\n%s = ", key);
    snprintf(commented, sizeof(commented), "\n#%s = ", key);
    CHECK(strstr(conf, set) != NULL || strstr(conf, commented) != NULL);
  }
  CHECK(nkeys >= 30);
  CHECK(strstr(man8, "\n.SH SIGNALS\n") != NULL);
  CHECK(strstr(man8, PACKAGE_VERSION) != NULL);

  char path[] = "/tmp/mxsse-test-config-XXXXXX";
  close(mkstemp(path));
  write_file(path, conf);
  mx_config c;
  CHECK_INT(LOAD(&c, "--check-config", path), 1);
  CHECK_STREQ(c.upstream, "http://127.0.0.1:8008");
  mx_config_free(&c);
  unlink(path);
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
          TAP_CASE(test_help_version), TAP_CASE(test_check_config),
          TAP_CASE(test_reload), TAP_CASE(test_generated),
          TAP_CASE(test_hostport));
}
