# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
name: ssh_agents
short_description: GPU hosts from an hwledger C(ssh-agents.toml), with bastions and pinned host keys
version_added: 0.1.0
author:
  - hwledger-fleet developers (!UNKNOWN)
description:
  - Reads the agents of an hwledger C(ssh-agents.toml) file and makes each one an inventory host whose
    connection variables reach it over plain SSH, through its bastion where it has one.
  - "The source is either a YAML configuration file whose name ends in V(hwledger.yml) or V(hwledger.yaml)
    (for example C(fleet.hwledger.yml)) containing O(plugin=hwledger.fleet.ssh_agents) and O(agents_file),
    or the C(.toml) file itself."
  - The YAML configuration is the recommended source. It works through the C(auto) plugin in plain Ansible
    and in AWX. A C(.toml) file given to C(-i) is only read by this plugin when it is enabled before core's
    C(toml) plugin in C([inventory] enable_plugins), as in this collection's C(ansible.cfg); otherwise core's
    C(toml) plugin claims the file and returns an empty inventory without an error.
  - Every agent is added to the group C(hwledger_agents); agents whose C(gpu_query_cmd) runs
    C(nvidia-smi) are added to C(hwledger_nvidia), those running C(rocm-smi) or C(amd-smi) to
    C(hwledger_rocm), and those with a bastion to C(hwledger_via_bastion).
  - "Each host gets C(ansible_connection=ssh), C(ansible_host), C(ansible_port), C(ansible_user),
    C(ansible_ssh_private_key_file), C(ansible_ssh_common_args), C(ansible_ssh_host_key_checking=true) (unless
    O(host_key_checking=off)), C(hwledger_gpu_query_cmd) and C(hwledger_agent) (the agent's configuration as a
    dictionary: C(name), C(hostname), C(ssh_user), C(ssh_key_path), C(ssh_port), C(gpu_query_cmd),
    C(host_key_fingerprint) and C(bastion))."
  - "C(ansible_ssh_common_args) starts with C(-F none): no ssh_config applies to these hosts, neither
    C(~/.ssh/config) nor C(/etc/ssh/ssh_config), so a connection is made from the agents file alone, the same
    in a terminal, under AWX or in a service, and a C(Host *) or C(Match exec) block cannot add a
    C(ProxyCommand), C(RemoteCommand) or C(LocalCommand) to it. Put what a host needs in the agents file.
    It then carries the host key policy (O(host_key_checking) against O(known_hosts_file),
    with C(HostKeyAlias=hwledger-agent-<name>) so a recycled address cannot match an old key),
    C(BatchMode=yes), C(IdentitiesOnly=yes), C(ForwardAgent=no), C(ForwardX11=no), C(ConnectTimeout),
    C(ServerAliveInterval), connection reuse (C(ControlMaster=auto), C(ControlPersist),
    C(ControlPath=<control_dir>/%C)) and, for an agent with a bastion, a C(ProxyCommand) that runs C(ssh) with
    the bastion's own key, user and port, the same host key policy (alias C(hwledger-bastion-<host>-<port>)),
    and C(-W [%h]:%p). Every word of the C(ProxyCommand) is shell-quoted."
  - "The C(ssh-agents.toml) schema: each C([[agents]]) table has C(name) (unique, letters, digits, C(.), C(_),
    C(-)), C(hostname) (a DNS name or an IPv4 or IPv6 address, without brackets), C(ssh_user),
    C(ssh_key_path) (absolute or starting with C(~/)), optional C(ssh_port) (an integer, default V(22)),
    optional C(gpu_query_cmd) (default
    V(nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader)), optional
    C(host_key_fingerprint) (V(SHA256:...)), optional C(query_timeout_s) (seconds, at most V(3600)) and
    C(min_query_interval_s) (seconds, default V(0)) for C(hwledger fleet serve), and an optional
    C([agents.bastion]) table with C(hostname),
    C(ssh_user), C(ssh_key_path) and optional C(ssh_port)."
  - "Every value is checked: unknown keys (the nearest valid key is suggested), password-like keys
    (authentication is by key only), wrong types, ports outside 1-65535 or written as strings, duplicate
    names, and hostnames, users and key paths containing characters that could be interpreted by ssh or by
    the C(ProxyCommand) shell (spaces, quotes, C(;), C($), backticks, newlines, a leading C(-)) are errors
    naming the file, line, agent, field and the fix. Key paths with spaces are therefore refused; link the key
    to a path without them. A missing key file is a warning."
  - The agents file must not be group- or world-writable and must belong to you or root, as OpenSSH requires
    of C(~/.ssh/config); whoever can edit it can run commands on this machine through a bastion C(ProxyCommand).
