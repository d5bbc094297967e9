"""The pipeline commands: ``fastfeed demo``, ``stream``, ``record``, ``replay`` and ``bench``.

Each runs a :class:`fastfeed.Feed` (network process, rings, decoder workers), shows live
statistics (a ``rich`` table on a terminal, one plain line a second otherwise) and with
``--json`` prints one JSON summary when it exits.  Ctrl-C stops cleanly: the rings are
drained, sinks flushed, every shared-memory segment removed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cli_common import (
    EXIT_DROPPED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CommandError,
    add_settings_arguments,
    settings_from_args,
)

SUMMARY_KEYS = ("received", "frames", "ticks", "quotes", "bars", "errors", "control", "dropped",
                "dropped_rows", "gaps", "pauses", "backpressure_s", "handler_errors",
                "symbols_full", "unroutable", "reconnects", "auth_renewals", "network_restarts",
                "worker_restarts", "poisoned", "elapsed_s", "latency_us")


# -- live display --------------------------------------------------------------------------


class Display:
    """Live statistics: rich on a terminal, a plain line per interval otherwise."""

    def __init__(self, title: str, quiet: bool = False, show_quotes: bool = False) -> None:
        self.title = title
        self.quiet = quiet
        self.show_quotes = show_quotes
        self.last: dict[str, Any] | None = None
        self.last_t = time.monotonic()
        self.latest: dict[int, tuple[float, float, float]] = {}
        self.latency_label = "latency"
        self._live: Any = None
        if not quiet and sys.stdout.isatty():
            try:
                from rich.live import Live

                self._live = Live(refresh_per_second=4, transient=False)
                self._live.start()
            except ImportError:
                self._live = None

    @property
    def plain(self) -> bool:
        """True when the statistics are plain lines (no terminal, or no ``rich``)."""
        return not self.quiet and self._live is None

    def note_quotes(self, quotes: Any) -> None:
        if self.show_quotes and len(quotes):
            for sym, bid, ask, last in zip(quotes["sym"][-8:].tolist(), quotes["bid"][-8:].tolist(),
                                           quotes["ask"][-8:].tolist(), quotes["last"][-8:].tolist(),
                                           strict=True):
                self.latest[sym] = (bid, ask, last)

    def update(self, s: dict[str, Any], symbols: Any) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        dt = max(now - self.last_t, 1e-9)
        prev = self.last or dict.fromkeys(("frames", "ticks", "quotes", "bars"), 0)
        rates = {k: (s[k] - prev[k]) / dt for k in ("frames", "ticks", "quotes", "bars")}
        self.last, self.last_t = s, now
        lat = s["latency_us"]
        if self._live is None:
            quotes = ""
            if self.latest and symbols is not None:
                quotes = " | latest " + ", ".join(
                    f"{symbols[sym]} bid {bid:.2f} ask {ask:.2f} last {last:.2f}"
                    for sym, (bid, ask, last) in list(self.latest.items())[-3:])
            print(f"{self.title}: {rates['frames']:,.0f} frames/s (ticks {rates['ticks']:,.0f}/s "
                  f"quotes {rates['quotes']:,.0f}/s bars {rates['bars']:,.0f}/s) total {s['frames']:,} "
                  f"frames; errors {s['errors']} dropped {s['dropped']} gaps {s['gaps']} "
                  f"reconnects {s['reconnects']}; {self.latency_label} p50 {_us(lat['p50'])} µs "
                  f"p99 {_us(lat['p99'])} µs{quotes}", flush=True)
            return
        from rich.table import Table

        t = Table(title=self.title, show_header=True, expand=False)
        t.add_column("")
        t.add_column("per second", justify="right")
        t.add_column("total", justify="right")
        for k in ("frames", "ticks", "quotes", "bars"):
            t.add_row(k, f"{rates[k]:,.0f}", f"{s[k]:,}")
        for k in ("errors", "control", "dropped", "gaps", "reconnects", "worker_restarts",
                  "poisoned"):
            t.add_row(k, "", f"{s[k]:,}")
        t.add_row(f"{self.latency_label} µs", "p50 / p99 / p99.9", f"{_us(lat['p50'])} / {_us(lat['p99'])} / {_us(lat['p999'])}")
        if self.latest and symbols is not None:
            for sym, (bid, ask, last) in list(self.latest.items())[-5:]:
                t.add_row(str(symbols[sym]), f"bid {bid:.2f} ask {ask:.2f}", f"last {last:.2f}")
        self._live.update(t)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()


def _us(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.1f}"


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    out = {k: stats[k] for k in SUMMARY_KEYS}
    # The run's steady state; the rows handed over after the stop was asked for waited for
    # it, and are reported apart.
    for key in ("latency_us", "latency_drain_us"):
        out[key] = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in stats[key].items()}
    out["delivered"] = stats["delivered"]
    out["undelivered"] = stats["undelivered"]
    # failed connection (and login) attempts of the network process: each was also logged
    out["connect_errors"] = stats.get("session", {}).get("connect_errors", 0)
    if "stop_reason" in stats:
        out["stop_reason"] = stats["stop_reason"]
    if "replay" in stats:
        out["replay"] = stats["replay"]
    return out


# -- running a feed ---------------------------------------------------------------------------


def _consume(feed: Any, *, count: int | None, duration: float | None, display: Display,
             sink: Any = None, metrics_port: int | None = None) -> dict[str, Any]:
    """Consume the feed until --count frames are accounted for, --duration passes, a finite
    source is exhausted, or SIGINT/SIGTERM; return the final stats.

    The first signal is an orderly stop: the source stops and everything already in the
    pipeline is still consumed (and written to the sink) before the feed stops. A second
    signal skips that. ``stats["stop_reason"]`` says which ended the run; a
    :class:`~fastfeed.feed.FeedError` (fatal source error, idle timeout) is kept in
    ``stats["error"]`` so that the summary is still printed.
    """
    import signal

    from .feed import FeedError

    reason = {"why": "finished"}

    def on_signal(signum: int, frame: Any) -> None:
        if reason["why"] in ("SIGINT", "SIGTERM"):
            feed.hurry()
            return
        reason["why"] = signal.Signals(signum).name
        feed.request_stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    deadline = None if duration is None else time.monotonic() + duration
    next_show = time.monotonic() + 1.0
    error: str | None = None
    try:
        from .shm import ShmSpaceError

        try:
            feed.start()
        except ValueError as exc:  # a bad pinning, say: the user's to fix
            raise CommandError(str(exc), EXIT_USAGE) from None
        except ShmSpaceError as exc:  # a too small /dev/shm (a container's, say)
            raise CommandError(str(exc)) from None
        if metrics_port is not None:
            from .metrics import serve_metrics

            try:
                serve_metrics(feed, metrics_port)
            except (RuntimeError, OSError) as exc:
                raise CommandError(f"--metrics-port: {exc}") from None
        while True:
            b = feed.poll(timeout=0.05) if feed.output else None
            if b is not None:
                display.note_quotes(b.quotes)
                if sink is not None:
                    sink.write(b)
            else:
                if not feed.output:
                    feed.wait(0.02)
                if feed.finished():
                    break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                reason["why"] = "duration"
                break
            if count is not None and feed.frames_accounted() >= count:
                reason["why"] = "count"
                break
            if feed.hurried:
                break
            if now >= next_show:
                next_show = now + 1.0
                display.update(feed.stats(), feed.symbols)
    except FeedError as exc:
        error = str(exc)
        reason["why"] = "error"
    finally:
        try:
            if feed.output and not feed.hurried and feed.started and error is None:
                # Rows still in flight (a worker may publish a range just after counting
                # it) are handed over too: the source stops, the loop ends once drained.
                feed.request_stop()
                try:
                    for b in feed:
                        display.note_quotes(b.quotes)
                        if sink is not None:
                            sink.write(b)
                except FeedError as exc:
                    error = str(exc)
            feed.stop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            display.close()
            if sink is not None:
                sink.close()
    stats = feed.stats()
    stats["stop_reason"] = reason["why"]
    if error is not None:
        stats["error"] = error
    return stats


def _feed_from_args(args: argparse.Namespace, **kw: Any) -> Any:
    from .feed import Feed

    if getattr(args, "source", None):
        return Feed(source=args.source, **_pipeline_kwargs(args), **kw)
    settings = settings_from_args(args)
    return Feed(settings, **_pipeline_kwargs(args), **kw)


def _pipeline_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Feed options shared by every command: workers, waiting and CPU pinning."""
    return dict(workers=args.workers, busy_poll=args.busy_poll, network_cpus=args.network_cpus,
                worker_cpus=args.worker_cpus, consumer_cpus=args.consumer_cpus,
                full_policy=args.full_policy, idle_timeout=args.idle_timeout,
                max_symbols=args.max_symbols)


