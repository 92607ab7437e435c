//! Cases for the divergences issue 13 found (consumer routes, sectionName, precedence ties,
//! filters, missing backends): each failed on the code before the fix.

use crate::harness::*;

/// A consumer route (in the caller's namespace, parent in another) governs only callers in
/// its own namespace.
const MESH_CONSUMER_ROUTE: Suite = Suite {
    name: "MeshConsumerRoute",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer-view, namespace: consumer}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-v1, namespace: mesh}]
  rules:
    - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Header-Set, value: set}]}}]
      backendRefs: [{name: echo-v1, namespace: mesh, port: 80}]
"#,
    cases: &[
        case(
            "a caller in the route's namespace",
            Req {
                from: "consumer",
                ..get("echo-v1.mesh", "/")
            },
            Want {
                resp_headers: &[("X-Header-Set", "set")],
                ..ok("echo-v1")
            },
        ),
        case(
            "a caller in the Service's namespace",
            get("echo-v1.mesh", "/"),
            Want {
                resp_absent: &["X-Header-Set"],
                ..ok("echo-v1")
            },
        ),
    ],
};

/// A consumer route replaces the producer's routes for its namespace's callers; the two may
/// have the same match.
const MESH_CONSUMER_OVER_PRODUCER: Suite = Suite {
    name: "MeshConsumerRoute (with a producer route)",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer-view, namespace: consumer}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-v1, namespace: mesh}]
  rules:
    - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Header-Set, value: set}]}}]
      backendRefs: [{name: echo-v1, namespace: mesh, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: producer-view, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-v1}]
  rules:
    - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Producer, value: "yes"}]}}]
      backendRefs: [{name: echo-v2, port: 80}]
"#,
    cases: &[
        case(
            "the consumer's namespace sees only its own route",
            Req {
                from: "consumer",
                ..get("echo-v1.mesh", "/")
            },
            Want {
                resp_headers: &[("X-Header-Set", "set")],
                resp_absent: &["X-Producer"],
                ..ok("echo-v1")
            },
        ),
        case(
            "the producer's namespace sees the producer route",
            get("echo-v1.mesh", "/"),
            Want {
                resp_headers: &[("X-Producer", "yes")],
                resp_absent: &["X-Header-Set"],
                ..ok("echo-v2")
            },
        ),
        case(
            "a third namespace sees the producer route",
            Req {
                from: "elsewhere",
                ..get("echo-v1.mesh", "/")
            },
            Want {
                resp_headers: &[("X-Producer", "yes")],
                resp_absent: &["X-Header-Set"],
                ..ok("echo-v2")
            },
        ),
    ],
};

/// `sectionName` names one port of the parent Service.
const MESH_PORTS_SECTION_NAME: Suite = Suite {
    name: "MeshPorts (sectionName)",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: v1-section-http, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-v1, sectionName: http}]
  rules:
    - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Header-Set, value: v1}]}}]
      backendRefs: [{name: echo-v1, port: 80}]
"#,
    cases: &[
        case(
            "the port the section names",
            get("echo-v1", "/"),
            Want {
                resp_headers: &[("X-Header-Set", "v1")],
                ..ok("echo-v1")
            },
        ),
        case(
            "another port",
            get("echo-v1:8080", "/"),
            Want {
                resp_absent: &["X-Header-Set"],
                ..ok("echo-v1")
            },
        ),
    ],
};

/// Ties between equal matches go to the older route, by creation time.
const PRECEDENCE_BY_AGE: Suite = Suite {
    name: "HTTPRouteRule precedence (spec: the oldest route)",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: aa-newer, namespace: mesh, creationTimestamp: "2026-01-01T00:00:00.500Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /tie}}]
      backendRefs: [{name: echo-v2, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: zz-older, namespace: mesh, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /tie}}]
      backendRefs: [{name: echo-v1, port: 80}]
"#,
    cases: &[case(
        "the older route wins (timestamps compared as times, not text)",
        echo("/tie"),
        ok("echo-v1"),
    )],
};

/// Of two rules with identical matches, the first wins.
const IDENTICAL_MATCHES: Suite = Suite {
    name: "HTTPRouteRule precedence (spec: rule order)",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: same-twice, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /same}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /same}}]
      backendRefs: [{name: echo-v3, port: 80}]
