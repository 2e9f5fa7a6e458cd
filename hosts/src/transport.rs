//! The broker of the separate hosts, chosen once at start by
//! `transport.kind`: RabbitMQ (`rabbitmq.*`) or Kafka (`kafka.*`).
//!
//! [`HostTransport`] is what the api, the runner and the scheduler hold:
//! it connects with retries and declares the topology (exchange and queues,
//! or topics), and supplies the relay and the consumers (as a
//! [`Transport`]), the `broker` readiness check, queue depths for the
//! console, redrive, and (Kafka) consumer lag for `/metrics`. The embedded
//! host does not use it: it stays in-process whatever `transport.kind` says.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use orders::topology as order_topology;
use saga::transport::kafka::{KafkaTopology, KafkaTransport, PartitionLag};
use saga::transport::rabbitmq::{QueueType, RabbitTransport, ReconnectPolicy, Topology};
use saga::transport::status::ConsumerRegistry;
use saga::transport::{QueueSpec, Transport};

use crate::settings::{QueueTypeSetting, Settings, TransportKind};

/// Gauge: per consumer, topic and partition, messages the consumer's group
/// has not committed (Kafka only; read from the broker at each scrape).
pub const KAFKA_CONSUMER_LAG: &str = "saga_kafka_consumer_lag";
/// Counter: scrapes whose Kafka lag read failed (the gauges then keep their
/// last values).
pub const KAFKA_LAG_ERRORS: &str = "saga_kafka_consumer_lag_errors_total";

/// The broker of a separate host. Cheap to clone.
#[derive(Clone)]
pub enum HostTransport {
    RabbitMq(Arc<RabbitTransport>),
    Kafka(Arc<KafkaTransport>),
}

impl std::fmt::Debug for HostTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::RabbitMq(_) => f.write_str("HostTransport::RabbitMq"),
            Self::Kafka(t) => f.debug_tuple("HostTransport::Kafka").field(t).finish(),
        }
    }
}

/// The RabbitMQ topology of these settings.
pub fn rabbit_topology(settings: &Settings) -> Topology {
    let queue_type = match settings.rabbitmq.queue_type {
        QueueTypeSetting::Classic => QueueType::Classic,
        QueueTypeSetting::Quorum => QueueType::Quorum,
    };
    order_topology::topology(
        &settings.rabbitmq.exchange,
        &settings.rabbitmq.queue_prefix,
        queue_type,
    )
}

/// The Kafka topics of these settings: the order saga's queues under
/// `kafka.topic_prefix`.
pub fn kafka_topology(settings: &Settings) -> KafkaTopology {
    KafkaTopology::new(
        order_topology::queues(&settings.kafka.topic_prefix),
        &settings.kafka.transport_settings(),
    )
}

/// Retries `attempt` with a doubling delay (200 ms up to 5 s) until it
/// succeeds or `within` has passed.
async fn with_retries<T, E, F, Fut>(
    what: &str,
    key: &str,
    within: Duration,
    mut attempt: F,
) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + within;
    let mut delay = Duration::from_millis(200);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "{what} not reachable yet; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                return Err(e).context(format!(
                    "Failed to connect to {what} at {key} (after {} s)",
                    within.as_secs()
                ));
            }
        }
    }
}

impl HostTransport {
    /// Connects to the configured broker, retrying for its
    /// `connect_retry_seconds`, and declares the order saga's topology
    /// (idempotent). `name` names the connection (RabbitMQ) or is logged.
    pub async fn connect(settings: &Settings, name: &str) -> anyhow::Result<Self> {
        match settings.transport.kind {
            TransportKind::Rabbitmq => {
                let r = &settings.rabbitmq;
                let transport = with_retries(
                    "RabbitMQ",
                    "rabbitmq.url",
                    Duration::from_secs(r.connect_retry_seconds),
                    || {
                        RabbitTransport::connect(
                            &r.url,
                            &r.exchange,
                            Duration::from_millis(r.confirm_timeout_ms),
                            name,
                        )
                    },
                )
                .await?
                .with_reconnect_policy(ReconnectPolicy {
                    initial: Duration::from_millis(r.reconnect_initial_backoff_ms),
                    max: Duration::from_millis(r.reconnect_max_backoff_ms),
                });
                transport
                    .declare(&rabbit_topology(settings))
                    .await
                    .context("Failed to declare the RabbitMQ topology")?;
                Ok(Self::RabbitMq(Arc::new(transport)))
            }
            TransportKind::Kafka => {
                let k = &settings.kafka;
                let transport = with_retries(
                    "Kafka",
                    "kafka.bootstrap_servers",
                    Duration::from_secs(k.connect_retry_seconds),
                    || KafkaTransport::connect(k.transport_settings()),
                )
                .await?;
                let topology = kafka_topology(settings);
                // A broker that just started may not take topics yet.
                with_retries(
                    "Kafka (creating topics)",
                    "kafka.bootstrap_servers",
                    Duration::from_secs(k.connect_retry_seconds),
                    || transport.declare(&topology),
                )
                .await
                .context("Failed to create the Kafka topics")?;
                tracing::info!(
                    client = name,
                    bootstrap_servers = %k.bootstrap_servers,
                    topic_prefix = %k.topic_prefix,
                    "connected to Kafka; topics declared"
                );
                Ok(Self::Kafka(Arc::new(transport)))
            }
        }
    }

