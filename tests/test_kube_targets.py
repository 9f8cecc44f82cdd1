"""Target resolution, the container's environment, the agent manifest and --dry-run,
against kmock's Kubernetes emulator (no real cluster), manifests checked with
kubernetes-validate."""
from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from kube_env import JOBS, Api, api  # noqa: F401 - `api` is a fixture
from mirrord_tun.kube import manifest
from mirrord_tun.kube.cluster import connect
from mirrord_tun.kube.errors import KubeError
from mirrord_tun.kube.env import container_env
from mirrord_tun.kube.targets import resolve

K8S_VERSION = "1.34"


def validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def resolved(api: Api, target: str, container: str | None = None, namespace: str | None = None):
    return api.call(lambda: resolve(connect(None, api.kubeconfig, namespace), target, container))


@pytest.mark.parametrize("target,pod", [("pod/web", "web"), ("deploy/web", "web"), ("deployment/web", "web"),
                                        ("statefulset/db", "db-0"), ("sts/db", "db-0")])
def test_targets_resolve_to_a_running_ready_pod(api: Api, target: str, pod: str) -> None:
    t = resolved(api, target)
    assert (t.name, t.namespace, t.node) == (pod, "default", "node-1")
    assert t.container_id.startswith("containerd://")


def test_container_choice(api: Api) -> None:
    assert resolved(api, "pod/web").container == "app"  # the first, as kubectl picks
    assert resolved(api, "pod/web", "sidecar").container == "sidecar"
    with pytest.raises(KubeError, match="no container 'nope'.*app, sidecar"):
        resolved(api, "pod/web", "nope")


@pytest.mark.parametrize("target,message", [
    ("pod/ghost", "pod/ghost in namespace default not found"),
    ("pod/starting", "pod/starting is not running and ready (Pending)"),
    ("deploy/idle", "deployment/idle in namespace default has no running, ready pod (selector app=idle)"),
    ("svc/web", "bad target 'svc/web'"),
    ("pod/node-agent", "pod/node-agent shares its node's network (hostNetwork: true): a session would change the "
                       "node's own routing and firewall, so mirrord-ns does not target it"),
])
def test_bad_targets(api: Api, target: str, message: str) -> None:
    with pytest.raises(KubeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolved(api, target)


def test_namespace_comes_from_the_flag_or_the_context(api: Api) -> None:
    with pytest.raises(KubeError, match="pod/web in namespace prod not found"):
        resolved(api, "pod/web", namespace="prod")


def test_container_environment(api: Api) -> None:
    def env(exclude: frozenset[str] = frozenset()) -> dict[str, str]:
        cluster = connect(None, api.kubeconfig, None)
        return container_env(cluster, resolve(cluster, "pod/web", None), exclude)

    got = api.call(env)
    assert got == {
        "CFG_mode": "fast", "CFG_KEY": "value",  # envFrom with its prefix
        "LITERAL": "hello", "EXPANDED": "hello-world $(LITERAL)",
        "FROM_CM": "fast", "FROM_SECRET": "s3cret", "POD_NAME": "web",
    }  # MISSING is optional and absent; PATH stays the laptop's
    assert "FROM_SECRET" not in api.call(lambda: env(frozenset({"FROM_SECRET"})))


def dry_run(api: Api, *args: str) -> list[dict]:
    r = api.cli("run", "--dry-run", *args)
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(r.stdout))
    for doc in docs:
        validate(doc)
    return docs


def test_dry_run_prints_a_valid_manifest_and_creates_nothing(api: Api) -> None:
    [job] = dry_run(api, "--target", "deploy/web", "--", "curl", "http://svc/")
    assert job["kind"] == "Job" and job["spec"]["ttlSecondsAfterFinished"] > 0
    assert job["spec"]["activeDeadlineSeconds"] > 0
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeName"] == "node-1" and pod["hostPID"] is True
    [c] = pod["containers"]
    assert c["image"] == manifest.DEFAULT_IMAGE
    assert c["securityContext"]["privileged"] is False
    assert set(c["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"}
    assert c["resources"]["requests"] and c["resources"]["limits"]
    args = c["args"]
    assert args[args.index("--container-id") + 1] == "containerd://" + "c" * 64
    assert args[args.index("--authorized-key-data") + 1].startswith("ssh-ed25519 ")
    assert "--idle-exit" in args
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels[manifest.LABEL_USER] == "root" and labels[manifest.LABEL_SESSION]
    assert api.emu.run(lambda: api.emu.live(JOBS)) == {}


def test_dry_run_options(api: Api) -> None:
    [job] = dry_run(api, "--target", "pod/web", "--container", "sidecar", "--privileged",
                    "--agent-image", "registry.example/agent:dev")
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "registry.example/agent:dev" and c["securityContext"]["privileged"] is True
    assert job["metadata"]["annotations"][manifest.ANNOTATION_TARGET] == "pod/web/sidecar"


def test_targetless_dry_run_runs_the_agent_as_itself(api: Api) -> None:
    [job] = dry_run(api, "-n", "staging")
    pod = job["spec"]["template"]["spec"]
    assert job["metadata"]["namespace"] == "staging"
    assert "nodeName" not in pod and "--container-id" not in pod["containers"][0]["args"]


@pytest.mark.parametrize("target,message", [
    ("pod/ghost", "not found"), ("pod/starting", "not running"), ("svc/x", "bad target"),
])
def test_dry_run_of_a_bad_target_is_one_line_and_exit_2(api: Api, target: str, message: str) -> None:
    r = api.cli("run", "--target", target, "--dry-run")
    assert r.returncode == 2 and r.stdout == ""
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_forbidden_is_reported_as_such(api: Api) -> None:
    api.emu.run(lambda: api.emu.forbid("get", "v1/pods", 'pods "web" is forbidden: User "dev" cannot get '
                                       'resource "pods" in API group "" in the namespace "default"'))
    r = api.cli("run", "--target", "pod/web", "--dry-run")
    assert r.returncode == 2
    assert 'forbidden: pods "web" is forbidden' in r.stderr and "deploy/rbac.yaml" in r.stderr
