//! `train data synth`: labelled instruction data generated from templates, for tasks a small
//! model can learn and an eval can score exactly. Seeded; the held-out test split shares no
//! prompt with the training split.
//!
//! Tasks (two or three words from a built-in list of short lower-case words, so that a prompt,
//! its answer and the chat markup fit the default model's 64-character context):
//! - `reverse`: `reverse: pear fig kiwi` → `kiwi fig pear`
//! - `sort`: `sort: pear fig kiwi` → `fig kiwi pear`
//! - `lookup`: `a:pear b:fig c:kiwi. b?` → `fig` (read a value out of the prompt)
//! - `copy`: `copy: pear fig` → `pear fig`
//! - `add`: `add: 23 58` → `81` (digits: needs a tokenizer that has them — a byte-level BPE
//!   does, a character vocabulary taken from Shakespeare does not)
//!
//! Each line has `task`, `prompt`, `answer` and the chat form `messages` (user, assistant), so
//! it feeds `train finetune` and an eval task alike.
//!
//! `--preference` writes preference pairs instead, in TRL's conversational shape: `prompt` (the
//! user turn), `chosen` (the right answer) and `rejected` (a wrong one that is checkably wrong:
//! the words left in their order for `reverse`, sorted backwards for `sort`, another key's
//! value for `lookup`, reordered or another word for `copy`, a sum off by 1 to 10 for `add`),
//! with `task` and `answer` kept for scoring.

use std::collections::HashSet;
use std::path::Path;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::{Error, Result};

/// The tasks `synth` knows.
pub const TASKS: [&str; 5] = ["reverse", "sort", "lookup", "copy", "add"];

const WORDS: &[&str] = &[
    "ant", "ape", "arm", "ash", "bat", "bay", "bed", "bee", "bell", "bird", "boat", "bone", "book", "bow", "box",
    "bud", "bus", "cake", "cap", "car", "cat", "cow", "cup", "day", "deer", "desk", "dog", "door", "dove", "duck",
    "ear", "egg", "elk", "elm", "eye", "fan", "fig", "fish", "flag", "fox", "frog", "gem", "goat", "gull", "hat",
    "hen", "hill", "hog", "horn", "ice", "ink", "jam", "jar", "jet", "key", "kid", "kite", "kiwi", "lamb", "lamp",
    "leaf", "lime", "lion", "log", "map", "mat", "milk", "moon", "moth", "mud", "nest", "net", "nut", "oak", "oar",
    "owl", "pan", "pea", "pear", "pen", "pig", "pin", "plum", "pot", "rat", "ring", "road", "rock", "rose", "rug",
    "sail", "salt", "sea", "seal", "ship", "shoe", "silk", "sky", "snow", "sock", "star", "sun", "swan", "tea", "tent",
    "tide", "toad", "top", "tree", "tub", "urn", "van", "vase", "vine", "wasp", "web", "well", "whale", "wind", "wing",
    "wolf", "wool", "yak", "yam", "yarn", "zoo",
];

/// One generated example: (task, prompt, answer).
pub fn example(task: &str, rng: &mut ChaCha8Rng) -> Result<(String, String)> {
    let words = |rng: &mut ChaCha8Rng, lo: usize, hi: usize| -> Vec<&'static str> {
        let n = rng.random_range(lo..=hi);
        WORDS.choose_multiple(rng, n).copied().collect()
    };
    Ok(match task {
        "reverse" => {
            let w = words(rng, 2, 3);
            let r: Vec<&str> = w.iter().rev().copied().collect();
            (format!("reverse: {}", w.join(" ")), r.join(" "))
        }
        "sort" => {
            let w = words(rng, 2, 3);
            let mut s = w.clone();
            s.sort_unstable();
            (format!("sort: {}", w.join(" ")), s.join(" "))
        }
        "lookup" => {
            let w = words(rng, 3, 3);
            let keys = ["a", "b", "c"];
            let k = rng.random_range(0..3);
            let pairs: Vec<String> = keys.iter().zip(&w).map(|(k, v)| format!("{k}:{v}")).collect();
            (format!("{}. {}?", pairs.join(" "), keys[k]), w[k].to_owned())
        }
        "copy" => {
            let w = words(rng, 1, 3);
            (format!("copy: {}", w.join(" ")), w.join(" "))
        }
        "add" => {
            let (a, b) = (rng.random_range(0..100u32), rng.random_range(0..100u32));
            (format!("add: {a} {b}"), (a + b).to_string())
        }
        other => return Err(Error::Msg(format!("--tasks: `{other}` is not one of {}", TASKS.join(", ")))),
    })
}

