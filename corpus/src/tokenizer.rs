//! Tokenizer training and loading (HF `tokenizers`).
//!
//! Choice: **BPE over characters with byte fallback**, SentencePiece-style (`▁` marks a word
//! start), digits split one per token.
//! - Hangul syllables are whole Unicode characters, so character-level BPE starts with every
//!   common syllable as one token and spends its merges on words and endings (은/는/이에요…).
//!   Byte-level BPE would first have to spend ~2,000 merges just to rebuild those syllables from
//!   their three UTF-8 bytes.
//! - Byte fallback adds the 256 `<0xNN>` byte tokens, so a character never seen in training
//!   (rare syllable, hanja, emoji) becomes its UTF-8 bytes: Korean never maps to `<unk>`.
//! - One token per digit keeps arithmetic learnable: the model sees 5 and 7 in 57, never a
//!   memorised "57" token.
//! - Unigram was the alternative; its trainer in this crate needs a suffix array over the whole
//!   input in memory, while the BPE trainer keeps only word counts.

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::{
    AddedToken, DecoderWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerImpl,
};

pub use tokenizers::Tokenizer;

use crate::{Error, Result};

/// Special tokens, in id order: padding, start and end of sequence, unknown, separator.
pub const SPECIAL_TOKENS: [&str; 5] = ["<pad>", "<s>", "</s>", "<unk>", "<sep>"];
/// The byte-fallback tokens every trained vocabulary ends with.
pub const BYTE_TOKENS: usize = 256;
/// The smallest vocabulary we train: specials, bytes and some room for characters.
pub const MIN_VOCAB_SIZE: usize = 512;

const WORD_START: char = '▁';

/// Ids of the special tokens in a tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SpecialIds {
    /// `<pad>`
    pub pad: u32,
    /// `<s>`
    pub bos: u32,
    /// `</s>`
    pub eos: u32,
    /// `<unk>`
    pub unk: u32,
    /// `<sep>`
    pub sep: u32,
}

/// Looks up the special tokens, failing with a message naming the missing one.
pub fn special_ids(tokenizer: &Tokenizer) -> Result<SpecialIds> {
    let id = |t: &str| {
        tokenizer.token_to_id(t).ok_or_else(|| {
            Error::Tokenizer(format!(
                "the tokenizer has no {t} token; chingu needs {}",
                SPECIAL_TOKENS.join(" ")
            ))
        })
    };
    Ok(SpecialIds {
        pad: id("<pad>")?,
        bos: id("<s>")?,
        eos: id("</s>")?,
        unk: id("<unk>")?,
        sep: id("<sep>")?,
    })
}

/// Picks the `limit` most frequent non-space characters of `texts` (ties broken by code
/// point), always including the word-start mark.
///
/// The trainer's own `limit_alphabet` breaks ties between equally frequent characters in hash
/// map order, which differs from run to run; choosing the alphabet here keeps training
/// deterministic.
fn choose_alphabet<S: AsRef<str>>(texts: impl Iterator<Item = S>, limit: usize) -> HashSet<char> {
    let mut counts: std::collections::HashMap<char, u64> = std::collections::HashMap::new();
    for text in texts {
        for c in text.as_ref().chars().filter(|c| !c.is_whitespace()) {
            *counts.entry(c).or_default() += 1;
        }
    }
    let mut ranked: Vec<(char, u64)> = counts.into_iter().collect();
    ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    std::iter::once(WORD_START)
        .chain(ranked.into_iter().map(|(c, _)| c).filter(|&c| c != WORD_START))
        .take(limit)
        .collect()
}

/// Trains a tokenizer of (at most) `vocab_size` tokens on the texts `texts()` yields; it is
/// called twice (alphabet, then merges) and must yield the same texts both times.
pub fn train<F, I, S>(mut texts: F, vocab_size: usize) -> Result<Tokenizer>
where
    F: FnMut() -> I,
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    if vocab_size < MIN_VOCAB_SIZE {
        return Err(Error::Invalid(format!(
            "--vocab-size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}"
        )));
    }
    let learned = vocab_size - BYTE_TOKENS;
    // Leave at least half of the learned vocabulary to merges; rarer characters fall back to
    // bytes.
    let alphabet = choose_alphabet(texts(), (learned - SPECIAL_TOKENS.len()) / 2);
    let mut trainer = BpeTrainer::builder()
        .vocab_size(learned)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect())
        // Every chosen character is forced in with the maximal count, so this limit removes
        // exactly the characters not chosen, whatever order the trainer sees them in.
        .limit_alphabet(alphabet.len())
        .initial_alphabet(alphabet)
        .build();

    let mut tokenizer: TokenizerImpl<
        BPE,
        NFC,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerImpl::new(BPE::default());
    tokenizer.with_normalizer(Some(NFC)).map_err(Error::tokenizer)?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        Metaspace::new(WORD_START, PrependScheme::Always, true).into(),
        Digits::new(true).into(),
    ])));
    tokenizer.with_decoder(Some(DecoderSequence::new(vec![
        ByteFallback::new().into(),
        MetaspaceDecoder::new(WORD_START, PrependScheme::Always, true).into(),
    ])));
    tokenizer.train(&mut trainer, texts()).map_err(Error::tokenizer)?;

    // The trainer knows nothing of byte fallback: append the byte tokens to the vocabulary
    // and switch the model to use them, through the serialised form (the model's vocabulary
    // is not public).
    let mut json: Value =
        serde_json::from_str(&tokenizer.to_string(false).map_err(Error::tokenizer)?)
            .map_err(Error::tokenizer)?;
    let model = json
        .get_mut("model")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| Error::Tokenizer("no model".into()))?;
    let vocab = model
        .get_mut("vocab")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| Error::Tokenizer("no vocab".into()))?;
    let mut next_id = vocab.len() as u64;
    for byte in 0..=255u8 {
        let token = format!("<0x{byte:02X}>");
        if !vocab.contains_key(&token) {
            vocab.insert(token, next_id.into());
            next_id += 1;
        }
    }
    model.insert("byte_fallback".into(), true.into());
    model.insert("unk_token".into(), "<unk>".into());
    let tokenizer: Tokenizer = serde_json::from_value(json).map_err(Error::tokenizer)?;
    special_ids(&tokenizer)?;
    Ok(tokenizer)
}

