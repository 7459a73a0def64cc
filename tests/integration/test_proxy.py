"""mxsse as a reverse proxy in front of a real Synapse.

A Matrix conversation through mxsse with real clients (curl over h2+TLS,
h2c and HTTP/1.1; nghttp over h2 and h2c), large media up and down with
mxsse's memory sampled, many streams multiplexed on one connection
(h2load), X-Forwarded-For spoofing, access-token redaction, upstream
failures (fake homeservers in this file), the versions rewrite, and
draining on SIGTERM.

Memory is measured on a build without sanitizers (ASan's quarantine makes
RSS meaningless): MXSSE_PLAIN_BIN, else <build dir>/mxsse when it is a plain
build no older than the sources, else one compiled from the sources into
the session's temporary directory.

One module on purpose: the cases share the fake homeservers defined
here and one bed; they read as the proxy's specification.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import REPO, Client, Mxsse, free_port
from httpclients import (CURL_MODES, DATA, END_STREAM, HEADERS, RST_STREAM, Curl, Nghttp,
                         RawH2, Response, RssSampler, connect_refused, h2load, have_tool,
                         nghttp_frames)
from testbed import http_json

BIG = 100 * 1000 * 1000          # the large media file
RSS_GROWTH_MAX_KB = 16 * 1024    # what mxsse may add while moving it

pytestmark = pytest.mark.skipif(
    not (have_tool("curl") and have_tool("nghttp") and have_tool("h2load")),
    reason="needs curl and nghttp2-client (nghttp, h2load)")


# --------------------------------------------------------------------------
# A plain (non-sanitizer) mxsse for memory measurements


def _is_sanitized(path: Path) -> bool:
    data = path.read_bytes()
    return b"__asan_init" in data or b"__tsan_init" in data or b"__msan_init" in data


def _newest_source() -> float:
    newest = 0.0
    for d in ("common", "h2", "sync"):
        for p in (REPO / d).glob("*.[ch]"):
            newest = max(newest, p.stat().st_mtime)
    return max(newest, (REPO / "main.c").stat().st_mtime)


def _compile_plain(out: Path) -> tuple[Path | None, str]:
    """Builds mxsse -O2 without sanitizers, the way the Makefile links it
    (one archive per directory). Returns (binary or None, compiler output)."""
    config = out / "config.h"
    built = Path(os.environ.get("MXSSE_BUILD_DIR", REPO / "build")) / "config.h"
    text = built.read_text() if built.exists() else "#define _GNU_SOURCE 1\n"
    version = re.search(r"AC_INIT\(\[mxsse\], \[([^\]]+)\]", (REPO / "configure.ac").read_text())
    text += f'\n#ifndef PACKAGE_VERSION\n#define PACKAGE_VERSION "{version.group(1) if version else "dev"}"\n#endif\n'
    config.write_text(text)
    cflags = ["-std=c11", "-O2", "-g", "-include", str(config), f"-I{REPO}",
              "-I/usr/share/include/llhttp"]
    libs = ["-lnghttp2", "-lssl", "-lcrypto", "-ljson-c", "-lcurl", "-lev", "-lhiredis",
            "-lz", "-lm"]
    log = []
    archives = []
    for d in ("h2", "sync", "common", "h2/llhttp"):
        srcs = sorted(str(p) for p in (REPO / d).glob("*.c"))
        if not srcs:
            continue
        objdir = out / d.replace("/", "_")
        objdir.mkdir(parents=True, exist_ok=True)
        extra = ["-I/usr/share/llhttp"] if d == "h2/llhttp" else []  # Debian's llhttp sources
        p = subprocess.run(["gcc", *cflags, *extra, "-c", *srcs], cwd=objdir, capture_output=True,
                           text=True)
        log.append(p.stdout + p.stderr)
        if p.returncode:
            return None, "\n".join(log)
        lib = out / f"lib{objdir.name}.a"
        subprocess.run(["ar", "rcs", str(lib), *map(str, sorted(objdir.glob("*.o")))], check=True)
        archives.append(str(lib))
    binary = out / "mxsse"
    p = subprocess.run(["gcc", *cflags, "-o", str(binary), str(REPO / "main.c"), *archives, *libs],
                       capture_output=True, text=True)
    log.append(p.stdout + p.stderr)
    return (binary if p.returncode == 0 else None), "\n".join(log)


@pytest.fixture(scope="session")
def plain_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("MXSSE_PLAIN_BIN"):
        path = Path(os.environ["MXSSE_PLAIN_BIN"])
        if not os.access(path, os.X_OK):
            pytest.skip(f"MXSSE_PLAIN_BIN={path} is not executable")
        if _is_sanitized(path):
            pytest.skip(f"MXSSE_PLAIN_BIN={path} is a sanitizer build")
        return path
    built = Path(os.environ.get("MXSSE_BUILD_DIR", REPO / "build")) / "mxsse"
    if built.is_file() and not _is_sanitized(built) and built.stat().st_mtime >= _newest_source():
        return built
    binary, log = _compile_plain(tmp_path_factory.mktemp("plain-build"))
    if binary is None:
        pytest.skip(f"could not build a plain mxsse (set MXSSE_PLAIN_BIN):\n{log[-3000:]}")
    return binary


@pytest.fixture
def plain_factory(plain_binary: Path, tls_cert, tmp_path: Path):
    """Like mxsse_factory, with the plain binary."""
    started: list[Mxsse] = []

    def start(upstream: str, *extra: str) -> Mxsse:
        m = Mxsse(plain_binary, upstream, tls_cert, tmp_path, list(extra)).start()
        started.append(m)
        return m

    yield start
    for m in started:
        if m.exit_code is None:
            m.check_clean_exit()


# --------------------------------------------------------------------------
# Clients through mxsse

# Client modes of the conversation test: tool, HTTP version it must end
# up using, and whether it talks to the TLS listener.
MODES = {
    "curl-h2": ("curl", "2", True),
    "curl-h2c": ("curl", "2", False),
    "curl-h1": ("curl", "1.1", False),
    "curl-h1-tls": ("curl", "1.1", True),
    "nghttp-h2": ("nghttp", "2", True),
    "nghttp-h2c": ("nghttp", "2", False),
}


class Via:
    """One client tool in one mode, speaking the Matrix API through mxsse."""

    def __init__(self, mode: str, m: Mxsse, timeout: float = 60):
        tool, self.version, tls = MODES[mode]
        self.mode = mode
        self.base = m.tls_url if tls else m.url
        if tool == "curl":
            self.tool = Curl.for_mode(mode.split("-", 1)[1], cacert=m.cert, timeout=timeout)
        else:
            self.tool = Nghttp(timeout=timeout)
        self.responses: list[Response] = []

    def call(self, method: str, path: str, body: Any = None, *, token: str | None = None,
             headers: dict | None = None, **kw: Any) -> Response:
        hs = dict(headers or {})
        if token:
            hs["authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hs.setdefault("content-type", "application/json")
        r = self.tool.request(method, self.base + path, headers=hs, body=data, **kw)
        self.responses.append(r)
        return r

    def matrix(self, method: str, path: str, body: Any = None, *, token: str | None = None,
               expect: int = 200, **kw: Any) -> Any:
        """A client-API call that must answer `expect` over the expected
        HTTP version; returns the decoded JSON body."""
        r = self.call(method, path, body, token=token, **kw)
        assert r.returncode == 0 and r.status == expect, f"{method} {path}: {r.describe()}"
        assert r.http_version == self.version, f"{method} {path} used HTTP/{r.http_version}"
        return r.json()


def register_via(via: Via, secret: str, localpart: str) -> dict:
    """Registers a user with the shared-secret admin API, through mxsse."""
    path = "/_synapse/admin/v1/register"
    nonce = via.matrix("GET", path)["nonce"]
    password = secrets.token_urlsafe(12)
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
    mac.update(b"\0".join([nonce.encode(), localpart.encode(), password.encode(), b"notadmin"]))
    body = via.matrix("POST", path, {"nonce": nonce, "username": localpart, "password": password,
                                     "admin": False, "mac": mac.hexdigest()})
    return body


def quote(s: str) -> str:
    return urllib.parse.quote(s, safe="")


def access_lines(m: Mxsse) -> list[str]:
    """mxsse's access log lines for client requests (not the admin pages)."""
    admin = re.compile(r" target=/(readyz|healthz|metrics)\b")
    return [line for line in m.read_log().splitlines()
            if " event=access " in line and not admin.search(line)]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------
