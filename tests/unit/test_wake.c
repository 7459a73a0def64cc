/* Wake rules: who hears of each row of each stream (shapes copied from
 * Synapse 1.163 streams modules and from lines it published), membership
 * changes updating the index, presence filtering, deduplication. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/error.h"
#include "common/strmap.h"
#include "sync/repl_proto.h"
#include "sync/room_index.h"
#include "sync/wake.h"
#include "tests/unit/sorted_ids.h"
#include "tests/unit/tap.h"

#define S(x) x, strlen(x)

static mx_buf woken, unresolved;
static mx_room_index *ix;
static mx_wake *w;

static void on_wake(const char *user, size_t len, void *ud) {
  mx_buf_appendf(&woken, "%.*s;", (int)len, user);
}

static void on_unresolved(mx_repl_stream s, const char *user, size_t len,
                          void *ud) {
  mx_buf_appendf(&unresolved, "%s:%.*s;", mx_repl_stream_name(s), (int)len,
                 user);
}

static const mx_wake_cb cb = {on_wake, on_unresolved, NULL};

static int row(mx_repl_stream s, const char *json) {
  mx_repl_row r = {.stream = s,
                   .instance = "master",
                   .instance_len = 6,
                   .token = 1,
                   .json = json,
                   .json_len = strlen(json)};
  mx_buf_reset(&woken);
  mx_buf_reset(&unresolved);
  return mx_wake_row(w, &r, &cb);
}

/* alice, bob, carol have streams; dave has none.
 * !r1: alice, bob.  !r2: bob, carol. */
static void setup(void) {
  mx_wake_free(w);
  mx_room_index_free(ix);
  ix = mx_room_index_new();
  w = mx_wake_new(ix, NULL);
  mx_room_index_user_open(ix, S("@alice:hs"));
  mx_room_index_user_open(ix, S("@bob:hs"));
  mx_room_index_user_open(ix, S("@carol:hs"));
  mx_room_index_join(ix, S("@alice:hs"), S("!r1:hs"));
  mx_room_index_join(ix, S("@bob:hs"), S("!r1:hs"));
  mx_room_index_join(ix, S("@bob:hs"), S("!r2:hs"));
  mx_room_index_join(ix, S("@carol:hs"), S("!r2:hs"));
}

#define EV(room, type, sk, membership, rejected, outlier)                    \
  "[\"ev\",[\"$e\",\"" room "\",\"" type "\"," sk ",null,null," membership   \
  "," rejected "," outlier "]]"

static void test_events_message(void) {
  setup();
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r1:hs", "m.room.message", "null", "null",
                                   "false", "false")),
            2);
  CHECK_STREQ(sorted_ids(&woken), "@alice:hs;@bob:hs;");
  /* A room without open members. */
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r9:hs", "m.room.message", "null", "null",
                                   "false", "false")),
            0);
  /* Redactions and thread replies as 1.163 sends them. */
  CHECK_INT(row(MX_REPL_EVENTS,
                "[\"ev\",[\"$i\",\"!r2:hs\",\"m.room.redaction\",null,\"$MA\","
                "null,null,false,false]]"),
            2);
  CHECK_STREQ(sorted_ids(&woken), "@bob:hs;@carol:hs;");
  /* Rejected events wake nobody. */
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r1:hs", "m.room.message", "null", "null",
                                   "false", "false")),
            2);
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r1:hs", "m.room.message", "null", "null",
                                   "true", "false")),
            0);
  /* SQLite-shaped booleans. */
  CHECK_INT(row(MX_REPL_EVENTS,
                EV("!r1:hs", "m.room.message", "null", "null", "1", "0")),
            0);
  /* The short row of older Synapses (five fields). */
  CHECK_INT(row(MX_REPL_EVENTS,
                "[\"ev\",[\"$e\",\"!r1:hs\",\"m.room.message\",null,null]]"),
            2);
  CHECK_STREQ(sorted_ids(&woken), "@alice:hs;@bob:hs;");
}

