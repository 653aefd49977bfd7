//! Human-readable renderings. Pure functions from wire types to text, so they are unit-tested.
use lorad_schema::{CheckpointInfo, DaemonStatus, JobRecord, MetricPoint, Template};
use std::fmt::Write as _;

/// Left-aligned columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            let _ = write!(line, "{cell:<width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `step/total`, with `?` while the total is unknown.
pub fn step_of(step: u64, total: u64) -> String {
    if total == 0 {
        format!("{step}/?")
    } else {
        format!("{step}/{total}")
    }
}

/// A loss with four decimals, or `-`.
pub fn loss(loss: Option<f64>) -> String {
    loss.map_or_else(|| "-".into(), |l| format!("{l:.4}"))
}

/// `1h 02m 03s`, `4m 05s`, `7s`.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    let s = secs.round() as u64;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SSZ` (UTC).
pub fn timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The `checkpoints` table, or a line saying there are none.
pub fn checkpoints_table(checkpoints: &[CheckpointInfo]) -> String {
    if checkpoints.is_empty() {
        return "no checkpoints\n".into();
    }
    let rows: Vec<Vec<String>> = checkpoints
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.step.to_string(),
                timestamp(c.created_at_ms),
                if c.pinned { "kept" } else { "" }.to_string(),
                c.path.clone(),
            ]
        })
        .collect();
    table(&["NAME", "STEP", "CREATED", "PINNED", "PATH"], &rows)
}

/// The `list` table.
pub fn job_table(jobs: &[JobRecord]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.state.to_string(),
                step_of(j.progress.step, j.progress.total_steps),
                loss(j.progress.loss),
                j.name.clone(),
            ]
        })
        .collect();
    table(&["ID", "STATE", "STEP", "LOSS", "NAME"], &rows)
}

/// The `list --wide` table: the list's columns, then device, energy and cost.
pub fn job_table_wide(jobs: &[JobRecord]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let p = &j.progress;
            vec![
                j.id.to_string(),
                j.state.to_string(),
                step_of(p.step, p.total_steps),
                loss(p.loss),
                p.device.clone().unwrap_or_else(|| "-".into()),
                p.energy_j.map_or_else(|| "not measured".into(), energy),
                p.cost.map_or_else(|| "-".into(), |c| format!("{c:.4}")),
                j.name.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID", "STATE", "STEP", "LOSS", "DEVICE", "ENERGY", "COST", "NAME",
        ],
        &rows,
    )
}

/// Joules as people read them: J, kJ, MJ, with the kWh.
pub fn energy(j: f64) -> String {
    let kwh = j / 3.6e6;
    match j {
        j if j < 1e3 => format!("{j:.1} J"),
        j if j < 1e6 => format!("{:.2} kJ ({kwh:.5} kWh)", j / 1e3),
        j => format!("{:.2} MJ ({kwh:.3} kWh)", j / 1e6),
    }
}

/// The smoothed loss and where it is heading: `2.3456 (-0.0312 per 100 steps)`.
pub fn trend(ema: f64, slope_per_100: Option<f64>) -> String {
    match slope_per_100 {
        Some(s) => format!("{ema:.4} ({s:+.4} per 100 steps)"),
        None => format!("{ema:.4}"),
    }
}

