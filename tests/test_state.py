"""The SQLite state: schema, allocation, the journal, orphans, and safety across processes (no kernel)."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from asyncnet.errors import IpamError, StateError
from asyncnet.state import DB_NAME, SCHEMA_VERSION, Attachment, Released, State, current_owner, owner_alive
from asyncnet.types import NetworkOptions, parse_network_options

NET = {"name": "net1", "id": "f" * 64, "driver": "bridge", "network_interface": "podman1",
       "subnets": [{"subnet": "10.89.0.0/24", "gateway": "10.89.0.1"}]}


def opts(cid: str, net: dict[str, Any] = NET, static: list[str] | None = None) -> NetworkOptions:
    per: dict[str, Any] = {"interface_name": "eth0"}
    if static is not None:
        per["static_ips"] = static
    return parse_network_options({"container_id": cid, "container_name": f"name-{cid}",
                                  "networks": {net["name"]: per}, "network_info": {net["name"]: net}})


def attachment(cid: str, addrs: Any, net: dict[str, Any] = NET, **kw: Any) -> Attachment:
    return Attachment(container_id=cid, network=net["name"], network_id=net["id"], interface="eth0",
                      bridge=net["network_interface"], container_name=f"name-{cid}",
                      netns=f"/run/netns/{cid}", host_veth=f"veth{cid}", addresses=tuple(addrs[net["name"]]),
                      firewall={"nat": [cid]}, **kw)


def addresses(state: State, network: str = "net1") -> list[str]:
    return [str(a.address) for a in state.allocations_by_network().get(network, [])]


@pytest.fixture
def state(tmp_path: Path):
    with State.open(tmp_path / "cfg") as st:
        yield st


# -- schema ------------------------------------------------------------------------------------------


def test_open_creates_wal_database_with_schema_version(tmp_path: Path) -> None:
    cfg = tmp_path / "a" / "b"
    with State.open(cfg) as st:
        st.allocate([opts("c1")])
    db = sqlite3.connect(cfg / DB_NAME)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
    with State.open(cfg) as st:  # reopening keeps the data
        assert addresses(st) == ["10.89.0.2"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    State.open(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StateError, match=r"asyncnet.db: schema version 2 was written by a newer asyncnet"):
        State.open(tmp_path)


def test_unusable_directory_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match="file"):
        State.open(tmp_path / "file" / "cfg")


# -- allocation --------------------------------------------------------------------------------------


def test_allocate_persists_round_robin_across_opens(tmp_path: Path) -> None:
    with State.open(tmp_path) as st:
        res = st.allocate([opts("a"), opts("b")])
        assert [str(x) for x in res["a"]["net1"]] == ["10.89.0.2/24"]
        assert [str(x) for x in res["b"]["net1"]] == ["10.89.0.3/24"]
        st.release([("a", "net1")])
    with State.open(tmp_path) as st:
        # the cursor is durable: .2 was just released and is not reused first
        assert [str(x) for x in st.allocate([opts("c")])["c"]["net1"]] == ["10.89.0.4/24"]
        assert addresses(st) == ["10.89.0.3", "10.89.0.4"]


def test_retry_keeps_addresses_and_takes_them_over(state: State) -> None:
    first = state.allocate([opts("a")])
    again = state.allocate([opts("a"), opts("b")])
    assert again["a"] == first["a"]
    assert [a.owner for a in state.list_allocations()] == [current_owner()] * 2


def test_exhaustion_names_network_and_subnet_and_stores_nothing(state: State) -> None:
    tiny = {**NET, "name": "tiny", "id": "t" * 64,
            "subnets": [{"subnet": "10.90.0.0/29", "gateway": "10.90.0.1",
                         "lease_range": {"start_ip": "10.90.0.4", "end_ip": "10.90.0.5"}}]}
    res = state.allocate([opts(c, tiny) for c in "abc"])
    assert [str(x) for x in res["a"]["tiny"]] == ["10.90.0.4/29"]
    assert [str(x) for x in res["b"]["tiny"]] == ["10.90.0.5/29"]
    assert isinstance(res["c"], IpamError)
    assert "no free IP address left in subnet 10.90.0.0/29 of network tiny" in str(res["c"])
    assert [a.container_id for a in state.list_allocations(network="tiny")] == ["a", "b"]


def test_static_ips_are_taken_and_conflicts_name_both(state: State) -> None:
    state.allocate([opts("s", static=["10.89.0.2"])])
    res = state.allocate([opts("d")])
    assert [str(x) for x in res["d"]["net1"]] == ["10.89.0.3/24"]
    res = state.allocate([opts("t", static=["10.89.0.3"])])
    assert isinstance(res["t"], IpamError)
    assert str(res["t"]) == ("IPAM error: IP address 10.89.0.3 requested by container t on network net1 is "
                             "already allocated to container d")
    static = {a.container_id: a.static for a in state.list_allocations()}
    assert static == {"s": True, "d": False}


def test_allocate_1000_in_one_batch(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    big = {**NET, "subnets": [{"subnet": "10.100.0.0/16", "gateway": "10.100.0.1"},
                              {"subnet": "fd10::/64", "gateway": "fd10::1"}]}
    batch = [opts(f"c{i}", big) for i in range(1000)]
    t0 = time.perf_counter()
    res = state.allocate(batch)
    elapsed = time.perf_counter() - t0
    assert len({r["net1"][0] for r in res.values()}) == 1000
    assert len({r["net1"][1] for r in res.values()}) == 1000
    assert len(state.list_allocations()) == 2000
    t0 = time.perf_counter()
    more = state.allocate([opts("one-more", big)])["one-more"]["net1"]
    single = time.perf_counter() - t0
    # reloaded from the database (v4 and v6 rows of one network): the round-robin continues after them
    assert [str(a) for a in more] == ["10.100.3.234/16", "fd10::3ea/64"]
    with capsys.disabled():
        print(f"\nallocate 1000 containers x 2 subnets in one batch: {elapsed * 1000:.1f} ms; "
              f"one more with 2000 taken: {single * 1000:.1f} ms")
    assert elapsed < 2.0


def test_threads_share_one_state(state: State) -> None:
    results: list[Any] = []

    def work(n: int) -> None:
        for i in range(20):
            results.append(state.allocate([opts(f"t{n}-{i}")]))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(addresses(state))) == 80


# -- journal -----------------------------------------------------------------------------------------


def test_journal_lifecycle(state: State) -> None:
    res = state.allocate([opts("a"), opts("b")])
    atts = [attachment("a", res["a"], bridge_created=True), attachment("b", res["b"])]
    assert state.record_intents(atts) == {}
    assert [a.phase for a in state.list_attachments()] == ["intent", "intent"]

    # the same attachment again (another process, or a retry) is refused and the existing row returned
    conflict = state.record_intents([attachment("a", res["a"])])
    assert list(conflict) == [("a", "net1")] and conflict[("a", "net1")].bridge_created is True

    done = [Attachment(**{**a.__dict__, "host_ifindex": 40 + i}) for i, a in enumerate(atts)]
    state.mark_done(done)
    got = state.list_attachments(phase="done")
    assert [(a.container_id, a.host_ifindex, a.phase) for a in got] == [("a", 40, "done"), ("b", 41, "done")]
    a = got[0]
    assert (a.netns, a.host_veth, a.bridge, a.bridge_created, a.firewall) == \
        ("/run/netns/a", "veth" + "a", "podman1", True, {"nat": ["a"]})
    assert [str(x) for x in a.addresses] == ["10.89.0.2/24"]
    assert a.owner == current_owner() and a.owner_alive and a.created <= a.updated

    state.mark_removing([a])
    assert state.list_attachments(container_id="a")[0].phase == "removing"

    released = state.release([("a", "net1"), ("a", "net1"), ("nope", "net1")])
    assert [x.container_id for x in released.attachments] == ["a"]
    assert [str(x.address) for x in released.allocations] == ["10.89.0.2"]
    assert state.release([("a", "net1")]).attachments == []  # twice is fine
    assert [x.container_id for x in state.list_attachments()] == ["b"]
    assert addresses(state) == ["10.89.0.3"]
    # the same without reading the rows back (what a teardown asks for)
    assert state.release([("b", "net1"), ("nope", "net1")], report=False) == Released()
    assert state.list_attachments() == [] and addresses(state) == []


def test_mark_done_without_intent_changes_nothing(state: State) -> None:
    res = state.allocate([opts("a"), opts("b")])
    state.record_intents([attachment("a", res["a"])])
    with pytest.raises(StateError, match="no journal entry for b on net1"):
        state.mark_done([attachment("a", res["a"]), attachment("b", res["b"])])
    assert state.list_attachments()[0].phase == "intent"
    with pytest.raises(StateError, match="no journal entry for b on net1"):
        state.mark_removing([attachment("a", res["a"]), attachment("b", res["b"])])
    assert state.list_attachments()[0].phase == "intent"


def test_list_and_mark_removing_by_container(state: State) -> None:
    res = state.allocate([opts(c) for c in "abc"])
    state.record_intents([attachment(c, res[c]) for c in "abc"])
    got = state.list_attachments(container_ids=["c", "a", "zz"])
    assert [a.container_id for a in got] == ["a", "c"]
    assert state.list_attachments(container_ids=[]) == []
    assert [a.container_id for a in state.list_attachments(container_ids=["b"], phase="intent")] == ["b"]
    state.mark_removing(got)
    assert [(a.container_id, a.phase) for a in state.list_attachments()] == [
        ("a", "removing"), ("b", "intent"), ("c", "removing")]


def test_status_is_json(state: State) -> None:
    res = state.allocate([opts("a"), opts("b")])
    state.record_intents([attachment("a", res["a"])])
    status = orjson.loads(orjson.dumps(state.status()))
    assert [a["container_id"] for a in status["attachments"]] == ["a"]
    assert status["attachments"][0]["addresses"] == ["10.89.0.2/24"]
    assert status["attachments"][0]["phase"] == "intent"
    assert [a["address"] for a in status["allocations"]["net1"]] == ["10.89.0.2", "10.89.0.3"]


# -- orphans: rows of processes that are gone --------------------------------------------------------


def _leave_orphans(cfg: str) -> str:
    with State.open(cfg) as st:
        res = st.allocate([opts("dead-intent"), opts("dead-removing"), opts("dead-alloc"), opts("dead-done")])
        st.record_intents([attachment(c, res[c]) for c in ("dead-intent", "dead-removing", "dead-done")])
        st.mark_removing([attachment("dead-removing", res["dead-removing"])])
        st.mark_done([attachment("dead-done", res["dead-done"])])
        return current_owner()


def test_orphans_are_what_dead_processes_left(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        dead_owner = pool.apply(_leave_orphans, (str(tmp_path),))
    time.sleep(0.1)  # the worker has exited once the pool is closed
    assert not owner_alive(dead_owner)
    assert owner_alive(current_owner())
    assert not owner_alive(dead_owner.split(":")[0] + ":1:0")  # pid 1 with a wrong start time
    assert not owner_alive("another-boot:1:1")
    assert owner_alive("garbage")  # when unsure, never collect
    with State.open(tmp_path) as st:
        res = st.allocate([opts("live-intent"), opts("live-alloc")])
        st.record_intents([attachment("live-intent", res["live-intent"])])
        orphans = st.orphans()
        assert [(a.container_id, a.phase) for a in orphans.attachments] == \
            [("dead-intent", "intent"), ("dead-removing", "removing")]
        assert [a.container_id for a in orphans.allocations] == ["dead-alloc"]
        st.release([a.key for a in orphans.attachments] + [(a.container_id, a.network)
                                                            for a in orphans.allocations])
        assert st.orphans().attachments == [] and st.orphans().allocations == []
        assert sorted(a.container_id for a in st.list_allocations()) == ["dead-done", "live-alloc",
                                                                          "live-intent"]


# -- across processes --------------------------------------------------------------------------------


def _worker(cfg: str, prefix: str, count: int, per_batch: int, barrier: Any) -> dict[str, list[str]]:
    barrier.wait()
    out: dict[str, list[str]] = {}
    with State.open(cfg, timeout=60) as st:  # opened after the barrier: creating the file races too
        for start in range(0, count, per_batch):
            batch = [opts(f"{prefix}{i}") for i in range(start, min(start + per_batch, count))]
            res = st.allocate(batch)
            for cid, r in res.items():
                assert not isinstance(r, IpamError), r
                out[cid] = [str(a) for a in r["net1"]]
            st.record_intents([attachment(cid, res[cid]) for cid in res])
            st.mark_done([attachment(cid, res[cid]) for cid in res])
    return out


@pytest.mark.parametrize(("procs", "count", "per_batch"), [(2, 100, 1), (2, 100, 100), (4, 50, 7)])
def test_processes_never_share_an_address(tmp_path: Path, procs: int, count: int, per_batch: int) -> None:
    net_size = procs * count
    assert net_size <= 253
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(procs)
    cfg = str(tmp_path / "cfg")
    with ctx.Pool(procs) as pool:
        jobs = [pool.apply_async(_worker, (cfg, f"p{n}-", count, per_batch, barrier)) for n in range(procs)]
        results = [j.get(timeout=120) for j in jobs]
    handed_out = [a for r in results for addrs in r.values() for a in addrs]
    assert len(handed_out) == net_size
    assert len(set(handed_out)) == net_size
    # they really ran at the same time: with one container per transaction, the address range is not
    # one block per process (SQLite's busy handler alone lets one process starve the other)
    by_addr = sorted((int(a.split("/")[0].rsplit(".", 1)[1]), n) for n, r in enumerate(results)
                     for addrs in r.values() for a in addrs)
    switches = sum(1 for (_, x), (_, y) in zip(by_addr, by_addr[1:], strict=False) if x != y)
    if per_batch == 1:
        assert switches >= 2 * procs, f"the processes did not interleave ({switches} switches)"
    with State.open(cfg) as st:
        assert len(set(addresses(st))) == net_size
        assert len(st.list_attachments(phase="done")) == net_size
