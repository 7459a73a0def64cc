/*
 * Compares sync/json_scan with a json-c DOM parse on a synthetic
 * /sync-like body (default 10 MB: many joined rooms with timelines,
 * state, receipts, escaped text; next_batch last, the worst place for a
 * scanner). Both sides do the work the sync adapter needs per body:
 * check it is a JSON object, read next_batch, list the room ids under
 * rooms.join/invite/leave.
 *
 *   make tests/bench/bench_json_scan && tests/bench/bench_json_scan [MB]
 *
 * Build without sanitizers for meaningful numbers.
 */
#include <json-c/json.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/buf.h"
#include "sync/json_scan.h"

static uint64_t rng = 88172645463325252ULL;
static unsigned rnd(unsigned n) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (unsigned)(rng % n);
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void text(mx_buf *b, unsigned words) {
  static const char *const w[] = {
      "hello", "the", "matrix", "room", "\\\"quoted\\\"", "caf\\u00e9",
      "\\ud83d\\ude00", "line\\nbreak", "{braces}", "[brackets]", "a\\\\b",
      "encrypted", "sync", "server", "event",
  };
  for (unsigned i = 0; i < words; i++)
    mx_buf_appendf(b, "%s%s", i ? " " : "", w[rnd(sizeof(w) / sizeof(w[0]))]);
}

static void event(mx_buf *b, unsigned room, unsigned i) {
  mx_buf_appendf(b,
                 "{\"type\":\"m.room.message\",\"sender\":\"@user%u:example."
                 "org\",\"event_id\":\"$%08x%08xAbCdEf\",\"origin_server_ts\":"
                 "%llu,\"content\":{\"msgtype\":\"m.text\",\"body\":\"",
                 rnd(500), room, i, 1700000000000ULL + rnd(1000000));
  text(b, 5 + rnd(60));
  mx_buf_appendf(b, "\"},\"unsigned\":{\"age\":%u,\"transaction_id\":null}}",
                 rnd(100000));
}

static void state_event(mx_buf *b, unsigned i) {
  mx_buf_appendf(b,
                 "{\"type\":\"m.room.member\",\"state_key\":\"@user%u:example."
                 "org\",\"sender\":\"@user%u:example.org\",\"event_id\":\"$s%u\""
                 ",\"origin_server_ts\":1700000000000,\"content\":{"
                 "\"membership\":\"join\",\"displayname\":\"User %u\","
                 "\"avatar_url\":\"mxc://example.org/%08x\"}}",
                 i, i, i, i, rnd(1u << 30));
}

static void room(mx_buf *b, unsigned r) {
  mx_buf_appendf(b, "\"!room%u:example.org\":{\"timeline\":{\"events\":[", r);
  unsigned n = 10 + rnd(40);
  for (unsigned i = 0; i < n; i++) {
    if (i)
      mx_buf_append(b, ",", 1);
    event(b, r, i);
  }
  mx_buf_appendf(b, "],\"limited\":%s,\"prev_batch\":\"t%u-%u_0_0\"},"
                    "\"state\":{\"events\":[",
                 rnd(2) ? "true" : "false", rnd(99999), r);
  n = rnd(20);
  for (unsigned i = 0; i < n; i++) {
    if (i)
      mx_buf_append(b, ",", 1);
    state_event(b, i);
  }
  mx_buf_appendf(b,
                 "]},\"ephemeral\":{\"events\":[{\"type\":\"m.receipt\","
                 "\"content\":{\"$e%u\":{\"m.read\":{\"@user%u:example.org\":"
                 "{\"ts\":%u}}}}}]},\"account_data\":{\"events\":[]},"
                 "\"unread_notifications\":{\"highlight_count\":%u,"
                 "\"notification_count\":%u},\"summary\":{}}",
                 rnd(1000), rnd(500), rnd(1u << 30), rnd(5), rnd(50));
}

static char *make_body(size_t target, size_t *len) {
  mx_buf b;
  mx_buf_init(&b, target * 2 + (1 << 20));
  static const char head[] =
      "{\"account_data\":{\"events\":[]},\"to_device\":{\"events\":[{"
      "\"type\":\"m.room_key\",\"sender\":\"@a:b\",\"content\":{"
      "\"algorithm\":\"m.megolm.v1.aes-sha2\"}}]},\"device_lists\":{"
      "\"changed\":[],\"left\":[]},\"presence\":{\"events\":[]},"
      "\"rooms\":{\"join\":{";
  mx_buf_append(&b, head, sizeof(head) - 1);
  unsigned r = 0;
  while (b.len < target) {
    if (r)
      mx_buf_append(&b, ",", 1);
    room(&b, r++);
  }
  mx_buf_appendf(&b, "},\"invite\":{\"!inv:example.org\":{\"invite_state\":{"
                     "\"events\":[]}}},\"leave\":{}},"
                     "\"device_one_time_keys_count\":{\"signed_curve25519\":"
                     "50},\"next_batch\":\"s72594_4483_1934_%u\"}",
                 r);
  return mx_buf_steal(&b, len);
}

typedef struct pick {
  const char *const *names;
  size_t n;
  mx_json_span *out; /* out[i] for names[i]; type NONE when absent */
  size_t count;      /* members seen */
} pick;

/* One walk collects several members (first occurrence wins) and counts
 * them all, so no section is skipped twice. */
