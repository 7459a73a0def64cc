/*
 * The replication command parser. One file on purpose (~700 lines): the
 * line grammar, batched rows and position tracking share one state
 * machine per (stream, instance), and its invariants read best together.
 */
#include "sync/repl_proto.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/error.h"
#include "common/limits.h"
#include "common/metrics.h"
#include "common/strmap.h"

/* Wire names, indexed by mx_repl_stream (streams/__init__.py STREAMS_MAP). */
static const char *const stream_names[MX_REPL_STREAM_COUNT] = {
    [MX_REPL_EVENTS] = "events",
    [MX_REPL_BACKFILL] = "backfill",
    [MX_REPL_PRESENCE] = "presence",
    [MX_REPL_PRESENCE_FEDERATION] = "presence_federation",
    [MX_REPL_TYPING] = "typing",
    [MX_REPL_RECEIPTS] = "receipts",
    [MX_REPL_PUSH_RULES] = "push_rules",
    [MX_REPL_PUSHERS] = "pushers",
    [MX_REPL_CACHES] = "caches",
    [MX_REPL_DEVICE_LISTS] = "device_lists",
    [MX_REPL_TO_DEVICE] = "to_device",
    [MX_REPL_FEDERATION] = "federation",
    [MX_REPL_ACCOUNT_DATA] = "account_data",
    [MX_REPL_PROFILE_UPDATES] = "profile_updates",
    [MX_REPL_STICKY_EVENTS] = "sticky_events",
    [MX_REPL_THREAD_SUBSCRIPTIONS] = "thread_subscriptions",
    [MX_REPL_UN_PARTIAL_STATED_ROOM] = "un_partial_stated_room",
    [MX_REPL_UN_PARTIAL_STATED_EVENT] = "un_partial_stated_event",
    [MX_REPL_QUARANTINED_MEDIA] = "quarantined_media",
};

static const char *const reason_names[MX_REPL_R_COUNT] = {
    [MX_REPL_R_GAP] = "gap",
    [MX_REPL_R_BACKWARDS] = "backwards",
    [MX_REPL_R_UNPARSEABLE] = "unparseable",
    [MX_REPL_R_UNKNOWN_STREAM] = "unknown_stream",
    [MX_REPL_R_BAD_TOKEN] = "bad_token",
    [MX_REPL_R_BAD_ROW] = "bad_row",
    [MX_REPL_R_TOO_LONG] = "too_long",
    [MX_REPL_R_BATCH_OVERFLOW] = "batch_overflow",
    [MX_REPL_R_BATCH_INTERRUPTED] = "batch_interrupted",
    [MX_REPL_R_TOO_MANY_INSTANCES] = "too_many_instances",
    [MX_REPL_R_NOMEM] = "nomem",
};

/* Longest command name we call well formed (CLEAR_USER_SYNC is 15). */

/* Bytes of an oversized line inspected to find its stream. */
#define OVERSIZED_HEAD 1024

/* State of one (stream, instance). */
typedef struct repl_pos {
  uint64_t last;     /* last token, when known */
  bool known;
  bool overflowed;   /* batch rows dropped; skip until the numbered row */
  size_t held_rows;
  size_t held_bytes; /* row bytes, without the length prefixes */
  mx_buf held;       /* [uint32_t len][len bytes] per held row */
} repl_pos;

struct mx_repl_proto {
  mx_repl_callbacks cb;
  mx_repl_proto_opts opts;
  mx_strmap positions; /* stream byte + instance name -> repl_pos */
  mx_repl_proto_stats stats;
  bool busy; /* inside a callback: re-entry is a caller bug */
};

const char *mx_repl_stream_name(mx_repl_stream s) {
  if ((unsigned)s >= MX_REPL_STREAM_COUNT)
    return "unknown";
  return stream_names[s];
}

int mx_repl_stream_lookup(const char *name, size_t len) {
  for (int i = 0; i < MX_REPL_STREAM_COUNT; i++)
    if (strlen(stream_names[i]) == len && memcmp(stream_names[i], name, len) == 0)
      return i;
  return MX_ERR_NOTFOUND;
}

const char *mx_repl_reason_name(mx_repl_reason r) {
  if ((unsigned)r >= MX_REPL_R_COUNT)
    return "unknown";
  return reason_names[r];
}

