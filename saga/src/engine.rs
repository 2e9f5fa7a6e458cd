//! The engine: runs any [`Saga`]. It loads an instance, asks the pure
//! definition what to do, and commits the answer in ONE transaction: the
//! instance row (conditional on its `version`), the journal row, outbox rows
//! for published events, timer rows, the saga's own hook writes (domain
//! effects) and, for a consumed message, the consumer's inbox row.
//!
//! Every saga type gets the same guarantees from the same code: optimistic
//! concurrency with conflict retries, the journal, the outbox, the inbox,
//! durable timers, a persisted retry budget with parking and resume, state
//! timeouts, trace context and metrics labelled by saga type.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sea_orm::sea_query::{Expr, ExprTrait as _, LockBehavior, LockType, OnConflict, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, DatabaseConnection,
    DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};
use serde::Serialize;
use tokio::sync::Notify;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::clock::{Clock, SystemClock};
use crate::definition::{
    Decision, Effect, Routed, Saga, SagaEvent, SagaInput, SagaState, SagaTimer, StateTimeout,
};
use crate::error::SagaError;
use crate::hooks::{HookContext, Hooks, NoHooks};
use crate::journal::{self, JournalOutcome};
use crate::message::Envelope;
use crate::retry::{Attempts, RetryPolicy};
use crate::schema::{instances, timers};
use crate::trace::{self, TraceContext};
use crate::{inbox, outbox};

/// Limits of the engine (the saga's own timings live in its definition).
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// How often a transaction is retried after losing an optimistic-concurrency race.
    pub max_conflict_retries: u32,
    /// The retry budget of a failing input and the backoff between attempts.
    pub retry: RetryPolicy,
    /// How many instances one state-timeout sweep transaction takes.
    pub sweep_batch_size: u64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_conflict_retries: 10,
            retry: RetryPolicy::default(),
            sweep_batch_size: 500,
        }
    }
}

/// What handling one input did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handled<St> {
    /// The message id was already in the inbox: nothing was done.
    Duplicate,
    /// A new instance began in `state`.
    Started {
        /// Its first state.
        state: St,
    },
    /// The definition moved the instance (possibly to the same state).
    Applied {
        /// State before the input.
        from: St,
        /// State after it.
        to: St,
        /// Message types of the events queued in the outbox.
        published: Vec<&'static str>,
    },
    /// The definition decided the input changes nothing (late or repeated).
    Ignored {
        /// The unchanged state.
        state: St,
        /// Why the table ignored the input.
        reason: &'static str,
    },
}

/// A new instance, as committed by [`SagaEngine::start`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Started {
    /// `saga_instances.id`.
    pub instance_id: i64,
    /// Ids of the messages it queued in the outbox, in order.
    pub message_ids: Vec<Uuid>,
}

/// What one fired timer did.
#[derive(Clone, Debug, PartialEq)]
pub struct TimerFired<St, I> {
    /// `saga_timers.id`.
    pub timer_id: i64,
    /// The instance's correlation id.
    pub correlation_id: String,
    /// The timer's kind.
    pub kind: String,
    /// The input it became.
    pub input: I,
    /// What applying it did.
    pub handled: Handled<St>,
}

/// What one state-timeout sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Instances past a state timeout, locked by the sweep.
    pub examined: usize,
    /// Of those, how many moved on their timeout input.
    pub timed_out: usize,
}

impl std::ops::AddAssign for SweepOutcome {
    fn add_assign(&mut self, other: Self) {
        self.examined += other.examined;
        self.timed_out += other.timed_out;
    }
}

/// An instance as the engine sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Instance<St, D> {
    /// `saga_instances.id`.
    pub id: i64,
    /// Its correlation id.
    pub correlation_id: String,
    /// Its state.
    pub state: St,
    /// Its data.
    pub data: D,
    /// Optimistic-concurrency version.
    pub version: i32,
    /// Failed attempts in the current retry budget.
    pub attempts: i32,
    /// Parked (faulted): waits for an operator.
    pub parked: bool,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
    /// When it entered its state.
    pub state_entered_at: DateTime<Utc>,
    /// When it began.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// A parked (faulted) saga instance, as listed for operators.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParkedInstance {
    /// Its saga type.
    pub saga_type: String,
    /// Its correlation id.
    pub correlation_id: String,
    /// Its current state.
    pub state: String,
    /// Attempts spent in the budget.
    pub attempts: i32,
    /// The error of the last attempt.
    pub last_error: Option<String>,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
}

/// What resuming a parked instance did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resumed<St> {
    /// The state the instance was resumed in.
    pub state: St,
    /// What re-running its current step did ([`Saga::resume_input`]);
    /// `None` when the state waits for a timer or a state timeout, which
    /// now pick it up again.
    pub rerun: Option<Handled<St>>,
}

/// A seam for tests and instrumentation: called inside the transaction after
/// an instance was loaded and the definition decided to apply an input,
/// before the version-conditional update. Returning an error fails the
/// attempt as if an effect had failed (the transaction rolls back).
#[async_trait]
pub trait ApplyProbe<S: Saga>: Send + Sync + 'static {
    /// See the trait documentation.
    async fn before_write(
        &self,
        instance: &instances::Model,
        input: &S::Input,
    ) -> Result<(), SagaError>;
}

/// Who or what gave the instance its input (for the journal and causation).
#[derive(Clone, Debug, Default)]
struct Trigger {
    message_id: Option<Uuid>,
    attempt: i32,
    detail: Option<String>,
}

/// Where an input comes from, which decides the inbox and the parked check.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// A consumed message: recorded in the inbox; a parked instance refuses it.
    Message(&'a str, &'a Envelope),
    /// A command from the saga's own code ([`SagaEngine::send`]): a parked
    /// instance refuses it.
    Command,
    /// The re-run of a resumed instance.
    Resume,
}

