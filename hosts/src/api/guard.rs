//! Request guards every route shares: the body size cap (413, also for
//! chunked bodies without `Content-Length`) and the `Allow` header on 405.

use std::sync::Arc;

use futures_util::StreamExt;
use poem::http::{Method, StatusCode, header};
use poem::{Body, Endpoint, IntoResponse, Request, Response};

use super::problem::Problem;

/// Which methods each path template of the spec answers.
#[derive(Debug, Default)]
pub struct AllowTable {
    routes: Vec<(Vec<String>, Vec<String>)>,
}

impl AllowTable {
    /// Reads the `paths` of an OpenAPI document (JSON).
    pub fn from_spec(spec_json: &str) -> Self {
        let spec: serde_json::Value = serde_json::from_str(spec_json).unwrap_or_default();
        let mut routes = Vec::new();
        if let Some(paths) = spec["paths"].as_object() {
            for (path, item) in paths {
                let segments = path.split('/').map(str::to_owned).collect();
                let mut methods: Vec<String> = item
                    .as_object()
                    .map(|ops| ops.keys().map(|m| m.to_uppercase()).collect())
                    .unwrap_or_default();
                methods.sort();
                routes.push((segments, methods));
            }
        }
        Self { routes }
    }

    /// The methods `path` answers, if the spec has it.
    pub fn allowed(&self, path: &str) -> Option<String> {
        let segments: Vec<&str> = path.split('/').collect();
        self.routes.iter().find_map(|(template, methods)| {
            let matches = template.len() == segments.len()
                && template.iter().zip(&segments).all(|(t, s)| {
                    (t.starts_with('{') && t.ends_with('}') && !s.is_empty()) || t == s
                });
            matches.then(|| methods.join(", "))
        })
    }
}

/// Settings of [`guard`].
#[derive(Debug)]
pub struct GuardSettings {
    pub body_limit: usize,
    pub allow: AllowTable,
}

fn too_large(limit: usize) -> Response {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than {limit} bytes"),
        None,
    )
    .into_response()
}

/// Reads at most `limit` bytes of `body`; `None` when it is longer.
async fn read_capped(body: Body, limit: usize) -> Result<Option<Vec<u8>>, std::io::Error> {
    let mut stream = body.into_bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if buf.len() + chunk.len() > limit {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(buf))
}

/// Caps the body, then adds `Allow` to a 405 from the router.
pub async fn guard<E: Endpoint>(
    next: Arc<E>,
    mut req: Request,
    settings: Arc<GuardSettings>,
) -> poem::Result<Response> {
    let limit = settings.body_limit;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Ok(too_large(limit));
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        match read_capped(req.take_body(), limit).await {
            Ok(Some(bytes)) => req.set_body(bytes),
            Ok(None) => return Ok(too_large(limit)),
            Err(e) => {
                return Ok(Problem::new(
                    StatusCode::BAD_REQUEST,
                    format!("the request body could not be read: {e}"),
                    None,
                )
                .into_response());
            }
        }
    }
    let path = req.uri().path().to_owned();
    let mut response = match next.call(req).await {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    };
    if response.status() == StatusCode::METHOD_NOT_ALLOWED
        && let Some(allowed) = settings.allow.allowed(&path)
        && let Ok(value) = allowed.parse()
    {
        response.headers_mut().insert(header::ALLOW, value);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_templates_match_one_segment_per_parameter() {
        let table = AllowTable::from_spec(
            r#"{"paths": {"/api/orders": {"get": {}, "post": {}},
                          "/api/orders/{id}": {"get": {}}}}"#,
        );
        assert_eq!(table.allowed("/api/orders").as_deref(), Some("GET, POST"));
        assert_eq!(table.allowed("/api/orders/7").as_deref(), Some("GET"));
        assert_eq!(table.allowed("/api/orders/7/x"), None);
        assert_eq!(table.allowed("/api/orders/"), None);
    }
}
