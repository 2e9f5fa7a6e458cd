//! The engine: loads an order saga, asks the pure machine what to do, and
//! commits the result in ONE transaction (instance with a version check, the
//! order's status, the journal row, outbox rows, timer rows, the inbox row).

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use entity::{order_items, orders, products, saga_instances, saga_timers, saga_transitions};
use rust_decimal::Decimal;
use sea_orm::sea_query::{Expr, ExprTrait, LockBehavior, LockType, OnConflict, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, TransactionTrait,
};
use serde::Serialize;
use tokio::sync::Notify;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::clock::Clock;
use crate::consumer::RetryPolicy;
use crate::error::SagaError;
use crate::machine::{
    Decision, Effect, ORDER_SAGA, OrderEvent, OrderInput, OrderState, TimerKind, decide,
};
use crate::message::{Envelope, OrderEventPayload, OrderLine, OrderSnapshot};
use crate::payment::PaymentSimulator;
use crate::trace::{self, TraceContext};
use crate::{inbox, outbox};

/// Timings and limits of the order saga, from configuration.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// How long the simulated payment takes (`payment.delay_ms`).
    pub payment_delay: Duration,
    /// How long an order may stay `processing` (`expiration.processing_timeout_seconds`).
    pub processing_timeout: Duration,
    /// How many stale orders one sweep transaction expires.
    pub sweep_batch_size: u64,
    /// How often a transaction is retried after losing an optimistic-concurrency race.
    pub max_conflict_retries: u32,
    /// The retry budget of a failing input and the backoff between attempts.
    pub retry: RetryPolicy,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            payment_delay: Duration::milliseconds(5000),
            processing_timeout: Duration::seconds(600),
            sweep_batch_size: 500,
            max_conflict_retries: 10,
            retry: RetryPolicy::default(),
        }
    }
}

/// What handling one input did.
#[derive(Clone, Debug, PartialEq)]
pub enum Handled {
    /// The message id was already in the inbox: nothing was done.
    Duplicate,
    /// The machine moved the instance (possibly to the same state).
    Applied {
        /// State before the input.
        from: OrderState,
        /// State after it.
        to: OrderState,
        /// Events queued in the outbox.
        published: Vec<OrderEvent>,
    },
    /// The machine decided the input changes nothing (late or repeated).
    Ignored {
        /// The unchanged state.
        state: OrderState,
        /// Why the table ignored the input.
        reason: &'static str,
    },
}

/// A newly placed order, as committed by [`OrderSagaEngine::place_order`].
#[derive(Clone, Debug)]
pub struct PlacedOrder {
    /// The `orders` row as inserted.
    pub order: orders::Model,
    /// What every event of the order carries.
    pub snapshot: OrderSnapshot,
    /// Id of the queued `OrderCreated` message.
    pub message_id: Uuid,
}

/// Who places an order.
#[derive(Clone, Debug)]
pub struct Customer {
    /// `users.id`.
    pub user_id: i64,
    /// Where the completion e-mail goes.
    pub email: String,
    /// Shown in the e-mail and the audit trail.
    pub name: String,
}

/// What one fired timer did.
#[derive(Clone, Debug, PartialEq)]
pub struct TimerFired {
    /// `saga_timers.id`.
    pub timer_id: i64,
    /// The order id.
    pub correlation_id: String,
    /// The payment decision.
    pub approved: bool,
    /// The random draw behind it.
    pub draw: f64,
    /// What applying it did.
    pub handled: Handled,
}

/// What one sweep batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Stale instances locked by this batch.
    pub examined: usize,
    /// Of those, how many were expired.
    pub expired: usize,
}

/// Who or what gave the instance its input (for the journal and causation).
#[derive(Clone, Debug, Default)]
struct Trigger {
    message_id: Option<Uuid>,
    attempt: i32,
    detail: Option<String>,
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

/// The order saga engine. Cheap to clone.
#[derive(Clone)]
pub struct OrderSagaEngine {
    db: DatabaseConnection,
    clock: Arc<dyn Clock>,
    payment: Arc<dyn PaymentSimulator>,
    settings: EngineSettings,
    outbox_signal: Arc<Notify>,
    hook: Option<Arc<dyn ApplyHook>>,
}

/// A seam for tests and instrumentation: called inside the transaction after
/// an instance was loaded and the machine decided to apply an input, before
/// the version-conditional update. Returning an error fails the attempt as if
/// an effect had failed (the transaction rolls back).
#[async_trait]
pub trait ApplyHook: Send + Sync + 'static {
    /// See the trait documentation.
    async fn before_write(
        &self,
        instance: &saga_instances::Model,
        input: &OrderInput,
    ) -> Result<(), SagaError>;
}

