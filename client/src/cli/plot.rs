//! `plot JOB... --out FILE.svg|FILE.png`: the loss over steps, raw and smoothed, with the learning rate
//! on a second axis; several jobs overlaid in different colours.
//!
//! Text in a PNG needs a font file, read at run time ($LORAD_PLOT_FONT, else a few common paths): a
//! bare container may have none, and then the PNG is drawn without text rather than not at all. An SVG
//! holds its text as `<text>` elements and needs no font file; without one, text sizes are estimated.
use super::{print_json, write_out, Ctx};
use anyhow::{bail, Context};
use lorad_client::lorad_schema::trend::{smooth, LOSS_WINDOW};
use lorad_client::lorad_schema::{JobId, MetricPoint};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
// Not BackendStyle: its `stroke_width` would clash with plotters' `Color::stroke_width`.
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where a font is looked for when $LORAD_PLOT_FONT is not set (Debian's fonts-dejavu-core first).
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// One colour per job, in order (cycled past the last).
const COLOURS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

/// The image's file format, chosen by the extension of `--out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Scalable vector graphics.
    Svg,
    /// A bitmap.
    Png,
}

impl Format {
    /// The format `path`'s extension names (`.svg` or `.png`, any case).
    pub fn of(path: &Path) -> anyhow::Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("svg") => Ok(Format::Svg),
            Some("png") => Ok(Format::Png),
            _ => bail!(
                "cannot plot to {}: the file name must end in .svg or .png",
                path.display()
            ),
        }
    }
}

/// One job's curves.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The job.
    pub job: JobId,
    /// Its name, for the legend.
    pub name: String,
    /// Steps, ascending, each once.
    pub steps: Vec<u64>,
    /// The loss at each step.
    pub loss: Vec<f64>,
    /// The learning rate at each step.
    pub lr: Vec<f64>,
}

impl Series {
    /// The series of `points` (any order; the last point of a step repeated by a resume wins).
    pub fn new(job: JobId, name: String, points: &[MetricPoint]) -> Series {
        let mut sorted: Vec<&MetricPoint> = points.iter().collect();
        sorted.sort_by_key(|p| p.step);
        let mut s = Series {
            job,
            name,
            steps: Vec::new(),
            loss: Vec::new(),
            lr: Vec::new(),
        };
        for p in sorted {
            if s.steps.last() == Some(&p.step) {
                s.steps.pop();
                s.loss.pop();
                s.lr.pop();
            }
            s.steps.push(p.step);
            s.loss.push(p.loss);
            s.lr.push(p.lr);
        }
        s
    }

    /// The legend's label.
    pub fn label(&self) -> String {
        format!("job {}: {}", self.job, self.name)
    }

    /// The raw loss points that can be drawn (a NaN or infinite loss is left out).
    fn raw(&self) -> Vec<(f64, f64)> {
        self.steps
            .iter()
            .zip(&self.loss)
            .filter(|(_, l)| l.is_finite())
            .map(|(&s, &l)| (s as f64, l))
            .collect()
    }

    fn smoothed(&self) -> Vec<(f64, f64)> {
        let s = smooth(&self.loss, LOSS_WINDOW);
        self.steps
            .iter()
            .zip(s)
            .filter(|(_, l)| l.is_finite())
            .map(|(&st, l)| (st as f64, l))
            .collect()
    }

    fn lr_points(&self) -> Vec<(f64, f64)> {
        self.steps
            .iter()
            .zip(&self.lr)
            .filter(|(_, l)| l.is_finite())
            .map(|(&s, &l)| (s as f64, l))
            .collect()
    }
}

