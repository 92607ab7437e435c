//! `conformance/tests/mesh`: the GAMMA cases.

use crate::harness::*;

const MESH_BASIC: Suite = Suite {
    name: "MeshBasic",
    routes: "",
    cases: &[
        case(
            "HTTP reaches a Service that has no route",
            echo("/"),
            ok("echo"),
        ),
        case(
            "gRPC reaches a Service that has no route",
            grpc("/conformance.Echo/Echo"),
            ok("echo"),
        ),
    ],
};

const MESH_SIMPLE_SAME_NAMESPACE: Suite = Suite {
    name: "MeshHTTPRouteSimpleSameNamespace",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: all-to-v1, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - backendRefs: [{name: echo-v1, port: 8080}]
"#,
    cases: &[
        case(
            "the route sends everything to echo-v1",
            echo("/"),
            ok("echo-v1"),
        ),
        case(
            "another port of the parent is not governed by it",
            get("echo:8080", "/"),
            ok("echo"),
        ),
    ],
};

const MESH_HTTPROUTE_MATCHING: Suite = Suite {
    name: "MeshHTTPRouteMatching",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: by-path-or-version, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /}}, {headers: [{name: version, value: one}]}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /v2}}, {headers: [{name: version, value: two}]}]
      backendRefs: [{name: echo-v2, port: 8080}]
"#,
    cases: &[
        case("the root prefix", echo("/"), ok("echo-v1")),
        case("under the root prefix", echo("/example"), ok("echo-v1")),
        case(
            "version one",
            Req {
                headers: &[("Version", "one")],
                ..echo("/")
            },
            ok("echo-v1"),
        ),
        case("the /v2 prefix", echo("/v2"), ok("echo-v2")),
        case("under /v2", echo("/v2/example"), ok("echo-v2")),
        case(
            "version two wins over the root prefix",
            Req {
                headers: &[("Version", "two")],
                ..echo("/")
            },
            ok("echo-v2"),
        ),
        case("/v2 with a trailing slash", echo("/v2/"), ok("echo-v2")),
        case(
            "a prefix matches whole path segments only",
            echo("/v2example"),
            ok("echo-v1"),
        ),
        case(
            "a prefix matches from the start",
            echo("/foo/v2/example"),
            ok("echo-v1"),
        ),
    ],
};

const MESH_HTTPROUTE_QUERY_PARAM_MATCHING: Suite = Suite {
    name: "MeshHTTPRouteQueryParamMatching",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: by-animal, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{queryParams: [{name: animal, value: whale}]}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{queryParams: [{name: animal, value: dolphin}]}]
      backendRefs: [{name: echo-v2, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /path1}, queryParams: [{name: animal, value: whale}]}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{headers: [{name: version, value: one}], queryParams: [{name: animal, value: whale}]}]
      backendRefs: [{name: echo-v2, port: 8080}]
    - matches:
        - {path: {type: PathPrefix, value: /path3}, queryParams: [{name: animal, value: shark}]}
        - path: {type: PathPrefix, value: /path4}
          headers: [{name: version, value: three}]
          queryParams: [{name: animal, value: kraken}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /path5}}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{queryParams: [{name: animal, value: hydra}]}]
      backendRefs: [{name: echo-v2, port: 8080}]
"#,
    cases: &[
        case("whale", echo("/?animal=whale"), ok("echo-v1")),
        case("dolphin", echo("/?animal=dolphin"), ok("echo-v2")),
        case(
            "other parameters do not matter",
            echo("/?animal=whale&otherparam=irrelevant"),
            ok("echo-v1"),
        ),
        case(
            "other parameters do not matter (dolphin)",
            echo("/?animal=dolphin&color=yellow"),
            ok("echo-v2"),
        ),
        case("no animal", echo("/?color=blue"), status(404)),
        case("an animal no rule names", echo("/?animal=dog"), status(404)),
        case(
            "values match whole",
            echo("/?animal=whaledolphin"),
            status(404),
        ),
        case("no query at all", echo("/"), status(404)),
        case(
            "path and parameter together",
            echo("/path1?animal=whale"),
            ok("echo-v1"),
        ),
        case(
            "header and parameter together beat the parameter alone",
            Req {
                headers: &[("version", "one")],
                ..echo("/?animal=whale")
            },
            ok("echo-v2"),
        ),
        case(
            "the first of two ORed matches",
            echo("/path3?animal=shark"),
            ok("echo-v1"),
        ),
        case(
            "the second of two ORed matches",
            Req {
                headers: &[("version", "three")],
                ..echo("/path4?animal=kraken")
            },
            ok("echo-v1"),
        ),
        case(
            "ANDed conditions: the parameter without its path",
            echo("/?animal=shark"),
            status(404),
        ),
        case(
            "ANDed conditions: path and parameter without the header",
            echo("/path4?animal=kraken"),
            status(404),
        ),
        case(
            "a longer path prefix beats a parameter match",
            echo("/path5?animal=hydra"),
            ok("echo-v1"),
        ),
    ],
};

