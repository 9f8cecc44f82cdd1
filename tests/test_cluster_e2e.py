"""End to end against a real Kubernetes (tests/real_cluster.py: scripts/cluster's single
node, or the user's cluster): `mirrord-ns run --target pod|deploy|statefulset/...` with the
restricted user's kubeconfig, the agent image in the node's runtime, a real kubelet's
port-forward, real PodSecurity, RBAC and ValidatingAdmissionPolicy. Workloads are busybox
(httpd with a CGI that answers with the client's address) made by the admin kubeconfig in
a namespace of this module's own."""
from __future__ import annotations

import base64
import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from mirrord_tun.agent.server import DEFAULT_RESUME_TIMEOUT as RESUME_TIMEOUT
from mirrord_tun.kube import manifest
from real_cluster import (ROOT, RUN_DIR, SESSION_TIMEOUT, RealCluster, agents_left,  # noqa: F401
                          delete_namespace, eventually, new_namespace, real_cluster, wait_ready)

# busybox httpd listens on IPv6 and names an IPv4 client [::ffff:a.b.c.d]: the CGI unwraps it.
# Under /etc: a volume's mount point is made here by shadowing its parent, never / itself.
CONFIG_DIR = "/etc/mrd-e2e"
SERVE = r"""
mkdir -p /tmp/www/cgi-bin
cat >/tmp/www/cgi-bin/ip <<'EOF'
#!/bin/sh
addr=${REMOTE_ADDR#[}; addr=${addr%]}; addr=${addr#::ffff:}
printf 'Content-Type: text/plain\r\n\r\nyou are %s\n' "$addr"
EOF
chmod +x /tmp/www/cgi-bin/ip
echo "hello from $1" >/tmp/www/index.html
exec httpd -f -p 8080 -h /tmp/www
"""


def workloads(image: str) -> str:
    """echo (a Service answering with the caller's address), pod/web with env references and
    a ConfigMap volume, deploy/api, statefulset/db, and a client pod to call them from."""
    container = {"image": image, "imagePullPolicy": "IfNotPresent", "command": ["sh", "/scripts/serve.sh"],
                 "volumeMounts": [{"name": "scripts", "mountPath": "/scripts"}],
                 "ports": [{"containerPort": 8080}]}
    scripts = {"name": "scripts", "configMap": {"name": "scripts"}}

    def pod_spec(name: str, **more: object) -> dict:
        c = {**container, "name": "app", "args": [name], **more}
        volumes = [scripts] + ([{"name": "cfg", "configMap": {"name": "cfg"}}] if "env" in more else [])
        return {"containers": [c], "volumes": volumes, "terminationGracePeriodSeconds": 1}

    env = {"env": [
        {"name": "LITERAL", "value": "hello"},
        {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
        {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "token"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "volumeMounts": [{"name": "scripts", "mountPath": "/scripts"},
                         {"name": "cfg", "mountPath": CONFIG_DIR}]}

    def workload(kind: str, name: str, **spec: object) -> dict:
        template = {"metadata": {"labels": {"app": name}}, "spec": pod_spec(name)}
        return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": template, **spec}}

    def service(name: str) -> dict:
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                "spec": {"selector": {"app": name}, "ports": [{"port": 8080, "targetPort": 8080}],
                         "ipFamilyPolicy": "PreferDualStack"}}

    docs = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "scripts"}, "data": {"serve.sh": SERVE}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"greeting": "v1"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec"}, "stringData": {"token": "s3cret"}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "web"}},
         "spec": pod_spec("web", **env)},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "labels": {"app": "client"}},
         "spec": {"containers": [{"name": "client", "image": image, "imagePullPolicy": "IfNotPresent",
                                  "command": ["sleep", "3600"]}], "terminationGracePeriodSeconds": 1}},
        workload("Deployment", "echo"), workload("Deployment", "api"),
        workload("StatefulSet", "db", serviceName="db"),
        service("echo"), service("web"), service("db"),
    ]
    return yaml.safe_dump_all(docs)


