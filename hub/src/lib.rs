//! Models from the Hugging Face Hub or a mirror of it.
//!
//! - [`server`]: the Hub's download protocol served from a directory
//!   (`copyhold models serve`, and the local hub of the tests);
//! - [`fetch`]: a resumable, parallel, verified download into the
//!   content-addressed [`cache`] (`copyhold-node fetch`, `copyhold models pull`);
//! - [`progress`]: the bar in the log and the progress file.
#![forbid(unsafe_code)]

pub mod cache;
pub mod fetch;
pub mod progress;
pub mod repo;
pub mod server;
