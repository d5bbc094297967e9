"""Source URLs: ``scheme://[user[:password]@]host[:port][/path]?key=value&...``.

Parsed once in the parent (so a typo fails at once, not in a child process), checked against
the parameters the source accepts, and never shown with its password: :attr:`SourceURL.redacted`
is what logs, errors and ``repr`` use.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["SourceURL", "SourceURLError"]


class SourceURLError(ValueError):
    """A source URL that cannot be used (unknown scheme, missing or unknown parameter)."""


@dataclasses.dataclass(frozen=True)
class SourceURL:
    """A parsed source URL. ``params`` keeps every value given for a key, in order."""

    scheme: str
    host: str
    port: int | None
    username: str | None
    password: str | None
    path: str
    params: dict[str, list[str]]
    text: str = dataclasses.field(repr=False)
    #: Every ``host:port`` of a multi-host netloc (``kafka://k1:9092,k2:9092``), else one.
    hosts: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> SourceURL:
        """Split ``text`` into its parts (percent-escapes in user, password and path decoded)."""
        parts = urlsplit(text)
        if not parts.scheme or "://" not in text:
            raise SourceURLError("a source is a URL such as redis://HOST:PORT/0?channel=feed")
        userinfo, at, hostpart = parts.netloc.rpartition("@")
        hosts = tuple(h for h in hostpart.split(",") if h)
        if len(hosts) > 1:
            # Parse the first of several brokers; the others are kept as they are.
            parts = parts._replace(netloc=f"{userinfo}{at}{hosts[0]}")
        try:
            port = parts.port
        except ValueError as exc:
            raise SourceURLError(f"bad port in source URL: {exc}") from None
        params = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
        return cls(scheme=parts.scheme.lower(), host=parts.hostname or "127.0.0.1", port=port,
                   username=unquote(parts.username) if parts.username else None,
                   password=unquote(parts.password) if parts.password is not None else None,
                   path=unquote(parts.path), params=params, text=text, hosts=hosts)

    def __repr__(self) -> str:
        return f"SourceURL({self.redacted!r})"

    @property
    def redacted(self) -> str:
        """The URL with the password replaced by ``***`` (what may be logged)."""
        netloc = self.endpoint
        if self.username is not None or self.password is not None:
            user = quote(self.username or "", safe="")
            netloc = f"{user}{':***' if self.password is not None else ''}@{netloc}"
        query = "&".join(f"{k}={quote(v, safe='*>,.:{}')}" for k, vs in self.params.items()
                         for v in vs)
        return f"{self.scheme}://{netloc}{quote(self.path)}" + (f"?{query}" if query else "")

    @property
    def endpoint(self) -> str:
        """``host:port`` (every one of a multi-host URL), for error messages."""
        if len(self.hosts) > 1:
            return ",".join(self.hosts)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"

    def scrub(self, text: str) -> str:
        """``text`` with the password (plain and percent-encoded) blanked out."""
        if self.password:
            for form in {self.password, quote(self.password, safe="")}:
                text = text.replace(form, "***")
        return text

    # -- typed access -------------------------------------------------------------------------

    def check(self, allowed: tuple[str, ...]) -> None:
        """Fail on a parameter the source does not know (a typo would otherwise be ignored)."""
        unknown = sorted(set(self.params) - set(allowed))
        if unknown:
            raise SourceURLError(f"{self.scheme}:// does not take {', '.join(unknown)} "
                                 f"(it takes {', '.join(sorted(allowed))})")

    def list(self, key: str) -> list[str]:
        """Every value of ``key``, repeated keys and comma-separated values alike."""
        return [v for raw in self.params.get(key, []) for v in raw.split(",") if v]

    def str(self, key: str, default: str | None = None) -> str | None:
        """The last value of ``key`` (or ``default``)."""
        values = self.params.get(key)
        return values[-1] if values else default

    def require(self, key: str) -> str:
        v = self.str(key)
        if not v:
            raise SourceURLError(f"{self.scheme}:// needs {key}= ({self.redacted})")
        return v

    def int(self, key: str, default: int) -> int:
        v = self.str(key)
        if v is None or v == "":
            return default
        try:
            return int(v)
        except ValueError:
            raise SourceURLError(f"{key}= must be an integer, not {v!r}") from None

    def float(self, key: str, default: float) -> float:
        v = self.str(key)
        if v is None or v == "":
            return default
        try:
            return float(v)
        except ValueError:
            raise SourceURLError(f"{key}= must be a number, not {v!r}") from None

    def bool(self, key: str, default: bool) -> bool:
        v = self.str(key)
        if v is None or v == "":
            return default
        low = v.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise SourceURLError(f"{key}= must be true or false, not {v!r}")
