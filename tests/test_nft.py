"""netns/nft.py: the same behaviour through libnftables and through the `nft` CLI fallback.

Every check runs in throwaway anonymous namespaces (they vanish with their fd) and is
verified from outside with `nsenter ... nft`, never through the module under test. The
hazard of the in-process library is the namespace: its netlink socket belongs to the thread
and namespace that made it, so one kept across calls would configure the wrong namespace.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import os
import secrets
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from mirrord_tun.netns import nft
from mirrord_tun.netns.namespace import CLONE_NEWNET, NetNs, setns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nft)")


@pytest.fixture(params=["library", "cli"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "cli":
        monkeypatch.setattr(nft, "_lib", None)
    elif nft._lib is None:
        pytest.skip("libnftables.so.1 is not installed (test_library_found_when_installed checks it is used if it is)")
    return request.param


@pytest.fixture
def two_ns() -> Iterator[tuple[NetNs, NetNs]]:
    a = NetNs.new()
    try:
        b = NetNs.new()
        try:
            yield a, b
        finally:
            b.close()
    finally:
        a.close()


def _name() -> str:
    return f"mrdtest_{secrets.token_hex(4)}"


def tables_seen_from_outside(ns: NetNs | None) -> set[str]:
    """Table names in `ns` (None: the test's own namespace), listed by the nft binary."""
    prefix = ["nsenter", f"--net=/proc/{os.getpid()}/fd/{ns.fd}"] if ns else []
    out = subprocess.run([*prefix, "nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.startswith("table ")}


def test_library_found_when_installed() -> None:
    try:
        ctypes.CDLL("libnftables.so.1")
    except OSError:
        pytest.skip("libnftables.so.1 is not installed")
    assert nft._lib is not None


def test_without_the_library_the_cli_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert nft._load() is None


def test_run_tables_delete_in_the_calling_namespace(backend: str, two_ns: tuple[NetNs, NetNs]) -> None:
    a, b = two_ns
    name = _name()
    a.call(nft.run, f'table ip {name} {{\n  comment "session 1"\n  chain c {{ type filter hook forward priority 0; }}\n}}\n')
    assert tables_seen_from_outside(a) == {name}
    assert a.call(nft.tables, "ip", "mrdtest_") == {name: "session 1"}
    assert a.call(nft.tables, "inet", "mrdtest_") == {}
    # The namespace that asked, and only it.
    assert b.call(nft.tables, "ip", "mrdtest_") == {}
    assert name not in tables_seen_from_outside(b) | tables_seen_from_outside(None)
    a.call(nft.delete_table, "ip", name)
    a.call(nft.delete_table, "ip", name)  # idempotent: gone already
    assert tables_seen_from_outside(a) == set()


def test_failed_script_raises_with_nfts_message_and_applies_nothing(backend: str, two_ns: tuple[NetNs, NetNs]) -> None:
    a, _ = two_ns
    name = _name()
    with pytest.raises(nft.NftError) as e:
        a.call(nft.run, f"add table ip {name}\nadd rule ip {name} no_such_chain accept\n")
    assert "Error:" in str(e.value) and "no_such_chain" in str(e.value)
    assert tables_seen_from_outside(a) == set()  # one transaction: the table went too
    with pytest.raises(nft.NftError, match="syntax error"):
        a.call(nft.run, "this is not nft\n")
    with pytest.raises(nft.NftError, match="Error:"):
        a.call(nft.tables, "no_such_family", "x")


def test_missing_library_and_binary_is_one_nft_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(nft, "_lib", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(nft.NftError, match="install Debian's nftables"):
        nft.run("list tables\n")


def test_two_namespaces_at_once_do_not_mix(backend: str, two_ns: tuple[NetNs, NetNs]) -> None:
    mine = {ns: f"{_name()}_{i}" for i, ns in enumerate(two_ns)}

    def churn(ns: NetNs) -> set[str]:
        seen: set[str] = set()
        for i in range(25 if backend == "library" else 5):
            ns.call(nft.run, f"add table ip {mine[ns]}_{i}\n")
            seen |= set(ns.call(nft.tables, "ip", "mrdtest_"))
            ns.call(nft.delete_table, "ip", f"{mine[ns]}_{i}")
        return seen

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        seen = dict(zip(two_ns, pool.map(churn, two_ns)))
    for ns, names in seen.items():
        assert names and all(n.startswith(mine[ns]) for n in names), names
        assert tables_seen_from_outside(ns) == set()


def test_one_thread_moving_between_namespaces_follows_them(backend: str, two_ns: tuple[NetNs, NetNs]) -> None:
    """A thread that setns()es between calls: nothing of the first namespace may be reused."""
    names = [_name() for _ in two_ns]
    errors: list[BaseException] = []

    def hop() -> None:  # a throwaway thread: its namespace changes
        try:
            for ns, name in zip(two_ns, names):
                setns(ns.fd, CLONE_NEWNET)
                nft.run(f"add table ip {name}\n")
        except BaseException as e:  # noqa: BLE001 (re-raised in the test's thread)
            errors.append(e)

    t = threading.Thread(target=hop)
    t.start()
    t.join(60)
    assert not t.is_alive() and not errors, errors
    assert [tables_seen_from_outside(ns) for ns in two_ns] == [{n} for n in names]
