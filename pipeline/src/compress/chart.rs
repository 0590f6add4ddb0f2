//! Small SVG charts for reports: grouped bars (importance per layer) and
//! lines (a metric against a count). Plain SVG, no fonts or libraries needed.

use std::fmt::Write;

/// One series of a chart.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    /// `None` leaves a gap (an absent sub-layer).
    pub values: Vec<Option<f64>>,
}

const W: f64 = 720.0;
const H: f64 = 360.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 56.0;
const BOTTOM: f64 = 48.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn frame(title: &str, x_label: &str, y_label: &str, y_max: f64) -> String {
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{}</text>
"#,
        W / 2.0,
        escape(title),
        LEFT + (W - LEFT - RIGHT) / 2.0,
        H - 8.0,
        escape(x_label),
        TOP + (H - TOP - BOTTOM) / 2.0,
        escape(y_label)
    );
    for i in 0..=4 {
        let v = y_max * i as f64 / 4.0;
        let y = H - BOTTOM - (H - TOP - BOTTOM) * i as f64 / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v:.3}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0
        );
    }
    svg
}

fn legend(svg: &mut String, series: &[Series]) {
    for (i, s) in series.iter().enumerate() {
        let x = LEFT + 8.0 + 140.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            TOP - 26.0,
            s.color,
            x + 16.0,
            TOP - 16.0,
            escape(s.name)
        );
    }
}

fn y_max(series: &[Series]) -> f64 {
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .fold(0.0f64, |a, b| a.max(*b));
    if max > 0.0 {
        max * 1.1
    } else {
        1.0
    }
}

/// One label under the middle of each of `labels.len()` equal slots of the x axis.
fn x_labels(svg: &mut String, labels: &[String]) {
    let slot = (W - LEFT - RIGHT) / labels.len().max(1) as f64;
    for (i, label) in labels.iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            LEFT + slot * (i as f64 + 0.5),
            H - BOTTOM + 16.0,
            escape(label)
        );
    }
}

/// Grouped bars: one group per label (e.g. layer), one bar per series.
pub fn bar_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    labels: &[String],
    series: &[Series],
) -> String {
    let top = y_max(series);
    let mut svg = frame(title, x_label, y_label, top);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let group = plot_w / labels.len().max(1) as f64;
    let bar = group * 0.8 / series.len().max(1) as f64;
    for (g, label) in labels.iter().enumerate() {
        let gx = LEFT + group * g as f64 + group * 0.1;
        for (k, s) in series.iter().enumerate() {
            if let Some(Some(v)) = s.values.get(g) {
                let h = plot_h * v / top;
                let _ = writeln!(
                    svg,
                    r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{} {}: {v:.4}</title></rect>"#,
                    gx + bar * k as f64,
                    H - BOTTOM - h,
                    bar,
                    s.color,
                    escape(s.name),
                    escape(label)
                );
            }
        }
    }
    x_labels(&mut svg, labels);
    legend(&mut svg, series);
    svg.push_str("</svg>\n");
    svg
}

/// Lines over shared x positions (`labels`), one per series.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    labels: &[String],
    series: &[Series],
) -> String {
    let top = y_max(series);
    let mut svg = frame(title, x_label, y_label, top);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let step = plot_w / labels.len().max(1) as f64;
    let x = |i: usize| LEFT + step * (i as f64 + 0.5);
    x_labels(&mut svg, labels);
    for s in series {
        let points: Vec<String> = s
            .values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                v.map(|v| format!("{:.1},{:.1}", x(i), H - BOTTOM - plot_h * v / top))
            })
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            s.color,
            points.join(" ")
        );
        for p in &points {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                svg,
                r#"<circle cx="{px}" cy="{py}" r="3" fill="{}"/>"#,
                s.color
            );
        }
    }
    legend(&mut svg, series);
    svg.push_str("</svg>\n");
    svg
}
