//! Notification consumers: an audit row per order event, and a fake e-mail
//! (a log line) when an order completes. Exactly once per (order, event):
//! the inbox skips redelivered messages and the unique (order_id, event_type)
//! key stops a second row even if two different messages claim the same event.

use std::sync::Arc;

use async_trait::async_trait;
use entity::{notifications, users};
use saga::SagaError;
use saga::clock::Clock;
use saga::consumer::{HandlerOutcome, MessageHandler};
use saga::inbox;
use saga::message::Envelope;
use saga::retry::Attempts;
use sea_orm::sea_query::{OnConflict, Query};
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, TransactionTrait};

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
        let event = OrderEvent::from_message_type(&envelope.message_type).ok_or_else(|| {
            SagaError::Malformed(format!("unknown message type `{}`", envelope.message_type))
        })?;
        let payload = envelope
            .payload_as::<OrderEventPayload>()
            .map_err(|e| SagaError::Malformed(format!("{} payload: {e}", envelope.message_type)))?;
        let now = self.clock.now();
        let message = audit_message(event, &payload);
        let email_sent = event == OrderEvent::OrderCompleted;
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

        let txn = self.db.begin().await?;
        if !inbox::record(&txn, &self.consumer, envelope, now).await? {
            txn.rollback().await?;
            return Ok(HandlerOutcome::Duplicate);
        }
        use notifications::Column as N;
        let mut insert = Query::insert();
        insert
            .into_table(notifications::Entity)
            .columns([
                N::OrderId,
                N::UserId,
                N::EventType,
                N::Message,
                N::IsEmailSent,
                N::CreatedAt,
                N::Metadata,
            ])
            .values([
                payload.order.order_id.into(),
                payload.order.user_id.into(),
                saga::SagaEvent::message_type(&event).into(),
                message.clone().into(),
                email_sent.into(),
                now.into(),
                metadata.into(),
            ])
            .map_err(|e| SagaError::Corrupt(e.to_string()))?
            .on_conflict(
                OnConflict::columns([N::OrderId, N::EventType])
                    .do_nothing()
                    .to_owned(),
            );
        let inserted = txn.execute(&insert).await?.rows_affected() == 1;
        let recipient = if email_sent && inserted {
            users::Entity::find_by_id(payload.order.user_id)
                .one(&txn)
                .await?
                .map(|u| (u.name, u.email))
        } else {
            None
        };
        txn.commit().await?;

        if !inserted {
            tracing::info!(
                order_id = payload.order.order_id,
                message_id = %envelope.message_id,
                event = saga::SagaEvent::message_type(&event),
                "notification already recorded for this order and event; skipped"
            );
            return Ok(HandlerOutcome::Duplicate);
        }
        tracing::info!(
            order_id = payload.order.order_id,
            message_id = %envelope.message_id,
            event = saga::SagaEvent::message_type(&event),
            "audit notification saved: {message}"
        );
        if let Some((name, email)) = recipient {
            let items: Vec<String> = payload
                .order
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
                order_id = payload.order.order_id,
                message_id = %envelope.message_id,
                "FAKE E-MAIL to {name} <{email}>: Subject: Your order #{} is complete. Items: [{}]. Total: {}.",
                payload.order.order_id,
                items.join("; "),
                money(payload.order.total)
            );
        }
        Ok(HandlerOutcome::Done)
    }
}
