"""Drives `kcontrol apiserver` with the official Kubernetes Python client.

Usage: python3 client.py KUBECONFIG [expired]. Exits non-zero (with a
traceback) on the first failed check; prints "python client: ok" at the end.
With `expired` (against a server compacting every second) it only checks
that a watch from a compacted resourceVersion raises a 410.
"""

import sys
import threading
import time

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

config.load_kube_config(config_file=sys.argv[1])
core = client.CoreV1Api()
apps = client.AppsV1Api()
NS = "py"

if sys.argv[2:] == ["expired"]:
    cm = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="old"), data={"k": "1"})
    old_rv = core.create_namespaced_config_map("default", cm).metadata.resource_version
    deadline = time.time() + 30
    n = 0
    while True:
        n += 1
        core.patch_namespaced_config_map("old", "default", {"data": {"k": str(n)}})
        try:
            for _ in watch.Watch().stream(
                core.list_namespaced_config_map,
                "default",
                resource_version=old_rv,
                timeout_seconds=1,
            ):
                pass
        except ApiException as e:
            assert e.status == 410, e
            break
        assert time.time() < deadline, "no 410 for a compacted resourceVersion"
        time.sleep(0.2)
    print("python client: ok")
    sys.exit(0)

names = {ns.metadata.name for ns in core.list_namespace().items}
assert {"default", "kube-system"} <= names, names
assert client.VersionApi().get_code().minor == "33"

core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))


def pod(name, labels):
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1PodSpec(
            containers=[
                client.V1Container(
                    name="c",
                    image="busybox:1.36",
                    ports=[client.V1ContainerPort(container_port=80)],
                )
            ]
        ),
    )


# Watch from the list's resourceVersion while pods come and go.
start = core.list_namespaced_pod(NS).metadata.resource_version
seen = []
ready = threading.Event()


def watcher():
    w = watch.Watch()
    ready.set()
    for ev in w.stream(
        core.list_namespaced_pod, NS, resource_version=start, timeout_seconds=20
    ):
        seen.append((ev["type"], ev["object"].metadata.name))
        if ev["type"] == "DELETED" and ev["object"].metadata.name == "a":
            w.stop()


t = threading.Thread(target=watcher)
t.start()
ready.wait()

created = core.create_namespaced_pod(NS, pod("a", {"app": "a", "tier": "x"}))
assert created.metadata.uid and created.metadata.creation_timestamp
assert created.spec.restart_policy == "Always"
assert created.status.phase == "Pending"
core.create_namespaced_pod(NS, pod("b", {"app": "b"}))
gen = core.create_namespaced_pod(
    NS,
    client.V1Pod(
        metadata=client.V1ObjectMeta(generate_name="gen-"),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="x")]),
    ),
)
assert gen.metadata.name.startswith("gen-") and len(gen.metadata.name) == 9

assert [p.metadata.name for p in core.list_namespaced_pod(NS, label_selector="app=a").items] == ["a"]
assert len(core.list_namespaced_pod(NS, label_selector="app in (a,b)").items) == 2
assert [p.metadata.name for p in core.list_namespaced_pod(NS, field_selector="metadata.name=b").items] == ["b"]
assert len(core.list_pod_for_all_namespaces(field_selector="status.phase=Pending").items) >= 3

page = core.list_namespaced_pod(NS, limit=2)
assert len(page.items) == 2 and page.metadata._continue
rest = core.list_namespaced_pod(NS, limit=2, _continue=page.metadata._continue)
assert len(rest.items) == 1 and not rest.metadata._continue

core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"tier": "y"}}})
assert core.read_namespaced_pod("a", NS).metadata.labels["tier"] == "y"
core.patch_namespaced_pod_status("a", NS, {"status": {"phase": "Running", "podIP": "10.0.0.5"}})
assert core.read_namespaced_pod("a", NS).status.pod_ip == "10.0.0.5"

# A stale resourceVersion is a 409.
stale = core.read_namespaced_pod("b", NS)
core.patch_namespaced_pod("b", NS, {"metadata": {"labels": {"n": "1"}}})
stale.metadata.labels = {"n": "2"}
try:
    core.replace_namespaced_pod("b", NS, stale)
    raise AssertionError("stale update accepted")
except ApiException as e:
    assert e.status == 409, e

# Invalid objects are a 422 naming the field.
try:
    core.create_namespaced_pod(NS, pod("Bad_Name", {}))
    raise AssertionError("bad name accepted")
except ApiException as e:
    assert e.status == 422 and "metadata.name" in e.body, e

core.delete_namespaced_pod("a", NS)
t.join(timeout=30)
assert not t.is_alive(), "watch did not end"
types = [ty for ty, name in seen if name == "a"]
assert types[0] == "ADDED" and "MODIFIED" in types and types[-1] == "DELETED", seen
assert ("ADDED", "b") in seen, seen

# A watch with timeoutSeconds ends by itself.
n = sum(1 for _ in watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=1))
assert n == 2, n  # initial ADDED events for b and gen-…

# Deployments and their scale subresource.
dep = client.V1Deployment(
    metadata=client.V1ObjectMeta(name="d"),
    spec=client.V1DeploymentSpec(
        selector=client.V1LabelSelector(match_labels={"app": "d"}),
        template=client.V1PodTemplateSpec(
            metadata=client.V1ObjectMeta(labels={"app": "d"}),
            spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="nginx")]),
        ),
    ),
)
d = apps.create_namespaced_deployment(NS, dep)
assert d.spec.replicas == 1 and d.metadata.generation == 1
apps.patch_namespaced_deployment_scale("d", NS, {"spec": {"replicas": 4}})
assert apps.read_namespaced_deployment("d", NS).spec.replicas == 4
assert apps.read_namespaced_deployment_scale("d", NS).spec.replicas == 4

svc = core.create_namespaced_service(
    NS,
    client.V1Service(
        metadata=client.V1ObjectMeta(name="s"),
        spec=client.V1ServiceSpec(selector={"app": "d"}, ports=[client.V1ServicePort(port=80)]),
    ),
)
assert svc.spec.cluster_ip.startswith("10."), svc.spec.cluster_ip

core.delete_namespace(NS)
try:
    core.read_namespaced_pod("b", NS)
    raise AssertionError("pod survived its namespace")
except ApiException as e:
    assert e.status == 404, e
print("python client: ok")
