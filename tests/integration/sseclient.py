"""A small Server-Sent Events client for the integration tests (stdlib only).

Parsing follows the WHATWG HTML "event stream interpretation" rules: UTF-8
with an optional leading BOM; lines end with CRLF, LF or CR (also when a CR
and its LF arrive in different reads); `:` starts a comment; fields `id`,
`event`, `data` (several lines joined with LF) and `retry` (ASCII digits
only); an `id` value containing NUL is ignored; a blank line dispatches the
event, and a block without data dispatches nothing (its `id` still sets the
last event ID). An unterminated block at the end of the stream is dropped.

Transports, all delivering into the same `SSEStream`:

    s = open_h1(url, headers={...})             # HTTP/1.1, http:// or https://
    h2 = H2Connection(base_url, cafile=cert)    # HTTP/2: h2c prior knowledge
    s = h2.open("GET", path, headers={...})     # for http://, ALPN h2 for https://
    r = h2.open("GET", "/_matrix/client/versions").wait_end(10)  # same connection
    s = CurlSSE(url, mode="h2c").start()        # curl -N as a real client

    ev = s.next_event(timeout=10)               # Event(id, event, data, ...)
    s.wait_event(lambda e: "$x" in e.data, 10)
    s.comments, s.retries, s.events             # with arrival times
    s.wait_end(10); s.ended_cleanly             # chunked "0" / END_STREAM / curl rc 0

Every item carries `t`, the time.monotonic() at which the read that
completed it returned, so tests can measure heartbeat spacing and
latencies. HTTP/2 header blocks are decoded with libnghttp2's HPACK
inflater through ctypes (HPACK needs Huffman and dynamic-table state; the
library is the one curl already uses); request headers are sent as plain
literals, which every decoder accepts.

One module on purpose: the parser and the three transports feeding it
share the event type and the reconnect logic.
"""

from __future__ import annotations

import codecs
import ctypes
import ctypes.util
import json
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from httpclients import hpack_literal

Headers = Mapping[str, str] | Iterable[tuple[str, str]]


def _header_items(headers: Headers | None) -> list[tuple[str, str]]:
    if not headers:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


# --------------------------------------------------------------------------
# The parser


@dataclass
class Event:
    """A dispatched event. `id` is the value of an `id:` field inside this
    block (None when the block had none); `last_event_id` is what
    EventSource reports (the last id seen so far on the stream)."""

    data: str
    event: str = "message"
    id: str | None = None
    last_event_id: str = ""
    t: float = 0.0

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Comment:
    text: str  # what follows the colon, unchanged (": " -> " ")
    t: float = 0.0


@dataclass
class Retry:
    ms: int
    t: float = 0.0


Item = Event | Comment | Retry