enum ApplyError {
    Conflict,
    Saga(SagaError),
}

impl From<SagaError> for ApplyError {
    fn from(e: SagaError) -> Self {
        ApplyError::Saga(e)
    }
}

impl From<sea_orm::DbErr> for ApplyError {
    fn from(e: sea_orm::DbErr) -> Self {
        ApplyError::Saga(SagaError::Db(e))
    }
}

/// An instance row with its state and data read.
struct Loaded<S: Saga> {
    row: instances::Model,
    state: S::State,
    data: S::Data,
}

impl<S: Saga> Loaded<S> {
    fn read(row: instances::Model) -> Result<Self, SagaError> {
        let state = S::State::parse(&row.state).ok_or_else(|| {
            SagaError::Corrupt(format!(
                "{} instance {} has unknown state `{}`",
                S::TYPE,
                row.id,
                row.state
            ))
        })?;
        let data = serde_json::from_value(row.data.clone()).map_err(|e| {
            SagaError::Corrupt(format!("{} instance {} data: {e}", S::TYPE, row.id))
        })?;
        Ok(Loaded { row, state, data })
    }
}

/// Runs the saga `S`: starts instances, applies inputs, fires its timers,
/// sweeps its state timeouts, parks and resumes. Cheap to clone.
pub struct SagaEngine<S: Saga> {
    saga: Arc<S>,
    hooks: Arc<dyn Hooks<S>>,
    db: DatabaseConnection,
    clock: Arc<dyn Clock>,
    settings: EngineSettings,
    outbox_signal: Arc<Notify>,
    probe: Option<Arc<dyn ApplyProbe<S>>>,
}

impl<S: Saga> Clone for SagaEngine<S> {
    fn clone(&self) -> Self {
        Self {
            saga: self.saga.clone(),
            hooks: self.hooks.clone(),
            db: self.db.clone(),
            clock: self.clock.clone(),
            settings: self.settings.clone(),
            outbox_signal: self.outbox_signal.clone(),
            probe: self.probe.clone(),
        }
    }
}

impl<S: Saga> SagaEngine<S> {
    /// An engine for `saga` on `db`, with the system clock, no hooks and
    /// default settings; change them with the `with_*` methods.
    pub fn new(saga: S, db: DatabaseConnection) -> Self {
        Self {
            saga: Arc::new(saga),
            hooks: Arc::new(NoHooks),
            db,
            clock: Arc::new(SystemClock),
            settings: EngineSettings::default(),
            outbox_signal: Arc::new(Notify::new()),
            probe: None,
        }
    }

    /// The saga's effectful half.
    pub fn with_hooks(mut self, hooks: impl Hooks<S>) -> Self {
        self.hooks = Arc::new(hooks);
        self
    }

    /// Where time comes from (a [`crate::clock::ManualClock`] in tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Limits and the retry budget.
    pub fn with_settings(mut self, settings: EngineSettings) -> Self {
        self.settings = settings;
        self
    }

    /// Share a wake-up signal with an outbox relay, so events leave as soon as
    /// their transaction commits instead of at the next poll.
    pub fn with_outbox_signal(mut self, signal: Arc<Notify>) -> Self {
        self.outbox_signal = signal;
        self
    }

    /// Installs an [`ApplyProbe`] (tests: inject failures, force races).
    pub fn with_probe(mut self, probe: Arc<dyn ApplyProbe<S>>) -> Self {
        self.probe = Some(probe);
        self
    }

    /// The saga definition.
    pub fn saga(&self) -> &S {
        &self.saga
    }

    /// The database connection.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The settings.
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// The signal that wakes the outbox relay. Call `notify_one` after
    /// committing a transaction that started an instance
    /// ([`SagaEngine::start`] runs in the caller's transaction).
    pub fn outbox_signal(&self) -> &Arc<Notify> {
        &self.outbox_signal
    }

    /// Starts an instance inside the caller's transaction: the instance row
    /// in the saga's first state, its first journal row and the effects of
    /// [`Saga::start`] (outbox rows, timers, hook writes). The caller
    /// commits, then wakes the relay ([`SagaEngine::outbox_signal`]).
    ///
    /// A second start of the same correlation id fails with a unique
    /// violation ([`SagaError::is_unique_violation`]).
    pub async fn start(
        &self,
        txn: &DatabaseTransaction,
        correlation_id: &str,
        data: S::Data,
    ) -> Result<Started, SagaError> {
        self.start_in(txn, correlation_id, data, None).await
    }

