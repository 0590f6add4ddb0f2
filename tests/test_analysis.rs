//! `effir analyze` and `effir drop-study`: sub-layer importance is
//! `1 - cos(x_in, x_out)` over real tokens only, and the commands write their
//! reports.

mod common;

use common::{copy_model, edit_weights, effir, fixture, read_json, stderr};
use effir_pipeline::compress::analysis::{
    measure_importance, measure_importance_at, MeasuredPositions,
};
use effir_pipeline::model::arch::{ForwardHooks, Sublayer};
use effir_pipeline::{Embedder, LoadOptions, Pooling};

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

/// The reference for pooled importance, computed apart from the meter: each
/// text run alone (no padding), `1 - cos` read at one position of each
/// sub-layer's input and output with plain arithmetic, averaged over texts.
struct OnePositionDistances {
    position: fn(usize) -> usize,
    sums: std::collections::HashMap<(usize, Sublayer), f64>,
}

impl ForwardHooks for OnePositionDistances {
    fn observe(
        &mut self,
        layer: usize,
        sublayer: Sublayer,
        input: &candle_core::Tensor,
        output: &candle_core::Tensor,
    ) -> candle_core::Result<()> {
        let at = |x: &candle_core::Tensor| -> candle_core::Result<Vec<f64>> {
            let t = x.dim(1)?;
            let row: Vec<f32> = x.get(0)?.get((self.position)(t))?.to_vec1()?;
            Ok(row.into_iter().map(f64::from).collect())
        };
        let (x, y) = (at(input)?, at(output)?);
        let dot: f64 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
        *self.sums.entry((layer, sublayer)).or_default() += 1.0 - dot / (norm(&x) * norm(&y));
        Ok(())
    }
}

fn importance_at_one_position(embedder: &Embedder, position: fn(usize) -> usize) -> Vec<[f64; 3]> {
    let mut hooks = OnePositionDistances {
        position,
        sums: Default::default(),
    };
    embedder
        .for_each_batch(&TEXTS, "", 1, &mut |input, _| {
            embedder.hidden_states_hooked(input, &mut hooks).map(|_| ())
        })
        .unwrap();
    (0..embedder.layer_count())
        .map(|l| {
            [Sublayer::Attention, Sublayer::Mlp, Sublayer::Block]
                .map(|s| hooks.sums[&(l, s)] / TEXTS.len() as f64)
        })
        .collect()
}

