"""The status page (hwledger/web/page.py): every host-supplied string is inert HTML, a card per agent with
its state and GPUs, absent readings stay absent, and the sparkline follows the stored hour."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser

from hwledger.reports import status_items
from hwledger.store import MemoryPoint
from hwledger.web import page


class _Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def _parse(html: str) -> _Dom:
    dom = _Dom()
    dom.feed(html)
    return dom


NOW = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)


def test_a_card_per_agent_and_host_text_never_becomes_markup(fleet_store):
    items = status_items(fleet_store, 30)
    evil_job = {"job_id": "0f8fad5b-d9cb-469f-a165-70867728950e", "agent": "h200", "state": "running",
                "created_at": NOW.isoformat(), "started_at": NOW.isoformat(),
                "spec": {"command": ["sh", "-c", "echo '\"><img src=x onerror=alert(1)>'"]}}
    html = page.render(items, {}, [evil_job], now=NOW, refresh_s=5)
    dom = _parse(html)
    assert "script" not in dom.tags and "img" not in dom.tags
    text = "".join(dom.text)
    assert "<script>alert(1)</script>" in text  # shown as text
    assert "\"><img src=x onerror=alert(1)>" in text
    assert html.count('class="card state-') == 4
    for name, state in (("h200", "online"), ("sparse", "online"), ("gone", "offline"), ("new", "pending")):
        assert f'class="card state-{state}" data-agent="{name}"' in html
    assert '<meta http-equiv="refresh" content="5">' in html
    assert "http://" not in html and "https://" not in html  # no external asset


def test_absent_readings_are_not_shown_as_zero(fleet_store):
    items = [i for i in status_items(fleet_store, 30) if i["name"] in ("h200", "sparse")]
    html = page.render(items, {}, [], now=NOW, refresh_s=5)
    h200, sparse = html.split('data-agent="sparse"')
    assert "util 100%" in h200 and "52 °C" in h200 and "627 W" in h200
    assert "util" not in sparse and "°C" not in sparse and " W<" not in sparse


def test_the_sparkline_draws_the_hour_with_gaps_where_nothing_came():
    points = [MemoryPoint((NOW - timedelta(minutes=m)).strftime("%Y-%m-%dT%H:%M"), free, 100)
              for m, free in ((50, 80), (49, 60), (48, 40), (10, 90), (9, 95))]
    svg = page.sparkline(points, NOW)
    assert svg.count("<polyline") == 2  # the 38-minute gap splits it
    assert "least 40 B" in svg and "latest 95 B" in svg
    assert "no free-memory history" in page.sparkline([], NOW)
