use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// The operator-action log: one row per action an operator took.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "saga_operator_actions")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// `resume` or `redrive` ([`crate::operator::ActionKind`]).
    pub action: String,
    /// The saga type acted on (a resume), if any.
    pub saga_type: Option<String>,
    /// The instance acted on (a resume), if any.
    pub correlation_id: Option<String>,
    /// The queue acted on (a re-drive: the queue its error queue was
    /// emptied into), if any.
    pub queue: Option<String>,
    /// Who did it, e.g. `admin@example.com (user 1)` or `alice (cli)`.
    pub operator: String,
    /// What it did: counts before and after, the resumed state, ...
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub detail: Option<Json>,
    pub at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
