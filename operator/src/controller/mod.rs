//! `copyhold controller`: one leader reconciles ModelDeployments into
//! Deployments and Services placed on the GPUs that fit.

pub mod autoscaler;
pub mod download;
pub mod energy_budget;
pub mod kept;
pub mod ledger;
pub mod model_deployment;
pub mod models_in_use;
pub mod written;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use prometheus_client::registry::Registry;

use crate::error::Error;
use crate::leader::{Elector, Timing};
use crate::metrics::{ControllerMetrics, EnergyMetrics, ErrorLabels};
use crate::resources::{EnergyBudget, ModelDeployment};
use crate::serving::workload::EngineDefaults;

/// Field manager of every server-side apply the controller sends.
pub const FIELD_MANAGER: &str = "copyhold";

/// Settings of a controller process.
#[derive(Clone, Debug)]
pub struct Settings {
    pub metrics_addr: SocketAddr,
    pub leader_election: bool,
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub timing: Timing,
    pub defaults: EngineDefaults,
    /// Only reconcile objects of this namespace (a namespaced install);
    /// all namespaces when `None`. Placement always sees the whole fleet.
    pub watch_namespace: Option<String>,
    /// Only reconcile EnergyBudgets matching this label selector; all when
    /// `None`.
    pub budget_selector: Option<String>,
    /// Requeue period of a healthy object (drift is also caught by watches).
    pub resync: Duration,
    /// Reconciles in flight at once, per controller
    /// (`--max-concurrent-reconciles`).
    pub concurrency: u16,
}

/// Watch-fed indexes the reconciler reads instead of asking the API server.
pub struct Indexes {
    /// The fleet, for placement.
    pub nodes: Store<Node>,
    /// Every Pod, for the GPUs already allocated on each node.
    pub pods: Store<Pod>,
    /// The Deployments and Services we own, as last seen by their watches.
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    /// The gateways' demand Leases (label `copyhold.dev/gateway-demand`).
    pub leases: Store<Lease>,
    /// The ModelDeployments themselves: a deleted one's planned GPUs are
    /// dropped from the ledger.
    pub models: Store<ModelDeployment>,
}

/// What every reconciliation gets.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<ControllerMetrics>,
    pub defaults: EngineDefaults,
    pub indexes: Indexes,
    pub resync: Duration,
    /// For reading model configs and safetensors headers from http sources.
    pub http: reqwest::Client,
    /// Model sizes read from sources, kept a while so resyncs do not refetch.
    pub sources: crate::serving::model_source::SourceCache,
    /// Demand read from the gateways, and each model's recommendations.
    pub autoscaler: autoscaler::Autoscaler,
    /// GPUs planned and not yet held by bound Pods: placements are decided
    /// one at a time against it.
    pub ledger: ledger::Ledger,
    /// Statuses written and not yet in the cache: a reconcile on an older
    /// version starts from them, and does not write them again.
    pub statuses: written::Statuses,
    /// Consecutive failures per object, for exponential backoff.
    failures: std::sync::Mutex<HashMap<ObjectRef<ModelDeployment>, u32>>,
}

impl Context {
    /// Forget an object's failures after a successful reconcile.
    pub fn succeeded(&self, md: &ModelDeployment) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ObjectRef::from_obj(md));
    }

    pub fn new(
        client: Client,
        metrics: Arc<ControllerMetrics>,
        defaults: EngineDefaults,
        indexes: Indexes,
        resync: Duration,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "copyhold".into(),
                instance: None,
            },
        );
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            client,
            recorder,
            metrics,
            defaults,
            autoscaler: autoscaler::Autoscaler::new(indexes.leases.clone()),
            indexes,
            resync,
            http,
            sources: crate::serving::model_source::SourceCache::new(Duration::from_secs(600)),
            ledger: ledger::Ledger::default(),
            statuses: written::Statuses::default(),
            failures: Default::default(),
        }
    }
}

