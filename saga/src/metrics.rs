//! Metric names and the helpers that record them, through the `metrics`
//! facade. The library only records; a host installs a recorder (the hosts
//! use the Prometheus exporter) and serves it. Without a recorder every call
//! here is a no-op.
//!
//! Counters and histograms are recorded where things happen (a delivery
//! settled, a transition committed, a timer fired, an event published, a
//! reconnect). The backlog gauges (instances by saga type and state, parked
//! instances, unsent outbox rows, timers) describe the shared database, not
//! one process: a host computes them when it is scraped with [`backlog`] and
//! [`record_backlog`].
//!
//! Label values come from fixed sets (saga types, consumer names, state
//! names, the message types a consumer takes, outcomes), never from message
//! contents, so the number of series stays bounded.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, Func};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};

use crate::error::SagaError;
use crate::schema::{instances, outbox as saga_outbox, timers as saga_timers};

/// Counter: deliveries settled or retried, by `consumer`, `message_type` and
/// `outcome` (`ok`, `duplicate`, `retried`, `dead_lettered`, `handed_back`).
/// `retried` counts each failed attempt that is tried again.
pub const MESSAGES_CONSUMED: &str = "saga_messages_consumed_total";
/// Counter: batches of deliveries handled in one transaction, by
/// `consumer` and `outcome` (`committed`, or `split`: rolled back and
/// handled one at a time).
pub const CONSUMER_BATCHES: &str = "saga_consumer_batches_total";
/// Histogram: deliveries per batch, by `consumer`.
pub const CONSUMER_BATCH_SIZE: &str = "saga_consumer_batch_size";
/// Histogram (seconds): from taking a delivery to settling it, by `consumer`
/// and `message_type` (retries and their backoff included).
pub const HANDLER_DURATION: &str = "saga_handler_duration_seconds";
/// Counter: committed saga transitions, by `saga_type`, `from` and `to` state.
pub const TRANSITIONS: &str = "saga_transitions_total";
/// Counter: timers fired, by `saga_type`.
pub const TIMERS_FIRED: &str = "saga_timers_fired_total";
/// Histogram (seconds): fire time minus due time of each fired timer, by `saga_type`.
pub const TIMER_LATENESS: &str = "saga_timer_lateness_seconds";
/// Counter: outbox events confirmed by the broker and marked sent.
pub const OUTBOX_PUBLISHED: &str = "saga_outbox_published_total";
/// Counter: outbox events the broker did not take (retried later).
pub const OUTBOX_PUBLISH_FAILURES: &str = "saga_outbox_publish_failures_total";
/// Counter: state-timeout sweeps, by `saga_type` and `outcome` (`ok`, `failed`).
pub const SWEEPS: &str = "saga_sweeps_total";
/// Counter: instances moved on by a state timeout, by `saga_type` and the
/// `state` that timed out.
pub const STATE_TIMEOUTS: &str = "saga_state_timeouts_total";
/// Counter: broker connections re-established after a loss.
pub const BROKER_RECONNECTS: &str = "saga_broker_reconnects_total";
/// Counter: consumer subscriptions lost (channel closed, consumer cancelled,
/// connection lost), by `consumer`.
pub const CONSUMER_SUBSCRIPTIONS_LOST: &str = "saga_consumer_subscriptions_lost_total";
/// Gauge: instances by `saga_type` and `state` (whole database, computed at scrape).
pub const INSTANCES: &str = "saga_instances";
/// Gauge: parked instances by `saga_type` (whole database, computed at scrape).
pub const INSTANCES_PARKED: &str = "saga_instances_parked";
/// Gauge: outbox rows not yet sent (whole database, computed at scrape).
pub const OUTBOX_UNSENT: &str = "saga_outbox_unsent";
/// Gauge (seconds): age of the oldest unsent outbox row; 0 when none.
pub const OUTBOX_OLDEST_UNSENT_AGE: &str = "saga_outbox_oldest_unsent_age_seconds";
/// Gauge: timers not fired yet (waiting or due).
pub const TIMERS_PENDING: &str = "saga_timers_pending";
/// Gauge: timers due and not fired (the timer backlog).
pub const TIMERS_OVERDUE: &str = "saga_timers_overdue";
/// Gauge (seconds): how long the most overdue unfired timer has been due; 0 when none.
pub const TIMERS_OLDEST_OVERDUE: &str = "saga_timers_oldest_overdue_seconds";

/// What became of one delivery (or one attempt of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumeResult {
    /// Handled and acknowledged.
    Ok,
    /// Already handled before: acknowledged and skipped.
    Duplicate,
    /// An attempt failed and will be tried again.
    Retried,
    /// Moved to the error queue.
    DeadLettered,
    /// Handed back to the queue on shutdown.
    HandedBack,
}

