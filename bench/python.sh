#!/usr/bin/env bash
# Print the path of the project's Python: the environment ./run.sh builds, found the way run.sh finds it
# ($XBT_HOME/venvs/<first 16 hex of sha256(requirements.lock + requirements-nodeps.txt)>, run.sh's setup_venv).
# If it is not built yet, build it first with `./run.sh setup` (its messages go to stderr).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
home="${XBT_HOME:-$HOME/.cache/xbt}"
hash=$(cat "$repo/requirements.lock" "$repo/requirements-nodeps.txt" | sha256sum | cut -c1-16)
venv="$home/venvs/$hash"
if [ ! -f "$venv/.complete" ]; then
  echo "bench: the project's environment ($venv) is not built; running ./run.sh setup" >&2
  "$repo/run.sh" setup >&2
fi
echo "$venv/bin/python"
