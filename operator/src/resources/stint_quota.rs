//! `StintQuota`: members' fair shares of the commons, and the public register
//! of what each used.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, Priority};

/// Members, their stints over a period, rate limits and sanctions. The status
/// is the register: who used what this period.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "copyhold.dev",
    version = "v1alpha1",
    kind = "StintQuota",
    plural = "stintquotas",
    shortname = "sq",
    category = "copyhold",
    namespaced,
    status = "StintQuotaStatus",
    printcolumn(name = "Members", type_ = "integer", json_path = ".status.memberCount"),
    printcolumn(
        name = "Period",
        type_ = "string",
        json_path = ".status.periodDescription"
    ),
    // A future time: `date` columns show ages and print `<invalid>` for it.
    printcolumn(name = "Resets", type_ = "string", json_path = ".status.resetsAt"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct StintQuotaSpec {
    /// The people, teams or apps sharing the models that name this quota.
    /// At most 1000 (the register must stay well under etcd's object size).
    #[schemars(length(min = 1, max = 1000))]
    pub members: Vec<Member>,

    /// The period over which stints are counted.
    pub period: Period,

    /// Stints shared by weight among members without a fixed stint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Stint>,

    /// How prompt and completion tokens count against token stints.
    #[serde(default)]
    pub token_weights: TokenWeights,

    /// Rate limits applied to every member (a member may override them).
    #[serde(default)]
    pub limits: RateLimits,

    /// Graduated sanctions, in percent of a member's stint.
    #[serde(default)]
    pub sanctions: Sanctions,

    /// How the gateway replicas share the ledger.
    #[serde(default)]
    pub ledger: LedgerSpec,

    /// The register page the gateway serves at `/register`: who may read
    /// it, and how many past periods it keeps per member.
    #[serde(default)]
    pub register: RegisterSpec,
}

/// Who may read the register page, and how much history it keeps.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterSpec {
    /// `members` (a member's key, as Bearer or from the page's form),
    /// `public` (anyone who reaches the gateway) or `cluster` (clients whose
    /// address is in the gateway's `--register-cluster-cidrs`).
    #[serde(default)]
    pub visibility: RegisterVisibility,
    /// Past periods kept per member in `status.members[].history`, written
    /// at each period's rollover. At most 6, so that a register of 1000
    /// members stays well under etcd's object size.
    #[serde(default = "default_history_periods")]
    #[schemars(range(min = 0, max = 6))]
    pub history_periods: i32,
}

impl Default for RegisterSpec {
    fn default() -> Self {
        Self {
            visibility: RegisterVisibility::default(),
            history_periods: default_history_periods(),
        }
    }
}

fn default_history_periods() -> i32 {
    6
}

/// Who may read a register page.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RegisterVisibility {
    /// The quota's own members, with their key.
    #[default]
    Members,
    /// Anyone who reaches the gateway.
    Public,
    /// Clients inside the cluster (by source address).
    Cluster,
}

/// One member of the commons.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// Name shown in the register; unique in this quota.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub name: String,
    /// Secret (same namespace) whose key holds the member's API key. The
    /// gateway keeps only its SHA-256 digest.
    pub api_key_secret: MemberSecretRef,
    /// Share of the pool, relative to the other weighted members. Ignored
    /// when `stint` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub weight: Option<i32>,
    /// A fixed stint for this member, instead of a share of the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stint: Option<Stint>,
    /// Rate limits for this member, replacing the quota's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<RateLimits>,
    /// `deferrable` members' requests wait (503 + Retry-After) while an
    /// EnergyBudget defers.
    #[serde(default)]
    pub priority: Priority,
}

/// Where a member's key lives.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberSecretRef {
    /// Name of the Secret.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        length(min = 1, max = 253)
    )]
    pub name: String,
    /// Key in the Secret.
    #[serde(default = "default_api_key_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_api_key_key() -> String {
    "api-key".into()
}

/// Amounts of the commons for one period. An absent amount is unlimited.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stint {
    /// Weighted tokens (see `tokenWeights`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub tokens: Option<i64>,
    /// Energy in watt-hours, from the nodes' per-request `energy_joules`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub energy_wh: Option<f64>,
}

/// Rolling window or calendar period.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Period {
    /// `rolling` counts the last `window`; `calendar` resets at the start of
    /// each day, week (Monday) or month in `timeZone`.
    #[serde(rename = "type")]
    pub type_: PeriodType,
    /// Length of a rolling window, e.g. `24h`. Required for `rolling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = crate::resources::DURATION_PATTERN))]
    pub window: Option<String>,
    /// Calendar unit. Required for `calendar`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<CalendarUnit>,
    /// IANA time zone of calendar periods, e.g. `Europe/Berlin`.
    #[serde(default = "default_tz")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: String,
}

fn default_tz() -> String {
    "UTC".into()
}

/// Kinds of period.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PeriodType {
    Rolling,
    Calendar,
}

/// Calendar units.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CalendarUnit {
    Day,
    Week,
    Month,
}

