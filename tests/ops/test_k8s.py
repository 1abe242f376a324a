"""deploy/k8s and deploy/prometheus: schema-valid offline, and consistent with each other and the server.

Schemas come from the kubernetes-validate wheel (strict: unknown fields fail). The kustomize output is
rendered by `kubectl kustomize` when kubectl is installed, and always by `render_kustomization`
below, which supports exactly the fields our kustomization uses; the two must agree.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.drain import Drainer
from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS = ROOT / "deploy" / "prometheus"
# The oldest Kubernetes we claim to support, and the newest the wheel knows.
VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render_kustomization(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    supported = {"apiVersion", "kind", "resources", "labels"}
    assert set(kustomization) <= supported, f"extend render_kustomization for {set(kustomization) - supported}"
    docs = [doc for resource in kustomization["resources"] for doc in load_docs(directory / resource)]
    for label_set in kustomization.get("labels", []):
        assert set(label_set) == {"pairs"}, "only metadata labels are rendered here"
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label_set["pairs"])
    return docs


def by_kind_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


RENDERED = by_kind_name(render_kustomization(K8S))
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_is_schema_valid(path: Path, version: str) -> None:
    for doc in load_docs(path):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_kustomize_output_is_schema_valid(version: str) -> None:
    kinds = {kind for kind, _ in RENDERED}
    assert {"Deployment", "Service", "StatefulSet", "Secret", "ConfigMap", "HorizontalPodAutoscaler",
            "PodDisruptionBudget"} <= kinds
    for doc in RENDERED.values():
        kubernetes_validate.validate(doc, version, strict=True)


def test_every_manifest_is_in_the_kustomization() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == [p.name for p in MANIFESTS]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) not installed")
def test_kubectl_kustomize_agrees_with_our_render() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert by_kind_name([d for d in yaml.safe_load_all(out) if d]) == RENDERED


def test_the_validator_rejects_a_typo() -> None:
    broken = copy.deepcopy(RENDERED[("Deployment", "gla-serve")])
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def pod_spec(kind: str, name: str) -> dict:
    return RENDERED[(kind, name)]["spec"]["template"]["spec"]


def server_container() -> dict:
    return pod_spec("Deployment", "gla-serve")["containers"][0]


def test_deployment_probes_gpu_and_resources() -> None:
    c = server_container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert "memory" in c["resources"]["limits"]
    assert pod_spec("Deployment", "gla-serve")["securityContext"]["runAsNonRoot"] is True


def test_grace_period_covers_prestop_drain_and_flush() -> None:
    config = RENDERED[("ConfigMap", "gla-serve")]["data"]
    pre_stop = server_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + float(config["GLA_DRAIN_TIMEOUT_S"]) + Drainer().flush_timeout_s
    assert pod_spec("Deployment", "gla-serve")["terminationGracePeriodSeconds"] >= needed


def test_selectors_ports_and_references_line_up() -> None:
    deployment = RENDERED[("Deployment", "gla-serve")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = RENDERED[("Service", "gla-serve")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in server_container()["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert RENDERED[("PodDisruptionBudget", "gla-serve")]["spec"]["selector"]["matchLabels"].items() \
        <= pod_labels.items()
    target = RENDERED[("HorizontalPodAutoscaler", "gla-serve")]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) in RENDERED
    # Every referenced ConfigMap / Secret key exists, unless the reference is optional.
    for ref in server_container()["envFrom"]:
        assert ("ConfigMap", ref["configMapRef"]["name"]) in RENDERED
    for container in (server_container(), pod_spec("StatefulSet", "gla-redis")["containers"][0],
                      pod_spec("StatefulSet", "gla-redis-logs")["containers"][0]):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                assert ref["key"] in RENDERED[("Secret", ref["name"])]["stringData"]


def redis_args(name: str) -> dict[str, str]:
    args = RENDERED[("StatefulSet", name)]["spec"]["template"]["spec"]["containers"][0]["args"]
    return dict(zip(args[::2], args[1::2], strict=True))


@pytest.mark.parametrize("name", ["gla-redis", "gla-redis-logs"])
def test_both_redis_instances_take_the_password_and_only_gla_serve(name: str) -> None:
    redis = RENDERED[("StatefulSet", name)]
    assert redis_args(name)["--requirepass"] == "$(REDIS_PASSWORD)"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert ("Service", redis["spec"]["serviceName"]) in RENDERED
    policy = RENDERED[("NetworkPolicy", name)]["spec"]
    assert policy["podSelector"]["matchLabels"] == redis["spec"]["selector"]["matchLabels"]
    assert policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "gla-serve"


def test_logs_never_evict_and_persist_while_states_evict_freely() -> None:
    """Token logs are the source of truth and carry TTLs like everything else, so they get an
    instance that never evicts (and persists); the states' instance is a cache of them."""
    logs, states = redis_args("gla-redis-logs"), redis_args("gla-redis")
    assert logs["--maxmemory-policy"] == "noeviction" and logs["--appendonly"] == "yes"
    assert states["--maxmemory-policy"] == "allkeys-lru" and states["--appendonly"] == "no"
    env = {e["name"]: e for e in server_container()["env"]}
    assert env["GLA_REDIS_URL"]["value"].startswith("redis://:$(REDIS_PASSWORD)@gla-redis:6379")
    assert env["GLA_REDIS_LOG_URL"]["value"].startswith("redis://:$(REDIS_PASSWORD)@gla-redis-logs:6379")
    names = list(env)
    assert names.index("REDIS_PASSWORD") < min(names.index("GLA_REDIS_URL"), names.index("GLA_REDIS_LOG_URL"))


