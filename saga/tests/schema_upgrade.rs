//! A database written by the previous version (the saga tables with the
//! order saga's payment columns in the journal, timers without a saga type
//! or payload) upgrades with its journal, timers and outbox intact, on
//! PostgreSQL and on SQLite; and the upgrade can be rolled back.

use chrono::{DateTime, TimeZone, Utc};
use saga::schema::{Migrator, instances, outbox, timers, transitions};
use sea_orm::sea_query::{Alias, Query, SimpleExpr};
use sea_orm::{
    ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, EntityTrait,
    QueryFilter, QueryOrder,
};
use sea_orm_migration::{MigratorTrait, SchemaManager};
use serde_json::json;

/// The migrations of the previous version: everything but the last one.
const PREVIOUS: u32 = 3;

fn at(seconds: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 30, 9, 0, 0)
        .single()
        .expect("valid time")
        + chrono::Duration::seconds(seconds)
}

async fn insert(db: &DatabaseConnection, table: &str, row: &[(&str, SimpleExpr)]) {
    let mut insert = Query::insert();
    insert
        .into_table(Alias::new(table))
        .columns(row.iter().map(|(c, _)| Alias::new(*c)))
        .values_panic(row.iter().map(|(_, v)| v.clone()));
    db.execute(&insert)
        .await
        .unwrap_or_else(|e| panic!("insert into {table}: {e}"));
}

/// A journal row of the previous schema: (instance, from, to, trigger,
/// payment draw, payment approved).
type JournalRow = (
    i64,
    Option<&'static str>,
    &'static str,
    &'static str,
    Option<f64>,
    Option<bool>,
);

/// Rows as the previous version wrote them: two order sagas, one decided
/// (approved) and one declined and waiting to expire, with its payment timer
/// fired; a third one still waiting for its payment timer; three outbox rows.
async fn write_previous_rows(db: &DatabaseConnection) {
    for (id, correlation, state) in [
        (1, "41", "completed"),
        (2, "42", "processing"),
        (3, "43", "processing"),
    ] {
        insert(
            db,
            "saga_instances",
            &[
                ("id", id.into()),
                ("saga_type", "order".into()),
                ("correlation_id", correlation.into()),
                ("state", state.into()),
                ("version", 2.into()),
                ("attempts", 0.into()),
                ("faulted", false.into()),
                ("data", json!({"order_id": id}).into()),
                ("state_entered_at", at(id).into()),
                ("created_at", at(0).into()),
                ("updated_at", at(id).into()),
            ],
        )
        .await;
    }
    let journal: [JournalRow; 7] = [
        (1, None, "pending", "OrderPlaced", None, None),
        (1, Some("pending"), "processing", "OrderCreated", None, None),
        (
            1,
            Some("processing"),
            "completed",
            "PaymentDecided",
            Some(0.27),
            Some(true),
        ),
        (2, None, "pending", "OrderPlaced", None, None),
        (2, Some("pending"), "processing", "OrderCreated", None, None),
        (
            2,
            Some("processing"),
            "processing",
            "PaymentDecided",
            Some(0.91),
            Some(false),
        ),
        (3, None, "pending", "OrderPlaced", None, None),
    ];
    for (n, (instance, from, to, trigger, draw, approved)) in journal.into_iter().enumerate() {
        insert(
            db,
            "saga_transitions",
            &[
                ("saga_instance_id", instance.into()),
                ("correlation_id", format!("4{instance}").into()),
                ("from_state", from.map(str::to_owned).into()),
                ("to_state", to.into()),
                ("trigger", trigger.into()),
                ("outcome", "applied".into()),
                ("attempt", 1.into()),
                ("payment_draw", draw.into()),
                ("payment_approved", approved.into()),
                ("detail", format!("row {n}").into()),
                ("occurred_at", at(n as i64).into()),
            ],
        )
        .await;
    }
    for (instance, fired) in [(2, Some(at(10))), (3, None)] {
        insert(
            db,
            "saga_timers",
            &[
                ("saga_instance_id", instance.into()),
                ("correlation_id", format!("4{instance}").into()),
                ("timer_kind", "payment_due".into()),
                ("due_at", at(10).into()),
                ("created_at", at(5).into()),
                ("fired_at", fired.into()),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                ),
            ],
        )
        .await;
    }
    for (n, sent) in [(0, Some(at(1))), (1, Some(at(12))), (2, None)] {
        insert(
            db,
            "saga_outbox",
            &[
                ("message_id", uuid::Uuid::from_u128(n + 1).into()),
                ("message_type", "OrderCreated".into()),
                ("routing_key", "order.created".into()),
                ("correlation_id", format!("4{}", n + 1).into()),
                ("body", json!({"n": n}).into()),
                ("created_at", at(n as i64).into()),
                ("sent_at", sent.into()),
                ("publish_attempts", 1.into()),
            ],
        )
        .await;
    }
}

