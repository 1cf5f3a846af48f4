//! Arena data: parsing and validation, the prompt template, balanced truncation, batching,
//! and the fine-tuning hyperparameters. Pure code: no I/O policy, no tensors.

pub mod arena;
pub mod batch;
pub mod hyper;
mod json_line;
pub mod template;

use rand::seq::SliceRandom;
use rand::SeedableRng;
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

/// The validation split, of the service's jobs and of `arbiter train` alike: `fraction` of the
/// rows (at least one, leaving at least one) for validation, chosen by a shuffle seeded with
/// the job's seed.
pub fn split_validation(rows: Vec<ArenaRow>, fraction: f64, seed: u64) -> (Vec<ArenaRow>, Vec<ArenaRow>) {
    if rows.len() < 2 {
        return (rows, Vec::new());
    }
    let n_val = ((rows.len() as f64 * fraction).round() as usize).clamp(1, rows.len() - 1);
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let mut is_val = vec![false; rows.len()];
    for &i in &order[..n_val] {
        is_val[i] = true;
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (row, v) in rows.into_iter().zip(is_val) {
        if v {
            val.push(row);
        } else {
            train.push(row);
        }
    }
    (train, val)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> Vec<ArenaRow> {
        (0..n)
            .map(|i| ArenaRow { id: i.to_string(), prompt: vec![], response_a: vec![], response_b: vec![], label: None })
            .collect()
    }

    #[test]
    fn split_is_deterministic_and_keeps_every_row() {
        let (t, v) = split_validation(rows(100), 0.1, 7);
        assert_eq!((t.len(), v.len()), (90, 10));
        let (t2, v2) = split_validation(rows(100), 0.1, 7);
        assert_eq!((t, v), (t2, v2));
        let (t, v) = split_validation(rows(3), 0.01, 7);
        assert_eq!((t.len(), v.len()), (2, 1));
    }
}
