"""A real browser (Debian's headless `chromium`) loads the status page of a lab fleet from a real
`hwledger fleet serve --http`: the DOM shows each agent with its state and its GPUs, a GPU name holding
`<script>` is text (no script element, the title untouched), and a screenshot is saved."""

from __future__ import annotations

import json
import subprocess
from html.parser import HTMLParser

from tests.integration.fleet_support import wait_for
from tests.integration.watch_support import XSS_NAME, add_h200, add_xss, chromium_argv, get, serve_http
from tests.toolchains import require_program


class _Dom(HTMLParser):
    """The cards (data-agent -> state, GPU names), every element name, and the title."""

    def __init__(self):
        super().__init__()
        self.elements: list[str] = []
        self.cards: dict[str, dict] = {}
        self.title = ""
        self._agent: str | None = None
        self._field: str | None = None

    def handle_starttag(self, tag, attrs):
        self.elements.append(tag)
        attrs = dict(attrs)
        if tag == "article" and "data-agent" in attrs:
            self._agent = attrs["data-agent"]
            self.cards[self._agent] = {"state": "", "gpus": []}
        elif tag == "title" and "title" not in self.elements[:-1]:
            self._field = "title"  # the page's; SVG titles come later
        elif self._agent and attrs.get("class") in ("state", "gpu-name"):
            self._field = attrs["class"]
            if self._field == "gpu-name":
                self.cards[self._agent]["gpus"].append("")

    def handle_endtag(self, tag):
        if tag in ("span", "div", "title"):
            self._field = None

    def handle_data(self, data):
        if self._field == "title":
            self.title += data
        elif self._field == "state":
            self.cards[self._agent]["state"] += data
        elif self._field == "gpu-name":
            self.cards[self._agent]["gpus"][-1] += data


def test_chromium_shows_the_lab_fleet_and_host_text_stays_text(fleet_env, lab, tmp_path):
    chromium = require_program("chromium", "chromium")
    h200, xss = add_h200(lab, fleet_env), add_xss(lab, fleet_env)
    down = lab.add_loopback_host(lab.unique_name("down"))
    fleet_env.register(down)
    down.stop()
    base = serve_http(fleet_env, "--interval", "1")

    def settled():
        states = {item["name"]: item["state"] for item in json.loads(get(base + "/api/fleet")[1])}
        return states if states == {h200.name: "online", xss.name: "online", down.name: "offline"} else None

    wait_for(settled, timeout=90, what="the lab agents to settle (online, online, offline)")
    dump = subprocess.run(chromium_argv(chromium, tmp_path / "profile", "--dump-dom", base + "/"),
                          capture_output=True, text=True, timeout=180, check=False, stdin=subprocess.DEVNULL)
    assert dump.returncode == 0, dump.stderr[-2000:]
    dom = _Dom()
    dom.feed(dump.stdout)
    assert dom.title == "hwledger fleet"  # the name's script never ran
    assert "script" not in dom.elements and "img" not in dom.elements
    assert {name: card["state"] for name, card in dom.cards.items()} == {
        h200.name: "online", xss.name: "online", down.name: "offline"}
    assert dom.cards[h200.name]["gpus"] == ["[0] NVIDIA H200"]
    assert dom.cards[xss.name]["gpus"] == [f"[0] {XSS_NAME}"]  # the markup shows as text
    assert dom.cards[down.name]["gpus"] == []  # it never answered

    shot = tmp_path / "fleet.png"
    taken = subprocess.run(chromium_argv(chromium, tmp_path / "profile", "--window-size=1280,900",
                                         f"--screenshot={shot}", base + "/"),
                           capture_output=True, text=True, timeout=180, check=False, stdin=subprocess.DEVNULL)
    assert taken.returncode == 0, taken.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
