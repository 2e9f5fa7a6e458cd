//! RabbitMQ transport (lapin): one durable topic exchange, a durable queue per
//! consumer with its own `.error` queue, persistent messages, publisher
//! confirms with `mandatory`, manual acks and bounded prefetch.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use futures_util::stream::{BoxStream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use super::status::ConsumerRegistry;
use super::{Acknowledger, Delivery, OutgoingMessage, QueueSpec, Transport};
use crate::error::TransportError;
use crate::trace::{TRACEPARENT, TRACESTATE, TraceContext};

/// Queue type to declare: classic for one node, quorum for a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueType {
    /// One node.
    Classic,
    /// Replicated (Raft); what a cluster wants.
    Quorum,
}

impl QueueType {
    fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// The queues and exchange a host uses.
#[derive(Clone, Debug)]
pub struct Topology {
    /// The durable topic exchange.
    pub exchange: String,
    /// Type of every queue.
    pub queue_type: QueueType,
    /// The consumers' queues.
    pub queues: Vec<QueueSpec>,
}

/// A message in an error queue, with the headers naming its failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The AMQP `message_id` property.
    pub message_id: Option<String>,
    /// The AMQP `type` property.
    pub message_type: Option<String>,
    /// `x-error-reason`: why the consumer gave up.
    pub reason: Option<String>,
    /// `x-attempts`: attempts spent (0 for undecodable messages).
    pub attempts: Option<u32>,
    /// `x-original-routing-key`.
    pub original_routing_key: Option<String>,
    /// `x-original-queue`.
    pub original_queue: Option<String>,
    /// The message body.
    pub body: Vec<u8>,
}

/// How long to wait between reconnection attempts: doubling from `initial`
/// up to `max`.
#[derive(Clone, Copy, Debug)]
pub struct ReconnectPolicy {
    /// The first wait.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl ReconnectPolicy {
    fn next(&self, current: Duration) -> Duration {
        (current * 2).min(self.max)
    }
}

/// A RabbitMQ transport that survives the broker going away.
///
/// One connection is shared by the publisher channel and every subscription.
/// When it breaks (broker restart, `close_all_connections`, a network cut),
/// the next publish reconnects, re-declares the topology and goes on; every
/// subscription resubscribes on its own with backoff, so a consumer stream
/// never ends while the transport is open. Messages that were delivered on
/// the old connection and not acknowledged go back to their queue (the inbox
/// makes their second handling a no-op). Cheap to clone.
#[derive(Clone)]
pub struct RabbitTransport {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    connection_name: String,
    exchange: String,
    confirm_timeout: Duration,
    reconnect: ReconnectPolicy,
    topology: std::sync::Mutex<Option<Topology>>,
    live: Mutex<Option<Live>>,
    reconnects: AtomicU64,
    closed: CancellationToken,
    consumers: ConsumerRegistry,
}

#[derive(Clone)]
struct Live {
    connection: Arc<Connection>,
    publisher: Channel,
    generation: u64,
}

impl Live {
    fn healthy(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }
}

impl RabbitTransport {
    /// Connects and opens a publishing channel with confirms enabled. Fails if
    /// the broker cannot be reached now (callers retry at start); after that
    /// the transport reconnects by itself.
    pub async fn connect(
        url: &str,
        exchange: &str,
        confirm_timeout: Duration,
        connection_name: &str,
    ) -> Result<Self, TransportError> {
        let inner = Arc::new(Inner {
            url: url.to_owned(),
            connection_name: connection_name.to_owned(),
            exchange: exchange.to_owned(),
            confirm_timeout,
            reconnect: ReconnectPolicy::default(),
            topology: std::sync::Mutex::new(None),
            live: Mutex::new(None),
            reconnects: AtomicU64::new(0),
            closed: CancellationToken::new(),
            consumers: ConsumerRegistry::new(),
        });
        let live = inner.open(0).await?;
        *inner.live.lock().await = Some(live);
        Ok(Self { inner })
    }