static void test_events_membership(void) {
  setup();
  /* Invite: the invitee hears of it, the index does not change. */
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r1:hs", "m.room.member", "\"@carol:hs\"",
                                   "\"invite\"", "false", "false")),
            3);
  CHECK_STREQ(sorted_ids(&woken), "@alice:hs;@bob:hs;@carol:hs;");
  CHECK(!mx_room_index_is_member(ix, S("@carol:hs"), S("!r1:hs")));
  /* Join: added, and then woken by messages. */
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r1:hs", "m.room.member", "\"@carol:hs\"",
                                   "\"join\"", "false", "false")),
            3);
  CHECK(mx_room_index_is_member(ix, S("@carol:hs"), S("!r1:hs")));
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r1:hs", "m.room.message", "null", "null",
                                   "false", "false")),
            3);
  CHECK_STREQ(sorted_ids(&woken), "@alice:hs;@bob:hs;@carol:hs;");
  /* Kick (a leave by someone else): the leaver hears it, then is out. */
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r1:hs", "m.room.member", "\"@bob:hs\"",
                                   "\"leave\"", "false", "false")),
            3);
  CHECK_STREQ(sorted_ids(&woken), "@alice:hs;@bob:hs;@carol:hs;");
  CHECK(!mx_room_index_is_member(ix, S("@bob:hs"), S("!r1:hs")));
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r1:hs", "m.room.message", "null", "null",
                                   "false", "false")),
            2);
  CHECK_STREQ(sorted_ids(&woken), "@alice:hs;@carol:hs;");
  /* Ban. */
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r1:hs", "m.room.member", "\"@carol:hs\"",
                                   "\"ban\"", "false", "false")),
            2);
  CHECK(!mx_room_index_is_member(ix, S("@carol:hs"), S("!r1:hs")));
  /* Display name change (join -> join): no change, room woken. */
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r1:hs", "m.room.member", "\"@alice:hs\"",
                                   "\"join\"", "false", "false")),
            1);
  CHECK_INT(mx_room_index_room_size(ix, S("!r1:hs")), 1);
  /* A join by a user without a stream: woken nobody extra, not indexed. */
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r1:hs", "m.room.member", "\"@dave:hs\"",
                                   "\"join\"", "false", "false")),
            1);
  CHECK(!mx_room_index_is_member(ix, S("@dave:hs"), S("!r1:hs")));
  /* Knock: the knocker hears of it. */
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r2:hs", "m.room.member", "\"@alice:hs\"",
                                   "\"knock\"", "false", "false")),
            3);
  CHECK(!mx_room_index_is_member(ix, S("@alice:hs"), S("!r2:hs")));
}

static void test_events_outliers_rejected(void) {
  setup();
  /* A remote invite is an outlier: the invitee still hears of it. */
  CHECK_INT(row(MX_REPL_EVENTS, EV("!remote:other", "m.room.member",
                                   "\"@alice:hs\"", "\"invite\"", "false",
                                   "true")),
            1);
  CHECK_STREQ(sorted_ids(&woken), "@alice:hs;");
  /* Outlier joins do not enter the index. */
  CHECK_INT(row(MX_REPL_EVENTS, EV("!remote:other", "m.room.member",
                                   "\"@alice:hs\"", "\"join\"", "false",
                                   "true")),
            1);
  CHECK(!mx_room_index_is_member(ix, S("@alice:hs"), S("!remote:other")));
  /* Rejected membership: nobody, no change. */
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r1:hs", "m.room.member", "\"@bob:hs\"",
                                   "\"leave\"", "true", "false")),
            0);
  CHECK(mx_room_index_is_member(ix, S("@bob:hs"), S("!r1:hs")));
  /* Empty state key (not a member event of anybody). */
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r2:hs", "m.room.member", "\"\"",
                                   "\"join\"", "false", "false")),
            2);
}

