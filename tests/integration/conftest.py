"""Fixtures for the integration suite: a real Synapse bed, and mxsse in front of it.

Environment:
  MXSSE_TESTBED_DIR  use the bed already running there (`interop/testbed up
                     --dir D`) instead of starting one; it is left running.
  MXSSE_KEEP_BED=1   keep the bed directory (config, logs) after the session;
                     it is also kept when a test failed.
  MXSSE_BIN          the mxsse binary; default $MXSSE_BUILD_DIR/mxsse, with
                     MXSSE_BUILD_DIR defaulting to <source root>/build.
  MXSSE_CACHE        cache of the Synapse venv and database template
                     (see interop/testbed.py).

Tests that need the mxsse binary (fixtures `mxsse` or `mxsse_binary`) get the
`mxsse` marker automatically, so `pytest -m "not mxsse"` runs the
Synapse-only part.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "interop"))

from testbed import Testbed, http_json, unclaimed_port  # noqa: E402

_kept_beds: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mxsse: needs the mxsse binary (MXSSE_BIN)")
    config.addinivalue_line("markers", "slow: long soak/scale test, run by scripts/check-all --soak")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "mxsse_binary" in getattr(item, "fixturenames", ()):  # also via `mxsse`
            item.add_marker(pytest.mark.mxsse)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for path in _kept_beds:
        terminalreporter.write_line(f"test bed kept in {path} (interop/testbed logs --dir {path} --text)")


class Client:
    """A user on the bed's Synapse, speaking the client-server API with urllib."""

    def __init__(self, base_url: str, account: dict):
        self.base_url = base_url
        self.user_id: str = account["user_id"]
        self.access_token: str = account["access_token"]
        self.device_id: str = account["device_id"]
        self.password: str = account["password"]

    def request(self, method: str, path: str, body: Any = None, *, query: dict | None = None,
                expect: int = 200, http_timeout: float = 30) -> Any:
        url = f"{self.base_url}/_matrix/client/v3{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        status, resp = http_json(method, url, body, token=self.access_token, timeout=http_timeout)
        assert status == expect, f"{method} {path} -> {status} {resp}"
        return resp

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query)

    def post(self, path: str, body: Any = None, **query: Any) -> Any:
        return self.request("POST", path, {} if body is None else body, query=query)

    def put(self, path: str, body: Any, **query: Any) -> Any:
        return self.request("PUT", path, body, query=query)

    def sync(self, **params: Any) -> dict:
        """GET /sync; `timeout` is Synapse's long-poll time in ms."""
        wait = params.get("timeout", 0) / 1000
        return self.request("GET", "/sync", query=params, http_timeout=wait + 30)


def q(s: str) -> str:
    """A path segment: room, user and event ids escaped."""
    return urllib.parse.quote(s, safe="")


def shared_room(alice: Any, bob: Any) -> str:
    """A private room created by bob (who can kick and ban), joined by alice."""
    room = bob.post("/createRoom", {"preset": "private_chat", "invite": [alice.user_id]})["room_id"]
    alice.post(f"/join/{q(room)}")
    return room


def send_text(client: Any, room: str, body: str) -> str:
    return client.put(f"/rooms/{q(room)}/send/m.room.message/{secrets.token_hex(8)}",
                      {"msgtype": "m.text", "body": body})["event_id"]


@pytest.fixture(scope="session")
def bed(request: pytest.FixtureRequest):
    """A running Synapse + PostgreSQL + Redis on loopback, shared by the session."""
    attached = os.environ.get("MXSSE_TESTBED_DIR")
    if attached:
        existing = Testbed(attached)
        if not existing.status()["healthy"]:
            pytest.fail(f"MXSSE_TESTBED_DIR={attached}: no healthy bed there")
        yield existing
        return
    # autostop: the bed also goes down on SIGTERM or an abrupt interpreter exit.
    testbed = Testbed(autostop=True).up()
    try:
        yield testbed
    finally:
        keep = bool(os.environ.get("MXSSE_KEEP_BED")) or request.session.testsfailed > 0
        testbed.down(purge=not keep)
        if keep:
            _kept_beds.append(str(testbed.dir))


