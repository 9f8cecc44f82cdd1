"""The `mirrord-ns` command line."""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Callable, Coroutine, NoReturn, TypeVar

import click

from mirrord_tun import __version__

T = TypeVar("T")


def _logging(verbose: int, name: str) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        format=f"{name}: %(message)s", stream=sys.stderr,
    )
    # asyncssh narrates every connection step at INFO; keep that for -vv.
    logging.getLogger("asyncssh").setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    """uvloop when present: it halves the per-wake-up cost that dominates tunnel latency."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _need_root() -> None:
    import os

    if os.geteuid() != 0:
        raise click.ClickException("needs root (namespaces, TUN devices): run it with sudo")


def _mirror_ports(_ctx: click.Context, _param: click.Parameter, specs: tuple[str, ...]) -> dict[int, int]:
    """--port values as {pod port: local port}."""
    from mirrord_tun.mirror.ports import parse_port

    try:
        return dict(parse_port(spec) for spec in specs)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


Decorator = Callable[[Callable[..., None]], Callable[..., None]]


def _options(*opts: Decorator) -> Decorator:
    """Several click options as one decorator, listed in the order given."""
    def add(f: Callable[..., None]) -> Callable[..., None]:
        for opt in reversed(opts):
            f = opt(f)
        return f
    return add


def _connection_options(required: bool) -> Decorator:
    """How run, attach and sidecar name a running agent."""
    return _options(
        click.option("--agent", metavar="HOST:PORT", required=required, help="Address of a running agent."),
        click.option("--identity", type=click.Path(exists=True, dir_okay=False), required=required,
                     help="Private key (OpenSSH format) the agent authorizes."),
        click.option("--agent-host-key", type=click.Path(exists=True, dir_okay=False), required=required,
                     help="The agent's public host key; any other key is refused."),
    )


_mirror_options = _options(
    click.option("--port", "ports", metavar="P|LOCAL:REMOTE", multiple=True, callback=_mirror_ports,
                 help="Also mirror pod port P (or pod port REMOTE onto local port LOCAL); repeatable. "
                 "Ports served in the namespace are mirrored without it."),
    click.option("--no-mirror", is_flag=True, help="Do not mirror the pod's inbound traffic."),
)
_no_dns_option = click.option("--no-dns", is_flag=True, help="Leave the namespace's /etc/resolv.conf as it is.")
_verbose_option = click.option("-v", "--verbose", count=True, help="Progress and per-session counters on stderr.")


def _exit_with(session: Callable[[], int]) -> NoReturn:
    """Exit with the session's status; 2 for our own errors, 130 for Ctrl-C before the command started."""
    from mirrord_tun.connect import SetupError

    try:
        code = session()
    except SetupError as e:
        click.echo(f"mirrord-ns: {e}", err=True)
        code = 2
    except KeyboardInterrupt:  # cleanup ran on the way out
        code = 130
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mirrord-ns")
def main() -> None:
    """Run a local program inside a Kubernetes pod's network."""
    from mirrord_tun.malloc import keep_large_buffers

    keep_large_buffers()


@main.command(context_settings={"ignore_unknown_options": True})
@_connection_options(required=False)
@click.option("--target", metavar="KIND/NAME", help="pod/NAME, deploy/NAME or statefulset/NAME "
              "(none: targetless, the agent's own pod is the identity).")
@click.option("-n", "--namespace", help="The target's namespace (default: the context's).")
@click.option("--container", help="The target container in a multi-container pod.")
@click.option("--context", help="kubeconfig context (default: the current one).")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), help="kubeconfig file (default: as kubectl).")
@click.option("--agent-image", metavar="IMAGE", help="Agent image (default: the release's own).")
@click.option("--privileged", is_flag=True, help="Run the agent pod privileged (not just with its capabilities).")
@click.option("--agent-address", metavar="HOST:PORT", help="Reach the launched agent here, not by port-forward.")
@click.option("--no-env", is_flag=True, help="Do not give COMMAND the target container's environment.")
@click.option("--env-exclude", metavar="NAME", multiple=True, help="Leave out this variable (repeatable).")
@click.option("--env-allow", metavar="NAME", multiple=True, help="Import this variable although it is a "
              "loader, shell or interpreter hook (LD_PRELOAD, BASH_ENV, NODE_OPTIONS...) (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the agent manifest as YAML and exit; create nothing.")
