//! The two halves of every transaction the engine runs, for one input or
//! a batch of them: **planning** (in memory: decide each input in its own
//! span, chain the decisions of inputs for the same instance, collect the
//! rows to write) and **storing** (set-based: one statement per table for
//! the whole batch, the instance updates carrying their version check).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, LockType, OnConflict, Query};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, Statement,
};
use uuid::Uuid;

use super::{ApplyError, Handled, SagaEngine, Trigger};
use crate::definition::{
    Decision, Effect, Saga, SagaEvent, SagaInput, SagaState, SagaTimer, Start,
};
use crate::error::SagaError;
use crate::hooks::{EffectCall, EnteredCall};
use crate::journal::{self, JournalOutcome};
use crate::message::Envelope;
use crate::outbox::{self, Committed, NewEvent};
use crate::schema::{instances, timers};
use crate::trace::TraceContext;

/// An instance being worked on in one transaction.
pub(super) struct Work<S: Saga> {
    /// The row as loaded (or as inserted by a start in this transaction).
    pub row: instances::Model,
    /// Its state after the inputs planned so far.
    pub state: S::State,
    /// Its data after the inputs planned so far.
    pub data: S::Data,
    pub data_changed: bool,
    pub entered_at: DateTime<Utc>,
    /// Applied inputs planned so far (the version moves by as many).
    pub steps: i32,
    /// The trace context of the latest applied input.
    pub trace: Option<TraceContext>,
}

impl<S: Saga> Work<S> {
    /// A new instance's work, in its first state (`row` as inserted, or a
    /// stand-in whose id the statement that inserts it fills in).
    pub fn started(
        row: instances::Model,
        state: S::State,
        data: S::Data,
        now: DateTime<Utc>,
    ) -> Self {
        Work {
            entered_at: now,
            state,
            data,
            data_changed: false,
            steps: 0,
            trace: None,
            row,
        }
    }

    /// What an update writes besides state and version: the data when an
    /// input changed it, and the trace context columns.
    #[allow(clippy::type_complexity)]
    fn update_columns(
        &self,
    ) -> Result<(Option<serde_json::Value>, Option<String>, Option<String>), SagaError> {
        let data = if self.data_changed {
            Some(
                serde_json::to_value(&self.data)
                    .map_err(|e| SagaError::Corrupt(format!("{} data: {e}", S::TYPE)))?,
            )
        } else {
            None
        };
        let (traceparent, tracestate) = TraceContext::columns(self.trace.as_ref());
        Ok((data, traceparent, tracestate))
    }

    pub fn read(row: instances::Model) -> Result<Self, SagaError> {
        let state = S::State::parse(&row.state).ok_or_else(|| {
            SagaError::Corrupt(format!(
                "{} instance {} has unknown state `{}`",
                S::TYPE,
                row.id,
                row.state
            ))
        })?;
        let data = serde::Deserialize::deserialize(&row.data).map_err(|e| {
            SagaError::Corrupt(format!("{} instance {} data: {e}", S::TYPE, row.id))
        })?;
        Ok(Work {
            entered_at: row.state_entered_at,
            row,
            state,
            data,
            data_changed: false,
            steps: 0,
            trace: None,
        })
    }
}

/// A timer write of a batch; the last one per (instance, kind) wins.
pub(super) enum TimerOp {
    Arm {
        correlation_id: String,
        payload: serde_json::Value,
        due_at: DateTime<Utc>,
        trace: Option<TraceContext>,
    },
    Cancel,
}

/// A change of state of a batch: the instance (index into the works), from,
/// to, and its data after the transition.
pub(super) type Entered<S> = (
    usize,
    <S as Saga>::State,
    <S as Saga>::State,
    <S as Saga>::Data,
);

