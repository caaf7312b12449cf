//! The environment settings that tune kernels and products (`CHINGU_*`, listed by `chingu gpu`):
//! each read once by the module it tunes, all parsed here the same way. Spaces around a value
//! and the case of words do not matter; an empty value is unset; and a value the setting does
//! not name is warned about once, naming the variable and what it takes, and then treated as
//! unset — never silently taken for another value (`CHINGU_GEMM_ARRAYS=off` once meant on).

/// `name`'s value as `parse` reads it (given the trimmed text); `None` where it is unset or
/// empty, or where `parse` does not take it (warned: "NAME=value: expected EXPECTED; ignored").
pub fn read<T>(name: &str, expected: &str, parse: impl FnOnce(&str) -> Option<T>) -> Option<T> {
    let raw = std::env::var(name).ok()?;
    parse_value(name, &raw, expected, parse).unwrap_or_else(|warning| {
        tracing::warn!("{warning}");
        None
    })
}

/// [`read`] of a value already in hand: `Ok(None)` for an empty one, `Err` with the warning
/// for one `parse` does not take.
pub fn parse_value<T>(
    name: &str,
    raw: &str,
    expected: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<Option<T>, String> {
    let text = raw.trim();
    if text.is_empty() {
        return Ok(None);
    }
    match parse(text) {
        Some(value) => Ok(Some(value)),
        None => Err(format!("{name}={raw:?}: expected {expected}; ignored")),
    }
}

/// A setting that turns something on or off: `1` or `0` (also on/off, true/false, yes/no);
/// `None` unset.
pub fn switch(name: &str) -> Option<bool> {
    read(name, "1 or 0", parse_switch)
}

/// `1`, `on`, `true`, `yes` → on; `0`, `off`, `false`, `no` → off (any case); else `None`.
pub fn parse_switch(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => Some(true),
        "0" | "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_take_numbers_and_words_in_any_case_and_nothing_else() {
        for on in ["1", "on", "ON", "True", "yes"] {
            assert_eq!(parse_switch(on), Some(true), "{on}");
        }
        for off in ["0", "off", "Off", "FALSE", "no"] {
            assert_eq!(parse_switch(off), Some(false), "{off}");
        }
        for neither in ["2", "", "enable", "o", "10"] {
            assert_eq!(parse_switch(neither), None, "{neither}");
        }
    }

    #[test]
    fn values_are_trimmed_empty_is_unset_and_the_unknown_is_named_in_the_warning() {
        let rows = |raw: &str| {
            parse_value("CHINGU_X", raw, "a number of rows", |t| t.parse::<usize>().ok())
        };
        assert_eq!(rows(" 256\n"), Ok(Some(256)));
        assert_eq!(rows("   "), Ok(None));
        assert_eq!(rows(""), Ok(None));
        let warning = rows("lots").unwrap_err();
        assert_eq!(warning, "CHINGU_X=\"lots\": expected a number of rows; ignored");
        // The parser sees the trimmed text.
        assert_eq!(parse_value("CHINGU_Y", " Off ", "1 or 0", parse_switch), Ok(Some(false)));
    }
}
