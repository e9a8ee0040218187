//! # Crash-consistent checkpoints
//!
//! A checkpoint is a folder of three files — `model.safetensors` (parameters),
//! `optimizer.safetensors` (AdamW moments) and `state.json` (step, schedule, the caller's
//! config) — and it must never be seen half written. Under a checkpoint root:
//!
//! ```text
//! root/
//!   step-00000400/   model.safetensors  optimizer.safetensors  state.json   (complete)
//!   step-00000500/   …                                                         (complete)
//!   latest           "step-00000500"                                           (the pointer)
//! ```
//!
//! A save writes the three files into a fresh temporary folder, flushes each to disk, renames the
//! folder to `step-NNNNNNNN` (atomic), flushes the root, then replaces `latest` the same way
//! (write a temporary file, flush, rename). A crash or an I/O error at any point leaves the
//! previous complete checkpoint and its pointer as they were (a re-save of the same step moves
//! the old folder aside before the new one takes its name). The [`KEEP`] newest checkpoints up to
//! the one just written are kept; later ones (a previous run's) are removed.
//!
//! Every file records its step — the safetensors files in their metadata (`"step"`), `state.json`
//! in its `step` field — and loading refuses a folder whose files disagree, naming them.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// How many complete checkpoints a root keeps.
pub const KEEP: usize = 2;

/// The points of a save, in order; a test can make the save fail at any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    WriteModel,
    WriteOptimizer,
    WriteState,
    RenameFolder,
    WritePointer,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::WriteModel,
        Stage::WriteOptimizer,
        Stage::WriteState,
        Stage::RenameFolder,
        Stage::WritePointer,
    ];
}

/// What one checkpoint holds.
pub struct Contents<'a> {
    pub step: usize,
    pub model: &'a HashMap<String, Tensor>,
    pub optimizer: &'a HashMap<String, Tensor>,
    pub state: &'a serde_json::Value,
}

/// Writes `contents` under `root` as described in the module documentation.
pub fn save(root: &Path, contents: &Contents<'_>) -> Result<PathBuf> {
    save_failing_at(root, contents, None)
}

/// [`save`], failing with an injected I/O error at `fault` (for fault-injection tests).
pub fn save_failing_at(root: &Path, c: &Contents<'_>, fault: Option<Stage>) -> Result<PathBuf> {
    let check = |stage: Stage| -> Result<()> {
        if fault == Some(stage) {
            bail!("injected I/O error at {stage:?}");
        }
        Ok(())
    };
    std::fs::create_dir_all(root)
        .with_context(|| format!("creating checkpoint root {}", root.display()))?;
    let name = folder_name(c.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp)?;
    check(Stage::WriteModel)?;
    write_tensors(&tmp.join("model.safetensors"), c.model, c.step)?;
    check(Stage::WriteOptimizer)?;
    write_tensors(&tmp.join("optimizer.safetensors"), c.optimizer, c.step)?;
    check(Stage::WriteState)?;
    write_synced(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(c.state)?.as_bytes(),
    )?;
    sync_dir(&tmp)?;
    check(Stage::RenameFolder)?;
    let dest = root.join(&name);
    if dest.exists() {
        // A re-save of the same step: move the old folder aside first, so that a crash leaves
        // either folder complete under the name `latest` may point at.
        let old = root.join(format!(".old-{name}-{}", std::process::id()));
        std::fs::rename(&dest, &old)?;
        std::fs::rename(&tmp, &dest)?;
        sync_dir(root)?;
        std::fs::remove_dir_all(&old).ok();
    } else {
        std::fs::rename(&tmp, &dest)?;
        sync_dir(root)?;
    }
    check(Stage::WritePointer)?;
    write_synced(&root.join("latest.tmp"), name.as_bytes())?;
    std::fs::rename(root.join("latest.tmp"), root.join("latest"))?;
    sync_dir(root)?;
    prune(root, &name, KEEP);
    Ok(dest)
}

/// `step-NNNNNNNN`.
pub fn folder_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// The folder of the latest complete checkpoint under `root`, or `None` when there is none.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    let pointer = root.join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer)
        .with_context(|| format!("reading {}", pointer.display()))?;
    let dir = root.join(name.trim());
    if !dir.is_dir() {
        bail!(
            "{} points at {}, which does not exist",
            pointer.display(),
            dir.display()
        );
    }
    Ok(Some(dir))
}

/// A loaded checkpoint whose three files agree on the step.
pub struct Loaded {
    pub dir: PathBuf,
    pub step: usize,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub state: serde_json::Value,
}

/// Reads the checkpoint folder `dir`, refusing it when its files record different steps.
pub fn load(dir: &Path, device: &candle_core::Device) -> Result<Loaded> {
    let state_path = dir.join("state.json");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&state_path)
            .with_context(|| format!("no checkpoint at {} (state.json missing)", dir.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", state_path.display()))?;
    let step = state["step"]
        .as_u64()
        .with_context(|| format!("{} has no step", state_path.display()))? as usize;
    let read = |file: &str| -> Result<HashMap<String, Tensor>> {
        let path = dir.join(file);
        let recorded = recorded_step(&path)?;
        if recorded != step {
            bail!(
                "checkpoint {} is inconsistent: {file} is from step {recorded}, state.json from step {step}",
                dir.display()
            );
        }
        candle_core::safetensors::load(&path, device)
            .with_context(|| format!("reading {} (truncated or corrupt?)", path.display()))
    };
    let model = read("model.safetensors")?;
    let optimizer = read("optimizer.safetensors")?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        step,
        model,
        optimizer,
        state,
    })
}

/// The step a safetensors file of a checkpoint records in its metadata.
pub fn recorded_step(path: &Path) -> Result<usize> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a safetensors file: {e}", path.display()))?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .with_context(|| format!("{} records no step", path.display()))?;
    step.parse()
        .with_context(|| format!("{}: step '{step}' is not a number", path.display()))
}

fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>, step: usize) -> Result<()> {
    let meta = HashMap::from([("step".to_string(), step.to_string())]);
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    safetensors::serialize_to_file(sorted, Some(meta), path)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    std::fs::File::open(path)?.sync_all()?;
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Removes leftovers of failed saves and all complete checkpoints but the newest `keep` at or
/// below `latest` (the one just written); folders of later steps (an older run's, in a folder a
/// fresh run reuses) go too. Best effort: a folder that cannot be removed stays.
fn prune(root: &Path, latest: &str, keep: usize) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut steps: Vec<String> = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(".tmp-step-") || name.starts_with(".old-step-") {
            std::fs::remove_dir_all(&path).ok(); // left by a save that failed
        } else if name.starts_with("step-") && path.is_dir() {
            steps.push(name);
        }
    }
    steps.sort();
    let kept: Vec<&String> = steps
        .iter()
        .filter(|s| s.as_str() <= latest)
        .rev()
        .take(keep)
        .collect();
    for s in &steps {
        if !kept.contains(&s) {
            std::fs::remove_dir_all(root.join(s)).ok();
        }
    }
}
