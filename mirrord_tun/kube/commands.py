"""`mirrord-ns ls`, `mirrord-ns env`, and shell completion of targets, namespaces and contexts.

Imported with the command line, so only click and the standard library at the top:
the Kubernetes client is imported when a command or a completion runs.

Completion: `eval "$(_MIRRORD_NS_COMPLETE=bash_source mirrord-ns)"` in ~/.bashrc
(zsh_source, fish_source likewise). A completion never fails: whatever goes wrong
(no kubeconfig, an unreachable or forbidden API) offers nothing.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any, Callable, NoReturn, TypeVar

import click

T = TypeVar("T")
COMPLETION_TIMEOUT = 3  # seconds per API call: the shell waits for it
_BARE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+\Z")  # needs no quotes in sh nor in any dotenv reader
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")  # what dotenv readers take as a name


# --- shell completion: click's `shell_complete=` callbacks
def complete_context(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    def contexts() -> list[str]:
        from mirrord_tun.kube import kubeconfig

        return sorted(kubeconfig.load(ctx.params.get("kubeconfig")).items["contexts"])
    return [c for c in _quietly(contexts) if c.startswith(incomplete)]


def complete_namespace(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    def names() -> list[str]:
        from mirrord_tun.kube.listing import namespaces

        return namespaces(_cluster(ctx.params), COMPLETION_TIMEOUT)
    return [n for n in _quietly(names) if n.startswith(incomplete)]


def complete_target(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    """`pod/NAME`, `deploy/NAME`, `statefulset/NAME`; a kind typed as an alias (`sts/`, `deployment/`)
    is kept as typed."""
    def found() -> list[str]:
        from mirrord_tun.kube.listing import targets
        from mirrord_tun.kube.targets import KINDS

        listed = targets(_cluster(ctx.params), all_namespaces=False, timeout=COMPLETION_TIMEOUT)
        typed, sep, rest = incomplete.partition("/")
        if sep and typed.lower() in KINDS:
            kind = KINDS[typed.lower()]
            return [f"{typed}/{t.name}" for t in listed if t.kind == kind and t.name.startswith(rest)]
        return [t.target for t in listed if t.target.startswith(incomplete)]
    return _quietly(found)


def _quietly(fn: Callable[[], list[T]]) -> list[T]:
    """fn's answer, or nothing if anything fails; no warnings on the terminal mid-completion."""
    logging.disable(logging.CRITICAL)
    try:
        from mirrord_tun.kube import require

        require()
        return fn()
    except Exception:  # noqa: BLE001 - a completion offers nothing rather than fail
        return []
    finally:
        logging.disable(logging.NOTSET)


def _cluster(params: dict[str, Any]) -> Any:
    from mirrord_tun.kube.cluster import connect

    return connect(params.get("context"), params.get("kubeconfig"), params.get("namespace"))


# --- the commands
def _cluster_options(f: Callable[..., None]) -> Callable[..., None]:
    for option in reversed([
        click.option("-n", "--namespace", shell_complete=complete_namespace,
                     help="The namespace (default: the context's)."),
        click.option("--context", shell_complete=complete_context, help="kubeconfig context (default: the current one)."),
        click.option("--kubeconfig", type=click.Path(dir_okay=False), help="kubeconfig file (default: as kubectl)."),
        click.option("-v", "--verbose", count=True, help="Say more on stderr (e.g. which pod and container were chosen)."),
    ]):
        f = option(f)
    return f


@click.command("ls")
@_cluster_options
@click.option("-A", "--all-namespaces", is_flag=True, help="Targets in every namespace (default: -n's).")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: one target a line; json: a list of {target, namespace, kind, name, containers}.")
def ls(namespace: str | None, context: str | None, kubeconfig: str | None, verbose: int,
       all_namespaces: bool, output: str) -> None:
    """List the targets --target can name.

    Running, ready pods, and the deployments and statefulsets that have one."""
    if all_namespaces and namespace:
        raise click.UsageError("give -n NAMESPACE or -A, not both")

    def listed() -> list[Any]:
        from mirrord_tun.kube.listing import targets

        return targets(_cluster(dict(context=context, kubeconfig=kubeconfig, namespace=namespace)), all_namespaces)
    found = _or_exit(verbose, listed)
    if not found and output == "text":
        click.echo(f"mirrord-ns: no targets in {'any namespace' if all_namespaces else 'the namespace'}", err=True)
    if output == "json":
        click.echo(json.dumps([t.as_dict() for t in found], indent=2))
    elif all_namespaces:
        width = max((len(t.namespace) for t in found), default=0)
        for t in found:
            click.echo(f"{t.namespace:<{width}}  {t.target}")
    else:
        for t in found:
            click.echo(t.target)


