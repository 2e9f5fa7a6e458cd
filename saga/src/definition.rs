//! What a saga is: a type implementing [`Saga`], with its states, inputs,
//! events, timers and domain effects as associated types, and a pure,
//! synchronous [`Saga::decide`].
//!
//! `decide` never reads the clock, a random number generator or the
//! database: everything it needs comes in as arguments (configuration
//! through `&self`), and it answers with a [`Decision`] the engine carries
//! out in one transaction. Its `match (state, input)` is the transition
//! table; [`crate::describe`] lists it and draws it for any saga.

use std::fmt::{self, Debug};
use std::hash::Hash;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::message::Envelope;

/// The states of a saga. Stored by [`SagaState::name`] in
/// `saga_instances.state` and the journal.
pub trait SagaState: Copy + Eq + Hash + Debug + Send + Sync + 'static {
    /// Every state, in lifecycle order (tables and diagrams list them so).
    const ALL: &'static [Self];

    /// The stored name, e.g. `processing`.
    fn name(self) -> &'static str;

    /// A final state: the instance is done (drawn as `--> [*]`).
    fn is_final(self) -> bool;

    /// The state stored as `name`.
    fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|s| s.name() == name)
    }
}

/// What can happen to a saga: consumed messages, fired timers, state
/// timeouts and commands. Kept as JSON in the journal (`saga_transitions.input`),
/// so every decision can be explained afterwards.
pub trait SagaInput:
    Clone + PartialEq + Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// A short stable name: the journal's `trigger`.
    fn name(&self) -> &'static str;

    /// One example of every kind of input, with a label, for the transition
    /// table and the diagram (`PaymentDecided(approved)`, ...).
    fn samples() -> Vec<(&'static str, Self)>;
}

/// An event the saga publishes through the outbox.
pub trait SagaEvent: Clone + PartialEq + Debug + Send + Sync + 'static {
    /// The envelope's `message_type` (and the broker's type property).
    fn message_type(&self) -> &'static str;
    /// Where the events exchange (or topic) routes it.
    fn routing_key(&self) -> &'static str;
}

/// A durable timer the saga can schedule. The value is the timer's payload
/// (stored as JSON in `saga_timers.payload`); [`SagaTimer::kind`] names it.
/// An instance has at most one pending timer of a kind: scheduling a kind
/// again re-arms it (new due time and payload), also after it fired.
pub trait SagaTimer:
    Clone + PartialEq + Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// The timer's kind, e.g. `payment_due`.
    fn kind(&self) -> &'static str;
}

/// A domain effect: something only the saga's own code can do (release
/// stock, refund a payment), carried out by its [`crate::hooks::Hooks`]
/// inside the engine's transaction.
pub trait SagaEffect: Clone + PartialEq + Debug + Send + Sync + 'static {
    /// A short description for tables and diagrams, e.g. `release stock`.
    fn describe(&self) -> String;
}

/// A saga definition. The type is the saga; a value of it carries its
/// configuration (delays, limits), which is why the methods take `&self`.
///
/// See the crate documentation ("Write your own saga") for a walk-through.
pub trait Saga: Send + Sync + Sized + 'static {
    /// The saga type, stored in `saga_instances.saga_type` (and every other
    /// saga table): instances, timers and sweeps of different types never
    /// touch each other. Never rename it once instances exist.
    const TYPE: &'static str;

    /// Message types the saga consumes (see [`Saga::route`]); metrics label
    /// them, everything else is `other`.
    const CONSUMES: &'static [&'static str] = &[];

    /// Where an instance is (stored by name).
    type State: SagaState;
    /// What can happen to it.
    type Input: SagaInput;
    /// What it publishes.
    type Event: SagaEvent;
    /// The timers it schedules ([`NoTimer`] for none).
    type Timer: SagaTimer;
    /// Its domain effects ([`NoEffect`] for none).
    type Effect: SagaEffect;
    /// What an instance keeps (`saga_instances.data`, JSON).
    type Data: Clone
        + PartialEq
        + Debug
        + Default
        + Serialize
        + DeserializeOwned
        + Send
        + Sync
        + 'static;

    /// How a new instance begins: its first state, what happens then, and
    /// the trigger the journal names.
    fn start(&self, data: &Self::Data) -> Start<Self>;

    /// The transition table: what `input` does to an instance in `state`
    /// holding `data`. Pure and synchronous; one exhaustive `match`.
    fn decide(&self, state: Self::State, data: &Self::Data, input: &Self::Input) -> Decision<Self>;

    /// What a consumed message means to the saga: it starts an instance, or
    /// it is an input for the instance named by its `correlation_id`. An
    /// error names why the message is unusable (it goes to the error queue).
    fn route(&self, envelope: &Envelope) -> Result<Routed<Self>, String> {
        Err(format!(
            "saga `{}` consumes no messages, got {}",
            Self::TYPE,
            envelope.message_type
        ))
    }

    /// "In state X for longer than T: input Y." The sweep applies them.
    fn state_timeouts(&self) -> Vec<StateTimeout<Self>> {
        Vec::new()
    }

    /// The payload of a published event. By default the instance data with
    /// the state it left and the state it entered.
    fn event_payload(
        &self,
        _event: &Self::Event,
        data: &Self::Data,
        from: Option<Self::State>,
        to: Self::State,
    ) -> Result<serde_json::Value, serde_json::Error> {
        Ok(serde_json::json!({
            "data": serde_json::to_value(data)?,
            "previous_state": from.map(SagaState::name),
            "state": to.name(),
        }))
    }

    /// Who started the flow, for the envelope's `initiated_by`.
    fn initiated_by(&self, _data: &Self::Data) -> Option<i64> {
        None
    }

    /// The input re-run when an operator resumes a parked instance in
    /// `state` (its pending timers are made due and sweeps see it again in
    /// any case). `None` by default.
    fn resume_input(&self, _state: Self::State) -> Option<Self::Input> {
        None
    }
}