/// A wrong answer to `prompt` (whose right answer is `answer`), as the module describes:
/// always different from `answer`.
pub fn wrong_answer(task: &str, prompt: &str, answer: &str, rng: &mut ChaCha8Rng) -> Result<String> {
    let words_of = |s: &str| -> Vec<String> { s.split(' ').map(str::to_owned).collect() };
    let wrong = match task {
        "reverse" => prompt.trim_start_matches("reverse: ").to_owned(),
        "sort" => {
            let mut w = words_of(answer);
            w.reverse();
            w.join(" ")
        }
        "lookup" => {
            // `a:x b:y c:z. b?`: another key's value.
            let values: Vec<&str> =
                prompt.split(". ").next().unwrap_or("").split(' ').filter_map(|kv| kv.split(':').nth(1)).collect();
            let others: Vec<&&str> = values.iter().filter(|v| **v != answer).collect();
            others.choose(rng).map(|v| v.to_string()).unwrap_or_default()
        }
        "copy" => {
            let mut w = words_of(answer);
            if w.len() > 1 {
                w.reverse();
                w.join(" ")
            } else {
                WORDS
                    .iter()
                    .filter(|x| **x != answer)
                    .copied()
                    .collect::<Vec<_>>()
                    .choose(rng)
                    .map(|x| x.to_string())
                    .unwrap_or_default()
            }
        }
        "add" => {
            let n: i64 = answer.parse().map_err(|_| Error::Msg(format!("add: `{answer}` is not a number")))?;
            let off = rng.random_range(1..=10i64) * if rng.random_bool(0.5) || n < 10 { 1 } else { -1 };
            (n + off).to_string()
        }
        other => return Err(Error::Msg(format!("--tasks: `{other}` is not one of {}", TASKS.join(", ")))),
    };
    if wrong.is_empty() || wrong == answer {
        return Err(Error::Msg(format!("no wrong answer to `{prompt}` differs from `{answer}`")));
    }
    Ok(wrong)
}

/// What each line of [`write_shaped`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// An instruction example (`messages`, `prompt`, `answer`).
    Sft,
    /// A preference pair (`prompt`, `chosen`, `rejected` as messages; `answer`).
    Preference,
}

/// Writes `train.jsonl` (`n_train` examples) and `test.jsonl` (`n_test`, no prompt shared with
/// train) under `out`, tasks in turn; returns the counts written.
pub fn write(out: &Path, tasks: &[String], n_train: usize, n_test: usize, seed: u64) -> Result<(usize, usize)> {
    write_shaped(out, tasks, n_train, n_test, seed, Shape::Sft)
}

