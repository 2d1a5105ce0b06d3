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
cd "$dest"
git init -q . && git add -A >/dev/null   # ansible-test lists a collection's files through git
python_version=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
ansible-test sanity --venv --python "$python_version" --color no "$@"