const MESH_HTTPROUTE_NAMED_RULE: Suite = Suite {
    name: "MeshHTTPRouteNamedRule",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: named-rules, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - name: the-named-one
      matches: [{path: {type: PathPrefix, value: /named}}]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /unnamed}}]
      backendRefs: [{name: echo-v2, port: 8080}]
"#,
    cases: &[
        case(
            "a named rule",
            echo("/named"),
            Want {
                path: Some("/named"),
                ..ok("echo-v1")
            },
        ),
        case(
            "an unnamed rule",
            echo("/unnamed"),
            Want {
                path: Some("/unnamed"),
                ..ok("echo-v2")
            },
        ),
    ],
};

const MESH_HTTPROUTE_303_REDIRECT: Suite = Suite {
    name: "MeshHTTPRoute303Redirect",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: see-other, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /redirect}}]
      filters: [{type: RequestRedirect, requestRedirect: {statusCode: 303}}]
"#,
    cases: &[case(
        "303 to the same URL",
        echo("/redirect"),
        redirect(303, "http://echo/redirect"),
    )],
};

const MESH_HTTPROUTE_307_REDIRECT: Suite = Suite {
    name: "MeshHTTPRoute307Redirect",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: temporary, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /temporary}}]
      filters: [{type: RequestRedirect, requestRedirect: {statusCode: 307}}]
"#,
    cases: &[case(
        "307 to the same URL",
        echo("/temporary"),
        redirect(307, "http://echo/temporary"),
    )],
};

const MESH_HTTPROUTE_308_REDIRECT: Suite = Suite {
    name: "MeshHTTPRoute308Redirect",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: permanent, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /permanent}}]
      filters: [{type: RequestRedirect, requestRedirect: {statusCode: 308}}]
"#,
    cases: &[case(
        "308 to the same URL",
        echo("/permanent"),
        redirect(308, "http://echo/permanent"),
    )],
};

const MESH_HTTPROUTE_REDIRECT_HOST_AND_STATUS: Suite = Suite {
    name: "MeshHTTPRouteRedirectHostAndStatus",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-example-org, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /hostname-redirect}}]
      filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]
    - matches: [{path: {type: PathPrefix, value: /host-and-status}}]
      filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, statusCode: 301}}]
"#,
    cases: &[
        case(
            "hostname, 302 by default",
            echo("/hostname-redirect"),
            redirect(302, "http://example.org/hostname-redirect"),
        ),
        case(
            "hostname and 301",
            echo("/host-and-status"),
            redirect(301, "http://example.org/host-and-status"),
        ),
    ],
};

const MESH_HTTPROUTE_REDIRECT_PATH: Suite = Suite {
    name: "MeshHTTPRouteRedirectPath",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: redirect-paths, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /original-prefix}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}
    - matches: [{path: {type: PathPrefix, value: /full}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}}
    - matches: [{path: {type: PathPrefix, value: /path-and-host}}]
      filters:
        - type: RequestRedirect
          requestRedirect:
            hostname: example.org
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}
    - matches: [{path: {type: PathPrefix, value: /path-and-status}}]
      filters:
        - type: RequestRedirect
          requestRedirect:
            statusCode: 301
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}
    - matches: [{path: {type: PathPrefix, value: /full-path-and-host}}]
      filters:
        - type: RequestRedirect
          requestRedirect:
            hostname: example.org
            path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}
    - matches: [{path: {type: PathPrefix, value: /full-path-and-status}}]
      filters:
        - type: RequestRedirect
          requestRedirect:
            statusCode: 301
            path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}
