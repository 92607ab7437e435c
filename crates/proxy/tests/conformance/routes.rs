//! HTTPRoute and GRPCRoute cases of `conformance/tests` written for a Gateway, with the
//! route attached to Service `echo` instead: the behaviour they check is the route's.

use crate::harness::*;

const HTTPROUTE_EXACT_PATH_MATCHING: Suite = Suite {
    name: "HTTPRouteExactPathMatching",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: exact-paths, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: Exact, value: /one}}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: Exact, value: /two}}]
      backendRefs: [{name: echo-v2, port: 8080}]
"#,
    cases: &[
        case("/one", echo("/one"), ok("echo-v1")),
        case("/two", echo("/two"), ok("echo-v2")),
        case("the root is not /one", echo("/"), status(404)),
        case("exact is not a prefix", echo("/one/example"), status(404)),
        case("a trailing slash differs", echo("/two/"), status(404)),
        case("paths are case-sensitive", echo("/Two"), status(404)),
    ],
};

const HTTPROUTE_PATH_MATCH_ORDER: Suite = Suite {
    name: "HTTPRoutePathMatchOrder",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: path-order, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: Exact, value: /match}}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: Exact, value: /match/exact}}]
      backendRefs: [{name: echo-v2, port: 8080}]
    - matches: [{path: {type: Exact, value: /match/exact/one}}]
      backendRefs: [{name: echo-v3, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /match/}}]
      backendRefs: [{name: echo-v3, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /match/prefix/}}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /match/prefix/one}}]
      backendRefs: [{name: echo-v2, port: 8080}]
"#,
    cases: &[
        case(
            "the longest exact path",
            echo("/match/exact/one"),
            ok("echo-v3"),
        ),
        case("an exact path", echo("/match/exact"), ok("echo-v2")),
        case(
            "exact beats a prefix that also matches",
            echo("/match"),
            ok("echo-v1"),
        ),
        case(
            "the longest prefix",
            echo("/match/prefix/one/any"),
            ok("echo-v2"),
        ),
        case("a longer prefix", echo("/match/prefix/any"), ok("echo-v1")),
        case("the shortest prefix", echo("/match/any"), ok("echo-v3")),
    ],
};

const HTTPROUTE_HEADER_MATCHING: Suite = Suite {
    name: "HTTPRouteHeaderMatching",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: by-headers, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{headers: [{name: version, value: one}]}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{headers: [{name: version, value: two}]}]
      backendRefs: [{name: echo-v2, port: 8080}]
    - matches: [{headers: [{name: version, value: two}, {name: color, value: orange}]}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{headers: [{name: color, value: blue}]}, {headers: [{name: color, value: green}]}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{headers: [{name: color, value: red}]}, {headers: [{name: color, value: yellow}]}]
      backendRefs: [{name: echo-v2, port: 8080}]
"#,
    cases: &[
        case(
            "version one",
            Req {
                headers: &[("Version", "one")],
                ..echo("/")
            },
            ok("echo-v1"),
        ),
        case(
            "version two",
            Req {
                headers: &[("Version", "two")],
                ..echo("/")
            },
            ok("echo-v2"),
        ),
        case(
            "more header matches win",
            Req {
                headers: &[("Version", "two"), ("Color", "orange")],
                ..echo("/")
            },
            ok("echo-v1"),
        ),
        case(
            "a tie goes to the earlier rule",
            Req {
                headers: &[("Version", "two"), ("Color", "blue")],
                ..echo("/")
            },
            ok("echo-v2"),
        ),
        case(
            "half of an ANDed match",
            Req {
                headers: &[("Color", "orange")],
                ..echo("/")
            },
            status(404),
        ),
        case(
            "a header no rule names",
            Req {
                headers: &[("Some-Other-Header", "one")],
                ..echo("/")
            },
            status(404),
        ),
        case(
            "blue, first of two ORed matches",
            Req {
                headers: &[("Color", "blue")],
                ..echo("/")
            },
            ok("echo-v1"),
        ),
        case(
            "green, second of two ORed matches",
            Req {
                headers: &[("Color", "green")],
                ..echo("/")
            },
            ok("echo-v1"),
        ),
        case(
            "red",
            Req {
                headers: &[("Color", "red")],
                ..echo("/")
            },
            ok("echo-v2"),
        ),
        case(
            "yellow",
            Req {
                headers: &[("Color", "yellow")],
                ..echo("/")
            },
            ok("echo-v2"),
        ),
        case(
            "a value no rule names",
            Req {
                headers: &[("Color", "purple")],
                ..echo("/")
            },
            status(404),
        ),
    ],
};

