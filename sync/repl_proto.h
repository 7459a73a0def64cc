/*
 * mx_repl_proto: Synapse's replication commands, as published on its Redis
 * channel, in; stream rows and "something may have been missed" signals
 * out. One pub/sub message payload is one command line:
 *
 *   RDATA <stream> <instance> <token|batch> <row_json>
 *   POSITION <stream> <instance> <prev_token> <new_token>
 *
 * (synapse/replication/tcp/commands.py; docs/internals/replication.md has
 * the details and the stream list.) Every other command (REPLICATE,
 * USER_SYNC, LOCK_RELEASED, ...) is counted and ignored.
 *
 * The parser keeps the last token of every (stream, instance), holds
 * "batch" rows until the numbered row of the same (stream, instance)
 * arrives and then emits them all with that token, in order, and asks for
 * a safety net (wake every stream's user) whenever rows may have been
 * missed or a line cannot be understood.
 *
 * No sockets, no allocation beyond the position table and held batches,
 * both capped. Never logs row contents: caches rows and some others can
 * carry secrets.
 */
#ifndef MX_REPL_PROTO_H
#define MX_REPL_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "common/limits.h"

/* The streams of Synapse 1.163 (synapse/replication/tcp/streams/). */
typedef enum mx_repl_stream {
  MX_REPL_EVENTS = 0,
  MX_REPL_BACKFILL,
  MX_REPL_PRESENCE,
  MX_REPL_PRESENCE_FEDERATION,
  MX_REPL_TYPING,
  MX_REPL_RECEIPTS,
  MX_REPL_PUSH_RULES,
  MX_REPL_PUSHERS,
  MX_REPL_CACHES,
  MX_REPL_DEVICE_LISTS,
  MX_REPL_TO_DEVICE,
  MX_REPL_FEDERATION,
  MX_REPL_ACCOUNT_DATA,
  MX_REPL_PROFILE_UPDATES,
  MX_REPL_STICKY_EVENTS,
  MX_REPL_THREAD_SUBSCRIPTIONS,
  MX_REPL_UN_PARTIAL_STATED_ROOM,
  MX_REPL_UN_PARTIAL_STATED_EVENT,
  MX_REPL_QUARANTINED_MEDIA,
  MX_REPL_STREAM_COUNT
} mx_repl_stream;

/* Safety-net scope meaning "every stream" (otherwise an mx_repl_stream). */
#define MX_REPL_SCOPE_ALL (-1)

/* Why a safety net was asked for. */
typedef enum mx_repl_reason {
  MX_REPL_R_GAP = 0,          /* POSITION: our last token < prev_token */
  MX_REPL_R_BACKWARDS,        /* token went backwards: writer restarted */
  MX_REPL_R_UNPARSEABLE,      /* not a command line we can read */
  MX_REPL_R_UNKNOWN_STREAM,   /* RDATA for a stream we do not know */
  MX_REPL_R_BAD_TOKEN,        /* token not a non-negative 63-bit integer */
  MX_REPL_R_BAD_ROW,          /* row is not a JSON array */
  MX_REPL_R_TOO_LONG,         /* line longer than the cap */
  MX_REPL_R_BATCH_OVERFLOW,   /* held batch rows passed a cap */
  MX_REPL_R_BATCH_INTERRUPTED,/* POSITION while batch rows were held */
  MX_REPL_R_TOO_MANY_INSTANCES, /* position table full or name too long */
  MX_REPL_R_NOMEM,            /* could not hold a row */
  MX_REPL_R_COUNT
} mx_repl_reason;

/* A row, borrowed for the duration of the on_row call only. */
typedef struct mx_repl_row {
  mx_repl_stream stream;
  const char *instance; /* not NUL-terminated */
  size_t instance_len;
  uint64_t token;       /* the numbered token (shared by a whole batch) */
  const char *json;     /* one JSON array, validated; not NUL-terminated */
  size_t json_len;
} mx_repl_row;