    async fn start_in(
        &self,
        txn: &DatabaseTransaction,
        correlation_id: &str,
        data: S::Data,
        message_id: Option<Uuid>,
    ) -> Result<Started, SagaError> {
        let now = self.clock.now();
        let start = self.saga.start(&data);
        let json = serde_json::to_value(&data)
            .map_err(|e| SagaError::Corrupt(format!("{} data: {e}", S::TYPE)))?;
        let (traceparent, tracestate) = TraceContext::columns(TraceContext::current().as_ref());
        let inserted = instances::Entity::insert(instances::ActiveModel {
            saga_type: Set(S::TYPE.to_owned()),
            correlation_id: Set(correlation_id.to_owned()),
            state: Set(start.state.name().to_owned()),
            version: Set(0),
            attempts: Set(0),
            faulted: Set(false),
            last_error: Set(None),
            data: Set(json),
            state_entered_at: Set(now),
            created_at: Set(now),
            updated_at: Set(now),
            traceparent: Set(traceparent),
            tracestate: Set(tracestate),
            ..Default::default()
        })
        .exec(txn)
        .await?;
        let instance_id = inserted.last_insert_id;
        let cx = HookContext {
            txn,
            instance_id,
            correlation_id,
            data: &data,
            now,
        };
        let published = self
            .carry_out(&cx, start.effects, None, start.state, message_id)
            .await?;
        // The consumed message that started it, or else the first message
        // the start queued (what a reader follows next).
        let journal_message = message_id.or(published.first().map(|(_, id)| *id));
        journal::write(
            txn,
            journal::Entry {
                saga_type: S::TYPE,
                instance_id,
                correlation_id,
                from: None,
                to: start.state.name(),
                trigger: start.trigger,
                outcome: JournalOutcome::Applied,
                message_id: journal_message,
                attempt: 1,
                input: None,
                detail: Some(start.note.to_owned()),
                error: None,
            },
            now,
        )
        .await?;
        tracing::info!(
            saga_type = S::TYPE,
            correlation_id,
            message_id = journal_message.map(tracing::field::display),
            state = start.state.name(),
            trigger = start.trigger,
            "saga started: {}",
            start.note
        );
        Ok(Started {
            instance_id,
            message_ids: published.into_iter().map(|(_, id)| id).collect(),
        })
    }

    /// Handles a consumed message for `consumer` exactly once: routes it
    /// ([`Saga::route`]) to a new instance or to the input of its
    /// instance, records it in the inbox in the same transaction (a
    /// duplicate changes nothing) and retries lost optimistic-concurrency
    /// races. A parked instance refuses it ([`SagaError::Parked`]).
    pub async fn handle(
        &self,
        consumer: &str,
        envelope: &Envelope,
    ) -> Result<Handled<S::State>, SagaError> {
        match self.saga.route(envelope).map_err(SagaError::Malformed)? {
            Routed::Start(data) => self.start_from_message(consumer, envelope, data).await,
            Routed::Input(input) => {
                self.apply_input(
                    &envelope.correlation_id,
                    input,
                    Source::Message(consumer, envelope),
                    None,
                )
                .await
            }
        }
    }

    /// Gives `input` to the instance `correlation_id` (a command from the
    /// saga's own code, not a consumed message: no inbox row), retrying
    /// lost optimistic-concurrency races.
    pub async fn send(
        &self,
        correlation_id: &str,
        input: S::Input,
    ) -> Result<Handled<S::State>, SagaError> {
        self.apply_input(correlation_id, input, Source::Command, None)
            .await
    }

    async fn start_from_message(
        &self,
        consumer: &str,
        envelope: &Envelope,
        data: S::Data,
    ) -> Result<Handled<S::State>, SagaError> {
        let correlation_id = envelope.correlation_id.as_str();
        let mut conflicts = 0;
        loop {
            let txn = self.db.begin().await?;
            if !inbox::record(&txn, consumer, envelope, self.clock.now()).await? {
                txn.rollback().await?;
                return Ok(Handled::Duplicate);
            }
            if let Some(row) = find(&txn, S::TYPE, correlation_id).await? {
                // Another message started it: journal the late start.
                let existing = Loaded::<S>::read(row)?;
                let reason = "instance already started";
                journal::write(
                    &txn,
                    journal::Entry {
                        saga_type: S::TYPE,
                        instance_id: existing.row.id,
                        correlation_id,
                        from: Some(existing.state.name()),
                        to: existing.state.name(),
                        trigger: &envelope.message_type,
                        outcome: JournalOutcome::Ignored,
                        message_id: Some(envelope.message_id),
                        attempt: existing.row.attempts + 1,
                        input: None,
                        detail: Some(reason.to_owned()),
                        error: None,
                    },
                    self.clock.now(),
                )
                .await?;
                txn.commit().await?;
                return Ok(Handled::Ignored {
                    state: existing.state,
                    reason,
                });
            }
            match self
                .start_in(
                    &txn,
                    correlation_id,
                    data.clone(),
                    Some(envelope.message_id),
                )
                .await
            {
                Ok(started) => {
                    txn.commit().await?;
                    if !started.message_ids.is_empty() {
                        self.outbox_signal.notify_one();
                    }
                    let state = self.saga.start(&data).state;
                    return Ok(Handled::Started { state });
                }
                Err(e) if e.is_unique_violation() => {
                    // Two starts raced; the next round sees the winner.
                    txn.rollback().await?;
                    conflicts += 1;
                    if conflicts > self.settings.max_conflict_retries {
                        return Err(SagaError::Contention(correlation_id.to_owned()));
                    }
                }
                Err(e) => {
                    txn.rollback().await?;
                    return Err(e);
                }
            }
        }
    }

    async fn apply_input(
        &self,
        correlation_id: &str,
        input: S::Input,
        source: Source<'_>,
        detail: Option<&str>,
    ) -> Result<Handled<S::State>, SagaError> {
        let mut conflicts = 0;
        loop {
            let txn = self.db.begin().await?;
            if let Source::Message(consumer, envelope) = source
                && !inbox::record(&txn, consumer, envelope, self.clock.now()).await?
            {
                txn.rollback().await?;
                return Ok(Handled::Duplicate);
            }
            let row = load(&txn, S::TYPE, correlation_id).await?;
            if row.faulted && !matches!(source, Source::Resume) {
                txn.rollback().await?;
                return Err(SagaError::Parked {
                    saga_type: S::TYPE,
                    correlation_id: correlation_id.to_owned(),
                });
            }
            let loaded = Loaded::<S>::read(row)?;
            let trigger = Trigger {
                message_id: match source {
                    Source::Message(_, envelope) => Some(envelope.message_id),
                    _ => None,
                },
                attempt: loaded.row.attempts + 1,
                detail: detail.map(str::to_owned),
            };
            match self.apply(&txn, loaded, input.clone(), trigger).await {
                Ok(handled) => {
                    txn.commit().await?;
                    self.committed(&handled);
                    return Ok(handled);
                }
                Err(ApplyError::Conflict) => {
                    txn.rollback().await?;
                    conflicts += 1;
                    if conflicts > self.settings.max_conflict_retries {
                        return Err(SagaError::Contention(correlation_id.to_owned()));
                    }
                }
                Err(ApplyError::Saga(e)) => {
                    txn.rollback().await?;
                    return Err(e);
                }
            }
        }
    }

