//! `effir lint-onnx`: the operators of any ONNX graph that TensorRT's ONNX
//! parser would reject.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use effir_onnx::graph_file::GraphFile;
use effir_onnx::tensorrt::TensorRtSupport;

#[derive(Debug, Args)]
pub struct LintOnnxArgs {
    /// The .onnx file.
    pub graph: PathBuf,
}

pub fn run(args: LintOnnxArgs) -> anyhow::Result<()> {
    let file = GraphFile::read(&args.graph)?;
    let support = TensorRtSupport::bundled();
    let findings = support.lint(&file);
    let ops = file.op_counts();
    println!(
        "{}: {} operator types, {} nodes, opset {}",
        args.graph.display(),
        ops.len(),
        ops.values().sum::<usize>(),
        file.opset().map_or("?".into(), |o| o.to_string())
    );
    if findings.is_empty() {
        println!(
            "every operator is supported by TensorRT {}'s ONNX parser",
            support.tensorrt_version
        );
        return Ok(());
    }
    for f in &findings {
        println!("  {f}");
    }
    bail!(
        "{} finding(s): the graph would not parse in TensorRT {}",
        findings.len(),
        support.tensorrt_version
    )
}
