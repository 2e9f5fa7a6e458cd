//! JWT (HS256 pinned, issuer, audience, expiry checked) and Argon2id hashing.

use std::sync::Arc;

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::{Algorithm as Argon2Algorithm, Argon2, Block, Params, Version};
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
    /// The user's e-mail and name as at login (users cannot change them),
    /// so placing an order needs no user lookup. Absent in tokens of
    /// earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: i64,
    pub role: String,
    /// E-mail and name from the token, when it carries them.
    pub email: Option<String>,
    pub name: Option<String>,
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
        user: &entity::users::Model,
        now: DateTime<Utc>,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let claims = Claims {
            sub: user.id.to_string(),
            role: user.role.clone(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now.timestamp(),
            exp: now.timestamp() + self.ttl_seconds,
            email: Some(user.email.clone()),
            name: Some(user.name.clone()),
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
            email: data.claims.email,
            name: data.claims.name,
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
fn params() -> anyhow::Result<Params> {
    Params::new(19 * 1024, 2, 1, None).map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))
}

/// The hashing thread's state: one Argon2 memory (19 MiB of blocks),
/// allocated once and reused by every hash and verification. Argon2
/// allocating its memory per hash grew the api by 19 MiB per login (the
/// freed blocks were not reused), which is what kept its peak above 64 MiB.
struct Hashing {
    blocks: Vec<Block>,
}

impl Hashing {
    fn memory(&mut self, count: usize) -> &mut [Block] {
        if self.blocks.len() < count {
            self.blocks.resize(count, Block::default());
        }
        &mut self.blocks[..count]
    }

    /// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`).
    fn hash(&mut self, password: &[u8]) -> anyhow::Result<String> {
        let params = params()?;
        let argon = Argon2::new(Argon2Algorithm::Argon2id, Version::V0x13, params.clone());
        let salt = Salt::generate();
        let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
        argon
            .hash_password_into_with_memory(
                password,
                salt.as_ref(),
                &mut out,
                self.memory(params.block_count()),
            )
            .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
        let hash = PasswordHash {
            algorithm: Argon2Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params)
                .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?,
            salt: Some(salt),
            hash: Some(Output::new(&out).map_err(|e| anyhow::anyhow!("argon2 output: {e}"))?),
        };
        Ok(hash.to_string())
    }

    /// Whether `password` matches the PHC string `stored` (with the
    /// algorithm, version and parameters it names; compared in constant time).
    fn verify(&mut self, password: &[u8], stored: &str) -> anyhow::Result<bool> {
        let parsed = PasswordHash::new(stored)
            .map_err(|e| anyhow::anyhow!("stored hash unreadable: {e}"))?;
        let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
            return Ok(false);
        };
        let params = Params::try_from(&parsed)
            .map_err(|e| anyhow::anyhow!("stored hash parameters: {e}"))?;
        let algorithm = Argon2Algorithm::try_from(parsed.algorithm.as_str())
            .map_err(|e| anyhow::anyhow!("stored hash algorithm: {e}"))?;
        let version = parsed
            .version
            .map(Version::try_from)
            .transpose()
            .map_err(|e| anyhow::anyhow!("stored hash version: {e}"))?
            .unwrap_or_default();
        let argon = Argon2::new(algorithm, version, params.clone());
        let mut out = vec![0u8; expected.len()];
        argon
            .hash_password_into_with_memory(
                password,
                salt.as_ref(),
                &mut out,
                self.memory(params.block_count()),
            )
            .map_err(|e| anyhow::anyhow!("verifying failed: {e}"))?;
        let computed = Output::new(&out).map_err(|e| anyhow::anyhow!("argon2 output: {e}"))?;
        // `Output`'s equality is constant-time.
        Ok(computed == *expected)
    }
}

/// A hashing job for the hashing thread.
type Job = Box<dyn FnOnce(&mut Hashing) + Send>;

/// The one thread that hashes and verifies passwords, one at a time, in one
/// reused Argon2 memory. About 100 ms per hash in release builds; logins are
/// rate-limited far below what one thread does.
fn hashing_thread() -> Result<&'static std::sync::mpsc::Sender<Job>, anyhow::Error> {
    static SENDER: std::sync::OnceLock<Result<std::sync::mpsc::Sender<Job>, String>> =
        std::sync::OnceLock::new();
    SENDER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("argon2".into())
                .spawn(move || {
                    let mut hashing = Hashing { blocks: Vec::new() };
                    for job in rx {
                        job(&mut hashing);
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
    work: impl FnOnce(&mut Hashing) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    hashing_thread()?
        .send(Box::new(move |hashing| {
            let _ = tx.send(work(hashing));
        }))
        .map_err(|_| anyhow::anyhow!("the hashing thread stopped"))?;
    rx.await
        .map_err(|_| anyhow::anyhow!("the hashing thread dropped a job"))?
}

/// Hashes `password` (Argon2id, [`params`]) on the hashing thread.
pub async fn hash_password(password: String) -> anyhow::Result<String> {
    on_hashing_thread(move |hashing| hashing.hash(password.as_bytes())).await
}

/// Whether `password` matches the stored PHC hash, on the hashing thread.
pub async fn verify_password(password: String, hash: String) -> anyhow::Result<bool> {
    on_hashing_thread(move |hashing| hashing.verify(password.as_bytes(), &hash)).await
}

#[cfg(test)]
mod hashing_tests {
    use argon2::PasswordVerifier as _;

    use super::*;

    #[tokio::test]
    async fn hashes_verify_with_the_library_and_the_library_s_hashes_verify_here() {
        let ours = hash_password("correct horse".into()).await.expect("hash");
        assert!(
            ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{ours}"
        );
        // The argon2 crate's own verifier accepts our hash.
        let parsed = PasswordHash::new(&ours).expect("phc");
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        assert!(
            verify_password("correct horse".into(), ours.clone())
                .await
                .expect("verify")
        );
        assert!(
            !verify_password("wrong horse".into(), ours)
                .await
                .expect("verify")
        );
        // A hash made by the library (other parameters) verifies here.
        let theirs = {
            use argon2::PasswordHasher as _;
            Argon2::new(
                Argon2Algorithm::Argon2id,
                Version::V0x13,
                Params::new(8 * 1024, 1, 1, None).expect("params"),
            )
            .hash_password(b"battery staple")
            .expect("hash")
            .to_string()
        };
        assert!(
            verify_password("battery staple".into(), theirs.clone())
                .await
                .expect("verify")
        );
        assert!(
            !verify_password("staple battery".into(), theirs)
                .await
                .expect("verify")
        );
        assert!(
            verify_password("x".into(), "not a hash".into())
                .await
                .is_err()
        );
    }
}
