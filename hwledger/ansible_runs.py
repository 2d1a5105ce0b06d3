"""The app's one wrapper around ansible-runner. Every playbook the app runs goes through `AnsibleRuns`.

What it guarantees, and why:
- A fresh private data dir per run (mkdtemp, 0700, under the store's `runs/` dir), removed in
  `finally`. Runner leaves ~1 KiB per host per run otherwise; a 5 s heartbeat would fill the disk.
- `ANSIBLE_HOST_KEY_CHECKING=True`, always: ansible-runner sets it to False unless told, and then
  Ansible puts `-o StrictHostKeyChecking=no` first on the ssh command line, where it beats the
  host-key options of the agent's `ansible_ssh_common_args` (ssh keeps the first value it reads).
- Runner writes `artifacts/<ident>/command` with the whole environment of the run. The run's
  environment is therefore cut down to an allowlist (PATH, HOME, locale, SSH_AUTH_SOCK, ...) plus the
  ANSIBLE_* settings set here; the caller's other variables (tokens, passwords) never reach
  ansible-playbook or the disk. No env/ files are written (`suppress_env_files`), no stdout file.
- Only ansible-runner's documented interface is used: a `RunnerConfig` (which its documentation says
  "can also be overridden"; ours overrides `prepare_env` for the allowlist above) handed to `Runner`,
  with the `event_handler` and `cancel_callback` hooks.
- Extra vars go through a 0600 file in the private dir, never on the command line (argv is readable
  by every local user through /proc).
- Our own ansible.cfg in the private dir (`ANSIBLE_CONFIG`): a user's ~/.ansible.cfg or
  /etc/ansible/ansible.cfg cannot switch host key checking off or add logging callbacks.
- Every ssh option (ControlMaster/ControlPersist/ControlPath included) comes from the hosts'
  `ansible_ssh_common_args` (built by `ssh.ssh_common_args`); `ANSIBLE_SSH_ARGS` is empty, so Ansible's
  own defaults (ControlPersist=60s) do not come first. Masters are therefore the ones the fan-out and a
  hand-run playbook use too: a heartbeat or a job costs a channel, not a handshake.
- `cancel_callback` is polled every 0.2 s, so a shutdown or a job cancel stops the run at once
  (runner kills the ansible-playbook process group).
- The event handler keeps what the caller asks for in memory and tells runner not to write events.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ansible_collections.hwledger.fleet.plugins.plugin_utils import private_files, processes

# What ansible-playbook inherits from the app's environment. Everything else is dropped.
ENV_ALLOWLIST = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "TMPDIR",
    "SSH_AUTH_SOCK", "VIRTUAL_ENV",
)
RUN_DIR_PREFIX = "run-"
CONNECT_TIMEOUT_S = 10
CANCEL_POLL_S = 0.2

# The events a run keeps (in memory): per-host outcomes and the stats.
HOST_OUTCOME_EVENTS = frozenset({
    "runner_on_ok", "runner_on_failed", "runner_on_unreachable", "runner_on_skipped",
    "runner_item_on_ok", "runner_item_on_failed", "playbook_on_stats",
})
# Events only passed on to `on_event`, never kept: a task's start on a host, and an async task's polls (one
# every few seconds for as long as a job runs). They tell when a job's command was launched.
PASSED_ON_EVENTS = frozenset({"runner_on_start", "runner_on_async_poll"})


_STATS_KEYS = ("ok", "failures", "dark", "changed", "skipped", "rescued", "ignored")


@dataclass(frozen=True)
class HostEvent:
    """One per-host task outcome, reduced to what the app reads."""

    event: str            # runner_on_ok | runner_on_failed | runner_on_unreachable | ...
    host: str
    task: str
    action: str
    res: dict


@dataclass
class PlaybookRun:
    status: str                      # successful | failed | canceled | timeout | error
    rc: int | None
    duration_s: float
    host_events: dict[str, list[HostEvent]] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    output_tail: str = ""            # the last lines Ansible printed (for a failed run's message)
    error: str | None = None         # a runner-side exception, if any

    def failure_text(self) -> str:
        """Why the run failed, for a log line or an error message."""
        if self.error:
            return self.error
        tail = [line for line in self.output_tail.splitlines() if line.strip()]
        return f"ansible-playbook ended {self.status} (rc {self.rc}): " + " / ".join(tail[-3:])


def _search_path() -> str:
    """PATH for the run, with the app's own interpreter dir first: its ansible-playbook is the one
    that matches the installed ansible-core (a virtualenv need not be activated)."""
    own_bin = str(Path(sys.executable).parent)
    rest = [p for p in os.environ.get("PATH", os.defpath).split(os.pathsep) if p and p != own_bin]
    return os.pathsep.join([own_bin, *rest])


def _collections_path() -> str | None:
    """The collections dir that holds hwledger.fleet for this interpreter, if it can be found."""
    with contextlib.suppress(ImportError, ValueError, AttributeError):
        spec = importlib.util.find_spec("ansible_collections.hwledger.fleet")
        if spec and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                root = Path(location)
                if root.parts[-3:] != ("ansible_collections", "hwledger", "fleet"):
                    continue  # e.g. the editable-install mapping of the checkout root
                if (root / "galaxy.yml").exists() or (root / "MANIFEST.json").exists():
                    return str(root.parents[2])
    return None


_ANSIBLE_CFG = """\
# Written by hwledger for one run; removed with the run's private dir.
[defaults]
host_key_checking = True
retry_files_enabled = False
gathering = explicit
interpreter_python = auto_silent
nocolor = True
"""


class AnsibleRuns:
    """Runs playbooks for the app. Thread-safe: every run has its own private dir and config."""

    def __init__(self, *, runs_dir: Path, forks: int = 50, connect_timeout_s: int = CONNECT_TIMEOUT_S):
        self.runs_dir = Path(private_files.ensure_private_dir(Path(runs_dir).absolute(), "hwledger's directory",
                                                              tighten=True))
        self.forks = forks
        self.connect_timeout_s = connect_timeout_s
        self._collections = _collections_path()
        self._lock = threading.Lock()
        self._active: set[Path] = set()

    # -- environment -----------------------------------------------------------------------

    def _envvars(self, private_dir: Path) -> dict[str, str]:
        env = {
            "PATH": _search_path(),
            "ANSIBLE_CONFIG": str(private_dir / "ansible.cfg"),
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            # Empty: every ssh option (ControlMaster/ControlPersist/ControlPath included) comes from the
            # agent's ansible_ssh_common_args, built by the one ssh command-line builder (ssh.ssh_options).
            "ANSIBLE_SSH_ARGS": "",
            # A retry after ssh's 255 could start a job twice; never retry.
            "ANSIBLE_SSH_RETRIES": "0",
            "ANSIBLE_TIMEOUT": str(self.connect_timeout_s),
            "ANSIBLE_FORKS": str(self.forks),
            "ANSIBLE_LOCAL_TEMP": str(private_dir / "tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_DEPRECATION_WARNINGS": "False",
            "ANSIBLE_PYTHON_INTERPRETER": "auto_silent",
        }
        if self._collections:
            env["ANSIBLE_COLLECTIONS_PATH"] = self._collections
        for name in ("LANG", "LC_ALL"):
            if not os.environ.get(name):
                env[name] = "C.UTF-8"  # ansible-core refuses a non-UTF-8 locale
        return env

    # -- running ---------------------------------------------------------------------------

    def run_playbook(
        self,
        playbook: str,
        *,
        inventory: dict,
        extravars: dict | Callable[[Path], dict] | None = None,
        limit: str | None = None,
        cancel: Callable[[], bool] | None = None,
        on_event: Callable[[HostEvent], None] | None = None,
        timeout_s: float | None = None,
        label: str = "run",
        on_private_dir: Callable[[Path], None] | None = None,
        skip_tags: str | None = None,
    ) -> PlaybookRun:
        """Run `playbook` (an FQCN such as `hwledger.fleet.heartbeat`, or a playbook file's path) and return
        what happened.

        `extravars` may be a function of the run's private dir (0700, removed after the run), for
        callers that put files there (a job spec read as data, never templated) and pass their paths.
        `on_private_dir(path)` is called with the run's private dir before ansible-playbook starts
        (the job worker records it, so a crashed server's orphaned run can be found by its path).
        `on_event` sees every kept host event as it arrives (from the runner thread).
        `skip_tags`: tasks the run leaves out (filtered before any worker starts, so they cost nothing).
        """
        import ansible_runner  # imported here: ~0.2 s, and CLI commands that never run Ansible skip it

        run_config = _run_config_class()

        started = time.monotonic()
        private_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{label}-", dir=self.runs_dir))
        with self._lock:
            self._active.add(private_dir)
        result = PlaybookRun(status="error", rc=None, duration_s=0.0)
        tail: list[str] = []

        def handle(event: dict) -> bool:
            stdout = event.get("stdout")
            if stdout:
                tail.extend(stdout.splitlines()[-20:])
                del tail[:-40]
            name = event.get("event", "")
            if name not in HOST_OUTCOME_EVENTS and name not in PASSED_ON_EVENTS:
                return False
            data = event.get("event_data") or {}
            if name == "playbook_on_stats":
                result.stats = {k: data.get(k) for k in _STATS_KEYS}
                return False
            host = data.get("host")
            if host:
                host_event = HostEvent(name, host, data.get("task", ""), data.get("task_action", ""),
                                       data.get("res") if isinstance(data.get("res"), dict) else {})
                if name in HOST_OUTCOME_EVENTS:
                    result.host_events.setdefault(host, []).append(host_event)
                if on_event is not None:
                    on_event(host_event)
            return False  # never write job_events/*.json

        try:
            (private_dir / "project").mkdir(mode=0o700)
            (private_dir / "tmp").mkdir(mode=0o700)
            (private_dir / "ansible.cfg").write_text(_ANSIBLE_CFG)
            inventory_file = self._write_private_data(private_dir / "inventory.yml", inventory)
            if callable(extravars):
                extravars = extravars(private_dir)
            extravars_file = self._write_private_data(private_dir / "extravars.yml", extravars or {})
            envvars = self._envvars(private_dir)
            # Runner drops a `settings=` argument when env/settings is missing (it resets its settings to
            # {} on the failed file load), so the settings go by file: no secret in them.
            (private_dir / "env").mkdir(mode=0o700)
            self.write_private_json(private_dir / "env" / "settings", {
                "pexpect_timeout": CANCEL_POLL_S,
                "suppress_output_file": True,
                "suppress_ansible_output": True,
                "job_timeout": int(timeout_s) if timeout_s else 0,
                "idle_timeout": 0,
            })
            if on_private_dir is not None:
                on_private_dir(private_dir)
            config = run_config(
                private_data_dir=str(private_dir),
                playbook=playbook,
                inventory=str(inventory_file),
                extravars=str(extravars_file),
                limit=limit,
                skip_tags=skip_tags,
                envvars=envvars,
                forks=self.forks,
                quiet=True,
                suppress_env_files=True,
                fact_cache_type="memory",
            )
            config.prepare()
            if config.pexpect_timeout != CANCEL_POLL_S:  # the settings file was not read
                raise RuntimeError("ansible-runner ignored hwledger's settings (env/settings)")
            runner = ansible_runner.Runner(config, event_handler=handle,
                                           cancel_callback=lambda: self._cancelled(cancel, private_dir))
            status, rc = runner.run()
            result.status, result.rc = status, rc
        except Exception as exc:  # runner or ansible start-up failure: report, never raise into the server
            result.status, result.error = "error", f"{type(exc).__name__}: {exc}"
        finally:
            # Whatever ended the run (cancel, runner's timeout, an exception), nothing of it may stay.
            terminate_processes_using(private_dir)
            result.duration_s = time.monotonic() - started
            result.output_tail = "\n".join(tail)
            self.remove_private_dir(private_dir)
        return result

    @staticmethod
    def _cancelled(cancel: Callable[[], bool] | None, private_dir: Path) -> bool:
        """Runner's cancel callback. On cancel, stop every process of the run ourselves first.

        Runner's own stop is SIGKILL to ansible-playbook's process group, but ansible-core (2.19) puts
        each worker process in a session of its own (setsid), so those workers and their ssh clients
        would survive, orphaned. Every process of the run names the private dir on its command line
        (workers are forks of ansible-playbook), and each ssh client is in its worker's group.
        """
        if cancel is None or not cancel():
            return False
        terminate_processes_using(private_dir)
        return True

    @staticmethod
    def write_private_json(path: Path, data: Any) -> Path:
        """``data`` as JSON in a 0600 file (``private_files.write_atomically``: never through a symlink)."""
        private_files.write_atomically(path, json.dumps(data).encode("utf-8"))
        return path

    @staticmethod
    def _write_private_data(path: Path, data: Any) -> Path:
        """Inventory or extra vars as YAML with every string value tagged `!unsafe`.

        Why: Ansible templates the values of an inventory or extra-vars file it loads (JSON included):
        a `{{ lookup('pipe', ...) }}` in an agent's gpu_query_cmd would run on the controller. Tagged
        unsafe, every value is data for Ansible, as the ssh_agents inventory plugin makes it too.
        """
        text = yaml.serialize(_unsafe_node(data), Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), allow_unicode=False, width=1 << 20)
        private_files.write_atomically(path, text.encode("utf-8"))
        return path

    def remove_private_dir(self, private_dir: Path) -> None:
        shutil.rmtree(private_dir, ignore_errors=True)
        with self._lock:
            self._active.discard(private_dir)

    def sweep(self, keep: Iterable[str | os.PathLike] = ()) -> list[Path]:
        """Remove private dirs left by a crashed process (every run dir not in use here or in `keep`)."""
        keep_set = {Path(p).resolve() for p in keep}
        with self._lock:
            active = {p.resolve() for p in self._active}
        removed = []
        for entry in self.runs_dir.iterdir():
            if not entry.name.startswith(RUN_DIR_PREFIX) or entry.is_symlink():
                continue
            resolved = entry.resolve()
            if resolved in active or resolved in keep_set:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        return removed


def _unsafe_node(data: Any) -> yaml.Node:
    """A YAML node tree for `data`: mapping keys plain, every string value `!unsafe` (double-quoted)."""
    if isinstance(data, Mapping):
        return yaml.MappingNode("tag:yaml.org,2002:map", [
            (yaml.ScalarNode("tag:yaml.org,2002:str", str(key), style='"'), _unsafe_node(value))
            for key, value in data.items()])
    if isinstance(data, (list, tuple)):
        return yaml.SequenceNode("tag:yaml.org,2002:seq", [_unsafe_node(item) for item in data])
    if isinstance(data, bool):
        return yaml.ScalarNode("tag:yaml.org,2002:bool", "true" if data else "false")
    if data is None:
        return yaml.ScalarNode("tag:yaml.org,2002:null", "null")
    if isinstance(data, int):
        return yaml.ScalarNode("tag:yaml.org,2002:int", str(data))
    if isinstance(data, float):
        return yaml.ScalarNode("tag:yaml.org,2002:float", repr(data))
    return yaml.ScalarNode("!unsafe", str(data), style='"')


def terminate_processes_using(path: str | os.PathLike, *, grace_s: float = 0.5) -> None:
    """SIGTERM, then SIGKILL after `grace_s`, the process group of every process naming `path`.

    Never our own group. A process group is what ansible's workers and their ssh clients share.
    """
    own = os.getpgrp()
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while True:
        groups = set()
        for pid in processes_using(path):
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
        groups.discard(own)
        if not groups:
            return
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        if sig == signal.SIGKILL and time.monotonic() > deadline + 2.0:
            return  # unkillable (D state): give up rather than hang the caller
        time.sleep(0.05)
        if time.monotonic() > deadline:
            sig = signal.SIGKILL


def processes_using(path: str | os.PathLike) -> list[int]:
    """Pids whose command line mentions `path` (a run's private dir: unique, so no name matching).

    Used after a crash to find the old server's orphaned ansible-playbook for a job.
    """
    return list(processes.mentioning(path))


def allowlisted_env(config_env: Mapping[str, str], envvars: Mapping[str, str]) -> dict[str, str]:
    """Drop every variable the run inherited from us that is not allowlisted.

    Runner seeds the run's env from os.environ and then adds its own settings; we keep runner's
    additions (they differ from os.environ) and our envvars, and drop the rest.
    """
    inherited = os.environ
    kept = {}
    for key, value in config_env.items():
        if key in envvars or key in ENV_ALLOWLIST:
            kept[key] = value
        elif key in inherited and inherited[key] == value:
            continue  # inherited, not allowlisted: drop
        else:
            kept[key] = value  # set by runner itself (callback plugin dir, stdout callback, ...)
    return kept


@functools.lru_cache(maxsize=None)
def _run_config_class() -> type:
    """``RunnerConfig`` with the run's environment cut to the allowlist (see the module's notes).

    Built on first use: importing ansible_runner costs ~0.2 s, which CLI commands that never run Ansible
    should not pay. ansible-runner documents RunnerConfig as meant to be overridden, and ``prepare()`` as
    calling ``prepare_env``, which fills ``env``; the override trims what it filled.
    """
    from ansible_runner.config.runner import RunnerConfig  # pylint: disable=import-outside-toplevel

    class RunConfig(RunnerConfig):
        def prepare_env(self):  # pylint: disable=arguments-differ
            super().prepare_env()
            self.env = allowlisted_env(self.env, self.envvars or {})

    return RunConfig
