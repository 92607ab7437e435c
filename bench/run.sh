#!/usr/bin/env bash
# Trellis benchmark harness: added latency, max throughput, CPU and memory of
# the trellis sidecar (1 and 2 hops) against a direct baseline, HAProxy and
# nginx, all on loopback. See bench/README.md for usage and knobs.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
TEMPLATES=$BENCH_DIR/templates
source "$BENCH_DIR/lib/paired.sh"

# ---------------------------------------------------------------- knobs ----
RATE=${RATE:-1000}                 # constant request rate for the latency run
DURATION=${DURATION:-20s}          # length of the constant-rate run
WARMUP=${WARMUP:-3s}               # constant-rate warm-up before it (0 = none)
CONNS=${CONNS:-50}                 # oha connections
WRK_THREADS=${WRK_THREADS:-1}
WRK_CONNS=${WRK_CONNS:-50}
WRK_DURATION=${WRK_DURATION:-10s}
BODY_BYTES=${BODY_BYTES:-1024}
PATHS=${PATHS:-"direct trellis-1hop trellis-2hop haproxy-1hop nginx-1hop"}
ROUNDS=${ROUNDS:-1}                # run every path this many times, round-robin; report medians
PAIRS=${PAIRS:-12}                 # paired per-core runs, trellis-1hop vs haproxy-1hop (0 = none)
PAIR_SECS=${PAIR_SECS:-5}          # length of each paired run
SKIP_TRELLIS=${SKIP_TRELLIS:-0}
TRELLIS_BIN=${TRELLIS_BIN:-}
TRELLIS_LOG=${TRELLIS_LOG:-warn}   # like access_log off for the others
PIN=${PIN:-0}                      # 1 = taskset proxies / load+upstream apart
OUT_DIR=${OUT_DIR:-$BENCH_DIR/out}
KEEP_TMP=${KEEP_TMP:-0}            # 1 = keep configs and logs after the run

# ------------------------------------------------------------- helpers ----
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# "20s" / "2m" / "20" -> whole seconds (for timeouts and arithmetic).
to_secs() {
    local v=$1
    case $v in
        *s) echo "${v%s}" ;;
        *m) echo $(( ${v%m} * 60 )) ;;
        *h) echo $(( ${v%h} * 3600 )) ;;
        *) echo "$v" ;;
    esac
}

# Shell-quoted command line, for the "commands used" section.
quote_cmd() { local s; s=$(printf '%q ' "$@"); echo "${s% }"; }
COMMANDS=()
note_cmd() { COMMANDS+=("$(quote_cmd "$@")"); }

# Fill @@KEY@@ placeholders of a template: render TEMPLATE OUT KEY=VALUE...
render() {
    local tmpl=$1 out=$2 kv args=()
    shift 2
    for kv in "$@"; do args+=(-e "s|@@${kv%%=*}@@|${kv#*=}|g"); done
    sed "${args[@]}" "$TEMPLATES/$tmpl" >"$out"
    if grep -q '@@[A-Z_]*@@' "$out"; then die "unfilled placeholder in $out"; fi
}

# A free loopback port outside the ephemeral range (so client sockets never
# collide with it), random so parallel or leftover runs don't clash.
# pick_port VAR: store the port in VAR (no subshell, so USED_PORTS sticks).
USED_PORTS=" "
pick_port() {
    local p _
    for _ in $(seq 1 200); do
        p=$(( 20000 + RANDOM % 12000 ))
        [[ $USED_PORTS == *" $p "* ]] && continue
        if [[ -z $(ss -Htan "sport = :$p") ]]; then
            USED_PORTS+="$p "
            printf -v "$1" '%s' "$p"
            return 0
        fi
    done
    die "no free port found"
}

# The process and all its descendants (nginx master + workers).
proc_tree() {
    local pid=$1 child
    [[ -d /proc/$pid ]] || return 0
    echo "$pid"
    for child in $(pgrep -P "$pid" || true); do proc_tree "$child"; done
}

