//! The operator console (`/console`): see and fix sagas of every type in a
//! browser. Served by the api and the embedded host with plain poem routes
//! outside the OpenAPI service (the API's spec does not change).
//!
//! - Admins only: the API's accounts and login limits; a session cookie
//!   (`HttpOnly`, `SameSite=Strict`, `Secure` on https) and CSRF checks on
//!   every POST ([`session`]). Anonymous users get the login page,
//!   non-admins a 403 page (JSON endpoints: 401 / 403).
//! - Pages: the overview (instances by state, parked instances, error-queue
//!   depths, outbox lag, health, decided per minute), the instance list
//!   (filters, paging), an instance (timeline, timers, outbox, state
//!   diagram), the operator-action log. Rendered on the server with every
//!   value escaped ([`html`]); `console.js` refreshes them from the JSON
//!   endpoints under `/console/api/` with `textContent` only.
//! - Actions: resume a parked instance (`SagaAdmin::resume_by`), re-drive
//!   an error queue ([`crate::operator::redrive`]); both are logged with
//!   the operator.
//! - Offline: the CSS and the script are compiled in (`include_str!`); a
//!   strict `Content-Security-Policy` allows only them.

use std::sync::Arc;
use std::time::Duration;

use poem::http::{StatusCode, header};
use poem::web::{Data, Form, Path, Query};
use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route, get, handler, post};
use saga::SagaError;
use saga::admin::Sagas;
use saga::transport::QueueSpec;
use serde::{Deserialize, Serialize};

use crate::api::AppState;
use crate::api::problem::ApiError;
use crate::operator::Broker;
use crate::ops::Check;
use crate::settings::Settings;

pub mod data;
pub mod html;
pub mod pages;
pub mod session;
pub mod svg;

use session::Session;

/// Every console response carries it: only the console's own script,
/// styles and images, no framing, forms posting only to itself.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");
const ICON: &str = include_str!("assets/icon.svg");

/// At most this many dead letters per re-drive from the console.
const REDRIVE_LIMIT: u32 = 1000;

/// What the console needs besides the API's state.
pub struct Console {
    /// The sagas this host runs (states, diagram, resume).
    pub sagas: Sagas,
    /// Where the queues are (depths, re-drive).
    pub broker: Broker,
    /// Each consumer's queue.
    pub queues: Vec<(String, QueueSpec)>,
    /// Other hosts' readiness endpoints: (name, URL).
    pub peers: Vec<(String, String)>,
    /// This host's name in the health list.
    pub host: String,
    pub session_ttl: chrono::Duration,
    /// Cookies get `Secure` (`api.public_url` is https).
    pub secure_cookie: bool,
    /// The origin of `api.public_url`.
    pub public_origin: Option<String>,
    http: reqwest::Client,
}

/// Each consumer the runner runs with its queue under `prefix`.
fn queues_of(prefix: &str) -> Vec<(String, saga::transport::QueueSpec)> {
    crate::runner::CONSUMERS
        .iter()
        .filter_map(|c| orders::topology::queue_of(c, prefix).map(|q| ((*c).to_owned(), q)))
        .collect()
}

impl Console {
    /// The console of a host running `sagas`, with the queues of
    /// `rabbitmq.queue_prefix` (see [`Console::with_queue_prefix`]), no
    /// broker and no peers.
    pub fn new(settings: &Settings, sagas: Sagas) -> Self {
        let queues = queues_of(&settings.rabbitmq.queue_prefix);
        Self {
            sagas,
            broker: Broker::None,
            queues,
            peers: Vec::new(),
            host: "api".to_owned(),
            session_ttl: chrono::Duration::seconds(
                i64::try_from(settings.console.session_ttl_seconds).unwrap_or(i64::MAX / 1000),
            ),
            secure_cookie: settings.api.public_url.starts_with("https://"),
            public_origin: session::origin_of(&settings.api.public_url),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
        }
    }

