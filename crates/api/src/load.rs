//! Reading YAML into resources, keeping where everything came from so that every error can
//! name file, line and field.

use crate::resource::{Kind, Object, Resource};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;
use std::any::Any;
use std::fmt;
use std::sync::Arc;

/// One problem found in configuration, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// File (or other source) name.
    pub file: String,
    /// 1-based line; 0 when unknown.
    pub line: u64,
    /// Field path such as `spec.rules[0].backendRefs[1].port`; empty for the whole document.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a set of configuration; never empty.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// A resource and where it was read from.
#[derive(Clone, Debug)]
pub struct Located<T> {
    /// The resource.
    pub value: T,
    /// Source name.
    pub file: Arc<str>,
    /// Line of the document's first line in the file (1-based).
    pub first_line: u64,
    /// Source positions of every node, to place errors found after parsing.
    tree: Option<Arc<Spanned<Node>>>,
    /// Where the value's compact JSON as it arrived is kept, when its source keeps it: a store
    /// of texts (opaque here) and the value's index in it.
    text: Option<(Arc<dyn Any + Send + Sync>, usize)>,
}

impl<T> Located<T> {
    /// Wraps a value with no source (for resources built in code or read from a store).
    pub fn unsourced(value: T, file: &str) -> Self {
        Self {
            value,
            file: file.into(),
            first_line: 0,
            tree: None,
            text: None,
        }
    }

    /// Notes where the value's compact JSON as received is kept: text `index` of `store` (a
    /// proxy's packed view from the control plane), so that whoever shows the value can
    /// read that text instead of serializing the value again and keeping a second copy.
    pub fn with_text(mut self, store: Arc<dyn Any + Send + Sync>, index: usize) -> Self {
        self.text = Some((store, index));
        self
    }

    /// The store and index given to [`Located::with_text`].
    pub fn text(&self) -> Option<(&Arc<dyn Any + Send + Sync>, usize)> {
        self.text.as_ref().map(|(s, i)| (s, *i))
    }

    /// A diagnostic at `field` (a path like `spec.rules[0].matches`), placed at the deepest
    /// part of that path present in the source.
    pub fn diagnostic(&self, field: &str, message: impl Into<String>) -> Diagnostic {
        let line = self
            .tree
            .as_ref()
            .and_then(|t| locate(t, field))
            .map_or(self.first_line, |l| l + self.first_line - 1);
        Diagnostic {
            file: self.file.to_string(),
            line,
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Parses a YAML stream of one or more `---`-separated resources. Syntax and schema errors
/// name the file, the line and, where known, the field; nothing is returned unless every
/// document parsed.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Located<Resource>>, Diagnostics> {
    let file: Arc<str> = file.into();
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (first_line, doc) in split_documents(text) {
        if doc.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#')
        }) {
            continue;
        }
        match parse_one(&file, first_line, doc) {
            Ok(r) => out.push(r),
            Err(d) => errors.push(d),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(Diagnostics(errors))
    }
}

fn parse_one(file: &Arc<str>, first_line: u64, doc: &str) -> Result<Located<Resource>, Diagnostic> {
    let at = |line: u64, field: &str, message: String| Diagnostic {
        file: file.to_string(),
        line: if line == 0 {
            first_line
        } else {
            line + first_line - 1
        },
        field: field.to_string(),
        message,
    };
    let tree: Spanned<Node> = serde_saphyr::from_str(doc).map_err(|e| yaml_error(&e, &at))?;
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Header {
        api_version: Option<String>,
        kind: Option<Spanned<String>>,
    }
    let header: Header = serde_saphyr::from_str(doc).map_err(|e| yaml_error(&e, &at))?;
    let Some(kind_text) = header.kind else {
        return Err(at(0, "kind", "missing field `kind`".into()));
    };
    let kind_line = kind_text.referenced.line();
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.as_str() == kind_text.value)
        .ok_or_else(|| {
            let known: Vec<_> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            at(
                kind_line,
                "kind",
                format!(
                    "unknown kind {:?}; expected one of {}",
                    kind_text.value,
                    known.join(", ")
                ),
            )
        })?;
    match header.api_version.as_deref() {
        Some(v) if v == kind.api_version() => {}
        Some(v)
            if kind.api_version() == crate::GATEWAY_API_VERSION
                && v == "gateway.networking.k8s.io/v1beta1" => {}
        other => {
            return Err(at(
                0,
                "apiVersion",
                format!(
                    "{} needs apiVersion {:?}, found {:?}",
                    kind,
                    kind.api_version(),
                    other.unwrap_or("")
                ),
            ));
        }
    }
    fn typed<S: de::DeserializeOwned>(doc: &str) -> Result<Object<S>, serde_saphyr::Error> {
        serde_saphyr::from_str(doc)
    }
    let value = match kind {
        Kind::Proxy => typed(doc).map(Resource::Proxy),
        Kind::Service => typed(doc).map(Resource::Service),
        Kind::HttpRoute => typed(doc).map(Resource::HttpRoute),
        Kind::GrpcRoute => typed(doc).map(Resource::GrpcRoute),
        Kind::BackendPolicy => typed(doc).map(Resource::BackendPolicy),
        Kind::MeshConfig => typed(doc).map(Resource::MeshConfig),
        Kind::AuthorizationPolicy => typed(doc).map(Resource::AuthorizationPolicy),
        Kind::RequestAuthentication => typed(doc).map(Resource::RequestAuthentication),
        Kind::FaultInjection => typed(doc).map(Resource::FaultInjection),
        Kind::Telemetry => typed(doc).map(Resource::Telemetry),
        Kind::RateLimitPolicy => typed(doc).map(Resource::RateLimitPolicy),
        Kind::OverloadPolicy => typed(doc).map(Resource::OverloadPolicy),
    }
    .map_err(|e| yaml_error(&e, &at))?;
    Ok(Located {
        value,
        file: file.clone(),
        first_line,
        tree: Some(Arc::new(tree)),
        text: None,
    })
}

