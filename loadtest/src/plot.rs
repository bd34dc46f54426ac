//! The study's figures, redrawn from a sweep, as SVG and PNG:
//! - `turnaround`: min / mean / max turnaround against concurrency, one set
//!   of lines per endpoint (the study's figure 2);
//! - `phases`: mean server-side time per phase against concurrency, from the
//!   `/metrics` deltas (its figure 4);
//! - `client_steps`: mean client-side time per step against concurrency (what
//!   the russh client saw).
//!
//! Text is rendered by plotters' `ab_glyph` feature from a TrueType file read
//! at run time (Debian's `fonts-dejavu-core` by default), so no fontconfig or
//! freetype library is linked.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::sweep::{SweepResult, TARGET};

/// Tried in order when no font is given.
pub const DEFAULT_FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

const SIZE: (u32, u32) = (1000, 620);

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("no font for the plots: {0} (install fonts-dejavu-core or pass --font FILE.ttf)")]
    Font(String),
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
}

static FONT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Registers the font plotters draws all text with. The first call decides
/// for the whole process (plotters keeps fonts in a global table).
pub fn register_font(path: Option<&Path>) -> Result<PathBuf, PlotError> {
    FONT.get_or_init(|| {
        let candidates: Vec<PathBuf> = match path {
            Some(p) => vec![p.to_owned()],
            None => DEFAULT_FONTS.iter().map(PathBuf::from).collect(),
        };
        let mut tried = Vec::new();
        for candidate in candidates {
            match std::fs::read(&candidate) {
                Ok(bytes) => {
                    // plotters needs the font for the rest of the process.
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                        .map(|_| candidate.clone())
                        .map_err(|_| {
                            format!(
                                "{} is not a usable TrueType/OpenType font",
                                candidate.display()
                            )
                        });
                }
                Err(e) => tried.push(format!("{}: {e}", candidate.display())),
            }
        }
        Err(tried.join("; "))
    })
    .clone()
    .map_err(PlotError::Font)
}

/// One line on a chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    /// Thin lines for the envelope (min/max), thick for the mean.
    pub width: u32,
}

#[derive(Clone, Debug)]
pub struct Chart {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

const COLORS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn lighter(c: RGBColor) -> RGBColor {
    let mix = |v: u8| ((v as u16 + 255) / 2) as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

/// Figure 2: turnaround (seconds) against concurrency.
pub fn turnaround_chart(result: &SweepResult) -> Chart {
    let mut endpoints = vec![TARGET.to_owned()];
    endpoints.extend(
        result
            .levels
            .iter()
            .map(|l| l.summary.endpoint.clone())
            .filter(|e| e != TARGET),
    );
    endpoints.dedup();
    let mut series = Vec::new();
    for (i, endpoint) in endpoints.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let addr = if endpoint == TARGET {
            result.target.clone()
        } else {
            result.compare.clone().unwrap_or_default()
        };
        let points = |pick: fn(&crate::stats::Distribution) -> f64| -> Vec<(f64, f64)> {
            result
                .levels_of(endpoint)
                .filter_map(|l| {
                    l.summary
                        .turnaround
                        .as_ref()
                        .map(|d| (f64::from(l.summary.level), pick(d) / 1000.0))
                })
                .collect()
        };
        series.push(Series {
            name: format!("{endpoint} {addr} max"),
            points: points(|d| d.max),
            color: lighter(color),
            width: 1,
        });
        series.push(Series {
            name: format!("{endpoint} {addr} mean"),
            points: points(|d| d.mean),
            color,
            width: 3,
        });
        series.push(Series {
            name: format!("{endpoint} {addr} min"),
            points: points(|d| d.min),
            color: lighter(color),
            width: 1,
        });
    }
    Chart {
        title: format!(
            "turnaround of `ssh host {}` ({} client)",
            result.command,
            result.client.as_str()
        ),
        y_label: "turnaround (s)".into(),
        series,
    }
}

/// Figure 4: mean server-side time per phase (ms) against concurrency.
pub fn phases_chart(result: &SweepResult) -> Chart {
    let mut keys: Vec<String> = Vec::new();
    for level in result.levels_of(TARGET) {
        for phase in &level.server_phases {
            if !keys.contains(&phase.key()) {
                keys.push(phase.key());
            }
        }
    }
    let series = keys
        .iter()
        .enumerate()
        .map(|(i, key)| Series {
            name: key.clone(),
            points: result
                .levels_of(TARGET)
                .filter_map(|l| {
                    l.server_phases
                        .iter()
                        .find(|p| &p.key() == key)
                        .map(|p| (f64::from(l.summary.level), p.mean_ms))
                })
                .collect(),
            color: COLORS[i % COLORS.len()],
            width: 2,
        })
        .collect();
    Chart {
        title: "server-side mean time per phase".into(),
        y_label: "mean (ms)".into(),
        series,
    }
}

/// Mean client-side time per step (ms) against concurrency, per endpoint.
pub fn client_steps_chart(result: &SweepResult) -> Chart {
    let names = [
        "tcp_connect",
        "handshake",
        "auth",
        "first_byte",
        "exit_wait",
        "close",
    ];
    let mut series = Vec::new();
    let mut endpoints: Vec<String> = result
        .levels
        .iter()
        .map(|l| l.summary.endpoint.clone())
        .collect();
    endpoints.sort();
    endpoints.dedup();
    endpoints.sort_by_key(|e| e != TARGET);
    for (e, endpoint) in endpoints.iter().enumerate() {
        for (i, name) in names.iter().enumerate() {
            let points: Vec<(f64, f64)> = result
                .levels_of(endpoint)
                .filter_map(|l| {
                    l.summary
                        .steps
                        .get(*name)
                        .map(|d| (f64::from(l.summary.level), d.mean))
                })
                .collect();
            if points.is_empty() {
                continue;
            }
            let color = COLORS[i % COLORS.len()];
            series.push(Series {
                name: format!("{endpoint} {name}"),
                points,
                color: if e == 0 { color } else { lighter(color) },
                width: if e == 0 { 2 } else { 1 },
            });
        }
    }
    Chart {
        title: format!(
            "client-side mean time per step ({} client)",
            result.client.as_str()
        ),
        y_label: "mean (ms)".into(),
        series,
    }
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart) -> Result<(), String> {
    let e = |err: DrawingAreaErrorKind<DB::ErrorType>| err.to_string();
    root.fill(&WHITE).map_err(e)?;
    let all = chart.series.iter().flat_map(|s| s.points.iter());
    let x_max = all.clone().map(|p| p.0).fold(1.0_f64, f64::max);
    let y_max = all
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let mut ctx = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max * 1.04, 0.0..y_max)
        .map_err(e)?;
    ctx.configure_mesh()
        .x_desc("concurrent clients")
        .y_desc(chart.y_label.as_str())
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(e)?;
    for s in &chart.series {
        let color = s.color;
        let style = ShapeStyle {
            color: color.to_rgba(),
            filled: false,
            stroke_width: s.width,
        };
        ctx.draw_series(LineSeries::new(s.points.iter().copied(), style))
            .map_err(e)?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        ctx.draw_series(
            s.points
                .iter()
                .map(|&p| Circle::new(p, s.width + 1, color.filled())),
        )
        .map_err(e)?;
    }
    if !chart.series.is_empty() {
        ctx.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(e)?;
    }
    root.present().map_err(e)
}

