"""`run --target` mounts the target container's volumes from its pod spec, end to end.

The emulator holds a pod whose container mounts a ConfigMap, a Secret, the projected
service-account token and a downward-API volume, as well as an emptyDir, a subPath file and
a ConfigMap over a directory this machine has (/etc/ssl/certs). The stand-in container is a
process chrooted into a root laid out as the kubelet would (each volume's keys as links
through `..data` to a timestamped directory); the fake kubelet starts the real agent with the
pod's own args, which finds that process by its container ID.
"""
from __future__ import annotations

import contextlib
import glob
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_until
from kube_env import KubeCluster, kube_cluster, running_pod  # noqa: F401 - `kube_cluster` is a fixture
from mirrord_tun.sandbox import ADDRS

CONFIG, SECRET, PODINFO = "/etc/app-config", "/etc/app-secret", "/etc/podinfo"
SA = "/var/run/secrets/kubernetes.io/serviceaccount"
CERTS = "/etc/ssl/certs"  # where a CA-bundle ConfigMap often goes; on this machine a full directory
DATA, SUBPATH = "/data", "/etc/app.yaml"
VOLUMES = (CONFIG, SECRET, PODINFO, SA)  # what `run` mounts by default
TOKEN = "eyJhbGciOiJSUzI1NiJ9.the-pods-token.sig"
# The host paths the command's namespace mounts on or shadows (a tmpfs over /etc and /run).
WATCHED = ("/etc", "/run", "/var/run", "/run/secrets", *VOLUMES, CERTS)


def kubelet_volume(root: Path, path: str, files: dict[str, str]) -> None:
    """`files` at `path` as the kubelet writes a ConfigMap, Secret, projected or downward-API volume:
    in a timestamped directory that `..data` names, each key a link through `..data`."""
    where = root / path.lstrip("/")
    stamp = where / "..2026_01_01_00_00_00.000000001"
    stamp.mkdir(parents=True)
    for name, text in files.items():
        (stamp / name).write_text(text)
        (stamp / name).chmod(0o644)  # defaultMode 420
        (where / name).symlink_to(f"..data/{name}")
    (where / "..data").symlink_to(stamp.name)


def container_files(root: Path) -> None:
    (root / "etc").mkdir()
    (root / "etc" / "resolv.conf").write_text(f"nameserver {ADDRS['dns']}\n")
    kubelet_volume(root, CONFIG, {"greeting": "hello from the pod's ConfigMap\n", "mode": "fast\n"})
    kubelet_volume(root, SECRET, {"password": "pod-secret-password\n"})
    kubelet_volume(root, CONFIG + "/tls", {"tls.key": "the pod's key\n"})  # a Secret inside the ConfigMap's
    kubelet_volume(root, PODINFO, {"labels": 'app="files"\n'})
    kubelet_volume(root, SA, {"ca.crt": "-----BEGIN CERTIFICATE-----\n", "namespace": "default", "token": TOKEN})
    kubelet_volume(root, CERTS, {"container-ca.crt": "the container's CA\n"})
    (root / "data").mkdir()
    (root / "data" / "db").write_text("the pod's emptyDir\n")
    (root / "etc" / "app.yaml").write_text("a subPath file\n")