const HTTPROUTE_METHOD_MATCHING: Suite = Suite {
    name: "HTTPRouteMethodMatching",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: by-method, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{method: POST}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{method: GET}]
      backendRefs: [{name: echo-v2, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /path1}, method: GET}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{headers: [{name: version, value: one}], method: PUT}]
      backendRefs: [{name: echo-v2, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /path2}, headers: [{name: version, value: two}], method: POST}]
      backendRefs: [{name: echo-v3, port: 8080}]
    - matches:
        - {path: {type: PathPrefix, value: /path3}, method: PATCH}
        - {path: {type: PathPrefix, value: /path4}, headers: [{name: version, value: three}], method: DELETE}
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /path5}}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{method: PATCH}]
      backendRefs: [{name: echo-v2, port: 8080}]
    - matches: [{headers: [{name: version, value: four}]}]
      backendRefs: [{name: echo-v3, port: 8080}]
"#,
    cases: &[
        case("POST", method("POST", "/"), ok("echo-v1")),
        case("GET", method("GET", "/"), ok("echo-v2")),
        case("a method no rule names", method("HEAD", "/"), status(404)),
        case("path and method", method("GET", "/path1"), ok("echo-v1")),
        case(
            "header and method",
            Req {
                headers: &[("version", "one")],
                ..method("PUT", "/")
            },
            ok("echo-v2"),
        ),
        case(
            "path, header and method",
            Req {
                headers: &[("version", "two")],
                ..method("POST", "/path2")
            },
            ok("echo-v3"),
        ),
        case(
            "the first of two ORed matches",
            method("PATCH", "/path3"),
            ok("echo-v1"),
        ),
        case(
            "the second of two ORed matches",
            Req {
                headers: &[("version", "three")],
                ..method("DELETE", "/path4")
            },
            ok("echo-v1"),
        ),
        case(
            "ANDed conditions: the method without its header",
            method("PUT", "/"),
            status(404),
        ),
        case(
            "ANDed conditions: path and method without the header",
            method("DELETE", "/path4"),
            status(404),
        ),
        case(
            "a longer path prefix beats a method match",
            method("PATCH", "/path5"),
            ok("echo-v1"),
        ),
        case(
            "a method match beats a header match",
            Req {
                headers: &[("version", "four")],
                ..method("PATCH", "/")
            },
            ok("echo-v2"),
        ),
    ],
};

const HTTPROUTE_RESPONSE_HEADER_MODIFIER: Suite = Suite {
    name: "HTTPRouteResponseHeaderModifier",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: response-headers, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /set}}]
      filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}]}
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /add}}]
      filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {add: [{name: X-Header-Add, value: add-appends-values}]}
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /remove}}]
      filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {remove: [X-Header-Remove]}
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /multiple}}]
      filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier:
            set: [{name: X-Header-Set-1, value: header-set-1}, {name: X-Header-Set-2, value: header-set-2}]
            add:
              - {name: X-Header-Add-1, value: header-add-1}
              - {name: X-Header-Add-2, value: header-add-2}
              - {name: X-Header-Add-3, value: header-add-3}
            remove: [X-Header-Remove-1, X-Header-Remove-2]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /case-insensitivity}}]
      filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier:
            set: [{name: X-Header-Set, value: header-set}]
            add:
              - {name: X-Header-Add, value: header-add}
              - {name: x-lowercase-add, value: lowercase-add}
              - {name: x-Mixedcase-ADD-1, value: mixedcase-add-1}
              - {name: X-UPPERCASE-ADD, value: uppercase-add}
            remove: [X-Header-Remove]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /response-and-request-header-modifiers}}]
      filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier:
            set: [{name: X-Header-Set-1, value: header-set-1}]
            add: [{name: X-Header-Add-1, value: header-add-1}]
            remove: [X-Header-Remove-1]
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Header-Set, value: set-overwrites-values}]
            add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]
            remove: [X-Header-Remove]
      backendRefs: [{name: echo-v1, port: 8080}]
