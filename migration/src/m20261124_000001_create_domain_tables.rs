use sea_orm_migration::prelude::*;

use crate::columns::*;

use crate::constraints as c;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Users::Table)
                    .col(id(Users::Id))
                    .col(ColumnDef::new(Users::Name).string_len(200).not_null())
                    .col(ColumnDef::new(Users::Email).string_len(320).not_null())
                    .col(ColumnDef::new(Users::PasswordHash).text().not_null())
                    .col(
                        ColumnDef::new(Users::Role)
                            .string_len(16)
                            .not_null()
                            .default("user"),
                    )
                    .col(timestamp(Users::CreatedAt))
                    .check((
                        c::USERS_ROLE_CHECK,
                        Expr::col(Users::Role).is_in(["user", "admin"]),
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(c::USERS_EMAIL_KEY)
                    .table(Users::Table)
                    .col(Users::Email)
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Products::Table)
                    .col(id(Products::Id))
                    .col(ColumnDef::new(Products::Name).string_len(200).not_null())
                    .col(
                        ColumnDef::new(Products::Description)
                            .text()
                            .not_null()
                            .default(""),
                    )
                    .col(money(Products::Price))
                    .col(ColumnDef::new(Products::Stock).integer().not_null())
                    .col(timestamp(Products::CreatedAt))
                    .col(timestamp(Products::UpdatedAt))
                    .check((c::PRODUCTS_STOCK_CHECK, Expr::col(Products::Stock).gte(0)))
                    .check((c::PRODUCTS_PRICE_CHECK, Expr::col(Products::Price).gte(0)))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(c::PRODUCTS_NAME_KEY)
                    .table(Products::Table)
                    .col(Products::Name)
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Orders::Table)
                    .col(id(Orders::Id))
                    .col(ColumnDef::new(Orders::UserId).big_integer().not_null())
                    .col(ColumnDef::new(Orders::Status).string_len(16).not_null())
                    .col(money(Orders::Total))
                    .col(timestamp(Orders::CreatedAt))
                    .col(timestamp(Orders::UpdatedAt))
                    .check((
                        c::ORDERS_STATUS_CHECK,
                        Expr::col(Orders::Status).is_in([
                            "pending",
                            "processing",
                            "completed",
                            "expired",
                        ]),
                    ))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_orders_user")
                            .from(Orders::Table, Orders::UserId)
                            .to(Users::Table, Users::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_orders_status_updated_at")
                    .table(Orders::Table)
                    .col(Orders::Status)
                    .col(Orders::UpdatedAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_orders_user_id")
                    .table(Orders::Table)
                    .col(Orders::UserId)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(OrderItems::Table)
                    .col(id(OrderItems::Id))
                    .col(ColumnDef::new(OrderItems::OrderId).big_integer().not_null())
                    .col(
                        ColumnDef::new(OrderItems::ProductId)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(OrderItems::Quantity).integer().not_null())
                    .col(money(OrderItems::UnitPrice))
                    .check((
                        c::ORDER_ITEMS_QUANTITY_CHECK,
                        Expr::col(OrderItems::Quantity).gt(0),
                    ))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_order_items_order")
                            .from(OrderItems::Table, OrderItems::OrderId)
                            .to(Orders::Table, Orders::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_order_items_product")
                            .from(OrderItems::Table, OrderItems::ProductId)
                            .to(Products::Table, Products::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_order_items_order_id")
                    .table(OrderItems::Table)
                    .col(OrderItems::OrderId)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Notifications::Table)
                    .col(id(Notifications::Id))
                    .col(
                        ColumnDef::new(Notifications::OrderId)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Notifications::UserId)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Notifications::EventType)
                            .string_len(32)
                            .not_null(),
                    )
                    .col(ColumnDef::new(Notifications::Message).text().not_null())
                    .col(
                        ColumnDef::new(Notifications::IsEmailSent)
                            .boolean()
                            .not_null()
                            .default(false),
                    )
                    .col(timestamp(Notifications::CreatedAt))
                    .col(
                        ColumnDef::new(Notifications::Metadata)
                            .json_binary()
                            .not_null(),
                    )
                    .check((
                        c::NOTIFICATIONS_EVENT_TYPE_CHECK,
                        Expr::col(Notifications::EventType).is_in([
                            "OrderCreated",
                            "OrderCompleted",
                            "OrderExpired",
                        ]),
                    ))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_notifications_order")
                            .from(Notifications::Table, Notifications::OrderId)
                            .to(Orders::Table, Orders::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_notifications_user")
                            .from(Notifications::Table, Notifications::UserId)
                            .to(Users::Table, Users::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(c::NOTIFICATIONS_ORDER_EVENT_KEY)
                    .table(Notifications::Table)
                    .col(Notifications::OrderId)
                    .col(Notifications::EventType)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_notifications_user_id")
                    .table(Notifications::Table)
                    .col(Notifications::UserId)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Notifications::Table.into_iden(),
            OrderItems::Table.into_iden(),
            Orders::Table.into_iden(),
            Products::Table.into_iden(),
            Users::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
pub(crate) enum Users {
    Table,
    Id,
    Name,
    Email,
    PasswordHash,
    Role,
    CreatedAt,
}

#[derive(DeriveIden)]
pub(crate) enum Products {
    Table,
    Id,
    Name,
    Description,
    Price,
    Stock,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Orders {
    Table,
    Id,
    UserId,
    Status,
    Total,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum OrderItems {
    Table,
    Id,
    OrderId,
    ProductId,
    Quantity,
    UnitPrice,
}

#[derive(DeriveIden)]
enum Notifications {
    Table,
    Id,
    OrderId,
    UserId,
    EventType,
    Message,
    IsEmailSent,
    CreatedAt,
    Metadata,
}
