//! The order saga's data and event contracts: what an instance keeps
//! (`saga_instances.data`) and what its events carry. Other services read
//! events with these types (`Envelope::payload_as::<OrderEventPayload>()`).

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// One line of an order, as the saga remembers it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// `products.id`.
    pub product_id: i64,
    /// The product's name when ordered.
    pub product_name: String,
    /// Units ordered.
    pub quantity: i32,
    /// Price of one unit when ordered.
    pub unit_price: Decimal,
}

/// What the order saga keeps about its order (`saga_instances.data`), copied
/// into every event it publishes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderSnapshot {
    /// `orders.id`.
    pub order_id: i64,
    /// Who placed it.
    pub user_id: i64,
    /// Their e-mail address.
    pub user_email: String,
    /// Their name.
    pub user_name: String,
    /// Sum of the lines.
    pub total: Decimal,
    /// The lines.
    pub items: Vec<OrderLine>,
}

/// Payload of `OrderCreated`, `OrderCompleted` and `OrderExpired`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEventPayload {
    #[serde(flatten)]
    /// The order as placed.
    pub order: OrderSnapshot,
    /// Status before the event (`None` for `OrderCreated`).
    pub previous_status: Option<String>,
    /// Status after it.
    pub status: String,
}

/// Money as the API prints it: two decimal places (`89.90`, not `89.9`).
pub fn money(amount: Decimal) -> String {
    format!("{amount:.2}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_has_two_places_like_the_api() {
        assert_eq!(money(Decimal::new(899, 1)), "89.90");
        assert_eq!(money(Decimal::new(8990, 2)), "89.90");
        assert_eq!(money(Decimal::new(5, 0)), "5.00");
        assert_eq!(money(Decimal::new(1234, 3)), "1.23");
    }
}
