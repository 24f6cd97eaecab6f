"""A real Prometheus (Debian's package) scraping the real server (tiny preset, reference engine),
both on loopback: the scraped padrec series read back through Prometheus's HTTP API must equal the
server's own figures, and every dashboard panel and alert rule must evaluate against them."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from deploytools import DEPLOY, tool

from benchmarks.local_server import free_port, local_server, process_group

SCRAPE_S = 1
REQUESTS = 5
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "10m", "$instance": ".*"}


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def query(prom: str, expr: str) -> list[dict]:
    body = get_json(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def wait_for(what: str, check, timeout_s: float = 90.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def server_metric(server: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server + "/metrics", timeout=10) as r:
        for family in text_string_to_metric_families(r.read().decode()):
            for sample in family.samples:
                if sample.name == name and not sample.labels:
                    return sample.value
    raise KeyError(name)


@pytest.fixture(scope="module")
def server(tiny_artifacts, synth_data_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("prom-server") / "server.log"
    env = {"PADREC_ENGINE": "reference", "PADREC_DATA_DIR": str(synth_data_dir),
           "PADREC_CALIBRATION_REQUESTS": "2",
           # a fixed schedule: the series below need drafts, and auto may choose K = 0 on tiny
           "PADREC_SPEC_SCHEDULE": "1:3,2-:0"}
    with local_server(tiny_artifacts, log, env=env, ready_timeout_s=600) as url:
        yield url


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Prometheus with deploy/prometheus's config and rules, pointed at the test server."""
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=f"{SCRAPE_S}s", evaluation_interval=f"{SCRAPE_S}s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["scrape_interval"] = f"{SCRAPE_S}s"
    job["static_configs"][0]["targets"] = [server.removeprefix("http://")]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
               f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
               "--storage.tsdb.retention.time=1h", "--log.level=warn"]
    url = f"http://127.0.0.1:{port}"
    with process_group(command, tmp / "prometheus.log") as proc:
        def ready():
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                return urllib.request.urlopen(url + "/-/ready", timeout=2).status == 200
            except OSError:
                return False

        wait_for("Prometheus ready", ready, 60)
        yield url


@pytest.fixture(scope="module")
def traffic(server, prometheus, synth_data_dir):
    """REQUESTS recommendations with test-split histories, once Prometheus scrapes the server."""
    from synthetic import NAME

    from padrec_vllm.data.s3rec import leave_one_out, load_dataset

    wait_for("target up", lambda: [r for r in query(prometheus, 'up{job="padrec"}')
                                   if r["value"][1] == "1"])
    test = leave_one_out(load_dataset(NAME, synth_data_dir).sequences).test
    histories = [h for h, _ in test.values()]
    for history in histories[:REQUESTS]:
        req = urllib.request.Request(server + "/recommend", method="POST",
                                     data=json.dumps({"history": history, "k": 3}).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
    return REQUESTS


def test_prometheus_reads_the_servers_series(server, prometheus, traffic, tiny_artifacts):
    from padrec_vllm.catalog.catalog import Catalog

    expected = server_metric(server, "padrec_recommendations_total")
    assert expected == traffic

    def scraped():
        result = query(prometheus, 'padrec_recommendations_total{job="padrec"}')
        return result and float(result[0]["value"][1]) == expected and result

    wait_for("the requests in Prometheus", scraped)
    for name in ("padrec_generated_tokens_total", "padrec_draft_tokens_total",
                 "padrec_accepted_tokens_total", "padrec_target_forwards_total"):
        (sample,) = query(prometheus, f'{name}{{job="padrec"}}')
        assert float(sample["value"][1]) == server_metric(server, name) > 0, name

    ready = get_json(server + "/readyz")
    (speedup,) = query(prometheus, 'padrec_speedup{job="padrec", method="calibration"}')
    assert float(speedup["value"][1]) == pytest.approx(ready["calibration"]["speedup"])
    positions = query(prometheus, 'padrec_drafted_by_position_total{job="padrec"}')
    k = ready["num_draft_tokens"]
    assert {s["metric"]["position"] for s in positions} == {str(j) for j in range(1, k + 1)}
    slots = {s["metric"]["slot"] for s in
             query(prometheus, 'padrec_drafted_by_slot_total{job="padrec"}')}
    labels = set(Catalog.load(tiny_artifacts).layout.slot_labels().values())
    # under the catalog constraint (the default) <sep> is always forced, so never drafted
    assert "L0" in slots and slots <= labels and "sep" not in slots, (slots, labels)
    for name in ("padrec_constrained", "padrec_forced_tokens_total"):
        (sample,) = query(prometheus, f'{name}{{job="padrec"}}')
        assert float(sample["value"][1]) == server_metric(server, name) > 0, name
    (latency,) = query(prometheus, 'sum(padrec_request_duration_seconds_count'
                                   '{job="padrec", endpoint="/recommend", status="200"})')
    assert float(latency["value"][1]) == traffic


def _dashboard_targets() -> list[tuple[str, str]]:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "padrec.json").read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def test_every_dashboard_query_evaluates(prometheus, traffic):
    wait_for("two scrapes after the requests", lambda: query(
        prometheus, 'count_over_time(padrec_recommendations_total{job="padrec"}[1m]) > 5'))
    with_data = set()
    for title, expr in _dashboard_targets():
        if query(prometheus, expr):
            with_data.add(title)
    # vLLM's own series exist only with the vLLM engine; every padrec panel has data
    assert {t for t, _ in _dashboard_targets()} - with_data == set()


def test_alert_rules_load_and_evaluate(prometheus, traffic):
    def evaluated():
        groups = get_json(prometheus + "/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("2") and
                                      r["health"] != "unknown" for r in rules) else None

    rules = wait_for("rule evaluation", evaluated)
    assert {r["name"] for r in rules} >= {"PadrecAcceptanceCollapse", "PadrecHighP99Latency",
                                          "PadrecHighErrorRate"}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError"))
                                                     for r in rules]
    alerts = get_json(prometheus + "/api/v1/alerts")["data"]["alerts"]
    firing = {a["labels"]["alertname"] for a in alerts}
    assert "PadrecDown" not in firing and "PadrecHighErrorRate" not in firing
