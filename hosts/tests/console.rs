//! The operator console in-process (poem's test client) against a real
//! PostgreSQL database, with the in-process transport for its queues:
//! admins only, CSRF, the cookie, escaping, the JSON endpoints' filters and
//! paging, and resume / re-drive journalled with the operator.

use std::path::Path;
use std::sync::Arc;

use hosts::api::{self, AppState};
use hosts::console::Console;
use hosts::operator::Broker;
use hosts::settings::{self, Settings};
use poem::Endpoint;
use poem::http::StatusCode;
use poem::test::TestClient;
use saga::schema::{instances as saga_instances, operator_actions, transitions};
use saga::testing::TestDatabase;
use saga::transport::memory::{MemoryTransport, QueuedMessage};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder};
use serde_json::{Value, json};

const ORIGIN: &str = "http://127.0.0.1:8080";

fn settings_with(env: &[(&str, &str)]) -> Settings {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configuration");
    settings::load_from(
        &dir,
        env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    )
    .expect("committed configuration loads")
    .settings
}

struct Resp {
    status: StatusCode,
    headers: poem::http::HeaderMap,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The session cookie's `name=value` from `Set-Cookie`.
    fn cookie(&self) -> String {
        self.header("set-cookie")
            .split(';')
            .next()
            .unwrap_or("")
            .to_owned()
    }

    /// The CSRF token of the page's forms.
    fn csrf(&self) -> String {
        let marker = "name=\"csrf_token\" value=\"";
        let start = self.body.find(marker).expect("a form with a CSRF token") + marker.len();
        self.body[start..start + 64].to_owned()
    }
}

struct Harness<E> {
    client: TestClient<E>,
    tdb: TestDatabase,
    memory: MemoryTransport,
    settings: Settings,
}

async fn harness() -> Harness<impl Endpoint + use<>> {
    harness_with(settings_with(&[])).await
}

async fn harness_with(settings: Settings) -> Harness<impl Endpoint + use<>> {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    api::seed_admin(&tdb.db, &settings)
        .await
        .expect("seed admin");
    let memory = MemoryTransport::new();
    memory.declare(&hosts::infra::topology(&settings));
    let state = AppState::new(tdb.db.clone(), &settings).expect("state");
    let console = Console::new(&settings, hosts::infra::sagas(&state.orders))
        .with_broker(Broker::Memory(memory.clone()));
    let state = Arc::new(AppState {
        console: Arc::new(console),
        ..state
    });
    Harness {
        client: TestClient::new(api::app(state)),
        tdb,
        memory,
        settings,
    }
}

