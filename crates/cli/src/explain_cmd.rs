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

/// Runs the command; a denied or failing request is an answer, not an error (exit 0).
pub async fn explain(api: &Api, args: Args, output: Output) -> Result<i32> {
    if args.request_id.is_none() && args.proxy.is_some() == args.from.is_some() {
        bail!(
            "name the proxy that sends the request: --proxy NODE (see `trellis get proxies`) or --from SERVICE"
        );
    }
    let request = match (&args.target, &args.request_id) {
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
    let answer: Value = api.post("/v1/explain", &body).await?;
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
