//! Benchmarks behind `copyhold bench`: the controller's placement rate and
//! memory (`controller`), and what the gateway adds to a request
//! (`gateway`). They print figures; they are not tests.

pub mod controller;
pub mod gateway;
pub mod stand_in;
