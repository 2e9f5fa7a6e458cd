//! Logs and traces across processes: the real `api`, `runner` and
//! `scheduler` binaries (own database, exchange and queues), with JSON logs
//! and OTLP/HTTP export pointed at a small collector this test runs. One
//! declined order, from `POST /api/orders` (with the caller's
//! `traceparent`) to its expiry, must be one trace over all three services,
//! and every log line about it must carry its ids.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Api, Processes, free_port, host_env};
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::web::Data;
use poem::{EndpointExt, Route, Server, handler, post};
use saga::testing::{TestBroker, TestDatabase};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(60);

/// Bodies of the `POST /v1/traces` requests the collector received.
type Received = Arc<Mutex<Vec<Value>>>;

#[handler]
fn receive_traces(
    body: poem::web::Json<Value>,
    received: Data<&Received>,
) -> poem::web::Json<Value> {
    received.lock().expect("collector lock").push(body.0);
    // An empty ExportTraceServiceResponse: everything accepted.
    poem::web::Json(json!({}))
}

/// An OTLP/HTTP (JSON) trace collector on 127.0.0.1; returns its base URL,
/// what it received, and a handle that stops it when dropped.
async fn start_collector() -> (String, Received, tokio::task::JoinHandle<()>) {
    let acceptor = TcpListener::bind("127.0.0.1:0")
        .into_acceptor()
        .await
        .expect("collector port");
    let addr = acceptor
        .local_addr()
        .first()
        .and_then(|a| a.as_socket_addr().copied())
        .expect("collector address");
    let received = Received::default();
    let app = Route::new()
        .at("/v1/traces", post(receive_traces))
        .data(received.clone());
    let server = tokio::spawn(async move {
        let _ = Server::new_with_acceptor(acceptor).run(app).await;
    });
    (format!("http://{addr}"), received, server)
}

/// One exported span, flattened.
#[derive(Clone, Debug)]
struct ExportedSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_id: String,
    start: u64,
    attributes: BTreeMap<String, String>,
}

/// The spans in OTLP JSON export requests.
fn spans_of(requests: &[Value]) -> Vec<ExportedSpan> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut spans = Vec::new();
    for request in requests {
        for rs in request["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .map(|a| text(&a["value"]["stringValue"]))
                .unwrap_or_default();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    let attributes = s["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            let value = a["value"]
                                .as_object()
                                .and_then(|o| o.values().next())
                                .map(text)
                                .unwrap_or_default();
                            (text(&a["key"]), value)
                        })
                        .collect();
                    spans.push(ExportedSpan {
                        service: service.clone(),
                        name: text(&s["name"]),
                        trace_id: text(&s["traceId"]).to_lowercase(),
                        span_id: text(&s["spanId"]).to_lowercase(),
                        parent_id: text(&s["parentSpanId"]).to_lowercase(),
                        start: text(&s["startTimeUnixNano"]).parse().unwrap_or(0),
                        attributes,
                    });
                }
            }
        }
    }
    spans
}

/// Prints a trace as an indented tree (service, span name, span id, parent
/// id), children in start order.
fn print_trace(spans: &[ExportedSpan], root_parent: &str) {
    let mut children: HashMap<&str, Vec<&ExportedSpan>> = HashMap::new();
    for s in spans {
        children.entry(s.parent_id.as_str()).or_default().push(s);
    }
    for list in children.values_mut() {
        list.sort_by_key(|s| s.start);
    }
    fn walk(
        children: &HashMap<&str, Vec<&ExportedSpan>>,
        parent: &str,
        depth: usize,
        out: &mut String,
    ) {
        for s in children.get(parent).into_iter().flatten() {
            let detail = ["message_type", "consumer", "timer_kind"]
                .iter()
                .filter_map(|k| s.attributes.get(*k).map(|v| format!("{k}={v}")))
                .collect::<Vec<_>>()
                .join(" ");
            out.push_str(&format!(
                "{:<10} {:<40} span {} parent {} {}\n",
                s.service,
                format!("{}{}", "  ".repeat(depth), s.name),
                s.span_id,
                s.parent_id,
                detail
            ));
            walk(children, &s.span_id, depth + 1, out);
        }
    }
    let mut out = String::new();
    walk(&children, root_parent, 0, &mut out);
    println!(
        "trace {} ({} spans):\n{out}",
        spans[0].trace_id,
        spans.len()
    );
}

