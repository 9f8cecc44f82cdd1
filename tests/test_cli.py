"""The command line as a person meets it: typos, short options, aliases, the config file's layers,
one-line errors with exit 2, help that is whole.

Parsing is checked through click's own context (what `run` would receive), and end to end through
the installed `mirrord-ns` and `python -m mirrord_tun`; no namespace is needed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from conftest import INSTALLED, MIRRORD_NS, key_pair
from mirrord_tun import cli
from mirrord_tun.connect import SetupError, parse_hostport



@pytest.fixture(autouse=True)
def no_outside_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MIRRORD_NS_"):
            monkeypatch.delenv(name)


def mirrord_ns(*args: str, argv0: list[str] = MIRRORD_NS, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*argv0, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def parsed(*args: str) -> dict[str, Any]:
    """What `run ARGS` hands its function, flags, MIRRORD_NS_* variables and -f file applied."""
    with cli.run.make_context("run", list(args)) as ctx:
        return ctx.params


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mirrord-ns: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture
def keys(tmp_path: Path) -> tuple[str, str]:
    return key_pair(tmp_path)


# --- parsing

@pytest.mark.parametrize("argv0", [MIRRORD_NS, INSTALLED], ids=["python -m", "installed"])
@pytest.mark.parametrize("typo, meant", [("--taget", "--target"), ("--namspace", "--namespace"),
                                         ("--agent-imag", "--agent-image")])
def test_a_mistyped_option_is_an_error_not_the_command(argv0: list[str], typo: str, meant: str) -> None:
    line = one_error_line(mirrord_ns("run", typo, "pod/web", "--", "curl", "x", argv0=argv0))
    assert f"No such option '{typo}'" in line and "Did you mean" in line and meant in line
    assert "mirrord-ns run -h" in line


def test_options_this_version_lacks_are_refused() -> None:
    line = one_error_line(mirrord_ns("run", "--teleport", "-t", "pod/web", "--", "true"))
    assert "No such option '--teleport'" in line


@pytest.mark.parametrize("args", [("-t", "pod/web", "curl", "-s", "-t", "x"),
                                  ("-t", "pod/web", "--", "curl", "-s", "-t", "x"),
                                  ("--target=pod/web", "curl", "-s", "-t", "x"),
                                  ("-tpod/web", "--", "curl", "-s", "-t", "x")])
def test_the_command_starts_at_double_dash_or_the_first_word(args: tuple[str, ...]) -> None:
    p = parsed(*args)
    assert p["target"] == "pod/web"
    assert p["command"] == ("curl", "-s", "-t", "x")  # its options are its own


def test_a_command_that_looks_like_an_option_needs_double_dash() -> None:
    assert parsed("-n", "shop", "--", "--weird-name", "-v")["command"] == ("--weird-name", "-v")
    assert parsed("-n", "shop", "--", "--weird-name")["namespace"] == "shop"


def test_short_target_reaches_the_run_checks(keys: tuple[str, str]) -> None:
    """-t is --target: it collides with --agent, which only a parsed target can."""
    line = one_error_line(mirrord_ns("run", "-t", "pod/web", "--agent", "127.0.0.1:1", "--identity", keys[0],
                                     "--agent-host-key", keys[1], "curl", "-t"))
    assert "--agent names a running agent" in line


def test_the_command_is_started_only_after_the_options(keys: tuple[str, str]) -> None:
    """Options before COMMAND are parsed, COMMAND's own are not: the run fails at connecting."""
    line = one_error_line(mirrord_ns("exec", "--agent", "127.0.0.1:1", "--identity", keys[0],
                                     "--agent-host-key", keys[1], "curl", "--no-such-curl-option"))
    assert "agent 127.0.0.1:1" in line and "refused" in line.lower()


def test_exec_is_an_alias_listed_once() -> None:
    assert cli.main.get_command(click.Context(cli.main), "exec") is cli.run
    assert "exec" not in cli.main.commands
    out = mirrord_ns("--help").stdout
    assert "(alias: exec)" in out
    assert not any(line.split()[:1] == ["exec"] for line in out.splitlines())
    assert "Usage: mirrord-ns exec" in mirrord_ns("exec", "-h").stdout


def test_demo_takes_its_command_as_run_does() -> None:
    line = one_error_line(mirrord_ns("demo", "--tour"))
    assert "No such option '--tour'" in line
    with cli.demo.make_context("demo", ["curl", "-s", "http://svc/"]) as ctx:
        assert ctx.params["command"] == ("curl", "-s", "http://svc/")


