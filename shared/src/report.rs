//! Reports: PNG charts on plotters, and the `results.json` every run writes.
//!
//! Text is drawn with a TrueType font found on the system (`$MODULE08_FONT`, then `fc-match`,
//! then the usual DejaVu paths). On a machine with no font the first chart fails with a message
//! saying how to install one (`apt-get install fonts-dejavu-core`).

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const FONT: &str = "sans-serif";

/// Registers a system font with plotters once per process.
pub fn ensure_font() -> Result<()> {
    static FONT_STATE: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let state = FONT_STATE.get_or_init(|| {
        let path = find_font().ok_or_else(|| {
            "no TrueType font found for the plots: install one (Debian/Ubuntu: \
             `apt-get install fonts-dejavu-core`) or set MODULE08_FONT=/path/to/font.ttf"
                .to_string()
        })?;
        let bytes =
            std::fs::read(&path).map_err(|e| format!("reading font {}: {e}", path.display()))?;
        let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        for style in [FontStyle::Normal, FontStyle::Bold] {
            plotters::style::register_font(FONT, style, leaked)
                .map_err(|_| format!("{} is not a usable TrueType font", path.display()))?;
        }
        Ok(path)
    });
    state.as_ref().map(|_| ()).map_err(|e| anyhow!("{e}"))
}

fn find_font() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MODULE08_FONT")
        .map(PathBuf::from)
        .filter(|p| p.exists())
    {
        return Some(p);
    }
    let from_fc = std::process::Command::new("fc-match")
        .args(["-f", "%{file}", "DejaVu Sans:style=Book"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(PathBuf::from)
        .filter(|p| p.exists() && p.extension().is_some_and(|e| e == "ttf"));
    from_fc.or_else(|| {
        [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/Library/Fonts/Arial.ttf",
            "C:\\Windows\\Fonts\\arial.ttf",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    })
}

/// One named line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
        }
    }
}

/// Which axes of a line chart are logarithmic.
#[derive(Debug, Clone, Copy, Default)]
pub struct Axes {
    pub log_x: bool,
    pub log_y: bool,
}

fn finite_range(values: impl Iterator<Item = f64>, log: bool) -> Result<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        bail!("nothing finite to plot");
    }
    if hi - lo < 1e-12 * hi.abs().max(1.0) {
        return Ok(if log {
            (lo / 2.0, hi * 2.0)
        } else {
            (lo - 0.5, hi + 0.5)
        });
    }
    Ok(if log {
        (lo / 1.1, hi * 1.1)
    } else {
        let pad = 0.05 * (hi - lo);
        (lo - pad, hi + pad)
    })
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// A color of the shared palette.
pub fn palette(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// A line chart with one line per series, a legend, and optional log axes, saved as PNG.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    axes: Axes,
) -> Result<()> {
    ensure_font()?;
    let (x0, x1) = finite_range(
        series.iter().flat_map(|s| s.points.iter().map(|p| p.0)),
        axes.log_x,
    )?;
    let (y0, y1) = finite_range(
        series.iter().flat_map(|s| s.points.iter().map(|p| p.1)),
        axes.log_y,
    )?;
    // plotters labels a log axis only at powers of ten: a range narrower than ~1.5 decades would
    // show no tick label at all, so such an axis is drawn linear.
    let axes = Axes {
        log_x: axes.log_x && x1 / x0 > 30.0,
        log_y: axes.log_y && y1 / y0 > 30.0,
    };
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, (FONT, 26))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .x_label_formatter(&|v: &f64| tick_label(*v))
                .y_label_formatter(&|v: &f64| tick_label(*v))
                .label_style((FONT, 16))
                .axis_desc_style((FONT, 18))
                .draw()
                .map_err(plot_err)?;
            for (i, s) in series.iter().enumerate() {
                let color = palette(i);
                let pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|(x, y)| {
                        x.is_finite()
                            && y.is_finite()
                            && (!axes.log_x || *x > 0.0)
                            && (!axes.log_y || *y > 0.0)
                    })
                    .collect();
                let style = ShapeStyle::from(&color).stroke_width(2);
                chart
                    .draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(plot_err)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                    });
                if pts.len() <= 40 {
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                        .map_err(plot_err)?;
                }
            }
            if series.len() > 1 || !series.first().map_or(true, |s| s.name.is_empty()) {
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font((FONT, 16))
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()
                    .map_err(plot_err)?;
            }
        }};
    }
    match (axes.log_x, axes.log_y) {
        (false, false) => draw!(builder
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?),
        (true, false) => draw!(builder
            .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
            .map_err(plot_err)?),
        (false, true) => draw!(builder
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
            .map_err(plot_err)?),
        (true, true) => draw!(builder
            .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
            .map_err(plot_err)?),
    }
    root.present()
        .map_err(plot_err)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A short tick label: at most 3 significant digits, scientific notation outside 1e-3..1e5.
