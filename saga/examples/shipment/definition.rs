//! The shipment saga: `requested -> allocated -> shipped | cancelled`, one
//! instance per shipment, keyed by the shipment's UUID.
//!
//! | input | from | to | effects |
//! |---|---|---|---|
//! | `ShipmentRequested` (consumed) | | requested | schedule `allocate` (attempt 1, at once) |
//! | `Allocated` (timer fired, stock taken) | requested | allocated | publish `ShipmentAllocated` |
//! | `AllocationFailed` attempt 1 or 2 (timer fired) | requested | requested | schedule `allocate` (attempt + 1) after the retry delay |
//! | `AllocationFailed` attempt 3 | requested | cancelled | publish `ShipmentCancelled` |
//! | `CancelShipment` (consumed) | requested | cancelled | cancel `allocate`, publish `ShipmentCancelled` |
//! | `ShipmentDispatched` (consumed) | allocated | shipped | publish `ShipmentShipped` |
//! | `CancelShipment` (consumed) | allocated | cancelled | release the allocation, publish `ShipmentCancelled` |
//! | `AllocationExpired` (state timeout) | allocated | cancelled | release the allocation, publish `ShipmentCancelled` |
//!
//! Every other (state, input) pair is decided explicitly: *ignore* for a
//! duplicate or late input, *reject* (park, an operator looks) for a
//! dispatch the saga never allowed.

use chrono::Duration;
use saga::definition::{
    Decision, Routed, Saga, SagaEffect, SagaEvent, SagaInput, SagaState, SagaTimer, Start,
    StateTimeout,
};
use saga::message::Envelope;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Allocation attempts before a shipment is cancelled for lack of stock.
pub const MAX_ALLOCATION_ATTEMPTS: u32 = 3;

/// The shipment saga and its timings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShipmentSaga {
    /// Wait after a failed allocation attempt before the next one.
    pub retry_delay: Duration,
    /// How long a shipment may stay allocated without being dispatched.
    pub allocated_timeout: Duration,
}

impl Default for ShipmentSaga {
    fn default() -> Self {
        Self {
            retry_delay: Duration::seconds(30),
            allocated_timeout: Duration::hours(48),
        }
    }
}

/// What a `ShipmentRequested` message carries; the instance data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentRequest {
    /// The order the shipment is for (another service's reference).
    pub order_ref: String,
    /// What to ship.
    pub sku: String,
    /// How many (at least 1).
    pub quantity: i32,
}

// --- The transition table: states, inputs, decide -------------------------

/// Where a shipment is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShipmentState {
    /// Waiting for stock; the `allocate` timer is pending.
    Requested,
    /// Stock set aside; waiting for the dispatch.
    Allocated,
    /// Dispatched. Final.
    Shipped,
    /// Cancelled (no stock, asked to, or not dispatched in time). Final.
    Cancelled,
}

impl SagaState for ShipmentState {
    const ALL: &'static [Self] = &[
        Self::Requested,
        Self::Allocated,
        Self::Shipped,
        Self::Cancelled,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Allocated => "allocated",
            Self::Shipped => "shipped",
            Self::Cancelled => "cancelled",
        }
    }

    fn is_final(self) -> bool {
        matches!(self, Self::Shipped | Self::Cancelled)
    }
}

/// What can happen to a shipment (kept as JSON in the journal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShipmentInput {
    /// The `allocate` timer fired and the stock was set aside.
    Allocated,
    /// The `allocate` timer fired and attempt `attempt` found too little stock.
    AllocationFailed {
        /// 1, 2 or 3.
        attempt: u32,
    },
    /// `ShipmentDispatched` was consumed.
    ShipmentDispatched,
    /// `CancelShipment` was consumed.
    CancelShipment,
    /// The shipment was `allocated` for longer than the timeout.
    AllocationExpired,
}

impl SagaInput for ShipmentInput {
    fn name(&self) -> &'static str {
        match self {
            Self::Allocated => "Allocated",
            Self::AllocationFailed { .. } => "AllocationFailed",
            Self::ShipmentDispatched => "ShipmentDispatched",
            Self::CancelShipment => "CancelShipment",
            Self::AllocationExpired => "AllocationExpired",
        }
    }

    fn samples() -> Vec<(&'static str, Self)> {
        let last = MAX_ALLOCATION_ATTEMPTS;
        vec![
            ("Allocated", Self::Allocated),
            (
                "AllocationFailed(retry)",
                Self::AllocationFailed { attempt: 1 },
            ),
            (
                "AllocationFailed(last)",
                Self::AllocationFailed { attempt: last },
            ),
            ("ShipmentDispatched", Self::ShipmentDispatched),
            ("CancelShipment", Self::CancelShipment),
            ("AllocationExpired", Self::AllocationExpired),
        ]
    }
}

