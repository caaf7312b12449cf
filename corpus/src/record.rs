//! What readers produce: question/answer pairs and the events around them.

use crate::error::BadRecord;

/// Which half of the prepared data a pair belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training data.
    Train,
    /// Held back to measure the model (validation).
    Valid,
}

impl Split {
    /// Both splits, in file-name order.
    pub const ALL: [Split; 2] = [Split::Train, Split::Valid];

    /// The name used in file names and the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
        }
    }
}

/// One question with its answer, as read (not yet normalised).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPair {
    /// The prompt.
    pub question: String,
    /// The reply to learn.
    pub answer: String,
    /// The split the input itself assigns (AIHub `TL_`/`VL_` folders); `None` means "decide by
    /// hash".
    pub split: Option<Split>,
}

/// What a reader reports while it streams through an input.
#[derive(Debug)]
pub enum Event {
    /// A usable pair.
    Pair(RawPair),
    /// A malformed record; the pipeline stops or counts it (`--skip-bad`).
    Bad(BadRecord),
    /// A line with no content for training (empty, or a system placeholder such as
    /// `#@시스템#사진#`).
    DroppedLine,
    /// A whole dialogue excluded by `--category` / `--speaker-type`.
    FilteredDialogue,
}

/// The callback readers push events into. Returning an error stops the reader.
pub type Sink<'a> = dyn FnMut(Event) -> crate::Result<()> + 'a;

/// Emits the pairs of consecutive turns of a dialogue: (t0, t1), (t1, t2), … — every turn is
/// the answer to the one before it, so an n-turn dialogue yields n - 1 pairs.
pub(crate) fn emit_turn_pairs(
    turns: &[String],
    split: Option<Split>,
    sink: &mut Sink<'_>,
) -> crate::Result<()> {
    for window in turns.windows(2) {
        sink(Event::Pair(RawPair {
            question: window[0].clone(),
            answer: window[1].clone(),
            split,
        }))?;
    }
    Ok(())
}
