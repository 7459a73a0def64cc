/* Replication command parser: real Synapse 1.163 lines (captured from a
 * live homeserver on Redis), batches, positions, gaps and garbage. */
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/error.h"
#include "common/limits.h"
#include "common/metrics.h"
#include "common/strmap.h"
#include "sync/repl_proto.h"
#include "tests/unit/tap.h"

/* Everything the parser said, one line per callback. */
static mx_buf transcript;

static void on_row(const mx_repl_row *r, void *ud) {
  mx_buf_appendf(&transcript, "row %s %.*s %llu %.*s\n",
                 mx_repl_stream_name(r->stream), (int)r->instance_len,
                 r->instance, (unsigned long long)r->token, (int)r->json_len,
                 r->json);
}

static void on_net(int scope, mx_repl_reason reason, void *ud) {
  mx_buf_appendf(&transcript, "net %s %s\n",
                 scope == MX_REPL_SCOPE_ALL
                     ? "ALL"
                     : mx_repl_stream_name((mx_repl_stream)scope),
                 mx_repl_reason_name(reason));
}

static const mx_repl_callbacks cbs = {on_row, on_net, NULL};

static mx_repl_proto *start(const mx_repl_proto_opts *opts) {
  mx_buf_free(&transcript);
  mx_buf_init(&transcript, 1 << 20);
  mx_buf_append(&transcript, "", 0);
  return mx_repl_proto_new(&cbs, opts);
}

static int feed(mx_repl_proto *p, const char *line) {
  return mx_repl_proto_feed(p, line, strlen(line));
}

static const char *said(void) { return transcript.data ? transcript.data : ""; }

static void clear(void) { mx_buf_reset(&transcript); }

#define ROOM "!JHe3082-lesfNyKj05UAJVY0pVDpwsrHialWy-LG7Zc"
#define ALICE "@alice1795508763:mxsse.test"
#define BOB "@bob1795508763:mxsse.test"

static void test_stream_names(void) {
  int n = 0;
  for (int i = 0; i < MX_REPL_STREAM_COUNT; i++) {
    const char *name = mx_repl_stream_name((mx_repl_stream)i);
    CHECK_INT(mx_repl_stream_lookup(name, strlen(name)), i);
    n++;
  }
  CHECK_INT(n, 19);
  CHECK_INT(mx_repl_stream_lookup("event", 5), MX_ERR_NOTFOUND);
  CHECK_INT(mx_repl_stream_lookup("eventsx", 7), MX_ERR_NOTFOUND);
  CHECK_INT(mx_repl_stream_lookup("", 0), MX_ERR_NOTFOUND);
  CHECK_INT(mx_repl_stream_lookup("un_partial_stated_room", 22),
            MX_REPL_UN_PARTIAL_STATED_ROOM);
  CHECK_STREQ(mx_repl_stream_name(MX_REPL_STREAM_COUNT), "unknown");
  CHECK_STREQ(mx_repl_reason_name(MX_REPL_R_GAP), "gap");
  CHECK_STREQ(mx_repl_reason_name(MX_REPL_R_COUNT), "unknown");
}

/* One line of every stream that carries user-visible changes, as Synapse
 * 1.163 published them. */
