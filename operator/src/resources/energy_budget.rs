//! `EnergyBudget`: keep the draw of a set of nodes under what the community's
//! own renewable supply gives, less a margin.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, ConfigMapKeyRef, Priority, SecretKeyRef};

/// A power budget for the nodes it selects: allowance = min(ceiling,
/// supply × (1 − margin)), enforced by a ladder of degradations.
///
/// Cluster-scoped, because it governs Nodes and may shed ModelDeployments of
/// any namespace that run on them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "copyhold.dev",
    version = "v1alpha1",
    kind = "EnergyBudget",
    plural = "energybudgets",
    shortname = "eb",
    category = "copyhold",
    status = "EnergyBudgetStatus",
    printcolumn(name = "Supply W", type_ = "number", json_path = ".status.supplyWatts"),
    printcolumn(
        name = "Allowance W",
        type_ = "number",
        json_path = ".status.allowanceWatts"
    ),
    printcolumn(name = "Draw W", type_ = "number", json_path = ".status.drawWatts"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Step", type_ = "integer", json_path = ".status.step"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EnergyBudgetSpec {
    /// Labels of the Nodes this budget covers (all must match). Empty
    /// covers every node carrying `nvidia.com/gpu.present=true`.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,

    /// Hard ceiling in watts, whatever the supply (the circuit's rating).
    #[schemars(range(min = 1.0, max = 100000000.0))]
    pub ceiling_watts: f64,

    /// Percent of the supply kept unused as slack (0–95).
    #[serde(default = "default_margin")]
    #[schemars(range(min = 0.0, max = 95.0))]
    pub margin_percent: f64,

    /// The renewable supply signal.
    pub supply: SupplySpec,

    /// Where the covered nodes' draw is read.
    #[serde(default)]
    pub draw: DrawSpec,

    /// What to do, in order, when draw exceeds the allowance.
    #[serde(default)]
    pub policy: LadderPolicy,

    /// How often the budget is evaluated.
    #[serde(default = "default_interval")]
    #[schemars(regex(pattern = crate::resources::DURATION_PATTERN))]
    pub evaluation_interval: String,
}

fn default_margin() -> f64 {
    20.0
}
fn default_interval() -> String {
    "15s".into()
}

/// Exactly one signal (`static`, `schedule`, `prometheus`, `http` or
/// `configMap`), with how stale it may get and what is assumed then.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [
    {"required": ["static"]},
    {"required": ["schedule"]},
    {"required": ["prometheus"]},
    {"required": ["http"]},
    {"required": ["configMap"]}
]))]
pub struct SupplySpec {
    /// A fixed supply.
    #[serde(default, rename = "static", skip_serializing_if = "Option::is_none")]
    pub static_: Option<StaticSupply>,
    /// A daily curve (e.g. solar), interpolated between points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleSupply>,
    /// A PromQL instant query returning watts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusQuery>,
    /// An HTTP JSON endpoint, e.g. an inverter's local API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSupply>,
    /// A ConfigMap key holding watts, written by something else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapKeyRef>,
    /// Oldest reading still trusted; older or failing readings mark the
    /// budget `SupplyStale` and switch to the fail-safe value.
    #[serde(default = "default_max_age")]
    #[schemars(regex(pattern = crate::resources::DURATION_PATTERN))]
    pub max_age: String,
    /// Supply assumed once the last good reading has fully decayed.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 100000000.0))]
    pub floor_watts: f64,
    /// Time over which the fail-safe value falls linearly from the last good
    /// reading to `floorWatts`.
    #[serde(default = "default_decay")]
    #[schemars(regex(pattern = crate::resources::DURATION_PATTERN))]
    pub fail_safe_decay: String,
}

fn default_max_age() -> String {
    "5m".into()
}
fn default_decay() -> String {
    "30m".into()
}

/// A constant supply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StaticSupply {
    /// Watts available.
    #[schemars(range(min = 0.0, max = 100000000.0))]
    pub watts: f64,
}

/// A daily curve in a named time zone.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleSupply {
    /// IANA time zone of the times, e.g. `Europe/Berlin`.
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: String,
    /// Points of the default curve, linearly interpolated, wrapping at
    /// midnight. At least two.
    #[schemars(length(min = 2, max = 1440))]
    pub points: Vec<SchedulePoint>,
    /// Curves for particular months, replacing `points` in those months.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub months: Vec<MonthCurve>,
}

