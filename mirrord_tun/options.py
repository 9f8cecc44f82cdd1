"""The options run, attach and sidecar share, each group handed to the command as one frozen dataclass.

One click decorator per group adds the group's options and gives the command one object in
place of their values: `connection_options` a ConnectionArgs (a running agent), `kube_options`
a KubeArgs (run's target and the agent it launches), `mount_options` a MountArgs, and
`traffic_options` a MirrorArgs and a StealArgs (the two share --port). The objects are made
after click has parsed, from the values it would have handed the command, so names, help,
MIRRORD_NS_* variables and -f keys stay click's own. Nothing here imports the Kubernetes
client or the session until a command runs.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import click

from mirrord_tun.kube.commands import complete_context, complete_namespace, complete_target

if TYPE_CHECKING:
    from mirrord_tun.kube.session import KubeOptions
    from mirrord_tun.mounts import Mounts
    from mirrord_tun.stealer import StealOptions

SERVE_FS_KINDS = ("fuse", "nfs", "smb", "9p", "ceph", "afs", "cluster", "all")  # agent/fsview.py's KINDS

Decorator = Callable[[Callable[..., None]], Callable[..., None]]


def options(*opts: Decorator) -> Decorator:
    """Several click options as one decorator, listed in the order given."""
    def add(f: Callable[..., None]) -> Callable[..., None]:
        for opt in reversed(opts):
            f = opt(f)
        return f
    return add


def _gathered(build: Callable[[dict[str, Any]], None], *opts: Decorator) -> Decorator:
    """`opts` as one decorator whose values reach the command as the objects `build` makes of them:
    `build` takes the command's keyword arguments and replaces the options' values with those objects."""
    def add(f: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(f)
        def call(**kw: Any) -> None:
            build(kw)
            f(**kw)
        return options(*opts)(call)
    return add


# --- connection: run, attach, sidecar

@dataclass(frozen=True)
class ConnectionArgs:
    """--agent, --identity, --agent-host-key: a running agent and the keys to reach it."""

    agent: str | None
    identity: str | None
    host_key: str | None

    def given(self) -> bool:
        return bool(self.agent and self.identity and self.host_key)


def _connection(kw: dict[str, Any]) -> None:
    kw["connection"] = ConnectionArgs(kw.pop("agent"), kw.pop("identity"), kw.pop("agent_host_key"))


def connection_options(required: bool) -> Decorator:
    """How run, attach and sidecar name a running agent."""
    return _gathered(
        _connection,
        click.option("--agent", metavar="HOST:PORT", required=required, help="Address of a running agent."),
        # No exists=True: root's stat would answer for the user; the read as the user does.
        click.option("--identity", type=click.Path(dir_okay=False), required=required,
                     help="Private key (OpenSSH format) the agent authorizes."),
        click.option("--agent-host-key", type=click.Path(dir_okay=False), required=required,
                     help="The agent's public host key; any other key is refused."),
    )


# --- Kubernetes: run's target and the agent it launches

@dataclass(frozen=True)
class KubeArgs:
    """-t, -n, --container, --context, --kubeconfig, the agent pod's options, env and --dry-run."""

    target: str | None
    namespace: str | None
    container: str | None
    context: str | None
    kubeconfig: str | None
    agent_image: str | None
    privileged: bool
    pull_secrets: tuple[str, ...]
    annotations: tuple[tuple[str, str], ...]
    agent_address: str | None
    env: bool  # not --no-env
    env_exclude: tuple[str, ...]
    env_allow: tuple[str, ...]
    dry_run: bool

    def options(self, serve_fs: tuple[str, ...]) -> KubeOptions:
        """The launcher's options; `serve_fs`: the mounts' (MountArgs.serve_fs)."""
        from mirrord_tun.kube.manifest import DEFAULT_IMAGE
        from mirrord_tun.kube.session import KubeOptions

        return KubeOptions(self.target, self.namespace, self.container, self.context, self.kubeconfig,
                           self.agent_image or DEFAULT_IMAGE, self.privileged, self.agent_address,
                           self.env, frozenset(self.env_exclude), frozenset(self.env_allow),
                           self.pull_secrets, self.annotations, serve_fs)


