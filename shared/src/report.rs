//! Reports: PNG charts on plotters, and the `results.json` every run writes.
//!
//! Text is drawn with a TrueType font found on the system (`$MODULE08_FONT`, then `fc-match`,
//! then the usual DejaVu paths). On a machine with no font the first chart fails with a message
//! saying how to install one (`apt-get install fonts-dejavu-core`).
//!
//! Every chart's title ends with the figure context ([`set_figure_context`]: the device and
//! dtype, set by [`crate::cli::CommonArgs::setup`]); legends sit in a panel beside the plot, never
//! over the data; and tick positions and labels are chosen here rather than by plotters, so that
//! log axes read 1k, 2k, 5k (or 64, 128, 256 over powers of two) with no label over another.

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{OnceLock, RwLock};

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

// ------------------------------------------------------------------------------------------------
// The figure context: which device and dtype produced every chart of this run.
// ------------------------------------------------------------------------------------------------

static FIGURE_CONTEXT: RwLock<String> = RwLock::new(String::new());

/// Sets the subtitle every chart of this process appends to its title (e.g. `"cpu (8 threads),
/// f32"`), so that a PNG found on its own still says where its numbers come from.
/// [`crate::cli::CommonArgs::setup`] calls it once; an empty string removes the subtitle.
pub fn set_figure_context(context: &str) {
    let mut current = FIGURE_CONTEXT.write().unwrap_or_else(|e| e.into_inner());
    *current = context.trim().to_string();
}

/// The subtitle set by [`set_figure_context`], if any.
pub fn figure_context() -> Option<String> {
    let current = FIGURE_CONTEXT.read().unwrap_or_else(|e| e.into_inner());
    (!current.is_empty()).then(|| current.clone())
}

/// `title` as drawn: `"title — cpu (8 threads), f32"` once a figure context is set.
pub fn titled(title: &str) -> String {
    match figure_context() {
        Some(context) => format!("{title} — {context}"),
        None => title.to_string(),
    }
}

// ------------------------------------------------------------------------------------------------
// Value ranges.
// ------------------------------------------------------------------------------------------------

/// The smallest and largest finite values (positive ones only on a log axis).
fn finite_bounds(values: impl Iterator<Item = f64>, log: bool) -> Result<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        bail!("nothing finite to plot");
    }
    Ok((lo, hi))
}

/// The range an axis shows: the data's bounds with a little room on each side (5 % of the span,
/// or a factor 1.1 on a log axis), widened around a single value.
fn finite_range(values: impl Iterator<Item = f64>, log: bool) -> Result<(f64, f64)> {
    let (lo, hi) = finite_bounds(values, log)?;
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

// ------------------------------------------------------------------------------------------------
// Ticks: we choose where they go and how they read, rather than leave it to plotters (whose log
// axes get either one label per decade or labels printed over each other).
// ------------------------------------------------------------------------------------------------

/// At most this many labelled ticks on an axis: more is a grid, not a scale.
const MAX_TICKS: usize = 10;

/// How an axis maps values to positions, and so where its ticks go and how they read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    /// Evenly spaced: ticks at multiples of 1, 2 or 5 × 10ᵏ, labelled by [`tick_label`].
    Linear,
    /// Logarithmic: ticks at 1-2-5 multiples of powers of ten, or sparser (every decade, every
    /// other decade…), labelled 0.01, 0.1, 1, 10, 1k, 2M.
    Log,
    /// Logarithmic over data that are all powers of two (sequence lengths, batch sizes): ticks
    /// at powers of two (or every other one…), labelled exactly: 64, 128, 1024, 4096.
    LogPow2,
}

impl Scale {
    /// The scale of an axis over `values`, logarithmic if `log`.
    fn of(values: &[f64], log: bool) -> Scale {
        let positive: Vec<f64> = values
            .iter()
            .copied()
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let distinct = positive.iter().any(|v| *v != positive[0]);
        match log {
            false => Scale::Linear,
            true if distinct && positive.iter().all(|v| is_power_of_two(*v)) => Scale::LogPow2,
            true => Scale::Log,
        }
    }

    /// Where `v` sits along the axis, in units proportional to distance on screen.
    fn position(self, v: f64) -> f64 {
        match self {
            Scale::Linear => v,
            Scale::Log | Scale::LogPow2 => v.log10(),
        }
    }

    /// The label of the tick at `v`.
    fn label(self, v: f64) -> String {
        match self {
            Scale::Linear => tick_label(v),
            Scale::LogPow2 if is_power_of_two(v) => pow2_tick_label(v),
            Scale::Log | Scale::LogPow2 => log_tick_label(v),
        }
    }
}

fn is_power_of_two(v: f64) -> bool {
    v > 0.0 && v.is_finite() && (v.log2() - v.log2().round()).abs() < 1e-9
}

/// A short tick label: at most 3 significant digits, scientific notation outside 1e-3..1e5, and
/// integers without decimals (`"1000"`, never `"1000.0"`).
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