/* ---------------------------------------------------------------------
 * JSON validation: grammar only, no allocation, no recursion. */

static size_t skip_ws(const unsigned char *s, size_t i, size_t n) {
  while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r'))
    i++;
  return i;
}

static bool is_hex(unsigned char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') ||
         (c >= 'A' && c <= 'F');
}

/* Length of the well-formed UTF-8 sequence at s[i] (lead byte >= 0x80),
 * or 0 (RFC 3629: no overlongs, no surrogates, nothing past U+10FFFF). */
static size_t utf8_seq(const unsigned char *s, size_t i, size_t n) {
  unsigned char c = s[i];
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF)
    need = 1;
  else if (c >= 0xE0 && c <= 0xEF) {
    need = 2;
    if (c == 0xE0)
      lo = 0xA0;
    else if (c == 0xED)
      hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 3;
    if (c == 0xF0)
      lo = 0x90;
    else if (c == 0xF4)
      hi = 0x8F;
  } else
    return 0;
  if (n - i - 1 < need)
    return 0;
  if (s[i + 1] < lo || s[i + 1] > hi)
    return 0;
  for (size_t k = 2; k <= need; k++)
    if ((s[i + k] & 0xC0) != 0x80)
      return 0;
  return need + 1;
}

/* s[*i] is the opening quote; on success *i is past the closing one. */
static bool scan_string(const unsigned char *s, size_t *i, size_t n) {
  size_t k = *i + 1;
  while (k < n) {
    unsigned char c = s[k];
    if (c == '"') {
      *i = k + 1;
      return true;
    }
    if (c < 0x20)
      return false;
    if (c == '\\') {
      if (k + 1 >= n)
        return false;
      unsigned char e = s[k + 1];
      if (e == 'u') {
        if (n - k < 6)
          return false;
        for (size_t h = 2; h < 6; h++)
          if (!is_hex(s[k + h]))
            return false;
        k += 6;
      } else if (strchr("\"\\/bfnrt", e) && e != '\0') {
        k += 2;
      } else
        return false;
      continue;
    }
    if (c >= 0x80) {
      size_t l = utf8_seq(s, k, n);
      if (!l)
        return false;
      k += l;
      continue;
    }
    k++;
  }
  return false;
}

static bool scan_number(const unsigned char *s, size_t *i, size_t n) {
  size_t k = *i;
  if (k < n && s[k] == '-')
    k++;
  if (k >= n)
    return false;
  if (s[k] == '0')
    k++;
  else if (s[k] >= '1' && s[k] <= '9')
    while (k < n && s[k] >= '0' && s[k] <= '9')
      k++;
  else
    return false;
  if (k < n && s[k] == '.') {
    k++;
    if (k >= n || s[k] < '0' || s[k] > '9')
      return false;
    while (k < n && s[k] >= '0' && s[k] <= '9')
      k++;
  }
  if (k < n && (s[k] == 'e' || s[k] == 'E')) {
    k++;
    if (k < n && (s[k] == '+' || s[k] == '-'))
      k++;
    if (k >= n || s[k] < '0' || s[k] > '9')
      return false;
    while (k < n && s[k] >= '0' && s[k] <= '9')
      k++;
  }
  *i = k;
  return true;
}

static bool scan_literal(const unsigned char *s, size_t *i, size_t n,
                         const char *lit) {
  size_t l = strlen(lit);
  if (n - *i < l || memcmp(s + *i, lit, l) != 0)
    return false;
  *i += l;
  return true;
}

/* An object member's key and colon; *i at the key's quote. */
static bool scan_key(const unsigned char *s, size_t *i, size_t n) {
  if (*i >= n || s[*i] != '"' || !scan_string(s, i, n))
    return false;
  *i = skip_ws(s, *i, n);
  if (*i >= n || s[*i] != ':')
    return false;
  *i = skip_ws(s, *i + 1, n);
  return true;
}

