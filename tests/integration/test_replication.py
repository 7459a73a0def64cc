"""Replication mode end to end: mxsse on the bed's Redis replication channel
(`--replication redis://... --server-name ...`), parking SSE streams between
batches and fetching `/sync?timeout=0` only when a row concerns the user.

What is proven here, against a real Synapse with its real Redis feed:

1. every kind of change a /sync can carry reaches a connected SSE client
   within one second with the long-poll fallback off (one test id per
   kind; latency from the end of the triggering request to the arrival
   of the SSE event that carries it), and no long-poll is ever made;
2. idle streams cost nothing upstream: zero /sync on Synapse's own
   counters with set_presence=offline, about one per stream per 25 s
   with presence on, and the user stays online while idle and goes
   offline after the stream closes;
3. Redis restarted, Synapse restarted, and the replication links cut
   (Redis CLIENT KILL) under connected clients: no message or to-device
   message lost or duplicated, streams stay open with their heartbeats,
   reconnects and safety-net fetches counted;
4. with the fallback on, streams long-poll while Redis is down and park
   again when it is back;
5. a Redis account that may only SUBSCRIBE to the server-name channel is
   all mxsse needs.

Figures measured on the way are printed at the end of the run and, with
MXSSE_REPLICATION_REPORT=<file>, written there as JSON. MXSSE_IDLE_STREAMS
(default 20) sets the number of streams of the idle tests;
MXSSE_REPLICATION_ARGS adds mxsse flags to every replication-mode start
(e.g. "--wake-debounce 1500" shows that the latency tests can fail).

Restart tests run on a bed of their own (fixture `own_bed`), so that the
shared bed's other users never see Redis or Synapse go away.

One module on purpose: the numbered claims below share one bed and
its helpers, and read as one specification.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from collections import defaultdict
from datetime import datetime
from typing import Any, Callable

import pytest

from conftest import Client, q, send_text, shared_room
from measurements import report_fixture, synapse_sync_requests
from sseclient import Event, H2Connection, SSEStream, h2_available
from testbed import LOOPBACK, Testbed, http_json, redis_ping, synapse_venv

SSE_PATH = "/_matrix/client/v3/sync/sse"
DEADLINE = 1.0          # the promise: a change reaches the client within 1 s
MEASURE_TIMEOUT = 40.0  # how long a late change is still waited for (to report it)
PRESENCE_INTERVAL = 25.0
SYNC_ONLINE_TIMEOUT = 30.0  # Synapse's presence.sync_online_timeout
TEST_PARAM = "org.mxsse.test.stream"  # forwarded untouched, ignored by Synapse
IDLE_STREAMS = int(os.environ.get("MXSSE_IDLE_STREAMS", "20"))

MEASURED: dict[str, list[float]] = defaultdict(list)

pytestmark = pytest.mark.skipif(not h2_available(), reason="libnghttp2 (HPACK) not loadable")


_report_measurements = report_fixture(
    "mxsse-replication-measurements", "replication measurements (seconds unless named otherwise)",
    "MXSSE_REPLICATION_REPORT", MEASURED, key_width=52)


# --------------------------------------------------------------------------
# Helpers: mxsse, streams, Synapse


def replication_args(bed: Testbed, fallback: bool = False) -> list[str]:
    args = ["--replication", f"redis://{LOOPBACK}:{bed.redis_port}", "--server-name", bed.server_name]
    if not fallback:
        args += ["--longpoll-fallback", "false"]
    return args + shlex.split(os.environ.get("MXSSE_REPLICATION_ARGS", ""))


def metric(m: Any, key: str) -> float:
    return m.metrics().get(key, 0.0)


def sync_reasons(m: Any) -> dict[str, float]:
    out = {}
    for k, v in m.metrics().items():
        if k.startswith('mxsse_sync_requests_total{reason="'):
            out[k.split('"')[1]] = v
    return out


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def log_tail(m: Any, n: int = 60, grep: str | None = None) -> str:
    lines = m.read_log().splitlines()
    if grep:
        lines = [l for l in lines if grep in l]
    return "\n".join(lines[-n:])


def log_time(line: str) -> float:
    """Wall-clock seconds of an mxsse log line (2026-01-01T00:00:00.000Z ...)."""
    stamp = line.split(" ", 1)[0].rstrip("Z")
    return datetime.fromisoformat(stamp).timestamp()


def upstream_syncs(m: Any) -> list[tuple[float, dict[str, str]]]:
    """(time, query) of each /sync mxsse sent upstream, from its debug log."""
    out = []
    for line in m.read_log().splitlines():
        if "event=upstream.start" in line and "target=/_matrix/client/v3/sync?" in line:
            target = line.split("target=", 1)[1].split(" ", 1)[0]
            query = dict(urllib.parse.parse_qsl(target.split("?", 1)[1]))
            out.append((log_time(line), query))
    return out


def login(base_url: str, user: Client) -> Client:
    """A new device (and access token) for an existing user."""
    status, body = http_json("POST", base_url + "/_matrix/client/v3/login", {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user.user_id.split(":")[0][1:]},
        "password": user.password,
    })
    assert status == 200, body
    return Client(base_url, {**body, "password": user.password})


def presence_of(viewer: Client, user_id: str) -> str:
    return viewer.get(f"/presence/{q(user_id)}/status")["presence"]


# -- reading /sync bodies

def joined(sync: dict, room: str) -> dict:
    return sync.get("rooms", {}).get("join", {}).get(room, {})


def room_events(sync: dict, room: str) -> list[dict]:
    """Timeline then state events of a joined room in one batch."""
    r = joined(sync, room)
    return r.get("timeline", {}).get("events", []) + r.get("state", {}).get("events", [])


def ephemeral(sync: dict, room: str, etype: str) -> list[dict]:
    return [e for e in joined(sync, room).get("ephemeral", {}).get("events", []) if e["type"] == etype]


def room_account_data(sync: dict, room: str, etype: str) -> list[dict]:
    return [e for e in joined(sync, room).get("account_data", {}).get("events", []) if e["type"] == etype]


def global_account_data(sync: dict, etype: str) -> list[dict]:
    return [e for e in sync.get("account_data", {}).get("events", []) if e["type"] == etype]


def has_member_event(room: str, user_id: str, membership: str, sender: str | None = None
                     ) -> Callable[[dict], bool]:
    def pred(sync: dict) -> bool:
        return any(e["type"] == "m.room.member" and e.get("state_key") == user_id
                   and e["content"].get("membership") == membership
                   and (sender is None or e["sender"] == sender)
                   for e in room_events(sync, room))
    return pred


class Streams:
    """SSE streams over h2c, one HTTP/2 connection each; closed at teardown
    (before mxsse is stopped)."""

    def __init__(self) -> None:
        self.conns: list[H2Connection] = []

    def open(self, m: Any, client: Client, params: dict | None = None) -> SSEStream:
        conn = H2Connection(m.url)
        self.conns.append(conn)
        target = SSE_PATH + ("?" + urllib.parse.urlencode(params) if params else "")
        s = conn.open("GET", target, headers={"Authorization": f"Bearer {client.access_token}"})
        s.info["conn"] = conn
        return s

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.conns.clear()


@pytest.fixture
def streams(mxsse_factory):
    s = Streams()
    yield s
    s.close()


def first_event(s: SSEStream, timeout: float = 30) -> Event:
    ev = s.next_event(timeout)
    assert s.status == 200, s.describe()
    assert ev.event == "message" and ev.id == ev.json()["next_batch"], ev.data[:300]
    return ev


def wait_new(s: SSEStream, start: int, pred: Callable[[dict], bool], timeout: float) -> Event | None:
    """The first event at index >= start (among events) whose body satisfies
    pred, or None after timeout."""
    found: list[Event] = []
    checked = [start]

    def check() -> bool:
        evs = [i for i in s.items if isinstance(i, Event)]
        for k in range(checked[0], len(evs)):
            ev = evs[k]
            if ev.event == "message" and pred(ev.json()):
                found.append(ev)
                return True
        checked[0] = len(evs)
        return s.done

    s.wait(check, timeout)
    return found[0] if found else None


def settle(s: SSEStream, quiet: float = 0.6, limit: float = 10) -> None:
    """Waits until the stream has had no event for `quiet` seconds, so that
    the effects of a test's preparation are delivered before it measures."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        n = len(s.events)
        time.sleep(quiet)
        if len(s.events) == n:
            return