static void test_events_state_rows(void) {
  setup();
  CHECK_INT(row(MX_REPL_EVENTS, "[\"state\",[\"!r1:hs\",\"m.room.member\","
                                "\"@alice:hs\",\"$W3\"]]"),
            0);
  CHECK_INT(row(MX_REPL_EVENTS, "[\"state\",[\"!r1:hs\",\"m.room.topic\","
                                "\"\",null]]"),
            0);
  CHECK_INT(row(MX_REPL_EVENTS, "[\"state-all\",[\"!r1:hs\"]]"), 0);
  CHECK_STREQ(sorted_ids(&woken), "");
  CHECK(mx_room_index_is_member(ix, S("@alice:hs"), S("!r1:hs")));
  CHECK_INT(row(MX_REPL_EVENTS, "[\"future\",[\"!r1:hs\"]]"), MX_ERR_INVALID);
  CHECK_INT(row(MX_REPL_EVENTS, "[\"ev\",[\"$e\",\"!r1:hs\"]]"),
            MX_ERR_INVALID);
  CHECK_INT(row(MX_REPL_EVENTS, "[\"ev\",[\"$e\",7,\"m.room.message\"]]"),
            MX_ERR_INVALID);
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r1:hs", "m.room.member", "5", "\"join\"",
                                   "false", "false")),
            MX_ERR_INVALID);
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r1:hs", "m.room.member", "\"@a\"",
                                   "\"join\"", "\"yes\"", "false")),
            MX_ERR_INVALID);
  CHECK_INT(row(MX_REPL_EVENTS, "[\"ev\",{}]"), MX_ERR_INVALID);
  CHECK_INT(row(MX_REPL_EVENTS, "[]"), MX_ERR_INVALID);
  CHECK_INT(row(MX_REPL_EVENTS, "{}"), MX_ERR_INVALID);
}

static void test_typing_receipts(void) {
  setup();
  CHECK_INT(row(MX_REPL_TYPING, "[\"!r2:hs\",[\"@bob:hs\"]]"), 2);
  CHECK_STREQ(sorted_ids(&woken), "@bob:hs;@carol:hs;");
  CHECK_INT(row(MX_REPL_TYPING, "[\"!r2:hs\",[]]"), 2);
  CHECK_INT(row(MX_REPL_RECEIPTS,
                "[\"!r1:hs\",\"m.read\",\"@bob:hs\",\"$MA\",null,"
                "{\"ts\":1795508778805}]"),
            2);
  CHECK_STREQ(sorted_ids(&woken), "@alice:hs;@bob:hs;");
  /* A private receipt only shows in its owner's sync. */
  CHECK_INT(row(MX_REPL_RECEIPTS,
                "[\"!r1:hs\",\"m.read.private\",\"@alice:hs\",\"$MA\",null,"
                "{\"ts\":1795508780331}]"),
            1);
  CHECK_STREQ(sorted_ids(&woken), "@alice:hs;");
  CHECK_INT(row(MX_REPL_RECEIPTS,
                "[\"!r2:hs\",\"m.read\",\"@carol:hs\",\"$x\",\"$thread\",{}]"),
            2);
  CHECK_INT(row(MX_REPL_TYPING, "[7,[]]"), MX_ERR_INVALID);
  CHECK_INT(row(MX_REPL_RECEIPTS, "[\"!r1:hs\",\"m.read\"]"), MX_ERR_INVALID);
}

static void test_user_streams(void) {
  setup();
  CHECK_INT(row(MX_REPL_TO_DEVICE, "[\"@bob:hs\"]"), 1);
  CHECK_STREQ(sorted_ids(&woken), "@bob:hs;");
  /* Messages queued for a remote server: nobody here. */
  CHECK_INT(row(MX_REPL_TO_DEVICE, "[\"remote.example.org\"]"), 0);
  CHECK_INT(row(MX_REPL_TO_DEVICE, "[\"@dave:hs\"]"), 0);
  CHECK_INT(row(MX_REPL_ACCOUNT_DATA, "[\"@alice:hs\",null,\"org.example.x\"]"),
            1);
  CHECK_STREQ(sorted_ids(&woken), "@alice:hs;");
  CHECK_INT(row(MX_REPL_ACCOUNT_DATA, "[\"@bob:hs\",\"!r1:hs\",\"m.fully_read\"]"),
            1);
  CHECK_STREQ(sorted_ids(&woken), "@bob:hs;");
  CHECK_INT(row(MX_REPL_PUSH_RULES, "[\"@carol:hs\"]"), 1);
  CHECK_STREQ(sorted_ids(&woken), "@carol:hs;");
  CHECK_INT(row(MX_REPL_THREAD_SUBSCRIPTIONS,
                "[\"@carol:hs\",\"!r2:hs\",\"$root\"]"),
            1);
  CHECK_STREQ(sorted_ids(&woken), "@carol:hs;");
  CHECK_INT(row(MX_REPL_PUSH_RULES, "[null]"), MX_ERR_INVALID);
  CHECK_INT(row(MX_REPL_TO_DEVICE, "[]"), MX_ERR_INVALID);
}

