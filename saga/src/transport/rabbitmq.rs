//! RabbitMQ transport (lapin): one durable topic exchange, a durable queue per
//! consumer with its own `.error` queue, persistent messages, publisher
//! confirms with `mandatory`, manual acks and bounded prefetch.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use futures_util::stream::{BoxStream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use super::{Acknowledger, Delivery, OutgoingMessage, QueueSpec, Transport};
use crate::error::TransportError;

/// Queue type to declare: classic for one node, quorum for a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
}

impl QueueType {
    fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// The queues and exchange a host uses.
#[derive(Clone, Debug)]
pub struct Topology {
    pub exchange: String,
    pub queue_type: QueueType,
    pub queues: Vec<QueueSpec>,
}

pub struct RabbitTransport {
    connection: Connection,
    publisher: Channel,
    exchange: String,
    confirm_timeout: Duration,
}

impl RabbitTransport {
    /// Connects and opens a publishing channel with confirms enabled.
    pub async fn connect(
        url: &str,
        exchange: &str,
        confirm_timeout: Duration,
        connection_name: &str,
    ) -> Result<Self, TransportError> {
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(connection_name.to_owned()));
        let connection = Connection::connect(url, properties).await?;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            connection,
            publisher,
            exchange: exchange.to_owned(),
            confirm_timeout,
        })
    }

    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// Declares the exchange, every queue, its error queue and its bindings.
    /// Idempotent: safe on every start.
    pub async fn declare(&self, topology: &Topology) -> Result<(), TransportError> {
        let channel = self.connection.create_channel().await?;
        // Durable: the exchange outlives broker restarts.
        channel
            .exchange_declare(
                ShortString::from(topology.exchange.clone()),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        for queue in &topology.queues {
            for name in [queue.name.clone(), queue.error_queue()] {
                let mut arguments = FieldTable::default();
                arguments.insert(
                    ShortString::from("x-queue-type"),
                    AMQPValue::LongString(LongString::from(topology.queue_type.as_str())),
                );
                // Durable, shared by competing consumers, never auto-deleted:
                // messages survive restarts and consumers coming and going.
                channel
                    .queue_declare(
                        ShortString::from(name),
                        QueueDeclareOptions {
                            durable: true,
                            exclusive: false,
                            auto_delete: false,
                            ..QueueDeclareOptions::default()
                        },
                        arguments,
                    )
                    .await?;
            }
            for key in &queue.routing_keys {
                channel
                    .queue_bind(
                        ShortString::from(queue.name.clone()),
                        ShortString::from(topology.exchange.clone()),
                        ShortString::from(key.clone()),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        let _ = channel.close(200, ShortString::from("declared")).await;
        Ok(())
    }

    /// Deletes the topology (tests clean up after themselves with this).
    pub async fn delete(&self, topology: &Topology) -> Result<(), TransportError> {
        let channel = self.connection.create_channel().await?;
        for queue in &topology.queues {
            for name in [queue.name.clone(), queue.error_queue()] {
                channel
                    .queue_delete(ShortString::from(name), QueueDeleteOptions::default())
                    .await?;
            }
        }
        channel
            .exchange_delete(
                ShortString::from(topology.exchange.clone()),
                ExchangeDeleteOptions::default(),
            )
            .await?;
        let _ = channel.close(200, ShortString::from("deleted")).await;
        Ok(())
    }

    /// Publishes raw bytes to a queue through the default exchange (tests use
    /// this to inject malformed or duplicated messages).
    pub async fn publish_to_queue(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), TransportError> {
        let confirm = self
            .publisher
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue.to_owned()),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties.with_delivery_mode(2),
            )
            .await?;
        match tokio::time::timeout(self.confirm_timeout, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(_)) => Err(TransportError::Broker(format!("{queue}: not routed"))),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(TransportError::ConfirmTimeout),
        }
    }

    /// Number of messages ready in a queue (declares it passively).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, TransportError> {
        let channel = self.connection.create_channel().await?;
        let q = channel
            .queue_declare(
                ShortString::from(queue.to_owned()),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = channel.close(200, ShortString::from("depth")).await;
        Ok(q.message_count())
    }

    pub async fn close(&self) {
        let _ = self.connection.close(200, ShortString::from("bye")).await;
    }
}

