"""deploy/k8s/components: the NetworkPolicy and the alert rules render on top of the base,
validate, and agree with the worker (its port and labels, its metrics, the guide's rules)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml

from tests.test_deploy import K8S, KUBECTL, ROOT, exported_sample_names, needs_kubectl, validate
from worker.ops import metrics

COMPONENTS = K8S / "components"


@pytest.fixture(scope="module")
def with_components(tmp_path_factory) -> dict[str, dict]:
    """The base with both components, rendered, by kind."""
    if KUBECTL is None:
        pytest.skip(needs_kubectl.kwargs["reason"])
    overlay = tmp_path_factory.mktemp("overlay")
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "base", overlay)],
                "components": [os.path.relpath(COMPONENTS / name, overlay) for name in ("network-policy", "alerts")],
            }
        )
    )
    result = subprocess.run(
        [KUBECTL, "kustomize", "--load-restrictor=LoadRestrictionsNone", str(overlay)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return {doc["kind"] if doc["kind"] != "ConfigMap" else doc["metadata"]["name"]: doc for doc in docs}


def test_the_network_policy_validates_and_selects_the_worker_pods(with_components):
    policy = with_components["NetworkPolicy"]
    validate(policy)
    pods = with_components["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pods.items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_the_network_policy_lets_in_only_the_metrics_port_and_out_only_dns_kafka_and_https(with_components):
    spec = with_components["NetworkPolicy"]["spec"]
    container = with_components["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    named = {port["name"]: port["containerPort"] for port in container["ports"]}
    (ingress,) = spec["ingress"]
    assert [p["port"] for p in ingress["ports"]] == ["metrics"] and named["metrics"] == 9000
    out = {(p["port"], p["protocol"]) for rule in spec["egress"] for p in rule["ports"]}
    assert out == {(53, "UDP"), (53, "TCP"), (9092, "TCP"), (9093, "TCP"), (443, "TCP")}
    settings = next(doc for name, doc in with_components.items() if name.startswith("moderation-worker-settings"))
    bootstrap_ports = {int(a.rsplit(":", 1)[1]) for a in settings["data"]["KAFKA_BOOTSTRAP_SERVERS"].split(",")}
    assert bootstrap_ports <= {port for port, _ in out}, "the brokers' port must be allowed out"


def test_the_alert_rules_are_the_operations_guide_s_and_query_real_metrics(with_components):
    rule = with_components["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    guide = (ROOT / "docs" / "operations.md").read_text()
    (block,) = re.findall(r"```yaml\n(groups:.*?)```", guide, flags=re.DOTALL)
    assert rule["spec"] == yaml.safe_load(block), "deploy/k8s/components/alerts differs from docs/operations.md"
    exported = exported_sample_names()
    for alert in rule["spec"]["groups"][0]["rules"]:
        used = set(re.findall(r"\bmoderation_worker_[a-z_]+", alert["expr"]))
        assert used and used <= set(exported), alert["alert"]


def test_an_alert_fires_when_no_worker_pod_reports():
    guide = (ROOT / "docs" / "operations.md").read_text()
    (block,) = re.findall(r"```yaml\n(groups:.*?)```", guide, flags=re.DOTALL)
    rules = {r["alert"]: r for r in yaml.safe_load(block)["groups"][0]["rules"]}
    expr = rules["ModerationNoWorkersReporting"]["expr"]
    (metric,) = re.findall(r"^absent\((moderation_worker_[a-z_]+)\)$", expr)
    # The series must exist on every running worker, whatever it is doing: an unlabelled
    # gauge, registered at import (absent() of a labelled or lazily created series would
    # fire on healthy pods).
    assert metric == f"{metrics.PREFIX}_in_flight_messages"
    assert metric in {family.name for family in metrics.REGISTRY.collect()}


@pytest.mark.parametrize("component", ["network-policy", "alerts"])
def test_each_component_is_a_kustomize_component(component):
    kustomization = yaml.safe_load((COMPONENTS / component / "kustomization.yaml").read_text())
    assert (kustomization["apiVersion"], kustomization["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
