//! Notification consumers: an audit row per order event, and a fake e-mail
//! (a log line) when an order completes. Exactly once per (order, event):
//! the inbox skips redelivered messages and the unique (order_id, event_type)
//! key stops a second row even if two different messages claim the same event.

use std::sync::Arc;

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use entity::{notifications, users};
use saga::clock::Clock;
use saga::consumer::{HandlerOutcome, MessageHandler};
use saga::engine::Incoming;
use saga::inbox;
use saga::message::Envelope;
use saga::retry::Attempts;
use saga::{SagaError, SagaEvent as _};
use sea_orm::sea_query::{OnConflict, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, TransactionTrait,
};

use crate::contracts::{OrderEventPayload, money};
use crate::definition::OrderEvent;

/// Writes the audit row (and logs the fake e-mail) for every order event.
pub struct NotificationHandler {
    db: DatabaseConnection,
    clock: Arc<dyn Clock>,
    consumer: String,
    budget: u32,
}

impl NotificationHandler {
    /// A handler recording its inbox rows as `consumer`, with a retry budget
    /// of 3 attempts per message.
    pub fn new(db: DatabaseConnection, clock: Arc<dyn Clock>, consumer: impl Into<String>) -> Self {
        Self {
            db,
            clock,
            consumer: consumer.into(),
            budget: 3,
        }
    }

    /// Sets the retry budget (`retry.max_attempts`).
    pub fn with_retry_budget(mut self, max_attempts: u32) -> Self {
        self.budget = max_attempts;
        self
    }
}

/// The audit message: what happened, to which order, the result, and who
/// started the flow.
pub fn audit_message(event: OrderEvent, p: &OrderEventPayload) -> String {
    let o = &p.order;
    let who = format!("user #{} <{}>", o.user_id, o.user_email);
    let previous = p.previous_status.as_deref().unwrap_or("none");
    match event {
        OrderEvent::OrderCreated => format!(
            "Order #{} created by {who}: {} item(s), total {}; status {} -> {}; awaiting payment.",
            o.order_id,
            o.items.len(),
            money(o.total),
            previous,
            p.status
        ),
        OrderEvent::OrderCompleted => format!(
            "Order #{} completed: payment approved, total {}; status {} -> {}; confirmation e-mail sent to {}. Flow started by {who}.",
            o.order_id,
            money(o.total),
            previous,
            p.status,
            o.user_email
        ),
        OrderEvent::OrderExpired => format!(
            "Order #{} expired: payment not confirmed before the processing timeout, total {}; status {} -> {}. Flow started by {who}.",
            o.order_id,
            money(o.total),
            previous,
            p.status
        ),
    }
}

/// One message of a batch, read.
struct Note<'a> {
    incoming: &'a Incoming<'a>,
    event: OrderEvent,
    payload: OrderEventPayload,
    message: String,
}