/// [`write()`], each line an instruction example or a preference pair.
pub fn write_shaped(
    out: &Path,
    tasks: &[String],
    n_train: usize,
    n_test: usize,
    seed: u64,
    shape: Shape,
) -> Result<(usize, usize)> {
    if tasks.is_empty() {
        return Err(Error::Msg(format!("--tasks: name at least one of {}", TASKS.join(", "))));
    }
    for t in tasks {
        if !TASKS.contains(&t.as_str()) {
            return Err(Error::Msg(format!("--tasks: `{t}` is not one of {}", TASKS.join(", "))));
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Wrong answers from a stream of their own, so a seed gives the same prompts in both shapes.
    let mut wrong_rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(0x9e37_79b9_7f4a_7c15));
    let mut seen = HashSet::new();
    let mut gen = |n: usize, seen: &mut HashSet<String>| -> Result<String> {
        let mut lines = String::new();
        let mut made = 0;
        let mut tries = 0;
        while made < n {
            let task = &tasks[made % tasks.len()];
            let (prompt, answer) = example(task, &mut rng)?;
            tries += 1;
            if tries > 50 * n + 1000 {
                return Err(Error::Msg(format!("cannot make {n} distinct examples of {tasks:?}; ask for fewer")));
            }
            if !seen.insert(prompt.clone()) {
                continue;
            }
            let line = match shape {
                Shape::Sft => json!({"task": task, "prompt": prompt, "answer": answer,
                    "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}),
                Shape::Preference => {
                    let wrong = wrong_answer(task, &prompt, &answer, &mut wrong_rng)?;
                    json!({"task": task, "answer": answer,
                        "prompt": [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": answer}],
                        "rejected": [{"role": "assistant", "content": wrong}]})
                }
            };
            lines.push_str(&line.to_string());
            lines.push('\n');
            made += 1;
        }
        Ok(lines)
    };
    // Test first, so the test split is the same whatever the size of train.
    let test = gen(n_test, &mut seen)?;
    let train = gen(n_train, &mut seen)?;
    std::fs::create_dir_all(out).map_err(|e| Error::Msg(format!("creating {}: {e}", out.display())))?;
    lmstack_core::io::write_atomic(&out.join("train.jsonl"), train.as_bytes())?;
    lmstack_core::io::write_atomic(&out.join("test.jsonl"), test.as_bytes())?;
    Ok((n_train, n_test))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_right_and_splits_disjoint() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for t in TASKS {
            let (p, a) = example(t, &mut rng).unwrap();
            match t {
                "add" => {
                    let n: Vec<u32> = p[5..].split(' ').map(|x| x.parse().unwrap()).collect();
                    assert_eq!(a, (n[0] + n[1]).to_string());
                }
                "sort" => {
                    let mut w: Vec<&str> = p[6..].split(' ').collect();
                    w.sort();
                    assert_eq!(a, w.join(" "));
                }
                _ => assert!(!a.is_empty()),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let tasks: Vec<String> = TASKS.iter().map(|s| s.to_string()).collect();
        write(dir.path(), &tasks, 300, 50, 7).unwrap();
        let read = |f: &str| -> Vec<serde_json::Value> {
            std::fs::read_to_string(dir.path().join(f))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let (train, test) = (read("train.jsonl"), read("test.jsonl"));
        assert_eq!((train.len(), test.len()), (300, 50));
        let tr: HashSet<&str> = train.iter().map(|v| v["prompt"].as_str().unwrap()).collect();
        assert!(test.iter().all(|v| !tr.contains(v["prompt"].as_str().unwrap())));
        // Same seed, same data.
        let d2 = tempfile::tempdir().unwrap();
        write(d2.path(), &tasks, 300, 50, 7).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("test.jsonl")).unwrap(),
            std::fs::read(d2.path().join("test.jsonl")).unwrap()
        );
        assert!(write(dir.path(), &["poetry".into()], 1, 1, 1).unwrap_err().to_string().contains("poetry"));
    }

    /// Preference pairs: the same prompts as the instruction data of the same seed, the chosen
    /// answer right, the rejected one wrong for every task, and each line a pair
    /// `preference::read_pairs` reads.
    #[test]
    fn preference_pairs_prefer_the_right_answer() {
        let dir = tempfile::tempdir().unwrap();
        let tasks: Vec<String> = TASKS.iter().map(|s| s.to_string()).collect();
        write_shaped(dir.path(), &tasks, 200, 20, 3, Shape::Preference).unwrap();
        let f = crate::preference::read_pairs(&dir.path().join("train.jsonl")).unwrap();
        assert_eq!((f.pairs.len(), f.identical.len()), (200, 0));
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("train.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for v in &lines {
            let (task, answer) = (v["task"].as_str().unwrap(), v["answer"].as_str().unwrap());
            assert_eq!(v["chosen"][0]["content"], answer);
            let wrong = v["rejected"][0]["content"].as_str().unwrap();
            assert_ne!(wrong, answer, "{v}");
            if task == "add" {
                let off = wrong.parse::<i64>().unwrap() - answer.parse::<i64>().unwrap();
                assert!((1..=10).contains(&off.abs()), "{v}");
            }
        }
        let sft = tempfile::tempdir().unwrap();
        write(sft.path(), &tasks, 200, 20, 3).unwrap();
        let prompts = |d: &Path, f: &str, field: &str| -> Vec<String> {
            std::fs::read_to_string(d.join(f))
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    match field {
                        "prompt" => v["prompt"].as_str().map(str::to_owned).unwrap(),
                        _ => v["prompt"][0]["content"].as_str().unwrap().to_owned(),
                    }
                })
                .collect()
        };
        assert_eq!(prompts(sft.path(), "test.jsonl", "prompt"), prompts(dir.path(), "test.jsonl", "messages"));
    }
}
