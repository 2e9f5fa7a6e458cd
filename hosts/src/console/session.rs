//! Console sessions and CSRF protection.
//!
//! - **Session**: logging in stores a `console_sessions` row (the SHA-256
//!   of a random 256-bit token, the user, a CSRF token, an absolute expiry
//!   of `console.session_ttl_seconds`) and sets the token in the cookie
//!   [`COOKIE`]: `HttpOnly`, `SameSite=Strict`, `Path=/console`, and
//!   `Secure` when `api.public_url` is https. Every request reads the
//!   session and the user's current role (a demoted admin loses the console
//!   at once); logging out deletes the row.
//! - **CSRF**: every POST must come from our own pages: its `Origin` (or,
//!   without one, its `Referer`) must be this host's origin, and (except the
//!   login form, which has no session yet) its form must carry the session's
//!   synchronizer token (`csrf_token`), compared in constant time.

use chrono::{DateTime, Utc};
use entity::{console_sessions, users};
use poem::Request;
use poem::http::header;
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter};
use sha2::{Digest, Sha256};

/// The session cookie's name.
pub const COOKIE: &str = "order_saga_console";
/// The form field that carries the CSRF token.
pub const CSRF_FIELD: &str = "csrf_token";

/// A logged-in console user.
#[derive(Clone, Debug)]
pub struct Session {
    pub user_id: i64,
    pub email: String,
    pub name: String,
    pub role: String,
    /// The synchronizer token of this session.
    pub csrf_token: String,
    pub expires_at: DateTime<Utc>,
}

impl Session {
    pub fn is_admin(&self) -> bool {
        self.role == "admin"
    }

    /// How the journal and the operator-action log name this user.
    pub fn operator(&self) -> String {
        format!("{} (user {})", self.email, self.user_id)
    }

    /// Whether `presented` is this session's CSRF token.
    pub fn csrf_matches(&self, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| constant_time_eq(p.as_bytes(), self.csrf_token.as_bytes()))
    }
}

/// 256 random bits as 64 hex digits (two v4 UUIDs' worth of the OS RNG,
/// minus their version bits: 244 bits).
fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

fn hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Starts a session for `user`; returns the cookie's token. Expired
/// sessions are deleted on the way.
pub async fn create<C: ConnectionTrait>(
    db: &C,
    user: &users::Model,
    ttl: chrono::Duration,
    now: DateTime<Utc>,
) -> Result<String, DbErr> {
    console_sessions::Entity::delete_many()
        .filter(console_sessions::Column::ExpiresAt.lte(now))
        .exec(db)
        .await?;
    let token = random_token();
    console_sessions::Entity::insert(console_sessions::ActiveModel {
        token_hash: Set(hash(&token)),
        user_id: Set(user.id),
        csrf_token: Set(random_token()),
        created_at: Set(now),
        expires_at: Set(now + ttl),
        ..Default::default()
    })
    .exec(db)
    .await?;
    Ok(token)
}

/// The unexpired session of `token`, with its user's current name and role.
pub async fn find<C: ConnectionTrait>(
    db: &C,
    token: &str,
    now: DateTime<Utc>,
) -> Result<Option<Session>, DbErr> {
    let Some(row) = console_sessions::Entity::find()
        .filter(console_sessions::Column::TokenHash.eq(hash(token)))
        .filter(console_sessions::Column::ExpiresAt.gt(now))
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    let Some(user) = users::Entity::find_by_id(row.user_id).one(db).await? else {
        return Ok(None);
    };
    Ok(Some(Session {
        user_id: user.id,
        email: user.email,
        name: user.name,
        role: user.role,
        csrf_token: row.csrf_token,
        expires_at: row.expires_at,
    }))
}

/// Ends the session of `token` (if any).
pub async fn delete<C: ConnectionTrait>(db: &C, token: &str) -> Result<(), DbErr> {
    console_sessions::Entity::delete_many()
        .filter(console_sessions::Column::TokenHash.eq(hash(token)))
        .exec(db)
        .await?;
    Ok(())
}

