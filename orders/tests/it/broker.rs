//! The outbox relay and the consumers against the real RabbitMQ.

use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::ShortString;
use orders::notifications::NotificationHandler;
use orders::payment::FixedPayment;
use orders::topology::{self, NOTIFICATIONS_CONSUMER, ORDER_SAGA_CONSUMER};
use orders::{OrderHooks, OrderSaga};
use saga::clock::SystemClock;
use saga::consumer::SagaHandler;
use saga::consumer::{ConsumeOutcome, Consumer, RetryPolicy};
use saga::engine::{EngineSettings, SagaEngine};
use saga::outbox::OutboxRelay;
use saga::schema::outbox as saga_outbox;
use saga::testing::{TestBroker, TestDatabase, eventually};
use saga::transport::{QueueSpec, Transport};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

fn relay(tdb: &TestDatabase, broker: &Arc<TestBrokerTransport>) -> OutboxRelay {
    crate::helpers::relay(
        &tdb.db,
        broker.clone(),
        saga::outbox::OutboxHandle::default(),
    )
}

fn notification_consumer(
    tdb: &TestDatabase,
    transport: &Arc<TestBrokerTransport>,
    queue: &QueueSpec,
    prefetch: u16,
) -> Consumer<NotificationHandler> {
    Consumer::new(
        transport.clone(),
        queue.clone(),
        NOTIFICATIONS_CONSUMER,
        Arc::new(NotificationHandler::new(
            tdb.db.clone(),
            Arc::new(SystemClock),
            NOTIFICATIONS_CONSUMER,
        )),
        RetryPolicy::default(),
        prefetch,
    )
}

type TestBrokerTransport = saga::transport::rabbitmq::RabbitTransport;

async fn depth(broker: &TestBroker, queue: &str) -> u32 {
    broker
        .transport
        .queue_depth(queue)
        .await
        .expect("queue depth")
}

async fn fresh_transport(broker: &TestBroker) -> Arc<TestBrokerTransport> {
    connect(broker).await
}

#[tokio::test]
async fn the_relay_publishes_outbox_rows_with_confirms_and_marks_them_sent() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let transport = fresh_transport(&broker).await;
    for _ in 0..3 {
        place_order(&tdb.db, t0()).await;
    }
    let outcome = relay(&tdb, &transport)
        .try_relay_once()
        .await
        .expect("relay");
    assert_eq!(
        (outcome.claimed, outcome.published, outcome.failed),
        (3, 3, 0)
    );
    let unsent = saga_outbox::Entity::find()
        .filter(saga_outbox::Column::SentAt.is_null())
        .count(&tdb.db)
        .await
        .expect("count");
    assert_eq!(unsent, 0);
    // OrderCreated goes to the saga queue and the notifications queue.
    let saga_q = topology::saga_queue(&broker.prefix).name;
    let notif_q = topology::notifications_queue(&broker.prefix).name;
    eventually(
        Duration::from_secs(5),
        "3 messages in each queue",
        || async {
            (depth(&broker, &saga_q).await == 3 && depth(&broker, &notif_q).await == 3)
                .then_some(())
        },
    )
    .await;
    // Nothing left: a second round publishes nothing.
    let again = relay(&tdb, &transport)
        .try_relay_once()
        .await
        .expect("relay");
    assert_eq!(again.claimed, 0);
    transport.close().await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test]
