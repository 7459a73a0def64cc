#!/usr/bin/env python3
"""Observe how Synapse's presence reacts to what a relay publishes.

Runs scenarios side by side on a running bed (`interop/testbed up --dir D`),
each with its own user, all watched by one room-mate who polls
`GET /_matrix/client/v3/presence/{user}/status` every `--poll` seconds, and
prints, per scenario, every change of (presence, currently_active) with the
seconds since the scenario's reference point (the "end" of what it did).

  interop/presence_probe.py --dir D [--only NAME ...] [--seconds S]

Scenarios (docs/presence.md records what they showed):
  control       one /sync?timeout=0&set_presence=online, then nothing
  user_sync     that /sync, then USER_SYNC start re-sent every 60 s, no set_state
  user_sync_once that /sync, one USER_SYNC start from an instance never heard again
  relay         that /sync, USER_SYNC start, set_state every 45 s for 150 s, then end
  set_state     presence_set_state every 45 s for 150 s, no USER_SYNC, then nothing
  keepalive     USER_SYNC start, /sync?timeout=0 every 45 s for 150 s, then end

Publishing uses the bed's `mxsse-presence` Redis account; set_state uses
the bed's replication listener and worker_replication_secret.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import sys
import threading
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testbed import LOOPBACK, Testbed, http_json  # noqa: E402


def resp_command(*args: str) -> bytes:
    parts = [a.encode() for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class Publisher:
    """One Redis connection as the bed's presence account (PUBLISH only)."""

    def __init__(self, bed: Testbed):
        u = bed.redis_users["presence"]
        self.channel = bed.server_name
        self.sock = socket.create_connection((LOOPBACK, bed.redis_port), timeout=5)
        self.lock = threading.Lock()
        reply = self._call("AUTH", u["user"], u["password"])
        if reply != b"+OK":
            raise RuntimeError(f"AUTH failed: {reply!r}")

    def _call(self, *args: str) -> bytes:
        with self.lock:
            self.sock.sendall(resp_command(*args))
            buf = b""
            while not buf.endswith(b"\r\n"):
                buf += self.sock.recv(4096)
            return buf.strip()

    def publish(self, line: str) -> int:
        reply = self._call("PUBLISH", self.channel, line)
        if not reply.startswith(b":"):
            raise RuntimeError(f"PUBLISH refused: {reply!r}")
        return int(reply[1:])

    def close(self) -> None:
        self.sock.close()


def now_ms() -> int:
    return int(time.time() * 1000)


def user_sync(pub: Publisher, instance: str, user: dict, start: bool) -> None:
    pub.publish(f"USER_SYNC {instance} {user['user_id']} {user['device_id']} "
                f"{'start' if start else 'end'} {now_ms()}")


def set_state(bed: Testbed, user: dict, presence: str = "online", secret: str | None = None) -> int:
    url = (f"{bed.replication_url}/_synapse/replication/presence_set_state/"
           f"{urllib.parse.quote(user['user_id'], safe='')}")
    status, _ = http_json("POST", url, {"device_id": user["device_id"], "state": {"presence": presence},
                                        "force_notify": False, "is_sync": True},
                          headers={"Authorization": f"Bearer {secret or bed.replication_secret}"})
    return status


def quick_sync(bed: Testbed, user: dict, presence: str = "online") -> None:
    status, _ = http_json("GET", f"{bed.synapse_url}/_matrix/client/v3/sync?timeout=0&set_presence={presence}",
                          token=user["access_token"])
    assert status == 200, status


def presence_of(bed: Testbed, viewer: dict, user_id: str) -> tuple[str, bool]:
    status, body = http_json("GET", f"{bed.synapse_url}/_matrix/client/v3/presence/"
                             f"{urllib.parse.quote(user_id, safe='')}/status", token=viewer["access_token"])
    assert status == 200, (status, body)
    return body["presence"], bool(body.get("currently_active"))


class Scenario:
    def __init__(self, name: str, bed: Testbed, pub: Publisher, user: dict):
        self.name, self.bed, self.pub, self.user = name, bed, pub, user
        self.t0 = time.monotonic()
        self.ref: float | None = None  # "end" of what the scenario did
        self.events: list[tuple[float, str]] = []

    def note(self, what: str) -> None:
        self.events.append((round(time.monotonic() - self.t0, 1), what))

    def run(self) -> None:
        bed, pub, u, inst = self.bed, self.pub, self.user, f"probe-{self.name}-{secrets.token_hex(3)}"
        if self.name != "set_state":
            quick_sync(bed, u)
            self.note("sync")
        if self.name in ("user_sync", "user_sync_once", "relay", "keepalive"):
            user_sync(pub, inst, u, True)
            self.note("start")
        if self.name == "user_sync":
            while time.monotonic() - self.t0 < 400:
                time.sleep(60)
                user_sync(pub, inst, u, True)
        if self.name in ("relay", "set_state", "keepalive"):
            for i in range(4):  # at 0, 45, 90, 135 s; the end 15 s later
                if self.name == "keepalive":
                    quick_sync(bed, u)
                    self.note("keepalive sync")
                else:
                    assert set_state(bed, u) == 200
                    self.note("set_state")
                time.sleep(45 if i < 3 else 15)
            if self.name != "set_state":
                user_sync(pub, inst, u, False)
                self.note("end")
        self.ref = time.monotonic()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--seconds", type=float, default=420)
    ap.add_argument("--poll", type=float, default=2)
    args = ap.parse_args()
    bed = Testbed(args.dir)
    names = args.only or ["control", "user_sync", "user_sync_once", "relay", "set_state", "keepalive"]
    viewer = bed.register(f"viewer-{secrets.token_hex(3)}")
    users = {n: bed.register(f"{n.replace('_', '')}-{secrets.token_hex(3)}") for n in names}
    room = http_json("POST", f"{bed.synapse_url}/_matrix/client/v3/createRoom",
                     {"preset": "public_chat"}, token=viewer["access_token"])[1]["room_id"]
    for u in users.values():
        http_json("POST", f"{bed.synapse_url}/_matrix/client/v3/join/{urllib.parse.quote(room)}", {},
                  token=u["access_token"])
    # A wrong secret must be refused.
    wrong = set_state(bed, next(iter(users.values())), secret="wrong")
    pub = Publisher(bed)
    scen = {n: Scenario(n, bed, pub, users[n]) for n in names}
    threads = [threading.Thread(target=s.run, daemon=True) for s in scen.values()]
    for t in threads:
        t.start()
    last: dict[str, tuple[str, bool]] = {}
    t_end = time.monotonic() + args.seconds
    while time.monotonic() < t_end:
        for n, s in scen.items():
            p = presence_of(bed, viewer, s.user["user_id"])
            if last.get(n) != p:
                last[n] = p
                s.note(f"{p[0]} active={p[1]}" + (f" (+{time.monotonic() - s.ref:.1f}s after end)"
                                                   if s.ref else ""))
        time.sleep(args.poll)
    pub.close()
    print(json.dumps({"wrong_secret_status": wrong,
                      "scenarios": {n: s.events for n, s in scen.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
