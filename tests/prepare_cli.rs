//! End-to-end tests of `chingu prepare` as a user runs it: the real binary on the shared
//! fixtures, the embedded corpus and handcrafted bad inputs.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use chingu_corpus::normalize::normalize;
use chingu_corpus::shard::Shard;
use chingu_corpus::{tokenizer, Manifest, Split};

fn shared(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data").join(name)
}

fn chingu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chingu"))
        .args(args)
        .env("CHINGU_LOG", "warn")
        .output()
        .expect("run chingu")
}

fn prepare(args: &[&str], out: &Path) -> Output {
    let mut all = vec!["prepare", "--progress", "quiet", "--out", out.to_str().unwrap()];
    all.extend_from_slice(args);
    chingu(&all)
}

fn ok(output: Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "chingu failed: {stderr}");
    String::from_utf8(output.stdout).unwrap()
}

fn failed(output: Output) -> String {
    assert!(!output.status.success(), "chingu unexpectedly succeeded");
    String::from_utf8(output.stderr).unwrap()
}

/// Reads every record of every shard back to text, checking each shard against the manifest.
fn decoded(dir: &Path, manifest: &Manifest) -> Vec<(Split, String, String)> {
    let tok = tokenizer::load(&dir.join("tokenizer.json")).unwrap();
    let mut out = Vec::new();
    for entry in &manifest.shards {
        let path = dir.join(&entry.file);
        assert_eq!(chingu_corpus::durable::sha256_file(&path).unwrap(), entry.sha256);
        let shard = Shard::open_verified(&path).unwrap();
        assert_eq!(shard.len() as u64, entry.records);
        assert_eq!(shard.total_tokens(), entry.tokens);
        for r in shard.iter() {
            let q = tokenizer::decode(&tok, &r.question.to_vec()).unwrap();
            let a = tokenizer::decode(&tok, &r.answer.to_vec()).unwrap();
            out.push((entry.split, q, a));
        }
    }
    out
}

fn dir_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
        })
        .collect()
}

#[test]
fn chatbotdata_csv_round_trips_through_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("prepared");
    let csv = shared("ChatbotData.csv");
    let stdout = ok(prepare(&[csv.to_str().unwrap(), "--vocab-size", "4000"], &out));
    assert!(stdout.contains("chingu prepare: done"), "{stdout}");
    let manifest = Manifest::load(&out).unwrap();

    // Independent expectation, straight from the csv crate: unique normalised pairs.
    let mut reader = csv::Reader::from_path(&csv).unwrap();
    let mut unique = HashSet::new();
    let mut rows = 0;
    for record in reader.records() {
        let record = record.unwrap();
        rows += 1;
        unique.insert((normalize(&record[0]), normalize(&record[1])));
    }
    let c = &manifest.counts;
    assert_eq!(c.pairs_read, rows);
    assert_eq!(rows, 11_823);
    assert_eq!(c.kept, unique.len() as u64);
    assert_eq!(c.duplicates, rows - unique.len() as u64);
    assert_eq!(c.train + c.valid, c.kept);
    let share = c.valid as f64 / c.kept as f64;
    assert!((0.04..0.06).contains(&share), "valid share {share}");
    assert_eq!(manifest.tokenizer.vocab_size, 4000);
    assert_eq!(manifest.sources[0].sha256, chingu_corpus::durable::sha256_file(&csv).unwrap());

    // Every kept pair comes back exactly, in the split the manifest counts.
    let back = decoded(&out, &manifest);
    let back_set: HashSet<_> = back.iter().map(|(_, q, a)| (q.clone(), a.clone())).collect();
    assert_eq!(back_set, unique);
    assert_eq!(back.iter().filter(|(s, _, _)| *s == Split::Valid).count() as u64, c.valid);
}

