//! In-process transport: a topic exchange, queues and consumers in memory.
//!
//! It behaves like the RabbitMQ transport where the engine can tell the
//! difference, so the embedded single-process mode and tests run the same
//! consumers and relay unchanged:
//!
//! - **Topic routing.** Queues are bound with routing keys that may use the
//!   AMQP wildcards `*` (exactly one dot-separated word) and `#` (zero or more
//!   words). A message goes to every queue with a matching binding, once per
//!   queue.
//! - **Mandatory publishing.** A message that matches no binding is an error
//!   for that message (RabbitMQ returns it under `mandatory`); a routed
//!   message is "confirmed" as soon as it is enqueued.
//! - **Prefetch, ack, requeue.** Each subscription has at most `prefetch`
//!   unacknowledged deliveries. `requeue` puts the message back at the head of
//!   its queue, marked redelivered; an acknowledger dropped without settling
//!   does the same (like a channel closing with unacked messages).
//! - **Competing consumers.** Several subscriptions on one queue share its
//!   messages; each message goes to one of them.
//! - **Error queues.** [`Transport::dead_letter`] moves a delivery to
//!   `<queue>.error`, keeping its body, `message_id` and type, with the
//!   headers `x-error-reason`, `x-attempts`, `x-original-routing-key` and
//!   `x-original-queue`.
//!
//! Nothing is durable: messages live as long as the [`MemoryTransport`]. The
//! embedded mode is safe anyway because events are only published from the
//! database outbox, and a message lost with the process is one the outbox
//! has not yet marked sent or one the inbox has already recorded.
//!
//! For tests, the transport can be inspected ([`MemoryTransport::published`],
//! [`MemoryTransport::messages`], [`MemoryTransport::ready_count`],
//! [`MemoryTransport::unacked_count`]) and fed raw messages
//! ([`MemoryTransport::publish_to_queue`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use futures_util::stream::{self, BoxStream, StreamExt};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::rabbitmq::Topology;
use super::{Acknowledger, Delivery, OutgoingMessage, QueueSpec, Transport};
use crate::error::TransportError;
use crate::trace::{TRACEPARENT, TRACESTATE, TraceContext};

/// Header naming why a message was dead-lettered.
pub const HEADER_ERROR_REASON: &str = "x-error-reason";
/// Header with the number of handler attempts before dead-lettering.
pub const HEADER_ATTEMPTS: &str = "x-attempts";
/// Header with the routing key the message originally arrived with.
pub const HEADER_ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
/// Header naming the queue the message was dead-lettered from.
pub const HEADER_ORIGINAL_QUEUE: &str = "x-original-queue";

/// A message held in a queue (a snapshot; changing it changes nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueuedMessage {
    /// The payload, as published.
    pub body: Vec<u8>,
    /// The routing key it was published with (the queue name for messages
    /// put straight into a queue, like RabbitMQ's default exchange).
    pub routing_key: String,
    /// The `message_id` property.
    pub message_id: Option<String>,
    /// The `type` property.
    pub message_type: Option<String>,
    /// The `correlation_id` property.
    pub correlation_id: Option<String>,
    /// Headers (dead-lettered messages carry the `x-...` headers above).
    pub headers: BTreeMap<String, String>,
    /// Whether the message was delivered before and given back.
    pub redelivered: bool,
}

impl QueuedMessage {
    /// A message with just a body and routing key (for
    /// [`MemoryTransport::publish_to_queue`]).
    pub fn new(routing_key: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        Self {
            body: body.into(),
            routing_key: routing_key.into(),
            ..Self::default()
        }
    }

    fn from_outgoing(message: &OutgoingMessage) -> Self {
        Self {
            body: message.body.clone(),
            routing_key: message.routing_key.clone(),
            message_id: Some(message.message_id.to_string()),
            message_type: Some(message.message_type.clone()),
            correlation_id: Some(message.correlation_id.clone()),
            headers: trace_headers(message.trace.as_ref()),
            redelivered: false,
        }
    }
}