    /// Sets the backoff between reconnection attempts.
    pub fn with_reconnect_policy(self, policy: ReconnectPolicy) -> Self {
        // Only called right after `connect`, before the transport is shared.
        match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => {
                inner.reconnect = policy;
                Self {
                    inner: Arc::new(inner),
                }
            }
            Err(inner) => Self { inner },
        }
    }

    /// Whether the current connection is open.
    pub fn is_connected(&self) -> bool {
        match self.inner.live.try_lock() {
            Ok(live) => live.as_ref().is_some_and(Live::healthy),
            // Someone holds the lock: a publish or a reconnect is under way.
            Err(_) => false,
        }
    }

    /// How many times the transport has reconnected since it was created.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Makes sure there is an open connection, reconnecting (once) if the
    /// current one is broken: what a readiness check asks ("can this host
    /// reach the broker now?"). Callers bound it with a timeout.
    pub async fn ensure_connected(&self) -> Result<(), TransportError> {
        self.inner.live().await.map(|_| ())
    }

    /// Declares the exchange, every queue, its error queue and its bindings,
    /// and remembers the topology so it is declared again after a reconnect.
    /// Idempotent: safe on every start.
    pub async fn declare(&self, topology: &Topology) -> Result<(), TransportError> {
        if let Ok(mut remembered) = self.inner.topology.lock() {
            *remembered = Some(topology.clone());
        }
        let live = self.inner.live().await?;
        declare_on(&live.connection, topology).await
    }

    /// Deletes the topology (tests clean up after themselves with this).
    pub async fn delete(&self, topology: &Topology) -> Result<(), TransportError> {
        let live = self.inner.live().await?;
        let channel = live.connection.create_channel().await?;
        for queue in &topology.queues {
            for name in [queue.name.clone(), queue.error_queue()] {
                channel
                    .queue_delete(ShortString::from(name), QueueDeleteOptions::default())
                    .await?;
            }
        }
        channel
            .exchange_delete(
                ShortString::from(topology.exchange.clone()),
                ExchangeDeleteOptions::default(),
            )
            .await?;
        let _ = channel.close(200, ShortString::from("deleted")).await;
        Ok(())
    }

    /// Publishes raw bytes to a queue through the default exchange (tests use
    /// this to inject malformed or duplicated messages; re-driving uses it to
    /// put dead letters back).
    pub async fn publish_to_queue(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), TransportError> {
        let live = self.inner.live().await?;
        let published = live
            .publisher
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue.to_owned()),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties.with_delivery_mode(2),
            )
            .await;
        let confirm = match published {
            Ok(confirm) => confirm,
            Err(e) => {
                self.inner.broken(live.generation).await;
                return Err(e.into());
            }
        };
        match tokio::time::timeout(self.inner.confirm_timeout, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(_)) => Err(TransportError::Broker(format!("{queue}: not routed"))),
            Ok(Err(e)) => {
                self.inner.broken(live.generation).await;
                Err(e.into())
            }
            Err(_) => Err(TransportError::ConfirmTimeout),
        }
    }

    /// Number of messages ready in a queue (declares it passively).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, TransportError> {
        let live = self.inner.live().await?;
        let channel = live.connection.create_channel().await?;
        let q = channel
            .queue_declare(
                ShortString::from(queue.to_owned()),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = channel.close(200, ShortString::from("depth")).await;
        Ok(q.message_count())
    }

    /// Moves up to `limit` messages from `queue`'s error queue back to
    /// `queue` (through the default exchange, so only that queue gets them),
    /// keeping their message id and type and dropping the error headers.
    /// Each message is acknowledged on the error queue only after the broker
    /// confirmed its copy, so a crash in between duplicates rather than
    /// loses it (and the inbox absorbs the duplicate). Returns the message id
    /// of each message moved.
    pub async fn redrive(
        &self,
        queue: &QueueSpec,
        limit: u32,
    ) -> Result<Vec<Option<String>>, TransportError> {
        let channel = self.error_queue_reader().await?;
        let mut moved = Vec::new();
        while moved.len() < limit as usize {
            let Some(delivery) = next_unacked(&channel, queue).await? else {
                break;
            };
            let mut properties =
                BasicProperties::default().with_content_type(ShortString::from("application/json"));
            if let Some(id) = delivery.properties.message_id() {
                properties = properties.with_message_id(id.clone());
            }
            if let Some(kind) = delivery.properties.kind() {
                properties = properties.with_type(kind.clone());
            }
            if let Some(correlation) = delivery.properties.correlation_id() {
                properties = properties.with_correlation_id(correlation.clone());
            }
            if let Some(trace) = trace_from(&delivery.properties) {
                let mut headers = FieldTable::default();
                insert_trace_headers(&mut headers, &trace);
                properties = properties.with_headers(headers);
            }
            self.publish_to_queue(&queue.name, &delivery.data, properties)
                .await?;
            delivery.acker.ack(BasicAckOptions::default()).await?;
            moved.push(
                delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.to_string()),
            );
        }
        let _ = channel.close(200, ShortString::from("redriven")).await;
        Ok(moved)
    }

    /// Reads up to `limit` messages of `queue`'s error queue without removing
    /// them (they go back when the inspecting channel closes), with the
    /// failure headers the consumer attached.
    pub async fn dead_letters(
        &self,
        queue: &QueueSpec,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, TransportError> {
        let channel = self.error_queue_reader().await?;
        let mut letters = Vec::new();
        while letters.len() < limit as usize {
            let Some(d) = next_unacked(&channel, queue).await? else {
                break;
            };
            let header = |name: &str| {
                d.properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get(name).cloned())
            };
            let text = |v: Option<AMQPValue>| match v {
                Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
                _ => None,
            };
            letters.push(DeadLetter {
                message_id: d.properties.message_id().as_ref().map(|s| s.to_string()),
                message_type: d.properties.kind().as_ref().map(|s| s.to_string()),
                reason: text(header("x-error-reason")),
                attempts: match header("x-attempts") {
                    Some(AMQPValue::LongUInt(n)) => Some(n),
                    _ => None,
                },
                original_routing_key: text(header("x-original-routing-key")),
                original_queue: text(header("x-original-queue")),
                body: d.data,
            });
        }
        // Closing the channel returns every message we looked at.
        let _ = channel.close(200, ShortString::from("inspected")).await;
        Ok(letters)
    }

    /// A channel of its own for reading an error queue: closing it returns
    /// every message read and not acknowledged.
    async fn error_queue_reader(&self) -> Result<Channel, TransportError> {
        let live = self.inner.live().await?;
        Ok(live.connection.create_channel().await?)
    }

    /// Closes the connection; subscriptions end.
    pub async fn close(&self) {
        self.inner.closed.cancel();
        self.inner
            .consumers
            .lost_all("transport closed", std::time::Instant::now());
        if let Some(live) = self.inner.live.lock().await.take() {
            let _ = live.connection.close(200, ShortString::from("bye")).await;
        }
    }
}

