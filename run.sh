#!/usr/bin/env bash
# xbt's entry point on a fresh machine. It sets itself up, idempotently, then runs:
#   ./run.sh demo   [options]   the offline end-to-end upgrade demo (the main job)
#   ./run.sh test   [pytest args] the whole test suite, slow end-to-end tests included (what CI runs)
#   ./run.sh xbt    [args]      any xbt command inside the project's environment
#   ./run.sh setup              set-up only
#
# Caches live outside the checkout, under XBT_HOME (default ~/.cache/xbt):
#   $XBT_HOME/venvs/<hash>   the Python environment, keyed by the dependency files' hash
#   $XBT_HOME/assets         reassembled model towers
#   $XBT_HOME/features, testbed, ...  generated data, cached by content
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export XBT_HOME="${XBT_HOME:-$HOME/.cache/xbt}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
python_bin="${XBT_PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3

log() { printf '\033[1;34m[xbt setup]\033[0m %s\n' "$*" >&2; }

setup_debian_data() {
  # Image-caption data ships as Debian packages (GPL-2 / public domain): installed, never committed.
  local need=()
  [ -d /usr/share/tuxpaint/stamps ] || need+=(tuxpaint-stamps-default)
  [ -d /usr/share/openclipart/svg ] || need+=(openclipart-svg)
  [ -f /usr/share/dict/american-english ] || need+=(wamerican)  # English word list: cleaning clip-art titles
  [ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need+=(fonts-noto-color-emoji)  # the second evaluation domain (domain:emoji)
  [ -f /usr/share/unicode/emoji/emoji-test.txt ] || need+=(unicode-data)  # the emoji's names: domain:emoji's captions
  # cairosvg needs the cairo C library.
  ldconfig -p 2>/dev/null | grep -q 'libcairo.so.2' || need+=(libcairo2)
  # The browser test of the service's page and the report (tests/test_serve_browser.py): headless Chromium.
  [ -x /usr/bin/chromium ] || need+=(chromium)
  [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian packages: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    log "missing Debian packages: ${need[*]}. Install them with: sudo apt-get install ${need[*]}"
    log "(the unit tests run without them; the testbed and the demo need the data, the browser test chromium)"
  fi
}

setup_venv() {
  local hash
  # Keyed on the pinned dependency files only: the package itself runs from the checkout (PYTHONPATH), so
  # editing pyproject.toml (contracts, metadata) does not rebuild the environment.
  hash=$(cat "$repo/requirements.lock" "$repo/requirements-nodeps.txt" | sha256sum | cut -c1-16)
  venv="$XBT_HOME/venvs/$hash"
  mkdir -p "$XBT_HOME/venvs"
  # One set-up at a time: a second run waits for the first instead of racing it.
  exec 9>"$XBT_HOME/venvs/.$hash.lock"
  flock 9
  if [ ! -f "$venv/.complete" ]; then
    log "creating the Python environment in $venv (first run only: a few minutes)"
    rm -rf "$venv"
    mkdir -p "$XBT_HOME/venvs"
    "$python_bin" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip setuptools wheel 2>&1 | grep -v '^WARNING: Location' || true
    "$venv/bin/pip" install -q -r "$repo/requirements.lock" 2>&1 | grep -v '^WARNING: Location' || true
    "$venv/bin/pip" install -q --no-deps -r "$repo/requirements-nodeps.txt" 2>&1 | grep -v '^WARNING: Location' || true
    "$venv/bin/python" -c "import torch, open_clip, transformers, peft, faiss, sentence_transformers" \
      || { log "the environment failed to install; see the messages above"; exit 1; }
    touch "$venv/.complete"
  fi
  flock -u 9
  # The package itself is used from this checkout (the venv may be shared by several checkouts).
  export PATH="$venv/bin:$PATH"
  export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
}

setup_assets() {
  python -m xbt.cli assets install --quiet
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup)
    setup_debian_data; setup_venv; setup_assets ;;
  demo)
    setup_debian_data; setup_venv; setup_assets
    cd "$repo"  # the demo writes outputs/demo here
    exec python -m xbt.cli demo "$@" ;;
  test)
    setup_debian_data; setup_venv; setup_assets
    cd "$repo"
    exec python -m pytest -m "slow or not slow" "$@" ;;
  xbt)
    setup_venv
    exec python -m xbt.cli "$@" ;;
  *)
    echo "usage: ./run.sh {demo|test|xbt|setup} [args]" >&2; exit 2 ;;
esac
