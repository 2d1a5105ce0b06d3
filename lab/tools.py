"""The remote side of a lab host: its PATH (bin dir) and the fake GPU tools that replay real captures.

A fake tool is a POSIX sh script (no python) that replays four behaviour files byte for byte: stdout,
stderr, rc and delay.  Each ``write_behaviour`` writes a new version directory and then swaps the
``tools/<tool>`` symlink to it in one rename, so a query running at that moment sees either the old or
the new behaviour, never half of each (the script resolves the link once, with ``cd -P``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

from .system import SYSTEM_PATH, LabError

FIXTURES_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gpu"

DEFAULT_GPU_QUERY_CMD = "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader"

# What the default query prints.  No capture in tests/fixtures/gpu has exactly this shape; these are
# the two data rows of nvidia/csv-header-index-name-memtotal-memfree-2xRTX4070Laptop-RTX5070Ti-windows.txt
# (the same four fields queried with --format=csv), i.e. that real output without its header line,
# which is what ``--format=csv,noheader`` prints.  test_lab.py checks it against the file.
DEFAULT_NVIDIA_STDOUT = (
    "0, NVIDIA GeForce RTX 4070 Laptop GPU, 8188 MiB, 7948 MiB\n"
    "1, NVIDIA GeForce RTX 5070 Ti, 16303 MiB, 15799 MiB\n"
)

GPU_TOOLS = ("nvidia-smi", "rocm-smi", "amd-smi")
_TOOL_NAME = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")

# What a remote GPU host offers besides the GPU tools: a POSIX sh and the usual small utilities.
# python3 is deliberately absent (it is linked only for python=True hosts).
REQUIRED_TOOLS = ("sh", "cat", "sleep", "kill", "rm", "mkdir", "mktemp", "env", "[", "test", "printf")
POSIX_TOOLS = REQUIRED_TOOLS + (
    "awk", "base64", "basename", "chmod", "cp", "cut", "date", "dd", "df", "dirname", "echo", "expr",
    "false", "find", "free", "grep", "gzip", "head", "hostname", "id", "ln", "ls", "md5sum", "mv",
    "nohup", "nproc", "od", "pgrep", "pkill", "ps", "pwd", "readlink", "realpath", "rmdir", "sed",
    "seq", "setsid", "sha256sum", "sort", "stat", "tail", "tar", "tee", "timeout", "touch", "tr",
    "true", "uname", "uniq", "uptime", "wc", "xargs",
)  # fmt: skip


def populate_bin_dir(bin_dir: Path, *, python: bool) -> None:
    """Symlink the system's POSIX tools (and python3 when asked) into the host's remote PATH."""
    bin_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    bin_dir.chmod(0o755)  # whatever the umask: an unprivileged login must list and run it
    for tool in POSIX_TOOLS:
        target = shutil.which(tool, path=SYSTEM_PATH)
        if target is None:
            if tool in REQUIRED_TOOLS and tool != "kill":  # kill is also a sh builtin
                raise LabError(f"the lab needs `{tool}` on {SYSTEM_PATH} for its remote hosts")
            continue
        (bin_dir / tool).symlink_to(target)
    if python:
        # The system interpreter, not this virtualenv's: a remote has a plain python3.
        target = shutil.which("python3", path=SYSTEM_PATH)
        if target is None:
            raise LabError(f"python=True needs python3 on {SYSTEM_PATH}")
        (bin_dir / "python3").symlink_to(target)


def check_tool_name(tool: str) -> None:
    if not _TOOL_NAME.match(tool) or tool.endswith(".calls"):
        raise ValueError(f"fake tool name {tool!r}: use a plain command name such as 'nvidia-smi'")


def _script(tools_dir: Path, tool: str) -> str:
    link = shlex.quote(str(tools_dir / tool))
    calls = shlex.quote(str(tools_dir / f"{tool}.calls"))
    return f"""#!/bin/sh