impl<E: Endpoint> Harness<E> {
    async fn send(
        &self,
        method: &str,
        path: &str,
        cookie: Option<&str>,
        form: Option<&[(&str, &str)]>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut req = match method {
            "GET" => self.client.get(path),
            "POST" => self.client.post(path),
            other => panic!("method {other}"),
        };
        if let Some(cookie) = cookie {
            req = req.header("cookie", cookie);
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(form) = form {
            req = req.form(&form);
        }
        let resp = req.send().await.0;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().into_string().await.expect("body");
        Resp {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> Resp {
        self.send("GET", path, cookie, None, &[]).await
    }

    /// A POST from the console's own pages (with `Origin`).
    async fn post(&self, path: &str, cookie: &str, form: &[(&str, &str)]) -> Resp {
        self.send(
            "POST",
            path,
            Some(cookie),
            Some(form),
            &[("origin", ORIGIN)],
        )
        .await
    }

    async fn login(&self, email: &str, password: &str) -> Resp {
        self.send(
            "POST",
            "/console/login",
            None,
            Some(&[("email", email), ("password", password)]),
            &[("origin", ORIGIN)],
        )
        .await
    }

    /// Logs in as the seeded admin: the cookie and a CSRF token.
    async fn admin(&self) -> (String, String) {
        let login = self
            .login(
                &self.settings.seed.admin_email,
                self.settings.seed.admin_password.expose(),
            )
            .await;
        assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.body);
        assert_eq!(login.header("location"), "/console");
        let cookie = login.cookie();
        let overview = self.get("/console", Some(&cookie)).await;
        assert_eq!(overview.status, StatusCode::OK, "{}", overview.body);
        (cookie.clone(), overview.csrf())
    }

    /// A bearer token of the seeded admin for the API.
    async fn admin_token(&self) -> String {
        let resp = self
            .client
            .post("/api/auth/login")
            .body_json(&json!({
                "email": self.settings.seed.admin_email,
                "password": self.settings.seed.admin_password.expose(),
            }))
            .send()
            .await;
        let body: Value = resp.0.into_body().into_json().await.expect("token");
        body["token"].as_str().expect("token").to_owned()
    }

    /// A fresh non-admin account: (e-mail, password).
    async fn user(&self) -> (String, String) {
        let email = format!("u-{}@example.com", uuid::Uuid::new_v4().simple());
        let resp = self
            .client
            .post("/api/users")
            .body_json(&json!({"name": "U", "email": email, "password": "password-1"}))
            .send()
            .await;
        resp.assert_status(StatusCode::CREATED);
        (email, "password-1".to_owned())
    }

    /// Places an order of `product_id` through the API; its id.
    async fn order(&self, token: &str, product_id: i64) -> i64 {
        let resp = self
            .client
            .post("/api/orders")
            .header("authorization", format!("Bearer {token}"))
            .body_json(&json!({"items": [{"product_id": product_id, "quantity": 1}]}))
            .send()
            .await;
        resp.assert_status(StatusCode::CREATED);
        let body: Value = resp.0.into_body().into_json().await.expect("order");
        body["id"].as_i64().expect("id")
    }

    /// Parks the order saga `id` as if its retry budget had been spent.
    async fn park(&self, id: i64, error: &str) {
        let parked = saga_instances::Entity::update_many()
            .col_expr(saga_instances::Column::Faulted, true.into())
            .col_expr(saga_instances::Column::Attempts, 3.into())
            .col_expr(
                saga_instances::Column::LastError,
                Some(error.to_owned()).into(),
            )
            .filter(saga_instances::Column::CorrelationId.eq(id.to_string()))
            .exec(&self.tdb.db)
            .await
            .expect("park");
        assert_eq!(parked.rows_affected, 1);
    }

    async fn instance(&self, id: i64) -> saga_instances::Model {
        saga_instances::Entity::find()
            .filter(saga_instances::Column::CorrelationId.eq(id.to_string()))
            .one(&self.tdb.db)
            .await
            .expect("instance")
            .expect("exists")
    }

    async fn actions(&self) -> Vec<operator_actions::Model> {
        operator_actions::Entity::find()
            .order_by_asc(operator_actions::Column::Id)
            .all(&self.tdb.db)
            .await
            .expect("actions")
    }

    async fn admin_operator(&self) -> String {
        let admin = entity::users::Entity::find()
            .filter(entity::users::Column::Email.eq(self.settings.seed.admin_email.clone()))
            .one(&self.tdb.db)
            .await
            .expect("admin")
            .expect("seeded");
        format!("{} (user {})", admin.email, admin.id)
    }
}

#[tokio::test]
async fn anonymous_users_get_the_login_page_and_the_json_endpoints_answer_401() {
    let h = harness().await;
    let page = h.get("/console", None).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.header("location"), "/console/login");
    let login = h.get("/console/login", None).await;
    assert_eq!(login.status, StatusCode::OK);
    assert!(
        login
            .body
            .contains("<form class=\"login\" method=\"post\" action=\"/console/login\">")
    );
    assert_eq!(
        login.header("content-security-policy"),
        hosts::console::CONTENT_SECURITY_POLICY
    );
    assert_eq!(login.header("x-frame-options"), "DENY");
    for path in [
        "/console/api/overview",
        "/console/api/instances",
        "/console/api/instances/order/1",
        "/console/api/actions",
        "/console/charts/decided/order",
    ] {
        let r = h.get(path, None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}: {}", r.body);
    }
    for path in [
        "/console/instances",
        "/console/actions",
        "/console/instances/order/1",
    ] {
        let r = h.get(path, None).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{path}");
    }
    // A forged cookie is no session.
    let forged = h
        .get("/console/api/overview", Some("order_saga_console=00ff00ff"))
        .await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    // Wrong credentials: the login page again, with a 401.
    let wrong = h.login("admin@example.com", "not-the-password").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.body.contains("E-mail or password is wrong."));
    assert!(wrong.header("set-cookie").is_empty());
    h.tdb.drop().await;
}

