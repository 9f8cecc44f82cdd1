"""Kubernetes targets: find the pod, launch an agent next to it, reach it, remove it.

The `kubernetes` client is a dependency but slow to import, so only the modules of
this package import it, and only `--target` and the commands that talk to a
cluster import those: `run --agent` never pays for it. This file stays light
(`kube.commands` is imported with the command line); `require()` is the gate the
command line calls before importing the rest.
"""
from __future__ import annotations

INSTALL_HINT = "pip install 'kubernetes>=37' PyYAML into mirrord-ns's environment, or reinstall mirrord-ns"


def require() -> None:
    """Raise SetupError (one line, exit 2) if the Kubernetes client cannot be imported."""
    try:
        import kubernetes.client  # noqa: F401 - the import is the check
        import yaml  # noqa: F401 - also the check: the kube modules load manifests with PyYAML
    except ImportError as e:
        from mirrord_tun.connect import SetupError

        raise SetupError(f"the Kubernetes client is not installed ({e.name or e}): {INSTALL_HINT}") from None
