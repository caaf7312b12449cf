//! The embedded default corpus (`data/sample/`): hand-written everyday pairs plus a
//! deterministic generator of questions whose answers must be computed — arithmetic on numbers
//! up to 99, comparisons, neighbours, parity, weekdays and months — with a held-out set whose
//! operand combinations never appear in training, so a trained model can be scored by exact
//! match on questions it cannot have memorised.
//!
//! The generated Korean follows the language's particle rules (은/는, 이/가, 을/를, 와/과,
//! 이에요/예요 after a number depend on how its last digit is read), so an answer is computed
//! in form as well as value.

use std::path::Path;

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::readers::{hex, read_csv};
use crate::record::{Event, RawPair, Sink};
use crate::Result;

/// The hand-written pairs (Q,A CSV), written for this project.
pub const DAILY_CSV: &str = include_str!("../../data/sample/daily.csv");
/// Where the hand-written pairs live in the repository, for messages and the manifest.
pub const DAILY_PATH: &str = "data/sample/daily.csv";
/// Bumped whenever the generator's output changes.
pub const GENERATOR_VERSION: u32 = 1;
/// One question in ten (by operands) is held out.
const HELDOUT_MODULUS: u64 = 10;
const HELDOUT_SEED: u64 = 0x6865_6c64_6f75_7431; // "heldout1"
const PHRASING_SEED: u64 = 0x7068_7261_7365_3031; // "phrase01"
const SAMPLING_SEED: u64 = 0x7361_6d70_6c65_3031; // "sample01"

/// A generated question with the answer it must get.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Computed {
    /// Which generator made it (`add`, `sub`, `weekday-offset`, …): scores are reported per task.
    pub task: &'static str,
    /// The question.
    pub question: String,
    /// The one correct answer.
    pub answer: String,
}

/// The generated questions, split so that held-out operand combinations never reach training.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComputedSet {
    /// Goes into the corpus.
    pub train: Vec<Computed>,
    /// Never in the corpus; for exact-match scoring.
    pub heldout: Vec<Computed>,
}

/// True when the number, read in Sino-Korean (영, 일, 이, … 십, 백), ends in a consonant.
fn ends_in_consonant(n: u32) -> bool {
    n % 10 == 0 || matches!(n % 10, 1 | 3 | 6 | 7 | 8)
}

/// Picks the particle form for a number: `consonant` after 일/삼/육/칠/팔/십…, else `vowel`.
fn josa<'a>(n: u32, consonant: &'a str, vowel: &'a str) -> &'a str {
    if ends_in_consonant(n) {
        consonant
    } else {
        vowel
    }
}

/// "57이에요." / "52예요."
fn number_answer(n: u32) -> String {
    format!("{n}{}.", josa(n, "이에요", "예요"))
}

const WEEKDAYS: [&str; 7] = ["월요일", "화요일", "수요일", "목요일", "금요일", "토요일", "일요일"];
/// Native Korean counts used with 달 (months): 한 달, 두 달, …
const NATIVE_COUNTS: [&str; 11] =
    ["한", "두", "세", "네", "다섯", "여섯", "일곱", "여덟", "아홉", "열", "열한"];

struct Generator {
    set: ComputedSet,
}

impl Generator {
    /// Adds one question, identified by `key` (task and operands): the key alone decides the
    /// phrasing and whether it is held out, so the split never depends on enumeration order.
    fn add(&mut self, task: &'static str, key: &str, phrasings: &[String], answer: String) {
        let phrase = xxh3_64_with_seed(key.as_bytes(), PHRASING_SEED) as usize % phrasings.len();
        let item = Computed { task, question: phrasings[phrase].clone(), answer };
        if xxh3_64_with_seed(key.as_bytes(), HELDOUT_SEED) % HELDOUT_MODULUS == 0 {
            self.set.heldout.push(item);
        } else {
            self.set.train.push(item);
        }
    }
}

/// Keeps one in `n` of a large family of questions, by key.
fn sampled(key: &str, n: u64) -> bool {
    xxh3_64_with_seed(key.as_bytes(), SAMPLING_SEED) % n == 0
}

