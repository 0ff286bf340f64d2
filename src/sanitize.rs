//! Making untrusted text safe to show in a terminal.
//!
//! Args and context come from agents, and through them from anyone who can put text in
//! front of an agent. Shown raw, an ANSI escape could recolour or erase an approval
//! prompt, `\r` could overwrite a line, a bidirectional override could make
//! `send 10.00` read as something else, and zero-width characters could make two
//! different strings look equal. Every such character is shown as a visible escape.

use std::borrow::Cow;
use std::fmt::Write;

/// Whether `c` must not reach a terminal as itself.
fn is_unsafe(c: char) -> bool {
    matches!(c,
        // C0 controls (ESC, CR, BS, ...), DEL and C1 controls (CSI 0x9b, ...).
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        // Bidirectional marks, embeddings, overrides and isolates.
        | '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        // Zero-width and invisible formatting characters.
        | '\u{200b}'..='\u{200d}' | '\u{2060}'..='\u{2064}' | '\u{feff}' | '\u{00ad}' | '\u{180e}'
        // Line and paragraph separators.
        | '\u{2028}' | '\u{2029}'
    )
}

/// `s` with every unsafe character replaced by a visible escape (`\n`, `\t`, `\u{1b}`).
/// Allocates only when something needs escaping.
pub fn sanitize(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if is_unsafe(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A JSON value on one line, sanitized.
pub fn json_line(v: &serde_json::Value) -> String {
    sanitize(&v.to_string()).into_owned()
}

/// A JSON value pretty-printed, each line sanitized (the layout's own newlines stay).
pub fn json_pretty(v: &serde_json::Value) -> String {
    let pretty = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    pretty
        .lines()
        .map(|l| sanitize(l).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_that_could_spoof_a_prompt() {
        let hostile = "pay 10\u{1b}[2K\r\u{1b}[32mAPPROVED\u{7}\u{202e}00.01\u{200b}\u{2066}x\u{9b}31m";
        let shown = sanitize(hostile);
        assert!(!shown.chars().any(is_unsafe), "{shown}");
        assert_eq!(
            shown,
            "pay 10\\u{1b}[2K\\r\\u{1b}[32mAPPROVED\\u{7}\\u{202e}00.01\\u{200b}\\u{2066}x\\u{9b}31m"
        );
    }

    #[test]
    fn leaves_ordinary_text_alone() {
        let fine = "Zoë paid 12,50 € — naïve café 日本語";
        assert!(matches!(sanitize(fine), Cow::Borrowed(_)));
    }

    #[test]
    fn json_output_is_sanitized_too() {
        // JSON escapes C0 controls itself, but not bidi or zero-width characters.
        let v = serde_json::json!({"memo": "ok\u{202e}gnp.exe"});
        assert_eq!(json_line(&v), r#"{"memo":"ok\u{202e}gnp.exe"}"#);
    }
}
