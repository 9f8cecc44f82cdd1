"""The agent pod's settings for real clusters: pull secrets, tolerations, annotations.

Each is read from `--dry-run`'s manifest (validated against the Kubernetes schema), and the
config file sets them as the flags do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kube_env import NODE, Api, api  # noqa: F401 - `api` is a fixture
from mirrord_tun.kube import manifest
from test_kube_targets import dry_run
from test_security_kube import Policy

TAINTS = [{"key": "dedicated", "value": "payments", "effect": "NoExecute"},
          {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]


def pod_of(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pod template's metadata and spec."""
    template = job["spec"]["template"]
    return template["metadata"], template["spec"]


def test_image_pull_secrets(api: Api) -> None:
    [job] = dry_run(api, "--target", "pod/web", "--image-pull-secret", "regcred",
                    "--image-pull-secret", "mirror-cred", "--image-pull-secret", "regcred")
    assert pod_of(job)[1]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror-cred"}]
    [plain] = dry_run(api, "--target", "pod/web")
    assert "imagePullSecrets" not in pod_of(plain)[1]


def test_the_agent_tolerates_exactly_the_taints_of_the_targets_node(api: Api) -> None:
    api.emu.run(lambda: api.emu.node(NODE, TAINTS))
    [job] = dry_run(api, "--target", "pod/web")
    spec = pod_of(job)[1]
    assert spec["nodeName"] == NODE
    assert spec["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "payments", "effect": "NoExecute"},
        {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}]


def test_an_untainted_node_needs_no_tolerations(api: Api) -> None:
    [job] = dry_run(api, "--target", "pod/web")  # the seeded node has no taints
    assert "tolerations" not in pod_of(job)[1]


def test_targetless_the_scheduler_places_it_and_nothing_is_tolerated(api: Api) -> None:
    [job] = dry_run(api)
    spec = pod_of(job)[1]
    assert "nodeName" not in spec and "tolerations" not in spec


def test_without_the_right_to_read_nodes_every_taint_is_tolerated(api: Api) -> None:
    api.emu.run(lambda: api.emu.forbid("get", "v1/nodes", 'nodes "node-1" is forbidden: User "dev" cannot get '
                                       'resource "nodes" in API group "" at the cluster scope'))
    r = api.cli("run", "-v", "--dry-run", "--target", "pod/web")
    assert r.returncode == 0, r.stderr
    assert f"cannot read node {NODE} (forbidden: nodes \"node-1\" is forbidden" in r.stderr
    assert "the agent tolerates every taint" in r.stderr
    [job] = dry_run(api, "--target", "pod/web")
    assert pod_of(job)[1]["tolerations"] == [{"operator": "Exists"}]


def test_mesh_injection_is_off_by_default_and_annotations_can_be_added(api: Api) -> None:
    [job] = dry_run(api, "--target", "pod/web")
    annotations = pod_of(job)[0]["annotations"]
    assert annotations["sidecar.istio.io/inject"] == "false"
    assert annotations["linkerd.io/inject"] == "disabled"
    assert annotations[manifest.ANNOTATION_TARGET] == "pod/web/app"
    [job] = dry_run(api, "--target", "pod/web", "--agent-annotation", "example.com/team=payments",
                    "--agent-annotation", "linkerd.io/inject=enabled", "--agent-annotation", "empty=")
    annotations = pod_of(job)[0]["annotations"]
    assert annotations["example.com/team"] == "payments" and annotations["empty"] == ""
    assert annotations["linkerd.io/inject"] == "enabled"  # the user's word wins over the default
    assert annotations["sidecar.istio.io/inject"] == "false"


@pytest.mark.parametrize("spec", ["novalue", "=x", "bad key=x", "-lead=x", "UPPER.example.com/x=y", "a/b/c=x"])
def test_a_malformed_annotation_is_a_usage_error(api: Api, spec: str) -> None:
    r = api.cli("run", "--dry-run", "--target", "pod/web", "--agent-annotation", spec)
    assert r.returncode == 2
    [line] = r.stderr.splitlines()
    assert "--agent-annotation" in line and "Traceback" not in r.stderr


def test_the_config_file_sets_them_and_flags_override_it(api: Api, tmp_path: Path) -> None:
    config = tmp_path / "mirrord-ns.toml"
    config.write_text('target = "pod/web"\nimage-pull-secret = ["regcred", "other"]\n'
                      'agent-annotation = ["example.com/team=payments"]\n')
    [job] = dry_run(api, "-f", str(config))
    meta, spec = pod_of(job)
    assert spec["imagePullSecrets"] == [{"name": "regcred"}, {"name": "other"}]
    assert meta["annotations"]["example.com/team"] == "payments"
    [job] = dry_run(api, "-f", str(config), "--image-pull-secret", "mine")
    assert pod_of(job)[1]["imagePullSecrets"] == [{"name": "mine"}]
    config.write_text('target = "pod/web"\nimage-pull-secret = "regcred"\n')
    r = api.cli("run", "--dry-run", "-f", str(config))
    assert r.returncode == 2 and "image-pull-secret: expected a list of strings" in r.stderr


def test_the_admission_policy_still_admits_the_agent_with_these_settings(api: Api) -> None:
    api.emu.run(lambda: api.emu.node(NODE, TAINTS))
    [job] = dry_run(api, "--target", "pod/web", "--image-pull-secret", "regcred",
                    "--agent-annotation", "example.com/team=payments")
    meta, spec = pod_of(job)
    # The release's own image, as the policy pins it (the dry run used the default).
    assert Policy().refusals({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}) == []


def test_file_systems_that_can_hang_are_served_only_when_run_asks() -> None:
    """The launched agent refuses FUSE, NFS, SMB... mounts of the container unless `run --serve-fs`."""
    def args(*serve_fs: str) -> list[str]:
        job = manifest.agent_job(session="s", user="u", namespace="default", image="i", client_key="k",
                                 target=None, privileged=False, serve_fs=serve_fs)
        return list(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--serve-fs" not in args()
    got = args("fuse", "nfs")
    assert [got[i + 1] for i, a in enumerate(got) if a == "--serve-fs"] == ["fuse", "nfs"]
