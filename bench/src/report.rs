//! The report: every figure as JSON, the same as Markdown tables, and a
//! latency chart as a hand-written SVG.

use std::fmt::Write as _;

use serde::Serialize;

use crate::baselines::Throughput;
use crate::scenarios::{ApiResult, Burst, EndToEnd, Sweep};
use crate::stats::{median, ratio};

/// The machine and the services' settings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Environment {
    pub started_at: String,
    pub commit: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub load_before: String,
    pub load_after: String,
    pub postgres_version: String,
    pub synchronous_commit: String,
    pub fsync: String,
    pub postgres_max_connections: String,
    pub rabbitmq_version: String,
    pub queue_type: String,
    pub publisher_confirms: String,
    pub prefetch: u16,
    pub api_db_pool: u32,
    pub sweep_batch_size: u64,
    pub sweep_workers: u32,
    pub clients: usize,
    pub mode: String,
}

/// Everything one run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Figures {
    pub environment: Environment,
    pub db_limit: Vec<Throughput>,
    pub broker_limit: Vec<Throughput>,
    pub broker_publish_only: Vec<Throughput>,
    pub seed_design: Option<Throughput>,
    pub api: Vec<ApiResult>,
    pub end_to_end: Vec<EndToEnd>,
    pub burst: Option<Burst>,
    pub sweeps: Vec<Sweep>,
    /// Kafka rows (`--only kafka-broker,kafka-e2e`): the Kafka transport's
    /// broker limit, its publish side, and end to end with the hosts on
    /// Kafka. Empty when skipped (see `kafka_skipped`).
    pub kafka_broker_limit: Vec<Throughput>,
    pub kafka_broker_publish_only: Vec<Throughput>,
    pub kafka_end_to_end: Vec<EndToEnd>,
    /// Why the Kafka rows were skipped (no broker answered).
    pub kafka_skipped: Option<String>,
    pub summary: Summary,
    pub notes: Vec<String>,
    /// The SQL of the captured `place_items` transaction (the DB limit).
    pub db_limit_statements: Vec<String>,
}

/// Medians over the repeated runs and the ratios the targets are about.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub db_limit_tps: f64,
    pub broker_limit_msgs: f64,
    pub seed_design_orders: f64,
    pub api_rps: f64,
    pub api_p50_ms: f64,
    pub api_p95_ms: f64,
    pub api_p99_ms: f64,
    pub api_to_db_limit: f64,
    pub e2e_orders: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    pub e2e_to_lower_limit: f64,
    pub e2e_write_transactions_per_order: f64,
    pub e2e_commits_per_order: f64,
    pub e2e_statements_per_order: f64,
    pub burst_decided_seconds: f64,
    pub burst_to_seed_design: f64,
    pub sweep_largest_orders: usize,
    pub sweep_largest_seconds: f64,
    /// Time per order of the largest sweep over that of the smallest (1 = linear).
    pub sweep_linearity: f64,
    pub api_peak_rss_mib: f64,
    pub runner_peak_rss_mib: f64,
    pub targets: Vec<Target>,
}

/// One target of the issue.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub goal: String,
    pub measured: String,
    /// `None`: not measured in this run.
    pub met: Option<bool>,
}

fn med<T>(items: &[T], f: impl Fn(&T) -> f64) -> f64 {
    median(&items.iter().map(f).collect::<Vec<_>>())
}

fn max_of(values: impl Iterator<Item = Option<f64>>) -> f64 {
    values.flatten().fold(0.0, f64::max)
}

