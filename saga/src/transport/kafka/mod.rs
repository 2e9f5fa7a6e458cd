//! Kafka transport (rdkafka / librdkafka): the same consumers, relay and
//! dead-letter handling as on RabbitMQ, on Kafka topics and consumer groups.
//!
//! # Topics and groups
//!
//! RabbitMQ routes a message by its routing key through one topic exchange
//! to every queue bound to that key. Our routing keys are plain names
//! (`order.created`); no queue binds a wildcard. On Kafka:
//!
//! | RabbitMQ | Kafka |
//! |---|---|
//! | routing key `k` on the exchange | topic `<topic_prefix>.<k>` ([`KafkaSettings::event_topic`]) |
//! | queue `q` bound to keys `k1, k2` | consumer group `q` ([`group_id`]) subscribed to the topics of `k1, k2` and to `q.direct` |
//! | publishing straight to queue `q` (default exchange) | topic `q.direct` ([`direct_topic`]): only group `q` reads it |
//! | error queue `q.error` | topic `q.error` ([`error_topic`]), read by `dead_letters`/`redrive` through group `q.error.redrive` ([`redrive_group_id`]) |
//! | competing consumers on `q` | members of group `q`, sharing its partitions |
//!
//! Queue names are used as they are: a service's queue names already carry
//! its deployment prefix (the order saga's `orders::topology`). [`KafkaTransport::declare`] creates every topic
//! of a [`KafkaTopology`] with an explicit partition count (topics created
//! by a broker's auto-creation would get the broker's default count, and no
//! client here asks for auto-creation). A routing key with no topic is an
//! error for the message that uses it, like RabbitMQ's `mandatory`.
//!
//! Redriven dead letters go to `q.direct`, not back to the routing key's
//! topic: on that topic every other group bound to the key would see the
//! message again, while RabbitMQ's redrive gives it to the one queue only.
//!
//! # Publishing
//!
//! One idempotent producer per transport (`enable.idempotence=true`,
//! `acks=all`). Each event is keyed by its correlation id (the order id), so
//! one saga's events land in one partition, in order; the partitioner is
//! `murmur2_random`, the Java client's, so other clients agree on the
//! partition of a key. Headers carry `message-id`, `message-type`,
//! `correlation-id`, `routing-key`, `content-type` and the W3C
//! `traceparent`/`tracestate`. [`Transport::publish`] reports a result per
//! message only once its delivery report is in (or
//! [`KafkaSettings::delivery_timeout`] has passed): an outbox row is marked
//! sent only after the broker has the message.
//!
//! # Consuming and committing
//!
//! A subscription is one consumer-group member with auto-commit off
//! (`enable.auto.commit=false`, `enable.auto.offset.store=false`) and
//! `auto.offset.reset=earliest` (a group's first member reads what was
//! published before it existed). At most `prefetch` deliveries are out at
//! once; when all are out the member pauses its partitions and keeps
//! polling, so it stays in the group however long a handler takes.
//!
//! An offset is committed only when a [`Delivery`] is acknowledged (after
//! the handler's transaction committed), and never past a delivery still
//! out: deliveries are settled out of order, so per partition the member
//! commits the lowest offset still out (or one past the last offset
//! received when none is), see `offsets.rs`. [`Acknowledger::ack`](super::Acknowledger::ack) returns
//! once that commit (if it moved the position) is acknowledged by the
//! broker. A delivery handed back ([`Acknowledger::requeue`](super::Acknowledger::requeue), on shutdown)
//! or dropped unsettled is not committed, and holds its partition's commit
//! position below it: after a restart or a rebalance the group reads it, and
//! what followed it, again. A rebalance forgets the revoked partitions'
//! deliveries; settling one of them afterwards fails (and the new owner
//! delivers it again). The inbox absorbs every such repeat: the contract is
//! at-least-once, as on RabbitMQ.
//!
//! `Delivery::redelivered` is true when the same subscription received the
//! offset before (a rebalance gave the partition back); Kafka keeps no
//! delivery count, so a message read again after a restart or by another
//! member is not marked.
//!
//! # Dead letters
//!
//! [`Transport::dead_letter`] produces the message to `q.error` with the
//! headers RabbitMQ's error queues carry (`x-error-reason`, `x-attempts`,
//! `x-original-routing-key`, `x-original-queue`, trace headers) and waits
//! for its delivery report. [`KafkaTransport::dead_letters`] peeks at the
//! letters not yet redriven; [`KafkaTransport::redrive`] moves them to
//! `q.direct` and commits the error topic's offsets only after the copies
//! are delivered.
//!
//! # Status
//!
//! Like the RabbitMQ transport, subscriptions mark themselves in the
//! [`ConsumerRegistry`]: registered when the group assigns partitions (an
//! empty assignment counts: the member is in the group), lost while a
//! rebalance revoked them, when the group coordinator or every broker is
//! unreachable, when a subscribed topic is missing, and when unsubscribed.
//! librdkafka reconnects by itself; its group state, read from its
//! statistics every two seconds, marks a member registered again.
//! [`KafkaTransport::consumer_lag`] reports, per partition, the committed
//! offset against the high watermark.

mod offsets;
mod reader;
mod subscription;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use futures_util::stream::BoxStream;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;

