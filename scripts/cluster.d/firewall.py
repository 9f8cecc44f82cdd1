#!/usr/bin/env python3
"""Part of scripts/cluster: put the host's nftables ruleset back after the cluster.

kube-proxy (nftables mode) keeps its rules in tables named "kube-proxy"; the kubelet and
anything using iptables-nft add KUBE-* chains to the iptables tables. `restore` deletes
the kube-proxy tables, KUBE-*/CNI-* chains and the rules jumping to them, and an iptables
table that did not exist before `up` once nothing else is left in it. Tables that are
neither ours nor empty are named, never touched.

  firewall.py restore BEFORE-TABLES-FILE
"""
import json
import subprocess
import sys

OURS = ("KUBE-", "CNI-")
IPTABLES_TABLES = {"filter", "nat", "mangle", "raw", "security"}


def nft(*args: str) -> str:
    return subprocess.run(["nft", *args], check=True, capture_output=True, text=True).stdout


def ruleset() -> list[dict]:
    return json.loads(nft("-j", "list", "ruleset"))["nftables"]


def drop_our_rules_and_chains(items: list[dict]) -> None:
    for item in items:  # rules first: a chain with a rule jumping to it cannot go
        rule = item.get("rule")
        if rule and any(t in json.dumps(rule["expr"]) for t in OURS) and not rule["chain"].startswith(OURS):
            nft("delete", "rule", rule["family"], rule["table"], rule["chain"], "handle", str(rule["handle"]))
    chains = [i["chain"] for i in items if "chain" in i and i["chain"]["name"].startswith(OURS)]
    for chain in chains:
        nft("flush", "chain", chain["family"], chain["table"], chain["name"])
    for chain in chains:
        nft("delete", "chain", chain["family"], chain["table"], chain["name"])


def restore(before_file: str) -> None:
    with open(before_file) as f:
        before = {tuple(line.split()[1:3]) for line in f if line.startswith("table ")}
    items = ruleset()
    for t in [i["table"] for i in items if "table" in i]:
        if t["name"] == "kube-proxy":
            nft("delete", "table", t["family"], t["name"])
    items = ruleset()
    drop_our_rules_and_chains(items)
    for item in ruleset():
        t = item.get("table")
        if not t or (t["family"], t["name"]) in before:
            continue
        has_rules = any("rule" in i and i["rule"]["table"] == t["name"] and i["rule"]["family"] == t["family"]
                        for i in ruleset())
        if t["name"] in IPTABLES_TABLES and not has_rules:
            nft("delete", "table", t["family"], t["name"])
        else:
            print(f"scripts/cluster: nft table {t['family']} {t['name']} appeared meanwhile, not ours: left",
                  file=sys.stderr)


if __name__ == "__main__" and sys.argv[1:2] == ["restore"]:
    restore(sys.argv[2])