# --------------------------------------------------------------------------
# 1. Each kind of change, within one second


class Scene:
    """alice streams (one device); alice2 is her second device; bob shares
    `room` with her (bob created it: he may kick and ban); carol is a third
    user. Only alice streams unless a kind opens more."""

    def __init__(self, bed: Testbed, m: Any, streams: Streams, register: Callable[[str], Client]):
        self.bed, self.m, self.streams = bed, m, streams
        self.alice, self.bob, self.carol = register("alice"), register("bob"), register("carol")
        self.alice2 = login(bed.synapse_url, self.alice)
        self.room = shared_room(self.alice, self.bob)
        self.s = streams.open(m, self.alice)
        first_event(self.s)
        self.samples: list[tuple[str, float]] = []
        self.late: list[str] = []

    def measure(self, kind: str, action: Callable[[], Any], pred: Callable[[Any], Callable[[dict], bool]],
                stream: SSEStream | None = None) -> Event | None:
        """Runs action (the triggering request) and waits for the SSE event
        satisfying pred(action's result) on alice's stream (or `stream`);
        records the latency from the end of the request to the event's
        arrival."""
        s = stream or self.s
        settle(s)
        start = len(s.events)
        result = action()
        t_done = time.monotonic()
        ev = wait_new(s, start, pred(result), MEASURE_TIMEOUT)
        if ev is None:
            self.late.append(f"{kind}: not delivered within {MEASURE_TIMEOUT} s")
            return None
        latency = ev.t - t_done
        MEASURED[f"latency_s[{kind}]"].append(latency)
        self.samples.append((kind, latency))
        return ev


def has_event(room: str, event_id: str) -> Callable[[dict], bool]:
    return lambda sync: event_id in [e["event_id"] for e in room_events(sync, room)]


def prepared(sc: Scene, action: Callable[[], Any], pred: Callable[[Any], Callable[[dict], bool]]) -> Any:
    """A preparation step: runs action and waits until its effect is on
    alice's stream, so that the measured step after it starts clean."""
    start = len(sc.s.events)
    result = action()
    assert wait_new(sc.s, start, pred(result), MEASURE_TIMEOUT), "preparation step not delivered"
    return result


def kind_message(sc: Scene) -> None:
    for i in range(3):
        sc.measure("message", lambda: send_text(sc.bob, sc.room, f"hello {i}"),
                   lambda eid: has_event(sc.room, eid))


def _state_kind(sc: Scene, kind: str, etype: str, key: str) -> None:
    for i in range(2):
        value = f"{key} {secrets.token_hex(4)}"
        sc.measure(kind, lambda: sc.bob.put(f"/rooms/{q(sc.room)}/state/{etype}/", {key: value})["event_id"],
                   lambda eid: lambda sync: any(e["event_id"] == eid and e["content"].get(key) == value
                                                for e in room_events(sync, sc.room)))


def kind_room_name(sc: Scene) -> None:
    _state_kind(sc, "room_name", "m.room.name", "name")


def kind_room_topic(sc: Scene) -> None:
    _state_kind(sc, "room_topic", "m.room.topic", "topic")


def kind_invite(sc: Scene) -> None:
    """carol (no stream) invites alice to a room of hers."""
    for _ in range(2):
        room = sc.carol.post("/createRoom", {"preset": "private_chat"})["room_id"]
        sc.measure("invite", lambda: sc.carol.post(f"/rooms/{q(room)}/invite", {"user_id": sc.alice.user_id}),
                   lambda _: lambda sync: room in sync.get("rooms", {}).get("invite", {}))


def _carol_invited(sc: Scene) -> None:
    prepared(sc, lambda: sc.bob.post(f"/rooms/{q(sc.room)}/invite", {"user_id": sc.carol.user_id}),
             lambda _: has_member_event(sc.room, sc.carol.user_id, "invite"))


def _carol_joins(sc: Scene) -> None:
    _carol_invited(sc)
    prepared(sc, lambda: sc.carol.post(f"/join/{q(sc.room)}"),
             lambda _: has_member_event(sc.room, sc.carol.user_id, "join"))


def kind_join(sc: Scene) -> None:
    """A room-mate joins alice's room."""
    _carol_invited(sc)
    sc.measure("join", lambda: sc.carol.post(f"/join/{q(sc.room)}"),
               lambda _: has_member_event(sc.room, sc.carol.user_id, "join"))


def kind_join_self(sc: Scene) -> None:
    """alice joins a room she was not in (through her other device); then a
    message there must reach her too (the room index learnt the join)."""
    room = sc.carol.post("/createRoom", {"preset": "public_chat"})["room_id"]
    sc.measure("join_self", lambda: sc.alice2.post(f"/join/{q(room)}"),
               lambda _: lambda sync: room in sync.get("rooms", {}).get("join", {}))
    for i in range(2):
        sc.measure("message_in_joined_room", lambda: send_text(sc.carol, room, f"welcome {i}"),
                   lambda eid: has_event(room, eid))


def kind_rejoin(sc: Scene) -> None:
    """alice leaves (from her other device), is invited again, joins again:
    each step reaches her stream, and so does a message afterwards."""
    sc.measure("rejoin:leave", lambda: sc.alice2.post(f"/rooms/{q(sc.room)}/leave"),
               lambda _: lambda sync: sc.room in sync.get("rooms", {}).get("leave", {}))
    sc.measure("rejoin:invite", lambda: sc.bob.post(f"/rooms/{q(sc.room)}/invite", {"user_id": sc.alice.user_id}),
               lambda _: lambda sync: sc.room in sync.get("rooms", {}).get("invite", {}))
    sc.measure("rejoin:join", lambda: sc.alice2.post(f"/join/{q(sc.room)}"),
               lambda _: lambda sync: sc.room in sync.get("rooms", {}).get("join", {}))
    sc.measure("rejoin:message", lambda: send_text(sc.bob, sc.room, "welcome back"),
               lambda eid: has_event(sc.room, eid))


def kind_redaction(sc: Scene) -> None:
    for i in range(2):
        eid = prepared(sc, lambda: send_text(sc.bob, sc.room, f"oops {i}"), lambda eid: has_event(sc.room, eid))
        sc.measure("redaction",
                   lambda: sc.bob.put(f"/rooms/{q(sc.room)}/redact/{q(eid)}/{secrets.token_hex(8)}", {})["event_id"],
                   lambda rid: lambda sync: any(e["event_id"] == rid and e["type"] == "m.room.redaction"
                                                for e in room_events(sync, sc.room)))


