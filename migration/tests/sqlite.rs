//! The same migrations on SQLite (the embedded mode's database).

use migration::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::{ConnectionTrait, Database, DbBackend, Statement};

#[tokio::test]
async fn every_migration_applies_to_sqlite_and_rolls_back() {
    let db = Database::connect("sqlite::memory:").await.expect("sqlite");
    Migrator::up(&db, None).await.expect("migrations apply");
    assert!(
        Migrator::get_pending_migrations(&db)
            .await
            .expect("status")
            .is_empty()
    );
    let products = db
        .query_one_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT count(*) AS n FROM products",
        ))
        .await
        .expect("query")
        .expect("row");
    assert_eq!(products.try_get::<i64>("", "n").expect("n"), 5);
    // Seeding twice inserts nothing new.
    Migrator::down(&db, Some(1)).await.expect("down one");
    Migrator::up(&db, None).await.expect("up again");
    // Named CHECK constraints hold on SQLite too.
    let bad = db
        .execute_unprepared(
            "INSERT INTO users (name, email, password_hash, role, created_at) \
             VALUES ('x', 'x@example.com', 'h', 'root', '2026-01-01T00:00:00Z')",
        )
        .await
        .expect_err("a role outside the CHECK is refused");
    assert!(bad.to_string().contains("ck_users_role"), "{bad}");
    Migrator::down(&db, None)
        .await
        .expect("everything rolls back");
}
