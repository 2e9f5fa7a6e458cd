//! Reading topics outside a subscription: the error topic for
//! `dead_letters` and `redrive`, and offsets and watermarks for lag.
//!
//! A reader is a short-lived consumer that joins no group: it is assigned
//! partitions explicitly (no group join to wait for), reads the offsets a
//! group committed, and commits for that group itself (`redrive`). Its
//! librdkafka calls block, so each runs on the blocking pool.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedHeaders, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use super::{
    DeadLetter, HEADER_CONTENT_TYPE, HEADER_CORRELATION_ID, HEADER_MESSAGE_ID, HEADER_MESSAGE_TYPE,
    HEADER_ROUTING_KEY, Inner, TracingContext, blocking, broker_error, checked_topic, direct_topic,
    error_topic, group_id, header_text, insert, insert_trace, redrive_group_id, trace_from,
    wait_delivery,
};
use crate::error::TransportError;
use crate::transport::QueueSpec;
use crate::transport::memory::{
    HEADER_ATTEMPTS, HEADER_ERROR_REASON, HEADER_ORIGINAL_QUEUE, HEADER_ORIGINAL_ROUTING_KEY,
};

type Reader = BaseConsumer<TracingContext>;

/// One partition of a topic a group reads: how far the group got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The group's committed offset (the next message it will read), if it
    /// committed one.
    pub committed: Option<i64>,
    /// The oldest offset still in the partition.
    pub low_watermark: i64,
    /// One past the newest message in the partition.
    pub high_watermark: i64,
    /// Messages the group has not committed: from the committed offset (or,
    /// with none, from the oldest message: groups start at the earliest)
    /// to the high watermark.
    pub lag: i64,
}

fn reader(inner: &Inner, group: &str) -> Result<Reader, TransportError> {
    inner
        .settings
        .reader_config(group)
        .create_with_context(TracingContext)
        .map_err(|e| broker_error("cannot create a Kafka reader", e))
}

/// The partitions of `topic` (an error when it does not exist).
fn partitions(reader: &Reader, topic: &str, timeout: Duration) -> Result<Vec<i32>, TransportError> {
    let metadata = reader
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| broker_error(format!("metadata of `{topic}`"), e))?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(TransportError::Broker(format!("no topic `{topic}`")));
    };
    if let Some(e) = found.error() {
        return Err(TransportError::Broker(format!(
            "topic `{topic}`: {:?}",
            rdkafka::types::RDKafkaErrorCode::from(e)
        )));
    }
    let mut ids: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Per partition of the topics: the reader's group's committed offset and
/// the watermarks.
fn lag_of(
    reader: &Reader,
    topics: &[String],
    timeout: Duration,
) -> Result<Vec<PartitionLag>, TransportError> {
    let mut asked = TopicPartitionList::new();
    let mut listed = Vec::new();
    for topic in topics {
        for partition in partitions(reader, topic, timeout)? {
            asked.add_partition(topic, partition);
            listed.push((topic.clone(), partition));
        }
    }
    let committed = reader
        .committed_offsets(asked, timeout)
        .map_err(|e| broker_error("committed offsets", e))?;
    let mut lags = Vec::with_capacity(listed.len());
    for (topic, partition) in listed {
        let (low, high) = reader
            .fetch_watermarks(&topic, partition, timeout)
            .map_err(|e| broker_error(format!("watermarks of {topic}[{partition}]"), e))?;
        let committed =
            committed
                .find_partition(&topic, partition)
                .and_then(|p| match p.offset() {
                    Offset::Offset(n) => Some(n),
                    _ => None,
                });
        lags.push(PartitionLag {
            topic,
            partition,
            committed,
            low_watermark: low,
            high_watermark: high,
            lag: 0,
        });
    }
    verify_ends(reader, &mut lags, timeout)?;
    for lag in &mut lags {
        let from = lag
            .committed
            .unwrap_or(lag.low_watermark)
            .max(lag.low_watermark);
        lag.lag = (lag.high_watermark - from).max(0);
    }
    Ok(lags)
}

