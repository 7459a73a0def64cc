"""mxsse's SSE sync stream in a real browser: Debian's headless Chromium,
driven by playwright-core (tests/integration/browser/driver.js).

The page (tests/integration/browser/page.html) is served by a Python HTTP
server on its own loopback port, so every request it makes to mxsse is
cross-origin and needs mxsse's CORS headers. Each behaviour is checked over
HTTP/2 with TLS (ALPN h2) and over HTTP/1.1: Chromium speaks HTTP/1.1 on the
cleartext listener (it never uses h2c), and on the TLS listener when started
with --disable-http2. The protocol actually used is read twice: from the
browser (DevTools' Network.responseReceived protocol) and from mxsse's
access log (proto=h2 / proto=h1).

Needs `scripts/install-deps browser` (chromium, playwright-core under
$MXSSE_CACHE/node); skipped without them. MXSSE_BROWSER_SCREENSHOT=PATH
saves the page of the reconnect test (h2) there, e.g.
docs/browser-eventsource.png.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import queue
import re
import secrets
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import Mxsse

HERE = Path(__file__).resolve().parent / "browser"
CACHE = Path(os.environ.get("MXSSE_CACHE", Path.home() / ".cache" / "mxsse"))
NODE_MODULES = CACHE / "node" / "node_modules"
CHROMIUM = os.environ.get("MXSSE_CHROMIUM", "/usr/bin/chromium")
SSE_PATH = "/_matrix/client/v3/sync/sse"
RETRY_MS = 500  # --sse-retry: EventSource reconnects after 500-1000 ms

# mode -> (which mxsse listener, Chromium flags, protocol Chromium reports,
# proto= in mxsse's access log)
MODES = {
    "h2": ("tls_url", (), "h2", "h2"),
    "h1": ("url", (), "http/1.1", "h1"),
    "h1-tls": ("tls_url", ("--disable-http2",), "http/1.1", "h1"),
}


# --- the browser ------------------------------------------------------------


class BrowserError(Exception):
    pass


class Chromium:
    """One headless Chromium behind driver.js; commands are JSON lines."""

    def __init__(self, flags: tuple[str, ...], log_path: Path):
        env = dict(os.environ, NODE_PATH=str(NODE_MODULES), MXSSE_CHROMIUM=CHROMIUM)
        self.stderr = open(log_path, "wb")
        self.proc = subprocess.Popen(
            ["node", str(HERE / "driver.js"), *flags], cwd=HERE, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.next_id = 0
        self.version = self.call("launch", deadline=60)["version"]

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))
        self.replies.put(None)

    def call(self, op: str, deadline: float = 30, **args: Any) -> Any:
        self.next_id += 1
        assert self.proc.stdin
        self.proc.stdin.write(json.dumps({"id": self.next_id, "op": op, **args}) + "\n")
        self.proc.stdin.flush()
        while True:
            try:
                reply = self.replies.get(timeout=deadline + 10)
            except queue.Empty:
                raise BrowserError(f"driver did not answer {op} within {deadline + 10}s")
            if reply is None:
                raise BrowserError(f"driver exited during {op}")
            if reply["id"] == self.next_id:
                break  # older ids: answers to calls that timed out
        if not reply["ok"]:
            raise BrowserError(reply["error"])
        return reply.get("value")

    def open(self, url: str) -> "Page":
        return Page(self, self.call("open", url=url)["page"])

    def quit(self) -> None:
        try:
            self.call("quit", deadline=20)
        except BrowserError:
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


class Page:
    def __init__(self, browser: Chromium, page_id: int):
        self.browser, self.id = browser, page_id

    def eval(self, expr: str) -> Any:
        return self.browser.call("eval", page=self.id, expr=expr)

    def wait(self, expr: str, timeout: float = 15) -> None:
        try:
            self.browser.call("wait", deadline=timeout, page=self.id, expr=expr,
                              timeout=int(timeout * 1000))
        except BrowserError as e:
            state = self.eval("JSON.stringify({sse: window.sse, fetch: window.fetchState})")
            raise AssertionError(f"page never reached {expr!r}: {e.args[0].splitlines()[0]}\n"
                                 f"page state: {state}") from None

    def state(self) -> dict:
        return self.eval("window.sse")

    def network(self) -> list[dict]:
        return self.browser.call("network", page=self.id)

    def note(self, text: str) -> None:
        """A line in the page's log about what the test did."""
        self.eval(f"note({json.dumps(text)})")

    def screenshot(self, path: Path, selector: str | None = None) -> None:
        self.browser.call("screenshot", page=self.id, path=str(path), selector=selector)

    def close(self) -> None:
        self.browser.call("close", page=self.id)


