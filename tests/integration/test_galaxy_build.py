"""The collection as Galaxy ships it: `ansible-galaxy collection build`, then the installed tarball used
by ansible-doc and ansible-playbook with nothing of the checkout in reach.

The tarball is built from a copy of the checkout into which the clutter a working checkout collects
(virtualenvs, pytest's cache, a wheel build's build/ and dist/, egg-info, the demo's state, the
changelog tool's cache, the coming lab/ package) has been planted under its real names. That way each
build_ignore rule is proven whether or not this checkout happens to hold that clutter today, and the
test never writes into the checkout.

The installed collection is then used from a directory outside the checkout (so the checkout's
ansible.cfg, which points at the checkout, does not apply), with ANSIBLE_COLLECTIONS_PATH naming only
the install directory and ANSIBLE_COLLECTIONS_SCAN_SYS_PATH=False: the project virtualenv has a .pth
file that puts the checkout's collections/ on sys.path, and ansible-core would otherwise find the
checkout there and the test would pass without the tarball. A control run with an empty collections
directory proves that the checkout is really out of reach.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# control_dir is a fixture: importing it makes it available to the tests of this module.
from tests.integration.gpu_query_support import control_dir  # noqa: F401 pylint: disable=unused-import
from tests.integration.checkout_support import copy_checkout
from tests.integration.gpu_query_support import make_inventory
from lab import SshHost
from tests.toolchains import Toolchain, toolchain

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TARBALL_NAME = "hwledger-fleet-0.1.0.tar.gz"

# sha256 of the Apache License 2.0 as the ASF publishes it (https://www.apache.org/licenses/LICENSE-2.0.txt,
# 202 lines, appendix included): LICENSE must be that text, unmodified.
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"

# Everything the tarball may hold at its top level: galaxy's two manifests, the collection and its docs,
# and tests/ for tests/sanity only. A new top-level entry of the checkout fails this test until it is
# either listed here (it is part of the collection) or in galaxy.yml's build_ignore.
SHIPPED_TOP_LEVEL = {
    "MANIFEST.json", "FILES.json", "LICENSE", "README.md",
    "changelogs", "docs", "examples", "meta", "playbooks", "plugins", "roles", "tests",
}
# Every file under these directories of the checkout ships (except what is listed in NOT_SHIPPED).
SHIPPED_DIRS = ("changelogs", "docs", "examples", "meta", "playbooks", "plugins", "roles", "tests/sanity")

# Paths that must not be in the tarball, by name. The ones that a fresh checkout does not have are
# planted into the copy the tarball is built from (PLANTED), so every rule is exercised.
NOT_SHIPPED = (
    ".venv", ".venv-2.18", ".ci", ".demo", ".pytest_cache", ".gitignore", "ansible.cfg",
    "bench", "build", "dist", "collections", "hwledger", "hwledger_fleet.egg-info", "lab",
    "pyproject.toml", "requirements", "Makefile", "scripts", "demo",
    "changelogs/.plugin-cache.yaml",
    "tests/unit", "tests/integration", "tests/fixtures", "tests/golden", "tests/output",
    "tests/conftest.py", "tests/toolchains.py", "tests/.pytest_cache",
)
PLANTED = {
    ".venv/pyvenv.cfg": "home = /usr/bin\n",
    ".venv-2.18/pyvenv.cfg": "home = /usr/bin\n",
    ".pytest_cache/v/cache/lastfailed": "{}\n",
    "tests/.pytest_cache/v/cache/lastfailed": "{}\n",
    ".demo/fleet.db": "",
    # What `pip wheel .` / `python -m build` leave behind: a second copy of the collection's plugins.
    "build/lib/ansible_collections/hwledger/fleet/plugins/modules/gpu_query.py": "# a stale build copy\n",
    "dist/hwledger_fleet-0.1.0-py3-none-any.whl": "",
    "hwledger_fleet.egg-info/PKG-INFO": "Name: hwledger-fleet\n",
    "changelogs/.plugin-cache.yaml": "objects: {}\n",
    "tests/output/junit/python3.11-units.xml": "",
    "plugins/modules/__pycache__/gpu_query.cpython-311.pyc": "",
}
# checkout_support.NOT_COPIED_TOP_LEVEL is not copied from the checkout; the copy gets PLANTED stand-ins instead.


@dataclass(frozen=True)
class Shipped:
    source: Path  # the copy of the checkout the tarball was built from
    tarball: Path
    members: frozenset[str]  # tar member names, directories without their trailing slash
    install_root: Path  # the -p directory of `ansible-galaxy collection install`
    home: Path  # ANSIBLE_HOME for every run (nothing from ~/.ansible)

    @property
    def installed(self) -> Path:
        return self.install_root / "ansible_collections" / "hwledger" / "fleet"


def copy_with_clutter(dest: Path) -> None:
    """A copy of the checkout with the clutter of PLANTED in it (where the checkout has none of its own)."""
    copy_checkout(dest)
    for relative, content in PLANTED.items():
        path = dest / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(content)


def isolated_env(core: Toolchain, collections_path: Path, home: Path, config: Path) -> dict[str, str]:
    """Only the install directory is a collection path: no sys.path scan (the venv's .pth file would
    offer the checkout), an empty config file of our own, and a private ANSIBLE_HOME."""
    return core.env({
        "ANSIBLE_COLLECTIONS_PATH": str(collections_path),
        "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False",
        "ANSIBLE_CONFIG": str(config),
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
    })


def run(core: Toolchain, program: str, *args: str, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([core.exe(program), *args], cwd=cwd, env=env or core.env(), capture_output=True,
                          text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def outside_checkout(path: Path) -> Path:
    resolved = path.resolve()
    assert resolved != REPO and REPO not in resolved.parents, f"{path} must be outside the checkout {REPO}"
    return path


@pytest.fixture(scope="module")
def core() -> Toolchain:
    return toolchain("2.19")


@pytest.fixture(scope="module")
def shipped(core: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Shipped:
    work = outside_checkout(tmp_path_factory.mktemp("galaxy"))
    source = work / "checkout" / "hwledger-fleet"
    copy_with_clutter(source)
    out = work / "out"
    out.mkdir()
    build = run(core, "ansible-galaxy", "collection", "build", "--output-path", str(out), cwd=source)
    assert build.returncode == 0, build.stdout + build.stderr
    tarball = out / TARBALL_NAME
    assert tarball.is_file(), (build.stdout, sorted(os.listdir(out)))
    with tarfile.open(tarball) as tar:
        members = frozenset(member.name.rstrip("/") for member in tar.getmembers())

    install_root, home = work / "installed", work / "home"
    home.mkdir()
    config = work / "ansible.cfg"
    config.write_text("")
    install = run(core, "ansible-galaxy", "collection", "install", str(tarball), "-p", str(install_root),
                  cwd=work, env=isolated_env(core, install_root, home, config))
    assert install.returncode == 0, install.stdout + install.stderr
    shipped = Shipped(source, tarball, members, install_root, home)
    # ansible-galaxy skips the install, exit 0, when it sees the collection elsewhere (the checkout).
    assert (shipped.installed / "MANIFEST.json").is_file(), install.stdout + install.stderr
    return shipped


# --- what is in the tarball ---------------------------------------------------------------------------

def test_tarball_holds_the_collection_its_docs_and_license(shipped):
    members = shipped.members
    for name in ("MANIFEST.json", "FILES.json", "LICENSE", "README.md", "meta/runtime.yml",
                 "plugins/modules/gpu_query.py", "plugins/action/gpu_query.py", "plugins/inventory/ssh_agents.py",
                 "plugins/plugin_utils/agents.py", "playbooks/heartbeat.yml", "playbooks/job.yml",
                 "roles/job/tasks/main.yml", "roles/job/meta/argument_specs.yml", "changelogs/changelog.yaml"):
        assert name in members, f"{name} is missing from {shipped.tarball.name}"

    # Every file of the collection's own directories ships, not only the ones named above.
    expected = {
        path.relative_to(shipped.source).as_posix()
        for top in SHIPPED_DIRS for path in (shipped.source / top).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    } - set(NOT_SHIPPED)
    assert expected - members == set()

    # The license is the standard Apache-2.0 text that galaxy.yml declares.
    with tarfile.open(shipped.tarball) as tar:
        license_text = tar.extractfile("LICENSE").read()
        manifest = json.load(tar.extractfile("MANIFEST.json"))
    assert hashlib.sha256(license_text).hexdigest() == APACHE_2_0_SHA256
    assert manifest["collection_info"]["license"] == ["Apache-2.0"]
    assert (manifest["collection_info"]["namespace"], manifest["collection_info"]["name"]) == ("hwledger", "fleet")


def test_tarball_holds_nothing_of_the_checkout_besides(shipped):
    members = shipped.members
    leaked = {name: sorted(member for member in members if member == name or member.startswith(name + "/"))
              for name in NOT_SHIPPED}
    assert {name: found[:3] for name, found in leaked.items() if found} == {}
    assert {member.split("/")[0] for member in members} - SHIPPED_TOP_LEVEL == set()
    # Of tests/, only the sanity ignore files (what `ansible-test sanity` reads from an installed
    # collection); see the comment on build_ignore in galaxy.yml.
    sanity = sorted(path.name for path in (shipped.source / "tests" / "sanity").glob("ignore-*.txt"))
    assert sanity, "the checkout has no tests/sanity/ignore-*.txt"
    assert sorted(member for member in members if member.startswith("tests")) == (
        ["tests", "tests/sanity"] + ["tests/sanity/" + name for name in sanity])


# --- the installed collection ---------------------------------------------------------------------------

def installed_env(core: Toolchain, shipped: Shipped, collections_path: Path | None = None) -> dict[str, str]:
    return isolated_env(core, collections_path or shipped.install_root, shipped.home,
                        shipped.home.parent / "ansible.cfg")


def ansible_doc_json(core: Toolchain, shipped: Shipped, cwd: Path, *args: str,
                     collections_path: Path | None = None) -> dict:
    proc = run(core, "ansible-doc", "--json", *args, cwd=cwd, env=installed_env(core, shipped, collections_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_installed_collection_is_the_one_ansible_uses(core, shipped, tmp_path):
    cwd = outside_checkout(tmp_path)
    installed = str(shipped.installed)

    listed = run(core, "ansible-galaxy", "collection", "list", "hwledger.fleet", "--format", "json", cwd=cwd,
                 env=installed_env(core, shipped))
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert json.loads(listed.stdout) == {str(shipped.install_root / "ansible_collections"):
                                         {"hwledger.fleet": {"version": "0.1.0"}}}

    module = ansible_doc_json(core, shipped, cwd, "hwledger.fleet.gpu_query")["hwledger.fleet.gpu_query"]["doc"]
    assert module["filename"] == installed + "/plugins/modules/gpu_query.py"
    assert {"cmd", "timeout", "backend", "host_metrics"} <= set(module["options"])

    inventory = ansible_doc_json(core, shipped, cwd, "-t", "inventory",
                                 "hwledger.fleet.ssh_agents")["hwledger.fleet.ssh_agents"]["doc"]
    assert inventory["filename"] == installed + "/plugins/inventory/ssh_agents.py"
    assert "agents_file" in inventory["options"]

    role = ansible_doc_json(core, shipped, cwd, "-t", "role", "hwledger.fleet.job")["hwledger.fleet.job"]
    assert role["path"] == installed
    assert "main" in role["entry_points"]

    # Control: with an empty collections directory the module is not found at all (ansible-doc still
    # exits 0 and prints {}), so the checkout on sys.path is out of reach and the answers above came from
    # the tarball.
    empty = tmp_path / "no-collections"
    empty.mkdir()
    assert ansible_doc_json(core, shipped, cwd, "hwledger.fleet.gpu_query", collections_path=empty) == {}


def summary_line(stdout: str, host: str) -> str:
    """The heartbeat's summary line for `host` (the msg of its debug task)."""
    found = [json.loads('"%s"' % match.group(1))
             for match in re.finditer(r'ok: \[%s\] => \{\s*"msg": "((?:[^"\\]|\\.)*)"' % re.escape(host), stdout)]
    found = [line for line in found if line.startswith(host + ": ")]
    assert len(found) == 1, stdout[-4000:]
    return found[0]