pub fn tick_label(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let digits = (2 - a.log10().floor() as i32).max(0) as usize;
        let s = format!("{v:.digits$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
}

/// A perceptual colour map (viridis, sampled at 5 points and interpolated) for `t ∈ [0, 1]`.
pub fn viridis(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68., 1., 84.),
        (59., 82., 139.),
        (33., 145., 140.),
        (94., 201., 98.),
        (253., 231., 37.),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    } * 4.0;
    let i = (t.floor() as usize).min(3);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f) as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// A heatmap of `matrix[row][col]` (rows drawn top to bottom), with a colour bar; `x_ticks`/
/// `y_ticks` optionally label columns and rows (e.g. tokens of an attention map).
pub fn heatmap(
    path: &Path,
    title: &str,
    x_label_text: &str,
    y_label_text: &str,
    matrix: &[Vec<f64>],
    ticks: Option<(&[String], &[String])>,
) -> Result<()> {
    ensure_font()?;
    let rows = matrix.len();
    let cols = matrix.first().map_or(0, |r| r.len());
    if rows == 0 || cols == 0 || matrix.iter().any(|r| r.len() != cols) {
        bail!("heatmap needs a non-empty rectangular matrix");
    }
    let (lo, hi) = finite_range(matrix.iter().flatten().copied(), false)?;
    let (lo, hi) = (lo + 0.05 * (hi - lo) / 1.1, hi - 0.05 * (hi - lo) / 1.1); // undo padding
    let span = (hi - lo).max(1e-12);
    let root = BitMapBackend::new(path, (900, 780)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (main, bar) = root.split_horizontally(800);
    let mut chart = ChartBuilder::on(&main)
        .caption(title, (FONT, 24))
        .margin(10)
        .x_label_area_size(60)
        .y_label_area_size(80)
        // A segmented range 0..n has n + 1 cells: 0..n - 1 gives exactly one per column and row.
        .build_cartesian_2d(
            (0..cols - 1).into_segmented(),
            (0..rows - 1).into_segmented(),
        )
        .map_err(plot_err)?;
    let x_names: Vec<String> = ticks.map(|t| t.0.to_vec()).unwrap_or_default();
    let y_names: Vec<String> = ticks.map(|t| t.1.to_vec()).unwrap_or_default();
    let max_ticks = 24;
    // Labels sit at the centre of each cell; row 0 is drawn at the top.
    let x_label = |seg: &SegmentValue<usize>| match seg {
        SegmentValue::CenterOf(c) if *c < cols => {
            x_names.get(*c).cloned().unwrap_or_else(|| c.to_string())
        }
        _ => String::new(),
    };
    let y_label = |seg: &SegmentValue<usize>| match seg {
        SegmentValue::CenterOf(r) if *r < rows => {
            let row = rows - 1 - *r;
            y_names.get(row).cloned().unwrap_or_else(|| row.to_string())
        }
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(x_label_text)
        .y_desc(y_label_text)
        .x_labels(cols.min(max_ticks))
        .y_labels(rows.min(max_ticks))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 17))
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(matrix.iter().enumerate().flat_map(|(r, row)| {
            row.iter().enumerate().map(move |(c, v)| {
                let y = rows - 1 - r;
                Rectangle::new(
                    [
                        (SegmentValue::Exact(c), SegmentValue::Exact(y)),
                        (SegmentValue::Exact(c + 1), SegmentValue::Exact(y + 1)),
                    ],
                    viridis((v - lo) / span).filled(),
                )
            })
        }))
        .map_err(plot_err)?;
    // Colour bar.
    let mut cb = ChartBuilder::on(&bar)
        .margin_top(50)
        .margin_bottom(70)
        .margin_right(45)
        .y_label_area_size(0)
        .right_y_label_area_size(45)
        .build_cartesian_2d(0..1, lo..hi)
        .map_err(plot_err)?;
    cb.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .label_style((FONT, 13))
        .draw()
        .map_err(plot_err)?;
    let steps = 100;
    cb.draw_series((0..steps).map(|i| {
        let a = lo + span * i as f64 / steps as f64;
        let b = lo + span * (i + 1) as f64 / steps as f64;
        Rectangle::new([(0, a), (1, b)], viridis(i as f64 / steps as f64).filled())
    }))
    .map_err(plot_err)?;
    root.present()
        .map_err(plot_err)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A vertical bar chart with one labelled bar per value.
pub fn bar_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    labels: &[String],
    values: &[f64],
) -> Result<()> {
    ensure_font()?;
    if labels.len() != values.len() || values.is_empty() {
        bail!(
            "bar_chart: {} labels for {} values",
            labels.len(),
            values.len()
        );
    }
    let (mut lo, mut hi) = finite_range(values.iter().copied().chain([0.0]), false)?;
    if lo > 0.0 {
        lo = 0.0;
    }
    if hi < 0.0 {
        hi = 0.0;
    }
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let n = values.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 26))
        .margin(15)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d((0..n).into_segmented(), lo..hi)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_label)
        .x_labels(n)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 18))
        .x_label_formatter(&|seg| match seg {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                labels.get(*i).cloned().unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        })
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, &v)| {
            let (a, b) = if v >= 0.0 { (0.0, v) } else { (v, 0.0) };
            let mut bar = Rectangle::new(
                [(SegmentValue::Exact(i), a), (SegmentValue::Exact(i + 1), b)],
                palette(0).filled(),
            );
            bar.set_margin(0, 0, 8, 8);
            bar
        }))
        .map_err(plot_err)?;
    root.present()
        .map_err(plot_err)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting failed: {e:?}")
}