@_mirror_options
@_verbose_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(agent: str | None, identity: str | None, agent_host_key: str | None, target: str | None,
        namespace: str | None, container: str | None, context: str | None, kubeconfig: str | None,
        agent_image: str | None, privileged: bool, agent_address: str | None, no_env: bool,
        env_exclude: tuple[str, ...], env_allow: tuple[str, ...], dry_run: bool, ports: dict[int, int],
        no_mirror: bool, verbose: int, command: tuple[str, ...]) -> None:
    """Run COMMAND with the pod's network: sudo mirrord-ns run --target pod/NAME -- CMD ARGS..."""
    if agent and (target or dry_run):
        raise click.UsageError("--agent names a running agent; --target and --dry-run launch one")
    keys = (identity, agent_host_key)
    if (agent and not all(keys)) or (not agent and any(keys)):
        raise click.UsageError("--agent, --identity and --agent-host-key go together")
    if not command and not dry_run:
        raise click.UsageError("missing COMMAND: mirrord-ns run [OPTIONS] -- COMMAND [ARGS]...")
    if not dry_run:
        _need_root()
    _logging(verbose, "mirrord-ns")
    from mirrord_tun.connect import load_keys
    from mirrord_tun.run import LocalSession

    mirror_ports = None if no_mirror else ports

    async def go(address: str, key: Any, pinned: Any, **link: Any) -> int:
        return await LocalSession(list(command), address, key, pinned, mirror_ports=mirror_ports, **link).run()

    def in_cluster() -> int:
        from mirrord_tun.kube.manifest import DEFAULT_IMAGE
        from mirrord_tun.kube.session import KubeOptions, prepare

        plan = prepare(KubeOptions(target, namespace, container, context, kubeconfig,
                                   agent_image or DEFAULT_IMAGE, privileged, agent_address,
                                   not no_env, frozenset(env_exclude), frozenset(env_allow)))
        if dry_run:
            click.echo(plan.manifests_yaml(), nl=False)
            return 0
        with plan.launch() as link:
            return _run_async(go(link.address, plan.key, link.host_key, sock=link.sock, env=link.env))

    if agent and identity and agent_host_key:
        _exit_with(lambda: _run_async(go(agent, *load_keys(identity, agent_host_key))))
    _exit_with(in_cluster)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def demo(command: tuple[str, ...]) -> None:
    """Build a throwaway cluster from namespaces and run COMMAND (default: a tour) through it."""
    _need_root()
    from mirrord_tun.demo import demo as run_demo

    sys.exit(run_demo(list(command)))


@main.command()
@click.option("-n", "--namespace", help="Only this namespace (default: every one you may list).")
@click.option("--context", help="kubeconfig context (default: the current one).")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), help="kubeconfig file (default: as kubectl).")
@click.option("-v", "--verbose", count=True)
def cleanup(namespace: str | None, context: str | None, kubeconfig: str | None, verbose: int) -> None:
    """Remove what crashed sessions left: your agent pods, dead agents' nft tables on this host."""
    _logging(verbose, "mirrord-ns")
    from mirrord_tun.cleanup import clean_cluster, clean_host

    removed = clean_cluster(context, kubeconfig, namespace) + clean_host()
    for item in removed:
        click.echo(f"removed {item}")
    if not removed:
        click.echo("nothing to clean up", err=True)


@main.command()
@click.option("--listen", metavar="HOST:PORT", required=True, help="Where to accept the client's SSH connection.")
@click.option("--authorized-key", type=click.Path(exists=True, dir_okay=False),
              help="File with the one public key allowed to log in.")
@click.option("--authorized-key-data", metavar="KEY", envvar="MIRRORD_NS_AUTHORIZED_KEY",
              help="That public key itself (\"ssh-ed25519 AAAA...\"), as a launcher passes it.")
@click.option("--host-key", type=click.Path(exists=True, dir_okay=False),
              help="This agent's private host key (default: a fresh one, printed for pinning).")
@click.option("--netns", type=click.Path(exists=True), help="Work in this network namespace (file).")
@click.option("--pid", type=int, help="Work in this process's network namespace.")
@click.option("--container-id", metavar="ID", help="Work in this container's namespace (containerd://..., "
              "cri-o://..., docker://... as in the pod status; needs hostPID).")
