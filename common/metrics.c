#include "common/metrics.h"

#include <inttypes.h>

mx_metrics mx_stats;

static const double bounds[MX_HIST_BUCKETS] = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10,
    30, 60}; /* an overloaded homeserver: a queue of tens of seconds */

static const char *const proto_names[MX_PROTO_COUNT] = {"http/1.1", "h2"};

static const char *const sync_reasons[MX_SYNC_REASON_COUNT] = {
    "initial", "longpoll", "wake", "safety_net", "presence", "retry"};

void mx_hist_observe(mx_hist *h, double seconds) {
  for (int i = 0; i < MX_HIST_BUCKETS; i++)
    if (seconds <= bounds[i]) {
      h->buckets[i]++;
      break;
    }
  h->count++;
  h->sum += seconds;
}

static int hist(mx_buf *o, const char *name, const char *help,
                const mx_hist *h) {
  int rv = mx_buf_appendf(o, "# HELP %s %s\n# TYPE %s histogram\n", name,
                          help, name);
  uint64_t cum = 0;
  for (int i = 0; rv == 0 && i < MX_HIST_BUCKETS; i++) {
    cum += h->buckets[i];
    rv = mx_buf_appendf(o, "%s_bucket{le=\"%g\"} %" PRIu64 "\n", name,
                        bounds[i], cum);
  }
  if (rv == 0)
    rv = mx_buf_appendf(o,
                        "%s_bucket{le=\"+Inf\"} %" PRIu64 "\n"
                        "%s_sum %.6f\n%s_count %" PRIu64 "\n",
                        name, h->count, name, h->sum, name, h->count);
  return rv;
}

static int counter(mx_buf *o, const char *type, const char *name,
                   const char *help, double v) {
  return mx_buf_appendf(o, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", name,
                        help, name, type, name, v);
}