fn error_policy(md: Arc<ModelDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(md.as_ref());
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels {
            kind: "ModelDeployment".into(),
            error: error.metric_label().into(),
        })
        .inc();
    // Exponential backoff per object, 1 s doubling to 5 min: never a hot loop.
    let n = {
        let mut f = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = Duration::from_secs(1u64 << n.min(9)).min(Duration::from_secs(300));
    tracing::warn!(name = %md.metadata.name.as_deref().unwrap_or(""), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Serve /metrics, /healthz and /readyz until the process ends.
async fn serve_health(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Arc<std::sync::atomic::AtomicBool>,
) {
    async fn metrics(
        State((registry, _)): State<(Arc<Registry>, Arc<std::sync::atomic::AtomicBool>)>,
    ) -> (StatusCode, [(&'static str, &'static str); 1], String) {
        let mut text = String::new();
        match prometheus_client::encoding::text::encode(&mut text, &registry) {
            Ok(()) => (
                StatusCode::OK,
                [(
                    "content-type",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                text,
            ),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                [("content-type", "text/plain")],
                e.to_string(),
            ),
        }
    }
    async fn readyz(
        State((_, ready)): State<(Arc<Registry>, Arc<std::sync::atomic::AtomicBool>)>,
    ) -> StatusCode {
        if ready.load(std::sync::atomic::Ordering::Relaxed) {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state((registry, ready));
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "health server failed");
            }
        }
        Err(e) => tracing::error!(%addr, error = %e, "cannot bind the metrics address"),
    }
}

/// A client that counts every request it sends, by HTTP method and
/// resource (`copyhold_controller_api_requests_total`): what the API server
/// is asked to do per object, the cost `copyhold bench controller` reports.
pub fn counted_client(
    config: kube::Config,
    metrics: &ControllerMetrics,
) -> Result<Client, kube::Error> {
    let counter = metrics.api_requests.clone();
    let layer = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        counter
            .get_or_create(&crate::metrics::VerbLabels {
                verb: req.method().as_str().to_owned(),
                resource: resource_of_path(req.uri().path()),
            })
            .inc();
        req
    });
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&layer)
        .build())
}

/// The resource an API path names: `deployments`, `modeldeployments/status`
/// (a subresource after a `/`), `other` for discovery and the like.
/// Paths are `/api/v1/…` or `/apis/<group>/<version>/…`, then
/// `namespaces/<ns>/` for a namespaced resource, then the plural, a name
/// and a subresource.
pub fn resource_of_path(path: &str) -> String {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match parts.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return "other".into(),
    };
    let rest = match rest {
        // `namespaces/<ns>/<plural>…` is namespaced; `namespaces[/<ns>]`
        // alone is the Namespace itself.
        ["namespaces", _ns, plural, tail @ ..] => {
            return with_subresource(plural, tail);
        }
        rest => rest,
    };
    match rest {
        [plural, tail @ ..] => with_subresource(plural, tail),
        [] => "other".into(),
    }
}

/// `plural` with the subresource after its name, if any.
fn with_subresource(plural: &str, tail: &[&str]) -> String {
    match tail {
        [_name, sub, ..] => format!("{plural}/{sub}"),
        _ => plural.to_owned(),
    }
}

/// Run the controller until SIGTERM/SIGINT, or until leadership is lost
/// (then the process exits non-zero and Kubernetes restarts it as a standby).
pub async fn run(config: kube::Config, settings: Settings) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let metrics = Arc::new(ControllerMetrics::register(&mut registry));
    let energy = Arc::new(EnergyMetrics::register(&mut registry));
    let registry = Arc::new(registry);
    let client = counted_client(config, &metrics)?;
    // Without the CRDs every watch would fail with a bare 404, forever:
    // stop and say so. Any other failure of the check is left to the
    // watches, which retry.
    match crate::crd_check::require_installed(&client, settings.watch_namespace.as_deref()).await {
        Err(e @ crate::crd_check::CrdError::Missing { .. }) => return Err(e.into()),
        Err(e) => tracing::warn!(error = %e, "could not check the CRDs"),
        Ok(()) => {}
    }
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(serve_health(
        settings.metrics_addr,
        registry.clone(),
        ready.clone(),
    ));
    let elector = if settings.leader_election {
        match become_leader(&client, &settings, &ready).await? {
            Some(e) => Some(e),
            // Shut down while standing by.
            None => return Ok(()),
        }
    } else {
        None
    };
    metrics.leader.set(1);
    // Renewal runs from the moment the lease is held, while the caches
    // warm too: a leader that cannot renew stops (the leading is dropped)
    // before a standby may take over.
    let leading = lead(client, &settings, metrics.clone(), energy, ready);
    match &elector {
        Some(e) => {
            tokio::select! {
                r = leading => { e.release().await; r }
                lost = e.hold() => {
                    metrics.leader.set(0);
                    Err(lost.into())
                }
            }
        }
        None => leading.await,
    }
}