/// How a new instance begins.
pub struct Start<S: Saga> {
    /// Its first state.
    pub state: S::State,
    /// What happens as it begins (publish, schedule, domain effects).
    pub effects: Vec<Effect<S>>,
    /// The journal's trigger for the first row, e.g. `OrderPlaced`.
    pub trigger: &'static str,
    /// Why, for the journal.
    pub note: &'static str,
}

impl<S: Saga> Start<S> {
    /// Begins in `state`, journalled as `trigger` with `note`.
    pub fn new(state: S::State, trigger: &'static str, note: &'static str) -> Self {
        Start {
            state,
            effects: Vec::new(),
            trigger,
            note,
        }
    }

    /// Publishes `event` as the instance begins.
    pub fn publish(mut self, event: S::Event) -> Self {
        self.effects.push(Effect::Publish(event));
        self
    }

    /// Schedules `timer` to fire `after` the start.
    pub fn schedule(mut self, timer: S::Timer, after: chrono::Duration) -> Self {
        self.effects.push(Effect::Schedule { timer, after });
        self
    }

    /// Carries out a domain effect as the instance begins.
    pub fn effect(mut self, effect: S::Effect) -> Self {
        self.effects.push(Effect::Domain(effect));
        self
    }
}

/// What a consumed message means to a saga (see [`Saga::route`]).
pub enum Routed<S: Saga> {
    /// Start an instance with this data (a second start of the same
    /// correlation id is journalled as ignored).
    Start(S::Data),
    /// An input for the existing instance.
    Input(S::Input),
}

/// "An instance in `state` for longer than `after` gets `input`."
pub struct StateTimeout<S: Saga> {
    /// The state that times out.
    pub state: S::State,
    /// How long an instance may stay in it.
    pub after: chrono::Duration,
    /// What it then gets.
    pub input: S::Input,
}

/// Something the engine carries out with a transition, in its transaction.
pub enum Effect<S: Saga> {
    /// Queue the event in the outbox; it is published after the commit.
    Publish(S::Event),
    /// Arm the instance's timer of this kind to fire `after` now (replacing
    /// a pending one of the same kind, or re-arming one that fired).
    Schedule {
        /// The timer and its payload.
        timer: S::Timer,
        /// How long from now.
        after: chrono::Duration,
    },
    /// Cancel the instance's pending timer of this kind (a no-op if none).
    Cancel(&'static str),
    /// A domain effect, carried out by the saga's hooks.
    Domain(S::Effect),
}

impl<S: Saga> Effect<S> {
    /// A short description for tables and diagrams.
    pub fn describe(&self) -> String {
        match self {
            Effect::Publish(event) => format!("publish {}", event.message_type()),
            Effect::Schedule { timer, .. } => format!("schedule {}", timer.kind()),
            Effect::Cancel(kind) => format!("cancel {kind}"),
            Effect::Domain(effect) => effect.describe(),
        }
    }
}

impl<S: Saga> Clone for Effect<S> {
    fn clone(&self) -> Self {
        match self {
            Effect::Publish(e) => Effect::Publish(e.clone()),
            Effect::Schedule { timer, after } => Effect::Schedule {
                timer: timer.clone(),
                after: *after,
            },
            Effect::Cancel(kind) => Effect::Cancel(kind),
            Effect::Domain(e) => Effect::Domain(e.clone()),
        }
    }
}

impl<S: Saga> PartialEq for Effect<S> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Effect::Publish(a), Effect::Publish(b)) => a == b,
            (Effect::Schedule { timer: a, after: x }, Effect::Schedule { timer: b, after: y }) => {
                a == b && x == y
            }
            (Effect::Cancel(a), Effect::Cancel(b)) => a == b,
            (Effect::Domain(a), Effect::Domain(b)) => a == b,
            _ => false,
        }
    }
}

