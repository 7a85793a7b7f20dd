//! Plots (plotters): per-layer mismatch bars (`diff --plot`, the demo) and a per-layer expert
//! load heatmap (`inspect --plot`). The file extension picks the format: `.png` (text drawn with
//! an embedded DejaVu Sans subset, so no system font is needed) or `.svg`.

use crate::CliError;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

/// A plot could not be drawn or written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The extension is neither `.png` nor `.svg`.
    #[error("{path}: unknown plot format (use a .png or .svg file name)")]
    Format {
        /// The path.
        path: String,
    },
    /// Nothing to draw.
    #[error("{path}: nothing to plot ({what})")]
    Empty {
        /// The path.
        path: String,
        /// What was empty.
        what: String,
    },
    /// Drawing or writing failed.
    #[error("{path}: cannot draw the plot: {message}")]
    Draw {
        /// The path.
        path: String,
        /// The backend's message.
        message: String,
    },
}

impl From<PlotError> for CliError {
    fn from(e: PlotError) -> Self {
        CliError::Input(e.to_string())
    }
}

/// DejaVu Sans, subset to Latin-1 (see `assets/FONT-LICENSE.txt`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded file is valid; a failure would only leave text undrawn in PNGs.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Png,
    Svg,
}

fn format_of(path: &Path) -> Result<Format, PlotError> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("png") => Ok(Format::Png),
        Some("svg") => Ok(Format::Svg),
        _ => Err(PlotError::Format {
            path: path.display().to_string(),
        }),
    }
}

fn draw_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError::Draw {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Draws with `draw` (generic over the backend) into `path` (PNG or SVG by extension).
fn draw_to<F>(path: &Path, size: (u32, u32), draw: F) -> Result<(), PlotError>
where
    F: DrawFn,
{
    register_font();
    let fmt = format_of(path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(draw_err(path))?;
    }
    match fmt {
        Format::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw.draw(&root).map_err(draw_err(path))?;
            root.present().map_err(draw_err(path))?;
        }
        Format::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw.draw(&root).map_err(draw_err(path))?;
            root.present().map_err(draw_err(path))?;
        }
    }
    Ok(())
}

/// A drawing generic over the plotters backend.
trait DrawFn {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

fn s<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

/// One named series of per-layer values.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSeries {
    /// Legend label.
    pub label: String,
    /// One value per layer (fractions in `[0, 1]`).
    pub values: Vec<f64>,
}

const PALETTE: [RGBColor; 4] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Pixels the mismatch chart spends outside its plot area vertically (margins, caption, x labels).
const BARS_CHROME_PX: f64 = 16.0 * 2.0 + 40.0 + 48.0;
/// Pixels of the legend box: one row per series, padding and the gap to the plot's top edge.
fn legend_px(series: usize) -> f64 {
    22.0 * series.max(1) as f64 + 30.0
}

/// The top of the y axis (percent) for bars up to `max` percent: high enough that the legend box
/// (upper right, `legend_px` tall) sits above the tallest bar in a chart `height` pixels tall, so
/// that the legend never covers the last layers' bars, however many layers there are.
fn y_top(max: f64, series: usize, height: u32) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let plot = (f64::from(height) - BARS_CHROME_PX).max(120.0);
    let free = (1.0 - legend_px(series) / plot - 0.03).max(0.25);
    max / free
}

struct MismatchBars<'a> {
    title: &'a str,
    layers: &'a [u32],
    series: &'a [LayerSeries],
}

impl DrawFn for MismatchBars<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(s)?;
        let n = self.layers.len();
        let max = self
            .series
            .iter()
            .flat_map(|s| s.values.iter().copied())
            .fold(0.0f64, f64::max)
            * 100.0;
        let (_, height) = root.dim_in_pixel();
        let top = y_top(max, self.series.len(), height);
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..top)
            .map_err(s)?;
        let layers = self.layers;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n.min(40))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < layers.len() {
                    layers[i as usize].to_string()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| format!("{y:.0}%"))
            .x_desc("MoE layer id")
            .y_desc("routers whose top-k set differs")
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 17))
            .draw()
            .map_err(s)?;
        let groups = self.series.len().max(1) as f64;
        let width = 0.8 / groups;
        for (si, ser) in self.series.iter().enumerate() {
            let color = PALETTE[si % PALETTE.len()];
            let x0 = |i: usize| i as f64 - 0.4 + si as f64 * width;
            chart
                .draw_series(
                    ser.values.iter().enumerate().map(|(i, &v)| {
                        Rectangle::new([(x0(i), 0.0), (x0(i) + width * 0.92, v * 100.0)], color.filled())
                    }),
                )
                .map_err(s)?
                .label(ser.label.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
            if n <= 24 {
                let style = TextStyle::from(("sans-serif", 12).into_font()).pos(text_anchor_bottom());
                chart
                    .draw_series(ser.values.iter().enumerate().map(|(i, &v)| {
                        Text::new(
                            format_pct(v),
                            (x0(i) + width * 0.46, v * 100.0 + top * 0.01),
                            style.clone(),
                        )
                    }))
                    .map_err(s)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 16))
            .draw()
            .map_err(s)?;
        Ok(())
    }
}

