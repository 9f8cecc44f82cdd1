"""A Kubernetes stand-in for the kube tests: kmock's emulator, seeded, plus a kubelet.

The emulator (an in-memory API server over HTTP) runs on its own event loop in a
thread that has entered a network namespace, so its socket lives there and only
processes in that namespace reach it: a throwaway `api` namespace for the
cluster-only tests, the sandbox's laptop namespace for the end-to-end ones.
`FakeKubelet` runs on the same loop and does what the cluster would: the Job
controller makes the agent's pod (owned by the Job as the real one records it:
a controller reference to the Job's UID and the controller-uid labels; the
emulator gives every created object a UID, as the API server does), the
kubelet "pulls" the image (any image named in `bad_images` fails with
ErrImagePull), starts the agent with the pod's own args (through a
`start_agent` callback), reports it Running and serves its log, and the garbage
collector deletes the pod after its Job and stops the agent with it.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import kmock
import pytest
from kmock._internal.k8s import KubernetesError

from mirrord_tun.netns.namespace import CLONE_NEWNET, NetNs, setns
from mirrord_tun.sandbox import NODE_UPLINK, Sandbox

NODE = "node-1"
POD_IP = "198.18.0.10"
PODS, JOBS = kmock.resource("v1/pods"), kmock.resource("batch/v1/jobs")
BAD_IMAGE = "registry.invalid/mirrord-ns/agent:missing"
AgentStarter = Callable[[list[str]], tuple[subprocess.Popen[bytes], str]]


class Emulator:
    """KubernetesEmulator + Server on a loop in a thread inside `netns_path`."""

    def __init__(self, netns_path: str) -> None:
        self.netns_path = netns_path
        self.loop = asyncio.new_event_loop()
        self.km: kmock.KubernetesEmulator
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="kmock", daemon=True)
        self._thread.start()
        self._ready.wait(15)
        if self._error or not self.port:
            raise RuntimeError(f"emulator did not start: {self._error!r}")

    def _main(self) -> None:
        fd = os.open(self.netns_path, os.O_RDONLY)
        try:
            setns(fd, CLONE_NEWNET)  # this thread only: the server's socket is made here
        finally:
            os.close(fd)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported to the constructor
            self._error = e
            self._ready.set()
        finally:
            tasks = asyncio.all_tasks(self.loop)  # the kubelet
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.wait(tasks))
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as km, kmock.Server(km) as server:
            self.km = km
            # Above the emulator's own create, below any reaction a test adds (e.g. a 403).
            (km.fallback ** 1)["create"] << self._stamp
            self.port = server.port
            self._ready.set()
            await self._stop.wait()

    def _stamp(self, request: Any) -> dict[str, Any]:
        """What the API server adds to every object it creates."""
        meta = request.data.get("metadata", {})
        obj = self.km.objects[request.resource, request.namespace or meta.get("namespace"), meta["name"]]
        obj.patch({"metadata": {"uid": str(uuid.uuid4()), "creationTimestamp": "2026-01-01T00:00:00Z"}})
        return dict(obj.raw)

    def run(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the emulator's loop (objects are only touched there) and return its result."""
        async def call() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def spawn(self, coro: Any) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def kubeconfig(self, path: str, namespace: str = "default") -> str:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "emu",
            "clusters": [{"name": "emu", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "dev", "user": {"token": "emulator"}}],
            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "dev", "namespace": namespace}},
                         {"name": "other", "context": {"cluster": "emu", "user": "dev", "namespace": "prod"}}],
        }
        with open(path, "w") as f:
            json.dump(config, f)  # JSON is YAML
        return path

    # --- object helpers (call through run()). Each change is also told to the watches, as the
    # API server would; kmock itself only tells them what came through its HTTP API.
    def put(self, plural: str, obj: dict[str, Any], namespace: str | None = "default") -> None:
        meta = obj["metadata"]
        key = (kmock.resource(plural), meta.get("namespace", namespace), meta["name"])
        kind = "MODIFIED" if key in self.km.objects and not self.km.objects[key].deleted else "ADDED"
        self.km.objects[key] = obj
        self._publish(key, kind)

    def patch(self, resource: kmock.resource, namespace: str, name: str, change: dict[str, Any]) -> None:
        self.km.objects[resource, namespace, name].patch(change)
        self._publish((resource, namespace, name), "MODIFIED")

    def delete(self, resource: kmock.resource, namespace: str, name: str) -> None:
        self.km.objects[resource, namespace, name].delete()
        self._publish((resource, namespace, name), "DELETED")

    def _publish(self, key: tuple[kmock.resource, str | None, str], kind: str) -> None:
        obj = self.km.objects[key]
        raw = dict(obj.last.raw if obj.deleted else obj.raw)
        self.loop.create_task(self.km._buses[key[0]].put({"type": kind, "object": raw}))

    def event(self, about: dict[str, Any], reason: str, message: str, type_: str = "Normal") -> None:
        """An Event about `about` (an object as stored), as the kubelet or a controller records one."""
        meta = about["metadata"]
        self.put("v1/events", {
            "apiVersion": "v1", "kind": "Event", "reason": reason, "message": message, "type": type_,
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"],
                         "uid": str(uuid.uuid4())},
            "involvedObject": {"apiVersion": about["apiVersion"], "kind": about["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "lastTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "count": 1,
            "source": {"component": "kubelet"}})

    def node(self, name: str, taints: list[dict[str, str]] | None = None) -> None:
        self.put("v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "uid": str(uuid.uuid4())},
                              "spec": {"taints": taints or []}}, namespace=None)

    def live(self, resource: kmock.resource) -> dict[tuple[str, str], dict[str, Any]]:
        return {(ns, name): dict(obj.raw) for (res, ns, name), obj in self.km.objects.items()
                if res == resource and not obj.deleted}

    def serve_log(self, namespace: str, pod: str, text: str) -> None:
        self.km["get", PODS, kmock.namespace(namespace), kmock.name(pod), kmock.subresource("log")] << kmock.text(text)

    def forbid(self, verb: str, resource: str, message: str) -> None:
        self.km[verb, kmock.resource(resource)] << KubernetesError(status=403, reason="Forbidden", message=message)


