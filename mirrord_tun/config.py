"""Option values from a TOML file (`-f/--config FILE`) and from `MIRRORD_NS_*` variables.

Strongest first: flags, environment variables, the file, built-in defaults. Click already orders
the command line, its `auto_envvar_prefix` variables and its context's `default_map` that way, so
the file only has to become the `default_map` before the other options are read: the option
that names it is eager.
"""
from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import click

ENV_PREFIX = "MIRRORD_NS"  # MIRRORD_NS_TARGET, MIRRORD_NS_NAMESPACE, ...

F = TypeVar("F", bound=Callable[..., Any])

_TOML_TYPES = {bool: "true or false", int: "a number", float: "a number", str: "a string",
               list: "a list", dict: "a table"}
_LIST_OF = {bool: "true or false values", int: "numbers", float: "numbers", str: "strings"}


class ConfigError(click.ClickException):
    """A config file that cannot be used: a usage error, not a failure of the session."""

    exit_code = 2


def config_option(f: F) -> F:
    """`-f/--config FILE` for a command whose options the file may set."""
    return click.option(
        "-f", "--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
        callback=_use, help="TOML file of option values, keys named like the long options "
        "(target = \"pod/web\"); flags and MIRRORD_NS_* variables override it.")(f)


def _use(ctx: click.Context, _param: click.Parameter, path: str | None) -> None:
    if path:
        ctx.default_map = {**(ctx.default_map or {}), **read(path, ctx.command)}


def read(path: str, command: click.Command) -> dict[str, Any]:
    """The file as a click `default_map` for `command`: values checked, relative paths made absolute."""
    import difflib
    import tomllib  # here: only a -f file needs them (~2 ms of every start)

    from mirrord_tun.kube.asuser import principal

    try:
        got = principal().read([path])[path]  # with the rights of the user behind sudo
        if isinstance(got, OSError):
            raise got
        data = tomllib.loads(got.decode())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    options = settable(command)
    folder = os.path.dirname(os.path.abspath(path))
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        option = options.get(key)
        if option is None:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")
        defaults[str(option.name)] = _checked(path, key, option, value, folder)
    return defaults


def settable(command: click.Command) -> dict[str, click.Option]:
    """File keys (the long option names without dashes) and their options."""
    return {opt[2:]: p for p in command.params if isinstance(p, click.Option) and p.name not in (None, "config")
            for opt in p.opts if opt.startswith("--")}


def _checked(path: str, key: str, option: click.Option, value: Any, folder: str) -> Any:
    want = _python_types(option)
    if option.multiple:
        # Port numbers read naturally as TOML integers; click turns them into the option's strings.
        items = (*want, int) if want == (str,) else want
        if not isinstance(value, list) or not all(_is(v, items) for v in value):
            raise ConfigError(f"{path}: {key}: expected a list of {_LIST_OF[want[0]]}, got {_shown(value)}")
        return [_located(option, str(v) if want == (str,) else v, folder) for v in value]
    if not _is(value, want):
        raise ConfigError(f"{path}: {key}: expected {_TOML_TYPES[want[0]]}, got {_shown(value)}")
    return _located(option, value, folder)


def _python_types(option: click.Option) -> tuple[type, ...]:
    if option.is_flag and not option.count:
        return (bool,)
    if isinstance(option.type, click.types.IntParamType):
        return (int,)
    if isinstance(option.type, click.types.FloatParamType):
        return (float, int)
    return (str,)


def _is(value: Any, types: tuple[type, ...]) -> bool:
    # bool is an int to Python, but `port = true` is a mistake, not port 1.
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _located(option: click.Option, value: Any, folder: str) -> Any:
    """A path in the file is relative to the file's folder, not to wherever the command runs."""
    if isinstance(option.type, click.Path) and isinstance(value, str):
        return os.path.join(folder, os.path.expanduser(value))
    return value


def _shown(value: Any) -> str:
    kind = next((name for t, name in _TOML_TYPES.items() if isinstance(value, t)), type(value).__name__)
    return f"{kind} ({value!r})" if not isinstance(value, (list, dict)) else kind
