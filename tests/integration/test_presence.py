"""Presence relayed the way Synapse's own sync workers do it (docs/presence.md).

Part 1 proves the relay (homeserver/presence_relay.c) against the real
Synapse, driven by tests/integration/presence_driver (built with mxsse):
USER_SYNC published with the bed's publish-only Redis account plus one
set_state per user through the replication listener, or a keepalive /sync
per user, keeps a user online and currently active as a long-poller is,
and the user goes offline within ~40 s after the last stream closes, soon
after a clean shutdown, within Synapse's 5-minute expiry after a crash;
Synapse and Redis restarts are survived (REPLICATE, reconnect). It also
measures what the two refresh paths cost Synapse.

Part 2 is the daemon: the same promises with mxsse's flags
(--presence-redis ...). Those tests skip until the relay is wired into the
daemon (mxsse logs `event=presence.start` at start-up when it is).

Figures are printed at the end; MXSSE_PRESENCE_REPORT=<file> writes them
as JSON. Tests marked slow (the crash expiry, ~6 min) run with the soak set.
"""

from __future__ import annotations

import os
import secrets
import signal
import statistics
import subprocess
import threading
import time
import urllib.parse
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import REPO, Client, mxsse_bin, shared_room
from measurements import report_fixture
from testbed import LOOPBACK, Testbed, http_json, redis_ping, synapse_venv

MEASURED: dict[str, list[float]] = defaultdict(list)
_report = report_fixture("mxsse-presence-measurements", "presence relay (seconds unless named otherwise)",
                         "MXSSE_PRESENCE_REPORT", MEASURED, key_width=52)

OFFLINE_AFTER_CLOSE = 45.0  # end 10-20 s after the close, Synapse: 30 s + 5 s timer
EXPIRY = 300.0              # Synapse's EXTERNAL_PROCESS_EXPIRY


# --------------------------------------------------------------------------
# Helpers


def presence(viewer: Client, user_id: str) -> tuple[str, bool]:
    body = viewer.get(f"/presence/{urllib.parse.quote(user_id, safe='')}/status")
    return body["presence"], bool(body.get("currently_active"))


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def watch(viewer: Client, user_id: str, seconds: float, step: float = 2) -> list[tuple[float, str, bool]]:
    t0, out = time.monotonic(), []
    while time.monotonic() - t0 < seconds:
        p, active = presence(viewer, user_id)
        out.append((round(time.monotonic() - t0, 1), p, active))
        time.sleep(step)
    return out


def offline_after(viewer: Client, user_id: str, timeout: float) -> float:
    t0 = time.monotonic()
    assert wait_until(lambda: presence(viewer, user_id)[0] == "offline", timeout, 1), \
        f"{user_id} still {presence(viewer, user_id)} {timeout:.0f} s later"
    return time.monotonic() - t0


def pair(bed: Testbed, name: str) -> tuple[Client, Client]:
    """A user and a room-mate who watches their presence."""
    u = Client(bed.synapse_url, bed.register(f"{name}-{secrets.token_hex(4)}"))
    mate = Client(bed.synapse_url, bed.register(f"mate-{secrets.token_hex(4)}"))
    shared_room(u, mate)
    return u, mate


def secret_file(bed: Testbed, tmp_path: Path) -> Path:
    f = tmp_path / "replication.secret"
    f.write_text(bed.replication_secret + "\n")
    f.chmod(0o600)
    return f


def driver_bin() -> Path:
    return Path(os.environ.get("MXSSE_BUILD_DIR", REPO / "build")) / "tests" / "integration" / "presence_driver"