/// One point of a daily curve.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulePoint {
    /// Local time of day, `HH:MM`.
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub time: String,
    /// Watts expected at that time.
    #[schemars(range(min = 0.0, max = 100000000.0))]
    pub watts: f64,
}

/// A curve for some months.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonthCurve {
    /// Months (1–12) this curve applies to.
    #[schemars(length(min = 1, max = 12))]
    pub months: Vec<MonthNumber>,
    /// Points of the curve.
    #[schemars(length(min = 2, max = 1440))]
    pub points: Vec<SchedulePoint>,
}

/// A month number, 1–12.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct MonthNumber(#[schemars(range(min = 1, max = 12))] pub u8);

/// A Prometheus instant query.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusQuery {
    /// Base URL of the Prometheus server.
    #[schemars(regex(pattern = r"^https?://[^\s]+$"), length(max = 2048))]
    pub url: String,
    /// PromQL returning one sample in watts.
    #[schemars(length(min = 1, max = 4096))]
    pub query: String,
}

/// An HTTP endpoint answering JSON.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSupply {
    /// URL answering a JSON document.
    #[schemars(regex(pattern = r"^https?://[^\s]+$"), length(max = 2048))]
    pub url: String,
    /// RFC 6901 JSON pointer to the watts value, e.g. `/site/pv_power`.
    #[schemars(regex(pattern = r"^(/[^/]*)*$"), length(max = 1024))]
    pub json_pointer: String,
    /// Multiplier turning the value into watts (e.g. 1000 for kW).
    #[serde(default = "default_scale")]
    #[schemars(range(min = 0.000001, max = 1000000.0))]
    pub scale: f64,
    /// Bearer token sent as `Authorization`, if the endpoint needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_secret: Option<SecretKeyRef>,
    /// RFC 6901 JSON pointer to when the value was measured (RFC 3339, or
    /// seconds since the epoch). Freshness (`maxAge`) then runs from that
    /// time; without it, from when the answer was fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(/[^/]*)*$"), length(max = 1024))]
    pub timestamp_pointer: Option<String>,
}

fn default_scale() -> f64 {
    1.0
}

/// Where draw is measured.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrawSpec {
    /// A PromQL query giving watts per node (label `node` or `Hostname`),
    /// e.g. `sum by (Hostname) (DCGM_FI_DEV_POWER_USAGE)`. Without it the
    /// controller reads `copyhold_node_power_watts` from the nodes' pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusQuery>,
    /// Watts assumed for a covered node with no reading. Defaults to the
    /// rated power of its GPUs from the controller's GPU catalog: a missing
    /// reading never counts as zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1000000.0))]
    pub missing_reading_watts: Option<f64>,
}

/// The degradation ladder: steps taken in order while draw exceeds the
/// allowance, undone one at a time once headroom holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LadderPolicy {
    /// Step 1: lower GPU power limits toward their efficient point.
    #[serde(default)]
    pub power_cap: PowerCapPolicy,
    /// Step 2: shed replicas of these priorities, in this order, down to
    /// each ModelDeployment's minimum. `essential` is not allowed here.
    #[serde(default = "default_shed")]
    #[schemars(length(max = 2))]
    pub shed: Vec<SheddablePriority>,
    /// Step 3: answer deferrable requests with 503 and Retry-After.
    #[serde(default = "default_true")]
    pub defer: bool,
    /// Headroom (percent of the allowance) that must hold before a step is
    /// undone.
    #[serde(default = "default_hysteresis")]
    #[schemars(range(min = 0.0, max = 50.0))]
    pub hysteresis_percent: f64,
    /// How long headroom must hold before climbing back one step, and the
    /// least time between two changes of step.
    #[serde(default = "default_dwell")]
    #[schemars(regex(pattern = crate::resources::DURATION_PATTERN))]
    pub dwell: String,
}

impl Default for LadderPolicy {
    fn default() -> Self {
        Self {
            power_cap: PowerCapPolicy::default(),
            shed: default_shed(),
            defer: true,
            hysteresis_percent: default_hysteresis(),
            dwell: default_dwell(),
        }
    }
}

