use std::collections::HashMap;
use std::sync::Arc;

use ::orders::{Customer, Item, OrderError, OrderInput, OrderSaga};
use chrono::{DateTime, TimeZone, Utc};
use entity::{idempotency_keys, notifications, order_items, orders, users};
use poem::web::Data;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::types::{ParseFromJSON, ToJSON};
use poem_openapi::{ApiResponse, Object, OpenApi};
use rust_decimal::Decimal;
use saga::Saga as _;
use saga::clock::Clock;
use saga::schema::{instances, transitions};
use sea_orm::sea_query::{Expr, OnConflict, Query as SqlQuery};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect,
};

use super::auth::{BearerAuth, Caller};
use super::headers::IdempotencyKey;
use super::money::Money;
use super::notifications::NotificationView;
use super::placement::{NewOrder, Outcome};
use super::problem::ApiError;
use super::{ApiTags, AppState};

crate::required_field!(parse_product_id, "product_id", i64);
crate::required_field!(parse_quantity, "quantity", i32);
crate::required_field!(parse_items, "items", Vec<OrderItemRequest>);

/// One line of a new order.
#[derive(Object, Clone)]
#[oai(deny_unknown_fields)]
pub struct OrderItemRequest {
    /// A product id from `GET /api/products`.
    #[oai(deserialize_with = "parse_product_id", validator(minimum(value = "1")))]
    pub product_id: i64,
    #[oai(
        deserialize_with = "parse_quantity",
        validator(minimum(value = "1"), maximum(value = "1000"))
    )]
    pub quantity: i32,
}

/// Body of `POST /api/orders`. Price, total, status and owner are decided by
/// the server.
#[derive(Object)]
#[oai(deny_unknown_fields, example)]
pub struct CreateOrderRequest {
    #[oai(
        deserialize_with = "parse_items",
        validator(min_items = 1, max_items = 100)
    )]
    pub items: Vec<OrderItemRequest>,
}

impl poem_openapi::types::Example for CreateOrderRequest {
    fn example() -> Self {
        CreateOrderRequest {
            items: vec![OrderItemRequest {
                product_id: 1,
                quantity: 2,
            }],
        }
    }
}

/// An order's status.
#[derive(poem_openapi::Enum, Clone, Copy, Debug, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
pub enum OrderStatus {
    Pending,
    Processing,
    Completed,
    Expired,
}

impl OrderStatus {
    fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Processing => "processing",
            OrderStatus::Completed => "completed",
            OrderStatus::Expired => "expired",
        }
    }

    fn from_db(s: &str) -> Result<Self, ApiError> {
        Ok(match s {
            "pending" => OrderStatus::Pending,
            "processing" => OrderStatus::Processing,
            "completed" => OrderStatus::Completed,
            "expired" => OrderStatus::Expired,
            other => {
                return Err(ApiError::internal(
                    "order has an unknown status",
                    &std::io::Error::other(other.to_owned()),
                ));
            }
        })
    }
}

#[derive(Object, Clone)]
pub struct OrderItemView {
    pub product_id: i64,
    pub quantity: i32,
    /// Price of one unit when the order was placed.
    pub unit_price: Money,
}

/// An order; everything in it is decided by the server.
#[derive(Object, Clone)]
#[oai(example)]
pub struct OrderView {
    pub id: i64,
    pub user_id: i64,
    pub status: OrderStatus,
    pub total: Money,
    pub items: Vec<OrderItemView>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn example_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 24, 9, 0, 0)
        .single()
        .unwrap_or_default()
}

impl poem_openapi::types::Example for OrderView {
    fn example() -> Self {
        OrderView {
            id: 42,
            user_id: 2,
            status: OrderStatus::Pending,
            total: Money(Decimal::new(17998, 2)),
            items: vec![OrderItemView {
                product_id: 1,
                quantity: 2,
                unit_price: Money(Decimal::new(8999, 2)),
            }],
            created_at: example_time(),
            updated_at: example_time(),
        }
    }
}

