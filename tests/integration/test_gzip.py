"""Compressed sync streams (Content-Encoding: gzip) against the real Synapse.

One deflate context per stream, flushed after every frame: each event and
each heartbeat must decode as soon as its bytes arrive. The streams here
use a long heartbeat interval when they check event latency, so an event
held back in the compressor would only come out with the next heartbeat,
far past the deadline. Negotiation, the operator switch, the cap on
streams compressing at once and resume are checked over the wire. The
browser cases (native EventSource, fetch) are in test_browser.py.
"""

from __future__ import annotations

import json
import secrets
import signal
import time
import zlib

import pytest
from conftest import send_text, shared_room
from sseclient import CurlSSE, Retry
from test_sse import (PROTOCOLS, bearer, has_message, message_ids, net,  # noqa: F401
                      sse_target)

GZIP = {"Accept-Encoding": "gzip"}


def gz_headers(alice, extra: dict | None = None) -> dict:
    return {**bearer(alice), **GZIP, **(extra or {})}


def decode_whole(wire: bytes) -> bytes:
    """The wire bytes decoded in one go, independently of the client."""
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(wire)


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_gzip_stream_matches_identity_stream(proto, bed, register, mxsse_factory, net):
    """Two streams of one user side by side, one gzip, one identity: same
    events, same ids, same bytes after decoding; each message arrives
    within seconds although heartbeats are 60 s apart (the event was
    flushed on its own); the gzip stream is smaller on the wire."""
    m = mxsse_factory(bed.synapse_url, "--longpoll-timeout", "10000")
    alice, bob = register("alice"), register("bob")
    room = shared_room(alice, bob)
    ep = net.endpoint(m, proto)
    target = sse_target({"heartbeat_interval": "60"})
    gz = ep.open(target, headers=gz_headers(alice))
    plain = ep.open(target, headers=bearer(alice))
    gz.next_event(30)
    plain.next_event(30)

    assert gz.status == 200, gz.describe()
    assert gz.header("content-encoding") == "gzip"
    assert gz.header("vary") == "Accept-Encoding"
    assert gz.header("cache-control") == "no-cache, no-transform"
    assert gz.header("content-type") == "text/event-stream"
    assert plain.header("content-encoding") is None
    assert plain.header("vary") == "Accept-Encoding"
    assert isinstance(gz.items[0], Retry), gz.items[:2]

    for i in range(3):
        t_send = time.monotonic()
        event_id = send_text(bob, room, f"compressed {proto} {i} " + "lorem ipsum " * i)
        ev = gz.wait_event(has_message(room, event_id), 10)
        assert ev.t - t_send < 5, f"event {i} took {ev.t - t_send:.1f}s: held in the compressor?"
        plain.wait_event(has_message(room, event_id), 10)

    # Both streams got the same batches: same ids and payloads, in order.
    time.sleep(0.5)
    assert [(e.id, e.data) for e in gz.events] == [(e.id, e.data) for e in plain.events]
    # The decoded stream is the identity stream, retry: value aside (jittered).
    def strip_retry(b: bytes) -> bytes:
        assert b.startswith(b"retry: ")
        return b[b.index(b"\n\n") + 2:]
    assert strip_retry(bytes(gz.decoded)) == strip_retry(bytes(plain.body))
    assert decode_whole(bytes(gz.body)) == bytes(gz.decoded)
    assert len(gz.body) < len(plain.body) / 2, (len(gz.body), len(plain.body))
    # Every write of the stream ends with a sync flush (00 00 ff ff).
    assert bytes(gz.body).endswith(b"\x00\x00\xff\xff")

    metrics = m.metrics()
    assert metrics["mxsse_sse_gzip_streams"] == 1
    assert metrics["mxsse_sse_gzip_bytes_out_total"] == len(gz.body)
    assert metrics["mxsse_sse_gzip_bytes_in_total"] == len(gz.decoded)
    assert metrics["mxsse_sse_gzip_memory_bytes"] > 0


@pytest.mark.parametrize("proto", ["h2c", "h1"])
def test_heartbeats_are_flushed(proto, bed, register, mxsse_factory, net):
    """A heartbeat is a tiny flushed deflate block that decodes to ': \\n\\n'
    on arrival, on schedule."""
    m = mxsse_factory(bed.synapse_url)
    alice = register("alice")
    s = net.endpoint(m, proto).open(sse_target({"heartbeat_interval": "1"}),
                                    headers=gz_headers(alice))
    s.next_event(30)
    start = len(s.body)
    time.sleep(3.6)
    assert s.header("content-encoding") == "gzip"
    beats = [c.t for c in s.comments]
    assert len(beats) >= 3, s.comments
    for a, b in zip(beats, beats[1:]):
        assert abs(b - a - 1) <= 0.75, f"heartbeat gap {b - a:.2f}s"
    assert bytes(s.decoded).endswith(b": \n\n")
    # Three or more beats in a dozen bytes each, not a 4 KB block.
    per_beat = (len(s.body) - start) / len(beats)
    assert per_beat <= 12, per_beat


