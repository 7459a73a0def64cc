"""Loopback test bed for mxsse: a real Synapse with its PostgreSQL and Redis.

A bed is one directory holding one PostgreSQL cluster, one Redis server and
one Synapse homeserver, all bound to 127.0.0.1 on ports picked at start, so
several beds can run side by side. Synapse publishes its replication stream
on the Redis pub/sub channel named after its server_name, which is what
mxsse listens to.

Stdlib only, so that both the pytest suite and the `testbed` CLI can import
it from any Python >= 3.10. Synapse itself runs from a cached virtualenv
(`install_synapse()`, `testbed install-synapse`).

    bed = Testbed().up()           # or Testbed("/tmp/mybed").up()
    alice = bed.register("alice")  # {"user_id", "access_token", "device_id", ...}
    with bed.subscribe() as tap:   # Redis channel <server_name>
        ...
        line = tap.wait_for(lambda l: l.startswith("RDATA events "))
    bed.down()

Environment:
    MXSSE_CACHE   cache root (default ~/.cache/mxsse): Synapse venv and the
                  migrated database template live there.
    MXSSE_BED_ROOT  parent of new bed directories (default: /dev/shm when
                  it has 2 GB free, else /tmp).
    MXSSE_PG_BINDIR   PostgreSQL server binaries (default: newest
                  /usr/lib/postgresql/*/bin).

One module on purpose: it is both the library the suites import and the
`interop/testbed` command, with no dependency beyond the standard library.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

SYNAPSE_VERSION = "1.163.2"
SYNAPSE_REQUIREMENT = f"matrix-synapse[postgres,redis]=={SYNAPSE_VERSION}"
DEFAULT_SERVER_NAME = "mxsse.test"
LOOPBACK = "127.0.0.1"

HERE = Path(__file__).resolve().parent
CONSTRAINTS = HERE / "synapse-constraints.txt"

# One port per listening socket of a bed.
PORT_NAMES = ("postgres", "redis", "client", "metrics", "replication")

# Bump when the way the database template is built changes: cached
# templates of another format are then ignored and rebuilt.
TEMPLATE_FORMAT = 2

# Database role and name inside each bed's cluster.
PG_USER = "synapse"
PG_DB = "synapse"

# Far above anything a test does, so that rate limiting never interferes.
_UNLIMITED = {"per_second": 100000, "burst_count": 1000000}


class TestbedError(RuntimeError):
    """A bed failed to start or to answer; the message carries log tails."""

    __test__ = False  # not a pytest test class


def cache_dir() -> Path:
    return Path(os.environ.get("MXSSE_CACHE") or Path.home() / ".cache" / "mxsse")


def synapse_venv() -> Path:
    return cache_dir() / f"synapse-{SYNAPSE_VERSION}"


# --------------------------------------------------------------------------
# Synapse virtualenv


def _venv_stamp() -> str:
    """What a finished install records: the requirement and its constraints."""
    digest = hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()[:16]
    return f"{SYNAPSE_REQUIREMENT} constraints={digest}\n"


def synapse_venv_ok() -> bool:
    venv = synapse_venv()
    try:
        stamp = (venv / ".mxsse-installed").read_text()
    except OSError:
        return False
    return stamp == _venv_stamp() and (venv / "bin" / "python").exists()


def _pinned(lines: list[str]) -> set[str]:
    return {
        line.strip().lower().replace("_", "-")
        for line in lines
        if line.strip() and not line.startswith("#")
    }


def install_synapse(log: Callable[[str], None] | None = None) -> bool:
    """Create the cached Synapse virtualenv unless a complete one exists.

    Returns True when something was installed. The stamp file is written
    last, so an interrupted install is redone rather than trusted.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if synapse_venv_ok():
        return False
    venv = synapse_venv()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _flock(venv.parent / f"{venv.name}.lock", time.monotonic() + 1800):
        if synapse_venv_ok():
            return False
        python = venv / "bin" / "python"
        stamp = venv / ".mxsse-installed"
        # Adopt a venv installed by other means when it holds exactly the
        # pinned versions (pip freeze is a superset of the constraints).
        if python.exists():
            freeze = subprocess.run(
                [python, "-m", "pip", "freeze", "--disable-pip-version-check"],
                capture_output=True, text=True,
            )
            wanted = _pinned(CONSTRAINTS.read_text().splitlines())
            if freeze.returncode == 0 and wanted <= _pinned(freeze.stdout.splitlines()):
                stamp.write_text(_venv_stamp())
                return False
        shutil.rmtree(venv, ignore_errors=True)
        log(f"installing {SYNAPSE_REQUIREMENT} into {venv}")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--constraint", CONSTRAINTS, SYNAPSE_REQUIREMENT],
            check=True,
        )
        subprocess.run(
            [python, "-c", "import synapse, psycopg2, txredisapi, sys;"
             f"sys.exit(synapse.__version__ != {SYNAPSE_VERSION!r})"],
            check=True,
        )
        stamp.write_text(_venv_stamp())
        return True


