//! `bench`: measures order-saga on this machine's PostgreSQL and RabbitMQ
//! next to the limits underneath (see docs/PERFORMANCE.md), and writes
//! `report.md`, `report.json` and `latency.svg`.
//!
//! Run it from the workspace: `cargo run --release -p bench` (`--help` for
//! the options). It builds the release host binaries first.

mod baselines;
mod kafka;
mod report;
mod scenarios;
mod stack;
mod stats;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use saga::testing::{TestDatabase, amqp_url};
use sea_orm::{ConnectionTrait, Statement};

use crate::report::{Environment, Figures, latency_svg};
use crate::scenarios::Services;
use crate::stack::{Hosts, default_config_dir};

const USAGE: &str = "\
bench: order-saga benchmark (baselines, API, end to end, 5 s burst, sweep, memory)

usage: cargo run --release -p bench -- [options]

  --quick               small sizes, one run each (a smoke run of a minute or two)
  --out DIR             where report.md, report.json, latency.svg go (target/bench)
  --runs N              repeats of the DB, broker, API and end-to-end scenarios (3; quick: 1)
  --only LIST           comma list of: db,broker,seed,api,e2e,burst,sweep,
                        kafka-broker,kafka-e2e (all; the Kafka rows are skipped
                        with a note when no broker answers at KAFKA_BOOTSTRAP)
  --db-txns N           DB limit transactions per run (20000)
  --broker-messages N   broker limit messages per run (50000)
  --seed-orders N       seed design orders (64)
  --api-requests N      API requests per run (10000)
  --e2e-orders N        end-to-end orders per run (5000)
  --burst-orders N      orders of the 5 s burst (5000)
  --sweep-sizes A,B     stale orders per sweep (10000,100000)
  --clients N           concurrent clients (32)
  --bin-dir DIR         take api, runner, scheduler from DIR instead of building them
  --no-build            do not run `cargo build --release -p hosts --bins` first
  --config-dir DIR      configuration folder of the hosts (the workspace's)

Environment: DATABASE_URL (any database on the server; bench databases are
created next to it and dropped), AMQP_URL, KAFKA_BOOTSTRAP (127.0.0.1:19092).";

#[derive(Clone, Debug)]
struct Options {
    quick: bool,
    out: PathBuf,
    runs: usize,
    only: Vec<String>,
    db_txns: usize,
    broker_messages: usize,
    seed_orders: usize,
    api_requests: usize,
    e2e_orders: usize,
    burst_orders: usize,
    sweep_sizes: Vec<usize>,
    clients: usize,
    bin_dir: Option<PathBuf>,
    build: bool,
    config_dir: PathBuf,
}

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Option<Self>> {
        let args: Vec<String> = args.collect();
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = Options {
            quick,
            out: PathBuf::from("target/bench"),
            runs: if quick { 1 } else { 3 },
            only: Vec::new(),
            db_txns: if quick { 2_000 } else { 20_000 },
            broker_messages: if quick { 5_000 } else { 50_000 },
            seed_orders: if quick { 32 } else { 64 },
            api_requests: if quick { 1_000 } else { 10_000 },
            e2e_orders: if quick { 500 } else { 5_000 },
            burst_orders: if quick { 500 } else { 5_000 },
            sweep_sizes: if quick {
                vec![1_000, 10_000]
            } else {
                vec![10_000, 100_000]
            },
            clients: 32,
            bin_dir: None,
            build: true,
            config_dir: default_config_dir(),
        };
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let mut value = || {
                it.next()
                    .with_context(|| format!("{arg} needs a value (see --help)"))
            };
            let number = |v: String, arg: &str| -> anyhow::Result<usize> {
                v.parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .with_context(|| format!("{arg}: expected a positive whole number, got {v:?}"))
            };
            match arg.as_str() {
                "--help" | "-h" => return Ok(None),
                "--quick" => {}
                "--no-build" => o.build = false,
                "--out" => o.out = PathBuf::from(value()?),
                "--bin-dir" => o.bin_dir = Some(PathBuf::from(value()?)),
                "--config-dir" => o.config_dir = PathBuf::from(value()?),
                "--only" => {
                    let v = value()?;
                    o.only = v.split(',').map(|s| s.trim().to_owned()).collect();
                    let known = [
                        "db",
                        "broker",
                        "seed",
                        "api",
                        "e2e",
                        "burst",
                        "sweep",
                        "kafka-broker",
                        "kafka-e2e",
                    ];
                    if let Some(bad) = o.only.iter().find(|s| !known.contains(&s.as_str())) {
                        bail!(
                            "--only: unknown scenario {bad:?}; known: {}",
                            known.join(",")
                        );
                    }
                }
                "--sweep-sizes" => {
                    let v = value()?;
                    o.sweep_sizes = v
                        .split(',')
                        .map(|s| number(s.trim().to_owned(), "--sweep-sizes"))
                        .collect::<anyhow::Result<_>>()?;
                }
                "--runs" => o.runs = number(value()?, &arg)?,
                "--db-txns" => o.db_txns = number(value()?, &arg)?,
                "--broker-messages" => o.broker_messages = number(value()?, &arg)?,
                "--seed-orders" => o.seed_orders = number(value()?, &arg)?,
                "--api-requests" => o.api_requests = number(value()?, &arg)?,
                "--e2e-orders" => o.e2e_orders = number(value()?, &arg)?,
                "--burst-orders" => o.burst_orders = number(value()?, &arg)?,
                "--clients" => o.clients = number(value()?, &arg)?,
                other => bail!("unknown option {other:?} (see --help)"),
            }
        }
        Ok(Some(o))
    }

    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}

