//! The audit notifications (read-only): written by the runner's notification
//! consumers, one per order and event type.

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use entity::notifications;
use poem::web::Data;
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::auth::BearerAuth;
use super::problem::ApiError;
use super::{ApiTags, AppState};

/// The order events that leave a notification.
#[derive(poem_openapi::Enum, Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // the event names themselves
pub enum EventType {
    #[oai(rename = "OrderCreated")]
    OrderCreated,
    #[oai(rename = "OrderCompleted")]
    OrderCompleted,
    #[oai(rename = "OrderExpired")]
    OrderExpired,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::OrderCreated => "OrderCreated",
            EventType::OrderCompleted => "OrderCompleted",
            EventType::OrderExpired => "OrderExpired",
        }
    }
}

/// An audit row: what happened to an order, and whether an e-mail went out.
#[derive(Object)]
#[oai(example)]
pub struct NotificationView {
    pub id: i64,
    pub order_id: i64,
    /// The order's owner.
    pub user_id: i64,
    /// `OrderCreated`, `OrderCompleted` or `OrderExpired`.
    pub event_type: String,
    pub message: String,
    pub is_email_sent: bool,
    pub created_at: DateTime<Utc>,
}

impl poem_openapi::types::Example for NotificationView {
    fn example() -> Self {
        NotificationView {
            id: 7,
            order_id: 42,
            user_id: 2,
            event_type: "OrderCompleted".into(),
            message: "Order 42 completed: total 179.98".into(),
            is_email_sent: true,
            created_at: Utc
                .with_ymd_and_hms(2026, 11, 24, 9, 0, 5)
                .single()
                .unwrap_or_default(),
        }
    }
}

impl From<notifications::Model> for NotificationView {
    fn from(n: notifications::Model) -> Self {
        Self {
            id: n.id,
            order_id: n.order_id,
            user_id: n.user_id,
            event_type: n.event_type,
            message: n.message,
            is_email_sent: n.is_email_sent,
            created_at: n.created_at,
        }
    }
}

#[derive(ApiResponse)]
pub enum NotificationsResponse {
    /// Notifications, newest first.
    #[oai(status = 200)]
    Ok(Json<Vec<NotificationView>>),
}

pub struct NotificationsApi;

#[OpenApi(tag = "ApiTags::Notifications")]
impl NotificationsApi {
    /// List notifications
    ///
    /// The caller's notifications (admins: everyone's), newest first,
    /// optionally of one order and/or one event type; `limit` (1-100,
    /// default 50) from `offset`. Read-only: notifications are written by
    /// the system.
    #[oai(path = "/api/notifications", method = "get")]
    async fn list(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        /// Only notifications of this order.
        order_id: Query<Option<i64>>,
        /// Only notifications of this event type.
        event_type: Query<Option<EventType>>,
        /// How many notifications to return (1-100, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<u64>>,
        /// How many notifications to skip (default 0).
        #[oai(validator(minimum(value = "0"), maximum(value = "1000000")))]
        offset: Query<Option<u64>>,
    ) -> Result<NotificationsResponse, ApiError> {
        let mut query = notifications::Entity::find();
        if !auth.0.is_admin() {
            query = query.filter(notifications::Column::UserId.eq(auth.0.user_id));
        }
        if let Some(order_id) = order_id.0 {
            query = query.filter(notifications::Column::OrderId.eq(order_id));
        }
        if let Some(event_type) = event_type.0 {
            query = query.filter(notifications::Column::EventType.eq(event_type.as_str()));
        }
        let rows = query
            .order_by_desc(notifications::Column::Id)
            .limit(limit.0.unwrap_or(50))
            .offset(offset.0.unwrap_or(0))
            .all(&state.db)
            .await?;
        Ok(NotificationsResponse::Ok(Json(
            rows.into_iter().map(NotificationView::from).collect(),
        )))
    }
}