# --- config file and environment

def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mirrord-ns.toml"
    path.write_text(text)
    return str(path)


def test_flags_beat_variables_beat_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, 'target = "pod/from-file"\nnamespace = "file-ns"\ncontext = "file-ctx"\n')
    p = parsed("-f", config, "--", "true")
    assert (p["target"], p["namespace"], p["context"]) == ("pod/from-file", "file-ns", "file-ctx")
    monkeypatch.setenv("MIRRORD_NS_TARGET", "pod/from-env")
    monkeypatch.setenv("MIRRORD_NS_NAMESPACE", "env-ns")
    p = parsed("-f", config, "--", "true")
    assert (p["target"], p["namespace"], p["context"]) == ("pod/from-env", "env-ns", "file-ctx")
    p = parsed("-f", config, "-t", "pod/from-flag", "true")
    assert (p["target"], p["namespace"], p["context"]) == ("pod/from-flag", "env-ns", "file-ctx")


def test_the_file_may_be_named_by_a_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIRRORD_NS_CONFIG", write(tmp_path, 'agent-image = "registry.example/agent:1"\n'))
    assert parsed("true")["agent_image"] == "registry.example/agent:1"


def test_every_kind_of_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, 'port = [8080, "9091:9090"]\nenv-exclude = ["A", "B"]\nno-env = true\n'
                   'kubeconfig = "kube/config"\nverbose = 2\n')
    p = parsed("-f", config, "true")
    assert p["port"] == dict([(8080, 8080), (9090, 9091)])
    assert p["env_exclude"] == ("A", "B") and p["no_env"] is True and p["verbose"] == 2
    assert p["kubeconfig"] == str(tmp_path / "kube" / "config")  # relative to the file, not the cwd
    monkeypatch.setenv("MIRRORD_NS_ENV_EXCLUDE", "C D")
    assert parsed("-f", config, "true")["env_exclude"] == ("C", "D")
    assert parsed("-f", config, "--env-exclude", "E", "true")["env_exclude"] == ("E",)


@pytest.mark.parametrize("text, says", [
    ('taget = "pod/web"\n', "unknown key 'taget' (did you mean 'target'?)"),
    ('agent_image = "x"\n', "unknown key 'agent_image' (did you mean 'agent-image'?)"),
    ('config = "other.toml"\n', "unknown key 'config'"),
    ('port = 8080\n', "port: expected a list of strings, got a number (8080)"),
    ('port = [true]\n', "port: expected a list of strings"),
    ('no-env = "yes"\n', "no-env: expected true or false, got a string ('yes')"),
    ('target = 5\n', "target: expected a string, got a number (5)"),
    ('target = "pod/web\n', "mirrord-ns.toml: "),  # not TOML
])
def test_a_bad_file_is_one_line_and_exit_2(tmp_path: Path, text: str, says: str) -> None:
    line = one_error_line(mirrord_ns("run", "-f", write(tmp_path, text), "--", "true"))
    assert says in line, line


# --- one error style

def test_usage_errors_are_one_line() -> None:
    for args in (("run",), ("runn",), ("run", "--port", "http", "--", "true"), ("attach",),
                 ("run", "--agent", "127.0.0.1:1", "--", "true")):
        line = one_error_line(mirrord_ns(*args))
        reason, _, hint = line.partition(" Try '")
        assert hint.endswith(" -h' for help.") and reason[-1] in ".?!", line  # two sentences, not one run-on


def test_our_errors_exit_2_not_clicks_1() -> None:
    line = one_error_line(mirrord_ns("agent", "--listen", "127.0.0.1:1"))  # a ClickException
    assert "authorized-key" in line


def crash(*_args: object) -> list[str]:
    raise RuntimeError("wheel fell off\nsecond line")


