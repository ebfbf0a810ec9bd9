"""The fake API server, driven by the unmodified official ``kubernetes`` client."""

from __future__ import annotations

import json
import time

import pytest
import urllib3
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import stream

APPLY = "application/apply-patch+yaml"


def ns_body(name, **labels):
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod_body(name, command=("sleep", "30"), labels=None, **spec):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {"app": "t"}},
            "spec": {"containers": [{"name": "main", "image": "python:3.12-slim", "command": list(command)}],
                     **spec}}


@pytest.fixture
def core(kube_api):
    return client.CoreV1Api(kube_api)


def wait_running(core, ns, name, timeout=10):
    w = watch.Watch()
    for ev in w.stream(core.list_namespaced_pod, ns, field_selector=f"metadata.name={name}",
                       timeout_seconds=timeout):
        if ev["object"].status.phase == "Running":
            w.stop()
            return ev["object"]
    raise AssertionError(f"pod {name} never ran")


def test_crud_and_selectors(fakekube, core):
    core.create_namespace(ns_body("a", team="x"))
    core.create_namespace(ns_body("b", team="y"))
    assert [n.metadata.name for n in core.list_namespace(label_selector="team=x").items] == ["a"]
    assert {n.metadata.name for n in core.list_namespace(label_selector="team in (x,y)").items} == {"a", "b"}
    assert [n.metadata.name for n in core.list_namespace(label_selector="team,team!=x").items] == ["b"]
    assert core.read_namespace("a").status.phase == "Active"
    cm = core.create_namespaced_config_map("a", {"apiVersion": "v1", "kind": "ConfigMap",
                                                 "metadata": {"name": "c", "labels": {"k": "v"}},
                                                 "data": {"x": "1"}})
    assert cm.metadata.uid and cm.metadata.resource_version
    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map("a", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "AlreadyExists"
    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map("nope", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})
    assert err.value.status == 404
    core.delete_namespaced_config_map("c", "a")
    with pytest.raises(ApiException) as err:
        core.read_namespaced_config_map("c", "a")
    assert err.value.status == 404
    # deleting a namespace deletes what is in it
    core.create_namespaced_service_account("b", {"apiVersion": "v1", "kind": "ServiceAccount",
                                                  "metadata": {"name": "s"}})
    core.delete_namespace("b")
    assert fakekube.objects("serviceaccounts", "b") == []


def test_invalid_objects_get_422(fakekube, core):
    core.create_namespace(ns_body("a"))
    for body in (ns_body("Upper"), ns_body("x", **{"bad label": "v"}), pod_body("P_1"),
                 {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bad_name"}}):
        with pytest.raises(ApiException) as err:
            if body["kind"] == "Namespace":
                core.create_namespace(body)
            elif body["kind"] == "Pod":
                core.create_namespaced_pod("a", body)
            else:
                core.create_namespaced_config_map("a", body)
        status = json.loads(err.value.body)
        assert err.value.status == 422 and status["reason"] == "Invalid", status
        assert status["details"]["causes"][0]["field"]


def test_schema_violations_get_422(fakekube):
    # the client validates typed bodies itself, so send raw JSON over HTTP to reach the server's check
    http = urllib3.PoolManager()
    body = pod_body("p")
    body["spec"]["containerz"] = []
    body["spec"]["containers"][0]["ports"] = [{"containerPort": "eighty"}]
    http.request("POST", fakekube.url + "/api/v1/namespaces", body=json.dumps(ns_body("a")),
                 headers={"Authorization": f"Bearer {fakekube.token}", "Content-Type": "application/json"})
    resp = http.request("POST", fakekube.url + "/api/v1/namespaces/a/pods", body=json.dumps(body),
                        headers={"Authorization": f"Bearer {fakekube.token}", "Content-Type": "application/json"})
    status = json.loads(resp.data)
    assert resp.status == 422 and status["reason"] == "Invalid", status
    assert fakekube.objects("pods", "a") == []


def test_server_side_apply(fakekube, core):
    core.create_namespace(ns_body("a"))
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"x": "1"}}
    first = core.patch_namespaced_config_map("c", "a", body, field_manager="sandbox-kernel", _content_type=APPLY)
    assert first.data == {"x": "1"} and first.metadata.managed_fields[0].manager == "sandbox-kernel"
    again = core.patch_namespaced_config_map("c", "a", body, field_manager="sandbox-kernel", _content_type=APPLY)
    assert again.metadata.resource_version == first.metadata.resource_version  # no-op
    body["data"]["y"] = "2"
    changed = core.patch_namespaced_config_map("c", "a", body, field_manager="sandbox-kernel", _content_type=APPLY)
    assert changed.data == {"x": "1", "y": "2"}
    assert int(changed.metadata.resource_version) > int(first.metadata.resource_version)
    assert fakekube.requests[-1].content_type == APPLY and fakekube.requests[-1].query["fieldManager"] == ["sandbox-kernel"]
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_config_map("c", "a", body, _content_type=APPLY)
    assert err.value.status == 400


