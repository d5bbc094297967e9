"""Settings for fastfeed: from keyword arguments, a TOML file and ``FASTFEED_*`` variables.

Precedence, highest first: explicit arguments (the command line), environment variables, the
TOML file, built-in defaults. The TOML file is ``--config PATH``, else ``$FASTFEED_CONFIG``, else
``$XDG_CONFIG_HOME/fastfeed/config.toml`` (``~/.config/fastfeed/config.toml``) when it exists.
Its keys are the field names of :class:`Settings`, at the top level or under a ``[fastfeed]``
table.

The client secret is held in a :class:`Secret`, whose ``repr`` and ``str`` never show the
value, so a ``Settings`` object can be logged or printed in a traceback safely.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ConfigError", "Secret", "Settings", "default_token_cache", "load_settings"]

DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
# The provider's documented heartbeat period.
DEFAULT_HEARTBEAT_S = 15.0
# Renew the feed token when less than this is left: three days leaves room for a weekend
# outage of the identity provider without the feed ever seeing an expired token.
DEFAULT_RENEW_BEFORE_S = 3 * 24 * 3600.0


class ConfigError(ValueError):
    """A setting is missing or has a value fastfeed cannot use."""


class Secret:
    """A string that does not show itself in ``repr``, ``str`` or f-strings.

    Use :meth:`reveal` at the one place the value is needed (the HTTP request body).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret value itself."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable so Settings can be handed to the session process.
        return (Secret, (self._value,))


