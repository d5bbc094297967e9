"""Real brokers for the pub/sub source tests, on loopback.

- :func:`redis_server`: a ``redis-server`` the test starts on a free port, in its own temporary
  directory, with an append-only file (``appendfsync always``) so that a restart keeps every
  entry the broker acknowledged; ``restart()`` stops it (SIGTERM) and starts it again on the
  same port and data. :func:`redis_everysec`: the same with ``appendfsync everysec`` (the
  usual production setting: a host crash loses up to the last second of writes).
- :func:`nats_server`: a ``nats-server -js`` on a free port, JetStream store in a temporary
  directory; ``restart()`` likewise.
- :func:`rabbitmq`: the RabbitMQ server on 127.0.0.1:5672 (guest/guest) where one runs.

A broker that is missing skips its tests with a message naming the Debian package to install;
when ``CI=true`` a missing broker fails them instead (CI installs and starts every broker).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from fastfeed import Feed, shm
from fastfeed.feed import FeedError

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: Where RabbitMQ is expected (the Debian package's default, guest/guest on loopback only).
AMQP_URL = os.environ.get("FASTFEED_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")


def missing(what: str, package: str) -> None:
    """Skip (or, under CI=true, fail) a test whose broker is not there."""
    msg = f"{what} is not available: install the Debian package {package}"
    if IN_CI:
        pytest.fail(f"{msg} (CI=true: a missing broker is a failure)")
    pytest.skip(msg)


def need_module(name: str, extra: str) -> None:
    """Skip (or, under CI=true, fail) when a broker's client library is not installed."""
    try:
        __import__(name)
    except ImportError:
        msg = f"{name} is not installed: pip install 'fastfeed[{extra}]'"
        if IN_CI:
            pytest.fail(f"{msg} (CI=true: a missing client is a failure)")
        pytest.skip(msg, allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class BrokerProcess:
    """A broker subprocess on a fixed loopback port, restartable on the same data."""

    def __init__(self, argv: list[str], port: int, workdir: Path,
                 ready: Callable[[int], bool] | None = None, *,
                 env: dict[str, str] | None = None, start_timeout: float = 20.0) -> None:
        self.argv, self.port, self.workdir = argv, port, workdir
        self.ready = ready
        self.env = env
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "broker.log"
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=self.workdir, stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env)
        try:
            wait_port(self.port, self.start_timeout, proc=self.proc)
        except RuntimeError:
            self.stop()
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.argv[0]} did not come up on {self.port}:\n{tail}") from None
        if self.ready is not None:
            deadline = time.monotonic() + 20
            while not self.ready(self.port):
                if time.monotonic() > deadline:
                    raise RuntimeError("broker not ready after 20s")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def crash(self) -> None:
        """SIGKILL the broker (no shutdown work: what it had not written is lost)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(20)
        self.proc = None

    def restart(self, down_for: float = 0.3) -> None:
        """Stop the broker, leave it down ``down_for`` seconds, start it on the same data."""
        self.stop()
        time.sleep(down_for)
        self.start()


def redis_ready(port: int) -> bool:
    """PONG, not LOADING: a restarted server replays its append-only file first."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(tmp_path: Path, fsync: str = "always") -> BrokerProcess:
    """A ``redis-server`` on a free port with an append-only file (``appendfsync fsync``) in
    ``tmp_path/redis``; automatic rewrites of the file are off (tests copy it)."""
    exe = shutil.which("redis-server")
    if exe is None:
        missing("redis-server", "redis-server")
    port = free_port()
    work = tmp_path / "redis"
    work.mkdir()
    return BrokerProcess([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work),
                          "--save", "", "--appendonly", "yes", "--appendfsync", fsync,
                          "--auto-aof-rewrite-percentage", "0",
                          "--daemonize", "no", "--protected-mode", "yes"], port, work,
                         redis_ready)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[BrokerProcess]:
    b = start_redis(tmp_path)
    yield b
    b.stop()


@pytest.fixture
def redis_everysec(tmp_path: Path) -> Iterator[BrokerProcess]:
    b = start_redis(tmp_path, "everysec")
    yield b
    b.stop()