def test_custom_resources(fakekube, kube_api):
    core = client.CoreV1Api(kube_api)
    custom = client.CustomObjectsApi(kube_api)
    core.create_namespace(ns_body("a"))
    cnp = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": "egress", "labels": {"k": "v"}},
           "spec": {"endpointSelector": {}, "egress": [{"toFQDNs": [{"matchName": "pypi.org"}]}]}}
    custom.patch_namespaced_custom_object("cilium.io", "v2", "a", "ciliumnetworkpolicies", "egress", cnp,
                                          field_manager="sandbox-kernel", _content_type=APPLY)
    got = custom.list_namespaced_custom_object("cilium.io", "v2", "a", "ciliumnetworkpolicies", label_selector="k=v")
    assert [i["metadata"]["name"] for i in got["items"]] == ["egress"]
    for group, version, plural, kind in [("networking.gke.io", "v1alpha1", "fqdnnetworkpolicies", "FQDNNetworkPolicy")]:
        custom.create_namespaced_custom_object(group, version, "a", plural, {
            "apiVersion": f"{group}/{version}", "kind": kind, "metadata": {"name": "x"}, "spec": {}})
        custom.delete_namespaced_custom_object(group, version, "a", plural, "x")
    with pytest.raises(ApiException) as err:  # kind must match the URL
        custom.create_namespaced_custom_object("cilium.io", "v2", "a", "ciliumnetworkpolicies",
                                               {"apiVersion": "cilium.io/v2", "kind": "Other", "metadata": {"name": "y"}})
    assert err.value.status == 422


