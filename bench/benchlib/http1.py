"""Load clients over raw HTTP/1.1 keep-alive sockets (asyncio, stdlib only).

Two kinds of sync client, both counting every byte they put on or take
off their socket:

- `LongPollClient`: what matrix-js-sdk does against a homeserver: an
  initial `GET /sync?timeout=0`, then `GET /sync?since=..&timeout=30000`
  in a loop on one keep-alive connection.
- `SSEClient`: one `GET /_matrix/client/v3/sync/sse` kept open; events are
  /sync bodies, `: ` comments are heartbeats.

Both scan each /sync body for the benchmark's message marker
(`"mxbench_seq":N`) with one regular expression instead of a JSON parse,
so that 100 or 1000 clients cost the load generator little, and report
`(seq, arrival time)` to a `Deliveries` sink shared by the run.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

USER_AGENT = "mxsse-bench/1 (matrix-js-sdk-like load client)"
NEXT_BATCH = re.compile(rb'"next_batch":"([^"]+)"')
MARKER = re.compile(rb'"mxbench_seq": ?(\d+)')


@dataclass
class Counters:
    """Client-side totals for one mode; snapshots are plain copies."""

    bytes_in: int = 0
    bytes_out: int = 0
    requests: int = 0          # HTTP requests sent (long-poll: one per /sync)
    responses: int = 0         # long-poll /sync answers with status 200
    empty: int = 0             # long-poll answers with next_batch == since
    events: int = 0            # SSE events (each one /sync body)
    heartbeats: int = 0        # SSE comment blocks
    errors: int = 0            # non-200, broken connections, SSE error events
    connects: int = 0          # TCP connections opened

    def copy(self) -> dict:
        return dict(self.__dict__)


class Deliveries:
    """Send times of the current mode's messages and who received them."""

    def __init__(self) -> None:
        # seq -> (t_due, room index, t_put): when the schedule said to send
        # it, and when its PUT went out (later if the sender had to wait).
        self.sent: dict[int, tuple[float, int, float]] = {}
        self.latencies: list[float] = []       # from t_due: what the sender's user waits
        self.latencies_put: list[float] = []   # from t_put: the server's part only
        self.first_seen: dict[tuple[int, int], tuple[float, str]] = {}  # (client, seq) -> (t, batch)
        self.duplicates = 0
        self.duplicate_examples: list[dict] = []

    def reset(self) -> None:
        self.sent.clear()
        self.latencies.clear()
        self.latencies_put.clear()
        self.first_seen.clear()
        self.duplicates = 0
        self.duplicate_examples.clear()

    def seen(self, client: int, body: bytes, t: float, batch: str = "") -> int:
        """Records the markers in one /sync body (`batch`: its next_batch);
        returns how many were new."""
        if b"mxbench_seq" not in body:
            return 0
        new = 0
        for m in MARKER.finditer(body):
            seq = int(m.group(1))
            sent = self.sent.get(seq)
            if sent is None:  # an older mode's message (initial sync timeline)
                continue
            key = (client, seq)
            if key in self.first_seen:
                self.duplicates += 1
                if len(self.duplicate_examples) < 40:
                    t0, b0 = self.first_seen[key]
                    self.duplicate_examples.append({
                        "client": client, "seq": seq, "room": sent[1],
                        "first_after_send_ms": round((t0 - sent[0]) * 1000, 1), "first_batch": b0,
                        "again_after_send_ms": round((t - sent[0]) * 1000, 1), "again_batch": batch})
                continue
            self.first_seen[key] = (t, batch)
            self.latencies.append(t - sent[0])
            self.latencies_put.append(t - sent[2])
            new += 1
        return new


