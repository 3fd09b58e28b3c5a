//! SVG charts through plotters (SVG backend only; text is left to the SVG viewer's fonts, so
//! nothing here needs fonts installed):
//!
//! - `latency_cdf.svg`: the CDFs of TTFT, TPOT and E2E, one line per run.
//! - `sweep.svg` (a sweep of two or more loads): request throughput and goodput, output-token
//!   throughput, p99 TTFT and E2E, and p99 TPOT and ITL against the offered load (request rate,
//!   or concurrency for a closed-loop sweep).
//! - [`line_panels`]: any grid of line panels over one x axis, for experiments that compare
//!   setups (one line per setup) rather than loads (`baton bench disagg`).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::arrivals::Arrivals;
use crate::error::{Error, Result};
use crate::run::RunResult;

/// Named lines of `(x, y)` points, one panel's data.
pub type Lines = Vec<(String, Vec<(f64, f64)>)>;

/// One panel of [`line_panels`]: a title, the y axis's unit, and its lines.
#[derive(Debug, Clone)]
pub struct LinePanel {
    pub title: String,
    pub unit: String,
    pub lines: Lines,
}

const CDF_SIZE: (u32, u32) = (1500, 450);
const SWEEP_SIZE: (u32, u32) = (1200, 800);

fn chart_err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |reason| Error::Chart {
        path: path.to_path_buf(),
        reason,
    }
}

fn color(i: usize) -> RGBColor {
    // Colour-blind-safe (Okabe-Ito) order, then plotters' palette.
    const OKABE_ITO: [RGBColor; 7] = [
        RGBColor(0, 114, 178),
        RGBColor(213, 94, 0),
        RGBColor(0, 158, 115),
        RGBColor(204, 121, 167),
        RGBColor(230, 159, 0),
        RGBColor(86, 180, 233),
        RGBColor(0, 0, 0),
    ];
    OKABE_ITO.get(i).copied().unwrap_or_else(|| {
        let (r, g, b) = Palette99::pick(i).rgb();
        RGBColor(r, g, b)
    })
}

/// The empirical CDF of values in seconds as a staircase of `(ms, fraction <= ms)` points: each
/// value rises from the fraction below it to the fraction at it.
fn cdf(values_s: impl Iterator<Item = f64>) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = values_s.map(|s| s * 1e3).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    v.iter()
        .enumerate()
        .flat_map(|(i, x)| [(*x, i as f64 / n), (*x, (i + 1) as f64 / n)])
        .collect()
}

/// Per-request TTFT, TPOT and E2E in seconds of a run's completed requests.
fn latencies(run: &RunResult) -> [Vec<f64>; 3] {
    let mut out = [Vec::new(), Vec::new(), Vec::new()];
    for s in run.samples.iter().filter(|s| s.ok()) {
        let m = &s.measured;
        if let Some(t) = m.ttft_s {
            out[0].push(t);
            if m.output_tokens > 1 {
                out[1].push((m.e2e_s - t) / f64::from(m.output_tokens - 1));
            }
        }
        out[2].push(m.e2e_s);
    }
    out
}

