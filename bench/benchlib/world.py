"""The benchmark's users, devices and rooms on a test bed, built once and
kept as a template.

N users in rooms of 10-50 members (sizes drawn from the seed), each user
in `rooms_per_user` of them, so with N=1000 and 3 rooms each about 100
rooms of ~30 members: one message is ~30 users' deliveries. A share of
the users (`two_devices`, 20% by default) log in a second device: each
device is one sync client with its own token and stream. One sender
created every room and posts the messages.

Registering 1000 users costs Synapse ~0.2 s of password hashing each, and
the joins and filters minutes more, so a world is built once and kept:
the stopped bed's PostgreSQL cluster (with the Synapse signing key it was
made with) and `world.json` (tokens, rooms, filter ids) go to
`${MXSSE_CACHE:-~/.cache/mxsse}/bench-worlds/<key>`, and the next run
starts its bed from that cluster instead of the empty migrated template
(`Testbed.db_template`). The key covers everything that shapes the world
(users, layout, seed, devices, filters, the Synapse/PostgreSQL template);
a cached world that does not check out on the new bed (a token refused,
a membership or filter missing) is deleted and rebuilt.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import random
import shutil
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

from testbed import Testbed, cache_dir, http_json  # interop/ is on sys.path

# Bump when build() changes what a world holds: old caches are then unused.
WORLD_FORMAT = 1

# What matrix-js-sdk asks for by default: lazy-loaded members.
SYNC_FILTER = {"room": {"state": {"lazy_load_members": True}}}

# Every mode gets its own filter (see mode_filter); made for all of them,
# so that the cached world does not depend on --modes.
FILTER_NAMES = ("warmup", "direct", "longpoll", "replication", "relay", "relay-keepalive", "memory")


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
    password: str = ""
    filters: dict[str, str] = field(default_factory=dict)  # mode -> filter id
    rooms: list[int] = field(default_factory=list)


@dataclass
class Device:
    """One sync client: a user's device with its own access token."""

    idx: int       # client index (deliveries are counted per device)
    user: int      # index into World.users
    token: str
    device_id: str


@dataclass
class World:
    sender: User
    users: list[User]
    room_ids: list[str]
    members: list[list[int]]  # room index -> user indexes
    devices: list[Device] = field(default_factory=list)

    def devices_in_room(self, r: int) -> int:
        per_user = self._per_user()
        return sum(per_user[u] for u in self.members[r])

    def _per_user(self) -> list[int]:
        counts = [0] * len(self.users)
        for d in self.devices:
            counts[d.user] += 1
        return counts

    def expected_deliveries(self, room_counts: dict[int, int]) -> int:
        """Each message reaches every device of every member of its room."""
        per_user = self._per_user()
        return sum(sum(per_user[u] for u in self.members[r]) * n for r, n in room_counts.items())

    def describe(self) -> str:
        sizes = [len(m) for m in self.members]
        two = sum(1 for c in self._per_user() if c > 1)
        return (f"{len(self.users)} users ({two} with two devices: {len(self.devices)} clients) in "
                f"{len(self.room_ids)} rooms of {min(sizes)}-{max(sizes)} members")

    def to_json(self) -> dict:
        return {"sender": asdict(self.sender), "users": [asdict(u) for u in self.users],
                "room_ids": self.room_ids, "members": self.members,
                "devices": [asdict(d) for d in self.devices]}

    @classmethod
    def from_json(cls, j: dict) -> "World":
        return cls(User(**j["sender"]), [User(**u) for u in j["users"]], j["room_ids"],
                   j["members"], [Device(**d) for d in j["devices"]])


def _check(status: int, body: object, what: str) -> object:
    if status != 200:
        raise RuntimeError(f"{what}: HTTP {status} {body}")
    return body


def _retry(fn, tries: int = 3):
    """fn() again after a failure (a join or filter under load can time
    out; both are idempotent), up to `tries` times."""
    for k in range(tries):
        try:
            return fn()
        except (OSError, RuntimeError):
            if k == tries - 1:
                raise
            time.sleep(1 + k)


# --------------------------------------------------------------------------
# layout (pure: the same seed gives the same world)