# utime+stime clock ticks summed over the process trees of the given PIDs.
cpu_ticks() {
    local total=0 pid stat f
    for pid in $(for r in "$@"; do proc_tree "$r"; done); do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        stat=${stat##*) }          # drop "pid (comm) " - comm may hold spaces
        read -ra f <<<"$stat"
        total=$(( total + f[11] + f[12] ))   # fields 14 and 15 of stat(5)
    done
    echo "$total"
}

# Sum of a /proc/PID/status kB field (VmRSS, VmHWM) over a process tree.
mem_kb() {
    local field=$1 root=$2 total=0 pid v
    for pid in $(proc_tree "$root"); do
        v=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
        total=$(( total + ${v:-0} ))
    done
    echo "$total"
}
join_plus() { local s; s=$(printf '%s + ' "$@"); echo "${s% + }"; }
kb_to_mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# "steal_ticks total_ticks" from /proc/stat: time the hypervisor gave this VM's vCPUs to
# someone else, and all time, summed over CPUs.
steal_ticks() { awk '/^cpu / { print $9, $2+$3+$4+$5+$6+$7+$8+$9 }' /proc/stat; }

# Whole-machine CPU busy % over one second, from /proc/stat.
cpu_busy_pct() {
    local a b
    a=$(awk '/^cpu / { print $2+$3+$4+$6+$7+$8, $5 }' /proc/stat)
    sleep 1
    b=$(awk '/^cpu / { print $2+$3+$4+$6+$7+$8, $5 }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
        busy = y[1] - x[1]; idle = y[2] - x[2];
        printf "%d", (busy + idle > 0) ? 100 * busy / (busy + idle) : 0 }'
}

# ---- process tracking: everything we start is recorded and killed on exit.
STARTED_PIDS=()
LAST_PID=
# start_bg NAME CMD... : run CMD in the background, log to $TMP/NAME.log.
start_bg() {
    local name=$1
    shift
    note_cmd "$@"
    "$@" >"$TMP/$name.log" 2>&1 &
    LAST_PID=$!
    STARTED_PIDS+=("$LAST_PID")
}

# Stop the given PIDs (that we started) and their children: TERM, then KILL.
stop_pids() {
    local pid ppid tree=() _ keep=()
    for pid in "$@"; do
        [[ -e /proc/$pid/stat ]] || continue
        # Only our own direct children: guards against PID reuse.
        ppid=$(awk '{ sub(/.*\) /, ""); print $2 }' "/proc/$pid/stat" 2>/dev/null || echo 0)
        [[ $ppid == "$$" ]] || continue
        mapfile -t -O "${#tree[@]}" tree < <(proc_tree "$pid")
        kill -TERM "$pid" 2>/dev/null || true
    done
    for _ in $(seq 1 50); do          # up to 5 s for graceful exit
        keep=()
        for pid in "${tree[@]}"; do [[ -e /proc/$pid ]] && keep+=("$pid"); done
        ((${#keep[@]} == 0)) && break
        sleep 0.1
    done
    for pid in "${keep[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
    # Forget them.
    keep=()
    for pid in "${STARTED_PIDS[@]}"; do
        [[ " $* " == *" $pid "* ]] || keep+=("$pid")
    done
    STARTED_PIDS=("${keep[@]}")
}

TMP=
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((${#STARTED_PIDS[@]})); then
        log "stopping ${#STARTED_PIDS[@]} background process(es)"
        stop_pids "${STARTED_PIDS[@]}"
    fi
    if [[ -n $TMP && -d $TMP ]]; then
        if [[ $KEEP_TMP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Wait until URL answers 2xx (bounded); fail early if PID died.
wait_http() {
    local url=$1 pid=$2 name=$3 _
    for _ in $(seq 1 100); do         # up to ~20 s
        if curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; then return 0; fi
        if [[ ! -e /proc/$pid ]]; then
            log "$name exited during start-up; last log lines:"
            tail -n 20 "$TMP/$name.log" >&2 || true
            return 1
        fi
        sleep 0.2
    done
    log "$name not ready at $url after 20 s; last log lines:"
    tail -n 20 "$TMP/$name.log" >&2 || true
    return 1
}

# One request through the path: must be 200 with the full body.
check_path() {
    local url=$1 got
    got=$(curl -sS -o /dev/null --max-time 5 -w '%{http_code} %{size_download}' "$url" 2>&1) || true
    if [[ $got != "200 $BODY_BYTES" ]]; then
        log "sanity request to $url gave '$got', expected '200 $BODY_BYTES'"
        return 1
    fi
}

# ------------------------------------------------------------ installs ----
SUDO=
[[ $EUID -ne 0 ]] && SUDO=sudo
export PATH="$HOME/.cargo/bin:$PATH"

ensure_tools() {
    local missing=() t
    # command-name:package-name
    for t in haproxy:haproxy nginx:nginx wrk:wrk curl:curl jq:jq ss:iproute2 pgrep:procps taskset:util-linux; do
        command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
    done
    if ((${#missing[@]})); then
        log "installing with apt-get: ${missing[*]}"
        $SUDO timeout 600 apt-get update
        # Debian starts packaged daemons on install unless told not to;
        # policy-rc.d may forbid it already, we never use those instances.
        $SUDO env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y "${missing[@]}"
    fi
    if ! command -v oha >/dev/null 2>&1; then
        log "installing oha with cargo (takes ~10 min on 2 cores)"
        timeout 3600 nice -n 19 cargo install oha --locked
    fi
}

# ------------------------------------------------------------ binaries ----
build_trellis() {
    if [[ $SKIP_TRELLIS == 1 ]]; then return 0; fi
    if [[ -n $TRELLIS_BIN ]]; then
        [[ -x $TRELLIS_BIN ]] || die "TRELLIS_BIN=$TRELLIS_BIN is not executable"
        log "using TRELLIS_BIN=$TRELLIS_BIN (no build)"
        return 0
    fi
    # The dist profile is what release binaries are built with (fat LTO, one codegen unit).
    # scripts/build-dist: `cargo build --profile dist -p trellis-cli` with the sidecar's code laid out together.
    log "building trellis (scripts/build-dist)"
    (cd "$REPO_DIR" && timeout 3600 nice -n 19 scripts/build-dist)
    TRELLIS_BIN=${CARGO_TARGET_DIR:-$REPO_DIR/target}/dist/trellis
    [[ -x $TRELLIS_BIN ]] || die "build finished but $TRELLIS_BIN is missing"
}

# ------------------------------------------------------------- pinning ----
# PIN=1: proxies share the last CPU, load generator + upstream get the rest.
PROXY_PIN=()
LOAD_PIN=()
setup_pinning() {
    local n
    n=$(nproc)
    if [[ $PIN == 1 ]]; then
        if ((n < 2)); then log "PIN=1 ignored: only $n CPU"; return 0; fi
        PROXY_PIN=(taskset -c "$((n - 1))")
        LOAD_PIN=(taskset -c "0-$((n - 2))")
    fi
}

# ------------------------------------------------------------ upstream ----
UPSTREAM_PORT=
UPSTREAM_PID=
start_upstream() {
    local dir=$TMP/upstream
    mkdir -p "$dir/www" "$dir/tmp"
    head -c "$BODY_BYTES" /dev/zero | tr '\0' 'x' >"$dir/www/1k"
    pick_port UPSTREAM_PORT
    render upstream-nginx.conf.tmpl "$dir/nginx.conf" \
        DIR="$dir" PORT="$UPSTREAM_PORT" BODY_BYTES="$BODY_BYTES"
    start_bg upstream "${LOAD_PIN[@]}" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log"
    UPSTREAM_PID=$LAST_PID
    wait_http "http://127.0.0.1:$UPSTREAM_PORT/1k" "$UPSTREAM_PID" upstream || die "upstream did not start"
    check_path "http://127.0.0.1:$UPSTREAM_PORT/1k" || die "upstream serves the wrong body"
    log "upstream nginx on 127.0.0.1:$UPSTREAM_PORT (pid $UPSTREAM_PID)"
}

# -------------------------------------------------------------- paths -----
# Each start_<path> sets PATH_URL and PATH_PROXIES (PIDs of the proxies in
# the path, client side first) or returns non-zero.
PATH_URL=
PATH_PROXIES=()

start_direct() {
    PATH_URL="http://127.0.0.1:$UPSTREAM_PORT/1k"
    PATH_PROXIES=()
}

start_haproxy_1hop() {
    local dir=$TMP/haproxy port
    mkdir -p "$dir"
    pick_port port
    render haproxy.cfg.tmpl "$dir/haproxy.cfg" PORT="$port" UPSTREAM_PORT="$UPSTREAM_PORT"
    # -db: stay in the foreground, single process (no master-worker).
    start_bg haproxy "${PROXY_PIN[@]}" haproxy -db -f "$dir/haproxy.cfg"
    PATH_PROXIES=("$LAST_PID")
    PATH_URL="http://127.0.0.1:$port/1k"
    wait_http "$PATH_URL" "$LAST_PID" haproxy
}

start_nginx_1hop() {
    local dir=$TMP/nginx-proxy port
    mkdir -p "$dir/tmp"
    pick_port port
    render nginx-proxy.conf.tmpl "$dir/nginx.conf" \
        DIR="$dir" PORT="$port" UPSTREAM_PORT="$UPSTREAM_PORT"
    start_bg nginx-proxy "${PROXY_PIN[@]}" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log"
    PATH_PROXIES=("$LAST_PID")
    PATH_URL="http://127.0.0.1:$port/1k"
    wait_http "$PATH_URL" "$LAST_PID" nginx-proxy
}

# start_trellis NAME CONFIG ADMIN_PORT: one sidecar, one worker thread.
start_trellis() {
    local name=$1 cfg=$2 admin=$3
    # Offline check first: a config error then reads as one, not as a timeout.
    if ! timeout 30 "$TRELLIS_BIN" validate -f "$cfg" >"$TMP/$name.validate.log" 2>&1; then
        log "$name: trellis validate rejected $cfg:"
        cat "$TMP/$name.validate.log" >&2
        return 1
    fi
    start_bg "$name" "${PROXY_PIN[@]}" "$TRELLIS_BIN" proxy --config "$cfg" --threads 1 --log "$TRELLIS_LOG"
    PATH_PROXIES+=("$LAST_PID")
    wait_http "http://127.0.0.1:$admin/ready" "$LAST_PID" "$name"
}

start_trellis_1hop() {
    local dir=$TMP/trellis-1hop port admin
    mkdir -p "$dir"
    pick_port port
    pick_port admin
    render trellis-outbound.yaml.tmpl "$dir/outbound.yaml" \
        PORT="$port" ADMIN_PORT="$admin" TARGET_PORT="$UPSTREAM_PORT"
    PATH_PROXIES=()
    PATH_URL="http://127.0.0.1:$port/1k"
    start_trellis trellis-1hop "$dir/outbound.yaml" "$admin"
}

start_trellis_2hop() {
    local dir=$TMP/trellis-2hop out_port out_admin in_port in_admin
    mkdir -p "$dir"
    pick_port out_port
    pick_port out_admin
    pick_port in_port
    pick_port in_admin
    render trellis-inbound.yaml.tmpl "$dir/inbound.yaml" \
        PORT="$in_port" ADMIN_PORT="$in_admin" UPSTREAM_PORT="$UPSTREAM_PORT"
    render trellis-outbound.yaml.tmpl "$dir/outbound.yaml" \
        PORT="$out_port" ADMIN_PORT="$out_admin" TARGET_PORT="$in_port"
    PATH_PROXIES=()
    PATH_URL="http://127.0.0.1:$out_port/1k"
    start_trellis trellis-2hop-outbound "$dir/outbound.yaml" "$out_admin" || return 1
    start_trellis trellis-2hop-inbound "$dir/inbound.yaml" "$in_admin"
}

# ---------------------------------------------------------- measuring -----
declare -A R=()        # R[path.field] = value for the report

# oha at a constant rate; JSON to $1, extra args after.
run_oha() {
    local json=$1 dur=$2 url=$3 secs
    secs=$(to_secs "$dur")
    # --latency-correction: measure from the scheduled send time, so a stall
    # is charged to every request queued behind it (no coordinated omission).
    local cmd=("${LOAD_PIN[@]}" oha -z "$dur" -q "$RATE" --latency-correction
        -c "$CONNS" --no-tui --output-format json "$url")
    note_cmd "${cmd[@]}"
    timeout "$((secs + 60))" "${cmd[@]}" >"$json" 2>"$json.err"
}

# us from a seconds value in oha's JSON.
oha_us() { jq -r "$2 // empty | . * 1000000 | round" "$1"; }

measure_path() {
    local path=$1
    local json=$TMP/$path.oha.json wrk_out=$TMP/$path.wrk.txt
    local t0 t1 ticks ok errs non200 pid f expected rss=() hwm=() steal0 steal1

    check_path "$PATH_URL" || return 1
    steal0=$(steal_ticks)

    # Idle memory before any load.
    for pid in "${PATH_PROXIES[@]}"; do rss+=("$(kb_to_mb "$(mem_kb VmRSS "$pid")")"); done

    if (( $(to_secs "$WARMUP") > 0 )); then
        log "$path: warm-up $WARMUP at $RATE rps"
        run_oha "$TMP/$path.warmup.json" "$WARMUP" "$PATH_URL" || { log "$path: warm-up failed"; return 1; }
    fi

    log "$path: constant rate $RATE rps for $DURATION"
    t0=$(cpu_ticks "${PATH_PROXIES[@]}")
    run_oha "$json" "$DURATION" "$PATH_URL" || { log "$path: oha failed"; cat "$json.err" >&2; return 1; }
    t1=$(cpu_ticks "${PATH_PROXIES[@]}")
    for pid in "${PATH_PROXIES[@]}"; do hwm+=("$(kb_to_mb "$(mem_kb VmHWM "$pid")")"); done

    # Completed requests = all status codes; errors excludes requests that
    # were merely in flight when the run's deadline cut them off.
    ok=$(jq '[.statusCodeDistribution[]] | add // 0' "$json")
    errs=$(jq '[.errorDistribution | to_entries[] | select(.key | test("deadline") | not) | .value] | add // 0' "$json")
    non200=$(jq '[.statusCodeDistribution | to_entries[] | select(.key != "200") | .value] | add // 0' "$json")
    R[$path.p50]=$(oha_us "$json" '.latencyPercentiles.p50')
    R[$path.p90]=$(oha_us "$json" '.latencyPercentiles.p90')
    R[$path.p99]=$(oha_us "$json" '.latencyPercentiles.p99')
    R[$path.p999]=$(oha_us "$json" '.latencyPercentiles["p99.9"]')
    R[$path.reqs]=$ok
    for f in p50 p90 p99 p999; do
        [[ -n ${R[$path.$f]} ]] || { log "$path: no $f in oha output $json"; return 1; }
    done
    # An open-loop run that could not keep the rate is not comparable.
    expected=$(( RATE * $(to_secs "$DURATION") ))
    if (( ok * 10 < expected * 9 )); then
        log "$path: WARNING only $ok of ~$expected requests completed"
    fi
    R[$path.rate_errs]=$((errs + non200))
    if ((${#PATH_PROXIES[@]})); then
        ticks=$((t1 - t0))
        R[$path.cpu]=$(awk -v t="$ticks" -v hz="$CLK_TCK" -v n="$ok" \
            'BEGIN { if (n > 0) printf "%.3f", t / hz / (n / 1000); else print "n/a" }')
        # 2 hops: "outbound + inbound".
        R[$path.idle_rss]=$(join_plus "${rss[@]}")
        R[$path.peak_rss]=$(join_plus "${hwm[@]}")
    fi

    log "$path: max throughput, wrk -t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION"
    local wcmd=("${LOAD_PIN[@]}" wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$WRK_DURATION" "$PATH_URL")
    note_cmd "${wcmd[@]}"
    t0=$(cpu_ticks "${PATH_PROXIES[@]}")
    timeout "$(( $(to_secs "$WRK_DURATION") + 60 ))" "${wcmd[@]}" >"$wrk_out" 2>&1 \
        || { log "$path: wrk failed"; cat "$wrk_out" >&2; return 1; }
    t1=$(cpu_ticks "${PATH_PROXIES[@]}")
    R[$path.rps]=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$wrk_out")
    # A busy neighbour shows as steal: CPU figures of a round with steal are inflated.
    steal1=$(steal_ticks)
    R[$path.steal]=$(awk -v a="$steal0" -v b="$steal1" 'BEGIN { split(a, x, " "); split(b, y, " ");
        t = y[2] - x[2]; printf "%.1f", (t > 0) ? 100 * (y[1] - x[1]) / t : 0 }')
    # Throughput per proxy core: requests served per CPU-second the proxies used. The
    # proxies share two CPUs with wrk and the upstream, so raw rps alone favours whichever
    # proxy got more CPU in its run.
    if ((${#PATH_PROXIES[@]})); then
        R[$path.rps_core]=$(awk -v t="$((t1 - t0))" -v hz="$CLK_TCK" \
            '/ requests in / { n = $1 } END { if (t > 0) printf "%.0f", n / (t / hz); else print "n/a" }' "$wrk_out")
    fi
    # Non-2xx/3xx plus socket errors (connect/read/write/timeout) from wrk.
    R[$path.wrk_errs]=$(awk '
        /Non-2xx or 3xx responses:/ { n += $NF }
        /Socket errors:/ { gsub(/,/, ""); n += $4 + $6 + $8 + $10 }
        END { print n + 0 }' "$wrk_out")

    log "$path: p50=${R[$path.p50]}us p99=${R[$path.p99]}us p99.9=${R[$path.p999]}us rps=${R[$path.rps]}"
}

# Keep one round's figures: R[path.field.round].
save_round() {
    local path=$1 round=$2 f
    for f in p50 p90 p99 p999 rps rps_core cpu steal rate_errs wrk_errs idle_rss peak_rss; do
        R[$path.$f.$round]=${R[$path.$f]:-}
    done
}

# Medians of the numeric fields over the rounds; errors are summed; memory is the last
# round's (a sidecar's RSS barely moves between rounds).
take_medians() {
    local path=$1 f r vals
    for f in p50 p90 p99 p999 rps rps_core cpu; do
        vals=()
        for ((r = 1; r <= ROUNDS; r++)); do
            [[ -n ${R[$path.$f.$r]:-} && ${R[$path.$f.$r]} != n/a ]] && vals+=("${R[$path.$f.$r]}")
        done
        ((${#vals[@]})) || continue
        R[$path.$f]=$(printf '%s\n' "${vals[@]}" | sort -g | awk '{ v[NR] = $1 } END {
            m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            if (m == int(m)) printf "%d", m; else printf "%.3f", m }')
    done
    local sum
    for f in rate_errs wrk_errs; do
        sum=0
        for ((r = 1; r <= ROUNDS; r++)); do sum=$((sum + ${R[$path.$f.$r]:-0})); done
        R[$path.$f]=$sum
    done
}

# ------------------------------------------------------------- report -----
# Signed difference against the direct path, or "-".
added() {
    local path=$1 f=$2 base=${R[direct.$2]:-} val=${R[$1.$2]:-}
    if [[ $path == direct || -z $base || -z $val ]]; then echo "-"; return; fi
    printf '%+d' "$((val - base))"
}

report() {
    local path st
    echo "# Trellis benchmark $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "Constant rate: $RATE rps for $DURATION (oha, $CONNS keep-alive connections, latency-corrected; warm-up $WARMUP)."
    echo "Max throughput: wrk -t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION. Body: $BODY_BYTES bytes. Each proxy: 1 worker thread. Pinning: $( [[ ${#PROXY_PIN[@]} -gt 0 ]] && echo "proxies on CPU ${PROXY_PIN[2]}, load + upstream on CPU ${LOAD_PIN[2]}" || echo none)."
    echo "Latencies in µs; \"added\" = path minus direct at the same percentile. CPU = proxy utime+stime during the constant-rate run (summed over both sidecars for 2 hops). RSS = VmRSS before load, VmHWM after the constant-rate run (per sidecar for 2 hops; nginx master + worker summed)."
    echo
    echo "| path | p50 | p90 | p99 | p99.9 | added p50 | added p99 | added p99.9 | max rps (wrk) | rps per proxy core | CPU s / 1k req | idle RSS MB | peak RSS MB | errors (oha/wrk) |"
    echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    for path in $PATHS; do
        st=${R[$path.status]:-}
        if [[ $st != ok ]]; then
            echo "| $path | ${st:-not run} | | | | | | | | | | | | |"
            continue
        fi
        echo "| $path | ${R[$path.p50]} | ${R[$path.p90]} | ${R[$path.p99]} | ${R[$path.p999]} | $(added "$path" p50) | $(added "$path" p99) | $(added "$path" p999) | ${R[$path.rps]} | ${R[$path.rps_core]:--} | ${R[$path.cpu]:--} | ${R[$path.idle_rss]:--} | ${R[$path.peak_rss]:--} | ${R[$path.rate_errs]}/${R[$path.wrk_errs]} |"
    done
    if ((ROUNDS > 1)); then
        echo
        echo "Figures are medians over $ROUNDS rounds (paths interleaved); errors are summed. Each round:"
        echo
        echo "| path | round | p50 | p99 | p99.9 | max rps | rps per proxy core | CPU s / 1k req | steal % |"
        echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|"
        local r
        for path in $PATHS; do
            for ((r = 1; r <= ROUNDS; r++)); do
                [[ -n ${R[$path.p50.$r]:-} ]] || continue
                echo "| $path | $r | ${R[$path.p50.$r]} | ${R[$path.p99.$r]} | ${R[$path.p999.$r]} | ${R[$path.rps.$r]} | ${R[$path.rps_core.$r]:--} | ${R[$path.cpu.$r]:--} | ${R[$path.steal.$r]:--} |"
            done
        done
    fi
    if [[ -n $PAIRED ]]; then
        echo
        echo "Throughput per proxy core, paired: $PAIRS pairs of \`wrk -t1 -c50 -d${PAIR_SECS}s\`, trellis-1hop then haproxy-1hop, both running; requests per proxy core = requests / the proxy's utime+stime in that run."
        echo
        echo "$PAIRED"
    fi
    echo
    echo "## Machine"
    echo
    echo "- nproc: $(nproc)"
    echo "- kernel: $(uname -srm)"
    echo "- CPU: $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "- memory: $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "- clock ticks/s: $CLK_TCK"
    echo "- CPU busy before start (1 s sample): ${BUSY}%"
    echo "- trellis: $( [[ $SKIP_TRELLIS == 1 ]] && echo skipped || echo "$TRELLIS_BIN ($GIT_REV)")"
    echo "- $(oha --version 2>&1 | head -n1); $(wrk -v 2>&1 | head -n1 | awk '{ print $1, $2 }'); $(haproxy -v 2>&1 | head -n1 | awk '{ print $1, $2, $3 }'); $(nginx -v 2>&1)"
    echo
    echo "## Commands"
    echo
    echo '```'
    printf '%s\n' "${COMMANDS[@]}"
    echo '```'
    echo
    echo "## Configs"
    local f
    for f in "$TMP"/*/*.cfg "$TMP"/*/*.conf "$TMP"/*/*.yaml; do
        [[ -e $f ]] || continue
        echo
        echo "<details><summary>${f#"$TMP"/}</summary>"
        echo
        echo '```'
        grep -v '^ *#' "$f" | grep -v '^ *$'
        echo '```'
        echo
        echo "</details>"
    done
}

# Throughput per proxy core, paired: one max-throughput run per round moves by ±10% on a
# shared VM, so Trellis (1 hop) and HAProxy also run side by side for PAIRS pairs of short
# wrk runs, each Trellis run compared with the HAProxy run right after it (lib/paired.sh).
PAIRED=""
paired_per_core() {
    ((PAIRS > 0)) || return 0
    [[ " $PATHS " == *" trellis-1hop "* && " $PATHS " == *" haproxy-1hop "* ]] || return 0
    log "=== paired per-core runs: $PAIRS pairs of ${PAIR_SECS}s, trellis-1hop then haproxy-1hop"
    local t_pid t_url h_pid h_url
    PATH_PROXIES=()
    start_trellis_1hop || { log "paired runs: trellis did not start"; return 0; }
    t_pid=${PATH_PROXIES[0]} t_url=$PATH_URL
    start_haproxy_1hop || { stop_pids "$t_pid"; log "paired runs: haproxy did not start"; return 0; }
    h_pid=${PATH_PROXIES[0]} h_url=$PATH_URL
    PAIRED_PREFIX=("${LOAD_PIN[@]}")
    "${PAIRED_PREFIX[@]}" wrk -t1 -c50 -d2s "$t_url" >/dev/null   # warm-up: pools, lazy init
    "${PAIRED_PREFIX[@]}" wrk -t1 -c50 -d2s "$h_url" >/dev/null
    note_cmd "${PAIRED_PREFIX[@]}" wrk -t1 -c50 -d"${PAIR_SECS}s" "$t_url"
    note_cmd "${PAIRED_PREFIX[@]}" wrk -t1 -c50 -d"${PAIR_SECS}s" "$h_url"
    PAIRED=$(paired_runs "$PAIRS" "$PAIR_SECS" trellis-1hop "$t_pid" "$t_url" haproxy-1hop "$h_pid" "$h_url")
    stop_pids "$t_pid" "$h_pid"
}

# --------------------------------------------------------------- main -----
main() {
    local path fn kept=()
    [[ " $PATHS " == *" direct "* ]] || PATHS="direct $PATHS"   # baseline for "added"
    if [[ $SKIP_TRELLIS == 1 ]]; then
        for path in $PATHS; do [[ $path == trellis* ]] || kept+=("$path"); done
        PATHS=${kept[*]}
    fi

    ensure_tools
    build_trellis
    CLK_TCK=$(getconf CLK_TCK)
    # Other work on the box (a cargo build) shows up directly in the tails.
    BUSY=$(cpu_busy_pct)
    if ((BUSY > 15)); then
        log "WARNING: CPUs already ${BUSY}% busy before the benchmark; tail latencies will be noisy"
    fi
    GIT_REV=$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [[ -n $(git -C "$REPO_DIR" status --porcelain 2>/dev/null | head -n1) ]]; then GIT_REV+="-dirty"; fi

    TMP=$(mktemp -d /tmp/trellis-bench.XXXXXX)
    chmod 755 "$TMP"    # nginx workers run as an unprivileged user when started as root
    setup_pinning
    start_upstream

    # Rounds interleave the paths, so a noisy minute on a shared machine hurts every path
    # alike instead of one; the table reports each field's median over the rounds.
    local round
    for ((round = 1; round <= ROUNDS; round++)); do
        for path in $PATHS; do
            fn=start_${path//-/_}
            declare -F "$fn" >/dev/null || die "unknown path '$path'"
            log "=== $path (round $round of $ROUNDS)"
            PATH_PROXIES=()
            if $fn && measure_path "$path"; then
                [[ ${R[$path.status]:-ok} == ok ]] && R[$path.status]=ok
                save_round "$path" "$round"
            else
                R[$path.status]=FAILED
                log "$path: FAILED (logs in $TMP; KEEP_TMP=1 keeps them)"
            fi
            # Stop this path's proxies so they don't compete with the next path.
            if ((${#PATH_PROXIES[@]})); then stop_pids "${PATH_PROXIES[@]}"; fi
            sleep 1
        done
    done
    for path in $PATHS; do
        [[ ${R[$path.status]:-} == ok ]] && take_medians "$path"
    done
    paired_per_core

    mkdir -p "$OUT_DIR"
    local out
    out=$OUT_DIR/results-$(date +%Y%m%d-%H%M%S).md
    report | tee "$out"
    log "results written to $out"
}

main "$@"