/// Generates every computed question (about 20,000), deterministically.
pub fn computed() -> ComputedSet {
    let mut g = Generator { set: ComputedSet { train: Vec::new(), heldout: Vec::new() } };
    for a in 0..=99u32 {
        for b in 0..=99u32 {
            let (eun, eul) = (josa(b, "은", "는"), josa(b, "을", "를"));
            g.add(
                "add",
                &format!("add:{a}:{b}"),
                &[
                    format!("{a} 더하기 {b}{eun}?"),
                    format!("{a}+{b}{eun} 얼마야?"),
                    format!("{a}에 {b}{eul} 더하면 얼마예요?"),
                    format!("{a}하고 {b}{eul} 더하면 몇이야?"),
                ],
                number_answer(a + b),
            );
            if b <= a {
                g.add(
                    "sub",
                    &format!("sub:{a}:{b}"),
                    &[
                        format!("{a} 빼기 {b}{eun}?"),
                        format!("{a}-{b}{eun} 얼마야?"),
                        format!("{a}에서 {b}{eul} 빼면 얼마예요?"),
                    ],
                    number_answer(a - b),
                );
            }
            let wa = josa(a, "과", "와");
            if a != b && sampled(&format!("max:{a}:{b}"), 4) {
                g.add(
                    "max",
                    &format!("max:{a}:{b}"),
                    &[
                        format!("{a}{wa} {b} 중에 더 큰 수는?"),
                        format!("{a}{wa} {b} 중에 어느 쪽이 더 커?"),
                    ],
                    number_answer(a.max(b)),
                );
            }
            if a != b && sampled(&format!("min:{a}:{b}"), 4) {
                g.add(
                    "min",
                    &format!("min:{a}:{b}"),
                    &[
                        format!("{a}{wa} {b} 중에 더 작은 수는?"),
                        format!("{a}{wa} {b} 중에 어느 쪽이 더 작아?"),
                    ],
                    number_answer(a.min(b)),
                );
            }
            if (2..=9).contains(&a) && (1..=9).contains(&b) {
                g.add(
                    "mul",
                    &format!("mul:{a}:{b}"),
                    &[
                        format!("{a} 곱하기 {b}{eun}?"),
                        format!("{a}×{b}{eun} 얼마야?"),
                        format!("{a}에 {b}{eul} 곱하면?"),
                    ],
                    number_answer(a * b),
                );
            }
        }
        let n = a;
        g.add(
            "next",
            &format!("next:{n}"),
            &[format!("{n} 다음 수는 뭐야?"), format!("{n} 바로 다음 숫자는?")],
            number_answer(n + 1),
        );
        if n > 0 {
            g.add(
                "prev",
                &format!("prev:{n}"),
                &[format!("{n} 바로 앞의 수는?"), format!("{n}보다 하나 작은 수는 뭐야?")],
                number_answer(n - 1),
            );
        }
        let parity = if n % 2 == 0 { "짝수예요." } else { "홀수예요." };
        g.add(
            "parity",
            &format!("parity:{n}"),
            &[format!("{n}{} 짝수야 홀수야?", josa(n, "은", "는"))],
            parity.into(),
        );
    }
    for (d, day) in WEEKDAYS.iter().enumerate() {
        let after = |k: usize| WEEKDAYS[(d + k) % 7];
        let before = |k: usize| WEEKDAYS[(d + 7 - k) % 7];
        g.add(
            "weekday-next",
            &format!("wnext:{d}"),
            &[format!("{day} 다음 날은 무슨 요일이야?")],
            format!("{}이에요.", after(1)),
        );
        g.add(
            "weekday-prev",
            &format!("wprev:{d}"),
            &[format!("{day} 전날은 무슨 요일이에요?")],
            format!("{}이에요.", before(1)),
        );
        for k in 1..=6 {
            g.add(
                "weekday-offset",
                &format!("wafter:{d}:{k}"),
                &[format!("오늘이 {day}이면 {k}일 뒤는 무슨 요일이야?")],
                format!("{}이에요.", after(k)),
            );
            g.add(
                "weekday-offset",
                &format!("wbefore:{d}:{k}"),
                &[format!("오늘이 {day}이면 {k}일 전은 무슨 요일이었어?")],
                format!("{}이었어요.", before(k)),
            );
        }
    }
    for m in 1..=12u32 {
        let shift = |k: u32| (m - 1 + k) % 12 + 1;
        g.add(
            "month-next",
            &format!("mnext:{m}"),
            &[format!("{m}월 다음 달은 몇 월이야?")],
            format!("{}월이에요.", shift(1)),
        );
        for k in 1..=11u32 {
            let count = NATIVE_COUNTS[k as usize - 1];
            g.add(
                "month-offset",
                &format!("mafter:{m}:{k}"),
                &[format!("{m}월에서 {count} 달 뒤는 몇 월이야?")],
                format!("{}월이에요.", shift(k)),
            );
        }
    }
    g.set
}

