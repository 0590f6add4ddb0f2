//! `effir analyze` and `effir drop-study`: sub-layer importance is
//! `1 - cos(x_in, x_out)` over real tokens only, and the commands write their
//! reports.

mod common;

use common::{copy_model, edit_weights, effir, fixture};
use effir_pipeline::compress::analysis::measure_importance;
use effir_pipeline::{Embedder, LoadOptions};

const TEXTS: [&str; 6] = [
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "hello world",
    "Dense retrieval with pruned MLP layers keeps attention intact.",
    "a",
    "Numbers 12 345 and symbols % & $ appear here.",
    "pruning mlp sub layers keeps attention layers intact",
];

#[test]
fn padding_does_not_change_importance() {
    for arch in ["bert", "qwen2", "gemma3"] {
        let embedder = Embedder::load(&fixture(arch), &LoadOptions::default()).unwrap();
        let alone = measure_importance(&embedder, &TEXTS, 1, &mut |_| {}).unwrap();
        let padded = measure_importance(&embedder, &TEXTS, TEXTS.len(), &mut |_| {}).unwrap();
        assert_eq!(alone.tokens, padded.tokens);
        for (a, b) in alone.layers.iter().zip(&padded.layers) {
            for (x, y) in [
                (a.attention, b.attention),
                (a.mlp, b.mlp),
                (Some(a.block), Some(b.block)),
            ] {
                let (x, y) = (x.unwrap(), y.unwrap());
                assert!(
                    (x - y).abs() < 1e-5,
                    "{arch} layer {}: {x} alone vs {y} padded",
                    a.layer
                );
                assert!(x > 0.0 && x < 2.0, "{arch}: importance {x} outside (0, 2)");
            }
        }
    }
}

#[test]
fn an_mlp_that_adds_nothing_has_zero_importance() {
    let model = copy_model(&fixture("llama"));
    edit_weights(model.path(), |w| {
        let key = "model.layers.1.mlp.down_proj.weight";
        let zero = w[key].zeros_like().unwrap();
        w.insert(key.into(), zero);
    });
    let embedder = Embedder::load(model.path(), &LoadOptions::default()).unwrap();
    let report = measure_importance(&embedder, &TEXTS, 3, &mut |_| {}).unwrap();
    assert!(
        report.layers[1].mlp.unwrap().abs() < 1e-6,
        "{:?}",
        report.layers[1]
    );
    assert!(
        report.layers[0].mlp.unwrap() > 1e-5 && report.layers[2].mlp.unwrap() > 1e-5,
        "{:?}",
        report.layers
    );
    assert_eq!(
        report.mlps_by_importance()[0].0,
        1,
        "the zeroed MLP ranks least important"
    );
}

