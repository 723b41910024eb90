//! Status conditions that keep their transition time while unchanged, and remember which
//! changed so the reconciler can record an Event per transition (not per reconcile).
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::EventType;

/// A condition that changed status (or appeared) in this reconcile.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Transition {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Transition {
    /// Whether this transition is bad news. Ready going False and any other condition
    /// going True (NearLimit, Throttled, Degraded) is a warning.
    pub fn event_type(&self) -> EventType {
        let bad = if self.type_ == "Ready" {
            !self.status
        } else {
            self.status
        };
        if bad {
            EventType::Warning
        } else {
            EventType::Normal
        }
    }
}

pub(crate) struct Conditions {
    list: Vec<Condition>,
    generation: Option<i64>,
    pub transitions: Vec<Transition>,
}

impl Conditions {
    pub fn new(previous: &[Condition], generation: Option<i64>) -> Conditions {
        Conditions {
            list: previous.to_vec(),
            generation,
            transitions: Vec::new(),
        }
    }

    /// Sets one condition; its lastTransitionTime moves only when its status does.
    pub fn set(&mut self, type_: &'static str, status: bool, reason: &str, message: &str) {
        let status_str = if status { "True" } else { "False" };
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        match self.list.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                if c.status != status_str {
                    c.last_transition_time = now;
                    self.transitions.push(Transition {
                        type_,
                        status,
                        reason: reason.to_owned(),
                        message: message.to_owned(),
                    });
                }
                c.status = status_str.to_owned();
                c.reason = reason.to_owned();
                c.message = message.to_owned();
                c.observed_generation = self.generation;
            }
            None => {
                // A condition appearing False (other than Ready) is the normal state: no event.
                if status || type_ == "Ready" {
                    self.transitions.push(Transition {
                        type_,
                        status,
                        reason: reason.to_owned(),
                        message: message.to_owned(),
                    });
                }
                self.list.push(Condition {
                    type_: type_.to_owned(),
                    status: status_str.to_owned(),
                    reason: reason.to_owned(),
                    message: message.to_owned(),
                    last_transition_time: now,
                    observed_generation: self.generation,
                });
            }
        }
    }

    pub fn into_list(self) -> (Vec<Condition>, Vec<Transition>) {
        (self.list, self.transitions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_with_status() {
        let mut c = Conditions::new(&[], Some(1));
        c.set("Ready", true, "Compiled", "ok");
        let (list, transitions) = c.into_list();
        assert_eq!(transitions.len(), 1);
        let first = list[0].last_transition_time.clone();

        let mut c = Conditions::new(&list, Some(2));
        c.set("Ready", true, "Compiled", "still ok");
        let (list, transitions) = c.into_list();
        assert!(transitions.is_empty());
        assert_eq!(list[0].last_transition_time, first);
        assert_eq!(list[0].observed_generation, Some(2));

        let mut c = Conditions::new(&list, Some(2));
        c.set("Ready", false, "RedisUnavailable", "down");
        let (_, transitions) = c.into_list();
        assert_eq!(transitions[0].event_type(), EventType::Warning);
    }

    #[test]
    fn a_condition_appearing_false_records_no_event() {
        let mut c = Conditions::new(&[], None);
        c.set("NearLimit", false, "BelowThreshold", "");
        assert!(c.into_list().1.is_empty());
    }
}