fn text_anchor_bottom() -> plotters::style::text_anchor::Pos {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    Pos::new(HPos::Center, VPos::Bottom)
}

fn format_pct(v: f64) -> String {
    let p = v * 100.0;
    if p == 0.0 {
        "0".into()
    } else if p < 1.0 {
        format!("{p:.2}")
    } else {
        format!("{p:.1}")
    }
}

/// Draws the fraction of routers whose id set differs, per MoE layer, as grouped bars (one group
/// per layer, one bar per series) into `path` (`.png` or `.svg`).
pub fn plot_mismatch_per_layer(
    path: &Path,
    title: &str,
    layers: &[u32],
    series: &[LayerSeries],
) -> Result<(), PlotError> {
    if layers.is_empty() || series.is_empty() {
        return Err(PlotError::Empty {
            path: path.display().to_string(),
            what: "no layer or no series".into(),
        });
    }
    if let Some(bad) = series.iter().find(|s| s.values.len() != layers.len()) {
        return Err(PlotError::Empty {
            path: path.display().to_string(),
            what: format!(
                "series {:?} has {} values for {} layers",
                bad.label,
                bad.values.len(),
                layers.len()
            ),
        });
    }
    let w = (220 + 70 * layers.len() as u32).clamp(640, 1600);
    draw_to(path, (w, 480), MismatchBars { title, layers, series })
}

struct Heatmap<'a> {
    title: &'a str,
    layers: &'a [u32],
    loads: &'a [Vec<u64>],
}

/// White → dark blue for `t` in `[0, 1]`, with a red end for overload (`t > 0.5` means above the
/// mean).
fn heat(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    // Diverging: 0 (idle) = blue, 0.5 (balanced) = white, 1 (≥ 2× mean) = red.
    let (a, b, u) = if t < 0.5 {
        ((49.0, 54.0, 149.0), (247.0, 247.0, 247.0), t / 0.5)
    } else {
        ((247.0, 247.0, 247.0), (178.0, 24.0, 43.0), (t - 0.5) / 0.5)
    };
    let m = |x: f64, y: f64| (x + (y - x) * u).round() as u8;
    RGBColor(m(a.0, b.0), m(a.1, b.1), m(a.2, b.2))
}

impl DrawFn for Heatmap<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(s)?;
        let (w, _) = root.dim_in_pixel();
        let (main, bar) = root.split_horizontally(w.saturating_sub(110));
        let e = self.loads.iter().map(Vec::len).max().unwrap_or(0);
        let l = self.layers.len();
        let mut chart = ChartBuilder::on(&main)
            .caption(self.title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..e as f64, (0u32..(l as u32).saturating_sub(1)).into_segmented())
            .map_err(s)?;
        let layers = self.layers;
        chart
            .configure_mesh()
            .disable_mesh()
            .y_labels(l + 1)
            .y_label_formatter(&|y| match y {
                SegmentValue::CenterOf(i) => layers.get(*i as usize).map_or_else(String::new, u32::to_string),
                _ => String::new(),
            })
            .x_labels(9)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc("expert id")
            .y_desc("MoE layer id")
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 17))
            .draw()
            .map_err(s)?;
        // Map load / mean to [0, 1] with 1 ↔ 2× the mean (log scale around balanced).
        let cells = self.loads.iter().enumerate().flat_map(|(li, row)| {
            let mean = row.iter().sum::<u64>() as f64 / row.len().max(1) as f64;
            row.iter().enumerate().map(move |(ei, &c)| {
                let r = if mean > 0.0 { c as f64 / mean } else { 0.0 };
                let t = if r <= 0.0 { 0.0 } else { 0.5 + r.log2() / 2.0 };
                Rectangle::new(
                    [
                        (ei as f64, SegmentValue::Exact(li as u32)),
                        (ei as f64 + 1.0, SegmentValue::Exact(li as u32 + 1)),
                    ],
                    heat(t).filled(),
                )
            })
        });
        chart.draw_series(cells).map_err(s)?;
        // Colour bar.
        let mut cb = ChartBuilder::on(&bar)
            .margin_top(60)
            .margin_bottom(60)
            .margin_right(40)
            .y_label_area_size(0)
            .right_y_label_area_size(44)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(s)?;
        cb.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(5)
            .y_label_formatter(&|t| {
                let r = 2f64.powf((t - 0.5) * 2.0);
                if *t <= 0.0 { "0".into() } else { format!("{r:.2}×") }
            })
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(s)?;
        let steps = 64;
        cb.draw_series((0..steps).map(|i| {
            let a = i as f64 / steps as f64;
            let b = (i + 1) as f64 / steps as f64;
            Rectangle::new([(0.0, a), (1.0, b)], heat((a + b) / 2.0).filled())
        }))
        .map_err(s)?;
        bar.draw(&Text::new(
            "load / mean",
            (4, 30),
            ("sans-serif", 14).into_font().color(&BLACK),
        ))
        .map_err(s)?;
        Ok(())
    }
}