impl Inner {
    /// Opens a connection and a confirming publisher channel, and declares the
    /// remembered topology.
    async fn open(&self, generation: u64) -> Result<Live, TransportError> {
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(self.connection_name.clone()));
        let connection = Connection::connect(&self.url, properties).await?;
        let publisher = open_publisher(&connection).await?;
        let topology = self.topology.lock().ok().and_then(|t| t.clone());
        if let Some(topology) = topology {
            declare_on(&connection, &topology).await?;
        }
        Ok(Live {
            connection: Arc::new(connection),
            publisher,
            generation,
        })
    }

    /// The current connection, reconnecting (once) if it is broken.
    async fn live(&self) -> Result<Live, TransportError> {
        if self.closed.is_cancelled() {
            return Err(TransportError::Broker("transport closed".to_owned()));
        }
        let mut guard = self.live.lock().await;
        if let Some(live) = guard.as_mut() {
            if live.healthy() {
                return Ok(live.clone());
            }
            if live.connection.status().connected() {
                // Only the publisher channel was closed by a channel error,
                // such as publishing to an exchange someone deleted: a new
                // channel on the same connection, and the topology declared
                // again (best effort), will do.
                let limit = self.confirm_timeout;
                if let Ok(publisher) =
                    bounded(limit, "opening a channel", open_publisher(&live.connection)).await
                {
                    live.publisher = publisher;
                    let topology = self.topology.lock().ok().and_then(|t| t.clone());
                    if let Some(topology) = topology
                        && let Err(e) = bounded(
                            limit,
                            "declaring the topology",
                            declare_on(&live.connection, &topology),
                        )
                        .await
                    {
                        tracing::warn!(error = %e, "declaring the topology again failed");
                    }
                    return Ok(live.clone());
                }
            }
        }
        let generation = guard.as_ref().map_or(0, |l| l.generation) + 1;
        if let Some(old) = guard.take() {
            // Best effort: a dead connection may never answer its close.
            let _ = tokio::time::timeout(
                self.confirm_timeout,
                old.connection.close(200, ShortString::from("reconnecting")),
            )
            .await;
        }
        let live = bounded(self.confirm_timeout, "connecting", self.open(generation)).await?;
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        crate::metrics::broker_reconnected();
        tracing::warn!(
            connection = %self.connection_name,
            reconnects = self.reconnects.load(Ordering::Relaxed),
            "reconnected to RabbitMQ and declared the topology again"
        );
        *guard = Some(live.clone());
        Ok(live)
    }

    /// Declares the remembered topology on the current connection, logging
    /// instead of failing.
    async fn redeclare(&self) {
        let topology = self.topology.lock().ok().and_then(|t| t.clone());
        let Some(topology) = topology else {
            return;
        };
        match self.live().await {
            Ok(live) => {
                if let Err(e) = bounded(
                    self.confirm_timeout,
                    "declaring the topology",
                    declare_on(&live.connection, &topology),
                )
                .await
                {
                    tracing::warn!(error = %e, "declaring the topology again failed");
                }
            }
            Err(e) => tracing::debug!(error = %e, "no connection to declare the topology on"),
        }
    }

    /// Forgets the connection of `generation` (a publish on it failed), so
    /// the next caller reconnects.
    async fn broken(&self, generation: u64) {
        let mut guard = self.live.lock().await;
        if let Some(old) = guard.as_mut()
            && old.generation == generation
        {
            let _ = tokio::time::timeout(
                self.confirm_timeout,
                old.publisher.close(200, ShortString::from("broken")),
            )
            .await;
        }
    }

    /// Opens a channel with `prefetch` and starts consuming `queue`.
    async fn consume(
        &self,
        queue: &QueueSpec,
        consumer_tag: &str,
        prefetch: u16,
    ) -> Result<(Channel, lapin::Consumer), TransportError> {
        let live = self.live().await?;
        bounded(self.confirm_timeout, "subscribing", async {
            let channel = live.connection.create_channel().await?;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    ShortString::from(queue.name.clone()),
                    ShortString::from(consumer_tag.to_owned()),
                    // Manual acks: a message is only gone once handled.
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok((channel, consumer))
        })
        .await
    }
}

