use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use entity::users;
use poem::web::Data;
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, SqlErr,
};

use super::auth::{self, BearerAuth};
use super::problem::ApiError;
use super::{ApiTags, AppState};

/// A hash to verify against when the e-mail is unknown (timing equaliser).
static DUMMY_HASH: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

crate::required_field!(parse_name, "name", String);
crate::required_field!(parse_email, "email", String);
crate::required_field!(parse_password, "password", String);

/// Body of `POST /api/users`.
#[derive(Object)]
#[oai(deny_unknown_fields, example)]
pub struct RegisterRequest {
    /// Display name.
    #[oai(
        deserialize_with = "parse_name",
        validator(
            min_length = 1,
            max_length = 200,
            pattern = r"^[^\x00]*[^\x00-\x20][^\x00]*$"
        )
    )]
    pub name: String,
    /// E-mail address; used to log in. Case-insensitive.
    #[oai(
        deserialize_with = "parse_email",
        validator(
            min_length = 3,
            max_length = 320,
            pattern = r"^[^@\x00-\x20]+@[^@\x00-\x20]+$"
        )
    )]
    pub email: String,
    /// At least 8 characters.
    #[oai(
        deserialize_with = "parse_password",
        validator(min_length = 8, max_length = 128)
    )]
    pub password: String,
}

impl poem_openapi::types::Example for RegisterRequest {
    fn example() -> Self {
        RegisterRequest {
            name: "Ada Lovelace".into(),
            email: "ada@example.com".into(),
            password: "correct horse battery".into(),
        }
    }
}

/// Body of `POST /api/auth/login`.
#[derive(Object)]
#[oai(deny_unknown_fields, example)]
pub struct LoginRequest {
    #[oai(
        deserialize_with = "parse_email",
        validator(min_length = 1, max_length = 320, pattern = r"^[^\x00]+$")
    )]
    pub email: String,
    #[oai(
        deserialize_with = "parse_password",
        validator(min_length = 1, max_length = 128)
    )]
    pub password: String,
}

impl poem_openapi::types::Example for LoginRequest {
    fn example() -> Self {
        LoginRequest {
            email: "ada@example.com".into(),
            password: "correct horse battery".into(),
        }
    }
}

/// A user account (never includes the password hash).
#[derive(Object)]
#[oai(example)]
pub struct UserView {
    pub id: i64,
    pub name: String,
    pub email: String,
    /// `user` or `admin`.
    pub role: String,
    pub created_at: DateTime<Utc>,
}

fn example_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 24, 9, 0, 0)
        .single()
        .unwrap_or_default()
}

impl poem_openapi::types::Example for UserView {
    fn example() -> Self {
        UserView {
            id: 2,
            name: "Ada Lovelace".into(),
            email: "ada@example.com".into(),
            role: "user".into(),
            created_at: example_time(),
        }
    }
}

impl From<users::Model> for UserView {
    fn from(u: users::Model) -> Self {
        Self {
            id: u.id,
            name: u.name,
            email: u.email,
            role: u.role,
            created_at: u.created_at,
        }
    }
}

/// A bearer token for the `Authorization` header.
#[derive(Object)]
#[oai(example)]
pub struct TokenView {
    /// The JWT; send it as `Authorization: Bearer <token>`.
    pub token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the token expires.
    pub expires_in: i64,
    pub user: UserView,
}

impl poem_openapi::types::Example for TokenView {
    fn example() -> Self {
        TokenView {
            token: "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIyIn0.c2lnbmF0dXJl".into(),
            token_type: "Bearer".into(),
            expires_in: 900,
            user: UserView::example(),
        }
    }
}

#[derive(ApiResponse)]
pub enum UserListResponse {
    /// Users by id.
    #[oai(status = 200)]
    Ok(Json<Vec<UserView>>),
}

#[derive(ApiResponse)]
pub enum RegisterResponse {
    /// The account was created.
    #[oai(status = 201)]
    Created(Json<UserView>),
}

#[derive(ApiResponse)]
pub enum LoginResponse {
    /// Logged in.
    #[oai(status = 200)]
    Ok(Json<TokenView>),
}

#[derive(ApiResponse)]
pub enum MeResponse {
    /// The caller's account.
    #[oai(status = 200)]
    Ok(Json<UserView>),
}

