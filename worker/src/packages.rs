//! The package cache: each package is fetched once by its sha256, verified, unpacked
//! with the same checks as at upload (core's archive walk: no absolute paths, no `..`,
//! no links out, size limits), and kept under `<run area>/packages/<sha256>` (outside the
//! data folder, see [`crate::exec::identity`]) for every later run; a worker that is root
//! hands each folder to the run user once it is complete.

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cloudtask_core::archive::{self, ArchiveError, ArchiveSummary, Limits};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::client::{ApiClient, CallError};
use crate::exec::identity::{RunArea, RunIdentity, hand_over};

pub struct Packages {
    root: PathBuf,
    /// Whom runs run as: the owner of their folders.
    identity: Arc<RunIdentity>,
    limits: Limits,
    client: Arc<ApiClient>,
    /// One fetch at a time: two runs of a new package wait for one download.
    fetching: Mutex<()>,
    /// Folders known to be ready (by package hash; "" for no package): a run of a
    /// cached package starts after a stat or two, not a trip through the blocking pool.
    ready: std::sync::Mutex<HashSet<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("cannot fetch package {sha256}: {source}")]
    Fetch { sha256: String, source: CallError },
    #[error("package {sha256} does not match its hash (got {actual})")]
    HashMismatch { sha256: String, actual: String },
    #[error("package {sha256} refused: {source}")]
    Unsafe {
        sha256: String,
        source: ArchiveError,
    },
    #[error("package cache: {0}")]
    Io(#[from] std::io::Error),
}

/// Marks a fully unpacked package folder.
const COMPLETE: &str = ".cloudtask-complete";

impl Packages {
    pub fn new(area: &RunArea, limits: Limits, client: Arc<ApiClient>) -> Self {
        Packages {
            root: area.packages(),
            identity: area.identity.clone(),
            limits,
            client,
            fetching: Mutex::new(()),
            ready: Default::default(),
        }
    }

    /// Whom the runs run as, and their home.
    pub fn identity(&self) -> Arc<RunIdentity> {
        self.identity.clone()
    }

    /// The folder a run of this package works in; with no package, an empty folder.
    pub async fn workdir(&self, sha256: Option<&str>) -> Result<PathBuf, PackageError> {
        if let Some(folder) = self.cached(sha256) {
            return Ok(folder);
        }
        let key = sha256.unwrap_or_default();
        let folder = self.prepare(sha256).await?;
        self.ready
            .lock()
            .expect("ready folders")
            .insert(key.to_owned());
        Ok(folder)
    }

    /// The folder, if it is ready now: one stat, no blocking-pool round trip and no
    /// download (the folder may have been removed behind the cache's back: then None).
    pub fn cached(&self, sha256: Option<&str>) -> Option<PathBuf> {
        let key = sha256.unwrap_or_default();
        if !self.ready.lock().expect("ready folders").contains(key) {
            return None;
        }
        let folder = self.folder(sha256);
        let marker = match sha256 {
            Some(_) => folder.join(COMPLETE),
            None => folder.clone(),
        };
        marker.exists().then_some(folder)
    }

    /// Where a package is unpacked; "none" is the empty folder of runs without one.
    fn folder(&self, sha256: Option<&str>) -> PathBuf {
        self.root.join(sha256.unwrap_or("none"))
    }

    async fn prepare(&self, sha256: Option<&str>) -> Result<PathBuf, PackageError> {
        let Some(sha256) = sha256 else {
            let empty = self.folder(None);
            tokio::fs::create_dir_all(&empty).await?;
            hand_over(&empty, self.identity.user)?;
            return Ok(empty);
        };
        let folder = self.folder(Some(sha256));
        if tokio::fs::try_exists(folder.join(COMPLETE)).await? {
            return Ok(folder);
        }
        let _one_at_a_time = self.fetching.lock().await;
        if tokio::fs::try_exists(folder.join(COMPLETE)).await? {
            return Ok(folder);
        }
        let bytes = self
            .client
            .package(sha256)
            .await
            .map_err(|source| PackageError::Fetch {
                sha256: sha256.to_owned(),
                source,
            })?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != sha256 {
            return Err(PackageError::HashMismatch {
                sha256: sha256.to_owned(),
                actual,
            });
        }
        let staging = self.root.join(format!(".staging-{sha256}"));
        let _ = tokio::fs::remove_dir_all(&staging).await;
        let _ = tokio::fs::remove_dir_all(&folder).await;
        tokio::fs::create_dir_all(&staging).await?;
        let limits = self.limits;
        let target = staging.clone();
        let unpacked = tokio::task::spawn_blocking(move || unpack(&bytes, &target, &limits))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if let Err(source) = unpacked {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            return Err(PackageError::Unsafe {
                sha256: sha256.to_owned(),
                source,
            });
        }
        tokio::fs::write(staging.join(COMPLETE), b"").await?;
        let (target, user) = (staging.clone(), self.identity.user);
        tokio::task::spawn_blocking(move || hand_over(&target, user))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        tokio::fs::rename(&staging, &folder).await?;
        Ok(folder)
    }
}