/// The settings of `configuration/instance.json` the bench mirrors.
struct Config {
    prefetch: u16,
    payment_delay_ms: u64,
    success_rate: f64,
    batch_size: u64,
    sweep_workers: u32,
    processing_timeout_seconds: i64,
    api_db_pool: u32,
}

impl Config {
    /// Reads the hosts' configuration with the hosts' own loader (without
    /// `APP__` variables: the bench sets the hosts' overrides itself).
    fn read(dir: &Path) -> anyhow::Result<Self> {
        let loaded = hosts::settings::load_from(dir, std::iter::empty())
            .with_context(|| format!("Failed to read the configuration in {}", dir.display()))?;
        let s = loaded.settings;
        Ok(Self {
            prefetch: s.rabbitmq.prefetch,
            payment_delay_ms: s.payment.delay_ms,
            success_rate: s.payment.success_rate,
            batch_size: s.expiration.batch_size,
            sweep_workers: s.expiration.sweep_workers,
            processing_timeout_seconds: i64::try_from(s.expiration.processing_timeout_seconds)?,
            api_db_pool: s.database.max_connections,
        })
    }
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    let style = ProgressStyle::with_template(
        "{msg:<34} [{bar:30}] {pos:>7}/{len:7} {per_sec:>12} {elapsed_precise}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_message(what.to_owned());
    pb
}

fn build_hosts(options: &Options) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &options.bin_dir {
        return Ok(dir.clone());
    }
    if options.build {
        tracing::info!(
            "building the release host binaries (cargo build --release -p hosts --bins)"
        );
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = std::process::Command::new(cargo)
            .args(["build", "--release", "-p", "hosts", "--bins"])
            .status()
            .context("Failed to run cargo build")?;
        if !status.success() {
            bail!("cargo build --release -p hosts --bins failed");
        }
    }
    // Cargo puts them beside this executable (target/release).
    let exe = std::env::current_exe().context("Failed to find this executable")?;
    let dir = exe
        .parent()
        .context("this executable has no folder")?
        .to_path_buf();
    for name in ["api", "runner", "scheduler"] {
        if !dir.join(name).is_file() {
            bail!(
                "{} is missing: build it with `cargo build --release -p hosts --bins` or pass --bin-dir",
                dir.join(name).display()
            );
        }
    }
    Ok(dir)
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
        .unwrap_or_else(|_| "unknown".into())
}