# --------------------------------------------------------------------------
# Small stdlib helpers


@contextlib.contextmanager
def _flock(path: Path, deadline: float) -> Iterator[None]:
    """Exclusive lock on `path`, waiting at most until `deadline`."""
    with open(path, "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TestbedError(f"timed out waiting for lock {path}") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# Loopback requests must never go through an http_proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_json(
    method: str,
    url: str,
    body: Any = None,
    token: str | None = None,
    timeout: float = 30,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One HTTP request with a JSON body; returns (status, decoded body).

    Error statuses are returned, not raised. A body that is not JSON comes
    back as text.
    """
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with _opener.open(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            start = max(0, f.seek(0, os.SEEK_END) - 1024 * lines)
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    found = text.splitlines()
    if start > 0:
        found = found[1:]  # most likely cut in the middle
    return "\n".join(found[-lines:])


def _proc_start(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live process, None if gone.

    Recorded next to each pid so that a recycled pid is never signalled.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # exited, only waiting to be reaped
        return None
    return int(fields[19])


def _proc_entry(pid: int) -> dict:
    return {"pid": pid, "start": _proc_start(pid)}


def _alive(entry: dict | None) -> bool:
    return bool(entry) and entry["start"] is not None and _proc_start(entry["pid"]) == entry["start"]


def redis_ping(port: int) -> bool:
    """True when a Redis on loopback:port answers PING."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def default_bed_root() -> Path:
    """Where new bed directories go: $MXSSE_BED_ROOT, else /dev/shm when it
    has room (copying the database template to tmpfs was ~6x faster than to
    a disk-backed /tmp), else the temp dir."""
    if os.environ.get("MXSSE_BED_ROOT"):
        return Path(os.environ["MXSSE_BED_ROOT"])
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize >= 2 << 30 and os.access(shm, os.W_OK | os.X_OK):
            return shm
    return Path(tempfile.gettempdir())


def _claims_dir() -> Path:
    """Machine-wide registry of ports handed to beds (one file per port).

    A port picked by binding to port 0 is free at that instant only; the
    claim file keeps a concurrently starting bed from picking it too before
    our server binds it.
    """
    path = Path(tempfile.gettempdir()) / "mxsse-testbed-ports"
    path.mkdir(exist_ok=True)
    return path


_handed_out: set[int] = set()


def unclaimed_port() -> int:
    """A free loopback port, never the same twice in this process, that no
    bed holds a claim on. A port picked by binding to port 0 is free at
    that instant only: picks made one after the other before anything
    binds them can repeat (a process's listeners would then share a port),
    and a bed's server that restarts leaves its port unbound for a while."""
    claims = _claims_dir()
    for _ in range(200):
        port = _free_port()
        if port not in _handed_out and not (claims / str(port)).exists():
            _handed_out.add(port)
            return port
    raise TestbedError("no free loopback port found")


def _claim_ports(owner: Path) -> dict[str, int]:
    ports: dict[str, int] = {}
    claims = _claims_dir()
    for name in PORT_NAMES:
        for _ in range(200):
            port = _free_port()
            claim = claims / str(port)
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                # A bed that vanished with its directory leaves stale claims.
                holder = claim.read_text().strip() if claim.exists() else ""
                if holder and not Path(holder).is_dir():
                    claim.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(owner))
            ports[name] = port
            break
        else:
            raise TestbedError("no free loopback port found")
    return ports


def _release_ports(owner: Path) -> None:
    for claim in _claims_dir().iterdir():
        with contextlib.suppress(OSError):
            if claim.read_text().strip() == str(owner):
                claim.unlink()


def known_beds() -> list[Path]:
    """Directories of beds holding port claims on this machine."""
    dirs = set()
    for claim in _claims_dir().iterdir():
        with contextlib.suppress(OSError):
            dirs.add(Path(claim.read_text().strip()))
    return sorted(d for d in dirs if (d / "bed.json").exists())


def _signing_key() -> str:
    """A Synapse signing key file: 'ed25519 <version> <unpadded b64 seed>'."""
    seed = base64.b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return f"ed25519 a_{secrets.token_hex(2)} {seed}\n"


