//! The order saga's state machine as the engine runs it: a Mermaid diagram
//! and the full transition table, both generated from its definition by
//! `saga::describe` (which does the same for any saga). Public: they
//! describe the system, not anyone's data.

use std::sync::Arc;

use poem::web::Data;
use poem_openapi::payload::{Json, PlainText};
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::{ApiTags, AppState};

/// How the machine answers one (state, input) pair.
#[derive(Object)]
#[oai(example, skip_serializing_if_is_none)]
pub struct TransitionRuleView {
    /// The state the input arrives in.
    pub from: String,
    /// The input, with the payment outcome spelled out where it matters.
    pub input: String,
    /// `apply`, `ignore` or `reject`.
    pub policy: String,
    /// The next state, when the policy is `apply`.
    pub to: Option<String>,
    /// What applying it does (publish an event, schedule a timer, ...).
    pub effects: Vec<String>,
    /// The table's note or reason.
    pub why: String,
}

impl poem_openapi::types::Example for TransitionRuleView {
    fn example() -> Self {
        TransitionRuleView {
            from: "processing".into(),
            input: "PaymentDecided(approved)".into(),
            policy: "apply".into(),
            to: Some("completed".into()),
            effects: vec!["publish OrderCompleted".into()],
            why: "payment approved".into(),
        }
    }
}

#[derive(ApiResponse)]
pub enum DiagramResponse {
    /// Mermaid `stateDiagram-v2` text (paste it into any Mermaid renderer).
    #[oai(status = 200)]
    Ok(PlainText<String>),
}

#[derive(ApiResponse)]
pub enum TransitionsResponse {
    /// Every state with every input.
    #[oai(status = 200)]
    Ok(Json<Vec<TransitionRuleView>>),
}

pub struct SagasApi;

#[OpenApi(tag = "ApiTags::Sagas")]
impl SagasApi {
    /// The order saga as a state diagram
    ///
    /// Mermaid text generated from the live transition table (public).
    #[oai(path = "/api/sagas/order/diagram", method = "get")]
    async fn diagram(&self, state: Data<&Arc<AppState>>) -> DiagramResponse {
        DiagramResponse::Ok(PlainText(saga::describe::mermaid(state.orders.saga())))
    }

    /// The order saga's transition table
    ///
    /// Every state with every input: applied, ignored or rejected, the next
    /// state and the effects (public).
    #[oai(path = "/api/sagas/order/transitions", method = "get")]
    async fn transitions(&self, state: Data<&Arc<AppState>>) -> TransitionsResponse {
        TransitionsResponse::Ok(Json(
            saga::describe::transitions(state.orders.saga())
                .into_iter()
                .map(|row| TransitionRuleView {
                    from: row.from.to_owned(),
                    input: row.input.to_owned(),
                    policy: row.policy.as_str().to_owned(),
                    to: row.to.map(str::to_owned),
                    effects: row.effects,
                    why: row.why.to_owned(),
                })
                .collect(),
        ))
    }
}