static void test_real_lines(void) {
  mx_repl_proto *p = start(NULL);
  static const char *const lines[] = {
      "RDATA events master 11 [\"ev\",[\"$MA5MrCDIXvxcV25x-49KsGfMyNZO54ZhJw6D4_JmCm4\",\"" ROOM "\",\"m.room.message\",null,null,null,null,false,false]]",
      "RDATA typing master 1 [\"" ROOM "\",[\"" BOB "\"]]",
      "RDATA receipts master 2 [\"" ROOM "\",\"m.read\",\"" BOB "\",\"$MA5MrCDIXvxcV25x-49KsGfMyNZO54ZhJw6D4_JmCm4\",null,{\"ts\":1795508778805}]",
      "RDATA presence master 4 [\"" ALICE "\",\"unavailable\",1795508780324,1795508783356,0,\"away\",false]",
      "RDATA account_data master 3 [\"" ALICE "\",null,\"org.example.x\"]",
      "RDATA push_rules master 2 [\"" ALICE "\"]",
      "RDATA to_device master 2 [\"" BOB "\"]",
      "RDATA device_lists master 5 [\"" ALICE "\",false,false]",
      "RDATA pushers master 2 [\"" ALICE "\",\"org.example\",\"pk1\",false]",
      "RDATA caches master 4 [\"get_user_by_id\",[\"" ALICE "\"],1795508765681]",
  };
  for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++) {
    clear();
    CHECK_INT(feed(p, lines[i]), 0);
    /* The row is the line's fourth field, verbatim. */
    const char *json = lines[i];
    for (int sp = 0; sp < 4; sp++)
      json = strchr(json, ' ') + 1;
    CHECK(strncmp(said(), "row ", 4) == 0);
    CHECK(strstr(said(), json) != NULL);
    CHECK(strstr(said(), "net ") == NULL);
    CHECK(strchr(said(), '\n') == said() + strlen(said()) - 1);
  }
  uint64_t t = 0;
  CHECK_INT(mx_repl_proto_position(p, MX_REPL_EVENTS, "master", 6, &t), 0);
  CHECK_INT(t, 11);
  CHECK_INT(mx_repl_proto_position(p, MX_REPL_TYPING, "master", 6, &t), 0);
  CHECK_INT(t, 1);
  CHECK_INT(mx_repl_proto_position(p, MX_REPL_EVENTS, "other", 5, &t),
            MX_ERR_NOTFOUND);
  CHECK_INT(mx_repl_proto_stats_get(p)->rows, 10);
  mx_repl_proto_free(p);
}

/* createRoom as Synapse 1.163 sent it: "ev" and "state" rows sharing
 * tokens, held until the numbered row. */
static void test_batch(void) {
  mx_repl_proto *p = start(NULL);
  CHECK_INT(feed(p, "RDATA events master batch [\"ev\",[\"$c\",\"!r\",\"m.room.create\",\"\",null,null,null,false,false]]"), 0);
  CHECK_STREQ(said(), "");
  CHECK_INT(feed(p, "RDATA events master 2 [\"state\",[\"!r\",\"m.room.create\",\"\",\"$c\"]]"), 0);
  CHECK_STREQ(said(),
              "row events master 2 [\"ev\",[\"$c\",\"!r\",\"m.room.create\",\"\",null,null,null,false,false]]\n"
              "row events master 2 [\"state\",[\"!r\",\"m.room.create\",\"\",\"$c\"]]\n");
  clear();
  /* Other streams flow while a batch is held. */
  CHECK_INT(feed(p, "RDATA events master batch [\"ev\",[\"$p\",\"!r\",\"m.room.power_levels\",\"\",null,null,null,false,false]]"), 0);
  CHECK_INT(feed(p, "RDATA events master batch [\"state\",[\"!r\",\"m.room.name\",\"\",\"$n\"]]"), 0);
  CHECK_INT(feed(p, "RDATA typing master 1 [\"!r\",[]]"), 0);
  CHECK_STREQ(said(), "row typing master 1 [\"!r\",[]]\n");
  clear();
  CHECK_INT(feed(p, "RDATA events master 4 [\"state\",[\"!r\",\"m.room.power_levels\",\"\",\"$p\"]]"), 0);
  CHECK_STREQ(said(),
              "row events master 4 [\"ev\",[\"$p\",\"!r\",\"m.room.power_levels\",\"\",null,null,null,false,false]]\n"
              "row events master 4 [\"state\",[\"!r\",\"m.room.name\",\"\",\"$n\"]]\n"
              "row events master 4 [\"state\",[\"!r\",\"m.room.power_levels\",\"\",\"$p\"]]\n");
  mx_repl_proto_free(p);
}

/* Two event persisters: batches are per (stream, instance). */
static void test_batch_per_instance(void) {
  mx_repl_proto *p = start(NULL);
  feed(p, "RDATA events persister1 batch [1]");
  feed(p, "RDATA events persister2 batch [2]");
  feed(p, "RDATA events persister1 10 [3]");
  CHECK_STREQ(said(), "row events persister1 10 [1]\nrow events persister1 10 [3]\n");
  clear();
  feed(p, "RDATA events persister2 7 [4]");
  CHECK_STREQ(said(), "row events persister2 7 [2]\nrow events persister2 7 [4]\n");
  mx_repl_proto_free(p);
}

