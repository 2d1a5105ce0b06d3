"""`/`: the fleet on one page a person reads at a glance. Server-rendered HTML with inline CSS and SVG: no
JavaScript, no build step, no external asset (it works offline), and a meta refresh every few seconds.

Everything a host supplies (agent names are the operator's, but GPU names, messages and job commands come
from hosts and users) goes through `text()`: control characters made visible as in the terminal
(`display.printable`), then HTML-escaped, quotes included, so it is inert in text and in attributes. The
server also sends a Content-Security-Policy that allows no script at all, in case this ever slips.
"""

from __future__ import annotations

import html
from datetime import datetime, timedelta, timezone

from hwledger.display import human_age, human_bytes, printable
from hwledger.store import MemoryPoint
from hwledger.store.schema import HISTORY_MINUTES

MAX_JOBS_SHOWN = 50
SPARK_W, SPARK_H = 120, 24

STYLE = """
:root { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1c2430; background: #f3f5f8; }
body { margin: 0 auto; max-width: 1400px; padding: 16px 24px; }
header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; }
h1 { font-size: 22px; margin: 0 0 12px; }
.summary { color: #556; font-size: 14px; }
.agents { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 14px; }
.card { background: #fff; border-radius: 8px; padding: 12px 14px; box-shadow: 0 1px 3px rgba(0,0,0,.12);
        border-top: 4px solid #9aa3ad; }
.card h2 { font-size: 17px; margin: 0; word-break: break-all; }
.head { display: flex; justify-content: space-between; align-items: center; gap: 8px; }
.state { font-size: 12px; font-weight: 600; padding: 2px 8px; border-radius: 10px; background: #e4e7eb; }
.state-online { border-top-color: #2e9d4f; } .state-online .state { background: #d5f2dd; color: #1d6b35; }
.state-stale, .state-degraded { border-top-color: #d69a00; }
.state-stale .state, .state-degraded .state { background: #fbefc9; color: #7a5800; }
.state-offline, .state-error { border-top-color: #d03b3b; }
.state-offline .state, .state-error .state { background: #f9d9d9; color: #8f1f1f; }
.state-host_key_changed { border-top-color: #7b3fc4; } .state-host_key_changed .state { background: #eadcf8; }
.meta { font-size: 12px; color: #667; margin: 4px 0 8px; }
.msg { font-size: 12px; color: #8f1f1f; margin: 0 0 8px; word-break: break-word; }
.gpus { list-style: none; padding: 0; margin: 0; }
h2.jobs { font-size: 18px; margin: 22px 0 8px; }
.gpu { border-top: 1px solid #eef0f3; padding: 6px 0; }
.gpu-name { font-size: 13px; font-weight: 600; word-break: break-word; }
.gpu-row { display: flex; align-items: center; gap: 10px; font-size: 12px; color: #334; }
.bar { flex: 1 1 auto; min-width: 80px; height: 10px; }
.bar rect.total { fill: #e4e7eb; } .bar rect.used { fill: #3b6fd0; }
.spark polyline { fill: none; stroke: #2e9d4f; stroke-width: 1.5; }
.spark rect { fill: #f6f8fa; }
.figures { font-size: 12px; color: #445; display: flex; gap: 12px; flex-wrap: wrap; margin-top: 3px; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: 13px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #eef0f3; }
td.cmd { font-family: ui-monospace, monospace; word-break: break-all; }
.none { color: #778; font-size: 13px; }
"""


def text(value: object, *, limit: int | None = None) -> str:
    """Host- or user-supplied text, safe in HTML text and attributes."""
    return html.escape(printable(value, limit=limit), quote=True)