@pytest.fixture(scope="module")
def ns(real_cluster: RealCluster) -> Iterator[str]:
    k = real_cluster
    name = new_namespace(k)
    try:
        k.kubectl("apply", "-n", name, "-f", "-", input=workloads(k.testapp_image))
        wait_ready(k, name, "app in (web,client,echo,api,db)")
        yield name
    finally:
        delete_namespace(k, name)


def pod_ip(k: RealCluster, ns: str, selector: str) -> str:
    [pod] = k.json("get", "pods", "-n", ns, "-l", selector)["items"]
    return pod["status"]["podIP"]


def run(k: RealCluster, ns: str, target: str, script: str, *opts: str) -> subprocess.CompletedProcess[str]:
    return k.mrd("run", "-n", ns, "-t", target, *opts, "--", "sh", "-c", script)


def assert_no_agent_left(k: RealCluster, ns: str) -> None:
    # run deletes the Job (and so its pod) on the way out; the pod's deletion takes its
    # grace period (terminationGracePeriodSeconds 10).
    assert eventually(lambda: not agents_left(k, ns), timeout=60), agents_left(k, ns)


CALL_ECHO = ("curl -s --max-time 20 http://echo:8080/cgi-bin/ip; "
             "curl -s --max-time 20 http://echo.{ns}.svc.cluster.local:8080/cgi-bin/ip")


@pytest.mark.parametrize("target,selector", [("pod/web", "app=web"), ("deploy/api", "app=api"),
                                             ("statefulset/db", "app=db")])
def test_target_reaches_a_service_by_name_as_the_pod(real_cluster: RealCluster, ns: str, target: str,
                                                      selector: str) -> None:
    k = real_cluster
    r = run(k, ns, target, CALL_ECHO.format(ns=ns))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr  # the client's port-forward thread, hung up on carelessly, printed one
    # Both names resolved by the pod's resolver (search path, then FQDN); the Service's pod
    # saw the target pod's own address.
    assert r.stdout.split("\n")[:2] == [f"you are {pod_ip(k, ns, selector)}"] * 2, (r.stdout, r.stderr)
    assert_no_agent_left(k, ns)


def test_ipv6_through_a_dual_stack_pod(real_cluster: RealCluster, ns: str) -> None:
    k = real_cluster
    ips = [a["ip"] for a in k.json("get", "pod", "web", "-n", ns)["status"].get("podIPs", [])]
    ipv6 = [ip for ip in ips if ":" in ip]
    if not ipv6:
        pytest.skip("the cluster is IPv4 only")
    # --privileged: an unprivileged agent cannot forward IPv6 (/proc/sys is read-only in its
    # container; `run` says so in one line and goes on IPv4 only).
    r = run(k, ns, "pod/web", "curl -s -6 --max-time 20 http://echo:8080/cgi-bin/ip", "--privileged")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"you are {ipv6[0]}", (r.stdout, r.stderr)


def test_a_quiet_session_that_works_says_nothing(real_cluster: RealCluster, ns: str) -> None:
    # -q is "errors only": pod/web's IPv6 (off without --privileged) and its volume at /scripts
    # (never placed) were said anyway, and each of its mounts' sshfs said "read: Interrupted
    # system call" as the session ended.
    k = real_cluster
    r = run(k, ns, "pod/web", f"cat {CONFIG_DIR}/greeting", "-q")
    assert (r.returncode, r.stdout, r.stderr) == (0, "v1", "")


def test_env_from_configmap_secret_and_fieldref(real_cluster: RealCluster, ns: str) -> None:
    k = real_cluster
    r = run(k, ns, "pod/web", 'echo "env:$LITERAL:$FROM_CM:$FROM_SECRET:$POD_NAME"')
    assert r.returncode == 0, r.stderr
    assert "env:hello:v1:s3cret:web" in r.stdout


def test_ls_and_env(real_cluster: RealCluster, ns: str) -> None:
    k = real_cluster
    r = k.mrd("ls", "-n", ns)
    assert r.returncode == 0, r.stderr
    listed = set(r.stdout.split())
    assert {"pod/web", "deploy/api", "statefulset/db"} <= listed, r.stdout
    r = k.mrd("env", "-n", ns, "-t", "deploy/api")
    assert r.returncode == 0, r.stderr
    r = k.mrd("env", "-n", ns, "-t", "pod/web")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^FROM_SECRET=['\"]?s3cret['\"]?$", r.stdout, re.M), r.stdout


