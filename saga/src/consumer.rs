//! A consumer: takes deliveries from a queue, decodes the envelope, runs a
//! handler with retries and backoff, and settles the delivery. A message that
//! cannot be decoded, or that keeps failing, goes to the queue's error queue;
//! the consumer carries on.

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::definition::Saga;
use crate::engine::{Handled, Incoming, SagaEngine};
use crate::error::{SagaError, TransportError};
use crate::message::Envelope;
use crate::metrics::{self as saga_metrics, ConsumeResult};
use crate::retry::Attempts;
pub use crate::retry::RetryPolicy;
use crate::trace;
use crate::transport::status::ConsumerRegistry;
use crate::transport::{Acknowledger, Delivery, QueueSpec, Transport};

/// What a handler did with a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerOutcome {
    /// Effects committed.
    Done,
    /// Already handled before (inbox hit): nothing done.
    Duplicate,
}

/// What a consumer runs for each decoded message.
#[async_trait]
pub trait MessageHandler: Send + Sync + 'static {
    /// Handles `envelope` exactly once (the inbox row is written in the same
    /// transaction as the effects). Each call must load whatever state it
    /// needs afresh: a retry never reuses a failed attempt's state.
    async fn handle(&self, envelope: &Envelope) -> Result<HandlerOutcome, SagaError>;

    /// Persists one failed attempt of `envelope` (with the saga instance, or
    /// per message) and says whether the retry budget is now spent. When it
    /// is, the handler has parked whatever it must; the consumer then moves
    /// the message to the error queue.
    async fn record_failure(
        &self,
        envelope: &Envelope,
        error: &SagaError,
    ) -> Result<Attempts, SagaError>;

    /// Whether [`MessageHandler::handle_batch`] is implemented: the consumer
    /// then hands it every batch of ready deliveries.
    fn batches(&self) -> bool {
        false
    }

    /// Handles a batch of messages in ONE transaction, all or nothing, and
    /// returns one outcome per message in order. On an error nothing was
    /// done: the consumer handles the messages one at a time
    /// ([`MessageHandler::handle`]), so a failing one is retried alone.
    async fn handle_batch(&self, batch: &[Incoming<'_>]) -> Result<Vec<HandlerOutcome>, SagaError> {
        Err(SagaError::Corrupt(format!(
            "this handler takes messages one at a time ({} given)",
            batch.len()
        )))
    }

    /// The message types this handler takes; metrics label these by name
    /// and everything else `other` (message types come from the wire; the
    /// label set must stay bounded).
    fn message_types(&self) -> &'static [&'static str] {
        &[]
    }
}

/// What became of one delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsumeOutcome {
    /// Handled and acknowledged, after `attempts` tries in this delivery.
    Handled {
        /// Tries in this delivery (1 unless it was retried).
        attempts: u32,
    },
    /// Already handled before: acknowledged and skipped.
    Duplicate,
    /// Moved to the error queue (undecodable, not retryable, or budget spent).
    DeadLettered {
        /// The `x-error-reason` header.
        reason: String,
        /// The `x-attempts` header.
        attempts: u32,
    },
    /// Shutdown came while the message waited for a retry: it went back to
    /// the queue unacknowledged, for this or another runner.
    HandedBack,
}

/// Consumes one queue with a [`MessageHandler`]: decode, handle with a persisted retry budget, settle (ack, dead-letter or hand back).
pub struct Consumer<H: MessageHandler + ?Sized> {
    transport: Arc<dyn Transport>,
    queue: QueueSpec,
    name: String,
    handler: Arc<H>,
    retry: RetryPolicy,
    prefetch: u16,
    batch_size: usize,
    status: Option<ConsumerRegistry>,
}

impl<H: MessageHandler + ?Sized> Consumer<H> {
    /// A consumer of `queue`, recording its inbox rows as `name`, with at most `prefetch` messages in flight.
    pub fn new(
        transport: Arc<dyn Transport>,
        queue: QueueSpec,
        name: impl Into<String>,
        handler: Arc<H>,
        retry: RetryPolicy,
        prefetch: u16,
    ) -> Self {
        let status = transport.consumer_status();
        Self {
            transport,
            queue,
            name: name.into(),
            handler,
            retry,
            prefetch: prefetch.max(1),
            batch_size: 1,
            status,
        }
    }

    /// Handles up to `batch_size` ready deliveries in one transaction when
    /// the handler takes batches ([`MessageHandler::batches`]); the
    /// deliveries are acknowledged after the commit. `prefetch /
    /// batch_size` batches run at once. 1 (the default): one at a time,
    /// `prefetch` at once.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Handles one delivery to the end and settles it with the broker.
    pub async fn process(&self, delivery: Delivery) -> Result<ConsumeOutcome, TransportError> {
        self.process_until(delivery, &CancellationToken::new())
            .await
    }