def start_nats(tmp_path: Path, *args: str, name: str = "nats") -> BrokerProcess:
    """A ``nats-server`` on a free loopback port with ``args``, its files in tmp_path/name."""
    exe = shutil.which("nats-server") or ("/usr/sbin/nats-server"
                                          if os.path.exists("/usr/sbin/nats-server") else None)
    if exe is None:
        missing("nats-server", "nats-server")
    port = free_port()
    work = tmp_path / name
    work.mkdir()
    return BrokerProcess([exe, "-a", "127.0.0.1", "-p", str(port), *args], port, work)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[BrokerProcess]:
    b = start_nats(tmp_path, "-js", "-sd", str(tmp_path / "nats"))
    yield b
    b.stop()


class TLSFiles:
    """A CA the test made (trustme) and PEM files for a broker and a client it issued."""

    def __init__(self, d: Path) -> None:
        trustme = pytest.importorskip("trustme")
        d.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        self.ca = str(d / "ca.pem")
        ca.cert_pem.write_to_path(self.ca)
        server = ca.issue_cert("127.0.0.1", "localhost")
        self.server_cert, self.server_key = str(d / "server.crt"), str(d / "server.key")
        server.cert_chain_pems[0].write_to_path(self.server_cert)
        server.private_key_pem.write_to_path(self.server_key)
        self.client = str(d / "client.pem")
        ca.issue_cert("client.fastfeed.test").private_key_and_cert_chain_pem.write_to_path(
            self.client)


def start_redis_tls(tmp_path: Path, tls: TLSFiles, *, client_certs: bool = False
                    ) -> BrokerProcess:
    """A ``redis-server`` serving only TLS on a free port (``rediss://``), certificates from
    ``tls``; ``client_certs``: it requires a client certificate from the same CA."""
    exe = shutil.which("redis-server")
    if exe is None:
        missing("redis-server", "redis-server")
    port = free_port()
    work = tmp_path / "redis-tls"
    work.mkdir()
    return BrokerProcess([exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                          "--dir", str(work), "--save", "", "--appendonly", "no",
                          "--tls-cert-file", tls.server_cert, "--tls-key-file", tls.server_key,
                          "--tls-ca-cert-file", tls.ca,
                          "--tls-auth-clients", "yes" if client_certs else "no",
                          "--daemonize", "no"], port, work)


def start_nats_tls(tmp_path: Path, tls: TLSFiles, *, client_certs: bool = False
                   ) -> BrokerProcess:
    """A ``nats-server`` that requires TLS (``tls://``), certificates from ``tls``;
    ``client_certs``: it requires a client certificate from the same CA."""
    verify = ["--tlsverify", "--tlscacert", tls.ca] if client_certs else []
    return start_nats(tmp_path, "--tls", "--tlscert", tls.server_cert, "--tlskey",
                      tls.server_key, *verify, name="nats-tls")


RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's, run as this user


def start_rabbitmq_tls(tmp_path: Path, tls: TLSFiles, *, client_certs: bool = False
                       ) -> BrokerProcess:
    """A RabbitMQ node of its own serving AMQP only over TLS on a free port (``amqps://``),
    certificates from ``tls``; ``client_certs``: it requires a client certificate from the
    same CA. Beside the machine's node on 5672, with its own name, distribution port, data
    and Erlang cookie; it boots in some 5-10 s."""
    if not os.path.exists(RABBITMQ_SERVER):
        missing(RABBITMQ_SERVER, "rabbitmq-server")
    port, dist = free_port(), free_port()
    work = tmp_path / "rabbitmq-tls"
    work.mkdir()
    (work / "enabled_plugins").write_text("[].\n")
    (work / "rabbitmq.conf").write_text(
        "listeners.tcp = none\n"
        f"listeners.ssl.default = {port}\n"
        f"ssl_options.cacertfile = {tls.ca}\n"
        f"ssl_options.certfile = {tls.server_cert}\n"
        f"ssl_options.keyfile = {tls.server_key}\n"
        f"ssl_options.verify = {'verify_peer' if client_certs else 'verify_none'}\n"
        f"ssl_options.fail_if_no_peer_cert = {'true' if client_certs else 'false'}\n")
    env = dict(os.environ, HOME=str(work), RABBITMQ_NODENAME=f"fastfeed-tls-{port}@localhost",
               RABBITMQ_DIST_PORT=str(dist), RABBITMQ_CONFIG_FILE=str(work / "rabbitmq.conf"),
               RABBITMQ_MNESIA_BASE=str(work / "mnesia"), RABBITMQ_LOG_BASE=str(work / "log"),
               RABBITMQ_ENABLED_PLUGINS_FILE=str(work / "enabled_plugins"),
               RABBITMQ_PID_FILE=str(work / "pid"))
    return BrokerProcess([RABBITMQ_SERVER], port, work, env=env, start_timeout=90.0)