/// One row of an order's journal: an input the saga was given, applied or
/// ignored.
#[derive(Object)]
#[oai(example, skip_serializing_if_is_none)]
pub struct TransitionView {
    pub id: i64,
    /// The state before (none for the row that placed the order).
    pub from_state: Option<String>,
    pub to_state: String,
    /// What was applied: `OrderPlaced`, `OrderCreated`, `PaymentDecided`,
    /// `ExpirationDue`, ...
    pub trigger: String,
    /// `applied` or `ignored`.
    pub outcome: String,
    /// The message that carried the input, when there was one.
    pub message_id: Option<String>,
    pub attempt: i32,
    /// The simulated payment's random draw, for payment decisions.
    pub payment_draw: Option<f64>,
    pub payment_approved: Option<bool>,
    pub detail: Option<String>,
    pub error: Option<String>,
    pub occurred_at: DateTime<Utc>,
}

impl poem_openapi::types::Example for TransitionView {
    fn example() -> Self {
        TransitionView {
            id: 3,
            from_state: Some("processing".into()),
            to_state: "completed".into(),
            trigger: "PaymentDecided".into(),
            outcome: "applied".into(),
            message_id: None,
            attempt: 1,
            payment_draw: Some(0.27),
            payment_approved: Some(true),
            detail: Some("payment approved".into()),
            error: None,
            occurred_at: example_time(),
        }
    }
}

impl From<transitions::Model> for TransitionView {
    fn from(t: transitions::Model) -> Self {
        // The payment draw is the order saga's `PaymentDecided` input, kept
        // as JSON in the journal.
        let payment = t
            .input
            .clone()
            .and_then(|input| serde_json::from_value::<OrderInput>(input).ok())
            .and_then(|input| match input {
                OrderInput::PaymentDecided { approved, draw } => Some((draw, approved)),
                _ => None,
            });
        Self {
            id: t.id,
            from_state: t.from_state,
            to_state: t.to_state,
            trigger: t.trigger,
            outcome: t.outcome,
            message_id: t.message_id.map(|m| m.to_string()),
            attempt: t.attempt,
            payment_draw: payment.map(|(draw, _)| draw),
            payment_approved: payment.map(|(_, approved)| approved),
            detail: t.detail,
            error: t.error,
            occurred_at: t.occurred_at,
        }
    }
}

#[derive(ApiResponse)]
pub enum CreateOrderResponse {
    /// The order was placed (`pending`); processing starts asynchronously.
    /// A retry with the same `Idempotency-Key` and body gets this same
    /// response again and places nothing new.
    #[oai(status = 201)]
    Created(Json<OrderView>),
}

#[derive(ApiResponse)]
pub enum OrderResponse {
    /// The order.
    #[oai(status = 200)]
    Ok(Json<OrderView>),
}

#[derive(ApiResponse)]
pub enum OrderListResponse {
    /// The orders, newest first.
    #[oai(status = 200)]
    Ok(Json<Vec<OrderView>>),
}

#[derive(ApiResponse)]
pub enum NotificationListResponse {
    /// The order's audit notifications, oldest first.
    #[oai(status = 200)]
    Ok(Json<Vec<NotificationView>>),
}

#[derive(ApiResponse)]
pub enum HistoryResponse {
    /// The order's journal, oldest first.
    #[oai(status = 200)]
    Ok(Json<Vec<TransitionView>>),
}

pub struct OrdersApi;

/// Views of `orders` with their items, read in one query.
async fn views<C: ConnectionTrait>(
    db: &C,
    orders: Vec<orders::Model>,
) -> Result<Vec<OrderView>, ApiError> {
    let mut items: HashMap<i64, Vec<OrderItemView>> = HashMap::new();
    for i in order_items::Entity::find()
        .filter(order_items::Column::OrderId.is_in(orders.iter().map(|o| o.id)))
        .order_by_asc(order_items::Column::Id)
        .all(db)
        .await?
    {
        items.entry(i.order_id).or_default().push(OrderItemView {
            product_id: i.product_id,
            quantity: i.quantity,
            unit_price: Money(i.unit_price),
        });
    }
    orders
        .into_iter()
        .map(|order| {
            Ok(OrderView {
                id: order.id,
                user_id: order.user_id,
                status: OrderStatus::from_db(&order.status)?,
                total: Money(order.total),
                items: items.remove(&order.id).unwrap_or_default(),
                created_at: order.created_at,
                updated_at: order.updated_at,
            })
        })
        .collect()
}

