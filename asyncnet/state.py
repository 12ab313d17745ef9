"""Durable state in one SQLite file: address allocations and the journal of attachments.

Why SQLite: several ``asyncnet`` processes (and one ``asyncnet-netavark`` process per container) share the
state with no daemon; a ``BEGIN IMMEDIATE`` transaction takes the database's single write lock up front,
so reading what is taken and inserting new addresses is one atomic step across processes. Every call is
one short transaction (never held across kernel work). Writers queue on a ``flock`` of
``asyncnet.lock`` beside the database (fair hand-over; see ``State._write``), and SQLite's busy timeout
covers any other holder of the database lock.

WAL mode lets readers (``asyncnet status``) run beside a writer. ``synchronous=NORMAL`` is enough: a
committed transaction survives ``kill -9`` of the process, and what it could lose on power failure
describes kernel objects (veths, namespaces, rules) that do not survive a reboot either.

The journal: an attachment (container × network) is written as ``intent`` before the kernel is touched,
becomes ``done`` when set up, ``removing`` when its teardown starts, and is deleted (with its addresses)
by :meth:`State.release` when its teardown is finished. Each row records the process that wrote it
(:func:`current_owner`); an ``intent``/``removing`` row whose process is gone is what ``gc`` must finish
or roll back (:meth:`State.orphans`). The calls are synchronous; the engine runs them in a worker thread.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NoReturn

import orjson

from .errors import IpamError, StateError
from .ipam import ContainerAddresses, Holder, SubnetPool, allocate_batch
from .types import IPAddress, IPInterface, Network, NetworkOptions, Subnet

SCHEMA_VERSION = 1
DB_NAME = "asyncnet.db"
LOCK_NAME = "asyncnet.lock"  # writers queue on its flock (see State._write)
BUSY_TIMEOUT = 60.0  # seconds a call waits for another process's write transaction

Phase = Literal["intent", "done", "removing"]
PHASES: tuple[Phase, ...] = ("intent", "done", "removing")

_SCHEMA = """
CREATE TABLE attachments (
    container_id   TEXT NOT NULL,
    network        TEXT NOT NULL,            -- network name: netavark's key for a container's networks
    network_id     TEXT NOT NULL,
    container_name TEXT NOT NULL DEFAULT '',
    phase          TEXT NOT NULL CHECK (phase IN ('intent', 'done', 'removing')),
    netns          TEXT,                     -- container namespace path
    interface      TEXT NOT NULL,            -- interface name inside the container
    host_veth      TEXT,
    host_ifindex   INTEGER,
    bridge         TEXT NOT NULL,
    bridge_created INTEGER NOT NULL DEFAULT 0,
    addresses      TEXT NOT NULL DEFAULT '[]',   -- JSON list of "ip/prefix"
    firewall       TEXT NOT NULL DEFAULT 'null', -- JSON: what is needed to remove its rules later
    owner          TEXT NOT NULL,            -- process that last wrote the row: "boot_id:pid:starttime"
    created        REAL NOT NULL,
    updated        REAL NOT NULL,
    PRIMARY KEY (container_id, network)
);
CREATE TABLE allocations (
    network_id   TEXT NOT NULL,
    address      TEXT NOT NULL,              -- canonical text of the address (str(ip_address))
    packed       BLOB NOT NULL,              -- the same, 4 or 16 bytes big-endian: loads 20x faster
    subnet       TEXT NOT NULL,
    network      TEXT NOT NULL,
    container_id TEXT NOT NULL,
    interface    TEXT NOT NULL DEFAULT '',
    static       INTEGER NOT NULL DEFAULT 0,
    owner        TEXT NOT NULL,
    created      REAL NOT NULL,
    PRIMARY KEY (network_id, address)        -- the last line of defence: never one address twice
);
CREATE INDEX allocations_by_container ON allocations (container_id, network);
CREATE TABLE ipam_cursors (
    network_id TEXT NOT NULL,
    subnet     TEXT NOT NULL,
    last       TEXT NOT NULL,                -- the last address handed out: round-robin continues after it
    PRIMARY KEY (network_id, subnet)
);
"""


# --------------------------------------------------------------------------------------------------
# who wrote a row, and is that process still running


_boot_id: str | None = None
_owner: tuple[int, str] | None = None


def _read_boot_id() -> str:
    global _boot_id
    if _boot_id is None:
        try:
            _boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            _boot_id = "unknown"
    return _boot_id


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: with the boot id it tells a live process from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def current_owner() -> str:
    """This process, as recorded in the rows it writes (recomputed after a fork)."""
    global _owner
    pid = os.getpid()
    if _owner is None or _owner[0] != pid:
        _owner = (pid, f"{_read_boot_id()}:{pid}:{_start_time(pid)}")
    return _owner[1]


def owner_alive(owner: str) -> bool:
    """Whether the process that wrote a row still runs. Malformed owners count as alive (never gc'd)."""
    boot, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if not pid_text.isdigit():
        return True
    if boot != _read_boot_id():
        return False  # written before the last reboot
    return _start_time(int(pid_text)) == start


# --------------------------------------------------------------------------------------------------
# rows


@dataclass(frozen=True)
class Attachment:
    """One container on one network, as the journal knows it.

    The engine fills in what it will create before touching the kernel (:meth:`State.record_intents`) and
    what it learnt afterwards (``host_ifindex``, ``bridge_created``) when it marks it done. ``firewall``
    is any JSON-serialisable value. ``bridge_created`` in an ``intent`` row means "this attachment may
    create the bridge" (set it before creating one, so that a crash in between is not a leak).
    ``phase``, ``owner``, ``created`` and ``updated`` are set by the store; values passed in are ignored.
    """

    container_id: str
    network: str
    network_id: str
    interface: str
    bridge: str
    container_name: str = ""
    netns: str | None = None
    host_veth: str | None = None
    host_ifindex: int | None = None
    bridge_created: bool = False
    addresses: tuple[IPInterface, ...] = ()
    firewall: Any = None
    phase: Phase = "intent"
    owner: str = ""
    created: float = 0.0
    updated: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return (self.container_id, self.network)

    @property
    def owner_alive(self) -> bool:
        return owner_alive(self.owner)

    def to_json(self, alive: bool | None = None) -> dict[str, Any]:
        """JSON-ready; ``alive`` may pass a known :func:`owner_alive` result (status() caches them)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["addresses"] = [str(a) for a in self.addresses]
        out["owner_alive"] = self.owner_alive if alive is None else alive
        return out


@dataclass(frozen=True)
class Allocation:
    network_id: str
    network: str
    subnet: str
    address: IPAddress
    container_id: str
    interface: str
    static: bool
    owner: str
    created: float

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["address"] = str(self.address)
        return out


@dataclass(frozen=True)
class Orphans:
    """What a dead process left behind: journal rows in flight, and addresses with no journal row."""

    attachments: list[Attachment] = field(default_factory=list)
    allocations: list[Allocation] = field(default_factory=list)


@dataclass(frozen=True)
class Released:
    attachments: list[Attachment] = field(default_factory=list)
    allocations: list[Allocation] = field(default_factory=list)


_ATT_COLUMNS = ("container_id", "network", "network_id", "container_name", "phase", "netns", "interface",
                "host_veth", "host_ifindex", "bridge", "bridge_created", "addresses", "firewall", "owner",
                "created", "updated")
_ALLOC_COLUMNS = ("network_id", "network", "subnet", "address", "container_id", "interface", "static",
                  "owner", "created")
_ATT_SELECT = f"SELECT {', '.join(_ATT_COLUMNS)} FROM attachments"
_ALLOC_SELECT = f"SELECT {', '.join(_ALLOC_COLUMNS)} FROM allocations"


def _attachment(row: Sequence[Any]) -> Attachment:
    d = dict(zip(_ATT_COLUMNS, row, strict=True))
    d["bridge_created"] = bool(d["bridge_created"])
    d["addresses"] = tuple(ipaddress.ip_interface(a) for a in orjson.loads(d["addresses"]))
    d["firewall"] = orjson.loads(d["firewall"])
    return Attachment(**d)


def _allocation(row: Sequence[Any]) -> Allocation:
    d = dict(zip(_ALLOC_COLUMNS, row, strict=True))
    d["address"] = ipaddress.ip_address(d["address"])
    d["static"] = bool(d["static"])
    return Allocation(**d)


def _where(**filters: Any) -> tuple[str, list[Any]]:
    parts = [(f"{col} = ?", val) for col, val in filters.items() if val is not None]
    if not parts:
        return "", []
    return " WHERE " + " AND ".join(p for p, _ in parts), [v for _, v in parts]


# --------------------------------------------------------------------------------------------------


class State:
    """The state database of one config dir. Thread-safe (one connection behind a lock); use it from
    worker threads. Two ``State`` objects, in one process or in several, coordinate through SQLite."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = BUSY_TIMEOUT) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._lock_fd = os.open(self.path.with_name(LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                    0o600)
        except OSError as exc:
            raise StateError(f"state database {self.path}: {exc}") from exc
        try:
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                       check_same_thread=False)
        except sqlite3.Error as exc:
            os.close(self._lock_fd)
            raise StateError(f"state database {self.path}: {exc}") from exc
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, config_dir: str | os.PathLike[str], *, timeout: float = BUSY_TIMEOUT) -> State:
        """Open (creating the directory and the schema if needed) ``CONFIG_DIR/asyncnet.db``."""
        directory = Path(config_dir)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"state database {directory / DB_NAME}: {exc}") from exc
        return cls(directory / DB_NAME, timeout=timeout)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _setup(self) -> None:
        # Switching to WAL needs a moment of exclusive access: two processes opening a new file at once
        # may see "locked" here even with a busy timeout, so retry for a while.
        deadline = time.monotonic() + 10
        while True:
            try:
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise StateError(f"state database {self.path}: {exc}") from exc
                time.sleep(0.01)
        if mode.lower() != "wal":
            raise StateError(f"state database {self.path}: cannot switch to WAL mode (got {mode})")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                # not executescript(): it would COMMIT first and leave the schema unguarded
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise StateError(f"state database {self.path}: schema version {version} was written by a "
                                 f"newer asyncnet (this one knows version {SCHEMA_VERSION})")
            # version < SCHEMA_VERSION: migrations go here, one step per version.

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE: take the write lock before reading, so that what a
        transaction reads (e.g. the taken addresses) cannot change before it writes.

        Writers first queue on a ``flock`` of ``asyncnet.lock``: SQLite's busy handler polls with sleeps
        of up to 100 ms, so a process issuing back-to-back transactions would starve the others (measured:
        two processes doing 300 small transactions each ran one after the other). A blocked ``flock`` is
        woken by the kernel at release, which interleaves them. It is released with the transaction and
        by the kernel if the process dies.
        """
        with self._lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise StateError(f"state database {self.path}: {exc}") from exc
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException as exc:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    if isinstance(exc, sqlite3.Error):
                        raise StateError(f"state database {self.path}: {exc}") from exc
                    raise
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for several SELECTs."""
        with self._lock:
            try:
                self._db.execute("BEGIN")
                yield self._db
            except sqlite3.Error as exc:
                raise StateError(f"state database {self.path}: {exc}") from exc
            finally:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")

    # -- IPAM ----------------------------------------------------------------------------------------

    def allocate(self, containers: Sequence[NetworkOptions]) -> dict[str, ContainerAddresses | IpamError]:
        """Allocate addresses for a whole batch in one transaction; see :func:`ipam.allocate_batch`.

        Returns, per container id, either ``{network name: (ip/prefix, …) one per subnet}`` or the
        ``IpamError`` that container got (nothing is stored for it). Stored allocations are owned by this
        process until an attachment row refers to them; a retried batch gets back the addresses its
        containers already hold. Static addresses are recorded too, so that dynamic ones avoid them.
        """
        owner, now = current_owner(), time.time()
        with self._write() as db:
            taken: dict[tuple[str, int], dict[IPAddress | int, Holder]] = {}  # (network id, IP version)
            pools: dict[tuple[str, str], SubnetPool] = {}

            def pool_for(net: Network, sub: Subnet) -> SubnetPool:
                key = (net.id, str(sub.subnet))
                pool = pools.get(key)
                if pool is None:
                    if (net.id, 4) not in taken:
                        taken[net.id, 4], taken[net.id, 6] = {}, {}
                        rows = db.execute("SELECT packed, container_id, static FROM allocations "
                                          "WHERE network_id = ?", (net.id,))
                        for packed, c, s in rows:
                            taken[net.id, 4 if len(packed) == 4 else 6][int.from_bytes(packed, "big")] = (c, bool(s))
                    row = db.execute("SELECT last FROM ipam_cursors WHERE network_id = ? AND subnet = ?",
                                     key).fetchone()
                    cursor = ipaddress.ip_address(row[0]) if row else None
                    pool = pools[key] = SubnetPool(sub, net.name, taken[net.id, sub.subnet.version], cursor)
                return pool

            results = allocate_batch(containers, pool_for)

            ifnames = {(o.container_id, name): per.interface_name
                       for o in containers for name, per in o.networks.items()}
            for (net_id, subnet), pool in pools.items():
                removed, added = pool.changes()
                db.executemany("DELETE FROM allocations WHERE network_id = ? AND address = ?",
                               [(net_id, str(ip)) for ip in removed])
                db.executemany(
                    "INSERT INTO allocations (network_id, address, packed, subnet, network, container_id, "
                    "interface, static, owner, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(net_id, str(ip), ip.packed, subnet, pool.network, cid,
                      ifnames.get((cid, pool.network), ""), int(static), owner, now)
                     for ip, (cid, static) in added.items()])
                if pool.cursor_address is not None:
                    db.execute("INSERT OR REPLACE INTO ipam_cursors (network_id, subnet, last) "
                               "VALUES (?, ?, ?)", (net_id, subnet, str(pool.cursor_address)))
            # Addresses a container kept from an earlier attempt become this process's (so that gc does
            # not take them for a dead process's leftovers while this batch is in flight).
            kept = [(owner, ifnames.get((cid, net), ""), cid, net)
                    for cid, res in results.items() if not isinstance(res, IpamError) for net in res]
            db.executemany("UPDATE allocations SET owner = ?, interface = ? WHERE container_id = ? "
                           "AND network = ?", kept)
        return results

    def list_allocations(self, *, network: str | None = None, network_id: str | None = None,
                         container_id: str | None = None) -> list[Allocation]:
        """Allocations, optionally filtered (network name, network id, container), ordered by network."""
        where, args = _where(network=network, network_id=network_id, container_id=container_id)
        with self._read() as db:
            rows = db.execute(_ALLOC_SELECT + where + " ORDER BY network, subnet, container_id", args)
            return [_allocation(r) for r in rows]

    def allocations_by_network(self) -> dict[str, list[Allocation]]:
        """Network name -> its allocations, addresses ascending (for ``asyncnet status``)."""
        out: dict[str, list[Allocation]] = {}
        for a in self.list_allocations():
            out.setdefault(a.network, []).append(a)
        for allocs in out.values():
            allocs.sort(key=lambda a: (a.address.version, int(a.address)))
        return out

    # -- journal -------------------------------------------------------------------------------------

    def record_intents(self, attachments: Sequence[Attachment]) -> dict[tuple[str, str], Attachment]:
        """Journal ``attachments`` as ``intent`` (call before touching the kernel), in one transaction.

        An attachment whose (container, network) already has a row is not recorded: the result maps its
        key to the existing row (set up already, or in flight elsewhere), and the engine must leave it
        alone. Returns {} when every attachment was recorded.
        """
        owner, now = current_owner(), time.time()
        conflicts: dict[tuple[str, str], Attachment] = {}
        with self._write() as db:
            for att in attachments:
                cur = db.execute(
                    f"INSERT INTO attachments ({', '.join(_ATT_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(_ATT_COLUMNS))}) ON CONFLICT DO NOTHING",
                    _row(att, "intent", owner, now, now))
                if cur.rowcount == 0:
                    existing = db.execute(_ATT_SELECT + " WHERE container_id = ? AND network = ?",
                                          att.key).fetchone()
                    conflicts[att.key] = _attachment(existing)
        return conflicts

    def mark_done(self, attachments: Sequence[Attachment]) -> None:
        """Set up: store the rows as given (with what the kernel work learnt) in phase ``done``.

        Every attachment must have a row (an intent written by :meth:`record_intents`); otherwise nothing
        is changed and ``StateError`` names the missing ones.
        """
        self._rewrite(attachments, "done")

    def mark_removing(self, attachments: Sequence[Attachment]) -> None:
        """Teardown starts (call before touching the kernel): phase ``removing``, owned by this process,
        so that ``gc`` finishes it if this process dies. Same rules as :meth:`mark_done`; only the phase,
        owner and time change, so it is one statement for the whole batch."""
        keys = list(dict.fromkeys(a.key for a in attachments))
        with self._write() as db:
            changed = db.execute(
                "UPDATE attachments SET phase = 'removing', owner = ?, updated = ? WHERE (container_id, network) "
                "IN (SELECT value ->> 0, value ->> 1 FROM json_each(?))",
                (current_owner(), time.time(), orjson.dumps(keys).decode())).rowcount
            if changed != len(keys):
                self._no_entry(db, keys)

    def _rewrite(self, attachments: Sequence[Attachment], phase: Phase) -> None:
        owner, now = current_owner(), time.time()
        keep = [i for i, c in enumerate(_ATT_COLUMNS) if i >= 2 and c != "created"]
        sets = ", ".join(f"{_ATT_COLUMNS[i]} = ?" for i in keep)
        rows = []
        for att in attachments:
            row = _row(att, phase, owner, 0.0, now)
            rows.append([*(row[i] for i in keep), *att.key])
        with self._write() as db:
            cur = db.executemany(f"UPDATE attachments SET {sets} WHERE container_id = ? AND network = ?", rows)
            if cur.rowcount != len(rows):
                self._no_entry(db, [a.key for a in attachments])

    def _no_entry(self, db: sqlite3.Connection, keys: Sequence[tuple[str, str]]) -> NoReturn:
        """An update found fewer rows than it was given: name the keys the journal does not have."""
        known = {(r[0], r[1]) for r in db.execute(
            "SELECT container_id, network FROM attachments WHERE container_id IN (SELECT value FROM json_each(?))",
            (orjson.dumps([k[0] for k in keys]).decode(),))}
        names = ", ".join(f"{c} on {n}" for c, n in dict.fromkeys(keys) if (c, n) not in known)
        raise StateError(f"state database {self.path}: no journal entry for {names}")

    def release(self, keys: Iterable[tuple[str, str]], *, report: bool = True) -> Released:
        """Forget (container id, network name) pairs: their journal rows and their addresses, in one
        transaction. Call after the kernel objects are gone (or were never made). Unknown keys are
        ignored (tearing down twice is not an error); returns what was deleted, or nothing with
        ``report=False`` (a teardown does not look: parsing 1000 rows back cost two thirds of the call).

        The keys go into a temporary table and each table loses its rows in one statement."""
        released = Released()
        with self._write() as db:
            db.execute("CREATE TEMP TABLE IF NOT EXISTS released (container_id TEXT NOT NULL, network TEXT NOT NULL)")
            db.execute("DELETE FROM temp.released")
            db.executemany("INSERT INTO temp.released VALUES (?, ?)", keys)
            match = "WHERE (container_id, network) IN (SELECT container_id, network FROM temp.released)"
            if report:
                rows = db.execute(f"DELETE FROM attachments {match} RETURNING {', '.join(_ATT_COLUMNS)}")
                released.attachments.extend(_attachment(r) for r in rows.fetchall())
                rows = db.execute(f"DELETE FROM allocations {match} RETURNING {', '.join(_ALLOC_COLUMNS)}")
                released.allocations.extend(_allocation(r) for r in rows.fetchall())
            else:
                db.execute(f"DELETE FROM attachments {match}")
                db.execute(f"DELETE FROM allocations {match}")
            db.execute("DELETE FROM temp.released")
        return released

    def list_attachments(self, *, container_id: str | None = None, network: str | None = None,
                         phase: Phase | None = None, container_ids: Iterable[str] | None = None
                         ) -> list[Attachment]:
        """Journal rows, optionally filtered, ordered by container and network. ``container_ids``: only
        these containers' rows (a teardown of a few containers must not read every container's)."""
        where, args = _where(container_id=container_id, network=network, phase=phase)
        if container_ids is not None:
            where += (" AND" if where else " WHERE") + " container_id IN (SELECT value FROM json_each(?))"
            args.append(orjson.dumps(list(container_ids)).decode())
        with self._read() as db:
            rows = db.execute(_ATT_SELECT + where + " ORDER BY container_id, network", args)
            return [_attachment(r) for r in rows]

    def orphans(self) -> Orphans:
        """What ``gc`` must clean up because its process is gone: ``intent`` rows (roll back) and
        ``removing`` rows (finish the teardown), and allocations no journal row refers to. Rows of live
        processes are in flight and left alone; ``done`` rows are for gc to check against the kernel."""
        with self._read() as db:
            atts = [_attachment(r) for r in db.execute(_ATT_SELECT + " WHERE phase != 'done' "
                                                       "ORDER BY container_id, network")]
            allocs = [_allocation(r) for r in db.execute(
                _ALLOC_SELECT + " AS a WHERE NOT EXISTS (SELECT 1 FROM attachments AS t WHERE "
                "t.container_id = a.container_id AND t.network = a.network) ORDER BY network, container_id")]
        dead: dict[str, bool] = {}

        def gone(owner: str) -> bool:
            if owner not in dead:
                dead[owner] = not owner_alive(owner)
            return dead[owner]

        return Orphans([a for a in atts if gone(a.owner)], [a for a in allocs if gone(a.owner)])

    def status(self) -> dict[str, Any]:
        """Everything the state believes exists, JSON-ready (``asyncnet status``)."""
        alive: dict[str, bool] = {}
        attachments = self.list_attachments()
        for a in attachments:
            if a.owner not in alive:
                alive[a.owner] = owner_alive(a.owner)
        return {
            "attachments": [a.to_json(alive[a.owner]) for a in attachments],
            "allocations": {net: [a.to_json() for a in allocs]
                            for net, allocs in self.allocations_by_network().items()},
        }


def _row(att: Attachment, phase: Phase, owner: str, created: float, updated: float) -> tuple[Any, ...]:
    return (att.container_id, att.network, att.network_id, att.container_name, phase, att.netns,
            att.interface, att.host_veth, att.host_ifindex, att.bridge, int(att.bridge_created),
            orjson.dumps([str(a) for a in att.addresses]).decode(), orjson.dumps(att.firewall).decode(),
            owner, created, updated)