/// The next message of `queue`'s error queue, delivered for a manual ack.
async fn next_unacked(
    channel: &Channel,
    queue: &QueueSpec,
) -> Result<Option<lapin::message::Delivery>, TransportError> {
    let message = channel
        .basic_get(
            ShortString::from(queue.error_queue()),
            BasicGetOptions { no_ack: false },
        )
        .await?;
    Ok(message.map(|m| m.delivery))
}

/// Runs one broker operation of a (re)connect within `limit`. A broker that
/// accepted the TCP connection and then never answers (one that died while
/// starting) would otherwise hold the connection lock, and with it every
/// consumer and publisher of this transport, for ever.
async fn bounded<T>(
    limit: Duration,
    what: &str,
    op: impl std::future::Future<Output = Result<T, TransportError>>,
) -> Result<T, TransportError> {
    match tokio::time::timeout(limit, op).await {
        Ok(result) => result,
        Err(_) => Err(TransportError::Broker(format!(
            "{what}: no answer from the broker within {} ms",
            limit.as_millis()
        ))),
    }
}

/// A channel with publisher confirms enabled.
async fn open_publisher(connection: &Connection) -> Result<Channel, TransportError> {
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(publisher)
}

/// Declares `topology` on a fresh channel of `connection`.
async fn declare_on(connection: &Connection, topology: &Topology) -> Result<(), TransportError> {
    let channel = connection.create_channel().await?;
    // Durable: the exchange outlives broker restarts.
    channel
        .exchange_declare(
            ShortString::from(topology.exchange.clone()),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for queue in &topology.queues {
        for name in [queue.name.clone(), queue.error_queue()] {
            let mut arguments = FieldTable::default();
            arguments.insert(
                ShortString::from("x-queue-type"),
                AMQPValue::LongString(LongString::from(topology.queue_type.as_str())),
            );
            // Durable, shared by competing consumers, never auto-deleted:
            // messages survive restarts and consumers coming and going.
            channel
                .queue_declare(
                    ShortString::from(name),
                    QueueDeclareOptions {
                        durable: true,
                        exclusive: false,
                        auto_delete: false,
                        ..QueueDeclareOptions::default()
                    },
                    arguments,
                )
                .await?;
        }
        for key in &queue.routing_keys {
            channel
                .queue_bind(
                    ShortString::from(queue.name.clone()),
                    ShortString::from(topology.exchange.clone()),
                    ShortString::from(key.clone()),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    let _ = channel.close(200, ShortString::from("declared")).await;
    Ok(())
}

fn to_delivery(
    d: lapin::message::Delivery,
    ack_timeout: Duration,
    unsettled: &Arc<Unsettled>,
) -> Delivery {
    Delivery {
        message_id: d.properties.message_id().as_ref().map(|s| s.to_string()),
        message_type: d.properties.kind().as_ref().map(|s| s.to_string()),
        routing_key: d.routing_key.to_string(),
        redelivered: d.redelivered,
        trace: trace_from(&d.properties),
        body: d.data,
        acker: Box::new(RabbitAcker {
            acker: d.acker,
            tag: d.delivery_tag,
            unsettled: unsettled.clone(),
            timeout: ack_timeout,
        }),
    }
}

/// Keeps one subscription alive: consumes, and after the channel or the
/// connection is lost, resubscribes with backoff. Ends when the receiving
/// side is dropped or the transport is closed; closing its channel hands
/// every unacknowledged message back to the queue.
async fn keep_consuming(
    inner: Arc<Inner>,
    queue: QueueSpec,
    consumer_tag: String,
    prefetch: u16,
    sender: mpsc::Sender<Result<Delivery, TransportError>>,
    mut subscribed: Option<(Channel, lapin::Consumer)>,
) {
    let mut delay = inner.reconnect.initial;
    let mut first = true;
    loop {
        if inner.closed.is_cancelled() || sender.is_closed() {
            return;
        }
        let attempt = match subscribed.take() {
            Some(ready) => Ok(ready),
            None => inner.consume(&queue, &consumer_tag, prefetch).await,
        };
        match attempt {
            Ok((channel, mut consumer)) => {
                inner
                    .consumers
                    .registered(&consumer_tag, std::time::Instant::now());
                if !first {
                    tracing::warn!(
                        consumer = %consumer_tag,
                        queue = %queue.name,
                        "resubscribed after losing the broker"
                    );
                }
                first = false;
                delay = inner.reconnect.initial;
                // Delivery tags belong to the channel: a new subscription
                // starts a new record of what is unsettled.
                let unsettled = Arc::new(Unsettled::default());
                let lost = loop {
                    tokio::select! {
                        _ = inner.closed.cancelled() => break None,
                        _ = sender.closed() => break None,
                        item = consumer.next() => match item {
                            Some(Ok(d)) => {
                                unsettled.tags.lock().await.insert(d.delivery_tag);
                                if sender
                                    .send(Ok(to_delivery(d, inner.confirm_timeout, &unsettled)))
                                    .await
                                    .is_err()
                                {
                                    break None;
                                }
                            }
                            Some(Err(e)) => break Some(e.to_string()),
                            None => break Some("the broker cancelled the consumer".to_owned()),
                        }
                    }
                };
                // Hands back whatever was prefetched but not acknowledged.
                let _ = channel.close(200, ShortString::from("unsubscribed")).await;
                match &lost {
                    None => inner.consumers.lost(
                        &consumer_tag,
                        "unsubscribed",
                        std::time::Instant::now(),
                    ),
                    Some(reason) => {
                        inner.consumers.lost(
                            &consumer_tag,
                            reason.clone(),
                            std::time::Instant::now(),
                        );
                        crate::metrics::subscription_lost(&consumer_tag);
                    }
                }
                match lost {
                    None => return,
                    Some(reason) => tracing::warn!(
                        consumer = %consumer_tag,
                        queue = %queue.name,
                        reason,
                        "subscription lost; resubscribing"
                    ),
                }
            }
            Err(e) => {
                inner.consumers.lost(
                    &consumer_tag,
                    format!("cannot subscribe: {e}"),
                    std::time::Instant::now(),
                );
                tracing::warn!(
                    consumer = %consumer_tag,
                    queue = %queue.name,
                    error = %e,
                    "cannot subscribe; retrying in {delay:?}"
                );
                // The queue may have been deleted under us: declare the
                // topology again (best effort; the next attempt tells).
                inner.redeclare().await;
                tokio::select! {
                    _ = inner.closed.cancelled() => return,
                    _ = sender.closed() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = inner.reconnect.next(delay);
            }
        }
    }
}

fn properties_for(message: &OutgoingMessage) -> BasicProperties {
    let properties = BasicProperties::default()
        .with_message_id(ShortString::from(message.message_id.to_string()))
        .with_type(ShortString::from(message.message_type.clone()))
        .with_correlation_id(ShortString::from(message.correlation_id.clone()))
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2);
    match &message.trace {
        Some(trace) => {
            let mut headers = FieldTable::default();
            insert_trace_headers(&mut headers, trace);
            properties.with_headers(headers)
        }
        None => properties,
    }
}

/// Adds the W3C `traceparent` / `tracestate` headers.
fn insert_trace_headers(headers: &mut FieldTable, trace: &TraceContext) {
    headers.insert(
        ShortString::from(TRACEPARENT),
        AMQPValue::LongString(LongString::from(trace.traceparent().to_owned())),
    );
    if let Some(state) = trace.tracestate() {
        headers.insert(
            ShortString::from(TRACESTATE),
            AMQPValue::LongString(LongString::from(state.to_owned())),
        );
    }
}

/// The W3C trace context of a received message, when its headers carry a
/// valid one.
fn trace_from(properties: &BasicProperties) -> Option<TraceContext> {
    let headers = properties.headers().as_ref()?;
    let text = |name: &str| match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
        Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
        _ => None,
    };
    TraceContext::parse(&text(TRACEPARENT)?, text(TRACESTATE).as_deref())
}

#[async_trait]
impl Transport for RabbitTransport {
    async fn publish(
        &self,
        messages: &[OutgoingMessage],
    ) -> Result<Vec<Result<(), TransportError>>, TransportError> {
        let live = self.inner.live().await?;
        let mut confirms = Vec::with_capacity(messages.len());
        for message in messages {
            let published = live
                .publisher
                .basic_publish(
                    ShortString::from(self.inner.exchange.clone()),
                    ShortString::from(message.routing_key.clone()),
                    // mandatory: an unroutable message comes back instead of
                    // being confirmed and silently dropped.
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &message.body,
                    properties_for(message),
                )
                .await;
            match published {
                Ok(confirm) => confirms.push(confirm),
                Err(e) => {
                    self.inner.broken(live.generation).await;
                    return Err(e.into());
                }
            }
        }
        let waited = tokio::time::timeout(self.inner.confirm_timeout, join_all(confirms)).await;
        let Ok(results) = waited else {
            return Err(TransportError::ConfirmTimeout);
        };
        Ok(messages
            .iter()
            .zip(results)
            .map(|(message, result)| match result {
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Ack(Some(_))) => Err(TransportError::Broker(format!(
                    "message {} to `{}` was not routed to any queue",
                    message.message_id, message.routing_key
                ))),
                Ok(_) => Err(TransportError::NotConfirmed(message.message_id)),
                Err(e) => Err(e.into()),
            })
            .collect())
    }

    async fn subscribe(
        &self,
        queue: &QueueSpec,
        consumer_tag: &str,
        prefetch: u16,
    ) -> Result<BoxStream<'static, Result<Delivery, TransportError>>, TransportError> {
        // The first attempt happens here; if it fails (the broker is away,
        // the queue is missing), the background task keeps trying, declaring
        // the topology again, so a consumer never gives up at start either.
        let subscribed = match self.inner.consume(queue, consumer_tag, prefetch).await {
            Ok(subscribed) => Some(subscribed),
            Err(e) => {
                self.inner.consumers.lost(
                    consumer_tag,
                    format!("cannot subscribe yet: {e}"),
                    std::time::Instant::now(),
                );
                tracing::warn!(
                    consumer = %consumer_tag,
                    queue = %queue.name,
                    error = %e,
                    "cannot subscribe yet; retrying in the background"
                );
                self.inner.redeclare().await;
                None
            }
        };
        let (sender, receiver) = mpsc::channel(usize::from(prefetch.max(1)));
        tokio::spawn(keep_consuming(
            self.inner.clone(),
            queue.clone(),
            consumer_tag.to_owned(),
            prefetch,
            sender,
            subscribed,
        ));
        Ok(
            futures_util::stream::unfold(receiver, |mut receiver| async move {
                receiver.recv().await.map(|item| (item, receiver))
            })
            .boxed(),
        )
    }

    async fn dead_letter(
        &self,
        queue: &QueueSpec,
        delivery: &Delivery,
        reason: &str,
        attempts: u32,
    ) -> Result<(), TransportError> {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("x-error-reason"),
            AMQPValue::LongString(LongString::from(reason.to_owned())),
        );
        headers.insert(
            ShortString::from("x-attempts"),
            AMQPValue::LongUInt(attempts),
        );
        headers.insert(
            ShortString::from("x-original-routing-key"),
            AMQPValue::LongString(LongString::from(delivery.routing_key.clone())),
        );
        headers.insert(
            ShortString::from("x-original-queue"),
            AMQPValue::LongString(LongString::from(queue.name.clone())),
        );
        if let Some(trace) = &delivery.trace {
            insert_trace_headers(&mut headers, trace);
        }
        let mut properties = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_headers(headers);
        if let Some(id) = &delivery.message_id {
            properties = properties.with_message_id(ShortString::from(id.clone()));
        }
        if let Some(kind) = &delivery.message_type {
            properties = properties.with_type(ShortString::from(kind.clone()));
        }
        self.publish_to_queue(&queue.error_queue(), &delivery.body, properties)
            .await
    }

    fn consumer_status(&self) -> Option<ConsumerRegistry> {
        Some(self.inner.consumers.clone())
    }
}