"#,
    cases: &[
        case(
            "set adds a header",
            Req {
                backend_sets: &[("Some-Other-Header", "val")],
                ..echo("/set")
            },
            Want {
                resp_headers: &[
                    ("Some-Other-Header", "val"),
                    ("X-Header-Set", "set-overwrites-values"),
                ],
                ..ok("echo-v1")
            },
        ),
        case(
            "set overwrites the backend's header",
            Req {
                backend_sets: &[
                    ("Some-Other-Header", "val"),
                    ("X-Header-Set", "some-other-value"),
                ],
                ..echo("/set")
            },
            Want {
                resp_headers: &[
                    ("Some-Other-Header", "val"),
                    ("X-Header-Set", "set-overwrites-values"),
                ],
                ..ok("echo-v1")
            },
        ),
        case(
            "add adds a header",
            Req {
                backend_sets: &[("Some-Other-Header", "val")],
                ..echo("/add")
            },
            Want {
                resp_headers: &[("X-Header-Add", "add-appends-values")],
                ..ok("echo-v1")
            },
        ),
        case(
            "add appends to the backend's header",
            Req {
                backend_sets: &[("X-Header-Add", "some-other-value")],
                ..echo("/add")
            },
            Want {
                resp_headers: &[("X-Header-Add", "some-other-value,add-appends-values")],
                ..ok("echo-v1")
            },
        ),
        case(
            "remove removes the backend's header",
            Req {
                backend_sets: &[("X-Header-Remove", "val")],
                ..echo("/remove")
            },
            Want {
                resp_absent: &["X-Header-Remove"],
                ..ok("echo-v1")
            },
        ),
        case(
            "set, add and remove together",
            Req {
                backend_sets: &[
                    ("X-Header-Set-2", "set-val-2"),
                    ("X-Header-Add-2", "add-val-2"),
                    ("X-Header-Remove-2", "remove-val-2"),
                    ("Another-Header", "another-header-val"),
                    ("X-Header-Remove-1", "val"),
                ],
                ..echo("/multiple")
            },
            Want {
                resp_headers: &[
                    ("X-Header-Set-1", "header-set-1"),
                    ("X-Header-Set-2", "header-set-2"),
                    ("X-Header-Add-1", "header-add-1"),
                    ("X-Header-Add-2", "add-val-2,header-add-2"),
                    ("X-Header-Add-3", "header-add-3"),
                    ("Another-Header", "another-header-val"),
                ],
                resp_absent: &["X-Header-Remove-1", "X-Header-Remove-2"],
                ..ok("echo-v1")
            },
        ),
        case(
            "header names are case-insensitive",
            Req {
                backend_sets: &[
                    ("x-header-set", "original-val-set"),
                    ("x-header-add", "original-val-add"),
                    ("x-header-remove", "original-val-remove"),
                    ("Another-Header", "another-header-val"),
                ],
                ..echo("/case-insensitivity")
            },
            Want {
                resp_headers: &[
                    ("X-Header-Set", "header-set"),
                    ("X-Header-Add", "original-val-add,header-add"),
                    ("X-Lowercase-Add", "lowercase-add"),
                    ("X-Mixedcase-Add-1", "mixedcase-add-1"),
                    ("X-Uppercase-Add", "uppercase-add"),
                    ("Another-Header", "another-header-val"),
                ],
                resp_absent: &["X-Header-Remove"],
                ..ok("echo-v1")
            },
        ),
        case(
            "request and response edits on one rule",
            Req {
                headers: &[
                    ("X-Header-Remove", "remove-val"),
                    ("X-Header-Add-Append", "append-val-1"),
                ],
                backend_sets: &[
                    ("X-Header-Set-1", "set-val-1"),
                    ("X-Header-Remove-1", "remove-val-1"),
                ],
                ..echo("/response-and-request-header-modifiers")
            },
            Want {
                headers: &[
                    ("X-Header-Add", "header-val-1"),
                    ("X-Header-Set", "set-overwrites-values"),
                    ("X-Header-Add-Append", "append-val-1,header-val-2"),
                ],
                absent: &["X-Header-Remove"],
                resp_headers: &[
                    ("X-Header-Set-1", "header-set-1"),
                    ("X-Header-Add-1", "header-add-1"),
                ],
                resp_absent: &["X-Header-Remove-1"],
                ..ok("echo-v1")
            },
        ),
    ],
};