/// What the leader does: warm the caches, then run the controllers until
/// a shutdown signal.
async fn lead(
    client: Client,
    settings: &Settings,
    metrics: Arc<ControllerMetrics>,
    energy: Arc<EnergyMetrics>,
    ready: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    let (nodes, pods) = fleet_indexes(&client).await?;
    let ns = &settings.watch_namespace;
    // What we own, by the label every owned object carries.
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=copyhold");
    let (deployments, dep_writer) = reflector::store::<Deployment>();
    // The same streams fill the indexes and trigger reconciles, so a
    // reconcile never reads an owned object older than what triggered it.
    let dep_stream = reflector::reflector(
        dep_writer,
        watcher(scoped::<Deployment>(&client, ns), owned.clone())
            .modify(|d: &mut Deployment| d.metadata.managed_fields = None),
    )
    .default_backoff()
    .touched_objects();
    let (services, svc_writer) = reflector::store::<Service>();
    let svc_stream = reflector::reflector(
        svc_writer,
        watcher(scoped::<Service>(&client, ns), owned)
            .modify(|s: &mut Service| s.metadata.managed_fields = None),
    )
    .default_backoff()
    .touched_objects();
    let (leases, lease_writer) = reflector::store::<Lease>();
    let lease_stream = reflector::reflector(
        lease_writer,
        watcher(
            scoped::<Lease>(&client, ns),
            watcher::Config::default().labels(crate::serving::autoscale::DEMAND_LABEL),
        ),
    )
    .default_backoff()
    .touched_objects();
    // The models' own index, without managedFields: every writer of a
    // model (its author, this status, the budgets' annotations) adds an
    // entry nobody here reads, a large part of each cached object.
    let (models, model_writer) = reflector::store::<ModelDeployment>();
    let model_stream = reflector::reflector(
        model_writer,
        watcher(
            scoped::<ModelDeployment>(&client, ns),
            watcher::Config::default(),
        )
        .modify(|m: &mut ModelDeployment| m.metadata.managed_fields = None),
    )
    .default_backoff()
    .applied_objects();
    let controller = Controller::for_stream(model_stream, models)
        .with_config(controller::Config::default().concurrency(settings.concurrency));
    let indexes = Indexes {
        nodes,
        pods,
        deployments,
        services,
        leases,
        models: controller.store(),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        settings.defaults.clone(),
        indexes,
        settings.resync,
    ));
    // A model's Pods trigger it: one left Pending (its GPUs went
    // elsewhere) is placed again at once, not at the resync. Metadata
    // only: the event is what matters, the fleet index has the rest.
    let pod_stream = watcher(
        scoped::<kube::core::PartialObjectMeta<Pod>>(&client, ns),
        watcher::Config::default().labels(crate::serving::workload::MD_LABEL),
    )
    .default_backoff()
    .touched_objects();
    tokio::spawn(count_states(controller.store(), metrics.clone()));
    let energy_controller = energy_controller(&client, settings, &ctx, energy, controller.store());
    // The fetchers evict only with a cache bound, and only models the
    // in-use ConfigMaps do not name.
    let in_use = {
        let (client, store, metrics) = (client.clone(), controller.store(), metrics.clone());
        let bounded = settings.defaults.model_cache_max_bytes.is_some();
        async move {
            if bounded {
                models_in_use::publish(client, store, &metrics).await;
            }
            futures::future::pending::<()>().await
        }
    };
    let controller = controller
        .owns_stream(dep_stream)
        .owns_stream(svc_stream)
        .watches_stream(lease_stream, demanded_models)
        .watches_stream(pod_stream, model_of_pod)
        .graceful_shutdown_on(shutdown_signal())
        .run(model_deployment::reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        });
    // The in-use writer never ends: the controllers' end (a shutdown
    // signal) ends the whole.
    let controller = async move {
        tokio::select! {
            _ = futures::future::join(controller, energy_controller) => {}
            () = in_use => {}
        }
    };
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    controller.await;
    Ok(())
}