"#,
    cases: &[case("the first rule wins", echo("/same"), ok("echo-v1"))],
};

/// Of two header matches whose names differ only in case, the first counts.
const HEADER_NAMES_DIFFERING_IN_CASE: Suite = Suite {
    name: "HTTPHeaderMatch (spec: equivalent names)",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: colors, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /colors}, headers: [{name: Color, value: blue}, {name: color, value: red}]}]
      backendRefs: [{name: echo-v1, port: 80}]
"#,
    cases: &[
        case(
            "the first counts",
            Req {
                headers: &[("color", "blue")],
                ..echo("/colors")
            },
            ok("echo-v1"),
        ),
        case(
            "the second is ignored",
            Req {
                headers: &[("color", "red")],
                ..echo("/colors")
            },
            status(404),
        ),
    ],
};

#[tokio::test]
async fn mesh_consumer_route() {
    run(&[&MESH_CONSUMER_ROUTE, &MESH_CONSUMER_OVER_PRODUCER]).await;
}

#[tokio::test]
async fn mesh_ports_section_name() {
    run(&[&MESH_PORTS_SECTION_NAME]).await;
}

#[tokio::test]
async fn precedence_ties() {
    run(&[
        &PRECEDENCE_BY_AGE,
        &IDENTICAL_MATCHES,
        &HEADER_NAMES_DIFFERING_IN_CASE,
    ])
    .await;
}

/// Without a port, a redirect keeps the Service port the request was addressed to, whatever
/// its `Host` says.
const REDIRECT_SERVICE_PORT: Suite = Suite {
    name: "HTTPRequestRedirectFilter.port (spec: the listener's port)",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: redirect-service-port, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /no-port}}]
      filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: redirect-service-port-alt, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 8080}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /no-port}}]
      filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]
"#,
    cases: &[
        case(
            "port 80, left out, though Host names another",
            Req {
                via: "echo",
                ..get("echo:9999", "/no-port")
            },
            redirect(302, "http://example.org/no-port"),
        ),
        case(
            "port 8080",
            get("echo:8080", "/no-port"),
            redirect(302, "http://example.org:8080/no-port"),
        ),
    ],
};

/// `replacePrefixMatch: ""` removes the matched prefix.
const EMPTY_PREFIX_REPLACEMENT: Suite = Suite {
    name: "HTTPPathModifier (spec: replacePrefixMatch \"\")",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: empty-prefix, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /strip}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: ""}}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /gone}}]
      filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: ""}}}]
"#,
    cases: &[
        case(
            "rewrite: the rest of the path stays",
            echo("/strip/three"),
            Want {
                path: Some("/three"),
                ..ok("echo-v1")
            },
        ),
        case(
            "rewrite: nothing left is /",
            echo("/strip"),
            Want {
                path: Some("/"),
                ..ok("echo-v1")
            },
        ),
        case("redirect", echo("/gone/x"), redirect(302, "http://echo/x")),
    ],
};

/// Mirrors copy bodies of any size (a large one here).
const MIRROR_LARGE_BODY: Suite = Suite {
    name: "HTTPRouteRequestMirror (large body)",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirror-bodies, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /echo}}]
      filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 8080}}}]
      backendRefs: [{name: echo-v1, port: 8080}]
"#,
    cases: &[
        case(
            "a small body",
            Req {
                body_len: 1000,
                ..method("POST", "/echo")
            },
            Want {
                mirrored: &[("echo-v2", 1.0)],
                ..ok("echo-v1")
            },
        ),
        case(
            "a body of 200 KB",
            Req {
                body_len: 200_000,
                ..method("POST", "/echo")
            },
            Want {
                mirrored: &[("echo-v2", 1.0)],
                ..ok("echo-v1")
            },
        ),
    ],
};

const HTTPROUTE_CORS: Suite = Suite {
    name: "HTTPRouteCORS",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cors, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /cors}}]
      filters:
        - type: CORS
          cors:
            allowOrigins: ["https://www.foo.com", "https://*.bar.com"]
            allowMethods: [GET, OPTIONS]
            allowHeaders: [x-header-1, x-header-2]
            exposeHeaders: [x-header-3]
            allowCredentials: true
            maxAge: 3600
      backendRefs: [{name: echo-v1, port: 8080}]
