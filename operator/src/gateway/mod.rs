//! `copyhold gateway`: the OpenAI-compatible front door. Stateless replicas
//! that authenticate members by key, meter them exactly against their
//! StintQuota (see `ledger`), and pass requests to a ready replica of the
//! ModelDeployment the request names.

pub mod body;
pub mod catalog;
pub mod demand;
pub mod failure;
pub mod hold;
pub mod keys;
pub mod ledger_sync;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod openai;
pub mod quota_checks;
pub mod register;
pub mod router;
pub mod slice_leases;
pub mod sse;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use crate::commons::ledger::{Reservation, Usage};
use crate::commons::stint;
use crate::resources::common::Priority;
use crate::resources::stint_quota::{MemberState, StintQuotaSpec};
use catalog::{Catalog, Target};
use keys::Owner;
use ledger_sync::{Admission, Ledgers, QuotaLedger, Standing};
use limits::{Limited, Limiter, Permit};
use metrics::{
    GatewayMetrics, MemberLabels, ModelLabels, RequestLabels, TokenLabels, UpstreamErrorLabels,
};
use openai::{ApiError, Checked, Endpoint};
use router::Loads;
use sse::{SseFilter, UpstreamUsage};

/// How the gateway runs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    /// Where `/metrics` is served: a port of its own, never the public API
    /// port (per-member series name tenants and their members).
    pub metrics_listen: SocketAddr,
    /// Watch only this namespace (quotas, keys, models); all when absent.
    pub watch_namespace: Option<String>,
    /// Namespaces whose key Secrets (labelled `copyhold.dev/api-key=true`)
    /// are read; empty: where the rest is watched. Name them when the
    /// gateway may read Secrets only there (namespaced RBAC).
    pub key_namespaces: Vec<String>,
    /// This replica's name in the register: unique per process.
    pub identity: String,
    /// Largest request body accepted.
    pub body_limit: usize,
    /// Longest wait for a request's line and headers on a connection.
    pub header_timeout: Duration,
    /// Longest wait for a whole request body once its headers arrived.
    pub body_timeout: Duration,
    /// Client connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Largest non-streamed upstream answer buffered; larger is a 502.
    pub max_response_bytes: usize,
    pub connect_timeout: Duration,
    /// Longest wait for an upstream's response headers.
    pub first_byte_timeout: Duration,
    /// Longest silence inside an upstream's response body.
    pub idle_timeout: Duration,
    /// How long a replica that refused a connection is left alone.
    pub eject_for: Duration,
    /// Other replicas tried after a connection failure.
    pub retries: usize,
    /// Clients from these networks count as inside the cluster for
    /// registers of `cluster` visibility.
    pub register_cluster_nets: register::ClusterNets,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            watch_namespace: None,
            key_namespaces: Vec::new(),
            identity: "gateway".into(),
            body_limit: 4 << 20,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_response_bytes: 64 << 20,
            connect_timeout: Duration::from_secs(2),
            first_byte_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(120),
            eject_for: Duration::from_secs(10),
            retries: 2,
            register_cluster_nets: register::ClusterNets::default(),
        }
    }
}

/// Joules per token assumed before a model has reported any, for the
/// energy part of a reservation.
const DEFAULT_JOULES_PER_TOKEN: f64 = 2.0;

struct AppState {
    catalog: Arc<Catalog>,
    ledgers: Ledgers,
    limiter: Limiter,
    loads: Arc<Loads>,
    metrics: Arc<GatewayMetrics>,
    registry: Registry,
    http: reqwest::Client,
    settings: Settings,
    joules_per_token: Mutex<HashMap<String, f64>>,
    ready: std::sync::atomic::AtomicBool,
    /// Requests in flight and held per model, published for the autoscaler.
    demand: Arc<demand::Demand>,
}