def kind_leave(sc: Scene) -> None:
    _carol_joins(sc)
    sc.measure("leave", lambda: sc.carol.post(f"/rooms/{q(sc.room)}/leave"),
               lambda _: has_member_event(sc.room, sc.carol.user_id, "leave", sc.carol.user_id))


def kind_kick(sc: Scene) -> None:
    _carol_joins(sc)
    sc.measure("kick", lambda: sc.bob.post(f"/rooms/{q(sc.room)}/kick", {"user_id": sc.carol.user_id}),
               lambda _: has_member_event(sc.room, sc.carol.user_id, "leave", sc.bob.user_id))


def kind_ban(sc: Scene) -> None:
    _carol_joins(sc)
    sc.measure("ban", lambda: sc.bob.post(f"/rooms/{q(sc.room)}/ban", {"user_id": sc.carol.user_id}),
               lambda _: has_member_event(sc.room, sc.carol.user_id, "ban", sc.bob.user_id))


def kind_kicked_self(sc: Scene) -> None:
    """alice herself is kicked: the room moves to rooms.leave."""
    sc.measure("kicked_self", lambda: sc.bob.post(f"/rooms/{q(sc.room)}/kick", {"user_id": sc.alice.user_id}),
               lambda _: lambda sync: sc.room in sync.get("rooms", {}).get("leave", {}))


def _typing(sc: Scene, on: bool) -> Any:
    body = {"typing": True, "timeout": 30000} if on else {"typing": False}
    return sc.bob.put(f"/rooms/{q(sc.room)}/typing/{q(sc.bob.user_id)}", body)


def _typists(sync: dict, room: str) -> list[list[str]]:
    return [e["content"]["user_ids"] for e in ephemeral(sync, room, "m.typing")]


def kind_typing_start(sc: Scene) -> None:
    for _ in range(2):
        sc.measure("typing_start", lambda: _typing(sc, True),
                   lambda _: lambda sync: any(sc.bob.user_id in u for u in _typists(sync, sc.room)))
        prepared(sc, lambda: _typing(sc, False),
                 lambda _: lambda sync: any(sc.bob.user_id not in u for u in _typists(sync, sc.room)))


def kind_typing_stop(sc: Scene) -> None:
    for _ in range(2):
        prepared(sc, lambda: _typing(sc, True),
                 lambda _: lambda sync: any(sc.bob.user_id in u for u in _typists(sync, sc.room)))
        sc.measure("typing_stop", lambda: _typing(sc, False),
                   lambda _: lambda sync: any(sc.bob.user_id not in u for u in _typists(sync, sc.room)))


def _receipt_kind(sc: Scene, kind: str, reader: Client, rtype: str) -> None:
    for i in range(2):
        eid = prepared(sc, lambda: send_text(sc.alice if reader is sc.bob else sc.bob, sc.room, f"read me {i}"),
                       lambda eid: has_event(sc.room, eid))

        def pred(_: Any, eid: str = eid) -> Callable[[dict], bool]:
            return lambda sync: any(reader.user_id in e["content"].get(eid, {}).get(rtype, {})
                                    for e in ephemeral(sync, sc.room, "m.receipt"))

        sc.measure(kind, lambda: reader.post(f"/rooms/{q(sc.room)}/receipt/{rtype}/{q(eid)}", {}), pred)


def kind_receipt(sc: Scene) -> None:
    """bob's public read receipt."""
    _receipt_kind(sc, "receipt", sc.bob, "m.read")


def kind_receipt_private(sc: Scene) -> None:
    """alice's own private read receipt, sent from her other device."""
    _receipt_kind(sc, "receipt_private", sc.alice2, "m.read.private")


def kind_room_account_data(sc: Scene) -> None:
    for _ in range(2):
        nonce = secrets.token_hex(6)
        sc.measure("room_account_data",
                   lambda: sc.alice2.put(f"/user/{q(sc.alice.user_id)}/rooms/{q(sc.room)}/account_data/"
                                         "org.mxsse.test.room", {"nonce": nonce}),
                   lambda _: lambda sync: any(e["content"].get("nonce") == nonce for e in
                                              room_account_data(sync, sc.room, "org.mxsse.test.room")))


def kind_global_account_data(sc: Scene) -> None:
    for _ in range(2):
        nonce = secrets.token_hex(6)
        sc.measure("global_account_data",
                   lambda: sc.alice2.put(f"/user/{q(sc.alice.user_id)}/account_data/org.mxsse.test.global",
                                         {"nonce": nonce}),
                   lambda _: lambda sync: any(e["content"].get("nonce") == nonce for e in
                                              global_account_data(sync, "org.mxsse.test.global")))


def kind_room_tag(sc: Scene) -> None:
    for _ in range(2):
        tag = f"u.mxsse.{secrets.token_hex(4)}"
        sc.measure("room_tag",
                   lambda: sc.alice2.put(f"/user/{q(sc.alice.user_id)}/rooms/{q(sc.room)}/tags/{q(tag)}",
                                         {"order": 0.5}),
                   lambda _: lambda sync: any(tag in e["content"].get("tags", {})
                                              for e in room_account_data(sync, sc.room, "m.tag")))


def kind_to_device(sc: Scene) -> None:
    for _ in range(3):
        nonce = secrets.token_hex(6)
        sc.measure("to_device",
                   lambda: sc.bob.put(f"/sendToDevice/org.mxsse.test.ping/{secrets.token_hex(8)}",
                                      {"messages": {sc.alice.user_id: {sc.alice.device_id: {"nonce": nonce}}}}),
                   lambda _: lambda sync: any(e.get("content", {}).get("nonce") == nonce
                                              for e in sync.get("to_device", {}).get("events", [])))


def _bob_streams(sc: Scene) -> None:
    """bob opens a stream of his own on the same mxsse (presence offline, so
    that it does not change his presence)."""
    first_event(sc.streams.open(sc.m, sc.bob, {"set_presence": "offline"}))


def _presence_kind(sc: Scene, kind: str) -> None:
    for _ in range(2):
        status = f"busy {secrets.token_hex(4)}"
        sc.measure(kind,
                   lambda: sc.bob.put(f"/presence/{q(sc.bob.user_id)}/status",
                                      {"presence": "online", "status_msg": status}),
                   lambda _: lambda sync: any(e["sender"] == sc.bob.user_id
                                              and e["content"].get("status_msg") == status
                                              for e in sync.get("presence", {}).get("events", [])))


def kind_presence(sc: Scene) -> None:
    """A room-mate (who has no stream on this mxsse) changes presence."""
    _presence_kind(sc, "presence")


def kind_presence_streaming_mate(sc: Scene) -> None:
    """Same, the room-mate streaming through the same mxsse."""
    _bob_streams(sc)
    _presence_kind(sc, "presence_streaming_mate")


def _device_list_kind(sc: Scene, kind: str) -> None:
    for _ in range(2):
        sc.measure(kind, lambda: login(sc.bed.synapse_url, sc.bob),
                   lambda _: lambda sync: sc.bob.user_id in sync.get("device_lists", {}).get("changed", []))


