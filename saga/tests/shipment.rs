//! The shipment example's saga (`examples/shipment/`) in the library's
//! test harness: the real engine, relay and consumer in-process on SQLite
//! with the example's own table, the in-memory transport and a virtual
//! clock. No services, no waiting. Plus the exhaustive transition table.

// The example's files, shared with `cargo run --example shipment`; not every
// item of them is used here.
#[allow(dead_code)]
#[path = "../examples/shipment/definition.rs"]
mod definition;
#[allow(dead_code)]
#[path = "../examples/shipment/hooks.rs"]
mod hooks;
#[allow(dead_code)]
#[path = "../examples/shipment/schema.rs"]
mod schema;
#[allow(dead_code)]
#[path = "../examples/shipment/topology.rs"]
mod topology;

use chrono::{Duration, TimeZone, Utc};
use saga::clock::Clock as _;
use saga::consumer::ConsumeOutcome;
use saga::definition::{Decision, Effect, Saga as _, SagaInput as _, SagaState as _};
use saga::message::Envelope;
use saga::testing::harness::SagaHarness;
use saga::{SagaError, SagaEvent as _};
use sea_orm::EntityTrait;
use uuid::Uuid;

use crate::definition::{
    MAX_ALLOCATION_ATTEMPTS, ShipmentEffect, ShipmentEvent, ShipmentInput, ShipmentMessage,
    ShipmentRequest, ShipmentSaga, ShipmentState, ShipmentTimer,
};
use crate::hooks::ShipmentHooks;
use crate::schema::allocations;

const RETRY: i64 = 200;
const TIMEOUT: i64 = 1500;

fn saga() -> ShipmentSaga {
    ShipmentSaga {
        retry_delay: Duration::milliseconds(RETRY),
        allocated_timeout: Duration::milliseconds(TIMEOUT),
    }
}

/// The saga consuming its three messages, with the example's tables, and
/// `stock` in `shipment_stock`.
async fn harness(stock: &[(&str, i32)]) -> SagaHarness<ShipmentSaga> {
    let keys: Vec<&str> = ShipmentMessage::ALL
        .iter()
        .map(|m| m.routing_key())
        .collect();
    let h = SagaHarness::builder(saga())
        .hooks(ShipmentHooks)
        .migrations::<schema::Migrator>()
        .consumes(topology::SHIPMENT_SAGA_CONSUMER, &keys)
        .start()
        .await
        .expect("harness");
    for (sku, units) in stock {
        schema::set_stock(h.db(), sku, *units).await.expect("stock");
    }
    h
}

fn request(sku: &str, quantity: i32) -> ShipmentRequest {
    ShipmentRequest {
        order_ref: "order-42".to_owned(),
        sku: sku.to_owned(),
        quantity,
    }
}

/// A message another service publishes about shipment `id`.
fn message(kind: ShipmentMessage, id: &str, payload: serde_json::Value) -> Envelope {
    Envelope {
        message_id: Uuid::new_v4(),
        message_type: kind.message_type().to_owned(),
        correlation_id: id.to_owned(),
        causation_id: None,
        occurred_at: Utc
            .with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
            .single()
            .expect("time"),
        initiated_by: None,
        payload,
    }
}

/// **When**: `kind` arrives for `id` (everything that follows at the
/// current virtual time runs).
async fn when(h: &SagaHarness<ShipmentSaga>, kind: ShipmentMessage, id: &str) -> Envelope {
    let envelope = message(kind, id, serde_json::Value::Null);
    h.when_published(&envelope, kind.routing_key())
        .await
        .expect("published");
    envelope
}

/// **When**: `ShipmentRequested` for a new shipment arrives.
async fn requested(h: &SagaHarness<ShipmentSaga>, sku: &str, quantity: i32) -> (String, Envelope) {
    let id = Uuid::new_v4().to_string();
    let envelope = message(
        ShipmentMessage::ShipmentRequested,
        &id,
        serde_json::to_value(request(sku, quantity)).expect("payload"),
    );
    h.when_published(&envelope, ShipmentMessage::ShipmentRequested.routing_key())
        .await
        .expect("published");
    (id, envelope)
}

