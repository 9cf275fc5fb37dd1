//! SVG line plots with plotters (no font files needed: the SVG backend
//! writes `<text>` elements that the viewer renders).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

/// One line: a label, a colour, a marker style and (x, y) points.
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    pub marker: Marker,
    pub points: Vec<(f64, f64)>,
}

#[derive(Clone, Copy)]
pub enum Marker {
    Circle,
    Triangle,
    Cross,
}

pub const EBPF: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
pub const EBPF_LIGHT: RGBColor = RGBColor(0x6b, 0xae, 0xd6);
pub const EBPF_DARK: RGBColor = RGBColor(0x08, 0x30, 0x6b);
pub const IPTABLES: RGBColor = RGBColor(0xd6, 0x27, 0x28);
pub const IPTABLES_LIGHT: RGBColor = RGBColor(0xfc, 0x92, 0x72);
pub const IPTABLES_DARK: RGBColor = RGBColor(0x67, 0x00, 0x0d);

/// A log-log plot of `series` against the service count.
pub fn log_log(path: &Path, title: &str, y_desc: &str, series: &[Series]) -> Result<()> {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut xmax, mut ymin, mut ymax) = (10.0f64, f64::MAX, 0.0f64);
    for (x, y) in pts {
        xmax = xmax.max(*x);
        if *y > 0.0 {
            ymin = ymin.min(*y);
            ymax = ymax.max(*y);
        }
    }
    if ymax <= 0.0 {
        ymin = 1.0;
        ymax = 10.0;
    }
    let (ylo, yhi) = (ymin / 2.0, ymax * 2.0);
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d((0.7f64..xmax * 1.6).log_scale(), (ylo..yhi).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("services (log scale)")
        .y_desc(y_desc)
        .x_label_formatter(&|v| crate::run::thousands(v.round() as u64))
        .y_label_formatter(&|v| fmt_axis(*v))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(|e| err(&e))?;
    for s in series.iter().filter(|s| !s.points.is_empty()) {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
        match s.marker {
            Marker::Circle => chart
                .draw_series(s.points.iter().map(|p| Circle::new(*p, 4, color.filled())))
                .map(drop),
            Marker::Triangle => chart
                .draw_series(
                    s.points
                        .iter()
                        .map(|p| TriangleMarker::new(*p, 5, color.filled())),
                )
                .map(drop),
            Marker::Cross => chart
                .draw_series(
                    s.points
                        .iter()
                        .map(|p| Cross::new(*p, 5, color.stroke_width(2))),
                )
                .map(drop),
        }
        .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn fmt_axis(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_text_and_lines() {
        let path =
            std::env::temp_dir().join(format!("kproxy-compare-plot-{}.svg", std::process::id()));
        log_log(
            &path,
            "test plot",
            "latency (µs)",
            &[Series {
                label: "eBPF p50".into(),
                color: EBPF,
                marker: Marker::Circle,
                points: vec![(1.0, 40.0), (1000.0, 42.0), (100_000.0, 45.0)],
            }],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.contains("<svg"));
        assert!(svg.contains("test plot"));
        assert!(svg.contains("eBPF p50"));
        assert!(svg.contains("<polyline") || svg.contains("<path"));
    }
}