impl Figures {
    /// Computes the summary and the targets from the runs.
    pub fn summarise(&mut self) {
        let s = &mut self.summary;
        s.db_limit_tps = med(&self.db_limit, |t| t.per_second);
        s.broker_limit_msgs = med(&self.broker_limit, |t| t.per_second);
        s.seed_design_orders = self.seed_design.as_ref().map_or(0.0, |t| t.per_second);
        s.api_rps = med(&self.api, |a| a.per_second);
        s.api_p50_ms = med(&self.api, |a| a.latency.p50_ms);
        s.api_p95_ms = med(&self.api, |a| a.latency.p95_ms);
        s.api_p99_ms = med(&self.api, |a| a.latency.p99_ms);
        s.api_to_db_limit = ratio(s.api_rps, s.db_limit_tps);
        s.e2e_orders = med(&self.end_to_end, |e| e.per_second);
        s.e2e_p50_ms = med(&self.end_to_end, |e| e.latency.p50_ms);
        s.e2e_p99_ms = med(&self.end_to_end, |e| e.latency.p99_ms);
        s.e2e_write_transactions_per_order = med(&self.end_to_end, |e| e.cost.write_transactions);
        s.e2e_commits_per_order = med(&self.end_to_end, |e| e.cost.commits);
        s.e2e_statements_per_order = med(&self.end_to_end, |e| e.cost.statements);
        let lower = if self.broker_limit.is_empty() {
            s.db_limit_tps
        } else if self.db_limit.is_empty() {
            s.broker_limit_msgs
        } else {
            s.db_limit_tps.min(s.broker_limit_msgs)
        };
        s.e2e_to_lower_limit = ratio(s.e2e_orders, lower);
        if let Some(b) = &self.burst {
            s.burst_decided_seconds = b.decided_seconds;
            s.burst_to_seed_design = ratio(b.per_second, s.seed_design_orders);
        }
        if let (Some(small), Some(large)) = (
            self.sweeps.iter().min_by_key(|w| w.orders),
            self.sweeps.iter().max_by_key(|w| w.orders),
        ) {
            s.sweep_largest_orders = large.orders;
            s.sweep_largest_seconds = large.seconds;
            s.sweep_linearity = ratio(large.microseconds_per_order, small.microseconds_per_order);
        }
        s.api_peak_rss_mib = max_of(
            self.api
                .iter()
                .map(|a| a.memory.api_mib)
                .chain(self.end_to_end.iter().map(|e| e.memory.api_mib)),
        );
        s.runner_peak_rss_mib = max_of(self.end_to_end.iter().map(|e| e.memory.runner_mib));

        let mut targets = Vec::new();
        let measured = |has: bool, met: bool| has.then_some(met);
        let (has_api, has_db) = (!self.api.is_empty(), !self.db_limit.is_empty());
        targets.push(Target {
            name: "API throughput".into(),
            goal: ">= 0.5 x DB limit".into(),
            measured: format!(
                "{:.0} req/s = {:.2} x {:.0} tx/s",
                s.api_rps, s.api_to_db_limit, s.db_limit_tps
            ),
            met: measured(has_api && has_db, s.api_to_db_limit >= 0.5),
        });
        targets.push(Target {
            name: "API p99 latency".into(),
            goal: "< 50 ms".into(),
            measured: format!("{:.1} ms", s.api_p99_ms),
            met: measured(has_api, s.api_p99_ms < 50.0),
        });
        let has_e2e = !self.end_to_end.is_empty();
        targets.push(Target {
            name: "End to end throughput".into(),
            goal: ">= 500 orders/s".into(),
            measured: format!("{:.0} orders/s", s.e2e_orders),
            met: measured(has_e2e, s.e2e_orders >= 500.0),
        });
        targets.push(Target {
            name: "End to end vs lower limit".into(),
            goal: ">= 0.5 x min(DB, broker)".into(),
            measured: format!("{:.2} x {:.0}/s", s.e2e_to_lower_limit, lower),
            met: measured(has_e2e && lower > 0.0, s.e2e_to_lower_limit >= 0.5),
        });
        targets.push(Target {
            name: "Write transactions per order (end to end)".into(),
            goal: "<= 3".into(),
            measured: format!(
                "{:.2} ({:.1} statements)",
                s.e2e_write_transactions_per_order, s.e2e_statements_per_order
            ),
            met: measured(has_e2e, s.e2e_write_transactions_per_order <= 3.0),
        });
        let burst = self.burst.as_ref();
        targets.push(Target {
            name: "Burst at the real delay".into(),
            goal: "all decided within 15 s".into(),
            measured: burst.map_or("not run".into(), |b| {
                format!("{} orders in {:.1} s", b.orders, b.decided_seconds)
            }),
            met: burst.map(|b| b.orders >= 5000 && b.decided_seconds <= 15.0),
        });
        targets.push(Target {
            name: "Burst vs seed design".into(),
            goal: ">= 100 x".into(),
            measured: format!("{:.0} x", s.burst_to_seed_design),
            met: measured(
                burst.is_some() && self.seed_design.is_some(),
                s.burst_to_seed_design >= 100.0,
            ),
        });
        targets.push(Target {
            name: "Expiration sweep".into(),
            goal: "100,000 stale orders in <= 10 s".into(),
            measured: format!(
                "{} orders in {:.1} s",
                s.sweep_largest_orders, s.sweep_largest_seconds
            ),
            met: measured(
                s.sweep_largest_orders >= 100_000,
                s.sweep_largest_seconds <= 10.0,
            ),
        });
        targets.push(Target {
            name: "API peak RSS".into(),
            goal: "<= 64 MiB".into(),
            measured: format!("{:.1} MiB", s.api_peak_rss_mib),
            met: measured(s.api_peak_rss_mib > 0.0, s.api_peak_rss_mib <= 64.0),
        });
        targets.push(Target {
            name: "Runner peak RSS".into(),
            goal: "<= 64 MiB".into(),
            measured: format!("{:.1} MiB", s.runner_peak_rss_mib),
            met: measured(s.runner_peak_rss_mib > 0.0, s.runner_peak_rss_mib <= 64.0),
        });
        s.targets = targets;
    }

