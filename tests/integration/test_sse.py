"""The SSE sync endpoint (MSC2108) end to end: mxsse in front of the bed's
real Synapse, read by real clients over HTTP/2 with TLS (ALPN h2), h2c
(prior knowledge) and HTTP/1.1 (cleartext and TLS).

Clients come from sseclient.py: a WHATWG event-stream parser fed by a raw
HTTP/1.1 client, a raw HTTP/2 client that multiplexes several requests on
one connection, and `curl -N`.

Figures measured on the way (first-event and message-to-event latencies,
heartbeat spacing, recovery times) are printed at the end of the module's
run and, with MXSSE_SSE_REPORT=<file>, written there as JSON.

One module on purpose: the cases share the helpers and measurements
above and read as the endpoint's specification.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import threading
import time
import urllib.parse
from collections import defaultdict
from typing import Any, Callable

import pytest

from conftest import free_port, q, send_text, shared_room
from measurements import report_fixture, synapse_sync_requests
from sseclient import (CurlSSE, Event, H2Connection, Retry, SSEStream, h2_available,
                       open_h1)
from testbed import http_json, synapse_venv

SSE_PATH = "/_matrix/client/v3/sync/sse"
ALIAS_PATHS = ["/_matrix/client/r0/sync/sse",
               "/_matrix/client/unstable/org.matrix.msc2108/sync/sse"]
PROTOCOLS = ["h2-tls", "h2c", "h1", "h1-tls"]
TICK = 0.25  # mxsse's heartbeat wheel tick

# Inline filter forwarded to Synapse: presence and global account data
# out, so batches carry room and to-device traffic only.
FILTER = json.dumps({"presence": {"not_types": ["*"]},
                     "account_data": {"not_types": ["*"]},
                     "room": {"timeline": {"limit": 20}}}, separators=(",", ":"))
TO_DEVICE_TYPE = "org.mxsse.test.ping"

MEASURED: dict[str, list[float]] = defaultdict(list)

_report_measurements = report_fixture(
    "mxsse-sse-measurements", "SSE measurements (seconds unless named otherwise)",
    "MXSSE_SSE_REPORT", MEASURED, key_width=46)


# --------------------------------------------------------------------------
# Helpers


def bearer(client: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.access_token}"}


def sse_target(params: dict | None = None, path: str = SSE_PATH) -> str:
    if not params:
        return path
    return path + "?" + urllib.parse.urlencode(params)


class Endpoint:
    """Requests to one mxsse over one protocol. The HTTP/2 modes put every
    request on one connection; the HTTP/1.1 modes open one per request."""

    def __init__(self, m: Any, proto: str):
        self.m, self.proto = m, proto
        self.tls = proto in ("h2-tls", "h1-tls")
        self.base = m.tls_url if self.tls else m.url
        if proto.startswith("h2") and not h2_available():
            pytest.skip("libnghttp2 (HPACK decoding for the HTTP/2 client) cannot be loaded")
        self.h2 = H2Connection(self.base, cafile=str(m.cert)) if proto.startswith("h2") else None
        self.streams: list[SSEStream] = []

    def open(self, target: str, *, method: str = "GET", headers: dict | None = None,
             body: bytes | None = None) -> SSEStream:
        if self.h2:
            s = self.h2.open(method, target, headers=headers, body=body)
        else:
            s = open_h1(self.base + target, method=method, headers=headers, body=body,
                        cafile=str(self.m.cert))
        self.streams.append(s)
        return s

    def request(self, method: str, target: str, *, headers: dict | None = None,
                body: Any = None, timeout: float = 30) -> SSEStream:
        raw = None
        if body is not None:
            raw = json.dumps(body).encode()
            headers = {**(headers or {}), "Content-Type": "application/json"}
        return self.open(target, method=method, headers=headers, body=raw).wait_end(timeout)

    def close(self) -> None:
        for s in self.streams:
            if not s.done:
                s.close()
        if self.h2:
            self.h2.close()


class Net:
    """Everything a test opened, closed at teardown (before mxsse stops)."""

    def __init__(self) -> None:
        self.endpoints: list[Endpoint] = []
        self.others: list[Any] = []

    def endpoint(self, m: Any, proto: str) -> Endpoint:
        ep = Endpoint(m, proto)
        self.endpoints.append(ep)
        return ep

    def keep(self, obj: Any) -> Any:
        self.others.append(obj)
        return obj

    def close(self) -> None:
        for ep in self.endpoints:
            ep.close()
        for obj in self.others:
            try:
                obj.close()
            except Exception:
                pass


@pytest.fixture
def net(mxsse_factory):
    n = Net()
    yield n
    n.close()


def send_to_device(sender: Any, user_id: str, device_id: str, nonce: str) -> None:
    sender.put(f"/sendToDevice/{TO_DEVICE_TYPE}/{secrets.token_hex(8)}",
               {"messages": {user_id: {device_id: {"nonce": nonce}}}})


def joined(sync: dict, room: str) -> dict:
    return sync.get("rooms", {}).get("join", {}).get(room, {})


def timeline_ids(sync: dict, room: str) -> list[str]:
    return [e["event_id"] for e in joined(sync, room).get("timeline", {}).get("events", [])]


def state_ids(sync: dict, room: str) -> list[str]:
    return sorted(e["event_id"] for e in joined(sync, room).get("state", {}).get("events", []))


def message_ids(events: list[Event], room: str) -> list[str]:
    """Ids of m.room.message timeline events in `room`, over all events."""
    out = []
    for ev in events:
        for e in joined(ev.json(), room).get("timeline", {}).get("events", []):
            if e["type"] == "m.room.message":
                out.append(e["event_id"])
    return out


def nonces(events: list[Event]) -> list[str]:
    """Nonces of our to-device messages, over all events."""
    out = []
    for ev in events:
        for td in ev.json().get("to_device", {}).get("events", []):
            if td.get("type") == TO_DEVICE_TYPE:
                out.append(td["content"]["nonce"])
    return out


def has_message(room: str, event_id: str) -> Callable[[Event], bool]:
    return lambda ev: event_id in timeline_ids(ev.json(), room)


def has_nonce(nonce: str) -> Callable[[Event], bool]:
    return lambda ev: nonce in nonces([ev])


def wait_messages(stream: SSEStream, room: str, ids: list[str], timeout: float = 30) -> None:
    """Waits until every message id is in some event of the stream."""
    if not stream.wait(lambda: set(ids) <= set(message_ids(stream.events, room)), timeout):
        raise TimeoutError(f"{stream.description}: missing {set(ids) - set(message_ids(stream.events, room))}"
                           f" ({len(stream.events)} events, done={stream.done})")


def wait_nonces(stream: SSEStream, wanted: list[str], timeout: float = 30) -> None:
    if not stream.wait(lambda: set(wanted) <= set(nonces(stream.events)), timeout):
        raise TimeoutError(f"{stream.description}: missing to-device {set(wanted) - set(nonces(stream.events))}"
                           f" ({len(stream.events)} events, done={stream.done})")


def assert_ids_are_next_batch(stream: SSEStream) -> None:
    for ev in stream.events:
        if ev.event == "message":
            assert ev.id is not None and ev.id == ev.json()["next_batch"], ev.data[:200]


def mxsse_counter(m: Any, prefix: str) -> float:
    return sum(v for k, v in m.metrics().items() if k == prefix or k.startswith(prefix + "{"))


def presence_of(viewer: Any, user_id: str) -> str:
    return viewer.get(f"/presence/{q(user_id)}/status")["presence"]


def upstream_targets(m: Any) -> list[str]:
    """Targets of the /sync requests mxsse sent upstream (debug log)."""
    out = []
    for line in m.read_log().splitlines():
        if "event=upstream.start" in line and "target=/_matrix/client/v3/sync?" in line:
            out.append(line.split("target=", 1)[1].split(" ", 1)[0])
    return out




def wait_streams_open(m: Any, n: int, timeout: float = 10) -> None:
    """Waits until mxsse counts n open SSE streams (it noticed closes)."""
    assert wait_until(lambda: m.metrics()["mxsse_sse_streams_open"] == n, timeout), \
        f"mxsse still counts {m.metrics()['mxsse_sse_streams_open']} open SSE streams"


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def log_tail(m: Any, n: int = 40) -> str:
    return "\n".join(m.read_log().splitlines()[-n:])


# Restarting only Synapse (the bed has no such operation): stop the process
# recorded in bed.json, then start it again with the same configuration;
# the new pid is recorded so that the bed's teardown stops it.


def stop_synapse(bed: Any) -> None:
    bed._stop(bed.info["pids"]["synapse"], signal.SIGTERM, 20)


def start_synapse(bed: Any, timeout: float = 90) -> None:
    sdir = bed.dir / "synapse"
    entry = bed._spawn("synapse", [synapse_venv() / "bin" / "python", "-m",
                                   "synapse.app.homeserver", "--config-path",
                                   sdir / "homeserver.yaml"], sdir / "stderr.log", sdir)
    bed._wait("synapse", bed._synapse_healthy, entry, time.monotonic() + timeout)


class DelayProxy:
    """TCP proxy between mxsse and Synapse that can hold requests: while
    `hold` is set, each request whose request line it maps to a delay > 0
    waits that long before going upstream (recorded in `held`)."""

    def __init__(self, upstream_url: str):
        u = urllib.parse.urlsplit(upstream_url)
        self.target = (u.hostname, u.port)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.hold: Callable[[str], float] | None = None
        self.held: list[str] = []
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        try:
            s = socket.create_connection(self.target)
        except OSError:
            c.close()
            return
        self._conns += [c, s]

        def back() -> None:
            try:
                while data := s.recv(65536):
                    c.sendall(data)
            except OSError:
                pass
            for x in (c, s):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=back, daemon=True).start()
        try:
            while data := c.recv(65536):
                line = data.split(b"\r\n", 1)[0].decode("latin-1", "replace")
                hold = self.hold
                delay = hold(line) if hold else 0
                if delay > 0:
                    self.held.append(line)
                    time.sleep(delay)
                s.sendall(data)
        except OSError:
            pass
        for x in (c, s):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        for x in self._conns:
            try:
                x.close()
            except OSError:
                pass


# --------------------------------------------------------------------------
# Streaming over each protocol


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_stream_follows_sync(proto, bed, register, mxsse_factory, net):
    """Messages from another user arrive as events; every id is the batch's
    next_batch; event N+1 is what /sync?since=<id N> answers (compared
    with Synapse itself, same filter). Over HTTP/2 the sender's PUTs and
    other requests share the SSE stream's connection."""
    m = mxsse_factory(bed.synapse_url, "--longpoll-timeout", "10000")
    alice, bob = register("alice"), register("bob")
    room = shared_room(alice, bob)
    ep = net.endpoint(m, proto)

    t0 = time.monotonic()
    s = ep.open(sse_target({"filter": FILTER}), headers=bearer(alice))
    first = s.next_event(30)
    MEASURED[f"first_event_s[{proto}]"].append(first.t - t0)

    assert s.status == 200, s.describe()
    assert s.http_version == ("2" if proto.startswith("h2") else "1.1")
    assert s.header("content-type") == "text/event-stream"
    assert s.header("cache-control") == "no-cache, no-transform"
    assert s.header("x-accel-buffering") == "no"
    assert s.header("access-control-allow-origin") == "*"
    if not proto.startswith("h2"):
        assert s.header("transfer-encoding") == "chunked"
    assert isinstance(s.items[0], Retry), f"stream must start with retry:, got {s.items[:2]}"
    assert first.event == "message" and first.id == first.json()["next_batch"]
    assert room in first.json()["rooms"]["join"], "initial sync without the joined room"
    assert "m.room.create" in [e["type"] for e in joined(first.json(), room)["state"]["events"]
                               + joined(first.json(), room)["timeline"]["events"]]

    for i in range(3):
        body = {"msgtype": "m.text", "body": f"{proto} message {i}"}
        txn = f"/_matrix/client/v3/rooms/{q(room)}/send/m.room.message/{secrets.token_hex(8)}"
        if ep.h2:
            # Other requests on the stream's own connection, while it is open.
            versions = ep.request("GET", "/_matrix/client/versions")
            assert versions.status == 200 and "versions" in versions.json(), versions.describe()
            t_send = time.monotonic()
            put = ep.request("PUT", txn, headers=bearer(bob), body=body)
            assert put.status == 200, put.describe()
            event_id = put.json()["event_id"]
        else:
            t_send = time.monotonic()
            event_id = send_text(bob, room, body["body"])
        ev = s.wait_event(has_message(room, event_id), 30)
        MEASURED[f"message_to_event_s[{proto}]"].append(ev.t - t_send)
        assert ev.id == ev.json()["next_batch"]

        events = s.events
        prev = events[events.index(ev) - 1]
        direct = alice.sync(since=prev.id, filter=FILTER, timeout=0)
        got = ev.json()
        assert timeline_ids(got, room) == timeline_ids(direct, room), (
            f"event after {prev.id} differs from Synapse's /sync?since=")
        assert state_ids(got, room) == state_ids(direct, room)
        assert set(got.get("rooms", {}).get("join", {})) == set(direct.get("rooms", {}).get("join", {}))
        assert joined(got, room)["timeline"].get("limited", False) == \
            joined(direct, room)["timeline"].get("limited", False)

    assert not s.done, f"SSE stream ended: {s.describe()}"
    assert_ids_are_next_batch(s)
    ids = [e.id for e in s.events]
    assert len(ids) == len(set(ids)), f"an id was sent twice: {ids}"
    got_messages = message_ids(s.events, room)
    assert len(got_messages) == 3 and len(set(got_messages)) == 3, got_messages
    if ep.h2:
        metrics = m.metrics()
        assert metrics['mxsse_connections_accepted_total{protocol="h2"}'] == 1
        assert metrics['mxsse_requests_total{protocol="h2"}'] >= 7  # SSE + 3 x (versions + PUT)


