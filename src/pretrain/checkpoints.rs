//! A run's checkpoints: `checkpoints/step-NNNNNNNN/` folders that appear whole or not at all
//! (staged under a hidden name, then renamed), the latest few kept.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::CHECKPOINTS_DIR;

/// Complete checkpoint folders of a run, with their steps.
pub(super) fn checkpoint_dirs(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = dir.join(CHECKPOINTS_DIR);
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in
        std::fs::read_dir(&root).with_context(|| format!("cannot read {}", root.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        // Staging folders start with a dot and never match.
        if let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|s| s.parse().ok())
        {
            found.push((step, entry.path()));
        }
    }
    Ok(found)
}

/// Removes the hidden `.*.tmp` folders an interrupted checkpoint write or removal left.
pub(super) fn remove_staging_leftovers(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") && entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

pub(super) fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoint_dirs(dir)?
        .into_iter()
        .max()
        .map(|(_, path)| path))
}