/// Unpack into `dest`, which must be an existing, empty directory, with exactly the
/// checks of [`archive::inspect`]. Files keep their executable bit (modes 0o755 or
/// 0o644). On error, whatever was already written into `dest` is removed.
fn unpack(bytes: &[u8], dest: &Path, limits: &Limits) -> Result<ArchiveSummary, ArchiveError> {
    let mut listing = std::fs::read_dir(dest)
        .map_err(|e| ArchiveError::Io(format!("{}: {e}", dest.display())))?;
    if listing.next().is_some() {
        return Err(ArchiveError::Io(format!(
            "destination {} is not empty",
            dest.display()
        )));
    }
    let mut sink = DirSink {
        root: dest.to_path_buf(),
    };
    let result = archive::walk(bytes, limits, &mut sink);
    if result.is_err() {
        clear_dir(dest);
    }
    result
}

/// Writes into a directory. Paths come from core's entry checks: they are relative,
/// free of `..`, never below a link and never seen before.
struct DirSink {
    root: PathBuf,
}

impl DirSink {
    /// Create the directories of `rel` below the root (each one checked not
    /// to be a link, as defence in depth) and return the full path.
    fn make_dirs(&self, rel: &str) -> io::Result<PathBuf> {
        let mut current = self.root.clone();
        for component in rel.split('/') {
            current.push(component);
            match std::fs::symlink_metadata(&current) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "a file or link is in the way",
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => create_dir(&current)?,
                Err(e) => return Err(e),
            }
        }
        Ok(current)
    }

    fn parent_of(&self, rel: &str) -> io::Result<PathBuf> {
        match rel.rsplit_once('/') {
            Some((parent, name)) => Ok(self.make_dirs(parent)?.join(name)),
            None => Ok(self.root.join(rel)),
        }
    }
}

impl archive::Sink for DirSink {
    fn dir(&mut self, path: &str) -> io::Result<()> {
        self.make_dirs(path).map(|_| ())
    }

    fn file(&mut self, path: &str, executable: bool) -> io::Result<Box<dyn Write>> {
        let full = self.parent_of(path)?;
        let mode = if executable { 0o755 } else { 0o644 };
        let file = create_file(&full, mode)?;
        Ok(Box::new(io::BufWriter::new(file)))
    }

    fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let full = self.parent_of(path)?;
        make_symlink(target, &full)
    }

    fn hard_link(&mut self, path: &str, target: &str) -> io::Result<()> {
        let full = self.parent_of(path)?;
        std::fs::hard_link(self.root.join(target), full)
    }
}

#[cfg(unix)]
fn create_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o755).create(path)
}

#[cfg(not(unix))]
fn create_dir(path: &Path) -> io::Result<()> {
    std::fs::create_dir(path)
}

#[cfg(unix)]
fn create_file(path: &Path, mode: u32) -> io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    // Exact mode, whatever the process umask.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(file)
}

#[cfg(not(unix))]
fn create_file(path: &Path, _mode: u32) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

#[cfg(unix)]
fn make_symlink(target: &str, link: &Path) -> io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn make_symlink(_target: &str, _link: &Path) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "symbolic links are not supported on this platform",
    ))
}

/// Best effort: remove everything inside `dir` (never following links).
fn clear_dir(dir: &Path) {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in listing.flatten() {
        let path = entry.path();
        let _ = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
    }
}

#[cfg(test)]
mod tests {
    use cloudtask_core::archive::samples::{
        self, raw_header, tar_gz_bomb, tar_gz_long_name, tar_gz_of, tar_gz_raw, zip_bomb, zip_of,
    };
    use tempfile::TempDir;

    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn limits() -> Limits {
        Limits {
            max_archive_bytes: 10 * MIB,
            max_unpacked_bytes: 10 * MIB,
            max_entries: 100,
        }
    }

    /// Unpack into `outer/dest` and check nothing appeared in `outer` except `dest`.
    fn unpack_contained(bytes: &[u8]) -> (Result<ArchiveSummary, ArchiveError>, TempDir) {
        let outer = TempDir::new().unwrap();
        let dest = outer.path().join("a").join("b").join("dest");
        std::fs::create_dir_all(&dest).unwrap();
        let result = unpack(bytes, &dest, &limits());
        assert_eq!(list(outer.path()), vec!["a", "a/b", "a/b/dest"]);
        (result, outer)
    }

