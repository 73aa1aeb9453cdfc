"""A real Prometheus server for tests (issue 12): Debian's package (/usr/bin/prometheus, installed by
scripts/lib/setup.sh with promtool), on a free port, with its own storage directory, scraping the
targets a test names and loading rule files. Queried through its HTTP API with urllib."""
from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

import yaml

DEBIAN_BINARY = "/usr/bin/prometheus"
HTTP_TIMEOUT = 5.0


def prometheus_binary() -> str:
    """The binary, or an AssertionError saying how to get it: a missing Prometheus fails the test,
    never skips it (the set-up installs it; issue 12)."""
    found = shutil.which("prometheus") or (DEBIAN_BINARY if Path(DEBIAN_BINARY).exists() else None)
    if found is None:
        raise AssertionError("prometheus not found (neither on PATH nor /usr/bin/prometheus): run ./scripts/test, "
                             "whose set-up installs Debian's prometheus package, or `apt-get install prometheus`")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_config(jobs: Dict[str, Sequence[str]], rule_files: Sequence[Path], interval: str = "1s") -> str:
    """A prometheus.yml with one static job per entry of `jobs` (job name -> host:port targets)."""
    return yaml.safe_dump({
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}
                           for job, targets in jobs.items()],
    }, sort_keys=False)


@dataclass
class PrometheusServer:
    url: str
    proc: subprocess.Popen
    log: Path

    def get(self, path: str, **params: str) -> Dict[str, Any]:
        """GET an API path; Prometheus answers errors (a bad expression: 400) with a JSON body too."""
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    def query(self, expr: str) -> Dict[str, Any]:
        """An instant query at now: the whole answer (status, data or errorType/error)."""
        return self.get("/api/v1/query", query=expr)

    def result(self, expr: str) -> List[Dict[str, Any]]:
        """The samples of a query that must parse."""
        answer = self.query(expr)
        if answer.get("status") != "success":
            raise AssertionError(f"{expr!r}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]["result"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=HTTP_TIMEOUT) as r:
                return r.status == 200
        except OSError:  # not listening yet, or 503 while starting
            return False

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@contextlib.contextmanager
def running_prometheus(workdir: Path, config: str, ready_timeout: float = 30.0) -> Iterator[PrometheusServer]:
    """Start Prometheus with `config` in `workdir` (config, TSDB, log), wait for /-/ready, and stop it
    however the caller's block ends."""
    binary = prometheus_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(config)
    port = free_port()
    log = workdir / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = PrometheusServer(f"http://127.0.0.1:{port}", proc, log)
    try:
        _wait_ready(server, ready_timeout)
        yield server
    finally:
        _stop(proc)


def _wait_ready(server: PrometheusServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not server.ready():
        if server.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {server.proc.returncode}:\n{server.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"prometheus not ready after {timeout:.0f}s:\n{server.tail()}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)