use super::memory::{
    HEADER_ATTEMPTS, HEADER_ERROR_REASON, HEADER_ORIGINAL_QUEUE, HEADER_ORIGINAL_ROUTING_KEY,
};
use super::status::ConsumerRegistry;
use super::{Delivery, OutgoingMessage, QueueSpec, Transport};
use crate::error::TransportError;
use crate::trace::{TRACEPARENT, TRACESTATE, TraceContext};

pub use super::rabbitmq::DeadLetter;
pub use reader::PartitionLag;

/// Header carrying the message id (RabbitMQ's `message_id` property).
pub const HEADER_MESSAGE_ID: &str = "message-id";
/// Header carrying the message type (RabbitMQ's `type` property).
pub const HEADER_MESSAGE_TYPE: &str = "message-type";
/// Header carrying the correlation id (the order id; also the record key).
pub const HEADER_CORRELATION_ID: &str = "correlation-id";
/// Header carrying the routing key the message was published with.
pub const HEADER_ROUTING_KEY: &str = "routing-key";
/// Header carrying the payload's media type (`application/json`).
pub const HEADER_CONTENT_TYPE: &str = "content-type";

/// How to reach the brokers and how to name and size topics.
///
/// Turned into librdkafka properties next to the data
/// ([`KafkaSettings::producer_config`], ...); [`KafkaSettings::extra`] is
/// applied last to every client, for anything not covered here (TLS, SASL,
/// tuning).
/// `Debug` leaves out the values of [`KafkaSettings::extra`] entries that
/// look secret (`sasl.password`, `ssl.key.password`, ...).
#[derive(Clone)]
pub struct KafkaSettings {
    /// `bootstrap.servers`: comma-separated `host:port` list. Default
    /// `127.0.0.1:9092`.
    pub bootstrap_servers: String,
    /// Prefix of the routing keys' topics (`<topic_prefix>.<routing key>`).
    /// Default `order_saga`.
    pub topic_prefix: String,
    /// Partitions of each topic [`KafkaTransport::declare`] creates. Default 3.
    pub partitions: i32,
    /// Replication factor of each topic created. Default 1 (one broker);
    /// a cluster wants 3.
    pub replication_factor: i32,
    /// `session.timeout.ms`: a member that sends no heartbeat for this long
    /// is dropped from its group and its partitions go to the others. The
    /// heartbeat interval is a third of it. Default 10 s.
    pub session_timeout: Duration,
    /// `max.poll.interval.ms`, which is also the rebalance timeout: how long
    /// a group waits for its members to rejoin. Subscriptions poll all the
    /// time (they pause their partitions when `prefetch` deliveries are
    /// out), so slow handlers do not need a long one. Default 30 s.
    pub max_poll_interval: Duration,
    /// How long a publish waits for a message's delivery report
    /// (`message.timeout.ms`, retries included). Default 10 s.
    pub delivery_timeout: Duration,
    /// Upper bound of each admin call, metadata or offset query and commit.
    /// Default 10 s.
    pub operation_timeout: Duration,
    /// `client.id` of the producer and admin clients; consumers use their
    /// consumer tag. Default `order-saga`.
    pub client_id: String,
    /// Further librdkafka properties, applied last to every client.
    pub extra: BTreeMap<String, String>,
}

fn secret(key: &str) -> bool {
    ["password", "secret", "token", "jaas", "key.pem"]
        .iter()
        .any(|word| key.contains(word))
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let extra: BTreeMap<&str, &str> = self
            .extra
            .iter()
            .map(|(k, v)| {
                let shown = if secret(k) { "<redacted>" } else { v.as_str() };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic_prefix", &self.topic_prefix)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("session_timeout", &self.session_timeout)
            .field("max_poll_interval", &self.max_poll_interval)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("client_id", &self.client_id)
            .field("extra", &extra)
            .finish()
    }
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".to_owned(),
            topic_prefix: "order_saga".to_owned(),
            partitions: 3,
            replication_factor: 1,
            session_timeout: Duration::from_secs(10),
            max_poll_interval: Duration::from_secs(30),
            delivery_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(10),
            client_id: "order-saga".to_owned(),
            extra: BTreeMap::new(),
        }
    }
}

