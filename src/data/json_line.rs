//! One JSONL line read into only what an arena row uses. Unknown fields, lists and objects
//! where a scalar belongs, and the rest of a list of turns once it is known to be wrong or too
//! long, are skipped as they are read, never built in memory: a line of hundreds of megabytes
//! (a list of numbers in an unknown field, say) costs little beyond its text, where a
//! `serde_json::Value` takes many times its size.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A field that should hold a scalar (id, label, one-hot value).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Scalar {
    Str(String),
    /// An integer, as JSON writes it.
    Int(String),
    Float(f64),
    Bool(bool),
    Null,
    /// A list, not kept.
    List,
    /// An object, not kept.
    Object,
}

impl fmt::Display for Scalar {
    /// As JSON writes it; lists and objects by their kind.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Str(s) => write!(f, "{}", serde_json::Value::String(s.clone())),
            Scalar::Int(s) => f.write_str(s),
            Scalar::Float(x) => match serde_json::Number::from_f64(*x) {
                Some(n) => write!(f, "{n}"),
                None => write!(f, "{x}"),
            },
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Null => f.write_str("null"),
            Scalar::List => f.write_str("a list"),
            Scalar::Object => f.write_str("an object"),
        }
    }
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

impl<'de> de::Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, s: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(s))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Scalar, E> {
                Ok(Scalar::Int(n.to_string()))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(n.to_string()))
            }
            fn visit_f64<E>(self, x: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(x))
            }
            fn visit_bool<E>(self, b: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(b))
            }
            fn visit_unit<E>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar, A::Error> {
                skip_seq(seq).map(|()| Scalar::List)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar, A::Error> {
                skip_map(map).map(|()| Scalar::Object)
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether `text` is a JSON list (of anything).
pub(super) fn is_json_list(text: &str) -> bool {
    matches!(serde_json::from_str::<Scalar>(text), Ok(Scalar::List))
}

/// A prompt or response field.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Turns {
    /// A string: read as a CSV cell is.
    Text(String),
    Null,
    /// A list of strings and nulls (as empty strings).
    List(Vec<String>),
    /// A list with an entry that is neither a string nor null.
    BadEntry,
    /// A list whose turns have more characters together than the limit (each turn counts at
    /// least one, so that a list of millions of empty strings is too long as well).
    TooLong,
    /// Neither a string nor a list.
    Other,
}

/// Reads a [`Turns`], keeping at most `max_chars` characters of a list.
struct TurnsSeed {
    max_chars: usize,
}

/// One entry of a list of turns.
enum Entry {
    Turn(String),
    Bad,
}

impl<'de> de::Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Entry, D::Error> {
        Ok(match Scalar::deserialize(d)? {
            Scalar::Str(s) => Entry::Turn(s),
            Scalar::Null => Entry::Turn(String::new()),
            _ => Entry::Bad,
        })
    }
}