def kind_device_list(sc: Scene) -> None:
    """A room-mate (no stream here) logs in a new device."""
    _device_list_kind(sc, "device_list")


def kind_device_list_streaming_mate(sc: Scene) -> None:
    _bob_streams(sc)
    _device_list_kind(sc, "device_list_streaming_mate")


def kind_device_list_offline_stream(sc: Scene) -> None:
    """As device_list, seen by a stream with set_presence=offline (alice's
    second device): such a stream makes no presence syncs."""
    s2 = sc.streams.open(sc.m, sc.alice2, {"set_presence": "offline"})
    first_event(s2)
    sc.measure("device_list_offline_stream", lambda: login(sc.bed.synapse_url, sc.bob),
               lambda _: lambda sync: sc.bob.user_id in sync.get("device_lists", {}).get("changed", []),
               stream=s2)


def kind_device_keys(sc: Scene) -> None:
    """A room-mate (no stream here) uploads device keys for his device."""
    for i in range(2):
        dev = login(sc.bed.synapse_url, sc.bob)
        settle(sc.s)
        keys = {
            "user_id": dev.user_id, "device_id": dev.device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {f"curve25519:{dev.device_id}": secrets.token_urlsafe(32),
                     f"ed25519:{dev.device_id}": secrets.token_urlsafe(32)},
            "signatures": {dev.user_id: {f"ed25519:{dev.device_id}": secrets.token_urlsafe(64)}},
        }
        sc.measure("device_keys", lambda: dev.post("/keys/upload", {"device_keys": keys}),
                   lambda _: lambda sync: sc.bob.user_id in sync.get("device_lists", {}).get("changed", []))


def kind_push_rules(sc: Scene) -> None:
    for _ in range(2):
        rule = f"org.mxsse.{secrets.token_hex(4)}"
        sc.measure("push_rules",
                   lambda: sc.alice2.put(f"/pushrules/global/override/{rule}", {
                       "actions": ["dont_notify"],
                       "conditions": [{"kind": "event_match", "key": "content.body", "pattern": rule}]}),
                   lambda _: lambda sync: any(r.get("rule_id") == rule
                                              for e in global_account_data(sync, "m.push_rules")
                                              for r in e["content"].get("global", {}).get("override", [])))


KINDS: dict[str, Callable[[Scene], None]] = {
    "message": kind_message,
    "room_name": kind_room_name,
    "room_topic": kind_room_topic,
    "redaction": kind_redaction,
    "invite": kind_invite,
    "join": kind_join,
    "join_self": kind_join_self,
    "rejoin": kind_rejoin,
    "leave": kind_leave,
    "kick": kind_kick,
    "ban": kind_ban,
    "kicked_self": kind_kicked_self,
    "typing_start": kind_typing_start,
    "typing_stop": kind_typing_stop,
    "receipt": kind_receipt,
    "receipt_private": kind_receipt_private,
    "room_account_data": kind_room_account_data,
    "global_account_data": kind_global_account_data,
    "room_tag": kind_room_tag,
    "to_device": kind_to_device,
    "presence": kind_presence,
    "presence_streaming_mate": kind_presence_streaming_mate,
    "device_list": kind_device_list,
    "device_list_streaming_mate": kind_device_list_streaming_mate,
    "device_list_offline_stream": kind_device_list_offline_stream,
    "device_keys": kind_device_keys,
    "push_rules": kind_push_rules,
}


# A room-mate with no stream on this mxsse: their rooms are not in the index,
# and waking every stream for every stranger's presence change would cost
# more than long-polling (docs/replication.md, "Known limits"). Device-list
# changes of such users do wake every stream (coalesced), presence not yet.
@pytest.mark.parametrize("kind", KINDS)
def test_change_reaches_stream_within_one_second(kind, bed, register, mxsse_factory, streams):
    """Long-poll fallback off: the change reaches alice's SSE stream within
    DEADLINE of the triggering request's completion, and mxsse never
    long-polls."""
    m = mxsse_factory(bed.synapse_url, *replication_args(bed))
    assert wait_until(lambda: metric(m, "mxsse_replication_connected") == 1, 10), log_tail(m)
    sc = Scene(bed, m, streams, register)
    KINDS[kind](sc)

    reasons = sync_reasons(m)
    metrics = m.metrics()
    MEASURED["wakes_answered_empty[all kinds]"].append(metrics["mxsse_sync_empty_total"])
    if metrics["mxsse_wake_to_delivery_seconds_count"]:
        MEASURED["wake_to_delivery_mean_s[per kind test]"].append(
            metrics["mxsse_wake_to_delivery_seconds_sum"] / metrics["mxsse_wake_to_delivery_seconds_count"])
    assert not sc.late, f"{sc.late}; measured {sc.samples}; /sync by reason {reasons}"
    slow = [(k, round(v, 3)) for k, v in sc.samples if v >= DEADLINE]
    assert not slow, f"later than {DEADLINE} s: {slow} (all: {sc.samples}); /sync by reason {reasons}"
    assert reasons.get("longpoll", 0) == 0, f"long-polls with the fallback off: {reasons}"
    assert reasons.get("wake", 0) >= 1, reasons
    assert not sc.s.done, sc.s.describe()
    ids = [e.id for e in sc.s.events]
    assert len(ids) == len(set(ids)), f"an event id was sent twice: {ids}"
    for ev in sc.s.events:
        assert ev.id == ev.json()["next_batch"]


# --------------------------------------------------------------------------
# 2. Idle cost and presence


def idle_population(bed: Testbed, register: Callable[[str], Client], n: int
                    ) -> list[tuple[Client, Client]]:
    """n (user, room-mate) pairs, each pair sharing a room; the room-mates
    have no stream."""
    pairs = []
    for i in range(n):
        u, mate = register(f"idle{i}"), register(f"mate{i}")
        shared_room(u, mate)
        pairs.append((u, mate))
    return pairs


def open_idle_streams(m: Any, streams: Streams, users: list[Client], presence: str | None
                      ) -> list[SSEStream]:
    out = []
    for i, u in enumerate(users):
        params = {TEST_PARAM: f"idle{i}", "heartbeat_interval": "5"}
        if presence:
            params["set_presence"] = presence
        out.append(streams.open(m, u, params))
    for s in out:
        first_event(s)
    return out


def idle_counts(bed: Testbed, m: Any) -> tuple[float, dict[str, float]]:
    return synapse_sync_requests(bed), sync_reasons(m)


def run_idle(bed: Testbed, m: Any, ss: list[SSEStream], seconds: float,
             during: Callable[[], None] | None = None) -> tuple[float, dict[str, float], list[int]]:
    """Leaves the streams idle for `seconds`; returns Synapse's /sync count
    over that time, mxsse's per reason, and the events each stream got."""
    settle_deadline = time.monotonic() + 15
    # Past the start-up fetches: every stream parked, nothing in flight.
    while time.monotonic() < settle_deadline:
        a = idle_counts(bed, m)
        time.sleep(2)
        if idle_counts(bed, m) == a:
            break
    syn0, mx0 = idle_counts(bed, m)
    ev0 = [len(s.events) for s in ss]
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        if during:
            during()
        time.sleep(min(2, max(0, t_end - time.monotonic())))
    syn1, mx1 = idle_counts(bed, m)
    for s in ss:
        assert not s.done, s.describe()
    return syn1 - syn0, {k: mx1.get(k, 0) - mx0.get(k, 0) for k in mx1}, \
        [len(s.events) - e for s, e in zip(ss, ev0)]


