"""Static checks of the deployment files: Dockerfile, compose, Prometheus, Grafana, Kubernetes.

No Docker engine or cluster is needed. What is checked, and against what:

- compose: the compose-spec JSON schema (vendored in tests/data/compose-spec.json), pinned image
  tags, KRaft Kafka, single-node Elasticsearch, mounts that exist;
- Kubernetes: every rendered object of each kustomization against the Kubernetes JSON schemas
  bundled by the ``kubernetes-validate`` package (strict: unknown fields fail), the KEDA
  ScaledObject against KEDA's own CRD schema (vendored in tests/data/, made strict here);
- Prometheus: ``promtool check config``, ``promtool check rules`` and ``promtool test rules``
  (promtool is Debian's ``prometheus`` package; without it these tests fail, they never skip);
- every ``SPARSE_INGEST_*`` variable anywhere is a field of :class:`service.config.Settings` and
  its value passes validation; the HTTP port is the same everywhere; every metric named in a
  rule, the dashboard or the HPA is one the service exports.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.config import Settings, load_settings
from service.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DATA = Path(__file__).resolve().parent / "data"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sparse-ingest.json"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = ("base", "overlays/keda", "overlays/hpa")
# Kubernetes versions the manifests must be valid for (oldest supported, newest bundled).
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())

ENV_PREFIX = "SPARSE_INGEST_"
# SPARSE_INGEST_* variables that are not Settings fields, and the module that reads each.
NON_SETTINGS_VARS = {
    "SPARSE_INGEST_CACHE": ROOT / "encoder" / "fetch.py",  # model and wheel cache
    "SPARSE_INGEST_ENV_FILE": ROOT / "service" / "config.py",  # dotenv file with settings
}
SERVICE = "sparse-ingest"  # compose service, Prometheus job and Kubernetes app name


# ------------------------------------------------------------------------------------ loading
def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@cache
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    out = []
    for line in lines:
        instruction, _, args = line.strip().partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile():
        if instruction == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                env[key] = value
    return env


def dockerfile_arg_defaults() -> dict[str, str]:
    return {
        m.group(1): m.group(2)
        for instruction, args in dockerfile()
        if instruction == "ARG" and (m := re.fullmatch(r"(\w+)=(\S+)", args))
    }


def kustomize(name: str) -> list[dict[str, Any]]:
    """The objects a kustomization renders: with `kubectl kustomize` when kubectl is there."""
    path = K8S / name
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run(
            [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, f"kubectl kustomize {path}: {out.stderr}"
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    return _kustomize_py(path)


def _kustomize_py(path: Path) -> list[dict[str, Any]]:
    """Fallback without kubectl: the resources listed (recursively), patches not applied."""
    kust = load_yaml(path / "kustomization.yaml")
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        target = (path / res).resolve()
        if target.is_dir():
            docs.extend(_kustomize_py(target))
        else:
            docs.extend(d for d in yaml.safe_load_all(target.read_text()) if d)
    return docs


@cache
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(name) for name in KUSTOMIZATIONS}


def find(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml"))


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


# ------------------------------------------------------------------------------------ compose
def test_compose_is_valid_against_the_compose_spec_schema() -> None:
    schema = json.loads((DATA / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


def test_compose_references_exist() -> None:
    services = compose()["services"]
    volumes = set(compose().get("volumes") or {})
    for name, svc in services.items():
        for dep in svc.get("depends_on") or []:
            assert dep in services, f"{name} depends on unknown service {dep}"
        for mount in svc.get("volumes") or []:
            source = mount.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in volumes, f"{name}: named volume {source} is not declared"
        if "build" in svc:
            context = (DEPLOY / svc["build"]["context"]).resolve()
            assert context == ROOT
            assert (context / svc["build"]["dockerfile"]).is_file()


def _image_is_pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag or tag in ("latest", "stable", "main", "edge"):
        return False
    return bool(re.search(r"\d", tag))


def test_every_image_is_pinned_by_version() -> None:
    images = [svc["image"] for svc in compose()["services"].values() if "image" in svc]
    assert len(images) == len(compose()["services"]), "every compose service names its image"
    base = dockerfile_arg_defaults()["PYTHON_IMAGE"]
    images.append(base)
    for docs in rendered().values():
        for deploy in find(docs, "Deployment"):
            images += [c["image"] for c in deploy["spec"]["template"]["spec"]["containers"]]
    unpinned = [image for image in images if not _image_is_pinned(image)]
    assert not unpinned, f"images without a version tag: {unpinned}"
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), base


def test_compose_stack_shape() -> None:
    services = compose()["services"]
    kafka = services["kafka"]["environment"]
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert "broker" in kafka["KAFKA_PROCESS_ROLES"] and "controller" in kafka["KAFKA_PROCESS_ROLES"]
    assert not any("zookeeper" in str(v).lower() for v in kafka.values())
    assert services["kafka-init"]["image"] == services["kafka"]["image"]

    es = services["elasticsearch"]
    assert re.fullmatch(r"docker\.elastic\.co/elasticsearch/elasticsearch:9\.\d+\.\d+", es["image"])
    assert es["environment"]["discovery.type"] == "single-node"
    assert es["environment"]["xpack.security.enabled"] == "false"
    assert "-Xms1g" in es["environment"]["ES_JAVA_OPTS"]
    assert "-Xmx1g" in es["environment"]["ES_JAVA_OPTS"]

    app = services[SERVICE]
    producer = services["demo-producer"]
    assert producer["image"] == app["image"], "the producer runs in the service image"
    module = producer["command"][producer["command"].index("-m") + 1]
    assert (ROOT / Path(*module.split("."))).with_suffix(".py").is_file(), module
    assert app["build"]["args"]["BAKE_DEFAULT_MODEL"] == "1"
    assert "SPARSE_INGEST_ENCODER_THREADS" not in app["environment"], "threads follow cpus"


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(text)))


def test_compose_grace_period_outlasts_the_drain() -> None:
    app = compose()["services"][SERVICE]
    shutdown = float(
        app["environment"].get(
            "SPARSE_INGEST_SHUTDOWN_TIMEOUT_S", Settings.model_fields["shutdown_timeout_s"].default
        )
    )
    assert _duration_s(app["stop_grace_period"]) > shutdown


# ------------------------------------------------------------------------------------ Dockerfile
def test_dockerfile_builds_a_venv_and_runs_as_non_root() -> None:
    steps = dockerfile()
    froms = [args for instruction, args in steps if instruction == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert froms[0].endswith(" AS build") and froms[-1].endswith(" AS runtime")
    text = " ".join(f"{i} {a}" for i, a in steps)
    assert "python -m venv /opt/venv" in text
    assert "COPY --from=build /opt/venv /opt/venv" in text
    assert "torch" not in DOCKERFILE.read_text().lower().replace("pytorch", "")
    assert not any(re.match(r"torch\b", dep) for dep in _project_dependencies())

    users = [args for instruction, args in steps if instruction == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root UID (runAsNonRoot can check it)"

    env = dockerfile_env()
    assert env["SPARSE_INGEST_HTTP_HOST"] == "0.0.0.0"
    assert env["OMP_NUM_THREADS"] == "1"
    assert "SPARSE_INGEST_ENCODER_THREADS" not in env, "threads follow the CPU quota"

    health = [args for instruction, args in steps if instruction == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0] and "urllib" in health[0]
    assert "curl" not in health[0]


def _project_dependencies() -> list[str]:
    import tomllib

    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def test_dockerfile_model_default_matches_the_registry() -> None:
    default_dir = Settings.model_fields["model_dir"].default_factory()  # type: ignore[misc,call-arg]
    env = dockerfile_env()
    assert env["SPARSE_INGEST_MODEL_DIR"] == f"/models/{default_dir.name}"
    assert dockerfile_arg_defaults()["BAKE_DEFAULT_MODEL"] == "0"
    text = DOCKERFILE.read_text()
    assert 'if [ "$BAKE_DEFAULT_MODEL" = "1" ]' in text
    assert "sparse-ingest model fetch-default" in text


def test_dockerfile_commands_exist_in_the_cli() -> None:
    from service.cli import build_parser

    parser = build_parser()
    for command in (["model", "fetch-default"], ["run"]):  # the Dockerfile's RUN and CMD
        args = parser.parse_args(command)
        assert getattr(args, "handler", None) is not None, command
    cmd = next(a for i, a in reversed(dockerfile()) if i == "CMD")
    assert json.loads(cmd) == ["sparse-ingest", "run"]


def test_dockerignore_sends_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: everything is excluded unless named"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    copies = [
        args.split()[:-1]
        for instruction, args in dockerfile()
        if instruction == "COPY" and not args.startswith("--from")
    ]
    for sources in copies:
        for source in sources:
            source = source.rstrip("/")
            sent = [a for a in allowed if a == source or (a + "/").startswith(source + "/")]
            sent += [a for a in allowed if source.startswith(a + "/")]
            assert sent, f"COPY {source}: nothing of it is in the build context (.dockerignore)"

            assert (ROOT / source).exists(), source
    for excluded in (".venv", "tests", "deploy/k8s", ".git"):
        assert not any(excluded == a or excluded.startswith(a + "/") for a in allowed)


# ------------------------------------------------------------------------------------ settings
def _settings_var_names() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def _env_blocks() -> list[tuple[str, dict[str, str]]]:
    """Every (where, {name: value}) that sets SPARSE_INGEST_* variables."""
    blocks: list[tuple[str, dict[str, str]]] = [("Dockerfile ENV", dockerfile_env())]
    for name, svc in compose()["services"].items():
        blocks.append((f"compose {name}", dict(svc.get("environment") or {})))
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc.get("kind") == "ConfigMap":
                blocks.append((str(path.relative_to(ROOT)), dict(doc.get("data") or {})))
            for node in walk(doc):
                if isinstance(node, dict) and isinstance(node.get("env"), list):
                    values = {e["name"]: str(e.get("value", "<ref>")) for e in node["env"]}
                    blocks.append((str(path.relative_to(ROOT)), values))
    return blocks


def test_every_sparse_ingest_variable_is_a_settings_field() -> None:
    fields = _settings_var_names()
    for var, module in NON_SETTINGS_VARS.items():
        assert var in module.read_text(), f"{var} is no longer read by {module}"
    unknown = []
    for where, env in _env_blocks():
        for name in env:
            if name.startswith(ENV_PREFIX) and name not in fields | set(NON_SETTINGS_VARS):
                unknown.append(f"{where}: {name}")
    # Also variables named in free text (comments, commands, README).
    for path in [DOCKERFILE, COMPOSE, DEPLOY / "README.md", *k8s_files()]:
        for name in set(re.findall(r"\bSPARSE_INGEST_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())):
            if name not in fields | set(NON_SETTINGS_VARS):
                unknown.append(f"{path.relative_to(ROOT)}: {name}")
    assert not unknown, "not fields of service.config.Settings:\n" + "\n".join(sorted(unknown))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    return monkeypatch


def _validate_settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    with monkeypatch.context() as m:
        for name, value in env.items():
            if name.startswith(ENV_PREFIX) and name not in NON_SETTINGS_VARS:
                m.setenv(name, str(value))
        return load_settings()


def test_compose_settings_values_validate(clean_env: pytest.MonkeyPatch) -> None:
    env = {**dockerfile_env(), **compose()["services"][SERVICE]["environment"]}
    settings = _validate_settings(clean_env, env)
    assert settings.http_host == "0.0.0.0"
    assert settings.kafka_bootstrap_servers == "kafka:9092"
    assert settings.es_url == "http://elasticsearch:9200"


def test_k8s_settings_values_validate(clean_env: pytest.MonkeyPatch) -> None:
    docs = rendered()["base"]
    env = {**dockerfile_env(), **one(docs, "ConfigMap")["data"]}
    settings = _validate_settings(clean_env, env)
    assert settings.http_host == "0.0.0.0"


# ------------------------------------------------------------------------------------ ports
def test_http_port_is_the_same_everywhere() -> None:
    port = int(dockerfile_env()["SPARSE_INGEST_HTTP_PORT"])
    seen: dict[str, int] = {"Dockerfile ENV": port}
    seen["Dockerfile EXPOSE"] = int(next(a for i, a in dockerfile() if i == "EXPOSE").split("/")[0])
    health = next(a for i, a in dockerfile() if i == "HEALTHCHECK")
    seen["Dockerfile HEALTHCHECK default"] = int(
        re.search(r"SPARSE_INGEST_HTTP_PORT', '(\d+)'", health).group(1)  # type: ignore[union-attr]
    )

    app = compose()["services"][SERVICE]
    seen["compose env"] = int(app["environment"]["SPARSE_INGEST_HTTP_PORT"])
    container_port = str(app["ports"][0]).split(":")[-1]
    seen["compose ports (container)"] = int(container_port)

    scrape = load_yaml(PROM / "prometheus.yml")
    job = next(j for j in scrape["scrape_configs"] if j["job_name"] == SERVICE)
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    for target in targets:
        host, _, tport = target.partition(":")
        assert host == SERVICE, f"scrape target {target} is not the compose service"
        seen[f"Prometheus target {target}"] = int(tport)

    docs = rendered()["base"]
    seen["k8s ConfigMap"] = int(one(docs, "ConfigMap")["data"]["SPARSE_INGEST_HTTP_PORT"])
    pod = one(docs, "Deployment")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    seen["k8s containerPort"] = named["http"]
    seen["k8s prometheus.io/port"] = int(pod["metadata"]["annotations"]["prometheus.io/port"])
    svc_port = one(docs, "Service")["spec"]["ports"][0]
    target_port = svc_port["targetPort"]
    seen["k8s Service targetPort"] = (
        named[target_port] if isinstance(target_port, str) else target_port
    )
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        p = container[probe]["httpGet"]["port"]
        seen[f"k8s {probe}"] = named[p] if isinstance(p, str) else p
    assert set(seen.values()) == {port}, seen


# ------------------------------------------------------------------------------------ Prometheus
def promtool() -> str:
    path = shutil.which("promtool") or "/usr/bin/promtool"
    if not os.access(path, os.X_OK):
        pytest.fail(
            "promtool is not installed: `apt-get install prometheus` (Debian; it ships promtool)",
            pytrace=False,
        )
    return path


def run_promtool(*args: str) -> str:
    out = subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=PROM, timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"promtool {' '.join(args)} failed:\n{text}"
    return text


def test_promtool_check_config() -> None:
    text = run_promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in text


def test_promtool_check_rules() -> None:
    text = run_promtool("check", "rules", "recording.yml", "alerts.yml")
    assert text.count("SUCCESS") == 2


def test_promtool_test_rules() -> None:
    text = run_promtool("test", "rules", "alerts_test.yml")
    assert "SUCCESS" in text


def _rules() -> list[dict[str, Any]]:
    rules = []
    for name in ("recording.yml", "alerts.yml"):
        for group in load_yaml(PROM / name)["groups"]:
            rules.extend(group["rules"])
    return rules


def test_every_alert_has_a_firing_and_a_quiet_test() -> None:
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(PROM / "alerts_test.yml")["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - fires == set(), f"alerts never tested firing: {alerts - fires}"
    assert alerts - quiet == set(), f"alerts never tested quiet: {alerts - quiet}"
    for required in (
        "SparseIngestDown",
        "SparseIngestConsumerLagGrowing",
        "SparseIngestNoProgress",
        "SparseIngestDeadLetters",
        "SparseIngestBulkRequestsFailing",
        "SparseIngestBulkItemErrors",
        "SparseIngestEncoderSaturated",
        "SparseIngestPausedTooLong",
    ):
        assert required in alerts


@cache
def exported_metric_names() -> frozenset[str]:
    """Every sample name the service can export (histogram/info/counter suffixes included)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        base = family.name
        if family.type == "counter":
            names |= {base + "_total", base + "_created"}
        elif family.type == "histogram":
            names |= {base + s for s in ("_bucket", "_sum", "_count", "_created")}
        elif family.type == "info":
            names.add(base + "_info")
        else:
            names.add(base)
    return frozenset(names)