fn millis(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

impl KafkaSettings {
    /// The topic of a routing key: `<topic_prefix>.<routing_key>`.
    pub fn event_topic(&self, routing_key: &str) -> String {
        format!("{}.{}", self.topic_prefix, routing_key)
    }

    /// The topics a queue's consumer group subscribes to: its routing keys'
    /// topics and its direct topic. Fails on a routing key that cannot be a
    /// topic name (a wildcard pattern).
    pub fn subscribed_topics(&self, queue: &QueueSpec) -> Result<Vec<String>, TransportError> {
        let mut topics = Vec::with_capacity(queue.routing_keys.len() + 1);
        for key in &queue.routing_keys {
            if key.contains(['*', '#']) {
                return Err(TransportError::Broker(format!(
                    "queue `{}` binds the pattern `{key}`: the Kafka transport maps each \
                     routing key to one topic and supports no wildcards",
                    queue.name
                )));
            }
            topics.push(checked_topic(self.event_topic(key))?);
        }
        topics.push(checked_topic(direct_topic(queue))?);
        Ok(topics)
    }

    fn base_config(&self, client_id: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", client_id)
            // Nothing here creates topics by accident: `declare` does, with
            // an explicit partition count.
            .set("allow.auto.create.topics", "false")
            // librdkafka's debug lines only when `tracing` wants them
            // (with the `debug` property for the contexts, e.g. `cgrp`).
            .set_log_level(
                if tracing::enabled!(target: "librdkafka", tracing::Level::DEBUG) {
                    RDKafkaLogLevel::Debug
                } else {
                    RDKafkaLogLevel::Info
                },
            );
        config
    }

    fn finish(&self, mut config: ClientConfig) -> ClientConfig {
        for (key, value) in &self.extra {
            config.set(key, value);
        }
        config
    }

    /// Properties of the idempotent producer.
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = self.base_config(&self.client_id);
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", millis(self.delivery_timeout))
            .set(
                "topic.metadata.propagation.max.ms",
                millis(self.delivery_timeout.min(Duration::from_secs(30))),
            )
            .set("partitioner", "murmur2_random");
        self.finish(config)
    }

    /// Properties of a subscription's consumer-group member.
    pub fn consumer_config(&self, group_id: &str, client_id: &str) -> ClientConfig {
        let mut config = self.base_config(client_id);
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", millis(self.session_timeout))
            .set("heartbeat.interval.ms", millis(self.session_timeout / 3))
            .set("max.poll.interval.ms", millis(self.max_poll_interval))
            // A missing topic that gets created is noticed within this.
            .set("topic.metadata.refresh.interval.ms", "10000")
            // Group state for the consumer registry (see `subscription.rs`).
            .set("statistics.interval.ms", "2000");
        self.finish(config)
    }

    /// Properties of a short-lived reader: assigned partitions, no group
    /// membership, offsets of `group_id` read and committed explicitly.
    fn reader_config(&self, group_id: &str) -> ClientConfig {
        let mut config = self.base_config(&format!("{}-reader", self.client_id));
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        self.finish(config)
    }

    fn admin_config(&self) -> ClientConfig {
        let config = self.base_config(&self.client_id);
        self.finish(config)
    }
}

/// The direct topic of a queue (`<queue>.direct`): only the queue's group
/// reads it. Redriven dead letters and messages put straight into the queue
/// go there.
pub fn direct_topic(queue: &QueueSpec) -> String {
    format!("{}.direct", queue.name)
}

/// The error topic of a queue: `<queue>.error`, like its RabbitMQ error queue.
pub fn error_topic(queue: &QueueSpec) -> String {
    queue.error_queue()
}

/// The consumer group of a queue's consumers: the queue's name.
pub fn group_id(queue: &QueueSpec) -> String {
    queue.name.clone()
}

/// The group whose committed offsets on the error topic mark what has been
/// redriven: `<queue>.error.redrive`.
pub fn redrive_group_id(queue: &QueueSpec) -> String {
    format!("{}.redrive", queue.error_queue())
}

/// Kafka topic names: 1 to 249 of `[A-Za-z0-9._-]`, not `.` or `..`.
fn checked_topic(name: String) -> Result<String, TransportError> {
    let valid = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(name)
    } else {
        Err(TransportError::Broker(format!(
            "`{name}` is not a valid Kafka topic name (1-249 of [A-Za-z0-9._-])"
        )))
    }
}

/// The topics and their size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaTopology {
    /// The consumers' queues.
    pub queues: Vec<QueueSpec>,
    /// Partitions of each topic.
    pub partitions: i32,
    /// Replication factor of each topic.
    pub replication_factor: i32,
}

impl KafkaTopology {
    /// `queues`, sized by `settings` ([`KafkaSettings::partitions`],
    /// [`KafkaSettings::replication_factor`]).
    pub fn new(queues: Vec<QueueSpec>, settings: &KafkaSettings) -> Self {
        Self {
            queues,
            partitions: settings.partitions,
            replication_factor: settings.replication_factor,
        }
    }

    /// Every topic of the topology: one per routing key, and each queue's
    /// direct and error topics.
    pub fn topics(&self, settings: &KafkaSettings) -> Result<BTreeSet<String>, TransportError> {
        let mut topics = BTreeSet::new();
        for queue in &self.queues {
            topics.extend(settings.subscribed_topics(queue)?);
            topics.insert(checked_topic(error_topic(queue))?);
        }
        Ok(topics)
    }
}

/// Routes librdkafka's log lines and client errors to `tracing`.
#[derive(Clone, Debug, Default)]
pub(crate) struct TracingContext;

pub(crate) fn log_line(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(None, &error, reason);
    }
}

/// Readers (see `reader.rs`) join no group: nothing to do on rebalances.
impl rdkafka::consumer::ConsumerContext for TracingContext {}

/// Logs a librdkafka client error. A broker connection failing is logged
/// by librdkafka itself already (a `FAIL` line): only at debug level here.
pub(crate) fn client_error(consumer: Option<&str>, error: &KafkaError, reason: &str) {
    let consumer = consumer.unwrap_or("");
    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::BrokerTransportFailure) {
        tracing::debug!(target: "librdkafka", consumer, error = %error, "{reason}");
    } else {
        tracing::warn!(target: "librdkafka", consumer, error = %error, "{reason}");
    }
}

