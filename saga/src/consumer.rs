//! A consumer: takes deliveries from a queue, decodes the envelope, runs a
//! handler with retries and backoff, and settles the delivery. A message that
//! cannot be decoded, or that keeps failing, goes to the queue's error queue;
//! the consumer carries on.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::error::{SagaError, TransportError};
use crate::message::Envelope;
use crate::transport::{Delivery, QueueSpec, Transport};

/// What a handler did with a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerOutcome {
    /// Effects committed.
    Done,
    /// Already handled before (inbox hit): nothing done.
    Duplicate,
}

#[async_trait]
pub trait MessageHandler: Send + Sync + 'static {
    async fn handle(&self, envelope: &Envelope) -> Result<HandlerOutcome, SagaError>;
}

/// What became of one delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsumeOutcome {
    Handled { attempts: u32 },
    Duplicate,
    DeadLettered { reason: String, attempts: u32 },
}

/// Retry schedule: `initial_backoff * 2^(attempt-1)`, capped, with jitter
/// supplied by the caller (so the schedule itself is deterministic).
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1`; `jitter` in `[0, 1)` adds up to half again.
    pub fn delay_after(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(16)));
        let base = exp.min(self.max_backoff);
        base + base.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }
}

pub struct Consumer<H: MessageHandler> {
    transport: Arc<dyn Transport>,
    queue: QueueSpec,
    name: String,
    handler: Arc<H>,
    retry: RetryPolicy,
    prefetch: u16,
}

impl<H: MessageHandler> Consumer<H> {
    pub fn new(
        transport: Arc<dyn Transport>,
        queue: QueueSpec,
        name: impl Into<String>,
        handler: Arc<H>,
        retry: RetryPolicy,
        prefetch: u16,
    ) -> Self {
        Self {
            transport,
            queue,
            name: name.into(),
            handler,
            retry,
            prefetch: prefetch.max(1),
        }
    }

    /// Handles one delivery to the end and settles it with the broker.
    pub async fn process(&self, delivery: Delivery) -> Result<ConsumeOutcome, TransportError> {
        let envelope = match Envelope::decode(&delivery.body) {
            Ok(envelope) => envelope,
            Err(e) => {
                let reason = format!("undecodable message: {e}");
                return self.dead_letter(delivery, reason, 0, None).await;
            }
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.handler.handle(&envelope).await {
                Ok(HandlerOutcome::Done) => {
                    delivery.acker.ack().await?;
                    return Ok(ConsumeOutcome::Handled { attempts: attempt });
                }
                Ok(HandlerOutcome::Duplicate) => {
                    tracing::info!(
                        consumer = %self.name,
                        message_id = %envelope.message_id,
                        order_id = %envelope.correlation_id,
                        "duplicate message skipped"
                    );
                    delivery.acker.ack().await?;
                    return Ok(ConsumeOutcome::Duplicate);
                }
                Err(e) if e.is_retryable() && attempt < self.retry.max_attempts => {
                    let delay = self.retry.delay_after(attempt, rand::random::<f64>());
                    tracing::warn!(
                        consumer = %self.name,
                        message_id = %envelope.message_id,
                        order_id = %envelope.correlation_id,
                        attempt,
                        error = %e,
                        "handler failed; retrying in {delay:?}"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    let reason = format!("{e}");
                    return self
                        .dead_letter(delivery, reason, attempt, Some(&envelope))
                        .await;
                }
            }
        }
    }

    async fn dead_letter(
        &self,
        delivery: Delivery,
        reason: String,
        attempts: u32,
        envelope: Option<&Envelope>,
    ) -> Result<ConsumeOutcome, TransportError> {
        tracing::error!(
            consumer = %self.name,
            message_id = envelope.map(|e| e.message_id.to_string()).or(delivery.message_id.clone()),
            order_id = envelope.map(|e| e.correlation_id.clone()),
            attempts,
            error = %reason,
            "message moved to the error queue {}",
            self.queue.error_queue()
        );
        self.transport
            .dead_letter(&self.queue, &delivery, &reason, attempts)
            .await?;
        delivery.acker.ack().await?;
        Ok(ConsumeOutcome::DeadLettered { reason, attempts })
    }

    /// Consumes until `shutdown` is cancelled (returns `Ok`) or the
    /// subscription fails or ends (returns the error). In-flight handlers
    /// finish before this returns.
    pub async fn run_until_stopped(
        &self,
        shutdown: CancellationToken,
    ) -> Result<(), TransportError> {
        let stream = self
            .transport
            .subscribe(&self.queue, &self.name, self.prefetch)
            .await?;
        tracing::info!(consumer = %self.name, queue = %self.queue.name, "consuming");
        let stopped = shutdown.clone();
        stream
            .take_until(async move { stopped.cancelled().await })
            .for_each_concurrent(usize::from(self.prefetch), |item| async move {
                match item {
                    Ok(delivery) => {
                        if let Err(e) = self.process(delivery).await {
                            tracing::error!(consumer = %self.name, error = %e, "could not settle a delivery");
                        }
                    }
                    Err(e) => {
                        tracing::error!(consumer = %self.name, error = %e, "consumer stream error");
                    }
                }
            })
            .await;
        if shutdown.is_cancelled() {
            Ok(())
        } else {
            Err(TransportError::StreamEnded)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_caps() {
        let policy = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        };
        assert_eq!(policy.delay_after(1, 0.0), Duration::from_millis(100));
        assert_eq!(policy.delay_after(2, 0.0), Duration::from_millis(200));
        assert_eq!(policy.delay_after(3, 0.0), Duration::from_millis(350));
        assert_eq!(policy.delay_after(2, 1.0), Duration::from_millis(300));
    }
}
