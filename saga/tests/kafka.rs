//! The Kafka transport against a real Kafka-protocol broker (Tansu, see
//! `scripts/kafka-broker.sh`): publishing with delivery reports, consumer
//! groups, commits only after acks, dead letters and redrive.
//!
//! Start the broker first: `scripts/kafka-broker.sh start`. The tests read
//! `KAFKA_BOOTSTRAP` (default `127.0.0.1:19092`). Each test uses its own
//! topic prefix and queue names (a UUID), creates its topics and deletes
//! them at the end. Log output: `TEST_LOG=1` (or a filter such as
//! `TEST_LOG=saga=debug,librdkafka=info`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Once;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use saga::error::TransportError;
use saga::trace::TraceContext;
use saga::transport::kafka::{KafkaSettings, KafkaTopology, KafkaTransport, PartitionLag};
use saga::transport::{Delivery, OutgoingMessage, QueueSpec, Transport};
use uuid::Uuid;

type Deliveries = BoxStream<'static, Result<Delivery, TransportError>>;

/// Session timeout and max poll interval of the tests' consumers. Tansu
/// completes a group join only after the rebalance timeout
/// (`max.poll.interval.ms`), so it is short here.
const GROUP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a test waits for a delivery it expects (a group join included).
const WAIT: Duration = Duration::from_secs(30);

fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let filter = if filter == "1" {
                "info".to_owned()
            } else {
                filter
            };
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:19092".to_owned())
}

/// One test's transport, queue and topics.
struct Broker {
    transport: KafkaTransport,
    prefix: String,
    topology: KafkaTopology,
}

impl Broker {
    /// A transport on a fresh prefix with `queues` (name suffix, routing
    /// keys) declared with `partitions` partitions per topic.
    async fn new(partitions: i32, queues: &[(&str, &[&str])]) -> Self {
        init_tracing();
        let prefix = format!("t{}", Uuid::new_v4().simple());
        let settings = KafkaSettings {
            bootstrap_servers: bootstrap(),
            topic_prefix: prefix.clone(),
            partitions,
            session_timeout: GROUP_TIMEOUT,
            max_poll_interval: GROUP_TIMEOUT,
            delivery_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(10),
            client_id: format!("{prefix}-test"),
            ..KafkaSettings::default()
        };
        let transport = match KafkaTransport::connect(settings.clone()).await {
            Ok(transport) => transport,
            Err(e) => panic!(
                "no Kafka broker at {} ({e}). Start one with `scripts/kafka-broker.sh start` \
                 (or point KAFKA_BOOTSTRAP at a broker)",
                bootstrap()
            ),
        };
        let queues = queues
            .iter()
            .map(|(name, keys)| QueueSpec {
                name: format!("{prefix}.{name}"),
                routing_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            })
            .collect();
        let topology = KafkaTopology::new(queues, &settings);
        transport.declare(&topology).await.expect("declare topics");
        Self {
            transport,
            prefix,
            topology,
        }
    }

    fn queue(&self, index: usize) -> &QueueSpec {
        &self.topology.queues[index]
    }

    async fn subscribe(&self, queue: usize, tag: &str, prefetch: u16) -> Deliveries {
        self.transport
            .subscribe(
                self.queue(queue),
                &format!("{}-{tag}", self.prefix),
                prefetch,
            )
            .await
            .expect("subscribe")
    }

    async fn lag(&self, queue: usize, routing_key: &str) -> Vec<PartitionLag> {
        let topic = self.transport.settings().event_topic(routing_key);
        self.transport
            .consumer_lag(self.queue(queue))
            .await
            .expect("consumer lag")
            .into_iter()
            .filter(|p| p.topic == topic)
            .collect()
    }

    async fn cleanup(self) {
        self.transport
            .delete(&self.topology)
            .await
            .expect("delete topics");
        self.transport.close().await;
    }
}

fn event(routing_key: &str, correlation_id: &str, seq: u32) -> OutgoingMessage {
    OutgoingMessage {
        message_id: Uuid::new_v4(),
        message_type: "OrderCreated".to_owned(),
        correlation_id: correlation_id.to_owned(),
        routing_key: routing_key.to_owned(),
        body: format!("{correlation_id}:{seq}").into_bytes(),
        trace: None,
    }
}