pub(crate) fn broker_error(what: impl std::fmt::Display, error: KafkaError) -> TransportError {
    TransportError::Broker(format!("{what}: {error}"))
}

/// Runs blocking librdkafka calls off the async threads.
pub(crate) async fn blocking<T, F>(what: &str, f: F) -> Result<T, TransportError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, TransportError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => Err(TransportError::Broker(format!("{what}: {e}"))),
    }
}

/// The subscriptions running, per queue name: `close` and `delete` wait
/// for them to end.
#[derive(Default)]
pub(crate) struct LiveSubscriptions {
    counts: std::sync::Mutex<BTreeMap<String, usize>>,
    changed: tokio::sync::Notify,
}

/// Counts one subscription as running until dropped.
pub(crate) struct LiveGuard {
    inner: Arc<Inner>,
    queue: String,
}

impl LiveSubscriptions {
    fn counts(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        // Plain counters: a panic elsewhere cannot leave them torn.
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a subscription of `queue` until the guard is dropped.
    pub(crate) fn start(inner: &Arc<Inner>, queue: &str) -> LiveGuard {
        *inner.live.counts().entry(queue.to_owned()).or_default() += 1;
        LiveGuard {
            inner: inner.clone(),
            queue: queue.to_owned(),
        }
    }

    fn none_of(&self, queues: Option<&BTreeSet<String>>) -> bool {
        let counts = self.counts();
        counts
            .iter()
            .filter(|(queue, _)| queues.is_none_or(|q| q.contains(*queue)))
            .all(|(_, n)| *n == 0)
    }

    /// Waits until no subscription of `queues` (of any queue with `None`)
    /// runs; `false` if some still does after `timeout`.
    async fn wait_until_none(&self, queues: Option<&BTreeSet<String>>, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.none_of(queues) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.none_of(queues);
            }
        }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if let Some(n) = self.inner.live.counts().get_mut(&self.queue) {
            *n = n.saturating_sub(1);
        }
        self.inner.live.changed.notify_waiters();
    }
}

/// An admin client that is closed off the async threads (closing joins its
/// polling thread and waits for its broker threads).
struct Admin(Option<AdminClient<TracingContext>>);

impl std::ops::Deref for Admin {
    type Target = AdminClient<TracingContext>;

    fn deref(&self) -> &Self::Target {
        // Only `drop` takes the client out.
        match &self.0 {
            Some(client) => client,
            None => unreachable!("admin client used after drop"),
        }
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop(client))),
                Err(_) => drop(client),
            }
        }
    }
}

/// A Kafka transport. Cheap to clone (shared).
///
/// One idempotent producer per transport (admin clients are made per
/// declaration or deletion); each
/// subscription is a consumer-group member of its own. librdkafka
/// reconnects by itself: nothing here needs re-opening after a broker
/// restart, and a subscription's stream never ends while the transport is
/// open.
#[derive(Clone)]
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    settings: KafkaSettings,
    /// Replaced when librdkafka declares it failed for good (see
    /// [`Inner::replace_if_fatal`]).
    producer: std::sync::RwLock<FutureProducer<TracingContext>>,
    consumers: ConsumerRegistry,
    closed: CancellationToken,
    live: LiveSubscriptions,
    topology: std::sync::Mutex<Option<KafkaTopology>>,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("bootstrap_servers", &self.inner.settings.bootstrap_servers)
            .field("topic_prefix", &self.inner.settings.topic_prefix)
            .finish()
    }
}

impl KafkaTransport {
    /// Creates the producer and checks that a broker
    /// answers within [`KafkaSettings::operation_timeout`] (callers retry
    /// at start; afterwards librdkafka reconnects by itself).
    pub async fn connect(settings: KafkaSettings) -> Result<Self, TransportError> {
        checked_topic(settings.event_topic("x"))?;
        let producer: FutureProducer<TracingContext> = settings
            .producer_config()
            .create_with_context(TracingContext)
            .map_err(|e| broker_error("cannot create the Kafka producer", e))?;
        let transport = Self {
            inner: Arc::new(Inner {
                settings,
                producer: std::sync::RwLock::new(producer),
                consumers: ConsumerRegistry::new(),
                closed: CancellationToken::new(),
                live: LiveSubscriptions::default(),
                topology: std::sync::Mutex::new(None),
            }),
        };
        transport.ensure_connected().await?;
        Ok(transport)
    }

    /// The settings it was created with.
    pub fn settings(&self) -> &KafkaSettings {
        &self.inner.settings
    }

