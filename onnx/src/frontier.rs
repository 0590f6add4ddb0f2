//! The speed/quality frontier of candidate graphs: each point's retention
//! (from its validation on every dataset) and speed (all graphs measured in
//! one interleaved run), which points no other point beats, and the fastest
//! point that passes the gates. Rendered as JSON, Markdown and SVG.

use serde::Serialize;

use crate::validate::ValidationReport;

/// Who made a graph: effir, or a peer a user could pick instead (Optimum's
/// exports, a smaller model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Effir,
    Peer,
}

/// One dataset's quality for one graph.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetScore {
    pub dataset: String,
    pub ndcg_at_10: f64,
    pub recall_at_100: f64,
    /// nDCG@10 over the reference's.
    pub ndcg_retention: f64,
    /// Whether the graph's model was fine-tuned on this dataset's text.
    pub tuned_on: bool,
}

/// One candidate graph, measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrontierPoint {
    pub name: String,
    pub origin: Origin,
    pub graph: String,
    pub precision: String,
    pub int8_kernel: Option<String>,
    pub megabytes: f64,
    pub scores: Vec<DatasetScore>,
    /// The lowest nDCG@10 retention over the datasets.
    pub worst_retention: f64,
    pub parity_min_cosine: Option<f64>,
    /// Every gate passed.
    pub passed: bool,
    /// Texts/s at the throughput shape.
    pub throughput: f64,
    /// Throughput over the baseline point's.
    pub speedup: f64,
    /// Median milliseconds at the latency shape.
    pub latency_ms: f64,
    /// No other point is at least as fast and at least as good on every
    /// dataset, and better in one of these.
    pub on_front: bool,
}

impl FrontierPoint {
    /// The point from its validation report and its speed measurements.
    pub fn new(
        name: String,
        origin: Origin,
        report: &ValidationReport,
        megabytes: f64,
        (throughput, latency_ms): (f64, f64),
    ) -> Self {
        let scores: Vec<DatasetScore> = report
            .quality
            .iter()
            .map(|q| DatasetScore {
                dataset: q.name(),
                ndcg_at_10: q.candidate_ndcg_at_10,
                recall_at_100: q.candidate_recall_at_100,
                ndcg_retention: q.ndcg_retention,
                tuned_on: report.provenance.was_tuned_on(&q.dataset),
            })
            .collect();
        let worst_retention = scores
            .iter()
            .map(|s| s.ndcg_retention)
            .fold(f64::INFINITY, f64::min);
        Self {
            name,
            origin,
            graph: report.candidate.display().to_string(),
            precision: report.precision.clone(),
            int8_kernel: report.int8_kernel.clone(),
            megabytes,
            scores,
            worst_retention,
            parity_min_cosine: report.parity.as_ref().map(|p| p.min_cosine),
            passed: report.passed,
            throughput,
            speedup: f64::NAN,
            latency_ms,
            on_front: false,
        }
    }

    /// At least as fast as `other` and at least as good on every dataset,
    /// and better in one of these.
    fn dominates(&self, other: &Self) -> bool {
        let pairs = || self.scores.iter().zip(&other.scores);
        self.speedup >= other.speedup
            && pairs().all(|(a, b)| a.ndcg_retention >= b.ndcg_retention)
            && (self.speedup > other.speedup
                || pairs().any(|(a, b)| a.ndcg_retention > b.ndcg_retention))
    }
}

/// Every point, with speed-ups against the first and the front marked.
#[derive(Debug, Clone, Serialize)]
pub struct Frontier {
    /// The point speed-ups are relative to.
    pub baseline: String,
    /// The shapes measured: `(batch, length)` for throughput and latency.
    pub throughput_shape: (usize, usize),
    pub latency_shape: (usize, usize),
    pub points: Vec<FrontierPoint>,
}

/// A peer point that beats an effir point of the front.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerWin {
    pub peer: String,
    pub effir: String,
}