"#,
    cases: &[
        case(
            "prefix replaced, the rest kept",
            echo("/original-prefix/lemon"),
            redirect(302, "http://echo/replacement-prefix/lemon"),
        ),
        case(
            "full path replaced",
            echo("/full/path/original"),
            redirect(302, "http://echo/full-path-replacement"),
        ),
        case(
            "prefix and hostname",
            echo("/path-and-host"),
            redirect(302, "http://example.org/replacement-prefix"),
        ),
        case(
            "prefix and status",
            echo("/path-and-status"),
            redirect(301, "http://echo/replacement-prefix"),
        ),
        case(
            "full path and hostname",
            echo("/full-path-and-host"),
            redirect(302, "http://example.org/replacement-full"),
        ),
        case(
            "full path and status",
            echo("/full-path-and-status"),
            redirect(301, "http://echo/replacement-full"),
        ),
    ],
};

const MESH_HTTPROUTE_REDIRECT_PORT: Suite = Suite {
    name: "MeshHTTPRouteRedirectPort",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: redirect-ports, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /port}}]
      filters: [{type: RequestRedirect, requestRedirect: {port: 8083}}]
    - matches: [{path: {type: PathPrefix, value: /port-and-host}}]
      filters: [{type: RequestRedirect, requestRedirect: {port: 8083, hostname: example.org}}]
    - matches: [{path: {type: PathPrefix, value: /port-and-status}}]
      filters: [{type: RequestRedirect, requestRedirect: {port: 8083, statusCode: 301}}]
    - matches: [{path: {type: PathPrefix, value: /port-and-host-and-status}}]
      filters: [{type: RequestRedirect, requestRedirect: {port: 8083, hostname: example.org, statusCode: 302}}]
"#,
    cases: &[
        case(
            "port",
            echo("/port"),
            redirect(302, "http://echo:8083/port"),
        ),
        case(
            "port and hostname",
            echo("/port-and-host"),
            redirect(302, "http://example.org:8083/port-and-host"),
        ),
        case(
            "port and status",
            echo("/port-and-status"),
            redirect(301, "http://echo:8083/port-and-status"),
        ),
        case(
            "port, hostname and status",
            echo("/port-and-host-and-status"),
            redirect(302, "http://example.org:8083/port-and-host-and-status"),
        ),
    ],
};

const MESH_HTTPROUTE_SCHEME_REDIRECT: Suite = Suite {
    name: "MeshHTTPRouteSchemeRedirect",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: redirect-schemes, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /scheme}}]
      filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]
    - matches: [{path: {type: PathPrefix, value: /scheme-and-host}}]
      filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: example.org}}]
    - matches: [{path: {type: PathPrefix, value: /scheme-and-status}}]
      filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301}}]
    - matches: [{path: {type: PathPrefix, value: /scheme-and-host-and-status}}]
      filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: example.org, statusCode: 302}}]
"#,
    cases: &[
        case(
            "https implies port 443, left out",
            echo("/scheme"),
            redirect(302, "https://echo/scheme"),
        ),
        case(
            "scheme and hostname",
            echo("/scheme-and-host"),
            redirect(302, "https://example.org/scheme-and-host"),
        ),
        case(
            "scheme and status",
            echo("/scheme-and-status"),
            redirect(301, "https://echo/scheme-and-status"),
        ),
        case(
            "scheme, hostname and status",
            echo("/scheme-and-host-and-status"),
            redirect(302, "https://example.org/scheme-and-host-and-status"),
        ),
    ],
};

