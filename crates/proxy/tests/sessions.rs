//! Session persistence (`sessionPersistence` on route rules) against real upstreams on
//! loopback: clients that keep the token stick to one endpoint, move when it dies and stick
//! to the new one; clients without it are balanced.

mod support;

use http::Request;
use http_body_util::Full;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use support::*;

/// A proxy to service `app` at `endpoints`, with one HTTPRoute rule carrying `session`
/// (a `sessionPersistence` value).
async fn proxy(endpoints: &[SocketAddr], session: &str) -> (TestProxy, SocketAddr) {
    let yaml = format!(
        "{}{}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r}}
spec:
  parentRefs: [{{kind: Service, name: app}}]
  rules:
    - backendRefs: [{{name: app, port: 80}}]
      sessionPersistence: {session}
",
        proxy_yaml("app"),
        service_yaml("app", 80, endpoints),
    );
    let p = start_proxy(&yaml).await;
    let addr = p.addr("out").await;
    (p, addr)
}

/// A client that keeps the session token it is given: a cookie (`Set-Cookie`, sent back as
/// `Cookie`) or a header (copied from the response into the next request).
struct Client {
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<bytes::Bytes>,
    >,
    addr: SocketAddr,
    /// `Some(name)`: header-based; `None`: cookies.
    header: Option<&'static str>,
    token: Option<String>,
    /// Responses that handed out a token.
    issued: usize,
}

impl Client {
    fn new(addr: SocketAddr, header: Option<&'static str>) -> Client {
        Client {
            http: h1_client(),
            addr,
            header,
            token: None,
            issued: 0,
        }
    }

    /// One GET; returns the upstream that answered.
    async fn get(&mut self) -> String {
        let mut req = Request::get(format!("http://{}/", self.addr));
        if let Some(t) = &self.token {
            req = match self.header {
                Some(name) => req.header(name, t),
                None => req.header("cookie", format!("theme=dark; {t}")),
            };
        }
        let got = send(&self.http, req.body(Full::default()).unwrap()).await;
        assert_eq!(got.status, 200);
        let given = match self.header {
            Some(name) => got
                .headers
                .get(name)
                .map(|v| v.to_str().unwrap().to_string()),
            None => got.headers.get("set-cookie").map(|v| {
                let v = v.to_str().unwrap();
                assert!(v.contains("; Path=/"), "{v}");
                v.split(';').next().unwrap().to_string()
            }),
        };
        if let Some(t) = given {
            self.token = Some(t);
            self.issued += 1;
        }
        got.upstream()
    }

    /// `n` GETs; asserts they all reached one upstream, and returns it.
    async fn stuck(&mut self, n: usize) -> String {
        let first = self.get().await;
        for i in 1..n {
            assert_eq!(
                self.get().await,
                first,
                "request {i} left the session's endpoint"
            );
        }
        first
    }
}

async fn three() -> Vec<Stoppable> {
    vec![
        Stoppable::start("a").await,
        Stoppable::start("b").await,
        Stoppable::start("c").await,
    ]
}

/// Sticks for 50 requests, then the endpoint dies: the client moves once and sticks again.
async fn stick_move_stick(header: Option<&'static str>, session: &str) {
    let mut ups = three().await;
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    let (p, addr) = proxy(&addrs, session).await;
    let mut client = Client::new(addr, header);
    let home = client.stuck(50).await;
    assert_eq!(client.issued, 1, "a token on the first response only");
    let dead = ups.iter_mut().find(|u| u.name == home).unwrap();
    dead.stop().await;
    let moved = client.stuck(50).await;
    assert_ne!(moved, home);
    assert_eq!(client.issued, 2, "one new token when the session moved");
    let count = |outcome: &str| {
        p.metric(&format!(
            "trellis_sessions_total{{route=\"default/r/0\",outcome=\"{outcome}\"}}"
        ))
    };
    assert_eq!(
        [count("new"), count("resumed"), count("moved")],
        [1.0, 98.0, 1.0]
    );
}

#[tokio::test]
async fn a_cookie_session_sticks_and_moves_when_its_endpoint_dies() {
    stick_move_stick(None, "{sessionName: sid}").await;
}

#[tokio::test]
async fn a_header_session_sticks_and_moves_when_its_endpoint_dies() {
    stick_move_stick(Some("x-session"), "{type: Header, sessionName: x-session}").await;
}

#[tokio::test]
async fn clients_without_a_token_are_balanced_and_each_gets_one() {
    let ups = three().await;
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    let (_p, addr) = proxy(&addrs, "{sessionName: sid}").await;
    let mut seen = BTreeSet::new();
    for _ in 0..60 {
        let mut fresh = Client::new(addr, None);
        seen.insert(fresh.get().await);
        assert_eq!(fresh.issued, 1);
    }
    assert_eq!(seen.len(), 3, "60 new sessions all went to {seen:?}");
}

#[tokio::test]
async fn a_forged_or_foreign_token_is_balanced_and_replaced() {
    let ups = three().await;
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    let (_p, addr) = proxy(&addrs, "{sessionName: sid}").await;
    let mut seen = BTreeSet::new();
    for i in 0..30 {
        let mut client = Client::new(addr, None);
        // The shape of a real token, but not one this proxy signed.
        client.token = Some(format!("sid={}", format!("{:02x}", i).repeat(41)));
        seen.insert(client.get().await);
        assert_eq!(client.issued, 1, "the forged token was not replaced");
        client.stuck(5).await;
        assert_eq!(client.issued, 1);
    }
    assert!(seen.len() > 1, "forged tokens all went to {seen:?}");
}

#[tokio::test]
async fn a_session_keeps_its_backend_across_a_traffic_split() {
    let v1 = upstream("v1").await;
    let v2 = upstream("v2").await;
    let yaml = format!(
        "{}{}{}{}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r}}
spec:
  parentRefs: [{{kind: Service, name: app}}]
  rules:
    - backendRefs: [{{name: app-v1, port: 80, weight: 50}}, {{name: app-v2, port: 80, weight: 50}}]
      sessionPersistence: {{sessionName: sid}}
",
        proxy_yaml("app"),
        service_yaml("app", 80, &[v1.addr]),
        service_yaml("app-v1", 80, &[v1.addr]),
        service_yaml("app-v2", 80, &[v2.addr]),
    );
    let p = start_proxy(&yaml).await;
    let addr = p.addr("out").await;
    let mut homes = BTreeSet::new();
    for _ in 0..20 {
        let mut client = Client::new(addr, None);
        homes.insert(client.stuck(10).await);
    }
    // Both backends took sessions (the weights), and each session stayed on its own.
    assert_eq!(homes.len(), 2, "{homes:?}");
}