@pytest.mark.root
def test_installed_heartbeat_playbook_answers_for_a_lab_host(core, shipped, fresh_host: SshHost, tmp_path,
                                                             control_dir):
    cwd = outside_checkout(tmp_path)
    inventory = make_inventory(tmp_path, [fresh_host], control_dir=control_dir)
    cache = tmp_path / "facts"
    env = installed_env(core, shipped)
    env.update(ANSIBLE_CACHE_PLUGIN="jsonfile", ANSIBLE_CACHE_PLUGIN_CONNECTION=str(cache))

    # -vv prints the config file in use and the path of the playbook it loaded.
    play = run(core, "ansible-playbook", "-vv", "-i", inventory.name, "hwledger.fleet.heartbeat", cwd=cwd, env=env)
    assert play.returncode == 0, play.stdout[-4000:] + play.stderr[-2000:]
    assert "config file = %s\n" % env["ANSIBLE_CONFIG"] in play.stdout
    assert "1 plays in %s/playbooks/heartbeat.yml\n" % shipped.installed in play.stdout

    line = summary_line(play.stdout, fresh_host.name)
    assert line.startswith("%s: 2 GPU(s) (nvidia, " % fresh_host.name)
    assert "[0] NVIDIA GeForce RTX 4070 Laptop GPU: 7948 of 8188 MiB free" in line
    assert "[1] NVIDIA GeForce RTX 5070 Ti: 15799 of 16303 MiB free" in line

    # The facts came back and landed in the fact cache. ansible-core 2.19's jsonfile cache names the
    # file "<format prefix>_<host>" and stores {"__payload__": "<the facts as JSON>"}.
    files = [path for path in cache.iterdir() if path.name == fresh_host.name
             or path.name.endswith("_" + fresh_host.name)]
    assert len(files) == 1, sorted(os.listdir(cache))
    cached = json.loads(files[0].read_text())
    facts = json.loads(cached["__payload__"]) if "__payload__" in cached else cached
    snapshot = facts["hwledger_snapshot"]
    assert (snapshot["agent"], snapshot["backend"]) == (fresh_host.name, "nvidia")
    assert [gpu["name"] for gpu in snapshot["gpus"]] == ["NVIDIA GeForce RTX 4070 Laptop GPU",
                                                         "NVIDIA GeForce RTX 5070 Ti"]
