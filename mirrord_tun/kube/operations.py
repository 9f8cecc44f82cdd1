"""The Kubernetes API operations mirrord-ns makes, one line each: HTTP method, path, what comes back.

The client's generated classes (CoreV1Api, AppsV1Api, BatchV1Api) wrap each of their ~580
methods in pydantic validation and import every model those methods name when they are imported:
1.0-1.1 s of CPU of every `run -t` on the 2-core test machine, where the models we read cost
0.3-0.4 s (docs/benchmarks.md, "Tenth pass"). These are the same
requests through the same ApiClient (the kubeconfig's credentials, TLS and proxy), under the
generated methods' names, with their arguments, returning their models and raising their
ApiException, so kubernetes.watch and kubernetes.stream (the port-forward) take them as they take
the generated methods. A body is sent as given (the manifest's dict), not first read into a model.
"""
from __future__ import annotations

import inspect
from typing import Any

from kubernetes import client

_NS = "/namespaces/{namespace}"
_POD = f"/api/v1{_NS}/pods/{{name}}"
# name: (HTTP method, path, what the call returns: a model's name, "str" or "object", a dict).
_CORE = {
    "read_namespaced_pod": ("GET", _POD, "V1Pod"),
    "delete_namespaced_pod": ("DELETE", _POD, "V1Pod"),
    "read_namespaced_pod_log": ("GET", f"{_POD}/log", "str"),
    "connect_get_namespaced_pod_portforward": ("GET", f"{_POD}/portforward", "str"),
    "list_namespaced_pod": ("GET", f"/api/v1{_NS}/pods", "V1PodList"),
    "list_pod_for_all_namespaces": ("GET", "/api/v1/pods", "V1PodList"),
    "list_namespaced_event": ("GET", f"/api/v1{_NS}/events", "CoreV1EventList"),
    "read_namespaced_config_map": ("GET", f"/api/v1{_NS}/configmaps/{{name}}", "V1ConfigMap"),
    "read_namespaced_secret": ("GET", f"/api/v1{_NS}/secrets/{{name}}", "V1Secret"),
    "read_node": ("GET", "/api/v1/nodes/{name}", "V1Node"),
    "list_namespace": ("GET", "/api/v1/namespaces", "V1NamespaceList"),
}
_APPS = {
    "read_namespaced_deployment": ("GET", f"/apis/apps/v1{_NS}/deployments/{{name}}", "V1Deployment"),
    "list_namespaced_deployment": ("GET", f"/apis/apps/v1{_NS}/deployments", "V1DeploymentList"),
    "list_deployment_for_all_namespaces": ("GET", "/apis/apps/v1/deployments", "V1DeploymentList"),
    "read_namespaced_stateful_set": ("GET", f"/apis/apps/v1{_NS}/statefulsets/{{name}}", "V1StatefulSet"),
    "list_namespaced_stateful_set": ("GET", f"/apis/apps/v1{_NS}/statefulsets", "V1StatefulSetList"),
    "list_stateful_set_for_all_namespaces": ("GET", "/apis/apps/v1/statefulsets", "V1StatefulSetList"),
}
_BATCH = {
    "create_namespaced_job": ("POST", f"/apis/batch/v1{_NS}/jobs", "V1Job"),
    "delete_namespaced_job": ("DELETE", f"/apis/batch/v1{_NS}/jobs/{{name}}", "object"),
    "list_namespaced_job": ("GET", f"/apis/batch/v1{_NS}/jobs", "V1JobList"),
    "list_job_for_all_namespaces": ("GET", "/apis/batch/v1/jobs", "V1JobList"),
}


class ApiGroup:
    """One API group's operations as methods (`group.read_namespaced_pod(name, namespace)`)."""

    def __init__(self, api_client: client.ApiClient, operations: dict[str, tuple[str, str, str]]) -> None:
        self.api_client = api_client  # where kubernetes.stream swaps call_api for its websocket
        self._operations = operations

    def __getattr__(self, name: str) -> Operation:
        try:
            method, path, returns = self._operations[name]
        except KeyError:
            raise AttributeError(name) from None
        return Operation(self, name, method, path, returns)


def core(api_client: client.ApiClient) -> ApiGroup:
    return ApiGroup(api_client, _CORE)


def apps(api_client: client.ApiClient) -> ApiGroup:
    return ApiGroup(api_client, _APPS)


def batch(api_client: client.ApiClient) -> ApiGroup:
    return ApiGroup(api_client, _BATCH)


class Operation:
    """One operation, bound to its group as a method is to its object: kubernetes.stream finds the
    ApiClient at `__self__.api_client`, kubernetes.watch the listed type in the signature."""

    def __init__(self, group: ApiGroup, name: str, method: str, path: str, returns: str) -> None:
        self.__self__, self.__name__ = group, name
        self.method, self.path, self.returns = method, path, returns
        # The generated methods' positional order: name, namespace, then a create's body.
        self.positional = [p for p in ("name", "namespace") if f"{{{p}}}" in path] + ["body"] * (method == "POST")
        self.__signature__ = inspect.Signature(return_annotation=returns)

    def __call__(self, *args: Any, _request_timeout: Any = None, _preload_content: bool = True,
                 **query: Any) -> Any:
        if len(args) != len(self.positional):
            raise TypeError(f"{self.__name__}() takes {', '.join(self.positional) or 'no arguments'}")
        params = dict(zip(self.positional, args))
        body = params.pop("body", None)
        api = self.__self__.api_client
        headers = {"Accept": "*/*" if self.returns == "str" else "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = api.param_serialize(self.method, self.path, path_params=params, header_params=headers,
                                      query_params=[(_camel(k), v) for k, v in query.items() if v is not None],
                                      body=body, auth_settings=["BearerToken"])
        response = api.call_api(*request, _request_timeout=_request_timeout)
        if not _preload_content:  # a watch's stream, a port-forward's websocket: handed over unread
            if not 200 <= response.status <= 299:
                response.read()
                raise client.ApiException.from_response(http_resp=response, body=None, data=None)
            return response.response
        response.read()
        return api.response_deserialize(response, {"2XX": self.returns}).data


def _camel(name: str) -> str:
    """The query parameter of a keyword argument, as the generated methods name it
    (label_selector: labelSelector); none of ours holds an acronym."""
    first, *rest = name.split("_")
    return first + "".join(word.capitalize() for word in rest)
