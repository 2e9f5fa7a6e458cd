//! The deployed hosts (`api`, `runner`, `scheduler`) as separate processes on
//! a bench database and broker topology, their peak memory, and an HTTP load
//! generator for `POST /api/orders`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use saga::testing::{TestBroker, TestDatabase};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde_json::{Value, json};
use std::process::{Child, Command};

/// Where the host binaries and their configuration are.
#[derive(Clone, Debug)]
pub struct Hosts {
    pub bin_dir: PathBuf,
    pub config_dir: PathBuf,
    pub logs: PathBuf,
}

/// One running host process.
struct Host {
    name: &'static str,
    child: Child,
}

/// The hosts of one scenario, killed on drop (and by [`Stack::stop`]).
pub struct Stack {
    hosts: Vec<Host>,
    pub api: Api,
    /// Where each host serves `/metrics` (`host name`, base URL).
    pub metrics: Vec<(&'static str, String)>,
}

/// Settings of a stack that differ between scenarios.
pub struct StackSpec<'a> {
    pub label: &'a str,
    pub runner: bool,
    pub scheduler: bool,
    pub payment_delay_ms: u64,
    pub success_rate: f64,
}

/// The broker a stack runs on.
pub enum BrokerSpec<'a> {
    /// RabbitMQ: the run's exchange and queues.
    Rabbit(&'a TestBroker),
    /// Kafka: the hosts' `APP__TRANSPORT__*` / `APP__KAFKA__*` variables.
    Kafka(Vec<(&'static str, String)>),
}

impl Stack {
    /// Starts the api (and, as asked, a runner and a scheduler) on `db` and
    /// `broker`; returns once the api answers `/health` and every runner
    /// queue has a consumer.
    pub async fn start(
        hosts: &Hosts,
        db: &TestDatabase,
        broker: &TestBroker,
        spec: StackSpec<'_>,
    ) -> anyhow::Result<Stack> {
        Self::start_on(hosts, db, BrokerSpec::Rabbit(broker), spec).await
    }

    /// [`Stack::start`] on either broker; on Kafka it returns once the
    /// runner is ready (its consumers are in their groups).
    pub async fn start_on(
        hosts: &Hosts,
        db: &TestDatabase,
        broker: BrokerSpec<'_>,
        spec: StackSpec<'_>,
    ) -> anyhow::Result<Stack> {
        let port = free_port()?;
        let base = format!("http://127.0.0.1:{port}");
        let runner_port = free_port()?;
        let scheduler_port = free_port()?;
        let broker_env: Vec<(&str, String)> = match &broker {
            BrokerSpec::Rabbit(broker) => vec![
                ("APP__RABBITMQ__URL", broker.url.clone()),
                ("APP__RABBITMQ__EXCHANGE", broker.exchange.clone()),
                ("APP__RABBITMQ__QUEUE_PREFIX", broker.prefix.clone()),
            ],
            BrokerSpec::Kafka(env) => env.clone(),
        };
        let mut env: Vec<(&str, String)> = vec![
            ("APP_CONFIG_DIR", hosts.config_dir.display().to_string()),
            ("APP__DATABASE__URL", db.url.clone()),
            ("APP__API__LISTEN", format!("127.0.0.1:{port}")),
            ("APP__API__PUBLIC_URL", base.clone()),
            ("APP__PAYMENT__DELAY_MS", spec.payment_delay_ms.to_string()),
            ("APP__PAYMENT__SUCCESS_RATE", spec.success_rate.to_string()),
            (
                "APP__MONITORING__RUNNER_LISTEN",
                format!("127.0.0.1:{runner_port}"),
            ),
            (
                "APP__MONITORING__SCHEDULER_LISTEN",
                format!("127.0.0.1:{scheduler_port}"),
            ),
            // Logs as configured (`logging.filter`), to a file per host.
            ("NO_COLOR", "1".into()),
        ];
        env.extend(broker_env);
        std::fs::create_dir_all(&hosts.logs)
            .with_context(|| format!("Failed to create {}", hosts.logs.display()))?;
        let mut metrics = vec![("api", base.clone())];
        if spec.runner {
            metrics.push(("runner", format!("http://127.0.0.1:{runner_port}")));
        }
        if spec.scheduler {
            metrics.push(("scheduler", format!("http://127.0.0.1:{scheduler_port}")));
        }
        let mut stack = Stack {
            hosts: Vec::new(),
            api: Api::new(base)?,
            metrics,
        };
        stack.spawn(hosts, "api", spec.label, &env)?;
        stack.api.wait_healthy(Duration::from_secs(60)).await?;
        if spec.runner {
            stack.spawn(hosts, "runner", spec.label, &env)?;
            match &broker {
                BrokerSpec::Rabbit(broker) => {
                    let queues = [
                        orders::topology::saga_queue(&broker.prefix).name,
                        orders::topology::notifications_queue(&broker.prefix).name,
                    ];
                    wait_for_consumers(&broker.url, &queues, Duration::from_secs(60)).await?;
                }
                BrokerSpec::Kafka(_) => {
                    let ready = format!("http://127.0.0.1:{runner_port}/health/ready");
                    wait_until_ready(&mut stack, hosts, &ready, Duration::from_secs(60)).await?;
                }
            }
        }
        if spec.scheduler {
            stack.spawn(hosts, "scheduler", spec.label, &env)?;
        }
        Ok(stack)
    }

    fn spawn(
        &mut self,
        hosts: &Hosts,
        name: &'static str,
        label: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let exe = hosts.bin_dir.join(name);
        let log_path = hosts.logs.join(format!("{label}-{name}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("Failed to create {}", log_path.display()))?;
        let mut command = Command::new(&exe);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .with_context(|| format!("Failed to start {}", exe.display()))?;
        self.hosts.push(Host { name, child });
        Ok(())
    }

    /// The sum over the hosts of the counter `name` on their `/metrics`.
    pub async fn counter(&self, name: &str) -> anyhow::Result<f64> {
        let client = reqwest::Client::new();
        let mut total = 0.0;
        for (host, base) in &self.metrics {
            let text = client
                .get(format!("{base}/metrics"))
                .send()
                .await
                .with_context(|| format!("Failed to scrape the {host}'s metrics"))?
                .text()
                .await?;
            total += text
                .lines()
                .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        Ok(total)
    }

    /// Fails, naming the log, if a host has exited.
    pub fn check_running(&mut self, hosts: &Hosts) -> anyhow::Result<()> {
        for host in &mut self.hosts {
            if let Ok(Some(status)) = host.child.try_wait() {
                bail!(
                    "{} exited with {status}; see its log in {}",
                    host.name,
                    hosts.logs.display()
                );
            }
        }
        Ok(())
    }

    /// Peak resident memory (`VmHWM`) of each host so far, in MiB.
    pub fn peak_rss_mib(&self) -> Vec<(&'static str, f64)> {
        self.hosts
            .iter()
            .filter_map(|h| Some((h.name, vm_hwm_kib(h.child.id())? as f64 / 1024.0)))
            .collect()
    }

    /// Kills every host and waits for it.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            let _ = host.child.kill();
            let _ = host.child.wait();
        }
    }
}

/// `VmHWM` of `/proc/<pid>/status`, in KiB.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("Failed to find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `url` until it answers 200 (a host's readiness).
async fn wait_until_ready(
    stack: &mut Stack,
    hosts: &Hosts,
    url: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        stack.check_running(hosts)?;
        if Instant::now() >= deadline {
            bail!("{url} not ready after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until each of `queues` has at least one consumer.
async fn wait_for_consumers(url: &str, queues: &[String], within: Duration) -> anyhow::Result<()> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .context("Failed to connect to RabbitMQ")?;
    let deadline = Instant::now() + within;
    for queue in queues {
        loop {
            // A passive declare that fails closes the channel: one per try.
            let channel = conn.create_channel().await?;
            let consumers = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|q| q.consumer_count())
                .unwrap_or(0);
            let _ = channel.close(200, "ok".into()).await;
            if consumers > 0 {
                break;
            }
            if Instant::now() >= deadline {
                bail!("no consumer on {queue} after {within:?}: did the runner start?");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let _ = conn.close(200, "ok".into()).await;
    Ok(())
}

/// Adds `count` products with practically unlimited stock, so that stock
/// never runs out and row locks spread over many rows; returns their ids.
pub async fn add_products(db: &DatabaseConnection, count: usize) -> anyhow::Result<Vec<i64>> {
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "INSERT INTO products (name, description, price, stock, created_at, updated_at) \
             SELECT 'bench product ' || g, 'benchmark', 12.50, 1000000000, now(), now() \
             FROM generate_series(1, $1) AS g RETURNING id",
            [(count as i64).into()],
        ))
        .await
        .context("Failed to insert the bench products")?;
    rows.iter()
        .map(|r| r.try_get::<i64>("", "id").map_err(Into::into))
        .collect()
}

/// The product of the `i`-th order: spread over the catalogue in a fixed,
/// scattered sequence (the same in every scenario and the DB baseline).
pub fn product_for(products: &[i64], i: usize) -> i64 {
    products[(i.wrapping_mul(7919)) % products.len()]
}

/// What a load run gave.
pub struct Load {
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
    pub order_ids: Vec<i64>,
    pub failures: usize,
    pub first_failure: Option<String>,
}

/// An HTTP client for one api.
#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(base: String) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .timeout(Duration::from_secs(30))
            .build()
            .context("Failed to build the HTTP client")?;
        Ok(Self { base, http })
    }

    async fn wait_healthy(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let url = format!("{}/health", self.base);
        loop {
            if let Ok(r) = self.http.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the api did not answer {url} within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> anyhow::Result<Value> {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("POST {path}: {status}: {body}");
        }
        Ok(body)
    }

    /// Registers a bench user and logs in; returns the token.
    pub async fn user_token(&self) -> anyhow::Result<String> {
        let email = format!("bench-{}@example.com", uuid::Uuid::new_v4().simple());
        let password = "bench-password";
        self.post(
            "/api/users",
            None,
            &json!({"name": "Bench", "email": email, "password": password}),
        )
        .await
        .context("Failed to register the bench user")?;
        let login = self
            .post(
                "/api/auth/login",
                None,
                &json!({"email": email, "password": password}),
            )
            .await
            .context("Failed to log in")?;
        login["token"]
            .as_str()
            .map(str::to_owned)
            .context("login answered without a token")
    }

    /// `count` orders (one line, quantity 1, products by [`product_for`]),
    /// each with its own `Idempotency-Key`, from `clients` concurrent clients.
    pub async fn place_orders(
        &self,
        token: &str,
        products: &[i64],
        count: usize,
        clients: usize,
        progress: &ProgressBar,
    ) -> Load {
        let next = Arc::new(AtomicUsize::new(0));
        let run = uuid::Uuid::new_v4().simple().to_string();
        let started = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..clients {
            let (api, next, progress) = (self.clone(), next.clone(), progress.clone());
            let (token, products, run) = (token.to_owned(), products.to_vec(), run.clone());
            workers.push(tokio::spawn(async move {
                let mut done = (Vec::new(), Vec::new(), 0usize, None::<String>);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return done;
                    }
                    let body = json!({"items": [{"product_id": product_for(&products, i), "quantity": 1}]});
                    let t0 = Instant::now();
                    let result = api
                        .http
                        .post(format!("{}/api/orders", api.base))
                        .bearer_auth(&token)
                        .header("idempotency-key", format!("bench-{run}-{i}"))
                        .json(&body)
                        .send()
                        .await;
                    let outcome = match result {
                        Ok(r) if r.status().as_u16() == 201 => r
                            .json::<Value>()
                            .await
                            .ok()
                            .and_then(|v| v["id"].as_i64())
                            .ok_or_else(|| "201 without an order id".to_owned()),
                        Ok(r) => Err(format!("{}: {}", r.status(), r.text().await.unwrap_or_default())),
                        Err(e) => Err(e.to_string()),
                    };
                    match outcome {
                        Ok(id) => {
                            done.0.push(t0.elapsed());
                            done.1.push(id);
                        }
                        Err(e) => {
                            done.2 += 1;
                            done.3.get_or_insert(e);
                        }
                    }
                    progress.inc(1);
                }
            }));
        }
        let mut load = Load {
            latencies: Vec::with_capacity(count),
            elapsed: Duration::ZERO,
            order_ids: Vec::with_capacity(count),
            failures: 0,
            first_failure: None,
        };
        for worker in workers {
            match worker.await {
                Ok((lat, ids, failures, first)) => {
                    load.latencies.extend(lat);
                    load.order_ids.extend(ids);
                    load.failures += failures;
                    if load.first_failure.is_none() {
                        load.first_failure = first;
                    }
                }
                Err(e) => {
                    load.failures += 1;
                    load.first_failure.get_or_insert(e.to_string());
                }
            }
        }
        load.elapsed = started.elapsed();
        load
    }
}

/// The workspace's `configuration/` folder (next to this crate).
pub fn default_config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configuration")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_is_read_from_proc_status() {
        let status = "Name:\tapi\nVmPeak:\t  900 kB\nVmHWM:\t   24576 kB\nVmRSS:\t 20000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(24576));
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
        assert!(vm_hwm_kib(std::process::id()).is_some_and(|k| k > 0));
    }

    #[test]
    fn products_are_spread_over_the_catalogue() {
        let products: Vec<i64> = (1..=64).collect();
        let used: std::collections::HashSet<i64> =
            (0..64).map(|i| product_for(&products, i)).collect();
        assert_eq!(used.len(), 64);
    }
}