def test_a_host_network_pod_is_refused_in_one_line_and_not_listed(real_cluster: RealCluster, ns: str) -> None:
    """Its network namespace is the node's (here: this machine's own); a session must put nothing there."""
    k = real_cluster
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "node-wide", "labels": {"app": "node-wide"}},
           "spec": {"hostNetwork": True, "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "c", "image": k.testapp_image, "command": ["sleep", "3600"],
                                    "imagePullPolicy": "IfNotPresent"}]}}
    k.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(pod))
    wait_ready(k, ns, "app=node-wide")
    r = run(k, ns, "pod/node-wide", "true")
    assert (r.returncode, r.stderr.strip().splitlines()) == (2, [
        "mirrord-ns: pod/node-wide shares its node's network (hostNetwork: true): a session would change the "
        "node's own routing and firewall, so mirrord-ns does not target it"]), r.stderr
    listed = k.mrd("ls", "-n", ns)
    assert "pod/web" in listed.stdout.split() and "pod/node-wide" not in listed.stdout.split(), listed.stdout
    assert agents_left(k, ns) == []


@contextlib.contextmanager
def session(k: RealCluster, ns: str, target: str, script: str, *opts: str,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """`run` with a command that prints "started" once it is up, then keeps going."""
    argv = k.mrd_argv("run", "-n", ns, "-t", target, *opts, "--", "sh", "-c", script)
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=None if env is None else dict(os.environ, **env))
    try:
        assert p.stdout is not None
        for line in p.stdout:  # a server's own banner may come first
            if line == "started\n":
                break
        else:
            raise AssertionError(f"no session: {p.stderr.read() if p.stderr else ''}")
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        p.communicate(timeout=30)


def client_get(k: RealCluster, ns: str, path: str, *headers: str) -> str:
    """The body of GET path from the client pod to the web Service's ClusterIP. With nc: a
    static busybox's wget crashes here writing to stdout, and its name lookups need NSS."""
    ip = k.kubectl("get", "service", "web", "-n", ns, "-o", "jsonpath={.spec.clusterIP}").stdout
    request = "".join(f"{line}\r\n" for line in (f"GET {path} HTTP/1.1", "Host: web", "Connection: close",
                                                  *headers, ""))
    r = k.kubectl("exec", "-n", ns, "client", "--", "sh", "-c", f'printf "%s" "$1" | nc -w 10 {ip} 8080',
                  "sh", request, check=False)
    return r.stdout.replace("\r\n", "\n").partition("\n\n")[2]  # text mode may have done it already


@pytest.fixture
def local_server() -> Iterator[str]:
    """The command of a `run` that serves "stolen" on port 8080, from a folder removed afterwards
    (the command runs here, as the user behind sudo: the folder is readable by all)."""
    www = Path(tempfile.mkdtemp(prefix="mrd-e2e-www-"))
    try:
        www.chmod(0o755)
        (www / "index.html").write_text("stolen\n")
        (www / "index.html").chmod(0o644)
        yield f"(busybox httpd -f -p 8080 -h {www} &) && sleep 1 && echo started && exec sleep 300"
    finally:
        shutil.rmtree(www)


def test_steal_from_a_client_in_another_pod(real_cluster: RealCluster, ns: str, local_server: str) -> None:
    k = real_cluster
    with session(k, ns, "pod/web", local_server, "--steal", "--port", "8080"):
        assert eventually(lambda: client_get(k, ns, "/") == "stolen\n", timeout=60)
    assert eventually(lambda: client_get(k, ns, "/") == "hello from web\n", timeout=60)
    assert_no_agent_left(k, ns)