fn default_shed() -> Vec<SheddablePriority> {
    vec![SheddablePriority::Deferrable, SheddablePriority::Standard]
}
fn default_true() -> bool {
    true
}
fn default_hysteresis() -> f64 {
    10.0
}
fn default_dwell() -> String {
    "5m".into()
}

/// Priorities the ladder may shed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SheddablePriority {
    Deferrable,
    Standard,
}

impl From<SheddablePriority> for Priority {
    fn from(p: SheddablePriority) -> Self {
        match p {
            SheddablePriority::Deferrable => Priority::Deferrable,
            SheddablePriority::Standard => Priority::Standard,
        }
    }
}

/// GPU power capping through the nodes' admin endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PowerCapPolicy {
    /// Whether step 1 is taken.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Lowest limit, as a percent of each GPU's rated power (the efficient
    /// point of most cards lies between 50 % and 70 %).
    #[serde(default = "default_min_cap")]
    #[schemars(range(min = 20.0, max = 100.0))]
    pub min_percent: f64,
    /// Bearer token for the nodes' `POST /admin/power-limit`. Without a
    /// namespace, the Secret of that name in each engine Pod's own
    /// namespace. When absent, the Secret the controller mounts into the
    /// copyhold-node Pods (its `--node-admin-token-secret`, key `token`, in
    /// each Pod's namespace): the token the nodes were started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_secret: Option<SecretKeyRef>,
}

impl Default for PowerCapPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            min_percent: default_min_cap(),
            admin_token_secret: None,
        }
    }
}

fn default_min_cap() -> f64 {
    60.0
}

/// Observed state, written by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnergyBudgetStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `WithinBudget`, `Shedding`, `Deferring`, `SupplyStale`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// One word for `kubectl get`: WithinBudget, PowerCapped, Shedding, Deferring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Supply in watts used for the last decision (fail-safe value when stale).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supply_watts: Option<f64>,
    /// min(ceiling, supply × (1 − margin)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowance_watts: Option<f64>,
    /// Measured draw of the covered nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draw_watts: Option<f64>,
    /// allowance − draw (negative when over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headroom_watts: Option<f64>,
    /// Highest ladder rung in force: 0 none, 1 power-capped, 2 shedding
    /// deferrable, 3 shedding standard, 4 deferring.
    #[serde(default)]
    pub step: i32,
    /// When the step last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_step_change: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Which way the step last changed (`Down` or `Up`): no change in the
    /// other direction is made within the dwell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_step_direction: Option<String>,
    /// Since when the headroom needed to climb back has held (the ladder's
    /// memory across controller restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headroom_since: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Step changes since the budget was created.
    #[serde(default)]
    pub transitions: i64,
    /// When the budget was last evaluated (energy is integrated from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_evaluated: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// The last good supply reading, the base of the fail-safe value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_good_supply_watts: Option<f64>,
    /// Energy drawn today (local midnight of the schedule's zone, else UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_today_wh: Option<f64>,
    /// The part of today's energy covered by the renewable supply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewable_today_wh: Option<f64>,
    /// When the last good supply reading was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supply_observed_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// ModelDeployments (`namespace/name`) with replicas shed by this budget.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shed: Vec<String>,
    /// ModelDeployments (`namespace/name`) with replicas on the covered
    /// nodes. The gateway defers a model's deferrable requests while a
    /// budget that lists it here has `Deferring=True`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub covered: Vec<String>,
    /// Covered nodes with no power reading, counted at their rated power
    /// (or `draw.missingReadingWatts`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes_without_reading: Vec<String>,
    /// While deferring: seconds until supply is expected to cover demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<i64>,
    /// Supply and draw over the last 24 hours, one point per 15 minutes
    /// (the mean of the evaluations in it), oldest first. The register page
    /// charts it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<PowerSample>,
}

/// Mean supply and draw over one 15-minute bucket.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PowerSample {
    /// Start of the bucket.
    pub at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// Mean supply in watts (the fail-safe value while stale).
    pub supply_watts: f64,
    /// Mean measured draw in watts.
    pub draw_watts: f64,
    /// Evaluations averaged into this point.
    pub evaluations: i32,
}