async fn upgrade_keeps_every_row(db: &DatabaseConnection) {
    Migrator::up(db, Some(PREVIOUS))
        .await
        .expect("previous schema");
    write_previous_rows(db).await;
    Migrator::up(db, None).await.expect("upgrade");

    let manager = SchemaManager::new(db);
    for column in ["payment_draw", "payment_approved"] {
        assert!(
            !manager
                .has_column("saga_transitions", column)
                .await
                .expect("columns"),
            "{column} left in the journal"
        );
    }

    // The journal: every row, each with its saga type; the payment
    // decisions became the order saga's input JSON, nothing else got one.
    let journal = transitions::Entity::find()
        .order_by_asc(transitions::Column::Id)
        .all(db)
        .await
        .expect("journal");
    assert_eq!(journal.len(), 7);
    assert!(
        journal.iter().all(|r| r.saga_type == "order"),
        "{journal:?}"
    );
    let inputs: Vec<Option<serde_json::Value>> = journal.iter().map(|r| r.input.clone()).collect();
    assert_eq!(
        inputs,
        [
            None,
            None,
            Some(json!({"PaymentDecided": {"approved": true, "draw": 0.27}})),
            None,
            None,
            Some(json!({"PaymentDecided": {"approved": false, "draw": 0.91}})),
            None,
        ]
    );
    let details: Vec<Option<String>> = journal.iter().map(|r| r.detail.clone()).collect();
    assert_eq!(
        details,
        (0..7).map(|n| Some(format!("row {n}"))).collect::<Vec<_>>()
    );
    assert_eq!(journal[2].trigger, "PaymentDecided");
    assert_eq!(journal[2].occurred_at, at(2));

    // Timers: the instance's type, and the kind as payload (what a timer
    // value of a single-kind enum serializes to); due times and the fired
    // mark unchanged.
    let timers = timers::Entity::find()
        .order_by_asc(timers::Column::Id)
        .all(db)
        .await
        .expect("timers");
    assert_eq!(timers.len(), 2);
    for t in &timers {
        assert_eq!(t.saga_type, "order");
        assert_eq!(t.payload, Some(json!("payment_due")));
        assert_eq!(t.due_at, at(10));
        assert!(t.traceparent.is_some());
    }
    assert_eq!(timers[0].fired_at, Some(at(10)));
    assert_eq!(timers[1].fired_at, None);

    // The outbox as it was: two sent, one waiting for the relay.
    let rows = outbox::Entity::find()
        .order_by_asc(outbox::Column::Id)
        .all(db)
        .await
        .expect("outbox");
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows.iter().map(|r| r.sent_at.is_some()).collect::<Vec<_>>(),
        [true, true, false]
    );
    assert_eq!(rows[2].body, json!({"n": 2}));
    assert_eq!(rows[2].message_id, uuid::Uuid::from_u128(3));

    let waiting = instances::Entity::find()
        .filter(instances::Column::State.eq("processing"))
        .all(db)
        .await
        .expect("instances");
    assert_eq!(waiting.len(), 2);

    // Rolling the upgrade back (and the operator-action log and the parked
    // index, which came after it) restores the payment columns from the
    // input.
    Migrator::down(db, Some(3)).await.expect("down");
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT payment_draw, payment_approved FROM saga_transitions WHERE id = 6",
        ))
        .await
        .expect("query")
        .expect("row 6");
    let draw: f64 = row.try_get("", "payment_draw").expect("draw");
    let approved: bool = row.try_get("", "payment_approved").expect("approved");
    assert_eq!((draw, approved), (0.91, false));
    // ... and the upgrade runs again.
    Migrator::up(db, None).await.expect("upgrade again");
    let again = transitions::Entity::find_by_id(6)
        .one(db)
        .await
        .expect("journal")
        .expect("row 6");
    assert_eq!(
        again.input,
        Some(json!({"PaymentDecided": {"approved": false, "draw": 0.91}}))
    );
}

#[tokio::test]
async fn a_postgres_database_of_the_previous_schema_upgrades_with_journal_timers_and_outbox_intact()
{
    let tdb = saga::testing::TestDatabase::create_empty().await;
    upgrade_keeps_every_row(&tdb.db).await;
    tdb.drop().await;
}

#[tokio::test]
async fn a_sqlite_database_of_the_previous_schema_upgrades_with_journal_timers_and_outbox_intact() {
    let mut options = ConnectOptions::new("sqlite::memory:");
    options
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .sqlx_logging(false);
    let db = Database::connect(options).await.expect("sqlite");
    upgrade_keeps_every_row(&db).await;
}
