//! Parsing and validation of arena datasets (CSV and JSONL).
//!
//! # CSV
//! Columns `id, prompt, response_a, response_b, winner_model_a, winner_model_b, winner_tie`
//! in any order; `model_a`, `model_b` and any other column are ignored. A file without any
//! `winner_*` column is a test-layout file: every row gets `label: None` and
//! [`ParsedDataset::labelled`] is `false`. A file with only some `winner_*` columns is an error.
//!
//! `prompt` / `response_*` cells hold a JSON list of strings, one per turn
//! (`["hi","and then?"]`). A cell that is a JSON list of anything else, or that starts like a
//! JSON list (`[` then a string, `null`, `]`, `[` or `{`) but does not parse, is the row error
//! "malformed JSON list"; any other cell (`[INST] hi` too) is taken verbatim as one turn. `null`
//! entries become empty strings, so turns stay aligned across the prompt and both responses.
//!
//! # JSONL
//! One JSON object per line (blank lines are skipped) with the same field names. `id` is a
//! string or an integer; `prompt` / `response_*` are a list of strings and `null`s, or a string
//! read as a CSV cell is (so a CSV converted line by line, whose cells stay strings, reads the
//! same). The label is either the three one-hot fields
//! (numbers `0`/`1`, `0.0`/`1.0`, booleans, or the strings `"0"`/`"1"`) or
//! `"label": "winner_model_a" | "winner_model_b" | "winner_tie"`. A file where no line has a
//! label is unlabelled; once one line has a label, every line must.
//!
//! # Row numbers
//! [`RowError::row`] is 1-based as a spreadsheet shows the file: in a CSV the header is row 1
//! and the first data row is row 2 (rows are CSV records, so a quoted cell spanning several
//! lines is still one row). In a JSONL file the row is the line number (1-based).
//!
//! # Limits and hostile input
//! [`ParseLimits`] bounds the rows of a file and the characters of one text (a cell, or the
//! turns of a JSONL field together, each turn counting at least one); the first breach ends
//! parsing. A JSONL line is read into the fields a row uses and nothing else: unknown fields
//! cost no memory however large. Ids are at most
//! [`MAX_ID_CHARS`] characters without control characters, and an id that a spreadsheet would
//! run as a formula (starting with `=`, `+`, `-`, `@`, unless it is a number) is a row error:
//! ids are written back into submission CSVs (CSV injection).
//!
//! # Rows that are dropped
//! A row whose two responses are both empty (every turn `null` or `""`) is dropped and counted
//! in [`ParsedDataset::dropped_rows`]; it is still validated (id, label) first, and its id still
//! counts for uniqueness.

use std::collections::HashSet;

use super::json_line::{self, Fields, Line, Scalar, Turns};
use super::{ArenaRow, Label};

/// At most this many row errors are kept; [`DatasetError::Rows::total`] counts all of them.
pub const MAX_ROW_ERRORS: usize = 20;

/// Longest id, in characters.
pub const MAX_ID_CHARS: usize = 256;

/// Bounds on what one file may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    /// Data rows (dropped and invalid rows count too).
    pub max_rows: usize,
    /// Characters of one prompt or response (a CSV cell as written; a JSONL field's turns together).
    pub max_text_chars: usize,
}

impl Default for ParseLimits {
    /// No limits.
    fn default() -> Self {
        ParseLimits { max_rows: usize::MAX, max_text_chars: usize::MAX }
    }
}

/// Whether `s` has at most `max` characters.
fn chars_within(s: &str, max: usize) -> bool {
    s.len() <= max || s.chars().count() <= max
}

const LABEL_COLUMNS: [&str; 3] = ["winner_model_a", "winner_model_b", "winner_tie"];
const TEXT_COLUMNS: [&str; 4] = ["id", "prompt", "response_a", "response_b"];

/// The rows of a valid dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedDataset {
    /// Kept rows, in file order.
    pub rows: Vec<ArenaRow>,
    /// Rows dropped because both responses were empty, each with its position among all the
    /// valid rows of the file (they cannot train, but a prediction file still needs them).
    pub dropped: Vec<(usize, ArenaRow)>,
    /// Kept rows per class, indexed by [`Label::index`] (all zero when unlabelled).
    pub label_counts: [usize; 3],
    /// Whether the file has labels (`false` for a test-layout / prediction file).
    pub labelled: bool,
}

impl ParsedDataset {
    /// How many rows were dropped because both responses were empty.
    pub fn dropped_rows(&self) -> usize {
        self.dropped.len()
    }

    /// Every valid row in file order, the dropped ones included (for scoring, where each id
    /// needs an answer).
    pub fn into_all_rows(self) -> Vec<ArenaRow> {
        let mut all = self.rows;
        for (position, row) in self.dropped {
            all.insert(position, row);
        }
        all
    }
}

/// One problem in one row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RowError {
    /// 1-based row as a spreadsheet shows it (CSV: header is row 1; JSONL: line number).
    pub row: usize,
    /// The offending column or field, when one is to blame.
    pub column: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.column {
            Some(c) => write!(f, "row {}, column {c}: {}", self.row, self.reason),
            None => write!(f, "row {}: {}", self.row, self.reason),
        }
    }
}

