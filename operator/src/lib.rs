//! copyhold: a Kubernetes operator for sovereign community GPU clusters.
#![forbid(unsafe_code)]

pub mod crdgen;
pub mod resources;
pub mod validation;
