use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use entity::{notifications, order_items, orders, products, users};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use rust_decimal::Decimal;
use saga::message::OrderLine;
use saga::{Customer, OrderSagaEngine};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, TransactionTrait};

use super::auth::{BearerAuth, Caller};
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

#[derive(Object)]
pub struct OrderItemView {
    pub product_id: i64,
    pub quantity: i32,
    /// Price of one unit when the order was placed.
    pub unit_price: Decimal,
}

#[derive(Object)]
pub struct OrderView {
    pub id: i64,
    pub user_id: i64,
    /// `pending`, `processing`, `completed` or `expired`.
    pub status: String,
    pub total: Decimal,
    pub items: Vec<OrderItemView>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Object)]
pub struct NotificationView {
    pub id: i64,
    pub order_id: i64,
    /// `OrderCreated`, `OrderCompleted` or `OrderExpired`.
    pub event_type: String,
    pub message: String,
    pub is_email_sent: bool,
    pub created_at: DateTime<Utc>,
}

impl From<notifications::Model> for NotificationView {
    fn from(n: notifications::Model) -> Self {
        Self {
            id: n.id,
            order_id: n.order_id,
            event_type: n.event_type,
            message: n.message,
            is_email_sent: n.is_email_sent,
            created_at: n.created_at,
        }
    }
}

#[derive(ApiResponse)]
pub enum CreateOrderResponse {
    /// The order was placed (`pending`); processing starts asynchronously.
    #[oai(status = 201)]
    Created(Json<OrderView>),
}

#[derive(ApiResponse)]
pub enum OrderResponse {
    #[oai(status = 200)]
    Ok(Json<OrderView>),
}

#[derive(ApiResponse)]
pub enum OrderListResponse {
    /// The caller's orders, newest first.
    #[oai(status = 200)]
    Ok(Json<Vec<OrderView>>),
}

#[derive(ApiResponse)]
pub enum NotificationListResponse {
    /// The order's audit notifications, oldest first.
    #[oai(status = 200)]
    Ok(Json<Vec<NotificationView>>),
}

pub struct OrdersApi;

/// Views of `orders` with their items, read in one query.
async fn views(state: &AppState, orders: Vec<orders::Model>) -> Result<Vec<OrderView>, ApiError> {
    let mut items: HashMap<i64, Vec<OrderItemView>> = HashMap::new();
    for i in order_items::Entity::find()
        .filter(order_items::Column::OrderId.is_in(orders.iter().map(|o| o.id)))
        .order_by_asc(order_items::Column::Id)
        .all(&state.db)
        .await?
    {
        items.entry(i.order_id).or_default().push(OrderItemView {
            product_id: i.product_id,
            quantity: i.quantity,
            unit_price: i.unit_price,
        });
    }
    Ok(orders
        .into_iter()
        .map(|order| OrderView {
            id: order.id,
            user_id: order.user_id,
            status: order.status,
            total: order.total,
            items: items.remove(&order.id).unwrap_or_default(),
            created_at: order.created_at,
            updated_at: order.updated_at,
        })
        .collect())
}

async fn view(state: &AppState, order: orders::Model) -> Result<OrderView, ApiError> {
    views(state, vec![order])
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

#[OpenApi]
impl OrdersApi {
    /// Place an order
    ///
    /// Stores the order as `pending` and queues `OrderCreated` in the same
    /// transaction. Prices come from the catalogue; the owner is the caller.
    #[oai(path = "/api/orders", method = "post", tag = "ApiTags::Orders")]
    async fn create(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        body: Json<CreateOrderRequest>,
    ) -> Result<CreateOrderResponse, ApiError> {
        let caller = auth.0;
        let items = body.0.items;
        let mut seen = HashSet::new();
        for (i, item) in items.iter().enumerate() {
            if !seen.insert(item.product_id) {
                return Err(ApiError::unprocessable(
                    format!(
                        "product {} appears more than once; put the whole quantity on one line",
                        item.product_id
                    ),
                    &format!("items[{i}].product_id"),
                ));
            }
        }
        let now = state.clock.now();
        let txn = state.db.begin().await?;
        let user = users::Entity::find_by_id(caller.user_id)
            .one(&txn)
            .await?
            .ok_or_else(|| ApiError::unauthorized("the account no longer exists"))?;
        let ids: Vec<i64> = items.iter().map(|i| i.product_id).collect();
        let catalogue: HashMap<i64, products::Model> = products::Entity::find()
            .filter(products::Column::Id.is_in(ids))
            .lock_shared()
            .all(&txn)
            .await?
            .into_iter()
            .map(|p| (p.id, p))
            .collect();
        let mut lines = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let Some(product) = catalogue.get(&item.product_id) else {
                return Err(ApiError::unprocessable(
                    format!("product {} does not exist", item.product_id),
                    &format!("items[{i}].product_id"),
                ));
            };
            lines.push(OrderLine {
                product_id: product.id,
                product_name: product.name.clone(),
                quantity: item.quantity,
                unit_price: product.price,
            });
        }
        let customer = Customer {
            user_id: user.id,
            email: user.email,
            name: user.name,
        };
        let placed = match OrderSagaEngine::place_order(&txn, now, &customer, lines).await {
            Ok(placed) => placed,
            Err(saga::SagaError::OutOfStock {
                product_id,
                requested,
                available,
            }) => {
                txn.rollback().await?;
                let index = items
                    .iter()
                    .position(|item| item.product_id == product_id)
                    .unwrap_or_default();
                return Err(ApiError::conflict(
                    format!(
                        "not enough stock for product {product_id}: {requested} requested, \
                         {available} available"
                    ),
                    Some(&format!("items[{index}].quantity")),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let (order, message_id, total) = (placed.order, placed.message_id, placed.snapshot.total);
        txn.commit().await?;
        state.outbox_signal.notify_one();
        tracing::info!(
            order_id = order.id,
            message_id = %message_id,
            user_id = customer.user_id,
            total = %total,
            "order placed"
        );
        Ok(CreateOrderResponse::Created(Json(
            view(&state, order).await?,
        )))
    }

    /// List the caller's orders
    ///
    /// Newest first, at most `limit` (default 50, at most 100).
    #[oai(path = "/api/orders", method = "get", tag = "ApiTags::Orders")]
    async fn list(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))] limit: Query<Option<u64>>,
    ) -> Result<OrderListResponse, ApiError> {
        let mut query = orders::Entity::find();
        if !auth.0.is_admin() {
            query = query.filter(orders::Column::UserId.eq(auth.0.user_id));
        }
        let found = query
            .order_by_desc(orders::Column::Id)
            .limit(limit.0.unwrap_or(50))
            .all(&state.db)
            .await?;
        Ok(OrderListResponse::Ok(Json(views(&state, found).await?)))
    }

    /// Get an order
    ///
    /// The caller's own order (admins: any order). Anything else is 404.
    #[oai(path = "/api/orders/:id", method = "get", tag = "ApiTags::Orders")]
    async fn get(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        id: Path<i64>,
    ) -> Result<OrderResponse, ApiError> {
        let order = visible_order(&state, &auth.0, id.0).await?;
        Ok(OrderResponse::Ok(Json(view(&state, order).await?)))
    }

    /// An order's notifications
    ///
    /// The audit trail written by the notification consumers, oldest first.
    #[oai(
        path = "/api/orders/:id/notifications",
        method = "get",
        tag = "ApiTags::Orders"
    )]
    async fn notifications(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
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