impl<S: Saga> Debug for Effect<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Effect::Publish(e) => f.debug_tuple("Publish").field(e).finish(),
            Effect::Schedule { timer, after } => f
                .debug_struct("Schedule")
                .field("timer", timer)
                .field("after", after)
                .finish(),
            Effect::Cancel(kind) => f.debug_tuple("Cancel").field(kind).finish(),
            Effect::Domain(e) => f.debug_tuple("Domain").field(e).finish(),
        }
    }
}

/// The answer of [`Saga::decide`] to one input.
pub enum Decision<S: Saga> {
    /// Move to `next` (possibly the same state) and carry out `effects`.
    Apply {
        /// The state to move to.
        next: S::State,
        /// What the engine carries out in the same transaction, in order.
        effects: Vec<Effect<S>>,
        /// New instance data, if the input changes it.
        data: Option<S::Data>,
        /// Why, for the journal.
        note: &'static str,
    },
    /// A duplicate or late input: change nothing, journal why.
    Ignore {
        /// Why.
        reason: &'static str,
    },
    /// An input that must not happen in this state: a fault (the retry
    /// budget is spent at once and the instance is parked).
    Reject {
        /// Why.
        reason: &'static str,
    },
}

impl<S: Saga> Decision<S> {
    /// Move to `next`, journalled with `note`; add effects with the
    /// builder methods.
    pub fn to(next: S::State, note: &'static str) -> Self {
        Decision::Apply {
            next,
            effects: Vec::new(),
            data: None,
            note,
        }
    }

    /// Change nothing (a duplicate or late input).
    pub fn ignore(reason: &'static str) -> Self {
        Decision::Ignore { reason }
    }

    /// A fault.
    pub fn reject(reason: &'static str) -> Self {
        Decision::Reject { reason }
    }

    fn push(mut self, effect: Effect<S>) -> Self {
        if let Decision::Apply { effects, .. } = &mut self {
            effects.push(effect);
        }
        self
    }

    /// Also publish `event`.
    pub fn publish(self, event: S::Event) -> Self {
        self.push(Effect::Publish(event))
    }

    /// Also arm `timer` to fire `after` now.
    pub fn schedule(self, timer: S::Timer, after: chrono::Duration) -> Self {
        self.push(Effect::Schedule { timer, after })
    }

    /// Also cancel the pending timer of `kind`.
    pub fn cancel(self, kind: &'static str) -> Self {
        self.push(Effect::Cancel(kind))
    }

    /// Also carry out a domain effect.
    pub fn effect(self, effect: S::Effect) -> Self {
        self.push(Effect::Domain(effect))
    }

    /// Also store new instance data.
    pub fn with_data(mut self, new: S::Data) -> Self {
        if let Decision::Apply { data, .. } = &mut self {
            *data = Some(new);
        }
        self
    }

    /// The next state, when the decision applies.
    pub fn next(&self) -> Option<S::State> {
        match self {
            Decision::Apply { next, .. } => Some(*next),
            _ => None,
        }
    }

    /// The effects, empty unless the decision applies.
    pub fn effects(&self) -> &[Effect<S>] {
        match self {
            Decision::Apply { effects, .. } => effects,
            _ => &[],
        }
    }
}

impl<S: Saga> Clone for Decision<S> {
    fn clone(&self) -> Self {
        match self {
            Decision::Apply {
                next,
                effects,
                data,
                note,
            } => Decision::Apply {
                next: *next,
                effects: effects.clone(),
                data: data.clone(),
                note,
            },
            Decision::Ignore { reason } => Decision::Ignore { reason },
            Decision::Reject { reason } => Decision::Reject { reason },
        }
    }
}

impl<S: Saga> PartialEq for Decision<S> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                Decision::Apply {
                    next: a,
                    effects: x,
                    data: d,
                    note: n,
                },
                Decision::Apply {
                    next: b,
                    effects: y,
                    data: e,
                    note: m,
                },
            ) => a == b && x == y && d == e && n == m,
            (Decision::Ignore { reason: a }, Decision::Ignore { reason: b }) => a == b,
            (Decision::Reject { reason: a }, Decision::Reject { reason: b }) => a == b,
            _ => false,
        }
    }
}

impl<S: Saga> Debug for Decision<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Apply {
                next,
                effects,
                data,
                note,
            } => f
                .debug_struct("Apply")
                .field("next", next)
                .field("effects", effects)
                .field("data", data)
                .field("note", note)
                .finish(),
            Decision::Ignore { reason } => {
                f.debug_struct("Ignore").field("reason", reason).finish()
            }
            Decision::Reject { reason } => {
                f.debug_struct("Reject").field("reason", reason).finish()
            }
        }
    }
}

/// For sagas without timers: a timer that cannot exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum NoTimer {}

impl SagaTimer for NoTimer {
    fn kind(&self) -> &'static str {
        match *self {}
    }
}

/// For sagas without domain effects: an effect that cannot exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoEffect {}

impl SagaEffect for NoEffect {
    fn describe(&self) -> String {
        match *self {}
    }
}
