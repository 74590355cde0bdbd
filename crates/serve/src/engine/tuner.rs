//! Whether a step of several sequences runs as two halves on two threads: [`SplitSteps`], and
//! [`SplitTuner`], which measures which way is faster on this machine under this load.

use std::time::Instant;

/// Whether the engine runs a step of several sequences of a small model as two halves on two
/// threads or on its own thread alone ([`Model::can_split`](lmstack_core::Model::can_split), [`Model::forward_cached_on`](lmstack_core::Model::forward_cached_on)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitSteps {
    /// Steps of at least 8 tokens (`SPLIT_MIN_TOKENS`) run whichever way this machine
    /// measures faster: a [`SplitTuner`] alternates the two over windows of such steps, keeps
    /// the one that generated more tokens per second, and measures again every few seconds.
    /// (A split step costs thread wake-ups and a core the HTTP side may need; whether its
    /// halves' saving is larger depends on the CPU and the load.) Smaller steps run alone.
    Auto,
    /// Split every step the model can.
    Always,
    /// The engine thread runs every such step alone.
    Never,
}

/// Tokens from which [`SplitSteps::Auto`] considers splitting a step: a smaller step's halves
/// take less time than the hand-off's thread wake-ups.
pub const SPLIT_MIN_TOKENS: usize = 8;

/// [`SplitSteps::Auto`]'s choice, by measurement. Over a trial, windows of `window` eligible
/// steps alternate between one thread and two halves (`pairs` windows each), each window
/// measured after `settle` steps in its mode so that the previous mode's after-effects fade;
/// a window's rate is the tokens of all steps started in it over the wall time from its first
/// measured step to the step after its last, so the cost a split puts on the rest of the
/// engine loop (sampling, streaming, a core taken from the HTTP side) counts as well as the
/// step itself. The mode with the higher median rate then runs for `hold` eligible steps, and
/// a new trial starts. An idle engine (a gap of over [`SplitTuner::MAX_GAP`] between steps)
/// starts the trial over, since the load after it may differ.
#[derive(Debug, Clone)]
pub struct SplitTuner {
    window: usize,
    settle: usize,
    pairs: usize,
    hold: usize,
    state: TunerState,
    last: Option<Instant>,
    chosen: Option<bool>,
}

#[derive(Debug, Clone)]
enum TunerState {
    Trying { split: bool, start: Option<Instant>, steps: usize, tokens: usize, rates: [Vec<f64>; 2] },
    Holding { split: bool, left: usize },
}

impl TunerState {
    /// A new trial whose first window runs `split`.
    fn trying(split: bool) -> Self {
        Self::Trying { split, start: None, steps: 0, tokens: 0, rates: [vec![], vec![]] }
    }
}

impl Default for SplitTuner {
    fn default() -> Self {
        Self::new(128, 16, 3, 4000)
    }
}

impl SplitTuner {
    /// A gap between steps longer than this starts the current trial over.
    pub const MAX_GAP: std::time::Duration = std::time::Duration::from_millis(50);

    /// A tuner with `window` eligible steps per measured window, each after `settle` unmeasured
    /// steps in its mode, `pairs` windows per mode per trial, and `hold` eligible steps between
    /// trials.
    pub fn new(window: usize, settle: usize, pairs: usize, hold: usize) -> Self {
        let state = TunerState::trying(false);
        Self { window: window.max(1), settle, pairs: pairs.max(1), hold, state, last: None, chosen: None }
    }