async fn publish_all(transport: &KafkaTransport, messages: &[OutgoingMessage]) {
    let results = transport.publish(messages).await.expect("publish");
    for (message, result) in messages.iter().zip(results) {
        if let Err(e) = result {
            panic!("message {} not delivered: {e}", message.message_id);
        }
    }
}

/// The next delivery, within `within`.
async fn next(stream: &mut Deliveries, within: Duration) -> Delivery {
    match tokio::time::timeout(within, stream.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("stream error: {e}"),
        Ok(None) => panic!("the stream ended"),
        Err(_) => panic!("no delivery within {within:?}"),
    }
}

/// `n` deliveries, each within `within` of the previous one.
async fn take(stream: &mut Deliveries, n: usize, within: Duration) -> Vec<Delivery> {
    let mut taken = Vec::with_capacity(n);
    for _ in 0..n {
        taken.push(next(stream, within).await);
    }
    taken
}

/// Asserts no delivery arrives for `quiet`.
async fn nothing_for(stream: &mut Deliveries, quiet: Duration) {
    if let Ok(item) = tokio::time::timeout(quiet, stream.next()).await {
        let what = item.map(|d| d.map(|d| String::from_utf8_lossy(&d.body).into_owned()));
        panic!("expected no delivery for {quiet:?}, got {what:?}");
    }
}

fn body(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.body).into_owned()
}

fn committed(lag: &[PartitionLag]) -> Vec<Option<i64>> {
    lag.iter().map(|p| p.committed).collect()
}

