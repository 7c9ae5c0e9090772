//! The register page: `/register` (HTML without JavaScript) and
//! `/register.json`, every StintQuota the asker may read, and
//! `/register/{namespace}/{name}` (`.json` appended to the name for JSON)
//! for one. A small form posts a member's key to `/register/key`, which
//! keeps it in an `HttpOnly` cookie; `/register/forget` drops it.
//!
//! This module is the I/O: it reads the gateway's watched state, decides
//! access ([`access`]), builds the data ([`view`]) and renders it
//! ([`render`]); those three are pure and tested on their own.

pub mod access;
pub mod i18n;
pub mod render;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use jiff::Timestamp;
use kube::ResourceExt;
use serde::Deserialize;

use super::AppState;
use super::openai::ApiError;
use crate::resources::stint_quota::StintQuota;
use access::{Access, Viewer};
pub use access::{CidrError, ClusterNets};
use i18n::Lang;
use render::{Mode, Notice};
use view::Register;

/// The register's routes, merged into the gateway's router.
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/register", get(all_html))
        .route("/register.json", get(all_json))
        .route("/register/key", post(sign_in))
        .route("/register/forget", post(forget))
        .route("/register/{namespace}/{name}", get(one))
}

#[derive(Deserialize, Default)]
struct LangParam {
    lang: Option<String>,
}

/// What every register request needs to know about its asker.
struct Asker {
    /// `Err` when a key was presented that no member holds; `true` when it
    /// came from the cookie (which is then cleared).
    viewer: Result<Viewer, bool>,
    lang: Lang,
}

fn asker(s: &AppState, req: &Request) -> Asker {
    let headers = req.headers();
    let query = Query::<LangParam>::try_from_uri(req.uri())
        .map(|q| q.0)
        .unwrap_or_default();
    let lang = Lang::choose(
        query.lang.as_deref(),
        headers
            .get(header::ACCEPT_LANGUAGE)
            .and_then(|v| v.to_str().ok()),
    );
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let viewer = match access::presented_key(headers) {
        Some(k) => s
            .catalog
            .keys()
            .lookup(&k)
            .map(Viewer::Member)
            .ok_or_else(|| access::cookie_key(headers).is_some_and(|c| c == k)),
        None => Ok(Viewer::Anonymous {
            in_cluster: peer.is_some_and(|ip| s.settings.register_cluster_nets.contains(ip)),
        }),
    };
    Asker { viewer, lang }
}

/// The register of one quota as of now.
fn register_of(s: &AppState, q: &StintQuota) -> Register {
    let ns = q.namespace().unwrap_or_default();
    let models = s.catalog.models_of_quota(&ns, &q.name_any());
    let budgets = s.catalog.budgets();
    let chosen = view::budgets_covering(&budgets, &models);
    view::register(q, &chosen, Timestamp::now())
}

/// Headers of every register answer: private, no caching, no scripts.
fn private(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::VARY,
        HeaderValue::from_static("Authorization, Cookie, Accept-Language"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

fn html(status: StatusCode, regs: &[Register], mode: Mode, a: &Asker) -> Response {
    match render::page(regs, &mode, a.lang, Timestamp::now()) {
        Ok(body) => private(
            (
                status,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                body,
            )
                .into_response(),
        ),
        Err(e) => {
            tracing::error!(error = %e, "the register page did not render");
            private(ApiError::internal(e.to_string()).into_response())
        }
    }
}

/// 401 for a page: the sign-in form (and the bad cookie dropped).
fn sign_in_page(a: &Asker, refused: bool, clear_cookie: bool) -> Response {
    let mut r = html(
        StatusCode::UNAUTHORIZED,
        &[],
        Mode {
            sign_in: true,
            refused,
            ..Mode::default()
        },
        a,
    );
    let h = r.headers_mut();
    h.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"copyhold register\""),
    );
    if clear_cookie && let Ok(v) = HeaderValue::from_str(&access::clear_cookie()) {
        h.append(header::SET_COOKIE, v);
    }
    r
}

fn json_error(status: StatusCode, code: &'static str, message: &str) -> Response {
    let mut r = ApiError::new(status, "invalid_request_error", code, message).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"copyhold register\""),
        );
    }
    private(r)
}

/// Which registers a viewer may read, and whether some need a key or are
/// refused (for the status when none is shown).
struct Visible {
    shown: Vec<Register>,
    needs_key: bool,
    refused: bool,
}

fn visible(s: &AppState, viewer: &Viewer) -> Visible {
    let mut quotas = s.catalog.quotas();
    quotas.sort_by_key(|q| (q.namespace(), q.name_any()));
    let mut v = Visible {
        shown: Vec::new(),
        needs_key: false,
        refused: false,
    };
    for q in quotas {
        let ns = q.namespace().unwrap_or_default();
        match access::access(viewer, &ns, &q.name_any(), q.spec.register.visibility) {
            Access::Shown => v.shown.push(register_of(s, &q)),
            Access::NeedsKey => v.needs_key = true,
            Access::Refused => v.refused = true,
        }
    }
    v
}