def api_netns(name: str) -> str:
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return f"/run/netns/{name}"


def in_netns(path: str, fn: Callable[[], Any]) -> Any:
    """Call fn from a thread inside the namespace (where the emulator is reachable)."""
    ns = NetNs.open(path)
    try:
        return ns.call(fn)
    finally:
        ns.close()


def running_pod(name: str, container_id: str, labels: dict[str, str], containers: list[dict[str, Any]],
                created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels, "uid": f"uid-{name}",
                     "creationTimestamp": created},
        "spec": {"nodeName": NODE, "containers": containers},
        "status": {
            "phase": "Running", "podIP": POD_IP, "hostIP": "198.18.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": "", "ready": True,
                                   "restartCount": 0, "containerID": f"containerd://{container_id}",
                                   "state": {"running": {"startedAt": created}}} for c in containers],
        },
    }


SEEDED_PODS = ("web", "db-0", "web-old", "node-agent", "starting")  # what seed() puts in


def seed(emu: Emulator, web_container_id: str) -> None:
    """web (pod + deployment, 2 containers, env of every kind), db-0 (statefulset), a pending pod."""
    app = {"name": "app", "image": "web:1", "envFrom": [{"configMapRef": {"name": "web-config"}, "prefix": "CFG_"}],
           "env": [
               {"name": "LITERAL", "value": "hello"},
               {"name": "EXPANDED", "value": "$(LITERAL)-world $$(LITERAL)"},
               {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "web-config", "key": "mode"}}},
               {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "web-secret", "key": "token"}}},
               {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
               {"name": "MISSING", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "x", "optional": True}}},
               {"name": "PATH", "value": "/image/bin"},
           ]}
    sidecar = {"name": "sidecar", "image": "proxy:1"}
    emu.put("v1/pods", running_pod("web", web_container_id, {"app": "web"}, [app, sidecar]))
    emu.put("v1/pods", running_pod("db-0", "d" * 64, {"app": "db"}, [{"name": "db", "image": "db:1"}]))
    # An older web pod that is not ready: a deployment target must skip it.
    unready = running_pod("web-old", "e" * 64, {"app": "web"}, [app], created="2025-01-01T00:00:00Z")
    unready["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    emu.put("v1/pods", unready)
    node_wide = running_pod("node-agent", "9" * 64, {"app": "node-agent"}, [{"name": "c", "image": "c:1"}])
    node_wide["spec"]["hostNetwork"] = True
    emu.put("v1/pods", node_wide)
    pending = running_pod("starting", "f" * 64, {"app": "starting"}, [{"name": "c", "image": "c:1"}])
    pending["status"] = {"phase": "Pending"}
    emu.put("v1/pods", pending)
    emu.node(NODE)
    emu.event(emu.live(PODS)["default", "web"], "Started", "Started container app")
    for plural, kind, name, label in (("apps/v1/deployments", "Deployment", "web", "web"),
                                      ("apps/v1/statefulsets", "StatefulSet", "db", "db"),
                                      ("apps/v1/deployments", "Deployment", "idle", "idle")):
        emu.put(plural, {"apiVersion": "apps/v1", "kind": kind,
                         "metadata": {"name": name, "namespace": "default"},
                         "spec": {"selector": {"matchLabels": {"app": label}},
                                  "template": {"metadata": {"labels": {"app": label}}, "spec": {"containers": []}}}})
    emu.put("v1/configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "data": {"mode": "fast", "KEY": "value"},
                              "metadata": {"name": "web-config", "namespace": "default"}})
    emu.put("v1/secrets", {"apiVersion": "v1", "kind": "Secret", "data": {"token": base64.b64encode(b"s3cret").decode()},
                           "metadata": {"name": "web-secret", "namespace": "default"}})