/// The gateway's state once the API server's lists arrived: the catalog
/// watching, the ledgers ready to start.
async fn start(client: kube::Client, settings: &Settings) -> anyhow::Result<Arc<AppState>> {
    let mut registry = Registry::default();
    let metrics = Arc::new(GatewayMetrics::register(&mut registry));
    let catalog = Catalog::start(
        &client,
        settings.watch_namespace.as_deref(),
        &settings.key_namespaces,
    );
    let http = reqwest::Client::builder()
        .connect_timeout(settings.connect_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()?;
    let demand = demand::Demand::new(&settings.identity);
    tokio::spawn(demand.clone().publish(client.clone()));
    let state = Arc::new(AppState {
        catalog: catalog.clone(),
        demand,
        ledgers: Ledgers::new(client.clone(), settings.identity.clone(), metrics.clone()),
        limiter: Limiter::default(),
        loads: Arc::new(Loads::default()),
        metrics,
        registry,
        http,
        settings: settings.clone(),
        joules_per_token: Mutex::new(HashMap::new()),
        ready: std::sync::atomic::AtomicBool::new(false),
    });
    if !catalog.ready(Duration::from_secs(60)).await {
        anyhow::bail!("the API server's lists did not arrive within 60 s");
    }
    state.metrics.keys.set(catalog.keys().len() as i64);
    tokio::spawn(quota_checks::run(
        client.clone(),
        catalog.clone(),
        settings.identity.clone(),
    ));
    state.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(state)
}

/// The gateway's routes over live watches and ledgers, without a listener:
/// what `run` serves, and what the front door's property test drives
/// in-process (`e2e/tests/front_door.rs`).
pub async fn app(client: kube::Client, settings: &Settings) -> anyhow::Result<Router> {
    Ok(router(start(client, settings).await?))
}

/// Run until SIGTERM or Ctrl-C; then drain requests and give the slices back.
pub async fn run(client: kube::Client, settings: Settings) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    let addr = listener.local_addr()?;
    let metrics_listener = tokio::net::TcpListener::bind(settings.metrics_listen).await?;
    let metrics_addr = metrics_listener.local_addr()?;
    let state = start(client.clone(), &settings).await?;
    let app = router(state.clone());
    tokio::spawn(serve_metrics(metrics_listener, state.clone()));
    // Tests and scripts wait for this line.
    println!(
        "copyhold gateway listening on {addr} (metrics on {metrics_addr}) as {}",
        settings.identity
    );
    tracing::info!(%addr, %metrics_addr, identity = %settings.identity, "gateway listening");
    let limits = listener::ConnLimits {
        header_timeout: settings.header_timeout,
        max_connections: settings.max_connections,
    };
    listener::serve(listener, app, limits, shutdown_signal()).await;
    tracing::info!("draining done; returning slices");
    state.ledgers.leave_all().await;
    state.demand.withdraw(&client).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// The metrics port: `/metrics` (and the probes), for Prometheus only.
async fn serve_metrics(listener: tokio::net::TcpListener, state: Arc<AppState>) {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::no_such_endpoint() })
        .with_state(state);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metrics listener failed");
    }
}

/// The public API. `/metrics` is not here: it answers the OpenAI-shaped 404
/// of any unknown path.
fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .merge(register::routes())
        .fallback(|| async { ApiError::no_such_endpoint() })
        .method_not_allowed_fallback(|m: axum::http::Method| async move {
            ApiError::method_not_allowed(m.as_str())
        })
        .with_state(state)
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    if s.ready.load(std::sync::atomic::Ordering::SeqCst) {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
    }
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    s.metrics.keys.set(s.catalog.keys().len() as i64);
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &s.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

fn authenticate(s: &AppState, headers: &HeaderMap) -> Result<Owner, ApiError> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .ok_or_else(ApiError::unauthorized)?;
    s.catalog.keys().owner(key).map_err(|why| match why {
        keys::KeyRefusal::Unknown => ApiError::unauthorized(),
        keys::KeyRefusal::Shared => ApiError::key_shared(),
    })
}