/// One queue: ready messages in order, unacknowledged ones by delivery tag.
#[derive(Default)]
struct Queue {
    ready: VecDeque<QueuedMessage>,
    unacked: HashMap<u64, QueuedMessage>,
    /// Woken whenever a message becomes ready or the transport closes.
    notify: Arc<Notify>,
}

struct Binding {
    pattern: String,
    queue: String,
}

#[derive(Default)]
struct State {
    queues: HashMap<String, Queue>,
    bindings: Vec<Binding>,
    published: Vec<OutgoingMessage>,
    next_tag: u64,
    closed: bool,
}

impl State {
    fn enqueue(&mut self, queue: &str, message: QueuedMessage) -> Result<(), TransportError> {
        let q = self
            .queues
            .get_mut(queue)
            .ok_or_else(|| TransportError::Broker(format!("no queue `{queue}`")))?;
        q.ready.push_back(message);
        q.notify.notify_waiters();
        Ok(())
    }

    /// The queues whose bindings match `routing_key`, each once, in binding order.
    fn route(&self, routing_key: &str) -> Vec<String> {
        let mut targets: Vec<String> = Vec::new();
        for binding in &self.bindings {
            if topic_matches(&binding.pattern, routing_key) && !targets.contains(&binding.queue) {
                targets.push(binding.queue.clone());
            }
        }
        targets
    }
}

/// An in-process message broker implementing [`Transport`]. Cloning shares
/// the same exchange and queues.
#[derive(Clone, Default)]
pub struct MemoryTransport {
    state: Arc<Mutex<State>>,
    consumers: super::status::ConsumerRegistry,
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryTransport")
            .field("queues", &state.queues.len())
            .field("bindings", &state.bindings.len())
            .field("published", &state.published.len())
            .field("closed", &state.closed)
            .finish()
    }
}

impl MemoryTransport {
    /// An empty broker: no queues, no bindings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Locks the state. A panic while holding the lock cannot leave the
    /// plain collections inside half-updated in a way that matters, so a
    /// poisoned lock is simply taken over.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Declares a queue, its `.error` queue and the queue's bindings.
    /// Idempotent, like the RabbitMQ declaration.
    pub fn declare_queue(&self, queue: &QueueSpec) {
        let mut state = self.lock();
        for name in [queue.name.clone(), queue.error_queue()] {
            state.queues.entry(name).or_default();
        }
        for key in &queue.routing_keys {
            let exists = state
                .bindings
                .iter()
                .any(|b| b.queue == queue.name && &b.pattern == key);
            if !exists {
                state.bindings.push(Binding {
                    pattern: key.clone(),
                    queue: queue.name.clone(),
                });
            }
        }
    }

    /// Declares every queue of `topology` (the exchange name and queue type
    /// have no meaning in memory and are ignored).
    pub fn declare(&self, topology: &Topology) {
        for queue in &topology.queues {
            self.declare_queue(queue);
        }
    }

    /// Puts a message straight into `queue`, bypassing routing (like
    /// publishing to RabbitMQ's default exchange). Tests use it to inject
    /// malformed or duplicated messages. Fails when the queue does not exist.
    pub fn publish_to_queue(
        &self,
        queue: &str,
        message: QueuedMessage,
    ) -> Result<(), TransportError> {
        let mut state = self.lock();
        if state.closed {
            return Err(closed());
        }
        state.enqueue(queue, message)
    }

    /// Every message accepted by [`Transport::publish`] so far, in order
    /// (unroutable ones are not included).
    pub fn published(&self) -> Vec<OutgoingMessage> {
        self.lock().published.clone()
    }

    /// Returns and forgets the messages accepted by [`Transport::publish`].
    pub fn take_published(&self) -> Vec<OutgoingMessage> {
        std::mem::take(&mut self.lock().published)
    }

