//! The web dashboard: static files embedded in the binary, served under `/ui/`. They hold no
//! data; the page asks `/v1/` for everything with the token the user logged in with, so the
//! files need no authentication of their own (see docs/dashboard.md and docs/security.md).

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// Scripts and styles only from this origin, no inline code, no framing, and `fetch` only
/// back to the API: an injected string cannot run or send data anywhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
form-action 'none'; frame-ancestors 'none'";

/// The embedded files: name, content type, bytes.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../ui/index.html"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../ui/style.css"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/api.js"),
    ),
    (
        "render.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/render.js"),
    ),
    (
        "graph.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/graph.js"),
    ),
    (
        "views.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/views.js"),
    ),
];

/// The embedded file at `name`, if any (`""` is the page).
pub fn asset(name: &str) -> Option<(&'static str, &'static str)> {
    let name = if name.is_empty() { "index.html" } else { name };
    ASSETS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, t, b)| (*t, *b))
}

fn serve(name: &str) -> Response {
    let mut r = match asset(name) {
        Some((content_type, body)) => {
            ([(header::CONTENT_TYPE, content_type)], body).into_response()
        }
        None => (StatusCode::NOT_FOUND, format!("/ui/{name}: no such file\n")).into_response(),
    };
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // A new binary brings new files: always revalidate.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `/ui/` and its files; `/` and `/ui` redirect to the page.
pub fn router<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    axum::Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(|| async { serve("") }))
        .route(
            "/ui/{file}",
            get(|Path(file): Path<String>| async move { serve(&file) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_the_page_loads_is_embedded() {
        let page = asset("").unwrap().1;
        for (name, _, body) in ASSETS {
            // Each module names the modules it imports as `./name.js`.
            for import in body.split("from \"./").skip(1) {
                let file = import.split('"').next().unwrap();
                assert!(asset(file).is_some(), "{name} imports {file}");
            }
        }
        assert!(page.contains("src=\"app.js\""));
        assert!(asset("../Cargo.toml").is_none());
        // No inline script or style: the CSP would block it.
        assert!(!page.contains("<script>") && !page.contains("style="));
    }
}