/// Stand by until this process holds the lease. A standby is ready: it is
/// what a rollout waits for, and it serves its metrics; once leading, it is
/// ready again when its watches are. `None`: shut down while standing by.
async fn become_leader(
    client: &Client,
    settings: &Settings,
    ready: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<Option<Elector>> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &settings.lease_namespace);
    let e = Elector::new(
        api,
        &settings.lease_name,
        &settings.identity,
        settings.timing.clone(),
    );
    tracing::info!(identity = %settings.identity, lease = %settings.lease_name, "waiting to become leader");
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::select! {
        r = e.acquire() => r?,
        _ = shutdown_signal() => return Ok(None),
    }
    tracing::info!(identity = %settings.identity, "became leader");
    ready.store(false, std::sync::atomic::Ordering::Relaxed);
    Ok(Some(e))
}

/// Watch-fed indexes of the fleet: what placement reads on every
/// reconcile. Returns once both have listed.
async fn fleet_indexes(client: &Client) -> anyhow::Result<(Store<Node>, Store<Pod>)> {
    let (nodes, node_writer) = reflector::store::<Node>();
    let node_stream = reflector::reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()).modify(slim_node),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|_| futures::future::ready(()));
    let (pods, pod_writer) = reflector::store::<Pod>();
    let pod_stream = reflector::reflector(
        pod_writer,
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).modify(slim_pod),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|_| futures::future::ready(()));
    tokio::spawn(node_stream);
    tokio::spawn(pod_stream);
    nodes
        .wait_until_ready()
        .await
        .map_err(|e| anyhow::anyhow!("node index: {e}"))?;
    pods.wait_until_ready()
        .await
        .map_err(|e| anyhow::anyhow!("pod index: {e}"))?;
    Ok((nodes, pods))
}

/// An Api over one namespace when the controller watches one, else all.
fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The EnergyBudget controller: evaluated every evaluationInterval by the
/// same leader. Triggered by spec changes, the finalizer and the deletion
/// only (their own status writes would otherwise trigger them again at
/// once); the requeue paces them.
fn energy_controller(
    client: &Client,
    settings: &Settings,
    ctx: &Context,
    energy: Arc<EnergyMetrics>,
    model_deployments: Store<ModelDeployment>,
) -> impl std::future::Future<Output = ()> + use<> {
    let (budgets, budget_writer) = reflector::store::<EnergyBudget>();
    let energy_ctx = Arc::new(
        energy_budget::EnergyContext::new(
            client.clone(),
            ctx.recorder.clone(),
            ctx.metrics.clone(),
            energy,
            ctx.indexes.nodes.clone(),
            ctx.indexes.pods.clone(),
            model_deployments,
            settings.watch_namespace.clone(),
        )
        .with_node_admin_token_secret(settings.defaults.admin_token_secret.clone())
        .with_budgets(budgets.clone()),
    );
    let selected = match &settings.budget_selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    };
    let budget_stream = reflector::reflector(
        budget_writer,
        watcher(Api::<EnergyBudget>::all(client.clone()), selected),
    )
    .default_backoff()
    .applied_objects()
    .predicate_filter(
        energy_budget::trigger,
        kube::runtime::utils::PredicateConfig::default(),
    );
    Controller::for_stream(budget_stream, budgets)
        .with_config(controller::Config::default().concurrency(settings.concurrency))
        .graceful_shutdown_on(shutdown_signal())
        .run(
            energy_budget::reconcile,
            energy_budget::error_policy,
            energy_ctx,
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "energy budget controller event");
            }
        })
}

