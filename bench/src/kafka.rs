//! The Kafka rows: the broker limit (the Kafka transport alone) and end to
//! end with every host on Kafka (`transport.kind = kafka`). The broker is
//! `KAFKA_BOOTSTRAP` (default 127.0.0.1:19092, `scripts/kafka-broker.sh
//! start`); when none answers, both rows are skipped with a note. Each run
//! creates topics under a prefix of its own and deletes them afterwards.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use indicatif::ProgressBar;
use saga::transport::kafka::{KafkaSettings, KafkaTopology, KafkaTransport};
use saga::transport::{OutgoingMessage, QueueSpec, Transport};

use crate::baselines::Throughput;
use crate::stats::rate;

/// Session timeout and max poll interval of the bench's consumers (a group
/// join takes about half of it on the test broker).
const GROUP_TIMEOUT: Duration = Duration::from_secs(3);

/// `KAFKA_BOOTSTRAP`, default `127.0.0.1:19092`.
pub fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:19092".to_owned())
}

/// Topics of one run: a fresh prefix, created at once.
pub struct Topics {
    pub prefix: String,
    pub transport: KafkaTransport,
    pub topology: KafkaTopology,
}

impl Topics {
    /// Connects (an error when no broker answers within 5 s) and creates
    /// the topics of `queues(prefix)`.
    pub async fn create(queues: impl Fn(&str) -> Vec<QueueSpec>) -> anyhow::Result<Self> {
        let prefix = format!("bench{}", uuid::Uuid::new_v4().simple());
        let settings = KafkaSettings {
            bootstrap_servers: bootstrap(),
            topic_prefix: prefix.clone(),
            partitions: 3,
            session_timeout: GROUP_TIMEOUT,
            max_poll_interval: GROUP_TIMEOUT,
            delivery_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(5),
            client_id: format!("{prefix}-bench"),
            ..KafkaSettings::default()
        };
        let transport = KafkaTransport::connect(settings.clone())
            .await
            .with_context(|| format!("no Kafka broker answers at {}", bootstrap()))?;
        let topology = KafkaTopology::new(queues(&prefix), &settings);
        transport
            .declare(&topology)
            .await
            .context("Failed to create the Kafka topics")?;
        Ok(Self {
            prefix,
            transport,
            topology,
        })
    }

    /// The hosts' variables for these topics.
    pub fn host_env(&self) -> Vec<(&'static str, String)> {
        host_env(&self.prefix)
    }

    /// Deletes the topics and groups (stop the hosts first).
    pub async fn delete(self) {
        if let Err(e) = self.transport.delete(&self.topology).await {
            tracing::warn!(error = %e, "bench Kafka topics not deleted");
        }
        self.transport.close().await;
    }
}

/// `transport.kind = kafka` on `prefix`'s topics, with the bench's short
/// group timeouts.
pub fn host_env(prefix: &str) -> Vec<(&'static str, String)> {
    vec![
        ("APP__TRANSPORT__KIND", "kafka".to_owned()),
        ("APP__KAFKA__BOOTSTRAP_SERVERS", bootstrap()),
        ("APP__KAFKA__TOPIC_PREFIX", prefix.to_owned()),
        (
            "APP__KAFKA__SESSION_TIMEOUT_MS",
            GROUP_TIMEOUT.as_millis().to_string(),
        ),
        (
            "APP__KAFKA__MAX_POLL_INTERVAL_MS",
            GROUP_TIMEOUT.as_millis().to_string(),
        ),
    ]
}

/// Why the Kafka rows are skipped, if they are: `None` when a broker
/// answers at [`bootstrap`].
pub async fn unavailable() -> Option<String> {
    let settings = KafkaSettings {
        bootstrap_servers: bootstrap(),
        operation_timeout: Duration::from_secs(5),
        ..KafkaSettings::default()
    };
    match KafkaTransport::connect(settings).await {
        Ok(transport) => {
            transport.close().await;
            None
        }
        Err(e) => Some(format!(
            "Kafka rows skipped: no broker answers at {} ({e}); start one with \
             `scripts/kafka-broker.sh start` or set KAFKA_BOOTSTRAP",
            bootstrap()
        )),
    }
}

