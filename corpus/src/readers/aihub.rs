//! AIHub dataset 543 ("주제별 텍스트 일상 대화 데이터") reader. One dialogue per `info[]`
//! item; the text of a line is its `norm_text`; consecutive lines of the same speaker form one
//! turn; consecutive turns become pairs. Lines that are empty or consist only of `#@…#`
//! placeholders (such as `#@시스템#사진#`) are dropped. A document that is not JSON is one bad
//! record; a dialogue with a field of the wrong shape is one bad record named by its JSON path,
//! and the file's other dialogues are still read.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{BadRecord, Location};
use crate::record::{emit_turn_pairs, Event, Sink, Split};
use crate::Result;

/// Which dialogues to keep; an empty list keeps all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AihubFilter {
    /// Keep dialogues whose `category` is one of these.
    pub categories: Vec<String>,
    /// Keep dialogues whose `annotations.speaker_type` is one of these (e.g. `1:1`).
    pub speaker_types: Vec<String>,
}

impl AihubFilter {
    fn keeps(&self, dialogue: &Dialogue) -> bool {
        let matches = |wanted: &[String], got: &Option<String>| {
            wanted.is_empty() || got.as_ref().is_some_and(|g| wanted.iter().any(|w| w == g.trim()))
        };
        matches(&self.categories, &dialogue.category)
            && matches(&self.speaker_types, &dialogue.annotations.speaker_type)
    }
}

#[derive(Deserialize)]
struct Dialogue {
    #[serde(default)]
    category: Option<String>,
    annotations: Annotations,
}

#[derive(Deserialize)]
struct Annotations {
    #[serde(default)]
    speaker_type: Option<String>,
    lines: Vec<Line>,
}

#[derive(Deserialize)]
struct Line {
    norm_text: String,
    speaker: Speaker,
}

#[derive(Deserialize)]
struct Speaker {
    id: SpeakerId,
}

/// Speaker ids are strings such as `"1번"`; numbers are accepted too.
#[derive(Deserialize, PartialEq)]
#[serde(untagged)]
enum SpeakerId {
    Text(String),
    Number(i64),
}

/// True for a line made only of `#@…#` placeholders, such as `#@시스템#사진#`.
fn is_placeholder_only(text: &str) -> bool {
    let mut words = text.split_whitespace().peekable();
    words.peek().is_some() && words.all(|w| w.starts_with("#@") && w.ends_with('#') && w.len() > 3)
}

