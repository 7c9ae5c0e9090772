//! Budgets that cover the same ModelDeployment: which one governs it.
//!
//! A model has one pair of `shed-to`/`shed-by` annotations, and two budgets
//! whose nodes overlap may both want to shed it. If each wrote its own
//! name whenever the annotation named another, they would take it in turn
//! at every evaluation (and the model's reconcile with them). Instead the
//! stricter wish governs, between equal wishes the budget first by name;
//! the others leave the annotation alone. A governor that stops shedding
//! hands the model to the next budget that still wants it (from that
//! budget's `status.shed`), so the Deployment is not scaled up for the one
//! evaluation in between. Pure: the controller reads and writes.

use std::collections::{BTreeMap, BTreeSet};

/// A budget's wish for one model: replicas to shed to, by budget name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wish<'a> {
    pub budget: &'a str,
    pub replicas: i32,
}

impl Wish<'_> {
    /// The stricter of two wishes: fewer replicas, else the name first in
    /// order (so every budget computes the same governor).
    fn governs_over(&self, other: &Wish<'_>) -> bool {
        (self.replicas, self.budget) < (other.replicas, other.budget)
    }
}

/// What budget `me` writes on a model's annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShedWrite {
    /// Leave them as they are.
    Keep,
    /// `shed-to` = `to`, `shed-by` = `by` (`me`, or the budget it hands to).
    Set { by: String, to: i32 },
    /// Remove both.
    Clear,
}