async fn view<C: ConnectionTrait>(db: &C, order: orders::Model) -> Result<OrderView, ApiError> {
    views(db, vec![order])
        .await?
        .pop()
        .ok_or_else(|| ApiError::not_found("order not found"))
}

/// The order if the caller may see it; another user's order is a 404.
async fn visible_order(
    state: &AppState,
    caller: &Caller,
    id: i64,
) -> Result<orders::Model, ApiError> {
    let order = orders::Entity::find_by_id(id).one(&state.db).await?;
    match order {
        Some(o) if o.user_id == caller.user_id || caller.is_admin() => Ok(o),
        _ => Err(ApiError::not_found(format!("order {id} not found"))),
    }
}

/// Deletes every expired idempotency key (the api runs this periodically;
/// a request also claims an expired key anew by itself).
pub async fn purge_expired_keys(db: &DatabaseConnection, now: DateTime<Utc>) -> Result<u64, DbErr> {
    Ok(idempotency_keys::Entity::delete_many()
        .filter(idempotency_keys::Column::ExpiresAt.lte(now))
        .exec(db)
        .await?
        .rows_affected)
}

/// Purges expired idempotency keys every `every` until `shutdown`.
pub async fn purge_expired_keys_until_stopped(
    db: DatabaseConnection,
    clock: Arc<dyn Clock>,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match purge_expired_keys(&db, clock.now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired idempotency keys purged"),
            Err(e) => tracing::warn!(error = %e, "could not purge expired idempotency keys"),
        }
    }
}

/// Problem type of an `Idempotency-Key` reused with a different body.
pub const KEY_REUSED: &str = "urn:order-saga:problem:idempotency-key-reused";

/// Records `key` for `user_id` with the response `view` as the last
/// statement of the transaction that placed the order: `INSERT ... ON
/// CONFLICT DO UPDATE ... WHERE` the existing row has expired (an expired
/// key is taken anew; a live one is left alone). `true` when this request
/// holds the key; `false` when an earlier request does (the caller rolls
/// back and answers [`earlier_use`]). A concurrent request holding the same
/// key makes the insert wait until that request commits (then this one
/// finds its row) or rolls back (then this one takes the key).
///
/// Recording at the end, not claiming first, saves a round trip on every
/// request; a retry of a placed order does the placing work again and
/// rolls it back.
/// The view of an order just placed, from what was written (no second
/// read).
pub(super) fn placed_view(placed: &::orders::PlacedOrder) -> Result<OrderView, ApiError> {
    let order = &placed.order;
    Ok(OrderView {
        id: order.id,
        user_id: order.user_id,
        status: OrderStatus::from_db(&order.status)?,
        total: Money(order.total),
        items: placed
            .snapshot
            .items
            .iter()
            .map(|l| OrderItemView {
                product_id: l.product_id,
                quantity: l.quantity,
                unit_price: Money(l.unit_price),
            })
            .collect(),
        created_at: order.created_at,
        updated_at: order.updated_at,
    })
}