#[tokio::test]
async fn non_admins_get_a_403_page_and_403_json() {
    let h = harness().await;
    let (email, password) = h.user().await;
    let login = h.login(&email, &password).await;
    assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.body);
    let cookie = login.cookie();
    let page = h.get("/console", Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert!(
        page.body.contains("The console is for administrators"),
        "{}",
        page.body
    );
    assert!(page.body.contains(&email));
    assert!(page.body.contains("Log out"));
    for path in ["/console/instances", "/console/actions"] {
        assert_eq!(
            h.get(path, Some(&cookie)).await.status,
            StatusCode::FORBIDDEN
        );
    }
    let json = h.get("/console/api/overview", Some(&cookie)).await;
    assert_eq!(json.status, StatusCode::FORBIDDEN);
    assert_eq!(json.json()["error"], "the console is for administrators");
    // Its own CSRF token does not make a non-admin's POST an admin's.
    let csrf = page.csrf();
    let redrive = h
        .post(
            "/console/queues/order-saga/redrive",
            &cookie,
            &[("csrf_token", &csrf)],
        )
        .await;
    assert_eq!(redrive.status, StatusCode::FORBIDDEN);
    assert!(h.actions().await.is_empty());
    h.tdb.drop().await;
}

#[tokio::test]
async fn the_session_cookie_is_http_only_strict_and_logging_out_ends_the_session() {
    let h = harness().await;
    let login = h
        .login(
            &h.settings.seed.admin_email,
            h.settings.seed.admin_password.expose(),
        )
        .await;
    let set_cookie = login.header("set-cookie").to_owned();
    let attributes: Vec<&str> = set_cookie.split("; ").collect();
    assert!(
        attributes[0].starts_with("order_saga_console="),
        "{set_cookie}"
    );
    assert_eq!(attributes[0].len(), "order_saga_console=".len() + 64);
    for wanted in [
        "Path=/console",
        "HttpOnly",
        "SameSite=Strict",
        "Max-Age=28800",
    ] {
        assert!(
            attributes.contains(&wanted),
            "{wanted} missing: {set_cookie}"
        );
    }
    assert!(!attributes.contains(&"Secure"), "http: {set_cookie}");
    // The database keeps only the token's hash.
    let token = attributes[0].trim_start_matches("order_saga_console=");
    let stored = entity::console_sessions::Entity::find()
        .all(&h.tdb.db)
        .await
        .expect("sessions");
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0].token_hash, token);

    let cookie = login.cookie();
    let overview = h.get("/console", Some(&cookie)).await;
    let csrf = overview.csrf();
    // Logging out needs the CSRF token too.
    let refused = h.post("/console/logout", &cookie, &[]).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(
        h.get("/console", Some(&cookie)).await.status,
        StatusCode::OK
    );
    let out = h
        .post("/console/logout", &cookie, &[("csrf_token", &csrf)])
        .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert_eq!(out.header("location"), "/console/login");
    assert!(out.header("set-cookie").contains("Max-Age=0"));
    let after = h.get("/console", Some(&cookie)).await;
    assert_eq!(
        after.status,
        StatusCode::SEE_OTHER,
        "the old cookie is dead"
    );
    h.tdb.drop().await;

    // On https the cookie is Secure.
    let https = harness_with(settings_with(&[(
        "APP__API__PUBLIC_URL",
        "https://console.example.com",
    )]))
    .await;
    let login = https
        .send(
            "POST",
            "/console/login",
            None,
            Some(&[
                ("email", https.settings.seed.admin_email.as_str()),
                ("password", https.settings.seed.admin_password.expose()),
            ]),
            &[("origin", "https://console.example.com")],
        )
        .await;
    assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.body);
    assert!(login.header("set-cookie").ends_with("; Secure"));
    https.tdb.drop().await;
}

