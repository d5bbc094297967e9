"""Where a connection goes and what ends it: proxy selection, URL checks, and the error for
network failures that retrying cannot fix.

Proxies: an explicit ``proxy`` (``--proxy URL``, ``FASTFEED_PROXY``, ``proxy=``) is used for
every connection to the feed host and the login authority. Without one, the standard
variables apply as curl and requests read them: ``HTTPS_PROXY`` for ``https://`` and
``wss://``, ``HTTP_PROXY`` for ``http://`` and ``ws://``, else ``ALL_PROXY``; a host that
``NO_PROXY`` names (a name, a ``.domain`` suffix, an address, ``*``) is reached directly.
Proxy URLs are ``http://``, ``https://`` (TLS to the proxy), ``socks5://`` or ``socks5h://``
(both: the proxy resolves the host names), with ``user:password@`` when the proxy wants
credentials.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator, Mapping
from urllib.parse import unquote, urlsplit

__all__ = ["PROXY_SCHEMES", "FatalNetworkError", "check_url", "exception_chain",
           "proxy_auth_failure", "proxy_credentials", "proxy_for", "redact_url"]

#: Proxy URL schemes fastfeed can use (for the login and the WebSocket alike).
PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")


class FatalNetworkError(ConnectionError):
    """A network failure that retrying cannot fix: an untrusted, expired or mismatched
    certificate, a refused client certificate, a proxy refusing our credentials, or no
    connection at all for ``connect_timeout`` seconds. The message is one line that says
    what to change."""


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps (cause, context, urllib3's ``reason``, args)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for nxt in (e.__cause__, e.__context__, getattr(e, "reason", None),
                    *[a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def proxy_auth_failure(exc: BaseException, proxy: str) -> str | None:
    """The one-line error when a SOCKS5 proxy refused the user and password given, or
    wants some and none were given (RFC 1929); None for anything else. PySocks (the
    login's requests) raises ``SOCKS5AuthError``; python-socks (the WebSocket) a
    ``ProxyError`` whose reply names the authentication. A proxy that only closes the
    connection cannot be told from one that is down, and is retried."""
    if not urlsplit(proxy).scheme.startswith("socks"):
        return None  # an HTTP proxy says 407, handled by the caller
    for e in exception_chain(exc):
        name = type(e).__name__
        text = str(e)
        if name == "SOCKS5AuthError" or (name in ("ProxyError", "ReplyError")
                                         and "authentication" in text.lower()):
            user, _ = proxy_credentials(proxy)
            if user is None:
                return (f"proxy {redact_url(proxy)} wants a user and password (SOCKS5): "
                        f"put user:password@ in --proxy")
            return (f"proxy {redact_url(proxy)} refused the user and password (SOCKS5 "
                    f"authentication failed): check user:password@ in --proxy")
    return None


def check_url(url: str, what: str, schemes: tuple[str, ...]) -> str:
    """``url`` if it is ``scheme://host[:port]...`` with one of ``schemes`` and a port that
    is a number from 1 to 65535; else ``ValueError`` naming ``what`` and the fault."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{what} {redact_url(url)!r}: {_port_reason(exc)}") from None
    if parts.scheme not in schemes:
        raise ValueError(f"{what} {redact_url(url)!r}: the scheme must be one of "
                         f"{', '.join(s + '://' for s in schemes)}")
    if not parts.hostname:
        raise ValueError(f"{what} {redact_url(url)!r}: no host name")
    if port == 0:
        raise ValueError(f"{what} {redact_url(url)!r}: port 0 is not a port to connect to")
    return url


def _port_reason(exc: ValueError) -> str:
    text = str(exc)
    if "out of range" in text:
        return "the port must be a number from 1 to 65535"
    if "Port could not be cast" in text or "invalid literal" in text:
        return "the port must be a number from 1 to 65535"
    return text


def redact_url(url: str) -> str:
    """``url`` with the password (if any) replaced by ``***``: for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("@")[-1]
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.netloc.rsplit('@', 1)[1]}"
    return parts._replace(netloc=netloc).geturl()


def proxy_for(url: str, explicit: str | None = None,
              env: Mapping[str, str] | None = None) -> str | None:
    """The proxy URL to reach ``url`` through, or None to connect directly.

    ``explicit`` wins; else the ``*_PROXY`` variables of ``env`` (default: the process
    environment), with ``NO_PROXY`` honoured.
    """
    if explicit:
        return explicit
    if env is None:
        proxies = urllib.request.getproxies_environment()
    else:
        proxies = {}
        # the same rules as urllib's: lower case wins over upper case
        for name, value in env.items():
            key = name.lower()
            if value and key.endswith("_proxy") and (key not in proxies or name.islower()):
                proxies[key[:-6]] = value
    parts = urlsplit(url)
    host = parts.hostname or ""
    if "no" in proxies and _bypass(host, parts.port, proxies["no"]):
        return None
    secure = parts.scheme in ("https", "wss")
    return proxies.get("https" if secure else "http") or proxies.get("all") or None


def _bypass(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` (comma-separated names, ``.suffix`` or ``*``) covers ``host``."""
    host = host.lower().strip("[]")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, eport = entry.partition(":") if entry.count(":") == 1 else (entry, "", "")
        if eport and port is not None and eport != str(port):
            continue
        name = name.strip("[]").lstrip("*")
        if host == name.lstrip(".") or (name.startswith(".") and host.endswith(name)) or \
                host.endswith("." + name):
            return True
    return False


def proxy_credentials(proxy: str) -> tuple[str | None, str | None]:
    """``(user, password)`` from a proxy URL (percent-decoded), or ``(None, None)``."""
    parts = urlsplit(proxy)
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return user, password
