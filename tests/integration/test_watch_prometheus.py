"""A real Prometheus (Debian's `prometheus`) scrapes a real `hwledger fleet serve --http` over a lab fleet,
with the bearer token from a credentials file, and answers through its own HTTP API the free memory that
the lab host's real nvidia-smi capture holds. `promtool check metrics` passes on what is served."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse

from tests.integration.fleet_support import wait_for
from tests.integration.watch_support import (
    H200_FREE_BYTES,
    TOKEN,
    add_h200,
    free_port,
    get,
    serve_http,
    token_file,
    value,
)
from tests.toolchains import require_program

SCRAPE_CONFIG = """\
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: hwledger
    authorization:
      credentials_file: {token}
    static_configs:
      - targets: ["{target}"]
"""


def _query(port: int, promql: str) -> list:
    try:
        status, body = get(f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(promql)}", timeout=10)
    except (urllib.error.URLError, ConnectionError):
        return []  # still starting
    if status != 200:
        return []
    return json.loads(body)["data"]["result"]


def test_prometheus_scrapes_the_lab_fleet_and_promtool_accepts_it(fleet_env, lab, tmp_path):
    prometheus = require_program("prometheus", "prometheus")
    promtool = require_program("promtool", "prometheus")
    host = add_h200(lab, fleet_env)
    token = token_file(fleet_env.root)
    base = serve_http(fleet_env, "--interval", "1", token=token)

    def exposition():
        status, body = get(base + "/metrics", token=TOKEN)
        assert status == 200
        text = body.decode()
        return text if value(text, "hwledger_gpu_memory_free_bytes", agent=host.name) is not None else None

    text = wait_for(exposition, timeout=60, what="the lab host's GPU on /metrics")
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=120,
                           check=False)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr

    config = tmp_path / "prometheus.yml"
    config.write_text(SCRAPE_CONFIG.format(token=token, target=base.removeprefix("http://")))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        result = wait_for(lambda: _query(port, f'hwledger_gpu_memory_free_bytes{{agent="{host.name}"}}'),
                          timeout=120, interval=0.5, what="Prometheus to have scraped hwledger")
        assert len(result) == 1
        labels = result[0]["metric"]
        assert float(result[0]["value"][1]) == H200_FREE_BYTES
        expected = ("0", "NVIDIA H200", "nvidia", "hwledger")
        assert (labels["gpu"], labels["name"], labels["backend"], labels["job"]) == expected
        assert labels["uuid"].startswith("GPU-")
        up = _query(port, 'up{job="hwledger"}')
        assert up and up[0]["value"][1] == "1"
        online = _query(port, f'hwledger_agent_state{{agent="{host.name}",state="online"}}')
        assert online and online[0]["value"][1] == "1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
