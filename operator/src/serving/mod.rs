//! Serving: what a model needs and where it runs. `sizing` derives a
//! replica's memory and compute needs from the model's shape, `gpu_catalog`
//! says what each card offers, `placement` picks the nodes, `model_source`
//! fetches sizing's inputs (the only I/O here: HTTP ranges and local files),
//! and `workload` turns a placement into the Deployment and Service that
//! run it.
//!
//! May import `resources` and `validation` (the Quantity parser); nothing
//! here imports the controllers, the gateway, `energy` or `commons`.

pub mod autoscale;
pub mod gguf_header;
pub mod gguf_source;
pub mod gpu_catalog;
pub mod model_cache;
pub mod model_source;
pub mod placement;
pub mod reservation;
pub mod sizing;
pub mod workload;