pub(super) async fn record_key(
    txn: &DatabaseTransaction,
    user_id: i64,
    key: &str,
    fingerprint: &str,
    view: &OrderView,
    now: DateTime<Utc>,
    ttl: chrono::Duration,
) -> Result<bool, ApiError> {
    use idempotency_keys::Column as K;
    let body = view.to_json();
    let mut insert = SqlQuery::insert();
    insert
        .into_table(idempotency_keys::Entity)
        .columns([
            K::UserId,
            K::Key,
            K::RequestFingerprint,
            K::CreatedAt,
            K::ExpiresAt,
            K::ResponseStatus,
            K::ResponseBody,
            K::OrderId,
        ])
        .values([
            user_id.into(),
            key.into(),
            fingerprint.into(),
            now.into(),
            (now + ttl).into(),
            201.into(),
            body.clone().into(),
            view.id.into(),
        ])
        .map_err(|e| ApiError::internal("idempotency key row", &e))?
        .on_conflict(
            OnConflict::columns([K::UserId, K::Key])
                .values([
                    (K::RequestFingerprint, Expr::value(fingerprint)),
                    (K::CreatedAt, Expr::value(now)),
                    (K::ExpiresAt, Expr::value(now + ttl)),
                    (K::ResponseStatus, Expr::value(201)),
                    (K::ResponseBody, Expr::value(body)),
                    (K::OrderId, Expr::value(view.id)),
                ])
                .action_and_where(sea_orm::sea_query::ExprTrait::lte(
                    Expr::col((idempotency_keys::Entity, K::ExpiresAt)),
                    now,
                ))
                .to_owned(),
        );
    Ok(txn.execute(&insert).await?.rows_affected() == 1)
}

/// What an earlier request with `key` got, if one is on record and has not
/// expired: its response when `fingerprint` (the body) matches, a 409 with
/// problem type [`KEY_REUSED`] when it does not. `None` when the key is
/// free.
pub(super) async fn earlier_use<C: ConnectionTrait>(
    conn: &C,
    user_id: i64,
    key: &str,
    fingerprint: &str,
    now: DateTime<Utc>,
) -> Result<Option<OrderView>, ApiError> {
    use idempotency_keys::Column as K;
    let earlier = idempotency_keys::Entity::find()
        .filter(K::UserId.eq(user_id))
        .filter(K::Key.eq(key))
        .filter(K::ExpiresAt.gt(now))
        .one(conn)
        .await?;
    let Some(earlier) = earlier else {
        return Ok(None);
    };
    if earlier.request_fingerprint != fingerprint {
        return Err(ApiError::conflict_kind(
            KEY_REUSED,
            "this Idempotency-Key was already used with a different request body; use a new key \
             for a new order",
            "Idempotency-Key",
        ));
    }
    let stored = earlier
        .response_body
        .and_then(|body| OrderView::parse_from_json(Some(body)).ok());
    if let Some(view) = stored {
        return Ok(Some(view));
    }
    // A stored response this version cannot read: answer the order itself.
    if let Some(order_id) = earlier.order_id
        && let Some(order) = orders::Entity::find_by_id(order_id).one(conn).await?
    {
        return Ok(Some(view(conn, order).await?));
    }
    Err(ApiError::conflict(
        "a request with this Idempotency-Key is being processed; retry",
        Some("Idempotency-Key"),
    ))
}

