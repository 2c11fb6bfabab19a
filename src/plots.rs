//! PNG charts people would rather look at than read: line charts of per-step series and bar
//! charts, drawn with plotters into memory (text in the Ubuntu font that ships with
//! `epaint_default_fonts`, so no system fonts are needed) and written atomically.

use std::ops::Range;
use std::path::Path;
use std::sync::Once;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::atomic::write_atomic;

const SIZE: (u32, u32) = (900, 420);
const FONT: &str = "sans-serif";
/// Colors of successive series (the Tableau palette).
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A named series of (x, y) points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT)
            .unwrap_or_else(|_| unreachable!("the bundled font parses"));
    });
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("cannot draw the chart: {e}")
}

/// Draws into an RGB buffer with `draw` and writes it to `path` as PNG.
fn render(
    path: &Path,
    draw: impl FnOnce(DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    register_font();
    let (w, h) = SIZE;
    let mut pixels = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        draw(root.clone())?;
        root.present().map_err(plot_error)?;
    }
    let image = image::RgbImage::from_raw(w, h, pixels).expect("the buffer matches the size");
    let mut png = std::io::Cursor::new(Vec::new());
    image.write_to(&mut png, image::ImageFormat::Png)?;
    write_atomic(path, png.get_ref())
}

/// The range covering `values` with a small margin (a unit range around a constant).
fn padded(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return 0.0..1.0;
    }
    let margin = if hi > lo { 0.05 * (hi - lo) } else { 0.5 };
    lo - margin..hi + margin
}

/// A line chart of every series against a shared x axis.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    render(path, |root| {
        let all = || series.iter().flat_map(|s| s.points.iter());
        let x = padded(all().map(|p| p.0));
        let y = padded(all().map(|p| p.1));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x, y)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style((FONT, 14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(plot_error)?;
        for (s, color) in series.iter().zip(COLORS.iter().cycle()) {
            let color = *color;
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(plot_error)?
                .label(s.name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        if series.len() > 1 {
            chart
                .configure_series_labels()
                .label_font((FONT, 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(plot_error)?;
        }
        Ok(())
    })
}

/// A bar chart of named values, one bar each.
pub fn bar_chart(path: &Path, title: &str, y_label: &str, bars: &[(String, f64)]) -> Result<()> {
    let bars: Vec<(String, f64, f64)> = bars.iter().map(|(l, v)| (l.clone(), *v, 0.0)).collect();
    bar_chart_with_errors(path, title, y_label, &bars)
}

/// A bar chart of named values with error bars: `(label, value, error)` draws a bar at
/// `value` and a whisker over `value +- error` (none when `error` is 0).
pub fn bar_chart_with_errors(
    path: &Path,
    title: &str,
    y_label: &str,
    bars: &[(String, f64, f64)],
) -> Result<()> {
    render(path, |root| {
        let top = bars.iter().map(|b| b.1 + b.2).fold(0.0, f64::max).max(1e-9) * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((0..bars.len()).into_segmented(), 0.0..top)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => bars.get(*i).map(|b| b.0.clone()).unwrap_or_default(),
                _ => String::new(),
            })
            .y_desc(y_label)
            .label_style((FONT, 14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v, _))| {
                let color = COLORS[i % COLORS.len()];
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), *v),
                    ],
                    color.filled(),
                );
                bar.set_margin(0, 0, 20, 20);
                bar
            }))
            .map_err(plot_error)?;
        chart
            .draw_series(bars.iter().enumerate().filter(|(_, b)| b.2 > 0.0).map(
                |(i, (_, v, e))| {
                    let x = SegmentValue::CenterOf(i);
                    PathElement::new(vec![(x.clone(), v - e), (x, v + e)], BLACK.stroke_width(3))
                },
            ))
            .map_err(plot_error)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v, e))| {
                Text::new(
                    format!("{v:.3}"),
                    (SegmentValue::CenterOf(i), *v + e + 0.03 * top),
                    (FONT, 14),
                )
            }))
            .map_err(plot_error)?;
        Ok(())
    })
}
