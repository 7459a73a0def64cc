"""mxsse under a service manager: the sd_notify protocol of a Type=notify
unit, checked with a fake NOTIFY_SOCKET (an AF_UNIX datagram socket, as
systemd gives), and SIGHUP reloading the configuration without dropping a
stream.

- READY=1 once the listeners are bound, and, with --replication, only when
  the Redis feed is up (a real redis-server started late);
- RELOADING=1 with MONOTONIC_USEC (what systemd >= 253 wants for
  Type=notify-reload; Debian 12's systemd 252 reads RELOADING=1 alone),
  then READY=1, on SIGHUP;
- STOPPING=1 on SIGTERM;
- WATCHDOG=1 every WATCHDOG_USEC/2 when it is set, none when it is not;
- SIGHUP with a changed log level, heartbeat bounds and a restart-only key:
  the open SSE streams (HTTP/2 and HTTP/1.1) keep delivering, the new
  bounds hold for new streams, and the log says what changed and what
  needs a restart. An invalid file is refused and the old values kept.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import Mxsse, free_port, send_text, shared_room
from sseclient import H2Connection, h2_available, open_h1

SSE_PATH = "/_matrix/client/v3/sync/sse"
UPSTREAM = "http://127.0.0.1:9"  # never contacted by the notify tests


class NotifySocket:
    """What systemd's notify socket receives: one datagram per sd_notify,
    as (monotonic time, {field: value}) in arrival order."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.cond = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stopped:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self.cond:
                self.messages.append((time.monotonic(), fields))
                self.cond.notify_all()

    def wait_for(self, key: str, value: str = "1", after: int = 0, timeout: float = 10) -> int:
        """Index of the first message from `after` on with key=value."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(after, len(self.messages)):
                    if self.messages[i][1].get(key) == value:
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {key}={value} within {timeout}s; got {self.messages}")
                self.cond.wait(left)

    def count(self, key: str, after: int = 0) -> int:
        with self.cond:
            return sum(1 for _, m in self.messages[after:] if key in m)

    def close(self) -> None:
        self.stopped = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path):
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


def start(binary: Path, args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([str(binary), *args], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env={**os.environ, **env})


def stop(proc: subprocess.Popen, log: Path, signalled: bool = False) -> str:
    """SIGTERM (unless already sent: a second one may land after the loop
    has released the signal), then a clean exit."""
    if not signalled and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    text = log.read_text(errors="replace")
    assert code == 0, f"exit {code}:\n{text[-3000:]}"
    for marker in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:"):
        assert marker not in text, text[-3000:]
    return text


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_notify_ready_reload_watchdog_stopping(mxsse_binary, notify, tmp_path):
    port, admin = free_port(), free_port()
    log = tmp_path / "mxsse.log"
    proc = start(mxsse_binary, ["--upstream", UPSTREAM, "--listen", f"127.0.0.1:{port}",
                                "--admin-listen", f"127.0.0.1:{admin}"], log,
                 {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
    try:
        ready = notify.wait_for("READY")
        # READY comes after the listeners are bound: both answer at once.
        assert accepts(port) and accepts(admin)
        assert notify.messages[ready][1].get("STATUS") == "serving"
        assert notify.count("READY") == 1

        # Watchdog pings every 200 ms (WATCHDOG_USEC / 2).
        first = notify.wait_for("WATCHDOG")
        time.sleep(1.0)
        pings = [t for t, m in notify.messages[first:] if "WATCHDOG" in m]
        assert 3 <= len(pings) <= 8, pings
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert all(0.1 < g < 0.4 for g in gaps), gaps

        # SIGHUP: RELOADING=1 with the monotonic time of the request, then
        # READY=1 again.
        mark = len(notify.messages)
        before = time.clock_gettime(time.CLOCK_MONOTONIC)
        proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING", after=mark)
        after_reload = notify.wait_for("READY", after=reloading)
        assert after_reload > reloading
        usec = int(notify.messages[reloading][1]["MONOTONIC_USEC"])
        assert before - 0.1 <= usec / 1e6 <= time.clock_gettime(time.CLOCK_MONOTONIC) + 0.1
        assert accepts(port)

        # SIGTERM: STOPPING=1, then a clean exit.
        mark = len(notify.messages)
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", after=mark)
        text = stop(proc, log, signalled=True)
        assert "event=config.reloaded" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_no_watchdog_without_watchdog_usec(mxsse_binary, notify, tmp_path):
    port = free_port()
    log = tmp_path / "mxsse.log"
    proc = start(mxsse_binary, ["--upstream", UPSTREAM, "--listen", f"127.0.0.1:{port}"], log,
                 {"NOTIFY_SOCKET": notify.path})
    try:
        notify.wait_for("READY")
        time.sleep(0.8)
        assert notify.count("WATCHDOG") == 0, notify.messages
    finally:
        stop(proc, log)


def test_ready_waits_for_the_replication_feed(mxsse_binary, notify, tmp_path):
    """With --replication, READY=1 only once the Redis feed is subscribed:
    nothing while Redis is down, READY when a real redis-server comes up."""
    port, redis_port = free_port(), free_port()
    log = tmp_path / "mxsse.log"
    proc = start(mxsse_binary, ["--upstream", UPSTREAM, "--listen", f"127.0.0.1:{port}",
                                "--replication", f"redis://127.0.0.1:{redis_port}",
                                "--server-name", "example.org"], log,
                 {"NOTIFY_SOCKET": notify.path})
    redis = None
    try:
        notify.wait_for("STATUS", "listening; waiting for the replication feed")
        time.sleep(1.5)
        assert accepts(port), "the listener is bound while the feed is down"
        assert notify.count("READY") == 0, notify.messages
        redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 cwd=tmp_path)
        notify.wait_for("READY", timeout=30)
        assert "event=replication.up" in log.read_text()
    finally:
        stop(proc, log)
        if redis:
            redis.terminate()
            redis.wait(10)


# --- SIGHUP with open streams ------------------------------------------------


def bearer(client) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.access_token}"}


def write_config(path: Path, **keys: object) -> None:
    path.write_text("".join(f"{k} = {v}\n" for k, v in keys.items()))


def test_sighup_applies_limits_without_dropping_streams(mxsse_binary, bed, register, tls_cert,
                                                        tmp_path):
    if not h2_available():
        pytest.fail("libnghttp2 (HPACK for the HTTP/2 client) cannot be loaded")
    conf = tmp_path / "mxsse.conf"
    write_config(conf, **{"log-level": "info", "heartbeat-min": 1, "heartbeat-max": 300,
                          "max-connections": 1000, "upstream-max-connections": 256})
    m = Mxsse(mxsse_binary, bed.synapse_url, tls_cert, tmp_path, ["--config", str(conf)])
    # The log level must come from the file, so it can change there.
    i = m.args.index("--log-level")
    del m.args[i:i + 2]
    m.start()
    try:
        alice, bob = register("alice"), register("bob")
        room = shared_room(alice, bob)
        h2 = H2Connection(m.url)
        s2 = h2.open("GET", SSE_PATH + "?heartbeat_interval=1", headers=bearer(alice))
        s1 = open_h1(m.url + SSE_PATH + "?heartbeat_interval=1", headers=bearer(bob))
        for s in (s1, s2):
            s.next_event(30)
        # Above today's heartbeat-max: refused.
        over = h2.open("GET", SSE_PATH + "?heartbeat_interval=500", headers=bearer(alice))
        over.wait_end(10)
        assert over.status == 400, over.describe()
        assert "level=debug" not in m.read_log()

        write_config(conf, **{"log-level": "debug", "heartbeat-min": 2, "heartbeat-max": 600,
                              "max-connections": 500, "upstream-max-connections": 10})
        m.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "event=config.reloaded" not in m.read_log():
            assert time.monotonic() < deadline, m.read_log()[-3000:]
            time.sleep(0.05)
        text = m.read_log()
        assert "event=config.changed key=log-level from=info to=debug" in text
        assert "event=config.changed key=heartbeat-min from=1 to=2" in text
        assert "event=config.changed key=heartbeat-max from=300 to=600" in text
        assert "event=config.changed key=max-connections from=1000 to=500" in text
        assert re.search(r"event=config.needs_restart key=upstream-max-connections "
                         r"running=256 file=10", text), text[-3000:]
        assert re.search(r'event=config.reloaded .*restart_keys="upstream-max-connections"', text)

        # The streams opened before the reload still deliver, and heartbeat.
        body = "after reload"
        send_text(alice, room, body)
        for s in (s1, s2):
            s.wait_event(lambda e: body in e.data, 30)
            n = len(s.comments)
            assert s.wait(lambda: len(s.comments) > n, 5), s.describe()
            assert not s.done, s.describe()
        # The new bounds hold for new streams, on the same connection.
        now_ok = h2.open("GET", SSE_PATH + "?heartbeat_interval=500", headers=bearer(alice))
        now_ok.next_event(30)
        assert now_ok.status == 200
        below = h2.open("GET", SSE_PATH + "?heartbeat_interval=1", headers=bearer(alice))
        below.wait_end(10)
        assert below.status == 400, below.describe()
        # The log level applies at once.
        time.sleep(0.3)
        assert "level=debug" in m.read_log()

        # An invalid file: refused, the running values kept, streams on.
        conf.write_text("heartbeat-max = lots\n")
        m.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "event=config.reload_failed" not in m.read_log():
            assert time.monotonic() < deadline, m.read_log()[-3000:]
            time.sleep(0.05)
        again = h2.open("GET", SSE_PATH + "?heartbeat_interval=500", headers=bearer(alice))
        again.next_event(30)
        assert again.status == 200
        send_text(alice, room, "after a refused reload")
        s1.wait_event(lambda e: "after a refused reload" in e.data, 30)
        for s in (s1, s2, now_ok, again):
            s.close()
        h2.close()
    finally:
        m.check_clean_exit()
