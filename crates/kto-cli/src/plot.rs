//! Learning curves from a run's `metrics.jsonl`: a grid of panels (loss, rewards, KL, held-out accuracy, learning
//! rate, gradient norm) drawn as SVG and PNG. Text uses an embedded DejaVu Sans, so no system font is needed.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{anyhow, bail, Context, Result};
use kto_data::atomic::write_file as write_atomic;
use kto_trainer::metrics::read_numbered_rows;
use kto_trainer::run_dir::{RunDir, METRICS_FILE};
use plotters::coord::types::{RangedCoordf64, RangedCoordi64};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

const WIDTH: u32 = 1800;
const HEIGHT: u32 = 1080;
const GRID_COLUMNS: usize = 3;
const HEADER_HEIGHT: u32 = 80;
/// Train series with at least this many points are drawn raw (faint) plus smoothed (bold).
const SMOOTH_FROM_POINTS: usize = 30;
/// Series with at most this many points get a marker on every point, so a single step still shows.
const MARK_UP_TO_POINTS: usize = 25;
/// Step ranges a long train series is reduced to before drawing (see [`decimated`]).
const DECIMATED_BUCKETS: usize = 600;

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(230, 115, 0);
const GREEN: RGBColor = RGBColor(34, 139, 34);
const CRIMSON: RGBColor = RGBColor(214, 39, 40);
const PURPLE: RGBColor = RGBColor(120, 70, 170);
const GREY: RGBColor = RGBColor(110, 110, 110);
const TEXT: RGBColor = RGBColor(30, 30, 30);

/// The files `plot_run` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlotOutputs {
    pub svg: PathBuf,
    pub png: PathBuf,
}

/// Draws the learning curves of `run_dir/metrics.jsonl` into `out` (see [`output_paths`]), each file written
/// atomically. Used by `kto plot` and at the end of `kto train`.
pub fn plot_run(run_dir: &RunDir, out: Option<&Path>) -> Result<PlotOutputs> {
    locate_metrics(run_dir)?;
    let metrics = read_metrics(&run_dir.metrics_file())?;
    let outputs = output_paths(run_dir, out);
    let title = format!("KTO learning curves: {}", run_name(run_dir.path()));

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw_figure(&root, &metrics, &title)?;
        root.present()
            .map_err(|e| anyhow!("drawing the SVG: {e}"))?;
    }
    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        draw_figure(&root, &metrics, &title)?;
        root.present()
            .map_err(|e| anyhow!("drawing the PNG: {e}"))?;
    }

    for path in [&outputs.svg, &outputs.png] {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
    }
    write_atomic(&outputs.svg, svg.as_bytes())?;
    write_atomic(&outputs.png, &encode_png(&rgb, WIDTH, HEIGHT)?)?;
    Ok(outputs)
}

/// Where the curves go: `RUN_DIR/curves.{svg,png}` by default. `--out FILE` names them: `FILE` itself when it ends
/// in `.svg` or `.png` (the other format takes the same stem), otherwise `FILE.svg` and `FILE.png`.
pub fn output_paths(run_dir: &RunDir, out: Option<&Path>) -> PlotOutputs {
    let stem = match out {
        None => run_dir.curves_stem(),
        Some(file) => {
            let known_extension = file
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("svg") || e.eq_ignore_ascii_case("png"));
            if known_extension {
                file.with_extension("")
            } else {
                file.to_path_buf()
            }
        }
    };
    let with = |extension: &str| {
        let mut name = stem.clone().into_os_string();
        name.push(".");
        name.push(extension);
        PathBuf::from(name)
    };
    PlotOutputs {
        svg: with("svg"),
        png: with("png"),
    }
}