impl Frontier {
    /// Speed-ups relative to `points[baseline]`, and the front.
    pub fn new(
        mut points: Vec<FrontierPoint>,
        baseline: usize,
        throughput_shape: (usize, usize),
        latency_shape: (usize, usize),
    ) -> Self {
        let base = points.get(baseline).map_or(f64::NAN, |p| p.throughput);
        let baseline_name = points.get(baseline).map(|p| p.name.clone());
        for p in &mut points {
            p.speedup = p.throughput / base;
        }
        let front: Vec<bool> = points
            .iter()
            .map(|p| !points.iter().any(|q| q.dominates(p)))
            .collect();
        for (p, on) in points.iter_mut().zip(front) {
            p.on_front = on;
        }
        Self {
            baseline: baseline_name.unwrap_or_default(),
            throughput_shape,
            latency_shape,
            points,
        }
    }

    /// The fastest point that passed every gate.
    pub fn fastest_passing(&self) -> Option<&FrontierPoint> {
        self.points
            .iter()
            .filter(|p| p.passed)
            .max_by(|a, b| a.throughput.total_cmp(&b.throughput))
    }

    /// Peers that beat a point of effir's own front (the effir points no
    /// other effir point beats): faster, and as good or better on every dataset.
    pub fn peer_wins(&self) -> Vec<PeerWin> {
        let effir: Vec<&FrontierPoint> = self
            .points
            .iter()
            .filter(|p| p.origin == Origin::Effir)
            .collect();
        let mut wins = Vec::new();
        for e in effir
            .iter()
            .filter(|e| !effir.iter().any(|other| other.dominates(e)))
        {
            for peer in self.points.iter().filter(|p| p.origin == Origin::Peer) {
                if peer.dominates(e) {
                    wins.push(PeerWin {
                        peer: peer.name.clone(),
                        effir: e.name.clone(),
                    });
                }
            }
        }
        wins
    }

    pub fn to_markdown(&self, command: &str) -> String {
        let datasets: Vec<String> = self
            .points
            .first()
            .map(|p| p.scores.iter().map(|s| s.dataset.clone()).collect())
            .unwrap_or_default();
        let (tb, tl) = self.throughput_shape;
        let (lb, ll) = self.latency_shape;
        let mut md = format!(
            "# Speed/quality frontier\n\n`{command}`\n\nSpeed: every graph in one ONNX Runtime run, taking turns run by run (medians); speed-up is throughput at batch {tb} × {tl} over {}'s; latency at batch {lb} × {ll}. Retention: nDCG@10 over the reference's; *worst* is the lowest over the datasets. `tuned` marks a dataset whose text the model was fine-tuned on (not held out). ★: on the front (no other point is at least as fast and as good on every dataset, and better in one).\n\n| point | by | precision | MB |",
            self.baseline
        );
        for d in &datasets {
            md += &format!(" {d} nDCG@10 (retention) | {d} Recall@100 |");
        }
        md += " worst | parity min cos | gates | speed-up | texts/s | latency ms |\n|---|---|---|---:|";
        for _ in &datasets {
            md += "---:|---:|";
        }
        md += "---:|---:|---|---:|---:|---:|\n";
        for p in &self.points {
            md += &format!(
                "| {}{} | {} | {}{} | {:.1} |",
                if p.on_front { "★ " } else { "" },
                p.name,
                match p.origin {
                    Origin::Effir => "effir",
                    Origin::Peer => "peer",
                },
                p.precision,
                p.int8_kernel
                    .as_deref()
                    .map_or(String::new(), |k| format!(" {k}")),
                p.megabytes
            );
            for s in &p.scores {
                md += &format!(
                    " {:.4} ({:.1} %{}) | {:.4} |",
                    s.ndcg_at_10,
                    100.0 * s.ndcg_retention,
                    if s.tuned_on { ", tuned" } else { "" },
                    s.recall_at_100
                );
            }
            md += &format!(
                " {:.1} % | {} | {} | {:.2}× | {:.1} | {:.2} |\n",
                100.0 * p.worst_retention,
                p.parity_min_cosine
                    .map_or("—".into(), |c| format!("{c:.4}")),
                if p.passed { "pass" } else { "FAIL" },
                p.speedup,
                p.throughput,
                p.latency_ms
            );
        }
        md += "\n";
        match self.fastest_passing() {
            Some(p) => {
                md += &format!(
                    "Fastest point passing the gates: **{}** ({:.2}×, worst retention {:.1} %).\n",
                    p.name,
                    p.speedup,
                    100.0 * p.worst_retention
                )
            }
            None => md += "No point passes the gates.\n",
        }
        let wins = self.peer_wins();
        if wins.is_empty() {
            md += "No peer beats a point of effir's own front (faster and as good on every dataset).\n";
        } else {
            for w in wins {
                md += &format!("**A peer wins:** {} beats effir's {} (faster, and as good on every dataset).\n", w.peer, w.effir);
            }
        }
        md
    }