    /// The messages ready in `queue` (not yet delivered, or given back), in
    /// delivery order; `None` when there is no such queue.
    pub fn messages(&self, queue: &str) -> Option<Vec<QueuedMessage>> {
        self.lock()
            .queues
            .get(queue)
            .map(|q| q.ready.iter().cloned().collect())
    }

    /// Number of messages ready in `queue` (0 when there is no such queue).
    pub fn ready_count(&self, queue: &str) -> usize {
        self.lock().queues.get(queue).map_or(0, |q| q.ready.len())
    }

    /// Number of messages delivered from `queue` and not yet settled.
    pub fn unacked_count(&self, queue: &str) -> usize {
        self.lock().queues.get(queue).map_or(0, |q| q.unacked.len())
    }

    /// Moves up to `limit` ready messages of `queue`'s error queue back to
    /// `queue`, in order, keeping their body, message id, type, correlation
    /// id and trace headers and dropping the failure headers (what
    /// [`RabbitTransport::redrive`](super::rabbitmq::RabbitTransport::redrive)
    /// does on RabbitMQ). Returns the message id of each message moved.
    pub fn redrive(
        &self,
        queue: &QueueSpec,
        limit: u32,
    ) -> Result<Vec<Option<String>>, TransportError> {
        let mut state = self.lock();
        if state.closed {
            return Err(closed());
        }
        if !state.queues.contains_key(&queue.name) {
            return Err(TransportError::Broker(format!("no queue `{}`", queue.name)));
        }
        let error_queue = queue.error_queue();
        let mut moved = Vec::new();
        while moved.len() < limit as usize {
            let Some(mut message) = state
                .queues
                .get_mut(&error_queue)
                .and_then(|q| q.ready.pop_front())
            else {
                break;
            };
            message
                .headers
                .retain(|name, _| name == TRACEPARENT || name == TRACESTATE);
            // Through the default exchange, as on RabbitMQ.
            message.routing_key = queue.name.clone();
            message.redelivered = false;
            moved.push(message.message_id.clone());
            state.enqueue(&queue.name, message)?;
        }
        Ok(moved)
    }

    /// Names of every declared queue, sorted.
    pub fn queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().queues.keys().cloned().collect();
        names.sort();
        names
    }

    /// Closes the broker: publishing fails from now on and every
    /// subscription's stream ends (consumers see the end of their stream, as
    /// when a RabbitMQ connection dies). Unsettled deliveries can still be
    /// acknowledged or requeued.
    pub fn close(&self) {
        self.consumers
            .lost_all("transport closed", std::time::Instant::now());
        let mut state = self.lock();
        state.closed = true;
        for queue in state.queues.values() {
            queue.notify.notify_waiters();
        }
    }

    /// Takes the next ready message of `queue` for a delivery, or says why not.
    fn take(&self, queue: &str) -> Take {
        let mut state = self.lock();
        if state.closed {
            return Take::Closed;
        }
        state.next_tag += 1;
        let tag = state.next_tag;
        let Some(q) = state.queues.get_mut(queue) else {
            return Take::NoQueue;
        };
        match q.ready.pop_front() {
            Some(message) => {
                q.unacked.insert(tag, message.clone());
                Take::Message(tag, message)
            }
            None => Take::Empty,
        }
    }

    /// Settles delivery `tag` of `queue`: forgets it (ack) or puts it back at
    /// the head of the queue, marked redelivered (requeue).
    fn settle(&self, queue: &str, tag: u64, requeue: bool) -> Result<(), TransportError> {
        let mut state = self.lock();
        let q = state
            .queues
            .get_mut(queue)
            .ok_or_else(|| TransportError::Broker(format!("no queue `{queue}`")))?;
        let message = q.unacked.remove(&tag).ok_or_else(|| {
            TransportError::Broker(format!("delivery {tag} on `{queue}` already settled"))
        })?;
        if requeue {
            q.ready.push_front(QueuedMessage {
                redelivered: true,
                ..message
            });
            q.notify.notify_waiters();
        }
        Ok(())
    }
}

