//! Every error is RFC 9457 problem details JSON: a machine-readable `type`, a
//! `title`, the `status`, a human `detail` naming the field or rule, and the
//! `field` itself when one is to blame.

use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};

#[derive(Object, Debug, Clone, PartialEq, serde::Serialize)]
#[oai(example)]
pub struct Problem {
    /// A stable identifier of the kind of problem.
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request, naming the field or rule.
    pub detail: String,
    /// The request field at fault, when there is one (e.g. `items[0].quantity`).
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl poem_openapi::types::Example for Problem {
    fn example() -> Self {
        Problem {
            kind: "urn:order-saga:problem:bad-request".into(),
            title: "Bad request".into(),
            status: 400,
            detail: "field `quantity`: verification failed. minimum(1, exclusive: false)".into(),
            field: Some("items[0].quantity".into()),
        }
    }
}

fn kind_for(status: StatusCode) -> (&'static str, &'static str) {
    match status.as_u16() {
        400 => ("urn:order-saga:problem:bad-request", "Bad request"),
        401 => ("urn:order-saga:problem:unauthorized", "Unauthorized"),
        403 => ("urn:order-saga:problem:forbidden", "Forbidden"),
        404 => ("urn:order-saga:problem:not-found", "Not found"),
        405 => (
            "urn:order-saga:problem:method-not-allowed",
            "Method not allowed",
        ),
        409 => ("urn:order-saga:problem:conflict", "Conflict"),
        413 => (
            "urn:order-saga:problem:payload-too-large",
            "Payload too large",
        ),
        415 => (
            "urn:order-saga:problem:unsupported-media-type",
            "Unsupported media type",
        ),
        422 => ("urn:order-saga:problem:validation", "Unprocessable request"),
        429 => ("urn:order-saga:problem:rate-limited", "Too many requests"),
        503 => ("urn:order-saga:problem:unavailable", "Service unavailable"),
        s if s >= 500 => ("urn:order-saga:problem:internal", "Internal server error"),
        _ => ("urn:order-saga:problem:client-error", "Request error"),
    }
}

impl Problem {
    pub fn new(status: StatusCode, detail: impl Into<String>, field: Option<&str>) -> Self {
        let (kind, title) = kind_for(status);
        Self {
            kind: kind.into(),
            title: title.into(),
            status: status.as_u16(),
            detail: detail.into(),
            field: field.map(str::to_owned),
        }
    }

    pub fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        Response::builder()
            .status(status)
            .content_type("application/problem+json")
            .body(body)
    }
}

/// The error half of every operation's result.
#[derive(ApiResponse, Debug)]
pub enum ApiError {
    /// The request could not be read: malformed JSON, a missing or unknown
    /// field, or a value outside its documented range.
    #[oai(status = 400, content_type = "application/problem+json")]
    BadRequest(Json<Problem>),
    /// Missing, invalid or expired bearer token, or wrong credentials.
    #[oai(status = 401, content_type = "application/problem+json")]
    Unauthorized(Json<Problem>),
    /// Signed in, but the operation needs the `admin` role.
    #[oai(status = 403, content_type = "application/problem+json")]
    Forbidden(Json<Problem>),
    /// No such resource visible to the caller.
    #[oai(status = 404, content_type = "application/problem+json")]
    NotFound(Json<Problem>),
    /// The request conflicts with existing data (e.g. the e-mail is taken,
    /// not enough stock, an unknown product, a product still referenced by
    /// orders, an `Idempotency-Key` reused with a different body).
    #[oai(status = 409, content_type = "application/problem+json")]
    Conflict(Json<Problem>),
    /// The request body is larger than `api.body_limit_bytes` (64 KiB).
    #[oai(status = 413, content_type = "application/problem+json")]
    PayloadTooLarge(Json<Problem>),
    /// The body is not `application/json`.
    #[oai(status = 415, content_type = "application/problem+json")]
    UnsupportedMediaType(Json<Problem>),
    /// Well-formed but breaks a rule (e.g. an order total above the largest
    /// amount, a database check).
    #[oai(status = 422, content_type = "application/problem+json")]
    Unprocessable(Json<Problem>),
    /// Too many login attempts; retry after `Retry-After` seconds.
    #[oai(status = 429, content_type = "application/problem+json")]
    TooManyRequests(
        Json<Problem>,
        /// Seconds to wait before trying again.
        #[oai(header = "Retry-After")]
        u64,
    ),
    /// Something failed on our side; the detail is deliberately vague.
    #[oai(status = 500, content_type = "application/problem+json")]
    Internal(Json<Problem>),
}

