/*
 * Replication lines through the parser (sync/repl_proto.c), the wake rules
 * (sync/wake.c), the room index (sync/room_index.c) and the room mates
 * (sync/room_mates.c), as the adapter wires them. The input is a sequence
 * of pub/sub payloads separated by '\n'. A payload starting with byte
 * 0x01 drives the index instead:
 *   \x01o<user>          open a stream of user
 *   \x01c<user>          close it
 *   \x01s<user> <room>.. set the user's rooms
 *   \x01m<room> <body>   a joined_members answer for room
 *   \x01g                reload every member list (a gap)
 *   \x01r                Redis reconnect: reset the parser and presence
 * Small caps make the limits reachable. Checked: every woken user is open
 * and woken once per row; the rooms tracked are the index's rooms; nothing
 * leaks (ASan/LSan).
 */
#include <stdlib.h>
#include <string.h>

#include "common/strmap.h"
#include "sync/repl_proto.h"
#include "sync/room_index.h"
#include "sync/room_mates.h"
#include "sync/wake.h"
#include "tests/fuzz/fuzz.h"

typedef struct harness {
  mx_room_index *ix;
  mx_room_mates *rm;
  mx_wake *w;
  mx_strmap row_seen; /* users woken by the current row */
  size_t rows, nets;
} harness;

static void on_wake(const char *user, size_t len, void *ud) {
  harness *h = ud;
  if (!mx_room_index_has_user(h->ix, user, len))
    abort(); /* only open users are woken */
  if (mx_strmap_get(&h->row_seen, user, len))
    abort(); /* at most once per row */
  if (mx_strmap_put(&h->row_seen, user, len, h, NULL) != 0)
    abort();
}

static void on_unresolved(mx_repl_stream s, const char *user, size_t len,
                          void *ud) {
  if ((unsigned)s >= MX_REPL_STREAM_COUNT)
    abort();
}

static void on_row(const mx_repl_row *r, void *ud) {
  harness *h = ud;
  if ((unsigned)r->stream >= MX_REPL_STREAM_COUNT ||
      !mx_repl_json_valid(r->json, r->json_len))
    abort(); /* rows handed out are always valid JSON */
  mx_wake_cb cb = {on_wake, on_unresolved, h};
  mx_strmap_free(&h->row_seen);
  (void)mx_wake_row(h->w, r, &cb);
  h->rows++;
}

static void on_net(int scope, mx_repl_reason reason, void *ud) {
  harness *h = ud;
  if (scope < MX_REPL_SCOPE_ALL || scope >= MX_REPL_STREAM_COUNT ||
      (unsigned)reason >= MX_REPL_R_COUNT)
    abort();
  h->nets++;
}

/* The index's room hook, as the adapter's loader does it (no fetch). */
static void room_hook(const char *room, size_t len, bool added, void *ud) {
  harness *h = ud;
  if (added)
    (void)mx_room_mates_track(h->rm, room, len);
  else
    mx_room_mates_untrack(h->rm, room, len);
}

static void control(harness *h, mx_repl_proto *p, const char *s, size_t n) {
  if (n == 0)
    return;
  char op = s[0];
  s++;
  n--;
  const char *sp = memchr(s, ' ', n);
  size_t ulen = sp ? (size_t)(sp - s) : n;
  switch (op) {
  case 'o':
    (void)mx_room_index_user_open(h->ix, s, ulen);
    break;
  case 'c':
    (void)mx_room_index_user_close(h->ix, s, ulen);
    break;
  case 's': {
    mx_ri_key rooms[16];
    size_t nr = 0;
    const char *q = sp ? sp + 1 : s + n;
    size_t left = sp ? n - ulen - 1 : 0;
    while (left && nr < 16) {
      const char *e = memchr(q, ' ', left);
      size_t l = e ? (size_t)(e - q) : left;
      rooms[nr].p = q;
      rooms[nr++].len = l;
      q += l + (e ? 1 : 0);
      left -= l + (e ? 1 : 0);
    }
    (void)mx_room_index_set_rooms(h->ix, s, ulen, rooms, nr);
    break;
  }
  case 'm':
    if (sp)
      (void)mx_room_mates_load(h->rm, s, ulen, sp + 1, n - ulen - 1);
    break;
  case 'g':
    (void)mx_room_mates_reload_all(h->rm, NULL, NULL);
    break;
  case 'r':
    mx_repl_proto_reset(p);
    mx_wake_reset(h->w);
    break;
  default:
    break;
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static bool seeded;
  if (!seeded) {
    mx_hash_seed(7, 8); /* reproducible runs */
    seeded = true;
  }
  harness h = {0};
  h.ix = mx_room_index_new();
  h.rm = mx_room_mates_new(16);
  mx_wake_opts wo = {.presence_cache_max = 4};
  h.w = mx_wake_new(h.ix, &wo);
  mx_strmap_init(&h.row_seen);
  mx_repl_callbacks cb = {on_row, on_net, &h};
  mx_repl_proto_opts po = {.max_line = 4096,
                           .max_batch_rows = 8,
                           .max_batch_bytes = 2048,
                           .max_positions = 8};
  mx_repl_proto *p = mx_repl_proto_new(&cb, &po);
  if (!h.ix || !h.rm || !h.w || !p)
    abort();
  mx_room_index_set_room_hook(h.ix, room_hook, &h);
  mx_wake_set_room_mates(h.w, h.rm);

  /* A few users and rooms to wake, as a running adapter would have. */
  static const char *const users[] = {"@a:hs", "@b:hs", "@c:hs"};
  for (size_t i = 0; i < 3; i++)
    mx_room_index_user_open(h.ix, users[i], strlen(users[i]));
  mx_room_index_join(h.ix, "@a:hs", 5, "!r:hs", 5);
  mx_room_index_join(h.ix, "@b:hs", 5, "!r:hs", 5);
  mx_room_index_join(h.ix, "@b:hs", 5, "!s:hs", 5);
  mx_room_index_join(h.ix, "@c:hs", 5, "!s:hs", 5);

  const char *s = (const char *)data;
  size_t left = size;
  while (left) {
    const char *nl = memchr(s, '\n', left);
    size_t n = nl ? (size_t)(nl - s) : left;
    if (n && s[0] == '\x01')
      control(&h, p, s + 1, n - 1);
    else
      (void)mx_repl_proto_feed(p, s, n);
    s += n + (nl ? 1 : 0);
    left -= n + (nl ? 1 : 0);
  }
  /* The whole input as one payload, too (huge and multi-line). */
  (void)mx_repl_proto_feed(p, (const char *)data, size);

  mx_room_index_stats is;
  mx_room_mates_stats ms;
  mx_room_index_stats_get(h.ix, &is);
  mx_room_mates_stats_get(h.rm, &ms);
  if (is.rooms != ms.rooms)
    abort(); /* a room is tracked exactly while the index holds it */

  mx_repl_proto_free(p);
  mx_wake_free(h.w);
  mx_room_index_set_room_hook(h.ix, NULL, NULL);
  mx_room_index_free(h.ix);
  mx_room_mates_free(h.rm);
  mx_strmap_free(&h.row_seen);
  return 0;
}