/// The `results.json` of a run: `{topic, config, device, dtype, git_rev, started_at, wall_s, metrics}`.
pub struct RunReport {
    pub topic: String,
    pub config: serde_json::Value,
    pub device: String,
    pub dtype: String,
    started: std::time::Instant,
    started_at: String,
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

impl RunReport {
    pub fn start(topic: &str, config: serde_json::Value, device: &str, dtype: &str) -> Self {
        Self {
            topic: topic.to_string(),
            config,
            device: device.to_string(),
            dtype: dtype.to_string(),
            started: std::time::Instant::now(),
            started_at: utc_now_rfc3339(),
            metrics: serde_json::Map::new(),
        }
    }

    /// Records a metric (anything serialisable).
    pub fn metric(&mut self, name: &str, value: impl serde::Serialize) {
        self.metrics.insert(
            name.to_string(),
            serde_json::to_value(value).unwrap_or(serde_json::Value::Null),
        );
    }

    /// Writes `<out_dir>/results.json` and returns its path.
    pub fn write(&self, out_dir: &Path) -> Result<PathBuf> {
        let json = serde_json::json!({
            "topic": self.topic,
            "config": self.config,
            "device": self.device,
            "dtype": self.dtype,
            "git_rev": git_rev(),
            "started_at": self.started_at,
            "wall_s": self.started.elapsed().as_secs_f64(),
            "metrics": self.metrics,
        });
        std::fs::create_dir_all(out_dir)?;
        let path = out_dir.join("results.json");
        let tmp = out_dir.join("results.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&json)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }
}

/// The git revision of the workspace (`git describe --always --dirty`), or `"unknown"`.
pub fn git_rev() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(crate::workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ` (no date crate needed: days → civil date).
pub fn utc_now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Prints a small aligned table (header + rows) to stdout.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(header.iter().map(|s| s.to_string()).collect()));
    println!(
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  ")
    );
    for r in rows {
        println!("{}", line(r.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_written_as_png() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("report-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let s = vec![
            Series::new("a", vec![(1.0, 2.0), (10.0, 20.0)]),
            Series::new("b", vec![(1.0, 3.0), (10.0, 5.0)]),
        ];
        line_chart(
            &dir.join("l.png"),
            "lines",
            "x",
            "y",
            &s,
            Axes {
                log_x: true,
                log_y: true,
            },
        )?;
        heatmap(
            &dir.join("h.png"),
            "heat",
            "key",
            "query",
            &[vec![0.0, 1.0], vec![0.5, 0.25]],
            None,
        )?;
        bar_chart(
            &dir.join("b.png"),
            "bars",
            "value",
            &["x".into(), "y".into()],
            &[1.0, -2.0],
        )?;
        for f in ["l.png", "h.png", "b.png"] {
            let bytes = std::fs::read(dir.join(f))?;
            assert_eq!(&bytes[1..4], b"PNG", "{f}");
            assert!(bytes.len() > 5000, "{f} is suspiciously small");
        }
        assert!(line_chart(
            &dir.join("x.png"),
            "t",
            "x",
            "y",
            &[Series::new("n", vec![(f64::NAN, 1.0)])],
            Axes::default()
        )
        .is_err());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(0.185), "0.185");
        assert_eq!(tick_label(2.5), "2.5");
        assert_eq!(tick_label(700.0), "700");
        assert_eq!(tick_label(12345.0), "12345");
        assert_eq!(tick_label(2.0e6), "2.0e6");
        assert_eq!(tick_label(0.0001234), "1.2e-4");
    }

    #[test]
    fn rfc3339_timestamp_is_well_formed() {
        let t = utc_now_rfc3339();
        assert_eq!(t.len(), 20);
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }

    #[test]
    fn results_json_has_the_documented_fields() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("results-test-{}", std::process::id()));
        let mut r = RunReport::start("t0000_test", serde_json::json!({"a": 1}), "cpu", "f32");
        r.metric("loss", 1.5);
        let path = r.write(&dir)?;
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        for key in [
            "topic",
            "config",
            "device",
            "dtype",
            "git_rev",
            "started_at",
            "wall_s",
            "metrics",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["metrics"]["loss"], 1.5);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
