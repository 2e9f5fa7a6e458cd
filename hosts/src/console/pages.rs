//! The console's pages, rendered on the server from the views of
//! [`super::data`] with [`Markup`] (every value escaped). Lists are tables
//! whose columns are declared in a `data-columns` attribute: the page's
//! script refreshes them from the JSON endpoints with the same columns and
//! the same cell rules ([`cell`]), writing text only.

use saga::describe::StateGraph;
use serde::Serialize;

use super::data::{self, ActionRow, InstanceDetail, InstanceList, ListQuery, Overview};
use super::html::{Markup, url_part};
use super::session::{CSRF_FIELD, Session};
use super::svg;
use crate::html;

/// A table column: JSON key, header, and what the cell links to.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Column(pub &'static str, pub &'static str, pub Link);

/// Where a cell links to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    None,
    /// The instance page of the row's `saga_type` and `correlation_id`.
    Instance,
    /// The action page of the row's `id`.
    Action,
}

pub const INSTANCE_COLUMNS: &[Column] = &[
    Column("saga_type", "Saga", Link::None),
    Column("correlation_id", "Correlation id", Link::Instance),
    Column("state", "State", Link::None),
    Column("parked", "Parked", Link::None),
    Column("attempts", "Attempts", Link::None),
    Column("last_error", "Last error", Link::None),
    Column("updated_at", "Updated", Link::None),
];

pub const PARKED_COLUMNS: &[Column] = &[
    Column("saga_type", "Saga", Link::None),
    Column("correlation_id", "Correlation id", Link::Instance),
    Column("state", "State", Link::None),
    Column("attempts", "Attempts", Link::None),
    Column("last_error", "Last error", Link::None),
    Column("parked_at", "Parked at", Link::None),
];

pub const JOURNAL_COLUMNS: &[Column] = &[
    Column("at", "Time", Link::None),
    Column("trigger", "Trigger", Link::None),
    Column("from", "From", Link::None),
    Column("to", "To", Link::None),
    Column("outcome", "Outcome", Link::None),
    Column("attempt", "Attempt", Link::None),
    Column("input", "Input", Link::None),
    Column("error", "Error", Link::None),
    Column("detail", "Detail", Link::None),
    Column("message_id", "Message id", Link::None),
];

pub const TIMER_COLUMNS: &[Column] = &[
    Column("kind", "Kind", Link::None),
    Column("due_at", "Due", Link::None),
    Column("payload", "Payload", Link::None),
    Column("created_at", "Scheduled", Link::None),
];

pub const OUTBOX_COLUMNS: &[Column] = &[
    Column("created_at", "Written", Link::None),
    Column("message_type", "Type", Link::None),
    Column("routing_key", "Routing key", Link::None),
    Column("sent_at", "Sent", Link::None),
    Column("publish_attempts", "Attempts", Link::None),
    Column("last_error", "Last error", Link::None),
    Column("body", "Envelope", Link::None),
];

pub const ACTION_COLUMNS: &[Column] = &[
    Column("id", "#", Link::Action),
    Column("at", "Time", Link::None),
    Column("action", "Action", Link::None),
    Column("operator", "Operator", Link::None),
    Column("saga_type", "Saga", Link::None),
    Column("correlation_id", "Correlation id", Link::Instance),
    Column("queue", "Queue", Link::None),
    Column("detail", "Detail", Link::None),
];