class Driver:
    """tests/integration/presence_driver: the relay, commanded on stdin."""

    def __init__(self, bed: Testbed, tmp_path: Path, set_state: bool = True, feed: bool = True,
                 on_keepalive: Callable[[str, str], None] | None = None, **extra: str):
        self.bed = bed
        users = bed.redis_users
        argv = [str(driver_bin()), "--redis", users["presence"]["url"], "--channel", bed.server_name,
                "--instance", f"test-{secrets.token_hex(3)}"]
        if feed:
            argv += ["--feed", users["feed"]["url"]]
        if set_state:
            argv += ["--replication-url", bed.replication_url, "--secret-file", str(secret_file(bed, tmp_path))]
        for k, v in extra.items():
            argv += [f"--{k.replace('_', '-')}", v]
        self.log = open(tmp_path / f"driver-{secrets.token_hex(3)}.log", "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1)
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.on_keepalive = on_keepalive
        self.keepalives: list[float] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.wait_line(lambda l: l == "up", 15)

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("keepalive ") and self.on_keepalive:
                _, user, state = line.split(" ")
                self.keepalives.append(time.monotonic())
                self.on_keepalive(user, state)
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def wait_line(self, pred: Callable[[str], bool], timeout: float, start: int = 0) -> str:
        with self.cond:
            ok = self.cond.wait_for(lambda: any(pred(l) for l in self.lines[start:]), timeout)
            assert ok, f"driver said {self.lines[start:]}; log:\n{self.log_text()}"
            return next(l for l in self.lines[start:] if pred(l))

    def send(self, cmd: str, timeout: float = 5) -> str:
        n = len(self.lines)
        assert self.proc.stdin
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        verb = cmd.split(" ")[0]
        return self.wait_line(lambda l: l.startswith(verb + " ") or l.startswith("{"), timeout, n)

    def open(self, user: Client, state: str = "online") -> None:
        assert self.send(f"open {user.user_id} {user.device_id} {state}") == "open 0"

    def close(self, user: Client, state: str = "online") -> None:
        self.send(f"close {user.user_id} {user.device_id} {state}")

    def stats(self) -> dict:
        import json
        return json.loads(self.send("stats"))

    def quit(self, timeout: float = 15) -> int:
        n = len(self.lines)
        assert self.proc.stdin
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.wait_line(lambda l: l.startswith("shutdown "), timeout, n)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def drivers():
    path = driver_bin()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.skip(f"no presence driver at {path} (make in the build dir)")
    started: list[Driver] = []

    def start(*args: Any, **kw: Any) -> Driver:
        d = Driver(*args, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


# --------------------------------------------------------------------------
# Part 1: the relay against Synapse


def test_wrong_secret_is_refused(bed):
    """Synapse's replication listener refuses a wrong secret (500), so a
    misconfigured relay is seen, not silently ignored."""
    u, _ = pair(bed, "nosecret")
    url = f"{bed.replication_url}/_synapse/replication/presence_set_state/{urllib.parse.quote(u.user_id, safe='')}"
    body = {"device_id": u.device_id, "state": {"presence": "online"}, "force_notify": False, "is_sync": True}
    status, _ = http_json("POST", url, body, headers={"Authorization": "Bearer wrong"})
    assert status == 500
    status, _ = http_json("POST", url, body, headers={"Authorization": f"Bearer {bed.replication_secret}"})
    assert status == 200


def test_publisher_account_may_only_publish(bed):
    """The bed's presence account can PUBLISH on the channel and nothing
    else; the feed account can SUBSCRIBE and not PUBLISH."""
    users = bed.redis_users

    def cli(role: str, *args: str) -> str:
        u = users[role]
        return subprocess.run(["redis-cli", "-h", LOOPBACK, "-p", str(bed.redis_port), "--user", u["user"],
                               "--pass", u["password"], "--no-auth-warning", *args],
                              capture_output=True, text=True, timeout=10).stdout.strip()

    assert cli("presence", "PUBLISH", bed.server_name, "PING_FROM_TEST").isdigit()
    assert "NOPERM" in cli("presence", "PUBLISH", "other-channel", "x")
    assert "NOPERM" in cli("presence", "GET", "k")
    assert "NOPERM" in cli("presence", "SUBSCRIBE", bed.server_name)
    assert "NOPERM" in cli("feed", "PUBLISH", bed.server_name, "x")


def _hold(bed: Testbed, viewer: Client, user: Client, seconds: float) -> list[tuple[float, str, bool]]:
    states = watch(viewer, user.user_id, seconds)
    bad = [s for s in states if s[1] != "online" or not s[2]]
    assert not bad, f"not online and currently active while relayed: {bad}"
    return states


@pytest.mark.slow  # the daemon test covers it in the default run
def test_relay_keeps_long_poller_presence_both_modes(bed, drivers, tmp_path):
    """Both refresh paths side by side for 100 s (past Synapse's 60 s
    currently-active window): set_state through the replication listener,
    and a keepalive /sync per user. Each user stays online and currently
    active with no /sync of its own; after the close each is offline
    within ~40 s."""
    a, a_mate = pair(bed, "relayed")
    b, b_mate = pair(bed, "keepalive")

    def keepalive(user_id: str, state: str) -> None:
        assert user_id == b.user_id
        b.sync(timeout=0, set_presence=state)

    d1 = drivers(bed, tmp_path)
    d2 = drivers(bed, tmp_path, set_state=False, on_keepalive=keepalive)
    d1.open(a)
    d2.open(b)
    results: dict[str, Any] = {}
    t = threading.Thread(target=lambda: results.setdefault("b", watch(b_mate, b.user_id, 100)))
    t.start()
    results["a"] = watch(a_mate, a.user_id, 100)
    t.join()
    for name in ("a", "b"):
        bad = [s for s in results[name] if s[1] != "online" or not s[2]]
        assert not bad, f"{name}: not online and currently active while relayed: {bad}"
    s1, s2 = d1.stats(), d2.stats()
    assert s1["set_states"] == 3 and s1["call_errors"] == 0, s1  # at 0, 45, 90 s
    assert s2["keepalives"] == 3 and s2["set_states"] == 0, s2
    gaps = [y - x for x, y in zip(d2.keepalives, d2.keepalives[1:])]
    assert all(44 <= g <= 46.5 for g in gaps), gaps
    t_close = time.monotonic()
    d1.close(a)
    d2.close(b)
    took = {}
    t = threading.Thread(target=lambda: took.setdefault("b", offline_after(b_mate, b.user_id, 60)))
    t.start()
    took["a"] = offline_after(a_mate, a.user_id, 60)
    t.join()
    MEASURED["relay_offline_after_close_s[set_state]"].append(took["a"])
    MEASURED["relay_offline_after_close_s[keepalive]"].append(took["b"])
    assert max(took.values()) <= OFFLINE_AFTER_CLOSE, took
    assert min(took.values()) >= 25, f"offline too soon after the close (the end came early?): {took}"
    st = d1.stats()
    assert st["ends"] == 1 and st["publish_errors"] == 0 and st["echoes"] >= 2, st
    assert time.monotonic() - t_close < 80


def test_reconnect_within_grace_sends_no_end(bed, drivers, tmp_path):
    """A stream closing and a new one of the same device opening 5 s later
    (a page reload) sends nothing to Synapse, and the user never drops."""
    u, mate = pair(bed, "reload")
    d = drivers(bed, tmp_path)
    d.open(u)
    time.sleep(2)
    d.close(u)
    time.sleep(5)
    d.open(u)
    states = watch(mate, u.user_id, 30)
    assert all(s[1] == "online" for s in states), states
    st = d.stats()
    assert st["ends"] == 0 and st["starts"] == 1, st


@pytest.mark.slow  # the daemon test covers it in the default run
def test_clean_shutdown_goes_offline_soon(bed, drivers, tmp_path):
    """quit publishes CLEAR_USER_SYNC: the user is offline ~30 s later
    (Synapse's sync_online_timeout), not 5 minutes later."""
    u, mate = pair(bed, "shutdown")
    d = drivers(bed, tmp_path)
    d.open(u)
    assert wait_until(lambda: presence(mate, u.user_id) == ("online", True), 10)
    time.sleep(3)
    with bed.subscribe() as tap:
        assert d.quit() == 0
        tap.wait_for(lambda l: l.startswith("CLEAR_USER_SYNC test-"), 5)
    took = offline_after(mate, u.user_id, 60)
    MEASURED["relay_offline_after_clean_shutdown_s"].append(took)
    assert took <= 40, took


@pytest.mark.slow
def test_crash_goes_offline_within_expiry(bed, drivers, tmp_path):
    """SIGKILL: nothing is published any more; Synapse drops the instance
    after 5 minutes without a command and the user goes offline then."""
    u, mate = pair(bed, "crash")
    d = drivers(bed, tmp_path)
    d.open(u)
    time.sleep(3)
    d.kill()
    t0 = time.monotonic()
    # Still online a minute later: the device is in the crashed instance's set.
    time.sleep(60)
    assert presence(mate, u.user_id)[0] == "online"
    took = 60 + offline_after(mate, u.user_id, EXPIRY + 60)
    MEASURED["relay_offline_after_crash_s"].append(took)
    assert took <= EXPIRY + 45, took
    assert time.monotonic() - t0 >= EXPIRY - 60


def test_cost_set_state_vs_keepalive_sync(bed):
    """What one refresh costs Synapse: presence_set_state over the
    replication listener vs a /sync?timeout=0&set_presence=online of a user
    in one room (CPU seconds of the Synapse process per call, and latency),
    100 calls each, interleaved; and a re-announced USER_SYNC start (1000
    publishes)."""
    u, _ = pair(bed, "cost")
    u.sync(timeout=0)  # the first /sync of a device is an initial sync: not what a keepalive is
    since = u.sync(timeout=0)["next_batch"]
    pid = bed.info["pids"]["synapse"]["pid"]
    url = f"{bed.replication_url}/_synapse/replication/presence_set_state/{urllib.parse.quote(u.user_id, safe='')}"
    body = {"device_id": u.device_id, "state": {"presence": "online"}, "force_notify": False, "is_sync": True}
    hdr = {"Authorization": f"Bearer {bed.replication_secret}"}

    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    calls = {
        "set_state": lambda: http_json("POST", url, body, headers=hdr)[0],
        "keepalive_sync": lambda: http_json(
            "GET", f"{bed.synapse_url}/_matrix/client/v3/sync?timeout=0&set_presence=online&since={since}",
            token=u.access_token)[0],
    }
    lat: dict[str, list[float]] = defaultdict(list)
    cpu_used: dict[str, float] = defaultdict(float)
    rounds = 100
    for _ in range(rounds):
        for name, call in calls.items():
            c0, t0 = cpu(), time.perf_counter()
            assert call() == 200
            lat[name].append(time.perf_counter() - t0)
            time.sleep(0.05)  # let Synapse finish background work of the call
            cpu_used[name] += cpu() - c0
    for name in calls:
        MEASURED[f"cost_latency_ms[{name}]"].extend(x * 1000 for x in lat[name])
        MEASURED[f"cost_synapse_cpu_ms_per_call[{name}]"].append(cpu_used[name] * 1000 / rounds)
    # A USER_SYNC start for a device Synapse already counts as syncing
    # (what a re-announcement is), published with the bed's account.
    from presence_probe import Publisher
    pub = Publisher(bed)
    try:
        line = f"USER_SYNC cost-{secrets.token_hex(2)} {u.user_id} {u.device_id} start {int(time.time() * 1000)}"
        c0 = cpu()
        for _ in range(1000):
            pub.publish(line)
        time.sleep(1)
        MEASURED["cost_synapse_cpu_ms_per_call[user_sync_start]"].append((cpu() - c0) * 1000 / 1000)
    finally:
        pub.close()
    assert statistics.median(lat["set_state"]) < 1.0


# --------------------------------------------------------------------------
# Restarts, on a bed of their own


@pytest.fixture(scope="module")
def own_bed(request: pytest.FixtureRequest):
    b = Testbed(autostop=True).up()
    failed_before = request.session.testsfailed
    try:
        yield b
    finally:
        keep = bool(os.environ.get("MXSSE_KEEP_BED")) or request.session.testsfailed > failed_before
        b.down(purge=not keep)


def restart_synapse(b: Testbed) -> None:
    b._stop(b.info["pids"]["synapse"], signal.SIGTERM, 20)
    sdir = b.dir / "synapse"
    entry = b._spawn("synapse", [synapse_venv() / "bin" / "python", "-m", "synapse.app.homeserver",
                                 "--config-path", sdir / "homeserver.yaml"], sdir / "stderr.log", sdir)
    b._wait("synapse", b._synapse_healthy, entry, time.monotonic() + 90)


def restart_redis(b: Testbed) -> None:
    b._stop(b.info["pids"]["redis"], signal.SIGTERM, 10)
    assert not redis_ping(b.redis_port)
    time.sleep(2)
    entry = b._spawn("redis", b.redis_argv(), b.dir / "redis" / "redis.log", b.dir / "redis")
    b._wait("redis", lambda: redis_ping(b.redis_port), entry, time.monotonic() + 20)


@pytest.mark.slow  # the daemon test covers it in the default run
def test_synapse_restart_reannounces(own_bed, drivers, tmp_path):
    """Synapse forgets its syncing sets when it restarts and says so with
    REPLICATE: the relay re-sends every start within 5 s and every user's
    set_state within 20 s, and the user stays online and active (with the
    starts alone it went offline 34 s after the restart: Synapse's
    reloaded pseudo-device timed out)."""
    b = own_bed
    u, mate = pair(b, "synrestart")
    d = drivers(b, tmp_path)
    d.open(u)
    assert wait_until(lambda: d.stats()["starts"] == 1, 5), d.stats()  # 2 s after the set_state
    before = d.stats()
    restart_synapse(b)
    t_up = time.monotonic()
    assert wait_until(lambda: d.stats()["replicates"] > before["replicates"], 30), d.stats()
    assert wait_until(lambda: d.stats()["starts"] > before["starts"], 10), d.stats()
    MEASURED["synapse_restart_reannounced_s"].append(time.monotonic() - t_up)
    assert wait_until(lambda: d.stats()["set_states"] > before["set_states"], 25), d.stats()
    MEASURED["synapse_restart_set_state_s"].append(time.monotonic() - t_up)
    states = watch(mate, u.user_id, 75)
    bad = [s for s in states if s[1] != "online"]
    assert not bad, f"not online after Synapse restarted: {bad}"
    assert states[-1][2], states  # currently active
    d.close(u)
    MEASURED["synapse_restart_offline_after_close_s"].append(offline_after(mate, u.user_id, 60))


@pytest.mark.slow  # the daemon test covers it in the default run
def test_redis_restart_reconnects(own_bed, drivers, tmp_path):
    """Redis restarts: the relay reconnects with backoff, CLEARs and re-sends
    every start; the user stays online (Synapse's own timers only start
    counting 30 s after the device's last sync)."""
    b = own_bed
    u, mate = pair(b, "redisrestart")
    d = drivers(b, tmp_path)
    d.open(u)
    assert wait_until(lambda: d.stats()["starts"] == 1, 5), d.stats()  # 2 s after the set_state
    n = len(d.lines)
    restart_redis(b)
    d.wait_line(lambda l: l == "down", 15, n)
    d.wait_line(lambda l: l == "up", 30, n)
    st = d.stats()
    assert st["clears"] >= 2 and st["reconnects"] >= 1, st
    assert wait_until(lambda: d.stats()["starts"] >= 2, 10), d.stats()  # within the 5 s spread
    states = watch(mate, u.user_id, 60)
    bad = [s for s in states if s[1] != "online"]
    assert not bad, f"not online after Redis restarted: {bad}"
    d.close(u)
    MEASURED["redis_restart_offline_after_close_s"].append(offline_after(mate, u.user_id, 60))


# --------------------------------------------------------------------------
# Part 2: the daemon (skipped until the relay is wired into mxsse)


SSE_PATH = "/_matrix/client/v3/sync/sse"


def daemon_args(b: Testbed, tmp_path: Path, set_state: bool = True) -> list[str]:
    users = b.redis_users
    args = ["--replication", users["feed"]["url"], "--server-name", b.server_name,
            "--longpoll-fallback", "false",
            "--presence-redis", users["presence"]["url"],
            "--presence-instance", f"mxsse-test-{secrets.token_hex(3)}"]
    if set_state:
        args += ["--presence-replication-url", b.replication_url,
                 "--presence-replication-secret-file", str(secret_file(b, tmp_path))]
    return args


@pytest.fixture
def relay_daemon(mxsse_factory, tmp_path):
    """start(bed, set_state=True) -> mxsse with the presence relay on; skips
    when the daemon does not run the relay yet."""

    def start(b: Testbed, set_state: bool = True) -> Any:
        m = mxsse_factory(b.synapse_url, *daemon_args(b, tmp_path, set_state))
        if not wait_until(lambda: "event=presence.start" in m.read_log(), 3, 0.1):
            pytest.skip("mxsse does not run the presence relay yet (no event=presence.start)")
        assert wait_until(lambda: "event=presence.up" in m.read_log(), 15, 0.1), m.read_log()[-3000:]
        return m

    return start


def open_stream(m: Any, client: Client, params: dict | None = None) -> Any:
    from sseclient import H2Connection
    conn = H2Connection(m.url)
    target = SSE_PATH + ("?" + urllib.parse.urlencode(params) if params else "")
    s = conn.open("GET", target, headers={"Authorization": f"Bearer {client.access_token}"})
    s.info["conn"] = conn
    ev = s.next_event(30)
    assert s.status == 200 and ev.event == "message", s.describe()
    return s


def synapse_syncs(b: Testbed) -> float:
    from measurements import synapse_sync_requests
    return synapse_sync_requests(b)


@pytest.mark.parametrize("set_state", [
    True,
    # The same two minutes in keepalive mode: behind --soak (the relay's
    # keepalive path is unit-tested and its cost measured above).
    pytest.param(False, marks=pytest.mark.slow, id="keepalive_sync"),
], ids=["set_state", "keepalive_sync"])
def test_daemon_stream_keeps_user_online_and_active(bed, relay_daemon, set_state):
    """An open SSE stream keeps its user online and currently active for
    100 s; with set_state, mxsse makes no /sync for it meanwhile (the
    saving); the last stream closed -> offline within ~40 s."""
    m = relay_daemon(bed, set_state)
    u, mate = pair(bed, "daemon")
    s = open_stream(m, u)
    try:
        time.sleep(2)
        syncs0 = synapse_syncs(bed)
        _hold(bed, mate, u, 100)
        syncs = synapse_syncs(bed) - syncs0
        MEASURED[f"daemon_idle_syncs_per_100s[{'set_state' if set_state else 'keepalive'}]"].append(syncs)
        assert syncs <= (0 if set_state else 3), syncs
    finally:
        s.info["conn"].close()
    took = offline_after(mate, u.user_id, 60)
    MEASURED["daemon_offline_after_close_s"].append(took)
    assert took <= OFFLINE_AFTER_CLOSE, took


def test_daemon_woken_syncs_leave_presence_to_the_relay(bed, relay_daemon):
    """Messages wake a relayed stream: each woken /sync tells Synapse
    set_presence=offline (the relay shows the presence), the first batch
    still shows it, and the user stays online and currently active."""
    from conftest import send_text
    m = relay_daemon(bed)
    u = Client(bed.synapse_url, bed.register(f"woken-{secrets.token_hex(4)}"))
    mate = Client(bed.synapse_url, bed.register(f"mate-{secrets.token_hex(4)}"))
    room = shared_room(u, mate)
    s = open_stream(m, u)
    try:
        for i in range(3):
            send_text(mate, room, f"wake {i}")
            body = f"wake {i}"
            ev = s.wait_event(lambda e: body in e.data, 15)
            assert ev is not None, s.describe()
            time.sleep(1)
        _hold(bed, mate, u, 6)
    finally:
        s.info["conn"].close()
    log = (Path(bed.dir) / "synapse" / "homeserver.log").read_text(errors="replace")
    syncs = [ln for ln in log.splitlines()
             if "{" + u.user_id + "}" in ln and "/_matrix/client/v3/sync?" in ln]
    quiet = [ln for ln in syncs if "set_presence=offline" in ln]
    assert len(syncs) >= 4 and len(quiet) >= 3, syncs
    assert "set_presence=offline" not in syncs[0], syncs[0]  # the first batch


def test_daemon_clean_shutdown_offline_soon(bed, relay_daemon):
    m = relay_daemon(bed)
    u, mate = pair(bed, "daemonstop")
    s = open_stream(m, u)
    time.sleep(3)
    s.info["conn"].close()
    m.check_clean_exit()
    assert "event=presence.cleared" in m.read_log()
    took = offline_after(mate, u.user_id, 60)
    MEASURED["daemon_offline_after_clean_shutdown_s"].append(took)
    assert took <= 40, took


@pytest.mark.slow
def test_daemon_crash_offline_within_expiry(bed, relay_daemon):
    m = relay_daemon(bed)
    u, mate = pair(bed, "daemoncrash")
    s = open_stream(m, u)
    time.sleep(3)
    m.proc.kill()
    m.proc.wait()
    m.exit_code = -9
    s.info["conn"].close()
    took = offline_after(mate, u.user_id, EXPIRY + 60)
    assert took <= EXPIRY + 45, took


def test_daemon_synapse_and_redis_restart(own_bed, relay_daemon):
    b = own_bed
    m = relay_daemon(b)
    u, mate = pair(b, "daemonrestart")
    s = open_stream(m, u)
    try:
        restart_synapse(b)
        states = watch(mate, u.user_id, 45)
        assert all(p == "online" for _, p, _ in states), states
        restart_redis(b)
        assert wait_until(lambda: m.read_log().count("event=presence.up") >= 2, 30), m.read_log()[-3000:]
        states = watch(mate, u.user_id, 45)
        assert all(p == "online" for _, p, _ in states), states
    finally:
        s.info["conn"].close()
    assert offline_after(mate, u.user_id, 60) <= OFFLINE_AFTER_CLOSE
