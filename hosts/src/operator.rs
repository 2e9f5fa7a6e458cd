//! Operator actions on queues, shared by the runner's `redrive` command and
//! the console: error-queue depths, and a re-drive that counts before and
//! after and logs itself in the library's operator-action log
//! (`saga::operator`). Resuming an instance needs nothing here: it is
//! `SagaAdmin::resume_by`.

use std::sync::{Arc, OnceLock};

use anyhow::Context;
use chrono::{DateTime, Utc};
use saga::operator::{ActionKind, NewAction};
use saga::transport::QueueSpec;
use saga::transport::memory::MemoryTransport;
use sea_orm::DatabaseConnection;
use serde::Serialize;

use crate::transport::HostTransport;

/// Where the queues are.
#[derive(Clone)]
pub enum Broker {
    /// No broker (a host that publishes nothing).
    None,
    /// RabbitMQ or Kafka; empty until the host has connected.
    Remote(Arc<OnceLock<HostTransport>>),
    /// The embedded host's in-process transport.
    Memory(MemoryTransport),
}

impl Broker {
    /// A connected transport.
    pub fn connected(transport: HostTransport) -> Self {
        let slot = OnceLock::new();
        let _ = slot.set(transport);
        Broker::Remote(Arc::new(slot))
    }

    fn remote(slot: &OnceLock<HostTransport>) -> anyhow::Result<&HostTransport> {
        slot.get().context("not connected to the broker yet")
    }

    /// Messages waiting in `queue` (RabbitMQ: ready; Kafka: not committed
    /// by its consumer group).
    pub async fn depth(&self, queue: &QueueSpec) -> anyhow::Result<u64> {
        match self {
            Broker::None => anyhow::bail!("this host has no broker"),
            Broker::Remote(slot) => Self::remote(slot)?.depth(queue).await,
            Broker::Memory(memory) => Ok(memory.ready_count(&queue.name) as u64),
        }
    }

    /// Dead letters in `queue`'s error queue (Kafka: not yet redriven).
    pub async fn error_depth(&self, queue: &QueueSpec) -> anyhow::Result<u64> {
        match self {
            Broker::None => anyhow::bail!("this host has no broker"),
            Broker::Remote(slot) => Self::remote(slot)?.error_depth(queue).await,
            Broker::Memory(memory) => Ok(memory.ready_count(&queue.error_queue()) as u64),
        }
    }

    async fn move_back(
        &self,
        queue: &QueueSpec,
        limit: u32,
    ) -> anyhow::Result<Vec<Option<String>>> {
        match self {
            Broker::None => anyhow::bail!("this host has no broker"),
            Broker::Remote(slot) => Self::remote(slot)?.redrive(queue, limit).await,
            Broker::Memory(memory) => Ok(memory.redrive(queue, limit)?),
        }
    }
}

/// Messages ready in a queue and in its error queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QueueCounts {
    pub queue: u64,
    pub error_queue: u64,
}

/// What a re-drive did (also the `detail` of its operator-action row).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RedriveReport {
    /// The operator-action log row.
    pub action_id: i64,
    pub consumer: String,
    pub queue: String,
    pub error_queue: String,
    pub before: QueueCounts,
    /// Right after the move (a consumer may already have taken some).
    pub after: QueueCounts,
    pub moved: usize,
    pub limit: u32,
    /// Per-message retry budgets deleted (messages without a saga instance).
    pub budgets_reset: u64,
}

async fn counts(broker: &Broker, queue: &QueueSpec) -> anyhow::Result<QueueCounts> {
    Ok(QueueCounts {
        queue: broker.depth(queue).await?,
        error_queue: broker.error_depth(queue).await?,
    })
}

/// Moves up to `limit` dead letters of `consumer`'s error queue back to its
/// queue, resets their per-message retry budgets, and logs the action with
/// the counts before and after under `operator`.
pub async fn redrive(
    db: &DatabaseConnection,
    broker: &Broker,
    consumer: &str,
    queue: &QueueSpec,
    limit: u32,
    operator: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<RedriveReport> {
    let before = counts(broker, queue).await?;
    let moved = broker.move_back(queue, limit).await?;
    let after = counts(broker, queue).await?;
    // Messages without a saga instance keep their budget per message: a
    // re-driven one starts afresh. (A saga's budget is reset by resume,
    // which should come first.)
    let ids: Vec<uuid::Uuid> = moved
        .iter()
        .flatten()
        .filter_map(|id| id.parse().ok())
        .collect();
    let budgets_reset = saga::failures::forget(db, consumer, &ids).await?;
    let mut report = RedriveReport {
        action_id: 0,
        consumer: consumer.to_owned(),
        queue: queue.name.clone(),
        error_queue: queue.error_queue(),
        before,
        after,
        moved: moved.len(),
        limit,
        budgets_reset,
    };
    let mut detail = serde_json::to_value(&report).context("redrive report")?;
    if let Some(map) = detail.as_object_mut() {
        map.remove("action_id");
        map.insert("message_ids".into(), serde_json::json!(moved));
    }
    report.action_id = saga::operator::record(
        db,
        NewAction {
            kind: ActionKind::Redrive,
            saga_type: None,
            correlation_id: None,
            queue: Some(&queue.name),
            operator,
            detail: Some(detail),
        },
        now,
    )
    .await
    .context("Failed to log the re-drive")?;
    tracing::info!(
        operator,
        moved = report.moved,
        budgets_reset,
        from = %report.error_queue,
        to = %report.queue,
        error_queue_before = before.error_queue,
        error_queue_after = after.error_queue,
        "re-drove dead letters"
    );
    Ok(report)
}

/// How operator commands of the runner name their operator: the OS user
/// (`$USER`, else `$LOGNAME`) with `(cli)`, or just `cli`.
pub fn cli_operator() -> String {
    ["USER", "LOGNAME"]
        .into_iter()
        .filter_map(|k| std::env::var(k).ok())
        .map(|u| u.trim().to_owned())
        .find(|u| !u.is_empty())
        .map_or_else(|| "cli".to_owned(), |u| format!("{u} (cli)"))
}
