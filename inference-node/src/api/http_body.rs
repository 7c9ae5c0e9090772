//! The HTTP edges of the API: request bodies read under a size limit, and
//! OpenAI-shaped answers for what no route handles (404, 405, 413).
//!
//! A body over the limit is answered 413 only after the rest of it has been
//! read and dropped (up to [`MAX_DRAIN_BYTES`]): a client that writes its
//! whole request before reading — most do — would otherwise hit a reset
//! connection (a broken pipe) instead of reading the answer. A body that
//! announces more than that is answered at once, with `Connection: close`.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use crate::api::openai::ApiError;

/// Largest request body accepted (the size of axum's default limit).
pub const MAX_BODY_BYTES: usize = 2 << 20;
/// Most bytes of an oversized body read (and dropped) before answering.
pub const MAX_DRAIN_BYTES: usize = 64 << 20;

/// A request body of at most [`MAX_BODY_BYTES`].
pub struct LimitedBody(pub Bytes);

fn too_large(got: Option<usize>) -> ApiError {
    let given = got
        .map(|g| format!(" Given: {g} bytes."))
        .unwrap_or_default();
    ApiError {
        status: 413,
        message: format!("the request body may have at most {MAX_BODY_BYTES} bytes.{given}"),
        kind: "invalid_request_error",
        param: None,
        code: Some("request_too_large"),
    }
}

fn close(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

impl<S: Send + Sync> FromRequest<S> for LimitedBody {
    type Rejection = Response;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|d| d > MAX_DRAIN_BYTES) {
            return Err(close(too_large(declared).into_response()));
        }
        read_limited(req.into_body()).await.map(LimitedBody)
    }
}

/// Reads the body; past the limit, keeps reading (and dropping) up to
/// [`MAX_DRAIN_BYTES`] so the 413 reaches the client.
async fn read_limited(body: Body) -> Result<Bytes, Response> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad("body", format!("reading the request body failed: {e}")).into_response()
        })?;
        total += chunk.len();
        if total <= MAX_BODY_BYTES {
            buf.extend_from_slice(&chunk);
        } else if total > MAX_DRAIN_BYTES {
            return Err(close(too_large(None).into_response()));
        }
    }
    if total > MAX_BODY_BYTES {
        return Err(too_large(Some(total)).into_response());
    }
    Ok(Bytes::from(buf))
}

/// Any path no route serves.
pub async fn not_found(req: Request) -> Response {
    ApiError {
        status: 404,
        message: format!("no route for {} {}", req.method(), req.uri().path()),
        kind: "invalid_request_error",
        param: None,
        code: Some("unknown_url"),
    }
    .into_response()
}

/// A known path with a method it does not take.
pub async fn method_not_allowed(req: Request) -> Response {
    let mut r = ApiError {
        status: 405,
        message: format!("{} is not allowed on {}", req.method(), req.uri().path()),
        kind: "invalid_request_error",
        param: None,
        code: Some("method_not_allowed"),
    }
    .into_response();
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r
}
