//! The engine: runs any [`Saga`]. It loads an instance, asks the pure
//! definition what to do, and commits the answer in ONE transaction: the
//! instance row (conditional on its `version`), the journal row, outbox rows
//! for published events, timer rows, the saga's own hook writes (domain
//! effects) and, for a consumed message, the consumer's inbox row.
//!
//! Throughput comes from fewer commits: the same transaction can carry a
//! whole **batch** of inputs (consumed messages, due timers, instances past
//! a state timeout), decided one by one in memory and written set-based, one
//! statement per table ([`SagaEngine::handle_batch`],
//! [`SagaEngine::fire_due_timers`], [`SagaEngine::sweep_all`]). A batch
//! that fails is not retried as a batch: its inputs are taken one at a time,
//! so one poison input delays the others by one attempt at most.
//!
//! Every saga type gets the same guarantees from the same code: optimistic
//! concurrency with conflict retries, the journal, the outbox, the inbox,
//! durable timers, a persisted retry budget with parking and resume, state
//! timeouts, trace context and metrics labelled by saga type.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sea_orm::sea_query::{Expr, LockBehavior, LockType};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend,
    EntityTrait, QueryFilter, QueryOrder, QuerySelect, Statement, TransactionTrait,
};
use serde::Serialize;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::clock::{Clock, SystemClock};
use crate::definition::{Effect, Routed, Saga, SagaInput, SagaState, Start, StateTimeout};
use crate::error::SagaError;
use crate::hooks::{HookContext, Hooks, NoHooks};
use crate::inbox;
use crate::journal::{self, JournalOutcome};
use crate::message::Envelope;
use crate::outbox::{self, Committed, OutboxHandle};
use crate::retry::{Attempts, RetryPolicy};
use crate::schema::{instances, timers};
use crate::trace::{self, TraceContext};

mod batch;
use batch::{Plan, Work};

/// Limits of the engine (the saga's own timings live in its definition).
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// How often a transaction is retried after losing an optimistic-concurrency race.
    pub max_conflict_retries: u32,
    /// The retry budget of a failing input and the backoff between attempts.
    pub retry: RetryPolicy,
    /// How many instances one state-timeout sweep transaction takes.
    pub sweep_batch_size: u64,
    /// How many sweep transactions [`SagaEngine::sweep_all`] runs at once
    /// (each on its own connection; `SKIP LOCKED` keeps their batches
    /// apart). At least 1.
    pub sweep_workers: u32,
    /// How many due timers one timer transaction fires.
    pub timer_batch_size: u64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_conflict_retries: 10,
            retry: RetryPolicy::default(),
            sweep_batch_size: 500,
            sweep_workers: 1,
            timer_batch_size: 100,
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

/// A new instance, as written by [`SagaEngine::start`] in the caller's
/// transaction.
#[derive(Clone, Debug)]
pub struct Started {
    /// `saga_instances.id`.
    pub instance_id: i64,
    /// Ids of the messages it queued in the outbox, in order.
    pub message_ids: Vec<Uuid>,
    /// The queued events: hand them to the relay after the commit
    /// ([`SagaEngine::committed`]) so they leave at once.
    pub events: Vec<Committed>,
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

/// Where an input comes from, which decides the parked check.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A consumed message or a command: a parked instance refuses it.
    Live,
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

/// A consumed message of a batch, with the span it is handled in (its
/// `message.handle` span: what the batch writes for it keeps that span's
/// trace context).
#[derive(Clone, Copy)]
pub struct Incoming<'a> {
    /// The message.
    pub envelope: &'a Envelope,
    /// Its span.
    pub span: &'a tracing::Span,
}

/// Runs the saga `S`: starts instances, applies inputs (one at a time or in
/// batches), fires its timers, sweeps its state timeouts, parks and resumes.
/// Cheap to clone.
pub struct SagaEngine<S: Saga> {
    saga: Arc<S>,
    hooks: Arc<dyn Hooks<S>>,
    db: DatabaseConnection,
    clock: Arc<dyn Clock>,
    settings: EngineSettings,
    outbox: OutboxHandle,
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
            outbox: self.outbox.clone(),
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
            outbox: OutboxHandle::default(),
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