impl ConsumeResult {
    /// The `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumeResult::Ok => "ok",
            ConsumeResult::Duplicate => "duplicate",
            ConsumeResult::Retried => "retried",
            ConsumeResult::DeadLettered => "dead_lettered",
            ConsumeResult::HandedBack => "handed_back",
        }
    }
}

/// The `message_type` label: one of the consumer's `known` types, else
/// `other` (message types come from the wire; the label set must stay
/// bounded).
pub fn message_type_label(known: &[&'static str], message_type: Option<&str>) -> &'static str {
    known
        .iter()
        .copied()
        .find(|k| Some(*k) == message_type)
        .unwrap_or("other")
}

/// Counts one consume outcome.
pub fn consumed(consumer: &str, message_type: &'static str, result: ConsumeResult) {
    metrics::counter!(
        MESSAGES_CONSUMED,
        "consumer" => consumer.to_owned(),
        "message_type" => message_type,
        "outcome" => result.as_str(),
    )
    .increment(1);
}

/// Counts one batch of `size` deliveries, committed or split.
pub fn batch(consumer: &str, size: usize, committed: bool) {
    let outcome = if committed { "committed" } else { "split" };
    metrics::counter!(CONSUMER_BATCHES, "consumer" => consumer.to_owned(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!(CONSUMER_BATCH_SIZE, "consumer" => consumer.to_owned()).record(size as f64);
}

/// Records how long one delivery took from taking to settling.
pub fn handler_duration(consumer: &str, message_type: &'static str, seconds: f64) {
    metrics::histogram!(
        HANDLER_DURATION,
        "consumer" => consumer.to_owned(),
        "message_type" => message_type,
    )
    .record(seconds);
}

/// Counts `n` committed transitions `from -> to` of `saga_type`.
pub fn transitions(saga_type: &'static str, from: &'static str, to: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!(TRANSITIONS, "saga_type" => saga_type, "from" => from, "to" => to)
            .increment(n);
    }
}

/// Counts one fired timer of `saga_type`, `lateness_seconds` after it was due.
pub fn timer_fired(saga_type: &'static str, lateness_seconds: f64) {
    metrics::counter!(TIMERS_FIRED, "saga_type" => saga_type).increment(1);
    metrics::histogram!(TIMER_LATENESS, "saga_type" => saga_type).record(lateness_seconds.max(0.0));
}

/// Counts one relay round's published and failed events.
pub fn outbox_relayed(published: usize, failed: usize) {
    if published > 0 {
        metrics::counter!(OUTBOX_PUBLISHED).increment(published as u64);
    }
    if failed > 0 {
        metrics::counter!(OUTBOX_PUBLISH_FAILURES).increment(failed as u64);
    }
}

/// Counts one state-timeout sweep of `saga_type` (`ok` or `failed`).
pub fn sweep(saga_type: &'static str, ok: bool) {
    let outcome = if ok { "ok" } else { "failed" };
    metrics::counter!(SWEEPS, "saga_type" => saga_type, "outcome" => outcome).increment(1);
}

/// Counts `n` instances of `saga_type` moved on because `state` timed out.
pub fn state_timeouts(saga_type: &'static str, state: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!(STATE_TIMEOUTS, "saga_type" => saga_type, "state" => state).increment(n);
    }
}

/// Counts one broker reconnect.
pub fn broker_reconnected() {
    metrics::counter!(BROKER_RECONNECTS).increment(1);
}

/// Counts one lost subscription of `consumer`.
pub fn subscription_lost(consumer: &str) {
    metrics::counter!(CONSUMER_SUBSCRIPTIONS_LOST, "consumer" => consumer.to_owned()).increment(1);
}

/// Describes every metric (help text in the exposition). Call once after
/// installing a recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        MESSAGES_CONSUMED,
        "Deliveries by consumer, message type and outcome (ok, duplicate, retried, dead_lettered, handed_back)"
    );
    describe_histogram!(
        HANDLER_DURATION,
        metrics::Unit::Seconds,
        "Time from taking a delivery to settling it, retries included"
    );
    describe_counter!(
        CONSUMER_BATCHES,
        "Batches of deliveries handled in one transaction, by consumer and outcome (committed, split)"
    );
    describe_histogram!(CONSUMER_BATCH_SIZE, "Deliveries per batch, by consumer");
    describe_counter!(
        TRANSITIONS,
        "Committed saga transitions by saga type, from and to state"
    );
    describe_counter!(TIMERS_FIRED, "Durable timers fired, by saga type");
    describe_histogram!(
        TIMER_LATENESS,
        metrics::Unit::Seconds,
        "Fire time minus due time of fired timers"
    );
    describe_counter!(OUTBOX_PUBLISHED, "Outbox events confirmed by the broker");
    describe_counter!(
        OUTBOX_PUBLISH_FAILURES,
        "Outbox events the broker did not take (retried)"
    );
    describe_counter!(SWEEPS, "State-timeout sweeps by saga type and outcome");
    describe_counter!(
        STATE_TIMEOUTS,
        "Instances moved on by a state timeout, by saga type and state"
    );
    describe_counter!(BROKER_RECONNECTS, "Broker connections re-established");
    describe_counter!(
        CONSUMER_SUBSCRIPTIONS_LOST,
        "Consumer subscriptions lost (channel closed, cancelled by the broker, connection lost)"
    );
    describe_gauge!(
        INSTANCES,
        "Saga instances by saga type and state (whole database)"
    );
    describe_gauge!(
        INSTANCES_PARKED,
        "Parked saga instances by saga type (whole database)"
    );
    describe_gauge!(
        OUTBOX_UNSENT,
        "Outbox events not yet published (whole database)"
    );
    describe_gauge!(
        OUTBOX_OLDEST_UNSENT_AGE,
        metrics::Unit::Seconds,
        "Age of the oldest unpublished outbox event"
    );
    describe_gauge!(TIMERS_PENDING, "Timers not fired yet");
    describe_gauge!(TIMERS_OVERDUE, "Timers due and not fired");
    describe_gauge!(
        TIMERS_OLDEST_OVERDUE,
        metrics::Unit::Seconds,
        "How long the most overdue unfired timer has been due"
    );
}

