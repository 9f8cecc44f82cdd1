"""The target container's environment, resolved the way the kubelet resolves it.

Order as in Kubernetes: `envFrom` sources first (with their prefix), then `env`
entries, later ones winning; `$(NAME)` in a literal value expands to a name
defined before it and `$$` escapes a `$`. References are read now, so a value
changed since the pod started shows its current content. A reference that cannot
be read is reported and skipped, never fatal: the command can still run.

Whoever can edit the workload chooses these values, and the laptop command runs
them as the invoking user, so names that make the system run code or read files
of the value's choosing are not imported (`DENIED`, `DENIED_PREFIXES`) unless
`--env-allow NAME` asks for one. The rule for the list: a variable is on it when
the dynamic loader, libc, a shell or a language runtime reads it at *every* start
of *any* program of that kind to load code, run a command, or read a file named
by the value; such a name means nothing on the laptop anyway (it points into the
image) and is exactly what a hostile workload would set. It holds:
- loader and libc: every `LD_*` (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, ...),
  `MALLOC_*`, and the rest of glibc's own list of variables that setuid programs
  drop (unsecvars.h): GCONV_PATH, GETCONF_DIR, GLIBC_TUNABLES, HOSTALIASES,
  LOCALDOMAIN, LOCPATH, NIS_PATH, NLSPATH, RESOLV_HOST_CONF, RES_OPTIONS, TMPDIR,
  TZDIR (the resolver ones change nothing the pod's resolv.conf does not set);
- shells: BASH_ENV and ENV (expanded, so `$(cmd)` in them runs cmd at every
  non-interactive bash/sh start), exported functions `BASH_FUNC_*` (they replace
  commands in every bash script), PROMPT_COMMAND, PS0-PS4 (command substitution
  in prompts and xtrace), SHELLOPTS, BASHOPTS, BASH_XTRACEFD, IFS, CDPATH,
  GLOBIGNORE, ZDOTDIR;
- libcrypto: OPENSSL_CONF, OPENSSL_MODULES, OPENSSL_ENGINES (a configuration that loads
  providers or engines, in every program that starts OpenSSL);
- runtimes a command commonly starts: every `PYTHON*` but those that only tune the interpreter
  (`PYTHON_TUNING`), since new ones keep coming and several name files (PYTHONPATH, PYTHONHOME,
  PYTHONSTARTUP, PYTHONUSERBASE, PYTHONPYCACHEPREFIX: bytecode loaded unchecked from under it,
  PYTHONPLATLIBDIR) or code (PYTHONBREAKPOINT); NODE_OPTIONS (`--require`, `--import`),
  NODE_PATH; PERL5OPT (`-M`), PERL5LIB, PERLLIB, PERL5DB; RUBYOPT (`-r`), RUBYLIB;
  JAVA_TOOL_OPTIONS, JDK_JAVA_OPTIONS, _JAVA_OPTIONS (`-javaagent:`,
  `-XX:OnError=cmd`), CLASSPATH.
Hooks of one particular tool (git's, an editor or pager) act only when that tool
is used and are left to `--env-exclude`.
"""
from __future__ import annotations

import base64
import logging
import re
from typing import Callable

from kubernetes import client

from mirrord_tun.kube.cluster import Cluster, describe
from mirrord_tun.kube.targets import TargetPod

