//! One subscription: a consumer-group member that hands out at most
//! `prefetch` deliveries at a time and commits an offset only when every
//! delivery below it has been acknowledged (see `offsets.rs`).
//!
//! The member is polled by one task all the time. When `prefetch`
//! deliveries are out for more than [`PAUSE_AFTER`] it pauses its
//! partitions and goes on polling (so rebalances and `max.poll.interval.ms`
//! are served however long the handlers take) and resumes when one is
//! settled. When the stream is
//! dropped it pauses, waits for the deliveries still out to be settled, and
//! only then closes the member (which leaves the group): a graceful
//! shutdown's last acknowledgements still commit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::stream::{BoxStream, StreamExt};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::offsets::{OffsetTracker, Settled, Ticket};
use super::{
    HEADER_MESSAGE_ID, HEADER_MESSAGE_TYPE, HEADER_ROUTING_KEY, Inner, LiveGuard,
    LiveSubscriptions, blocking, broker_error, client_error, group_id, header_text, log_line,
    trace_from,
};
use crate::error::TransportError;
use crate::transport::status::ConsumerRegistry;
use crate::transport::{Acknowledger, Delivery, QueueSpec};

type Member = StreamConsumer<GroupContext>;

/// How long a full subscription waits for a settlement before it pauses
/// its partitions (and polls them paused).
const PAUSE_AFTER: Duration = Duration::from_millis(500);

fn lock(tracker: &Mutex<OffsetTracker>) -> MutexGuard<'_, OffsetTracker> {
    // Plain maps: a panic elsewhere cannot leave them worth refusing to read.
    tracker
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The member's callbacks: rebalances update the offset tracker and the
/// consumer registry; librdkafka's logs, errors and group state go to
/// `tracing` and the registry.
pub(super) struct GroupContext {
    consumer_tag: String,
    registry: ConsumerRegistry,
    tracker: Arc<Mutex<OffsetTracker>>,
    /// `prefetch` deliveries are out: partitions assigned now start paused.
    full: AtomicBool,
    /// Marked lost for a reason the group state clears (not a revocation
    /// in progress).
    lost: AtomicBool,
    /// Between subscribing (or a revocation) and the next assignment: a
    /// group join is in progress. See [`Subscription::close`].
    joining: AtomicBool,
}

impl GroupContext {
    fn lost(&self, reason: String) {
        self.lost.store(true, Ordering::Relaxed);
        self.registry
            .lost(&self.consumer_tag, reason, Instant::now());
    }

    fn registered(&self) {
        self.lost.store(false, Ordering::Relaxed);
        self.registry.registered(&self.consumer_tag, Instant::now());
    }
}

/// The part of librdkafka's statistics that says whether the member is in
/// its group.
#[derive(Deserialize)]
struct Stats {
    cgrp: Option<GroupStats>,
}

#[derive(Deserialize)]
struct GroupStats {
    state: String,
    join_state: String,
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(Some(&self.consumer_tag), &error, reason);
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.lost(format!("no broker reachable: {reason}"));
        }
    }

    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(Stats { cgrp: Some(group) }) = serde_json::from_slice::<Stats>(statistics) else {
            return;
        };
        let joined = group.state == "up" && group.join_state == "steady";
        let was_lost = self.lost.load(Ordering::Relaxed);
        if joined && was_lost {
            tracing::info!(consumer = %self.consumer_tag, "back in the consumer group");
            self.registered();
        } else if group.state != "up" && !was_lost {
            self.lost(format!(
                "group coordinator not reachable (state {})",
                group.state
            ));
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                let mut tracker = lock(&self.tracker);
                for p in partitions.elements() {
                    tracker.revoked(p.topic(), p.partition());
                }
                drop(tracker);
                tracing::info!(
                    consumer = %self.consumer_tag,
                    partitions = partitions.count(),
                    "partitions revoked (rebalance); their unsettled deliveries are forgotten"
                );
                // Not `self.lost`: the next assignment, not the group state,
                // ends this.
                self.lost.store(false, Ordering::Relaxed);
                self.joining.store(true, Ordering::Relaxed);
                self.registry.lost(
                    &self.consumer_tag,
                    "rebalancing: partitions revoked",
                    Instant::now(),
                );
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(consumer = %self.consumer_tag, error = %e, "rebalance failed");
                self.lost(format!("rebalance failed: {e}"));
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            let mut tracker = lock(&self.tracker);
            for p in partitions.elements() {
                tracker.assigned(p.topic(), p.partition());
            }
            drop(tracker);
            // A pause is kept per partition across assignments: set it to
            // what the member needs now.
            let paused = if self.full.load(Ordering::Relaxed) {
                consumer.pause(partitions)
            } else {
                consumer.resume(partitions)
            };
            if let Err(e) = paused {
                tracing::warn!(consumer = %self.consumer_tag, error = %e, "cannot pause or resume assigned partitions");
            }
            let assigned: Vec<String> = partitions
                .elements()
                .iter()
                .map(|p| format!("{}[{}]", p.topic(), p.partition()))
                .collect();
            tracing::info!(consumer = %self.consumer_tag, partitions = ?assigned, "partitions assigned");
            self.joining.store(false, Ordering::Relaxed);
            self.registered();
        }
    }
}

