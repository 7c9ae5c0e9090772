//! Pieces shared by the three resources: priorities, secret references,
//! durations and the standard condition type.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// API group of every copyhold resource.
pub const GROUP: &str = "copyhold.dev";
/// The one served version.
pub const VERSION: &str = "v1alpha1";

/// Order in which the energy ladder gives up capacity: `deferrable` first,
/// then `standard`; `essential` is never shed.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Can wait for the sun: shed first, requests deferred with Retry-After.
    Deferrable,
    /// Normal service: shed only after every deferrable replica.
    #[default]
    Standard,
    /// Never shed or deferred by an EnergyBudget (emergency services, say).
    Essential,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Deferrable => "deferrable",
            Priority::Standard => "standard",
            Priority::Essential => "essential",
        }
    }
}

/// A key in a Secret. Cluster-scoped objects must name the namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of the Secret. Required when the referring object is
    /// cluster-scoped; defaults to the object's own namespace otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// Key inside the Secret's data.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_secret_key() -> String {
    "token".into()
}

/// A key in a ConfigMap.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of the ConfigMap.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Key whose value is the number.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
    /// Key whose value says when the number was measured (RFC 3339, or
    /// seconds since the epoch). Freshness (`maxAge`) then runs from that
    /// time; without it, from when the ConfigMap was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub timestamp_key: Option<String>,
}

/// Condition status values.
pub const TRUE: &str = "True";
pub const FALSE: &str = "False";
pub const UNKNOWN: &str = "Unknown";
