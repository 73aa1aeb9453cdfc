"""Issue 12: the Grafana dashboard (deploy/grafana/hpresilience.json) and the alert rules
(deploy/prometheus/alerts.yml) against a real Prometheus (Debian's package) scraping the real test
cluster's agent and controller after a fault was found and repaired: every panel's query parses and
returns data, every alert expression parses, the rule groups load healthy."""
from __future__ import annotations

import json
import re
import time
from typing import Callable, Dict, Iterator, List, Set, Tuple, TypeVar

import pytest
import yaml

from tests.prometheus_server import PrometheusServer, running_prometheus, scrape_config

from .conftest import REPO, LiveCluster, private_cluster, wait_until

PORT_BASE = 25000
DASHBOARD = REPO / "deploy" / "grafana" / "hpresilience.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
EXAMPLE_SCRAPE = REPO / "deploy" / "prometheus" / "prometheus.yml"
# XID 48 (double-bit ECC error): Action: Reboot, the cheapest repair the controller runs to the end.
XID48 = ("NVRM: Xid (PCI:0000:b9:00): 48, pid=<unknown>, name=<unknown>, An uncorrectable double bit error (DBE) "
         "has been detected on GPU in the framebuffer at partition 1, subpartition 0.")
T = TypeVar("T")
# Grafana's built-in interval variables, as Grafana would fill them in for a 1 s scrape interval.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict) -> Iterator[dict]:
    """Every panel, those inside collapsed rows included; rows themselves are not panels."""
    for p in d["panels"]:
        yield from p.get("panels", [])
        if p["type"] != "row":
            yield p


def variables(d: dict) -> Dict[str, str]:
    """The dashboard's own variables at their saved values, and Grafana's built-ins."""
    own = {v["name"]: v["current"].get("value") for v in d["templating"]["list"] if v["type"] != "datasource"}
    return {**GRAFANA_BUILTINS, **own}


