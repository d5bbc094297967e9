"""The ``fastfeed`` command: ``fastfeed sim`` and ``fastfeed login`` (more subcommands to come).

Each subcommand is one ``_add_<name>(subparsers)`` function that defines its arguments and
sets ``func``; adding a command is adding one such function to ``_COMMANDS``. Errors the user
can act on (bad settings, a refused login) print as one line, ``fastfeed: error: ...``, and
exit non-zero, with no traceback.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["EXIT_DROPPED", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_USAGE", "CommandError",
           "add_settings_arguments", "build_parser", "main"]

# Shared with fastfeed.cli_feed, which this module imports (never the other way round).
from .cli_common import (
    EXIT_DROPPED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CommandError,
    add_settings_arguments,
    settings_from_args,
)

# -- sim --------------------------------------------------------------------------------------

def _mix(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected three numbers, e.g. 0.7,0.25,0.05") from None
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise argparse.ArgumentTypeError("expected three non-negative shares, e.g. 0.7,0.25,0.05")
    return parts  # type: ignore[return-value]


def _add_sim(sub: Any) -> None:
    from .sim.server import _FAULT_HELP
    faults = "; ".join(f"{k}: {v}" for k, v in _FAULT_HELP.items())
    p = sub.add_parser(
        "sim", help="run the feed simulator (token endpoint, /.auth/login/aad, /ws)",
        description="Serve a synthetic feed on one port: the Azure AD token endpoint, the "
                    "feed's token exchange and the WebSocket. The first line printed is "
                    "'listening on http://HOST:PORT'.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    p.add_argument("--rate", type=float, default=1000.0, metavar="MSGS_PER_S",
                   help="data frames per second per connection (generated live with the "
                        "wall clock, up to some 50k/s); 0 = as fast as possible (a "
                        "pre-encoded pool, cycled: millions per second)")
    p.add_argument("--symbols", type=int, default=100, metavar="N",
                   help="number of symbols in the synthetic market (default 100)")
    p.add_argument("--count", type=int, default=None, metavar="FRAMES",
                   help="stop sending data after FRAMES frames (connections stay open)")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="exit after S seconds (default: run until interrupted)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the market (default 0)")
    p.add_argument("--client-id", default="fastfeed-sim", metavar="ID",
                   help="client id the token endpoint accepts (default fastfeed-sim)")
    p.add_argument("--client-secret", default="fastfeed-sim-secret", metavar="S",
                   help="client secret it accepts (default fastfeed-sim-secret)")
    p.add_argument("--tenant", default="fastfeed-sim", metavar="T",
                   help="tenant in the token URL (default fastfeed-sim)")
    p.add_argument("--token-lifetime", type=float, default=30 * 24 * 3600.0, metavar="S",
                   help="lifetime of issued feed tokens (default 30 days)")
    p.add_argument("--mix", type=_mix, default=(0.7, 0.25, 0.05), metavar="T,Q,B",
                   help="shares of tick, quote and series frames (default 0.7,0.25,0.05)")
    p.add_argument("--start-time", type=float, default=None, metavar="EPOCH_S",
                   help="timestamp of the first frame at rate 0 (default: now)")
    p.add_argument("--fault", action="append", default=[], metavar="NAME[=V]",
                   help=f"inject a fault (repeatable). {faults}")
    p.add_argument("--stamp-send", action="store_true",
                   help='every tick\'s "t" is the time its frame is written to the socket, '
                        "for wire-to-array latency measurement (not with --fault fragment)")
    p.add_argument("--write-interval-us", type=int, default=0, metavar="US",
                   help="paced rates: write every US µs (default 0: about every 1 ms, so "
                        "each write is a burst of rate/1000 frames); smaller means smaller "
                        "bursts and more simulator CPU")
    p.add_argument("--json", action="store_true",
                   help="print the counters as one JSON object on exit")
    p.add_argument("--publish", metavar="URL",
                   help="publish the market into a broker instead of serving it, as the "
                        "provider's pub/sub delivery does: redis://HOST:PORT/DB?channel=..., "
                        "redis+stream://...?stream=..., nats://...?subject=..., "
                        "amqp://...?exchange=..., kafka://...?topic=...; --count/--rate/"
                        "--duration bound it")
    p.add_argument("--tls-cert", metavar="FILE",
                   help="serve https:// and wss:// with this certificate chain (PEM)")
    p.add_argument("--tls-key", metavar="FILE",
                   help="the private key of --tls-cert (PEM; default: in the same file)")
    p.add_argument("--tls-client-ca", metavar="FILE",
                   help="with --tls-cert: require client certificates issued by this CA "
                        "(mutual TLS)")
    p.add_argument("--shards", type=int, default=1, metavar="N",
                   help="with --publish: spread symbols over N channels/subjects "
                        "(name.0 .. name.N-1) for sharded consumers")
    p.set_defaults(func=_cmd_sim)


def _cmd_sim(args: argparse.Namespace) -> int:
    from .sim.server import SimConfig, parse_faults, run
    try:
        faults = parse_faults(args.fault)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    for name in ("rate", "duration", "token_lifetime"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise CommandError(f"--{name.replace('_', '-')} must not be negative", EXIT_USAGE)
    stamp = args.stamp_send
    # The pool's tick times are replaced byte for byte: they need the 17 bytes of "now".
    usage_errors = (
        (args.symbols < 1, "--symbols must be at least 1"),
        (args.count is not None and args.count < 0, "--count must not be negative"),
        (not 0 <= args.port <= 65535, "--port must be between 0 and 65535"),
        (stamp and faults.fragment,
         "--stamp-send needs unfragmented frames: not with --fault fragment"),
        (stamp and args.start_time is not None and not 1e9 <= args.start_time < 9e9,
         "--stamp-send needs --start-time between 1e9 and 9e9"),
        (not 0 <= args.write_interval_us <= 1_000_000,
         "--write-interval-us must be between 0 and 1000000"),
        (stamp and bool(args.publish),
         "--stamp-send applies to the WebSocket simulator, not --publish"),
        ((args.tls_key or args.tls_client_ca) and not args.tls_cert,
         "--tls-key and --tls-client-ca need --tls-cert"),
    )
    for bad, message in usage_errors:
        if bad:
            raise CommandError(message, EXIT_USAGE)
    if args.publish:
        from .sim.publish import publish_command
        from .sources.url import SourceURLError
        if args.count is None and args.duration is None:
            raise CommandError("--publish needs --count or --duration", EXIT_USAGE)
        try:
            publish_command(args, faults)
        except (SourceURLError, ValueError) as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
        except (ConnectionError, OSError) as exc:
            raise CommandError(f"cannot publish: {exc}") from None
        return 0
    config = SimConfig(host=args.host, port=args.port, rate=args.rate, symbols=args.symbols,
                       count=args.count, seed=args.seed, tenant=args.tenant,
                       client_id=args.client_id, client_secret=args.client_secret,
                       token_lifetime=args.token_lifetime, mix=args.mix,
                       start_time=args.start_time, faults=faults,
                       stamp_send=args.stamp_send, write_interval_us=args.write_interval_us,
                       tls_cert=args.tls_cert, tls_key=args.tls_key,
                       tls_client_ca=args.tls_client_ca)
    try:
        import uvloop
        runner: Callable[..., Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio still works
        import asyncio
        runner = asyncio.run
    try:
        runner(run(config, duration=args.duration, json_stats=args.json))
    except ssl.SSLError as exc:
        raise CommandError(f"--tls-cert {args.tls_cert} / --tls-key / --tls-client-ca: cannot "
                           f"use them: {exc.reason or exc}", EXIT_USAGE) from None
    except OSError as exc:
        if args.tls_cert and exc.filename:
            raise CommandError(f"cannot read {exc.filename}: {exc.strerror or exc}",
                               EXIT_USAGE) from None
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") \
            from None
    return 0


# -- login ------------------------------------------------------------------------------------

def _add_login(sub: Any) -> None:
    p = sub.add_parser(
        "login", help="log in (Azure AD, then the feed host) and cache the feed token",
        description="Run both login steps, write the token cache (mode 0600) and print the "
                    "user id and expiry. The token itself is never printed.")
    add_settings_arguments(p)
    p.set_defaults(func=_cmd_login)


def _cmd_login(args: argparse.Namespace) -> int:
    from .auth import Authenticator
    settings = settings_from_args(args)
    settings.require("host", "tenant_id", "client_id", "client_secret", "scope")
    auth = Authenticator(settings)
    t = settings.connect_timeout
    token = auth.renew(deadline=None if t is None else time.monotonic() + t)
    left = token.remaining() / 86400.0
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(token.expires_at))
    print(f"logged in as {token.user_id or '(unknown user)'}")
    print(f"token {token.fingerprint} expires {expires} (in {left:.1f} days)")
    print(f"cached in {auth.cache.path}")
    return 0


# -- main -------------------------------------------------------------------------------------

_COMMANDS: list[Callable[[Any], None]] = [_add_sim, _add_login]


def build_parser() -> argparse.ArgumentParser:
    """The ``fastfeed`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="fastfeed", description="Market-data feed client: WebSocket to NumPy arrays.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from .cli_feed import COMMANDS as feed_commands

    for add in [*feed_commands, *_COMMANDS]:
        add(sub)
    # -v also after the subcommand (fastfeed sim -v); SUPPRESS keeps the top-level count
    # when it is given before the subcommand instead.
    for p in sub.choices.values():
        p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                       help="log more (-v info, -vv debug)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastfeed`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    from .logs import FORMAT

    logging.basicConfig(level=level, format=FORMAT)
    from .auth import AuthError
    from .config import ConfigError
    from .net import FatalNetworkError
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"fastfeed: error: {exc}", file=sys.stderr)
        return exc.status
    except ConfigError as exc:
        print(f"fastfeed: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (AuthError, FatalNetworkError) as exc:
        # The message already names the step, the status and the server's reason, in one
        # line; the description from Azure AD carries CRLFs, which are folded here.
        print(f"fastfeed: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
