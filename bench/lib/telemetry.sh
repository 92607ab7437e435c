# Sourced by bench/observability.sh and bench/instructions.sh: the telemetry sets compared
# for observability's cost, and an OTLP sink for their spans. Callers set TMP and PIDS.

# sink PORT: an OTLP/HTTP "collector" that accepts every export at once (an empty 200 is an
# empty ExportTraceServiceResponse), so the sidecar's exporter cost is all that is measured.
sink() {
    local p=$1 d=$TMP/sink
    mkdir -p "$d"
    cat >"$d/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $d/nginx.pid; error_log $d/error.log;
events { worker_connections 1024; }
http { access_log off; client_body_buffer_size 1m; client_max_body_size 64m;
  client_body_temp_path $d; proxy_temp_path $d; fastcgi_temp_path $d; uwsgi_temp_path $d; scgi_temp_path $d;
  server { listen 127.0.0.1:$p; location / { default_type application/x-protobuf; return 200 ""; } } }
NGINX
    nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" &
    PIDS+=("$!")
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && return 0; sleep 0.1; done
    echo "sink on $p never opened" >&2; exit 1
}

# telemetry SET: the Telemetry document of one set (none for "metrics"); tracing exports to
# the sink on port SINK.
telemetry() {
    local tracing="" logs=""
    case $1 in
    metrics) return ;;
    trace1) tracing=1 ;;
    trace100) tracing=100 ;;
    logs) logs=1 ;;
    trace1-logs) tracing=1 logs=1 ;;
    *) echo "unknown telemetry set $1" >&2; exit 1 ;;
    esac
    printf -- '---\napiVersion: trellis.dev/v1alpha1\nkind: Telemetry\nmetadata: {name: bench}\nspec:\n'
    [[ -z $tracing ]] || printf '  tracing: {collector: "http://127.0.0.1:%s", protocol: http/protobuf, samplingPercent: %s}\n' "$SINK" "$tracing"
    [[ -z $logs ]] || printf '  accessLog: {enabled: true, path: %s}\n' "$TMP/access-$1.log"
}