typedef struct mx_repl_callbacks {
  /* One call per row, in arrival order. */
  void (*on_row)(const mx_repl_row *row, void *ud);
  /* scope: an mx_repl_stream, or MX_REPL_SCOPE_ALL. The caller wakes
   * every user (the stream hint only says what was missed); it should
   * coalesce bursts (a Synapse restart announces every stream at once). */
  void (*on_safety_net)(int scope, mx_repl_reason reason, void *ud);
  void *ud;
} mx_repl_callbacks;

typedef struct mx_repl_proto_opts {
  size_t max_line;        /* 0: MX_REPL_MAX_LINE */
  size_t max_batch_rows;  /* 0: MX_REPL_MAX_BATCH_ROWS */
  size_t max_batch_bytes; /* 0: MX_REPL_MAX_BATCH_BYTES */
  size_t max_positions;   /* 0: MX_REPL_MAX_POSITIONS */
} mx_repl_proto_opts;

/* Counters of one parser (mx_stats holds the process-wide ones). */
typedef struct mx_repl_proto_stats {
  uint64_t lines;    /* payloads fed */
  uint64_t rows;     /* rows emitted */
  uint64_t ignored;  /* other commands, blank lines, POSITION of unknown
                        streams */
  uint64_t dup_rows; /* RDATA at a token already seen (dropped) */
  uint64_t safety_nets[MX_REPL_R_COUNT];
} mx_repl_proto_stats;

typedef struct mx_repl_proto mx_repl_proto;

/* Returns a parser calling cb (copied) with opts (NULL: defaults), or NULL
 * when out of memory. */
mx_repl_proto *mx_repl_proto_new(const mx_repl_callbacks *cb,
                                 const mx_repl_proto_opts *opts);

/* Frees the parser, its position table and held rows. NULL is fine. */
void mx_repl_proto_free(mx_repl_proto *p);

/*
 * Feeds one pub/sub message payload (len bytes, any content). Calls
 * on_row / on_safety_net synchronously; the callbacks must not call
 * mx_repl_proto_feed, _reset or _free on p. Counts mx_stats.repl_lines and
 * mx_stats.repl_gaps (gaps, backward tokens and lost batches).
 * Returns 0 for a line that was understood: rows emitted or held, or the
 * command ignored on purpose; a gap or backward token it revealed is
 * reported through on_safety_net, not the return value. Returns
 * MX_ERR_INVALID (garbage, bad token, bad row), MX_ERR_LIMIT (too long,
 * batch cap, position table full) or MX_ERR_NOMEM when the line itself
 * was refused; on_safety_net has been called for it.
 */
int mx_repl_proto_feed(mx_repl_proto *p, const char *line, size_t len);

/* Forgets every position and held row (Redis reconnect). Calls nothing:
 * the caller runs its safety net, since anything may have been missed
 * while the link was down. */
void mx_repl_proto_reset(mx_repl_proto *p);

/* A reconnect of our own: drops batch rows held for a numbered row that
 * may never come, but keeps the positions, so the writers' POSITION lines
 * after the outage reveal what moved meanwhile (a gap). */
void mx_repl_proto_drop_batches(mx_repl_proto *p);

/* The parser's counters (valid until mx_repl_proto_free). */
const mx_repl_proto_stats *mx_repl_proto_stats_get(const mx_repl_proto *p);

/* Last token seen for (stream, instance): 0 and *token set, or
 * MX_ERR_NOTFOUND. */
int mx_repl_proto_position(const mx_repl_proto *p, mx_repl_stream s,
                           const char *instance, size_t len,
                           uint64_t *token) MX_MUST_CHECK;

/* Stream names as on the wire ("events", "to_device", ...). */
const char *mx_repl_stream_name(mx_repl_stream s);

/* Returns the mx_repl_stream for a wire name, or MX_ERR_NOTFOUND. */
int mx_repl_stream_lookup(const char *name, size_t len);

/* Short stable names for reasons ("gap", "backwards", ...), for logs and
 * metrics labels. */
const char *mx_repl_reason_name(mx_repl_reason r);

/* True when json[0..len) is exactly one JSON value (RFC 8259, optional
 * surrounding whitespace, well-formed UTF-8, nesting at most
 * MX_REPL_JSON_MAX_DEPTH). Exposed for the wake rules and tests. */
bool mx_repl_json_valid(const char *json, size_t len);

#endif
