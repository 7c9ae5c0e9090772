//! copyhold: a Kubernetes operator for sovereign community GPU clusters.
#![forbid(unsafe_code)]

pub mod conditions;
pub mod crdgen;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod resources;
pub mod validation;
pub mod workload;