def concrete(expr: str, values: Dict[str, str]) -> str:
    """`expr` with $name and ${name} replaced; an unknown variable is a test failure."""
    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        assert name in values, f"unknown Grafana variable ${name} in {expr!r}"
        return values[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def panel_queries() -> List[Tuple[str, str]]:
    """(panel title and refId, concrete expression) for every target of every panel."""
    d = dashboard()
    values = variables(d)
    return [(f"{p['title']} [{t['refId']}]", concrete(t["expr"], values)) for p in panels(d) for t in p["targets"]]


def alert_groups() -> List[dict]:
    return yaml.safe_load(ALERTS.read_text())["groups"]


def alert_rules() -> List[dict]:
    return [r for g in alert_groups() for r in g["rules"]]


# --------------------------------------------------------------- the file alone

def test_dashboard_is_importable_anywhere():
    """Schema 36 or later, every query on the ${datasource} variable (no datasource uid of ours
    baked in), only the jobs of deploy/prometheus/prometheus.yml, every panel in the README."""
    d = dashboard()
    assert d["schemaVersion"] >= 36
    [ds_var] = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["name"] == "datasource" and ds_var["query"] == "prometheus"
    wanted = {"type": "prometheus", "uid": "${datasource}"}
    everything = list(panels(d))
    assert everything and all(p["datasource"] == wanted and p["targets"] for p in everything)
    assert all(t["datasource"] == wanted and t["expr"].strip() for p in everything for t in p["targets"])
    jobs = {j["job_name"] for j in yaml.safe_load(EXAMPLE_SCRAPE.read_text())["scrape_configs"]}
    used = {job for _, expr in panel_queries() for job in re.findall(r'job="([^"]+)"', expr)}
    assert used and used <= jobs
    readme = (DASHBOARD.parent / "README.md").read_text()
    assert [p["title"] for p in everything if p["title"] not in readme] == []


# ------------------------------------------------------------------ live Prometheus

@pytest.fixture(scope="module")
def obs(tmp_path_factory) -> Iterator[LiveCluster]:
    """The cheapest cluster that runs a repair: one node with its agent; the controller is started
    by the test once Prometheus has seen the fault."""
    with private_cluster(tmp_path_factory, "observability", 1, PORT_BASE, "--agents") as c:
        yield c


def cluster_jobs(c: LiveCluster) -> Dict[str, List[str]]:
    """Scrape targets by job name: node i's agent on port base + 100 + i, the controller on + 90
    (scripts/testcluster), the port base read back from the cluster's state."""
    state = json.loads((c.dir / "cluster.json").read_text())
    base = state["port_base"]
    return {"hpresilience-agent": [f"127.0.0.1:{base + 100 + i}" for i in range(1, len(state["nodes"]) + 1)],
            "hpresilience-controller": [f"127.0.0.1:{base + 90}"]}


def has_data(prom: PrometheusServer, expr: str) -> bool:
    return bool(prom.result(expr))


def without_data(prom: PrometheusServer, queries: List[Tuple[str, str]]) -> List[str]:
    return [f"{name}: {expr}" for name, expr in queries if not prom.result(expr)]


def test_every_panel_and_alert_query_runs_against_a_live_prometheus(obs, tmp_path):
    config = scrape_config(cluster_jobs(obs), [ALERTS])
    with running_prometheus(tmp_path / "prometheus", config) as prom:
        wait_until(lambda: has_data(prom, 'up{job="hpresilience-agent"} == 1'), 20, "the agent scraped")
        obs.tc("log", "n1", XID48)
        # Seen while the agent still runs: the reboot restarts it and its counters with it.
        wait_until(lambda: has_data(prom, 'hpr_agent_findings_total{code="XID_48", action="reboot"} >= 1'), 20,
                   "the agent's XID 48 finding in Prometheus")
        obs.tc("controller", "start")
        try:
            wait_until(lambda: has_data(prom, 'hpr_controller_workflows_finished_total{action="reboot", '
                                              'status="done"} >= 1'), 60, "the reboot workflow done in Prometheus")
        except AssertionError:
            raise AssertionError((obs.dir / "controller.log").read_text()[-4000:]) from None
        # The repair moved real series, so data below is not zeros alone.
        assert has_data(prom, 'hpr_controller_deepcheck_runs_total{level="quick", status="pass"} >= 1')
        # ... and the faults panel counts the finding although the agent restarted with the reboot
        # (a plain increase() shows 0 for a counter that appeared at 1).
        faults = dict(panel_queries())["Faults by code ($window) [A]"]
        assert {(s["metric"]["code"], float(s["value"][1])) for s in prom.result(faults)} == {("XID_48", 1.0)}

        for rule in alert_rules():
            prom.result(rule["expr"])  # parses and evaluates; no alert need fire
        health = settle(lambda: rule_health(prom), lambda h: set(h) == alert_names() and set(h.values()) == {"ok"},
                        15)
        assert set(health) == alert_names() and set(health.values()) == {"ok"}, health

        queries = panel_queries()
        missing = settle(lambda: without_data(prom, queries), lambda m: not m, 15)
        assert not missing, "panel queries without data:\n" + "\n".join(missing)


def settle(probe: Callable[[], T], done: Callable[[T], bool], timeout: float) -> T:
    """Probe until done or `timeout`; the last probe's value either way, for the assertion to show."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.5)
        value = probe()
    return value


def alert_names() -> Set[Tuple[str, str]]:
    return {(g["name"], r["alert"]) for g in alert_groups() for r in g["rules"]}


def rule_health(prom: PrometheusServer) -> Dict[Tuple[str, str], str]:
    """(group, rule) -> health of every rule Prometheus loaded: "unknown" until first evaluated."""
    return {(g["name"], r["name"]): r["health"] for g in prom.get("/api/v1/rules")["data"]["groups"]
            for r in g["rules"]}