impl ApiError {
    pub fn bad_request(detail: impl Into<String>, field: &str) -> Self {
        Self::BadRequest(Json(Problem::new(
            StatusCode::BAD_REQUEST,
            detail,
            Some(field),
        )))
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::Unauthorized(Json(Problem::new(StatusCode::UNAUTHORIZED, detail, None)))
    }
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::Forbidden(Json(Problem::new(StatusCode::FORBIDDEN, detail, None)))
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::NotFound(Json(Problem::new(StatusCode::NOT_FOUND, detail, None)))
    }
    pub fn conflict(detail: impl Into<String>, field: Option<&str>) -> Self {
        Self::Conflict(Json(Problem::new(StatusCode::CONFLICT, detail, field)))
    }
    pub fn unprocessable(detail: impl Into<String>, field: &str) -> Self {
        Self::Unprocessable(Json(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            detail,
            Some(field),
        )))
    }
    /// A 409 with its own problem `type` (e.g. an idempotency key reused).
    pub fn conflict_kind(kind: &str, detail: impl Into<String>, field: &str) -> Self {
        let mut problem = Problem::new(StatusCode::CONFLICT, detail, Some(field));
        problem.kind = kind.to_owned();
        Self::Conflict(Json(problem))
    }
    pub fn too_many_requests(detail: impl Into<String>, retry_after_seconds: u64) -> Self {
        Self::TooManyRequests(
            Json(Problem::new(StatusCode::TOO_MANY_REQUESTS, detail, None)),
            retry_after_seconds,
        )
    }
    /// Logs the cause with its chain; answers an opaque 500.
    pub fn internal(context: &str, error: &dyn std::error::Error) -> Self {
        tracing::error!(error = %error, source = ?error.source(), "{context}");
        Self::Internal(Json(Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "an internal error occurred; it has been logged",
            None,
        )))
    }
}

/// A constraint violation reported by PostgreSQL: its SQLSTATE and name.
pub fn constraint_violation(e: &sea_orm::DbErr) -> Option<(String, String)> {
    use sea_orm::{DbErr, RuntimeErr};
    let (DbErr::Exec(RuntimeErr::SqlxError(inner)) | DbErr::Query(RuntimeErr::SqlxError(inner))) =
        e
    else {
        return None;
    };
    let sea_orm::sqlx::Error::Database(db) = inner.as_ref() else {
        return None;
    };
    let code = db.code()?.into_owned();
    if !(code.starts_with("23") || code.starts_with("22")) {
        return None;
    }
    Some((code, db.constraint().unwrap_or_default().to_owned()))
}

/// Named constraints and the request field and message they stand for.
fn constraint_rule(name: &str) -> Option<(&'static str, &'static str)> {
    use migration::constraints as c;
    Some(match name {
        c::USERS_EMAIL_KEY => ("email", "a user with this e-mail already exists"),
        c::PRODUCTS_NAME_KEY => ("name", "a product with this name already exists"),
        c::PRODUCTS_STOCK_CHECK => ("stock", "stock must not be negative"),
        c::PRODUCTS_PRICE_CHECK => ("price", "price must not be negative"),
        c::ORDER_ITEMS_QUANTITY_CHECK => ("quantity", "quantity must be positive"),
        "fk_order_items_product" => (
            "id",
            "the product is referenced by orders and cannot be deleted",
        ),
        _ => return None,
    })
}