    /// The outbox relay of this process ([`crate::outbox::OutboxRelay::handle`]):
    /// events are leased to it when written and handed to it after the
    /// commit, so they leave at once.
    pub fn with_outbox(mut self, outbox: OutboxHandle) -> Self {
        self.outbox = outbox;
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

    /// The handle to this process's outbox relay.
    pub fn outbox(&self) -> &OutboxHandle {
        &self.outbox
    }

    /// Hands events of a committed transaction to the relay (after
    /// [`SagaEngine::start`] in the caller's transaction, once it committed).
    pub fn committed(&self, events: Vec<Committed>) {
        self.outbox.committed(events);
    }

    /// Starts an instance inside the caller's transaction: the instance row
    /// in the saga's first state, its first journal row and the effects of
    /// [`Saga::start`] (outbox rows, timers, hook writes). The caller
    /// commits, then hands [`Started::events`] to the relay
    /// ([`SagaEngine::committed`]).
    ///
    /// A second start of the same correlation id fails with a unique
    /// violation ([`SagaError::is_unique_violation`]).
    pub async fn start(
        &self,
        txn: &DatabaseTransaction,
        correlation_id: &str,
        data: S::Data,
    ) -> Result<Started, SagaError> {
        let now = self.clock.now();
        let start = self.saga.start(&data);
        let json = serde_json::to_value(&data)
            .map_err(|e| SagaError::Corrupt(format!("{} data: {e}", S::TYPE)))?;
        if txn.get_database_backend() == DbBackend::Postgres
            && start
                .effects
                .iter()
                .all(|e| matches!(e, Effect::Publish(_)))
        {
            // Only events and the journal row: one statement.
            return self
                .start_pg(txn, now, correlation_id, start, data, json)
                .await;
        }
        let mut inserted = batch::insert_instances::<S>(
            txn,
            now,
            &[(
                correlation_id.to_owned(),
                start.state,
                json,
                TraceContext::current(),
            )],
        )
        .await?;
        let row = inserted.remove(correlation_id).ok_or_else(|| {
            SagaError::Corrupt(format!(
                "{} instance {correlation_id} not inserted",
                S::TYPE
            ))
        })?;
        let instance_id = row.id;
        let mut works = vec![Work::<S>::started(row, start.state, data, now)];
        let mut plan = Plan::default();
        self.plan_start(&mut works, 0, start, None, now, &mut plan)?;
        let events = match self.store(txn, now, &works, plan).await {
            Ok(events) => events,
            Err(ApplyError::Saga(e)) => return Err(e),
            Err(ApplyError::Conflict) => {
                return Err(SagaError::Contention(correlation_id.to_owned()));
            }
        };
        Ok(Started {
            instance_id,
            message_ids: events.iter().map(|e| e.message_id).collect(),
            events,
        })
    }

    /// [`SagaEngine::start`] of a start that only publishes, on PostgreSQL:
    /// the instance row, its outbox rows and its journal row in ONE
    /// statement (the journal row takes the id the insert returns).
    async fn start_pg(
        &self,
        txn: &DatabaseTransaction,
        now: DateTime<Utc>,
        correlation_id: &str,
        start: Start<S>,
        data: S::Data,
        json: serde_json::Value,
    ) -> Result<Started, SagaError> {
        let trace = TraceContext::current();
        let (traceparent, tracestate) = TraceContext::columns(trace.as_ref());
        // Its id is not known before the insert; the journal row takes it
        // in SQL.
        let stand_in = batch::instance_row::<S>(
            0,
            correlation_id.to_owned(),
            start.state,
            serde_json::Value::Null,
            now,
            traceparent.clone(),
            tracestate.clone(),
        );
        let mut works = vec![Work::<S>::started(stand_in, start.state, data, now)];
        let state = start.state;
        let mut plan = Plan::default();
        self.plan_start(&mut works, 0, start, None, now, &mut plan)?;
        let committed = outbox::committed_of(&plan.events)?;
        let mut values: Vec<sea_orm::Value> = vec![
            now.into(),
            S::TYPE.into(),
            correlation_id.into(),
            state.name().into(),
            json.into(),
            traceparent.into(),
            tracestate.into(),
        ];
        let mut sql = String::from(
            "WITH ins AS (INSERT INTO saga_instances (saga_type, correlation_id, state, version, \
             attempts, faulted, last_error, data, state_entered_at, created_at, updated_at, \
             traceparent, tracestate) \
             VALUES ($2, $3, $4, 0, 0, false, NULL, $5, $1, $1, $1, $6, $7) RETURNING id)",
        );
        self.push_start_rows(
            &mut sql,
            &mut values,
            &plan,
            &committed,
            now,
            "(SELECT id FROM ins)",
        )?;
        sql.push_str(" SELECT id FROM ins");
        let instance_id: i64 = batch::query_one_pg(txn, sql, values, "the start")
            .await?
            .try_get("", "id")?;
        Ok(Started {
            instance_id,
            message_ids: committed.iter().map(|e| e.message_id).collect(),
            events: committed,
        })
    }

    /// Appends to a start statement (whose `ins` CTE inserts the instances,
    /// with `$1` the time and `$2` the saga type) the CTEs writing the
    /// plan's outbox rows (`o`, leased to this process's relay) and journal
    /// rows (`j`, each row's instance id given by the SQL expression
    /// `instance_id`).
    fn push_start_rows(
        &self,
        sql: &mut String,
        values: &mut Vec<sea_orm::Value>,
        plan: &Plan<S>,
        committed: &[Committed],
        now: DateTime<Utc>,
        instance_id: &str,
    ) -> Result<(), SagaError> {
        if !plan.events.is_empty() {
            values.push(self.outbox.leased_until(now).into());
            values.push(outbox::pg_rows(&plan.events, committed)?.into());
            sql.push_str(&format!(
                ", o AS ({})",
                outbox::pg_insert(values.len() - 1, values.len())
            ));
        }
        if !plan.journal.is_empty() {
            values.push(journal::pg_rows(&plan.journal)?.into());
            sql.push_str(&format!(
                ", j AS ({})",
                journal::pg_insert_for(instance_id, 2, 1, values.len())
            ));
        }
        Ok(())
    }

    /// Starts several instances inside the caller's transaction, each as
    /// [`SagaEngine::start`] would (in its own `span`, whose trace its rows
    /// and events keep). On PostgreSQL, when every start only publishes,
    /// all their instance, outbox and journal rows are ONE statement;
    /// otherwise the instances are started one at a time. All or nothing
    /// with the caller's transaction: on an error the caller rolls back.
    /// Returns one [`Started`] per instance, in order.
    pub async fn start_many(
        &self,
        txn: &DatabaseTransaction,
        instances: Vec<(String, S::Data, tracing::Span)>,
    ) -> Result<Vec<Started>, SagaError> {
        let now = self.clock.now();
        let mut starts = Vec::with_capacity(instances.len());
        for (_, data, span) in &instances {
            let _entered = span.enter();
            starts.push(self.saga.start(data));
        }
        let publishes_only = starts.iter().all(|start| {
            start
                .effects
                .iter()
                .all(|e| matches!(e, Effect::Publish(_)))
        });
        if txn.get_database_backend() != DbBackend::Postgres || !publishes_only {
            let mut started = Vec::with_capacity(instances.len());
            for (correlation_id, data, span) in instances {
                started.push(
                    self.start(txn, &correlation_id, data)
                        .instrument(span)
                        .await?,
                );
            }
            return Ok(started);
        }
        let mut works = Vec::with_capacity(instances.len());
        let mut rows = Vec::with_capacity(instances.len());
        let mut spans = Vec::with_capacity(instances.len());
        for ((correlation_id, data, span), start) in instances.into_iter().zip(&starts) {
            let json = serde_json::to_value(&data)
                .map_err(|e| SagaError::Corrupt(format!("{} data: {e}", S::TYPE)))?;
            let trace = {
                let _entered = span.enter();
                TraceContext::current()
            };
            let (traceparent, tracestate) = TraceContext::columns(trace.as_ref());
            rows.push(serde_json::json!({
                "correlation_id": correlation_id,
                "state": start.state.name(),
                "data": json,
                "traceparent": traceparent,
                "tracestate": tracestate,
            }));
            // Their ids are not known before the insert; the journal rows
            // take them in SQL.
            let stand_in = batch::instance_row::<S>(
                0,
                correlation_id,
                start.state,
                serde_json::Value::Null,
                now,
                traceparent,
                tracestate,
            );
            works.push(Work::<S>::started(stand_in, start.state, data, now));
            spans.push(span);
        }
        let mut plan = Plan::default();
        // Where each instance's events end in `plan.events`.
        let mut ends = Vec::with_capacity(works.len());
        for (idx, start) in starts.into_iter().enumerate() {
            let _entered = spans[idx].enter();
            self.plan_start(&mut works, idx, start, None, now, &mut plan)?;
            ends.push(plan.events.len());
        }
        let committed = outbox::committed_of(&plan.events)?;
        let instance_rows = serde_json::Value::Array(rows).to_string();
        let mut values: Vec<sea_orm::Value> =
            vec![now.into(), S::TYPE.into(), instance_rows.into()];
        let mut sql = String::from(
            "WITH ins AS (INSERT INTO saga_instances (saga_type, correlation_id, state, version, \
             attempts, faulted, last_error, data, state_entered_at, created_at, updated_at, \
             traceparent, tracestate) \
             SELECT $2, r->>'correlation_id', r->>'state', 0, 0, false, NULL, r->'data', \
             $1, $1, $1, r->>'traceparent', r->>'tracestate' \
             FROM jsonb_array_elements($3::text::jsonb) WITH ORDINALITY AS t(r, n) ORDER BY n \
             RETURNING id, correlation_id)",
        );
        self.push_start_rows(
            &mut sql,
            &mut values,
            &plan,
            &committed,
            now,
            "(SELECT ins.id FROM ins WHERE ins.correlation_id = r->>'correlation_id')",
        )?;
        sql.push_str(" SELECT id, correlation_id FROM ins");
        let inserted = txn
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                values,
            ))
            .await?;
        let mut ids = HashMap::with_capacity(inserted.len());
        for row in inserted {
            let id: i64 = row.try_get("", "id")?;
            let correlation_id: String = row.try_get("", "correlation_id")?;
            ids.insert(correlation_id, id);
        }
        let mut committed = committed.into_iter();
        let mut from = 0;
        let mut started = Vec::with_capacity(works.len());
        for (work, end) in works.iter().zip(ends) {
            let instance_id = ids.get(&work.row.correlation_id).copied().ok_or_else(|| {
                SagaError::Corrupt(format!(
                    "{} instance {} not inserted",
                    S::TYPE,
                    work.row.correlation_id
                ))
            })?;
            let events: Vec<Committed> = committed.by_ref().take(end - from).collect();
            from = end;
            started.push(Started {
                instance_id,
                message_ids: events.iter().map(|e| e.message_id).collect(),
                events,
            });
        }
        Ok(started)
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
        let span = tracing::Span::current();
        let mut handled = self
            .handle_batch(
                consumer,
                &[Incoming {
                    envelope,
                    span: &span,
                }],
            )
            .await?;
        handled
            .pop()
            .ok_or_else(|| SagaError::Corrupt("a batch of one handled nothing".to_owned()))
    }

    /// Handles a batch of consumed messages for `consumer` in ONE
    /// transaction: their inbox rows, the starts and inputs they route to
    /// (several inputs for one instance are decided in order), and every row
    /// that follows, written set-based. All or nothing: an error (a
    /// malformed message, an unknown or parked instance, a rejected input, a
    /// failing hook) rolls the whole batch back and is returned; the caller
    /// then handles the messages one at a time ([`SagaEngine::handle`]), so
    /// the failing one is retried and dead-lettered alone. Returns one
    /// outcome per message, in order.
    pub async fn handle_batch(
        &self,
        consumer: &str,
        messages: &[Incoming<'_>],
    ) -> Result<Vec<Handled<S::State>>, SagaError> {
        let mut routed = Vec::with_capacity(messages.len());
        for m in messages {
            let route = {
                let _entered = m.span.enter();
                self.saga.route(m.envelope).map_err(SagaError::Malformed)?
            };
            routed.push(route);
        }
        let mut conflicts = 0;
        loop {
            let txn = self.db.begin().await?;
            match self.try_batch(&txn, consumer, messages, &routed).await {
                Ok((handled, events)) => {
                    txn.commit().await?;
                    self.committed_batch(&handled, events);
                    return Ok(handled);
                }
                Err(ApplyError::Conflict) => {
                    txn.rollback().await?;
                    conflicts += 1;
                    if conflicts > self.settings.max_conflict_retries {
                        return Err(SagaError::Contention(
                            messages
                                .first()
                                .map(|m| m.envelope.correlation_id.clone())
                                .unwrap_or_default(),
                        ));
                    }
                }
                Err(ApplyError::Saga(e)) => {
                    txn.rollback().await?;
                    return Err(e);
                }
            }
        }
    }

    async fn try_batch(
        &self,
        txn: &DatabaseTransaction,
        consumer: &str,
        messages: &[Incoming<'_>],
        routed: &[Routed<S>],
    ) -> Result<(Vec<Handled<S::State>>, Vec<Committed>), ApplyError> {
        let now = self.clock.now();
        let envelopes: Vec<&Envelope> = messages.iter().map(|m| m.envelope).collect();
        let mut fresh = inbox::record_many(txn, consumer, &envelopes, now).await?;
        // Which messages are new (a message id twice in the batch is new once).
        let is_fresh: Vec<bool> = envelopes
            .iter()
            .map(|e| fresh.remove(&e.message_id))
            .collect();
        let wanted: Vec<String> = messages
            .iter()
            .zip(&is_fresh)
            .filter(|(_, fresh)| **fresh)
            .map(|(m, _)| m.envelope.correlation_id.clone())
            .collect();
        let mut works: Vec<Work<S>> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for row in find_many(txn, S::TYPE, &wanted).await? {
            index.insert(row.correlation_id.clone(), works.len());
            works.push(Work::read(row)?);
        }
        // The instances this batch starts, inserted up front.
        let mut starts: Vec<(String, S::State, serde_json::Value, Option<TraceContext>)> =
            Vec::new();
        for ((m, route), fresh) in messages.iter().zip(routed).zip(&is_fresh) {
            if let (true, Routed::Start(data)) = (*fresh, route) {
                let id = &m.envelope.correlation_id;
                if index.contains_key(id) || starts.iter().any(|(c, ..)| c == id) {
                    continue;
                }
                let json = serde_json::to_value(data)
                    .map_err(|e| SagaError::Corrupt(format!("{} data: {e}", S::TYPE)))?;
                let trace = TraceContext::of(m.span);
                starts.push((id.clone(), self.saga.start(data).state, json, trace));
            }
        }
        let mut new_instances = std::collections::HashSet::new();
        if !starts.is_empty() {
            let inserted = match batch::insert_instances::<S>(txn, now, &starts).await {
                Ok(inserted) => inserted,
                // A concurrent start of the same id won: decide again.
                Err(e) if e.is_unique_violation() => return Err(ApplyError::Conflict),
                Err(e) => return Err(e.into()),
            };
            for (id, row) in inserted {
                new_instances.insert(id.clone());
                index.insert(id, works.len());
                works.push(Work::read(row)?);
            }
        }
        let mut plan = Plan::default();
        let mut handled = Vec::with_capacity(messages.len());
        for ((m, route), fresh) in messages.iter().zip(routed).zip(&is_fresh) {
            if !fresh {
                let _entered = m.span.enter();
                handled.push(Handled::Duplicate);
                continue;
            }
            let id = &m.envelope.correlation_id;
            let outcome = async {
                match route {
                    Routed::Start(data) => match index.get(id) {
                        Some(&idx) if new_instances.remove(id) => {
                            let start = self.saga.start(data);
                            let state = start.state;
                            self.plan_start(
                                &mut works,
                                idx,
                                start,
                                Some(m.envelope.message_id),
                                now,
                                &mut plan,
                            )?;
                            Ok(Handled::Started { state })
                        }
                        Some(&idx) => {
                            // Another message started it: journal the late start.
                            let work = &works[idx];
                            let reason = "instance already started";
                            plan.journal.push(journal::Row {
                                instance_id: work.row.id,
                                correlation_id: id.clone(),
                                from: Some(work.state.name()),
                                to: work.state.name(),
                                trigger: m.envelope.message_type.clone(),
                                outcome: JournalOutcome::Ignored,
                                message_id: Some(m.envelope.message_id),
                                attempt: work.row.attempts + 1,
                                input: None,
                                detail: Some(reason.to_owned()),
                            });
                            Ok(Handled::Ignored {
                                state: work.state,
                                reason,
                            })
                        }
                        None => Err(SagaError::Corrupt(format!(
                            "{} instance {id} was neither found nor started",
                            S::TYPE
                        ))),
                    },
                    Routed::Input(input) => {
                        let Some(&idx) = index.get(id) else {
                            return Err(SagaError::UnknownInstance {
                                saga_type: S::TYPE,
                                correlation_id: id.clone(),
                            });
                        };
                        if new_instances.contains(id) {
                            // Its start comes later in this batch: take the
                            // messages one at a time instead.
                            return Err(SagaError::Contention(id.clone()));
                        }
                        if works[idx].row.faulted {
                            return Err(SagaError::Parked {
                                saga_type: S::TYPE,
                                correlation_id: id.clone(),
                            });
                        }
                        let trigger = Trigger {
                            message_id: Some(m.envelope.message_id),
                            attempt: works[idx].row.attempts + 1,
                            detail: None,
                        };
                        self.plan_input(&mut works, idx, input, trigger, now, &mut plan)
                            .await
                    }
                }
            }
            .instrument(m.span.clone())
            .await?;
            handled.push(outcome);
        }
        let events = self.store(txn, now, &works, plan).await?;
        Ok((handled, events))
    }

    /// Gives `input` to the instance `correlation_id` (a command from the
    /// saga's own code, not a consumed message: no inbox row), retrying
    /// lost optimistic-concurrency races.
    pub async fn send(
        &self,
        correlation_id: &str,
        input: S::Input,
    ) -> Result<Handled<S::State>, SagaError> {
        self.apply_input(correlation_id, input, Source::Live, None)
            .await
    }

    async fn apply_input(
        &self,
        correlation_id: &str,
        input: S::Input,
        source: Source,
        detail: Option<&str>,
    ) -> Result<Handled<S::State>, SagaError> {
        let mut conflicts = 0;
        loop {
            let now = self.clock.now();
            let txn = self.db.begin().await?;
            let row = load(&txn, S::TYPE, correlation_id).await?;
            if row.faulted && source != Source::Resume {
                txn.rollback().await?;
                return Err(SagaError::Parked {
                    saga_type: S::TYPE,
                    correlation_id: correlation_id.to_owned(),
                });
            }
            let mut works = vec![Work::<S>::read(row)?];
            let trigger = Trigger {
                message_id: None,
                attempt: works[0].row.attempts + 1,
                detail: detail.map(str::to_owned),
            };
            let mut plan = Plan::default();
            let applied = async {
                let handled = self
                    .plan_input(&mut works, 0, &input, trigger, now, &mut plan)
                    .await?;
                let events = self.store(&txn, now, &works, plan).await?;
                Ok::<_, ApplyError>((handled, events))
            }
            .await;
            match applied {
                Ok((handled, events)) => {
                    txn.commit().await?;
                    self.committed_batch(std::slice::from_ref(&handled), events);
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
            match self.fire_batch(1).await {
                Ok(mut fired) => return Ok(fired.pop()),
                Err((_, ApplyError::Conflict)) => {
                    conflicts += 1;
                    if conflicts > self.settings.max_conflict_retries {
                        return Err(SagaError::Contention(S::TYPE.to_owned()));
                    }
                }
                Err((timer, ApplyError::Saga(e))) => {
                    if let Some(timer) = timer {
                        self.timer_failed(&timer, &e).await?;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Fires up to `limit` due timers of this saga type in ONE transaction
    /// (claimed with `SKIP LOCKED`; each timer's hook gives its input, the
    /// definition decides each, the writes are set-based). If the batch
    /// fails, its timers are fired one at a time
    /// ([`SagaEngine::try_fire_due_timer_once`]), so a failing timer spends
    /// its own instance's budget and the others go on. Returns what fired
    /// (empty when nothing is due); an error only when nothing could fire.
    pub async fn fire_due_timers(
        &self,
        limit: u64,
    ) -> Result<Vec<TimerFired<S::State, S::Input>>, SagaError> {
        let mut conflicts = 0;
        loop {
            match self.fire_batch(Ord::max(limit, 1)).await {
                Ok(fired) => return Ok(fired),
                Err((_, ApplyError::Conflict))
                    if conflicts < self.settings.max_conflict_retries =>
                {
                    conflicts += 1;
                }
                Err((_, error)) => {
                    if let ApplyError::Saga(e) = &error {
                        tracing::debug!(saga_type = S::TYPE, error = %e, "timer batch failed; firing its timers one at a time");
                    }
                    let mut fired = Vec::new();
                    let mut last_error = None;
                    for _ in 0..Ord::max(limit, 1) {
                        match self.try_fire_due_timer_once().await {
                            Ok(Some(one)) => fired.push(one),
                            Ok(None) => break,
                            Err(e) => last_error = Some(e),
                        }
                    }
                    return match (fired.is_empty(), last_error) {
                        (true, Some(e)) => Err(e),
                        _ => Ok(fired),
                    };
                }
            }
        }
    }

    /// One transaction of up to `limit` due timers. On an error, the failing
    /// timer (when one is to blame) comes with it.
    async fn fire_batch(
        &self,
        limit: u64,
    ) -> Result<Vec<TimerFired<S::State, S::Input>>, (Option<timers::Model>, ApplyError)> {
        let now = self.clock.now();
        let txn = self.db.begin().await.map_err(|e| (None, e.into()))?;
        let attempt = self.fire_in(&txn, limit, now).await;
        match attempt {
            Ok((fired, handled, events)) => {
                txn.commit().await.map_err(|e| (None, e.into()))?;
                self.committed_batch(&handled, events);
                for (timer, _) in &fired {
                    crate::metrics::timer_fired(
                        S::TYPE,
                        (now - timer.due_at).num_milliseconds() as f64 / 1000.0,
                    );
                }
                Ok(fired
                    .into_iter()
                    .zip(handled)
                    .map(|((timer, input), handled)| TimerFired {
                        timer_id: timer.id,
                        correlation_id: timer.correlation_id,
                        kind: timer.timer_kind,
                        input,
                        handled,
                    })
                    .collect())
            }
            Err((timer, e)) => {
                let _ = txn.rollback().await;
                Err((timer, e))
            }
        }
    }

    #[allow(clippy::type_complexity)]
    async fn fire_in(
        &self,
        txn: &DatabaseTransaction,
        limit: u64,
        now: DateTime<Utc>,
    ) -> Result<
        (
            Vec<(timers::Model, S::Input)>,
            Vec<Handled<S::State>>,
            Vec<Committed>,
        ),
        (Option<timers::Model>, ApplyError),
    > {
        let claimed = timers::Entity::find()
            .filter(timers::Column::SagaType.eq(S::TYPE))
            .filter(timers::Column::FiredAt.is_null())
            .filter(timers::Column::DueAt.lte(now))
            .filter(not_parked())
            .order_by_asc(timers::Column::DueAt)
            .limit(limit)
            .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
            .all(txn)
            .await
            .map_err(|e| (None, e.into()))?;
        if claimed.is_empty() {
            return Ok((Vec::new(), Vec::new(), Vec::new()));
        }
        // Marked fired first: a transition that schedules a kind again
        // re-arms the same row (fired_at back to NULL) in this transaction.
        timers::Entity::update_many()
            .col_expr(timers::Column::FiredAt, Expr::value(now))
            .filter(timers::Column::Id.is_in(claimed.iter().map(|t| t.id)))
            .exec(txn)
            .await
            .map_err(|e| (None, e.into()))?;
        let rows = instances::Entity::find()
            .filter(instances::Column::Id.is_in(claimed.iter().map(|t| t.saga_instance_id)))
            .all(txn)
            .await
            .map_err(|e| (None, e.into()))?;
        let mut works: Vec<Work<S>> = Vec::with_capacity(rows.len());
        let mut index: HashMap<i64, usize> = HashMap::new();
        for row in rows {
            let id = row.id;
            let work = Work::read(row).map_err(|e| {
                let timer = claimed.iter().find(|t| t.saga_instance_id == id).cloned();
                (timer, e.into())
            })?;
            index.insert(id, works.len());
            works.push(work);
        }
        let mut plan = Plan::default();
        let mut fired = Vec::with_capacity(claimed.len());
        let mut handled = Vec::with_capacity(claimed.len());
        for timer in claimed {
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
            let one = async {
                let idx = *index.get(&timer.saga_instance_id).ok_or_else(|| {
                    SagaError::UnknownInstance {
                        saga_type: S::TYPE,
                        correlation_id: timer.correlation_id.clone(),
                    }
                })?;
                // Timers written before payloads were kept carry their kind.
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
                let input = {
                    let work = &works[idx];
                    let cx = HookContext {
                        txn,
                        instance_id: work.row.id,
                        correlation_id: &timer.correlation_id,
                        data: &work.data,
                        now,
                    };
                    self.hooks.timer_input(&cx, &value).await?
                };
                let trigger = Trigger {
                    message_id: None,
                    attempt: works[idx].row.attempts + 1,
                    detail: Some(format!(
                        "timer {} ({}) due {} fired {}",
                        timer.id,
                        timer.timer_kind,
                        timer.due_at.to_rfc3339(),
                        now.to_rfc3339()
                    )),
                };
                let outcome = self
                    .plan_input(&mut works, idx, &input, trigger, now, &mut plan)
                    .await?;
                Ok::<_, SagaError>((input, outcome))
            }
            .instrument(span)
            .await;
            match one {
                Ok((input, outcome)) => {
                    fired.push((timer, input));
                    handled.push(outcome);
                }
                Err(e) => return Err((Some(timer), e.into())),
            }
        }
        let events = self
            .store(txn, now, &works, plan)
            .await
            .map_err(|e| (None, e))?;
        Ok((fired, handled, events))
    }

    /// A timer that could not fire: one attempt of its instance's budget is
    /// spent and it is tried again after a backoff (never once parked).
    async fn timer_failed(
        &self,
        timer: &timers::Model,
        error: &SagaError,
    ) -> Result<(), SagaError> {
        let attempts = self
            .record_failure(&timer.correlation_id, None, &timer.timer_kind, error)
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
        Ok(())
    }

    /// When this saga type's next unfired timer is due, if any.
    pub async fn next_timer_due(&self) -> Result<Option<DateTime<Utc>>, SagaError> {
        let next = timers::Entity::find()
            .select_only()
            .column(timers::Column::DueAt)
            .filter(timers::Column::SagaType.eq(S::TYPE))
            .filter(timers::Column::FiredAt.is_null())
            .filter(not_parked())
            .order_by_asc(timers::Column::DueAt)
            .limit(1)
            .into_tuple::<DateTime<Utc>>()
            .one(&self.db)
            .await?;
        Ok(next)
    }

    /// One sweep batch per state timeout ([`Saga::state_timeouts`]): gives
    /// each instance that has been in the state for longer than the timeout
    /// the timeout's input, set-based in one transaction per batch. Rows are
    /// locked with `SKIP LOCKED`, so several sweepers can run at once
    /// without handling an instance twice.
    pub async fn try_sweep_once(&self) -> Result<SweepOutcome, SagaError> {
        let mut total = SweepOutcome::default();
        for timeout in self.saga.state_timeouts() {
            total += self.sweep(&timeout).await?;
        }
        Ok(total)
    }

    /// Sweeps batch after batch until no instance is past a state timeout,
    /// with [`EngineSettings::sweep_workers`] transactions at once.
    pub async fn sweep_all(&self) -> Result<SweepOutcome, SagaError> {
        self.sweep_all_with(|_| {}).await
    }

    /// [`SagaEngine::sweep_all`], calling `on_batch` after each committed
    /// batch (for progress). When a worker fails, the others finish their
    /// loops; the outcome is then the first error.
    pub async fn sweep_all_with(
        &self,
        on_batch: impl Fn(&SweepOutcome) + Sync,
    ) -> Result<SweepOutcome, SagaError> {
        let mut total = SweepOutcome::default();
        let mut first_error = None;
        for timeout in self.saga.state_timeouts() {
            let worker = || async {
                let mut swept = SweepOutcome::default();
                loop {
                    let batch = self.sweep(&timeout).await?;
                    on_batch(&batch);
                    let done = (batch.examined as u64) < self.settings.sweep_batch_size
                        || batch.timed_out == 0;
                    swept += batch;
                    if done {
                        return Ok::<_, SagaError>(swept);
                    }
                }
            };
            let workers = Ord::max(self.settings.sweep_workers, 1);
            for result in futures_util::future::join_all((0..workers).map(|_| worker())).await {
                match result {
                    Ok(swept) => total += swept,
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    async fn sweep(&self, timeout: &StateTimeout<S>) -> Result<SweepOutcome, SagaError> {
        let now = self.clock.now();
        let txn = self.db.begin().await?;
        match self.sweep_in(&txn, timeout, now).await {
            Ok((outcome, handled, events)) => {
                txn.commit().await?;
                self.committed_batch(&handled, events);
                crate::metrics::state_timeouts(
                    S::TYPE,
                    timeout.state.name(),
                    outcome.timed_out as u64,
                );
                Ok(outcome)
            }
            Err((stale, error)) => {
                txn.rollback().await?;
                if let ApplyError::Saga(e) = &error {
                    tracing::debug!(saga_type = S::TYPE, error = %e, "sweep batch failed; sweeping its instances one at a time");
                }
                // One at a time: a failing instance spends its own budget,
                // the others time out.
                let mut outcome = SweepOutcome {
                    examined: stale.len(),
                    timed_out: 0,
                };
                let mut last_error = None;
                for correlation_id in stale {
                    match self.sweep_one(timeout, &correlation_id).await {
                        Ok(true) => outcome.timed_out += 1,
                        Ok(false) => {}
                        Err(e) => last_error = Some(e),
                    }
                }
                crate::metrics::state_timeouts(
                    S::TYPE,
                    timeout.state.name(),
                    outcome.timed_out as u64,
                );
                match last_error {
                    Some(e) if outcome.timed_out == 0 => Err(e),
                    _ => Ok(outcome),
                }
            }
        }
    }

    /// One sweep batch in `txn`. On an error, the correlation ids of the
    /// batch come with it.
    #[allow(clippy::type_complexity)]
    async fn sweep_in(
        &self,
        txn: &DatabaseTransaction,
        timeout: &StateTimeout<S>,
        now: DateTime<Utc>,
    ) -> Result<(SweepOutcome, Vec<Handled<S::State>>, Vec<Committed>), (Vec<String>, ApplyError)>
    {
        let state = timeout.state.name();
        let stale = instances::Entity::find()
            .filter(instances::Column::SagaType.eq(S::TYPE))
            .filter(instances::Column::State.eq(state))
            .filter(instances::Column::StateEnteredAt.lte(now - timeout.after))
            .filter(instances::Column::Faulted.eq(false))
            .order_by_asc(instances::Column::StateEnteredAt)
            .limit(self.settings.sweep_batch_size)
            .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
            .all(txn)
            .await
            .map_err(|e| (Vec::new(), e.into()))?;
        let ids: Vec<String> = stale.iter().map(|i| i.correlation_id.clone()).collect();
        if stale.is_empty() {
            return Ok((SweepOutcome::default(), Vec::new(), Vec::new()));
        }
        let fail = |e: ApplyError| (ids.clone(), e);
        self.hooks
            .prepare_batch(txn, &ids)
            .await
            .map_err(|e| fail(e.into()))?;
        let mut works = Vec::with_capacity(stale.len());
        for row in stale {
            works.push(Work::<S>::read(row).map_err(|e| fail(e.into()))?);
        }
        let mut plan = Plan::default();
        let mut handled = Vec::with_capacity(works.len());
        for idx in 0..works.len() {
            // The timeout continues the instance's trace (its latest transition).
            let span = tracing::info_span!(
                "state.timeout",
                saga_type = S::TYPE,
                correlation_id = %works[idx].row.correlation_id,
                state,
                trace_id = tracing::field::Empty,
            );
            let stored = TraceContext::from_columns(
                works[idx].row.traceparent.as_deref(),
                works[idx].row.tracestate.as_deref(),
            );
            trace::continue_trace(&span, stored.as_ref());
            let trigger = Trigger {
                message_id: None,
                attempt: works[idx].row.attempts + 1,
                detail: Some(format!(
                    "{state} since {}, timeout {}, swept at {}",
                    works[idx].row.state_entered_at.to_rfc3339(),
                    seconds_or_millis(timeout.after),
                    now.to_rfc3339()
                )),
            };
            let outcome = self
                .plan_input(&mut works, idx, &timeout.input, trigger, now, &mut plan)
                .instrument(span)
                .await
                .map_err(|e| fail(e.into()))?;
            handled.push(outcome);
        }
        let events = self.store(txn, now, &works, plan).await.map_err(fail)?;
        let outcome = SweepOutcome {
            examined: handled.len(),
            timed_out: handled
                .iter()
                .filter(|h| matches!(h, Handled::Applied { .. }))
                .count(),
        };
        Ok((outcome, handled, events))
    }

    /// Times out one instance in its own transaction (the fallback of a
    /// failed sweep batch). `Ok(true)` when it moved; an error is recorded
    /// against its budget first.
    async fn sweep_one(
        &self,
        timeout: &StateTimeout<S>,
        correlation_id: &str,
    ) -> Result<bool, SagaError> {
        let now = self.clock.now();
        let txn = self.db.begin().await?;
        let row = instances::Entity::find()
            .filter(instances::Column::SagaType.eq(S::TYPE))
            .filter(instances::Column::CorrelationId.eq(correlation_id))
            .filter(instances::Column::State.eq(timeout.state.name()))
            .filter(instances::Column::StateEnteredAt.lte(now - timeout.after))
            .filter(instances::Column::Faulted.eq(false))
            .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
            .one(&txn)
            .await?;
        let Some(row) = row else {
            txn.commit().await?;
            return Ok(false);
        };
        let span = tracing::info_span!(
            "state.timeout",
            saga_type = S::TYPE,
            correlation_id = %correlation_id,
            state = timeout.state.name(),
            trace_id = tracing::field::Empty,
        );
        let stored =
            TraceContext::from_columns(row.traceparent.as_deref(), row.tracestate.as_deref());
        trace::continue_trace(&span, stored.as_ref());
        let detail = format!(
            "{} since {}, timeout {}, swept at {}",
            timeout.state.name(),
            row.state_entered_at.to_rfc3339(),
            seconds_or_millis(timeout.after),
            now.to_rfc3339()
        );
        let applied = async {
            let mut works = vec![Work::<S>::read(row)?];
            let trigger = Trigger {
                message_id: None,
                attempt: works[0].row.attempts + 1,
                detail: Some(detail),
            };
            let mut plan = Plan::default();
            let handled = self
                .plan_input(&mut works, 0, &timeout.input, trigger, now, &mut plan)
                .await?;
            let events = self.store(&txn, now, &works, plan).await?;
            Ok::<_, ApplyError>((handled, events))
        }
        .instrument(span)
        .await;
        match applied {
            Ok((handled, events)) => {
                txn.commit().await?;
                let moved = matches!(handled, Handled::Applied { .. });
                self.committed_batch(std::slice::from_ref(&handled), events);
                Ok(moved)
            }
            Err(ApplyError::Conflict) => {
                txn.rollback().await?;
                Ok(false)
            }
            Err(ApplyError::Saga(e)) => {
                txn.rollback().await?;
                self.record_failure(correlation_id, None, timeout.input.name(), &e)
                    .await?;
                Err(e)
            }
        }
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
        let instance = Work::<S>::read(row)?;
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
        let loaded = Work::<S>::read(row)?;
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

    /// Right after each commit: count the transitions and hand the events
    /// to the relay.
    fn committed_batch(&self, handled: &[Handled<S::State>], events: Vec<Committed>) {
        for h in handled {
            if let Handled::Applied { from, to, .. } = h {
                crate::metrics::transitions(S::TYPE, from.name(), to.name(), 1);
            }
        }
        self.outbox.committed(events);
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

/// `600 s`, or `1500 ms` when the duration is not whole seconds (a
/// sub-second timeout must not read as `0 s` in the journal).
fn seconds_or_millis(d: Duration) -> String {
    let ms = d.num_milliseconds();
    if ms % 1000 == 0 {
        format!("{} s", ms / 1000)
    } else {
        format!("{ms} ms")
    }
}

/// The timer's instance is not parked, checked per candidate timer with a
/// primary-key lookup of its instance:
/// `NOT COALESCE((SELECT faulted FROM saga_instances WHERE id = timer's instance), false)`.
///
/// A scalar subquery is never turned into a join, so every plan of the
/// claim and next-due queries (the generic plan a connection caches too)
/// probes `saga_instances_pkey` once for each timer row it reads, however
/// large the table has grown since that plan was made. The earlier
/// `NOT IN (parked ids)` was planned once per connection, while the table
/// was still small: that cached plan read the parked ids by scanning every
/// instance on each claim and each poll, until an `ANALYZE` replanned it.
fn not_parked() -> Condition {
    Condition::all().add(Expr::cust(
        "NOT COALESCE((SELECT parked_check.faulted FROM saga_instances AS parked_check \
         WHERE parked_check.id = saga_timers.saga_instance_id), false)",
    ))
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

async fn find_many<C: ConnectionTrait>(
    conn: &C,
    saga_type: &str,
    correlation_ids: &[String],
) -> Result<Vec<instances::Model>, SagaError> {
    if correlation_ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(instances::Entity::find()
        .filter(instances::Column::SagaType.eq(saga_type))
        .filter(instances::Column::CorrelationId.is_in(correlation_ids.iter().cloned()))
        .all(conn)
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

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::seconds_or_millis;

    #[test]
    fn timeouts_are_journalled_in_seconds_or_in_milliseconds_when_not_whole() {
        assert_eq!(seconds_or_millis(Duration::seconds(600)), "600 s");
        assert_eq!(seconds_or_millis(Duration::milliseconds(1500)), "1500 ms");
        assert_eq!(seconds_or_millis(Duration::milliseconds(250)), "250 ms");
        assert_eq!(seconds_or_millis(Duration::zero()), "0 s");
    }
}