/// What acknowledgers share: where to commit and the bookkeeping.
struct Committer {
    member: Weak<Member>,
    tracker: Arc<Mutex<OffsetTracker>>,
    /// One commit at a time, so positions only move forward; settlements
    /// waiting here find their offset already committed by the one before.
    commits: tokio::sync::Mutex<()>,
    consumer_tag: String,
    timeout: Duration,
}

impl Committer {
    async fn ack(&self, ticket: &Ticket) -> Result<(), TransportError> {
        if lock(&self.tracker).acked(ticket) == Settled::Revoked {
            return Err(self.revoked(ticket));
        }
        let _one_at_a_time = self.commits.lock().await;
        let position = match lock(&self.tracker).next_commit(ticket) {
            Settled::Commit(position) => position,
            Settled::Nothing => return Ok(()),
            Settled::Revoked => return Err(self.revoked(ticket)),
        };
        let committed = self.commit(ticket, position).await;
        if committed.is_err() {
            lock(&self.tracker).commit_failed(ticket, position);
        }
        committed
    }

    async fn commit(&self, ticket: &Ticket, position: i64) -> Result<(), TransportError> {
        let Some(member) = self.member.upgrade() else {
            return Err(TransportError::Broker(format!(
                "{}: the subscription was closed before the ack; the message will be delivered again",
                self.consumer_tag
            )));
        };
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(&ticket.topic, ticket.partition, Offset::Offset(position))
            .map_err(|e| broker_error("commit", e))?;
        let what = format!("commit {}[{}]@{position}", ticket.topic, ticket.partition);
        let commit = blocking("commit", move || {
            member
                .commit(&offsets, CommitMode::Sync)
                .map_err(|e| broker_error(what, e))
        });
        match tokio::time::timeout(self.timeout, commit).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Broker(format!(
                "commit {}[{}]@{position}: no answer within {} ms",
                ticket.topic,
                ticket.partition,
                self.timeout.as_millis()
            ))),
        }
    }

    fn revoked(&self, ticket: &Ticket) -> TransportError {
        TransportError::Broker(format!(
            "{}: partition {}[{}] was revoked before offset {} was acknowledged; \
             its new owner delivers it again",
            self.consumer_tag, ticket.topic, ticket.partition, ticket.offset
        ))
    }
}

/// Settles one delivery. Holds one of the subscription's `prefetch`
/// permits until settled or dropped.
struct KafkaAcker {
    ticket: Ticket,
    committer: Arc<Committer>,
    settled: AtomicBool,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl KafkaAcker {
    fn release(&self) {
        if let Ok(mut permit) = self.permit.lock() {
            permit.take();
        }
    }
}

#[async_trait]
impl Acknowledger for KafkaAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        if self.settled.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let result = self.committer.ack(&self.ticket).await;
        // Released after the commit: the subscription closes its member only
        // when every permit is back.
        self.release();
        result
    }

    async fn requeue(&self) -> Result<(), TransportError> {
        if self.settled.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        tracing::debug!(
            consumer = %self.committer.consumer_tag,
            topic = %self.ticket.topic,
            partition = self.ticket.partition,
            offset = self.ticket.offset,
            "delivery handed back: not committed; delivered again after a restart or rebalance"
        );
        self.release();
        Ok(())
    }
}