async fn state(h: &SagaHarness<ShipmentSaga>, id: &str) -> ShipmentState {
    h.state(id).await.expect("state")
}

async fn available(h: &SagaHarness<ShipmentSaga>, sku: &str) -> i32 {
    schema::available(h.db(), sku).await.expect("stock")
}

/// The inputs of the instance's journal rows (the start has none), in order.
async fn inputs(h: &SagaHarness<ShipmentSaga>, id: &str) -> Vec<ShipmentInput> {
    h.journal(id)
        .await
        .expect("journal")
        .into_iter()
        .filter_map(|row| row.input)
        .map(|input| serde_json::from_value(input).expect("a shipment input"))
        .collect()
}

/// (trigger, outcome) of every journal row, in order.
async fn journal(h: &SagaHarness<ShipmentSaga>, id: &str) -> Vec<(String, String)> {
    h.journal(id)
        .await
        .expect("journal")
        .into_iter()
        .map(|row| (row.trigger, row.outcome))
        .collect()
}

/// The pending timers: (kind, payload, due in ms from now).
async fn pending(h: &SagaHarness<ShipmentSaga>, id: &str) -> Vec<(String, ShipmentTimer, i64)> {
    let now = h.clock().now();
    h.pending_timers(id)
        .await
        .expect("timers")
        .into_iter()
        .map(|t| {
            let payload = serde_json::from_value(t.payload.expect("payload")).expect("a timer");
            (t.timer_kind, payload, (t.due_at - now).num_milliseconds())
        })
        .collect()
}

async fn allocation(h: &SagaHarness<ShipmentSaga>, id: &str) -> Option<allocations::Model> {
    allocations::Entity::find_by_id(Uuid::parse_str(id).expect("uuid"))
        .one(h.db())
        .await
        .expect("allocation")
}

/// The events the saga published for `id`, in order (what
/// `published_types` reports, without the messages the test published).
fn events(h: &SagaHarness<ShipmentSaga>, id: &str) -> Vec<String> {
    let ours: Vec<&str> = ShipmentEvent::ALL
        .iter()
        .map(|e| e.message_type())
        .collect();
    h.published_types(id)
        .into_iter()
        .filter(|t| ours.contains(&t.as_str()))
        .collect()
}

fn owned(types: &[&str]) -> Vec<String> {
    types.iter().map(|t| (*t).to_owned()).collect()
}