/// A cell's text: strings as they are, numbers, `parked` for a true
/// `parked`, yes/no for other booleans, nothing for null.
pub fn cell_text(key: &str, value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Bool(b) if key == "parked" => if *b { "parked" } else { "" }.to_owned(),
        serde_json::Value::Bool(b) => if *b { "yes" } else { "no" }.to_owned(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A row's class suffix: the raw value (`true`, `false`, the text).
pub fn class_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn field<'a>(row: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    row.get(key).unwrap_or(&serde_json::Value::Null)
}

/// One cell (what the script does in `cell()`).
fn cell(out: &mut Markup, column: &Column, row: &serde_json::Value) {
    let Column(key, _, link) = *column;
    let text = cell_text(key, field(row, key));
    html!(*out, "<td class=\"c-", { key }, "\">");
    let saga_type = cell_text("saga_type", field(row, "saga_type"));
    match link {
        Link::Instance if !text.is_empty() && !saga_type.is_empty() => html!(
            *out,
            "<a href=\"/console/instances/",
            { url_part(&saga_type) },
            "/",
            { url_part(&text) },
            "\">",
            { text },
            "</a>"
        ),
        Link::Action if !text.is_empty() => html!(
            *out,
            "<a href=\"/console/actions/",
            { url_part(&text) },
            "\">",
            { text },
            "</a>"
        ),
        _ => html!(*out, { text }),
    }
    out.raw("</td>");
}

/// A table refreshed by the script from `source` (a JSON endpoint; the
/// rows are its `key`), with `row_class` naming the field whose value
/// classes each row (`<field>-<value>`).
fn table<T: Serialize>(
    id: &str,
    columns: &[Column],
    rows: &[T],
    row_class: Option<&str>,
    empty: &str,
) -> Markup {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .filter_map(|r| serde_json::to_value(r).ok())
        .collect();
    let columns_json = serde_json::to_string(columns).unwrap_or_default();
    let mut out = Markup::new();
    html!(
        out,
        "<div class=\"table-wrap\"><table class=\"list\" id=\"",
        { id },
        "\" data-columns=\"",
        { columns_json },
        "\" data-row-class=\"",
        { row_class.unwrap_or("") },
        "\" data-empty=\"",
        { empty },
        "\"><thead><tr>"
    );
    for Column(key, header, _) in columns {
        html!(out, "<th class=\"c-", { key }, "\">", { header }, "</th>");
    }
    out.raw("</tr></thead><tbody>");
    if rows.is_empty() {
        html!(
            out,
            "<tr class=\"empty\"><td colspan=\"",
            { columns.len() },
            "\">",
            { empty },
            "</td></tr>"
        );
    }
    for row in &rows {
        out.raw("<tr");
        if let Some(key) = row_class {
            html!(
                out,
                " class=\"",
                { key },
                "-",
                { class_text(field(row, key)) },
                "\""
            );
        }
        out.raw(">");
        for column in columns {
            cell(&mut out, column, row);
        }
        out.raw("</tr>");
    }
    out.raw("</tbody></table></div>");
    out
}

/// The hidden CSRF field of a form.
fn csrf(session: &Session) -> Markup {
    let mut m = Markup::new();
    html!(
        m,
        "<input type=\"hidden\" name=\"",
        { CSRF_FIELD },
        "\" value=\"",
        { session.csrf_token },
        "\">"
    );
    m
}

/// Everything around a page's content.
pub struct Chrome<'a> {
    pub title: &'a str,
    /// `data-page`: which refresh the script runs.
    pub page: &'static str,
    pub session: Option<&'a Session>,
    /// More `data-*` attributes for the script (name without `data-`).
    pub data: Vec<(&'static str, String)>,
}

pub fn layout(chrome: Chrome<'_>, content: &Markup) -> String {
    let mut attrs = Markup::new();
    for (name, value) in &chrome.data {
        html!(attrs, " data-", { name }, "=\"", { value }, "\"");
    }
    let mut header = Markup::new();
    if let Some(session) = chrome.session {
        let nav = if session.is_admin() {
            "<nav><a href=\"/console\">Overview</a><a href=\"/console/instances\">Instances</a>\
             <a href=\"/console/instances?parked=true\">Parked</a>\
             <a href=\"/console/actions\">Operator actions</a></nav>"
        } else {
            "<nav></nav>"
        };
        header.raw(nav);
        html!(
            header,
            "<div class=\"who\"><span id=\"who\">",
            { session.email },
            "</span><form method=\"post\" action=\"/console/logout\">",
            [csrf(session)],
            "<button type=\"submit\" id=\"logout\">Log out</button></form></div>"
        );
    }
    let mut page = Markup::new();
    html!(
        page,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>",
        { chrome.title },
        " \u{b7} order-saga console</title>\
         <link rel=\"icon\" href=\"/console/assets/icon.svg\">\
         <link rel=\"stylesheet\" href=\"/console/assets/console.css\">\
         <script src=\"/console/assets/console.js\" defer></script></head><body data-page=\"",
        { chrome.page },
        "\"",
        [attrs],
        "><header><a class=\"brand\" href=\"/console\">order-saga console</a>",
        [header],
        "</header><main><h1>",
        { chrome.title },
        "</h1>",
        [content],
        "</main><footer><span id=\"refresh\"></span></footer></body></html>"
    );
    page.into_string()
}

pub fn login(error: Option<&str>, email: &str) -> String {
    let mut content = Markup::new();
    if let Some(error) = error {
        html!(
            content,
            "<p class=\"error\" id=\"login-error\">",
            { error },
            "</p>"
        );
    }
    html!(
        content,
        "<form class=\"login\" method=\"post\" action=\"/console/login\">\
         <label>E-mail <input type=\"email\" name=\"email\" autocomplete=\"username\" required value=\"",
        { email },
        "\"></label><label>Password <input type=\"password\" name=\"password\" \
         autocomplete=\"current-password\" required></label>\
         <button type=\"submit\">Log in</button></form>\
         <p class=\"hint\">Administrators only: the same accounts as the API.</p>"
    );
    layout(
        Chrome {
            title: "Log in",
            page: "login",
            session: None,
            data: Vec::new(),
        },
        &content,
    )
}

/// A page with one message (403, 404, 409, errors).
pub fn message(title: &str, text: &str, session: Option<&Session>) -> String {
    let mut content = Markup::new();
    html!(
        content,
        "<p class=\"message\" id=\"message\">",
        { text },
        "</p>"
    );
    if session.is_some_and(Session::is_admin) {
        content.raw("<p><a href=\"/console\">Back to the overview</a></p>");
    }
    layout(
        Chrome {
            title,
            page: "message",
            session,
            data: Vec::new(),
        },
        &content,
    )
}

fn state_table(view: &data::SagaView) -> Markup {
    let mut rows = Markup::new();
    for s in &view.states {
        let state_link = format!(
            "/console/instances?saga_type={}&state={}",
            url_part(&view.saga_type),
            url_part(&s.state)
        );
        html!(
            rows,
            "<tr data-state=\"",
            { s.state },
            "\"",
            [if s.is_final {
                final_class()
            } else {
                Markup::new()
            }],
            "><td><a href=\"",
            { state_link },
            "\">",
            { s.state },
            "</a></td><td class=\"count\">",
            { s.count },
            "</td></tr>"
        );
    }
    rows
}

fn final_class() -> Markup {
    let mut m = Markup::new();
    m.raw(" class=\"final\"");
    m
}

pub fn overview(overview: &Overview, session: &Session) -> String {
    let mut content = Markup::new();
    content.raw("<section id=\"sagas\" class=\"cards\">");
    for view in &overview.sagas {
        let chart = format!("/console/charts/decided/{}", url_part(&view.saga_type));
        let parked_link = format!(
            "/console/instances?saga_type={}&parked=true",
            url_part(&view.saga_type)
        );
        html!(
            content,
            "<article class=\"card saga\" data-saga-type=\"",
            { view.saga_type },
            "\"><h2>",
            { view.saga_type },
            "</h2><table class=\"counts\"><thead><tr><th>State</th><th>Instances</th></tr></thead><tbody>",
            [state_table(view)],
            "</tbody><tfoot><tr><td>all</td><td class=\"total\">",
            { view.total },
            "</td></tr><tr class=\"parked-row\"><td><a href=\"",
            { parked_link },
            "\">parked</a></td><td class=\"parked\">",
            { view.parked },
            "</td></tr></tfoot></table><img class=\"chart\" src=\"",
            { chart },
            "\" data-src=\"",
            { chart },
            "\" alt=\"instances decided per minute\" width=\"640\" height=\"180\"></article>"
        );
    }
    content.raw("</section>");

    content.raw("<section class=\"cards\"><article class=\"card\" id=\"queues\"><h2>Error queues</h2>\
         <table class=\"counts\"><thead><tr><th>Queue</th><th>Ready</th><th>Error queue</th><th>Dead letters</th><th></th></tr></thead><tbody>");
    for q in &overview.queues {
        let action = format!("/console/queues/{}/redrive", url_part(&q.consumer));
        html!(
            content,
            "<tr data-consumer=\"",
            { q.consumer },
            "\"><td>",
            { q.queue },
            "</td><td class=\"depth\">",
            { q.depth.map(|d| d.to_string()).unwrap_or_else(|| "?".into()) },
            "</td><td>",
            { q.error_queue },
            "</td><td class=\"error-depth\">",
            {
                q.error_depth
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| "?".into())
            },
            "</td><td><form method=\"post\" action=\"",
            { action },
            "\">",
            [csrf(session)],
            "<button type=\"submit\" class=\"redrive\">Re-drive</button></form></td></tr><tr class=\"problem\" data-consumer=\"",
            { q.consumer },
            "\"><td colspan=\"5\" class=\"error\">",
            { q.problem.clone().unwrap_or_default() },
            "</td></tr>"
        );
    }
    content.raw("</tbody></table></article>");
    html!(
        content,
        "<article class=\"card\" id=\"outbox\"><h2>Outbox</h2><p><span class=\"unsent\">",
        { overview.outbox.unsent },
        "</span> unsent; oldest <span class=\"lag\">",
        { lag_text(overview.outbox.oldest_unsent_age_seconds) },
        "</span></p></article></section>"
    );

    content.raw("<h2>Health</h2><section id=\"health\" class=\"cards\">");
    for h in &overview.health {
        html!(
            content,
            "<article class=\"card health status-",
            { h.status },
            "\"><h3>",
            { h.source },
            ": ",
            { h.status },
            "</h3>",
            [table("", CHECK_COLUMNS, &h.checks, Some("ok"), "no checks")],
            "</article>"
        );
    }
    content.raw("</section><h2>Parked instances</h2>");
    content.markup(&table(
        "parked",
        PARKED_COLUMNS,
        &overview.parked,
        None,
        "No parked instances.",
    ));
    html!(
        content,
        "<p class=\"at\">As of <span id=\"at\">",
        { overview.at },
        "</span></p>"
    );
    layout(
        Chrome {
            title: "Overview",
            page: "overview",
            session: Some(session),
            data: Vec::new(),
        },
        &content,
    )
}

