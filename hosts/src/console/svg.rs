//! The console's two drawings, as SVG markup built from escaped text: a
//! saga's state diagram (from its [`StateGraph`]) and the bar chart of
//! instances decided per minute. No third-party renderer: states are laid
//! out in columns by their distance from the initial state.

use std::collections::BTreeMap;

use saga::describe::StateGraph;

use super::html::Markup;
use crate::html;

const BOX_W: i64 = 150;
const BOX_H: i64 = 44;
const COLUMN: i64 = BOX_W + 190;
const ROW: i64 = BOX_H + 56;
const LEFT: i64 = 110;
const TOP: i64 = 70;

/// Where each state's box is: columns by distance from the initial state
/// (unreachable states in a last column), rows in lifecycle order.
fn layout(graph: &StateGraph) -> BTreeMap<&'static str, (i64, i64)> {
    let mut rank: BTreeMap<&str, i64> = BTreeMap::new();
    rank.insert(graph.initial, 0);
    let mut frontier = vec![graph.initial];
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for from in frontier {
            let r = rank[from];
            for edge in graph
                .edges
                .iter()
                .filter(|e| e.from == from && e.to != from)
            {
                if !rank.contains_key(edge.to) {
                    rank.insert(edge.to, r + 1);
                    next.push(edge.to);
                }
            }
        }
        frontier = next;
    }
    let unreached = rank.values().max().copied().unwrap_or(0) + 1;
    let mut rows: BTreeMap<i64, i64> = BTreeMap::new();
    let mut at = BTreeMap::new();
    for state in &graph.states {
        let column = rank.get(state.name).copied().unwrap_or(unreached);
        let row = rows.entry(column).or_insert(0);
        at.insert(state.name, (LEFT + column * COLUMN, TOP + *row * ROW));
        *row += 1;
    }
    at
}