fn locate_metrics(run: &RunDir) -> Result<()> {
    let run_dir = run.path();
    if !run_dir.exists() {
        bail!(
            "run directory {} does not exist: `kto plot RUN_DIR` reads RUN_DIR/{METRICS_FILE}, which `kto train` \
             writes into its output_dir",
            run_dir.display()
        );
    }
    if !run_dir.is_dir() {
        bail!(
            "{} is not a directory: `kto plot RUN_DIR` takes the output_dir of `kto train`, which holds {METRICS_FILE}",
            run_dir.display()
        );
    }
    let path = run.metrics_file();
    if !path.is_file() {
        bail!(
            "{} not found: `kto train` writes {METRICS_FILE} into its output_dir at every logging step; is {} a \
             training output_dir?",
            path.display(),
            run_dir.display()
        );
    }
    Ok(())
}

fn run_name(run_dir: &Path) -> String {
    let absolute = std::fs::canonicalize(run_dir).unwrap_or_else(|_| run_dir.to_path_buf());
    absolute
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| run_dir.display().to_string())
}

/// `(step, value)` points of one metric, sorted by step.
type Series = Vec<(i64, f64)>;

/// The plotted metrics of one run.
#[derive(Debug, Default)]
struct Metrics {
    series: BTreeMap<String, Series>,
    train_rows: usize,
    eval_rows: usize,
    last_step: i64,
    last_epoch: Option<f64>,
}

