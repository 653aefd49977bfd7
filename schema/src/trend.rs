//! Smoothing shared by the daemon (ETA, the loss trend in `show`) and the clients (`watch`, `plot`), so
//! both sides draw the same smoothed curve from the same points.
//!
//! Everything here is an exponential moving average (EMA) with the usual factor `2 / (window + 1)`: the
//! weight of a point halves about every `window / 3` points, and a step change is ~86% absorbed after
//! `window` points. The first value seeds the average (no bias towards zero).

/// The window of the loss EMA (`loss_ema` in a job's progress, the smoothed curve of `plot`).
pub const LOSS_WINDOW: u64 = 20;

/// The window of the step-time EMA behind the ETA: long enough to ride out a slow step, short enough
/// to follow a real change of speed (another job started on the same CPU) within a few dozen steps.
pub const STEP_TIME_WINDOW: u64 = 20;

/// The window of the checkpoint-time EMA (checkpoints are rarer than steps, and alike).
pub const CHECKPOINT_TIME_WINDOW: u64 = 5;

/// The EMA factor for a window of `window` points (1 for a window of 0 or 1: no smoothing).
pub fn alpha(window: u64) -> f64 {
    2.0 / (window.max(1) as f64 + 1.0)
}

/// One EMA step: `prev` moved towards `value` by `alpha`; the first value (None) seeds it.
pub fn ema(prev: Option<f64>, value: f64, alpha: f64) -> f64 {
    match prev {
        Some(p) if p.is_finite() => p + alpha * (value - p),
        _ => value,
    }
}

/// Seconds left after `step` of `total`: the steps left at `step_time_s`, and the periodic checkpoints
/// (every `checkpoint_every` steps) from `step` (written after its point was reported) up to the last
/// step (whose save is the final adapter, not counted) at `checkpoint_s`. The daemon's `eta_s`, and
/// what `watch` counts down between records.
pub fn time_left(
    step: u64,
    total: u64,
    checkpoint_every: u64,
    step_time_s: f64,
    checkpoint_s: Option<f64>,
) -> f64 {
    if total <= step {
        return 0.0;
    }
    let steps = (total - step) as f64 * step_time_s;
    let checkpoints = match checkpoint_every {
        0 => 0,
        c => (total - 1) / c - step.saturating_sub(1) / c,
    };
    steps + checkpoints as f64 * checkpoint_s.unwrap_or(0.0)
}

/// A smoothed level and its slope: the loss EMA and how fast it moves, per step.
///
/// The slope is an EMA (same factor) of the level's step-to-step change. On a straight line
/// `y = a + b * step` the level lags the line by a constant, so its change is exactly `b` once the
/// start-up has decayed: the slope converges to the line's.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Trend {
    /// The smoothed value (None before the first point).
    pub level: Option<f64>,
    /// The smoothed change per step (None before the second point).
    pub slope: Option<f64>,
}

impl Trend {
    /// Adds the value at `step`, `steps` after the previous one (1 for consecutive steps; a gap, such
    /// as a resume from an older checkpoint, divides the change over the steps it spans).
    pub fn update(self, value: f64, steps: u64, alpha: f64) -> Trend {
        if !value.is_finite() {
            return self;
        }
        let level = ema(self.level, value, alpha);
        let slope = match self.level {
            Some(prev) => {
                let change = (level - prev) / steps.max(1) as f64;
                Some(ema(self.slope, change, alpha))
            }
            None => None,
        };
        Trend {
            level: Some(level),
            slope,
        }
    }
}

/// The smoothed series of `values` (the EMA after each point), as `plot` draws it.
pub fn smooth(values: &[f64], window: u64) -> Vec<f64> {
    let a = alpha(window);
    let mut prev = None;
    values
        .iter()
        .map(|&v| {
            let s = if v.is_finite() {
                ema(prev, v, a)
            } else {
                prev.unwrap_or(v)
            };
            prev = Some(s);
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_value_seeds_the_average() {
        assert_eq!(ema(None, 3.0, 0.1), 3.0);
        assert!((ema(Some(3.0), 4.0, 0.5) - 3.5).abs() < 1e-12);
        assert_eq!(alpha(1), 1.0);
        assert!((alpha(19) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn the_slope_of_a_line_is_found() {
        // y = 5 - 0.01 * step: -1.0 per 100 steps.
        let mut t = Trend::default();
        for step in 0..400u64 {
            t = t.update(5.0 - 0.01 * step as f64, 1, alpha(LOSS_WINDOW));
        }
        let per_100 = t.slope.map(|s| s * 100.0);
        assert!(
            per_100.is_some_and(|s| (s + 1.0).abs() < 1e-6),
            "{per_100:?}"
        );
        // A gap of 10 steps on the same line: the change is spread over them, so the slope stays
        // near the line's (the level's lag differs after a jump, so not exactly).
        let t2 = t.update(5.0 - 0.01 * 409.0, 10, alpha(LOSS_WINDOW));
        let s2 = t2.slope.unwrap_or(0.0) * 100.0;
        assert!((s2 + 1.0).abs() < 0.1, "{s2}");
    }

    #[test]
    fn a_flat_series_has_no_slope_and_nan_is_skipped() {
        let mut t = Trend::default();
        for _ in 0..50 {
            t = t.update(2.0, 1, alpha(LOSS_WINDOW));
        }
        let before = t;
        t = t.update(f64::NAN, 1, alpha(LOSS_WINDOW));
        assert_eq!(t, before);
        assert_eq!(t.level, Some(2.0));
        assert_eq!(t.slope, Some(0.0));
    }

    #[test]
    fn smooth_keeps_the_length_and_the_first_point() {
        let s = smooth(&[4.0, 2.0, 2.0, f64::INFINITY, 2.0], 3);
        assert_eq!(s.len(), 5);
        assert_eq!(s[0], 4.0);
        assert!((s[1] - 3.0).abs() < 1e-12);
        assert_eq!(s[3], s[2]);
    }
}