/// A tick label of a decimal log axis: plain numbers from 0.001 to 999, then SI suffixes
/// (`1k`, `2.5k`, `10M`, `1G`, `100T`), and `2e-5`, `1e15` beyond.
fn log_tick_label(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 || (1e-3..1e3).contains(&a) {
        return tick_label(v);
    }
    for (unit, suffix) in [(1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T")] {
        if (unit..unit * 1e3).contains(&a) {
            return format!("{}{suffix}", tick_label(v / unit));
        }
    }
    let exponent = (a.log10() + 1e-9).floor() as i32;
    format!("{}e{exponent}", tick_label(v / 10f64.powi(exponent)))
}

/// A tick label of a power-of-two axis, exact: `0.125`, `1/16`, `64`, `4096`, `65536`, then
/// binary prefixes (`128Ki`, `1Mi`) where the digits would run past five.
fn pow2_tick_label(v: f64) -> String {
    let k = v.log2().round() as i32;
    match k {
        17.. => {
            let prefix = (k / 10).min(4);
            let unit = ["", "Ki", "Mi", "Gi", "Ti"][prefix as usize];
            format!("{}{unit}", 1u64 << (k - 10 * prefix))
        }
        0..=16 => (1u64 << k).to_string(),
        -3..=-1 => tick_label(v),
        -20..=-4 => format!("1/{}", 1u64 << -k),
        _ => format!("2^{k}"),
    }
}

/// One way of placing ticks on an axis: labelled major ticks and unlabelled minor grid lines.
#[derive(Debug, Clone, Default, PartialEq)]
struct TickSet {
    major: Vec<f64>,
    minor: Vec<f64>,
}

/// `n × 10^e`, computed so that decimals come out exact (`3 × 10⁻¹` is `0.3`, not
/// `0.30000000000000004`).
fn scaled(n: i64, e: i32) -> f64 {
    if e >= 0 {
        n as f64 * 10f64.powi(e)
    } else {
        n as f64 / 10f64.powi(-e)
    }
}

/// Tick sets at multiples of 1, 2, 5 × 10ᵏ within `lo..=hi`, densest first (no minor lines:
/// evenly spaced labels are easy to read between).
fn linear_tick_sets(lo: f64, hi: f64) -> Vec<TickSet> {
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return Vec::new();
    }
    let e0 = (span / 50.0).log10().floor() as i32;
    let steps: Vec<(i64, i32)> = (e0..=e0 + 3)
        .flat_map(|e| [(1, e), (2, e), (5, e)])
        .filter(|&(m, e)| (1.0..=50.0).contains(&(span / scaled(m, e))))
        .collect();
    let multiples = |(m, e): (i64, i32)| -> Vec<f64> {
        let step = scaled(m, e);
        let first = (lo / step - 1e-9).ceil() as i64;
        let last = (hi / step + 1e-9).floor() as i64;
        (first..=last).map(|k| scaled(k * m, e)).collect()
    };
    steps
        .into_iter()
        .map(|step| TickSet {
            major: multiples(step),
            minor: Vec::new(),
        })
        .collect()
}

