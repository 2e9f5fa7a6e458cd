use std::sync::Arc;

use chrono::{DateTime, Utc};
use entity::products;
use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use rust_decimal::Decimal;
use sea_orm::{EntityTrait, QueryOrder};

use super::problem::ApiError;
use super::{ApiTags, AppState};

#[derive(Object)]
pub struct ProductView {
    pub id: i64,
    pub name: String,
    pub description: String,
    /// Unit price, a decimal with two places (sent as a string).
    pub price: Decimal,
    pub stock: i32,
    pub created_at: DateTime<Utc>,
}

impl From<products::Model> for ProductView {
    fn from(p: products::Model) -> Self {
        Self {
            id: p.id,
            name: p.name,
            description: p.description,
            price: p.price,
            stock: p.stock,
            created_at: p.created_at,
        }
    }
}

#[derive(ApiResponse)]
pub enum ProductListResponse {
    /// Every product, by id.
    #[oai(status = 200)]
    Ok(Json<Vec<ProductView>>),
}

pub struct ProductsApi;

#[OpenApi]
impl ProductsApi {
    /// List products
    #[oai(path = "/api/products", method = "get", tag = "ApiTags::Products")]
    async fn list(&self, state: Data<&Arc<AppState>>) -> Result<ProductListResponse, ApiError> {
        let all = products::Entity::find()
            .order_by_asc(products::Column::Id)
            .all(&state.db)
            .await?;
        Ok(ProductListResponse::Ok(Json(
            all.into_iter().map(ProductView::from).collect(),
        )))
    }
}