    /// Like [`Self::process`], but a retry backoff is cut short by `shutdown`:
    /// the delivery is then handed back to the queue.
    ///
    /// Failed attempts are counted by the handler in the database (so every
    /// runner and restart share one budget). When the budget cannot even be
    /// written (the database is unreachable), nothing is spent: the handler
    /// is retried with backoff until the database returns.
    ///
    /// The whole of it (decode, handle, commit, settle) runs in a
    /// `message.handle` span with the message and correlation ids,
    /// continuing the trace in the message's `traceparent` header.
    pub async fn process_until(
        &self,
        delivery: Delivery,
        shutdown: &CancellationToken,
    ) -> Result<ConsumeOutcome, TransportError> {
        // Readiness sees the delivery as held until it is settled; metrics
        // count the outcome and the time it took.
        let _held = self
            .status
            .as_ref()
            .map(|s| s.taken(&self.name, std::time::Instant::now()));
        let started = std::time::Instant::now();
        let message_type = saga_metrics::message_type_label(
            self.handler.message_types(),
            delivery.message_type.as_deref(),
        );
        let outcome = self.settle(delivery, shutdown).await;
        if let Ok(outcome) = &outcome {
            let result = match outcome {
                ConsumeOutcome::Handled { .. } => ConsumeResult::Ok,
                ConsumeOutcome::Duplicate => ConsumeResult::Duplicate,
                ConsumeOutcome::DeadLettered { .. } => ConsumeResult::DeadLettered,
                ConsumeOutcome::HandedBack => ConsumeResult::HandedBack,
            };
            saga_metrics::consumed(&self.name, message_type, result);
        }
        saga_metrics::handler_duration(&self.name, message_type, started.elapsed().as_secs_f64());
        outcome
    }

    /// Runs the delivery in a `message.handle` span that continues the
    /// message's trace.
    async fn settle(
        &self,
        delivery: Delivery,
        shutdown: &CancellationToken,
    ) -> Result<ConsumeOutcome, TransportError> {
        let span = self.span_for(&delivery);
        self.process_in_span(delivery, shutdown)
            .instrument(span)
            .await
    }

    /// The `message.handle` span of a delivery, continuing its trace.
    fn span_for(&self, delivery: &Delivery) -> tracing::Span {
        let span = tracing::info_span!(
            "message.handle",
            consumer = %self.name,
            message_type = delivery.message_type.as_deref().unwrap_or(""),
            message_id = delivery.message_id.as_deref().unwrap_or(""),
            correlation_id = tracing::field::Empty,
            redelivered = delivery.redelivered,
            trace_id = tracing::field::Empty,
            otel.kind = "consumer",
        );
        trace::continue_trace(&span, delivery.trace.as_ref());
        span
    }