def _cpu_list(text: str) -> set[int]:
    """``0,2-3`` -> {0, 2, 3}."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list like 0,2-3: {text!r}") from None
    if not cpus:
        raise argparse.ArgumentTypeError(f"no CPU in {text!r}")
    return cpus


def _add_connection_options(p: argparse.ArgumentParser) -> None:
    """Where frames come from: the feed's login settings, or a broker URL."""
    add_settings_arguments(p)
    p.add_argument("--email", metavar="ADDRESS", help="support e-mail sent on connect")
    p.add_argument("--source", metavar="URL",
                   help="read a broker instead of the WebSocket: redis://, redis+stream://, "
                        "nats://, amqp://, kafka:// (see docs/pubsub.md)")


def _add_run_options(p: argparse.ArgumentParser, *, count: bool = True) -> None:
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="decoder worker processes (default 1); 0 decodes in this process "
                        "(inline: one process hop fewer, the lowest latency)")
    p.add_argument("--busy-poll", action="store_true",
                   help="spin instead of sleeping while waiting for frames (lowest latency; "
                        "takes a core: pin with --consumer-cpus / --worker-cpus)")
    for who, what in (("network", "the network process"), ("worker", "the decoder workers"),
                      ("consumer", "this process (the consumer)")):
        p.add_argument(f"--{who}-cpus", type=_cpu_list, default=None, metavar="LIST",
                       help=f"pin {what} to these CPUs, e.g. 0 or 0,2-3")
    p.add_argument("--full-policy", choices=("pause", "drop", "wait"), default="pause",
                   help="when a ring is full: 'pause' reading until there is room (default: "
                        "nothing is lost; TCP pushes back to the sender) or 'drop' frames "
                        "(fresh data over complete data; every drop is counted and the run "
                        "exits with status 3)")
    p.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                   help="stop with an error when nothing is received for S seconds")
    p.add_argument("--max-symbols", type=int, default=65536, metavar="N",
                   help="capacity of the symbol table (default 65536)")
    if count:
        p.add_argument("--count", type=int, default=None, metavar="FRAMES",
                       help="exit once this many data frames are accounted for (decoded, "
                            "refused as errors, or dropped)")
    p.add_argument("--duration", type=float, default=None, metavar="S", help="exit after S seconds")
    p.add_argument("--json", action="store_true", help="print one JSON summary at exit")
    p.add_argument("--quiet", action="store_true", help="no live statistics")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on 127.0.0.1:PORT/metrics "
                        "(needs prometheus-client)")