/// Tick sets of a decimal log axis over `lo..=hi` (both positive), densest first: every
/// integer multiple of each power of ten, then 1-2-5, 1-3, every decade, every other decade…
/// Minor lines mark 1…9 × 10ᵏ over a few decades, each decade over many.
fn decimal_log_tick_sets(lo: f64, hi: f64) -> Vec<TickSet> {
    let (e0, e1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    if !(lo > 0.0 && hi > lo && e1 - e0 <= 600) {
        return Vec::new();
    }
    let within = |v: &f64| (lo * (1.0 - 1e-9)..=hi * (1.0 + 1e-9)).contains(v);
    let decades = |every: i32, mantissas: &[i64]| -> Vec<f64> {
        (e0..=e1)
            .filter(|e| e.rem_euclid(every) == 0)
            .flat_map(|e| mantissas.iter().map(move |&m| scaled(m, e)))
            .filter(within)
            .collect()
    };
    let minor = match e1 - e0 {
        0..=8 => decades(1, &[1, 2, 3, 4, 5, 6, 7, 8, 9]),
        _ => decades(1, &[1]),
    };
    let dense: [&[i64]; 4] = [&[1, 2, 3, 4, 5, 6, 7, 8, 9], &[1, 2, 5], &[1, 3], &[1]];
    let by_mantissa = dense.into_iter().map(|ms| decades(1, ms));
    let by_decade = [2, 3, 5, 10, 20, 50, 100].map(|every| decades(every, &[1]));
    by_mantissa
        .chain(by_decade)
        .map(|major| TickSet {
            major,
            minor: minor.clone(),
        })
        .collect()
}

/// Tick sets at powers of two within `lo..=hi`, densest first: every power, then every 2nd,
/// 3rd, 4th, 5th, 10th, counted from the smallest; minor lines at every power of two.
fn pow2_tick_sets(lo: f64, hi: f64) -> Vec<TickSet> {
    let (k0, k1) = (lo.log2().ceil() as i32, hi.log2().floor() as i32);
    if !(lo > 0.0 && k0 <= k1 && k1 - k0 <= 2000) {
        return Vec::new();
    }
    let every_kth = |every: i32| -> Vec<f64> {
        (k0..=k1)
            .filter(|k| (k - k0) % every == 0)
            .map(|k| 2f64.powi(k))
            .collect()
    };
    [1, 2, 3, 4, 5, 10]
        .map(|every| TickSet {
            major: every_kth(every),
            minor: every_kth(1),
        })
        .into()
}

/// The candidate tick sets of an axis over `lo..hi`, in order of preference (densest first
/// within each family); log axes fall back to linear steps over ranges too narrow for decades.
fn tick_candidates(lo: f64, hi: f64, scale: Scale) -> Vec<TickSet> {
    match scale {
        Scale::Linear => linear_tick_sets(lo, hi),
        Scale::Log => [decimal_log_tick_sets(lo, hi), linear_tick_sets(lo, hi)].concat(),
        Scale::LogPow2 => [
            pow2_tick_sets(lo, hi),
            decimal_log_tick_sets(lo, hi),
            linear_tick_sets(lo, hi),
        ]
        .concat(),
    }
}

/// Whether the labels of `ticks` read cleanly along an axis over `lo..hi` that is `length`
/// pixels long: no more than [`MAX_TICKS`], no two alike, and at least `gap` pixels between
/// neighbours, `extent` giving a label's size along the axis (its width on x, height on y).
fn labels_fit(
    ticks: &[f64],
    (lo, hi, scale): (f64, f64, Scale),
    length: f64,
    extent: &dyn Fn(&str) -> f64,
    gap: f64,
) -> bool {
    let labels: Vec<String> = ticks.iter().map(|&v| scale.label(v)).collect();
    let distinct = labels
        .iter()
        .enumerate()
        .all(|(i, l)| !labels[..i].contains(l));
    let (a, b) = (scale.position(lo), scale.position(hi));
    let pixel = |v: f64| (scale.position(v) - a) / (b - a) * length;
    ticks.len() <= MAX_TICKS
        && distinct
        && ticks.windows(2).zip(labels.windows(2)).all(|(t, l)| {
            (pixel(t[1]) - pixel(t[0])).abs() >= (extent(&l[0]) + extent(&l[1])) / 2.0 + gap
        })
}

/// The first candidate whose labels fit with at least three ticks (a scale one can read
/// between), else with two; failing that, the sparsest with any tick at all.
fn choose_ticks(candidates: Vec<TickSet>, fits: impl Fn(&[f64]) -> bool) -> TickSet {
    let fitting = |least: usize| {
        candidates
            .iter()
            .position(|c| c.major.len() >= least && fits(&c.major))
    };
    let sparsest = || candidates.iter().rposition(|c| !c.major.is_empty());
    match fitting(3).or_else(|| fitting(2)).or_else(sparsest) {
        Some(i) => candidates[i].clone(),
        None => TickSet::default(),
    }
}

/// One axis of a chart as a plotters coordinate: its range, its scale and the ticks we chose
/// (so one chart type serves linear and log axes alike).
#[derive(Debug, Clone)]
struct Axis {
    lo: f64,
    hi: f64,
    scale: Scale,
    ticks: TickSet,
}

impl Axis {
    /// An axis over `lo..hi` whose ticks are the densest whose labels fit `length` pixels.
    fn fitted(
        (lo, hi, scale): (f64, f64, Scale),
        length: f64,
        extent: &dyn Fn(&str) -> f64,
        gap: f64,
    ) -> Axis {
        let fits = |t: &[f64]| labels_fit(t, (lo, hi, scale), length, extent, gap);
        let ticks = choose_ticks(tick_candidates(lo, hi, scale), fits);
        Axis {
            lo,
            hi,
            scale,
            ticks,
        }
    }

    /// A horizontal axis: labels side by side, at least 14 px apart.
    fn horizontal(range: (f64, f64, Scale), area: &Canvas, length: f64) -> Axis {
        Axis::fitted(range, length, &|l| text_size(area, l, LABEL_PX).0, 14.0)
    }

    /// A vertical axis: labels stacked, at least 1.5 label heights apart.
    fn vertical(range: (f64, f64, Scale), area: &Canvas, length: f64) -> Axis {
        let height = text_size(area, "0.9", LABEL_PX).1;
        Axis::fitted(range, length, &|_| height, 1.5 * height)
    }
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let (a, b) = (self.scale.position(self.lo), self.scale.position(self.hi));
        let t = ((self.scale.position(*v) - a) / (b - a)).clamp(-10.0, 10.0);
        limit.0 + (t * f64::from(limit.1 - limit.0)).round() as i32
    }

    /// Major ticks get labels and bold lines; plotters asks for light points for the minor grid.
    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        match (hint.max_num_points(), hint.weight().allow_light_points()) {
            (0, _) => Vec::new(),
            (_, true) => self.ticks.minor.clone(),
            (_, false) => self.ticks.major.clone(),
        }
    }

    fn range(&self) -> Range<f64> {
        self.lo..self.hi
    }
}

// ------------------------------------------------------------------------------------------------
// Layout shared by the charts: title, text measurement, legend panel.
// ------------------------------------------------------------------------------------------------

/// A chart's drawing surface.
type Canvas<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Pixel size of tick labels; axis descriptions are two pixels larger.
const LABEL_PX: u32 = 16;

