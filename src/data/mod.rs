//! Arena data: parsing and validation, the prompt template, balanced truncation, batching,
//! and the fine-tuning hyperparameters. Pure code: no I/O policy, no tensors.

pub mod arena;
pub mod batch;
pub mod hyper;
mod json_line;
pub mod template;

use serde::{Deserialize, Serialize};

/// The three classes, in the order of the one-hot columns and of every probability vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    WinnerModelA = 0,
    WinnerModelB = 1,
    WinnerTie = 2,
}

impl Label {
    pub const ALL: [Label; 3] = [Label::WinnerModelA, Label::WinnerModelB, Label::WinnerTie];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_index(i: usize) -> Option<Label> {
        Self::ALL.get(i).copied()
    }

    /// The label of the same pair with responses A and B swapped.
    pub fn swapped(self) -> Label {
        match self {
            Label::WinnerModelA => Label::WinnerModelB,
            Label::WinnerModelB => Label::WinnerModelA,
            Label::WinnerTie => Label::WinnerTie,
        }
    }

    pub fn column(self) -> &'static str {
        match self {
            Label::WinnerModelA => "winner_model_a",
            Label::WinnerModelB => "winner_model_b",
            Label::WinnerTie => "winner_tie",
        }
    }
}

/// One arena row: a conversation (one string per turn) and the two responses.
/// `label` is `None` for unlabelled (test-layout) rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArenaRow {
    pub id: String,
    pub prompt: Vec<String>,
    pub response_a: Vec<String>,
    pub response_b: Vec<String>,
    pub label: Option<Label>,
}

impl ArenaRow {
    /// The same pair with A and B swapped (label swapped too).
    pub fn swapped(&self) -> ArenaRow {
        ArenaRow {
            id: self.id.clone(),
            prompt: self.prompt.clone(),
            response_a: self.response_b.clone(),
            response_b: self.response_a.clone(),
            label: self.label.map(Label::swapped),
        }
    }
}