    /// Fires at most one due timer of this saga type: its hook turns it into
    /// an input, which is applied, all in one transaction. `None` when
    /// nothing is due. A timer whose handling fails spends one attempt of
    /// its instance's budget and is tried again after a backoff (never once
    /// the instance is parked), so it cannot hold up the timers behind it.
    pub async fn try_fire_due_timer_once(
        &self,
    ) -> Result<Option<TimerFired<S::State, S::Input>>, SagaError> {
        let mut conflicts = 0;
        loop {
            let now = self.clock.now();
            let txn = self.db.begin().await?;
            let timer = timers::Entity::find()
                .filter(timers::Column::SagaType.eq(S::TYPE))
                .filter(timers::Column::FiredAt.is_null())
                .filter(timers::Column::DueAt.lte(now))
                .filter(not_parked(timers::Column::SagaInstanceId))
                .order_by_asc(timers::Column::DueAt)
                .limit(1)
                .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
                .one(&txn)
                .await?;
            let Some(timer) = timer else {
                txn.commit().await?;
                return Ok(None);
            };
            // Firing continues the trace of whatever scheduled the timer.
            let span = tracing::info_span!(
                "timer.fire",
                saga_type = S::TYPE,
                correlation_id = %timer.correlation_id,
                timer_id = timer.id,
                timer_kind = %timer.timer_kind,
                trace_id = tracing::field::Empty,
            );
            let stored = TraceContext::from_columns(
                timer.traceparent.as_deref(),
                timer.tracestate.as_deref(),
            );
            trace::continue_trace(&span, stored.as_ref());
            let fired = self.fire(&txn, &timer, now).instrument(span).await;
            match fired {
                Ok((input, handled)) => {
                    txn.commit().await?;
                    self.committed(&handled);
                    crate::metrics::timer_fired(
                        S::TYPE,
                        (now - timer.due_at).num_milliseconds() as f64 / 1000.0,
                    );
                    return Ok(Some(TimerFired {
                        timer_id: timer.id,
                        correlation_id: timer.correlation_id,
                        kind: timer.timer_kind,
                        input,
                        handled,
                    }));
                }
                Err(ApplyError::Conflict) => {
                    txn.rollback().await?;
                    conflicts += 1;
                    if conflicts > self.settings.max_conflict_retries {
                        return Err(SagaError::Contention(timer.correlation_id));
                    }
                }
                Err(ApplyError::Saga(e)) => {
                    txn.rollback().await?;
                    // Spend one attempt of the instance's budget and try the
                    // timer again after a backoff (or never, once parked).
                    let attempts = self
                        .record_failure(&timer.correlation_id, None, &timer.timer_kind, &e)
                        .await?;
                    let retry_at = self.clock.now()
                        + Duration::from_std(self.settings.retry.delay_after(
                            u32::try_from(attempts.spent).unwrap_or(u32::MAX),
                            rand::random::<f64>(),
                        ))
                        .unwrap_or(Duration::seconds(1));
                    timers::Entity::update_many()
                        .col_expr(timers::Column::DueAt, Expr::value(retry_at))
                        .filter(timers::Column::Id.eq(timer.id))
                        .filter(timers::Column::FiredAt.is_null())
                        .exec(&self.db)
                        .await?;
                    return Err(e);
                }
            }
        }
    }

    /// Marks `timer` fired, asks the hook for its input and applies it.
    async fn fire(
        &self,
        txn: &DatabaseTransaction,
        timer: &timers::Model,
        now: DateTime<Utc>,
    ) -> Result<(S::Input, Handled<S::State>), ApplyError> {
        // Marked first: a transition that schedules this kind again re-arms
        // the same row (fired_at back to NULL) in this transaction.
        timers::Entity::update_many()
            .col_expr(timers::Column::FiredAt, Expr::value(now))
            .filter(timers::Column::Id.eq(timer.id))
            .exec(txn)
            .await?;
        let row = instances::Entity::find_by_id(timer.saga_instance_id)
            .one(txn)
            .await?
            .ok_or_else(|| SagaError::UnknownInstance {
                saga_type: S::TYPE,
                correlation_id: timer.correlation_id.clone(),
            })?;
        let loaded = Loaded::<S>::read(row)?;
        // Timers written before payloads were kept carry their kind as payload.
        let payload = timer
            .payload
            .clone()
            .unwrap_or_else(|| serde_json::Value::String(timer.timer_kind.clone()));
        let value: S::Timer = serde_json::from_value(payload).map_err(|e| {
            SagaError::Corrupt(format!(
                "{} timer {} ({}): {e}",
                S::TYPE,
                timer.id,
                timer.timer_kind
            ))
        })?;
        let cx = HookContext {
            txn,
            instance_id: loaded.row.id,
            correlation_id: &timer.correlation_id,
            data: &loaded.data,
            now,
        };
        let input = self.hooks.timer_input(&cx, &value).await?;
        let trigger = Trigger {
            message_id: None,
            attempt: loaded.row.attempts + 1,
            detail: Some(format!(
                "timer {} ({}) due {} fired {}",
                timer.id,
                timer.timer_kind,
                timer.due_at.to_rfc3339(),
                now.to_rfc3339()
            )),
        };
        let handled = self.apply(txn, loaded, input.clone(), trigger).await?;
        Ok((input, handled))
    }

