//! `trellis apply`, `get` and `delete`: thin clients of the control plane's config API.

use crate::client::{Api, Refused};
use anyhow::{Result, bail};
use serde_json::Value;
use std::path::PathBuf;
use trellis_api::{Kind, ObjectKey};
use trellis_control::config::{SourceFile, WriteResult};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Output {
    Table,
    Yaml,
    Json,
}

/// Prints a refusal the way `validate` prints problems; returns the exit code.
fn refused(e: anyhow::Error) -> Result<i32> {
    match e.downcast::<Refused>() {
        Ok(r) => {
            for line in &r.errors {
                eprintln!("{line}");
            }
            Ok(1)
        }
        Err(e) => Err(e),
    }
}

fn print_outcomes(r: &WriteResult, suffix: &str) {
    for o in &r.outcomes {
        println!("{} {}{suffix}", o.resource, o.action);
    }
}

pub async fn apply(api: &Api, files: &[PathBuf], dry_run: bool) -> Result<i32> {
    let files: Vec<SourceFile> = crate::read_files(files)?
        .into_iter()
        .map(|(name, text)| SourceFile { name, text })
        .collect();
    if files.is_empty() {
        bail!("no .yaml or .yml files found");
    }
    let body = serde_json::json!({ "files": files, "dry_run": dry_run });
    match api.post::<_, WriteResult>("/v1/apply", &body).await {
        Ok(r) => {
            print_outcomes(&r, if dry_run { " (dry run)" } else { "" });
            Ok(0)
        }
        Err(e) => refused(e),
    }
}

pub async fn delete(
    api: &Api,
    kind: Option<String>,
    names: Vec<String>,
    namespace: &str,
    files: &[PathBuf],
) -> Result<i32> {
    let mut keys = Vec::new();
    if let Some(kind) = kind {
        let Some(k) = Kind::parse(&kind) else {
            bail!("unknown kind {kind:?}");
        };
        for name in names {
            keys.push(ObjectKey {
                kind: k.as_str().into(),
                namespace: namespace.into(),
                name,
            });
        }
    }
    for (name, text) in crate::read_files(files)? {
        match trellis_api::parse_documents(&name, &text) {
            Ok(rs) => keys.extend(rs.into_iter().map(|r| r.value.key())),
            Err(d) => {
                eprintln!("{d}");
                return Ok(1);
            }
        }
    }
    if keys.is_empty() {
        bail!("nothing to delete: name KIND NAME… or -f FILE");
    }
    match api
        .post::<_, WriteResult>("/v1/delete", &serde_json::json!({ "keys": keys }))
        .await
    {
        Ok(r) => {
            print_outcomes(&r, "");
            Ok(0)
        }
        Err(e) => refused(e),
    }
}

pub async fn get(
    api: &Api,
    kind: &str,
    name: Option<&str>,
    namespace: Option<&str>,
    output: Output,
) -> Result<i32> {
    let plural = kind.to_ascii_lowercase();
    let special = matches!(
        plural.as_str(),
        "proxies" | "proxy" | "workloads" | "workload"
    );
    let path_kind = if special {
        plural.clone()
    } else {
        match Kind::parse(kind) {
            Some(k) => k.as_str().to_string(),
            None => bail!(
                "unknown kind {kind:?}; expected one of {}, proxies or workloads",
                Kind::ALL.map(|k| k.as_str()).join(", ")
            ),
        }
    };
    let items: Vec<Value> = match (name, special) {
        (Some(n), false) => {
            let ns = namespace.unwrap_or(trellis_api::meta::DEFAULT_NAMESPACE);
            match api
                .get::<Value>(&format!("/v1/resources/{path_kind}/{ns}/{n}"))
                .await
            {
                Ok(v) => vec![v],
                Err(e) => return refused(e),
            }
        }
        _ => {
            let q = namespace.map_or(String::new(), |ns| format!("?namespace={ns}"));
            let list: Value = match api.get(&format!("/v1/resources/{path_kind}{q}")).await {
                Ok(v) => v,
                Err(e) => return refused(e),
            };
            let mut items = list["items"].as_array().cloned().unwrap_or_default();
            if let Some(n) = name {
                items.retain(|i| i["node"] == n || i["id"] == n || i["service"] == n);
            }
            items
        }
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&items)?),
        Output::Yaml => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                print!("{}", serde_saphyr::to_string(item)?);
            }
        }
        Output::Table => print_table(&plural, &items),
    }
    Ok(0)
}

fn print_table(kind: &str, items: &[Value]) {
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    };
    let (header, rows): (Vec<&str>, Vec<Vec<String>>) = match kind {
        "proxies" | "proxy" => (
            vec!["NODE", "SERVICE", "ACKED", "RESOURCES", "STATUS"],
            items
                .iter()
                .map(|i| {
                    let status = match (&i["nack"], i["pending"].as_bool()) {
                        (Value::String(e), _) => format!(
                            "NACK of {}: {}",
                            s(&i["nackVersion"]),
                            e.lines().next().unwrap_or("")
                        ),
                        (_, Some(true)) => "updating".into(),
                        _ => "in sync".into(),
                    };
                    vec![
                        s(&i["node"]),
                        s(&i["service"]),
                        s(&i["ackedVersion"]),
                        s(&i["resources"]),
                        status,
                    ]
                })
                .collect(),
        ),
        "workloads" | "workload" => (
            vec![
                "NAMESPACE",
                "SERVICE",
                "ID",
                "ADDRESS",
                "PORT",
                "HEALTHY",
                "LABELS",
            ],
            items
                .iter()
                .map(|i| {
                    let labels = i["labels"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| format!("{k}={}", s(v)))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    vec![
                        s(&i["namespace"]),
                        s(&i["service"]),
                        s(&i["id"]),
                        s(&i["address"]),
                        s(&i["port"]),
                        s(&i["healthy"]),
                        labels,
                    ]
                })
                .collect(),
        ),
        _ => (
            vec!["NAMESPACE", "NAME", "VERSION", "CREATED"],
            items
                .iter()
                .map(|i| {
                    let m = &i["metadata"];
                    vec![
                        s(&m["namespace"]),
                        s(&m["name"]),
                        s(&m["resourceVersion"]),
                        s(&m["creationTimestamp"]),
                    ]
                })
                .collect(),
        ),
    };
    if rows.is_empty() {
        println!("No resources found.");
        return;
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}