def test_a_second_runs_steal_of_the_port_is_refused(real_cluster: RealCluster, ns: str, local_server: str) -> None:
    # Each run has an agent of its own: the second one's steal silently took the port.
    k = real_cluster
    with session(k, ns, "pod/web", local_server, "--steal", "--port", "8080", "-q"):
        assert eventually(lambda: client_get(k, ns, "/") == "stolen\n", timeout=60)
        r = run(k, ns, "pod/web", "echo ran", "--steal", "--port", "8080", "-q")
        assert (r.returncode, r.stdout) == (2, ""), r.stderr
        assert len(r.stderr.splitlines()) == 1 and "of another agent" in r.stderr, r.stderr
        assert client_get(k, ns, "/") == "stolen\n"
    assert_no_agent_left(k, ns)


def test_header_filtered_steal(real_cluster: RealCluster, ns: str, local_server: str) -> None:
    k = real_cluster
    with session(k, ns, "pod/web", local_server, "--steal", "--port", "8080",
                 "--http-header-filter", "^x-mrd-e2e: yes$"):
        assert eventually(lambda: client_get(k, ns, "/", "X-Mrd-E2e: yes") == "stolen\n",
                          timeout=60)
        assert client_get(k, ns, "/") == "hello from web\n"


def test_mirror_sees_the_other_pods_request(real_cluster: RealCluster, ns: str) -> None:
    k = real_cluster
    client_ip = pod_ip(k, ns, "app=client")
    server = "python3 -u -m http.server 8080 --directory /tmp 2>&1 & sleep 1; echo started; wait"
    with session(k, ns, "pod/web", server, "--port", "8080") as p:
        # The pod still answers; the local copy of the server sees the same request.
        assert eventually(lambda: client_get(k, ns, "/?mirror-probe") == "hello from web\n")
        seen = eventually(lambda: _line_with(p, "mirror-probe"), timeout=60)
    assert seen and seen.startswith(client_ip), seen


def _line_with(p: subprocess.Popen[str], word: str) -> str:
    assert p.stdout is not None
    while select.select([p.stdout], [], [], 2)[0]:
        line = p.stdout.readline()
        if word in line:
            return line
        if not line:
            break
    return ""


def test_mount_of_a_configmap_volume_with_live_update(real_cluster: RealCluster, ns: str) -> None:
    k = real_cluster
    script = (f'cat {CONFIG_DIR}/greeting; echo; echo started; '
              f'i=0; while ! grep -q v2 {CONFIG_DIR}/greeting && [ $i -lt 150 ]; do sleep 1; i=$((i+1)); done; '
              f'cat {CONFIG_DIR}/greeting; echo')
    with session(k, ns, "pod/web", script) as p:
        k.kubectl("patch", "configmap", "cfg", "-n", ns, "-p", '{"data": {"greeting": "v2"}}')
        out, _ = p.communicate(timeout=200)
    k.kubectl("patch", "configmap", "cfg", "-n", ns, "-p", '{"data": {"greeting": "v1"}}')
    assert out.strip().endswith("v2"), out


def test_ctrl_c_deletes_the_agent(real_cluster: RealCluster, ns: str) -> None:
    k = real_cluster
    with session(k, ns, "pod/web", "echo started; exec sleep 300") as p:
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 130
    assert_no_agent_left(k, ns)


def test_podsecurity_restricted_namespace_is_one_line_with_its_fix(real_cluster: RealCluster) -> None:
    k = real_cluster
    name = new_namespace(k, {"pod-security.kubernetes.io/enforce": "restricted"})
    try:
        restricted = {"runAsNonRoot": True, "runAsUser": 65534, "allowPrivilegeEscalation": False,
                      "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app", "labels": {"app": "app"}},
               "spec": {"containers": [{"name": "app", "image": k.testapp_image, "command": ["sleep", "3600"],
                                        "imagePullPolicy": "IfNotPresent", "securityContext": restricted}],
                        "terminationGracePeriodSeconds": 1}}
        k.kubectl("apply", "-n", name, "-f", "-", input=yaml.safe_dump(pod))
        wait_ready(k, name, "app=app")
        r = run(k, name, "pod/app", "true")
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "PodSecurity" in lines[0] and "pod-security.kubernetes.io/enforce=privileged" in lines[0], lines
        assert_no_agent_left(k, name)
    finally:
        delete_namespace(k, name)