# 1. A conversation in every client mode


@pytest.mark.parametrize("mode", list(MODES))
def test_conversation(mode: str, bed, mxsse):
    via = Via(mode, mxsse)
    secret = bed.info["secrets"]["registration"]
    tag = secrets.token_hex(3)
    alice = register_via(via, secret, f"alice-{mode}-{tag}")
    bob = register_via(via, secret, f"bob-{mode}-{tag}")
    a, b = alice["access_token"], bob["access_token"]
    assert via.matrix("GET", "/_matrix/client/v3/account/whoami", token=a)["user_id"] == alice["user_id"]

    room = via.matrix("POST", "/_matrix/client/v3/createRoom", {"preset": "private_chat"}, token=a)["room_id"]
    r = quote(room)
    via.matrix("POST", f"/_matrix/client/v3/rooms/{r}/invite", {"user_id": bob["user_id"]}, token=a)
    # Bob's first sync sees the invite; its next_batch is where he then waits.
    first = via.matrix("GET", "/_matrix/client/v3/sync?timeout=0", token=b)
    assert room in first.get("rooms", {}).get("invite", {}), f"no invite in {first.get('rooms')}"
    via.matrix("POST", f"/_matrix/client/v3/join/{r}", {}, token=b)
    since = via.matrix("GET", f"/_matrix/client/v3/sync?timeout=0&since={quote(first['next_batch'])}",
                       token=b)["next_batch"]

    texts = [f"{mode} message {i} ünïcødé" for i in range(3)]
    sent = []
    for i, text in enumerate(texts):
        sent.append(via.matrix(
            "PUT", f"/_matrix/client/v3/rooms/{r}/send/m.room.message/t{tag}{i}",
            {"msgtype": "m.text", "body": text}, token=a)["event_id"])
    via.matrix("PUT", f"/_matrix/client/v3/rooms/{r}/send/m.room.message/b{tag}",
                       {"msgtype": "m.text", "body": "reply"}, token=b)["event_id"]

    page = via.matrix("GET", f"/_matrix/client/v3/rooms/{r}/messages?dir=b&limit=20", token=a)
    bodies = [e["content"].get("body") for e in reversed(page["chunk"]) if e["type"] == "m.room.message"]
    assert bodies == [*texts, "reply"]

    # Bob sees Alice's messages through an incremental (long-polling) sync.
    seen: list[str] = []
    deadline = time.monotonic() + 20
    while set(sent) - set(seen) and time.monotonic() < deadline:
        body = via.matrix("GET", f"/_matrix/client/v3/sync?timeout=5000&since={quote(since)}", token=b)
        since = body["next_batch"]
        timeline = body.get("rooms", {}).get("join", {}).get(room, {}).get("timeline", {})
        seen += [e["event_id"] for e in timeline.get("events", [])]
    assert set(sent) <= set(seen), f"bob's /sync through mxsse missed {set(sent) - set(seen)}"

    # The server agrees on the protocol: every request of this test was
    # served over the expected one.
    want = "h2" if via.version == "2" else "h1"
    lines = access_lines(mxsse)
    assert len(lines) >= len(via.responses)
    wrong = [line for line in lines if f" proto={want} " not in line]
    assert not wrong, f"requests served over another protocol: {wrong[:3]}"
    if isinstance(via.tool, Nghttp):
        assert all(r.info["har"]["response"]["httpVersion"] == "HTTP/2.0" for r in via.responses)


