//! `trellis explain`: asks the control plane (`POST /v1/explain`), which asks the proxies,
//! what they would do with a request and why; prints one line per decision, or the JSON.

use crate::client::Api;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Output of `trellis explain`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// What to explain.
pub struct Args {
    pub proxy: Option<String>,
    pub from: Option<String>,
    pub source: Option<String>,
    pub method: String,
    pub target: Option<String>,
    pub headers: Vec<String>,
    pub request_id: Option<String>,
    pub access_log: Option<PathBuf>,
    pub with: Option<PathBuf>,
    pub inbound: bool,
}

/// `http://authority/path?q`, `authority/path` or `authority`: the authority and the path.
pub fn split_target(target: &str) -> Result<(String, String)> {
    let rest = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
        .unwrap_or(target);
    if rest.is_empty() {
        bail!(
            "target {target:?}: give an authority and path, like catalog/items or http://catalog.shop/items"
        );
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        bail!("target {target:?}: no authority (service name or host) before the path");
    }
    Ok((authority.to_string(), path.to_string()))
}

/// `-H 'name: value'` headers.
pub fn parse_headers(headers: &[String]) -> Result<BTreeMap<String, String>> {
    headers
        .iter()
        .map(|h| {
            let (k, v) = h
                .split_once(':')
                .with_context(|| format!("header {h:?}: write it as 'name: value'"))?;
            let k = k.trim();
            if k.is_empty() {
                bail!("header {h:?}: empty name");
            }
            Ok((k.to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect()
}

/// What an access log line does not carry, so explain cannot consider it.
const NOT_IN_LOG: [&str; 2] = ["request headers", "the query string"];

/// The request an access-log line describes, found by `id` (its `trace_id` or
/// `request_id`) in `text` (the log, read from `origin`): the request for the explain API,
/// whether it was the inbound side's line, and what the answer says about the line. Of
/// several lines with the id (a trace crosses sidecars), the one of the side asked for:
/// inbound with `inbound`, else outbound. An id on several lines of that side (a retry, or a
/// client that reuses its `x-request-id`) is an error naming them: explaining one of them
/// silently could explain the wrong request. Pure.
pub fn from_access_log(
    text: &str,
    origin: &str,
    id: &str,
    inbound: bool,
) -> Result<(Value, bool, Value)> {
    let mut found: Vec<(usize, Value)> = Vec::new();
    let mut lines = 0;
    for (i, l) in text.lines().enumerate() {
        let Ok(v) = serde_json::from_str::<Value>(l) else {
            continue;
        };
        lines += 1;
        // Trace ids are hex, written in either case; a request id is the client's string.
        let trace = v["trace_id"]
            .as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case(id));
        if trace || v["request_id"].as_str() == Some(id) {
            found.push((i + 1, v));
        }
    }
    if found.is_empty() {
        bail!(
            "request id {id:?}: no line of {origin} has it as trace_id or request_id ({lines} JSON lines read); the access log needs the trace_id field (tracing on) or request_id (requests with an x-request-id header)"
        );
    }
    let want = if inbound { "inbound" } else { "outbound" };
    let side: Vec<&(usize, Value)> = found
        .iter()
        .filter(|(_, v)| v["direction"] == want)
        .collect();
    let candidates = if side.is_empty() {
        found.iter().collect()
    } else {
        side
    };
    if candidates.len() > 1 {
        let at: Vec<String> = candidates
            .iter()
            .map(|(n, _)| format!("{origin}:{n}"))
            .collect();
        bail!(
            "request id {id:?} is on {} lines ({}): it was reused (a retry, or a client's own x-request-id); pick one, e.g. `sed -n {}p {origin} | trellis explain --access-log - --request-id {id} …`",
            candidates.len(),
            at.join(", "),
            candidates[0].0,
        );
    }
    let (n, line) = candidates[0].clone();
    let field = |k: &str| -> Result<String> {
        match v_str(&line, k) {
            Some(s) if !s.is_empty() => Ok(s),
            _ => bail!(
                "{origin}:{n}: the line has no {k}, which explain needs (a TCP connection has none; otherwise add {k} to the Telemetry's accessLog.fields)"
            ),
        }
    };
    let is_inbound = line["direction"] == "inbound";
    let request = json!({
        // Inbound, the caller is the identity the sidecar verified; outbound, the calling
        // proxy's own service (the explain API's default).
        "source": if is_inbound { line["peer_identity"].as_str() } else { None },
        "method": field("method")?,
        "authority": field("authority")?,
        "path": field("path")?,
        "headers": {},
    });
    let about = json!({
        "file": origin,
        "line": n,
        "direction": line["direction"],
        "status": line["status"],
        "route": line["route"],
        "policy": line["policy"],
        "reason": line["reason"],
        "notConsidered": NOT_IN_LOG,
        "why": format!(
            "as {origin}:{n} logged it: {} {}{} answered {}; not in the log, so not considered: {}",
            v_str(&line, "method").unwrap_or_default(),
            v_str(&line, "authority").unwrap_or_default(),
            v_str(&line, "path").unwrap_or_default(),
            line["status"],
            NOT_IN_LOG.join(", "),
        ),
    });
    Ok((request, is_inbound, about))
}

fn v_str(v: &Value, k: &str) -> Option<String> {
    v[k].as_str().map(str::to_string)
}

/// Runs the command; a denied or failing request is an answer, not an error (exit 0).
pub async fn explain(api: &Api, mut args: Args, output: Output) -> Result<i32> {
    let mut logged = None;
    if let (Some(file), Some(id)) = (&args.access_log, &args.request_id) {
        if args.proxy.is_none() && args.from.is_none() {
            bail!(
                "an access log line does not name its proxy: give the proxy that wrote {} with --proxy NODE (see `trellis get proxies`) or --from SERVICE",
                file.display()
            );
        }
        let (text, origin) = if file.as_os_str() == "-" {
            let mut t = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
                .context("reading the access log from stdin")?;
            (t, "stdin".to_string())
        } else {
            let t = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            (t, file.display().to_string())
        };
        let (request, is_inbound, about) = from_access_log(&text, &origin, id, args.inbound)?;
        // The side of the line found, whatever was asked: an outbound line explained as
        // inbound would be an unauthenticated call.
        args.inbound = is_inbound;
        args.request_id = None;
        logged = Some((request, about));
    }
    if args.request_id.is_none() && logged.is_none() && args.proxy.is_some() == args.from.is_some()
    {
        bail!(
            "name the proxy that sends the request: --proxy NODE (see `trellis get proxies`) or --from SERVICE"
        );
    }
    let request = match (&args.target, &args.request_id) {
        _ if logged.is_some() => logged.as_ref().map(|(r, _)| r.clone()),
        (Some(t), _) => {
            let (authority, path) = split_target(t)?;
            Some(json!({
                "source": args.source,
                "method": args.method.to_ascii_uppercase(),
                "authority": authority,
                "path": path,
                "headers": parse_headers(&args.headers)?,
            }))
        }
        (None, Some(_)) => None,
        (None, None) => bail!("give the request (URL or authority/path) or --request-id"),
    };
    let with = match &args.with {
        Some(f) => {
            Some(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?)
        }
        None => None,
    };
    let body = json!({
        "proxy": args.proxy,
        "service": args.from,
        "request": request,
        "requestId": args.request_id,
        "with": with,
        "direction": args.inbound.then_some("inbound"),
    });
    let mut answer: Value = api.post("/v1/explain", &body).await?;
    if let Some((_, about)) = logged {
        answer["accessLog"] = about;
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
        Output::Text => print!("{}", text(&answer)),
    }
    Ok(0)
}

/// The explanation for a human: the summary, then one line per decision with its why.
pub fn text(v: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    out += &format!("{}\n", s(&v["summary"]));
    if let Some(c) = v["changes"].as_array() {
        if c.is_empty() {
            out += "  changes        none: the proposed config decides this request the same way\n";
        }
        for line in c {
            out += &format!("  change         {}\n", s(line));
        }
        out += &format!("  was            {}\n", s(&v["current"]["summary"]));
    }
    let line = |out: &mut String, label: &str, text: String| {
        if !text.is_empty() {
            *out += &format!("  {label:<14} {text}\n");
        }
    };
    line(
        &mut out,
        "proxy",
        format!(
            "{} ({} listener {})",
            s(&v["proxy"]),
            s(&v["direction"]),
            s(&v["listener"])
        ),
    );
    line(&mut out, "request", s(&v["request"]));
    if v["accessLog"].is_object() {
        line(&mut out, "access log", s(&v["accessLog"]["why"]));
    }
    for n in v["notMatched"].as_array().into_iter().flatten() {
        line(
            &mut out,
            "not matched",
            format!("{}: {}", s(&n["route"]), s(&n["why"])),
        );
    }
    let route = &v["route"];
    if route.is_object() {
        let id = if route["id"].is_null() {
            "none".into()
        } else {
            s(&route["id"])
        };
        line(&mut out, "route", format!("{id}: {}", s(&route["why"])));
        if route["closest"].is_object() {
            let c = &route["closest"];
            line(
                &mut out,
                "closest",
                format!("{} ({}): {}", s(&c["route"]), s(&c["match"]), s(&c["why"])),
            );
        }
    }
    for b in v["backends"].as_array().into_iter().flatten() {
        line(
            &mut out,
            "split",
            format!(
                "{:.0}% to {}: {}",
                b["share"].as_f64().unwrap_or(0.0) * 100.0,
                s(&b["backend"]),
                s(&b["why"])
            ),
        );
    }
    for k in ["authentication", "authorization"] {
        if v[k].is_object() {
            line(&mut out, k, s(&v[k]["why"]));
        }
    }
    for l in v["rateLimits"].as_array().into_iter().flatten() {
        line(
            &mut out,
            "rate limit",
            format!("{}: {}", s(&l["limit"]), s(&l["why"])),
        );
    }
    for (k, label) in [
        ("redirect", "redirect"),
        ("directResponse", "response"),
        ("fault", "fault"),
        ("backend", "backend"),
        ("endpoint", "endpoint"),
        ("unavailable", "unavailable"),
        ("circuitBreaker", "breaker"),
        ("retries", "retries"),
        ("timeouts", "timeouts"),
    ] {
        if v[k].is_object() {
            let mut why = s(&v[k]["why"]);
            if k == "retries" {
                why = format!("{} retries; {why}", v[k]["retries"]);
            }
            line(&mut out, label, why);
        }
    }
    for e in v["endpoints"].as_array().into_iter().flatten() {
        line(
            &mut out,
            "  endpoint",
            format!("{} {}", s(&e["address"]), s(&e["reason"])),
        );
    }
    if v["inbound"].is_object() {
        let i = &v["inbound"];
        let at = if i["proxy"].is_null() {
            String::new()
        } else {
            format!("at {}: ", s(&i["proxy"]))
        };
        line(
            &mut out,
            "inbound",
            format!(
                "{at}{}",
                if i["summary"].is_null() {
                    s(&i["why"])
                } else {
                    s(&i["summary"])
                }
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_headers_parse_with_clear_errors() {
        for (t, want) in [
            ("catalog", Some(("catalog", "/"))),
            ("catalog/items?x=1", Some(("catalog", "/items?x=1"))),
            ("http://catalog.shop:80/a", Some(("catalog.shop:80", "/a"))),
            ("/items", None),
            ("", None),
        ] {
            let got = split_target(t).ok();
            assert_eq!(
                got.as_ref().map(|(a, p)| (a.as_str(), p.as_str())),
                want,
                "{t}"
            );
        }
        let h = parse_headers(&["X-Tier: gold".into(), "a:b:c".into()]).unwrap();
        assert_eq!(h["x-tier"], "gold");
        assert_eq!(h["a"], "b:c");
        let e = parse_headers(&["nocolon".into()]).unwrap_err().to_string();
        assert!(e.contains("'name: value'"), "{e}");
    }

    #[test]
    fn access_log_lines_are_found_by_id_with_clear_errors() {
        let log = concat!(
            "not json\n",
            r#"{"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","direction":"outbound","method":"GET","authority":"catalog","path":"/admin/x","status":403}"#,
            "\n",
            r#"{"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","direction":"inbound","peer_identity":"spiffe://td/ns/default/sa/client","method":"GET","authority":"catalog","path":"/admin/x","status":403,"policy":"default/no-admin"}"#,
            "\n",
            r#"{"request_id":"abc","direction":"outbound","method":"POST","authority":"pay","path":"/charge","status":200}"#,
            "\n",
            r#"{"request_id":"tcp","direction":"inbound","protocol":"TCP"}"#,
            "\n",
            r#"{"request_id":"again","direction":"outbound","method":"GET","authority":"pay","path":"/a","status":503}"#,
            "\n",
            r#"{"request_id":"again","direction":"outbound","method":"GET","authority":"pay","path":"/a","status":200}"#,
            "\n",
        );
        // (id, inbound asked, line found, source, method and path)
        for (id, inbound, line, source, method, path) in [
            (
                "4BF92F3577B34DA6A3CE929D0E0E4736",
                false,
                2,
                None,
                "GET",
                "/admin/x",
            ),
            (
                "4bf92f3577b34da6a3ce929d0e0e4736",
                true,
                3,
                Some("spiffe://td/ns/default/sa/client"),
                "GET",
                "/admin/x",
            ),
            // The only line with the id, whichever side was asked for.
            ("abc", true, 4, None, "POST", "/charge"),
        ] {
            let (req, is_inbound, about) = from_access_log(log, "a.log", id, inbound).unwrap();
            assert_eq!(about["line"], line, "{id}");
            assert_eq!(is_inbound, line == 3, "{id}");
            assert_eq!(req["source"].as_str(), source, "{id}");
            assert_eq!(
                (req["method"].as_str(), req["path"].as_str()),
                (Some(method), Some(path))
            );
            assert!(
                about["why"].as_str().unwrap().contains("request headers"),
                "{about}"
            );
        }
        let e = from_access_log(log, "a.log", "nope", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"nope\"") && e.contains("a.log") && e.contains("6 JSON lines"),
            "{e}"
        );
        // A request id is matched exactly.
        assert!(from_access_log(log, "a.log", "ABC", false).is_err());
        // A reused id names its lines instead of picking one.
        let e = from_access_log(log, "a.log", "again", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 lines (a.log:6, a.log:7)"), "{e}");
        let e = from_access_log(log, "a.log", "tcp", false)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("a.log:5: the line has no method"), "{e}");
    }

    #[test]
    fn text_has_a_line_per_decision() {
        let v = json!({
            "summary": "403 denied: x denied by shop/no-admin rule 1 (Deny)",
            "outcome": "denied",
            "proxy": "n1", "direction": "outbound", "listener": "catalog",
            "notMatched": [{"route": "shop/r/0", "why": "method GET is not POST"}],
            "route": {"id": "shop/r/1", "why": "matches prefix /"},
            "authorization": {"why": "x denied by shop/no-admin rule 1 (Deny)"},
            "retries": {"retries": 2, "why": "the backend's"},
        });
        let t = text(&v);
        assert!(t.starts_with("403 denied"), "{t}");
        for want in [
            "not matched    shop/r/0: method GET is not POST",
            "route          shop/r/1",
            "authorization  x denied",
            "retries        2 retries",
        ] {
            assert!(t.contains(want), "{want} in\n{t}");
        }
    }
}
