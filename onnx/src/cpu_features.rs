//! The CPU's vector and integer dot-product instructions, as ONNX Runtime's
//! int8 kernels care about them: recorded when a graph is exported and when
//! it is validated, because an int8 graph's accuracy (u8×s8 saturation
//! without VNNI) and speed depend on them.

use serde::{Deserialize, Serialize};

/// Which of the instructions that decide int8 behaviour the CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub avx512: bool,
    /// AVX-512 VNNI or AVX-VNNI: 8-bit dot products without 16-bit
    /// intermediate sums, so u8×s8 cannot saturate.
    pub vnni: bool,
    pub neon: bool,
}

impl CpuFeatures {
    /// The features of the CPU this runs on.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            Self {
                avx2: std::arch::is_x86_feature_detected!("avx2"),
                avx512: std::arch::is_x86_feature_detected!("avx512f"),
                vnni: std::arch::is_x86_feature_detected!("avx512vnni")
                    || std::arch::is_x86_feature_detected!("avxvnni"),
                neon: false,
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            Self {
                avx2: false,
                avx512: false,
                vnni: false,
                neon: std::arch::is_aarch64_feature_detected!("neon"),
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            Self {
                avx2: false,
                avx512: false,
                vnni: false,
                neon: false,
            }
        }
    }

    /// Whether u8×s8 int8 products can saturate here: x86 with AVX2 or
    /// AVX-512 but without VNNI.
    pub fn u8s8_may_saturate(&self) -> bool {
        (self.avx2 || self.avx512) && !self.vnni
    }
}

impl std::fmt::Display for CpuFeatures {
    /// The features present, e.g. `avx2 avx512 vnni`, or `none`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = [
            (self.avx2, "avx2"),
            (self.avx512, "avx512"),
            (self.vnni, "vnni"),
            (self.neon, "neon"),
        ]
        .into_iter()
        .filter_map(|(present, name)| present.then_some(name))
        .collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(" "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturation_risk_follows_vnni() {
        let avx2 = CpuFeatures {
            avx2: true,
            avx512: false,
            vnni: false,
            neon: false,
        };
        assert!(avx2.u8s8_may_saturate());
        assert!(!CpuFeatures { vnni: true, ..avx2 }.u8s8_may_saturate());
        let arm = CpuFeatures {
            avx2: false,
            neon: true,
            ..avx2
        };
        assert!(!arm.u8s8_may_saturate());
    }
}