    /// Asks a broker for the cluster's metadata: what a readiness check
    /// asks ("can this host reach the broker now?").
    pub async fn ensure_connected(&self) -> Result<(), TransportError> {
        let producer = self.inner.producer();
        let timeout = self.inner.settings.operation_timeout;
        let servers = self.inner.settings.bootstrap_servers.clone();
        blocking("metadata", move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| broker_error(format!("no Kafka broker answers at {servers}"), e))
        })
        .await
    }

    /// Creates every topic of `topology` that does not exist yet, with its
    /// partition count, waits until the brokers' metadata shows them, and
    /// remembers the topology so a subscription that finds a topic missing
    /// creates it again. Idempotent: safe on every start. An existing topic
    /// with another partition count is left as it is (with a warning).
    pub async fn declare(&self, topology: &KafkaTopology) -> Result<(), TransportError> {
        self.inner.declare(topology).await?;
        if let Ok(mut remembered) = self.inner.topology.lock() {
            *remembered = Some(topology.clone());
        }
        Ok(())
    }

    /// Deletes every topic of `topology` and the groups of its queues
    /// (tests clean up after themselves with this). Groups the broker
    /// cannot delete (unknown, or not supported) are left.
    ///
    /// Waits (up to the operation timeout) until this transport's
    /// subscriptions of those queues have ended, and fails if they do not:
    /// librdkafka 2.12.1 crashes (SIGSEGV) when a member fetching a topic
    /// gets Tansu's answer for the deleted topic (docs/KAFKA-NOTES.md).
    /// Subscriptions of other processes are not seen: end them first.
    pub async fn delete(&self, topology: &KafkaTopology) -> Result<(), TransportError> {
        let topics = topology.topics(&self.inner.settings)?;
        let queues: BTreeSet<String> = topology.queues.iter().map(|q| q.name.clone()).collect();
        let timeout = self.inner.settings.operation_timeout;
        if !self
            .inner
            .live
            .wait_until_none(Some(&queues), timeout)
            .await
        {
            return Err(TransportError::Broker(format!(
                "subscriptions of {queues:?} still running after {} ms; end them before deleting their topics",
                timeout.as_millis()
            )));
        }
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let options = self.inner.admin_options();
        let admin = self.inner.admin()?;
        let results = self
            .inner
            .bounded("delete topics", admin.delete_topics(&names, &options))
            .await?
            .map_err(|e| broker_error("delete topics", e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((topic, code)) => {
                    return Err(TransportError::Broker(format!(
                        "cannot delete topic `{topic}`: {code}"
                    )));
                }
            }
        }
        let groups: Vec<String> = topology
            .queues
            .iter()
            .flat_map(|q| [group_id(q), redrive_group_id(q)])
            .collect();
        let names: Vec<&str> = groups.iter().map(String::as_str).collect();
        match self
            .inner
            .bounded("delete groups", admin.delete_groups(&names, &options))
            .await
        {
            Ok(Ok(results)) => {
                for result in results {
                    if let Err((group, code)) = result {
                        tracing::debug!(group, %code, "consumer group not deleted");
                    }
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "consumer groups not deleted"),
            Err(e) => tracing::debug!(error = %e, "consumer groups not deleted"),
        }
        if let Ok(mut remembered) = self.inner.topology.lock()
            && remembered.as_ref() == Some(topology)
        {
            *remembered = None;
        }
        Ok(())
    }

    /// Puts `message` straight into `queue` (its direct topic), keyed by its
    /// correlation id, and waits for the delivery report. Tests inject
    /// malformed or duplicated messages with this.
    pub async fn publish_to_queue(
        &self,
        queue: &QueueSpec,
        message: &OutgoingMessage,
    ) -> Result<(), TransportError> {
        let topic = checked_topic(direct_topic(queue))?;
        let headers = message_headers(message);
        self.inner
            .produce(
                &topic,
                Some(message.correlation_id.as_bytes()),
                &message.body,
                headers,
                message.message_id.to_string(),
            )
            .await
    }

    /// Reads up to `limit` letters of `queue`'s error topic that have not
    /// been redriven, without taking them (nothing is committed), with the
    /// failure headers the consumer attached.
    pub async fn dead_letters(
        &self,
        queue: &QueueSpec,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, TransportError> {
        reader::dead_letters(self.inner.clone(), queue, limit).await
    }

    /// Moves up to `limit` letters of `queue`'s error topic to its direct
    /// topic (so only that queue's group gets them again), keeping their
    /// key, message id, type, correlation id and trace headers and dropping
    /// the error headers. The error topic's offsets are committed (for group
    /// `<queue>.error.redrive`) only for letters whose copy was delivered, so
    /// a crash in between duplicates rather than loses a message (and the
    /// inbox absorbs the duplicate). Returns the message id of each letter
    /// moved; on a failed copy, the error (letters moved before it stay
    /// moved).
    pub async fn redrive(
        &self,
        queue: &QueueSpec,
        limit: u32,
    ) -> Result<Vec<Option<String>>, TransportError> {
        reader::redrive(self.inner.clone(), queue, limit).await
    }

    /// Letters in `queue`'s error topic not yet redriven.
    pub async fn dead_letter_count(&self, queue: &QueueSpec) -> Result<u64, TransportError> {
        reader::dead_letter_count(self.inner.clone(), queue).await
    }

    /// Per partition of every topic `queue`'s group reads: the committed
    /// offset against the high watermark.
    pub async fn consumer_lag(
        &self,
        queue: &QueueSpec,
    ) -> Result<Vec<PartitionLag>, TransportError> {
        reader::consumer_lag(self.inner.clone(), queue).await
    }

    /// Messages `queue`'s group has not committed yet, over all its
    /// partitions (the sum of [`Self::consumer_lag`]).
    pub async fn queue_depth(&self, queue: &QueueSpec) -> Result<u64, TransportError> {
        Ok(self
            .consumer_lag(queue)
            .await?
            .iter()
            .map(|p| u64::try_from(p.lag).unwrap_or(0))
            .sum())
    }

    /// Ends every subscription (their members leave their groups; waits up
    /// to the operation timeout for that), marks every consumer lost, and
    /// waits up to the delivery timeout for messages still being produced.
    pub async fn close(&self) {
        self.inner.closed.cancel();
        let timeout = self.inner.settings.operation_timeout;
        if !self.inner.live.wait_until_none(None, timeout).await {
            tracing::warn!(
                "subscriptions still closing after {} ms",
                timeout.as_millis()
            );
        }
        self.inner
            .consumers
            .lost_all("transport closed", std::time::Instant::now());
        let producer = self.inner.producer();
        let timeout = self.inner.settings.delivery_timeout;
        let flushed = blocking("flush", move || {
            producer
                .flush(timeout)
                .map_err(|e| broker_error("flush", e))
        })
        .await;
        if let Err(e) = flushed {
            tracing::warn!(error = %e, "messages still unsent when the transport closed");
        }
    }
}

impl Inner {
    /// An admin client for one declaration or deletion. Not kept: rdkafka
    /// never polls an admin client's main queue, so a long-lived one would
    /// pile up its log and error events.
    fn admin(&self) -> Result<Admin, TransportError> {
        self.settings
            .admin_config()
            .create_with_context(TracingContext)
            .map(|client| Admin(Some(client)))
            .map_err(|e| broker_error("cannot create the Kafka admin client", e))
    }

    fn admin_options(&self) -> AdminOptions {
        AdminOptions::new()
            .operation_timeout(Some(self.settings.operation_timeout))
            .request_timeout(Some(self.settings.operation_timeout))
    }

    /// Bounds a broker operation by the operation timeout (and a second).
    async fn bounded<T>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = T>,
    ) -> Result<T, TransportError> {
        let limit = self.settings.operation_timeout + Duration::from_secs(1);
        tokio::time::timeout(limit, op).await.map_err(|_| {
            TransportError::Broker(format!(
                "{what}: no answer from the broker within {} ms",
                limit.as_millis()
            ))
        })
    }

    async fn declare(&self, topology: &KafkaTopology) -> Result<(), TransportError> {
        let topics = topology.topics(&self.settings)?;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|name| {
                NewTopic::new(
                    name,
                    topology.partitions,
                    TopicReplication::Fixed(topology.replication_factor),
                )
            })
            .collect();
        let admin = self.admin()?;
        let results = self
            .bounded(
                "create topics",
                admin.create_topics(&new, &self.admin_options()),
            )
            .await?
            .map_err(|e| broker_error("create topics", e))?;
        for result in results {
            match result {
                Ok(topic) => {
                    tracing::info!(topic, partitions = topology.partitions, "topic created")
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(TransportError::Broker(format!(
                        "cannot create topic `{topic}`: {code}"
                    )));
                }
            }
        }
        // Topic creation is asynchronous on a real cluster: wait until the
        // metadata shows every topic with its partitions.
        let producer = self.producer();
        let timeout = self.settings.operation_timeout;
        let expected = topology.partitions;
        blocking("topic metadata", move || {
            wait_for_topics(&producer, &topics, expected, timeout)
        })
        .await
    }

    /// Declares the remembered topology again (best effort): a subscription
    /// found a topic missing.
    async fn redeclare(&self) {
        let topology = self.topology.lock().ok().and_then(|t| t.clone());
        if let Some(topology) = topology
            && let Err(e) = self.declare(&topology).await
        {
            tracing::warn!(error = %e, "cannot declare the Kafka topics again");
        }
    }

    /// Produces one record and waits for its delivery report.
    async fn produce(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: OwnedHeaders,
        what: String,
    ) -> Result<(), TransportError> {
        let deadline = tokio::time::Instant::now() + self.settings.delivery_timeout;
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(payload)
            .headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        let producer = self.producer();
        let sent = producer.send_result(record).map_err(|(e, _)| e);
        let delivered = wait_delivery(sent, deadline, &what, topic).await;
        if delivered.is_err() {
            self.replace_if_fatal(&producer);
        }
        delivered
    }

    /// The current producer.
    pub(crate) fn producer(&self) -> FutureProducer<TracingContext> {
        // A clone of an `Arc` inside: a panic elsewhere cannot leave it torn.
        self.producer
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces `used` with a new producer if librdkafka declared it failed
    /// for good. An idempotent producer goes fatal when the broker no
    /// longer knows its producer id and messages are in flight (seen when an
    /// in-memory broker restarts, docs/KAFKA-NOTES.md); it then fails every
    /// message. Messages it had in flight are reported failed, so the outbox
    /// sends them again.
    pub(crate) fn replace_if_fatal(&self, used: &FutureProducer<TracingContext>) {
        let Some((code, reason)) = used.client().fatal_error() else {
            return;
        };
        let mut current = self
            .producer
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.client().native_ptr() != used.client().native_ptr() {
            return; // Replaced already.
        }
        match self
            .settings
            .producer_config()
            .create_with_context(TracingContext)
        {
            Ok(fresh) => {
                tracing::error!(%code, reason, "the Kafka producer failed for good; replaced it");
                let old = std::mem::replace(&mut *current, fresh);
                // Dropping purges and flushes (blocking): off the async threads.
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => drop(runtime.spawn_blocking(move || drop(old))),
                    Err(_) => drop(old),
                }
            }
            Err(e) => {
                tracing::error!(%code, reason, error = %e, "the Kafka producer failed for good and cannot be created again");
            }
        }
    }
}