#[test]
fn analyze_and_drop_study_write_their_reports() {
    let work = tempfile::tempdir().unwrap();
    let calib = work.path().join("calib.txt");
    std::fs::write(&calib, TEXTS.join("\n")).unwrap();
    let out = work.path().join("analysis");
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/analyze.yaml");
    let run = effir(&[
        "analyze",
        "--quiet",
        "--model",
        fixture("bert").to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("importance.json")).unwrap())
            .unwrap();
    assert_eq!(json["layers"].as_array().unwrap().len(), 3);
    assert!(json["seconds_per_1000_tokens"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read_to_string(out.join("importance.svg"))
        .unwrap()
        .starts_with("<svg"));
    assert!(std::fs::read_to_string(out.join("importance.md"))
        .unwrap()
        .contains("| 2 |"));

    let study = work.path().join("study");
    let data = fixture("eval/tiny");
    let cache = work.path().join("cache");
    let run = effir(&[
        "drop-study",
        "--quiet",
        "--model",
        fixture("bert").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--k",
        "1,2",
        "--out",
        study.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(study.join("drop_study.json")).unwrap())
            .unwrap();
    assert_eq!(json["study"]["attention"].as_array().unwrap().len(), 2);
    assert_eq!(json["study"]["mlp"].as_array().unwrap().len(), 2);
    assert_eq!(
        json["study"]["mlp"][1]["layers"].as_array().unwrap().len(),
        2
    );
    assert!(study.join("drop_study.svg").exists() && study.join("drop_study.md").exists());

    // Bad input: a clear error, nothing written.
    let bad = work.path().join("bad");
    let blank = work.path().join("blank.txt");
    std::fs::write(&blank, " \n\n\t\n").unwrap();
    let model = fixture("bert");
    let model = model.to_str().unwrap();
    let (bad_dir, data_dir) = (bad.to_str().unwrap(), data.to_str().unwrap());
    let blank = blank.to_str().unwrap();
    let analyze = vec!["analyze", "--model", model, "--out", bad_dir];
    let drop_study = |k| {
        vec![
            "drop-study",
            "--model",
            model,
            "--data",
            data_dir,
            "--k",
            k,
            "--out",
            bad_dir,
        ]
    };
    for (args, needle) in [
        (analyze.clone(), "--calib"),
        (
            [analyze.as_slice(), &["--calib", blank]].concat(),
            "no usable calibration text",
        ),
        (drop_study("0"), "--k"),
        (drop_study("4"), "--k"),
    ] {
        let run = effir(&args);
        assert!(!run.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            stderr.contains(needle),
            "{args:?}: `{needle}` not in {stderr}"
        );
        assert!(!bad.exists(), "{args:?} wrote output");
    }
}

/// `--importance` ranks the sub-layers by an earlier report (here one written
/// by hand, so the order is known) instead of measuring on `--data`; the
/// study writes its ranking as importance.json, which reads back the same.
#[test]
fn a_drop_study_can_rank_by_an_earlier_importance_report() {
    let work = tempfile::tempdir().unwrap();
    let report = work.path().join("importance.json");
    let layer = |l: usize, attention: f64, mlp: f64| serde_json::json!({"layer": l, "attention": attention, "mlp": mlp, "block": attention + mlp});
    let write_report = |layers: Vec<serde_json::Value>| {
        std::fs::write(
            &report,
            serde_json::json!({"calibration": {"texts": 4, "tokens": 40}, "layers": layers})
                .to_string(),
        )
        .unwrap()
    };
    write_report(vec![
        layer(0, 0.2, 0.9),
        layer(1, 0.8, 0.1),
        layer(2, 0.3, 0.5),
    ]);
    let (model, data) = (fixture("bert"), fixture("eval/tiny"));
    let study = work.path().join("study");
    let run_study = |out: &std::path::Path| {
        effir(&[
            "drop-study",
            "--quiet",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--k",
            "1,2",
            "--importance",
            report.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--cache-dir",
            work.path().join("cache").to_str().unwrap(),
        ])
    };
    let run = run_study(&study);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(study.join("drop_study.json")).unwrap())
            .unwrap();
    let layers = |kind: &str, i: usize| -> Vec<u64> {
        json["study"][kind][i]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_u64().unwrap())
            .collect()
    };
    assert_eq!(layers("mlp", 0), [1]);
    assert_eq!(layers("mlp", 1), [1, 2]);
    assert_eq!(layers("attention", 0), [0]);
    assert_eq!(layers("attention", 1), [0, 2]);
    let written =
        effir_pipeline::compress::analysis::ImportanceReport::read(&study.join("importance.json"))
            .unwrap();
    assert_eq!(written.mlps_by_importance(), [(1, 0.1), (2, 0.5), (0, 0.9)]);

    // A report for another model, or with a layer twice: a clear error
    // naming the file, nothing written.
    let bad = work.path().join("bad");
    for (layers, needle) in [
        (vec![layer(0, 0.2, 0.9)], "1 layers"),
        (
            vec![layer(0, 0.2, 0.9), layer(0, 0.8, 0.1), layer(2, 0.3, 0.5)],
            "layer indices",
        ),
    ] {
        write_report(layers);
        let run = run_study(&bad);
        assert!(!run.status.success());
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            stderr.contains("importance.json") && stderr.contains(needle),
            "{needle}: {stderr}"
        );
        assert!(!bad.exists());
    }
}