impl Saga for ShipmentSaga {
    const TYPE: &'static str = "shipment";
    const CONSUMES: &'static [&'static str] =
        &["ShipmentRequested", "ShipmentDispatched", "CancelShipment"];
    type State = ShipmentState;
    type Input = ShipmentInput;
    type Event = ShipmentEvent;
    type Timer = ShipmentTimer;
    type Effect = ShipmentEffect;
    type Data = ShipmentRequest;

    /// A new shipment tries to allocate its stock at once.
    fn start(&self, _request: &ShipmentRequest) -> Start<Self> {
        Start::new(
            ShipmentState::Requested,
            "ShipmentRequested",
            "shipment requested; allocation timer armed",
        )
        .schedule(ShipmentTimer::Allocate { attempt: 1 }, Duration::zero())
    }

    /// The transition table.
    fn decide(
        &self,
        state: ShipmentState,
        _: &ShipmentRequest,
        input: &ShipmentInput,
    ) -> Decision<Self> {
        use ShipmentEvent as E;
        use ShipmentInput as I;
        use ShipmentState as S;
        let release = ShipmentEffect::ReleaseAllocation;
        match (state, *input) {
            // Initially: the allocation timer is pending.
            (S::Requested, I::Allocated) => {
                Decision::to(S::Allocated, "stock allocated").publish(E::Allocated)
            }
            (S::Requested, I::AllocationFailed { attempt })
                if attempt < MAX_ALLOCATION_ATTEMPTS =>
            {
                let attempt = attempt + 1;
                Decision::to(S::Requested, "too little stock; allocation retried")
                    .schedule(ShipmentTimer::Allocate { attempt }, self.retry_delay)
            }
            (S::Requested, I::AllocationFailed { .. }) => {
                Decision::to(S::Cancelled, "too little stock at the last attempt")
                    .publish(E::Cancelled)
            }
            (S::Requested, I::CancelShipment) => {
                Decision::to(S::Cancelled, "cancelled before allocation")
                    .cancel(ShipmentTimer::ALLOCATE)
                    .publish(E::Cancelled)
            }
            (S::Requested, I::ShipmentDispatched) => {
                Decision::reject("dispatched before allocation")
            }
            (S::Requested, I::AllocationExpired) => Decision::ignore("not allocated yet"),

            // During Allocated: waiting for the dispatch.
            (S::Allocated, I::Allocated | I::AllocationFailed { .. }) => {
                Decision::ignore("late allocation result: already allocated")
            }
            (S::Allocated, I::ShipmentDispatched) => {
                Decision::to(S::Shipped, "dispatched").publish(E::Shipped)
            }
            (S::Allocated, I::CancelShipment) => {
                Decision::to(S::Cancelled, "cancelled; stock released")
                    .effect(release)
                    .publish(E::Cancelled)
            }
            (S::Allocated, I::AllocationExpired) => {
                Decision::to(S::Cancelled, "not dispatched in time")
                    .effect(release)
                    .publish(E::Cancelled)
            }

            // Final states: everything is late or duplicated.
            (S::Shipped, I::ShipmentDispatched) => Decision::ignore("duplicate ShipmentDispatched"),
            (S::Shipped, I::CancelShipment) => Decision::ignore("already shipped: too late"),
            (S::Shipped, I::Allocated | I::AllocationFailed { .. } | I::AllocationExpired) => {
                Decision::ignore("late input: already shipped")
            }
            (S::Cancelled, I::CancelShipment) => Decision::ignore("duplicate CancelShipment"),
            (S::Cancelled, I::ShipmentDispatched) => Decision::reject("dispatched when cancelled"),
            (S::Cancelled, I::Allocated | I::AllocationFailed { .. } | I::AllocationExpired) => {
                Decision::ignore("late input: already cancelled")
            }
        }
    }

    /// The correlation id must be a UUID; `ShipmentRequested` starts an
    /// instance, the other two are inputs of an existing one.
    fn route(&self, envelope: &Envelope) -> Result<Routed<Self>, String> {
        Uuid::parse_str(&envelope.correlation_id).map_err(|e| {
            format!(
                "a shipment is keyed by a UUID, got `{}`: {e}",
                envelope.correlation_id
            )
        })?;
        let message = ShipmentMessage::ALL
            .into_iter()
            .find(|m| m.message_type() == envelope.message_type);
        match message {
            Some(ShipmentMessage::ShipmentRequested) => {
                let request: ShipmentRequest = envelope
                    .payload_as()
                    .map_err(|e| format!("ShipmentRequested payload: {e}"))?;
                if request.quantity < 1 {
                    return Err(format!("cannot ship a quantity of {}", request.quantity));
                }
                Ok(Routed::Start(request))
            }
            Some(ShipmentMessage::ShipmentDispatched) => {
                Ok(Routed::Input(ShipmentInput::ShipmentDispatched))
            }
            Some(ShipmentMessage::CancelShipment) => {
                Ok(Routed::Input(ShipmentInput::CancelShipment))
            }
            None => Err(format!(
                "the shipment saga does not consume {}",
                envelope.message_type
            )),
        }
    }

    fn state_timeouts(&self) -> Vec<StateTimeout<Self>> {
        vec![StateTimeout {
            state: ShipmentState::Allocated,
            after: self.allocated_timeout,
            input: ShipmentInput::AllocationExpired,
        }]
    }
}