#[tokio::test]
async fn a_post_without_the_right_csrf_token_or_from_another_origin_is_refused_and_changes_nothing()
{
    let h = harness().await;
    let (cookie, csrf) = h.admin().await;
    let token = h.admin_token().await;
    let order = h.order(&token, 1).await;
    h.park(order, "boom").await;
    let resume = format!("/console/instances/order/{order}/resume");
    let wrong = "0".repeat(64);
    type Pairs<'a> = Vec<(&'a str, &'a str)>;
    let cases: Vec<(&str, Pairs, Pairs)> = vec![
        ("no token", vec![], vec![("origin", ORIGIN)]),
        (
            "a wrong token",
            vec![("csrf_token", &wrong)],
            vec![("origin", ORIGIN)],
        ),
        (
            "another site",
            vec![("csrf_token", &csrf)],
            vec![("origin", "https://evil.example")],
        ),
        (
            "another site's referer",
            vec![("csrf_token", &csrf)],
            vec![("referer", "https://evil.example/page")],
        ),
        (
            "neither Origin nor Referer",
            vec![("csrf_token", &csrf)],
            vec![],
        ),
    ];
    for (what, form, headers) in &cases {
        let r = h
            .send("POST", &resume, Some(&cookie), Some(form), headers)
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{what}: {}", r.body);
        assert!(r.body.contains("nothing was changed"), "{what}: {}", r.body);
        let redrive = h
            .send(
                "POST",
                "/console/queues/order-saga/redrive",
                Some(&cookie),
                Some(form),
                headers,
            )
            .await;
        assert_eq!(redrive.status, StatusCode::FORBIDDEN, "{what}");
    }
    let instance = h.instance(order).await;
    assert!(instance.faulted, "still parked");
    assert_eq!(instance.attempts, 3);
    assert!(h.actions().await.is_empty(), "no action was logged");
    let resumed_rows = transitions::Entity::find()
        .filter(transitions::Column::Outcome.eq("resumed"))
        .count(&h.tdb.db)
        .await
        .expect("journal");
    assert_eq!(resumed_rows, 0);
    // The same request from the console's page goes through.
    let ok = h.post(&resume, &cookie, &[("csrf_token", &csrf)]).await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER, "{}", ok.body);
    assert!(!h.instance(order).await.faulted);
    h.tdb.drop().await;
}