enum Take {
    Message(u64, QueuedMessage),
    Empty,
    NoQueue,
    Closed,
}

fn closed() -> TransportError {
    TransportError::Broker("the in-memory transport is closed".to_owned())
}

/// AMQP topic matching: words separated by `.`, `*` matches exactly one
/// word, `#` matches zero or more words.
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    fn go(pattern: &[&str], key: &[&str]) -> bool {
        match (pattern.split_first(), key.split_first()) {
            (None, None) => true,
            (Some((&"#", rest)), _) => {
                // `#` swallows zero words, or one word and stays.
                go(rest, key) || (!key.is_empty() && go(pattern, &key[1..]))
            }
            (Some((&"*", rest)), Some((_, key_rest))) => go(rest, key_rest),
            (Some((word, rest)), Some((k, key_rest))) => word == k && go(rest, key_rest),
            _ => false,
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = routing_key.split('.').collect();
    go(&pattern, &key)
}

/// Settles one delivery; requeues it when dropped unsettled.
struct MemoryAcker {
    transport: MemoryTransport,
    queue: String,
    tag: u64,
    settled: Mutex<bool>,
    /// The subscription's prefetch slot, freed once the delivery is settled.
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl MemoryAcker {
    fn settle(&self, requeue: bool) -> Result<(), TransportError> {
        {
            let mut settled = self
                .settled
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if *settled {
                return Err(TransportError::Broker(format!(
                    "delivery {} on `{}` already settled",
                    self.tag, self.queue
                )));
            }
            *settled = true;
        }
        let result = self.transport.settle(&self.queue, self.tag, requeue);
        self.permit
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        result
    }
}

#[async_trait]
impl Acknowledger for MemoryAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        self.settle(false)
    }

    async fn requeue(&self) -> Result<(), TransportError> {
        self.settle(true)
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        let settled = *self
            .settled
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !settled {
            // Like a channel closing with unacked messages: back to the queue.
            let _ = self.transport.settle(&self.queue, self.tag, true);
        }
    }
}

struct Subscription {
    transport: MemoryTransport,
    queue: String,
    /// The queue's wake-up signal (queues are never removed, so it is stable).
    notify: Arc<Notify>,
    slots: Arc<Semaphore>,
}

impl Subscription {
    /// Waits for a free prefetch slot and a ready message; `None` once the
    /// transport is closed or the queue is gone.
    async fn next(&self) -> Option<Result<Delivery, TransportError>> {
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register before looking, so a message enqueued between the look
            // and the wait still wakes us.
            notified.as_mut().enable();
            match self.transport.take(&self.queue) {
                Take::Message(tag, message) => {
                    return Some(Ok(Delivery {
                        body: message.body,
                        routing_key: message.routing_key,
                        message_id: message.message_id,
                        message_type: message.message_type,
                        redelivered: message.redelivered,
                        trace: TraceContext::parse(
                            message.headers.get(TRACEPARENT).map_or("", String::as_str),
                            message.headers.get(TRACESTATE).map(String::as_str),
                        ),
                        acker: Box::new(MemoryAcker {
                            transport: self.transport.clone(),
                            queue: self.queue.clone(),
                            tag,
                            settled: Mutex::new(false),
                            permit: Mutex::new(Some(permit)),
                        }),
                    }));
                }
                Take::Empty => notified.await,
                Take::NoQueue | Take::Closed => return None,
            }
        }
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn publish(
        &self,
        messages: &[OutgoingMessage],
    ) -> Result<Vec<Result<(), TransportError>>, TransportError> {
        let mut state = self.lock();
        if state.closed {
            return Err(closed());
        }
        let mut results = Vec::with_capacity(messages.len());
        for message in messages {
            let targets = state.route(&message.routing_key);
            if targets.is_empty() {
                results.push(Err(TransportError::Broker(format!(
                    "message {} to `{}` was not routed to any queue",
                    message.message_id, message.routing_key
                ))));
                continue;
            }
            let queued = QueuedMessage::from_outgoing(message);
            let mut result = Ok(());
            for queue in targets {
                if let Err(e) = state.enqueue(&queue, queued.clone()) {
                    result = Err(e);
                }
            }
            if result.is_ok() {
                state.published.push(message.clone());
            }
            results.push(result);
        }
        Ok(results)
    }

