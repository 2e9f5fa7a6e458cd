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

/// Money: `NUMERIC(12, 2) NOT NULL`.
pub fn money(col: impl IntoIden) -> ColumnDef {
    ColumnDef::new(col).decimal_len(12, 2).not_null().to_owned()
}