/// Why a dataset was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DatasetError {
    /// Nothing to read: zero bytes, only blanks, or a header without data rows.
    #[error("the dataset is empty (no data rows)")]
    Empty,
    /// The bytes are not UTF-8. `byte_offset` is the first invalid byte of the file;
    /// `row` the row holding it (`None` when it is in the CSV header).
    #[error("not UTF-8: invalid byte at offset {byte_offset}{}", .row.map(|r| format!(" (row {r})")).unwrap_or_default())]
    NotUtf8 { byte_offset: usize, row: Option<usize> },
    /// The bytes are not a CSV file this parser can read (no arena header, ragged rows...).
    #[error("not a readable CSV file{}: {reason}", .row.map(|r| format!(" at row {r}")).unwrap_or_default())]
    Unreadable { row: Option<usize>, reason: String },
    /// Required columns are absent from the header.
    #[error("missing required column(s): {}", .0.join(", "))]
    MissingColumns(Vec<String>),
    /// Row-level problems: the first [`MAX_ROW_ERRORS`] of them, and how many there were.
    #[error("{}", display_rows(.errors, *.total))]
    Rows { errors: Vec<RowError>, total: usize },
    /// More data rows than [`ParseLimits::max_rows`]; `row` is the first one over.
    #[error("more than {limit} data rows (row {row} is over the limit)")]
    TooManyRows { limit: usize, row: usize },
    /// A text longer than [`ParseLimits::max_text_chars`].
    #[error("row {row}, column {column}: the text is longer than the limit of {limit} characters")]
    TextTooLong { row: usize, column: String, limit: usize },
}

fn display_rows(errors: &[RowError], total: usize) -> String {
    match errors.first() {
        Some(first) if total > 1 => format!("{first} (and {} more row errors)", total - 1),
        Some(first) => first.to_string(),
        None => "invalid rows".to_string(),
    }
}

impl DatasetError {
    /// The error as a list of row errors, for callers that report every failure that way:
    /// whole-file problems get row 0 (or their row when known) and no column.
    pub fn row_errors(&self) -> Vec<RowError> {
        match self {
            DatasetError::Rows { errors, .. } => errors.clone(),
            DatasetError::NotUtf8 { row, .. } | DatasetError::Unreadable { row, .. } => {
                vec![RowError { row: row.unwrap_or(0), column: None, reason: self.to_string() }]
            }
            DatasetError::MissingColumns(cols) => cols
                .iter()
                .map(|c| RowError { row: 1, column: Some(c.clone()), reason: "missing required column".into() })
                .collect(),
            DatasetError::Empty => vec![RowError { row: 0, column: None, reason: self.to_string() }],
            DatasetError::TooManyRows { row, .. } => vec![RowError { row: *row, column: None, reason: self.to_string() }],
            DatasetError::TextTooLong { row, column, .. } => {
                vec![RowError { row: *row, column: Some(column.clone()), reason: self.to_string() }]
            }
        }
    }
}

/// Collects row errors (the [`MAX_ROW_ERRORS`] of the lowest rows, whatever the order they are
/// found in) and the rows that passed.
struct Collector {
    out: ParsedDataset,
    /// With the order each was found in, which orders errors of one row.
    errors: Vec<(usize, RowError)>,
    total_errors: usize,
    ids: HashSet<String>,
}

impl Collector {
    fn new(labelled: bool) -> Self {
        Collector {
            out: ParsedDataset { rows: Vec::new(), dropped: Vec::new(), label_counts: [0; 3], labelled },
            errors: Vec::new(),
            total_errors: 0,
            ids: HashSet::new(),
        }
    }

    fn error(&mut self, row: usize, column: Option<&str>, reason: impl Into<String>) {
        let found = self.total_errors;
        self.total_errors += 1;
        let e = RowError { row, column: column.map(String::from), reason: reason.into() };
        if self.errors.len() < MAX_ROW_ERRORS {
            self.errors.push((found, e));
        } else if let Some(last) = self.errors.iter_mut().max_by_key(|(k, e)| (e.row, *k)).filter(|(_, e)| row < e.row) {
            // a pass that reports later rows first (JSONL: unreadable lines, then fields)
            *last = (found, e);
        }
    }

    /// Check id uniqueness, then keep or drop the row.
    fn push(&mut self, row_no: usize, row: ArenaRow) {
        if row.id.trim().is_empty() {
            self.error(row_no, Some("id"), "id is empty");
            return;
        }
        if let Err(reason) = check_id(&row.id) {
            self.error(row_no, Some("id"), reason);
            return;
        }
        if !self.ids.insert(row.id.clone()) {
            self.error(row_no, Some("id"), format!("duplicate id {:?}", row.id));
            return;
        }
        if all_empty(&row.response_a) && all_empty(&row.response_b) {
            let position = self.out.rows.len() + self.out.dropped.len();
            self.out.dropped.push((position, row));
            return;
        }
        if let Some(l) = row.label {
            self.out.label_counts[l.index()] += 1;
        }
        self.out.rows.push(row);
    }

    fn finish(self) -> Result<ParsedDataset, DatasetError> {
        if self.total_errors > 0 {
            let mut errors = self.errors;
            errors.sort_by_key(|(found, e)| (e.row, *found));
            return Err(DatasetError::Rows { errors: errors.into_iter().map(|(_, e)| e).collect(), total: self.total_errors });
        }
        if self.out.rows.is_empty() && self.out.dropped.is_empty() {
            return Err(DatasetError::Empty);
        }
        Ok(self.out)
    }
}

/// Length, characters and formula-injection rules for ids (see the module docs).
fn check_id(id: &str) -> Result<(), String> {
    if !chars_within(id, MAX_ID_CHARS) {
        return Err(format!("id is longer than {MAX_ID_CHARS} characters"));
    }
    if id.chars().any(char::is_control) {
        return Err("id contains a control character".into());
    }
    let first = id.chars().next().unwrap_or(' ');
    if "=+-@".contains(first) && id.parse::<f64>().map_or(true, |f| !f.is_finite()) {
        return Err(format!(
            "id {:?} starts with {first:?}: spreadsheets run such cells as formulas (CSV injection); \
             ids must not start with =, +, - or @ unless they are numbers",
            id.chars().take(40).collect::<String>()
        ));
    }
    Ok(())
}

fn all_empty(turns: &[String]) -> bool {
    turns.iter().all(|t| t.is_empty())
}