/// The state diagram: one `<g class="state" data-state="...">` per state
/// (`current` on `current`'s, `final` on final states'), the start arrow,
/// and every applied transition with the inputs that take it.
pub fn diagram(graph: &StateGraph, current: Option<&str>) -> Markup {
    let at = layout(graph);
    let width = at.values().map(|(x, _)| x + BOX_W).max().unwrap_or(0) + 40;
    // Room below the boxes for curves back (or sideways) only when needed.
    let curves_below = graph.edges.iter().any(|e| {
        e.from != e.to
            && matches!((at.get(e.from), at.get(e.to)), (Some((fx, _)), Some((tx, _))) if tx <= fx)
    });
    let height =
        at.values().map(|(_, y)| y + BOX_H).max().unwrap_or(0) + if curves_below { 80 } else { 24 };
    let mut edges = Markup::new();
    for edge in &graph.edges {
        let (Some(&(fx, fy)), Some(&(tx, ty))) = (at.get(edge.from), at.get(edge.to)) else {
            continue;
        };
        let label = edge.inputs.join(", ");
        let (path, lx, ly) = if edge.from == edge.to {
            let (a, b) = (fx + BOX_W / 4, fx + 3 * BOX_W / 4);
            (
                format!("M{a},{fy} C{a},{} {b},{} {b},{fy}", fy - 44, fy - 44),
                fx + BOX_W / 2,
                fy - 40,
            )
        } else if tx > fx {
            let (x1, y1, x2, y2) = (fx + BOX_W, fy + BOX_H / 2, tx, ty + BOX_H / 2);
            (
                format!("M{x1},{y1} L{x2},{y2}"),
                (x1 + x2) / 2,
                (y1 + y2) / 2 - 8,
            )
        } else {
            // Back or sideways: a curve below the boxes.
            let (x1, y1, x2, y2) = (fx + BOX_W / 2, fy + BOX_H, tx + BOX_W / 2, ty + BOX_H);
            let depth = y1.max(y2) + 50;
            (
                format!("M{x1},{y1} Q{},{depth} {x2},{y2}", (x1 + x2) / 2),
                (x1 + x2) / 2,
                depth - 16,
            )
        };
        html!(
            edges,
            "<g class=\"edge\" data-from=\"",
            { edge.from },
            "\" data-to=\"",
            { edge.to },
            "\"><title>",
            { edge.from },
            " \u{2192} ",
            { edge.to },
            ": ",
            { label },
            "</title><path d=\"",
            { path },
            "\" marker-end=\"url(#arrow)\"/><text x=\"",
            { lx },
            "\" y=\"",
            { ly },
            "\" text-anchor=\"middle\">",
            { label },
            "</text></g>"
        );
    }
    let mut nodes = Markup::new();
    for state in &graph.states {
        let Some(&(x, y)) = at.get(state.name) else {
            continue;
        };
        let mut class = Markup::new();
        class.raw("state");
        if state.is_final {
            class.raw(" final");
        }
        if current == Some(state.name) {
            class.raw(" current");
        }
        html!(
            nodes,
            "<g class=\"",
            [class],
            "\" data-state=\"",
            { state.name },
            "\"><rect x=\"",
            { x },
            "\" y=\"",
            { y },
            "\" width=\"",
            { BOX_W },
            "\" height=\"",
            { BOX_H },
            "\" rx=\"10\"/>"
        );
        if state.is_final {
            html!(
                nodes,
                "<rect class=\"inner\" x=\"",
                { x + 4 },
                "\" y=\"",
                { y + 4 },
                "\" width=\"",
                { BOX_W - 8 },
                "\" height=\"",
                { BOX_H - 8 },
                "\" rx=\"7\"/>"
            );
        }
        html!(
            nodes,
            "<text x=\"",
            { x + BOX_W / 2 },
            "\" y=\"",
            { y + BOX_H / 2 + 5 },
            "\" text-anchor=\"middle\">",
            { state.name },
            "</text></g>"
        );
    }
    let mut start = Markup::new();
    if let Some(&(x, y)) = at.get(graph.initial) {
        let cy = y + BOX_H / 2;
        html!(
            start,
            "<g class=\"start\"><circle cx=\"",
            { x - 80 },
            "\" cy=\"",
            { cy },
            "\" r=\"7\"/><path d=\"M",
            { x - 73 },
            ",",
            { cy },
            " L",
            { x },
            ",",
            { cy },
            "\" marker-end=\"url(#arrow)\"/><text x=\"",
            { x - 80 },
            "\" y=\"",
            { cy - 16 },
            "\">",
            { graph.start_trigger },
            "</text></g>"
        );
    }
    let mut svg = Markup::new();
    html!(
        svg,
        "<svg class=\"diagram\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 ",
        { width },
        " ",
        { height },
        "\" role=\"img\" aria-label=\"state diagram\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" \
         markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\">\
         <path d=\"M0,0 L10,5 L0,10 z\"/></marker></defs>",
        [start],
        [edges],
        [nodes],
        "</svg>"
    );
    svg
}

