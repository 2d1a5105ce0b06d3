"""The fleet's files: where this hwledger keeps its agents file, pinned host keys, store and working
directories, and how it talks ssh to the agents. Shared by every command and by the server.

The file locations (flag, then environment, then XDG default) are resolved by the collection's
``locations``, the same code the inventory plugin uses, so the app and a hand-run playbook with the same
environment read the same files and share ssh master connections. Everything else the app writes lives
in the store's directory (the "data dir"):

| what | where |
| --- | --- |
| the store | `fleet.db` (and SQLite's `-wal`/`-shm`) |
| job results fetched by the job playbook | `results/<job_id>.json` (deleted once recorded in the store) |
| ansible-runner private dirs, one per run | `runs/run-*` (removed after each run) |
| ssh control sockets | `cm/` (`ssh.control_dir_for`) |
| the server lock | `serve.lock` |

The data dir is created 0700 when missing; an existing one is never chmod-ed, and refused when group
or others can write to it (another user could plant files or symlinks where hwledger writes). The
directories hwledger names itself (`results/`, `runs/`, `cm/`) are created 0700 and tightened back to 0700.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents, locations, private_files, ssh

from hwledger.agents_file import read_agents
from hwledger.errors import UserError
from hwledger.store import AgentRecord, Store

DATA_DIR_HINT = "point hwledger at a path it can create (e.g. the default ~/.local/share/hwledger)"


def private_dir(path: Path, what: str, *, tighten: bool) -> Path:
    """``private_files.ensure_private_dir`` with its problems as errors a user can act on."""
    try:
        private_files.ensure_private_dir(path, what, tighten=tighten)
    except private_files.PrivatePathError as exc:
        hint = f"; {DATA_DIR_HINT}" if str(exc).startswith("cannot create") else ""
        raise UserError(f"{exc}{hint}") from None
    return path


@dataclass
class Fleet:
    """Where this hwledger's files are and how it talks ssh; shared by the CLI and the server."""

    config: Path
    known_hosts: Path
    db: Path

    @classmethod
    def from_options(cls, *, config: str | None = None, known_hosts: str | None = None,
                     db: str | None = None) -> "Fleet":
        return cls(locations.config_path(config).absolute(), locations.known_hosts_path(known_hosts).absolute(),
                   locations.db_path(db).absolute())

    @property
    def data_dir(self) -> Path:
        return locations.data_dir(self.db)

    def check_data_dir(self) -> Path:
        """The store's directory, created 0700 or checked (never chmod-ed; see the module's notes)."""
        return private_dir(self.data_dir, "the store's directory", tighten=False)

    @property
    def results_dir(self) -> Path:
        """Where the job playbook drops `<job_id>.json`."""
        self.check_data_dir()  # before anything is made inside it
        return private_dir(self.data_dir / "results", "hwledger's directory", tighten=True)

    @property
    def runs_dir(self) -> Path:
        """Parent of the per-run ansible-runner private data dirs (each removed after its run)."""
        self.check_data_dir()
        return private_dir(self.data_dir / "runs", "hwledger's directory", tighten=True)

    @property
    def control_dir(self) -> Path:
        """The ssh control socket directory (the one chooser: ``ssh.control_dir_for``), not created here."""
        return Path(ssh.control_dir_for(self.data_dir))

    def policy(self) -> ssh.SshPolicy:
        """Strict host key checking against our known_hosts, masters in the control dir (created here)."""
        self.check_data_dir()
        try:
            policy = ssh.SshPolicy(known_hosts=str(self.known_hosts), host_key_checking="yes",
                                   control_dir=str(self.control_dir))
            ssh.prepare_control_dir(policy)
        except ValueError as exc:  # SshPolicyError: written for the user
            raise UserError(str(exc)) from None
        return policy

    def load_agents(self, *, missing_ok: bool = True) -> list[agents.Agent]:
        return read_agents(self.config, missing_ok=missing_ok)

    def open_store(self) -> Store:
        return Store.open(self.db)

    def existing_store(self) -> Store | None:
        """The store, or None when there is none yet. For the read-only commands (`fleet status`, `fleet
        list`, `job list`, `job show`): looking must not create an empty store, nor its directory, at a path
        that may be a typo or the wrong environment; they say that there is none instead."""
        if not self.db.exists() and not self.db.is_symlink():
            return None
        return self.open_store()

    def no_store_note(self) -> str:
        return (f"there is no store at {self.db} (nothing was registered or submitted with it yet); "
                "check HWLEDGER_DB / --db, or register a host with `hwledger fleet register-ssh`")


def agent_record(agent: agents.Agent, *, ip: str | None = None, key_fingerprint: str | None = None,
                 bastion_host_key_fingerprint: str | None = None) -> AgentRecord:
    """What the store keeps of a registered agent."""
    bastion = None
    if agent.bastion is not None:
        b = agent.bastion
        bastion = f"{b.ssh_user}@{b.hostname}:{b.ssh_port}"
    return AgentRecord(
        name=agent.name, hostname=agent.hostname, port=agent.ssh_port, ssh_user=agent.ssh_user,
        key_path=agent.ssh_key_path, ip=ip, key_fingerprint=key_fingerprint,
        host_key_fingerprint=agent.host_key_fingerprint, bastion=bastion,
        bastion_host_key_fingerprint=bastion_host_key_fingerprint,
    )