    /// When this saga type's next unfired timer is due, if any.
    pub async fn next_timer_due(&self) -> Result<Option<DateTime<Utc>>, SagaError> {
        let next = timers::Entity::find()
            .select_only()
            .column(timers::Column::DueAt)
            .filter(timers::Column::SagaType.eq(S::TYPE))
            .filter(timers::Column::FiredAt.is_null())
            .filter(not_parked(timers::Column::SagaInstanceId))
            .order_by_asc(timers::Column::DueAt)
            .limit(1)
            .into_tuple::<DateTime<Utc>>()
            .one(&self.db)
            .await?;
        Ok(next)
    }

    /// One sweep batch per state timeout ([`Saga::state_timeouts`]): gives
    /// each instance that has been in the state for longer than the timeout
    /// the timeout's input. Rows are locked with `SKIP LOCKED`, so several
    /// sweepers can run at once without handling an instance twice.
    pub async fn try_sweep_once(&self) -> Result<SweepOutcome, SagaError> {
        let mut total = SweepOutcome::default();
        for timeout in self.saga.state_timeouts() {
            total += self.sweep(&timeout).await?;
        }
        Ok(total)
    }

    /// Sweeps batch after batch until no instance is past a state timeout.
    pub async fn sweep_all(&self) -> Result<SweepOutcome, SagaError> {
        let mut total = SweepOutcome::default();
        for timeout in self.saga.state_timeouts() {
            loop {
                let batch = self.sweep(&timeout).await?;
                let done = (batch.examined as u64) < self.settings.sweep_batch_size
                    || batch.timed_out == 0;
                total += batch;
                if done {
                    break;
                }
            }
        }
        Ok(total)
    }

    async fn sweep(&self, timeout: &StateTimeout<S>) -> Result<SweepOutcome, SagaError> {
        let now = self.clock.now();
        let cutoff = now - timeout.after;
        let state = timeout.state.name();
        let txn = self.db.begin().await?;
        let stale = instances::Entity::find()
            .filter(instances::Column::SagaType.eq(S::TYPE))
            .filter(instances::Column::State.eq(state))
            .filter(instances::Column::StateEnteredAt.lte(cutoff))
            .filter(instances::Column::Faulted.eq(false))
            .order_by_asc(instances::Column::StateEnteredAt)
            .limit(self.settings.sweep_batch_size)
            .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
            .all(&txn)
            .await?;
        if stale.is_empty() {
            txn.commit().await?;
            return Ok(SweepOutcome::default());
        }
        let ids: Vec<String> = stale.iter().map(|i| i.correlation_id.clone()).collect();
        self.hooks.prepare_batch(&txn, &ids).await?;
        let mut outcome = SweepOutcome {
            examined: stale.len(),
            timed_out: 0,
        };
        let mut moved = Vec::new();
        for row in stale {
            let correlation_id = row.correlation_id.clone();
            // The timeout continues the instance's trace (its latest transition).
            let span = tracing::info_span!(
                "state.timeout",
                saga_type = S::TYPE,
                correlation_id = %correlation_id,
                state,
                trace_id = tracing::field::Empty,
            );
            let stored =
                TraceContext::from_columns(row.traceparent.as_deref(), row.tracestate.as_deref());
            trace::continue_trace(&span, stored.as_ref());
            let detail = format!(
                "{state} since {}, timeout {} s, swept at {}",
                row.state_entered_at.to_rfc3339(),
                timeout.after.num_seconds(),
                now.to_rfc3339()
            );
            let attempt = row.attempts + 1;
            let applied = async {
                let loaded = Loaded::<S>::read(row)?;
                let trigger = Trigger {
                    message_id: None,
                    attempt,
                    detail: Some(detail),
                };
                self.apply(&txn, loaded, timeout.input.clone(), trigger)
                    .await
            }
            .instrument(span)
            .await;
            match applied {
                Ok(handled @ Handled::Applied { .. }) => {
                    outcome.timed_out += 1;
                    moved.push(handled);
                }
                Ok(_) => {}
                // The row is locked by us, so a conflict means a writer that
                // did not lock; skip it, the next sweep looks again.
                Err(ApplyError::Conflict) => {}
                Err(ApplyError::Saga(e)) => {
                    // The whole batch rolls back; the failing instance spends
                    // one attempt, and is left out once it is parked.
                    txn.rollback().await?;
                    self.record_failure(&correlation_id, None, timeout.input.name(), &e)
                        .await?;
                    return Err(e);
                }
            }
        }
        txn.commit().await?;
        for handled in &moved {
            self.committed(handled);
        }
        crate::metrics::state_timeouts(S::TYPE, state, outcome.timed_out as u64);
        Ok(outcome)
    }