fn properties_for(message: &OutgoingMessage) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(ShortString::from(message.message_id.to_string()))
        .with_type(ShortString::from(message.message_type.clone()))
        .with_correlation_id(ShortString::from(message.correlation_id.clone()))
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2)
}

#[async_trait]
impl Transport for RabbitTransport {
    async fn publish(
        &self,
        messages: &[OutgoingMessage],
    ) -> Result<Vec<Result<(), TransportError>>, TransportError> {
        let mut confirms = Vec::with_capacity(messages.len());
        for message in messages {
            let confirm = self
                .publisher
                .basic_publish(
                    ShortString::from(self.exchange.clone()),
                    ShortString::from(message.routing_key.clone()),
                    // mandatory: an unroutable message comes back instead of
                    // being confirmed and silently dropped.
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &message.body,
                    properties_for(message),
                )
                .await?;
            confirms.push(confirm);
        }
        let waited = tokio::time::timeout(self.confirm_timeout, join_all(confirms)).await;
        let Ok(results) = waited else {
            return Err(TransportError::ConfirmTimeout);
        };
        Ok(messages
            .iter()
            .zip(results)
            .map(|(message, result)| match result {
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Ack(Some(_))) => Err(TransportError::Broker(format!(
                    "message {} to `{}` was not routed to any queue",
                    message.message_id, message.routing_key
                ))),
                Ok(_) => Err(TransportError::NotConfirmed(message.message_id)),
                Err(e) => Err(e.into()),
            })
            .collect())
    }

    async fn subscribe(
        &self,
        queue: &QueueSpec,
        consumer_tag: &str,
        prefetch: u16,
    ) -> Result<BoxStream<'static, Result<Delivery, TransportError>>, TransportError> {
        let channel = self.connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                ShortString::from(queue.name.clone()),
                ShortString::from(consumer_tag.to_owned()),
                // Manual acks: a message is only gone once handled.
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(consumer
            .map(|item| {
                item.map(|d| Delivery {
                    message_id: d.properties.message_id().as_ref().map(|s| s.to_string()),
                    message_type: d.properties.kind().as_ref().map(|s| s.to_string()),
                    routing_key: d.routing_key.to_string(),
                    redelivered: d.redelivered,
                    body: d.data,
                    acker: Box::new(RabbitAcker(d.acker)),
                })
                .map_err(TransportError::from)
            })
            .boxed())
    }

    async fn dead_letter(
        &self,
        queue: &QueueSpec,
        delivery: &Delivery,
        reason: &str,
        attempts: u32,
    ) -> Result<(), TransportError> {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("x-error-reason"),
            AMQPValue::LongString(LongString::from(reason.to_owned())),
        );
        headers.insert(
            ShortString::from("x-attempts"),
            AMQPValue::LongUInt(attempts),
        );
        headers.insert(
            ShortString::from("x-original-routing-key"),
            AMQPValue::LongString(LongString::from(delivery.routing_key.clone())),
        );
        headers.insert(
            ShortString::from("x-original-queue"),
            AMQPValue::LongString(LongString::from(queue.name.clone())),
        );
        let mut properties = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_headers(headers);
        if let Some(id) = &delivery.message_id {
            properties = properties.with_message_id(ShortString::from(id.clone()));
        }
        if let Some(kind) = &delivery.message_type {
            properties = properties.with_type(ShortString::from(kind.clone()));
        }
        self.publish_to_queue(&queue.error_queue(), &delivery.body, properties)
            .await
    }
}

struct RabbitAcker(lapin::Acker);

#[async_trait]
impl Acknowledger for RabbitAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        // After a connection recovery an ack on the old channel returns
        // Ok(false): the broker will redeliver, and the inbox skips it.
        if !self.0.ack(BasicAckOptions::default()).await? {
            return Err(TransportError::Broker(
                "ack not delivered: channel was closed".to_owned(),
            ));
        }
        Ok(())
    }

    async fn requeue(&self) -> Result<(), TransportError> {
        self.0
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await?;
        Ok(())
    }
}
