"""The planner's nftables commands as nf_tables netlink messages: the bytes ``nft -f`` would send.

Why: committing 1000 containers x 2 ports (8000 rules) through libnftables costs ~100 ms of parsing
and evaluation in nft itself on top of the ~85 ms the kernel needs (measured on the project's VM).
The planner's commands are a small, closed set (§4/§5 of the spec), so they are encoded here
directly, byte for byte as nft 1.0.6 encodes them (including its implicit ``meta nfproto``/``meta
l4proto`` dependencies, prefix trimming and the anonymous ``{ tcp, udp }`` set), and the kernel
receives the same transaction. The listing afterwards is therefore identical, and a test compares
these bytes with what ``nft`` itself sends for the same commands.

Anything outside that set raises :class:`Unencodable`; the caller then hands the batch to
libnftables instead. Pure: no I/O.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from .ruleset import DNAT_CHAIN, SETMARK_CHAIN, TABLE, PortBlock, PortFw, PortKey, mapping_host, port_blocks

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 16
NFNL_MSG_BATCH_END = 17

NFT_MSG_NEWTABLE = 0
NFT_MSG_NEWCHAIN = 3
NFT_MSG_DELCHAIN = 5
NFT_MSG_NEWRULE = 6
NFT_MSG_DELRULE = 8
NFT_MSG_NEWSET = 9
NFT_MSG_NEWSETELEM = 12

NLM_F_REQUEST = 0x1
NLM_F_ECHO = 0x8
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLA_F_NESTED = 0x8000


_HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
_POLICIES = {"drop": 0, "accept": 1}

# verdict codes (include/uapi/linux/netfilter.h, nf_tables.h)
NF_DROP, NF_ACCEPT, NFT_JUMP = 0, 1, -3
# cmp operators
_CMP = {"==": 0, "!=": 1, "<=": 3, ">=": 5}
# meta keys
META_MARK, META_IIFNAME, META_OIFNAME, META_NFPROTO, META_L4PROTO = 3, 6, 7, 15, 16
# payload bases
NETWORK_HEADER, TRANSPORT_HEADER = 1, 2

_L4 = {"tcp": 6, "udp": 17, "sctp": 132}
_NFPROTO = {"ip": 2, "ip6": 10}
# (offset, length) of the address fields nft knows by these names
_ADDR_FIELDS = {("ip", "saddr"): (12, 4), ("ip", "daddr"): (16, 4),
                ("ip6", "saddr"): (8, 16), ("ip6", "daddr"): (24, 16)}
_CT_STATE = {"invalid": 1, "established": 2, "related": 4, "new": 8, "untracked": 64}
RTN_LOCAL = 2
_FIB_RESULT_TYPE = 3  # NFT_FIB_RESULT_ADDRTYPE
_FIB_F_DADDR = 2
_NAT_DNAT = 1
_NF_NAT_RANGE_PROTO_SPECIFIED = 2
IFNAMSIZ = 16

# the anonymous set nft 1.0.6 makes for ``meta l4proto { … }``: key type inet_proto (12), 1 byte,
# flags anonymous|constant, and nft's user data describing the key (copied from nft's own batch)
ANON_SET_NAME = b"__set%d\0"
_SET_F_ANONYMOUS_CONSTANT = 3
_INET_PROTO_TYPE = 12
_L4PROTO_SET_UDATA = bytes.fromhex("000401000000030e0004090000000106000410000000")


class Unencodable(ValueError):
    """A command outside the set this module knows: give the batch to libnftables instead."""


_u32 = struct.Struct(">I").pack
_hdr = struct.Struct("=IHHII").pack
_attr_hdr = struct.Struct("=HH").pack


def _attr(atype: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _attr_hdr(n, atype) + payload + b"\0" * (-n & 3)


def _nest(atype: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return _attr_hdr(4 + len(body), atype | NLA_F_NESTED) + body


def _str(atype: int, s: str) -> bytes:
    return _attr(atype, s.encode() + b"\0")


def _be32(atype: int, v: int) -> bytes:
    return _attr(atype, _u32(v & 0xFFFFFFFF))


def _expr(name: bytes, *data: bytes) -> bytes:
    return _nest(1, _attr(1, name + b"\0"), _nest(2, *data))


def _data_value(atype: int, value: bytes) -> bytes:
    return _nest(atype, _attr(1, value))


def _meta_load(key: int) -> bytes:
    return _expr(b"meta", _be32(2, key), _be32(1, 1))


def _cmp(op: int, value: bytes) -> bytes:
    return _expr(b"cmp", _be32(1, 1), _be32(2, op), _data_value(3, value))


def _payload(base: int, offset: int, length: int) -> bytes:
    return _expr(b"payload", _be32(1, 1), _be32(2, base), _be32(3, offset), _be32(4, length))


def _bitwise(mask: bytes, xor: bytes, *, with_op: bool) -> bytes:
    op = (_be32(6, 0),) if with_op else ()
    return _expr(b"bitwise", _be32(1, 1), _be32(2, 1), *op, _be32(3, len(mask)),
                 _data_value(4, mask), _data_value(5, xor))


def _verdict(code: int, chain: str | None = None) -> bytes:
    inner = [_be32(1, code)]
    if chain is not None:
        inner.append(_str(2, chain))
    return _expr(b"immediate", _be32(1, 0), _nest(2, _nest(2, *inner)))


def _immediate(reg: int, value: bytes) -> bytes:
    return _expr(b"immediate", _be32(1, reg), _data_value(2, value))


_host32 = struct.Struct("=I").pack
_DEP_NFPROTO = {fam: _meta_load(META_NFPROTO) + _cmp(0, bytes([v])) for fam, v in _NFPROTO.items()}
_DEP_L4 = {proto: _meta_load(META_L4PROTO) + _cmp(0, bytes([v])) for proto, v in _L4.items()}
_ACCEPT = _verdict(NF_ACCEPT)
_DROP = _verdict(NF_DROP)
_MASQ = _nest(1, _attr(1, b"masq\0"), _attr_hdr(4, 2 | NLA_F_NESTED))

# the implicit match a statement needs before it: "ip"/"ip6" (meta nfproto), "tcp"/"udp"/"sctp" (meta l4proto)
_Dep = str | None
_RULE_KEYS = frozenset({"family", "table", "chain", "expr"})
_NEWRULE_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE
_RULE_APPEND_FLAGS = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND
_RULE_INSERT_FLAGS = NLM_F_REQUEST | NLM_F_CREATE


@dataclass
class Batch:
    """One transaction's messages (without the batch begin/end framing)."""

    messages: list[bytes] = field(default_factory=list)
    #: per message: index of the command it came from
    command_of: list[int] = field(default_factory=list)
    #: per message: RULE (a new rule: allocates a handle), NEW_OBJECT (a new chain or set: allocates
    #: a handle) or 0 (allocates none)
    kinds: bytearray = field(default_factory=bytearray)
    #: the chain of each rule added, in order
    rule_chains: list[str] = field(default_factory=list)
    #: message offset -> name of each chain the batch creates
    new_chains: dict[int, str] = field(default_factory=dict)
    first_seq: int = 1

    def command_at(self, seq: int) -> int | None:
        off = seq - self.first_seq
        return self.command_of[off] if 0 <= off < len(self.command_of) else None

    def first_and_last_rule(self) -> tuple[int, int] | None:
        """Sequence numbers of the first and the last new rule, None without one."""
        if RULE not in self.kinds:
            return None
        return self.first_seq + self.kinds.index(RULE), self.first_seq + self.kinds.rindex(RULE)

    def handles(self, first_rule_handle: int) -> Handles:
        """The handles of what the batch created, given the first new rule's: the kernel numbers a
        table's new rules, chains and sets in message order, one counter for all."""
        out = Handles()
        allocating = [off for off, kind in enumerate(self.kinds) if kind]
        first = self.kinds.index(RULE)
        base = first_rule_handle - allocating.index(first)
        chains = iter(self.rule_chains)
        for n, off in enumerate(allocating):
            if self.kinds[off] == RULE:
                out.rules[self.command_of[off]] = (next(chains), base + n)
            elif off in self.new_chains:
                out.chains[self.new_chains[off]] = base + n
        return out

    def framed(self, echo: Sequence[int] = ()) -> bytes:
        """BEGIN + messages + END as one buffer; ``echo``: sequence numbers to flag NLM_F_ECHO."""
        begin = _hdr(20, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, self.first_seq - 1, 0) + b"\0\0\0\x0a"
        end_seq = self.first_seq + len(self.messages)
        end = _hdr(20, NFNL_MSG_BATCH_END, NLM_F_REQUEST, end_seq, 0) + b"\0\0\0\x0a"
        msgs = self.messages
        if echo:
            msgs = list(msgs)
            for seq in echo:
                i = seq - self.first_seq
                m = msgs[i]
                flags = struct.unpack_from("=H", m, 6)[0] | NLM_F_ECHO
                msgs[i] = m[:6] + struct.pack("=H", flags) + m[8:]
        return b"".join((begin, *msgs, end))