/// Turns of a prompt/response cell. See the module docs for the rules.
fn parse_turns(cell: &str) -> Result<Vec<String>, String> {
    let Some(inner) = cell.trim_start().strip_prefix('[') else {
        return Ok(vec![cell.to_string()]);
    };
    match serde_json::from_str::<Vec<Option<String>>>(cell) {
        Ok(turns) => Ok(turns.into_iter().map(Option::unwrap_or_default).collect()),
        Err(_) if json_line::is_json_list(cell) => Err("malformed JSON list: entries must be strings or null".to_string()),
        Err(e) if opens_a_list_of_turns(inner) => Err(format!("malformed JSON list: {e}")),
        // text that merely starts with a bracket (`[INST] ...`, `[1] see ...`)
        Err(_) => Ok(vec![cell.to_string()]),
    }
}

/// Whether the text after a cell's `[` starts the way a JSON list of turns, or a JSON list
/// at all, does: a string, `null`, the list's end, or a nested list or object.
fn opens_a_list_of_turns(inner: &str) -> bool {
    let rest = inner.trim_start();
    rest.starts_with(['"', ']', '[', '{'])
        || rest.strip_prefix("null").is_some_and(|r| {
            let r = r.trim_start();
            r.is_empty() || r.starts_with([',', ']'])
        })
}

/// A one-hot value: `0`, `1`, `0.0`, `1.0` (surrounding blanks allowed).
fn parse_one_hot(s: &str) -> Option<bool> {
    match s.trim() {
        "1" => Some(true),
        "0" => Some(false),
        t => match t.parse::<f64>() {
            Ok(1.0) => Some(true),
            Ok(0.0) => Some(false),
            _ => None,
        },
    }
}

fn label_from_one_hot(v: [bool; 3]) -> Result<Label, String> {
    let ones: Vec<usize> = (0..3).filter(|&i| v[i]).collect();
    match ones.as_slice() {
        [i] => Label::from_index(*i).ok_or_else(|| "label index out of range".to_string()),
        _ => Err(format!(
            "the one-hot label (winner_model_a, winner_model_b, winner_tie) = ({}, {}, {}) must have exactly one 1, found {}",
            v[0] as u8,
            v[1] as u8,
            v[2] as u8,
            ones.len()
        )),
    }
}

/// Empty lines starting at byte `at`, where the CSV reader starts a record: just after the
/// previous record's line break, or between the two bytes of a `\r\n` one.
fn empty_lines_from(bytes: &[u8], at: usize) -> usize {
    let mut rest = bytes.get(at..).unwrap_or_default();
    if at > 0 && bytes[at - 1] == b'\r' && rest.first() == Some(&b'\n') {
        rest = &rest[1..];
    }
    rest.iter().take_while(|b| matches!(b, b'\n' | b'\r')).filter(|&&b| b == b'\n').count()
}

/// Offset of the first byte that is not UTF-8, if any.
fn utf8_error_offset(bytes: &[u8]) -> Option<usize> {
    std::str::from_utf8(bytes).err().map(|e| e.valid_up_to())
}

/// Parse an arena CSV. Row numbers in errors count the header as row 1 (see module docs).
pub fn parse_csv(bytes: &[u8]) -> Result<ParsedDataset, DatasetError> {
    parse_csv_limited(bytes, &ParseLimits::default())
}

