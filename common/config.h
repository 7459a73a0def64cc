/*
 * Configuration: one table of keys, read from a config file
 * ("key = value" lines, '#' comments) and from command-line flags with the
 * same names ("--key VALUE" or "--key=VALUE"). Flags win over the file; a
 * repeatable key given on the command line replaces the file's list.
 * Everything is validated before any port is bound.
 */
#ifndef MX_CONFIG_H
#define MX_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "common/error.h"
#include "common/limits.h"

typedef struct mx_strlist {
  char *items[MX_CONFIG_MAX_LIST]; /* owned */
  size_t count;
} mx_strlist;

typedef struct mx_config {
  /* front */
  mx_strlist listen;         /* cleartext HOST:PORT (HTTP/1.1 + h2c) */
  mx_strlist tls_listen;     /* TLS HOST:PORT (h2 + HTTP/1.1) */
  char *cert, *key;          /* PEM files for the TLS listeners */
  char *admin_listen;        /* HOST:PORT for /healthz, /readyz, /metrics */
  long max_connections;      /* global */
  long max_connections_per_ip;
  long max_concurrent_streams;
  long handshake_timeout;    /* seconds, TLS handshake */
  long header_timeout;       /* seconds, first request head */
  long idle_timeout;         /* seconds without requests or open streams */
  long write_timeout;        /* seconds a write may stall */
  long shutdown_grace;       /* seconds in-flight requests get on SIGTERM */
  mx_strlist trusted_proxy;  /* peers whose X-Forwarded-For is kept */
  mx_strlist proxy_prefix;   /* extra path prefixes proxied upstream */
  char *cors_origin;         /* Access-Control-Allow-Origin value */
  bool access_log;

  /* upstream homeserver */
  char *upstream;            /* base URL, e.g. http://127.0.0.1:8008 */
  long upstream_connect_timeout; /* seconds */
  long upstream_timeout;     /* seconds for a proxied request, 0 = none */
  long upstream_max_connections;

  /* sync streams */
  long heartbeat_default;    /* seconds */
  long heartbeat_min, heartbeat_max;
  long sse_retry_ms;         /* base "retry:" value; jitter is added */
  long longpoll_timeout_ms;  /* timeout= of upstream long-polls */
  long replay_max_bytes;     /* replay buffer budget */
  long replay_max_age;       /* seconds a batch is kept for replay */
  long start_retry_window;   /* seconds a first /sync is retried */

  /* replication */
  char *replication;         /* redis://[:password@]HOST:PORT */
  char *server_name;
  long max_upstream_fetches; /* concurrent /sync fetches */
  long wake_debounce_ms;
  bool longpoll_fallback;

  /* presence relay (docs/presence.md); off without presence_redis */
  char *presence_redis;      /* redis://[USER:PASSWORD@]HOST:PORT, PUBLISH */
  char *presence_instance;   /* NULL: mxsse-<hostname>-<pid> */
  char *presence_replication_url; /* Synapse replication listener */
  char *presence_replication_secret_file;
  long presence_interval;    /* seconds between set_states per user */

  /* compressed sync streams (h2/sse_gzip.c) */
  bool sse_gzip;             /* Content-Encoding: gzip when accepted */
  long sse_gzip_max_streams; /* streams compressing at once */
  long sse_gzip_level;
  long sse_gzip_window_bits;
  long sse_gzip_mem_level;

  /* several nodes behind a balancer (docs/deployment.md) */
  char *replay_store;        /* redis://...: shared replay store */
  char *replay_store_prefix; /* key prefix in it */
  long replay_store_max_batch; /* bytes of one stored batch */
  long replay_store_marker_age; /* seconds "a batch was here" is kept */
  long shutdown_ready_delay; /* seconds /readyz is 503 before closing */
  long shutdown_spread;      /* seconds over which SSE streams end */

  char *log_level;
  char *config_file;

  /* Where the configuration came from, so SIGHUP can read it again the
   * same way (borrowed: main's argv lives as long as the process). */
  int argc;
  char **argv;
} mx_config;

/* What a reload changed: comma-separated key names. */
typedef struct mx_config_changes {
  char applied[512]; /* changed and in effect now */
  char restart[512]; /* changed in the file, kept until a restart */
  size_t napplied, nrestart;
} mx_config_changes;

/* Fills cfg with defaults. */
void mx_config_defaults(mx_config *cfg);

/*
 * Parses argv (and the --config file it names). Returns 0 when the
 * program should run, 1 when it should exit 0 at once (--help, --version,
 * --check-config on a valid configuration, and the hidden --print-man 5|8
 * and --print-config that the build uses to generate the manual pages and
 * the shipped configuration file), or MX_ERR_INVALID after printing a
 * one-line error to err (exit 64). argv is kept (borrowed) for a reload.
 */
int mx_config_load(mx_config *cfg, int argc, char **argv, FILE *out,
                   FILE *err) MX_MUST_CHECK;

/* Prints the usage text (every key, its default and meaning). */
void mx_config_usage(FILE *out);

/*
 * Reads the configuration again from the same file and flags, and applies
 * to cfg the keys that can change at run time (the log level, limits,
 * timeouts, heartbeat bounds, certificate paths...). Keys that only a
 * restart can change (listeners, upstream, replication...) keep their
 * running value. Logs one line per changed key and a summary; fills
 * changes when not NULL. Returns 0, or MX_ERR_INVALID when the new
 * configuration is invalid (logged; cfg is left as it was).
 */
int mx_config_reload(mx_config *cfg, mx_config_changes *changes);

/* Whether a key (without --) is applied by a reload; false for unknown
 * keys and for keys that need a restart. */
bool mx_config_reloadable(const char *key);

/* Writes the manual page mxsse(8) (section 8) or mxsse.conf(5) (section
 * 5) in roff, from the same table as --help. */
void mx_config_print_man(FILE *out, int section);

/* Writes the shipped configuration file: every key, commented. */
void mx_config_print_file(FILE *out);

/* Releases every string the configuration owns. */
void mx_config_free(mx_config *cfg);

/*
 * Splits "HOST:PORT", "[V6]:PORT" or ":PORT" into host (NUL-terminated, ""
 * for any address) and port. Returns 0 or MX_ERR_INVALID.
 */
int mx_config_split_hostport(const char *s, char *host, size_t hostlen,
                             unsigned *port) MX_MUST_CHECK;

#endif
