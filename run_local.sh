#!/usr/bin/env bash
# The README's commands. Sets up .venv (reused while requirements.txt and setup.py are
# unchanged), then:
#   ./run_local.sh                 end-to-end demo on a local S3 server and sample images
#   ./run_local.sh --runner=R …    the demo on another runner (any Beam options follow);
#                                  FlinkRunner and SparkRunner start a local cluster
#   ./run_local.sh test [ARGS]     the test suite (pytest ARGS)
#   ./run_local.sh JOB [ARGS]      a job on your own data: convert, upload, analyze, inspect
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
STAMP="$VENV/.requirements.sha256"

setup_venv() {
  local want
  want=$(cat requirements.txt setup.py | sha256sum | cut -d' ' -f1)
  if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    return
  fi
  echo "run_local.sh: installing dependencies into $VENV (first run takes a few minutes)" >&2
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  local log="$VENV/install.log"
  if ! { "$VENV/bin/python" -m pip install --upgrade pip wheel setuptools &&
         "$VENV/bin/python" -m pip install -r requirements.txt &&
         "$VENV/bin/python" -m pip install --no-deps --no-build-isolation -e .; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "run_local.sh: installing dependencies failed (full log: $log)" >&2
    exit 1
  fi
  echo "$want" >"$STAMP"
}

# The inspect report's render test needs a headless browser: Debian's chromium, installed
# when we may (root with apt-get); otherwise that test skips and says why.
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return
  [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1 || return 0
  echo "run_local.sh: installing chromium for the report render test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
    >/dev/null 2>&1 || echo "run_local.sh: chromium not installed; its test will skip" >&2
}

setup_venv
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# TensorFlow's chatter (start-up lines, "failed call to cuInit" without a GPU) hides the
# tools' own output.
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}

cmd=${1:-demo}
[[ $# -gt 0 ]] && shift
case "$cmd" in
  demo) exec "$VENV/bin/python" -m devtools.demo "$@" ;;
  test) ensure_chromium; exec "$VENV/bin/python" -m pytest tests "$@" ;;
  convert|upload|analyze|inspect) exec "$VENV/bin/python" -m "beam_jobs.$cmd" "$@" ;;
  -h|--help|help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' ;;
  --runner=FlinkRunner|--runner=SparkRunner)
    exec "$VENV/bin/python" -m engines "$cmd" "$@" ;;
  --*) exec "$VENV/bin/python" -m devtools.demo "$cmd" "$@" ;;
  *) echo "run_local.sh: unknown command '$cmd' (try: demo, test, convert, upload, analyze, inspect, help)" >&2; exit 2 ;;
esac
