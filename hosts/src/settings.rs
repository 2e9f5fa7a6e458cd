//! Settings: `configuration/instance.json`, then `configuration/secrets.json`
//! (git-ignored; `secrets.example.json` is used with a warning when it is
//! missing), then `APP__SECTION__KEY` environment variables. The folder is
//! `APP_CONFIG_DIR` when set. Anything missing or invalid stops the host at
//! start with a message naming the key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A secret string: never printed by `Debug` or `Display`.
#[derive(Clone, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    /// Which broker the api, runner and scheduler use (the embedded host
    /// ignores it and stays in-process).
    #[serde(default)]
    pub transport: TransportSettings,
    pub rabbitmq: RabbitSettings,
    /// Used when `transport.kind` is `kafka`.
    #[serde(default)]
    pub kafka: KafkaSettings,
    pub api: ApiSettings,
    pub auth: AuthSettings,
    pub payment: PaymentSettings,
    pub expiration: ExpirationSettings,
    pub retry: RetrySettings,
    pub outbox: OutboxSettings,
    pub timers: TimerSettings,
    pub consumers: ConsumerSettings,
    pub seed: SeedSettings,
    pub logging: LoggingSettings,
    /// Traces (OpenTelemetry over OTLP/HTTP); absent means no export.
    #[serde(default)]
    pub tracing: TracingSettings,
    pub shutdown: ShutdownSettings,
    pub monitoring: MonitoringSettings,
    /// The single-process embedded mode (`cargo run`): only its storage
    /// differs; every other section applies unchanged.
    #[serde(default)]
    pub embedded: EmbeddedSettings,
    /// The operator console (`/console`) of the api and the embedded host.
    #[serde(default)]
    pub console: ConsoleSettings,
    #[serde(default, rename = "_comment")]
    pub comment: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    #[serde(default)]
    pub password: Secret,
    pub max_connections: u32,
    pub acquire_timeout_seconds: u64,
    /// How long a host keeps trying to reach the database at start.
    pub connect_retry_seconds: u64,
}

impl DatabaseSettings {
    /// The URL with `database.password` filled in when the URL has none.
    pub fn connection_url(&self) -> String {
        let password = self.password.expose();
        if password.is_empty() {
            return self.url.clone();
        }
        let Some((scheme, rest)) = self.url.split_once("://") else {
            return self.url.clone();
        };
        let Some((userinfo, host)) = rest.split_once('@') else {
            return self.url.clone();
        };
        if userinfo.contains(':') {
            return self.url.clone();
        }
        format!("{scheme}://{userinfo}:{}@{host}", encode_userinfo(password))
    }
}

