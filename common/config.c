#include "common/config.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "common/error.h"
#include "common/limits.h"
#include "common/log.h"

typedef enum { OPT_STR, OPT_LIST, OPT_LONG, OPT_BOOL } opt_type;

typedef struct option_spec {
  const char *name;
  opt_type type;
  size_t offset;
  long min, max; /* OPT_LONG bounds */
  const char *arg;
  const char *help;
} option_spec;

#define F(field) offsetof(mx_config, field)

static const option_spec options[] = {
    {"upstream", OPT_STR, F(upstream), 0, 0, "URL",
     "homeserver base URL (http://HOST:PORT)"},
    {"listen", OPT_LIST, F(listen), 0, 0, "HOST:PORT",
     "cleartext listener: HTTP/1.1 and h2c (repeatable)"},
    {"tls-listen", OPT_LIST, F(tls_listen), 0, 0, "HOST:PORT",
     "TLS listener: ALPN h2 and http/1.1 (repeatable)"},
    {"cert", OPT_STR, F(cert), 0, 0, "FILE", "TLS certificate chain (PEM)"},
    {"key", OPT_STR, F(key), 0, 0, "FILE", "TLS private key (PEM)"},
    {"admin-listen", OPT_STR, F(admin_listen), 0, 0, "HOST:PORT",
     "admin listener: /healthz /readyz /metrics"},
    {"log-level", OPT_STR, F(log_level), 0, 0, "LEVEL",
     "error, warn, info or debug"},
    {"access-log", OPT_BOOL, F(access_log), 0, 0, "BOOL",
     "log one line per request"},
    {"max-connections", OPT_LONG, F(max_connections), 1, 1000000, "N",
     "connections at once, all clients"},
    {"max-connections-per-ip", OPT_LONG, F(max_connections_per_ip), 1,
     1000000, "N", "connections at once from one address"},
    {"max-concurrent-streams", OPT_LONG, F(max_concurrent_streams), 1, 10000,
     "N", "HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS"},
    {"handshake-timeout", OPT_LONG, F(handshake_timeout), 1, 3600, "SECONDS",
     "TLS handshake deadline"},
    {"header-timeout", OPT_LONG, F(header_timeout), 1, 3600, "SECONDS",
     "deadline for a request head"},
    {"idle-timeout", OPT_LONG, F(idle_timeout), 1, 86400, "SECONDS",
     "close connections with no request and no open stream"},
    {"write-timeout", OPT_LONG, F(write_timeout), 1, 3600, "SECONDS",
     "close connections whose writes stall, and cut SSE streams whose "
     "event is not taken, this long"},
    {"shutdown-grace", OPT_LONG, F(shutdown_grace), 0, 3600, "SECONDS",
     "time in-flight requests get after SIGTERM"},
    {"trusted-proxy", OPT_LIST, F(trusted_proxy), 0, 0, "ADDR",
     "peer address whose X-Forwarded-For is kept (repeatable)"},
    {"proxy-prefix", OPT_LIST, F(proxy_prefix), 0, 0, "PATH",
     "extra path prefix proxied upstream, e.g. /_synapse/admin (repeatable)"},
    {"cors-origin", OPT_STR, F(cors_origin), 0, 0, "ORIGIN",
     "Access-Control-Allow-Origin for browsers"},
    {"upstream-connect-timeout", OPT_LONG, F(upstream_connect_timeout), 1,
     600, "SECONDS", "homeserver connect deadline"},
    {"upstream-timeout", OPT_LONG, F(upstream_timeout), 0, 86400, "SECONDS",
     "deadline for a proxied request (0: none)"},
    {"upstream-max-connections", OPT_LONG, F(upstream_max_connections), 1,
     100000, "N", "pooled connections to the homeserver"},
    {"heartbeat-interval", OPT_LONG, F(heartbeat_default), 1, 3600,
     "SECONDS", "SSE heartbeat when the client names none"},
    {"heartbeat-min", OPT_LONG, F(heartbeat_min), 1, 3600, "SECONDS",
     "smallest heartbeat_interval a client may ask for"},
    {"heartbeat-max", OPT_LONG, F(heartbeat_max), 1, 86400, "SECONDS",
     "largest heartbeat_interval a client may ask for"},
    {"sse-retry", OPT_LONG, F(sse_retry_ms), 0, 3600000, "MS",
     "base SSE retry: value (per-connection jitter is added)"},
    {"longpoll-timeout", OPT_LONG, F(longpoll_timeout_ms), 0, 3600000, "MS",
     "timeout= of upstream long-polls"},
    {"start-retry-window", OPT_LONG, F(start_retry_window), 0, 3600,
     "SECONDS",
     "retry a stream's first /sync this long before answering an error"},
    {"replay-max-bytes", OPT_LONG, F(replay_max_bytes), 0, LONG_MAX, "BYTES",
     "memory kept for replaying unacknowledged batches"},
    {"replay-max-age", OPT_LONG, F(replay_max_age), 0, 86400 * 7, "SECONDS",
     "how long a batch is kept for replay"},
    {"replication", OPT_STR, F(replication), 0, 0, "URL",
     "homeserver replication feed: redis://[:PASSWORD@]HOST:PORT"},
    {"server-name", OPT_STR, F(server_name), 0, 0, "NAME",
     "homeserver server_name (the replication channel)"},
    {"max-upstream-fetches", OPT_LONG, F(max_upstream_fetches), 1, 100000,
     "N", "concurrent /sync fetches woken by replication"},
    {"wake-debounce", OPT_LONG, F(wake_debounce_ms), 0, 10000, "MS",
     "merge wakes arriving this close together"},
    {"longpoll-fallback", OPT_BOOL, F(longpoll_fallback), 0, 0, "BOOL",
     "long-poll while the replication feed is down"},
    {"replay-store", OPT_STR, F(replay_store), 0, 0, "URL",
     "replay store shared by several nodes: "
     "redis://[[USER]:PASSWORD@]HOST:PORT (default: in memory)"},
    {"replay-store-prefix", OPT_STR, F(replay_store_prefix), 0, 0, "PREFIX",
     "key prefix in the shared replay store (default mxsse:replay:)"},
    {"replay-store-max-batch", OPT_LONG, F(replay_store_max_batch), 1024,
     512L * 1024 * 1024, "BYTES",
     "largest batch put in the shared replay store"},
    {"replay-store-marker-age", OPT_LONG, F(replay_store_marker_age), 0,
     86400 * 30, "SECONDS",
     "how long the store remembers that a position had a batch, to tell a "
     "resume whose history is gone (0: 8 x replay-max-age)"},
    {"shutdown-ready-delay", OPT_LONG, F(shutdown_ready_delay), 0, 3600,
     "SECONDS",
     "after SIGTERM, /readyz answers 503 this long before listeners close"},
    {"shutdown-spread", OPT_LONG, F(shutdown_spread), 0, 3600, "SECONDS",
     "after SIGTERM, SSE streams end at random times over this long"},
};

