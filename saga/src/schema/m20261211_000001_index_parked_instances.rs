//! A partial index of the parked (faulted) instances. Claiming due timers
//! and finding the next due time skip the timers of parked instances
//! (`saga_instance_id NOT IN (parked ids)`); without this index that list
//! was read with a scan of every instance, on every claim and every poll.
//! With it the list is read from an index holding only the parked rows
//! (usually none).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // The same statement on PostgreSQL and SQLite (sea-query's index
        // builder has no partial indexes).
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX IF NOT EXISTS ix_saga_instances_parked \
                 ON saga_instances (id) WHERE faulted = true",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP INDEX IF EXISTS ix_saga_instances_parked")
            .await?;
        Ok(())
    }
}