fn encode_userinfo(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueTypeSetting {
    Classic,
    Quorum,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitSettings {
    pub url: String,
    pub exchange: String,
    pub queue_prefix: String,
    pub queue_type: QueueTypeSetting,
    pub prefetch: u16,
    pub confirm_timeout_ms: u64,
    pub connect_retry_seconds: u64,
    /// First wait before reconnecting after the connection is lost; doubles
    /// up to `reconnect_max_backoff_ms`.
    pub reconnect_initial_backoff_ms: u64,
    pub reconnect_max_backoff_ms: u64,
}

/// Which broker the separate hosts use.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// RabbitMQ (`rabbitmq.*`), the default.
    #[default]
    Rabbitmq,
    /// Kafka (`kafka.*`).
    Kafka,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportSettings {
    pub kind: TransportKind,
}

/// `kafka.*`: the Kafka transport (`saga::transport::kafka`). Queue names
/// (consumer groups, `.direct` and `.error` topics) are
/// `<topic_prefix>.<consumer>`, event topics `<topic_prefix>.<routing key>`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub topic_prefix: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Deliveries out at once per consumer (like `rabbitmq.prefetch`).
    pub prefetch: u16,
    pub session_timeout_ms: u64,
    /// Must be at least `session_timeout_ms` (librdkafka refuses less).
    pub max_poll_interval_ms: u64,
    pub delivery_timeout_ms: u64,
    pub operation_timeout_ms: u64,
    pub connect_retry_seconds: u64,
    pub client_id: String,
    /// Further librdkafka properties (TLS, SASL, tuning), applied last to
    /// every client. Values are never logged. Properties the transport sets
    /// itself are refused ([`KafkaSettings::RESERVED`]).
    pub extra: std::collections::BTreeMap<String, Secret>,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:19092".to_owned(),
            topic_prefix: "order_saga".to_owned(),
            partitions: 3,
            replication_factor: 1,
            prefetch: 256,
            session_timeout_ms: 10_000,
            max_poll_interval_ms: 30_000,
            delivery_timeout_ms: 10_000,
            operation_timeout_ms: 10_000,
            connect_retry_seconds: 60,
            client_id: "order-saga".to_owned(),
            extra: std::collections::BTreeMap::new(),
        }
    }
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic_prefix", &self.topic_prefix)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("prefetch", &self.prefetch)
            .field("session_timeout_ms", &self.session_timeout_ms)
            .field("max_poll_interval_ms", &self.max_poll_interval_ms)
            .field("delivery_timeout_ms", &self.delivery_timeout_ms)
            .field("operation_timeout_ms", &self.operation_timeout_ms)
            .field("connect_retry_seconds", &self.connect_retry_seconds)
            .field("client_id", &self.client_id)
            // Names only: values may be credentials.
            .field("extra", &self.extra.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KafkaSettings {
    /// librdkafka properties the transport sets itself (its delivery and
    /// commit guarantees rest on them, or they have a key of their own):
    /// `kafka.extra` may not set them.
    pub const RESERVED: [&'static str; 17] = [
        "bootstrap.servers",
        "client.id",
        "group.id",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "auto.offset.reset",
        "enable.idempotence",
        "acks",
        "request.required.acks",
        "message.timeout.ms",
        "delivery.timeout.ms",
        "session.timeout.ms",
        "max.poll.interval.ms",
        "heartbeat.interval.ms",
        "allow.auto.create.topics",
        "partitioner",
        "enable.partition.eof",
    ];

    /// The library's settings for these.
    pub fn transport_settings(&self) -> saga::transport::kafka::KafkaSettings {
        saga::transport::kafka::KafkaSettings {
            bootstrap_servers: self.bootstrap_servers.clone(),
            topic_prefix: self.topic_prefix.clone(),
            partitions: self.partitions,
            replication_factor: self.replication_factor,
            session_timeout: Duration::from_millis(self.session_timeout_ms),
            max_poll_interval: Duration::from_millis(self.max_poll_interval_ms),
            delivery_timeout: Duration::from_millis(self.delivery_timeout_ms),
            operation_timeout: Duration::from_millis(self.operation_timeout_ms),
            client_id: self.client_id.clone(),
            extra: self
                .extra
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_owned()))
                .collect(),
        }
    }
}

/// How long a host waits for in-flight work after SIGTERM/Ctrl-C before it
/// exits anyway (unacknowledged messages then go back to their queue).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    pub grace_seconds: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    pub listen: String,
    pub public_url: String,
    /// Largest request body accepted (413 above it), chunked or not.
    pub body_limit_bytes: usize,
    /// Origins allowed to call the API from a browser (CORS). Empty: no CORS
    /// headers at all (same-origin only, e.g. the bundled Swagger UI).
    pub cors_allowed_origins: Vec<String>,
    /// How long an `Idempotency-Key` of `POST /api/orders` is remembered.
    pub idempotency_ttl_seconds: u64,
    /// Most orders placed in one transaction (the `POST /api/orders`
    /// requests waiting at the same time; 1 = one transaction per order).
    pub order_batch_max: usize,
    /// Workers placing orders at once (each holds a database connection
    /// while it places a batch).
    pub order_batch_workers: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub issuer: String,
    pub audience: String,
    pub token_ttl_seconds: u64,
    #[serde(default)]
    pub jwt_secret: Secret,
    /// Login attempts are counted in fixed windows of this length.
    pub login_window_seconds: u64,
    /// Failed logins per account (e-mail) per window before 429.
    pub login_max_failures_per_account: u32,
    /// Login attempts per client address per window before 429.
    pub login_max_attempts_per_address: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentSettings {
    pub delay_ms: u64,
    pub success_rate: f64,
    #[serde(default)]
    pub seed: Option<u64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpirationSettings {
    pub sweep_interval_seconds: u64,
    pub processing_timeout_seconds: u64,
    pub batch_size: u64,
    /// Sweep transactions at once (each takes a database connection).
    pub sweep_workers: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSettings {
    pub poll_interval_ms: u64,
    pub batch_size: u64,
    pub lease_seconds: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimerSettings {
    pub poll_interval_ms: u64,
    /// Concurrent timer loops in one runner (PostgreSQL; `SKIP LOCKED` keeps
    /// them apart). The embedded host always uses one.
    pub workers: u64,
    /// Due timers fired per transaction.
    pub batch_size: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSettings {
    /// Ready deliveries handled per transaction (acknowledged after its
    /// commit); `rabbitmq.prefetch / batch_size` batches run at once.
    pub batch_size: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedSettings {
    pub admin_email: String,
    pub admin_name: String,
    #[serde(default)]
    pub admin_password: Secret,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSettings {
    pub filter: String,
    /// `text`, `json` or `auto` (text on a terminal, JSON otherwise).
    #[serde(default)]
    pub format: LogFormat,
}

/// How log lines are written (to stderr).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, with the fields of the enclosing spans.
    Json,
    /// Text when stderr is a terminal, JSON otherwise.
    Auto,
}

/// Where traces go. Spans are always created and the W3C trace context is
/// always propagated; they are exported only when an endpoint is set here
/// or in `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSettings {
    /// Base URL of an OTLP/HTTP collector (`http://host:4318`); traces are
    /// posted as JSON to `<base>/v1/traces`. Empty: not configured here.
    pub otlp_endpoint: String,
    /// `service.name` of the exported spans. Empty: the host's name
    /// (`api`, `runner`, `scheduler`, `embedded`).
    pub service_name: String,
}

/// Metrics and health: where the runner and the scheduler serve `/metrics`,
/// `/health/live` and `/health/ready` (the api and the embedded host serve
/// them on `api.listen`), and the bounds readiness checks.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitoringSettings {
    pub runner_listen: String,
    pub scheduler_listen: String,
    /// Readiness fails when the oldest unsent outbox event is older.
    pub outbox_lag_max_seconds: u64,
    /// Readiness fails when a consumer has held one delivery unfinished for
    /// longer than this (it is stalled).
    pub consumer_stall_seconds: u64,
}

/// Where the embedded mode keeps its data.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedSettings {
    /// SQLite URL; a relative path is relative to the working directory.
    pub database_url: String,
}

impl Default for EmbeddedSettings {
    fn default() -> Self {
        Self {
            database_url: "sqlite://data/order-saga.db?mode=rwc".to_owned(),
        }
    }
}

/// The operator console (`/console` on the api and the embedded host).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    /// How long a console login lasts (absolute, not sliding).
    pub session_ttl_seconds: u64,
    /// The runner's readiness URL the api's console shows; empty:
    /// `http://<monitoring.runner_listen>/health/ready` (an unspecified
    /// address such as 0.0.0.0 becomes 127.0.0.1).
    pub runner_health_url: String,
    /// The scheduler's readiness URL; empty: from
    /// `monitoring.scheduler_listen`, likewise.
    pub scheduler_health_url: String,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            session_ttl_seconds: 8 * 3600,
            runner_health_url: String::new(),
            scheduler_health_url: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "configuration folder {0} has no instance.json (set APP_CONFIG_DIR to the folder that has it)"
    )]
    MissingInstanceFile(PathBuf),
    #[error("configuration could not be read: {0}")]
    Read(String),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// Where the configuration folder is: `APP_CONFIG_DIR`, else `./configuration`,
