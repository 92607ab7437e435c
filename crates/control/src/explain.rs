//! `POST /v1/explain`: asks the proxies themselves what they would do with a request. The
//! caller's proxy explains its outbound side (route, backend, endpoints, retries, timeouts);
//! when it would forward, a proxy of the destination service explains its inbound side
//! (authorization, rate limits). Both answer over their report streams, from their own
//! snapshots and live state (`trellis_proxy::explain`). With `with` (proposed resources),
//! each proxy's view is compiled here with them applied on top of the stored config, after
//! validating the whole result, and the proxies explain against it.

use crate::Control;
use crate::http::ErrorBody;
use crate::mesh::ProxyStatus;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use trellis_api::wire;

/// How long a proxy has to answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The request body.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ExplainBody {
    /// The proxy, by node id as `trellis get proxies` lists it.
    #[serde(default)]
    proxy: Option<String>,
    /// Or the caller's service, `namespace/name` or `name` (namespace `default`): one of
    /// its connected proxies.
    #[serde(default)]
    service: Option<String>,
    /// The request.
    #[serde(default)]
    request: Option<RequestBody>,
    /// A request tap showed recently, by its `requestId`.
    #[serde(default)]
    request_id: Option<String>,
    /// Proposed resources (multi-document YAML) to explain against instead.
    #[serde(default)]
    with: Option<String>,
    /// `inbound`: explain only the named proxy's inbound side.
    #[serde(default)]
    direction: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RequestBody {
    /// The caller: a SPIFFE id, or a service (`namespace/name` or `name`).
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    method: String,
    #[serde(default)]
    authority: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

fn error(status: StatusCode, message: String) -> Response {
    (
        status,
        Json(ErrorBody {
            errors: message.lines().map(str::to_string).collect(),
        }),
    )
        .into_response()
}

pub(crate) async fn explain(
    State(c): State<Arc<Control>>,
    Json(body): Json<ExplainBody>,
) -> Response {
    match run(&c, body).await {
        Ok(v) => Json(v).into_response(),
        Err((status, message)) => error(status, message),
    }
}

type Failure = (StatusCode, String);

fn bad(m: impl Into<String>) -> Failure {
    (StatusCode::BAD_REQUEST, m.into())
}

async fn run(c: &Control, mut body: ExplainBody) -> Result<Value, Failure> {
    let mut replayed = None;
    if let Some(id) = body.request_id.take() {
        if body.request.is_some() {
            return Err(bad("give either request or requestId"));
        }
        let e = c.fleet.recent(&id).ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!(
                    "requestId {id}: not among the last {} requests tap showed on this replica (it aged out, or another replica showed it); describe the request instead",
                    crate::fleet::RECENT
                ),
            )
        })?;
        // Redacted values are not the request's: left out, and said so.
        let redacted: Vec<String> = e
            .headers
            .iter()
            .filter(|(_, v)| v.as_str() == REDACTED)
            .map(|(k, _)| k.clone())
            .collect();
        body.proxy = Some(e.node.clone());
        body.service = None;
        if e.direction == "inbound" {
            body.direction = Some("inbound".into());
        }
        body.request = Some(RequestBody {
            source: (!e.src_identity.is_empty()).then(|| e.src_identity.clone()),
            method: e.method.clone(),
            authority: e.authority.clone(),
            path: e.path.clone(),
            headers: e
                .headers
                .iter()
                .filter(|(k, _)| !redacted.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        });
        replayed = Some(json!({
            "requestId": id, "status": e.status, "route": e.route, "endpoint": e.endpoint,
            "redactedHeaders": redacted,
            "why": format!("as tap showed it: {} {}{} answered {} by route {}", e.method, e.authority, e.path, e.status, e.route),
        }));
    }
    let mut out = explain_request(c, body).await?;
    if let Some(r) = replayed {
        out["tapped"] = r;
    }
    Ok(out)
}

/// What tap shows in place of a sensitive header's value (`trellis_proxy::tap::REDACTED`).
const REDACTED: &str = "[redacted]";

