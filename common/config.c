/*
 * Options, the configuration file, --help, the manual pages and reload.
 * One file on purpose (~1100 lines): all of them read the one option
 * table below, which is what keeps them from drifting apart.
 */
#include "common/config.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

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
  unsigned flags;      /* R: a reload applies it */
  const char *dflt;    /* the default as shown, when not the struct's */
  const char *shipped; /* value set in the shipped configuration file */
} option_spec;

#define R 1u

#define F(field) offsetof(mx_config, field)

static const option_spec options[] = {
    {"upstream", OPT_STR, F(upstream), 0, 0, "URL",
     "homeserver base URL (http://HOST:PORT)", 0, "none (required)",
     "http://127.0.0.1:8008"},
    {"listen", OPT_LIST, F(listen), 0, 0, "HOST:PORT",
     "cleartext listener: HTTP/1.1 and h2c (repeatable)", 0, "none",
     "127.0.0.1:8080"},
    {"tls-listen", OPT_LIST, F(tls_listen), 0, 0, "HOST:PORT",
     "TLS listener: ALPN h2 and http/1.1 (repeatable)", 0, "none", NULL},
    {"cert", OPT_STR, F(cert), 0, 0, "FILE", "TLS certificate chain (PEM)", R,
     "none", NULL},
    {"key", OPT_STR, F(key), 0, 0, "FILE", "TLS private key (PEM)", R, "none",
     NULL},
    {"admin-listen", OPT_STR, F(admin_listen), 0, 0, "HOST:PORT",
     "admin listener: /healthz /readyz /metrics", 0, "none", "127.0.0.1:9090"},
    {"log-level", OPT_STR, F(log_level), 0, 0, "LEVEL",
     "error, warn, info or debug", R, "info", NULL},
    {"access-log", OPT_BOOL, F(access_log), 0, 0, "BOOL",
     "log one line per request", R},
    {"max-connections", OPT_LONG, F(max_connections), 1, 1000000, "N",
     "connections at once, all clients", R},
    {"max-connections-per-ip", OPT_LONG, F(max_connections_per_ip), 1,
     1000000, "N", "connections at once from one address", R},
    {"max-concurrent-streams", OPT_LONG, F(max_concurrent_streams), 1, 10000,
     "N", "HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS", R},
    {"handshake-timeout", OPT_LONG, F(handshake_timeout), 1, 3600, "SECONDS",
     "TLS handshake deadline", R},
    {"header-timeout", OPT_LONG, F(header_timeout), 1, 3600, "SECONDS",
     "deadline for a request head", R},
    {"idle-timeout", OPT_LONG, F(idle_timeout), 1, 86400, "SECONDS",
     "close connections with no request and no open stream", R},
    {"write-timeout", OPT_LONG, F(write_timeout), 1, 3600, "SECONDS",
     "close connections whose writes stall, and cut SSE streams whose "
     "event is not taken, this long", R},
    {"shutdown-grace", OPT_LONG, F(shutdown_grace), 0, 3600, "SECONDS",
     "time in-flight requests get after SIGTERM", R},
    {"trusted-proxy", OPT_LIST, F(trusted_proxy), 0, 0, "ADDR",
     "peer address whose X-Forwarded-For is kept (repeatable)", R, "none",
     NULL},
    {"proxy-prefix", OPT_LIST, F(proxy_prefix), 0, 0, "PATH",
     "extra path prefix proxied upstream, e.g. /_synapse/admin (repeatable)",
     R, "none", NULL},
    {"cors-origin", OPT_STR, F(cors_origin), 0, 0, "ORIGIN",
     "Access-Control-Allow-Origin for browsers", R, "*", NULL},
    {"upstream-connect-timeout", OPT_LONG, F(upstream_connect_timeout), 1,
     600, "SECONDS", "homeserver connect deadline"},
    {"upstream-timeout", OPT_LONG, F(upstream_timeout), 0, 86400, "SECONDS",
     "deadline for a proxied request (0: none)", R},
    {"upstream-max-connections", OPT_LONG, F(upstream_max_connections), 1,
     100000, "N", "pooled connections to the homeserver"},
    {"heartbeat-interval", OPT_LONG, F(heartbeat_default), 1, 3600,
     "SECONDS", "SSE heartbeat when the client names none", R},
    {"heartbeat-min", OPT_LONG, F(heartbeat_min), 1, 3600, "SECONDS",
     "smallest heartbeat_interval a client may ask for", R},
    {"heartbeat-max", OPT_LONG, F(heartbeat_max), 1, 86400, "SECONDS",
     "largest heartbeat_interval a client may ask for", R},
    {"sse-retry", OPT_LONG, F(sse_retry_ms), 0, 3600000, "MS",
     "base SSE retry: value (per-connection jitter is added)", R},
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
     "homeserver replication feed: redis://[:PASSWORD@]HOST:PORT", 0,
     "none (long-polling only)", NULL},
    {"server-name", OPT_STR, F(server_name), 0, 0, "NAME",
     "homeserver server_name (the replication channel)", 0, "none", NULL},
    {"max-upstream-fetches", OPT_LONG, F(max_upstream_fetches), 1, 100000,
     "N", "concurrent /sync fetches woken by replication"},
    {"wake-debounce", OPT_LONG, F(wake_debounce_ms), 0, 10000, "MS",
     "wait this long after a wake for more (0: wakes read together)"},
    {"longpoll-fallback", OPT_BOOL, F(longpoll_fallback), 0, 0, "BOOL",
     "long-poll while the replication feed is down"},
    {"presence-redis", OPT_STR, F(presence_redis), 0, 0, "URL",
     "relay presence like a Synapse worker: PUBLISH USER_SYNC with this "
     "redis://[USER:PASSWORD@]HOST:PORT account (default: off)"},
    {"presence-instance", OPT_STR, F(presence_instance), 0, 0, "NAME",
     "instance id on USER_SYNC lines, unique per node "
     "(default: mxsse-HOSTNAME-PID)"},
    {"presence-replication-url", OPT_STR, F(presence_replication_url), 0, 0,
     "URL", "Synapse listener with the replication resource, for "
            "presence_set_state (default: a keepalive /sync per user)"},
    {"presence-replication-secret-file", OPT_STR,
     F(presence_replication_secret_file), 0, 0, "FILE",
     "file holding Synapse's worker_replication_secret"},
    {"presence-interval", OPT_LONG, F(presence_interval), 5, 55, "SECONDS",
     "set_state (or keepalive /sync) per user this often"},
    {"sse-gzip", OPT_BOOL, F(sse_gzip), 0, 0, "BOOL",
     "gzip sync streams for clients that accept it", R},
    {"sse-gzip-max-streams", OPT_LONG, F(sse_gzip_max_streams), 0, 10000000,
     "N", "streams compressing at once; more are sent uncompressed", R},
    {"sse-gzip-level", OPT_LONG, F(sse_gzip_level), 1, 9, "N",
     "zlib compression level of sync streams", R},
    {"sse-gzip-window-bits", OPT_LONG, F(sse_gzip_window_bits), 9, 15, "N",
     "deflate window of a sync stream: 2^N bytes", R},
    {"sse-gzip-mem-level", OPT_LONG, F(sse_gzip_mem_level), 1, 9, "N",
     "zlib memLevel of a sync stream's compressor", R},
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
  cfg->max_upstream_fetches = 16; /* docs/benchmarks.md */
  cfg->wake_debounce_ms = 0; /* docs/benchmarks.md, "Where delivery time goes" */
  cfg->longpoll_fallback = true;
  cfg->presence_interval = 45; /* Synapse: currently active for 60 s */
  cfg->sse_gzip = true;
  cfg->sse_gzip_max_streams = MX_SSE_GZIP_DEFAULT_MAX_STREAMS;
  cfg->sse_gzip_level = MX_SSE_GZIP_DEFAULT_LEVEL;
  cfg->sse_gzip_window_bits = MX_SSE_GZIP_DEFAULT_WINDOW_BITS;
  cfg->sse_gzip_mem_level = MX_SSE_GZIP_DEFAULT_MEM_LEVEL;
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

