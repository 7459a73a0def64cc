"""Real HTTP clients for the integration tests: curl, nghttp and h2load run as
subprocesses, their output parsed; plus a tiny raw HTTP/2 client for what no
tool does on demand (reset one stream and keep the connection).

    curl = Curl("2", cacert=m.cert)             # HTTP/2 over TLS (ALPN)
    r = curl.request("GET", m.tls_url + "/_matrix/client/versions")
    r.status, r.http_version, r.json()          # 200, "2", {...}

    job = Curl("1.1").start("GET", url, output=path, limit_rate="10M")
    ...                                          # runs in the background
    r = job.wait(60)

    r = Nghttp().request("PUT", url, headers={"authorization": ...}, body=b"{}")
    res = h2load(url, clients=1, streams=50, requests=1000)

`Response` is common to curl and nghttp. Each tool is stdlib-only Python
around the Debian `curl` and `nghttp2-client` binaries.

One module on purpose: each client wrapper is small and they share the
response type and process handling.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

Headers = Mapping[str, str] | Iterable[tuple[str, str]]

# Mode name -> (curl --http* flag, TLS?). "h2" is HTTP/2 negotiated with
# ALPN over TLS, "h2c" prior-knowledge HTTP/2 on a cleartext port.
CURL_MODES = {
    "h2": ("2", True),
    "h2c": ("2-prior-knowledge", False),
    "h1": ("1.1", False),
    "h1-tls": ("1.1", True),
}


def _header_items(headers: Headers | None) -> list[tuple[str, str]]:
    if not headers:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None


@dataclass
class Response:
    """One HTTP exchange as seen by a client tool.

    status is 0 when no response head arrived. headers keep their order;
    names are lowercase. returncode is the tool's exit status (curl: 0 ok,
    18 partial body, 28 timeout, 56 receive failure, 92 HTTP/2 stream
    error, ...)."""

    tool: str
    status: int
    http_version: str  # "1.1", "2", or "" when unknown
    headers: list[tuple[str, str]]
    body: bytes
    returncode: int
    stderr: str
    elapsed: float
    info: dict = field(default_factory=dict)  # curl's %{json}, nghttp's HAR entry

    def header(self, name: str) -> str | None:
        """Last value of header `name` (any case), None when absent."""
        name = name.lower()
        found = None
        for k, v in self.headers:
            if k == name:
                found = v
        return found

    def json(self) -> Any:
        return json.loads(self.body)

    def text(self) -> str:
        return self.body.decode(errors="replace")

    def describe(self) -> str:
        """Short text for assertion messages."""
        body = self.body[:300].decode(errors="replace")
        return (f"{self.tool}: rc={self.returncode} status={self.status} "
                f"http/{self.http_version} body={body!r} stderr={self.stderr[-500:]!r}")


# --------------------------------------------------------------------------
# curl


def _parse_header_dump(text: str) -> list[tuple[str, str]]:
    """Headers of the last response in a `curl -D` dump (skips 1xx heads)."""
    blocks: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.rstrip("\r")
        if line.startswith("HTTP/"):
            blocks.append([])
        elif ":" in line and blocks:
            name, _, value = line.partition(":")
            blocks[-1].append((name.strip().lower(), value.strip()))
    return blocks[-1] if blocks else []


class CurlJob:
    """A curl process started by Curl.start(); wait() returns its Response."""

    def __init__(self, argv: list[str], workdir: Path, output: Path | None,
                 own_workdir: bool):
        self.argv = argv
        self._dir = workdir
        self._output = output
        self._own = own_workdir
        self.started = time.monotonic()
        self._err = open(workdir / "stderr", "w+b")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._err)

    def running(self) -> bool:
        return self.proc.poll() is None

    def downloaded(self) -> int:
        """Bytes of body written so far (only with an output file)."""
        try:
            return (self._output or self._dir / "body").stat().st_size
        except OSError:
            return 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> Response:
        """Waits (killing curl after `timeout`: a hang fails the caller's
        checks, it never blocks the suite) and parses the results."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            hung = True
        elapsed = time.monotonic() - self.started
        self._err.seek(0)
        stderr = self._err.read().decode(errors="replace")
        self._err.close()
        if hung:
            stderr += f"\n[killed: still running after {timeout}s]"
        try:
            info = json.loads(out.decode(errors="replace").strip() or "{}")
        except ValueError:
            info = {}
        headers = _parse_header_dump((self._dir / "headers").read_text(errors="replace")
                                     if (self._dir / "headers").exists() else "")
        body = b""
        if self._output is None and (self._dir / "body").exists():
            body = (self._dir / "body").read_bytes()
        version = str(info.get("http_version", ""))
        if version == "0":
            version = ""
        resp = Response(
            tool="curl", status=int(info.get("response_code") or info.get("http_code") or 0),
            http_version=version, headers=headers, body=body,
            returncode=-9 if hung else self.proc.returncode, stderr=stderr,
            elapsed=elapsed, info=info)
        if self._own:
            shutil.rmtree(self._dir, ignore_errors=True)
        return resp


