//! Atomic file writes: everything is written to a temporary file beside the target, synced,
//! and renamed over it, so an interrupted write never leaves a file that looks complete.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use tempfile::NamedTempFile;

/// A file being written; it appears under its final name only on [`AtomicFile::commit`].
/// Dropped without a commit, the temporary file is removed.
pub struct AtomicFile {
    tmp: NamedTempFile,
    path: PathBuf,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| anyhow!("{} is not a file path", path.display()))?;
        let dir = parent_dir(path);
        let tmp = staging(&format!(".{}.", name.to_string_lossy()), 0o644)
            .tempfile_in(&dir)
            .with_context(|| format!("cannot create a file in {}", dir.display()))?;
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
        })
    }

    pub fn file(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    /// Syncs the data, renames the file into place and syncs the directory entry.
    pub fn commit(self) -> Result<()> {
        let path = self.path;
        let context = || format!("cannot write {}", path.display());
        self.tmp.as_file().sync_all().with_context(context)?;
        self.tmp
            .persist(&path)
            .map_err(|e| e.error)
            .with_context(context)?;
        // The rename is durable only once the directory is synced; not every platform lets
        // a directory be opened for that, so a failure here is not an error.
        if let Ok(dir) = File::open(parent_dir(&path)) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file = AtomicFile::create(path)?;
    file.file()
        .write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.commit()
}

/// Temporary names are `.<name>.<random>.tmp`, beside the final name. Temporary
/// files are private by default; outputs get the ordinary `mode` instead.
fn staging(prefix: &str, mode: u32) -> tempfile::Builder<'_, 'static> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(mode));
    }
    #[cfg(not(unix))]
    let _ = mode;
    builder
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl std::io::Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tmp.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tmp.flush()
    }
}

/// A directory being filled; it appears under its final name only on [`AtomicDir::commit`]
/// (a directory rename is atomic). Dropped without a commit, it is removed.
pub struct AtomicDir {
    tmp: tempfile::TempDir,
    path: PathBuf,
}

impl AtomicDir {
    /// Starts the directory `path`, which must not exist yet.
    pub fn create(path: &Path) -> Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| anyhow!("{} is not a directory path", path.display()))?;
        let parent = parent_dir(path);
        let tmp = staging(&format!(".{}.", name.to_string_lossy()), 0o755)
            .tempdir_in(&parent)
            .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
        })
    }

    /// Where to write the directory's files until the commit.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Renames the directory into place and syncs its parent.
    pub fn commit(self) -> Result<()> {
        let tmp = self.tmp.keep();
        if let Err(e) = std::fs::rename(&tmp, &self.path) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e).with_context(|| format!("cannot create {}", self.path.display()));
        }
        if let Ok(dir) = File::open(parent_dir(&self.path)) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}