async fn all_html(State(s): State<Arc<AppState>>, req: Request) -> Response {
    let a = asker(&s, &req);
    let viewer = match &a.viewer {
        Ok(v) => v,
        Err(from_cookie) => return sign_in_page(&a, true, *from_cookie),
    };
    let v = visible(&s, viewer);
    let signed_in = matches!(viewer, Viewer::Member(_));
    if v.shown.is_empty() && v.needs_key {
        return sign_in_page(&a, false, false);
    }
    let (status, notice) = match (v.shown.is_empty(), v.refused) {
        (false, _) => (StatusCode::OK, None),
        (true, true) => (StatusCode::FORBIDDEN, Some(Notice::NothingVisible)),
        (true, false) => (StatusCode::OK, Some(Notice::NothingVisible)),
    };
    let mode = Mode {
        signed_in,
        sign_in: v.needs_key,
        refused: false,
        notice,
    };
    html(status, &v.shown, mode, &a)
}

async fn all_json(State(s): State<Arc<AppState>>, req: Request) -> Response {
    let a = asker(&s, &req);
    let Ok(viewer) = &a.viewer else {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "no member holds this key",
        );
    };
    let v = visible(&s, viewer);
    if v.shown.is_empty() && v.needs_key {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "this register is open to its members: send a member's key as `Authorization: Bearer <key>`",
        );
    }
    if v.shown.is_empty() && v.refused {
        return json_error(
            StatusCode::FORBIDDEN,
            "register_not_visible",
            "no register is open to this client",
        );
    }
    private(axum::Json(serde_json::json!({"registers": v.shown})).into_response())
}

async fn one(
    State(s): State<Arc<AppState>>,
    Path((namespace, name)): Path<(String, String)>,
    req: Request,
) -> Response {
    let a = asker(&s, &req);
    let (name, json) = match name.strip_suffix(".json") {
        Some(n) => (n.to_string(), true),
        None => (name, false),
    };
    let viewer = match &a.viewer {
        Ok(v) => v,
        Err(from_cookie) if !json => return sign_in_page(&a, true, *from_cookie),
        Err(_) => {
            return json_error(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "no member holds this key",
            );
        }
    };
    let quota = s.catalog.quota_named(&namespace, &name);
    let decision = quota
        .as_ref()
        .map(|q| access::access(viewer, &namespace, &name, q.spec.register.visibility));
    match (decision, quota) {
        (Some(Access::Shown), Some(q)) => {
            let r = register_of(&s, &q);
            if json {
                private(axum::Json(r).into_response())
            } else {
                let mode = Mode {
                    signed_in: matches!(viewer, Viewer::Member(_)),
                    ..Mode::default()
                };
                html(StatusCode::OK, &[r], mode, &a)
            }
        }
        (Some(Access::NeedsKey), _) if json => json_error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "this register is open to its members: send a member's key as `Authorization: Bearer <key>`",
        ),
        (Some(Access::NeedsKey), _) => sign_in_page(&a, false, false),
        // Outside the cluster: refused, in words.
        (Some(Access::Refused), _) if matches!(viewer, Viewer::Anonymous { .. }) => {
            if json {
                json_error(
                    StatusCode::FORBIDDEN,
                    "register_not_visible",
                    "this register is open only inside the cluster",
                )
            } else {
                let mode = Mode {
                    notice: Some(Notice::NothingVisible),
                    ..Mode::default()
                };
                html(StatusCode::FORBIDDEN, &[], mode, &a)
            }
        }
        // Another tenant's register, or none: the same answer, so a key
        // does not tell which registers exist.
        _ if json => json_error(
            StatusCode::NOT_FOUND,
            "register_not_found",
            "there is no register of that name open to you",
        ),
        _ => {
            let mode = Mode {
                signed_in: matches!(viewer, Viewer::Member(_)),
                notice: Some(Notice::NotFound),
                ..Mode::default()
            };
            html(StatusCode::NOT_FOUND, &[], mode, &a)
        }
    }
}

#[derive(Deserialize)]
struct KeyForm {
    key: String,
    lang: Option<String>,
}

/// Where to go after the form: the register, in the form's language.
fn back(lang: Option<&str>) -> String {
    match lang.map(|l| Lang::choose(Some(l), None)) {
        Some(l) if l != Lang::En => format!("/register?lang={}", l.tag()),
        _ => "/register".into(),
    }
}

fn see_other(to: &str, cookie: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(to) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(cookie) {
        h.insert(header::SET_COOKIE, v);
    }
    private(r)
}

/// The form's key: a member's opens their register (303 and the cookie);
/// any other is refused with the form again (401).
async fn sign_in(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(f): Form<KeyForm>,
) -> Response {
    let key = f.key.trim();
    if s.catalog.keys().lookup(key.as_bytes()).is_none() {
        let a = Asker {
            viewer: Err(false),
            lang: Lang::choose(f.lang.as_deref(), None),
        };
        return sign_in_page(&a, true, false);
    }
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    see_other(&back(f.lang.as_deref()), &access::set_cookie(key, https))
}

#[derive(Deserialize)]
struct ForgetForm {
    lang: Option<String>,
}

async fn forget(Form(f): Form<ForgetForm>) -> Response {
    see_other(&back(f.lang.as_deref()), &access::clear_cookie())
}
