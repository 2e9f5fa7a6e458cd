//! The shipment saga's effectful half, run by the engine inside its
//! transaction (whatever a hook writes commits or rolls back with the
//! transition):
//!
//! - the `allocate` timer fires: take the stock off `shipment_stock` and
//!   record the allocation, or report the attempt as failed;
//! - the compensation `ReleaseAllocation`: give the stock back, once;
//! - before a state-timeout batch: lock the stock rows it will give back to,
//!   in SKU order, so two sweepers (or a sweeper and a cancellation) cannot
//!   deadlock.

use async_trait::async_trait;
use saga::SagaError;
use saga::hooks::{HookContext, Hooks};
use sea_orm::sea_query::{Expr, ExprTrait as _, LockType, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use uuid::Uuid;

use crate::definition::{ShipmentEffect, ShipmentInput, ShipmentSaga, ShipmentTimer};
use crate::schema::{allocations, stock};

/// The shipment saga's hooks (they keep nothing: everything is in the
/// example's tables).
#[derive(Clone, Copy, Debug, Default)]
pub struct ShipmentHooks;

#[async_trait]
impl Hooks<ShipmentSaga> for ShipmentHooks {
    /// The `allocate` timer fired: the stock decides.
    async fn timer_input(
        &self,
        cx: &HookContext<'_, ShipmentSaga>,
        timer: &ShipmentTimer,
    ) -> Result<ShipmentInput, SagaError> {
        match *timer {
            ShipmentTimer::Allocate { attempt } => {
                let allocated = allocate(cx).await?;
                tracing::info!(
                    shipment = cx.correlation_id,
                    sku = %cx.data.sku,
                    quantity = cx.data.quantity,
                    attempt,
                    allocated,
                    "allocation attempt"
                );
                Ok(if allocated {
                    ShipmentInput::Allocated
                } else {
                    ShipmentInput::AllocationFailed { attempt }
                })
            }
        }
    }

    async fn effect(
        &self,
        cx: &HookContext<'_, ShipmentSaga>,
        effect: &ShipmentEffect,
    ) -> Result<(), SagaError> {
        match effect {
            ShipmentEffect::ReleaseAllocation => release(cx).await,
        }
    }

    async fn prepare_batch(
        &self,
        txn: &DatabaseTransaction,
        correlation_ids: &[String],
    ) -> Result<(), SagaError> {
        let ids: Vec<Uuid> = correlation_ids
            .iter()
            .filter_map(|id| Uuid::parse_str(id).ok())
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        stock::Entity::find()
            .select_only()
            .column(stock::Column::Sku)
            .filter(
                stock::Column::Sku.in_subquery(
                    Query::select()
                        .column(allocations::Column::Sku)
                        .from(allocations::Entity)
                        .and_where(allocations::Column::ShipmentId.is_in(ids))
                        .to_owned(),
                ),
            )
            .order_by_asc(stock::Column::Sku)
            .lock(LockType::Update)
            .into_tuple::<String>()
            .all(txn)
            .await?;
        Ok(())
    }
}

/// The shipment's id: its correlation id, a UUID ([`ShipmentSaga`]'s
/// `route` refuses anything else).
fn shipment_id(cx: &HookContext<'_, ShipmentSaga>) -> Result<Uuid, SagaError> {
    Uuid::parse_str(cx.correlation_id)
        .map_err(|e| SagaError::Corrupt(format!("shipment id `{}`: {e}", cx.correlation_id)))
}

/// Sets the shipment's stock aside: `true` when the shipment holds its
/// allocation afterwards, `false` when there was too little stock. A
/// shipment is allocated at most once: an existing allocation (even a
/// released one) is never taken again.
async fn allocate(cx: &HookContext<'_, ShipmentSaga>) -> Result<bool, SagaError> {
    let id = shipment_id(cx)?;
    if allocations::Entity::find_by_id(id)
        .one(cx.txn)
        .await?
        .is_some()
    {
        return Ok(true);
    }
    let quantity = cx.data.quantity;
    // Conditional: only when enough is left (the row lock orders
    // concurrent allocations of one SKU).
    let taken = stock::Entity::update_many()
        .col_expr(
            stock::Column::Available,
            Expr::col(stock::Column::Available).sub(quantity),
        )
        .filter(stock::Column::Sku.eq(cx.data.sku.as_str()))
        .filter(stock::Column::Available.gte(quantity))
        .exec(cx.txn)
        .await?;
    if taken.rows_affected != 1 {
        return Ok(false);
    }
    allocations::Entity::insert(allocations::ActiveModel {
        shipment_id: Set(id),
        sku: Set(cx.data.sku.clone()),
        quantity: Set(quantity),
        allocated_at: Set(cx.now),
        released_at: Set(None),
    })
    .exec(cx.txn)
    .await?;
    Ok(true)
}

/// The compensation: marks the allocation released and gives its stock
/// back, both only if it was not released before (so a second call changes
/// nothing).
async fn release(cx: &HookContext<'_, ShipmentSaga>) -> Result<(), SagaError> {
    let id = shipment_id(cx)?;
    let allocation = allocations::Entity::find_by_id(id)
        .one(cx.txn)
        .await?
        .ok_or_else(|| SagaError::Effect(format!("shipment {id} has no allocation to release")))?;
    let released = allocations::Entity::update_many()
        .col_expr(allocations::Column::ReleasedAt, Expr::value(cx.now))
        .filter(allocations::Column::ShipmentId.eq(id))
        .filter(allocations::Column::ReleasedAt.is_null())
        .exec(cx.txn)
        .await?;
    if released.rows_affected == 1 {
        stock::Entity::update_many()
            .col_expr(
                stock::Column::Available,
                Expr::col(stock::Column::Available).add(allocation.quantity),
            )
            .filter(stock::Column::Sku.eq(allocation.sku.as_str()))
            .exec(cx.txn)
            .await?;
        tracing::info!(
            shipment = %id,
            sku = %allocation.sku,
            quantity = allocation.quantity,
            "allocation released"
        );
    }
    Ok(())
}