def _idle_offline(bed, register, mxsse_factory, streams, seconds: float) -> None:
    m = mxsse_factory(bed.synapse_url, *replication_args(bed))
    users = [u for u, _ in idle_population(bed, register, IDLE_STREAMS)]
    ss = open_idle_streams(m, streams, users, "offline")
    syn, mx, events = run_idle(bed, m, ss, seconds)
    MEASURED[f"idle_synapse_syncs[offline,{IDLE_STREAMS} streams,{seconds:.0f}s]"].append(syn)
    assert syn == 0, f"Synapse received {syn} /sync while {IDLE_STREAMS} offline streams were idle; " \
                     f"mxsse by reason: {mx}; events: {events}"
    assert sum(mx.values()) == 0, mx
    assert sum(events) == 0, events
    beats = [len(s.comments) for s in ss]
    assert min(beats) >= seconds / 5 - 2, f"heartbeats: {beats}"


def test_idle_offline_streams_cost_nothing(bed, register, mxsse_factory, streams):
    """set_presence=offline: idle streams make no /sync at all (counted by
    Synapse itself)."""
    _idle_offline(bed, register, mxsse_factory, streams, 75)


@pytest.mark.slow
def test_idle_offline_streams_cost_nothing_long(bed, register, mxsse_factory, streams):
    _idle_offline(bed, register, mxsse_factory, streams, 360)


def presence_spacing(m: Any) -> list[float]:
    """Intervals between consecutive upstream /sync of each idle stream."""
    per: dict[str, list[float]] = defaultdict(list)
    for t, query in upstream_syncs(m):
        tag = query.get(TEST_PARAM)
        if tag and query.get("timeout") == "0" and "since" in query:
            per[tag].append(t)
    gaps = []
    for times in per.values():
        gaps += [b - a for a, b in zip(times, times[1:])]
    return gaps


def _idle_online(bed, register, mxsse_factory, streams, seconds: float) -> None:
    m = mxsse_factory(bed.synapse_url, *replication_args(bed))
    pairs = idle_population(bed, register, IDLE_STREAMS)
    users = [u for u, _ in pairs]
    ss = open_idle_streams(m, streams, users, None)  # set_presence: default (online)
    watched = pairs  # every user, through their room-mate
    offline_seen: list[tuple[float, str]] = []
    t0 = time.monotonic()

    def check_presence() -> None:
        for u, mate in watched:
            p = presence_of(mate, u.user_id)
            if p != "online":
                offline_seen.append((round(time.monotonic() - t0, 1), f"{u.user_id}: {p}"))

    syn, mx, events = run_idle(bed, m, ss, seconds, during=check_presence)
    gaps = presence_spacing(m)
    expected = IDLE_STREAMS * seconds / PRESENCE_INTERVAL
    key = f"[online,{IDLE_STREAMS} streams,{seconds:.0f}s]"
    MEASURED[f"idle_synapse_syncs{key}"].append(syn)
    MEASURED[f"idle_mxsse_syncs_presence{key}"].append(mx.get("presence", 0))
    MEASURED[f"idle_mxsse_syncs_wake{key}"].append(mx.get("wake", 0))
    MEASURED["presence_sync_spacing_s"].extend(gaps)
    detail = (f"Synapse {syn}, mxsse {mx}, expected ~{expected:.0f} presence syncs, "
              f"spacing {sorted(round(g, 2) for g in gaps)}, not online: {offline_seen}")
    problems = []
    # Everything Synapse saw came from mxsse, and was for presence.
    if syn != sum(mx.values()) or mx.get("presence", 0) != syn:
        problems.append("/sync not all presence syncs from mxsse")
    # One per stream per 25 s (each stream's first one falls anywhere in
    # the window, hence the slack of one per stream).
    if not expected - IDLE_STREAMS <= syn <= expected + IDLE_STREAMS:
        problems.append(f"{syn} presence syncs instead of ~{expected:.0f}")
    # Each presence sync must come well before Synapse's 30 s
    # sync_online_timeout runs out after the previous one.
    if not gaps or max(gaps) >= SYNC_ONLINE_TIMEOUT - 2:
        problems.append(f"presence syncs {max(gaps, default=0):.3f} s apart "
                        f"(sync_online_timeout is {SYNC_ONLINE_TIMEOUT:.0f} s)")
    if offline_seen:
        problems.append("idle streaming users not online")
    assert not problems, f"{problems}: {detail}"


def test_idle_online_streams_sync_only_for_presence(bed, register, mxsse_factory, streams):
    """Default presence: about one /sync per stream per 25 s (Synapse's count
    equals mxsse's presence count), and the users stay online."""
    _idle_online(bed, register, mxsse_factory, streams, 80)


@pytest.mark.slow
def test_idle_online_streams_sync_only_for_presence_long(bed, register, mxsse_factory, streams):
    _idle_online(bed, register, mxsse_factory, streams, 360)


def test_presence_online_while_idle_offline_after_close(bed, register, mxsse_factory, streams):
    """A parked stream (set_presence default) keeps its user online for
    well past sync_online_timeout; once it closes the user goes offline
    within sync_online_timeout plus Synapse's timer granularity."""
    m = mxsse_factory(bed.synapse_url, *replication_args(bed))
    alice, bob = register("alice"), register("bob")
    shared_room(alice, bob)
    s = streams.open(m, alice)
    first_event(s)
    assert wait_until(lambda: presence_of(bob, alice.user_id) == "online", 10), presence_of(bob, alice.user_id)
    t0 = time.monotonic()
    states = []
    while time.monotonic() - t0 < 70:
        states.append((round(time.monotonic() - t0, 1), presence_of(bob, alice.user_id)))
        time.sleep(2)
    assert all(p == "online" for _, p in states), f"not online while idle: {states}; {sync_reasons(m)}"
    assert sync_reasons(m).get("presence", 0) >= 2, sync_reasons(m)
    assert not s.done

    s.close()
    t_close = time.monotonic()
    assert wait_until(lambda: presence_of(bob, alice.user_id) == "offline", 60, 1), \
        "still online 60 s after the stream closed"
    took = time.monotonic() - t_close
    MEASURED["presence_offline_after_close_s"].append(took)
    # The last presence sync was at most 25 s (+ the 5 s check) before the
    # close; Synapse times the device out 30-40 s after that sync.
    assert took <= SYNC_ONLINE_TIMEOUT + 15, f"offline only {took:.1f} s after the close"


# --------------------------------------------------------------------------
# 3. Redis and Synapse restarts under connected clients


@pytest.fixture(scope="module")
def own_bed(request: pytest.FixtureRequest):
    """A bed for this module's restart tests only."""
    b = Testbed(autostop=True).up()
    failed_before = request.session.testsfailed
    try:
        yield b
    finally:
        keep = bool(os.environ.get("MXSSE_KEEP_BED")) or request.session.testsfailed > failed_before
        b.down(purge=not keep)


def own_register(b: Testbed, name: str) -> Client:
    return Client(b.synapse_url, b.register(f"{name}-{secrets.token_hex(4)}"))


def stop_redis(b: Testbed) -> None:
    b._stop(b.info["pids"]["redis"], signal.SIGTERM, 10)
    assert not redis_ping(b.redis_port)


