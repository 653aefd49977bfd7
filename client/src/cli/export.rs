//! `loractl export`: asks the daemon to export and shows the exporter's progress (the job's `export`
//! events) until the reply arrives.
use super::{print_json, write_out, Ctx};
use indicatif::{ProgressBar, ProgressStyle};
use lorad_client::lorad_schema::{EventBody, ExportInfo, JobId};
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// Exports `job` as `format` to `out` (made absolute against the current directory).
pub async fn export(
    ctx: &Ctx,
    job: JobId,
    format: &str,
    out: &Path,
    checkpoint: Option<String>,
) -> anyhow::Result<ExitCode> {
    let out = std::path::absolute(out)?;
    let out = out
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("--out {}: not valid UTF-8", out.display()))?
        .to_string();
    let client = ctx.connect().await?;
    // Subscribe from now on: the export's progress lines arrive as the job's `export` events.
    let since = client.status().await?.last_seq;
    let mut sub = client.subscribe(Some(job), since).await?;

    let tty = !ctx.json && std::io::stderr().is_terminal();
    let spinner = if tty {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar.set_message(format!("exporting job {job} as {format}"));
        Some(bar)
    } else {
        None
    };
    let show = |text: String| match &spinner {
        Some(bar) => bar.set_message(text),
        None if !ctx.json => eprintln!("{text}"),
        None => {}
    };

    let request = client.export(job, format, &out, checkpoint);
    tokio::pin!(request);
    let result = loop {
        tokio::select! {
            result = &mut request => break result,
            Some(event) = sub.next() => {
                if let EventBody::Export { format, text } = event.body {
                    show(format!("{format}: {text}"));
                }
            }
        }
    };
    if let Some(bar) = &spinner {
        bar.finish_and_clear();
    }
    let info = result?;
    if ctx.json {
        print_json(&info)?;
    } else {
        write_out(&summary(&info))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn summary(info: &ExportInfo) -> String {
    let what = match &info.checkpoint {
        Some(c) => format!("checkpoint {c}"),
        None => "final adapter".to_string(),
    };
    let mut text = format!(
        "exported {what} as {} to {} in {:.1} s\n",
        info.format, info.out, info.elapsed_s
    );
    for file in &info.files {
        text.push_str(&format!("  {file}\n"));
    }
    text
}
