"""The installed environment is the lock: what CI tested is what a user gets.

scripts/install puts requirements-dev.lock (the suite's) or requirements.lock into .venv with
--require-hashes; here every pin whose marker holds on this Python is installed at exactly that
version, nothing else is installed beside the project and pip, and both locks still answer
pyproject.toml (a changed dependency range needs `scripts/lock`).
"""
from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
NOT_LOCKED = {"mirrord-ns", "pip"}  # the project itself (editable) and the venv's installer


def pins(lock: str) -> dict[str, str]:
    """{name: version} of the lock's entries that apply to this interpreter."""
    text = re.sub(r"\\\n\s*", " ", (REPO / lock).read_text())  # join the continued hash lines
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(re.sub(r"\s--hash=\S+", "", line))
        assert "--hash=sha256:" in line, f"{req.name} has no hash"
        if req.marker is None or req.marker.evaluate():
            [spec] = req.specifier
            assert spec.operator == "==", line
            out[canonicalize_name(req.name)] = spec.version
    return out


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}


def test_the_venv_holds_exactly_the_dev_lock() -> None:
    want, have = pins("requirements-dev.lock"), installed()
    assert {n: have.get(n) for n in want if have.get(n) != want[n]} == {}, "installed differs from the lock"
    assert set(have) - set(want) - NOT_LOCKED == set(), "installed but not locked"


def test_the_locks_answer_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    for lock, reqs in ((runtime, project["dependencies"]),
                       (dev, project["dependencies"] + project["optional-dependencies"]["test"])):
        for req in map(Requirement, reqs):
            if req.marker is None or req.marker.evaluate():
                name = canonicalize_name(req.name)
                assert name in lock and req.specifier.contains(lock[name], prereleases=True), \
                    f"{req} is not what the lock pins ({lock.get(name)}): run scripts/lock"
    # The runtime lock is the dev lock's subset at the same versions: the suite tests what users run.
    assert {n: v for n, v in dev.items() if n in runtime} == runtime