    pub fn with_broker(mut self, broker: Broker) -> Self {
        self.broker = broker;
        self
    }

    /// The queues of another prefix (the api on Kafka: `kafka.topic_prefix`).
    pub fn with_queue_prefix(mut self, prefix: &str) -> Self {
        self.queues = queues_of(prefix);
        self
    }

    pub fn with_host(mut self, host: &str) -> Self {
        host.clone_into(&mut self.host);
        self
    }

    /// Shows the runner's and the scheduler's readiness too
    /// (`console.*_health_url`, else their monitoring listeners).
    pub fn with_peers(mut self, settings: &Settings) -> Self {
        let url = |configured: &str, listen: &str| {
            if !configured.is_empty() {
                return configured.to_owned();
            }
            let address = match listen.parse::<std::net::SocketAddr>() {
                Ok(mut a) if a.ip().is_unspecified() => {
                    a.set_ip(match a.ip() {
                        std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    });
                    a.to_string()
                }
                _ => listen.to_owned(),
            };
            format!("http://{address}/health/ready")
        };
        self.peers = vec![
            (
                "runner".to_owned(),
                url(
                    &settings.console.runner_health_url,
                    &settings.monitoring.runner_listen,
                ),
            ),
            (
                "scheduler".to_owned(),
                url(
                    &settings.console.scheduler_health_url,
                    &settings.monitoring.scheduler_listen,
                ),
            ),
        ];
        self
    }

    /// The final states of `saga_type` (none when this host does not run it).
    pub fn final_states(&self, saga_type: &str) -> Vec<&'static str> {
        self.sagas
            .get(saga_type)
            .map(|s| s.graph().final_states())
            .unwrap_or_default()
    }

    async fn peer_health(&self) -> Vec<data::HealthView> {
        let checks = self.peers.iter().map(|(name, url)| async move {
            let unreachable = |detail: String| data::HealthView {
                source: name.clone(),
                status: "unreachable".to_owned(),
                checks: vec![Check {
                    name: "reachable".to_owned(),
                    ok: false,
                    detail,
                }],
            };
            let answer = match self.http.get(url).send().await {
                Ok(answer) => answer,
                Err(e) => return unreachable(format!("{url}: {e}")),
            };
            let report: serde_json::Value = match answer.json().await {
                Ok(report) => report,
                Err(e) => return unreachable(format!("{url}: not a health report: {e}")),
            };
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            data::HealthView {
                source: name.clone(),
                status: text(&report["status"]),
                checks: report["checks"]
                    .as_array()
                    .map(|checks| {
                        checks
                            .iter()
                            .map(|c| Check {
                                name: text(&c["name"]),
                                ok: c["ok"].as_bool().unwrap_or(false),
                                detail: text(&c["detail"]),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        });
        futures_util::future::join_all(checks).await
    }
}

/// The console's routes (nested at `/console` by [`crate::api::app`]).
pub fn routes() -> impl Endpoint<Output = Response> + 'static {
    Route::new()
        .at("/", get(overview))
        .at("/login", get(login_page).post(login))
        .at("/logout", post(logout))
        .at("/instances", get(instances))
        .at("/instances/:saga_type/:correlation_id", get(instance))
        .at("/instances/:saga_type/:correlation_id/resume", post(resume))
        .at("/queues/:consumer/redrive", post(redrive))
        .at("/actions", get(actions))
        .at("/actions/:id", get(action))
        .at("/charts/decided/:saga_type", get(chart))
        .at("/api/overview", get(api_overview))
        .at("/api/instances", get(api_instances))
        .at(
            "/api/instances/:saga_type/:correlation_id",
            get(api_instance),
        )
        .at("/api/actions", get(api_actions))
        .at("/assets/console.css", get(css))
        .at("/assets/console.js", get(js))
        .at("/assets/icon.svg", get(icon))
        .around(secure)
}

/// Security headers on every console response.
async fn secure<E: Endpoint>(next: E, req: Request) -> poem::Result<Response> {
    let mut response = match next.call(req).await {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    };
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "same-origin"),
    ] {
        if let Ok(value) = value.parse() {
            headers.insert(name, value);
        }
    }
    if !headers.contains_key(header::CACHE_CONTROL)
        && let Ok(value) = "no-store".parse()
    {
        headers.insert(header::CACHE_CONTROL, value);
    }
    Ok(response)
}

fn page(status: StatusCode, body: String) -> Response {
    Response::builder()
        .status(status)
        .content_type("text/html; charset=utf-8")
        .body(body)
}

fn message(status: StatusCode, title: &str, text: &str, session: Option<&Session>) -> Response {
    page(status, pages::message(title, text, session))
}

fn redirect(location: &str) -> Response {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, location)
        .finish()
}

fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => Response::builder()
            .content_type("application/json; charset=utf-8")
            .body(body),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}")),
    }
}

fn json_error(status: StatusCode, error: &str) -> Response {
    Response::builder()
        .status(status)
        .content_type("application/json; charset=utf-8")
        .body(serde_json::json!({ "error": error }).to_string())
}

/// Logs `error` and answers with an opaque 500 page.
fn internal(what: &str, error: &anyhow::Error, session: Option<&Session>) -> Response {
    tracing::error!(error = %format!("{error:#}"), "console: {what}");
    message(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        &format!("{what}; the error was logged."),
        session,
    )
}

fn forbidden(session: &Session) -> Response {
    message(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &format!(
            "The console is for administrators; {} is not one. Log out to sign in with another account.",
            session.email
        ),
        Some(session),
    )
}

/// Pages answer with redirects and HTML, JSON endpoints with JSON errors.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    Page,
    Json,
}

async fn session_of(state: &AppState, req: &Request) -> Result<Option<Session>, Response> {
    let Some(token) = session::token(req) else {
        return Ok(None);
    };
    session::find(&state.db, &token, state.clock.now())
        .await
        .map_err(|e| internal("could not read the session", &e.into(), None))
}

/// The admin's session, or the answer for everyone else.
async fn admin(state: &AppState, req: &Request, want: Want) -> Result<Session, Response> {
    match session_of(state, req).await? {
        None => Err(match want {
            Want::Page => redirect("/console/login"),
            Want::Json => json_error(StatusCode::UNAUTHORIZED, "log in at /console/login"),
        }),
        Some(s) if !s.is_admin() => Err(match want {
            Want::Page => forbidden(&s),
            Want::Json => json_error(StatusCode::FORBIDDEN, "the console is for administrators"),
        }),
        Some(s) => Ok(s),
    }
}