#[OpenApi(tag = "ApiTags::Orders")]
impl OrdersApi {
    /// Place an order
    ///
    /// Stores the order as `pending`, reserves its stock and queues
    /// `OrderCreated` in one transaction. Prices come from the catalogue; the
    /// owner is the caller. Not enough stock is a 409 naming the line.
    ///
    /// **Idempotency-Key** (optional, draft-ietf-httpapi-idempotency-key-header):
    /// a retry with the same key and the same body answers the first
    /// response and places nothing new, also when the two requests race.
    /// The same key with a different body is a 409 with problem type
    /// `urn:order-saga:problem:idempotency-key-reused` (the draft suggests
    /// 422; 409 keeps 422 for bodies that break a rule). Keys belong to the
    /// caller and are forgotten after `api.idempotency_ttl_seconds` (24 h).
    /// Only successful requests are remembered: a request that failed can be
    /// retried with its key.
    #[oai(path = "/api/orders", method = "post")]
    async fn create(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        req: &poem::Request,
        /// Makes retries safe: 1-255 visible ASCII characters (for example
        /// a UUID); trailing blanks are ignored.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<IdempotencyKey>>,
        body: Json<CreateOrderRequest>,
    ) -> Result<CreateOrderResponse, ApiError> {
        let caller = auth.0;
        // poem-openapi reads a header that is not visible ASCII as absent:
        // refuse it instead of silently placing an order without a key.
        if let Some(raw) = req.headers().get("idempotency-key") {
            let visible = raw
                .as_bytes()
                .iter()
                .all(|b| matches!(b, b'!'..=b'~' | b' ' | b'\t'));
            if !visible {
                return Err(ApiError::bad_request(
                    "Idempotency-Key must be visible ASCII characters",
                    "Idempotency-Key",
                ));
            }
        }
        let idempotency_key = Header(idempotency_key.0.map(|k| k.0));
        // One line per product: repeated products are added up.
        // `origin[i]` is the request index of merged line `i` (for messages).
        let mut items: Vec<OrderItemRequest> = Vec::with_capacity(body.0.items.len());
        let mut origin: Vec<usize> = Vec::with_capacity(body.0.items.len());
        let mut positions: HashMap<i64, usize> = HashMap::new();
        for (index, item) in body.0.items.into_iter().enumerate() {
            match positions.get(&item.product_id) {
                Some(&at) => items[at].quantity += item.quantity,
                None => {
                    positions.insert(item.product_id, items.len());
                    items.push(item);
                    origin.push(index);
                }
            }
        }
        let fingerprint = serde_json::to_string(
            &items
                .iter()
                .map(|i| (i.product_id, i.quantity))
                .collect::<Vec<_>>(),
        )
        .map_err(|e| ApiError::internal("request fingerprint", &e))?;
        let now = state.clock.now();
        let key = idempotency_key.0;
        // Who places it: from the token (users cannot change their e-mail
        // or name), else (a token of an earlier version) from the database.
        let (email, name) = match (&caller.email, &caller.name) {
            (Some(email), Some(name)) => (email.clone(), name.clone()),
            _ => {
                let user = users::Entity::find_by_id(caller.user_id)
                    .one(&state.db)
                    .await?
                    .ok_or_else(|| ApiError::unauthorized("the account no longer exists"))?;
                (user.email, user.name)
            }
        };
        let customer = Customer {
            user_id: caller.user_id,
            email,
            name,
        };
        let wanted: Vec<Item> = items
            .iter()
            .map(|i| Item {
                product_id: i.product_id,
                quantity: i.quantity,
            })
            .collect();
        // The products' names and prices come back from reserving their
        // stock (row locks taken in id order there; no earlier read).
        let field_of = |product_id: i64, what: &str| {
            let index = items
                .iter()
                .position(|item| item.product_id == product_id)
                .map(|i| origin[i])
                .unwrap_or_default();
            format!("items[{index}].{what}")
        };
        let user_id = customer.user_id;
        let outcome = state
            .placer
            .place(NewOrder {
                customer,
                items: wanted,
                key,
                fingerprint,
                now,
                span: tracing::Span::current(),
            })
            .await?;
        let (view, message_id) = match outcome {
            Outcome::Created { view, message_id } => (view, message_id),
            Outcome::Replay(view) => {
                tracing::info!(order_id = view.id, "idempotent replay of an order");
                return Ok(CreateOrderResponse::Created(Json(view)));
            }
            Outcome::Rejected(e) => {
                return Err(match e {
                    // The catalogue's current state, like stock: a conflict.
                    OrderError::UnknownProduct { product_id } => ApiError::conflict(
                        format!("product {product_id} does not exist"),
                        Some(&field_of(product_id, "product_id")),
                    ),
                    OrderError::TotalTooLarge { total, max } => ApiError::unprocessable(
                        format!("the order total {total} is more than {max}"),
                        "items",
                    ),
                    OrderError::OutOfStock {
                        product_id,
                        requested,
                        available,
                    } => ApiError::conflict(
                        format!(
                            "not enough stock for product {product_id}: {requested} requested, \
                             {available} available"
                        ),
                        Some(&field_of(product_id, "quantity")),
                    ),
                    e => e.into(),
                });
            }
        };
        let span = tracing::Span::current();
        span.record("order_id", view.id);
        span.record("correlation_id", view.id);
        span.record("message_id", tracing::field::display(message_id));
        tracing::info!(
            order_id = view.id,
            correlation_id = view.id,
            message_id = %message_id,
            user_id,
            total = %view.total.0,
            "order placed"
        );
        Ok(CreateOrderResponse::Created(Json(view)))
    }