@click.option("--resolv-conf", type=click.Path(dir_okay=False), help="Resolver configuration to report.")
@click.option("--idle-exit", type=click.FloatRange(min=1), metavar="SECONDS",
              help="Exit after this long without a session, also if none ever came.")
@click.option("-v", "--verbose", count=True)
def agent(listen: str, authorized_key: str | None, authorized_key_data: str | None, host_key: str | None,
          netns: str | None, pid: int | None, container_id: str | None, resolv_conf: str | None,
          idle_exit: float | None, verbose: int) -> None:
    """Serve tunnel sessions into a namespace (normally started by `run`)."""
    _need_root()
    from mirrord_tun.agent import keys
    from mirrord_tun.agent.containers import find_pid
    from mirrord_tun.agent.guard import run_guarded
    from mirrord_tun.agent.target import resolve
    from mirrord_tun.connect import parse_hostport

    try:
        if container_id and (pid or netns):
            raise ValueError("give one of --container-id, --pid and --netns")
        target = resolve(netns, find_pid(container_id) if container_id else pid, resolv_conf)
        host, port = parse_hostport(listen)
        authorized = keys.authorized(authorized_key, authorized_key_data)
        key = keys.host_key(host_key)
    except Exception as e:  # noqa: BLE001
        raise click.ClickException(str(e))

    def worker() -> int:
        _logging(max(verbose, 1), "mirrord-ns agent")
        from mirrord_tun.agent.server import Agent

        try:
            _run_async(Agent(target).serve(host, port, key, authorized, idle_exit))
        except (OSError, ValueError) as e:
            click.echo(f"mirrord-ns agent: {e}", err=True)
            return 2
        return 0

    sys.exit(run_guarded(target.netns_path, worker))


@main.command()
@click.option("--netns", type=click.Path(exists=True), help="The namespace file (/run/netns/NAME, /proc/PID/ns/net).")
@click.option("--pid", type=int, help="This process's namespace (and its /etc/resolv.conf).")
@click.option("--container", metavar="NAME", help="This running Docker container's namespace (and resolver).")
@_connection_options(required=True)
@_no_dns_option
@_mirror_options
@_verbose_option
def attach(netns: str | None, pid: int | None, container: str | None, agent: str, identity: str,
           agent_host_key: str, no_dns: bool, ports: dict[int, int], no_mirror: bool, verbose: int) -> None:
    """Put an existing namespace (a running container's) in the pod's network until Ctrl-C/SIGTERM,
    then restore it as it was."""
    _need_root()
    _logging(verbose, "mirrord-ns")
    from mirrord_tun import attach as at
    from mirrord_tun.connect import load_keys
    from mirrord_tun.run import LocalSession

    async def go() -> int:
        target = at.resolve(netns, pid, container, dns=not no_dns)
        key, pinned = load_keys(identity, agent_host_key)
        session = LocalSession([], agent, key, pinned, mirror_ports=None if no_mirror else ports)
        return await at.until_signalled(at.attach(session, target))

    _exit_with(lambda: _run_async(go()))


@main.command()
@click.option("--hold", is_flag=True, help="Only keep the namespace alive, as a pause container: the "
              "compose service the others join (`network_mode: service:NAME`) and that never restarts.")
@_connection_options(required=False)
@_no_dns_option
@_mirror_options
@_verbose_option
def sidecar(hold: bool, agent: str | None, identity: str | None, agent_host_key: str | None,
            no_dns: bool, ports: dict[int, int], no_mirror: bool, verbose: int) -> None:
    """Keep this container's namespace in the pod's network, attaching again whenever the tunnel drops."""
    from mirrord_tun import attach as at

    if hold:
        sys.exit(at.hold())
    if not (agent and identity and agent_host_key):
        raise click.UsageError("--agent, --identity and --agent-host-key are needed (or --hold)")
    _need_root()
    _logging(verbose, "mirrord-ns")
    from mirrord_tun.connect import load_keys
    from mirrord_tun.run import LocalSession

    async def go() -> int:
        key, pinned = load_keys(identity, agent_host_key)
        mirror_ports = None if no_mirror else ports
        return await at.sidecar(lambda: LocalSession([], agent, key, pinned, mirror_ports=mirror_ports),
                                at.own_namespace(dns=not no_dns))

    _exit_with(lambda: _run_async(go()))
