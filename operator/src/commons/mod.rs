//! Commons: stints and the exact ledger, pure. Periods, shares and standings
//! (`stint`) and the book of reservations and usage (`ledger`) take `now` as
//! an argument and touch nothing outside; the gateway keeps them in step
//! with the cluster.
//!
//! May import `resources` only.

pub mod ledger;
pub mod ledger_leases;
pub mod maxima;
pub mod stint;

#[cfg(test)]
mod ledger_faults;
#[cfg(test)]
mod ledger_props;
#[cfg(test)]
mod ledger_size;
#[cfg(test)]
mod ledger_skew;
