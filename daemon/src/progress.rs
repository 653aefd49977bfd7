//! A job's progress after one more metric point: a pure function the journal applies in the same
//! transaction that stores the point.
//!
//! Time counts only between steps of one attempt: the gap before an attempt's first step (the queue, a
//! pause, a restart, loading the model) is not training, so that step counts its own `step_ms`
//! instead. Data waits fall inside steps and count. A periodic checkpoint falls between the step it
//! saves and the next: that interval is split into a step (the current step-time estimate) and the
//! checkpoint (the rest), each with its own EMA, and the ETA adds the checkpoints still to come. So the
//! ETA neither jumps at a checkpoint nor forgets checkpoints, whatever their period.
use lorad_schema::trend::{self, Trend};
use lorad_schema::{MetricPoint, Progress};

/// The previous step's point, as far as the progress needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Previous {
    /// Its step.
    pub step: u64,
    /// When it ended (ms since the epoch).
    pub at_ms: u64,
    /// It was reported by the attempt that reports `point` now.
    pub same_attempt: bool,
}

/// `p` after `point`. `prev` is the stored point just before it (None for the first step);
/// `checkpoint_every` says which steps are followed by a checkpoint; `first_start_ms` is when the job
/// first started (the origin of `wall_s`).
pub fn advance(
    p: &mut Progress,
    point: &MetricPoint,
    prev: Option<Previous>,
    checkpoint_every: u64,
    first_start_ms: Option<u64>,
) {
    let own = point.step_ms.max(0.0) / 1000.0;
    let between = match prev {
        Some(q) if q.same_attempt && point.at_ms >= q.at_ms && point.step == q.step + 1 => Some((
            (point.at_ms - q.at_ms) as f64 / 1000.0,
            saves(q.step, checkpoint_every),
        )),
        _ => None,
    };
    let step_alpha = trend::alpha(trend::STEP_TIME_WINDOW);
    match between {
        Some((gap, true)) => {
            // A checkpoint and a step: the step as expected, the rest is the checkpoint's.
            let step = p.step_time_s.unwrap_or(own).min(gap);
            let ckpt = gap - step;
            p.checkpoint_s = Some(trend::ema(
                p.checkpoint_s,
                ckpt,
                trend::alpha(trend::CHECKPOINT_TIME_WINDOW),
            ));
            p.active_s += gap;
        }
        Some((gap, false)) => {
            p.step_time_s = Some(trend::ema(p.step_time_s, gap, step_alpha));
            p.active_s += gap;
        }
        None => {
            if own > 0.0 {
                p.step_time_s = Some(trend::ema(p.step_time_s, own, step_alpha));
            }
            p.active_s += own;
        }
    }
    let t = Trend {
        level: p.loss_ema,
        slope: p.loss_slope_per_100.map(|s| s / 100.0),
    }
    .update(point.loss, 1, trend::alpha(trend::LOSS_WINDOW));
    p.loss_ema = t.level;
    p.loss_slope_per_100 = t.slope.map(|s| s * 100.0);
    p.step = point.step;
    p.epoch = point.epoch;
    p.loss = Some(point.loss);
    p.eta_s = Some(eta(p, checkpoint_every));
    if let Some(first) = first_start_ms {
        p.wall_s = point.at_ms.saturating_sub(first) as f64 / 1000.0;
    }
}

/// True when the worker writes a periodic checkpoint after `step`.
fn saves(step: u64, checkpoint_every: u64) -> bool {
    checkpoint_every > 0 && step > 0 && step.is_multiple_of(checkpoint_every)
}