/// The delivery tags of one subscription's channel that are not settled
/// yet. Settlements on the channel take its lock and hold it until their
/// frame is out, so frames leave in the order the record changes: a batch
/// acknowledged with one `multiple` frame never overtakes (or is overtaken
/// by) a single settlement of a tag it covers, which the broker would
/// answer by closing the channel.
#[derive(Default)]
struct Unsettled {
    tags: Mutex<std::collections::BTreeSet<u64>>,
}

/// Settles one delivery. Each settlement is bounded by
/// `rabbitmq.confirm_timeout_ms`: when the connection dies under an ack,
/// lapin's future can stay pending for good (seen in the fault suite: the
/// consumer waited on it for minutes, stopped taking deliveries and never
/// noticed that the broker had cancelled it). A timed-out ack is an error;
/// the broker redelivers the message and the inbox skips it.
struct RabbitAcker {
    acker: lapin::Acker,
    tag: u64,
    unsettled: Arc<Unsettled>,
    timeout: Duration,
}

impl RabbitAcker {
    async fn bounded<F>(&self, what: &str, op: F) -> Result<bool, TransportError>
    where
        F: std::future::Future<Output = lapin::Result<bool>>,
    {
        match tokio::time::timeout(self.timeout, op).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(TransportError::Broker(format!(
                "{what} not settled within {} ms: the connection is gone; the broker redelivers",
                self.timeout.as_millis()
            ))),
        }
    }

    /// Acknowledges this delivery (and, with `multiple`, every unsettled
    /// one before it on the channel). The caller holds the channel's
    /// record of unsettled tags.
    async fn ack_holding(&self, multiple: bool) -> Result<(), TransportError> {
        // After a connection recovery an ack on the old channel returns
        // Ok(false): the broker will redeliver, and the inbox skips it.
        if !self
            .bounded("ack", self.acker.ack(BasicAckOptions { multiple }))
            .await?
        {
            return Err(TransportError::Broker(
                "ack not delivered: channel was closed".to_owned(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Acknowledger for RabbitAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        let mut unsettled = self.unsettled.tags.lock().await;
        let acked = self.ack_holding(false).await;
        unsettled.remove(&self.tag);
        acked
    }

    async fn requeue(&self) -> Result<(), TransportError> {
        let mut unsettled = self.unsettled.tags.lock().await;
        let requeued = self
            .bounded(
                "requeue",
                self.acker.nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                }),
            )
            .await;
        unsettled.remove(&self.tag);
        requeued.map(|_| ())
    }

    /// One `basic.ack` with `multiple` for the whole batch when the batch
    /// is every unsettled delivery up to its highest tag (nothing earlier on
    /// the channel is still being handled or retried); otherwise one
    /// `basic.ack` per delivery, so an earlier message still being retried
    /// is neither acknowledged early nor made to hold the batch back.
    async fn ack_batch(&self, batch: &[&dyn Acknowledger]) -> Vec<Result<(), TransportError>> {
        let ours: Option<Vec<&RabbitAcker>> = batch
            .iter()
            .map(|a| {
                a.as_any()
                    .and_then(|any| any.downcast_ref::<RabbitAcker>())
                    .filter(|r| Arc::ptr_eq(&r.unsettled, &self.unsettled))
            })
            .collect();
        let Some(ours) = ours else {
            let mut results = Vec::with_capacity(batch.len());
            for acker in batch {
                results.push(acker.ack().await);
            }
            return results;
        };
        let Some(last) = ours.iter().copied().max_by_key(|r| r.tag) else {
            return Vec::new();
        };
        let mut unsettled = self.unsettled.tags.lock().await;
        let tags: std::collections::BTreeSet<u64> = ours.iter().map(|r| r.tag).collect();
        let contiguous = tags.len() == ours.len()
            && tags.iter().all(|t| unsettled.contains(t))
            && unsettled.range(..=last.tag).count() == tags.len();
        if contiguous && ours.len() > 1 {
            let acked = last.ack_holding(true).await;
            for tag in &tags {
                unsettled.remove(tag);
            }
            return ours
                .iter()
                .map(|_| match &acked {
                    Ok(()) => Ok(()),
                    Err(e) => Err(TransportError::Broker(e.to_string())),
                })
                .collect();
        }
        // One at a time. After a failure the channel is gone (acks on a
        // live channel do not fail one by one): the rest are not tried, so
        // a dead connection costs one timeout, not one per delivery; the
        // broker redelivers them and the inbox skips them.
        let mut results = Vec::with_capacity(ours.len());
        let mut failed: Option<String> = None;
        for acker in ours {
            let result = match &failed {
                Some(reason) => Err(TransportError::Broker(format!(
                    "ack not tried: an earlier ack on this channel failed ({reason})"
                ))),
                None => acker.ack_holding(false).await,
            };
            if let Err(e) = &result {
                failed.get_or_insert_with(|| e.to_string());
            }
            unsettled.remove(&acker.tag);
            results.push(result);
        }
        results
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}
