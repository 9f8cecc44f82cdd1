"""kubeconfig as kubectl reads it, turned into an API client.

Files: `--kubeconfig FILE`, else every file of `KUBECONFIG` (missing ones skipped),
else ~/.kube/config of the user behind sudo. Merging follows kubectl: contexts,
clusters and users by name, the first file to define a name wins; the first file
that sets a non-empty current-context sets it; a relative path inside a file is
relative to that file's folder. The client's own `KubeConfigMerger` is not used:
it lets the *last* file's current-context win, and it opens the files (and later
the certificate and key files they name) with root's rights under sudo.

Everything the chosen context refers to is resolved here, through `asuser`, before
the client sees it: the files it names are read with the user's rights and passed
inline (`*-data`, `token`), and an exec credential plugin is run as the user, its
token handed to the client (and fetched again when it expires). The client is then
left nothing to open or run.
"""
from __future__ import annotations

import base64
import datetime
import errno
import json
import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from mirrord_tun.kube.asuser import Principal, principal, sudo_environment
from mirrord_tun.kube.errors import KubeError

log = logging.getLogger("mirrord-ns")
ITEMS = ("clusters", "contexts", "users")
# kubeconfig keys naming a file -> the key holding the same content inline (base64 but for tokens).
FILE_KEYS = {"certificate-authority": "certificate-authority-data", "client-certificate": "client-certificate-data",
             "client-key": "client-key-data", "tokenFile": "token"}
# The client takes the CA, certificate and key as files, and writes inline data to /tmp files
# that only its atexit removes: a kill -9 would leave the user's key behind. Each goes to a memfd
# instead, named by its /proc/self/fd path (a file to the client and to OpenSSL), which goes with
# the process however it ends.
IN_MEMORY = {"certificate-authority-data": "certificate-authority", "client-certificate-data": "client-certificate",
             "client-key-data": "client-key"}
_memfds: dict[bytes, str] = {}  # content -> path, kept open for the process (the client reopens on reconnect)
EXPIRY_SKEW = datetime.timedelta(seconds=30)  # fetch a new token this long before the old one expires
PLUGIN_TIMEOUT = 120  # a plugin that is not asking the user anything


@dataclass
class KubeConfig:
    files: list[str]  # the files read, in order
    items: dict[str, dict[str, tuple[dict[str, Any], str]]]  # clusters/contexts/users: name -> (item, its folder)
    current: str | None
    who: Principal = field(repr=False)

    def context(self, name: str | None) -> tuple[str, dict[str, Any]]:
        name = name or self.current
        if not name:
            raise KubeError(f"no current context in {self._where()} (give --context)")
        if name not in self.items["contexts"]:
            raise KubeError(f"no context {name!r} in {self._where()}")
        return name, _mapping(self.items["contexts"][name][0].get("context"), f"context {name!r}")

    def _where(self) -> str:
        return ", ".join(self.files)


def paths(explicit: str | None, who: Principal) -> tuple[list[str], bool]:
    """The kubeconfig files to read, and whether each one must exist (kubectl skips missing
    KUBECONFIG entries but not an explicit file)."""
    if explicit:
        return [explicit], True
    listed = os.environ.get("KUBECONFIG", "")
    if listed:
        return list(dict.fromkeys(user_path(who, "", p) for p in listed.split(os.pathsep) if p)), False
    default = os.path.join(who.user.home if who.user else os.path.expanduser("~"), ".kube", "config")
    # sudo's env_reset drops KUBECONFIG; the environment sudo itself was started with shows it.
    dropped = (sudo_environment() or {}).get("KUBECONFIG") if os.geteuid() == 0 else None
    if dropped:
        log.warning("sudo dropped KUBECONFIG=%s; using %s (keep it with sudo --preserve-env=KUBECONFIG)",
                    dropped, default)
    return [default], True