/// The width and height of `text` drawn `px` high, as measured on `area`.
fn text_size(area: &Canvas, text: &str, px: u32) -> (f64, f64) {
    let style = TextStyle::from((FONT, px).into_font());
    match area.estimate_text_size(text, &style) {
        Ok((w, h)) => (f64::from(w), f64::from(h)),
        Err(_) => (
            0.6 * f64::from(px) * text.chars().count() as f64,
            f64::from(px),
        ),
    }
}

/// `text`, cut short with "…" so that it is at most `width` pixels wide at `px`.
fn fit_text(area: &Canvas, text: &str, px: u32, width: f64) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let mut out = text.to_string();
    while text_size(area, &out, px).0 > width && !chars.is_empty() {
        chars.pop();
        out = chars.iter().collect::<String>() + "…";
    }
    out
}

/// Draws the title (plus the figure context, in grey) centred at the top of `area`, shrinking it
/// from `px` to fit the width, and returns the area below it.
fn draw_title<'a>(area: &Canvas<'a>, title: &str, px: u32) -> Result<Canvas<'a>> {
    let context = figure_context()
        .map(|c| format!(" — {c}"))
        .unwrap_or_default();
    let width = f64::from(area.dim_in_pixel().0) - 20.0;
    let px = (12..=px)
        .rev()
        .find(|&px| text_size(area, &format!("{title}{context}"), px).0 <= width)
        .unwrap_or(12);
    let (title_w, height) = text_size(area, title, px);
    let context_w = text_size(area, &context, px).0;
    let left = ((f64::from(area.dim_in_pixel().0) - title_w - context_w) / 2.0).max(0.0) as i32;
    let top = 10;
    let font = (FONT, px).into_font();
    let draw = |text: &str, x: i32, color: RGBColor| {
        let style = font
            .clone()
            .color(&color)
            .pos(Pos::new(HPos::Left, VPos::Top));
        area.draw_text(text, &style, (x, top)).map_err(plot_err)
    };
    draw(title, left, BLACK)?;
    draw(&context, left + title_w as i32, RGBColor(110, 110, 110))?;
    let (_, below) = area.split_vertically(top + height as i32 + 6);
    Ok(below)
}

/// One legend line: a name, its colour, and whether its points are marked with dots.
struct LegendEntry {
    name: String,
    color: RGBColor,
    dots: bool,
}

const LEGEND_SAMPLE: i32 = 26;

/// Splits `area` into the plot and, when there are entries, a legend panel to its right wide
/// enough for the longest name (at most a third of the figure): the legend never hides data.
fn split_legend_panel<'a>(
    area: &Canvas<'a>,
    entries: &[LegendEntry],
) -> (Canvas<'a>, Option<Canvas<'a>>) {
    if entries.is_empty() {
        return (area.clone(), None);
    }
    let full = f64::from(area.dim_in_pixel().0);
    let longest = entries
        .iter()
        .map(|e| text_size(area, &e.name, LABEL_PX).0)
        .fold(0.0, f64::max);
    let width = (longest + f64::from(LEGEND_SAMPLE) + 40.0).min(full / 3.0);
    let (plot, panel) = area.split_horizontally(full as i32 - width as i32);
    (plot, Some(panel))
}

/// Draws the legend in `panel`: one line sample (with a dot where the series has them) and name
/// per entry, in a light box whose top is `top` pixels down, level with the plot's top.
fn draw_legend(panel: &Canvas, entries: &[LegendEntry], top: i32) -> Result<()> {
    let (width, _) = panel.dim_in_pixel();
    let row = LABEL_PX as i32 + 10;
    let (x0, x1) = (4, width as i32 - 8);
    let bottom = top + 8 + row * entries.len() as i32;
    panel
        .draw(&Rectangle::new([(x0, top), (x1, bottom)], BLACK.mix(0.3)))
        .map_err(plot_err)?;
    let name_width = f64::from(x1 - x0 - LEGEND_SAMPLE - 20);
    for (i, e) in entries.iter().enumerate() {
        let y = top + 4 + row * i as i32 + row / 2;
        let (a, b) = (x0 + 8, x0 + 8 + LEGEND_SAMPLE);
        let line = ShapeStyle::from(&e.color).stroke_width(3);
        panel
            .draw(&PathElement::new(vec![(a, y), (b, y)], line))
            .map_err(plot_err)?;
        if e.dots {
            panel
                .draw(&Circle::new(((a + b) / 2, y), 4, e.color.filled()))
                .map_err(plot_err)?;
        }
        let name = fit_text(panel, &e.name, LABEL_PX, name_width);
        let style =
            TextStyle::from((FONT, LABEL_PX).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        panel
            .draw_text(&name, &style, (b + 8, y))
            .map_err(plot_err)?;
    }
    Ok(())
}

/// The plotting area (width, height in pixels) that `builder` leaves once its margins and label
/// areas are taken, found by building a throwaway chart (which draws nothing).
fn plot_size(builder: &mut ChartBuilder<BitMapBackend>) -> Result<(f64, f64)> {
    let probe = builder
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)
        .map_err(plot_err)?;
    let (w, h) = probe.plotting_area().dim_in_pixel();
    Ok((f64::from(w), f64::from(h)))
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting failed: {e:?}")
}

// ------------------------------------------------------------------------------------------------
// Line charts.
// ------------------------------------------------------------------------------------------------

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