    /// Called as each step starts, at `now`, with its `tokens` and whether it could split;
    /// returns whether it runs as two halves. The gap that counts as idle runs from the end
    /// of the previous step ([`SplitTuner::after_step`]; without it, from its start).
    pub fn on_step(&mut self, now: Instant, tokens: usize, eligible: bool) -> bool {
        let gap = self.last.is_some_and(|l| now.saturating_duration_since(l) > Self::MAX_GAP);
        self.last = Some(now);
        match &mut self.state {
            TunerState::Holding { split, left } => {
                let choice = *split && eligible;
                if eligible {
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        self.state = TunerState::trying(!*split);
                    }
                }
                choice
            }
            TunerState::Trying { split, start, steps, tokens: toks, rates } => {
                if gap {
                    // The engine idled: the load may differ now, so the trial starts over.
                    (*start, *steps, *toks) = (None, 0, 0);
                    rates.iter_mut().for_each(Vec::clear);
                }
                if *steps >= self.settle + self.window {
                    // This step starts after the window's last: close the window.
                    if let Some(t0) = *start {
                        let dt = now.saturating_duration_since(t0).as_secs_f64();
                        if dt > 0.0 {
                            rates[usize::from(*split)].push(*toks as f64 / dt);
                        }
                    }
                    (*start, *steps, *toks) = (None, 0, 0);
                    *split = !*split;
                    if rates.iter().all(|r| r.len() >= self.pairs) {
                        let [one, two] = rates.clone().map(median);
                        tracing::debug!(one_thread = one, two_halves = two, "split-step trial (tokens/s)");
                        self.state = TunerState::Holding { split: two > one, left: self.hold.max(1) };
                        self.chosen = Some(two > one);
                        // This step is the first of the hold (`last` is now: no gap).
                        return self.on_step(now, tokens, eligible);
                    }
                }
                if !eligible {
                    if start.is_some() {
                        *toks += tokens;
                    }
                    return false;
                }
                *steps += 1;
                if *steps > self.settle {
                    // Past the steps that let the previous mode's after-effects fade.
                    start.get_or_insert(now);
                    *toks += tokens;
                }
                *split
            }
        }
    }

    /// Called when a step (forward, sampling and streaming) has finished, at `now`: a long
    /// step is not an idle engine.
    pub fn after_step(&mut self, now: Instant) {
        self.last = Some(now);
    }

    /// Whether the last finished trial chose two halves (`None` until one has finished).
    pub fn chosen(&self) -> Option<bool> {
        self.chosen
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => v[n / 2],
        _ => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds a tuner steps of 16 tokens from `start`, each lasting as long as its mode takes;
    /// returns the choices it made once a trial had finished, and the time it ends at.
    fn drive_from(
        t: &mut SplitTuner,
        start: Instant,
        steps: usize,
        ms_one: f64,
        ms_two: f64,
    ) -> ((usize, usize), Instant) {
        let mut now = start;
        let (mut split, mut alone) = (0, 0);
        for _ in 0..steps {
            let two = t.on_step(now, 16, true);
            if t.chosen().is_some() {
                *(if two { &mut split } else { &mut alone }) += 1;
            }
            now += std::time::Duration::from_secs_f64(if two { ms_two } else { ms_one } / 1e3);
        }
        ((split, alone), now)
    }

    #[test]
    fn auto_keeps_whichever_mode_generates_faster_and_measures_again() {
        // Two halves faster: after the first trial nearly every step splits.
        let mut t = SplitTuner::new(8, 2, 3, 200);
        let ((split, alone), _) = drive_from(&mut t, Instant::now(), 1000, 1.6, 1.1);
        assert_eq!(t.chosen(), Some(true));
        assert!(split > 5 * alone, "{split} split, {alone} alone");
        // One thread faster (e.g. the halves wait for a core): it settles on one thread.
        let mut t = SplitTuner::new(8, 2, 3, 200);
        let ((split, alone), end) = drive_from(&mut t, Instant::now(), 1000, 1.0, 1.3);
        assert_eq!(t.chosen(), Some(false));
        assert!(alone > 5 * split, "{split} split, {alone} alone");
        // The machine changes: the next trials follow.
        let ((split, _), _) = drive_from(&mut t, end, 1000, 1.6, 1.1);
        assert!(split > 500 && t.chosen() == Some(true), "{split}");
        // Steps too small to split never do.
        let mut t = SplitTuner::new(4, 0, 1, 10);
        let mut now = Instant::now();
        assert!(!t.on_step(now, 3, false));
        // An idle second inside a window is not measured as a slow window: the step after it
        // measures the same mode again, and the faster mode still wins.
        let ms = std::time::Duration::from_millis(1);
        for _ in 0..4 {
            assert!(!t.on_step(now, 16, true));
            now += ms;
        }
        now += std::time::Duration::from_secs(1);
        assert!(!t.on_step(now, 16, true), "the window before the gap was closed");
        drive_from(&mut t, now, 100, 1.0, 1.3);
        assert_eq!(t.chosen(), Some(false));
        // A long step is not idleness: a step of 80 ms ended just before the next keeps the
        // window (it closes on schedule and the trial moves on to the other mode).
        let mut t = SplitTuner::new(2, 0, 2, 10);
        let now = Instant::now();
        assert!(!t.on_step(now, 16, true));
        t.after_step(now + std::time::Duration::from_millis(80));
        assert!(!t.on_step(now + std::time::Duration::from_millis(81), 16, true));
        t.after_step(now + std::time::Duration::from_millis(161));
        assert!(t.on_step(now + std::time::Duration::from_millis(162), 16, true), "the window closed, two halves next");
    }

    #[test]
    fn split_steps_names() {
        use clap::ValueEnum;
        assert_eq!(SplitSteps::from_str("never", false), Ok(SplitSteps::Never));
        assert_eq!(SplitSteps::from_str("always", false), Ok(SplitSteps::Always));
        assert!(SplitSteps::from_str("sometimes", false).is_err());
        let names: Vec<String> = SplitSteps::value_variants()
            .iter()
            .filter_map(|v| Some(v.to_possible_value()?.get_name().to_string()))
            .collect();
        assert!(names.join(", ").contains("auto, always, never"), "{names:?}");
    }
}