/// The request header edits every case of both header modifier suites expects.
const REQUEST_HEADER_CASES: &[Case] = &[
    case(
        "set adds a header",
        Req {
            headers: &[("Some-Other-Header", "val")],
            ..echo("/set")
        },
        Want {
            path: Some("/set"),
            headers: &[
                ("Some-Other-Header", "val"),
                ("X-Header-Set", "set-overwrites-values"),
            ],
            ..ok("echo-v1")
        },
    ),
    case(
        "set overwrites a header",
        Req {
            headers: &[
                ("Some-Other-Header", "val"),
                ("X-Header-Set", "some-other-value"),
            ],
            ..echo("/set")
        },
        Want {
            headers: &[
                ("Some-Other-Header", "val"),
                ("X-Header-Set", "set-overwrites-values"),
            ],
            ..ok("echo-v1")
        },
    ),
    case(
        "add adds a header",
        Req {
            headers: &[("Some-Other-Header", "val")],
            ..echo("/add")
        },
        Want {
            path: Some("/add"),
            headers: &[
                ("Some-Other-Header", "val"),
                ("X-Header-Add", "add-appends-values"),
            ],
            ..ok("echo-v1")
        },
    ),
    case(
        "add appends to a header",
        Req {
            headers: &[
                ("Some-Other-Header", "val"),
                ("X-Header-Add", "some-other-value"),
            ],
            ..echo("/add")
        },
        Want {
            headers: &[
                ("Some-Other-Header", "val"),
                ("X-Header-Add", "some-other-value,add-appends-values"),
            ],
            ..ok("echo-v1")
        },
    ),
    case(
        "remove removes a header",
        Req {
            headers: &[("X-Header-Remove", "val")],
            ..echo("/remove")
        },
        Want {
            path: Some("/remove"),
            absent: &["X-Header-Remove"],
            ..ok("echo-v1")
        },
    ),
    case(
        "set, add and remove together",
        Req {
            headers: &[
                ("X-Header-Set-2", "set-val-2"),
                ("X-Header-Add-2", "add-val-2"),
                ("X-Header-Remove-2", "remove-val-2"),
                ("Another-Header", "another-header-val"),
            ],
            ..echo("/multiple")
        },
        Want {
            headers: &[
                ("X-Header-Set-1", "header-set-1"),
                ("X-Header-Set-2", "header-set-2"),
                ("X-Header-Add-1", "header-add-1"),
                ("X-Header-Add-2", "add-val-2,header-add-2"),
                ("X-Header-Add-3", "header-add-3"),
                ("Another-Header", "another-header-val"),
            ],
            absent: &["X-Header-Remove-1", "X-Header-Remove-2"],
            ..ok("echo-v1")
        },
    ),
    case(
        "header names are case-insensitive",
        Req {
            headers: &[
                ("x-header-set", "original-val-set"),
                ("x-header-add", "original-val-add"),
                ("x-header-remove", "original-val-remove"),
                ("Another-Header", "another-header-val"),
            ],
            ..echo("/case-insensitivity")
        },
        Want {
            headers: &[
                ("X-Header-Set", "header-set"),
                ("X-Header-Add", "original-val-add,header-add"),
                ("Another-Header", "another-header-val"),
            ],
            absent: &["X-Header-Remove"],
            ..ok("echo-v1")
        },
    ),
];

const MESH_HTTPROUTE_REQUEST_HEADER_MODIFIER: Suite = Suite {
    name: "MeshHTTPRouteRequestHeaderModifier",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: request-headers, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /set}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}]}
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /add}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {add: [{name: X-Header-Add, value: add-appends-values}]}
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /remove}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {remove: [X-Header-Remove]}
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /multiple}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Header-Set-1, value: header-set-1}, {name: X-Header-Set-2, value: header-set-2}]
            add:
              - {name: X-Header-Add-1, value: header-add-1}
              - {name: X-Header-Add-2, value: header-add-2}
              - {name: X-Header-Add-3, value: header-add-3}
            remove: [X-Header-Remove-1, X-Header-Remove-2]
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /case-insensitivity}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Header-Set, value: header-set}]
            add: [{name: X-Header-Add, value: header-add}]
            remove: [X-Header-Remove]
      backendRefs: [{name: echo-v1, port: 8080}]
"#,
    cases: REQUEST_HEADER_CASES,
};

const MESH_HTTPROUTE_BACKEND_REQUEST_HEADER_MODIFIER: Suite = Suite {
    name: "MeshHTTPRouteBackendRequestHeaderModifier",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-request-headers, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /set}}]
      backendRefs:
        - name: echo-v1
          port: 8080
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}]}
    - matches: [{path: {type: PathPrefix, value: /add}}]
      backendRefs:
        - name: echo-v1
          port: 8080
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {add: [{name: X-Header-Add, value: add-appends-values}]}
    - matches: [{path: {type: PathPrefix, value: /remove}}]
      backendRefs:
        - name: echo-v1
          port: 8080
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {remove: [X-Header-Remove]}
    - matches: [{path: {type: PathPrefix, value: /multiple}}]
      backendRefs:
        - name: echo-v1
          port: 8080
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier:
                set: [{name: X-Header-Set-1, value: header-set-1}, {name: X-Header-Set-2, value: header-set-2}]
                add:
                  - {name: X-Header-Add-1, value: header-add-1}
                  - {name: X-Header-Add-2, value: header-add-2}
                  - {name: X-Header-Add-3, value: header-add-3}
                remove: [X-Header-Remove-1, X-Header-Remove-2]
    - matches: [{path: {type: PathPrefix, value: /case-insensitivity}}]
      backendRefs:
        - name: echo-v1
          port: 8080
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier:
                set: [{name: X-Header-Set, value: header-set}]
                add: [{name: X-Header-Add, value: header-add}]
                remove: [X-Header-Remove]