impl Metrics {
    fn get(&self, key: &str) -> &[(i64, f64)] {
        self.series.get(key).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Reads the metrics the panels draw. Values may be missing or `null` (NaN when written); anything else that is
/// not a number is an error naming the line and key.
fn read_metrics(path: &Path) -> Result<Metrics> {
    let plotted: Vec<&str> = PANELS
        .iter()
        .flat_map(|p| p.curves.iter().map(|c| c.key))
        .collect();
    let mut by_key: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
    let mut metrics = Metrics::default();
    for (line, row) in read_numbered_rows(path)? {
        let at = format!("{}:{}", path.display(), line);
        let step = match row.get("step") {
            Some(v) => v
                .as_u64()
                .and_then(|s| i64::try_from(s).ok())
                .ok_or_else(|| anyhow!("{at}: `step` must be a non-negative integer, found {v}"))?,
            None => bail!("{at}: the row has no `step`"),
        };
        if row.keys().any(|k| k.starts_with("eval_")) {
            metrics.eval_rows += 1;
        } else {
            metrics.train_rows += 1;
        }
        metrics.last_step = metrics.last_step.max(step);
        if let Some(epoch) = row.get("epoch").and_then(Value::as_f64) {
            metrics.last_epoch = Some(epoch);
        }
        for key in &plotted {
            match row.get(*key) {
                None | Some(Value::Null) => {}
                Some(Value::Number(n)) => {
                    // A step logged twice (a resumed run that appended) keeps its last value.
                    let value = n.as_f64().expect("serde_json numbers convert to f64");
                    by_key
                        .entry(key.to_string())
                        .or_default()
                        .insert(step, value);
                }
                Some(other) => bail!("{at}: `{key}` must be a number or null, found {other}"),
            }
        }
    }
    if metrics.train_rows + metrics.eval_rows == 0 {
        bail!(
            "{} has no rows: `kto train` appends one every logging_steps (and one per evaluation)",
            path.display()
        );
    }
    metrics.series = by_key
        .into_iter()
        .map(|(k, v)| (k, v.into_iter().collect()))
        .collect();
    Ok(metrics)
}

#[derive(Clone, Copy, PartialEq)]
enum Split {
    Train,
    Eval,
}

struct Curve {
    key: &'static str,
    label: &'static str,
    color: RGBColor,
    split: Split,
    /// Noisy per-step measurements get a smoothed line; a schedule (learning rate) is drawn as is.
    smooth: bool,
}

const fn train(key: &'static str, label: &'static str, color: RGBColor) -> Curve {
    Curve {
        key,
        label,
        color,
        split: Split::Train,
        smooth: true,
    }
}

const fn schedule(key: &'static str, label: &'static str, color: RGBColor) -> Curve {
    Curve {
        key,
        label,
        color,
        split: Split::Train,
        smooth: false,
    }
}

const fn eval(key: &'static str, label: &'static str, color: RGBColor) -> Curve {
    Curve {
        key,
        label,
        color,
        split: Split::Eval,
        smooth: false,
    }
}

struct Panel {
    title: &'static str,
    y_label: &'static str,
    curves: &'static [Curve],
    /// Fixed y range (accuracies live in [0, 1]).
    y_range: Option<(f64, f64)>,
    /// A dashed horizontal reference line and its legend label.
    reference: Option<(f64, &'static str)>,
    /// Legend by colour (one entry per label) plus "train line / eval marker" entries, instead of one entry per
    /// curve, when train and eval share colours.
    legend_by_colour: bool,
    /// What to say when none of the curves has data.
    when_empty: &'static str,
}

const PANELS: &[Panel] = &[
    Panel {
        title: "Loss",
        y_label: "KTO loss",
        curves: &[
            train("loss", "train", BLUE),
            eval("eval_loss", "eval", ORANGE),
        ],
        y_range: None,
        reference: None,
        legend_by_colour: false,
        when_empty: "no loss logged yet",
    },
    Panel {
        title: "Rewards (β · log-ratio to the reference)",
        y_label: "reward",
        curves: &[
            train("rewards/chosen", "chosen", GREEN),
            train("rewards/rejected", "rejected", CRIMSON),
            train("rewards/margins", "margin", BLUE),
            eval("eval_rewards/chosen", "chosen", GREEN),
            eval("eval_rewards/rejected", "rejected", CRIMSON),
            eval("eval_rewards/margins", "margin", BLUE),
        ],
        y_range: None,
        reference: Some((0.0, "")),
        legend_by_colour: true,
        when_empty: "no rewards logged yet",
    },
    Panel {
        title: "KL estimate (policy vs reference)",
        y_label: "KL",
        curves: &[train("kl", "train", BLUE), eval("eval_kl", "eval", ORANGE)],
        y_range: None,
        reference: None,
        legend_by_colour: false,
        when_empty: "no KL logged yet",
    },
    Panel {
        title: "Held-out reward accuracy",
        y_label: "fraction",
        curves: &[
            eval("eval_reward_accuracy", "reward accuracy", BLUE),
            eval("eval_reward_auroc", "AUROC", ORANGE),
            eval("eval_pair_accuracy", "pair accuracy", GREEN),
        ],
        y_range: Some((0.0, 1.0)),
        reference: Some((0.5, "chance")),
        legend_by_colour: false,
        when_empty: "no evaluation rows: give an eval set (and eval_steps) to `kto train`",
    },
    Panel {
        title: "Learning rate",
        y_label: "learning rate",
        curves: &[schedule("learning_rate", "learning rate", PURPLE)],
        y_range: None,
        reference: None,
        legend_by_colour: false,
        when_empty: "no learning rate logged yet",
    },
    Panel {
        title: "Gradient norm (before clipping)",
        y_label: "grad norm",
        curves: &[train("grad_norm", "grad norm", PURPLE)],
        y_range: None,
        reference: None,
        legend_by_colour: false,
        when_empty: "no gradient norm logged yet",
    },
];

fn font(size: f64) -> TextStyle<'static> {
    register_fonts();
    ("sans-serif", size).into_font().color(&TEXT)
}

fn bold(size: f64) -> TextStyle<'static> {
    register_fonts();
    ("sans-serif", size, FontStyle::Bold)
        .into_font()
        .color(&TEXT)
}

fn register_fonts() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The embedded files are valid fonts; a failure here is a build defect, not bad input.
        plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../../../assets/fonts/DejaVuSans.ttf"),
        )
        .unwrap_or_else(|_| panic!("the embedded DejaVuSans.ttf is not a font"));
        plotters::style::register_font(
            "sans-serif",
            FontStyle::Bold,
            include_bytes!("../../../assets/fonts/DejaVuSans-Bold.ttf"),
        )
        .unwrap_or_else(|_| panic!("the embedded DejaVuSans-Bold.ttf is not a font"));
    });
}