#undef F

#define NOPTIONS (sizeof(options) / sizeof(options[0]))

void mx_config_defaults(mx_config *cfg) {
  memset(cfg, 0, sizeof(*cfg));
  cfg->max_connections = MX_DEFAULT_MAX_CONNECTIONS;
  cfg->max_connections_per_ip = MX_DEFAULT_MAX_CONN_PER_IP;
  cfg->max_concurrent_streams = MX_H2_DEFAULT_MAX_STREAMS;
  cfg->handshake_timeout = 10;
  cfg->header_timeout = 30;
  cfg->idle_timeout = 120;
  cfg->write_timeout = 60;
  cfg->shutdown_grace = 10;
  cfg->upstream_connect_timeout = 5;
  cfg->upstream_timeout = 0;
  cfg->upstream_max_connections = 256;
  cfg->heartbeat_default = 5;
  cfg->heartbeat_min = 1;
  cfg->heartbeat_max = 300;
  cfg->sse_retry_ms = 2000;
  cfg->longpoll_timeout_ms = 30000;
  cfg->replay_max_bytes = 64L * 1024 * 1024;
  cfg->replay_max_age = 600;
  cfg->start_retry_window = 5;
  cfg->max_upstream_fetches = 8; /* docs/benchmarks.md */
  cfg->wake_debounce_ms = 20;
  cfg->longpoll_fallback = true;
  cfg->replay_store_max_batch = 8L * 1024 * 1024;
  cfg->shutdown_spread = 2;
}

