//! The HTTP API in-process (poem's test client) against a real database.

use std::path::Path;
use std::sync::Arc;

use entity::{order_items, orders};
use hosts::api::{self, AppState};
use hosts::settings::{self, Settings};
use poem::Endpoint;
use poem::http::StatusCode;
use poem::test::TestClient;
use saga::schema::{instances as saga_instances, outbox as saga_outbox};
use saga::testing::TestDatabase;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::{Value, json};

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
    api_with(tdb, settings()).await
}

async fn api_with(tdb: &TestDatabase, settings: Settings) -> Api<impl Endpoint + use<>> {
    api_and_state(tdb, settings).await.0
}

/// The API and its state (to look at the placement queue).
async fn api_and_state(
    tdb: &TestDatabase,
    settings: Settings,
) -> (Api<impl Endpoint + use<>>, Arc<AppState>) {
    api::seed_admin(&tdb.db, &settings)
        .await
        .expect("seed admin");
    let state = Arc::new(AppState::new(tdb.db.clone(), &settings).expect("state"));
    let api = Api {
        client: TestClient::new(api::app(state.clone())),
    };
    (api, state)
}

impl<E: Endpoint> Api<E> {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, String, Value) {
        let (status, content_type, _, value) = self.send(method, path, token, body, &[]).await;
        (status, content_type, value)
    }

    /// Like `call`, with extra request headers; also returns the headers.
    async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, String, poem::http::HeaderMap, Value) {
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
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(b) = body {
            req = req.body_json(&b);
        }
        let resp = req.send().await.0;
        let status = resp.status();
        let response_headers = resp.headers().clone();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let bytes = resp.into_body().into_vec().await.expect("body");
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, content_type, response_headers, value)
    }

    /// Logs in as the seeded admin and returns the token.
    async fn admin(&self) -> String {
        let s = settings();
        let (status, _, login) = self
            .call(
                "POST",
                "/api/auth/login",
                None,
                Some(json!({"email": s.seed.admin_email, "password": s.seed.admin_password.expose()})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{login}");
        login["token"].as_str().expect("token").to_owned()
    }

    /// Places an order of `quantity` of product 1 and returns its id.
    /// `POST /api/orders` with `headers` (e.g. an `Idempotency-Key`).
    async fn place_order(
        &self,
        token: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, String, poem::http::HeaderMap, Value) {
        self.send("POST", "/api/orders", Some(token), Some(body), headers)
            .await
    }

    async fn order(&self, token: &str, quantity: i64) -> i64 {
        let (status, _, order) = self
            .call(
                "POST",
                "/api/orders",
                Some(token),
                Some(json!({"items": [{"product_id": 1, "quantity": quantity}]})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{order}");
        order["id"].as_i64().expect("id")
    }

    /// Makes product `id` "Scarce" at 5.00 with `stock` units (as `admin`).
    async fn scarce(&self, admin: &str, id: i64, stock: i32) {
        let (status, _, body) = self
            .call(
                "PUT",
                &format!("/api/products/{id}"),
                Some(admin),
                Some(json!({"name": "Scarce", "price": "5.00", "stock": stock})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
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
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
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
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
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
            "/api/users",
            None,
            json!({"name": "A\u{0}B", "email": "nul@example.com", "password": "password-1"}),
            StatusCode::BAD_REQUEST,
            "name",
        ),
        (
            "/api/users",
            None,
            json!({"name": "A", "email": "n\u{0}l@example.com", "password": "password-1"}),
            StatusCode::BAD_REQUEST,
            "email",
        ),
        (
            "/api/auth/login",
            None,
            json!({"email": "n\u{0}l@example.com", "password": "password-1"}),
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
            json!({"items": [{"product_id": 1, "quantity": 1}, {"product_id": 999999, "quantity": 1}]}),
            StatusCode::CONFLICT,
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
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (user_id, token) = api.user().await;
    let (_, _, products) = api.call("GET", "/api/products", Some(&token), None).await;
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
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
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
        format!("/api/orders/{id}/history"),
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
    // The seeded admin sees every order, its journal and its notifications.
    let admin = api.admin().await;
    for path in [
        format!("/api/orders/{id}"),
        format!("/api/orders/{id}/notifications"),
        format!("/api/orders/{id}/history"),
    ] {
        let (status, _, _) = api.call("GET", &path, Some(&admin), None).await;
        assert_eq!(status, StatusCode::OK, "{path} for the admin");
    }
    tdb.drop().await;
}

#[tokio::test]
async fn the_spec_documents_every_operation_with_the_bearer_scheme_and_swagger_ui_is_served() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
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
        "/api/orders/{id}/history",
        "/api/products/{id}",
        "/api/notifications",
        "/api/sagas/order/diagram",
        "/api/sagas/order/transitions",
        "/health",
        "/health/live",
        "/health/ready",
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
    assert!(
        html.contains("additionalProperties"),
        "Swagger UI shows the completed spec"
    );
    let resp = api.client.get("/swagger").send().await.0;
    assert_eq!(resp.status(), StatusCode::OK);
    for name in api::CLOSED_SCHEMAS {
        assert_eq!(
            spec["components"]["schemas"][name]["additionalProperties"], false,
            "{name} rejects unknown fields and says so"
        );
    }
    tdb.drop().await;
}

async fn count_orders(tdb: &TestDatabase) -> u64 {
    orders::Entity::find().count(&tdb.db).await.expect("count")
}

async fn stock_of(tdb: &TestDatabase, id: i64) -> i32 {
    entity::products::Entity::find_by_id(id)
        .one(&tdb.db)
        .await
        .expect("q")
        .expect("product")
        .stock
}

#[tokio::test]
async fn passwords_are_stored_as_argon2id_with_owasp_parameters() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (id, _) = api.user().await;
    let user = entity::users::Entity::find_by_id(id)
        .one(&tdb.db)
        .await
        .expect("q")
        .expect("user");
    assert!(
        user.password_hash
            .starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{}",
        user.password_hash
    );
    assert!(!user.password_hash.contains("password-1"));
    tdb.drop().await;
}

#[tokio::test]
async fn admins_list_users_and_everyone_else_gets_403() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (alice_id, alice) = api.user().await;
    let (status, ct, problem) = api.call("GET", "/api/users", Some(&alice), None).await;
    assert_problem(status, &ct, &problem, StatusCode::FORBIDDEN);
    let (status, ct, problem) = api.call("GET", "/api/users", None, None).await;
    assert_problem(status, &ct, &problem, StatusCode::UNAUTHORIZED);
    let admin = api.admin().await;
    let (status, _, users) = api.call("GET", "/api/users", Some(&admin), None).await;
    assert_eq!(status, StatusCode::OK, "{users}");
    let users = users.as_array().expect("list");
    assert_eq!(users.len(), 2);
    assert_eq!(users[0]["role"], "admin");
    assert_eq!(users[1]["id"], alice_id);
    assert!(users.iter().all(|u| u.get("password_hash").is_none()));
    let (_, _, page) = api
        .call("GET", "/api/users?limit=1&offset=1", Some(&admin), None)
        .await;
    assert_eq!(page.as_array().expect("list").len(), 1);
    assert_eq!(page[0]["id"], alice_id);
    let (_, _, me) = api.call("GET", "/api/users/me", Some(&alice), None).await;
    assert_eq!(me["id"], alice_id);
    assert_eq!(me["role"], "user");
    tdb.drop().await;
}

#[tokio::test]
async fn products_are_read_by_signed_in_users_and_written_by_admins_only() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (_, user) = api.user().await;
    let admin = api.admin().await;
    let (status, ct, problem) = api.call("GET", "/api/products", None, None).await;
    assert_problem(status, &ct, &problem, StatusCode::UNAUTHORIZED);
    let (status, _, list) = api.call("GET", "/api/products", Some(&user), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!list.as_array().expect("list").is_empty());
    let (status, _, one) = api.call("GET", "/api/products/1", Some(&user), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(one["price"].is_string(), "price is a decimal string: {one}");
    let (status, ct, problem) = api
        .call("GET", "/api/products/999999", Some(&user), None)
        .await;
    assert_problem(status, &ct, &problem, StatusCode::NOT_FOUND);

    let new = json!({"name": "Desk lamp", "description": "LED", "price": "12.50", "stock": 4});
    for (method, path) in [
        ("POST", "/api/products"),
        ("PUT", "/api/products/1"),
        ("DELETE", "/api/products/1"),
    ] {
        let body = (method != "DELETE").then(|| new.clone());
        let (status, ct, problem) = api.call(method, path, Some(&user), body).await;
        assert_problem(status, &ct, &problem, StatusCode::FORBIDDEN);
    }
    let (status, _, lamp) = api
        .call("POST", "/api/products", Some(&admin), Some(new.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{lamp}");
    assert_eq!(lamp["price"], "12.50");
    assert_eq!(lamp["stock"], 4);
    let lamp_id = lamp["id"].as_i64().expect("id");

    // The unique name is a named database constraint: 409 naming the field.
    let (status, ct, problem) = api
        .call("POST", "/api/products", Some(&admin), Some(new.clone()))
        .await;
    assert_problem(status, &ct, &problem, StatusCode::CONFLICT);
    assert_eq!(problem["field"], "name");
    assert!(
        problem["detail"]
            .as_str()
            .expect("detail")
            .contains("uq_products_name")
    );

    let bad: Vec<(Value, &str)> = vec![
        (json!({"name": "X", "price": "1.00", "stock": -1}), "stock"),
        (json!({"name": "X", "price": 1.5, "stock": 1}), "price"),
        (json!({"name": "X", "price": "1.234", "stock": 1}), "price"),
        (json!({"name": "X", "price": "-1.00", "stock": 1}), "price"),
        (json!({"name": "X", "price": "1.00"}), "stock"),
        (
            json!({"name": "X", "price": "1.00", "stock": 1, "id": 5}),
            "id",
        ),
        (json!({"name": false, "price": "1.00", "stock": 1}), "name"),
        (
            json!({"name": "X", "description": 5, "price": "1.00", "stock": 1}),
            "description",
        ),
        (json!({"name": " \t ", "price": "1.00", "stock": 1}), "name"),
    ];
    for (body, field) in bad {
        let (status, ct, problem) = api
            .call("POST", "/api/products", Some(&admin), Some(body.clone()))
            .await;
        assert_problem(status, &ct, &problem, StatusCode::BAD_REQUEST);
        assert!(problem.to_string().contains(field), "{body}: {problem}");
    }

    let (status, _, updated) = api
        .call(
            "PUT",
            &format!("/api/products/{lamp_id}"),
            Some(&admin),
            Some(json!({"name": "Desk lamp", "price": "10", "stock": 7})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["price"], "10.00");
    assert_eq!(updated["stock"], 7);
    assert_eq!(updated["created_at"], lamp["created_at"]);
    let (status, _, _) = api
        .call(
            "PUT",
            "/api/products/999999",
            Some(&admin),
            Some(json!({"name": "Nope", "price": "1", "stock": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A product that an order refers to cannot go: the foreign key is a 409.
    api.order(&user, 1).await;
    let (status, ct, problem) = api
        .call("DELETE", "/api/products/1", Some(&admin), None)
        .await;
    assert_problem(status, &ct, &problem, StatusCode::CONFLICT);
    let (status, _, _) = api
        .call(
            "DELETE",
            &format!("/api/products/{lamp_id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = api
        .call(
            "GET",
            &format!("/api/products/{lamp_id}"),
            Some(&user),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = api
        .call(
            "DELETE",
            &format!("/api/products/{lamp_id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    tdb.drop().await;
}

#[tokio::test]
async fn not_enough_stock_is_409_naming_the_line_and_writes_nothing() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (_, token) = api.user().await;
    let admin = api.admin().await;
    api.scarce(&admin, 2, 2).await;
    let stock_1 = stock_of(&tdb, 1).await;
    let (status, ct, problem) = api
        .call(
            "POST",
            "/api/orders",
            Some(&token),
            Some(json!({"items": [
                {"product_id": 1, "quantity": 1},
                {"product_id": 2, "quantity": 3}
            ]})),
        )
        .await;
    assert_problem(status, &ct, &problem, StatusCode::CONFLICT);
    assert_eq!(problem["field"], "items[1].quantity");
    assert_eq!(count_orders(&tdb).await, 0);
    assert_eq!(
        order_items::Entity::find().count(&tdb.db).await.expect("q"),
        0
    );
    assert_eq!(
        saga_outbox::Entity::find().count(&tdb.db).await.expect("q"),
        0
    );
    assert_eq!(stock_of(&tdb, 1).await, stock_1, "line 1 not reserved");
    assert_eq!(stock_of(&tdb, 2).await, 2, "line 2 not reserved");
    // Exactly the stock there is succeeds and takes it.
    let (status, _, _) = api
        .call(
            "POST",
            "/api/orders",
            Some(&token),
            Some(json!({"items": [{"product_id": 2, "quantity": 2}]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(stock_of(&tdb, 2).await, 0);
    tdb.drop().await;
}

#[tokio::test]
async fn repeated_products_in_one_order_are_added_up_on_one_line() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (_, token) = api.user().await;
    let stock = stock_of(&tdb, 1).await;
    let (status, _, order) = api
        .call(
            "POST",
            "/api/orders",
            Some(&token),
            Some(json!({"items": [
                {"product_id": 1, "quantity": 2},
                {"product_id": 2, "quantity": 1},
                {"product_id": 1, "quantity": 3}
            ]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    let items = order["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["product_id"], 1);
    assert_eq!(items[0]["quantity"], 5);
    assert_eq!(stock_of(&tdb, 1).await, stock - 5);
    tdb.drop().await;
}

#[tokio::test]
async fn an_order_total_beyond_the_largest_amount_is_422_and_writes_nothing() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (_, token) = api.user().await;
    let admin = api.admin().await;
    let (status, _, dear) = api
        .call(
            "POST",
            "/api/products",
            Some(&admin),
            Some(json!({"name": "Dear", "price": "9999999999.99", "stock": 10})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{dear}");
    let (status, ct, problem) = api
        .call(
            "POST",
            "/api/orders",
            Some(&token),
            Some(json!({"items": [{"product_id": dear["id"], "quantity": 2}]})),
        )
        .await;
    assert_problem(status, &ct, &problem, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem["field"], "items");
    assert_eq!(count_orders(&tdb).await, 0);
    assert_eq!(stock_of(&tdb, dear["id"].as_i64().expect("id")).await, 10);
    tdb.drop().await;
}

#[tokio::test]
async fn orders_are_listed_newest_first_with_pagination_and_a_status_filter() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (_, alice) = api.user().await;
    let (_, bob) = api.user().await;
    let a1 = api.order(&alice, 1).await;
    let a2 = api.order(&alice, 1).await;
    let a3 = api.order(&alice, 1).await;
    let b1 = api.order(&bob, 1).await;
    orders::Entity::update_many()
        .col_expr(
            orders::Column::Status,
            sea_orm::sea_query::Expr::value("completed"),
        )
        .filter(orders::Column::Id.eq(a2))
        .exec(&tdb.db)
        .await
        .expect("update");
    let ids = |v: &Value| -> Vec<i64> {
        v.as_array()
            .expect("list")
            .iter()
            .map(|o| o["id"].as_i64().expect("id"))
            .collect()
    };
    let (_, _, all) = api.call("GET", "/api/orders", Some(&alice), None).await;
    assert_eq!(ids(&all), vec![a3, a2, a1]);
    let (_, _, page) = api
        .call("GET", "/api/orders?limit=2&offset=1", Some(&alice), None)
        .await;
    assert_eq!(ids(&page), vec![a2, a1]);
    let (_, _, done) = api
        .call("GET", "/api/orders?status=completed", Some(&alice), None)
        .await;
    assert_eq!(ids(&done), vec![a2]);
    assert_eq!(done[0]["status"], "completed");
    let (_, _, pending) = api
        .call("GET", "/api/orders?status=pending", Some(&bob), None)
        .await;
    assert_eq!(ids(&pending), vec![b1]);
    let admin = api.admin().await;
    let (_, _, everyone) = api.call("GET", "/api/orders", Some(&admin), None).await;
    assert_eq!(ids(&everyone), vec![b1, a3, a2, a1]);
    for bad in ["status=shipped", "limit=0", "limit=101", "offset=-1"] {
        let (status, ct, problem) = api
            .call("GET", &format!("/api/orders?{bad}"), Some(&alice), None)
            .await;
        assert_problem(status, &ct, &problem, StatusCode::BAD_REQUEST);
    }
    tdb.drop().await;
}

/// An order of `quantity` units of product 1 with `key`, which an earlier
/// order with another body holds: a 409 naming the header, with the
/// key-reused problem type.
async fn assert_key_reused<E: Endpoint>(
    api: &Api<E>,
    token: &str,
    key: &[(&str, &str)],
    quantity: i32,
) {
    let (status, ct, _, problem) = api
        .place_order(
            token,
            json!({"items": [{"product_id": 1, "quantity": quantity}]}),
            key,
        )
        .await;
    assert_problem(status, &ct, &problem, StatusCode::CONFLICT);
    assert_eq!(
        problem["type"],
        "urn:order-saga:problem:idempotency-key-reused"
    );
    assert_eq!(problem["field"], "Idempotency-Key");
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_response_and_places_nothing_new() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (_, alice) = api.user().await;
    let (_, bob) = api.user().await;
    let body = json!({"items": [{"product_id": 1, "quantity": 2}]});
    let key = [("idempotency-key", "order-7f3a")];
    let stock = stock_of(&tdb, 1).await;
    let (s1, _, _, first) = api.place_order(&alice, body.clone(), &key).await;
    assert_eq!(s1, StatusCode::CREATED, "{first}");
    let (s2, _, _, second) = api.place_order(&alice, body.clone(), &key).await;
    assert_eq!(s2, StatusCode::CREATED, "{second}");
    assert_eq!(first, second, "the same response");
    assert_eq!(count_orders(&tdb).await, 1);
    assert_eq!(stock_of(&tdb, 1).await, stock - 2, "stock reserved once");

    // The same key with another body is refused.
    assert_key_reused(&api, &alice, &key, 3).await;
    assert_eq!(count_orders(&tdb).await, 1);

    // Keys belong to their user: Bob's identical key is a new order.
    let (status, _, _, bobs) = api.place_order(&bob, body.clone(), &key).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(bobs["id"], first["id"]);
    assert_eq!(count_orders(&tdb).await, 2);

    // Without a key every request is a new order.
    api.order(&alice, 2).await;
    assert_eq!(count_orders(&tdb).await, 3);

    // An invalid key is a 400 naming the header.
    let (status, ct, _, problem) = api
        .place_order(&alice, body.clone(), &[("idempotency-key", "")])
        .await;
    assert_problem(status, &ct, &problem, StatusCode::BAD_REQUEST);
    assert!(problem.to_string().contains("Idempotency-Key"), "{problem}");
    // Not visible ASCII: refused, never treated as "no key".
    let long = "k".repeat(256);
    for bad in ["caf\u{e9}", "a b", long.as_str()] {
        let (status, ct, _, problem) = api
            .place_order(&alice, body.clone(), &[("idempotency-key", bad)])
            .await;
        assert_problem(status, &ct, &problem, StatusCode::BAD_REQUEST);
        assert_eq!(problem["field"], "Idempotency-Key", "{bad}: {problem}");
    }
    assert_eq!(count_orders(&tdb).await, 3);
    tdb.drop().await;
}

#[tokio::test]
async fn a_retry_is_answered_even_when_placing_again_would_fail() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (_, alice) = api.user().await;
    let key = [("idempotency-key", "k-then-sold-out")];
    let body = json!({"items": [{"product_id": 1, "quantity": 1}]});
    let (status, _, _, first) = api.place_order(&alice, body.clone(), &key).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    // The product sells out: placing the order again would be a 409.
    entity::products::Entity::update_many()
        .col_expr(
            entity::products::Column::Stock,
            sea_orm::sea_query::Expr::value(0),
        )
        .filter(entity::products::Column::Id.eq(1))
        .exec(&tdb.db)
        .await
        .expect("update");
    let (status, _, _, again) = api.place_order(&alice, body.clone(), &key).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert_eq!(again, first, "the first response");
    // Another body with that key is still a reused key, not "out of stock".
    assert_key_reused(&api, &alice, &key, 5).await;
    // A new key gets the stock answer.
    let (status, ct, _, problem) = api
        .place_order(&alice, body, &[("idempotency-key", "k-new")])
        .await;
    assert_problem(status, &ct, &problem, StatusCode::CONFLICT);
    assert_eq!(problem["field"], "items[0].quantity", "{problem}");
    assert_eq!(count_orders(&tdb).await, 1);
    tdb.drop().await;
}

#[tokio::test]
async fn an_expired_idempotency_key_is_forgotten() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (_, alice) = api.user().await;
    let key = [("idempotency-key", "k-expiring")];
    let body = json!({"items": [{"product_id": 1, "quantity": 1}]});
    let (status, _, _, first) = api.place_order(&alice, body.clone(), &key).await;
    assert_eq!(status, StatusCode::CREATED);
    let row = entity::idempotency_keys::Entity::find()
        .one(&tdb.db)
        .await
        .expect("q")
        .expect("key row");
    assert_eq!(row.order_id, first["id"].as_i64());
    let ttl = settings().api.idempotency_ttl_seconds as i64;
    assert_eq!((row.expires_at - row.created_at).num_seconds(), ttl);
    // Make it expire (the clock is real; move the row instead of waiting).
    entity::idempotency_keys::Entity::update_many()
        .col_expr(
            entity::idempotency_keys::Column::ExpiresAt,
            sea_orm::sea_query::Expr::value(chrono::Utc::now() - chrono::Duration::seconds(1)),
        )
        .exec(&tdb.db)
        .await
        .expect("update");
    let (status, _, _, second) = api
        .place_order(
            &alice,
            json!({"items": [{"product_id": 1, "quantity": 2}]}),
            &key,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert_ne!(second["id"], first["id"]);
    assert_eq!(count_orders(&tdb).await, 2);
    tdb.drop().await;
}

#[tokio::test]
async fn a_stored_response_that_cannot_be_read_replays_the_order_itself() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (_, alice) = api.user().await;
    let key = [("idempotency-key", "k-old-format")];
    let body = json!({"items": [{"product_id": 1, "quantity": 1}]});
    let (_, _, _, first) = api.place_order(&alice, body.clone(), &key).await;
    entity::idempotency_keys::Entity::update_many()
        .col_expr(
            entity::idempotency_keys::Column::ResponseBody,
            sea_orm::sea_query::Expr::value(json!({"from": "an older version"})),
        )
        .exec(&tdb.db)
        .await
        .expect("update");
    let (status, _, _, again) = api.place_order(&alice, body, &key).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(count_orders(&tdb).await, 1);
    tdb.drop().await;
}

#[tokio::test]
async fn two_racing_requests_with_one_idempotency_key_place_one_order() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (_, alice) = api.user().await;
    let body =
        json!({"items": [{"product_id": 1, "quantity": 1}, {"product_id": 2, "quantity": 1}]});
    for round in 0..5 {
        let key = format!("race-{round}");
        let headers = [("idempotency-key", key.as_str())];
        let (a, b) = tokio::join!(
            api.place_order(&alice, body.clone(), &headers),
            api.place_order(&alice, body.clone(), &headers),
        );
        assert_eq!(a.0, StatusCode::CREATED, "{}", a.3);
        assert_eq!(b.0, StatusCode::CREATED, "{}", b.3);
        assert_eq!(a.3["id"], b.3["id"], "round {round}: one order");
        assert_eq!(count_orders(&tdb).await, round + 1);
    }
    tdb.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_orders_for_the_same_products_all_succeed_and_reserve_their_stock() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (_, alice) = api.user().await;
    let (_, bob) = api.user().await;
    let (one, two) = (stock_of(&tdb, 1).await, stock_of(&tdb, 2).await);
    // Opposite line orders, many at once: no deadlock, no lost update.
    let forward =
        json!({"items": [{"product_id": 1, "quantity": 1}, {"product_id": 2, "quantity": 2}]});
    let backward =
        json!({"items": [{"product_id": 2, "quantity": 2}, {"product_id": 1, "quantity": 1}]});
    let requests = (0..16).map(|i| {
        let (token, body) = if i % 2 == 0 {
            (&alice, &forward)
        } else {
            (&bob, &backward)
        };
        api.place_order(token, body.clone(), &[])
    });
    let answers = futures_util::future::join_all(requests).await;
    for (status, _, _, body) in &answers {
        assert_eq!(*status, StatusCode::CREATED, "{body}");
    }
    assert_eq!(count_orders(&tdb).await, 16);
    assert_eq!(stock_of(&tdb, 1).await, one - 16);
    assert_eq!(stock_of(&tdb, 2).await, two - 32);
    tdb.drop().await;
}

/// The distinct transactions (their ids) that inserted the orders.
async fn order_transactions(tdb: &TestDatabase) -> u64 {
    use sea_orm::{ConnectionTrait, Statement};
    let row = tdb
        .db
        .query_one_raw(Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT count(DISTINCT xmin::text)::bigint AS n FROM orders",
        ))
        .await
        .expect("query")
        .expect("row");
    row.try_get::<i64>("", "n").expect("n") as u64
}

/// A transaction holding product 1's row lock (commit it to let go).
async fn lock_product_1(tdb: &TestDatabase) -> sea_orm::DatabaseTransaction {
    use sea_orm::{ConnectionTrait, Statement, TransactionTrait};
    let hold = tdb.db.begin().await.expect("begin");
    hold.execute_raw(Statement::from_string(
        sea_orm::DbBackend::Postgres,
        "SELECT id FROM products WHERE id = 1 FOR UPDATE",
    ))
    .await
    .expect("lock product 1");
    hold
}

/// Sends `bodies` (with their headers) at once while product 1 is locked by
/// another transaction, so the one placement worker is held until every
/// request waits; then lets them go. Returns the answers in order.
async fn place_while_held<E: Endpoint>(
    api: &Api<E>,
    state: &AppState,
    tdb: &TestDatabase,
    token: &str,
    bodies: &[(Value, Vec<(String, String)>)],
) -> Vec<(StatusCode, String, poem::http::HeaderMap, Value)> {
    let hold = lock_product_1(tdb).await;
    let requests = bodies.iter().map(|(body, headers)| {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        async move { api.place_order(token, body.clone(), &headers).await }
    });
    let release = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while state.placer.pending() < bodies.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} of {} requests reached the placement queue",
                state.placer.pending(),
                bodies.len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        hold.commit().await.expect("release product 1");
    };
    let (answers, ()) = tokio::join!(futures_util::future::join_all(requests), release);
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_orders_share_a_transaction_and_a_failing_one_is_answered_alone() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let mut settings = settings();
    settings.api.order_batch_workers = 1;
    settings.api.order_batch_max = 32;
    let (api, state) = api_and_state(&tdb, settings).await;
    let (_, token) = api.user().await;
    let admin = api.admin().await;
    api.scarce(&admin, 3, 0).await;
    let line = |product: i64| json!({"items": [{"product_id": product, "quantity": 1}]});
    let (one, two) = (stock_of(&tdb, 1).await, stock_of(&tdb, 2).await);

    // 20 good orders while the worker is held: at most two transactions
    // (the one held, and one for everything that waited).
    let good: Vec<(Value, Vec<(String, String)>)> =
        (0..20).map(|i| (line(1 + i % 2), vec![])).collect();
    let answers = place_while_held(&api, &state, &tdb, &token, &good).await;
    for (status, _, _, body) in &answers {
        assert_eq!(*status, StatusCode::CREATED, "{body}");
    }
    assert_eq!(count_orders(&tdb).await, 20);
    let transactions = order_transactions(&tdb).await;
    assert!(
        transactions <= 2,
        "20 orders in {transactions} transactions"
    );
    assert_eq!(stock_of(&tdb, 1).await, one - 10);
    assert_eq!(stock_of(&tdb, 2).await, two - 10);

    // A batch with an order that cannot be placed, and one key sent twice:
    // every order is answered as it would have been alone.
    let mut mixed: Vec<(Value, Vec<(String, String)>)> = (0..16)
        .map(|i| {
            (
                line(1 + i % 2),
                vec![("idempotency-key".to_owned(), format!("k-{i}"))],
            )
        })
        .collect();
    mixed.insert(
        7,
        (
            line(3),
            vec![("idempotency-key".to_owned(), "k-out".to_owned())],
        ),
    );
    mixed.push((
        line(2),
        vec![("idempotency-key".to_owned(), "k-3".to_owned())],
    ));
    let answers = place_while_held(&api, &state, &tdb, &token, &mixed).await;
    let (status, ct, _, problem) = &answers[7];
    assert_problem(*status, ct, problem, StatusCode::CONFLICT);
    assert_eq!(problem["field"], "items[0].quantity", "{problem}");
    for (i, (status, _, _, body)) in answers.iter().enumerate() {
        if i != 7 {
            assert_eq!(*status, StatusCode::CREATED, "request {i}: {body}");
        }
    }
    // k-3 was sent twice with the same body: one order, answered twice.
    assert_eq!(answers[3].3["id"], answers[17].3["id"]);
    assert_eq!(count_orders(&tdb).await, 20 + 16);
    assert_eq!(stock_of(&tdb, 1).await, one - 10 - 8);
    assert_eq!(stock_of(&tdb, 2).await, two - 10 - 8);
    assert_eq!(stock_of(&tdb, 3).await, 0);
    // The failed request left no key: once there is stock, its retry places.
    api.scarce(&admin, 3, 1).await;
    let (status, _, _, body) = api
        .place_order(&token, line(3), &[("idempotency-key", "k-out")])
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(state.placer.pending(), 0);
    tdb.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_whose_request_went_away_before_it_was_taken_is_not_placed() {
    use sea_orm::{ConnectionTrait, Statement};
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let mut settings = settings();
    settings.api.order_batch_workers = 1;
    let (api, state) = api_and_state(&tdb, settings).await;
    let (_, token) = api.user().await;
    let line = |product: i64| json!({"items": [{"product_id": product, "quantity": 1}]});
    let stock_2 = stock_of(&tdb, 2).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let poll = || async {
        assert!(std::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };

    // The one worker takes order A and waits for product 1's row lock.
    let hold = lock_product_1(&tdb).await;
    let first = api.place_order(&token, line(1), &[]);
    let gone = async {
        let waiting_on_lock = format!(
            "SELECT count(*)::bigint AS n FROM pg_stat_activity \
             WHERE datname = '{}' AND wait_event_type = 'Lock'",
            tdb.name
        );
        loop {
            let row = tdb
                .db
                .query_one_raw(Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    waiting_on_lock.clone(),
                ))
                .await
                .expect("query")
                .expect("row");
            if row.try_get::<i64>("", "n").expect("n") > 0 {
                break;
            }
            poll().await;
        }
        // Order B waits in the queue behind A; its request goes away.
        let mut second = Box::pin(api.place_order(&token, line(2), &[]));
        while state.placer.pending() < 2 {
            tokio::select! {
                _ = &mut second => panic!("B was answered while the worker was held"),
                () = poll() => {}
            }
        }
        drop(second);
        assert_eq!(state.placer.pending(), 1, "B's request is gone");
        hold.commit().await.expect("release product 1");
    };
    let (first, ()) = tokio::join!(first, gone);
    assert_eq!(first.0, StatusCode::CREATED, "{}", first.3);
    // C, behind B in the queue: once it is answered, B was looked at.
    let (status, _, _, body) = api.place_order(&token, line(3), &[]).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(count_orders(&tdb).await, 2, "A and C, not B");
    assert_eq!(stock_of(&tdb, 2).await, stock_2);
    assert_eq!(state.placer.pending(), 0);
    tdb.drop().await;
}

#[tokio::test]
async fn notifications_are_read_only_filtered_and_scoped_to_their_owner() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (alice_id, alice) = api.user().await;
    let (bob_id, bob) = api.user().await;
    let a1 = api.order(&alice, 1).await;
    let a2 = api.order(&alice, 1).await;
    let b1 = api.order(&bob, 1).await;
    let now = chrono::Utc::now();
    for (order_id, user_id, event) in [
        (a1, alice_id, "OrderCreated"),
        (a1, alice_id, "OrderCompleted"),
        (a2, alice_id, "OrderCreated"),
        (b1, bob_id, "OrderCreated"),
    ] {
        entity::notifications::Entity::insert(entity::notifications::ActiveModel {
            order_id: sea_orm::Set(order_id),
            user_id: sea_orm::Set(user_id),
            event_type: sea_orm::Set(event.into()),
            message: sea_orm::Set(format!("{event} {order_id}")),
            is_email_sent: sea_orm::Set(event == "OrderCompleted"),
            created_at: sea_orm::Set(now),
            metadata: sea_orm::Set(json!({})),
            ..Default::default()
        })
        .exec(&tdb.db)
        .await
        .expect("insert");
    }
    let pairs = |v: &Value| -> Vec<(i64, String)> {
        v.as_array()
            .expect("list")
            .iter()
            .map(|n| {
                (
                    n["order_id"].as_i64().expect("order"),
                    n["event_type"].as_str().expect("type").to_owned(),
                )
            })
            .collect()
    };
    let (status, _, mine) = api
        .call("GET", "/api/notifications", Some(&alice), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        pairs(&mine),
        vec![
            (a2, "OrderCreated".into()),
            (a1, "OrderCompleted".into()),
            (a1, "OrderCreated".into())
        ]
    );
    let (_, _, by_order) = api
        .call(
            "GET",
            &format!("/api/notifications?order_id={a1}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(by_order.as_array().expect("list").len(), 2);
    let (_, _, by_type) = api
        .call(
            "GET",
            &format!("/api/notifications?order_id={a1}&event_type=OrderCompleted"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(pairs(&by_type), vec![(a1, "OrderCompleted".into())]);
    // Bob asking for Alice's order sees nothing of it.
    let (_, _, bobs) = api
        .call(
            "GET",
            &format!("/api/notifications?order_id={a1}"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(bobs.as_array().expect("list").len(), 0);
    let (_, _, bobs) = api
        .call("GET", "/api/notifications", Some(&bob), None)
        .await;
    assert_eq!(pairs(&bobs), vec![(b1, "OrderCreated".into())]);
    let admin = api.admin().await;
    let (_, _, all) = api
        .call("GET", "/api/notifications", Some(&admin), None)
        .await;
    assert_eq!(all.as_array().expect("list").len(), 4);
    let (status, ct, problem) = api
        .call(
            "GET",
            "/api/notifications?event_type=OrderShipped",
            Some(&alice),
            None,
        )
        .await;
    assert_problem(status, &ct, &problem, StatusCode::BAD_REQUEST);
    // Read-only: no method writes notifications.
    let (status, _, headers, _) = api
        .send(
            "POST",
            "/api/notifications",
            Some(&alice),
            Some(json!({})),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers.get("allow").expect("allow header"), "GET");
    tdb.drop().await;
}

#[tokio::test]
async fn an_orders_history_is_its_journal_in_order() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (_, alice) = api.user().await;
    let id = api.order(&alice, 1).await;
    let (status, _, history) = api
        .call(
            "GET",
            &format!("/api/orders/{id}/history"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{history}");
    let rows = history.as_array().expect("list");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["from_state"], Value::Null);
    assert_eq!(rows[0]["to_state"], "pending");
    assert_eq!(rows[0]["trigger"], "OrderPlaced");
    assert_eq!(rows[0]["outcome"], "applied");
    assert!(rows[0]["message_id"].is_string());
    assert_eq!(rows[0]["attempt"], 1);
    let (status, _, _) = api
        .call("GET", "/api/orders/999999/history", Some(&alice), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    tdb.drop().await;
}

#[tokio::test]
async fn the_saga_diagram_and_transition_table_are_public() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let resp = api.client.get("/api/sagas/order/diagram").send().await.0;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/plain"))
    );
    let text = resp.into_body().into_string().await.expect("text");
    assert_eq!(
        text,
        saga::describe::mermaid(&::orders::OrderSaga::default())
    );
    assert!(text.starts_with("stateDiagram-v2"));
    let (status, _, table) = api
        .call("GET", "/api/sagas/order/transitions", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        table.as_array().expect("rows").len(),
        saga::describe::transitions(&::orders::OrderSaga::default()).len()
    );
    assert!(table.as_array().expect("rows").iter().any(|r| {
        r["from"] == "processing"
            && r["input"] == "PaymentDecided(approved)"
            && r["to"] == "completed"
    }));
    tdb.drop().await;
}

#[tokio::test]
async fn bodies_over_64_kib_are_413_with_or_without_content_length() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (_, token) = api.user().await;
    let big = format!(
        "{{\"items\": [{{\"product_id\": 1, \"quantity\": 1}}], \"pad\": \"{}\"}}",
        "x".repeat(70 * 1024)
    );
    // With Content-Length.
    let resp = api
        .client
        .post("/api/orders")
        .header("authorization", format!("Bearer {token}"))
        .content_type("application/json")
        .header("content-length", big.len().to_string())
        .body(big.clone())
        .send()
        .await
        .0;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Chunked: a stream without Content-Length.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
        .as_bytes()
        .chunks(8 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let resp = api
        .client
        .post("/api/orders")
        .header("authorization", format!("Bearer {token}"))
        .content_type("application/json")
        .body(poem::Body::from_bytes_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .0;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        resp.headers().get("content-type").expect("type"),
        "application/problem+json"
    );
    let problem: Value =
        serde_json::from_slice(&resp.into_body().into_vec().await.expect("body")).expect("json");
    assert_eq!(problem["status"], 413);
    assert_eq!(count_orders(&tdb).await, 0);
    // Just under the cap is read (and rejected for its unknown field).
    let small = "{\"items\": [{\"product_id\": 1, \"quantity\": 1}]}".to_owned();
    let resp = api
        .client
        .post("/api/orders")
        .header("authorization", format!("Bearer {token}"))
        .content_type("application/json")
        .body(small)
        .send()
        .await
        .0;
    assert_eq!(resp.status(), StatusCode::CREATED);
    tdb.drop().await;
}

#[tokio::test]
async fn a_body_that_is_not_json_is_415() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    let (_, token) = api.user().await;
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut req = api
            .client
            .post("/api/orders")
            .header("authorization", format!("Bearer {token}"));
        if let Some(ct) = content_type {
            req = req.content_type(ct);
        }
        let resp = req.body("items=1").send().await.0;
        let status = resp.status();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body: Value = serde_json::from_slice(&resp.into_body().into_vec().await.expect("body"))
            .unwrap_or(Value::Null);
        assert_problem(status, &ct, &body, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
    tdb.drop().await;
}

#[tokio::test]
async fn failed_logins_per_account_and_attempts_per_address_are_limited_with_429() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let mut s = settings();
    s.auth.login_max_failures_per_account = 3;
    s.auth.login_max_attempts_per_address = 8;
    let api = api_with(&tdb, s).await;
    let email = "limited@example.com";
    let (status, _, _) = api
        .call(
            "POST",
            "/api/users",
            None,
            Some(json!({"name": "L", "email": email, "password": "password-1"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let login = |password: &'static str| json!({"email": email, "password": password});
    for _ in 0..3 {
        let (status, _, problem) = api
            .call(
                "POST",
                "/api/auth/login",
                None,
                Some(login("wrong-password")),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            !problem.to_string().contains("wrong-password"),
            "no secret echoed"
        );
    }
    // The account is locked for the window, even with the right password.
    let (status, ct, headers, problem) = api
        .send(
            "POST",
            "/api/auth/login",
            None,
            Some(login("password-1")),
            &[],
        )
        .await;
    assert_problem(status, &ct, &problem, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = headers
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    // Other accounts from this address still log in, until the address's
    // budget (8 attempts, 4 used) is spent.
    for i in 0..4 {
        let (status, _, _) = api
            .call(
                "POST",
                "/api/auth/login",
                None,
                Some(json!({"email": format!("nobody-{i}@example.com"), "password": "whatever-1"})),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    let (status, ct, headers, problem) = api
        .send(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({"email": "someone-else@example.com", "password": "whatever-1"})),
            &[],
        )
        .await;
    assert_problem(status, &ct, &problem, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.get("retry-after").is_some());
    tdb.drop().await;
}

#[tokio::test]
async fn a_successful_login_clears_the_accounts_failures() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let mut s = settings();
    s.auth.login_max_failures_per_account = 2;
    let api = api_with(&tdb, s).await;
    let (_, _) = api.user().await;
    let email = "again@example.com";
    api.call(
        "POST",
        "/api/users",
        None,
        Some(json!({"name": "A", "email": email, "password": "password-1"})),
    )
    .await;
    for password in ["bad-one-1", "password-1", "bad-two-2", "password-1"] {
        let (status, _, _) = api
            .call(
                "POST",
                "/api/auth/login",
                None,
                Some(json!({"email": email, "password": password})),
            )
            .await;
        let want = if password == "password-1" {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(status, want, "{password}");
    }
    tdb.drop().await;
}

#[tokio::test]
async fn tokens_are_checked_for_algorithm_issuer_audience_and_lifetime() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let s = settings();
    let api = api(&tdb).await;
    let (id, good) = api.user().await;
    let (status, _, _) = api.call("GET", "/api/users/me", Some(&good), None).await;
    assert_eq!(status, StatusCode::OK);
    let key = EncodingKey::from_secret(s.auth.jwt_secret.expose().as_bytes());
    let now = chrono::Utc::now().timestamp();
    let claims = |iss: &str, aud: &str, iat: i64, exp: i64| json!({"sub": id.to_string(), "role": "admin", "iss": iss, "aud": aud, "iat": iat, "exp": exp});
    let (iss, aud) = (s.auth.issuer.as_str(), s.auth.audience.as_str());
    let ttl = s.auth.token_ttl_seconds as i64;
    let cases = vec![
        (
            "another issuer",
            Algorithm::HS256,
            claims("evil", aud, now, now + 60),
        ),
        (
            "another audience",
            Algorithm::HS256,
            claims(iss, "evil", now, now + 60),
        ),
        (
            "expired",
            Algorithm::HS256,
            claims(iss, aud, now - 600, now - 60),
        ),
        (
            "longer than the configured lifetime",
            Algorithm::HS256,
            claims(iss, aud, now, now + ttl + 3600),
        ),
        (
            "another algorithm",
            Algorithm::HS512,
            claims(iss, aud, now, now + 60),
        ),
        (
            "no expiry",
            Algorithm::HS256,
            json!({"sub": id.to_string(), "role": "admin", "iss": iss, "aud": aud, "iat": now}),
        ),
    ];
    for (what, alg, claims) in cases {
        let token = encode(&Header::new(alg), &claims, &key).expect("encode");
        let (status, ct, problem) = api.call("GET", "/api/users/me", Some(&token), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
        assert_problem(status, &ct, &problem, StatusCode::UNAUTHORIZED);
    }
    // alg "none": header {"alg":"none"} and no signature.
    let b64 = |v: Value| {
        use std::fmt::Write;
        let bytes = v.to_string().into_bytes();
        // base64url without padding, by hand to avoid a dependency.
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                let _ = write!(out, "{}", A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    };
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(claims(iss, aud, now, now + 60))
    );
    let (status, _, _) = api.call("GET", "/api/users/me", Some(&none), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "alg none");
    tdb.drop().await;
}

#[test]
fn a_signing_key_shorter_than_256_bits_is_refused() {
    let mut s = settings();
    s.auth.jwt_secret = settings::Secret::new("x".repeat(31));
    let err = hosts::api::auth::JwtKeys::new(&s.auth)
        .err()
        .expect("short key refused");
    assert!(err.to_string().contains("256 bits"), "{err}");
    assert!(
        !err.to_string().contains(&"x".repeat(31)),
        "no secret in the error"
    );
    s.auth.jwt_secret = settings::Secret::new("x".repeat(32));
    assert!(hosts::api::auth::JwtKeys::new(&s.auth).is_ok());
}

#[tokio::test]
async fn cors_headers_are_sent_only_for_configured_origins() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let mut s = settings();
    s.api.cors_allowed_origins = vec!["https://shop.example.com".into()];
    let api = api_with(&tdb, s).await;
    let preflight = |origin: &'static str| {
        api.client
            .options("/api/orders")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, idempotency-key",
            )
            .send()
    };
    let ok = preflight("https://shop.example.com").await.0;
    assert!(ok.status().is_success(), "{}", ok.status());
    assert_eq!(
        ok.headers()
            .get("access-control-allow-origin")
            .expect("allow-origin"),
        "https://shop.example.com"
    );
    let other = preflight("https://evil.example.com").await.0;
    assert!(other.headers().get("access-control-allow-origin").is_none());
    // Without configured origins there are no CORS headers at all.
    let plain = api_with(&tdb, settings()).await;
    let resp = plain
        .client
        .get("/health")
        .header("origin", "https://shop.example.com")
        .send()
        .await
        .0;
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    tdb.drop().await;
}

#[tokio::test]
async fn an_unsupported_method_is_405_with_an_allow_header() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let api = api(&tdb).await;
    for (method, path, allow) in [
        ("DELETE", "/api/orders", "GET, POST"),
        ("PUT", "/api/orders/1", "GET"),
        ("POST", "/api/products/1", "DELETE, GET, PUT"),
        ("DELETE", "/api/users/me", "GET"),
    ] {
        let (status, ct, headers, problem) = api.send(method, path, None, None, &[]).await;
        assert_problem(status, &ct, &problem, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            headers.get("allow").expect("Allow"),
            allow,
            "{method} {path}"
        );
    }
    tdb.drop().await;
}

fn snapshot_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/openapi.json")
}

/// The spec is committed: a change to the API shows up as a diff to review.
/// `UPDATE_SNAPSHOTS=1 cargo test -p hosts --test api` rewrites it.
#[test]
fn the_openapi_spec_matches_the_committed_snapshot() {
    let spec = api::spec_json();
    let path = snapshot_path();
    if std::env::var("UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, format!("{spec}\n")).expect("write snapshot");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{} is missing ({e}); create it with UPDATE_SNAPSHOTS=1 cargo test -p hosts --test api",
            path.display()
        )
    });
    let want: Value = serde_json::from_str(&committed).expect("snapshot is JSON");
    let got: Value = serde_json::from_str(&spec).expect("spec is JSON");
    assert!(
        want == got,
        "the OpenAPI spec changed; review the change and rerun with UPDATE_SNAPSHOTS=1 to accept it"
    );
}

#[test]
fn every_operation_has_a_summary_a_tag_documented_errors_and_examples() {
    let spec: Value = serde_json::from_str(&api::spec_json()).expect("json");
    let public = [
        "post /api/users",
        "post /api/auth/login",
        "get /api/sagas/order/diagram",
        "get /api/sagas/order/transitions",
        "get /health",
        "get /health/live",
        "get /health/ready",
    ];
    let mut failures = Vec::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("ops") {
            let name = format!("{method} {path}");
            if op["summary"].as_str().is_none_or(str::is_empty) {
                failures.push(format!("{name}: no summary"));
            }
            if op["tags"].as_array().is_none_or(Vec::is_empty) {
                failures.push(format!("{name}: no tag"));
            }
            let responses = op["responses"].as_object().expect("responses");
            if !responses.keys().any(|s| s.starts_with('2')) {
                failures.push(format!("{name}: no success response"));
            }
            let secured = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("BearerAuth").is_some()));
            if secured == public.contains(&name.as_str()) {
                failures.push(format!("{name}: security is {secured}"));
            }
            if secured && !responses.contains_key("401") {
                failures.push(format!("{name}: 401 not documented"));
            }
        }
    }
    // Each operation lists the errors it can answer, not every error.
    let statuses = |method: &str, path: &str| -> Vec<String> {
        spec["paths"][path][method]["responses"]
            .as_object()
            .expect("responses")
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(
        statuses("post", "/api/auth/login"),
        ["200", "400", "401", "413", "415", "429", "500"]
    );
    assert_eq!(
        statuses("get", "/api/orders/{id}"),
        ["200", "400", "401", "404", "500"]
    );
    assert_eq!(
        statuses("post", "/api/orders"),
        ["201", "400", "401", "409", "413", "415", "422", "500"]
    );
    assert_eq!(
        statuses("delete", "/api/products/{id}"),
        ["204", "400", "401", "403", "404", "409", "500"]
    );
    // Every object schema that a response returns has an example.
    for (name, schema) in spec["components"]["schemas"].as_object().expect("schemas") {
        if schema["type"] == "object" && schema.get("example").is_none() {
            let is_request_part = name == "OrderItemRequest" || name == "OrderItemView";
            if !is_request_part {
                failures.push(format!("schema {name}: no example"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