impl Drop for KafkaAcker {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Acquire) {
            tracing::debug!(
                consumer = %self.committer.consumer_tag,
                topic = %self.ticket.topic,
                partition = self.ticket.partition,
                offset = self.ticket.offset,
                "delivery dropped unsettled: not committed"
            );
        }
    }
}

/// Everything the consuming task needs.
struct Subscription {
    inner: Arc<Inner>,
    group: String,
    topics: Vec<String>,
    consumer_tag: String,
    prefetch: u32,
    permits: Arc<Semaphore>,
    sender: mpsc::Sender<Result<Delivery, TransportError>>,
}

/// A member with its callbacks and its committer.
struct Instance {
    member: Arc<Member>,
    context: Arc<GroupContext>,
    committer: Arc<Committer>,
}

impl Subscription {
    fn create(&self) -> Result<Instance, TransportError> {
        let context = GroupContext {
            consumer_tag: self.consumer_tag.clone(),
            registry: self.inner.consumers.clone(),
            tracker: Arc::new(Mutex::new(OffsetTracker::default())),
            full: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            joining: AtomicBool::new(true),
        };
        let tracker = context.tracker.clone();
        let member: Member = self
            .inner
            .settings
            .consumer_config(&self.group, &self.consumer_tag)
            .create_with_context(context)
            .map_err(|e| broker_error("cannot create the Kafka consumer", e))?;
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        member
            .subscribe(&topics)
            .map_err(|e| broker_error(format!("cannot subscribe to {topics:?}"), e))?;
        let member = Arc::new(member);
        let context = member.context().clone();
        context.lost("joining the consumer group".to_owned());
        let committer = Arc::new(Committer {
            member: Arc::downgrade(&member),
            tracker,
            commits: tokio::sync::Mutex::new(()),
            consumer_tag: self.consumer_tag.clone(),
            timeout: self.inner.settings.operation_timeout,
        });
        Ok(Instance {
            member,
            context,
            committer,
        })
    }

    /// Hands out one message with its permit. `false` when nobody takes
    /// deliveries any more.
    async fn hand_out(
        &self,
        instance: &Instance,
        message: OwnedMessage,
        permit: OwnedSemaphorePermit,
    ) -> bool {
        let received = lock(&instance.committer.tracker).received(
            message.topic(),
            message.partition(),
            message.offset(),
        );
        let Some((ticket, redelivered)) = received else {
            // Fetched before its partition was revoked: its owner reads it.
            return true;
        };
        let headers = message.headers();
        let routing_key = header_text(headers, HEADER_ROUTING_KEY).unwrap_or_else(|| {
            let prefix = format!("{}.", self.inner.settings.topic_prefix);
            message
                .topic()
                .strip_prefix(&prefix)
                .unwrap_or(message.topic())
                .to_owned()
        });
        let delivery = Delivery {
            body: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            routing_key,
            message_id: header_text(headers, HEADER_MESSAGE_ID),
            message_type: header_text(headers, HEADER_MESSAGE_TYPE),
            redelivered,
            trace: trace_from(headers),
            acker: Box::new(KafkaAcker {
                ticket,
                committer: instance.committer.clone(),
                settled: AtomicBool::new(false),
                permit: Mutex::new(Some(permit)),
            }),
        };
        self.sender.send(Ok(delivery)).await.is_ok()
    }

    fn pause(&self, instance: &Instance, pause: bool) {
        instance.context.full.store(pause, Ordering::Relaxed);
        let result = instance.member.assignment().and_then(|assigned| {
            if pause {
                instance.member.pause(&assigned)
            } else {
                instance.member.resume(&assigned)
            }
        });
        if let Err(e) = result {
            tracing::warn!(consumer = %self.consumer_tag, error = %e, pause, "cannot pause or resume partitions");
        }
    }