class SSEParser:
    """Incremental event stream parser: feed() bytes as they arrive, get the
    completed items back."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False   # BOM check done
        self._line = ""         # incomplete line
        self._skip_lf = False   # last read ended with CR: drop a leading LF
        self._data: list[str] = []
        self._has_data = False
        self._event = ""
        self._block_id: str | None = None
        self.last_event_id = ""  # the "last event ID buffer"
        self.reconnection_time: int | None = None

    def feed(self, chunk: bytes, t: float | None = None) -> list[Item]:
        now = time.monotonic() if t is None else t
        text = self._decoder.decode(chunk)
        return self._feed_text(text, now)

    def _feed_text(self, text: str, now: float) -> list[Item]:
        out: list[Item] = []
        if not text:
            return out
        if not self._started:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._skip_lf:
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        buf = self._line + text
        pos, n = 0, len(buf)
        while pos < n:
            cr, lf = buf.find("\r", pos), buf.find("\n", pos)
            if cr < 0 and lf < 0:
                break
            end = lf if cr < 0 else cr if lf < 0 else min(cr, lf)
            line = buf[pos:end]
            if buf[end] == "\r":
                if end + 1 < n:
                    if buf[end + 1] == "\n":
                        end += 1
                else:
                    self._skip_lf = True  # its LF may come in the next read
            pos = end + 1
            self._line_done(line, now, out)
        self._line = buf[pos:]
        return out

    def finish(self) -> None:
        """End of stream: an incomplete line and block are discarded."""
        self._decoder.decode(b"", final=True)
        self._line = ""
        self._reset_block()

    def _reset_block(self) -> None:
        self._data = []
        self._has_data = False
        self._event = ""
        self._block_id = None

    def _line_done(self, line: str, now: float, out: list[Item]) -> None:
        if line == "":
            if self._has_data:
                data = "\n".join(self._data)
                out.append(Event(data=data, event=self._event or "message",
                                 id=self._block_id, last_event_id=self.last_event_id, t=now))
            self._reset_block()
            return
        if line.startswith(":"):
            out.append(Comment(line[1:], now))
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
                self._block_id = value
        elif name == "retry":
            if value and all("0" <= c <= "9" for c in value):
                self.reconnection_time = int(value)
                out.append(Retry(int(value), now))
        # any other field is ignored


def parse_all(body: bytes) -> list[Item]:
    """Every item of a complete event stream body."""
    p = SSEParser()
    items = p.feed(body, 0.0)
    p.finish()
    return items


# --------------------------------------------------------------------------
# A response as it arrives


class SSEStream:
    """One response, filled by a transport's reader thread.

    status/headers arrive first (wait_headers); the body is kept raw in
    `body` and parsed into `items` as it comes. The stream ends either
    cleanly (`ended_cleanly`: HTTP/1.1 terminating chunk or complete
    Content-Length, HTTP/2 END_STREAM, curl exit status 0) or with `error`
    set (reset, connection lost, truncated)."""

    def __init__(self, description: str = ""):
        self.description = description
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.http_version = ""
        self.body = bytearray()
        self.items: list[Item] = []
        self.parser = SSEParser()
        self.t_open = time.monotonic()
        self.t_headers: float | None = None
        self.t_end: float | None = None
        self.done = False
        self.ended_cleanly = False
        self.error: str | None = None
        self.info: dict[str, Any] = {}  # transport details (end frame, ...)
        # Content-Encoding: gzip is decoded as it arrives (body stays the
        # wire bytes, decoded gets what they decode to).
        self.decoded = bytearray()
        self.inflater: Any = None
        self._cursor = 0                # next event index for next_event()
        self._cond = threading.Condition()
        self._closer: Callable[[], None] | None = None

    # -- fed by transports

    def _set_head(self, status: int, headers: list[tuple[str, str]], version: str) -> None:
        with self._cond:
            self.status, self.headers, self.http_version = status, headers, version
            self.t_headers = time.monotonic()
            self._cond.notify_all()

    def _feed(self, data: bytes, t: float | None = None) -> None:
        t = time.monotonic() if t is None else t
        with self._cond:
            self.body += data
            if self.is_event_stream():
                if (self.header("content-encoding") or "").lower() == "gzip":
                    if self.inflater is None:
                        self.inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    data = self.inflater.decompress(data)
                    self.decoded += data
                self.items.extend(self.parser.feed(data, t))
            self._cond.notify_all()

    def _finish(self, clean: bool, error: str | None = None) -> None:
        with self._cond:
            if self.done:
                return
            self.done = True
            self.ended_cleanly = clean
            self.error = error
            self.t_end = time.monotonic()
            self.parser.finish()
            self._cond.notify_all()

    # -- for tests

    def header(self, name: str) -> str | None:
        name = name.lower()
        found = None
        for k, v in self.headers:
            if k == name:
                found = v
        return found

    def is_event_stream(self) -> bool:
        ct = self.header("content-type") or ""
        return self.status == 200 and ct.split(";")[0].strip().lower() == "text/event-stream"

    def json(self) -> Any:
        return json.loads(bytes(self.body))

    @property
    def events(self) -> list[Event]:
        with self._cond:
            return [i for i in self.items if isinstance(i, Event)]

    @property
    def comments(self) -> list[Comment]:
        with self._cond:
            return [i for i in self.items if isinstance(i, Comment)]

    @property
    def retries(self) -> list[Retry]:
        with self._cond:
            return [i for i in self.items if isinstance(i, Retry)]

    def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        """Waits until pred() (evaluated under the lock) or the timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_headers(self, timeout: float = 15) -> "SSEStream":
        if not self.wait(lambda: self.status != 0 or self.done, timeout):
            raise TimeoutError(f"{self.description}: no response head within {timeout}s")
        return self

    def wait_end(self, timeout: float = 15) -> "SSEStream":
        if not self.wait(lambda: self.done, timeout):
            raise TimeoutError(f"{self.description}: response not finished within {timeout}s "
                               f"(status {self.status}, {len(self.body)} body bytes)")
        return self

    def next_event(self, timeout: float = 15) -> Event:
        """The next event not yet returned by next_event()/wait_event()."""
        return self.wait_event(lambda e: True, timeout)

    def wait_event(self, pred: Callable[[Event], bool], timeout: float = 15) -> Event:
        """The first event after the cursor satisfying pred; the cursor moves
        past it (events skipped on the way stay in `events`)."""
        found: list[Event] = []

        def check() -> bool:
            evs = [i for i in self.items if isinstance(i, Event)]
            for k in range(self._cursor, len(evs)):
                if pred(evs[k]):
                    self._cursor = k + 1
                    found.append(evs[k])
                    return True
            return self.done

        self.wait(check, timeout)
        if found:
            return found[0]
        if self.done:
            raise EOFError(f"{self.description}: stream ended without the event "
                           f"(clean={self.ended_cleanly}, error={self.error}, "
                           f"status={self.status}, headers={self.headers}, "
                           f"body={bytes(self.body[-300:])!r})")
        raise TimeoutError(f"{self.description}: no matching event within {timeout}s "
                           f"({len(self.events)} events so far)")

    def close(self) -> None:
        """Abandons the response (closes the connection / resets the stream)."""
        if self._closer:
            self._closer()

    def describe(self) -> str:
        return (f"{self.description}: status={self.status} done={self.done} "
                f"clean={self.ended_cleanly} error={self.error} "
                f"headers={self.headers} body[-300:]={bytes(self.body[-300:])!r}")


