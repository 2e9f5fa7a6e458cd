//! The checker: classifies every order seen anywhere (a client's 201, the
//! `orders` table, the journal, the outbox, the notifications, the fake
//! e-mails in every runner log) the way the rabbitmq/jepsen checker does.
//! Pure: it works on rows gathered after the run (see `Observations`), so it
//! is tested on hand-made rows below.

use std::collections::BTreeMap;
use std::fmt;

/// What the run left behind, as plain rows.
#[derive(Debug, Default, Clone)]
pub struct Observations {
    /// Order ids that clients got a 201 for, one entry per client request
    /// (Idempotency-Key) that got an answer.
    pub acknowledged: Vec<i64>,
    /// Every order in the database: (id, status).
    pub orders: Vec<(i64, String)>,
    /// Applied journal rows (`saga_transitions`, outcome `applied`):
    /// (order id, trigger, to state).
    pub transitions: Vec<(i64, String, String)>,
    /// Outbox rows: (order id, message type).
    pub events: Vec<(i64, String)>,
    /// Notification rows: (order id, event type).
    pub notifications: Vec<(i64, String)>,
    /// The order id of every fake e-mail logged, across all runner logs
    /// (killed runners' included).
    pub emails: Vec<i64>,
}

/// The class of one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// Acknowledged, decided once, with its terminal event and notification.
    Ok,
    /// Acknowledged to a client but not decided by the end (or its decision
    /// left no terminal event or notification).
    Lost,
    /// Decided, published or notified more than once.
    Duplicated,
    /// Seen in the database or a log, but no client was ever answered 201
    /// for it (e.g. a retried POST that made a second order).
    Unexpected,
}

/// The checker's verdict over all orders.
#[derive(Debug, Default)]
pub struct Report {
    /// Every order id with its class and, unless ok, why.
    pub verdicts: BTreeMap<i64, (Class, String)>,
    /// Client answers: how many 201s were received.
    pub acknowledged: usize,
    /// Completed orders for which no fake e-mail was logged (the e-mail is
    /// logged after its notification commits, so a runner killed in between
    /// loses it: reported, not counted as lost).
    pub emails_missing: Vec<i64>,
}

impl Report {
    pub fn count(&self, class: Class) -> usize {
        self.verdicts.values().filter(|(c, _)| *c == class).count()
    }

    /// 0 lost, 0 duplicated, 0 unexpected, and at least one order.
    pub fn passed(&self) -> bool {
        !self.verdicts.is_empty() && self.verdicts.values().all(|(c, _)| *c == Class::Ok)
    }

    /// Up to `n` orders of `class` with their reasons.
    pub fn examples(&self, class: Class, n: usize) -> Vec<String> {
        self.verdicts
            .iter()
            .filter(|(_, (c, _))| *c == class)
            .take(n)
            .map(|(id, (_, why))| format!("order {id}: {why}"))
            .collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "orders {} (acknowledged {}): ok {}, lost {}, duplicated {}, unexpected {}; \
             completed orders without a logged e-mail: {}",
            self.verdicts.len(),
            self.acknowledged,
            self.count(Class::Ok),
            self.count(Class::Lost),
            self.count(Class::Duplicated),
            self.count(Class::Unexpected),
            self.emails_missing.len()
        )?;
        for class in [Class::Lost, Class::Duplicated, Class::Unexpected] {
            for example in self.examples(class, 5) {
                write!(f, "\n  {class:?}: {example}")?;
            }
        }
        Ok(())
    }
}

const TERMINAL_STATES: [&str; 2] = ["completed", "expired"];
const TERMINAL_EVENTS: [&str; 2] = ["OrderCompleted", "OrderExpired"];

/// Per order: how often each thing was seen.
#[derive(Default)]
struct Seen {
    acknowledged: usize,
    rows: Vec<String>,
    payment_decisions: usize,
    terminal_transitions: usize,
    events: BTreeMap<String, usize>,
    notifications: BTreeMap<String, usize>,
    emails: usize,
}

