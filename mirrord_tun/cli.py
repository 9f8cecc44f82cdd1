"""The `mirrord-ns` command line.

One error style for every command: one line on stderr starting `mirrord-ns:` and exit 2 for
anything of ours (usage errors included), 130 for Ctrl-C, the command's own status otherwise.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, Coroutine, NoReturn, Sequence, TypeVar

from mirrord_tun import libwarnings, sshstart, timing

timing.mark("interpreter started")
libwarnings.install()  # before any dependency is imported: their warnings are not the user's to read
sshstart.install()  # ... and before asyncssh's: no gcc run for its liboqs probe, no X.509 loaded

import click  # noqa: E402

from mirrord_tun import __version__
from mirrord_tun.config import ENV_PREFIX, config_option
from mirrord_tun.interrupts import Interrupts
from mirrord_tun.kube.commands import complete_context, complete_namespace
from mirrord_tun.netns.ipv6 import FORWARDING_MODES
from mirrord_tun.options import (SERVE_FS_KINDS, ConnectionArgs, KubeArgs, MirrorArgs, MountArgs, StealArgs,
                                 connection_options, kube_options, mount_options, options, traffic_options)
from mirrord_tun.progress import SafeFormatter, terminal_safe

T = TypeVar("T")
PROG = "mirrord-ns"
log = logging.getLogger(PROG)  # "mirrord-ns.agent" and the other loggers of ours are its children


def _logging(verbose: int, name: str, quiet: bool = False) -> None:
    """-v: our progress; -vv: our debug lines and asyncssh's; other libraries stay at warnings."""
    floor = logging.ERROR if quiet else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter(f"{name}: %(message)s"))
    logging.basicConfig(level=floor, handlers=[handler])
    ours = floor if quiet else logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    log.setLevel(ours)
    # asyncssh narrates every connection step at INFO: only worth seeing with our own debug lines.
    logging.getLogger("asyncssh").setLevel(logging.DEBUG if ours == logging.DEBUG else floor)
    libwarnings.logging_ready()


def _quiet_libraries() -> None:
    # urllib3 warns "Retrying (Retry(total=2, ...))" before the error we report anyway.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _fail(message: str) -> int:
    click.echo(f"{PROG}: {terminal_safe(_one_line(message))}", err=True)
    return 2


def _kube_missing(e: ModuleNotFoundError) -> bool:
    return (e.name or "").partition(".")[0] in ("kubernetes", "yaml")


def _status(cli: Callable[[], Any]) -> int:
    """Run click without its own error printing and turn the outcome into an exit status."""
    try:
        rv = cli()
    except click.exceptions.NoArgsIsHelpError as e:  # bare `mirrord-ns`: the help is the message
        click.echo(e.format_message(), err=True)
        return 2
    except click.UsageError as e:
        message = _usage_message(e).rstrip()
        if e.ctx:  # one line: the reason, then where to look
            message += f"{'' if message.endswith(('.', '?', '!')) else '.'} Try '{e.ctx.command_path} -h' for help."
        return _fail(message)
    except click.ClickException as e:
        return _fail(e.format_message())
    except (click.Abort, KeyboardInterrupt):  # click turns Ctrl-C outside a session into Abort
        return 130
    except ModuleNotFoundError as e:
        if not _kube_missing(e):
            return _internal_error(e)
        from mirrord_tun.kube import INSTALL_HINT

        return _fail(f"the Kubernetes client is not installed ({e.name}): {INSTALL_HINT}")
    except Exception as e:  # noqa: BLE001 - the last resort: no traceback reaches the user
        return _internal_error(e)
    return rv if isinstance(rv, int) else 0  # an int only from click's Exit (--help, --version)


def _usage_message(e: click.UsageError) -> str:
    if not isinstance(e, click.NoSuchOption) or not e.possibilities:
        return e.format_message()
    # difflib finds '--help' close to any short option ('--stel'): only the best match may be it.
    best, *rest = e.possibilities
    meant = [best, *(p for p in rest if p != "--help")]
    return f"{e.message} Did you mean {' or '.join(map(repr, meant))}?"