/// The canonical serialised form (what `tokenizer.json` holds); stable for a given tokenizer.
pub fn to_json(tokenizer: &Tokenizer) -> Result<String> {
    tokenizer.to_string(true).map_err(Error::tokenizer)
}

/// Loads `tokenizer.json`, checking it has chingu's special tokens.
pub fn load(path: &Path) -> Result<Tokenizer> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let tokenizer: Tokenizer = text
        .parse()
        .map_err(|e| Error::Tokenizer(format!("{}: not a tokenizer.json: {e}", path.display())))?;
    special_ids(&tokenizer).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    Ok(tokenizer)
}

/// Encodes text to ids (no special tokens added).
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tokenizer.encode_fast(text, false).map_err(Error::tokenizer)?.get_ids().to_vec())
}

/// Decodes ids back to text, dropping special tokens.
pub fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer.decode(ids, true).map_err(Error::tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    const TEXTS: &[&str] = &[
        "오늘 날씨가 정말 좋네요.",
        "점심 뭐 먹을까?",
        "김치찌개 어때요? 따뜻하고 맛있어요.",
        "12 더하기 35는 47이에요.",
        "주말에 친구랑 영화 보러 갈 거야.",
        "요즘 너무 피곤해서 잠이 부족해요.",
        "좋아요! 같이 가요.",
    ];

    fn trained() -> &'static Tokenizer {
        static T: OnceLock<Tokenizer> = OnceLock::new();
        T.get_or_init(|| train(|| TEXTS.iter().cycle().take(TEXTS.len() * 20), 600).unwrap())
    }

    #[test]
    fn special_tokens_come_first() {
        let ids = special_ids(trained()).unwrap();
        assert_eq!(ids, SpecialIds { pad: 0, bos: 1, eos: 2, unk: 3, sep: 4 });
    }

    #[test]
    fn digits_are_single_tokens() {
        let t = trained();
        let ids = encode(t, "47").unwrap();
        let pieces: Vec<_> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
        assert_eq!(pieces, ["▁", "4", "7"]);
    }

    #[test]
    fn unseen_hangul_never_becomes_unk() {
        let t = trained();
        let unk = special_ids(t).unwrap().unk;
        // Every precomposed Hangul syllable, 가 to 힣, plus hanja and emoji never seen in training.
        let all: String = ('가'..='힣').chain("漢字 🙂".chars()).collect();
        let ids = encode(t, &all).unwrap();
        assert!(!ids.contains(&unk));
        assert_eq!(decode(t, &ids).unwrap(), all);
    }

    #[test]
    fn vocabulary_respects_the_requested_size() {
        let t = trained();
        let size = t.get_vocab_size(true);
        assert!(size <= 600 && size > SPECIAL_TOKENS.len() + BYTE_TOKENS, "{size}");
        assert!(t.token_to_id("<0xEA>").is_some());
    }

    #[test]
    fn too_small_vocabulary_is_refused() {
        let err = train(|| TEXTS.iter(), 100).unwrap_err().to_string();
        assert!(err.contains("at least 512"), "{err}");
    }

    #[test]
    fn loading_rejects_a_tokenizer_without_our_specials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let json = to_json(trained()).unwrap().replace("<sep>", "<sepx>");
        std::fs::write(&path, json).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("no <sep> token"), "{err}");
    }

    #[test]
    fn saved_form_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let json = to_json(trained()).unwrap();
        std::fs::write(&path, &json).unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(to_json(&loaded).unwrap(), json);
        assert_eq!(encode(&loaded, TEXTS[2]).unwrap(), encode(trained(), TEXTS[2]).unwrap());
    }

    #[test]
    fn training_is_deterministic_when_the_alphabet_limit_cuts_ties() {
        // 2,000 syllables seen once each against an alphabet limit of 169: the cut falls
        // inside a 2,000-way tie, which the trainer alone resolves in hash-map order.
        let rare: Vec<String> = ('가'..='힣').take(2000).map(|c| format!("{c}{c}요")).collect();
        let texts = || TEXTS.iter().map(|s| s.to_string()).chain(rare.iter().cloned());
        let first = to_json(&train(texts, 600).unwrap()).unwrap();
        for _ in 0..3 {
            assert_eq!(to_json(&train(texts, 600).unwrap()).unwrap(), first);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn decode_inverts_encode_on_normalised_text(s in "[가-힣ㄱ-ㅎ0-9a-zA-Z .,!?~😀漢]{0,40}") {
            let text = crate::normalize::normalize(&s);
            let t = trained();
            let ids = encode(t, &text).unwrap();
            prop_assert!(!ids.contains(&special_ids(t).unwrap().unk));
            prop_assert_eq!(decode(t, &ids).unwrap(), text);
        }
    }
}