async fn environment(options: &Options, config: &Config) -> anyhow::Result<Environment> {
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let admin = sea_orm::Database::connect(saga::testing::with_database(
        &saga::testing::database_url(),
        "postgres",
    ))
    .await
    .context("Failed to connect to PostgreSQL (see README, 'Services')")?;
    let mut settings = Vec::new();
    for name in [
        "server_version",
        "synchronous_commit",
        "fsync",
        "max_connections",
    ] {
        let row = admin
            .query_one_raw(Statement::from_string(
                admin.get_database_backend(),
                format!("SELECT current_setting('{name}') AS v"),
            ))
            .await?
            .context("no setting row")?;
        settings.push(row.try_get::<String>("", "v")?);
    }
    admin.close().await?;
    let rabbit = command_output("rabbitmqctl", &["version"])
        .map(|v| format!("RabbitMQ {v}"))
        .unwrap_or_else(|| "unknown (rabbitmqctl version failed)".into());
    Ok(Environment {
        started_at: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        commit: command_output("git", &["rev-parse", "--short", "HEAD"])
            .unwrap_or_else(|| "unknown".into()),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: mem_kib / 1024.0 / 1024.0,
        load_before: load_average(),
        load_after: String::new(),
        postgres_version: format!("PostgreSQL {}", settings[0]),
        synchronous_commit: settings[1].clone(),
        fsync: settings[2].clone(),
        postgres_max_connections: settings[3].clone(),
        rabbitmq_version: rabbit,
        queue_type: "classic, durable (`rabbitmq.queue_type` = classic)".into(),
        publisher_confirms:
            "persistent messages (delivery mode 2), publisher confirms, `mandatory`, manual acks"
                .into(),
        prefetch: config.prefetch,
        api_db_pool: config.api_db_pool,
        sweep_batch_size: config.batch_size,
        sweep_workers: config.sweep_workers,
        clients: options.clients,
        mode: if options.quick {
            "quick".into()
        } else {
            "full".into()
        },
    })
}