notes:
  - "Host key checking is enforced per host, whatever Ansible's global setting: when Ansible's
    C(host_key_checking) is false (ansible-runner, and so AWX, sets E(ANSIBLE_HOST_KEY_CHECKING=False) by
    default), the C(ssh) connection plugin puts C(-o StrictHostKeyChecking=no) before
    C(ansible_ssh_common_args), and ssh uses the first value it is given for an option. The host variable
    C(ansible_ssh_host_key_checking=true) takes precedence over the environment and C(ansible.cfg), so that
    option is never added; C(ansible_connection=ssh) keeps the hosts off C(paramiko), which would ignore
    C(ansible_ssh_common_args). Do not override either variable for these hosts."
  - Options in C(ssh_args) (C([ssh_connection]) section) come before C(ansible_ssh_common_args) and so win
    over the ones this plugin sets; Ansible's default C(ssh_args) sets C(ControlPersist=60s), which then
    applies instead of 300s.
    Ansible's C(timeout) setting likewise wins over O(connect_timeout) for Ansible connections.
  - Values from the agents file are untrusted data. Strings are marked unsafe, so a value containing
    C({{ }}) or C({% %}) is never rendered as a template, on ansible-core 2.18 and 2.19.
  - The plugin creates O(control_dir) (mode 0700) when it is missing, and refuses one that other users can
    write to.
  - "O(host_key_checking=off) turns host key verification off entirely: anyone who can intercept the
    connection can impersonate a GPU host and receive its commands and job files. Use it only for throwaway
    test machines."
  - In AWX, add the C(*.hwledger.yml) file of a project as an inventory source ("Sourced from a Project";
    type its path, AWX does not suggest YAML plugin configurations), and install this collection through the
    project's C(collections/requirements.yml).
extends_documentation_fragment:
  - ansible.builtin.constructed
  - ansible.builtin.inventory_cache