/// else the nearest `configuration/` above the working directory, else the
/// repository's own (for `cargo run` and tests).
pub fn config_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("APP_CONFIG_DIR") {
        return PathBuf::from(dir);
    }
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            let candidate = dir.join("configuration");
            if candidate.join("instance.json").is_file() {
                return candidate;
            }
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configuration")
}

/// What `load` read, for a start-up log line.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub settings: Settings,
    pub dir: PathBuf,
    pub secrets_file: Option<PathBuf>,
    pub using_example_secrets: bool,
}

/// Loads settings from `config_dir()` and the process environment.
pub fn load() -> Result<Loaded, SettingsError> {
    load_from(&config_dir(), std::env::vars())
}

/// Loads settings from `dir` and the given environment (tests pass their own).
pub fn load_from(
    dir: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, SettingsError> {
    let instance = dir.join("instance.json");
    if !instance.is_file() {
        return Err(SettingsError::MissingInstanceFile(dir.to_path_buf()));
    }
    let secrets = dir.join("secrets.json");
    let example = dir.join("secrets.example.json");
    let (secrets_file, using_example_secrets) = if secrets.is_file() {
        (Some(secrets), false)
    } else if example.is_file() {
        (Some(example), true)
    } else {
        (None, false)
    };
    let env: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("APP__"))
        .collect();
    let mut builder = config::Config::builder()
        .add_source(config::File::from(instance.as_path()).format(config::FileFormat::Json));
    if let Some(file) = &secrets_file {
        builder =
            builder.add_source(config::File::from(file.as_path()).format(config::FileFormat::Json));
    }
    builder = builder.add_source(
        config::Environment::with_prefix("APP")
            .prefix_separator("__")
            .separator("__")
            .source(Some(env)),
    );
    let config = builder
        .build()
        .map_err(|e| SettingsError::Read(e.to_string()))?;
    let value: config::Value = config
        .try_deserialize()
        .map_err(|e| SettingsError::Read(e.to_string()))?;
    let settings: Settings = serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        SettingsError::Invalid {
            key,
            message: e.into_inner().to_string(),
        }
    })?;
    validate(&settings)?;
    Ok(Loaded {
        settings,
        dir: dir.to_path_buf(),
        secrets_file,
        using_example_secrets,
    })
}