const HTTPROUTE_REQUEST_HEADER_MODIFIER_BACKEND_WEIGHTS: Suite = Suite {
    name: "HTTPRouteRequestHeaderModifierBackendWeights",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-says-who, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - backendRefs:
        - name: echo-v1
          port: 8080
          weight: 10
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {set: [{name: Backend, value: echo-v1}]}
        - name: echo-v2
          port: 8080
          weight: 10
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {set: [{name: Backend, value: echo-v2}]}
"#,
    cases: &[case(
        "each backend's filter applies only when that backend is chosen",
        Req {
            repeat: 200,
            ..echo("/")
        },
        Want {
            split: &[("echo-v1", 0.5), ("echo-v2", 0.5)],
            names_backend: Some("Backend"),
            ..status(200)
        },
    )],
};

const HTTPROUTE_REWRITE_HOST: Suite = Suite {
    name: "HTTPRouteRewriteHost",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: rewrite-hosts, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /one}}]
      filters: [{type: URLRewrite, urlRewrite: {hostname: one.example.org}}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - filters: [{type: URLRewrite, urlRewrite: {hostname: example.org}}]
      backendRefs: [{name: echo-v2, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /rewrite-host-and-modify-headers}}]
      filters:
        - {type: URLRewrite, urlRewrite: {hostname: test.example.org}}
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Header-Set, value: set-overwrites-values}]
            add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]
            remove: [X-Header-Remove]
      backendRefs: [{name: echo-v2, port: 8080}]
"#,
    cases: &[
        case(
            "host rewritten",
            echo("/one"),
            Want {
                path: Some("/one"),
                host: Some("one.example.org"),
                ..ok("echo-v1")
            },
        ),
        case(
            "host rewritten by the catch-all rule",
            echo("/two"),
            Want {
                path: Some("/two"),
                host: Some("example.org"),
                ..ok("echo-v2")
            },
        ),
        case(
            "host rewritten, headers edited",
            Req {
                headers: HEADERS_TO_MODIFY,
                ..echo("/rewrite-host-and-modify-headers")
            },
            Want {
                path: Some("/rewrite-host-and-modify-headers"),
                host: Some("test.example.org"),
                headers: REWRITTEN_HEADERS,
                absent: &["X-Header-Remove"],
                ..ok("echo-v2")
            },
        ),
    ],
};

const HTTPROUTE_TIMEOUT_REQUEST: Suite = Suite {
    name: "HTTPRouteTimeoutRequest",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: request-timeouts, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /request-timeout}}]
      timeouts: {request: 500ms}
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /disable-request-timeout}}]
      timeouts: {request: 0s}
      backendRefs: [{name: echo-v1, port: 8080}]
"#,
    cases: &[
        case("in time", echo("/request-timeout"), ok("echo-v1")),
        case(
            "too slow: 504",
            Req {
                delay_ms: 1000,
                ..echo("/request-timeout")
            },
            status(504),
        ),
        case(
            "0s disables the timeout",
            Req {
                delay_ms: 1000,
                ..echo("/disable-request-timeout")
            },
            ok("echo-v1"),
        ),
    ],
};

