//! Column shapes shared by the migrations.

use sea_orm_migration::prelude::*;

/// `BIGSERIAL PRIMARY KEY` (`INTEGER PRIMARY KEY AUTOINCREMENT` on SQLite).
pub fn id(col: impl IntoIden) -> ColumnDef {
    ColumnDef::new(col)
        .big_integer()
        .not_null()
        .auto_increment()
        .primary_key()
        .to_owned()
}

/// `TIMESTAMPTZ NOT NULL`.
pub fn timestamp(col: impl IntoIden) -> ColumnDef {
    ColumnDef::new(col)
        .timestamp_with_time_zone()
        .not_null()
        .to_owned()
}

/// `TIMESTAMPTZ NULL`.
pub fn timestamp_null(col: impl IntoIden) -> ColumnDef {
    ColumnDef::new(col)
        .timestamp_with_time_zone()
        .null()
        .to_owned()
}