fn invalid(key: &str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

fn validate(s: &Settings) -> Result<(), SettingsError> {
    if !(s.database.url.starts_with("postgres://") || s.database.url.starts_with("postgresql://")) {
        return Err(invalid("database.url", "must be a postgres:// URL"));
    }
    if !(s.rabbitmq.url.starts_with("amqp://") || s.rabbitmq.url.starts_with("amqps://")) {
        return Err(invalid("rabbitmq.url", "must be an amqp:// URL"));
    }
    validate_kafka(&s.kafka)?;
    let otlp = s.tracing.otlp_endpoint.trim();
    if !(otlp.is_empty() || otlp.starts_with("http://") || otlp.starts_with("https://")) {
        return Err(invalid(
            "tracing.otlp_endpoint",
            format!("`{otlp}` is not an http:// URL of an OTLP/HTTP collector"),
        ));
    }
    if s.api.listen.parse::<std::net::SocketAddr>().is_err() {
        return Err(invalid(
            "api.listen",
            format!("`{}` is not an address like 127.0.0.1:8080", s.api.listen),
        ));
    }
    for (key, listen) in [
        ("monitoring.runner_listen", &s.monitoring.runner_listen),
        (
            "monitoring.scheduler_listen",
            &s.monitoring.scheduler_listen,
        ),
    ] {
        if listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                key,
                format!("`{listen}` is not an address like 127.0.0.1:9091"),
            ));
        }
    }
    for (key, url) in [
        ("console.runner_health_url", &s.console.runner_health_url),
        (
            "console.scheduler_health_url",
            &s.console.scheduler_health_url,
        ),
    ] {
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(
                key,
                format!("`{url}` is not an http:// URL of a /health/ready endpoint"),
            ));
        }
    }
    if !(0.0..=1.0).contains(&s.payment.success_rate) {
        return Err(invalid(
            "payment.success_rate",
            format!("must be between 0 and 1, got {}", s.payment.success_rate),
        ));
    }
    for (key, value) in [
        (
            "expiration.sweep_interval_seconds",
            s.expiration.sweep_interval_seconds,
        ),
        (
            "expiration.processing_timeout_seconds",
            s.expiration.processing_timeout_seconds,
        ),
        ("expiration.batch_size", s.expiration.batch_size),
        (
            "expiration.sweep_workers",
            u64::from(s.expiration.sweep_workers),
        ),
        ("retry.max_attempts", u64::from(s.retry.max_attempts)),
        ("outbox.poll_interval_ms", s.outbox.poll_interval_ms),
        ("outbox.batch_size", s.outbox.batch_size),
        ("outbox.lease_seconds", s.outbox.lease_seconds),
        ("timers.poll_interval_ms", s.timers.poll_interval_ms),
        ("timers.workers", s.timers.workers),
        ("timers.batch_size", s.timers.batch_size),
        ("consumers.batch_size", s.consumers.batch_size),
        ("rabbitmq.prefetch", u64::from(s.rabbitmq.prefetch)),
        ("rabbitmq.confirm_timeout_ms", s.rabbitmq.confirm_timeout_ms),
        (
            "rabbitmq.reconnect_initial_backoff_ms",
            s.rabbitmq.reconnect_initial_backoff_ms,
        ),
        (
            "rabbitmq.reconnect_max_backoff_ms",
            s.rabbitmq.reconnect_max_backoff_ms,
        ),
        ("shutdown.grace_seconds", s.shutdown.grace_seconds),
        (
            "database.max_connections",
            u64::from(s.database.max_connections),
        ),
        ("auth.token_ttl_seconds", s.auth.token_ttl_seconds),
        ("auth.login_window_seconds", s.auth.login_window_seconds),
        (
            "auth.login_max_failures_per_account",
            u64::from(s.auth.login_max_failures_per_account),
        ),
        (
            "auth.login_max_attempts_per_address",
            u64::from(s.auth.login_max_attempts_per_address),
        ),
        ("api.body_limit_bytes", s.api.body_limit_bytes as u64),
        ("api.idempotency_ttl_seconds", s.api.idempotency_ttl_seconds),
        ("api.order_batch_max", s.api.order_batch_max as u64),
        (
            "api.order_batch_workers",
            u64::from(s.api.order_batch_workers),
        ),
        (
            "monitoring.outbox_lag_max_seconds",
            s.monitoring.outbox_lag_max_seconds,
        ),
        (
            "monitoring.consumer_stall_seconds",
            s.monitoring.consumer_stall_seconds,
        ),
        ("console.session_ttl_seconds", s.console.session_ttl_seconds),
    ] {
        if value == 0 {
            return Err(invalid(key, "must be greater than 0"));
        }
    }
    if s.expiration.sweep_workers > s.database.max_connections {
        return Err(invalid(
            "expiration.sweep_workers",
            format!(
                "must be at most database.max_connections ({}): each sweep worker holds a \
                 connection",
                s.database.max_connections
            ),
        ));
    }
    if s.api.order_batch_workers >= s.database.max_connections {
        return Err(invalid(
            "api.order_batch_workers",
            format!(
                "must be less than database.max_connections ({}): each worker holds a \
                 connection, and other requests need one too",
                s.database.max_connections
            ),
        ));
    }
    if s.api.order_batch_max > 1000 {
        return Err(invalid(
            "api.order_batch_max",
            "must be at most 1000 (one transaction holds the stock of all its orders)",
        ));
    }
    if s.auth.token_ttl_seconds > 86_400 {
        return Err(invalid(
            "auth.token_ttl_seconds",
            "must be at most 86400 (tokens are meant to be short-lived)",
        ));
    }
    for origin in &s.api.cors_allowed_origins {
        if !(origin.starts_with("http://") || origin.starts_with("https://"))
            || origin.ends_with('/')
        {
            return Err(invalid(
                "api.cors_allowed_origins",
                format!("`{origin}` is not an origin like https://shop.example.com"),
            ));
        }
    }
    if s.auth.jwt_secret.expose().len() < 32 {
        return Err(invalid(
            "auth.jwt_secret",
            "must be at least 32 bytes (256 bits); set it in configuration/secrets.json",
        ));
    }
    if s.seed.admin_password.expose().len() < 8 {
        return Err(invalid(
            "seed.admin_password",
            "must be at least 8 characters; set it in configuration/secrets.json",
        ));
    }
    if !s.seed.admin_email.contains('@') {
        return Err(invalid("seed.admin_email", "must be an e-mail address"));
    }
    Ok(())
}

