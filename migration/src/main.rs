//! Applies every pending migration to `DATABASE_URL` and exits.

use anyhow::Context;
use migration::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::Database;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    let url = std::env::var("DATABASE_URL")
        .or_else(|_| std::env::var("APP__DATABASE__URL"))
        .context("set DATABASE_URL (or APP__DATABASE__URL) to the database to migrate")?;
    let db = Database::connect(&url)
        .await
        .context("Failed to connect to the database")?;
    Migrator::up(&db, None)
        .await
        .context("Failed to apply migrations")?;
    tracing::info!("all migrations applied");
    Ok(())
}
