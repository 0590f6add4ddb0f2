//! Training checkpoints: the trainable weights, the optimizer's moments and
//! the loop's position (step, epoch, place in the data order, random state),
//! written atomically as `step-NNNNNNN/` directories. `state.json` is the
//! last file written, so a directory without it is incomplete and ignored.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where the loop stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Optimizer steps done.
    pub step: usize,
    pub epoch: usize,
    /// Examples of the current epoch's order already used.
    pub position: usize,
    /// The sampler's random state.
    pub rng: u64,
    /// Where the unlabeled texts a combined run adds to its labeled batches
    /// (`text_batch_size`) stand: their own epochs and order.
    #[serde(default)]
    pub text_epoch: usize,
    #[serde(default)]
    pub text_position: usize,
    pub adam_step: u64,
    /// Best development score so far and its step.
    pub best: Option<(f64, usize)>,
    /// Hash of the training examples and settings that fix the data order.
    pub data_fingerprint: String,
}

/// A checkpoint's contents.
pub struct Checkpoint {
    pub state: LoopState,
    pub weights: HashMap<String, Tensor>,
    pub first: BTreeMap<String, Tensor>,
    pub second: BTreeMap<String, Tensor>,
}

const WEIGHTS: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

fn step_dir(root: &Path, step: usize) -> PathBuf {
    root.join(format!("step-{step:07}"))
}

/// Writes a checkpoint for `state.step` under `root`, then removes all but
/// the newest `keep`.
pub fn save(
    root: &Path,
    state: &LoopState,
    weights: &HashMap<String, Tensor>,
    first: &BTreeMap<String, Tensor>,
    second: &BTreeMap<String, Tensor>,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let staging = crate::io::atomic_file::output_builder(".effir-checkpoint-", true)
        .tempdir_in(root)
        .map_err(|e| Error::io(root, e))?;
    let w = staging.path().join(WEIGHTS);
    crate::io::atomic_file::save_safetensors(weights, &w)?;
    let mut moments: HashMap<String, Tensor> = HashMap::new();
    for (k, v) in first {
        moments.insert(format!("m.{k}"), v.clone());
    }
    for (k, v) in second {
        moments.insert(format!("v.{k}"), v.clone());
    }
    let o = staging.path().join(OPTIMIZER);
    crate::io::atomic_file::save_safetensors(&moments, &o)?;
    let s = staging.path().join(STATE);
    let json = serde_json::to_string_pretty(state).expect("state serialises");
    std::fs::write(&s, json).map_err(|e| Error::io(&s, e))?;
    let dir = step_dir(root, state.step);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    let staged = staging.keep();
    std::fs::rename(&staged, &dir).map_err(|e| Error::io(&dir, e))?;
    // Prune old checkpoints.
    let steps = list(root)?;
    if steps.len() > keep.max(1) {
        for (_, old) in &steps[..steps.len() - keep.max(1)] {
            std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
        }
    }
    Ok(dir)
}

/// Complete checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<(usize, PathBuf)>> {
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
        let entry = entry.map_err(|e| Error::io(root, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<usize>().ok())
        {
            if entry.path().join(STATE).is_file() {
                out.push((n, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the checkpoint in `dir`.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    let s = dir.join(STATE);
    let state: LoopState = crate::io::json_file::read_json(&s)?;
    let w = dir.join(WEIGHTS);
    let weights =
        candle_core::safetensors::load(&w, &Device::Cpu).map_err(|e| Error::weights(&w, e))?;
    let o = dir.join(OPTIMIZER);
    let moments =
        candle_core::safetensors::load(&o, &Device::Cpu).map_err(|e| Error::weights(&o, e))?;
    let mut first = BTreeMap::new();
    let mut second = BTreeMap::new();
    for (k, v) in moments {
        if let Some(name) = k.strip_prefix("m.") {
            first.insert(name.to_string(), v);
        } else if let Some(name) = k.strip_prefix("v.") {
            second.insert(name.to_string(), v);
        }
    }
    Ok(Checkpoint {
        state,
        weights,
        first,
        second,
    })
}

/// Rewrites the run's step log (`train_log.jsonl`, one JSON object with a
/// `step` per line) as of checkpoint `through_step`: each step once, the
/// latest line written for it, in order, and nothing after it. A killed
/// run's steps past its last checkpoint, which the resumed run repeats, and
/// the lines of an earlier run that never checkpointed go. A missing log
/// is left missing.
pub fn trim_step_log(path: &Path, through_step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut by_step: BTreeMap<usize, &str> = BTreeMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let step = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step")?.as_u64())
            .ok_or_else(|| Error::config(path, format!("line {}: no step number", i + 1)))?;
        if step as usize <= through_step {
            by_step.insert(step as usize, line);
        }
    }
    let mut kept = String::new();
    for line in by_step.values() {
        kept.push_str(line);
        kept.push('\n');
    }
    crate::io::atomic_file::write_bytes_atomically(path, kept.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint written before combined runs could carry unlabeled
    /// texts has no place among them: it resumes there at the start.
    #[test]
    fn an_older_loop_state_without_the_texts_place_still_loads() {
        let old = r#"{"step": 3, "epoch": 0, "position": 48, "rng": 7, "adam_step": 3,
                      "best": null, "data_fingerprint": "abc"}"#;
        let state: LoopState = serde_json::from_str(old).unwrap();
        assert_eq!((state.step, state.position), (3, 48));
        assert_eq!((state.text_epoch, state.text_position), (0, 0));
    }

    /// After a kill at step 5 and a resume from the step-3 checkpoint, and
    /// with two lines of an earlier run that never checkpointed, the log
    /// holds steps 1 to 3 once each, the latest lines.
    #[test]
    fn a_resumed_runs_log_holds_each_step_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("train_log.jsonl");
        let line = |step: usize, run: &str| format!("{{\"step\":{step},\"run\":\"{run}\"}}\n");
        let mut text = line(1, "earlier") + &line(2, "earlier");
        for step in 1..=5 {
            text += &line(step, "killed");
        }
        std::fs::write(&log, text).unwrap();
        trim_step_log(&log, 3).unwrap();
        let expected = line(1, "killed") + &line(2, "killed") + &line(3, "killed");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), expected);
        trim_step_log(&dir.path().join("missing.jsonl"), 3).unwrap();
        std::fs::write(&log, "{\"loss\": 1}\n").unwrap();
        assert!(trim_step_log(&log, 3).is_err(), "a line without a step");
    }
}