@pytest.fixture
def register(bed: Testbed) -> Callable[[str], Client]:
    """register("alice") -> Client for a new user @alice-<random>:<server>.

    Localparts get a random suffix so tests never clash on a shared bed.
    """

    def make(name: str) -> Client:
        return Client(bed.synapse_url, bed.register(f"{name}-{secrets.token_hex(4)}"))

    return make


def mxsse_bin() -> Path:
    if os.environ.get("MXSSE_BIN"):
        return Path(os.environ["MXSSE_BIN"])
    return Path(os.environ.get("MXSSE_BUILD_DIR", REPO / "build")) / "mxsse"


@pytest.fixture(scope="session")
def mxsse_binary() -> Path:
    path = mxsse_bin()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.skip(f"no mxsse binary at {path} (build it, or set MXSSE_BIN)")
    return path


def free_port() -> int:
    return unclaimed_port()


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost/127.0.0.1: (cert, key)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-keyout", str(key), "-out", str(cert), "-days", "30", "-nodes", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True)
    return cert, key


class Mxsse:
    """One mxsse process: a cleartext listener (HTTP/1.1 + h2c), a TLS listener
    (h2 + HTTP/1.1) and the admin listener, all on free loopback ports."""

    def __init__(self, binary: Path, upstream: str, cert: tuple[Path, Path], workdir: Path,
                 extra: list[str] | None = None):
        self.port, self.tls_port, self.admin_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tls_url = f"https://127.0.0.1:{self.tls_port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.cert, self.key = cert
        self.log_path = workdir / f"mxsse-{self.port}.log"
        self.args = [str(binary), "--upstream", upstream,
                     "--listen", f"127.0.0.1:{self.port}",
                     "--tls-listen", f"127.0.0.1:{self.tls_port}",
                     "--cert", str(self.cert), "--key", str(self.key),
                     "--admin-listen", f"127.0.0.1:{self.admin_port}",
                     "--access-log", "--log-level", "debug", *(extra or [])]
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None

    def start(self, timeout: float = 10) -> "Mxsse":
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mxsse exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                with urllib.request.urlopen(self.admin_url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mxsse not ready after {timeout}s:\n{self.read_log()}")

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def metrics(self) -> dict[str, float]:
        """The admin /metrics page as {'name{labels}': value}."""
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signals the process and waits; returns the exit code."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"mxsse did not exit within {timeout}s after {sig}")
        if self.proc:
            self.exit_code = self.proc.returncode
            self.log.close()
        return self.exit_code if self.exit_code is not None else -1

    def check_clean_exit(self) -> None:
        """Exit status 0 and no sanitizer report in the log."""
        code = self.stop()
        log = self.read_log()
        for marker in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:"):
            assert marker not in log, f"sanitizer report in {self.log_path}:\n{log[-4000:]}"
        assert code == 0, f"mxsse exited with {code}:\n{log[-4000:]}"


@pytest.fixture
def mxsse_factory(mxsse_binary: Path, tls_cert, tmp_path: Path):
    """start(upstream, *extra_args) -> a running Mxsse; each is stopped at
    teardown and must exit cleanly (status 0, no sanitizer report)."""
    started: list[Mxsse] = []

    def start(upstream: str, *extra: str) -> Mxsse:
        m = Mxsse(mxsse_binary, upstream, tls_cert, tmp_path, list(extra)).start()
        started.append(m)
        return m

    yield start
    for m in started:
        if m.exit_code is None:
            m.check_clean_exit()


@pytest.fixture
def mxsse(mxsse_binary: Path, bed: Testbed, mxsse_factory) -> Mxsse:
    """mxsse in front of the bed's Synapse, admin API allowed (so users can be
    registered through it)."""
    return mxsse_factory(bed.synapse_url, "--proxy-prefix", "/_synapse/admin")
