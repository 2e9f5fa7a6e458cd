//! JWT (HS256 pinned, issuer, audience, expiry checked) and Argon2id hashing.

use std::sync::Arc;

use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use argon2::{Argon2, Params, Version};
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use poem::Request;
use poem_openapi::SecurityScheme;
use poem_openapi::auth::Bearer;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::problem::auth_error;
use crate::settings::AuthSettings;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    pub role: String,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: i64,
    pub role: String,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == "admin"
    }

    /// 403 unless the caller is an admin.
    pub fn require_admin(&self) -> Result<(), super::problem::ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(super::problem::ApiError::forbidden(
                "this operation needs the admin role",
            ))
        }
    }
}

pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    ttl_seconds: i64,
}

/// Shortest accepted signing key: 256 bits.
pub const MIN_SECRET_BYTES: usize = 32;

impl JwtKeys {
    /// Refuses a signing key shorter than 256 bits.
    pub fn new(settings: &AuthSettings) -> anyhow::Result<Self> {
        let secret = settings.jwt_secret.expose().as_bytes();
        if secret.len() < MIN_SECRET_BYTES {
            anyhow::bail!(
                "auth.jwt_secret must be at least {MIN_SECRET_BYTES} bytes (256 bits), got {}",
                secret.len()
            );
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_issuer(&[settings.issuer.as_str()]);
        validation.set_audience(&[settings.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.leeway = 5;
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            ttl_seconds: i64::try_from(settings.token_ttl_seconds).unwrap_or(3600),
        })
    }

    pub fn ttl_seconds(&self) -> i64 {
        self.ttl_seconds
    }

    pub fn issue(
        &self,
        user_id: i64,
        role: &str,
        now: DateTime<Utc>,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let claims = Claims {
            sub: user_id.to_string(),
            role: role.to_owned(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now.timestamp(),
            exp: now.timestamp() + self.ttl_seconds,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// The caller of a valid token: HS256 only, our issuer and audience, not
    /// expired, and not issued for longer than `auth.token_ttl_seconds`.
    pub fn verify(&self, token: &str) -> Option<Caller> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).ok()?;
        if data.claims.exp - data.claims.iat > self.ttl_seconds {
            return None;
        }
        Some(Caller {
            user_id: data.claims.sub.parse().ok()?,
            role: data.claims.role,
        })
    }
}

/// Bearer JWT from `POST /api/auth/login`. In Swagger UI press **Authorize**
/// and paste the token.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "check_bearer")]
pub struct BearerAuth(pub Caller);

async fn check_bearer(req: &Request, bearer: Bearer) -> poem::Result<Caller> {
    let state = req
        .data::<Arc<AppState>>()
        .ok_or_else(|| auth_error("authentication is not configured"))?;
    state
        .jwt
        .verify(&bearer.token)
        .ok_or_else(|| auth_error("the bearer token is invalid or expired; log in again"))
}

/// Argon2id, m = 19 MiB, t = 2, p = 1: OWASP's recommended minimum.
fn hasher() -> anyhow::Result<Argon2<'static>> {
    let params = Params::new(19 * 1024, 2, 1, None)
        .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
    Ok(Argon2::new(
        argon2::Algorithm::Argon2id,
        Version::V0x13,
        params,
    ))
}

/// A hashing job for the hashing thread.
type Job = Box<dyn FnOnce(&Argon2<'static>) + Send>;

/// The one thread that hashes and verifies passwords. Argon2id needs a
/// 19 MiB buffer per hash: hashing on one thread, one at a time, keeps one
/// such buffer in one allocator arena (on the blocking pool every thread
/// kept its own, which pushed the api's peak memory up under concurrent
/// logins). About 100 ms per hash in release builds; logins are rate-limited
/// far below what one thread does.
fn hashing_thread() -> Result<&'static std::sync::mpsc::Sender<Job>, anyhow::Error> {
    static SENDER: std::sync::OnceLock<Result<std::sync::mpsc::Sender<Job>, String>> =
        std::sync::OnceLock::new();
    SENDER
        .get_or_init(|| {
            let argon = hasher().map_err(|e| e.to_string())?;
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("argon2".into())
                .spawn(move || {
                    for job in rx {
                        job(&argon);
                    }
                })
                .map_err(|e| format!("cannot start the hashing thread: {e}"))?;
            Ok(tx)
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Runs `work` on the hashing thread (never on the async workers).
async fn on_hashing_thread<T: Send + 'static>(
    work: impl FnOnce(&Argon2<'static>) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    hashing_thread()?
        .send(Box::new(move |argon| {
            let _ = tx.send(work(argon));
        }))
        .map_err(|_| anyhow::anyhow!("the hashing thread stopped"))?;
    rx.await
        .map_err(|_| anyhow::anyhow!("the hashing thread dropped a job"))?
}

/// Hashes with [`hasher`] on the hashing thread.
pub async fn hash_password(password: String) -> anyhow::Result<String> {
    on_hashing_thread(move |argon| {
        argon
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))
    })
    .await
}

pub async fn verify_password(password: String, hash: String) -> anyhow::Result<bool> {
    on_hashing_thread(move |argon| {
        let parsed =
            PasswordHash::new(&hash).map_err(|e| anyhow::anyhow!("stored hash unreadable: {e}"))?;
        Ok(argon.verify_password(password.as_bytes(), &parsed).is_ok())
    })
    .await
}