/// Reads one AIHub JSON document (already in memory: these files hold a handful of
/// dialogues each).
pub fn read_aihub(
    path: &Path,
    bytes: &[u8],
    split: Option<Split>,
    filter: &AihubFilter,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let bad = |location: Location, message: String| Event::Bad(BadRecord { location, message });
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return sink(bad(
            Location::file(path),
            "empty file: expected an AIHub JSON document".into(),
        ));
    }
    let document: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            let location = Location::line(path, e.line() as u64).with_column(e.column() as u64);
            return sink(bad(
                location,
                format!("invalid JSON: {}", crate::readers::json_error_message(&e)),
            ));
        }
    };
    let Some(Value::Array(dialogues)) = document.get("info") else {
        return sink(bad(
            Location::file(path).with_json_path("info"),
            "expected an object with an \"info\" array of dialogues (AIHub 543 layout); \
             pass --format if this is another format"
                .into(),
        ));
    };
    for (i, value) in dialogues.iter().enumerate() {
        let dialogue: Dialogue = match serde_path_to_error::deserialize(value) {
            Ok(d) => d,
            Err(e) => {
                let location =
                    Location::file(path).with_json_path(format!("info[{i}].{}", e.path()));
                sink(bad(location, e.into_inner().to_string()))?;
                continue;
            }
        };
        if !filter.keeps(&dialogue) {
            sink(Event::FilteredDialogue)?;
            continue;
        }
        let mut turns: Vec<String> = Vec::new();
        let mut last_speaker: Option<&SpeakerId> = None;
        for line in &dialogue.annotations.lines {
            let text = line.norm_text.trim();
            if text.is_empty() || is_placeholder_only(text) {
                sink(Event::DroppedLine)?;
                continue;
            }
            match (last_speaker, turns.last_mut()) {
                (Some(prev), Some(turn)) if *prev == line.speaker.id => {
                    turn.push(' ');
                    turn.push_str(text);
                }
                _ => turns.push(text.to_string()),
            }
            last_speaker = Some(&line.speaker.id);
        }
        emit_turn_pairs(&turns, split, sink)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The made-up AIHub example in the project's shared test data, read at run time so that
    /// a missing `../shared` fails this test with a clear message rather than the build.
    fn example() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/aihub543-format.json");
        std::fs::read_to_string(path).unwrap_or_else(|e| {
            panic!("{path}: {e}: the tests need ../shared/data beside the repository")
        })
    }

    struct Seen {
        pairs: Vec<(String, String)>,
        bad: Vec<String>,
        dropped: usize,
        filtered: usize,
    }

    fn read(text: &str, filter: &AihubFilter) -> Seen {
        let mut seen = Seen { pairs: vec![], bad: vec![], dropped: 0, filtered: 0 };
        read_aihub(Path::new("d.json"), text.as_bytes(), Some(Split::Valid), filter, &mut |e| {
            match e {
                Event::Pair(p) => {
                    assert_eq!(p.split, Some(Split::Valid));
                    seen.pairs.push((p.question, p.answer))
                }
                Event::Bad(b) => seen.bad.push(b.to_string()),
                Event::DroppedLine => seen.dropped += 1,
                Event::FilteredDialogue => seen.filtered += 1,
            }
            Ok(())
        })
        .unwrap();
        seen
    }

    fn p(q: &str, a: &str) -> (String, String) {
        (q.to_string(), a.to_string())
    }

    #[test]
    fn reads_the_shared_example() {
        let seen = read(&example(), &AihubFilter::default());
        assert!(seen.bad.is_empty(), "{:?}", seen.bad);
        assert_eq!(seen.dropped, 1, "the #@시스템#사진# line");
        assert_eq!(
            seen.pairs,
            [
                p("이번 주말에 어디 가?", "바다 보러 갈까 해."),
                p("바다 보러 갈까 해.", "좋겠다 나도 데려가"),
                p("오늘 운동했어?", "응 한 시간 걸었어"),
                p("응 한 시간 걸었어", "나는 쉬었어"),
            ]
        );
    }

    #[test]
    fn filters_by_speaker_type_and_category() {
        let one_to_one = AihubFilter { speaker_types: vec!["1:1".into()], ..Default::default() };
        let seen = read(&example(), &one_to_one);
        assert_eq!(seen.pairs.len(), 2);
        assert_eq!(seen.filtered, 1);
        let health = AihubFilter { categories: vec!["건강".into()], ..Default::default() };
        let seen = read(&example(), &health);
        assert_eq!(
            seen.pairs,
            [p("오늘 운동했어?", "응 한 시간 걸었어"), p("응 한 시간 걸었어", "나는 쉬었어")]
        );
    }

    #[test]
    fn merges_consecutive_lines_of_one_speaker() {
        let doc = r##"{"info":[{"annotations":{"lines":[
            {"norm_text":"있잖아","speaker":{"id":"1번"}},
            {"norm_text":"나 합격했어","speaker":{"id":"1번"}},
            {"norm_text":"#@이름# #@시스템#사진#","speaker":{"id":"2번"}},
            {"norm_text":"  ","speaker":{"id":"2번"}},
            {"norm_text":"#@이름# 축하해!","speaker":{"id":2}}]}}]}"##;
        let seen = read(doc, &AihubFilter::default());
        assert_eq!(seen.dropped, 2);
        assert_eq!(seen.pairs, [p("있잖아 나 합격했어", "#@이름# 축하해!")]);
    }

    #[test]
    fn wrong_types_are_named_by_json_path_and_other_dialogues_survive() {
        let doc = r#"{"info":[
            {"annotations":{"lines":[{"norm_text":"a","speaker":{"id":"1"}},{"norm_text":5,"speaker":{"id":"2"}}]}},
            {"annotations":{"lines":[{"norm_text":"b","speaker":{"id":"1"}},{"norm_text":"c","speaker":{"id":"2"}}]}},
            {"annotations":{}}]}"#;
        let seen = read(doc, &AihubFilter::default());
        assert_eq!(seen.pairs, [p("b", "c")]);
        assert_eq!(seen.bad.len(), 2, "{:?}", seen.bad);
        assert!(seen.bad[0].starts_with("d.json at info[0].annotations.lines[1].norm_text: invalid type: integer `5`, expected a string"), "{}", seen.bad[0]);
        assert!(
            seen.bad[1].starts_with("d.json at info[2].annotations: missing field `lines`"),
            "{}",
            seen.bad[1]
        );
    }

    #[test]
    fn invalid_json_and_wrong_shape_and_empty_are_bad() {
        let seen = read("{\"info\": [\n  {,}\n]}", &AihubFilter::default());
        assert_eq!(seen.bad.len(), 1);
        assert_eq!(seen.bad[0], "d.json:2:4: invalid JSON: key must be a string");
        let seen = read("{\"data\": 1}", &AihubFilter::default());
        assert!(
            seen.bad[0].starts_with("d.json at info: expected an object with an \"info\" array")
        );
        let seen = read(" \n", &AihubFilter::default());
        assert!(seen.bad[0].starts_with("d.json: empty file"));
    }
}