/// Weights of prompt and completion tokens.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenWeights {
    /// Weight of one prompt token.
    #[serde(default = "one")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub prompt: f64,
    /// Weight of one completion token.
    #[serde(default = "one")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub completion: f64,
}

impl Default for TokenWeights {
    fn default() -> Self {
        Self {
            prompt: 1.0,
            completion: 1.0,
        }
    }
}

fn one() -> f64 {
    1.0
}

/// Per-member request limits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimits {
    /// Requests per minute; absent is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub requests_per_minute: Option<i32>,
    /// Requests in flight at once; absent is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub concurrent_requests: Option<i32>,
}

/// Graduated sanctions, as in the custom of a manor: a warning, then a
/// reduced right, then suspension until the period resets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sanctions {
    /// Percent of the stint at which the member is warned (response header
    /// `x-copyhold-stint-remaining`, state `warned`).
    #[serde(default = "default_warn")]
    #[schemars(range(min = 1.0, max = 1000.0))]
    pub warn_at: f64,
    /// Percent at which the member is throttled.
    #[serde(default = "default_throttle")]
    #[schemars(range(min = 1.0, max = 1000.0))]
    pub throttle_at: f64,
    /// What a throttled member may still do.
    #[serde(default)]
    pub throttle: ThrottleSpec,
    /// Percent past which the member is refused until the period resets.
    /// Must be at least `throttleAt` (checked by the operator).
    #[serde(default = "default_suspend")]
    #[schemars(range(min = 1.0, max = 1000.0))]
    pub suspend_at: f64,
}

impl Default for Sanctions {
    fn default() -> Self {
        Self {
            warn_at: default_warn(),
            throttle_at: default_throttle(),
            throttle: ThrottleSpec::default(),
            suspend_at: default_suspend(),
        }
    }
}

fn default_warn() -> f64 {
    80.0
}
fn default_throttle() -> f64 {
    100.0
}
fn default_suspend() -> f64 {
    120.0
}

/// A throttled member's reduced right.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThrottleSpec {
    /// Requests per minute while throttled.
    #[serde(default = "default_throttled_rpm")]
    #[schemars(range(min = 0, max = 1000000))]
    pub requests_per_minute: i32,
    /// Serve a throttled member only while the model has idle capacity.
    #[serde(default)]
    pub only_when_idle: bool,
}

impl Default for ThrottleSpec {
    fn default() -> Self {
        Self {
            requests_per_minute: default_throttled_rpm(),
            only_when_idle: false,
        }
    }
}

fn default_throttled_rpm() -> i32 {
    2
}

/// How gateway replicas lease slices of remaining stints.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LedgerSpec {
    /// Tokens a replica leases at once for a member (more if one request
    /// needs more). Larger slices mean fewer writes, and a larger
    /// over-count if a replica dies.
    #[serde(default = "default_slice")]
    #[schemars(range(min = 1, max = 100000000))]
    pub slice_tokens: i64,
    /// Watt-hours leased at once for a member.
    #[serde(default = "default_slice_wh")]
    #[schemars(range(min = 0.000001, max = 1000000.0))]
    pub slice_energy_wh: f64,
    /// `max_tokens` reserved for a request that gives none.
    #[serde(default = "default_reserve")]
    #[schemars(range(min = 1, max = 10000000))]
    pub default_max_tokens: i64,
    /// Seconds after its last heartbeat that a gateway replica counts as
    /// dead; its slices are then charged to their members (an over-count,
    /// never an under-count).
    #[serde(default = "default_replica_ttl")]
    #[schemars(range(min = 2, max = 3600))]
    pub replica_ttl_seconds: i64,
}

impl Default for LedgerSpec {
    fn default() -> Self {
        Self {
            slice_tokens: default_slice(),
            slice_energy_wh: default_slice_wh(),
            default_max_tokens: default_reserve(),
            replica_ttl_seconds: default_replica_ttl(),
        }
    }
}

fn default_slice() -> i64 {
    4096
}
fn default_slice_wh() -> f64 {
    0.5
}
fn default_reserve() -> i64 {
    1024
}
fn default_replica_ttl() -> i64 {
    30
}

/// The register, written by the gateway replicas: settlements, resets,
/// standings and dead replicas' slices.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StintQuotaStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Valid`, `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// One word for `kubectl get`: Ok, Warned (some member warned or worse), Invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Number of members.
    #[serde(default)]
    pub member_count: i32,
    /// The period in words, e.g. `calendar month (Europe/Berlin)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_description: Option<String>,
    /// Start of the current period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_start: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// When the current period ends and usage resets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// What each member used this period.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberUsage>,
    /// The past periods of the members' `history`, oldest first: a
    /// member's history lines are its last periods, the end of this list.
    /// Kept here once rather than in every line, so that a register of 1000
    /// members stays well under etcd's object size.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub periods: Vec<PeriodBounds>,
    /// Dead gateway replicas' slice Leases already charged to their
    /// members, until the Lease is gone: a reader skips them, so a slice is
    /// charged exactly once even when its Lease outlives the write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reclaimed: Vec<ReclaimedLease>,
    /// Remaining stint leased by gateway replicas, not yet settled. Not
    /// stored here: each replica keeps its own in a Lease per quota
    /// (`gateway::slice_leases`), so the register's size does not grow with
    /// the number of replicas; the ledger fills this in from them.
    #[serde(skip)]
    #[schemars(skip)]
    pub slices: Vec<Slice>,
    /// Gateway replicas holding slices, with their heartbeat: read from
    /// their Leases, like `slices`.
    #[serde(skip)]
    #[schemars(skip)]
    pub gateways: Vec<GatewayReplica>,
}

