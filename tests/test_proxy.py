"""Proxies, for real: ``pproxy`` (a proxy server from PyPI) started by the tests on loopback,
HTTP CONNECT and SOCKS5 with credentials, an HTTPS proxy (TLS to the proxy, TLS to the feed
inside it), in front of the simulator over plain HTTP/WS and over TLS. The proxy's own log
shows the login requests and the WebSocket going through it; ``--proxy`` and the standard
``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``/``NO_PROXY`` variables are both covered."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from fastfeed.config import ConfigError, load_settings
from fastfeed.net import proxy_for, redact_url
from fastfeed.sim.process import SimulatorProcess
from tests.brokers import missing

from .conftest import ROOT, SIM_CLIENT_ID, SIM_SCOPE, SIM_SECRET, SIM_TENANT

pytest.importorskip("pproxy")
trustme = pytest.importorskip("trustme")

USER, PASSWORD = "feeduser", "s3cret:pw"  # a colon in the password: it must be quoted right
FAIL_FAST_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proxy:
    """``pproxy`` on a free loopback port, logging every connection it relays (``-v``).

    pproxy installs uvloop when it can and then fails to find an event loop; it runs on
    asyncio's own loop here. ``--auth 0``: credentials are checked on every connection, not
    remembered per client address.
    """

    def __init__(self, tmp: Path, listen: str, *extra: str) -> None:
        self.port = free_port()
        self.log_path = tmp / f"pproxy-{self.port}.log"
        code = ("import sys; sys.modules['uvloop'] = None; from pproxy.server import main; "
                "sys.argv = ['pproxy'] + sys.argv[1:]; main()")
        uri = f"{listen}://127.0.0.1:{self.port}/#{USER}:{PASSWORD}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", code, "-l", uri, "-v",
                                          "--auth", "0", *extra], stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pproxy did not start: {self.log()}") from None
                time.sleep(0.05)

    def url(self, scheme: str, *, password: str = PASSWORD) -> str:
        from urllib.parse import quote

        return f"{scheme}://{USER}:{quote(password, safe='')}@127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def relayed(self, port: int) -> list[str]:
        """The log lines of connections relayed to 127.0.0.1:``port``: ``http ...`` or
        ``socks5 ...``."""
        return [ln for ln in self.log().splitlines()
                if re.search(rf"-> 127\.0\.0\.1:{port}\b", ln)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("proxy-certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(d / "server.pem"))
    return {"ca": str(d / "ca.pem"), "server": str(d / "server.pem")}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory):
    """One pproxy speaking HTTP (CONNECT and forwarding) and SOCKS5 on one port."""
    p = Proxy(tmp_path_factory.mktemp("proxy"), "http+socks5")
    yield p
    p.stop()


@pytest.fixture
def sims(certs):
    started: list[SimulatorProcess] = []

    def start(tls: bool, *args: str) -> SimulatorProcess:
        extra = ("--tls-cert", certs["server"]) if tls else ()
        sim = SimulatorProcess(*extra, *args, ca_file=certs["ca"] if tls else None)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        try:
            sim.stop()
        except RuntimeError:
            pass


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FASTFEED_") and k.lower() not in
           ("https_proxy", "http_proxy", "all_proxy", "no_proxy")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["FASTFEED_CLIENT_SECRET"] = SIM_SECRET
    env.update(extra)
    return env


def stream(sim: SimulatorProcess, tmp_path: Path, *args: str, env: dict[str, str] | None = None,
           ) -> tuple[subprocess.CompletedProcess[str], float]:
    argv = [sys.executable, "-m", "fastfeed", "stream", "--host", sim.url, "--authority", sim.url,
            "--tenant", SIM_TENANT, "--client-id", SIM_CLIENT_ID, "--scope", SIM_SCOPE,
            "--email", "ops@example.com", "--json",
            "--token-cache", str(tmp_path / f"token-{time.monotonic_ns()}.json"), *args]
    if sim.ca_file:
        argv += ["--ca-file", sim.ca_file]
    t0 = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                         env=env or clean_env())
    return res, time.monotonic() - t0


def frames(res: subprocess.CompletedProcess[str]) -> int:
    assert res.returncode == 0, res.stderr[-3000:]
    return int(json.loads(res.stdout.strip().splitlines()[-1])["frames"])


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# -- through the proxy ---------------------------------------------------------------------------

@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("scheme", ["http", "socks5"])
def test_stream_through_proxy_gets_every_frame(proxy, sims, tmp_path, scheme, tls):
    sim = sims(tls, "--rate", "0", "--count", "200000")
    assert frames(stream(sim, tmp_path, "--proxy", proxy.url(scheme), "--count", "200000")[0]) \
        == 200000
    relayed = proxy.relayed(sim.port)
    # The login (token request, token exchange) and the WebSocket, each a connection the
    # proxy relayed with the protocol asked for: the simulator closes after each answer.
    stats = sim.stats()
    assert stats["token_requests"] == 1 and stats["exchanges"] == 1
    assert stats["connections"] == 1 and stats["frames_sent"] == 200000
    assert len(relayed) == 3, proxy.log()
    assert all(ln.startswith(scheme + " ") for ln in relayed), relayed


def test_https_proxy_tls_inside_tls(certs, sims, tmp_path):
    """TLS to the proxy (its certificate from the same CA) and TLS to the feed inside it."""
    p = Proxy(tmp_path, "http+ssl", "--ssl", certs["server"])
    try:
        sim = sims(True, "--rate", "0", "--count", "100000")
        assert frames(stream(sim, tmp_path, "--proxy", p.url("https"),
                             "--count", "100000")[0]) == 100000
        assert len(p.relayed(sim.port)) == 3, p.log()
    finally:
        p.stop()


def test_proxy_from_environment_and_no_proxy(proxy, sims, tmp_path):
    sim = sims(True, "--rate", "0")
    res, _ = stream(sim, tmp_path, "--count", "20000",
                    env=clean_env(HTTPS_PROXY=proxy.url("http")))
    assert frames(res) >= 20000
    assert len(proxy.relayed(sim.port)) == 3
    # NO_PROXY names the host: straight there, the proxy sees nothing more
    res, _ = stream(sim, tmp_path, "--count", "20000",
                    env=clean_env(HTTPS_PROXY=proxy.url("http"), NO_PROXY="localhost,127.0.0.1"))
    assert frames(res) >= 20000
    assert len(proxy.relayed(sim.port)) == 3
    # ALL_PROXY (socks5) for the plain simulator: HTTP_PROXY unset
    plain = sims(False, "--rate", "0", "--count", "20000")
    res, _ = stream(plain, tmp_path, "--count", "20000",
                    env=clean_env(ALL_PROXY=proxy.url("socks5")))
    assert frames(res) == 20000
    assert [ln.split()[0] for ln in proxy.relayed(plain.port)] == ["socks5"] * 3


def test_wrong_proxy_credentials_fail_fast(proxy, sims, tmp_path):
    sim = sims(True, "--rate", "100")
    res, took = stream(sim, tmp_path, "--proxy", proxy.url("http", password="wrong"),
                       "--count", "10")
    line = last_line(res.stderr)
    assert res.returncode == 1 and took < FAIL_FAST_S, res.stderr[-2000:]
    assert line.startswith("fastfeed: error: proxy http://feeduser:***@127.0.0.1:")
    assert "407" in line and "wrong" not in res.stderr and "s3cret" not in res.stderr


def test_proxy_down_and_connect_timeout(sims, tmp_path):
    """A proxy that refuses: retried visibly, then --connect-timeout 3 ends it in ~3 s."""
    sim = sims(True, "--rate", "100")
    dead = f"http://127.0.0.1:{free_port()}"
    res, took = stream(sim, tmp_path, "--proxy", dead, "--count", "10", "--connect-timeout", "3")
    line = last_line(res.stderr)
    assert res.returncode == 1 and 2.5 < took < 12, (took, res.stderr[-2000:])
    assert line.startswith("fastfeed: error: no connection to ") and "for 3 s" in line
    assert "refused" in line.lower() and f"through proxy {dead}" in line
    # every failed attempt logged once, with its count and the next delay
    attempts = [ln for ln in res.stderr.splitlines() if "; attempt " in ln]
    assert len(attempts) >= 2 and all("next in" in ln for ln in attempts)


# -- the rules ------------------------------------------------------------------------------------

def test_proxy_selection_rules():
    env = {"HTTPS_PROXY": "http://corp:3128", "http_proxy": "http://plain:3128",
           "ALL_PROXY": "socks5://any:1080", "NO_PROXY": "localhost,.internal,10.1.2.3,feed:8443"}
    assert proxy_for("https://feed.example.com", env=env) == "http://corp:3128"
    assert proxy_for("wss://feed.example.com/ws", env=env) == "http://corp:3128"
    assert proxy_for("ws://feed.example.com/ws", env=env) == "http://plain:3128"
    assert proxy_for("https://localhost:8443", env=env) is None
    assert proxy_for("https://a.b.internal", env=env) is None
    assert proxy_for("https://internal.example", env=env) == "http://corp:3128"
    assert proxy_for("https://10.1.2.3", env=env) is None
    assert proxy_for("https://feed:8443", env=env) is None
    assert proxy_for("https://feed:443", env=env) == "http://corp:3128"
    assert proxy_for("https://x", env={"ALL_PROXY": "socks5://any:1080"}) == "socks5://any:1080"
    assert proxy_for("https://x", env={"NO_PROXY": "*", "ALL_PROXY": "socks5://a:1"}) is None
    assert proxy_for("https://localhost", "http://explicit:1", env=env) == "http://explicit:1"
    assert proxy_for("https://x", env={}) is None
    assert redact_url("http://u:pw@h:1") == "http://u:***@h:1"


@pytest.mark.parametrize("value, message", [
    ("ftp://proxy:21", "scheme must be one of"),
    ("http://proxy:abc", "port must be a number"),
    ("http://proxy:99999", "port must be a number"),
    ("socks5://:1080", "no host name"),
])
def test_bad_proxy_url_is_a_config_error(value, message):
    with pytest.raises(ConfigError, match=message):
        load_settings({"host": "feed.example.com", "proxy": value}, env={})


def test_proxy_password_never_in_settings_repr():
    s = load_settings({"host": "feed.example.com", "proxy": "http://u:topsecret@p:1"}, env={})
    assert "topsecret" not in repr(s)


def test_socks5_wrong_password_fails_fast(sims, tmp_path):
    """microsocks answers a wrong SOCKS5 password with the RFC 1929 failure status: a
    one-line error at once, the password never shown (pproxy just closes, which cannot be
    told from a proxy that is down)."""
    exe = shutil.which("microsocks")
    if exe is None:
        missing("microsocks", "microsocks")
    port = free_port()
    proc = subprocess.Popen([exe, "-i", "127.0.0.1", "-p", str(port), "-u", USER, "-P", PASSWORD],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "microsocks did not start"
                time.sleep(0.05)
        sim = sims(True, "--rate", "100")
        good = f"socks5://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}"
        cache = str(tmp_path / "token.json")
        # the login (urllib3 + PySocks) meets the refusal first; with a token cached, the
        # WebSocket (python-socks) does: both end at once
        # (>= : the simulator runs on, and --count ends the run once 10 are accounted for,
        # with what came in the same read)
        assert frames(stream(sim, tmp_path, "--proxy", good, "--count", "10",
                             "--token-cache", cache)[0]) >= 10
        for token_cache in ((), ("--token-cache", cache)):
            res, took = stream(sim, tmp_path, "--proxy", f"socks5://{USER}:wrong@127.0.0.1:{port}",
                               "--count", "10", *token_cache)
            line = last_line(res.stderr)
            assert res.returncode == 1 and took < FAIL_FAST_S, (took, res.stderr[-2000:])
            assert line.startswith("fastfeed: error: proxy socks5://feeduser:***@127.0.0.1:"), line
            assert "refused the user and password" in line, line
            assert "wrong" not in res.stderr and "s3cret" not in res.stderr
        res, took = stream(sim, tmp_path, "--proxy", f"socks5://127.0.0.1:{port}", "--count", "10")
        line = last_line(res.stderr)
        assert res.returncode == 1 and took < FAIL_FAST_S, (took, res.stderr[-2000:])
        assert "wants a user and password" in line, line
    finally:
        proc.terminate()
        proc.wait(10)
