//! The arena prompt template and truncation.

use super::ArenaRow;

/// Token ids of one encoded row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub truncated: bool,
}

/// Encode a row with the notebook's template, cut to `max_length` tokens.
pub fn encode_pair<F: Fn(&str) -> Vec<u32>>(row: &ArenaRow, max_length: usize, tokenize: F, bos: Option<u32>) -> Encoded {
    let text = format!(
        "User prompt: {}\n\nModel A :\n{}\n\n--------\n\nModel B:\n{}",
        row.prompt.join("\n\n"),
        row.response_a.join("\n\n"),
        row.response_b.join("\n\n")
    );
    let mut ids: Vec<u32> = bos.into_iter().collect();
    ids.extend(tokenize(&text));
    let truncated = ids.len() > max_length;
    ids.truncate(max_length);
    Encoded { ids, truncated }
}