/// A slice Lease whose slices the register already charged.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReclaimedLease {
    /// The Lease's name.
    pub name: String,
    /// The Lease's resourceVersion whose slices were charged.
    pub resource_version: String,
}

/// A gateway replica's heartbeat in the register.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayReplica {
    /// The replica's identity (Pod name and a per-process suffix).
    pub name: String,
    /// Last time the replica wrote to the register, by its own clock (for
    /// people; liveness is judged from `beats`).
    pub renewed_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// Writes by this replica: readers judge it dead when the count stops
    /// moving for the TTL, timed on their own clock, so skewed clocks do not
    /// matter.
    #[serde(default)]
    pub beats: i64,
}

/// One line of the register.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberUsage {
    /// The member's name.
    pub name: String,
    /// Settled prompt tokens.
    #[serde(default)]
    pub prompt_tokens: i64,
    /// Settled completion tokens.
    #[serde(default)]
    pub completion_tokens: i64,
    /// Settled weighted tokens, counted against the token stint.
    #[serde(default)]
    pub tokens: i64,
    /// Settled energy in watt-hours.
    #[serde(default)]
    pub energy_wh: f64,
    /// Requests settled.
    #[serde(default)]
    pub requests: i64,
    /// Weighted tokens charged from slices of replicas that died (included
    /// in `tokens`): the ledger's over-count, made visible.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reclaimed_tokens: i64,
    /// Weighted tokens of the previous period (rolling periods count a
    /// sliding part of it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub previous_tokens: i64,
    /// Watt-hours of the previous period.
    #[serde(default, skip_serializing_if = "is_zero_f")]
    pub previous_energy_wh: f64,
    /// The member's token stint this period (after sharing the pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stint_tokens: Option<i64>,
    /// The member's energy stint this period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stint_energy_wh: Option<f64>,
    /// `ok`, `warned`, `throttled` or `suspended`.
    #[serde(default)]
    pub state: MemberState,
    /// The member's last periods, oldest first (at most
    /// `register.historyPeriods`), written when a period rolls over.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<PeriodUsage>,
}

/// One past period's bounds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeriodBounds {
    /// Start of the period.
    pub start: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// Its end (its reset).
    pub end: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
}

/// What a member used in one past period.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeriodUsage {
    /// Start of the period. Stored once in `status.periods` (read by
    /// [`StintQuotaStatus::hydrate_history`]); registers written before
    /// that carry it here.
    #[serde(default = "epoch", skip_serializing)]
    pub start: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// Its end (its reset), stored like `start`.
    #[serde(default = "epoch", skip_serializing)]
    pub end: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// Weighted tokens settled in it.
    #[serde(default)]
    pub tokens: i64,
    /// Watt-hours settled in it.
    #[serde(default)]
    pub energy_wh: f64,
    /// Requests settled in it.
    #[serde(default)]
    pub requests: i64,
}

fn epoch() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH)
}

impl StintQuotaStatus {
    /// Give every history line its period's bounds from `periods` (the
    /// stored lines carry none). A register written before `periods`
    /// existed has them in its lines: `periods` is then rebuilt from the
    /// longest history.
    pub fn hydrate_history(&mut self) {
        let longest = self.members.iter().map(|u| u.history.len()).max();
        let longest = longest.unwrap_or(0);
        let oldest_first = self.members.iter().find(|u| u.history.len() == longest);
        if let Some(u) = oldest_first.filter(|_| self.periods.len() < longest) {
            self.periods = u
                .history
                .iter()
                .map(|h| PeriodBounds {
                    start: h.start.clone(),
                    end: h.end.clone(),
                })
                .collect();
        }
        let p = &self.periods;
        for u in &mut self.members {
            let skip = p.len().saturating_sub(u.history.len());
            for (h, b) in u.history.iter_mut().zip(&p[skip..]) {
                h.start = b.start.clone();
                h.end = b.end.clone();
            }
        }
    }
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}
fn is_zero_f(v: &f64) -> bool {
    *v == 0.0
}

/// A member's standing.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    #[default]
    Ok,
    Warned,
    Throttled,
    Suspended,
}

/// Stint leased by one gateway replica for one member.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Slice {
    /// The gateway replica (its Pod name).
    pub replica: String,
    /// The member.
    pub member: String,
    /// Weighted tokens held.
    #[serde(default)]
    pub tokens: i64,
    /// Watt-hours held.
    #[serde(default)]
    pub energy_wh: f64,
}
