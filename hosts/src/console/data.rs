//! What the console shows, read from the database, the broker and the
//! health checks, as plain serializable views: the pages render them on
//! the server and the JSON endpoints serve them to the pages' refresh.
//! Times are formatted here once, so both renderings show the same text.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, DurationRound, Utc};
use saga::inspect::{self, InstanceFilter};
use saga::operator::{ActionFilter, OperatorAction};
use serde::Serialize;

use super::Console;
use crate::ops::{Check, Monitor};

/// Rows per page of a list.
pub const PAGE_SIZE: u64 = 25;
/// Journal rows shown on an instance page.
const JOURNAL_LIMIT: u64 = 500;
/// Outbox events shown on an instance page.
const OUTBOX_LIMIT: u64 = 100;
/// Parked instances listed on the overview.
const PARKED_LIMIT: u64 = 20;
/// Minutes in the decided-per-minute chart.
pub const CHART_MINUTES: usize = 60;

pub fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string()
}

fn json_text(value: &serde_json::Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

#[derive(Clone, Debug, Serialize)]
pub struct StateCount {
    pub state: String,
    pub count: u64,
    pub is_final: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct SagaView {
    pub saga_type: String,
    pub states: Vec<StateCount>,
    pub total: u64,
    pub parked: u64,
    /// Instances that reached a final state in the last hour.
    pub decided_last_hour: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ParkedView {
    pub saga_type: String,
    pub correlation_id: String,
    pub state: String,
    pub attempts: i32,
    pub last_error: String,
    pub parked_at: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct QueueView {
    pub consumer: String,
    pub queue: String,
    pub error_queue: String,
    pub depth: Option<u64>,
    pub error_depth: Option<u64>,
    /// Why the depths could not be read.
    pub problem: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct OutboxView {
    pub unsent: u64,
    /// Age of the oldest unsent event (`None`: nothing unsent).
    pub oldest_unsent_age_seconds: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HealthView {
    /// Whose checks: `api`, `embedded`, `runner`, `scheduler`.
    pub source: String,
    /// `ok`, `unavailable` or `unreachable`.
    pub status: String,
    pub checks: Vec<Check>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Overview {
    pub at: String,
    pub sagas: Vec<SagaView>,
    pub parked: Vec<ParkedView>,
    pub queues: Vec<QueueView>,
    pub outbox: OutboxView,
    pub health: Vec<HealthView>,
}

pub async fn overview(
    console: &Console,
    monitor: &Monitor,
    now: DateTime<Utc>,
) -> anyhow::Result<Overview> {
    let db = monitor.db();
    let known: Vec<saga::metrics::KnownSaga> = console
        .sagas
        .iter()
        .map(|s| saga::metrics::KnownSaga {
            saga_type: s.saga_type(),
            states: s.states(),
        })
        .collect();
    let backlog = saga::metrics::backlog(db, now, &known).await?;
    let mut sagas: BTreeMap<String, SagaView> = BTreeMap::new();
    for (saga_type, state, count) in &backlog.instances {
        let finals = console.final_states(saga_type);
        let view = sagas.entry(saga_type.clone()).or_insert_with(|| SagaView {
            saga_type: saga_type.clone(),
            states: Vec::new(),
            total: 0,
            parked: 0,
            decided_last_hour: 0,
        });
        view.states.push(StateCount {
            state: state.clone(),
            count: *count,
            is_final: finals.contains(&state.as_str()),
        });
        view.total += count;
    }
    for (saga_type, parked) in &backlog.parked {
        if let Some(view) = sagas.get_mut(saga_type) {
            view.parked = *parked;
        }
    }
    // Registered sagas list their states in lifecycle order.
    for view in sagas.values_mut() {
        if let Ok(admin) = console.sagas.get(&view.saga_type) {
            let order = admin.states();
            view.states.sort_by_key(|s| {
                order
                    .iter()
                    .position(|o| *o == s.state)
                    .unwrap_or(usize::MAX)
            });
        }
        view.decided_last_hour = decided(console, db, &view.saga_type, now)
            .await?
            .iter()
            .sum();
    }
    let parked = saga::engine::parked(db, None, PARKED_LIMIT)
        .await?
        .into_iter()
        .map(|p| ParkedView {
            saga_type: p.saga_type,
            correlation_id: p.correlation_id,
            state: p.state,
            attempts: p.attempts,
            last_error: p.last_error.unwrap_or_default(),
            parked_at: time(p.parked_at),
        })
        .collect();
    let mut queues = Vec::new();
    for (consumer, spec) in &console.queues {
        let (depth, error_depth) =
            tokio::join!(console.broker.depth(spec), console.broker.error_depth(spec));
        let problem = match (&depth, &error_depth) {
            (Err(e), _) | (_, Err(e)) => Some(format!("{e:#}")),
            _ => None,
        };
        queues.push(QueueView {
            consumer: consumer.clone(),
            queue: spec.name.clone(),
            error_queue: spec.error_queue(),
            depth: depth.ok(),
            error_depth: error_depth.ok(),
            problem,
        });
    }
    let lag = backlog.outbox_lag();
    let outbox = OutboxView {
        unsent: backlog.outbox_unsent,
        oldest_unsent_age_seconds: backlog
            .outbox_oldest_unsent
            .map(|_| lag.num_milliseconds() as f64 / 1000.0),
    };
    let mut health = vec![HealthView {
        source: console.host.clone(),
        status: String::new(),
        checks: Vec::new(),
    }];
    let report = monitor.ready().await;
    health[0].status = report.status.clone();
    health[0].checks = report.checks;
    health.extend(console.peer_health().await);
    Ok(Overview {
        at: time(now),
        sagas: sagas.into_values().collect(),
        parked,
        queues,
        outbox,
        health,
    })
}

/// Instances of `saga_type` decided in each of the last [`CHART_MINUTES`]
/// minutes, oldest first (the last one is the current minute).
pub async fn decided(
    console: &Console,
    db: &sea_orm::DatabaseConnection,
    saga_type: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<u64>> {
    let this_minute = now.duration_trunc(Duration::minutes(1))?;
    let first = this_minute - Duration::minutes(CHART_MINUTES as i64 - 1);
    let finals = console.final_states(saga_type);
    let rows = inspect::decided_per_minute(db, saga_type, &finals, first).await?;
    let mut per_minute = vec![0; CHART_MINUTES];
    for (minute, n) in rows {
        let index = (minute - first).num_minutes();
        if let Some(slot) = usize::try_from(index)
            .ok()
            .and_then(|i| per_minute.get_mut(i))
        {
            *slot += n;
        }
    }
    Ok(per_minute)
}

/// The instance list's query string.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct ListQuery {
    pub saga_type: String,
    pub state: String,
    /// `true`, `false` or empty (both).
    pub parked: String,
    pub correlation_id: String,
    /// 1-based.
    pub page: u64,
}

impl ListQuery {
    pub fn filter(&self) -> InstanceFilter {
        let some = |s: &str| {
            let s = s.trim();
            (!s.is_empty()).then(|| s.to_owned())
        };
        InstanceFilter {
            saga_type: some(&self.saga_type),
            state: some(&self.state),
            parked: match self.parked.as_str() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            },
            correlation_id: some(&self.correlation_id),
        }
    }

    pub fn page(&self) -> u64 {
        self.page.clamp(1, 1_000_000)
    }

    /// The query string for `page` with the same filters.
    pub fn query_string(&self, page: u64) -> String {
        use super::html::url_part;
        format!(
            "saga_type={}&state={}&parked={}&correlation_id={}&page={page}",
            url_part(&self.saga_type),
            url_part(&self.state),
            url_part(&self.parked),
            url_part(&self.correlation_id)
        )
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct InstanceRow {
    pub saga_type: String,
    pub correlation_id: String,
    pub state: String,
    pub parked: bool,
    pub attempts: i32,
    pub last_error: String,
    pub updated_at: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct InstanceList {
    pub total: u64,
    pub page: u64,
    pub pages: u64,
    pub page_size: u64,
    pub items: Vec<InstanceRow>,
}

pub async fn instances(
    db: &sea_orm::DatabaseConnection,
    query: &ListQuery,
) -> anyhow::Result<InstanceList> {
    let page = query.page();
    let (rows, total) =
        inspect::instances(db, &query.filter(), PAGE_SIZE, (page - 1) * PAGE_SIZE).await?;
    Ok(InstanceList {
        total,
        page,
        pages: total.div_ceil(PAGE_SIZE).max(1),
        page_size: PAGE_SIZE,
        items: rows
            .into_iter()
            .map(|r| InstanceRow {
                saga_type: r.saga_type,
                correlation_id: r.correlation_id,
                state: r.state,
                parked: r.parked,
                attempts: r.attempts,
                last_error: r.last_error.unwrap_or_default(),
                updated_at: time(r.updated_at),
            })
            .collect(),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct JournalRow {
    pub id: i64,
    pub trigger: String,
    pub from: String,
    pub to: String,
    pub outcome: String,
    pub attempt: i32,
    pub message_id: String,
    /// The input as JSON text (e.g. the payment draw).
    pub input: String,
    pub detail: String,
    pub error: String,
    pub at: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TimerRow {
    pub kind: String,
    pub due_at: String,
    pub payload: String,
    pub created_at: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct OutboxRow {
    pub message_id: String,
    pub message_type: String,
    pub routing_key: String,
    pub created_at: String,
    /// Empty while unsent.
    pub sent_at: String,
    pub publish_attempts: i32,
    pub last_error: String,
    /// The envelope as JSON text.
    pub body: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ActionRow {
    pub id: i64,
    pub action: String,
    pub saga_type: String,
    pub correlation_id: String,
    pub queue: String,
    pub operator: String,
    /// The detail as JSON text.
    pub detail: String,
    pub at: String,
}

impl From<OperatorAction> for ActionRow {
    fn from(a: OperatorAction) -> Self {
        Self {
            id: a.id,
            action: a.action,
            saga_type: a.saga_type.unwrap_or_default(),
            correlation_id: a.correlation_id.unwrap_or_default(),
            queue: a.queue.unwrap_or_default(),
            operator: a.operator,
            detail: a.detail.as_ref().map(json_text).unwrap_or_default(),
            at: time(a.at),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct InstanceDetail {
    pub saga_type: String,
    pub correlation_id: String,
    pub state: String,
    pub is_final: bool,
    pub parked: bool,
    pub version: i32,
    pub attempts: i32,
    pub last_error: String,
    pub state_entered_at: String,
    pub created_at: String,
    pub updated_at: String,
    /// The instance data, pretty JSON text.
    pub data: String,
    /// Whether this host runs the saga type (diagram and resume).
    pub registered: bool,
    pub journal: Vec<JournalRow>,
    pub timers: Vec<TimerRow>,
    pub outbox: Vec<OutboxRow>,
    pub actions: Vec<ActionRow>,
}

pub async fn instance(
    console: &Console,
    db: &sea_orm::DatabaseConnection,
    saga_type: &str,
    correlation_id: &str,
) -> anyhow::Result<Option<InstanceDetail>> {
    let Some(row) = inspect::instance(db, saga_type, correlation_id).await? else {
        return Ok(None);
    };
    let journal = inspect::journal(db, row.id, JOURNAL_LIMIT).await?;
    let timers = inspect::pending_timers(db, row.id).await?;
    let outbox = inspect::outbox_events(db, correlation_id, OUTBOX_LIMIT).await?;
    let (actions, _) = saga::operator::list(
        db,
        &ActionFilter {
            kind: None,
            saga_type: Some(saga_type.to_owned()),
            correlation_id: Some(correlation_id.to_owned()),
        },
        50,
        0,
    )
    .await?;
    Ok(Some(InstanceDetail {
        is_final: console
            .final_states(saga_type)
            .contains(&row.state.as_str()),
        registered: console.sagas.get(saga_type).is_ok(),
        saga_type: row.saga_type,
        correlation_id: row.correlation_id,
        state: row.state,
        parked: row.faulted,
        version: row.version,
        attempts: row.attempts,
        last_error: row.last_error.unwrap_or_default(),
        state_entered_at: time(row.state_entered_at),
        created_at: time(row.created_at),
        updated_at: time(row.updated_at),
        data: pretty(&row.data),
        journal: journal
            .into_iter()
            .map(|j| JournalRow {
                id: j.id,
                trigger: j.trigger,
                from: j.from_state.unwrap_or_default(),
                to: j.to_state,
                outcome: j.outcome,
                attempt: j.attempt,
                message_id: j.message_id.map(|m| m.to_string()).unwrap_or_default(),
                input: j.input.as_ref().map(json_text).unwrap_or_default(),
                detail: j.detail.unwrap_or_default(),
                error: j.error.unwrap_or_default(),
                at: time(j.occurred_at),
            })
            .collect(),
        timers: timers
            .into_iter()
            .map(|t| TimerRow {
                kind: t.timer_kind,
                due_at: time(t.due_at),
                payload: t.payload.as_ref().map(json_text).unwrap_or_default(),
                created_at: time(t.created_at),
            })
            .collect(),
        outbox: outbox
            .into_iter()
            .map(|o| OutboxRow {
                message_id: o.message_id.to_string(),
                message_type: o.message_type,
                routing_key: o.routing_key,
                created_at: time(o.created_at),
                sent_at: o.sent_at.map(time).unwrap_or_default(),
                publish_attempts: o.publish_attempts,
                last_error: o.last_error.unwrap_or_default(),
                body: json_text(&o.body),
            })
            .collect(),
        actions: actions.into_iter().map(ActionRow::from).collect(),
    }))
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct ActionsQuery {
    pub page: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ActionList {
    pub total: u64,
    pub page: u64,
    pub pages: u64,
    pub items: Vec<ActionRow>,
}

pub async fn actions(
    db: &sea_orm::DatabaseConnection,
    query: &ActionsQuery,
) -> anyhow::Result<ActionList> {
    let page = query.page.clamp(1, 1_000_000);
    let (rows, total) = saga::operator::list(
        db,
        &ActionFilter::default(),
        PAGE_SIZE,
        (page - 1) * PAGE_SIZE,
    )
    .await?;
    Ok(ActionList {
        total,
        page,
        pages: total.div_ceil(PAGE_SIZE).max(1),
        items: rows.into_iter().map(ActionRow::from).collect(),
    })
}
