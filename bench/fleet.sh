#!/usr/bin/env bash
# Fleet report intake: what the control plane spends taking PROXIES sidecars' reports (every
# 2 s each, ROUNDS intervals of simulated time) into its fleet view. See bench/README.md.
#   PROXIES=5000 ROUNDS=3 bash bench/fleet.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PROXIES=${PROXIES:-5000}
ROUNDS=${ROUNDS:-3}
PROFILE=${PROFILE:-quick-release}
cargo build --profile "$PROFILE" -p trellis-control --example fleet_reports
echo "== $(date -u +%FT%TZ) $(nproc) cores; PROXIES=$PROXIES ROUNDS=$ROUNDS PROFILE=$PROFILE commit $(git rev-parse --short HEAD)"
"target/$PROFILE/examples/fleet_reports" "$PROXIES" "$ROUNDS"
