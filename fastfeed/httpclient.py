"""The HTTP client of the login (PROTOCOL.md section 1): urllib3.

Why urllib3 rather than the standard library's ``urllib``: the same ``ssl.SSLContext`` as the
WebSocket (CA file, client certificate) goes in as it is; HTTP and HTTPS proxies (CONNECT,
TLS to the proxy and TLS inside it) and SOCKS5 (with PySocks) with credentials; separate
connect and read timeouts; connections kept and reused between the two login steps. It is
synchronous (the login is two requests a month, run off the event loop in an executor), has
no dependency of its own besides PySocks for SOCKS, and is the HTTP core under requests and
pip, so it is already installed nearly everywhere. See README "Networks: TLS and proxies".

Nothing here retries: :func:`fastfeed.auth` decides what is worth a retry.
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import ssl
import threading
import time
import warnings
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .net import FatalNetworkError, proxy_auth_failure, proxy_credentials, proxy_for, redact_url
from .tls import tls_failure

__all__ = ["HTTPClient", "Response", "TransientHTTPError"]

_USER_AGENT = "fastfeed"


class TransientHTTPError(ConnectionError):
    """The request did not get an answer (refused, DNS, timeout, reset): worth a retry.
    The message is one short line without the request body."""


@dataclasses.dataclass
class Response:
    status: int
    body: bytes
    #: Seconds the server asked to wait (``Retry-After``), if it said.
    retry_after: float | None


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds to wait: a number, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HTTPClient:
    """POSTs with one TLS context, through the proxy each URL needs, keeping connections.

    ``proxy``: an explicit proxy URL for every request; None: the ``*_PROXY``/``NO_PROXY``
    variables decide per URL (see :mod:`fastfeed.net`).
    """

    def __init__(self, ssl_context: ssl.SSLContext, *, proxy: str | None = None,
                 ca_file: Any = None, client_cert: Any = None) -> None:
        self.ssl_context = ssl_context
        self.proxy = proxy
        self._ca_file, self._client_cert = ca_file, client_cert
        self._managers: dict[str | None, Any] = {}
        self._lock = threading.Lock()

    def _manager(self, proxy: str | None) -> Any:
        import urllib3

        with self._lock:
            mgr = self._managers.get(proxy)
            if mgr is not None:
                return mgr
            kw: dict[str, Any] = {"ssl_context": self.ssl_context, "retries": False,
                                  "headers": {"User-Agent": _USER_AGENT}}
            if proxy is None:
                mgr = urllib3.PoolManager(**kw)
            elif urlsplit(proxy).scheme.startswith("socks"):
                try:
                    from urllib3.contrib.socks import SOCKSProxyManager
                except ImportError:  # PySocks missing
                    raise FatalNetworkError(
                        "a socks5:// proxy for the login needs PySocks: "
                        "pip install 'urllib3[socks]'") from None
                user, password = proxy_credentials(proxy)
                # The proxy resolves the host name (socks5h), as it does for the WebSocket
                # (python-socks): behind a proxy, the local resolver may know no outside name.
                url = _without_credentials(proxy)
                if url.startswith("socks5:"):
                    url = "socks5h:" + url[7:]
                mgr = SOCKSProxyManager(url, username=user, password=password, **kw)
            else:
                user, password = proxy_credentials(proxy)
                headers = None
                if user is not None:
                    basic = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
                    # Canonical case: some proxies match the header name case-sensitively.
                    headers = {"Proxy-Authorization": f"Basic {basic}"}
                mgr = urllib3.ProxyManager(
                    _without_credentials(proxy), proxy_headers=headers,
                    # TLS to an https:// proxy is verified like the feed's (same CA file)
                    proxy_ssl_context=self.ssl_context if proxy.startswith("https:") else None,
                    **kw)
            self._managers[proxy] = mgr
            return mgr

    def post(self, url: str, body: bytes, content_type: str, *, connect_timeout: float,
             read_timeout: float) -> Response:
        """POST ``body``; the answer whatever its status, or :class:`TransientHTTPError`
        (no answer), or :class:`~fastfeed.net.FatalNetworkError` (retrying cannot help)."""
        import urllib3

        proxy = proxy_for(url, self.proxy)
        parts = urlsplit(url)
        where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        via = f" through proxy {redact_url(proxy)}" if proxy else ""
        try:
            with warnings.catch_warnings():
                # verify_tls=false: the caller has logged its own warning, once, already
                warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                resp = self._manager(proxy).request(
                    "POST", url, body=body,
                    headers={"Content-Type": content_type, "Accept": "application/json"},
                    timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
                    redirect=False, preload_content=True)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            fatal = tls_failure(exc, where, ca_file=self._ca_file,
                                client_cert=self._client_cert)
            if fatal is not None:
                raise FatalNetworkError(fatal) from None
            if proxy and (refused := proxy_auth_failure(exc, proxy)) is not None:
                raise FatalNetworkError(refused) from None
            reason = _reason(exc, parts.hostname or "")
            if proxy and "407" in reason:
                raise FatalNetworkError(
                    f"proxy {redact_url(proxy)} refused the request with 407 (proxy "
                    f"authentication required): put user:password@ in --proxy") from None
            raise TransientHTTPError(f"{reason}{via}") from None
        return Response(resp.status, resp.data, parse_retry_after(resp.headers.get("Retry-After")))

    def close(self) -> None:
        with self._lock:
            for mgr in self._managers.values():
                mgr.clear()
            self._managers.clear()


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _reason(exc: BaseException, host: str) -> str:
    """A short reason without urllib3's object reprs: 'connection refused', 'timed out'..."""
    import socket

    import urllib3

    inner: BaseException = exc
    while True:
        nxt = getattr(inner, "reason", None) or inner.__cause__
        if not isinstance(nxt, BaseException) or nxt is inner:
            break
        inner = nxt
    if isinstance(inner, (socket.gaierror, urllib3.exceptions.NameResolutionError)):
        why = inner.strerror if isinstance(inner, socket.gaierror) else "no address"
        return f"DNS: {host} does not resolve ({why})"
    text = " ".join(str(inner).split())
    # "HTTPConnection(host=..., port=...): Failed to establish ...: [Errno 111] ..." -> tail
    if "): " in text:
        text = text.split("): ", 1)[1]
    return f"{type(inner).__name__}: {text}"[:300]