/// `MeasuredPositions::ReadBy(pooling)` averages over the positions the
/// pooling reads: a last-token retriever's last token, a CLS model's first,
/// every token for mean pooling; padded batches give the same numbers.
#[test]
fn pooled_importance_is_measured_where_the_pooling_reads() {
    // (fixture, pooling asked for, the position it reads in a text of t tokens)
    type Case = (&'static str, Option<Pooling>, fn(usize) -> usize);
    let cases: [Case; 3] = [
        ("llama", None, |t| t - 1),
        ("qwen2", None, |t| t - 1),
        ("bert", Some(Pooling::Cls), |_| 0),
    ];
    for (arch, pooling, position) in cases {
        let options = LoadOptions {
            pooling,
            ..LoadOptions::default()
        };
        let embedder = Embedder::load(&fixture(arch), &options).unwrap();
        let positions = MeasuredPositions::ReadBy(embedder.pooling());
        let expected = importance_at_one_position(&embedder, position);
        let all = measure_importance(&embedder, &TEXTS, TEXTS.len(), &mut |_| {}).unwrap();
        for batch_size in [1, TEXTS.len()] {
            let report =
                measure_importance_at(&embedder, &TEXTS, batch_size, positions, &mut |_| {})
                    .unwrap();
            assert_eq!(report.tokens, TEXTS.len(), "{arch}: one position a text");
            assert_eq!(report.texts, TEXTS.len());
            assert_eq!(report.pooled_positions, Some(embedder.pooling()));
            for (l, (got, want)) in report.layers.iter().zip(&expected).enumerate() {
                let got = [got.attention.unwrap(), got.mlp.unwrap(), got.block];
                for (g, w) in got.iter().zip(want) {
                    assert!(
                        (g - w).abs() < 1e-5,
                        "{arch} layer {l}, batch {batch_size}: {got:?} against {want:?}"
                    );
                }
            }
        }
        // Not the all-token measure by another name: some sub-layer differs
        // by more than the tolerance the equality above allowed.
        assert!(all.tokens > TEXTS.len(), "{arch}: {} tokens", all.tokens);
        let largest_gap = all
            .layers
            .iter()
            .zip(&expected)
            .flat_map(|(a, e)| {
                [a.attention.unwrap(), a.mlp.unwrap(), a.block]
                    .into_iter()
                    .zip(*e)
                    .map(|(a, e)| (a - e).abs())
            })
            .fold(0.0, f64::max);
        assert!(
            largest_gap > 1e-4,
            "{arch}: pooled = all tokens ({largest_gap:e})"
        );
    }

    // Mean pooling reads every real token: the same report as all tokens.
    let embedder = Embedder::load(&fixture("bert"), &LoadOptions::default()).unwrap();
    let all = measure_importance(&embedder, &TEXTS, 3, &mut |_| {}).unwrap();
    let pooled = measure_importance_at(
        &embedder,
        &TEXTS,
        3,
        MeasuredPositions::ReadBy(Pooling::Mean),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!((all.layers, all.tokens), (pooled.layers, pooled.tokens));
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

/// `effir analyze --positions pooled` writes which positions it measured;
/// a drop study ranked by that report carries it into its own
/// importance.json, which reads back the same.
#[test]
fn analyze_at_pooled_positions_says_so_in_its_reports() {
    let work = tempfile::tempdir().unwrap();
    let calib = work.path().join("calib.txt");
    std::fs::write(&calib, TEXTS.join("\n")).unwrap();
    let model = fixture("llama");
    let analyze = |positions: &str, out: &std::path::Path| {
        let run = effir(&[
            "analyze",
            "--quiet",
            "--model",
            model.to_str().unwrap(),
            "--calib",
            calib.to_str().unwrap(),
            "--positions",
            positions,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(run.status.success(), "{}", stderr(&run));
        (
            read_json(&out.join("importance.json")),
            std::fs::read_to_string(out.join("importance.md")).unwrap(),
        )
    };
    let (all, _) = analyze("all", &work.path().join("all"));
    assert!(all["calibration"]["pooled_positions"].is_null());
    let pooled_dir = work.path().join("pooled");
    let (pooled, md) = analyze("pooled", &pooled_dir);
    assert_eq!(pooled["calibration"]["pooled_positions"], "last_token");
    assert_eq!(pooled["calibration"]["tokens"], TEXTS.len());
    assert!(
        all["calibration"]["tokens"].as_u64().unwrap() > TEXTS.len() as u64,
        "{all}"
    );
    assert!(
        md.contains("the 6 positions last_token pooling reads in 6 texts"),
        "{md}"
    );
    // Every token still runs through the model: the cost (and the speed
    // figure) counts them all, whichever positions the importance reads.
    assert_eq!(
        pooled["calibration"]["tokens_run"], all["calibration"]["tokens"],
        "{pooled}"
    );

    let study = work.path().join("study");
    let run = effir(&[
        "drop-study",
        "--quiet",
        "--model",
        model.to_str().unwrap(),
        "--data",
        fixture("eval/tiny").to_str().unwrap(),
        "--k",
        "1",
        "--importance",
        pooled_dir.join("importance.json").to_str().unwrap(),
        "--out",
        study.to_str().unwrap(),
        "--cache-dir",
        work.path().join("cache").to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let carried =
        effir_pipeline::compress::analysis::ImportanceReport::read(&study.join("importance.json"))
            .unwrap();
    assert_eq!(carried.pooled_positions, Some(Pooling::LastToken));
    assert_eq!(carried.tokens, TEXTS.len());
}