    async fn subscribe(
        &self,
        queue: &QueueSpec,
        consumer_tag: &str,
        prefetch: u16,
    ) -> Result<BoxStream<'static, Result<Delivery, TransportError>>, TransportError> {
        let notify = {
            let state = self.lock();
            if state.closed {
                return Err(closed());
            }
            match state.queues.get(&queue.name) {
                Some(q) => q.notify.clone(),
                None => {
                    return Err(TransportError::Broker(format!(
                        "no queue `{}` (declare it first)",
                        queue.name
                    )));
                }
            }
        };
        self.consumers
            .registered(consumer_tag, std::time::Instant::now());
        let subscription = Arc::new(Subscription {
            transport: self.clone(),
            queue: queue.name.clone(),
            notify,
            slots: Arc::new(Semaphore::new(usize::from(prefetch.max(1)))),
        });
        Ok(stream::unfold(subscription, |subscription| async move {
            let item = subscription.next().await?;
            Some((item, subscription))
        })
        .boxed())
    }

    async fn dead_letter(
        &self,
        queue: &QueueSpec,
        delivery: &Delivery,
        reason: &str,
        attempts: u32,
    ) -> Result<(), TransportError> {
        let mut headers = trace_headers(delivery.trace.as_ref());
        headers.extend([
            (HEADER_ERROR_REASON.to_owned(), reason.to_owned()),
            (HEADER_ATTEMPTS.to_owned(), attempts.to_string()),
            (
                HEADER_ORIGINAL_ROUTING_KEY.to_owned(),
                delivery.routing_key.clone(),
            ),
            (HEADER_ORIGINAL_QUEUE.to_owned(), queue.name.clone()),
        ]);
        let error_queue = queue.error_queue();
        self.publish_to_queue(
            &error_queue,
            QueuedMessage {
                body: delivery.body.clone(),
                routing_key: error_queue.clone(),
                message_id: delivery.message_id.clone(),
                message_type: delivery.message_type.clone(),
                correlation_id: None,
                headers,
                redelivered: false,
            },
        )
    }

    fn consumer_status(&self) -> Option<super::status::ConsumerRegistry> {
        Some(self.consumers.clone())
    }
}