/// [`parse_csv`] within `limits`.
pub fn parse_csv_limited(bytes: &[u8], limits: &ParseLimits) -> Result<ParsedDataset, DatasetError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF".as_slice()).unwrap_or(bytes);
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(DatasetError::Empty);
    }
    let bad_utf8 = utf8_error_offset(bytes);
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(bytes);
    let header = reader
        .byte_headers()
        .map_err(|e| DatasetError::Unreadable { row: Some(1), reason: e.to_string() })?
        .clone();
    let mut names = Vec::with_capacity(header.len());
    for field in header.iter() {
        match std::str::from_utf8(field) {
            Ok(s) => names.push(s.trim().to_string()),
            Err(_) => return Err(DatasetError::NotUtf8 { byte_offset: bad_utf8.unwrap_or(0), row: None }),
        }
    }
    let col = |name: &str| names.iter().position(|n| n == name);
    let known = TEXT_COLUMNS.iter().chain(LABEL_COLUMNS.iter()).filter(|c| col(c).is_some()).count();
    if known == 0 {
        return Err(DatasetError::Unreadable {
            row: Some(1),
            reason: format!(
                "the first row is not an arena header (expected columns {}, {})",
                TEXT_COLUMNS.join(", "),
                LABEL_COLUMNS.join(", ")
            ),
        });
    }
    let label_present: Vec<bool> = LABEL_COLUMNS.iter().map(|c| col(c).is_some()).collect();
    let labelled = label_present.iter().any(|&p| p);
    let mut missing: Vec<String> = TEXT_COLUMNS.iter().filter(|c| col(c).is_none()).map(|c| c.to_string()).collect();
    if labelled {
        missing.extend(LABEL_COLUMNS.iter().filter(|c| col(c).is_none()).map(|c| c.to_string()));
    }
    if !missing.is_empty() {
        return Err(DatasetError::MissingColumns(missing));
    }
    // Every index below exists: the columns were checked above.
    let idx = |name: &str| col(name).unwrap_or(usize::MAX);
    let (i_id, i_p, i_a, i_b) = (idx("id"), idx("prompt"), idx("response_a"), idx("response_b"));
    let i_lab = [idx(LABEL_COLUMNS[0]), idx(LABEL_COLUMNS[1]), idx(LABEL_COLUMNS[2])];

    let mut c = Collector::new(labelled);
    let mut record = csv::ByteRecord::new();
    let mut row_no = 1;
    loop {
        let read = reader.read_byte_record(&mut record);
        // the reader skips empty lines, which a spreadsheet shows as rows: count those it passed
        // on the way to this record
        let at = match &read {
            Ok(true) => record.position(),
            Ok(false) => None,
            Err(e) => e.position(),
        };
        if let Some(at) = at.and_then(|p| usize::try_from(p.byte()).ok()) {
            row_no += empty_lines_from(bytes, at);
        }
        match read {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let row = Some(row_no + 1);
                let reason = match e.kind() {
                    csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
                        format!("the row has {len} fields, the header has {expected_len}")
                    }
                    _ => e.to_string(),
                };
                return Err(DatasetError::Unreadable { row, reason });
            }
        }
        row_no += 1;
        if row_no - 1 > limits.max_rows {
            return Err(DatasetError::TooManyRows { limit: limits.max_rows, row: row_no });
        }
        let mut fields: Vec<&str> = Vec::with_capacity(record.len());
        for field in record.iter() {
            match std::str::from_utf8(field) {
                Ok(s) => fields.push(s),
                Err(_) => return Err(DatasetError::NotUtf8 { byte_offset: bad_utf8.unwrap_or(0), row: Some(row_no) }),
            }
        }
        let get = |i: usize| fields.get(i).copied().unwrap_or("");
        for (i, name) in [(i_p, "prompt"), (i_a, "response_a"), (i_b, "response_b")] {
            if !chars_within(get(i), limits.max_text_chars) {
                return Err(DatasetError::TextTooLong { row: row_no, column: name.into(), limit: limits.max_text_chars });
            }
        }
        let mut ok = true;
        let mut text = |c: &mut Collector, i: usize, name: &str| match parse_turns(get(i)) {
            Ok(t) => t,
            Err(reason) => {
                c.error(row_no, Some(name), reason);
                ok = false;
                Vec::new()
            }
        };
        let prompt = text(&mut c, i_p, "prompt");
        let response_a = text(&mut c, i_a, "response_a");
        let response_b = text(&mut c, i_b, "response_b");
        let label = if labelled {
            let mut v = [false; 3];
            for k in 0..3 {
                match parse_one_hot(get(i_lab[k])) {
                    Some(b) => v[k] = b,
                    None => {
                        c.error(row_no, Some(LABEL_COLUMNS[k]), format!("expected 0 or 1, found {:?}", get(i_lab[k])));
                        ok = false;
                    }
                }
            }
            if ok {
                match label_from_one_hot(v) {
                    Ok(l) => Some(l),
                    Err(reason) => {
                        c.error(row_no, None, reason);
                        ok = false;
                        None
                    }
                }
            } else {
                None
            }
        } else {
            None
        };
        if ok {
            c.push(row_no, ArenaRow { id: get(i_id).trim().to_string(), prompt, response_a, response_b, label });
        }
    }
    c.finish()
}

/// Parse an arena JSONL file. Row numbers in errors are line numbers (see module docs).
pub fn parse_jsonl(bytes: &[u8]) -> Result<ParsedDataset, DatasetError> {
    parse_jsonl_limited(bytes, &ParseLimits::default())
}

/// [`parse_jsonl`] within `limits`.
pub fn parse_jsonl_limited(bytes: &[u8], limits: &ParseLimits) -> Result<ParsedDataset, DatasetError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF".as_slice()).unwrap_or(bytes);
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(DatasetError::Empty);
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let off = e.valid_up_to();
            let line = bytes[..off].iter().filter(|&&b| b == b'\n').count() + 1;
            return Err(DatasetError::NotUtf8 { byte_offset: off, row: Some(line) });
        }
    };
    // Two passes over the text, each line read in each: whether the file is labelled is known
    // only after every line, and keeping every line's fields until then would take a few times
    // the file's size in memory. A line is read into the fields a row uses and no more
    // (`json_line`).
    let read = |line: &str| json_line::read_line(line, limits.max_text_chars);
    let mut objects = Vec::new();
    let mut c = Collector::new(false);
    let mut data_rows = 0usize;
    let mut labelled = false;
    for (i, line) in text.lines().enumerate() {
        let row_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        data_rows += 1;
        if data_rows > limits.max_rows {
            return Err(DatasetError::TooManyRows { limit: limits.max_rows, row: row_no });
        }
        match read(line) {
            Ok(Line::Object(f)) => {
                labelled |= f.has_label();
                objects.push((row_no, line));
            }
            Ok(Line::NotObject) => c.error(row_no, None, "the line is not a JSON object"),
            Err(e) => c.error(row_no, None, format!("the line is not valid JSON: {e}")),
        }
    }
    c.out.labelled = labelled;
    for (row_no, line) in objects {
        let Ok(Line::Object(mut f)) = read(line) else { continue };
        let mut ok = true;
        let id = match &f.id {
            Some(Scalar::Str(s)) => s.trim().to_string(),
            Some(Scalar::Int(n)) => n.clone(),
            Some(_) => {
                c.error(row_no, Some("id"), "id must be a string or an integer");
                ok = false;
                String::new()
            }
            None => {
                c.error(row_no, Some("id"), "missing field");
                ok = false;
                String::new()
            }
        };
        let fields = [("prompt", f.prompt.take()), ("response_a", f.response_a.take()), ("response_b", f.response_b.take())];
        let mut texts: [Vec<String>; 3] = Default::default();
        for ((name, turns), text) in fields.into_iter().zip(&mut texts) {
            let too_long = DatasetError::TextTooLong { row: row_no, column: name.into(), limit: limits.max_text_chars };
            *text = match json_turns(turns) {
                Ok(Some(t)) => t,
                Ok(None) => return Err(too_long),
                Err(reason) => {
                    c.error(row_no, Some(name), reason);
                    ok = false;
                    Vec::new()
                }
            };
            let bytes: usize = text.iter().map(String::len).sum();
            let over = bytes > limits.max_text_chars
                && text.iter().map(|t| t.chars().count()).sum::<usize>() > limits.max_text_chars;
            if over {
                return Err(too_long);
            }
        }
        let [prompt, response_a, response_b] = texts;
        let label = if labelled {
            match json_label(&f) {
                Ok(l) => Some(l),
                Err((column, reason)) => {
                    c.error(row_no, column, reason);
                    ok = false;
                    None
                }
            }
        } else {
            None
        };
        if ok {
            c.push(row_no, ArenaRow { id, prompt, response_a, response_b, label });
        }
    }
    c.finish()
}

