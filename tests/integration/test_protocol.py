"""The client-facing front as a protocol endpoint: h2spec conformance,
HTTP/1.1 and HTTP/2 edge cases, TLS, limits, timeouts, floods, signals and
metrics.

No Synapse is needed: each test starts mxsse in front of `FakeHomeserver`, a
few lines of http.server on a free port. HTTP/2 is spoken with raw frames
(`H2`), HTTP/1.1 with raw bytes (`Http1`), so every byte on the wire is the
test's choice. h2spec comes from `scripts/install-deps h2spec` (or $H2SPEC).

One module on purpose: every case shares the raw H2 and Http1 clients
and FakeHomeserver defined here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable

import pytest

from httpclients import _hpack_int

# --- a fake homeserver --------------------------------------------------


class FakeHomeserver:
    """Answers every path with JSON describing the request it got:
    {"method", "path", "body"}. Special path endings:
      /slow?ms=N  answers after N milliseconds
      /stream     a chunked response (no Content-Length)
      /big?kb=N   N KiB of "x"
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str]] = []  # (method, path with query)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def handle_any(self) -> None:
                body = self.read_body()
                with owner.lock:
                    owner.seen.append((self.command, self.path))
                path, _, query = self.path.partition("?")
                params = urllib.parse.parse_qs(query)
                if path.endswith("/slow"):
                    time.sleep(int(params.get("ms", ["1000"])[0]) / 1000)
                if path.endswith("/big"):
                    n = int(params.get("kb", ["1024"])[0]) * 1024
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(n))
                    self.end_headers()
                    try:
                        for _ in range(n // 65536):
                            self.wfile.write(b"x" * 65536)
                    except OSError:
                        pass
                    return
                if path.endswith("/stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    if self.command != "HEAD":
                        for piece in (b"one,", b"two,", b"three"):
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.write(b"0\r\n\r\n")
                    return
                payload = json.dumps({"method": self.command, "path": self.path,
                                      "body": body.decode("latin-1")}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = handle_any

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # mxsse cancelling a request breaks the pipe: expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self, needle: str) -> int:
        with self.lock:
            return sum(1 for _, p in self.seen if needle in p)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream():
    hs = FakeHomeserver()
    yield hs
    hs.close()


@pytest.fixture(autouse=True)
def small_asan_quarantine(monkeypatch: pytest.MonkeyPatch) -> None:
    """ASan keeps freed memory in a 256 MB quarantine by default, which would
    hide (or fake) growth in the RSS checks; the process reads this at start."""
    opts = os.environ.get("ASAN_OPTIONS", "")
    monkeypatch.setenv("ASAN_OPTIONS", (opts + ":" if opts else "") + "quarantine_size_mb=16")


# --- HTTP/1.x over raw sockets ------------------------------------------

LOCAL_404 = "/nope"  # outside every proxied prefix: answered by mxsse itself
PROXIED = "/_matrix/client/v3/test"


@dataclass
class Resp:
    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        found = None
        for k, v in self.headers:
            if k == name.lower():
                found = v
        return found

    def json(self) -> Any:
        return json.loads(self.body)


class Http1:
    """HTTP/1.x responses read from a socket, in order."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            self.fill()
        out, _, self.buf = self.buf.partition(sep)
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def to_eof(self) -> bytes:
        try:
            while True:
                self.fill()
        except (EOFError, ConnectionResetError):
            pass
        out, self.buf = self.buf, b""
        return out

    def response(self, head: bool = False, interim: bool = False) -> Resp:
        """The next response; 1xx ones are skipped unless `interim`."""
        while True:
            lines = self.until(b"\r\n\r\n").decode("latin-1").split("\r\n")
            version, status = lines[0].split(" ")[0], int(lines[0].split(" ")[1])
            headers = []
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers.append((k.strip().lower(), v.strip()))
            r = Resp(version, status, headers, b"")
            if 100 <= status < 200 and not interim:
                continue
            break
        if head or status < 200 or status in (204, 304):
            return r
        if (r.header("transfer-encoding") or "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self.until(b"\r\n")
                    break
                body += self.exact(size)
                self.exact(2)
            r.body = body
        elif r.header("content-length") is not None:
            r.body = self.exact(int(r.header("content-length")))
        else:
            r.body = self.to_eof()
        return r


def connect(port: int, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def tls_context(alpn: list[str] | None = None, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if version:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def tls_connect(port: int, alpn: list[str] | None = None, ctx: ssl.SSLContext | None = None,
                session: ssl.SSLSession | None = None, timeout: float = 10) -> ssl.SSLSocket:
    ctx = ctx or tls_context(alpn)
    return ctx.wrap_socket(connect(port, timeout), session=session)


def get(path: str, host: str = "localhost", extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: {host}\r\n{extra}\r\n".encode()


def h1_request(port: int, raw: bytes, *, tls: bool = False, head: bool = False) -> Resp:
    sock = tls_connect(port, ["http/1.1"]) if tls else connect(port)
    with sock:
        sock.sendall(raw)
        return Http1(sock).response(head=head)


def closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closed (EOF or reset), reading and dropping
    whatever arrives; None when still open after `timeout`."""
    start = time.monotonic()
    while True:
        left = timeout - (time.monotonic() - start)
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except socket.timeout:
            return None
        except (ConnectionResetError, ssl.SSLError, OSError):
            return time.monotonic() - start


def is_matrix_error(r: Resp, status: int, errcode: str | None = None) -> None:
    assert r.status == status, f"expected {status}, got {r.status} {r.body[:200]!r}"
    assert (r.header("content-type") or "").startswith("application/json"), r.headers
    doc = r.json()
    assert doc.get("errcode", "").startswith("M_") and doc.get("error"), doc
    if errcode:
        assert doc["errcode"] == errcode, doc


# --- HTTP/2 over raw frames ---------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, REFUSED_STREAM, CANCEL = 0, 1, 2, 7, 8
MAX_CONCURRENT_STREAMS = 3


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", ftype, flags, sid) + payload


def hpack_str(s: bytes) -> bytes:
    return _hpack_int(len(s), 7) + s


def request_block(path: str = "/", method: str = "GET", authority: str = "localhost",
                  scheme: str = "http", headers: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """A request header block from the static table and literals without
    indexing (so no dynamic table state on either side)."""
    out = bytearray()
    out += {"GET": b"\x82", "POST": b"\x83"}.get(method) or b"\x02" + hpack_str(method.encode())
    out += b"\x86" if scheme == "http" else b"\x87"
    out += b"\x84" if path == "/" else b"\x04" + hpack_str(path.encode())
    out += b"\x01" + hpack_str(authority.encode())
    for name, value in headers:
        out += b"\x00" + hpack_str(name) + hpack_str(value)
    return bytes(out)


_STATIC_STATUS = {8: 200, 9: 204, 10: 206, 11: 304, 12: 400, 13: 404, 14: 500}


def _huffman_digits(data: bytes) -> str:
    """RFC 7541 Huffman for digits only ('0'-'2': 5 bits, '3'-'9': 6 bits),
    enough for a :status value."""
    bits = "".join(f"{b:08b}" for b in data)
    out, i = "", 0
    while i < len(bits):
        rest = bits[i:]
        if len(rest) < 8 and set(rest) == {"1"}:
            break  # EOS padding
        if int(rest[:5], 2) <= 2 and len(rest) >= 5:
            out += str(int(rest[:5], 2))
            i += 5
        elif len(rest) >= 6 and 0x19 <= int(rest[:6], 2) <= 0x1F:
            out += str(int(rest[:6], 2) - 0x19 + 3)
            i += 6
        else:
            raise ValueError(f"not a Huffman-coded status: {data!r}")
    return out


def _skip_table_size_updates(block: bytes) -> int:
    """Where the first field starts: a header block may open with dynamic
    table size updates (RFC 7541 6.3, `001` and a 5-bit prefix integer),
    which an encoder sends after its table size changed, e.g. at the start
    of a connection whose encoder keeps no table."""
    pos = 0
    while pos < len(block) and block[pos] & 0xE0 == 0x20:
        more = block[pos] & 0x1F == 0x1F
        pos += 1
        while more:
            if pos >= len(block):
                raise ValueError(f"truncated table size update: {block!r}")
            more = bool(block[pos] & 0x80)
            pos += 1
    if pos >= len(block):
        raise ValueError(f"header block without a field: {block!r}")
    return pos


def decode_status(block: bytes) -> int | None:
    """:status from the first field of a response header block (after any
    table size updates): a static index, or a literal naming static entry
    8. None when it is a dynamic table reference (a repeated uncommon
    status on one connection)."""
    block = block[_skip_table_size_updates(block):]
    b = block[0]
    if b & 0x80:
        return _STATIC_STATUS.get(b & 0x7F)
    if b & 0xC0 == 0x40:
        idx, pos = b & 0x3F, 1
    elif b & 0xF0 in (0x00, 0x10):
        idx, pos = b & 0x0F, 1
    else:
        return None
    if idx not in range(8, 15):
        return None
    huff, n = block[pos] & 0x80, block[pos] & 0x7F
    raw = block[pos + 1:pos + 1 + n]
    return int(_huffman_digits(raw) if huff else raw.decode())


@pytest.mark.parametrize("block,status", [
    (b"\x88", 200),
    (b"\x20\x88", 200),                  # table size update to 0 first
    (b"\x3f\xe1\x1f\x20\x8d", 404),      # to 4096 (multi-byte), then 0
    (b"\x20\x08\x03431", 431),          # then a literal naming :status
], ids=["indexed", "size-update", "two-updates", "literal"])
def test_decode_status_skips_table_size_updates(block, status):
    assert decode_status(block) == status


@dataclass
class Stream:
    status: int | None = None
    body: bytes = b""
    ended: bool = False
    reset: int | None = None


@dataclass
class H2:
    """A raw HTTP/2 client connection. Frames read are recorded: responses
    per stream, GOAWAYs, the server's SETTINGS (acknowledged when `ack`)."""

    sock: socket.socket
    ack: bool = True
    buf: bytes = b""
    settings: dict[int, int] = field(default_factory=dict)
    streams: dict[int, Stream] = field(default_factory=dict)
    goaways: list[tuple[int, int, float]] = field(default_factory=list)  # (last id, code, time)
    frames: list[tuple[int, int, int]] = field(default_factory=list)     # (type, flags, stream)
    eof: bool = False

    def __post_init__(self) -> None:
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def request(self, sid: int, path: str = "/", method: str = "GET", body: bytes | None = None,
                scheme: str = "http", headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        block = request_block(path, method, scheme=scheme, headers=headers)
        out = frame(HEADERS, END_HEADERS | (0 if body is not None else END_STREAM), sid, block)
        if body is not None:
            out += frame(DATA, END_STREAM, sid, body)
        self.send(out)

    def read_frame(self, timeout: float = 10) -> tuple[int, int, int, bytes] | None:
        """One frame (recorded), or None at EOF. Raises socket.timeout."""
        deadline = time.monotonic() + timeout
        while len(self.buf) < 9 or len(self.buf) < 9 + int.from_bytes(self.buf[:3], "big"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("no frame")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            if not data:
                self.eof = True
                return None
            self.buf += data
        length = int.from_bytes(self.buf[:3], "big")
        ftype, flags, sid = struct.unpack(">BBI", self.buf[3:9])
        sid &= 0x7FFFFFFF
        payload, self.buf = self.buf[9:9 + length], self.buf[9 + length:]
        self.record(ftype, flags, sid, payload)
        return ftype, flags, sid, payload

    def record(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        self.frames.append((ftype, flags, sid))
        if ftype == SETTINGS and not flags & ACK:
            for i in range(0, len(payload), 6):
                k, v = struct.unpack(">HI", payload[i:i + 6])
                self.settings[k] = v
            if self.ack:
                self.send(frame(SETTINGS, ACK, 0))
        elif ftype in (HEADERS, DATA):
            if flags & PADDED:
                payload = payload[1:len(payload) - payload[0]]
            st = self.streams.setdefault(sid, Stream())
            if ftype == HEADERS:
                if flags & PRIORITY_FLAG:
                    payload = payload[5:]
                if st.status is None:
                    st.status = decode_status(payload)
            else:
                st.body += payload
                if payload:  # keep the windows open
                    n = struct.pack(">I", len(payload))
                    self.send(frame(WINDOW_UPDATE, 0, 0, n), frame(WINDOW_UPDATE, 0, sid, n))
            if flags & END_STREAM:
                st.ended = True
        elif ftype == RST_STREAM:
            self.streams.setdefault(sid, Stream()).reset = struct.unpack(">I", payload)[0]
        elif ftype == GOAWAY:
            last, code = struct.unpack(">II", payload[:8])
            self.goaways.append((last & 0x7FFFFFFF, code, time.monotonic()))

    def response(self, sid: int, timeout: float = 10) -> Stream:
        """Reads until stream `sid` ended or was reset."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.streams.get(sid)
            if st and (st.ended or st.reset is not None):
                return st
            if self.eof:
                raise EOFError(f"connection closed before stream {sid} ended")
            self.read_frame(deadline - time.monotonic())

    def wait(self, cond, timeout: float = 10) -> bool:
        """Reads frames until cond() holds; False at timeout or EOF."""
        deadline = time.monotonic() + timeout
        while not cond():
            if self.eof:
                return False
            try:
                self.read_frame(deadline - time.monotonic())
            except socket.timeout:
                return False
        return True

    def wait_eof(self, timeout: float = 10) -> bool:
        return self.wait(lambda: self.eof, timeout) or self.eof

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "H2":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def h2c(port: int) -> H2:
    h = H2(connect(port))
    assert h.wait(lambda: 4 in [t for t, _, _ in h.frames]), "no SETTINGS from the server"
    return h


def h2_tls(port: int) -> H2:
    sock = tls_connect(port, ["h2"])
    assert sock.selected_alpn_protocol() == "h2"
    h = H2(sock)
    assert h.wait(lambda: 4 in [t for t, _, _ in h.frames]), "no SETTINGS from the server"
    return h


def curl(url: str, *args: str, http: str = "2-prior-knowledge") -> tuple[int, str, dict[str, str], bytes]:
    """(status, HTTP version, headers, body) as curl saw them."""
    p = subprocess.run(["curl", "-sS", "-k", f"--http{http}", "--max-time", "10", "-D", "-",
                        "-o", "/dev/stdout", *args, url], capture_output=True, timeout=20)
    head, _, body = p.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/"):
        return 0, "", {}, p.stdout
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    return int(lines[0].split()[1]), lines[0].split()[0], headers, body


# --- h2spec --------------------------------------------------------------


def h2spec_binary() -> str | None:
    cache = Path(os.environ.get("MXSSE_CACHE", Path.home() / ".cache" / "mxsse"))
    for cand in (os.environ.get("H2SPEC"), str(cache / "go" / "bin" / "h2spec"), shutil.which("h2spec")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


SUMMARY = re.compile(r"(\d+) tests, (\d+) passed, (\d+) skipped, (\d+) failed")
# Test counts of the pinned h2spec (v2.2.1): a run that reports fewer ran
# only part of the suite.
H2SPEC_COUNTS = {None: 145, "http2": 94, "hpack": 7}


@pytest.mark.parametrize("listener,section,path", [
    ("tls", None, LOCAL_404),
    ("h2c", None, LOCAL_404),
    ("tls", "http2", PROXIED),
    ("h2c", "http2", PROXIED),
    ("tls", "hpack", PROXIED),
    ("h2c", "hpack", PROXIED),
], ids=["tls-all", "h2c-all", "tls-http2", "h2c-http2", "tls-hpack", "h2c-hpack"])
def test_h2spec(mxsse_factory, upstream, listener: str, section: str | None, path: str):
    """h2spec, all of it, over TLS (ALPN h2) and h2c (prior knowledge), with
    the request path answered by mxsse itself or proxied upstream."""
    h2spec = h2spec_binary()
    # A conformance suite that did not run proved nothing: fail, so the
    # run cannot stay green without it.
    if not h2spec:
        pytest.fail("h2spec not installed (scripts/install-deps h2spec, or set H2SPEC)")
    m = mxsse_factory(upstream.url)
    cmd = [h2spec, *([section] if section else []), "-h", "127.0.0.1", "-P", path]
    cmd += ["-t", "-k", "-p", str(m.tls_port)] if listener == "tls" else ["-p", str(m.port)]
    p = subprocess.run(cmd, capture_output=True, timeout=300)
    out = re.sub(r"\x1b\[[0-9;]*m", "", p.stdout.decode(errors="replace"))
    found = SUMMARY.findall(out)
    assert found, f"no h2spec summary in:\n{out[-3000:]}\n{p.stderr.decode(errors='replace')}"
    tests, passed, skipped, failed = map(int, found[-1])
    failures = out[out.find("Failures:"):] if "Failures:" in out else ""
    print(f"\nh2spec {listener} {section or 'all'} -P {path}: "
          f"{tests} tests, {passed} passed, {skipped} skipped, {failed} failed")
    assert failed == 0, f"h2spec {' '.join(cmd[1:])}: {tests} tests, {failed} failed\n{failures}"
    assert passed + skipped == tests >= H2SPEC_COUNTS[section], f"{tests} tests, {passed} passed"
    assert m.proc.poll() is None, "mxsse died under h2spec"


# --- TLS and protocol selection -------------------------------------------


@pytest.mark.parametrize("offer,expect", [
    (["h2", "http/1.1"], "h2"),
    (["http/1.1", "h2"], "h2"),  # the server's preference wins
    (["http/1.1"], "http/1.1"),
    (None, None),
    (["spdy/3.1"], None),  # nothing we speak: no ALPN, HTTP/1.1
])
def test_alpn_selects_protocol(mxsse_factory, upstream, offer, expect):
    m = mxsse_factory(upstream.url)
    with tls_connect(m.tls_port, offer) as sock:
        assert sock.selected_alpn_protocol() == expect
        if expect == "h2":
            h = H2(sock)
            h.request(1, LOCAL_404, scheme="https")
            assert h.response(1).status == 404
            assert h.settings.get(MAX_CONCURRENT_STREAMS) == 100
        else:
            sock.sendall(get(LOCAL_404))
            r = Http1(sock).response()
            assert r.version == "HTTP/1.1" and r.status == 404


def test_tls_versions(mxsse_factory, upstream):
    """TLS 1.1 gets a protocol_version alert; 1.2 and 1.3 are served."""
    m = mxsse_factory(upstream.url)
    old = tls_context(["http/1.1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let our side offer 1.1 at all
    with pytest.raises(ssl.SSLError) as err:
        tls_connect(m.tls_port, ctx=old).close()
    assert err.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", err.value
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        with tls_connect(m.tls_port, ctx=tls_context(["http/1.1"], version)) as sock:
            assert sock.version() == version.name.replace("v1_", "v1.")
            sock.sendall(get(LOCAL_404))
            assert Http1(sock).response().status == 404


def test_tls_session_resumption(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url)
    ctx = tls_context(["http/1.1"], ssl.TLSVersion.TLSv1_2)
    with tls_connect(m.tls_port, ctx=ctx) as first:
        session = first.session
        assert not first.session_reused
    with tls_connect(m.tls_port, ctx=ctx, session=session) as second:
        assert second.session_reused, "TLS session ticket not accepted"


def test_h2c_prior_knowledge(mxsse_factory, upstream):
    """The preface on the cleartext port selects HTTP/2; requests on it are
    answered locally and proxied, several streams on one connection."""
    m = mxsse_factory(upstream.url)
    with h2c(m.port) as h:
        assert h.settings.get(MAX_CONCURRENT_STREAMS) == 100
        h.request(1, LOCAL_404)
        h.request(3, PROXIED + "?x=1")
        h.request(5, PROXIED + "/echo", method="POST", body=b'{"a":1}')
        r1, r3, r5 = h.response(1), h.response(3), h.response(5)
        assert r1.status == 404 and json.loads(r1.body)["errcode"] == "M_UNRECOGNIZED"
        assert r3.status == 200 and json.loads(r3.body)["path"] == PROXIED + "?x=1"
        assert r5.status == 200 and json.loads(r5.body) == {
            "method": "POST", "path": PROXIED + "/echo", "body": '{"a":1}'}
    status, version, _, _ = curl(m.url + LOCAL_404)
    assert (status, version) == (404, "HTTP/2")


# --- HTTP/1.1 ------------------------------------------------------------


def test_h1_keep_alive(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url)
    with connect(m.port) as sock:
        conn = Http1(sock)
        sock.sendall(get(PROXIED + "?n=1"))
        first = conn.response()
        sock.sendall(get(LOCAL_404))
        second = conn.response()
    assert first.status == 200 and first.json()["path"] == PROXIED + "?n=1"
    assert first.header("connection") != "close"
    assert second.status == 404


def test_h1_pipelining_answers_in_order(mxsse_factory, upstream):
    """Two requests in one write: the slow one is answered first."""
    m = mxsse_factory(upstream.url)
    with connect(m.port) as sock:
        sock.sendall(get(PROXIED + "/slow?ms=400") + get(PROXIED + "/fast") + get(LOCAL_404))
        conn = Http1(sock)
        a, b, c = conn.response(), conn.response(), conn.response()
    assert a.json()["path"] == PROXIED + "/slow?ms=400"
    assert b.json()["path"] == PROXIED + "/fast"
    assert c.status == 404


def test_h1_connection_close(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url)
    with connect(m.port) as sock:
        sock.sendall(get(PROXIED, extra="Connection: close\r\n"))
        conn = Http1(sock)
        r = conn.response()
        assert r.status == 200 and r.header("connection") == "close"
        assert closed_within(sock, 3) is not None, "connection left open after Connection: close"


def test_h1_close_lingers_for_the_client(mxsse_factory, upstream):
    """After its last answer mxsse half-closes and reads (dropping) what the
    client still sends until the client closes too: closing with unread
    bytes would reset the connection, and a reset can destroy the answer
    still in flight. A drain while the socket lingers exits cleanly."""
    m = mxsse_factory(upstream.url)
    with connect(m.port) as sock:
        sock.sendall(get(PROXIED, extra="Connection: close\r\n"))
        assert Http1(sock).response().status == 200
        assert closed_within(sock, 3) is not None, "no FIN after Connection: close"
        # A closed socket would answer these with a reset, failing a send.
        for _ in range(3):
            sock.sendall(b"x" * 1000)
            time.sleep(0.2)
        m.check_clean_exit()  # SIGTERM while the socket lingers


@pytest.mark.parametrize("path", [LOCAL_404, PROXIED])
def test_h1_head(mxsse_factory, upstream, path):
    """HEAD: the GET's headers, no body (the pipelined GET after it parses)."""
    m = mxsse_factory(upstream.url)
    with connect(m.port) as sock:
        sock.sendall(get(path).replace(b"GET", b"HEAD", 1) + get(path))
        conn = Http1(sock)
        head = conn.response(head=True)
        full = conn.response()
    assert head.status == full.status
    assert head.header("content-type") == full.header("content-type")
    assert head.header("content-length") is not None or head.header("transfer-encoding") == "chunked"
    assert len(full.body) > 0
    if head.header("content-length") is not None and path == LOCAL_404:
        assert int(head.header("content-length")) == len(full.body)


def test_h1_chunked_request_body(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url)
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    raw = (f"POST {PROXIED}/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
           "Content-Type: application/json\r\n\r\n").encode() + body
    r = h1_request(m.port, raw)
    assert r.status == 200 and r.json()["body"] == "hello world" and r.json()["method"] == "POST"


def test_h1_expect_100_continue(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url)
    with connect(m.port) as sock:
        sock.sendall((f"PUT {PROXIED}/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n"
                      "Expect: 100-continue\r\n\r\n").encode())
        conn = Http1(sock)
        interim = conn.response(interim=True)  # before any body byte was sent
        assert interim.status == 100
        sock.sendall(b"hello world")
        r = conn.response()
    assert r.status == 200 and r.json()["body"] == "hello world"


def test_h1_0(mxsse_factory, upstream):
    """HTTP/1.0: answered as 1.0, no chunked framing, connection closed."""
    m = mxsse_factory(upstream.url)
    with connect(m.port) as sock:
        sock.sendall(get(LOCAL_404, version="1.0"))
        r = Http1(sock).response()
        assert (r.version, r.status) == ("HTTP/1.0", 404)
        assert closed_within(sock, 3) is not None, "HTTP/1.0 connection kept open"
    with connect(m.port) as sock:  # a body of unknown length ends at close
        sock.sendall(get(PROXIED + "/stream", version="1.0"))
        r = Http1(sock).response()
        assert (r.version, r.status) == ("HTTP/1.0", 200)
        assert r.header("transfer-encoding") is None and r.body == b"one,two,three"


def test_h1_request_target_limit(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url)
    ok = PROXIED + "/" + "a" * (8000 - len(PROXIED))
    assert h1_request(m.port, get(ok)).status == 200
    with connect(m.port) as sock:
        sock.sendall(get(PROXIED + "/" + "a" * 9000))
        is_matrix_error(Http1(sock).response(), 414)
        assert closed_within(sock, 3) is not None


@pytest.mark.parametrize("case", ["bytes", "count"])
def test_h1_header_limits(mxsse_factory, upstream, case):
    m = mxsse_factory(upstream.url)
    if case == "bytes":
        fine = "X-Big: " + "v" * 30000 + "\r\n"
        over = "X-Big: " + "v" * 33000 + "\r\n"
    else:  # Host plus 99 fields is 100 in all
        fine = "".join(f"X-H{i}: {i}\r\n" for i in range(99))
        over = "".join(f"X-H{i}: {i}\r\n" for i in range(100))
    assert h1_request(m.port, get(LOCAL_404, extra=fine)).status == 404
    with connect(m.port) as sock:
        sock.sendall(get(LOCAL_404, extra=over))
        is_matrix_error(Http1(sock).response(), 431)
        assert closed_within(sock, 3) is not None


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"GET /x HTTP/1.1\r\nHost x\r\n\r\n",
], ids=["bad-version", "two-content-lengths", "header-without-colon"])
def test_h1_malformed_gets_400_then_close(mxsse_factory, upstream, garbage):
    """A malformed HTTP/1.1 request gets a Matrix 400, then the close."""
    m = mxsse_factory(upstream.url)
    with connect(m.port) as sock:
        sock.sendall(garbage)
        is_matrix_error(Http1(sock).response(), 400)
        assert closed_within(sock, 3) is not None, "connection kept open after a parse error"
    assert m.proc.poll() is None


@pytest.mark.parametrize("garbage", [
    b"\x00\xff\xfe GARBAGE \x01\x02\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(64)),  # a TLS hello
    b"INVALID CONNECTION PREFACE\r\n\r\n",  # h2spec 3.5/2 on the h2c port
], ids=["binary", "tls-hello", "broken-h2-preface"])
def test_not_http_is_closed_without_answer(mxsse_factory, upstream, garbage):
    """Bytes that do not even start with a method are not HTTP/1.1 (a broken
    HTTP/2 preface on the cleartext port, a TLS hello on the wrong port):
    the connection is closed without an HTTP/1.1 answer."""
    m = mxsse_factory(upstream.url)
    with connect(m.port) as sock:
        sock.sendall(garbage)
        sock.settimeout(3)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, OSError):
            pass
        assert answer == b"", f"expected a close without any answer, got {answer[:80]!r}"
    assert m.proc.poll() is None


DOT_PATHS = ["/_matrix/../x", "/_matrix/client/%2e%2e/x", "/_matrix/client/%2E%2e/v3",
             "/_matrix/client/./v3/x", "/_matrix/client/v3/x/..", "/_matrix/client/.%2e/x"]


@pytest.mark.parametrize("path", DOT_PATHS)
def test_dot_segments_rejected(mxsse_factory, upstream, path):
    m = mxsse_factory(upstream.url)
    is_matrix_error(h1_request(m.port, get(path)), 400)
    with h2c(m.port) as h:
        h.request(1, path)
        assert h.response(1).status == 400
    assert upstream.count("/x") == 0 and upstream.count("/v3") == 0
    # Not dot segments: dots inside a segment are fine.
    assert h1_request(m.port, get(PROXIED + "/a..b/.c")).status == 200


def test_unknown_path_404(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url)
    for path in (LOCAL_404, "/_matrixx/client", "/", "/.well-known/other"):
        is_matrix_error(h1_request(m.port, get(path)), 404, "M_UNRECOGNIZED")
        is_matrix_error(h1_request(m.tls_port, get(path), tls=True), 404, "M_UNRECOGNIZED")
    for port, opener in ((m.port, h2c), (m.tls_port, h2_tls)):
        with opener(port) as h:
            h.request(1, LOCAL_404, scheme="https" if port == m.tls_port else "http")
            st = h.response(1)
            assert st.status == 404 and json.loads(st.body)["errcode"] == "M_UNRECOGNIZED"
    assert upstream.count("") == 0, "unknown paths must not reach the homeserver"


# --- timeouts --------------------------------------------------------------


def test_header_timeout(mxsse_factory, upstream):
    """A partial request head, or nothing at all, is dropped after
    --header-timeout."""
    m = mxsse_factory(upstream.url, "--header-timeout", "1")
    with connect(m.port) as partial, connect(m.port) as silent:
        partial.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n")
        t = closed_within(partial, 4)
        assert t is not None and 0.7 <= t <= 2.5, f"partial head closed after {t}s"
        t = closed_within(silent, 2)
        assert t is not None, "silent connection still open"


def test_header_timeout_counts_from_first_byte(mxsse_factory, upstream):
    """Slowloris: a head trickled a byte at a time still has to be complete
    within --header-timeout of its first byte."""
    m = mxsse_factory(upstream.url, "--header-timeout", "2")
    head = b"GET /x HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    with connect(m.port) as sock:
        start = time.monotonic()
        closed = None
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = time.monotonic() - start
                break
            if closed_within(sock, 0.3) is not None:
                closed = time.monotonic() - start
                break
            if time.monotonic() - start > 7:
                break
    assert closed is not None, "trickled request head kept the connection open past --header-timeout"
    assert closed <= 3.5, f"closed only after {closed:.1f}s (header timeout 2s)"


def test_idle_timeout_h1(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url, "--idle-timeout", "2")
    with connect(m.port) as sock:
        sock.sendall(get(LOCAL_404))
        assert Http1(sock).response().status == 404
        t = closed_within(sock, 6)
        assert t is not None and 1.5 <= t <= 4, f"idle keep-alive connection closed after {t}s"


def test_idle_timeout_h2_goaway(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url, "--idle-timeout", "2")
    with h2c(m.port) as h:
        h.request(1, LOCAL_404)
        assert h.response(1).status == 404
        start = time.monotonic()
        assert h.wait(lambda: h.goaways, 6), "no GOAWAY on an idle HTTP/2 connection"
        last, code, at = h.goaways[0]
        assert code == NO_ERROR and last == 1
        assert 1.5 <= at - start <= 4, f"GOAWAY after {at - start:.1f}s"
        assert h.wait_eof(3), "connection left open after the idle GOAWAY"


def client_hello() -> bytes:
    ctx = tls_context(["h2"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_tls_handshake_timeout(mxsse_factory, upstream):
    """Nothing, or a ClientHello trickled in, is dropped after
    --handshake-timeout from the connect."""
    m = mxsse_factory(upstream.url, "--handshake-timeout", "1")
    with connect(m.tls_port) as silent:
        t = closed_within(silent, 4)
        assert t is not None and 0.7 <= t <= 2.5, f"silent TLS connection closed after {t}s"
    hello = client_hello()
    with connect(m.tls_port) as sock:
        start, closed = time.monotonic(), None
        for byte in hello:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = time.monotonic() - start
                break
            if closed_within(sock, 0.2) is not None:
                closed = time.monotonic() - start
                break
        assert closed is not None and closed <= 2.5, f"slow handshake still open after {closed}s"
    assert m.metrics()["mxsse_tls_handshake_failures_total"] >= 2


# --- connection and stream limits -----------------------------------------


def held(port: int, n: int) -> list[socket.socket]:
    """n keep-alive connections that were each served once (so counted)."""
    socks = []
    for _ in range(n):
        s = connect(port)
        s.sendall(get(LOCAL_404))
        assert Http1(s).response().status == 404
        socks.append(s)
    return socks


def assert_rejected_h1(port: int, status: int, errcode: str, tls: bool = False) -> None:
    sock = tls_connect(port, ["http/1.1"]) if tls else connect(port)
    with sock:
        sock.sendall(get(LOCAL_404))
        r = Http1(sock).response()
        is_matrix_error(r, status, errcode)
        assert r.header("retry-after") and int(r.header("retry-after")) > 0
        assert closed_within(sock, 3) is not None, "rejected connection kept open"


def test_per_ip_connection_limit(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url, "--max-connections-per-ip", "2")
    time.sleep(0.3)  # the readiness probe's connection is gone
    socks = held(m.port, 2)
    try:
        assert_rejected_h1(m.port, 429, "M_LIMIT_EXCEEDED")
        assert_rejected_h1(m.tls_port, 429, "M_LIMIT_EXCEEDED", tls=True)
        for url, mode in ((m.url, "2-prior-knowledge"), (m.tls_url, "2")):
            status, version, headers, body = curl(url + LOCAL_404, http=mode)
            assert (status, version) == (429, "HTTP/2"), (status, version, body)
            assert json.loads(body)["errcode"] == "M_LIMIT_EXCEEDED" and int(headers["retry-after"]) > 0
        with h2c(m.port) as h:  # and the connection ends after the answer
            h.request(1, LOCAL_404)
            assert h.response(1).status == 429
            assert h.wait_eof(3), "rejected HTTP/2 connection kept open"
        # The served connections were not disturbed.
        socks[0].sendall(get(LOCAL_404))
        assert Http1(socks[0]).response().status == 404
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3)
    assert h1_request(m.port, get(LOCAL_404)).status == 404, "the count did not go down on close"
    assert m.metrics()["mxsse_connections_rejected_total"] >= 5


def test_global_connection_limit(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url, "--max-connections", "2")
    time.sleep(0.3)
    socks = held(m.port, 2)
    try:
        assert_rejected_h1(m.port, 503, None)
        status, version, headers, body = curl(m.url + LOCAL_404)
        assert status == 503 and json.loads(body)["errcode"].startswith("M_") and headers.get("retry-after")
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3)
    assert h1_request(m.port, get(LOCAL_404)).status == 404


def test_far_over_the_limit_closed_without_answer(mxsse_factory, upstream):
    """Past the limit plus a margin of 64 connections nothing is answered:
    the connection is closed at accept."""
    m = mxsse_factory(upstream.url, "--max-connections-per-ip", "1")
    time.sleep(0.3)
    socks = [connect(m.port) for _ in range(70)]
    try:
        time.sleep(0.5)
        socks[-1].sendall(get(LOCAL_404))
        assert closed_within(socks[-1], 3) is not None
        socks[10].sendall(get(LOCAL_404))
        assert Http1(socks[10]).response().status == 429
    finally:
        for s in socks:
            s.close()
    assert m.proc.poll() is None


def test_admin_connections_do_not_count_toward_client_limits(mxsse_factory, upstream):
    """The admin listener is exempt from the limits; open admin connections
    (a metrics scraper) must not use up the clients' budget either."""
    m = mxsse_factory(upstream.url, "--max-connections", "2", "--max-connections-per-ip", "2")
    time.sleep(0.3)
    admin = held(m.admin_port, 2)
    try:
        r = h1_request(m.port, get(LOCAL_404))
        assert r.status == 404, f"client refused with {r.status} because of admin connections"
    finally:
        for s in admin:
            s.close()


def test_max_concurrent_streams(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url, "--max-concurrent-streams", "5")
    p = subprocess.run(["nghttp", "-nv", m.url + LOCAL_404], capture_output=True, timeout=20)
    out = p.stdout.decode()
    recv = out[out.find("recv SETTINGS"):]
    assert "[SETTINGS_MAX_CONCURRENT_STREAMS(0x03):5]" in recv.split("recv SETTINGS")[1][:400], out
    with h2c(m.port) as h:
        assert h.settings[MAX_CONCURRENT_STREAMS] == 5
        for sid in (1, 3, 5, 7, 9):
            h.request(sid, PROXIED + f"/slow?ms=1500&s={sid}")
        deadline = time.monotonic() + 5
        while upstream.count("/slow") < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert upstream.count("/slow") == 5
        h.request(11, PROXIED + "/slow?ms=1500&s=11")
        refused = h.wait(lambda: (11 in h.streams and h.streams[11].reset is not None)
                         or any(last < 11 for last, _, _ in h.goaways), 3)
        assert refused, f"stream 11 over the limit was not refused: {h.streams.get(11)} {h.goaways}"
        if h.goaways:  # a connection error is allowed too
            assert h.goaways[0][1] == PROTOCOL_ERROR
        else:
            assert h.streams[11].reset in (REFUSED_STREAM, PROTOCOL_ERROR)
        time.sleep(0.3)
        assert "s=11" not in " ".join(p for _, p in upstream.seen), "the 6th stream reached upstream"
        if not h.goaways:
            assert all(h.response(sid, 5).status == 200 for sid in (1, 3, 5, 7, 9))


# --- floods ------------------------------------------------------------------


class Prober(threading.Thread):
    """Another client asking for a page every 50 ms while a flood runs."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.stop, self.latencies, self.errors = port, threading.Event(), [], []

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                r = h1_request(self.port, get(LOCAL_404))
                assert r.status == 404
                self.latencies.append(time.monotonic() - start)
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(e))
            time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        self.join(15)
        assert not self.errors, f"other clients failed during the flood: {self.errors[:3]}"
        assert self.latencies and max(self.latencies) < 2, f"other clients stalled: {max(self.latencies):.2f}s"


def drain_in_background(h: H2) -> threading.Thread:
    """Reads frames until EOF so the server's writes never block ours."""

    def run() -> None:
        while not h.eof:
            try:
                h.read_frame(30)
            except (socket.timeout, OSError):
                return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_rapid_reset_flood(mxsse_factory, upstream):
    """HEADERS + RST_STREAM pairs far beyond the reset rate (CVE-2023-44487):
    GOAWAY, the connection ends, everyone else is served, memory bounded."""
    m = mxsse_factory(upstream.url)
    rss_before = m.rss_kb()
    prober = Prober(m.port)
    prober.start()
    pairs = 4000
    for rnd in range(2):
        with h2c(m.port) as h:
            reader = drain_in_background(h)
            batch = b""
            try:
                for i in range(pairs):
                    sid = 1 + 2 * i
                    batch += frame(HEADERS, END_HEADERS | END_STREAM, sid, request_block(PROXIED + "/rr"))
                    batch += frame(RST_STREAM, 0, sid, struct.pack(">I", CANCEL))
                    if len(batch) > 32768:
                        h.send(batch)
                        batch = b""
                h.send(batch)
            except OSError:
                pass  # closed on us mid-flood: fine
            reader.join(10)
            assert h.goaways, f"round {rnd}: no GOAWAY after {pairs} reset streams"
            last, code, _ = h.goaways[0]
            assert code != NO_ERROR and last < 2 * pairs - 1, h.goaways[0]
            assert h.eof, "flooding connection still open"
    prober.finish()
    assert m.proc.poll() is None
    assert h1_request(m.port, get(LOCAL_404)).status == 404
    grown = m.rss_kb() - rss_before
    assert grown < 64 * 1024, f"RSS grew by {grown} KiB during the flood"


def test_continuation_flood(mxsse_factory, upstream):
    """A header block that never ends (CVE-2024-27316): the connection is
    closed after a few CONTINUATION frames, nothing is buffered."""
    m = mxsse_factory(upstream.url)
    rss_before = m.rss_kb()
    prober = Prober(m.port)
    prober.start()
    for _ in range(3):
        with h2c(m.port) as h:
            reader = drain_in_background(h)
            field_ = b"\x00" + hpack_str(b"x-flood") + hpack_str(b"y" * 100)
            try:
                h.send(frame(HEADERS, 0, 1, request_block(PROXIED + "/cf")))
                for _ in range(200):
                    h.send(frame(CONTINUATION, 0, 1, field_ * 100))
            except OSError:
                pass
            reader.join(5)
            assert h.eof, "CONTINUATION flood did not end the connection"
            assert 1 not in h.streams, "a request was answered from an unfinished header block"
    prober.finish()
    assert upstream.count("/cf") == 0
    assert m.proc.poll() is None
    grown = m.rss_kb() - rss_before
    assert grown < 32 * 1024, f"RSS grew by {grown} KiB during the flood"


def server_closed(sock: socket.socket, server: int, timeout: float) -> float | None:
    """Seconds until the server closed this connection, judged from the
    kernel's TCP states (/proc/net/tcp) so that nothing has to be read: a
    server that closes with bytes still queued for a client that does not
    read sends its FIN only after them. None when still open."""
    local = sock.getsockname()[1]
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        ours = theirs = None
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                lport, rport = int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)
                if (lport, rport) == (local, server):
                    ours = f[3]
                elif (lport, rport) == (server, local):
                    theirs = f[3]
        # 01 ESTABLISHED; ours 07/08: CLOSE (reset), CLOSE_WAIT (FIN seen)
        if ours in (None, "07", "08") or theirs != "01":
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def test_write_timeout(mxsse_factory, upstream):
    """A client that stops reading a large response is dropped after
    --write-timeout."""
    m = mxsse_factory(upstream.url, "--write-timeout", "2")
    with connect(m.port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(get(PROXIED + "/big?kb=262144"))
        t = server_closed(sock, m.port, 8)
    assert t is not None, "a client that reads nothing was kept past --write-timeout"
    assert t >= 1.5, f"closed after {t:.1f}s, before the write timeout"
    assert m.proc.poll() is None


def test_ack_floods(mxsse_factory, upstream):
    """PING or SETTINGS frames (each demanding an ACK) from a client that
    reads nothing: the connection is ended and memory stays bounded."""
    m = mxsse_factory(upstream.url, "--write-timeout", "2")
    rss_before = m.rss_kb()
    for flood in (frame(PING, 0, 0, b"12345678"), frame(SETTINGS, 0, 0)):
        with connect(m.port) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(1)
            sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
            try:
                for _ in range(400):
                    sock.sendall(flood * 1000)
            except OSError:
                pass  # closed, or the server stopped reading
            assert server_closed(sock, m.port, 8) is not None, "ACK flood did not end the connection"
    assert m.proc.poll() is None
    assert h1_request(m.port, get(LOCAL_404)).status == 404
    assert m.rss_kb() - rss_before < 32 * 1024


# --- signals: certificate reload, graceful shutdown -------------------------


def make_cert(d: Path, cn: str) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-keyout", str(key), "-out", str(cert), "-days", "30", "-nodes", "-subj", f"/CN={cn}",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True)
    return cert, key


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def served_cert(port: int) -> bytes:
    with tls_connect(port, ["h2", "http/1.1"]) as sock:
        return sock.getpeercert(binary_form=True)


def wait_log(m, needle: str, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in m.read_log().splitlines():
            if needle in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no '{needle}' in the log:\n{m.read_log()[-2000:]}")


@pytest.fixture
def live_cert(tmp_path: Path):
    """(cert, key) files mxsse reads, first holding certificate A; plus
    A and B to copy over them."""
    a = make_cert(tmp_path / "a", "first.example")
    b = make_cert(tmp_path / "b", "second.example")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    shutil.copy(a[0], cert)
    shutil.copy(a[1], key)
    return (cert, key), a, b


def test_sighup_reloads_certificate(mxsse_factory, upstream, live_cert):
    (cert, key), a, b = live_cert
    m = mxsse_factory(upstream.url, "--cert", str(cert), "--key", str(key))
    assert served_cert(m.tls_port) == der(a[0])
    tls12 = tls_context(["http/1.1"], ssl.TLSVersion.TLSv1_2)
    with tls_connect(m.tls_port, ctx=tls12) as sock:
        session = sock.session
    with h2_tls(m.tls_port) as h:
        h.request(1, LOCAL_404, scheme="https")
        assert h.response(1).status == 404
        shutil.copy(b[0], cert)
        shutil.copy(b[1], key)
        m.proc.send_signal(signal.SIGHUP)
        wait_log(m, "tls.reloaded")
        assert served_cert(m.tls_port) == der(b[0]), "new connections still get the old certificate"
        # The connection opened before the reload goes on.
        h.request(3, PROXIED, scheme="https")
        h.request(5, LOCAL_404, scheme="https")
        assert h.response(3).status == 200 and h.response(5).status == 404
    # Session tickets issued before the reload are still accepted.
    with tls_connect(m.tls_port, ctx=tls12, session=session) as sock:
        assert sock.session_reused, "reload lost the session ticket keys"


@pytest.mark.parametrize("breakage", ["garbage-cert", "missing-key", "mismatched-key"])
def test_sighup_with_broken_certificate_keeps_the_old_one(mxsse_factory, upstream, live_cert, breakage):
    (cert, key), a, b = live_cert
    m = mxsse_factory(upstream.url, "--cert", str(cert), "--key", str(key))
    if breakage == "garbage-cert":
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    elif breakage == "missing-key":
        key.unlink()
    else:
        shutil.copy(b[0], cert)  # B's certificate, A's key
    m.proc.send_signal(signal.SIGHUP)
    line = wait_log(m, "tls.reload_failed")
    assert "level=error" in line, line
    assert m.proc.poll() is None
    assert served_cert(m.tls_port) == der(a[0])
    assert h1_request(m.tls_port, get(LOCAL_404), tls=True).status == 404


def readyz(m) -> int | None:
    """Status of /readyz, None when the admin listener does not answer."""
    try:
        with urllib.request.urlopen(m.admin_url + "/readyz", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def test_sigterm_with_idle_connections_exits_at_once(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url)
    socks = held(m.port, 3)
    tls = tls_connect(m.tls_port, ["http/1.1"])
    tls.sendall(get(LOCAL_404))
    assert Http1(tls).response().status == 404
    socks.append(tls)
    start = time.monotonic()
    code = m.stop(signal.SIGTERM)
    took = time.monotonic() - start
    assert code == 0 and took < 1.0, f"exit {code} after {took:.2f}s with idle connections"
    for s in socks:
        assert closed_within(s, 1) is not None
        s.close()
    m.check_clean_exit()


def test_sigterm_h2_goaway_notice_then_final(mxsse_factory, upstream):
    """GOAWAY(2^31-1) first, a request racing it is still served, then the
    final GOAWAY about a second later names it, and the process exits 0."""
    m = mxsse_factory(upstream.url)
    with h2c(m.port) as h:
        h.request(1, LOCAL_404)
        assert h.response(1).status == 404
        m.proc.send_signal(signal.SIGTERM)
        assert h.wait(lambda: h.goaways, 3), "no GOAWAY notice"
        last, code, notice_at = h.goaways[0]
        assert (last, code) == (2**31 - 1, NO_ERROR)
        h.request(3, PROXIED)
        assert h.response(3).status == 200, "request sent after the notice was not served"
        assert h.wait(lambda: len(h.goaways) >= 2, 3), "no final GOAWAY"
        last, code, final_at = h.goaways[1]
        assert (last, code) == (3, NO_ERROR)
        assert 0.7 <= final_at - notice_at <= 2.0, f"final GOAWAY {final_at - notice_at:.2f}s after the notice"
        assert h.wait_eof(3)
    m.proc.wait(5)
    m.check_clean_exit()


def test_sigterm_lets_in_flight_requests_finish(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url, "--shutdown-grace", "10")
    assert readyz(m) == 200
    s1 = connect(m.port)
    s1.sendall(get(PROXIED + "/slow?ms=2000&via=h1"))
    h = h2c(m.port)
    h.request(1, PROXIED + "/slow?ms=2000&via=h2")
    deadline = time.monotonic() + 5
    while upstream.count("/slow") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    start = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert readyz(m) in (503, None), "still ready while draining"
    with s1, h:
        r = Http1(s1).response()
        assert r.status == 200 and r.json()["path"].endswith("via=h1")
        assert r.header("connection") == "close"
        st = h.response(1, 5)
        assert st.status == 200 and json.loads(st.body)["path"].endswith("via=h2")
        assert closed_within(s1, 3) is not None and h.wait_eof(3)
    code = m.proc.wait(10)
    took = time.monotonic() - start
    assert code == 0 and 1.5 <= took < 10, f"exit {code} after {took:.1f}s"
    m.check_clean_exit()


def test_sigterm_grace_period_ends_stragglers(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url, "--shutdown-grace", "1")
    with connect(m.port) as sock:
        sock.sendall(get(PROXIED + "/slow?ms=6000"))
        time.sleep(0.3)
        start = time.monotonic()
        m.proc.send_signal(signal.SIGTERM)
        code = m.proc.wait(5)
        took = time.monotonic() - start
        assert code == 0 and took < 2.5, f"exit {code} after {took:.1f}s with --shutdown-grace 1"
        with pytest.raises((EOFError, ConnectionResetError)):
            Http1(sock).response()
    m.check_clean_exit()


# --- metrics --------------------------------------------------------------------


def test_metrics_move(mxsse_factory, upstream):
    m = mxsse_factory(upstream.url)
    before = m.metrics()
    sent = 0
    with connect(m.port) as s:
        raw = get(LOCAL_404) + get(PROXIED)
        s.sendall(raw)
        sent += len(raw)
        conn = Http1(s)
        assert conn.response().status == 404 and conn.response().status == 200
    with h2c(m.port) as h:
        h.request(1, LOCAL_404)
        h.request(3, PROXIED)
        assert h.response(1).status == 404 and h.response(3).status == 200
        during = m.metrics()
    with h2_tls(m.tls_port) as h:
        h.request(1, PROXIED + "/slow?ms=60", scheme="https")
        assert h.response(1).status == 200
    after = m.metrics()

    def d(key: str) -> float:
        assert key in after, f"{key} missing from /metrics"
        return after[key] - before.get(key, 0)

    assert d('mxsse_connections_accepted_total{protocol="http/1.1"}') >= 1
    assert d('mxsse_connections_accepted_total{protocol="h2"}') >= 2
    assert during['mxsse_connections_open{protocol="h2"}'] >= 1
    deadline = time.monotonic() + 3  # both HTTP/2 connections are closed now
    while m.metrics()['mxsse_connections_open{protocol="h2"}'] != before['mxsse_connections_open{protocol="h2"}']:
        assert time.monotonic() < deadline, "mxsse_connections_open{protocol=\"h2\"} did not go back down"
        time.sleep(0.1)
    assert d('mxsse_requests_total{protocol="http/1.1"}') >= 2
    assert d('mxsse_requests_total{protocol="h2"}') >= 3
    assert d('mxsse_responses_total{code="4xx"}') >= 2
    assert d('mxsse_responses_total{code="2xx"}') >= 3
    assert d("mxsse_upstream_requests_total") >= 3
    assert d("mxsse_upstream_latency_seconds_count") >= 3
    assert d('mxsse_upstream_latency_seconds_bucket{le="+Inf"}') >= 3
    assert d('mxsse_upstream_latency_seconds_bucket{le="0.05"}') <= d('mxsse_upstream_latency_seconds_bucket{le="+Inf"}') - 1, \
        "the 60 ms request fell in the <= 50 ms bucket"
    assert d("mxsse_upstream_latency_seconds_sum") >= 0.06
    assert d("mxsse_bytes_received_total") >= sent
    assert d("mxsse_bytes_sent_total") >= 200
