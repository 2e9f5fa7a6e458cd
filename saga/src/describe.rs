//! The transition table and the state diagram of any saga, generated from
//! its definition: every state with every sample input, run through
//! [`Saga::decide`] itself, so the listing cannot drift from the code.

use serde::Serialize;

use crate::definition::{Decision, Saga, SagaInput, SagaState};

/// How the table answers one (state, input) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// The instance moves (possibly to the same state) with effects.
    Apply,
    /// A duplicate or late input: nothing changes.
    Ignore,
    /// A fault.
    Reject,
}

impl Policy {
    /// `apply`, `ignore` or `reject`.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Apply => "apply",
            Policy::Ignore => "ignore",
            Policy::Reject => "reject",
        }
    }
}

/// One (state, input) pair of the table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TransitionRow {
    /// The state the input arrives in.
    pub from: &'static str,
    /// The input's label (see [`SagaInput::samples`]).
    pub input: &'static str,
    /// What the table does with it.
    pub policy: Policy,
    /// The next state, when applied.
    pub to: Option<&'static str>,
    /// What applying it does, described.
    pub effects: Vec<String>,
    /// The table's note or reason.
    pub why: &'static str,
}

/// Every state with every sample input, in [`SagaState::ALL`] order. The
/// decisions are taken on the default instance data.
pub fn transitions<S: Saga>(saga: &S) -> Vec<TransitionRow> {
    let data = S::Data::default();
    let samples = S::Input::samples();
    let mut rows = Vec::with_capacity(S::State::ALL.len() * samples.len());
    for &from in S::State::ALL {
        for (label, input) in &samples {
            rows.push(match saga.decide(from, &data, input) {
                Decision::Apply {
                    next,
                    effects,
                    note,
                    ..
                } => TransitionRow {
                    from: from.name(),
                    input: label,
                    policy: Policy::Apply,
                    to: Some(next.name()),
                    effects: effects.iter().map(|e| e.describe()).collect(),
                    why: note,
                },
                Decision::Ignore { reason } => TransitionRow {
                    from: from.name(),
                    input: label,
                    policy: Policy::Ignore,
                    to: None,
                    effects: Vec::new(),
                    why: reason,
                },
                Decision::Reject { reason } => TransitionRow {
                    from: from.name(),
                    input: label,
                    policy: Policy::Reject,
                    to: None,
                    effects: Vec::new(),
                    why: reason,
                },
            });
        }
    }
    rows
}

/// The state diagram as Mermaid `stateDiagram-v2` text: how an instance
/// starts, every applied transition with its effects, and the final states.
/// Ignored and rejected pairs are listed by [`transitions`].
pub fn mermaid<S: Saga>(saga: &S) -> String {
    let start = saga.start(&S::Data::default());
    let mut out = format!(
        "stateDiagram-v2\n    [*] --> {}: {}",
        start.state.name(),
        start.trigger
    );
    if !start.effects.is_empty() {
        let effects: Vec<String> = start.effects.iter().map(|e| e.describe()).collect();
        out.push_str(&format!(" / {}", effects.join(", ")));
    }
    out.push('\n');
    for row in transitions(saga) {
        if let Some(to) = row.to {
            out.push_str(&format!("    {} --> {}: {}", row.from, to, row.input));
            if !row.effects.is_empty() {
                out.push_str(&format!(" / {}", row.effects.join(", ")));
            }
            out.push('\n');
        }
    }
    for state in S::State::ALL.iter().filter(|s| s.is_final()) {
        out.push_str(&format!("    {} --> [*]\n", state.name()));
    }
    out
}

/// One state of a [`StateGraph`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StateNode {
    /// The state's name.
    pub name: &'static str,
    /// Whether it is final (the instance is decided).
    pub is_final: bool,
}

/// The applied transitions from one state to another, with the inputs
/// that take them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StateEdge {
    /// Where from.
    pub from: &'static str,
    /// Where to (the same state for a transition that stays).
    pub to: &'static str,
    /// The input labels that take it, in table order.
    pub inputs: Vec<&'static str>,
}

/// The state machine as a graph, for drawing it: the state an instance
/// starts in, every state in lifecycle order, and the applied transitions
/// grouped by (from, to). The same facts as [`mermaid`], as data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StateGraph {
    /// The state a new instance is in.
    pub initial: &'static str,
    /// What starts an instance (the start's trigger).
    pub start_trigger: &'static str,
    /// Every state, in [`SagaState::ALL`] order.
    pub states: Vec<StateNode>,
    /// Applied transitions, in table order of their first input.
    pub edges: Vec<StateEdge>,
}

impl StateGraph {
    /// The final states' names.
    pub fn final_states(&self) -> Vec<&'static str> {
        self.states
            .iter()
            .filter(|s| s.is_final)
            .map(|s| s.name)
            .collect()
    }
}

/// The graph of `saga`'s transition table (see [`StateGraph`]).
pub fn graph<S: Saga>(saga: &S) -> StateGraph {
    let start = saga.start(&S::Data::default());
    let mut edges: Vec<StateEdge> = Vec::new();
    for row in transitions(saga) {
        let Some(to) = row.to else { continue };
        match edges.iter_mut().find(|e| e.from == row.from && e.to == to) {
            Some(edge) => edge.inputs.push(row.input),
            None => edges.push(StateEdge {
                from: row.from,
                to,
                inputs: vec![row.input],
            }),
        }
    }
    StateGraph {
        initial: start.state.name(),
        start_trigger: start.trigger,
        states: S::State::ALL
            .iter()
            .map(|s| StateNode {
                name: s.name(),
                is_final: s.is_final(),
            })
            .collect(),
        edges,
    }
}