/// The broker limit on Kafka: `count` messages of the size of an
/// `OrderCreated` published through the transport (idempotent producer,
/// `acks=all`, up to `window` awaiting their delivery reports) while one
/// subscription takes them at `prefetch` and acknowledges each (an offset
/// commit). The member joins its group before the clock starts. Returns
/// (publish to last ack, publish side alone).
pub async fn broker_limit(
    count: usize,
    prefetch: u16,
    window: usize,
    progress: &ProgressBar,
) -> anyhow::Result<(Throughput, Throughput)> {
    let key = "bench.message";
    let topics = Topics::create(|prefix| {
        vec![QueueSpec {
            name: format!("{prefix}.broker"),
            routing_keys: vec![key.to_owned()],
        }]
    })
    .await?;
    let result = measure(&topics, key, count, prefetch, window, progress).await;
    topics.delete().await;
    result
}

async fn measure(
    topics: &Topics,
    key: &str,
    count: usize,
    prefetch: u16,
    window: usize,
    progress: &ProgressBar,
) -> anyhow::Result<(Throughput, Throughput)> {
    let queue = &topics.topology.queues[0];
    let tag = format!("{}-consumer", topics.prefix);
    let mut stream = topics.transport.subscribe(queue, &tag, prefetch).await?;
    let registry = topics
        .transport
        .consumer_status()
        .context("the Kafka transport has a consumer registry")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !registry
        .snapshot(&tag, Instant::now())
        .is_some_and(|s| s.registered)
    {
        if Instant::now() >= deadline {
            bail!("the bench consumer did not join its group within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let payload = vec![b'x'; 420];
    let started = Instant::now();
    let publish = async {
        let mut sent = 0;
        while sent < count {
            let batch: Vec<OutgoingMessage> = (sent..count.min(sent + window))
                .map(|i| OutgoingMessage {
                    message_id: uuid::Uuid::new_v4(),
                    message_type: "OrderCreated".to_owned(),
                    correlation_id: i.to_string(),
                    routing_key: key.to_owned(),
                    body: payload.clone(),
                    trace: None,
                })
                .collect();
            let results = topics.transport.publish(&batch).await?;
            if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                bail!("a message was not delivered: {e}");
            }
            sent += batch.len();
        }
        Ok::<_, anyhow::Error>(started.elapsed())
    };
    let consume = async {
        for _ in 0..count {
            let delivery = tokio::time::timeout(Duration::from_secs(60), stream.next())
                .await
                .context("no delivery for 60 s")?
                .context("the subscription ended")??;
            delivery.acker.ack().await?;
            progress.inc(1);
        }
        Ok::<_, anyhow::Error>(())
    };
    let (published, ()) = tokio::try_join!(publish, consume)?;
    let elapsed = started.elapsed();
    drop(stream);
    Ok((
        Throughput {
            count,
            seconds: elapsed.as_secs_f64(),
            per_second: rate(count, elapsed),
            latency: None,
        },
        Throughput {
            count,
            seconds: published.as_secs_f64(),
            per_second: rate(count, published),
            latency: None,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_are_put_on_kafka_with_the_runs_own_topics_and_short_group_timeouts() {
        let env = host_env("bench123");
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("APP__TRANSPORT__KIND").as_deref(), Some("kafka"));
        assert_eq!(get("APP__KAFKA__TOPIC_PREFIX").as_deref(), Some("bench123"));
        assert_eq!(
            get("APP__KAFKA__SESSION_TIMEOUT_MS"),
            get("APP__KAFKA__MAX_POLL_INTERVAL_MS")
        );
        assert_eq!(
            get("APP__KAFKA__SESSION_TIMEOUT_MS").as_deref(),
            Some("3000")
        );
        assert!(get("APP__KAFKA__BOOTSTRAP_SERVERS").is_some());
    }
}