pub const CHECK_COLUMNS: &[Column] = &[
    Column("name", "Check", Link::None),
    Column("ok", "OK", Link::None),
    Column("detail", "Detail", Link::None),
];

pub fn lag_text(seconds: Option<f64>) -> String {
    match seconds {
        None => "none".to_owned(),
        Some(s) => format!("{s:.1} s"),
    }
}

pub fn instances(
    list: &InstanceList,
    query: &ListQuery,
    types: &[(&'static str, Vec<&'static str>)],
    session: &Session,
) -> String {
    let mut content = Markup::new();
    content.raw("<form class=\"filters\" method=\"get\" action=\"/console/instances\"><label>Saga <select name=\"saga_type\"><option value=\"\">any</option>");
    for (saga_type, _) in types {
        option(&mut content, saga_type, &query.saga_type);
    }
    content.raw(
        "</select></label><label>State <select name=\"state\"><option value=\"\">any</option>",
    );
    let mut states: Vec<&str> = types.iter().flat_map(|(_, s)| s.iter().copied()).collect();
    states.dedup();
    for state in states {
        option(&mut content, state, &query.state);
    }
    content.raw(
        "</select></label><label>Parked <select name=\"parked\"><option value=\"\">any</option>",
    );
    option(&mut content, "true", &query.parked);
    option(&mut content, "false", &query.parked);
    html!(
        content,
        "</select></label><label>Correlation id <input type=\"search\" name=\"correlation_id\" value=\"",
        { query.correlation_id },
        "\"></label><button type=\"submit\">Filter</button></form>"
    );
    content.markup(&table(
        "instances",
        INSTANCE_COLUMNS,
        &list.items,
        Some("parked"),
        "No instances match.",
    ));
    content.markup(&pager(list.page, list.pages, list.total, |p| {
        format!("/console/instances?{}", query.query_string(p))
    }));
    layout(
        Chrome {
            title: "Instances",
            page: "instances",
            session: Some(session),
            data: Vec::new(),
        },
        &content,
    )
}

