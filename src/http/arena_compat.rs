//! Stand-in for `data::arena` with the same signatures, used until that module lands.
#![allow(dead_code)]

use crate::data::{ArenaRow, Label};

pub struct ParsedDataset {
    pub rows: Vec<ArenaRow>,
    pub dropped_rows: usize,
    pub label_counts: [usize; 3],
}

#[derive(Debug, Clone)]
pub struct RowError {
    pub row: usize,
    pub column: Option<String>,
    pub reason: String,
}

#[derive(Debug)]
pub struct DatasetError {
    pub errors: Vec<RowError>,
}

impl std::fmt::Display for DatasetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.errors.first() {
            Some(e) => write!(f, "row {}{}: {}", e.row, e.column.as_ref().map(|c| format!(", column {c}")).unwrap_or_default(), e.reason),
            None => write!(f, "invalid dataset"),
        }
    }
}

fn err(row: usize, column: Option<&str>, reason: impl Into<String>) -> DatasetError {
    DatasetError { errors: vec![RowError { row, column: column.map(String::from), reason: reason.into() }] }
}

fn turns(cell: &str, row: usize, col: &str) -> Result<Vec<Option<String>>, DatasetError> {
    let t = cell.trim();
    if t.starts_with('[') {
        serde_json::from_str::<Vec<Option<String>>>(t).map_err(|e| err(row, Some(col), format!("malformed JSON list: {e}")))
    } else {
        Ok(vec![Some(cell.to_string())])
    }
}

fn finish(rows: Vec<(String, String, String, String, [String; 3])>) -> Result<ParsedDataset, DatasetError> {
    let mut out = ParsedDataset { rows: Vec::new(), dropped_rows: 0, label_counts: [0; 3] };
    let mut errors = Vec::new();
    for (i, (id, p, a, b, oh)) in rows.into_iter().enumerate() {
        let row = i + 2;
        let parsed = (|| {
            let p = turns(&p, row, "prompt")?;
            let a = turns(&a, row, "response_a")?;
            let b = turns(&b, row, "response_b")?;
            let ones: Vec<usize> = oh.iter().enumerate().filter(|(_, v)| v.trim() == "1").map(|(i, _)| i).collect();
            if ones.len() != 1 {
                return Err(err(row, Some("winner_model_a"), format!("one-hot label must have exactly one 1, found {}", ones.len())));
            }
            Ok((p, a, b, ones[0]))
        })();
        match parsed {
            Ok((p, a, b, l)) => {
                if a.iter().all(Option::is_none) && b.iter().all(Option::is_none) {
                    out.dropped_rows += 1;
                    continue;
                }
                let f = |v: Vec<Option<String>>| v.into_iter().map(Option::unwrap_or_default).collect();
                out.label_counts[l] += 1;
                out.rows.push(ArenaRow { id, prompt: f(p), response_a: f(a), response_b: f(b), label: Label::from_index(l) });
            }
            Err(e) => errors.extend(e.errors),
        }
    }
    if !errors.is_empty() {
        return Err(DatasetError { errors });
    }
    Ok(out)
}

pub fn parse_csv(bytes: &[u8]) -> Result<ParsedDataset, DatasetError> {
    let mut r = csv::ReaderBuilder::new().from_reader(bytes);
    let headers = r.headers().map_err(|e| err(1, None, format!("not CSV: {e}")))?.clone();
    let col = |n: &str| headers.iter().position(|h| h == n).ok_or_else(|| err(1, Some(n), "column is missing from the header"));
    let idx = [col("id")?, col("prompt")?, col("response_a")?, col("response_b")?, col("winner_model_a")?, col("winner_model_b")?, col("winner_tie")?];
    let mut rows = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let rec = rec.map_err(|e| err(i + 2, None, format!("not CSV: {e}")))?;
        let g = |k: usize| rec.get(idx[k]).unwrap_or("").to_string();
        rows.push((g(0), g(1), g(2), g(3), [g(4), g(5), g(6)]));
    }
    finish(rows)
}

pub fn parse_jsonl(bytes: &[u8]) -> Result<ParsedDataset, DatasetError> {
    let text = std::str::from_utf8(bytes).map_err(|_| err(1, None, "not UTF-8"))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| err(i + 1, None, format!("not JSON: {e}")))?;
        let s = |k: &str| match &v[k] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        };
        rows.push((s("id"), s("prompt"), s("response_a"), s("response_b"), [s("winner_model_a"), s("winner_model_b"), s("winner_tie")]));
    }
    finish(rows)
}