/// The axes' ranges over every series: steps, loss (with a margin), learning rate (from 0).
fn ranges(
    series: &[Series],
) -> (
    std::ops::Range<f64>,
    std::ops::Range<f64>,
    std::ops::Range<f64>,
) {
    let steps = series.iter().flat_map(|s| s.steps.iter().copied());
    let (lo, hi) = steps.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
    let (lo, hi) = if lo > hi {
        (0, 1)
    } else {
        (lo, hi.max(lo + 1))
    };
    let finite = |v: &[f64]| -> Vec<f64> { v.iter().copied().filter(|x| x.is_finite()).collect() };
    let losses: Vec<f64> = series.iter().flat_map(|s| finite(&s.loss)).collect();
    let (lmin, lmax) = losses
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let (lmin, lmax) = if lmin > lmax {
        (0.0, 1.0)
    } else {
        (lmin, lmax)
    };
    let margin = ((lmax - lmin) * 0.05).max(1e-3);
    let lr_max = series
        .iter()
        .flat_map(|s| finite(&s.lr))
        .fold(0.0f64, f64::max);
    let lr_max = if lr_max > 0.0 { lr_max * 1.05 } else { 1.0 };
    (
        lo as f64..hi as f64,
        (lmin - margin)..(lmax + margin),
        0.0..lr_max,
    )
}

/// Draws the chart of `series` on `root`.
fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, series: &[Series]) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (x, y, lr) = ranges(series);
    let title = match series {
        [one] => format!("loss of {}", one.label()),
        _ => "loss".to_string(),
    };
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(70)
        .build_cartesian_2d(x.clone(), y)?
        .set_secondary_coord(x, lr);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss (thin: raw, thick: smoothed)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("learning rate (dashed)")
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart.draw_series(LineSeries::new(s.raw(), colour.mix(0.3).stroke_width(1)))?;
        chart.draw_series(LineSeries::new(s.smoothed(), colour.stroke_width(2)))?;
        chart.draw_secondary_series(DashedLineSeries::new(
            s.lr_points(),
            4,
            4,
            colour.mix(0.6).stroke_width(1),
        ))?;
    }
    // Our own legend, not plotters' series labels: those measure text with the font itself, which
    // fails without one; this goes through the backend (see `Fontless`).
    legend(&chart.plotting_area().strip_coord_spec(), series)?;
    root.present()?;
    Ok(())
}

/// The legend in the upper right corner of `area`: a line in each job's colour and "job N: name".
fn legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    series: &[Series],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    const PAD: i32 = 8;
    const LINE: i32 = 20;
    const ROW: i32 = 20;
    let style = TextStyle::from(("sans-serif", 14).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let mut width = 0;
    for s in series {
        width = width.max(area.estimate_text_size(&s.label(), &style)?.0 as i32);
    }
    let (w, h) = (width + LINE + 3 * PAD, series.len() as i32 * ROW + 2 * PAD);
    let (area_w, _) = area.dim_in_pixel();
    let (x0, y0) = ((area_w as i32 - w - PAD).max(0), PAD);
    area.draw(&Rectangle::new(
        [(x0, y0), (x0 + w, y0 + h)],
        WHITE.mix(0.85).filled(),
    ))?;
    area.draw(&Rectangle::new(
        [(x0, y0), (x0 + w, y0 + h)],
        BLACK.mix(0.4),
    ))?;
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let y = y0 + PAD + i as i32 * ROW + ROW / 2;
        let x = x0 + PAD;
        area.draw(&PathElement::new(
            vec![(x, y), (x + LINE, y)],
            colour.stroke_width(2),
        ))?;
        area.draw(&Text::new(s.label(), (x + LINE + PAD, y), style.clone()))?;
    }
    Ok(())
}

/// Writes the chart of `series` to `out` as `format`, `size` pixels. Returns a warning to print when
/// a PNG had to be drawn without text.
pub fn render(
    series: &[Series],
    out: &Path,
    format: Format,
    size: (u32, u32),
) -> anyhow::Result<Option<String>> {
    let font = load_font();
    let warning = match (&font, format) {
        (Err(why), Format::Png) => Some(format!(
            "{why}: {} is drawn without text (set LORAD_PLOT_FONT to a .ttf file)",
            out.display()
        )),
        _ => None,
    };
    match format {
        Format::Svg => {
            let root = Fontless(SVGBackend::new(out, size)).into_drawing_area();
            draw(&root, series)?;
        }
        Format::Png => {
            let root = Fontless(BitMapBackend::new(out, size)).into_drawing_area();
            draw(&root, series)?;
        }
    }
    Ok(warning)
}