def _internal_error(e: Exception) -> int:
    # INFO, not DEBUG: "-v for details" must hold.
    log.info("internal error", exc_info=e)
    return _fail(f"internal error: {type(e).__name__}: {e} (run with -v for details)")


class _Command(click.Command):
    """A command that also answers to `aliases`, shown in the group's list rather than repeated."""

    def __init__(self, *args: Any, aliases: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aliases = tuple(aliases)

    def get_short_help_str(self, limit: int = 45) -> str:
        text = super().get_short_help_str(limit)
        return f"{text.removesuffix('.')} (alias: {', '.join(self.aliases)})." if self.aliases else text


class _Cli(click.Group):
    command_class = _Command

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or next(
            (c for c in self.commands.values() if cmd_name in getattr(c, "aliases", ())), None)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        # Named for help and completion as installed, also under `python -m mirrord_tun`.
        prog_name = prog_name or PROG
        if not standalone_mode:  # the caller handles click's exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        # SIGTERM and SIGHUP (a closed terminal) stop any command as Ctrl-C does: cleanup, 130.
        with Interrupts((signal.SIGTERM, signal.SIGHUP)) as stop:
            code = _status(lambda: super(_Cli, self).main(args, prog_name, complete_var, False, obj=stop, **extra))
        sys.exit(code)


def _run_async(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """`make()`'s coroutine, on uvloop when present: it halves the per-wake-up cost that dominates
    tunnel latency. asyncio.Runner with uvloop's loop is what uvloop.run does, less a wrapper
    coroutine of its own. The coroutine is made here, not by the caller: a stop signal's
    KeyboardInterrupt can land between any two steps before the loop starts it (the import, the
    loop's creation), and every coroutine made by then is closed below, or Python would warn at
    exit that it was never awaited. Closing a finished coroutine does nothing."""
    made: list[Coroutine[Any, Any, Any]] = []
    try:
        ctx = click.get_current_context(silent=True)
        stop = ctx.find_object(Interrupts) if ctx else None  # None: called outside `main`, as a library
        made.append(make())
        if stop:
            made.append(stop.until_stopped(made[0]))
        try:
            from uvloop import new_event_loop
        except ImportError:
            new_event_loop = asyncio.new_event_loop
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(made[-1])
    finally:
        for coro in made:
            coro.close()


def _need_root() -> None:
    if os.geteuid() != 0:
        raise click.ClickException("needs root (namespaces, TUN devices): run it with sudo")


_no_dns_option = click.option("--no-dns", is_flag=True, help="Leave the namespace's /etc/resolv.conf as it is.")
_verbosity_options = options(
    click.option("-v", "--verbose", count=True, help="Progress and per-session counters on stderr; "
                 "-vv adds debug lines and SSH details."),
    click.option("-q", "--quiet", is_flag=True, help="Errors only."),
)
_with_command = {"allow_interspersed_args": False}  # COMMAND starts at `--` or the first non-option


def _exit_with(session: Callable[[], int]) -> NoReturn:
    """Exit with the session's status; 2 for our own errors, 130 for Ctrl-C before the command started."""
    from mirrord_tun.connect import SetupError

    try:
        code = session()
    except SetupError as e:
        code = _fail(str(e))
    except KeyboardInterrupt:  # cleanup ran on the way out
        code = 130
    sys.exit(code)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=PROG)
def main() -> None:
    """Run a local program inside a Kubernetes pod's network."""
    from mirrord_tun.malloc import keep_large_buffers

    keep_large_buffers()
    _quiet_libraries()


RUN_EPILOG = f"""\b
Exit status:
  N    COMMAND's own (128+N if signal N killed it, 127 if it was not found)
  2    mirrord-ns failed: bad usage or config, no cluster or agent, tunnel lost
  130  Ctrl-C, SIGTERM or SIGHUP before COMMAND started

Each option can also be set as {ENV_PREFIX}_<OPTION> (e.g. {ENV_PREFIX}_TARGET, {ENV_PREFIX}_AGENT_IMAGE;
lists space-separated) or in the -f file (e.g. target = "pod/web", port = [8080]). Flags win over
variables, variables over the file."""


@main.command(aliases=["exec"], epilog=RUN_EPILOG,
              context_settings={**_with_command, "auto_envvar_prefix": ENV_PREFIX})
@config_option
@connection_options(required=False)
@kube_options
@mount_options
@traffic_options
@_verbosity_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[--] COMMAND [ARGS]...")
def run(connection: ConnectionArgs, kube: KubeArgs, mounts: MountArgs, mirror: MirrorArgs, steal: StealArgs,
        verbose: int, quiet: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND with a pod's network.

    COMMAND starts at `--` or at the first argument that is not an option; what follows it is
    COMMAND's own: sudo mirrord-ns run -t deploy/web curl -s http://api/
    """
    agent, keys = connection.agent, (connection.identity, connection.host_key)
    if agent and (kube.target or kube.dry_run):
        raise click.UsageError("--agent names a running agent; --target and --dry-run launch one")
    if (agent and not all(keys)) or (not agent and any(keys)):
        raise click.UsageError("--agent, --identity and --agent-host-key go together")
    if agent and mounts.serve_fs:
        raise click.UsageError("--serve-fs is for the agent run launches; give it to `mirrord-ns agent` itself")
    if not command and not kube.dry_run:
        raise click.UsageError("missing COMMAND: mirrord-ns run [OPTIONS] [--] COMMAND [ARGS]...")
    if not kube.dry_run:
        _need_root()
    _logging(verbose, PROG, quiet)
    timing.mark("options parsed")
    from mirrord_tun.connect import load_keys
    from mirrord_tun.run import LocalSession

    timing.mark("session modules imported")
    steal.options()  # usage errors before anything starts

    async def go(address: str, key: Any, pinned: Any, probes: tuple[str, ...] = (),
                 volumes: tuple[str, ...] = (), progress: Any = None, **link: Any) -> int:
        new_sock = link.pop("reconnect", None)
        session = LocalSession(list(command), address, key, pinned, mirror_ports=mirror.ports,
                               spill_limit=mirror.spill_limit, steal=steal.options(probes), **link)
        session.new_sock = new_sock
        session.mounts = mounts.mounts(volumes)
        if progress is not None:
            session.progress = progress
        return await session.run()

    def in_cluster() -> int:
        from mirrord_tun.kube.session import prepare
        from mirrord_tun.progress import Progress

        plan = prepare(kube.options(mounts.serve_fs))
        if kube.dry_run:
            click.echo(plan.manifests_yaml(), nl=False)
            return 0
        progress = Progress.on_stderr(quiet)
        with progress, plan.launch(progress) as link:  # the session closes it before COMMAND starts
            return _run_async(lambda: go(link.address, plan.key, link.host_key, link.probe_sources, link.volumes,
                                         progress, sock=link.sock, env=link.env, reconnect=link.reconnect))

    def by_hand() -> Coroutine[Any, Any, int]:
        key, pinned = load_keys(connection.identity, connection.host_key)
        return go(agent, key, pinned)  # a plain call: no signal is taken between it and _run_async's list

    if connection.given():
        _exit_with(lambda: _run_async(by_hand))
    _exit_with(in_cluster)


@main.command(context_settings=_with_command)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[--] [COMMAND [ARGS]...]")
@click.option("-v", "--verbose", count=True, help="Also the tunnel's progress and counters; -vv adds debug lines.")
def demo(command: tuple[str, ...], verbose: int) -> None:
    """Try it on a throwaway namespace cluster.

    Builds the cluster, runs COMMAND (default: a tour) through it and removes it again.
    """
    _need_root()
    _logging(verbose, f"{PROG} demo")
    from mirrord_tun.demo import demo as run_demo

    sys.exit(run_demo(list(command), verbose))


@main.command()
@click.option("-n", "--namespace", shell_complete=complete_namespace,
              help="Only this namespace (default: every one you may list).")
@click.option("--context", shell_complete=complete_context, help="kubeconfig context (default: the current one).")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), help="kubeconfig file (default: as kubectl).")
@click.option("-v", "--verbose", count=True, help="Say what is examined; -vv adds debug lines.")
def cleanup(namespace: str | None, context: str | None, kubeconfig: str | None, verbose: int) -> None:
    """Remove what crashed sessions left behind.

    Your agent pods in the cluster, and dead agents' nft tables on this host.
    """
    _logging(verbose, PROG)
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
@click.option("--resume-timeout", type=click.FloatRange(min=0, max=24 * 3600), default=60, show_default=True,
              metavar="SECONDS", help="Keep a session whose connection dropped this long for its client "
              "to resume (0: end it at once).")
@click.option("--ipv6-forwarding", type=click.Choice(FORWARDING_MODES), default="auto", show_default=True,
              help="How IPv6 sessions switch forwarding on in the pod: per device (force_forwarding, Linux "
              "6.17+), with the global switch (net.ipv6.conf.all.forwarding, accept_ra kept working), "
              "auto (device where the kernel has it, else global), or off (IPv4-only sessions).")
@click.option("--serve-fs", type=click.Choice(SERVE_FS_KINDS), multiple=True,
              help="Serve `run --mount` files from these kinds of file systems too, which can hang "
              "(repeatable; refused by default: fuse, nfs, smb, 9p, ceph, afs, cluster; all).")
@click.option("--file-timeout", type=click.FloatRange(min=0.1, max=3600), default=15, show_default=True,
              metavar="SECONDS", help="Answer a file request that takes longer with an error.")
@click.option("--steal-proxy-workers", default="auto", show_default=True, metavar="N|auto",
              help="Processes besides the agent's own that serve each filtered steal port's requests to the pod "
              "(auto: none on a node of 2 CPUs, where they do not help; else one per CPU the agent may use past its "
              "own, at most 4, leaving 2 of the node's).")
@click.option("-v", "--verbose", count=True, help="-vv: debug lines and SSH details (sessions and "
              "their counters are always logged).")
def agent(listen: str, authorized_key: str | None, authorized_key_data: str | None, host_key: str | None,
          netns: str | None, pid: int | None, container_id: str | None, resolv_conf: str | None,
          idle_exit: float | None, resume_timeout: float, ipv6_forwarding: str, serve_fs: tuple[str, ...],
          file_timeout: float, steal_proxy_workers: str, verbose: int) -> None:
    """Serve tunnel sessions (run starts it)."""
    _need_root()
    from mirrord_tun.agent import keys
    from mirrord_tun.agent.containers import Process, find_pid
    from mirrord_tun.agent.guard import run_guarded
    from mirrord_tun.agent.target import resolve
    from mirrord_tun.connect import parse_hostport

    try:
        if container_id and (pid or netns):
            raise ValueError("give one of --container-id, --pid and --netns")
        chosen = find_pid(container_id) if container_id else pid
        target = resolve(netns, Process.hold(chosen, container_id) if chosen else None, resolv_conf)
        host, port = parse_hostport(listen)
        if steal_proxy_workers != "auto" and not (steal_proxy_workers.isdigit() and int(steal_proxy_workers) <= 64):
            raise ValueError(f"--steal-proxy-workers {steal_proxy_workers!r}: a number from 0 to 64, or auto")
        authorized = keys.authorized(authorized_key, authorized_key_data)
        key = keys.host_key(host_key)
    except Exception as e:  # noqa: BLE001
        raise click.ClickException(str(e))

    def worker() -> int:
        _logging(max(verbose, 1), "mirrord-ns agent")
        from mirrord_tun.agent.files import Policy
        from mirrord_tun.agent.server import Agent
        from mirrord_tun.agent.steal import workers

        workers.configure(None if steal_proxy_workers == "auto" else int(steal_proxy_workers))
        files = Policy(frozenset(serve_fs), file_timeout)
        try:
            _run_async(lambda: Agent(target, resume_timeout, ipv6_forwarding, files).serve(host, port, key, authorized,
                                                                                           idle_exit))
        except (OSError, ValueError) as e:
            click.echo(f"mirrord-ns agent: {e}", err=True)
            return 2
        return 0

    sys.exit(run_guarded(target.netns_path, worker))


@main.command()
@click.option("--netns", type=click.Path(exists=True), help="The namespace file (/run/netns/NAME, /proc/PID/ns/net).")
@click.option("--pid", type=int, help="This process's namespace (and its /etc/resolv.conf).")
@click.option("--container", metavar="NAME", help="This running Docker container's namespace (and resolver).")
@connection_options(required=True)
@_no_dns_option
@traffic_options
@_verbosity_options
def attach(netns: str | None, pid: int | None, container: str | None, connection: ConnectionArgs, no_dns: bool,
           mirror: MirrorArgs, steal: StealArgs, verbose: int, quiet: bool) -> None:
    """Give a running container a pod's network.

    Its namespace is put in the pod's network until Ctrl-C or SIGTERM, then restored as it was.
    """
    _need_root()
    _logging(verbose, PROG, quiet)
    from mirrord_tun import attach as at
    from mirrord_tun.connect import load_keys
    from mirrord_tun.run import LocalSession

    stealing = steal.options()

    async def go() -> int:
        target = at.resolve(netns, pid, container, dns=not no_dns)
        key, pinned = load_keys(connection.identity, connection.host_key)
        session = LocalSession([], connection.agent, key, pinned, mirror_ports=mirror.ports,
                               spill_limit=mirror.spill_limit, steal=stealing)
        return await at.until_signalled(at.attach(session, target))

    _exit_with(lambda: _run_async(go))


@main.command()
@click.option("--hold", is_flag=True, help="Only keep the namespace alive, as a pause container: the "
              "compose service the others join (`network_mode: service:NAME`) and that never restarts.")
@connection_options(required=False)
@_no_dns_option
@traffic_options
@_verbosity_options
def sidecar(hold: bool, connection: ConnectionArgs, no_dns: bool, mirror: MirrorArgs, steal: StealArgs,
            verbose: int, quiet: bool) -> None:
    """Keep this container in a pod's network.

    For compose: attaches again whenever the tunnel drops.
    """
    from mirrord_tun import attach as at

    if hold:
        sys.exit(at.hold())
    if not connection.given():
        raise click.UsageError("--agent, --identity and --agent-host-key are needed (or --hold)")
    _need_root()
    _logging(verbose, PROG, quiet)
    from mirrord_tun.connect import load_keys
    from mirrord_tun.run import LocalSession

    stealing = steal.options()

    async def go() -> int:
        key, pinned = load_keys(connection.identity, connection.host_key)
        return await at.sidecar(lambda: LocalSession([], connection.agent, key, pinned, mirror_ports=mirror.ports,
                                                     spill_limit=mirror.spill_limit, steal=stealing),
                                at.own_namespace(dns=not no_dns))

    _exit_with(lambda: _run_async(go))


# Cluster commands (defined with their completions in mirrord_tun.kube.commands, which imports
# no Kubernetes code until one runs).
from mirrord_tun.kube.commands import env as _env_command, ls as _ls_command  # noqa: E402

main.add_command(_ls_command)
main.add_command(_env_command)
timing.mark("command line imported")


def console() -> NoReturn:
    """The `mirrord-ns` command (and `python -m mirrord_tun`): `main`, then an exit that skips
    the interpreter's teardown. Freeing every module and object of asyncssh, cryptography and
    click at exit cost `run -- true` ~50 ms of CPU; the atexit handlers still run and the
    standard streams are flushed, as in a normal exit. With threads still running (none of
    ours at this point), the normal exit waits for them."""
    try:
        main()
        code: object = 0
    except SystemExit as e:
        code = e.code
    timing.mark("exit")
    if threading.active_count() > 1:
        sys.exit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what sys.exit("text") prints
        code = 1
    atexit._run_exitfuncs()  # logging's flush among them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: the normal exit would only say so
            pass
    os._exit(code or 0)