// --- Events, timer, effect, messages ----------------------------------------

/// What the saga publishes (through the outbox).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShipmentEvent {
    /// `ShipmentAllocated`: stock was set aside.
    Allocated,
    /// `ShipmentShipped`: the shipment left.
    Shipped,
    /// `ShipmentCancelled`: the shipment will not happen.
    Cancelled,
}

impl ShipmentEvent {
    /// Every event.
    pub const ALL: [Self; 3] = [Self::Allocated, Self::Shipped, Self::Cancelled];
}

impl SagaEvent for ShipmentEvent {
    fn message_type(&self) -> &'static str {
        match self {
            Self::Allocated => "ShipmentAllocated",
            Self::Shipped => "ShipmentShipped",
            Self::Cancelled => "ShipmentCancelled",
        }
    }

    fn routing_key(&self) -> &'static str {
        match self {
            Self::Allocated => "shipment.allocated",
            Self::Shipped => "shipment.shipped",
            Self::Cancelled => "shipment.cancelled",
        }
    }
}

/// What the saga consumes (published by other services).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShipmentMessage {
    /// Starts a shipment; the payload is a [`ShipmentRequest`].
    ShipmentRequested,
    /// The warehouse dispatched the shipment.
    ShipmentDispatched,
    /// Someone asks to cancel the shipment.
    CancelShipment,
}

impl ShipmentMessage {
    /// Every consumed message.
    pub const ALL: [Self; 3] = [
        Self::ShipmentRequested,
        Self::ShipmentDispatched,
        Self::CancelShipment,
    ];

    /// The envelope's `message_type`.
    pub fn message_type(self) -> &'static str {
        match self {
            Self::ShipmentRequested => "ShipmentRequested",
            Self::ShipmentDispatched => "ShipmentDispatched",
            Self::CancelShipment => "CancelShipment",
        }
    }

    /// Where its publisher routes it.
    pub fn routing_key(self) -> &'static str {
        match self {
            Self::ShipmentRequested => "shipment.requested",
            Self::ShipmentDispatched => "shipment.dispatched",
            Self::CancelShipment => "shipment.cancel",
        }
    }
}

/// The saga's durable timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShipmentTimer {
    /// Try to allocate the stock: attempt `attempt` of [`MAX_ALLOCATION_ATTEMPTS`].
    Allocate {
        /// Which attempt this is.
        attempt: u32,
    },
}

impl ShipmentTimer {
    /// The kind of [`ShipmentTimer::Allocate`].
    pub const ALLOCATE: &'static str = "allocate";
}

impl SagaTimer for ShipmentTimer {
    fn kind(&self) -> &'static str {
        match self {
            Self::Allocate { .. } => Self::ALLOCATE,
        }
    }
}

/// The saga's domain effect, carried out by its hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShipmentEffect {
    /// Give the allocated stock back (the compensation of the allocation).
    ReleaseAllocation,
}

impl SagaEffect for ShipmentEffect {
    fn describe(&self) -> String {
        match self {
            Self::ReleaseAllocation => "release allocation".to_owned(),
        }
    }
}
