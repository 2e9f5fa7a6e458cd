//! The order saga in the generic [`SagaHarness`] (feature `testing`): the
//! order tables and the saga tables on in-memory SQLite, the order saga's
//! consumer and the notifications consumer on the in-memory transport, and
//! the virtual clock.
//!
//! ```
//! use chrono::Duration;
//! use orders::definition::OrderState;
//! use orders::testing::OrderHarness;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let h = OrderHarness::builder().approve_payments(true).start().await.unwrap();
//! let order = h.place_order(2).await.unwrap();
//! h.run_until_idle().await.unwrap();
//! assert_eq!(h.order_state(order).await.unwrap(), OrderState::Processing);
//!
//! h.advance(Duration::seconds(5)).await.unwrap(); // the payment timer fires
//! assert_eq!(h.order_state(order).await.unwrap(), OrderState::Completed);
//! assert_eq!(h.published_types(&order.to_string()), ["OrderCreated", "OrderCompleted"]);
//! # });
//! ```

use std::ops::Deref;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use entity::{notifications, products, users};
use saga::SagaError;
use saga::SagaEvent as _;
use saga::engine::{ApplyProbe, EngineSettings};
use saga::testing::harness::SagaHarness;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, TransactionTrait,
};

use crate::contracts::OrderLine;
use crate::definition::{OrderEvent, OrderSaga, OrderState};
use crate::error::OrderError;
use crate::hooks::{Customer, OrderHooks, place_order};
use crate::notifications::NotificationHandler;
use crate::payment::{FixedPayment, PaymentSimulator};
use crate::topology::{NOTIFICATIONS_CONSUMER, ORDER_SAGA_CONSUMER};

/// Configures an [`OrderHarness`].
pub struct OrderHarnessBuilder {
    saga: OrderSaga,
    payment: Arc<dyn PaymentSimulator>,
    settings: Option<EngineSettings>,
    start: Option<DateTime<Utc>>,
    probe: Option<Arc<dyn ApplyProbe<OrderSaga>>>,
}

impl OrderHarnessBuilder {
    /// Every payment approved (`true`, the default) or declined.
    pub fn approve_payments(mut self, approved: bool) -> Self {
        self.payment = Arc::new(FixedPayment { approved });
        self
    }

    /// Any payment simulator (e.g. a seeded [`crate::payment::RandomPayment`]).
    pub fn payment(mut self, payment: Arc<dyn PaymentSimulator>) -> Self {
        self.payment = payment;
        self
    }

    /// The saga's timings (payment delay, processing timeout).
    pub fn saga(mut self, saga: OrderSaga) -> Self {
        self.saga = saga;
        self
    }

    /// Engine settings (retry budget, batch size).
    pub fn settings(mut self, settings: EngineSettings) -> Self {
        self.settings = Some(settings);
        self
    }

    /// The virtual clock's start.
    pub fn starting_at(mut self, start: DateTime<Utc>) -> Self {
        self.start = Some(start);
        self
    }

    /// Installs an [`ApplyProbe`] (to inject failures).
    pub fn probe(mut self, probe: Arc<dyn ApplyProbe<OrderSaga>>) -> Self {
        self.probe = Some(probe);
        self
    }

    /// Creates the database, runs the migrations and wires everything up.
    pub async fn start(self) -> Result<OrderHarness, SagaError> {
        let keys: Vec<&str> = OrderEvent::ALL.iter().map(|e| e.routing_key()).collect();
        let mut builder = SagaHarness::builder(self.saga)
            .hooks(OrderHooks::new(self.payment))
            .migrations::<migration::Migrator>()
            .consumes(
                ORDER_SAGA_CONSUMER,
                &[OrderEvent::OrderCreated.routing_key()],
            )
            .consumer(NOTIFICATIONS_CONSUMER, &keys, |db, clock, retry| {
                NotificationHandler::new(db.clone(), clock.clone(), NOTIFICATIONS_CONSUMER)
                    .with_retry_budget(retry.max_attempts)
            });
        if let Some(settings) = self.settings {
            builder = builder.settings(settings);
        }
        if let Some(start) = self.start {
            builder = builder.starting_at(start);
        }
        if let Some(probe) = self.probe {
            builder = builder.probe(probe);
        }
        Ok(OrderHarness {
            inner: builder.start().await?,
        })
    }
}

/// The order saga running in-process; everything of [`SagaHarness`] plus
/// placing orders and reading their notifications.
pub struct OrderHarness {
    inner: SagaHarness<OrderSaga>,
}

impl Deref for OrderHarness {
    type Target = SagaHarness<OrderSaga>;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl OrderHarness {
    /// A builder with approved payments, a 5 s payment delay, a 600 s
    /// processing timeout and a retry budget of 3 without backoff waits.
    pub fn builder() -> OrderHarnessBuilder {
        OrderHarnessBuilder {
            saga: OrderSaga::default(),
            payment: Arc::new(FixedPayment { approved: true }),
            settings: None,
            start: None,
            probe: None,
        }
    }

    /// Places an order of `quantity` units of the first seeded product for a
    /// new customer, as the API does. Returns the order id.
    pub async fn place_order(&self, quantity: i32) -> Result<i64, OrderError> {
        let db = self.db();
        let product = products::Entity::find()
            .order_by_asc(products::Column::Id)
            .one(db)
            .await
            .map_err(SagaError::from)?
            .ok_or_else(|| SagaError::Corrupt("no seeded product".to_owned()))?;
        let now = saga::clock::Clock::now(self.clock());
        let txn = db.begin().await.map_err(SagaError::from)?;
        let email = format!("{}@harness.test", uuid::Uuid::new_v4().simple());
        let user = users::Entity::insert(users::ActiveModel {
            name: Set("Harness".to_owned()),
            email: Set(email.clone()),
            password_hash: Set("-".to_owned()),
            role: Set("user".to_owned()),
            created_at: Set(now),
            ..Default::default()
        })
        .exec_with_returning(&txn)
        .await
        .map_err(SagaError::from)?;
        let placed = place_order(
            self.engine(),
            &txn,
            &Customer {
                user_id: user.id,
                email,
                name: user.name,
            },
            vec![OrderLine {
                product_id: product.id,
                product_name: product.name,
                quantity,
                unit_price: product.price,
            }],
        )
        .await;
        match placed {
            Ok(placed) => {
                txn.commit().await.map_err(SagaError::from)?;
                self.engine().committed(placed.events);
                Ok(placed.order.id)
            }
            Err(e) => {
                txn.rollback().await.map_err(SagaError::from)?;
                Err(e)
            }
        }
    }

    /// The order saga's current state.
    pub async fn order_state(&self, order_id: i64) -> Result<OrderState, SagaError> {
        self.inner.state(&order_id.to_string()).await
    }

    /// The order's audit notifications, oldest first.
    pub async fn notifications(
        &self,
        order_id: i64,
    ) -> Result<Vec<notifications::Model>, SagaError> {
        Ok(notifications::Entity::find()
            .filter(notifications::Column::OrderId.eq(order_id))
            .order_by_asc(notifications::Column::Id)
            .all(self.db())
            .await?)
    }
}
