"""The command line: --version, --help, configuration errors (exit 64, one
line on stderr, before any port is bound), the config file and the flags
that override it, and a listen address already taken (exit 1).

Needs only the binary: no homeserver is ever contacted.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

EXIT_USAGE = 64
UPSTREAM = "http://127.0.0.1:9"  # never contacted by these tests
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:")


def run(binary: Path, *args: str, env: dict | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def port_refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def test_version(mxsse_binary):
    r = run(mxsse_binary, "--version")
    assert r.returncode == 0 and r.stderr == ""
    assert re.fullmatch(r"mxsse \d+\.\d+\.\d+\S*\n", r.stdout), r.stdout


def test_help_lists_every_flag(mxsse_binary):
    r = run(mxsse_binary, "--help")
    assert r.returncode == 0 and r.stderr == ""
    for flag in ("--upstream", "--listen", "--tls-listen", "--cert", "--key", "--config",
                 "--log-level", "--admin-listen", "--max-connections", "--max-connections-per-ip",
                 "--max-concurrent-streams", "--handshake-timeout", "--header-timeout",
                 "--idle-timeout", "--write-timeout", "--shutdown-grace", "--help", "--version"):
        assert re.search(rf"^\s+{re.escape(flag)}(\s|=|$)", r.stdout, re.M), f"{flag} not in --help"
    assert run(mxsse_binary, "-h").stdout == r.stdout


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli-certs")
    out = {}
    for name in ("a", "b"):
        cert, key = d / f"{name}.pem", d / f"{name}.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-keyout", str(key), "-out", str(cert),
                        "-days", "30", "-nodes", "-subj", f"/CN={name}"], check=True, capture_output=True)
        out[f"{name}.pem"], out[f"{name}.key"] = cert, key
    out["garbage.pem"] = d / "garbage.pem"
    out["garbage.pem"].write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    return out


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# Each case: args after the listeners (see test_invalid_configuration), and
# a fragment the error line must contain.
INVALID = {
    "unknown option": (["--bogus", "1"], "bogus"),
    "stray argument": (["stray"], "stray"),
    "max-connections 0": (["--max-connections", "0"], "max-connections"),
    "max-connections not a number": (["--max-connections", "lots"], "max-connections"),
    "max-concurrent-streams 0": (["--max-concurrent-streams", "0"], "max-concurrent-streams"),
    "negative timeout": (["--header-timeout", "-1"], "header-timeout"),
    "log-level loud": (["--log-level", "loud"], "loud"),
    "bad boolean": (["--access-log", "maybe"], "access-log"),
    "listen without port": (["--listen", "nocolon"], "nocolon"),
    "listen port out of range": (["--listen", "127.0.0.1:70000"], "70000"),
    "bare IPv6 listen": (["--listen", "::1:8080"], "::1:8080"),
    "admin-listen without port": (["--admin-listen", "localhost"], "localhost"),
    "ftp upstream": (["--upstream", "ftp://x"], "ftp://x"),
    "missing upstream": (["--no-upstream"], "--upstream"),
    "value missing": (["--upstream"], "upstream"),
    "tls-listen without cert": (["--tls-listen", "127.0.0.1:{tls}"], "cert"),
    "unreadable cert": (["--tls-listen", "127.0.0.1:{tls}", "--cert", "/nonexistent/cert.pem",
                         "--key", "{a.key}"], "/nonexistent/cert.pem"),
    "unreadable key": (["--tls-listen", "127.0.0.1:{tls}", "--cert", "{a.pem}",
                        "--key", "/nonexistent/key.pem"], "/nonexistent/key.pem"),
    "cert is not a certificate": (["--tls-listen", "127.0.0.1:{tls}", "--cert", "{garbage.pem}",
                                   "--key", "{a.key}"], "garbage.pem"),
    "key does not match cert": (["--tls-listen", "127.0.0.1:{tls}", "--cert", "{a.pem}",
                                 "--key", "{b.key}"], "key"),
    "proxy-prefix not a path": (["--proxy-prefix", "_synapse"], "_synapse"),
    "missing config file": (["--config", "/nonexistent/mxsse.conf"], "/nonexistent/mxsse.conf"),
    "config unknown key": (["--config", "{conf:bogus = 1}"], "bogus"),
    "config line without =": (["--config", "{conf:listen 127.0.0.1:1}"], "mxsse.conf:1"),
    "config bad value": (["--config", "{conf:# limits\nmax-connections = -5}"], "mxsse.conf:2"),
}


@pytest.mark.parametrize("case", list(INVALID), ids=lambda c: c.replace(" ", "-"))
def test_invalid_configuration(mxsse_binary, certs, tmp_path, case):
    """Exit 64 and exactly one line on stderr, nothing on stdout, and no
    socket ever bound (checked with strace when it is there)."""
    extra, fragment = INVALID[case]
    upstream_given = extra != ["--no-upstream"]
    ports = {"port": free_port(), "tls": free_port(), "admin": free_port()}
    args = []
    for a in extra:
        conf = re.fullmatch(r"\{conf:(.*)\}", a, re.S)
        if conf:
            args.append(write(tmp_path / "mxsse.conf", conf.group(1) + "\n"))
        else:
            args.append(re.sub(r"\{([a-z.]+)\}", lambda m: str(ports.get(m.group(1)) or certs[m.group(1)]), a))
    base = ["--upstream", UPSTREAM] if upstream_given else []
    base += ["--listen", f"127.0.0.1:{ports['port']}", "--admin-listen", f"127.0.0.1:{ports['admin']}"]
    if not upstream_given:
        args = []
    r = run(mxsse_binary, *base, *args)
    assert r.returncode == EXIT_USAGE, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and r.stderr.endswith("\n"), f"want one line on stderr, got:\n{r.stderr}"
    assert fragment in lines[0], lines[0]
    assert not any(m in r.stderr for m in SANITIZER_MARKERS)
    assert all(port_refuses(p) for p in ports.values())
    if shutil.which("strace"):
        trace = tmp_path / "strace.out"
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")  # LeakSanitizer refuses ptrace
        r2 = subprocess.run(["strace", "-f", "-qq", "-e", "trace=bind,listen", "-o", str(trace),
                             str(mxsse_binary), *base, *args], capture_output=True, text=True,
                            timeout=30, env=env, stdin=subprocess.DEVNULL)
        assert r2.returncode == EXIT_USAGE
        calls = [l for l in trace.read_text().splitlines() if re.search(r"\b(bind|listen)\(", l)]
        assert not calls, f"sockets bound before the configuration was rejected:\n{calls}"


# --- running from a config file ------------------------------------------------


class Running:
    """mxsse started with the given arguments; stop() checks a clean exit."""

    def __init__(self, binary: Path, args: list[str], admin_port: int, log: Path):
        self.log = log
        self.proc = subprocess.Popen([str(binary), *args], stdout=open(log, "wb"),
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"not ready:\n{log.read_text()}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(20)
        text = self.log.read_text(errors="replace")
        assert not any(m in text for m in SANITIZER_MARKERS), text[-3000:]
        assert code == 0, f"exit {code}:\n{text[-3000:]}"


def advertised_streams(port: int) -> int:
    out = subprocess.run(["nghttp", "-nv", f"http://127.0.0.1:{port}/nope"], capture_output=True,
                         text=True, timeout=20).stdout
    recv = out.split("recv SETTINGS", 1)[1]
    return int(re.search(r"SETTINGS_MAX_CONCURRENT_STREAMS\(0x03\):(\d+)", recv).group(1))


def status_of(port: int, request: bytes = b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        head = s.recv(100)
        return int(head.split(b" ")[1]) if head else 0


def logs_debug(port: int, log: Path) -> bool:
    """Whether a parse error (logged at debug level) shows in the log."""
    status_of(port, b"\x00GARBAGE\r\n\r\n")
    time.sleep(0.2)
    return "level=debug" in log.read_text()


def test_config_file_and_overrides(mxsse_binary, tmp_path):
    file_port, flag_port, admin = free_port(), free_port(), free_port()
    conf = write(tmp_path / "mxsse.conf", f"""
