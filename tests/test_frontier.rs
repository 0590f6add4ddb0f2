//! `effir frontier`: candidate graphs (effir's and peers') validated on every
//! dataset and timed in one run; the report marks the front, and `--select`
//! ships the fastest graph that passes the gates, or fails writing nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{effir, export, fixture, stderr};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn frontier(work: &Path, gates: &Path, out: &Path, extra: &[&str]) -> Output {
    let fp32 = work.join("fp32");
    let int8 = work.join("int8");
    let peer = work.join("peer");
    let tiny = fixture("eval/tiny");
    let mut args = vec![
        "frontier".to_string(),
        "--quiet".into(),
        "--reference".into(),
        fixture("bert").display().to_string(),
        "--candidate".into(),
        fp32.display().to_string(),
        "--candidate".into(),
        format!("bert-int8={}", int8.display()),
        "--peer".into(),
        format!("optimum-layout={}", peer.display()),
        "--data".into(),
        tiny.display().to_string(),
        "--gates".into(),
        gates.display().to_string(),
        "--throughput".into(),
        "4x16".into(),
        "--runs".into(),
        "3".into(),
        "--warmup".into(),
        "1".into(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    effir(&refs)
}

fn exports(work: &Path) {
    let bert = fixture("bert");
    export(
        &bert,
        &work.join("fp32"),
        &["--profile", "sentence-transformers"],
    );
    export(
        &bert,
        &work.join("int8"),
        &["--profile", "sentence-transformers", "--precision", "int8"],
    );
    export(&bert, &work.join("peer"), &["--profile", "optimum"]);
}

#[test]
fn the_frontier_scores_times_and_selects_the_fastest_passing_graph() {
    let work = tempfile::tempdir().unwrap();
    exports(work.path());
    let gates = write(
        work.path(),
        "gates.yaml",
        "parity:\n  min_cosine: 0.99999\n  int8:\n    min_cosine: 0.9\nquality:\n  min_ndcg_retention: 0.5\n",
    );
    let out = work.path().join("frontier");
    let selected = work.path().join("ship");
    let o = frontier(
        work.path(),
        &gates,
        &out,
        &[
            "--select",
            selected.to_str().unwrap(),
            "--baseline",
            "optimum-layout",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    let json = common::read_json(&out.join("frontier.json"));
    let points = json["points"].as_array().unwrap();
    let names: Vec<&str> = points.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["fp32", "bert-int8", "optimum-layout"]);
    assert_eq!(points[2]["speedup"].as_f64().unwrap(), 1.0);
    assert_eq!(json["baseline"], "optimum-layout");
    assert_eq!(points[1]["precision"], "int8");
    assert_eq!(points[2]["origin"], "peer");
    for p in points {
        assert_eq!(p["scores"].as_array().unwrap().len(), 1);
        assert!(p["throughput"].as_f64().unwrap() > 0.0);
        assert!(p["latency_ms"].as_f64().unwrap() > 0.0);
        assert!(p["passed"].as_bool().unwrap(), "{p}");
        let name = p["name"].as_str().unwrap();
        assert!(out
            .join("validations")
            .join(name)
            .join("validation.json")
            .is_file());
    }
    // At least one point is on the front, and nothing on it is beaten.
    assert!(points.iter().any(|p| p["on_front"] == true));
    let md = std::fs::read_to_string(out.join("frontier.md")).unwrap();
    assert!(md.contains("Fastest point passing the gates"), "{md}");
    let svg = std::fs::read_to_string(out.join("frontier.svg")).unwrap();
    assert_eq!(svg.matches("<circle").count(), 3);

    // The shipped directory is the fastest passing point's export, whole.
    let fastest = points
        .iter()
        .max_by(|a, b| {
            a["throughput"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["throughput"].as_f64().unwrap())
        })
        .unwrap();
    let graph = PathBuf::from(fastest["graph"].as_str().unwrap());
    let shipped = effir_onnx::GraphLocation::find_graph(&selected).unwrap();
    assert_eq!(
        std::fs::read(&shipped).unwrap(),
        std::fs::read(&graph).unwrap()
    );
    assert!(selected.join("tokenizer.json").is_file());
}

#[test]
fn no_passing_graph_and_bad_requests_fail_with_nothing_selected() {
    let work = tempfile::tempdir().unwrap();
    exports(work.path());
    // A retention no graph reaches.
    let strict = write(
        work.path(),
        "strict.yaml",
        "quality:\n  min_ndcg_retention: 1.5\n",
    );
    let selected = work.path().join("ship");
    let o = frontier(
        work.path(),
        &strict,
        &work.path().join("report"),
        &["--select", selected.to_str().unwrap()],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no candidate passes"), "{}", stderr(&o));
    assert!(!selected.exists());
    // The report of what was tried is still written.
    assert!(work.path().join("report/frontier.md").is_file());

    let gates = write(
        work.path(),
        "gates.yaml",
        "quality:\n  min_ndcg_retention: 0.5\n",
    );
    let cases: [(&[&str], &str); 4] = [
        (&["--baseline", "nobody"], "--baseline nobody"),
        (&["--latency", "1by32"], "expected BATCHxLENGTH"),
        (&["--candidate", "/no/such/graph"], "no graph"),
        (
            &[
                "--candidate",
                &format!("fp32={}", work.path().join("int8").display()),
            ],
            "two points are named `fp32`",
        ),
    ];
    for (extra, message) in cases {
        let out = work.path().join("bad");
        let o = frontier(work.path(), &gates, &out, extra);
        assert!(!o.status.success(), "{extra:?} accepted");
        assert!(stderr(&o).contains(message), "{extra:?}: {}", stderr(&o));
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    }
}