/// The database-wide backlog at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Backlog {
    /// Instances per (saga type, state): every state of the known sagas (0
    /// included) and whatever else the table holds.
    pub instances: Vec<(String, String, u64)>,
    /// Parked instances per saga type (known types included with 0).
    pub parked: Vec<(String, u64)>,
    /// Outbox rows not sent.
    pub outbox_unsent: u64,
    /// When the oldest unsent row was written.
    pub outbox_oldest_unsent: Option<DateTime<Utc>>,
    /// Timers not fired.
    pub timers_pending: u64,
    /// Timers due by `now` and not fired.
    pub timers_overdue: u64,
    /// Due time of the most overdue unfired timer.
    pub timers_oldest_due: Option<DateTime<Utc>>,
    /// The moment it was read at (the clock's `now`).
    pub at: DateTime<Utc>,
}

impl Backlog {
    /// Age of the oldest unsent outbox row at `self.at` (zero when none).
    pub fn outbox_lag(&self) -> chrono::Duration {
        self.outbox_oldest_unsent
            .map(|t| (self.at - t).max(chrono::Duration::zero()))
            .unwrap_or_else(chrono::Duration::zero)
    }

    /// How long the most overdue timer has been due at `self.at`.
    pub fn timers_lateness(&self) -> chrono::Duration {
        self.timers_oldest_due
            .map(|t| (self.at - t).max(chrono::Duration::zero()))
            .unwrap_or_else(chrono::Duration::zero)
    }
}

/// Reads the outbox backlog and its oldest row at `now` (the readiness check
/// on outbox lag uses this alone).
pub async fn outbox_backlog<C: ConnectionTrait>(
    db: &C,
) -> Result<(u64, Option<DateTime<Utc>>), SagaError> {
    let unsent = saga_outbox::Entity::find()
        .filter(saga_outbox::Column::SentAt.is_null())
        .count(db)
        .await?;
    let oldest = saga_outbox::Entity::find()
        .select_only()
        .column(saga_outbox::Column::CreatedAt)
        .filter(saga_outbox::Column::SentAt.is_null())
        .order_by_asc(saga_outbox::Column::CreatedAt)
        .limit(1)
        .into_tuple::<DateTime<Utc>>()
        .one(db)
        .await?;
    Ok((unsent, oldest))
}

/// The states of one saga type, for zero-filled gauges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownSaga {
    /// The saga type.
    pub saga_type: &'static str,
    /// Every state name.
    pub states: Vec<&'static str>,
}

impl KnownSaga {
    /// The saga type and states of `S`.
    pub fn of<S: crate::definition::Saga>() -> Self {
        use crate::definition::SagaState as _;
        KnownSaga {
            saga_type: S::TYPE,
            states: S::State::ALL.iter().map(|s| s.name()).collect(),
        }
    }
}

