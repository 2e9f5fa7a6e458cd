//! Demo products. Idempotent: re-running inserts nothing that is already there.
//! (The admin user is seeded by the API host, because its e-mail and password
//! come from configuration and secrets.)

use sea_orm_migration::prelude::*;

use crate::m20261124_000001_create_domain_tables::Products;

#[derive(DeriveMigrationName)]
pub struct Migration;

const DEMO_PRODUCTS: &[(&str, &str, &str, i32)] = &[
    (
        "Mechanical keyboard",
        "87 keys, brown switches",
        "89.90",
        1000,
    ),
    ("Wireless mouse", "Ergonomic, 2.4 GHz", "24.50", 1000),
    ("USB-C hub", "7 ports, 100 W pass-through", "39.00", 1000),
    ("27\" monitor", "2560x1440, 144 Hz", "279.99", 200),
    ("Laptop stand", "Aluminium, adjustable", "19.95", 500),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let mut insert = Query::insert();
        insert.into_table(Products::Table).columns([
            Products::Name,
            Products::Description,
            Products::Price,
            Products::Stock,
            Products::CreatedAt,
            Products::UpdatedAt,
        ]);
        for (name, description, price, stock) in DEMO_PRODUCTS {
            insert
                .values([
                    (*name).into(),
                    (*description).into(),
                    Expr::val(*price).cast_as("DECIMAL"),
                    (*stock).into(),
                    Expr::current_timestamp(),
                    Expr::current_timestamp(),
                ])
                .map_err(|e| DbErr::Custom(format!("seed row for {name}: {e}")))?;
        }
        insert.on_conflict(OnConflict::column(Products::Name).do_nothing().to_owned());
        manager.exec_stmt(insert).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let names: Vec<&str> = DEMO_PRODUCTS.iter().map(|(n, ..)| *n).collect();
        manager
            .exec_stmt(
                Query::delete()
                    .from_table(Products::Table)
                    .and_where(Expr::col(Products::Name).is_in(names))
                    .to_owned(),
            )
            .await
    }
}