fn pairs(rows: &[(&str, &str)]) -> Vec<(String, String)> {
    rows.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[tokio::test]
async fn a_shipment_in_stock_is_allocated_at_once_and_shipped_when_dispatched() {
    let h = harness(&[("WIDGET", 5)]).await;
    let (id, _) = requested(&h, "WIDGET", 2).await;
    assert_eq!(state(&h, &id).await, ShipmentState::Allocated);
    assert_eq!(available(&h, "WIDGET").await, 3);
    assert!(pending(&h, &id).await.is_empty());
    let held = allocation(&h, &id).await.expect("allocated");
    assert_eq!((held.sku.as_str(), held.quantity), ("WIDGET", 2));
    assert_eq!(held.released_at, None);

    when(&h, ShipmentMessage::ShipmentDispatched, &id).await;
    assert_eq!(state(&h, &id).await, ShipmentState::Shipped);
    assert_eq!(
        events(&h, &id),
        owned(&["ShipmentAllocated", "ShipmentShipped"])
    );
    assert_eq!(
        inputs(&h, &id).await,
        [ShipmentInput::Allocated, ShipmentInput::ShipmentDispatched]
    );
    // Shipped: the timeout no longer applies, the stock stays taken.
    h.advance(Duration::milliseconds(TIMEOUT * 2))
        .await
        .expect("idle");
    assert_eq!(state(&h, &id).await, ShipmentState::Shipped);
    assert_eq!(available(&h, "WIDGET").await, 3);
    let instance = h.instance(&id).await.expect("instance");
    assert_eq!(instance.data, request("WIDGET", 2));
}

#[tokio::test]
async fn an_allocation_that_fails_twice_rearms_the_same_timer_and_succeeds_at_the_third_attempt() {
    let h = harness(&[("GADGET", 0)]).await;
    let (id, _) = requested(&h, "GADGET", 1).await;
    // Attempt 1 failed at once; attempt 2 is the same timer kind, re-armed.
    assert_eq!(state(&h, &id).await, ShipmentState::Requested);
    assert_eq!(
        pending(&h, &id).await,
        [(
            "allocate".to_owned(),
            ShipmentTimer::Allocate { attempt: 2 },
            RETRY
        )]
    );
    let first_timer = h.pending_timers(&id).await.expect("timers")[0].id;

    h.advance(Duration::milliseconds(RETRY - 1))
        .await
        .expect("idle");
    assert_eq!(inputs(&h, &id).await.len(), 1, "not due yet");
    h.advance(Duration::milliseconds(1)).await.expect("idle");
    assert_eq!(
        pending(&h, &id).await,
        [(
            "allocate".to_owned(),
            ShipmentTimer::Allocate { attempt: 3 },
            RETRY
        )]
    );
    // One timer row per kind: the same row, re-armed each time.
    assert_eq!(
        h.pending_timers(&id).await.expect("timers")[0].id,
        first_timer
    );

    schema::set_stock(h.db(), "GADGET", 4)
        .await
        .expect("restock");
    h.advance(Duration::milliseconds(RETRY))
        .await
        .expect("idle");
    assert_eq!(state(&h, &id).await, ShipmentState::Allocated);
    assert_eq!(available(&h, "GADGET").await, 3);
    assert!(pending(&h, &id).await.is_empty());
    assert_eq!(
        inputs(&h, &id).await,
        [
            ShipmentInput::AllocationFailed { attempt: 1 },
            ShipmentInput::AllocationFailed { attempt: 2 },
            ShipmentInput::Allocated,
        ]
    );
    assert_eq!(events(&h, &id), owned(&["ShipmentAllocated"]));
}

#[tokio::test]
async fn three_failed_allocation_attempts_cancel_the_shipment() {
    let h = harness(&[("GADGET", 1)]).await;
    let (id, _) = requested(&h, "GADGET", 2).await;
    h.advance(Duration::milliseconds(RETRY))
        .await
        .expect("idle");
    assert_eq!(state(&h, &id).await, ShipmentState::Requested);
    h.advance(Duration::milliseconds(RETRY))
        .await
        .expect("idle");
    assert_eq!(state(&h, &id).await, ShipmentState::Cancelled);
    assert_eq!(
        inputs(&h, &id).await,
        (1..=MAX_ALLOCATION_ATTEMPTS)
            .map(|attempt| ShipmentInput::AllocationFailed { attempt })
            .collect::<Vec<_>>()
    );
    assert!(pending(&h, &id).await.is_empty());
    assert_eq!(events(&h, &id), owned(&["ShipmentCancelled"]));
    // Nothing was taken, so nothing is given back.
    assert_eq!(allocation(&h, &id).await, None);
    assert_eq!(available(&h, "GADGET").await, 1);
    h.advance(Duration::milliseconds(TIMEOUT * 2))
        .await
        .expect("idle");
    assert_eq!(inputs(&h, &id).await.len(), 3);
}

#[tokio::test]
async fn cancelling_an_allocated_shipment_releases_its_stock_exactly_once() {
    let h = harness(&[("GIZMO", 5)]).await;
    let (id, _) = requested(&h, "GIZMO", 2).await;
    assert_eq!(available(&h, "GIZMO").await, 3);

    when(&h, ShipmentMessage::CancelShipment, &id).await;
    assert_eq!(state(&h, &id).await, ShipmentState::Cancelled);
    assert_eq!(available(&h, "GIZMO").await, 5);
    let released = allocation(&h, &id).await.expect("allocation kept");
    assert_eq!(released.released_at, Some(h.clock().now()));

    // A second cancellation, and time past the timeout: nothing more.
    when(&h, ShipmentMessage::CancelShipment, &id).await;
    h.advance(Duration::milliseconds(TIMEOUT * 2))
        .await
        .expect("idle");
    assert_eq!(available(&h, "GIZMO").await, 5);
    assert_eq!(
        journal(&h, &id).await,
        pairs(&[
            ("ShipmentRequested", "applied"),
            ("Allocated", "applied"),
            ("CancelShipment", "applied"),
            ("CancelShipment", "ignored"),
        ])
    );
    assert_eq!(
        events(&h, &id),
        owned(&["ShipmentAllocated", "ShipmentCancelled"])
    );
}

#[tokio::test]
async fn cancelling_a_requested_shipment_cancels_its_pending_allocation_timer() {
    let h = harness(&[("GADGET", 0)]).await;
    let (id, _) = requested(&h, "GADGET", 1).await;
    assert_eq!(pending(&h, &id).await.len(), 1);

    when(&h, ShipmentMessage::CancelShipment, &id).await;
    assert_eq!(state(&h, &id).await, ShipmentState::Cancelled);
    assert!(pending(&h, &id).await.is_empty());
    // Stock arrives and time passes: no attempt is made any more.
    schema::set_stock(h.db(), "GADGET", 10)
        .await
        .expect("restock");
    h.advance(Duration::milliseconds(RETRY * 5))
        .await
        .expect("idle");
    assert_eq!(available(&h, "GADGET").await, 10);
    assert_eq!(
        inputs(&h, &id).await,
        [
            ShipmentInput::AllocationFailed { attempt: 1 },
            ShipmentInput::CancelShipment
        ]
    );
    assert_eq!(events(&h, &id), owned(&["ShipmentCancelled"]));
}

#[tokio::test]
async fn a_shipment_allocated_for_longer_than_the_timeout_is_cancelled_and_its_stock_released() {
    let h = harness(&[("WIDGET", 4)]).await;
    let (id, _) = requested(&h, "WIDGET", 4).await;
    assert_eq!(available(&h, "WIDGET").await, 0);

    h.advance(Duration::milliseconds(TIMEOUT - 1))
        .await
        .expect("idle");
    assert_eq!(state(&h, &id).await, ShipmentState::Allocated);
    h.advance(Duration::milliseconds(1)).await.expect("idle");
    assert_eq!(state(&h, &id).await, ShipmentState::Cancelled);
    assert_eq!(available(&h, "WIDGET").await, 4);
    assert!(
        allocation(&h, &id)
            .await
            .expect("allocation")
            .released_at
            .is_some()
    );
    let last = h.journal(&id).await.expect("journal").pop().expect("row");
    assert_eq!(last.trigger, "AllocationExpired");
    let detail = last.detail.unwrap_or_default();
    assert!(detail.contains("timeout 1500 ms"), "{detail}");
    assert_eq!(
        events(&h, &id),
        owned(&["ShipmentAllocated", "ShipmentCancelled"])
    );
    // A dispatch after the timeout is a fault: the instance parks.
    when(&h, ShipmentMessage::ShipmentDispatched, &id).await;
    let instance = h.instance(&id).await.expect("instance");
    assert!(instance.parked, "{instance:?}");
    assert_eq!(instance.state, ShipmentState::Cancelled);
    assert_eq!(available(&h, "WIDGET").await, 4);
}

#[tokio::test]
async fn a_duplicate_shipment_requested_changes_nothing() {
    let h = harness(&[("WIDGET", 5)]).await;
    let (id, first) = requested(&h, "WIDGET", 2).await;
    // The same message again (a redelivery) ...
    h.when_published(&first, ShipmentMessage::ShipmentRequested.routing_key())
        .await
        .expect("redelivered");
    // ... and a second request for the same shipment, as a new message.
    let again = Envelope {
        message_id: Uuid::new_v4(),
        ..first.clone()
    };
    h.when_published(&again, ShipmentMessage::ShipmentRequested.routing_key())
        .await
        .expect("requested again");

    let outcomes: Vec<ConsumeOutcome> = h.consumed().into_iter().map(|c| c.outcome).collect();
    let handled = ConsumeOutcome::Handled { attempts: 1 };
    assert_eq!(
        outcomes,
        [handled.clone(), ConsumeOutcome::Duplicate, handled]
    );
    assert_eq!(state(&h, &id).await, ShipmentState::Allocated);
    assert_eq!(available(&h, "WIDGET").await, 3);
    assert_eq!(events(&h, &id), owned(&["ShipmentAllocated"]));
    assert_eq!(
        journal(&h, &id).await,
        pairs(&[
            ("ShipmentRequested", "applied"),
            ("Allocated", "applied"),
            ("ShipmentRequested", "ignored"),
        ])
    );
    assert!(pending(&h, &id).await.is_empty());
}

#[tokio::test]
async fn a_message_whose_correlation_id_is_not_a_uuid_goes_to_the_error_queue() {
    let h = harness(&[("WIDGET", 5)]).await;
    let envelope = message(
        ShipmentMessage::ShipmentRequested,
        "order-42",
        serde_json::to_value(request("WIDGET", 1)).expect("payload"),
    );
    h.when_published(&envelope, ShipmentMessage::ShipmentRequested.routing_key())
        .await
        .expect("published");
    let consumed = h.consumed();
    assert!(
        matches!(
            &consumed[..],
            [c] if matches!(&c.outcome, ConsumeOutcome::DeadLettered { reason, .. } if reason.contains("UUID"))
        ),
        "{consumed:?}"
    );
    assert!(matches!(
        h.state("order-42").await,
        Err(SagaError::UnknownInstance { .. })
    ));
    assert_eq!(available(&h, "WIDGET").await, 5);
}

/// What the table does with one (state, input) pair: the next state and
/// the effects, or `None` with whether it is ignored (`true`) or rejected.
type Expected = Result<(ShipmentState, Vec<Effect<ShipmentSaga>>), bool>;

#[test]
fn the_transition_table_decides_every_state_with_every_input() {
    use ShipmentInput as I;
    use ShipmentState::*;
    const IGNORE: Expected = Err(true);
    const REJECT: Expected = Err(false);
    let publish = |e: ShipmentEvent| Effect::Publish(e);
    let release = Effect::Domain(ShipmentEffect::ReleaseAllocation);
    let retry = |attempt| Effect::Schedule {
        timer: ShipmentTimer::Allocate { attempt },
        after: Duration::milliseconds(RETRY),
    };
    let cancelled = publish(ShipmentEvent::Cancelled);
    let failed = |attempt| I::AllocationFailed { attempt };
    let table: Vec<(ShipmentState, ShipmentInput, Expected)> = vec![
        (
            Requested,
            I::Allocated,
            Ok((Allocated, vec![publish(ShipmentEvent::Allocated)])),
        ),
        (Requested, failed(1), Ok((Requested, vec![retry(2)]))),
        (Requested, failed(2), Ok((Requested, vec![retry(3)]))),
        (
            Requested,
            failed(3),
            Ok((Cancelled, vec![cancelled.clone()])),
        ),
        (Requested, I::ShipmentDispatched, REJECT),
        (
            Requested,
            I::CancelShipment,
            Ok((
                Cancelled,
                vec![Effect::Cancel("allocate"), cancelled.clone()],
            )),
        ),
        (Requested, I::AllocationExpired, IGNORE),
        (Allocated, I::Allocated, IGNORE),
        (Allocated, failed(1), IGNORE),
        (Allocated, failed(2), IGNORE),
        (Allocated, failed(3), IGNORE),
        (
            Allocated,
            I::ShipmentDispatched,
            Ok((Shipped, vec![publish(ShipmentEvent::Shipped)])),
        ),
        (
            Allocated,
            I::CancelShipment,
            Ok((Cancelled, vec![release.clone(), cancelled.clone()])),
        ),
        (
            Allocated,
            I::AllocationExpired,
            Ok((Cancelled, vec![release, cancelled])),
        ),
        (Shipped, I::Allocated, IGNORE),
        (Shipped, failed(1), IGNORE),
        (Shipped, failed(2), IGNORE),
        (Shipped, failed(3), IGNORE),
        (Shipped, I::ShipmentDispatched, IGNORE),
        (Shipped, I::CancelShipment, IGNORE),
        (Shipped, I::AllocationExpired, IGNORE),
        (Cancelled, I::Allocated, IGNORE),
        (Cancelled, failed(1), IGNORE),
        (Cancelled, failed(2), IGNORE),
        (Cancelled, failed(3), IGNORE),
        (Cancelled, I::ShipmentDispatched, REJECT),
        (Cancelled, I::CancelShipment, IGNORE),
        (Cancelled, I::AllocationExpired, IGNORE),
    ];
    // Every state with every kind of input (and every attempt number).
    let inputs = [
        I::Allocated,
        failed(1),
        failed(2),
        failed(3),
        I::ShipmentDispatched,
        I::CancelShipment,
        I::AllocationExpired,
    ];
    assert_eq!(table.len(), ShipmentState::ALL.len() * inputs.len());
    for &state in ShipmentState::ALL {
        for input in inputs {
            assert!(
                table.iter().any(|(s, i, _)| *s == state && *i == input),
                "{state:?} + {input:?} missing from the table"
            );
        }
    }
    let saga = saga();
    for (state, input, expected) in table {
        let decision = saga.decide(state, &request("WIDGET", 1), &input);
        let got: Expected = match &decision {
            Decision::Apply { next, effects, .. } => Ok((*next, effects.clone())),
            Decision::Ignore { .. } => IGNORE,
            Decision::Reject { .. } => REJECT,
        };
        assert_eq!(got, expected, "{state:?} + {input:?} gave {decision:?}");
    }
}

#[test]
fn final_states_absorb_every_input_and_the_diagram_is_the_table() {
    let saga = saga();
    for row in saga::describe::transitions(&saga) {
        let from = ShipmentState::parse(row.from).expect("a state");
        if from.is_final() {
            assert_ne!(row.policy, saga::describe::Policy::Apply, "{row:?}");
        }
    }
    assert_eq!(
        saga::describe::transitions(&saga).len(),
        ShipmentState::ALL.len() * ShipmentInput::samples().len()
    );
    let diagram = saga::describe::mermaid(&saga);
    for line in [
        "[*] --> requested: ShipmentRequested / schedule allocate",
        "requested --> requested: AllocationFailed(retry) / schedule allocate",
        "requested --> cancelled: AllocationFailed(last) / publish ShipmentCancelled",
        "requested --> cancelled: CancelShipment / cancel allocate, publish ShipmentCancelled",
        "allocated --> cancelled: AllocationExpired / release allocation, publish ShipmentCancelled",
        "allocated --> shipped: ShipmentDispatched / publish ShipmentShipped",
        "shipped --> [*]",
        "cancelled --> [*]",
    ] {
        assert!(diagram.contains(line), "{line} missing from\n{diagram}");
    }
    assert_eq!(
        ShipmentEvent::ALL.map(|e| e.routing_key()),
        [
            "shipment.allocated",
            "shipment.shipped",
            "shipment.cancelled"
        ]
    );
}