class Curl:
    """The curl command line tool in one HTTP mode.

    http: "2" (--http2: ALPN h2 over TLS, h2c Upgrade on cleartext),
    "2-prior-knowledge", "1.1". cacert: CA file for https URLs.
    interface: local address to connect from (curl --interface).
    """

    def __init__(self, http: str = "2", cacert: str | Path | None = None,
                 interface: str | None = None, timeout: float = 60):
        if http not in ("2", "2-prior-knowledge", "1.1"):
            raise ValueError(f"unknown curl HTTP mode {http!r}")
        self.http = http
        self.cacert = str(cacert) if cacert else None
        self.interface = interface
        self.timeout = timeout

    @classmethod
    def for_mode(cls, mode: str, cacert: str | Path | None = None, **kw: Any) -> "Curl":
        """A Curl for one of CURL_MODES ("h2", "h2c", "h1", "h1-tls")."""
        return cls(CURL_MODES[mode][0], cacert=cacert, **kw)

    def argv(self, method: str, url: str, workdir: Path, *, headers: Headers | None = None,
             body: bytes | None = None, body_file: str | Path | None = None,
             output: Path | None = None, limit_rate: str | None = None,
             max_time: float | None = None, extra: Iterable[str] = ()) -> list[str]:
        # --noproxy: loopback tests never go through an *_proxy from the
        # environment. HEAD needs -I (with -X HEAD curl waits for a body).
        argv = ["curl", "-sS", "--noproxy", "*", f"--http{self.http}",
                *(["-I"] if method == "HEAD" else ["-X", method]),
                "-o", str(output or workdir / "body"), "-D", str(workdir / "headers"),
                "-w", "%{json}", "--max-time", str(max_time or self.timeout)]
        if self.cacert:
            argv += ["--cacert", self.cacert]
        if self.interface:
            argv += ["--interface", self.interface]
        if limit_rate:
            argv += ["--limit-rate", limit_rate]
        for name, value in _header_items(headers):
            argv += ["-H", f"{name}: {value}"]
        if body is not None:
            (workdir / "upload").write_bytes(body)
            body_file = workdir / "upload"
        if body_file is not None:
            # -T streams the file (--data-binary would load it whole) and
            # sends Content-Length; -X keeps our method.
            argv += ["-T", str(body_file)]
        argv += list(extra)
        argv.append(url)
        return argv

    def start(self, method: str, url: str, *, workdir: Path | None = None,
              **kw: Any) -> CurlJob:
        """Starts curl in the background; same arguments as request()."""
        own = workdir is None
        d = Path(tempfile.mkdtemp(prefix="curl-")) if own else workdir
        d.mkdir(parents=True, exist_ok=True)
        return CurlJob(self.argv(method, url, d, **kw), d, kw.get("output"), own)

    def request(self, method: str, url: str, *, timeout: float | None = None,
                **kw: Any) -> Response:
        """Runs one request to completion.

        headers: mapping or pairs. body: bytes, or body_file: a path
        (streamed). output: write the body there instead of into
        Response.body. limit_rate: curl --limit-rate (e.g. "10M").
        max_time: curl --max-time. extra: more curl arguments.
        """
        wait = (timeout or kw.get("max_time") or self.timeout) + 10
        return self.start(method, url, **kw).wait(wait)


# --------------------------------------------------------------------------
# nghttp


class Nghttp:
    """The nghttp client (HTTP/2 only): h2 via ALPN for https URLs, h2c with
    prior knowledge for http URLs (no Upgrade).

    Status and headers come from its HAR output (-r), the body from stdout.
    With verbose=True the frame log (nghttp -v) is kept in Response.info
    ["frames"]; the body is then unusable (it is mixed into that log).
    nghttp does not verify certificates.
    """

    def __init__(self, timeout: float = 60, verbose: bool = False):
        self.timeout = timeout
        self.verbose = verbose

    def argv(self, method: str, url: str, workdir: Path, *, headers: Headers | None = None,
             body: bytes | None = None, body_file: str | Path | None = None,
             extra: Iterable[str] = ()) -> list[str]:
        argv = ["nghttp", "-r", str(workdir / "har.json"), "-t", str(self.timeout)]
        if self.verbose:
            argv.append("-v")
        if method != "GET" and method != "POST":
            argv += ["-H", f":method: {method}"]
        for name, value in _header_items(headers):
            argv += ["-H", f"{name}: {value}"]
        if body is not None:
            (workdir / "upload").write_bytes(body)
            body_file = workdir / "upload"
        if body_file is not None:
            argv += ["-d", str(body_file)]  # makes it a POST unless :method says otherwise
        elif method == "POST":
            (workdir / "upload").write_bytes(b"")
            argv += ["-d", str(workdir / "upload")]
        argv += list(extra)
        argv.append(url)
        return argv

    def start(self, method: str, url: str, **kw: Any) -> "NghttpJob":
        d = Path(tempfile.mkdtemp(prefix="nghttp-"))
        return NghttpJob(self.argv(method, url, d, **kw), d, self.verbose)

    def request(self, method: str, url: str, *, timeout: float | None = None,
                **kw: Any) -> Response:
        return self.start(method, url, **kw).wait((timeout or self.timeout) + 10)