def policy_for(image: str) -> str:
    text = (ROOT / "deploy" / "admission-policy.yaml").read_text()
    return text.replace("'ghcr.io/mirrord-ns/agent:0.1.0'", f"'{image}'")


def agent_pod_as_run_makes_it(k: RealCluster, ns: str) -> dict:
    r = run(k, ns, "pod/web", "true", "--dry-run")
    assert r.returncode == 0, r.stderr
    [job] = [d for d in yaml.safe_load_all(r.stdout) if d and d.get("kind") == "Job"]
    template = job["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "agent-shaped", "labels": template["metadata"]["labels"]},
            "spec": template["spec"]}


def test_admission_policy_admits_the_agent_and_refuses_a_tampered_one(real_cluster: RealCluster,
                                                                      ns: str) -> None:
    k = real_cluster
    k.kubectl("apply", "-f", "-", input=policy_for(k.agent_image))
    k.kubectl("label", "namespace", ns, "mirrord-ns/agents=allowed")
    try:
        pod = agent_pod_as_run_makes_it(k, ns)
        tampered = yaml.safe_load(yaml.safe_dump(pod))
        tampered["spec"]["containers"][0]["args"].append("--debug-shell")

        def refused() -> str:
            r = k.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=yaml.safe_dump(tampered),
                          check=False)
            return r.stderr if r.returncode != 0 else ""
        # The policy takes effect a moment after it is created.
        assert "ValidatingAdmissionPolicy" in str(eventually(refused, timeout=60)), refused()
        r = k.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=yaml.safe_dump(pod), check=False)
        assert r.returncode == 0, r.stderr
        # And a real session, its agent admitted by the real API server.
        r = run(k, ns, "pod/web", CALL_ECHO.format(ns=ns))
        assert r.returncode == 0, r.stderr
        assert f"you are {pod_ip(k, ns, 'app=web')}" in r.stdout
    finally:
        k.kubectl("label", "namespace", ns, "mirrord-ns/agents-", check=False)
        k.kubectl("delete", "-f", "-", "--ignore-not-found", input=policy_for(k.agent_image), check=False)


def test_kill_9_of_run_leaves_no_agent_after_the_grace(real_cluster: RealCluster, ns: str,
                                                        tmp_path: Path) -> None:
    k = real_cluster
    spool = tmp_path / "tmp"  # where run's temporary files would go: the kubeconfig's key must not
    spool.mkdir()
    with session(k, ns, "pod/web", "echo started; exec sleep 600", env={"TMPDIR": str(spool)}) as p:
        assert agents_left(k, ns)
        p.kill()  # no cleanup by run at all: the agent's idle exit and the Job's TTL must do it
        p.wait(10)
    assert not list(spool.iterdir())
    # The documented bound: the agent keeps the session for run to resume (grace), exits
    # --idle-exit later, and the finished Job goes after ttlSecondsAfterFinished.
    bound = RESUME_TIMEOUT + manifest.IDLE_EXIT + manifest.TTL_AFTER_FINISHED + 60
    assert eventually(lambda: not agents_left(k, ns), timeout=bound, step=5), agents_left(k, ns)