def _figure(css: str, value: object, fmt: str) -> str:
    """One reading, or nothing when the GPU did not report it (as on /metrics: absent, not 0)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<span class="{css}">{fmt.format(value)}</span>'
    return ""


def memory_bar(used: int | None, total: int | None) -> str:
    if not total or used is None:
        return '<span class="bar none">memory not reported</span>'
    share = max(0.0, min(1.0, used / total))
    return (f'<svg class="bar" viewBox="0 0 100 10" preserveAspectRatio="none" role="img" '
            f'aria-label="{share * 100:.0f}% of memory used"><rect class="total" width="100" height="10"/>'
            f'<rect class="used" width="{share * 100:.2f}" height="10"/></svg>')


def sparkline(points: list[MemoryPoint], now: datetime) -> str:
    """Free memory over the last hour, one point per minute (the least free in it); a gap where no answer
    came. The y axis is the share of the GPU's memory that was free."""
    start = now - timedelta(minutes=HISTORY_MINUTES)
    segments: list[list[str]] = [[]]
    last_x = None
    for point in points:
        if point.free_bytes is None or not point.total_bytes:
            segments.append([])
            continue
        when = datetime.strptime(point.minute, "%Y-%m-%dT%H:%M").replace(tzinfo=timezone.utc)
        x = (when - start).total_seconds() / (HISTORY_MINUTES * 60) * SPARK_W
        if last_x is not None and x - last_x > 1.5 * SPARK_W / HISTORY_MINUTES:
            segments.append([])
        last_x = x
        y = SPARK_H - 1 - max(0.0, min(1.0, point.free_bytes / point.total_bytes)) * (SPARK_H - 2)
        segments[-1].append(f"{max(0.0, x):.1f},{y:.1f}")
    lines = "".join(f'<polyline points="{" ".join(seg)}"/>' for seg in segments if len(seg) > 1)
    dots = "".join(f'<circle cx="{seg[0].split(",")[0]}" cy="{seg[0].split(",")[1]}" r="1.2" fill="#2e9d4f"/>'
                   for seg in segments if len(seg) == 1)
    frees = [p.free_bytes for p in points if p.free_bytes is not None]
    label = (f"free memory, last hour: least {human_bytes(min(frees))}, latest {human_bytes(frees[-1])}"
             if frees else "no free-memory history yet")
    return (f'<svg class="spark" width="{SPARK_W}" height="{SPARK_H}" viewBox="0 0 {SPARK_W} {SPARK_H}" '
            f'role="img" aria-label="{text(label)}"><title>{text(label)}</title>'
            f'<rect width="{SPARK_W}" height="{SPARK_H}"/>{lines}{dots}</svg>')


def gpu_block(gpu: dict, history: list[MemoryPoint], now: datetime) -> str:
    total, free, used = gpu.get("memory_total_bytes"), gpu.get("memory_free_bytes"), gpu.get("memory_used_bytes")
    if used is None and total is not None and free is not None:
        used = total - free
    memory = f"{human_bytes(free)} free of {human_bytes(total)}" if total is not None else "memory not reported"
    health = gpu.get("health")
    warn = f' <span class="msg">{text(health)}</span>' if health not in (None, "ok") else ""
    return (f'<li class="gpu" data-gpu="{text(gpu.get("index"))}">'
            f'<div class="gpu-name">[{text(gpu.get("index"))}] {text(gpu.get("name") or "unnamed GPU", limit=120)}'
            f'{warn}</div>'
            f'<div class="gpu-row">{memory_bar(used, total)}{sparkline(history, now)}</div>'
            f'<div class="figures"><span class="mem">{text(memory)}</span>'
            f'{_figure("util", gpu.get("utilization_gpu_percent"), "util {:.0f}%")}'
            f'{_figure("temp", gpu.get("temperature_c"), "{:.0f} °C")}'
            f'{_figure("power", gpu.get("power_draw_w"), "{:.0f} W")}</div></li>')


