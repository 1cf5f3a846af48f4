//! The arena prompt template and balanced truncation.
//!
//! The template is the reference notebook's, byte for byte (note the space in `Model A :`):
//! `"User prompt: {prompt}\n\nModel A :\n{response_a}\n\n--------\n\nModel B:\n{response_b}"`.
//! Multi-turn rows join their turns with `"\n\n"` (turn 1, blank line, turn 2...), separately
//! for the prompt and each response.
//!
//! # Truncation
//! A row that fits in `max_length` tokens is the plain tokenization of the whole template
//! string (what the notebook feeds the model). A row that does not fit is tokenized in pieces —
//! the three fixed template pieces and the three texts — and the budget left after the BOS
//! token and the fixed pieces is shared between prompt, response A and response B by
//! water-filling: parts are served shortest first, each gets at most an equal share of what is
//! left, and what a short part does not use goes to the longer ones. Each text keeps its
//! beginning (it is cut at the end). The template pieces are always kept whole when they fit, so
//! the model always sees both `Model A` and `Model B` headers and some of response B whenever the
//! budget allows any text at all. (Plain right truncation, as in the notebook, silently drops
//! response B on long rows.)

use super::ArenaRow;

/// The fixed pieces of the template, around the prompt, response A and response B.
pub const TEMPLATE_PIECES: [&str; 3] = ["User prompt: ", "\n\nModel A :\n", "\n\n--------\n\nModel B:\n"];

/// Separator between the turns of a multi-turn prompt or response.
pub const TURN_SEPARATOR: &str = "\n\n";

/// Token ids of one encoded row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Whether any text was cut to fit `max_length`.
    pub truncated: bool,
}

/// The three texts of a row: prompt, response A, response B, turns joined.
pub fn texts(row: &ArenaRow) -> [String; 3] {
    [row.prompt.join(TURN_SEPARATOR), row.response_a.join(TURN_SEPARATOR), row.response_b.join(TURN_SEPARATOR)]
}

/// The whole template string of a row (no truncation).
pub fn render(row: &ArenaRow) -> String {
    let [p, a, b] = texts(row);
    format!("{}{p}{}{a}{}{b}", TEMPLATE_PIECES[0], TEMPLATE_PIECES[1], TEMPLATE_PIECES[2])
}

/// Water-filling share of `budget` tokens between parts of the given lengths: every part gets
/// `min(len, fair share)`, shortest parts first, leftovers passed on. The result never exceeds a
/// part's length, sums to `min(budget, total)`, and gives each part at least
/// `min(len, budget / lengths.len())`.
pub fn balanced_shares(lengths: &[usize], budget: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let mut shares = vec![0; lengths.len()];
    let mut left = budget;
    for (k, &i) in order.iter().enumerate() {
        let parts_left = lengths.len() - k;
        // the last part takes whatever is left (including division remainders)
        let fair = if parts_left == 1 { left } else { left / parts_left };
        let give = lengths[i].min(fair);
        shares[i] = give;
        left -= give;
    }
    shares
}

