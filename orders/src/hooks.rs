//! The order saga's effectful half, run by the engine inside its
//! transaction: the payment draw when the payment timer fires, the order
//! row's status on every state change, and the stock release when an order
//! expires. Plus placing an order: the stock reservation, the order rows and
//! the saga's start, in the caller's transaction.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound as _, Utc};
use entity::{order_items, orders, products};
use rust_decimal::Decimal;
use saga::SagaError;
use saga::definition::SagaState;
use saga::engine::SagaEngine;
use saga::hooks::{EffectCall, EnteredCall, HookContext, Hooks};
use saga::outbox::Committed;
use sea_orm::sea_query::LockType;
use sea_orm::sea_query::{Expr, ExprTrait as _, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait,
    FromQueryResult, QueryFilter, QueryOrder, QuerySelect, Statement,
};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::contracts::{OrderLine, OrderSnapshot};
use crate::definition::{OrderEffect, OrderInput, OrderSaga, OrderState, OrderTimer};
use crate::error::OrderError;
use crate::payment::PaymentSimulator;

/// The order saga's hooks.
pub struct OrderHooks {
    payment: Arc<dyn PaymentSimulator>,
}

impl OrderHooks {
    /// Hooks that draw payments from `payment`.
    pub fn new(payment: Arc<dyn PaymentSimulator>) -> Self {
        Self { payment }
    }
}

#[async_trait]
impl Hooks<OrderSaga> for OrderHooks {
    /// The payment timer fired: the simulated payment decides.
    async fn timer_input(
        &self,
        _cx: &HookContext<'_, OrderSaga>,
        timer: &OrderTimer,
    ) -> Result<OrderInput, SagaError> {
        match timer {
            OrderTimer::PaymentDue => {
                let draw = self.payment.draw();
                Ok(OrderInput::PaymentDecided {
                    approved: draw.approved,
                    draw: draw.value,
                })
            }
        }
    }

    async fn effect(
        &self,
        cx: &HookContext<'_, OrderSaga>,
        effect: &OrderEffect,
    ) -> Result<(), SagaError> {
        match effect {
            OrderEffect::ReleaseStock => release_stock_of(cx.txn, &[cx.data.order_id]).await,
        }
    }

    /// `orders.status` follows the saga's state.
    async fn entered(
        &self,
        cx: &HookContext<'_, OrderSaga>,
        _from: OrderState,
        to: OrderState,
    ) -> Result<(), SagaError> {
        orders::Entity::update_many()
            .col_expr(orders::Column::Status, Expr::value(to.name()))
            .col_expr(orders::Column::UpdatedAt, Expr::value(cx.now))
            .filter(orders::Column::Id.eq(cx.data.order_id))
            .exec(cx.txn)
            .await?;
        Ok(())
    }