impl<'de> DeserializeSeed<'de> for TurnsSeed {
    type Value = Turns;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Turns, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TurnsSeed {
    type Value = Turns;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, s: &str) -> Result<Turns, E> {
        Ok(Turns::Text(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<Turns, E> {
        Ok(Turns::Text(s))
    }
    fn visit_unit<E>(self) -> Result<Turns, E> {
        Ok(Turns::Null)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Turns, E> {
        Ok(Turns::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Turns, E> {
        Ok(Turns::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Turns, E> {
        Ok(Turns::Other)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Turns, E> {
        Ok(Turns::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Turns, A::Error> {
        skip_map(map).map(|()| Turns::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Turns, A::Error> {
        let mut turns = Vec::new();
        let mut chars = 0usize;
        while let Some(entry) = seq.next_element::<Entry>()? {
            let Entry::Turn(t) = entry else {
                return skip_seq(seq).map(|()| Turns::BadEntry);
            };
            chars = chars.saturating_add(t.chars().count().max(1));
            if chars > self.max_chars {
                return skip_seq(seq).map(|()| Turns::TooLong);
            }
            turns.push(t);
        }
        Ok(Turns::List(turns))
    }
}

/// The fields of one line that an arena row uses; `None` where the line lacks the field (a
/// field given twice keeps its last value, as `serde_json` maps do).
#[derive(Debug, Default)]
pub(super) struct Fields {
    pub id: Option<Scalar>,
    pub prompt: Option<Turns>,
    pub response_a: Option<Turns>,
    pub response_b: Option<Turns>,
    pub label: Option<Scalar>,
    /// `winner_model_a`, `winner_model_b`, `winner_tie`.
    pub one_hot: [Option<Scalar>; 3],
}

impl Fields {
    /// Whether the line gives a label in either form (a `null` one too).
    pub fn has_label(&self) -> bool {
        self.label.is_some() || self.one_hot.iter().any(Option::is_some)
    }
}

/// A line: an object's fields, or something else.
#[derive(Debug)]
pub(super) enum Line {
    Object(Fields),
    NotObject,
}

enum Key {
    Id,
    Turns(usize),
    Label,
    OneHot(usize),
    Other,
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, s: &str) -> Result<Key, E> {
                Ok(match s {
                    "id" => Key::Id,
                    "prompt" => Key::Turns(0),
                    "response_a" => Key::Turns(1),
                    "response_b" => Key::Turns(2),
                    "label" => Key::Label,
                    "winner_model_a" => Key::OneHot(0),
                    "winner_model_b" => Key::OneHot(1),
                    "winner_tie" => Key::OneHot(2),
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

struct LineVisitor {
    max_text_chars: usize,
}

impl<'de> Visitor<'de> for LineVisitor {
    type Value = Line;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Line, A::Error> {
        let mut f = Fields::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Id => f.id = Some(map.next_value()?),
                Key::Turns(i) => {
                    let turns = Some(map.next_value_seed(TurnsSeed { max_chars: self.max_text_chars })?);
                    *[&mut f.prompt, &mut f.response_a, &mut f.response_b][i] = turns;
                }
                Key::Label => f.label = Some(map.next_value()?),
                Key::OneHot(i) => f.one_hot[i] = Some(map.next_value()?),
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Line::Object(f))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Line, A::Error> {
        skip_seq(seq).map(|()| Line::NotObject)
    }
    fn visit_str<E>(self, _: &str) -> Result<Line, E> {
        Ok(Line::NotObject)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Line, E> {
        Ok(Line::NotObject)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Line, E> {
        Ok(Line::NotObject)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Line, E> {
        Ok(Line::NotObject)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Line, E> {
        Ok(Line::NotObject)
    }
    fn visit_unit<E>(self) -> Result<Line, E> {
        Ok(Line::NotObject)
    }
}

/// Reads one JSONL line, keeping at most `max_text_chars` characters of a list of turns.
pub(super) fn read_line(line: &str, max_text_chars: usize) -> Result<Line, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(line);
    let parsed = de.deserialize_any(LineVisitor { max_text_chars })?;
    de.end()?;
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(line: &str) -> Fields {
        match read_line(line, 10).unwrap() {
            Line::Object(f) => f,
            Line::NotObject => panic!("not an object: {line}"),
        }
    }

    #[test]
    fn known_fields_are_read_and_the_rest_skipped() {
        let f = fields(
            r#"{"id": 7, "extra": [1, [2, {"x": 3}]], "prompt": ["hi", null], "response_a": "[\"a\"]",
                "response_b": null, "winner_model_a": 1.0, "winner_tie": "0", "label": {"a": 1}}"#,
        );
        assert_eq!(f.id, Some(Scalar::Int("7".into())));
        assert_eq!(f.prompt, Some(Turns::List(vec!["hi".into(), String::new()])));
        assert_eq!(f.response_a, Some(Turns::Text("[\"a\"]".into())));
        assert_eq!(f.response_b, Some(Turns::Null));
        assert_eq!(f.one_hot, [Some(Scalar::Float(1.0)), None, Some(Scalar::Str("0".into()))]);
        assert_eq!(f.label, Some(Scalar::Object));
        assert!(f.has_label());
    }

    #[test]
    fn wrong_or_long_lists_of_turns_are_named_not_kept() {
        assert_eq!(fields(r#"{"prompt": ["a", 1, "b"]}"#).prompt, Some(Turns::BadEntry));
        assert_eq!(fields(r#"{"prompt": ["12345", "678901"]}"#).prompt, Some(Turns::TooLong));
        assert_eq!(fields(r#"{"prompt": ["12345", "67890"]}"#).prompt.map(|t| matches!(t, Turns::List(_))), Some(true));
        let empties = format!("[{}\"\"]", "\"\",".repeat(10));
        assert_eq!(fields(&format!(r#"{{"prompt": {empties}}}"#)).prompt, Some(Turns::TooLong));
        assert_eq!(fields(r#"{"prompt": 3, "response_a": {"x": []}}"#).prompt, Some(Turns::Other));
        // a field given twice keeps its last value
        assert_eq!(fields(r#"{"id": "a", "id": "b"}"#).id, Some(Scalar::Str("b".into())));
    }

    #[test]
    fn lines_that_are_not_objects_or_not_json() {
        for line in ["[1, 2]", "\"x\"", "3", "null", "true"] {
            assert!(matches!(read_line(line, 10), Ok(Line::NotObject)), "{line}");
        }
        for line in ["{\"id\": 1", "{\"id\": 1} x", "{id: 1}", "[1, 2"] {
            assert!(read_line(line, 10).is_err(), "{line}");
        }
        assert!(is_json_list("[1, {\"a\": []}]") && !is_json_list("[1,") && !is_json_list("\"[1]\""));
    }

    #[test]
    fn scalars_print_as_json_does() {
        let shown: Vec<String> = [
            Scalar::Str("a\"b".into()),
            Scalar::Int("-3".into()),
            Scalar::Float(2.0),
            Scalar::Float(0.5),
            Scalar::Bool(true),
            Scalar::Null,
            Scalar::List,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(shown, ["\"a\\\"b\"", "-3", "2.0", "0.5", "true", "null", "a list"]);
    }
}