    /// What a consumption error means. `Err` when the member must be
    /// created anew.
    async fn failed(&self, instance: &Instance, error: KafkaError) -> Result<(), String> {
        if let Some((code, reason)) = instance.member.client().fatal_error() {
            return Err(format!("fatal consumer error {code}: {reason}"));
        }
        match error {
            KafkaError::PartitionEOF(_) => {}
            KafkaError::MessageConsumptionFatal(code) => {
                return Err(format!("fatal consumer error {code}"));
            }
            KafkaError::MessageConsumption(
                RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic,
            ) => {
                tracing::warn!(consumer = %self.consumer_tag, error = %error, "a subscribed topic is missing; declaring the topology again");
                instance
                    .context
                    .lost(format!("subscribed topic missing: {error}"));
                self.inner.redeclare().await;
            }
            other => {
                // Already logged by the context's error callback.
                tracing::debug!(consumer = %self.consumer_tag, error = %other, "consumer error");
            }
        }
        Ok(())
    }

    /// Consumes with one member until the transport closes, the stream is
    /// dropped (`Ok`), or the member fails for good (`Err`).
    async fn consume(&self, instance: &Instance) -> Result<(), String> {
        let closed = &self.inner.closed;
        let mut paused = false;
        // Messages received while full (librdkafka filters paused
        // partitions' fetched messages, so at most what arrived before the
        // pause): handed out first, in order.
        let mut held: VecDeque<OwnedMessage> = VecDeque::new();
        loop {
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    if paused {
                        self.pause(instance, false);
                        paused = false;
                    }
                    if let Some(message) = held.pop_front() {
                        if !self.hand_out(instance, message, permit).await {
                            return Ok(());
                        }
                        continue;
                    }
                    tokio::select! {
                        _ = closed.cancelled() => return Ok(()),
                        _ = self.sender.closed() => return Ok(()),
                        received = instance.member.recv() => match received {
                            Ok(message) => {
                                let message = message.detach();
                                if !self.hand_out(instance, message, permit).await {
                                    return Ok(());
                                }
                            }
                            Err(e) => self.failed(instance, e).await?,
                        },
                    }
                }
                Err(_) => {
                    if !paused {
                        // Most deliveries are settled quickly, and a pause
                        // and resume cost a fetch round trip (up to
                        // `fetch.wait.max.ms`): wait a little first. The
                        // member is not polled meanwhile (a rebalance is
                        // served that much later).
                        tokio::select! {
                            _ = closed.cancelled() => return Ok(()),
                            _ = self.sender.closed() => return Ok(()),
                            _ = tokio::time::timeout(PAUSE_AFTER, self.permits.acquire()) => {}
                        }
                        if self.permits.available_permits() > 0 {
                            continue;
                        }
                        self.pause(instance, true);
                        paused = true;
                    }
                    tokio::select! {
                        _ = closed.cancelled() => return Ok(()),
                        _ = self.sender.closed() => return Ok(()),
                        _ = self.permits.acquire() => {}
                        received = instance.member.recv() => match received {
                            Ok(message) => held.push_back(message.detach()),
                            Err(e) => self.failed(instance, e).await?,
                        },
                    }
                }
            }
        }
    }

    /// The stream was dropped: keep the member (paused, polled) until every
    /// delivery out is settled, so their commits still land.
    async fn drain(&self, instance: &Instance) {
        if self.inner.closed.is_cancelled() {
            return;
        }
        self.pause(instance, true);
        loop {
            tokio::select! {
                _ = self.inner.closed.cancelled() => return,
                _ = self.permits.acquire_many(self.prefetch) => return,
                received = instance.member.recv() => {
                    // Paused: only events. A message that still arrives is
                    // not handed out, so it is never committed.
                    if let Err(e) = received {
                        tracing::debug!(consumer = %self.consumer_tag, error = %e, "consumer error while closing");
                    }
                }
            }
        }
    }

    /// Closes a member off the async threads (closing leaves the group,
    /// which waits for the broker).
    ///
    /// A member that is still joining its group first finishes the join
    /// (polled, for at most the rebalance timeout `max.poll.interval.ms`,
    /// and no longer than the operation timeout), and leaves after that:
    /// on Tansu 0.6, a member that went away in the middle of a join
    /// blocked its group for good (no later member was ever assigned a
    /// partition; docs/KAFKA-NOTES.md).
    async fn close(&self, instance: Instance) {
        if instance.context.joining.load(Ordering::Relaxed) {
            let settings = &self.inner.settings;
            let bound = settings.max_poll_interval.min(settings.operation_timeout);
            let started = Instant::now();
            let joined = tokio::time::timeout(bound, async {
                while instance.context.joining.load(Ordering::Relaxed) {
                    // Polling serves the group join and its callbacks; a
                    // message that arrives is not handed out (nor committed).
                    let polled =
                        tokio::time::timeout(Duration::from_millis(100), instance.member.recv())
                            .await;
                    if let Ok(Err(e)) = polled {
                        tracing::debug!(consumer = %self.consumer_tag, error = %e, "consumer error while finishing a join");
                    }
                }
            })
            .await;
            match joined {
                Ok(()) => tracing::info!(
                    consumer = %self.consumer_tag,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "finished joining the group before leaving it"
                ),
                Err(_) => tracing::warn!(
                    consumer = %self.consumer_tag,
                    "still joining the group after {bound:?}; leaving anyway"
                ),
            }
        }
        let Instance { member, .. } = instance;
        let closing = tokio::task::spawn_blocking(move || drop(member));
        if let Err(e) = closing.await {
            tracing::warn!(consumer = %self.consumer_tag, error = %e, "closing a consumer failed");
        }
    }

    async fn run(self, mut instance: Instance, _live: LiveGuard) {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.consume(&instance).await {
                Ok(()) => {
                    self.drain(&instance).await;
                    self.close(instance).await;
                    self.inner
                        .consumers
                        .lost(&self.consumer_tag, "unsubscribed", Instant::now());
                    return;
                }
                Err(reason) => {
                    tracing::warn!(consumer = %self.consumer_tag, reason, "consumer failed; creating it again in {delay:?}");
                    instance.context.lost(reason);
                    crate::metrics::subscription_lost(&self.consumer_tag);
                    self.close(instance).await;
                    loop {
                        tokio::select! {
                            _ = self.inner.closed.cancelled() => return,
                            _ = self.sender.closed() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(5));
                        match self.create() {
                            Ok(created) => {
                                instance = created;
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(consumer = %self.consumer_tag, error = %e, "cannot create the consumer");
                                self.inner.consumers.lost(
                                    &self.consumer_tag,
                                    e.to_string(),
                                    Instant::now(),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Starts a subscription of `queue`'s group (see the module docs).
pub(super) fn subscribe(
    inner: Arc<Inner>,
    queue: &QueueSpec,
    consumer_tag: &str,
    prefetch: u16,
) -> Result<BoxStream<'static, Result<Delivery, TransportError>>, TransportError> {
    let topics = inner.settings.subscribed_topics(queue)?;
    let prefetch = prefetch.max(1);
    let (sender, receiver) = mpsc::channel(usize::from(prefetch));
    let subscription = Subscription {
        inner,
        group: group_id(queue),
        topics,
        consumer_tag: consumer_tag.to_owned(),
        prefetch: u32::from(prefetch),
        permits: Arc::new(Semaphore::new(usize::from(prefetch))),
        sender,
    };
    let instance = subscription.create()?;
    tracing::info!(
        consumer = %consumer_tag,
        group = %subscription.group,
        topics = ?subscription.topics,
        prefetch,
        "subscribed; joining the consumer group"
    );
    let live = LiveSubscriptions::start(&subscription.inner, &queue.name);
    tokio::spawn(subscription.run(instance, live));
    Ok(
        futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|item| (item, receiver))
        })
        .boxed(),
    )
}