# --------------------------------------------------------------------------
# 2. Large media, memory


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """100 MB of random bytes and their SHA-256."""
    path = tmp_path_factory.mktemp("media") / "big.bin"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(BIG // (1 << 20)):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
        rest = os.urandom(BIG % (1 << 20))
        h.update(rest)
        f.write(rest)
    return path, h.hexdigest()


@pytest.fixture(scope="module")
def stored_big(bed, big_file) -> tuple[str, str, str]:
    """The big file uploaded straight to Synapse: (media path, token, sha256)."""
    user = bed.register(f"media-{secrets.token_hex(4)}")
    r = Curl("1.1").request("POST", bed.synapse_url + "/_matrix/media/v3/upload?filename=big.bin",
                            headers={"authorization": f"Bearer {user['access_token']}",
                                     "content-type": "application/octet-stream"},
                            body_file=big_file[0])
    assert r.status == 200, r.describe()
    mxc = r.json()["content_uri"]
    server, media_id = mxc.removeprefix("mxc://").split("/")
    return f"/_matrix/client/v1/media/download/{server}/{media_id}", user["access_token"], big_file[1]


def test_synapse_accepts_big_uploads(bed):
    # The large-media tests rely on this (interop/testbed.py sets it).
    config = json.loads((bed.dir / "synapse" / "homeserver.yaml").read_text())
    size = config["max_upload_size"]
    factor = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    assert int(size[:-1]) * factor[size[-1]] >= 2 * BIG


@pytest.mark.parametrize("mode", ["h2", "h1"])
def test_large_media_memory_stays_flat(mode: str, bed, register, plain_factory, big_file,
                                       tmp_path: Path):
    path, digest = big_file
    m = plain_factory(bed.synapse_url)
    alice = register("alice")
    auth = {"authorization": f"Bearer {alice.access_token}"}
    curl = Curl.for_mode(mode, cacert=m.cert, timeout=120)
    base = m.tls_url if CURL_MODES[mode][1] else m.url
    want_version = "2" if mode == "h2" else "1.1"
    # Warm up: TLS, the upstream pool and the allocator's arenas.
    for _ in range(3):
        assert curl.request("GET", base + "/_matrix/client/v3/account/whoami", headers=auth).status == 200

    with RssSampler(m.pid) as up:
        r = up_r = curl.request("POST", base + "/_matrix/media/v3/upload?filename=big.bin",
                         headers={**auth, "content-type": "application/octet-stream"},
                         body_file=path)
    assert r.returncode == 0 and r.status == 200, r.describe()
    assert r.http_version == want_version
    mxc = r.json()["content_uri"]
    server, media_id = mxc.removeprefix("mxc://").split("/")

    out = tmp_path / "download.bin"
    with RssSampler(m.pid) as down:
        r = curl.request("GET", f"{base}/_matrix/client/v1/media/download/{server}/{media_id}",
                         headers=auth, output=out)
    assert r.returncode == 0 and r.status == 200, r.describe()
    assert r.http_version == want_version
    assert out.stat().st_size == BIG
    assert sha256_file(out) == digest
    print(f"\nMEASURE media {mode} ({m.args[0]}): upload {up.summary()} in {up_r.elapsed:.2f}s; "
          f"download {down.summary()} in {r.elapsed:.2f}s")
    assert up.growth_kb < RSS_GROWTH_MAX_KB, f"upload: {up.summary()}"
    assert down.growth_kb < RSS_GROWTH_MAX_KB, f"download: {down.summary()}"


def test_slow_clients_memory_stays_flat(bed, plain_factory, stored_big, tmp_path: Path):
    """Two rate-limited clients (h2 over TLS, HTTP/1.1) download 100 MB each
    while Synapse could send it at once: mxsse must hold the homeserver
    back instead of queueing the body."""
    media, token, digest = stored_big
    m = plain_factory(bed.synapse_url)
    auth = {"authorization": f"Bearer {token}"}
    h2, h1 = Curl.for_mode("h2", cacert=m.cert, timeout=60), Curl.for_mode("h1", timeout=60)
    assert h2.request("GET", m.tls_url + "/_matrix/client/versions").status == 200
    assert h1.request("GET", m.url + "/_matrix/client/versions").status == 200
    rate = "25M"  # curl: 25 MiB/s, about 4 s for the file
    with RssSampler(m.pid) as mem:
        jobs = [h2.start("GET", m.tls_url + media, headers=auth, output=tmp_path / "h2.bin",
                         limit_rate=rate),
                h1.start("GET", m.url + media, headers=auth, output=tmp_path / "h1.bin",
                         limit_rate=rate)]
        results = [job.wait(60) for job in jobs]
    for r, name in zip(results, ("h2", "h1")):
        assert r.returncode == 0 and r.status == 200, r.describe()
        assert sha256_file(tmp_path / f"{name}.bin") == digest
        assert r.elapsed > 3, f"{name} was not slow ({r.elapsed:.1f}s): the test proves nothing"
    print(f"\nMEASURE slow clients (2 x 100 MB at {rate}/s): {mem.summary()}, "
          f"{max(r.elapsed for r in results):.1f}s")
    assert mem.growth_kb < RSS_GROWTH_MAX_KB, mem.summary()


@pytest.mark.parametrize("mode", ["h2", "h1"])
def test_slow_homeserver_upload_memory_stays_flat(mode: str, plain_factory, fake_upstream,
                                                  tmp_path: Path):
    """A homeserver that reads an upload slower than the client sends it:
    mxsse must flow-control the client instead of queueing the body."""
    size, rate = 40 << 20, 20 << 20  # 2 s at the homeserver's pace
    up = fake_upstream(lambda path: "slowread")
    up.slowread_rate = rate
    m = plain_factory(up.url)
    data = tmp_path / "upload.bin"
    data.write_bytes(os.urandom(size))
    digest = sha256_file(data)
    curl = Curl.for_mode(mode, cacert=m.cert, timeout=60)
    base = m.tls_url if CURL_MODES[mode][1] else m.url
    assert curl.request("POST", base + "/_matrix/media/v3/upload", body=b"warm").status == 200
    with RssSampler(m.pid) as mem:
        r = curl.request("POST", base + "/_matrix/media/v3/upload?filename=u.bin",
                         headers={"content-type": "application/octet-stream"}, body_file=data)
    assert r.returncode == 0 and r.status == 200, r.describe()
    assert r.json() == {"received": size, "sha256": digest}
    assert r.elapsed > 1.5, f"the homeserver was not slow ({r.elapsed:.1f}s): the test proves nothing"
    print(f"\nMEASURE slow homeserver upload {mode} (40 MiB at 20 MiB/s): {mem.summary()}")
    assert mem.growth_kb < RSS_GROWTH_MAX_KB, mem.summary()


# --------------------------------------------------------------------------
# 3. Many streams on one HTTP/2 connection


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "h2"])
def test_h2load_multiplexed(tls: bool, mxsse, register):
    alice = register("alice")
    before = mxsse.metrics()
    url = (mxsse.tls_url if tls else mxsse.url) + "/_matrix/client/v3/account/whoami"
    res = h2load(url, clients=1, streams=50, requests=1000,
                 headers={"authorization": f"Bearer {alice.access_token}"})
    after = mxsse.metrics()
    print(f"\nMEASURE h2load {'h2' if tls else 'h2c'} -c1 -m50 -n1000: {res.req_per_s:.0f} req/s "
          f"in {res.seconds:.2f}s")
    assert res.protocol == ("h2" if tls else "h2c"), res.output
    assert (res.succeeded, res.failed, res.errored, res.timeout) == (1000, 0, 0, 0), res.output
    assert res.status.get("2xx") == 1000, res.output
    key = 'mxsse_connections_accepted_total{protocol="h2"}'
    assert after[key] - before[key] == 1
    req = 'mxsse_requests_total{protocol="h2"}'
    assert after[req] - before[req] == 1000
    # 2xx: the 1000, and the admin page that answered `before`.
    ok = 'mxsse_responses_total{code="2xx"}'
    assert after[ok] - before[ok] == 1000 + 1
    for code in ("4xx", "5xx"):
        assert after[f'mxsse_responses_total{{code="{code}"}}'] == before[f'mxsse_responses_total{{code="{code}"}}']
    # HTTP/1.1: only the admin connection that fetched `after`.
    h1 = 'mxsse_connections_accepted_total{protocol="http/1.1"}'
    assert after[h1] - before[h1] == 1


