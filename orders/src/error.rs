//! The order saga's own errors (the library's are [`saga::SagaError`]).

use saga::SagaError;

/// Why an order could not be placed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// Placing the order would take a product's stock below zero.
    #[error("product {product_id} has {available} in stock, {requested} requested")]
    OutOfStock {
        /// The product short of stock.
        product_id: i64,
        /// Quantity asked for.
        requested: i32,
        /// Quantity left.
        available: i32,
    },
    /// An order line names a product that does not exist.
    #[error("product {product_id} does not exist")]
    UnknownProduct {
        /// The product asked for.
        product_id: i64,
    },
    /// The order's total is above what an order may cost.
    #[error("the order total {total} is more than {max}")]
    TotalTooLarge {
        /// The order's total.
        total: rust_decimal::Decimal,
        /// The most an order may cost.
        max: rust_decimal::Decimal,
    },
    /// The engine or the database failed.
    #[error(transparent)]
    Saga(#[from] SagaError),
}