/// Draws tokens per expert for every MoE layer as a heatmap (rows = layers, columns = experts;
/// colour = load relative to the layer's mean, blue = idle, white = balanced, red = ≥ 2× the
/// mean) into `path` (`.png` or `.svg`). `loads[i]` belongs to `layers[i]`.
pub fn plot_expert_load_heatmap(path: &Path, title: &str, layers: &[u32], loads: &[Vec<u64>]) -> Result<(), PlotError> {
    if layers.is_empty() || loads.len() != layers.len() || loads.iter().all(Vec::is_empty) {
        return Err(PlotError::Empty {
            path: path.display().to_string(),
            what: format!("{} layers with {} load rows", layers.len(), loads.len()),
        });
    }
    let h = (160 + 28 * layers.len() as u32).clamp(360, 1400);
    draw_to(path, (1100, h), Heatmap { title, layers, loads })
}

/// `inspect --plot`: the expert load heatmap of every MoE layer of `trace`.
pub fn plot_trace_load(path: &Path, trace: &moe_router::trace::Trace, name: &str) -> Result<(), PlotError> {
    let loads = moe_router::metrics::load_stats(trace);
    let layers: Vec<u32> = loads.iter().map(|l| l.layer).collect();
    let rows: Vec<Vec<u64>> = loads.into_iter().map(|l| l.tokens_per_expert).collect();
    let h = trace.header();
    let title = format!("Expert load per layer: {name} (E={}, K={})", h.num_experts(), h.top_k());
    plot_expert_load_heatmap(path, &title, &layers, &rows)
}

/// `diff --plot`: the mismatch fraction per layer of a comparison of `a` and `b`.
pub fn plot_comparison(path: &Path, c: &moe_router::metrics::Comparison, a: &str, b: &str) -> Result<(), PlotError> {
    let layers: Vec<u32> = c.per_layer.iter().map(|l| l.layer).collect();
    let series = [LayerSeries {
        label: format!(
            "all layers: {:.2}% of routers, {:.1}% of tokens",
            c.router_mismatch_fraction * 100.0,
            c.token_any_layer_mismatch_fraction * 100.0
        ),
        values: c.per_layer.iter().map(|l| l.mismatch_fraction).collect(),
    }];
    plot_mismatch_per_layer(path, &format!("Routers that differ: {a} vs {b}"), &layers, &series)
}

/// One named series of per-step values (one value per optimisation step).
#[derive(Debug, Clone, PartialEq)]
pub struct StepSeries {
    /// Legend label.
    pub label: String,
    /// One value per step, step 0 first.
    pub values: Vec<f64>,
}

/// How a panel's y axis shows its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepScale {
    /// Linear, values as they are.
    Linear,
    /// Linear, fractions shown as percent.
    Percent,
    /// Logarithmic (values ≤ 0 are drawn at the axis floor).
    Log,
}

/// One panel of [`plot_training_curves`]: a metric per step for several runs.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPanel {
    /// Panel caption (the metric).
    pub title: String,
    /// The y axis.
    pub scale: StepScale,
    /// The runs.
    pub series: Vec<StepSeries>,
}

struct StepCurves<'a> {
    title: &'a str,
    panels: &'a [StepPanel],
}

