//! The shipment example's own tables, next to the saga library's:
//!
//! | table | what |
//! |---|---|
//! | `shipment_stock` | units available per SKU (never below 0) |
//! | `shipment_allocations` | one row per shipment that got its stock; `released_at` once it was given back |
//!
//! [`Migrator`] runs the saga tables' migrations first
//! ([`saga::schema::migrations`]), then [`CreateShipmentTables`]; a service
//! with more tables of its own adds them the same way.

use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, ConnectionTrait, DbErr, EntityTrait};
use sea_orm_migration::prelude::*;

/// The saga tables, then the shipment tables.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = saga::schema::migrations();
        all.push(Box::new(CreateShipmentTables));
        all
    }
}

/// Creates `shipment_stock` and `shipment_allocations`.
pub struct CreateShipmentTables;

impl MigrationName for CreateShipmentTables {
    // Named explicitly: a migrated database remembers this name.
    fn name(&self) -> &str {
        "m20261203_000001_create_shipment_tables"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateShipmentTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ShipmentStock::Table)
                    .col(
                        ColumnDef::new(ShipmentStock::Sku)
                            .string_len(64)
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(ShipmentStock::Available)
                            .integer()
                            .not_null(),
                    )
                    .check((
                        "ck_shipment_stock_available",
                        Expr::col(ShipmentStock::Available).gte(0),
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ShipmentAllocations::Table)
                    .col(
                        ColumnDef::new(ShipmentAllocations::ShipmentId)
                            .uuid()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(ShipmentAllocations::Sku)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ShipmentAllocations::Quantity)
                            .integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ShipmentAllocations::AllocatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ShipmentAllocations::ReleasedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ShipmentAllocations::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ShipmentStock::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum ShipmentStock {
    Table,
    Sku,
    Available,
}

#[derive(DeriveIden)]
enum ShipmentAllocations {
    Table,
    ShipmentId,
    Sku,
    Quantity,
    AllocatedAt,
    ReleasedAt,
}

/// `shipment_stock`: units available per SKU.
pub mod stock {
    use sea_orm::entity::prelude::*;

    /// One SKU's stock.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "shipment_stock")]
    pub struct Model {
        /// The SKU.
        #[sea_orm(primary_key, auto_increment = false)]
        pub sku: String,
        /// Units not allocated to any shipment.
        pub available: i32,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `shipment_allocations`: the stock each shipment set aside.
pub mod allocations {
    use sea_orm::entity::prelude::*;

    /// One shipment's allocation.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "shipment_allocations")]
    pub struct Model {
        /// The shipment (its saga's correlation id).
        #[sea_orm(primary_key, auto_increment = false)]
        pub shipment_id: Uuid,
        /// What was allocated.
        pub sku: String,
        /// How many.
        pub quantity: i32,
        /// When.
        pub allocated_at: DateTimeUtc,
        /// When it was given back (the shipment was cancelled), if it was.
        pub released_at: Option<DateTimeUtc>,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Sets the stock of `sku` to `available` units (creates the SKU if new).
pub async fn set_stock<C: ConnectionTrait>(
    conn: &C,
    sku: &str,
    available: i32,
) -> Result<(), DbErr> {
    stock::Entity::insert(stock::ActiveModel {
        sku: Set(sku.to_owned()),
        available: Set(available),
    })
    .on_conflict(
        OnConflict::column(stock::Column::Sku)
            .update_column(stock::Column::Available)
            .to_owned(),
    )
    .exec(conn)
    .await?;
    Ok(())
}

/// Units of `sku` available now (0 for an unknown SKU).
pub async fn available<C: ConnectionTrait>(conn: &C, sku: &str) -> Result<i32, DbErr> {
    Ok(stock::Entity::find_by_id(sku.to_owned())
        .one(conn)
        .await?
        .map_or(0, |s| s.available))
}
