//! The arena dataset parsers (CSV and JSON lines) on arbitrary bytes: no panic, and what they
//! accept respects the limits they were given.
#![no_main]

use arbiter::data::arena::{parse_csv_limited, parse_jsonl_limited, ParseLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = ParseLimits { max_rows: 64, max_text_chars: 256 };
    for parsed in [parse_csv_limited(data, &limits), parse_jsonl_limited(data, &limits)] {
        let Ok(d) = parsed else { continue };
        assert!(d.rows.len() + d.dropped_rows() <= limits.max_rows);
        if d.labelled {
            assert_eq!(d.label_counts.iter().sum::<usize>(), d.rows.len());
        }
        for r in &d.rows {
            assert!(!r.id.trim().is_empty());
            for text in [&r.prompt, &r.response_a, &r.response_b] {
                assert!(text.iter().map(|t| t.chars().count()).sum::<usize>() <= limits.max_text_chars);
            }
        }
    }
});