/// Draws `chart` to `<dir>/<stem>.svg` and `<dir>/<stem>.png`.
pub fn write_chart(dir: &Path, stem: &str, chart: &Chart) -> Result<Vec<PathBuf>, PlotError> {
    let svg = dir.join(format!("{stem}.svg"));
    draw(SVGBackend::new(&svg, SIZE).into_drawing_area(), chart).map_err(|message| {
        PlotError::Draw {
            path: svg.clone(),
            message,
        }
    })?;
    let png = dir.join(format!("{stem}.png"));
    draw(BitMapBackend::new(&png, SIZE).into_drawing_area(), chart).map_err(|message| {
        PlotError::Draw {
            path: png.clone(),
            message,
        }
    })?;
    Ok(vec![svg, png])
}

/// Writes every figure the result has data for; returns the files written.
pub fn write_plots(
    dir: &Path,
    result: &SweepResult,
    font: Option<&Path>,
) -> Result<Vec<PathBuf>, PlotError> {
    register_font(font)?;
    let mut files = write_chart(dir, "turnaround", &turnaround_chart(result))?;
    let phases = phases_chart(result);
    if !phases.series.is_empty() {
        files.extend(write_chart(dir, "phases", &phases)?);
    }
    let steps = client_steps_chart(result);
    if !steps.series.is_empty() {
        files.extend(write_chart(dir, "client_steps", &steps)?);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_result;

    #[test]
    fn plots_are_written_as_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let result = sample_result();
        let files = write_plots(dir.path(), &result, None).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "turnaround.svg",
                "turnaround.png",
                "phases.svg",
                "phases.png",
                "client_steps.svg",
                "client_steps.png"
            ]
        );
        for file in &files {
            let bytes = std::fs::read(file).unwrap();
            assert!(
                bytes.len() > 1000,
                "{} is only {} bytes",
                file.display(),
                bytes.len()
            );
            if file.extension().unwrap() == "png" {
                assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", file.display());
            } else {
                let text = String::from_utf8(bytes).unwrap();
                assert!(text.starts_with("<svg"), "{}", file.display());
                assert!(text.contains("concurrent clients"));
            }
        }
        let svg = std::fs::read_to_string(dir.path().join("phases.svg")).unwrap();
        assert!(
            svg.contains("auth{cache=miss}"),
            "the legend names each phase"
        );
    }

    #[test]
    fn charts_carry_the_levels_as_points() {
        let result = sample_result();
        let turnaround = turnaround_chart(&result);
        assert_eq!(
            turnaround.series.len(),
            6,
            "min, mean, max for two endpoints"
        );
        let target_mean = turnaround
            .series
            .iter()
            .find(|s| s.name.starts_with("target") && s.name.ends_with("mean"))
            .unwrap();
        assert_eq!(target_mean.points, vec![(1.0, 0.02), (2.0, 0.04)]);
        let phases = phases_chart(&result);
        let auth = phases
            .series
            .iter()
            .find(|s| s.name == "auth{cache=miss}")
            .unwrap();
        assert_eq!(auth.points, vec![(1.0, 4.0), (2.0, 8.0)]);
    }
}
