//! A saga's own effectful code, called by the engine inside its
//! transaction: what a fired timer means (a payment draw, a call to a
//! warehouse), how a domain effect is carried out (release stock, refund),
//! and what else changes when an instance enters a state (a status column
//! of the saga's own table). Whatever a hook writes commits or rolls back
//! with the transition.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::DatabaseTransaction;

use crate::definition::Saga;
use crate::error::SagaError;

/// What a hook sees of the instance it runs for.
pub struct HookContext<'a, S: Saga> {
    /// The engine's transaction: write through it.
    pub txn: &'a DatabaseTransaction,
    /// `saga_instances.id`.
    pub instance_id: i64,
    /// The instance's correlation id.
    pub correlation_id: &'a str,
    /// The instance data (after the transition, when it changed it).
    pub data: &'a S::Data,
    /// The engine clock's `now` for this transaction.
    pub now: DateTime<Utc>,
}

/// One domain effect of a batch, with the instance it is for.
pub struct EffectCall<'a, S: Saga> {
    /// `saga_instances.id`.
    pub instance_id: i64,
    /// The instance's correlation id.
    pub correlation_id: &'a str,
    /// The instance data after the transition.
    pub data: &'a S::Data,
    /// The effect.
    pub effect: &'a S::Effect,
}

/// One change of state of a batch.
pub struct EnteredCall<'a, S: Saga> {
    /// `saga_instances.id`.
    pub instance_id: i64,
    /// The instance's correlation id.
    pub correlation_id: &'a str,
    /// The instance data after the transition.
    pub data: &'a S::Data,
    /// The state it left.
    pub from: S::State,
    /// The (different) state it entered.
    pub to: S::State,
}

/// The effectful half of a saga (the pure half is [`Saga`]). Every method
/// runs inside the engine's transaction; an error rolls the transition back
/// and spends one attempt of the instance's retry budget
/// ([`SagaError::Transient`] and database errors are retried,
/// [`SagaError::Effect`] parks at once).
#[async_trait]
pub trait Hooks<S: Saga>: Send + Sync + 'static {
    /// The input a fired timer becomes. The default fails: a saga that
    /// schedules timers says what they mean here.
    async fn timer_input(
        &self,
        _cx: &HookContext<'_, S>,
        timer: &S::Timer,
    ) -> Result<S::Input, SagaError> {
        Err(SagaError::Effect(format!(
            "saga `{}` has no hook for timer {timer:?}",
            S::TYPE
        )))
    }

    /// Carries out a domain effect. The default fails: a saga with domain
    /// effects carries them out here.
    async fn effect(&self, _cx: &HookContext<'_, S>, effect: &S::Effect) -> Result<(), SagaError> {
        Err(SagaError::Effect(format!(
            "saga `{}` has no hook for effect {effect:?}",
            S::TYPE
        )))
    }

    /// The instance moved from `from` to a different state `to` (after the
    /// instance row was updated, before the effects).
    async fn entered(
        &self,
        _cx: &HookContext<'_, S>,
        _from: S::State,
        _to: S::State,
    ) -> Result<(), SagaError> {
        Ok(())
    }

    /// Carries out the domain effects of a whole batch (a batch of consumed
    /// messages, of fired timers, or a state-timeout sweep), in order. The
    /// default calls [`Hooks::effect`] for each; override it to write them
    /// set-based (one statement for the batch).
    async fn effects_batch(
        &self,
        txn: &DatabaseTransaction,
        now: DateTime<Utc>,
        calls: &[EffectCall<'_, S>],
    ) -> Result<(), SagaError> {
        for call in calls {
            let cx = HookContext {
                txn,
                instance_id: call.instance_id,
                correlation_id: call.correlation_id,
                data: call.data,
                now,
            };
            self.effect(&cx, call.effect).await?;
        }
        Ok(())
    }

    /// The changes of state of a whole batch, in order. The default calls
    /// [`Hooks::entered`] for each; override it to write them set-based.
    async fn entered_batch(
        &self,
        txn: &DatabaseTransaction,
        now: DateTime<Utc>,
        calls: &[EnteredCall<'_, S>],
    ) -> Result<(), SagaError> {
        for call in calls {
            let cx = HookContext {
                txn,
                instance_id: call.instance_id,
                correlation_id: call.correlation_id,
                data: call.data,
                now,
            };
            self.entered(&cx, call.from, call.to).await?;
        }
        Ok(())
    }

    /// Called once per state-timeout batch, before its instances are
    /// decided, with their correlation ids: lock what must be locked before
    /// the decisions, in a fixed order, so the batch cannot deadlock with
    /// the saga's other writers. Effect hooks run last in the transaction
    /// (just before its commit), so locks they take themselves in a fixed
    /// order are held briefly; prefer that where it is enough.
    async fn prepare_batch(
        &self,
        _txn: &DatabaseTransaction,
        _correlation_ids: &[String],
    ) -> Result<(), SagaError> {
        Ok(())
    }
}

/// Hooks of a saga that needs none (no timers, no domain effects).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHooks;

impl<S: Saga> Hooks<S> for NoHooks {}