static void test_position_in_range(void) {
  mx_repl_proto *p = start(NULL);
  /* First sight of a stream: nothing to compare with. */
  CHECK_INT(feed(p, "POSITION events master 19 19"), 0);
  CHECK_INT(feed(p, "POSITION events master 19 25"), 0);
  CHECK_INT(feed(p, "RDATA events master 26 [\"state-all\",[\"!r\"]]"), 0);
  /* prev <= last <= new: up to date. */
  CHECK_INT(feed(p, "POSITION events master 20 30"), 0);
  CHECK_INT(feed(p, "POSITION events master 30 30"), 0);
  CHECK(strstr(said(), "net") == NULL);
  uint64_t t;
  CHECK_INT(mx_repl_proto_position(p, MX_REPL_EVENTS, "master", 6, &t), 0);
  CHECK_INT(t, 30);
  mx_repl_proto_free(p);
}

static void test_position_gap(void) {
  mx_repl_proto *p = start(NULL);
  uint64_t gaps = mx_stats.repl_gaps;
  feed(p, "RDATA presence master 4 [\"" ALICE "\",\"unavailable\",1,2,0,\"away\",false]");
  clear();
  /* As seen after a restart: presence 5 was written while we listened to
   * nothing. */
  CHECK_INT(feed(p, "POSITION presence master 5 5"), 0);
  CHECK_STREQ(said(), "net presence gap\n");
  CHECK_INT(mx_stats.repl_gaps, gaps + 1);
  clear();
  CHECK_INT(feed(p, "RDATA presence master 6 [\"" ALICE "\",\"online\",1,2,0,null,true]"), 0);
  CHECK(strncmp(said(), "row presence master 6", 21) == 0);
  CHECK_INT(mx_repl_proto_stats_get(p)->safety_nets[MX_REPL_R_GAP], 1);
  mx_repl_proto_free(p);
}

/* The typing stream lives in memory: after a restart Synapse announces
 * "POSITION typing master 0 0" (seen on 1.163) and counts from 1 again. */
static void test_position_restart(void) {
  mx_repl_proto *p = start(NULL);
  feed(p, "RDATA typing master 1 [\"!r\",[\"@b:hs\"]]");
  feed(p, "RDATA typing master 2 [\"!r\",[]]");
  feed(p, "RDATA events master 19 [\"state-all\",[\"!r\"]]");
  clear();
  CHECK_INT(feed(p, "REPLICATE "), 0);
  CHECK_INT(feed(p, "POSITION events master 19 19"), 0);
  CHECK_INT(feed(p, "POSITION typing master 0 0"), 0);
  CHECK_STREQ(said(), "net typing backwards\n");
  clear();
  /* Announced twice in a row, as 1.163 does: no second net. */
  CHECK_INT(feed(p, "POSITION typing master 0 0"), 0);
  CHECK_INT(feed(p, "RDATA typing master 1 [\"!r\",[\"@b:hs\"]]"), 0);
  CHECK_STREQ(said(), "row typing master 1 [\"!r\",[\"@b:hs\"]]\n");
  mx_repl_proto_free(p);
}

/* No POSITION reached us before the token went back: deliver the row,
 * but something may have been missed. */
static void test_rdata_backwards(void) {
  mx_repl_proto *p = start(NULL);
  feed(p, "RDATA typing master 5 [\"!r\",[]]");
  clear();
  CHECK_INT(feed(p, "RDATA typing master 1 [\"!r\",[\"@b:hs\"]]"), 0);
  CHECK_STREQ(said(), "net typing backwards\nrow typing master 1 [\"!r\",[\"@b:hs\"]]\n");
  mx_repl_proto_free(p);
}

static void test_rdata_duplicate(void) {
  mx_repl_proto *p = start(NULL);
  feed(p, "RDATA to_device master 2 [\"@b:hs\"]");
  clear();
  CHECK_INT(feed(p, "RDATA to_device master 2 [\"@b:hs\"]"), 0);
  CHECK_STREQ(said(), "");
  CHECK_INT(mx_repl_proto_stats_get(p)->dup_rows, 1);
  mx_repl_proto_free(p);
}

