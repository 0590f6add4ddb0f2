//! The sentence-transformers head inside the graph: pooling, `Dense`
//! modules and `Normalize`, computing what `effir_pipeline::model::head` computes.

use candle_onnx::onnx::tensor_proto::DataType;
use effir_pipeline::model::pooling::Pooling;
use effir_pipeline::model::sentence_transformers::{DenseActivation, PostPooling, SentenceConfig};

use super::layers::{linear, BackboneInputs, Weights};
use crate::error::{Error, Result};
use crate::graph::GraphBuilder;

/// Emits pooling and the modules after it on `hidden` `(B, T, H)`; returns
/// the embedding `(B, D)` and `D`.
pub fn emit(
    g: &mut GraphBuilder,
    hidden: &str,
    hidden_size: usize,
    inputs: &BackboneInputs,
    pooling: Pooling,
    sentence: &SentenceConfig,
) -> Result<(String, usize)> {
    let mask = g.cast(&inputs.attention_mask, DataType::Float); // (B, T)
    let mask3 = g.unsqueeze(&mask, &[2]); // (B, T, 1)
    let mut x = match pooling {
        Pooling::Cls => {
            let zero = g.int_scalar(0);
            g.gather(hidden, &zero, 1)
        }
        Pooling::Mean | Pooling::MeanSqrtLen => {
            let masked = g.mul(hidden, &mask3);
            let sum = g.reduce("ReduceSum", &masked, &[1], false); // (B, H)
            let count = g.reduce("ReduceSum", &mask, &[1], true); // (B, 1)
            let floor = g.float_scalar(1e-9);
            let count = g.node("Max", &[&count, &floor], vec![]);
            let denom = if pooling == Pooling::Mean {
                count
            } else {
                g.unary("Sqrt", &count)
            };
            g.div(&sum, &denom)
        }
        Pooling::Max => {
            // Padding positions get -1e9, as sentence-transformers does.
            let one = g.float_scalar(1.0);
            let pad = g.sub(&one, &mask3);
            let big = g.float_scalar(-1e9);
            let fill = g.mul(&pad, &big);
            let filled = g.add(hidden, &fill);
            g.reduce("ReduceMax", &filled, &[1], false)
        }
        Pooling::LastToken => {
            // The last position whose mask is 1: argmax of mask * (position + 1),
            // selected by a one-hot product (left or right padding).
            let shape = g.unary("Shape", &inputs.input_ids);
            let one_i = g.int_scalar(1);
            let t = g.gather(&shape, &one_i, 0);
            let start = g.int_scalar(1);
            let end = g.add(&t, &one_i);
            let positions = g.node("Range", &[&start, &end, &one_i], vec![]); // 1..=T
            let positions = g.cast(&positions, DataType::Float);
            let weighted = g.mul(&mask, &positions); // (B, T)
            let last = g.node(
                "ArgMax",
                &[&weighted],
                vec![
                    crate::graph::attr_int("axis", 1),
                    crate::graph::attr_int("keepdims", 1),
                ],
            ); // (B, 1)
            let zero = g.int_scalar(0);
            let index_range = g.node("Range", &[&zero, &t, &one_i], vec![]); // 0..T
            let one_hot = g.node("Equal", &[&index_range, &last], vec![]); // (B, T)
            let one_hot = g.cast(&one_hot, DataType::Float);
            let one_hot = g.unsqueeze(&one_hot, &[2]);
            let picked = g.mul(hidden, &one_hot);
            g.reduce("ReduceSum", &picked, &[1], false)
        }
    };
    let mut dimension = hidden_size;
    for module in &sentence.post_pooling {
        match module {
            PostPooling::Dense(dense) => {
                if dense.in_features != dimension {
                    return Err(Error::Export(format!(
                        "{}: Dense in_features {} does not match the {dimension} features before it",
                        dense.dir.display(),
                        dense.in_features
                    )));
                }
                let tensors = effir_pipeline::io::weights::load_all_tensors(&dense.dir)?;
                let w = Weights::new(tensors, "", &dense.dir);
                x = linear(
                    g,
                    &w,
                    &x,
                    "linear",
                    dense.in_features,
                    dense.out_features,
                    dense.bias,
                )?;
                if dense.activation == DenseActivation::Tanh {
                    x = g.unary("Tanh", &x);
                }
                dimension = dense.out_features;
            }
            PostPooling::Normalize => {
                // x / max(||x||, 1e-12), as torch.nn.functional.normalize.
                let square = g.mul(&x, &x);
                let sum = g.reduce("ReduceSum", &square, &[1], true);
                let norm = g.unary("Sqrt", &sum);
                let floor = g.float_scalar(1e-12);
                let norm = g.node("Max", &[&norm, &floor], vec![]);
                x = g.div(&x, &norm);
            }
        }
    }
    Ok((x, dimension))
}
