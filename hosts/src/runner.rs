//! The saga runner: consumes `OrderCreated` (saga) and every order event
//! (notifications), fires durable payment timers, and relays the outbox.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use saga::consumer::{Consumer, RetryPolicy};
use saga::engine::OrderSagaEngine;
use saga::notifications::{NotificationHandler, OrderCreatedHandler};
use saga::topology::{self, NOTIFICATIONS_CONSUMER, ORDER_SAGA_CONSUMER};
use saga::transport::Transport;
use tokio_util::sync::CancellationToken;

use crate::infra;
use crate::settings::Settings;

pub fn retry_policy(settings: &Settings) -> RetryPolicy {
    RetryPolicy {
        max_attempts: settings.retry.max_attempts,
        initial_backoff: Duration::from_millis(settings.retry.initial_backoff_ms),
        max_backoff: Duration::from_millis(settings.retry.max_backoff_ms),
    }
}

pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let infra::Worker {
        db,
        transport,
        engine,
        relay,
    } = infra::worker(&settings, "order-saga runner").await?;
    let dyn_transport: Arc<dyn Transport> = transport.clone();
    let prefix = &settings.rabbitmq.queue_prefix;

    let saga_consumer = Consumer::new(
        dyn_transport.clone(),
        topology::saga_queue(prefix),
        ORDER_SAGA_CONSUMER,
        Arc::new(OrderCreatedHandler::new(
            engine.clone(),
            ORDER_SAGA_CONSUMER,
        )),
        retry_policy(&settings),
        settings.rabbitmq.prefetch,
    );
    let notification_consumer = Consumer::new(
        dyn_transport,
        topology::notifications_queue(prefix),
        NOTIFICATIONS_CONSUMER,
        Arc::new(NotificationHandler::new(
            db.clone(),
            engine.clock().clone(),
            NOTIFICATIONS_CONSUMER,
        )),
        retry_policy(&settings),
        settings.rabbitmq.prefetch,
    );
    tracing::info!(
        payment_delay_ms = settings.payment.delay_ms,
        success_rate = settings.payment.success_rate,
        "runner started"
    );

    // If any part stops on its own (the broker connection died), stop the rest
    // and exit non-zero so the supervisor restarts us; nothing is lost: the
    // outbox, the timers and unacked messages are all durable.
    let stop = shutdown.child_token();
    let poll = Duration::from_millis(settings.timers.poll_interval_ms);
    let (saga_result, notification_result, (), ()) = tokio::join!(
        async {
            let r = saga_consumer.run_until_stopped(stop.clone()).await;
            stop.cancel();
            r
        },
        async {
            let r = notification_consumer.run_until_stopped(stop.clone()).await;
            stop.cancel();
            r
        },
        run_timers(&engine, poll, stop.clone()),
        relay.run_until_stopped(stop.clone()),
    );
    transport.close().await;
    saga_result.context("order-saga consumer stopped")?;
    notification_result.context("notifications consumer stopped")?;
    tracing::info!("runner stopped");
    Ok(())
}

/// Fires due timers until none is due, then sleeps until the next one is due
/// (at most `poll` so timers written by other runners are seen).
pub async fn run_timers(engine: &OrderSagaEngine, poll: Duration, shutdown: CancellationToken) {
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let mut failed = false;
        loop {
            match engine.try_fire_due_timer_once().await {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "firing a timer failed");
                    failed = true;
                    break;
                }
            }
        }
        let mut wait = poll;
        if !failed && let Ok(Some(due)) = engine.next_timer_due().await {
            let until = (due - engine.clock().now())
                .to_std()
                .unwrap_or(Duration::ZERO);
            wait = wait.min(until);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