/// Encode a row with the template into at most `max_length` tokens, `bos` first when given
/// (it counts toward `max_length`). `tokenize` must add no special tokens of its own.
pub fn encode_pair<F: Fn(&str) -> Vec<u32>>(row: &ArenaRow, max_length: usize, tokenize: F, bos: Option<u32>) -> Encoded {
    let n_bos = usize::from(bos.is_some());
    let mut ids: Vec<u32> = bos.into_iter().collect();
    let whole = tokenize(&render(row));
    if n_bos + whole.len() <= max_length {
        ids.extend(whole);
        return Encoded { ids, truncated: false };
    }
    let pieces: Vec<Vec<u32>> = TEMPLATE_PIECES.iter().map(|p| tokenize(p)).collect();
    let parts: Vec<Vec<u32>> = texts(row).iter().map(|t| tokenize(t)).collect();
    let fixed: usize = n_bos + pieces.iter().map(Vec::len).sum::<usize>();
    let lengths: Vec<usize> = parts.iter().map(Vec::len).collect();
    let budget = max_length.saturating_sub(fixed);
    let shares = balanced_shares(&lengths, budget);
    let truncated = shares.iter().zip(&lengths).any(|(s, l)| s < l) || fixed > max_length;
    for (piece, (part, &share)) in pieces.iter().zip(parts.iter().zip(&shares)) {
        ids.extend_from_slice(piece);
        ids.extend_from_slice(&part[..share]);
    }
    // Only when even the fixed pieces do not fit (a tiny max_length): plain cut.
    ids.truncate(max_length);
    Encoded { ids, truncated }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// One token per char: additive over any split of the string.
    fn chars(s: &str) -> Vec<u32> {
        s.chars().map(u32::from).collect()
    }

    fn row(p: &[&str], a: &[&str], b: &[&str]) -> ArenaRow {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        ArenaRow { id: "1".into(), prompt: v(p), response_a: v(a), response_b: v(b), label: None }
    }

    fn random_text(rng: &mut ChaCha8Rng, max: usize) -> String {
        let n = rng.random_range(0..=max);
        (0..n).map(|_| ['a', 'b', ' ', '\n', 'é', '😀'][rng.random_range(0..6)]).collect()
    }

    #[test]
    fn template_is_the_notebooks() {
        let r = row(&["hi", "more"], &["A"], &["B1", "B2"]);
        assert_eq!(render(&r), "User prompt: hi\n\nmore\n\nModel A :\nA\n\n--------\n\nModel B:\nB1\n\nB2");
    }

    #[test]
    fn short_row_is_plain_tokenization_with_bos() {
        let r = row(&["hi"], &["A"], &["B"]);
        let e = encode_pair(&r, 1000, chars, Some(1));
        assert!(!e.truncated);
        assert_eq!(e.ids[0], 1);
        assert_eq!(&e.ids[1..], chars(&render(&r)).as_slice());
    }

    #[test]
    fn long_response_a_does_not_drop_b() {
        let long = "x".repeat(5000);
        let r = row(&["prompt"], &[&long], &["short b"]);
        let e = encode_pair(&r, 200, chars, None);
        assert!(e.truncated);
        assert_eq!(e.ids.len(), 200);
        let s: String = e.ids.iter().filter_map(|&c| char::from_u32(c)).collect();
        assert!(s.starts_with("User prompt: prompt\n\nModel A :\nxxx"));
        assert!(s.ends_with("\n\n--------\n\nModel B:\nshort b"), "{s}");
    }

    #[test]
    fn shares_water_fill() {
        assert_eq!(balanced_shares(&[10, 100, 100], 90), vec![10, 40, 40]);
        assert_eq!(balanced_shares(&[100, 100, 100], 91), vec![30, 30, 31]);
        assert_eq!(balanced_shares(&[5, 6, 7], 100), vec![5, 6, 7]);
        assert_eq!(balanced_shares(&[0, 0, 50], 10), vec![0, 0, 10]);
        assert_eq!(balanced_shares(&[3, 100, 1], 0), vec![0, 0, 0]);
    }

    #[test]
    fn tiny_max_length_never_overflows() {
        let r = row(&["p"], &["a"], &["b"]);
        for max in 0..40 {
            let e = encode_pair(&r, max, chars, Some(7));
            assert!(e.ids.len() <= max);
        }
    }

    #[test]
    fn property_random_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        for _ in 0..2000 {
            let turns = rng.random_range(1..=3);
            let mk = |rng: &mut ChaCha8Rng| (0..turns).map(|_| random_text(rng, 120)).collect::<Vec<_>>();
            let r = ArenaRow { id: "r".into(), prompt: mk(&mut rng), response_a: mk(&mut rng), response_b: mk(&mut rng), label: None };
            let max = rng.random_range(0..400);
            let bos = if rng.random_bool(0.5) { Some(0) } else { None };
            let e = encode_pair(&r, max, chars, bos);
            // 1. never longer than max_length
            assert!(e.ids.len() <= max);
            let n_bos = usize::from(bos.is_some());
            let full = chars(&render(&r));
            if n_bos + full.len() <= max {
                // 2. untruncated rows are the plain tokenization of the whole template
                assert!(!e.truncated);
                assert_eq!(&e.ids[n_bos..], full.as_slice());
                continue;
            }
            assert!(e.truncated);
            let fixed = n_bos + TEMPLATE_PIECES.iter().map(|p| p.chars().count()).sum::<usize>();
            if fixed > max {
                continue;
            }
            // 3. every part gets at least min(its length, a third of the budget), the whole
            //    budget is used, and each part is a prefix of its text
            let budget = max - fixed;
            assert_eq!(e.ids.len(), max);
            let s: String = e.ids[n_bos..].iter().filter_map(|&c| char::from_u32(c)).collect();
            let rest = s.strip_prefix(TEMPLATE_PIECES[0]).unwrap();
            let [p, a, b] = texts(&r);
            let (pp, rest) = split_once_prefix(rest, &p, TEMPLATE_PIECES[1]);
            let (pa, pb) = split_once_prefix(rest, &a, TEMPLATE_PIECES[2]);
            for (kept, text) in [(pp, &p), (pa, &a), (pb.to_string(), &b)] {
                assert!(text.starts_with(&kept));
                let (kept_n, len) = (kept.chars().count(), text.chars().count());
                assert!(kept_n >= len.min(budget / 3), "kept {kept_n} of {len}, budget {budget}");
            }
        }
    }

    /// Split `s` into (the longest prefix of `text` followed by `sep`, what comes after `sep`).
    fn split_once_prefix<'a>(s: &'a str, text: &str, sep: &str) -> (String, &'a str) {
        let mut best = None;
        for (i, _) in s.char_indices().chain(std::iter::once((s.len(), ' '))) {
            if text.starts_with(&s[..i]) && s[i..].starts_with(sep) {
                best = Some(i);
            }
        }
        let i = best.expect("the separator follows a prefix of the text");
        (s[..i].to_string(), &s[i + sep.len()..])
    }
}