/// For a POST: from our own pages, a session, its CSRF token, an admin.
async fn admin_post(
    state: &AppState,
    req: &Request,
    csrf: Option<&str>,
) -> Result<Session, Response> {
    if !session::same_origin(req, state.console.public_origin.as_deref()) {
        return Err(message(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "This request did not come from the console's own pages (Origin/Referer check); nothing was changed.",
            None,
        ));
    }
    let Some(session) = session_of(state, req).await? else {
        return Err(redirect("/console/login"));
    };
    if !session.csrf_matches(csrf) {
        tracing::warn!(user_id = session.user_id, path = %req.uri().path(), "console: CSRF token missing or wrong");
        return Err(message(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "The form's CSRF token is missing or wrong (reload the page and try again); nothing was changed.",
            Some(&session),
        ));
    }
    if !session.is_admin() {
        return Err(forbidden(&session));
    }
    Ok(session)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CsrfForm {
    csrf_token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LoginForm {
    email: String,
    password: String,
}

#[handler]
async fn login_page(state: Data<&Arc<AppState>>, req: &Request) -> Response {
    match session_of(&state, req).await {
        Ok(Some(s)) if s.is_admin() => redirect("/console"),
        Ok(_) => page(StatusCode::OK, pages::login(None, "")),
        Err(response) => response,
    }
}

#[handler]
async fn login(
    state: Data<&Arc<AppState>>,
    req: &Request,
    form: Option<Form<LoginForm>>,
) -> Response {
    if !session::same_origin(req, state.console.public_origin.as_deref()) {
        return message(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "This login did not come from the console's own login page (Origin/Referer check).",
            None,
        );
    }
    let Some(Form(form)) = form else {
        return page(
            StatusCode::BAD_REQUEST,
            pages::login(Some("Fill in your e-mail and password."), ""),
        );
    };
    let address = crate::api::users::client_address(req);
    let user =
        match crate::api::users::authenticate(&state, &form.email, form.password, &address).await {
            Ok(user) => user,
            Err(ApiError::Unauthorized(_)) => {
                return page(
                    StatusCode::UNAUTHORIZED,
                    pages::login(Some("E-mail or password is wrong."), &form.email),
                );
            }
            Err(ApiError::TooManyRequests(_, retry_after)) => {
                let mut response = page(
                    StatusCode::TOO_MANY_REQUESTS,
                    pages::login(
                        Some(&format!(
                            "Too many login attempts; try again in {retry_after} s."
                        )),
                        &form.email,
                    ),
                );
                if let Ok(value) = retry_after.to_string().parse() {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
                return response;
            }
            Err(e) => {
                return internal("could not check the login", &anyhow::anyhow!("{e:?}"), None);
            }
        };
    let now = state.clock.now();
    match session::create(&state.db, &user, state.console.session_ttl, now).await {
        Ok(token) => {
            tracing::info!(user_id = user.id, role = %user.role, "console: logged in");
            let mut response = redirect("/console");
            if let Ok(cookie) = session::set_cookie(
                &token,
                state.console.session_ttl,
                state.console.secure_cookie,
            )
            .parse()
            {
                response.headers_mut().insert(header::SET_COOKIE, cookie);
            }
            response
        }
        Err(e) => internal("could not start the session", &e.into(), None),
    }
}

#[handler]
async fn logout(
    state: Data<&Arc<AppState>>,
    req: &Request,
    form: Option<Form<CsrfForm>>,
) -> Response {
    let csrf = form.and_then(|Form(f)| f.csrf_token);
    if !session::same_origin(req, state.console.public_origin.as_deref()) {
        return message(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "This request did not come from the console's own pages (Origin/Referer check); nothing was changed.",
            None,
        );
    }
    let session = match session_of(&state, req).await {
        Ok(s) => s,
        Err(response) => return response,
    };
    if let Some(session) = &session {
        if !session.csrf_matches(csrf.as_deref()) {
            return message(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "The form's CSRF token is missing or wrong; you are still logged in.",
                Some(session),
            );
        }
        if let Some(token) = session::token(req)
            && let Err(e) = session::delete(&state.db, &token).await
        {
            return internal("could not end the session", &e.into(), Some(session));
        }
        tracing::info!(user_id = session.user_id, "console: logged out");
    }
    let mut response = redirect("/console/login");
    if let Ok(cookie) = session::clear_cookie(state.console.secure_cookie).parse() {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

#[handler]
async fn overview(state: Data<&Arc<AppState>>, req: &Request) -> Response {
    let session = match admin(&state, req, Want::Page).await {
        Ok(s) => s,
        Err(response) => return response,
    };
    match data::overview(&state.console, &state.monitor, state.clock.now()).await {
        Ok(view) => page(StatusCode::OK, pages::overview(&view, &session)),
        Err(e) => internal("could not read the overview", &e, Some(&session)),
    }
}

#[handler]
async fn api_overview(state: Data<&Arc<AppState>>, req: &Request) -> Response {
    if let Err(response) = admin(&state, req, Want::Json).await {
        return response;
    }
    match data::overview(&state.console, &state.monitor, state.clock.now()).await {
        Ok(view) => json(&view),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "console: could not read the overview");
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not read the overview; the error was logged",
            )
        }
    }
}

fn saga_types(sagas: &Sagas) -> Vec<(&'static str, Vec<&'static str>)> {
    sagas.iter().map(|s| (s.saga_type(), s.states())).collect()
}

#[handler]
async fn instances(
    state: Data<&Arc<AppState>>,
    req: &Request,
    query: Query<data::ListQuery>,
) -> Response {
    let session = match admin(&state, req, Want::Page).await {
        Ok(s) => s,
        Err(response) => return response,
    };
    match data::instances(&state.db, &query).await {
        Ok(list) => page(
            StatusCode::OK,
            pages::instances(&list, &query, &saga_types(&state.console.sagas), &session),
        ),
        Err(e) => internal("could not list the instances", &e, Some(&session)),
    }
}

#[handler]
async fn api_instances(
    state: Data<&Arc<AppState>>,
    req: &Request,
    query: Query<data::ListQuery>,
) -> Response {
    if let Err(response) = admin(&state, req, Want::Json).await {
        return response;
    }
    match data::instances(&state.db, &query).await {
        Ok(list) => json(&list),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "console: could not list the instances");
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not list the instances; the error was logged",
            )
        }
    }
}

