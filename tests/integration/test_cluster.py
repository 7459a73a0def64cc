"""Several mxsse nodes behind HAProxy, sharing the replay store in Redis.

Three nodes read the bed's replication feed and share one replay store on
the bed's Redis (`--replay-store`, a key prefix of their own). Debian's
HAProxy, started here with a generated configuration, terminates TLS
(ALPN h2 and http/1.1) and balances HTTP requests over the nodes'
cleartext listeners, with `/readyz` on each node's admin listener as its
health check. TLS termination rather than TCP passthrough: each SSE
request is balanced on its own (an h2 client's reconnect can land on
another node although its connection to HAProxy stays up), and the
health check can take a draining node out before its listeners close.

Clients (tests/integration/sseclient.py) stream through HAProxy over h2
and over HTTP/1.1, both over TLS, and reconnect with `Last-Event-ID` as
EventSource does whenever a stream ends, cleanly or not. While a sender
sends to-device messages to every client's device and room messages to
two rooms, one node is killed with SIGKILL, another gets SIGTERM (its
`/readyz` fails first, its streams end spread out), both are restarted,
and the third gets SIGTERM and is restarted. Then every client must have
every to-device message exactly once and every room message exactly once
and in order per room, with no `event: gap`.

Both modes: nodes on the replication feed (woken fetches, timeout=0) and
nodes long-polling. Why both: Synapse answers a repeated /sync request
(same user, device, since, timeout, filter) from its response cache for
two minutes, so a resume that repeats a woken fetch gets the to-device
messages back even from a node without the batch; a long-polling node's
fetches are not what a resume asks (timeout=0), so only the shared store
saves them, and without it (MXSSE_CLUSTER_STORE=memory) the longpoll case
fails.

Runs in the default suite (about 45 s per mode on the shared bed; see the
durations pytest prints); MXSSE_CLUSTER_CLIENTS (default 6) sets the
number of clients; MXSSE_CLUSTER_STORE=memory runs the nodes without the
shared store, and the test fails (to-device messages lost). The helpers (`Cluster`, `Follower`) are also used by
bench/storm.

One module on purpose: the cases share the three-node cluster and its
HAProxy defined here.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from conftest import Client, Mxsse, free_port, q, send_text
from measurements import report_fixture
from sseclient import H2Connection, SSEStream, h2_available, open_h1
from testbed import LOOPBACK, Testbed

SSE_PATH = "/_matrix/client/v3/sync/sse"
TO_DEVICE_TYPE = "org.mxsse.test.cluster"
FILTER = json.dumps({"room": {"timeline": {"limit": 400}}, "presence": {"types": []}},
                    separators=(",", ":"))
CLIENTS = int(os.environ.get("MXSSE_CLUSTER_CLIENTS", "6"))

MEASURED: dict[str, list[float]] = defaultdict(list)

pytestmark = pytest.mark.skipif(not h2_available(), reason="libnghttp2 (HPACK) not loadable")

_report_measurements = report_fixture(
    "mxsse-cluster-measurements", "cluster measurements (seconds unless named otherwise)",
    "MXSSE_CLUSTER_REPORT", MEASURED)


# --------------------------------------------------------------------------
# HAProxy and the nodes


def haproxy_binary() -> str:
    path = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(path, os.X_OK):
        pytest.fail("haproxy is required (Debian package haproxy; scripts/install-deps)")
    return path


class Haproxy:
    """Debian's HAProxy terminating TLS in front of the nodes' cleartext
    listeners, health-checking each node's /readyz."""

    def __init__(self, workdir: Path, cert: tuple[Path, Path], nodes: list[Mxsse]):
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.pem = workdir / "haproxy.pem"
        self.pem.write_bytes(Path(cert[0]).read_bytes() + Path(cert[1]).read_bytes())
        self.cfg = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        servers = "\n".join(
            f"    server n{i} 127.0.0.1:{n.port} check port {n.admin_port}"
            for i, n in enumerate(nodes))
        # Timeouts longer than any heartbeat (streams send one every few
        # seconds); no buffering of responses is HAProxy's default.
        self.cfg.write_text(f"""
global
    log stderr format raw local0 info
    maxconn 4000
defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 10s
    retries 3
    option redispatch
frontend fe
    bind 127.0.0.1:{self.port} ssl crt {self.pem} alpn h2,http/1.1
    default_backend mxsse
backend mxsse
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
{servers}
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Haproxy":
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([haproxy_binary(), "-f", str(self.cfg), "-db"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited: {self.log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("haproxy did not listen")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.log.close()


def readyz(node: Mxsse) -> int | None:
    try:
        with urllib.request.urlopen(node.admin_url + "/readyz", timeout=1) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


class Cluster:
    """n mxsse nodes on the bed's feed sharing a replay store in the bed's
    Redis, and HAProxy in front of them."""

    def __init__(self, bed: Testbed, binary: Path, cert: tuple[Path, Path], workdir: Path,
                 n: int = 3, extra: list[str] | None = None, replication: bool = True):
        self.bed, self.workdir = bed, workdir
        redis = f"redis://{LOOPBACK}:{bed.redis_port}"
        self.prefix = f"mxsse:test-{secrets.token_hex(4)}:"
        # MXSSE_CLUSTER_STORE=memory: each node keeps its own replay buffer,
        # which shows what the shared store is for (the test then fails).
        shared = os.environ.get("MXSSE_CLUSTER_STORE", "redis") != "memory"
        store = ["--replay-store", redis, "--replay-store-prefix", self.prefix] if shared else []
        feed = ["--replication", redis, "--server-name", bed.server_name] if replication else []
        args = [*feed, *store,
                "--shutdown-ready-delay", "2", "--shutdown-spread", "2",
                "--shutdown-grace", "10", *(extra or [])]
        self.nodes = [Mxsse(binary, bed.synapse_url, cert, workdir, args) for _ in range(n)]
        self.generation = [0] * n
        self.haproxy = Haproxy(workdir, cert, self.nodes)

    def start(self) -> "Cluster":
        for node in self.nodes:
            node.start()
        self.haproxy.start()
        self.wait_in_rotation(range(len(self.nodes)))
        return self

    def wait_in_rotation(self, which: Any, timeout: float = 10) -> None:
        """Until HAProxy's checks had time to see the nodes ready (rise 2)."""
        deadline = time.monotonic() + timeout
        for i in which:
            while readyz(self.nodes[i]) != 200:
                assert time.monotonic() < deadline, f"node {i} not ready"
                time.sleep(0.05)
        time.sleep(1.2)

    def restart(self, i: int) -> None:
        node = self.nodes[i]
        self.generation[i] += 1
        node.log_path = self.workdir / f"mxsse-{node.port}-{self.generation[i]}.log"
        node.exit_code = None
        node.start()

    def kill(self, i: int) -> None:
        node = self.nodes[i]
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        node.exit_code = node.proc.returncode
        node.log.close()

    def stop(self, clean: bool = True) -> None:
        self.haproxy.stop()
        errors = []
        for node in self.nodes:
            if node.proc and node.proc.poll() is None:
                try:
                    node.check_clean_exit() if clean else node.stop(signal.SIGKILL)
                except AssertionError as e:
                    errors.append(str(e))
        assert not errors, "\n".join(errors)

    def sync_requests(self) -> float:
        """/sync requests mxsse sent upstream, all nodes that are up."""
        total = 0.0
        for node in self.nodes:
            if node.proc and node.proc.poll() is None:
                for k, v in node.metrics().items():
                    if k.startswith("mxsse_sync_requests_total"):
                        total += v
        return total


# --------------------------------------------------------------------------
# Clients that reconnect as EventSource does


class Follower:
    """One device streaming through the balancer; every stream end (clean,
    reset, 503) is followed by a reconnect with Last-Event-ID after a
    jittered delay (Retry-After when given). Records what it received."""

    def __init__(self, client: Client, url: str, cafile: str, transport: str, tag: str,
                 heartbeat: int = 2):
        self.client, self.url, self.cafile, self.transport, self.tag = client, url, cafile, transport, tag
        self.params = urllib.parse.urlencode({"filter": FILTER, "heartbeat_interval": str(heartbeat),
                                              "set_presence": "offline"})
        self.last_id: str | None = None
        self.to_device: Counter = Counter()
        self.timeline: dict[str, list[str]] = defaultdict(list)
        self.events = 0
        self.connects = 0
        self.ends: list[str] = []
        self.statuses: Counter = Counter()
        self.gaps = 0
        self.errors: list[str] = []
        self.first = threading.Event()
        self.last_event_at = 0.0
        self.ended_at: float | None = None   # the last stream end not yet resumed
        self.resumed_after: list[float] = []  # stream end -> next event
        self._halt = threading.Event()
        self._frozen = threading.Event()
        self._discard = threading.Event()
        self.discarded = 0  # events received but never read (see freeze)
        self._stream: SSEStream | None = None
        self._conn: H2Connection | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"follow-{transport}")

    def start(self) -> "Follower":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        s, c = self._stream, self._conn
        if s:
            s.close()
        if c:
            c.close()
        self._thread.join(15)

    def freeze(self) -> None:
        """Stops reading events (the transport still receives them): for
        mxsse they are taken, so it fetches past them upstream."""
        self._frozen.set()

    def discard_and_resume(self) -> None:
        """Drops the current stream with what arrived unread, as a client
        whose connection died before it read them, and resumes from the
        last event it did read."""
        self._discard.set()
        self._frozen.clear()

    def _open(self) -> SSEStream:
        headers = {"Authorization": f"Bearer {self.client.access_token}"}
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        target = f"{SSE_PATH}?{self.params}"
        if self.transport == "h2":
            self._conn = H2Connection(self.url, cafile=self.cafile)
            return self._conn.open("GET", target, headers=headers)
        return open_h1(self.url + target, headers=headers, cafile=self.cafile)

    def _take(self, ev: Any) -> None:
        if ev.event == "gap":
            self.gaps += 1
            return
        if ev.event == "error":
            self.errors.append(ev.data[:200])
            return
        body = ev.json()
        for e in body.get("to_device", {}).get("events", []):
            if e.get("type") == TO_DEVICE_TYPE:
                self.to_device[e["content"]["id"]] += 1
        for room, r in body.get("rooms", {}).get("join", {}).items():
            for e in r.get("timeline", {}).get("events", []):
                text = e.get("content", {}).get("body", "")
                if e.get("type") == "m.room.message" and text.startswith(self.tag):
                    self.timeline[room].append(text)
        self.events += 1
        self.last_id = ev.id
        now = time.monotonic()
        self.last_event_at = now
        if self.ended_at is not None:
            self.resumed_after.append(now - self.ended_at)
            self.ended_at = None
        self.first.set()

    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                s = self._stream = self._open()
            except OSError as e:
                self.ends.append(f"connect: {e}")
                time.sleep(0.3)
                continue
            self.connects += 1
            read = 0
            while not self._halt.is_set():
                if self._frozen.is_set():
                    time.sleep(0.02)
                    continue
                if self._discard.is_set():
                    self._discard.clear()
                    self.discarded += len(s.events) - read
                    break
                try:
                    self._take(s.next_event(0.5))
                    read += 1
                except TimeoutError:
                    continue
                except EOFError:
                    break
            if self._halt.is_set():
                break
            self.statuses[s.status] += 1
            self.ends.append("clean" if s.ended_cleanly else f"error: {s.error}")
            if self.ended_at is None:
                self.ended_at = s.t_end or time.monotonic()
            s.close()
            if self._conn:
                self._conn.close()
                self._conn = None
            retry_after = s.header("retry-after") if s.status != 200 else None
            # EventSource waits its retry: (mxsse sends 2-4 s); a shorter
            # jittered wait keeps the test quick.
            time.sleep(float(retry_after) if retry_after else random.uniform(0.2, 0.8))


