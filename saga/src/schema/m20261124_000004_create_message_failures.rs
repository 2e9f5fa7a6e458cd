//! The persisted retry budget of consumers whose messages have no saga
//! instance to keep it on (the notifications consumer), and an index that
//! finds parked saga instances quickly.

use sea_orm_migration::prelude::*;

use super::columns::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SagaMessageFailures::Table)
                    .col(
                        ColumnDef::new(SagaMessageFailures::Consumer)
                            .string_len(128)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SagaMessageFailures::MessageId)
                            .uuid()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SagaMessageFailures::CorrelationId)
                            .string_len(128)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SagaMessageFailures::Attempts)
                            .integer()
                            .not_null()
                            .default(0),
                    )
                    .col(ColumnDef::new(SagaMessageFailures::LastError).text().null())
                    .col(timestamp(SagaMessageFailures::FirstFailedAt))
                    .col(timestamp(SagaMessageFailures::LastFailedAt))
                    .primary_key(
                        Index::create()
                            .name("pk_saga_message_failures")
                            .col(SagaMessageFailures::Consumer)
                            .col(SagaMessageFailures::MessageId),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_saga_instances_faulted")
                    .table(SagaInstances::Table)
                    .col(SagaInstances::Faulted)
                    .col(SagaInstances::SagaType)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("ix_saga_instances_faulted")
                    .table(SagaInstances::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(SagaMessageFailures::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum SagaMessageFailures {
    Table,
    Consumer,
    MessageId,
    CorrelationId,
    Attempts,
    LastError,
    FirstFailedAt,
    LastFailedAt,
}

#[derive(DeriveIden)]
enum SagaInstances {
    Table,
    Faulted,
    SagaType,
}