const HTTPROUTE_TIMEOUT_BACKEND_REQUEST: Suite = Suite {
    name: "HTTPRouteTimeoutBackendRequest",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-timeouts, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /backend-timeout}}]
      timeouts: {backendRequest: 500ms}
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /disable-backend-timeout}}]
      timeouts: {backendRequest: 0s}
      backendRefs: [{name: echo-v1, port: 8080}]
"#,
    cases: &[
        case("in time", echo("/backend-timeout"), ok("echo-v1")),
        case(
            "too slow: 504",
            Req {
                delay_ms: 1000,
                ..echo("/backend-timeout")
            },
            status(504),
        ),
        case(
            "0s disables the timeout",
            Req {
                delay_ms: 1000,
                ..echo("/disable-backend-timeout")
            },
            ok("echo-v1"),
        ),
    ],
};

const HTTPROUTE_RETRY: Suite = Suite {
    name: "HTTPRouteRetry",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: retries, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /retry/code-500-attempts-3}}]
      retry: {codes: [500], attempts: 3}
      backendRefs: [{name: echo-v3, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /retry/code-all-attempts-2}}]
      retry: {codes: [500, 502, 503, 504], attempts: 2}
      backendRefs: [{name: echo-v3, port: 8080}]
"#,
    cases: &[
        case(
            "500 twice, then success: within 3 retries",
            Req {
                fail: Some((500, 2)),
                ..echo("/retry/code-500-attempts-3")
            },
            ok("echo-v3"),
        ),
        case(
            "500 four times: more than 3 retries",
            Req {
                fail: Some((500, 4)),
                ..echo("/retry/code-500-attempts-3")
            },
            status(500),
        ),
        case(
            "503 is not a retried code there",
            Req {
                fail: Some((503, 2)),
                ..echo("/retry/code-500-attempts-3")
            },
            status(503),
        ),
        case(
            "500 once, then success: within 2 retries",
            Req {
                fail: Some((500, 1)),
                ..echo("/retry/code-all-attempts-2")
            },
            ok("echo-v3"),
        ),
        case(
            "500 three times: more than 2 retries",
            Req {
                fail: Some((500, 3)),
                ..echo("/retry/code-all-attempts-2")
            },
            status(500),
        ),
        case(
            "502 once, then success",
            Req {
                fail: Some((502, 1)),
                ..echo("/retry/code-all-attempts-2")
            },
            ok("echo-v3"),
        ),
    ],
};

const MIRROR_ROUTES: &str = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirrors, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /mirror}}]
      filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, namespace: mesh, port: 8080}}}]
      backendRefs: [{name: echo-v1, namespace: mesh, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /mirror-and-modify-headers}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Header-Set, value: set-overwrites-values}]
            add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]
            remove: [X-Header-Remove]
        - {type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 8080}}}
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /multi-mirror}}]
      filters:
        - {type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 8080}}}
        - {type: RequestMirror, requestMirror: {backendRef: {name: echo-v3, port: 8080}}}
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /multi-mirror-and-modify-request-headers}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Header-Set, value: set-overwrites-values}]
            add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]
            remove: [X-Header-Remove]
        - {type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 8080}}}
        - {type: RequestMirror, requestMirror: {backendRef: {name: echo-v3, port: 8080}}}
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /percent-mirror}}]
      filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 8080}, percent: 20}}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /percent-mirror-fraction}}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: echo-v2, port: 8080}, fraction: {numerator: 25, denominator: 50}}
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /percent-mirror-and-modify-headers}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Header-Set, value: set-overwrites-values}]
            add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]
            remove: [X-Header-Remove]
        - {type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 8080}, percent: 35}}
      backendRefs: [{name: echo-v1, port: 8080}]
"#;