static void report(FILE *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void report(FILE *err, const char *fmt, ...) {
  va_list ap;
  fputs("mxsse: ", err);
  va_start(ap, fmt);
  vfprintf(err, fmt, ap);
  va_end(ap);
  fputc('\n', err);
}

static const option_spec *find_option(const char *name, size_t len) {
  for (size_t i = 0; i < NOPTIONS; i++)
    if (strlen(options[i].name) == len &&
        strncmp(options[i].name, name, len) == 0)
      return &options[i];
  return NULL;
}

static void list_clear(mx_strlist *l) {
  for (size_t i = 0; i < l->count; i++)
    free(l->items[i]);
  l->count = 0;
}

static int parse_bool(const char *v, bool *out) {
  if (!strcasecmp(v, "true") || !strcasecmp(v, "yes") || !strcmp(v, "1") ||
      !strcasecmp(v, "on"))
    *out = true;
  else if (!strcasecmp(v, "false") || !strcasecmp(v, "no") ||
           !strcmp(v, "0") || !strcasecmp(v, "off"))
    *out = false;
  else
    return MX_ERR_INVALID;
  return 0;
}

/* Assigns one key. `replace_lists` tracks which lists the current source
 * has already reset, so a source's repeated keys accumulate. */
static int set_option(mx_config *cfg, const option_spec *o, const char *value,
                      bool *replaced, const char *where, FILE *err) {
  void *field = (char *)cfg + o->offset;
  switch (o->type) {
  case OPT_STR: {
    char **s = field;
    free(*s);
    *s = strdup(value);
    return *s ? 0 : MX_ERR_NOMEM;
  }
  case OPT_LIST: {
    mx_strlist *l = field;
    size_t idx = (size_t)(o - options);
    if (!replaced[idx]) {
      list_clear(l);
      replaced[idx] = true;
    }
    if (l->count == MX_CONFIG_MAX_LIST) {
      report(err, "%s: too many values for %s (at most %d)", where, o->name,
             MX_CONFIG_MAX_LIST);
      return MX_ERR_INVALID;
    }
    if (!(l->items[l->count] = strdup(value)))
      return MX_ERR_NOMEM;
    l->count++;
    return 0;
  }
  case OPT_LONG: {
    char *end;
    errno = 0;
    long v = strtol(value, &end, 10);
    if (errno || end == value || *end || v < o->min || v > o->max) {
      report(err, "%s: %s must be an integer from %ld to %ld, not '%s'",
             where, o->name, o->min, o->max, value);
      return MX_ERR_INVALID;
    }
    *(long *)field = v;
    return 0;
  }
  case OPT_BOOL:
    if (parse_bool(value, field) != 0) {
      report(err, "%s: %s must be true or false, not '%s'", where, o->name,
             value);
      return MX_ERR_INVALID;
    }
    return 0;
  }
  return MX_ERR_INVALID;
}

static char *trim(char *s) {
  while (*s == ' ' || *s == '\t')
    s++;
  size_t n = strlen(s);
  while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r' ||
               s[n - 1] == '\n'))
    s[--n] = '\0';
  return s;
}

static int load_file(mx_config *cfg, const char *path, FILE *err) {
  FILE *f = fopen(path, "r");
  if (!f) {
    report(err, "cannot read config file %s: %s", path, strerror(errno));
    return MX_ERR_INVALID;
  }
  bool replaced[NOPTIONS] = {false};
  char line[MX_CONFIG_MAX_LINE];
  unsigned lineno = 0;
  int rv = 0;
  while (rv == 0 && fgets(line, sizeof(line), f)) {
    lineno++;
    char where[256];
    snprintf(where, sizeof(where), "%s:%u", path, lineno);
    if (!strchr(line, '\n') && !feof(f)) {
      report(err, "%s: line too long", where);
      rv = MX_ERR_INVALID;
      break;
    }
    char *s = trim(line);
    if (*s == '\0' || *s == '#')
      continue;
    char *eq = strchr(s, '=');
    if (!eq) {
      report(err, "%s: expected 'key = value'", where);
      rv = MX_ERR_INVALID;
      break;
    }
    *eq = '\0';
    char *key = trim(s), *value = trim(eq + 1);
    /* Accept optional quotes around a value. */
    size_t vl = strlen(value);
    if (vl >= 2 && value[0] == '"' && value[vl - 1] == '"') {
      value[vl - 1] = '\0';
      value++;
    }
    const option_spec *o = find_option(key, strlen(key));
    if (!o || !strcmp(key, "config")) {
      report(err, "%s: unknown key '%s'", where, key);
      rv = MX_ERR_INVALID;
      break;
    }
    rv = set_option(cfg, o, value, replaced, where, err);
  }
  fclose(f);
  return rv;
}