class _Http1(asyncio.Protocol):
    """One HTTP/1.1 connection: requests out, response heads and bodies in.

    Body bytes go to `on_body(bytes)` as they arrive (de-chunked);
    `on_head(status, headers)` and `on_end()` bracket each response.
    """

    def __init__(self, counters: Counters):
        self.c = counters
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = "idle"  # head | body | chunk_size | chunk_data | chunk_crlf | trailer
        self.remaining = 0
        self.on_head: Callable[[int, dict], None] = lambda s, h: None
        self.on_body: Callable[[bytes], None] = lambda b: None
        self.on_end: Callable[[], None] = lambda: None
        self.on_lost: Callable[[Exception | None], None] = lambda e: None
        self.lost = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.c.bytes_in += len(data)
        self.buf += data
        try:
            self._parse()
        except ValueError as exc:  # malformed framing: count and drop the connection
            self.c.errors += 1
            self.transport.close()
            self.on_lost(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.on_lost(exc)

    # requests
    def send(self, data: bytes) -> None:
        self.c.bytes_out += len(data)
        self.c.requests += 1
        self.state = "head"
        self.transport.write(data)

    def close(self) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.close()

    # response parsing
    def _parse(self) -> None:
        buf = self.buf
        while buf:
            st = self.state
            if st == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > 65536:
                        raise ValueError("response head too long")
                    return
                lines = bytes(buf[:end]).split(b"\r\n")
                del buf[: end + 4]
                parts = lines[0].split(b" ", 2)
                if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                    raise ValueError("bad status line")
                status = int(parts[1])
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(b":")
                    headers[k.strip().lower()] = v.strip()
                self.on_head(status, headers)
                if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                    self.state = "chunk_size"
                else:
                    self.remaining = int(headers.get(b"content-length", b"0"))
                    self.state = "body"
                    if self.remaining == 0:
                        self._end()
            elif st == "body":
                n = min(self.remaining, len(buf))
                self.on_body(bytes(buf[:n]))
                del buf[:n]
                self.remaining -= n
                if self.remaining == 0:
                    self._end()
            elif st == "chunk_size":
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise ValueError("chunk size line too long")
                    return
                size = int(bytes(buf[:end]).split(b";")[0], 16)
                del buf[: end + 2]
                if size == 0:
                    self.state = "trailer"
                else:
                    self.remaining = size
                    self.state = "chunk_data"
            elif st == "chunk_data":
                n = min(self.remaining, len(buf))
                self.on_body(bytes(buf[:n]))
                del buf[:n]
                self.remaining -= n
                if self.remaining == 0:
                    self.state = "chunk_crlf"
            elif st == "chunk_crlf":
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                del buf[:2]
                self.state = "chunk_size"
            elif st == "trailer":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._end()
            else:  # bytes while no request is outstanding
                raise ValueError(f"unexpected bytes in state {st}")

    def _end(self) -> None:
        self.state = "idle"
        self.on_end()


def request_bytes(method: str, target: str, host: str, token: str | None,
                  accept: str = "application/json", body: bytes | None = None) -> bytes:
    """The request a browser-like client sends (minus the cookies,
    Sec-Fetch-*, Accept-Language and Referer a real browser adds, so the
    long-poll baseline is if anything under-counted)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", f"User-Agent: {USER_AGENT}",
             f"Accept: {accept}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class Conn:
    """A keep-alive connection with an awaitable `request()`."""

    def __init__(self, host: str, port: int, counters: Counters):
        self.host, self.port, self.c = host, port, counters
        self.p: _Http1 | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        _, self.p = await loop.create_connection(lambda: _Http1(self.c), self.host, self.port)
        self.c.connects += 1

    async def request(self, data: bytes, timeout: float) -> tuple[int, bytes]:
        if self.p is None or self.p.lost:
            await self.open()
        fut = asyncio.get_running_loop().create_future()
        body = bytearray()
        status = [0]
        p = self.p
        p.on_head = lambda s, h: status.__setitem__(0, s)
        p.on_body = body.extend
        p.on_end = lambda: fut.done() or fut.set_result(None)
        p.on_lost = lambda e: fut.done() or fut.set_exception(ConnectionError(f"connection lost: {e}"))
        p.send(data)
        try:
            await asyncio.wait_for(fut, timeout)
        except BaseException:
            p.close()
            self.p = None
            raise
        return status[0], bytes(body)

    def close(self) -> None:
        if self.p:
            self.p.close()
            self.p = None


class LongPollClient:
    """GET /sync?since=..&timeout=T in a loop, as matrix-js-sdk does."""

    def __init__(self, idx: int, host: str, port: int, token: str, filter_id: str,
                 counters: Counters, deliveries: Deliveries, timeout_ms: int = 30000,
                 extra_query: str = ""):
        self.idx, self.token, self.filter_id = idx, token, filter_id
        self.c, self.d = counters, deliveries
        self.timeout_ms = timeout_ms
        self.extra_query = extra_query
        self.conn = Conn(host, port, counters)
        self.hostport = f"{host}:{port}"
        self.since: str | None = None
        self.ready = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.stopped = False

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        backoff = 0.5
        # The flag, not only the cancellation, ends the loop: before Python
        # 3.12, asyncio.wait_for can swallow a cancel that arrives as the
        # response completes, and the client would go on polling.
        while not self.stopped:
            q = f"filter={self.filter_id}{self.extra_query}"
            if self.since is None:
                q += "&timeout=0"
            else:
                q += f"&since={self.since}&timeout={self.timeout_ms}"
            req = request_bytes("GET", f"/_matrix/client/v3/sync?{q}", self.hostport, self.token)
            try:
                status, body = await self.conn.request(req, self.timeout_ms / 1000 + 60)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.c.errors += 1
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 10)
                continue
            t = time.monotonic()
            if self.stopped:
                return
            if status != 200:
                self.c.errors += 1
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 10)
                continue
            backoff = 0.5
            self.c.responses += 1
            m = NEXT_BATCH.search(body)
            nb = m.group(1).decode() if m else None
            if nb is None:
                self.c.errors += 1
                continue
            if nb == self.since:
                self.c.empty += 1
            else:
                self.d.seen(self.idx, body, t, nb)
            self.since = nb
            self.ready.set()

    def stop(self) -> None:
        self.stopped = True
        if self.task:
            self.task.cancel()
        self.conn.close()


class SSEClient:
    """One /sync/sse stream over HTTP/1.1 (chunked), reconnecting with
    Last-Event-ID if the stream breaks."""

    def __init__(self, idx: int, host: str, port: int, token: str, filter_id: str | None,
                 counters: Counters, deliveries: Deliveries | None, since: str | None = None,
                 extra_query: str = ""):
        self.idx, self.host, self.port, self.token = idx, host, port, token
        self.filter_id = filter_id
        self.c, self.d = counters, deliveries
        self.hostport = f"{host}:{port}"
        self.last_id = since
        self.extra_query = extra_query
        self.ready = asyncio.Event()      # 200 head received
        self.got_event = asyncio.Event()  # first event received
        self.status: int | None = None
        self.task: asyncio.Task | None = None
        self.p: _Http1 | None = None
        self.sbuf = bytearray()
        self.reconnects = 0
        self.error_events = 0
        self.stopped = False

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    def _target(self) -> str:
        q = []
        if self.filter_id is not None:
            q.append(f"filter={self.filter_id}")
        if self.extra_query:
            q.append(self.extra_query.lstrip("&"))
        if self.last_id and self.reconnects == 0:
            q.append(f"since={self.last_id}")
        return "/_matrix/client/v3/sync/sse" + ("?" + "&".join(q) if q else "")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.5
        while not self.stopped:
            done = loop.create_future()
            try:
                _, p = await loop.create_connection(lambda: _Http1(self.c), self.host, self.port)
            except OSError:
                self.c.errors += 1
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 10)
                continue
            self.c.connects += 1
            if self.stopped:
                p.close()
                return
            self.p = p
            self.sbuf.clear()

            def on_head(status: int, headers: dict) -> None:
                self.status = status
                if status == 200:
                    self.ready.set()
                else:
                    self.c.errors += 1

            p.on_head = on_head
            p.on_body = self._feed
            p.on_end = lambda: done.done() or done.set_result("end")
            p.on_lost = lambda e: done.done() or done.set_result("lost")
            req = request_bytes("GET", self._target(), self.hostport, self.token,
                                accept="text/event-stream")
            if self.last_id and self.reconnects:
                req = req[:-2] + f"Last-Event-ID: {self.last_id}\r\n\r\n".encode()
            p.send(req)
            try:
                await done
            finally:
                p.close()
            if self.stopped:
                return
            # The server ended or broke the stream: reconnect like EventSource.
            self.reconnects += 1
            self.c.errors += 1
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 10)

    def _feed(self, data: bytes) -> None:
        if self.stopped:
            return
        sbuf = self.sbuf
        sbuf += data
        t = None
        while True:
            end = sbuf.find(b"\n\n")
            if end < 0:
                return
            block = bytes(sbuf[:end])
            del sbuf[: end + 2]
            if block.startswith(b":"):
                self.c.heartbeats += 1
                continue
            ev_id = None
            data_parts = []
            event = None
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    data_parts.append(line[6:] if line[5:6] == b" " else line[5:])
                elif line.startswith(b"id:"):
                    ev_id = (line[4:] if line[3:4] == b" " else line[3:]).decode()
                elif line.startswith(b"event:"):
                    event = line[6:].strip()
            if not data_parts:
                continue
            if event not in (None, b"message"):
                self.error_events += 1
                self.c.errors += 1
                continue
            body = b"\n".join(data_parts)
            self.c.events += 1
            if ev_id:
                self.last_id = ev_id
            if self.d is not None:
                if t is None:
                    t = time.monotonic()
                self.d.seen(self.idx, body, t, ev_id or "")
            self.got_event.set()

    def stop(self) -> None:
        self.stopped = True
        if self.task:
            self.task.cancel()
        if self.p:
            self.p.close()
