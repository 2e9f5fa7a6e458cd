//! The compose configuration, proven without a Docker engine.
//!
//! The same is done for the `kafka` profile's hosts (`api-kafka`,
//! `runner-kafka`, `scheduler-kafka`) on the local Kafka-protocol broker
//! (`KAFKA_BOOTSTRAP`, default 127.0.0.1:19092): there `kafka:9092` becomes
//! that broker, `postgres-kafka` and `api-kafka` become `127.0.0.1`, and
//! `APP__KAFKA__TOPIC_PREFIX` (the test's own topics, created first) and
//! short group timeouts (`APP__KAFKA__SESSION_TIMEOUT_MS` /
//! `MAX_POLL_INTERVAL_MS` 3000) are added. The `kafka` service itself (the
//! apache/kafka image in KRaft mode) is checked statically.
//!
//! `docker-compose.yml` is read (YAML merge keys applied, `${VAR}`
//! interpolated from `.env.example`, as `docker compose` would with that file
//! as `.env`). Each host service (`api`, `runner`, `scheduler`) is started as
//! the real binary named by its `command`, with exactly its `environment`
//! (runner and scheduler twice each, as with `--scale`), in `depends_on` order, each waiting for the services it depends on to be
//! healthy (the api through the compose `healthcheck` command itself). The
//! only changes, all made visibly below in [`Substitutions`]:
//!
//! - the compose service host names `postgres`, `rabbitmq` and `api` become
//!   `127.0.0.1` (this machine's PostgreSQL and RabbitMQ);
//! - the database name becomes a fresh per-test one, and
//!   `APP__RABBITMQ__EXCHANGE` / `APP__RABBITMQ__QUEUE_PREFIX` are added
//!   with a per-test exchange and prefix, so this test never collides with
//!   other tests or a running system;
//! - the api's container port 8080 becomes a free local port (in a
//!   container it is private; here it would collide), and so do the
//!   runner's and scheduler's monitoring ports 9091 and 9092, per replica
//!   (each replica's own compose healthcheck is run against its port);
//! - paths under a mounted volume (`./configuration:/app/configuration`)
//!   become the repository's folder, and the image's `/usr/local/bin/<bin>`
//!   the cargo-built binary.
//!
//! Like the `postgres` and `rabbitmq` images do with `POSTGRES_USER` and
//! `RABBITMQ_DEFAULT_USER`, the test provisions the users the compose file
//! names on the local servers (a PostgreSQL role and a RabbitMQ user with the
//! `.env.example` credentials; both are left in place, idempotently).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Api, KafkaTopics, Processes, free_port};
use saga::schema::transitions as saga_transitions;
use saga::testing::{amqp_url, database_url, with_database};
use saga::transport::rabbitmq::{QueueType, RabbitTransport, Topology};
use sea_orm::{ColumnTrait, ConnectionTrait, Database, EntityTrait, QueryFilter};
use serde_yaml::Value;

const HOST_SERVICES: [&str; 3] = ["api", "runner", "scheduler"];
/// The `kafka` profile's hosts.
const KAFKA_HOST_SERVICES: [&str; 3] = ["api-kafka", "runner-kafka", "scheduler-kafka"];
const ORDERS: usize = 16;
/// Replicas per service, as with `docker compose up --scale runner=2
/// --scale scheduler=2`: competing runners and schedulers must not
/// double-handle anything.
const SCALE: [(&str, usize); 3] = [("api", 1), ("runner", 2), ("scheduler", 2)];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `KEY=value` lines of an env file (comments and blanks skipped).
fn read_env_file(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Compose interpolation: `$$`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
/// `${VAR:?error}`, `${VAR?error}`.
fn interpolate(s: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {s}"));
            let expr = &body[..end];
            let name_end = expr
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(expr.len());
            let (name, op) = expr.split_at(name_end);
            let value = vars.get(name).cloned();
            let resolved = if let Some(default) = op.strip_prefix(":-") {
                value
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| interpolate(default, vars))
            } else if let Some(default) = op.strip_prefix('-') {
                value.unwrap_or_else(|| interpolate(default, vars))
            } else if let Some(message) = op.strip_prefix(":?").or_else(|| op.strip_prefix('?')) {
                value
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| panic!("required variable {name}: {message}"))
            } else {
                assert!(op.is_empty(), "unsupported interpolation ${{{expr}}}");
                value.unwrap_or_default()
            };
            out.push_str(&resolved);
            rest = &body[end + 1..];
        } else {
            let name_end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            out.push_str(&vars.get(&after[..name_end]).cloned().unwrap_or_default());
            rest = &after[name_end..];
        }
    }
    out.push_str(rest);
    out
}