class NghttpJob:
    def __init__(self, argv: list[str], workdir: Path, verbose: bool):
        self.argv = argv
        self._dir = workdir
        self.verbose = verbose
        self.started = time.monotonic()
        self._out = open(workdir / "stdout", "w+b")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.PIPE)

    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """stdout so far (the frame log in verbose mode)."""
        return (self._dir / "stdout").read_bytes().decode(errors="replace")

    def wait(self, timeout: float | None = None) -> Response:
        try:
            _, err = self.proc.communicate(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            hung = True
        elapsed = time.monotonic() - self.started
        self._out.close()
        stdout = (self._dir / "stdout").read_bytes()
        stderr = err.decode(errors="replace")
        if hung:
            stderr += f"\n[killed: still running after {timeout}s]"
        entry: dict = {}
        try:
            entries = json.loads((self._dir / "har.json").read_text())["log"]["entries"]
            entry = entries[-1] if entries else {}
        except (OSError, ValueError, KeyError):
            pass
        resp_part = entry.get("response", {})
        headers = [(h["name"].lower(), h["value"]) for h in resp_part.get("headers", [])]
        status = int(resp_part.get("status") or 0)
        info = {"har": entry}
        if self.verbose:
            info["frames"] = stdout.decode(errors="replace")
        shutil.rmtree(self._dir, ignore_errors=True)
        return Response(
            tool="nghttp", status=status,
            http_version="2" if status else "", headers=headers,
            body=b"" if self.verbose else stdout, returncode=-9 if hung else self.proc.returncode,
            stderr=stderr, elapsed=elapsed, info=info)


def nghttp_frames(frames: str, kind: str, direction: str = "recv") -> list[str]:
    """Lines of an `nghttp -v` log for one frame type, e.g. ("GOAWAY", "recv")
    -> ['[  1.002] recv GOAWAY frame <length=8, ...>', ...]. The line after
    each (the frame's details) is appended after ' | '."""
    lines = frames.splitlines()
    out = []
    pattern = re.compile(rf"\] {direction} {kind} frame")
    for i, line in enumerate(lines):
        if pattern.search(line):
            detail = lines[i + 1].strip() if i + 1 < len(lines) else ""
            out.append(f"{line} | {detail}")
    return out


# --------------------------------------------------------------------------
# h2load


@dataclass
class H2loadResult:
    returncode: int
    output: str
    protocol: str = ""
    total: int = 0
    started: int = 0
    done: int = 0
    succeeded: int = 0
    failed: int = 0
    errored: int = 0
    timeout: int = 0
    status: dict[str, int] = field(default_factory=dict)  # {"2xx": n, ...}
    req_per_s: float = 0.0
    seconds: float = 0.0


def parse_h2load(text: str, returncode: int = 0) -> H2loadResult:
    r = H2loadResult(returncode=returncode, output=text)
    if m := re.search(r"Application protocol: (\S+)", text):
        r.protocol = m.group(1)
    if m := re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                      r"(\d+) failed, (\d+) errored, (\d+) timeout", text):
        (r.total, r.started, r.done, r.succeeded, r.failed, r.errored,
         r.timeout) = map(int, m.groups())
    if m := re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text):
        r.status = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, m.groups())))
    if m := re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", text):
        value = float(m.group(1))
        r.seconds = value / 1000 if m.group(2) == "ms" else value
        r.req_per_s = float(m.group(3))
    return r


def h2load(url: str, *, clients: int = 1, streams: int = 1, requests: int = 100,
           headers: Headers | None = None, h1: bool = False, timeout: float = 120,
           extra: Iterable[str] = ()) -> H2loadResult:
    """Runs h2load (-c clients, -m streams per client, -n requests in all);
    h1=True speaks HTTP/1.1 instead. TLS certificates are not verified."""
    argv = ["h2load", "-c", str(clients), "-m", str(streams), "-n", str(requests)]
    if h1:
        argv.append("--h1")
    for name, value in _header_items(headers):
        argv += ["-H", f"{name}: {value}"]
    argv += list(extra)
    argv.append(url)
    try:
        p = subprocess.run(argv, capture_output=True, timeout=timeout)
        text, rc = p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace"), p.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") + f"\n[killed after {timeout}s]"
        rc = -9
    return parse_h2load(text, rc)