/// Checks an e-mail and password under the login limits (per account and
/// per client `address`): the user, 401 for wrong credentials, 429 when a
/// limit is used up. `POST /api/auth/login` and the console's login share it.
pub(crate) async fn authenticate(
    state: &AppState,
    email: &str,
    password: String,
    address: &str,
) -> Result<users::Model, ApiError> {
    let email = email
        .trim_matches(|c: char| c.is_ascii_whitespace())
        .to_lowercase();
    if let Err(retry_after) = state.login_limiter.begin(&email, address) {
        tracing::warn!(client = %address, "login rate limit reached");
        return Err(ApiError::too_many_requests(
            format!("too many login attempts; try again in {retry_after} s"),
            retry_after,
        ));
    }
    let user = users::Entity::find()
        .filter(users::Column::Email.eq(email.clone()))
        .one(&state.db)
        .await?;
    let wrong = || {
        state.login_limiter.failed(&email);
        ApiError::unauthorized("e-mail or password is wrong")
    };
    let Some(user) = user else {
        // Spend the same time as a real check, so response times do not
        // tell which e-mails have accounts.
        let dummy = DUMMY_HASH
            .get_or_try_init(|| auth::hash_password("not a password".to_owned()))
            .await
            .map_err(|e| ApiError::internal("password hashing failed", e.as_ref()))?;
        let _ = auth::verify_password(password, dummy.clone()).await;
        return Err(wrong());
    };
    let ok = auth::verify_password(password, user.password_hash.clone())
        .await
        .map_err(|e| ApiError::internal("password check failed", e.as_ref()))?;
    if !ok {
        return Err(wrong());
    }
    state.login_limiter.succeeded(&email);
    Ok(user)
}

pub struct UsersApi;

/// The client's address for rate limiting (the TCP peer; proxies' headers
/// are not trusted).
pub(crate) fn client_address(req: &poem::Request) -> String {
    match req.remote_addr().as_socket_addr() {
        Some(addr) => addr.ip().to_string(),
        None => req.remote_addr().to_string(),
    }
}

#[OpenApi]
impl UsersApi {
    /// Register a new user
    ///
    /// Creates an account with role `user`. The e-mail must not be taken (409).
    #[oai(path = "/api/users", method = "post", tag = "ApiTags::Users")]
    async fn register(
        &self,
        state: Data<&Arc<AppState>>,
        body: Json<RegisterRequest>,
    ) -> Result<RegisterResponse, ApiError> {
        let body = body.0;
        let name = body
            .name
            .trim_matches(|c: char| c.is_ascii_whitespace())
            .to_owned();
        if name.is_empty() {
            return Err(ApiError::bad_request("name must not be blank", "name"));
        }
        let email = body
            .email
            .trim_matches(|c: char| c.is_ascii_whitespace())
            .to_lowercase();
        let hash = auth::hash_password(body.password)
            .await
            .map_err(|e| ApiError::internal("password hashing failed", e.as_ref()))?;
        let result = users::Entity::insert(users::ActiveModel {
            name: Set(name),
            email: Set(email.clone()),
            password_hash: Set(hash),
            role: Set("user".into()),
            created_at: Set(state.clock.now()),
            ..Default::default()
        })
        .exec_with_returning(&state.db)
        .await;
        match result {
            Ok(user) => {
                tracing::info!(user_id = user.id, "user registered");
                Ok(RegisterResponse::Created(Json(user.into())))
            }
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                Err(ApiError::conflict(
                    format!("a user with e-mail {email} already exists"),
                    Some("email"),
                ))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Log in
    ///
    /// Exchanges e-mail and password for a bearer token (JWT, HS256, short
    /// expiry). Failed logins per account and attempts per client address
    /// are limited per window (429 with `Retry-After`).
    #[oai(path = "/api/auth/login", method = "post", tag = "ApiTags::Users")]
    async fn login(
        &self,
        state: Data<&Arc<AppState>>,
        req: &poem::Request,
        body: Json<LoginRequest>,
    ) -> Result<LoginResponse, ApiError> {
        let user =
            authenticate(&state, &body.0.email, body.0.password, &client_address(req)).await?;
        let token = state
            .jwt
            .issue(&user, state.clock.now())
            .map_err(|e| ApiError::internal("token signing failed", &e))?;
        Ok(LoginResponse::Ok(Json(TokenView {
            token,
            token_type: "Bearer".into(),
            expires_in: state.jwt.ttl_seconds(),
            user: user.into(),
        })))
    }

    /// The caller's account
    ///
    /// Who the bearer token belongs to, with the role.
    #[oai(path = "/api/users/me", method = "get", tag = "ApiTags::Users")]
    async fn me(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
    ) -> Result<MeResponse, ApiError> {
        let user = users::Entity::find_by_id(auth.0.user_id)
            .one(&state.db)
            .await?
            .ok_or_else(|| ApiError::unauthorized("the account no longer exists"))?;
        Ok(MeResponse::Ok(Json(user.into())))
    }

    /// List users
    ///
    /// Admins only (403 otherwise). By id, `limit` (1-100, default 50) from
    /// `offset`.
    #[oai(path = "/api/users", method = "get", tag = "ApiTags::Users")]
    async fn list(
        &self,
        state: Data<&Arc<AppState>>,
        auth: BearerAuth,
        /// How many users to return (1-100, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<u64>>,
        /// How many users to skip (default 0).
        #[oai(validator(minimum(value = "0"), maximum(value = "1000000")))]
        offset: Query<Option<u64>>,
    ) -> Result<UserListResponse, ApiError> {
        auth.0.require_admin()?;
        let found = users::Entity::find()
            .order_by_asc(users::Column::Id)
            .limit(limit.0.unwrap_or(50))
            .offset(offset.0.unwrap_or(0))
            .all(&state.db)
            .await?;
        Ok(UserListResponse::Ok(Json(
            found.into_iter().map(UserView::from).collect(),
        )))
    }
}
