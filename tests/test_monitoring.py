"""Monitoring as code, checked for real: the alert rules pass promtool's unit tests, and a
real Prometheus scraping a real dlserve under load evaluates every dashboard query and
every alert expression without error, with data, and the autoscalers' queries (deploy/k8s:
KEDA's trigger, prometheus-adapter's rule) under three levels of load.

Prometheus and promtool come from Debian's `prometheus` package (`make monitoring-tools`);
without them these tests are skipped, saying so."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from bench.http import Server, free_port, run_wrk, stop_process_group, wait_ready
from bench.workloads import sentiment_requests
from dlserve.registry import DataSource
from tests.conftest import ROOT, start_server
from tests.routes import RouteCase, post, route_cases
from tests.test_drift import ensure_distribution
from tests.test_gone_clients import LONG_TEXT, send_and_hang_up
from tests.test_k8s import adapter_rule, demand_trigger, one, scaled_to_zero

MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "dashboard.json"
# Grafana's per-panel rate window; Prometheus here scrapes every second.
RATE_INTERVAL = "15s"
# An alert expression is `<signal> <comparison> <threshold>` (alerts.yml says so).
COMPARISON = re.compile(r"^(?P<signal>.+?)\s*(>|<|>=|<=|==|!=)\s*[0-9.e+-]+\s*$", re.S)
# The labels the Prometheus Operator puts on a pod's series through the ServiceMonitor
# (job: the Service's name), for a pod in the namespace docs/deployment.md applies to.
POD_LABELS = {"namespace": "default", "pod": "dlserve-0", "service": "dlserve"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package prometheus: make monitoring-tools)")
    return path


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, Grafana's variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", RATE_INTERVAL))
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def test_alert_rules_pass_promtools_unit_tests() -> None:
    promtool = tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_the_dashboard_covers_what_operators_watch() -> None:
    """The panels docs/deployment.md promises, each with a Prometheus query."""
    exprs = " ".join(expr for _, expr in dashboard_queries())
    for metric in (
        "bentoml_service_request_total",
        "bentoml_service_request_duration_seconds",
        "dlserve_errors_total",
        "dlserve_batch_items",
        "dlserve_inference_seconds",
        "dlserve_queue_seconds",
        "dlserve_model_ready",
        "dlserve_worker_starts_total",
        "dlserve_requests_shed_total",
        "dlserve_requests_abandoned_total",
        "dlserve_requests_in_flight",
        "dlserve_queued_items",
        "dlserve_predictions_total",
        "dlserve_prediction_confidence_total",
        "dlserve_drift",
    ):
        assert metric in exprs, metric
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, endpoint)" in exprs
        assert (
            f"histogram_quantile({quantile}, sum by (le, model) (rate(dlserve_queue_seconds"
            in exprs
        )


def test_the_dashboards_panels_tile_the_grid() -> None:
    """Unique panel ids, each panel inside Grafana's 24 columns, no two overlapping."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