    /// Spends one attempt of the instance's retry budget after a failed
    /// input: `attempts + 1` and the error are saved with the instance (so
    /// every runner and every restart share one budget), a `failed` journal
    /// row is written, and once `retry.max_attempts` is reached the instance
    /// is parked (`faulted`), which timers and sweeps then leave alone until
    /// an operator resumes it. Non-retryable errors park at once.
    pub async fn record_failure(
        &self,
        correlation_id: &str,
        message_id: Option<Uuid>,
        trigger: &str,
        error: &SagaError,
    ) -> Result<Attempts, SagaError> {
        let now = self.clock.now();
        let budget = self.settings.retry.budget_for(error.is_retryable());
        let text = error.to_string();
        let txn = self.db.begin().await?;
        let instance = load(&txn, S::TYPE, correlation_id).await?;
        let spent = instance.attempts.saturating_add(1);
        let exhausted = instance.faulted || spent >= budget;
        instances::Entity::update_many()
            .col_expr(instances::Column::Attempts, Expr::value(spent))
            .col_expr(instances::Column::LastError, Expr::value(text.clone()))
            .col_expr(instances::Column::Faulted, Expr::value(exhausted))
            .col_expr(instances::Column::UpdatedAt, Expr::value(now))
            .filter(instances::Column::Id.eq(instance.id))
            .exec(&txn)
            .await?;
        journal::write(
            &txn,
            journal::Entry {
                saga_type: S::TYPE,
                instance_id: instance.id,
                correlation_id,
                from: Some(&instance.state),
                to: &instance.state,
                trigger,
                outcome: if exhausted {
                    JournalOutcome::Parked
                } else {
                    JournalOutcome::Failed
                },
                message_id,
                attempt: spent,
                input: None,
                detail: Some(if exhausted {
                    format!("attempt {spent} of {budget} failed; instance parked")
                } else {
                    format!("attempt {spent} of {budget} failed; will retry")
                }),
                error: Some(text.clone()),
            },
            now,
        )
        .await?;
        txn.commit().await?;
        if exhausted {
            tracing::error!(
                saga_type = S::TYPE,
                correlation_id,
                message_id = message_id.map(tracing::field::display),
                attempts = spent,
                error = %text,
                "saga parked: retry budget spent"
            );
        } else {
            tracing::warn!(
                saga_type = S::TYPE,
                correlation_id,
                message_id = message_id.map(tracing::field::display),
                attempt = spent,
                error = %text,
                "saga input failed; will retry"
            );
        }
        Ok(Attempts { spent, exhausted })
    }

    /// Parked (faulted) instances of this saga type, oldest first.
    pub async fn parked(&self, limit: u64) -> Result<Vec<ParkedInstance>, SagaError> {
        parked(&self.db, Some(S::TYPE), limit).await
    }

    /// Resumes a parked instance with a fresh budget: its pending timers are
    /// made due now, sweeps see it again, and [`Saga::resume_input`] (if any)
    /// is re-run. The journal row does not say who did it: prefer
    /// [`SagaEngine::resume_by`].
    pub async fn resume(&self, correlation_id: &str) -> Result<Resumed<S::State>, SagaError> {
        self.resume_as(correlation_id, None).await
    }

    /// [`SagaEngine::resume`] on behalf of `operator` (e.g.
    /// `admin@example.com (user 1)`): the `resumed` journal row names the
    /// operator (in its input, `{"operator": ..}`, and its detail), and the
    /// same transaction logs the action in `saga_operator_actions`
    /// ([`crate::operator`]).
    pub async fn resume_by(
        &self,
        correlation_id: &str,
        operator: &str,
    ) -> Result<Resumed<S::State>, SagaError> {
        self.resume_as(correlation_id, Some(operator)).await
    }

    async fn resume_as(
        &self,
        correlation_id: &str,
        operator: Option<&str>,
    ) -> Result<Resumed<S::State>, SagaError> {
        let now = self.clock.now();
        let txn = self.db.begin().await?;
        let row = load(&txn, S::TYPE, correlation_id).await?;
        if !row.faulted {
            txn.rollback().await?;
            return Err(SagaError::NotParked {
                saga_type: S::TYPE,
                correlation_id: correlation_id.to_owned(),
            });
        }
        let instance = Loaded::<S>::read(row)?;
        let state = instance.state;
        let row = instance.row;
        let resumed = instances::Entity::update_many()
            .col_expr(instances::Column::Faulted, Expr::value(false))
            .col_expr(instances::Column::Attempts, Expr::value(0))
            .col_expr(instances::Column::Version, Expr::value(row.version + 1))
            .col_expr(instances::Column::UpdatedAt, Expr::value(now))
            .filter(instances::Column::Id.eq(row.id))
            .filter(instances::Column::Version.eq(row.version))
            .exec(&txn)
            .await?;
        if resumed.rows_affected != 1 {
            // Changed while we looked: the operator can simply try again.
            txn.rollback().await?;
            return Err(SagaError::Contention(correlation_id.to_owned()));
        }
        timers::Entity::update_many()
            .col_expr(timers::Column::DueAt, Expr::value(now))
            .filter(timers::Column::SagaInstanceId.eq(row.id))
            .filter(timers::Column::FiredAt.is_null())
            .exec(&txn)
            .await?;
        journal::write(
            &txn,
            journal::Entry {
                saga_type: S::TYPE,
                instance_id: row.id,
                correlation_id,
                from: Some(state.name()),
                to: state.name(),
                trigger: "Resumed",
                outcome: JournalOutcome::Resumed,
                message_id: None,
                attempt: 0,
                input: operator.map(|op| serde_json::json!({ "operator": op })),
                detail: Some(format!(
                    "resumed by {} with a fresh budget; last error: {}",
                    operator.unwrap_or("an operator"),
                    row.last_error.as_deref().unwrap_or("none")
                )),
                error: None,
            },
            now,
        )
        .await?;
        if let Some(operator) = operator {
            crate::operator::record(
                &txn,
                crate::operator::NewAction {
                    kind: crate::operator::ActionKind::Resume,
                    saga_type: Some(S::TYPE),
                    correlation_id: Some(correlation_id),
                    queue: None,
                    operator,
                    detail: Some(serde_json::json!({
                        "state": state.name(),
                        "attempts": row.attempts,
                        "last_error": row.last_error,
                    })),
                },
                now,
            )
            .await?;
        }
        txn.commit().await?;
        tracing::info!(
            saga_type = S::TYPE,
            correlation_id,
            state = state.name(),
            operator,
            "parked saga resumed"
        );
        let rerun = match self.saga.resume_input(state) {
            Some(input) => Some(
                self.apply_input(
                    correlation_id,
                    input,
                    Source::Resume,
                    Some("re-run after resume"),
                )
                .await?,
            ),
            None => None,
        };
        Ok(Resumed { state, rerun })
    }