async fn models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let owner = match authenticate(&s, &headers) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let data: Vec<Value> = s
        .catalog
        .models_for(&owner)
        .iter()
        .map(|md| {
            json!({
                "id": md.spec.model.served_name.clone().unwrap_or_else(|| kube::ResourceExt::name_any(md.as_ref())),
                "object": "model",
                "created": md.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()).unwrap_or(0),
                "owned_by": owner.namespace,
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn chat(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    handle(s, Endpoint::Chat, headers, body).await
}

async fn completions(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    handle(s, Endpoint::Completions, headers, body).await
}

/// An error with the labels it is counted under.
struct Fail {
    err: Box<ApiError>,
    model: String,
    who: MemberLabels,
    /// Already counted by the request's meter.
    counted: bool,
}

fn fail(err: ApiError, model: &str, who: &MemberLabels) -> Fail {
    Fail {
        err: Box::new(err),
        model: model.into(),
        who: who.clone(),
        counted: false,
    }
}

/// A failure after metering began: the meter has counted it.
fn metered_fail(err: ApiError, model: &str, who: &MemberLabels) -> Fail {
    Fail {
        counted: true,
        ..fail(err, model, who)
    }
}

async fn handle(s: Arc<AppState>, ep: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    match serve(&s, ep, &headers, body, started).await {
        Ok(r) => r,
        Err(f) => {
            if f.counted {
                return f.err.into_response();
            }
            s.metrics
                .requests
                .get_or_create(&RequestLabels::new(&f.who, &f.model, f.err.status.as_u16()))
                .inc();
            f.err.into_response()
        }
    }
}

/// Which limits apply to a member in its standing.
fn member_limits(
    spec: &StintQuotaSpec,
    member: &str,
    state: MemberState,
    replicas: usize,
) -> (Option<u32>, Option<u32>, bool) {
    let m = spec.members.iter().find(|m| m.name == member);
    let l = m.and_then(|m| m.limits.as_ref()).unwrap_or(&spec.limits);
    let throttled = state == MemberState::Throttled;
    let rpm = if throttled {
        Some(spec.sanctions.throttle.requests_per_minute)
    } else {
        l.requests_per_minute
    };
    (
        limits::share(rpm, replicas),
        limits::share(l.concurrent_requests, replicas),
        throttled && spec.sanctions.throttle.only_when_idle,
    )
}

/// A request read, authenticated and checked against the model it names.
struct Asked {
    owner: Owner,
    member: String,
    /// The owner as metrics label it.
    who: MemberLabels,
    /// The served name clients use (what metrics are labelled with).
    model: String,
    body: Value,
    target: Target,
    checked: Checked,
}

/// What admitting a request under the member's stint decided.
struct Admitted {
    spec: StintQuotaSpec,
    ledger: Arc<QuotaLedger>,
    standing: Standing,
    permit: Permit,
}

/// The steps of one request: read it, admit it under the member's stint and
/// limits, reserve its bound, forward it, relay the answer (settling the
/// meter on the way).
async fn serve(
    s: &Arc<AppState>,
    ep: Endpoint,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<Response, Fail> {
    let mut asked = read_request(s, ep, headers, body).await?;
    refuse_deferred(&asked)?;
    let admitted = admit(s, &asked)?;
    let (max_tokens, reservation) = bound(s, &asked, &admitted.spec);
    reserve(&admitted.ledger, &asked, reservation).await?;
    let extra = stint_headers(&admitted.standing);
    let mut meter = Meter::start(s, &asked, admitted, reservation, max_tokens, started);
    if let Err(e) = wait_for_replica(s, &mut asked.target, &mut meter).await {
        meter.nothing(e.status.as_u16());
        return Err(metered_fail(e, &asked.model, &asked.who));
    }
    let upstream_body = match upstream_body(&mut asked.body, &asked.checked, max_tokens) {
        Ok(b) => b,
        Err(e) => {
            meter.nothing(500);
            return Err(metered_fail(e, &asked.model, &asked.who));
        }
    };
    let resp = match forward(
        s,
        &asked.target,
        ep,
        &asked.checked,
        upstream_body,
        &mut meter,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            meter.nothing(e.status.as_u16());
            return Err(metered_fail(e, &asked.model, &asked.who));
        }
    };
    let status = resp.status();
    if !status.is_success() {
        return relay_refusal(s, resp, meter, &asked).await;
    }
    if !asked.checked.stream {
        return relay_whole(s, resp, meter, &asked, extra).await;
    }
    Ok(relay_stream(s, resp, meter, &asked.checked, extra))
}

/// Authenticate the key, read the body (within the size limit), and check
/// the request against the model it names.
async fn read_request(
    s: &AppState,
    ep: Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Result<Asked, Fail> {
    // The key first: a stranger's body is never read.
    let owner =
        authenticate(s, headers).map_err(|e| fail(e, "unknown", &MemberLabels::unknown()))?;
    let who = MemberLabels::of(&owner);
    let bytes = self::body::read_within(body, s.settings.body_limit, s.settings.body_timeout)
        .await
        .map_err(|e| fail(body_error(e), "unknown", &who))?;
    let member = owner.member.clone();
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
        fail(
            ApiError::invalid(None, format!("the request body is not valid JSON: {e}")),
            "unknown",
            &who,
        )
    })?;
    let model = match v.get("model").and_then(Value::as_str) {
        Some(m) => m.to_string(),
        None => {
            let e = openai::check(ep, &v, None)
                .err()
                .unwrap_or_else(|| ApiError::invalid(Some("model"), "missing model"));
            return Err(fail(e, "unknown", &who));
        }
    };
    let target = s
        .catalog
        .resolve(&owner, &model)
        .ok_or_else(|| fail(ApiError::model_not_found(&model), "unknown", &who))?;
    let model = target.served_name.clone();
    let checked =
        openai::check(ep, &v, Some(target.context_length)).map_err(|e| fail(e, &model, &who))?;
    Ok(Asked {
        owner,
        member,
        who,
        model,
        body: v,
        target,
        checked,
    })
}

/// A body that could not be read: over the limit is a 413, the rest 400.
fn body_error(e: self::body::BodyError) -> ApiError {
    match e {
        self::body::BodyError::TooLarge { limit } => ApiError::too_large(limit),
        self::body::BodyError::TimedOut { after } => ApiError::body_timeout(after),
        e @ self::body::BodyError::Broken(_) => ApiError::invalid(None, e.to_string()),
    }
}

/// While an energy budget defers the model, deferrable members wait.
fn refuse_deferred(a: &Asked) -> Result<(), Fail> {
    match a.target.deferred {
        Some(retry) if a.owner.priority == Priority::Deferrable => Err(fail(
            ApiError::unavailable(
                "deferred_by_energy_budget",
                "the cluster is running on a reduced energy budget; deferrable requests wait for more supply",
                Some(retry),
            ),
            &a.model,
            &a.who,
        )),
        _ => Ok(()),
    }
}

/// The member's standing and limits: suspended, throttled while the model
/// is busy, over its rate or concurrency, or no ready replica refuse here.
fn admit(s: &AppState, a: &Asked) -> Result<Admitted, Fail> {
    let (model, member) = (a.model.as_str(), a.member.as_str());
    let spec = s
        .catalog
        .quota(&a.owner)
        .map(|q| q.spec.clone())
        .ok_or_else(|| fail(ApiError::unauthorized(), model, &a.who))?;
    let ledger = s.ledgers.get(&a.owner.namespace, &a.owner.quota);
    let standing = ledger.standing(member);
    if standing.state == MemberState::Suspended {
        return Err(fail(
            ApiError::stint_exhausted(
                format!("member {member} has used their stint for this period"),
                standing.seconds_to_reset,
            ),
            model,
            &a.who,
        ));
    }
    let (rpm, concurrent, only_idle) =
        member_limits(&spec, member, standing.state, standing.replicas);
    if only_idle && !s.loads.any_idle(&a.target.replicas) {
        return Err(fail(
            ApiError::rate_limited("throttled: served only while the model is idle", 1),
            model,
            &a.who,
        ));
    }
    let limiter_key = format!("{}/{}/{}", a.owner.namespace, a.owner.quota, member);
    let permit = s
        .limiter
        .acquire(&limiter_key, rpm, concurrent, Instant::now())
        .map_err(|l| fail(limited_error(l, member), model, &a.who))?;
    if a.target.replicas.is_empty() && a.target.hold_for.is_none() {
        return Err(fail(
            ApiError::unavailable(
                "model_not_ready",
                format!("no replica of {model} is ready"),
                Some(5),
            ),
            model,
            &a.who,
        ));
    }
    Ok(Admitted {
        spec,
        ledger,
        standing,
        permit,
    })
}

/// An autoscaled model without a ready replica: hold the admitted request
/// until one is Ready (see `hold`).
async fn wait_for_replica(
    s: &AppState,
    target: &mut Target,
    meter: &mut Meter,
) -> Result<(), ApiError> {
    let (Some(timeout), Some(tracked)) = (target.hold_for, meter.demand.as_mut()) else {
        return Ok(());
    };
    if !target.replicas.is_empty() {
        return Ok(());
    }
    target.replicas = hold::until_ready(&s.catalog, &s.metrics, target, timeout, tracked).await?;
    Ok(())
}

/// The 429 for a limit the member is over.
fn limited_error(l: Limited, member: &str) -> ApiError {
    match l {
        Limited::Rate { retry_after } => ApiError::rate_limited(
            format!("member {member} is over their requests per minute"),
            retry_after,
        ),
        Limited::Concurrency => ApiError::rate_limited(
            format!("member {member} has too many requests in flight"),
            1,
        ),
    }
}

/// The request's bound: its `max_tokens` (the quota's default when the
/// client gave none) and the weighted tokens and energy reserved for it.
fn bound(s: &AppState, a: &Asked, spec: &StintQuotaSpec) -> (i64, Reservation) {
    let max_tokens = a
        .checked
        .max_tokens
        .unwrap_or_else(|| spec.ledger.default_max_tokens.min(a.target.context_length));
    let completion_bound = a.checked.completion_bound(max_tokens);
    let jpt = s
        .joules_per_token
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&a.target.key)
        .copied()
        .unwrap_or(DEFAULT_JOULES_PER_TOKEN);
    let reservation = Reservation {
        tokens: stint::weighted_tokens(spec, a.checked.prompt_bound, completion_bound),
        energy_wh: (a.checked.prompt_bound + completion_bound) as f64 * jpt / 3600.0,
    };
    (max_tokens, reservation)
}

/// Reserve the bound on the member's slice: an exhausted stint is a 429, an
/// unwritable register a 503 (never serve unmetered).
async fn reserve(
    ledger: &Arc<QuotaLedger>,
    a: &Asked,
    reservation: Reservation,
) -> Result<(), Fail> {
    let (model, member) = (a.model.as_str(), a.member.as_str());
    match ledger.reserve(member, reservation).await {
        Ok(Admission::Admitted) => Ok(()),
        Ok(Admission::Exhausted { retry_after }) => Err(fail(
            ApiError::stint_exhausted(
                format!("member {member} has used their stint for this period"),
                retry_after,
            ),
            model,
            &a.who,
        )),
        Err(e) => {
            tracing::error!(error = %e, quota = %a.owner.quota, "ledger unavailable; refusing rather than serving unmetered");
            Err(fail(
                ApiError::unavailable(
                    "ledger_unavailable",
                    "the usage register cannot be written right now",
                    Some(2),
                ),
                model,
                &a.who,
            ))
        }
    }
}

/// The upstream request: our bound made explicit, usage always asked for.
fn upstream_body(v: &mut Value, checked: &Checked, max_tokens: i64) -> Result<Bytes, ApiError> {
    if let Some(o) = v.as_object_mut() {
        if checked.max_tokens.is_none() {
            o.insert("max_tokens".into(), json!(max_tokens));
        }
        if checked.stream {
            o.insert("stream_options".into(), json!({"include_usage": true}));
        }
    }
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// The stint headers a member not in good standing gets on every answer.
fn stint_headers(standing: &Standing) -> HeaderMap {
    let mut extra = HeaderMap::new();
    if standing.state != MemberState::Ok
        && let Some(rem) = standing.remaining_tokens
        && let Ok(h) = HeaderValue::from_str(&rem.to_string())
    {
        extra.insert("x-copyhold-stint-remaining", h);
    }
    if standing.state != MemberState::Ok {
        let st = serde_json::to_value(standing.state)
            .ok()
            .and_then(|x| x.as_str().map(String::from))
            .unwrap_or_default();
        if let Ok(h) = HeaderValue::from_str(&st) {
            extra.insert("x-copyhold-stint-state", h);
        }
    }
    extra
}

/// An engine's error answer: a 5xx becomes our 502 (counted), a 4xx is the
/// client's and passes on as it is. Nothing is charged.
async fn relay_refusal(
    s: &AppState,
    resp: reqwest::Response,
    mut meter: Meter,
    a: &Asked,
) -> Result<Response, Fail> {
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let text = read_limited(resp, s.settings.idle_timeout, s.settings.max_response_bytes)
        .await
        .unwrap_or_default();
    if status.is_server_error() {
        meter.code = 502;
        match failure::charge_of(content_type.as_deref(), &text) {
            failure::Charge::Usage(u) => meter.settle(Some(u)),
            failure::Charge::Reservation => meter.settle(None),
            failure::Charge::Nothing => meter.nothing(502),
        }
        count_upstream_error(s, &a.model, "status");
        let msg = serde_json::from_slice::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&text).chars().take(200).collect());
        return Err(metered_fail(
            ApiError::bad_gateway(format!("the model server answered {status}: {msg}")),
            &a.model,
            &a.who,
        ));
    }
    meter.nothing(status.as_u16());
    let mut r = Response::new(Body::from(text));
    *r.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

/// A whole (non-streamed) answer: settle with the usage it reports; one
/// that breaks off is charged the bound.
async fn relay_whole(
    s: &AppState,
    resp: reqwest::Response,
    mut meter: Meter,
    a: &Asked,
    extra: HeaderMap,
) -> Result<Response, Fail> {
    let max = s.settings.max_response_bytes;
    let body = match read_limited(resp, s.settings.idle_timeout, max).await {
        Ok(b) => b,
        Err(kind) => {
            count_upstream_error(s, &a.model, kind);
            // The engine did work we cannot measure: the bound is charged.
            meter.code = 502;
            drop(meter);
            let err = if kind == "too_large" {
                ApiError::response_too_large(max)
            } else {
                ApiError::bad_gateway("the model server's response broke off")
            };
            return Err(metered_fail(err, &a.model, &a.who));
        }
    };
    let usage = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| sse::usage_of(&v));
    meter.settle(usage);
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut().extend(extra);
    Ok(r)
}

