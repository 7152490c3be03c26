//! Peer-supplied bytes in logs: [`Peer`] renders them so that they cannot forge a log line
//! or a field.
//!
//! User names, domain names, certificate names and anything else that arrives from the
//! network are written through [`Peer`]:
//!
//! * always in double quotes, so a value never looks like a further `key=value` field;
//! * `\"` and `\\` for quotes and backslashes, `\n`, `\r`, `\t` for those controls;
//! * ASCII letters, digits, punctuation and space as they are; non-ASCII characters as they
//!   are only if they are alphanumeric (so `josé` stays readable), any other character
//!   (controls, bidi overrides, zero-width and line/paragraph separators) as `\u{XXXX}`;
//! * bytes that are not UTF-8 as `\xNN`;
//! * at most [`MAX_LOGGED`] bytes of input; a longer value ends in `…(N bytes)` with its
//!   full length.
//!
//! So a rendered value is one line of printable text whatever the peer sent.

use std::fmt::{self, Write as _};

/// Most input bytes of one value rendered into a log line.
pub const MAX_LOGGED: usize = 128;

/// Peer-supplied bytes, rendered escaped, quoted and capped (see the module documentation).
#[derive(Clone, Copy)]
pub struct Peer<'a>(pub &'a [u8]);

impl<'a> Peer<'a> {
    /// A peer-supplied string.
    pub fn str(s: &'a str) -> Peer<'a> {
        Peer(s.as_bytes())
    }
}

impl fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all = self.0;
        let shown = &all[..all.len().min(MAX_LOGGED)];
        f.write_char('"')?;
        for chunk in shown.utf8_chunks() {
            for c in chunk.valid().chars() {
                match c {
                    '"' => f.write_str("\\\"")?,
                    '\\' => f.write_str("\\\\")?,
                    '\n' => f.write_str("\\n")?,
                    '\r' => f.write_str("\\r")?,
                    '\t' => f.write_str("\\t")?,
                    ' '..='~' => f.write_char(c)?,
                    c if !c.is_ascii() && c.is_alphanumeric() => f.write_char(c)?,
                    c => write!(f, "\\u{{{:04x}}}", c as u32)?,
                }
            }
            // A character cut by the cap shows as its bytes, like invalid UTF-8.
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        f.write_char('"')?;
        if all.len() > shown.len() {
            write!(f, "…({} bytes)", all.len())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Peer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(b: &[u8]) -> String {
        Peer(b).to_string()
    }

    #[test]
    fn escapes_controls_quotes_and_invalid_utf8() {
        assert_eq!(show(b"alice"), "\"alice\"");
        assert_eq!(show(b""), "\"\"");
        assert_eq!(
            show(b"x\n2026-01-01T00:00:00Z  INFO fake line"),
            "\"x\\n2026-01-01T00:00:00Z  INFO fake line\""
        );
        assert_eq!(
            show(b"a\"b\\c\r\t\x00\x1b[31m"),
            "\"a\\\"b\\\\c\\r\\t\\u{0000}\\u{001b}[31m\""
        );
        assert_eq!(show(b"\xff\xfeok"), "\"\\xff\\xfeok\"");
        assert_eq!(show("josé".as_bytes()), "\"josé\"");
        // Bidi override, line separator, zero-width space.
        assert_eq!(
            show("a\u{202e}b\u{2028}c\u{200b}".as_bytes()),
            "\"a\\u{202e}b\\u{2028}c\\u{200b}\""
        );
        assert_eq!(Peer::str("user=x peer=y").to_string(), "\"user=x peer=y\"");
    }

    #[test]
    fn capped_with_the_full_length() {
        let long = vec![b'a'; 1000];
        let s = show(&long);
        assert!(s.starts_with(&format!("\"{}\"", "a".repeat(MAX_LOGGED))), "{s}");
        assert!(s.ends_with("…(1000 bytes)"), "{s}");
        // A multi-byte character cut by the cap shows as bytes, never a panic.
        let mut cut = vec![b'a'; MAX_LOGGED - 1];
        cut.extend_from_slice("é".as_bytes());
        assert!(show(&cut).contains("\\xc3\"…(129 bytes)"), "{}", show(&cut));
    }

    #[test]
    fn never_emits_a_line_break_or_unprintable_ascii() {
        for b in 0u8..=255 {
            let s = show(&[b, b'x', b]);
            assert!(s.chars().all(|c| !c.is_control()), "{b:#x}: {s:?}");
        }
    }
}