RULE, NEW_OBJECT = 1, 2
_RULE_KIND = bytes([RULE])


@dataclass
class Handles:
    """What a committed batch created, by handle."""

    #: command index -> (chain, handle) of each rule added
    rules: dict[int, tuple[str, int]] = field(default_factory=dict)
    #: name -> handle of each chain created
    chains: dict[str, int] = field(default_factory=dict)


class _Encoder:
    def __init__(self, first_seq: int, first_set_id: int) -> None:
        self.batch = Batch(first_seq=first_seq)
        self.seq = first_seq
        self.set_id = first_set_id
        self.stmt_memo: dict[int, tuple[_Dep, _Dep, bytes]] = {}
        self.value_memo: dict[bytes, tuple[_Dep, _Dep, bytes]] = {}
        self.block_memo: dict[Any, bytes] = {}
        self.table_attr = _str(1, TABLE)
        self.deleted_chains: set[str] = set()
        self.attr_memo: dict[tuple[int, str], bytes] = {}
        self.pre: list[tuple[int, list[bytes]]] = []  # messages a statement needs before its rule (sets)

    # -- messages -----------------------------------------------------------------------------------

    def _message(self, cmd_index: int, mtype: int, flags: int, *attrs: bytes, allocates: bool = False) -> int:
        body = b"".join(attrs)
        seq = self.seq
        self.seq += 1
        self.batch.messages.append(
            _hdr(20 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | mtype, flags, seq, 0) + b"\x01\0\0\0" + body)
        self.batch.command_of.append(cmd_index)
        self.batch.kinds.append(NEW_OBJECT if allocates else 0)
        return seq

    def _name(self, atype: int, name: Any) -> bytes:
        key = (atype, name)
        out = self.attr_memo.get(key)
        if out is None:
            out = self.attr_memo[key] = _str(atype, _text(name))
        return out

    def command(self, i: int, cmd: dict[str, Any], existing_chains: frozenset[str] | set[str]) -> None:
        if type(cmd) is not dict or len(cmd) != 1:
            raise Unencodable("a command has exactly one verb")
        ((verb, obj),) = cmd.items()
        if type(obj) is not dict or len(obj) != 1:
            raise Unencodable(f"{verb}: one object expected")
        ((kind, body),) = obj.items()
        if type(body) is not dict or body.get("family") != "inet":
            raise Unencodable("only the inet family is encoded")
        if kind == "rule" and (verb == "add" or verb == "insert") and body.keys() == _RULE_KEYS:
            self._rule(i, verb == "add", body)  # the hot path: thousands per batch
        elif kind == "table" and verb == "add" and body.keys() == {"family", "name"}:
            self._message(i, NFT_MSG_NEWTABLE, NLM_F_REQUEST, _str(1, _text(body["name"])), _be32(2, 0))
        elif kind == "chain" and verb == "add":
            self._add_chain(i, self._name(1, body.get("table")), body, existing_chains)
        elif kind == "chain" and verb == "delete" and body.keys() == {"family", "table", "name"}:
            self._message(i, NFT_MSG_DELCHAIN, NLM_F_REQUEST, self._name(1, body["table"]),
                          self._name(3, body["name"]))
            self.deleted_chains.add(body["name"])  # re-adding it later in the batch makes a new chain
        elif kind == "rule" and verb == "delete" and body.keys() == {"family", "table", "chain", "handle"}:
            handle = body["handle"]
            if not isinstance(handle, int) or isinstance(handle, bool) or not 0 < handle < 1 << 64:
                raise Unencodable("bad rule handle")
            self._message(i, NFT_MSG_DELRULE, NLM_F_REQUEST, self._name(1, body["table"]),
                          self._name(2, body["chain"]), _attr(3, handle.to_bytes(8, "big")))
        else:
            raise Unencodable(f"{verb} {kind} is not encoded")

    def _rule(self, i: int, append: bool, body: dict[str, Any]) -> None:
        exprs = self._rule_exprs(body["expr"])
        table = self._name(1, body["table"])
        chain = self._name(2, body["chain"])
        batch = self.batch
        if self.pre:
            for msg_type, attrs in self.pre:
                self._message(i, msg_type, NLM_F_REQUEST | NLM_F_CREATE, table, *attrs,
                              allocates=msg_type == NFT_MSG_NEWSET)
            self.pre.clear()
        self._newrule(table, chain, exprs, _RULE_APPEND_FLAGS if append else _RULE_INSERT_FLAGS)
        batch.command_of.append(i)
        batch.kinds.append(RULE)
        batch.rule_chains.append(body["chain"])

    def _add_chain(self, i: int, table: bytes, body: dict[str, Any],
                   existing: frozenset[str] | set[str]) -> None:
        name = _text(body.get("name"))
        keys = set(body)
        new = name not in existing or name in self.deleted_chains
        if new:
            self.batch.new_chains[len(self.batch.messages)] = name
        if keys == {"family", "table", "name"}:
            self._message(i, NFT_MSG_NEWCHAIN, NLM_F_REQUEST | NLM_F_CREATE, table, self._name(3, name),
                          allocates=new)
            return
        if keys != {"family", "table", "name", "type", "hook", "prio", "policy"}:
            raise Unencodable("chain attributes")
        hook, policy, prio = _HOOKS.get(body["hook"]), _POLICIES.get(body["policy"]), body["prio"]
        if hook is None or policy is None or not isinstance(prio, int) or isinstance(prio, bool):
            raise Unencodable("base chain hook/policy/priority")
        self._message(i, NFT_MSG_NEWCHAIN, NLM_F_REQUEST | NLM_F_CREATE, table, self._name(3, name),
                      _str(7, _text(body["type"])), _be32(5, policy),
                      _nest(4, _be32(1, hook), _be32(2, prio)), allocates=new)

    # -- a container's port rules -----------------------------------------------------------------

    def _newrule(self, table: bytes, chain: bytes, exprs: bytes, flags: int = _RULE_APPEND_FLAGS) -> None:
        """One NEWRULE message (its callers do the batch's per-message bookkeeping)."""
        seq = self.seq
        self.seq = seq + 1
        body = _rule_body(_rule_head(table, chain), exprs)
        self.batch.messages.append(_hdr(16 + len(body), _NEWRULE_TYPE, flags, seq, 0) + body)

    def _memo(self, key: Any, make: Any) -> Any:
        out = self.block_memo.get(key)
        if out is None:
            out = self.block_memo[key] = make()
        return out

    def port_block(self, i: int, block: PortBlock, bodies: Sequence[bytes] | None = None) -> int:
        """Emit one container's port rules (``bodies``: encoded ahead by :class:`PreparedPorts`).
        Returns the index of the next command."""
        if bodies is None:
            bodies = self.port_bodies(block)
        if len(bodies) != len(block.chains):
            raise AssertionError("port block: rule count differs from PortBlock.chains")
        seq = self.seq
        append = self.batch.messages.append
        for body in bodies:
            append(_hdr(16 + len(body), _NEWRULE_TYPE, _RULE_APPEND_FLAGS, seq, 0) + body)
            seq += 1
        self.seq = seq
        n = len(bodies)
        batch = self.batch
        batch.command_of.extend(range(i, i + n))
        batch.kinds.extend(_RULE_KIND * n)
        batch.rule_chains.extend(block.chains)
        return i + n

    def port_bodies(self, block: PortBlock) -> list[bytes]:
        """§5.2 for one container and family from byte templates: each NEWRULE message after its
        netlink header, the same bytes as encoding :func:`~.ruleset.port_rules` (a test holds the two
        paths equal), several times cheaper."""
        pf, cip = block.pf, block.cip
        v6 = cip.version == 6
        fam = "ip6" if v6 else "ip"
        dep_fam = _DEP_NFPROTO[fam]
        memo = self._memo
        mine = block.dnat_chain
        mine_head = _rule_head(self.table_attr, self._name(2, mine))
        dnat_head_attr = _rule_head(self.table_attr, self._name(2, DNAT_CHAIN))
        jump_mine = memo(("jump", mine), lambda: _verdict(NFT_JUMP, _text(mine)))
        jump_setmark = memo(("jump", SETMARK_CHAIN), lambda: _verdict(NFT_JUMP, SETMARK_CHAIN))
        subnet = cip.network
        saddr_subnet = dep_fam + memo(("saddr", subnet), lambda: self._payload_match(
            {"protocol": fam, "field": "saddr"},
            {"prefix": {"addr": str(subnet.network_address), "len": subnet.prefixlen}}, "==")[2])
        saddr_localhost = _DEP_NFPROTO["ip"] + memo(("saddr", "127.0.0.1"), lambda: self._payload_match(
            {"protocol": "ip", "field": "saddr"}, "127.0.0.1", "==")[2])
        out: list[bytes] = []

        def emit(head: bytes, exprs: bytes) -> None:
            out.append(_rule_body(head, exprs))

        template = _DNAT[fam]
        dnat_head = template[0] + cip.ip.packed + template[1]
        dnat_tail = template[2]
        for m in pf.port_mappings or ():
            host = mapping_host(m, v6)
            if host is False:
                continue
            proto = m.protocol
            l4 = _DEP_L4.get(proto)
            if l4 is None:
                raise Unencodable(f"protocol {proto}")
            daddr = b"" if host is None else memo(("daddr", host), lambda h=host: self._payload_match(
                {"protocol": fam, "field": "daddr"}, str(h), "==")[2])
            if m.range > 1:
                dport = l4 + self._payload_match({"protocol": proto, "field": "dport"},
                                                 {"range": [m.host_port, m.host_port + m.range - 1]}, "==")[2]
            else:
                dport = l4 + _dport_eq(m.host_port)
            lead = dep_fam + daddr if daddr else b""  # the daddr match where no saddr match brought the dependency
            emit(dnat_head_attr, lead + dport + jump_mine)
            emit(mine_head, saddr_subnet + daddr + dport + jump_setmark)
            if not v6:
                emit(mine_head, saddr_localhost + daddr + dport + jump_setmark)
            if m.count == 1:
                port_match = dport if m.range <= 1 else l4 + _dport_eq(m.host_port)
                emit(mine_head, lead + port_match + dnat_head + _uint(m.container_port, 16).to_bytes(2, "big")
                     + dnat_tail)
                continue
            for k in range(m.count):
                emit(mine_head, lead + l4 + _dport_eq(m.host_port + k) + dnat_head
                     + _uint(m.container_port + k, 16).to_bytes(2, "big") + dnat_tail)
        return out

    # -- rules --------------------------------------------------------------------------------------

    def _rule_exprs(self, expr: Any) -> bytes:
        if type(expr) is not list or not expr:
            raise Unencodable("a rule needs statements")
        out: list[bytes] = []
        nfproto: str | None = None
        l4: str | None = None
        memo = self.stmt_memo
        for stmt in expr:
            enc = memo.get(id(stmt))
            if enc is None:
                # the planner shares statement objects within a container; equal statements of
                # different containers (the subnet match, the jump) are found by their content
                key = orjson.dumps(stmt)
                enc = self.value_memo.get(key)
                if enc is None:
                    enc = self._statement(stmt)
                    if self.pre:  # a statement that creates a set is not shared: one set per rule
                        out.append(enc[2])  # (no dependencies: only the l4proto lookup does this)
                        continue
                    self.value_memo[key] = enc
                memo[id(stmt)] = enc
            need_fam, need_l4, code = enc
            if need_fam is not None and need_fam != nfproto:
                if nfproto is not None:
                    raise Unencodable("two network protocols in one rule")
                nfproto = need_fam
                out.append(_DEP_NFPROTO[need_fam])
            if need_l4 is not None and need_l4 != l4:
                if l4 is not None:
                    raise Unencodable("two transport protocols in one rule")
                l4 = need_l4
                out.append(_DEP_L4[need_l4])
            out.append(code)
        return b"".join(out)

    def _statement(self, stmt: Any) -> tuple[_Dep, _Dep, bytes]:
        if not isinstance(stmt, dict) or len(stmt) != 1:
            raise Unencodable("a statement is an object with one key")
        ((kind, body),) = stmt.items()
        if kind == "match":
            return self._match(body)
        if kind == "jump" and isinstance(body, dict) and set(body) == {"target"}:
            return None, None, _verdict(NFT_JUMP, _text(body["target"]))
        if kind == "accept" and body is None:
            return None, None, _ACCEPT
        if kind == "drop" and body is None:
            return None, None, _DROP
        if kind == "masquerade" and body is None:
            return None, None, _MASQ
        if kind == "dnat" and isinstance(body, dict) and set(body) == {"addr", "family", "port"}:
            return None, None, _dnat(body)
        if kind == "mangle" and _is_mark_or(body):
            bits = _uint(body["value"]["|"][1], 32)
            return None, None, (_meta_load(META_MARK)
                                + _bitwise(_host32(~bits & 0xFFFFFFFF), _host32(bits), with_op=True)
                                + _expr(b"meta", _be32(2, META_MARK), _be32(3, 1)))
        raise Unencodable(f"statement {kind}")

    def _match(self, body: Any) -> tuple[_Dep, _Dep, bytes]:
        if not isinstance(body, dict) or set(body) != {"left", "right", "op"}:
            raise Unencodable("match needs left, right and op")
        left, right, op = body["left"], body["right"], body["op"]
        if not isinstance(left, dict) or len(left) != 1:
            raise Unencodable("match left side")
        ((lkind, lbody),) = left.items()
        if lkind == "payload":
            return self._payload_match(lbody, right, op)
        if lkind == "meta" and isinstance(lbody, dict) and set(lbody) == {"key"}:
            key = lbody["key"]
            if key in ("iifname", "oifname") and op in ("==", "!="):
                name = _text(right).encode()
                if len(name) >= IFNAMSIZ:
                    raise Unencodable("interface name too long")
                mkey = META_IIFNAME if key == "iifname" else META_OIFNAME
                return None, None, _meta_load(mkey) + _cmp(_CMP[op], name.ljust(IFNAMSIZ, b"\0"))
            if key == "l4proto" and op == "==" and isinstance(right, dict) and set(right) == {"set"}:
                return None, None, self._l4proto_set(right["set"])
            raise Unencodable(f"meta {key} match")
        if lkind == "ct" and lbody == {"key": "state"} and op == "in":
            names = [right] if isinstance(right, str) else right
            if not isinstance(names, list) or not names or any(n not in _CT_STATE for n in names):
                raise Unencodable("ct state value")
            bits = 0
            for n in names:
                bits |= _CT_STATE[n]
            return None, None, (_expr(b"ct", _be32(2, 0), _be32(1, 1))
                                + _bitwise(_host32(bits), _host32(0), with_op=False)
                                + _cmp(_CMP["!="], _host32(0)))
        if lkind == "fib" and lbody == {"result": "type", "flags": ["daddr"]} and right == "local" and op == "==":
            return None, None, (_expr(b"fib", _be32(3, _FIB_F_DADDR), _be32(2, _FIB_RESULT_TYPE), _be32(1, 1))
                                + _cmp(0, _host32(RTN_LOCAL)))
        if lkind == "&" and op == "==" and isinstance(lbody, list) and len(lbody) == 2 \
                and lbody[0] == {"meta": {"key": "mark"}}:
            mask, value = _uint(lbody[1], 32), _uint(right, 32)
            return None, None, (_meta_load(META_MARK) + _bitwise(_host32(mask), _host32(0), with_op=True)
                                + _cmp(0, _host32(value)))
        raise Unencodable(f"match on {lkind}")

    def _payload_match(self, lbody: Any, right: Any, op: str) -> tuple[_Dep, _Dep, bytes]:
        if not isinstance(lbody, dict) or set(lbody) != {"protocol", "field"} or op not in ("==", "!="):
            raise Unencodable("payload match")
        proto, fieldname = lbody["protocol"], lbody["field"]
        cmp_op = _CMP[op]
        if (proto, fieldname) in _ADDR_FIELDS:
            offset, length = _ADDR_FIELDS[(proto, fieldname)]
            version = 4 if proto == "ip" else 6
            dep: _Dep = proto
            if isinstance(right, str):
                addr = _address(right, version)
                return dep, None, _payload(NETWORK_HEADER, offset, length) + _cmp(cmp_op, addr)
            if isinstance(right, dict) and set(right) == {"prefix"} and isinstance(right["prefix"], dict) \
                    and set(right["prefix"]) == {"addr", "len"}:
                plen = right["prefix"]["len"]
                addr = _address(right["prefix"]["addr"], version)
                if not isinstance(plen, int) or isinstance(plen, bool) or not 0 <= plen <= length * 8:
                    raise Unencodable("prefix length")
                net = int.from_bytes(addr, "big") & (((1 << plen) - 1) << (length * 8 - plen))
                packed = net.to_bytes(length, "big")
                if plen % 8 == 0 and plen:  # nft loads just the prefix's bytes
                    n = plen // 8
                    return dep, None, _payload(NETWORK_HEADER, offset, n) + _cmp(cmp_op, packed[:n])
                mask = (((1 << plen) - 1) << (length * 8 - plen)).to_bytes(length, "big")
                return dep, None, (_payload(NETWORK_HEADER, offset, length)
                                   + _bitwise(mask, bytes(length), with_op=False) + _cmp(cmp_op, packed))
            raise Unencodable("address match value")
        if fieldname == "dport" and (proto in _L4 or proto == "th"):
            l4dep: _Dep = proto if proto in _L4 else None
            if type(right) is int and 0 <= right < 1 << 16:  # one per mapping: from a template
                return None, l4dep, _DPORT_CMP[cmp_op] + right.to_bytes(2, "big") + b"\0\0"
            load = _payload(TRANSPORT_HEADER, 2, 2)
            if isinstance(right, dict) and set(right) == {"range"} and op == "==":
                lo, hi = right["range"] if isinstance(right["range"], list) and len(right["range"]) == 2 \
                    else (None, None)
                return None, l4dep, (load + _cmp(_CMP[">="], _uint(lo, 16).to_bytes(2, "big"))
                                     + _cmp(_CMP["<="], _uint(hi, 16).to_bytes(2, "big")))
            return None, l4dep, load + _cmp(cmp_op, _uint(right, 16).to_bytes(2, "big"))
        raise Unencodable(f"payload {proto} {fieldname}")

    def _l4proto_set(self, members: Any) -> bytes:
        if not isinstance(members, list) or not members or any(m not in _L4 for m in members):
            raise Unencodable("l4proto set members")
        set_id = self.set_id
        self.set_id += 1
        # the table attribute is filled in by the rule's command (same table)
        self.pre.append((NFT_MSG_NEWSET, [
            _attr(2, ANON_SET_NAME), _be32(3, _SET_F_ANONYMOUS_CONSTANT), _be32(4, _INET_PROTO_TYPE),
            _be32(5, 1), _be32(10, set_id), _nest(9, _be32(1, len(members))),
            _attr(13, _L4PROTO_SET_UDATA)]))
        elems = [_nest(n, _nest(1, _attr(1, bytes([_L4[m]])))) for n, m in enumerate(members, 1)]
        self.pre.append((NFT_MSG_NEWSETELEM, [_attr(2, ANON_SET_NAME), _be32(4, set_id), _nest(3, *elems)]))
        return _meta_load(META_L4PROTO) + _expr(b"lookup", _be32(2, 1), _attr(1, ANON_SET_NAME), _be32(4, set_id))