    /// `orders.status` of a whole batch: one update per target status.
    async fn entered_batch(
        &self,
        txn: &DatabaseTransaction,
        now: DateTime<Utc>,
        calls: &[EnteredCall<'_, OrderSaga>],
    ) -> Result<(), SagaError> {
        for &status in <OrderState as SagaState>::ALL {
            let ids: Vec<i64> = calls
                .iter()
                .filter(|c| c.to == status)
                .map(|c| c.data.order_id)
                .collect();
            if ids.is_empty() {
                continue;
            }
            orders::Entity::update_many()
                .col_expr(orders::Column::Status, Expr::value(status.name()))
                .col_expr(orders::Column::UpdatedAt, Expr::value(now))
                .filter(orders::Column::Id.is_in(ids))
                .exec(txn)
                .await?;
        }
        Ok(())
    }

    /// The stock of a whole batch of expired orders back in one update
    /// (quantities summed per product), after locking the products in id
    /// order.
    async fn effects_batch(
        &self,
        txn: &DatabaseTransaction,
        _now: DateTime<Utc>,
        calls: &[EffectCall<'_, OrderSaga>],
    ) -> Result<(), SagaError> {
        let order_ids: Vec<i64> = calls
            .iter()
            .filter(|c| matches!(c.effect, OrderEffect::ReleaseStock))
            .map(|c| c.data.order_id)
            .collect();
        release_stock_of(txn, &order_ids).await
    }
}

/// Locks the products of `order_ids`' items, in id order.
async fn lock_products_of(txn: &DatabaseTransaction, order_ids: &[i64]) -> Result<(), SagaError> {
    if order_ids.is_empty() {
        return Ok(());
    }
    products::Entity::find()
        .select_only()
        .column(products::Column::Id)
        .filter(
            products::Column::Id.in_subquery(
                Query::select()
                    .column(order_items::Column::ProductId)
                    .from(order_items::Entity)
                    .and_where(order_items::Column::OrderId.is_in(order_ids.iter().copied()))
                    .to_owned(),
            ),
        )
        .order_by_asc(products::Column::Id)
        .lock(LockType::Update)
        .into_tuple::<i64>()
        .all(txn)
        .await?;
    Ok(())
}

/// Gives the reserved quantities of `order_ids` back to their products,
/// the products locked in id order first (two transactions releasing stock
/// of the same products cannot deadlock). On PostgreSQL one statement does
/// both. Runs as the effect of the transition that ends an order, so it
/// happens exactly once.
async fn release_stock_of(txn: &DatabaseTransaction, order_ids: &[i64]) -> Result<(), SagaError> {
    if order_ids.is_empty() {
        return Ok(());
    }
    // Order ids are numbers: listed inline.
    let ids: Vec<String> = order_ids.iter().map(i64::to_string).collect();
    let ids = ids.join(", ");
    let backend = txn.get_database_backend();
    let sql = if backend == DbBackend::Postgres {
        // `locked` takes the row locks in id order, whatever join order the
        // UPDATE is planned with: every plan reads all of it before the
        // first row is updated, or reads it in id order.
        format!(
            "WITH s AS (SELECT product_id, SUM(quantity) AS qty FROM order_items \
                        WHERE order_id IN ({ids}) GROUP BY product_id), \
                  locked AS (SELECT id FROM products WHERE id IN (SELECT product_id FROM s) \
                             ORDER BY id FOR UPDATE) \
             UPDATE products SET stock = stock + s.qty FROM s, locked \
             WHERE products.id = s.product_id AND locked.id = s.product_id"
        )
    } else {
        lock_products_of(txn, order_ids).await?;
        format!(
            "UPDATE products SET stock = stock + s.qty \
             FROM (SELECT product_id, SUM(quantity) AS qty FROM order_items \
                   WHERE order_id IN ({ids}) GROUP BY product_id) AS s \
             WHERE products.id = s.product_id"
        )
    };
    txn.execute_raw(Statement::from_string(backend, sql))
        .await?;
    Ok(())
}

/// Who places an order.
#[derive(Clone, Debug)]
pub struct Customer {
    /// `users.id`.
    pub user_id: i64,
    /// Where the completion e-mail goes.
    pub email: String,
    /// Shown in the e-mail and the audit trail.
    pub name: String,
}

/// A newly placed order, as committed by [`place_order`].
#[derive(Clone, Debug)]
pub struct PlacedOrder {
    /// The `orders` row as inserted.
    pub order: orders::Model,
    /// What every event of the order carries.
    pub snapshot: OrderSnapshot,
    /// Id of the queued `OrderCreated` message.
    pub message_id: Uuid,
    /// The queued events: hand them to the relay after the commit
    /// ([`SagaEngine::committed`]) so they leave at once.
    pub events: Vec<Committed>,
}

/// Places an order inside the caller's transaction: reserves the stock of
/// every line, writes the `pending` order row (total computed from `lines`)
/// and its items, and starts its saga (the instance, its first journal row
/// and the `OrderCreated` outbox row). The caller validates the lines and
/// prices, commits, and then hands [`PlacedOrder::events`] to the relay
/// ([`SagaEngine::committed`]).
///
/// Not enough stock for a line gives [`OrderError::OutOfStock`]; the caller
/// must then roll its transaction back (nothing it wrote is kept).
///
/// Runs in an `order.place` span (a child of the caller's, e.g. the HTTP
/// request's); the saga instance and the `OrderCreated` outbox row keep its
/// trace context.
pub async fn place_order(
    engine: &SagaEngine<OrderSaga>,
    txn: &DatabaseTransaction,
    customer: &Customer,
    lines: Vec<OrderLine>,
) -> Result<PlacedOrder, OrderError> {
    let span = place_span(customer);
    async {
        reserve_stock(txn, &lines).await?;
        place_reserved(engine, txn, customer, lines).await
    }
    .instrument(span)
    .await
}

/// The `order.place` span; [`place_reserved`] records the ids in it.
fn place_span(customer: &Customer) -> tracing::Span {
    tracing::info_span!(
        "order.place",
        user_id = customer.user_id,
        order_id = tracing::field::Empty,
        correlation_id = tracing::field::Empty,
        message_id = tracing::field::Empty,
    )
}

/// What one order line asks for: a product and a quantity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Item {
    /// `products.id`.
    pub product_id: i64,
    /// Units (at least 1).
    pub quantity: i32,
}

/// Like [`place_order`], for items whose names and prices come from the
/// catalogue as their stock is reserved (the conditional stock update
/// returns the product). A product that does not exist gives
/// [`OrderError::UnknownProduct`], a total above `max_total`
/// [`OrderError::TotalTooLarge`]; the caller then rolls back.
///
/// On PostgreSQL, for distinct products, one statement reserves the stock
/// (products locked in id order), inserts the order and its items; then the
/// saga starts. Elsewhere, one statement per line and one per table.
pub async fn place_items(
    engine: &SagaEngine<OrderSaga>,
    txn: &DatabaseTransaction,
    customer: &Customer,
    items: &[Item],
    max_total: Decimal,
) -> Result<PlacedOrder, OrderError> {
    let span = place_span(customer);
    async {
        let mut ids: Vec<i64> = items.iter().map(|i| i.product_id).collect();
        ids.sort_unstable();
        ids.dedup();
        if txn.get_database_backend() == DbBackend::Postgres
            && !items.is_empty()
            && ids.len() == items.len()
        {
            let now = engine.clock().now();
            let (order, lines) = insert_order_pg(txn, customer, items, max_total, now).await?;
            return start_order(engine, txn, customer, order, lines).await;
        }
        let lines = reserve_items(txn, items).await?;
        let total: Decimal = lines
            .iter()
            .map(|l| l.unit_price * Decimal::from(l.quantity))
            .sum();
        if total > max_total {
            return Err(OrderError::TotalTooLarge {
                total,
                max: max_total,
            });
        }
        place_reserved(engine, txn, customer, lines).await
    }
    .instrument(span)
    .await
}

/// Places several orders inside the caller's transaction, each as
/// [`place_items`] would, in its own `span` (a child `order.place` span is
/// opened in it). All or nothing: any order that cannot be placed (an
/// unknown product, not enough stock for all of them together, a total
/// above `max_total`) fails the whole call, and the caller rolls back (and
/// may then place each order alone for its exact answer).
///
/// On PostgreSQL, for orders of distinct products, ONE statement reserves
/// the stock of every order (products locked in id order), inserts the
/// orders and their items, and one more starts their sagas
/// ([`SagaEngine::start_many`]). Elsewhere, [`place_items`] per order.
pub async fn place_many(
    engine: &SagaEngine<OrderSaga>,
    txn: &DatabaseTransaction,
    orders: &[(Customer, Vec<Item>, tracing::Span)],
    max_total: Decimal,
) -> Result<Vec<PlacedOrder>, OrderError> {
    let distinct = |items: &[Item]| {
        let mut ids: Vec<i64> = items.iter().map(|i| i.product_id).collect();
        ids.sort_unstable();
        ids.dedup();
        !items.is_empty() && ids.len() == items.len()
    };
    if txn.get_database_backend() != DbBackend::Postgres
        || !orders.iter().all(|(_, items, _)| distinct(items))
    {
        let mut placed = Vec::with_capacity(orders.len());
        for (customer, items, span) in orders {
            placed.push(
                place_items(engine, txn, customer, items, max_total)
                    .instrument(span.clone())
                    .await?,
            );
        }
        return Ok(placed);
    }
    let spans: Vec<tracing::Span> = orders
        .iter()
        .map(|(customer, _, span)| span.in_scope(|| place_span(customer)))
        .collect();
    let now = engine.clock().now().trunc_subsecs(6);
    let (models, lines) = insert_orders_pg(txn, orders, max_total, now).await?;
    let mut starts = Vec::with_capacity(orders.len());
    let mut snapshots = Vec::with_capacity(orders.len());
    for (((order, lines), (customer, _, _)), span) in
        models.iter().zip(lines).zip(orders).zip(&spans)
    {
        span.record("order_id", order.id);
        span.record("correlation_id", order.id);
        let snapshot = OrderSnapshot {
            order_id: order.id,
            user_id: customer.user_id,
            user_email: customer.email.clone(),
            user_name: customer.name.clone(),
            total: order.total,
            items: lines,
        };
        starts.push((order.id.to_string(), snapshot.clone(), span.clone()));
        snapshots.push(snapshot);
    }
    let started = engine.start_many(txn, starts).await?;
    let mut placed = Vec::with_capacity(orders.len());
    for (((order, snapshot), started), span) in
        models.into_iter().zip(snapshots).zip(started).zip(&spans)
    {
        let message_id = started.message_ids.first().copied().ok_or_else(|| {
            SagaError::Corrupt("the order saga queued no OrderCreated".to_owned())
        })?;
        span.record("message_id", tracing::field::display(message_id));
        placed.push(PlacedOrder {
            order,
            snapshot,
            message_id,
            events: started.events,
        });
    }
    Ok(placed)
}

/// A row of [`insert_orders_pg`]'s statement: one per reserved line.
#[derive(Debug, sea_orm::FromQueryResult)]
struct PlacedLine {
    o: i32,
    product_id: i64,
    name: String,
    price: Decimal,
    quantity: i32,
    order_id: i64,
    total: Decimal,
}

/// The stock reservation of every order, the order rows and their item rows
/// in ONE statement (data-modifying CTEs): each product's stock is taken
/// once, for the sum of all the orders' quantities, after every product of
/// the batch is locked in id order; order ids are drawn from the sequence
/// in the orders' order. The caller rolls back when this fails.
async fn insert_orders_pg(
    txn: &DatabaseTransaction,
    orders: &[(Customer, Vec<Item>, tracing::Span)],
    max_total: Decimal,
    now: DateTime<Utc>,
) -> Result<(Vec<orders::Model>, Vec<Vec<OrderLine>>), OrderError> {
    let mut wanted = Vec::new();
    let mut ids = Vec::new();
    for (o, (customer, items, _)) in orders.iter().enumerate() {
        for (n, i) in items.iter().enumerate() {
            wanted.push(serde_json::json!({
                "o": o, "n": n, "user_id": customer.user_id,
                "product_id": i.product_id, "quantity": i.quantity,
            }));
            ids.push(i.product_id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    let lines_wanted = wanted.len();
    let sql = "WITH wanted AS (\
           SELECT * FROM jsonb_to_recordset($1::text::jsonb) \
           AS w(o int, n int, user_id bigint, product_id bigint, quantity int)), \
         need AS (SELECT product_id, SUM(quantity)::int AS quantity FROM wanted \
           GROUP BY product_id), \
         locked AS (\
           SELECT id FROM products WHERE id = ANY($2::text::bigint[]) \
           ORDER BY id FOR UPDATE), \
         reserved AS (\
           UPDATE products AS p SET stock = p.stock - d.quantity FROM need d, locked l \
           WHERE p.id = d.product_id AND l.id = d.product_id AND p.stock >= d.quantity \
           AND p.id = ANY($2::text::bigint[]) \
           RETURNING p.id, p.name, p.price), \
         lines AS (\
           SELECT w.o, w.n, w.user_id, w.product_id, w.quantity, r.name, r.price \
           FROM wanted w JOIN reserved r ON r.id = w.product_id), \
         ids AS (\
           SELECT t.o, t.user_id, t.total, \
             nextval(pg_get_serial_sequence('orders', 'id')) AS id \
           FROM (SELECT o, MIN(user_id) AS user_id, SUM(price * quantity) AS total \
             FROM lines GROUP BY o ORDER BY o) t), \
         ins AS (\
           INSERT INTO orders (id, user_id, status, total, created_at, updated_at) \
           SELECT id, user_id, $3, total, $4, $4 FROM ids ORDER BY o), \
         items AS (\
           INSERT INTO order_items (order_id, product_id, quantity, unit_price) \
           SELECT ids.id, l.product_id, l.quantity, l.price FROM lines l \
           JOIN ids ON ids.o = l.o ORDER BY l.o, l.n) \
         SELECT l.o, l.product_id, l.name, l.price, l.quantity, ids.id AS order_id, ids.total \
         FROM lines l JOIN ids ON ids.o = l.o ORDER BY l.o, l.n";
    let rows = PlacedLine::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        [
            serde_json::Value::Array(wanted).to_string().into(),
            format!(
                "{{{}}}",
                ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
            )
            .into(),
            OrderState::Pending.name().into(),
            now.into(),
        ],
    ))
    .all(txn)
    .await
    .map_err(SagaError::from)?;
    if rows.len() < lines_wanted {
        // A line not reserved: unknown, or short of stock (for all the
        // orders together).
        for (_, items, _) in orders {
            for item in items {
                if !rows.iter().any(|r| r.product_id == item.product_id) {
                    return Err(unreserved(txn, item).await);
                }
            }
        }
    }
    let mut models = Vec::with_capacity(orders.len());
    let mut lines: Vec<Vec<OrderLine>> = Vec::with_capacity(orders.len());
    for row in rows {
        let o = usize::try_from(row.o).unwrap_or(usize::MAX);
        if o == models.len() && o < orders.len() {
            // The first line of the next order (rows come by order, line).
            if row.total > max_total {
                return Err(OrderError::TotalTooLarge {
                    total: row.total,
                    max: max_total,
                });
            }
            models.push(orders::Model {
                id: row.order_id,
                user_id: orders[o].0.user_id,
                status: OrderState::Pending.name().to_owned(),
                total: row.total,
                created_at: now,
                updated_at: now,
            });
            lines.push(Vec::new());
        } else if o + 1 != models.len() {
            return Err(SagaError::Corrupt(format!("placed order {o} out of order")).into());
        }
        if let Some(order_lines) = lines.last_mut() {
            order_lines.push(OrderLine {
                product_id: row.product_id,
                product_name: row.name,
                quantity: row.quantity,
                unit_price: row.price,
            });
        }
    }
    if models.len() != orders.len() {
        return Err(SagaError::Corrupt("an order of the batch was not placed".to_owned()).into());
    }
    Ok((models, lines))
}

/// A row of [`insert_order_pg`]'s statement: one per reserved line, with
/// the order when every line was reserved within the total.
#[derive(Debug, sea_orm::FromQueryResult)]
struct ReservedLine {
    n: i32,
    product_id: i64,
    name: String,
    price: Decimal,
    quantity: i32,
    order_id: Option<i64>,
    status: Option<String>,
    total: Option<Decimal>,
    created_at: Option<DateTime<Utc>>,
}

/// The stock reservation, the order row and its item rows in ONE statement
/// (data-modifying CTEs). `locked` takes the products' row locks in id order
/// (as [`reserve_items`] does), so two orders of the same products cannot
/// deadlock; the order is inserted only if every line was reserved and the
/// total is at most `max_total`. Distinct products only.
async fn insert_order_pg(
    txn: &DatabaseTransaction,
    customer: &Customer,
    items: &[Item],
    max_total: Decimal,
    now: DateTime<Utc>,
) -> Result<(orders::Model, Vec<OrderLine>), OrderError> {
    let wanted: Vec<serde_json::Value> = items
        .iter()
        .enumerate()
        .map(|(n, i)| {
            serde_json::json!({"n": n, "product_id": i.product_id, "quantity": i.quantity})
        })
        .collect();
    let wanted = serde_json::Value::Array(wanted).to_string();
    let sql = "WITH wanted AS (\
           SELECT * FROM jsonb_to_recordset($1::text::jsonb) \
           AS w(n int, product_id bigint, quantity int)), \
         locked AS (\
           SELECT id FROM products WHERE id = ANY($7::text::bigint[]) \
           ORDER BY id FOR UPDATE), \
         reserved AS (\
           UPDATE products AS p SET stock = p.stock - w.quantity FROM wanted w, locked l \
           WHERE p.id = w.product_id AND l.id = w.product_id AND p.stock >= w.quantity \
           AND p.id = ANY($7::text::bigint[]) \
           RETURNING w.n, p.id AS product_id, p.name, p.price, w.quantity), \
         o AS (\
           INSERT INTO orders (user_id, status, total, created_at, updated_at) \
           SELECT $2, $3, SUM(r.price * r.quantity), $4, $4 FROM reserved r \
           HAVING COUNT(*) = $5 AND SUM(r.price * r.quantity) <= $6 \
           RETURNING id, status, total, created_at), \
         i AS (\
           INSERT INTO order_items (order_id, product_id, quantity, unit_price) \
           SELECT o.id, r.product_id, r.quantity, r.price FROM o, reserved r ORDER BY r.n) \
         SELECT r.n, r.product_id, r.name, r.price, r.quantity, o.id AS order_id, o.status, \
           o.total, o.created_at \
         FROM reserved r LEFT JOIN o ON true ORDER BY r.n";
    let rows = ReservedLine::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        [
            wanted.into(),
            customer.user_id.into(),
            OrderState::Pending.name().into(),
            now.into(),
            (items.len() as i64).into(),
            max_total.into(),
            // The product ids as an array too: looked up by primary key
            // (the planner cannot see how many rows the JSON holds).
            format!(
                "{{{}}}",
                items
                    .iter()
                    .map(|i| i.product_id.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )
            .into(),
        ],
    ))
    .all(txn)
    .await
    .map_err(SagaError::from)?;
    if rows.len() < items.len() {
        // The first line (in product id order, as locked) that was not
        // reserved: unknown, or short of stock.
        let mut order: Vec<&Item> = items.iter().collect();
        order.sort_by_key(|i| i.product_id);
        for item in order {
            if rows.iter().any(|r| r.product_id == item.product_id) {
                continue;
            }
            return Err(unreserved(txn, item).await);
        }
    }
    let lines: Vec<OrderLine> = rows
        .iter()
        .map(|r| OrderLine {
            product_id: r.product_id,
            product_name: r.name.clone(),
            quantity: r.quantity,
            unit_price: r.price,
        })
        .collect();
    let first = rows.first();
    match (
        first.and_then(|r| r.order_id),
        first.and_then(|r| r.status.clone()),
        first.and_then(|r| r.total),
        first.and_then(|r| r.created_at),
    ) {
        (Some(id), Some(status), Some(total), Some(created_at)) => {
            debug_assert!(rows.iter().map(|r| r.n).eq(0..items.len() as i32));
            Ok((
                orders::Model {
                    id,
                    user_id: customer.user_id,
                    status,
                    total,
                    created_at,
                    updated_at: created_at,
                },
                lines,
            ))
        }
        _ => Err(OrderError::TotalTooLarge {
            total: lines
                .iter()
                .map(|l| l.unit_price * Decimal::from(l.quantity))
                .sum(),
            max: max_total,
        }),
    }
}

/// Takes every item's quantity off its product's stock, in product id
/// order (so concurrent orders lock rows in the same order and cannot
/// deadlock), each update conditional on enough stock and returning the
/// product's name and price. Returns the lines in the items' order.
async fn reserve_items<C: ConnectionTrait>(
    txn: &C,
    items: &[Item],
) -> Result<Vec<OrderLine>, OrderError> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| items[i].product_id);
    let mut lines: Vec<Option<OrderLine>> = vec![None; items.len()];
    for i in order {
        let item = items[i];
        let reserved = products::Entity::update_many()
            .col_expr(
                products::Column::Stock,
                Expr::col(products::Column::Stock).sub(item.quantity),
            )
            .filter(products::Column::Id.eq(item.product_id))
            .filter(products::Column::Stock.gte(item.quantity))
            .exec_with_returning(txn)
            .await
            .map_err(SagaError::from)?;
        let Some(product) = reserved.into_iter().next() else {
            return Err(unreserved(txn, &item).await);
        };
        lines[i] = Some(OrderLine {
            product_id: product.id,
            product_name: product.name,
            quantity: item.quantity,
            unit_price: product.price,
        });
    }
    Ok(lines.into_iter().flatten().collect())
}