/// The ModelDeployments a gateway's demand Lease names: a change of their
/// demand reconciles them at once.
fn demanded_models(lease: Lease) -> Vec<ObjectRef<ModelDeployment>> {
    use kube::ResourceExt as _;
    let ns = lease.namespace().unwrap_or_default();
    lease
        .annotations()
        .get(crate::serving::autoscale::DEMAND_ANNOTATION)
        .and_then(|a| serde_json::from_str::<crate::serving::autoscale::PublishedDemand>(a).ok())
        .map(|m| {
            m.keys()
                .map(|name| ObjectRef::new(name).within(&ns))
                .collect()
        })
        .unwrap_or_default()
}

/// The ModelDeployment a serving Pod belongs to (its model label).
fn model_of_pod(pod: kube::core::PartialObjectMeta<Pod>) -> Option<ObjectRef<ModelDeployment>> {
    use kube::ResourceExt as _;
    let ns = pod.namespace()?;
    let name = pod.labels().get(crate::serving::workload::MD_LABEL)?;
    Some(ObjectRef::new(name).within(&ns))
}

/// Keep in the index only what placement reads of a Node: a real node's
/// status lists every image it holds, which would dwarf the rest.
fn slim_node(n: &mut Node) {
    n.metadata.managed_fields = None;
    n.metadata.annotations = None;
    if let Some(s) = n.status.as_mut() {
        s.images = None;
        s.volumes_attached = None;
        s.volumes_in_use = None;
        s.node_info = None;
    }
}

/// Keep in the index only what placement and status read of a Pod.
fn slim_pod(p: &mut Pod) {
    p.metadata.managed_fields = None;
    p.metadata.annotations = None;
    if let Some(spec) = p.spec.as_mut() {
        spec.volumes = None;
        for c in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            c.env = None;
            c.args = None;
            c.command = None;
            c.volume_mounts = None;
            c.liveness_probe = None;
            c.readiness_probe = None;
            c.startup_probe = None;
        }
    }
    if let Some(s) = p.status.as_mut() {
        s.container_statuses = None;
        // The `fetch` init container's state: a huggingFace model's
        // download (controller::download).
        if let Some(inits) = s.init_container_statuses.as_mut() {
            inits.retain(|c| c.name == "fetch");
            for c in inits.iter_mut() {
                c.image_id = String::new();
            }
        }
        s.conditions = None;
    }
}

/// Keep `copyhold_controller_objects{kind,state}` current from the index.
async fn count_states(store: Store<ModelDeployment>, metrics: Arc<ControllerMetrics>) {
    const STATES: [&str; 5] = ["Pending", "Ready", "Shed", "Unplaceable", "Invalid"];
    loop {
        let mut counts: HashMap<&str, i64> = STATES.iter().map(|s| (*s, 0)).collect();
        for md in store.state() {
            let state = md
                .status
                .as_ref()
                .and_then(|s| s.state.as_deref())
                .unwrap_or("Pending");
            if let Some(n) = STATES
                .iter()
                .find(|s| **s == state)
                .and_then(|s| counts.get_mut(s))
            {
                *n += 1;
            }
        }
        for (state, n) in counts {
            metrics
                .objects
                .get_or_create(&crate::metrics::StateLabels {
                    kind: "ModelDeployment".into(),
                    state: state.into(),
                })
                .set(n);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::resource_of_path;

    #[test]
    fn a_request_is_counted_under_the_resource_its_path_names() {
        let cases = [
            ("/apis/apps/v1/namespaces/a/deployments/m0", "deployments"),
            (
                "/apis/copyhold.dev/v1alpha1/namespaces/a/modeldeployments/m0/status",
                "modeldeployments/status",
            ),
            ("/api/v1/namespaces/a/events", "events"),
            ("/api/v1/pods", "pods"),
            ("/api/v1/nodes/n1", "nodes"),
            ("/api/v1/namespaces/a", "namespaces"),
            ("/apis/apps/v1/deployments", "deployments"),
            ("/apis", "other"),
            ("/version", "other"),
        ];
        for (path, resource) in cases {
            assert_eq!(resource_of_path(path), resource, "{path}");
        }
    }
}