# --------------------------------------------------------------------------
# 4. X-Forwarded-For and what the homeserver records


def login(bed, client: Client) -> tuple[str, str]:
    """A new device of the user, logged in directly: (access token, device id)."""
    status, body = http_json("POST", bed.synapse_url + "/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": client.user_id},
        "password": client.password})
    assert status == 200, body
    return body["access_token"], body["device_id"]


def wait_last_seen(bed, token: str, want: dict[str, str], timeout: float = 15) -> dict[str, str]:
    """Polls /devices (with `token`, a device not in `want`) until every
    device in `want` shows the wanted last_seen_ip; returns what was seen."""
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while True:
        status, body = http_json("GET", bed.synapse_url + "/_matrix/client/v3/devices", token=token)
        assert status == 200, body
        seen = {d["device_id"]: d.get("last_seen_ip") for d in body["devices"]}
        if all(seen.get(dev) == ip for dev, ip in want.items()) or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def test_x_forwarded_for_spoofing_ignored(bed, mxsse, register):
    alice = register("alice")
    h2_token, h2_device = login(bed, alice)
    reader, _ = login(bed, alice)
    spoof = {"x-forwarded-for": "6.6.6.6", "x-real-ip": "6.6.6.6", "forwarded": "for=6.6.6.6"}
    # HTTP/1.1 with the header twice, and HTTP/2 over TLS, from 127.0.0.2.
    h1 = Curl("1.1", interface="127.0.0.2")
    r = h1.request("GET", mxsse.url + "/_matrix/client/v3/account/whoami",
                   headers=[("authorization", f"Bearer {alice.access_token}"),
                            ("x-forwarded-for", "6.6.6.6, 7.7.7.7"), *spoof.items()])
    assert r.status == 200, r.describe()
    h2 = Curl("2", cacert=mxsse.cert, interface="127.0.0.2")
    r = h2.request("GET", mxsse.tls_url + "/_matrix/client/v3/account/whoami",
                   headers={"authorization": f"Bearer {h2_token}", **spoof})
    assert r.status == 200 and r.http_version == "2", r.describe()
    want = {alice.device_id: "127.0.0.2", h2_device: "127.0.0.2"}
    seen = wait_last_seen(bed, reader, want)
    assert {d: seen.get(d) for d in want} == want