fn interpolate_all(value: &mut Value, vars: &HashMap<String, String>) {
    match value {
        Value::String(s) => *s = interpolate(s, vars),
        Value::Sequence(items) => items.iter_mut().for_each(|v| interpolate_all(v, vars)),
        Value::Mapping(map) => map.values_mut().for_each(|v| interpolate_all(v, vars)),
        _ => {}
    }
}

/// `docker-compose.yml` as `docker compose config` would see it with
/// `.env.example` as `.env`.
fn load_compose() -> Value {
    load_compose_with(&[])
}

/// The same, with some `.env` variables changed (as a user would edit `.env`).
fn load_compose_with(env_overrides: &[(&str, &str)]) -> Value {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).expect("compose file");
    let mut compose: Value = serde_yaml::from_str(&text).expect("compose file is YAML");
    compose.apply_merge().expect("merge keys");
    let mut vars = read_env_file(&repo().join(".env.example"));
    for (k, v) in env_overrides {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    interpolate_all(&mut compose, &vars);
    compose
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    &compose["services"][name]
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Sequence(items) => items
            .iter()
            .map(|v| v.as_str().expect("a string").to_owned())
            .collect(),
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        Value::Null => Vec::new(),
        other => panic!("expected a list: {other:?}"),
    }
}

/// A service's `environment`, in either compose form.
fn environment(svc: &Value) -> BTreeMap<String, String> {
    match &svc["environment"] {
        Value::Mapping(map) => map
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => panic!("environment value {other:?}"),
                };
                (k.as_str().expect("key").to_owned(), v)
            })
            .collect(),
        Value::Sequence(_) => strings(&svc["environment"])
            .into_iter()
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("KEY=value");
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        Value::Null => BTreeMap::new(),
        other => panic!("environment {other:?}"),
    }
}

/// The services `name` waits for, with the condition.
fn depends_on(svc: &Value) -> Vec<(String, String)> {
    match &svc["depends_on"] {
        Value::Mapping(map) => map
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().expect("name").to_owned(),
                    v["condition"]
                        .as_str()
                        .unwrap_or("service_started")
                        .to_owned(),
                )
            })
            .collect(),
        Value::Sequence(_) => strings(&svc["depends_on"])
            .into_iter()
            .map(|n| (n, "service_started".to_owned()))
            .collect(),
        _ => Vec::new(),
    }
}

/// Every change from the compose file to this machine, in one place.
#[derive(Clone)]
struct Substitutions {
    database: String,
    exchange: String,
    prefix: String,
    /// Kafka runs: the local broker for `kafka:9092`, and the test's own
    /// topic prefix.
    kafka: Option<(String, String)>,
    api_port: u16,
    /// Other container ports -> free local ports (one replica's).
    ports: Vec<(u16, u16)>,
    /// Volume mounts: container path -> host path.
    mounts: Vec<(String, PathBuf)>,
}

impl Substitutions {
    fn value(&self, value: &str) -> String {
        let mut v = value.to_owned();
        for (container, host) in &self.mounts {
            if v == *container || v.starts_with(&format!("{container}/")) {
                v = v.replacen(container, &host.display().to_string(), 1);
            }
        }
        for host in ["postgres-kafka", "postgres", "rabbitmq", "api-kafka", "api"] {
            v = v
                .replace(&format!("@{host}:"), "@127.0.0.1:")
                .replace(&format!("//{host}:"), "//127.0.0.1:");
        }
        for (container, local) in &self.ports {
            v = v.replace(&format!(":{container}"), &format!(":{local}"));
        }
        v.replace(":8080", &format!(":{}", self.api_port))
    }

