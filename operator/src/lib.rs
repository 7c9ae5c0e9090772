//! copyhold: a Kubernetes operator for sovereign community GPU clusters.
#![forbid(unsafe_code)]

pub mod bench;
pub mod commons;
pub mod conditions;
pub mod controller;
pub mod crd_check;
pub mod crdgen;
pub mod energy;
pub mod error;
pub mod gateway;
pub mod hub_cli;
pub mod leader;
pub mod metrics;
pub mod resources;
pub mod serving;
pub mod validation;