# --------------------------------------------------------------------------
# A raw HTTP/2 client (cleartext, prior knowledge)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
CANCEL = 0x8


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(headers: Iterable[tuple[str, str]], encoding: str = "utf-8") -> bytes:
    """HPACK block of literal fields without indexing, no Huffman: no table
    state to keep, valid for any decoder. Names and values are encoded
    with `encoding` (sseclient.hpack_literals uses latin-1)."""
    out = bytearray()
    for name, value in headers:
        n, v = name.encode(encoding), value.encode(encoding)
        out += b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v
    return bytes(out)


class RawH2:
    """Just enough HTTP/2 to open streams, read frames and reset a stream
    while the connection stays up. Answers SETTINGS and PING itself; never
    sends WINDOW_UPDATE unless asked (so a download stalls at the initial
    window, which is what a stalled client looks like)."""

    def __init__(self, host: str, port: int, timeout: float = 10,
                 source: str | None = None):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.authority = f"{host}:{port}"
        self._buf = b""
        self.frames: list[tuple[int, int, int, bytes]] = []  # everything read
        self.sock.sendall(PREFACE + self._frame(SETTINGS, 0, 0, b""))

    @staticmethod
    def _frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
            struct.pack(">I", stream) + payload

    def send_frame(self, ftype: int, flags: int, stream: int, payload: bytes = b"") -> None:
        self.sock.sendall(self._frame(ftype, flags, stream, payload))

    def request(self, stream: int, method: str, path: str,
                headers: Iterable[tuple[str, str]] = (), end_stream: bool = True) -> None:
        block = hpack_literal([(":method", method), (":scheme", "http"), (":path", path),
                               (":authority", self.authority), *headers])
        self.send_frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream, block)

    def reset(self, stream: int, code: int = CANCEL) -> None:
        self.send_frame(RST_STREAM, 0, stream, struct.pack(">I", code))

    def window_update(self, stream: int, increment: int) -> None:
        self.send_frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", increment))

    def read_frame(self, timeout: float = 10) -> tuple[int, int, int, bytes] | None:
        """(type, flags, stream, payload), or None when the peer closed."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buf) >= 9:
                length = int.from_bytes(self._buf[:3], "big")
                if len(self._buf) >= 9 + length:
                    ftype, flags = self._buf[3], self._buf[4]
                    stream = int.from_bytes(self._buf[5:9], "big") & 0x7FFFFFFF
                    payload = self._buf[9:9 + length]
                    self._buf = self._buf[9 + length:]
                    frame = (ftype, flags, stream, payload)
                    self.frames.append(frame)
                    if ftype == SETTINGS and not flags & ACK:
                        self.send_frame(SETTINGS, ACK, 0)
                    elif ftype == PING and not flags & ACK:
                        self.send_frame(PING, ACK, 0, payload)
                    return frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no HTTP/2 frame in time")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk

    def read_until(self, pred, timeout: float = 10) -> tuple[int, int, int, bytes]:
        """Reads frames until one satisfies pred(type, flags, stream, payload)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.read_frame(max(0.01, deadline - time.monotonic()))
            if frame is None:
                raise ConnectionError("connection closed by the server")
            if pred(*frame):
                return frame

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawH2":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# Process memory


def rss_kb(pid: int) -> int:
    return _status_kb(pid, "VmRSS")


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class RssSampler:
    """Peak resident memory of a process during a `with` block.

    Samples VmRSS every `interval` seconds in a thread and, where the kernel
    allows resetting it (/proc/PID/clear_refs "5"), also reads the exact
    high-water mark VmHWM. peak_kb is the larger of the two."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self.baseline_kb = rss_kb(pid)
        self.hwm_kb: int | None = None
        self._hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(rss_kb(self.pid))
            except (OSError, KeyError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self._hwm_reset = True
        except OSError:
            pass
        self.baseline_kb = rss_kb(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._hwm_reset:
            try:
                self.hwm_kb = _status_kb(self.pid, "VmHWM")
            except (OSError, KeyError):
                pass

    @property
    def peak_kb(self) -> int:
        return max([self.baseline_kb, *self.samples, self.hwm_kb or 0])

    @property
    def growth_kb(self) -> int:
        return self.peak_kb - self.baseline_kb

    def summary(self) -> str:
        return (f"baseline {self.baseline_kb} kB, peak {self.peak_kb} kB "
                f"(+{self.growth_kb} kB; {len(self.samples)} samples, VmHWM {self.hwm_kb})")


def connect_refused(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a TCP connect to host:port is refused (nothing listening)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