@pytest.fixture(scope="module")
def browsers(tmp_path_factory: pytest.TempPathFactory):
    """browsers(flags) -> a Chromium started with those extra flags (one per
    set of flags, shared by the module)."""
    missing = []
    if not shutil.which("node"):
        missing.append("node")
    if not (NODE_MODULES / "playwright-core" / "package.json").is_file():
        missing.append(f"playwright-core in {NODE_MODULES}")
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(CHROMIUM)
    if missing:
        pytest.skip(f"no {', '.join(missing)} (run scripts/install-deps browser)")
    logs = tmp_path_factory.mktemp("chromium")
    started: dict[tuple[str, ...], Chromium] = {}

    def get(flags: tuple[str, ...]) -> Chromium:
        if flags not in started:
            started[flags] = Chromium(flags, logs / f"driver-{len(started)}.log")
        return started[flags]

    yield get
    for b in started.values():
        b.quit()


@pytest.fixture(scope="module")
def page_origin():
    """http://127.0.0.1:PORT serving tests/integration/browser: an origin
    other than mxsse's."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(HERE)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --- Matrix side ------------------------------------------------------------


@pytest.fixture
def room(register):
    """(alice, bob, room_id): alice reads in the browser, bob writes."""
    alice, bob = register("alice"), register("bob")
    room_id = bob.post("/createRoom", {"invite": [alice.user_id]})["room_id"]
    alice.post(f"/rooms/{room_id}/join")
    return alice, bob, room_id


def send(client, room_id: str, body: str) -> str:
    txn = secrets.token_hex(8)
    return client.put(f"/rooms/{room_id}/send/m.room.message/{txn}",
                      {"msgtype": "m.text", "body": body})["event_id"]


def sse_url(base: str, token: str, **params: Any) -> str:
    return f"{base}{SSE_PATH}?" + urllib.parse.urlencode({"access_token": token, **params})


# --- mxsse side -------------------------------------------------------------


class SamePorts(Mxsse):
    """A new mxsse process on the ports, with the arguments, of `old`."""

    def __init__(self, old: Mxsse, tag: str):
        # Not super().__init__(): that picks new free ports.
        for name in ("port", "tls_port", "admin_port", "url", "tls_url", "admin_url",
                     "cert", "key", "args"):
            setattr(self, name, getattr(old, name))
        self.log_path = old.log_path.with_name(f"mxsse-{old.port}-{tag}.log")
        self.proc = None
        self.exit_code = None


def access_lines(m: Mxsse, method: str = "GET") -> list[str]:
    return [line for line in m.read_log().splitlines()
            if "event=access " in line and f" method={method} target={SSE_PATH}" in line]


def upstream_syncs(m: Mxsse) -> list[str]:
    """mxsse's debug lines for the /sync requests it made upstream."""
    return [ln for ln in m.read_log().splitlines()
            if "event=upstream.start" in ln and "/sync?" in ln]


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def sse_requests(page: Page, method: str = "GET") -> list[dict]:
    return [r for r in page.network() if SSE_PATH in r["url"] and r["method"] == method]


def header(req: dict, name: str) -> str | None:
    for k, v in req["headers"].items():
        if k.lower() == name.lower():
            return v
    return None


def bodies_seen(page: Page, room_id: str) -> list[str]:
    """Every message body of room_id in every event the page got, in order."""
    return [b for ev in page.state()["events"] for b in ev["bodies"].get(room_id, [])]


def has_body(room_id: str, body: str) -> str:
    return (f"window.sse.events.some(e => (e.bodies[{json.dumps(room_id)}] || [])"
            f".includes({json.dumps(body)}))")