    /// Speed-up against worst retention, the front joined by a line.
    pub fn to_svg(&self) -> String {
        let (w, h, margin) = (720.0, 480.0, 60.0);
        let xs: Vec<f64> = self
            .points
            .iter()
            .map(|p| 100.0 * p.worst_retention)
            .collect();
        let ys: Vec<f64> = self.points.iter().map(|p| p.speedup).collect();
        let range = |v: &[f64], pad: f64| {
            let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if lo.is_finite() && hi > lo {
                (lo - pad * (hi - lo), hi + pad * (hi - lo))
            } else {
                (lo - 1.0, lo + 1.0)
            }
        };
        let ((x0, x1), (y0, y1)) = (range(&xs, 0.08), range(&ys, 0.1));
        let px = |x: f64| margin + (x - x0) / (x1 - x0) * (w - 2.0 * margin);
        let py = |y: f64| h - margin - (y - y0) / (y1 - y0) * (h - 2.0 * margin);
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<line x1=\"{m}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n<line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{b}\" stroke=\"black\"/>\n<text x=\"{cx}\" y=\"{lb}\" text-anchor=\"middle\">worst nDCG@10 retention over the datasets (%)</text>\n<text x=\"16\" y=\"{cy}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {cy})\">speed-up (throughput at batch {tb} × {tl})</text>\n",
            m = margin,
            b = h - margin,
            r = w - margin,
            cx = w / 2.0,
            lb = h - 20.0,
            cy = h / 2.0,
            tb = self.throughput_shape.0,
            tl = self.throughput_shape.1,
        );
        for i in 0..=4 {
            let x = x0 + (x1 - x0) * i as f64 / 4.0;
            let y = y0 + (y1 - y0) * i as f64 / 4.0;
            svg += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{x:.1}</text>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{y:.2}</text>\n",
                px(x),
                h - margin + 16.0,
                margin - 6.0,
                py(y) + 4.0
            );
        }
        let mut front: Vec<&FrontierPoint> = self.points.iter().filter(|p| p.on_front).collect();
        front.sort_by(|a, b| a.worst_retention.total_cmp(&b.worst_retention));
        let line: Vec<String> = front
            .iter()
            .map(|p| format!("{:.1},{:.1}", px(100.0 * p.worst_retention), py(p.speedup)))
            .collect();
        svg += &format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"#888\" stroke-dasharray=\"4 3\"/>\n",
            line.join(" ")
        );
        for p in &self.points {
            let (x, y) = (px(100.0 * p.worst_retention), py(p.speedup));
            let color = match p.origin {
                Origin::Effir => "#1f77b4",
                Origin::Peer => "#d62728",
            };
            let fill = if p.on_front { color } else { "white" };
            svg += &format!(
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"5\" fill=\"{fill}\" stroke=\"{color}\" stroke-width=\"2\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
                x + 7.0,
                y - 6.0,
                escape(&p.name)
            );
        }
        svg += &format!(
            "<text x=\"{:.1}\" y=\"20\">filled: on the front · blue: effir · red: peers</text>\n</svg>\n",
            margin
        );
        svg
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(
        name: &str,
        origin: Origin,
        throughput: f64,
        retention: f64,
        passed: bool,
    ) -> FrontierPoint {
        FrontierPoint {
            name: name.into(),
            origin,
            graph: format!("{name}/model.onnx"),
            precision: "fp32".into(),
            int8_kernel: None,
            megabytes: 1.0,
            scores: vec![DatasetScore {
                dataset: "d".into(),
                ndcg_at_10: 0.5 * retention,
                recall_at_100: 0.9,
                ndcg_retention: retention,
                tuned_on: false,
            }],
            worst_retention: retention,
            parity_min_cosine: Some(1.0),
            passed,
            throughput,
            speedup: f64::NAN,
            latency_ms: 1.0,
            on_front: false,
        }
    }

    /// The front holds exactly the points nothing beats; the fastest
    /// passing point and the peers that beat effir's own front are found.
    #[test]
    fn the_front_is_the_points_nothing_beats() {
        let f = Frontier::new(
            vec![
                point("full", Origin::Effir, 10.0, 1.0, true),
                point("int8", Origin::Effir, 17.0, 0.99, true),
                point("pruned", Origin::Effir, 13.0, 0.90, false),
                point("pruned-int8", Origin::Effir, 22.0, 0.89, false),
                point("peer-int8", Origin::Peer, 20.0, 0.995, true),
            ],
            0,
            (32, 256),
            (1, 32),
        );
        let on: Vec<&str> = f
            .points
            .iter()
            .filter(|p| p.on_front)
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(on, ["full", "pruned-int8", "peer-int8"]);
        assert!((f.points[1].speedup - 1.7).abs() < 1e-12);
        assert_eq!(f.fastest_passing().unwrap().name, "peer-int8");
        // effir's own front is full, int8 and pruned-int8; the peer beats int8.
        assert_eq!(
            f.peer_wins(),
            [PeerWin {
                peer: "peer-int8".into(),
                effir: "int8".into()
            }]
        );
        let md = f.to_markdown("effir frontier ...");
        assert!(md.contains("| ★ peer-int8 | peer |"), "{md}");
        // Each dataset's nDCG@10 with its retention, then its Recall@100.
        assert!(
            md.contains("| d nDCG@10 (retention) | d Recall@100 |"),
            "{md}"
        );
        assert!(md.contains("| 0.4975 (99.5 %) | 0.9000 |"), "{md}");
        assert!(md.contains("Fastest point passing the gates: **peer-int8**"));
        assert!(md.contains("**A peer wins:** peer-int8 beats effir's int8"));
        let svg = f.to_svg();
        assert_eq!(svg.matches("<circle").count(), 5);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }

    /// Better on one dataset and worse on another is no win: both points stay.
    #[test]
    fn a_trade_between_datasets_is_not_a_win() {
        let mut a = point("effir", Origin::Effir, 10.0, 0.99, true);
        let mut b = point("peer", Origin::Peer, 12.0, 0.99, true);
        a.scores.push(DatasetScore {
            dataset: "e".into(),
            ndcg_at_10: 0.4,
            recall_at_100: 0.9,
            ndcg_retention: 1.0,
            tuned_on: false,
        });
        b.scores.push(DatasetScore {
            ndcg_retention: 0.95,
            ..a.scores[1].clone()
        });
        b.worst_retention = 0.95;
        let f = Frontier::new(vec![a, b], 0, (32, 256), (1, 32));
        assert!(f.points.iter().all(|p| p.on_front));
        assert!(f.peer_wins().is_empty());
        assert!(f.to_markdown("x").contains("No peer beats"));
    }
}
