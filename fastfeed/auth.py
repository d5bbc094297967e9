"""Login to the feed (PROTOCOL.md section 1) and the owner-only token cache.

Two HTTP requests, on the cold path, with urllib3 (:mod:`fastfeed.httpclient`: why there):
the same TLS context (``ca_file``, client certificate) and the same proxies as the WebSocket.

1. Azure AD client credentials: ``POST {authority}/{tenant}/oauth2/v2.0/token``.
2. The feed host's exchange: ``POST https://{host}/.auth/login/aad`` gives the long-lived
   ``authenticationToken`` that every WebSocket upgrade carries as ``X-ZUMO-AUTH``.

Nothing here prints or logs a secret or a token; a :class:`Token` shows only a fingerprint.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .backoff import Backoff
from .config import ConfigError, Settings
from .httpclient import HTTPClient, Response, TransientHTTPError

__all__ = [
    "AuthError",
    "Authenticator",
    "CredentialsError",
    "Token",
    "TokenCache",
    "exchange_token",
    "fetch_aad_token",
    "jwt_expiry",
    "login",
]

log = logging.getLogger("fastfeed.auth")

# Fallback lifetime of the feed token when its JWT carries no readable `exp` (the provider
# documents "about one month").
FALLBACK_LIFETIME_S = 30 * 24 * 3600.0
# Never sleep longer than this on a server's Retry-After: past it, failing loudly is kinder.
MAX_RETRY_AFTER_S = 120.0


class AuthError(Exception):
    """A login step failed. ``step`` is ``"token"`` (Azure AD) or ``"exchange"`` (feed host).

    The message says which step, the HTTP status and the server's own reason (the AADSTS code
    and description for Azure AD); it never contains a secret or a token.
    """

    def __init__(
        self,
        step: str,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        description: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.status = status
        self.code = code
        self.description = description
        #: Seconds the server asked to wait before the next try (429/503 Retry-After).
        self.retry_after = retry_after


class CredentialsError(AuthError):
    """The server rejected the credentials or the request itself: retrying cannot help."""


def _fingerprint(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:8]


@dataclasses.dataclass(frozen=True)
class Token:
    """The feed's ``authenticationToken``, its owner and its expiry (seconds since epoch)."""

    value: str = dataclasses.field(repr=False)
    user_id: str
    expires_at: float
    obtained_at: float
    #: The feed host and client the token was issued for: a cache entry for another is ignored.
    host: str = ""
    client_id: str = ""

    @property
    def fingerprint(self) -> str:
        """A short, non-reversible tag for logs: the first 8 hex digits of SHA-256."""
        return _fingerprint(self.value)

    def remaining(self, now: float | None = None) -> float:
        """Seconds until expiry (negative once expired)."""
        return self.expires_at - (time.time() if now is None else now)

    def __repr__(self) -> str:
        return (f"Token(fingerprint={self.fingerprint!r}, user_id={self.user_id!r}, "
                f"expires_at={self.expires_at!r})")

    __str__ = __repr__


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (seconds since epoch), or ``None`` if it cannot be read.

    The signature is not checked: the feed host checks it; the client only needs to know
    when to renew.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
        exp = claims.get("exp") if isinstance(claims, dict) else None
    except (ValueError, TypeError):
        return None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        return None
    return float(exp)


# -- HTTP ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _client(settings: Settings) -> HTTPClient:
    """One HTTP client per settings: the two login steps (and later renewals) share its
    connections, TLS context and proxies."""
    if not settings.verify_tls:
        log.warning("TLS verification is OFF (verify_tls=false): anyone on the path can "
                    "read the login and the token")
    return HTTPClient(settings.ssl_context(), proxy=settings.proxy, ca_file=settings.ca_file,
                      client_cert=settings.client_cert)