void mx_config_usage(FILE *out) {
  fputs("Usage: mxsse [OPTION]...\n"
        "HTTP/2 Server-Sent-Events sync streams (MSC2108) in front of a "
        "Matrix homeserver.\n\n"
        "  --config FILE                  read KEY = VALUE lines "
        "(keys as below, without --)\n",
        out);
  for (size_t i = 0; i < NOPTIONS; i++) {
    char lhs[64];
    snprintf(lhs, sizeof(lhs), "--%s %s", options[i].name, options[i].arg);
    fprintf(out, "  %-30s %s\n", lhs, options[i].help);
  }
  fputs("  --help                         print this help and exit\n"
        "  --version                      print the version and exit\n\n"
        "Exit status: 0 on clean shutdown, 64 on invalid usage or "
        "configuration, 1 on a runtime failure.\n",
        out);
}

int mx_config_split_hostport(const char *s, char *host, size_t hostlen,
                             unsigned *port) {
  const char *colon;
  const char *hstart = s, *hend;
  if (*s == '[') {
    hend = strchr(s, ']');
    if (!hend || hend[1] != ':')
      return MX_ERR_INVALID;
    hstart = s + 1;
    colon = hend + 1;
  } else {
    colon = strrchr(s, ':');
    if (!colon)
      return MX_ERR_INVALID;
    hend = colon;
    if (memchr(s, ':', (size_t)(colon - s)))
      return MX_ERR_INVALID; /* bare IPv6 needs brackets */
  }
  size_t hl = (size_t)(hend - hstart);
  if (hl >= hostlen)
    return MX_ERR_INVALID;
  memcpy(host, hstart, hl);
  host[hl] = '\0';
  char *end;
  errno = 0;
  long p = strtol(colon + 1, &end, 10);
  if (errno || end == colon + 1 || *end || p < 0 || p > 65535)
    return MX_ERR_INVALID;
  *port = (unsigned)p;
  return 0;
}

static int check_hostports(const mx_strlist *l, const char *name, FILE *err) {
  for (size_t i = 0; i < l->count; i++) {
    char host[256];
    unsigned port;
    if (mx_config_split_hostport(l->items[i], host, sizeof(host), &port)) {
      report(err, "%s: '%s' is not HOST:PORT", name, l->items[i]);
      return MX_ERR_INVALID;
    }
  }
  return 0;
}

static int check_readable(const char *path, const char *name, FILE *err) {
  if (access(path, R_OK) != 0) {
    report(err, "%s: cannot read %s: %s", name, path, strerror(errno));
    return MX_ERR_INVALID;
  }
  return 0;
}

static int validate(mx_config *cfg, FILE *err) {
  if (!cfg->upstream) {
    report(err, "--upstream URL is required");
    return MX_ERR_INVALID;
  }
  if (strncmp(cfg->upstream, "http://", 7) != 0 &&
      strncmp(cfg->upstream, "https://", 8) != 0) {
    report(err, "upstream: '%s' must start with http:// or https://",
           cfg->upstream);
    return MX_ERR_INVALID;
  }
  /* Strip one trailing slash so paths can be appended. */
  size_t ul = strlen(cfg->upstream);
  if (ul > 8 && cfg->upstream[ul - 1] == '/')
    cfg->upstream[ul - 1] = '\0';
  if (cfg->listen.count == 0 && cfg->tls_listen.count == 0) {
    report(err, "no listener: give --listen or --tls-listen");
    return MX_ERR_INVALID;
  }
  if (check_hostports(&cfg->listen, "listen", err) ||
      check_hostports(&cfg->tls_listen, "tls-listen", err))
    return MX_ERR_INVALID;
  if (cfg->admin_listen) {
    mx_strlist one = {.items = {cfg->admin_listen}, .count = 1};
    if (check_hostports(&one, "admin-listen", err))
      return MX_ERR_INVALID;
  }
  if (cfg->tls_listen.count) {
    if (!cfg->cert || !cfg->key) {
      report(err, "tls-listen needs --cert and --key");
      return MX_ERR_INVALID;
    }
    if (check_readable(cfg->cert, "cert", err) ||
        check_readable(cfg->key, "key", err))
      return MX_ERR_INVALID;
  }
  for (size_t i = 0; i < cfg->proxy_prefix.count; i++) {
    if (cfg->proxy_prefix.items[i][0] != '/') {
      report(err, "proxy-prefix: '%s' must start with /",
             cfg->proxy_prefix.items[i]);
      return MX_ERR_INVALID;
    }
  }
  mx_log_level lvl;
  if (cfg->log_level && mx_log_level_parse(cfg->log_level, &lvl)) {
    report(err, "log-level: '%s' is not error, warn, info or debug",
           cfg->log_level);
    return MX_ERR_INVALID;
  }
  if (cfg->heartbeat_min > cfg->heartbeat_max ||
      cfg->heartbeat_default < cfg->heartbeat_min ||
      cfg->heartbeat_default > cfg->heartbeat_max) {
    report(err, "heartbeat: need heartbeat-min <= heartbeat-interval <= "
                "heartbeat-max");
    return MX_ERR_INVALID;
  }
  if (cfg->replication) {
    if (strncmp(cfg->replication, "redis://", 8) != 0) {
      report(err, "replication: '%s' must be redis://[:PASSWORD@]HOST:PORT",
             cfg->replication);
      return MX_ERR_INVALID;
    }
    if (!cfg->server_name) {
      report(err, "replication needs --server-name");
      return MX_ERR_INVALID;
    }
  }
  if (cfg->replay_store && strncmp(cfg->replay_store, "redis://", 8) != 0) {
    report(err, "replay-store: '%s' must be redis://[[USER]:PASSWORD@]"
                "HOST:PORT", cfg->replay_store);
    return MX_ERR_INVALID;
  }
  return 0;
}

