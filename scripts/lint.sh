#!/usr/bin/env bash
# ansible-lint, production profile, over the collection's playbooks and roles.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=()
[ -d playbooks ] && [ -n "$(ls -A playbooks 2>/dev/null)" ] && targets+=(playbooks)
[ -d roles ] && [ -n "$(ls -A roles 2>/dev/null)" ] && targets+=(roles)
if [ ${#targets[@]} -eq 0 ]; then
  echo "lint: no playbooks or roles yet"
  exit 0
fi
ansible-lint --profile production --offline "${targets[@]}"
