//! Errors of the saga engine, classified as retryable or terminal.

use sea_orm::DbErr;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
/// Why the engine could not apply an input or a handler failed.
pub enum SagaError {
    #[error("database error: {0}")]
    /// The database failed (unreachable, a statement error): retryable.
    Db(#[from] DbErr),
    #[error("no {saga_type} saga instance with correlation id `{correlation_id}`")]
    /// No saga instance of this type has this correlation id.
    UnknownInstance {
        /// The saga type looked up.
        saga_type: &'static str,
        /// The id that was not found.
        correlation_id: String,
    },
    #[error("{input} rejected in state {state}: {reason}")]
    /// The transition table faults this input in this state.
    Rejected {
        /// The state the instance was in.
        state: String,
        /// The input's name.
        input: String,
        /// Why the table rejects it.
        reason: &'static str,
    },
    #[error("instance `{0}` kept changing under us (optimistic concurrency conflicts)")]
    /// The instance kept changing under the engine (optimistic concurrency): retryable.
    Contention(String),
    #[error("corrupt saga data: {0}")]
    /// Stored data could not be read (a bug or a manual edit).
    Corrupt(String),
    #[error("malformed message: {0}")]
    /// A message this consumer cannot use (wrong type, unreadable payload).
    Malformed(String),
    /// The instance is parked (its retry budget is spent): nothing is
    /// applied to it until an operator resumes it.
    #[error("{saga_type} saga `{correlation_id}` is parked; resume it first")]
    Parked {
        /// The saga type.
        saga_type: &'static str,
        /// The instance.
        correlation_id: String,
    },
    /// Only a parked instance can be resumed.
    #[error("{saga_type} saga `{correlation_id}` is not parked")]
    NotParked {
        /// The saga type.
        saga_type: &'static str,
        /// The instance.
        correlation_id: String,
    },
    /// A saga's hook failed in a way trying again may fix (a service it
    /// calls is down): retryable.
    #[error("{0}")]
    Transient(String),
    /// A saga's hook failed for good (a domain rule, a missing row).
    #[error("{0}")]
    Effect(String),
}

impl SagaError {
    /// Whether trying the same message again may succeed. Database trouble,
    /// contention and transient hook failures pass; a rejected input or a
    /// malformed message never will.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SagaError::Db(_) | SagaError::Contention(_) | SagaError::Transient(_)
        )
    }

    /// Whether the database refused a row because its unique key exists.
    pub fn is_unique_violation(&self) -> bool {
        matches!(
            self,
            SagaError::Db(e) if matches!(e.sql_err(), Some(sea_orm::SqlErr::UniqueConstraintViolation(_)))
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
/// Why the broker could not take or give a message.
pub enum TransportError {
    #[error("broker error: {0}")]
    /// The broker or the connection failed.
    Broker(String),
    #[error("broker did not confirm message {0}")]
    /// The broker refused (nacked) a published message.
    NotConfirmed(uuid::Uuid),
    #[error("timed out waiting for the broker to confirm")]
    /// The broker did not confirm in time.
    ConfirmTimeout,
    #[error("the consumer stream ended")]
    /// A subscription ended (the transport was closed).
    StreamEnded,
}

impl From<lapin::Error> for TransportError {
    fn from(value: lapin::Error) -> Self {
        TransportError::Broker(value.to_string())
    }
}