    /// The instance `correlation_id`, if it exists.
    pub async fn instance(
        &self,
        correlation_id: &str,
    ) -> Result<Option<Instance<S::State, S::Data>>, SagaError> {
        let Some(row) = find(&self.db, S::TYPE, correlation_id).await? else {
            return Ok(None);
        };
        let loaded = Loaded::<S>::read(row)?;
        let row = loaded.row;
        Ok(Some(Instance {
            id: row.id,
            correlation_id: row.correlation_id,
            state: loaded.state,
            data: loaded.data,
            version: row.version,
            attempts: row.attempts,
            parked: row.faulted,
            last_error: row.last_error,
            state_entered_at: row.state_entered_at,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }))
    }

    /// The state of the instance `correlation_id`.
    pub async fn state(&self, correlation_id: &str) -> Result<S::State, SagaError> {
        self.instance(correlation_id)
            .await?
            .map(|i| i.state)
            .ok_or_else(|| SagaError::UnknownInstance {
                saga_type: S::TYPE,
                correlation_id: correlation_id.to_owned(),
            })
    }

    /// Right after each commit of an applied input: count it and wake the relay.
    fn committed(&self, handled: &Handled<S::State>) {
        if let Handled::Applied {
            from,
            to,
            published,
        } = handled
        {
            crate::metrics::transitions(S::TYPE, from.name(), to.name(), 1);
            if !published.is_empty() {
                self.outbox_signal.notify_one();
            }
        }
    }

    /// Applies one input to a loaded instance inside `txn`.
    async fn apply(
        &self,
        txn: &DatabaseTransaction,
        instance: Loaded<S>,
        input: S::Input,
        trigger: Trigger,
    ) -> Result<Handled<S::State>, ApplyError> {
        let now = self.clock.now();
        let Loaded { row, state, data } = instance;
        let input_json = serde_json::to_value(&input)
            .map_err(|e| SagaError::Corrupt(format!("{} input: {e}", S::TYPE)))?;
        let (to, outcome, note, handled) = match self.saga.decide(state, &data, &input) {
            Decision::Apply {
                next,
                effects,
                data: new_data,
                note,
            } => {
                if let Some(probe) = &self.probe {
                    probe.before_write(&row, &input).await?;
                }
                let entered = if next == state {
                    row.state_entered_at
                } else {
                    now
                };
                let mut update = instances::Entity::update_many();
                // The instance continues the trace of its latest transition
                // (what a state-timeout sweep picks up).
                if let Some(current) = TraceContext::current() {
                    update = update
                        .col_expr(
                            instances::Column::Traceparent,
                            Expr::value(current.traceparent()),
                        )
                        .col_expr(
                            instances::Column::Tracestate,
                            Expr::value(current.tracestate().map(str::to_owned)),
                        );
                }
                if let Some(new_data) = &new_data {
                    let json = serde_json::to_value(new_data)
                        .map_err(|e| SagaError::Corrupt(format!("{} data: {e}", S::TYPE)))?;
                    update = update.col_expr(instances::Column::Data, Expr::value(json));
                }
                let updated = update
                    .col_expr(instances::Column::State, Expr::value(next.name()))
                    // Success: the retry budget starts afresh.
                    .col_expr(instances::Column::Attempts, Expr::value(0))
                    .col_expr(
                        instances::Column::LastError,
                        Expr::value(Option::<String>::None),
                    )
                    .col_expr(instances::Column::Version, Expr::value(row.version + 1))
                    .col_expr(instances::Column::StateEnteredAt, Expr::value(entered))
                    .col_expr(instances::Column::UpdatedAt, Expr::value(now))
                    .filter(instances::Column::Id.eq(row.id))
                    .filter(instances::Column::Version.eq(row.version))
                    .exec(txn)
                    .await?;
                if updated.rows_affected != 1 {
                    return Err(ApplyError::Conflict);
                }
                let data = new_data.unwrap_or(data);
                let cx = HookContext {
                    txn,
                    instance_id: row.id,
                    correlation_id: &row.correlation_id,
                    data: &data,
                    now,
                };
                if next != state {
                    self.hooks.entered(&cx, state, next).await?;
                }
                let published = self
                    .carry_out(&cx, effects, Some(state), next, trigger.message_id)
                    .await?;
                (
                    next,
                    JournalOutcome::Applied,
                    note,
                    Handled::Applied {
                        from: state,
                        to: next,
                        published: published.into_iter().map(|(t, _)| t).collect(),
                    },
                )
            }
            Decision::Ignore { reason } => (
                state,
                JournalOutcome::Ignored,
                reason,
                Handled::Ignored { state, reason },
            ),
            Decision::Reject { reason } => {
                return Err(ApplyError::Saga(SagaError::Rejected {
                    state: state.name().to_owned(),
                    input: input.name().to_owned(),
                    reason,
                }));
            }
        };
        let detail = match &trigger.detail {
            Some(d) => format!("{note}; {d}"),
            None => note.to_owned(),
        };
        journal::write(
            txn,
            journal::Entry {
                saga_type: S::TYPE,
                instance_id: row.id,
                correlation_id: &row.correlation_id,
                from: Some(state.name()),
                to: to.name(),
                trigger: input.name(),
                outcome,
                message_id: trigger.message_id,
                attempt: trigger.attempt,
                input: Some(input_json),
                detail: Some(detail),
                error: None,
            },
            now,
        )
        .await?;
        tracing::info!(
            saga_type = S::TYPE,
            correlation_id = %row.correlation_id,
            message_id = trigger.message_id.map(tracing::field::display),
            from = state.name(),
            to = to.name(),
            trigger = input.name(),
            outcome = outcome.as_str(),
            "saga: {note}"
        );
        Ok(handled)
    }