async fn explain_request(c: &Control, body: ExplainBody) -> Result<Value, Failure> {
    let Some(request) = body.request else {
        return Err(bad(
            "request: describe the request to explain (source, method, authority, path, headers)",
        ));
    };
    let inbound_only = match body.direction.as_deref() {
        None | Some("outbound") => false,
        Some("inbound") => true,
        Some(d) => return Err(bad(format!("direction {d:?}: use inbound or outbound"))),
    };
    let proxies = c.proxies();
    let caller = pick_proxy(c, &proxies, body.proxy.as_deref(), body.service.as_deref())?;
    let trust_domain = c.trust().map(|(td, _)| td).unwrap_or_default();
    let source = match request.source.as_deref() {
        Some(s) if !s.is_empty() => Some(spiffe(s, &caller.namespace, &trust_domain)),
        // By default the caller is the proxy itself: its certificate's identity, else its
        // service's.
        _ if caller.certificate.is_some() => caller.certificate.as_ref().map(|(id, _)| id.clone()),
        _ if !caller.service.is_empty() => Some(spiffe(
            &format!("{}/{}", caller.namespace, caller.service),
            &caller.namespace,
            &trust_domain,
        )),
        _ => None,
    };
    let proposed = match &body.with {
        Some(yaml) => Some(proposed_state(c, yaml)?),
        None => None,
    };
    let ask = |direction: &str| {
        json!({
            "direction": direction,
            "source": source,
            "method": request.method,
            "authority": request.authority,
            "path": request.path,
            "headers": request.headers,
        })
    };
    let direction = if inbound_only { "inbound" } else { "outbound" };
    let mut out = ask_proxy(c, caller, ask(direction), proposed.as_ref()).await?;
    out["proxy"] = json!(caller.node);
    if inbound_only || out["outcome"] != "forwarded" {
        enrich_unavailable(c, &mut out);
        return Ok(out);
    }
    // The destination's inbound side, at one of its proxies on this replica.
    let Some((ns, name)) = out["backend"]["name"]
        .as_str()
        .and_then(|b| b.rsplit_once(':').map(|(s, _)| s))
        .and_then(|s| s.split_once('/'))
        .map(|(n, s)| (n.to_string(), s.to_string()))
    else {
        return Ok(out);
    };
    // The proxy of an endpoint the caller would choose (a registered instance's node), else
    // any proxy of the backend's service.
    let state = c.state();
    // An instance's proxy is the one of its node whose credentials prove the instance's own
    // service (what registered it: a Service's selector may pick another service's
    // instances), since node ids are the proxies' to choose.
    let instances: Vec<&std::sync::Arc<crate::state::Workload>> = out["endpoint"]["candidates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str())
        .flat_map(|a| state.workloads.values().filter(move |w| w.address == a))
        .collect();
    let callee = instances
        .iter()
        .find_map(|w| {
            proxies.iter().find(|p| {
                p.node == w.node
                    && (p.principal.0.as_str(), p.principal.1.as_str())
                        == (w.namespace.as_str(), w.service.as_str())
                    && c.fleet.can_explain(p)
            })
        })
        .or_else(|| {
            proxies
                .iter()
                .find(|p| p.namespace == ns && p.service == name && c.fleet.can_explain(p))
        });
    match callee {
        None => {
            out["inbound"] = json!({"why": format!("no proxy of {ns}/{name} is connected to this control plane replica: its authorization is not explained")});
        }
        Some(p) => match ask_proxy(c, p, ask("inbound"), proposed.as_ref()).await {
            Ok(mut inbound) => {
                inbound["proxy"] = json!(p.node);
                if inbound["outcome"] != "forwarded" {
                    // What the destination decides is what the caller gets.
                    for k in ["outcome", "status", "reason", "error"] {
                        out[k] = inbound[k].clone();
                    }
                    out["summary"] = json!(format!(
                        "{} (at {}, inbound)",
                        inbound["summary"].as_str().unwrap_or_default(),
                        p.node,
                    ));
                }
                if inbound["authorization"].is_object() {
                    out["authorization"] = inbound["authorization"].clone();
                }
                out["inbound"] = inbound;
            }
            Err((_, why)) => out["inbound"] = json!({ "why": why }),
        },
    }
    Ok(out)
}

/// The one connected proxy named `n` (pure): a node id, or `namespace/service/node` with the
/// namespace and service its credentials prove. `Err(None)` when none is, `Err(Some(()))`
/// when several are: node ids are the proxies' to choose, so one that several services'
/// proxies use names none of them alone.
fn by_node<'a>(proxies: &'a [ProxyStatus], n: &str) -> Result<&'a ProxyStatus, Option<()>> {
    let qualified = n
        .split_once('/')
        .and_then(|(ns, rest)| rest.split_once('/').map(|(svc, node)| (ns, svc, node)));
    let mut named = proxies.iter().filter(|p| {
        p.node == n
            || qualified.is_some_and(|(ns, svc, node)| {
                p.node == node && p.principal.0 == ns && p.principal.1 == svc
            })
    });
    match (named.next(), named.next()) {
        (Some(p), None) => Ok(p),
        (None, _) => Err(None),
        (Some(_), Some(_)) => Err(Some(())),
    }
}