#[test]
fn embedded_corpus_keeps_heldout_questions_out_of_training() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("prepared");
    ok(prepare(&[], &out));
    let manifest = Manifest::load(&out).unwrap();
    let heldout = manifest.heldout.as_ref().expect("held-out file");
    let text = std::fs::read_to_string(out.join(&heldout.file)).unwrap();
    let questions: HashSet<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["question"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(questions.len() as u64, heldout.records);
    assert!(heldout.records > 1000);
    let back = decoded(&out, &manifest);
    assert_eq!(back.len() as u64, manifest.counts.kept);
    assert!(
        back.iter().all(|(_, q, _)| !questions.contains(q)),
        "a held-out question reached the shards"
    );
    assert!(
        back.iter().any(|(_, q, a)| q == "배고파" && !a.is_empty()),
        "hand-written pairs are in"
    );
}

#[test]
fn reruns_are_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let csv = shared("ChatbotData.csv");
    ok(prepare(&[csv.to_str().unwrap(), "--vocab-size", "2000", "--shard-records", "3000"], &a));
    ok(prepare(&[csv.to_str().unwrap(), "--vocab-size", "2000", "--shard-records", "3000"], &b));
    let (first, second) = (dir_bytes(&a), dir_bytes(&b));
    assert_eq!(first.keys().collect::<Vec<_>>(), second.keys().collect::<Vec<_>>());
    assert!(first.len() >= 6, "several train shards expected: {:?}", first.keys());
    for (name, bytes) in &first {
        assert!(bytes == &second[name], "{name} differs between runs");
    }
    // Rerunning into the same directory replaces it, identically.
    ok(prepare(&[csv.to_str().unwrap(), "--vocab-size", "2000", "--shard-records", "3000"], &a));
    assert_eq!(dir_bytes(&a), second);
}

#[test]
fn aihub_tree_uses_folder_splits_and_filters() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("aihub");
    std::fs::create_dir_all(tree.join("Training/TL_01. KAKAO")).unwrap();
    std::fs::create_dir_all(tree.join("Validation/VL_01. KAKAO")).unwrap();
    let example = std::fs::read_to_string(shared("aihub543-format.json")).unwrap();
    std::fs::write(tree.join("Training/TL_01. KAKAO/a.json"), &example).unwrap();
    let valid_doc = example.replace("바다 보러 갈까 해.", "산에 갈까 해.");
    std::fs::write(tree.join("Validation/VL_01. KAKAO/b.json"), valid_doc).unwrap();
    std::fs::write(tree.join("README.txt"), "not data").unwrap();

    let out = tmp.path().join("prepared");
    ok(prepare(&[tree.to_str().unwrap(), "--vocab-size", "600", "--speaker-type", "1:1"], &out));
    let m = Manifest::load(&out).unwrap();
    assert_eq!(m.sources.len(), 2);
    assert_eq!(m.counts.filtered_dialogues, 2, "the multi-party dialogue in each file");
    assert_eq!(m.counts.dropped_lines, 2, "the #@시스템#사진# line in each file");
    assert_eq!(m.counts.ignored_files, 1);
    assert_eq!((m.counts.train, m.counts.valid), (2, 2));
    let back = decoded(&out, &m);
    assert!(
        back.contains(&(Split::Valid, "이번 주말에 어디 가?".into(), "산에 갈까 해.".into())),
        "{back:?}"
    );
    assert!(
        back.contains(&(Split::Train, "바다 보러 갈까 해.".into(), "좋겠다 나도 데려가".into())),
        "{back:?}"
    );
}

