"""TLS for every connection fastfeed makes: the login requests, the WebSocket and the pub/sub
brokers, and the simulator's server side.

Verification is always on. The trust anchors are, in order: ``ca_file`` (``--ca-file``,
``FASTFEED_CA_FILE``, ``ca_file=``) when given, else OpenSSL's defaults, which honour
``SSL_CERT_FILE`` and ``SSL_CERT_DIR``, else the system store. A client certificate
(``client_cert``/``client_key``) is sent when the server asks for one (mutual TLS).

:func:`tls_failure` turns an exception from any of the clients (``ssl``, urllib3, picows,
asyncio) into the one line that says what to change when retrying cannot help: an untrusted,
expired or mismatched server certificate, or a client certificate the server refused.
"""

from __future__ import annotations

import os
import ssl

from .net import exception_chain

__all__ = ["client_context", "server_context", "tls_failure", "trust_source"]

# OpenSSL's verify codes (x509_vfy.h) that need a different fix than "give the CA".
_EXPIRED = 10            # X509_V_ERR_CERT_HAS_EXPIRED
_NOT_YET_VALID = 9       # X509_V_ERR_CERT_NOT_YET_VALID
_HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH
_IP_MISMATCH = 64        # X509_V_ERR_IP_ADDRESS_MISMATCH
# TLS alerts a server sends when it does not accept (or did not get) our client certificate.
_CLIENT_CERT_ALERTS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA",
                       "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED", "ACCESS_DENIED",
                       "CERTIFICATE_REVOKED", "UNSUPPORTED_CERTIFICATE")


def client_context(ca_file: str | os.PathLike[str] | None = None,
                   client_cert: str | os.PathLike[str] | None = None,
                   client_key: str | os.PathLike[str] | None = None,
                   *, verify: bool = True) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca_file`` (else the defaults:
    ``SSL_CERT_FILE``/``SSL_CERT_DIR``, then the system store) and checks its host name;
    with ``client_cert`` (and ``client_key`` unless the key is in the same file) for mutual
    TLS. ``verify=False`` is for the deprecated ``verify_tls`` setting only: callers warn."""
    if ca_file is not None:
        ctx = ssl.create_default_context(cafile=os.fspath(ca_file))
    else:
        ctx = ssl.create_default_context()
    if client_cert is not None:
        ctx.load_cert_chain(os.fspath(client_cert),
                            os.fspath(client_key) if client_key is not None else None)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def server_context(cert: str | os.PathLike[str], key: str | os.PathLike[str] | None = None,
                   client_ca: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A server context presenting ``cert``/``key``; with ``client_ca``, every client must
    present a certificate that CA issued (mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key is not None else None)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=os.fspath(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def trust_source(ca_file: str | os.PathLike[str] | None) -> str:
    """Which CA certificates a :func:`client_context` trusts, in words, for error messages."""
    if ca_file is not None:
        return f"the CA file {os.fspath(ca_file)}"
    env = [f"{var}={os.environ[var]}" for var in ("SSL_CERT_FILE", "SSL_CERT_DIR")
           if os.environ.get(var)]
    if env:
        return " and ".join(env)
    paths = ssl.get_default_verify_paths()
    where = paths.cafile or paths.capath or paths.openssl_cafile
    return f"the system trust store ({where})" if where else "the system trust store"


def tls_failure(exc: BaseException, where: str, *, ca_file: str | os.PathLike[str] | None,
                client_cert: str | os.PathLike[str] | None = None) -> str | None:
    """The one-line error for a TLS failure retrying cannot fix, or None for anything else.

    ``where``: the ``host:port`` that was connected to (named in the line, with the CA
    certificates that were used and the option that fixes it).
    """
    for e in exception_chain(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            code = e.verify_code
            why = e.verify_message or e.reason or str(e)
            trusted = trust_source(ca_file)
            if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
                return (f"TLS certificate of {where} does not match the name connected to "
                        f"({why}): connect by a name the certificate holds (--host, or "
                        f"--authority for the login) or have the server's certificate "
                        f"reissued with this name")
            if code in (_EXPIRED, _NOT_YET_VALID):
                return (f"TLS certificate of {where} is not valid now ({why}): the server's "
                        f"certificate must be renewed (or this machine's clock is wrong); "
                        f"CA certificates used: {trusted}")
            return (f"TLS certificate of {where} is not trusted ({why}); CA certificates "
                    f"used: {trusted}: give the CA that issued it with --ca-file FILE "
                    f"(FASTFEED_CA_FILE, ca_file=)")
        if isinstance(e, ssl.SSLError) and not isinstance(e, ssl.SSLCertVerificationError):
            reason = str(e.reason or "")
            if any(alert in reason for alert in _CLIENT_CERT_ALERTS):
                if client_cert is None:
                    return (f"{where} requires a client certificate (TLS alert {reason}): "
                            f"give one with --client-cert FILE --client-key FILE (client_cert=, "
                            f"client_key= in a source URL)")
                return (f"{where} refused the client certificate {os.fspath(client_cert)} "
                        f"(TLS alert {reason}): give one its CA accepts with --client-cert "
                        f"and --client-key (client_cert=, client_key= in a source URL)")
    return None