/// Series with at most this many points get a dot on each.
const MAX_DOTTED_POINTS: usize = 40;

/// The points of `s` a chart with `axes` can show: finite, and positive on a log axis.
fn visible_points(s: &Series, axes: Axes) -> Vec<(f64, f64)> {
    let shown = |v: f64, log: bool| v.is_finite() && (!log || v > 0.0);
    s.points
        .iter()
        .copied()
        .filter(|&(x, y)| shown(x, axes.log_x) && shown(y, axes.log_y))
        .collect()
}

/// The legend of a line chart: one entry per series, or none for a single unnamed series.
fn legend_entries(series: &[Series], axes: Axes) -> Vec<LegendEntry> {
    if series.len() == 1 && series[0].name.is_empty() {
        return Vec::new();
    }
    let entry = |(i, s): (usize, &Series)| LegendEntry {
        name: s.name.clone(),
        color: palette(i),
        dots: visible_points(s, axes).len() <= MAX_DOTTED_POINTS,
    };
    series.iter().enumerate().map(entry).collect()
}

/// The x and y axes of a line chart over `series`, ticked to fit the plot that `builder` leaves.
fn line_chart_axes(
    builder: &mut ChartBuilder<BitMapBackend>,
    area: &Canvas,
    series: &[Series],
    axes: Axes,
) -> Result<(Axis, Axis)> {
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .collect();
    let (x0, x1) = finite_range(xs.iter().copied(), axes.log_x)?;
    let (y0, y1) = finite_range(ys.iter().copied(), axes.log_y)?;
    let (width, height) = plot_size(builder)?;
    let x = Axis::horizontal((x0, x1, Scale::of(&xs, axes.log_x)), area, width);
    let y = Axis::vertical((y0, y1, Scale::of(&ys, axes.log_y)), area, height);
    Ok((x, y))
}

type LineChart<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<Axis, Axis>>;

/// Draws the grid, the axes, their descriptions and tick labels of a line chart.
fn draw_line_mesh(
    chart: &mut LineChart,
    (x_label, y_label): (&str, &str),
    (x_scale, y_scale): (Scale, Scale),
) -> Result<()> {
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v: &f64| x_scale.label(*v))
        .y_label_formatter(&|v: &f64| y_scale.label(*v))
        .label_style((FONT, LABEL_PX))
        .axis_desc_style((FONT, LABEL_PX + 2))
        .draw()
        .map_err(plot_err)
}

/// Draws one series: a line in `color`, and a dot per point when there are few enough points
/// to tell apart.
fn draw_line_series(chart: &mut LineChart, s: &Series, color: RGBColor, axes: Axes) -> Result<()> {
    let points = visible_points(s, axes);
    let style = ShapeStyle::from(&color).stroke_width(2);
    chart
        .draw_series(LineSeries::new(points.iter().copied(), style))
        .map_err(plot_err)?;
    if points.len() <= MAX_DOTTED_POINTS {
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(plot_err)?;
    }
    Ok(())
}

/// The margin around a chart's plot, in pixels.
const CHART_MARGIN: i32 = 15;

/// A line chart with one line per series, a legend beside the plot, and optional log axes
/// (ticked 1-2-5 per decade, or at powers of two when every value is one), saved as PNG.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    axes: Axes,
) -> Result<()> {
    ensure_font()?;
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let body = draw_title(&root, title, 26)?;
    let legend = legend_entries(series, axes);
    let (plot_area, panel) = split_legend_panel(&body, &legend);
    let mut builder = ChartBuilder::on(&plot_area);
    builder
        .margin(CHART_MARGIN)
        .x_label_area_size(50)
        .y_label_area_size(80);
    let (x, y) = line_chart_axes(&mut builder, &plot_area, series, axes)?;
    let scales = (x.scale, y.scale);
    let mut chart = builder.build_cartesian_2d(x, y).map_err(plot_err)?;
    draw_line_mesh(&mut chart, (x_label, y_label), scales)?;
    for (i, s) in series.iter().enumerate() {
        draw_line_series(&mut chart, s, palette(i), axes)?;
    }
    if let Some(panel) = panel {
        draw_legend(&panel, &legend, CHART_MARGIN)?;
    }
    root.present()
        .map_err(plot_err)
        .with_context(|| format!("writing {}", path.display()))
}

// ------------------------------------------------------------------------------------------------
// Heatmaps.
// ------------------------------------------------------------------------------------------------

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

/// The (rows, columns) of a non-empty rectangular matrix.
fn matrix_shape(matrix: &[Vec<f64>]) -> Result<(usize, usize)> {
    let rows = matrix.len();
    let cols = matrix.first().map_or(0, |r| r.len());
    if rows == 0 || cols == 0 || matrix.iter().any(|r| r.len() != cols) {
        bail!("heatmap needs a non-empty rectangular matrix");
    }
    Ok((rows, cols))
}

/// The values the colour map spans: the matrix's finite bounds (± 0.5 around a constant one).
fn colour_range(matrix: &[Vec<f64>]) -> Result<(f64, f64)> {
    let (lo, hi) = finite_bounds(matrix.iter().flatten().copied(), false)?;
    Ok(if hi - lo < 1e-12 * hi.abs().max(1.0) {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    })
}