def start_redis(b: Testbed, timeout: float = 20) -> None:
    """The bed's Redis again, same command line as interop/testbed.py starts it."""
    rdir = b.dir / "redis"
    port = b.redis_port
    entry = b._spawn("redis", [
        shutil.which("redis-server") or "/usr/bin/redis-server",
        "--bind", LOOPBACK, "--port", port, "--protected-mode", "yes",
        "--save", "", "--appendonly", "no", "--daemonize", "no",
        "--dir", rdir, "--logfile", rdir / "redis.log",
    ], rdir / "redis.log", rdir)
    b._wait("redis", lambda: redis_ping(port), entry, time.monotonic() + timeout)


def stop_synapse(b: Testbed) -> None:
    b._stop(b.info["pids"]["synapse"], signal.SIGTERM, 20)


def start_synapse(b: Testbed, timeout: float = 90) -> None:
    sdir = b.dir / "synapse"
    entry = b._spawn("synapse", [synapse_venv() / "bin" / "python", "-m", "synapse.app.homeserver",
                                 "--config-path", sdir / "homeserver.yaml"], sdir / "stderr.log", sdir)
    b._wait("synapse", b._synapse_healthy, entry, time.monotonic() + timeout)


class Outage:
    """Two streaming users (alice: presence online, dave: offline) sharing
    two rooms with bob. bob sends messages in both rooms and to-device
    messages to both streaming devices; every one must reach both streams
    exactly once, the messages in the order Synapse itself gives them.

    Messages are told apart by their body: a message sent while Redis is
    down is persisted at once, but Synapse answers its PUT only when it is
    connected to Redis again (its external cache waits for the link), so
    such sends run in the background and their event ids come late."""

    def __init__(self, b: Testbed, m: Any, streams: Streams):
        self.b, self.m = b, m
        self.alice, self.dave, self.bob = (own_register(b, n) for n in ("alice", "dave", "bob"))
        self.rooms = []
        for _ in range(2):
            room = self.bob.post("/createRoom", {"preset": "private_chat",
                                                  "invite": [self.alice.user_id, self.dave.user_id]})["room_id"]
            self.alice.post(f"/join/{q(room)}")
            self.dave.post(f"/join/{q(room)}")
            self.rooms.append(room)
        self.s = {
            "alice": streams.open(m, self.alice, {"heartbeat_interval": "1"}),
            "dave": streams.open(m, self.dave, {"heartbeat_interval": "1", "set_presence": "offline"}),
        }
        for st in self.s.values():
            first_event(st)
        self.sent: dict[str, list[str]] = {r: [] for r in self.rooms}  # bodies
        self.sent_at: dict[str, tuple[str, float]] = {}                # body or nonce -> (phase, t)
        self.nonces: list[str] = []
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []
        self.h2_accepted = metric(m, 'mxsse_connections_accepted_total{protocol="h2"}')

    def _send_one(self, room: str, body: str) -> None:
        try:
            self.bob.request("PUT", f"/rooms/{q(room)}/send/m.room.message/{secrets.token_hex(8)}",
                             {"msgtype": "m.text", "body": body}, http_timeout=90)
        except Exception as exc:  # reported by join()
            self.errors.append(f"{body}: {exc!r}")

    def send(self, phase: str, n: int = 2, background: bool = False) -> None:
        for i in range(n):
            for r in self.rooms:
                body = f"{phase} {i} {secrets.token_hex(3)}"
                self.sent[r].append(body)
                self.sent_at[body] = (phase, time.monotonic())
                if background:
                    t = threading.Thread(target=self._send_one, args=(r, body), daemon=True)
                    t.start()
                    self.threads.append(t)
                    time.sleep(0.2)  # so that the order of persistence is the order sent
                else:
                    self._send_one(r, body)
        if not background:
            self.join(30)

    def send_to_device(self, phase: str) -> None:
        nonce = f"{phase} {secrets.token_hex(4)}"
        self.bob.put(f"/sendToDevice/org.mxsse.test.ping/{secrets.token_hex(8)}", {"messages": {
            u.user_id: {u.device_id: {"nonce": nonce}} for u in (self.alice, self.dave)}})
        self.nonces.append(nonce)
        self.sent_at[nonce] = (phase, time.monotonic())

    def join(self, timeout: float) -> None:
        """Waits for the background sends (Synapse answers them once it is
        connected to Redis again)."""
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0, deadline - time.monotonic()))
        assert not self.errors, self.errors
        assert not [t for t in self.threads if t.is_alive()], "sends still waiting for Synapse"

    @staticmethod
    def _bodies_of(ev: Event, room: str) -> list[str]:
        if ev.event != "message":
            return []
        return [e["content"].get("body") for e in joined(ev.json(), room).get("timeline", {}).get("events", [])
                if e["type"] == "m.room.message"]

    @staticmethod
    def _nonces_of(ev: Event) -> list[str]:
        if ev.event != "message":
            return []
        return [e["content"]["nonce"] for e in ev.json().get("to_device", {}).get("events", [])
                if e.get("type") == "org.mxsse.test.ping"]

    def bodies(self, st: SSEStream, room: str) -> list[str]:
        return [b for ev in st.events for b in self._bodies_of(ev, room)]

    def got_nonces(self, st: SSEStream) -> list[str]:
        return [n for ev in st.events for n in self._nonces_of(ev)]

    def missing(self) -> dict[str, list[str]]:
        out = {}
        for name, st in self.s.items():
            miss = [b for r in self.rooms for b in self.sent[r] if b not in self.bodies(st, r)]
            miss += [n for n in self.nonces if n not in self.got_nonces(st)]
            if miss:
                out[name] = miss
        return out

    def wait_all(self, timeout: float) -> dict[str, float]:
        """Waits until everything sent is on both streams; returns the
        latest arrival delay (seconds after sending) per phase."""
        ok = wait_until(lambda: not self.missing(), timeout, 0.1)
        assert ok, f"missing {timeout} s later: {self.missing()}; sent {self.sent_at}; " \
                   f"/sync by reason {sync_reasons(self.m)}\n{log_tail(self.m, 40, 'level=info')}"
        delays: dict[str, float] = {}
        for st in self.s.values():
            for ev in st.events:
                keys = [b for r in self.rooms for b in self._bodies_of(ev, r)] + self._nonces_of(ev)
                for key in keys:
                    if key in self.sent_at:
                        phase, t = self.sent_at[key]
                        delays[phase] = max(delays.get(phase, 0), ev.t - t)
        return delays

    def synapse_order(self, room: str) -> list[str]:
        chunk = self.bob.get(f"/rooms/{q(room)}/messages", dir="b", limit="500")["chunk"]
        return [e["content"]["body"] for e in reversed(chunk)
                if e["type"] == "m.room.message" and e["content"].get("body") in self.sent_at]

    def check(self) -> None:
        for name, st in self.s.items():
            assert not st.done, f"{name}: {st.describe()}"
            assert not st.info["conn"].closed.is_set(), f"{name}: connection closed"
            for r in self.rooms:
                got, order = self.bodies(st, r), self.synapse_order(r)
                assert sorted(order) == sorted(self.sent[r]), (order, self.sent[r])
                assert got == order, (f"{name} in {r}: not exactly once in Synapse's order:\n"
                                      f" got     {got}\n Synapse {order}")
            got = self.got_nonces(st)
            assert sorted(got) == sorted(self.nonces), f"{name}: to-device {got} != {self.nonces}"
            assert not [e for e in st.events if e.event != "message"], [e.data for e in st.events
                                                                        if e.event != "message"]
            ids = [e.id for e in st.events]
            assert len(ids) == len(set(ids)), ids
        assert metric(self.m, 'mxsse_connections_accepted_total{protocol="h2"}') == self.h2_accepted, \
            "a client connection was replaced"

    def beats_during(self, t0: float, t1: float) -> dict[str, list[float]]:
        """Heartbeat spacing per stream between t0 and t1."""
        out = {}
        for name, st in self.s.items():
            beats = [c.t for c in st.comments if t0 <= c.t <= t1]
            out[name] = [b - a for a, b in zip(beats, beats[1:])]
        return out