def _is_mark_or(body: Any) -> bool:
    """``meta mark set meta mark | N``: the only mangle statement the planner makes."""
    mark = {"meta": {"key": "mark"}}
    if not isinstance(body, dict) or set(body) != {"key", "value"} or body["key"] != mark:
        return False
    value = body["value"]
    return (isinstance(value, dict) and set(value) == {"|"} and isinstance(value["|"], list)
            and len(value["|"]) == 2 and value["|"][0] == mark)


def _dnat_template(fam: str) -> tuple[bytes, bytes, bytes]:
    """``dnat ip[6] to ADDR:PORT`` around its two values: immediate ADDR -> reg 1, immediate PORT
    -> reg 2, nat with both registers. Each value is the last attribute of its immediate (the port
    padded to 4 bytes), so the template is the encoding of zeros cut at those places."""
    n = 4 if fam == "ip" else 16
    nat = _expr(b"nat", _be32(1, _NAT_DNAT), _be32(2, _NFPROTO[fam]), _be32(3, 1), _be32(5, 2),
                _be32(7, _NF_NAT_RANGE_PROTO_SPECIFIED))
    return _immediate(1, bytes(n))[:-n], _immediate(2, b"\0\0")[:-4], b"\0\0" + nat


_DNAT = {fam: _dnat_template(fam) for fam in _NFPROTO}
# ``… dport == N`` without its dependency: the payload load and a cmp whose 2-byte value (padded to 4)
# ends the encoding
_DPORT_CMP = {op: (_payload(TRANSPORT_HEADER, 2, 2) + _cmp(op, b"\0\0"))[:-4] for op in _CMP.values()}