const HTTPROUTE_REQUEST_MIRROR: Suite = Suite {
    name: "HTTPRouteRequestMirror",
    routes: MIRROR_ROUTES,
    cases: &[
        case(
            "copied to the mirror, answered by the backend",
            echo("/mirror"),
            Want {
                path: Some("/mirror"),
                mirrored: &[("echo-v2", 1.0)],
                ..ok("echo-v1")
            },
        ),
        case(
            "copied, with headers edited",
            Req {
                headers: HEADERS_TO_MODIFY,
                ..echo("/mirror-and-modify-headers")
            },
            Want {
                headers: REWRITTEN_HEADERS,
                absent: &["X-Header-Remove"],
                mirrored: &[("echo-v2", 1.0)],
                ..ok("echo-v1")
            },
        ),
    ],
};

const HTTPROUTE_REQUEST_MULTIPLE_MIRRORS: Suite = Suite {
    name: "HTTPRouteRequestMultipleMirrors",
    routes: MIRROR_ROUTES,
    cases: &[
        case(
            "copied to two mirrors",
            echo("/multi-mirror"),
            Want {
                path: Some("/multi-mirror"),
                mirrored: &[("echo-v2", 1.0), ("echo-v3", 1.0)],
                ..ok("echo-v1")
            },
        ),
        case(
            "copied to two mirrors, with headers edited",
            Req {
                headers: HEADERS_TO_MODIFY,
                ..echo("/multi-mirror-and-modify-request-headers")
            },
            Want {
                headers: REWRITTEN_HEADERS,
                absent: &["X-Header-Remove"],
                mirrored: &[("echo-v2", 1.0), ("echo-v3", 1.0)],
                ..ok("echo-v1")
            },
        ),
    ],
};

const HTTPROUTE_REQUEST_PERCENTAGE_MIRROR: Suite = Suite {
    name: "HTTPRouteRequestPercentageMirror",
    routes: MIRROR_ROUTES,
    cases: &[
        case(
            "percent: 20",
            Req {
                repeat: 400,
                ..echo("/percent-mirror")
            },
            Want {
                mirrored: &[("echo-v2", 0.2)],
                ..ok("echo-v1")
            },
        ),
        case(
            "fraction: 25/50",
            Req {
                repeat: 400,
                ..echo("/percent-mirror-fraction")
            },
            Want {
                mirrored: &[("echo-v2", 0.5)],
                ..ok("echo-v1")
            },
        ),
        case(
            "percent: 35, with headers edited",
            Req {
                repeat: 400,
                headers: HEADERS_TO_MODIFY,
                ..echo("/percent-mirror-and-modify-headers")
            },
            Want {
                headers: REWRITTEN_HEADERS,
                absent: &["X-Header-Remove"],
                mirrored: &[("echo-v2", 0.35)],
                ..ok("echo-v1")
            },
        ),
    ],
};

const GRPCROUTE_EXACT_METHOD_MATCHING: Suite = Suite {
    name: "GRPCRouteExactMethodMatching",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-methods, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 7070}]
  rules:
    - matches: [{method: {service: conformance.Echo, method: Echo}}]
      backendRefs: [{name: echo-v1, port: 7070}]
    - matches: [{method: {service: conformance.Echo, method: EchoTwo}}]
      backendRefs: [{name: echo-v2, port: 7070}]
"#,
    cases: &[
        case("Echo", grpc("/conformance.Echo/Echo"), ok("echo-v1")),
        case("EchoTwo", grpc("/conformance.Echo/EchoTwo"), ok("echo-v2")),
        case(
            "a method no rule names",
            grpc("/conformance.Echo/EchoThree"),
            UNIMPLEMENTED,
        ),
    ],
};

const fn grpc_with(headers: &'static [(&'static str, &'static str)]) -> Req {
    Req {
        headers,
        ..grpc("/conformance.Echo/Echo")
    }
}