def test_redis_restart_loses_nothing(own_bed, mxsse_factory, streams):
    """Redis goes away and comes back while clients stream (fallback off):
    messages and to-device messages sent before, during and after the
    outage all arrive exactly once and in order; streams and their
    connections stay up with their heartbeats; the reconnect and the
    safety net are counted."""
    b = own_bed
    m = mxsse_factory(b.synapse_url, *replication_args(b))
    o = Outage(b, m, streams)
    o.send("before")
    o.send_to_device("before")
    o.wait_all(10)
    before = m.metrics()

    t_down = time.monotonic()
    stop_redis(b)
    try:
        assert wait_until(lambda: metric(m, "mxsse_replication_connected") == 0, 10), log_tail(m)
        o.send("during", 2, background=True)
        o.send_to_device("during")
        time.sleep(4)
    finally:
        start_redis(b)
    t_up = time.monotonic()
    assert wait_until(lambda: metric(m, "mxsse_replication_connected") == 1, 30), log_tail(m)
    MEASURED["redis_restart_mxsse_resubscribed_s"].append(time.monotonic() - t_up)
    # At once, while Synapse may still be reconnecting to Redis itself.
    o.send_to_device("resubscribed")
    o.send("resubscribed", 1, background=True)
    o.join(60)
    MEASURED["redis_restart_synapse_back_s"].append(time.monotonic() - t_up)
    delays = o.wait_all(30)
    MEASURED["redis_restart_delivery_during_s"].append(delays["during"])
    MEASURED["redis_restart_delivery_resubscribed_s"].append(delays["resubscribed"])
    time.sleep(2)
    o.send("after")
    o.send_to_device("after")
    delays = o.wait_all(10)
    MEASURED["redis_restart_delivery_after_s"].append(delays["after"])
    t_end = time.monotonic()

    o.check()
    after = m.metrics()
    assert after["mxsse_replication_reconnects_total"] > before["mxsse_replication_reconnects_total"]
    safety = 'mxsse_sync_requests_total{reason="safety_net"}'
    MEASURED["redis_restart_safety_net_fetches"].append(after[safety] - before[safety])
    MEASURED["redis_restart_reconnect_attempts"].append(
        after["mxsse_replication_reconnects_total"] - before["mxsse_replication_reconnects_total"])
    assert after[safety] >= before[safety] + 2, (before[safety], after[safety])
    assert after['mxsse_sync_requests_total{reason="longpoll"}'] == 0
    for name, gaps in o.beats_during(t_down, t_end).items():
        assert len(gaps) >= (t_end - t_down) - 3, f"{name}: heartbeats {gaps}"
        assert max(gaps) <= 1.75, f"{name}: heartbeats paused: {gaps}"
    assert delays["after"] < DEADLINE, delays


def test_synapse_restart_loses_nothing(own_bed, mxsse_factory, streams):
    """Synapse restarts while clients stream (fallback off): messages
    before, just after it is back, and later all arrive exactly once, in
    order; streams stay open; Synapse's restart announcement on the
    channel runs the safety net."""
    b = own_bed
    m = mxsse_factory(b.synapse_url, *replication_args(b))
    o = Outage(b, m, streams)
    o.send("before")
    o.send_to_device("before")
    # Typing and a presence change, as a live server would have: the
    # restart resets in-memory streams the feed has seen.
    o.bob.put(f"/rooms/{q(o.rooms[0])}/typing/{q(o.bob.user_id)}", {"typing": True, "timeout": 5000})
    o.bob.put(f"/presence/{q(o.bob.user_id)}/status", {"presence": "online", "status_msg": "here"})
    o.wait_all(10)
    before = m.metrics()

    t_down = time.monotonic()
    stop_synapse(b)
    try:
        time.sleep(4)
    finally:
        start_synapse(b)
    MEASURED["synapse_restart_s"].append(time.monotonic() - t_down)
    o.send("right-after")
    o.send_to_device("right-after")
    delays = o.wait_all(20)
    MEASURED["synapse_restart_delivery_right_after_s"].append(delays["right-after"])
    time.sleep(3)
    o.send("after")
    o.send_to_device("after")
    delays = o.wait_all(10)
    MEASURED["synapse_restart_delivery_after_s"].append(delays["after"])
    t_end = time.monotonic()

    o.check()
    after = m.metrics()
    safety = 'mxsse_sync_requests_total{reason="safety_net"}'
    assert after[safety] > before[safety], (before[safety], after[safety], log_tail(m, 40, "replication"))
    MEASURED["synapse_restart_safety_net_fetches"].append(after[safety] - before[safety])
    MEASURED["synapse_restart_replication_gaps"].append(
        after["mxsse_replication_gaps_total"] - before["mxsse_replication_gaps_total"])
    assert after['mxsse_sync_requests_total{reason="longpoll"}'] == 0
    # mxsse's own link to Redis never dropped: nothing to reconnect.
    assert metric(m, "mxsse_replication_connected") == 1
    assert after["mxsse_replication_reconnects_total"] == before["mxsse_replication_reconnects_total"]
    for name, gaps in o.beats_during(t_down, t_end).items():
        assert max(gaps) <= 1.75, f"{name}: heartbeats paused: {gaps}"
    assert delays["after"] < DEADLINE, delays


def redis_subscribers(port: int) -> dict[int, int]:
    """Pub/sub clients of the bed's Redis: {client id: channels}. Synapse
    subscribes to two channels (<server_name> and <server_name>/USER_IP),
    mxsse to one."""
    out = {}
    for line in redis_cli(port, "CLIENT", "LIST", "TYPE", "pubsub").splitlines():
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        out[int(f["id"])] = int(f["sub"])
    return out