    /// List orders
    ///
    /// The caller's orders (admins: everyone's), newest first, optionally
    /// only those in one `status`; `limit` (1-100, default 50) from `offset`.
    #[oai(path = "/api/orders", method = "get")]
    async fn list(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        /// Only orders in this status.
        status: Query<Option<OrderStatus>>,
        /// How many orders to return (1-100, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<u64>>,
        /// How many orders to skip (default 0).
        #[oai(validator(minimum(value = "0"), maximum(value = "1000000")))]
        offset: Query<Option<u64>>,
    ) -> Result<OrderListResponse, ApiError> {
        let mut query = orders::Entity::find();
        if !auth.0.is_admin() {
            query = query.filter(orders::Column::UserId.eq(auth.0.user_id));
        }
        if let Some(status) = status.0 {
            query = query.filter(orders::Column::Status.eq(status.as_str()));
        }
        let found = query
            .order_by_desc(orders::Column::Id)
            .limit(limit.0.unwrap_or(50))
            .offset(offset.0.unwrap_or(0))
            .all(&state.db)
            .await?;
        Ok(OrderListResponse::Ok(Json(views(&state.db, found).await?)))
    }

    /// Get an order
    ///
    /// The caller's own order (admins: any order). Anything else is 404.
    #[oai(path = "/api/orders/:id", method = "get")]
    async fn get(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        /// The order id.
        id: Path<i64>,
    ) -> Result<OrderResponse, ApiError> {
        let order = visible_order(&state, &auth.0, id.0).await?;
        Ok(OrderResponse::Ok(Json(view(&state.db, order).await?)))
    }

    /// An order's journal
    ///
    /// Every input the order's saga was given, oldest first, with the states
    /// before and after, whether it was applied or ignored, and the payment
    /// draw. The caller's own order (admins: any); anything else is 404.
    #[oai(path = "/api/orders/:id/history", method = "get")]
    async fn history(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        /// The order id.
        id: Path<i64>,
    ) -> Result<HistoryResponse, ApiError> {
        let order = visible_order(&state, &auth.0, id.0).await?;
        // The journal of the order's saga instance (by its id: the journal's
        // index leads with it).
        let rows = transitions::Entity::find()
            .filter(
                transitions::Column::SagaInstanceId.in_subquery(
                    sea_orm::sea_query::Query::select()
                        .column(instances::Column::Id)
                        .from(instances::Entity)
                        .and_where(instances::Column::SagaType.eq(OrderSaga::TYPE))
                        .and_where(instances::Column::CorrelationId.eq(order.id.to_string()))
                        .to_owned(),
                ),
            )
            .order_by_asc(transitions::Column::Id)
            .all(&state.db)
            .await?;
        Ok(HistoryResponse::Ok(Json(
            rows.into_iter().map(TransitionView::from).collect(),
        )))
    }

    /// An order's notifications
    ///
    /// The audit trail written by the notification consumers, oldest first.
    /// The caller's own order (admins: any); anything else is 404.
    #[oai(path = "/api/orders/:id/notifications", method = "get")]
    async fn notifications(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        /// The order id.
        id: Path<i64>,
    ) -> Result<NotificationListResponse, ApiError> {
        let order = visible_order(&state, &auth.0, id.0).await?;
        let rows = notifications::Entity::find()
            .filter(notifications::Column::OrderId.eq(order.id))
            .order_by_asc(notifications::Column::Id)
            .all(&state.db)
            .await?;
        Ok(NotificationListResponse::Ok(Json(
            rows.into_iter().map(NotificationView::from).collect(),
        )))
    }
}
