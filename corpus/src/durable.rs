//! Durable output: files are fsynced before anyone may rely on them, and a prepared directory
//! appears under its final name only when complete (built in a hidden staging directory
//! beside it, then renamed). A failed or killed run leaves at most a `.NAME.partial-PID`
//! directory, which the next run cleans up; never a half-written `NAME`.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::IoContext;
use crate::readers::hex;
use crate::{Error, Result};

/// Writes `bytes` to `path` and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).at(path)?;
    file.write_all(bytes).at(path)?;
    file.sync_all().at(path)
}

/// sha256 of a file's contents, in hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).at(path)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).at(path)?;
        if n == 0 {
            return Ok(hex(&hash.finalize()));
        }
        hash.update(&buf[..n]);
    }
}

fn sync_dir(path: &Path) -> Result<()> {
    // A rename is durable only once its directory is; Unix lets us fsync a directory handle.
    #[cfg(unix)]
    File::open(path).and_then(|dir| dir.sync_all()).at(path)?;
    let _ = path;
    Ok(())
}

/// A directory being built; removed on drop unless [`Staging::commit`] moved it into place.
pub struct Staging {
    dir: PathBuf,
    target: PathBuf,
    committed: bool,
}

fn sibling(target: &Path, tag: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    target.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

impl Staging {
    /// Checks that `target` may be replaced (absent, empty, or a previous output recognised by
    /// `marker`) and creates the staging directory beside it.
    pub fn new(target: &Path, marker: &str) -> Result<Self> {
        let target = if target.file_name().is_none() {
            target.canonicalize().at(target)?
        } else {
            target.to_path_buf()
        };
        if target.exists() {
            if !target.is_dir() {
                return Err(Error::Invalid(format!(
                    "{} exists and is not a directory",
                    target.display()
                )));
            }
            let empty = fs::read_dir(&target).at(&target)?.next().is_none();
            if !empty && !target.join(marker).exists() {
                return Err(Error::Invalid(format!(
                    "refusing to replace {}: it is not empty and has no {marker}, so it is not an earlier output; choose another --out",
                    target.display()
                )));
            }
        }
        let parent =
            target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs::create_dir_all(parent).at(parent)?;
        Self::remove_stale(&target);
        let dir = sibling(&target, "partial");
        if dir.exists() {
            fs::remove_dir_all(&dir).at(&dir)?;
        }
        fs::create_dir(&dir).at(&dir)?;
        Ok(Self { dir, target, committed: false })
    }

    /// Removes staging directories left by killed runs of earlier processes.
    fn remove_stale(target: &Path) {
        let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else { return };
        let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        let prefix = format!(".{}.partial-", name.to_string_lossy());
        let Ok(entries) = fs::read_dir(parent) else { return };
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = file_name.strip_prefix(&prefix) else { continue };
            // A staging directory of a live process (say, a concurrent run) is left alone.
            let alive = Path::new("/proc").join(pid).exists();
            if !alive {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }

    /// The directory to write into.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// fsyncs the staging directory and renames it to the target, replacing an earlier output.
    pub fn commit(mut self) -> Result<PathBuf> {
        sync_dir(&self.dir)?;
        let old = sibling(&self.target, "old");
        let replaced = self.target.exists();
        if replaced {
            fs::rename(&self.target, &old).at(&self.target)?;
        }
        fs::rename(&self.dir, &self.target).at(&self.target)?;
        self.committed = true;
        if let Some(parent) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        if replaced {
            fs::remove_dir_all(&old).at(&old)?;
        }
        Ok(self.target.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_replaces_an_earlier_output_and_drop_cleans_up() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let staging = Staging::new(&target, "manifest.json").unwrap();
        write_synced(&staging.path().join("manifest.json"), b"1").unwrap();
        staging.commit().unwrap();
        assert_eq!(fs::read(target.join("manifest.json")).unwrap(), b"1");

        let staging = Staging::new(&target, "manifest.json").unwrap();
        write_synced(&staging.path().join("manifest.json"), b"2").unwrap();
        let partial = staging.path().to_path_buf();
        drop(staging);
        assert!(!partial.exists());
        assert_eq!(
            fs::read(target.join("manifest.json")).unwrap(),
            b"1",
            "a failed run keeps the old output"
        );

        let staging = Staging::new(&target, "manifest.json").unwrap();
        write_synced(&staging.path().join("manifest.json"), b"3").unwrap();
        staging.commit().unwrap();
        assert_eq!(fs::read(target.join("manifest.json")).unwrap(), b"3");
        let leftovers: Vec<_> =
            fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, ["out"]);
    }

    #[test]
    fn refuses_to_replace_foreign_directories() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("precious.txt"), "keep").unwrap();
        let err = Staging::new(root.path(), "manifest.json").err().unwrap().to_string();
        assert!(err.contains("refusing to replace"), "{err}");
    }

    #[test]
    fn stale_partials_of_dead_processes_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let stale = root.path().join(".out.partial-999999999");
        fs::create_dir(&stale).unwrap();
        let _staging = Staging::new(&root.path().join("out"), "manifest.json").unwrap();
        assert!(!stale.exists());
    }
}