@pytest.mark.skipif(not shutil.which("redis-cli"), reason="redis-cli not installed")
@pytest.mark.parametrize("cut", ["synapse", "synapse+mxsse"])
def test_feed_cut_loses_nothing(cut, own_bed, mxsse_factory, streams):
    """The replication links are cut (Redis CLIENT KILL) while clients
    stream; Synapse reconnects about a second later, and until then it
    drops what it would publish ("Dropping command as not connected").
    Changes made in that window must still reach the streams: Synapse's
    REPLICATE and POSITION lines on reconnecting show that its tokens
    moved past what mxsse saw.

    cut=synapse: only Synapse's subscription is cut; cut=synapse+mxsse:
    both are, and mxsse (faster to reconnect) is back on the channel
    before Synapse, as after a Redis restart."""
    b = own_bed
    m = mxsse_factory(b.synapse_url, *replication_args(b))
    o = Outage(b, m, streams)
    o.send("before")
    o.send_to_device("before")
    o.wait_all(10)
    before = m.metrics()
    for attempt in range(5):
        subs = redis_subscribers(b.redis_port)
        synapse_ids = [i for i, n in subs.items() if n == 2]
        assert len(synapse_ids) == 1 and len(subs) == 2, subs
        if cut == "synapse":
            redis_cli(b.redis_port, "CLIENT", "KILL", "ID", str(synapse_ids[0]))
        else:
            redis_cli(b.redis_port, "CLIENT", "KILL", "TYPE", "pubsub")
            assert wait_until(lambda: metric(m, "mxsse_replication_connected") == 0
                              or metric(m, "mxsse_replication_reconnects_total")
                              > before["mxsse_replication_reconnects_total"], 5)
            assert wait_until(lambda: metric(m, "mxsse_replication_connected") == 1, 5), log_tail(m)
        # The window: Synapse not subscribed (mxsse is).
        if all(n != 2 for n in redis_subscribers(b.redis_port).values()):
            break
        assert wait_until(lambda: any(n == 2 for n in redis_subscribers(b.redis_port).values()), 30)
    else:
        pytest.skip("Synapse was always back on the channel before the test could act")
    t_cut = time.monotonic()
    o.send_to_device("cut")
    o.send("cut", 1, background=True)  # answered once Synapse is connected again
    assert wait_until(lambda: any(n == 2 for n in redis_subscribers(b.redis_port).values()), 30)
    MEASURED[f"feed_cut_synapse_back_s[{cut}]"].append(time.monotonic() - t_cut)
    o.join(30)
    delays = o.wait_all(15)
    MEASURED[f"feed_cut_delivery_s[{cut}]"].append(delays["cut"])
    o.send("after")
    o.send_to_device("after")
    delays = o.wait_all(10)
    assert delays["after"] < DEADLINE, delays
    o.check()
    assert metric(m, 'mxsse_sync_requests_total{reason="longpoll"}') == 0


# --------------------------------------------------------------------------
# 4. The long-poll fallback


def test_fallback_longpolls_while_redis_down(own_bed, mxsse_factory, streams):
    """Fallback on (the default): Redis stops -> the streams long-poll and
    messages still arrive; Redis back -> they park again (the long-poll
    count stops growing) and messages arrive through wakes."""
    b = own_bed
    m = mxsse_factory(b.synapse_url, *replication_args(b, fallback=True), "--longpoll-timeout", "2000")
    o = Outage(b, m, streams)
    longpolls = lambda: metric(m, 'mxsse_sync_requests_total{reason="longpoll"}')  # noqa: E731
    o.send("before")
    o.wait_all(10)
    time.sleep(2)
    assert longpolls() == 0, sync_reasons(m)

    stop_redis(b)
    try:
        assert wait_until(lambda: metric(m, "mxsse_replication_connected") == 0, 10), log_tail(m)
        lp0 = longpolls()
        time.sleep(7)
        lp1 = longpolls()
        # Two streams, 2 s long-polls: three or four rounds each in 7 s.
        assert lp1 - lp0 >= 2 * 3, f"long-polls while Redis is down: {lp0} -> {lp1}"
        for i in range(3):
            # Synapse answers these PUTs only once Redis is back; the
            # messages are persisted at once and the long-polls see them.
            o.send(f"down {i}", 1, background=True)
            o.send_to_device(f"down {i}")
            delays = o.wait_all(5)
            MEASURED["fallback_longpoll_delivery_s"].append(delays[f"down {i}"])
    finally:
        start_redis(b)
    assert wait_until(lambda: metric(m, "mxsse_replication_connected") == 1, 30), log_tail(m)
    o.join(60)  # Synapse is on Redis again
    time.sleep(3)  # any long-poll running at the switch is over
    lp2 = longpolls()
    o.send("up")
    o.wait_all(5)
    time.sleep(6)
    lp3 = longpolls()
    assert lp3 == lp2, f"still long-polling after Redis came back: {lp2} -> {lp3}; {sync_reasons(m)}"
    o.send("parked")
    o.send_to_device("parked")
    delays = o.wait_all(5)
    assert delays["parked"] < DEADLINE, delays
    assert longpolls() == lp2
    o.check()


# --------------------------------------------------------------------------
# The Redis account mxsse needs


def redis_cli(port: int, *args: str, user: str | None = None, password: str | None = None) -> str:
    argv = ["redis-cli", "-h", LOOPBACK, "-p", str(port)]
    if user:
        argv += ["--user", user, "--pass", password or "", "--no-auth-warning"]
    return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=10).stdout.strip()


@pytest.mark.skipif(not shutil.which("redis-cli"), reason="redis-cli not installed")
def test_acl_user_limited_to_subscribe_on_the_channel(own_bed, mxsse_factory, streams):
    """The account recommended in docs/replication.md: a Redis ACL user that
    may only SUBSCRIBE to the server-name channel is enough for mxsse
    (and can neither publish nor read the USER_IP channel)."""
    b = own_bed
    password = secrets.token_hex(12)
    channel = b.server_name
    assert redis_cli(b.redis_port, "ACL", "SETUSER", "mxsse", "reset", "on", f">{password}",
                     "resetchannels", f"&{channel}", "-@all", "+subscribe") == "OK"
    # What the account cannot do.
    assert "NOPERM" in redis_cli(b.redis_port, "PUBLISH", channel, "x", user="mxsse", password=password)
    assert "NOPERM" in redis_cli(b.redis_port, "GET", "x", user="mxsse", password=password)
    out = subprocess.run(["timeout", "3", "redis-cli", "-h", LOOPBACK, "-p", str(b.redis_port), "--user", "mxsse",
                          "--pass", password, "--no-auth-warning", "SUBSCRIBE", f"{channel}/USER_IP"],
                         capture_output=True, text=True).stdout
    assert "NOPERM" in out, out
    assert redis_cli(b.redis_port, "ACL", "LOG", "RESET") == "OK"

    m = mxsse_factory(b.synapse_url, "--replication", f"redis://mxsse:{password}@{LOOPBACK}:{b.redis_port}",
                      "--server-name", channel, "--longpoll-fallback", "false")
    assert wait_until(lambda: metric(m, "mxsse_replication_connected") == 1, 10), log_tail(m)
    alice, bob = own_register(b, "alice"), own_register(b, "bob")
    room = shared_room(alice, bob)
    s = streams.open(m, alice)
    first_event(s)
    settle(s)
    start = len(s.events)
    eid = send_text(bob, room, "through the restricted account")
    t_done = time.monotonic()
    ev = wait_new(s, start, lambda sync: eid in [e["event_id"] for e in room_events(sync, room)], 10)
    assert ev is not None, f"not delivered; {sync_reasons(m)}\n{log_tail(m)}"
    assert ev.t - t_done < DEADLINE
    assert sync_reasons(m).get("wake", 0) >= 1
    time.sleep(1)
    assert "NOPERM" not in m.read_log() and "auth_failed" not in m.read_log(), log_tail(m)
    assert password not in m.read_log(), "the Redis password is in the log"
    # Redis refused nothing mxsse asked for.
    assert redis_cli(b.redis_port, "ACL", "LOG") == "", redis_cli(b.redis_port, "ACL", "LOG")