@pytest.fixture
def rabbitmq() -> str:
    """The AMQP URL of the RabbitMQ server on 127.0.0.1:5672 (skipped/failed if none)."""
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1.0):
            pass
    except OSError:
        missing("RabbitMQ on 127.0.0.1:5672", "rabbitmq-server")
    return AMQP_URL


def unique(prefix: str) -> str:
    """A name no other test (or earlier run) uses: queues and streams on a shared broker."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(autouse=True)
def no_segment_left() -> Iterator[None]:
    """Fail the test if it leaves a fastfeed segment (ours or a dead child's) in /dev/shm."""
    before = set(shm.list_segments())
    yield
    leaks = []
    for name in set(shm.list_segments()) - before:
        owner = shm.owner_of(name)
        if owner is None:
            continue
        if owner[0] == os.getpid() or shm.process_start_ticks(owner[0]) != owner[1]:
            leaks.append(name)
            try:
                os.unlink(os.path.join(shm.SHM_DIR, name))
            except FileNotFoundError:
                pass
    assert not leaks, f"segments left in /dev/shm: {leaks}"


def wait_for(predicate: object, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate()`` until true; fail after ``timeout`` s (a bound, never a measurement)."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_fails_at_once(source: str, port: int | None, *says: str, retries: int = 1) -> str:
    """A feed on ``source`` stops with one line that names 127.0.0.1:port (when given) and
    each of ``says``, after at most ``retries`` failed connection attempts (no reconnect
    loop); returns the line."""
    with Feed(source=source, workers=1) as feed:
        with pytest.raises(FeedError) as info:
            feed.run(duration=30)
    msg = str(info.value)
    assert "\n" not in msg and (port is None or f"127.0.0.1:{port}" in msg), msg
    for what in says:
        assert what in msg, (what, msg)
    assert feed.stats()["session"]["connect_errors"] <= retries
    return msg


def feed_connected(feed: object, n: int = 1) -> bool:
    """Whether the feed's source has (re)connected ``n`` times."""
    return feed.stats()["session"].get("connects", 0) >= n  # type: ignore[attr-defined]


def assert_rows_match(stats: dict, sent: dict) -> None:
    """Rows per kind decoded equal what the publisher reports; errors are its malformed frames."""
    got = {k: stats[k] for k in ("ticks", "quotes", "bars", "errors")}
    want = {"ticks": sent["ticks"], "quotes": sent["quotes"], "bars": sent["bars"],
            "errors": sent["malformed"]}
    assert got == want, (got, want, stats["session"])
    assert stats["dropped"] == 0 and stats["gaps"] == 0, stats


def collect_ticks(feeds: list[Feed], frames: int, timeout: float = 60.0) -> list[np.ndarray]:
    """Tick timestamps from several feeds until together they decoded ``frames`` frames."""
    out: list[list[np.ndarray]] = [[] for _ in feeds]

    def drain(wait: float) -> bool:
        got = False
        for i, f in enumerate(feeds):
            b = f.poll(timeout=wait)
            if b is not None:
                out[i].append(b.ticks["ts"].copy())
                got = True
        return got

    deadline = time.monotonic() + timeout
    while sum(f.frames_decoded() for f in feeds) < frames:
        assert time.monotonic() < deadline, [f.stats()["session"] for f in feeds]
        drain(0.005)
    while drain(0.05):
        pass
    return [np.concatenate(x) if x else np.empty(0, np.int64) for x in out]


def slow_handler(worker: int, batch: object) -> None:
    """A worker handler that makes decoding slow, so a small ring fills and refuses frames
    (the at-least-once sources must then hand them back and get them again)."""
    time.sleep(0.05)


def gated_handler(gate: str, worker: int, batch: object) -> None:
    """A worker handler that holds every batch until the file ``gate`` exists: the rings fill
    up, and a source writing with the "block" policy stops reading its broker."""
    while not os.path.exists(gate):
        time.sleep(0.005)


#: Feed options for the refusal tests: a 16 KiB ring (some 150 frames) that drops at once
#: when full, and workers slowed down by :func:`slow_handler`.
REFUSING_FEED = {"ring_capacity": 1 << 14, "full_policy": "drop", "handler": slow_handler}
