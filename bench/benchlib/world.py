"""The benchmark's users and rooms on a test bed.

N users, R = max(3, N // 10) rooms, each user joined to `rooms_per_user`
of them (a seeded random pick, so a run is reproducible), and one sender
who created every room and posts the messages. With the defaults (N=100,
3 rooms each) a room has about 30 members, so one message is about 30
deliveries.
"""

from __future__ import annotations

import concurrent.futures as cf
import random
import urllib.parse
from dataclasses import dataclass, field

from testbed import Testbed, http_json  # interop/ is on sys.path

# What matrix-js-sdk asks for by default: lazy-loaded members.
SYNC_FILTER = {"room": {"state": {"lazy_load_members": True}}}


def mode_filter(mode: str) -> dict:
    """SYNC_FILTER, made distinct per mode by excluding an account-data type
    nobody sets (the answers are byte for byte the same). Synapse caches a
    /sync answer for 2 minutes keyed by (user, device, filter, since,
    timeout, ...): without this, a mode's initial sync would be answered
    with the previous mode's, from minutes earlier."""
    return {**SYNC_FILTER, "account_data": {"not_types": [f"org.mxsse.bench.{mode}"]}}


@dataclass
class User:
    idx: int
    user_id: str
    token: str
    device_id: str
    filters: dict[str, str] = field(default_factory=dict)  # mode -> filter id
    rooms: list[int] = field(default_factory=list)


@dataclass
class World:
    sender: User
    users: list[User]
    room_ids: list[str]
    members: list[list[int]]  # room index -> user indexes

    def expected_deliveries(self, room_counts: dict[int, int]) -> int:
        return sum(len(self.members[r]) * n for r, n in room_counts.items())


def _check(status: int, body: object, what: str) -> object:
    if status != 200:
        raise RuntimeError(f"{what}: HTTP {status} {body}")
    return body


def build(bed: Testbed, n_users: int, rooms_per_user: int, seed: int, modes: list[str], log) -> World:
    base = bed.synapse_url + "/_matrix/client/v3"
    tag = f"{random.Random().getrandbits(24):06x}"
    n_rooms = max(3, n_users // 10)
    rooms_per_user = min(rooms_per_user, n_rooms)
    rng = random.Random(seed)

    def register(i: int) -> User:
        acct = bed.register(f"bench{tag}-{i}")
        return User(i, acct["user_id"], acct["access_token"], acct["device_id"])

    log(f"registering {n_users} users and a sender (Synapse hashes each password: ~0.2 s per user)")
    with cf.ThreadPoolExecutor(4) as ex:
        users = list(ex.map(register, range(n_users)))
    acct = bed.register(f"bench{tag}-sender")
    sender = User(-1, acct["user_id"], acct["access_token"], acct["device_id"])

    log(f"creating {n_rooms} rooms, {rooms_per_user} per user")
    room_ids = []
    for r in range(n_rooms):
        body = _check(*http_json("POST", base + "/createRoom",
                                 {"preset": "public_chat", "name": f"bench room {r}"},
                                 token=sender.token), "createRoom")
        room_ids.append(body["room_id"])
    members: list[list[int]] = [[] for _ in range(n_rooms)]
    for u in users:
        u.rooms = sorted(rng.sample(range(n_rooms), rooms_per_user))
        for r in u.rooms:
            members[r].append(u.idx)

    def join(u: User) -> None:
        for r in u.rooms:
            rid = urllib.parse.quote(room_ids[r], safe="")
            _check(*http_json("POST", f"{base}/join/{rid}", {}, token=u.token), "join")
        uid = urllib.parse.quote(u.user_id, safe="")
        for mode in modes:
            body = _check(*http_json("POST", f"{base}/user/{uid}/filter", mode_filter(mode),
                                     token=u.token), "filter")
            u.filters[mode] = body["filter_id"]

    with cf.ThreadPoolExecutor(4) as ex:
        list(ex.map(join, users))
    return World(sender, users, room_ids, members)