def test_an_unexpected_exception_is_one_line_and_a_traceback_only_with_v(tmp_path: Path) -> None:
    script = ("import sys\nimport mirrord_tun.cleanup as c\n"
              "def crash(*_args):\n    raise RuntimeError('wheel fell off')\n"
              "c.clean_cluster = c.clean_host = crash\n"
              "from mirrord_tun.cli import main\nmain(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-c", script, "cleanup"], capture_output=True, text=True, timeout=60)
    line = one_error_line(r)
    assert line == "mirrord-ns: internal error: RuntimeError: wheel fell off (run with -v for details)"
    r = subprocess.run([sys.executable, "-c", script, "cleanup", "-v"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" in r.stderr and "wheel fell off" in r.stderr


def test_the_handler_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import mirrord_tun.cleanup

    monkeypatch.setattr(mirrord_tun.cleanup, "clean_cluster", crash)
    monkeypatch.setattr(mirrord_tun.cleanup, "clean_host", crash)
    r = CliRunner().invoke(cli.main, ["cleanup"])
    assert r.exit_code == 2
    assert r.stderr == ("mirrord-ns: internal error: RuntimeError: wheel fell off second line "
                        "(run with -v for details)\n")

    def interrupted(*_args: object) -> list[str]:
        raise KeyboardInterrupt

    monkeypatch.setattr(mirrord_tun.cleanup, "clean_cluster", interrupted)
    assert CliRunner().invoke(cli.main, ["cleanup"]).exit_code == 130


def test_a_missing_kubernetes_client_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import mirrord_tun.cleanup

    def no_client(*_args: object) -> list[str]:
        raise ModuleNotFoundError("No module named 'kubernetes'", name="kubernetes")

    monkeypatch.setattr(mirrord_tun.cleanup, "clean_cluster", no_client)
    r = CliRunner().invoke(cli.main, ["cleanup"])
    assert r.exit_code == 2 and "pip install" in r.stderr and len(r.stderr.splitlines()) == 1


def test_version_and_module_entry_points() -> None:
    from mirrord_tun import __version__

    for argv0 in (MIRRORD_NS, INSTALLED):
        r = mirrord_ns("--version", argv0=argv0)
        assert r.returncode == 0 and r.stdout.strip() == f"mirrord-ns, version {__version__}"


# --- help

def all_commands() -> list[click.Command]:
    return [cli.main, *cli.main.commands.values()]


@pytest.mark.parametrize("command", all_commands(), ids=lambda c: c.name)
def test_every_option_has_help(command: click.Command) -> None:
    ctx = click.Context(command, info_name=command.name)
    missing = [p.opts for p in command.get_params(ctx) if isinstance(p, click.Option) and not p.help]
    assert not missing


@pytest.mark.parametrize("command", list(cli.main.commands.values()), ids=lambda c: c.name)
def test_summaries_are_whole(command: click.Command) -> None:
    # click cuts a summary built from the docstring at `limit`; 45 is its default and what a
    # narrow terminal leaves.
    summary = command.get_short_help_str(limit=45)
    assert not summary.endswith("..."), f"first sentence of {command.name}'s help over 45 characters: {summary}"


def test_run_help_lists_the_exit_codes_and_the_layers() -> None:
    out = mirrord_ns("run", "-h").stdout
    assert "Exit status:" in out
    for code in ("130", "2 ", "128+N", "127"):
        assert code in out
    assert "MIRRORD_NS_TARGET" in out and "-f, --config FILE" in out and "-t, --target" in out


def test_mirror_spill_limit_takes_sizes() -> None:
    assert parsed("-t", "pod/web", "true")["mirror_spill_limit"] == 1 << 30
    assert parsed("--mirror-spill-limit", "512M", "-t", "pod/web", "true")["mirror_spill_limit"] == 512 << 20
    assert parsed("--mirror-spill-limit", "2GiB", "-t", "pod/web", "true")["mirror_spill_limit"] == 2 << 30
    line = one_error_line(mirrord_ns("run", "--mirror-spill-limit", "lots", "-t", "pod/web", "--", "true"))
    assert "expected a size such as 512M" in line


@pytest.mark.parametrize("value, parsed", [
    ("198.18.0.10", ("198.18.0.10", 2222)), ("198.18.0.10:2300", ("198.18.0.10", 2300)),
    ("agent.example:22", ("agent.example", 22)), ("[fd00::1]:2222", ("fd00::1", 2222)),
    ("[::]", ("::", 2222)), ("fd00::1", ("fd00::1", 2222)),  # a bare IPv6 address has no port, as in ssh
])
def test_agent_addresses_as_ssh_reads_them(value: str, parsed: tuple[str, int]) -> None:
    assert parse_hostport(value) == parsed


@pytest.mark.parametrize("value", ["[fd00::1", "[fd00::1]x", "[fd00::1]:", "198.18.0.10:x", ":22", "[::]:0",
                                   "198.18.0.10:70000"])
def test_a_bad_agent_address_is_refused(value: str) -> None:
    with pytest.raises(SetupError, match="bad address"):
        parse_hostport(value)