bool mx_repl_json_valid(const char *json, size_t len) {
  const unsigned char *s = (const unsigned char *)json;
  unsigned char stack[MX_REPL_JSON_MAX_DEPTH]; /* '[' or '{' */
  size_t depth = 0;
  size_t i = skip_ws(s, 0, len);
  for (;;) {
    /* A value starts at s[i]. */
    if (i >= len)
      return false;
    unsigned char c = s[i];
    if (c == '[' || c == '{') {
      if (depth == MX_REPL_JSON_MAX_DEPTH)
        return false;
      stack[depth++] = c;
      i = skip_ws(s, i + 1, len);
      if (i < len && s[i] == (c == '[' ? ']' : '}')) {
        depth--;
        i++;
      } else {
        if (c == '{' && !scan_key(s, &i, len))
          return false;
        continue;
      }
    } else if (c == '"') {
      if (!scan_string(s, &i, len))
        return false;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      if (!scan_number(s, &i, len))
        return false;
    } else if (!scan_literal(s, &i, len, "true") &&
               !scan_literal(s, &i, len, "false") &&
               !scan_literal(s, &i, len, "null")) {
      return false;
    }
    /* After a value: close containers, or find the next element. */
    for (;;) {
      i = skip_ws(s, i, len);
      if (depth == 0)
        return i == len;
      if (i >= len)
        return false;
      unsigned char top = stack[depth - 1];
      if (s[i] == (top == '[' ? ']' : '}')) {
        depth--;
        i++;
        continue;
      }
      if (s[i] != ',')
        return false;
      i = skip_ws(s, i + 1, len);
      if (top == '{' && !scan_key(s, &i, len))
        return false;
      break;
    }
  }
}

/* ---------------------------------------------------------------------
 * Helpers */

/* A token: decimal digits only, at most INT64_MAX (Synapse tokens are
 * Postgres bigints or in-memory counters; never negative on the wire). */
static bool parse_token(const char *s, size_t n, uint64_t *out) {
  if (n == 0 || n > 19)
    return false;
  uint64_t v = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9')
      return false;
    v = v * 10 + (uint64_t)(s[i] - '0');
  }
  if (v > (uint64_t)INT64_MAX)
    return false;
  *out = v;
  return true;
}

/* Splits at the first space: *field = s[0..sp), rest after it. Returns
 * false when there is no space. */
static bool take_field(const char **s, size_t *n, const char **field,
                       size_t *flen) {
  const char *sp = memchr(*s, ' ', *n);
  if (!sp)
    return false;
  *field = *s;
  *flen = (size_t)(sp - *s);
  *n -= *flen + 1;
  *s = sp + 1;
  return true;
}

static bool is_blank(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (!strchr(" \t\n\r\v\f", s[i]) || s[i] == '\0')
      return false;
  return true;
}

static bool command_name_ok(const char *s, size_t n) {
  if (n == 0 || n > MX_REPL_MAX_COMMAND_NAME)
    return false;
  for (size_t i = 0; i < n; i++)
    if (!((s[i] >= 'A' && s[i] <= 'Z') || s[i] == '_'))
      return false;
  return true;
}

static bool instance_ok(const char *s, size_t n) {
  return n > 0 && n <= MX_REPL_MAX_INSTANCE;
}

static void net(mx_repl_proto *p, int scope, mx_repl_reason r) {
  p->stats.safety_nets[r]++;
  if (r == MX_REPL_R_GAP || r == MX_REPL_R_BACKWARDS ||
      r == MX_REPL_R_BATCH_OVERFLOW || r == MX_REPL_R_BATCH_INTERRUPTED)
    mx_stats.repl_gaps++;
  if (!p->cb.on_safety_net)
    return;
  p->busy = true;
  p->cb.on_safety_net(scope, r, p->cb.ud);
  p->busy = false;
}

static void drop_held(repl_pos *pos) {
  mx_buf_reset(&pos->held);
  pos->held_rows = 0;
  pos->held_bytes = 0;
}

static size_t make_key(char *key, mx_repl_stream s, const char *inst,
                       size_t ilen) {
  key[0] = (char)('a' + (int)s);
  memcpy(key + 1, inst, ilen);
  return ilen + 1;
}

/* The entry for (s, inst), created when absent. NULL with *err set when
 * the table is full or memory ran out. inst is valid (instance_ok). */
