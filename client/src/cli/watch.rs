//! `watch JOB`: a live progress bar until the job ends, surviving dropped connections.
use super::follow::{finish, Follow};
use super::{output, print_json_line, Ctx};
use indicatif::{ProgressBar, ProgressStyle};
use lorad_client::lorad_schema::{EventBody, JobId, JobRecord, JobState, MetricPoint};
use std::process::ExitCode;

/// What the bar shows, updated from the record and from metric events.
#[derive(Debug, Default)]
struct View {
    state: Option<JobState>,
    step: u64,
    total: u64,
    loss: Option<f64>,
    tokens_per_s: Option<f64>,
    /// Smoothed wall time per step, for the ETA.
    step_ms: Option<f64>,
    /// The daemon's own estimate, used until steps have been timed here.
    eta_s: Option<f64>,
}

impl View {
    fn record(&mut self, r: &JobRecord) {
        self.state = Some(r.state);
        self.step = self.step.max(r.progress.step);
        self.total = r.progress.total_steps;
        self.loss = r.progress.loss.or(self.loss);
        self.eta_s = r.progress.eta_s;
    }

    fn point(&mut self, p: &MetricPoint) {
        if p.step >= self.step {
            self.step = p.step;
            self.loss = Some(p.loss);
            self.tokens_per_s = Some(p.tokens_per_s);
        }
        // An exponential moving average keeps the ETA from jumping with every step.
        self.step_ms = Some(
            self.step_ms
                .map_or(p.step_ms, |avg| 0.8 * avg + 0.2 * p.step_ms),
        );
    }

    fn eta(&self) -> Option<f64> {
        let remaining = self
            .total
            .checked_sub(self.step)
            .filter(|_| self.total > 0)?;
        match self.step_ms {
            Some(ms) => Some(remaining as f64 * ms / 1000.0),
            None => self.eta_s,
        }
    }

    fn message(&self) -> String {
        let mut parts = vec![format!("loss {}", output::loss(self.loss))];
        if let Some(tps) = self.tokens_per_s {
            parts.push(format!("{tps:.0} tok/s"));
        }
        if let Some(eta) = self.eta().filter(|_| self.state == Some(JobState::Running)) {
            parts.push(format!("ETA {}", output::duration(eta)));
        }
        parts.join(" | ")
    }
}

/// The progress bar, drawn as a bar once the total is known and as a step counter before.
struct Bar {
    bar: ProgressBar,
    with_total: Option<bool>,
}

impl Bar {
    fn new(hidden: bool) -> Bar {
        let bar = if hidden {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(0)
        };
        if let Ok(style) = ProgressStyle::with_template("{prefix} {msg}") {
            bar.set_style(style);
        }
        Bar {
            bar,
            with_total: None,
        }
    }

    fn render(&mut self, job: JobId, view: &View) {
        self.bar.set_length(view.total.max(view.step));
        self.bar.set_position(view.step);
        let with_total = view.total > 0;
        if self.with_total != Some(with_total) {
            let template = if with_total {
                "{prefix} [{wide_bar}] {pos}/{len} {msg}"
            } else {
                "{prefix} step {pos} {msg}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                self.bar.set_style(style.progress_chars("=> "));
            }
            self.with_total = Some(with_total);
        }
        let state = view.state.map_or("?", JobState::as_str);
        self.bar.set_prefix(format!("job {job} {state}"));
        self.bar.set_message(view.message());
    }
}

/// `watch JOB`. With `--json`, prints each event as one JSON line instead of drawing a bar, and the
/// final record as the last line.
pub async fn watch(ctx: &Ctx, job: JobId) -> anyhow::Result<ExitCode> {
    let mut bar = Bar::new(ctx.json);
    let notice_bar = bar.bar.clone();
    let json = ctx.json;
    let mut follow = Follow::new(ctx, job, move |m| {
        if json {
            eprintln!("loractl: {m}");
        } else {
            notice_bar.println(format!("loractl: {m}"));
        }
    });
    let mut view = View::default();
    let record = 'attach: loop {
        let mut a = follow.attach().await?;
        view.record(&a.record);
        if view.tokens_per_s.is_none() && a.record.progress.step > 0 {
            let since = a.record.progress.step.saturating_sub(1);
            if let Some(p) = a
                .client
                .metrics(job, Some(since))
                .await
                .ok()
                .and_then(|mut v| v.pop())
            {
                view.point(&p);
            }
        }
        bar.render(job, &view);
        if a.record.state.is_terminal() {
            break 'attach a.record;
        }
        while let Some(event) = a.sub.next().await {
            follow.saw(event.seq);
            if ctx.json {
                print_json_line(&event)?;
            }
            match &event.body {
                EventBody::Metrics { point } => view.point(point),
                EventBody::Notice { level, text } => bar.bar.println(format!("{level}: {text}")),
                EventBody::StateChanged { to, .. } => {
                    view.state = Some(*to);
                    // The record has the new total and reason; a live end finishes the watch.
                    match a.client.get(job).await {
                        Ok(record) => {
                            view.record(&record);
                            if record.state.is_terminal() && event.seq > a.sub.replay_until() {
                                bar.render(job, &view);
                                break 'attach record;
                            }
                        }
                        Err(e) if e.is_disconnect() => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                EventBody::Checkpoint { name, .. } => bar.bar.println(format!("checkpoint {name}")),
                EventBody::Export { format, text } => {
                    bar.bar.println(format!("export {format}: {text}"))
                }
                EventBody::Log { .. } => {}
            }
            bar.render(job, &view);
        }
    };
    bar.bar.finish_and_clear();
    finish(ctx, &record, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: u64, loss: f64, step_ms: f64) -> MetricPoint {
        MetricPoint {
            step,
            epoch: 0.0,
            loss,
            lr: 1e-4,
            grad_norm: None,
            tokens_per_s: 1000.0,
            samples_per_s: 4.0,
            step_ms,
            data_wait_ms: 0.0,
            gpu: None,
            cpu: None,
            at_ms: 0,
        }
    }

    #[test]
    fn view_tracks_the_newest_step_and_estimates_eta() {
        let mut v = View {
            state: Some(JobState::Running),
            total: 10,
            ..View::default()
        };
        v.point(&point(2, 2.5, 1000.0));
        v.point(&point(1, 9.0, 1000.0)); // replayed, older: does not move the bar back
        assert_eq!(v.step, 2);
        assert_eq!(v.loss, Some(2.5));
        assert_eq!(v.eta(), Some(8.0));
        assert_eq!(v.message(), "loss 2.5000 | 1000 tok/s | ETA 8s");
        v.state = Some(JobState::Paused);
        assert_eq!(v.message(), "loss 2.5000 | 1000 tok/s");
    }
}
