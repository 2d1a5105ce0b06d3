"""The steady-state run: consecutive serve ticks in a fresh process, as a long-running server lives.

Run by the benchmark as a child (`python -m bench.steady`, JSON spec on stdin, JSON result on stdout),
so its RSS, its children and its files are those of a server and nothing else. It builds the same
`Server` + `SshFanoutHeartbeat` as `hwledger fleet serve --transport fanout`, runs warm-up ticks (they
fill the store's per-agent snapshot retention), then the measured ticks at the given interval, and
reports tick wall percentiles, RSS drift, disk growth and the processes alive before and after.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import time
from pathlib import Path

from bench.approaches import FleetFiles, Product
from bench.measure import Meter, census, disk_usage, percentile, rss_mb


def _store_files(data_dir: Path) -> list[Path]:
    db = data_dir / "fleet.db"
    return [db, Path(f"{db}-wal"), Path(f"{db}-shm")]


def _disk(data_dir: Path) -> dict:
    total, files = disk_usage([data_dir])
    store = sum(p.stat().st_size for p in _store_files(data_dir) if p.exists())
    probe_dirs = len(glob.glob("/tmp/hwledger-probe.*"))  # the hosts' temp dirs (same machine here)
    return {"bytes": total, "files": files, "store_bytes": store, "probe_tmp_dirs": probe_dirs}


def _other_bytes(point: dict) -> int:
    """Bytes on disk besides the store (db, -wal, -shm)."""
    return point["disk"]["bytes"] - point["disk"]["store_bytes"]


def run(spec: dict) -> dict:
    files = FleetFiles(Path(spec["data_dir"]))
    product = Product(files, query_timeout_s=spec["query_timeout_s"], max_parallel=spec["max_parallel"])
    meter = Meter(product.control_dir)
    try:
        for _warmup in range(spec["warmup_ticks"]):
            product.server.tick()
        before = {"processes": census(product.control_dir, descendants_of=os.getpid()).as_dict(),
                  "rss_mb": rss_mb(), "disk": _disk(files.data_dir)}
        walls, cpus, ok, rss_series = [], [], [], []
        for tick in range(spec["ticks"]):
            if tick % 10 == 0:
                rss_series.append(round(rss_mb(), 2))
            sample, report = product.tick(meter)
            walls.append(sample.wall_s)
            cpus.append(sample.cpu_s)
            ok.append(sum(1 for o in report.outcomes.values() if o.ok))
            time.sleep(max(0.0, spec["interval_s"] - sample.wall_s))
        after = {"processes": census(product.control_dir, descendants_of=os.getpid()).as_dict(),
                 "rss_mb": rss_mb(), "disk": _disk(files.data_dir)}
    finally:
        product.close()
    leaked = sum(max(0, after["processes"][k] - before["processes"][k]) for k in before["processes"])
    return {
        "n": spec["n"],
        "ticks": spec["ticks"],
        "tick_wall_p50_s": round(percentile(walls, 50), 4),
        "tick_wall_p95_s": round(percentile(walls, 95), 4),
        "rss_drift_mb": round(after["rss_mb"] - before["rss_mb"], 2),
        "disk_growth_bytes": after["disk"]["bytes"] - before["disk"]["bytes"],
        "leaked_processes": leaked,
        # Beyond the shape: what the figures above come from.
        "tick_wall_max_s": round(max(walls), 4),
        "tick_cpu_p50_s": round(percentile(cpus, 50), 4),
        "hosts_ok_min": min(ok),
        "interval_s": spec["interval_s"],
        "warmup_ticks": spec["warmup_ticks"],
        "store_growth_bytes": after["disk"]["store_bytes"] - before["disk"]["store_bytes"],
        "other_growth_bytes": _other_bytes(after) - _other_bytes(before),
        "files_growth": after["disk"]["files"] - before["disk"]["files"],
        "rss_mb_every_10_ticks": rss_series + [round(after["rss_mb"], 2)],
        "before": before,
        "after": after,
    }


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    spec = json.loads(sys.stdin.read())
    print(json.dumps(run(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