fn option(out: &mut Markup, value: &str, selected: &str) {
    html!(*out, "<option value=\"", { value }, "\"");
    if value == selected {
        out.raw(" selected");
    }
    html!(*out, ">", { value }, "</option>");
}

fn pager(page: u64, pages: u64, total: u64, href: impl Fn(u64) -> String) -> Markup {
    let mut out = Markup::new();
    out.raw("<nav class=\"pager\">");
    if page > 1 {
        html!(
            out,
            "<a rel=\"prev\" href=\"",
            { href(page - 1) },
            "\">\u{2190} newer</a>"
        );
    }
    html!(
        out,
        "<span id=\"page\">page ",
        { page },
        " of ",
        { pages },
        " (",
        { total },
        " in all)</span>"
    );
    if page < pages {
        html!(
            out,
            "<a rel=\"next\" href=\"",
            { href(page + 1) },
            "\">older \u{2192}</a>"
        );
    }
    out.raw("</nav>");
    out
}

pub fn instance(detail: &InstanceDetail, graph: Option<&StateGraph>, session: &Session) -> String {
    let mut content = Markup::new();
    let resume = format!(
        "/console/instances/{}/{}/resume",
        url_part(&detail.saga_type),
        url_part(&detail.correlation_id)
    );
    html!(
        content,
        "<section class=\"summary\"><dl>\
         <dt>Saga</dt><dd id=\"saga-type\">",
        { detail.saga_type },
        "</dd><dt>Correlation id</dt><dd id=\"correlation-id\">",
        { detail.correlation_id },
        "</dd><dt>State</dt><dd><span id=\"state\" class=\"badge\">",
        { detail.state },
        "</span> <span id=\"parked-flag\" class=\"badge parked\"",
        [hidden(!detail.parked)],
        ">parked</span></dd><dt>Since</dt><dd id=\"state-entered-at\">",
        { detail.state_entered_at },
        "</dd><dt>Attempts</dt><dd id=\"attempts\">",
        { detail.attempts },
        "</dd><dt>Last error</dt><dd id=\"last-error\" class=\"error\">",
        { detail.last_error },
        "</dd><dt>Version</dt><dd id=\"version\">",
        { detail.version },
        "</dd><dt>Started</dt><dd id=\"created-at\">",
        { detail.created_at },
        "</dd><dt>Updated</dt><dd id=\"updated-at\">",
        { detail.updated_at },
        "</dd></dl>"
    );
    if detail.registered {
        html!(
            content,
            "<form id=\"resume-form\" method=\"post\" action=\"",
            { resume },
            "\"",
            [hidden(!detail.parked)],
            ">",
            [csrf(session)],
            "<button type=\"submit\" id=\"resume\">Resume with a fresh budget</button></form>"
        );
    }
    content.raw("</section>");
    if let Some(graph) = graph {
        html!(
            content,
            "<h2>State machine</h2><div class=\"diagram-wrap",
            [if detail.parked {
                parked_class()
            } else {
                Markup::new()
            }],
            "\" id=\"diagram\">",
            [svg::diagram(graph, Some(&detail.state))],
            "</div>"
        );
    }
    content.raw("<h2>Timeline</h2>");
    content.markup(&table(
        "journal",
        JOURNAL_COLUMNS,
        &detail.journal,
        Some("outcome"),
        "No journal rows.",
    ));
    content.raw("<h2>Pending timers</h2>");
    content.markup(&table(
        "timers",
        TIMER_COLUMNS,
        &detail.timers,
        None,
        "No pending timers.",
    ));
    content.raw("<h2>Outbox events</h2>");
    content.markup(&table(
        "outbox",
        OUTBOX_COLUMNS,
        &detail.outbox,
        None,
        "No outbox events.",
    ));
    content.raw("<h2>Operator actions</h2>");
    content.markup(&table(
        "actions",
        ACTION_COLUMNS,
        &detail.actions,
        None,
        "No operator actions on this instance.",
    ));
    html!(
        content,
        "<h2>Data</h2><pre id=\"data\">",
        { detail.data },
        "</pre>"
    );
    layout(
        Chrome {
            title: &format!("{} {}", detail.saga_type, detail.correlation_id),
            page: "instance",
            session: Some(session),
            data: vec![
                ("saga-type", detail.saga_type.clone()),
                ("correlation-id", detail.correlation_id.clone()),
            ],
        },
        &content,
    )
}