@pytest.fixture(scope="module")
def prometheus(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, Server]]:
    """A real dlserve (2 workers) and a real Prometheus scraping it every second with the
    alert rules loaded; yields (Prometheus URL, server)."""
    binary = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    for model in ("digits", "sentiment", "recommender"):
        ensure_distribution(model)  # the drift panel and alert need it
    with start_server(tmp, DLSERVE_WORKERS="2") as server:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            # Labelled as a GPU server: it runs on the CPU, so the GPU-fallback alert's
            # signal is there for real (and the alert goes pending).
            "scrape_configs": [
                {
                    "job_name": "dlserve",
                    "static_configs": [
                        {
                            "targets": [server.url.removeprefix("http://")],
                            "labels": {"accelerator": "gpu", **POD_LABELS},
                        }
                    ],
                }
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=(tmp / "prometheus.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, process, 60, "/-/ready")
            yield url, server
        finally:
            stop_process_group(process)


def query(client: httpx.Client, promql: str) -> list[dict[str, Any]]:
    r = client.get("/api/v1/query", params={"query": promql})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{promql}: {body}"
    return body["data"]["result"]


def send_load(server: str, seconds: float) -> None:
    """Every route's valid request, and now and then its bad one, for `seconds`."""
    with httpx.Client(base_url=server, timeout=30) as client:
        cases: list[RouteCase] = route_cases(client.get("/docs.json").json())
        deadline = time.monotonic() + seconds
        sent = 0
        while time.monotonic() < deadline:
            for case in cases:
                assert post(client, case, case.valid).status_code == 200, case.path
                if sent % 10 == 0:
                    assert post(client, case, case.bad).status_code == 400, case.path
            sent += 1


# Hang-ups after the load: enough that some client's leaving is noticed while its request
# is prepared or queued, few enough that their share of sentiment's requests stays far
# below DlserveClientsAbandoning's 10 % (the load sends hundreds).
HANGUPS = 4


def shed_and_abandon(server: str) -> None:
    """One request refused at once (a deadline nothing can meet: 503, shed) and HANGUPS
    clients that send 256 long texts each and hang up 0.2 s later (abandoned): the
    dashboard's shed and abandoned panels and their alerts' signals then have data."""
    with httpx.Client(base_url=server, timeout=30) as client:
        r = client.post(
            "/sentiment/predict",
            json={"texts": ["a fine film"]},
            headers={"Request-Timeout": "0.000001"},
        )
        assert r.status_code == 503, r.text
    send_and_hang_up(
        server, orjson.dumps({"texts": [LONG_TEXT] * 256}), after_s=0.2, clients=HANGUPS
    )


@pytest.fixture(scope="module")
def loaded(prometheus: tuple[str, Server]) -> Iterator[httpx.Client]:
    """Prometheus, once it holds 5 s of the server under load, then a shed request and a few
    abandoned ones (and a few scrapes after)."""
    url, server = prometheus
    send_load(server.url, 5.0)
    shed_and_abandon(server.url)
    scraped = [
        'count_over_time(up{job="dlserve"}[1m]) >= 8',
        'up{job="dlserve"} == 1',
        'sum(dlserve_requests_shed_total{model="sentiment"}) >= 1',
        f'sum(dlserve_requests_abandoned_total{{model="sentiment"}}) >= {HANGUPS}',
    ]
    with httpx.Client(base_url=url, timeout=30) as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(query(client, promql) for promql in scraped):
                break
            time.sleep(0.5)
        time.sleep(3)  # scrapes after the last request, so that rates cover all of it
        yield client


def test_prometheus_evaluates_every_dashboard_query_with_data(loaded: httpx.Client) -> None:
    # The canary panels' series exist only while a canary runs (none runs here): their
    # queries must evaluate, and tests/test_rollout.py checks that a canary exports them.
    empty = [title for title, expr in dashboard_queries() if not query(loaded, expr)]
    canary = [title for title, _ in dashboard_queries() if title.startswith("Canary:")]
    assert len(canary) >= 3 and set(canary) <= set(empty), canary
    missing = [title for title in empty if title not in canary]
    assert not missing, f"panels whose query returned no data: {missing}"


def test_prometheus_counts_the_shed_and_the_abandoned_requests(loaded: httpx.Client) -> None:
    """Through the workers' multiprocess files and the scrape: one shed, every hang-up; the
    series of each reason exist from the start, at 0, so that rate() sees a first event."""
    shed = query(loaded, 'sum by (reason) (dlserve_requests_shed_total{model="sentiment"})')
    assert {r["metric"]["reason"]: float(r["value"][1]) for r in shed} == {
        "deadline": 1,
        "overloaded": 0,
    }
    abandoned = query(loaded, 'sum(dlserve_requests_abandoned_total{model="sentiment"})')
    assert abandoned and float(abandoned[0]["value"][1]) == HANGUPS, abandoned


def test_prometheus_evaluates_every_alert_expression(loaded: httpx.Client) -> None:
    """Each expression evaluates without error, its signal (the part before the threshold)
    has data, and Prometheus's rule manager reports every rule healthy."""
    no_data = []
    for rule in alert_rules():
        query(loaded, rule["expr"])
        match = COMPARISON.match(rule["expr"])
        assert match, f"{rule['alert']}: not `<signal> <comparison> <threshold>`"
        if not query(loaded, match["signal"]):
            no_data.append(rule["alert"])
    assert not no_data, f"alerts whose signal returned no data: {no_data}"
    groups = loaded.get("/api/v1/rules").json()["data"]["groups"]
    health = {
        r["name"]: (r["health"], r.get("lastError") or "") for g in groups for r in g["rules"]
    }
    assert health == {r["alert"]: ("ok", "") for r in alert_rules()}, health


def test_a_gpu_labelled_server_on_the_cpu_raises_the_fallback_alert(loaded: httpx.Client) -> None:
    """The real rule manager: the server is labelled accelerator=gpu and runs on the CPU."""
    alerts = loaded.get("/api/v1/alerts").json()["data"]["alerts"]
    fallback = {
        a["labels"]["model"] for a in alerts if a["labels"]["alertname"] == "DlserveGPUFallback"
    }
    assert fallback == set(os.environ["DLSERVE_MODELS"].split(",")), alerts
    # The fixture sheds one sentiment request and has four clients hang up, out of a few
    # dozen: over the threshold of both alerts, which are pending (their `for` has not
    # passed), for sentiment alone.
    provoked = {"DlserveRequestsShed", "DlserveClientsAbandoning"}
    pending = {
        (a["labels"]["alertname"], a["labels"]["model"], a["state"])
        for a in alerts
        if a["labels"]["alertname"] in provoked
    }
    assert pending <= {(name, "sentiment", "pending") for name in provoked}, pending
    # The load repeats each route's one example: one digit, the same two texts, one user, a
    # shifted stream by any measure. DlserveDrift goes pending (its 15 minutes have not
    # passed) for what it shifts.
    drifting = {a["state"] for a in alerts if a["labels"]["alertname"] == "DlserveDrift"}
    assert drifting <= {"pending"}, alerts
    expected = {"DlserveGPUFallback", "DlserveDrift", *provoked}
    quiet = {a["labels"]["alertname"] for a in alerts} - expected
    assert not quiet, f"alerts raised on a healthy server: {quiet}"


def test_the_dashboards_demand_panel_draws_the_autoscalers_target() -> None:
    """The line a pod's requests in hand should stay under is the target the scalers use."""
    target = float(demand_trigger(one("cpu-keda", "ScaledObject"))["metadata"]["threshold"])
    (panel,) = [
        p
        for p in json.loads(DASHBOARD.read_text())["panels"]
        if any("dlserve_requests_in_flight" in t["expr"] for t in p["targets"])
    ]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [step["value"] for step in steps] == [None, target]


# Load levels for the autoscalers' queries: clients, as a multiple of the per-pod target,
# each a steady concurrency (wrk: a client sends its next request when the last is answered).
# The server holds about 90 % of them at any moment (measured: 14.2 of 16, 70.6 of 80; the
# rest are between wrk and the guard), so each level sits well inside the range that
# ceil() gives one replica count for: 0.5 -> 1, 2.7 -> 3 (from 75 % to 111 % held).
LEVELS = {"idle": 0.0, "half capacity": 0.5, "over capacity": 2.7}
LEVEL_S = 9.0  # wrk's run at each level
# Read after the load has run this long: the workers' one-second mean, a scrape (every
# second here) and a margin; then twice more, a second apart, and the median taken.
SETTLE_S = 4.0


def adapter_query() -> str:
    """The rule's metricsQuery as prometheus-adapter runs it for the HorizontalPodAutoscaler
    of the pods in POD_LABELS: the series' name, the namespace and pod names as label
    matchers, grouped by pod."""
    rule = adapter_rule()
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", rule["seriesQuery"].split("{")[0])
        .replace(
            "<<.LabelMatchers>>",
            f'namespace="{POD_LABELS["namespace"]}",pod=~"{POD_LABELS["pod"]}"',
        )
        .replace("<<.GroupBy>>", "pod")
    )
    assert "<<" not in query, f"a template field the test does not fill: {query}"
    return query


def replicas(total: float, target: float, bounds: tuple[int, int]) -> int:
    """What a HorizontalPodAutoscaler (KEDA's, or the adapter's) settles on for the pods'
    total demand `total` and a target per pod: ceil(total / target), within its bounds."""
    low, high = bounds
    return min(max(math.ceil(total / target), low), high)


def read_together(client: httpx.Client, queries: list[str]) -> list[float]:
    """Each query's one value, all evaluated at the same instant (so on the same scrape)."""
    at = time.time()
    values = []
    for promql in queries:
        r = client.get("/api/v1/query", params={"query": promql, "time": at})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{promql}: {body}"
        (sample,) = body["data"]["result"]  # KEDA refuses a query of several series
        values.append(float(sample["value"][1]))
    return values


@pytest.mark.exclusive
def test_the_autoscalers_follow_the_load(prometheus: tuple[str, Server], data_dir: Path) -> None:
    """KEDA's query and prometheus-adapter's, read from the manifests, against the real
    server idle, at half a pod's target concurrency and at 2.7 times it (sentiment
    requests): the demand rises with the load, both scalers see the same, and the replica
    count each would set is the one the load calls for, for the CPU and the GPU bounds."""
    url, server = prometheus
    cpu, gpu = one("cpu-keda", "ScaledObject"), one("gpu", "ScaledObject")
    trigger = demand_trigger(cpu)
    target = float(trigger["metadata"]["threshold"])
    queries = [
        trigger["metadata"]["query"],
        adapter_query(),
        'sum(dlserve_queued_items{model="sentiment"})',
    ]
    assert demand_trigger(gpu)["metadata"]["query"] == queries[0]
    bounds = {
        name: (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"])
        for name, so in {"cpu": cpu, "gpu": gpu}.items()
    }
    # One SST-2 sentence per request, as docs/autoscaling.md measured the target with.
    requests = sentiment_requests(DataSource(data_dir, None), 1, 512)
    measured: dict[str, list[float]] = {}
    with (
        httpx.Client(base_url=url, timeout=30) as prom,
        ThreadPoolExecutor(max_workers=1) as load,
    ):
        # Idle first: scraped since the workers set the gauges, and what earlier tests sent
        # answered (the hang-ups' work too).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(query(prom, q) for q in queries) and read_together(prom, queries)[0] < 1:
                break
            time.sleep(0.5)
        for level, multiple in LEVELS.items():
            clients = round(multiple * target)
            running = None
            if clients:
                running = load.submit(
                    run_wrk,
                    server.url,
                    requests,
                    clients=clients,
                    duration_s=LEVEL_S,
                )
                time.sleep(SETTLE_S)
            readings = []
            for _ in range(3):
                readings.append(read_together(prom, queries))
                time.sleep(1)
            keda, adapter, queued = (sorted(column)[1] for column in zip(*readings, strict=True))
            assert keda == adapter, (level, readings)  # one pod: its value is the total
            measured[level] = [keda, queued]
            for name, bound in bounds.items():
                expected = replicas(clients, target, bound)
                assert replicas(keda, target, bound) == expected, (level, name, keda, clients)
            if running is not None:
                result = running.result()
                assert result["non_2xx"] == 0 and result["socket_errors"] == 0, result
    in_hand = [measured[level][0] for level in LEVELS]
    assert in_hand == sorted(in_hand) and len(set(in_hand)) == len(in_hand), measured
    assert in_hand[0] < 1, measured  # idle: at most a scrape of /metrics in hand now and then
    assert measured["idle"][1] == 0 < measured["over capacity"][1], measured


def test_prometheus_parses_the_scale_to_zero_trigger(prometheus: tuple[str, Server]) -> None:
    """components/keda-scale-to-zero's ingress query (no ingress here: no data, but the
    query must be one Prometheus accepts)."""
    (scaled,) = [d for d in scaled_to_zero() if d["kind"] == "ScaledObject"]
    with httpx.Client(base_url=prometheus[0], timeout=30) as client:
        for trigger in scaled["spec"]["triggers"]:
            query(client, trigger["metadata"]["query"])
