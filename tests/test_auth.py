"""Settings, the two-step login and the token cache, against the real simulator."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from fastfeed.auth import (
    FALLBACK_LIFETIME_S,
    Authenticator,
    AuthError,
    CredentialsError,
    Token,
    TokenCache,
    exchange_token,
    fetch_aad_token,
    jwt_expiry,
    login,
)
from fastfeed.config import ConfigError, Secret, Settings, load_settings

from .conftest import ROOT, SIM_SECRET, SIM_TENANT


def settings_for(sim, token_cache, **extra):
    return load_settings(sim.settings_args(token_cache=str(token_cache), **extra), env={})


def no_sleep(calls):
    return calls.append


# -- settings ---------------------------------------------------------------------------------

def test_settings_precedence_args_over_env_over_file(tmp_path):
    cfg = tmp_path / "fastfeed.toml"
    cfg.write_text('[fastfeed]\nhost = "file.example.com"\ntenant = "t-file"\n'
                   'client_id = "c-file"\nheartbeat_interval = 5\n')
    env = {"FASTFEED_TENANT_ID": "t-env", "FASTFEED_CLIENT_ID": "c-env",
           "FASTFEED_CLIENT_SECRET": "s-env"}
    s = load_settings({"client_id": "c-arg", "scope": None}, config_file=cfg, env=env)
    assert s.host == "file.example.com"
    assert s.tenant_id == "t-env"
    assert s.client_id == "c-arg"
    assert s.heartbeat_interval == 5.0
    assert s.client_secret == Secret("s-env")
    assert s.ws_url == "wss://file.example.com/ws"
    assert s.exchange_url == "https://file.example.com/.auth/login/aad"
    assert s.token_url == "https://login.microsoftonline.com/t-env/oauth2/v2.0/token"


def test_settings_config_file_from_env_and_errors(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('host = "http://127.0.0.1:9"\nverify_tls = false\n')
    s = load_settings(env={"FASTFEED_CONFIG": str(cfg)})
    assert s.ws_url == "ws://127.0.0.1:9/ws" and s.verify_tls is False
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(config_file=tmp_path / "missing.toml", env={})
    cfg.write_text("host = [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(config_file=cfg, env={})
    with pytest.raises(ConfigError, match="bad value for heartbeat_interval"):
        load_settings({"heartbeat_interval": "soon"}, env={})
    with pytest.raises(ConfigError, match=r"missing setting\(s\): host"):
        Settings().require("host")


def test_subscription_from_toml_table_or_json_text(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[fastfeed]\nhost = "h"\n[fastfeed.subscription]\napi_key = "k"\n'
                   'subscriptions = [{code = "NASDAQ:AAPL", type = "quote"}]\n')
    s = load_settings(config_file=cfg, env={})
    assert s.subscription is not None
    assert json.loads(s.subscription) == {
        "api_key": "k", "subscriptions": [{"code": "NASDAQ:AAPL", "type": "quote"}]}
    s = load_settings(env={"FASTFEED_SUBSCRIPTION": '{"subscriptions": []}'})
    assert s.subscription == '{"subscriptions": []}'
    with pytest.raises(ConfigError, match="bad value for subscription"):
        load_settings({"subscription": "{not json"}, env={})


def test_secret_never_in_repr_or_str():
    s = load_settings({"client_secret": "hunter2-very-secret", "host": "h"}, env={})
    for text in (repr(s), str(s), f"{s.client_secret}", repr(s.client_secret)):
        assert "hunter2" not in text
    assert s.client_secret is not None and s.client_secret.reveal() == "hunter2-very-secret"
    token = Token(value="eyJ.secret-token.sig", user_id="sid:1", expires_at=1.0, obtained_at=0.0)
    assert "secret-token" not in repr(token) and "secret-token" not in str(token)
    assert token.fingerprint in repr(token)


def test_jwt_expiry_reads_exp_and_rejects_garbage():
    import base64

    def b64(d: bytes) -> str:
        return base64.urlsafe_b64encode(d).rstrip(b"=").decode()

    tok = f"{b64(b'{}')}.{b64(json.dumps({'exp': 1790000000}).encode())}.sig"
    assert jwt_expiry(tok) == 1790000000.0
    assert jwt_expiry("not-a-jwt") is None
    assert jwt_expiry(f"a.{b64(b'[1]')}.c") is None
    assert jwt_expiry(f"a.{b64(json.dumps({'exp': 'soon'}).encode())}.c") is None


# -- the login against the simulator ------------------------------------------------------------

def test_login_caches_token_0600_with_jwt_expiry(sim, token_cache):
    s = settings_for(sim, token_cache)
    auth = Authenticator(s)
    before = time.time()
    token = auth.get_token()
    assert token.user_id.startswith("sid:")
    # The simulator issues 30-day tokens; expiry must come from the JWT's exp claim.
    assert before + 30 * 86400 - 5 <= token.expires_at <= time.time() + 30 * 86400 + 5
    assert stat.S_IMODE(os.stat(token_cache).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(token_cache.parent).st_mode) == 0o700
    assert TokenCache(token_cache).load() == token
    assert auth.renewals == 1
    # No temporary files left next to the cache.
    assert sorted(p.name for p in token_cache.parent.iterdir()) == ["token.json"]


@pytest.mark.parametrize("mode, who", [(0o644, "others"), (0o640, "its group")])
def test_cache_readable_by_others_is_made_0600_with_a_warning(sim, token_cache, caplog, mode,
                                                              who):
    s = settings_for(sim, token_cache)
    token = Authenticator(s).get_token()
    os.chmod(token_cache, mode)  # copied by hand, say
    with caplog.at_level(logging.WARNING, logger="fastfeed.auth"):
        again = Authenticator(s).get_token()
    assert again == token  # still used: the cache is fixed, not thrown away
    assert stat.S_IMODE(os.stat(token_cache).st_mode) == 0o600
    warning = [r.getMessage() for r in caplog.records if "token cache" in r.getMessage()]
    assert len(warning) == 1 and f"readable by {who}" in warning[0] and "0600" in warning[0]
    assert f"{mode:04o}" in warning[0] and token.value not in warning[0]


def test_cache_is_reused_across_instances(sim, token_cache):
    s = settings_for(sim, token_cache)
    first = Authenticator(s).get_token()
    second_auth = Authenticator(s)
    second = second_auth.get_token()
    assert second == first and second_auth.renewals == 0
    stats = sim.stats()
    assert stats["tokens_issued"] == 1 and stats["exchanges"] == 1


def test_cache_for_another_host_or_client_is_not_used(sim, token_cache):
    s = settings_for(sim, token_cache)
    Authenticator(s).get_token()
    cache = TokenCache(token_cache)
    old = cache.load()
    assert old is not None
    cache.store(Token(value=old.value, user_id=old.user_id, expires_at=old.expires_at,
                      obtained_at=old.obtained_at, host="https://elsewhere.example",
                      client_id=old.client_id))
    auth = Authenticator(s)
    auth.get_token()
    assert auth.renewals == 1 and sim.stats()["exchanges"] == 2


def test_corrupt_cache_is_ignored_and_replaced(sim, token_cache, caplog):
    token_cache.parent.mkdir(parents=True)
    token_cache.write_text("{not json")
    s = settings_for(sim, token_cache)
    with caplog.at_level(logging.WARNING, logger="fastfeed.auth"):
        token = Authenticator(s).get_token()
    assert "ignoring unreadable token cache" in caplog.text
    assert TokenCache(token_cache).load() == token


def test_renews_when_less_than_renew_before_left(start_sim, token_cache):
    sim = start_sim("--token-lifetime", "3600")
    s = settings_for(sim, token_cache)  # default renew_before: 3 days > 1 hour
    auth = Authenticator(s)
    t1 = auth.get_token()
    t2 = Authenticator(s).get_token()
    assert t1 != t2
    s_short = settings_for(sim, token_cache, renew_before=60)
    auth3 = Authenticator(s_short)
    assert auth3.get_token() == t2 and auth3.renewals == 0


def test_expired_token_is_renewed_and_refused_by_feed(start_sim, token_cache):
    sim = start_sim("--token-lifetime", "0")
    s = settings_for(sim, token_cache, renew_before=0)
    token = login(s)
    assert token.remaining() <= 0
    auth = Authenticator(s)
    TokenCache(token_cache).store(token)
    auth.get_token()
    assert auth.renewals == 1  # the cached, expired token was not handed out
    status, body = raw_upgrade(sim, token.value)
    assert status == 401 and "expired" in body


def raw_upgrade(sim, token: str | None) -> tuple[int, str]:
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    if token is not None:
        headers["X-ZUMO-AUTH"] = token
    req = urllib.request.Request(sim.url + "/ws", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def test_bad_secret_is_one_clear_error_and_no_retry(sim, token_cache, caplog):
    s = settings_for(sim, token_cache, client_secret="wrong-secret-123")
    sleeps: list[float] = []
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(CredentialsError) as info:
            Authenticator(s, sleep=no_sleep(sleeps)).get_token()
    err = info.value
    assert err.step == "token" and err.status == 401 and err.code == "AADSTS7000215"
    assert "Invalid client secret" in str(err) and "HTTP 401" in str(err)
    assert "wrong-secret-123" not in str(err) and "wrong-secret-123" not in caplog.text
    assert sleeps == []
    assert sim.stats()["token_requests"] == 1
    assert not token_cache.exists()


@pytest.mark.parametrize(
    ("override", "status", "code"),
    [({"tenant_id": "no-such-tenant"}, 400, "AADSTS90002"),
     ({"client_id": "someone-else"}, 400, "AADSTS700016"),
     ({"scope": "api://fastfeed-sim"}, 400, "AADSTS1002012")],
)
def test_token_step_errors_carry_aadsts(sim, token_cache, override, status, code):
    s = settings_for(sim, token_cache, **override)
    with pytest.raises(CredentialsError) as info:
        fetch_aad_token(s)
    assert (info.value.step, info.value.status, info.value.code) == ("token", status, code)
    assert code in str(info.value)


def test_bad_grant_type_answer(sim):
    # fastfeed always sends client_credentials: check the simulator's answer directly.
    body = urllib.parse.urlencode({"client_id": "fastfeed-sim", "client_secret": SIM_SECRET,
                                   "scope": "x/.default", "grant_type": "password"}).encode()
    req = urllib.request.Request(f"{sim.url}/{SIM_TENANT}/oauth2/v2.0/token", data=body)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    data = json.loads(info.value.read())
    info.value.close()
    assert info.value.code == 400
    assert data["error"] == "unsupported_grant_type" and data["error_codes"] == [70003]


def test_exchange_refuses_a_forged_token(sim, token_cache):
    s = settings_for(sim, token_cache)
    with pytest.raises(CredentialsError) as info:
        exchange_token(s, "eyJhbGciOiJIUzI1NiJ9.eyJraW5kIjoiYWFkIn0.AAAA")
    assert info.value.step == "exchange" and info.value.status == 401
    assert "feed token exchange" in str(info.value) and "invalid signature" in str(info.value)


def test_throttled_token_requests_honour_retry_after(start_sim, token_cache):
    sim = start_sim("--fault", "throttle=2")
    s = settings_for(sim, token_cache)
    sleeps: list[float] = []
    token = login(s, sleep=no_sleep(sleeps))
    assert token.user_id.startswith("sid:")
    assert sleeps == [1.0, 1.0]  # the simulator's Retry-After, not the default back-off
    assert sim.stats()["token_requests"] == 3


def test_throttling_past_the_attempt_limit_fails_with_429(start_sim, token_cache):
    sim = start_sim("--fault", "throttle=10")
    s = settings_for(sim, token_cache, http_attempts=3)
    sleeps: list[float] = []
    with pytest.raises(AuthError) as info:
        login(s, sleep=no_sleep(sleeps))
    assert not isinstance(info.value, CredentialsError)
    assert info.value.status == 429 and len(sleeps) == 2


def test_unreachable_host_is_a_clear_error(token_cache):
    s = load_settings({"host": "http://127.0.0.1:9", "authority": "http://127.0.0.1:9",
                       "tenant_id": "t", "client_id": "c", "client_secret": "s", "scope": "x",
                       "token_cache": str(token_cache), "http_attempts": 2}, env={})
    sleeps: list[float] = []
    with pytest.raises(AuthError, match="Azure AD token request to http://127.0.0.1:9 failed"):
        fetch_aad_token(s, sleep=no_sleep(sleeps))
    assert len(sleeps) == 1


def test_fallback_lifetime_when_exp_unreadable(token_cache):
    # A token without a readable exp: one month from now.
    now = time.time()
    t = Token(value="opaque", user_id="u", expires_at=now + FALLBACK_LIFETIME_S, obtained_at=now)
    TokenCache(token_cache).store(t)
    assert TokenCache(token_cache).load() == t


def test_no_secret_or_token_in_logs(sim, token_cache, caplog):
    s = settings_for(sim, token_cache)
    with caplog.at_level(logging.DEBUG):
        auth = Authenticator(s)
        token = auth.get_token()
        Authenticator(s).get_token()
        auth.renew(refused=token)
    assert caplog.records  # something was logged, so the check below means something
    assert SIM_SECRET not in caplog.text
    assert token.value not in caplog.text
    assert token.fingerprint in caplog.text


# -- fastfeed login -----------------------------------------------------------------------------

def run_cli(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTFEED_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fastfeed", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=60)


def test_cli_login_prints_user_and_expiry_never_the_token(sim, token_cache):
    r = run_cli("login", "--host", sim.url, "--authority", sim.url, "--tenant", SIM_TENANT,
                "--client-id", "fastfeed-sim", "--scope", "api://fastfeed-sim/.default",
                "--token-cache", str(token_cache),
                env_extra={"FASTFEED_CLIENT_SECRET": SIM_SECRET})
    assert r.returncode == 0, r.stderr
    token = TokenCache(token_cache).load()
    assert token is not None
    assert token.user_id in r.stdout and "expires" in r.stdout
    assert token.value not in r.stdout + r.stderr
    assert SIM_SECRET not in r.stdout + r.stderr
    assert stat.S_IMODE(os.stat(token_cache).st_mode) == 0o600


def test_cli_login_bad_secret_is_one_line_nonzero(sim, token_cache):
    r = run_cli("login", "--host", sim.url, "--authority", sim.url, "--tenant", SIM_TENANT,
                "--client-id", "fastfeed-sim", "--client-secret", "nope-nope",
                "--scope", "api://fastfeed-sim/.default", "--token-cache", str(token_cache))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastfeed: error: Azure AD token request")
    assert "AADSTS7000215" in lines[0] and "nope-nope" not in r.stderr
    assert not token_cache.exists()


def test_cli_login_missing_settings(token_cache, tmp_path):
    r = run_cli("login", "--host", "http://127.0.0.1:9", "--token-cache", str(token_cache),
                env_extra={"XDG_CONFIG_HOME": str(tmp_path)})
    assert r.returncode == 2
    assert r.stderr.startswith("fastfeed: error: missing setting(s): tenant_id")