/// The name of cell `i` (a column, row or bar): its entry in `names`, or its index.
fn cell_name(names: &[String], i: usize) -> String {
    names.get(i).cloned().unwrap_or_else(|| i.to_string())
}

/// Every how many cells a label goes (1, 2, 4, 5, 8, 10, 20, 40…) so that the widest of `names`
/// (measured by `extent` along the axis) keeps 10 pixels from the next, on cells `cell` pixels
/// long.
fn label_stride(n: usize, names: &[String], extent: &dyn Fn(&str) -> f64, cell: f64) -> usize {
    let widest = (0..n)
        .map(|i| extent(&cell_name(names, i)))
        .fold(0.0, f64::max);
    let needed = ((widest + 10.0) / cell.max(1e-3)).ceil();
    let nice = (0..12).flat_map(|e| [1.0, 2.0, 4.0, 5.0, 8.0].map(|m| m * 10f64.powi(e)));
    nice.into_iter()
        .find(|&s| s >= needed)
        .map_or(n.max(1), |s| s as usize)
}

impl Axis {
    /// An axis of `n` equal cells (heatmap columns or rows, bars) over `0..n`, cell `i` spanning
    /// `i..i + 1` (or, `top_down`, `n - 1 - i..n - i`), ticked at the centre of every
    /// `stride`-th cell counted from cell 0.
    fn cells(n: usize, stride: usize, top_down: bool) -> Axis {
        let position = |i: usize| if top_down { n - 1 - i } else { i };
        let centres = (0..n)
            .step_by(stride.max(1))
            .map(|i| position(i) as f64 + 0.5)
            .collect();
        Axis {
            lo: 0.0,
            hi: n as f64,
            scale: Scale::Linear,
            ticks: TickSet {
                major: centres,
                minor: Vec::new(),
            },
        }
    }
}

/// The column and row axes of a heatmap, labelled with `names` (or indices) as densely as fits a
/// plot of `width × height` pixels; row 0 is at the top.
fn heatmap_axes(
    area: &Canvas,
    (width, height): (f64, f64),
    (rows, cols): (usize, usize),
    (x_names, y_names): (&[String], &[String]),
) -> (Axis, Axis) {
    let text_width = |s: &str| text_size(area, s, HEATMAP_LABEL_PX).0;
    let text_height = |s: &str| text_size(area, s, HEATMAP_LABEL_PX).1;
    let x_stride = label_stride(cols, x_names, &text_width, width / cols as f64);
    let y_stride = label_stride(rows, y_names, &text_height, height / rows as f64);
    (
        Axis::cells(cols, x_stride, false),
        Axis::cells(rows, y_stride, true),
    )
}

/// Pixel size of the heatmap's cell labels.
const HEATMAP_LABEL_PX: u32 = 14;

/// Draws the axes of a heatmap: column and row names (or indices) at the centres of the cells.
fn draw_heatmap_mesh(
    chart: &mut LineChart,
    (x_desc, y_desc): (&str, &str),
    rows: usize,
    (x_names, y_names): (&[String], &[String]),
) -> Result<()> {
    let x_label = |v: &f64| cell_name(x_names, v.floor() as usize);
    let y_label = |v: &f64| cell_name(y_names, rows - 1 - v.floor() as usize);
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FONT, HEATMAP_LABEL_PX))
        .axis_desc_style((FONT, 17))
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .draw()
        .map_err(plot_err)
}

/// Draws one cell per matrix entry (row 0 at the top), coloured by where it falls in `lo..hi`.
fn draw_heatmap_cells(
    chart: &mut LineChart,
    matrix: &[Vec<f64>],
    (lo, hi): (f64, f64),
) -> Result<()> {
    let rows = matrix.len();
    let cell = |r: usize, c: usize, v: f64| {
        let (x, y) = (c as f64, (rows - 1 - r) as f64);
        let colour = viridis((v - lo) / (hi - lo)).filled();
        Rectangle::new([(x, y), (x + 1.0, y + 1.0)], colour)
    };
    let cells = matrix
        .iter()
        .enumerate()
        .flat_map(|(r, row)| row.iter().enumerate().map(move |(c, &v)| cell(r, c, v)));
    chart.draw_series(cells).map_err(plot_err)?;
    Ok(())
}