def test_watch_and_resume(fakekube, core):
    core.create_namespace(ns_body("a"))
    seen = []
    rv = core.list_namespaced_config_map("a").metadata.resource_version
    core.create_namespaced_config_map("a", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c1"}})
    core.delete_namespaced_config_map("c1", "a")
    w = watch.Watch()
    for ev in w.stream(core.list_namespaced_config_map, "a", resource_version=rv, timeout_seconds=2):
        seen.append((ev["type"], ev["object"].metadata.name))
        if len(seen) == 2:
            w.stop()
    assert seen == [("ADDED", "c1"), ("DELETED", "c1")]
    # without a resourceVersion: the current objects as ADDED, then live changes
    core.create_namespaced_config_map("a", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c2"}})
    w = watch.Watch()
    events = []
    for ev in w.stream(core.list_namespaced_config_map, "a", timeout_seconds=2):
        events.append((ev["type"], ev["object"].metadata.name))
        if len(events) == 1:
            core.patch_namespaced_config_map("c2", "a", {"data": {"z": "1"}})
        if len(events) == 2:
            w.stop()
    assert events == [("ADDED", "c2"), ("MODIFIED", "c2")]
    assert fakekube.count("watch", "configmaps") == 2


def test_watch_times_out(core):
    core.create_namespace(ns_body("a"))
    t = time.monotonic()
    assert list(watch.Watch().stream(core.list_namespaced_config_map, "a", timeout_seconds=1)) == []
    assert 0.9 < time.monotonic() - t < 3


def test_pod_lifecycle_and_events(fakekube, core):
    core.create_namespace(ns_body("a"))
    core.create_namespaced_pod("a", pod_body("p"))
    pod = wait_running(core, "a", "p")
    assert pod.spec.node_name == "fake-node-1"
    assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "True"
    events = sorted(core.list_namespaced_event("a", field_selector="involvedObject.name=p").items,
                    key=lambda e: int(e.metadata.resource_version))
    assert [e.reason for e in events] == ["Scheduled", "Pulling", "Pulled", "Created", "Started"]
    assert events[1].message == 'Pulling image "python:3.12-slim"'
    assert len(fakekube.processes()) == 1  # the container's command really runs
    core.delete_namespaced_pod("p", "a")
    time.sleep(0.4)
    assert fakekube.processes() == []


def test_unschedulable_and_image_pull_failure(fakekube, core):
    core.create_namespace(ns_body("a"))
    fakekube.behavior.unschedulable = "0/3 nodes are available: 3 Insufficient memory."
    core.create_namespaced_pod("a", pod_body("p1"))
    fakekube.behavior.unschedulable = None
    fakekube.behavior.image_pull_error = "rpc error: code = NotFound desc = not found"
    core.create_namespaced_pod("a", pod_body("p2"))
    time.sleep(0.2)
    p1 = core.read_namespaced_pod("p1", "a")
    assert p1.status.phase == "Pending" and p1.status.conditions[0].reason == "Unschedulable"
    p2 = core.read_namespaced_pod("p2", "a")
    assert p2.status.container_statuses[0].state.waiting.reason == "ImagePullBackOff"
    reasons = {e.reason for e in core.list_namespaced_event("a").items}
    assert {"FailedScheduling", "Failed", "BackOff"} <= reasons
    assert fakekube.processes() == []


def test_rbac_forbidden_and_quota(fakekube, core):
    core.create_namespace(ns_body("a"))
    fakekube.forbid("create", "pods", namespace="a")
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod("a", pod_body("p"))
    status = json.loads(err.value.body)
    assert err.value.status == 403 and status["reason"] == "Forbidden"
    assert 'cannot create resource "pods" in API group "" in the namespace "a"' in status["message"]
    fakekube.rules.clear()
    core.create_namespaced_resource_quota("a", {"apiVersion": "v1", "kind": "ResourceQuota",
                                                "metadata": {"name": "q"}, "spec": {"hard": {"pods": "1"}}})
    core.create_namespaced_pod("a", pod_body("p"))
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod("a", pod_body("p2"))
    assert err.value.status == 403 and "exceeded quota: q" in json.loads(err.value.body)["message"]
    fakekube.exceed_quota("a")
    core.delete_namespaced_pod("p", "a")
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod("a", pod_body("p3"))
    assert "exceeded quota" in json.loads(err.value.body)["message"]


def test_access_review(fakekube, kube_api):
    fakekube.forbid("delete", "pods")
    authz = client.AuthorizationV1Api(kube_api)

    def review(verb, resource, sub=None):
        attrs = {"verb": verb, "resource": resource, "namespace": "a", "group": ""}
        if sub:
            attrs["subresource"] = sub
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": attrs}}
        return authz.create_self_subject_access_review(body).status.allowed

    assert review("create", "pods") is True
    assert review("delete", "pods") is False
    assert review("create", "pods", "exec") is True


def test_deletecollection_by_label(fakekube, core):
    core.create_namespace(ns_body("a"))
    for name, lab in (("c1", "x"), ("c2", "x"), ("c3", "y")):
        core.create_namespaced_config_map("a", {"apiVersion": "v1", "kind": "ConfigMap",
                                                "metadata": {"name": name, "labels": {"g": lab}}})
    core.delete_collection_namespaced_config_map("a", label_selector="g=x")
    assert [c["metadata"]["name"] for c in fakekube.objects("configmaps", "a")] == ["c3"]
    assert fakekube.requests[-1].verb == "deletecollection"


@pytest.mark.parametrize("protocols", [("v5.channel.k8s.io",), ("v4.channel.k8s.io",)])
def test_exec_round_trip(fakekube, core, protocols):
    fakekube.exec_protocols = protocols
    core.create_namespace(ns_body("a"))
    core.create_namespaced_pod("a", pod_body("p"))
    wait_running(core, "a", "p")
    ws = stream(core.connect_get_namespaced_pod_exec, "p", "a", command=["cat"], stdin=True, stdout=True,
                stderr=True, tty=False, _preload_content=False, binary=True)
    assert ws.subprotocol == protocols[0]
    ws.write_stdin(b"hello \xe2\x9c\x93\n")
    assert ws.readline_stdout(timeout=5) == "hello ✓".encode()
    if protocols[0].startswith("v5"):
        ws.close_channel(0)  # EOF on stdin: cat exits 0
        ws.run_forever(timeout=5)
        assert ws.returncode == 0
    else:
        ws.close()
    ws = stream(core.connect_get_namespaced_pod_exec, "p", "a",
                command=["sh", "-c", "echo out; echo err >&2; exit 7"], stdin=False, stdout=True, stderr=True,
                tty=False, _preload_content=False)
    ws.run_forever(timeout=5)
    assert ws.returncode == 7
    assert ws.read_all() in ("out\nerr\n", "err\nout\n")
    time.sleep(0.1)
    assert [p for p in fakekube.processes() if p is not None] and len(fakekube.processes()) == 1  # only main


def test_exec_sees_configmap_volume(fakekube, core):
    core.create_namespace(ns_body("a"))
    core.create_namespaced_config_map("a", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "code"},
                                            "binaryData": {"hello.py": "cHJpbnQoJ2hpIGZyb20gdm9sdW1lJyk="}})
    body = pod_body("p", volumes=[{"name": "code", "configMap": {"name": "code"}}, {"name": "tmp", "emptyDir": {}}])
    body["spec"]["containers"][0]["volumeMounts"] = [{"name": "code", "mountPath": "/opt/code"},
                                                     {"name": "tmp", "mountPath": "/tmp"}]
    core.create_namespaced_pod("a", body)
    wait_running(core, "a", "p")
    out = stream(core.connect_get_namespaced_pod_exec, "p", "a", command=["python3", "/opt/code/hello.py"],
                 stdin=False, stdout=True, stderr=True, tty=False)
    assert out == "hi from volume\n"


def test_exec_errors(fakekube, core):
    core.create_namespace(ns_body("a"))
    with pytest.raises(ApiException) as err:  # the client turns a failed upgrade into status 0
        stream(core.connect_get_namespaced_pod_exec, "nope", "a", command=["true"], stdout=True,
               stderr=True, stdin=False, tty=False)
    assert "404" in str(err.value.reason)
    fakekube.forbid("create", "pods/exec")
    core.create_namespaced_pod("a", pod_body("p"))
    wait_running(core, "a", "p")
    with pytest.raises(ApiException) as err:
        stream(core.connect_get_namespaced_pod_exec, "p", "a", command=["true"], stdout=True, stderr=True,
               stdin=False, tty=False)
    assert "403" in str(err.value.reason)
    assert ("", "pods/exec", "create") in fakekube.permissions_used()


def test_unauthorized_without_token(fakekube):
    config = client.Configuration(host=fakekube.url)
    with client.ApiClient(config) as api:
        with pytest.raises(ApiException) as err:
            client.CoreV1Api(api).list_namespace()
    assert err.value.status == 401