# --------------------------------------------------------------------------
# Redis pub/sub reader


class RedisSubscriber:
    """Reads one Redis pub/sub channel over RESP2 (stdlib only).

    Every received message is kept in `lines`. Never subscribe to
    `<server_name>/USER_IP`: it carries live access tokens.
    """

    def __init__(self, port: int, channel: str, host: str = LOOPBACK, timeout: float = 5):
        if channel.endswith("/USER_IP"):
            raise ValueError("refusing to read the USER_IP channel: it carries access tokens")
        self.channel = channel
        self.lines: list[str] = []
        self._buf = bytearray()
        self._sock = socket.create_connection((host, port), timeout=timeout)
        args = [b"SUBSCRIBE", channel.encode()]
        self._sock.sendall(
            b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        )
        reply = self._read(time.monotonic() + timeout)
        if not (isinstance(reply, list) and reply[0] == b"subscribe"):
            raise TestbedError(f"SUBSCRIBE {channel} failed: {reply!r}")

    def get(self, timeout: float = 5) -> str | None:
        """The next message on the channel, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self._read(deadline)
            except TimeoutError:
                return None
            if isinstance(msg, list) and msg[0] == b"message":
                line = msg[2].decode()
                self.lines.append(line)
                return line

    def wait_for(self, pred: Callable[[str], bool], timeout: float = 10) -> str:
        """First line (already received or arriving within `timeout`) matching `pred`."""
        for line in self.lines:
            if pred(line):
                return line
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            line = self.get(left)
            if line is not None and pred(line):
                return line
        raise TimeoutError(f"no matching line on {self.channel} within {timeout}s")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RedisSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, deadline: float) -> Any:
        while True:
            try:
                value, used = _resp_parse(self._buf, 0)
                del self._buf[:used]
                return value
            except _Incomplete:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise TimeoutError from None
            if not chunk:
                raise TestbedError("Redis closed the connection")
            self._buf += chunk


class _Incomplete(Exception):
    pass


def _resp_parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, head, pos = buf[pos:pos + 1], bytes(buf[pos + 1:end]), end + 2
    if kind == b"+":
        return head, pos
    if kind == b"-":
        raise TestbedError(f"Redis error: {head.decode()}")
    if kind == b":":
        return int(head), pos
    if kind == b"$":
        size = int(head)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        return bytes(buf[pos:pos + size]), pos + size + 2
    if kind == b"*":
        items = []
        for _ in range(max(int(head), 0)):
            item, pos = _resp_parse(buf, pos)
            items.append(item)
        return items, pos
    raise TestbedError(f"unexpected RESP data {bytes(buf[:40])!r}")


# --------------------------------------------------------------------------
# The bed


def _pg_bindir() -> Path:
    if os.environ.get("MXSSE_PG_BINDIR"):
        return Path(os.environ["MXSSE_PG_BINDIR"])
    found = [
        p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")
        if p.parent.parent.name.isdigit()
    ]
    if not found:
        raise TestbedError("no PostgreSQL server under /usr/lib/postgresql/*/bin: run scripts/install-deps")
    return max(found, key=lambda p: int(p.parent.name))


# Beds to stop when the process exits or is told to terminate (autostop).
_autostop_beds: list[Testbed] = []
_autostop_armed = False


def _stop_autostop_beds() -> None:
    while _autostop_beds:
        _autostop_beds[-1].down()


def _on_terminate(signum: int, frame: object) -> None:
    # Stop our beds, then die of the same signal as we would have.
    _stop_autostop_beds()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _arm_autostop(bed: Testbed) -> None:
    global _autostop_armed
    if not _autostop_armed:
        _autostop_armed = True
        atexit.register(_stop_autostop_beds)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) == signal.SIG_DFL:
                    signal.signal(sig, _on_terminate)
    _autostop_beds.append(bed)


class Testbed:
    """One bed: PostgreSQL + Redis + Synapse on loopback, in `self.dir`.

    `up()` starts everything and writes `bed.json`; `down()` stops whatever
    was started, also after a failed or interrupted `up()`. With
    `autostop=True` the bed is also stopped when the Python process exits or
    gets SIGTERM/SIGHUP (for pytest).
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        dir: str | Path | None = None,
        server_name: str = DEFAULT_SERVER_NAME,
        autostop: bool = False,
    ):
        self.dir = Path(dir).resolve() if dir else None
        self.server_name = server_name
        self.autostop = autostop
        # A stopped cluster to start from instead of the migrated template
        # (a directory with data/ and signing.key, e.g. bench/run's cached
        # worlds: a bed's pg/data after down(), with its Synapse key).
        self.db_template: Path | None = None
        self.info: dict = {}
        self._children: dict[int, subprocess.Popen] = {}
        if self.dir and (self.dir / "bed.json").exists():
            self.info = _read_json(self.dir / "bed.json") or {}
            self.server_name = self.info.get("server_name", server_name)

    # ---- what a bed offers ------------------------------------------------

    @property
    def synapse_url(self) -> str:
        return f"http://{LOOPBACK}:{self.info['ports']['client']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.info['ports']['metrics']}/_synapse/metrics"

    @property
    def replication_url(self) -> str:
        return f"http://{LOOPBACK}:{self.info['ports']['replication']}"

    @property
    def replication_secret(self) -> str:
        return self.info["secrets"]["replication"]

    @property
    def redis_port(self) -> int:
        return self.info["ports"]["redis"]

    @property
    def pg(self) -> dict:
        return self.info["postgres"]

    def register(self, localpart: str, password: str | None = None, admin: bool = False) -> dict:
        """Create a user through the shared-secret admin API (no /login).

        Returns {user_id, access_token, device_id, home_server, password}.
        """
        password = password or secrets.token_urlsafe(12)
        url = self.synapse_url + "/_synapse/admin/v1/register"
        status, body = http_json("GET", url)
        if status != 200:
            raise TestbedError(f"register nonce: HTTP {status} {body}")
        nonce = body["nonce"]
        mac = hmac.new(self.info["secrets"]["registration"].encode(), digestmod=hashlib.sha1)
        mac.update(b"\0".join([
            nonce.encode(), localpart.encode(), password.encode(),
            b"admin" if admin else b"notadmin",
        ]))
        status, body = http_json("POST", url, {
            "nonce": nonce, "username": localpart, "password": password,
            "admin": admin, "mac": mac.hexdigest(),
        })
        if status != 200:
            raise TestbedError(f"register {localpart}: HTTP {status} {body}")
        keys = ("user_id", "access_token", "device_id", "home_server")
        return {**{k: body[k] for k in keys}, "password": password}

    def subscribe(self, channel: str | None = None) -> RedisSubscriber:
        """Reader of the replication channel (default: <server_name>)."""
        return RedisSubscriber(self.redis_port, channel or self.server_name)

    def status(self) -> dict:
        info = dict(self.info or _read_json(self.dir / "bed.json") or {})
        pids = info.get("pids", {})
        info["running"] = {
            "synapse": _alive(pids.get("synapse")),
            "redis": _alive(pids.get("redis")),
            "postgres": self._postmaster(self.dir / "pg" / "data") is not None,
        }
        info["healthy"] = info["running"]["synapse"] and self._synapse_healthy()
        return info

    def log_files(self) -> dict[str, Path]:
        d = self.dir
        return {
            "synapse": d / "synapse" / "homeserver.log",
            "synapse-stderr": d / "synapse" / "stderr.log",
            "postgres": d / "pg" / "postgres.log",
            "redis": d / "redis" / "redis.log",
            "template-initdb": d / "template-build" / "initdb.log",
            "template-postgres": d / "template-build" / "postgres.log",
            "template-migrate": d / "template-build" / "migrate.log",
        }

    def log_tails(self, lines: int = 30) -> str:
        parts = []
        for path in self.log_files().values():
            text = _tail(path, lines)
            if text:
                parts.append(f"==> {path} <==\n{text}")
        return "\n\n".join(parts)

    # ---- lifecycle --------------------------------------------------------

    def up(self, timeout: float = 120, template_timeout: float = 900) -> Testbed:
        """Start the bed; returns self once Synapse answers /health.

        The first start for a Synapse version also builds the migrated
        database template (bounded by `template_timeout`).
        """
        t0 = time.monotonic()
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="mxsse-bed-", dir=default_bed_root()))
        self.dir.mkdir(parents=True, exist_ok=True)
        old = _read_json(self.dir / "bed.json")
        if old and old.get("state") in ("starting", "up"):
            self.info = old
            if any(self.status()["running"].values()):
                raise TestbedError(f"a bed is already running in {self.dir}: run down first")
        self._reset_dir()
        if not synapse_venv_ok():
            raise TestbedError(f"no Synapse venv at {synapse_venv()}: run scripts/install-deps")
        self.info = {
            "state": "starting",
            "dir": str(self.dir),
            "server_name": self.server_name,
            "synapse_version": SYNAPSE_VERSION,
            "pids": {},
            "secrets": {
                "registration": secrets.token_hex(16),
                "replication": secrets.token_hex(16),
                "macaroon": secrets.token_hex(16),
                "form": secrets.token_hex(16),
                "redis_feed": secrets.token_hex(16),
                "redis_presence": secrets.token_hex(16),
            },
        }
        if self.autostop:
            _arm_autostop(self)
        try:
            self.info["ports"] = _claim_ports(self.dir)
            self._save()
            if self.db_template is not None:
                template, built = Path(self.db_template), None
            else:
                template, built = self._template(time.monotonic() + template_timeout)
            deadline = time.monotonic() + timeout
            phases = {}
            for name, start in (("postgres", self._start_postgres), ("redis", self._start_redis),
                                ("synapse", self._start_synapse)):
                t1 = time.monotonic()
                start(template, deadline)
                phases[f"{name}_s"] = round(time.monotonic() - t1, 2)
        except BaseException as exc:
            self.info["state"] = "failed"
            self._save()
            tails = self.log_tails()
            self.down()
            if isinstance(exc, Exception):
                raise TestbedError(f"bed in {self.dir} failed to start: {exc}\n\n{tails}") from exc
            raise
        self.info.update(self._describe())
        self.info["timings"] = {
            "template_build_s": built,
            **phases,
            "up_s": round(time.monotonic() - t0, 2),
        }
        self.info["state"] = "up"
        self._save()
        return self

    def down(self, purge: bool = False) -> None:
        """Stop everything this bed started; keep the directory unless `purge`."""
        if self in _autostop_beds:
            _autostop_beds.remove(self)
        if self.dir is None:
            return
        if not self.info:
            self.info = _read_json(self.dir / "bed.json") or {}
        pids = self.info.get("pids", {})
        # Synapse first: it holds connections to both Redis and Postgres.
        self._stop(pids.get("synapse"), signal.SIGTERM, 20)
        self._stop(pids.get("redis"), signal.SIGTERM, 10)
        for data in (self.dir / "pg" / "data", self.dir / "template-build" / "data"):
            self._stop_postgres(data)
        _release_ports(self.dir)
        if self.info.get("state") in ("starting", "up"):  # keep "failed" visible
            self.info["state"] = "down"
        if self.info and (self.dir / "bed.json").exists():
            self._save()
        if purge and (self.dir / "bed.json").exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- internals --------------------------------------------------------

    def _save(self) -> None:
        _write_json(self.dir / "bed.json", self.info)

    def _reset_dir(self) -> None:
        """Stop leftovers of an earlier bed here and remove only our files."""
        if (self.dir / "bed.json").exists():
            self.down()
        elif any(self.dir.iterdir()):
            raise TestbedError(f"{self.dir} is neither empty nor a bed directory")
        for name in ("pg", "redis", "synapse", "template-build"):
            shutil.rmtree(self.dir / name, ignore_errors=True)
        (self.dir / "bed.json").unlink(missing_ok=True)
        if os.geteuid() == 0:
            # PostgreSQL runs as "postgres" and must traverse into the bed.
            os.chmod(self.dir, os.stat(self.dir).st_mode | 0o055)

    def _describe(self) -> dict:
        ports = self.info["ports"]
        return {
            "synapse_url": self.synapse_url,
            "metrics_url": self.metrics_url,
            "replication_url": self.replication_url,
            "redis": {"host": LOOPBACK, "port": ports["redis"], "channel": self.server_name,
                      "users": {role: u["user"] for role, u in self.redis_users.items()}},
            "postgres": {
                "host": LOOPBACK, "port": ports["postgres"], "user": PG_USER, "dbname": PG_DB,
                "socket_dir": str(self.dir / "pg"), "data_dir": str(self.dir / "pg" / "data"),
                "dsn": f"postgresql://{PG_USER}@{LOOPBACK}:{ports['postgres']}/{PG_DB}",
            },
            "logs": {name: str(path) for name, path in self.log_files().items() if path.exists()},
        }

    def _spawn(self, name: str, argv: list, log: Path, cwd: Path) -> dict:
        # Own session: a Ctrl-C in the terminal reaches us, and we stop the
        # servers in order, rather than the terminal killing them at random.
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [str(a) for a in argv], cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._children[proc.pid] = proc
        entry = _proc_entry(proc.pid)
        self.info["pids"][name] = entry
        self._save()
        return entry

    def _gone(self, entry: dict) -> bool:
        child = self._children.get(entry["pid"])
        if child is not None and child.poll() is not None:  # reaps our own child
            return True
        return not _alive(entry)

    def _stop(self, entry: dict | None, sig: int, grace: float) -> None:
        if not _alive(entry):
            return
        for signum, wait in ((sig, grace), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(entry["pid"], signum)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self._gone(entry):
                    return
                time.sleep(0.05)

    # -- PostgreSQL

    def _as_pg(self, argv: list) -> list:
        # The server refuses to run as root; CI runs as root.
        argv = [str(a) for a in argv]
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def _pg_dir(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)
            probe = subprocess.run(self._as_pg(["test", "-w", path]))
            if probe.returncode != 0:
                raise TestbedError(
                    f"user postgres cannot write {path}: choose a bed dir whose parents are world-searchable"
                )
        return path

    def _postmaster(self, data: Path) -> int | None:
        """Pid of the postmaster serving `data`, if one runs."""
        try:
            pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if str(data).encode() in cmdline and _proc_start(pid) else None

    def _stop_postgres(self, data: Path) -> None:
        pid = self._postmaster(data)
        if pid is not None:
            # SIGINT is PostgreSQL's "fast" shutdown.
            self._stop(_proc_entry(pid), signal.SIGINT, 30)

    def _pg_ctl_start(self, data: Path, sockdir: Path, port: int, log: Path, deadline: float) -> None:
        sock = sockdir / f".s.PGSQL.{port}"
        if len(str(sock)) > 107:
            raise TestbedError(f"PostgreSQL socket path too long ({sock}): use a shorter bed dir")
        # Per-bed settings, included from the template's postgresql.conf.
        (data / "mxsse-bed.conf").write_text(
            f"port = {port}\nunix_socket_directories = '{sockdir}'\n"
        )
        wait = max(5, int(deadline - time.monotonic()))
        res = subprocess.run(
            self._as_pg([_pg_bindir() / "pg_ctl", "start", "-D", data, "-l", log, "-w", "-t", wait]),
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
        )
        if res.returncode != 0:
            raise TestbedError(f"pg_ctl start failed: {res.stdout}{res.stderr}".strip())

    @staticmethod
    def template_key() -> str:
        """Names the migrated template this Synapse and PostgreSQL use."""
        return f"synapse-{SYNAPSE_VERSION}-pg{_pg_bindir().parent.name}-f{TEMPLATE_FORMAT}"

    def _template(self, deadline: float) -> tuple[Path, float | None]:
        """The cached, migrated, stopped cluster for this Synapse version.

        Building it runs Synapse's schema migrations and background updates
        once (the slow part of a first start); every bed then copies it.
        Returns (path, build seconds or None when it was cached).
        """
        root = cache_dir() / "pg-templates"
        root.mkdir(parents=True, exist_ok=True)
        bindir = _pg_bindir()
        key = self.template_key()
        template = root / key
        if (template / "template.json").exists():
            return template, None
        with _flock(root / f"{key}.lock", deadline):
            if (template / "template.json").exists():  # built while we waited
                return template, None
            t0 = time.monotonic()
            self._build_template(template, bindir, deadline)
            return template, round(time.monotonic() - t0, 2)

    def _build_template(self, template: Path, bindir: Path, deadline: float) -> None:
        build = self.dir / "template-build"
        shutil.rmtree(build, ignore_errors=True)
        self._pg_dir(build)
        data = build / "data"
        port = self.info["ports"]["postgres"]
        with open(build / "initdb.log", "w") as log:
            res = subprocess.run(
                self._as_pg([bindir / "initdb", "-D", data, "-U", PG_USER, "-E", "UTF8",
                             "--locale=C", "--auth=trust", "--no-instructions",
                             # 1 MB WAL segments instead of 16: less to copy per bed
                             "--wal-segsize=1"]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        if res.returncode != 0:
            raise TestbedError("initdb failed")
        # Local socket and 127.0.0.1 only, no password: a throwaway cluster.
        (data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# mxsse test bed: loopback only; durability is not needed.\n"
                "listen_addresses = '127.0.0.1'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "min_wal_size = 2MB\n"  # fewer recycled WAL segments to copy
                "include_if_exists = 'mxsse-bed.conf'\n"
            )
        self._pg_ctl_start(data, build, port, build / "postgres.log", deadline)
        subprocess.run(
            [bindir / "createdb", "-h", build, "-p", str(port), "-U", PG_USER,
             "-E", "UTF8", "--locale=C", "-T", "template0", PG_DB],
            check=True, capture_output=True,
        )
        key = _signing_key()
        (build / "signing.key").write_text(key)
        config = self._synapse_config(build, port, listen=False)
        _write_json(build / "homeserver.yaml", config)  # JSON is valid YAML
        _write_json(build / "log.config", self._log_config(build / "homeserver.log"))
        with open(build / "migrate.log", "w") as log:
            subprocess.run(
                [synapse_venv() / "bin" / "python", "-m", "synapse._scripts.update_synapse_database",
                 "--database-config", build / "homeserver.yaml", "--run-background-updates"],
                cwd=build, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                check=True, timeout=max(1, deadline - time.monotonic()),
            )
        self._stop_postgres(data)
        (data / "mxsse-bed.conf").unlink()
        # Publish atomically: a half-copied template must never be used.
        for stale in template.parent.glob(f"{template.name}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)  # from an interrupted build
        shutil.rmtree(template, ignore_errors=True)
        tmp = template.with_name(f"{template.name}.tmp{os.getpid()}")
        tmp.mkdir()
        shutil.copytree(data, tmp / "data", symlinks=True)
        (tmp / "signing.key").write_text(key)
        _write_json(tmp / "template.json", {
            "synapse_version": SYNAPSE_VERSION,
            "format": TEMPLATE_FORMAT,
            "postgres_bindir": str(bindir),
            "server_name": self.server_name,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        os.rename(tmp, template)
        shutil.rmtree(build, ignore_errors=True)

    def _start_postgres(self, template: Path, deadline: float) -> None:
        pgdir = self._pg_dir(self.dir / "pg")
        data = pgdir / "data"
        # In-process copy: no child process can outlive an interrupted up().
        shutil.copytree(template / "data", data, symlinks=True)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for parent, dirs, files in os.walk(data):
                for name in [parent, *(os.path.join(parent, n) for n in dirs + files)]:
                    os.lchown(name, pw.pw_uid, pw.pw_gid)
        self._pg_ctl_start(data, pgdir, self.info["ports"]["postgres"], pgdir / "postgres.log", deadline)
        pid = self._postmaster(data)
        if pid is not None:
            self.info["pids"]["postgres"] = _proc_entry(pid)
            self._save()

    # -- Redis

    def redis_argv(self) -> list:
        """The bed's redis-server command line (also for restarting it).

        Besides the default user (Synapse's, unrestricted), two ACL users
        of the kind a deployment gives mxsse (docs/presence.md): the feed
        may only SUBSCRIBE to the server-name channel, the presence
        publisher may only PUBLISH on it.
        """
        rdir = self.dir / "redis"
        channel = "&" + self.server_name
        users = self.redis_users
        return [
            shutil.which("redis-server") or "/usr/bin/redis-server",
            "--bind", LOOPBACK, "--port", self.info["ports"]["redis"], "--protected-mode", "yes",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", rdir, "--logfile", rdir / "redis.log",
            # One argv entry per ACL rule: redis-server takes the words
            # up to the next --option as the directive's arguments.
            "--user", users["feed"]["user"], "on", f">{users['feed']['password']}", "resetkeys",
            "resetchannels", channel, "-@all", "+subscribe", "+unsubscribe", "+ping",
            "--user", users["presence"]["user"], "on", f">{users['presence']['password']}", "resetkeys",
            "resetchannels", channel, "-@all", "+publish", "+ping",
        ]

    @property
    def redis_users(self) -> dict[str, dict[str, str]]:
        """{"feed"|"presence": {user, password, url}}: the restricted Redis
        accounts for mxsse's replication feed and its presence publisher."""
        keys = self.info["secrets"]
        out = {}
        for role in ("feed", "presence"):
            user, password = f"mxsse-{role}", keys.get(f"redis_{role}", "")
            out[role] = {"user": user, "password": password,
                         "url": f"redis://{user}:{password}@{LOOPBACK}:{self.info['ports']['redis']}"}
        return out

    def _start_redis(self, template: Path, deadline: float) -> None:
        rdir = self.dir / "redis"
        rdir.mkdir()
        port = self.info["ports"]["redis"]
        entry = self._spawn("redis", self.redis_argv(), rdir / "redis.log", rdir)

        self._wait("redis", lambda: redis_ping(port), entry, deadline)

    # -- Synapse

    def _log_config(self, logfile: Path) -> dict:
        return {
            "version": 1,
            "formatters": {"precise": {"format": (
                "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"
            )}},
            # Unbuffered, so a failed start has its last lines on disk.
            "handlers": {"file": {
                "class": "logging.FileHandler", "formatter": "precise",
                "filename": str(logfile), "encoding": "utf8",
            }},
            # DEBUG on synapse.storage.SQL would log access tokens.
            "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
            "root": {"level": "INFO", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }

    def _synapse_config(self, sdir: Path, pg_port: int, listen: bool = True) -> dict:
        ports, keys = self.info["ports"], self.info["secrets"]
        config: dict[str, Any] = {
            "server_name": self.server_name,
            "public_baseurl": f"http://{LOOPBACK}:{ports['client']}/",
            "report_stats": False,
            "signing_key_path": str(sdir / "signing.key"),
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "log_config": str(sdir / "log.config"),
            "media_store_path": str(sdir / "media"),
            "max_upload_size": "256M",
            "url_preview_enabled": False,
            "enable_registration": False,
            "registration_shared_secret": keys["registration"],
            "macaroon_secret_key": keys["macaroon"],
            "form_secret": keys["form"],
            "worker_replication_secret": keys["replication"],
            "enable_metrics": True,
            "presence": {"enabled": True},
            "database": {"name": "psycopg2", "args": {
                "user": PG_USER, "dbname": PG_DB, "host": LOOPBACK, "port": pg_port,
                "cp_min": 1, "cp_max": 10,
            }},
            "rc_message": _UNLIMITED,
            "rc_registration": _UNLIMITED,
            "rc_registration_token_validity": _UNLIMITED,
            "rc_login": {"address": _UNLIMITED, "account": _UNLIMITED, "failed_attempts": _UNLIMITED},
            "rc_admin_redaction": _UNLIMITED,
            "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
            "rc_joins_per_room": _UNLIMITED,
            "rc_3pid_validation": _UNLIMITED,
            "rc_invites": {"per_room": _UNLIMITED, "per_user": _UNLIMITED, "per_issuer": _UNLIMITED},
            "rc_third_party_invite": _UNLIMITED,
            "rc_media_create": _UNLIMITED,
            "rc_presence": {"per_user": _UNLIMITED},
            "rc_delayed_event_mgmt": _UNLIMITED,
            "rc_room_creation": _UNLIMITED,
            "rc_reports": _UNLIMITED,
            "rc_user_directory": _UNLIMITED,
            "rc_profile": _UNLIMITED,
            "rc_key_requests": _UNLIMITED,
            "rc_federation": {"window_size": 1000, "sleep_limit": 100000, "sleep_delay": 0,
                              "reject_limit": 100000, "concurrent": 1000},
            "listeners": [],
        }
        if listen:
            loopback = {"bind_addresses": [LOOPBACK], "tls": False}
            config["redis"] = {"enabled": True, "host": LOOPBACK, "port": ports["redis"]}
            config["listeners"] = [
                # mxsse proxies to this one and sets X-Forwarded-For.
                {**loopback, "port": ports["client"], "type": "http", "x_forwarded": True,
                 "resources": [{"names": ["client", "media"], "compress": False}]},
                {**loopback, "port": ports["metrics"], "type": "metrics"},
                # Internal replication HTTP API (presence_set_state, ...),
                # authenticated by worker_replication_secret.
                {**loopback, "port": ports["replication"], "type": "http",
                 "resources": [{"names": ["replication"]}]},
            ]
        return config

    def _synapse_healthy(self) -> bool:
        try:
            return http_json("GET", self.synapse_url + "/health", timeout=2)[0] == 200
        except OSError:
            return False

    def _start_synapse(self, template: Path, deadline: float) -> None:
        sdir = self.dir / "synapse"
        sdir.mkdir()
        # The template's key, so that the database and the key always match.
        shutil.copy(template / "signing.key", sdir / "signing.key")
        _write_json(sdir / "homeserver.yaml", self._synapse_config(sdir, self.info["ports"]["postgres"]))
        _write_json(sdir / "log.config", self._log_config(sdir / "homeserver.log"))
        entry = self._spawn("synapse", [
            synapse_venv() / "bin" / "python", "-m", "synapse.app.homeserver",
            "--config-path", sdir / "homeserver.yaml",
        ], sdir / "stderr.log", sdir)
        self._wait("synapse", self._synapse_healthy, entry, deadline)

    def _wait(self, what: str, ready: Callable[[], bool], entry: dict, deadline: float) -> None:
        while not ready():
            if self._gone(entry):
                raise TestbedError(f"{what} exited during startup")
            if time.monotonic() > deadline:
                raise TestbedError(f"{what} not ready before the timeout")
            time.sleep(0.1)