/// A bar chart of `per_minute` (oldest first, one bar a minute), titled
/// with the saga type; a standalone SVG document.
pub fn decided_chart(saga_type: &str, per_minute: &[u64]) -> Markup {
    const W: i64 = 640;
    const H: i64 = 180;
    const PAD_L: i64 = 40;
    const PAD_B: i64 = 26;
    const PAD_T: i64 = 28;
    let max = per_minute.iter().copied().max().unwrap_or(0).max(1);
    let total: u64 = per_minute.iter().sum();
    let n = i64::try_from(per_minute.len()).unwrap_or(1).max(1);
    let plot_w = W - PAD_L - 10;
    let plot_h = H - PAD_B - PAD_T;
    let bar = plot_w / n;
    let mut bars = Markup::new();
    for (i, &count) in per_minute.iter().enumerate() {
        let i = i64::try_from(i).unwrap_or(0);
        let h = i64::try_from(count)
            .unwrap_or(i64::MAX)
            .saturating_mul(plot_h)
            / i64::try_from(max).unwrap_or(1);
        let minutes_ago = n - 1 - i;
        html!(
            bars,
            "<rect class=\"bar\" fill=\"#3867d6\" x=\"",
            { PAD_L + i * bar + 1 },
            "\" y=\"",
            { PAD_T + plot_h - h },
            "\" width=\"",
            { (bar - 2).max(1) },
            "\" height=\"",
            { h },
            "\"><title>",
            { count },
            " decided, ",
            { minutes_ago },
            " min ago</title></rect>"
        );
    }
    let mut svg = Markup::new();
    html!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 ",
        { W },
        " ",
        { H },
        "\" width=\"",
        { W },
        "\" height=\"",
        { H },
        "\" font-family=\"sans-serif\" font-size=\"12\" fill=\"#333\">\
         <text x=\"",
        { PAD_L },
        "\" y=\"16\">",
        { saga_type },
        ": ",
        { total },
        " decided in the last hour (per minute)</text><line stroke=\"#999\" x1=\"",
        { PAD_L },
        "\" y1=\"",
        { PAD_T + plot_h },
        "\" x2=\"",
        { W - 10 },
        "\" y2=\"",
        { PAD_T + plot_h },
        "\"/><text x=\"",
        { PAD_L - 6 },
        "\" y=\"",
        { PAD_T + 10 },
        "\" text-anchor=\"end\">",
        { max },
        "</text><text x=\"",
        { PAD_L - 6 },
        "\" y=\"",
        { PAD_T + plot_h },
        "\" text-anchor=\"end\">0</text>",
        [bars],
        "<text x=\"",
        { PAD_L },
        "\" y=\"",
        { H - 8 },
        "\">-",
        { n },
        " min</text><text x=\"",
        { W - 10 },
        "\" y=\"",
        { H - 8 },
        "\" text-anchor=\"end\">now</text></svg>"
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use saga::describe::{StateEdge, StateNode};

    fn graph() -> StateGraph {
        let node = |name, is_final| StateNode { name, is_final };
        let edge = |from, to, inputs: &[&'static str]| StateEdge {
            from,
            to,
            inputs: inputs.to_vec(),
        };
        StateGraph {
            initial: "pending",
            start_trigger: "OrderPlaced",
            states: vec![
                node("pending", false),
                node("processing", false),
                node("completed", true),
                node("expired", true),
            ],
            edges: vec![
                edge("pending", "processing", &["OrderCreated"]),
                edge("processing", "completed", &["PaymentDecided(approved)"]),
                edge("processing", "processing", &["PaymentDecided(declined)"]),
                edge("processing", "expired", &["<script>x</script>"]),
            ],
        }
    }

    #[test]
    fn states_are_laid_out_by_distance_from_the_initial_state() {
        let at = layout(&graph());
        assert_eq!(at["pending"], (LEFT, TOP));
        assert_eq!(at["processing"], (LEFT + COLUMN, TOP));
        assert_eq!(at["completed"], (LEFT + 2 * COLUMN, TOP));
        assert_eq!(at["expired"], (LEFT + 2 * COLUMN, TOP + ROW));
    }

    #[test]
    fn the_diagram_marks_the_current_and_final_states_and_escapes_labels() {
        let svg = diagram(&graph(), Some("processing")).into_string();
        assert!(svg.contains("<g class=\"state current\" data-state=\"processing\">"));
        assert!(svg.contains("<g class=\"state final\" data-state=\"completed\">"));
        assert!(svg.contains("&lt;script&gt;x&lt;/script&gt;"));
        assert!(!svg.contains("<script>"));
        assert_eq!(svg.matches("class=\"edge\"").count(), 4);
        assert!(svg.contains(">OrderPlaced</text>"));
    }

    #[test]
    fn the_chart_has_one_bar_a_minute_scaled_to_the_busiest() {
        let mut minutes = vec![0; 60];
        minutes[59] = 4;
        minutes[0] = 2;
        let svg = decided_chart("order", &minutes).into_string();
        assert_eq!(svg.matches("class=\"bar\"").count(), 60);
        assert!(svg.contains("order: 6 decided in the last hour"));
        assert!(svg.contains("<title>4 decided, 0 min ago</title>"));
        assert!(svg.contains("<title>2 decided, 59 min ago</title>"));
    }
}