/// The retry budget after one more failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempts {
    /// Failed attempts in the current budget, this one included.
    pub spent: i32,
    /// The budget is spent: the instance is now parked (faulted).
    pub exhausted: bool,
}

/// A parked (faulted) saga instance, as listed for operators.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParkedInstance {
    /// The order id.
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
#[derive(Clone, Debug, PartialEq)]
pub struct Resumed {
    /// The state the instance was resumed in.
    pub state: OrderState,
    /// What re-running its current step did (`None` when the state waits
    /// for a timer or the expiration sweep, which now pick it up again).
    pub rerun: Option<Handled>,
}

impl OrderSagaEngine {
    /// An engine on `db`, taking time from `clock` and payment outcomes from `payment`.
    pub fn new(
        db: DatabaseConnection,
        clock: Arc<dyn Clock>,
        payment: Arc<dyn PaymentSimulator>,
        settings: EngineSettings,
    ) -> Self {
        Self {
            db,
            clock,
            payment,
            settings,
            outbox_signal: Arc::new(Notify::new()),
            hook: None,
        }
    }

    /// Installs an [`ApplyHook`].
    pub fn with_hook(mut self, hook: Arc<dyn ApplyHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Share a wake-up signal with an outbox relay, so events leave as soon as
    /// their transaction commits instead of at the next poll.
    pub fn with_outbox_signal(mut self, signal: Arc<Notify>) -> Self {
        self.outbox_signal = signal;
        self
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

    /// Places an order inside the caller's transaction: reserves the stock of
    /// every line, writes the `pending` order row (total computed from
    /// `lines`) and its items, and starts its saga (see [`Self::start_order`]).
    /// The caller validates the lines and prices.
    ///
    /// Not enough stock for a line gives [`SagaError::OutOfStock`]; the caller
    /// must then roll its transaction back (nothing it wrote is kept).
    ///
    /// Runs in an `order.place` span (a child of the caller's, e.g. the HTTP
    /// request's); the saga instance and the `OrderCreated` outbox row keep
    /// its trace context.
    pub async fn place_order<C: ConnectionTrait>(
        conn: &C,
        now: DateTime<Utc>,
        customer: &Customer,
        lines: Vec<OrderLine>,
    ) -> Result<PlacedOrder, SagaError> {
        let span = tracing::info_span!(
            "order.place",
            user_id = customer.user_id,
            order_id = tracing::field::Empty,
            correlation_id = tracing::field::Empty,
            message_id = tracing::field::Empty,
        );
        Self::place_order_in_span(conn, now, customer, lines)
            .instrument(span)
            .await
    }

    async fn place_order_in_span<C: ConnectionTrait>(
        conn: &C,
        now: DateTime<Utc>,
        customer: &Customer,
        lines: Vec<OrderLine>,
    ) -> Result<PlacedOrder, SagaError> {
        reserve_stock(conn, &lines).await?;
        let total: Decimal = lines
            .iter()
            .map(|l| l.unit_price * Decimal::from(l.quantity))
            .sum();
        let order = orders::Entity::insert(orders::ActiveModel {
            user_id: Set(customer.user_id),
            status: Set(OrderState::Pending.as_str().to_owned()),
            total: Set(total),
            created_at: Set(now),
            updated_at: Set(now),
            ..Default::default()
        })
        .exec_with_returning(conn)
        .await?;
        let span = tracing::Span::current();
        span.record("order_id", order.id);
        span.record("correlation_id", order.id);
        order_items::Entity::insert_many(lines.iter().map(|l| order_items::ActiveModel {
            order_id: Set(order.id),
            product_id: Set(l.product_id),
            quantity: Set(l.quantity),
            unit_price: Set(l.unit_price),
            ..Default::default()
        }))
        .exec(conn)
        .await?;
        let snapshot = OrderSnapshot {
            order_id: order.id,
            user_id: customer.user_id,
            user_email: customer.email.clone(),
            user_name: customer.name.clone(),
            total,
            items: lines,
        };
        let message_id = Self::start_order(conn, now, &snapshot).await?;
        span.record("message_id", tracing::field::display(message_id));
        Ok(PlacedOrder {
            order,
            snapshot,
            message_id,
        })
    }

    /// Starts the saga of a new order inside the caller's transaction: the
    /// instance (`pending`), its first journal row and the `OrderCreated`
    /// outbox row. Returns the id of the `OrderCreated` message.
    pub async fn start_order<C: ConnectionTrait>(
        conn: &C,
        now: DateTime<Utc>,
        order: &OrderSnapshot,
    ) -> Result<Uuid, SagaError> {
        let correlation_id = order.order_id.to_string();
        let data = serde_json::to_value(order)
            .map_err(|e| SagaError::Corrupt(format!("order snapshot: {e}")))?;
        let (traceparent, tracestate) = TraceContext::columns(TraceContext::current().as_ref());
        let instance = saga_instances::Entity::insert(saga_instances::ActiveModel {
            saga_type: Set(ORDER_SAGA.to_owned()),
            correlation_id: Set(correlation_id.clone()),
            state: Set(OrderState::Pending.as_str().to_owned()),
            version: Set(0),
            attempts: Set(0),
            faulted: Set(false),
            last_error: Set(None),
            data: Set(data),
            state_entered_at: Set(now),
            created_at: Set(now),
            updated_at: Set(now),
            traceparent: Set(traceparent),
            tracestate: Set(tracestate),
            ..Default::default()
        })
        .exec(conn)
        .await?;
        let envelope = order_event(
            OrderEvent::OrderCreated,
            order,
            None,
            OrderState::Pending,
            None,
            now,
        )?;
        outbox::enqueue(conn, &envelope, OrderEvent::OrderCreated.routing_key()).await?;
        journal(
            conn,
            JournalRow {
                instance_id: instance.last_insert_id,
                correlation_id: &correlation_id,
                from: None,
                to: OrderState::Pending,
                trigger: "OrderPlaced",
                outcome: "applied",
                message_id: Some(envelope.message_id),
                attempt: 1,
                payment: None,
                detail: Some("order placed; OrderCreated queued".to_owned()),
                error: None,
            },
            now,
        )
        .await?;
        Ok(envelope.message_id)
    }

    /// Handles a consumed `OrderCreated` for `consumer` exactly once.
    pub async fn handle_order_created(
        &self,
        consumer: &str,
        envelope: &Envelope,
    ) -> Result<Handled, SagaError> {
        if envelope.message_type != OrderEvent::OrderCreated.message_type() {
            return Err(SagaError::Malformed(format!(
                "expected OrderCreated, got {}",
                envelope.message_type
            )));
        }
        self.apply_order_created(&envelope.correlation_id, Some((consumer, envelope)), None)
            .await
    }

    /// Applies `OrderCreated` to the instance of `correlation_id`, retrying
    /// lost optimistic-concurrency races. With `inbox`, the message is
    /// recorded for its consumer in the same transaction (a duplicate changes
    /// nothing) and a parked instance refuses it; without, it is the re-run of
    /// a resumed saga.
    async fn apply_order_created(
        &self,
        correlation_id: &str,
        inbox: Option<(&str, &Envelope)>,
        detail: Option<&str>,
    ) -> Result<Handled, SagaError> {
        let mut conflicts = 0;
        loop {
            let txn = self.db.begin().await?;
            if let Some((consumer, envelope)) = inbox
                && !inbox::record(&txn, consumer, envelope, self.clock.now()).await?
            {
                txn.rollback().await?;
                return Ok(Handled::Duplicate);
            }
            let instance = load(&txn, correlation_id).await?;
            if inbox.is_some() && instance.faulted {
                txn.rollback().await?;
                return Err(SagaError::Parked(correlation_id.to_owned()));
            }
            let trigger = Trigger {
                message_id: inbox.map(|(_, envelope)| envelope.message_id),
                attempt: instance.attempts + 1,
                detail: detail.map(str::to_owned),
            };
            match self
                .apply(&txn, instance, OrderInput::OrderCreated, trigger)
                .await
            {
                Ok(handled) => {
                    txn.commit().await?;
                    self.signal_if_published(&handled);
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

    /// Fires at most one due timer: draws the payment, applies the decision,
    /// marks the timer fired, all in one transaction. `None` when nothing is due.
    pub async fn try_fire_due_timer_once(&self) -> Result<Option<TimerFired>, SagaError> {
        let mut conflicts = 0;
        loop {
            let now = self.clock.now();
            let txn = self.db.begin().await?;
            let timer = saga_timers::Entity::find()
                .filter(saga_timers::Column::FiredAt.is_null())
                .filter(saga_timers::Column::DueAt.lte(now))
                .filter(not_parked(saga_timers::Column::SagaInstanceId))
                .order_by_asc(saga_timers::Column::DueAt)
                .limit(1)
                .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
                .one(&txn)
                .await?;
            let Some(timer) = timer else {
                txn.commit().await?;
                return Ok(None);
            };
            let kind = TimerKind::parse(&timer.timer_kind).ok_or_else(|| {
                SagaError::Corrupt(format!("timer {} has kind {}", timer.id, timer.timer_kind))
            })?;
            let instance = saga_instances::Entity::find_by_id(timer.saga_instance_id)
                .one(&txn)
                .await?
                .ok_or_else(|| SagaError::UnknownInstance {
                    saga_type: ORDER_SAGA,
                    correlation_id: timer.correlation_id.clone(),
                })?;
            // Firing continues the trace of whatever scheduled the timer.
            let span = tracing::info_span!(
                "timer.fire",
                order_id = %timer.correlation_id,
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
            let (input, draw) = match kind {
                TimerKind::PaymentDue => {
                    let draw = self.payment.draw();
                    (
                        OrderInput::PaymentDecided {
                            approved: draw.approved,
                            draw: draw.value,
                        },
                        draw,
                    )
                }
            };
            let trigger = Trigger {
                message_id: None,
                attempt: instance.attempts + 1,
                detail: Some(format!(
                    "timer {} ({}) due {} fired {}",
                    timer.id,
                    kind.as_str(),
                    timer.due_at.to_rfc3339(),
                    now.to_rfc3339()
                )),
            };
            match self
                .apply(&txn, instance, input, trigger)
                .instrument(span)
                .await
            {
                Ok(handled) => {
                    saga_timers::Entity::update_many()
                        .col_expr(saga_timers::Column::FiredAt, Expr::value(now))
                        .filter(saga_timers::Column::Id.eq(timer.id))
                        .exec(&txn)
                        .await?;
                    txn.commit().await?;
                    self.signal_if_published(&handled);
                    crate::metrics::timer_fired(
                        (now - timer.due_at).num_milliseconds() as f64 / 1000.0,
                    );
                    return Ok(Some(TimerFired {
                        timer_id: timer.id,
                        correlation_id: timer.correlation_id,
                        approved: draw.approved,
                        draw: draw.value,
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
                        .record_failure(&timer.correlation_id, None, input.name(), &e)
                        .await?;
                    let retry_at = self.clock.now()
                        + Duration::from_std(self.settings.retry.delay_after(
                            u32::try_from(attempts.spent).unwrap_or(u32::MAX),
                            rand::random::<f64>(),
                        ))
                        .unwrap_or(Duration::seconds(1));
                    saga_timers::Entity::update_many()
                        .col_expr(saga_timers::Column::DueAt, Expr::value(retry_at))
                        .filter(saga_timers::Column::Id.eq(timer.id))
                        .exec(&self.db)
                        .await?;
                    return Err(e);
                }
            }
        }
    }

    /// When the next unfired timer is due, if any.
    pub async fn next_timer_due(&self) -> Result<Option<DateTime<Utc>>, SagaError> {
        let next = saga_timers::Entity::find()
            .filter(saga_timers::Column::FiredAt.is_null())
            .filter(not_parked(saga_timers::Column::SagaInstanceId))
            .order_by_asc(saga_timers::Column::DueAt)
            .one(&self.db)
            .await?;
        Ok(next.map(|t| t.due_at))
    }

    /// Expires one batch of orders that have been `processing` for longer than
    /// the timeout. Rows are locked with `SKIP LOCKED`, so several schedulers can
    /// sweep at once without expiring an order twice.
    pub async fn try_expire_once(&self) -> Result<SweepOutcome, SagaError> {
        let now = self.clock.now();
        let cutoff = now - self.settings.processing_timeout;
        let txn = self.db.begin().await?;
        let stale = saga_instances::Entity::find()
            .filter(saga_instances::Column::SagaType.eq(ORDER_SAGA))
            .filter(saga_instances::Column::State.eq(OrderState::Processing.as_str()))
            .filter(saga_instances::Column::StateEnteredAt.lte(cutoff))
            .filter(saga_instances::Column::Faulted.eq(false))
            .order_by_asc(saga_instances::Column::StateEnteredAt)
            .limit(self.settings.sweep_batch_size)
            .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
            .all(&txn)
            .await?;
        // Expiring releases stock. Lock every product this batch will give
        // stock back to now, in id order (the order in which placing an order
        // reserves), so the batch and concurrent orders cannot deadlock.
        let order_ids: Vec<i64> = stale
            .iter()
            .filter_map(|i| i.correlation_id.parse().ok())
            .collect();
        if !order_ids.is_empty() {
            products::Entity::find()
                .select_only()
                .column(products::Column::Id)
                .filter(
                    products::Column::Id.in_subquery(
                        Query::select()
                            .column(order_items::Column::ProductId)
                            .from(order_items::Entity)
                            .and_where(order_items::Column::OrderId.is_in(order_ids))
                            .to_owned(),
                    ),
                )
                .order_by_asc(products::Column::Id)
                .lock(LockType::Update)
                .into_tuple::<i64>()
                .all(&txn)
                .await?;
        }
        let mut outcome = SweepOutcome {
            examined: stale.len(),
            expired: 0,
        };
        for instance in stale {
            let entered = instance.state_entered_at;
            let correlation_id = instance.correlation_id.clone();
            // Expiring continues the order's trace (its latest transition).
            let span = tracing::info_span!(
                "order.expire",
                order_id = %correlation_id,
                correlation_id = %correlation_id,
                trace_id = tracing::field::Empty,
            );
            let stored = TraceContext::from_columns(
                instance.traceparent.as_deref(),
                instance.tracestate.as_deref(),
            );
            trace::continue_trace(&span, stored.as_ref());
            let trigger = Trigger {
                message_id: None,
                attempt: instance.attempts + 1,
                detail: Some(format!(
                    "processing since {}, timeout {} s, swept at {}",
                    entered.to_rfc3339(),
                    self.settings.processing_timeout.num_seconds(),
                    now.to_rfc3339()
                )),
            };
            match self
                .apply(&txn, instance, OrderInput::ExpirationDue, trigger)
                .instrument(span)
                .await
            {
                Ok(Handled::Applied {
                    to: OrderState::Expired,
                    ..
                }) => outcome.expired += 1,
                Ok(_) => {}
                // The row is locked by us, so a conflict means a writer that did
                // not lock; skip it, the next sweep looks again.
                Err(ApplyError::Conflict) => {}
                Err(ApplyError::Saga(e)) => {
                    // The whole batch rolls back; the failing instance spends
                    // one attempt, and is left out once it is parked.
                    txn.rollback().await?;
                    self.record_failure(
                        &correlation_id,
                        None,
                        OrderInput::ExpirationDue.name(),
                        &e,
                    )
                    .await?;
                    return Err(e);
                }
            }
        }
        txn.commit().await?;
        crate::metrics::transitions(
            OrderState::Processing,
            OrderState::Expired,
            outcome.expired as u64,
        );
        if outcome.expired > 0 {
            self.outbox_signal.notify_one();
        }
        Ok(outcome)
    }

    /// Sweeps batch after batch until no stale order is left.
    pub async fn expire_all_stale(&self) -> Result<SweepOutcome, SagaError> {
        let mut total = SweepOutcome::default();
        loop {
            let batch = self.try_expire_once().await?;
            total.examined += batch.examined;
            total.expired += batch.expired;
            if (batch.examined as u64) < self.settings.sweep_batch_size || batch.expired == 0 {
                return Ok(total);
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
        trigger: &'static str,
        error: &SagaError,
    ) -> Result<Attempts, SagaError> {
        let now = self.clock.now();
        let budget = if error.is_retryable() {
            i32::try_from(Ord::max(self.settings.retry.max_attempts, 1)).unwrap_or(i32::MAX)
        } else {
            1
        };
        let text = error.to_string();
        let txn = self.db.begin().await?;
        let instance = load(&txn, correlation_id).await?;
        let spent = instance.attempts.saturating_add(1);
        let exhausted = instance.faulted || spent >= budget;
        saga_instances::Entity::update_many()
            .col_expr(saga_instances::Column::Attempts, Expr::value(spent))
            .col_expr(saga_instances::Column::LastError, Expr::value(text.clone()))
            .col_expr(saga_instances::Column::Faulted, Expr::value(exhausted))
            .col_expr(saga_instances::Column::UpdatedAt, Expr::value(now))
            .filter(saga_instances::Column::Id.eq(instance.id))
            .exec(&txn)
            .await?;
        let state: OrderState = instance
            .state
            .parse()
            .map_err(|e| SagaError::Corrupt(format!("instance {}: {e}", instance.id)))?;
        journal(
            &txn,
            JournalRow {
                instance_id: instance.id,
                correlation_id,
                from: Some(state),
                to: state,
                trigger,
                outcome: if exhausted { "parked" } else { "failed" },
                message_id,
                attempt: spent,
                payment: None,
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
                order_id = %correlation_id,
                message_id = message_id.map(tracing::field::display),
                attempts = spent,
                error = %text,
                "order saga parked: retry budget spent"
            );
        } else {
            tracing::warn!(
                order_id = %correlation_id,
                message_id = message_id.map(tracing::field::display),
                attempt = spent,
                error = %text,
                "order saga input failed; will retry"
            );
        }
        Ok(Attempts { spent, exhausted })
    }

    /// Parked (faulted) order sagas, oldest first.
    pub async fn parked(&self, limit: u64) -> Result<Vec<ParkedInstance>, SagaError> {
        Ok(saga_instances::Entity::find()
            .filter(saga_instances::Column::SagaType.eq(ORDER_SAGA))
            .filter(saga_instances::Column::Faulted.eq(true))
            .order_by_asc(saga_instances::Column::UpdatedAt)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|i| ParkedInstance {
                correlation_id: i.correlation_id,
                state: i.state,
                attempts: i.attempts,
                last_error: i.last_error,
                parked_at: i.updated_at,
            })
            .collect())
    }

    /// Resumes a parked instance with a fresh budget and re-runs it from its
    /// current state: a `pending` order is started again (as if its
    /// `OrderCreated` had arrived), a `processing` order's unfired payment
    /// timer is made due now, and the sweep may expire it again.
    pub async fn resume(&self, correlation_id: &str) -> Result<Resumed, SagaError> {
        let now = self.clock.now();
        let txn = self.db.begin().await?;
        let instance = load(&txn, correlation_id).await?;
        if !instance.faulted {
            txn.rollback().await?;
            return Err(SagaError::NotParked(correlation_id.to_owned()));
        }
        let state: OrderState = instance
            .state
            .parse()
            .map_err(|e| SagaError::Corrupt(format!("instance {}: {e}", instance.id)))?;
        let resumed = saga_instances::Entity::update_many()
            .col_expr(saga_instances::Column::Faulted, Expr::value(false))
            .col_expr(saga_instances::Column::Attempts, Expr::value(0))
            .col_expr(
                saga_instances::Column::Version,
                Expr::value(instance.version + 1),
            )
            .col_expr(saga_instances::Column::UpdatedAt, Expr::value(now))
            .filter(saga_instances::Column::Id.eq(instance.id))
            .filter(saga_instances::Column::Version.eq(instance.version))
            .exec(&txn)
            .await?;
        if resumed.rows_affected != 1 {
            // Changed while we looked: the operator can simply try again.
            txn.rollback().await?;
            return Err(SagaError::Contention(correlation_id.to_owned()));
        }
        saga_timers::Entity::update_many()
            .col_expr(saga_timers::Column::DueAt, Expr::value(now))
            .filter(saga_timers::Column::SagaInstanceId.eq(instance.id))
            .filter(saga_timers::Column::FiredAt.is_null())
            .exec(&txn)
            .await?;
        journal(
            &txn,
            JournalRow {
                instance_id: instance.id,
                correlation_id,
                from: Some(state),
                to: state,
                trigger: "Resumed",
                outcome: "resumed",
                message_id: None,
                attempt: 0,
                payment: None,
                detail: Some(format!(
                    "resumed by an operator with a fresh budget; last error: {}",
                    instance.last_error.as_deref().unwrap_or("none")
                )),
                error: None,
            },
            now,
        )
        .await?;
        txn.commit().await?;
        tracing::info!(order_id = %correlation_id, state = %state, "parked order saga resumed");
        let rerun = if state == OrderState::Pending {
            Some(
                self.apply_order_created(correlation_id, None, Some("re-run after resume"))
                    .await?,
            )
        } else {
            None
        };
        Ok(Resumed { state, rerun })
    }

    fn signal_if_published(&self, handled: &Handled) {
        // Called right after each commit of an applied input: count it here.
        if let Handled::Applied { from, to, .. } = handled {
            crate::metrics::transitions(*from, *to, 1);
        }
        if let Handled::Applied { published, .. } = handled
            && !published.is_empty()
        {
            self.outbox_signal.notify_one();
        }
    }

    /// Applies one input to a loaded instance inside `txn`.
    async fn apply<C: ConnectionTrait>(
        &self,
        txn: &C,
        instance: saga_instances::Model,
        input: OrderInput,
        trigger: Trigger,
    ) -> Result<Handled, ApplyError> {
        let now = self.clock.now();
        let state: OrderState = instance
            .state
            .parse()
            .map_err(|e| SagaError::Corrupt(format!("instance {}: {e}", instance.id)))?;
        let payment = match input {
            OrderInput::PaymentDecided { approved, draw } => Some((draw, approved)),
            _ => None,
        };
        let (to, outcome, note, handled) = match decide(state, input) {
            Decision::Apply {
                next,
                effects,
                note,
            } => {
                let order: OrderSnapshot =
                    serde_json::from_value(instance.data.clone()).map_err(|e| {
                        SagaError::Corrupt(format!("instance {} data: {e}", instance.id))
                    })?;
                let entered = if next == state {
                    instance.state_entered_at
                } else {
                    now
                };
                if let Some(hook) = &self.hook {
                    hook.before_write(&instance, &input).await?;
                }
                let mut update = saga_instances::Entity::update_many();
                // The instance continues the trace of its latest transition
                // (what the expiration sweep picks up).
                if let Some(current) = TraceContext::current() {
                    update = update
                        .col_expr(
                            saga_instances::Column::Traceparent,
                            Expr::value(current.traceparent()),
                        )
                        .col_expr(
                            saga_instances::Column::Tracestate,
                            Expr::value(current.tracestate().map(str::to_owned)),
                        );
                }
                let updated = update
                    .col_expr(saga_instances::Column::State, Expr::value(next.as_str()))
                    // Success: the retry budget starts afresh.
                    .col_expr(saga_instances::Column::Attempts, Expr::value(0))
                    .col_expr(
                        saga_instances::Column::LastError,
                        Expr::value(Option::<String>::None),
                    )
                    .col_expr(
                        saga_instances::Column::Version,
                        Expr::value(instance.version + 1),
                    )
                    .col_expr(saga_instances::Column::StateEnteredAt, Expr::value(entered))
                    .col_expr(saga_instances::Column::UpdatedAt, Expr::value(now))
                    .filter(saga_instances::Column::Id.eq(instance.id))
                    .filter(saga_instances::Column::Version.eq(instance.version))
                    .exec(txn)
                    .await?;
                if updated.rows_affected != 1 {
                    return Err(ApplyError::Conflict);
                }
                if next != state {
                    orders::Entity::update_many()
                        .col_expr(orders::Column::Status, Expr::value(next.as_str()))
                        .col_expr(orders::Column::UpdatedAt, Expr::value(now))
                        .filter(orders::Column::Id.eq(order.order_id))
                        .exec(txn)
                        .await?;
                }
                let mut published = Vec::new();
                for effect in effects {
                    match effect {
                        Effect::Publish(event) => {
                            let envelope = order_event(
                                event,
                                &order,
                                Some(state),
                                next,
                                trigger.message_id,
                                now,
                            )?;
                            outbox::enqueue(txn, &envelope, event.routing_key()).await?;
                            published.push(event);
                        }
                        Effect::ScheduleTimer(kind) => {
                            let delay = match kind {
                                TimerKind::PaymentDue => self.settings.payment_delay,
                            };
                            schedule_timer(txn, &instance, kind, now + delay, now).await?;
                        }
                        Effect::ReleaseStock => release_stock(txn, order.order_id).await?,
                    }
                }
                (
                    next,
                    "applied",
                    note,
                    Handled::Applied {
                        from: state,
                        to: next,
                        published,
                    },
                )
            }
            Decision::Ignore { reason } => {
                (state, "ignored", reason, Handled::Ignored { state, reason })
            }
            Decision::Reject { reason } => {
                return Err(ApplyError::Saga(SagaError::Rejected {
                    state: state.as_str().to_owned(),
                    input: input.name(),
                    reason,
                }));
            }
        };
        let detail = match &trigger.detail {
            Some(d) => format!("{note}; {d}"),
            None => note.to_owned(),
        };
        journal(
            txn,
            JournalRow {
                instance_id: instance.id,
                correlation_id: &instance.correlation_id,
                from: Some(state),
                to,
                trigger: input.name(),
                outcome,
                message_id: trigger.message_id,
                attempt: trigger.attempt,
                payment,
                detail: Some(detail),
                error: None,
            },
            now,
        )
        .await?;
        tracing::info!(
            order_id = %instance.correlation_id,
            message_id = trigger.message_id.map(tracing::field::display),
            from = %state,
            to = %to,
            trigger = input.name(),
            outcome,
            "order saga: {note}"
        );
        Ok(handled)
    }
}

/// `instance_id NOT IN (parked instances)`.
fn not_parked(instance_id: saga_timers::Column) -> sea_orm::Condition {
    sea_orm::Condition::all().add(
        instance_id.not_in_subquery(
            Query::select()
                .column(saga_instances::Column::Id)
                .from(saga_instances::Entity)
                .and_where(Expr::col(saga_instances::Column::Faulted).eq(true))
                .to_owned(),
        ),
    )
}

async fn load<C: ConnectionTrait>(
    conn: &C,
    correlation_id: &str,
) -> Result<saga_instances::Model, SagaError> {
    saga_instances::Entity::find()
        .filter(saga_instances::Column::SagaType.eq(ORDER_SAGA))
        .filter(saga_instances::Column::CorrelationId.eq(correlation_id))
        .one(conn)
        .await?
        .ok_or_else(|| SagaError::UnknownInstance {
            saga_type: ORDER_SAGA,
            correlation_id: correlation_id.to_owned(),
        })
}

fn order_event(
    event: OrderEvent,
    order: &OrderSnapshot,
    previous: Option<OrderState>,
    status: OrderState,
    causation_id: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<Envelope, SagaError> {
    let payload = OrderEventPayload {
        order: order.clone(),
        previous_status: previous.map(|s| s.as_str().to_owned()),
        status: status.as_str().to_owned(),
    };
    Ok(Envelope {
        message_id: Uuid::new_v4(),
        message_type: event.message_type().to_owned(),
        correlation_id: order.order_id.to_string(),
        causation_id,
        occurred_at: now,
        initiated_by: Some(order.user_id),
        payload: serde_json::to_value(payload)
            .map_err(|e| SagaError::Corrupt(format!("event payload: {e}")))?,
    })
}

/// Takes every line's quantity off its product's stock, in product id order
/// (so concurrent orders lock rows in the same order and cannot deadlock).
/// Each update is conditional on enough stock being left.
async fn reserve_stock<C: ConnectionTrait>(conn: &C, lines: &[OrderLine]) -> Result<(), SagaError> {
    let mut sorted: Vec<&OrderLine> = lines.iter().collect();
    sorted.sort_by_key(|l| l.product_id);
    for line in sorted {
        let reserved = products::Entity::update_many()
            .col_expr(
                products::Column::Stock,
                Expr::col(products::Column::Stock).sub(line.quantity),
            )
            .filter(products::Column::Id.eq(line.product_id))
            .filter(products::Column::Stock.gte(line.quantity))
            .exec(conn)
            .await?;
        if reserved.rows_affected != 1 {
            let available = products::Entity::find_by_id(line.product_id)
                .one(conn)
                .await?
                .map_or(0, |p| p.stock);
            return Err(SagaError::OutOfStock {
                product_id: line.product_id,
                requested: line.quantity,
                available,
            });
        }
    }
    Ok(())
}

/// Gives an order's reserved quantities back to their products. Runs as an
/// effect of the transition that ends the order, so it happens exactly once.
async fn release_stock<C: ConnectionTrait>(conn: &C, order_id: i64) -> Result<(), SagaError> {
    let mut items = order_items::Entity::find()
        .filter(order_items::Column::OrderId.eq(order_id))
        .all(conn)
        .await?;
    items.sort_by_key(|i| i.product_id);
    for item in items {
        products::Entity::update_many()
            .col_expr(
                products::Column::Stock,
                Expr::col(products::Column::Stock).add(item.quantity),
            )
            .filter(products::Column::Id.eq(item.product_id))
            .exec(conn)
            .await?;
    }
    Ok(())
}

async fn schedule_timer<C: ConnectionTrait>(
    conn: &C,
    instance: &saga_instances::Model,
    kind: TimerKind,
    due_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), SagaError> {
    use saga_timers::Column as T;
    let (traceparent, tracestate) = TraceContext::columns(TraceContext::current().as_ref());
    let mut insert = Query::insert();
    insert
        .into_table(saga_timers::Entity)
        .columns([
            T::SagaInstanceId,
            T::CorrelationId,
            T::TimerKind,
            T::DueAt,
            T::CreatedAt,
            T::Traceparent,
            T::Tracestate,
        ])
        .values([
            instance.id.into(),
            instance.correlation_id.clone().into(),
            kind.as_str().into(),
            due_at.into(),
            now.into(),
            traceparent.into(),
            tracestate.into(),
        ])
        .map_err(|e| SagaError::Corrupt(e.to_string()))?
        .on_conflict(
            OnConflict::columns([T::SagaInstanceId, T::TimerKind])
                .do_nothing()
                .to_owned(),
        );
    conn.execute(&insert).await?;
    Ok(())
}

struct JournalRow<'a> {
    instance_id: i64,
    correlation_id: &'a str,
    from: Option<OrderState>,
    to: OrderState,
    trigger: &'static str,
    outcome: &'static str,
    message_id: Option<Uuid>,
    attempt: i32,
    payment: Option<(f64, bool)>,
    detail: Option<String>,
    error: Option<String>,
}

async fn journal<C: ConnectionTrait>(
    conn: &C,
    row: JournalRow<'_>,
    now: DateTime<Utc>,
) -> Result<(), SagaError> {
    saga_transitions::Entity::insert(saga_transitions::ActiveModel {
        saga_instance_id: Set(row.instance_id),
        correlation_id: Set(row.correlation_id.to_owned()),
        from_state: Set(row.from.map(|s| s.as_str().to_owned())),
        to_state: Set(row.to.as_str().to_owned()),
        trigger: Set(row.trigger.to_owned()),
        outcome: Set(row.outcome.to_owned()),
        message_id: Set(row.message_id),
        attempt: Set(row.attempt),
        payment_draw: Set(row.payment.map(|(draw, _)| draw)),
        payment_approved: Set(row.payment.map(|(_, approved)| approved)),
        detail: Set(row.detail),
        error: Set(row.error),
        occurred_at: Set(now),
        ..Default::default()
    })
    .exec(conn)
    .await?;
    Ok(())
}