def volume_pod(container_id: str) -> dict[str, Any]:
    app = {"name": "app", "image": "files:1", "volumeMounts": [
        {"name": "config", "mountPath": CONFIG},
        {"name": "secret", "mountPath": SECRET, "readOnly": True},
        {"name": "secret", "mountPath": CONFIG + "/tls", "readOnly": True},  # nested: the outer one shows it
        {"name": "podinfo", "mountPath": PODINFO},
        {"name": "kube-api-access-x7k2p", "mountPath": SA, "readOnly": True},
        {"name": "ca-bundle", "mountPath": CERTS},
        {"name": "data", "mountPath": DATA},
        {"name": "config", "mountPath": SUBPATH, "subPath": "app.yaml"},
    ]}
    pod = running_pod("files", container_id, {"app": "files"}, [app])
    pod["spec"]["volumes"] = [
        {"name": "config", "configMap": {"name": "files-config"}},
        {"name": "secret", "secret": {"secretName": "files-secret", "defaultMode": 420}},
        {"name": "podinfo", "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
        {"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}},
        {"name": "ca-bundle", "configMap": {"name": "ca-bundle"}},
        {"name": "data", "emptyDir": {}},
    ]
    return pod


# The stand-in container chrooted into container_files's root (kube_env's kube_cluster).
kubelet_volumes = pytest.mark.parametrize("kube_cluster", [container_files], indirect=True, ids=["kubelet-volumes"])


@pytest.fixture
def k(kube_cluster: KubeCluster) -> KubeCluster:
    for path in (CONFIG, SECRET, PODINFO, "/run/secrets", DATA, SUBPATH):
        assert not os.path.lexists(path), f"{path} exists on this machine: the test would not show the pod's"
    if not os.path.isdir(CERTS) or not os.listdir(CERTS):
        pytest.skip(f"{CERTS} is no full directory here: nothing for a volume to cover")
    kube_cluster.emu.run(lambda: kube_cluster.emu.put("v1/pods", volume_pod(kube_cluster.container_id)))
    return kube_cluster


def host_mounts() -> list[str]:
    """The host's mount table (this test's own namespace) where the command's namespace mounts or
    shadows, and any FUSE mount."""
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if line.split()[4] in WATCHED or "fuse" in line]


def mounts_anywhere() -> list[str]:
    """This test's sshfs mounts as any process anywhere still sees them."""
    labels = tuple(f"mirrord-ns:{path} " for path in VOLUMES)
    found = []
    for info in glob.glob("/proc/[0-9]*/mountinfo"):
        with contextlib.suppress(OSError), open(info) as f:
            found += [line for line in f if any(label in line for label in labels)]
    return found


def show(k: KubeCluster, *options: str, script: str) -> tuple[list[str], str]:
    r = k.run("--target", "pod/files", "--agent-address", k.agent_address, *options, "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines(), r.stderr


def absent(*paths: str) -> str:
    return "; ".join(f"test -e {p} || echo NO {p}" for p in paths)


@kubelet_volumes
def test_run_target_mounts_the_containers_volumes_from_its_pod_spec(k: KubeCluster) -> None:
    before = host_mounts()
    lines, err = show(k, script=(
        f"cat {CONFIG}/greeting {CONFIG}/tls/tls.key {SECRET}/password {PODINFO}/labels; "
        f"ls {SA}; cat {SA}/token; echo; "
        f"ls {CERTS} | grep -qx container-ca.crt || echo LOCAL-CERTS; ls {CERTS} | grep -c .; "
        f"{absent(DATA, SUBPATH)}; test -e /etc/os-release && echo LOCAL-ETC"))
    assert lines == ["hello from the pod's ConfigMap", "the pod's key", "pod-secret-password", 'app="files"',
                     "ca.crt", "namespace", "token", TOKEN,
                     "LOCAL-CERTS", str(len([n for n in os.listdir(CERTS) if not n.startswith(".")])),  # all ours
                     f"NO {DATA}", f"NO {SUBPATH}", "LOCAL-ETC"], err
    assert f"not mounting the target's volumes at {CERTS} (/etc/ssl is read by programs here)" in err
    assert "Traceback" not in err
    # Nothing of it stays: not in the host's mount table, not in any namespace, not on the disk.
    assert host_mounts() == before
    assert wait_until(lambda: not mounts_anywhere(), 10), mounts_anywhere()
    for path in (CONFIG, SECRET, PODINFO, "/run/secrets"):
        assert not os.path.lexists(path)
    assert "container-ca.crt" not in os.listdir(CERTS)


@kubelet_volumes
def test_no_mount_leaves_the_volumes_out_and_mount_still_adds_paths(k: KubeCluster) -> None:
    lines, err = show(k, "--no-mount", "--mount", SECRET, script=(
        f"cat {SECRET}/password; {absent(CONFIG, PODINFO, SA)}; "
        f"ls {CERTS} | grep -qx container-ca.crt || echo LOCAL-CERTS"))
    assert lines == ["pod-secret-password", f"NO {CONFIG}", f"NO {PODINFO}", f"NO {SA}", "LOCAL-CERTS"], err
    assert "not mounting" not in err  # --no-mount: the volumes are not even considered
    assert wait_until(lambda: not mounts_anywhere(), 10), mounts_anywhere()


def _site_dir() -> str:
    """The first site directory of this machine's Python that exists: where a .pth or a
    `usercustomize` package runs in every start of it."""
    r = subprocess.run(["/usr/bin/python3", "-c", "import site; print(*site.getsitepackages(), sep=chr(10))"],
                       capture_output=True, text=True, check=True)
    return next(d for d in r.stdout.splitlines() if os.path.isdir(d))


SITE_HOOK = f"{_site_dir()}/usercustomize"  # missing here, under a directory that exists: mountable before
VENV_HOOK = f"{sys.prefix}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages/sitecustomize"
GO_CA_DIR = "/etc/pki/tls/certs"  # every .crt in it is a CA Go's TLS trusts, where it exists
DOTDOT = "/opt/nothing-here/../mrd-dotdot"  # fine as normalized; a path so could cover what exists


def hostile_files(root: Path) -> None:
    container_files(root)
    kubelet_volume(root, SITE_HOOK, {"__init__.py": "print('PWNED by the pod spec')\n"})
    kubelet_volume(root, GO_CA_DIR, {"attacker.crt": "-----BEGIN CERTIFICATE-----\n"})
    kubelet_volume(root, VENV_HOOK, {"__init__.py": "print('PWNED by the pod spec, in the venv')\n"})
    kubelet_volume(root, os.path.normpath(DOTDOT), {"x": "y\n"})


@pytest.mark.parametrize("kube_cluster", [hostile_files], indirect=True, ids=["hostile-volumes"])
def test_a_pod_spec_cannot_plant_code_or_settings_for_this_machines_programs(kube_cluster: KubeCluster) -> None:
    """The pod spec's author mounts ConfigMaps where this machine's Python imports a package at
    every start and where Go reads CAs: the command must see neither, and the pod's ordinary
    volume still comes."""
    for path in (SITE_HOOK, VENV_HOOK, "/etc/pki", os.path.normpath(DOTDOT)):
        assert not os.path.lexists(path), f"{path} exists on this machine: the test would not show the pod's"
    pod = volume_pod(kube_cluster.container_id)
    pod["spec"]["containers"][0]["volumeMounts"] += [{"name": "hook", "mountPath": SITE_HOOK},
                                                     {"name": "ca", "mountPath": GO_CA_DIR},
                                                     {"name": "hook", "mountPath": VENV_HOOK},
                                                     {"name": "hook", "mountPath": DOTDOT}]
    pod["spec"]["volumes"] += [{"name": "hook", "configMap": {"name": "hook"}},
                               {"name": "ca", "secret": {"secretName": "ca"}}]
    kube_cluster.emu.run(lambda: kube_cluster.emu.put("v1/pods", pod))
    lines, err = show(kube_cluster, script=f"/usr/bin/python3 -c 'print(1)'; {sys.executable} -c 'print(2)'; "
                                           f"{absent(SITE_HOOK, GO_CA_DIR, VENV_HOOK, os.path.normpath(DOTDOT))}; "
                                           f"cat {CONFIG}/greeting")
    assert lines == ["1", "2", f"NO {SITE_HOOK}", f"NO {GO_CA_DIR}", f"NO {VENV_HOOK}",
                     f"NO {os.path.normpath(DOTDOT)}", "hello from the pod's ConfigMap"], err
    [warning] = [line for line in err.splitlines() if "not mounting the target's volumes at" in line]
    elsewhere = "(not in a directory of its own under /etc, /opt, /srv, /mnt, /media, /var/lib, /run/secrets)"
    assert f"{SITE_HOOK} {elsewhere}" in warning and f"{VENV_HOOK} {elsewhere}" in warning
    assert f"{GO_CA_DIR} (/etc/pki is read by programs here)" in warning and f"{DOTDOT} (a path with ..)" in warning
    assert warning.endswith("(--mount PATH to have them anyway)")