async fn orders_flow_through_rabbitmq_to_completed_with_one_notification_per_event() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let transport = fresh_transport(&broker).await;
    let signal = saga::outbox::OutboxHandle::default();
    let engine = SagaEngine::new(
        OrderSaga {
            payment_delay: chrono::Duration::milliseconds(50),
            ..OrderSaga::default()
        },
        tdb.db.clone(),
    )
    .with_hooks(OrderHooks::new(Arc::new(FixedPayment { approved: true })))
    .with_settings(EngineSettings::default())
    .with_outbox(signal.clone());
    let relay = crate::helpers::relay(&tdb.db, transport.clone(), signal);
    let dyn_transport: Arc<dyn Transport> = transport.clone();
    let saga_consumer = Consumer::new(
        dyn_transport.clone(),
        topology::saga_queue(&broker.prefix),
        ORDER_SAGA_CONSUMER,
        Arc::new(SagaHandler::new(engine.clone(), ORDER_SAGA_CONSUMER)),
        RetryPolicy::default(),
        16,
    );
    let notifications = Consumer::new(
        dyn_transport,
        topology::notifications_queue(&broker.prefix),
        NOTIFICATIONS_CONSUMER,
        Arc::new(NotificationHandler::new(
            tdb.db.clone(),
            Arc::new(SystemClock),
            NOTIFICATIONS_CONSUMER,
        )),
        RetryPolicy::default(),
        16,
    );
    let stop = CancellationToken::new();
    let timers = {
        let engine = engine.clone();
        let stop = stop.clone();
        async move {
            while !stop.is_cancelled() {
                while let Ok(Some(_)) = engine.try_fire_due_timer_once().await {}
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }
    };
    let mut order_ids = Vec::new();
    for _ in 0..5 {
        order_ids.push(place_order(&tdb.db, chrono::Utc::now()).await.0.order_id);
    }
    let check = async {
        for id in &order_ids {
            eventually(
                Duration::from_secs(20),
                "order completed with 2 notifications",
                || async {
                    let done = order_status(&tdb.db, *id).await == "completed";
                    let notes = notifications_of(&tdb.db, *id).await;
                    (done && notes.len() == 2).then_some(notes)
                },
            )
            .await;
        }
        stop.cancel();
    };
    let (r1, r2, (), (), ()) = tokio::join!(
        saga_consumer.run_until_stopped(stop.clone()),
        notifications.run_until_stopped(stop.clone()),
        relay.run_until_stopped(stop.clone()),
        timers,
        check,
    );
    r1.expect("saga consumer");
    r2.expect("notification consumer");
    for id in &order_ids {
        let notes = notifications_of(&tdb.db, *id).await;
        let kinds: Vec<_> = notes.iter().map(|n| n.event_type.as_str()).collect();
        assert_eq!(kinds, ["OrderCreated", "OrderCompleted"]);
        assert!(!notes[0].is_email_sent);
        assert!(notes[1].is_email_sent);
        assert!(notes[1].message.contains(&format!("Order #{id} completed")));
        assert_eq!(notes[1].metadata["new_status"], "completed");
    }
    transport.close().await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test]
async fn a_duplicated_delivery_writes_one_notification_and_is_acknowledged() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let transport = fresh_transport(&broker).await;
    let (order, created) = place_order(&tdb.db, t0()).await;
    let queue = topology::notifications_queue(&broker.prefix);
    let body = serde_json::to_vec(&created).expect("body");
    for _ in 0..2 {
        broker
            .transport
            .publish_to_queue(
                &queue.name,
                &body,
                BasicProperties::default()
                    .with_message_id(ShortString::from(created.message_id.to_string())),
            )
            .await
            .expect("inject");
    }
    let consumer = notification_consumer(&tdb, &transport, &queue, 1);
    let mut stream = transport
        .subscribe(&queue, "probe", 1)
        .await
        .expect("subscribe");
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let delivery = next_delivery(&mut stream).await;
        outcomes.push(consumer.process(delivery).await.expect("settled"));
    }
    assert_eq!(
        outcomes,
        vec![
            ConsumeOutcome::Handled { attempts: 1 },
            ConsumeOutcome::Duplicate
        ]
    );
    assert_eq!(notifications_of(&tdb.db, order.order_id).await.len(), 1);
    drop(stream);
    transport.close().await;
    eventually(Duration::from_secs(5), "queue drained", || async {
        (depth(&broker, &queue.name).await == 0).then_some(())
    })
    .await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test]