/// The proxy to ask: by node id, else a connected proxy of the service.
fn pick_proxy<'a>(
    c: &Control,
    proxies: &'a [ProxyStatus],
    node: Option<&str>,
    service: Option<&str>,
) -> Result<&'a ProxyStatus, Failure> {
    let listed = || {
        let names: Vec<String> = proxies
            .iter()
            .map(|p| format!("{}/{}/{}", p.principal.0, p.principal.1, p.node))
            .collect();
        if names.is_empty() {
            "no proxy is connected".to_string()
        } else {
            format!("connected: {}", names.join(", "))
        }
    };
    match (node, service) {
        (Some(n), None) => by_node(proxies, n).map_err(|e| match e {
            None => (
                StatusCode::NOT_FOUND,
                format!("proxy {n:?} is not connected; {}", listed()),
            ),
            Some(()) => bad(format!(
                "node id {n:?} is used by more than one connected proxy; name it as namespace/service/node; {}",
                listed()
            )),
        }),
        (None, Some(s)) => {
            let (ns, name) = s
                .split_once('/')
                .unwrap_or((trellis_api::meta::DEFAULT_NAMESPACE, s));
            proxies
                .iter()
                .filter(|p| p.namespace == ns && p.service == name)
                .find(|p| c.fleet.can_explain(p))
                .ok_or_else(|| {
                    (
                        StatusCode::NOT_FOUND,
                        format!(
                            "no proxy of service {ns}/{name} is connected to this replica; {}",
                            listed()
                        ),
                    )
                })
        }
        _ => Err(bad(
            "name either proxy (a node id from `trellis get proxies`) or service (the caller, namespace/name)",
        )),
    }
}

/// `s` as a SPIFFE id: as is, or a service `namespace/name` (or `name`, in `namespace`).
fn spiffe(s: &str, namespace: &str, trust_domain: &str) -> String {
    if s.starts_with("spiffe://") {
        return s.to_string();
    }
    let (ns, name) = s.split_once('/').unwrap_or((namespace, s));
    format!("spiffe://{trust_domain}/ns/{ns}/sa/{name}")
}

/// The stored config with the proposed resources on top, validated whole.
fn proposed_state(c: &Control, yaml: &str) -> Result<crate::state::State, Failure> {
    let applied =
        trellis_api::parse_documents("with", yaml).map_err(|e| bad(format!("with: {e}")))?;
    if applied.is_empty() {
        return Err(bad("with: no resources"));
    }
    let state = c.state();
    let set = crate::config::resulting_set(&state, &applied);
    trellis_api::validate(&set)
        .map_err(|e| bad(format!("with: the resulting config is invalid:\n{e}")))?;
    let mut next = crate::state::State {
        revision: state.revision,
        config: state.config.clone(),
        workloads: state.workloads.clone(),
        ..Default::default()
    };
    for r in applied {
        let mut value = r.value;
        let key = value.key();
        // Keep a route's age, so precedence ties break as they would once applied.
        let existing = state.config.get(&key);
        value.metadata_mut().creation_timestamp = existing
            .and_then(|s| s.resource.metadata().creation_timestamp.clone())
            .or_else(|| Some(crate::config::now_rfc3339()));
        value.metadata_mut().resource_version = None;
        next.config.insert(
            key,
            crate::state::Stored {
                resource: Arc::new(value),
                version: state.revision,
            },
        );
    }
    Ok(next)
}