    /// The report as Markdown (the same tables as docs/PERFORMANCE.md).
    pub fn markdown(&self) -> String {
        let e = &self.environment;
        let s = &self.summary;
        let mut m = String::new();
        let _ = writeln!(m, "# order-saga benchmark report\n");
        let _ = writeln!(
            m,
            "Run at {} on commit `{}` ({} mode).\n",
            e.started_at, e.commit, e.mode
        );
        let _ = writeln!(m, "## Machine and services\n");
        let _ = writeln!(m, "| | |\n| --- | --- |");
        let rows = [
            ("CPU cores", e.cores.to_string()),
            ("memory", format!("{:.1} GiB", e.memory_gib)),
            ("load average (1, 5, 15 min) before", e.load_before.clone()),
            ("load average after", e.load_after.clone()),
            ("PostgreSQL", e.postgres_version.clone()),
            ("`synchronous_commit`", e.synchronous_commit.clone()),
            ("`fsync`", e.fsync.clone()),
            ("`max_connections`", e.postgres_max_connections.clone()),
            ("RabbitMQ", e.rabbitmq_version.clone()),
            ("queues", e.queue_type.clone()),
            ("publishing", e.publisher_confirms.clone()),
            (
                "consumer prefetch (`rabbitmq.prefetch`)",
                e.prefetch.to_string(),
            ),
            (
                "api DB pool (`database.max_connections`)",
                e.api_db_pool.to_string(),
            ),
            ("concurrent clients (API, DB limit)", e.clients.to_string()),
            (
                "sweep (`expiration.batch_size`, `expiration.sweep_workers`)",
                format!(
                    "{} orders per transaction, {} at once",
                    e.sweep_batch_size, e.sweep_workers
                ),
            ),
        ];
        for (k, v) in rows {
            let _ = writeln!(m, "| {k} | {v} |");
        }
        let _ = writeln!(m, "\n## Targets\n");
        let _ = writeln!(
            m,
            "| target | goal | measured | met |\n| --- | --- | --- | --- |"
        );
        for t in &s.targets {
            let met = match t.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None => "not measured",
            };
            let _ = writeln!(m, "| {} | {} | {} | {met} |", t.name, t.goal, t.measured);
        }
        let _ = writeln!(m, "\n## Figures (medians over the runs)\n");
        let _ = writeln!(m, "| figure | value |\n| --- | --- |");
        let figures = [
            (
                "DB limit (place_items' statements, sqlx, 32 connections)",
                format!("{:.0} tx/s", s.db_limit_tps),
            ),
            (
                "Broker limit (persistent, confirms, manual acks)",
                format!("{:.0} msg/s", s.broker_limit_msgs),
            ),
            (
                "Seed design (sleep in the handler, prefetch 16)",
                format!("{:.2} orders/s", s.seed_design_orders),
            ),
            ("API `POST /api/orders`", format!("{:.0} req/s", s.api_rps)),
            (
                "API latency p50 / p95 / p99",
                format!(
                    "{:.1} / {:.1} / {:.1} ms",
                    s.api_p50_ms, s.api_p95_ms, s.api_p99_ms
                ),
            ),
            ("API / DB limit", format!("{:.2}", s.api_to_db_limit)),
            (
                "End to end (delay 0, success 1)",
                format!("{:.0} orders/s", s.e2e_orders),
            ),
            (
                "End to end latency p50 / p99",
                format!("{:.0} / {:.0} ms", s.e2e_p50_ms, s.e2e_p99_ms),
            ),
            (
                "End to end / lower limit",
                format!("{:.2}", s.e2e_to_lower_limit),
            ),
            (
                "End to end per order: write transactions / all commits / statements",
                format!(
                    "{:.2} / {:.2} / {:.1}",
                    s.e2e_write_transactions_per_order,
                    s.e2e_commits_per_order,
                    s.e2e_statements_per_order
                ),
            ),
            (
                "Burst: all decided after",
                format!("{:.1} s", s.burst_decided_seconds),
            ),
            (
                "Burst / seed design",
                format!("{:.0} x", s.burst_to_seed_design),
            ),
            (
                "Sweep: time per order, largest / smallest",
                format!("{:.2} (1 = linear)", s.sweep_linearity),
            ),
            ("API peak RSS", format!("{:.1} MiB", s.api_peak_rss_mib)),
            (
                "Runner peak RSS",
                format!("{:.1} MiB", s.runner_peak_rss_mib),
            ),
        ];
        for (k, v) in figures {
            let _ = writeln!(m, "| {k} | {v} |");
        }
        let _ = writeln!(m, "\n## Every run\n");
        let _ = writeln!(
            m,
            "| scenario | run | count | seconds | per second | p50 ms | p95 ms | p99 ms | peak RSS MiB (api / runner) |"
        );
        let _ = writeln!(m, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        let rss = |a: Option<f64>| a.map_or("-".to_owned(), |v| format!("{v:.1}"));
        let mut line = |name: &str,
                        run: usize,
                        count: usize,
                        secs: f64,
                        rate: f64,
                        lat: Option<(f64, f64, f64)>,
                        mem: String| {
            let (p50, p95, p99) = lat.map_or(("-".into(), "-".into(), "-".into()), |(a, b, c)| {
                (format!("{a:.1}"), format!("{b:.1}"), format!("{c:.1}"))
            });
            let _ = writeln!(
                m,
                "| {name} | {run} | {count} | {secs:.2} | {rate:.1} | {p50} | {p95} | {p99} | {mem} |"
            );
        };
        for (i, t) in self.db_limit.iter().enumerate() {
            let lat = t.latency.as_ref().map(|l| (l.p50_ms, l.p95_ms, l.p99_ms));
            line(
                "DB limit",
                i + 1,
                t.count,
                t.seconds,
                t.per_second,
                lat,
                "-".into(),
            );
        }
        for (i, t) in self.broker_limit.iter().enumerate() {
            line(
                "broker limit",
                i + 1,
                t.count,
                t.seconds,
                t.per_second,
                None,
                "-".into(),
            );
        }
        for (i, t) in self.broker_publish_only.iter().enumerate() {
            line(
                "broker: publish side",
                i + 1,
                t.count,
                t.seconds,
                t.per_second,
                None,
                "-".into(),
            );
        }
        if let Some(t) = &self.seed_design {
            line(
                "seed design",
                1,
                t.count,
                t.seconds,
                t.per_second,
                None,
                "-".into(),
            );
        }
        for (i, a) in self.api.iter().enumerate() {
            let l = &a.latency;
            line(
                "API",
                i + 1,
                a.requests,
                a.seconds,
                a.per_second,
                Some((l.p50_ms, l.p95_ms, l.p99_ms)),
                format!("{} / -", rss(a.memory.api_mib)),
            );
        }
        for (i, e) in self.end_to_end.iter().enumerate() {
            let l = &e.latency;
            line(
                "end to end",
                i + 1,
                e.orders,
                e.seconds,
                e.per_second,
                Some((l.p50_ms, l.p95_ms, l.p99_ms)),
                format!("{} / {}", rss(e.memory.api_mib), rss(e.memory.runner_mib)),
            );
        }
        if let Some(b) = &self.burst {
            line(
                "burst (5 s delay)",
                1,
                b.orders,
                b.decided_seconds,
                b.per_second,
                None,
                "-".into(),
            );
        }
        for w in &self.sweeps {
            line(
                &format!("sweep {}", w.orders),
                1,
                w.orders,
                w.seconds,
                w.per_second,
                None,
                "-".into(),
            );
        }
        if let Some(b) = &self.burst {
            let _ = writeln!(
                m,
                "\nBurst: {} orders at `payment.delay_ms` = {}; the API accepted them in {:.1} s; \
                 {} payments approved, {} declined. The clock runs from the first order's `created_at` \
                 to the last `PaymentDecided` journal row's `occurred_at`.",
                b.orders, b.payment_delay_ms, b.injection_seconds, b.approved, b.declined
            );
        }
        for e in &self.end_to_end {
            let _ = writeln!(
                m,
                "\nEnd to end: {} orders injected in {:.1} s (the clock runs from the first order's \
                 `created_at` to the last `OrderCompleted` notification's `created_at`); per order \
                 {:.2} write transactions (`txid_current()` delta), {:.2} commits \
                 (`pg_stat_database.xact_commit`, reads included), {:.1} statements (the hosts' \
                 `db_statements_total`).",
                e.orders,
                e.injection_seconds,
                e.cost.write_transactions,
                e.cost.commits,
                e.cost.statements
            );
        }
        self.kafka_markdown(&mut m);
        if !self.notes.is_empty() {
            let _ = writeln!(m, "\n## Notes\n");
            for n in &self.notes {
                let _ = writeln!(m, "- {n}");
            }
        }
        if !self.db_limit_statements.is_empty() {
            let _ = writeln!(
                m,
                "\n## The DB limit's transaction\n\nBEGIN, then as captured from `place_items`, then COMMIT:\n\n```sql"
            );
            for sql in &self.db_limit_statements {
                let _ = writeln!(m, "{sql};");
            }
            let _ = writeln!(m, "```");
        }
        let _ = writeln!(m, "\n![latency percentiles](latency.svg)");
        m
    }
}

