//! Text cleaning: Unicode NFC, control characters removed, whitespace normalised.

use unicode_normalization::UnicodeNormalization;

/// Cleans one document:
/// - Unicode NFC (composed characters, so "é" has one form);
/// - `\r\n` and `\r` become `\n`;
/// - control and format characters other than `\n` and `\t` are dropped (NUL, escape
///   sequences' ESC, zero-width spaces, byte-order marks …);
/// - other Unicode spaces (no-break, em, ideographic …) become a plain space;
/// - trailing spaces are removed from each line, runs of three or more newlines become two,
///   and the document is trimmed.
pub fn clean(text: &str) -> String {
    let nfc: String = text.replace("\r\n", "\n").replace('\r', "\n").nfc().collect();
    let mut s = String::with_capacity(nfc.len());
    for c in nfc.chars() {
        match c {
            '\n' | '\t' => s.push(c),
            c if c.is_control() => {}
            '\u{200B}'..='\u{200F}' | '\u{2028}' | '\u{2029}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}' => {}
            c if c.is_whitespace() => s.push(' '),
            c => s.push(c),
        }
    }
    let mut out = String::with_capacity(s.len());
    let mut blank_run = 0;
    for line in s.split('\n') {
        let line = line.trim_end();
        if line.is_empty() {
            blank_run += 1;
            if blank_run > 1 {
                continue;
            }
        } else {
            blank_run = 0;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::clean;

    #[test]
    fn cases() {
        let check = |input: &str, want: &str| assert_eq!(clean(input), want, "input {input:?}");
        check("e\u{301}", "\u{e9}");
        check("a\r\nb\rc", "a\nb\nc");
        check("a\u{0}b\u{1b}[31mc", "ab[31mc");
        check("zero\u{200b}width\u{feff}", "zerowidth");
        check("no\u{a0}break\u{3000}wide", "no break wide");
        check("trailing   \nspaces\t\n", "trailing\nspaces");
        check("a\n\n\n\n\nb", "a\n\nb");
        check("  \n\n  ", "");
        check("keep\ttabs inside", "keep\ttabs inside");
    }
}
