"""What every ``fastfeed`` command shares: exit statuses, the one-line error, the settings options.

Its own module so that :mod:`fastfeed.cli` (the parser, the simple commands) and
:mod:`fastfeed.cli_feed` (the commands that run a feed) both import it and not each other.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["EXIT_DROPPED", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_USAGE", "CommandError",
           "add_network_arguments", "add_settings_arguments", "settings_from_args"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DROPPED = 3  # the run finished, but frames or rows were dropped (a dropping full policy)
EXIT_INTERRUPTED = 130  # stopped by SIGINT (Ctrl-C), after an orderly drain and the summary


class CommandError(Exception):
    """An error to print as one line, with the exit status it maps to."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def add_settings_arguments(p: argparse.ArgumentParser) -> None:
    """The connection and login options shared by every command that talks to a feed.

    Each defaults to ``None`` so that unset options fall through to ``FASTFEED_*`` variables
    and the TOML file (see :func:`fastfeed.config.load_settings`).
    """
    g = p.add_argument_group("feed and login settings (also FASTFEED_* variables or --config)")
    g.add_argument("--config", metavar="PATH", help="TOML settings file")
    g.add_argument("--host", metavar="URL",
                   help="feed host: a name (HTTPS/WSS) or http://HOST:PORT (the simulator)")
    g.add_argument("--authority", metavar="URL",
                   help="Azure AD authority (default https://login.microsoftonline.com)")
    g.add_argument("--tenant", metavar="ID", help="Azure AD tenant id")
    g.add_argument("--client-id", metavar="ID")
    g.add_argument("--client-secret", metavar="SECRET",
                   help="prefer FASTFEED_CLIENT_SECRET or the config file: "
                        "arguments are visible to other local users")
    g.add_argument("--scope", metavar="SCOPE", help="e.g. api://<app-id>/.default")
    g.add_argument("--token-cache", metavar="PATH",
                   help="token cache file (default ~/.cache/fastfeed/token.json)")
    add_network_arguments(p)


def add_network_arguments(p: argparse.ArgumentParser) -> None:
    """TLS, proxy and connect-timeout options (for the login and the WebSocket alike).

    Each defaults to None so that FASTFEED_* variables and the config file fill in; the
    values are checked when the settings are built (one-line error before anything starts).
    """
    g = p.add_argument_group("network: TLS and proxies (also FASTFEED_CA_FILE, "
                             "FASTFEED_PROXY, HTTPS_PROXY, NO_PROXY...)")
    g.add_argument("--ca-file", metavar="FILE",
                   help="CA certificates (PEM) to trust for the feed host and the login "
                        "(default: SSL_CERT_FILE / SSL_CERT_DIR, else the system store)")
    g.add_argument("--client-cert", metavar="FILE",
                   help="client certificate (PEM) for mutual TLS")
    g.add_argument("--client-key", metavar="FILE",
                   help="its private key (PEM; default: in --client-cert)")
    g.add_argument("--proxy", metavar="URL",
                   help="proxy for the login and the WebSocket: http://, https://, socks5:// "
                        "(user:password@ allowed; default: HTTPS_PROXY/ALL_PROXY/NO_PROXY)")
    g.add_argument("--connect-timeout", type=float, metavar="S",
                   help="give up when no connection has succeeded for S seconds "
                        "(default: keep retrying, every attempt logged)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The :class:`~fastfeed.config.Settings` the parsed options give, with ``FASTFEED_*``
    variables and the ``--config`` file filling the rest."""
    from .config import load_settings

    return load_settings(vars(args), config_file=getattr(args, "config", None))