@pytest.mark.parametrize("value,gzip", [
    (None, False),
    ("gzip", True),
    ("GZIP;q=0.5", True),
    ("x-gzip", True),
    ("gzip, deflate, br, zstd", True),
    ("gzip;q=0", False),
    ("gzip;q=0.000, deflate", False),
    ("br", False),
    ("identity", False),
    ("*", True),
    ("*;q=0", False),
    ("gzip;q=0, *", False),
    ("br, *;q=0.3", True),
    ("gzip;q=2", False),
])
def test_negotiation(value, gzip, bed, register, mxsse_factory, net):
    m = mxsse_factory(bed.synapse_url)
    alice = register("alice")
    headers = bearer(alice) if value is None else {**bearer(alice), "Accept-Encoding": value}
    s = net.endpoint(m, "h1").open(sse_target(), headers=headers)
    ev = s.next_event(30)
    assert ev.id == ev.json()["next_batch"]
    assert s.header("content-encoding") == ("gzip" if gzip else None), (value, s.headers)
    assert s.header("vary") == "Accept-Encoding"


def test_several_accept_encoding_fields(bed, register, mxsse_factory, net):
    m = mxsse_factory(bed.synapse_url)
    alice = register("alice")
    headers = [*bearer(alice).items(), ("Accept-Encoding", "br"),
               ("Accept-Encoding", "gzip;q=0.1")]
    s = net.endpoint(m, "h2c").open(sse_target(), headers=headers)
    s.next_event(30)
    assert s.header("content-encoding") == "gzip"


def test_operator_switch_off(bed, register, mxsse_factory, net):
    m = mxsse_factory(bed.synapse_url, "--sse-gzip", "false")
    alice = register("alice")
    s = net.endpoint(m, "h2c").open(sse_target(), headers=gz_headers(alice))
    ev = s.next_event(30)
    assert ev.id
    assert s.header("content-encoding") is None and s.header("vary") is None, s.headers
    assert m.metrics()["mxsse_sse_gzip_streams"] == 0


def test_cap_on_compressing_streams(bed, register, mxsse_factory, net):
    """With --sse-gzip-max-streams 2 a third stream is sent uncompressed
    (counted); once a compressed one ends, the next gets gzip again."""
    m = mxsse_factory(bed.synapse_url, "--sse-gzip-max-streams", "2")
    alice = register("alice")
    ep = net.endpoint(m, "h2c")
    target = sse_target()
    a = ep.open(target, headers=gz_headers(alice))
    b = ep.open(target, headers=gz_headers(alice))
    for s in (a, b):
        s.next_event(30)
    c = ep.open(target, headers=gz_headers(alice))
    c.next_event(30)
    assert [s.header("content-encoding") for s in (a, b, c)] == ["gzip", "gzip", None]
    metrics = m.metrics()
    assert metrics["mxsse_sse_gzip_streams"] == 2
    assert metrics["mxsse_sse_gzip_refused_total"] == 1

    a.close()
    deadline = time.monotonic() + 10
    while m.metrics()["mxsse_sse_gzip_streams"] != 1:
        assert time.monotonic() < deadline, "closed stream still counted"
        time.sleep(0.05)
    d = ep.open(target, headers=gz_headers(alice))
    d.next_event(30)
    assert d.header("content-encoding") == "gzip"
    assert m.metrics()["mxsse_sse_gzip_refused_total"] == 1


@pytest.mark.parametrize("proto", ["h2c", "h1-tls"])
def test_resume_starts_a_new_context(proto, bed, register, mxsse_factory, net):
    """A reconnect with Last-Event-ID is a new gzip stream from its first
    byte (its own header, no reference to the old connection's window),
    and continues exactly after the last event."""
    m = mxsse_factory(bed.synapse_url, "--longpoll-timeout", "10000")
    alice, bob = register("alice"), register("bob")
    room = shared_room(alice, bob)
    ep = net.endpoint(m, proto)
    first = ep.open(sse_target({"heartbeat_interval": "60"}), headers=gz_headers(alice))
    first.next_event(30)
    e1 = send_text(bob, room, "before the reconnect " + secrets.token_hex(4))
    last = first.wait_event(has_message(room, e1), 10)
    first.close()
    # Its reader thread must be gone before a new socket can reuse its fd.
    assert first.wait(lambda: first.done, 10)

    e2 = send_text(bob, room, "while away " + secrets.token_hex(4))
    second = ep.open(sse_target({"heartbeat_interval": "60"}),
                     headers=gz_headers(alice, {"Last-Event-ID": last.id}))
    ev = second.wait_event(has_message(room, e2), 30)
    assert second.header("content-encoding") == "gzip"
    wire = bytes(second.body)
    assert wire[:3] == b"\x1f\x8b\x08", "not a gzip member of its own"
    assert decode_whole(wire).startswith(b"retry: ")
    assert ev.id == ev.json()["next_batch"]
    got = message_ids(second.events, room)
    assert e2 in got and e1 not in got, got