def _user_kubeconfig(k: RealCluster, user: str, path: Path) -> None:
    """A kubeconfig for a new user whose certificate the cluster's own signer issued (the
    CertificateSigningRequest API, so it works on any cluster whose admin we are)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)])).sign(key, hashes.SHA256())
    request = {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
               "metadata": {"name": user},
               "spec": {"request": base64.b64encode(csr.public_bytes(serialization.Encoding.PEM)).decode(),
                        "signerName": "kubernetes.io/kube-apiserver-client", "usages": ["client auth"]}}
    k.kubectl("apply", "-f", "-", input=yaml.safe_dump(request))
    try:
        k.kubectl("certificate", "approve", user)
        cert = eventually(lambda: k.json("get", "csr", user).get("status", {}).get("certificate"), timeout=60)
        assert cert, "the cluster's signer issued no certificate (kube-controller-manager --cluster-signing-*)"
    finally:
        k.kubectl("delete", "csr", user, "--ignore-not-found", check=False)
    config = yaml.safe_load(Path(k.admin_kubeconfig).read_text())
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    cluster = next(c for c in config["clusters"] if c["name"] == context["context"]["cluster"])
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "clusters": [cluster],
        "users": [{"name": user, "user": {"client-certificate-data": cert,
                                          "client-key-data": base64.b64encode(key_pem).decode()}}],
        "contexts": [{"name": user, "context": {"cluster": cluster["name"], "user": user}}],
        "current-context": user}))


def test_a_role_missing_a_verb_gives_one_line_naming_it(real_cluster: RealCluster, ns: str,
                                                        tmp_path: Path) -> None:
    k = real_cluster
    user = f"mrd-e2e-noverb-{ns[-8:]}"
    [user_role] = [d for d in yaml.safe_load_all((ROOT / "deploy" / "rbac.yaml").read_text())
                   if d["metadata"]["name"] == "mirrord-ns-user"]
    rules = user_role["rules"]
    # Everything deploy/rbac.yaml grants but reading pods/log (where the agent's host key is).
    rules = [r for r in rules if r["resources"] != ["pods/log"]]
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": user},
            "rules": rules}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": user},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": user}}
    k.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all([role, binding]))
    kubeconfig = tmp_path / "kubeconfig"
    _user_kubeconfig(k, user, kubeconfig)
    r = subprocess.run(k.mrd_argv("run", "-n", ns, "-t", "pod/web", "--no-env", "--", "true",
                                  kubeconfig=str(kubeconfig)), capture_output=True, text=True, timeout=SESSION_TIMEOUT)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "forbidden" in lines[0] and "pods/log" in lines[0], r.stderr
    assert_no_agent_left(k, ns)


@pytest.mark.skipif(not (RUN_DIR / "pid" / "kubelet.pid").exists() and bool(os.environ.get(
    "MIRRORD_NS_E2E_KUBECONFIG")), reason="cuts the port-forward by restarting scripts/cluster's kubelet")
def test_reconnects_after_the_port_forward_is_cut(real_cluster: RealCluster, ns: str) -> None:
    k = real_cluster
    # Ask the echo Service once a second; the kubelet (which carries the port-forward) is
    # killed and started again meanwhile.
    script = ("echo started; i=0; while [ $i -lt 40 ]; do "
              "curl -s --max-time 5 http://echo:8080/cgi-bin/ip || echo failed; sleep 1; i=$((i+1)); done")
    with session(k, ns, "pod/web", script, "-v") as p:
        kubelet = int((RUN_DIR / "pid" / "kubelet.pid").read_text())
        os.kill(kubelet, signal.SIGKILL)
        assert eventually(lambda: not Path(f"/proc/{kubelet}").exists(), timeout=30)
        subprocess.run([str(ROOT / "scripts" / "cluster"), "up"], check=True, capture_output=True, timeout=300)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert out.strip().splitlines()[-1] == f"you are {pod_ip(k, ns, 'app=web')}", (out, err)
    assert "reconnect" in err.lower() or "resum" in err.lower(), err


def test_deleting_the_target_pod_ends_the_session_in_one_line(real_cluster: RealCluster, ns: str) -> None:
    # The agent holds the pod's network namespace, which outlived the pod: run went on, its
    # command's connections timing out, and nothing said why (agent/podwatch.py).
    k = real_cluster
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "doomed", "labels": {"app": "doomed"}},
           "spec": {"containers": [{"name": "app", "image": k.testapp_image, "imagePullPolicy": "IfNotPresent",
                                    "command": ["sleep", "3600"]}], "terminationGracePeriodSeconds": 1}}
    k.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(pod))
    wait_ready(k, ns, "app=doomed")
    with session(k, ns, "pod/doomed", "echo started; exec sleep 300", "-q") as p:
        k.kubectl("delete", "pod", "doomed", "-n", ns, "--wait=false")
        _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "the pod's network is gone" in err, err
    assert_no_agent_left(k, ns)