/// Plotters' errors carry the backend's error type; text is all the caller needs.
fn drawing<T, E: std::fmt::Display>(result: Result<T, E>) -> Result<T> {
    result.map_err(|e| anyhow!("drawing the learning curves: {e}"))
}

fn draw_figure<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    metrics: &Metrics,
    title: &str,
) -> Result<()> {
    drawing(root.fill(&WHITE))?;
    let (header, grid) = root.split_vertically(HEADER_HEIGHT);
    let smoothed = PANELS
        .iter()
        .flat_map(|p| p.curves)
        .any(|c| c.smooth && metrics.get(c.key).len() >= SMOOTH_FROM_POINTS);
    let (width, _) = header.dim_in_pixel();
    let center = width as i32 / 2;
    drawing(header.draw_text(
        title,
        &bold(30.0).pos(Pos::new(HPos::Center, VPos::Top)),
        (center, 12),
    ))?;
    let epoch = metrics
        .last_epoch
        .map(|e| format!(", epoch {e:.2}"))
        .unwrap_or_default();
    let mut summary = format!(
        "{} and {}, up to step {}{epoch}",
        counted(metrics.train_rows, "training row"),
        counted(metrics.eval_rows, "evaluation"),
        metrics.last_step
    );
    if smoothed {
        summary.push_str(".  Train curves: faint = logged values, bold = smoothed (EMA).");
    }
    let summary_style = font(18.0)
        .color(&GREY)
        .pos(Pos::new(HPos::Center, VPos::Top));
    drawing(header.draw_text(&summary, &summary_style, (center, 50)))?;

    let rows = PANELS.len().div_ceil(GRID_COLUMNS);
    let cells = grid.split_evenly((rows, GRID_COLUMNS));
    let x_end = metrics.last_step + (metrics.last_step / 40).max(1);
    for (panel, cell) in PANELS.iter().zip(&cells) {
        draw_panel(&cell.margin(8, 8, 12, 12), panel, metrics, x_end)?;
    }
    Ok(())
}

