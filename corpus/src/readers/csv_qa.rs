//! Q/A CSV reader: RFC 4180 quoting, UTF-8 with or without BOM, the question and answer
//! columns found by header name in any position (`Q`/`A`, `question`/`answer`, `질문`/`답변`,
//! case-insensitive); other columns are ignored.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::error::{BadRecord, IoContext, Location};
use crate::readers::skip_bom;
use crate::record::{Event, RawPair, Sink, Split};
use crate::{Error, Result};

const QUESTION_HEADERS: [&str; 3] = ["q", "question", "질문"];
const ANSWER_HEADERS: [&str; 3] = ["a", "answer", "답변"];

fn find_column(headers: &csv::ByteRecord, names: &[&str]) -> Option<usize> {
    headers.iter().position(|h| {
        let h = String::from_utf8_lossy(h);
        let h = h.trim().to_lowercase();
        names.contains(&h.as_str())
    })
}

/// Reads a Q/A CSV from `input`, reporting locations against `path`.
pub fn read_csv(
    path: &Path,
    input: impl Read,
    split: Option<Split>,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let mut input = BufReader::with_capacity(1 << 16, input);
    skip_bom(&mut input).at(path)?;
    if input.fill_buf().at(path)?.is_empty() {
        return sink(Event::Bad(BadRecord {
            location: Location::file(path),
            message: "empty file: expected a header line with question and answer columns".into(),
        }));
    }
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(input);
    let headers = reader.byte_headers().map_err(|e| csv_error(path, e))?.clone();
    let missing = |what: &str, names: &[&str]| Error::Input {
        location: Location::line(path, 1),
        message: format!(
            "no {what} column: expected a header named one of {} (any case); found {}",
            names.join(", "),
            headers
                .iter()
                .map(|h| format!("{:?}", String::from_utf8_lossy(h)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let q_col = find_column(&headers, &QUESTION_HEADERS)
        .ok_or_else(|| missing("question", &QUESTION_HEADERS))?;
    let a_col =
        find_column(&headers, &ANSWER_HEADERS).ok_or_else(|| missing("answer", &ANSWER_HEADERS))?;

    let mut record = csv::ByteRecord::new();
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(false) => return Ok(()),
            Ok(true) => {
                let line = record.position().map_or(0, |p| p.line());
                let field = |col: usize, name: &str| -> Result<String, BadRecord> {
                    let bytes = record.get(col).unwrap_or_default();
                    String::from_utf8(bytes.to_vec()).map_err(|e| BadRecord {
                        location: Location::line(path, line),
                        message: format!(
                            "column {name} is not valid UTF-8 (bad byte at offset {}); re-save the file as UTF-8",
                            e.utf8_error().valid_up_to()
                        ),
                    })
                };
                let pair = field(q_col, "question").and_then(|q| Ok((q, field(a_col, "answer")?)));
                match pair {
                    Ok((question, answer)) => {
                        sink(Event::Pair(RawPair { question, answer, split }))?
                    }
                    Err(bad) => sink(Event::Bad(bad))?,
                }
            }
            Err(e) => match e.kind() {
                csv::ErrorKind::UnequalLengths { pos, expected_len, len } => {
                    let line = pos.as_ref().map_or(0, |p| p.line());
                    sink(Event::Bad(BadRecord {
                        location: Location::line(path, line),
                        message: format!(
                            "row has {len} field(s) but the header has {expected_len}; \
                             look for an unbalanced double quote or a stray comma"
                        ),
                    }))?
                }
                _ => return Err(csv_error(path, e)),
            },
        }
    }
}

fn csv_error(path: &Path, e: csv::Error) -> Error {
    let line = e.position().map(|p| p.line());
    match e.into_kind() {
        csv::ErrorKind::Io(source) => Error::io(path, source),
        other => Error::Input {
            location: Location { line, ..Location::file(path) },
            message: format!("{other:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Event;

    fn read(text: &str) -> (Vec<(String, String)>, Vec<String>, Result<()>) {
        let mut pairs = Vec::new();
        let mut bad = Vec::new();
        let result = read_csv(Path::new("t.csv"), text.as_bytes(), None, &mut |e| {
            match e {
                Event::Pair(p) => pairs.push((p.question, p.answer)),
                Event::Bad(b) => bad.push(b.to_string()),
                other => panic!("unexpected {other:?}"),
            }
            Ok(())
        });
        (pairs, bad, result)
    }

    #[test]
    fn finds_columns_by_name_in_any_position_and_case() {
        let (pairs, bad, r) = read("id,ANSWER,Question\n1,응,밥 먹었어?\n");
        r.unwrap();
        assert!(bad.is_empty());
        assert_eq!(pairs, [("밥 먹었어?".to_string(), "응".to_string())]);
        let (pairs, _, r) = read("\u{feff}질문,답변,label\n안녕,반가워,0\n");
        r.unwrap();
        assert_eq!(pairs, [("안녕".to_string(), "반가워".to_string())]);
    }

    #[test]
    fn honours_rfc4180_quoting() {
        let (pairs, bad, r) = read("Q,A\n\"쉼표, 있어\",\"따옴표 \"\"이렇게\"\"\n줄바꿈\"\n");
        r.unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(pairs, [("쉼표, 있어".to_string(), "따옴표 \"이렇게\"\n줄바꿈".to_string())]);
    }

    #[test]
    fn broken_quoting_is_a_located_bad_record() {
        let (pairs, bad, r) = read("Q,A\n좋아,응\n\"닫히지 않은,따옴표\n다음,줄\n");
        r.unwrap();
        assert_eq!(pairs.len(), 1);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(
            bad[0].starts_with("t.csv:3: row has 1 field(s) but the header has 2"),
            "{}",
            bad[0]
        );
    }

    #[test]
    fn wrong_field_count_names_the_line() {
        let (pairs, bad, r) = read("Q,A\n하나,둘\n셋\n넷,다섯\n");
        r.unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].starts_with("t.csv:3:"), "{}", bad[0]);
    }

    #[test]
    fn missing_columns_are_an_error_listing_headers() {
        let (_, _, r) = read("question,reply\n안녕,응\n");
        let err = r.unwrap_err().to_string();
        assert!(err.starts_with("t.csv:1: no answer column"), "{err}");
        assert!(err.contains("\"reply\""), "{err}");
    }

    #[test]
    fn empty_file_is_a_bad_record() {
        let (pairs, bad, r) = read("");
        r.unwrap();
        assert!(pairs.is_empty());
        assert_eq!(bad.len(), 1);
        assert!(bad[0].contains("empty file"), "{}", bad[0]);
    }

    #[test]
    fn invalid_utf8_is_located() {
        let mut bytes = b"Q,A\nok,fine\n".to_vec();
        bytes.extend_from_slice(b"\xff\xfe,x\n");
        let mut bad = Vec::new();
        read_csv(Path::new("t.csv"), &bytes[..], None, &mut |e| {
            if let Event::Bad(b) = e {
                bad.push(b.to_string());
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(bad.len(), 1);
        assert!(bad[0].starts_with("t.csv:3: column question is not valid UTF-8"), "{}", bad[0]);
    }
}
