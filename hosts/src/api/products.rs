use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use entity::products;
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use rust_decimal::Decimal;
use sea_orm::ActiveValue::{NotSet, Set};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::auth::BearerAuth;
use super::money::Money;
use super::problem::ApiError;
use super::{ApiTags, AppState};

crate::required_field!(parse_name, "name", String);
crate::required_field!(parse_price, "price", Money);
crate::required_field!(parse_stock, "stock", i32);

fn parse_description(
    value: Option<serde_json::Value>,
) -> Result<Option<String>, poem_openapi::types::ParseError<Option<String>>> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(poem_openapi::types::ParseError::custom(
            "field `description`: expected a string",
        )),
    }
}

/// A product of the catalogue.
#[derive(Object)]
#[oai(example)]
pub struct ProductView {
    pub id: i64,
    pub name: String,
    pub description: String,
    /// Unit price, a decimal with two places (sent as a string).
    pub price: Money,
    /// Units that can still be ordered; never negative.
    pub stock: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl poem_openapi::types::Example for ProductView {
    fn example() -> Self {
        let at = Utc
            .with_ymd_and_hms(2026, 11, 24, 9, 0, 0)
            .single()
            .unwrap_or_default();
        ProductView {
            id: 1,
            name: "Mechanical keyboard".into(),
            description: "Tenkeyless, brown switches".into(),
            price: Money(Decimal::new(8999, 2)),
            stock: 25,
            created_at: at,
            updated_at: at,
        }
    }
}

impl From<products::Model> for ProductView {
    fn from(p: products::Model) -> Self {
        Self {
            id: p.id,
            name: p.name,
            description: p.description,
            price: Money(p.price),
            stock: p.stock,
            created_at: p.created_at,
            updated_at: p.updated_at,
        }
    }
}

/// Body of `POST /api/products` and `PUT /api/products/{id}` (admins only).
#[derive(Object)]
#[oai(deny_unknown_fields, example)]
pub struct ProductRequest {
    /// Unique name; not blank, no NUL characters.
    #[oai(
        deserialize_with = "parse_name",
        validator(
            min_length = 1,
            max_length = 200,
            pattern = r"^[^\x00]*[^\x00-\x20][^\x00]*$"
        )
    )]
    pub name: String,
    /// Free text; empty when left out.
    #[oai(
        deserialize_with = "parse_description",
        validator(max_length = 2000, pattern = r"^[^\x00]*$")
    )]
    pub description: Option<String>,
    #[oai(deserialize_with = "parse_price")]
    pub price: Money,
    /// Units in stock, 0 or more.
    #[oai(
        deserialize_with = "parse_stock",
        validator(minimum(value = "0"), maximum(value = "1000000000"))
    )]
    pub stock: i32,
}

impl poem_openapi::types::Example for ProductRequest {
    fn example() -> Self {
        ProductRequest {
            name: "Mechanical keyboard".into(),
            description: Some("Tenkeyless, brown switches".into()),
            price: Money(Decimal::new(8999, 2)),
            stock: 25,
        }
    }
}

#[derive(ApiResponse)]
pub enum ProductListResponse {
    /// Products by id.
    #[oai(status = 200)]
    Ok(Json<Vec<ProductView>>),
}

#[derive(ApiResponse)]
pub enum ProductResponse {
    /// The product.
    #[oai(status = 200)]
    Ok(Json<ProductView>),
}

#[derive(ApiResponse)]
pub enum ProductCreatedResponse {
    /// The product was created.
    #[oai(status = 201)]
    Created(Json<ProductView>),
}

#[derive(ApiResponse)]
pub enum ProductDeletedResponse {
    /// The product was deleted.
    #[oai(status = 204)]
    Deleted,
}

pub struct ProductsApi;

fn not_found(id: i64) -> ApiError {
    ApiError::not_found(format!("product {id} not found"))
}