/// The y range of a panel (in log10 units for [`StepScale::Log`]) and the floor values are
/// clamped to.
fn step_range(panel: &StepPanel) -> (f64, f64, f64) {
    let vals = panel
        .series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| v.is_finite());
    match panel.scale {
        StepScale::Log => {
            let pos: Vec<f64> = vals.filter(|&v| v > 0.0).collect();
            let lo = pos.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = pos.iter().copied().fold(0.0f64, f64::max);
            if pos.is_empty() {
                return (-1.0, 0.0, 0.1);
            }
            let (a, b) = (lo.log10().floor(), hi.log10().ceil());
            (a, if b > a { b } else { a + 1.0 }, 10f64.powf(a))
        }
        StepScale::Linear | StepScale::Percent => {
            let m = vals.fold(0.0f64, f64::max);
            let (m, cap) = if panel.scale == StepScale::Percent {
                (m * 100.0, 100.0)
            } else {
                (m, f64::INFINITY)
            };
            (0.0, if m > 0.0 { (m * 1.15).min(cap).max(m) } else { 1.0 }, 0.0)
        }
    }
}

impl DrawFn for StepCurves<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(s)?;
        let root = root.titled(self.title, ("sans-serif", 24)).map_err(s)?;
        let cols = if self.panels.len() > 1 { 2 } else { 1 };
        let rows = self.panels.len().div_ceil(cols);
        let areas = root.split_evenly((rows, cols));
        for (panel, area) in self.panels.iter().zip(areas.iter()) {
            let n = panel.series.iter().map(|s| s.values.len()).max().unwrap_or(0);
            let (lo, hi, floor) = step_range(panel);
            let x_hi = (n.max(2) - 1) as f64;
            let mut chart = ChartBuilder::on(area)
                .caption(panel.title.as_str(), ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(64)
                .build_cartesian_2d(0f64..x_hi, lo..hi)
                .map_err(s)?;
            let scale = panel.scale;
            chart
                .configure_mesh()
                .x_labels(n.clamp(2, 11))
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_labels(6)
                .y_label_formatter(&|y| match scale {
                    StepScale::Log => format!("{:.0e}", 10f64.powf(*y)),
                    StepScale::Percent => format!("{y:.0}%"),
                    StepScale::Linear => format!("{y:.2}"),
                })
                .x_desc("step")
                .label_style(("sans-serif", 13))
                .axis_desc_style(("sans-serif", 14))
                .draw()
                .map_err(s)?;
            for (si, ser) in panel.series.iter().enumerate() {
                let color = PALETTE[si % PALETTE.len()];
                let y = |v: f64| match scale {
                    StepScale::Log => v.max(floor).log10(),
                    StepScale::Percent => v * 100.0,
                    StepScale::Linear => v,
                };
                let pts: Vec<(f64, f64)> = ser
                    .values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(i, &v)| (i as f64, y(v)))
                    .collect();
                chart
                    .draw_series(std::iter::once(PathElement::new(pts.clone(), color.stroke_width(2))))
                    .map_err(s)?
                    .label(ser.label.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(s)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(s)?;
        }
        Ok(())
    }
}

/// Draws per-step training curves, one panel per metric (two panels a row), each with one line
/// per run, into `path` (`.png` or `.svg`). Every series of a panel must have at least one value.
pub fn plot_training_curves(path: &Path, title: &str, panels: &[StepPanel]) -> Result<(), PlotError> {
    let empty = |what: String| PlotError::Empty {
        path: path.display().to_string(),
        what,
    };
    if panels.is_empty() {
        return Err(empty("no panel".into()));
    }
    if let Some(p) = panels
        .iter()
        .find(|p| p.series.is_empty() || p.series.iter().any(|s| s.values.is_empty()))
    {
        return Err(empty(format!("panel {:?} has no series or an empty one", p.title)));
    }
    let rows = panels.len().div_ceil(2) as u32;
    draw_to(path, (1200, 80 + 380 * rows), StepCurves { title, panels })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13: at 48 layers the legend covered the last layers' bars (the y axis only had 25%
    /// headroom); the axis now leaves the legend's height free above the tallest bar.
    #[test]
    fn the_legend_band_stays_clear_of_the_tallest_bar() {
        for series in 1..=4 {
            for max in [0.5, 12.0, 60.0, 100.0] {
                let top = y_top(max, series, 480);
                let plot = 480.0 - BARS_CHROME_PX;
                let bar_px = max / top * plot;
                assert!(
                    bar_px + legend_px(series) <= plot,
                    "{series} series, max {max}%: bar {bar_px:.0} px + legend {} px > plot {plot} px",
                    legend_px(series)
                );
            }
        }
        assert_eq!(y_top(0.0, 2, 480), 1.0);
    }
}