@pytest.mark.parametrize("path", ALIAS_PATHS)
def test_alias_paths(path, bed, register, mxsse_factory, net):
    m = mxsse_factory(bed.synapse_url)
    alice = register("alice")
    s = net.endpoint(m, "h1").open(sse_target({"heartbeat_interval": "1"}, path), headers=bearer(alice))
    ev = s.next_event(30)
    assert s.status == 200 and s.header("content-type") == "text/event-stream"
    assert ev.id == ev.json()["next_batch"]
    s.wait(lambda: len(s.comments) >= 1, 3)
    assert s.comments, "no heartbeat on the alias path"


def test_curl_reads_stream_over_h2_and_h1(bed, register, mxsse_factory, net):
    """A stock client: curl -N over h2c, h2 (TLS) and HTTP/1.1."""
    m = mxsse_factory(bed.synapse_url, "--longpoll-timeout", "10000")
    alice, bob = register("alice"), register("bob")
    room = shared_room(alice, bob)
    target = sse_target({"heartbeat_interval": "1"})
    streams = {
        "h2c": CurlSSE(m.url + target, mode="h2c", headers=bearer(alice)).start(),
        "h2": CurlSSE(m.tls_url + target, mode="h2", headers=bearer(alice), cacert=str(m.cert)).start(),
        "h1": CurlSSE(m.url + target, mode="h1", headers=bearer(alice)).start(),
    }
    for s in streams.values():
        net.keep(s)
        s.next_event(30)
    event_id = send_text(bob, room, "to every curl")
    for mode, s in streams.items():
        ev = s.wait_event(has_message(room, event_id), 30)
        assert s.http_version == ("2" if mode.startswith("h2") else "1.1"), s.describe()
        assert ev.id == ev.json()["next_batch"]
        assert s.wait(lambda: len(s.comments) > 0, 3), f"curl {mode}: no heartbeat"


