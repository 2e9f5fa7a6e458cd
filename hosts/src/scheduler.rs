//! The scheduler: every `expiration.sweep_interval_seconds`, expires orders
//! that have been `processing` for longer than the timeout, through the same
//! state machine, and relays the resulting `OrderExpired` events.

use std::time::Duration;

use saga::engine::OrderSagaEngine;
use tokio_util::sync::CancellationToken;

use crate::infra;
use crate::settings::Settings;

pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let infra::Worker {
        transport,
        engine,
        relay,
        ..
    } = infra::worker(&settings, "order-saga scheduler").await?;
    let interval = Duration::from_secs(settings.expiration.sweep_interval_seconds);
    tracing::info!(
        sweep_interval_seconds = settings.expiration.sweep_interval_seconds,
        processing_timeout_seconds = settings.expiration.processing_timeout_seconds,
        "scheduler started"
    );
    let work = async {
        tokio::join!(
            run_sweeps(&engine, interval, shutdown.clone()),
            relay.run_until_stopped(shutdown.clone()),
        )
    };
    let grace = Duration::from_secs(settings.shutdown.grace_seconds);
    infra::finish_within(work, &shutdown, grace).await;
    transport.close().await;
    tracing::info!("scheduler stopped");
    Ok(())
}

pub async fn run_sweeps(engine: &OrderSagaEngine, interval: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match engine.expire_all_stale().await {
            Ok(outcome) if outcome.expired > 0 => {
                tracing::info!(
                    expired = outcome.expired,
                    "expiration sweep expired stale orders"
                )
            }
            Ok(_) => tracing::debug!("expiration sweep found nothing stale"),
            Err(e) => tracing::error!(error = %e, "expiration sweep failed"),
        }
    }
}
