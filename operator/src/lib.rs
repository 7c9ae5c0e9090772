//! copyhold: a Kubernetes operator for sovereign community GPU clusters.
#![forbid(unsafe_code)]

pub mod bench;
pub mod bench_gateway;
pub mod budget;
pub mod conditions;
pub mod controller;
pub mod crdgen;
pub mod draw;
pub mod error;
pub mod gateway;
pub mod gpu_catalog;
pub mod hub_cli;
pub mod leader;
pub mod ledger;
pub mod metrics;
pub mod model_cache;
pub mod model_source;
pub mod placement;
pub mod resources;
pub mod simulate;
pub mod sizing;
pub mod stint;
pub mod supply;
pub mod supply_schedule;
pub mod validation;
pub mod workload;
