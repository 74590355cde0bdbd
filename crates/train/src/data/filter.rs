//! Quality heuristics, each with a configurable threshold and its own removal count
//! (in the spirit of the Gopher rules, "Scaling Language Models", Rae et al. 2021, §A.1).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Thresholds; a value of 0 turns a maximum off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Filters {
    /// Documents shorter than this many characters are dropped.
    pub min_chars: usize,
    /// Documents longer than this many characters are dropped (0 = no limit).
    pub max_chars: usize,
    /// Maximum ratio of symbol characters (neither alphanumeric nor whitespace) to
    /// alphanumeric ones.
    pub max_symbol_ratio: f64,
    /// Maximum fraction of non-empty lines that repeat an earlier line of the same document
    /// (0 = off, the default: plays and code repeat lines legitimately; Gopher uses 0.3 on web
    /// text).
    pub max_repeated_lines: f64,
}

impl Default for Filters {
    fn default() -> Self {
        Self { min_chars: 1, max_chars: 0, max_symbol_ratio: 1.0, max_repeated_lines: 0.0 }
    }
}

/// Which rule removed a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// Shorter than `min_chars`.
    TooShort,
    /// Longer than `max_chars`.
    TooLong,
    /// Above `max_symbol_ratio`.
    Symbols,
    /// Above `max_repeated_lines`.
    RepeatedLines,
}

impl Rule {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Rule::TooShort => "too_short",
            Rule::TooLong => "too_long",
            Rule::Symbols => "symbol_ratio",
            Rule::RepeatedLines => "repeated_lines",
        }
    }
}

impl Filters {
    /// The first rule `doc` fails, if any.
    pub fn check(&self, doc: &str) -> Option<Rule> {
        let n = doc.chars().count();
        if n < self.min_chars {
            return Some(Rule::TooShort);
        }
        if self.max_chars > 0 && n > self.max_chars {
            return Some(Rule::TooLong);
        }
        let (mut alnum, mut sym) = (0usize, 0usize);
        for c in doc.chars() {
            if c.is_alphanumeric() {
                alnum += 1;
            } else if !c.is_whitespace() {
                sym += 1;
            }
        }
        if sym as f64 > self.max_symbol_ratio * alnum as f64 {
            return Some(Rule::Symbols);
        }
        if self.max_repeated_lines > 0.0 {
            let mut seen: HashMap<&str, ()> = HashMap::new();
            let (mut lines, mut repeats) = (0usize, 0usize);
            for l in doc.lines().map(str::trim).filter(|l| !l.is_empty()) {
                lines += 1;
                if seen.insert(l, ()).is_some() {
                    repeats += 1;
                }
            }
            if lines > 1 && repeats as f64 > self.max_repeated_lines * lines as f64 {
                return Some(Rule::RepeatedLines);
            }
        }
        None
    }
}
