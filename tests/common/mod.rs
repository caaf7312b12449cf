//! What the launch tests share.

use std::path::Path;

/// The model and optimizer files of `run`'s checkpoint at `step`, for bitwise comparisons.
pub fn tensors(run: &Path, step: u64) -> Vec<Vec<u8>> {
    let dir = run.join(format!("checkpoints/step-{step:08}"));
    ["model.safetensors", "optimizer.safetensors"]
        .iter()
        .map(|f| {
            std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{}/{f}: {e}", dir.display()))
        })
        .collect()
}