def test_gla_env_names_are_server_settings() -> None:
    settings = pytest.importorskip("server.settings")
    fields = set(settings.Settings.model_fields)
    names = set(RENDERED[("ConfigMap", "gla-serve")]["data"])
    names |= {e["name"] for e in server_container()["env"] if e["name"].startswith("GLA_")}
    assert {n for n in names if not n.startswith("GLA_") or n[4:].lower() not in fields} == set()


def test_servicemonitor_and_scrape_config_find_the_metrics_port() -> None:
    (monitor,) = load_docs(PROMETHEUS / "servicemonitor.yaml")
    service = RENDERED[("Service", "gla-serve")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"

    jobs = {job["job_name"]: job for job in yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
            ["scrape_configs"]}
    keep = {tuple(r["source_labels"]): r["regex"] for r in jobs["gla-serve"]["relabel_configs"]
            if r.get("action") == "keep"}
    pod_labels = RENDERED[("Deployment", "gla-serve")]["spec"]["template"]["metadata"]["labels"]
    assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == pod_labels["app.kubernetes.io/name"]
    assert keep[("__meta_kubernetes_pod_container_port_name",)] in {p["name"] for p in server_container()["ports"]}
    assert all(job["metrics_path"] == "/metrics" for job in jobs.values())


def test_hpa_metric_is_served_by_the_adapter_rule() -> None:
    (metric,) = RENDERED[("HorizontalPodAutoscaler", "gla-serve")]["spec"]["metrics"]
    (rule,) = yaml.safe_load((PROMETHEUS / "adapter-rules.yaml").read_text())["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    source = rule["name"]["matches"]
    assert rule["seriesQuery"].startswith(source + "{")
    body, _ = Metrics(process_metrics=False).render()
    assert f"\n{source} " in body.decode()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) not installed")
def test_example_overlay_renders_valid_and_rewires_secrets() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy" / "overlay-example")], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    docs = by_kind_name([d for d in yaml.safe_load_all(out) if d])
    for doc in docs.values():
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
    assert all(doc["metadata"].get("namespace") == "gla" for (kind, _), doc in docs.items() if kind != "Namespace")
    container = docs[("Deployment", "gla-serve")]["spec"]["template"]["spec"]["containers"][0]
    keys_secret = {e["name"]: e for e in container["env"]}["GLA_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"]
    assert keys_secret.startswith("gla-api-keys-") and ("Secret", keys_secret) in docs
    assert ("Secret", "gla-redis") in docs and "stringData" not in docs[("Secret", "gla-redis")]
    assert container["image"] == "registry.example.com/gla-serve:0.1.0"


# -- deploy/overlay-chunk-shards: eight Redis instances for the states' chunks -----------------------

SHARDS = ROOT / "deploy" / "overlay-chunk-shards"


def render_chunk_shards() -> dict[tuple[str, str], dict]:
    """The base plus the overlay's resources, with its JSON patches applied (only the `add` to the
    end of a list that the overlay uses)."""
    kustomization = yaml.safe_load((SHARDS / "kustomization.yaml").read_text())
    assert set(kustomization) == {"apiVersion", "kind", "resources", "patches"}
    assert kustomization["resources"][0] == "../k8s"
    docs = copy.deepcopy(RENDERED)
    for resource in kustomization["resources"][1:]:
        docs |= by_kind_name(load_docs(SHARDS / resource))
    for patch in kustomization["patches"]:
        target = docs[(patch["target"]["kind"], patch["target"]["name"])]
        for op in yaml.safe_load((SHARDS / patch["path"]).read_text()):
            assert op["op"] == "add" and op["path"].endswith("/-"), "extend render_chunk_shards"
            node: object = target
            for part in op["path"].strip("/").split("/")[:-1]:
                node = node[int(part)] if isinstance(node, list) else node[part]  # type: ignore[index]
            assert isinstance(node, list)
            node.append(copy.deepcopy(op["value"]))
    return docs


@pytest.mark.parametrize("version", VERSIONS)
def test_chunk_shards_overlay_is_schema_valid(version: str) -> None:
    for doc in render_chunk_shards().values():
        kubernetes_validate.validate(doc, version, strict=True)


def test_chunk_shard_urls_name_every_shard_pod_in_order_and_parse_as_settings() -> None:
    settings = pytest.importorskip("server.settings")
    docs = render_chunk_shards()
    shards = docs[("StatefulSet", "gla-redis-chunks")]
    env = {e["name"]: e for e in docs[("Deployment", "gla-serve")]["spec"]["template"]["spec"]["containers"][0]["env"]}
    urls = env["GLA_REDIS_CHUNK_URLS"]["value"].split(",")
    service = shards["spec"]["serviceName"]
    assert ("Service", service) in docs
    assert urls == [f"redis://:$(REDIS_PASSWORD)@gla-redis-chunks-{i}.{service}:6379/0"
                    for i in range(shards["spec"]["replicas"])]
    names = list(env)
    assert names.index("REDIS_PASSWORD") < names.index("GLA_REDIS_CHUNK_URLS")  # $(REDIS_PASSWORD) expands
    # the password the base's Secret gives both Redis sets and the server
    secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in shards["spec"]["template"]["spec"]["containers"][0]
                   ["env"]}
    assert secret_refs == {env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"]} == {"gla-redis"}
    s = settings.Settings(redis_url=env["GLA_REDIS_URL"]["value"].replace("$(REDIS_PASSWORD)", "pw"),
                          redis_chunk_urls=env["GLA_REDIS_CHUNK_URLS"]["value"].replace("$(REDIS_PASSWORD)", "pw"),
                          redis_bulk_connections=int(env["GLA_REDIS_BULK_CONNECTIONS"]["value"]),
                          redis_read_piece_bytes=int(env["GLA_REDIS_READ_PIECE_BYTES"]["value"]))
    assert s.redis_chunk_urls is not None and len(s.redis_chunk_url_list()) == shards["spec"]["replicas"] == 8
    assert s.redis_bulk_connections == 16 and s.redis_read_piece_bytes == 2 << 20


def test_chunk_shards_take_the_password_evict_freely_and_admit_only_gla_serve() -> None:
    docs = render_chunk_shards()
    shards = docs[("StatefulSet", "gla-redis-chunks")]
    args = shards["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--requirepass"] == "$(REDIS_PASSWORD)"
    assert flags["--maxmemory-policy"] == "allkeys-lru" and flags["--appendonly"] == "no"
    policy = docs[("NetworkPolicy", "gla-redis-chunks")]["spec"]
    assert policy["podSelector"]["matchLabels"] == shards["spec"]["selector"]["matchLabels"]
    assert policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "gla-serve"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) not installed")
def test_kubectl_kustomize_of_the_chunk_shards_overlay_agrees_with_our_render() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(SHARDS)], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert by_kind_name([d for d in yaml.safe_load_all(out) if d]) == render_chunk_shards()