/// Streams the whole embedded training corpus into `sink`: the hand-written pairs, then the
/// training half of the computed questions.
pub fn read_sample(computed: &ComputedSet, sink: &mut Sink<'_>) -> Result<()> {
    read_csv(Path::new(DAILY_PATH), DAILY_CSV.as_bytes(), None, sink)?;
    for item in &computed.train {
        sink(Event::Pair(RawPair {
            question: item.question.clone(),
            answer: item.answer.clone(),
            split: None,
        }))?;
    }
    Ok(())
}

/// sha256 over everything the embedded corpus holds, so the manifest pins it like a file.
pub fn fingerprint(computed: &ComputedSet) -> String {
    let mut hash = Sha256::new();
    hash.update(DAILY_CSV.as_bytes());
    for item in computed.train.iter().chain(&computed.heldout) {
        for part in [item.task, &item.question, &item.answer] {
            hash.update(part.as_bytes());
            hash.update([0u8]);
        }
    }
    hex(&hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn particles_follow_the_last_digit() {
        assert_eq!(number_answer(57), "57이에요.");
        assert_eq!(number_answer(52), "52예요.");
        assert_eq!(number_answer(10), "10이에요.");
        assert_eq!(number_answer(0), "0이에요.");
        assert_eq!(number_answer(99), "99예요.");
        assert_eq!(number_answer(198), "198이에요.");
    }

    #[test]
    fn answers_are_correct() {
        let set = computed();
        for item in set.train.iter().chain(&set.heldout) {
            let nums: Vec<u32> = item
                .question
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            let expected = match item.task {
                "add" => Some(nums[0] + nums[1]),
                "sub" => Some(nums[0] - nums[1]),
                "mul" => Some(nums[0] * nums[1]),
                "max" => Some(nums[0].max(nums[1])),
                "min" => Some(nums[0].min(nums[1])),
                "next" => Some(nums[0] + 1),
                "prev" => Some(nums[0] - 1),
                _ => None,
            };
            if let Some(n) = expected {
                assert_eq!(item.answer, number_answer(n), "{item:?}");
            }
        }
        let find =
            |q: &str| set.train.iter().chain(&set.heldout).find(|c| c.question == q).cloned();
        assert_eq!(find("금요일 다음 날은 무슨 요일이야?").unwrap().answer, "토요일이에요.");
        assert_eq!(
            find("오늘이 월요일이면 2일 전은 무슨 요일이었어?").unwrap().answer,
            "토요일이었어요."
        );
        assert_eq!(find("11월에서 세 달 뒤는 몇 월이야?").unwrap().answer, "2월이에요.");
        assert_eq!(find("7은 짝수야 홀수야?").unwrap().answer, "홀수예요.");
    }

    #[test]
    fn heldout_questions_never_reach_training() {
        let set = computed();
        let train: HashSet<_> = set.train.iter().map(|c| &c.question).collect();
        assert!(set.heldout.iter().all(|c| !train.contains(&c.question)));
        let total = set.train.len() + set.heldout.len();
        assert!((15_000..30_000).contains(&total), "{total}");
        // About one in ten, and every sizeable task is represented.
        let share = set.heldout.len() as f64 / total as f64;
        assert!((0.08..0.12).contains(&share), "{share}");
        for task in ["add", "sub", "mul", "max", "min", "next", "weekday-offset", "month-offset"] {
            assert!(set.heldout.iter().any(|c| c.task == task), "no held-out {task}");
        }
    }

    #[test]
    fn generation_is_deterministic() {
        assert_eq!(computed(), computed());
        assert_eq!(fingerprint(&computed()), fingerprint(&computed()));
    }

    #[test]
    fn daily_pairs_are_a_few_hundred_clean_rows() {
        let mut pairs = Vec::new();
        read_csv(Path::new(DAILY_PATH), DAILY_CSV.as_bytes(), None, &mut |e| {
            match e {
                Event::Pair(p) => pairs.push(p),
                other => panic!("{other:?}"),
            }
            Ok(())
        })
        .unwrap();
        assert!((300..=400).contains(&pairs.len()), "{}", pairs.len());
        let questions: HashSet<_> = pairs.iter().map(|p| &p.question).collect();
        assert_eq!(questions.len(), pairs.len(), "duplicate questions");
        assert!(pairs.iter().all(|p| p.question.chars().any(|c| ('가'..='힣').contains(&c))));
    }
}
