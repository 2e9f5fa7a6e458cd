//! A transition that cancels a timer, racing the firing of that very timer,
//! against the real PostgreSQL (row locks are what is tested). The saga is
//! the shipment example's (`examples/shipment/`): `CancelShipment` cancels
//! the pending `allocate` timer.

#[allow(dead_code)]
#[path = "../examples/shipment/definition.rs"]
mod definition;
#[allow(dead_code)]
#[path = "../examples/shipment/hooks.rs"]
mod hooks;
#[allow(dead_code)]
#[path = "../examples/shipment/schema.rs"]
mod schema;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{Duration, Utc};
use saga::SagaError;
use saga::clock::ManualClock;
use saga::engine::{ApplyProbe, Handled, SagaEngine};
use saga::message::Envelope;
use saga::schema::{instances, timers, transitions};
use saga::testing::TestDatabase;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::definition::{
    ShipmentInput, ShipmentMessage, ShipmentRequest, ShipmentSaga, ShipmentState,
};

/// Holds the second allocation attempt after it decided, before it writes
/// the instance (holding the timer row it fires), and lets the cancellation
/// start meanwhile.
struct HoldSecondAttempt {
    reached: Arc<Notify>,
}

#[async_trait]
impl ApplyProbe<ShipmentSaga> for HoldSecondAttempt {
    async fn before_write(
        &self,
        _instance: &instances::Model,
        input: &ShipmentInput,
    ) -> Result<(), SagaError> {
        if *input == (ShipmentInput::AllocationFailed { attempt: 2 }) {
            self.reached.notify_one();
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        Ok(())
    }
}

fn message(kind: ShipmentMessage, id: Uuid, payload: serde_json::Value) -> Envelope {
    Envelope {
        message_id: Uuid::new_v4(),
        message_type: kind.message_type().to_owned(),
        correlation_id: id.to_string(),
        causation_id: None,
        occurred_at: Utc::now(),
        initiated_by: None,
        payload,
    }
}

#[tokio::test]
async fn a_cancellation_racing_the_firing_of_its_timer_waits_for_it_instead_of_deadlocking() {
    let tdb = TestDatabase::create_with::<schema::Migrator>().await;
    let clock = ManualClock::new(Utc::now());
    let reached = Arc::new(Notify::new());
    let engine = SagaEngine::new(
        ShipmentSaga {
            retry_delay: Duration::seconds(1),
            allocated_timeout: Duration::seconds(60),
        },
        tdb.db.clone(),
    )
    .with_hooks(hooks::ShipmentHooks)
    .with_clock(Arc::new(clock.clone()))
    .with_probe(Arc::new(HoldSecondAttempt {
        reached: reached.clone(),
    }));
    schema::set_stock(&tdb.db, "GADGET", 0)
        .await
        .expect("stock");
    let id = Uuid::new_v4();
    let request = serde_json::to_value(ShipmentRequest {
        order_ref: "order-1".to_owned(),
        sku: "GADGET".to_owned(),
        quantity: 1,
    })
    .expect("payload");
    engine
        .handle(
            "shipment-saga",
            &message(ShipmentMessage::ShipmentRequested, id, request),
        )
        .await
        .expect("requested");
    // Attempt 1 fails; attempt 2 is due a second later.
    engine
        .try_fire_due_timer_once()
        .await
        .expect("attempt 1")
        .expect("a due timer");
    clock.advance(Duration::seconds(1));

    // Attempt 2 fires and holds; the cancellation writes the instance while
    // it does. Before the fix: the cancellation waited for the timer row,
    // the firing for the instance row, and PostgreSQL aborted one
    // (40P01 deadlock detected).
    let fire = engine.try_fire_due_timer_once();
    let cancel = async {
        reached.notified().await;
        engine
            .handle(
                "shipment-saga",
                &message(ShipmentMessage::CancelShipment, id, serde_json::Value::Null),
            )
            .await
    };
    let (fired, cancelled) = tokio::join!(fire, cancel);
    let fired = fired.expect("attempt 2 fired").expect("a due timer");
    assert_eq!(fired.input, ShipmentInput::AllocationFailed { attempt: 2 });
    assert_eq!(
        cancelled.expect("cancelled"),
        Handled::Applied {
            from: ShipmentState::Requested,
            to: ShipmentState::Cancelled,
            published: vec!["ShipmentCancelled"],
        }
    );

    // The cancellation decided again after the attempt: the re-armed timer
    // (attempt 3) is gone, nothing failed, nothing is parked.
    let instance = engine
        .instance(&id.to_string())
        .await
        .expect("instance")
        .expect("exists");
    assert_eq!(instance.state, ShipmentState::Cancelled);
    assert_eq!((instance.attempts, instance.parked), (0, false));
    let pending = timers::Entity::find()
        .filter(timers::Column::CorrelationId.eq(id.to_string()))
        .filter(timers::Column::FiredAt.is_null())
        .count(&tdb.db)
        .await
        .expect("timers");
    assert_eq!(pending, 0);
    let outcomes: Vec<(String, String)> = transitions::Entity::find()
        .filter(transitions::Column::CorrelationId.eq(id.to_string()))
        .all(&tdb.db)
        .await
        .expect("journal")
        .into_iter()
        .map(|row| (row.trigger, row.outcome))
        .collect();
    let applied = |trigger: &str| (trigger.to_owned(), "applied".to_owned());
    assert_eq!(
        outcomes,
        [
            applied("ShipmentRequested"),
            applied("AllocationFailed"),
            applied("AllocationFailed"),
            applied("CancelShipment"),
        ]
    );
    assert!(
        engine
            .try_fire_due_timer_once()
            .await
            .expect("poll")
            .is_none()
    );
    tdb.drop().await;
}
