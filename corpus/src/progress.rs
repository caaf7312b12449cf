//! Progress reporting for long phases: an indicatif bar on a terminal, a plain log line every
//! few seconds otherwise (CI logs, files), or nothing.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, log lines otherwise.
    #[default]
    Auto,
    /// Periodic log lines (tracing `info`).
    Log,
    /// Nothing (tests, library use).
    Quiet,
}

/// What a phase counts its position in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Input bytes (reading); pairs are shown alongside.
    Bytes,
    /// Pairs.
    Pairs,
}

const LOG_EVERY: Duration = Duration::from_secs(5);

/// One phase's progress.
pub struct Progress {
    label: &'static str,
    unit: Unit,
    total: u64,
    bar: Option<ProgressBar>,
    log: bool,
    started: Instant,
    last_log: Instant,
    pairs: u64,
}

impl Progress {
    /// Starts a phase of `total` units.
    pub fn new(mode: ProgressMode, label: &'static str, unit: Unit, total: u64) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let (bar, log) = match mode {
            ProgressMode::Auto if terminal => (Some(Self::make_bar(label, unit, total)), false),
            ProgressMode::Auto | ProgressMode::Log => (None, true),
            ProgressMode::Quiet => (None, false),
        };
        let now = Instant::now();
        Self { label, unit, total, bar, log, started: now, last_log: now, pairs: 0 }
    }

    fn make_bar(label: &str, unit: Unit, total: u64) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(5));
        let counts = match unit {
            Unit::Bytes => "{bytes}/{total_bytes}",
            Unit::Pairs => "{human_pos}/{human_len} pairs",
        };
        let template = format!("{label:>9} [{{bar:30}}] {counts} {{msg}} ({{eta}} left)");
        bar.set_style(
            ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "),
        );
        bar
    }

    /// Updates the position and the pair count.
    pub fn update(&mut self, position: u64, pairs: u64) {
        self.pairs = pairs;
        let rate = self.pairs_per_second();
        if let Some(bar) = &self.bar {
            bar.set_position(position);
            if self.unit == Unit::Bytes {
                bar.set_message(format!("{pairs} pairs, {rate:.0} pairs/s"));
            } else {
                bar.set_message(format!("{rate:.0} pairs/s"));
            }
        } else if self.log && self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            let percent =
                if self.total == 0 { 100.0 } else { 100.0 * position as f64 / self.total as f64 };
            tracing::info!(
                phase = self.label,
                percent = format!("{percent:.1}"),
                pairs,
                pairs_per_s = format!("{rate:.0}"),
                "progress"
            );
        }
    }

    fn pairs_per_second(&self) -> f64 {
        self.pairs as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    /// Ends the phase and returns how long it took.
    pub fn finish(self) -> Duration {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.started.elapsed()
    }
}