int mx_metrics_render(mx_buf *o) {
  const mx_metrics *m = &mx_stats;
  int rv = mx_buf_appendf(
      o, "# HELP mxsse_connections_accepted_total Client connections "
         "accepted, by protocol.\n# TYPE mxsse_connections_accepted_total "
         "counter\n");
  for (int p = 0; rv == 0 && p < MX_PROTO_COUNT; p++)
    rv = mx_buf_appendf(o,
                        "mxsse_connections_accepted_total{protocol=\"%s\"} "
                        "%" PRIu64 "\n",
                        proto_names[p], m->conns_accepted[p]);
  if (rv == 0)
    rv = mx_buf_appendf(o, "# HELP mxsse_connections_open Client connections "
                           "open, by protocol.\n# TYPE mxsse_connections_open "
                           "gauge\n");
  for (int p = 0; rv == 0 && p < MX_PROTO_COUNT; p++)
    rv = mx_buf_appendf(o,
                        "mxsse_connections_open{protocol=\"%s\"} %" PRId64 "\n",
                        proto_names[p], m->conns_open[p]);
  if (rv == 0)
    rv = mx_buf_appendf(o, "# HELP mxsse_requests_total Requests received, "
                           "by protocol.\n# TYPE mxsse_requests_total "
                           "counter\n");
  for (int p = 0; rv == 0 && p < MX_PROTO_COUNT; p++)
    rv = mx_buf_appendf(o, "mxsse_requests_total{protocol=\"%s\"} %" PRIu64 "\n",
                        proto_names[p], m->requests[p]);
  if (rv == 0)
    rv = mx_buf_appendf(o, "# HELP mxsse_responses_total Responses sent, by "
                           "status class.\n# TYPE mxsse_responses_total "
                           "counter\n");
  for (int c = 1; rv == 0 && c < 6; c++)
    rv = mx_buf_appendf(o, "mxsse_responses_total{code=\"%dxx\"} %" PRIu64 "\n",
                        c, m->responses_by_class[c]);
  if (rv == 0)
    rv = mx_buf_appendf(o, "# HELP mxsse_sync_requests_total Upstream /sync "
                           "requests, by reason.\n# TYPE "
                           "mxsse_sync_requests_total counter\n");
  for (int r = 0; rv == 0 && r < MX_SYNC_REASON_COUNT; r++)
    rv = mx_buf_appendf(o,
                        "mxsse_sync_requests_total{reason=\"%s\"} %" PRIu64 "\n",
                        sync_reasons[r], m->sync_requests[r]);
  struct {
    const char *type, *name, *help;
    double v;
  } simple[] = {
      {"counter", "mxsse_connections_rejected_total",
       "Connections refused by a connection limit.", (double)m->conns_rejected},
      {"counter", "mxsse_tls_handshake_failures_total",
       "TLS handshakes that failed or timed out.",
       (double)m->tls_handshake_failures},
      {"gauge", "mxsse_streams_open", "Requests in progress.",
       (double)m->streams_open},
      {"gauge", "mxsse_sse_streams_open", "SSE sync streams open.",
       (double)m->sse_streams_open},
      {"counter", "mxsse_sse_events_total", "SSE sync events sent.",
       (double)m->sse_events_sent},
      {"counter", "mxsse_sse_heartbeats_total", "SSE heartbeats sent.",
       (double)m->sse_heartbeats_sent},
      {"gauge", "mxsse_sse_gzip_streams", "SSE streams compressing now.",
       (double)m->sse_gzip_streams},
      {"counter", "mxsse_sse_gzip_refused_total",
       "SSE streams sent uncompressed because sse-gzip-max-streams "
       "compressed streams were open.", (double)m->sse_gzip_refused},
      {"counter", "mxsse_sse_gzip_bytes_in_total",
       "SSE bytes of compressed streams, before compression.",
       (double)m->sse_gzip_bytes_in},
      {"counter", "mxsse_sse_gzip_bytes_out_total",
       "SSE bytes of compressed streams, after compression.",
       (double)m->sse_gzip_bytes_out},
      {"gauge", "mxsse_sse_gzip_memory_bytes",
       "Memory held by SSE stream compressors.", (double)m->sse_gzip_memory},
      {"counter", "mxsse_bytes_received_total", "Bytes read from clients.",
       (double)m->bytes_in},
      {"counter", "mxsse_bytes_sent_total", "Bytes written to clients.",
       (double)m->bytes_out},
      {"counter", "mxsse_upstream_requests_total",
       "Requests sent to the homeserver.", (double)m->upstream_requests},
      {"counter", "mxsse_upstream_errors_total",
       "Homeserver requests that failed (connect, reset, timeout).",
       (double)m->upstream_errors},
      {"counter", "mxsse_upstream_timeouts_total",
       "Homeserver requests that timed out.", (double)m->upstream_timeouts},
      {"counter", "mxsse_sync_empty_total",
       "Upstream /sync answers that carried nothing new.",
       (double)m->sync_empty},
      {"counter", "mxsse_wakes_urgent_total",
       "Stream wakes for news in its rooms or for its user (served "
       "first).",
       (double)m->wakes_urgent},
      {"counter", "mxsse_wakes_background_total",
       "Stream wakes that can wait: room-mates' presence, device lists and "
       "profiles, safety nets, keep-online syncs.",
       (double)m->wakes_background},
      {"counter", "mxsse_replication_lines_total",
       "Replication commands read.", (double)m->repl_lines},
      {"counter", "mxsse_replication_gaps_total",
       "Replication gaps that triggered the safety net.",
       (double)m->repl_gaps},
      {"counter", "mxsse_replication_reconnects_total",
       "Replication feed reconnects.", (double)m->repl_reconnects},
      {"gauge", "mxsse_replication_connected",
       "1 while the replication feed is subscribed.",
       (double)m->repl_connected},
      {"gauge", "mxsse_replication_last_line_timestamp_seconds",
       "When the newest replication line was read (unix time); the feed's "
       "staleness is time() minus this.",
       m->repl_last_line},
      {"counter", "mxsse_replication_member_fetches_total",
       "joined_members requests for the rooms connected users are in.",
       (double)m->repl_member_fetches},
      {"counter", "mxsse_replication_member_failures_total",
       "joined_members requests that gave no member list.",
       (double)m->repl_member_failures},
      {"gauge", "mxsse_replication_rooms_tracked",
       "Rooms whose members are kept (connected users are in them).",
       (double)m->repl_rooms_tracked},
      {"gauge", "mxsse_replication_rooms_incomplete",
       "Tracked rooms whose member list is loading or failed.",
       (double)m->repl_rooms_incomplete},
      {"gauge", "mxsse_replication_room_memberships",
       "Memberships kept for the tracked rooms.",
       (double)m->repl_room_memberships},
      {"gauge", "mxsse_replay_store_up",
       "1 while the shared replay store (Redis) is connected.",
       (double)m->replay_store_up},
      {"counter", "mxsse_replay_store_unavailable_total",
       "Replay store calls answered unavailable (not connected, error, "
       "timeout).",
       (double)m->replay_store_unavailable},
      {"counter", "mxsse_replay_resumes_refused_total",
       "Resumes answered 503 because the replay store could not be asked.",
       (double)m->replay_resumes_refused},
      {"counter", "mxsse_replay_put_retries_total",
       "Batches held back (streams heartbeating) while their put into the "
       "replay store was retried.",
       (double)m->replay_put_retries},
      {"counter", "mxsse_replay_resume_gaps_total",
       "Resumes from a position whose batch had expired (signalled to the "
       "client as event: gap).",
       (double)m->replay_resume_gaps},
      {"gauge", "mxsse_replay_memory_bytes",
       "Memory the in-process replay store holds for resumes (batches, "
       "keys, index; capped by --replay-max-bytes; 0 with the shared "
       "store). Updated every 10 s.",
       (double)m->replay_bytes},
      {"gauge", "mxsse_replay_entries",
       "Batches the replay store holds (in-process store; 0 with the "
       "shared store). Updated every 10 s.",
       (double)m->replay_entries},
  };
  for (size_t i = 0; rv == 0 && i < sizeof(simple) / sizeof(simple[0]); i++)
    rv = counter(o, simple[i].type, simple[i].name, simple[i].help,
                 simple[i].v);
  if (rv == 0)
    rv = hist(o, "mxsse_upstream_latency_seconds",
              "Time from sending a homeserver request to its response head.",
              &m->upstream_latency);
  if (rv == 0)
    rv = hist(o, "mxsse_wake_to_delivery_seconds",
              "Time from a replication wake to the event being queued.",
              &m->wake_to_delivery);
  if (rv == 0)
    rv = hist(o, "mxsse_wake_queue_seconds",
              "Time from a replication wake to the woken /sync being sent "
              "(debounce and the woken-fetch cap).",
              &m->wake_queue);
  if (rv == 0)
    rv = hist(o, "mxsse_woken_fetch_seconds",
              "Time from sending a woken /sync to the homeserver's answer.",
              &m->woken_fetch);
  return rv;
}
