#!/usr/bin/env bash
# Start a local Ray head (dashboard/job server on 127.0.0.1:8265) if none runs, then submit
# jobs/distill.py to it the way a cluster user would. Extra arguments go to jobs/distill.py.
#   scripts/ray_local.sh                      # embedded default
#   scripts/ray_local.sh --config sd15 --dry-run
#   RAY_STOP=1 scripts/ray_local.sh           # stop the head afterwards (if this script started it)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# The job's `python` is resolved on the head's PATH: put the project venv first.
export PATH="$root/.venv/bin:$PATH"
ray_bin="ray"
address="http://127.0.0.1:8265"
started_here=0
# Any HTTP answer (even 401 under token auth) means a job server is up.
if [[ "$(curl -s -o /dev/null -w '%{http_code}' "$address/api/version" || true)" == "000" ]]; then
  started_here=1
  "$ray_bin" start --head --num-cpus "${RAY_NUM_CPUS:-2}" --dashboard-host 127.0.0.1 --dashboard-port 8265 \
    --disable-usage-stats
fi
# The job's working directory is a temporary copy: results go to $WADI_HOME (default ~/wadi).
# `ray start` turns on token auth (~/.ray/auth_token); the CLI only sends the token in token mode.
RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}" "$ray_bin" job submit --address "$address" --working-dir . \
  --runtime-env-json "{\"env_vars\": {\"WADI_HOME\": \"${WADI_HOME:-$HOME/wadi}\", \"OMP_NUM_THREADS\": \"1\"}}" \
  -- python jobs/distill.py "$@"
# `ray stop` ends every Ray process on this machine: only on request, and only for a head started here.
if [[ "${RAY_STOP:-0}" == "1" && "$started_here" == "1" ]]; then
  "$ray_bin" stop
fi