/// Waits for one delivery report until `deadline` (plus a margin:
/// librdkafka reports a timeout itself after `message.timeout.ms`).
async fn wait_delivery(
    sent: Result<rdkafka::producer::DeliveryFuture, KafkaError>,
    deadline: tokio::time::Instant,
    what: &str,
    topic: &str,
) -> Result<(), TransportError> {
    let future = match sent {
        Ok(future) => future,
        Err(e) => return Err(broker_error(format!("{what} to `{topic}` not sent"), e)),
    };
    // librdkafka checks message timeouts about once a second.
    match tokio::time::timeout_at(deadline + Duration::from_secs(2), future).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err((e, _)))) => Err(broker_error(
            format!("{what} to `{topic}` not delivered"),
            e,
        )),
        Ok(Err(_)) => Err(TransportError::Broker(format!(
            "{what} to `{topic}`: the producer was dropped"
        ))),
        Err(_) => Err(TransportError::ConfirmTimeout),
    }
}

fn wait_for_topics(
    producer: &FutureProducer<TracingContext>,
    topics: &BTreeSet<String>,
    partitions: i32,
    timeout: Duration,
) -> Result<(), TransportError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let metadata = producer
            .client()
            .fetch_metadata(None, timeout)
            .map_err(|e| broker_error("topic metadata", e))?;
        let mut missing = Vec::new();
        for name in topics {
            match metadata.topics().iter().find(|t| t.name() == name) {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                    let found = t.partitions().len();
                    if i32::try_from(found).ok() != Some(partitions) {
                        tracing::warn!(
                            topic = name.as_str(),
                            found,
                            wanted = partitions,
                            "topic exists with another partition count; left as it is"
                        );
                    }
                }
                _ => missing.push(name.as_str()),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(TransportError::Broker(format!(
                "topics not visible in the metadata after {} ms: {}",
                timeout.as_millis(),
                missing.join(", ")
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn insert(headers: OwnedHeaders, key: &str, value: &str) -> OwnedHeaders {
    headers.insert(Header {
        key,
        value: Some(value),
    })
}

fn insert_trace(headers: OwnedHeaders, trace: Option<&TraceContext>) -> OwnedHeaders {
    match trace {
        Some(trace) => {
            let headers = insert(headers, TRACEPARENT, trace.traceparent());
            match trace.tracestate() {
                Some(state) => insert(headers, TRACESTATE, state),
                None => headers,
            }
        }
        None => headers,
    }
}

/// The headers of a published event.
fn message_headers(message: &OutgoingMessage) -> OwnedHeaders {
    let headers = OwnedHeaders::new_with_capacity(8);
    let headers = insert(headers, HEADER_MESSAGE_ID, &message.message_id.to_string());
    let headers = insert(headers, HEADER_MESSAGE_TYPE, &message.message_type);
    let headers = insert(headers, HEADER_CORRELATION_ID, &message.correlation_id);
    let headers = insert(headers, HEADER_ROUTING_KEY, &message.routing_key);
    let headers = insert(headers, HEADER_CONTENT_TYPE, "application/json");
    insert_trace(headers, message.trace.as_ref())
}

/// A header's value as text (the last one of that name wins).
pub(crate) fn header_text<H: Headers>(headers: Option<&H>, name: &str) -> Option<String> {
    let headers = headers?;
    headers
        .iter()
        .filter(|h| h.key == name)
        .filter_map(|h| h.value)
        .filter_map(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned)
        .last()
}

/// The W3C trace context in a message's headers, when valid.
pub(crate) fn trace_from<H: Headers>(headers: Option<&H>) -> Option<TraceContext> {
    let parent = header_text(headers, TRACEPARENT)?;
    TraceContext::parse(&parent, header_text(headers, TRACESTATE).as_deref())
}

#[async_trait]
impl Transport for KafkaTransport {
    async fn publish(
        &self,
        messages: &[OutgoingMessage],
    ) -> Result<Vec<Result<(), TransportError>>, TransportError> {
        let deadline = tokio::time::Instant::now() + self.inner.settings.delivery_timeout;
        let producer = self.inner.producer();
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            let topic = checked_topic(self.inner.settings.event_topic(&message.routing_key));
            let sent = match &topic {
                Ok(topic) => {
                    let record = FutureRecord::<[u8], [u8]>::to(topic)
                        .key(message.correlation_id.as_bytes())
                        .payload(&message.body)
                        .headers(message_headers(message));
                    Some(producer.send_result(record).map_err(|(e, _)| e))
                }
                Err(_) => None,
            };
            pending.push((topic, sent));
        }
        let waits = messages
            .iter()
            .zip(pending)
            .map(|(message, (topic, sent))| async move {
                match (topic, sent) {
                    (Ok(topic), Some(sent)) => {
                        let what = format!("message {}", message.message_id);
                        wait_delivery(sent, deadline, &what, &topic).await
                    }
                    (Err(e), _) => Err(e),
                    (Ok(topic), None) => Err(TransportError::Broker(format!(
                        "message {} to `{topic}` not sent",
                        message.message_id
                    ))),
                }
            });
        let results = join_all(waits).await;
        if results.iter().any(Result::is_err) {
            self.inner.replace_if_fatal(&producer);
        }
        Ok(results)
    }

    async fn subscribe(
        &self,
        queue: &QueueSpec,
        consumer_tag: &str,
        prefetch: u16,
    ) -> Result<BoxStream<'static, Result<Delivery, TransportError>>, TransportError> {
        subscription::subscribe(self.inner.clone(), queue, consumer_tag, prefetch)
    }

    async fn dead_letter(
        &self,
        queue: &QueueSpec,
        delivery: &Delivery,
        reason: &str,
        attempts: u32,
    ) -> Result<(), TransportError> {
        let topic = checked_topic(error_topic(queue))?;
        let mut headers = OwnedHeaders::new_with_capacity(10);
        if let Some(id) = &delivery.message_id {
            headers = insert(headers, HEADER_MESSAGE_ID, id);
        }
        if let Some(kind) = &delivery.message_type {
            headers = insert(headers, HEADER_MESSAGE_TYPE, kind);
        }
        headers = insert(headers, HEADER_CONTENT_TYPE, "application/json");
        headers = insert(headers, HEADER_ERROR_REASON, reason);
        headers = insert(headers, HEADER_ATTEMPTS, &attempts.to_string());
        headers = insert(headers, HEADER_ORIGINAL_ROUTING_KEY, &delivery.routing_key);
        headers = insert(headers, HEADER_ORIGINAL_QUEUE, &queue.name);
        headers = insert_trace(headers, delivery.trace.as_ref());
        let what = format!(
            "dead letter {}",
            delivery.message_id.as_deref().unwrap_or("(no message id)")
        );
        // Keyed by message id: the Delivery does not carry the original key.
        let key = delivery.message_id.as_deref().map(str::as_bytes);
        self.inner
            .produce(&topic, key, &delivery.body, headers, what)
            .await
    }

    fn consumer_status(&self) -> Option<ConsumerRegistry> {
        Some(self.inner.consumers.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> QueueSpec {
        QueueSpec {
            name: "shop.order-saga".to_owned(),
            routing_keys: vec!["order.created".to_owned(), "order.expired".to_owned()],
        }
    }

    #[test]
    fn topics_and_groups_are_named_after_routing_keys_and_queues() {
        let settings = KafkaSettings {
            topic_prefix: "shop".to_owned(),
            ..KafkaSettings::default()
        };
        let q = queue();
        assert_eq!(
            settings.subscribed_topics(&q).expect("valid"),
            [
                "shop.order.created",
                "shop.order.expired",
                "shop.order-saga.direct"
            ]
        );
        assert_eq!(error_topic(&q), "shop.order-saga.error");
        assert_eq!(group_id(&q), "shop.order-saga");
        assert_eq!(redrive_group_id(&q), "shop.order-saga.error.redrive");
        let topology = KafkaTopology::new(vec![q.clone(), q], &settings);
        let topics: Vec<String> = topology
            .topics(&settings)
            .expect("valid")
            .into_iter()
            .collect();
        assert_eq!(
            topics,
            [
                "shop.order-saga.direct",
                "shop.order-saga.error",
                "shop.order.created",
                "shop.order.expired"
            ]
        );
    }

    #[test]
    fn wildcard_routing_keys_and_bad_names_are_refused() {
        let settings = KafkaSettings::default();
        let mut q = queue();
        q.routing_keys = vec!["order.*".to_owned()];
        assert!(settings.subscribed_topics(&q).is_err());
        q.routing_keys = vec!["order created".to_owned()];
        assert!(settings.subscribed_topics(&q).is_err());
        assert!(checked_topic("a".repeat(250)).is_err());
        assert!(checked_topic("..".to_owned()).is_err());
        assert!(checked_topic("a.b_c-D9".to_owned()).is_ok());
    }

    #[test]
    fn consumers_never_auto_commit_and_the_producer_is_idempotent() {
        let mut settings = KafkaSettings::default();
        settings
            .extra
            .insert("socket.keepalive.enable".to_owned(), "true".to_owned());
        let consumer = settings.consumer_config("g", "c");
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        assert_eq!(consumer.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(consumer.get("session.timeout.ms"), Some("10000"));
        assert_eq!(consumer.get("heartbeat.interval.ms"), Some("3333"));
        assert_eq!(consumer.get("socket.keepalive.enable"), Some("true"));
        settings
            .extra
            .insert("sasl.password".to_owned(), "hunter2".to_owned());
        let shown = format!("{settings:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("socket.keepalive.enable"), "{shown}");
        let producer = settings.producer_config();
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(producer.get("message.timeout.ms"), Some("10000"));
    }
}