options:
  plugin:
    description: The name of this plugin; it makes a YAML file a configuration for it.
    required: true
    type: str
    choices:
      - hwledger.fleet.ssh_agents
  agents_file:
    description:
      - The C(ssh-agents.toml) file to read.
      - A relative path is taken from the directory of the YAML configuration file, so it works the same from
        any working directory and in AWX.
      - Ignored when the source given to Ansible is the C(.toml) file itself.
      - When not set, E(HWLEDGER_CONFIG), else C($XDG_CONFIG_HOME/hwledger/ssh-agents.toml)
        (C(~/.config/hwledger/ssh-agents.toml)), the file C(hwledger fleet) commands use.
    type: str
    env:
      - name: HWLEDGER_CONFIG
  host_key_checking:
    description:
      - How SSH checks host keys, for each agent and its bastion, against O(known_hosts_file).
      - V(yes) accepts only keys already in O(known_hosts_file) (pinned by C(hwledger fleet register-ssh));
        a missing or changed key makes the host unreachable.
      - V(accept-new) adds a missing key to O(known_hosts_file) the first time (trust on first use) and
        refuses a changed one.
      - V(off) checks nothing (C(StrictHostKeyChecking=no), C(UserKnownHostsFile=/dev/null)). Insecure.
      - Quote V('yes') and V('off') in YAML; unquoted, YAML reads them as booleans, which are refused.
    type: str
    default: "yes"
    choices:
      - "yes"
      - accept-new
      - "off"
    env:
      - name: HWLEDGER_HOST_KEY_CHECKING
  known_hosts_file:
    description:
      - hwledger's own known_hosts file, where host keys are pinned under C(hwledger-agent-<name>) and
        C(hwledger-bastion-<host>-<port>). The system and user known_hosts files are not used.
      - When not set, E(HWLEDGER_KNOWN_HOSTS), else C($XDG_CONFIG_HOME/hwledger/known_hosts)
        (C(~/.config/hwledger/known_hosts)), the file C(hwledger fleet register-ssh) pins keys in.
    type: str
    env:
      - name: HWLEDGER_KNOWN_HOSTS
  control_dir:
    description:
      - Directory for SSH connection-sharing sockets (C(ControlPath=<control_dir>/%C)); a connection to an agent
        is opened once and reused by later commands for C(ControlPersist) seconds.
      - It may be at most 49 bytes long on Linux (45 on macOS) so that socket paths fit the unix socket path
        limit whatever the hostname length.
      - When not set, the directory C(hwledger fleet serve) uses with the same environment, so that a playbook
        run by hand and the server share one master connection per host. That is C(cm) next to the store
        (E(HWLEDGER_DB), else C($XDG_DATA_HOME/hwledger/fleet.db), so by default C(~/.local/share/hwledger/cm)),
        or C(/tmp/hwledger-<uid>/<hash of the store's directory>) when that path is too long for a unix socket.
      - An empty string turns connection sharing off.
    type: str
    env:
      - name: HWLEDGER_CONTROL_DIR
  connect_timeout:
    description: Seconds SSH waits to connect to an agent or a bastion (C(ConnectTimeout)).
    type: int
    default: 10
    env:
      - name: HWLEDGER_CONNECT_TIMEOUT
"""

EXAMPLES = r"""
# fleet.hwledger.yml, next to ssh-agents.toml:
#   ansible-inventory -i fleet.hwledger.yml --graph
#   ansible all -i fleet.hwledger.yml -m ansible.builtin.raw -a 'echo ok'
---
plugin: hwledger.fleet.ssh_agents
agents_file: ssh-agents.toml

# Learn the keys of new hosts on first contact (trust on first use), keep refusing changed ones.
---
plugin: hwledger.fleet.ssh_agents
agents_file: /etc/hwledger/ssh-agents.toml
host_key_checking: accept-new
known_hosts_file: /etc/hwledger/known_hosts

# Groups by user and by bastion, a variable composed from the agent's configuration.
---
plugin: hwledger.fleet.ssh_agents
agents_file: ssh-agents.toml
keyed_groups:
  - key: hwledger_agent.ssh_user
    prefix: user
  - key: hwledger_agent.bastion.hostname | default('direct')
    prefix: via
compose:
  hwledger_uses_default_query: hwledger_gpu_query_cmd.startswith('nvidia-smi --query-gpu=index,name')
groups:
  rented: "'vast' in inventory_hostname"

# ssh-agents.toml (the file the configurations above point to):
#
#   [[agents]]
#   name = "vast-rental-1"
#   hostname = "123.45.67.89"
#   ssh_user = "root"
#   ssh_key_path = "~/.ssh/id_ed25519"
#   ssh_port = 22
#   gpu_query_cmd = "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader"
#
#   [[agents]]
#   name = "vpn-private-gpu"
#   hostname = "internal-gpu.local"
#   ssh_user = "ubuntu"
#   ssh_key_path = "~/.ssh/id_ed25519"
#
#   [agents.bastion]
#   hostname = "bastion.example.com"
#   ssh_user = "root"
#   ssh_key_path = "~/.ssh/bastion_key"
"""

import os

from ansible import constants as C
from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable
from ansible.utils.unsafe_proxy import wrap_var

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents, hostvars, locations, ssh
from ansible_collections.hwledger.fleet.plugins.plugin_utils.telemetry import command_warnings

CONFIG_SUFFIXES = ("hwledger.yml", "hwledger.yaml")
_VERIFY_READ_BYTES = 64 * 1024


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "hwledger.fleet.ssh_agents"

    def verify_file(self, path):
        if not super().verify_file(path):
            return False
        if path.endswith(CONFIG_SUFFIXES):
            return True
        if path.endswith(".toml"):
            return self._is_agents_toml(path)
        self.display.vvv(f"{self.NAME}: skipping {path}: the source must be a YAML file whose name ends in "
                         f"{' or '.join(CONFIG_SUFFIXES)}, or an ssh-agents.toml with [[agents]] tables")
        return False

    @staticmethod
    def _core_toml_plugin_enabled():
        enabled = getattr(C, "INVENTORY_ENABLED", None) or []
        return any(name in ("toml", "ansible.builtin.toml") for name in enabled)

    @staticmethod
    def _is_agents_toml(path):
        try:
            with open(path, "rb") as handle:
                head = handle.read(_VERIFY_READ_BYTES)
        except OSError:
            return False
        return agents.looks_like_agents_file(head.decode("utf-8", errors="replace"))

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        agents_file = self._configure(path)
        try:
            policy = self._ssh_policy()
            found, warnings = self._load_agents(agents_file, cache)
            ssh.prepare_control_dir(policy)
            warnings = warnings + ssh.check_known_hosts(policy)
        except ValueError as exc:  # AgentsFileError, SshPolicyError: messages written for the user
            if path.endswith(".toml") and self._core_toml_plugin_enabled():
                # The manager shows a plugin's error only when no later plugin parses the source, and
                # core's toml plugin "parses" any ssh-agents.toml into an empty inventory: say it here.
                self.display.error(f"{exc}\n(core's toml inventory plugin will now read {path} as an empty "
                                   "inventory; use a *.hwledger.yml source, or remove toml from [inventory] "
                                   "enable_plugins, so that this error stops the run)")
            raise AnsibleParserError(str(exc)) from None
        for warning in warnings:
            self.display.warning(warning)
        self._populate(found, policy)

    def _configure(self, path):
        """Set the options and return the agents file to read."""
        if path.endswith(".toml"):
            self.set_options(direct={"plugin": self.NAME, "agents_file": path}, var_options=self._vars)
            if self.get_option("cache"):
                self.load_cache_plugin()
            return path
        self._read_config_data(path)
        agents_file = str(locations.config_path(self.get_option("agents_file")))
        if not os.path.isabs(agents_file):
            agents_file = os.path.join(os.path.dirname(os.path.abspath(path)), agents_file)
        return agents_file

    def _ssh_policy(self):
        control_dir = self.get_option("control_dir")
        if control_dir is None:
            # The control dir the app chooses for the store it would use with this environment: a
            # playbook run by hand and `hwledger fleet serve` share one master connection per host.
            control_dir = ssh.control_dir_for(locations.data_dir(locations.db_path()))
        return ssh.SshPolicy(known_hosts=str(locations.known_hosts_path(self.get_option("known_hosts_file"))),
                             host_key_checking=self.get_option("host_key_checking"),
                             control_dir=control_dir or None,
                             connect_timeout=self.get_option("connect_timeout"))

    def _load_agents(self, agents_file, cache):
        """Agents and warnings; from the inventory cache while it holds this very file's contents."""
        info = agents.check_file_permissions(agents_file)  # checked even when the cache answers
        stamp = [info.st_mtime_ns, info.st_size, info.st_ino]
        cache_key = self.get_cache_key(agents_file)
        use_cache = self.get_option("cache")
        if use_cache and cache:
            cached = self._agents_from_cache(self._cache.get(cache_key), stamp, agents_file)
            if cached is not None:
                # Key files may have appeared or gone since the entry was written: check them now.
                return cached, agents.key_file_warnings(cached, agents_file)
        found, warnings = agents.load_agents_file(agents_file, command_check=command_warnings)
        if use_cache:
            self._cache[cache_key] = {"stamp": stamp,
                                      "agents": [agents.agent_to_dict(agent) for agent in found]}
        return found, warnings

    @staticmethod
    def _agents_from_cache(cached, stamp, agents_file):
        if not isinstance(cached, dict) or cached.get("stamp") != stamp:
            return None
        try:
            return [agents.agent_from_dict(data, agents_file) for data in cached["agents"]]
        except (KeyError, TypeError, ValueError):
            return None  # an old or damaged cache entry: read the file again

    def _populate(self, found, policy):
        for group in hostvars.GROUPS:
            self.inventory.add_group(group)
        strict = self.get_option("strict")
        for agent in found:
            host = self.inventory.add_host(agent.name, group=hostvars.GROUP_ALL)
            # Every value comes from a file that is data, not templates: wrap_var marks strings unsafe on
            # ansible-core 2.18; on 2.19 it leaves them untrusted (this plugin never applies trust).
            for key, value in hostvars.host_vars(agent, policy).items():
                self.inventory.set_variable(host, key, wrap_var(value))
            for group in hostvars.agent_groups(agent)[1:]:
                self.inventory.add_child(group, host)
            host_vars = self.inventory.get_host(host).get_vars()
            self._set_composite_vars(self.get_option("compose"), host_vars, host, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), host_vars, host, strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), host_vars, host, strict=strict)