static void test_room_streams(void) {
  setup();
  CHECK_INT(row(MX_REPL_UN_PARTIAL_STATED_ROOM, "[\"!r1:hs\"]"), 2);
  CHECK_STREQ(sorted_ids(&woken), "@alice:hs;@bob:hs;");
  CHECK_INT(row(MX_REPL_STICKY_EVENTS, "[\"!r2:hs\",\"$sticky\"]"), 2);
  CHECK_STREQ(sorted_ids(&woken), "@bob:hs;@carol:hs;");
}

/* Streams without anything for /sync: not even parsed. */
static void test_ignored_streams(void) {
  setup();
  static const mx_repl_stream none[] = {
      MX_REPL_BACKFILL, MX_REPL_PRESENCE_FEDERATION, MX_REPL_PUSHERS,
      MX_REPL_CACHES, MX_REPL_FEDERATION, MX_REPL_UN_PARTIAL_STATED_EVENT,
      MX_REPL_QUARANTINED_MEDIA};
  for (size_t i = 0; i < sizeof(none) / sizeof(none[0]); i++) {
    CHECK_INT(row(none[i], "[\"@alice:hs\",\"!r1:hs\"]"), 0);
    CHECK_INT(row(none[i], "not even json"), 0);
  }
  CHECK_STREQ(sorted_ids(&woken), "");
  /* Exactly these streams cannot wake anyone. */
  int matter = 0;
  for (int s = 0; s < MX_REPL_STREAM_COUNT; s++) {
    bool ignored = false;
    for (size_t i = 0; i < sizeof(none) / sizeof(none[0]); i++)
      ignored |= none[i] == (mx_repl_stream)s;
    CHECK(mx_wake_stream_matters((mx_repl_stream)s) == !ignored);
    matter += mx_wake_stream_matters((mx_repl_stream)s);
  }
  CHECK_INT(matter, 12);
  CHECK(!mx_wake_stream_matters(MX_REPL_STREAM_COUNT));
  CHECK_INT(row((mx_repl_stream)MX_REPL_STREAM_COUNT, "[]"), MX_ERR_NOTFOUND);
  CHECK_INT(row((mx_repl_stream)-1, "[]"), MX_ERR_NOTFOUND);
}

#define PRES(user, state, active_ts, sync_ts, status, cur)                  \
  "[\"" user "\",\"" state "\"," active_ts ",1795508783356," sync_ts ","     \
  status "," cur "]"

static void test_presence_fanout(void) {
  setup();
  /* bob shares !r1 with alice and !r2 with carol: each once. */
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@bob:hs", "online", "1000", "1000",
                                       "null", "true")),
            3);
  CHECK_STREQ(sorted_ids(&woken), "@alice:hs;@bob:hs;@carol:hs;");
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@alice:hs", "online", "1000", "1000",
                                       "null", "true")),
            2);
  CHECK_STREQ(sorted_ids(&woken), "@alice:hs;@bob:hs;");
  /* A user without a stream: their rooms are unknown. */
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@dave:hs", "online", "1000", "1000",
                                       "null", "true")),
            0);
  CHECK_STREQ(sorted_ids(&unresolved), "presence:@dave:hs;");
  /* An open user in no room: just them. */
  mx_room_index_user_open(ix, S("@erin:hs"));
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@erin:hs", "online", "1000", "1000",
                                       "null", "true")),
            1);
  CHECK_INT(row(MX_REPL_PRESENCE, "[\"@bob:hs\",\"online\",\"x\"]"),
            MX_ERR_INVALID);
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@bob:hs", "online", "1000", "1000",
                                       "7", "true")),
            MX_ERR_INVALID);
}

