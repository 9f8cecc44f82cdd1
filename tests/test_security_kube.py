"""Issue 8, Kubernetes side, from the attacker's seat: a neighbour pod that copies the agent's
labels (and more) to get its host key pinned, a log that carries two keys, an agent reachable
from the pod network, a workload whose environment plants loader and shell hooks, and the
deploy/ manifests (RBAC, admission policy) checked against the schema and, for the policy's
CEL, against the agent manifest and its tampered variants."""
from __future__ import annotations

import copy
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import asyncssh
import pytest
import yaml

from kube_env import (JOBS, PODS, AgentStarter, Api, FakeKubelet, KubeCluster, api,  # noqa: F401 - fixtures
                      eventually, job_pod_metadata, kube_cluster, running_pod)
from mirrord_tun.kube import manifest
from mirrord_tun.sandbox import ADDRS
from test_kube_targets import dry_run, validate

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def key_line(key: asyncssh.SSHKey) -> str:
    pub = key.export_public_key().decode().strip()
    return f"mirrord-ns agent listening on 0.0.0.0:2222 netns /proc/1/ns/net host-key {pub} (x)\n"


def fingerprint(key: asyncssh.SSHKey) -> str:
    return key.convert_to_public().get_fingerprint("sha256")


def decoys(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Running pods that look like the Job's own in every way a neighbour can arrange without
    forging a controller reference to the Job's UID (or forging one its labels contradict)."""
    real = job_pod_metadata(job)
    name, other = job["metadata"]["name"], str(uuid.uuid4())
    owner = real["ownerReferences"][0]
    container = job["spec"]["template"]["spec"]["containers"][0]
    shapes = {
        "copied-labels": {},
        "not-controller": {"ownerReferences": [dict(owner, controller=False)]},
        "other-job": {"ownerReferences": [dict(owner, uid=other)],
                      "labels": dict(real["labels"], **{"batch.kubernetes.io/controller-uid": other,
                                                        "controller-uid": other})},
        "label-disagrees": {"ownerReferences": [owner],
                            "labels": dict(real["labels"], **{"batch.kubernetes.io/controller-uid": other})},
    }
    pods = []
    for shape, meta in shapes.items():
        pod = running_pod(f"{name}-{shape}", "b" * 64, real["labels"], [container])
        pod["metadata"].update(meta)
        pods.append(pod)
    return pods


def plant(api_emu: Any, pods: list[dict[str, Any]], log: str) -> None:
    """On the emulator's loop: the pods exist, Running, and their logs say `log`."""
    for pod in pods:
        api_emu.put("v1/pods", pod)
        api_emu.serve_log(pod["metadata"]["namespace"], pod["metadata"]["name"], log)


def fake_agents(log: str, delay: float) -> tuple[AgentStarter, Callable[[subprocess.Popen[bytes]], None]]:
    """A stand-in agent that starts `delay` s late (the decoys are Running before it) and logs `log`."""
    def start(_args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
        time.sleep(delay)
        return subprocess.Popen(["sleep", "60"]), log

    def stop(proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()
        proc.wait()
    return start, stop


def kubelet_with(api: Api, log: str, on_job: Callable[[str, dict[str, Any]], None]) -> FakeKubelet:
    start, stop = fake_agents(log, delay=1.5)
    kubelet = FakeKubelet(api.emu, start, stop)
    kubelet.on_job = on_job
    return kubelet.start()


def jobs_gone(api: Api) -> bool:
    def check() -> bool:
        pods = api.emu.live(PODS)
        return api.emu.live(JOBS) == {} and not any(name.endswith("-x7k2p") for _, name in pods)
    return api.emu.run(check)


def stop_agents(kubelet: FakeKubelet) -> None:
    assert kubelet.stop_agent is not None
    for proc in list(kubelet.agents.values()):
        if proc.poll() is None:
            kubelet.stop_agent(proc)


def test_decoy_pods_with_the_sessions_labels_are_never_pinned(api: Api) -> None:
    real, decoy = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    planted: list[str] = []

    def on_job(_ns: str, job: dict[str, Any]) -> None:
        pods = decoys(job)
        plant(api.emu, pods, key_line(decoy))
        planted.extend(p["metadata"]["name"] for p in pods)

    kubelet = kubelet_with(api, key_line(real), on_job)
    try:
        # The emulator cannot port-forward: the run ends there, after pinning, naming its pod.
        r = api.cli("run", "-v", "--target", "pod/web", "--", "true")
    finally:
        stop_agents(kubelet)
    assert r.returncode == 2
    assert len(planted) == 4
    assert f"host key {fingerprint(real)}" in r.stderr, r.stderr
    assert fingerprint(decoy) not in r.stderr
    [forwarded] = [line for line in r.stderr.splitlines() if "cannot port-forward to pod/" in line]
    assert "-x7k2p port 2222" in forwarded and not any(name in forwarded for name in planted)
    assert eventually(lambda: jobs_gone(api))
    # What is not ours is never deleted either.
    assert api.emu.run(lambda: {n for _, n in api.emu.live(PODS)} >= set(planted))


def test_a_second_pod_claiming_the_job_ends_the_session(api: Api) -> None:
    """A perfect forgery (controller reference and labels of the Job's UID) next to the real pod."""
    def on_job(_ns: str, job: dict[str, Any]) -> None:
        pod = running_pod(job["metadata"]["name"] + "-forged", "b" * 64, {}, [{"name": "agent", "image": "x"}])
        pod["metadata"].update(job_pod_metadata(job))
        plant(api.emu, [pod], key_line(asyncssh.generate_private_key("ssh-ed25519")))

    kubelet = kubelet_with(api, key_line(asyncssh.generate_private_key("ssh-ed25519")), on_job)
    try:
        r = api.cli("run", "--target", "pod/web", "--", "true")
    finally:
        stop_agents(kubelet)
    assert r.returncode == 2
    assert "more than one pod claims to be job mirrord-ns-agent-" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert eventually(lambda: jobs_gone(api))


def test_a_log_with_two_host_key_lines_is_refused(api: Api) -> None:
    first, second = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    start, stop = fake_agents(key_line(first) + "some output\n" + key_line(second), delay=0)
    kubelet = FakeKubelet(api.emu, start, stop).start()
    try:
        r = api.cli("run", "--target", "pod/web", "--", "true")
    finally:
        stop_agents(kubelet)
    assert r.returncode == 2
    assert "logged its host-key line 2 times" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert fingerprint(first) not in r.stderr and fingerprint(second) not in r.stderr
    assert eventually(lambda: jobs_gone(api))


def test_the_decoy_cannot_stand_in_for_a_real_agent(kube_cluster: KubeCluster) -> None:
    """End to end: with a decoy Running first, the session still reaches the real agent, which
    it could not if the decoy's key had been pinned (asyncssh refuses any other host key)."""
    k = kube_cluster
    decoy = asyncssh.generate_private_key("ssh-ed25519")
    k.kubelet.on_job = lambda _ns, job: plant(k.emu, decoys(job), key_line(decoy))
    r = k.run("-v", "--target", "pod/web", "--agent-address", k.agent_address, "--no-env",
              "--", "curl", "-s", "http://svc/")
    assert r.returncode == 0, r.stderr
    assert f"you are {ADDRS['pod']}" in r.stdout
    assert fingerprint(decoy) not in r.stderr


def listen_of(job: dict[str, Any]) -> str:
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    return args[args.index("--listen") + 1]


def test_the_agent_listens_on_loopback_unless_dialled_directly(api: Api) -> None:
    [job] = dry_run(api, "--target", "pod/web", "--", "true")
    assert listen_of(job) == "127.0.0.1:2222"  # only the port-forward, which lands on the pod's loopback
    assert "ports" not in job["spec"]["template"]["spec"]["containers"][0]
    [job] = dry_run(api, "--target", "pod/web", "--agent-address", "198.18.0.10:2222", "--", "true")
    assert listen_of(job) == "0.0.0.0:2222"


HOSTILE_ENV = [
    {"name": "BASH_ENV", "value": "$(echo pwned >> {marker})"},  # expanded by every non-interactive bash
    {"name": "PROMPT_COMMAND", "value": "echo pwned >> {marker}"},
    {"name": "BASH_FUNC_echo%%", "value": "() {{ builtin echo hijacked; }}"},  # replaces echo in bash
    {"name": "PYTHONPATH", "value": "/attacker/lib"},
    {"name": "PYTHONPYCACHEPREFIX", "value": "/attacker/pyc"},  # bytecode under it is loaded unchecked
    {"name": "OPENSSL_CONF", "value": "/attacker/openssl.cnf"},  # can load a provider into any TLS client
    {"name": "PYTHONUNBUFFERED", "value": "1"},  # tuning only: imported
    {"name": "NULLED", "value": "a\u0000b"},  # as a Secret's bytes can be: no program can be given it
]
DENIED_HERE = ("BASH_ENV", "BASH_FUNC_echo%%", "LD_PRELOAD", "PROMPT_COMMAND", "PYTHONPATH", "PYTHONPYCACHEPREFIX",
               "OPENSSL_CONF")


def test_loader_and_shell_hooks_in_the_workloads_env_do_not_reach_the_command(kube_cluster: KubeCluster,
                                                                              tmp_path: Path) -> None:
    k = kube_cluster
    marker = tmp_path / "pwned"
    env = [{"name": e["name"], "value": e["value"].format(marker=marker)} for e in HOSTILE_ENV]

    def plant_env() -> None:
        # LD_PRELOAD composed from an envFrom prefix, as a name check on the spec alone would miss.
        k.emu.put("v1/configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "data": {"PRELOAD": "/attacker/x.so"},
                                    "metadata": {"name": "hooks", "namespace": "default"}})
        pod = k.emu.km.objects[PODS, "default", "web"]
        [app, sidecar] = pod["spec"]["containers"]
        app = dict(app, env=app["env"] + env,
                   envFrom=app["envFrom"] + [{"configMapRef": {"name": "hooks"}, "prefix": "LD_"}])
        pod.patch({"spec": {"containers": [app, sidecar]}})
    k.emu.run(plant_env)

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        r = k.run("--target", "pod/web", "--agent-address", k.agent_address, *extra,
                  "--", "bash", "-c", "echo ran; env")
        assert r.returncode == 0, r.stderr
        return r

    r = run()
    assert r.stdout.startswith("ran\n") and "hijacked" not in r.stdout
    assert not marker.exists()
    # By value: the runner's own environment (CI's may set some of these names) is not the pod's.
    theirs = {e["name"]: e["value"] for e in env} | {"LD_PRELOAD": "/attacker/x.so"}
    assert not [n for n in DENIED_HERE if theirs[n] in r.stdout], r.stdout
    assert "NULLED=" not in r.stdout
    assert "LITERAL=hello" in r.stdout and "CFG_KEY=value" in r.stdout  # ordinary variables still come
    assert "PYTHONUNBUFFERED=1" in r.stdout
    assert "cannot be preloaded" not in r.stderr and "Traceback" not in r.stderr
    [warning] = [line for line in r.stderr.splitlines() if "(they make programs load code" in line]
    for name in DENIED_HERE:
        assert name in warning
    [nul] = [line for line in r.stderr.splitlines() if "NUL byte" in line]
    assert "'NULLED'" in nul
    assert "pwned" not in r.stderr and "/attacker" not in r.stderr  # names, never values

    # What the deny-list stops: allowed back, the workload's BASH_ENV runs its command.
    r = run("--env-allow", "BASH_ENV")
    assert marker.read_text() == "pwned\n"
    assert "BASH_ENV" not in next(line for line in r.stderr.splitlines() if "load code" in line)


def deploy_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(DEPLOY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_every_deploy_manifest_validates() -> None:
    docs = deploy_docs()
    assert {d["kind"] for d in docs} >= {"ClusterRole", "RoleBinding", "ValidatingAdmissionPolicy",
                                         "ValidatingAdmissionPolicyBinding"}
    for doc in docs:
        validate(doc)


def test_the_run_role_cannot_delete_pods_or_read_secrets() -> None:
    [role] = [d for d in deploy_docs() if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "mirrord-ns-user"]
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    assert ("pods", "delete") not in granted and ("jobs", "create") in granted
    assert not {res for res, _ in granted} & {"secrets", "configmaps"}


class Policy:
    """The admission policy's CEL, evaluated as the API server does (variables first, in order)."""

    def __init__(self) -> None:
        # cel-python (test extra): only these tests need it.
        self.cel = pytest.importorskip("celpy")
        [doc] = [d for d in deploy_docs() if d["kind"] == "ValidatingAdmissionPolicy"]
        env = self.cel.Environment()
        self.variables = [(v["name"], env.program(env.compile(v["expression"]))) for v in doc["spec"]["variables"]]
        self.checks = [(c["message"], env.program(env.compile(c["expression"]))) for c in doc["spec"]["validations"]]

    def refusals(self, pod: dict[str, Any]) -> list[str]:
        types = self.cel.celtypes
        values: dict[Any, Any] = {}
        activation: dict[str, Any] = {"object": self.cel.json_to_cel(pod)}
        for name, program in self.variables:
            activation["variables"] = types.MapType(values)
            values[types.StringType(name)] = program.evaluate(activation)
        activation["variables"] = types.MapType(values)
        return [message for message, program in self.checks if not self._true(program, activation)]

    def _true(self, program: Any, activation: dict[str, Any]) -> bool:
        """An evaluation error refuses too (failurePolicy: Fail)."""
        try:
            result = program.evaluate(activation)
        except self.cel.CELEvalError:
            return False
        return isinstance(result, self.cel.celtypes.BoolType) and bool(result)


def agent_pod(direct: bool = False, image: str = manifest.DEFAULT_IMAGE) -> dict[str, Any]:
    job = manifest.agent_job(session="abcd1234", user="dev", namespace="default", image=image,
                             client_key="ssh-ed25519 AAAA", target=None, privileged=False, direct=direct)
    template = copy.deepcopy(job["spec"]["template"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"], "spec": template["spec"]}


def tampered(change: Callable[[dict[str, Any]], None], pod: dict[str, Any] | None = None) -> dict[str, Any]:
    pod = pod or agent_pod()
    change(pod)
    return pod


def container(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["spec"]["containers"][0]


def test_the_admission_policy_admits_the_agent_as_run_makes_it() -> None:
    policy = Policy()
    assert policy.refusals(agent_pod()) == []
    assert policy.refusals(agent_pod(direct=True)) == []
    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
             "spec": {"containers": [{"name": "app", "image": "web:1"}]}}
    assert policy.refusals(plain) == []


@pytest.mark.parametrize("attack,change", [
    ("other image", lambda p: container(p).update(image="attacker/agent:1")),
    ("a shell instead", lambda p: container(p).update(command=["sh", "-c", "id"])),
    ("work in the node's netns", lambda p: container(p)["args"].extend(["--pid", "1"])),
    ("--pid=1 form", lambda p: container(p)["args"].append("--pid=1")),
    ("more capabilities", lambda p: container(p)["securityContext"]["capabilities"]["add"].append("SYS_MODULE")),
    ("privileged", lambda p: container(p)["securityContext"].update(privileged=True)),
    ("host network", lambda p: p["spec"].update(hostNetwork=True)),
    ("host root mounted", lambda p: p["spec"].update(volumes=[{"name": "root", "hostPath": {"path": "/"}}])),
    ("service account token", lambda p: p["spec"].update(automountServiceAccountToken=True)),
    ("a second container", lambda p: p["spec"]["containers"].append({"name": "x", "image": "busybox"})),
])
def test_the_admission_policy_refuses_a_tampered_agent(attack: str, change: Callable[[dict[str, Any]], None]) -> None:
    assert Policy().refusals(tampered(change)) != [], attack


@pytest.mark.parametrize("attack,change", [
    ("hostPID", lambda p: p["spec"].update(hostPID=True)),
    ("privileged", lambda p: container(p).update(securityContext={"privileged": True})),
    ("capabilities", lambda p: container(p).update(securityContext={"capabilities": {"add": ["SYS_ADMIN"]}})),
    ("hostPath", lambda p: p["spec"].update(volumes=[{"name": "r", "hostPath": {"path": "/"}}])),
    ("privileged debug container", lambda p: p["spec"].update(ephemeralContainers=[
        {"name": "debug", "image": "busybox", "securityContext": {"privileged": True}}])),
    ("privileged init container", lambda p: p["spec"].update(initContainers=[
        {"name": "init", "image": "busybox", "securityContext": {"privileged": True}}])),
])
def test_the_admission_policy_refuses_node_level_pods_that_are_not_agents(
        attack: str, change: Callable[[dict[str, Any]], None]) -> None:
    def relabel(p: dict[str, Any]) -> None:
        p["metadata"]["labels"][manifest.LABEL_APP] = "innocent"
        change(p)
    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {}},
             "spec": {"containers": [{"name": "app", "image": "web:1"}]}}
    assert Policy().refusals(tampered(relabel, plain)) != [], attack
