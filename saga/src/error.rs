//! Errors of the saga engine, classified as retryable or terminal.

use sea_orm::DbErr;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    #[error("no {saga_type} saga instance with correlation id `{correlation_id}`")]
    UnknownInstance {
        saga_type: &'static str,
        correlation_id: String,
    },
    #[error("{input} rejected in state {state}: {reason}")]
    Rejected {
        state: String,
        input: &'static str,
        reason: &'static str,
    },
    #[error("instance `{0}` kept changing under us (optimistic concurrency conflicts)")]
    Contention(String),
    #[error("corrupt saga data: {0}")]
    Corrupt(String),
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The instance is parked (its retry budget is spent): nothing is
    /// applied to it until an operator resumes it.
    #[error("order saga `{0}` is parked; resume it first")]
    Parked(String),
    /// Only a parked instance can be resumed.
    #[error("order saga `{0}` is not parked")]
    NotParked(String),
    /// Placing an order would take a product's stock below zero.
    #[error("product {product_id} has {available} in stock, {requested} requested")]
    OutOfStock {
        product_id: i64,
        requested: i32,
        available: i32,
    },
}

impl SagaError {
    /// Whether trying the same message again may succeed. Database trouble and
    /// contention pass; a rejected input or a malformed message never will.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SagaError::Db(_) | SagaError::Contention(_))
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    #[error("broker error: {0}")]
    Broker(String),
    #[error("broker did not confirm message {0}")]
    NotConfirmed(uuid::Uuid),
    #[error("timed out waiting for the broker to confirm")]
    ConfirmTimeout,
    #[error("the consumer stream ended")]
    StreamEnded,
}

impl From<lapin::Error> for TransportError {
    fn from(value: lapin::Error) -> Self {
        TransportError::Broker(value.to_string())
    }
}