    fn list(root: &Path) -> Vec<String> {
        fn go(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let entry = entry.unwrap();
                let rel = entry.path().strip_prefix(root).unwrap().to_owned();
                out.push(rel.to_string_lossy().into_owned());
                if entry.file_type().unwrap().is_dir() {
                    go(root, &entry.path(), out);
                }
            }
        }
        let mut out = Vec::new();
        go(root, root, &mut out);
        out.sort();
        out
    }

    #[cfg(unix)]
    #[test]
    fn unpack_writes_files_modes_and_links() {
        use std::os::unix::fs::PermissionsExt;
        let files: [(&str, &[u8], u32); 6] = [
            ("bin/", b"", 0o755),
            ("bin/run.sh", b"#!/bin/sh\n", 0o4775),
            ("lib/data.txt", b"data", 0o666),
            ("lib/current", b"../bin/run.sh", 0o120_777),
            ("./top.txt", b"top", 0o600),
            ("empty/", b"", 0o700),
        ];
        for bytes in [zip_of(&files), tar_gz_of(&files)] {
            let dest = TempDir::new().unwrap();
            let summary = unpack(&bytes, dest.path(), &limits()).unwrap();
            assert_eq!(summary.entries, 6);
            assert_eq!(
                summary.unpacked_bytes,
                archive::inspect(&bytes, &limits()).unwrap().unpacked_bytes
            );
            assert_eq!(
                list(dest.path()),
                vec![
                    "bin",
                    "bin/run.sh",
                    "empty",
                    "lib",
                    "lib/current",
                    "lib/data.txt",
                    "top.txt"
                ]
            );
            let mode = |p: &str| {
                std::fs::symlink_metadata(dest.path().join(p))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o7777
            };
            assert_eq!(mode("bin/run.sh"), 0o755);
            assert_eq!(mode("lib/data.txt"), 0o644);
            assert_eq!(mode("top.txt"), 0o644);
            assert_eq!(
                std::fs::read(dest.path().join("lib/current")).unwrap(),
                b"#!/bin/sh\n"
            );
            assert_eq!(
                std::fs::read_link(dest.path().join("lib/current")).unwrap(),
                Path::new("../bin/run.sh")
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn unpack_hard_link_inside() {
        let bytes = tar_gz_raw(&[
            (raw_header("a/f", tar::EntryType::Regular, "", 2), b"hi"),
            (raw_header("g", tar::EntryType::Link, "./a/f", 0), b""),
        ]);
        let dest = TempDir::new().unwrap();
        unpack(&bytes, dest.path(), &limits()).unwrap();
        assert_eq!(std::fs::read(dest.path().join("g")).unwrap(), b"hi");
    }

    #[test]
    fn unpack_requires_an_empty_destination() {
        let dest = TempDir::new().unwrap();
        std::fs::write(dest.path().join("x"), b"x").unwrap();
        let bytes = zip_of(&[("a", b"a", 0o644)]);
        assert!(matches!(
            unpack(&bytes, dest.path(), &limits()),
            Err(ArchiveError::Io(_))
        ));
        assert!(matches!(
            unpack(&bytes, &dest.path().join("missing"), &limits()),
            Err(ArchiveError::Io(_))
        ));
    }

    #[test]
    fn unpack_of_malicious_archives_stays_inside() {
        let cases = [
            samples::zip_slip(),
            samples::tar_absolute(),
            samples::zip_symlink_out(),
            tar_gz_of(&[("ok", b"ok", 0o644), ("../../evil", b"x", 0o644)]),
            zip_of(&[("ok", b"ok", 0o644), ("/tmp/evil-cloudtask", b"x", 0o644)]),
            tar_gz_of(&[("ok/l", b"../../..", 0o120_777)]),
            tar_gz_of(&[("d/l", b"..", 0o120_777), ("d/l/m", b"..", 0o120_777)]),
            tar_gz_of(&[("up", b"..", 0o120_777), ("up/evil", b"x", 0o644)]),
            tar_gz_raw(&[(raw_header("h", tar::EntryType::Link, "../x", 0), b"")]),
        ];
        for bytes in cases {
            let (result, outer) = unpack_contained(&bytes);
            assert!(result.is_err());
            // Everything partially written was removed again.
            assert!(list(&outer.path().join("a/b/dest")).is_empty());
        }
    }

    #[test]
    fn bombs_are_refused_and_cleared() {
        for bomb in [zip_bomb(100 * MIB), tar_gz_bomb(100 * MIB)] {
            let (result, _dir) = unpack_contained(&bomb);
            assert_eq!(
                result,
                Err(ArchiveError::UnpackedTooLarge { limit: 10 * MIB })
            );
        }
    }

    #[test]
    fn tar_long_names_are_unpacked() {
        let long = format!("{}/run.sh", "d".repeat(150));
        let dest = TempDir::new().unwrap();
        unpack(&tar_gz_long_name(&long, b"hi"), dest.path(), &limits()).unwrap();
        assert_eq!(std::fs::read(dest.path().join(&long)).unwrap(), b"hi");
    }
}