def default_token_cache() -> Path:
    """The per-user token cache file: ``$XDG_CACHE_HOME/fastfeed/token.json``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastfeed" / "token.json"


def _default_config_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "fastfeed" / "config.toml"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the auth client and the network session need.

    ``host`` is the feed host, either a bare name (``feed.example.com``: HTTPS and WSS) or a
    URL with a scheme (``http://127.0.0.1:8080`` for the simulator: HTTP and plain WS).
    """

    host: str | None = None
    authority: str = DEFAULT_AUTHORITY
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    scope: str | None = None
    email: str | None = None
    token_cache: Path = dataclasses.field(default_factory=default_token_cache)
    renew_before: float = DEFAULT_RENEW_BEFORE_S
    #: Optional JSON text sent after the email message on every connection (in TOML it may be
    #: a table: ``[fastfeed.subscription]``).
    subscription: str | None = None
    heartbeat_interval: float = DEFAULT_HEARTBEAT_S
    #: A connection is dead when no ``pong`` came back for this many heartbeat intervals.
    pong_misses: int = 2
    #: Reconnect back-off: first delay, cap, and how long a connection must live to reset it.
    backoff_first: float = 0.05
    backoff_cap: float = 30.0
    backoff_reset_after: float = 60.0
    #: Verify TLS certificates (never turn off for a real host).
    verify_tls: bool = True
    #: Give up on the two HTTP steps after this many attempts on 429/5xx/network errors.
    http_attempts: int = 5
    http_timeout: float = 20.0
    #: CA certificates (PEM) to trust for the feed host and the login; None: OpenSSL's
    #: defaults (``SSL_CERT_FILE``, ``SSL_CERT_DIR``, else the system store).
    ca_file: Path | None = None
    #: A client certificate (PEM, with its key unless ``client_key`` is given) for mutual TLS.
    client_cert: Path | None = None
    client_key: Path | None = None
    #: Proxy for the login and the WebSocket: http://, https://, socks5://, socks5h://, with
    #: user:password@ if it wants them; None: HTTPS_PROXY/HTTP_PROXY/ALL_PROXY/NO_PROXY.
    #: Not in the repr: it may hold a password.
    proxy: str | None = dataclasses.field(default=None, repr=False)
    #: Give up (one-line error) when no connection succeeded for this many seconds; None:
    #: retry for as long as it takes, every attempt logged.
    connect_timeout: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.client_secret, str):
            object.__setattr__(self, "client_secret", Secret(self.client_secret))
        if not isinstance(self.token_cache, Path):
            object.__setattr__(self, "token_cache", Path(self.token_cache).expanduser())
        if self.heartbeat_interval <= 0:
            raise ConfigError("heartbeat_interval must be positive")
        if self.pong_misses < 1:
            raise ConfigError("pong_misses must be at least 1")
        if self.http_attempts < 1:
            raise ConfigError("http_attempts must be at least 1")
        for name in ("ca_file", "client_cert", "client_key"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value).expanduser())
        if self.connect_timeout is not None and not self.connect_timeout > 0:
            raise ConfigError("connect_timeout must be > 0 seconds")
        self._check_urls()
        self._check_tls_files()

    def _check_urls(self) -> None:
        """A malformed host, authority or proxy fails here, before anything starts."""
        from .net import PROXY_SCHEMES, check_url

        try:
            if self.host:
                host = self.host.rstrip("/")
                check_url(host if "://" in host else "https://" + host,
                          "host (--host, FASTFEED_HOST)", ("http", "https"))
            check_url(self.authority, "authority (--authority, FASTFEED_AUTHORITY)",
                      ("http", "https"))
            if self.proxy:
                check_url(self.proxy, "proxy (--proxy, FASTFEED_PROXY)", PROXY_SCHEMES)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _check_tls_files(self) -> None:
        """A CA file or client certificate that cannot be used fails here, naming the file."""
        import ssl

        from .tls import client_context

        if self.client_key is not None and self.client_cert is None:
            raise ConfigError("client_key needs client_cert (--client-cert FILE)")
        for name in ("ca_file", "client_cert", "client_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"{name} {path}: no such file (--{name.replace('_', '-')}, "
                                  f"FASTFEED_{name.upper()})")
        if self.ca_file is None and self.client_cert is None:
            return
        try:
            client_context(self.ca_file, self.client_cert, self.client_key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            files = ", ".join(f"{n} {getattr(self, n)}" for n in
                              ("ca_file", "client_cert", "client_key") if getattr(self, n))
            raise ConfigError(f"cannot use {files}: {getattr(exc, 'reason', None) or exc} "
                              f"(PEM certificates and an unencrypted PEM key expected)") from None

    def ssl_context(self) -> Any:
        """The client TLS context for the login and the WebSocket (see :mod:`fastfeed.tls`)."""
        from .tls import client_context

        return client_context(self.ca_file, self.client_cert, self.client_key,
                              verify=self.verify_tls)

    # -- derived URLs -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``scheme://host[:port]`` of the feed host (HTTPS unless a scheme was given)."""
        if not self.host:
            raise ConfigError("no feed host configured (--host or FASTFEED_HOST)")
        host = self.host.rstrip("/")
        if "://" not in host:
            host = "https://" + host
        parts = urlsplit(host)
        if parts.scheme not in ("http", "https"):
            raise ConfigError(f"feed host must be http(s)://..., got scheme {parts.scheme!r}")
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def ws_url(self) -> str:
        """The WebSocket URL: ``wss://host/ws`` (``ws://`` when the host is plain HTTP)."""
        base = self.base_url
        return ("wss" + base[5:] if base.startswith("https") else "ws" + base[4:]) + "/ws"

    @property
    def token_url(self) -> str:
        """Step 1 of the login: the authority's client-credentials endpoint for the tenant."""
        if not self.tenant_id:
            raise ConfigError("no tenant configured (--tenant or FASTFEED_TENANT_ID)")
        return f"{self.authority.rstrip('/')}/{self.tenant_id}/oauth2/v2.0/token"

    @property
    def exchange_url(self) -> str:
        """Step 2 of the login: the feed host's token exchange."""
        return self.base_url + "/.auth/login/aad"

    def require(self, *names: str) -> None:
        """Raise :class:`ConfigError` naming every one of ``names`` that is not set."""
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            hints = ", ".join(f"{n} (FASTFEED_{_ENV_ALIASES.get(n, n.upper())})" for n in missing)
            raise ConfigError(f"missing setting(s): {hints}")


# Environment names that differ from the upper-cased field name.
_ENV_ALIASES = {"tenant_id": "TENANT_ID"}

_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_FLOATS = {"renew_before", "heartbeat_interval", "backoff_first", "backoff_cap",
           "backoff_reset_after", "http_timeout", "connect_timeout"}
_PATHS = {"token_cache", "ca_file", "client_cert", "client_key"}
# Variables read once and then taken out of this process's environment, so that the child
# processes fastfeed spawns (which inherit the environment) never hold them: the settings
# reach them pickled through the spawn pipe instead. Kept here for later load_settings().
_SECRET_VARS = ("FASTFEED_CLIENT_SECRET",)
_taken: dict[str, str] = {}
_INTS = {"pong_misses", "http_attempts"}
_BOOLS = {"verify_tls"}
# Accepted spellings on the command line / in files for a few fields.
_KEY_ALIASES = {"tenant": "tenant_id"}


def _coerce(name: str, value: Any, origin: str) -> Any:
    try:
        if name in _FLOATS:
            return float(value)
        if name in _INTS:
            return int(value)
        if name in _BOOLS:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if name in _PATHS:
            return Path(str(value)).expanduser()
        if name == "client_secret":
            return Secret(str(value))
        if name == "subscription":
            # A TOML table (or a Python dict/list) is sent as its JSON text; a string must
            # already be JSON: better to fail here than to have the feed reject it later.
            if isinstance(value, (dict, list)):
                return json.dumps(value, separators=(",", ":"))
            json.loads(str(value))
        return str(value)
    except ValueError:
        # Never echo the value: it might be the secret put in the wrong place.
        raise ConfigError(f"{origin}: bad value for {name}") from None


def load_settings(
    args: Mapping[str, Any] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Build :class:`Settings` from arguments, environment variables and a TOML file.

    ``args`` maps field names (``tenant`` is accepted for ``tenant_id``) to values; ``None``
    values are ignored, so an ``argparse`` namespace's ``vars()`` can be passed as it is, and
    unknown keys are ignored too. ``env`` defaults to ``os.environ``.
    """
    if env is None:
        env = _environ_without_secrets()
    values: dict[str, Any] = {}

    path: Path | None
    if config_file is not None:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
    elif env.get("FASTFEED_CONFIG"):
        path = Path(env["FASTFEED_CONFIG"]).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (from FASTFEED_CONFIG)")
    else:
        path = _default_config_file()
        if not path.is_file():
            path = None
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        table = data.get("fastfeed", data)
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: [fastfeed] must be a table")
        for key, value in table.items():
            name = _KEY_ALIASES.get(key, key)
            if name in _FIELDS and (name == "subscription" or not isinstance(value, dict)):
                values[name] = _coerce(name, value, f"config file {path}")

    for name in _FIELDS:
        var = "FASTFEED_" + _ENV_ALIASES.get(name, name.upper())
        if env.get(var):
            values[name] = _coerce(name, env[var], f"environment variable {var}")

    for key, value in (args or {}).items():
        name = _KEY_ALIASES.get(key, key)
        if value is not None and name in _FIELDS:
            values[name] = _coerce(name, value, f"argument {key}")

    return Settings(**values)


def _environ_without_secrets() -> Mapping[str, str]:
    """``os.environ`` plus the secrets already taken out of it, which are taken out now."""
    for var in _SECRET_VARS:
        value = os.environ.pop(var, None)
        if value:
            _taken[var] = value
    if not _taken:
        return os.environ
    return {**_taken, **os.environ}