def test_trusted_proxy_x_forwarded_for_kept(bed, mxsse_factory, register):
    m = mxsse_factory(bed.synapse_url, "--trusted-proxy", "127.0.0.3")
    alice = register("alice")
    other_token, other_device = login(bed, alice)
    bare_token, bare_device = login(bed, alice)
    reader, _ = login(bed, alice)
    url = m.url + "/_matrix/client/v3/account/whoami"
    # From the trusted proxy: its X-Forwarded-For is the client.
    r = Curl("1.1", interface="127.0.0.3").request(
        "GET", url, headers={"authorization": f"Bearer {alice.access_token}",
                             "x-forwarded-for": "10.9.8.7"})
    assert r.status == 200, r.describe()
    # The trusted proxy without the header: the proxy itself.
    r = Curl("1.1", interface="127.0.0.3").request(
        "GET", url, headers={"authorization": f"Bearer {bare_token}"})
    assert r.status == 200, r.describe()
    # Anyone else still cannot choose their address.
    r = Curl("2-prior-knowledge", interface="127.0.0.2").request(
        "GET", url, headers={"authorization": f"Bearer {other_token}",
                             "x-forwarded-for": "10.9.8.7"})
    assert r.status == 200, r.describe()
    want = {alice.device_id: "10.9.8.7", bare_device: "127.0.0.3", other_device: "127.0.0.2"}
    seen = wait_last_seen(bed, reader, want)
    assert {d: seen.get(d) for d in want} == want


def test_access_tokens_not_logged(bed, mxsse, register):
    alice = register("alice")
    header_token, _ = login(bed, alice)
    curl = Curl("2-prior-knowledge")
    base = mxsse.url + "/_matrix/client/v3/account/whoami"
    r = curl.request("GET", f"{base}?access_token={alice.access_token}")
    assert r.status == 200, r.describe()
    r = curl.request("GET", f"{base}?a=1&access_token={alice.access_token}&b=2")
    assert r.status == 200, r.describe()
    r = curl.request("GET", base, headers={"authorization": f"Bearer {header_token}"})
    assert r.status == 200, r.describe()
    r = Curl("1.1").request("GET", f"{base}?access_token=not-a-real-token-xyzzy")
    assert r.status == 401, r.describe()
    log = mxsse.read_log()
    assert len(access_lines(mxsse)) == 4
    for secret in (alice.access_token, header_token, "not-a-real-token-xyzzy"):
        assert secret not in log, f"token in {mxsse.log_path}"
    assert log.count("access_token=<redacted>") >= 3


@pytest.mark.parametrize("query", ["x=1;access_token={}", "%61ccess_token={}",
                                   "access%5Ftoken={}"])
def test_access_token_spellings_not_logged(query: str, bed, mxsse, register):
    """Synapse (Twisted) also splits the query on ';' and percent-decodes
    parameter names: these spellings authenticate, so they must be
    redacted as well."""
    alice = register("alice")
    target = "/_matrix/client/v3/account/whoami?" + query.format(alice.access_token)
    r = Curl("1.1").request("GET", mxsse.url + target)
    assert r.status == 200 and r.json()["user_id"] == alice.user_id, r.describe()
    assert alice.access_token not in mxsse.read_log(), \
        f"access token logged for ?{query.format('…')}: {access_lines(mxsse)}"


# --------------------------------------------------------------------------
# 5. Upstream failures


class FakeUpstream:
    """A homeserver that misbehaves on purpose, one thread per connection.

    behave(path) says what to do with a request:
      "ok"             200 {"ok":true}
      "hop"            200 with connection-specific response fields
      "silent"         never answers
      "reset"          200, Content-Length 1000000, 200 kB, then TCP RST
      "reset-chunked"  the same, chunked
      "drip"           200, Content-Length 100 MB, 1 kB every 50 ms until
                       mxsse closes the connection (drip_closed_at)
      "slowread"       reads the request body at slowread_rate bytes/s, then
                       200 {"received": n, "sha256": hex}
      "versions-gzip"  a versions document, gzip-encoded when the request
                       accepts gzip (as homeservers with compression do)
    Every request's path and header fields (names lowercase) are kept."""

    def __init__(self, behave: Callable[[str], str], slowread_rate: int = 16 << 20):
        self.behave = behave
        self.slowread_rate = slowread_rate
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[str] = []
        self.heads: list[list[tuple[str, str]]] = []
        self.connections = 0
        self.drip_started = threading.Event()
        self.drip_closed_at: float | None = None
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(_Reader(conn),), daemon=True).start()

    def _serve(self, rd: "_Reader") -> None:
        conn = rd.sock
        try:
            while not self._stop.is_set():
                head = rd.head()
                if head is None:
                    return
                path, fields = head
                self.requests.append(path)
                self.heads.append(fields)
                how = self.behave(path)
                if how == "slowread":
                    n, digest = rd.body(fields, self.slowread_rate)
                    body = json.dumps({"received": n, "sha256": digest}).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    continue
                rd.body(fields)
                if how == "ok":
                    body = b'{"ok":true}'
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                elif how == "versions-gzip":
                    body = json.dumps({"versions": ["v1.11"],
                                       "unstable_features": {"org.example.fake": True}}).encode()
                    extra = b""
                    if "gzip" in dict(fields).get("accept-encoding", ""):
                        body, extra = gzip.compress(body), b"Content-Encoding: gzip\r\nVary: Accept-Encoding\r\n"
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra +
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                elif how == "hop":
                    # Connection-specific fields (and one that Connection
                    # names): none may reach the client, and over HTTP/2
                    # they would make the response malformed.
                    body = b'{"hop":true}'
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Connection: keep-alive, X-Upstream-Private\r\n"
                                 b"Keep-Alive: timeout=30\r\nX-Upstream-Private: 1\r\n"
                                 b"Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\n"
                                 b"X-Kept: yes\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                elif how == "silent":
                    while conn.recv(65536):
                        pass
                    return
                elif how in ("reset", "reset-chunked"):
                    part = b"x" * 200_000
                    if how == "reset":
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                     b"Content-Length: 1000000\r\n\r\n" + part)
                    else:
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(part), part))
                    time.sleep(0.2)
                    # SO_LINGER 0: close() sends a TCP RST.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    return
                elif how == "drip":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                 b"Content-Length: 100000000\r\n\r\n")
                    self.drip_started.set()
                    while not self._stop.is_set():
                        conn.sendall(b"y" * 1024)
                        readable, _, _ = select.select([conn], [], [], 0.05)
                        if readable and not conn.recv(65536):
                            break
                    self.drip_closed_at = time.monotonic()
                    return
        except OSError:
            if self.drip_started.is_set() and self.drip_closed_at is None:
                self.drip_closed_at = time.monotonic()
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass


