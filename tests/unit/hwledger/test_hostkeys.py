"""Client key checks, host key fingerprints and hwledger's known_hosts edits (no network)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from hwledger import hostkeys
from hwledger.errors import UserError

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (openssh-client) is missing")


def _keygen(path, passphrase: str = "") -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "t", "-f", str(path)], check=True)


def _keygen_fingerprint(path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(path)], check=True, capture_output=True, text=True).stdout
    return out.split()[1]


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "id_ed25519"
    _keygen(path)
    return path


def test_a_good_key_gives_the_fingerprint_ssh_keygen_prints(key):
    checked = hostkeys.check_private_key(key)
    assert checked.fingerprint == _keygen_fingerprint(key)
    assert checked.keytype == "ssh-ed25519"
    assert checked.path == key


def test_a_missing_key_names_the_path(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        hostkeys.check_private_key(tmp_path / "nope")


def test_a_group_readable_key_is_refused_like_ssh_does(key):
    key.chmod(0o640)
    with pytest.raises(UserError, match="chmod 600"):
        hostkeys.check_private_key(key)


def test_a_public_key_is_not_a_private_key(key):
    pub = key.with_name("id_ed25519.pub")
    pub.chmod(0o600)
    with pytest.raises(UserError, match="public key"):
        hostkeys.check_private_key(pub)


def test_a_file_that_is_no_key_is_refused(tmp_path):
    junk = tmp_path / "junk"
    junk.write_text("hello\n")
    junk.chmod(0o600)
    with pytest.raises(UserError, match="not a private key"):
        hostkeys.check_private_key(junk)


def test_a_passphrase_key_without_an_agent_is_refused_with_advice(tmp_path, monkeypatch):
    path = tmp_path / "locked"
    _keygen(path, passphrase="correct horse")
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with pytest.raises(UserError, match="passphrase"):
        hostkeys.check_private_key(path)


def test_fingerprint_normalisation():
    fp = "SHA256:" + "a" * 43
    assert hostkeys.normalize_fingerprint(fp) == fp
    assert hostkeys.normalize_fingerprint("a" * 43) == fp
    with pytest.raises(UserError, match="MD5"):
        hostkeys.normalize_fingerprint("MD5:12:34:56:78:9a:bc:de:f0:12:34:56:78:9a:bc:de:f0")
    with pytest.raises(UserError, match="not a SHA256"):
        hostkeys.normalize_fingerprint("SHA256:short")


def test_pin_replaces_only_the_alias_lines_and_keeps_the_file_private(tmp_path, key):
    blob = key.with_name("id_ed25519.pub").read_text().split()[1]
    known = tmp_path / "cfg" / "known_hosts"
    known.parent.mkdir(mode=0o700)
    known.write_text("# mine\nother-host ssh-ed25519 AAAAOTHER\n")
    hostkeys.pin(known, "hwledger-agent-a", [hostkeys.HostKey("ssh-ed25519", "AAAAOLD")])
    hostkeys.pin(known, "hwledger-agent-a", [hostkeys.HostKey("ssh-ed25519", blob)])
    lines = known.read_text().splitlines()
    assert lines == ["# mine", "other-host ssh-ed25519 AAAAOTHER", f"hwledger-agent-a ssh-ed25519 {blob}"]
    assert stat.S_IMODE(os.stat(known).st_mode) == 0o600
    assert [k.fingerprint for k in hostkeys.pinned_keys(known, "hwledger-agent-a")] == [_keygen_fingerprint(key)]
    assert hostkeys.unpin(known, "hwledger-agent-a") is True
    assert hostkeys.unpin(known, "hwledger-agent-a") is False
    assert known.read_text().splitlines() == ["# mine", "other-host ssh-ed25519 AAAAOTHER"]
