"""``asyncnet``: the bulk command line (a batch file of many containers in, one JSON report out)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import anyio
import orjson

from ..batch import BatchSpec, load_batch
from ..engine import Container, Engine, Result
from ..errors import AsyncnetError
from ..netns import NETNS_RUN_DIR, create_named_netns, delete_netns_at

DEFAULT_CONFIG = "/run/asyncnet"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncnet", description="Bulk container bridge networking")
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("up", "set up every container of a batch file"),
                           ("down", "tear down every container of a batch file")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--config", default=DEFAULT_CONFIG)
        s.add_argument("--firewall-driver", default=os.environ.get("NETAVARK_FW") or "nftables")
        s.add_argument("--create-netns", action="store_true",
                       help="up: create missing named namespaces; down: delete them afterwards")
        s.add_argument("--concurrency", type=int, default=64)
        s.add_argument("--host-netns", default=None, help="run against this namespace as 'the host'")
        s.add_argument("batch", help="batch JSON file ('-' for stdin)")
    for name, helptext in (("status", "print the attachments and addresses the state knows"),
                           ("gc", "remove what crashed or vanished containers left behind")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--config", default=DEFAULT_CONFIG)
        if name == "gc":
            s.add_argument("--firewall-driver", default=os.environ.get("NETAVARK_FW") or "nftables")
            s.add_argument("--host-netns", default=None, help="run against this namespace as 'the host'")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command in ("status", "gc"):
        try:
            out = anyio.run(_maintain, args, backend="asyncio")
        except AsyncnetError as exc:
            _print({"error": str(exc)})
            raise SystemExit(1) from None
        _print(out)
        return
    try:
        raw = sys.stdin.buffer.read() if args.batch == "-" else open(args.batch, "rb").read()
        spec = load_batch(raw)
    except OSError as exc:
        _print({"error": f"failed to load batch: {exc}"})
        raise SystemExit(1) from None
    except AsyncnetError as exc:
        _print({"error": str(exc)})
        raise SystemExit(1) from None
    report, signum = anyio.run(_run_interruptible, args, spec, backend="asyncio")  # prints the report
    if signum:
        raise SystemExit(128 + signum)
    raise SystemExit(1 if any("error" in v for v in report.values()) else 0)


async def _maintain(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "status":
        from ..state import State

        def read() -> dict[str, Any]:
            with State.open(args.config) as state:
                return state.status()

        return await anyio.to_thread.run_sync(read)
    async with Engine(config_dir=args.config, firewall=args.firewall_driver, host_netns=args.host_netns) as eng:
        return await eng.gc()


async def _run_interruptible(args: argparse.Namespace, spec: BatchSpec) -> tuple[dict[str, Any], int]:
    """SIGTERM/SIGINT: `up` is cancelled (the engine rolls the batch back), `down` finishes first;
    either way the report is printed and the exit status says we were interrupted. The report is printed
    while the signals are still caught here: a late signal must not cut it short (a reader that is slow to
    drain the pipe keeps the write blocked, and the default action would kill us mid-JSON)."""
    got: list[int] = []
    report: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        work_scope = anyio.CancelScope(shield=args.command == "down")

        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    got.append(signum)
                    if args.command == "up":
                        work_scope.cancel()
                    # stay subscribed: a repeated signal (a supervisor re-sending SIGTERM, a double
                    # Ctrl-C) must not kill the rollback or the teardown half-way (kill -9 is the force)

        tg.start_soon(watch)
        with work_scope:
            report = await _run(args, spec)
        if got and args.command == "up" and work_scope.cancelled_caught:
            # cancelled: setup rolled the batch back and returned no report. A signal that came after
            # setup had returned cancelled nothing: its report (containers that ARE set up) stands.
            interrupted = {"error": f"interrupted by signal {got[0]}; batch rolled back"}
            report = dict(spec.errors) | {c.options.container_id: interrupted for c in spec.containers}
        _print(report)
        tg.cancel_scope.cancel()
    return report, (got[0] if got else 0)


def _print(obj: Any) -> None:
    data = memoryview(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
    while data:
        # a signal (caught, so no exception) interrupting a write into a full pipe makes CPython's buffered
        # write return a short count: without the loop the report would end after the first pipe-full
        data = data[sys.stdout.buffer.write(data) or 0:]
    sys.stdout.flush()


def _progress(total: int, label: str) -> AbstractContextManager[Callable[[Result], None] | None]:
    """A rich progress bar on a terminal, nothing otherwise (batch runners read stdout only)."""
    if not sys.stderr.isatty():
        return nullcontext(None)
    from contextlib import contextmanager

    from rich.console import Console
    from rich.progress import Progress

    @contextmanager
    def bar():  # type: ignore[no-untyped-def]
        # on stderr: rich's default console is stdout, which batch runners parse as the JSON report
        with Progress(transient=True, console=Console(stderr=True)) as prog:
            task = prog.add_task(label, total=total)
            yield lambda _r: prog.advance(task)

    return bar()


async def _run(args: argparse.Namespace, spec: BatchSpec) -> dict[str, Any]:
    report: dict[str, Any] = dict(spec.errors)
    containers = spec.containers
    if args.command == "up" and args.create_netns:
        for c in containers:
            if _is_named(c) and c.netns.path is not None:
                await anyio.to_thread.run_sync(create_named_netns, os.path.basename(c.netns.path))
    async with Engine(config_dir=args.config, firewall=args.firewall_driver, concurrency=args.concurrency,
                      host_netns=args.host_netns) as engine:
        with _progress(len(containers), args.command) as progress:
            if args.command == "up":
                results = await engine.setup(containers, progress=progress)
                for r in results:
                    report[r.container_id] = r.to_json()
            else:
                results = await engine.teardown(containers, progress=progress)
                for r in results:
                    report[r.container_id] = _down_entry(r)
    if args.command == "down" and args.create_netns:
        for c in containers:
            if _is_named(c) and c.netns.path is not None:
                await anyio.to_thread.run_sync(delete_netns_at, c.netns.path)
    return report


def _is_named(c: Container) -> bool:
    """Only `ip netns`-style namespaces are ours to create and delete, never /proc/PID/ns/net."""
    return bool(c.netns.path) and os.path.dirname(c.netns.path or "") == NETNS_RUN_DIR


def _down_entry(r: Result) -> dict[str, Any]:
    if r.not_set_up:
        return {"status": "not set up"}
    if r.error is None:
        return {"status": "removed"}
    return {"error": str(r.error)}