    /// Carries out a transition's effects in order; returns the published
    /// message types and ids.
    async fn carry_out(
        &self,
        cx: &HookContext<'_, S>,
        effects: Vec<Effect<S>>,
        from: Option<S::State>,
        to: S::State,
        causation_id: Option<Uuid>,
    ) -> Result<Vec<(&'static str, Uuid)>, SagaError> {
        let mut published = Vec::new();
        for effect in effects {
            match effect {
                Effect::Publish(event) => {
                    let payload = self
                        .saga
                        .event_payload(&event, cx.data, from, to)
                        .map_err(|e| SagaError::Corrupt(format!("event payload: {e}")))?;
                    let envelope = Envelope {
                        message_id: Uuid::new_v4(),
                        message_type: event.message_type().to_owned(),
                        correlation_id: cx.correlation_id.to_owned(),
                        causation_id,
                        occurred_at: cx.now,
                        initiated_by: self.saga.initiated_by(cx.data),
                        payload,
                    };
                    outbox::enqueue(cx.txn, &envelope, event.routing_key()).await?;
                    published.push((event.message_type(), envelope.message_id));
                }
                Effect::Schedule { timer, after } => {
                    schedule_timer::<S>(cx, &timer, cx.now + after).await?;
                }
                Effect::Cancel(kind) => {
                    timers::Entity::delete_many()
                        .filter(timers::Column::SagaInstanceId.eq(cx.instance_id))
                        .filter(timers::Column::TimerKind.eq(kind))
                        .filter(timers::Column::FiredAt.is_null())
                        .exec(cx.txn)
                        .await?;
                }
                Effect::Domain(effect) => self.hooks.effect(cx, &effect).await?,
            }
        }
        Ok(published)
    }
}

/// Parked (faulted) instances of `saga_type` (or of every type), oldest first.
pub async fn parked<C: ConnectionTrait>(
    db: &C,
    saga_type: Option<&str>,
    limit: u64,
) -> Result<Vec<ParkedInstance>, SagaError> {
    let mut query = instances::Entity::find().filter(instances::Column::Faulted.eq(true));
    if let Some(saga_type) = saga_type {
        query = query.filter(instances::Column::SagaType.eq(saga_type));
    }
    Ok(query
        .order_by_asc(instances::Column::UpdatedAt)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(|i| ParkedInstance {
            saga_type: i.saga_type,
            correlation_id: i.correlation_id,
            state: i.state,
            attempts: i.attempts,
            last_error: i.last_error,
            parked_at: i.updated_at,
        })
        .collect())
}

/// Arms the instance's timer of `timer`'s kind: inserted, or re-armed with a
/// new due time and payload (also after it fired).
async fn schedule_timer<S: Saga>(
    cx: &HookContext<'_, S>,
    timer: &S::Timer,
    due_at: DateTime<Utc>,
) -> Result<(), SagaError> {
    use timers::Column as T;
    let payload = serde_json::to_value(timer)
        .map_err(|e| SagaError::Corrupt(format!("{} timer payload: {e}", S::TYPE)))?;
    let (traceparent, tracestate) = TraceContext::columns(TraceContext::current().as_ref());
    let mut insert = Query::insert();
    insert
        .into_table(timers::Entity)
        .columns([
            T::SagaType,
            T::SagaInstanceId,
            T::CorrelationId,
            T::TimerKind,
            T::Payload,
            T::DueAt,
            T::CreatedAt,
            T::FiredAt,
            T::Traceparent,
            T::Tracestate,
        ])
        .values([
            S::TYPE.into(),
            cx.instance_id.into(),
            cx.correlation_id.into(),
            timer.kind().into(),
            payload.into(),
            due_at.into(),
            cx.now.into(),
            Option::<DateTime<Utc>>::None.into(),
            traceparent.into(),
            tracestate.into(),
        ])
        .map_err(|e| SagaError::Corrupt(e.to_string()))?
        .on_conflict(
            OnConflict::columns([T::SagaInstanceId, T::TimerKind])
                .update_columns([
                    T::Payload,
                    T::DueAt,
                    T::CreatedAt,
                    T::FiredAt,
                    T::Traceparent,
                    T::Tracestate,
                ])
                .to_owned(),
        );
    cx.txn.execute(&insert).await?;
    Ok(())
}

/// `instance_id NOT IN (parked instances)`.
fn not_parked(instance_id: timers::Column) -> Condition {
    Condition::all().add(
        instance_id.not_in_subquery(
            Query::select()
                .column(instances::Column::Id)
                .from(instances::Entity)
                .and_where(Expr::col(instances::Column::Faulted).eq(true))
                .to_owned(),
        ),
    )
}

async fn find<C: ConnectionTrait>(
    conn: &C,
    saga_type: &str,
    correlation_id: &str,
) -> Result<Option<instances::Model>, SagaError> {
    Ok(instances::Entity::find()
        .filter(instances::Column::SagaType.eq(saga_type))
        .filter(instances::Column::CorrelationId.eq(correlation_id))
        .one(conn)
        .await?)
}

async fn load<C: ConnectionTrait>(
    conn: &C,
    saga_type: &'static str,
    correlation_id: &str,
) -> Result<instances::Model, SagaError> {
    find(conn, saga_type, correlation_id)
        .await?
        .ok_or_else(|| SagaError::UnknownInstance {
            saga_type,
            correlation_id: correlation_id.to_owned(),
        })
}