def agent_card(item: dict, history: dict[int, list[MemoryPoint]], now: datetime) -> str:
    state = str(item["state"])
    seen = human_age(item.get("last_seen_age_s"))
    parts = [f'<article class="card state-{text(state)}" data-agent="{text(item["name"])}">',
             f'<div class="head"><h2>{text(item["name"])}</h2><span class="state">{text(state)}</span></div>',
             f'<p class="meta">last seen {text(seen)}'
             f'{" · " + text(item["backend"]) if item.get("backend") else ""}'
             f'{" · " + str(len(item["gpus"])) + " GPU(s)" if item["gpus"] else ""}'
             f'{" · " + text(_jobs_note(item["jobs"])) if item.get("jobs") else ""}</p>']
    if item.get("reason") and item.get("recorded_state") != "online":
        parts.append(f'<p class="msg">{text(item["reason"])}: {text(item.get("msg"), limit=300)}</p>')
    if item["gpus"]:
        if state not in ("online", "degraded"):
            parts.append(f'<p class="meta">GPU data from {text(human_age(item.get("snapshot_age_s")))}</p>')
        parts.append('<ul class="gpus">')
        parts += [gpu_block(gpu, history.get(gpu.get("index"), []), now) for gpu in item["gpus"]]
        parts.append("</ul>")
    parts.append("</article>")
    return "".join(parts)


def _jobs_note(jobs: dict) -> str:
    return ", ".join(f"{count} {state}" for state, count in sorted(jobs.items()))


def jobs_table(jobs: list[dict], now: datetime) -> str:
    if not jobs:
        return '<p class="none">No job is running or queued.</p>'
    order = {"running": 0, "dispatched": 1, "queued": 2}
    jobs = sorted(jobs, key=lambda job: (order.get(job["state"], 3), job["created_at"]))
    rows = []
    for job in jobs[:MAX_JOBS_SHOWN]:
        since = job.get("started_at") or job.get("dispatched_at") or job["created_at"]
        age = (now - datetime.fromisoformat(since)).total_seconds()
        command = " ".join(str(word) for word in (job.get("spec") or {}).get("command") or [])
        rows.append(f'<tr data-job="{text(job["job_id"])}"><td>{text(job["job_id"][:8])}</td><td>{text(job["agent"])}</td>'
                    f'<td class="job-state">{text(job["state"])}</td><td class="cmd">{text(command, limit=160)}</td>'
                    f'<td>{text(human_age(age))}</td></tr>')
    more = (f'<p class="none">and {len(jobs) - MAX_JOBS_SHOWN} more (hwledger job list)</p>'
            if len(jobs) > MAX_JOBS_SHOWN else "")
    return ("<table><thead><tr><th>job</th><th>agent</th><th>state</th><th>command</th><th>since</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{more}")


def render(items: list[dict], histories: dict[str, dict[int, list[MemoryPoint]]], jobs: list[dict], *,
           now: datetime, refresh_s: int) -> str:
    """The whole page. `items`: fleet status items; `histories`: {agent: {gpu: points}}; `jobs`: active and
    queued jobs as served (`api.served_jobs`)."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item["state"]] = counts.get(item["state"], 0) + 1
    summary = ", ".join(f"{count} {state}" for state, count in sorted(counts.items())) or "no agents"
    cards = "".join(agent_card(item, histories.get(item["name"], {}), now) for item in items)
    if not cards:
        cards = '<p class="none">No agents registered yet: hwledger fleet register-ssh.</p>'
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>hwledger fleet</title><style>{STYLE}</style></head><body>"
        f'<header><h1>hwledger fleet</h1><span class="summary" id="summary">{len(items)} agent(s): '
        f'{text(summary)} · updated <time datetime="{now.isoformat(timespec="seconds")}">'
        f'{now.strftime("%Y-%m-%d %H:%M:%S")} UTC</time> · every {int(refresh_s)} s</span></header>'
        f'<main><section class="agents" id="agents">{cards}</section>'
        '<h2 class="jobs">Running and queued jobs</h2>'
        f'<section id="jobs">{jobs_table(jobs, now)}</section></main></body></html>'
    )
