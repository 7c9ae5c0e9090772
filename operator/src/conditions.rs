//! Standard `metav1.Condition` bookkeeping: a condition's
//! `lastTransitionTime` moves only when its status flips, so rewriting an
//! unchanged status is a no-op on the API server.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::resources::Condition;

/// Set (insert or update) the condition of `type_`. Returns whether its
/// status changed (a transition worth an Event).
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Time,
) -> bool {
    let status = if status { "True" } else { "False" };
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let flipped = c.status != status;
            if flipped {
                c.last_transition_time = now;
            }
            c.status = status.to_owned();
            c.reason = reason.to_owned();
            c.message = message;
            c.observed_generation = generation;
            flipped
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_owned(),
                status: status.to_owned(),
                reason: reason.to_owned(),
                message,
                observed_generation: generation,
                last_transition_time: now,
            });
            true
        }
    }
}

/// The condition of `type_`, if present.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of `type_` is present and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    get(conditions, type_).is_some_and(|c| c.status == "True")
}

/// The current time as a Kubernetes `Time`, truncated to seconds as the API
/// server stores it (so comparisons with stored values hold).
pub fn now() -> Time {
    crate::resources::time::time(jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Time {
        Time(jiff::Timestamp::from_second(s).expect("valid"))
    }

    #[test]
    fn a_new_condition_is_a_transition() {
        let mut c = Vec::new();
        assert!(set(&mut c, "Placed", true, "Placed", "ok", Some(1), t(10)));
        assert_eq!(c[0].last_transition_time, t(10));
    }

    #[test]
    fn the_same_status_keeps_its_transition_time() {
        let mut c = Vec::new();
        set(&mut c, "Placed", true, "Placed", "ok", Some(1), t(10));
        assert!(!set(
            &mut c,
            "Placed",
            true,
            "Placed",
            "still ok",
            Some(2),
            t(20)
        ));
        assert_eq!(c[0].last_transition_time, t(10));
        assert_eq!(c[0].message, "still ok");
        assert_eq!(c[0].observed_generation, Some(2));
    }

    #[test]
    fn a_flip_moves_the_transition_time() {
        let mut c = Vec::new();
        set(&mut c, "Ready", true, "Ready", "", Some(1), t(10));
        assert!(set(
            &mut c,
            "Ready",
            false,
            "ReplicasNotReady",
            "0/1",
            Some(1),
            t(30)
        ));
        assert_eq!(c[0].last_transition_time, t(30));
        assert!(!is_true(&c, "Ready"));
    }
}