"#,
    cases: REQUEST_HEADER_CASES,
};

const MESH_HTTPROUTE_REWRITE_PATH: Suite = Suite {
    name: "MeshHTTPRouteRewritePath",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: rewrite-paths, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /prefix/one}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /strip-prefix}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /full/one}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /one}}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /full/rewrite-path-and-modify-headers}}]
      filters:
        - {type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /test}}}
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Header-Set, value: set-overwrites-values}]
            add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]
            remove: [X-Header-Remove]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /prefix/rewrite-path-and-modify-headers}}]
      filters:
        - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /prefix}}}
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: X-Header-Set, value: set-overwrites-values}]
            add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]
            remove: [X-Header-Remove]
      backendRefs: [{name: echo-v1, port: 80}]
"#,
    cases: &[
        case(
            "prefix replaced",
            echo("/prefix/one/two"),
            Want {
                path: Some("/one/two"),
                ..ok("echo-v1")
            },
        ),
        case(
            "prefix stripped",
            echo("/strip-prefix/three"),
            Want {
                path: Some("/three"),
                ..ok("echo-v1")
            },
        ),
        case(
            "prefix stripped to the root",
            echo("/strip-prefix"),
            Want {
                path: Some("/"),
                ..ok("echo-v1")
            },
        ),
        case(
            "full path replaced",
            echo("/full/one/two"),
            Want {
                path: Some("/one"),
                ..ok("echo-v1")
            },
        ),
        case(
            "full path replaced, headers edited",
            Req {
                headers: HEADERS_TO_MODIFY,
                ..echo("/full/rewrite-path-and-modify-headers/test")
            },
            Want {
                path: Some("/test"),
                headers: REWRITTEN_HEADERS,
                absent: &["X-Header-Remove"],
                ..ok("echo-v1")
            },
        ),
        case(
            "prefix replaced, headers edited",
            Req {
                headers: HEADERS_TO_MODIFY,
                ..echo("/prefix/rewrite-path-and-modify-headers/one")
            },
            Want {
                path: Some("/prefix/one"),
                headers: REWRITTEN_HEADERS,
                absent: &["X-Header-Remove"],
                ..ok("echo-v1")
            },
        ),
    ],
};

const MESH_HTTPROUTE_WEIGHT: Suite = Suite {
    name: "MeshHTTPRouteWeight",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: seventy-thirty, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - backendRefs:
        - {name: echo-v1, port: 8080, weight: 70}
        - {name: echo-v2, port: 8080, weight: 30}
"#,
    cases: &[case(
        "70/30 over 1000 requests",
        Req {
            repeat: 1000,
            ..echo("/")
        },
        Want {
            split: &[("echo-v1", 0.7), ("echo-v2", 0.3)],
            ..status(200)
        },
    )],
};

const MESH_GRPCROUTE_WEIGHT: Suite = Suite {
    name: "MeshGRPCRouteWeight",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-seventy-thirty, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 7070}]
  rules:
    - backendRefs:
        - {name: echo-v1, port: 7070, weight: 70}
        - {name: echo-v2, port: 7070, weight: 30}
        - {name: echo-v3, port: 7070, weight: 0}
"#,
    cases: &[case(
        "70/30/0 over 600 calls",
        Req {
            repeat: 600,
            ..grpc("/conformance.Echo/Echo")
        },
        Want {
            split: &[("echo-v1", 0.7), ("echo-v2", 0.3)],
            ..status(200)
        },
    )],
};