fn hidden(hide: bool) -> Markup {
    let mut m = Markup::new();
    if hide {
        m.raw(" hidden");
    }
    m
}

fn parked_class() -> Markup {
    let mut m = Markup::new();
    m.raw(" parked");
    m
}

pub fn actions(list: &data::ActionList, session: &Session) -> String {
    let mut content = Markup::new();
    content.raw("<p>What operators did, newest first: resumes (also in each instance's timeline) and re-drives of error queues, with the counts before and after.</p>");
    content.markup(&table(
        "actions",
        ACTION_COLUMNS,
        &list.items,
        Some("action"),
        "No operator actions yet.",
    ));
    content.markup(&pager(list.page, list.pages, list.total, |p| {
        format!("/console/actions?page={p}")
    }));
    layout(
        Chrome {
            title: "Operator actions",
            page: "actions",
            session: Some(session),
            data: Vec::new(),
        },
        &content,
    )
}

pub fn action(row: &ActionRow, detail: Option<&serde_json::Value>, session: &Session) -> String {
    let mut content = Markup::new();
    html!(
        content,
        "<dl class=\"summary\"><dt>Action</dt><dd id=\"action\">",
        { row.action },
        "</dd><dt>Operator</dt><dd id=\"operator\">",
        { row.operator },
        "</dd><dt>At</dt><dd>",
        { row.at },
        "</dd>"
    );
    if !row.queue.is_empty() {
        html!(
            content,
            "<dt>Queue</dt><dd id=\"queue\">",
            { row.queue },
            "</dd>"
        );
    }
    if !row.correlation_id.is_empty() {
        let link = format!(
            "/console/instances/{}/{}",
            url_part(&row.saga_type),
            url_part(&row.correlation_id)
        );
        html!(
            content,
            "<dt>Instance</dt><dd><a href=\"",
            { link },
            "\">",
            { row.saga_type },
            " ",
            { row.correlation_id },
            "</a></dd>"
        );
    }
    content.raw("</dl>");
    if let Some(d) = detail
        && d.get("before").is_some()
    {
        let count = |phase: &str, key: &str| cell_text(key, &d[phase][key]);
        html!(
            content,
            "<table class=\"counts\" id=\"redrive-counts\"><thead><tr><th></th><th>",
            { cell_text("", &d["queue"]) },
            "</th><th>",
            { cell_text("", &d["error_queue"]) },
            "</th></tr></thead><tbody><tr id=\"before\"><th>before</th><td class=\"queue\">",
            { count("before", "queue") },
            "</td><td class=\"error-queue\">",
            { count("before", "error_queue") },
            "</td></tr><tr id=\"after\"><th>after</th><td class=\"queue\">",
            { count("after", "queue") },
            "</td><td class=\"error-queue\">",
            { count("after", "error_queue") },
            "</td></tr></tbody></table><p class=\"hint\">Messages ready in each queue; \
             \"after\" is counted right after the move, so a running consumer may already have taken \
             the moved messages.</p><p>Moved <span id=\"moved\">",
            { cell_text("", &d["moved"]) },
            "</span> message(s) back (at most ",
            { cell_text("", &d["limit"]) },
            "); ",
            { cell_text("", &d["budgets_reset"]) },
            " per-message retry budget(s) reset. A message that fails again goes back to the error queue.</p>"
        );
    }
    html!(
        content,
        "<h2>Detail</h2><pre id=\"detail\">",
        {
            detail
                .map(|d| serde_json::to_string_pretty(d).unwrap_or_default())
                .unwrap_or_default()
        },
        "</pre><p><a href=\"/console/actions\">All operator actions</a></p>"
    );
    layout(
        Chrome {
            title: &format!("Operator action #{}", row.id),
            page: "action",
            session: Some(session),
            data: Vec::new(),
        },
        &content,
    )
}
