"""The `mirrord-ns` command line."""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Coroutine, TypeVar

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mirrord-ns")
def main() -> None:
    """Run a local program inside a Kubernetes pod's network."""


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--agent", "agent", metavar="HOST:PORT", required=True, help="Address of a running agent.")
@click.option("--identity", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Private key (OpenSSH format) the agent authorizes.")
@click.option("--agent-host-key", type=click.Path(exists=True, dir_okay=False), required=True,
              help="The agent's public host key; any other key is refused.")
@click.option("-v", "--verbose", count=True, help="Progress and per-session counters on stderr.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(agent: str, identity: str, agent_host_key: str, verbose: int, command: tuple[str, ...]) -> None:
    """Run COMMAND with the pod's network: sudo mirrord-ns run --agent H:P ... -- CMD ARGS..."""
    _need_root()
    _logging(verbose, "mirrord-ns")
    from mirrord_tun.connect import SetupError, load_keys
    from mirrord_tun.run import LocalSession

    async def go() -> int:
        key, pinned = load_keys(identity, agent_host_key)
        return await LocalSession(list(command), agent, key, pinned).run()

    try:
        code = _run_async(go())
    except SetupError as e:
        click.echo(f"mirrord-ns: {e}", err=True)
        code = 2
    sys.exit(code)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def demo(command: tuple[str, ...]) -> None:
    """Build a throwaway cluster from namespaces and run COMMAND (default: a tour) through it."""
    _need_root()
    from mirrord_tun.demo import demo as run_demo

    sys.exit(run_demo(list(command)))


@main.command()
@click.option("--listen", metavar="HOST:PORT", required=True, help="Where to accept the client's SSH connection.")
@click.option("--authorized-key", type=click.Path(exists=True, dir_okay=False), required=True,
              help="The one public key allowed to log in.")
@click.option("--host-key", type=click.Path(exists=True, dir_okay=False), required=True,
              help="This agent's private host key.")
@click.option("--netns", type=click.Path(exists=True), help="Work in this network namespace (file).")
@click.option("--pid", type=int, help="Work in this process's network namespace.")
@click.option("--resolv-conf", type=click.Path(dir_okay=False), help="Resolver configuration to report.")
@click.option("-v", "--verbose", count=True)
def agent(listen: str, authorized_key: str, host_key: str, netns: str | None, pid: int | None,
          resolv_conf: str | None, verbose: int) -> None:
    """Serve tunnel sessions into a namespace (normally started by `run`)."""
    _need_root()
    from mirrord_tun.agent.guard import run_guarded
    from mirrord_tun.agent.target import resolve
    from mirrord_tun.connect import parse_hostport

    try:
        target = resolve(netns, pid, resolv_conf)
        host, port = parse_hostport(listen)
    except Exception as e:  # noqa: BLE001
        raise click.ClickException(str(e))

    def worker() -> int:
        _logging(max(verbose, 1), "mirrord-ns agent")
        from mirrord_tun.agent.server import Agent

        try:
            _run_async(Agent(target).serve(host, port, host_key, authorized_key))
        except (OSError, ValueError) as e:
            click.echo(f"mirrord-ns agent: {e}", err=True)
            return 2
        return 0

    sys.exit(run_guarded(target.netns_path, worker))
