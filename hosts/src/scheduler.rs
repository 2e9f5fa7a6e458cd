//! The scheduler: every `expiration.sweep_interval_seconds`, expires orders
//! that have been `processing` for longer than the timeout, through the same
//! state machine, and relays the resulting `OrderExpired` events.

use std::sync::Arc;
use std::time::Duration;

use saga::engine::OrderSagaEngine;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;
use crate::{infra, ops};

pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    crate::metrics::handle();
    let infra::Worker {
        db,
        transport,
        engine,
        relay,
    } = infra::worker(&settings, "order-saga scheduler").await?;
    let stop = shutdown.child_token();
    let monitor = Arc::new(
        ops::Monitor::new(db, engine.clock().clone(), &settings)
            .with_broker(ops::Broker::rabbit(transport.clone()))
            .with_shutdown(stop.clone()),
    );
    let listener = ops::bind(
        &settings.monitoring.scheduler_listen,
        "monitoring.scheduler_listen",
    )
    .await?;
    let loops = monitor.loops().clone();
    let interval = Duration::from_secs(settings.expiration.sweep_interval_seconds);
    tracing::info!(
        sweep_interval_seconds = settings.expiration.sweep_interval_seconds,
        processing_timeout_seconds = settings.expiration.processing_timeout_seconds,
        "scheduler started"
    );
    let work = async {
        tokio::join!(
            loops.run(
                "expiration sweeps",
                run_sweeps(&engine, interval, stop.clone())
            ),
            loops.run("outbox relay", relay.run_until_stopped(stop.clone())),
            async {
                let r = ops::serve(listener, monitor.clone(), stop.clone()).await;
                stop.cancel();
                r
            },
        )
    };
    let grace = Duration::from_secs(settings.shutdown.grace_seconds);
    let finished = infra::finish_within(work, &stop, grace).await;
    transport.close().await;
    if let Some(((), (), monitoring)) = finished {
        monitoring?;
    }
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
        let swept = engine.expire_all_stale().await;
        saga::metrics::expiration_sweep(swept.as_ref().ok().map(|o| o.expired));
        match swept {
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