/// Streaming: pass events on as they come, settle when the stream ends
/// (or when the client goes away and the stream is dropped).
fn relay_stream(
    s: &AppState,
    resp: reqwest::Response,
    meter: Meter,
    checked: &Checked,
    extra: HeaderMap,
) -> Response {
    let idle = s.settings.idle_timeout;
    let upstream = resp.bytes_stream();
    let filter = SseFilter::new(checked.include_usage);
    let first = true;
    let stream = futures::stream::unfold(
        Some((Box::pin(upstream), filter, meter, first)),
        move |st| async move {
            let (mut up, mut filter, mut meter, first) = st?;
            loop {
                match tokio::time::timeout(idle, up.next()).await {
                    Ok(Some(Ok(chunk))) => {
                        if first {
                            meter.first_byte();
                        }
                        let out = filter.push(&chunk);
                        meter.seen = filter.usage;
                        if out.is_empty() {
                            continue;
                        }
                        return Some((
                            Ok::<Bytes, std::io::Error>(Bytes::from(out)),
                            Some((up, filter, meter, false)),
                        ));
                    }
                    Ok(None) => {
                        let rest = filter.finish();
                        let complete = filter.saw_done || filter.usage.is_some();
                        if !complete {
                            count_upstream_error(&meter.state, &meter.model, "body");
                        }
                        meter.settle(filter.usage);
                        if rest.is_empty() {
                            return None;
                        }
                        return Some((Ok(Bytes::from(rest)), None));
                    }
                    Ok(Some(Err(e))) => {
                        count_upstream_error(&meter.state, &meter.model, "body");
                        tracing::warn!(error = %e, model = %meter.model, "upstream stream broke off");
                        meter.code = 502;
                        // Dropping the meter charges the reservation.
                        return None;
                    }
                    Err(_) => {
                        count_upstream_error(&meter.state, &meter.model, "timeout");
                        meter.code = 504;
                        return None;
                    }
                }
            }
        },
    );
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.extend(extra);
    r
}