/// Polls `check` until it returns `Some`, or panics after `within`.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_correlation_id_are_consumed_in_publish_order() {
    let broker = Broker::new(3, &[("order-saga", &["order.created", "order.expired"])]).await;
    // Declaring again is harmless.
    broker
        .transport
        .declare(&broker.topology)
        .await
        .expect("declare again");
    let orders: Vec<String> = (0..6).map(|i| format!("order-{i}")).collect();
    let mut published = Vec::new();
    for seq in 0..10 {
        for order in &orders {
            published.push(event("order.created", order, seq));
        }
    }
    let started = Instant::now();
    for batch in published.chunks(20) {
        publish_all(&broker.transport, batch).await;
    }
    let published_in = started.elapsed();

    let subscribed = Instant::now();
    let mut stream = broker.subscribe(0, "saga", 1).await;
    let first = next(&mut stream, WAIT).await;
    let first_after = subscribed.elapsed();
    let mut seen: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut ids = HashSet::new();
    let mut record = |d: &Delivery| {
        let text = body(d);
        let (order, seq) = text.split_once(':').expect("order:seq");
        seen.entry(order.to_owned())
            .or_default()
            .push(seq.parse().expect("seq"));
        assert!(
            ids.insert(d.message_id.clone().expect("message id")),
            "duplicate {text}"
        );
        assert_eq!(d.routing_key, "order.created");
        assert_eq!(d.message_type.as_deref(), Some("OrderCreated"));
        assert!(!d.redelivered);
    };
    record(&first);
    first.acker.ack().await.expect("ack");
    let rest_started = Instant::now();
    for _ in 1..published.len() {
        let d = next(&mut stream, WAIT).await;
        record(&d);
        d.acker.ack().await.expect("ack");
    }
    let rest_in = rest_started.elapsed();
    for (order, seqs) in &seen {
        assert_eq!(seqs, &(0..10).collect::<Vec<_>>(), "order of {order}");
    }
    assert_eq!(seen.len(), orders.len());
    // One saga's events share a partition (keyed by correlation id).
    let lag = broker.lag(0, "order.created").await;
    assert_eq!(lag.len(), 3, "3 partitions: {lag:?}");
    assert!(lag.iter().all(|p| p.lag == 0), "all committed: {lag:?}");
    assert_eq!(
        lag.iter().map(|p| p.high_watermark).sum::<i64>(),
        60,
        "{lag:?}"
    );
    assert_eq!(
        broker
            .transport
            .queue_depth(broker.queue(0))
            .await
            .expect("depth"),
        0
    );
    let registry = broker.transport.consumer_status().expect("registry");
    let tag = format!("{}-saga", broker.prefix);
    let snapshot = registry.snapshot(&tag, Instant::now()).expect("known");
    assert!(snapshot.registered, "{snapshot:?}");
    eprintln!(
        "published 60 in {published_in:?}; first delivery {first_after:?} after subscribing \
         (group join); 59 more, acked one by one, in {rest_in:?}"
    );

    drop(stream);
    eventually(WAIT, "marked unsubscribed", || {
        let registry = registry.clone();
        let tag = tag.clone();
        async move {
            let s = registry.snapshot(&tag, Instant::now())?;
            (s.reason.as_deref() == Some("unsubscribed")).then_some(())
        }
    })
    .await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_is_committed_only_after_its_delivery_is_acked() {
    let broker = Broker::new(1, &[("order-saga", &["order.created"])]).await;
    let published: Vec<OutgoingMessage> = (0..6)
        .map(|seq| event("order.created", "order-1", seq))
        .collect();
    publish_all(&broker.transport, &published).await;

    let mut first = broker.subscribe(0, "first", 10).await;
    let taken = take(&mut first, 6, WAIT).await;
    assert_eq!(committed(&broker.lag(0, "order.created").await), [None]);
    for d in &taken[..3] {
        d.acker.ack().await.expect("ack");
    }
    // The ack returned after its commit.
    assert_eq!(committed(&broker.lag(0, "order.created").await), [Some(3)]);
    // The other three are never acked: the member goes away with them.
    drop(taken);
    drop(first);

    let mut second = broker.subscribe(0, "second", 10).await;
    let again = take(&mut second, 3, WAIT).await;
    assert_eq!(
        again.iter().map(body).collect::<Vec<_>>(),
        ["order-1:3", "order-1:4", "order-1:5"],
        "only the unacked ones come again"
    );
    for d in &again {
        d.acker.ack().await.expect("ack");
    }
    nothing_for(&mut second, Duration::from_secs(2)).await;
    let lag = broker.lag(0, "order.created").await;
    assert_eq!(committed(&lag), [Some(6)]);
    assert_eq!(lag[0].lag, 0);
    drop(second);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_acks_never_commit_past_an_unacked_delivery() {
    let broker = Broker::new(1, &[("order-saga", &["order.created"])]).await;
    let published: Vec<OutgoingMessage> = (0..5)
        .map(|seq| event("order.created", "order-1", seq))
        .collect();
    publish_all(&broker.transport, &published).await;

    let mut stream = broker.subscribe(0, "saga", 5).await;
    let taken = take(&mut stream, 5, WAIT).await;
    for i in [4, 2, 3, 1] {
        taken[i].acker.ack().await.expect("ack");
        assert_eq!(
            committed(&broker.lag(0, "order.created").await),
            [None],
            "offset 0 is still out after acking {i}"
        );
    }
    taken[0].acker.ack().await.expect("ack");
    assert_eq!(committed(&broker.lag(0, "order.created").await), [Some(5)]);

    // Three more: the first is handed back (shutdown), the others acked.
    let more: Vec<OutgoingMessage> = (5..8)
        .map(|seq| event("order.created", "order-1", seq))
        .collect();
    publish_all(&broker.transport, &more).await;
    let taken = take(&mut stream, 3, WAIT).await;
    taken[2].acker.ack().await.expect("ack");
    taken[1].acker.ack().await.expect("ack");
    taken[0].acker.requeue().await.expect("requeue");
    assert_eq!(committed(&broker.lag(0, "order.created").await), [Some(5)]);
    drop(taken);
    drop(stream);

    // After a restart the group reads from the handed-back one on.
    let mut restarted = broker.subscribe(0, "restarted", 5).await;
    let again = take(&mut restarted, 3, WAIT).await;
    assert_eq!(
        again.iter().map(body).collect::<Vec<_>>(),
        ["order-1:5", "order-1:6", "order-1:7"]
    );
    for d in again.iter().rev() {
        d.acker.ack().await.expect("ack");
    }
    assert_eq!(committed(&broker.lag(0, "order.created").await), [Some(8)]);
    drop(restarted);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_than_prefetch_deliveries_are_out_even_past_the_poll_interval() {
    let broker = Broker::new(1, &[("order-saga", &["order.created"])]).await;
    let published: Vec<OutgoingMessage> = (0..10)
        .map(|seq| event("order.created", "order-1", seq))
        .collect();
    publish_all(&broker.transport, &published).await;

    let mut stream = broker.subscribe(0, "saga", 3).await;
    let mut held = take(&mut stream, 3, WAIT).await;
    // Held for twice `max.poll.interval.ms`: the member keeps polling
    // (paused), so it stays in the group and keeps its partition.
    nothing_for(&mut stream, GROUP_TIMEOUT * 2).await;
    let registry = broker.transport.consumer_status().expect("registry");
    let tag = format!("{}-saga", broker.prefix);
    let snapshot = registry.snapshot(&tag, Instant::now()).expect("known");
    assert!(snapshot.registered, "still in the group: {snapshot:?}");
    held.remove(0)
        .acker
        .ack()
        .await
        .expect("ack after the poll interval");
    assert_eq!(committed(&broker.lag(0, "order.created").await), [Some(1)]);
    // One settled: exactly one more.
    held.push(next(&mut stream, WAIT).await);
    nothing_for(&mut stream, Duration::from_secs(1)).await;
    let mut seen: Vec<String> = vec!["order-1:0".to_owned()];
    let mut out = held;
    while seen.len() < 10 {
        let d = out.remove(0);
        seen.push(body(&d));
        d.acker.ack().await.expect("ack");
        if seen.len() + out.len() < 10 {
            out.push(next(&mut stream, WAIT).await);
        }
        assert!(out.len() <= 3);
    }
    seen.sort_by_key(|s| {
        s.split_once(':')
            .map(|(_, n)| n.parse::<u32>().unwrap_or(0))
    });
    assert_eq!(seen.len(), 10);
    assert_eq!(committed(&broker.lag(0, "order.created").await), [Some(10)]);
    drop(stream);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_carries_the_error_headers_and_redrive_returns_it_to_its_queue_once() {
    let broker = Broker::new(
        2,
        &[
            ("order-saga", &["order.created"]),
            ("notifications", &["order.created"]),
        ],
    )
    .await;
    let saga_queue = broker.queue(0).clone();
    let trace = TraceContext::parse(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        Some("vendor=1"),
    )
    .expect("valid trace");
    let mut message = event("order.created", "order-7", 0);
    message.trace = Some(trace.clone());
    publish_all(&broker.transport, std::slice::from_ref(&message)).await;

    let mut saga = broker.subscribe(0, "saga", 4).await;
    let mut notifications = broker.subscribe(1, "notifications", 4).await;
    let failing = next(&mut saga, WAIT).await;
    assert_eq!(failing.trace.as_ref(), Some(&trace));
    broker
        .transport
        .dead_letter(&saga_queue, &failing, "payment service exploded", 3)
        .await
        .expect("dead letter");
    failing.acker.ack().await.expect("ack");
    next(&mut notifications, WAIT)
        .await
        .acker
        .ack()
        .await
        .expect("ack");

    let id = message.message_id.to_string();
    for _ in 0..2 {
        // Peeking takes nothing.
        let letters = broker
            .transport
            .dead_letters(&saga_queue, 10)
            .await
            .expect("dead letters");
        assert_eq!(letters.len(), 1, "{letters:?}");
        let letter = &letters[0];
        assert_eq!(letter.message_id.as_deref(), Some(id.as_str()));
        assert_eq!(letter.message_type.as_deref(), Some("OrderCreated"));
        assert_eq!(letter.reason.as_deref(), Some("payment service exploded"));
        assert_eq!(letter.attempts, Some(3));
        assert_eq!(
            letter.original_routing_key.as_deref(),
            Some("order.created")
        );
        assert_eq!(
            letter.original_queue.as_deref(),
            Some(saga_queue.name.as_str())
        );
        assert_eq!(letter.body, b"order-7:0");
    }
    assert_eq!(
        broker
            .transport
            .dead_letter_count(&saga_queue)
            .await
            .expect("count"),
        1
    );

    let moved = broker
        .transport
        .redrive(&saga_queue, 10)
        .await
        .expect("redrive");
    assert_eq!(moved, [Some(id.clone())]);
    assert!(
        broker
            .transport
            .dead_letters(&saga_queue, 10)
            .await
            .expect("dead letters")
            .is_empty()
    );
    assert_eq!(
        broker
            .transport
            .dead_letter_count(&saga_queue)
            .await
            .expect("count"),
        0
    );
    assert!(
        broker
            .transport
            .redrive(&saga_queue, 10)
            .await
            .expect("redrive again")
            .is_empty()
    );

    let back = next(&mut saga, WAIT).await;
    assert_eq!(back.message_id.as_deref(), Some(id.as_str()));
    assert_eq!(back.message_type.as_deref(), Some("OrderCreated"));
    assert_eq!(back.routing_key, "order.created");
    assert_eq!(back.trace.as_ref(), Some(&trace));
    assert_eq!(back.body, b"order-7:0");
    back.acker.ack().await.expect("ack");
    // Straight into one queue (its direct topic): only that queue gets it.
    let direct = event("order.created", "order-8", 0);
    broker
        .transport
        .publish_to_queue(broker.queue(1), &direct)
        .await
        .expect("publish to queue");
    let only_notifications = next(&mut notifications, WAIT).await;
    assert_eq!(body(&only_notifications), "order-8:0");
    assert_eq!(only_notifications.routing_key, "order.created");
    only_notifications.acker.ack().await.expect("ack");
    // The redriven letter came once, and to its queue only.
    nothing_for(&mut saga, Duration::from_secs(2)).await;
    nothing_for(&mut notifications, Duration::from_millis(500)).await;
    drop(saga);
    drop(notifications);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reports_ok_only_for_messages_the_broker_delivered() {
    let broker = Broker::new(1, &[("order-saga", &["order.created"])]).await;
    let good = event("order.created", "order-1", 0);
    // No queue binds this key: it has no topic (RabbitMQ's `mandatory`).
    let unroutable = event("order.shipped", "order-1", 1);
    let mut too_large = event("order.created", "order-1", 2);
    too_large.body = vec![b'x'; 2 * 1024 * 1024];
    let also_good = event("order.created", "order-1", 3);
    let started = Instant::now();
    let results = broker
        .transport
        .publish(&[good, unroutable, too_large, also_good])
        .await
        .expect("publish");
    let took = started.elapsed();
    let outcome: Vec<bool> = results.iter().map(Result::is_ok).collect();
    assert_eq!(outcome, [true, false, false, true], "{results:?}");
    eprintln!(
        "publish with an unroutable and a too-large message: {took:?}; errors: {:?}, {:?}",
        results[1], results[2]
    );

    let mut stream = broker.subscribe(0, "saga", 4).await;
    let got = take(&mut stream, 2, WAIT).await;
    assert_eq!(
        got.iter().map(body).collect::<Vec<_>>(),
        ["order-1:0", "order-1:3"]
    );
    for d in &got {
        d.acker.ack().await.expect("ack");
    }
    nothing_for(&mut stream, Duration::from_secs(1)).await;
    drop(stream);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_forgets_the_revoked_partitions_deliveries() {
    let broker = Broker::new(2, &[("order-saga", &["order.created"])]).await;
    // Keys that land on both partitions.
    let published: Vec<OutgoingMessage> = (0..8)
        .map(|i| event("order.created", &format!("order-{i}"), 0))
        .collect();
    publish_all(&broker.transport, &published).await;

    let mut first = broker.subscribe(0, "first", 16).await;
    let held = take(&mut first, 8, WAIT).await;
    let joined = Instant::now();
    let mut second = broker.subscribe(0, "second", 16).await;
    // The second member gets a partition once the rebalance is done, and
    // reads it from the start (nothing was committed).
    let from_second = next(&mut second, WAIT).await;
    let rebalanced_in = joined.elapsed();
    // Everything the first member held was revoked (eager rebalance):
    // acknowledging it now commits nothing.
    for d in &held {
        assert!(d.acker.ack().await.is_err(), "revoked: {}", body(d));
    }
    drop(held);
    // Between the two members, every message comes again, each once.
    let mut again = vec![body(&from_second)];
    from_second.acker.ack().await.expect("ack");
    while again.len() < 8 {
        tokio::select! {
            d = next(&mut first, WAIT) => { again.push(body(&d)); d.acker.ack().await.expect("ack"); }
            d = next(&mut second, WAIT) => { again.push(body(&d)); d.acker.ack().await.expect("ack"); }
        }
    }
    again.sort();
    let mut expected: Vec<String> = (0..8).map(|i| format!("order-{i}:0")).collect();
    expected.sort();
    assert_eq!(again, expected);
    let lag = broker.lag(0, "order.created").await;
    assert!(lag.iter().all(|p| p.lag == 0), "{lag:?}");
    eprintln!("second member's first delivery {rebalanced_in:?} after it subscribed (rebalance)");
    drop(first);
    drop(second);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_subscription_gets_a_new_event_promptly() {
    let broker = Broker::new(3, &[("order-saga", &["order.created"])]).await;
    let mut stream = broker.subscribe(0, "saga", 8).await;
    publish_all(&broker.transport, &[event("order.created", "order-0", 0)]).await;
    next(&mut stream, WAIT)
        .await
        .acker
        .ack()
        .await
        .expect("ack");
    let mut latencies = Vec::new();
    for seq in 1..=5 {
        // Idle for a moment: the member's fetches are long-polling.
        nothing_for(&mut stream, Duration::from_millis(700)).await;
        let sent = Instant::now();
        publish_all(&broker.transport, &[event("order.created", "order-0", seq)]).await;
        let published = sent.elapsed();
        let d = next(&mut stream, WAIT).await;
        let delivered = sent.elapsed();
        assert_eq!(body(&d), format!("order-0:{seq}"));
        let acked = Instant::now();
        d.acker.ack().await.expect("ack");
        latencies.push((published, delivered, acked.elapsed()));
    }
    eprintln!("(publish confirmed, delivered, ack committed) after publishing: {latencies:?}");
    assert!(
        latencies
            .iter()
            .all(|(_, delivered, _)| *delivered < Duration::from_secs(2)),
        "{latencies:?}"
    );
    drop(stream);
    broker.cleanup().await;
}

/// A runner stopped while its member is still joining the group (as in a
/// restart right after start). On Tansu 0.6 a member that left in the
/// middle of a JoinGroup blocked the group for good: no later member was
/// ever assigned a partition. The transport now finishes the join (bounded)
/// before leaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_dropped_while_joining_does_not_block_the_next_member() {
    let broker = Broker::new(3, &[("order-saga", &["order.created"])]).await;
    let settings = broker.transport.settings().clone();

    // The first "runner": its own transport, stopped during its group join
    // (the join is held about 2 s with these timeouts; the member finds its
    // coordinator in about 0.5 s, so 1 s in it is waiting in JoinGroup).
    let first = KafkaTransport::connect(settings.clone())
        .await
        .expect("connect");
    let tag = format!("{}-first", broker.prefix);
    let stream = first
        .subscribe(broker.queue(0), &tag, 8)
        .await
        .expect("subscribe");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = first
        .consumer_status()
        .and_then(|r| r.snapshot(&tag, Instant::now()))
        .expect("registered in the consumer registry");
    assert!(
        !status.registered,
        "the first member must still be joining when it is stopped: {status:?}"
    );
    drop(stream);
    first.close().await;

    // The next "runner" gets the partitions and the message.
    publish_all(&broker.transport, &[event("order.created", "order-1", 0)]).await;
    let second = KafkaTransport::connect(settings).await.expect("connect");
    let started = Instant::now();
    let mut stream = second
        .subscribe(broker.queue(0), &format!("{}-second", broker.prefix), 8)
        .await
        .expect("subscribe");
    let d = next(&mut stream, WAIT).await;
    assert_eq!(body(&d), "order-1:0");
    d.acker.ack().await.expect("ack");
    eprintln!(
        "the next member's first delivery {:?} after it subscribed",
        started.elapsed()
    );
    drop(stream);
    second.close().await;
    broker.cleanup().await;
}