const MESH_GRPCROUTE_REQUEST_HEADER_MODIFIER: Suite = Suite {
    name: "MeshGRPCRouteRequestHeaderModifier",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-request-headers, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 7070}]
  rules:
    - matches: [{headers: [{name: x-test-case, value: set}]}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-header-set, value: set-overwrites-values}]}
      backendRefs: [{name: echo-v1, port: 7070}]
    - matches: [{headers: [{name: x-test-case, value: add}]}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {add: [{name: x-header-add, value: add-appends-values}]}
      backendRefs: [{name: echo-v1, port: 7070}]
    - matches: [{headers: [{name: x-test-case, value: remove}]}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {remove: [x-header-remove]}
      backendRefs: [{name: echo-v1, port: 7070}]
    - matches: [{headers: [{name: x-test-case, value: multi}]}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-header-set-1, value: header-set-1}, {name: x-header-set-2, value: header-set-2}]
            add: [{name: x-header-add-1, value: header-add-1}, {name: x-header-add-2, value: header-add-2}]
            remove: [x-header-remove-1, x-header-remove-2]
      backendRefs: [{name: echo-v2, port: 7070}]
"#,
    cases: &[
        case(
            "set overwrites",
            Req {
                headers: &[
                    ("x-test-case", "set"),
                    ("some-other-header", "this-header-should-be-set"),
                    ("x-header-set", "this-value-should-be-overwritten"),
                ],
                ..grpc("/conformance.Echo/Echo")
            },
            Want {
                headers: &[
                    ("x-test-case", "set"),
                    ("some-other-header", "this-header-should-be-set"),
                    ("x-header-set", "set-overwrites-values"),
                ],
                ..ok("echo-v1")
            },
        ),
        case(
            "add appends",
            Req {
                headers: &[
                    ("x-test-case", "add"),
                    ("x-header-add", "this-value-should-be-appended"),
                ],
                ..grpc("/conformance.Echo/Echo")
            },
            Want {
                headers: &[
                    ("x-test-case", "add"),
                    (
                        "x-header-add",
                        "this-value-should-be-appended,add-appends-values",
                    ),
                ],
                ..ok("echo-v1")
            },
        ),
        case(
            "remove removes",
            Req {
                headers: &[
                    ("x-test-case", "remove"),
                    ("x-header-remove", "this-should-be-removed"),
                ],
                ..grpc("/conformance.Echo/Echo")
            },
            Want {
                headers: &[("x-test-case", "remove")],
                absent: &["x-header-remove"],
                ..ok("echo-v1")
            },
        ),
        case(
            "set, add and remove together",
            Req {
                headers: &[
                    ("x-test-case", "multi"),
                    ("x-header-set-2", "set-header-2"),
                    ("x-header-add-2", "add-header-2"),
                    ("x-header-remove-2", "should-be-removed-2"),
                ],
                ..grpc("/conformance.Echo/Echo")
            },
            Want {
                headers: &[
                    ("x-test-case", "multi"),
                    ("x-header-set-1", "header-set-1"),
                    ("x-header-set-2", "header-set-2"),
                    ("x-header-add-1", "header-add-1"),
                    ("x-header-add-2", "add-header-2,header-add-2"),
                ],
                absent: &["x-header-remove-1", "x-header-remove-2"],
                ..ok("echo-v2")
            },
        ),
    ],
};

const MESH_TRAFFIC_SPLIT: Suite = Suite {
    name: "MeshTrafficSplit",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split-by-path, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
    - matches: [{path: {type: Exact, value: /v1}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: Exact, value: /v2}}]
      backendRefs: [{name: echo-v2, port: 80}]
"#,
    cases: &[
        case("/v1 to echo-v1", echo("/v1"), ok("echo-v1")),
        case("/v2 to echo-v2", echo("/v2"), ok("echo-v2")),
        case(
            "a parentRef without a port governs every port",
            get("echo:8080", "/v2"),
            ok("echo-v2"),
        ),
        case(
            "a request no rule matches gets 404",
            echo("/v3"),
            status(404),
        ),
    ],
};

const MESH_PORTS: Suite = Suite {
    name: "MeshPorts",
    routes: r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: v1-port-80, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-v1, port: 80}]
  rules:
    - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Header-Set, value: v1}]}}]
      backendRefs: [{name: echo-v1, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: v2-every-port, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-v2}]
  rules:
    - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Header-Set, value: v2}]}}]
      backendRefs: [{name: echo-v2, port: 80}]
"#,
    cases: &[
        case(
            "the port the route names",
            get("echo-v1", "/"),
            Want {
                resp_headers: &[("X-Header-Set", "v1")],
                ..ok("echo-v1")
            },
        ),
        case(
            "a port the route does not name",
            get("echo-v1:8080", "/"),
            Want {
                resp_absent: &["X-Header-Set"],
                ..ok("echo-v1")
            },
        ),
        case(
            "no port named: port 80",
            get("echo-v2", "/"),
            Want {
                resp_headers: &[("X-Header-Set", "v2")],
                ..ok("echo-v2")
            },
        ),
        case(
            "no port named: port 8080",
            get("echo-v2:8080", "/"),
            Want {
                resp_headers: &[("X-Header-Set", "v2")],
                ..ok("echo-v2")
            },
        ),
    ],
};

