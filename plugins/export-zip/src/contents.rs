//! What goes into the archive besides copied files: metrics as CSV, the manifest, and the ZIP entry
//! timestamp. Pure functions, unit-tested.
use lorad_plugin::ExportRequest;
use lorad_schema::MetricPoint;
use std::fmt::Write;

/// The header row of metrics.csv.
pub const METRICS_HEADER: &str =
    "step,epoch,loss,lr,grad_norm,tokens_per_s,samples_per_s,step_ms,data_wait_ms,at_ms";

/// metrics.csv: the header row, then one row per metric point (a missing grad_norm is empty).
pub fn metrics_csv(points: &[MetricPoint]) -> String {
    let mut s = String::with_capacity(64 * (points.len() + 1));
    s.push_str(METRICS_HEADER);
    s.push('\n');
    for p in points {
        let grad = p.grad_norm.map(|g| g.to_string()).unwrap_or_default();
        let _ = writeln!(
            s,
            "{},{},{},{},{grad},{},{},{},{},{}",
            p.step,
            p.epoch,
            p.loss,
            p.lr,
            p.tokens_per_s,
            p.samples_per_s,
            p.step_ms,
            p.data_wait_ms,
            p.at_ms
        );
    }
    s
}

/// MANIFEST.txt: what was exported, from where, and every other entry with its size.
pub fn manifest(req: &ExportRequest, entries: &[(String, u64)], created: &str) -> String {
    let job = &req.job;
    let mut s = String::new();
    let _ = writeln!(s, "lorad export (zip)");
    let _ = writeln!(s, "job: {} \"{}\" ({})", job.id.0, job.name, job.state);
    let _ = writeln!(s, "template: {}", job.template);
    let _ = writeln!(s, "base model: {}", req.base_model);
    let _ = writeln!(s, "dataset: {}", job.dataset);
    let which = req.checkpoint.as_deref().unwrap_or("final adapter");
    let _ = writeln!(s, "adapter: {which} ({})", req.adapter_dir);
    let _ = writeln!(s, "created: {created}");
    let _ = writeln!(s, "\nentries (bytes, uncompressed):");
    for (name, size) in entries {
        let _ = writeln!(s, "  {name}  {size}");
    }
    s
}

/// Civil date and time (UTC) of a Unix timestamp in seconds: (year, month, day, hour, min, sec).
/// Howard Hinnant's days-from-civil inverse; exact for every date after 1970.
pub fn utc(secs: u64) -> (u16, u8, u8, u8, u8, u8) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as u16;
    (
        year,
        month,
        day,
        (rem / 3600) as u8,
        (rem / 60 % 60) as u8,
        (rem % 60) as u8,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn csv_has_a_header_and_one_row_per_point() {
        let p = |step, grad_norm| MetricPoint {
            step,
            epoch: 0.5,
            loss: 2.25,
            lr: 0.001,
            grad_norm,
            tokens_per_s: 100.0,
            samples_per_s: 4.0,
            step_ms: 250.5,
            data_wait_ms: 0.0,
            gpu: None,
            cpu: None,
            at_ms: 1_700_000_000_000,
        };
        let csv = metrics_csv(&[p(1, Some(1.5)), p(2, None)]);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], METRICS_HEADER);
        assert_eq!(lines[1], "1,0.5,2.25,0.001,1.5,100,4,250.5,0,1700000000000");
        assert_eq!(lines[2], "2,0.5,2.25,0.001,,100,4,250.5,0,1700000000000");
        assert_eq!(lines.len(), 3);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), (1970, 1, 1, 0, 0, 0));
        // 2024-02-29 12:34:56 UTC.
        assert_eq!(utc(1_709_210_096), (2024, 2, 29, 12, 34, 56));
        assert_eq!(utc(951_782_400), (2000, 2, 29, 0, 0, 0));
    }
}