/// Registers the first font found as plotters' "sans-serif" (once per process); why not when none is.
fn load_font() -> Result<(), String> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let wanted = std::env::var_os("LORAD_PLOT_FONT").filter(|v| !v.is_empty());
            let candidates: Vec<PathBuf> = match &wanted {
                Some(p) => vec![PathBuf::from(p)],
                None => FONT_PATHS.iter().map(PathBuf::from).collect(),
            };
            for path in &candidates {
                let Ok(bytes) = std::fs::read(path) else {
                    continue;
                };
                // plotters keeps a reference for the life of the process: the font is read once.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
            Err(match wanted {
                Some(p) => format!(
                    "LORAD_PLOT_FONT={} is not a readable font",
                    p.to_string_lossy()
                ),
                None => "no font found (install fonts-dejavu-core)".to_string(),
            })
        })
        .clone()
}

/// A backend that copes without a font: text sizes are estimated, and text the backend cannot draw
/// without one (a bitmap's) is left out. With a font, it changes nothing.
struct Fontless<B>(B);

impl<B: DrawingBackend> DrawingBackend for Fontless<B> {
    type ErrorType = B::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }
    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.ensure_prepared()
    }
    fn present(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.present()
    }
    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.draw_pixel(point, color)
    }
    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.draw_line(from, to, style)
    }
    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.draw_rect(upper_left, bottom_right, style, fill)
    }
    fn draw_path<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.draw_path(path, style)
    }
    fn draw_circle<S: plotters_backend::BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.draw_circle(center, radius, style, fill)
    }
    fn fill_polygon<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.fill_polygon(vert, style)
    }
    fn draw_text<T: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &T,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        match self.0.draw_text(text, style, pos) {
            Err(DrawingErrorKind::FontError(_)) => Ok(()),
            other => other,
        }
    }
    fn estimate_text_size<T: BackendTextStyle>(
        &self,
        text: &str,
        style: &T,
    ) -> Result<(u32, u32), DrawingErrorKind<B::ErrorType>> {
        match self.0.estimate_text_size(text, style) {
            Err(DrawingErrorKind::FontError(_)) => {
                // About the advance of an average sans-serif glyph.
                let size = style.size().max(1.0);
                Ok((
                    (text.chars().count() as f64 * size * 0.55) as u32,
                    size as u32,
                ))
            }
            other => other,
        }
    }
    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        dims: (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.0.blit_bitmap(pos, dims, src)
    }
}

/// Parses `WIDTHxHEIGHT` in pixels (each 100 to 10000).
pub fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let parsed = s
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.trim().parse::<u32>().ok()?, h.trim().parse::<u32>().ok()?)));
    match parsed {
        Some((w, h)) if (100..=10_000).contains(&w) && (100..=10_000).contains(&h) => Ok((w, h)),
        _ => Err(format!(
            "'{s}' is not WIDTHxHEIGHT in pixels (each 100 to 10000, e.g. 1000x600)"
        )),
    }
}