#[tokio::test]
async fn resume_and_redrive_are_journalled_with_the_operator() {
    let h = harness().await;
    let (cookie, csrf) = h.admin().await;
    let operator = h.admin_operator().await;
    let token = h.admin_token().await;
    let order = h.order(&token, 1).await;
    h.park(order, "effect failed").await;

    let page = h
        .get(&format!("/console/instances/order/{order}"), Some(&cookie))
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("<form id=\"resume-form\""));
    assert!(!page.body.contains("<form id=\"resume-form\" method=\"post\" action=\"/console/instances/order/1/resume\" hidden>"));
    let resumed = h
        .post(
            &format!("/console/instances/order/{order}/resume"),
            &cookie,
            &[("csrf_token", &csrf)],
        )
        .await;
    assert_eq!(resumed.status, StatusCode::SEE_OTHER, "{}", resumed.body);
    assert_eq!(
        resumed.header("location"),
        format!("/console/instances/order/{order}")
    );
    let instance = h.instance(order).await;
    assert!(!instance.faulted);
    assert_eq!(
        instance.state, "processing",
        "the resume re-ran OrderCreated"
    );
    let row = transitions::Entity::find()
        .filter(transitions::Column::CorrelationId.eq(order.to_string()))
        .filter(transitions::Column::Outcome.eq("resumed"))
        .one(&h.tdb.db)
        .await
        .expect("journal")
        .expect("a resumed row");
    assert_eq!(row.input, Some(json!({"operator": operator})));
    assert!(
        row.detail
            .as_deref()
            .is_some_and(|d| d.contains(&format!("resumed by {operator}"))),
        "{row:?}"
    );
    // Resuming again: not parked any more, a 409 page, nothing logged.
    let again = h
        .post(
            &format!("/console/instances/order/{order}/resume"),
            &cookie,
            &[("csrf_token", &csrf)],
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.body);

    // Two dead letters in the saga's error queue.
    let queue = orders::topology::saga_queue(&h.settings.rabbitmq.queue_prefix);
    for body in ["{first", "{second"] {
        h.memory
            .publish_to_queue(
                &queue.error_queue(),
                QueuedMessage::new(queue.error_queue(), body),
            )
            .expect("dead letter");
    }
    let overview = h.get("/console/api/overview", Some(&cookie)).await.json();
    let saga_queue = overview["queues"]
        .as_array()
        .and_then(|q| q.iter().find(|q| q["consumer"] == "order-saga"))
        .expect("the saga's queue");
    assert_eq!(saga_queue["error_depth"], 2);
    let redriven = h
        .post(
            "/console/queues/order-saga/redrive",
            &cookie,
            &[("csrf_token", &csrf)],
        )
        .await;
    assert_eq!(redriven.status, StatusCode::SEE_OTHER, "{}", redriven.body);
    let action_page = redriven.header("location").to_owned();
    assert!(
        action_page.starts_with("/console/actions/"),
        "{action_page}"
    );
    assert_eq!(h.memory.ready_count(&queue.error_queue()), 0);
    assert_eq!(h.memory.ready_count(&queue.name), 2);

    let actions = h.actions().await;
    assert_eq!(actions.len(), 2, "{actions:?}");
    let (resume, redrive) = (&actions[0], &actions[1]);
    assert_eq!(resume.action, "resume");
    assert_eq!(resume.operator, operator);
    assert_eq!(resume.saga_type.as_deref(), Some("order"));
    assert_eq!(
        resume.correlation_id.as_deref(),
        Some(order.to_string().as_str())
    );
    assert_eq!(redrive.action, "redrive");
    assert_eq!(redrive.operator, operator);
    assert_eq!(redrive.queue.as_deref(), Some(queue.name.as_str()));
    let detail = redrive.detail.clone().expect("detail");
    assert_eq!(detail["before"], json!({"queue": 0, "error_queue": 2}));
    assert_eq!(detail["after"], json!({"queue": 2, "error_queue": 0}));
    assert_eq!(detail["moved"], 2);
    assert_eq!(detail["consumer"], "order-saga");

    // The action's page shows the counts before and after.
    let shown = h.get(&action_page, Some(&cookie)).await;
    assert_eq!(shown.status, StatusCode::OK);
    assert!(shown.body.contains("<tr id=\"before\"><th>before</th><td class=\"queue\">0</td><td class=\"error-queue\">2</td></tr>"), "{}", shown.body);
    assert!(shown.body.contains("<tr id=\"after\"><th>after</th><td class=\"queue\">2</td><td class=\"error-queue\">0</td></tr>"), "{}", shown.body);
    // And the log lists both, newest first.
    let log = h.get("/console/api/actions", Some(&cookie)).await.json();
    assert_eq!(log["total"], 2);
    assert_eq!(log["items"][0]["action"], "redrive");
    assert_eq!(log["items"][1]["action"], "resume");
    // The instance's page lists its resume.
    let detail = h
        .get(
            &format!("/console/api/instances/order/{order}"),
            Some(&cookie),
        )
        .await
        .json();
    assert_eq!(detail["actions"][0]["operator"], operator.as_str());
    let input = json!({"operator": operator}).to_string();
    assert!(
        detail["journal"].as_array().is_some_and(|j| j
            .iter()
            .any(|r| r["outcome"] == "resumed" && r["input"].as_str() == Some(input.as_str()))),
        "{detail}"
    );
    h.tdb.drop().await;
}