/* Said once, in --help and in the manual page. */
static const char summary[] = "HTTP/2 Server-Sent-Events sync streams "
                              "(MSC2108) in front of a Matrix homeserver.";
static const char exit_status[] =
    "Exit status: 0 on clean shutdown, 64 on invalid usage or "
    "configuration, 1 on a runtime failure.";

/* Options that are not configuration keys, as --help lists them. */
static const struct {
  const char *lhs, *help;
} commands[] = {
    {"--config FILE", "read KEY = VALUE lines (keys as below, without --)"},
    {"--check-config [FILE]",
     "validate the configuration (FILE: as --config) and exit 0 or 64"},
    {"--help", "print this help and exit"},
    {"--version", "print the version and exit"},
};
#define NCOMMANDS (sizeof(commands) / sizeof(commands[0]))

void mx_config_usage(FILE *out) {
  fprintf(out, "Usage: mxsse [OPTION]...\n%s\n\n", summary);
  fprintf(out, "  %-30s %s\n", commands[0].lhs, commands[0].help);
  for (size_t i = 0; i < NOPTIONS; i++) {
    char lhs[64];
    snprintf(lhs, sizeof(lhs), "--%s %s", options[i].name, options[i].arg);
    fprintf(out, "  %-30s %s\n", lhs, options[i].help);
  }
  for (size_t i = 1; i < NCOMMANDS; i++)
    fprintf(out, "  %-30s %s\n", commands[i].lhs, commands[i].help);
  fprintf(out, "\n%s\n", exit_status);
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

/* The presence relay's options need each other and the replication feed
 * (its REPLICATE lines and echoes). */
static int validate_presence(const mx_config *cfg, FILE *err) {
  if (!cfg->presence_redis) {
    if (cfg->presence_instance || cfg->presence_replication_url ||
        cfg->presence_replication_secret_file) {
      report(err, "presence options need --presence-redis");
      return MX_ERR_INVALID;
    }
    return 0;
  }
  if (strncmp(cfg->presence_redis, "redis://", 8) != 0) {
    /* Never echo the URL: it may hold a password. */
    report(err, "presence-redis: must be redis://[USER:PASSWORD@]HOST:PORT");
    return MX_ERR_INVALID;
  }
  if (!cfg->replication) {
    report(err, "presence-redis needs --replication and --server-name");
    return MX_ERR_INVALID;
  }
  if (cfg->presence_instance) {
    size_t n = strlen(cfg->presence_instance);
    bool ok = n > 0 && n <= 64;
    for (size_t i = 0; ok && i < n; i++)
      ok = cfg->presence_instance[i] > ' ' && cfg->presence_instance[i] < 0x7f;
    if (!ok) {
      report(err, "presence-instance: 1-64 printable ASCII bytes, no space");
      return MX_ERR_INVALID;
    }
  }
  if (cfg->presence_replication_url &&
      strncmp(cfg->presence_replication_url, "http://", 7) != 0 &&
      strncmp(cfg->presence_replication_url, "https://", 8) != 0) {
    report(err, "presence-replication-url: '%s' must start with http://",
           cfg->presence_replication_url);
    return MX_ERR_INVALID;
  }
  if (cfg->presence_replication_secret_file) {
    if (!cfg->presence_replication_url) {
      report(err, "presence-replication-secret-file needs "
                  "--presence-replication-url");
      return MX_ERR_INVALID;
    }
    if (check_readable(cfg->presence_replication_secret_file,
                       "presence-replication-secret-file", err))
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
    /* The value is not echoed: it may hold a password. */
    report(err, "replay-store: must be redis://[[USER]:PASSWORD@]HOST:PORT");
    return MX_ERR_INVALID;
  }
  return validate_presence(cfg, err);
}

/* --check-config goes as far as starting would: the certificate and key
 * must load and match, as h2/tls.c will require. */
static int check_tls_files(const mx_config *cfg, FILE *err) {
  if (!cfg->tls_listen.count)
    return 0;
  SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
  const char *what = NULL, *file = NULL;
  if (!ctx)
    what = "cannot create a TLS context";
  else if (SSL_CTX_use_certificate_chain_file(ctx, cfg->cert) != 1)
    what = "cannot load certificate", file = cfg->cert;
  else if (SSL_CTX_use_PrivateKey_file(ctx, cfg->key, SSL_FILETYPE_PEM) != 1)
    what = "cannot load key", file = cfg->key;
  else if (SSL_CTX_check_private_key(ctx) != 1)
    what = "key does not match certificate", file = cfg->key;
  if (what) {
    char detail[256] = "";
    unsigned long e = ERR_get_error();
    if (e)
      ERR_error_string_n(e, detail, sizeof(detail));
    report(err, "%s %s: %s", what, file ? file : "", detail);
  }
  ERR_clear_error();
  SSL_CTX_free(ctx);
  return what ? MX_ERR_INVALID : 0;
}

int mx_config_load(mx_config *cfg, int argc, char **argv, FILE *out,
                   FILE *err) {
  /* First pass: the commands and --config, so the file is read before
   * the flags that override it. */
  const char *config_path = NULL;
  bool check = false;
  cfg->argc = argc;
  cfg->argv = argv;
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
    if (!strcmp(a, "--print-man") || !strncmp(a, "--print-man=", 12)) {
      const char *sec = a[11] == '=' ? a + 12 : i + 1 < argc ? argv[++i] : "";
      if (strcmp(sec, "5") != 0 && strcmp(sec, "8") != 0) {
        report(err, "--print-man needs 5 or 8");
        return MX_ERR_INVALID;
      }
      mx_config_print_man(out, sec[0] - '0');
      return 1;
    }
    if (!strcmp(a, "--print-config")) {
      mx_config_print_file(out);
      return 1;
    }
    if (!strcmp(a, "--check-config")) {
      check = true;
      if (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0)
        config_path = argv[++i];
    } else if (!strncmp(a, "--check-config=", 15)) {
      check = true;
      config_path = a + 15;
    } else if (!strcmp(a, "--config")) {
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
    if (nlen == 12 && !strncmp(name, "check-config", 12)) {
      if (!eq && i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0)
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
  int rv = validate(cfg, err);
  if (rv == 0 && check)
    rv = check_tls_files(cfg, err);
  if (rv == 0 && check) {
    fprintf(out, "mxsse: configuration %s%sis valid\n",
            cfg->config_file ? cfg->config_file : "",
            cfg->config_file ? " " : "");
    return 1;
  }
  return rv;
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

/* --- reload ------------------------------------------------------------- */

static bool same_value(const option_spec *o, const mx_config *a,
                       const mx_config *b) {
  const void *fa = (const char *)a + o->offset;
  const void *fb = (const char *)b + o->offset;
  switch (o->type) {
  case OPT_STR: {
    const char *sa = *(char *const *)fa, *sb = *(char *const *)fb;
    return sa == sb || (sa && sb && !strcmp(sa, sb));
  }
  case OPT_LIST: {
    const mx_strlist *la = fa, *lb = fb;
    if (la->count != lb->count)
      return false;
    for (size_t i = 0; i < la->count; i++)
      if (strcmp(la->items[i], lb->items[i]) != 0)
        return false;
    return true;
  }
  case OPT_LONG:
    return *(const long *)fa == *(const long *)fb;
  case OPT_BOOL:
    return *(const bool *)fa == *(const bool *)fb;
  }
  return true;
}

static size_t field_size(const option_spec *o) {
  switch (o->type) {
  case OPT_STR:
    return sizeof(char *);
  case OPT_LIST:
    return sizeof(mx_strlist);
  case OPT_LONG:
    return sizeof(long);
  case OPT_BOOL:
    return sizeof(bool);
  }
  return 0;
}

/* Exchanges one key's value between two configurations (ownership of its
 * strings moves with it). */
static void swap_value(const option_spec *o, mx_config *a, mx_config *b) {
  unsigned char tmp[sizeof(mx_strlist)];
  size_t n = field_size(o);
  char *fa = (char *)a + o->offset, *fb = (char *)b + o->offset;
  memcpy(tmp, fa, n);
  memcpy(fa, fb, n);
  memcpy(fb, tmp, n);
}

/* A value fit for a log line: numbers, booleans and the log level only
 * (paths and URLs may hold secrets, such as the Redis password). */
static bool format_loggable(const option_spec *o, const mx_config *c,
                            char *buf, size_t n) {
  const void *f = (const char *)c + o->offset;
  if (o->type == OPT_LONG)
    snprintf(buf, n, "%ld", *(const long *)f);
  else if (o->type == OPT_BOOL)
    snprintf(buf, n, "%s", *(const bool *)f ? "true" : "false");
  else if (o->offset == offsetof(mx_config, log_level))
    snprintf(buf, n, "%s", c->log_level ? c->log_level : o->dflt);
  else
    return false;
  return true;
}

static void append_key(char *list, size_t size, const char *key) {
  size_t used = strlen(list);
  snprintf(list + used, size - used, "%s%s", used ? "," : "", key);
}

/* One line for a log field: newlines and double quotes replaced. */
static void flatten(char *s) {
  size_t n = strlen(s);
  while (n && s[n - 1] == '\n')
    s[--n] = '\0';
  for (; *s; s++)
    if (*s == '\n')
      *s = ' ';
    else if (*s == '"')
      *s = '\'';
}

bool mx_config_reloadable(const char *key) {
  const option_spec *o = find_option(key, strlen(key));
  return o && (o->flags & R);
}

int mx_config_reload(mx_config *cfg, mx_config_changes *changes) {
  mx_config_changes local;
  if (!changes)
    changes = &local;
  memset(changes, 0, sizeof(*changes));

  mx_config next;
  mx_config_defaults(&next);
  char *msg = NULL;
  size_t msglen = 0;
  FILE *err = open_memstream(&msg, &msglen);
  int rv = MX_ERR_NOMEM;
  if (err) {
    rv = mx_config_load(&next, cfg->argc, cfg->argv, err, err);
    fclose(err);
  }
  if (rv != 0) {
    if (msg)
      flatten(msg);
    MX_LOG_ERR("config.reload_failed",
               "file=%s error=\"%s\" kept=\"the running configuration\"",
               cfg->config_file ? cfg->config_file : "-",
               msg && *msg ? msg : "out of memory");
    free(msg);
    mx_config_free(&next);
    return MX_ERR_INVALID;
  }
  free(msg);

  for (size_t i = 0; i < NOPTIONS; i++) {
    const option_spec *o = &options[i];
    if (same_value(o, cfg, &next))
      continue;
    char from[64], to[64];
    bool shown = format_loggable(o, cfg, from, sizeof(from)) &&
                 format_loggable(o, &next, to, sizeof(to));
    if (o->flags & R) {
      swap_value(o, cfg, &next);
      append_key(changes->applied, sizeof(changes->applied), o->name);
      changes->napplied++;
      if (shown)
        MX_LOG_INFO("config.changed", "key=%s from=%s to=%s", o->name, from,
                    to);
      else
        MX_LOG_INFO("config.changed", "key=%s", o->name);
    } else {
      append_key(changes->restart, sizeof(changes->restart), o->name);
      changes->nrestart++;
      MX_LOG_WARN("config.needs_restart", "key=%s%s%s%s%s", o->name,
                  shown ? " running=" : "", shown ? from : "",
                  shown ? " file=" : "", shown ? to : "");
    }
  }
  mx_config_free(&next);

  mx_log_level level = MX_LOG_INFO;
  if (cfg->log_level)
    mx_log_level_parse(cfg->log_level, &level);
  mx_log_set_level(level);
  MX_LOG_INFO("config.reloaded",
              "file=%s applied=%zu needs_restart=%zu applied_keys=\"%s\" "
              "restart_keys=\"%s\"",
              cfg->config_file ? cfg->config_file : "-", changes->napplied,
              changes->nrestart, changes->applied, changes->restart);
  return 0;
}

/* --- generated documents ------------------------------------------------ */

static void format_default(const option_spec *o, char *buf, size_t n) {
  if (o->dflt) {
    snprintf(buf, n, "%s", o->dflt);
    return;
  }
  mx_config d;
  mx_config_defaults(&d);
  const void *f = (const char *)&d + o->offset;
  switch (o->type) {
  case OPT_LONG:
    snprintf(buf, n, "%ld", *(const long *)f);
    break;
  case OPT_BOOL:
    snprintf(buf, n, "%s", *(const bool *)f ? "true" : "false");
    break;
  default:
    snprintf(buf, n, "none");
  }
}

/* Text for roff: backslashes and minus signs escaped, no line starting
 * with a control character. */
static void roff(FILE *out, const char *s) {
  if (*s == '.' || *s == '\'')
    fputs("\\&", out);
  for (; *s; s++) {
    if (*s == '\\')
      fputs("\\e", out);
    else if (*s == '-')
      fputs("\\-", out);
    else
      fputc(*s, out);
  }
}

static const char reload_note[] = "A reload (SIGHUP) applies a change.";
static const char restart_note[] = "A change takes effect on restart.";

/* One .TP entry per key: "--name ARG" (section 8) or "name = ARG" (5). */
static void man_keys(FILE *out, bool as_flags) {
  for (size_t i = 0; i < NOPTIONS; i++) {
    const option_spec *o = &options[i];
    char def[64];
    format_default(o, def, sizeof(def));
    fputs(".TP\n.BI \"", out);
    if (as_flags)
      fputs("\\-\\-", out);
    roff(out, o->name);
    fputs(as_flags ? " \" " : " = \" ", out);
    roff(out, o->arg);
    fputs("\n", out);
    roff(out, o->help);
    fputs(".\n.br\nDefault: ", out);
    roff(out, def);
    fputs(". ", out);
    fputs(o->flags & R ? reload_note : restart_note, out);
    fputs("\n", out);
  }
}

static void man_page_8(FILE *out) {
  fputs(".SH NAME\nmxsse \\- ", out);
  roff(out, summary);
  fputs("\n.SH SYNOPSIS\n.B mxsse\n[\\fIOPTION\\fR]...\n.br\n"
        ".B mxsse \\-\\-check\\-config\n[\\fIFILE\\fR] [\\fIOPTION\\fR]...\n"
        ".SH DESCRIPTION\n"
        ".B mxsse\nserves the Server-Sent-Events sync endpoint of MSC2108,\n"
        ".BR \"GET /_matrix/client/v3/sync/sse\" ,\n"
        "over HTTP/2 and HTTP/1.1, in front of a Matrix homeserver, and\n"
        "proxies every other Matrix request to the homeserver. With\n"
        ".B \\-\\-replication\nit listens to the homeserver's Redis\n"
        "replication feed and fetches a batch only when a user has news;\n"
        "without it, each stream long-polls the homeserver.\n"
        ".PP\nEvery option can also be given as a line of the\n"
        ".B \\-\\-config\nfile (see\n.BR mxsse.conf (5));\n"
        "options on the command line win over the file.\n"
        "The configuration is validated before any port is bound.\n"
        ".SH OPTIONS\n",
        out);
  for (size_t i = 0; i < NCOMMANDS; i++) {
    const char *lhs = commands[i].lhs;
    const char *sp = strchr(lhs, ' ');
    size_t n = sp ? (size_t)(sp - lhs) : strlen(lhs);
    char flag[32];
    snprintf(flag, sizeof(flag), "%.*s", (int)n, lhs);
    fputs(".TP\n.BI \"", out);
    roff(out, flag);
    fputs(sp ? " \" " : "\"", out);
    if (sp)
      roff(out, sp + 1);
    fputs("\n", out);
    roff(out, commands[i].help);
    fputs(".\n", out);
  }
  man_keys(out, true);
  fputs(".SH SIGNALS\n"
        ".TP\n.B SIGHUP\n"
        "Reload: read the configuration file and the command line again,\n"
        "apply the keys marked above as applied by a reload (the\n"
        "certificate and key are read again too) and keep every\n"
        "connection and stream open. Each changed key is logged\n"
        "(\\fBconfig.changed\\fR, or \\fBconfig.needs_restart\\fR for a key\n"
        "that only a restart applies), then a summary\n"
        "(\\fBconfig.reloaded\\fR). An invalid configuration is logged\n"
        "(\\fBconfig.reload_failed\\fR) and the running one kept.\n"
        ".TP\n.BR SIGTERM \", \" SIGINT\n"
        "Graceful shutdown: listeners close, connections get the\n"
        ".B \\-\\-shutdown\\-grace\nto finish, then the process exits 0.\n"
        ".SH SYSTEMD\n"
        "Under systemd (\\fBType=notify\\fR, \\fBNOTIFY_SOCKET\\fR set)\n"
        ".B mxsse\nsends READY=1 once its listeners are bound and, with\n"
        ".BR \\-\\-replication ,\nthe feed is connected; RELOADING=1 and\n"
        "READY=1 around a reload; STOPPING=1 on SIGTERM; and, when\n"
        ".B WatchdogSec\nis set, WATCHDOG=1 at half that interval from its\n"
        "event loop.\n"
        ".SH FILES\n.TP\n.I /etc/mxsse/mxsse.conf\n"
        "The configuration file of the packaged service.\n"
        ".TP\n.I mxsse.service\n"
        "The systemd unit: runs \\fBmxsse \\-\\-config "
        "/etc/mxsse/mxsse.conf\\fR as the user \\fBmxsse\\fR.\n"
        ".SH EXIT STATUS\n",
        out);
  roff(out, exit_status);
  fputs("\n.SH SEE ALSO\n.BR mxsse.conf (5),\n.BR systemctl (1),\n"
        ".BR systemd.service (5)\n",
        out);
}

static void man_page_5(FILE *out) {
  fputs(".SH NAME\nmxsse.conf \\- configuration file of mxsse\n"
        ".SH SYNOPSIS\n.I /etc/mxsse/mxsse.conf\n"
        ".SH DESCRIPTION\n"
        "The file named by\n.B mxsse \\-\\-config\n"
        "holds one\n.I key\n.B =\n.I value\n"
        "per line. Blank lines and lines starting with\n.B #\n"
        "are ignored; spaces around the key and the value are dropped, and\n"
        "double quotes around a value are removed. The keys are the long\n"
        "options of\n.BR mxsse (8)\nwithout the leading dashes; a key marked\n"
        "repeatable may appear on several lines, and an option given on the\n"
        "command line replaces the file's value (or list). An unknown key or\n"
        "an invalid value is an error that names the file and line.\n"
        ".PP\nCheck a file before using it:\n"
        ".B mxsse \\-\\-check\\-config\n.IR FILE .\n"
        "A reload (SIGHUP, \\fBsystemctl reload mxsse\\fR) applies the keys\n"
        "marked so below without dropping connections and logs the\n"
        "others, which need a restart.\n"
        ".SH KEYS\n",
        out);
  man_keys(out, false);
  fputs(".SH EXAMPLE\n.nf\n", out);
  for (size_t i = 0; i < NOPTIONS; i++)
    if (options[i].shipped) {
      roff(out, options[i].name);
      fputs(" = ", out);
      roff(out, options[i].shipped);
      fputs("\n", out);
    }
  fputs("tls\\-listen = 0.0.0.0:8443\n"
        "cert = /etc/mxsse/fullchain.pem\n"
        "key = /etc/mxsse/privkey.pem\n"
        "heartbeat\\-max = 600\n.fi\n"
        ".SH SEE ALSO\n.BR mxsse (8)\n",
        out);
}

void mx_config_print_man(FILE *out, int section) {
  fprintf(out,
          ".\\\" Generated by mxsse --print-man %d from the option table "
          "in common/config.c.\n"
          ".TH %s %d \"\" \"mxsse %s\" \"%s\"\n",
          section, section == 5 ? "MXSSE.CONF" : "MXSSE", section,
          PACKAGE_VERSION,
          section == 5 ? "File Formats" : "System Administration");
  if (section == 5)
    man_page_5(out);
  else
    man_page_8(out);
}

/* A comment paragraph, wrapped at 76 columns. */
static void comment(FILE *out, const char *text) {
  size_t col = 0;
  while (*text) {
    size_t w = strcspn(text, " ");
    if (col && col + 1 + w > 76) {
      fputc('\n', out);
      col = 0;
    }
    if (!col) {
      fputs("#", out);
      col = 1;
    }
    fprintf(out, " %.*s", (int)w, text);
    col += 1 + w;
    text += w;
    while (*text == ' ')
      text++;
  }
  if (col)
    fputc('\n', out);
}

void mx_config_print_file(FILE *out) {
  fprintf(out, "# mxsse.conf: configuration of mxsse %s (mxsse.conf(5)).\n",
          PACKAGE_VERSION);
  comment(out, "One \"key = value\" per line; the keys are mxsse's options "
               "without the leading \"--\" (mxsse --help). A key commented "
               "out here has the default it shows; a repeatable key may "
               "appear on several lines.");
  fputs("#\n", out);
  comment(out, "After a change, check the file with "
               "\"mxsse --check-config /etc/mxsse/mxsse.conf\", then "
               "\"systemctl reload mxsse\" for the keys marked \"reload\" or "
               "\"systemctl restart mxsse\" for the others.");
  for (size_t i = 0; i < NOPTIONS; i++) {
    const option_spec *o = &options[i];
    char def[64], text[512];
    format_default(o, def, sizeof(def));
    snprintf(text, sizeof(text), "%s. Default: %s. %s", o->help, def,
             o->flags & R ? "Applied by a reload." : "Needs a restart.");
    fputc('\n', out);
    comment(out, text);
    if (o->shipped)
      fprintf(out, "%s = %s\n", o->name, o->shipped);
    else if (!strncmp(def, "none", 4))
      fprintf(out, "#%s = %s\n", o->name, o->arg);
    else
      fprintf(out, "#%s = %s\n", o->name, def);
  }
}