class FakeKubelet:
    """Job controller, kubelet and garbage collector for the agent's Job, on the emulator's loop."""

    def __init__(self, emu: Emulator, start_agent: AgentStarter | None = None,
                 stop_agent: Callable[[subprocess.Popen[bytes]], None] | None = None) -> None:
        self.emu, self.start_agent, self.stop_agent = emu, start_agent, stop_agent
        self.jobs: dict[tuple[str, str], str] = {}  # job -> its pod
        self.agents: dict[str, subprocess.Popen[bytes]] = {}  # pod -> agent process
        self.started_args: list[list[str]] = []
        self.handled: set[str] = set()  # pods the kubelet has taken on
        # Called on the emulator's loop with each new Job before its pod exists: what a
        # neighbour watching Jobs could do first (e.g. make a decoy pod).
        self.on_job: Callable[[str, dict[str, Any]], None] | None = None
        self.pull_seconds = 0.0  # between the Pulling and Pulled events
        # Pod Security admission's refusal of the Job's pod (the Job controller records it as an
        # Event on the Job, and makes no pod), e.g. 'violates PodSecurity "baseline:latest": ...'.
        self.refuse_pods: str | None = None
        # The node's kubelet refusing the pod before it runs: (reason, message), e.g. OutOfcpu.
        self.node_refuses: tuple[str, str] | None = None

    def start(self) -> "FakeKubelet":
        self.emu.spawn(self._loop())
        return self

    async def _loop(self) -> None:
        while True:
            try:
                await self._step()
            except Exception as e:  # noqa: BLE001 - a kubelet bug should show, not hang the test
                print(f"fake kubelet: {e!r}", file=sys.stderr)
            await asyncio.sleep(0.1)

    async def _step(self) -> None:
        jobs = self.emu.live(JOBS)
        pods = self.emu.live(PODS)
        for (ns, name), job in jobs.items():
            if (ns, name) not in self.jobs:
                if self.on_job:
                    self.on_job(ns, job)
                if self.refuse_pods:
                    self.emu.event(job, "FailedCreate", f'Error creating: pods "{name}-x7k2p" is forbidden: '
                                   f"{self.refuse_pods}", "Warning")
                    self.jobs[(ns, name)] = ""
                    continue
                self.jobs[(ns, name)] = self._create_pod(ns, name, job)
        for (ns, name), pod in list(self.jobs.items()):
            if (ns, name) not in jobs and (ns, pod) in pods:  # background propagation
                self.emu.delete(PODS, ns, pod)
        pods = self.emu.live(PODS)
        for pod_name, proc in list(self.agents.items()):
            if not any(name == pod_name for _, name in pods):
                del self.agents[pod_name]
                if self.stop_agent:
                    await asyncio.get_running_loop().run_in_executor(None, self.stop_agent, proc)
            elif proc.poll() is not None:
                del self.agents[pod_name]
                ns = next(ns for ns, name in pods if name == pod_name)
                self.emu.patch(PODS, ns, pod_name, {"status": {"phase": "Succeeded"}})
        for (ns, pod_name), pod in pods.items():
            if pod_name in self.jobs.values() and pod_name not in self.handled:
                self.handled.add(pod_name)
                await self._run_pod(ns, pod_name, pod)

    def _create_pod(self, ns: str, job: str, obj: dict[str, Any]) -> str:
        template = obj["spec"]["template"]
        name = f"{job}-x7k2p"
        self.emu.put("v1/pods", {"apiVersion": "v1", "kind": "Pod",
                                 "metadata": dict(job_pod_metadata(obj), name=name, namespace=ns),
                                 "spec": template["spec"], "status": {"phase": "Pending"}})
        return name

    async def _run_pod(self, ns: str, name: str, pod: dict[str, Any]) -> None:
        container = pod["spec"]["containers"][0]
        image = container["image"]
        base = {"name": container["name"], "image": image, "imageID": "", "restartCount": 0}
        if self.node_refuses:
            reason, message = self.node_refuses
            self.emu.patch(PODS, ns, name, {"status": {"phase": "Failed", "reason": reason, "message": message}})
            return
        self.emu.event(pod, "Pulling", f'Pulling image "{image}"')
        await asyncio.sleep(self.pull_seconds)
        if image == BAD_IMAGE:
            failure = f'failed to pull and unpack image "{BAD_IMAGE}": not found'
            self.emu.patch(PODS, ns, name, {"status": {"containerStatuses": [dict(base, ready=False, state={
                "waiting": {"reason": "ErrImagePull", "message": failure}})]}})
            self.emu.event(pod, "Failed", f'Failed to pull image "{image}": {failure}', "Warning")
            return
        self.emu.event(pod, "Pulled", f'Successfully pulled image "{image}" in {self.pull_seconds:g}s')
        if self.start_agent is None:
            return  # stays Pending
        self.started_args.append(container["args"])
        proc, line = await asyncio.get_running_loop().run_in_executor(None, self.start_agent, container["args"])
        self.agents[name] = proc
        self.emu.serve_log(ns, name, line)
        self.emu.patch(PODS, ns, name, {"status": {"phase": "Running", "podIP": "198.19.0.2", "containerStatuses": [
            dict(base, ready=True, containerID="containerd://" + "a" * 64,
                 state={"running": {"startedAt": "2026-01-01T00:00:00Z"}})]}})
        self.emu.event(pod, "Started", f"Started container {container['name']}")