/* should_notify() from synapse/handlers/presence.py. */
static void test_presence_filter(void) {
  setup();
  mx_wake_stats st;
  /* First sight notifies. */
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@carol:hs", "online", "1000", "1000",
                                       "null", "true")),
            2);
  /* The same state again (a flush): nobody. */
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@carol:hs", "online", "1000", "1000",
                                       "null", "true")),
            0);
  /* Only last_user_sync_ts moved: nobody. */
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@carol:hs", "online", "1000", "99000",
                                       "null", "true")),
            0);
  /* Online and active, last_active bumped by more than a minute: still
   * nobody (only notified when not currently active). */
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@carol:hs", "online", "70000", "99000",
                                       "null", "true")),
            0);
  /* currently_active flips: notify. */
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@carol:hs", "online", "70000", "99000",
                                       "null", "false")),
            2);
  /* Not active, last_active bumped by more than the granularity. */
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@carol:hs", "online", "140001",
                                       "99000", "null", "false")),
            2);
  /* ... by less: nobody. */
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@carol:hs", "online", "150000",
                                       "99000", "null", "false")),
            0);
  /* Status message set, then changed. */
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@carol:hs", "online", "150000",
                                       "99000", "\"lunch\"", "false")),
            2);
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@carol:hs", "online", "150000",
                                       "99000", "\"lunch!\"", "false")),
            2);
  /* State change. */
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@carol:hs", "unavailable", "150000",
                                       "99000", "\"lunch!\"", "false")),
            2);
  /* Not online: last_active bump over the granularity notifies. */
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@carol:hs", "unavailable", "150500",
                                       "99000", "\"lunch!\"", "false")),
            0);
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@carol:hs", "unavailable", "300000",
                                       "99000", "\"lunch!\"", "false")),
            2);
  mx_wake_stats_get(w, &st);
  CHECK_INT(st.presence_filtered, 5);
  CHECK_INT(st.presence_cached, 1);
  CHECK(st.presence_bytes > 0);
  /* After a reset every user notifies once more. */
  mx_wake_reset(w);
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@carol:hs", "unavailable", "300000",
                                       "99000", "\"lunch!\"", "false")),
            2);
}

static void test_presence_cache_cap(void) {
  mx_wake_free(w);
  mx_wake_opts o = {.presence_cache_max = 2};
  w = mx_wake_new(ix, &o);
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@x1", "online", "1", "1", "null",
                                       "true")),
            0);
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@x2", "online", "1", "1", "null",
                                       "true")),
            0);
  CHECK_INT(row(MX_REPL_PRESENCE, PRES("@x3", "online", "1", "1", "null",
                                       "true")),
            0);
  mx_wake_stats st;
  mx_wake_stats_get(w, &st);
  CHECK_INT(st.presence_cache_clears, 1);
  CHECK_INT(st.presence_cached, 1);
  CHECK_INT(st.unresolved, 3);
}

