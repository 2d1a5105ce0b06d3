"""`python -m demo.supervisor DIR`: the process that owns a kept-up demo fleet (see demo/fleet.py).

Started detached by `demo.fleet.start`; runs until SIGTERM (or SIGINT), then takes the lab down and
exits. Its output goes to DIR/fleet.log.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from demo.fleet import STATE_FILE, start_hosts, state_of
from lab import Lab


class _Stop(Exception):
    """SIGTERM or SIGINT arrived."""


def _stop(_signum, _frame) -> None:
    raise _Stop


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m demo.supervisor DIR  (started by `python -m demo --keep`)", file=sys.stderr)
        return 2
    directory = Path(argv[0]).resolve()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # no terminal to lose, but be sure
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    lab = None
    try:
        lab = Lab(directory / "lab", unprivileged=True)
        hosts = start_hosts(lab)
        state_of(lab, hosts).write(directory)
        print(f"demo fleet up: lab {lab.id}, " + ", ".join(f"{h.name} {h.user}@{h.address}:{h.port}" for h in hosts),
              flush=True)
        while True:
            signal.pause()
    except _Stop:
        print("demo fleet: stopping", flush=True)
    finally:
        # Nothing may interrupt the teardown half-way.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        (directory / STATE_FILE).unlink(missing_ok=True)
        if lab is not None:
            lab.stop()
            print("demo fleet: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