def _dport_eq(port: int) -> bytes:
    """``… dport == port`` without its dependency, from the template."""
    return _DPORT_CMP[0] + _uint(port, 16).to_bytes(2, "big") + b"\0\0"


def _dnat(body: dict[str, Any]) -> bytes:
    fam = body["family"]
    template = _DNAT.get(fam)
    if template is None:
        raise Unencodable("dnat family")
    addr = _address(body["addr"], 4 if fam == "ip" else 6)
    port = _uint(body["port"], 16)
    return template[0] + addr + template[1] + port.to_bytes(2, "big") + template[2]


def _text(v: Any) -> str:
    if not isinstance(v, str) or not v or "\0" in v:
        raise Unencodable("a name must be a non-empty string")
    return v


def _uint(v: Any, bits: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << bits:
        raise Unencodable(f"not a {bits}-bit number: {v!r}")
    return v


def _address(v: Any, version: int) -> bytes:
    """The packed address (inet_pton: the planner's canonical strings, ~10x cheaper than ipaddress)."""
    try:
        return socket.inet_pton(socket.AF_INET if version == 4 else socket.AF_INET6, v)
    except (OSError, TypeError):
        raise Unencodable(f"not an IPv{version} address: {v!r}") from None


def _rule_head(table: bytes, chain: bytes) -> bytes:
    """A NEWRULE message's start after its netlink header: nfgenmsg (inet), table and chain."""
    return b"\x01\0\0\0" + table + chain


def _rule_body(head: bytes, exprs: bytes) -> bytes:
    """A NEWRULE message after its netlink header (the header carries the batch's sequence number)."""
    return head + _attr_hdr(4 + len(exprs), 4 | NLA_F_NESTED) + exprs


class PreparedPorts:
    """Containers' port rules encoded before the commit that carries them.

    Why: a batch's firewall commit is its serial tail, and it holds the cross-process firewall lock;
    encoding 1000 containers' 8000 port rules inside it cost 15-27 ms of it. The engine adds each
    container here when its own kernel work is done, between other containers' requests, and the
    commit only numbers the messages. An entry serves only the very :class:`PortFw` object it was
    made from (frozen: it cannot have changed), for the same chain; anything else is encoded as usual.
    """

    def __init__(self) -> None:
        self._enc = _Encoder(1, 1)  # only its memos: every container of a network shares them
        self._lock = threading.Lock()
        self._bodies: dict[tuple[PortKey, int], tuple[PortFw, str, list[bytes]]] = {}
        self.used = 0  # blocks a commit took from here

    def __len__(self) -> int:
        return len(self._bodies)

    def add(self, pf: PortFw) -> None:
        with self._lock:
            for block in port_blocks(pf):
                try:
                    bodies = self._enc.port_bodies(block)
                except Unencodable:
                    continue  # the commit takes its libnftables path anyway
                self._bodies[(pf.key, block.cip.version)] = (pf, block.dnat_chain, bodies)

    def bodies(self, block: PortBlock) -> list[bytes] | None:
        entry = self._bodies.get((block.pf.key, block.cip.version))
        if entry is None or entry[0] is not block.pf or entry[1] != block.dnat_chain:
            return None
        self.used += 1
        return entry[2]


def encode(items: Sequence[dict[str, Any] | PortBlock], *,
           existing_chains: frozenset[str] | set[str] = frozenset(),
           first_seq: int = 1, first_set_id: int = 1, prepared: PreparedPorts | None = None) -> Batch:
    """Encode a plan's items (JSON commands and :class:`~.ruleset.PortBlock`\\ s). Command indices in
    the batch count a block as its rules, like :attr:`~.ruleset.Plan.commands`. ``existing_chains``:
    chains the table already has (an ``add chain`` of one of them allocates no handle, which
    :meth:`Batch.handles` must know). ``prepared``: port rules encoded ahead."""
    enc = _Encoder(first_seq, first_set_id)
    ready = prepared.bodies if prepared else (lambda _block: None)
    rule, command, block = enc._rule, enc.command, enc.port_block
    i = 0
    for item in items:
        if type(item) is PortBlock:
            i = block(i, item, ready(item))
            continue
        cmd = cast(dict[str, Any], item)
        # the hot path (thousands of rule adds per batch) checks just enough to know it is one
        obj = cmd.get("add")
        if obj is not None and len(cmd) == 1 and type(obj) is dict and len(obj) == 1:
            body = obj.get("rule")
            if type(body) is dict and body.keys() == _RULE_KEYS and body["family"] == "inet":
                rule(i, True, body)
                i += 1
                continue
        command(i, cmd, existing_chains)
        i += 1
    return enc.batch
