#!/usr/bin/env python3
"""Writes the seed corpora of the front's fuzz targets (fuzz_h1_session,
fuzz_h2_session, fuzz_sse_params, fuzz_router_path, fuzz_upstream_head)
into tests/fuzz/corpus/. HTTP/2 seeds are frames, hard to edit by hand:
change them here and rerun. Inputs libFuzzer found (crashes, fixed) are
added to the corpus directories directly, not here.

Input layouts: tests/fuzz/session.h (h1, h2: a flags byte, a piece-size
seed byte, then the client's bytes after the connection preface), the
comments at the top of fuzz_sse_params.c and fuzz_upstream_head.c.
"""
import os
import struct

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def w(d, name, data):
    if isinstance(data, str):
        data = data.encode("latin1")
    os.makedirs(os.path.join(CORPUS, d), exist_ok=True)
    with open(os.path.join(CORPUS, d, name), "wb") as f:
        f.write(data)


# --- HTTP/1.1 ---
d = "fuzz_h1_session"
H = b"\x00\x00"
w(d, "get_404", H + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
w(d, "pipelined", H + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /_matrix/../x HTTP/1.1\r\n\r\nGET /_matrix/client/v3/sync/sse HTTP/1.1\r\nHost: x\r\n\r\nPOST /_matrix/client/v3/sync/sse HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
w(d, "sse_stream", b"\x04\x00GET /_matrix/client/v3/sync/sse?access_token=syt_a&heartbeat_interval=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: fuzz\r\n\r\n")
w(d, "sse_stream_bytewise", b"\x00\x00GET /_matrix/client/unstable/org.matrix.msc2108/sync/sse HTTP/1.1\r\nAuthorization: Bearer syt_b\r\nLast-Event-ID: s1\r\n\r\n")
w(d, "admin", b"\x01\x07GET /metrics HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\nGET /readyz HTTP/1.1\r\n\r\nPOST /healthz HTTP/1.1\r\nContent-Length: 1\r\n\r\nxGET /nope HTTP/1.1\r\n\r\n")
w(d, "admin_head", b"\x01\x00HEAD /healthz HTTP/1.1\r\n\r\nHEAD /nope HTTP/1.1\r\n\r\n")
w(d, "proxy_chunked", b"\x00\x03POST /_matrix/client/v3/rooms/x/send/m.room.message/1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, x-drop\r\nX-Drop: 1\r\nCookie: a=1\r\nCookie: b=2\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
w(d, "expect_continue", b"\x00\x09PUT /_matrix/client/v3/profile/x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc")
w(d, "http10", b"\x00\x00GET /nope HTTP/1.0\r\n\r\nGET /_matrix/client/v3/sync/sse?access_token=a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
w(d, "not_http", b"\x04\x00\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
w(d, "over_limit", b"\x02\x00GET /nope HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\n")
w(d, "many_headers", b"\x04\x00GET /nope HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(120)) + b"\r\n")
w(d, "long_target", b"\x04\x00GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
w(d, "options_preflight", b"\x00\x05OPTIONS /_matrix/client/v3/sync/sse HTTP/1.1\r\nOrigin: https://app\r\n\r\nOPTIONS * HTTP/1.1\r\n\r\nCONNECT x:443 HTTP/1.1\r\n\r\n")
w(d, "bad_requests", b"\x00\x00GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx")
w(d, "absolute_form", b"\x00\x00GET http://x/_matrix/client/versions HTTP/1.1\r\n\r\n")
w(d, "versions", b"\x04\x00GET /_matrix/client/versions HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\nGET /.well-known/matrix/client HTTP/1.1\r\n\r\n")
w(d, "upload_big", b"\x00\x11POST /_matrix/media/v3/upload HTTP/1.1\r\nContent-Length: 70000\r\n\r\n" + b"z" * 70000)


# --- HTTP/2 (frames after the preface; HPACK literals, no Huffman) ---
def frame(t, fl, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([t, fl]) + struct.pack(">I", sid) + payload


def hint(n, prefix, first=0):
    mx = (1 << prefix) - 1
    if n < mx:
        return bytes([first | n])
    out = [first | mx]
    n -= mx
    while n >= 128:
        out.append((n & 127) | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


def hstr(s):
    if isinstance(s, str):
        s = s.encode("latin1")
    return hint(len(s), 7) + s


def hblock(hs):
    return b"".join(b"\x00" + hstr(k) + hstr(v) for k, v in hs)


def req(method, path, extra=(), auth="x"):
    return hblock([(":method", method), (":scheme", "http"), (":path", path), (":authority", auth)] + list(extra))


SETTINGS = frame(4, 0, 0)
ACK = frame(4, 1, 0)
ES, EH = 1, 4
d = "fuzz_h2_session"
w(d, "get_404", b"\x04\x00" + SETTINGS + frame(1, ES | EH, 1, req("GET", "/nope")))
w(d, "sse_stream", b"\x00\x02" + SETTINGS + ACK + frame(1, ES | EH, 1, req("GET", "/_matrix/client/v3/sync/sse?access_token=syt_a&heartbeat_interval=1", [("user-agent", "fuzz")])) + frame(8, 0, 0, struct.pack(">I", 65535)) + frame(6, 0, 0, b"12345678"))
w(d, "sse_small_window", b"\x04\x00" + frame(4, 0, 0, struct.pack(">HI", 4, 16)) + frame(1, ES | EH, 1, req("GET", "/_matrix/client/r0/sync/sse", [("authorization", "Bearer syt_b"), ("last-event-id", "s1")])) + frame(8, 0, 1, struct.pack(">I", 100)) + frame(8, 0, 1, struct.pack(">I", 1000)))
w(d, "post_proxy", b"\x00\x05" + SETTINGS + frame(1, EH, 1, req("POST", "/_matrix/client/v3/rooms/x/send/m.room.message/1", [("content-length", "5"), ("cookie", "a=1"), ("cookie", "b=2")])) + frame(0, ES, 1, b"hello"))
w(d, "trailers", b"\x04\x00" + SETTINGS + frame(1, EH, 1, req("PUT", "/_matrix/client/v3/x")) + frame(0, 0, 1, b"abc") + frame(1, ES | EH, 1, hblock([("x-trailer", "1")])))
hb = req("GET", "/nope", [("x-pad", "p" * 200)])
w(d, "continuation", b"\x04\x00" + SETTINGS + frame(1, ES, 1, hb[:50]) + frame(9, 0, 1, hb[50:120]) + frame(9, EH, 1, hb[120:]))
w(d, "rst_stream", b"\x04\x00" + SETTINGS + frame(1, ES | EH, 1, req("GET", "/_matrix/client/v3/sync/sse?access_token=a")) + frame(3, 0, 1, struct.pack(">I", 8)) + frame(1, ES | EH, 3, req("GET", "/nope")))
w(d, "goaway", b"\x04\x00" + SETTINGS + frame(1, ES | EH, 1, req("GET", "/nope")) + frame(7, 0, 0, struct.pack(">II", 1, 0)))
w(d, "admin", b"\x05\x00" + SETTINGS + frame(1, ES | EH, 1, req("GET", "/metrics")) + frame(1, ES | EH, 3, req("HEAD", "/readyz")) + frame(1, ES | EH, 5, req("POST", "/healthz")))
w(d, "many_streams", b"\x00\x07" + SETTINGS + b"".join(frame(1, ES | EH, 2 * i + 1, req("GET", p)) for i, p in enumerate(["/_matrix/../x", "/_matrix/client/v3/sync/sse", "/_matrix/client/v3/sync/sse?access_token=a&heartbeat_interval=0", "/_matrix/client/v3/sync/sse?access_token=a&full_state=maybe", "/x/%2e%2e/y"])))
w(d, "options", b"\x04\x00" + SETTINGS + frame(1, ES | EH, 1, req("OPTIONS", "/_matrix/client/v3/sync/sse")) + frame(2, 0, 3, struct.pack(">IB", 1, 16)) + frame(1, ES | EH | 0x20, 3, struct.pack(">IB", 0, 200) + req("DELETE", "/_matrix/client/v3/sync/sse")))
w(d, "bad_stream_id", b"\x04\x00" + SETTINGS + frame(1, ES | EH, 2, req("GET", "/nope")))
w(d, "over_limit", b"\x06\x00" + SETTINGS + frame(1, ES | EH, 1, req("GET", "/nope")))
w(d, "big_header", b"\x04\x00" + SETTINGS + frame(1, ES | EH, 1, req("GET", "/nope", [("x-big", "b" * 16000)])))
w(d, "padded_data", b"\x04\x00" + SETTINGS + frame(1, EH, 1, req("POST", "/_matrix/client/v3/x")) + frame(0, ES | 8, 1, b"\x04data\x00\x00\x00\x00"))
w(d, "window_flood", b"\x04\x00" + SETTINGS + b"".join(frame(8, 0, 0, struct.pack(">I", 1)) for _ in range(20)) + frame(6, 0, 0, b"x" * 8) * 5)

# --- SSE parameters ---
d = "fuzz_sse_params"
w(d, "query_token", b"\x00access_token=syt_a&filter=0&set_presence=offline")
w(d, "bearer", b"\x01filter=%7B%7D\nBearer syt_b")
w(d, "encoded_names", b"\x00access%5Ftoken=syt_a&tim%65out=0&sinc%65=s0&full%5Fstate=true&access_token=syt_c")
w(d, "last_event_id", b"\x03heartbeat_interval=10&full_state=true&since=s0\nBearer syt_d\ns5")
w(d, "bad_heartbeat", b"\x00access_token=a&heartbeat_interval=0x10")
w(d, "mixing", b"\x01access_token=a\nBearer b")
w(d, "bad_since", b"\x00access_token=a&since=%01")
w(d, "bad_full_state", b"\x04access_token=a&full_state=maybe")
w(d, "too_many", b"\x00access_token=a&" + b"&".join(b"p%d=1" % i for i in range(70)))
w(d, "malformed_token", b"\x00access_token=%zz")
w(d, "plus_and_empty", b"\x00access_token=a+b&&=&x&set_presence=online&filter=")

# --- router paths ---
d = "fuzz_router_path"
for name, p in [("parent", "/_matrix/client/v3/../../admin"), ("encoded", "/_matrix/%2e%2E/x"),
                ("dots_in_query", "/_matrix/client/v3/sync?x=../.."), ("encoded_slash", "/_matrix/.%2e%2fadmin"),
                ("well_known", "/.well-known/matrix/server"), ("versions", "/_matrix/client/versions"),
                ("current", "/nope/./x"), ("sse", "/_matrix/client/v3/sync/sse?access_token=a"),
                ("triple", "/_matrix/.../x"), ("malformed", "/_matrix/%2/%%2e/.%2"), ("empty", "")]:
    w(d, name, p)

# --- upstream response heads (a flags byte, then the lines) ---
d = "fuzz_upstream_head"
w(d, "ok", b"\x00HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n")
w(d, "interim", b"\x00HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nX: y\r\n\r\n")
w(d, "fold", b"\x00HTTP/1.1 200 OK\r\nX: a\r\n  b \r\nY:\r\n\tc\r\n\r\n")
w(d, "bad_status", b"\x00HTTP/1.1 2000 OK\r\n")
w(d, "bare_lf", b"\x02HTTP/1.0 204 No Content\nA:b\n\n")
w(d, "nul", b"\x00HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n")
w(d, "too_large", b"\x00HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(170)) + b"\r\n")
w(d, "trailers", b"\x03HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nX-Trailer: 1\r\n\r\n")
w(d, "bad_name", b"\x00HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n")
w(d, "short_status", b"\x00HTTP/1.1 200\r\n\r\n")
w(d, "fold_first", b"\x00HTTP/1.1 502 Bad Gateway\r\n folded: x\r\n\r\n")
w(d, "cr_inside", b"\x00HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n")