class _Reader:
    """Buffered HTTP/1.1 request reading for FakeUpstream."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self, limit: int = 65536) -> bool:
        chunk = self.sock.recv(limit)
        self.buf += chunk
        return bool(chunk)

    def head(self) -> tuple[str, list[tuple[str, str]]] | None:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        fields = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields.append((name.strip().lower(), value.strip()))
        return lines[0].split(" ")[1], fields

    def _take(self, n: int, rate: int | None, started: float, done: int) -> bytes:
        while len(self.buf) < n:
            if rate:  # stay at `rate` bytes/s overall
                ahead = (done + len(self.buf)) / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            if not self._fill(min(65536, n - len(self.buf)) if rate else 65536):
                raise ConnectionError("request body cut short")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def body(self, fields: list[tuple[str, str]], rate: int | None = None) -> tuple[int, str]:
        """Reads the request body (Content-Length or chunked), at most
        `rate` bytes/s; returns (length, sha256 hex)."""
        h = hashlib.sha256()
        field = dict(fields)
        started, done = time.monotonic(), 0
        if "chunked" in field.get("transfer-encoding", "").lower():
            while True:
                while b"\r\n" not in self.buf:
                    if not self._fill():
                        raise ConnectionError("chunked body cut short")
                size_line, _, self.buf = self.buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                data = self._take(size + 2, rate, started, done)[:size]
                h.update(data)
                done += size
                if size == 0:
                    return done, h.hexdigest()
        length = int(field.get("content-length", 0))
        while done < length:
            data = self._take(min(1 << 20, length - done), rate, started, done)
            h.update(data)
            done += len(data)
        return done, h.hexdigest()


@pytest.fixture
def fake_upstream():
    made: list[FakeUpstream] = []

    def make(behave: Callable[[str], str]) -> FakeUpstream:
        f = FakeUpstream(behave)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def assert_matrix_error(r: Response, status: int, version: str) -> None:
    assert r.returncode == 0 and r.status == status, r.describe()
    assert r.http_version == version
    assert r.header("content-type").startswith("application/json"), r.headers
    body = r.json()
    assert body["errcode"] == "M_UNKNOWN" and isinstance(body["error"], str), body


def test_unreachable_upstream_502(mxsse_factory):
    m = mxsse_factory(f"http://127.0.0.1:{free_port()}")
    path = "/_matrix/client/v3/account/whoami"
    assert_matrix_error(Curl("1.1").request("GET", m.url + path), 502, "1.1")
    assert_matrix_error(Curl("2-prior-knowledge").request("GET", m.url + path), 502, "2")
    assert_matrix_error(Curl("2", cacert=m.cert).request("GET", m.tls_url + path), 502, "2")
    # With a request body too.
    assert_matrix_error(Curl("2-prior-knowledge").request(
        "POST", m.url + "/_matrix/client/v3/createRoom", body=b"{}",
        headers={"content-type": "application/json"}), 502, "2")
    r = Nghttp().request("GET", m.url + path)
    assert r.status == 502 and r.json()["errcode"] == "M_UNKNOWN", r.describe()


def test_silent_upstream_504(mxsse_factory, fake_upstream):
    up = fake_upstream(lambda path: "silent")
    m = mxsse_factory(up.url, "--upstream-timeout", "1")
    path = "/_matrix/client/v3/account/whoami"
    for curl, base, version in ((Curl("1.1"), m.url, "1.1"),
                                (Curl("2-prior-knowledge"), m.url, "2")):
        r = curl.request("GET", base + path, max_time=10)
        assert_matrix_error(r, 504, version)
        assert 0.9 < r.elapsed < 2.5, f"504 after {r.elapsed:.2f}s with --upstream-timeout 1"
        print(f"\nMEASURE 504 over HTTP/{version} after {r.elapsed:.2f}s")
    assert len(up.requests) == 2


@pytest.mark.parametrize("how", ["reset", "reset-chunked"])
def test_upstream_reset_mid_body(how: str, mxsse_factory, fake_upstream):
    up = fake_upstream(lambda path: how)
    m = mxsse_factory(up.url)
    path = "/_matrix/media/v3/download/x/y"
    for curl, base in ((Curl("1.1"), m.url), (Curl("2-prior-knowledge"), m.url),
                       (Curl("2", cacert=m.cert), m.tls_url)):
        r = curl.request("GET", base + path, max_time=10)
        # The head had been sent: the client sees 200, then a broken body,
        # never a clean end and never a hang. HTTP/2: the stream is reset
        # (curl 92 "stream 1 was not closed cleanly"); HTTP/1.1: the
        # connection closes before the end (curl 18 "transfer closed").
        assert r.status == 200, r.describe()
        assert r.returncode == (92 if r.http_version == "2" else 18), r.describe()
        assert 0 < len(r.body) < 1_000_000
        assert r.elapsed < 5, r.describe()
    # mxsse survives and serves the next request.
    assert Curl("1.1").request("GET", m.admin_url + "/healthz").status == 200


def test_client_gone_cancels_upstream_h1(mxsse_factory, fake_upstream, tmp_path: Path):
    up = fake_upstream(lambda path: "drip")
    m = mxsse_factory(up.url)
    job = Curl("1.1").start("GET", m.url + "/_matrix/media/v3/download/x/slow",
                            output=tmp_path / "part", max_time=20)
    deadline = time.monotonic() + 5
    while job.downloaded() < 8192:
        assert time.monotonic() < deadline and job.running(), "the slow body did not arrive"
        time.sleep(0.05)
    assert up.drip_closed_at is None
    job.kill()  # the client vanishes mid-body
    gone = time.monotonic()
    assert job.wait(5).returncode == -signal.SIGKILL
    deadline = gone + 5
    while up.drip_closed_at is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert up.drip_closed_at is not None, "mxsse kept the upstream transfer after its client left"
    print(f"\nMEASURE h1 client gone -> upstream closed in {(up.drip_closed_at - gone) * 1000:.0f} ms")
    assert up.drip_closed_at - gone < 3


def test_client_stream_reset_cancels_upstream_h2(mxsse_factory, fake_upstream):
    up = fake_upstream(lambda path: "drip" if path.endswith("/slow") else "ok")
    m = mxsse_factory(up.url)
    with RawH2("127.0.0.1", m.port) as h2:
        h2.request(1, "GET", "/_matrix/media/v3/download/x/slow")
        h2.read_until(lambda t, f, s, p: t == HEADERS and s == 1)
        h2.read_until(lambda t, f, s, p: t == DATA and s == 1)
        assert up.drip_started.wait(5)
        time.sleep(0.2)
        assert up.drip_closed_at is None, "upstream closed before the client reset its stream"
        h2.reset(1)
        reset_at = time.monotonic()
        deadline = reset_at + 5
        while up.drip_closed_at is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert up.drip_closed_at is not None, "RST_STREAM did not cancel the upstream transfer"
        print(f"\nMEASURE h2 RST_STREAM -> upstream closed in {(up.drip_closed_at - reset_at) * 1000:.0f} ms")
        assert up.drip_closed_at - reset_at < 3
        # The connection itself is fine: another stream on it works.
        h2.request(3, "GET", "/_matrix/client/v3/ok")
        body = b""
        while True:
            t, f, s, p = h2.read_until(lambda t, f, s, p: s == 3 and t in (DATA, RST_STREAM))
            assert t == DATA, "stream 3 was reset"
            body += p
            if f & END_STREAM:
                break
        assert json.loads(body) == {"ok": True}


@pytest.mark.parametrize("mode", ["h2", "h2c", "h1", "h1-tls"])
def test_forwarded_and_hop_by_hop_headers(mode: str, mxsse_factory, fake_upstream):
    up = fake_upstream(lambda path: "hop")
    m = mxsse_factory(up.url)
    tls = CURL_MODES[mode][1]
    base = m.tls_url if tls else m.url
    authority = base.removeprefix("https://").removeprefix("http://")
    curl = Curl.for_mode(mode, cacert=m.cert, interface="127.0.0.2")
    hs = [("x-forwarded-for", "6.6.6.6"), ("x-forwarded-proto", "gopher"),
          ("x-forwarded-host", "evil.example"), ("forwarded", "for=6.6.6.6"),
          ("x-real-ip", "6.6.6.6"), ("cookie", "a=1"), ("cookie", "b=2"),
          ("x-client", "kept")]
    if mode.startswith("h1"):
        # Connection-specific fields only exist in HTTP/1.1.
        hs += [("connection", "keep-alive, x-client-private"), ("x-client-private", "1"),
               ("keep-alive", "timeout=5"), ("te", "trailers"), ("proxy-connection", "keep-alive")]
    r = curl.request("POST", base + "/_matrix/client/v3/hop?q=1", headers=hs, body=b'{"a":1}')
    assert r.returncode == 0 and r.status == 200, r.describe()
    assert r.json() == {"hop": True}

    # What the homeserver got.
    assert up.requests == ["/_matrix/client/v3/hop?q=1"]
    got = up.heads[0]
    names = [k for k, _ in got]
    field = dict(got)
    assert [v for k, v in got if k == "x-forwarded-for"] == ["127.0.0.2"], got
    assert [v for k, v in got if k == "x-forwarded-proto"] == ["https" if tls else "http"], got
    assert [v for k, v in got if k == "x-forwarded-host"] == [authority], got
    assert field.get("host") == authority, got
    for gone in ("forwarded", "x-real-ip", "x-client-private", "keep-alive", "te",
                 "proxy-connection", "upgrade", "http2-settings"):
        assert gone not in names, f"{gone} forwarded upstream: {got}"
    assert field.get("x-client") == "kept"
    assert field.get("content-length") == "7"
    # One Cookie field upstream, as HTTP/1.1 wants (HTTP/2 may split it).
    assert [v for k, v in got if k == "cookie"] == ["a=1; b=2"], got

    # What the client got.
    rnames = [k for k, _ in r.headers]
    for gone in ("keep-alive", "x-upstream-private", "proxy-connection", "upgrade"):
        assert gone not in rnames, f"{gone} forwarded to the client: {r.headers}"
    assert r.header("x-kept") == "yes"


def test_tls_clients_closing_are_not_handshake_failures(mxsse):
    """Completed TLS connections are not handshake failures, even when the
    client closes without close_notify (curl does); a client that rejects
    the certificate is one."""
    key = "mxsse_tls_handshake_failures_total"
    before = mxsse.metrics()[key]
    url = mxsse.tls_url + "/_matrix/client/versions"
    for mode in ("h2", "h1-tls"):
        for _ in range(2):
            r = Curl.for_mode(mode, cacert=mxsse.cert).request("GET", url)
            assert r.status == 200, r.describe()
    assert Nghttp().request("GET", url).status == 200
    time.sleep(0.2)
    assert mxsse.metrics()[key] == before, "completed TLS connections counted as handshake failures"
    r = Curl("2").request("GET", url)  # no --cacert: curl refuses the certificate
    assert r.returncode == 60 and r.status == 0, r.describe()
    deadline = time.monotonic() + 3
    while mxsse.metrics()[key] != before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mxsse.metrics()[key] == before + 1


# --------------------------------------------------------------------------
# 6. The versions document


@pytest.mark.parametrize("mode", ["h2c", "h1"])
def test_versions_advertises_msc2108(mode: str, bed, mxsse):
    direct = http_json("GET", bed.synapse_url + "/_matrix/client/versions")[1]
    r = Curl.for_mode(mode).request("GET", mxsse.url + "/_matrix/client/versions")
    assert r.status == 200, r.describe()
    assert int(r.header("content-length") or len(r.body)) == len(r.body)
    proxied = r.json()
    assert proxied["unstable_features"].pop("org.matrix.msc2108") is True
    assert "org.matrix.msc2108" not in direct["unstable_features"]
    assert proxied == direct


@pytest.mark.parametrize("mode", ["h2c", "h1"])
def test_versions_rewrite_with_compressing_homeserver(mode: str, mxsse_factory, fake_upstream):
    """Homeservers may gzip their answers for clients that accept it (every
    browser does): the rewritten document must still be valid for the
    client, with the homeserver's features and ours."""
    up = fake_upstream(lambda path: "versions-gzip")
    m = mxsse_factory(up.url)
    r = Curl.for_mode(mode).request("GET", m.url + "/_matrix/client/versions",
                                    extra=["--compressed"])
    assert r.returncode == 0 and r.status == 200, r.describe()
    try:
        features = r.json()["unstable_features"]
    except ValueError:
        pytest.fail(f"not JSON for the client (content-encoding={r.header('content-encoding')!r}): "
                    f"{r.body[:40]!r}")
    assert features == {"org.example.fake": True, "org.matrix.msc2108": True}


