"""kube/operations.py: each call is the request the generated client makes, and `run -t` and `ls`
never import the generated API classes (a second of CPU at every start)."""
from __future__ import annotations

import inspect
from typing import Any
from urllib.parse import parse_qsl

import pytest
from kubernetes import client

from kube_env import Api, api  # noqa: F401 - `api` is a fixture
from mirrord_tun.kube import operations

GENERATED = {"core": client.CoreV1Api, "apps": client.AppsV1Api, "batch": client.BatchV1Api}
TABLES = {"core": operations._CORE, "apps": operations._APPS, "batch": operations._BATCH}
# Awkward values on purpose: path parameters and query values must be quoted as the client quotes them.
ARGS = {"name": "web/../x y", "namespace": "team a", "body": {"kind": "Job", "metadata": {"name": "j"}}}
QUERY = {"label_selector": "app in (a,b),x!=y", "field_selector": "metadata.name=j", "watch": True,
         "timeout_seconds": 60, "resource_version": "7", "propagation_policy": "Background",
         "container": "app", "ports": "2222"}


class _Sent(Exception):
    pass


def sent(group: str, name: str, generated: bool) -> tuple[str, str, list[tuple[str, str]], str]:
    """(method, path, query, Accept) of one call, stopped before it leaves."""
    api_client = client.ApiClient(client.Configuration(host="https://k8s.test:6443"))
    seen: list[tuple[str, str, list[tuple[str, str]], str]] = []

    def call_api(method: str, url: str, header_params: dict[str, str] | None = None, *_: Any, **__: Any) -> Any:
        path, _, query = url.partition("?")
        seen.append((method, path, sorted(parse_qsl(query)), (header_params or {}).get("Accept", "")))
        raise _Sent

    api_client.call_api = call_api  # type: ignore[method-assign]
    target: Any = GENERATED[group](api_client) if generated else getattr(operations, group)(api_client)
    call = getattr(target, name)
    params = inspect.signature(getattr(GENERATED[group], name)).parameters
    args = [ARGS[p] for p, v in params.items() if p in ARGS and v.default is inspect.Parameter.empty]
    query = {k: v for k, v in QUERY.items() if k in params}
    with pytest.raises(_Sent):
        call(*args, **query)
    return seen[0]


@pytest.mark.parametrize("group, name", [(g, n) for g, table in TABLES.items() for n in table])
def test_each_operation_sends_what_the_generated_method_sends(group: str, name: str) -> None:
    *request, accept = sent(group, name, generated=False)
    assert tuple(request) == sent(group, name, generated=True)[:3]
    assert accept in ("application/json", "*/*")


@pytest.mark.parametrize("group, name", [(g, n) for g, table in TABLES.items() for n in table])
def test_each_operation_returns_the_generated_methods_type(group: str, name: str) -> None:
    want = inspect.signature(getattr(GENERATED[group], name)).return_annotation
    got = inspect.signature(getattr(getattr(operations, group)(client.ApiClient()), name)).return_annotation
    assert got == want.__name__


def test_a_wrong_call_is_a_type_error_and_an_unknown_one_an_attribute_error() -> None:
    core = operations.core(client.ApiClient())
    with pytest.raises(TypeError, match="name, namespace"):
        core.read_namespaced_pod("web")
    with pytest.raises(AttributeError):
        core.replace_namespaced_pod  # noqa: B018 - not one of ours


def imported(api: Api, monkeypatch: pytest.MonkeyPatch, *args: str) -> set[str]:
    """The modules `mirrord-ns ARGS` imported, from the interpreter's own account."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    r = api.cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    return {line.rpartition("|")[2].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args", [("run", "--dry-run", "--target", "deploy/web", "--", "true"), ("ls", "-A")])
def test_the_generated_api_classes_are_never_imported(api: Api, monkeypatch: pytest.MonkeyPatch,
                                                      args: tuple[str, ...]) -> None:
    modules = imported(api, monkeypatch, *args)
    assert "kubernetes.client.models.v1_pod" in modules  # the probe sees the client's imports
    assert not [m for m in modules if m.startswith("kubernetes.client.api.")]