/// Draws the colour bar for `lo..hi` in `area`, its ends level with the heatmap's plot, whose
/// rows span `plot_rows` pixels of the figure.
fn draw_colour_bar(area: &Canvas, (lo, hi): (f64, f64), plot_rows: Range<i32>) -> Result<()> {
    let base = area.get_base_pixel().1;
    let bottom = base + area.dim_in_pixel().1 as i32;
    let mut builder = ChartBuilder::on(area);
    builder
        .margin_top(plot_rows.start - base)
        .margin_bottom(bottom - plot_rows.end)
        .margin_right(10)
        .y_label_area_size(0)
        .right_y_label_area_size(55);
    let height = f64::from((plot_rows.end - plot_rows.start).max(1));
    let axis = Axis::vertical((lo, hi, Scale::Linear), area, height);
    let mut bar = builder.build_cartesian_2d(0..1, axis).map_err(plot_err)?;
    bar.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .label_style((FONT, 13))
        .y_label_formatter(&|v: &f64| tick_label(*v))
        .draw()
        .map_err(plot_err)?;
    let steps = 100;
    let strip = |i: usize| {
        let at = |i: usize| lo + (hi - lo) * i as f64 / steps as f64;
        let colour = viridis(i as f64 / steps as f64).filled();
        Rectangle::new([(0, at(i)), (1, at(i + 1))], colour)
    };
    bar.draw_series((0..steps).map(strip)).map_err(plot_err)?;
    Ok(())
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
    let (rows, cols) = matrix_shape(matrix)?;
    let range = colour_range(matrix)?;
    let names = ticks.unwrap_or((&[], &[]));
    let root = BitMapBackend::new(path, (900, 780)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let body = draw_title(&root, title, 24)?;
    let (main, bar) = body.split_horizontally(800);
    let mut builder = ChartBuilder::on(&main);
    builder
        .margin(10)
        .x_label_area_size(60)
        .y_label_area_size(80);
    let size = plot_size(&mut builder)?;
    let (x, y) = heatmap_axes(&main, size, (rows, cols), names);
    let mut chart = builder.build_cartesian_2d(x, y).map_err(plot_err)?;
    let descriptions = (x_label_text, y_label_text);
    draw_heatmap_mesh(&mut chart, descriptions, rows, names)?;
    draw_heatmap_cells(&mut chart, matrix, range)?;
    let plot_rows = chart.plotting_area().get_pixel_range().1;
    draw_colour_bar(&bar, range, plot_rows)?;
    root.present()
        .map_err(plot_err)
        .with_context(|| format!("writing {}", path.display()))
}

// ------------------------------------------------------------------------------------------------
// Bar charts.
// ------------------------------------------------------------------------------------------------

/// The value axis of a bar chart: from zero (bars grow from it) to past the largest value, or
/// down past the most negative one.
fn bar_value_range(values: &[f64]) -> Result<(f64, f64)> {
    let (lo, hi) = finite_range(values.iter().copied().chain([0.0]), false)?;
    let (min, max) = finite_bounds(values.iter().copied(), false)?;
    Ok((
        if min < 0.0 { lo } else { 0.0 },
        if max > 0.0 { hi } else { 0.0 },
    ))
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
    let (lo, hi) = bar_value_range(values)?;
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let body = draw_title(&root, title, 26)?;
    let mut builder = ChartBuilder::on(&body);
    builder
        .margin(CHART_MARGIN)
        .x_label_area_size(60)
        .y_label_area_size(80);
    let (width, height) = plot_size(&mut builder)?;
    let n = values.len();
    let slot = width / n as f64;
    let text_width = |s: &str| text_size(&body, s, LABEL_PX - 1).0;
    let x = Axis::cells(n, label_stride(n, labels, &text_width, slot), false);
    let y = Axis::vertical((lo, hi, Scale::Linear), &body, height);
    let mut chart = builder.build_cartesian_2d(x, y).map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_label)
        .label_style((FONT, LABEL_PX - 1))
        .axis_desc_style((FONT, LABEL_PX + 2))
        .x_label_formatter(&|v: &f64| cell_name(labels, v.floor() as usize))
        .y_label_formatter(&|v: &f64| tick_label(*v))
        .draw()
        .map_err(plot_err)?;
    // Bars fill their slot but for a gap on each side, and are never wider than 160 px.
    let side = ((slot - 160.0) / 2.0).max(8.0) as u32;
    let bar = |(i, &v): (usize, &f64)| {
        let mut bar = Rectangle::new([(i as f64, 0.0), (i as f64 + 1.0, v)], palette(0).filled());
        bar.set_margin(0, 0, side, side);
        bar
    };
    chart
        .draw_series(values.iter().enumerate().map(bar))
        .map_err(plot_err)?;
    root.present()
        .map_err(plot_err)
        .with_context(|| format!("writing {}", path.display()))
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

/// The git revision of the code: `MODULE08_GIT_REV` when set (scripts/gpu-run.sh sets it to the
/// revision the carried executables were built from), else `git describe --always --dirty` of the
/// workspace, else `"unknown"`.
pub fn git_rev() -> String {
    if let Ok(rev) = std::env::var("MODULE08_GIT_REV") {
        if !rev.trim().is_empty() {
            return rev.trim().to_string();
        }
    }
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

    /// The labels of the ticks chosen for an axis `length` pixels long whose labels are 9 px
    /// wide per character.
    fn ticks_for(lo: f64, hi: f64, scale: Scale, length: f64) -> Vec<String> {
        let width = |s: &str| 9.0 * s.chars().count() as f64;
        let axis = Axis::fitted((lo, hi, scale), length, &width, 14.0);
        axis.ticks.major.iter().map(|&v| scale.label(v)).collect()
    }

    #[test]
    fn log_ticks_read_1_2_5_per_decade() {
        let decade = ticks_for(1000.0 / 1.1, 10000.0 * 1.1, Scale::Log, 600.0);
        assert_eq!(decade, ["1k", "2k", "5k", "10k"]);
        let small = ticks_for(0.05, 20.0, Scale::Log, 600.0);
        assert_eq!(
            small,
            ["0.05", "0.1", "0.2", "0.5", "1", "2", "5", "10", "20"]
        );
    }

    #[test]
    fn log_ticks_thin_out_over_many_decades() {
        let wide = ticks_for(1e-5, 1e6, Scale::Log, 600.0);
        assert_eq!(wide, ["1e-4", "0.01", "1", "100", "10k", "1M"]);
    }

    #[test]
    fn power_of_two_data_get_exact_power_of_two_ticks() {
        let lengths: Vec<f64> = (6..=13).map(|k| 2f64.powi(k)).collect();
        assert_eq!(Scale::of(&lengths, true), Scale::LogPow2);
        assert_eq!(Scale::of(&[64.0, 100.0], true), Scale::Log);
        assert_eq!(Scale::of(&lengths, false), Scale::Linear);
        let (lo, hi) = (64.0 / 1.1, 8192.0 * 1.1);
        let roomy = ticks_for(lo, hi, Scale::LogPow2, 700.0);
        assert_eq!(
            roomy,
            ["64", "128", "256", "512", "1024", "2048", "4096", "8192"]
        );
        let tight = ticks_for(lo, hi, Scale::LogPow2, 250.0);
        assert_eq!(tight, ["64", "256", "1024", "4096"]);
    }

    #[test]
    fn narrow_log_ranges_fall_back_to_even_steps() {
        let narrow = ticks_for(1000.0 / 1.1, 1500.0 * 1.1, Scale::Log, 700.0);
        assert!(narrow.len() >= 3, "{narrow:?}");
        assert!(narrow.contains(&"1.2k".to_string()), "{narrow:?}");
    }

    #[test]
    fn chosen_ticks_are_few_distinct_and_present() {
        let ranges = [
            (0.0, 1.0),
            (-3.7, 12.2),
            (0.9, 1.1),
            (1e-4, 2e-4),
            (3.0, 3000.0),
            (1.0, 1e12),
            (99990.0, 100010.0),
            (0.002, 0.2),
        ];
        for (lo, hi) in ranges {
            for scale in [Scale::Linear, Scale::Log, Scale::LogPow2] {
                if scale != Scale::Linear && lo <= 0.0 {
                    continue;
                }
                for length in [200.0, 500.0, 900.0] {
                    let labels = ticks_for(lo, hi, scale, length);
                    let what = format!("{scale:?} {lo}..{hi} at {length} px: {labels:?}");
                    assert!(!labels.is_empty() && labels.len() <= MAX_TICKS, "{what}");
                    for (i, l) in labels.iter().enumerate() {
                        assert!(!labels[..i].contains(l), "duplicate {l} in {what}");
                    }
                }
            }
        }
    }

    #[test]
    fn linear_ticks_are_exact_decimals() {
        let unit = ticks_for(0.0, 1.0, Scale::Linear, 500.0);
        assert_eq!(unit, ["0", "0.2", "0.4", "0.6", "0.8", "1"]);
        let steps = ticks_for(-250.0, 5250.0, Scale::Linear, 700.0);
        assert_eq!(steps, ["0", "1000", "2000", "3000", "4000", "5000"]);
    }

    #[test]
    fn log_and_power_of_two_labels_are_short() {
        let log = [
            1000.0, 1500.0, 2.5e6, 1e9, 0.1, 1e-5, 3e15, 5.0, 250000.0, 1e12,
        ];
        let log: Vec<String> = log.iter().map(|&v| log_tick_label(v)).collect();
        let expected = [
            "1k", "1.5k", "2.5M", "1G", "0.1", "1e-5", "3e15", "5", "250k", "1T",
        ];
        assert_eq!(log, expected);
        let pow2 = [1024.0, 65536.0, 131072.0, 1048576.0, 0.5, 0.0625, 1.0];
        let pow2: Vec<String> = pow2.iter().map(|&v| pow2_tick_label(v)).collect();
        assert_eq!(pow2, ["1024", "65536", "128Ki", "1Mi", "0.5", "1/16", "1"]);
    }

    #[test]
    fn integer_ticks_print_without_decimals() {
        assert_eq!(tick_label(1000.0), "1000");
        assert_eq!(tick_label(5.0), "5");
        assert_eq!(tick_label(-20.0), "-20");
        assert_eq!(tick_label(-0.0), "0");
        for v in [1.0, 2.0, 10.0, 50.0, 99.0, 100.0, 4000.0, 99999.0] {
            assert!(!tick_label(v).contains('.'), "{v} → {}", tick_label(v));
            assert!(
                !log_tick_label(v).contains('.'),
                "{v} → {}",
                log_tick_label(v)
            );
        }
    }

    #[test]
    fn cell_labels_thin_out_in_round_strides() {
        let width = |s: &str| 9.0 * s.chars().count() as f64;
        assert_eq!(label_stride(12, &[], &width, 58.0), 1);
        assert_eq!(label_stride(64, &[], &width, 10.9), 4);
        assert_eq!(label_stride(1000, &[], &width, 0.7), 80);
    }

    #[test]
    fn titles_carry_the_figure_context() {
        set_figure_context("cpu (8 threads), f32");
        assert_eq!(titled("Loss"), "Loss — cpu (8 threads), f32");
        set_figure_context("");
        assert_eq!(titled("Loss"), "Loss");
    }
}
