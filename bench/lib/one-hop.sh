# Sourced by bench/instructions.sh and bench/percore.sh: one Trellis hop and one HAProxy hop
# in front of an nginx upstream serving 1 KiB at /1k, on fixed loopback ports.

# one_hop_prepare NAME TOOL...: installs missing tools (Debian packages of the same name),
# sets REPO, BIN (building trellis when TRELLIS_BIN is unset and no dist build exists),
# TMP (removed on exit) and PIDS (killed on exit).
one_hop_prepare() {
    local name=$1 tool
    shift
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { apt-get update -q && apt-get install -y -q "$@" >/dev/null; break; }
    done
    REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    BIN=${TRELLIS_BIN:-$REPO/target/dist/trellis}
    [[ -x $BIN ]] || (cd "$REPO" && scripts/build-dist)
    TMP=$(mktemp -d "/tmp/trellis-$name.XXXXXX")
    chmod 755 "$TMP"   # nginx workers run as an unprivileged user when started as root
    PIDS=()
    trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"' EXIT
}

# one_hop_configs UP TRELLIS HAPROXY ADMIN: refuses ports already taken (whatever listens
# there would be measured, or serve as the upstream, without a word), then writes
# $TMP/nginx.conf (upstream on UP), $TMP/trellis.yaml (outbound on TRELLIS, admin on ADMIN)
# and $TMP/haproxy.cfg (on HAPROXY); TRELLIS and HAPROXY may be equal when the proxies run
# one after the other.
one_hop_configs() {
    local up=$1 trellis=$2 haproxy=$3 admin=$4 port
    for port in "$up" "$trellis" "$haproxy" "$admin"; do
        if ss -ltnH "sport = :$port" 2>/dev/null | grep -q .; then
            echo "port $port is in use; stop what listens there first" >&2
            exit 1
        fi
    done
    mkdir -p "$TMP/www"
    head -c 1024 /dev/zero | tr '\0' x >"$TMP/www/1k"
    chmod -R a+rX "$TMP/www"
    cat >"$TMP/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $TMP/nginx.pid;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; server { listen 127.0.0.1:$up; root $TMP/www; } }
NGINX
    cat >"$TMP/trellis.yaml" <<YAML
apiVersion: trellis.dev/v1alpha1
kind: Proxy
metadata: {name: one-hop}
spec:
  admin: {address: 127.0.0.1:$admin}
  outbound: [{name: up, address: 127.0.0.1:$trellis, service: {name: up}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: up}
spec:
  ports: [{port: 80, appProtocol: http}]
  endpoints: [{address: "127.0.0.1:$up"}]
YAML
    sed -e "s/@@PORT@@/$haproxy/; s/@@UPSTREAM_PORT@@/$up/" "$REPO/bench/templates/haproxy.cfg.tmpl" >"$TMP/haproxy.cfg"
}