async fn run(options: Options) -> anyhow::Result<Figures> {
    let config = Config::read(&options.config_dir)?;
    let bin_dir = build_hosts(&options)?;
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("Failed to create {}", options.out.display()))?;
    let hosts = Hosts {
        bin_dir,
        config_dir: options.config_dir.clone(),
        logs: options.out.join("logs"),
    };
    let mut f = Figures {
        environment: environment(&options, &config).await?,
        ..Figures::default()
    };
    let runs = options.runs;
    let url = amqp_url();

    if options.wants("db") {
        let db = TestDatabase::create_with::<migration::Migrator>().await;
        let result = async {
            let (products, customer) = baselines::prepare_db(&db, scenarios::CATALOGUE).await?;
            let captured =
                Arc::new(baselines::capture_place_items(&db.url, &customer, products[0]).await?);
            f.notes.push(format!(
                "DB limit: the {} statements of one `place_items` transaction were captured from \
                 the engine in this run (sea-orm's metric callback) and replayed on sqlx with the \
                 same SQL text and parameter types; only the ids (product, order, instance, message \
                 ids) differ per transaction.",
                captured.statements.len()
            ));
            f.db_limit_statements = captured.statements.iter().map(|s| s.sql.clone()).collect();
            for r in 0..runs {
                let pb = bar(options.db_txns, &format!("DB limit (run {}/{runs})", r + 1));
                let t = baselines::db_limit(&db.url, &captured, &products, options.db_txns, options.clients, &pb).await?;
                pb.finish();
                f.db_limit.push(t);
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        db.drop().await;
        result.context("DB limit")?;
    }
    if options.wants("broker") {
        for r in 0..runs {
            let pb = bar(
                options.broker_messages,
                &format!("broker limit (run {}/{runs})", r + 1),
            );
            let (both, publish) =
                baselines::broker_limit(&url, options.broker_messages, config.prefetch, 1000, &pb)
                    .await
                    .context("broker limit")?;
            pb.finish();
            f.broker_limit.push(both);
            f.broker_publish_only.push(publish);
        }
    }
    if options.wants("seed") {
        let prefetch = (2 * f.environment.cores).max(16) as u16;
        let pb = bar(
            options.seed_orders,
            &format!("seed design (prefetch {prefetch})"),
        );
        let t = baselines::seed_design(
            &url,
            options.seed_orders,
            prefetch,
            Duration::from_millis(config.payment_delay_ms),
            &pb,
        )
        .await
        .context("seed design")?;
        pb.finish();
        f.seed_design = Some(t);
    }
    if options.wants("api") {
        for r in 0..runs {
            let services = Services::create().await?;
            let pb = bar(options.api_requests, &format!("API (run {}/{runs})", r + 1));
            let result = scenarios::api(
                &hosts,
                &services,
                &format!("api-{}", r + 1),
                options.api_requests,
                options.clients,
                &pb,
            )
            .await;
            pb.finish();
            services.remove().await;
            f.api.push(result.context("API scenario")?);
        }
    }
    if options.wants("e2e") {
        for r in 0..runs {
            let services = Services::create().await?;
            let pb = bar(
                options.e2e_orders,
                &format!("end to end (run {}/{runs})", r + 1),
            );
            let result = scenarios::end_to_end(
                &hosts,
                &services,
                &format!("e2e-{}", r + 1),
                options.e2e_orders,
                options.clients,
                &pb,
            )
            .await;
            pb.finish();
            services.remove().await;
            f.end_to_end.push(result.context("end-to-end scenario")?);
        }
    }
    if options.wants("burst") {
        let services = Services::create().await?;
        let pb = bar(
            options.burst_orders,
            &format!("burst at {} ms: decided", config.payment_delay_ms),
        );
        let result = scenarios::burst(
            &hosts,
            &services,
            options.burst_orders,
            options.clients,
            config.payment_delay_ms,
            config.success_rate,
            &pb,
        )
        .await;
        pb.finish();
        services.remove().await;
        f.burst = Some(result.context("burst scenario")?);
    }
    if options.wants("sweep") {
        for &size in &options.sweep_sizes {
            let insert = bar(size, &format!("sweep {size}: insert stale"));
            let pb = bar(size, &format!("sweep {size}: expired"));
            let result = scenarios::sweep(
                size,
                config.batch_size,
                config.sweep_workers,
                chrono::Duration::seconds(config.processing_timeout_seconds),
                &insert,
                &pb,
            )
            .await;
            insert.finish();
            pb.finish();
            f.sweeps.push(result.context("sweep scenario")?);
        }
    }
    if options.wants("kafka-broker") || options.wants("kafka-e2e") {
        match kafka::unavailable().await {
            Some(why) => f.kafka_skipped = Some(why),
            None => run_kafka(&options, &config, &hosts, &mut f).await?,
        }
    }
    f.environment.load_after = load_average();
    f.summarise();
    Ok(f)
}

/// The Kafka rows (a broker answers): the transport's broker limit and end
/// to end with every host on Kafka, each on topics of its own.
async fn run_kafka(
    options: &Options,
    config: &Config,
    hosts: &Hosts,
    f: &mut Figures,
) -> anyhow::Result<()> {
    let runs = options.runs;
    if options.wants("kafka-broker") {
        for r in 0..runs {
            let pb = bar(
                options.broker_messages,
                &format!("Kafka broker limit (run {}/{runs})", r + 1),
            );
            let (both, publish) =
                kafka::broker_limit(options.broker_messages, config.prefetch, 1000, &pb)
                    .await
                    .context("Kafka broker limit")?;
            pb.finish();
            f.kafka_broker_limit.push(both);
            f.kafka_broker_publish_only.push(publish);
        }
    }
    if options.wants("kafka-e2e") {
        for r in 0..runs {
            let services = Services::create().await?;
            let topics = match kafka::Topics::create(orders::topology::queues).await {
                Ok(topics) => topics,
                Err(e) => {
                    services.remove().await;
                    return Err(e.context("Kafka end to end"));
                }
            };
            let label = format!("kafka-e2e-{}", r + 1);
            let pb = bar(
                options.e2e_orders,
                &format!("Kafka end to end (run {}/{runs})", r + 1),
            );
            let result = async {
                let stack = stack::Stack::start_on(
                    hosts,
                    &services.db,
                    stack::BrokerSpec::Kafka(topics.host_env()),
                    scenarios::end_to_end_spec(&label),
                )
                .await?;
                scenarios::measure_end_to_end(
                    stack,
                    hosts,
                    &services,
                    options.e2e_orders,
                    options.clients,
                    &pb,
                )
                .await
            }
            .await;
            pb.finish();
            topics.delete().await;
            services.remove().await;
            f.kafka_end_to_end
                .push(result.context("Kafka end-to-end scenario")?);
        }
    }
    Ok(())
}

fn write_report(f: &Figures, out: &Path) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(f)?;
    std::fs::write(out.join("report.json"), json)?;
    std::fs::write(out.join("report.md"), f.markdown())?;
    let pick = |l: Option<&stats::Latency>| l.map(|l| l.sorted_ms.clone()).unwrap_or_default();
    let series = [
        (
            "DB limit (tx)",
            pick(f.db_limit.last().and_then(|t| t.latency.as_ref())),
        ),
        (
            "API POST /api/orders",
            pick(f.api.last().map(|a| &a.latency)),
        ),
        ("end to end", pick(f.end_to_end.last().map(|e| &e.latency))),
    ];
    std::fs::write(out.join("latency.svg"), latency_svg(&series))?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some(options) = Options::parse(std::env::args().skip(1))? else {
        println!("{USAGE}");
        return Ok(());
    };
    // The bench's own log (the in-process sweep logs every expired order, as
    // the scheduler does) goes to a file, so the progress bars stay readable.
    let logs = options.out.join("logs");
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("Failed to create {}", logs.display()))?;
    let log = std::fs::File::create(logs.join("bench.log"))
        .with_context(|| format!("Failed to create {}", logs.join("bench.log").display()))?;
    tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(log))
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,sqlx=warn,lapin=warn")
            }),
        )
        .init();
    let figures = run(options.clone()).await?;
    write_report(&figures, &options.out)?;
    // The report is this command's output.
    println!("{}", figures.markdown());
    println!(
        "Written: report.md, report.json and latency.svg in {} (host and bench logs in {})",
        options.out.display(),
        logs.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Option<Options>> {
        Options::parse(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn quick_shrinks_every_size_and_flags_override() {
        let o = parse(&["--quick", "--api-requests", "77"])
            .expect("ok")
            .expect("options");
        assert!(o.quick);
        assert_eq!(o.runs, 1);
        assert_eq!(o.api_requests, 77);
        assert_eq!(o.sweep_sizes, [1_000, 10_000]);
        let full = parse(&[]).expect("ok").expect("options");
        assert_eq!((full.runs, full.burst_orders), (3, 5_000));
        assert_eq!(full.sweep_sizes, [10_000, 100_000]);
    }

    #[test]
    fn the_kafka_rows_are_selected_by_name_and_included_by_default() {
        let o = parse(&["--quick", "--only", "kafka-broker,kafka-e2e"])
            .expect("ok")
            .expect("options");
        assert!(o.wants("kafka-broker") && o.wants("kafka-e2e"));
        assert!(!o.wants("broker") && !o.wants("e2e"));
        let all = parse(&[]).expect("ok").expect("options");
        assert!(all.wants("kafka-broker") && all.wants("kafka-e2e"));
    }

    #[test]
    fn a_skipped_kafka_section_says_why_and_measured_rows_are_listed() {
        let mut f = Figures {
            kafka_skipped: Some("Kafka rows skipped: no broker answers at x".into()),
            ..Figures::default()
        };
        f.summarise();
        assert!(f.markdown().contains("## Kafka"));
        assert!(
            f.markdown()
                .contains("Kafka rows skipped: no broker answers at x")
        );
        f.kafka_skipped = None;
        f.kafka_broker_limit.push(baselines::Throughput {
            count: 100,
            seconds: 2.0,
            per_second: 50.0,
            latency: None,
        });
        let text = f.markdown();
        assert!(
            text.contains("| Kafka broker limit | 1 | 100 | 2.00 | 50.0 |"),
            "{text}"
        );
        assert!(!Figures::default().markdown().contains("## Kafka"));
    }

    #[test]
    fn bad_options_are_refused_with_the_reason() {
        let err = |args: &[&str]| parse(args).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(&["--runs", "0"]).contains("positive whole number"));
        assert!(err(&["--runs"]).contains("needs a value"));
        assert!(err(&["--only", "db,nope"]).contains("unknown scenario \"nope\""));
        assert!(err(&["--only", "kafka"]).contains("unknown scenario \"kafka\""));
        assert!(err(&["--frobnicate"]).contains("unknown option"));
        assert!(parse(&["--help"]).expect("ok").is_none());
    }
}
