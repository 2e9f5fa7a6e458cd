//! The W3C trace context (`traceparent`, `tracestate`) stored with what is
//! written for later: outbox rows (the relay puts it in the message headers),
//! timers (their firing continues the order's trace) and saga instances (the
//! expiration sweep continues the order's trace). Nullable: rows written
//! without a trace, and every row from before this migration, have none.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const TABLES: [&str; 3] = ["saga_outbox", "saga_timers", "saga_instances"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in TABLES {
            // One column per statement: SQLite alters one thing at a time.
            for column in [TraceColumn::Traceparent, TraceColumn::Tracestate] {
                manager
                    .alter_table(
                        Table::alter()
                            .table(Alias::new(table))
                            .add_column(ColumnDef::new(column).text().null())
                            .to_owned(),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in TABLES {
            for column in [TraceColumn::Tracestate, TraceColumn::Traceparent] {
                manager
                    .alter_table(
                        Table::alter()
                            .table(Alias::new(table))
                            .drop_column(column)
                            .to_owned(),
                    )
                    .await?;
            }
        }
        Ok(())
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum TraceColumn {
    Traceparent,
    Tracestate,
}