impl Figures {
    /// The Kafka section: its runs, or why it was skipped.
    fn kafka_markdown(&self, m: &mut String) {
        let measured = !self.kafka_broker_limit.is_empty() || !self.kafka_end_to_end.is_empty();
        if !measured && self.kafka_skipped.is_none() {
            return;
        }
        let _ = writeln!(m, "\n## Kafka (`transport.kind = kafka`)\n");
        if let Some(why) = &self.kafka_skipped {
            let _ = writeln!(m, "{why}");
            return;
        }
        let _ = writeln!(
            m,
            "| scenario | run | count | seconds | per second | p50 ms | p95 ms | p99 ms |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for (name, runs) in [
            ("Kafka broker limit", &self.kafka_broker_limit),
            (
                "Kafka broker: publish side",
                &self.kafka_broker_publish_only,
            ),
        ] {
            for (i, t) in runs.iter().enumerate() {
                let _ = writeln!(
                    m,
                    "| {name} | {} | {} | {:.2} | {:.1} | - | - | - |",
                    i + 1,
                    t.count,
                    t.seconds,
                    t.per_second
                );
            }
        }
        for (i, e) in self.kafka_end_to_end.iter().enumerate() {
            let l = &e.latency;
            let _ = writeln!(
                m,
                "| Kafka end to end | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} |",
                i + 1,
                e.orders,
                e.seconds,
                e.per_second,
                l.p50_ms,
                l.p95_ms,
                l.p99_ms
            );
        }
    }
}