/// Classifies every order id that appears in `obs`.
pub fn check(obs: &Observations) -> Report {
    let mut seen: BTreeMap<i64, Seen> = BTreeMap::new();
    for id in &obs.acknowledged {
        seen.entry(*id).or_default().acknowledged += 1;
    }
    for (id, status) in &obs.orders {
        seen.entry(*id).or_default().rows.push(status.clone());
    }
    for (id, trigger, to) in &obs.transitions {
        let s = seen.entry(*id).or_default();
        if trigger == "PaymentDecided" {
            s.payment_decisions += 1;
        }
        if TERMINAL_STATES.contains(&to.as_str()) {
            s.terminal_transitions += 1;
        }
    }
    for (id, kind) in &obs.events {
        *seen
            .entry(*id)
            .or_default()
            .events
            .entry(kind.clone())
            .or_default() += 1;
    }
    for (id, kind) in &obs.notifications {
        *seen
            .entry(*id)
            .or_default()
            .notifications
            .entry(kind.clone())
            .or_default() += 1;
    }
    for id in &obs.emails {
        seen.entry(*id).or_default().emails += 1;
    }

    let mut report = Report {
        acknowledged: obs.acknowledged.len(),
        ..Report::default()
    };
    for (id, s) in &seen {
        let verdict = classify(s);
        if verdict.0 == Class::Ok
            && s.rows.first().is_some_and(|r| r == "completed")
            && s.emails == 0
        {
            report.emails_missing.push(*id);
        }
        report.verdicts.insert(*id, verdict);
    }
    report
}