static repl_pos *get_pos(mx_repl_proto *p, mx_repl_stream s, const char *inst,
                         size_t ilen, int *err) {
  char key[1 + MX_REPL_MAX_INSTANCE];
  size_t klen = make_key(key, s, inst, ilen);
  repl_pos *pos = mx_strmap_get(&p->positions, key, klen);
  if (pos)
    return pos;
  if (p->positions.count >= p->opts.max_positions) {
    *err = MX_ERR_LIMIT;
    return NULL;
  }
  pos = calloc(1, sizeof(*pos));
  if (!pos) {
    *err = MX_ERR_NOMEM;
    return NULL;
  }
  mx_buf_init(&pos->held, p->opts.max_batch_bytes +
                              p->opts.max_batch_rows * sizeof(uint32_t));
  if (mx_strmap_put(&p->positions, key, klen, pos, NULL) != 0) {
    free(pos);
    *err = MX_ERR_NOMEM;
    return NULL;
  }
  return pos;
}

static int free_pos(const char *key, size_t len, void *value, void *ud) {
  repl_pos *pos = value;
  mx_buf_free(&pos->held);
  free(pos);
  return 0;
}

static void emit(mx_repl_proto *p, mx_repl_stream s, const char *inst,
                 size_t ilen, uint64_t token, const char *json, size_t jlen) {
  p->stats.rows++;
  if (!p->cb.on_row)
    return;
  mx_repl_row row = {.stream = s,
                     .instance = inst,
                     .instance_len = ilen,
                     .token = token,
                     .json = json,
                     .json_len = jlen};
  p->busy = true;
  p->cb.on_row(&row, p->cb.ud);
  p->busy = false;
}

/* ---------------------------------------------------------------------
 * Commands */

/* A row whose content is lost (too long, not a JSON array): the stream
 * gets a safety net once per batch, and the position still advances. */
static int lose_row(mx_repl_proto *p, mx_repl_stream s, repl_pos *pos,
                    bool batch, uint64_t token, mx_repl_reason r, int err) {
  bool netted = pos->overflowed;
  drop_held(pos);
  if (!netted)
    net(p, (int)s, r);
  if (batch) {
    pos->overflowed = true;
  } else {
    pos->overflowed = false;
    pos->last = token;
    pos->known = true;
  }
  return err;
}

/* RDATA <stream> <instance> <token|batch> <row_json>. rest is everything
 * after "RDATA "; oversized: the line passed max_line and rest is only
 * its head (the row is lost). */
static int on_rdata(mx_repl_proto *p, const char *rest, size_t n,
                    bool oversized) {
  const char *sname, *inst, *tok;
  size_t slen, ilen, tlen;
  if (!take_field(&rest, &n, &sname, &slen) ||
      !take_field(&rest, &n, &inst, &ilen) ||
      !take_field(&rest, &n, &tok, &tlen)) {
    net(p, MX_REPL_SCOPE_ALL,
        oversized ? MX_REPL_R_TOO_LONG : MX_REPL_R_UNPARSEABLE);
    return oversized ? MX_ERR_LIMIT : MX_ERR_INVALID;
  }
  int sid = mx_repl_stream_lookup(sname, slen);
  if (sid < 0) {
    /* Rows we cannot read: whatever they meant is missed. */
    net(p, MX_REPL_SCOPE_ALL, MX_REPL_R_UNKNOWN_STREAM);
    return MX_ERR_INVALID;
  }
  mx_repl_stream s = (mx_repl_stream)sid;
  if (!instance_ok(inst, ilen)) {
    net(p, sid, ilen ? MX_REPL_R_TOO_MANY_INSTANCES : MX_REPL_R_UNPARSEABLE);
    return MX_ERR_INVALID;
  }
  bool batch = tlen == 5 && memcmp(tok, "batch", 5) == 0;
  uint64_t token = 0;
  if (!batch && !parse_token(tok, tlen, &token)) {
    net(p, sid, MX_REPL_R_BAD_TOKEN);
    return MX_ERR_INVALID;
  }
  int err = 0;
  repl_pos *pos = get_pos(p, s, inst, ilen, &err);
  if (!pos) {
    net(p, sid, err == MX_ERR_LIMIT ? MX_REPL_R_TOO_MANY_INSTANCES
                                    : MX_REPL_R_NOMEM);
    return err;
  }
  if (oversized)
    return lose_row(p, s, pos, batch, token, MX_REPL_R_TOO_LONG,
                    MX_ERR_LIMIT);
  /* Every Synapse row is a JSON array (StreamRow: a tuple or a list). */
  size_t j = skip_ws((const unsigned char *)rest, 0, n);
  if (j >= n || rest[j] != '[' || !mx_repl_json_valid(rest, n))
    return lose_row(p, s, pos, batch, token, MX_REPL_R_BAD_ROW,
                    MX_ERR_INVALID);

  if (batch) {
    if (pos->overflowed)
      return 0; /* the safety net already covers this batch */
    if (pos->held_rows >= p->opts.max_batch_rows ||
        n > p->opts.max_batch_bytes - pos->held_bytes) {
      drop_held(pos);
      pos->overflowed = true;
      net(p, sid, MX_REPL_R_BATCH_OVERFLOW);
      return MX_ERR_LIMIT;
    }
    uint32_t l32 = (uint32_t)n;
    if (mx_buf_append(&pos->held, &l32, sizeof(l32)) != 0 ||
        mx_buf_append(&pos->held, rest, n) != 0) {
      drop_held(pos);
      pos->overflowed = true;
      net(p, sid, MX_REPL_R_NOMEM);
      return MX_ERR_NOMEM;
    }
    pos->held_rows++;
    pos->held_bytes += n;
    return 0;
  }

  if (pos->overflowed) {
    /* End of a batch we dropped: the net covered it, resume from here. */
    pos->overflowed = false;
    drop_held(pos);
    pos->last = token;
    pos->known = true;
    return 0;
  }
  if (pos->known && token == pos->last) {
    /* Already seen (Synapse drops RDATA at or below its position too). */
    p->stats.dup_rows += pos->held_rows + 1;
    drop_held(pos);
    return 0;
  }
  if (pos->known && token < pos->last) {
    /* The writer restarted (typing restarts from 0) without a POSITION
     * reaching us first: deliver, but we may have missed rows. */
    net(p, sid, MX_REPL_R_BACKWARDS);
  }
  pos->last = token;
  pos->known = true;
  /* Emit held rows then this one. The buffer is not touched by the
   * callbacks (re-entry is forbidden), so walk it in place. */
  size_t off = 0;
  while (off < pos->held.len) {
    uint32_t l32;
    memcpy(&l32, pos->held.data + off, sizeof(l32));
    off += sizeof(l32);
    emit(p, s, inst, ilen, token, pos->held.data + off, l32);
    off += l32;
  }
  drop_held(pos);
  emit(p, s, inst, ilen, token, rest, n);
  return 0;
}