/// A latency-percentile chart: one line per series of ascending millisecond
/// samples, percentile on x (0-100), milliseconds on y.
pub fn latency_svg(series: &[(&str, Vec<f64>)]) -> String {
    let (w, h, left, bottom, top, right) = (720.0, 420.0, 60.0, 40.0, 30.0, 170.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let y_max = series
        .iter()
        .filter_map(|(_, v)| v.last().copied())
        .fold(1.0f64, f64::max);
    let y_max = nice_ceiling(y_max);
    let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="18" font-size="14">Latency by percentile (ms)</text>"#
    );
    for i in 0..=5 {
        let v = y_max * f64::from(i) / 5.0;
        let y = top + plot_h - plot_h * f64::from(i) / 5.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
            left + plot_w,
            left - 6.0,
            y + 4.0
        );
    }
    for p in [0, 25, 50, 75, 90, 99, 100] {
        let x = left + plot_w * f64::from(p) / 100.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">p{p}</text>"##,
            top + plot_h,
            top + plot_h + 16.0
        );
    }
    for (i, (name, values)) in series.iter().enumerate() {
        if values.is_empty() {
            continue;
        }
        let colour = colours[i % colours.len()];
        let n = values.len();
        let step = (n / 400).max(1);
        let points: Vec<String> = (0..n)
            .step_by(step)
            .chain(std::iter::once(n - 1))
            .map(|k| {
                let x = left + plot_w * (k + 1) as f64 / n as f64;
                let y = top + plot_h - plot_h * (values[k] / y_max).min(1.0);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let ly = top + 16.0 * i as f64 + 10.0;
        let lx = left + plot_w + 12.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The next of 1, 2, 5 x 10^k at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    let mut base = 1.0;
    while base * 10.0 < v {
        base *= 10.0;
    }
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * base)
        .find(|c| *c >= v)
        .unwrap_or(base * 10.0)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_axes_end_at_round_numbers() {
        assert_eq!(nice_ceiling(0.5), 1.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(42.0), 50.0);
        assert_eq!(nice_ceiling(120.0), 200.0);
    }

    #[test]
    fn chart_is_an_svg_with_one_line_per_series() {
        let svg = latency_svg(&[("a <b>", vec![1.0, 2.0, 3.0]), ("c", vec![5.0])]);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &lt;b&gt;"));
    }

    #[test]
    fn targets_without_figures_are_not_measured() {
        let mut f = Figures::default();
        f.summarise();
        assert!(f.summary.targets.iter().all(|t| t.met.is_none()));
        assert!(f.markdown().contains("not measured"));
    }
}