    /// Handles ready deliveries as one batch (one transaction) and
    /// acknowledges them after its commit. An undecodable delivery is
    /// dead-lettered alone; if the batch fails, its deliveries are handled
    /// one at a time ([`Self::process_until`]), so a poison message is
    /// retried and dead-lettered alone while the others go through.
    pub async fn process_batch(&self, deliveries: Vec<Delivery>, shutdown: &CancellationToken) {
        if deliveries.len() < 2 || !self.handler.batches() {
            for delivery in deliveries {
                if let Err(e) = self.process_until(delivery, shutdown).await {
                    tracing::error!(consumer = %self.name, error = %e, "could not settle a delivery");
                }
            }
            return;
        }
        let started = std::time::Instant::now();
        let mut batch = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match Envelope::decode(&delivery.body) {
                Ok(envelope) => {
                    let span = self.span_for(&delivery);
                    span.record("message_type", envelope.message_type.as_str());
                    span.record("message_id", tracing::field::display(envelope.message_id));
                    span.record("correlation_id", envelope.correlation_id.as_str());
                    let held = self
                        .status
                        .as_ref()
                        .map(|s| s.taken(&self.name, std::time::Instant::now()));
                    batch.push((delivery, envelope, span, held));
                }
                // Dead-lettered alone.
                Err(_) => {
                    if let Err(e) = self.process_until(delivery, shutdown).await {
                        tracing::error!(consumer = %self.name, error = %e, "could not settle a delivery");
                    }
                }
            }
        }
        let incoming: Vec<Incoming<'_>> = batch
            .iter()
            .map(|(_, envelope, span, _)| Incoming { envelope, span })
            .collect();
        let handled = self.handler.handle_batch(&incoming).await;
        drop(incoming);
        let outcomes = match handled {
            Ok(outcomes) if outcomes.len() == batch.len() => outcomes,
            other => {
                let error = match other {
                    Err(e) => e.to_string(),
                    Ok(o) => format!("{} outcomes for {} messages", o.len(), batch.len()),
                };
                saga_metrics::batch(&self.name, batch.len(), false);
                tracing::info!(
                    consumer = %self.name,
                    size = batch.len(),
                    error = %error,
                    "batch rolled back; handling its messages one at a time"
                );
                for (delivery, _, _, held) in batch {
                    drop(held);
                    if let Err(e) = self.process_until(delivery, shutdown).await {
                        tracing::error!(consumer = %self.name, error = %e, "could not settle a delivery");
                    }
                }
                return;
            }
        };
        saga_metrics::batch(&self.name, batch.len(), true);
        let seconds = started.elapsed().as_secs_f64();
        // Acknowledged after the commit, together (one frame where the
        // transport can): a crash before this redelivers and the inbox makes
        // that a duplicate.
        let ackers: Vec<&dyn Acknowledger> = batch
            .iter()
            .map(|(delivery, ..)| delivery.acker.as_ref())
            .collect();
        let acks = match ackers.first() {
            Some(first) => first.ack_batch(&ackers).await,
            None => Vec::new(),
        };
        drop(ackers);
        for (((_delivery, envelope, span, held), outcome), acked) in
            batch.into_iter().zip(outcomes).zip(acks)
        {
            let message_type = saga_metrics::message_type_label(
                self.handler.message_types(),
                Some(&envelope.message_type),
            );
            let _entered = span.enter();
            if outcome == HandlerOutcome::Duplicate {
                tracing::info!(
                    consumer = %self.name,
                    message_id = %envelope.message_id,
                    correlation_id = %envelope.correlation_id,
                    "duplicate message skipped"
                );
            }
            match acked {
                Ok(()) => {
                    let result = match outcome {
                        HandlerOutcome::Done => ConsumeResult::Ok,
                        HandlerOutcome::Duplicate => ConsumeResult::Duplicate,
                    };
                    saga_metrics::consumed(&self.name, message_type, result);
                }
                Err(e) => {
                    tracing::error!(consumer = %self.name, error = %e, "could not acknowledge a delivery")
                }
            }
            saga_metrics::handler_duration(&self.name, message_type, seconds);
            drop(held);
        }
    }

    async fn process_in_span(
        &self,
        delivery: Delivery,
        shutdown: &CancellationToken,
    ) -> Result<ConsumeOutcome, TransportError> {
        let envelope = match Envelope::decode(&delivery.body) {
            Ok(envelope) => envelope,
            Err(e) => {
                let reason = format!("undecodable message: {e}");
                return self.dead_letter(delivery, reason, 0, None).await;
            }
        };
        let span = tracing::Span::current();
        span.record("message_type", envelope.message_type.as_str());
        span.record("message_id", tracing::field::display(envelope.message_id));
        span.record("correlation_id", envelope.correlation_id.as_str());
        let mut tries: u32 = 0;
        let mut unrecorded: u32 = 0;
        loop {
            tries += 1;
            let error = match self.handler.handle(&envelope).await {
                Ok(HandlerOutcome::Done) => {
                    delivery.acker.ack().await?;
                    return Ok(ConsumeOutcome::Handled { attempts: tries });
                }
                Ok(HandlerOutcome::Duplicate) => {
                    tracing::info!(
                        consumer = %self.name,
                        message_id = %envelope.message_id,
                        correlation_id = %envelope.correlation_id,
                        "duplicate message skipped"
                    );
                    delivery.acker.ack().await?;
                    return Ok(ConsumeOutcome::Duplicate);
                }
                Err(SagaError::Malformed(reason)) => {
                    // A message of a type this consumer does not handle, or
                    // with a payload it cannot read: no retry can fix it, and
                    // it says nothing trustworthy about any saga instance.
                    let reason = format!("malformed message: {reason}");
                    return self
                        .dead_letter(delivery, reason, tries, Some(&envelope))
                        .await;
                }
                Err(e) => e,
            };
            let delay = match self.handler.record_failure(&envelope, &error).await {
                Ok(attempts) if attempts.exhausted => {
                    let spent = u32::try_from(attempts.spent).unwrap_or(0);
                    return self
                        .dead_letter(delivery, error.to_string(), spent, Some(&envelope))
                        .await;
                }
                Ok(attempts) => {
                    unrecorded = 0;
                    let spent = u32::try_from(attempts.spent).unwrap_or(1);
                    self.retry.delay_after(spent, rand::random::<f64>())
                }
                Err(record_error) if record_error.is_retryable() => {
                    unrecorded += 1;
                    let delay = self.retry.delay_after(unrecorded, rand::random::<f64>());
                    tracing::warn!(
                        consumer = %self.name,
                        message_id = %envelope.message_id,
                        correlation_id = %envelope.correlation_id,
                        error = %error,
                        record_error = %record_error,
                        "handler failed and the failure could not be recorded \
                         (database unavailable?); retrying in {delay:?} without spending the budget"
                    );
                    delay
                }
                Err(record_error) => {
                    // No instance to keep a budget on (e.g. it does not exist):
                    // nothing a retry could fix.
                    let reason = format!("{error} ({record_error})");
                    return self
                        .dead_letter(delivery, reason, tries, Some(&envelope))
                        .await;
                }
            };
            saga_metrics::consumed(
                &self.name,
                saga_metrics::message_type_label(
                    self.handler.message_types(),
                    Some(&envelope.message_type),
                ),
                ConsumeResult::Retried,
            );
            tokio::select! {
                _ = shutdown.cancelled() => {
                    delivery.acker.requeue().await?;
                    tracing::info!(
                        consumer = %self.name,
                        message_id = %envelope.message_id,
                        correlation_id = %envelope.correlation_id,
                        "shutting down: message handed back to the queue"
                    );
                    return Ok(ConsumeOutcome::HandedBack);
                }
                _ = tokio::time::sleep(delay) => {}
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
            correlation_id = envelope.map(|e| e.correlation_id.clone()),
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
        let shutdown = &shutdown;
        let items = stream.take_until(async move { stopped.cancelled().await });
        if self.batch_size > 1 && self.handler.batches() {
            let concurrency = (usize::from(self.prefetch) / self.batch_size).max(1);
            items
                .ready_chunks(self.batch_size)
                .for_each_concurrent(concurrency, |chunk| async move {
                    let mut deliveries = Vec::with_capacity(chunk.len());
                    for item in chunk {
                        match item {
                            Ok(delivery) => deliveries.push(delivery),
                            Err(e) => {
                                tracing::error!(consumer = %self.name, error = %e, "consumer stream error");
                            }
                        }
                    }
                    self.process_batch(deliveries, shutdown).await;
                })
                .await;
            return if shutdown.is_cancelled() {
                Ok(())
            } else {
                Err(TransportError::StreamEnded)
            };
        }
        items
            .for_each_concurrent(usize::from(self.prefetch), |item| async move {
                match item {
                    Ok(delivery) => {
                        if let Err(e) = self.process_until(delivery, shutdown).await {
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

/// The consumer of a saga's queue: every message goes through
/// [`SagaEngine::handle`] (inbox, routing, one transaction). A failure is
/// counted against the instance's persisted budget, or against the message
/// when there is no instance yet (a failing start).
pub struct SagaHandler<S: Saga> {
    engine: SagaEngine<S>,
    consumer: String,
}

impl<S: Saga> SagaHandler<S> {
    /// A handler recording its inbox rows as `consumer`.
    pub fn new(engine: SagaEngine<S>, consumer: impl Into<String>) -> Self {
        Self {
            engine,
            consumer: consumer.into(),
        }
    }
}

#[async_trait]
impl<S: Saga> MessageHandler for SagaHandler<S> {
    async fn handle(&self, envelope: &Envelope) -> Result<HandlerOutcome, SagaError> {
        match self.engine.handle(&self.consumer, envelope).await? {
            Handled::Duplicate => Ok(HandlerOutcome::Duplicate),
            _ => Ok(HandlerOutcome::Done),
        }
    }

    fn batches(&self) -> bool {
        true
    }

    async fn handle_batch(&self, batch: &[Incoming<'_>]) -> Result<Vec<HandlerOutcome>, SagaError> {
        Ok(self
            .engine
            .handle_batch(&self.consumer, batch)
            .await?
            .into_iter()
            .map(|h| match h {
                Handled::Duplicate => HandlerOutcome::Duplicate,
                _ => HandlerOutcome::Done,
            })
            .collect())
    }

    async fn record_failure(
        &self,
        envelope: &Envelope,
        error: &SagaError,
    ) -> Result<Attempts, SagaError> {
        match self
            .engine
            .record_failure(
                &envelope.correlation_id,
                Some(envelope.message_id),
                &envelope.message_type,
                error,
            )
            .await
        {
            // No instance yet (a start that failed): the budget is the message's.
            Err(SagaError::UnknownInstance { .. }) if error.is_retryable() => {
                crate::failures::record(
                    self.engine.db(),
                    &self.consumer,
                    envelope,
                    error,
                    self.engine.settings().retry.max_attempts,
                    self.engine.clock().now(),
                )
                .await
            }
            other => other,
        }
    }

    fn message_types(&self) -> &'static [&'static str] {
        S::CONSUMES
    }
}