#[OpenApi(tag = "ApiTags::Products")]
impl ProductsApi {
    /// List products
    ///
    /// Any signed-in user. By id, `limit` (1-100, default 50) from `offset`.
    #[oai(path = "/api/products", method = "get")]
    async fn list(
        &self,
        state: Data<&Arc<AppState>>,
        _auth: BearerAuth,
        /// How many products to return (1-100, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<u64>>,
        /// How many products to skip (default 0).
        #[oai(validator(minimum(value = "0"), maximum(value = "1000000")))]
        offset: Query<Option<u64>>,
    ) -> Result<ProductListResponse, ApiError> {
        let all = products::Entity::find()
            .order_by_asc(products::Column::Id)
            .limit(limit.0.unwrap_or(50))
            .offset(offset.0.unwrap_or(0))
            .all(&state.db)
            .await?;
        Ok(ProductListResponse::Ok(Json(
            all.into_iter().map(ProductView::from).collect(),
        )))
    }

    /// Get a product
    ///
    /// Any signed-in user.
    #[oai(path = "/api/products/:id", method = "get")]
    async fn get(
        &self,
        state: Data<&Arc<AppState>>,
        _auth: BearerAuth,
        /// The product id.
        id: Path<i64>,
    ) -> Result<ProductResponse, ApiError> {
        let product = products::Entity::find_by_id(id.0)
            .one(&state.db)
            .await?
            .ok_or_else(|| not_found(id.0))?;
        Ok(ProductResponse::Ok(Json(product.into())))
    }

    /// Create a product
    ///
    /// Admins only (403 otherwise). A taken name is a 409.
    #[oai(path = "/api/products", method = "post")]
    async fn create(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        body: Json<ProductRequest>,
    ) -> Result<ProductCreatedResponse, ApiError> {
        auth.0.require_admin()?;
        let now = state.clock.now();
        let product = products::Entity::insert(active(body.0, now, NotSet))
            .exec_with_returning(&state.db)
            .await?;
        tracing::info!(
            product_id = product.id,
            by = auth.0.user_id,
            "product created"
        );
        Ok(ProductCreatedResponse::Created(Json(product.into())))
    }

    /// Replace a product
    ///
    /// Admins only (403 otherwise). Sets name, description, price and stock.
    #[oai(path = "/api/products/:id", method = "put")]
    async fn update(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        /// The product id.
        id: Path<i64>,
        body: Json<ProductRequest>,
    ) -> Result<ProductResponse, ApiError> {
        auth.0.require_admin()?;
        let now = state.clock.now();
        let mut model = active(body.0, now, NotSet);
        model.created_at = NotSet;
        let updated = products::Entity::update_many()
            .set(model)
            .filter(products::Column::Id.eq(id.0))
            .exec_with_returning(&state.db)
            .await?;
        let product = updated.into_iter().next().ok_or_else(|| not_found(id.0))?;
        tracing::info!(
            product_id = product.id,
            by = auth.0.user_id,
            "product updated"
        );
        Ok(ProductResponse::Ok(Json(product.into())))
    }

    /// Delete a product
    ///
    /// Admins only (403 otherwise). A product that orders refer to cannot be
    /// deleted (409).
    #[oai(path = "/api/products/:id", method = "delete")]
    async fn delete(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        /// The product id.
        id: Path<i64>,
    ) -> Result<ProductDeletedResponse, ApiError> {
        auth.0.require_admin()?;
        let result = products::Entity::delete_by_id(id.0).exec(&state.db).await?;
        if result.rows_affected == 0 {
            return Err(not_found(id.0));
        }
        tracing::info!(product_id = id.0, by = auth.0.user_id, "product deleted");
        Ok(ProductDeletedResponse::Deleted)
    }
}

fn active(
    body: ProductRequest,
    now: DateTime<Utc>,
    id: sea_orm::ActiveValue<i64>,
) -> products::ActiveModel {
    products::ActiveModel {
        id,
        name: Set(body
            .name
            .trim_matches(|c: char| c.is_ascii_whitespace())
            .to_owned()),
        description: Set(body.description.unwrap_or_default()),
        price: Set(body.price.0),
        stock: Set(body.stock),
        created_at: Set(now),
        updated_at: Set(now),
    }
}