fn counted(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

enum LegendMark {
    Line(RGBColor),
    Marker(RGBColor),
    LineAndMarker(RGBColor),
    Dashed(RGBColor),
}

fn legend_entries(panel: &Panel, metrics: &Metrics) -> Vec<(String, LegendMark)> {
    let present: Vec<&Curve> = panel
        .curves
        .iter()
        .filter(|c| !metrics.get(c.key).is_empty())
        .collect();
    let mut entries = Vec::new();
    if panel.legend_by_colour {
        for curve in &present {
            if !entries
                .iter()
                .any(|(label, _): &(String, LegendMark)| label == curve.label)
            {
                entries.push((curve.label.to_string(), LegendMark::Line(curve.color)));
            }
        }
        let has = |split| present.iter().any(|c| c.split == split);
        if has(Split::Train) && has(Split::Eval) {
            entries.push(("train".into(), LegendMark::Line(GREY)));
        }
        if has(Split::Eval) {
            entries.push(("eval".into(), LegendMark::Marker(GREY)));
        }
    } else if present.len() > 1
        || panel.reference.is_some()
        || present.iter().any(|c| c.split == Split::Eval)
    {
        for curve in &present {
            let mark = match curve.split {
                Split::Train => LegendMark::Line(curve.color),
                Split::Eval => LegendMark::LineAndMarker(curve.color),
            };
            entries.push((curve.label.to_string(), mark));
        }
    }
    if let Some((_, label)) = panel.reference.filter(|(_, label)| !label.is_empty()) {
        if !present.is_empty() {
            entries.push((label.to_string(), LegendMark::Dashed(GREY)));
        }
    }
    entries
}

/// One row of legend entries under the panel title, centred: outside the plot so it never hides a curve.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[(String, LegendMark)],
) -> Result<()> {
    const SWATCH: i32 = 26;
    const GAP: i32 = 6;
    const SPACING: i32 = 22;
    let style = font(16.0);
    let mut widths = Vec::new();
    for (label, _) in entries {
        widths.push(drawing(area.estimate_text_size(label, &style))?.0 as i32);
    }
    let total: i32 =
        widths.iter().map(|w| SWATCH + GAP + w).sum::<i32>() + SPACING * (entries.len() as i32 - 1);
    let (width, height) = area.dim_in_pixel();
    let y = height as i32 / 2;
    let mut x = (width as i32 - total).max(0) / 2;
    for ((label, mark), text_width) in entries.iter().zip(widths) {
        let line = |color: RGBColor| {
            PathElement::new(vec![(x, y), (x + SWATCH, y)], color.stroke_width(3))
        };
        match mark {
            LegendMark::Line(color) => drawing(area.draw(&line(*color)))?,
            LegendMark::Marker(color) => {
                drawing(area.draw(&Circle::new((x + SWATCH / 2, y), 5, color.filled())))?
            }
            LegendMark::LineAndMarker(color) => {
                drawing(area.draw(&PathElement::new(
                    vec![(x, y), (x + SWATCH, y)],
                    color.stroke_width(1),
                )))?;
                drawing(area.draw(&Circle::new((x + SWATCH / 2, y), 5, color.filled())))?
            }
            LegendMark::Dashed(color) => {
                for dash in 0..3 {
                    let start = x + dash * 10;
                    drawing(area.draw(&PathElement::new(
                        vec![(start, y), (start + 6, y)],
                        color.stroke_width(2),
                    )))?;
                }
            }
        }
        let text_style = style.pos(Pos::new(HPos::Left, VPos::Center));
        drawing(area.draw_text(label, &text_style, (x + SWATCH + GAP, y)))?;
        x += SWATCH + GAP + text_width + SPACING;
    }
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    metrics: &Metrics,
    x_end: i64,
) -> Result<()> {
    let body = drawing(area.titled(panel.title, bold(22.0)))?;
    let (legend_area, chart_area) = body.split_vertically(30);
    let entries = legend_entries(panel, metrics);
    if !entries.is_empty() {
        draw_legend(&legend_area, &entries)?;
    }

    let values = panel
        .curves
        .iter()
        .flat_map(|c| metrics.get(c.key))
        .map(|&(_, v)| v);
    let data_range = values.fold(None, |range: Option<(f64, f64)>, v| {
        Some(range.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))))
    });
    let Some(data_range) = data_range else {
        let (width, height) = chart_area.dim_in_pixel();
        drawing(chart_area.draw(&Rectangle::new(
            [(0, 0), (width as i32 - 1, height as i32 - 1)],
            RGBColor(200, 200, 200).stroke_width(1),
        )))?;
        let style = font(17.0)
            .color(&GREY)
            .pos(Pos::new(HPos::Center, VPos::Center));
        drawing(chart_area.draw_text(
            panel.when_empty,
            &style,
            (width as i32 / 2, height as i32 / 2),
        ))?;
        return Ok(());
    };
    let (y_min, y_max) = match panel.y_range {
        Some((lo, hi)) => (lo.min(data_range.0), hi.max(data_range.1)),
        None => data_range,
    };
    let (y_min, y_max) = padded(y_min, y_max);
    let y_format = tick_formatter(y_min, y_max);
    let x_format = |step: &i64| step.to_string();

    let mut chart = drawing(
        ChartBuilder::on(&chart_area)
            .margin_right(18)
            .margin_top(6)
            .x_label_area_size(48)
            .y_label_area_size(82)
            .build_cartesian_2d(0i64..x_end, y_min..y_max),
    )?;
    drawing(
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(panel.y_label)
            .x_labels(8)
            .y_labels(7)
            .x_label_formatter(&x_format)
            .y_label_formatter(&y_format)
            .label_style(font(15.0))
            .axis_desc_style(font(17.0))
            .bold_line_style(RGBColor(225, 225, 225))
            .light_line_style(TRANSPARENT)
            .axis_style(RGBColor(90, 90, 90))
            .draw(),
    )?;

    if let Some((level, _)) = panel.reference {
        if y_min < level && level < y_max {
            drawing(chart.draw_series(DashedLineSeries::new(
                [(0, level), (x_end, level)],
                8,
                6,
                GREY.stroke_width(1),
            )))?;
        }
    }
    for curve in panel.curves {
        let points = metrics.get(curve.key);
        if points.is_empty() {
            continue;
        }
        match curve.split {
            Split::Train => draw_train_curve(&mut chart, points, curve)?,
            Split::Eval => draw_eval_curve(&mut chart, points, curve.color)?,
        }
    }
    Ok(())
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordi64, RangedCoordf64>>;

