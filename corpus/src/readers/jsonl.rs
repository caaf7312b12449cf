//! JSONL reader: one JSON object per line, either `{"question": …, "answer": …}` or
//! `{"turns": ["…", "…", …]}` (consecutive turns become pairs). Blank lines are skipped;
//! other keys are ignored.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::Value;

use crate::error::{BadRecord, IoContext, Location};
use crate::readers::skip_bom;
use crate::record::{emit_turn_pairs, Event, RawPair, Sink, Split};
use crate::Result;

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What one line holds, or why it is unusable (message, JSON path).
enum LineContent {
    Pair(String, String),
    Turns(Vec<String>),
}

fn parse_line(line: &str) -> Result<LineContent, (String, Option<u64>, Option<String>)> {
    let value: Value = serde_json::from_str(line).map_err(|e| {
        (
            format!("invalid JSON: {}", crate::readers::json_error_message(&e)),
            Some(e.column() as u64),
            None,
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err((format!("expected a JSON object, found {}", type_name(&value)), None, None));
    };
    let is_pair = obj.contains_key("question") || obj.contains_key("answer");
    let mut string_field = |key: &str| match obj.remove(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err((
            format!("must be a string, found {}", type_name(&other)),
            None,
            Some(key.to_string()),
        )),
        None => Err(("is missing".to_string(), None, Some(key.to_string()))),
    };
    if is_pair {
        let question = string_field("question")?;
        let answer = string_field("answer")?;
        return Ok(LineContent::Pair(question, answer));
    }
    match obj.remove("turns") {
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s),
                other => Err((
                    format!("must be a string, found {}", type_name(&other)),
                    None,
                    Some(format!("turns[{i}]")),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(LineContent::Turns),
        Some(other) => Err((
            format!("must be an array of strings, found {}", type_name(&other)),
            None,
            Some("turns".into()),
        )),
        None => Err((
            "expected {\"question\": …, \"answer\": …} or {\"turns\": [...]}".into(),
            None,
            None,
        )),
    }
}

/// Reads JSONL from `input`, reporting locations against `path`.
pub fn read_jsonl(
    path: &Path,
    input: impl Read,
    split: Option<Split>,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let mut input = BufReader::with_capacity(1 << 16, input);
    skip_bom(&mut input).at(path)?;
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    let mut saw_record = false;
    loop {
        buf.clear();
        if input.read_until(b'\n', &mut buf).at(path)? == 0 {
            break;
        }
        line_no += 1;
        let bad = |message: String, column: Option<u64>, json_path: Option<String>| {
            let mut location = Location::line(path, line_no);
            location.column = column;
            location.json_path = json_path;
            Event::Bad(BadRecord { location, message })
        };
        let line = match std::str::from_utf8(&buf) {
            Ok(line) => line,
            Err(e) => {
                sink(bad(
                    format!("not valid UTF-8 (bad byte at column {})", e.valid_up_to() + 1),
                    None,
                    None,
                ))?;
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        saw_record = true;
        match parse_line(line) {
            Ok(LineContent::Pair(question, answer)) => {
                sink(Event::Pair(RawPair { question, answer, split }))?
            }
            Ok(LineContent::Turns(turns)) => emit_turn_pairs(&turns, split, sink)?,
            Err((message, column, json_path)) => sink(bad(message, column, json_path))?,
        }
    }
    if !saw_record {
        sink(Event::Bad(BadRecord {
            location: Location::file(path),
            message: "empty file: no JSON lines".into(),
        }))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> (Vec<(String, String)>, Vec<String>) {
        let mut pairs = Vec::new();
        let mut bad = Vec::new();
        read_jsonl(Path::new("t.jsonl"), text.as_bytes(), None, &mut |e| {
            match e {
                Event::Pair(p) => pairs.push((p.question, p.answer)),
                Event::Bad(b) => bad.push(b.to_string()),
                other => panic!("unexpected {other:?}"),
            }
            Ok(())
        })
        .unwrap();
        (pairs, bad)
    }

    #[test]
    fn reads_pairs_and_turns() {
        let (pairs, bad) = read(
            "{\"question\":\"뭐 해?\",\"answer\":\"쉬어\",\"id\":3}\n\n{\"turns\":[\"안녕\",\"응 안녕\",\"잘 지냈어?\"]}\n",
        );
        assert!(bad.is_empty(), "{bad:?}");
        let p = |q: &str, a: &str| (q.to_string(), a.to_string());
        assert_eq!(pairs, [p("뭐 해?", "쉬어"), p("안녕", "응 안녕"), p("응 안녕", "잘 지냈어?")]);
    }

    #[test]
    fn bad_lines_are_located() {
        let (pairs, bad) = read(concat!(
            "{\"question\":\"a\",\"answer\":\"b\"}\n",
            "{\"question\":\"a\",\"answer\":}\n",
            "{\"question\":\"a\",\"answer\":7}\n",
            "{\"question\":\"a\"}\n",
            "[1,2]\n",
            "{\"turns\":[\"a\",null]}\n",
            "{\"text\":\"a\"}\n",
        ));
        assert_eq!(pairs.len(), 1);
        assert_eq!(bad.len(), 6, "{bad:#?}");
        assert_eq!(bad[0], "t.jsonl:2:26: invalid JSON: expected value");
        assert_eq!(bad[1], "t.jsonl:3 at answer: must be a string, found a number");
        assert_eq!(bad[2], "t.jsonl:4 at answer: is missing");
        assert_eq!(bad[3], "t.jsonl:5: expected a JSON object, found an array");
        assert_eq!(bad[4], "t.jsonl:6 at turns[1]: must be a string, found null");
        assert!(bad[5].starts_with("t.jsonl:7: expected {\"question\""), "{}", bad[5]);
    }

    #[test]
    fn empty_file_is_bad() {
        let (pairs, bad) = read("\n  \n");
        assert!(pairs.is_empty());
        assert_eq!(bad, ["t.jsonl: empty file: no JSON lines"]);
    }
}