const GRPCROUTE_HEADER_MATCHING: Suite = Suite {
    name: "GRPCRouteHeaderMatching",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-by-headers, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 7070}]
  rules:
    - matches: [{headers: [{name: version, value: one}]}]
      backendRefs: [{name: echo-v1, port: 7070}]
    - matches: [{headers: [{name: version, value: two}]}]
      backendRefs: [{name: echo-v2, port: 7070}]
    - matches: [{headers: [{name: version, value: two}, {name: color, value: orange}]}]
      backendRefs: [{name: echo-v1, port: 7070}]
    - matches: [{headers: [{name: color, value: blue}]}, {headers: [{name: color, value: green}]}]
      backendRefs: [{name: echo-v1, port: 7070}]
    - matches: [{headers: [{name: color, value: red}]}, {headers: [{name: color, value: yellow}]}]
      backendRefs: [{name: echo-v2, port: 7070}]
"#,
    cases: &[
        case(
            "version one",
            grpc_with(&[("version", "one")]),
            ok("echo-v1"),
        ),
        case(
            "version two",
            grpc_with(&[("version", "two")]),
            ok("echo-v2"),
        ),
        case(
            "more header matches win",
            grpc_with(&[("version", "two"), ("color", "orange")]),
            ok("echo-v1"),
        ),
        case(
            "a tie goes to the earlier rule",
            grpc_with(&[("version", "two"), ("color", "blue")]),
            ok("echo-v2"),
        ),
        case(
            "half of an ANDed match",
            grpc_with(&[("color", "orange")]),
            UNIMPLEMENTED,
        ),
        case(
            "a header no rule names",
            grpc_with(&[("some-other-header", "one")]),
            UNIMPLEMENTED,
        ),
        case("blue", grpc_with(&[("color", "blue")]), ok("echo-v1")),
        case("green", grpc_with(&[("color", "green")]), ok("echo-v1")),
        case("red", grpc_with(&[("color", "red")]), ok("echo-v2")),
        case("yellow", grpc_with(&[("color", "yellow")]), ok("echo-v2")),
        case(
            "a value no rule names",
            grpc_with(&[("color", "purple")]),
            UNIMPLEMENTED,
        ),
    ],
};

#[tokio::test]
async fn httproute_path_matching() {
    run(&[&HTTPROUTE_EXACT_PATH_MATCHING, &HTTPROUTE_PATH_MATCH_ORDER]).await;
}

#[tokio::test]
async fn httproute_header_matching() {
    run(&[&HTTPROUTE_HEADER_MATCHING]).await;
}

#[tokio::test]
async fn httproute_method_matching() {
    run(&[&HTTPROUTE_METHOD_MATCHING]).await;
}

#[tokio::test]
async fn httproute_response_header_modifier() {
    run(&[&HTTPROUTE_RESPONSE_HEADER_MODIFIER]).await;
}

#[tokio::test]
async fn httproute_request_header_modifier_backend_weights() {
    run(&[&HTTPROUTE_REQUEST_HEADER_MODIFIER_BACKEND_WEIGHTS]).await;
}

#[tokio::test]
async fn httproute_rewrite_host() {
    run(&[&HTTPROUTE_REWRITE_HOST]).await;
}

#[tokio::test]
async fn httproute_timeouts() {
    run(&[
        &HTTPROUTE_TIMEOUT_REQUEST,
        &HTTPROUTE_TIMEOUT_BACKEND_REQUEST,
    ])
    .await;
}

#[tokio::test]
async fn httproute_retry() {
    run(&[&HTTPROUTE_RETRY]).await;
}

#[tokio::test]
async fn httproute_request_mirrors() {
    run(&[
        &HTTPROUTE_REQUEST_MIRROR,
        &HTTPROUTE_REQUEST_MULTIPLE_MIRRORS,
        &HTTPROUTE_REQUEST_PERCENTAGE_MIRROR,
    ])
    .await;
}

#[tokio::test]
async fn grpcroute_matching() {
    run(&[&GRPCROUTE_EXACT_METHOD_MATCHING, &GRPCROUTE_HEADER_MATCHING]).await;
}