/// `plot JOB... --out FILE [--size WxH]`.
pub async fn plot(
    ctx: &Ctx,
    jobs: &[JobId],
    out: &Path,
    size: (u32, u32),
) -> anyhow::Result<ExitCode> {
    let format = Format::of(out)?;
    // Said back as an absolute path, as `export` does: scripts need not know the cwd.
    let out = &super::args::absolutize(out, &std::env::current_dir()?);
    let client = ctx.connect().await?;
    let mut series = Vec::with_capacity(jobs.len());
    for &job in jobs {
        let record = client.get(job).await?;
        let points = client.metrics(job, None).await?;
        if points.is_empty() {
            bail!("job {job} has no metric points yet");
        }
        series.push(Series::new(job, record.name, &points));
    }
    let path = out.to_path_buf();
    let drawn = series.clone();
    // Drawing is CPU work and the file write is blocking I/O: off the runtime's threads.
    let warning = tokio::task::spawn_blocking(move || render(&drawn, &path, format, size))
        .await
        .context("the plot task failed")?
        .with_context(|| format!("cannot write {}", out.display()))?;
    if let Some(w) = warning {
        eprintln!("loractl: warning: {w}");
    }
    if ctx.json {
        let answer = serde_json::json!({
            "out": out,
            "jobs": series.iter().map(|s| s.job).collect::<Vec<_>>(),
            "points": series.iter().map(|s| s.steps.len()).collect::<Vec<_>>(),
        });
        print_json(&answer)?;
    } else {
        write_out(&format!("{}\n", out.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: u64, loss: f64) -> MetricPoint {
        MetricPoint {
            step,
            epoch: 0.0,
            loss,
            lr: 1e-3 * step as f64,
            grad_norm: None,
            tokens_per_s: 0.0,
            samples_per_s: 0.0,
            step_ms: 0.0,
            data_wait_ms: 0.0,
            gpu: None,
            cpu: None,
            at_ms: 0,
        }
    }

    #[test]
    fn the_format_comes_from_the_extension() {
        assert_eq!(Format::of(Path::new("a/b.svg")).unwrap(), Format::Svg);
        assert_eq!(Format::of(Path::new("b.PNG")).unwrap(), Format::Png);
        let err = Format::of(Path::new("/tmp/loss.jpg"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/tmp/loss.jpg") && err.contains(".svg"),
            "{err}"
        );
        assert!(Format::of(Path::new("loss")).is_err());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1000x600"), Ok((1000, 600)));
        assert_eq!(parse_size("640X480"), Ok((640, 480)));
        assert!(parse_size("10x10").is_err());
        assert!(parse_size("wide").is_err());
    }

    #[test]
    fn a_series_is_in_step_order_and_a_repeated_step_keeps_the_last() {
        let s = Series::new(
            JobId(3),
            "n".into(),
            &[
                point(2, 2.0),
                point(1, 3.0),
                point(2, 1.5),
                point(3, f64::NAN),
            ],
        );
        assert_eq!(s.steps, vec![1, 2, 3]);
        assert_eq!(s.loss[1], 1.5);
        assert_eq!(s.raw().len(), 2, "NaN is not drawn");
        assert_eq!(s.smoothed().len(), 3);
        assert_eq!(s.label(), "job 3: n");
    }

    /// The points of every `<polyline>` in `svg`, counted.
    fn polylines(svg: &str) -> Vec<usize> {
        svg.split("<polyline")
            .skip(1)
            .filter_map(|rest| {
                let pts = rest.split("points=\"").nth(1)?.split('"').next()?;
                Some(pts.split_whitespace().count())
            })
            .collect()
    }

    #[test]
    fn an_svg_holds_the_raw_and_smoothed_curves_and_the_legend() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("loss.svg");
        let a = Series::new(
            JobId(1),
            "first".into(),
            &(1..=12)
                .map(|s| point(s, 3.0 / s as f64))
                .collect::<Vec<_>>(),
        );
        let b = Series::new(
            JobId(2),
            "second".into(),
            &(1..=7).map(|s| point(s, 2.0)).collect::<Vec<_>>(),
        );
        render(&[a, b], &out, Format::Svg, (800, 500)).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        let counts = polylines(&svg);
        assert_eq!(counts.iter().filter(|&&n| n == 12).count(), 2, "{counts:?}");
        assert_eq!(counts.iter().filter(|&&n| n == 7).count(), 2, "{counts:?}");
        assert!(svg.contains("job 1: first") && svg.contains("job 2: second"));
    }

    #[test]
    fn a_png_has_the_asked_size() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("loss.png");
        let a = Series::new(
            JobId(1),
            "a".into(),
            &(1..=5).map(|s| point(s, 1.0)).collect::<Vec<_>>(),
        );
        render(&[a], &out, Format::Png, (640, 480)).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 640);
        assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 480);
    }
}