/// The fields of a JSON log line: the event's own and those of every span
/// it is in (`span`, `spans`).
fn fields_of(line: &Value) -> BTreeMap<String, Value> {
    let mut fields = BTreeMap::new();
    for span in line["spans"].as_array().into_iter().flatten() {
        for (k, v) in span.as_object().into_iter().flatten() {
            fields.insert(k.clone(), v.clone());
        }
    }
    for (k, v) in line.as_object().into_iter().flatten() {
        if k != "spans" && k != "span" {
            fields.insert(k.clone(), v.clone());
        }
    }
    fields
}

fn same_id(value: Option<&Value>, id: i64) -> bool {
    match value {
        Some(Value::String(s)) => s == &id.to_string(),
        Some(Value::Number(n)) => n.as_i64() == Some(id),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_declined_order_is_one_trace_across_api_runner_and_scheduler_with_ids_in_every_log_line()
 {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let (collector, received, collector_task) = start_collector().await;

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut env = host_env(&tdb, &broker, port);
    env.extend(
        [
            // Declined: the order stays processing until the sweep expires it.
            ("APP__PAYMENT__SUCCESS_RATE", "0".to_owned()),
            (
                "APP__EXPIRATION__PROCESSING_TIMEOUT_SECONDS",
                "1".to_owned(),
            ),
            ("APP__LOGGING__FORMAT", "json".to_owned()),
            ("APP__TRACING__OTLP_ENDPOINT", collector.clone()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );

    let mut procs = Processes::new("tracing");
    procs.spawn("api", env!("CARGO_BIN_EXE_api"), &[], &env);
    let api = Api::new(base.clone());
    api.wait_healthy(WITHIN).await;
    procs.spawn("runner", env!("CARGO_BIN_EXE_runner"), &[], &env);
    procs.spawn("scheduler", env!("CARGO_BIN_EXE_scheduler"), &[], &env);
    let (token, _user) = api.register_and_login().await;

    // The caller is traced already: the API continues its trace.
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let caller_span = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let response = reqwest::Client::new()
        .post(format!("{base}/api/orders"))
        .bearer_auth(&token)
        .header("traceparent", &traceparent)
        .json(&json!({"items": [{"product_id": 1, "quantity": 1}]}))
        .send()
        .await
        .expect("order request");
    assert_eq!(response.status().as_u16(), 201);
    let order: Value = response.json().await.expect("order body");
    let id = order["id"].as_i64().expect("order id");

    api.wait_for_status(&mut procs, &token, &[id], "expired", WITHIN)
        .await;
    // The runner's notifications consumer has handled OrderExpired.
    api.assert_one_notification_each(&token, &[id], "OrderExpired", false, "OrderCompleted")
        .await;

    // SIGTERM: each host exports its buffered spans before it exits.
    for name in ["api", "scheduler", "runner"] {
        let status = procs.terminate(name).await;
        assert!(status.success(), "{name} exited with {status}");
    }

    // --- traces ---
    let requests = received.lock().expect("collector lock").clone();
    let all = spans_of(&requests);
    let trace: Vec<ExportedSpan> = all
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .cloned()
        .collect();
    if trace.is_empty() {
        procs.fail(&format!(
            "no span of trace {trace_id} among {} exported spans",
            all.len()
        ));
    }
    print_trace(&trace, &caller_span);
    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from(["api", "runner", "scheduler"]),
        "services in the trace"
    );
    let names_of = |service: &str| -> BTreeSet<&str> {
        trace
            .iter()
            .filter(|s| s.service == service)
            .map(|s| s.name.as_str())
            .collect()
    };
    for name in ["POST /api/orders", "order.place"] {
        assert!(names_of("api").contains(name), "api span {name}");
    }
    for name in ["message.handle", "timer.fire"] {
        assert!(names_of("runner").contains(name), "runner span {name}");
    }
    assert!(
        names_of("scheduler").contains("state.timeout"),
        "scheduler span state.timeout"
    );
    // Every host runs a relay and any relay may publish any row: each event
    // was published once, by some host.
    for event in ["OrderCreated", "OrderExpired"] {
        let published = trace
            .iter()
            .filter(|s| s.name == "outbox.publish")
            .filter(|s| s.attributes.get("message_type").map(String::as_str) == Some(event))
            .count();
        assert_eq!(published, 1, "outbox.publish spans of {event}");
    }
    // The runner handled OrderCreated (saga and notifications) and
    // OrderExpired (notifications) in this trace.
    let handled: BTreeSet<(String, String)> = trace
        .iter()
        .filter(|s| s.name == "message.handle")
        .map(|s| {
            (
                s.attributes.get("consumer").cloned().unwrap_or_default(),
                s.attributes
                    .get("message_type")
                    .cloned()
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        handled.iter().any(|(_, t)| t == "OrderCreated")
            && handled.iter().any(|(_, t)| t == "OrderExpired"),
        "handled messages: {handled:?}"
    );
    // One tree: the HTTP span is the child of the caller's span, and every
    // other span's parent is in the trace.
    let ids: BTreeSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    for s in &trace {
        if s.name == "POST /api/orders" {
            assert_eq!(
                s.parent_id, caller_span,
                "the API continues the caller's span"
            );
        } else {
            assert!(
                ids.contains(s.parent_id.as_str()),
                "{} {} has a parent outside the trace: {}",
                s.service,
                s.name,
                s.parent_id
            );
        }
        if let Some(order_id) = s.attributes.get("order_id") {
            assert_eq!(order_id, &id.to_string(), "{} {}", s.service, s.name);
        }
        if let Some(correlation_id) = s.attributes.get("correlation_id") {
            assert_eq!(correlation_id, &id.to_string(), "{} {}", s.service, s.name);
        }
    }
    // The expiry (the order saga's state timeout) continues the runner's
    // payment decision.
    let expire = trace
        .iter()
        .find(|s| s.name == "state.timeout")
        .expect("state.timeout");
    assert_eq!(
        expire.attributes.get("saga_type").map(String::as_str),
        Some("order")
    );
    assert_eq!(
        expire.attributes.get("state").map(String::as_str),
        Some("processing")
    );
    let fire = trace
        .iter()
        .find(|s| s.name == "timer.fire")
        .expect("timer.fire");
    assert_eq!(
        expire.parent_id, fire.span_id,
        "expiry continues the timer's span"
    );

    // --- logs ---
    // No line is lost between the filters (a per-layer filter once dropped
    // the line after each database query).
    for (name, line) in [
        ("api", "database schema is up to date"),
        ("runner", "runner started"),
        ("scheduler", "scheduler started"),
    ] {
        assert!(
            procs.log(name).contains(line),
            "{name} did not log `{line}`"
        );
    }
    let mut about_order = 0;
    let mut in_handlers = BTreeSet::new();
    for name in ["api", "runner", "scheduler"] {
        for line in procs.log(name).lines().filter(|l| !l.trim().is_empty()) {
            let Ok(parsed) = serde_json::from_str::<Value>(line) else {
                procs.fail(&format!("{name} wrote a line that is not JSON: {line}"));
            };
            let fields = fields_of(&parsed);
            // The library names the instance by its correlation id (the
            // order id); the order saga's own spans add `order_id`.
            if !same_id(fields.get("correlation_id"), id) && !same_id(fields.get("order_id"), id) {
                continue;
            }
            about_order += 1;
            assert!(
                same_id(fields.get("correlation_id"), id),
                "{name}: no correlation_id: {line}"
            );
            if let Some(order_id) = fields.get("order_id") {
                assert!(same_id(Some(order_id), id), "{name}: another order: {line}");
            }
            assert_eq!(
                fields.get("trace_id").and_then(Value::as_str),
                Some(trace_id.as_str()),
                "{name}: no trace_id: {line}"
            );
            let in_handler = parsed["spans"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["name"] == "message.handle");
            if in_handler || name == "api" {
                let message_id = fields
                    .get("message_id")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                assert!(
                    uuid::Uuid::parse_str(message_id).is_ok(),
                    "{name}: no message_id: {line}"
                );
            }
            if in_handler {
                assert!(fields.contains_key("message_type"), "{name}: {line}");
                in_handlers.insert(format!(
                    "{} {}",
                    fields.get("consumer").and_then(Value::as_str).unwrap_or(""),
                    fields
                        .get("message_type")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                ));
            }
        }
    }
    assert!(
        about_order >= 4,
        "only {about_order} log lines about order {id}"
    );
    assert!(
        in_handlers.iter().any(|h| h.ends_with("OrderCreated"))
            && in_handlers.iter().any(|h| h.ends_with("OrderExpired")),
        "handler log lines: {in_handlers:?}"
    );

    collector_task.abort();
    procs.stop().await;
    broker.delete().await;
    tdb.drop().await;
}
