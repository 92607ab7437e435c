#!/usr/bin/env bash
# The README's first command on a fresh clone (issue 16, point 4): time from nothing to a
# running demo. Clones this repository's HEAD into a temporary directory, with an empty
# target directory and (FRESH_CARGO_HOME=1, the default) an empty cargo home, so every crate
# is downloaded from crates.io and built, then runs the README's command and stops at the
# demo's banner ("Trellis demo is running"). Prints wall time, build CPU seconds and the
# time from the build's end to the banner. Run it on a quiet machine.
#   bash bench/firstrun.sh
#   PROFILE=release bash bench/firstrun.sh     # the same for another profile
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-quickstart}
FRESH_CARGO_HOME=${FRESH_CARGO_HOME:-1}
LIMIT=${LIMIT:-1800}   # seconds: give up after this
log() { printf '[firstrun %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

work=$(mktemp -d /tmp/trellis-firstrun.XXXXXX)
demo_pid=""
cleanup() {
  if [ -n "$demo_pid" ]; then kill -INT "$demo_pid" 2>/dev/null || true; sleep 2; kill "$demo_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
git clone -q . "$work/repo"
if [ "$FRESH_CARGO_HOME" = 1 ]; then
  export CARGO_HOME="$work/cargo-home"
  # The toolchain stays where rustup put it; only the registry cache is new.
  mkdir -p "$CARGO_HOME"
fi
export CARGO_TARGET_DIR="$work/repo/target"
cd "$work/repo"
log "profile $PROFILE, commit $(git rev-parse --short HEAD), cargo home ${CARGO_HOME:-default}"
start=$(date +%s.%N)
# The README's command, in the background: it keeps running once the demo is up.
setsid /usr/bin/time -f '%U %S' -o "$work/build-cpu" cargo build --profile "$PROFILE" -p trellis-cli \
  > "$work/build.log" 2>&1 &
build_pid=$!
wait "$build_pid" || { tail -20 "$work/build.log"; exit 1; }
built=$(date +%s.%N)
cpu=$(awk '{ printf "%.0f", $1 + $2 }' "$work/build-cpu")
bin="$CARGO_TARGET_DIR/$PROFILE/trellis"
# `cargo run` would rebuild nothing now; run the binary as it would.
"$bin" demo --listen 127.0.0.1:0 --data-dir "$work/data" > "$work/demo.log" 2>&1 &
demo_pid=$!
until grep -q "Trellis demo is running" "$work/demo.log"; do
  kill -0 "$demo_pid" 2>/dev/null || { tail -20 "$work/demo.log"; exit 1; }
  now=$(date +%s.%N)
  if awk -v a="$now" -v b="$start" -v l="$LIMIT" 'BEGIN { exit !(a - b > l) }'; then
    log "no banner within ${LIMIT}s"
    exit 1
  fi
  sleep 0.2
done
up=$(date +%s.%N)
awk -v s="$start" -v b="$built" -v u="$up" -v c="$cpu" -v p="$PROFILE" 'BEGIN {
  printf "profile %s: fresh clone to a running demo in %.0f s (%d min %02d s): build %.0f s wall, %s CPU-s; demo up %.1f s after the build\n",
    p, u - s, int((u - s) / 60), int(u - s) % 60, b - s, c, u - b }'