# hwledger test lab: fake {tool}.  Replays the behaviour files under {link} byte for byte.
# Uses only sh builtins, cat and sleep: the remote needs no python.
printf '%s\\n' "$*" >>{calls}
cd -P {link} || exit 127
read -r delay <delay
if [ "$delay" != 0 ]; then
    # Sleep in the background and wait: a trapped signal interrupts `wait` at once, so TERM (from
    # timeout(1), a killed session, Lab.stop) ends the tool and its sleeper together.
    sleep "$delay" &
    sleeper=$!
    trap 'kill "$sleeper" 2>/dev/null; exit 143' TERM
    trap 'kill "$sleeper" 2>/dev/null; exit 129' HUP
    trap 'kill "$sleeper" 2>/dev/null; exit 130' INT
    wait "$sleeper"
    trap - TERM HUP INT
fi
cat stdout
cat stderr >&2
read -r rc <rc
exit "$rc"
"""


def install_tool(bin_dir: Path, tools_dir: Path, tool: str) -> None:
    check_tool_name(tool)
    path = bin_dir / tool
    tmp = bin_dir / f".{tool}.tmp"
    tmp.write_text(_script(tools_dir, tool))
    tmp.chmod(0o755)
    os.replace(tmp, path)


def remove_tool(bin_dir: Path, tool: str) -> None:
    check_tool_name(tool)
    (bin_dir / tool).unlink(missing_ok=True)


def capture_bytes(capture: str) -> bytes:
    """The bytes of a capture named relative to tests/fixtures/gpu (checked to stay inside it)."""
    path = (FIXTURES_DIR / capture).resolve()
    if not path.is_relative_to(FIXTURES_DIR) or not path.is_file():
        raise ValueError(
            f"capture {capture!r} is not a file under {FIXTURES_DIR}; name it relative to that directory, "
            "e.g. 'nvidia/csv-noheader-utilization-gpu-1xGPU.txt' (see SOURCES.md there)"
        )
    return path.read_bytes()


def _as_bytes(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode()


def stdout_for(tool: str, capture: str | None, stdout: str | bytes | None) -> bytes:
    if capture is not None and stdout is not None:
        raise ValueError("give the fake tool either capture= or stdout=, not both")
    if capture is not None:
        return capture_bytes(capture)
    if stdout is not None:
        return _as_bytes(stdout)
    return DEFAULT_NVIDIA_STDOUT.encode() if tool == "nvidia-smi" else b""


def write_behaviour(
    tools_dir: Path,
    tool: str,
    *,
    stdout: bytes,
    stderr: str | bytes,
    rc: int,
    delay: float,
) -> None:
    check_tool_name(tool)
    if not isinstance(rc, int) or not 0 <= rc <= 255:
        raise ValueError(f"fake tool exit code must be an int 0..255, got {rc!r}")
    if delay < 0:
        raise ValueError(f"fake tool delay must be >= 0 seconds, got {delay!r}")
    tools_dir.mkdir(mode=0o755, exist_ok=True)
    version = _next_version(tools_dir, tool)
    version.mkdir(mode=0o755)
    (version / "stdout").write_bytes(stdout)
    (version / "stderr").write_bytes(_as_bytes(stderr))
    (version / "rc").write_text(f"{rc}\n")
    (version / "delay").write_text("0\n" if delay == 0 else f"{delay:.3f}\n")
    # Readable by an unprivileged login whatever the umask of the process writing them (a test process
    # may run under 077, and so may whoever runs `make demo`).
    version.chmod(0o755)
    for name in ("stdout", "stderr", "rc", "delay"):
        (version / name).chmod(0o644)
    link = tools_dir / tool
    tmp_link = tools_dir / f".{tool}.link"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(version.name)
    os.replace(tmp_link, link)


def _next_version(tools_dir: Path, tool: str) -> Path:
    # Old versions stay: a query already running inside one keeps reading it.
    n = 1 + sum(1 for _version in tools_dir.glob(f"{tool}.v*"))
    while (tools_dir / f"{tool}.v{n}").exists():
        n += 1
    return tools_dir / f"{tool}.v{n}"


def read_calls(tools_dir: Path, tool: str) -> list[str]:
    """The argument lists the fake tool was run with, one string per call (oldest first)."""
    check_tool_name(tool)
    path = tools_dir / f"{tool}.calls"
    return path.read_text().splitlines() if path.exists() else []