def _metric_refs(text: str) -> set[str]:
    return set(re.findall(r"\bsparse_ingest_[a-z_]+[a-z]\b", text))


def _regex_metric_refs(text: str) -> list[str]:
    """Names matched by __name__=~"..." selectors."""
    return re.findall(r'__name__=~"([^"]+)"', text)


def test_rules_dashboard_and_hpa_name_real_metrics() -> None:
    sources = {
        "recording.yml": (PROM / "recording.yml").read_text(),
        "alerts.yml": (PROM / "alerts.yml").read_text(),
        "dashboard": DASHBOARD.read_text(),
        "hpa": (K8S / "overlays" / "hpa" / "hpa.yaml").read_text(),
        "prometheus-adapter": (
            K8S / "overlays" / "hpa" / "prometheus-adapter-values.yaml"
        ).read_text(),
    }
    exported = exported_metric_names()
    for where, text in sources.items():
        unknown = _metric_refs(text) - exported
        assert not unknown, f"{where} names metrics the service does not export: {unknown}"
        for pattern in _regex_metric_refs(text):
            alternatives = re.fullmatch(r"sparse_ingest_documents_\((.*)\)_total", pattern)
            assert alternatives, pattern
            for alt in alternatives.group(1).split("|"):
                assert f"sparse_ingest_documents_{alt}_total" in exported, alt