fn yaml_error(e: &serde_saphyr::Error, at: &dyn Fn(u64, &str, String) -> Diagnostic) -> Diagnostic {
    let line = e.location().map_or(0, |l| l.line());
    // The library's message may carry its own location and a source snippet; keep the first
    // line, without the location, since the diagnostic states the line itself.
    let text = e.to_string();
    let first = text
        .lines()
        .next()
        .unwrap_or("invalid YAML")
        .trim()
        .trim_start_matches("error: ");
    let first = match first.rfind(" at line ") {
        Some(i) => &first[..i],
        None => first,
    };
    // Some messages lead with their own position: `line 8 column 22: ...`.
    let first = match first.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
        Some((pos, rest)) if pos.contains(" column ") => rest,
        _ => first,
    };
    at(line, "", first.to_string())
}

/// Splits a YAML stream at `---` document markers, returning each document with its first
/// line number.
fn split_documents(text: &str) -> Vec<(u64, &str)> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 1u64;
    let mut offset = 0usize;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") || bare == "..." {
            docs.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = i as u64 + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs
}

/// A YAML tree with the position of every node, used to place errors found after parsing.
#[derive(Debug)]
enum Node {
    Map(Vec<(String, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Scalar,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_str<E>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = a.next_element()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(key) = a.next_key::<KeyText>()? {
                    items.push((key.0, a.next_value()?));
                }
                Ok(Node::Map(items))
            }
        }
        d.deserialize_any(V)
    }
}

/// A mapping key of any scalar type, as text.
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar mapping key")
            }
            fn visit_str<E>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// The line (within the document) of the deepest node along `path` that exists.
fn locate(root: &Spanned<Node>, path: &str) -> Option<u64> {
    let mut node = root;
    let mut line = None;
    for seg in path_segments(path) {
        let next = match (&node.value, seg) {
            (Node::Map(items), Segment::Key(k)) => {
                items.iter().find(|(key, _)| key == k).map(|(_, v)| v)
            }
            (Node::Seq(items), Segment::Index(i)) => items.get(i),
            _ => None,
        };
        match next {
            Some(n) => {
                node = n;
                let l = n.referenced.line();
                if l > 0 {
                    line = Some(l);
                }
            }
            None => break,
        }
    }
    line.or_else(|| Some(root.referenced.line()).filter(|l| *l > 0))
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn path_segments(path: &str) -> impl Iterator<Item = Segment<'_>> {
    path.split('.').filter(|p| !p.is_empty()).flat_map(|part| {
        let (key, rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        let idx = rest
            .split('[')
            .filter_map(|s| s.trim_end_matches(']').parse().ok())
            .map(Segment::Index);
        std::iter::once(Segment::Key(key))
            .filter(|s| !matches!(s, Segment::Key("")))
            .chain(idx)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "\
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata:
  name: catalog
spec:
  ports:
    - port: 8080
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata:
  name: orders
spec:
  ports:
    - port: 9090
      bogus: 1
";

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let err = parse_documents("svc.yaml", TWO).unwrap_err();
        assert_eq!(err.0.len(), 1);
        let d = &err.0[0];
        assert_eq!(d.file, "svc.yaml");
        assert_eq!(d.line, 16, "{d}");
        assert!(d.message.contains("bogus"), "{d}");
        assert!(
            !d.message.contains("line "),
            "position repeated in message: {d}"
        );
    }

    #[test]
    fn locates_fields_after_parsing() {
        let ok = TWO.replace("      bogus: 1\n", "");
        let docs = parse_documents("svc.yaml", &ok).unwrap();
        assert_eq!(docs.len(), 2);
        let d = docs[1].diagnostic("spec.ports[0].port", "nope");
        assert_eq!(d.line, 15, "{d}");
        assert_eq!(d.to_string(), "svc.yaml:15: spec.ports[0].port: nope");
        // A missing field is placed at its nearest existing parent.
        assert_eq!(
            docs[1].diagnostic("spec.ports[0].appProtocol", "x").line,
            15
        );
        assert_eq!(docs[0].diagnostic("metadata.name", "x").line, 4);
    }

    #[test]
    fn unknown_kind_and_bad_api_version() {
        let err = parse_documents(
            "a.yaml",
            "apiVersion: v1\nkind: Gizmo\nmetadata: {name: a}\n",
        )
        .unwrap_err();
        assert!(
            err.0[0].message.contains("unknown kind \"Gizmo\""),
            "{}",
            err
        );
        assert_eq!(err.0[0].line, 2);
        let err = parse_documents(
            "a.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: []}\n",
        )
        .unwrap_err();
        assert!(err.0[0].message.contains("apiVersion"), "{}", err);
    }

    #[test]
    fn syntax_error_has_line() {
        let err = parse_documents("a.yaml", "kind: Service\nmetadata: {name: a\n").unwrap_err();
        assert!(err.0[0].line >= 2, "{}", err);
    }
}
