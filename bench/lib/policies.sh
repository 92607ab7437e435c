# Sourced by bench/resilience.sh and bench/instructions.sh: the policy sets compared for the
# resilience layer's cost, on a service named `up` with port 80.
# policy SET: the route and BackendPolicy documents for one policy set, on service `up`.
policy() {
    cat <<'YAML'
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: up}
spec:
  parentRefs: [{kind: Service, name: up, port: 80}]
  rules:
    - backendRefs: [{name: up, port: 80}]
YAML
    case $1 in
    none) cat <<'YAML'
---
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {name: up}
spec:
  targetRef: {name: up}
  retry: {attempts: 0}
  outlierDetection: {consecutive5xx: 0, consecutiveGatewayErrors: 0}
  timeouts: {request: 0s}
YAML
        ;;
    default) ;;
    all) cat <<'YAML'
      timeouts: {request: 5s, backendRequest: 2s}
---
apiVersion: trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {name: up}
spec:
  targetRef: {name: up}
  retry:
    on: [connect-failure, reset, 5xx]
    attempts: 2
    budget: {ratio: 0.2, minPerSecond: 10, window: 10s}
  outlierDetection:
    consecutive5xx: 5
    consecutiveGatewayErrors: 5
    latency: {factor: 3, minLatency: 100ms}
  timeouts: {connect: 500ms}
  circuitBreaker: {maxConnections: 1024, maxPendingRequests: 1024, maxRequests: 1024}
YAML
        ;;
    *) echo "unknown policy set $1" >&2; exit 1 ;;
    esac
}

