"""What `python -m build` makes: a complete wheel and sdist, and a wheel that, installed into a
fresh virtualenv, runs from the repository folder without the folder shadowing it.

Offline, so CI needs no package index: the build uses this virtualenv's setuptools
(`--no-isolation`) on a copy of the sources (no build/ or egg-info left in the clone, no
stale build/lib in the wheel), and the fresh virtualenv gets the wheel alone
(`--no-deps --no-index`). Its dependencies come from this virtualenv's site-packages
through a .pth line, which puts that folder on sys.path without running the .pth
files in it, so the editable install of the checkout stays out.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"mirrord_tun": "mirrord_tun", "agent": "mirrord_tun/agent", "netns": "mirrord_tun/netns"}
TIMEOUT = 120  # a liveness bound for a build or an install on a loaded machine
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def _check(argv: list[str | Path], **kw: object) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=TIMEOUT,
                       **kw)  # type: ignore[call-overload]
    assert p.returncode == 0, f"{argv} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p


def _sources() -> dict[str, Path]:
    """Every module of the project as the wheel must name it, mapped to its source file."""
    out = {}
    for top, installed in PACKAGE_DIRS.items():
        for path in (REPO / top).rglob("*.py"):
            if "__pycache__" not in path.parts:
                out[f"{installed}/{path.relative_to(REPO / top).as_posix()}"] = path
    return out


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"))
    # sdist first, then the wheel from the unpacked sdist: a file the sdist lacks breaks the wheel.
    _check([sys.executable, "-m", "build", "--no-isolation", "--outdir", root / "dist", src])
    return root / "dist"


def _one(dist: Path, pattern: str) -> Path:
    found = list(dist.glob(pattern))
    assert len(found) == 1, f"{pattern}: {found}"
    return found[0]


def test_wheel_holds_every_module_under_mirrord_tun(dist: Path) -> None:
    names = set(zipfile.ZipFile(_one(dist, "*.whl")).namelist())
    missing = sorted(set(_sources()) - names)
    assert not missing, f"modules left out of the wheel (add the package to pyproject.toml): {missing}"
    stray = sorted(n for n in names if not n.startswith(("mirrord_tun/", f"mirrord_ns-{VERSION}.dist-info/")))
    assert not stray, f"files outside mirrord_tun/ in the wheel: {stray}"
    native = [n for n in names if re.fullmatch(r"mirrord_tun/_datapath\.[\w.-]+\.so", n)]
    assert native, "the C packet path (setup.py) was not built into the wheel"
    data = sorted(n for n in names if not n.endswith(".py") and "dist-info" not in n and n not in native)
    assert not data, f"non-Python files installed (MANIFEST.in is for the sdist): {data}"


def test_sdist_holds_docs_manifests_and_sources(dist: Path) -> None:
    # mirrord_ns-VERSION/ since setuptools 69.3 (PEP 625), mirrord-ns-VERSION/ before.
    names = {n.partition("/")[2] for n in tarfile.open(_one(dist, "*.tar.gz")).getnames()}
    wanted = {"README.md", "SECURITY.md", "pyproject.toml", "setup.py", "mirrord_tun/_datapath.c",
              "mirrord_tun/_gcm.c", "mirrord_tun/_gcm.h", "MANIFEST.in", "agent/Dockerfile",
              *(p.relative_to(REPO).as_posix() for p in (REPO / "deploy").iterdir()),
              *(p.relative_to(REPO).as_posix() for p in _sources().values())}
    assert not sorted(wanted - names), f"left out of the sdist: {sorted(wanted - names)}"


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    _check([sys.executable, "-m", "venv", "--without-pip", venv])
    _check([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index",
            "--no-cache-dir", "--disable-pip-version-check", "-q", _one(dist, "*.whl")])
    site = _check([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    Path(site.stdout.strip(), "dependencies-from-the-test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_installed_wheel_runs_from_the_repository_folder(venv: Path) -> None:
    p = _check([venv / "bin" / "mirrord-ns", "--version"], cwd=REPO)
    assert VERSION in p.stdout
    # The way the sandbox and demo start their children (python -P -m mirrord_tun ...):
    # the repository's own mirrord_tun/, which lacks agent/ and netns/, must not be the one found.
    p = _check([venv / "bin" / "python", "-P", "-c",
                "import mirrord_tun, mirrord_tun.agent.server, mirrord_tun.netns.namespace; print(mirrord_tun.__file__)"],
               cwd=REPO)
    assert Path(p.stdout.strip()).resolve().is_relative_to(venv.resolve())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_installed_demo_runs_from_the_repository_folder(venv: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUDO_")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    p = subprocess.run([venv / "bin" / "mirrord-ns", "demo", "--", "true"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr


def test_installed_metadata_names_the_dependencies(venv: Path) -> None:
    p = _check([venv / "bin" / "python", "-P", "-c",
                "import importlib.metadata as m; print('\\n'.join(m.requires('mirrord-ns')))"], cwd=REPO)
    required = p.stdout.split("\n")
    assert any(r.startswith("asyncssh") and "<3" in r for r in required), required
    assert any(r.startswith("kubernetes") and "extra" not in r for r in required), required