/// The W3C trace context as message headers (none without a context).
fn trace_headers(trace: Option<&TraceContext>) -> BTreeMap<String, String> {
    let mut headers = BTreeMap::new();
    if let Some(trace) = trace {
        headers.insert(TRACEPARENT.to_owned(), trace.traceparent().to_owned());
        if let Some(state) = trace.tracestate() {
            headers.insert(TRACESTATE.to_owned(), state.to_owned());
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;
    use uuid::Uuid;

    use super::*;

    fn spec(name: &str, keys: &[&str]) -> QueueSpec {
        QueueSpec {
            name: name.to_owned(),
            routing_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        }
    }

    fn message(routing_key: &str, body: &str) -> OutgoingMessage {
        OutgoingMessage {
            message_id: Uuid::new_v4(),
            message_type: "OrderCreated".to_owned(),
            correlation_id: "42".to_owned(),
            routing_key: routing_key.to_owned(),
            body: body.as_bytes().to_vec(),
            trace: None,
        }
    }

    async fn publish_ok(transport: &MemoryTransport, messages: &[OutgoingMessage]) {
        let results = transport.publish(messages).await.expect("publish");
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }

    #[test]
    fn topic_wildcards_match_like_amqp() {
        let cases = [
            ("order.created", "order.created", true),
            ("order.created", "order.completed", false),
            ("order.*", "order.created", true),
            ("order.*", "order", false),
            ("order.*", "order.created.late", false),
            ("*.created", "order.created", true),
            ("order.#", "order", true),
            ("order.#", "order.created.late", true),
            ("#", "anything.at.all", true),
            ("#", "", true),
            ("#.expired", "order.expired", true),
            ("#.expired", "expired", true),
            ("order.#.late", "order.a.b.late", true),
            ("order.#.late", "order.a.b.early", false),
            ("*", "order.created", false),
        ];
        for (pattern, key, expected) in cases {
            assert_eq!(
                topic_matches(pattern, key),
                expected,
                "pattern `{pattern}` against `{key}`"
            );
        }
    }

    #[tokio::test]
    async fn a_message_goes_to_every_matching_queue_once() {
        let t = MemoryTransport::new();
        t.declare_queue(&spec("saga", &["order.created"]));
        t.declare_queue(&spec("all", &["order.*", "order.#", "order.created"]));
        t.declare_queue(&spec("other", &["payment.*"]));
        publish_ok(&t, &[message("order.created", "a")]).await;
        assert_eq!(t.ready_count("saga"), 1);
        assert_eq!(t.ready_count("all"), 1, "one copy despite three bindings");
        assert_eq!(t.ready_count("other"), 0);
        assert_eq!(t.published().len(), 1);
        let queued = t.messages("all").expect("queue exists");
        assert_eq!(queued[0].body, b"a");
        assert_eq!(queued[0].routing_key, "order.created");
        assert_eq!(queued[0].message_type.as_deref(), Some("OrderCreated"));
    }

    #[tokio::test]
    async fn an_unroutable_message_is_an_error_and_the_rest_still_go() {
        let t = MemoryTransport::new();
        t.declare_queue(&spec("saga", &["order.created"]));
        let results = t
            .publish(&[message("order.nobody", "x"), message("order.created", "y")])
            .await
            .expect("publish");
        assert!(matches!(&results[0], Err(TransportError::Broker(m)) if m.contains("not routed")));
        assert!(results[1].is_ok());
        assert_eq!(t.ready_count("saga"), 1);
        assert_eq!(t.published().len(), 1, "only the routed message counts");
        assert_eq!(t.take_published().len(), 1);
        assert!(t.published().is_empty());
    }

    #[tokio::test]
    async fn prefetch_bounds_unacknowledged_deliveries() {
        let t = MemoryTransport::new();
        let q = spec("saga", &["order.created"]);
        t.declare_queue(&q);
        publish_ok(
            &t,
            &[message("order.created", "1"), message("order.created", "2")],
        )
        .await;
        let mut stream = t.subscribe(&q, "c", 1).await.expect("subscribe");
        let first = stream.next().await.expect("item").expect("delivery");
        assert_eq!(first.body, b"1");
        assert!(
            stream.next().now_or_never().is_none(),
            "a second delivery before the first is acked"
        );
        assert_eq!(t.unacked_count("saga"), 1);
        assert_eq!(t.ready_count("saga"), 1);
        first.acker.ack().await.expect("ack");
        let second = stream.next().await.expect("item").expect("delivery");
        assert_eq!(second.body, b"2");
        second.acker.ack().await.expect("ack");
        assert_eq!(t.unacked_count("saga"), 0);
        assert_eq!(t.ready_count("saga"), 0);
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken_by_a_later_publish() {
        let t = MemoryTransport::new();
        let q = spec("saga", &["order.created"]);
        t.declare_queue(&q);
        let mut stream = t.subscribe(&q, "c", 4).await.expect("subscribe");
        let waiting = tokio::spawn(async move { stream.next().await.map(|d| d.map(|d| d.body)) });
        publish_ok(&t, &[message("order.created", "late")]).await;
        let body = waiting
            .await
            .expect("task")
            .expect("item")
            .expect("delivery");
        assert_eq!(body, b"late");
    }

    #[tokio::test]
    async fn requeue_gives_the_message_back_first_and_marked_redelivered() {
        let t = MemoryTransport::new();
        let q = spec("saga", &["order.created"]);
        t.declare_queue(&q);
        publish_ok(
            &t,
            &[message("order.created", "1"), message("order.created", "2")],
        )
        .await;
        let mut stream = t.subscribe(&q, "c", 1).await.expect("subscribe");
        let first = stream.next().await.expect("item").expect("delivery");
        assert!(!first.redelivered);
        first.acker.requeue().await.expect("requeue");
        assert!(
            first.acker.ack().await.is_err(),
            "a settled delivery cannot be settled again"
        );
        let again = stream.next().await.expect("item").expect("delivery");
        assert_eq!(again.body, b"1");
        assert!(again.redelivered);
        again.acker.ack().await.expect("ack");
    }

    #[tokio::test]
    async fn a_delivery_dropped_unsettled_is_requeued() {
        let t = MemoryTransport::new();
        let q = spec("saga", &["order.created"]);
        t.declare_queue(&q);
        publish_ok(&t, &[message("order.created", "1")]).await;
        let mut stream = t.subscribe(&q, "c", 1).await.expect("subscribe");
        let delivery = stream.next().await.expect("item").expect("delivery");
        assert_eq!(t.ready_count("saga"), 0);
        drop(delivery);
        assert_eq!(t.ready_count("saga"), 1);
        assert_eq!(t.unacked_count("saga"), 0);
        let again = stream.next().await.expect("item").expect("delivery");
        assert!(again.redelivered);
    }

    #[tokio::test]
    async fn competing_consumers_share_a_queue_without_duplicates() {
        let t = MemoryTransport::new();
        let q = spec("saga", &["order.created"]);
        t.declare_queue(&q);
        let mut a = t.subscribe(&q, "a", 1).await.expect("subscribe");
        let mut b = t.subscribe(&q, "b", 1).await.expect("subscribe");
        publish_ok(
            &t,
            &[message("order.created", "1"), message("order.created", "2")],
        )
        .await;
        let da = a.next().await.expect("item").expect("delivery");
        let db = b.next().await.expect("item").expect("delivery");
        let mut bodies = vec![da.body.clone(), db.body.clone()];
        bodies.sort();
        assert_eq!(bodies, vec![b"1".to_vec(), b"2".to_vec()]);
        assert!(a.next().now_or_never().is_none());
        da.acker.ack().await.expect("ack");
        db.acker.ack().await.expect("ack");
    }

    #[tokio::test]
    async fn dead_letter_keeps_reason_attempts_and_original_routing_key() {
        let t = MemoryTransport::new();
        let q = spec("saga", &["order.created"]);
        t.declare_queue(&q);
        let sent = message("order.created", "{bad");
        publish_ok(&t, std::slice::from_ref(&sent)).await;
        let mut stream = t.subscribe(&q, "c", 1).await.expect("subscribe");
        let delivery = stream.next().await.expect("item").expect("delivery");
        t.dead_letter(&q, &delivery, "undecodable", 3)
            .await
            .expect("dead letter");
        delivery.acker.ack().await.expect("ack");
        assert_eq!(t.ready_count("saga"), 0);
        let errors = t.messages("saga.error").expect("error queue");
        assert_eq!(errors.len(), 1);
        let e = &errors[0];
        assert_eq!(e.body, b"{bad");
        assert_eq!(e.message_id, Some(sent.message_id.to_string()));
        assert_eq!(e.message_type.as_deref(), Some("OrderCreated"));
        assert_eq!(e.headers[HEADER_ERROR_REASON], "undecodable");
        assert_eq!(e.headers[HEADER_ATTEMPTS], "3");
        assert_eq!(e.headers[HEADER_ORIGINAL_ROUTING_KEY], "order.created");
        assert_eq!(e.headers[HEADER_ORIGINAL_QUEUE], "saga");
    }

    #[tokio::test]
    async fn redrive_moves_dead_letters_back_without_their_failure_headers() {
        let t = MemoryTransport::new();
        let q = spec("saga", &["order.created"]);
        t.declare_queue(&q);
        let sent = [
            message("order.created", "{bad"),
            message("order.created", "{worse"),
        ];
        publish_ok(&t, &sent).await;
        let mut stream = t.subscribe(&q, "c", 2).await.expect("subscribe");
        for _ in 0..2 {
            let delivery = stream.next().await.expect("item").expect("delivery");
            t.dead_letter(&q, &delivery, "undecodable", 0)
                .await
                .expect("dead letter");
            delivery.acker.ack().await.expect("ack");
        }
        drop(stream);
        assert_eq!(t.ready_count("saga.error"), 2);

        let moved = t.redrive(&q, 1).expect("redrive one");
        assert_eq!(moved, [Some(sent[0].message_id.to_string())]);
        assert_eq!(t.ready_count("saga.error"), 1);
        let back = t.messages("saga").expect("queue");
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].body, b"{bad");
        assert_eq!(back[0].message_type.as_deref(), Some("OrderCreated"));
        assert_eq!(back[0].routing_key, "saga");
        assert!(back[0].headers.is_empty(), "{:?}", back[0].headers);

        let rest = t.redrive(&q, 10).expect("redrive the rest");
        assert_eq!(rest, [Some(sent[1].message_id.to_string())]);
        assert_eq!(t.ready_count("saga.error"), 0);
        assert_eq!(t.ready_count("saga"), 2);
        assert!(t.redrive(&q, 10).expect("nothing left").is_empty());
    }

    #[tokio::test]
    async fn the_trace_context_travels_in_headers_and_into_the_error_queue() {
        let t = MemoryTransport::new();
        let q = spec("saga", &["order.created"]);
        t.declare_queue(&q);
        let trace = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("vendor=value"),
        );
        let mut sent = message("order.created", "{}");
        sent.trace = trace.clone();
        publish_ok(&t, std::slice::from_ref(&sent)).await;
        let mut stream = t.subscribe(&q, "c", 1).await.expect("subscribe");
        let delivery = stream.next().await.expect("item").expect("delivery");
        assert_eq!(delivery.trace, trace);
        t.dead_letter(&q, &delivery, "failed", 3)
            .await
            .expect("dead letter");
        delivery.acker.ack().await.expect("ack");
        let errors = t.messages("saga.error").expect("error queue");
        assert_eq!(
            errors[0].headers[TRACEPARENT],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(errors[0].headers[TRACESTATE], "vendor=value");
    }

    #[tokio::test]
    async fn unknown_queues_are_errors() {
        let t = MemoryTransport::new();
        let q = spec("nowhere", &["x"]);
        assert!(t.subscribe(&q, "c", 1).await.is_err());
        assert!(
            t.publish_to_queue("nowhere", QueuedMessage::new("x", "y"))
                .is_err()
        );
        assert!(t.messages("nowhere").is_none());
        t.declare_queue(&q);
        t.declare_queue(&q);
        assert_eq!(t.queue_names(), vec!["nowhere", "nowhere.error"]);
        t.publish_to_queue("nowhere", QueuedMessage::new("x", "y"))
            .expect("declared now");
        assert_eq!(t.ready_count("nowhere"), 1);
    }

    #[tokio::test]
    async fn close_ends_subscriptions_and_refuses_publishing() {
        let t = MemoryTransport::new();
        let q = spec("saga", &["order.created"]);
        t.declare_queue(&q);
        let mut stream = t.subscribe(&q, "c", 1).await.expect("subscribe");
        let waiting = tokio::spawn(async move { stream.next().await.is_none() });
        t.close();
        assert!(waiting.await.expect("task"), "the stream ends");
        assert!(t.publish(&[message("order.created", "1")]).await.is_err());
        assert!(t.subscribe(&q, "c", 1).await.is_err());
    }
}
