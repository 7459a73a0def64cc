/*
 * Process-wide metrics, rendered in the Prometheus text format by the
 * admin listener. One event loop: plain integers, no atomics.
 * Counters only grow; gauges are set by their owners.
 */
#ifndef MX_METRICS_H
#define MX_METRICS_H

#include <stdint.h>

#include "common/buf.h"
#include "common/error.h"

enum { MX_PROTO_H1 = 0, MX_PROTO_H2 = 1, MX_PROTO_COUNT = 2 };

#define MX_HIST_BUCKETS 14

/* A latency histogram in seconds with fixed bucket bounds. */
typedef struct mx_hist {
  uint64_t buckets[MX_HIST_BUCKETS]; /* cumulative when rendered */
  uint64_t count;
  double sum;
} mx_hist;

/* Upstream /sync requests by why they were made. */
enum {
  MX_SYNC_REASON_INITIAL = 0, /* first batch of a stream */
  MX_SYNC_REASON_LONGPOLL,    /* long-poll adapter */
  MX_SYNC_REASON_WAKE,        /* replication said something changed */
  MX_SYNC_REASON_SAFETY,      /* gap, reconnect or unknown row */
  MX_SYNC_REASON_PRESENCE,    /* keeping a user online */
  MX_SYNC_REASON_RETRY,       /* after a transient failure */
  MX_SYNC_REASON_COUNT
};

typedef struct mx_metrics {
  /* connections */
  uint64_t conns_accepted[MX_PROTO_COUNT];
  int64_t conns_open[MX_PROTO_COUNT];
  uint64_t conns_rejected; /* over a connection limit */
  uint64_t tls_handshake_failures;
  /* requests */
  uint64_t requests[MX_PROTO_COUNT];
  uint64_t responses_by_class[6]; /* index status/100, 0 = other */
  int64_t streams_open;           /* exchanges in progress */
  int64_t sse_streams_open;
  uint64_t sse_events_sent;
  uint64_t sse_heartbeats_sent;
  int64_t sse_gzip_streams;      /* streams compressing now */
  uint64_t sse_gzip_refused;     /* accepted gzip, over the cap */
  uint64_t sse_gzip_bytes_in;    /* SSE bytes before compression */
  uint64_t sse_gzip_bytes_out;   /* ... and after */
  int64_t sse_gzip_memory;       /* bytes held by all compressors */
  uint64_t bytes_in, bytes_out; /* client side, after TLS */
  /* upstream */
  uint64_t upstream_requests;
  uint64_t upstream_errors;  /* connect failures, resets, timeouts */
  uint64_t upstream_timeouts;
  mx_hist upstream_latency;  /* to the response head */
  /* sync adapter */
  uint64_t sync_requests[MX_SYNC_REASON_COUNT];
  uint64_t sync_empty;
  uint64_t wakes_urgent;     /* stream wakes: its rooms, its user */
  uint64_t wakes_background; /* presence, device lists, safety nets */
  mx_hist wake_to_delivery; /* the whole of the three below */
  mx_hist wake_queue;       /* wake -> woken fetch sent (debounce, cap) */
  mx_hist woken_fetch;      /* woken fetch sent -> homeserver's answer */
  uint64_t repl_lines;
  uint64_t repl_gaps;
  uint64_t repl_reconnects;
  int64_t repl_connected;
  double repl_last_line; /* unix time of the newest replication line */
  uint64_t repl_member_fetches;  /* joined_members requests */
  uint64_t repl_member_failures; /* ... that gave no list */
  int64_t repl_rooms_tracked;    /* rooms whose members are kept */
  int64_t repl_rooms_incomplete; /* ... whose list is not known yet */
  int64_t repl_room_memberships; /* memberships kept for them */
  /* shared replay store (homeserver/redis_replay.c) */
  int64_t replay_store_up;            /* 1 while connected */
  uint64_t replay_store_unavailable;  /* calls answered UNAVAILABLE */
  uint64_t replay_resumes_refused;    /* 503: a resume the store could
                                         not prove */
  uint64_t replay_put_retries;        /* batches held for a retried put */
  uint64_t replay_resume_gaps;        /* resumes whose history was gone */
  int64_t replay_bytes;   /* in-process replay store: accounted memory, */
  int64_t replay_entries; /* and batches held (both every 10 s) */
} mx_metrics;

extern mx_metrics mx_stats;

void mx_hist_observe(mx_hist *h, double seconds);

/* Appends the Prometheus exposition of mx_stats to out. */
int mx_metrics_render(mx_buf *out) MX_MUST_CHECK;

#endif