/* POSITION <stream> <instance> <prev_token> <new_token> */
static int on_position(mx_repl_proto *p, const char *rest, size_t n) {
  const char *sname, *inst, *prev_s;
  size_t slen, ilen, plen;
  if (!take_field(&rest, &n, &sname, &slen) ||
      !take_field(&rest, &n, &inst, &ilen) ||
      !take_field(&rest, &n, &prev_s, &plen)) {
    net(p, MX_REPL_SCOPE_ALL, MX_REPL_R_UNPARSEABLE);
    return MX_ERR_INVALID;
  }
  int sid = mx_repl_stream_lookup(sname, slen);
  if (sid < 0) {
    /* No rows, nothing we could act on. */
    p->stats.ignored++;
    return 0;
  }
  uint64_t prev, cur;
  if (!parse_token(prev_s, plen, &prev) || !parse_token(rest, n, &cur)) {
    net(p, sid, MX_REPL_R_BAD_TOKEN);
    return MX_ERR_INVALID;
  }
  if (!instance_ok(inst, ilen)) {
    net(p, sid, ilen ? MX_REPL_R_TOO_MANY_INSTANCES : MX_REPL_R_UNPARSEABLE);
    return MX_ERR_INVALID;
  }
  int err = 0;
  repl_pos *pos = get_pos(p, (mx_repl_stream)sid, inst, ilen, &err);
  if (!pos) {
    net(p, sid, err == MX_ERR_LIMIT ? MX_REPL_R_TOO_MANY_INSTANCES
                                    : MX_REPL_R_NOMEM);
    return err;
  }
  bool netted = false;
  if (pos->held_rows || pos->overflowed) {
    /* A batch never finished (Synapse drops it too, then refetches). */
    if (!pos->overflowed) {
      net(p, sid, MX_REPL_R_BATCH_INTERRUPTED);
      netted = true;
    }
    drop_held(pos);
    pos->overflowed = false;
  }
  /* Synapse: missing_updates = not (prev <= current <= new). */
  if (pos->known && !netted && !(prev <= pos->last && pos->last <= cur))
    net(p, sid, pos->last < prev ? MX_REPL_R_GAP : MX_REPL_R_BACKWARDS);
  pos->last = cur;
  pos->known = true;
  return 0;
}

