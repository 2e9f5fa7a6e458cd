//! The saga tables become generic: any saga type, no column of one domain.
//!
//! - `saga_transitions` (the journal) gets `saga_type` and `input` (the
//!   input as JSON). Before this migration the journal had two columns of the
//!   order saga, `payment_draw` and `payment_approved`; where a database has
//!   them, their values move into `input` in the shape the order saga's input
//!   serializes to (`{"PaymentDecided": {"approved": .., "draw": ..}}`) and
//!   the columns are dropped. Fresh databases never keep them.
//! - `saga_timers` gets `saga_type` (a timer worker claims only its own
//!   saga's timers) and `payload` (the timer value as JSON). Existing timers
//!   get their instance's type and their kind as payload (a JSON string).
//!   The due-timer index leads with the saga type.
//!
//! Runs on PostgreSQL and SQLite (3.35 or later, for `DROP COLUMN`).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let backend = manager.get_database_backend();

        // One column per statement: SQLite alters one thing at a time.
        add(manager, Transitions::Table, saga_type_column()).await?;
        add(
            manager,
            Transitions::Table,
            ColumnDef::new(Transitions::Input)
                .json_binary()
                .null()
                .to_owned(),
        )
        .await?;
        db.execute_unprepared(
            "UPDATE saga_transitions SET saga_type = \
               (SELECT i.saga_type FROM saga_instances i WHERE i.id = saga_transitions.saga_instance_id)",
        )
        .await?;
        if manager
            .has_column("saga_transitions", "payment_draw")
            .await?
        {
            let input = match backend {
                DbBackend::Postgres => {
                    "jsonb_build_object('PaymentDecided', \
                       jsonb_build_object('approved', payment_approved, 'draw', payment_draw))"
                }
                DbBackend::Sqlite => {
                    "json_object('PaymentDecided', json_object('approved', \
                       json(CASE WHEN payment_approved THEN 'true' ELSE 'false' END), \
                       'draw', payment_draw))"
                }
                other => return Err(unsupported(other)),
            };
            db.execute_unprepared(&format!(
                "UPDATE saga_transitions SET input = {input} \
                 WHERE payment_draw IS NOT NULL AND payment_approved IS NOT NULL"
            ))
            .await?;
            for column in [Transitions::PaymentDraw, Transitions::PaymentApproved] {
                manager
                    .alter_table(
                        Table::alter()
                            .table(Transitions::Table)
                            .drop_column(column)
                            .to_owned(),
                    )
                    .await?;
            }
        }

        add(manager, Timers::Table, saga_type_column()).await?;
        add(
            manager,
            Timers::Table,
            ColumnDef::new(Timers::Payload)
                .json_binary()
                .null()
                .to_owned(),
        )
        .await?;
        let kind_as_json = match backend {
            DbBackend::Postgres => "to_jsonb(timer_kind)",
            DbBackend::Sqlite => "json_quote(timer_kind)",
            other => return Err(unsupported(other)),
        };
        db.execute_unprepared(&format!(
            "UPDATE saga_timers SET payload = {kind_as_json}, saga_type = \
               (SELECT i.saga_type FROM saga_instances i WHERE i.id = saga_timers.saga_instance_id)"
        ))
        .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("ix_saga_timers_due")
                    .table(Timers::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_saga_timers_type_due")
                    .table(Timers::Table)
                    .col(Timers::SagaType)
                    .col(Timers::FiredAt)
                    .col(Timers::DueAt)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("ix_saga_timers_type_due")
                    .table(Timers::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_saga_timers_due")
                    .table(Timers::Table)
                    .col(Timers::FiredAt)
                    .col(Timers::DueAt)
                    .to_owned(),
            )
            .await?;
        for column in [Timers::Payload, Timers::SagaType] {
            drop(manager, Timers::Table, column).await?;
        }
        // The journal's input is kept only as far as the old columns can
        // hold it: payment decisions.
        add(
            manager,
            Transitions::Table,
            ColumnDef::new(Transitions::PaymentDraw)
                .double()
                .null()
                .to_owned(),
        )
        .await?;
        add(
            manager,
            Transitions::Table,
            ColumnDef::new(Transitions::PaymentApproved)
                .boolean()
                .null()
                .to_owned(),
        )
        .await?;
        let db = manager.get_connection();
        let restore = match manager.get_database_backend() {
            DbBackend::Postgres => {
                "UPDATE saga_transitions SET \
                   payment_draw = (input->'PaymentDecided'->>'draw')::double precision, \
                   payment_approved = (input->'PaymentDecided'->>'approved')::boolean \
                 WHERE input ? 'PaymentDecided'"
            }
            DbBackend::Sqlite => {
                "UPDATE saga_transitions SET \
                   payment_draw = json_extract(input, '$.PaymentDecided.draw'), \
                   payment_approved = json_extract(input, '$.PaymentDecided.approved') \
                 WHERE json_extract(input, '$.PaymentDecided') IS NOT NULL"
            }
            other => return Err(unsupported(other)),
        };
        db.execute_unprepared(restore).await?;
        for column in [Transitions::Input, Transitions::SagaType] {
            drop(manager, Transitions::Table, column).await?;
        }
        Ok(())
    }
}

fn saga_type_column() -> ColumnDef {
    ColumnDef::new(Transitions::SagaType)
        .string_len(64)
        .not_null()
        .default("")
        .to_owned()
}

async fn add(
    manager: &SchemaManager<'_>,
    table: impl IntoIden,
    column: ColumnDef,
) -> Result<(), DbErr> {
    let mut column = column;
    manager
        .alter_table(
            Table::alter()
                .table(table)
                .add_column(&mut column)
                .to_owned(),
        )
        .await
}

async fn drop(
    manager: &SchemaManager<'_>,
    table: impl IntoIden,
    column: impl IntoIden,
) -> Result<(), DbErr> {
    manager
        .alter_table(Table::alter().table(table).drop_column(column).to_owned())
        .await
}

fn unsupported(backend: DbBackend) -> DbErr {
    DbErr::Migration(format!(
        "the saga tables support PostgreSQL and SQLite, not {backend:?}"
    ))
}

#[derive(DeriveIden, Clone, Copy)]
enum Transitions {
    #[sea_orm(iden = "saga_transitions")]
    Table,
    SagaType,
    Input,
    PaymentDraw,
    PaymentApproved,
}

#[derive(DeriveIden, Clone, Copy)]
enum Timers {
    #[sea_orm(iden = "saga_timers")]
    Table,
    Payload,
    SagaType,
    FiredAt,
    DueAt,
}