# --------------------------------------------------------------------------
# Resuming


@pytest.mark.parametrize("how", ["last-event-id", "since"])
def test_resume_without_gaps_or_duplicates(how, bed, register, mxsse_factory, net):
    m = mxsse_factory(bed.synapse_url, "--longpoll-timeout", "10000")
    alice, bob = register("alice"), register("bob")
    room = shared_room(alice, bob)
    ep = net.endpoint(m, "h2c" if how == "last-event-id" else "h1")
    params = {"filter": FILTER}

    s1 = ep.open(sse_target(params), headers=bearer(alice))
    s1.next_event(30)
    sent = []
    for i in range(3):
        sent.append(send_text(bob, room, f"before {i}"))
        s1.wait_event(has_message(room, sent[-1]), 30)
    last = s1.events[-1].id
    assert last == s1.parser.last_event_id
    s1.close()

    for i in range(3):
        sent.append(send_text(bob, room, f"while away {i}"))

    if how == "since":
        s2 = ep.open(sse_target({**params, "since": last}), headers=bearer(alice))
    else:
        s2 = ep.open(sse_target(params), headers={**bearer(alice), "Last-Event-ID": last})
    wait_messages(s2, room, sent[3:])
    sent.append(send_text(bob, room, "after resume"))
    s2.wait_event(has_message(room, sent[-1]), 30)

    seen = message_ids(s1.events, room) + message_ids(s2.events, room)
    assert sorted(seen) == sorted(sent), (
        f"gaps: {set(sent) - set(seen)}; duplicates: {[x for x in seen if seen.count(x) > 1]}")
    assert len(seen) == len(set(seen))
    first = s2.events[0].json()
    assert "m.room.create" not in [e["type"] for e in joined(first, room).get("state", {}).get("events", [])
                                   + joined(first, room).get("timeline", {}).get("events", [])], \
        "the resumed stream started with an initial sync"
    assert not set(e.id for e in s1.events) & set(e.id for e in s2.events)
    assert_ids_are_next_batch(s2)