def test_sigterm_ends_gzip_stream_with_trailer(bed, register, mxsse_factory, net):
    """On shutdown the compressed stream ends with the gzip trailer (CRC-32,
    length), so strict decoders accept the body as complete; curl included."""
    m = mxsse_factory(bed.synapse_url)
    alice = register("alice")
    target = sse_target({"heartbeat_interval": "1"})
    h1 = net.endpoint(m, "h1").open(target, headers=gz_headers(alice))
    h2 = net.endpoint(m, "h2c").open(target, headers=gz_headers(alice))
    curl = net.keep(CurlSSE(m.url + target, mode="h2c", headers=gz_headers(alice)).start())
    for s in (h1, h2, curl):
        s.next_event(30)
    m.proc.send_signal(signal.SIGTERM)
    for s in (h1, h2, curl):
        s.wait_end(20)
        assert s.ended_cleanly, s.describe()
        assert s.header("content-encoding") == "gzip"
        assert s.inflater is not None and s.inflater.eof, "gzip stream without its trailer"
        assert s.inflater.unused_data == b""
    m.proc.wait(30)
    m.check_clean_exit()


# --------------------------------------------------------------------------
# Chromium: native EventSource and fetch() decode the stream as it comes

from test_browser import (MODES, browsers, has_body, header, page_origin,  # noqa: E402,F401
                          room, send, sse_requests, sse_url)


@pytest.mark.parametrize("mode", list(MODES))
def test_chromium_eventsource_and_fetch_get_gzip(mode, bed, room, mxsse_factory, browsers,
                                                 page_origin):
    """Chromium offers gzip on its own. EventSource (heartbeats a minute
    apart) shows each message within seconds: the event was decodable on
    arrival. fetch() on another page reads the same stream with heartbeats
    every second: the network stack hands each heartbeat to the page as a
    4-byte decoded piece, so they were flushed one by one."""
    listener, flags, browser_proto, _ = MODES[mode]
    alice, bob, room_id = room
    m = mxsse_factory(bed.synapse_url, "--sse-retry", "500")
    base = getattr(m, listener)

    es_page = browsers(flags).open(page_origin + "/page.html")
    es_page.eval(f"startEventSource({json.dumps(sse_url(base, alice.access_token, heartbeat_interval=60))})")
    es_page.wait("window.sse.opens === 1 && window.sse.events.length >= 1")
    for i in range(2):
        body = f"gzip over {mode} #{i} {secrets.token_hex(4)}"
        t0 = time.monotonic()
        send(bob, room_id, body)
        es_page.wait(has_body(room_id, body), timeout=10)
        assert time.monotonic() - t0 < 5
    (req,) = sse_requests(es_page)
    assert req["protocol"] == browser_proto, req
    assert "gzip" in (header(req, "accept-encoding") or ""), req["headers"]
    assert {k.lower(): v for k, v in req["responseHeaders"].items()}.get(
        "content-encoding") == "gzip", req["responseHeaders"]
    state = es_page.state()
    assert state["errors"] == [] and state["opens"] == 1, state
    es_page.close()

    f_page = browsers(flags).open(page_origin + "/page.html")
    url = f"{base}{SSE_PATH_Q}heartbeat_interval=1"
    f_page.eval(f"void startFetch({json.dumps(url)}, {json.dumps(alice.access_token)}, null)")
    f_page.wait("window.fetchState.status === 200 && window.sse.events.length >= 1")
    time.sleep(3.5)
    body = f"fetch gzip over {mode} {secrets.token_hex(4)}"
    send(bob, room_id, body)
    f_page.wait(has_body(room_id, body), timeout=10)
    (req,) = sse_requests(f_page)
    assert {k.lower(): v for k, v in req["responseHeaders"].items()}.get(
        "content-encoding") == "gzip", req["responseHeaders"]
    decoded = [p[0] for p in req.get("pieces", [])]
    assert decoded.count(4) >= 2, f"heartbeats not seen as their own pieces: {decoded}"
    f_page.close()


SSE_PATH_Q = "/_matrix/client/v3/sync/sse?"