fn validate_kafka(k: &KafkaSettings) -> Result<(), SettingsError> {
    let servers: Vec<&str> = k.bootstrap_servers.split(',').map(str::trim).collect();
    if servers.iter().any(|server| {
        server
            .rsplit_once(':')
            .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
    }) {
        return Err(invalid(
            "kafka.bootstrap_servers",
            format!(
                "`{}` is not a comma-separated list of host:port",
                k.bootstrap_servers
            ),
        ));
    }
    let prefix_ok = !k.topic_prefix.is_empty()
        && k.topic_prefix.len() <= 200
        && k.topic_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !prefix_ok {
        return Err(invalid(
            "kafka.topic_prefix",
            format!(
                "`{}` must be 1-200 of [A-Za-z0-9._-] (it starts Kafka topic names)",
                k.topic_prefix
            ),
        ));
    }
    for (key, value) in [
        ("kafka.partitions", k.partitions),
        ("kafka.replication_factor", k.replication_factor),
    ] {
        if value < 1 {
            return Err(invalid(key, "must be at least 1"));
        }
    }
    for (key, value) in [
        ("kafka.prefetch", u64::from(k.prefetch)),
        ("kafka.session_timeout_ms", k.session_timeout_ms),
        ("kafka.max_poll_interval_ms", k.max_poll_interval_ms),
        ("kafka.delivery_timeout_ms", k.delivery_timeout_ms),
        ("kafka.operation_timeout_ms", k.operation_timeout_ms),
    ] {
        if value == 0 {
            return Err(invalid(key, "must be greater than 0"));
        }
    }
    if k.max_poll_interval_ms < k.session_timeout_ms {
        return Err(invalid(
            "kafka.max_poll_interval_ms",
            format!(
                "must be at least kafka.session_timeout_ms ({}), got {}",
                k.session_timeout_ms, k.max_poll_interval_ms
            ),
        ));
    }
    if k.client_id.trim().is_empty() {
        return Err(invalid("kafka.client_id", "must not be empty"));
    }
    for key in k.extra.keys() {
        if KafkaSettings::RESERVED.contains(&key.as_str()) {
            return Err(invalid(
                &format!("kafka.extra.{key}"),
                "is set by the Kafka transport itself (or by its own kafka.* key) and may not be overridden",
            ));
        }
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_'))
        {
            return Err(invalid(
                "kafka.extra",
                format!("`{key}` is not a librdkafka property name"),
            ));
        }
    }
    Ok(())
}

impl Settings {
    /// The queue-name prefix of the configured broker: `rabbitmq.queue_prefix`
    /// or `kafka.topic_prefix`.
    pub fn queue_prefix(&self) -> &str {
        match self.transport.kind {
            TransportKind::Rabbitmq => &self.rabbitmq.queue_prefix,
            TransportKind::Kafka => &self.kafka.topic_prefix,
        }
    }