#[handler]
async fn instance(
    state: Data<&Arc<AppState>>,
    req: &Request,
    Path((saga_type, correlation_id)): Path<(String, String)>,
) -> Response {
    let session = match admin(&state, req, Want::Page).await {
        Ok(s) => s,
        Err(response) => return response,
    };
    match data::instance(&state.console, &state.db, &saga_type, &correlation_id).await {
        Ok(Some(detail)) => {
            let graph = state.console.sagas.get(&saga_type).ok().map(|s| s.graph());
            page(
                StatusCode::OK,
                pages::instance(&detail, graph.as_ref(), &session),
            )
        }
        Ok(None) => message(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("There is no {saga_type} saga instance {correlation_id}."),
            Some(&session),
        ),
        Err(e) => internal("could not read the instance", &e, Some(&session)),
    }
}

#[handler]
async fn api_instance(
    state: Data<&Arc<AppState>>,
    req: &Request,
    Path((saga_type, correlation_id)): Path<(String, String)>,
) -> Response {
    if let Err(response) = admin(&state, req, Want::Json).await {
        return response;
    }
    match data::instance(&state.console, &state.db, &saga_type, &correlation_id).await {
        Ok(Some(detail)) => json(&detail),
        Ok(None) => json_error(StatusCode::NOT_FOUND, "no such saga instance"),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "console: could not read the instance");
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not read the instance; the error was logged",
            )
        }
    }
}

#[handler]
async fn resume(
    state: Data<&Arc<AppState>>,
    req: &Request,
    Path((saga_type, correlation_id)): Path<(String, String)>,
    form: Option<Form<CsrfForm>>,
) -> Response {
    let csrf = form.and_then(|Form(f)| f.csrf_token);
    let session = match admin_post(&state, req, csrf.as_deref()).await {
        Ok(s) => s,
        Err(response) => return response,
    };
    let Ok(saga) = state.console.sagas.get(&saga_type) else {
        return message(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("This host does not run {saga_type} sagas."),
            Some(&session),
        );
    };
    let operator = session.operator();
    match saga.resume_by(&correlation_id, &operator).await {
        Ok(resumed) => {
            tracing::info!(
                saga_type = %saga_type,
                correlation_id = %correlation_id,
                operator = %operator,
                state = resumed.state,
                "console: resumed a parked saga"
            );
            redirect(&format!(
                "/console/instances/{}/{}",
                html::url_part(&saga_type),
                html::url_part(&correlation_id)
            ))
        }
        Err(e @ (SagaError::NotParked { .. } | SagaError::Contention(_))) => message(
            StatusCode::CONFLICT,
            "Not resumed",
            &format!("{e}"),
            Some(&session),
        ),
        Err(e @ SagaError::UnknownInstance { .. }) => message(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("{e}"),
            Some(&session),
        ),
        Err(e) => internal("could not resume the instance", &e.into(), Some(&session)),
    }
}

