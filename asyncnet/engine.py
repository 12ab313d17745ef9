"""The orchestrator: a batch of containers in, one result per container out.

Validation and planning happen for the whole batch before the kernel is touched; each bridge is made
once; the per-container kernel work fans out under a bound; every container's firewall needs go into
one nftables transaction and its DNS entries into one aardvark-dns update at the end. A failure of the
shared steps (firewall, DNS) or a cancellation rolls back what this batch created, so a caller never
sees a half-networked container. One container (the netavark CLI) is simply a batch of one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .bridge import (
    BridgeHandle,
    attach_ports_sync,
    configure_container_sync,
    create_veths,
    ensure_bridge,
    tag_for_teardown_sync,
    unquiet_sync,
)
from .bridgelock import BridgeLocks
from .dns import Aardvark, DnsEntry, DnsNetwork
from .errors import AsyncnetError, ConfigError, IpamError, NetlinkOpError, combine, netlink_error_text
from .firewall.nftables import Prepared, firewall_driver
from .firewall.ruleset import NetworkFw, PortFw
from .netlink import Netlink, set_group_sync
from .netns import Netns, run_in_netns, run_in_netns_sync
from .plan import (
    MAX_BRIDGE_PORTS,
    Attachment,
    host_sysctls,
    intents_from_record,
    journal_record,
    needs_allocation,
    network_fw,
    plan_container,
    port_fw,
    status_block,
)
from .state import Attachment as JournalRow
from .state import State
from .sysctl import write_sysctls_sync
from .types import Network, NetworkOptions, StatusBlock

DEFAULT_AARDVARK = "/usr/lib/podman/aardvark-dns"
IN_FLIGHT_REQUESTS = 4  # netlink requests outstanding per engine: bounds loop stalls, costs no throughput
Progress = Callable[["Result"], None]


@dataclass(frozen=True)
class Container:
    """One container of a batch: where its namespace is and netavark's options for it."""

    netns: Netns
    options: NetworkOptions

    @classmethod
    def of(cls, netns: str | Netns, options: NetworkOptions) -> Container:
        return cls(netns if isinstance(netns, Netns) else Netns.from_ref(netns), options)


@dataclass
class Result:
    container_id: str
    status: dict[str, StatusBlock] | None = None
    error: AsyncnetError | None = None
    not_set_up: bool = False  # teardown: none of its interfaces existed (not an error for the bulk CLI)

    @property
    def ok(self) -> bool:
        return self.error is None

    def status_json(self) -> dict[str, Any]:
        """netavark's output: network name -> StatusBlock JSON."""
        return {name: block.to_json() for name, block in (self.status or {}).items()}

    def to_json(self) -> dict[str, Any]:
        """One container's entry in a bulk report."""
        return {"error": str(self.error)} if self.error is not None else {"status": self.status_json()}


@dataclass
class _Work:
    """Per-container bookkeeping for one batch."""

    container: Container
    result: Result
    attachments: list[Attachment] = field(default_factory=list)
    created_veths: list[str] = field(default_factory=list)
    host_indexes: dict[str, int] = field(default_factory=dict)  # host veth name -> ifindex, once made
    fd: int | None = None
    owns_state: bool = False  # allocations or journal rows of this batch that a failure must release
    ports: list[PortFw] = field(default_factory=list)  # its port rules' input, once its kernel work is done


@dataclass
class _Shared:
    """What a batch committed to the shared host state (firewall, DNS), for its undo."""

    networks: list[NetworkFw] = field(default_factory=list)
    ports: list[PortFw] = field(default_factory=list)
    firewall_committed: bool = False
    dns: list[tuple[str, str]] = field(default_factory=list)
    prepared: Prepared | None = None  # the firewall's share of the commit, done container by container
    #: the link group of the batch's host ends: a teardown of the same batch deletes it without moving
    #: them into a group first (bridge.tag_for_teardown_sync)
    group: int = field(default_factory=lambda: _fresh_group())