def job_pod_metadata(job: dict[str, Any]) -> dict[str, Any]:
    """Labels, owner and UID as the Job controller gives its pods (name and namespace are the caller's)."""
    uid, name = job["metadata"]["uid"], job["metadata"]["name"]
    labels = dict(job["spec"]["template"]["metadata"]["labels"], **{
        "batch.kubernetes.io/job-name": name, "job-name": name,
        "batch.kubernetes.io/controller-uid": uid, "controller-uid": uid})
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid,
             "controller": True, "blockOwnerDeletion": True}
    return {"labels": labels, "ownerReferences": [owner], "uid": str(uuid.uuid4())}


def eventually(check: Callable[[], bool], timeout: float = 15) -> bool:
    """Whether check() comes true within timeout: the garbage collector works after the API answered."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class Api:
    """What a cluster-only test gets: the emulator, its namespace, a kubeconfig, and a CLI runner."""

    def __init__(self, emu: Emulator, netns: str, kubeconfig: str) -> None:
        self.emu, self.netns, self.kubeconfig = emu, netns, kubeconfig

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        """`mirrord-ns ARGS --kubeconfig K` run in the API's namespace."""
        return subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-m", "mirrord_tun",
                               *args[:1], "--kubeconfig", self.kubeconfig, *args[1:]],
                              capture_output=True, text=True, timeout=timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        return in_netns(f"/run/netns/{self.netns}", fn)