# --------------------------------------------------------------------------
# 7. SIGTERM drains


def test_sigterm_drains_in_flight(bed, mxsse_factory, stored_big, register, tmp_path: Path):
    media, token, digest = stored_big
    m = mxsse_factory(bed.synapse_url, "--shutdown-grace", "20")
    auth = {"authorization": f"Bearer {token}"}
    alice = register("alice")
    since = alice.sync(timeout=0, set_presence="offline")["next_batch"]

    rate = "25M"  # ~4 s for 100 MB
    downloads = [
        Curl("1.1").start("GET", m.url + media, headers=auth, output=tmp_path / "h1.bin",
                          limit_rate=rate, max_time=30),
        Curl("2", cacert=m.cert).start("GET", m.tls_url + media, headers=auth,
                                        output=tmp_path / "h2.bin", limit_rate=rate, max_time=30),
    ]
    # An HTTP/2 client in a long-poll (nothing happens for alice) sees GOAWAY.
    poll = Nghttp(verbose=True, timeout=30).start(
        "GET", m.url + f"/_matrix/client/v3/sync?timeout=4000&set_presence=offline&since={quote(since)}",
        headers={"authorization": f"Bearer {alice.access_token}"})
    deadline = time.monotonic() + 10
    while not all(d.downloaded() > 1_000_000 for d in downloads) or "recv SETTINGS" not in poll.output():
        assert time.monotonic() < deadline, "downloads did not start"
        time.sleep(0.05)
    time.sleep(0.2)  # the long-poll is at the homeserver by now
    assert all(d.running() for d in downloads), "downloads finished before the signal"

    m.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    refused = {}
    deadline = signalled + 3
    while len(refused) < 2 and time.monotonic() < deadline:
        for port in (m.port, m.tls_port):
            if port not in refused and connect_refused("127.0.0.1", port):
                refused[port] = time.monotonic() - signalled
        time.sleep(0.02)
    assert set(refused) == {m.port, m.tls_port}, f"listeners still accept after SIGTERM: {refused}"

    results = [d.wait(40) for d in downloads]
    for r, name in zip(results, ("h1", "h2")):
        assert r.returncode == 0 and r.status == 200, f"{name}: {r.describe()}"
        assert sha256_file(tmp_path / f"{name}.bin") == digest, name
    lp = poll.wait(40)
    frames = lp.info["frames"]
    assert lp.status == 200, lp.describe() + frames[-2000:]
    assert nghttp_frames(frames, "GOAWAY", "recv"), f"no GOAWAY:\n{frames[-3000:]}"

    code = m.proc.wait(30)
    elapsed = time.monotonic() - signalled
    print(f"\nMEASURE SIGTERM: listeners refused after {max(refused.values()) * 1000:.0f} ms; "
          f"downloads done after {max(r.elapsed for r in results):.1f}s of transfer; "
          f"exit {code} {elapsed:.1f}s after the signal")
    assert code == 0 and elapsed < 20, f"exit {code} after {elapsed:.1f}s"
    m.check_clean_exit()
    log = m.read_log()
    assert "event=shutdown.start" in log and "event=shutdown.done" in log
    assert "shutdown.grace_expired" not in log