def load(explicit: str | None) -> KubeConfig:
    who = principal()
    files, required = paths(explicit, who)
    try:
        contents = who.read(files)
    except OSError as e:
        raise KubeError(str(e)) from None
    read: list[str] = []
    items: dict[str, dict[str, tuple[dict[str, Any], str]]] = {kind: {} for kind in ITEMS}
    current = None
    for path in files:
        content = contents[path]
        if isinstance(content, OSError):
            if content.errno != errno.ENOENT:
                raise KubeError(f"cannot read kubeconfig {path}: {content.strerror}")
            if required:
                raise KubeError(f"no kubeconfig at {path} (give --kubeconfig or set KUBECONFIG)")
            continue
        read.append(path)
        doc = _parse(path, content)
        base = os.path.dirname(os.path.abspath(path))
        for kind in ITEMS:
            for item in doc.get(kind) or []:
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    items[kind].setdefault(item["name"], (item, base))
        current = current or doc.get("current-context") or None
    if not read:
        raise KubeError(f"no kubeconfig: none of {', '.join(files)} exists (give --kubeconfig or set KUBECONFIG)")
    return KubeConfig(read, items, current, who)


def _parse(path: str, content: bytes) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(content)
    except yaml.YAMLError as e:
        where = f" (line {e.problem_mark.line + 1})" if getattr(e, "problem_mark", None) else ""
        raise KubeError(f"kubeconfig {path} is not valid YAML{where}") from None
    if doc is None:
        return {}  # kubectl accepts an empty file
    if not isinstance(doc, dict):
        raise KubeError(f"kubeconfig {path} is not a kubeconfig (not a mapping)")
    return doc


def api_client(cfg: KubeConfig, context: str | None) -> tuple[client.ApiClient, str | None]:
    """An API client for the context, and the context's namespace."""
    name, ctx = cfg.context(context)
    cluster_name, user_name = ctx.get("cluster"), ctx.get("user")
    if cluster_name not in cfg.items["clusters"]:
        raise KubeError(f"context {name!r} names cluster {cluster_name!r}, which no kubeconfig file defines")
    cluster_item, cluster_base = cfg.items["clusters"][cluster_name]
    cluster = _inline(cfg.who, _mapping(cluster_item.get("cluster"), f"cluster {cluster_name!r}"), cluster_base)
    user: dict[str, Any] = {}
    plugin: _Plugin | None = None
    if user_name:
        if user_name not in cfg.items["users"]:
            raise KubeError(f"context {name!r} names user {user_name!r}, which no kubeconfig file defines")
        user_item, user_base = cfg.items["users"][user_name]
        user = _inline(cfg.who, _mapping(user_item.get("user"), f"user {user_name!r}"), user_base)
        _refuse_root_auth_provider(cfg.who, user)
        if "exec" in user:
            plugin = _Plugin(cfg.who, user.pop("exec"), cluster, user_base)
            user.update(plugin.credentials())
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": name,
           "clusters": [{"name": "c", "cluster": _in_memory(cluster)}],
           "users": [{"name": "u", "user": _in_memory(user)}],
           "contexts": [{"name": name, "context": {"cluster": "c", "user": "u"}}]}
    try:
        api = config.new_client_from_config_dict(doc, context=name, persist_config=False)
    except (ConfigException, OSError, ValueError) as e:
        raise KubeError(f"cannot use context {name!r}: {e}") from None
    if plugin is not None and plugin.expiry is not None:
        api.configuration.refresh_api_key_hook = plugin.refresh
    return api, ctx.get("namespace") or None


def _mapping(value: Any, what: str) -> dict[str, Any]:
    """A copy of a kubeconfig entry's body, which must be a mapping (or absent)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise KubeError(f"kubeconfig: {what} is not a mapping")
    return dict(value)


def _inline(who: Principal, obj: dict[str, Any], base: str) -> dict[str, Any]:
    """obj with each file it names (kept only when no inline value is given, as kubectl does)
    replaced by the file's content, read as the user."""
    wanted = {key: user_path(who, base, obj[key]) for key in FILE_KEYS
              if isinstance(obj.get(key), str) and obj[key] and not obj.get(FILE_KEYS[key])}
    if not wanted:
        return obj
    try:
        contents = who.read(sorted(set(wanted.values())))
    except OSError as e:
        raise KubeError(str(e)) from None
    for key, path in wanted.items():
        content = contents[path]
        if isinstance(content, OSError):
            raise KubeError(f"cannot read {key} {path}: {content.strerror}")
        del obj[key]
        obj[FILE_KEYS[key]] = (content.decode(errors="replace").strip() if key == "tokenFile"
                               else base64.b64encode(content).decode())
    return obj