/// The session token in the request's cookies.
pub fn token(req: &Request) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|value| !value.is_empty() && value.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value that keeps `token` for `ttl`.
pub fn set_cookie(token: &str, ttl: chrono::Duration, secure: bool) -> String {
    format!(
        "{COOKIE}={token}; Path=/console; Max-Age={}; HttpOnly; SameSite=Strict{}",
        ttl.num_seconds().max(0),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that deletes the cookie.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/console; Max-Age=0; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

/// `scheme://host[:port]` of a URL (lower-cased), if it has one.
pub fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty() || !matches!(scheme, "http" | "https") {
        return None;
    }
    Some(format!("{scheme}://{authority}").to_ascii_lowercase())
}

/// Whether a state-changing request comes from this site: its `Origin`
/// (else its `Referer`) is `public_origin` or names the host the request
/// was sent to. A request with neither header is refused.
pub fn same_origin(req: &Request, public_origin: Option<&str>) -> bool {
    let header_text = |name| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let claimed = match header_text(header::ORIGIN) {
        Some(origin) => origin_of(&origin),
        None => header_text(header::REFERER).and_then(|r| origin_of(&r)),
    };
    let Some(claimed) = claimed else {
        return false;
    };
    if public_origin.is_some_and(|p| p.eq_ignore_ascii_case(&claimed)) {
        return true;
    }
    let host = header_text(header::HOST).map(|h| h.to_ascii_lowercase());
    let claimed_host = claimed.split_once("://").map(|(_, h)| h.to_owned());
    matches!((host, claimed_host), (Some(h), Some(c)) if h == c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request {
        let mut builder = Request::builder().method(poem::http::Method::POST).uri(
            "http://127.0.0.1:8080/console/logout"
                .parse::<poem::http::Uri>()
                .expect("uri"),
        );
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.finish()
    }

    #[test]
    fn tokens_are_random_hex_and_only_their_hash_is_kept() {
        let a = random_token();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, random_token());
        assert_eq!(hash(&a).len(), 64);
        assert_ne!(hash(&a), a);
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_on_https() {
        let c = set_cookie("ab12", chrono::Duration::seconds(60), false);
        assert_eq!(
            c,
            "order_saga_console=ab12; Path=/console; Max-Age=60; HttpOnly; SameSite=Strict"
        );
        assert!(set_cookie("ab12", chrono::Duration::seconds(60), true).ends_with("; Secure"));
        assert!(clear_cookie(false).contains("Max-Age=0"));
    }

    #[test]
    fn the_token_is_read_from_the_cookie_header_only_when_well_formed() {
        let req = request(&[("cookie", "a=b; order_saga_console=ab12cd; c=d")]);
        assert_eq!(token(&req).as_deref(), Some("ab12cd"));
        assert_eq!(
            token(&request(&[("cookie", "order_saga_console=<x>")])),
            None
        );
        assert_eq!(token(&request(&[])), None);
    }

    #[test]
    fn posts_must_come_from_this_origin() {
        let public = Some("http://127.0.0.1:8080");
        let ok = |h: &[(&str, &str)]| same_origin(&request(h), public);
        assert!(ok(&[("origin", "http://127.0.0.1:8080")]));
        assert!(ok(&[
            ("origin", "http://console.local:9000"),
            ("host", "console.local:9000")
        ]));
        assert!(ok(&[(
            "referer",
            "http://127.0.0.1:8080/console/instances?x=1"
        )]));
        assert!(!ok(&[
            ("origin", "https://evil.example"),
            ("host", "127.0.0.1:8080")
        ]));
        assert!(!ok(&[("origin", "null"), ("host", "127.0.0.1:8080")]));
        assert!(!ok(&[
            ("referer", "https://evil.example/console"),
            ("host", "127.0.0.1:8080")
        ]));
        assert!(
            !ok(&[("host", "127.0.0.1:8080")]),
            "neither Origin nor Referer"
        );
    }

    #[test]
    fn csrf_tokens_compare_whole() {
        let s = Session {
            user_id: 1,
            email: "a@example.com".into(),
            name: "A".into(),
            role: "admin".into(),
            csrf_token: "abcd".into(),
            expires_at: Utc::now(),
        };
        assert!(s.csrf_matches(Some("abcd")));
        assert!(!s.csrf_matches(Some("abc")));
        assert!(!s.csrf_matches(Some("abce")));
        assert!(!s.csrf_matches(None));
        assert_eq!(s.operator(), "a@example.com (user 1)");
    }
}