def layout(n_users: int, rooms_per_user: int, size_min: int, size_max: int, two_devices: float,
           seed: int) -> tuple[list[list[int]], list[int]]:
    """(members of each room, users with a second device).

    Room sizes are drawn uniformly from [size_min, size_max] until they
    hold n_users * rooms_per_user seats, then trimmed to exactly that; the
    seats go to the users with the most rooms still to join (random among
    equals), biggest room first, so that every user is in exactly
    rooms_per_user rooms and never twice in one."""
    rng = random.Random(seed)
    size_max = max(1, min(size_max, n_users))
    size_min = max(1, min(size_min, size_max))
    seats = n_users * rooms_per_user
    sizes: list[int] = []
    while sum(sizes) < seats:
        sizes.append(rng.randint(size_min, size_max))
    i = 0
    while sum(sizes) > seats:
        j = i % len(sizes)
        if sizes[j] > size_min:
            sizes[j] -= 1
        elif all(s <= size_min for s in sizes):
            sizes.pop()
        i += 1
    i = 0
    while sum(sizes) < seats:  # only after popping a room
        j = i % len(sizes)
        if sizes[j] < size_max:
            sizes[j] += 1
        i += 1
    left = [rooms_per_user] * n_users
    members: list[list[int]] = [[] for _ in sizes]
    for r in sorted(range(len(sizes)), key=lambda r: -sizes[r]):
        ranked = sorted((u for u in range(n_users) if left[u] > 0), key=lambda u: (-left[u], rng.random()))
        for u in ranked[:sizes[r]]:
            members[r].append(u)
            left[u] -= 1
    for m in members:
        m.sort()
    second = sorted(rng.sample(range(n_users), round(two_devices * n_users)))
    return members, second


# --------------------------------------------------------------------------
# building on a bed


def build(bed: Testbed, n_users: int, rooms_per_user: int, size_min: int, size_max: int,
          two_devices: float, seed: int, log) -> World:
    base = bed.synapse_url + "/_matrix/client/v3"
    tag = f"{random.Random().getrandbits(24):06x}"
    members, second = layout(n_users, rooms_per_user, size_min, size_max, two_devices, seed)

    def register(i: int) -> User:
        acct = bed.register(f"bench{tag}-{i}")
        return User(i, acct["user_id"], acct["access_token"], acct["device_id"], acct["password"])

    t0 = time.monotonic()
    log(f"registering {n_users} users and a sender (Synapse hashes each password: ~0.2 s per user)")
    with cf.ThreadPoolExecutor(4) as ex:
        users = list(ex.map(register, range(n_users)))
    acct = bed.register(f"bench{tag}-sender")
    sender = User(-1, acct["user_id"], acct["access_token"], acct["device_id"])
    for r, m in enumerate(members):
        for u in m:
            users[u].rooms.append(r)

    def login(u: User) -> tuple[str, str]:
        body = _check(*http_json("POST", base + "/login", {
            "type": "m.login.password", "identifier": {"type": "m.id.user", "user": u.user_id},
            "password": u.password, "initial_device_display_name": "bench second device"}), "login")
        return body["access_token"], body["device_id"]

    log(f"logging in a second device for {len(second)} users")
    with cf.ThreadPoolExecutor(4) as ex:
        logins = list(ex.map(lambda i: login(users[i]), second))
    devices = [Device(u.idx, u.idx, u.token, u.device_id) for u in users]
    for i, (tok, dev) in zip(second, logins):
        devices.append(Device(len(devices), i, tok, dev))

    log(f"creating {len(members)} rooms")
    room_ids = []
    for r in range(len(members)):
        body = _check(*http_json("POST", base + "/createRoom",
                                 {"preset": "public_chat", "name": f"bench room {r}"},
                                 token=sender.token), "createRoom")
        room_ids.append(body["room_id"])

    def join(u: User) -> None:
        for r in u.rooms:
            rid = urllib.parse.quote(room_ids[r], safe="")
            _retry(lambda: _check(*http_json("POST", f"{base}/join/{rid}", {}, token=u.token), "join"))
        uid = urllib.parse.quote(u.user_id, safe="")
        for mode in FILTER_NAMES:
            body = _retry(lambda: _check(*http_json("POST", f"{base}/user/{uid}/filter", mode_filter(mode),
                                                    token=u.token), "filter"))
            u.filters[mode] = body["filter_id"]

    log(f"joining {sum(map(len, members))} memberships, {len(FILTER_NAMES)} filters per user")
    with cf.ThreadPoolExecutor(8) as ex:  # joins wait on the database more than on CPU
        list(ex.map(join, users))
    log(f"world built in {time.monotonic() - t0:.0f} s")
    return World(sender, users, room_ids, members, devices)