def _post_with_retries(
    step: str, url: str, body: bytes, content_type: str, settings: Settings,
    sleep: Callable[[float], None], deadline: float | None = None,
    attempts: int | None = None,
) -> Response:
    """POST, retrying no answer (refused, DNS, timeouts), 429 and 5xx with the shared
    back-off (:mod:`fastfeed.backoff`), up to ``settings.http_attempts`` attempts and not
    past ``deadline`` (``time.monotonic()``). Each retry is logged once with its reason and
    the delay. A server's ``Retry-After`` wins over the computed delay (up to
    ``MAX_RETRY_AFTER_S``). Any other 4xx returns at once: bad credentials never loop; a
    certificate that cannot be trusted raises :class:`~fastfeed.net.FatalNetworkError`.
    """
    what = "Azure AD token request" if step == "token" else "feed token exchange"
    backoff = Backoff(0.5, 30.0)
    client = _client(settings)
    attempts = attempts or settings.http_attempts
    for attempt in range(1, attempts + 1):
        timeout = settings.http_timeout
        if deadline is not None:
            timeout = max(0.1, min(timeout, deadline - time.monotonic()))
        last = attempt == attempts
        try:
            resp = client.post(url, body, content_type, connect_timeout=min(timeout, 10.0),
                               read_timeout=timeout)
        except TransientHTTPError as exc:
            reason = str(exc)
            if last or (deadline is not None and time.monotonic() >= deadline):
                raise AuthError(step, f"{what} to {_origin(url)} failed: {reason}") from None
            wait = backoff.next()
        else:
            if resp.status != 429 and resp.status < 500:
                return resp
            if last:
                return resp
            reason = f"HTTP {resp.status}"
            wait = resp.retry_after if resp.retry_after is not None else backoff.next()
            wait = min(wait, MAX_RETRY_AFTER_S)
        if deadline is not None and time.monotonic() + wait >= deadline:
            raise AuthError(step, f"{what} to {_origin(url)} failed: {reason}")
        log.warning("%s to %s: %s; attempt %d of %d, next in %.1fs", what, _origin(url),
                    reason, attempt, attempts, wait)
        sleep(wait)
    raise AssertionError("unreachable")


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _short(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


def fetch_aad_token(settings: Settings, *, sleep: Callable[[float], None] = time.sleep,
                    deadline: float | None = None, attempts: int | None = None) -> str:
    """Step 1: the Azure AD client-credentials access token (a JWT), or :class:`AuthError`."""
    settings.require("tenant_id", "client_id", "client_secret", "scope")
    assert settings.client_secret is not None
    form = urllib.parse.urlencode({
        "client_id": settings.client_id,
        "scope": settings.scope,
        "client_secret": settings.client_secret.reveal(),
        "grant_type": "client_credentials",
    }).encode()
    resp = _post_with_retries("token", settings.token_url, form,
                              "application/x-www-form-urlencoded", settings, sleep, deadline,
                              attempts)
    data = _json(resp.body)
    if resp.status == 200:
        token = data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthError("token", "Azure AD token request: HTTP 200 without an access_token",
                            status=200)
        return token
    code = desc = None
    if isinstance(data, dict):
        desc = str(data.get("error_description") or data.get("error") or "").strip() or None
        if desc:
            # Azure AD appends "Trace ID: ...", "Correlation ID: ..." lines: keep the reason.
            desc = desc.splitlines()[0].strip()
        codes = data.get("error_codes")
        if isinstance(codes, list) and codes:
            code = f"AADSTS{codes[0]}"
        elif desc and desc.startswith("AADSTS"):
            code = desc.split(":", 1)[0]
        error = data.get("error")
    else:
        error = None
    detail = desc or _short(resp.body) or "(empty body)"
    if error and desc and not desc.startswith(str(error)):
        detail = f"{error}: {desc}"
    cls = AuthError if resp.status == 429 or resp.status >= 500 else CredentialsError
    hint = _AADSTS_HINTS.get(code or "", _DEFAULT_HINT) if cls is CredentialsError else ""
    raise cls("token", f"Azure AD token request failed: HTTP {resp.status}: {detail}{hint}",
              status=resp.status, code=code, description=desc, retry_after=resp.retry_after)


# What to change for the Azure AD refusals met in practice (the code is in every answer).
_DEFAULT_HINT = " -- check --tenant, --client-id, --client-secret and --scope"
_AADSTS_HINTS = {
    "AADSTS7000215": " -- check the client secret (FASTFEED_CLIENT_SECRET or the config "
                     "file): the secret's value, not its id",
    "AADSTS7000222": " -- the client secret has expired: create a new one for the app",
    "AADSTS700016": " -- check --client-id (and --tenant: the app must be in that directory)",
    "AADSTS90002": " -- check --tenant",
    "AADSTS900023": " -- check --tenant",
    "AADSTS1002012": " -- check --scope: it must end in /.default",
    "AADSTS70011": " -- check --scope: it must end in /.default",
    "AADSTS90014": " -- give --scope",
}


def exchange_token(
    settings: Settings, access_token: str, *, sleep: Callable[[float], None] = time.sleep,
    deadline: float | None = None, attempts: int | None = None,
) -> Token:
    """Step 2: trade the Azure AD token for the feed's ``authenticationToken``."""
    body = json.dumps({"access_token": access_token}).encode()
    resp = _post_with_retries("exchange", settings.exchange_url, body, "application/json",
                              settings, sleep, deadline, attempts)
    data = _json(resp.body)
    if resp.status != 200:
        desc = None
        if isinstance(data, dict):
            desc = str(data.get("error") or data.get("message") or data.get("error_description")
                       or "").strip() or None
        detail = desc or _short(resp.body) or "(empty body)"
        cls = AuthError if resp.status == 429 or resp.status >= 500 else CredentialsError
        hint = ""
        if resp.status == 403:
            hint = (" -- the feed host refuses this app: ask the provider to entitle its "
                    "client id to the feed")
        elif resp.status == 401:
            hint = " -- check --scope: the Azure AD token must be for the feed host's app"
        raise cls("exchange",
                  f"feed token exchange at {_origin(settings.exchange_url)} failed: "
                  f"HTTP {resp.status}: {detail}{hint}", status=resp.status, description=desc,
                  retry_after=resp.retry_after)
    value = data.get("authenticationToken") if isinstance(data, dict) else None
    if not isinstance(value, str) or not value:
        raise AuthError("exchange", "feed token exchange: HTTP 200 without an authenticationToken",
                        status=200)
    user = data.get("user") if isinstance(data, dict) else None
    user_id = str(user.get("userId", "")) if isinstance(user, dict) else ""
    now = time.time()
    exp = jwt_expiry(value)
    return Token(value=value, user_id=user_id,
                 expires_at=exp if exp is not None else now + FALLBACK_LIFETIME_S,
                 obtained_at=now, host=settings.base_url, client_id=settings.client_id or "")


def login(settings: Settings, *, sleep: Callable[[float], None] = time.sleep,
          deadline: float | None = None, attempts: int | None = None) -> Token:
    """Both steps: a fresh feed token (not cached; see :class:`Authenticator`).

    ``deadline`` (``time.monotonic()``): give up retrying past it (``connect_timeout``).
    ``attempts``: per request, instead of ``settings.http_attempts`` (the session passes 1:
    its own back-off retries the whole login, so that each attempt is logged once)."""
    access = fetch_aad_token(settings, sleep=sleep, deadline=deadline, attempts=attempts)
    return exchange_token(settings, access, sleep=sleep, deadline=deadline, attempts=attempts)


# -- cache --------------------------------------------------------------------------------------

class TokenCache:
    """One JSON file holding the feed token, readable only by its owner (mode 0600).

    Writes are atomic (a temporary file in the same directory, fsync, rename), so a crash
    never leaves a half-written cache and a reader never sees one.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"TokenCache({str(self.path)!r})"

    def load(self) -> Token | None:
        """The cached token, or ``None`` when there is none or the file is unreadable.

        A cache that group or others may read (copied by hand, say) is made owner-only
        (0600) first, with a warning that says so: the token in it may have been read."""
        try:
            self._owner_only()
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return Token(value=str(data["token"]), user_id=str(data.get("user_id", "")),
                         expires_at=float(data["expires_at"]),
                         obtained_at=float(data.get("obtained_at", 0.0)),
                         host=str(data.get("host", "")), client_id=str(data.get("client_id", "")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable token cache %s (%s)", self.path, type(exc).__name__)
            return None

    def _owner_only(self) -> None:
        st = os.stat(self.path)  # FileNotFoundError: no cache
        if st.st_mode & 0o077:
            os.chmod(self.path, 0o600)
            log.warning("token cache %s was readable by %s (mode %04o): made it 0600; the "
                        "token in it may have been read (run 'fastfeed login' for a new one)",
                        self.path, "others" if st.st_mode & 0o007 else "its group",
                        stat.S_IMODE(st.st_mode))

    def store(self, token: Token) -> None:
        """Write ``token`` atomically with mode 0600 (directory created 0700)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = json.dumps({
            "token": token.value, "user_id": token.user_id, "expires_at": token.expires_at,
            "obtained_at": token.obtained_at, "host": token.host, "client_id": token.client_id,
        }).encode()
        # mkstemp creates the file 0600 from the start: the token is never readable by others,
        # not even for the instant before a chmod.
        fd, tmp = tempfile.mkstemp(prefix=".token-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def clear(self) -> None:
        """Remove the cache file if it exists."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Authenticator:
    """Hands out a usable feed token: from the cache while it has time left, else a new login.

    ``renewals`` counts logins made because a token was missing, near expiry or refused.
    """

    def __init__(self, settings: Settings, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self.cache = TokenCache(settings.token_cache)
        self.renewals = 0
        self._sleep = sleep
        self._token: Token | None = None

    def _usable(self, token: Token | None) -> bool:
        if token is None:
            return False
        try:
            base = self.settings.base_url
        except ConfigError:
            return False
        if token.host != base or token.client_id != (self.settings.client_id or ""):
            return False
        return token.remaining() > self.settings.renew_before

    def get_token(self, deadline: float | None = None, attempts: int | None = None) -> Token:
        """A token with more than ``renew_before`` seconds left, logging in if needed
        (retrying transient failures up to ``deadline``, a ``time.monotonic()``)."""
        if self._usable(self._token):
            assert self._token is not None
            return self._token
        cached = self.cache.load()
        if self._usable(cached):
            self._token = cached
            log.debug("using cached feed token %s", cached.fingerprint if cached else "")
            assert cached is not None
            return cached
        return self.renew(deadline=deadline, attempts=attempts)

    def renew(self, refused: Token | None = None, deadline: float | None = None,
              attempts: int | None = None) -> Token:
        """Log in again (both steps), cache and return the new token.

        ``refused`` is the token the feed host just refused; it is never handed out again.
        """
        if refused is not None:
            log.info("feed host refused token %s; logging in again", refused.fingerprint)
        token = login(self.settings, sleep=self._sleep, deadline=deadline, attempts=attempts)
        self.renewals += 1
        self._token = token
        try:
            self.cache.store(token)
        except OSError as exc:
            log.warning("could not write token cache %s: %s", self.cache.path, exc)
        log.info("new feed token %s for %s, expires %s", token.fingerprint, token.user_id,
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(token.expires_at)))
        return token