def _annotations(_ctx: click.Context, _param: click.Parameter, specs: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """--agent-annotation values as (key, value) pairs; the key as Kubernetes spells one."""
    if not specs:  # run --agent must not pay for importing the Kubernetes side
        return ()
    from mirrord_tun.kube.manifest import annotation

    try:
        return tuple(annotation(spec) for spec in specs)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _kube(kw: dict[str, Any]) -> None:
    kw["kube"] = KubeArgs(
        kw.pop("target"), kw.pop("namespace"), kw.pop("container"), kw.pop("context"), kw.pop("kubeconfig"),
        kw.pop("agent_image"), kw.pop("privileged"), kw.pop("image_pull_secret"), kw.pop("agent_annotation"),
        kw.pop("agent_address"), not kw.pop("no_env"), kw.pop("env_exclude"), kw.pop("env_allow"),
        kw.pop("dry_run"))


kube_options = _gathered(
    _kube,
    click.option("-t", "--target", metavar="KIND/NAME", shell_complete=complete_target, help="pod/NAME, deploy/NAME or statefulset/NAME "
                 "(none: targetless, the agent's own pod is the identity)."),
    click.option("-n", "--namespace", shell_complete=complete_namespace,
                 help="The target's namespace (default: the context's)."),
    click.option("--container", help="The target container in a multi-container pod."),
    click.option("--context", shell_complete=complete_context, help="kubeconfig context (default: the current one)."),
    click.option("--kubeconfig", type=click.Path(dir_okay=False), help="kubeconfig file (default: as kubectl)."),
    click.option("--agent-image", metavar="IMAGE", help="Agent image (default: the release's own)."),
    click.option("--privileged", is_flag=True, help="Run the agent pod privileged (not just with its capabilities)."),
    click.option("--image-pull-secret", metavar="NAME", multiple=True,
                 help="Secret in the namespace for pulling the agent image (repeatable)."),
    click.option("--agent-annotation", metavar="KEY=VALUE", multiple=True, callback=_annotations,
                 help="Annotation on the agent pod (repeatable). Service-mesh injection is off by default "
                 "(e.g. sidecar.istio.io/inject=\"false\"); giving such a key overrides it."),
    click.option("--agent-address", metavar="HOST:PORT", help="Reach the launched agent here, not by port-forward."),
    click.option("--no-env", is_flag=True, help="Do not give COMMAND the target container's environment."),
    click.option("--env-exclude", metavar="NAME", multiple=True, help="Leave out this variable (repeatable)."),
    click.option("--env-allow", metavar="NAME", multiple=True, help="Import this variable although it is a "
                 "loader, shell or interpreter hook (LD_PRELOAD, BASH_ENV, NODE_OPTIONS...) (repeatable)."),
    click.option("--dry-run", is_flag=True, help="Print the agent manifest as YAML and exit; create nothing."),
)


# --- mounts: run's view of the target container's files

@dataclass(frozen=True)
class MountArgs:
    """--mount, --no-mount, --serve-fs."""

    paths: tuple[str, ...]
    volumes: bool  # not --no-mount: the target container's volumes too
    serve_fs: tuple[str, ...]  # for the agent run launches (agent --serve-fs)

    def mounts(self, volumes: tuple[str, ...]) -> Mounts | None:
        """run's Mounts for --mount and the target's `volumes`, else None."""
        volumes = volumes if self.volumes else ()
        if not self.paths and not volumes:
            return None
        from mirrord_tun.mounts import Mounts

        return Mounts(list(self.paths), list(volumes))


def _mount(kw: dict[str, Any]) -> None:
    kw["mounts"] = MountArgs(kw.pop("mount"), not kw.pop("no_mount"), kw.pop("serve_fs"))


mount_options = _gathered(
    _mount,
    click.option("--mount", "mount", metavar="PATH", multiple=True,
                 help="Show COMMAND the target container's directory PATH at PATH, read-only and live "
                 "(repeatable; the agent needs --pid or --container-id). With --target the container's "
                 "ConfigMap, Secret, projected and downward-API volumes are mounted by default. Not for "
                 "attach or sidecar."),
    click.option("--no-mount", is_flag=True, help="Do not mount the target container's volumes (--mount still adds paths)."),
    click.option("--serve-fs", type=click.Choice(SERVE_FS_KINDS), multiple=True,
                 help="Let the launched agent serve --mount files from these kinds of file systems, which can "
                 "hang and are refused by default (repeatable; see `agent --serve-fs`)."),
)


# --- traffic: mirror and steal, run, attach and sidecar

@dataclass(frozen=True)
class MirrorArgs:
    """--port, --no-mirror, --mirror-spill-limit as the session's mirror takes them."""

    ports: dict[int, int] | None  # pod port -> local port; None: no mirror (--no-mirror or --steal)
    spill_limit: int


@dataclass(frozen=True)
class HttpFilterSpec:
    """The --http-*-filter options as given (checked with steal.filters.HttpFilter.compile)."""

    header: str | None = None
    path: str | None = None
    method: str | None = None
    all_of: tuple[tuple[str, str], ...] = ()  # (kind, pattern)
    any_of: tuple[tuple[str, str], ...] = ()
    ports: tuple[int, ...] = ()  # --http-filter-ports; empty: DEFAULT_HTTP_PORTS and every --port

    def given(self) -> bool:
        return any((self.header is not None, self.path is not None, self.method is not None, self.all_of, self.any_of))


@dataclass(frozen=True)
class StealArgs:
    """--steal, --port, --steal-exclude and the --http-*-filter options."""

    on: bool
    ports: dict[int, int]
    exclude: tuple[str, ...]
    http: HttpFilterSpec

    def options(self, default_exclude: tuple[str, ...] = ()) -> StealOptions | None:
        """The session's StealOptions for --steal, else None."""
        if not self.on:
            if self.exclude or self.http.given():
                raise click.UsageError("--steal-exclude and the --http-*-filter options need --steal")
            return None
        from mirrord_tun.stealer import StealOptions

        return StealOptions(self.ports, tuple(dict.fromkeys(default_exclude + self.exclude)), self.http)


def _mirror_ports(_ctx: click.Context, _param: click.Parameter, specs: tuple[str, ...]) -> dict[int, int]:
    """--port values as {pod port: local port}."""
    from mirrord_tun.mirror.ports import parse_port

    try:
        return dict(parse_port(spec) for spec in specs)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _size(_ctx: click.Context, _param: click.Parameter, text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    m = re.fullmatch(r"(\d+)([KMG]?)(?:i?B)?", text.strip(), re.I)
    if not m or int(m[1]) == 0:
        raise click.BadParameter(f"{text!r}: expected a size such as 512M or 2G")
    return int(m[1]) * units[m[2].upper()]


def _steal_excludes(_ctx: click.Context, _param: click.Parameter, specs: tuple[str, ...]) -> tuple[str, ...]:
    from mirrord_tun.protocol import MAX_EXCLUDE, Malformed, cidr

    if len(specs) > MAX_EXCLUDE:
        raise click.BadParameter(f"at most {MAX_EXCLUDE}")
    try:
        return tuple(cidr(spec) for spec in specs)
    except Malformed as e:
        raise click.BadParameter(str(e)) from None


def _regex(_ctx: click.Context, param: click.Parameter, pattern: str | None) -> str | None:
    """A regex the agent will accept, checked here: a bad one must fail before the pod changes."""
    if pattern is None:
        return None
    from mirrord_tun.agent.steal.filters import HttpFilter
    from mirrord_tun.protocol import MAX_REGEX

    if len(pattern) > MAX_REGEX:
        raise click.BadParameter(f"at most {MAX_REGEX} characters")
    try:
        HttpFilter.compile(pattern if param.name == "http_header_filter" else None,
                           pattern if param.name == "http_path_filter" else None,
                           pattern if param.name == "http_method_filter" else None)
    except ValueError as e:
        raise click.BadParameter(str(e).split(" ", 1)[1]) from None  # without the option name
    return pattern


def _singles(_ctx: click.Context, param: click.Parameter, specs: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    if not specs:
        return ()
    from mirrord_tun.agent.steal.filters import parse_single
    from mirrord_tun.protocol import MAX_REGEX, MAX_SINGLE_FILTERS

    if len(specs) > MAX_SINGLE_FILTERS:
        raise click.BadParameter(f"at most {MAX_SINGLE_FILTERS}")
    out = []
    for spec in specs:
        if len(spec) > MAX_REGEX:
            raise click.BadParameter(f"at most {MAX_REGEX} characters")
        try:
            out.append(parse_single(param.opts[0], spec))
        except ValueError as e:
            raise click.BadParameter(str(e).split(" ", 1)[1]) from None
    return tuple(out)


def _http_filter(kw: dict[str, Any]) -> HttpFilterSpec:
    """The --http-*-filter options as one HttpFilterSpec, removed from the command's arguments."""
    header, path, ignore_case, method, all_of, any_of, ports = (kw.pop(n) for n in (
        "http_header_filter", "http_path_filter", "http_path_filter_ignore_case", "http_method_filter",
        "http_filter_all_of", "http_filter_any_of", "http_filter_ports"))
    if ignore_case and path is None:
        raise click.UsageError("--http-path-filter-ignore-case needs --http-path-filter")
    if ignore_case:
        path = f"(?i){path}"
    spec = HttpFilterSpec(header, path, method, all_of, any_of, tuple(sorted(set(ports))))
    if ports and not spec.given():
        raise click.UsageError("--http-filter-ports needs a filter (--http-header-filter, ...)")
    return spec


def _traffic(kw: dict[str, Any]) -> None:
    port, steal = kw.pop("port"), kw.pop("steal")
    http = _http_filter(kw)
    kw["mirror"] = MirrorArgs(None if kw.pop("no_mirror") or steal else port, kw.pop("mirror_spill_limit"))
    kw["steal"] = StealArgs(steal, port, kw.pop("steal_exclude"), http)


traffic_options = _gathered(
    _traffic,
    click.option("--port", metavar="P|LOCAL:REMOTE", multiple=True, callback=_mirror_ports,
                 help="Also mirror (or steal) pod port P, or pod port REMOTE onto local port LOCAL; "
                 "repeatable. Ports served in the namespace are mirrored (stolen) without it."),
    click.option("--no-mirror", is_flag=True, help="Do not mirror the pod's inbound traffic."),
    click.option("--mirror-spill-limit", metavar="SIZE", callback=_size, default="1G", show_default=True,
                 help="How far (bytes, or with K/M/G) the program may fall behind the mirrored traffic in "
                 "all, kept on disk, before the connection with the most waiting is given up."),
    click.option("--steal", is_flag=True, help="Answer the pod's traffic instead of mirroring it: new "
                 "connections to the served ports (and --port) go to COMMAND, not to the pod."),
    click.option("--steal-exclude", metavar="CIDR", multiple=True, callback=_steal_excludes,
                 help="With --steal: connections from these sources keep going to the pod (repeatable; "
                 "in Kubernetes the pod's node, whose kubelet probes it, is excluded by default)."),
    click.option("--http-header-filter", metavar="REGEX", callback=_regex,
                 help="With --steal: steal only the HTTP requests with a header `Name: value` matching "
                 "REGEX (case-insensitive); the pod's server answers the others."),
    click.option("--http-path-filter", metavar="REGEX", callback=_regex,
                 help="With --steal: steal only the HTTP requests whose path, or path and query, "
                 "matches REGEX (case-sensitive; see the next option)."),
    click.option("--http-path-filter-ignore-case", is_flag=True, help="Match --http-path-filter "
                 "case-insensitively (as mirrord does)."),
    click.option("--http-method-filter", metavar="METHOD", callback=_regex,
                 help="With --steal: steal only the HTTP requests with this method (any case)."),
    click.option("--http-filter-all-of", metavar="KIND=PATTERN", multiple=True, callback=_singles,
                 help="With --steal: a filter (header=REGEX, path=REGEX, method=M) every stolen request "
                 "matches; repeatable. All filters given must match."),
    click.option("--http-filter-any-of", metavar="KIND=PATTERN", multiple=True, callback=_singles,
                 help="With --steal: like --http-filter-all-of, but a request matching any one of these "
                 "is enough (with the other filters)."),
    click.option("--http-filter-ports", metavar="P", type=click.IntRange(1, 65535), multiple=True,
                 help="The pod ports whose HTTP requests are filtered (repeatable); default 80, 8080 and "
                 "every --port. Other served ports stay the pod's; other --port ports are stolen whole."),
)
