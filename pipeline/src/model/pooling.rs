//! Pooling token states into one vector per text.

use candle_core::{DType, Result, Tensor, D};

/// How token states become a text embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The first token (`[CLS]`).
    Cls,
    /// Mean over non-padding tokens.
    Mean,
    /// Element-wise maximum over non-padding tokens.
    Max,
    /// Sum over non-padding tokens divided by the square root of their count.
    MeanSqrtLen,
    /// The last non-padding token (decoder retrievers); works with left and
    /// right padding.
    LastToken,
}

impl Pooling {
    pub const NAMES: &'static str = "cls, mean, max, mean_sqrt_len, last_token";

    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "cls" => Self::Cls,
            "mean" => Self::Mean,
            "max" => Self::Max,
            "mean_sqrt_len" => Self::MeanSqrtLen,
            "last_token" | "lasttoken" => Self::LastToken,
            _ => return None,
        })
    }

    /// Pools `hidden` `(B, T, H)` under `attention_mask` `(B, T)` (1 = token)
    /// into `(B, H)`.
    pub fn pool(self, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let mask = attention_mask.to_dtype(hidden.dtype())?; // (B, T)
        match self {
            Self::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
            Self::Mean | Self::MeanSqrtLen => {
                let sum = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?; // (B, H)
                                                                              // As sentence-transformers: clamp the count to 1e-9 (empty rows give 0).
                let count = mask.sum_keepdim(1)?.clamp(1e-9, f64::INFINITY)?; // (B, 1)
                let denom = if self == Self::Mean {
                    count
                } else {
                    count.sqrt()?
                };
                sum.broadcast_div(&denom)
            }
            Self::Max => {
                // Padding positions get -1e9, as sentence-transformers does.
                let fill = ((mask.ones_like()? - &mask)? * -1e9)?.unsqueeze(2)?;
                hidden.broadcast_add(&fill)?.max(1)
            }
            Self::LastToken => {
                // Index of the last position whose mask is 1: argmax of mask * (position + 1).
                let positions = Tensor::arange(1u32, t as u32 + 1, hidden.device())?
                    .to_dtype(DType::F32)?
                    .unsqueeze(0)?;
                let last = mask
                    .to_dtype(DType::F32)?
                    .broadcast_mul(&positions)?
                    .argmax(D::Minus1)?; // (B,)
                let index = last
                    .reshape((b, 1, 1))?
                    .broadcast_as((b, 1, h))?
                    .contiguous()?;
                hidden.gather(&index, 1)?.squeeze(1)
            }
        }
    }
}

impl Pooling {
    /// `(B, T)` f32: 1 at each position whose final hidden state this pooling
    /// reads, 0 elsewhere: every real token for mean, max and
    /// mean-sqrt-len, the first token for CLS, the last real token for
    /// last-token pooling (left or right padding). A text with no tokens
    /// has no position.
    pub fn read_positions(self, attention_mask: &Tensor) -> Result<Tensor> {
        let mask = attention_mask.to_dtype(DType::F32)?; // (B, T)
        let t = mask.dim(1)?;
        let positions = Tensor::arange(0u32, t as u32, mask.device())?
            .to_dtype(DType::F32)?
            .unsqueeze(0)?; // (1, T)
        let chosen = match self {
            Self::Mean | Self::Max | Self::MeanSqrtLen => return Ok(mask),
            Self::Cls => Tensor::zeros((1, 1), DType::F32, mask.device())?,
            Self::LastToken => {
                // As `pool`: argmax of mask * (position + 1).
                (mask
                    .broadcast_mul(&(&positions + 1.0)?)?
                    .argmax_keepdim(D::Minus1)?)
                .to_dtype(DType::F32)?
            }
        };
        positions
            .broadcast_eq(&chosen)?
            .to_dtype(DType::F32)?
            .broadcast_mul(&mask)
    }
}

impl std::fmt::Display for Pooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cls => "cls",
            Self::Mean => "mean",
            Self::Max => "max",
            Self::MeanSqrtLen => "mean_sqrt_len",
            Self::LastToken => "last_token",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn positions(pooling: Pooling, mask: &[[u32; 4]; 3]) -> Vec<Vec<f32>> {
        let mask = Tensor::new(mask, &Device::Cpu).unwrap();
        pooling.read_positions(&mask).unwrap().to_vec2().unwrap()
    }

    /// Rows: right padding, left padding, an empty text.
    const MASK: [[u32; 4]; 3] = [[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]];

    #[test]
    fn last_token_pooling_reads_the_last_real_token_on_either_padding_side() {
        assert_eq!(
            positions(Pooling::LastToken, &MASK),
            [[0., 0., 1., 0.], [0., 0., 0., 1.], [0.; 4]]
        );
    }

    #[test]
    fn cls_reads_the_first_position_and_mean_every_real_token() {
        assert_eq!(
            positions(Pooling::Cls, &MASK),
            [[1., 0., 0., 0.], [0.; 4], [0.; 4]]
        );
        for pooling in [Pooling::Mean, Pooling::Max, Pooling::MeanSqrtLen] {
            assert_eq!(
                positions(pooling, &MASK),
                [[1., 1., 1., 0.], [0., 1., 1., 1.], [0.; 4]]
            );
        }
    }
}