static void test_batch_interrupted(void) {
  mx_repl_proto *p = start(NULL);
  feed(p, "RDATA events master 1 [\"state-all\",[\"!r\"]]");
  feed(p, "RDATA events master batch [\"state-all\",[\"!a\"]]");
  clear();
  CHECK_INT(feed(p, "POSITION events master 1 3"), 0);
  CHECK_STREQ(said(), "net events batch_interrupted\n");
  clear();
  feed(p, "RDATA events master 4 [\"state-all\",[\"!b\"]]");
  CHECK_STREQ(said(), "row events master 4 [\"state-all\",[\"!b\"]]\n");
  mx_repl_proto_free(p);
}

static void test_batch_overflow(void) {
  mx_repl_proto_opts o = {.max_batch_rows = 3, .max_batch_bytes = 64};
  mx_repl_proto *p = start(&o);
  uint64_t gaps = mx_stats.repl_gaps;
  for (int i = 0; i < 3; i++)
    CHECK_INT(feed(p, "RDATA presence master batch [\"@a:hs\",\"online\"]"), 0);
  CHECK_STREQ(said(), "");
  CHECK_INT(feed(p, "RDATA presence master batch [\"@a:hs\",\"online\"]"), MX_ERR_LIMIT);
  CHECK_STREQ(said(), "net presence batch_overflow\n");
  CHECK_INT(mx_stats.repl_gaps, gaps + 1);
  /* The rest of the batch is covered by that one net. */
  CHECK_INT(feed(p, "RDATA presence master batch [\"@a:hs\",\"online\"]"), 0);
  CHECK_INT(feed(p, "RDATA presence master 9 [\"@a:hs\",\"online\"]"), 0);
  CHECK_STREQ(said(), "net presence batch_overflow\n");
  uint64_t t;
  CHECK_INT(mx_repl_proto_position(p, MX_REPL_PRESENCE, "master", 6, &t), 0);
  CHECK_INT(t, 9);
  clear();
  CHECK_INT(feed(p, "RDATA presence master 10 [\"@a:hs\",\"online\"]"), 0);
  CHECK_STREQ(said(), "row presence master 10 [\"@a:hs\",\"online\"]\n");
  clear();
  /* Byte cap: two rows of 40 bytes pass 64. */
  CHECK_INT(feed(p, "RDATA events master batch [\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"]"), 0);
  CHECK_INT(feed(p, "RDATA events master batch [\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"]"), MX_ERR_LIMIT);
  CHECK_STREQ(said(), "net events batch_overflow\n");
  mx_repl_proto_free(p);
}

/* A bad row inside a batch loses the batch once. */
static void test_bad_row_in_batch(void) {
  mx_repl_proto *p = start(NULL);
  feed(p, "RDATA events master batch [\"state-all\",[\"!a\"]]");
  CHECK_INT(feed(p, "RDATA events master batch [\"state-all\",[\"!a\"]"), MX_ERR_INVALID);
  CHECK_INT(feed(p, "RDATA events master batch {}"), MX_ERR_INVALID);
  CHECK_INT(feed(p, "RDATA events master 7 [\"state-all\",[\"!c\"]]"), 0);
  CHECK_STREQ(said(), "net events bad_row\n");
  uint64_t t;
  CHECK_INT(mx_repl_proto_position(p, MX_REPL_EVENTS, "master", 6, &t), 0);
  CHECK_INT(t, 7);
  mx_repl_proto_free(p);
}

static void test_garbage(void) {
  mx_repl_proto *p = start(NULL);
  static const struct {
    const char *line;
    int rv;
    const char *said;
  } cases[] = {
      {"", 0, ""},
      {"  \r\n", 0, ""},
      {"rdata events master 1 []", MX_ERR_INVALID, "net ALL unparseable\n"},
      {"RDATA", MX_ERR_INVALID, "net ALL unparseable\n"},
      {"RDATA events master", MX_ERR_INVALID, "net ALL unparseable\n"},
      {"RDATA events master 1", MX_ERR_INVALID, "net ALL unparseable\n"},
      {"POSITION events master 1", MX_ERR_INVALID, "net ALL unparseable\n"},
      {"\xff\xfe garbage", MX_ERR_INVALID, "net ALL unparseable\n"},
      {"RDATA nosuchstream master 1 []", MX_ERR_INVALID,
       "net ALL unknown_stream\n"},
      {"RDATA events  1 []", MX_ERR_INVALID, "net events unparseable\n"},
      {"RDATA events master -1 []", MX_ERR_INVALID, "net events bad_token\n"},
      {"RDATA events master 12a []", MX_ERR_INVALID, "net events bad_token\n"},
      {"RDATA events master +5 []", MX_ERR_INVALID, "net events bad_token\n"},
      {"RDATA events master 9223372036854775808 []", MX_ERR_INVALID,
       "net events bad_token\n"},
      {"RDATA events master 99999999999999999999 []", MX_ERR_INVALID,
       "net events bad_token\n"},
      {"RDATA events master  []", MX_ERR_INVALID, "net events bad_token\n"},
      {"POSITION events master 1 x", MX_ERR_INVALID, "net events bad_token\n"},
      {"POSITION events master 1 2 3", MX_ERR_INVALID,
       "net events bad_token\n"},
      {"RDATA events master 3 [1,2", MX_ERR_INVALID, "net events bad_row\n"},
      {"RDATA events master 4 {\"a\":1}", MX_ERR_INVALID,
       "net events bad_row\n"},
      {"RDATA events master 5 [1] x", MX_ERR_INVALID, "net events bad_row\n"},
      {"RDATA events master 6 ", MX_ERR_INVALID, "net events bad_row\n"},
      {"RDATA events master 7 [\"\x01\"]", MX_ERR_INVALID,
       "net events bad_row\n"},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    clear();
    int rv = feed(p, cases[i].line);
    if (rv != cases[i].rv || strcmp(said(), cases[i].said) != 0)
      printf("# case %zu: %s\n", i, cases[i].line);
    CHECK_INT(rv, cases[i].rv);
    CHECK_STREQ(said(), cases[i].said);
  }
  /* Binary with NUL bytes. */
  clear();
  CHECK_INT(mx_repl_proto_feed(p, "RDATA\0events", 12), MX_ERR_INVALID);
  CHECK_STREQ(said(), "net ALL unparseable\n");
  /* Token limits. */
  uint64_t t;
  CHECK_INT(feed(p, "RDATA typing master 9223372036854775807 [\"!r\",[]]"), 0);
  CHECK_INT(mx_repl_proto_position(p, MX_REPL_TYPING, "master", 6, &t), 0);
  CHECK(t == 9223372036854775807ULL);
  CHECK_INT(feed(p, "POSITION typing master 0 007"), 0);
  CHECK_INT(mx_repl_proto_position(p, MX_REPL_TYPING, "master", 6, &t), 0);
  CHECK_INT(t, 7);
  mx_repl_proto_free(p);
}

/* Commands that are not ours, as seen on the channel (LOCK_RELEASED,
 * REPLICATE with its trailing space) or documented in commands.py. */
static void test_ignored_commands(void) {
  mx_repl_proto *p = start(NULL);
  static const char *const lines[] = {
      "REPLICATE ",
      "REPLICATE",
      "LOCK_RELEASED [\"master\",\"new_event_during_purge_lock\",\"" ROOM "\"]",
      "USER_SYNC master " ALICE " DEV start 1795508772723",
      "CLEAR_USER_SYNC master",
      "FEDERATION_ACK master 12",
      "REMOTE_SERVER_UP example.org",
      "NEW_ACTIVE_TASK \"abc\"",
      "CANCEL_TASK \"abc\"",
      "SERVER mxsse.test",
      "PING 1795508772723",
      "ERROR something broke",
      "NAME worker1",
      "USER_IP " ALICE " [\"secret\",\"127.0.0.1\",\"ua\",\"DEV\",1]",
      "SOME_FUTURE_COMMAND with args",
      "POSITION some_future_stream master 1 2",
  };
  for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++)
    CHECK_INT(feed(p, lines[i]), 0);
  CHECK_STREQ(said(), "");
  CHECK_INT(mx_repl_proto_stats_get(p)->ignored,
            sizeof(lines) / sizeof(lines[0]));
  CHECK_INT(mx_repl_proto_stats_get(p)->rows, 0);
  mx_repl_proto_free(p);
}

static void test_huge_lines(void) {
  mx_repl_proto_opts o = {.max_line = 1024};
  mx_repl_proto *p = start(&o);
  char *big = malloc(MX_REPL_MAX_LINE + 64);
  CHECK(big != NULL);
  if (!big)
    return;
  /* A long row on a known stream: that stream's net, position kept. */
  size_t n = (size_t)snprintf(big, 64, "RDATA caches master 5 [\"");
  memset(big + n, 'k', 2000);
  n += 2000;
  memcpy(big + n, "\"]", 2);
  n += 2;
  CHECK_INT(mx_repl_proto_feed(p, big, n), MX_ERR_LIMIT);
  CHECK_STREQ(said(), "net caches too_long\n");
  uint64_t t;
  CHECK_INT(mx_repl_proto_position(p, MX_REPL_CACHES, "master", 6, &t), 0);
  CHECK_INT(t, 5);
  /* Long garbage. */
  clear();
  memset(big, 'A', 5000);
  CHECK_INT(mx_repl_proto_feed(p, big, 5000), MX_ERR_LIMIT);
  CHECK_STREQ(said(), "net ALL too_long\n");
  mx_repl_proto_free(p);

  /* Default cap: MX_REPL_MAX_LINE accepted, one byte more refused. */
  p = start(NULL);
  n = (size_t)snprintf(big, 64, "RDATA events master 1 [\"");
  size_t fill = MX_REPL_MAX_LINE - n - 2;
  memset(big + n, 'e', fill);
  memcpy(big + n + fill, "\"]", 2);
  CHECK_INT(mx_repl_proto_feed(p, big, MX_REPL_MAX_LINE), 0);
  CHECK_INT(mx_repl_proto_stats_get(p)->rows, 1);
  big[0] = 'R';
  memcpy(big + n + fill, "e\"]", 3);
  big[20] = '2';
  clear();
  CHECK_INT(mx_repl_proto_feed(p, big, MX_REPL_MAX_LINE + 1), MX_ERR_LIMIT);
  CHECK_STREQ(said(), "net events too_long\n");
  free(big);
  mx_repl_proto_free(p);
}

static void test_reset(void) {
  mx_repl_proto *p = start(NULL);
  feed(p, "RDATA typing master 7 [\"!r\",[]]");
  feed(p, "RDATA events master batch [\"state-all\",[\"!a\"]]");
  mx_repl_proto_reset(p);
  uint64_t t;
  CHECK_INT(mx_repl_proto_position(p, MX_REPL_TYPING, "master", 6, &t),
            MX_ERR_NOTFOUND);
  clear();
  /* Restarted homeserver: nothing to compare, no net from the parser. */
  CHECK_INT(feed(p, "POSITION typing master 0 0"), 0);
  CHECK_INT(feed(p, "RDATA events master 3 [\"state-all\",[\"!b\"]]"), 0);
  CHECK_STREQ(said(), "row events master 3 [\"state-all\",[\"!b\"]]\n");
  mx_repl_proto_free(p);
}

static void test_instances_capped(void) {
  mx_repl_proto_opts o = {.max_positions = 2};
  mx_repl_proto *p = start(&o);
  CHECK_INT(feed(p, "POSITION events a 1 1"), 0);
  CHECK_INT(feed(p, "POSITION events b 1 1"), 0);
  CHECK_INT(feed(p, "POSITION events c 1 1"), MX_ERR_LIMIT);
  CHECK_INT(feed(p, "RDATA typing c 1 [\"!r\",[]]"), MX_ERR_LIMIT);
  CHECK_STREQ(said(), "net events too_many_instances\n"
                      "net typing too_many_instances\n");
  clear();
  char line[600];
  memset(line, 'i', sizeof(line));
  memcpy(line, "POSITION events ", 16);
  memcpy(line + 16 + MX_REPL_MAX_INSTANCE + 1, " 1 1", 5);
  CHECK_INT(feed(p, line), MX_ERR_INVALID);
  CHECK_STREQ(said(), "net events too_many_instances\n");
  mx_repl_proto_free(p);
}

static void test_metrics(void) {
  mx_repl_proto *p = start(NULL);
  uint64_t lines = mx_stats.repl_lines, gaps = mx_stats.repl_gaps;
  feed(p, "RDATA events master 1 [\"state-all\",[\"!b\"]]");
  feed(p, "PING 1");
  feed(p, "garbage");
  feed(p, "POSITION events master 3 3");
  CHECK_INT(mx_stats.repl_lines, lines + 4);
  CHECK_INT(mx_stats.repl_gaps, gaps + 1); /* garbage is not a gap */
  const mx_repl_proto_stats *s = mx_repl_proto_stats_get(p);
  CHECK_INT(s->lines, 4);
  CHECK_INT(s->safety_nets[MX_REPL_R_UNPARSEABLE], 1);
  CHECK_INT(s->safety_nets[MX_REPL_R_GAP], 1);
  mx_repl_proto_free(p);
}

static void test_json_valid(void) {
  static const char *const good[] = {
      "[]", " [ ] ", "[1,-2,3.5,1e9,-0.5E-3,0]", "[\"a\",null,true,false]",
      "{\"a\":[{}],\"b\":{\"c\":\"\\u00e9\\n\\\"\\\\\\/\"}}", "\"x\"", "0",
      "[\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"]", "[\"\\ud83d\\ude00\"]",
      "[\"\\u00E9\\uABCD\"]", "[\"\xe0\xa0\x80\xf0\x90\x80\x80\"]", "[-0,1E+2]",
  };
  static const char *const bad[] = {
      "",          "[",          "[1,]",         "[,1]",     "{\"a\"}",
      "{\"a\":}",  "{1:2}",      "[01]",         "[1.]",     "[.5]",
      "[1e]",      "[-]",        "[tru]",        "[nul]",    "[\"\\x\"]",
      "[\"\\u12\"]", "[\"a]",     "[1] [2]",      "[NaN]",    "[Infinity]",
      "['a']",     "[\"\t\"]",   "[\"\xc3\"]",    "[\"\xc0\xaf\"]",
      "[\"\xed\xa0\x80\"]",       "[\"\xf4\x90\x80\x80\"]", "[\"\xff\"]",
      "{\"a\":1,}", "[1}",       "{\"a\":1]", "[\"\xe0\x80\x80\"]",
      "[\"\xe2\x82\"]", "[\"\\uGGGG\"]", "[\"\xf0\x8f\xbf\xbf\"]",
  };
  for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
    if (!mx_repl_json_valid(good[i], strlen(good[i])))
      printf("# good %zu rejected\n", i);
    CHECK(mx_repl_json_valid(good[i], strlen(good[i])));
  }
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    if (mx_repl_json_valid(bad[i], strlen(bad[i])))
      printf("# bad %zu accepted\n", i);
    CHECK(!mx_repl_json_valid(bad[i], strlen(bad[i])));
  }
  /* Embedded NUL. */
  CHECK(!mx_repl_json_valid("[\"a\0\"]", 6));
  /* Depth: exactly the cap passes, one more fails. */
  char deep[2 * MX_REPL_JSON_MAX_DEPTH + 4];
  size_t d = MX_REPL_JSON_MAX_DEPTH;
  memset(deep, '[', d);
  memset(deep + d, ']', d);
  CHECK(mx_repl_json_valid(deep, 2 * d));
  memset(deep, '[', d + 1);
  memset(deep + d + 1, ']', d + 1);
  CHECK(!mx_repl_json_valid(deep, 2 * d + 2));
}

static void cleanup(void) { mx_buf_free(&transcript); }

int main(void) {
  mx_hash_seed(1, 2);
  atexit(cleanup);
  TAP_RUN(TAP_CASE(test_stream_names), TAP_CASE(test_real_lines),
             TAP_CASE(test_batch), TAP_CASE(test_batch_per_instance),
             TAP_CASE(test_position_in_range), TAP_CASE(test_position_gap),
             TAP_CASE(test_position_restart), TAP_CASE(test_rdata_backwards),
             TAP_CASE(test_rdata_duplicate), TAP_CASE(test_batch_interrupted),
             TAP_CASE(test_batch_overflow), TAP_CASE(test_bad_row_in_batch),
             TAP_CASE(test_garbage), TAP_CASE(test_ignored_commands),
             TAP_CASE(test_huge_lines), TAP_CASE(test_reset),
             TAP_CASE(test_instances_capped), TAP_CASE(test_metrics),
             TAP_CASE(test_json_valid));
}