@click.command("env")
@click.option("-t", "--target", metavar="KIND/NAME", required=True, shell_complete=complete_target,
              help="pod/NAME, deploy/NAME or statefulset/NAME.")
@_cluster_options
@click.option("--container", help="The container in a multi-container pod (default: as kubectl picks).")
@click.option("--env-exclude", metavar="NAME", multiple=True, help="Leave out this variable (repeatable).")
@click.option("--env-allow", metavar="NAME", multiple=True, help="Include this variable although it is a "
              "loader, shell or interpreter hook (LD_PRELOAD, BASH_ENV, NODE_OPTIONS...) (repeatable).")
@click.option("-o", "--output", "out", metavar="FILE", type=click.Path(dir_okay=False, allow_dash=True),
              default="-", help="Write here, readable only by you (default: standard output).")
def env(target: str, namespace: str | None, context: str | None, kubeconfig: str | None, verbose: int,
        container: str | None, env_exclude: tuple[str, ...], env_allow: tuple[str, ...], out: str) -> None:
    """Write a target's environment as dotenv.

    The target container's variables as `run` gives them to COMMAND, e.g. for an IDE's run configuration."""
    def resolved() -> dict[str, str]:
        from mirrord_tun.kube.env import container_env
        from mirrord_tun.kube.targets import resolve

        cluster = _cluster(dict(context=context, kubeconfig=kubeconfig, namespace=namespace))
        return container_env(cluster, resolve(cluster, target, container), frozenset(env_exclude),
                             frozenset(env_allow))
    text = dotenv(_or_exit(verbose, resolved))
    if out == "-":
        click.echo(text, nl=False)
        return
    try:
        _write_private(out, text)
    except OSError as e:
        _fail(f"cannot write {out}: {e.strerror or e}")


def dotenv(variables: dict[str, str]) -> str:
    """KEY=VALUE lines in POSIX shell quoting, which dotenv readers (python-dotenv, docker compose,
    node's dotenv) read the same way; `set -a; . FILE` in sh loads it too. A value is bare when
    it has nothing special, else in single quotes (literal, newlines included), else, when it
    holds a ' or a backslash, in double quotes with \\, ", $ and ` escaped by a backslash."""
    lines = []
    skipped = sorted(k for k in variables if not _NAME.match(k))
    if skipped:
        logging.getLogger("mirrord-ns").warning("environment: leaving out %s (not dotenv names)", ", ".join(skipped))
    for name, value in sorted(variables.items()):
        if name not in skipped:
            lines.append(f"{name}={_quote(value)}\n")
    return "".join(lines)


def _quote(value: str) -> str:
    if _BARE.match(value):
        return value
    if "'" not in value and "\\" not in value:
        return f"'{value}'"
    return '"' + re.sub(r'([\\"$`])', r"\\\1", value) + '"'


def _write_private(path: str, text: str) -> None:
    """Mode 0600 (the values may be secrets), also over an existing file; under sudo opened by the
    invoking user, so only a file they could write themselves is written."""
    from mirrord_tun.kube.asuser import principal

    principal().write_private(path, text.encode())


def _or_exit(verbose: int, fn: Callable[[], T]) -> T:
    """fn's answer; our errors as one line on stderr and exit 2."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="mirrord-ns: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its "Retrying (Retry(total=2...))" lines
    from mirrord_tun.connect import SetupError
    from mirrord_tun.kube import require

    try:
        require()
        return fn()
    except SetupError as e:
        _fail(str(e))


def _fail(message: str) -> NoReturn:
    click.echo(f"mirrord-ns: {message}", err=True)
    sys.exit(2)