class Engine:
    def __init__(self, *, config_dir: str | os.PathLike[str] = "/run/asyncnet", firewall: str | None = "nftables",
                 concurrency: int = 64, host_netns: str | Netns | None = None, rootless: bool = False,
                 aardvark_binary: str = DEFAULT_AARDVARK, dns_port: int = 53, state: bool = True) -> None:
        self.config_dir = Path(os.fsdecode(config_dir))
        self.host_netns = host_netns if isinstance(host_netns, Netns) else Netns.from_ref(host_netns)
        self.concurrency = max(1, concurrency)
        self.rootless = rootless
        self.dns_port = dns_port
        self.firewall = firewall_driver(firewall, host_netns=self.host_netns, config_dir=self.config_dir,
                                        rootless=rootless)
        self.dns = Aardvark(self.config_dir, aardvark_binary, dns_port, self.host_netns)
        self._host: Netlink | None = None
        self._host_fd: int | None = None
        self._use_state = state
        self._in_flight: anyio.Semaphore | None = None
        self.state: State | None = None
        self.locks = BridgeLocks(self.config_dir)

    async def __aenter__(self) -> Engine:
        self._host_fd = self.host_netns.open() if self.host_netns.path else None
        try:
            self._in_flight = anyio.Semaphore(IN_FLIGHT_REQUESTS)
            self._host = await Netlink.open(self._host_fd, self._in_flight)
            if self._use_state:
                self.state = await anyio.to_thread.run_sync(self._open_state)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    def _open_state(self) -> State:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        return State.open(self.config_dir)

    async def __aexit__(self, *exc: object) -> None:
        if self._host is not None:
            self._host.close()
            self._host = None
        if self.state is not None:
            self.state.close()
            self.state = None
        self._close_fd()

    def _close_fd(self) -> None:
        if self._host_fd is not None:
            os.close(self._host_fd)
            self._host_fd = None

    @property
    def host(self) -> Netlink:
        if self._host is None:
            raise RuntimeError("Engine is not open: use `async with Engine(...) as engine`")
        return self._host

    # ------------------------------------------------------------------------------------------------
    # setup

    async def setup(self, batch: Sequence[Container], *, progress: Progress | None = None) -> list[Result]:
        works = [_Work(c, Result(c.options.container_id)) for c in batch]
        live = self._validate(works)
        for w in live:
            try:
                w.fd = w.container.netns.open()
            except AsyncnetError as exc:
                w.result.error = exc
        bridges: dict[str, BridgeHandle] = {}
        shared = _Shared(prepared=self.firewall.preparer())
        try:
            live = await self._plan([w for w in live if w.result.ok])
            live = await self._journal_intents(live)
            if progress is not None:  # completed already: failed validation, namespace, IPAM or journal
                for w in works:
                    if not w.result.ok:
                        progress(w.result)
            quiet = await self._setup_kernel(live, bridges, shared, progress)
            await self._commit_shared([w for w in live if w.result.ok], shared)
            if quiet:  # the last step: the firewall commit ran without the batch's multicast chatter
                await self._unquiet([w for w in live if w.result.ok])
        except BaseException as exc:
            # a shared step failed or we were cancelled: nothing of this batch may stay half-made
            with anyio.CancelScope(shield=True):
                await self._undo_shared(shared, bridges)
                await self._rollback([w for w in live if w.created_veths], shared.group)
            reason = exc if isinstance(exc, AsyncnetError) else AsyncnetError("setup cancelled; rolled back")
            for w in live:
                if w.result.ok:
                    w.result.error = reason
            if not isinstance(exc, AsyncnetError):
                raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._drop_unused_bridges(bridges, works)
                await self._journal_finish(works, bridges)
            for w in works:
                if w.fd is not None:
                    os.close(w.fd)
                    w.fd = None
        for w in works:
            if w.result.ok:
                w.result.status = {a.network.name: status_block(a, w.container.options.dns_servers)
                                   for a in w.attachments}
            elif w.created_veths:
                raise AssertionError("failed container kept links")  # pragma: no cover - invariant
        return [w.result for w in works]

    def _validate(self, works: list[_Work]) -> list[_Work]:
        """Batch-level checks no single container can make; failing containers get their error."""
        defs: dict[str, Network] = {}
        ids: set[str] = set()
        for w in works:
            opts = w.container.options
            try:
                if opts.container_id in ids:
                    raise ConfigError(f"container {opts.container_id} appears twice in the batch")
                ids.add(opts.container_id)
                for net, _ in opts.attachments():
                    other = defs.setdefault(net.network_interface, net)
                    if other != net:
                        raise ConfigError(f"network {net.name}: bridge {net.network_interface} is defined "
                                          f"differently by another container of the batch")
                if self.state is None and needs_allocation(opts):
                    plan_container(opts)  # raises the "no static ips" error
            except AsyncnetError as exc:
                w.result.error = exc
        return [w for w in works if w.result.ok]

    async def _plan(self, live: list[_Work]) -> list[_Work]:
        """IPAM for the whole batch in one state transaction, then the pure plan per container, then the
        ports-per-bridge limit (MAX_BRIDGE_PORTS) counted against the ports the bridges already have."""
        allocated: dict[str, Any] = {}
        if self.state is not None and live:
            state = self.state
            opts = [w.container.options for w in live]
            allocated = await anyio.to_thread.run_sync(lambda: state.allocate(opts))
        for w in live:
            got = allocated.get(w.container.options.container_id)
            try:
                if isinstance(got, IpamError):
                    raise got
                w.owns_state = got is not None
                w.attachments = plan_container(w.container.options, got)
            except AsyncnetError as exc:
                w.result.error = exc
        live = [w for w in live if w.result.ok]
        ports: dict[str, int] = {}
        for w in live:
            for a in w.attachments:
                ports[a.bridge] = ports.get(a.bridge, 0) + 1
        for br in ports:
            link = await self.host.get_link(br)
            if link is not None:
                ports[br] += len(await self.host.port_names(link["index"]))
        for w in live:
            over = next((a for a in w.attachments if ports[a.bridge] > MAX_BRIDGE_PORTS), None)
            if over is not None:
                w.result.error = ConfigError(f"network {over.network.name}: bridge {over.bridge} would have "
                                             f"{ports[over.bridge]} ports, more than {MAX_BRIDGE_PORTS}")
        return [w for w in live if w.result.ok]

    def _journal_rows(self, w: _Work, bridges: dict[str, BridgeHandle] | None = None,
                      indexes: dict[str, int | None] | None = None) -> list[JournalRow]:
        opts = w.container.options
        return [JournalRow(container_id=opts.container_id, network=a.network.name, network_id=a.network.id,
                           interface=a.ifname, bridge=a.bridge, container_name=opts.container_name,
                           netns=w.container.netns.path, host_veth=a.host_veth,
                           host_ifindex=(indexes or {}).get(a.host_veth),
                           # an intent may create the bridge: gc must be allowed to remove it
                           bridge_created=bridges[a.bridge].created if bridges and a.bridge in bridges else True,
                           addresses=a.addresses, firewall=journal_record(opts, a, self.dns_port))
                for a in w.attachments]

    async def _journal_intents(self, live: list[_Work]) -> list[_Work]:
        """Write every attachment as *intent* before the kernel is touched, so that a crash at any later
        point leaves gc a record of what may exist. An attachment already journalled is a conflict."""
        if self.state is None or not live:
            return live
        state = self.state
        rows = [r for w in live for r in self._journal_rows(w)]
        conflicts = await anyio.to_thread.run_sync(lambda: state.record_intents(rows))
        for w in live:
            mine = [a for a in w.attachments if (w.container.options.container_id, a.network.name) in conflicts]
            if mine:
                key = (w.container.options.container_id, mine[0].network.name)
                w.result.error = _conflict_error(conflicts[key])
                others = [(w.container.options.container_id, a.network.name) for a in w.attachments
                          if a not in mine]
                if others:
                    await anyio.to_thread.run_sync(functools.partial(state.release, others, report=False))
                w.owns_state = False  # the addresses belong to the existing attachment
            else:
                w.owns_state = True
        return [w for w in live if w.result.ok]

    async def _journal_finish(self, works: list[_Work], bridges: dict[str, BridgeHandle]) -> None:
        if self.state is None:
            return
        state = self.state
        # the journal records the host end's ifindex too (looked up when its port flags were set)
        indexes: dict[str, int | None] = {n: i for w in works if w.result.ok for n, i in w.host_indexes.items()}
        done = [r for w in works if w.result.ok and w.attachments for r in self._journal_rows(w, bridges, indexes)]
        failed = [(w.container.options.container_id, a.network.name) for w in works
                  if not w.result.ok and w.owns_state for a in w.attachments]
        failed += [(w.container.options.container_id, name) for w in works if not w.result.ok and w.owns_state
                   and not w.attachments for name in w.container.options.networks]

        def finish() -> None:
            if done:
                state.mark_done(done)
            if failed:
                state.release(failed, report=False)

        await anyio.to_thread.run_sync(finish)

    async def _setup_kernel(self, live: list[_Work], bridges: dict[str, BridgeHandle], shared: _Shared,
                            progress: Progress | None) -> bool:
        """Bridges, veths, container sides. True when the batch's ports were made quiet (see below)."""
        networks = {a.bridge: a.network for w in live for a in w.attachments}
        if not networks:
            return False
        # shared: no teardown may delete one of these bridges between our check and our veths landing on it
        async with self.locks.hold(networks, exclusive=False):
            return await self._setup_kernel_locked(live, networks, bridges, shared, progress)

    async def _setup_kernel_locked(self, live: list[_Work], networks: dict[str, Network],
                                   bridges: dict[str, BridgeHandle], shared: _Shared,
                                   progress: Progress | None) -> bool:
        await run_in_netns(self._host_fd, lambda: write_sysctls_sync(host_sysctls(list(networks.values()))))
        failed: dict[str, AsyncnetError] = {}

        async def make_bridge(net: Network) -> None:
            try:
                bridges[net.network_interface] = await ensure_bridge(self.host, self._host_fd, net)
            except AsyncnetError as exc:
                failed[net.network_interface] = exc

        async with anyio.create_task_group() as tg:
            for net in networks.values():
                tg.start_soon(make_bridge, net)
        limiter = anyio.Semaphore(self.concurrency)
        # A batch's new ports flood no multicast to each other until the batch is made, firewall commit
        # included (bridge.py, attach_ports_sync): 1000 new interfaces' IPv6 chatter flooded to 250 ports
        # per bridge made each container and the commit after them cost more as the batch grew. One
        # container has nobody to spare the chatter. Progress still reports each container when its own
        # kernel work is done: like its port rules, the end of the quiet time is a batch step.
        quiet = len(live) > 1

        async def one(w: _Work) -> None:
            async with limiter:
                err = next((failed[a.bridge] for a in w.attachments if a.bridge in failed), None)
                if err is not None:
                    w.result.error = err
                else:
                    await self._setup_container(w, bridges, quiet=quiet, group=shared.group)
                    if w.result.ok:
                        self._ports_ready(w, shared.prepared)
            if progress is not None:
                progress(w.result)

        async with anyio.create_task_group() as tg:
            for w in live:
                tg.start_soon(one, w)
        v6_host = [(f"net/ipv6/conf/{a.host_veth}/accept_dad", "0", False)
                   for w in live if w.result.ok for a in w.attachments if a.ipv6]
        if v6_host:
            await run_in_netns(self._host_fd, lambda: write_sysctls_sync(v6_host))
        return quiet

    async def _setup_container(self, w: _Work, bridges: dict[str, BridgeHandle], *, quiet: bool,
                               group: int) -> None:
        assert w.fd is not None
        fd, host_fd = w.fd, self._host_fd
        hairpin = bool(w.container.options.port_mappings)

        def ports_then_container() -> None:
            # one worker-thread visit: the bridge port flags of the host ends (before the container end
            # comes up and gives them carrier), then everything inside the container (no socket of its own)
            w.host_indexes = run_in_netns_sync(host_fd, lambda: attach_ports_sync(w.attachments, hairpin=hairpin,
                                                                                 quiet=quiet))
            run_in_netns_sync(fd, lambda: configure_container_sync(w.attachments))

        try:
            await create_veths(self.host, fd, w.attachments, bridges, created=w.created_veths, group=group)
            await anyio.to_thread.run_sync(ports_then_container)
        except AsyncnetError as exc:
            w.result.error = exc
            with anyio.CancelScope(shield=True):
                await self._delete_veths(w)

    def _ports_ready(self, w: _Work, prepared: Prepared | None) -> None:
        """The container's firewall input, and its share of the commit's work done now, between other
        containers' kernel requests, instead of in the batch's serial tail (firewall.nftables.Prepared)."""
        opts = w.container.options
        w.ports = [port_fw(opts, a, self.dns_port) for a in w.attachments if not a.network.internal]
        if prepared is not None:
            for pf in w.ports:
                prepared.add(pf)

    async def _unquiet(self, done: list[_Work]) -> None:
        """Multicast flooding back on for the batch's ports, in one host-namespace visit. It runs after
        the shared commits, so a port that refuses (its veth deleted behind our back) fails the batch as
        a whole, like a failed commit: the caller rolls everything back (no port may stay different from
        netavark's, and its container's rules are committed already)."""
        indexes = [i for w in done for i in w.host_indexes.values()]
        await run_in_netns(self._host_fd, lambda: unquiet_sync(indexes))

    async def _delete_veths(self, w: _Work) -> None:
        """Rollback of one container: the host end takes the peer with it. ENODEV = never made."""
        for name in reversed(w.created_veths):
            try:
                await self.host.delete_link(name, "rollback: delete veth")
            except NetlinkOpError as exc:
                if exc.code != errno.ENODEV:
                    raise
        w.created_veths.clear()

    async def _rollback(self, works: list[_Work], group: int) -> None:
        """The whole batch goes: its host ends were all created in ``group`` (those of containers that
        failed alone are gone already), so the group goes in one request, no link moved. Any name of ours
        still there after it (there should be none) is moved into a group of its own and deleted."""
        names = [n for w in works for n in w.created_veths]
        if names:
            try:
                await self.host.delete_group(group)
            except NetlinkOpError as exc:
                if exc.code != errno.ENODEV:  # ENODEV: nothing in the group
                    raise
            await self._group_delete(names, errors=None)
        for w in works:
            w.created_veths.clear()

    async def _drop_unused_bridges(self, bridges: dict[str, BridgeHandle], works: list[_Work]) -> None:
        """Bridges this batch created but that ended up without ports (every container failed). A bridge
        one of the batch's containers is on now is in use: only the others are looked at (a port dump
        of 250 ports costs ~12 ms)."""
        used = {a.bridge for w in works if w.result.ok for a in w.attachments}
        for handle in bridges.values():
            if not handle.created or handle.name in used:
                continue
            async with self.locks.hold([handle.name], exclusive=True):
                if await self.host.port_names(handle.index):
                    continue
                try:
                    await self.host.delete_link(handle.name, "rollback: delete bridge")
                except NetlinkOpError as exc:
                    if exc.code != errno.ENODEV:
                        raise

    async def _commit_shared(self, done: list[_Work], shared: _Shared) -> None:
        """Firewall (one transaction), route_localnet, then DNS (one update) for the whole batch; what
        was committed is noted in ``shared`` so that a later failure or a cancellation can undo it."""
        if not done:
            return
        nets: dict[str, NetworkFw] = {}
        localnet: set[str] = set()
        for w in done:
            opts = w.container.options
            for a in w.attachments:
                if a.network.internal:
                    continue
                nets.setdefault(a.network.id, network_fw(a.network))
                if opts.port_mappings is not None:
                    localnet.add(a.bridge)
            shared.ports.extend(w.ports)
        if nets:
            shared.networks = list(nets.values())
            await self.firewall.commit(setup_networks=shared.networks, setup_ports=shared.ports,
                                       prepared=shared.prepared)
            shared.firewall_committed = True
        if localnet and self.firewall.driver_name != "none":
            writes = [(f"net/ipv4/conf/{br}/route_localnet", "1", False) for br in sorted(localnet)]
            await run_in_netns(self._host_fd, lambda: write_sysctls_sync(writes))
        entries = [dns_entry(w.container.options, a) for w in done for a in w.attachments
                   if a.network.dns_enabled]
        if entries and self.dns.installed:  # netavark skips DNS when aardvark-dns is not installed
            shared.dns = [(e.network.name, e.container_id) for e in entries]
            await self.dns.commit(add=entries)

    async def _undo_shared(self, shared: _Shared, bridges: dict[str, BridgeHandle]) -> None:
        """Best effort (the original error is what the caller must see): the batch's port rules go, and
        the network rules of bridges this batch created (they go with the rollback)."""
        try:
            if shared.firewall_committed:
                created = {h.name for h in bridges.values() if h.created}
                await self.firewall.commit(teardown_ports=shared.ports,
                                           teardown_networks=[n for n in shared.networks if n.bridge in created])
        except AsyncnetError:
            pass
        try:
            if shared.dns:
                await self.dns.commit(remove=shared.dns)
        except AsyncnetError:
            pass

    # ------------------------------------------------------------------------------------------------
    # teardown

    async def teardown(self, batch: Sequence[Container], *, progress: Progress | None = None) -> list[Result]:
        """Remove every attachment of the batch; keep going after errors and report them per container.

        Host ends have deterministic names, and deleting the host end takes the container end (and the
        routes through it) with it; all host ends go in one group delete. The container namespace is only
        entered for static routes, which may go through another interface of the container.
        """
        works = [_Work(c, Result(c.options.container_id)) for c in batch]
        errors: dict[int, list[AsyncnetError]] = {i: [] for i in range(len(works))}
        journal: dict[tuple[str, str], JournalRow] = {}
        if self.state is not None:
            state = self.state
            ids = [w.container.options.container_id for w in works]
            journal = {r.key: r for r in await anyio.to_thread.run_sync(
                lambda: state.list_attachments(container_ids=ids))}
        for i, w in enumerate(works):
            try:
                w.attachments = plan_container(w.container.options, _known_addresses(w.container.options, journal))
            except AsyncnetError as exc:
                errors[i].append(exc)
        known = [journal[k] for w in works for a in w.attachments
                 if (k := (w.container.options.container_id, a.network.name)) in journal]
        if known and self.state is not None:
            await anyio.to_thread.run_sync(lambda: state.mark_removing(known))
        with_routes = [(i, w) for i, w in enumerate(works) if any(r.static for a in w.attachments for r in a.routes)]
        if with_routes:
            limiter = anyio.Semaphore(self.concurrency)

            async def static_routes(i: int, w: _Work) -> None:
                async with limiter:
                    errors[i].extend(await self._delete_static_routes(w))

            async with anyio.create_task_group() as tg:
                for i, w in with_routes:
                    tg.start_soon(static_routes, i, w)
        names: list[str] = []
        owners: dict[str, int] = {}
        for i, w in enumerate(works):
            for a in w.attachments:
                names.append(a.host_veth)
                owners[a.host_veth] = i
        contexts = {a.host_veth: f"failed to delete container veth {a.ifname}"
                    for w in works for a in w.attachments}
        networks = {a.bridge: a.network for w in works for a in w.attachments}
        veth_errors, bridge_errors, shared_errors = await self._teardown_links_and_rules(
            works, names, contexts, networks)
        gone_ns: set[int] = set()
        order = {name: k for k, name in enumerate(names)}
        for name, err in sorted(veth_errors.items(), key=lambda item: order[item[0]]):  # batch order
            i = owners[name]
            if err.code == errno.ENODEV and _netns_gone(works[i].container.netns):
                gone_ns.add(i)  # the namespace took its veths along: nothing left to delete there
                continue
            errors[i].append(err)
        for br, err in bridge_errors.items():
            for i, w in enumerate(works):
                if any(a.bridge == br for a in w.attachments):
                    errors[i].append(err)
        for err in shared_errors:
            for i in errors:
                errors[i].append(err)
        release: list[tuple[str, str]] = []
        for i, w in enumerate(works):
            cid = w.container.options.container_id
            w.result.error = combine(errors[i])
            missing = [a for a in w.attachments if a.host_veth in veth_errors
                       and veth_errors[a.host_veth].code == errno.ENODEV]
            journalled = any((cid, a.network.name) in journal for a in w.attachments)
            w.result.not_set_up = (bool(w.attachments) and len(missing) == len(w.attachments)
                                   and not journalled and (i in gone_ns or len(errors[i]) == len(missing)))
            if w.result.not_set_up and i in gone_ns:
                w.result.error = None
            # keep the journal rows of what could not be removed: `down` or gc can finish it later
            if all(e.code == errno.ENODEV for e in errors[i]):
                release += [(cid, a.network.name) for a in w.attachments]
            if progress is not None:
                progress(w.result)
        if release and self.state is not None:
            state = self.state
            await anyio.to_thread.run_sync(lambda: state.release(release, report=False))
        return [w.result for w in works]

    # ------------------------------------------------------------------------------------------------
    # recovery

    async def gc(self) -> dict[str, Any]:
        """Reconcile the kernel with the journal after a crash or a vanished container.

        Removes what attachments left whose process died before finishing (``intent`` / ``removing``),
        and attachments whose container namespace no longer exists: host veths, port rules, DNS entries,
        journal rows and addresses; then bridges asyncnet created that have no port left, with their
        network rules. Namespaces are never deleted. Idempotent: a second run finds nothing.
        """
        if self.state is None:
            raise AsyncnetError("gc needs the state database (Engine(state=True))")
        state = self.state
        orphans = await anyio.to_thread.run_sync(state.orphans)
        rows = await anyio.to_thread.run_sync(state.list_attachments)
        targets = {r.key: r for r in orphans.attachments}
        for r in rows:
            if r.phase == "done" and (r.netns is None or _netns_gone(Netns(r.netns))):
                targets[r.key] = r
        names = [r.host_veth for r in targets.values() if r.host_veth]
        missing: dict[str, AsyncnetError] = {}
        await self._group_delete(names, errors=missing)
        removed_links = [n for n in names if n not in missing]
        intents = {k: intents_from_record(r.container_id, r.addresses, r.firewall)
                   for k, r in targets.items() if r.firewall}
        still_used = {r.bridge for r in rows if r.key not in targets}
        removed_bridges: list[str] = []
        complete: dict[str, NetworkFw] = {}
        for r in targets.values():
            if not r.bridge_created or r.bridge in still_used or r.bridge in removed_bridges:
                continue
            async with self.locks.hold([r.bridge], exclusive=True):
                link = await self.host.get_link(r.bridge)
                if link is not None and await self.host.port_names(link["index"]):
                    continue
                if link is not None:
                    try:
                        await self.host.delete_link(r.bridge, "gc: delete bridge")
                        removed_bridges.append(r.bridge)
                    except NetlinkOpError as exc:
                        if exc.code != errno.ENODEV:
                            raise
            nf = intents[r.key].network if r.key in intents else None
            if nf is not None:
                complete[nf.network_id] = nf
        ports = [i.port for i in intents.values() if i.port is not None]
        if ports or complete:
            await self.firewall.commit(teardown_ports=ports, teardown_networks=list(complete.values()))
        dns = [(i.dns_network, k[0]) for k, i in intents.items() if i.dns_network]
        if dns and self.dns.installed:
            await self.dns.commit(remove=dns)
        keys = list(targets) + [(a.container_id, a.network) for a in orphans.allocations]
        released = await anyio.to_thread.run_sync(lambda: state.release(keys))
        return {
            "attachments": [{"container_id": r.container_id, "network": r.network, "phase": r.phase,
                             "netns": r.netns} for r in targets.values()],
            "links": removed_links,
            "bridges": removed_bridges,
            "port_rules": [f"{p.container_id}/{p.network.network_name}" for p in ports],
            "networks": [n.network_name for n in complete.values()],
            "dns_entries": [f"{c}/{n}" for n, c in dns],
            "allocations": [f"{a.network}:{a.address}" for a in released.allocations],
        }

    async def _delete_static_routes(self, w: _Work) -> list[AsyncnetError]:
        """netavark deletes a network's static routes in the container before its veth. A namespace that
        is gone took its routes along, and so did a route that is already gone: neither is an error."""
        try:
            fd = w.container.netns.open()
        except AsyncnetError:
            return []
        errors: list[AsyncnetError] = []
        try:
            ctr = await Netlink.open(fd, self._in_flight)
            try:
                for r in (r for a in w.attachments for r in a.routes if r.static):
                    try:
                        await ctr.delete_route(destination=r.destination, gateway=r.gateway, metric=r.metric,
                                               context=f"delete route {r.destination} via {r.gateway}")
                    except NetlinkOpError as exc:
                        if exc.code != errno.ESRCH:
                            errors.append(exc)
            finally:
                ctr.close()
        finally:
            os.close(fd)
        return errors

    async def _teardown_links_and_rules(self, works: list[_Work], names: list[str], contexts: dict[str, str],
                                        networks: dict[str, Network]
                                        ) -> tuple[dict[str, AsyncnetError], dict[str, AsyncnetError],
                                                   list[AsyncnetError]]:
        """The batch's host ends and the bridges they leave without ports go in one group delete, while
        the firewall teardown (port rules, and the network rules of those bridges: netavark's "complete
        teardown") and the DNS removal are committed: the three do not wait for each other. Under the
        bridges' exclusive locks, so that no setup can put a port on one meanwhile.

        Returns the errors by host veth, by bridge, and those of the shared commits (every container's).
        """
        veth_errors: dict[str, AsyncnetError] = {}
        shared_errors: list[AsyncnetError] = []
        if not networks:
            return veth_errors, {}, shared_errors
        fresh = _fresh_group()
        async with self.locks.hold(networks, exclusive=True):
            try:
                tagged = await run_in_netns(self._host_fd,
                                            lambda: tag_for_teardown_sync(names, list(networks), fresh))
            except AsyncnetError as exc:  # nothing was changed: every attachment stays, and says why
                return dict.fromkeys(names, exc), {}, shared_errors
            group = tagged.group
            for name, code in tagged.refused.items():
                veth_errors[name] = NetlinkOpError(f"{contexts[name]}: {netlink_error_text(code)}", code=code)
            bridge_errors = dict(tagged.bridge_errors)
            complete = [networks[br] for br in (*tagged.gone, *tagged.bridges)]
            ports = [port_fw(w.container.options, a, self.dns_port) for w in works for a in w.attachments
                     if not a.network.internal]
            nets = [network_fw(n) for n in complete if not n.internal]
            entries = [(a.network.name, w.container.options.container_id) for w in works for a in w.attachments
                       if a.network.dns_enabled]
            failures: dict[str, AsyncnetError] = {}

            async def delete() -> None:
                if len(tagged.refused) < len(names) or tagged.bridges:
                    try:
                        await self.host.delete_group(group)
                    except NetlinkOpError as exc:
                        failures["links"] = exc

            async def firewall() -> None:
                if ports or nets:
                    try:
                        await self.firewall.commit(teardown_ports=ports, teardown_networks=nets)
                    except AsyncnetError as exc:
                        failures["firewall"] = exc

            async def dns() -> None:
                if entries and self.dns.installed:
                    try:
                        await self.dns.commit(remove=entries)
                    except AsyncnetError as exc:
                        failures["dns"] = exc

            async with anyio.create_task_group() as tg:
                for step in (delete, firewall, dns):
                    tg.start_soon(step)
            lost = failures.get("links")
            if lost is not None:
                # nothing of the group was deleted: its bridges stay, so their networks' rules come back
                for name in names:
                    veth_errors.setdefault(name, lost)
                why = netlink_error_text(lost.code) if lost.code else str(lost)
                for br in tagged.bridges:
                    bridge_errors[br] = NetlinkOpError(f"failed to delete bridge: {why}", code=lost.code)
                kept = [network_fw(networks[br]) for br in tagged.bridges if not networks[br].internal]
                if kept and "firewall" not in failures:
                    with contextlib.suppress(AsyncnetError):
                        await self.firewall.commit(setup_networks=kept)
        shared_errors += [failures[k] for k in ("firewall", "dns") if k in failures]
        return veth_errors, bridge_errors, shared_errors

    async def _group_delete(self, names: list[str], *, errors: dict[str, AsyncnetError] | None,
                            contexts: dict[str, str] | None = None) -> None:
        """Tag each link (host veths, emptied bridges) with one fresh link group, then delete the group
        in one request: one RCU grace period for the batch instead of ~20-45 ms per link."""
        if not names:
            return
        group = _fresh_group()
        refused = await run_in_netns(self._host_fd, lambda: set_group_sync(names, group))
        if errors is not None:
            for name, code in refused.items():
                context = (contexts or {}).get(name, f"delete veth {name}")
                errors[name] = NetlinkOpError(f"{context}: {netlink_error_text(code)}", code=code)
        if len(refused) < len(names):
            await self.host.delete_group(group)