/// The `show` lines: `key: value`, keys named like the JSON fields.
pub fn job_details(j: &JobRecord) -> String {
    let p = &j.progress;
    let mut lines: Vec<(&str, String)> = vec![
        ("id", j.id.to_string()),
        ("name", j.name.clone()),
        ("state", j.state.to_string()),
    ];
    if let Some(reason) = &j.reason {
        lines.push(("reason", reason.clone()));
    }
    lines.extend([
        ("template", j.template.clone()),
        ("base_model", j.base_model.clone()),
        ("dataset", j.dataset.clone()),
        ("output_dir", j.output_dir.clone()),
        ("priority", j.priority.to_string()),
        ("owner_uid", j.owner_uid.to_string()),
        ("step", step_of(p.step, p.total_steps)),
        ("epoch", format!("{:.2}", p.epoch)),
        ("loss", loss(p.loss)),
    ]);
    if let Some(ema) = p.loss_ema {
        lines.push(("loss_ema", trend(ema, p.loss_slope_per_100)));
    }
    if let Some(eta) = p.eta_s.filter(|_| !j.state.is_terminal()) {
        lines.push(("eta", duration(eta)));
    }
    if let Some(t) = p.step_time_s {
        let per_step = match p.checkpoint_s {
            Some(c) => format!("{:.3} s/step, {c:.2} s/checkpoint", t),
            None => format!("{t:.3} s/step"),
        };
        lines.push(("step_time", per_step));
    }
    lines.push(("active", duration(p.active_s)));
    if p.wall_s > 0.0 {
        lines.push(("wall", duration(p.wall_s)));
    }
    lines.push(("restarts", p.restarts.to_string()));
    if let Some(device) = &p.device {
        lines.push(("device", device.clone()));
    }
    if let Some(bytes) = j.memory_estimate {
        lines.push(("memory_estimate", format!("{:.1} GB", bytes as f64 / 1e9)));
    }
    let source = p.energy_source.clone();
    lines.push((
        "energy",
        match (p.energy_j, source) {
            (Some(e), Some(src)) => format!("{} from {src}", energy(e)),
            (Some(e), None) => energy(e),
            (None, Some(why)) => why,
            (None, None) => "not measured".into(),
        },
    ));
    if let Some(cost) = p.cost {
        lines.push(("cost", format!("{cost:.4}")));
    }
    if !j.after.is_empty() {
        let ids: Vec<String> = j.after.iter().map(|id| id.to_string()).collect();
        lines.push(("after", ids.join(",")));
    }
    if let Some(t) = j.not_before_ms {
        lines.push(("not_before", timestamp(t)));
    }
    if let Some(cmd) = &j.on_finish {
        lines.push(("on_finish", cmd.clone()));
    }
    lines.push(("created", timestamp(j.created_at_ms)));
    if let Some(t) = j.started_at_ms {
        lines.push(("started", timestamp(t)));
    }
    if let Some(t) = j.finished_at_ms {
        lines.push(("finished", timestamp(t)));
    }
    if let Some(pid) = j.worker_pid.filter(|_| j.state.is_active()) {
        lines.push(("worker_pid", pid.to_string()));
    }
    if let Some(dir) = &j.adapter_dir {
        lines.push(("adapter_dir", dir.clone()));
    }
    if !j.overrides.is_empty() {
        let o: Vec<String> = j
            .overrides
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        lines.push(("overrides", o.join(" ")));
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    lines
        .iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}

/// The `status` summary.
pub fn status(s: &DaemonStatus) -> String {
    let mut out = format!(
        "lorad {} (protocol {}), pid {}, up {}\nstate dir: {}\njobs: {} total, {} queued, {} running\n",
        s.daemon_version,
        s.protocol,
        s.pid,
        duration(s.uptime_s as f64),
        s.state_dir,
        s.jobs,
        s.queued,
        s.running
    );
    let rows: Vec<Vec<String>> = s
        .devices
        .iter()
        .map(|d| {
            let job = d.job.map_or_else(|| "idle".into(), |j| format!("job {j}"));
            vec![d.name.clone(), job, d.description.clone()]
        })
        .collect();
    out.push_str("devices:\n");
    for line in table(&["DEVICE", "JOB", "DESCRIPTION"], &rows)
        .lines()
        .skip(1)
    {
        let _ = writeln!(out, "  {line}");
    }
    let p = &s.plugins;
    let _ = writeln!(
        out,
        "plugins: {} loaded, {} rejected",
        p.loaded.len(),
        p.rejected.len()
    );
    for plugin in &p.loaded {
        let _ = writeln!(out, "  {}  {}", plugin.name, plugin.path);
        if !plugin.provides.is_empty() {
            let _ = writeln!(out, "    {}", plugin.provides.join(", "));
        }
    }
    for rejected in &p.rejected {
        let _ = writeln!(out, "  rejected {}: {}", rejected.path, rejected.reason);
    }
    if p.loaded.is_empty() && p.rejected.is_empty() {
        let _ = writeln!(out, "  none found in {}", p.dirs.join(", "));
    }
    out
}

/// The `templates` listing: name, description, then every setting as `key=value` (the `--set` syntax).
pub fn templates(templates: &[Template]) -> String {
    let mut out = String::new();
    for t in templates {
        let _ = writeln!(out, "{}  {}", t.name, t.description);
        let pairs = settings_pairs(&t.settings);
        let mut line = String::from("   ");
        for pair in pairs {
            if line.len() + pair.len() + 1 > 100 && !line.trim().is_empty() {
                let _ = writeln!(out, "{}", line.trim_end());
                line = String::from("   ");
            }
            line.push(' ');
            line.push_str(&pair);
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// A value written the way `--set` accepts it.
fn settings_pairs(settings: &lorad_schema::TrainSettings) -> Vec<String> {
    use serde_json::Value;
    let Ok(Value::Object(map)) = serde_json::to_value(settings) else {
        return Vec::new();
    };
    map.into_iter()
        .map(|(k, v)| {
            let v = match v {
                Value::Null => "none".to_string(),
                Value::String(s) => s,
                Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            format!("{k}={v}")
        })
        .collect()
}

/// The `metrics` table.
pub fn metrics_table(points: &[MetricPoint]) -> String {
    let rows: Vec<Vec<String>> = points
        .iter()
        .map(|p| {
            vec![
                p.step.to_string(),
                format!("{:.3}", p.epoch),
                format!("{:.4}", p.loss),
                if p.lr == 0.0 {
                    "0".into()
                } else {
                    format!("{:.3e}", p.lr)
                },
                p.grad_norm
                    .map_or_else(|| "-".into(), |g| format!("{g:.3}")),
                format!("{:.0}", p.tokens_per_s),
                format!("{:.0}", p.step_ms),
            ]
        })
        .collect();
    table(
        &[
            "STEP",
            "EPOCH",
            "LOSS",
            "LR",
            "GRAD_NORM",
            "TOK/S",
            "STEP_MS",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_civil_dates() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00Z");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(timestamp(1_700_000_000_123), "2023-11-14 22:13:20Z");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(duration(7.2), "7s");
        assert_eq!(duration(245.0), "4m 05s");
        assert_eq!(duration(3723.0), "1h 02m 03s");
        assert_eq!(duration(f64::NAN), "-");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["ID", "NAME"],
            &[vec!["1".into(), "a".into()], vec!["100".into(), "b".into()]],
        );
        assert_eq!(t, "ID   NAME\n1    a\n100  b\n");
        assert_eq!(step_of(3, 0), "3/?");
        assert_eq!(loss(Some(2.0)), "2.0000");
    }

    #[test]
    fn settings_use_the_set_syntax() {
        let pairs = settings_pairs(&lorad_schema::TrainSettings::default());
        assert!(pairs.contains(&"target_modules=q_proj,v_proj".to_string()));
        assert!(pairs.contains(&"max_steps=none".to_string()));
        assert!(pairs.contains(&"schedule=cosine".to_string()));
    }
}