# ------------------------------------------------------------------------------------ Grafana
def dashboard_targets(dash: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == SERVICE
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].strip()
    titles = " | ".join(p["title"] for p in panels).lower()
    for wanted in (
        "documents per second",
        "consumer lag per partition",
        "stage latency: encode",
        "end-to-end lag",
        "bulk item errors by reason",
        "bulk requests by outcome",
        "offset commits by outcome",
        "encoder utilisation",
        "tokens per second",
        "dead letters by reason",
        "in-flight batches",
        "paused",
    ):
        assert wanted in titles, wanted
    heatmaps = [p for p in panels if p["type"] == "heatmap"]
    assert heatmaps and all(t.get("format") == "heatmap" for p in heatmaps for t in p["targets"])
    exprs = [e for _, e in dashboard_targets(dash)]
    throughput = next(p for p in panels if p["title"] == "Documents per second")
    needed = ("consumed", "indexed", "deleted", "stale", "skipped_unchanged")
    for name in needed:
        assert any(name in t["expr"] for t in throughput["targets"]), name
    assert any("rate(sparse_ingest_encoder_busy_seconds_total" in e for e in exprs)


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(m.split(":")[:2] for m in grafana["volumes"])
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = load_yaml(provisioning / "dashboards" / "sparse-ingest.yml")["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    source = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"][0]
    assert source["type"] == "prometheus"
    prometheus_port = compose()["services"]["prometheus"]["ports"][0].split(":")[-1]
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    prom = compose()["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]


# ------------------------------------------------------------------------------------ Kubernetes
@cache
def keda_scaledobject_schema() -> dict[str, Any]:
    """KEDA's ScaledObject CRD schema, strict: unknown fields fail as with server-side
    field validation (the CRD itself only prunes them)."""
    crd = load_yaml(DATA / "keda.sh_scaledobjects.yaml")
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    for node in walk(schema):
        if (
            isinstance(node, dict)
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
    # apiVersion/kind/metadata are described loosely by CRDs.
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def validate_k8s(doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith("keda.sh/"):
        assert doc["apiVersion"] == "keda.sh/v1alpha1" and doc["kind"] == "ScaledObject"
        jsonschema.Draft7Validator(keda_scaledobject_schema()).validate(doc)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_k8s_objects_match_their_schemas(name: str) -> None:
    docs = rendered()[name]
    assert docs
    for doc in docs:
        try:
            validate_k8s(doc)
        except jsonschema.ValidationError as exc:
            path = ".".join(str(p) for p in exc.absolute_path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")


def test_strict_validation_catches_a_typo() -> None:
    deployment = copy.deepcopy(one(rendered()["base"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(deployment)
    scaled = copy.deepcopy(one(rendered()["overlays/keda"], "ScaledObject"))
    scaled["spec"]["maxReplicas"] = 4  # the HPA's spelling, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(scaled)


def test_every_k8s_file_is_in_a_kustomization() -> None:
    listed: set[Path] = set()
    for name in KUSTOMIZATIONS:
        path = K8S / name
        listed.add(path / "kustomization.yaml")
        for res in load_yaml(path / "kustomization.yaml").get("resources", []):
            target = (path / res).resolve()
            if target.is_file():
                listed.add(target)
    helm_values = K8S / "overlays" / "hpa" / "prometheus-adapter-values.yaml"
    assert set(k8s_files()) - listed == {helm_values}


def test_deployment_resources_probes_and_security() -> None:
    docs = rendered()["base"]
    config = one(docs, "ConfigMap")["data"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    res = container["resources"]
    threads = config["SPARSE_INGEST_ENCODER_THREADS"]
    assert res["requests"]["cpu"] == res["limits"]["cpu"] == threads == "2"
    assert "memory" in res["requests"] and "memory" in res["limits"]

    shutdown = float(config.get("SPARSE_INGEST_SHUTDOWN_TIMEOUT_S", 30))
    assert pod["terminationGracePeriodSeconds"] > shutdown

    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"

    uid = int(next(a for i, a in reversed(dockerfile()) if i == "USER").split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])

    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        spec = one(docs, kind)["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), f"{kind} selects no pod"


def _secret_fields() -> set[str]:
    return {
        ENV_PREFIX + name.upper()
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation)
    }


def test_secrets_only_by_reference() -> None:
    secrets = _secret_fields()
    assert "SPARSE_INGEST_ES_PASSWORD" in secrets and "SPARSE_INGEST_KAFKA_SASL_PASSWORD" in secrets
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            assert doc.get("kind") != "Secret", f"{path}: no Secret objects with values in git"
            if doc.get("kind") == "ConfigMap":
                assert not secrets & set(doc["data"]), f"{path}: secret in a ConfigMap"
            for node in walk(doc):
                if isinstance(node, dict) and isinstance(node.get("env"), list):
                    for env in node["env"]:
                        if env["name"] in secrets:
                            assert "value" not in env, f"{path}: {env['name']} inline"
                            assert "secretKeyRef" in env["valueFrom"], env["name"]
    env = one(rendered()["base"], "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    referenced = {e["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    wanted = {
        "SPARSE_INGEST_ES_PASSWORD",
        "SPARSE_INGEST_ES_API_KEY",
        "SPARSE_INGEST_KAFKA_SASL_PASSWORD",
    }
    assert wanted <= referenced
    compose_env = compose()["services"][SERVICE]["environment"]
    assert not secrets & set(compose_env)


def test_autoscaling_overlays() -> None:
    base = rendered()["base"]
    keda = rendered()["overlays/keda"]
    hpa = rendered()["overlays/hpa"]
    config = one(base, "ConfigMap")["data"]
    deployment = one(base, "Deployment")
    assert not find(base, "ScaledObject") and not find(base, "HorizontalPodAutoscaler")
    assert not find(keda, "HorizontalPodAutoscaler"), "one autoscaler per overlay"
    assert not find(hpa, "ScaledObject"), "one autoscaler per overlay"

    scaled = one(keda, "ScaledObject")
    spec = scaled["spec"]
    partitions = int(scaled["metadata"]["annotations"]["sparse-ingest/topic-partitions"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert int(meta["lagThreshold"]) > 0
    assert meta["allowIdleConsumers"] == "false"
    assert meta["consumerGroup"] == config["SPARSE_INGEST_KAFKA_GROUP_ID"]
    assert meta["topic"] in config["SPARSE_INGEST_KAFKA_TOPICS"].split(",")
    assert meta["bootstrapServers"] == config["SPARSE_INGEST_KAFKA_BOOTSTRAP_SERVERS"]

    autoscaler = one(hpa, "HorizontalPodAutoscaler")
    hspec = autoscaler["spec"]
    partitions = int(autoscaler["metadata"]["annotations"]["sparse-ingest/topic-partitions"])
    assert 1 <= hspec["minReplicas"] <= hspec["maxReplicas"] <= partitions
    assert hspec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hspec["metrics"]
    assert metric["external"]["metric"]["name"] == "sparse_ingest_consumer_lag_records"

    if shutil.which("kubectl"):  # the overlays hand the replica count to the autoscaler
        assert "replicas" in deployment["spec"]
        for docs in (keda, hpa):
            assert "replicas" not in one(docs, "Deployment")["spec"]