/// The turns of a JSONL field; `Ok(None)` when they are over the limit on characters.
fn json_turns(t: Option<Turns>) -> Result<Option<Vec<String>>, String> {
    match t {
        None => Err("missing field".into()),
        // a cell of the CSV carried over as a string (`"[\"hi\"]"`): read as the CSV reads it
        Some(Turns::Text(s)) => parse_turns(&s).map(Some),
        Some(Turns::Null) => Ok(Some(vec![String::new()])),
        Some(Turns::List(turns)) => Ok(Some(turns)),
        Some(Turns::TooLong) => Ok(None),
        Some(Turns::BadEntry) => Err("list entries must be strings or null".into()),
        Some(Turns::Other) => Err("must be a string or a list of strings".into()),
    }
}

fn json_one_hot(v: &Scalar) -> Option<bool> {
    match v {
        Scalar::Bool(b) => Some(*b),
        Scalar::Int(s) | Scalar::Str(s) => parse_one_hot(s),
        Scalar::Float(f) => parse_one_hot(&f.to_string()),
        _ => None,
    }
}

fn json_label(f: &Fields) -> Result<Label, (Option<&'static str>, String)> {
    if let Some(l) = &f.label {
        if f.one_hot.iter().any(Option::is_some) {
            return Err((Some("label"), "give either `label` or the one-hot fields, not both".into()));
        }
        let name = match l {
            Scalar::Str(s) => Some(s.as_str()),
            _ => None,
        };
        return match name.and_then(|s| LABEL_COLUMNS.iter().position(|c| *c == s)).and_then(Label::from_index) {
            Some(label) => Ok(label),
            None => Err((Some("label"), format!("expected \"winner_model_a\", \"winner_model_b\" or \"winner_tie\", found {l}"))),
        };
    }
    if !f.has_label() {
        return Err((None, "missing label (other rows have one)".into()));
    }
    let mut v = [false; 3];
    for (k, name) in LABEL_COLUMNS.iter().enumerate() {
        match &f.one_hot[k] {
            None => return Err((Some(name), "missing field".into())),
            Some(x) => match json_one_hot(x) {
                Some(b) => v[k] = b,
                None => return Err((Some(name), format!("expected 0 or 1, found {x}"))),
            },
        }
    }
    label_from_one_hot(v).map_err(|r| (None, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n";

    #[test]
    fn limits_stop_at_the_first_row_or_text_over_them() {
        let rows = |n: usize| {
            let mut s = HEADER.to_string();
            for i in 0..n {
                s.push_str(&format!("{i},m,m,q,a,b,1,0,0\n"));
            }
            s
        };
        let limits = ParseLimits { max_rows: 3, max_text_chars: 5 };
        assert_eq!(parse_csv_limited(rows(3).as_bytes(), &limits).unwrap().rows.len(), 3);
        assert_eq!(parse_csv_limited(rows(4).as_bytes(), &limits), Err(DatasetError::TooManyRows { limit: 3, row: 5 }));
        let long = format!("{HEADER}1,m,m,q,a,b,1,0,0\n2,m,m,q,a,\"bbbbbé\",1,0,0\n");
        assert_eq!(
            parse_csv_limited(long.as_bytes(), &limits),
            Err(DatasetError::TextTooLong { row: 3, column: "response_b".into(), limit: 5 })
        );
        // Five characters (six bytes) is within the limit.
        let ok = format!("{HEADER}1,m,m,q,a,\"bbbbé\",1,0,0\n");
        assert!(parse_csv_limited(ok.as_bytes(), &limits).is_ok());
        let jsonl = "{\"id\":1,\"prompt\":[\"abc\",\"def\"],\"response_a\":\"a\",\"response_b\":\"b\"}\n";
        assert_eq!(
            parse_jsonl_limited(jsonl.as_bytes(), &limits),
            Err(DatasetError::TextTooLong { row: 1, column: "prompt".into(), limit: 5 })
        );
        let two = "{\"id\":1,\"prompt\":\"p\",\"response_a\":\"a\",\"response_b\":\"b\"}\n".repeat(2);
        let one_row = ParseLimits { max_rows: 1, max_text_chars: 5 };
        assert_eq!(parse_jsonl_limited(two.as_bytes(), &one_row), Err(DatasetError::TooManyRows { limit: 1, row: 2 }));
    }

    #[test]
    fn formula_and_control_ids_are_row_errors() {
        for (id, ok) in [("=1+1", false), ("@A1", false), ("+x", false), ("-x", false), ("-12", true), ("+3.5", true), ("a=b", true), ("a\u{1}b", false)] {
            let csv = format!("{HEADER}\"{id}\",m,m,q,a,b,1,0,0\n");
            match parse_csv(csv.as_bytes()) {
                Ok(_) => assert!(ok, "{id:?} accepted"),
                Err(DatasetError::Rows { errors, .. }) => {
                    assert!(!ok, "{id:?} refused: {errors:?}");
                    assert_eq!((errors[0].row, errors[0].column.as_deref()), (2, Some("id")));
                }
                Err(e) => panic!("{id:?}: {e}"),
            }
        }
        let long = "x".repeat(MAX_ID_CHARS + 1);
        assert!(parse_csv(format!("{HEADER}{long},m,m,q,a,b,1,0,0\n").as_bytes()).is_err());
    }

    fn csv_of(rows: &[&str]) -> Vec<u8> {
        let mut s = HEADER.to_string();
        for r in rows {
            s.push_str(r);
            s.push('\n');
        }
        s.into_bytes()
    }

    fn rows_err(e: DatasetError) -> Vec<RowError> {
        match e {
            DatasetError::Rows { errors, .. } => errors,
            other => panic!("expected row errors, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_plain_row() {
        let b = csv_of(&[r#"1,m1,m2,"[""hi"",""and then?""]","[""a1"",""a2""]","[""b1"",""b2""]",0,1,0"#]);
        let p = parse_csv(&b).unwrap();
        assert!(p.labelled);
        assert_eq!(p.rows.len(), 1);
        let r = &p.rows[0];
        assert_eq!(r.id, "1");
        assert_eq!(r.prompt, vec!["hi", "and then?"]);
        assert_eq!(r.response_a, vec!["a1", "a2"]);
        assert_eq!(r.label, Some(Label::WinnerModelB));
        assert_eq!(p.label_counts, [0, 1, 0]);
    }

    #[test]
    fn escapes_quotes_and_unicode_survive() {
        // The cell holds a JSON list whose strings contain `","`, escaped quotes, brackets,
        // a backslash, a newline escape and \u escapes; the notebook's split mangles all of them.
        let cell = r#"["say \"hi\", then [stop]","a\",\"b","caf\u00e9 \ud83d\ude00 \\n","line1\nline2"]"#;
        let quoted = format!("\"{}\"", cell.replace('"', "\"\""));
        let row = format!("7,m1,m2,{quoted},\"[\"\"ok\"\"]\",\"[\"\"日本語 ✓\"\"]\",1,0,0");
        let p = parse_csv(&csv_of(&[&row])).unwrap();
        let r = &p.rows[0];
        assert_eq!(r.prompt, vec!["say \"hi\", then [stop]", "a\",\"b", "café 😀 \\n", "line1\nline2"]);
        assert_eq!(r.response_b, vec!["日本語 ✓"]);
    }

    #[test]
    fn raw_text_cell_is_one_turn_and_null_is_empty() {
        let b = csv_of(&[r#"1,m1,m2,just text,"[null,""x""]","[""y"",null]",0,0,1"#]);
        let r = &parse_csv(&b).unwrap().rows[0];
        assert_eq!(r.prompt, vec!["just text"]);
        assert_eq!(r.response_a, vec!["", "x"]);
        assert_eq!(r.response_b, vec!["y", ""]);
    }

    #[test]
    fn both_responses_empty_is_dropped() {
        let b = csv_of(&[
            r#"1,m1,m2,"[""p""]","[null]","[null]",0,0,1"#,
            r#"2,m1,m2,"[""p""]","[""""]","[]",1,0,0"#,
            r#"3,m1,m2,"[""p""]","[""a""]","[null]",1,0,0"#,
        ]);
        let p = parse_csv(&b).unwrap();
        assert_eq!(p.dropped_rows(), 2);
        assert_eq!(p.rows.len(), 1);
        assert_eq!(p.label_counts, [1, 0, 0]);
    }

    #[test]
    fn all_rows_keep_file_order_with_the_dropped_ones() {
        let b = csv_of(&[
            r#"1,m1,m2,"[""p""]","[null]","[null]",0,0,1"#,
            r#"2,m1,m2,"[""p""]","[""a""]","[null]",1,0,0"#,
            r#"3,m1,m2,"[""p""]","[""""]","[]",1,0,0"#,
            r#"4,m1,m2,"[""p""]","[""a""]","[""b""]",0,1,0"#,
            r#"5,m1,m2,"[""p""]","[null]","[""""]",0,1,0"#,
        ]);
        let p = parse_csv(&b).unwrap();
        assert_eq!(p.rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["2", "4"]);
        let all = p.into_all_rows();
        assert_eq!(all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["1", "2", "3", "4", "5"]);
    }

    #[test]
    fn float_one_hot_is_tolerated() {
        let b = csv_of(&[r#"1,m1,m2,"[""p""]","[""a""]","[""b""]",0.0,1.0,0.0"#]);
        assert_eq!(parse_csv(&b).unwrap().rows[0].label, Some(Label::WinnerModelB));
    }

    #[test]
    fn zero_and_two_ones_are_row_errors() {
        let b = csv_of(&[
            r#"1,m1,m2,"[""p""]","[""a""]","[""b""]",0,0,0"#,
            r#"2,m1,m2,"[""p""]","[""a""]","[""b""]",1,1,0"#,
            r#"3,m1,m2,"[""p""]","[""a""]","[""b""]",1,0,0"#,
            r#"4,m1,m2,"[""p""]","[""a""]","[""b""]",yes,0,0"#,
        ]);
        let errs = rows_err(parse_csv(&b).unwrap_err());
        assert_eq!(errs.len(), 3);
        assert_eq!(errs[0].row, 2);
        assert!(errs[0].reason.contains("found 0"), "{}", errs[0].reason);
        assert_eq!(errs[1].row, 3);
        assert!(errs[1].reason.contains("found 2"), "{}", errs[1].reason);
        assert_eq!((errs[2].row, errs[2].column.as_deref()), (5, Some("winner_model_a")));
    }

    #[test]
    fn malformed_json_list_is_a_row_error() {
        let b = csv_of(&[
            r#"1,m1,m2,"[""p""]","[""a""]","[""b""]",1,0,0"#,
            r#"2,m1,m2,"[""p""]","[""unterminated]","[""b""]",1,0,0"#,
            r#"3,m1,m2,"[1, 2]","[""a""]","[""b""]",1,0,0"#,
        ]);
        let errs = rows_err(parse_csv(&b).unwrap_err());
        assert_eq!(errs.len(), 2);
        assert_eq!((errs[0].row, errs[0].column.as_deref()), (3, Some("response_a")));
        assert!(errs[0].reason.starts_with("malformed JSON list"));
        assert_eq!((errs[1].row, errs[1].column.as_deref()), (4, Some("prompt")));
        assert!(errs[1].reason.starts_with("malformed JSON list"));
    }

    #[test]
    fn duplicate_and_empty_ids_are_row_errors() {
        let b = csv_of(&[
            r#"1,m1,m2,"[""p""]","[""a""]","[""b""]",1,0,0"#,
            r#"1,m1,m2,"[""p""]","[""a""]","[""b""]",1,0,0"#,
            r#",m1,m2,"[""p""]","[""a""]","[""b""]",1,0,0"#,
        ]);
        let errs = rows_err(parse_csv(&b).unwrap_err());
        assert_eq!(errs.len(), 2);
        assert_eq!((errs[0].row, errs[0].column.as_deref()), (3, Some("id")));
        assert!(errs[0].reason.contains("duplicate"));
        assert_eq!((errs[1].row, errs[1].column.as_deref()), (4, Some("id")));
    }

    #[test]
    fn only_the_first_errors_are_kept() {
        let rows: Vec<String> = (0..50).map(|i| format!(r#"{i},m1,m2,p,a,b,1,1,1"#)).collect();
        let refs: Vec<&str> = rows.iter().map(String::as_str).collect();
        match parse_csv(&csv_of(&refs)).unwrap_err() {
            DatasetError::Rows { errors, total } => {
                assert_eq!(errors.len(), MAX_ROW_ERRORS);
                assert_eq!(total, 50);
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn empty_input() {
        assert_eq!(parse_csv(b""), Err(DatasetError::Empty));
        assert_eq!(parse_csv(b"  \n"), Err(DatasetError::Empty));
        assert_eq!(parse_csv(HEADER.as_bytes()), Err(DatasetError::Empty));
        assert_eq!(parse_jsonl(b"\n\n"), Err(DatasetError::Empty));
    }

    #[test]
    fn non_utf8_reports_offset_and_row() {
        let mut b = csv_of(&[r#"1,m1,m2,p,a,b,1,0,0"#]);
        let off = b.len() + 9;
        b.extend_from_slice(b"2,m1,m2,p\xff,a,b,1,0,0\n");
        assert_eq!(parse_csv(&b), Err(DatasetError::NotUtf8 { byte_offset: off, row: Some(3) }));
        let j = b"{\"id\":1}\n{\"id\":\"\xc3\x28\"}\n";
        assert_eq!(parse_jsonl(j), Err(DatasetError::NotUtf8 { byte_offset: 16, row: Some(2) }));
    }

    #[test]
    fn not_csv() {
        // Binary-ish or JSON content has no arena header.
        assert!(matches!(parse_csv(b"{\"id\": 1, \"prompt\": \"x\"}\n"), Err(DatasetError::Unreadable { .. })));
        // Ragged rows.
        let b = csv_of(&[r#"1,m1,m2,p,a,b,1,0,0"#, r#"2,m1,m2,p,a"#]);
        assert_eq!(
            parse_csv(&b),
            Err(DatasetError::Unreadable { row: Some(3), reason: "the row has 5 fields, the header has 9".into() })
        );
    }

    #[test]
    fn missing_columns() {
        let b = b"id,prompt,response_a,winner_model_a,winner_tie\n1,p,a,1,0\n";
        assert_eq!(
            parse_csv(b),
            Err(DatasetError::MissingColumns(vec!["response_b".into(), "winner_model_b".into()]))
        );
    }

    #[test]
    fn test_layout_is_unlabelled() {
        let b = b"id,prompt,response_a,response_b\n1,\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\"\n";
        let p = parse_csv(b).unwrap();
        assert!(!p.labelled);
        assert_eq!(p.rows[0].label, None);
        assert_eq!(p.label_counts, [0, 0, 0]);
    }

    #[test]
    fn jsonl_both_label_styles_and_strings() {
        let j = concat!(
            r#"{"id": 1, "prompt": ["p1", null], "response_a": "a", "response_b": ["b"], "winner_model_a": 0, "winner_model_b": 0, "winner_tie": 1}"#,
            "\n\n",
            r#"{"id": "x", "prompt": "[not a list", "response_a": "a", "response_b": "b", "label": "winner_model_a"}"#,
            "\n"
        );
        let p = parse_jsonl(j.as_bytes()).unwrap();
        assert!(p.labelled);
        assert_eq!(p.rows[0].prompt, vec!["p1", ""]);
        assert_eq!(p.rows[0].label, Some(Label::WinnerTie));
        assert_eq!(p.rows[1].prompt, vec!["[not a list"]);
        assert_eq!(p.rows[1].label, Some(Label::WinnerModelA));
        assert_eq!(p.label_counts, [1, 0, 1]);
    }

    #[test]
    fn jsonl_strings_holding_json_lists_read_as_csv_cells() {
        // what a CSV converted line by line (pandas' to_json with lines=True) looks like
        let j = concat!(
            r#"{"id": "1", "prompt": "[\"hi\",\"more \\\"quoted\\\"\"]", "response_a": "[\"a\", null]", "response_b": "b", "winner_model_a": 1, "winner_model_b": 0, "winner_tie": 0}"#,
            "\n",
            r#"{"id": "2", "prompt": "[\"p\"]", "response_a": "[null]", "response_b": "[null]", "winner_model_a": 0, "winner_model_b": 0, "winner_tie": 1}"#,
            "\n",
        );
        let p = parse_jsonl(j.as_bytes()).unwrap();
        assert_eq!(p.rows.len(), 1);
        assert_eq!(p.rows[0].prompt, vec!["hi", "more \"quoted\""]);
        assert_eq!(p.rows[0].response_a, vec!["a", ""]);
        assert_eq!(p.dropped_rows(), 1, "both responses null, as in the CSV");
        let bad = r#"{"id": "1", "prompt": "[\"unterminated]", "response_a": "a", "response_b": "b", "label": "winner_tie"}"#;
        let errs = rows_err(parse_jsonl(bad.as_bytes()).unwrap_err());
        assert_eq!((errs[0].row, errs[0].column.as_deref()), (1, Some("prompt")));
        assert!(errs[0].reason.starts_with("malformed JSON list"));
    }

    #[test]
    fn text_that_only_starts_with_a_bracket_is_one_turn() {
        let b = csv_of(&[r#"1,m1,m2,[INST] hi,"[1] see above","[ null is a word]",1,0,0"#, r#"2,m1,m2,"[nothing]",a,b,1,0,0"#]);
        let p = parse_csv(&b).unwrap();
        assert_eq!(p.rows[0].prompt, vec!["[INST] hi"]);
        assert_eq!(p.rows[0].response_a, vec!["[1] see above"]);
        assert_eq!(p.rows[0].response_b, vec!["[ null is a word]"]);
        assert_eq!(p.rows[1].prompt, vec!["[nothing]"]);
        // `[]x` starts as an empty list does: a broken list, not text
        let errs = rows_err(parse_csv(&csv_of(&[r#"1,m1,m2,p,a,"[]x",1,0,0"#])).unwrap_err());
        assert_eq!(errs[0].column.as_deref(), Some("response_b"));
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let j = concat!(
            r#"{"id": 1, "prompt": "p", "response_a": "a", "response_b": "b", "label": "winner_model_b"}"#,
            "\n",
            "not json\n",
            r#"{"id": 1, "prompt": "p", "response_a": "a", "response_b": "b", "label": "winner_model_b"}"#,
            "\n",
            r#"{"id": 3, "prompt": "p", "response_a": "a", "response_b": "b"}"#,
            "\n",
            r#"{"id": 4, "prompt": "p", "response_a": "a", "response_b": "b", "winner_model_a": 1, "winner_model_b": 1, "winner_tie": 0}"#,
            "\n",
        );
        let errs = rows_err(parse_jsonl(j.as_bytes()).unwrap_err());
        let rows: Vec<usize> = errs.iter().map(|e| e.row).collect();
        assert_eq!(rows, vec![2, 3, 4, 5]);
        assert!(errs[1].reason.contains("duplicate"));
    }

    #[test]
    fn csv_row_numbers_count_empty_lines_as_a_spreadsheet_shows_them() {
        // row 1 the header, row 2 empty, row 3 a good row, row 4 a good row whose quoted cell
        // spans two lines, rows 5-6 empty, row 7 a bad one-hot
        for eol in ["\n", "\r\n"] {
            let csv = [
                HEADER.trim_end(),
                "",
                "1,m,m,q,a,b,1,0,0",
                "2,m,m,\"two",
                "lines\",a,b,0,1,0",
                "",
                "",
                "3,m,m,q,a,b,1,1,0",
                "",
            ]
            .join(eol);
            let errs = rows_err(parse_csv(csv.as_bytes()).unwrap_err());
            assert_eq!(errs.iter().map(|e| e.row).collect::<Vec<_>>(), vec![7], "{eol:?}: {errs:?}");
            // an unreadable row after empty lines: its number too
            let ragged = [HEADER.trim_end(), "", "", "1,m,m,q,a,b,1,0"].join(eol);
            match parse_csv(ragged.as_bytes()).unwrap_err() {
                DatasetError::Unreadable { row, .. } => assert_eq!(row, Some(4), "{eol:?}"),
                e => panic!("{e:?}"),
            }
        }
    }

    #[test]
    fn jsonl_errors_are_listed_by_line_whichever_pass_finds_them() {
        let bad_label = r#"{"id": "1", "prompt": "p", "response_a": "a", "response_b": "b", "label": "nope"}"#;
        let mut lines = vec![bad_label.to_string()];
        lines.extend((0..MAX_ROW_ERRORS + 5).map(|_| "oops".to_string()));
        let errs = rows_err(parse_jsonl(lines.join("\n").as_bytes()).unwrap_err());
        assert_eq!(errs.len(), MAX_ROW_ERRORS);
        assert_eq!(errs[0].row, 1, "the field error of line 1 comes first: {errs:?}");
        assert_eq!(errs[0].column.as_deref(), Some("label"));
        assert!(errs.windows(2).all(|w| w[0].row < w[1].row));
        assert_eq!(errs.last().unwrap().row, MAX_ROW_ERRORS);
    }

    #[test]
    fn jsonl_unlabelled() {
        let j = r#"{"id": 1, "prompt": "p", "response_a": "a", "response_b": "b"}"#;
        let p = parse_jsonl(j.as_bytes()).unwrap();
        assert!(!p.labelled);
        assert_eq!(p.rows[0].label, None);
    }

    /// Counts computed independently with Python's `csv` and `json` modules:
    /// 999 data rows, 1 dropped (`[null]` on both sides), 998 kept, labels 352 / 352 / 294.
    #[test]
    fn real_sample_counts() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/arena-sample.csv");
        let Ok(bytes) = std::fs::read(path) else {
            println!("skipped: {path} is absent");
            return;
        };
        let p = parse_csv(&bytes).unwrap();
        assert!(p.labelled);
        assert_eq!(p.rows.len(), 998);
        assert_eq!(p.dropped_rows(), 1);
        assert_eq!(p.label_counts, [352, 352, 294]);
        assert_eq!(p.rows[0].id, "30192");
        assert_eq!(p.rows[0].prompt.len(), 2);
        assert!(p.rows.iter().all(|r| r.id != "57180984"));
    }
}