#[test]
fn jsonl_pairs_and_turns() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("chat.jsonl");
    std::fs::write(
        &input,
        "{\"question\":\"  뭐   해? \",\"answer\":\"그냥 쉬어\"}\n{\"turns\":[\"안녕\",\"응 안녕\",\"잘 지냈어?\"]}\n{\"question\":\"뭐 해?\",\"answer\":\"그냥 쉬어\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("prepared");
    ok(prepare(&[input.to_str().unwrap(), "--vocab-size", "600", "--valid-fraction", "0"], &out));
    let m = Manifest::load(&out).unwrap();
    assert_eq!((m.counts.pairs_read, m.counts.kept, m.counts.duplicates), (4, 3, 1));
    let back: HashSet<_> = decoded(&out, &m).into_iter().map(|(_, q, a)| (q, a)).collect();
    let expect = |q: &str, a: &str| (q.to_string(), a.to_string());
    assert_eq!(
        back,
        HashSet::from([
            expect("뭐 해?", "그냥 쉬어"),
            expect("안녕", "응 안녕"),
            expect("응 안녕", "잘 지냈어?")
        ])
    );
}

#[test]
fn bad_input_stops_with_a_location_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("bad.jsonl");
    std::fs::write(
        &input,
        "{\"question\":\"a\",\"answer\":\"b\"}\n{\"question\":\"a\",\"answer\":3}\n",
    )
    .unwrap();
    let out = tmp.path().join("prepared");
    let stderr = failed(prepare(&[input.to_str().unwrap()], &out));
    assert!(stderr.contains("bad.jsonl:2 at answer: must be a string, found a number"), "{stderr}");
    assert!(stderr.contains("--skip-bad"), "{stderr}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1, "nothing but the input is left");
}

#[test]
fn skip_bad_counts_and_lists_bad_records() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("mixed.csv");
    let mut text = String::from("질문,답변\n");
    for i in 0..20 {
        text.push_str(&format!("질문 {i},답변 {i}\n"));
        text.push_str("필드가 하나뿐\n");
    }
    std::fs::write(&input, text).unwrap();
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let out = tmp.path().join("prepared");
    let stdout = ok(prepare(
        &[input.to_str().unwrap(), empty.to_str().unwrap(), "--vocab-size", "600", "--skip-bad"],
        &out,
    ));
    let m = Manifest::load(&out).unwrap();
    assert_eq!(m.counts.bad, 21);
    assert_eq!(m.counts.kept, 20);
    assert_eq!(m.bad_examples.len(), 5);
    assert!(m.bad_examples[0].ends_with("mixed.csv:3: row has 1 field(s) but the header has 2; look for an unbalanced double quote or a stray comma"), "{}", m.bad_examples[0]);
    assert_eq!(m.sources[1].bad, 1, "the empty file");
    assert!(stdout.contains("bad records    21"), "{stdout}");
}

#[test]
fn refuses_to_overwrite_a_foreign_directory() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("thesis.tex"), "precious").unwrap();
    let stderr = failed(prepare(&[], tmp.path()));
    assert!(stderr.contains("refusing to replace"), "{stderr}");
    assert_eq!(std::fs::read_to_string(tmp.path().join("thesis.tex")).unwrap(), "precious");
}

#[test]
fn reuses_a_given_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
    ok(prepare(&["--vocab-size", "1000"], &first));
    let tok = first.join("tokenizer.json");
    let csv = shared("ChatbotData.csv");
    ok(prepare(&[csv.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap()], &second));
    let (a, b) = (Manifest::load(&first).unwrap(), Manifest::load(&second).unwrap());
    assert_eq!(a.tokenizer.sha256, b.tokenizer.sha256);
    assert_eq!(b.tokenizer.origin, "reused");
    assert_eq!(decoded(&second, &b).len() as u64, b.counts.kept);
    let stderr =
        failed(prepare(&["--tokenizer", "/nonexistent/tokenizer.json"], &tmp.path().join("third")));
    assert!(stderr.contains("/nonexistent/tokenizer.json"), "{stderr}");
}

#[test]
fn help_explains_the_formats() {
    let stdout = ok(chingu(&["prepare", "--help"]));
    for needle in ["AIHub", "질문/답변", "--skip-bad", "--valid-fraction", "byte-identical"] {
        assert!(stdout.contains(needle), "--help lacks {needle}");
    }
}