async fn an_undecodable_message_goes_to_the_error_queue_and_the_consumer_carries_on() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let transport = fresh_transport(&broker).await;
    let (order, created) = place_order(&tdb.db, t0()).await;
    let queue = topology::notifications_queue(&broker.prefix);
    broker
        .transport
        .publish_to_queue(&queue.name, b"{not json", BasicProperties::default())
        .await
        .expect("inject garbage");
    broker
        .transport
        .publish_to_queue(
            &queue.name,
            &serde_json::to_vec(&created).expect("body"),
            BasicProperties::default(),
        )
        .await
        .expect("inject valid");
    let consumer = notification_consumer(&tdb, &transport, &queue, 4);
    let stop = CancellationToken::new();
    let run = consumer.run_until_stopped(stop.clone());
    let check = async {
        eventually(
            Duration::from_secs(10),
            "valid message handled after garbage",
            || async { (notifications_of(&tdb.db, order.order_id).await.len() == 1).then_some(()) },
        )
        .await;
        eventually(
            Duration::from_secs(10),
            "garbage in the error queue",
            || async { (depth(&broker, &queue.error_queue()).await == 1).then_some(()) },
        )
        .await;
        stop.cancel();
    };
    let (result, ()) = tokio::join!(run, check);
    result.expect("consumer stopped cleanly");
    transport.close().await;
    broker.delete().await;
    tdb.drop().await;
}

/// The next delivery of `stream`, within 5 s.
async fn next_delivery(
    stream: &mut futures_util::stream::BoxStream<
        'static,
        Result<saga::transport::Delivery, saga::error::TransportError>,
    >,
) -> saga::transport::Delivery {
    use futures_util::StreamExt;
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a delivery in time")
        .expect("stream open")
        .expect("delivery")
}

#[tokio::test]
async fn a_batch_is_acknowledged_together_only_when_nothing_before_it_is_unsettled() {
    use saga::transport::Acknowledger;
    let broker = TestBroker::create(orders::topology::queues).await;
    let transport = fresh_transport(&broker).await;
    let queue = topology::notifications_queue(&broker.prefix);
    for body in ["0", "1", "2", "3", "4", "5"] {
        broker
            .transport
            .publish_to_queue(&queue.name, body.as_bytes(), BasicProperties::default())
            .await
            .expect("publish");
    }
    let mut stream = transport
        .subscribe(&queue, "acks", 10)
        .await
        .expect("subscribe");
    let mut d = Vec::new();
    for _ in 0..6 {
        d.push(next_delivery(&mut stream).await);
    }
    let bodies: Vec<&[u8]> = d.iter().map(|d| d.body.as_slice()).collect();
    assert_eq!(bodies, [b"0", b"1", b"2", b"3", b"4", b"5"]);
    let all_ok = |results: Vec<Result<(), saga::error::TransportError>>| {
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        results.len()
    };

    // "1" and "2" while "0" is still being handled: settled one by one (a
    // frame for "everything up to 2" would settle "0" too).
    let batch: Vec<&dyn Acknowledger> = vec![d[1].acker.as_ref(), d[2].acker.as_ref()];
    assert_eq!(all_ok(batch[0].ack_batch(&batch).await), 2);
    // So "0" can still go back to the queue (had it been acknowledged, the
    // broker would close the channel on this unknown delivery tag).
    d[0].acker.requeue().await.expect("requeue 0");
    // "3" and "4": nothing before them is unsettled; one frame for both.
    let batch: Vec<&dyn Acknowledger> = vec![d[4].acker.as_ref(), d[3].acker.as_ref()];
    assert_eq!(all_ok(batch[0].ack_batch(&batch).await), 2);
    let batch: Vec<&dyn Acknowledger> = vec![d[5].acker.as_ref()];
    assert_eq!(all_ok(batch[0].ack_batch(&batch).await), 1);
    drop(d);
    drop(stream);
    transport.close().await;

    // Only "0" is left: nothing was acknowledged twice or too early (a
    // closed channel would have handed back "3", "4" and "5" as well).
    eventually(Duration::from_secs(5), "one message left", || async {
        (depth(&broker, &queue.name).await == 1).then_some(())
    })
    .await;
    let again = fresh_transport(&broker).await;
    let mut stream = again
        .subscribe(&queue, "acks-again", 10)
        .await
        .expect("subscribe");
    let left = next_delivery(&mut stream).await;
    assert_eq!(left.body, b"0");
    assert!(left.redelivered);
    left.acker.ack().await.expect("ack");
    drop(stream);
    again.close().await;
    broker.delete().await;
}
