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
    /// The engine or the database failed.
    #[error(transparent)]
    Saga(#[from] SagaError),
}
