#!/usr/bin/env bash
# ansible-test must run from inside .../ansible_collections/<namespace>/<name>/: copy the collection's
# files (what git would ship, no venv) into such a tree and run the sanity tests there, without docker.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dest="$work/ansible_collections/hwledger/fleet"
mkdir -p "$dest"
git ls-files -co --exclude-standard -z \
  | grep -zv -e '^collections/' -e '^\.venv' \
  | xargs -0 cp --parents -t "$dest"
# ansible-test fetches a pip bootstrap script from a host outside our reach; use the offline one.
pip_version=$(python -c 'from ansible_test._internal.python_requirements import PIP_VERSION as v; print(v)' 2>/dev/null || echo 24.2)
cache="$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py"
mkdir -p "$(dirname "$cache")"
cp scripts/get_pip_offline.py "$cache"
cd "$dest"
git init -q . && git add -A >/dev/null   # ansible-test lists a collection's files through git
python_version=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
ansible-test sanity --venv --python "$python_version" --color no "$@"
