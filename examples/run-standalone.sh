#!/usr/bin/env bash
# Runs the standalone proxy from examples/proxy.yaml against three throwaway upstreams
# (Python's http.server on :9001-9003, each serving a file naming its version) and sends a
# few requests through it. Stops everything it started on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p trellis-cli
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
for port in 9001 9002 9003; do
  mkdir -p "$work/$port"
  version=v1; [ "$port" = 9003 ] && version=v2
  echo "catalog $version on :$port" > "$work/$port/index.html"
  python3 -m http.server "$port" --bind 127.0.0.1 --directory "$work/$port" >/dev/null 2>&1 &
  pids+=($!)
done
for port in 9001 9002 9003; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
done
# The example's inbound listener forwards to :8080; nothing listens there in this demo.
./target/release/trellis proxy --config examples/proxy.yaml &
pids+=($!)
for _ in $(seq 50); do curl -sf http://127.0.0.1:9990/ready >/dev/null && break; sleep 0.1; done
echo "== 20 requests to catalog through the outbound listener (90/10 split v1/v2):"
for _ in $(seq 20); do curl -s http://127.0.0.1:7001/; done | sort | uniq -c
echo "== the same service by name through HTTP proxy mode:"
curl -s -x http://127.0.0.1:4140 http://catalog:8080/
echo "== a request metric:"
curl -s http://127.0.0.1:9990/metrics | grep '^trellis_http_requests_total' | grep -v ' 0$'