static void test_device_lists_profile(void) {
  setup();
  CHECK_INT(row(MX_REPL_DEVICE_LISTS, "[\"@bob:hs\",false,false]"), 3);
  CHECK_STREQ(sorted_ids(&woken), "@alice:hs;@bob:hs;@carol:hs;");
  /* A cross-signature: the signer only. */
  CHECK_INT(row(MX_REPL_DEVICE_LISTS, "[\"@bob:hs\",true,false]"), 1);
  CHECK_STREQ(sorted_ids(&woken), "@bob:hs;");
  /* Outbound pokes computed: nothing for clients. */
  CHECK_INT(row(MX_REPL_DEVICE_LISTS, "[\"@bob:hs\",false,true]"), 0);
  CHECK_INT(row(MX_REPL_DEVICE_LISTS, "[\"@bob:hs\",0,1]"), 0);
  CHECK_INT(row(MX_REPL_DEVICE_LISTS, "[\"@bob:hs\",1,0]"), 1);
  CHECK_INT(row(MX_REPL_DEVICE_LISTS, "[\"@dave:hs\",false,false]"), 0);
  CHECK_STREQ(sorted_ids(&unresolved), "device_lists:@dave:hs;");
  CHECK_INT(row(MX_REPL_DEVICE_LISTS, "[\"@bob:hs\",\"no\",false]"),
            MX_ERR_INVALID);
  CHECK_INT(row(MX_REPL_PROFILE_UPDATES,
                "[\"@carol:hs\",\"update\",[\"displayname\"]]"),
            2);
  CHECK_STREQ(sorted_ids(&woken), "@bob:hs;@carol:hs;");
  CHECK_INT(row(MX_REPL_PROFILE_UPDATES, "[\"@alice:hs\",\"left_room\",null]"),
            2);
}

/* Ids are compared after JSON unescaping (Synapse escapes non-ASCII). */
static void test_escaped_ids(void) {
  setup();
  mx_room_index_user_open(ix, S("@\xc3\xa9mile:hs"));
  mx_room_index_join(ix, S("@\xc3\xa9mile:hs"), S("!r1:hs"));
  CHECK_INT(row(MX_REPL_PUSH_RULES, "[\"@\\u00e9mile:hs\"]"), 1);
  CHECK_STREQ(sorted_ids(&woken), "@\xc3\xa9mile:hs;");
  CHECK_INT(row(MX_REPL_EVENTS, EV("!r\\u0031:hs", "m.room.message", "null",
                                   "null", "false", "false")),
            3);
}

static void test_limits_and_stats(void) {
  setup();
  size_t n = MX_WAKE_MAX_ROW + 16;
  char *big = malloc(n + 1);
  CHECK(big != NULL);
  if (!big)
    return;
  memset(big, ' ', n);
  memcpy(big, "[\"!r1:hs\",[]]", 13);
  big[n] = '\0';
  CHECK_INT(row(MX_REPL_TYPING, big), MX_ERR_INVALID);
  free(big);
  CHECK_INT(row(MX_REPL_TYPING, "[\"!r1:hs\",[]]"), 2);
  mx_wake_stats st;
  mx_wake_stats_get(w, &st);
  CHECK_INT(st.rows, 2);
  CHECK_INT(st.invalid, 1);
  CHECK_INT(st.woken, 2);
}

/* Lines Synapse 1.163 published for a session (createRoom, invite, join,
 * message, leave), through the parser and the rules. */
static mx_buf per_token;
static void pipe_row(const mx_repl_row *r, void *ud) {
  mx_buf_reset(&woken);
  int rv = mx_wake_row(w, r, &cb);
  mx_buf_appendf(&per_token, "%s %llu %d %s\n", mx_repl_stream_name(r->stream),
                 (unsigned long long)r->token, rv, sorted_ids(&woken));
}
static void pipe_net(int scope, mx_repl_reason reason, void *ud) {
  mx_buf_appendf(&per_token, "net %s\n", mx_repl_reason_name(reason));
}