#[tokio::test]
async fn hostile_text_is_escaped_in_server_rendered_pages() {
    let h = harness().await;
    let (cookie, _) = h.admin().await;
    let token = h.admin_token().await;
    let script = "<script>alert('product')</script>";
    let img = "<img src=x onerror=alert('error')>";
    let created = h
        .client
        .post("/api/products")
        .header("authorization", format!("Bearer {token}"))
        .body_json(&json!({"name": script, "description": img, "price": "1.00", "stock": 5}))
        .send()
        .await;
    created.assert_status(StatusCode::CREATED);
    let product: Value = created.0.into_body().into_json().await.expect("product");
    let order = h.order(&token, product["id"].as_i64().expect("id")).await;
    h.park(order, img).await;

    let pages = [
        format!("/console/instances/order/{order}"),
        "/console".to_owned(),
        "/console/instances?parked=true".to_owned(),
        format!("/console/instances?correlation_id={}", urlencode(script)),
        format!("/console/instances/order/{}", urlencode(script)),
    ];
    for path in &pages {
        let page = h.get(path, Some(&cookie)).await;
        assert!(
            page.status == StatusCode::OK || page.status == StatusCode::NOT_FOUND,
            "{path}: {}",
            page.status
        );
        assert!(
            !page.body.contains("<script>alert"),
            "{path}: {}",
            page.body
        );
        assert!(!page.body.contains("<img src=x"), "{path}: {}", page.body);
    }
    let instance = h.get(&pages[0], Some(&cookie)).await.body;
    // The product name (in the data and the outbox event) and the error
    // are there, as text.
    assert!(instance.contains("&lt;script&gt;alert(&#x27;product&#x27;)&lt;/script&gt;"));
    assert!(instance.contains("&lt;img src=x onerror=alert(&#x27;error&#x27;)&gt;"));
    let overview = h.get("/console", Some(&cookie)).await.body;
    assert!(overview.contains("&lt;img src=x onerror=alert(&#x27;error&#x27;)&gt;"));
    let not_found = h.get(&pages[4], Some(&cookie)).await;
    assert_eq!(not_found.status, StatusCode::NOT_FOUND);
    assert!(
        not_found
            .body
            .contains("&lt;script&gt;alert(&#x27;product&#x27;)&lt;/script&gt;")
    );
    // The JSON carries the text as it is; the script writes it as text.
    let json = h
        .get(
            &format!("/console/api/instances/order/{order}"),
            Some(&cookie),
        )
        .await
        .json();
    assert_eq!(json["last_error"], img);
    assert!(json["data"].as_str().is_some_and(|d| d.contains(script)));
    h.tdb.drop().await;
}

fn urlencode(s: &str) -> String {
    hosts::console::html::url_part(s)
}