fn draw_train_curve<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    points: &[(i64, f64)],
    curve: &Curve,
) -> Result<()> {
    let color = curve.color;
    if curve.smooth && points.len() >= SMOOTH_FROM_POINTS {
        // Dense raw lines fill the panel: the more points per pixel, the fainter.
        let faint = if points.len() > 600 { 0.18 } else { 0.3 };
        drawing(chart.draw_series(LineSeries::new(
            decimated(points),
            color.mix(faint).stroke_width(1),
        )))?;
        let smooth = smoothed(points);
        drawing(chart.draw_series(LineSeries::new(decimated(&smooth), color.stroke_width(3))))?;
    } else {
        drawing(chart.draw_series(LineSeries::new(decimated(points), color.stroke_width(2))))?;
    }
    if points.len() <= MARK_UP_TO_POINTS {
        drawing(chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))))?;
    }
    Ok(())
}

/// A panel is about 500 pixels wide: beyond a few points per pixel a line only grows the SVG. Long runs keep
/// the first, lowest, highest and last point of each of `DECIMATED_BUCKETS` step ranges, so spikes survive.
fn decimated(points: &[(i64, f64)]) -> Vec<(i64, f64)> {
    if points.len() <= 4 * DECIMATED_BUCKETS {
        return points.to_vec();
    }
    let bucket = points.len().div_ceil(DECIMATED_BUCKETS);
    let mut kept = Vec::with_capacity(4 * DECIMATED_BUCKETS);
    for chunk in points.chunks(bucket) {
        let by_value = |a: &&(i64, f64), b: &&(i64, f64)| a.1.total_cmp(&b.1);
        let lowest = chunk.iter().min_by(by_value).expect("chunks are not empty");
        let highest = chunk.iter().max_by(by_value).expect("chunks are not empty");
        let mut picks = [chunk[0], *lowest, *highest, chunk[chunk.len() - 1]];
        picks.sort_by_key(|p| p.0);
        for pick in picks {
            if kept.last() != Some(&pick) {
                kept.push(pick);
            }
        }
    }
    kept
}

/// Evaluations are sparse: markers joined by a thin dashed line, distinct from the solid train lines.
fn draw_eval_curve<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    points: &[(i64, f64)],
    color: RGBColor,
) -> Result<()> {
    if points.len() > 1 {
        drawing(chart.draw_series(DashedLineSeries::new(
            points.iter().copied(),
            6,
            4,
            color.stroke_width(2),
        )))?;
    }
    let radius = if points.len() <= 60 { 5 } else { 3 };
    drawing(
        chart.draw_series(
            points
                .iter()
                .map(|&p| Circle::new(p, radius, color.filled())),
        ),
    )?;
    drawing(
        chart.draw_series(
            points
                .iter()
                .map(|&p| Circle::new(p, radius, WHITE.stroke_width(1))),
        ),
    )?;
    Ok(())
}

/// TensorBoard-style debiased exponential moving average, its window about 1/25 of the run.
fn smoothed(points: &[(i64, f64)]) -> Vec<(i64, f64)> {
    let weight = (1.0 - 25.0 / points.len() as f64).max(0.0);
    let mut average = 0.0;
    let mut mass = 0.0;
    points
        .iter()
        .map(|&(step, value)| {
            average = weight * average + (1.0 - weight) * value;
            mass = weight * mass + (1.0 - weight);
            (step, average / mass)
        })
        .collect()
}