# --- tests ------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_eventsource_cross_origin_gets_message(mode, bed, room, mxsse_factory, browsers,
                                               page_origin):
    """A native EventSource on another origin gets bob's message in
    rooms.join[room].timeline, with lastEventId == next_batch."""
    listener, flags, browser_proto, log_proto = MODES[mode]
    alice, bob, room_id = room
    m = mxsse_factory(bed.synapse_url, "--sse-retry", str(RETRY_MS))
    page = browsers(flags).open(page_origin + "/page.html")
    url = sse_url(getattr(m, listener), alice.access_token, heartbeat_interval=1)
    page.eval(f"startEventSource({json.dumps(url)})")
    page.wait("window.sse.opens === 1 && window.sse.events.length >= 1")

    body = f"hello over {mode} {secrets.token_hex(4)}"
    send(bob, room_id, body)
    page.wait(has_body(room_id, body))

    state = page.state()
    assert state["opens"] == 1 and state["errors"] == [], state
    assert bodies_seen(page, room_id) == [body]
    for ev in state["events"]:
        assert ev["id"] and ev["id"] == ev["next_batch"], ev

    (req,) = sse_requests(page)
    assert req["status"] == 200, req
    assert req["protocol"] == browser_proto, req
    assert header(req, "origin") == page_origin
    assert header(req, "last-event-id") is None  # never on the first request
    page.close()
    # The access line is written when the stream ends (here: the page went away).
    (line,) = wait_for(lambda: access_lines(m), 10, "the stream's access line")
    assert f" proto={log_proto} " in line and " status=200 " in line, line


@pytest.mark.parametrize("mode", list(MODES))
def test_eventsource_reconnects_with_last_event_id(mode, bed, room, mxsse_factory, browsers,
                                                   page_origin, tmp_path):
    """mxsse restarts on the same ports: the SIGTERM ends the stream cleanly,
    EventSource reconnects by itself with Last-Event-ID, mxsse resumes the
    upstream /sync from that position, nothing is delivered twice.

    The page starts from a position of its own (`since` in the URL, the only
    way EventSource can give one); the reconnect repeats that URL, so
    Last-Event-ID must win over the stale `since`."""
    listener, flags, browser_proto, log_proto = MODES[mode]
    alice, bob, room_id = room
    send(bob, room_id, "already read")
    since = alice.sync()["next_batch"]
    first = mxsse_factory(bed.synapse_url, "--sse-retry", str(RETRY_MS))
    page = browsers(flags).open(page_origin + "/page.html")
    url = sse_url(getattr(first, listener), alice.access_token, since=since,
                  heartbeat_interval=1)
    page.eval(f"startEventSource({json.dumps(url)})")
    page.wait("window.sse.opens === 1")
    before = f"before restart ({mode})"
    send(bob, room_id, before)
    page.wait(has_body(room_id, before))

    first.check_clean_exit()  # SIGTERM; exit status 0
    (line,) = access_lines(first)
    assert " status=200 " in line and f" proto={log_proto} " in line, line
    assert " aborted=1" not in line, line  # mxsse ended the response itself
    assert f"since={since}" in upstream_syncs(first)[0]
    page.note("mxsse got SIGTERM, ended the response and exited with status 0")
    # A cleanly ended stream is not a failure: EventSource keeps trying.
    page.wait("window.sse.states.includes('error:CONNECTING')")
    last_id = page.eval("window.sse.events[window.sse.events.length - 1].id")

    second = SamePorts(first, "restarted").start()
    try:
        page.note("a new mxsse listens on the same ports")
        page.wait("window.sse.opens === 2", timeout=15)
        after = f"after restart ({mode})"
        send(bob, room_id, after)
        page.wait(has_body(room_id, after))

        state = page.state()
        assert "error:CLOSED" not in state["states"], state
        assert bodies_seen(page, room_id) == [before, after]
        for ev in state["events"]:
            assert ev["id"] == ev["next_batch"], ev
        # The browser sent the last id it had seen, on its own.
        attempts = sse_requests(page)
        reqs = [r for r in attempts if r["status"] == 200]
        assert len(reqs) == 2, attempts
        # The first attempt came after the delay of mxsse's retry: field
        # (500-1000 ms here), not after Chromium's default of 3 s.
        # From the stream's end (the first error: a failed attempt while
        # the new mxsse starts would be a later one).
        delay = attempts[1]["sentAt"] - page.eval("window.sse.erroredWalls[0]")
        assert RETRY_MS - 100 <= delay < 2 * RETRY_MS + 400, f"reconnected after {delay:.0f} ms"
        assert header(reqs[0], "last-event-id") is None
        assert header(reqs[1], "last-event-id") == last_id, reqs[1]["headers"]
        assert {r["protocol"] for r in reqs} == {browser_proto}
        # ...and the restarted mxsse asked the homeserver from there.
        upstream = upstream_syncs(second)
        assert upstream and f"since={last_id}" in upstream[0], upstream
        assert all("since=" in ln for ln in upstream), upstream

        if mode == "h2":
            page.note(f"protocol: {reqs[1]['protocol']} (browser), proto={log_proto} (mxsse);"
                      f" Last-Event-ID sent: {last_id}")
            page.screenshot(tmp_path / "browser-eventsource.png", selector="main")
            if os.environ.get("MXSSE_BROWSER_SCREENSHOT"):
                shutil.copy(tmp_path / "browser-eventsource.png",
                            os.environ["MXSSE_BROWSER_SCREENSHOT"])
        page.close()
        (line,) = wait_for(lambda: access_lines(second), 10, "the resumed stream's access line")
        assert f" proto={log_proto} " in line and " status=200 " in line, line
    finally:
        second.check_clean_exit()