    fn environment(&self, env: &BTreeMap<String, String>) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| {
                let v = if k == "APP__DATABASE__URL" {
                    with_database(&self.value(v), &self.database)
                } else if k == "APP__KAFKA__BOOTSTRAP_SERVERS"
                    && let Some((bootstrap, _)) = &self.kafka
                {
                    assert_eq!(v, "kafka:9092", "the kafka service's advertised listener");
                    bootstrap.clone()
                } else {
                    self.value(v)
                };
                (k.clone(), v)
            })
            .collect();
        out.push(("APP__RABBITMQ__EXCHANGE".into(), self.exchange.clone()));
        out.push(("APP__RABBITMQ__QUEUE_PREFIX".into(), self.prefix.clone()));
        if let Some((_, prefix)) = &self.kafka {
            // The test's own topics, and short group timeouts (a group join
            // takes about half the session timeout on the test broker).
            out.push(("APP__KAFKA__TOPIC_PREFIX".into(), prefix.clone()));
            out.push(("APP__KAFKA__SESSION_TIMEOUT_MS".into(), "3000".into()));
            out.push(("APP__KAFKA__MAX_POLL_INTERVAL_MS".into(), "3000".into()));
        }
        out.push(("NO_COLOR".into(), "1".into()));
        out
    }

    /// `/usr/local/bin/x` or `x` (the image's binaries) -> the cargo-built one.
    fn binary(&self, command: &str) -> String {
        let name = command.rsplit('/').next().unwrap_or(command);
        match name {
            "api" => env!("CARGO_BIN_EXE_api"),
            "runner" => env!("CARGO_BIN_EXE_runner"),
            "scheduler" => env!("CARGO_BIN_EXE_scheduler"),
            "healthcheck" => env!("CARGO_BIN_EXE_healthcheck"),
            other => panic!("the compose file runs `{other}`, which is not a hosts binary"),
        }
        .to_owned()
    }
}