int mx_config_load(mx_config *cfg, int argc, char **argv, FILE *out,
                   FILE *err) {
  /* First pass: --help, --version and --config, so the file is read before
   * the flags that override it. */
  const char *config_path = NULL;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      mx_config_usage(out);
      return 1;
    }
    if (!strcmp(a, "--version") || !strcmp(a, "-V")) {
      fprintf(out, "mxsse %s\n", PACKAGE_VERSION);
      return 1;
    }
    if (!strcmp(a, "--config")) {
      if (i + 1 >= argc) {
        report(err, "--config needs a value");
        return MX_ERR_INVALID;
      }
      config_path = argv[++i];
    } else if (!strncmp(a, "--config=", 9)) {
      config_path = a + 9;
    }
  }
  if (config_path) {
    free(cfg->config_file);
    cfg->config_file = strdup(config_path);
    if (!cfg->config_file || load_file(cfg, config_path, err) != 0)
      return MX_ERR_INVALID;
  }

  bool replaced[NOPTIONS] = {false};
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strncmp(a, "--", 2) != 0) {
      report(err, "unexpected argument '%s' (see --help)", a);
      return MX_ERR_INVALID;
    }
    const char *name = a + 2;
    const char *eq = strchr(name, '=');
    size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
    if (nlen == 6 && !strncmp(name, "config", 6)) {
      if (!eq)
        i++;
      continue;
    }
    const option_spec *o = find_option(name, nlen);
    if (!o) {
      report(err, "unknown option '%.*s' (see --help)", (int)(nlen + 2), a);
      return MX_ERR_INVALID;
    }
    const char *value;
    if (eq) {
      value = eq + 1;
    } else if (o->type == OPT_BOOL &&
               (i + 1 >= argc || !strncmp(argv[i + 1], "--", 2))) {
      value = "true"; /* bare boolean flag */
    } else {
      if (i + 1 >= argc) {
        report(err, "--%s needs a value", o->name);
        return MX_ERR_INVALID;
      }
      value = argv[++i];
    }
    char where[80];
    snprintf(where, sizeof(where), "--%s", o->name);
    int rv = set_option(cfg, o, value, replaced, where, err);
    if (rv == MX_ERR_NOMEM)
      report(err, "out of memory");
    if (rv)
      return MX_ERR_INVALID;
  }
  return validate(cfg, err);
}

void mx_config_free(mx_config *cfg) {
  for (size_t i = 0; i < NOPTIONS; i++) {
    void *field = (char *)cfg + options[i].offset;
    if (options[i].type == OPT_STR) {
      free(*(char **)field);
      *(char **)field = NULL;
    } else if (options[i].type == OPT_LIST) {
      list_clear(field);
    }
  }
  free(cfg->config_file);
  cfg->config_file = NULL;
}