impl From<sea_orm::DbErr> for ApiError {
    /// Named constraint violations become 409 (unique, foreign key) or 422
    /// (check, not null); data exceptions (SQLSTATE class 22: NUL in text,
    /// numeric overflow) 400; anything else is an opaque 500.
    fn from(e: sea_orm::DbErr) -> Self {
        if let Some((code, name)) = constraint_violation(&e) {
            let (field, message) = constraint_rule(&name).unwrap_or(("", ""));
            let field = (!field.is_empty()).then_some(field);
            let detail = if message.is_empty() {
                format!("the request breaks the rule `{name}`")
            } else {
                format!("{message} (rule `{name}`)")
            };
            if code.starts_with("22") {
                // A data exception: text with a NUL character, a number out of
                // range. The value is not echoed.
                return ApiError::BadRequest(Json(Problem::new(
                    StatusCode::BAD_REQUEST,
                    format!("a value in the request cannot be stored (SQLSTATE {code})"),
                    None,
                )));
            }
            match code.as_str() {
                "23505" | "23503" => return ApiError::conflict(detail, field),
                "23514" | "23502" => {
                    return ApiError::Unprocessable(Json(Problem::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        detail,
                        field,
                    )));
                }
                _ => {}
            }
        }
        ApiError::internal("database error", &e)
    }
}

impl From<saga::SagaError> for ApiError {
    fn from(e: saga::SagaError) -> Self {
        match e {
            saga::SagaError::Db(db) => db.into(),
            e => ApiError::internal("saga error", &e),
        }
    }
}

impl From<::orders::OrderError> for ApiError {
    fn from(e: ::orders::OrderError) -> Self {
        match e {
            ::orders::OrderError::Saga(e) => e.into(),
            e => ApiError::internal("order error", &e),
        }
    }
}

/// Renders any error that did not come from an operation's own `ApiError`
/// (unknown route, wrong method, unreadable body, bad token) as problem JSON.
pub async fn render_error(err: poem::Error) -> Response {
    if err.is_from_response() {
        return err.into_response();
    }
    let status = err.status();
    let detail = if status.is_server_error() {
        tracing::error!(error = %err, "unhandled server error");
        "an internal error occurred; it has been logged".to_owned()
    } else if status == StatusCode::UNAUTHORIZED {
        "missing or malformed bearer token: log in with POST /api/auth/login and send \
         `Authorization: Bearer <token>`"
            .to_owned()
    } else {
        err.to_string()
    };
    let field = err
        .downcast_ref::<poem_openapi::error::ParseParamError>()
        .map(|e| e.name);
    let mut response = Problem::new(status, detail, field).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            "www-authenticate",
            poem::http::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// An error a security checker returns (rendered by `render_error`).
pub fn auth_error(detail: &str) -> poem::Error {
    poem::Error::from_response(
        Problem::new(StatusCode::UNAUTHORIZED, detail, None)
            .into_response()
            .with_header("www-authenticate", "Bearer")
            .into_response(),
    )
}

/// Whether `T` is sent as a JSON string.
pub fn is_string_schema<T: poem_openapi::types::Type>() -> bool {
    matches!(T::schema_ref(), poem_openapi::registry::MetaSchemaRef::Inline(s) if s.ty == "string")
}

/// Defines a parser for a required request field whose error names the field
/// (poem-openapi's own message only names the enclosing object). Use with
/// `#[oai(deserialize_with = "...")]`.
#[macro_export]
macro_rules! required_field {
    ($parser:ident, $field:literal, $ty:ty) => {
        fn $parser(
            value: Option<serde_json::Value>,
        ) -> Result<$ty, poem_openapi::types::ParseError<$ty>> {
            match value {
                None | Some(serde_json::Value::Null) => {
                    Err(poem_openapi::types::ParseError::custom(concat!(
                        "field `",
                        $field,
                        "` is required"
                    )))
                }
                // poem-openapi would read `false` or `5` as the string "false"
                // or "5"; a string field takes only a JSON string.
                Some(ref v)
                    if !v.is_string() && $crate::api::problem::is_string_schema::<$ty>() =>
                {
                    Err(poem_openapi::types::ParseError::custom(concat!(
                        "field `",
                        $field,
                        "`: expected a string"
                    )))
                }
                value => <$ty as poem_openapi::types::ParseFromJSON>::parse_from_json(value)
                    .map_err(|e| {
                        poem_openapi::types::ParseError::custom(format!(
                            "field `{}`: {}",
                            $field,
                            e.into_message()
                        ))
                    }),
            }
        }
    };
}
