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

  /* several nodes behind a balancer (docs/deployment.md) */
  char *replay_store;        /* redis://...: shared replay store */
  char *replay_store_prefix; /* key prefix in it */
  long replay_store_max_batch; /* bytes of one stored batch */
  long replay_store_marker_age; /* seconds "a batch was here" is kept */
  long shutdown_ready_delay; /* seconds /readyz is 503 before closing */
  long shutdown_spread;      /* seconds over which SSE streams end */

  char *log_level;
  char *config_file;
} mx_config;

/* Fills cfg with defaults. */
void mx_config_defaults(mx_config *cfg);

/*
 * Parses argv (and the --config file it names). Returns 0 when the
 * program should run, 1 when --help or --version was printed (exit 0), or
 * MX_ERR_INVALID after printing a one-line error to err (exit 64).
 */
int mx_config_load(mx_config *cfg, int argc, char **argv, FILE *out,
                   FILE *err) MX_MUST_CHECK;

/* Prints the usage text (every key, its default and meaning). */
void mx_config_usage(FILE *out);

/* Releases every string the configuration owns. */
void mx_config_free(mx_config *cfg);

/*
 * Splits "HOST:PORT", "[V6]:PORT" or ":PORT" into host (NUL-terminated, ""
 * for any address) and port. Returns 0 or MX_ERR_INVALID.
 */
int mx_config_split_hostport(const char *s, char *host, size_t hostlen,
                             unsigned *port) MX_MUST_CHECK;

#endif