#[tokio::test]
async fn the_json_endpoints_filter_and_page_instances_and_count_decisions() {
    let h = harness().await;
    let (cookie, _) = h.admin().await;
    // 30 order instances (12 completed, 8 processing of which 3 parked,
    // 10 pending) and 2 of another saga type this host does not run.
    let db = &h.tdb.db;
    let mut values = Vec::new();
    for i in 1..=30 {
        let (state, faulted) = match i {
            1..=12 => ("completed", false),
            13..=17 => ("processing", false),
            18..=20 => ("processing", true),
            _ => ("pending", false),
        };
        values.push(format!(
            "('order', '{i}', '{state}', 1, 0, {faulted}, NULL, '{{}}', now(), now(), now())"
        ));
    }
    values.push(
        "('shipment', 's-1', 'requested', 0, 0, false, NULL, '{}', now(), now(), now())".into(),
    );
    values.push(
        "('shipment', 's-2', 'allocated', 0, 0, true, 'no truck', '{}', now(), now(), now())"
            .into(),
    );
    db.execute_unprepared(&format!(
        "INSERT INTO saga_instances (saga_type, correlation_id, state, version, attempts, \
         faulted, last_error, data, state_entered_at, created_at, updated_at) VALUES {}",
        values.join(", ")
    ))
    .await
    .expect("instances");
    // Journal rows for the completed ones: 4 decided 10 minutes ago, 8 now.
    db.execute_unprepared(
        "INSERT INTO saga_transitions (saga_instance_id, saga_type, correlation_id, from_state, \
         to_state, trigger, outcome, attempt, occurred_at) \
         SELECT id, 'order', correlation_id, 'processing', 'completed', 'PaymentDecided', 'applied', 1, \
           CASE WHEN correlation_id::int <= 4 THEN now() - interval '10 minutes' ELSE now() END \
         FROM saga_instances WHERE saga_type = 'order' AND state = 'completed'",
    )
    .await
    .expect("journal");

    let list = |query: &'static str| {
        let cookie = cookie.clone();
        let h = &h;
        async move {
            let r = h
                .get(&format!("/console/api/instances?{query}"), Some(&cookie))
                .await;
            assert_eq!(r.status, StatusCode::OK, "{query}: {}", r.body);
            r.json()
        }
    };
    let all = list("").await;
    assert_eq!(all["total"], 32);
    assert_eq!(all["pages"], 2);
    assert_eq!(all["items"].as_array().map(Vec::len), Some(25));
    assert_eq!(all["items"][0]["correlation_id"], "s-2", "newest first");
    let second = list("page=2").await;
    assert_eq!(second["page"], 2);
    assert_eq!(second["items"].as_array().map(Vec::len), Some(7));
    assert_eq!(second["items"][6]["correlation_id"], "1");

    let orders = list("saga_type=order").await;
    assert_eq!(orders["total"], 30);
    let processing = list("saga_type=order&state=processing").await;
    assert_eq!(processing["total"], 8);
    let parked = list("parked=true").await;
    assert_eq!(parked["total"], 4);
    assert!(
        parked["items"]
            .as_array()
            .is_some_and(|i| i.iter().all(|r| r["parked"] == true))
    );
    let parked_orders = list("saga_type=order&state=processing&parked=true").await;
    assert_eq!(parked_orders["total"], 3);
    let running = list("saga_type=order&parked=false").await;
    assert_eq!(running["total"], 27);
    let one = list("correlation_id=17").await;
    assert_eq!(one["total"], 1);
    assert_eq!(one["items"][0]["state"], "processing");
    let none = list("correlation_id=nope").await;
    assert_eq!(none["total"], 0);
    assert_eq!(none["pages"], 1);

    let page = h
        .get(
            "/console/instances?saga_type=order&state=processing",
            Some(&cookie),
        )
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body.contains("page 1 of 1 (8 in all)"),
        "{}",
        page.body
    );
    assert!(page.body.contains("<option value=\"processing\" selected>"));

    let overview = h.get("/console/api/overview", Some(&cookie)).await.json();
    let order_view = overview["sagas"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["saga_type"] == "order"))
        .expect("order saga");
    assert_eq!(order_view["total"], 30);
    assert_eq!(order_view["parked"], 3);
    assert_eq!(order_view["decided_last_hour"], 12);
    let states: Vec<(String, u64)> = order_view["states"]
        .as_array()
        .expect("states")
        .iter()
        .map(|s| {
            (
                s["state"].as_str().unwrap_or("").to_owned(),
                s["count"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("pending".to_owned(), 10),
            ("processing".to_owned(), 8),
            ("completed".to_owned(), 12),
            ("expired".to_owned(), 0),
        ]
    );
    let shipment = overview["sagas"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["saga_type"] == "shipment"))
        .expect("the other saga type is shown too");
    assert_eq!(shipment["parked"], 1);
    assert_eq!(overview["parked"].as_array().map(Vec::len), Some(4));
    assert_eq!(overview["health"][0]["source"], "api");
    assert_eq!(overview["queues"][0]["error_depth"], 0);

    let chart = h.get("/console/charts/decided/order", Some(&cookie)).await;
    assert_eq!(chart.status, StatusCode::OK);
    assert_eq!(chart.header("content-type"), "image/svg+xml");
    assert!(
        chart.body.contains("order: 12 decided in the last hour"),
        "{}",
        chart.body
    );
    assert!(
        chart.body.contains("<title>8 decided, 0 min ago</title>"),
        "{}",
        chart.body
    );
    assert!(
        chart.body.contains("<title>4 decided, 10 min ago</title>"),
        "{}",
        chart.body
    );
    h.tdb.drop().await;
}

#[tokio::test]
async fn the_api_spec_is_unchanged_by_the_console() {
    // The console's routes are plain poem routes: not in the spec.
    let spec = api::spec_json();
    assert!(!spec.contains("/console"));
}