/// Writes the TTFT, TPOT and E2E latency CDFs of `runs` to `path`.
pub fn latency_cdfs(runs: &[RunResult], path: &Path) -> Result<()> {
    let err = chart_err(path);
    let root = SVGBackend::new(path, CDF_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let per_run: Vec<[Vec<(f64, f64)>; 3]> = runs
        .iter()
        .map(|r| latencies(r).map(|v| cdf(v.into_iter())))
        .collect();
    let areas = root.split_evenly((1, 3));
    for (m, (area, title)) in areas
        .iter()
        .zip(["TTFT", "TPOT", "E2E latency"])
        .enumerate()
    {
        let max = per_run
            .iter()
            .flat_map(|r| r[m].last().map(|p| p.0))
            .fold(0.0f64, f64::max);
        let lines: Lines = runs
            .iter()
            .zip(&per_run)
            .map(|(r, c)| (r.label.clone(), c[m].clone()))
            .collect();
        let panel = Panel {
            title: &format!("{title} CDF"),
            x: (0.0, nice_max(max)),
            y: (0.0, 1.0),
            x_desc: "ms",
            y_desc: "fraction of requests",
            legend: SeriesLabelPosition::LowerRight,
            markers: false,
        };
        draw_panel(area, &panel, &lines).map_err(&err)?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

/// The x axis of a sweep: the request rate when the runs differ in rate, else the concurrency
/// when they differ in that; `None` when the runs do not form a sweep.
pub fn sweep_axis(runs: &[RunResult]) -> Option<(&'static str, Vec<f64>)> {
    if runs.len() < 2 {
        return None;
    }
    let rates: Vec<f64> = runs.iter().map(|r| r.load.arrivals.rate()).collect();
    let distinct = |v: &[f64]| v.windows(2).any(|w| w[0] != w[1]);
    if rates.iter().all(|r| r.is_finite()) && distinct(&rates) {
        return Some(("request rate (req/s)", rates));
    }
    let conc: Option<Vec<f64>> = runs
        .iter()
        .map(|r| r.load.max_concurrency.map(|c| c.get() as f64))
        .collect();
    match conc {
        Some(c) if distinct(&c) && runs.iter().all(|r| r.load.arrivals == Arrivals::Immediate) => {
            Some(("concurrency", c))
        }
        _ => None,
    }
}

/// Writes throughput, goodput and p99 latencies against the offered load to `path`; returns
/// false (writing nothing) when the runs are not a sweep.
pub fn sweep(runs: &[RunResult], path: &Path) -> Result<bool> {
    let Some((x_label, xs)) = sweep_axis(runs) else {
        return Ok(false);
    };
    let err = chart_err(path);
    let root = SVGBackend::new(path, SWEEP_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let areas = root.split_evenly((2, 2));
    let x_range = (0.0, nice_max(xs.iter().copied().fold(0.0, f64::max)));
    let series = |f: &dyn Fn(&RunResult) -> Option<f64>| -> Vec<(f64, f64)> {
        xs.iter()
            .zip(runs)
            .filter_map(|(x, r)| f(r).map(|y| (*x, y)))
            .collect()
    };
    let p99 = |d: &crate::metrics::Distribution| (d.count > 0).then_some(d.p99_ms);

    let mut requests = vec![(
        "completed".to_string(),
        series(&|r| Some(r.summary.request_throughput)),
    )];
    if runs.iter().any(|r| r.summary.goodput.is_some()) {
        requests.push(("goodput".into(), series(&|r| r.summary.goodput)));
    }
    // TPOT and ITL are one to three orders of magnitude below TTFT and E2E: their own panel.
    let panels: [(&str, &str, Lines); 4] = [
        ("request throughput", "req/s", requests),
        (
            "output-token throughput",
            "tok/s",
            vec![(
                "output tokens".to_string(),
                series(&|r| Some(r.summary.output_throughput)),
            )],
        ),
        (
            "p99 TTFT and E2E latency",
            "ms",
            vec![
                ("TTFT p99".to_string(), series(&|r| p99(&r.summary.ttft))),
                ("E2E p99".to_string(), series(&|r| p99(&r.summary.e2e))),
            ],
        ),
        (
            "p99 TPOT and ITL",
            "ms",
            vec![
                ("TPOT p99".to_string(), series(&|r| p99(&r.summary.tpot))),
                ("ITL p99".to_string(), series(&|r| p99(&r.summary.itl))),
            ],
        ),
    ];
    for (area, (title, unit, lines)) in areas.iter().zip(panels) {
        let max = lines
            .iter()
            .flat_map(|(_, s)| s.iter().map(|p| p.1))
            .fold(0.0, f64::max);
        let panel = Panel {
            title,
            x: x_range,
            y: (0.0, nice_max(max)),
            x_desc: x_label,
            y_desc: unit,
            legend: SeriesLabelPosition::UpperLeft,
            markers: true,
        };
        draw_panel(area, &panel, &lines).map_err(&err)?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(true)
}

/// Writes `panels` in a grid two wide, all over the same x axis (`x_desc`), to `path`. Each
/// panel's y axis starts at 0 and ends a little above its largest point.
pub fn line_panels(panels: &[LinePanel], x_desc: &str, path: &Path) -> Result<()> {
    let err = chart_err(path);
    if panels.is_empty() {
        return Err(err("no panels to draw".into()));
    }
    let rows = panels.len().div_ceil(2);
    let size = (SWEEP_SIZE.0, SWEEP_SIZE.1 / 2 * rows as u32);
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let areas = root.split_evenly((rows, 2));
    let points = || {
        panels
            .iter()
            .flat_map(|p| p.lines.iter().flat_map(|l| l.1.iter()))
    };
    let x_max = nice_max(points().map(|p| p.0).fold(0.0, f64::max));
    for (area, panel) in areas.iter().zip(panels) {
        let y_max = panel
            .lines
            .iter()
            .flat_map(|(_, s)| s.iter().map(|p| p.1))
            .fold(0.0, f64::max);
        let frame = Panel {
            title: &panel.title,
            x: (0.0, x_max),
            y: (0.0, nice_max(y_max)),
            x_desc,
            y_desc: &panel.unit,
            legend: SeriesLabelPosition::UpperLeft,
            markers: true,
        };
        draw_panel(area, &frame, &panel.lines).map_err(&err)?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

/// A round upper bound a little above `x` (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of
/// ten), so the data fills most of the panel.
fn nice_max(x: f64) -> f64 {
    if !(x.is_finite() && x > 0.0) {
        return 1.0;
    }
    let x = x * 1.05;
    let p = 10f64.powf(x.log10().floor());
    [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|v| *v >= x)
        .unwrap_or(10.0 * p)
}

/// A tick label without float noise: `0.3`, `1500`, `2.25`.
fn tick(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// One panel's frame and text.
struct Panel<'a> {
    title: &'a str,
    x: (f64, f64),
    y: (f64, f64),
    x_desc: &'a str,
    y_desc: &'a str,
    legend: SeriesLabelPosition,
    /// Mark each point (sweeps); a CDF's staircase has no points worth marking.
    markers: bool,
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    panel: &Panel<'_>,
    lines: &Lines,
) -> std::result::Result<(), String> {
    let Panel {
        title,
        x,
        y,
        x_desc,
        y_desc,
        ..
    } = *panel;
    let s = |e: &dyn std::fmt::Display| e.to_string();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x.0..x.1, y.0..y.1)
        .map_err(|e| s(&e))?;
    let label = |v: &f64| tick(*v);
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style(("sans-serif", 13))
        // One light line between bold ones keeps the grid readable and the file small.
        .max_light_lines(1)
        .x_label_formatter(&label)
        .y_label_formatter(&label)
        .draw()
        .map_err(|e| s(&e))?;
    for (i, (name, points)) in lines.iter().enumerate() {
        if points.is_empty() {
            continue;
        }
        let c = color(i);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))
            .map_err(|e| s(&e))?
            .label(name.as_str())
            .legend(move |(lx, ly)| {
                PathElement::new(vec![(lx, ly), (lx + 18, ly)], c.stroke_width(2))
            });
        if panel.markers {
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 3, c.filled())))
                .map_err(|e| s(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .position(panel.legend.clone())
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| s(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_maxima_are_round_and_above_the_data() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(0.9), 1.0);
        assert_eq!(nice_max(1.0), 1.2);
        assert_eq!(nice_max(37.0), 40.0);
        assert_eq!(nice_max(480.0), 600.0);
        assert_eq!(nice_max(3000.0), 4000.0);
    }

    #[test]
    fn ticks_have_no_float_noise() {
        assert_eq!(tick(0.1 + 0.2), "0.3");
        assert_eq!(tick(1500.0), "1500");
        assert_eq!(tick(2.25), "2.25");
        assert_eq!(tick(0.0), "0");
    }

    #[test]
    fn cdf_steps_to_one() {
        let c = cdf([0.5, 0.125, 0.25].into_iter());
        let third = 1.0 / 3.0;
        assert_eq!(
            c,
            vec![
                (125.0, 0.0),
                (125.0, third),
                (250.0, third),
                (250.0, 2.0 / 3.0),
                (500.0, 2.0 / 3.0),
                (500.0, 1.0),
            ]
        );
    }
}
