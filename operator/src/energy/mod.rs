//! Energy: the budget's pure decisions (`budget`, and `overlap` between
//! budgets that cover the same model), its signals (the supply
//! in `supply` and `supply_schedule`, the engines' measured draw in `draw`;
//! these two read the outside) and the simulator that replays a day through
//! the same decisions (`simulate`).
//!
//! May import `resources`, `validation` (times of day) and `serving`
//! (labels, ports, the GPU catalog's rated power); the controller carries
//! the decisions out.

pub mod budget;
pub mod draw;
pub mod history;
pub mod overlap;
pub mod simulate;
pub mod supply;
pub mod supply_schedule;