#[handler]
async fn redrive(
    state: Data<&Arc<AppState>>,
    req: &Request,
    Path(consumer): Path<String>,
    form: Option<Form<CsrfForm>>,
) -> Response {
    let csrf = form.and_then(|Form(f)| f.csrf_token);
    let session = match admin_post(&state, req, csrf.as_deref()).await {
        Ok(s) => s,
        Err(response) => return response,
    };
    let Some((_, queue)) = state.console.queues.iter().find(|(c, _)| *c == consumer) else {
        return message(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("There is no consumer {consumer}."),
            Some(&session),
        );
    };
    match crate::operator::redrive(
        &state.db,
        &state.console.broker,
        &consumer,
        queue,
        REDRIVE_LIMIT,
        &session.operator(),
        state.clock.now(),
    )
    .await
    {
        Ok(report) => redirect(&format!("/console/actions/{}", report.action_id)),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), consumer = %consumer, "console: re-drive failed");
            message(
                StatusCode::SERVICE_UNAVAILABLE,
                "Not re-driven",
                &format!("Could not re-drive {}: {e:#}", queue.error_queue()),
                Some(&session),
            )
        }
    }
}

#[handler]
async fn actions(
    state: Data<&Arc<AppState>>,
    req: &Request,
    query: Query<data::ActionsQuery>,
) -> Response {
    let session = match admin(&state, req, Want::Page).await {
        Ok(s) => s,
        Err(response) => return response,
    };
    match data::actions(&state.db, &query).await {
        Ok(list) => page(StatusCode::OK, pages::actions(&list, &session)),
        Err(e) => internal("could not read the operator actions", &e, Some(&session)),
    }
}

#[handler]
async fn api_actions(
    state: Data<&Arc<AppState>>,
    req: &Request,
    query: Query<data::ActionsQuery>,
) -> Response {
    if let Err(response) = admin(&state, req, Want::Json).await {
        return response;
    }
    match data::actions(&state.db, &query).await {
        Ok(list) => json(&list),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "console: could not read the operator actions");
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not read the operator actions; the error was logged",
            )
        }
    }
}

#[handler]
async fn action(state: Data<&Arc<AppState>>, req: &Request, Path(id): Path<i64>) -> Response {
    let session = match admin(&state, req, Want::Page).await {
        Ok(s) => s,
        Err(response) => return response,
    };
    match saga::operator::get(&state.db, id).await {
        Ok(Some(row)) => {
            let detail = row.detail.clone();
            page(
                StatusCode::OK,
                pages::action(&data::ActionRow::from(row), detail.as_ref(), &session),
            )
        }
        Ok(None) => message(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("There is no operator action #{id}."),
            Some(&session),
        ),
        Err(e) => internal(
            "could not read the operator action",
            &e.into(),
            Some(&session),
        ),
    }
}

#[handler]
async fn chart(
    state: Data<&Arc<AppState>>,
    req: &Request,
    Path(saga_type): Path<String>,
) -> Response {
    if let Err(response) = admin(&state, req, Want::Json).await {
        return response;
    }
    match data::decided(&state.console, &state.db, &saga_type, state.clock.now()).await {
        Ok(per_minute) => Response::builder()
            .content_type("image/svg+xml")
            .body(svg::decided_chart(&saga_type, &per_minute).into_string()),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "console: could not draw the chart");
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not draw the chart; the error was logged",
            )
        }
    }
}

#[handler]
fn css() -> Response {
    Response::builder()
        .content_type("text/css; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(CSS)
}

#[handler]
fn js() -> Response {
    Response::builder()
        .content_type("text/javascript; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(JS)
}

#[handler]
fn icon() -> Response {
    Response::builder()
        .content_type("image/svg+xml")
        .header(header::CACHE_CONTROL, "max-age=86400")
        .body(ICON)
}