    /// Deliveries out at once per consumer on the configured broker.
    pub fn prefetch(&self) -> u16 {
        match self.transport.kind {
            TransportKind::Rabbitmq => self.rabbitmq.prefetch,
            TransportKind::Kafka => self.kafka.prefetch,
        }
    }

    pub fn payment_delay(&self) -> Duration {
        Duration::from_millis(self.payment.delay_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_config() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configuration")
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_committed_files_load_with_the_documented_defaults() {
        let loaded = load_from(&repo_config(), env(&[])).expect("committed configuration loads");
        let s = loaded.settings;
        assert_eq!(s.payment.delay_ms, 5000);
        assert_eq!(s.payment.success_rate, 0.5);
        assert_eq!(s.expiration.sweep_interval_seconds, 60);
        assert_eq!(s.expiration.processing_timeout_seconds, 600);
        assert_eq!(s.expiration.batch_size, 2000);
        assert_eq!(s.expiration.sweep_workers, 4);
        assert_eq!(s.retry.max_attempts, 3);
        assert_eq!(s.monitoring.runner_listen, "127.0.0.1:9091");
        assert_eq!(s.monitoring.scheduler_listen, "127.0.0.1:9092");
        assert_eq!(s.monitoring.outbox_lag_max_seconds, 60);
        assert_eq!(s.monitoring.consumer_stall_seconds, 60);
        assert!(s.database.url.starts_with("postgres://"));
        assert!(s.rabbitmq.url.starts_with("amqp://"));
        assert_eq!(
            s.embedded.database_url,
            EmbeddedSettings::default().database_url
        );
    }

    #[test]
    fn environment_variables_override_nested_keys() {
        let loaded = load_from(
            &repo_config(),
            env(&[
                ("APP__PAYMENT__DELAY_MS", "200"),
                ("APP__PAYMENT__SUCCESS_RATE", "1"),
                ("APP__DATABASE__URL", "postgres://u@db:5432/x"),
                (
                    "APP__AUTH__JWT_SECRET",
                    "0123456789012345678901234567890123456789",
                ),
                ("APP__RABBITMQ__QUEUE_PREFIX", "test-prefix"),
            ]),
        )
        .expect("overrides load");
        let s = loaded.settings;
        assert_eq!(s.payment.delay_ms, 200);
        assert_eq!(s.payment.success_rate, 1.0);
        assert_eq!(s.database.url, "postgres://u@db:5432/x");
        assert_eq!(s.rabbitmq.queue_prefix, "test-prefix");
        assert_eq!(
            s.auth.jwt_secret.expose(),
            "0123456789012345678901234567890123456789"
        );
    }

    #[test]
    fn an_invalid_value_names_its_key() {
        let err = load_from(&repo_config(), env(&[("APP__PAYMENT__DELAY_MS", "soon")]))
            .expect_err("a word is not a number");
        assert!(err.to_string().contains("payment.delay_ms"), "{err}");

        let err = load_from(
            &repo_config(),
            env(&[("APP__PAYMENT__SUCCESS_RATE", "1.5")]),
        )
        .expect_err("out of range");
        assert!(err.to_string().contains("payment.success_rate"), "{err}");

        let err = load_from(&repo_config(), env(&[("APP__AUTH__JWT_SECRET", "short")]))
            .expect_err("short key");
        assert!(err.to_string().contains("auth.jwt_secret"), "{err}");

        let err = load_from(
            &repo_config(),
            env(&[("APP__MONITORING__RUNNER_LISTEN", "port 9091")]),
        )
        .expect_err("not an address");
        assert!(
            err.to_string().contains("monitoring.runner_listen"),
            "{err}"
        );
        let err = load_from(
            &repo_config(),
            env(&[("APP__MONITORING__CONSUMER_STALL_SECONDS", "0")]),
        )
        .expect_err("zero");
        assert!(
            err.to_string()
                .contains("monitoring.consumer_stall_seconds"),
            "{err}"
        );

        for workers in ["0", "11"] {
            let err = load_from(
                &repo_config(),
                env(&[
                    ("APP__EXPIRATION__SWEEP_WORKERS", workers),
                    ("APP__DATABASE__MAX_CONNECTIONS", "10"),
                ]),
            )
            .expect_err("no workers, or more than connections");
            assert!(
                err.to_string().contains("expiration.sweep_workers"),
                "{workers}: {err}"
            );
        }

        let err = load_from(&repo_config(), env(&[("APP__PAYMENT__DELAY", "5")]))
            .expect_err("unknown key");
        assert!(err.to_string().contains("payment"), "{err}");
    }

    #[test]
    fn a_missing_key_is_named() {
        let dir = std::env::temp_dir().join(format!("order-saga-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let full = std::fs::read_to_string(repo_config().join("instance.json")).expect("read");
        let mut json: serde_json::Value = serde_json::from_str(&full).expect("json");
        json["payment"]
            .as_object_mut()
            .expect("payment section")
            .remove("delay_ms");
        std::fs::write(dir.join("instance.json"), json.to_string()).expect("write");
        std::fs::copy(
            repo_config().join("secrets.example.json"),
            dir.join("secrets.example.json"),
        )
        .expect("copy");
        let err = load_from(&dir, env(&[])).expect_err("missing key");
        let _ = std::fs::remove_dir_all(&dir);
        let text = err.to_string();
        assert!(
            text.contains("payment") && text.contains("delay_ms"),
            "{text}"
        );
    }

    #[test]
    fn api_and_auth_limits_are_checked_and_named() {
        let err = load_from(
            &repo_config(),
            env(&[("APP__AUTH__TOKEN_TTL_SECONDS", "90000")]),
        )
        .expect_err("a day at most");
        assert!(err.to_string().contains("auth.token_ttl_seconds"), "{err}");
        let err = load_from(&repo_config(), env(&[("APP__API__BODY_LIMIT_BYTES", "0")]))
            .expect_err("zero");
        assert!(err.to_string().contains("api.body_limit_bytes"), "{err}");

        let mut s = load_from(&repo_config(), env(&[])).expect("loads").settings;
        assert_eq!(s.api.body_limit_bytes, 64 * 1024);
        assert!(s.api.cors_allowed_origins.is_empty());
        s.api.cors_allowed_origins = vec!["https://shop.example.com".into()];
        assert!(validate(&s).is_ok());
        for bad in ["*", "shop.example.com", "https://shop.example.com/"] {
            s.api.cors_allowed_origins = vec![bad.into()];
            let err = validate(&s).expect_err(bad);
            assert!(
                err.to_string().contains("api.cors_allowed_origins"),
                "{err}"
            );
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let loaded = load_from(&repo_config(), env(&[])).expect("loads");
        let debug = format!("{:?}", loaded.settings);
        assert!(!debug.contains(loaded.settings.auth.jwt_secret.expose()));
        assert!(!debug.contains(loaded.settings.seed.admin_password.expose()));
    }

    #[test]
    fn the_transport_is_rabbitmq_by_default_and_kafka_keys_have_their_defaults() {
        let s = load_from(&repo_config(), env(&[])).expect("loads").settings;
        assert_eq!(s.transport.kind, TransportKind::Rabbitmq);
        assert_eq!(s.queue_prefix(), "order_saga");
        assert_eq!(s.prefetch(), 256);
        let k = &s.kafka;
        assert_eq!(k.bootstrap_servers, "127.0.0.1:19092");
        assert_eq!(k.topic_prefix, "order_saga");
        assert_eq!(
            (k.partitions, k.replication_factor, k.prefetch),
            (3, 1, 256)
        );
        assert_eq!(
            (k.session_timeout_ms, k.max_poll_interval_ms),
            (10_000, 30_000)
        );
        assert_eq!(
            (k.delivery_timeout_ms, k.operation_timeout_ms),
            (10_000, 10_000)
        );
        assert_eq!(k.connect_retry_seconds, 60);
        assert_eq!(k.client_id, "order-saga");
        assert!(k.extra.is_empty());
        // A file without the sections gets the same values.
        let d = KafkaSettings::default();
        assert_eq!(d.bootstrap_servers, k.bootstrap_servers);
        assert_eq!(d.max_poll_interval_ms, k.max_poll_interval_ms);
    }

    #[test]
    fn kafka_is_chosen_and_tuned_by_environment_variables() {
        let s = load_from(
            &repo_config(),
            env(&[
                ("APP__TRANSPORT__KIND", "kafka"),
                ("APP__KAFKA__BOOTSTRAP_SERVERS", "kafka:9092,kafka2:9092"),
                ("APP__KAFKA__TOPIC_PREFIX", "shop"),
                ("APP__KAFKA__PARTITIONS", "6"),
                ("APP__KAFKA__PREFETCH", "8"),
                ("APP__KAFKA__SESSION_TIMEOUT_MS", "6000"),
                ("APP__KAFKA__MAX_POLL_INTERVAL_MS", "6000"),
            ]),
        )
        .expect("loads")
        .settings;
        assert_eq!(s.transport.kind, TransportKind::Kafka);
        assert_eq!(s.queue_prefix(), "shop");
        assert_eq!(s.prefetch(), 8);
        let t = s.kafka.transport_settings();
        assert_eq!(t.bootstrap_servers, "kafka:9092,kafka2:9092");
        assert_eq!(t.partitions, 6);
        assert_eq!(t.session_timeout, Duration::from_secs(6));
        assert_eq!(t.max_poll_interval, Duration::from_secs(6));
    }

    #[test]
    fn bad_kafka_values_name_their_key() {
        for (var, value, key) in [
            ("APP__TRANSPORT__KIND", "nats", "transport.kind"),
            (
                "APP__KAFKA__BOOTSTRAP_SERVERS",
                "kafka",
                "kafka.bootstrap_servers",
            ),
            (
                "APP__KAFKA__BOOTSTRAP_SERVERS",
                "",
                "kafka.bootstrap_servers",
            ),
            ("APP__KAFKA__TOPIC_PREFIX", "a b", "kafka.topic_prefix"),
            ("APP__KAFKA__PARTITIONS", "0", "kafka.partitions"),
            (
                "APP__KAFKA__REPLICATION_FACTOR",
                "-1",
                "kafka.replication_factor",
            ),
            ("APP__KAFKA__PREFETCH", "0", "kafka.prefetch"),
            (
                "APP__KAFKA__SESSION_TIMEOUT_MS",
                "0",
                "kafka.session_timeout_ms",
            ),
            (
                "APP__KAFKA__MAX_POLL_INTERVAL_MS",
                "5000",
                "kafka.max_poll_interval_ms",
            ),
            (
                "APP__KAFKA__DELIVERY_TIMEOUT_MS",
                "soon",
                "kafka.delivery_timeout_ms",
            ),
            ("APP__KAFKA__CLIENT_ID", " ", "kafka.client_id"),
        ] {
            let err = load_from(&repo_config(), env(&[(var, value)]))
                .expect_err(&format!("{var}={value} is refused"));
            assert!(err.to_string().contains(key), "{var}={value}: {err}");
        }
    }

    #[test]
    fn kafka_extra_refuses_what_the_transport_sets_and_never_shows_values() {
        let mut s = load_from(&repo_config(), env(&[])).expect("loads").settings;
        s.kafka.extra.insert(
            "sasl.password".to_owned(),
            Secret::new("hunter2-very-secret"),
        );
        s.kafka
            .extra
            .insert("security.protocol".to_owned(), Secret::new("sasl_ssl"));
        assert!(validate(&s).is_ok());
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2-very-secret"), "{debug}");
        assert!(debug.contains("sasl.password"), "{debug}");
        let t = s.kafka.transport_settings();
        assert_eq!(t.extra["sasl.password"], "hunter2-very-secret");
        for reserved in [
            "enable.auto.commit",
            "acks",
            "enable.idempotence",
            "group.id",
        ] {
            let mut bad = s.clone();
            bad.kafka
                .extra
                .insert(reserved.to_owned(), Secret::new("x"));
            let err = validate(&bad).expect_err(reserved);
            assert!(
                err.to_string().contains(&format!("kafka.extra.{reserved}")),
                "{err}"
            );
        }
    }

    #[test]
    fn kafka_extra_properties_with_dots_load_from_a_file() {
        let dir = std::env::temp_dir().join(format!("order-saga-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let full = std::fs::read_to_string(repo_config().join("instance.json")).expect("read");
        let mut json: serde_json::Value = serde_json::from_str(&full).expect("json");
        json["kafka"]["extra"] = serde_json::json!({
            "security.protocol": "sasl_plaintext",
            "sasl.mechanism": "PLAIN",
            "fetch.wait.max.ms": "100"
        });
        std::fs::write(dir.join("instance.json"), json.to_string()).expect("write");
        std::fs::copy(
            repo_config().join("secrets.example.json"),
            dir.join("secrets.example.json"),
        )
        .expect("copy");
        let loaded = load_from(&dir, env(&[]));
        let _ = std::fs::remove_dir_all(&dir);
        let extra = loaded
            .expect("loads")
            .settings
            .kafka
            .transport_settings()
            .extra;
        assert_eq!(extra["security.protocol"], "sasl_plaintext");
        assert_eq!(extra["sasl.mechanism"], "PLAIN");
        assert_eq!(extra["fetch.wait.max.ms"], "100");
    }

    #[test]
    fn database_password_is_merged_into_a_url_without_one() {
        let mut db = DatabaseSettings {
            url: "postgres://app@db:5432/orders".into(),
            password: Secret::new("p@ss word"),
            max_connections: 1,
            acquire_timeout_seconds: 1,
            connect_retry_seconds: 1,
        };
        assert_eq!(
            db.connection_url(),
            "postgres://app:p%40ss%20word@db:5432/orders"
        );
        db.url = "postgres://app:other@db:5432/orders".into();
        assert_eq!(db.connection_url(), "postgres://app:other@db:5432/orders");
    }
}
