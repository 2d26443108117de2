"""Dropping is an operator's action. A real agent with disk and S3 tiers: an ordinary
client (another uid, in the agent's group, as vLLM runs) is refused drops and every
``kvnode cache`` request; the agent's own user may list, show, drop and clear, and a
drop never deletes the fleet's S3 object."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvnode.agent.admin import Operators, peer_credentials
from kvnode.agent.config import load_config
from kvnode.ipc import protocol as P
from kvnode.ipc.client import AgentClient
from tests.conftest import KVNODE, AgentProcess
from tests.tiers.conftest import S3Endpoint

NOBODY = 65534
KEYS = [bytes([i]) * 16 for i in range(1, 5)]


def _wait(cond: Callable[[], bool], timeout_s: float = 15.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.05)


def as_nobody(fn: Callable[[], Any], groups: tuple[int, ...] = ()) -> Any:
    """Run ``fn`` in a forked child as uid/gid nobody (plus ``groups``); its result comes
    back as JSON. Forked, not exec'd: the interpreter may live where nobody cannot
    read it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = json.dumps(fn())
        except BaseException as exc:  # noqa: BLE001 (reported to the parent)
            out, code = json.dumps({"error": repr(exc)}), 1
        os.write(w, out.encode())
        os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A runtime directory nobody can reach (pytest's own tmp is owner-only)."""
    d = Path(tempfile.mkdtemp(prefix="kvnode-admin-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


def _ordinary_client_tries(runtime: Path) -> dict[str, Any]:
    c = AgentClient(runtime, name="vllm-like", timeout_s=3.0, heartbeat=False)
    out: dict[str, Any] = {}
    try:
        for name, call in (
            ("drop", lambda: c.drop([KEYS[0]])),
            ("list", lambda: c.admin(int(P.AdminOp.LIST), limit=5)),
            ("clear", lambda: c.admin(int(P.AdminOp.CLEAR), tier="disk")),
        ):
            try:
                call()
                out[name] = "allowed"
            except Exception as exc:
                out[name] = getattr(exc, "code", repr(exc))
        out["lookup"] = [int(s) for s in c.lookup(KEYS[:1], promote=False)]
    finally:
        c.close()
    return out


@needs_root
def test_ordinary_clients_cannot_drop_operators_can(shared_dir: Path) -> None:
    s3 = S3Endpoint()
    s3.start()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    bucket = s3.new_bucket()
    run, disk = shared_dir / "run", shared_dir / "disk"
    sets = [f"agent.group={NOBODY}", f"disk.path={disk}", "disk.write_policy=write_through",
            f"s3.bucket={bucket}", f"s3.endpoint_url={s3.url}", "s3.region=us-east-1",
            "s3.write_policy=write_through"]  # fmt: skip
    agent = AgentProcess(run, args=[x for s in sets for x in ("--set", s)]).start()
    admin = AgentClient(run, name="operator", timeout_s=3.0)
    try:
        for k in KEYS:
            assert admin.put(k, os.urandom(8192)) == P.Status.OK
        tiers = lambda: admin.stats()["tiers"]  # noqa: E731
        _wait(lambda: tiers()["disk"]["entries"] == 4 and tiers()["s3"]["entries"] == 4)
        got = as_nobody(lambda: _ordinary_client_tries(run))
        denied = int(P.ErrCode.NOT_PERMITTED)
        assert got == {"drop": denied, "list": denied, "clear": denied, "lookup": [1]}, got
        assert admin.stats()["counters"]["refused_admin"] == 3
        assert tiers()["disk"]["entries"] == 4

        # The operator's tool: list, show, drop (arena and disk, never S3), clear.
        base = [*KVNODE, "cache"]

        def tool(*args: str) -> Any:  # noqa: E306
            r = subprocess.run([*base, *args, "--runtime-dir", str(run), "--json"],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        listing = tool("list", "--limit", "10")
        assert listing["tiers"]["arena"]["committed"] == 4
        assert {e["key"] for e in listing["arena"]} == {k.hex() for k in KEYS}
        assert all(e["verified"] and e["age_s"] >= 0 for e in listing["arena"])
        assert len(listing["disk"]) == 4
        shown = tool("show", KEYS[0].hex())["keys"][0]
        assert set(shown) >= {"arena", "disk", "s3"} and shown["arena"]["size"] == 8192
        assert tool("drop", KEYS[0].hex())["dropped"] == 1
        assert admin.lookup(KEYS[:1], promote=False) == [P.Lookup.MISS]
        _wait(lambda: tiers()["disk"]["entries"] == 3)
        prefix = load_config(env={}).s3.prefix
        objects = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0)
        assert objects == 4  # the fleet's copy stays
        assert tool("clear", "arena", "--yes")["dropped"] == 3
        assert tool("clear", "disk", "--yes")["dropped"] == 3
        _wait(lambda: tiers()["disk"]["entries"] == 0)
        r = subprocess.run([*base, "clear", "disk", "--runtime-dir", str(run)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 2 and "--yes" in r.stderr
    finally:
        admin.close()
        agent.stop()
        s3.stop()


@needs_root
def test_admin_group_members_are_operators(shared_dir: Path) -> None:
    run = shared_dir / "run"
    agent = AgentProcess(run, args=["--set", f"agent.group={NOBODY}",
                                    "--set", "agent.admin_group=4242"]).start()  # fmt: skip
    admin = AgentClient(run, name="operator", timeout_s=3.0)
    try:
        assert admin.put(KEYS[0], os.urandom(4096)) == P.Status.OK
        plain = as_nobody(lambda: _ordinary_client_tries(run))
        assert plain["drop"] == int(P.ErrCode.NOT_PERMITTED)
        member = as_nobody(lambda: _ordinary_client_tries(run), groups=(4242,))
        assert member["drop"] == "allowed" and member["lookup"] == [0]
    finally:
        admin.close()
        agent.stop()


def test_peer_credentials_are_the_kernels() -> None:
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        got = peer_credentials(a.fileno())
        assert got == (os.getpid(), os.geteuid(), os.getegid())
        a.send(b"x")  # the fd is still open and usable: it was not closed
        assert b.recv(1) == b"x"
    finally:
        a.close()
        b.close()
    assert peer_credentials(-1) is None


def test_operator_rules() -> None:
    cfg = load_config(env={}, overrides={"agent.admin_group": "4242"})

    class C:
        fd = 3

    def ops(uid: int, gid: int) -> bool:
        return Operators(cfg, lambda fd: (999999, uid, gid)).allowed(C())  # type: ignore[arg-type]

    assert ops(os.geteuid(), 1) and ops(0, 1)
    assert ops(NOBODY, 4242)  # primary group
    assert not ops(NOBODY, NOBODY)
    assert not Operators(cfg, lambda fd: None).allowed(C())  # type: ignore[arg-type]


def test_drop_a_namespace(tmp_path: Path) -> None:
    from kvnode.ipc.checksum import checksum

    agent = AgentProcess(tmp_path / "run").start()
    c = AgentClient(agent.runtime_dir, name="tenant-writer", timeout_s=3.0)
    ns_a, ns_b = b"A" * 16, b"B" * 16
    try:
        for ns, keys in ((ns_a, KEYS[:3]), (ns_b, KEYS[3:])):
            for key in keys:
                data = os.urandom(4096)
                ((st, slot),) = c.reserve([key], [len(data)], namespace=ns)
                assert st == P.Status.OK and slot is not None
                c.write(slot, data)
                assert c.commit([key], [checksum(data)]) == [P.Status.OK]
        r = subprocess.run([*KVNODE, "cache", "list", "--runtime-dir", str(agent.runtime_dir), "--json"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        spaces = json.loads(r.stdout)["namespaces"]
        assert spaces[ns_a.hex()]["entries"] == 3 and spaces[ns_b.hex()]["entries"] == 1
        # The same in a terminal: totals, namespaces, entries; one key in every tier.
        run = ["--runtime-dir", str(agent.runtime_dir)]
        text = subprocess.run([*KVNODE, "cache", "list", *run], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert text.returncode == 0, text.stderr
        assert ns_a.hex() in text.stdout and KEYS[0].hex() in text.stdout
        shown = subprocess.run([*KVNODE, "cache", "show", KEYS[0].hex(), *run],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert shown.returncode == 0 and "arena: committed" in shown.stdout, shown.stderr
        bad = subprocess.run([*KVNODE, "cache", "show", "xyz", *run], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert bad.returncode == 2 and "32 hex digits" in bad.stderr
        r = subprocess.run([*KVNODE, "cache", "drop", "--namespace", ns_a.hex(),
                            "--runtime-dir", str(agent.runtime_dir)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0 and "dropped 3 entries" in r.stdout, r.stderr
        got = c.lookup(KEYS, promote=False)
        assert got == [P.Lookup.MISS] * 3 + [P.Lookup.HIT]
    finally:
        c.close()
        agent.stop()


@needs_root
def test_an_ordinary_client_drops_only_an_entry_that_fails_its_checksum(shared_dir: Path) -> None:
    """A worker whose copy of an entry failed its checksum asks for it to be dropped
    (the connector does). The agent checks the arena bytes itself: a corrupt arena copy
    is dropped (the disk's copy stays and is served again), an intact one is refused
    as any drop from an ordinary client is."""
    run, disk = shared_dir / "run", shared_dir / "disk"
    sets = [f"agent.group={NOBODY}", f"disk.path={disk}", "disk.write_policy=write_through"]
    agent = AgentProcess(run, args=[x for s in sets for x in ("--set", s)]).start()
    admin = AgentClient(run, name="operator", timeout_s=3.0)
    try:
        data = {k: os.urandom(8192) for k in KEYS[:2]}
        for k, v in data.items():
            assert admin.put(k, v) == P.Status.OK
        tiers = lambda: admin.stats()["tiers"]  # noqa: E731
        _wait(lambda: tiers()["disk"]["entries"] == 2)
        [(_, slot)] = admin.pin(KEYS[:1])
        admin.views(slot)[0][5] ^= 0xFF  # a stray write into the arena copy of KEYS[0]
        admin.release(KEYS[:1])

        def drops() -> dict[str, Any]:
            c = AgentClient(run, name="vllm-like", timeout_s=3.0, heartbeat=False)
            out: dict[str, Any] = {}
            try:
                for name, key in (("intact", KEYS[1]), ("corrupt", KEYS[0])):
                    try:
                        c.drop([key])
                        out[name] = "dropped"
                    except Exception as exc:
                        out[name] = getattr(exc, "code", repr(exc))
            finally:
                c.close()
            return out

        got = as_nobody(drops)
        assert got == {"intact": int(P.ErrCode.NOT_PERMITTED), "corrupt": "dropped"}, got
        assert admin.lookup(KEYS[:2], promote=False) == [P.Lookup.MISS, P.Lookup.HIT]
        assert admin.stats()["counters"]["corrupt_dropped"] == 1
        assert tiers()["disk"]["entries"] == 2  # the disk's copy of KEYS[0] stays
        _wait(lambda: admin.lookup(KEYS[:1]) == [P.Lookup.HIT])  # promoted from disk
        assert admin.get(KEYS[0]) == data[KEYS[0]]
    finally:
        admin.close()
        agent.stop()
