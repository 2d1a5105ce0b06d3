#!/usr/bin/env bash
# Prepare a fresh Debian machine for `make demo` / `make test`: system packages (when root), then
# the project virtualenv with pinned requirements and this checkout installed into it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_pkgs=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need_pkgs+=(openssh-client)
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
command -v git >/dev/null 2>&1 || need_pkgs+=(git)   # scripts/sanity.sh lists the files through git
# venv needs ensurepip, which Debian ships separately (python3-venv); ansible-test's venvs need it too.
"$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
# For the tests of `hwledger fleet serve --http` (and the demo's screenshot): a real Prometheus scrapes it and
# promtool checks its output; a headless Chromium loads the status page. Installed when root; otherwise
# those tests skip with the reason (under CI=true they fail instead: CI runs as root, so it has them).
# Also wanted, not needed: without shellcheck, `make sanity` skips its shell test with a warning.
want_pkgs=()
command -v shellcheck >/dev/null 2>&1 || want_pkgs+=(shellcheck)
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || want_pkgs+=(prometheus)
command -v chromium >/dev/null 2>&1 || want_pkgs+=(chromium)
if [ "$(id -u)" = 0 ]; then
  install_pkgs=("${need_pkgs[@]}" "${want_pkgs[@]}")
  if [ ${#install_pkgs[@]} -gt 0 ]; then
    echo "bootstrap: installing ${install_pkgs[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${install_pkgs[@]}" >/dev/null
  fi
elif [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "bootstrap: missing system packages: ${need_pkgs[*]}" >&2
  echo "bootstrap: run 'sudo apt-get install ${need_pkgs[*]} ${want_pkgs[*]}' (or run make as root) and try again" >&2
  exit 1
elif [ ${#want_pkgs[@]} -gt 0 ]; then
  echo "bootstrap: not installed: ${want_pkgs[*]} (their tests will skip: shellcheck's in make sanity, prometheus's and chromium's for serve --http); 'sudo apt-get install ${want_pkgs[*]}'" >&2
fi
# Debian's openssh-server starts nothing inside containers; our tests start their own sshd,
# which needs the privilege-separation directory.
mkdir -p /run/sshd 2>/dev/null || true

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -U "pip>=24"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements/test.txt
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
# Make the checkout importable as ansible_collections.hwledger.fleet for Python and for
# ansible-core's sys.path collection scan (runs started outside the checkout, e.g. ansible-runner).
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/collections" > "$site/hwledger_fleet_checkout.pth"

# --- ansible-core 2.18 toolchain ------------------------------------------------------------------
# meta/runtime.yml admits ansible-core 2.18 as well as 2.19, so the tests run the collection through
# 2.18 too (tests/integration/test_ansible_218.py). It lives in its own virtualenv, reinstalled only
# when requirements/ansible-2.18.txt changes (a few seconds from the package index). Under CI=true a
# missing .venv-2.18 fails those tests instead of skipping them.
VENV_218=${VENV_218:-.venv-2.18}
if [ ! -x "$VENV_218/bin/python" ]; then
  "$PYTHON" -m venv "$VENV_218"
fi
if ! cmp -s requirements/ansible-2.18.txt "$VENV_218/.requirements-installed"; then
  "$VENV_218/bin/python" -m pip install -q --disable-pip-version-check -r requirements/ansible-2.18.txt
  cp requirements/ansible-2.18.txt "$VENV_218/.requirements-installed"
fi
# The same checkout link as the main venv: ansible_collections.hwledger.fleet imports and is scanned.
site_218=$("$VENV_218/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/collections" > "$site_218/hwledger_fleet_checkout.pth"
