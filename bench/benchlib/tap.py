"""Counts what Synapse publishes on its replication channel, by stream.

Only counts: no line is stored or logged (caches rows can carry
secrets). Presence rows are also split by the state they carry, which
shows users flapping online/offline.
"""

from __future__ import annotations

import json
import threading
from collections import Counter

from testbed import RedisSubscriber  # interop/ is on sys.path


class Tap:
    def __init__(self, port: int, channel: str, users: set[str]):
        self.sub = RedisSubscriber(port, channel)
        self.users = users
        self.counts: Counter[str] = Counter()
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
            with self.lock:
                self.counts[key] += 1
                if key == "RDATA presence" and len(parts) == 5:
                    try:
                        row = json.loads(parts[4])
                    except ValueError:
                        continue
                    if row and row[0] in self.users:
                        self.counts[f"presence:{row[1]}"] += 1

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
