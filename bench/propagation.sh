#!/usr/bin/env bash
# Config propagation: N simulated proxies (real protocol, one HTTP/2 connection each) on one
# `trellis control`; R route changes applied through the config API; time until every proxy
# has ACKed, and control-plane RSS per connected proxy. See bench/README.md.
# Runs twice, plaintext (--insecure) and over mutual TLS as in production, so the two
# reports give the control channel's TLS cost (CHANNELS="insecure tls" by default).
#   PROXIES=1000 ROUNDS=20 bash bench/propagation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PROXIES=${PROXIES:-1000}
ROUNDS=${ROUNDS:-20}
PROFILE=${PROFILE:-quick-release}
CHANNELS=${CHANNELS:-"insecure tls"}
# Each simulated proxy holds one socket in this process and one in the control plane.
ulimit -n "$(( PROXIES * 2 + 1024 ))" 2>/dev/null || true
# `--example` alone would select only the example: build the binary separately.
# dist: the static, laid-out binary releases ship (scripts/build-dist), at target/dist/trellis.
if [[ $PROFILE == dist ]]; then scripts/build-dist; else cargo build --profile "$PROFILE" -p trellis-cli; fi
cargo build --profile "$PROFILE" -p trellis-control --example propagation
for channel in $CHANNELS; do
    echo "== $(date -u +%FT%TZ) $(nproc) cores; PROXIES=$PROXIES ROUNDS=$ROUNDS PROFILE=$PROFILE channel=$channel"
    "target/$PROFILE/examples/propagation" "target/$PROFILE/trellis" "$PROXIES" "$ROUNDS" "$channel"
done