# --------------------------------------------------------------------------
# HTTP/1.1


def _split_url(url: str) -> tuple[str, str, int, str]:
    u = urllib.parse.urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    target = u.path or "/"
    if u.query:
        target += "?" + u.query
    return u.scheme, u.hostname or "127.0.0.1", port, target


def _tls_context(cafile: str | None, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    if not cafile:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    return ctx


class _ChunkedDecoder:
    """Incremental chunked transfer decoding; `complete` after the last
    chunk and its trailer section."""

    def __init__(self) -> None:
        self._buf = b""
        self._left = 0
        self._state = "size"  # size | data | data_end | trailer | done
        self.complete = False

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while True:
            if self._state == "size":
                i = self._buf.find(b"\r\n")
                if i < 0:
                    break
                line = self._buf[:i].split(b";", 1)[0].strip()
                self._buf = self._buf[i + 2:]
                size = int(line, 16)
                self._left = size
                self._state = "data" if size else "trailer"
            elif self._state == "data":
                take = self._buf[:self._left]
                if not take:
                    break
                out += take
                self._buf = self._buf[len(take):]
                self._left -= len(take)
                if self._left == 0:
                    self._state = "data_end"
            elif self._state == "data_end":
                if len(self._buf) < 2:
                    break
                if self._buf[:2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                self._buf = self._buf[2:]
                self._state = "size"
            elif self._state == "trailer":
                i = self._buf.find(b"\r\n")
                if i < 0:
                    break
                line = self._buf[:i]
                self._buf = self._buf[i + 2:]
                if not line:
                    self._state = "done"
                    self.complete = True
            else:
                break
        return bytes(out)


def open_h1(url: str, *, method: str = "GET", headers: Headers | None = None,
            body: bytes | None = None, cafile: str | None = None,
            timeout: float = 10, accept_sse: bool = True) -> SSEStream:
    """Sends one HTTP/1.1 request on a new connection (TLS with ALPN
    http/1.1 for https://) and returns the response as it streams in."""
    scheme, host, port, target = _split_url(url)
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if scheme == "https":
        ctx = _tls_context(cafile, ["http/1.1"])
        sock = ctx.wrap_socket(sock, server_hostname=host)
    stream = SSEStream(f"HTTP/1.1 {method} {target[:80]}")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}"]
    names = {k.lower() for k, _ in _header_items(headers)}
    if accept_sse and "accept" not in names:
        lines.append("Accept: text/event-stream")
    for k, v in _header_items(headers):
        lines.append(f"{k}: {v}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    sock.sendall(raw)
    stream.info["tls_version"] = sock.version() if isinstance(sock, ssl.SSLSocket) else None

    closed = threading.Event()
    reader_thread: list[threading.Thread] = []

    def closer() -> None:
        closed.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        # As in H2Connection.close: no reader left on a descriptor number
        # that a new socket may take.
        if reader_thread and reader_thread[0] is not threading.current_thread():
            reader_thread[0].join(5)
        sock.close()

    stream._closer = closer
    head_only = method == "HEAD"

    def reader() -> None:
        buf = b""
        try:
            sock.settimeout(None)
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    stream._finish(False, "connection closed before the response head")
                    return
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            version, status = lines[0].split(" ", 2)[:2]
            hdrs = []
            for line in lines[1:]:
                k, _, v = line.partition(":")
                hdrs.append((k.strip().lower(), v.strip()))
            stream._set_head(int(status), hdrs, version.split("/", 1)[1])
            te = (stream.header("transfer-encoding") or "").lower()
            cl = stream.header("content-length")
            if head_only or int(status) in (204, 304) or 100 <= int(status) < 200:
                stream._finish(True)
                return
            if "chunked" in te:
                dec = _ChunkedDecoder()
                data = rest
                while True:
                    if data:
                        out = dec.feed(data)
                        if out:
                            stream._feed(out)
                        if dec.complete:
                            stream.info["terminating_chunk"] = True
                            stream._finish(True)
                            return
                    data = sock.recv(65536)
                    if not data:
                        stream._finish(False, "connection closed before the terminating chunk")
                        return
            elif cl is not None:
                left = int(cl)
                data = rest
                while True:
                    take = data[:left]
                    if take:
                        stream._feed(take)
                        left -= len(take)
                    if left == 0:
                        stream._finish(True)
                        return
                    data = sock.recv(65536)
                    if not data:
                        stream._finish(False, f"connection closed with {left} body bytes missing")
                        return
            else:
                data = rest
                while True:
                    if data:
                        stream._feed(data)
                    data = sock.recv(65536)
                    if not data:
                        stream._finish(True)  # delimited by close
                        return
        except (OSError, ValueError) as exc:
            stream._finish(False, "closed by the client" if closed.is_set() else f"{type(exc).__name__}: {exc}")
        finally:
            if stream.done and not closed.is_set():
                try:
                    sock.close()
                except OSError:
                    pass

    t = threading.Thread(target=reader, daemon=True, name="sse-h1")
    reader_thread.append(t)
    t.start()
    return stream


# --------------------------------------------------------------------------
# HTTP/2

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, \
    WINDOW_UPDATE, CONTINUATION = range(10)
FLAG_END_STREAM, FLAG_ACK, FLAG_END_HEADERS, FLAG_PADDED, FLAG_PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE = 0x2, 0x4
CANCEL = 0x8
_WINDOW = 1 << 24  # our receive window, per stream and for the connection


class _NV(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("value", ctypes.c_void_p),
                ("namelen", ctypes.c_size_t), ("valuelen", ctypes.c_size_t),
                ("flags", ctypes.c_uint8)]


_nghttp2: Any = None


def _libnghttp2() -> Any:
    global _nghttp2
    if _nghttp2 is None:
        name = ctypes.util.find_library("nghttp2") or "libnghttp2.so.14"
        lib = ctypes.CDLL(name)
        lib.nghttp2_hd_inflate_new.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.nghttp2_hd_inflate_new.restype = ctypes.c_int
        lib.nghttp2_hd_inflate_del.argtypes = [ctypes.c_void_p]
        lib.nghttp2_hd_inflate_del.restype = None
        lib.nghttp2_hd_inflate_hd2.argtypes = [
            ctypes.c_void_p, ctypes.POINTER(_NV), ctypes.POINTER(ctypes.c_int),
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.nghttp2_hd_inflate_hd2.restype = ctypes.c_ssize_t
        lib.nghttp2_hd_inflate_end_headers.argtypes = [ctypes.c_void_p]
        lib.nghttp2_hd_inflate_end_headers.restype = ctypes.c_int
        _nghttp2 = lib
    return _nghttp2


def h2_available() -> bool:
    """True when the HPACK decoder (libnghttp2) can be loaded."""
    try:
        _libnghttp2()
        return True
    except OSError:
        return False


class HpackDecoder:
    """HPACK decoding (RFC 7541) by libnghttp2's inflater, one per connection
    (it keeps the dynamic table)."""

    EMIT, FINAL = 0x02, 0x01

    def __init__(self) -> None:
        self._lib = _libnghttp2()
        self._ptr = ctypes.c_void_p()
        if self._lib.nghttp2_hd_inflate_new(ctypes.byref(self._ptr)) != 0:
            raise MemoryError("nghttp2_hd_inflate_new failed")

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        buf = ctypes.create_string_buffer(block, len(block))
        base = ctypes.addressof(buf)
        off, out = 0, []
        nv, flags = _NV(), ctypes.c_int(0)
        while True:
            rv = self._lib.nghttp2_hd_inflate_hd2(
                self._ptr, ctypes.byref(nv), ctypes.byref(flags),
                ctypes.c_void_p(base + off), len(block) - off, 1)
            if rv < 0:
                raise ValueError(f"HPACK decoding failed: {rv}")
            off += rv
            if flags.value & self.EMIT:
                out.append((ctypes.string_at(nv.name, nv.namelen).decode("latin-1"),
                            ctypes.string_at(nv.value, nv.valuelen).decode("latin-1")))
            if flags.value & self.FINAL:
                self._lib.nghttp2_hd_inflate_end_headers(self._ptr)
                return out
            if not flags.value & self.EMIT and off >= len(block):
                return out

    def __del__(self) -> None:
        try:
            if self._ptr:
                self._lib.nghttp2_hd_inflate_del(self._ptr)
        except Exception:
            pass


def hpack_literals(headers: Iterable[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing, no Huffman coding; names and
    values encoded as latin-1, like the inflater above decodes them."""
    return hpack_literal(headers, encoding="latin-1")


def _frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack(">I", stream & 0x7FFFFFFF) + payload


class H2Connection:
    """One HTTP/2 connection carrying any number of concurrent requests.

    http:// base URLs speak h2c with prior knowledge, https:// negotiate h2
    with ALPN (verified against `cafile` when given). A reader thread
    answers SETTINGS and PING, keeps both flow-control windows open and
    routes HEADERS/DATA to each request's SSEStream. `goaway` holds the
    (last_stream_id, error_code) of a received GOAWAY; `closed` is set when
    the server closed the connection."""

    def __init__(self, base_url: str, *, cafile: str | None = None, timeout: float = 10):
        scheme, host, port, _ = _split_url(base_url)
        self.scheme = scheme
        self.authority = f"{host}:{port}"
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme == "https":
            ctx = _tls_context(cafile, ["h2"])
            sock = ctx.wrap_socket(sock, server_hostname=host)
            if sock.selected_alpn_protocol() != "h2":
                sock.close()
                raise ConnectionError(f"ALPN selected {sock.selected_alpn_protocol()!r}, not h2")
            self.tls_version = sock.version()
        else:
            self.tls_version = None
        self.sock = sock
        self._rbuf = bytearray()
        self._wlock = threading.Lock()
        self._lock = threading.Lock()
        self._hpack = HpackDecoder()
        self._streams: dict[int, SSEStream] = {}
        self._next_id = 1
        self._header_buf: dict[int, bytearray] = {}
        self._header_flags = 0  # flags of the HEADERS frame of the block in progress
        self.goaway: tuple[int, int] | None = None
        self.closed = threading.Event()
        self.frames_received: list[tuple[int, int, int, int]] = []  # type, flags, stream, length
        settings = struct.pack(">HI", SETTINGS_ENABLE_PUSH, 0) + \
            struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, _WINDOW)
        self._send(PREFACE + _frame(SETTINGS, 0, 0, settings) +
                   _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", _WINDOW - 65535)))
        if scheme == "https":
            # One OpenSSL connection must not be read and written by two
            # threads at once. After a TLS 1.3 handshake the server's
            # session tickets arrive as post-handshake messages, and a
            # write racing with the read that processes them goes out as a
            # record the server cannot decrypt (it answers "bad record
            # MAC"). The tickets precede the server's first SETTINGS: read
            # up to it here, before the reader thread and any request.
            while True:
                frame = self._read_frame()
                if frame is None:
                    break
                self._on_frame(*frame)
                if frame[0] == SETTINGS and not frame[1] & FLAG_ACK:
                    break
        sock.settimeout(None)
        self._thread = threading.Thread(target=self._reader, daemon=True, name="sse-h2")
        self._thread.start()

    def _send(self, data: bytes) -> None:
        with self._wlock:
            self.sock.sendall(data)

    def open(self, method: str, target: str, *, headers: Headers | None = None,
             body: bytes | None = None) -> SSEStream:
        """Starts a request on a new stream; returns its response."""
        with self._lock:
            sid = self._next_id
            self._next_id += 2
            stream = SSEStream(f"HTTP/2 stream {sid} {method} {target[:80]}")
            stream.info["stream_id"] = sid
            self._streams[sid] = stream
        fields = [(":method", method), (":scheme", self.scheme), (":path", target),
                  (":authority", self.authority)]
        fields += [(k.lower(), v) for k, v in _header_items(headers)]
        block = hpack_literals(fields)
        frames = _frame(HEADERS, FLAG_END_HEADERS | (0 if body else FLAG_END_STREAM), sid, block)
        if body:
            frames += _frame(DATA, FLAG_END_STREAM, sid, body)
        stream._closer = lambda: self.reset(sid)
        self._send(frames)
        return stream

    def request(self, method: str, target: str, *, headers: Headers | None = None,
                body: bytes | None = None, timeout: float = 30) -> SSEStream:
        """open() and wait for the whole response."""
        return self.open(method, target, headers=headers, body=body).wait_end(timeout)

    def reset(self, sid: int, code: int = CANCEL) -> None:
        try:
            self._send(_frame(RST_STREAM, 0, sid, struct.pack(">I", code)))
        except OSError:
            pass
        s = self._streams.get(sid)
        if s:
            s._finish(False, "reset by the client")

    def close(self) -> None:
        try:
            self._send(_frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
        except OSError:
            pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        # The reader must be gone before the descriptor is: a new socket
        # may get the same number at once, and a reader still in recv() or
        # answering a PING would read or write the new connection's bytes
        # (the server then sees a bad TLS record).
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        self.sock.close()

    def __enter__(self) -> "H2Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reader

    def _recv_exact(self, n: int, buf: bytearray) -> bytes | None:
        while len(buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def _read_frame(self) -> tuple[int, int, int, bytes, float] | None:
        """The next frame (type, flags, stream, payload, arrival), or None at EOF."""
        head = self._recv_exact(9, self._rbuf)
        if head is None:
            return None
        length = int.from_bytes(head[:3], "big")
        ftype, flags = head[3], head[4]
        sid = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        payload = self._recv_exact(length, self._rbuf) if length else b""
        if payload is None:
            return None
        self.frames_received.append((ftype, flags, sid, length))
        return ftype, flags, sid, payload, time.monotonic()

    def _reader(self) -> None:
        reason = "connection closed by the server"
        try:
            while True:
                frame = self._read_frame()
                if frame is None:
                    break
                self._on_frame(*frame)
        except (OSError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        self.closed.set()
        for s in list(self._streams.values()):
            s._finish(False, reason)

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if flags & FLAG_PADDED:
            pad = payload[0]
            return payload[1:len(payload) - pad]
        return payload

    def _on_frame(self, ftype: int, flags: int, sid: int, payload: bytes, now: float) -> None:
        if ftype == SETTINGS:
            if not flags & FLAG_ACK:
                self._send(_frame(SETTINGS, FLAG_ACK, 0))
        elif ftype == PING:
            if not flags & FLAG_ACK:
                self._send(_frame(PING, FLAG_ACK, 0, payload))
        elif ftype == GOAWAY:
            last, code = struct.unpack(">II", payload[:8])
            self.goaway = (last & 0x7FFFFFFF, code)
            for s_id, s in list(self._streams.items()):
                if s_id > self.goaway[0]:
                    s._finish(False, f"GOAWAY before processing (code {code})")
        elif ftype in (HEADERS, CONTINUATION):
            if ftype == HEADERS:
                frag = self._unpad(flags, payload)
                if flags & FLAG_PRIORITY:
                    frag = frag[5:]
                self._header_buf[sid] = bytearray(frag)
                self._header_flags = flags
            else:
                self._header_buf.setdefault(sid, bytearray()).extend(payload)
            if flags & FLAG_END_HEADERS:
                block = bytes(self._header_buf.pop(sid, b""))
                fields = self._hpack.decode(block)  # always, for the dynamic table
                s = self._streams.get(sid)
                end = bool(self._header_flags & FLAG_END_STREAM)
                if s is not None and not s.done:
                    status = next((v for k, v in fields if k == ":status"), None)
                    regular = [(k, v) for k, v in fields if not k.startswith(":")]
                    if status is not None and not s.status:
                        if not 100 <= int(status) < 200:
                            s._set_head(int(status), regular, "2")
                    else:
                        s.info.setdefault("trailers", []).extend(regular)
                    if end:
                        s.info["end_frame"] = "HEADERS"
                        s._finish(True)
        elif ftype == DATA:
            data = self._unpad(flags, payload)
            if payload:
                inc = struct.pack(">I", len(payload))
                try:
                    upd = _frame(WINDOW_UPDATE, 0, 0, inc)
                    if not flags & FLAG_END_STREAM:
                        upd += _frame(WINDOW_UPDATE, 0, sid, inc)
                    self._send(upd)
                except OSError:
                    pass
            s = self._streams.get(sid)
            if s is not None and not s.done:
                if data:
                    s._feed(data, now)
                if flags & FLAG_END_STREAM:
                    s.info["end_frame"] = "DATA"
                    s._finish(True)
        elif ftype == RST_STREAM:
            code = struct.unpack(">I", payload[:4])[0]
            s = self._streams.get(sid)
            if s is not None:
                s.info["rst_code"] = code
                s._finish(False, f"RST_STREAM code {code}")
        # PRIORITY, WINDOW_UPDATE, PUSH_PROMISE (disabled), unknown: ignored


# --------------------------------------------------------------------------
# curl as the client

CURL_MODES = {
    "h2c": ["--http2-prior-knowledge"],
    "h2": ["--http2"],
    "h1": ["--http1.1"],
    "h1-tls": ["--http1.1"],
}


class CurlSSE:
    """`curl -N` streaming one response; its stdout (-i: head, then body) is
    parsed as it arrives. Clean end: curl's exit status 0 (for HTTP/1.1 the
    terminating chunk arrived, for HTTP/2 the stream ended with END_STREAM;
    a reset or a cut connection gives 18, 56 or 92)."""

    def __init__(self, url: str, *, mode: str = "h2c", headers: Headers | None = None,
                 cacert: str | None = None, max_time: float = 120):
        self.argv = ["curl", "-sS", "-N", "-i", "--noproxy", "*", *CURL_MODES[mode],
                     "--max-time", str(max_time)]
        if cacert:
            self.argv += ["--cacert", str(cacert)]
        for k, v in _header_items(headers):
            self.argv += ["-H", f"{k}: {v}"]
        self.argv.append(url)
        self.stream = SSEStream(f"curl {mode} {url[:80]}")
        self.proc: subprocess.Popen | None = None

    def start(self) -> SSEStream:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     bufsize=0)
        self.stream._closer = self.kill
        self.stream.info["curl"] = self
        threading.Thread(target=self._reader, daemon=True, name="sse-curl").start()
        return self.stream

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()

    def _reader(self) -> None:
        assert self.proc and self.proc.stdout
        fd = self.proc.stdout.fileno()
        buf = b""
        in_body = False
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if in_body:
                self.stream._feed(chunk)
                continue
            buf += chunk
            while not in_body:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    break
                head, buf = buf[:i], buf[i + 4:]
                lines = head.decode("latin-1").split("\r\n")
                proto, _, rest = lines[0].partition(" ")
                status = int(rest.split()[0])
                if 100 <= status < 200:
                    continue
                hdrs = []
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    hdrs.append((k.strip().lower(), v.strip()))
                self.stream._set_head(status, hdrs, proto.split("/", 1)[1])
                in_body = True
                if buf:
                    self.stream._feed(buf)
                    buf = b""
        rc = self.proc.wait()
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        self.stream.info["returncode"] = rc
        self.stream.info["stderr"] = err
        self.stream._finish(rc == 0, None if rc == 0 else f"curl exit {rc}: {err.strip()}")
