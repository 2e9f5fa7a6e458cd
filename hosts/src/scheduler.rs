//! The scheduler: every `expiration.sweep_interval_seconds`, applies the
//! order saga's state timeout (orders `processing` for longer than
//! `expiration.processing_timeout_seconds` expire) through the same
//! definition, and relays the resulting `OrderExpired` events.

use std::sync::Arc;
use std::time::Duration;

use saga::workers::SweepWorker;
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
            .with_broker(ops::Broker::connected(transport.clone()))
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
    let sweeper = SweepWorker::new(engine.clone(), interval);
    let work = async {
        tokio::join!(
            loops.run("expiration sweeps", sweeper.run_until_stopped(stop.clone())),
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