/// Runs a service's compose `healthcheck` (`CMD` form) until it passes.
async fn wait_healthy(name: &str, svc: &Value, subs: &Substitutions, processes: &mut Processes) {
    let test = strings(&svc["healthcheck"]["test"]);
    assert_eq!(
        test.first().map(String::as_str),
        Some("CMD"),
        "{name}: healthcheck must be exec form"
    );
    let exe = subs.binary(&test[1]);
    let args: Vec<String> = test[2..].iter().map(|a| subs.value(a)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        processes.assert_running();
        let status = tokio::process::Command::new(&exe)
            .args(&args)
            .env("RUST_LOG", "off")
            .status()
            .await
            .expect("healthcheck runs");
        if status.success() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            processes.fail(&format!("{name} never became healthy ({exe} {args:?})"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn rabbitmqctl(args: &[&str]) -> std::process::Output {
    std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("rabbitmqctl {args:?}: {e} (is RabbitMQ installed?)"))
}

/// What the `rabbitmq` image does with `RABBITMQ_DEFAULT_USER/PASS`.
fn provision_rabbitmq_user(user: &str, password: &str) {
    let _ = rabbitmqctl(&["add_user", user, password]); // fails if it exists
    let out = rabbitmqctl(&["change_password", user, password]);
    assert!(out.status.success(), "rabbitmqctl change_password: {out:?}");
    let out = rabbitmqctl(&["set_permissions", "-p", "/", user, ".*", ".*", ".*"]);
    assert!(out.status.success(), "rabbitmqctl set_permissions: {out:?}");
}

#[test]
fn the_compose_file_is_safe_to_scale_and_waits_for_healthy_dependencies() {
    let compose = load_compose();
    for name in HOST_SERVICES {
        let svc = service(&compose, name);
        assert!(svc.is_mapping(), "service {name} exists");
        assert!(
            svc["build"].is_mapping(),
            "{name} is built from the Dockerfile"
        );
        assert!(
            svc["healthcheck"]["test"].is_sequence(),
            "{name} has a healthcheck"
        );
        for (dep, condition) in depends_on(svc) {
            assert_eq!(
                condition, "service_healthy",
                "{name} waits for {dep} to be healthy"
            );
            assert!(
                service(&compose, &dep)["healthcheck"]["test"].is_sequence(),
                "{dep} has a healthcheck"
            );
        }
    }
    for name in ["runner", "scheduler"] {
        let svc = service(&compose, name);
        assert!(
            svc["container_name"].is_null(),
            "{name}: no fixed container name"
        );
        assert!(svc["ports"].is_null(), "{name}: no host ports (scale-safe)");
    }
    for volume in ["postgres-data", "rabbitmq-data"] {
        assert!(
            compose["volumes"].get(volume).is_some(),
            "named volume {volume}"
        );
    }
    // The committed secrets are placeholders, loudly so.
    let example = std::fs::read_to_string(repo().join(".env.example")).expect(".env.example");
    assert!(example.contains("LOCAL DEVELOPMENT ONLY"));
    let ignored = std::fs::read_to_string(repo().join(".gitignore")).expect(".gitignore");
    assert!(
        ignored.lines().any(|l| l.trim() == ".env"),
        ".env is git-ignored"
    );
}

#[test]
fn the_kafka_profile_runs_apache_kafka_in_kraft_mode_and_its_own_hosts_on_it() {
    let compose = load_compose();
    let kafka = service(&compose, "kafka");
    assert_eq!(strings(&kafka["profiles"]), ["kafka"]);
    let image = kafka["image"].as_str().expect("kafka image");
    assert!(
        image.starts_with("apache/kafka:"),
        "official image: {image}"
    );
    let env = environment(kafka);
    assert_eq!(env["KAFKA_PROCESS_ROLES"], "broker,controller", "KRaft");
    assert_eq!(env["KAFKA_CONTROLLER_QUORUM_VOTERS"], "1@kafka:9093");
    assert_eq!(env["KAFKA_ADVERTISED_LISTENERS"], "PLAINTEXT://kafka:9092");
    assert_eq!(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"], "false");
    assert!(!env.contains_key("KAFKA_ZOOKEEPER_CONNECT"));
    assert!(kafka["healthcheck"]["test"].is_sequence());
    assert!(compose["volumes"].get("kafka-data").is_some());
    for name in KAFKA_HOST_SERVICES {
        let svc = service(&compose, name);
        assert_eq!(strings(&svc["profiles"]), ["kafka"], "{name}");
        let env = environment(svc);
        assert_eq!(env["APP__TRANSPORT__KIND"], "kafka", "{name}");
        assert_eq!(env["APP__KAFKA__BOOTSTRAP_SERVERS"], "kafka:9092", "{name}");
        assert!(
            env["APP__DATABASE__URL"].contains("@postgres-kafka:5432/"),
            "{name}: its own database"
        );
        for (dep, condition) in depends_on(svc) {
            assert_eq!(condition, "service_healthy", "{name} waits for {dep}");
            assert!(
                strings(&service(&compose, &dep)["profiles"]) == ["kafka"],
                "{name} depends only on the kafka profile's services, not {dep}"
            );
        }
    }
    assert!(
        depends_on(service(&compose, "api-kafka"))
            .iter()
            .any(|(d, _)| d == "kafka")
    );
    // The default stack is untouched: no profile, RabbitMQ.
    for name in HOST_SERVICES {
        let svc = service(&compose, name);
        assert!(svc["profiles"].is_null(), "{name} runs without a profile");
        assert!(
            !environment(svc).contains_key("APP__TRANSPORT__KIND"),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_services_run_the_order_flow_with_exactly_their_environment() {
    run_compose_flow(&[], Flavor::Rabbit(QueueType::Classic)).await;
}

/// `RABBITMQ_QUEUE_TYPE=quorum` in `.env` (what a RabbitMQ cluster wants):
/// the hosts declare quorum queues and the flow is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_services_run_the_order_flow_on_quorum_queues() {
    run_compose_flow(
        &[("RABBITMQ_QUEUE_TYPE", "quorum")],
        Flavor::Rabbit(QueueType::Quorum),
    )
    .await;
}

/// The `kafka` profile's hosts, with exactly their environment, on the
/// local Kafka-protocol broker (`KAFKA_BOOTSTRAP`, as the other Kafka tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_profile_services_run_the_order_flow_with_exactly_their_environment() {
    run_compose_flow(&[], Flavor::Kafka).await;
}

/// Which stack of the compose file a run starts.
#[derive(Clone, Copy)]
enum Flavor {
    /// `api`, `runner`, `scheduler` on RabbitMQ with queues of this type.
    Rabbit(QueueType),
    /// The `kafka` profile: `api-kafka`, `runner-kafka`, `scheduler-kafka`.
    Kafka,
}

/// This test's own exchange and queues, of the type the compose file asks for.
struct Broker {
    transport: RabbitTransport,
    topology: Topology,
    exchange: String,
    prefix: String,
}

async fn create_broker(queue_type: QueueType) -> Broker {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let exchange = format!("test.{id}.events");
    let prefix = format!("test.{id}");
    let transport = RabbitTransport::connect(
        &amqp_url(),
        &exchange,
        Duration::from_secs(5),
        "order-saga compose test",
    )
    .await
    .expect("RabbitMQ at AMQP_URL (see README, 'Services')");
    let topology = orders::topology::topology(&exchange, &prefix, queue_type);
    transport.declare(&topology).await.expect("test topology");
    Broker {
        transport,
        topology,
        exchange,
        prefix,
    }
}

async fn run_compose_flow(env_overrides: &[(&str, &str)], flavor: Flavor) {
    let compose = load_compose_with(env_overrides);
    let id = uuid::Uuid::new_v4().simple().to_string();
    let services = match flavor {
        Flavor::Rabbit(_) => HOST_SERVICES,
        Flavor::Kafka => KAFKA_HOST_SERVICES,
    };
    let [api_service, runner_service, scheduler_service] = services;

    // PostgreSQL: the role the compose file connects as, and a fresh database
    // it owns (the api migrates it, as it does in compose).
    let api_env = environment(service(&compose, api_service));
    let compose_db_url = &api_env["APP__DATABASE__URL"];
    let pg_user = compose_db_url
        .split("://")
        .nth(1)
        .and_then(|r| r.split('@').next())
        .expect("user in APP__DATABASE__URL")
        .to_owned();
    let pg_password = api_env["APP__DATABASE__PASSWORD"].clone();
    let admin = Database::connect(with_database(&database_url(), "postgres"))
        .await
        .expect("PostgreSQL at DATABASE_URL (see README, 'Services')");
    let database = format!("os_compose_{id}");
    // Race-free on a server that has never seen the role: the compose tests
    // run in parallel, and `IF NOT EXISTS ... CREATE ROLE` alone is not
    // atomic (the loser gets 23505 on pg_authid). A transaction-scoped
    // advisory lock serialises the check and the create (the DO block is one
    // transaction, so the lock is held until the role is committed), and
    // "already exists" is treated as success in case anything else creates
    // the role at the same moment.
    let create_role = format!(
        "DO $$ BEGIN \
           PERFORM pg_advisory_xact_lock(hashtext('order-saga compose role {pg_user}')); \
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{pg_user}') THEN \
             BEGIN \
               CREATE ROLE \"{pg_user}\" LOGIN PASSWORD '{pg_password}'; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; \
             END; \
           ELSE \
             ALTER ROLE \"{pg_user}\" LOGIN PASSWORD '{pg_password}'; \
           END IF; END $$"
    );
    admin.execute_unprepared(&create_role).await.expect("role");
    admin
        .execute_unprepared(&format!(
            "CREATE DATABASE \"{database}\" OWNER \"{pg_user}\""
        ))
        .await
        .expect("test database");

    // RabbitMQ: the user the compose file connects as; this test's own
    // exchange and queues (deleted at the end).
    let amqp = &api_env["APP__RABBITMQ__URL"];
    let userinfo = amqp
        .split("://")
        .nth(1)
        .and_then(|r| r.split('@').next())
        .expect("userinfo in APP__RABBITMQ__URL");
    let (mq_user, mq_password) = userinfo.split_once(':').expect("user:password");
    provision_rabbitmq_user(mq_user, mq_password);
    let queue_type = match flavor {
        Flavor::Rabbit(queue_type) => queue_type,
        Flavor::Kafka => QueueType::Classic,
    };
    let broker = create_broker(queue_type).await;
    let want_type = match queue_type {
        QueueType::Classic => "classic",
        QueueType::Quorum => "quorum",
    };
    assert_eq!(
        api_env["APP__RABBITMQ__QUEUE_TYPE"], want_type,
        "the compose file passes RABBITMQ_QUEUE_TYPE through"
    );
    // Kafka: this test's own topics, created before the hosts start.
    let topics = match flavor {
        Flavor::Kafka => Some(KafkaTopics::create().await),
        Flavor::Rabbit(_) => None,
    };

    let subs = Substitutions {
        database: database.clone(),
        exchange: broker.exchange.clone(),
        prefix: broker.prefix.clone(),
        kafka: topics
            .as_ref()
            .map(|t| (common::kafka_bootstrap(), t.prefix.clone())),
        api_port: free_port(),
        ports: Vec::new(),
        mounts: Vec::new(),
    };

    // Start the host services in dependency order.
    let mut processes = Processes::new("compose");
    let mut started: Vec<&str> = Vec::new();
    while started.len() < services.len() {
        let next = services
            .into_iter()
            .find(|name| {
                !started.contains(name)
                    && depends_on(service(&compose, name)).iter().all(|(dep, _)| {
                        !services.contains(&dep.as_str()) || started.contains(&dep.as_str())
                    })
            })
            .expect("no dependency cycle among the host services");
        let svc = service(&compose, next);
        for (dep, _) in depends_on(svc) {
            if services.contains(&dep.as_str()) {
                wait_healthy(&dep, service(&compose, &dep), &subs, &mut processes).await;
            }
        }
        let mounts = strings(&svc["volumes"])
            .into_iter()
            .filter_map(|v| {
                let mut parts = v.split(':');
                let (src, dst) = (parts.next()?, parts.next()?);
                src.starts_with("./")
                    .then(|| (dst.to_owned(), repo().join(src.trim_start_matches("./"))))
            })
            .collect();
        let subs = Substitutions {
            mounts,
            ..subs.clone()
        };
        let base_name = next.trim_end_matches("-kafka");
        let replicas = SCALE
            .iter()
            .find(|(n, _)| *n == base_name)
            .map_or(1, |(_, r)| *r);
        for replica in 1..=replicas {
            let subs = Substitutions {
                ports: vec![(9091, free_port()), (9092, free_port())],
                ..subs.clone()
            };
            let command = strings(&svc["command"]);
            let exe = subs.binary(&command[0]);
            let args: Vec<String> = command[1..].iter().map(|a| subs.value(a)).collect();
            let env = subs.environment(&environment(svc));
            assert!(
                env.iter()
                    .any(|(k, v)| k == "APP_CONFIG_DIR"
                        && Path::new(v).join("instance.json").is_file()),
                "{next}: APP_CONFIG_DIR points at the mounted configuration folder"
            );
            processes.spawn(&format!("{next}-{replica}"), &exe, &args, &env);
            // The runner's and scheduler's own healthchecks (the api's is
            // awaited by the services that depend on it).
            if next != api_service {
                wait_healthy(&format!("{next}-{replica}"), svc, &subs, &mut processes).await;
            }
        }
        started.push(next);
    }
    wait_healthy(
        api_service,
        service(&compose, api_service),
        &subs,
        &mut processes,
    )
    .await;

    // Drive orders through the flow with the compose timings (instance.json:
    // a 5 s payment, success rate 0.5).
    let api = Api::new(format!("http://127.0.0.1:{}", subs.api_port));
    let (token, user_id) = api.register_and_login().await;
    let ids = api.place_orders(&token, user_id, ORDERS).await;
    // The runner consumed OrderCreated from RabbitMQ: processing, with the
    // audit row written by the notifications consumer.
    api.assert_one_notification_each(&token, &ids, "OrderCreated", false, "OrderExpired")
        .await;
    // Every payment timer fired and was journalled, approved or declined.
    let db = Database::connect(with_database(&database_url(), &database))
        .await
        .expect("test database");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let decisions = loop {
        processes.assert_running();
        let rows = saga_transitions::Entity::find()
            .filter(saga_transitions::Column::Trigger.eq("PaymentDecided"))
            .all(&db)
            .await
            .expect("journal");
        if rows.len() >= ORDERS {
            break rows;
        }
        if tokio::time::Instant::now() >= deadline {
            processes.fail(&format!("only {} of {ORDERS} payments decided", rows.len()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(decisions.len(), ORDERS, "one payment decision per order");
    let approved: Vec<i64> = decisions
        .iter()
        .filter(|t| {
            matches!(
                t.input
                    .clone()
                    .and_then(|i| serde_json::from_value::<orders::OrderInput>(i).ok()),
                Some(orders::OrderInput::PaymentDecided { approved: true, .. })
            )
        })
        .map(|t| t.correlation_id.parse().expect("order id"))
        .collect();
    let declined: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| !approved.contains(id))
        .collect();
    // With 16 orders at 0.5, all declined happens once in 65,536 runs.
    assert!(!approved.is_empty(), "no payment approved out of {ORDERS}");
    api.wait_for_status(
        &mut processes,
        &token,
        &approved,
        "completed",
        Duration::from_secs(30),
    )
    .await;
    // OrderCompleted went through the outbox, RabbitMQ and the notifications
    // consumer, exactly once.
    api.assert_one_notification_each(&token, &approved, "OrderCompleted", true, "OrderExpired")
        .await;
    api.wait_for_status(
        &mut processes,
        &token,
        &declined,
        "processing",
        Duration::from_secs(5),
    )
    .await;
    // One fake e-mail per approved order across both runners.
    let count_emails = |processes: &Processes| -> usize {
        (1..=2)
            .map(|r| {
                processes
                    .log(&format!("{runner_service}-{r}"))
                    .matches("FAKE E-MAIL")
                    .count()
            })
            .sum()
    };
    let want = approved.len();
    let emails = saga::testing::eventually(Duration::from_secs(10), "fake e-mails", || {
        let n = count_emails(&processes);
        async move { (n >= want).then_some(n) }
    })
    .await;
    assert_eq!(emails, approved.len(), "one e-mail per approved order");
    for r in 1..=2 {
        assert!(
            processes
                .log(&format!("{scheduler_service}-{r}"))
                .contains("scheduler started")
        );
    }
    processes.assert_running();

    processes.stop().await;
    let _ = db.close().await;
    if let Some(topics) = topics {
        topics.delete().await;
        let _ = broker.transport.delete(&broker.topology).await;
        broker.transport.close().await;
        drop_database(&admin, &database).await;
        return;
    }
    // The hosts' queues are of the configured type.
    let listed = rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name", "type"]);
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    let ours: Vec<&str> = listed
        .lines()
        .filter(|l| l.starts_with(&broker.prefix))
        .collect();
    assert_eq!(ours.len(), 4, "two queues and their error queues: {listed}");
    assert!(
        ours.iter()
            .all(|l| l.split_whitespace().nth(1) == Some(want_type)),
        "queues are {want_type}: {ours:?}"
    );
    let _ = broker.transport.delete(&broker.topology).await;
    broker.transport.close().await;
    drop_database(&admin, &database).await;
}

async fn drop_database(admin: &sea_orm::DatabaseConnection, database: &str) {
    let _ = admin
        .execute_unprepared(&format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        ))
        .await;
}
