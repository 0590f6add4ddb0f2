//! TensorRT compatibility lint: which operators of a graph TensorRT's ONNX
//! parser (onnx-tensorrt) does not take. The support list is kept in
//! `onnx/data/tensorrt_ops.txt` with the TensorRT version and commit it was
//! read from.

use std::collections::BTreeMap;

use crate::graph_file::GraphFile;

const SUPPORT_TABLE: &str = include_str!("../data/tensorrt_ops.txt");

/// The parsed support table.
pub struct TensorRtSupport {
    pub tensorrt_version: String,
    pub opset_range: (i64, i64),
    supported: BTreeMap<String, bool>,
}

/// One reason the graph would not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LintFinding {
    /// An operator TensorRT lists as unsupported, or does not list.
    UnsupportedOp { op: String, count: usize },
    /// A node of a non-standard domain (`com.microsoft` contrib ops).
    CustomDomain { op: String, count: usize },
    /// The graph's opset is outside the range TensorRT parses.
    Opset { opset: i64, range: (i64, i64) },
}

impl std::fmt::Display for LintFinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnsupportedOp { op, count } => {
                write!(
                    f,
                    "{op} ({count} node(s)): not supported by TensorRT's ONNX parser"
                )
            }
            Self::CustomDomain { op, count } => {
                write!(
                    f,
                    "{op} ({count} node(s)): custom-domain operator, not an ONNX standard op"
                )
            }
            Self::Opset { opset, range } => write!(
                f,
                "opset {opset}: TensorRT parses opsets {} to {}",
                range.0, range.1
            ),
        }
    }
}

impl TensorRtSupport {
    /// The table shipped with effir.
    pub fn bundled() -> Self {
        let mut version = String::new();
        let mut range = (0, 0);
        let mut supported = BTreeMap::new();
        for line in SUPPORT_TABLE.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                ["tensorrt_version", v] => version = v.to_string(),
                ["opset_range", a, b] => {
                    range = (a.parse().unwrap_or(0), b.parse().unwrap_or(0));
                }
                [op, flag] => {
                    supported.insert(op.to_string(), *flag == "Y");
                }
                _ => {}
            }
        }
        Self {
            tensorrt_version: version,
            opset_range: range,
            supported,
        }
    }

    pub fn is_supported(&self, op: &str) -> bool {
        self.supported.get(op).copied().unwrap_or(false)
    }

    /// Everything in `graph` TensorRT would reject; empty when it parses.
    pub fn lint(&self, graph: &GraphFile) -> Vec<LintFinding> {
        let mut findings = Vec::new();
        if let Some(opset) = graph.opset() {
            if opset < self.opset_range.0 || opset > self.opset_range.1 {
                findings.push(LintFinding::Opset {
                    opset,
                    range: self.opset_range,
                });
            }
        }
        for (op, count) in graph.op_counts() {
            if op.contains("::") {
                findings.push(LintFinding::CustomDomain { op, count });
            } else if !self.is_supported(&op) {
                findings.push(LintFinding::UnsupportedOp { op, count });
            }
        }
        findings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_table_knows_the_operators_effir_emits() {
        let table = TensorRtSupport::bundled();
        assert!(
            table.tensorrt_version.starts_with("10."),
            "{}",
            table.tensorrt_version
        );
        assert!(table.opset_range.0 <= 17 && table.opset_range.1 >= 21);
        for op in [
            "MatMul",
            "Add",
            "LayerNormalization",
            "Erf",
            "Softmax",
            "Gather",
            "Range",
            "Where",
            "Cast",
            "ReduceMean",
            "ArgMax",
            "Equal",
            "Slice",
            "Concat",
            "Transpose",
            "Reshape",
        ] {
            assert!(table.is_supported(op), "{op}");
        }
        assert!(!table.is_supported("Unique"));
        assert!(!table.is_supported("NoSuchOp"));
    }
}