const FRONTEND_ROUTES: &str = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: v2-frontend, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-v2}]
  rules:
    - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Header-Set, value: set}]}}]
      backendRefs: [{name: echo-v2, port: 80}]
"#;

const MESH_FRONTEND: Suite = Suite {
    name: "MeshFrontend",
    routes: FRONTEND_ROUTES,
    cases: &[
        case(
            "by the Service's name",
            get("echo-v2", "/"),
            Want {
                resp_headers: &[("X-Header-Set", "set")],
                ..ok("echo-v2")
            },
        ),
        case(
            "by the Service's address (its explicit upstream listener)",
            Req {
                via: "echo-v2",
                ..get("", "/")
            },
            Want {
                resp_headers: &[("X-Header-Set", "set")],
                ..ok("echo-v2")
            },
        ),
    ],
};

const MESH_FRONTEND_HOSTNAME: Suite = Suite {
    name: "MeshFrontendHostname",
    routes: FRONTEND_ROUTES,
    cases: &[
        case(
            "the address decides, not a Host naming another Service",
            Req {
                via: "echo-v2",
                ..get("echo-v1", "/")
            },
            Want {
                resp_headers: &[("X-Header-Set", "set")],
                ..ok("echo-v2")
            },
        ),
        case(
            "a Host naming the routed Service does not pull the request to it",
            Req {
                via: "echo-v1",
                ..get("echo-v2", "/")
            },
            Want {
                resp_absent: &["X-Header-Set"],
                ..ok("echo-v1")
            },
        ),
    ],
};

#[tokio::test]
async fn mesh_basic() {
    run(&[&MESH_BASIC]).await;
}

#[tokio::test]
async fn mesh_httproute_simple_same_namespace() {
    run(&[&MESH_SIMPLE_SAME_NAMESPACE]).await;
}

#[tokio::test]
async fn mesh_httproute_matching() {
    run(&[&MESH_HTTPROUTE_MATCHING]).await;
}

#[tokio::test]
async fn mesh_httproute_query_param_matching() {
    run(&[&MESH_HTTPROUTE_QUERY_PARAM_MATCHING]).await;
}

#[tokio::test]
async fn mesh_httproute_named_rule() {
    run(&[&MESH_HTTPROUTE_NAMED_RULE]).await;
}

#[tokio::test]
async fn mesh_httproute_redirects() {
    run(&[
        &MESH_HTTPROUTE_303_REDIRECT,
        &MESH_HTTPROUTE_307_REDIRECT,
        &MESH_HTTPROUTE_308_REDIRECT,
        &MESH_HTTPROUTE_REDIRECT_HOST_AND_STATUS,
        &MESH_HTTPROUTE_REDIRECT_PATH,
        &MESH_HTTPROUTE_REDIRECT_PORT,
        &MESH_HTTPROUTE_SCHEME_REDIRECT,
    ])
    .await;
}

#[tokio::test]
async fn mesh_httproute_request_header_modifier() {
    run(&[&MESH_HTTPROUTE_REQUEST_HEADER_MODIFIER]).await;
}

#[tokio::test]
async fn mesh_httproute_backend_request_header_modifier() {
    run(&[&MESH_HTTPROUTE_BACKEND_REQUEST_HEADER_MODIFIER]).await;
}

#[tokio::test]
async fn mesh_httproute_rewrite_path() {
    run(&[&MESH_HTTPROUTE_REWRITE_PATH]).await;
}

#[tokio::test]
async fn mesh_weights() {
    run(&[&MESH_HTTPROUTE_WEIGHT, &MESH_GRPCROUTE_WEIGHT]).await;
}

#[tokio::test]
async fn mesh_grpcroute_request_header_modifier() {
    run(&[&MESH_GRPCROUTE_REQUEST_HEADER_MODIFIER]).await;
}

#[tokio::test]
async fn mesh_traffic_split() {
    run(&[&MESH_TRAFFIC_SPLIT]).await;
}

#[tokio::test]
async fn mesh_ports() {
    run(&[&MESH_PORTS]).await;
}

#[tokio::test]
async fn mesh_frontend() {
    run(&[&MESH_FRONTEND, &MESH_FRONTEND_HOSTNAME]).await;
}