def without_sudo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `sudo ./scripts/test`, SUDO_UID would make mirrord-ns read the kubeconfig (in root's
    tmp_path) as that user; the tests that mean sudo set these variables themselves."""
    for var in [v for v in os.environ if v.startswith("SUDO_")]:
        monkeypatch.delenv(var)


@pytest.fixture
def api(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    without_sudo(monkeypatch)
    name = f"mrdk{os.urandom(3).hex()}"
    path = api_netns(name)
    emu = None
    try:
        emu = Emulator(path)
        emu.run(lambda: seed(emu, "c" * 64))
        yield Api(emu, name, emu.kubeconfig(str(tmp_path / "kubeconfig")))
    finally:
        if emu is not None:
            emu.close()
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def cgroup2_root() -> str | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            _, where, fstype = line.split()[:3]
            if fstype == "cgroup2":
                return where
    return None


@dataclass
class KubeCluster:
    sb: Sandbox
    emu: Emulator
    kubelet: FakeKubelet
    kubeconfig: str
    container_id: str
    agent_address: str = f"{NODE_UPLINK}:2222"

    def run(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        """`mirrord-ns run --kubeconfig K ARGS` from the laptop namespace."""
        return self.sb.exec("laptop", sys.executable, "-m", "mirrord_tun", "run", "--kubeconfig",
                            self.kubeconfig, *args, timeout=timeout)


@pytest.fixture
def kube_cluster(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                 request: pytest.FixtureRequest) -> Iterator[KubeCluster]:
    """The namespace sandbox as a one-node cluster: the pod "web" is a real process in the
    sandbox's pod namespace, in a cgroup named the way containerd names its containers, so
    the agent finds it from the container ID as it would on a node.

    Parametrized indirectly with a function that fills a directory, the process is chrooted
    into that directory (a static busybox in it) in a mount namespace of its own: a container
    with files of its own, e.g. the volumes a kubelet lays out."""
    without_sudo(monkeypatch)
    root = cgroup2_root()
    if root is None:
        pytest.skip("no cgroup2 mount to place the stand-in container in")
    sb = Sandbox()
    cgroup = emu = None
    try:
        sb.build()
        sb.start_services()
        cid = secrets.token_hex(32)
        cgroup = os.path.join(root, f"{sb.prefix}-cri-containerd-{cid}.scope")
        os.mkdir(cgroup)
        fill = getattr(request, "param", None)
        croot = _container_root(sb.dir, fill) if fill else None
        # Each step execs in place: the PID is the container's process.
        container = sb.start("pod", ["unshare", "-m", "chroot", str(croot), "/bin/busybox", "sleep", "infinity"]
                             if croot else ["sleep", "infinity"])
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(container.pid))
        if croot and not eventually(lambda: _root_inode(container.pid) == croot.stat().st_ino, 10):
            raise RuntimeError("the stand-in container did not chroot")
        emu = Emulator(sb.netns_path("laptop"))
        emu.run(lambda: seed(emu, cid))

        def start_agent(args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
            # The image's entrypoint is `mirrord-ns`; the args (`agent ...`) are the pod's own.
            p = sb.start("node", [sys.executable, "-m", "mirrord_tun", *args], stdout=subprocess.PIPE)
            assert p.stdout is not None
            line = p.stdout.readline().decode()
            if "listening" not in line:
                raise RuntimeError(f"agent did not start: {line!r}")
            return p, line

        kubelet = FakeKubelet(emu, start_agent, sb.stop).start()
        yield KubeCluster(sb, emu, kubelet, emu.kubeconfig(str(tmp_path / "kubeconfig")), cid)
    finally:
        if emu is not None:
            emu.close()
        sb.close()
        if cgroup is not None:
            os.rmdir(cgroup)


def _container_root(parent: str, fill: Callable[[Path], None]) -> Path:
    root = Path(tempfile.mkdtemp(prefix="container.", dir=parent))  # removed with the sandbox's folder
    root.chmod(0o755)
    (root / "bin").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    fill(root)
    return root


def _root_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/root").st_ino
    except OSError:
        return None