def _known_addresses(opts: NetworkOptions, journal: dict[tuple[str, str], JournalRow]) -> dict[str, Any]:
    """Teardown addresses: the journal's when it knows the attachment, else the static ones, else none
    (the veth still goes; only port rules that name the address cannot be matched)."""
    out: dict[str, Any] = {}
    for net, per in opts.attachments():
        row = journal.get((opts.container_id, net.name))
        if row is not None:
            out[net.name] = row.addresses
        elif net.ipam_driver == "host-local" and len(per.static_ips or ()) < len(net.subnets):
            out[net.name] = ()
    return out


def _conflict_error(row: JournalRow) -> ConfigError:
    """An attachment the journal already has: set up, in flight elsewhere, or left by a dead process (a
    batch runner retrying after a kill -9 must be told to run gc, not that the container is set up)."""
    what = f"container {row.container_id} on network {row.network}"
    if row.phase == "done":
        return ConfigError(f"container {row.container_id} is already set up on network {row.network}")
    doing = "setup" if row.phase == "intent" else "teardown"
    if row.owner_alive:
        return ConfigError(f"{what}: a {doing} by another batch is in progress")
    return ConfigError(f"{what}: an interrupted {doing} (its process died) left it half-made; "
                       f"run `asyncnet gc` (or `asyncnet down`) first")


def _netns_gone(netns: Netns) -> bool:
    try:
        os.close(netns.open())
    except AsyncnetError:
        return True
    return False


def _fresh_group() -> int:
    """A random link group: concurrent engines never share one, and 0 (the default) is never used."""
    return secrets.randbelow(0x7FFFFFFF - 0x10000) + 0x10000


def dns_entry(opts: NetworkOptions, att: Attachment) -> DnsEntry:
    net = att.network
    return DnsEntry(
        network=DnsNetwork(net.name, net.gateways, net.network_dns_servers),
        container_id=opts.container_id,
        ipv4=tuple(a.ip for a in att.addresses if a.version == 4),  # type: ignore[misc]
        ipv6=tuple(a.ip for a in att.addresses if a.version == 6),  # type: ignore[misc]
        names=(opts.container_name, *att.options.aliases),
        dns_servers=opts.dns_servers,
    )