/* ---------------------------------------------------------------------
 * Public */

mx_repl_proto *mx_repl_proto_new(const mx_repl_callbacks *cb,
                                 const mx_repl_proto_opts *opts) {
  mx_repl_proto *p = calloc(1, sizeof(*p));
  if (!p)
    return NULL;
  if (cb)
    p->cb = *cb;
  if (opts)
    p->opts = *opts;
  if (!p->opts.max_line || p->opts.max_line > UINT32_MAX)
    p->opts.max_line = MX_REPL_MAX_LINE;
  if (!p->opts.max_batch_rows)
    p->opts.max_batch_rows = MX_REPL_MAX_BATCH_ROWS;
  if (!p->opts.max_batch_bytes)
    p->opts.max_batch_bytes = MX_REPL_MAX_BATCH_BYTES;
  if (!p->opts.max_positions)
    p->opts.max_positions = MX_REPL_MAX_POSITIONS;
  mx_strmap_init(&p->positions);
  return p;
}

void mx_repl_proto_reset(mx_repl_proto *p) {
  assert(!p->busy);
  mx_strmap_each(&p->positions, free_pos, NULL);
  mx_strmap_free(&p->positions);
}

static int drop_held_each(const char *key, size_t len, void *value,
                          void *ud) {
  repl_pos *pos = value;
  drop_held(pos);
  pos->overflowed = false; /* its numbered row is not coming either */
  return 0;
}

void mx_repl_proto_drop_batches(mx_repl_proto *p) {
  assert(!p->busy);
  mx_strmap_each(&p->positions, drop_held_each, NULL);
}

void mx_repl_proto_free(mx_repl_proto *p) {
  if (!p)
    return;
  mx_repl_proto_reset(p);
  free(p);
}

const mx_repl_proto_stats *mx_repl_proto_stats_get(const mx_repl_proto *p) {
  return &p->stats;
}

int mx_repl_proto_position(const mx_repl_proto *p, mx_repl_stream s,
                           const char *instance, size_t len,
                           uint64_t *token) {
  if ((unsigned)s >= MX_REPL_STREAM_COUNT || !instance_ok(instance, len))
    return MX_ERR_NOTFOUND;
  char key[1 + MX_REPL_MAX_INSTANCE];
  size_t klen = make_key(key, s, instance, len);
  const repl_pos *pos = mx_strmap_get(&p->positions, key, klen);
  if (!pos || !pos->known)
    return MX_ERR_NOTFOUND;
  *token = pos->last;
  return 0;
}

int mx_repl_proto_feed(mx_repl_proto *p, const char *line, size_t len) {
  assert(!p->busy);
  p->stats.lines++;
  mx_stats.repl_lines++;
  if (is_blank(line, len)) {
    p->stats.ignored++; /* Synapse ignores blank lines too */
    return 0;
  }
  bool oversized = len > p->opts.max_line;
  if (oversized)
    len = OVERSIZED_HEAD < len ? OVERSIZED_HEAD : len;
  const char *sp = memchr(line, ' ', len);
  size_t clen = sp ? (size_t)(sp - line) : len;
  const char *rest = sp ? sp + 1 : line + len;
  size_t rlen = sp ? len - clen - 1 : 0;
  if (clen == 5 && memcmp(line, "RDATA", 5) == 0)
    return on_rdata(p, rest, rlen, oversized);
  if (oversized) {
    /* Nothing else is long except by accident; whatever it was is lost. */
    net(p, MX_REPL_SCOPE_ALL, MX_REPL_R_TOO_LONG);
    return MX_ERR_LIMIT;
  }
  if (clen == 8 && memcmp(line, "POSITION", 8) == 0)
    return on_position(p, rest, rlen);
  if (command_name_ok(line, clen)) {
    /* REPLICATE, USER_SYNC, LOCK_RELEASED, PING, SERVER, ERROR, ...
     * (REPLICATE is followed by every writer's POSITIONs.) */
    p->stats.ignored++;
    return 0;
  }
  net(p, MX_REPL_SCOPE_ALL, MX_REPL_R_UNPARSEABLE);
  return MX_ERR_INVALID;
}
