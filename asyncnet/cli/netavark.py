"""``asyncnet-netavark``: netavark's command line for the bridge driver, so podman can call asyncnet.

It is the engine with a batch of one: the same code path as the bulk CLI and the library. What podman
depends on is reproduced exactly: options, the JSON in and out, ``{"error": …}`` on stdout with exit 1,
and netavark's error texts.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

import anyio
import orjson

from ..buildinfo import NETAVARK_LEVEL, build_info
from ..engine import DEFAULT_AARDVARK, Container, Engine
from ..errors import AsyncnetError, ConfigError, io_error_text
from ..netns import Netns
from ..types import loads_network_options

FIREWALL_DRIVERS = ("nftables", "none", "iptables", "firewalld")


def _fail(message: str) -> NoReturn:
    sys.stdout.buffer.write(orjson.dumps({"error": message}) + b"\n")
    sys.stdout.flush()
    raise SystemExit(1)


def _log_enabled(level: str) -> bool:
    """env_logger semantics, enough for `RUST_LOG=info` / `netavark=info` / `debug` etc."""
    spec = os.environ.get("RUST_LOG", "")
    order = ["error", "warn", "info", "debug", "trace"]
    for part in spec.split(","):
        target, _, lvl = part.rpartition("=")
        lvl = lvl.strip().lower()
        if target and not target.startswith("netavark"):
            continue
        if lvl in order and order.index(lvl) >= order.index(level):
            return True
    return False


def log_info(module: str, message: str) -> None:
    if _log_enabled("info"):
        sys.stderr.write(f"[INFO  {module}] {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netavark", description="asyncnet's netavark-compatible bridge driver")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("-c", "--config", default="/run/containers/networks",
                   help="config directory (state files, aardvark-dns config)")
    p.add_argument("-r", "--rootless", default="false", help="true: do not write firewall state files")
    p.add_argument("-f", "--file", help="network options JSON (default: stdin)")
    p.add_argument("-a", "--aardvark-binary", default=DEFAULT_AARDVARK)
    p.add_argument("--firewall-driver", help="nftables (default) or none; env NETAVARK_FW")
    sub = p.add_subparsers(dest="command")
    for name in ("setup", "teardown"):
        s = sub.add_parser(name)
        s.add_argument("netns", help="path of the container's network namespace")
    sub.add_parser("version")
    u = sub.add_parser("update", help="change a network's DNS servers in aardvark-dns")
    u.add_argument("network")
    u.add_argument("--network-dns-servers", action="append", default=[])
    sub.add_parser("firewall-reload")
    sub.add_parser("firewalld-reload")
    return p


def _firewall_choice(args: argparse.Namespace) -> str:
    value = args.firewall_driver or os.environ.get("NETAVARK_FW") or "nftables"
    if value.lower() not in FIREWALL_DRIVERS:
        _fail(f"Must provide a valid firewall backend, got {value}")
    value = value.lower()
    if value in ("iptables", "firewalld"):
        _fail(f"firewall driver {value} is not implemented by asyncnet (use nftables or none)")
    return value


def _dns_port() -> int:
    raw = os.environ.get("NETAVARK_DNS_PORT")
    if raw is None or raw == "":
        return 53
    try:
        port = int(raw)
        if not 0 < port <= 65535:
            raise ValueError("number too large to fit in target type")
    except ValueError as exc:
        _fail(f"Invalid NETAVARK_DNS_PORT {raw}: {exc}")
    return port


def _read_options(args: argparse.Namespace) -> bytes:
    if args.file:
        try:
            with open(args.file, "rb") as f:
                return f.read()
        except OSError as exc:
            _fail(f"failed to load network options: {io_error_text(exc)}")
    return sys.stdin.buffer.read()


def _print_json(obj: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.version:
        info = build_info()
        print(f"netavark {NETAVARK_LEVEL} (asyncnet {info['asyncnet']})")
        return
    if args.command == "version":
        _print_json(build_info())
        return
    if args.command is None:
        _parser().print_usage(sys.stderr)
        raise SystemExit(2)
    try:
        anyio.run(_run, args, backend="asyncio")
    except AsyncnetError as exc:
        _fail(str(exc))


async def _run(args: argparse.Namespace) -> None:
    firewall = _firewall_choice(args)
    log_info("netavark::firewall",
             "Using nftables firewall driver" if firewall == "nftables" else "Not using firewall")
    rootless = str(args.rootless).lower() in ("true", "1", "yes")
    config = os.fsdecode(os.fsencode(args.config))
    dns_port = _dns_port()
    engine = Engine(config_dir=config, firewall=firewall, concurrency=1, rootless=rootless,
                    aardvark_binary=args.aardvark_binary, dns_port=dns_port)
    if args.command in ("firewall-reload", "firewalld-reload"):
        async with engine:
            await engine.firewall.reload()
        return
    if args.command == "update":
        servers = [s for s in args.network_dns_servers if s != ""]
        await engine.dns.update_network_dns_servers(args.network, servers)
        return
    netns = Netns(args.netns)
    if args.command == "setup":
        # netavark checks the namespace before it reads the options
        os.close(netns.open())
    raw = _read_options(args)
    options = loads_network_options(raw)
    async with engine:
        container = Container(netns, options)
        if args.command == "setup":
            [result] = await engine.setup([container])
            if result.error is not None:
                raise result.error
            _print_json(result.status_json())
        else:
            [result] = await engine.teardown([container])
            if result.error is not None:
                raise result.error


if __name__ == "__main__":  # pragma: no cover
    try:
        main()
    except ConfigError as exc:  # pragma: no cover
        _fail(str(exc))