def _in_memory(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of a cluster or user entry whose inline CA, certificate and key are memfd files
    (and an oidc auth-provider's CA, which the client would write to /tmp on refresh)."""
    obj = dict(obj)
    for data_key, file_key in IN_MEMORY.items():
        if obj.get(data_key):
            obj[file_key] = _memfd(obj.pop(data_key), data_key)
    provider = obj.get("auth-provider")
    if isinstance(provider, dict) and isinstance(provider.get("config"), dict) \
            and provider["config"].get("idp-certificate-authority-data"):
        cfg = dict(provider["config"])
        cfg["idp-certificate-authority"] = _memfd(cfg.pop("idp-certificate-authority-data"),
                                                  "idp-certificate-authority-data")
        obj["auth-provider"] = dict(provider, config=cfg)
    return obj


def _memfd(data: Any, key: str) -> str:
    try:
        content = base64.b64decode(str(data))
    except ValueError:
        raise KubeError(f"kubeconfig: {key} is not base64") from None
    path = _memfds.get(content)
    if path is None:
        fd = os.memfd_create("mirrord-ns-kube", os.MFD_CLOEXEC)
        with open(fd, "wb", closefd=False) as f:
            f.write(content)
        path = _memfds[content] = f"/proc/self/fd/{fd}"
    return path


def user_path(who: Principal, base: str, path: str) -> str:
    """A path from a kubeconfig: `~` is the user's home (not root's under sudo), relative is to base."""
    if path == "~" or path.startswith("~/"):
        path = (who.env.get("HOME") or os.path.expanduser("~")) + path[1:]
    return os.path.join(base, path)


def _refuse_root_auth_provider(who: Principal, user: dict[str, Any]) -> None:
    """The client runs auth-provider commands and Google's default credentials itself, as us:
    under sudo that would be root's, so only the exec plugins (which we run as the user) go."""
    provider = user.get("auth-provider")
    if who.user is None or not isinstance(provider, dict):
        return
    if provider.get("name") != "oidc" or "cmd-path" in (provider.get("config") or {}):
        raise KubeError(f"auth-provider {provider.get('name')!r} would run as root under sudo; use its exec "
                        "credential plugin (e.g. gke-gcloud-auth-plugin) or run without sudo")
    cfg = provider.get("config") or {}
    if cfg.get("idp-certificate-authority"):
        raise KubeError("auth-provider oidc: idp-certificate-authority is a file root would read under sudo; "
                        "use idp-certificate-authority-data")


class _Plugin:
    """An exec credential plugin (client.authentication.k8s.io), run as the user."""

    def __init__(self, who: Principal, spec: Any, cluster: dict[str, Any], base: str) -> None:
        if not isinstance(spec, dict) or not spec.get("command") or not spec.get("apiVersion"):
            raise KubeError("kubeconfig: users[].user.exec needs command and apiVersion")
        self.who, self.spec, self.cluster = who, spec, cluster
        command = str(spec["command"])
        if os.sep in command:  # else looked up in PATH; as client-go, relative to the kubeconfig's folder
            command = user_path(who, base, command)
        self.argv = [command, *map(str, spec.get("args") or [])]
        self.expiry: datetime.datetime | None = None
        self._token: str | None = None
        self._lock = threading.Lock()

    def credentials(self) -> dict[str, str]:
        """The user entry's new credentials: a token, or a client certificate and key."""
        status = self._run()
        if status.get("token"):
            self._token = status["token"]
            return {"token": status["token"]}
        if status.get("clientCertificateData") and status.get("clientKeyData"):
            self.expiry = None  # the client reads certificates once; a new one needs a new session
            return {"client-certificate-data": _b64(status["clientCertificateData"]),
                    "client-key-data": _b64(status["clientKeyData"])}
        raise KubeError(f"credential plugin {self._name()} gave neither a token nor a client certificate")

    def refresh(self, configuration: client.Configuration) -> None:
        """The client's refresh_api_key_hook, called before each request."""
        with self._lock:
            if self.expiry is not None and datetime.datetime.now(datetime.timezone.utc) >= self.expiry - EXPIRY_SKEW:
                self.credentials()
            configuration.api_key["BearerToken"] = f"Bearer {self._token}"

    def _run(self) -> dict[str, Any]:
        mode = self.spec.get("interactiveMode") or "IfAvailable"
        interactive = mode != "Never" and sys.stdin.isatty()
        if mode == "Always" and not interactive:
            raise KubeError(f"credential plugin {self._name()} needs a terminal (interactiveMode: Always)")
        info: dict[str, Any] = {"apiVersion": self.spec["apiVersion"], "kind": "ExecCredential",
                                "spec": {"interactive": interactive}}
        if self.spec.get("provideClusterInfo"):
            info["spec"]["cluster"] = _cluster_info(self.cluster)
        env = dict(self.who.env, KUBERNETES_EXEC_INFO=json.dumps(info))
        env.update({str(e["name"]): str(e["value"]) for e in self.spec.get("env") or []
                    if isinstance(e, dict) and "name" in e and "value" in e})
        try:
            # stderr is the plugin's own word to the user (a login prompt, its error), as with kubectl.
            proc = self.who.run(self.argv, env, stdin=None if interactive else subprocess.DEVNULL,
                                timeout=None if interactive else PLUGIN_TIMEOUT)
        except FileNotFoundError:
            hint = self.spec.get("installHint")
            raise KubeError(f"credential plugin {self._name()} not found"
                            + (f": {' '.join(str(hint).split())}" if hint else "")) from None
        except OSError as e:
            raise KubeError(f"cannot run credential plugin {self._name()}: {e.strerror}") from None
        except subprocess.TimeoutExpired:
            raise KubeError(f"credential plugin {self._name()} gave no answer in {PLUGIN_TIMEOUT} s") from None
        if proc.returncode != 0:
            raise KubeError(f"credential plugin {self._name()} failed (exit status {proc.returncode})")
        try:
            answer = json.loads(proc.stdout)
        except ValueError:
            raise KubeError(f"credential plugin {self._name()} did not print an ExecCredential") from None
        if not isinstance(answer, dict) or answer.get("apiVersion") != self.spec["apiVersion"] \
                or not isinstance(answer.get("status"), dict):
            raise KubeError(f"credential plugin {self._name()} did not print an ExecCredential "
                            f"of {self.spec['apiVersion']}")
        status = answer["status"]
        self.expiry = _timestamp(status.get("expirationTimestamp"))
        return status

    def _name(self) -> str:
        return os.path.basename(self.argv[0])


def _cluster_info(cluster: dict[str, Any]) -> dict[str, Any]:
    """spec.cluster of ExecCredential, from the cluster entry (files already inlined)."""
    names = {"server": "server", "tls-server-name": "tls-server-name",
             "insecure-skip-tls-verify": "insecure-skip-tls-verify",
             "certificate-authority-data": "certificate-authority-data", "proxy-url": "proxy-url"}
    info = {out: cluster[key] for key, out in names.items() if key in cluster}
    for ext in cluster.get("extensions") or []:
        if isinstance(ext, dict) and ext.get("name") == "client.authentication.k8s.io/exec":
            info["config"] = ext.get("extension")
    return info


def _timestamp(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        stamp = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.timezone.utc)


def _b64(pem: str) -> str:
    return base64.b64encode(pem.encode()).decode()