# --------------------------------------------------------------------------
# The test


def create_room(owner: Client, members: list[Client]) -> str:
    room = owner.post("/createRoom", {"preset": "private_chat",
                                      "invite": [m.user_id for m in members]})["room_id"]
    for m in members:
        m.post(f"/join/{q(room)}")
    return room


class Sender(threading.Thread):
    """bob sends, every `period` s, one to-device message to every device
    and one room message, alternating rooms; records what was sent."""

    def __init__(self, bob: Client, devices: list[Client], rooms: list[str], tag: str,
                 period: float = 0.25):
        super().__init__(daemon=True, name="sender")
        self.bob, self.devices, self.rooms, self.tag, self.period = bob, devices, rooms, tag, period
        self.to_device: dict[str, list[str]] = defaultdict(list)  # device_id -> ids
        self.timeline: dict[str, list[str]] = defaultdict(list)
        self.failures: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self._halt.is_set():
            n += 1
            messages: dict[str, dict[str, Any]] = defaultdict(dict)
            ids = {}
            for d in self.devices:
                ids[d.device_id] = f"{self.tag}-{d.device_id}-{n}"
                messages[d.user_id][d.device_id] = {"id": ids[d.device_id]}
            try:
                self.bob.put(f"/sendToDevice/{TO_DEVICE_TYPE}/{secrets.token_hex(8)}",
                             {"messages": messages})
                for dev, i in ids.items():
                    self.to_device[dev].append(i)
                room = self.rooms[n % len(self.rooms)]
                text = f"{self.tag} {n}"
                send_text(self.bob, room, text)
                self.timeline[room].append(text)
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.failures.append(repr(e))
            time.sleep(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


@pytest.mark.parametrize("mode", ["replication", "longpoll"])
def test_cluster_kill_sigterm_restart(bed, register, mxsse_binary, tls_cert, tmp_path, mode):
    cluster = Cluster(bed, mxsse_binary, tls_cert, tmp_path, replication=mode == "replication").start()
    followers: list[Follower] = []
    sender: Sender | None = None
    try:
        tag = f"cl-{secrets.token_hex(3)}"
        bob = register("bob")
        users = [register(f"dev{i}") for i in range(CLIENTS)]
        rooms = [create_room(bob, users) for _ in range(2)]
        followers = [Follower(u, cluster.haproxy.url, str(tls_cert[0]),
                              "h2" if i % 2 == 0 else "h1", tag).start()
                     for i, u in enumerate(users)]
        for f in followers:
            assert f.first.wait(30), f"no first event: {f.ends} {f.statuses}"
        spread = Counter(
            n for n in range(len(cluster.nodes))
            for _ in range(int(cluster.nodes[n].metrics().get("mxsse_sse_streams_open", 0))))
        sender = Sender(bob, users, rooms, tag)
        sender.start()
        time.sleep(4)

        # 1. SIGKILL while the clients have not read what the nodes wrote
        # to them (and fetched past, acknowledging its to-device messages
        # upstream): they reconnect through HAProxy, mostly to other nodes,
        # resuming from their Last-Event-ID out of the shared store.
        for f in followers:
            f.freeze()
        time.sleep(2)
        cluster.kill(0)
        for f in followers:
            f.discard_and_resume()
        time.sleep(4)

        # 2. SIGTERM: /readyz fails first, then the streams end spread out.
        node = cluster.nodes[1]
        node.proc.send_signal(signal.SIGTERM)
        t_term = time.monotonic()
        assert wait_until(lambda: readyz(node) == 503, 1.0), "readyz still 200 after SIGTERM"
        # Still serving (the balancer needs the ready delay to notice).
        assert _accepts(node.port), "listener closed before --shutdown-ready-delay"
        code = node.proc.wait(20)
        MEASURED["sigterm_to_exit_s"].append(time.monotonic() - t_term)
        node.exit_code = code
        node.log.close()
        assert code == 0, node.read_log()[-3000:]
        log = node.read_log()
        assert "event=shutdown.closing" in log and "shutdown.grace_expired" not in log

        # 3. Both back; then the third node is upgraded the same way.
        cluster.restart(0)
        cluster.restart(1)
        cluster.wait_in_rotation([0, 1])
        time.sleep(2)
        node = cluster.nodes[2]
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(20) == 0, node.read_log()[-3000:]
        node.exit_code = 0
        node.log.close()
        cluster.restart(2)
        cluster.wait_in_rotation([2])
        time.sleep(2)
        sender.stop()

        # Everything sent reaches everyone.
        def complete(f: Follower) -> bool:
            dev = f.client.device_id
            return (all(f.to_device[i] for i in sender.to_device[dev]) and
                    all(len(f.timeline[r]) >= len(sender.timeline[r]) for r in rooms))

        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not all(complete(f) for f in followers):
            time.sleep(0.2)
        time.sleep(1)  # duplicates arriving late would show now
    finally:
        if sender:
            sender.stop()
        for f in followers:
            f.stop()
        cluster.stop()

    assert not sender.failures, sender.failures[:5]
    sent_to_device = sum(len(v) for v in sender.to_device.values())
    sent_room = sum(len(v) for v in sender.timeline.values())
    assert sent_to_device > 50 and sent_room > 20, (sent_to_device, sent_room)
    problems = []
    for f in followers:
        dev = f.client.device_id
        want = sender.to_device[dev]
        missing = [i for i in want if f.to_device[i] == 0]
        dup = {i: n for i, n in f.to_device.items() if n > 1}
        if missing or dup:
            problems.append(f"{f.transport} {dev}: to-device missing {len(missing)} {missing[:3]}, "
                            f"duplicated {dict(list(dup.items())[:3])}")
        for r in rooms:
            if f.timeline[r] != sender.timeline[r]:
                problems.append(f"{f.transport} {dev}: room {r}: got {len(f.timeline[r])} "
                                f"want {len(sender.timeline[r])}; first difference at "
                                f"{_first_diff(f.timeline[r], sender.timeline[r])}")
        if f.gaps:
            problems.append(f"{f.transport} {dev}: {f.gaps} gap event(s)")
        MEASURED["reconnects_per_client"].append(f.connects - 1)
        MEASURED["stream_end_to_next_event_s"].extend(f.resumed_after)
        MEASURED["refused_503_per_client"].append(f.statuses.get(503, 0))
    assert not problems, "\n".join(problems) + "\n" + "\n".join(
        f"{f.transport}: connects={f.connects} statuses={dict(f.statuses)} ends={f.ends[-6:]}"
        for f in followers)
    # Every client moved at least once (a node each of them was on went
    # away); the streams were spread over the nodes to begin with.
    assert all(f.connects >= 2 for f in followers), [f.connects for f in followers]
    MEASURED["streams_per_node_at_start"].extend(spread.values())
    MEASURED["to_device_sent"].append(sent_to_device)
    MEASURED["room_messages_sent"].append(sent_room)
    discarded = sum(f.discarded for f in followers)
    assert discarded > 0, "no client had unread events when the node died"
    MEASURED["events_unread_at_kill"].append(discarded)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _first_diff(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"{i}: {x!r} != {y!r}"
    return f"{min(len(a), len(b))} (length)"


def wait_until(pred: Any, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


# --------------------------------------------------------------------------
# One node, the store's edges


def _open_h2c(m: Mxsse, client: Client, last_id: str | None = None,
              since: str | None = None) -> tuple[H2Connection, SSEStream]:
    conn = H2Connection(m.url)
    headers = {"Authorization": f"Bearer {client.access_token}"}
    if last_id:
        headers["Last-Event-ID"] = last_id
    query = {"set_presence": "offline", **({"since": since} if since else {})}
    return conn, conn.open("GET", f"{SSE_PATH}?{urllib.parse.urlencode(query)}", headers=headers)


def test_resume_after_history_expired_says_gap(bed, register, mxsse_factory):
    """A resume from a position whose batch expired from the shared store
    (its marker has not) starts with `event: gap`; one from a position the
    store never held does not."""
    redis = f"redis://{LOOPBACK}:{bed.redis_port}"
    m = mxsse_factory(bed.synapse_url, "--replay-store", redis,
                      "--replay-store-prefix", f"mxsse:gap-{secrets.token_hex(4)}:",
                      "--replay-max-age", "2")
    alice, bob = register("alice"), register("bob")
    room = create_room(bob, [alice])
    conn, s = _open_h2c(m, alice)
    try:
        p0 = s.next_event(30).id
        send_text(bob, room, "stored under p0")
        p1 = s.wait_event(lambda e: "stored under p0" in e.data, 30).id
    finally:
        conn.close()
    assert p0 and p1 and p0 != p1
    # Right away: served from the store, no gap.
    conn, s = _open_h2c(m, alice, last_id=p0)
    try:
        ev = s.next_event(30)
        assert ev.event == "message" and ev.id == p1, ev
    finally:
        conn.close()
    time.sleep(3)  # the batch's TTL (2 s) passes; its marker lives 16 s
    conn, s = _open_h2c(m, alice, last_id=p0)
    try:
        first = s.next_event(30)
        assert first.event == "gap", first
        assert json.loads(first.data)["errcode"] == "ORG.MXSSE.HISTORY_GONE"
        assert s.next_event(30).event == "message"
    finally:
        conn.close()
    # From p1 nothing was ever stored: an ordinary resume.
    send_text(bob, room, "after p1")
    conn, s = _open_h2c(m, alice, last_id=p1)
    try:
        ev = s.wait_event(lambda e: True, 30)
        assert ev.event == "message", ev
    finally:
        conn.close()
    assert m.metrics().get("mxsse_replay_resume_gaps_total") == 1


def test_store_unreachable_refuses_resume_not_start(bed, register, mxsse_factory):
    """With the shared store unreachable, a resume is answered 503 with
    Retry-After (never served silently from the homeserver), a stream
    without a position still starts, and the metrics and log say why."""
    dead = free_port()
    m = mxsse_factory(bed.synapse_url, "--replay-store", f"redis://{LOOPBACK}:{dead}")
    alice = register("alice")
    since = alice.sync(timeout=0, set_presence="offline")["next_batch"]
    conn, s = _open_h2c(m, alice, since=since)
    try:
        s.wait_end(30)
        assert s.status == 503, s.describe()
        assert s.header("retry-after") and int(s.header("retry-after")) >= 1
        assert "replay store" in s.json()["error"]
    finally:
        conn.close()
    conn, s = _open_h2c(m, alice)
    try:
        assert s.next_event(30).event == "message"
        assert s.status == 200
    finally:
        conn.close()
    metrics = m.metrics()
    assert metrics.get("mxsse_replay_store_up") == 0
    assert metrics.get("mxsse_replay_resumes_refused_total") == 1
    assert "event=replay.resume_refused" in m.read_log()