/// Corrects reported high watermarks by reading each non-empty partition
/// from its last reported message to its end: Tansu 0.6 answers a
/// `ListOffsets(latest)` with the base offset of the partition's last record
/// batch plus one, short of the real end when that batch holds several
/// records (docs/KAFKA-NOTES.md). On a broker that reports the end right,
/// this reads one message per partition and changes nothing.
fn verify_ends(
    reader: &Reader,
    lags: &mut [PartitionLag],
    timeout: Duration,
) -> Result<(), TransportError> {
    let topics: BTreeSet<String> = lags.iter().map(|l| l.topic.clone()).collect();
    // One topic at a time: an end-of-partition event names the partition
    // but not its topic.
    for topic in topics {
        let mut assigned = TopicPartitionList::new();
        let mut open: BTreeSet<i32> = BTreeSet::new();
        for lag in lags
            .iter()
            .filter(|l| l.topic == topic && l.high_watermark > l.low_watermark)
        {
            assigned
                .add_partition_offset(
                    &topic,
                    lag.partition,
                    Offset::Offset(lag.high_watermark - 1),
                )
                .map_err(|e| broker_error("assign", e))?;
            open.insert(lag.partition);
        }
        if open.is_empty() {
            continue;
        }
        reader
            .assign(&assigned)
            .map_err(|e| broker_error("assign", e))?;
        let deadline = Instant::now() + timeout;
        while !open.is_empty() {
            if Instant::now() >= deadline {
                return Err(TransportError::Broker(format!(
                    "`{topic}`: partitions {open:?} not read to their end within {} ms",
                    timeout.as_millis()
                )));
            }
            match reader.poll(Duration::from_millis(100)) {
                None => {}
                Some(Ok(message)) => {
                    let end = message.offset() + 1;
                    if let Some(lag) = lags
                        .iter_mut()
                        .find(|l| l.topic == topic && l.partition == message.partition())
                    {
                        lag.high_watermark = lag.high_watermark.max(end);
                    }
                }
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    open.remove(&partition);
                }
                Some(Err(e)) => return Err(broker_error(format!("reading `{topic}`"), e)),
            }
        }
    }
    reader.unassign().map_err(|e| broker_error("unassign", e))
}

/// Reads up to `limit` messages of `topic` that `reader`'s group has not
/// committed, up to each partition's end. Messages come in order per
/// partition.
fn read_uncommitted(
    reader: &Reader,
    topic: &str,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<OwnedMessage>, TransportError> {
    let lags = lag_of(reader, &[topic.to_owned()], timeout)?;
    let mut assigned = TopicPartitionList::new();
    // Partition -> end, for partitions with something to read.
    let mut open: BTreeMap<i32, i64> = BTreeMap::new();
    for lag in lags.iter().filter(|l| l.lag > 0) {
        let from = lag
            .committed
            .unwrap_or(lag.low_watermark)
            .max(lag.low_watermark);
        assigned
            .add_partition_offset(topic, lag.partition, Offset::Offset(from))
            .map_err(|e| broker_error("assign", e))?;
        open.insert(lag.partition, lag.high_watermark);
    }
    let mut messages = Vec::new();
    if open.is_empty() || limit == 0 {
        return Ok(messages);
    }
    reader
        .assign(&assigned)
        .map_err(|e| broker_error(format!("assign {topic}"), e))?;
    let deadline = Instant::now() + timeout;
    while messages.len() < limit && !open.is_empty() {
        if Instant::now() >= deadline {
            return Err(TransportError::Broker(format!(
                "reading `{topic}`: partitions {:?} not read to their end within {} ms",
                open.keys().collect::<Vec<_>>(),
                timeout.as_millis()
            )));
        }
        match reader.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(message)) => {
                let partition = message.partition();
                let Some(&end) = open.get(&partition) else {
                    continue;
                };
                if message.offset() >= end {
                    // Dead-lettered since the read started: next time.
                    open.remove(&partition);
                    continue;
                }
                if message.offset() + 1 >= end {
                    open.remove(&partition);
                }
                messages.push(message.detach());
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                open.remove(&partition);
            }
            Some(Err(e)) => return Err(broker_error(format!("reading `{topic}`"), e)),
        }
    }
    Ok(messages)
}

fn dead_letter_of(message: &OwnedMessage) -> DeadLetter {
    let headers = message.headers();
    DeadLetter {
        message_id: header_text(headers, HEADER_MESSAGE_ID),
        message_type: header_text(headers, HEADER_MESSAGE_TYPE),
        reason: header_text(headers, HEADER_ERROR_REASON),
        attempts: header_text(headers, HEADER_ATTEMPTS).and_then(|a| a.parse().ok()),
        original_routing_key: header_text(headers, HEADER_ORIGINAL_ROUTING_KEY),
        original_queue: header_text(headers, HEADER_ORIGINAL_QUEUE),
        body: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
    }
}

/// The headers of a redriven copy: the message's own, without the error
/// headers; its routing key is the one it was dead-lettered with.
fn redriven_headers(message: &OwnedMessage) -> OwnedHeaders {
    let headers = message.headers();
    let mut copy = OwnedHeaders::new_with_capacity(8);
    for name in [
        HEADER_MESSAGE_ID,
        HEADER_MESSAGE_TYPE,
        HEADER_CORRELATION_ID,
    ] {
        if let Some(value) = header_text(headers, name) {
            copy = insert(copy, name, &value);
        }
    }
    if let Some(key) = header_text(headers, HEADER_ORIGINAL_ROUTING_KEY) {
        copy = insert(copy, HEADER_ROUTING_KEY, &key);
    }
    copy = insert(copy, HEADER_CONTENT_TYPE, "application/json");
    insert_trace(copy, trace_from(headers).as_ref())
}

