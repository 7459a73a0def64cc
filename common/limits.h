/*
 * Every cap on memory a peer (client, homeserver, Redis) can make mxsse
 * spend lives here, so the whole budget can be read in one place. Values
 * marked "default" can be changed in the configuration.
 */
#ifndef MX_LIMITS_H
#define MX_LIMITS_H

/* HTTP/1.1 request head */
#define MX_H1_MAX_REQUEST_LINE (8 * 1024)  /* method + target + version */
#define MX_H1_MAX_HEADER_BYTES (32 * 1024) /* all header names + values */
#define MX_H1_MAX_HEADERS 100              /* header field count */

/* HTTP/2 */
#define MX_H2_DEFAULT_MAX_STREAMS 100     /* SETTINGS_MAX_CONCURRENT_STREAMS */
#define MX_H2_MAX_HEADER_LIST (64 * 1024) /* decoded header list per request */
#define MX_H2_MAX_CONTINUATIONS 8
#define MX_H2_MAX_SETTINGS 32             /* entries per SETTINGS frame */
#define MX_H2_MAX_OUTBOUND_ACK 1000
#define MX_H2_RESET_BURST 1000            /* RST_STREAM token bucket */
#define MX_H2_RESET_RATE 33               /* tokens per second */
#define MX_H2_WINDOW (256 * 1024)         /* per-stream receive window */

/* Per-connection output: reading from the peer stops above the high mark. */
#define MX_CONN_WRITE_HIGH (256 * 1024)
#define MX_CONN_READ_CHUNK (16 * 1024)

/* Per-exchange response body queue: the producer (upstream, sync adapter)
 * is paused above the high mark and resumed below the low mark. */
#define MX_BODYQ_HIGH (256 * 1024)
#define MX_BODYQ_LOW (64 * 1024)

/* Request bodies buffered ahead of the upstream (the upstream read pauses
 * the client above this). */
#define MX_REQBODY_HIGH (256 * 1024)
#define MX_REQBODY_LOW (64 * 1024)

/* Upstream responses read into memory (JSON we must inspect). */
#define MX_UPSTREAM_MAX_JSON (64 * 1024 * 1024)
#define MX_UPSTREAM_MAX_HEADER (16 * 1024)

/* Lingering close (h2/conn.c): after the last response, read and drop
 * what the peer still sends until it closes, so that closing does not
 * reset the connection and destroy that response in flight. */
#define MX_CONN_LINGER 2.0                 /* seconds */
#define MX_CONN_LINGER_BYTES (256 * 1024)  /* read before giving up */
#define MX_CONN_LINGER_MAX 1024            /* sockets lingering at once */

/* Connections (defaults) */
#define MX_DEFAULT_MAX_CONNECTIONS 10000
#define MX_DEFAULT_MAX_CONN_PER_IP 256

/* TLS handshakes in progress at once: past this the TLS listeners stop
 * accepting (clients wait in the kernel's backlog) until one finishes.
 * A handshake holds its record buffers and key exchange state; a connect
 * storm of thousands at once would otherwise hold them all at the same
 * time (docs/benchmarks.md, "What one node holds"). */
#define MX_TLS_MAX_HANDSHAKES 64

/* Replication: rows about users with no stream here wake everyone at
 * most this often (seconds). */
#define MX_REPL_UNRESOLVED_WAKE_INTERVAL 1.0

/* Redis replication lines */
#define MX_REPL_MAX_LINE (4 * 1024 * 1024)

/* Configuration file */
#define MX_CONFIG_MAX_LINE 4096

#endif