/// Seconds left (`trend::time_left`); 0 until a step has been timed.
fn eta(p: &Progress, checkpoint_every: u64) -> f64 {
    p.step_time_s.map_or(0.0, |per_step| {
        trend::time_left(
            p.step,
            p.total_steps,
            checkpoint_every,
            per_step,
            p.checkpoint_s,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: u64, at_ms: u64, step_ms: f64, loss: f64) -> MetricPoint {
        MetricPoint {
            step,
            epoch: 0.0,
            loss,
            lr: 1e-3,
            grad_norm: None,
            tokens_per_s: 0.0,
            samples_per_s: 0.0,
            step_ms,
            data_wait_ms: 0.0,
            gpu: None,
            cpu: None,
            at_ms,
        }
    }

    /// Steps of 100 ms each with a 500 ms checkpoint every 10th, a pause of an hour after step 50
    /// and a first step after it that took 2 s to load: what the ETA and the times say.
    fn run(steps: u64, pause_after: u64) -> (Progress, Vec<(u64, f64)>) {
        let mut p = Progress {
            total_steps: steps,
            ..Progress::default()
        };
        let mut at = 1_000_000u64;
        let mut prev: Option<Previous> = None;
        let mut etas = Vec::new();
        for step in 1..=steps {
            let resumed = step == pause_after + 1;
            if resumed {
                at += 3_600_000 + 2_000;
            }
            at += 100;
            let pt = point(step, at, 100.0, 3.0 - step as f64 * 0.001);
            let prev_here = prev.map(|q| Previous {
                same_attempt: !resumed,
                ..q
            });
            advance(&mut p, &pt, prev_here, 10, Some(1_000_000));
            etas.push((step, p.eta_s.unwrap_or(f64::NAN)));
            prev = Some(Previous {
                step,
                at_ms: at,
                same_attempt: true,
            });
            if step % 10 == 0 {
                at += 500;
            }
        }
        (p, etas)
    }

    #[test]
    fn active_time_leaves_out_the_pause_and_the_loading() {
        let (p, _) = run(100, 50);
        // 100 steps of 0.1 s and 9 checkpoints of 0.5 s between steps (the one after step 50 fell
        // into the pause, and the one after step 100 is after the last step).
        let want = 100.0 * 0.1 + 8.0 * 0.5;
        assert!((p.step_time_s.unwrap_or(0.0) - 0.1).abs() < 1e-9);
        assert!((p.checkpoint_s.unwrap_or(0.0) - 0.5).abs() < 1e-9);
        assert!((p.active_s - want).abs() < 1e-9, "{} vs {want}", p.active_s);
        assert!(p.wall_s > 3600.0 && p.wall_s < 3620.0, "{}", p.wall_s);
    }

    #[test]
    fn the_eta_after_a_pause_matches_the_time_left() {
        let (_, etas) = run(200, 50);
        for (step, eta) in etas.iter().filter(|(s, _)| (51..200).contains(s)) {
            // Steps left at 0.1 s, and the checkpoints after steps step..=190 at 0.5 s.
            let truth = (200 - step) as f64 * 0.1 + (190 / 10 - (step - 1) / 10) as f64 * 0.5;
            assert!(
                (eta - truth).abs() < 1e-6,
                "step {step}: eta {eta:.2} s, {truth:.2} s left"
            );
        }
        assert_eq!(etas.last().map(|e| e.1), Some(0.0));
    }

    #[test]
    fn the_loss_trend_follows_the_loss() {
        let (p, _) = run(300, 1000);
        let slope = p.loss_slope_per_100.unwrap_or(0.0);
        assert!((slope + 0.1).abs() < 1e-6, "{slope}");
        let ema = p.loss_ema.unwrap_or(0.0);
        // The EMA lags a falling line by (window - 1) / 2 steps' worth of decline.
        let lag = (trend::LOSS_WINDOW as f64 - 1.0) / 2.0 * 0.001;
        assert!((ema - (3.0 - 0.3 + lag)).abs() < 1e-6, "{ema}");
    }

    #[test]
    fn a_nan_loss_leaves_the_trend_alone() {
        let mut p = Progress::default();
        advance(&mut p, &point(1, 10, 5.0, 2.0), None, 0, None);
        advance(&mut p, &point(2, 20, 5.0, f64::NAN), None, 0, None);
        assert_eq!(p.loss_ema, Some(2.0));
        assert!(p.loss.is_some_and(f64::is_nan));
    }
}