log = logging.getLogger("mirrord-ns")
# The laptop's, not the workload's: the pod's PATH points into its image, HOME and the
# rest describe the invoking user and terminal.
KEEP_LOCAL = frozenset({"PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "HOSTNAME"})
DENIED_PREFIXES = ("LD_", "MALLOC_", "BASH_FUNC_")
DENIED = frozenset({
    "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH", "NIS_PATH",
    "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TMPDIR", "TZDIR",
    "BASH_ENV", "ENV", "PROMPT_COMMAND", "PS0", "PS1", "PS2", "PS3", "PS4", "SHELLOPTS", "BASHOPTS",
    "BASH_XTRACEFD", "IFS", "CDPATH", "GLOBIGNORE", "ZDOTDIR", "OPENSSL_CONF", "OPENSSL_MODULES", "OPENSSL_ENGINES",
    "NODE_OPTIONS", "NODE_PATH", "PERL5OPT", "PERL5LIB", "PERLLIB", "PERL5DB", "RUBYOPT", "RUBYLIB",
    "JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "_JAVA_OPTIONS", "CLASSPATH",
})
# The interpreter's switches that name no file or module: what a pod commonly sets for Python.
PYTHON_TUNING = frozenset({
    "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING", "PYTHONHASHSEED", "PYTHONUTF8",
    "PYTHONOPTIMIZE", "PYTHONFAULTHANDLER", "PYTHONDEVMODE", "PYTHONNOUSERSITE", "PYTHONSAFEPATH",
    "PYTHONINTMAXSTRDIGITS", "PYTHONCOERCECLOCALE", "PYTHONASYNCIODEBUG", "PYTHONTRACEMALLOC",
    "PYTHONMALLOC", "PYTHONNODEBUGRANGES", "PYTHONWARNDEFAULTENCODING",
})
_REF = re.compile(r"\$(\$|\(([A-Za-z_][A-Za-z0-9_.-]*)\))")
_KEYED_FIELD = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]$")


def denied(name: str) -> bool:
    return (name in DENIED or name.startswith(DENIED_PREFIXES)
            or (name.startswith("PYTHON") and name not in PYTHON_TUNING))


def container_env(cluster: Cluster, target: TargetPod, exclude: frozenset[str] = frozenset(),
                  allow: frozenset[str] = frozenset()) -> dict[str, str]:
    spec = next(c for c in target.pod.spec.containers if c.name == target.container)
    reader = _Reader(cluster, target.namespace)
    env: dict[str, str] = {}
    for source in spec.env_from or []:
        prefix = source.prefix or ""
        for key, value in reader.source(source).items():
            env[prefix + key] = value
    for var in spec.env or []:
        if var.value_from is None:
            env[var.name] = _expand(var.value or "", env)
            continue
        value = reader.ref(var.value_from, target.pod)
        if value is not None:
            env[var.name] = value
        elif not _optional(var.value_from):
            log.warning("environment: %s not set (its reference cannot be read)", var.name)
    wanted = {k: v for k, v in env.items() if k not in exclude and k not in KEEP_LOCAL}
    unset = sorted(k for k, v in wanted.items() if "\0" in k or "\0" in v)
    if unset:  # a Secret's bytes may hold one; no program can be given it
        log.warning("environment: not importing %s (a NUL byte in the value)", ", ".join(map(repr, unset)))
        wanted = {k: v for k, v in wanted.items() if k not in unset}
    dropped = sorted(k for k in wanted if denied(k) and k not in allow)
    if dropped:  # names only: the values may be secrets
        log.warning("environment: not importing %s (they make programs load code; --env-allow NAME imports one)",
                    ", ".join(dropped))
    return {k: v for k, v in wanted.items() if k not in dropped}


def _optional(source: client.V1EnvVarSource) -> bool:
    ref = source.config_map_key_ref or source.secret_key_ref
    return bool(ref and ref.optional)


def _expand(value: str, env: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m[1] == "$":
            return "$"
        return env.get(m[2], m[0])  # an unknown name stays as written, as in Kubernetes
    return _REF.sub(one, value)


class _Reader:
    """ConfigMaps and Secrets, each read once per session."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self._cache: dict[tuple[str, str], dict[str, str] | None] = {}

    def _object(self, kind: str, name: str, optional: bool) -> dict[str, str] | None:
        if (kind, name) not in self._cache:
            self._cache[(kind, name)] = self._read(kind, name, optional)
        return self._cache[(kind, name)]

    def _read(self, kind: str, name: str, optional: bool) -> dict[str, str] | None:
        read: Callable[[str, str], client.V1ConfigMap | client.V1Secret] = (
            self.cluster.core.read_namespaced_config_map if kind == "configmap"
            else self.cluster.core.read_namespaced_secret)
        try:
            obj = read(name, self.namespace)
        except client.ApiException as e:
            if not (optional and e.status == 404):
                log.warning("environment: cannot read %s/%s: %s", kind, name, describe(e))
            return None
        if kind == "configmap":
            return dict(obj.data or {})
        return {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.data or {}).items()}

    def source(self, source: client.V1EnvFromSource) -> dict[str, str]:
        ref = source.config_map_ref or source.secret_ref
        kind = "configmap" if source.config_map_ref else "secret"
        if ref is None:
            return {}
        return self._object(kind, ref.name, bool(ref.optional)) or {}

    def ref(self, source: client.V1EnvVarSource, pod: client.V1Pod) -> str | None:
        ref = source.config_map_key_ref or source.secret_key_ref
        if ref is not None:
            kind = "configmap" if source.config_map_key_ref else "secret"
            data = self._object(kind, ref.name, bool(ref.optional))
            return None if data is None else data.get(ref.key)
        if source.field_ref is not None:
            return field(pod, source.field_ref.field_path)
        return None  # resourceFieldRef, fileKeyRef: values only the kubelet knows


def field(pod: client.V1Pod, path: str) -> str | None:
    """The downward API's fieldRef paths."""
    keyed = _KEYED_FIELD.match(path)
    if keyed:
        return (getattr(pod.metadata, keyed[1]) or {}).get(keyed[2])
    status = pod.status or client.V1PodStatus()
    values = {
        "metadata.name": pod.metadata.name, "metadata.namespace": pod.metadata.namespace,
        "metadata.uid": pod.metadata.uid, "spec.nodeName": pod.spec.node_name,
        "spec.serviceAccountName": pod.spec.service_account_name,
        "status.podIP": status.pod_ip, "status.hostIP": status.host_ip,
        "status.podIPs": ",".join(i.ip for i in status.pod_ips or []) or None,
        "status.hostIPs": ",".join(i.ip for i in status.host_ips or []) or None,
    }
    return values.get(path)