/// A y range with a margin, never empty (a flat or single-value series still gets an axis).
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let span = hi - lo;
    if span <= f64::EPSILON * hi.abs().max(lo.abs()).max(1e-300) {
        let half = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - half, hi + half);
    }
    (lo - span * 0.06, hi + span * 0.06)
}

/// Tick labels with as many decimals as the range needs; scientific notation for tiny or huge magnitudes
/// (learning rates).
fn tick_formatter(lo: f64, hi: f64) -> impl Fn(&f64) -> String {
    let magnitude = lo.abs().max(hi.abs());
    let scientific = magnitude != 0.0 && !(1e-3..1e5).contains(&magnitude);
    let decimals = ((-((hi - lo) / 6.0).log10()).ceil().max(0.0) as usize).min(6);
    move |v: &f64| {
        if scientific {
            if *v == 0.0 {
                "0".into()
            } else {
                format!("{v:.1e}")
            }
        } else {
            // Avoid "-0.00".
            let text = format!("{v:.decimals$}");
            if text
                .trim_start_matches('-')
                .chars()
                .all(|c| c == '0' || c == '.')
            {
                text.trim_start_matches('-').to_string()
            } else {
                text
            }
        }
    }
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Best);
    let mut writer = encoder.write_header().context("encoding the PNG")?;
    writer.write_image_data(rgb).context("encoding the PNG")?;
    writer.finish().context("encoding the PNG")?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_names_the_stem_or_the_file() {
        let run = &RunDir::new(Path::new("configs/../runs/a"));
        assert_eq!(
            output_paths(run, None).svg,
            PathBuf::from("runs/a/curves.svg"),
            "plain"
        );
        let named = output_paths(run, Some(Path::new("x/plot.png")));
        assert_eq!(
            named,
            PlotOutputs {
                svg: "x/plot.svg".into(),
                png: "x/plot.png".into()
            }
        );
        let stem = output_paths(run, Some(Path::new("x/plot.v2")));
        assert_eq!(stem.png, PathBuf::from("x/plot.v2.png"));
    }

    #[test]
    fn ticks_use_scientific_notation_for_learning_rates() {
        assert_eq!(tick_formatter(0.0, 5e-5)(&2e-5), "2.0e-5");
        assert_eq!(tick_formatter(0.4, 0.8)(&0.5), "0.50");
        assert_eq!(tick_formatter(-0.001, 0.01)(&-0.0), "0.000");
        assert_eq!(tick_formatter(0.0, 300.0)(&150.0), "150");
    }

    #[test]
    fn decimation_keeps_the_ends_and_the_spikes() {
        let mut points: Vec<(i64, f64)> = (1..=100_000).map(|s| (s, (s % 10) as f64)).collect();
        points[54_321].1 = 1e6;
        let kept = decimated(&points);
        assert!(kept.len() <= 4 * DECIMATED_BUCKETS, "{} points", kept.len());
        assert_eq!(
            (kept[0], *kept.last().unwrap()),
            (points[0], points[99_999])
        );
        assert!(kept.contains(&points[54_321]), "the spike survives");
        assert!(
            kept.windows(2).all(|w| w[0].0 < w[1].0),
            "steps stay in order"
        );
        let short = &points[..100];
        assert_eq!(decimated(short), short);
    }

    #[test]
    fn flat_ranges_are_widened() {
        assert_eq!(padded(0.0, 0.0), (-1.0, 1.0));
        let (lo, hi) = padded(2.0, 2.0);
        assert!(lo < 2.0 && hi > 2.0);
    }

    #[test]
    fn smoothing_starts_at_the_first_value_and_follows_a_constant() {
        let points: Vec<(i64, f64)> = (1..=100).map(|s| (s, 3.0)).collect();
        assert!(smoothed(&points)
            .iter()
            .all(|&(_, v)| (v - 3.0).abs() < 1e-12));
    }
}