# mxsse test configuration
upstream = {UPSTREAM}/
listen = 127.0.0.1:{file_port}
admin-listen = "127.0.0.1:{admin}"
max-concurrent-streams = 7
log-level = debug
access-log = yes
proxy-prefix = /_synapse/admin
proxy-prefix = /_synapse/client
""")
    m = Running(mxsse_binary, ["--config", conf], admin, tmp_path / "a.log")
    try:
        assert status_of(file_port) == 404
        assert advertised_streams(file_port) == 7
        assert logs_debug(file_port, tmp_path / "a.log"), "log-level from the file ignored"
    finally:
        m.stop()
    # Flags win over the file wherever they stand; a list flag replaces the
    # file's list.
    m = Running(mxsse_binary, ["--max-concurrent-streams", "9", f"--config={conf}",
                               "--listen", f"127.0.0.1:{flag_port}", "--log-level", "info"],
                admin, tmp_path / "b.log")
    try:
        assert status_of(flag_port) == 404
        assert advertised_streams(flag_port) == 9
        assert port_refuses(file_port), "the file's listen address is still bound"
        assert not logs_debug(flag_port, tmp_path / "b.log"), "--log-level did not override the file"
    finally:
        m.stop()


@pytest.mark.parametrize("taken", ["listen", "tls-listen", "admin-listen"])
def test_address_in_use(mxsse_binary, tmp_path, taken):
    """Exit 1 and a log line naming the address."""
    ports = {k: free_port() for k in ("listen", "tls-listen", "admin-listen")}
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-nodes", "-subj", "/CN=x"],
                   check=True, capture_output=True)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[taken]))
        holder.listen()
        r = run(mxsse_binary, "--upstream", UPSTREAM, "--cert", str(cert), "--key", str(key),
                *[a for k, p in ports.items() for a in (f"--{k}", f"127.0.0.1:{p}")])
    out = r.stdout + r.stderr
    assert r.returncode == 1, f"exit {r.returncode}:\n{out}"
    assert f"127.0.0.1:{ports[taken]}" in out and "listen" in out, out
    assert not any(m in out for m in SANITIZER_MARKERS)


@pytest.mark.parametrize("first,second", [
    ("--listen=127.0.0.1:{p}", "--admin-listen=127.0.0.1:{p}"),
    ("--listen=127.0.0.1:{p}", "--tls-listen=127.0.0.1:{p}"),
    ("--listen=0.0.0.0:{p}", "--admin-listen=127.0.0.1:{p}"),
    ("--listen=:{p}", "--listen=127.0.0.1:{p}"),
])
def test_two_listeners_on_one_address(mxsse_binary, tmp_path, first, second):
    """Two listeners of one process on one address are refused (exit 1, a
    line naming both): SO_REUSEPORT would let both bind, and the kernel
    would then hand client connections to the admin listener (or TLS
    clients to the cleartext one) at random."""
    p = free_port()
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-nodes", "-subj", "/CN=x"],
                   check=True, capture_output=True)
    r = run(mxsse_binary, "--upstream", UPSTREAM, "--cert", str(cert), "--key", str(key),
            first.format(p=p), second.format(p=p))
    out = r.stdout + r.stderr
    assert r.returncode == 1, f"exit {r.returncode}:\n{out}"
    assert "listen.failed" in out and "the same address as the listener" in out, out
    assert not any(m in out for m in SANITIZER_MARKERS)


def test_second_mxsse_shares_the_address(mxsse_binary, tmp_path):
    """Listeners use SO_REUSEPORT: a second instance on the same address
    starts and shares it, so a new process can take over before the old one
    drains (restarts without a gap). The address keeps answering."""
    port, admin1, admin2 = free_port(), free_port(), free_port()
    args = ["--upstream", UPSTREAM, "--listen", f"127.0.0.1:{port}"]
    first = Running(mxsse_binary, args + ["--admin-listen", f"127.0.0.1:{admin1}"], admin1,
                    tmp_path / "1.log")
    try:
        second = Running(mxsse_binary, args + ["--admin-listen", f"127.0.0.1:{admin2}"], admin2,
                         tmp_path / "2.log")
        try:
            first.stop()  # the old one goes; the address keeps answering
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert sock.recv(64).startswith(b"HTTP/1.1 404")
        finally:
            second.stop()
    finally:
        first.stop()


# --- --check-config and the generated documents --------------------------------


def test_check_config(mxsse_binary, certs, tmp_path):
    """Exit 0 and one line on stdout for a valid file, 64 and one line on
    stderr for an invalid one, including a certificate that would not
    load; nothing is ever bound or contacted."""
    port = free_port()
    good = write(tmp_path / "good.conf", f"upstream = {UPSTREAM}\nlisten = 127.0.0.1:{port}\n")
    for args in (["--check-config", good], [f"--check-config={good}"],
                 ["--config", good, "--check-config"]):
        r = run(mxsse_binary, *args)
        assert r.returncode == 0 and r.stderr == "", r
        assert r.stdout == f"mxsse: configuration {good} is valid\n"
    bad = write(tmp_path / "bad.conf", f"upstream = {UPSTREAM}\nlisten = 127.0.0.1:{port}\n"
                                       "heartbeat-min = 9\nheartbeat-max = 3\n")
    tls = ["--tls-listen", f"127.0.0.1:{port}"]
    assert run(mxsse_binary, "--check-config", good, *tls, "--cert", str(certs["a.pem"]),
               "--key", str(certs["a.key"])).returncode == 0
    for args, fragment in (
            (["--check-config", bad], "heartbeat"),
            (["--check-config", good, "--idle-timeout", "0"], "idle-timeout"),
            (["--check-config", str(tmp_path / "missing.conf")], "missing.conf"),
            (["--check-config", good, *tls, "--cert", str(certs["garbage.pem"]),
              "--key", str(certs["a.key"])], "garbage.pem"),
            (["--check-config", good, *tls, "--cert", str(certs["a.pem"]),
              "--key", str(certs["b.key"])], "b.key")):
        r = run(mxsse_binary, *args)
        assert r.returncode == EXIT_USAGE and r.stdout == "", r
        assert len(r.stderr.splitlines()) == 1 and fragment in r.stderr, r.stderr
    assert port_refuses(port)


def help_flags(binary: Path) -> list[str]:
    out = run(binary, "--help").stdout
    return re.findall(r"^  (--[a-z-]+)", out, re.M)


def test_man_pages_and_shipped_file_follow_help(mxsse_binary, tmp_path):
    """mxsse(8) lists exactly the flags --help lists, mxsse.conf(5) and the
    shipped file every key; the shipped file is valid; and the pages the
    build wrote beside the binary are the program's own."""
    flags = help_flags(mxsse_binary)
    assert len(flags) > 30
    man8 = run(mxsse_binary, "--print-man", "8").stdout
    man5 = run(mxsse_binary, "--print-man=5").stdout
    conf = run(mxsse_binary, "--print-config").stdout
    in_man8 = re.findall(r'^\.BI "((?:\\-)+[a-z\\-]+)', man8, re.M)
    assert [f.replace("\\-", "-") for f in in_man8] == \
        [f for f in ("--config", "--check-config", "--help", "--version")] + \
        [f for f in flags if f not in ("--config", "--check-config", "--help", "--version")]
    keys = [f[2:] for f in flags if f not in ("--config", "--check-config", "--help", "--version")]
    in_man5 = [k.replace("\\-", "-") for k in re.findall(r'^\.BI "([a-z\\-]+) = ', man5, re.M)]
    assert in_man5 == keys
    in_conf = re.findall(r"^#?([a-z-]+) = ", conf, re.M)
    assert in_conf == keys
    for page in (man8, man5):
        assert re.match(r'\.\\" Generated by mxsse', page)
        if shutil.which("groff"):
            g = subprocess.run(["groff", "-man", "-ww", "-z"], input=page, text=True,
                               capture_output=True)
            assert g.returncode == 0 and g.stderr == "", g.stderr
    path = write(tmp_path / "mxsse.conf", conf)
    assert run(mxsse_binary, "--check-config", path).returncode == 0
    built = {"mxsse.8": man8, "mxsse.conf.5": man5, "mxsse.conf": conf}
    for name, text in built.items():
        f = mxsse_binary.parent / name
        if f.exists():
            assert f.read_text() == text, f"{f} is stale: run make"