"#,
    cases: &[
        case(
            "preflight from an allowed origin",
            Req {
                headers: &[
                    ("origin", "https://www.foo.com"),
                    ("access-control-request-method", "GET"),
                ],
                ..method("OPTIONS", "/cors")
            },
            Want {
                resp_headers: &[
                    ("access-control-allow-origin", "https://www.foo.com"),
                    ("access-control-allow-credentials", "true"),
                    ("access-control-max-age", "3600"),
                ],
                ..status(0)
            },
        ),
        case(
            "preflight from an origin matching a wildcard",
            Req {
                headers: &[
                    ("origin", "https://a.bar.com"),
                    ("access-control-request-method", "GET"),
                ],
                ..method("OPTIONS", "/cors")
            },
            Want {
                resp_headers: &[("access-control-allow-origin", "https://a.bar.com")],
                ..status(0)
            },
        ),
        case(
            "preflight from another origin",
            Req {
                headers: &[
                    ("origin", "https://evil.example"),
                    ("access-control-request-method", "GET"),
                ],
                ..method("OPTIONS", "/cors")
            },
            Want {
                resp_absent: &["access-control-allow-origin"],
                ..status(0)
            },
        ),
        case(
            "a simple request from an allowed origin",
            Req {
                headers: &[("origin", "https://www.foo.com")],
                ..echo("/cors")
            },
            Want {
                resp_headers: &[
                    ("access-control-allow-origin", "https://www.foo.com"),
                    ("access-control-expose-headers", "x-header-3"),
                ],
                ..ok("echo-v1")
            },
        ),
    ],
};

/// Configs the spec does not allow, or that Trellis does not support: refused whole, with
/// an error naming the field.
const REFUSED_BY_FILTERS: &[(&str, &str, &str)] = &[
    (
        "a RequestRedirect with backendRefs",
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: redirect-and-forward, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]
      backendRefs: [{name: echo-v1, port: 80}]
"#,
        "spec.rules[0]",
    ),
    (
        "a redirect to port 0",
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: redirect-port-zero, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - filters: [{type: RequestRedirect, requestRedirect: {port: 0}}]
"#,
        "requestRedirect.port",
    ),
    (
        "a redirect to a hostname that is not one",
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: redirect-bad-host, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - filters: [{type: RequestRedirect, requestRedirect: {hostname: "not a host/"}}]
"#,
        "requestRedirect.hostname",
    ),
];

/// Checks that each config is refused with an error naming `field`.
async fn refused(list: &[(&str, &str, &str)]) {
    let world = World::start().await;
    let mut failures = Vec::new();
    for (name, routes, field) in list {
        match world.proxy("mesh", routes).await {
            Ok(_) => failures.push(format!("{name}: accepted")),
            Err(e) if !e.contains(field) => failures.push(format!(
                "{name}: refused, but the error does not name {field}: {e}"
            )),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn filters_spec_behaviour() {
    run(&[
        &REDIRECT_SERVICE_PORT,
        &EMPTY_PREFIX_REPLACEMENT,
        &MIRROR_LARGE_BODY,
        &HTTPROUTE_CORS,
    ])
    .await;
}

#[tokio::test]
async fn filters_refused_configs() {
    refused(REFUSED_BY_FILTERS).await;
}

/// A backendRef to a Service that does not exist: the route is accepted and that backend's
/// share of requests gets 500.
const MISSING_BACKEND: Suite = Suite {
    name: "HTTPRouteInvalidNonExistentBackendRef",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: missing-backend, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /gone}}]
      backendRefs: [{name: no-such-service, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /half}}]
      backendRefs: [{name: echo-v1, port: 80}, {name: no-such-service, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /fine}}]
      backendRefs: [{name: echo-v1, port: 80}]
"#,
    cases: &[
        case(
            "all to the missing Service: 500",
            echo("/gone"),
            status(500),
        ),
        case(
            "half to it: half 500",
            Req {
                repeat: 400,
                ..echo("/half")
            },
            Want {
                split: &[("echo-v1", 0.5), ("500", 0.5)],
                ..status(200)
            },
        ),
        case("the route's other rules work", echo("/fine"), ok("echo-v1")),
    ],
};

#[tokio::test]
async fn missing_backend() {
    run(&[&MISSING_BACKEND]).await;
}
