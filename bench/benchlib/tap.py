"""Counts what Synapse publishes on its replication channel, by stream.

Only counts: no line is stored or logged (caches rows can carry
secrets). Presence rows are also split by the state they carry, which
shows users flapping online/offline. For event rows the time each event
id was first seen is kept (a bounded number), so that a benchmark can
tell the homeserver's part of a delivery (send -> row published) from
the rest.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, OrderedDict

from testbed import RedisSubscriber  # interop/ is on sys.path


class Tap:
    def __init__(self, port: int, channel: str, users: set[str]):
        self.sub = RedisSubscriber(port, channel)
        self.users = users
        self.counts: Counter[str] = Counter()
        self.event_seen: OrderedDict[str, float] = OrderedDict()  # event id -> time.monotonic()
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="bench-tap", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                line = self.sub.get(timeout=0.5)
            except Exception:  # Redis went away (bed stopping)
                return
            self.sub.lines.clear()
            if line is None:
                continue
            parts = line.split(" ", 4)
            key = parts[0] if parts[0] != "RDATA" or len(parts) < 2 else "RDATA " + parts[1]
            now = time.monotonic()
            with self.lock:
                self.counts[key] += 1
                if key == "RDATA events" and len(parts) == 5 and '"ev"' in parts[4][:8]:
                    try:
                        event_id = json.loads(parts[4])[1][0]
                    except (ValueError, IndexError, TypeError):
                        event_id = None
                    if isinstance(event_id, str) and event_id not in self.event_seen:
                        self.event_seen[event_id] = now
                        if len(self.event_seen) > 100000:
                            self.event_seen.popitem(last=False)
                if key == "RDATA presence" and len(parts) == 5:
                    try:
                        row = json.loads(parts[4])
                    except ValueError:
                        continue
                    if row and row[0] in self.users:
                        self.counts[f"presence:{row[1]}"] += 1

    def seen_at(self, event_id: str) -> float | None:
        """When the event's row was first read from the channel."""
        with self.lock:
            return self.event_seen.get(event_id)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(2)
        try:
            self.sub.close()
        except OSError:
            pass