/// The order rows and the saga's start, for lines whose stock is reserved.
async fn place_reserved(
    engine: &SagaEngine<OrderSaga>,
    txn: &DatabaseTransaction,
    customer: &Customer,
    lines: Vec<OrderLine>,
) -> Result<PlacedOrder, OrderError> {
    let now = engine.clock().now();
    let total: Decimal = lines
        .iter()
        .map(|l| l.unit_price * Decimal::from(l.quantity))
        .sum();
    let order = orders::Entity::insert(orders::ActiveModel {
        user_id: Set(customer.user_id),
        status: Set(OrderState::Pending.name().to_owned()),
        total: Set(total),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    })
    .exec_with_returning(txn)
    .await
    .map_err(SagaError::from)?;
    order_items::Entity::insert_many(lines.iter().map(|l| order_items::ActiveModel {
        order_id: Set(order.id),
        product_id: Set(l.product_id),
        quantity: Set(l.quantity),
        unit_price: Set(l.unit_price),
        ..Default::default()
    }))
    .exec(txn)
    .await
    .map_err(SagaError::from)?;
    start_order(engine, txn, customer, order, lines).await
}

/// Starts the saga of an inserted order (its snapshot is the saga's data).
async fn start_order(
    engine: &SagaEngine<OrderSaga>,
    txn: &DatabaseTransaction,
    customer: &Customer,
    order: orders::Model,
    lines: Vec<OrderLine>,
) -> Result<PlacedOrder, OrderError> {
    let span = tracing::Span::current();
    span.record("order_id", order.id);
    span.record("correlation_id", order.id);
    let total = order.total;
    let snapshot = OrderSnapshot {
        order_id: order.id,
        user_id: customer.user_id,
        user_email: customer.email.clone(),
        user_name: customer.name.clone(),
        total,
        items: lines,
    };
    let started = engine
        .start(txn, &order.id.to_string(), snapshot.clone())
        .await?;
    let message_id =
        started.message_ids.first().copied().ok_or_else(|| {
            SagaError::Corrupt("the order saga queued no OrderCreated".to_owned())
        })?;
    span.record("message_id", tracing::field::display(message_id));
    Ok(PlacedOrder {
        order,
        snapshot,
        message_id,
        events: started.events,
    })
}

/// Why `item`'s stock could not be reserved: its product does not exist, or
/// has too little stock (read in the caller's transaction).
async fn unreserved<C: ConnectionTrait>(txn: &C, item: &Item) -> OrderError {
    let available = match products::Entity::find_by_id(item.product_id).one(txn).await {
        Ok(product) => product.map(|p| p.stock),
        Err(e) => return SagaError::from(e).into(),
    };
    match available {
        None => OrderError::UnknownProduct {
            product_id: item.product_id,
        },
        Some(available) => OrderError::OutOfStock {
            product_id: item.product_id,
            requested: item.quantity,
            available,
        },
    }
}

/// Takes every line's quantity off its product's stock, as
/// [`reserve_items`] does (the lines keep the names and prices they came
/// with).
async fn reserve_stock<C: ConnectionTrait>(
    conn: &C,
    lines: &[OrderLine],
) -> Result<(), OrderError> {
    let items: Vec<Item> = lines
        .iter()
        .map(|l| Item {
            product_id: l.product_id,
            quantity: l.quantity,
        })
        .collect();
    reserve_items(conn, &items).await.map(drop)
}
