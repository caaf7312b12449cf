//! Text normalisation applied to every question and answer before anything else sees it:
//! Unicode NFC, control and invisible format characters removed, whitespace runs collapsed to
//! one ASCII space, ends trimmed. The result is a fixed point: normalising twice changes nothing.

use unicode_normalization::UnicodeNormalization;

/// Invisible characters that carry no meaning in chat text but break exact matching.
/// Zero-width joiner (U+200D) is kept: emoji sequences need it.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{200B}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}')
}

/// Normalises `text` (see the module doc). Returns an empty string for text with no content.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    // Order matters for the fixed-point property: characters are removed *before* NFC, because
    // removing one between a base and its combining mark would leave uncomposed text behind.
    // Collapsing whitespace after NFC is safe: a space always stays between the two sides.
    let visible =
        text.chars().filter(|&c| c.is_whitespace() || !(c.is_control() || is_invisible(c)));
    for c in visible.nfc() {
        if c.is_whitespace() {
            pending_space = true;
        } else {
            if pending_space && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn composes_decomposed_hangul() {
        // "한" written as conjoining jamo U+1112 U+1161 U+11AB.
        assert_eq!(normalize("\u{1112}\u{1161}\u{11AB}글"), "한글");
    }

    #[test]
    fn collapses_whitespace_and_trims() {
        assert_eq!(normalize("  안녕 \t\n 하세요\u{3000}!  "), "안녕 하세요 !");
    }

    #[test]
    fn removes_controls_and_invisibles() {
        assert_eq!(normalize("밥\u{0007}먹\u{200B}었어\u{FEFF}?"), "밥먹었어?");
    }

    #[test]
    fn keeps_zero_width_joiner_in_emoji() {
        let family = "\u{1F468}\u{200D}\u{1F469}";
        assert_eq!(normalize(family), family);
    }

    #[test]
    fn empty_and_blank_become_empty() {
        assert_eq!(normalize(""), "");
        assert_eq!(normalize(" \t\r\n\u{200B}"), "");
    }

    proptest! {
        #[test]
        fn is_idempotent(s in "\\PC*|[\\s\\x00-\\x1f가-힣ᄀ-ᇿ]{0,40}") {
            let once = normalize(&s);
            prop_assert_eq!(normalize(&once), once.clone());
        }

        #[test]
        fn output_has_no_controls_or_double_spaces(s in any::<String>()) {
            let out = normalize(&s);
            prop_assert!(!out.chars().any(|c| c.is_control()));
            prop_assert!(!out.contains("  "));
            prop_assert!(!out.starts_with(' ') && !out.ends_with(' '));
            prop_assert!(!out.chars().any(|c| c.is_whitespace() && c != ' '));
            let nfc: String = out.nfc().collect();
            prop_assert_eq!(nfc, out);
        }
    }
}
