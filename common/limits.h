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

/* Requests the sync adapter makes (homeserver/client_api.c): the path
 * with its query (a client's 8 KiB of parameters plus a percent-encoded
 * position fits; more is answered 414 M_TOO_LARGE) and the Authorization
 * header. */
#define MX_UPSTREAM_MAX_PATH (2 * MX_H1_MAX_REQUEST_LINE)
#define MX_UPSTREAM_MAX_AUTH (8 * 1024)
/* A /sync transfer may take its timeout= plus this long (first syncs of
 * big accounts are slow too) before it is considered dead. */
#define MX_UPSTREAM_SYNC_MARGIN_MS 120000

/* Sync streams */
#define MX_SYNC_MAX_POSITION 4096 /* bytes of a next_batch / Last-Event-ID */
#define MX_SYNC_MIN_LONGPOLL 1.0  /* seconds between long-polls at least */
/* Background wakes (a room-mate's presence, device list or profile; a
 * safety net; a keep-online sync) wait this long (seconds) before their
 * fetch may start: the message row that often follows a presence row by
 * milliseconds then turns them into one urgent wake instead of two
 * fetches. Once one waited MX_SYNC_BACKGROUND_MAX_WAIT (the hub's default
 * background_max_wait), one slot in MX_SYNC_BACKGROUND_SHARE goes to the
 * background queue while urgent wakes queue, so a steady flow of messages
 * cannot starve presence, nor a flood of presence the messages. */
#define MX_SYNC_BACKGROUND_DELAY 0.1
#define MX_SYNC_BACKGROUND_MAX_WAIT 2.0
#define MX_SYNC_BACKGROUND_SHARE 4
#define MX_SSE_MAX_PARAMS 64      /* forwarded /sync/sse query parameters */

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

/* Configuration: entries of a list option (listen addresses...) and the
 * listeners they make. */
#define MX_CONFIG_MAX_LIST 16
#define MX_MAX_LISTENERS (2 * MX_CONFIG_MAX_LIST + 1)

/* The upstream client (homeserver/upstream.c) */
#define MX_UPSTREAM_DEFAULT_MAX_CONNECTIONS 256L /* pooled, default */
#define MX_UPSTREAM_MAX_METHOD 32                /* request method bytes */
#define MX_UPSTREAM_LOG_TARGET_MAX 256           /* target bytes in logs */

/* The proxy: a /versions answer read whole to add our feature flag. */
#define MX_PROXY_VERSIONS_MAX (256 * 1024)

/* SSE: the Matrix error of an `event: error` (errcode + error). The
 * parser's defaults (h2/sse_parse.c, used by clients and tests) fit the
 * largest /sync body we accept. */
#define MX_SSE_ERROR_JSON_MAX (16 * 1024)
#define MX_SSE_PARSE_DEFAULT_MAX_LINE (64 * 1024 * 1024 + 64)
#define MX_SSE_PARSE_DEFAULT_MAX_DATA (64 * 1024 * 1024 + 64)

/* JSON nesting the scanner follows (sync/json_scan.c). */
#define MX_JSON_MAX_DEPTH 256

/* The replay store, defaults (the configuration can change them). */
#define MX_REPLAY_DEFAULT_MAX_BYTES (64 * 1024 * 1024)
#define MX_REPLAY_DEFAULT_MAX_AGE 300.0 /* seconds */

/* Replication commands (sync/repl_proto.c) */
#define MX_REPL_MAX_COMMAND_NAME 32
#define MX_REPL_MAX_BATCH_ROWS 10000 /* rows held per (stream, instance) */
#define MX_REPL_MAX_BATCH_BYTES (16 * 1024 * 1024) /* their bytes */
#define MX_REPL_MAX_POSITIONS 1024 /* (stream, instance) pairs tracked */
#define MX_REPL_MAX_INSTANCE 256   /* bytes in an instance name */
#define MX_REPL_JSON_MAX_DEPTH 64

/* Wake rules (sync/wake.c): a row's bytes, and the users whose last
 * presence state is remembered. */
#define MX_WAKE_MAX_ROW (256 * 1024)
#define MX_WAKE_PRESENCE_CACHE_MAX 500000

/* Room mates (sync/room_mates.c, sync/mates_loader.c) */
#define MX_MAX_USER_ID 255 /* the spec's cap on a user id */
#define MX_ROOM_MATES_MAX_MEMBERSHIPS 2000000
#define MX_MATES_LOADER_CONCURRENCY 4 /* member-list requests at once */
#define MX_MATES_LOADER_ATTEMPTS 4
#define MX_MATES_LOADER_RETRY 2.0      /* seconds, first retry; doubled */
#define MX_MATES_LOADER_RETRY_MAX 60.0 /* seconds */

/* Compressed sync streams (h2/sse_gzip.c), defaults. A context is
 * 2^(window_bits+2) + 2^(mem_level+9) + 5952 bytes: 42.8 KB at 13/3,
 * all resident after a day of traffic; it sent 72% fewer bytes per
 * message than gzipping each /sync response, zlib's own default (15/8,
 * 268 KB) 75% (docs/benchmarks.md, "Compressed streams").
 * The cap bounds the total: 2000 x 43 KB = 86 MB. */
#define MX_SSE_GZIP_DEFAULT_MAX_STREAMS 2000
#define MX_SSE_GZIP_DEFAULT_LEVEL 6
#define MX_SSE_GZIP_DEFAULT_WINDOW_BITS 13
#define MX_SSE_GZIP_DEFAULT_MEM_LEVEL 3

/* Configuration file */
#define MX_CONFIG_MAX_LINE 4096

#endif
