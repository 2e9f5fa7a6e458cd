//! The HTTP API in-process (poem's test client) against a real database.

use std::path::Path;
use std::sync::Arc;

use entity::{order_items, orders, saga_instances, saga_outbox};
use hosts::api::{self, AppState, auth::JwtKeys};
use hosts::settings::{self, Settings};
use poem::Endpoint;
use poem::http::StatusCode;
use poem::test::TestClient;
use saga::clock::SystemClock;
use saga::testing::TestDatabase;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::{Value, json};
use tokio::sync::Notify;

fn settings() -> Settings {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configuration");
    settings::load_from(&dir, Vec::<(String, String)>::new())
        .expect("committed configuration loads")
        .settings
}

struct Api<E> {
    client: TestClient<E>,
}

async fn api(tdb: &TestDatabase) -> Api<impl Endpoint + use<>> {
    let settings = settings();
    api::seed_admin(&tdb.db, &settings)
        .await
        .expect("seed admin");
    let state = Arc::new(AppState {
        db: tdb.db.clone(),
        jwt: JwtKeys::new(&settings.auth),
        clock: Arc::new(SystemClock),
        outbox_signal: Arc::new(Notify::new()),
    });
    Api {
        client: TestClient::new(api::app(state)),
    }
}

impl<E: Endpoint> Api<E> {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, String, Value) {
        let mut req = match method {
            "GET" => self.client.get(path),
            "POST" => self.client.post(path),
            "PUT" => self.client.put(path),
            "DELETE" => self.client.delete(path),
            other => panic!("method {other}"),
        };
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req.body_json(&b);
        }
        let resp = req.send().await.0;
        let status = resp.status();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let bytes = resp.into_body().into_vec().await.expect("body");
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, content_type, value)
    }

    /// Registers a fresh user and returns (id, token).
    async fn user(&self) -> (i64, String) {
        let email = format!("u-{}@example.com", uuid::Uuid::new_v4().simple());
        let (status, _, user) = self
            .call(
                "POST",
                "/api/users",
                None,
                Some(json!({"name": "U", "email": email, "password": "password-1"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{user}");
        let (status, _, login) = self
            .call(
                "POST",
                "/api/auth/login",
                None,
                Some(json!({"email": email, "password": "password-1"})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{login}");
        (
            user["id"].as_i64().expect("id"),
            login["token"].as_str().expect("token").to_owned(),
        )
    }
}

fn assert_problem(status: StatusCode, content_type: &str, body: &Value, want: StatusCode) {
    assert_eq!(status, want, "{body}");
    assert_eq!(content_type, "application/problem+json", "{body}");
    assert_eq!(body["status"], want.as_u16(), "{body}");
    assert!(
        body["type"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert!(
        body["detail"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn registering_twice_with_one_email_is_a_conflict_naming_the_field() {
    let tdb = TestDatabase::create().await;
    let api = api(&tdb).await;
    let body = json!({"name": "A", "email": "Dup@Example.com", "password": "password-1"});
    let (status, _, user) = api
        .call("POST", "/api/users", None, Some(body.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(user["email"], "dup@example.com");
    assert!(user.get("password_hash").is_none());
    let again = json!({"name": "B", "email": "dup@example.com", "password": "password-2"});
    let (status, ct, problem) = api.call("POST", "/api/users", None, Some(again)).await;
    assert_problem(status, &ct, &problem, StatusCode::CONFLICT);
    assert_eq!(problem["field"], "email");
    tdb.drop().await;
}

#[tokio::test]
async fn bad_input_is_a_4xx_problem_never_a_500() {
    let tdb = TestDatabase::create().await;
    let api = api(&tdb).await;
    let (_, token) = api.user().await;
    let cases: Vec<(&str, Option<&str>, Value, StatusCode, &str)> = vec![
        (
            "/api/users",
            None,
            json!({"name": "A", "email": "a@b.c"}),
            StatusCode::BAD_REQUEST,
            "password",
        ),
        (
            "/api/users",
            None,
            json!({"name": "A", "email": "a@b.c", "password": "short"}),
            StatusCode::BAD_REQUEST,
            "password",
        ),
        (
            "/api/users",
            None,
            json!({"name": "A", "email": "not-an-email", "password": "password-1"}),
            StatusCode::BAD_REQUEST,
            "email",
        ),
        (
            "/api/auth/login",
            None,
            json!({"email": "nobody@example.com", "password": "whatever1"}),
            StatusCode::UNAUTHORIZED,
            "password",
        ),
        (
            "/api/orders",
            None,
            json!({"items": [{"product_id": 1, "quantity": 1}]}),
            StatusCode::UNAUTHORIZED,
            "token",
        ),
        (
            "/api/orders",
            Some("not-a-jwt"),
            json!({"items": [{"product_id": 1, "quantity": 1}]}),
            StatusCode::UNAUTHORIZED,
            "token",
        ),
        (
            "/api/orders",
            Some(&token),
            json!({"items": []}),
            StatusCode::BAD_REQUEST,
            "items",
        ),
        (
            "/api/orders",
            Some(&token),
            json!({}),
            StatusCode::BAD_REQUEST,
            "items",
        ),
        (
            "/api/orders",
            Some(&token),
            json!({"items": [{"quantity": 1}]}),
            StatusCode::BAD_REQUEST,
            "product_id",
        ),
        (
            "/api/orders",
            Some(&token),
            json!({"items": [{"product_id": 1, "quantity": "two"}]}),
            StatusCode::BAD_REQUEST,
            "quantity",
        ),
        (
            "/api/orders",
            Some(&token),
            json!({"items": [{"product_id": 1, "quantity": 0}]}),
            StatusCode::BAD_REQUEST,
            "quantity",
        ),
        (
            "/api/orders",
            Some(&token),
            json!({"items": [{"product_id": 1, "quantity": 1}], "status": "completed"}),
            StatusCode::BAD_REQUEST,
            "status",
        ),
        (
            "/api/orders",
            Some(&token),
            json!({"items": [{"product_id": 1, "quantity": 1, "unit_price": "0.01"}]}),
            StatusCode::BAD_REQUEST,
            "unit_price",
        ),
        (
            "/api/orders",
            Some(&token),
            json!({"items": [{"product_id": 999999, "quantity": 1}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "items[0].product_id",
        ),
        (
            "/api/orders",
            Some(&token),
            json!({"items": [{"product_id": 1, "quantity": 1}, {"product_id": 1, "quantity": 2}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "items[1].product_id",
        ),
    ];
    let mut failures = Vec::new();
    for (path, token, body, want, mentions) in cases {
        let (status, ct, problem) = api.call("POST", path, token, Some(body.clone())).await;
        assert_problem(status, &ct, &problem, want);
        let text = problem.to_string();
        if !text.contains(mentions) {
            failures.push(format!("{path} {body}: {text} should mention {mentions}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Not JSON at all.
    let resp = api
        .client
        .post("/api/orders")
        .header("authorization", format!("Bearer {token}"))
        .content_type("application/json")
        .body("{not json")
        .send()
        .await
        .0;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // Unknown route.
    let (status, ct, problem) = api.call("GET", "/api/nothing-here", None, None).await;
    assert_problem(status, &ct, &problem, StatusCode::NOT_FOUND);
    tdb.drop().await;
}

#[tokio::test]
async fn placing_an_order_writes_order_items_saga_and_outbox_together_with_server_prices() {
    let tdb = TestDatabase::create().await;
    let api = api(&tdb).await;
    let (user_id, token) = api.user().await;
    let (_, _, products) = api.call("GET", "/api/products", None, None).await;
    let first = &products.as_array().expect("products")[0];
    let price: rust_decimal::Decimal = first["price"]
        .as_str()
        .expect("price")
        .parse()
        .expect("decimal");
    let (status, _, order) = api
        .call(
            "POST",
            "/api/orders",
            Some(&token),
            Some(json!({"items": [{"product_id": first["id"], "quantity": 3}]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert_eq!(order["status"], "pending");
    assert_eq!(order["user_id"], user_id);
    let total: rust_decimal::Decimal = order["total"]
        .as_str()
        .expect("total")
        .parse()
        .expect("decimal");
    assert_eq!(total, price * rust_decimal::Decimal::from(3));
    let id = order["id"].as_i64().expect("id");
    assert!(
        orders::Entity::find_by_id(id)
            .one(&tdb.db)
            .await
            .expect("q")
            .is_some()
    );
    assert_eq!(
        order_items::Entity::find()
            .filter(order_items::Column::OrderId.eq(id))
            .count(&tdb.db)
            .await
            .expect("q"),
        1
    );
    let instance = saga_instances::Entity::find()
        .filter(saga_instances::Column::CorrelationId.eq(id.to_string()))
        .one(&tdb.db)
        .await
        .expect("q")
        .expect("saga instance");
    assert_eq!(instance.state, "pending");
    let outbox = saga_outbox::Entity::find()
        .filter(saga_outbox::Column::CorrelationId.eq(id.to_string()))
        .all(&tdb.db)
        .await
        .expect("q");
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].message_type, "OrderCreated");
    assert_eq!(outbox[0].routing_key, "order.created");
    assert_eq!(outbox[0].body["initiated_by"], user_id);
    tdb.drop().await;
}

#[tokio::test]
async fn another_users_order_and_its_notifications_answer_404() {
    let tdb = TestDatabase::create().await;
    let api = api(&tdb).await;
    let (_, alice) = api.user().await;
    let (_, bob) = api.user().await;
    let (_, _, order) = api
        .call(
            "POST",
            "/api/orders",
            Some(&alice),
            Some(json!({"items": [{"product_id": 1, "quantity": 1}]})),
        )
        .await;
    let id = order["id"].as_i64().expect("id");
    for path in [
        format!("/api/orders/{id}"),
        format!("/api/orders/{id}/notifications"),
    ] {
        let (status, _, _) = api.call("GET", &path, Some(&alice), None).await;
        assert_eq!(status, StatusCode::OK, "{path} for the owner");
        let (status, ct, problem) = api.call("GET", &path, Some(&bob), None).await;
        assert_problem(status, &ct, &problem, StatusCode::NOT_FOUND);
    }
    let (_, _, bobs) = api.call("GET", "/api/orders", Some(&bob), None).await;
    assert_eq!(bobs.as_array().expect("list").len(), 0);
    let (_, _, alices) = api.call("GET", "/api/orders", Some(&alice), None).await;
    assert_eq!(alices.as_array().expect("list").len(), 1);
    assert_eq!(alices[0]["id"], id);
    assert_eq!(alices[0]["items"].as_array().expect("items").len(), 1);
    // The seeded admin sees every order.
    let s = settings();
    let (status, _, login) = api
        .call(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({"email": s.seed.admin_email, "password": s.seed.admin_password.expose()})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let admin = login["token"].as_str().expect("token");
    let (status, _, _) = api
        .call("GET", &format!("/api/orders/{id}"), Some(admin), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    tdb.drop().await;
}

#[tokio::test]
async fn the_spec_documents_every_operation_with_the_bearer_scheme_and_swagger_ui_is_served() {
    let tdb = TestDatabase::create().await;
    let api = api(&tdb).await;
    let (status, _, spec) = api.call("GET", "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        spec["components"]["securitySchemes"]["BearerAuth"]["scheme"],
        "bearer"
    );
    for path in [
        "/api/users",
        "/api/auth/login",
        "/api/users/me",
        "/api/products",
        "/api/orders",
        "/api/orders/{id}",
        "/api/orders/{id}/notifications",
        "/health",
    ] {
        let item = &spec["paths"][path];
        assert!(item.is_object(), "{path} missing from the spec");
        for (_, op) in item.as_object().expect("operations") {
            assert!(op["summary"].as_str().is_some(), "{path} has no summary");
            assert!(op["tags"].as_array().is_some(), "{path} has no tag");
        }
    }
    assert!(spec["paths"]["/api/orders"]["post"]["security"].is_array());
    let resp = api.client.get("/swagger/").send().await.0;
    assert_eq!(resp.status(), StatusCode::OK);
    let html = resp.into_body().into_string().await.expect("html");
    assert!(html.contains("swagger"), "Swagger UI page");
    tdb.drop().await;
}