def _check_run_args(args: argparse.Namespace) -> None:
    if args.workers < 0:
        raise CommandError("--workers must be 0 (inline) or more", EXIT_USAGE)
    if getattr(args, "count", None) is not None and args.count < 0:
        raise CommandError("--count must not be negative", EXIT_USAGE)
    if args.duration is not None and args.duration < 0:
        raise CommandError("--duration must not be negative", EXIT_USAGE)
    if args.idle_timeout is not None and not args.idle_timeout > 0:
        raise CommandError("--idle-timeout must be > 0 seconds", EXIT_USAGE)
    if args.max_symbols < 1:
        raise CommandError("--max-symbols must be at least 1", EXIT_USAGE)


def _finish(args: argparse.Namespace, stats: dict[str, Any], feed: Any) -> int:
    if args.json:
        print(json.dumps(_summary(stats)))
    elif not args.quiet:
        lat, drain = stats["latency_us"], stats["latency_drain_us"]
        tail = ("" if math.isnan(drain["max"]) else
                f" (the drain at stop apart: p50 {_us(drain['p50'])} µs p99 {_us(drain['p99'])} µs)")
        print(f"done: {stats['frames']:,} frames, {stats['ticks']:,} ticks, {stats['quotes']:,} quotes, "
              f"{stats['bars']:,} bars, {stats['errors']} errors, {stats['dropped']} dropped, "
              f"{stats['gaps']} gaps in {stats['elapsed_s']:.1f} s; latency p50 {_us(lat['p50'])} µs "
              f"p99 {_us(lat['p99'])} µs{tail}")
        if "replay" in stats:
            r = stats["replay"]
            print(f"replay: {r['frames_per_s']:,} frames/s; latency: {r['latency']}")
    err = stats.get("error")
    if err:
        raise CommandError(err)
    if stats.get("stop_reason") == "duration" and stats.get("session", {}).get("connects") == 0:
        # --duration ran out on a feed that never connected: not a successful run.
        raise CommandError(f"never connected to the feed in {args.duration:g} s "
                           f"({stats['session'].get('connect_errors', 0)} failed attempts, "
                           f"logged above; --connect-timeout S ends such a run sooner)")
    lost = stats["dropped"] + stats["dropped_rows"]
    if lost:
        print(f"fastfeed: {stats['dropped']} frames and {stats['dropped_rows']} rows were dropped "
              f"(--full-policy {getattr(args, 'full_policy', '?')})", file=sys.stderr)
        return EXIT_DROPPED
    if stats.get("stop_reason") == "SIGINT":
        return EXIT_INTERRUPTED
    return 0