def test_invalid_token_closes_eventsource(bed, mxsse_factory, browsers, page_origin):
    """A 401 before the stream fails EventSource for good: readyState CLOSED,
    one request per protocol, no retry loop."""
    m = mxsse_factory(bed.synapse_url, "--sse-retry", str(RETRY_MS))
    pages = {}
    for mode in MODES:
        listener, flags, _, _ = MODES[mode]
        pages[mode] = browsers(flags).open(page_origin + "/page.html")
        url = sse_url(getattr(m, listener), "syt_not_a_valid_token", heartbeat_interval=1)
        pages[mode].eval(f"startEventSource({json.dumps(url)})")
    for page in pages.values():
        page.wait("window.es.readyState === EventSource.CLOSED")
    # Retries would come every 0.5-1 s: give them 3 s to show up.
    time.sleep(3)
    for mode, page in pages.items():
        state = page.state()
        assert state["opens"] == 0 and state["errors"] == [2], state
        assert page.eval("window.es.readyState") == 2
        (req,) = sse_requests(page)
        assert req["status"] == 401, req
        assert req["protocol"] == MODES[mode][2], req
        page.close()
    lines = access_lines(m)
    assert len(lines) == len(MODES), lines
    assert all(" status=401 " in ln for ln in lines), lines
    assert sorted(re.search(r" proto=(\S+) ", ln)[1] for ln in lines) == \
        sorted(log_proto for _, _, _, log_proto in MODES.values())


@pytest.mark.parametrize("mode", list(MODES))
def test_fetch_client_cross_origin(mode, bed, room, mxsse_factory, browsers, page_origin):
    """A fetch()-based client on another origin: Authorization and a first
    Last-Event-ID header, so a CORS preflight; the stream resumes there."""
    listener, flags, browser_proto, log_proto = MODES[mode]
    alice, bob, room_id = room
    m = mxsse_factory(bed.synapse_url, "--sse-retry", str(RETRY_MS))
    old = f"old message ({mode})"
    send(bob, room_id, old)
    since = alice.sync()["next_batch"]  # past `old`
    new = f"new message ({mode})"
    send(bob, room_id, new)

    page = browsers(flags).open(page_origin + "/page.html")
    url = f"{getattr(m, listener)}{SSE_PATH}?heartbeat_interval=1"
    page.eval(f"void startFetch({json.dumps(url)}, {json.dumps(alice.access_token)}, "
              f"{json.dumps(since)})")
    page.wait(has_body(room_id, new))

    f = page.eval("window.fetchState")
    assert f["status"] == 200 and f["contentType"] == "text/event-stream", f
    assert RETRY_MS <= f["retry"] < 2 * RETRY_MS, f
    assert bodies_seen(page, room_id) == [new]  # from `since`, not from the start
    for ev in page.state()["events"]:
        assert ev["id"] == ev["next_batch"], ev

    (req,) = sse_requests(page)
    assert req["protocol"] == browser_proto, req
    assert header(req, "authorization") == f"Bearer {alice.access_token}"
    assert header(req, "last-event-id") == since
    page.close()
    (pre,) = wait_for(lambda: access_lines(m, "OPTIONS"), 10, "the preflight's access line")
    assert f" proto={log_proto} " in pre and " status=204 " in pre, pre
    (line,) = wait_for(lambda: access_lines(m), 10, "the stream's access line")
    assert f" proto={log_proto} " in line and " status=200 " in line, line


