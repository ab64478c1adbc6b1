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

# Each set-up phase is printed with its wall time and handed to the demo (XBT_SETUP_TIMINGS, a JSON object
# that `xbt demo` copies into its summary.json beside its own phases' times).
setup_timings=""
phase_done() {  # phase_done NAME START (START: an earlier $EPOCHREALTIME)
  local s
  s=$(awk -v a="$2" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  log "$1: $s s"
  setup_timings="${setup_timings:+$setup_timings, }\"$1\": $s"
}

setup_debian_data() {
  # Image-caption data ships as Debian packages (GPL-2 / public domain): installed, never committed.
  # $1 = all: everything the test suite uses too (headless Chromium for the browser test); demo: the data only.
  local need=() t0=$EPOCHREALTIME
  [ -d /usr/share/tuxpaint/stamps ] || need+=(tuxpaint-stamps-default)
  [ -d /usr/share/openclipart/svg ] || need+=(openclipart-svg)
  [ -f /usr/share/dict/american-english ] || need+=(wamerican)  # English word list: cleaning clip-art titles
  [ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need+=(fonts-noto-color-emoji)  # the second evaluation domain (domain:emoji)
  [ -f /usr/share/unicode/emoji/emoji-test.txt ] || need+=(unicode-data)  # the emoji's names: domain:emoji's captions
  # cairosvg needs the cairo C library.
  ldconfig -p 2>/dev/null | grep -q 'libcairo.so.2' || need+=(libcairo2)
  if [ "${1:-all}" = all ]; then
    # The browser test of the service's page and the report (tests/test_serve_browser.py): headless Chromium.
    [ -x /usr/bin/chromium ] || need+=(chromium)
    [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
    # Kill tests that SIGKILL a process at its k-th system call (tests/test_gallery_create_kill.py).
    [ -x /usr/bin/strace ] || need+=(strace)
    # The testbed's distractor set (testbed:distractors, xbt.data.distractors: the large-gallery evaluation and its
    # test): icons and WordNet glosses. The main job does not use it, so the demo's set-up does not install them.
    [ -d /usr/share/icons/Papirus ] || need+=(papirus-icon-theme)
    [ -f /usr/share/wordnet/data.noun ] || need+=(wordnet-base)
  fi
  [ ${#need[@]} -eq 0 ] && return 0  # all there: no apt-get at all (not even update)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian packages: ${need[*]}"
    # Data only: no recommended packages (tuxpaint-stamps-default recommends the Tux Paint program itself).
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}")
    # Package lists already on the machine are tried first; apt-get update only when they are absent or the
    # install fails with them (stale lists name files the mirror no longer has).
    if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null || ! "${apt[@]}" >/dev/null 2>&1; then
      apt-get update -qq
      "${apt[@]}" >/dev/null
    fi
  else
    log "missing Debian packages: ${need[*]}. Install them with: sudo apt-get install ${need[*]}"
    log "(the unit tests run without them; the testbed and the demo need the data, the browser test chromium)"
  fi
  phase_done "Debian packages" "$t0"
}

pip_sources() {
  # pip's own configuration (pip.conf files and PIP_* variables, as `pip config list` shows them) as uv
  # arguments, so uv installs from the same places: index, extra indexes (file:// mirrors too), find-links
  # folders, constraints. A PIP_* variable beats a file; the install section beats global.
  "$venv/bin/python" -m pip config list 2>/dev/null | "$venv/bin/python" -c '
import ast, shlex, sys
rank = {"global": 0, "install": 1, ":env:": 2}
best = {}
for line in sys.stdin:
    key, sep, value = line.strip().partition("=")
    section, _, name = key.partition(".")
    if sep and section in rank and rank[section] >= best.get(name, (-1, ""))[0]:
        best[name] = (rank[section], ast.literal_eval(value))
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}
out = [arg for name, flag in flags.items() for item in best.get(name, (0, ""))[1].split() for arg in (flag, item)]
if best.get("no-index", (0, ""))[1].lower() in ("1", "true", "yes", "on"):
    out.append("--no-index")
print(shlex.join(out))'
}

UV_VERSION=0.13.9  # pinned: the installer is part of what makes the environment reproducible

install_with_uv() {
  # uv installs the same lock from the same sources several times faster than pip (parallel downloads and
  # unpacking). uv on PATH is used; otherwise the pinned release (a PyPI wheel) goes into the new venv.
  # Returns non-zero when uv cannot be had (offline, no wheel): the caller then uses pip.
  local uv sources
  uv=$(command -v uv || true)
  if [ -z "$uv" ]; then
    "$venv/bin/pip" install -q --disable-pip-version-check "uv==$UV_VERSION" >/dev/null 2>&1 || return 1
    uv="$venv/bin/uv"
  fi
  sources=$(pip_sources) || return 1
  eval "set -- $sources"
  # pip picks the best version over every index; uv's default stops at the first index that has a package.
  export UV_INDEX_STRATEGY=unsafe-best-match UV_CACHE_DIR="${UV_CACHE_DIR:-$XBT_HOME/uv-cache}"
  log "installing with uv $("$uv" --version | cut -d' ' -f2)"
  "$uv" pip install -q --python "$venv/bin/python" "$@" pip==26.3 setuptools==84.2.1 wheel==0.48.0 \
    && "$uv" pip install -q --python "$venv/bin/python" "$@" -r "$repo/requirements.lock" \
    && "$uv" pip install -q --python "$venv/bin/python" "$@" --no-deps -r "$repo/requirements-nodeps.txt"
}

install_with_pip() {
  "$venv/bin/pip" install -q pip==26.3 setuptools==84.2.1 wheel==0.48.0 2>&1 | grep -v '^WARNING: Location' || true
  "$venv/bin/pip" install -q -r "$repo/requirements.lock" 2>&1 | grep -v '^WARNING: Location' || true
  "$venv/bin/pip" install -q --no-deps -r "$repo/requirements-nodeps.txt" 2>&1 | grep -v '^WARNING: Location' || true
}

setup_venv() {
  local hash t0=$EPOCHREALTIME
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
    if [ "${XBT_INSTALLER:-uv}" = pip ] || ! install_with_uv; then
      [ "${XBT_INSTALLER:-uv}" = pip ] || log "uv is not available or failed: installing with pip (slower)"
      install_with_pip
    fi
    "$venv/bin/python" -c "import torch, open_clip, transformers, peft, faiss, sentence_transformers" \
      || { log "the environment failed to install; see the messages above"; exit 1; }
    touch "$venv/.complete"
    phase_done "Python environment" "$t0"
  fi
  if [ ! -f "$venv/.bytecode" ]; then
    # Every package's modules compiled once, here: uv does not compile at install, and where
    # PYTHONDONTWRITEBYTECODE is set Python never writes a .pyc, so each run would compile torch's and
    # transformers' sources again (about 19 s of a warm demo's 60 s on two cores). Errors are files no
    # Python 3 imports (old test fixtures in some wheels).
    t0=$EPOCHREALTIME
    "$venv/bin/python" -m compileall -q -j 0 "$venv/lib" >/dev/null 2>&1 || true
    touch "$venv/.bytecode"
    phase_done "bytecode" "$t0"
  fi
  flock -u 9
  # The package itself is used from this checkout (the venv may be shared by several checkouts).
  export PATH="$venv/bin:$PATH"
  export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
}

setup_all() {
  # The Debian packages (apt: network and dpkg) and the Python environment (uv: network and unzip) are
  # independent: they install side by side; a failure of either stops the set-up.
  local apt_pid apt_times
  apt_times=$(mktemp)
  ( setup_debian_data "${1:-all}"; printf '%s' "$setup_timings" >"$apt_times" ) & apt_pid=$!
  setup_venv
  wait "$apt_pid" || { rm -f "$apt_times"; log "installing the Debian packages failed; see the messages above"; exit 1; }
  [ -s "$apt_times" ] && setup_timings="$(cat "$apt_times")${setup_timings:+, $setup_timings}"
  rm -f "$apt_times"
  setup_assets "${2:-}"
  export XBT_SETUP_TIMINGS="{${setup_timings}}"
}

setup_assets() {
  # Reassembles the towers that ship as split wheels (once per environment). A demo or test run skips the
  # Python start-up when this environment's assets were installed and are still there; `./run.sh setup`
  # always checks them again.
  local stamp="$XBT_HOME/assets/.installed-${venv##*/}" t0=$EPOCHREALTIME
  if [ "${1:-}" != check ] && [ -f "$stamp" ] && [ -f "$XBT_HOME/assets/all-mpnet-base-v2/.complete" ]; then
    return 0
  fi
  python -m xbt.cli assets install --quiet
  mkdir -p "$XBT_HOME/assets" && touch "$stamp"
  phase_done "assets" "$t0"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup)
    setup_all all check ;;
  demo)
    setup_all demo
    cd "$repo"  # the demo writes outputs/demo here
    exec python -m xbt.cli demo "$@" ;;
  test)
    setup_all all
    cd "$repo"
    exec python -m pytest -m "slow or not slow" "$@" ;;
  xbt)
    setup_venv
    exec python -m xbt.cli "$@" ;;
  *)
    echo "usage: ./run.sh {demo|test|xbt|setup} [args]" >&2; exit 2 ;;
esac
