//! `console_sessions`: sessions of the operator console (`/console`). The
//! cookie holds a random token; only its SHA-256 is stored, with the user,
//! the session's CSRF token and when it expires.

use sea_orm_migration::prelude::*;

use crate::columns::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ConsoleSessions::Table)
                    .col(id(ConsoleSessions::Id))
                    .col(
                        ColumnDef::new(ConsoleSessions::TokenHash)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ConsoleSessions::UserId)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ConsoleSessions::CsrfToken)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(timestamp(ConsoleSessions::CreatedAt))
                    .col(timestamp(ConsoleSessions::ExpiresAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_console_sessions_user")
                            .from(ConsoleSessions::Table, ConsoleSessions::UserId)
                            .to(Users::Table, Users::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("uq_console_sessions_token_hash")
                    .table(ConsoleSessions::Table)
                    .col(ConsoleSessions::TokenHash)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_console_sessions_expires_at")
                    .table(ConsoleSessions::Table)
                    .col(ConsoleSessions::ExpiresAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(ConsoleSessions::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum ConsoleSessions {
    Table,
    Id,
    TokenHash,
    UserId,
    CsrfToken,
    CreatedAt,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
}
