//! Connection resilience: a TCP proxy between the code under test and the
//! real RabbitMQ / PostgreSQL is cut and restored; other tests, which talk
//! to the servers directly, are not disturbed.

use std::sync::Arc;
use std::time::Duration;

use saga::schema::instances as saga_instances;

use orders::topology;
use saga::testing::{TcpProxy, TestBroker, TestDatabase, eventually};
use saga::transport::rabbitmq::{RabbitTransport, ReconnectPolicy};
use sea_orm::{ColumnTrait, ConnectOptions, Database, EntityTrait, QueryFilter};

use crate::helpers::*;

/// A transport to `broker` through `proxy`, with quick reconnects; the
/// confirm timeout also bounds each step of a reconnect.
async fn proxied_transport(
    broker: &TestBroker,
    proxy: &TcpProxy,
    confirm_timeout: Duration,
) -> Arc<RabbitTransport> {
    let transport = RabbitTransport::connect(
        &proxy.url_for(&broker.url),
        &broker.exchange,
        confirm_timeout,
        "test via proxy",
    )
    .await
    .expect("connect through the proxy")
    .with_reconnect_policy(ReconnectPolicy {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
    });
    transport.declare(&broker.topology).await.expect("declare");
    Arc::new(transport)
}

async fn status_is(tdb: &TestDatabase, order_id: i64, status: &str) -> Option<()> {
    (order_status(&tdb.db, order_id).await == status).then_some(())
}

#[tokio::test]
async fn consumers_and_the_relay_resume_after_the_broker_connection_is_cut() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let upstream = server_addr(&broker.url, 5672);
    let proxy = TcpProxy::start(upstream).await.expect("proxy");
    let transport = proxied_transport(&broker, &proxy, Duration::from_secs(5)).await;
    let clock = saga::clock::ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, true);
    let signal = saga::outbox::OutboxHandle::default();
    let relay = relay(&tdb.db, transport.clone(), signal.clone());
    let consumer = saga_consumer(transport.clone(), &broker.prefix, &engine);
    let running = Running::start(consumer, Some(relay));

    let (first, _) = place_order(&tdb.db, t0()).await;
    signal.notify();
    eventually(Duration::from_secs(10), "first order processing", || {
        status_is(&tdb, first.order_id, "processing")
    })
    .await;

    // The broker goes away: orders placed meanwhile wait in the outbox.
    proxy.cut();
    let (second, _) = place_order(&tdb.db, t0()).await;
    signal.notify();
    eventually(
        Duration::from_secs(10),
        "the relay noticing the cut",
        || async {
            let row = saga::schema::outbox::Entity::find()
                .filter(saga::schema::outbox::Column::CorrelationId.eq(second.order_id.to_string()))
                .one(&tdb.db)
                .await
                .expect("outbox")?;
            (row.sent_at.is_none() && row.publish_attempts > 0).then_some(())
        },
    )
    .await;
    assert_eq!(order_status(&tdb.db, second.order_id).await, "pending");
    assert!(!running.consumer_finished(), "the consumer did not give up");

    // It comes back: the relay publishes, the consumer resubscribed.
    let accepted_before = proxy.connections_accepted();
    proxy.restore();
    eventually(Duration::from_secs(15), "second order processing", || {
        status_is(&tdb, second.order_id, "processing")
    })
    .await;
    assert!(transport.reconnects() >= 1, "the transport reconnected");
    assert!(proxy.connections_accepted() > accepted_before);

    running.stop().await;
    transport.close().await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test]