static int pick_cb(const mx_json_span *k, const mx_json_span *v, void *ud) {
  pick *p = ud;
  p->count++;
  for (size_t i = 0; i < p->n; i++)
    if (p->out[i].type == MX_JSON_NONE &&
        mx_json_scan_equals(k, p->names[i], strlen(p->names[i])))
      p->out[i] = *v;
  return 0;
}

static int walk(const mx_json_span *obj, const char *const *names, size_t n,
                mx_json_span *out, size_t *count) {
  pick p = {names, n, out, 0};
  if (n)
    memset(out, 0, n * sizeof(*out));
  int rv = mx_json_scan_members(obj->p, obj->len, pick_cb, &p);
  if (count)
    *count = p.count;
  return rv;
}

/* The scanner's share of the adapter's work on one body: validate, then
 * one walk per level (top: next_batch + rooms; rooms: the three
 * sections; each section: its room ids). */
static int scan_once(const char *body, size_t len, size_t *rooms) {
  static const char *const top_names[] = {"next_batch", "rooms"};
  static const char *const sec_names[] = {"join", "invite", "leave"};
  if (mx_json_scan_validate(body, len) != 0)
    return -1;
  mx_json_span whole = {body, len, MX_JSON_OBJECT}, top[2], sec[3];
  if (walk(&whole, top_names, 2, top, NULL) != 0 ||
      top[0].type != MX_JSON_STRING || top[1].type != MX_JSON_OBJECT)
    return -1;
  if (walk(&top[1], sec_names, 3, sec, NULL) != 0)
    return -1;
  size_t total = 0;
  for (int i = 0; i < 3; i++) {
    size_t c = 0;
    if (sec[i].type == MX_JSON_OBJECT && walk(&sec[i], NULL, 0, NULL, &c) != 0)
      return -1;
    total += c;
  }
  *rooms = total;
  return 0;
}

/* The same with a json-c DOM. */
static int jsonc_once(const char *body, size_t len, size_t *rooms,
                      size_t *heap) {
  struct mallinfo2 before = mallinfo2();
  json_tokener *tok = json_tokener_new();
  json_object *o = json_tokener_parse_ex(tok, body, (int)len);
  if (heap) {
    struct mallinfo2 after = mallinfo2();
    *heap = after.uordblks + after.hblkhd - before.uordblks - before.hblkhd;
  }
  json_tokener_free(tok);
  if (!o || !json_object_is_type(o, json_type_object))
    return -1;
  json_object *nb, *rs, *sec;
  if (!json_object_object_get_ex(o, "next_batch", &nb) ||
      !json_object_object_get_ex(o, "rooms", &rs))
    return -1;
  size_t n = 0;
  static const char *const sections[] = {"join", "invite", "leave"};
  for (int i = 0; i < 3; i++)
    if (json_object_object_get_ex(rs, sections[i], &sec))
      n += (size_t)json_object_object_length(sec);
  *rooms = n;
  json_object_put(o);
  return 0;
}

int main(int argc, char **argv) {
  size_t mb = argc > 1 ? (size_t)strtoul(argv[1], NULL, 10) : 10;
  if (mb == 0 || mb > 1024)
    mb = 10;
  size_t len;
  char *body = make_body(mb * 1024 * 1024, &len);
  size_t r1 = 0, r2 = 0, heap = 0;
  if (scan_once(body, len, &r1) != 0 || jsonc_once(body, len, &r2, &heap) ||
      r1 != r2) {
    fprintf(stderr, "bench: the two disagree (%zu vs %zu rooms)\n", r1, r2);
    return 1;
  }
  printf("body: %.1f MB, %zu rooms\n", (double)len / 1048576.0, r1);

  int n_jc = 5, n_sc = 50;
  double t0 = now();
  for (int i = 0; i < n_jc; i++)
    jsonc_once(body, len, &r2, NULL);
  double jc = (now() - t0) / n_jc;
  t0 = now();
  for (int i = 0; i < n_sc; i++)
    scan_once(body, len, &r1);
  double sc = (now() - t0) / n_sc;
  t0 = now();
  for (int i = 0; i < n_sc; i++)
    mx_json_scan_validate(body, len);
  double va = (now() - t0) / n_sc;
  t0 = now();
  static const char *const nb[] = {"next_batch"};
  mx_json_span v;
  for (int i = 0; i < n_sc; i++)
    mx_json_scan_find(body, len, nb, 1, &v);
  double fi = (now() - t0) / n_sc;

  double mbs = (double)len / 1048576.0;
  printf("json-c parse + lookups:   %8.2f ms  %7.0f MB/s  heap %.1f MB "
         "(%.1fx input)\n",
         jc * 1e3, mbs / jc, (double)heap / 1048576.0, (double)heap / len);
  printf("scan validate + lookups:  %8.2f ms  %7.0f MB/s  heap 0\n", sc * 1e3,
         mbs / sc);
  printf("  validate only:          %8.2f ms  %7.0f MB/s\n", va * 1e3,
         mbs / va);
  printf("  find next_batch only:   %8.2f ms  %7.0f MB/s\n", fi * 1e3,
         mbs / fi);
  printf("ratio json-c / scan, whole adapter work: %5.1fx\n", jc / sc);
  printf("ratio json-c / validate only:           %5.1fx\n", jc / va);
  printf("ratio json-c / find next_batch only:    %5.1fx\n", jc / fi);
  free(body);
  return 0;
}