/// What `me` (wanting `want` replicas, or not shedding the model at all)
/// writes, given the annotation `held` now and the wishes of the other
/// budgets that cover the model (`others`, from their status).
pub fn shed_write(
    me: &str,
    want: Option<i32>,
    held: Option<Wish<'_>>,
    others: &[Wish<'_>],
) -> ShedWrite {
    match (want, held) {
        (Some(w), None) => set(me, w),
        (Some(w), Some(h)) if h.budget == me => {
            if h.replicas == w {
                ShedWrite::Keep
            } else {
                set(me, w)
            }
        }
        (Some(w), Some(h)) => {
            let mine = Wish {
                budget: me,
                replicas: w,
            };
            if mine.governs_over(&h) {
                set(me, w)
            } else {
                ShedWrite::Keep
            }
        }
        (None, Some(h)) if h.budget == me => hand_over(me, others),
        (None, _) => ShedWrite::Keep,
    }
}

fn set(by: &str, to: i32) -> ShedWrite {
    ShedWrite::Set { by: by.into(), to }
}

/// The strictest other wish takes the model over; with none, it is freed.
fn hand_over(me: &str, others: &[Wish<'_>]) -> ShedWrite {
    others
        .iter()
        .filter(|o| o.budget != me)
        .reduce(|a, b| if b.governs_over(a) { b } else { a })
        .map_or(ShedWrite::Clear, |o| set(o.budget, o.replicas))
}

/// Where each budget's nodes hold a model's Pods: the model keys each
/// other budget shares with `me`, by that budget's name. `models_on` maps a
/// budget to the models (`namespace/name`) with Pods on its nodes.
pub fn shared_models(
    me: &str,
    models_on: &BTreeMap<String, BTreeSet<String>>,
) -> BTreeMap<String, Vec<String>> {
    let Some(mine) = models_on.get(me) else {
        return BTreeMap::new();
    };
    models_on
        .iter()
        .filter(|(other, _)| other.as_str() != me)
        .filter_map(|(other, theirs)| {
            let shared: Vec<String> = mine.intersection(theirs).cloned().collect();
            (!shared.is_empty()).then(|| (other.clone(), shared))
        })
        .collect()
}

/// The `Overlapping` condition: true, naming the other budgets and the
/// models they share, when any are shared.
pub fn overlapping_condition(
    shared: &BTreeMap<String, Vec<String>>,
) -> (bool, &'static str, String) {
    if shared.is_empty() {
        return (
            false,
            "NoOverlap",
            "no other budget covers these models".to_string(),
        );
    }
    let parts: Vec<String> = shared
        .iter()
        .map(|(b, models)| format!("{} with budget {b}", models.join(", ")))
        .collect();
    (
        true,
        "OverlappingBudgets",
        format!(
            "shared: {}; the stricter shed governs a shared model (between equals the budget first by name)",
            parts.join("; ")
        ),
    )
}

/// Whether a budget leaves a Pod's power limit alone because another
/// budget over the same node governs it: that budget caps too
/// (`other_capping`), and the limit in force (W) is not the one this budget
/// set (`mine`) and is at least as strict as `want` (W; `None`: this budget
/// would clear it). So two budgets' limits do not replace each other at
/// every evaluation: the stricter stays, and a budget clears only its own.
pub fn cap_yields(
    want: Option<f64>,
    in_force: Option<f64>,
    mine: Option<f64>,
    other_capping: bool,
) -> bool {
    let Some(r) = in_force else {
        return false;
    };
    if !other_capping || mine.is_some_and(|m| (m - r).abs() < 0.5) {
        return false;
    }
    want.is_none_or(|w| r <= w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(budget: &str, replicas: i32) -> Wish<'_> {
        Wish { budget, replicas }
    }

    #[test]
    fn an_unheld_model_is_taken_by_a_budget_that_sheds_it() {
        assert_eq!(shed_write("a", Some(1), None, &[]), set("a", 1));
    }

    #[test]
    fn equal_wishes_go_to_the_budget_first_by_name_and_stay_there() {
        // b holds it; a wants the same: a takes it, once.
        assert_eq!(shed_write("a", Some(1), Some(w("b", 1)), &[]), set("a", 1));
        // Then neither writes again.
        assert_eq!(
            shed_write("b", Some(1), Some(w("a", 1)), &[]),
            ShedWrite::Keep
        );
        assert_eq!(
            shed_write("a", Some(1), Some(w("a", 1)), &[]),
            ShedWrite::Keep
        );
    }

    #[test]
    fn the_stricter_wish_governs_whatever_the_names() {
        assert_eq!(shed_write("z", Some(0), Some(w("a", 1)), &[]), set("z", 0));
        assert_eq!(
            shed_write("a", Some(1), Some(w("z", 0)), &[]),
            ShedWrite::Keep
        );
    }

    #[test]
    fn a_budget_that_stops_shedding_leaves_another_budgets_annotation_alone() {
        assert_eq!(shed_write("a", None, Some(w("b", 1)), &[]), ShedWrite::Keep);
        assert_eq!(shed_write("a", None, None, &[]), ShedWrite::Keep);
    }

    #[test]
    fn a_governor_that_lets_go_hands_the_model_to_the_strictest_other_wish() {
        let others = [w("c", 2), w("b", 1), w("d", 1)];
        assert_eq!(shed_write("a", None, Some(w("a", 1)), &others), set("b", 1));
        assert_eq!(
            shed_write("a", None, Some(w("a", 1)), &[]),
            ShedWrite::Clear
        );
    }

    #[test]
    fn the_governor_changes_its_own_wish_in_place() {
        assert_eq!(shed_write("a", Some(0), Some(w("a", 1)), &[]), set("a", 0));
    }

    /// Whatever order the budgets evaluate in, once every budget has
    /// written what it writes, another round writes nothing: no ping-pong.
    #[test]
    fn any_order_of_evaluations_settles_on_one_governor() {
        let wishes = [("a", 1), ("b", 1), ("c", 0), ("d", 2)];
        for rotation in 0..wishes.len() {
            let mut order = wishes.to_vec();
            order.rotate_left(rotation);
            let mut held: Option<(String, i32)> = None;
            let mut writes_in_last_round = 0;
            for _round in 0..3 {
                writes_in_last_round = 0;
                for (me, want) in &order {
                    let h = held.as_ref().map(|(b, r)| w(b, *r));
                    if let ShedWrite::Set { by, to } = shed_write(me, Some(*want), h, &[]) {
                        held = Some((by, to));
                        writes_in_last_round += 1;
                    }
                }
            }
            assert_eq!(writes_in_last_round, 0, "{order:?}");
            assert_eq!(held, Some(("c".to_string(), 0)), "{order:?}");
        }
    }

    #[test]
    fn budgets_share_the_models_with_pods_on_both_their_nodes() {
        let on = |ms: &[&str]| ms.iter().map(|m| m.to_string()).collect::<BTreeSet<_>>();
        let models_on = BTreeMap::from([
            ("a".to_string(), on(&["ns/x", "ns/y"])),
            ("b".to_string(), on(&["ns/y"])),
            ("c".to_string(), on(&["ns/z"])),
        ]);
        let shared = shared_models("a", &models_on);
        assert_eq!(
            shared,
            BTreeMap::from([("b".to_string(), vec!["ns/y".to_string()])])
        );
        let (value, reason, message) = overlapping_condition(&shared);
        assert!(value);
        assert_eq!(reason, "OverlappingBudgets");
        assert!(message.contains("ns/y with budget b"), "{message}");
        assert!(!overlapping_condition(&shared_models("c", &models_on)).0);
    }

    #[test]
    fn a_stricter_limit_another_budget_set_stays_and_only_ones_own_is_cleared() {
        // Another budget's 120 W is stricter than our 180 W: leave it.
        assert!(cap_yields(Some(180.0), Some(120.0), None, true));
        // Ours is stricter: send it.
        assert!(!cap_yields(Some(100.0), Some(120.0), None, true));
        // The limit in force is ours: change it as we like.
        assert!(!cap_yields(Some(180.0), Some(120.0), Some(120.0), true));
        // Never clear another budget's limit; clear our own.
        assert!(cap_yields(None, Some(120.0), None, true));
        assert!(!cap_yields(None, Some(120.0), Some(120.0), true));
        // No other budget caps the node: as alone (a leftover is cleared).
        assert!(!cap_yields(None, Some(120.0), None, false));
        assert!(!cap_yields(Some(180.0), None, None, true));
    }
}