fn count_upstream_error(s: &AppState, model: &str, kind: &str) {
    s.metrics
        .upstream_errors
        .get_or_create(&UpstreamErrorLabels {
            model: model.into(),
            kind: kind.into(),
        })
        .inc();
}

/// Read a whole (non-streamed) upstream body, with a silence limit and a
/// size bound (`--max-response-bytes`): past it, `too_large`.
async fn read_limited(
    resp: reqwest::Response,
    idle: Duration,
    max: usize,
) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::new();
    let mut st = resp.bytes_stream();
    loop {
        match tokio::time::timeout(idle, st.next()).await {
            Ok(Some(Ok(b))) => {
                if out.len() + b.len() > max {
                    return Err("too_large");
                }
                out.extend_from_slice(&b);
            }
            Ok(Some(Err(_))) => return Err("body"),
            Ok(None) => return Ok(out),
            Err(_) => return Err("timeout"),
        }
    }
}

/// Send to a replica; on a refused connection, eject it and try another
/// (no byte has reached an engine, so a retry cannot double-serve).
async fn forward(
    s: &Arc<AppState>,
    target: &Target,
    ep: Endpoint,
    checked: &Checked,
    body: Bytes,
    meter: &mut Meter,
) -> Result<reqwest::Response, ApiError> {
    let mut tried: Vec<String> = Vec::new();
    for _ in 0..=s.settings.retries {
        // Released when dropped: on every error below, and when the client
        // leaves while we wait.
        let Some((replica, held)) = s
            .loads
            .hold(&target.replicas, &checked.affinity_key, &tried)
        else {
            break;
        };
        let url = format!("{}{}", replica.base_url, ep.path());
        // From here an engine may be working on it: a client that leaves
        // while we wait is charged the reservation (the explicit outcomes
        // below settle first and win).
        meter.charge_on_drop = true;
        let send = s
            .http
            .post(&url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send();
        match tokio::time::timeout(s.settings.first_byte_timeout, send).await {
            Ok(Ok(r)) => {
                meter.load = Some(held);
                return Ok(r);
            }
            Ok(Err(e)) if e.is_connect() => {
                drop(held);
                s.loads.eject(&replica.name, s.settings.eject_for);
                count_upstream_error(s, &meter.model, "connect");
                tracing::warn!(replica = %replica.name, error = %e, "replica refused the connection; ejected");
                tried.push(replica.name);
            }
            Ok(Err(e)) => {
                count_upstream_error(
                    s,
                    &meter.model,
                    if e.is_timeout() { "timeout" } else { "request" },
                );
                return Err(if e.is_timeout() {
                    ApiError::gateway_timeout(format!("the model server did not answer: {e}"))
                } else {
                    ApiError::bad_gateway(format!("the model server failed: {e}"))
                });
            }
            Err(_) => {
                count_upstream_error(s, &meter.model, "timeout");
                return Err(ApiError::gateway_timeout(format!(
                    "the model server did not answer within {} s",
                    s.settings.first_byte_timeout.as_secs()
                )));
            }
        }
    }
    Err(ApiError::bad_gateway(format!(
        "no replica of {} accepted the connection",
        target.served_name
    )))
}

/// One request's account: settled exactly once, with the usage the
/// upstream reported, with nothing when no engine saw the request, and with
/// the full reservation when an engine saw it but no usage came back.
struct Meter {
    state: Arc<AppState>,
    ledger: Arc<QuotaLedger>,
    spec: StintQuotaSpec,
    member: String,
    /// The member as metrics label it.
    who: MemberLabels,
    model: String,
    target_key: String,
    reservation: Reservation,
    full: Usage,
    started: Instant,
    code: u16,
    settled: bool,
    /// Set once an engine has accepted the request.
    charge_on_drop: bool,
    /// The usage the upstream reported, once its usage chunk went by: a
    /// client that leaves after it is charged that, not the reservation.
    seen: Option<UpstreamUsage>,
    /// The replica's load, released when the request ends.
    load: Option<router::Held>,
    _permit: Permit,
    /// Counted in this replica's published demand until dropped (for
    /// autoscaled models only: no other model's demand is read).
    demand: Option<demand::Tracked>,
}

impl Meter {
    /// A reserved request's meter, counted in flight from now on; it holds
    /// the member's permit until it settles.
    fn start(
        s: &Arc<AppState>,
        a: &Asked,
        admitted: Admitted,
        reservation: Reservation,
        max_tokens: i64,
        started: Instant,
    ) -> Self {
        let completion_bound = a.checked.completion_bound(max_tokens);
        s.metrics
            .in_flight
            .get_or_create(&ModelLabels {
                model: a.model.clone(),
            })
            .inc();
        Meter {
            state: s.clone(),
            ledger: admitted.ledger,
            spec: admitted.spec,
            member: a.member.clone(),
            who: a.who.clone(),
            model: a.model.clone(),
            target_key: a.target.key.clone(),
            reservation,
            full: Usage {
                prompt_tokens: a.checked.prompt_bound,
                completion_tokens: completion_bound,
                tokens: reservation.tokens,
                energy_wh: reservation.energy_wh,
                requests: 1,
            },
            started,
            code: 200,
            settled: false,
            charge_on_drop: false,
            seen: None,
            load: None,
            _permit: admitted.permit,
            demand: a.target.hold_for.map(|_| s.demand.track(&a.target.key)),
        }
    }

    fn first_byte(&self) {
        self.state
            .metrics
            .time_to_first_token
            .get_or_create(&ModelLabels {
                model: self.model.clone(),
            })
            .observe(self.started.elapsed().as_secs_f64());
    }

    /// The request never reached an engine (or the engine refused it).
    fn nothing(&mut self, code: u16) {
        self.code = code;
        self.finish(Usage::default(), false);
    }

    fn settle(&mut self, usage: Option<UpstreamUsage>) {
        let u = match usage {
            Some(u) => Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                tokens: stint::weighted_tokens(&self.spec, u.prompt_tokens, u.completion_tokens),
                energy_wh: u.energy_joules / 3600.0,
                requests: 1,
            },
            None => {
                tracing::warn!(
                    member = %self.member, model = %self.model,
                    tokens = self.full.tokens,
                    "the model server returned no usage; charging the full reservation"
                );
                self.full.clone()
            }
        };
        if let Some(u) = usage
            && u.energy_joules > 0.0
            && u.prompt_tokens + u.completion_tokens > 0
        {
            let per = u.energy_joules / (u.prompt_tokens + u.completion_tokens) as f64;
            let mut m = self
                .state
                .joules_per_token
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let e = m.entry(self.target_key.clone()).or_insert(per);
            *e = 0.8 * *e + 0.2 * per;
        }
        self.finish(u, true);
    }

    fn finish(&mut self, u: Usage, served: bool) {
        if self.settled {
            return;
        }
        self.settled = true;
        self.ledger.settle(&self.member, self.reservation, &u);
        let m = &self.state.metrics;
        drop(self.load.take());
        m.in_flight
            .get_or_create(&ModelLabels {
                model: self.model.clone(),
            })
            .dec();
        if served {
            for (kind, n) in [
                ("prompt", u.prompt_tokens),
                ("completion", u.completion_tokens),
            ] {
                m.tokens
                    .get_or_create(&TokenLabels::new(&self.who, kind))
                    .inc_by(n.max(0) as u64);
            }
            m.energy_joules
                .get_or_create(&self.who)
                .inc_by(u.energy_wh * 3600.0);
        }
        m.requests
            .get_or_create(&RequestLabels::new(&self.who, &self.model, self.code))
            .inc();
        m.request_duration
            .get_or_create(&ModelLabels {
                model: self.model.clone(),
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if self.charge_on_drop {
            // Client gone or stream broken after an engine took the request.
            if self.code == 200 {
                self.code = 499;
            }
            if let Some(u) = self.seen.take() {
                self.settle(Some(u));
                return;
            }
            let full = self.full.clone();
            tracing::info!(member = %self.member, model = %self.model, "response ended early; charging the full reservation");
            self.finish(full, true);
        } else {
            self.finish(Usage::default(), false);
        }
    }
}