class FlakyFirstSync:
    """A loopback HTTP/1.1 proxy to the homeserver that mistreats the first
    /sync without `since` (a stream's first request upstream): holds it for
    `hold` seconds (an initial sync is slow on a big account), or answers it
    with `fail` (a homeserver restarting behind its load balancer).
    Everything else passes straight through."""

    def __init__(self, upstream: str, hold: float = 0, fail: int | None = None):
        self.upstream, self.hold, self.fail = upstream, hold, fail
        self.initial_syncs = 0
        self.reached = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def answer(self, status: int, body: bytes, ctype: str) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # mxsse went away meanwhile

            def do_GET(self) -> None:
                first = False
                if self.path.startswith("/_matrix/client/v3/sync?") and "since=" not in self.path:
                    proxy.initial_syncs += 1
                    first = proxy.initial_syncs == 1
                    proxy.reached.set()
                if first and proxy.fail:
                    self.answer(proxy.fail, b"<html>Bad Gateway</html>", "text/html")
                    return
                if first:
                    time.sleep(proxy.hold)
                req = urllib.request.Request(proxy.upstream + self.path, headers={
                    k: v for k, v in self.headers.items()
                    if k.lower() in ("authorization", "user-agent", "x-forwarded-for")})
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        status, body, ctype = r.status, r.read(), r.headers["Content-Type"]
                except urllib.error.HTTPError as e:
                    status, body, ctype = e.code, e.read(), e.headers["Content-Type"]
                self.answer(status, body, ctype or "application/json")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode", ["h2", "h1"])
def test_restart_during_first_sync_keeps_eventsource_retrying(mode, bed, room, mxsse_factory,
                                                              browsers, page_origin):
    """SIGTERM while a stream waits for its first /sync answer (held 3 s
    upstream, longer than mxsse's 1 s shutdown notice): the browser must be
    told to come back, not failed for good. EventSource treats any non-200
    answer as final: the page would get no updates until it is reloaded.

    Fails today: mxsse answers such a stream 503 (h2/sse.c on_shutdown)."""
    listener, flags, _, _ = MODES[mode]
    alice, bob, room_id = room
    proxy = FlakyFirstSync(bed.synapse_url, hold=3)
    try:
        first = mxsse_factory(proxy.url, "--sse-retry", str(RETRY_MS))
        page = browsers(flags).open(page_origin + "/page.html")
        url = sse_url(getattr(first, listener), alice.access_token, heartbeat_interval=1)
        page.eval(f"startEventSource({json.dumps(url)})")
        assert proxy.reached.wait(10), "the stream's first /sync never went upstream"
        first.check_clean_exit()
        page.note("mxsse got SIGTERM while the first /sync was pending")
        (line,) = access_lines(first)
        second = SamePorts(first, "restarted").start()
        try:
            page.note("a new mxsse listens on the same ports")
            body = f"after restart ({mode})"
            send(bob, room_id, body)
            time.sleep(2 * RETRY_MS / 1000 + 0.5)  # past any reconnect delay
            state = page.state()
            assert "error:CLOSED" not in state["states"], (
                "EventSource gave up for good; mxsse answered the pending stream:\n"
                f"{line}\npage: {state}")
            page.wait(has_body(room_id, body))
            page.close()
        finally:
            second.check_clean_exit()
    finally:
        proxy.close()


def test_homeserver_failure_before_stream_keeps_eventsource_retrying(bed, room, mxsse_factory,
                                                                     browsers, page_origin):
    """The homeserver answers a stream's first /sync with a 502 once (it is
    restarting): mxsse retries upstream by itself, but a browser must not be
    failed for good meanwhile. A 4xx (bad token) is final; a 5xx, 429 or an
    unreachable homeserver is not, and EventSource cannot tell them apart.

    Fails today: the not-yet-started stream gets the 502 as its HTTP answer
    (sync/hub.c transient_failure)."""
    alice, bob, room_id = room
    proxy = FlakyFirstSync(bed.synapse_url, fail=502)
    try:
        m = mxsse_factory(proxy.url, "--sse-retry", str(RETRY_MS))
        page = browsers(()).open(page_origin + "/page.html")
        url = sse_url(m.tls_url, alice.access_token, heartbeat_interval=1)
        page.eval(f"startEventSource({json.dumps(url)})")
        assert proxy.reached.wait(10), "the stream's first /sync never went upstream"
        body = "after the homeserver is back"
        send(bob, room_id, body)
        time.sleep(2 * RETRY_MS / 1000 + 1)  # past mxsse's own retry and a reconnect
        state = page.state()
        assert "error:CLOSED" not in state["states"], (
            "EventSource gave up for good; mxsse answered:\n"
            + "\n".join(access_lines(m)) + f"\npage: {state}")
        page.wait(has_body(room_id, body))
        page.close()
    finally:
        proxy.close()