def test_last_event_id_header_wins_over_since(bed, register, mxsse_factory, net):
    m = mxsse_factory(bed.synapse_url, "--longpoll-timeout", "10000")
    alice, bob = register("alice"), register("bob")
    room = shared_room(alice, bob)
    ep = net.endpoint(m, "h1")
    s1 = ep.open(sse_target(), headers=bearer(alice))
    e0 = s1.next_event(30)
    m1 = send_text(bob, room, "m1")
    e1 = s1.wait_event(has_message(room, m1), 30)
    s1.close()

    both = ep.open(sse_target({"since": e0.id}), headers={**bearer(alice), "Last-Event-ID": e1.id})
    only_since = ep.open(sse_target({"since": e0.id}), headers=bearer(alice))
    assert only_since.wait_event(has_message(room, m1), 30)  # since alone: m1 comes back
    m2 = send_text(bob, room, "m2")
    ev = both.wait_event(has_message(room, m2), 30)
    assert m1 not in message_ids(both.events, room), "since= was used although Last-Event-ID was sent"
    assert both.events[0] is ev


def test_full_state_first_batch_only_and_timeout_ignored(bed, register, mxsse_factory, net):
    """full_state=true with a position: the first batch carries the room's
    whole state (as Synapse's own full_state answer), later ones do not.
    timeout= is not forwarded: long-polls use --longpoll-timeout."""
    m = mxsse_factory(bed.synapse_url, "--longpoll-timeout", "7000")
    alice, bob = register("alice"), register("bob")
    room = shared_room(alice, bob)
    ep = net.endpoint(m, "h2c")
    s0 = ep.open(sse_target({"filter": FILTER}), headers=bearer(alice))
    e0 = s0.next_event(30)
    s0.close()
    m1 = send_text(bob, room, "after e0")

    # A fresh start from a position (since=; a Last-Event-ID reconnect
    # ignores full_state, see the next test).
    s = ep.open(sse_target({"filter": FILTER, "full_state": "true", "timeout": "1",
                            "since": e0.id}),
                headers=bearer(alice))
    first = s.next_event(30)
    direct = alice.sync(since=e0.id, filter=FILTER, full_state="true", timeout=0)
    assert m1 in timeline_ids(first.json(), room)
    assert state_ids(first.json(), room) == state_ids(direct, room)
    types = [e["type"] for e in joined(first.json(), room)["state"]["events"]]
    assert "m.room.create" in types, f"full_state not applied to the first batch: {types}"
    m2 = send_text(bob, room, "second batch")
    second = s.wait_event(has_message(room, m2), 30)
    assert state_ids(second.json(), room) == [], "full_state applied beyond the first batch"
    # (the debug log shortens long targets: only their start is checked)
    targets = upstream_targets(m)
    assert all("timeout=1&" not in t and not t.endswith("timeout=1") for t in targets), targets
    assert any(t.startswith("timeout=7000") or "?timeout=7000" in t for t in targets), targets


def test_full_state_first_batch_and_reconnects(bed, register, mxsse_factory, net):
    """full_state=true applies to a stream's first batch -- also when that
    position's next batch is already in the replay buffer (another tab
    fetched it), if the position comes from `since`. On a Last-Event-ID
    reconnect it is ignored: EventSource repeats its URL (full_state
    included) on every reconnect, the client already has the state, and the
    replayed batch must win so no to-device message is lost."""
    m = mxsse_factory(bed.synapse_url, "--longpoll-timeout", "10000")
    alice, bob = register("alice"), register("bob")
    room = shared_room(alice, bob)
    ep = net.endpoint(m, "h2c")
    tab = ep.open(sse_target({"filter": FILTER}), headers=bearer(alice))
    e0 = tab.next_event(30)
    m1 = send_text(bob, room, "m1")
    e1 = tab.wait_event(has_message(room, m1), 30)  # (feed, e0) -> e1 is now in the replay buffer

    def state_types(ev):
        return [e["type"] for e in joined(ev.json(), room).get("state", {}).get("events", [])]

    fresh = ep.open(sse_target({"filter": FILTER, "full_state": "true", "since": e0.id}),
                    headers=bearer(alice))
    first = fresh.next_event(30)
    assert "m.room.create" in state_types(first), (
        f"full_state=true ignored: first batch {first.id} has state {state_types(first)}; "
        f"upstream requests: {upstream_targets(m)}")

    again = ep.open(sse_target({"filter": FILTER, "full_state": "true"}),
                    headers={**bearer(alice), "Last-Event-ID": e0.id})
    replayed = again.next_event(30)
    assert replayed.id == e1.id and replayed.data == e1.data, (
        "a Last-Event-ID reconnect must get the replayed batch, byte for byte")


# --------------------------------------------------------------------------
# Heartbeats and retry