static void test_pipeline(void) {
  setup();
  mx_room_index_user_open(ix, S("@alice1795508763:mxsse.test"));
  mx_room_index_user_open(ix, S("@bob1795508763:mxsse.test"));
  mx_buf_init(&per_token, 1 << 16);
  mx_repl_callbacks pc = {pipe_row, pipe_net, NULL};
  mx_repl_proto *p = mx_repl_proto_new(&pc, NULL);
#define R "!JHe3082-lesfNyKj05UAJVY0pVDpwsrHialWy-LG7Zc"
#define A "@alice1795508763:mxsse.test"
#define B "@bob1795508763:mxsse.test"
  static const char *const lines[] = {
      "RDATA events master batch [\"ev\",[\"$W3r6\",\"" R "\",\"m.room.member\",\"" A "\",null,null,\"join\",false,false]]",
      "RDATA events master 3 [\"state\",[\"" R "\",\"m.room.member\",\"" A "\",\"$W3r6\"]]",
      "LOCK_RELEASED [\"master\",\"new_event_during_purge_lock\",\"" R "\"]",
      "RDATA events master batch [\"ev\",[\"$DPg\",\"" R "\",\"m.room.member\",\"" B "\",null,null,\"invite\",false,false]]",
      "RDATA events master 9 [\"state\",[\"" R "\",\"m.room.member\",\"" B "\",\"$DPg\"]]",
      "RDATA events master batch [\"ev\",[\"$2no\",\"" R "\",\"m.room.member\",\"" B "\",null,null,\"join\",false,false]]",
      "RDATA events master 10 [\"state\",[\"" R "\",\"m.room.member\",\"" B "\",\"$2no\"]]",
      "RDATA events master 11 [\"ev\",[\"$MA5\",\"" R "\",\"m.room.message\",null,null,null,null,false,false]]",
      "RDATA presence master 2 [\"" A "\",\"offline\",1795508772723,1795508772739,0,null,false]",
      "RDATA typing master 1 [\"" R "\",[\"" B "\"]]",
      "RDATA receipts master 3 [\"" R "\",\"m.read.private\",\"" A "\",\"$MA5\",null,{\"ts\":1795508780331}]",
      "RDATA caches master 4 [\"get_user_by_id\",[\"" A "\"],1795508765681]",
      "RDATA events master batch [\"ev\",[\"$Ihc\",\"" R "\",\"m.room.member\",\"" B "\",null,null,\"leave\",false,false]]",
      "RDATA events master 17 [\"state\",[\"" R "\",\"m.room.member\",\"" B "\",\"$Ihc\"]]",
      "RDATA events master 18 [\"ev\",[\"$Qu1\",\"" R "\",\"m.room.topic\",\"\",null,null,null,false,false]]",
      "REPLICATE ",
      "POSITION typing master 0 0",
  };
  for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++)
    mx_repl_proto_feed(p, lines[i], strlen(lines[i]));
  CHECK_STREQ(per_token.data,
              "events 3 1 " A ";\n"
              "events 3 0 \n"
              "events 9 2 " A ";" B ";\n"
              "events 9 0 \n"
              "events 10 2 " A ";" B ";\n"
              "events 10 0 \n"
              "events 11 2 " A ";" B ";\n"
              "presence 2 2 " A ";" B ";\n"
              "typing 1 2 " A ";" B ";\n"
              "receipts 3 1 " A ";\n"
              "caches 4 0 \n"
              "events 17 2 " A ";" B ";\n"
              "events 17 0 \n"
              "events 18 1 " A ";\n"
              "net backwards\n");
  mx_repl_proto_free(p);
  mx_buf_free(&per_token);
#undef R
#undef A
#undef B
}

static void cleanup(void) {
  mx_wake_free(w);
  mx_room_index_free(ix);
  mx_buf_free(&woken);
  mx_buf_free(&unresolved);
}

int main(void) {
  mx_hash_seed(5, 6);
  mx_buf_init(&woken, 1 << 20);
  mx_buf_init(&unresolved, 1 << 20);
  atexit(cleanup);
  TAP_RUN(TAP_CASE(test_events_message), TAP_CASE(test_events_membership),
          TAP_CASE(test_events_outliers_rejected),
          TAP_CASE(test_events_state_rows), TAP_CASE(test_typing_receipts),
          TAP_CASE(test_user_streams), TAP_CASE(test_room_streams),
          TAP_CASE(test_ignored_streams), TAP_CASE(test_presence_fanout),
          TAP_CASE(test_presence_filter), TAP_CASE(test_presence_cache_cap),
          TAP_CASE(test_device_lists_profile), TAP_CASE(test_escaped_ids),
          TAP_CASE(test_limits_and_stats), TAP_CASE(test_pipeline));
}