# -- stream ------------------------------------------------------------------------------------


def _add_stream(sub: Any) -> None:
    p = sub.add_parser(
        "stream", help="stream the feed through the pipeline and report",
        description="Connect to the feed (or --source a broker), decode every frame in "
                    "--workers processes and hand the rows to this process; live statistics, "
                    "and with --json one summary at exit (frames, rows per kind, errors, "
                    "control, dropped, gaps, reconnects, latency_us).")
    _add_connection_options(p)
    _add_run_options(p)
    p.set_defaults(func=_cmd_stream)


def _cmd_stream(args: argparse.Namespace) -> int:
    _check_run_args(args)
    feed = _feed_from_args(args)
    stats = _consume(feed, count=args.count, duration=args.duration,
                     display=Display("fastfeed stream", quiet=args.quiet or args.json),
                     metrics_port=args.metrics_port)
    return _finish(args, stats, feed)


# -- record / replay ----------------------------------------------------------------------------


def _add_record(sub: Any) -> None:
    p = sub.add_parser(
        "record", help="record the feed: raw capture (for replay) or Parquet",
        description="Stream the feed and write it to --out: 'capture' keeps every raw frame "
                    "with its receive time (capture-w<N>.ffcap, replayable with 'fastfeed "
                    "replay'); 'parquet' writes the decoded rows, one file set per kind. "
                    "Recording again into the same directory adds to it: the previous "
                    "capture's files are renamed capture-run<R>-w<N>.ffcap (a replay of the "
                    "directory gives every run, in order), Parquet files are numbered on.")
    _add_connection_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--format", choices=("capture", "parquet"), default="capture")
    _add_run_options(p)
    p.set_defaults(func=_cmd_record)


def _cmd_record(args: argparse.Namespace) -> int:
    _check_run_args(args)
    try:
        os.makedirs(args.out, exist_ok=True)
        if not os.access(args.out, os.W_OK | os.X_OK):
            raise PermissionError(f"not writable: {args.out}")
    except OSError as exc:
        raise CommandError(f"--out {args.out}: cannot write there ({exc.strerror or exc})",
                           EXIT_USAGE) from None
    sink = None
    if args.format == "capture":
        feed = _feed_from_args(args, capture=args.out, output=False)
    else:
        try:
            from .sinks import ParquetSink

            feed = _feed_from_args(args)
            sink = ParquetSink(args.out,
                               tables=lambda: (feed.symbols, feed.statuses, feed.bar_types))
        except ImportError:
            raise CommandError("--format parquet needs pyarrow: pip install 'fastfeed[parquet]'",
                               EXIT_USAGE) from None
    stats = _consume(feed, count=args.count, duration=args.duration, sink=sink,
                     display=Display("fastfeed record", quiet=args.quiet or args.json),
                     metrics_port=args.metrics_port)
    if sink is not None:
        stats["parquet_files"] = [str(f) for f in sink.files]
        stats["parquet_dropped"] = sink.dropped
    return _finish(args, stats, feed)


def _add_replay(sub: Any) -> None:
    p = sub.add_parser(
        "replay", help="feed a capture back through the pipeline",
        description="Replay a capture (a .ffcap file or a directory of them) through the "
                    "same rings, workers and decoder, with the recorded receive times: the "
                    "decoded output is the live run's.")
    p.add_argument("capture", metavar="FILE", help="capture file or directory")
    p.add_argument("--speed", type=float, default=0.0, metavar="X",
                   help="0: as fast as possible (default); 1: the recorded pace; 2: twice as fast")
    _add_run_options(p, count=False)
    p.set_defaults(func=_cmd_replay, count=None)


def _cmd_replay(args: argparse.Namespace) -> int:
    _check_run_args(args)
    if args.speed < 0:
        raise CommandError("--speed must not be negative", EXIT_USAGE)
    from .capture import CaptureError, capture_files
    from .feed import Feed

    try:
        capture_files(args.capture)
    except (FileNotFoundError, CaptureError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot read the capture {args.capture}: "
                           f"{exc.strerror or exc}") from None
    feed = Feed(replay=args.capture, speed=args.speed, **_pipeline_kwargs(args))
    display = Display("fastfeed replay", quiet=args.quiet or args.json)
    display.latency_label = "lag behind the recorded pace" if args.speed > 0 else "latency (n/a at speed 0)"
    stats = _consume(feed, count=None, duration=args.duration, display=display)
    return _finish(args, stats, feed)


