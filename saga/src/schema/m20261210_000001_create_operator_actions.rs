//! `saga_operator_actions`: what operators did to sagas and queues (resume
//! an instance, re-drive an error queue), who did it, and what it changed.
//! The journal (`saga_transitions`) keeps per-instance actions too; this
//! log also holds the actions that have no single instance (a re-drive).

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
                    .table(OperatorActions::Table)
                    .col(id(OperatorActions::Id))
                    .col(
                        ColumnDef::new(OperatorActions::Action)
                            .string_len(32)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(OperatorActions::SagaType)
                            .string_len(64)
                            .null(),
                    )
                    .col(
                        ColumnDef::new(OperatorActions::CorrelationId)
                            .string_len(128)
                            .null(),
                    )
                    .col(
                        ColumnDef::new(OperatorActions::Queue)
                            .string_len(255)
                            .null(),
                    )
                    .col(
                        ColumnDef::new(OperatorActions::Operator)
                            .string_len(320)
                            .not_null(),
                    )
                    .col(ColumnDef::new(OperatorActions::Detail).json_binary().null())
                    .col(timestamp(OperatorActions::At))
                    .to_owned(),
            )
            .await?;
        // "What was done to this instance", newest first.
        manager
            .create_index(
                Index::create()
                    .name("ix_saga_operator_actions_instance")
                    .table(OperatorActions::Table)
                    .col(OperatorActions::SagaType)
                    .col(OperatorActions::CorrelationId)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(OperatorActions::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum OperatorActions {
    #[sea_orm(iden = "saga_operator_actions")]
    Table,
    Id,
    Action,
    SagaType,
    CorrelationId,
    Queue,
    Operator,
    Detail,
    At,
}