/// Everything a transaction writes besides the instance rows.
pub(super) struct Plan<S: Saga> {
    pub entered: Vec<Entered<S>>,
    pub effects: Vec<(usize, S::Data, S::Effect)>,
    pub events: Vec<NewEvent>,
    pub timers: Vec<((i64, &'static str), TimerOp)>,
    pub journal: Vec<journal::Row>,
}

impl<S: Saga> Default for Plan<S> {
    fn default() -> Self {
        Self {
            entered: Vec::new(),
            effects: Vec::new(),
            events: Vec::new(),
            timers: Vec::new(),
            journal: Vec::new(),
        }
    }
}

impl<S: Saga> Plan<S> {
    fn timer(&mut self, key: (i64, &'static str), op: TimerOp) {
        self.timers.retain(|(k, _)| *k != key);
        self.timers.push((key, op));
    }
}

impl<S: Saga> SagaEngine<S> {
    /// Plans one input for `works[idx]` (call inside the input's span: the
    /// rows it writes keep that span's trace context).
    pub(super) async fn plan_input(
        &self,
        works: &mut [Work<S>],
        idx: usize,
        input: &S::Input,
        trigger: Trigger,
        now: DateTime<Utc>,
        plan: &mut Plan<S>,
    ) -> Result<Handled<S::State>, SagaError> {
        let state = works[idx].state;
        let input_json = serde_json::to_value(input)
            .map_err(|e| SagaError::Corrupt(format!("{} input: {e}", S::TYPE)))?;
        let decision = self.saga.decide(state, &works[idx].data, input);
        let (to, outcome, note, handled) = match decision {
            Decision::Apply {
                next,
                effects,
                data,
                note,
            } => {
                if let Some(probe) = &self.probe {
                    probe.before_write(&works[idx].row, input).await?;
                }
                let work = &mut works[idx];
                if let Some(data) = data {
                    work.data = data;
                    work.data_changed = true;
                }
                if next != state {
                    work.entered_at = now;
                    plan.entered.push((idx, state, next, work.data.clone()));
                }
                work.state = next;
                work.steps += 1;
                if let Some(current) = TraceContext::current() {
                    work.trace = Some(current);
                }
                let published = self.plan_effects(
                    works,
                    idx,
                    effects,
                    Some(state),
                    next,
                    trigger.message_id,
                    now,
                    plan,
                )?;
                (
                    next,
                    JournalOutcome::Applied,
                    note,
                    Handled::Applied {
                        from: state,
                        to: next,
                        published,
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
                return Err(SagaError::Rejected {
                    state: state.name().to_owned(),
                    input: input.name().to_owned(),
                    reason,
                });
            }
        };
        let work = &works[idx];
        let detail = match &trigger.detail {
            Some(d) => format!("{note}; {d}"),
            None => note.to_owned(),
        };
        plan.journal.push(journal::Row {
            instance_id: work.row.id,
            correlation_id: work.row.correlation_id.clone(),
            from: Some(state.name()),
            to: to.name(),
            trigger: input.name().to_owned(),
            outcome,
            message_id: trigger.message_id,
            attempt: trigger.attempt,
            input: Some(input_json),
            detail: Some(detail),
        });
        tracing::info!(
            saga_type = S::TYPE,
            correlation_id = %work.row.correlation_id,
            message_id = trigger.message_id.map(tracing::field::display),
            from = state.name(),
            to = to.name(),
            trigger = input.name(),
            outcome = outcome.as_str(),
            "saga: {note}"
        );
        Ok(handled)
    }

    /// Plans the start of `works[idx]` (a row inserted in this transaction).
    pub(super) fn plan_start(
        &self,
        works: &mut [Work<S>],
        idx: usize,
        start: Start<S>,
        message_id: Option<Uuid>,
        now: DateTime<Utc>,
        plan: &mut Plan<S>,
    ) -> Result<Vec<&'static str>, SagaError> {
        let first_event = plan.events.len();
        let published = self.plan_effects(
            works,
            idx,
            start.effects,
            None,
            start.state,
            message_id,
            now,
            plan,
        )?;
        // The consumed message that started it, or else the first message
        // the start queued (what a reader follows next).
        let journal_message =
            message_id.or(plan.events.get(first_event).map(|e| e.envelope.message_id));
        let work = &works[idx];
        plan.journal.push(journal::Row {
            instance_id: work.row.id,
            correlation_id: work.row.correlation_id.clone(),
            from: None,
            to: start.state.name(),
            trigger: start.trigger.to_owned(),
            outcome: JournalOutcome::Applied,
            message_id: journal_message,
            attempt: 1,
            input: None,
            detail: Some(start.note.to_owned()),
        });
        tracing::info!(
            saga_type = S::TYPE,
            correlation_id = %work.row.correlation_id,
            message_id = journal_message.map(tracing::field::display),
            state = start.state.name(),
            trigger = start.trigger,
            "saga started: {}",
            start.note
        );
        Ok(published)
    }

    #[allow(clippy::too_many_arguments)]
    fn plan_effects(
        &self,
        works: &[Work<S>],
        idx: usize,
        effects: Vec<Effect<S>>,
        from: Option<S::State>,
        to: S::State,
        causation_id: Option<Uuid>,
        now: DateTime<Utc>,
        plan: &mut Plan<S>,
    ) -> Result<Vec<&'static str>, SagaError> {
        let work = &works[idx];
        let mut published = Vec::new();
        for effect in effects {
            match effect {
                Effect::Publish(event) => {
                    let payload = self
                        .saga
                        .event_payload(&event, &work.data, from, to)
                        .map_err(|e| SagaError::Corrupt(format!("event payload: {e}")))?;
                    plan.events.push(NewEvent {
                        envelope: Envelope {
                            message_id: Uuid::new_v4(),
                            message_type: event.message_type().to_owned(),
                            correlation_id: work.row.correlation_id.clone(),
                            causation_id,
                            occurred_at: now,
                            initiated_by: self.saga.initiated_by(&work.data),
                            payload,
                        },
                        routing_key: event.routing_key().to_owned(),
                        trace: TraceContext::current(),
                    });
                    published.push(event.message_type());
                }
                Effect::Schedule { timer, after } => {
                    let payload = serde_json::to_value(&timer).map_err(|e| {
                        SagaError::Corrupt(format!("{} timer payload: {e}", S::TYPE))
                    })?;
                    plan.timer(
                        (work.row.id, timer.kind()),
                        TimerOp::Arm {
                            correlation_id: work.row.correlation_id.clone(),
                            payload,
                            due_at: now + after,
                            trace: TraceContext::current(),
                        },
                    );
                }
                Effect::Cancel(kind) => plan.timer((work.row.id, kind), TimerOp::Cancel),
                Effect::Domain(effect) => plan.effects.push((idx, work.data.clone(), effect)),
            }
        }
        Ok(published)
    }

    /// Writes a planned transaction: the instance updates (with their
    /// version checks; a mismatch is a conflict), the `entered` hooks, the
    /// outbox (leased to this process's relay), the timers, the journal and
    /// then the effect hooks. Returns
    /// the events to hand to the relay after the commit.
    pub(super) async fn store(
        &self,
        txn: &DatabaseTransaction,
        now: DateTime<Utc>,
        works: &[Work<S>],
        plan: Plan<S>,
    ) -> Result<Vec<Committed>, ApplyError> {
        // In id order: two batches touching the same instances lock them in
        // the same order (no deadlock between them).
        let mut changed: Vec<&Work<S>> = works.iter().filter(|w| w.steps > 0).collect();
        changed.sort_by_key(|w| w.row.id);
        lock_cancelled_timers(txn, &plan.timers).await?;
        let leased_until = self.outbox.leased_until(now);
        let committed = if txn.get_database_backend() == DbBackend::Postgres {
            // The instance updates, the outbox and the journal in one
            // statement (one round trip), before the hooks.
            let committed = outbox::committed_of(&plan.events)?;
            let updated = write_rows_pg::<S>(
                txn,
                now,
                &changed,
                (&plan.events, &committed, leased_until),
                &plan.journal,
            )
            .await?;
            if updated != changed.len() as u64 {
                return Err(ApplyError::Conflict);
            }
            self.entered(txn, now, works, &plan).await?;
            write_timers::<S>(txn, now, plan.timers).await?;
            committed
        } else {
            if !changed.is_empty() {
                let updated = update_instances(txn, now, &changed).await?;
                if updated != changed.len() as u64 {
                    return Err(ApplyError::Conflict);
                }
            }
            self.entered(txn, now, works, &plan).await?;
            let committed = outbox::enqueue_many(txn, &plan.events, leased_until).await?;
            write_timers::<S>(txn, now, plan.timers).await?;
            journal::write_many(txn, S::TYPE, &plan.journal, now).await?;
            committed
        };
        // The domain effects last: rows they lock (stock, say) are then held
        // only until the commit that follows, not while the engine's own
        // rows are written.
        if !plan.effects.is_empty() {
            let calls: Vec<EffectCall<'_, S>> = plan
                .effects
                .iter()
                .map(|(idx, data, effect)| EffectCall {
                    instance_id: works[*idx].row.id,
                    correlation_id: &works[*idx].row.correlation_id,
                    data,
                    effect,
                })
                .collect();
            self.hooks.effects_batch(txn, now, &calls).await?;
        }
        Ok(committed)
    }

    /// The `entered` hooks of the instances that changed state.
    async fn entered(
        &self,
        txn: &DatabaseTransaction,
        now: DateTime<Utc>,
        works: &[Work<S>],
        plan: &Plan<S>,
    ) -> Result<(), SagaError> {
        if plan.entered.is_empty() {
            return Ok(());
        }
        let calls: Vec<EnteredCall<'_, S>> = plan
            .entered
            .iter()
            .map(|(idx, from, to, data)| EnteredCall {
                instance_id: works[*idx].row.id,
                correlation_id: &works[*idx].row.correlation_id,
                data,
                from: *from,
                to: *to,
            })
            .collect();
        self.hooks.entered_batch(txn, now, &calls).await
    }
}

/// The version-checked instance updates, the outbox rows and the journal
/// rows of a transaction in ONE statement on PostgreSQL (data-modifying
/// CTEs; each table's rows travel as one JSON array parameter). Returns how
/// many instances matched their expected version.
async fn write_rows_pg<S: Saga>(
    txn: &DatabaseTransaction,
    now: DateTime<Utc>,
    changed: &[&Work<S>],
    (events, committed, leased_until): (&[NewEvent], &[Committed], Option<DateTime<Utc>>),
    journal_rows: &[journal::Row],
) -> Result<u64, SagaError> {
    let mut values: Vec<sea_orm::Value> = vec![now.into()];
    let mut ctes = Vec::new();
    if !changed.is_empty() {
        values.push(instance_rows(changed)?.into());
        // The ids again, as an array: the planner cannot see how many rows
        // a JSON array holds, and `id = ANY(...)` makes it look them up by
        // primary key instead of scanning the table.
        let ids: Vec<String> = changed.iter().map(|w| w.row.id.to_string()).collect();
        values.push(format!("{{{}}}", ids.join(",")).into());
        ctes.push(format!(
            "u AS (UPDATE saga_instances AS i SET state = v.state, version = v.new_version, \
             attempts = 0, last_error = NULL, state_entered_at = v.entered_at, \
             updated_at = $1::timestamptz, \
             data = CASE WHEN v.has_data THEN COALESCE(v.data, 'null'::jsonb) ELSE i.data END, \
             traceparent = COALESCE(v.traceparent, i.traceparent), \
             tracestate = CASE WHEN v.traceparent IS NULL THEN i.tracestate \
             ELSE v.tracestate END \
             FROM jsonb_to_recordset(${}::text::jsonb) AS v(id bigint, version int, \
             new_version int, state varchar, entered_at timestamptz, has_data boolean, \
             data jsonb, traceparent text, tracestate text) \
             WHERE i.id = v.id AND i.version = v.version \
             AND i.id = ANY(${}::text::bigint[]) RETURNING 1)",
            values.len() - 1,
            values.len()
        ));
    }
    if !events.is_empty() {
        values.push(leased_until.into());
        values.push(outbox::pg_rows(events, committed)?.into());
        ctes.push(format!(
            "o AS ({})",
            outbox::pg_insert(values.len() - 1, values.len())
        ));
    }
    if !journal_rows.is_empty() {
        values.push(S::TYPE.into());
        values.push(journal::pg_rows(journal_rows)?.into());
        ctes.push(format!(
            "j AS ({})",
            journal::pg_insert(values.len() - 1, 1, values.len())
        ));
    }
    if ctes.is_empty() {
        return Ok(0);
    }
    let select = if changed.is_empty() {
        "SELECT 0::bigint AS updated"
    } else {
        "SELECT count(*) AS updated FROM u"
    };
    let sql = format!("WITH {} {select}", ctes.join(", "));
    let updated: i64 = query_one_pg(txn, sql, values, "the batch write")
        .await?
        .try_get("", "updated")?;
    Ok(updated.max(0) as u64)
}

/// Runs one PostgreSQL statement that returns one row; `what` names it in
/// the error when it returns none.
pub(super) async fn query_one_pg(
    txn: &DatabaseTransaction,
    sql: String,
    values: Vec<sea_orm::Value>,
    what: &str,
) -> Result<sea_orm::QueryResult, SagaError> {
    txn.query_one_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        values,
    ))
    .await?
    .ok_or_else(|| SagaError::Corrupt(format!("{what} returned no row")))
}

/// The changed instances as one JSON array for [`write_rows_pg`].
fn instance_rows<S: Saga>(changed: &[&Work<S>]) -> Result<String, SagaError> {
    let mut rows = Vec::with_capacity(changed.len());
    for w in changed {
        let (data, traceparent, tracestate) = w.update_columns()?;
        rows.push(serde_json::json!({
            "id": w.row.id,
            "version": w.row.version,
            "new_version": w.row.version + w.steps,
            "state": w.state.name(),
            "entered_at": outbox::micros(w.entered_at),
            "has_data": data.is_some(),
            "data": data,
            "traceparent": traceparent,
            "tracestate": tracestate,
        }));
    }
    serde_json::to_string(&rows).map_err(|e| SagaError::Corrupt(format!("instance rows: {e}")))
}

/// The version-checked updates of the changed instances, one statement per
/// instance (SQLite; PostgreSQL uses [`write_rows_pg`]). Returns how many
/// rows matched their expected version.
async fn update_instances<S: Saga>(
    txn: &DatabaseTransaction,
    now: DateTime<Utc>,
    changed: &[&Work<S>],
) -> Result<u64, SagaError> {
    let mut rows = Vec::with_capacity(changed.len());
    for w in changed {
        let (data, traceparent, tracestate) = w.update_columns()?;
        rows.push((w, data, traceparent, tracestate));
    }
    let mut updated = 0;
    for (w, data, traceparent, tracestate) in rows {
        let mut update = instances::Entity::update_many()
            .col_expr(instances::Column::State, Expr::value(w.state.name()))
            .col_expr(
                instances::Column::Version,
                Expr::value(w.row.version + w.steps),
            )
            .col_expr(instances::Column::Attempts, Expr::value(0))
            .col_expr(
                instances::Column::LastError,
                Expr::value(Option::<String>::None),
            )
            .col_expr(instances::Column::StateEnteredAt, Expr::value(w.entered_at))
            .col_expr(instances::Column::UpdatedAt, Expr::value(now));
        if let Some(data) = data {
            update = update.col_expr(instances::Column::Data, Expr::value(data));
        }
        if traceparent.is_some() {
            update = update
                .col_expr(instances::Column::Traceparent, Expr::value(traceparent))
                .col_expr(instances::Column::Tracestate, Expr::value(tracestate));
        }
        updated += update
            .filter(instances::Column::Id.eq(w.row.id))
            .filter(instances::Column::Version.eq(w.row.version))
            .exec(txn)
            .await?
            .rows_affected;
    }
    Ok(updated)
}

/// Locks the timers a transaction cancels, before the instance rows are
/// written. Firing a timer locks the timer row, then writes the instance; a
/// transition that cancels that timer writes the instance, then deletes the
/// timer. Taken in those opposite orders the two deadlocked (PostgreSQL
/// aborted one after `deadlock_timeout`); taking the timers first (in id
/// order), a cancellation racing the firing waits for it, then finds the
/// instance changed and decides again on its new state.
async fn lock_cancelled_timers(
    txn: &DatabaseTransaction,
    ops: &[((i64, &'static str), TimerOp)],
) -> Result<(), SagaError> {
    let mut cancelled = Condition::any();
    let mut any = false;
    for ((instance_id, kind), op) in ops {
        if let TimerOp::Cancel = op {
            cancelled = cancelled.add(
                Condition::all()
                    .add(timers::Column::SagaInstanceId.eq(*instance_id))
                    .add(timers::Column::TimerKind.eq(*kind)),
            );
            any = true;
        }
    }
    if any {
        timers::Entity::find()
            .select_only()
            .column(timers::Column::Id)
            .filter(cancelled)
            .order_by_asc(timers::Column::Id)
            .lock(LockType::Update)
            .into_tuple::<i64>()
            .all(txn)
            .await?;
    }
    Ok(())
}

/// Cancels, then arms (insert, or re-arm the instance's row of that kind).
async fn write_timers<S: Saga>(
    txn: &DatabaseTransaction,
    now: DateTime<Utc>,
    ops: Vec<((i64, &'static str), TimerOp)>,
) -> Result<(), SagaError> {
    use timers::Column as T;
    let mut cancel = Condition::any();
    let mut cancels = 0;
    let mut arm = Query::insert();
    arm.into_table(timers::Entity).columns([
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
    ]);
    let mut arms = 0;
    for ((instance_id, kind), op) in ops {
        match op {
            TimerOp::Cancel => {
                cancel = cancel.add(
                    Condition::all()
                        .add(T::SagaInstanceId.eq(instance_id))
                        .add(T::TimerKind.eq(kind)),
                );
                cancels += 1;
            }
            TimerOp::Arm {
                correlation_id,
                payload,
                due_at,
                trace,
            } => {
                let (traceparent, tracestate) = TraceContext::columns(trace.as_ref());
                arm.values([
                    S::TYPE.into(),
                    instance_id.into(),
                    correlation_id.into(),
                    kind.into(),
                    payload.into(),
                    due_at.into(),
                    now.into(),
                    Option::<DateTime<Utc>>::None.into(),
                    traceparent.into(),
                    tracestate.into(),
                ])
                .map_err(|e| SagaError::Corrupt(e.to_string()))?;
                arms += 1;
            }
        }
    }
    if cancels > 0 {
        timers::Entity::delete_many()
            .filter(cancel)
            .filter(T::FiredAt.is_null())
            .exec(txn)
            .await?;
    }
    if arms > 0 {
        arm.on_conflict(
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
        txn.execute(&arm).await?;
    }
    Ok(())
}

/// Inserts the instances a batch starts, in one statement; returns the rows
/// (with their ids) by correlation id.
pub(super) async fn insert_instances<S: Saga>(
    txn: &DatabaseTransaction,
    now: DateTime<Utc>,
    starts: &[(String, S::State, serde_json::Value, Option<TraceContext>)],
) -> Result<HashMap<String, instances::Model>, SagaError> {
    use instances::Column as I;
    let mut insert = Query::insert();
    insert.into_table(instances::Entity).columns([
        I::SagaType,
        I::CorrelationId,
        I::State,
        I::Version,
        I::Attempts,
        I::Faulted,
        I::LastError,
        I::Data,
        I::StateEnteredAt,
        I::CreatedAt,
        I::UpdatedAt,
        I::Traceparent,
        I::Tracestate,
    ]);
    for (correlation_id, state, data, trace) in starts {
        let (traceparent, tracestate) = TraceContext::columns(trace.as_ref());
        insert
            .values([
                S::TYPE.into(),
                correlation_id.clone().into(),
                state.name().into(),
                0.into(),
                0.into(),
                false.into(),
                Option::<String>::None.into(),
                data.clone().into(),
                now.into(),
                now.into(),
                now.into(),
                traceparent.into(),
                tracestate.into(),
            ])
            .map_err(|e| SagaError::Corrupt(e.to_string()))?;
    }
    insert.returning(Query::returning().columns([I::Id, I::CorrelationId]));
    let rows = txn.query_all(&insert).await?;
    let mut inserted = HashMap::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.try_get("", "id")?;
        let correlation_id: String = row.try_get("", "correlation_id")?;
        let Some((_, state, data, trace)) = starts.iter().find(|(c, ..)| *c == correlation_id)
        else {
            continue;
        };
        let (traceparent, tracestate) = TraceContext::columns(trace.as_ref());
        inserted.insert(
            correlation_id.clone(),
            instance_row::<S>(
                id,
                correlation_id,
                *state,
                data.clone(),
                now,
                traceparent,
                tracestate,
            ),
        );
    }
    Ok(inserted)
}

/// A new instance's row as a start inserts it (version 0, not parked).
/// Start statements that take the id from the insert itself use id 0.
pub(super) fn instance_row<S: Saga>(
    id: i64,
    correlation_id: String,
    state: S::State,
    data: serde_json::Value,
    now: DateTime<Utc>,
    traceparent: Option<String>,
    tracestate: Option<String>,
) -> instances::Model {
    instances::Model {
        id,
        saga_type: S::TYPE.to_owned(),
        correlation_id,
        state: state.name().to_owned(),
        version: 0,
        attempts: 0,
        faulted: false,
        last_error: None,
        data,
        state_entered_at: now,
        created_at: now,
        updated_at: now,
        traceparent,
        tracestate,
    }
}
