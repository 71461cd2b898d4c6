//! The package cache: each package is fetched once by its sha256, verified, unpacked
//! with the same checks as at upload (no absolute paths, no `..`, no links out, size
//! limits), and kept under `<data_dir>/packages/<sha256>` for every later run.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use cloudtask_core::archive::{self, Limits};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::client::{ApiClient, CallError};

pub struct Packages {
    root: PathBuf,
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
        source: archive::ArchiveError,
    },
    #[error("package cache: {0}")]
    Io(#[from] std::io::Error),
}

/// Marks a fully unpacked package folder.
const COMPLETE: &str = ".cloudtask-complete";

impl Packages {
    pub fn new(data_dir: &std::path::Path, limits: Limits, client: Arc<ApiClient>) -> Self {
        Packages {
            root: data_dir.join("packages"),
            limits,
            client,
            fetching: Mutex::new(()),
            ready: Default::default(),
        }
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
        let unpacked =
            tokio::task::spawn_blocking(move || archive::unpack(&bytes, &target, &limits))
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
        tokio::fs::rename(&staging, &folder).await?;
        Ok(folder)
    }
}