pub(super) async fn dead_letters(
    inner: Arc<Inner>,
    queue: &QueueSpec,
    limit: u32,
) -> Result<Vec<DeadLetter>, TransportError> {
    let topic = checked_topic(error_topic(queue))?;
    let group = redrive_group_id(queue);
    let timeout = inner.settings.operation_timeout;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    blocking("dead letters", move || {
        let reader = reader(&inner, &group)?;
        let messages = read_uncommitted(&reader, &topic, limit, timeout)?;
        Ok(messages.iter().map(dead_letter_of).collect())
    })
    .await
}

pub(super) async fn dead_letter_count(
    inner: Arc<Inner>,
    queue: &QueueSpec,
) -> Result<u64, TransportError> {
    let topic = checked_topic(error_topic(queue))?;
    let group = redrive_group_id(queue);
    let timeout = inner.settings.operation_timeout;
    blocking("dead letter count", move || {
        let reader = reader(&inner, &group)?;
        let lags = lag_of(&reader, &[topic], timeout)?;
        Ok(lags.iter().map(|l| u64::try_from(l.lag).unwrap_or(0)).sum())
    })
    .await
}

pub(super) async fn consumer_lag(
    inner: Arc<Inner>,
    queue: &QueueSpec,
) -> Result<Vec<PartitionLag>, TransportError> {
    let topics = inner.settings.subscribed_topics(queue)?;
    let group = group_id(queue);
    let timeout = inner.settings.operation_timeout;
    blocking("consumer lag", move || {
        let reader = reader(&inner, &group)?;
        lag_of(&reader, &topics, timeout)
    })
    .await
}

pub(super) async fn redrive(
    inner: Arc<Inner>,
    queue: &QueueSpec,
    limit: u32,
) -> Result<Vec<Option<String>>, TransportError> {
    let topic = checked_topic(error_topic(queue))?;
    let target = checked_topic(direct_topic(queue))?;
    let group = redrive_group_id(queue);
    let timeout = inner.settings.operation_timeout;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let read_inner = inner.clone();
    let (reader, letters) = blocking("redrive", move || {
        let reader = reader(&read_inner, &group)?;
        let letters = read_uncommitted(&reader, &topic, limit, timeout)?;
        Ok((reader, letters))
    })
    .await?;
    // Copy each letter in turn; stop at the first that is not delivered.
    let mut moved = Vec::with_capacity(letters.len());
    let mut done: BTreeMap<i32, i64> = BTreeMap::new();
    let mut failure = None;
    for letter in &letters {
        let deadline = tokio::time::Instant::now() + inner.settings.delivery_timeout;
        let mut record = rdkafka::producer::FutureRecord::<[u8], [u8]>::to(&target)
            .payload(letter.payload().unwrap_or_default())
            .headers(redriven_headers(letter));
        if let Some(key) = letter.key() {
            record = record.key(key);
        }
        let producer = inner.producer();
        let sent = producer.send_result(record).map_err(|(e, _)| e);
        let id = header_text(letter.headers(), HEADER_MESSAGE_ID);
        let what = format!("redriven {}", id.as_deref().unwrap_or("(no message id)"));
        match wait_delivery(sent, deadline, &what, &target).await {
            Ok(()) => {
                done.insert(letter.partition(), letter.offset() + 1);
                moved.push(id);
            }
            Err(e) => {
                inner.replace_if_fatal(&producer);
                failure = Some(e);
                break;
            }
        }
    }
    let partitions: BTreeSet<i32> = done.keys().copied().collect();
    let topic = error_topic(queue);
    let committed = blocking("redrive commit", move || {
        let mut result = Ok(());
        if !done.is_empty() {
            let mut offsets = TopicPartitionList::new();
            for (&partition, &next) in &done {
                if let Err(e) =
                    offsets.add_partition_offset(&topic, partition, Offset::Offset(next))
                {
                    result = Err(broker_error("commit", e));
                }
            }
            if result.is_ok() {
                result = reader
                    .commit(&offsets, CommitMode::Sync)
                    .map_err(|e| broker_error(format!("commit redriven offsets of `{topic}`"), e));
            }
        }
        drop(reader);
        result
    })
    .await;
    tracing::info!(
        queue = %queue.name,
        moved = moved.len(),
        partitions = ?partitions,
        "dead letters redriven"
    );
    committed?;
    match failure {
        Some(e) => Err(e),
        None => Ok(moved),
    }
}
