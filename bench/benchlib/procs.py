"""Processes: CPU time and RSS from /proc, Prometheus pages, the mxsse daemon."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces: fields start after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime+stime of one process (plus cutime+cstime: children it has
    waited for) in seconds; 0 when the process is gone."""
    f = _stat_fields(pid)
    if not f:
        return 0.0
    # after ')' : state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    ticks = int(f[11]) + int(f[12])
    if children:
        ticks += int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    """CPU of a process and its live children, plus the children it reaped
    (PostgreSQL: the postmaster and its backends)."""
    total = cpu_seconds(root, children=True)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        f = _stat_fields(int(entry.name))
        if f and int(f[1]) == root:
            total += cpu_seconds(int(entry.name))
    return total


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(url: str, timeout: float = 10) -> dict[str, float]:
    """A Prometheus text page as {'name{labels}': value}."""
    with _opener.open(url, timeout=timeout) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                pass
    return out


def msum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def free_port() -> int:
    # Never the same port twice, none a bed holds (see unclaimed_port).
    from testbed import unclaimed_port  # interop/ is on sys.path
    return unclaimed_port()


class Mxsse:
    """One mxsse process on loopback (cleartext listener + admin listener),
    in its own session so a terminal Ctrl-C reaches only the bench, which
    then stops it."""

    def __init__(self, binary: Path, upstream: str, logdir: Path, extra: list[str]):
        self.port, self.admin_port = free_port(), free_port()
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.log_path = logdir / f"mxsse-{self.port}.log"
        self.args = [str(binary), "--upstream", upstream,
                     "--listen", f"127.0.0.1:{self.port}",
                     "--admin-listen", f"127.0.0.1:{self.admin_port}",
                     *extra]
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None

    def start(self, timeout: float = 15) -> "Mxsse":
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mxsse exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with _opener.open(self.admin_url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mxsse not ready after {timeout}s: {self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def metrics(self) -> dict[str, float]:
        return scrape(self.admin_url + "/metrics")

    def metrics_text(self) -> str:
        with _opener.open(self.admin_url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.exit_code = -9
        if self.proc and self.exit_code is None:
            self.exit_code = self.proc.returncode
        if self.proc and not self.log.closed:
            self.log.close()
        return self.exit_code
