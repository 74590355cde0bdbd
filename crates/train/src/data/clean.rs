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
///
/// One pass over the characters into one output string (memory: the input and the output).
pub fn clean(text: &str) -> String {
    let mut chars = text.chars().peekable();
    let unified = std::iter::from_fn(move || match chars.next()? {
        '\r' => {
            chars.next_if_eq(&'\n');
            Some('\n')
        }
        c => Some(c),
    });
    let mut out = String::with_capacity(text.len());
    // Spaces and tabs seen since the line's last other character: written only if another
    // character follows on the line (trailing ones are dropped).
    let mut pending = String::new();
    let (mut line_empty, mut blank_run) = (true, 0);
    for c in unified.nfc() {
        let c = match c {
            '\n' | '\t' => c,
            c if c.is_control() => continue,
            '\u{200B}'..='\u{200F}' | '\u{2028}' | '\u{2029}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}' => continue,
            c if c.is_whitespace() => ' ',
            c => c,
        };
        match c {
            '\n' => {
                pending.clear();
                if line_empty {
                    blank_run += 1;
                    if blank_run > 1 {
                        continue;
                    }
                }
                out.push('\n');
                line_empty = true;
            }
            ' ' | '\t' => pending.push(c),
            c => {
                if line_empty {
                    (line_empty, blank_run) = (false, 0);
                }
                out.push_str(&pending);
                pending.clear();
                out.push(c);
            }
        }
    }
    // Trimmed in place.
    let end = out.trim_end().len();
    out.truncate(end);
    let start = out.len() - out.trim_start().len();
    out.drain(..start);
    out
}

#[cfg(test)]
mod tests {
    use super::clean;
    use unicode_normalization::UnicodeNormalization;

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

    /// The rules written the plain way (a pass per rule), which the one-pass `clean` must
    /// equal on any text.
    fn reference(text: &str) -> String {
        let nfc: String = text.replace("\r\n", "\n").replace('\r', "\n").nfc().collect();
        let mut s = String::new();
        for c in nfc.chars() {
            match c {
                '\n' | '\t' => s.push(c),
                c if c.is_control() => {}
                '\u{200B}'..='\u{200F}' | '\u{2028}' | '\u{2029}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}' => {}
                c if c.is_whitespace() => s.push(' '),
                c => s.push(c),
            }
        }
        let mut out = String::new();
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

    #[test]
    fn one_pass_equals_the_rules_on_random_text() {
        use rand::{Rng, SeedableRng};
        let alphabet = [
            'a', 'b', ' ', ' ', '\n', '\n', '\r', '\t', '\u{a0}', '\u{0}', '\u{301}', 'e', '\u{200b}', '\u{3000}', 'é',
        ];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..3000 {
            let n = rng.random_range(0..40);
            let t: String = (0..n).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect();
            assert_eq!(clean(&t), reference(&t), "input {t:?}");
        }
    }
}