#[async_trait]
impl MessageHandler for NotificationHandler {
    fn message_types(&self) -> &'static [&'static str] {
        &["OrderCreated", "OrderCompleted", "OrderExpired"]
    }

    async fn record_failure(
        &self,
        envelope: &Envelope,
        error: &SagaError,
    ) -> Result<Attempts, SagaError> {
        saga::failures::record(
            &self.db,
            &self.consumer,
            envelope,
            error,
            self.budget,
            self.clock.now(),
        )
        .await
    }

    async fn handle(&self, envelope: &Envelope) -> Result<HandlerOutcome, SagaError> {
        let span = tracing::Span::current();
        self.handle_batch(&[Incoming {
            envelope,
            span: &span,
        }])
        .await?
        .pop()
        .ok_or_else(|| SagaError::Corrupt("a batch of one handled nothing".to_owned()))
    }

    fn batches(&self) -> bool {
        true
    }

    /// The audit rows of a batch in one transaction: the inbox rows and the
    /// notifications as one statement each; the fake e-mails are logged
    /// after the commit, once per row actually inserted.
    async fn handle_batch(&self, batch: &[Incoming<'_>]) -> Result<Vec<HandlerOutcome>, SagaError> {
        let mut notes = Vec::with_capacity(batch.len());
        for incoming in batch {
            let envelope = incoming.envelope;
            let event = OrderEvent::from_message_type(&envelope.message_type).ok_or_else(|| {
                SagaError::Malformed(format!("unknown message type `{}`", envelope.message_type))
            })?;
            let payload = envelope.payload_as::<OrderEventPayload>().map_err(|e| {
                SagaError::Malformed(format!("{} payload: {e}", envelope.message_type))
            })?;
            let message = audit_message(event, &payload);
            notes.push(Note {
                incoming,
                event,
                payload,
                message,
            });
        }
        let now = self.clock.now();
        let envelopes: Vec<&Envelope> = batch.iter().map(|i| i.envelope).collect();

        let txn = self.db.begin().await?;
        let mut fresh = inbox::record_many(&txn, &self.consumer, &envelopes, now).await?;
        // New messages, each (order, event) claimed by its first message.
        let mut claimed = HashSet::new();
        let mut rows = Vec::new();
        let mut wanted = Vec::with_capacity(notes.len());
        for note in &notes {
            let key = (note.payload.order.order_id, note.event);
            let new = fresh.remove(&note.incoming.envelope.message_id) && claimed.insert(key);
            wanted.push(new);
            if new {
                rows.push(note);
            }
        }
        let mut inserted = HashSet::new();
        if !rows.is_empty() {
            use notifications::Column as N;
            let mut insert = Query::insert();
            insert.into_table(notifications::Entity).columns([
                N::OrderId,
                N::UserId,
                N::EventType,
                N::Message,
                N::IsEmailSent,
                N::CreatedAt,
                N::Metadata,
            ]);
            for note in &rows {
                let envelope = note.incoming.envelope;
                let payload = &note.payload;
                let metadata = serde_json::json!({
                    "message_id": envelope.message_id,
                    "correlation_id": envelope.correlation_id,
                    "causation_id": envelope.causation_id,
                    "occurred_at": envelope.occurred_at,
                    "initiated_by": envelope.initiated_by,
                    "previous_status": payload.previous_status,
                    "new_status": payload.status,
                    "total": payload.order.total,
                    "items": payload.order.items,
                    "user_email": payload.order.user_email,
                    "consumer": self.consumer,
                });
                insert
                    .values([
                        payload.order.order_id.into(),
                        payload.order.user_id.into(),
                        note.event.message_type().into(),
                        note.message.clone().into(),
                        (note.event == OrderEvent::OrderCompleted).into(),
                        now.into(),
                        metadata.into(),
                    ])
                    .map_err(|e| SagaError::Corrupt(e.to_string()))?;
            }
            insert
                .on_conflict(
                    OnConflict::columns([N::OrderId, N::EventType])
                        .do_nothing()
                        .to_owned(),
                )
                .returning(Query::returning().columns([N::OrderId, N::EventType]));
            for row in txn.query_all(&insert).await? {
                let order_id: i64 = row.try_get("", "order_id")?;
                let event_type: String = row.try_get("", "event_type")?;
                inserted.insert((order_id, event_type));
            }
        }
        let completed: Vec<i64> = rows
            .iter()
            .filter(|n| n.event == OrderEvent::OrderCompleted)
            .filter(|n| {
                inserted.contains(&(n.payload.order.order_id, n.event.message_type().to_owned()))
            })
            .map(|n| n.payload.order.user_id)
            .collect();
        let recipients: HashMap<i64, (String, String)> = if completed.is_empty() {
            HashMap::new()
        } else {
            users::Entity::find()
                .filter(users::Column::Id.is_in(completed))
                .all(&txn)
                .await?
                .into_iter()
                .map(|u| (u.id, (u.name, u.email)))
                .collect()
        };
        txn.commit().await?;

        let mut outcomes = Vec::with_capacity(notes.len());
        for (note, new) in notes.iter().zip(wanted) {
            let _entered = note.incoming.span.enter();
            let envelope = note.incoming.envelope;
            let order = &note.payload.order;
            let event_type = note.event.message_type();
            if !new {
                outcomes.push(HandlerOutcome::Duplicate);
                continue;
            }
            if !inserted.contains(&(order.order_id, event_type.to_owned())) {
                tracing::info!(
                    order_id = order.order_id,
                    message_id = %envelope.message_id,
                    event = event_type,
                    "notification already recorded for this order and event; skipped"
                );
                outcomes.push(HandlerOutcome::Duplicate);
                continue;
            }
            tracing::info!(
                order_id = order.order_id,
                message_id = %envelope.message_id,
                event = event_type,
                "audit notification saved: {}",
                note.message
            );
            if let (OrderEvent::OrderCompleted, Some((name, email))) =
                (note.event, recipients.get(&order.user_id))
            {
                let items: Vec<String> = order
                    .items
                    .iter()
                    .map(|i| {
                        format!(
                            "{} x {} @ {}",
                            i.quantity,
                            i.product_name,
                            money(i.unit_price)
                        )
                    })
                    .collect();
                tracing::info!(
                    target: "email",
                    to = %email,
                    order_id = order.order_id,
                    message_id = %envelope.message_id,
                    "FAKE E-MAIL to {name} <{email}>: Subject: Your order #{} is complete. Items: [{}]. Total: {}.",
                    order.order_id,
                    items.join("; "),
                    money(order.total)
                );
            }
            outcomes.push(HandlerOutcome::Done);
        }
        Ok(outcomes)
    }
}
