//! The order domain's gauge: orders by status (the saga library's own
//! metrics, labelled by saga type, are in `saga::metrics`).

use entity::orders;
use saga::SagaError;
use saga::SagaState as _;
use sea_orm::sea_query::{Expr, Func};
use sea_orm::{ConnectionTrait, EntityTrait, QuerySelect};

use crate::definition::OrderState;

/// Gauge: orders by `status` (whole database, computed at scrape).
pub const ORDERS: &str = "saga_orders";

/// Describes the gauge (call once after installing a recorder).
pub fn describe() {
    metrics::describe_gauge!(ORDERS, "Orders by status (whole database)");
}

/// Orders per status, for every status (0 included).
pub async fn orders_by_status<C: ConnectionTrait>(
    db: &C,
) -> Result<Vec<(OrderState, u64)>, SagaError> {
    let counted: Vec<(String, i64)> = orders::Entity::find()
        .select_only()
        .column(orders::Column::Status)
        .column_as(Expr::from(Func::count(Expr::col(orders::Column::Id))), "n")
        .group_by(orders::Column::Status)
        .into_tuple()
        .all(db)
        .await?;
    Ok(OrderState::ALL
        .iter()
        .map(|&state| {
            let n = counted
                .iter()
                .find(|(status, _)| status == state.name())
                .map_or(0, |(_, n)| u64::try_from(*n).unwrap_or(0));
            (state, n)
        })
        .collect())
}

/// Sets the gauge.
pub fn record(orders: &[(OrderState, u64)]) {
    for (state, n) in orders {
        metrics::gauge!(ORDERS, "status" => state.name()).set(*n as f64);
    }
}
