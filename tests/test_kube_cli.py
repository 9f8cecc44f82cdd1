"""`ls`, `env`, shell completion and kubeconfig handling (merged KUBECONFIG, sudo, a missing
client), against kmock's emulator, through the real command line."""
from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from kube_env import Api, api, running_pod  # noqa: F401 - `api` is a fixture
from mirrord_tun.kube.commands import dotenv

NOBODY = pwd.getpwnam("nobody")
SUDO_NOBODY = {"SUDO_UID": str(NOBODY.pw_uid), "SUDO_GID": str(NOBODY.pw_gid), "SUDO_USER": "nobody"}
TARGETS = ["pod/db-0", "pod/web", "deploy/web", "statefulset/db"]  # seed(): web-old unready, starting pending


def cli(api: Api, *args: str, env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """mirrord-ns ARGS in the API's namespace, with exactly this environment (plus PATH)."""
    base = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    return subprocess.run(["ip", "netns", "exec", api.netns, *prefix, sys.executable, "-m", "mirrord_tun", *args],
                          env=dict(base, **(env or {})), capture_output=True, text=True, timeout=90)


def one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    for word in words:
        assert word in r.stderr, r.stderr


def write_yaml(path: Path, doc: dict[str, Any]) -> str:
    path.write_text(json.dumps(doc))  # JSON is YAML
    return str(path)


# --- ls
def test_ls_lists_what_target_accepts(api: Api) -> None:
    r = api.cli("ls")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == TARGETS


def test_ls_json_for_scripts(api: Api) -> None:
    r = api.cli("ls", "-o", "json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert [t["target"] for t in got] == TARGETS
    web = next(t for t in got if t["target"] == "pod/web")
    assert web == {"target": "pod/web", "namespace": "default", "kind": "pod", "name": "web",
                   "containers": ["app", "sidecar"]}
    assert next(t for t in got if t["target"] == "deploy/web")["kind"] == "deployment"


def test_ls_every_namespace(api: Api) -> None:
    pod = running_pod("api", "9" * 64, {"app": "api"}, [{"name": "api", "image": "api:1"}])
    pod["metadata"]["namespace"] = "prod"
    api.emu.run(lambda: api.emu.put("v1/pods", pod))
    r = api.cli("ls", "-A")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert rows == [["default", t] for t in TARGETS] + [["prod", "pod/api"]]
    assert api.cli("ls", "-n", "prod").stdout.splitlines() == ["pod/api"]
    got = json.loads(api.cli("ls", "-A", "-o", "json").stdout)
    assert {(t["namespace"], t["target"]) for t in got} >= {("prod", "pod/api"), ("default", "pod/web")}
    one_line_error(api.cli("ls", "-A", "-n", "prod"), "-A")


def test_ls_errors_are_one_line(api: Api, tmp_path: Path) -> None:
    api.emu.run(lambda: api.emu.forbid("list", "v1/pods", 'pods is forbidden: User "dev" cannot list pods'))
    one_line_error(api.cli("ls"), "forbidden", "deploy/rbac.yaml")
    # Nothing listens there: no urllib3 "Retrying" lines, one line of ours.
    dead = write_yaml(tmp_path / "dead", {
        "current-context": "x", "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}],
        "clusters": [{"name": "x", "cluster": {"server": "http://127.0.0.1:9"}}], "users": [{"name": "x", "user": {}}]})
    one_line_error(cli(api, "ls", "--kubeconfig", dead), "cannot reach the API server")
    one_line_error(cli(api, "ls", "--kubeconfig", str(tmp_path / "absent")), "no kubeconfig at")
    one_line_error(cli(api, "ls", "--kubeconfig", api.kubeconfig, "--context", "nope"), "no context 'nope'")


def test_ls_without_list_on_workloads_still_lists_pods(api: Api) -> None:
    # deploy/rbac.yaml grants only "get" on deployments and statefulsets.
    for plural in ("apps/v1/deployments", "apps/v1/statefulsets"):
        api.emu.run(lambda p=plural: api.emu.forbid("list", p, "forbidden"))
    r = api.cli("ls")
    assert r.returncode == 0 and r.stdout.splitlines() == ["pod/db-0", "pod/web"], r.stderr
    assert "forbidden" in r.stderr


# --- env
TRICKY = {"PLAIN": "v1.2:x", "EMPTY": "", "SPACES": "a b  c", "DOLLAR": "$HOME ${HOME} $(id) `id`",
          "QUOTES": "it's \"quoted\"", "BACKSLASH": "C:\\new\\table \\\\ \\'", "LINES": "one\ntwo\n\nthree\n",
          "MIXED": "x'$y\n\"z\\`", "HASH": "#not a comment", "UNICODE": "naïve ☃", "TILDE": "~root"}


def sourced(text: str, tmp_path: Path) -> dict[str, str]:
    """What sh makes of the file with `set -a; . FILE`: the reference for shell quoting."""
    path = tmp_path / "sourced.env"
    path.write_text(text)
    out = subprocess.run(["sh", "-c", 'set -a; . "$1"; exec env -0', "sh", str(path)], env={},
                         capture_output=True, check=True).stdout.decode()
    pairs = (item.partition("=") for item in out.split("\0") if item)
    return {k: v for k, _, v in pairs if k in TRICKY or k.startswith(("CFG_", "FROM_")) or k in {"LITERAL", "EXPANDED",
                                                                                                 "POD_NAME"}}


def test_dotenv_quoting_round_trips_through_sh(tmp_path: Path) -> None:
    assert sourced(dotenv(TRICKY), tmp_path) == TRICKY


def test_env_writes_the_targets_environment(api: Api, tmp_path: Path) -> None:
    r = api.cli("env", "-t", "pod/web")
    assert r.returncode == 0, r.stderr
    expected = {"CFG_mode": "fast", "CFG_KEY": "value", "LITERAL": "hello", "EXPANDED": "hello-world $(LITERAL)",
                "FROM_CM": "fast", "FROM_SECRET": "s3cret", "POD_NAME": "web"}
    assert sourced(r.stdout, tmp_path) == expected
    out = tmp_path / "web.env"
    out.write_text("old, world-readable")
    out.chmod(0o644)
    r = api.cli("env", "--target", "deploy/web", "--env-exclude", "FROM_SECRET", "-o", str(out))
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sourced(out.read_text(), tmp_path) == {k: v for k, v in expected.items() if k != "FROM_SECRET"}


def test_env_quotes_what_the_pod_sets(api: Api, tmp_path: Path) -> None:
    pod = running_pod("tricky", "8" * 64, {"app": "tricky"}, [{"name": "c", "image": "c:1", "env": [
        {"name": k, "value": v.replace("$", "$$")} for k, v in TRICKY.items()]}])  # $$: Kubernetes' own escape
    api.emu.run(lambda: api.emu.put("v1/pods", pod))
    r = api.cli("env", "-t", "pod/tricky")
    assert r.returncode == 0, r.stderr
    assert sourced(r.stdout, tmp_path) == TRICKY


def test_env_errors_are_one_line(api: Api) -> None:
    one_line_error(api.cli("env", "-t", "pod/ghost"), "pod/ghost in namespace default not found")
    one_line_error(api.cli("env", "-t", "svc/web"), "bad target")
    one_line_error(api.cli("env"), "--target")


# --- completion
def complete(api: Api, words: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash completion would offer for the last word of `words`."""
    parts = words.split(" ")
    r = cli(api, env=dict(env or {}, _MIRRORD_NS_COMPLETE="bash_complete", COMP_WORDS=words,
                          COMP_CWORD=str(len(parts) - 1)))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return [line.partition(",")[2] for line in r.stdout.splitlines() if line]


def test_completion(api: Api) -> None:
    k = f"--kubeconfig {api.kubeconfig}"
    assert complete(api, f"mirrord-ns env {k} -t ") == TARGETS
    assert complete(api, f"mirrord-ns env {k} -t pod/w") == ["pod/web"]
    assert complete(api, f"mirrord-ns env {k} -t sts/") == ["sts/db"]
    assert complete(api, f"mirrord-ns ls {k} --context ") == ["emu", "other"]
    # kmock cannot serve GET /api/v1/namespaces (its path parser fails, HTTP 500): that
    # completion is only seen to offer nothing when the API fails.
    assert complete(api, f"mirrord-ns ls {k} -n p") == []
    # --context other is namespace prod, which holds nothing.
    assert complete(api, f"mirrord-ns env {k} --context other -t ") == []


def test_completion_offers_nothing_rather_than_fail(api: Api, tmp_path: Path) -> None:
    assert complete(api, f"mirrord-ns env --kubeconfig {tmp_path / 'absent'} -t ") == []
    api.emu.run(lambda: api.emu.forbid("list", "v1/pods", "forbidden"))
    assert complete(api, f"mirrord-ns env --kubeconfig {api.kubeconfig} -t ") == []


# --- kubeconfig as kubectl reads it
def test_kubeconfig_files_merge_as_kubectl_merges_them(api: Api, tmp_path: Path) -> None:
    server = json.loads(Path(api.kubeconfig).read_text())["clusters"][0]["cluster"]["server"]
    first = write_yaml(tmp_path / "first", {
        "current-context": "staging",  # named here, defined in the second file
        "contexts": [{"name": "elsewhere", "context": {"cluster": "nowhere", "user": "dev"}}],
        "clusters": [{"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}}]})
    (tmp_path / "second.d").mkdir()
    (tmp_path / "second.d" / "token").write_text("emulator\n")
    second = write_yaml(tmp_path / "second.d" / "config", {
        "current-context": "elsewhere",  # the first file's current-context wins
        "contexts": [{"name": "staging", "context": {"cluster": "emu", "user": "dev", "namespace": "default"}},
                     {"name": "elsewhere", "context": {"cluster": "emu", "user": "dev"}}],  # first wins
        "clusters": [{"name": "emu", "cluster": {"server": server}}],
        "users": [{"name": "dev", "user": {"tokenFile": "token"}}]})  # relative to its own file
    listed = f"{tmp_path / 'missing'}:{first}:{second}"  # a missing file is skipped, as kubectl does
    r = cli(api, "ls", env={"KUBECONFIG": listed})
    assert r.returncode == 0 and r.stdout.splitlines() == TARGETS, r.stderr
    assert cli(api, "ls", "--context", "staging", env={"KUBECONFIG": listed}).stdout.splitlines() == TARGETS
    one_line_error(cli(api, "ls", "--context", "elsewhere", env={"KUBECONFIG": listed}), "cannot reach")
    # --kubeconfig names one file: the first alone lacks the context it makes current.
    one_line_error(cli(api, "ls", "--kubeconfig", first), "no context 'staging'")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_inline_credentials_never_touch_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client writes inline CA, certificate and key data to temporary files that only its
    atexit removes, so a kill -9 left the user's key in /tmp: they live in memfds instead."""
    from mirrord_tun.kube import kubeconfig as kc

    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    ca, cert, key = b"-----CA-----\n", b"-----CERT-----\n", b"-----KEY-----\n"
    config = write_yaml(tmp_path / "config", {
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [{"name": "k", "cluster": {"server": "https://198.18.0.1:6443",
                                               "certificate-authority-data": b64(ca)}}],
        "users": [{"name": "u", "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}]})
    api, _ = kc.api_client(kc.load(config), None)
    c = api.configuration
    paths = [c.ssl_ca_cert, c.cert_file, c.key_file]
    assert all(p.startswith("/proc/self/fd/") for p in paths), paths
    assert [Path(p).read_bytes() for p in paths] == [ca, cert, key]
    assert not list(spool.iterdir())
    bad = write_yaml(tmp_path / "bad", {
        "current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k"}}],
        "clusters": [{"name": "k", "cluster": {"server": "https://198.18.0.1:6443",
                                               "certificate-authority-data": "not base64!"}}]})
    with pytest.raises(kc.KubeError, match="certificate-authority-data is not base64"):
        kc.api_client(kc.load(bad), None)


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A folder that the user nobody can enter and write (pytest's tmp_path is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="mrd-kube-"))
    try:
        path.chmod(0o755)
        (path / "rec").mkdir()
        os.chown(path / "rec", NOBODY.pw_uid, NOBODY.pw_gid)
        yield path
    finally:
        shutil.rmtree(path)


PLUGIN = """#!/bin/sh
{{ id -u; id -g; echo "$HOME"; echo "$PATH"; echo "$KUBERNETES_EXEC_INFO"; }} > {rec}/plugin.$$
printf '{{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
        "status": {{"token": "from-plugin-%s", "expirationTimestamp": "{expiry}"}}}}' $$
"""


def sudo_kubeconfig(api: Api, where: Path, user: dict[str, Any]) -> str:
    doc = json.loads(Path(api.kubeconfig).read_text())
    doc["users"] = [{"name": "dev", "user": user}]
    path = write_yaml(where / "kubeconfig", doc)
    os.chmod(path, 0o644)
    return path


def fake_plugin(where: Path, expiry: str) -> None:
    plugin = where / "plugin"
    plugin.write_text(PLUGIN.format(rec=where / "rec", expiry=expiry))
    plugin.chmod(0o755)


def tokens_seen(api: Api) -> list[str]:
    return api.emu.run(lambda: [r.headers.get("Authorization", "") for r in api.emu.km])


def test_under_sudo_the_credential_plugin_runs_as_the_invoking_user(api: Api, nobody_dir: Path) -> None:
    fake_plugin(nobody_dir, "2099-01-01T00:00:00Z")
    kubeconfig = sudo_kubeconfig(api, nobody_dir, {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": "./plugin", "interactiveMode": "Never",
        "provideClusterInfo": True}})  # a relative command is relative to the kubeconfig's folder
    r = cli(api, "ls", env=dict(SUDO_NOBODY, KUBECONFIG=kubeconfig, HOME="/root"))
    assert r.returncode == 0 and r.stdout.splitlines() == TARGETS, r.stderr
    [record] = list((nobody_dir / "rec").iterdir())
    uid, gid, home, path, info = record.read_text().splitlines()
    assert (int(uid), int(gid), home) == (NOBODY.pw_uid, NOBODY.pw_gid, NOBODY.pw_dir)
    assert "/usr/bin" in path.split(":") and "sbin" not in path  # a user's PATH, not sudo's secure_path
    spec = json.loads(info)["spec"]
    assert spec["interactive"] is False and spec["cluster"]["server"].startswith("http://127.0.0.1:")
    assert set(tokens_seen(api)) == {f"Bearer from-plugin-{record.name.partition('.')[2]}"}


def test_an_expired_token_is_fetched_again_as_the_user(api: Api, nobody_dir: Path) -> None:
    fake_plugin(nobody_dir, "2000-01-01T00:00:00Z")
    kubeconfig = sudo_kubeconfig(api, nobody_dir, {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": str(nobody_dir / "plugin")}})
    r = cli(api, "ls", env=dict(SUDO_NOBODY, KUBECONFIG=kubeconfig))
    assert r.returncode == 0 and r.stdout.splitlines() == TARGETS, r.stderr
    records = list((nobody_dir / "rec").iterdir())
    assert len(records) > 1  # once at start, again before each request (pods, deployments, statefulsets)
    assert {int(p.read_text().split()[0]) for p in records} == {NOBODY.pw_uid}
    seen = tokens_seen(api)
    assert len(set(seen)) == len(seen) == 3 and all(t.startswith("Bearer from-plugin-") for t in seen)


def test_under_sudo_files_are_read_with_the_users_rights(api: Api, nobody_dir: Path) -> None:
    # A kubeconfig naming a file only root may read (a confused deputy otherwise).
    kubeconfig = sudo_kubeconfig(api, nobody_dir, {"tokenFile": "/etc/shadow"})
    one_line_error(cli(api, "ls", env=dict(SUDO_NOBODY, KUBECONFIG=kubeconfig)),
                   "cannot read tokenFile /etc/shadow: Permission denied")
    assert "root:" not in cli(api, "ls", env=dict(SUDO_NOBODY, KUBECONFIG="/etc/shadow")).stderr
    one_line_error(cli(api, "ls", "--kubeconfig", "/etc/shadow", env=SUDO_NOBODY),
                   "cannot read kubeconfig /etc/shadow: Permission denied")


def test_a_plugin_that_is_missing_says_how_to_install_it(api: Api, nobody_dir: Path) -> None:
    kubeconfig = sudo_kubeconfig(api, nobody_dir, {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": "no-such-auth-plugin",
        "installHint": "install it\nwith apt"}})
    one_line_error(cli(api, "ls", env=dict(SUDO_NOBODY, KUBECONFIG=kubeconfig)),
                   "credential plugin no-such-auth-plugin not found: install it with apt")


@pytest.mark.skipif(shutil.which("sudo") is None, reason="no sudo")
def test_a_kubeconfig_dropped_by_sudo_is_named(api: Api) -> None:
    sudo = ("sudo", "-n", "-u", "root")
    r = cli(api, "ls", env={"KUBECONFIG": api.kubeconfig, "HOME": "/nonexistent"}, prefix=sudo)
    assert r.returncode == 2, r.stdout
    assert "sudo dropped KUBECONFIG=" + api.kubeconfig in r.stderr
    assert "sudo --preserve-env=KUBECONFIG" in r.stderr and "Traceback" not in r.stderr
    r = cli(api, "ls", env={"KUBECONFIG": api.kubeconfig}, prefix=(*sudo[:2], "--preserve-env=KUBECONFIG", *sudo[2:]))
    assert r.returncode == 0 and r.stdout.splitlines() == TARGETS and "dropped" not in r.stderr, r.stderr


# --- no Kubernetes client
HIDE_CLIENT = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("kubernetes", "yaml"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
sys.argv[0] = "mirrord-ns"
from mirrord_tun.cli import main
main()
"""


@pytest.mark.parametrize("args", [["ls"], ["env", "-t", "pod/web"], ["run", "--target", "pod/web", "--dry-run"]])
def test_without_the_kubernetes_client_one_line_says_how_to_install_it(args: list[str], tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", HIDE_CLIENT, *args, "--kubeconfig", str(tmp_path / "k")],
                       capture_output=True, text=True, timeout=60)
    one_line_error(r, "Kubernetes client is not installed", "pip install")


# --- env -o under sudo: the attacker is a user allowed `sudo mirrord-ns` and nothing else
@pytest.fixture
def root_only(nobody_dir: Path) -> Iterator[Path]:
    """A root-only folder (standing in for /etc) holding a root-owned 0644 file (for /etc/ld.so.preload)."""
    path = Path(tempfile.mkdtemp(prefix="mrd-root-"))
    try:
        path.chmod(0o700)
        (path / "preload").write_text("root's\n")
        (path / "preload").chmod(0o644)
        yield path
    finally:
        shutil.rmtree(path)


def test_env_output_under_sudo_is_opened_as_the_user_through_no_path_trick(
        api: Api, nobody_dir: Path, root_only: Path) -> None:
    kubeconfig = sudo_kubeconfig(api, nobody_dir, {"token": "t"})
    mine = nobody_dir / "rec"  # the user's own folder
    (mine / "parent").symlink_to(root_only)  # a symlinked parent into the root-only folder
    (mine / "last").symlink_to(root_only / "preload")  # a symlink as the last component
    (mine / "dangling").symlink_to(root_only / "new")
    os.link(root_only / "preload", mine / "hard")  # a hard link to the root-owned file (made by root:
    # protected_hardlinks keeps the user from it, but a file system or an old link may not)
    (mine / "roots").write_text("root's own, in the user's folder\n")  # root-owned, in the user's folder
    before = (root_only / "preload").stat()

    def env_to(out: Path) -> subprocess.CompletedProcess[str]:
        return cli(api, "env", "-t", "pod/web", "-o", str(out), env=dict(SUDO_NOBODY, KUBECONFIG=kubeconfig))

    for out in (mine / "parent" / "new", mine / "parent" / "preload", mine / "last", mine / "dangling",
                mine / "hard", mine / "roots"):
        one_line_error(env_to(out), f"cannot write {out}")
    assert sorted(os.listdir(root_only)) == ["preload"]  # nothing created there
    after = (root_only / "preload").stat()
    assert (after.st_uid, after.st_mode, after.st_size, after.st_mtime_ns) == (
        before.st_uid, before.st_mode, before.st_size, before.st_mtime_ns)
    assert (root_only / "preload").read_text() == "root's\n"
    assert (mine / "roots").stat().st_uid == 0 and (mine / "roots").read_text().startswith("root's own")

    good = mine / "web.env"
    r = env_to(good)
    assert r.returncode == 0, r.stderr
    st = good.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY.pw_uid, NOBODY.pw_gid, 0o600)
    assert "FROM_SECRET=s3cret" in good.read_text()


def test_config_and_keys_under_sudo_are_read_as_the_user(api: Api, nobody_dir: Path, root_only: Path) -> None:
    secret = root_only / "secret.toml"
    secret.write_text('target = "pod/web"\n')  # valid config: root reading it would be accepted
    for args, words in ((["run", "-f", str(secret), "--", "true"], "Permission denied"),
                        (["run", "--agent", "198.18.0.1:1", "--identity", str(secret), "--agent-host-key",
                          str(secret), "--", "true"], "cannot read identity")):
        r = cli(api, *args, env=SUDO_NOBODY)
        one_line_error(r, str(secret), words)