def test_heartbeats_on_schedule_and_retry_jitter(bed, register, mxsse_factory, net):
    m = mxsse_factory(bed.synapse_url, "--sse-retry", "1000", "--longpoll-timeout", "30000")
    alice = register("alice")
    ep = net.endpoint(m, "h2c")
    streams = {
        1: ep.open(sse_target({"heartbeat_interval": "1"}), headers=bearer(alice)),
        2: ep.open(sse_target({"heartbeat_interval": "2"}), headers=bearer(alice)),
        5: net.endpoint(m, "h1").open(sse_target(), headers=bearer(alice)),  # default: 5 s
        3: net.endpoint(m, "h1-tls").open(sse_target({"heartbeat_interval": "3"}), headers=bearer(alice)),
    }
    for s in streams.values():
        s.next_event(30)
    time.sleep(7.6)

    for interval, s in streams.items():
        assert not s.done, s.describe()
        assert s.t_headers is not None
        beats = [c.t for c in s.comments]
        assert all(c.text == " " for c in s.comments), s.comments
        assert b"\n\n: \n\n" in bytes(s.body), "heartbeat is not exactly ': \\n\\n'"
        assert beats, f"interval {interval}: no heartbeat in 7.6 s"
        # First beat: one interval after the start, within a tick.
        assert abs(beats[0] - s.t_headers - interval) <= 0.5 + TICK, (interval, beats[0] - s.t_headers)
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        expected = int(7.6 // interval) - 1
        assert len(gaps) >= expected, f"interval {interval}: {len(beats)} beats in 7.6 s"
        for g in gaps:
            assert abs(g - interval) <= 0.5 + TICK, f"interval {interval}: gap {g:.3f}"
            MEASURED[f"heartbeat_gap_error_s[interval={interval}]"].append(abs(g - interval))

    retries = [s.retries for s in streams.values()]
    for r, s in zip(retries, streams.values()):
        assert len(r) == 1 and s.items[0] is r[0], f"one retry: field first, got {s.items[:3]}"
        assert 1000 <= r[0].ms < 2000, r[0]
    values = [r[0].ms for r in retries]
    assert len(set(values)) > 1, f"no jitter across connections: {values}"


# --------------------------------------------------------------------------
# Errors before the stream


@pytest.mark.parametrize("proto", ["h1", "h2c"])
def test_request_errors(proto, bed, register, mxsse_factory, net):
    m = mxsse_factory(bed.synapse_url, "--heartbeat-max", "60")
    alice = register("alice")
    ep = net.endpoint(m, proto)
    tok = alice.access_token
    auth = bearer(alice)
    unknown = "syt_bm9ib2R5_" + secrets.token_hex(10)

    def synapse(query: str, token: str | None) -> tuple[int, Any]:
        return http_json("GET", f"{bed.synapse_url}/_matrix/client/v3/sync?{query}", token=token)

    cases: list[tuple[str, str, dict, int, Any]] = [
        # (name, query string, headers, status, errcode or expected body)
        ("no token", "", {}, 401, "M_MISSING_TOKEN"),
        ("header and query token", f"access_token={tok}", auth, 401, "M_MISSING_TOKEN"),
        ("empty access_token", "access_token=", {}, 401, "M_MISSING_TOKEN"),
        ("basic auth", "", {"Authorization": "Basic YTpi"}, 401, "M_MISSING_TOKEN"),
        ("unknown token (header)", "", {"Authorization": f"Bearer {unknown}"}, 401,
         synapse("timeout=0", unknown)[1]),
        ("unknown token (query)", f"access_token={unknown}", {}, 401,
         synapse("timeout=0", unknown)[1]),
        ("unknown filter id", "filter=nosuch", auth, 400, synapse("filter=nosuch", tok)[1]),
        ("unknown numeric filter id", "filter=12345", auth, 400, synapse("filter=12345", tok)[1]),
        ("filter not JSON", "filter=%7Bbad", auth, 400, synapse("filter=%7Bbad", tok)[1]),
        ("filter of wrong shape", "filter=%7B%22room%22%3A5%7D", auth, 400,
         synapse("filter=%7B%22room%22%3A5%7D", tok)[1]),
    ]
    for bad in ["0", "-1", "abc", "", "1.5", "61", "1e1", "+", "99999999999999999999"]:
        cases.append((f"heartbeat_interval={bad!r}", "heartbeat_interval=" + q(bad), auth, 400,
                      "M_INVALID_PARAM"))
    for bad in ["yes", "TRUE", "1", ""]:
        cases.append((f"full_state={bad!r}", "full_state=" + q(bad), auth, 400, "M_INVALID_PARAM"))
    for bad in ["%01", "a%0Ab", "a%0Db", "%7F", "x" * 4096]:
        cases.append((f"since={bad[:12]!r}", "since=" + bad, auth, 400, "M_INVALID_PARAM"))
    cases.append(("since Synapse rejects", "since=s1%20x", auth, 400,
                  synapse("timeout=0&since=s1%20x", tok)[1]))

    problems = []
    for name, query, headers, status, expect in cases:
        target = SSE_PATH + ("?" + query if query else "")
        r = ep.open(target, headers=headers).wait_end(30)
        try:
            assert r.status == status, f"status {r.status}"
            assert (r.header("content-type") or "").startswith("application/json")
            assert r.header("access-control-allow-origin") == "*"
            body = r.json()
            if isinstance(expect, str):
                assert body.get("errcode") == expect and isinstance(body.get("error"), str), body
            else:
                assert body == expect, f"{body} != Synapse's {expect}"
        except (AssertionError, ValueError) as exc:
            problems.append(f"{name}: {exc} ({r.describe()})")

    # Bounds are inclusive; the values accepted start a stream.
    for ok in ["heartbeat_interval=1", "heartbeat_interval=60", "full_state=false", "full_state=true"]:
        r = ep.open(SSE_PATH + "?" + ok, headers=auth)
        r.wait_headers(30)
        if r.status != 200 or not r.is_event_stream():
            problems.append(f"{ok}: expected a stream, got {r.describe()}")
        r.close()

    for method in ["POST", "PUT", "DELETE", "PATCH"]:
        r = ep.open(SSE_PATH, method=method, headers=auth, body=b"{}").wait_end(30)
        try:
            ok = (r.status == 405 and (r.header("content-type") or "").startswith("application/json")
                  and "errcode" in r.json())
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"{method}: expected 405 JSON, got {r.describe()}")

    r = ep.open(SSE_PATH, method="OPTIONS", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, last-event-id"}).wait_end(30)
    allow_headers = (r.header("access-control-allow-headers") or "").lower()
    if not (r.status == 204 and r.header("access-control-allow-origin") == "*"
            and "GET" in (r.header("access-control-allow-methods") or "")
            and "authorization" in allow_headers and "last-event-id" in allow_headers
            and not r.body):
        problems.append(f"OPTIONS preflight: {r.describe()}")

    assert not problems, "\n".join(problems) + "\n--- mxsse log ---\n" + log_tail(m)


@pytest.mark.parametrize("proto", ["h1", "h2c"])
def test_position_and_parameters_too_long_for_the_homeserver(proto, bed, register,
                                                            mxsse_factory, net):
    """Parameters and a Last-Event-ID that each pass the front but together
    make a /sync URL over the upstream client's cap: a clear 414 at once,
    not a stream that never starts while mxsse retries."""
    m = mxsse_factory(bed.synapse_url)
    alice = register("alice")
    ep = net.endpoint(m, proto)
    # "!" is percent-encoded upstream: 4000 bytes become 12000.
    headers = {**bearer(alice), "Last-Event-ID": "s1" + "!" * 4000}
    start = time.monotonic()
    r = ep.open(SSE_PATH + "?x=" + "a" * 7000, headers=headers).wait_end(20)
    assert r.status == 414, f"{r.describe()}\n--- mxsse log ---\n{log_tail(m, 10)}"
    assert r.json()["errcode"] == "M_TOO_LARGE"
    assert time.monotonic() - start < 5
    # What fits still streams.
    ok = ep.open(SSE_PATH + "?x=" + "a" * 100, headers=bearer(alice))
    ok.wait_headers(30)
    assert ok.status == 200 and ok.is_event_stream(), ok.describe()
    ok.close()


@pytest.mark.parametrize("value", ["s1\x7f", "s1\x01x", "s1\x00"])
@pytest.mark.parametrize("proto", ["h1", "h2c"])
def test_control_characters_in_last_event_id(proto, value, bed, register, mxsse_factory, net):
    """A position with control characters in the Last-Event-ID header: a 400
    with a JSON body (over HTTP/2 a stream reset with PROTOCOL_ERROR is the
    other answer RFC 9113 allows for a malformed field value)."""
    m = mxsse_factory(bed.synapse_url)
    alice = register("alice")
    r = net.endpoint(m, proto).open(SSE_PATH, headers={**bearer(alice), "Last-Event-ID": value})
    r.wait_end(30)
    if proto == "h2c" and r.info.get("rst_code") == 1:
        return
    assert r.status == 400, f"{r.describe()}\n--- mxsse log ---\n{log_tail(m, 6)}"
    assert (r.header("content-type") or "").startswith("application/json")
    assert r.json()["errcode"] in ("M_INVALID_PARAM", "M_UNRECOGNIZED")


def test_method_not_allowed_names_allowed_methods(bed, mxsse_factory, net):
    """RFC 9110 15.5.6: a 405 response MUST carry an Allow header."""
    m = mxsse_factory(bed.synapse_url)
    r = net.endpoint(m, "h1").open(SSE_PATH, method="POST", body=b"{}").wait_end(30)
    assert r.status == 405
    allow = r.header("allow")
    assert allow is not None and "GET" in allow, f"405 without Allow: {r.headers}"


@pytest.mark.parametrize("proto,window", [("h1", "0"), ("h2-tls", "0"), ("h2c", None)])
def test_upstream_down_at_start(proto, window, mxsse_factory, net):
    """Nothing listens upstream: a 502 with a Matrix JSON body, at once with
    --start-retry-window 0, after the (default 5 s) window of retries
    otherwise."""
    extra = ["--start-retry-window", window] if window is not None else []
    m = mxsse_factory(f"http://127.0.0.1:{free_port()}", *extra)
    t0 = time.monotonic()
    r = net.endpoint(m, proto).open(SSE_PATH, headers={"Authorization": "Bearer syt_x"}).wait_end(60)
    took = time.monotonic() - t0
    MEASURED[f"upstream_down_502_s[window={window or 'default'}]"].append(took)
    assert r.status == 502, r.describe()
    assert (r.header("content-type") or "").startswith("application/json")
    assert r.header("access-control-allow-origin") == "*"
    body = r.json()
    assert body["errcode"] == "M_UNKNOWN" and body["error"]
    if window == "0":
        assert took < 2, f"502 after {took:.1f} s with no retry window"
    else:
        assert 4.5 <= took <= 20, f"502 after {took:.1f} s with the default 5 s window"
        assert mxsse_counter(m, 'mxsse_sync_requests_total{reason="retry"}') >= 1


# --------------------------------------------------------------------------
# Errors after the start, upstream failures


@pytest.mark.parametrize("proto", ["h1", "h2c"])
def test_logout_mid_stream_ends_with_error_event(proto, bed, register, mxsse_factory, net):
    m = mxsse_factory(bed.synapse_url, "--longpoll-timeout", "3000", "--heartbeat-interval", "1")
    carol = register("carol")
    s = net.endpoint(m, proto).open(sse_target(), headers=bearer(carol))
    first = s.next_event(30)
    t0 = time.monotonic()
    carol.post("/logout")
    err = s.wait_event(lambda e: e.event == "error", 30)
    MEASURED[f"logout_to_error_event_s[{proto}]"].append(err.t - t0)
    assert err.json()["errcode"] == "M_UNKNOWN_TOKEN", err.data
    assert err.id is None, "the error event must not move Last-Event-ID"
    s.wait_end(10)
    assert s.ended_cleanly, s.describe()
    if proto == "h1":
        assert s.info.get("terminating_chunk")
    else:
        assert "rst_code" not in s.info
    assert s.events[-1] is err and s.parser.last_event_id == s.events[-2].id
    assert s.events[0] is first


def test_synapse_restart_mid_stream(bed, register, mxsse_factory, net):
    """Synapse stops and comes back: the stream stays open, heartbeats go
    on, and a message sent after the restart arrives."""
    m = mxsse_factory(bed.synapse_url, "--longpoll-timeout", "10000")
    alice, bob = register("alice"), register("bob")
    room = shared_room(alice, bob)
    s = net.endpoint(m, "h2-tls").open(sse_target({"heartbeat_interval": "1", "filter": FILTER}),
                                       headers=bearer(alice))
    s.next_event(30)
    down_at = time.monotonic()
    try:
        stop_synapse(bed)
        time.sleep(4)
        beats_down = [c.t for c in s.comments if c.t > down_at]
        assert not s.done, f"stream ended while Synapse was down: {s.describe()}"
    finally:
        start_synapse(bed)
    up_at = time.monotonic()
    MEASURED["synapse_restart_s"].append(up_at - down_at)
    event_id = send_text(bob, room, "after the restart")
    t_send = time.monotonic()
    ev = s.wait_event(has_message(room, event_id), 60)
    MEASURED["restart_message_to_event_s"].append(ev.t - t_send)
    assert len(beats_down) >= 3, f"heartbeats while Synapse was down: {beats_down}"
    beats = [c.t for c in s.comments if c.t > down_at]
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    assert max(gaps) <= 1 + 0.5 + TICK, f"heartbeats paused: {gaps}"
    assert not [e for e in s.events if e.event == "error"], s.events
    assert not s.done
    retries = mxsse_counter(m, "mxsse_sync_requests_total{reason=\"retry\"}")
    assert retries >= 1, "no retry counted"
    assert_ids_are_next_batch(s)


# --------------------------------------------------------------------------
# To-device messages across a reconnect


def test_to_device_exactly_once_across_resume(bed, register, mxsse_factory, net):
    """The client commits event e1, receives e2 and e3 but crashes before
    committing them, and resumes from e1 while more messages are sent.
    Synapse has deleted e2's messages (mxsse fetched since=e2 to produce
    e3), so only the replay buffer can give them back; each message must
    be accepted exactly once. Then an ordinary reconnect from the last id
    received duplicates nothing."""
    m = mxsse_factory(bed.synapse_url, "--longpoll-timeout", "10000", "--heartbeat-interval", "1")
    alice, bob = register("alice"), register("bob")
    ep = net.endpoint(m, "h1")
    tag = secrets.token_hex(3)
    td = [f"{tag}-{i}" for i in range(1, 9)]

    s1 = ep.open(sse_target(), headers=bearer(alice))
    e0 = s1.next_event(30)
    send_to_device(bob, alice.user_id, alice.device_id, td[0])
    e1 = s1.wait_event(has_nonce(td[0]), 30)
    send_to_device(bob, alice.user_id, alice.device_id, td[1])
    e2 = s1.wait_event(has_nonce(td[1]), 30)
    send_to_device(bob, alice.user_id, alice.device_id, td[2])
    e3 = s1.wait_event(has_nonce(td[2]), 30)  # mxsse fetched since=e2: td2 deleted upstream
    s1.close()
    # mxsse learns of an HTTP/1.1 close at its next write (a heartbeat); until
    # then it would fetch on for the closed stream. Wait, so that this test
    # follows one path (the race is test_resume_racing_*).
    wait_streams_open(m, 0)
    accepted = [e for e in s1.events if e.id in (e0.id, e1.id)]

    # Upstream no longer has td[1]: a /sync from e1 does not return it.
    upstream_view = alice.sync(since=e1.id, timeout=0)
    assert td[1] not in nonces([Event(data=json.dumps(upstream_view))]), \
        "Synapse still had the message: the replay path was not exercised"

    send_to_device(bob, alice.user_id, alice.device_id, td[3])
    send_to_device(bob, alice.user_id, alice.device_id, td[4])
    s2 = ep.open(sse_target(), headers={**bearer(alice), "Last-Event-ID": e1.id})
    wait_nonces(s2, td[1:5])
    r = s2.events
    assert r[0].id == e2.id and r[0].data == e2.data, "e2 not replayed as sent"
    assert r[1].id == e3.id and r[1].data == e3.data, "e3 not replayed as sent"

    # An ordinary reconnect right after an event.
    send_to_device(bob, alice.user_id, alice.device_id, td[5])
    last = s2.wait_event(has_nonce(td[5]), 30)
    s2.close()
    wait_streams_open(m, 0)
    accepted += s2.events
    send_to_device(bob, alice.user_id, alice.device_id, td[6])
    s3 = ep.open(sse_target(), headers={**bearer(alice), "Last-Event-ID": last.id})
    s3.wait_event(has_nonce(td[6]), 30)
    send_to_device(bob, alice.user_id, alice.device_id, td[7])
    s3.wait_event(has_nonce(td[7]), 30)
    accepted += s3.events

    got = nonces(accepted)
    counts = {n: got.count(n) for n in td}
    assert all(c == 1 for c in counts.values()), f"to-device deliveries per message: {counts}"
    assert len(got) == len(td), got


def test_resume_racing_an_old_connection_keeps_to_device(bed, register, mxsse_factory, net):
    """A client reconnects from id L while its previous connection (still
    open, or not yet known to be dead) is at L too. The old connection's
    long-poll returns batch M with a to-device message and mxsse fetches on
    from M, so Synapse deletes the message; the new connection's own fetch
    from L, answered after that, no longer carries it. mxsse has M in its
    replay buffer by then and must send M (same id, same content) to the
    new connection. The proxy holds the new connection's fetch for 1.5 s to
    make that order certain."""
    proxy = net.keep(DelayProxy(bed.synapse_url))
    m = mxsse_factory(proxy.url, "--longpoll-timeout", "10000")
    alice, bob = register("alice"), register("bob")
    ep = net.endpoint(m, "h2c")
    tag = secrets.token_hex(3)
    old = ep.open(sse_target(), headers=bearer(alice))
    old.next_event(30)
    send_to_device(bob, alice.user_id, alice.device_id, f"{tag}-a")
    at_l = old.wait_event(has_nonce(f"{tag}-a"), 30)
    time.sleep(0.3)  # the old stream's long-poll from L is out

    proxy.hold = lambda line: 1.5 if "/sync?timeout=0&" in line and "since=" in line else 0
    new = ep.open(sse_target(), headers={**bearer(alice), "Last-Event-ID": at_l.id})
    assert wait_until(lambda: proxy.held, 10), "the new stream's fetch never went upstream"
    send_to_device(bob, alice.user_id, alice.device_id, f"{tag}-b")
    m_old = old.wait_event(has_nonce(f"{tag}-b"), 30)
    first = new.next_event(30)
    proxy.hold = None
    assert nonces([first]) == [f"{tag}-b"], (
        f"to-device message lost on resume: event {first.id} on the new connection carries "
        f"{nonces([first])}; event {m_old.id} on the old one carried {nonces([m_old])}")
    assert first.id == m_old.id, (first.id, m_old.id)
    assert first.data == m_old.data, "two different batches were sent under one id"

    # A third connection from L gets the batch from memory: it must be M too.
    third = ep.open(sse_target(), headers={**bearer(alice), "Last-Event-ID": at_l.id})
    replayed = third.next_event(30)
    assert replayed.id == m_old.id and nonces([replayed]) == [f"{tag}-b"], \
        f"the replay buffer now holds {nonces([replayed])} for {replayed.id}"


# --------------------------------------------------------------------------
# Sharing


def test_two_tabs_share_one_upstream_sync(bed, register, mxsse_factory, net):
    """Two streams with one token and the same parameters (a second tab,
    resuming at the first one's position; over another protocol and with
    another heartbeat) cost one /sync per batch and get identical events."""
    m = mxsse_factory(bed.synapse_url, "--longpoll-timeout", "30000")
    alice, bob = register("alice"), register("bob")
    room = shared_room(alice, bob)
    a = net.endpoint(m, "h2-tls").open(sse_target({"filter": FILTER, "heartbeat_interval": "5"}),
                                        headers=bearer(alice))
    e0 = a.next_event(30)
    b = net.endpoint(m, "h1").open(sse_target({"filter": FILTER, "heartbeat_interval": "7"}),
                                   headers={**bearer(alice), "Last-Event-ID": e0.id})
    b.wait_headers(30)
    assert b.status == 200
    time.sleep(1)  # b's own first check (since=e0, nothing new) is done

    before = (mxsse_counter(m, "mxsse_sync_requests_total"), mxsse_counter(m, "mxsse_sync_empty_total"),
              mxsse_counter(m, "mxsse_upstream_requests_total"), synapse_sync_requests(bed))
    sent = []
    for i in range(5):
        sent.append(send_text(bob, room, f"tab message {i}"))
        a.wait_event(has_message(room, sent[-1]), 30)
        b.wait_event(has_message(room, sent[-1]), 30)
    time.sleep(1)  # both tabs' next long-poll is out
    after = (mxsse_counter(m, "mxsse_sync_requests_total"), mxsse_counter(m, "mxsse_sync_empty_total"),
             mxsse_counter(m, "mxsse_upstream_requests_total"), synapse_sync_requests(bed))

    a_events, b_events = a.events[1:], b.events
    assert [e.id for e in a_events] == [e.id for e in b_events]
    assert [e.data for e in a_events] == [e.data for e in b_events]
    batches = len(a_events)
    d_sync, d_empty, d_upstream, d_synapse = (x - y for x, y in zip(after, before))
    MEASURED["shared_tabs_syncs_per_batch"].append(d_synapse / batches)
    assert d_sync == batches + d_empty, (
        f"{batches} batches for 2 tabs cost {d_sync} /sync requests ({d_empty} empty)")
    assert d_upstream == d_sync
    assert d_synapse == d_sync, f"Synapse received {d_synapse} /sync, mxsse counted {d_sync}"
    assert sorted(message_ids(a_events, room)) == sorted(sent)


# --------------------------------------------------------------------------
# Presence


def test_set_presence_forwarded(bed, register, mxsse_factory, net):
    """set_presence=online keeps the user online while streaming (offline:
    does not), and the user goes offline after the stream closes."""
    m = mxsse_factory(bed.synapse_url, "--longpoll-timeout", "2000")
    alice, dave, bob = register("alice"), register("dave"), register("bob")
    shared_room(alice, bob)
    shared_room(dave, bob)
    ep = net.endpoint(m, "h2c")
    online = ep.open(sse_target({"set_presence": "online"}), headers=bearer(alice))
    offline = ep.open(sse_target({"set_presence": "offline"}), headers=bearer(dave))
    online.next_event(30)
    offline.next_event(30)
    assert wait_until(lambda: presence_of(bob, alice.user_id) == "online", 10), \
        presence_of(bob, alice.user_id)
    time.sleep(3)  # past a long-poll round
    assert presence_of(bob, alice.user_id) == "online"
    assert presence_of(bob, dave.user_id) == "offline"
    assert any("set_presence=offline" in t for t in upstream_targets(m))

    online.close()
    t0 = time.monotonic()
    assert wait_until(lambda: presence_of(bob, alice.user_id) == "offline", 50, 1), \
        "still online 50 s after the stream closed"
    MEASURED["presence_offline_after_close_s"].append(time.monotonic() - t0)


@pytest.mark.slow
def test_stream_keeps_user_online_past_sync_timeout(bed, register, mxsse_factory, net):
    """Longer than Synapse's 30 s sync_online_timeout: still online."""
    m = mxsse_factory(bed.synapse_url, "--longpoll-timeout", "10000")
    alice, bob = register("alice"), register("bob")
    shared_room(alice, bob)
    s = net.endpoint(m, "h1").open(sse_target({"set_presence": "online"}), headers=bearer(alice))
    s.next_event(30)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 45:
        assert presence_of(bob, alice.user_id) == "online", f"offline after {time.monotonic() - t0:.1f} s"
        time.sleep(3)
    assert not s.done


# --------------------------------------------------------------------------
# Shutdown


def test_sigterm_ends_streams_cleanly(bed, register, mxsse_factory, net):
    m = mxsse_factory(bed.synapse_url, "--longpoll-timeout", "30000")
    alice = register("alice")
    target = sse_target({"heartbeat_interval": "1"})
    h1 = net.endpoint(m, "h1").open(target, headers=bearer(alice))
    h1_tls = net.endpoint(m, "h1-tls").open(target, headers=bearer(alice))
    h2c = net.endpoint(m, "h2c")
    h2c_sse = h2c.open(target, headers=bearer(alice))
    h2_tls = net.endpoint(m, "h2-tls")
    h2_tls_sse = h2_tls.open(target, headers=bearer(alice))
    curl = net.keep(CurlSSE(m.url + target, mode="h2c", headers=bearer(alice)).start())
    streams = {"h1": h1, "h1-tls": h1_tls, "h2c": h2c_sse, "h2-tls": h2_tls_sse, "curl-h2c": curl}
    for s in streams.values():
        s.next_event(30)
    assert h2c.request("GET", "/_matrix/client/versions").status == 200

    t0 = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    for name, s in streams.items():
        s.wait_end(20)
        assert s.ended_cleanly, f"{name}: {s.describe()}"
    MEASURED["sigterm_to_streams_ended_s"].append(max(s.t_end for s in streams.values()) - t0)
    assert h1.info.get("terminating_chunk") and h1_tls.info.get("terminating_chunk")
    for s in (h2c_sse, h2_tls_sse):
        assert s.info.get("end_frame") in ("DATA", "HEADERS") and "rst_code" not in s.info, s.info
    assert curl.info["returncode"] == 0
    for conn in (h2c.h2, h2_tls.h2):
        assert conn.closed.wait(20)
        assert conn.goaway is not None and conn.goaway[1] == 0, conn.goaway
    m.proc.wait(30)
    MEASURED["sigterm_to_exit_s"].append(time.monotonic() - t0)
    m.check_clean_exit()