fn classify(s: &Seen) -> (Class, String) {
    if s.acknowledged == 0 {
        let mut where_seen = Vec::new();
        if !s.rows.is_empty() {
            where_seen.push(format!("{} order row(s)", s.rows.len()));
        }
        if !s.events.is_empty() {
            where_seen.push(format!("events {:?}", s.events));
        }
        if !s.notifications.is_empty() {
            where_seen.push(format!("notifications {:?}", s.notifications));
        }
        if s.emails > 0 {
            where_seen.push(format!("{} e-mail(s)", s.emails));
        }
        if s.payment_decisions + s.terminal_transitions > 0 {
            where_seen.push("journal rows".to_owned());
        }
        return (
            Class::Unexpected,
            format!(
                "no client was answered 201 for it; seen in {}",
                where_seen.join(", ")
            ),
        );
    }

    let mut twice = Vec::new();
    if s.acknowledged > 1 {
        twice.push(format!("answered to {} different requests", s.acknowledged));
    }
    if s.rows.len() > 1 {
        twice.push(format!("{} order rows", s.rows.len()));
    }
    if s.payment_decisions > 1 {
        twice.push(format!("{} payment decisions", s.payment_decisions));
    }
    if s.terminal_transitions > 1 {
        twice.push(format!("{} terminal transitions", s.terminal_transitions));
    }
    let terminal_events: usize = TERMINAL_EVENTS
        .iter()
        .map(|e| s.events.get(*e).copied().unwrap_or(0))
        .sum();
    if terminal_events > 1 {
        twice.push(format!("{terminal_events} terminal events {:?}", s.events));
    }
    if s.events.get("OrderCreated").copied().unwrap_or(0) > 1 {
        twice.push(format!("events {:?}", s.events));
    }
    for (kind, n) in &s.notifications {
        if *n > 1 {
            twice.push(format!("{n} {kind} notifications"));
        }
    }
    let terminal_notifications = TERMINAL_EVENTS
        .iter()
        .filter(|e| s.notifications.contains_key(**e))
        .count();
    if terminal_notifications > 1 {
        twice.push("both an OrderCompleted and an OrderExpired notification".to_owned());
    }
    if s.emails > 1 {
        twice.push(format!("{} fake e-mails", s.emails));
    }
    let status = s.rows.first().map(String::as_str);
    if s.emails > 0 && status != Some("completed") {
        twice.push(format!("a fake e-mail for an order that is {status:?}"));
    }
    if !twice.is_empty() {
        return (Class::Duplicated, twice.join("; "));
    }

    let Some(status) = status else {
        return (
            Class::Lost,
            "acknowledged, but no order row exists".to_owned(),
        );
    };
    if !TERMINAL_STATES.contains(&status) {
        return (Class::Lost, format!("still {status} at the end"));
    }
    let wanted = if status == "completed" {
        "OrderCompleted"
    } else {
        "OrderExpired"
    };
    let mut missing = Vec::new();
    if s.terminal_transitions == 0 {
        missing.push("its terminal transition".to_owned());
    }
    if !s.events.contains_key(wanted) {
        missing.push(format!("its {wanted} event"));
    }
    if !s.notifications.contains_key(wanted) {
        missing.push(format!("its {wanted} notification"));
    }
    if !missing.is_empty() {
        return (
            Class::Lost,
            format!("{status}, but without {}", missing.join(", ")),
        );
    }
    (Class::Ok, String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> String {
        v.to_owned()
    }

    /// One completed and one expired order, both as they should be.
    fn healthy() -> Observations {
        Observations {
            acknowledged: vec![1, 2],
            orders: vec![(1, s("completed")), (2, s("expired"))],
            transitions: vec![
                (1, s("OrderPlaced"), s("pending")),
                (1, s("OrderCreated"), s("processing")),
                (1, s("PaymentDecided"), s("completed")),
                (2, s("OrderPlaced"), s("pending")),
                (2, s("OrderCreated"), s("processing")),
                (2, s("PaymentDecided"), s("processing")),
                (2, s("ExpirationDue"), s("expired")),
            ],
            events: vec![
                (1, s("OrderCreated")),
                (1, s("OrderCompleted")),
                (2, s("OrderCreated")),
                (2, s("OrderExpired")),
            ],
            notifications: vec![
                (1, s("OrderCreated")),
                (1, s("OrderCompleted")),
                (2, s("OrderCreated")),
                (2, s("OrderExpired")),
            ],
            emails: vec![1],
        }
    }

    fn class_of(obs: &Observations, id: i64) -> Class {
        check(obs).verdicts[&id].0
    }

    #[test]
    fn healthy_orders_are_ok_and_the_run_passes() {
        let report = check(&healthy());
        assert!(report.passed(), "{report}");
        assert_eq!(report.count(Class::Ok), 2);
        assert!(report.emails_missing.is_empty());
    }

    #[test]
    fn an_empty_run_does_not_pass() {
        assert!(!check(&Observations::default()).passed());
    }

    #[test]
    fn an_acknowledged_order_that_is_still_processing_is_lost() {
        let mut obs = healthy();
        obs.orders[1].1 = s("processing");
        obs.transitions.retain(|t| t.1 != "ExpirationDue");
        obs.events.retain(|e| e.1 != "OrderExpired");
        obs.notifications.retain(|n| n.1 != "OrderExpired");
        let report = check(&obs);
        assert_eq!(class_of(&obs, 2), Class::Lost);
        assert!(!report.passed());
        assert_eq!(report.count(Class::Ok), 1);
    }

    #[test]
    fn an_acknowledged_order_missing_from_the_database_is_lost() {
        let mut obs = healthy();
        obs.acknowledged.push(3);
        assert_eq!(class_of(&obs, 3), Class::Lost);
    }

    #[test]
    fn a_decided_order_without_its_terminal_notification_is_lost() {
        let mut obs = healthy();
        obs.notifications.retain(|n| *n != (1, s("OrderCompleted")));
        assert_eq!(class_of(&obs, 1), Class::Lost);
    }

    #[test]
    fn two_payment_decisions_are_a_duplicate() {
        let mut obs = healthy();
        obs.transitions
            .push((1, s("PaymentDecided"), s("completed")));
        assert_eq!(class_of(&obs, 1), Class::Duplicated);
    }

    #[test]
    fn two_terminal_events_are_a_duplicate() {
        let mut obs = healthy();
        obs.events.push((2, s("OrderCompleted")));
        assert_eq!(class_of(&obs, 2), Class::Duplicated);
    }

    #[test]
    fn two_notifications_of_one_type_are_a_duplicate() {
        let mut obs = healthy();
        obs.notifications.push((2, s("OrderExpired")));
        assert_eq!(class_of(&obs, 2), Class::Duplicated);
    }

    #[test]
    fn an_e_mail_logged_twice_is_a_duplicate() {
        let mut obs = healthy();
        obs.emails.push(1);
        assert_eq!(class_of(&obs, 1), Class::Duplicated);
    }

    #[test]
    fn an_e_mail_for_an_expired_order_is_a_duplicate_decision() {
        let mut obs = healthy();
        obs.emails.push(2);
        assert_eq!(class_of(&obs, 2), Class::Duplicated);
    }

    #[test]
    fn an_order_no_client_was_answered_for_is_unexpected() {
        // A retried POST that placed a second order: the client only ever
        // saw order 1.
        let mut obs = healthy();
        obs.orders.push((3, s("completed")));
        obs.events.push((3, s("OrderCompleted")));
        assert_eq!(class_of(&obs, 3), Class::Unexpected);
        // A notification for an order that does not exist at all.
        obs.notifications.push((4, s("OrderCompleted")));
        assert_eq!(class_of(&obs, 4), Class::Unexpected);
        let report = check(&obs);
        assert_eq!(report.count(Class::Unexpected), 2);
        assert!(!report.passed());
    }

    #[test]
    fn an_order_answered_to_two_requests_is_a_duplicate() {
        let mut obs = healthy();
        obs.acknowledged.push(1);
        assert_eq!(class_of(&obs, 1), Class::Duplicated);
    }

    #[test]
    fn a_completed_order_without_an_e_mail_is_reported_but_ok() {
        let mut obs = healthy();
        obs.emails.clear();
        let report = check(&obs);
        assert!(report.passed());
        assert_eq!(report.emails_missing, vec![1]);
    }
}