async fn a_database_outage_is_waited_out_without_spending_the_retry_budget() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let proxy = TcpProxy::start(server_addr(&tdb.url, 5432))
        .await
        .expect("proxy");
    let mut options = ConnectOptions::new(proxy.url_for(&tdb.url));
    options
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500))
        .sqlx_logging(false);
    let proxied_db = Database::connect(options).await.expect("db via proxy");
    let clock = saga::clock::ManualClock::new(t0());
    let engine = engine(&proxied_db, &clock, true);
    let transport = connect(&broker).await;
    let (order, _) = place_order(&tdb.db, t0()).await;

    // PostgreSQL is unreachable for the consumer when the message arrives.
    proxy.cut();
    let relay = relay(
        &tdb.db,
        transport.clone(),
        saga::outbox::OutboxHandle::default(),
    );
    assert_eq!(relay.try_relay_once().await.expect("relay").published, 1);
    let consumer = saga_consumer(transport.clone(), &broker.prefix, &engine);
    let running = Running::start(consumer, None);
    // The message is taken (not ready any more) but cannot be handled.
    let queue = topology::saga_queue(&broker.prefix).name;
    eventually(Duration::from_secs(10), "the message delivered", || async {
        (broker.transport.queue_depth(&queue).await.ok()? == 0).then_some(())
    })
    .await;
    assert_eq!(order_status(&tdb.db, order.order_id).await, "pending");

    proxy.restore();
    eventually(
        Duration::from_secs(15),
        "order processing after the outage",
        || status_is(&tdb, order.order_id, "processing"),
    )
    .await;
    let instance = saga_instances::Entity::find()
        .filter(saga_instances::Column::CorrelationId.eq(order.order_id.to_string()))
        .one(&tdb.db)
        .await
        .expect("query")
        .expect("instance");
    assert!(!instance.faulted, "an outage does not park the saga");
    assert_eq!(instance.attempts, 0);
    let letters = broker
        .transport
        .dead_letters(&topology::saga_queue(&broker.prefix), 10)
        .await
        .expect("inspect");
    assert!(letters.is_empty(), "nothing dead-lettered: {letters:?}");

    running.stop().await;
    let _ = proxied_db.close().await;
    transport.close().await;
    broker.delete().await;
    tdb.drop().await;
}

/// `host:port` of a server URL (`localhost` as 127.0.0.1).
fn server_addr(url: &str, default_port: u16) -> std::net::SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host_port = if host_port.contains(':') {
        host_port.replace("localhost", "127.0.0.1")
    } else {
        format!("{host_port}:{default_port}")
    };
    host_port
        .replace("localhost", "127.0.0.1")
        .parse()
        .expect("server address")
}

#[tokio::test]
async fn a_consumer_whose_queue_is_deleted_declares_the_topology_again_and_resumes() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let transport = connect(&broker).await;
    transport.declare(&broker.topology).await.expect("declare");
    let clock = saga::clock::ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, true);
    let signal = saga::outbox::OutboxHandle::default();
    let relay = relay(&tdb.db, transport.clone(), signal.clone());
    let consumer = saga_consumer(transport.clone(), &broker.prefix, &engine);
    let running = Running::start(consumer, Some(relay));

    // An operator deletes the exchange and the queues under the running consumer.
    broker
        .transport
        .delete(&broker.topology)
        .await
        .expect("delete the topology");
    let (order, _) = place_order(&tdb.db, t0()).await;
    signal.notify();
    eventually(Duration::from_secs(20), "the order processed", || {
        status_is(&tdb, order.order_id, "processing")
    })
    .await;
    assert!(!running.consumer_finished());

    running.stop().await;
    transport.close().await;
    broker.delete().await;
    tdb.drop().await;
}

/// A broker that accepts TCP connections and then never answers (one that
/// died half-way through starting) must not wedge the transport: the
/// reconnect gives up after the confirm timeout and tries again, and once
/// the broker answers, consumers and the relay resume. The connection
/// swallowed by the stall stays open and silent for the rest of the test.
#[tokio::test]
async fn a_reconnect_into_a_broker_that_never_answers_times_out_and_tries_again() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let proxy = TcpProxy::start(server_addr(&broker.url, 5672))
        .await
        .expect("proxy");
    let transport = proxied_transport(&broker, &proxy, Duration::from_millis(500)).await;
    let clock = saga::clock::ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, true);
    let signal = saga::outbox::OutboxHandle::default();
    let relay = relay(&tdb.db, transport.clone(), signal.clone());
    let consumer = saga_consumer(transport.clone(), &broker.prefix, &engine);
    let running = Running::start(consumer, Some(relay));

    let (first, _) = place_order(&tdb.db, t0()).await;
    signal.notify();
    eventually(Duration::from_secs(10), "first order processing", || {
        status_is(&tdb, first.order_id, "processing")
    })
    .await;

    proxy.stall();
    let (second, _) = place_order(&tdb.db, t0()).await;
    signal.notify();
    eventually(
        Duration::from_secs(10),
        "a reconnect swallowed by the stall",
        || async { (proxy.connections_swallowed() >= 1).then_some(()) },
    )
    .await;

    proxy.restore();
    eventually(Duration::from_secs(20), "second order processing", || {
        status_is(&tdb, second.order_id, "processing")
    })
    .await;
    assert!(!running.consumer_finished(), "the consumer did not give up");

    running.stop().await;
    transport.close().await;
    broker.delete().await;
    tdb.drop().await;
}