    /// `rabbitmq` or `kafka`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RabbitMq(_) => "rabbitmq",
            Self::Kafka(_) => "kafka",
        }
    }

    /// The transport for the relay and the consumers.
    pub fn as_dyn(&self) -> Arc<dyn Transport> {
        match self {
            Self::RabbitMq(t) => t.clone(),
            Self::Kafka(t) => t.clone(),
        }
    }

    /// Where the consumers' registration state is, for readiness.
    pub fn consumer_status(&self) -> Option<ConsumerRegistry> {
        match self {
            Self::RabbitMq(t) => t.consumer_status(),
            Self::Kafka(t) => t.consumer_status(),
        }
    }

    /// The `broker` readiness check: `Ok(detail)` when the broker answers now.
    pub async fn check(&self) -> Result<String, String> {
        match self {
            Self::RabbitMq(t) => match t.ensure_connected().await {
                Ok(()) => Ok(format!("connected ({} reconnects)", t.reconnects())),
                Err(e) => Err(format!("not connected: {e}")),
            },
            Self::Kafka(t) => match t.ensure_connected().await {
                Ok(()) => Ok("connected to Kafka (a broker answers)".to_owned()),
                Err(e) => Err(format!("not connected: {e}")),
            },
        }
    }

    /// Messages waiting for `queue`'s consumers: ready in the RabbitMQ
    /// queue, or not yet committed by the Kafka group.
    pub async fn depth(&self, queue: &QueueSpec) -> anyhow::Result<u64> {
        Ok(match self {
            Self::RabbitMq(t) => u64::from(t.queue_depth(&queue.name).await?),
            Self::Kafka(t) => t.queue_depth(queue).await?,
        })
    }

    /// Dead letters of `queue` not yet redriven.
    pub async fn error_depth(&self, queue: &QueueSpec) -> anyhow::Result<u64> {
        Ok(match self {
            Self::RabbitMq(t) => u64::from(t.queue_depth(&queue.error_queue()).await?),
            Self::Kafka(t) => t.dead_letter_count(queue).await?,
        })
    }

    /// Moves up to `limit` dead letters of `queue` back to it; the message
    /// id of each one moved.
    pub async fn redrive(
        &self,
        queue: &QueueSpec,
        limit: u32,
    ) -> anyhow::Result<Vec<Option<String>>> {
        Ok(match self {
            Self::RabbitMq(t) => t.redrive(queue, limit).await?,
            Self::Kafka(t) => t.redrive(queue, limit).await?,
        })
    }

    /// Kafka: per partition of every topic `queue`'s group reads, its lag.
    /// `None` on RabbitMQ.
    pub async fn kafka_lag(&self, queue: &QueueSpec) -> Option<anyhow::Result<Vec<PartitionLag>>> {
        match self {
            Self::RabbitMq(_) => None,
            Self::Kafka(t) => Some(t.consumer_lag(queue).await.map_err(Into::into)),
        }
    }

    /// Stops consuming and closes the connection (Kafka: the members leave
    /// their groups and what is still being produced is flushed).
    pub async fn close(&self) {
        match self {
            Self::RabbitMq(t) => t.close().await,
            Self::Kafka(t) => t.close().await,
        }
    }
}

/// Refreshes [`KAFKA_CONSUMER_LAG`] for `queues` (consumer name, queue);
/// a failed read counts in [`KAFKA_LAG_ERRORS`]. Nothing on RabbitMQ.
pub async fn record_kafka_lag(transport: &HostTransport, queues: &[(String, QueueSpec)]) {
    for (consumer, queue) in queues {
        match transport.kafka_lag(queue).await {
            None => return,
            Some(Ok(partitions)) => {
                for p in partitions {
                    metrics::gauge!(
                        KAFKA_CONSUMER_LAG,
                        "consumer" => consumer.clone(),
                        "topic" => p.topic,
                        "partition" => p.partition.to_string()
                    )
                    .set(p.lag as f64);
                }
            }
            Some(Err(e)) => {
                metrics::counter!(KAFKA_LAG_ERRORS, "consumer" => consumer.clone()).increment(1);
                tracing::warn!(consumer = %consumer, error = %format!("{e:#}"), "metrics: could not read the Kafka consumer lag");
            }
        }
    }
}

/// Help texts of the Kafka metrics (call once after installing a recorder).
pub fn describe_metrics() {
    metrics::describe_gauge!(
        KAFKA_CONSUMER_LAG,
        "Kafka: messages a consumer's group has not committed, per topic and partition (read at scrape)"
    );
    metrics::describe_counter!(
        KAFKA_LAG_ERRORS,
        "Kafka: scrapes whose consumer-lag read failed (the gauges keep their last values)"
    );
}