def check(bed: Testbed, w: World, sample: int = 25) -> str | None:
    """None if the world is whole on this bed, else what is wrong: every
    device's token must still name its user and device, and a sample of
    users must be in exactly their rooms with their filters."""
    base = bed.synapse_url + "/_matrix/client/v3"

    def whoami(d: Device) -> str | None:
        st, body = http_json("GET", base + "/account/whoami", token=d.token)
        u = w.users[d.user]
        if st != 200 or body.get("user_id") != u.user_id or body.get("device_id") != d.device_id:
            return f"device {d.idx}: whoami HTTP {st}"
        return None

    with cf.ThreadPoolExecutor(4) as ex:
        bad = [x for x in ex.map(whoami, w.devices) if x]
    if bad:
        return f"{len(bad)} tokens refused, e.g. {bad[0]}"
    st, body = http_json("GET", base + "/account/whoami", token=w.sender.token)
    if st != 200:
        return f"sender token refused: HTTP {st}"
    rng = random.Random(0)
    for u in rng.sample(w.users, min(sample, len(w.users))):
        st, body = http_json("GET", base + "/joined_rooms", token=u.token)
        if st != 200 or sorted(body.get("joined_rooms", [])) != sorted(w.room_ids[r] for r in u.rooms):
            return f"user {u.idx}: joined rooms differ (HTTP {st})"
        uid = urllib.parse.quote(u.user_id, safe="")
        for mode, fid in u.filters.items():
            st, _ = http_json("GET", f"{base}/user/{uid}/filter/{fid}", token=u.token)
            if st != 200:
                return f"user {u.idx}: filter {mode} HTTP {st}"
    return None


# --------------------------------------------------------------------------
# the cache


def cache_key(n_users: int, rooms_per_user: int, size_min: int, size_max: int, two_devices: float,
              seed: int, server_name: str) -> str:
    spec = {"format": WORLD_FORMAT, "users": n_users, "rooms_per_user": rooms_per_user,
            "room_size": [size_min, size_max], "two_devices": two_devices, "seed": seed,
            "filters": [mode_filter(m) for m in FILTER_NAMES], "server_name": server_name,
            "template": Testbed.template_key()}
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"n{n_users}-s{seed}-{h}"


def cache_root() -> Path:
    return cache_dir() / "bench-worlds"


def cached(key: str) -> tuple[Path, World] | None:
    """The cached world for `key`, if complete and readable."""
    d = cache_root() / key
    try:
        meta = json.loads((d / "world.json").read_text())
        if meta.get("key") != key or not (d / "data" / "PG_VERSION").exists() \
                or not (d / "signing.key").exists():
            return None
        return d, World.from_json(meta["world"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(bed: Testbed, w: World, key: str) -> Path:
    """Keeps a stopped bed's cluster and Synapse key as the world's
    template (published atomically: a half-written one is never used)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    dst = root / key
    tmp = root / f"{key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.copytree(bed.dir / "pg" / "data", tmp / "data", symlinks=True)
    (tmp / "data" / "postmaster.pid").unlink(missing_ok=True)
    shutil.copy(bed.dir / "synapse" / "signing.key", tmp / "signing.key")
    (tmp / "world.json").write_text(json.dumps({
        "key": key, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "world": w.to_json()}))
    drop(key)
    os.rename(tmp, dst)
    return dst


def drop(key: str) -> None:
    shutil.rmtree(cache_root() / key, ignore_errors=True)
