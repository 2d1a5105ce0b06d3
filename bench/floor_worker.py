"""The floor: a persistent-connection parallel exec (parallel-ssh over libssh2, one process).

Run as a child of the benchmark so that its CPU is its own: it reads a JSON spec on stdin, connects
to every host once (not timed), then for each line "round" on stdin runs the command on every host,
reads all the output, and prints one JSON line {"wall_s", "cpu_s", "ok"} (its own user+sys CPU; it
starts no processes). "quit" ends it. No host-key checking here: it is the floor, not a product.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    try:
        from pssh.clients import ParallelSSHClient  # pylint: disable=import-outside-toplevel
    except ImportError:
        print(json.dumps({"error": "parallel-ssh is not installed: pip install -r requirements/bench.txt"}),
              flush=True)
        return 3
    spec = json.loads(sys.stdin.readline())
    client = ParallelSSHClient(spec["hosts"], user=spec["user"], port=spec["port"], pkey=spec["key"],
                               pool_size=spec["pool_size"], num_retries=1, timeout=30)

    def one_round() -> dict:
        wall0, cpu0 = time.perf_counter(), _cpu()
        outputs = client.run_command(spec["command"], stop_on_errors=False)
        client.join(outputs)
        ok = 0
        for out in outputs:
            text = "".join(out.stdout or [])
            ok += int(out.exception is None and out.exit_code == 0 and "HWLEDGER-PROBE/1" in text)
        return {"wall_s": time.perf_counter() - wall0, "cpu_s": _cpu() - cpu0, "ok": ok}

    first = one_round()  # connects every host; not a steady-state figure
    print(json.dumps({"ready": True, "connect": first}), flush=True)
    for line in sys.stdin:
        if line.strip() == "round":
            print(json.dumps(one_round()), flush=True)
        elif line.strip() == "quit":
            break
    client.disconnect() if hasattr(client, "disconnect") else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