/// Reads the database-wide backlog at `now` (injected: the engine's clock).
/// The states of `known` sagas are reported even when no instance is in them.
pub async fn backlog<C: ConnectionTrait>(
    db: &C,
    now: DateTime<Utc>,
    known: &[KnownSaga],
) -> Result<Backlog, SagaError> {
    let counted: Vec<(String, String, bool, i64)> = instances::Entity::find()
        .select_only()
        .column(instances::Column::SagaType)
        .column(instances::Column::State)
        .column(instances::Column::Faulted)
        .column_as(
            Expr::from(Func::count(Expr::col(instances::Column::Id))),
            "n",
        )
        .group_by(instances::Column::SagaType)
        .group_by(instances::Column::State)
        .group_by(instances::Column::Faulted)
        .into_tuple()
        .all(db)
        .await?;
    let mut by_state: std::collections::BTreeMap<(String, String), u64> = known
        .iter()
        .flat_map(|k| {
            k.states
                .iter()
                .map(|s| ((k.saga_type.to_owned(), (*s).to_owned()), 0))
        })
        .collect();
    let mut parked: std::collections::BTreeMap<String, u64> =
        known.iter().map(|k| (k.saga_type.to_owned(), 0)).collect();
    for (saga_type, state, faulted, n) in counted {
        let n = u64::try_from(n).unwrap_or(0);
        *by_state.entry((saga_type.clone(), state)).or_default() += n;
        if faulted {
            *parked.entry(saga_type).or_default() += n;
        }
    }
    let (outbox_unsent, outbox_oldest_unsent) = outbox_backlog(db).await?;
    let timers_pending = saga_timers::Entity::find()
        .filter(saga_timers::Column::FiredAt.is_null())
        .count(db)
        .await?;
    let timers_overdue = saga_timers::Entity::find()
        .filter(saga_timers::Column::FiredAt.is_null())
        .filter(saga_timers::Column::DueAt.lte(now))
        .count(db)
        .await?;
    let timers_oldest_due = saga_timers::Entity::find()
        .select_only()
        .column(saga_timers::Column::DueAt)
        .filter(saga_timers::Column::FiredAt.is_null())
        .filter(saga_timers::Column::DueAt.lte(now))
        .order_by_asc(saga_timers::Column::DueAt)
        .limit(1)
        .into_tuple::<DateTime<Utc>>()
        .one(db)
        .await?;
    Ok(Backlog {
        instances: by_state.into_iter().map(|((t, s), n)| (t, s, n)).collect(),
        parked: parked.into_iter().collect(),
        outbox_unsent,
        outbox_oldest_unsent,
        timers_pending,
        timers_overdue,
        timers_oldest_due,
        at: now,
    })
}

/// Sets the backlog gauges.
pub fn record_backlog(backlog: &Backlog) {
    for (saga_type, state, n) in &backlog.instances {
        metrics::gauge!(INSTANCES, "saga_type" => saga_type.clone(), "state" => state.clone())
            .set(*n as f64);
    }
    for (saga_type, n) in &backlog.parked {
        metrics::gauge!(INSTANCES_PARKED, "saga_type" => saga_type.clone()).set(*n as f64);
    }
    metrics::gauge!(OUTBOX_UNSENT).set(backlog.outbox_unsent as f64);
    metrics::gauge!(OUTBOX_OLDEST_UNSENT_AGE)
        .set(backlog.outbox_lag().num_milliseconds() as f64 / 1000.0);
    metrics::gauge!(TIMERS_PENDING).set(backlog.timers_pending as f64);
    metrics::gauge!(TIMERS_OVERDUE).set(backlog.timers_overdue as f64);
    metrics::gauge!(TIMERS_OLDEST_OVERDUE)
        .set(backlog.timers_lateness().num_milliseconds() as f64 / 1000.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_type_labels_are_a_closed_set() {
        let known = &["OrderCreated", "OrderExpired"];
        assert_eq!(
            message_type_label(known, Some("OrderCreated")),
            "OrderCreated"
        );
        assert_eq!(
            message_type_label(known, Some("OrderExpired")),
            "OrderExpired"
        );
        assert_eq!(message_type_label(known, Some("DropTables")), "other");
        assert_eq!(message_type_label(known, None), "other");
    }

    #[test]
    fn lags_are_measured_at_the_reading_and_never_negative() {
        let at = DateTime::from_timestamp(1_000, 0).expect("time");
        let backlog = Backlog {
            outbox_oldest_unsent: Some(at - chrono::Duration::seconds(42)),
            timers_oldest_due: Some(at + chrono::Duration::seconds(5)),
            at,
            ..Backlog::default()
        };
        assert_eq!(backlog.outbox_lag(), chrono::Duration::seconds(42));
        assert_eq!(backlog.timers_lateness(), chrono::Duration::zero());
        assert_eq!(Backlog::default().outbox_lag(), chrono::Duration::zero());
    }
}