# -- demo -----------------------------------------------------------------------------------------


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="see fastfeed work: the built-in simulator through the whole pipeline",
        description="Start the simulator on a free loopback port and stream from it through "
                    "the whole pipeline (login, WebSocket, rings, decoder workers), showing "
                    "per-kind rates, latency percentiles and the latest quotes.")
    p.add_argument("--rate", type=float, default=20000.0, metavar="MSGS_PER_S",
                   help="simulated frames per second (default 20000; 0 = as fast as possible)")
    p.add_argument("--symbols", type=int, default=50, metavar="N")
    _add_run_options(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    _check_run_args(args)
    from .config import load_settings
    from .feed import Feed
    from .sim.process import SimulatorProcess

    if args.duration is None and args.count is None:
        args.duration = 10.0
    try:
        sim = SimulatorProcess("--rate", str(args.rate), "--symbols", str(args.symbols))
    except RuntimeError as exc:
        raise CommandError(str(exc)) from None  # whole: its last lines say why
    talk = not (args.quiet or args.json)
    with sim, tempfile.TemporaryDirectory(prefix="fastfeed-demo-") as tmp:
        # a private token cache: the demo must not touch the user's real one
        settings = load_settings(sim.settings_args(token_cache=os.path.join(tmp, "token.json")),
                                 env={})
        feed = Feed(settings, **_pipeline_kwargs(args))
        display = Display("fastfeed demo", quiet=not talk, show_quotes=True)
        if talk:
            rate = "as fast as it can" if args.rate == 0 else f"{args.rate:,.0f} frames/s"
            until = (f"runs for {args.duration:g} s (--duration S to change)"
                     if args.duration is not None else f"runs until {args.count:,} frames")
            print(f"fastfeed demo: the built-in simulator at {sim.url} sends {rate} over "
                  f"{args.symbols} symbols; {args.workers} decoder worker(s); {until}; "
                  f"Ctrl-C stops it sooner", flush=True)
            if display.plain:
                print("(one line a second; on a terminal with rich, pip install "
                      "'fastfeed[live]', this is a live table)", flush=True)
        stats = _consume(feed, count=args.count, duration=args.duration, display=display,
                         metrics_port=args.metrics_port)
        status = _finish(args, stats, feed)
        if talk:
            why = {"duration": f"stopped after {args.duration:g} s (--duration)",
                   "count": f"stopped after {args.count} frames (--count)",
                   "SIGINT": "stopped by Ctrl-C", "SIGTERM": "stopped by SIGTERM"}
            print(why.get(stats.get("stop_reason", ""), "stopped"))
            print("next: 'fastfeed demo --rate 0 --workers 2' for full speed; 'fastfeed record "
                  "--out DIR' and 'fastfeed replay DIR' to keep and replay a stream; 'fastfeed "
                  "stream --help' for your own feed; the README's 'Ways to consume' for the "
                  "Python API")
        return status


# -- bench ----------------------------------------------------------------------------------------


def _benchmarks_dir() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        d = base / "benchmarks"
        if d.is_dir() and any(d.glob("bench_*.py")):
            return d
    return None


def _add_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="run the benchmarks and print their tables",
        description="Run the scripts in benchmarks/ (from a source checkout) one after the "
                    "other; each prints a table with ratios measured in the same run.")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="which: decode, ring, net, e2e, pubsub, replay (default: all found)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    d = _benchmarks_dir()
    if d is None:
        raise CommandError("benchmarks/ not found: run 'fastfeed bench' from a fastfeed checkout")
    scripts = sorted(d.glob("bench_*.py"))
    if args.names:
        wanted = {f"bench_{n}.py" for n in args.names}
        missing = wanted - {s.name for s in scripts}
        if missing:
            raise CommandError(f"no such benchmark: {', '.join(sorted(missing))}", EXIT_USAGE)
        scripts = [s for s in scripts if s.name in wanted]
    status = 0
    for s in scripts:
        print(f"\n## {s.name}\n", flush=True)
        status |= subprocess.call([sys.executable, str(s)])
    return status


COMMANDS: list[Callable[[Any], None]] = [_add_demo, _add_stream, _add_record, _add_replay,
                                         _add_bench]
