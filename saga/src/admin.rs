//! Operating sagas by type name: what an operator command or a console
//! needs without knowing the saga's Rust type. Every
//! [`SagaEngine`] is a [`SagaAdmin`]; a host
//! collects its sagas in a [`Sagas`] registry and looks them up by type.

use std::sync::Arc;

use async_trait::async_trait;

use crate::definition::{Saga, SagaState};
use crate::describe::{self, StateGraph, TransitionRow};
use crate::engine::{ParkedInstance, SagaEngine};
use crate::error::SagaError;

/// What resuming did, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumedSummary {
    /// The state the instance was resumed in.
    pub state: &'static str,
    /// What the re-run did (`Debug` of its outcome), if there was one.
    pub rerun: Option<String>,
}

/// One saga type's operator view.
#[async_trait]
pub trait SagaAdmin: Send + Sync + 'static {
    /// The saga type.
    fn saga_type(&self) -> &'static str;
    /// Every state name, in lifecycle order.
    fn states(&self) -> Vec<&'static str>;
    /// The transition table.
    fn transitions(&self) -> Vec<TransitionRow>;
    /// The state diagram (Mermaid).
    fn mermaid(&self) -> String;
    /// The state machine as a graph (initial and final states, transitions
    /// grouped by their ends), for drawing it.
    fn graph(&self) -> StateGraph;
    /// Parked instances, oldest first.
    async fn parked(&self, limit: u64) -> Result<Vec<ParkedInstance>, SagaError>;
    /// Resumes a parked instance with a fresh budget (the journal does not
    /// say who: prefer [`SagaAdmin::resume_by`]).
    async fn resume(&self, correlation_id: &str) -> Result<ResumedSummary, SagaError>;
    /// Resumes a parked instance with a fresh budget on behalf of
    /// `operator`: the journal row and the operator-action log name them
    /// ([`SagaEngine::resume_by`]).
    async fn resume_by(
        &self,
        correlation_id: &str,
        operator: &str,
    ) -> Result<ResumedSummary, SagaError>;
}

#[async_trait]
impl<S: Saga> SagaAdmin for SagaEngine<S> {
    fn saga_type(&self) -> &'static str {
        S::TYPE
    }

    fn states(&self) -> Vec<&'static str> {
        S::State::ALL.iter().map(|s| s.name()).collect()
    }

    fn transitions(&self) -> Vec<TransitionRow> {
        describe::transitions(self.saga())
    }

    fn mermaid(&self) -> String {
        describe::mermaid(self.saga())
    }

    fn graph(&self) -> StateGraph {
        describe::graph(self.saga())
    }

    async fn parked(&self, limit: u64) -> Result<Vec<ParkedInstance>, SagaError> {
        SagaEngine::parked(self, limit).await
    }

    async fn resume(&self, correlation_id: &str) -> Result<ResumedSummary, SagaError> {
        Ok(summary(SagaEngine::resume(self, correlation_id).await?))
    }

    async fn resume_by(
        &self,
        correlation_id: &str,
        operator: &str,
    ) -> Result<ResumedSummary, SagaError> {
        Ok(summary(
            SagaEngine::resume_by(self, correlation_id, operator).await?,
        ))
    }
}

fn summary<St: SagaState>(resumed: crate::engine::Resumed<St>) -> ResumedSummary {
    ResumedSummary {
        state: resumed.state.name(),
        rerun: resumed.rerun.map(|h| format!("{h:?}")),
    }
}

/// The sagas a host runs, by type.
#[derive(Clone, Default)]
pub struct Sagas {
    sagas: Vec<Arc<dyn SagaAdmin>>,
}

impl Sagas {
    /// No sagas yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a saga (its engine).
    pub fn with(mut self, saga: impl SagaAdmin) -> Self {
        self.sagas.push(Arc::new(saga));
        self
    }

    /// The saga of type `saga_type`, or an error naming the known types.
    pub fn get(&self, saga_type: &str) -> Result<&Arc<dyn SagaAdmin>, UnknownSagaType> {
        self.sagas
            .iter()
            .find(|s| s.saga_type() == saga_type)
            .ok_or_else(|| UnknownSagaType {
                requested: saga_type.to_owned(),
                known: self.types(),
            })
    }

    /// Every registered saga type.
    pub fn types(&self) -> Vec<&'static str> {
        self.sagas.iter().map(|s| s.saga_type()).collect()
    }

    /// Every registered saga.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn SagaAdmin>> {
        self.sagas.iter()
    }
}

/// A saga type no registered saga has.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown saga type `{requested}` (known: {})", known.join(", "))]
pub struct UnknownSagaType {
    /// What was asked for.
    pub requested: String,
    /// What exists.
    pub known: Vec<&'static str>,
}