/// Asks one proxy; with a proposed state, sends it the view compiled for it from that state.
async fn ask_proxy(
    c: &Control,
    p: &ProxyStatus,
    ask: Value,
    proposed: Option<&crate::state::State>,
) -> Result<Value, Failure> {
    let view = proposed.map(|state| {
        let v = crate::compile::compile(state, &crate::mesh::view_key(p));
        v.items
            .into_iter()
            .map(|(key, i)| wire::Resource {
                key,
                version: i.version,
                json: i.json.to_string(),
            })
            .collect()
    });
    let req = wire::ExplainRequest {
        id: String::new(),
        ask_json: ask.to_string(),
        proposed: view.is_some(),
        view: view.unwrap_or_default(),
    };
    let answer = c
        .fleet
        .explain(p, req, ANSWER_TIMEOUT)
        .await
        .map_err(|e| (StatusCode::GATEWAY_TIMEOUT, e.to_string()))?;
    if !answer.error.is_empty() {
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("proxy {}: {}", p.node, answer.error),
        ));
    }
    serde_json::from_str(&answer.json).map_err(|e| {
        (
            StatusCode::BAD_GATEWAY,
            format!("proxy {}: unreadable answer: {e}", p.node),
        )
    })
}

/// A backend without endpoints: what the registry knows about its instances.
fn enrich_unavailable(c: &Control, out: &mut Value) {
    if out["error"] != "no_endpoint" {
        return;
    }
    let Some((ns, name)) = out["backend"]["name"]
        .as_str()
        .and_then(|b| b.rsplit_once(':').map(|(s, _)| s))
        .and_then(|s| s.split_once('/'))
        .map(|(n, s)| (n.to_string(), s.to_string()))
    else {
        return;
    };
    let state = c.state();
    let instances: Vec<Value> = state
        .workloads_of(&ns, &name)
        .map(|w| json!({"address": w.address, "healthy": w.healthy, "node": w.node}))
        .collect();
    let unhealthy = instances.iter().filter(|i| i["healthy"] == false).count();
    let why = match (instances.len(), unhealthy) {
        (0, _) => format!("{ns}/{name} has no registered instance"),
        (n, u) if n == u => format!(
            "every registered instance of {ns}/{name} ({n}) reports its app unhealthy, so none is an endpoint"
        ),
        (n, u) => format!("{ns}/{name} has {n} registered instance(s), {u} unhealthy"),
    };
    out["unavailable"] = json!({"why": why, "instances": instances});
    out["summary"] = json!(format!(
        "{} {}: {why}",
        out["status"],
        out["outcome"].as_str().unwrap_or_default()
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_id_names_a_proxy_only_when_one_proxy_uses_it() {
        let proxy = |node: &str, service: &str| ProxyStatus {
            node: node.into(),
            namespace: "default".into(),
            principal: ("default".into(), service.into()),
            ..Default::default()
        };
        let proxies = [
            proxy("web-1", "web"),
            proxy("api-1", "api"),
            proxy("web-1", "shop"),
        ];
        let named = |n: &str| by_node(&proxies, n).map(|p| p.principal.1.as_str());
        assert_eq!(named("api-1"), Ok("api"));
        assert_eq!(named("nope"), Err(None));
        assert_eq!(named("web-1"), Err(Some(())));
        assert_eq!(named("default/shop/web-1"), Ok("shop"));
        assert_eq!(named("default/web/web-1"), Ok("web"));
        assert_eq!(named("other/web/web-1"), Err(None));
    }
}
