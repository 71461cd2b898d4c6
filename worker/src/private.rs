//! What of the server no task may read: the files holding secrets (the access-token
//! secret, the standalone catalogue, the worker's spool) and the folders that hold them
//! are its user's alone (0600 and 0700, tightened at every start), and the process itself
//! is closed to /proc readers of the same user ([`seal_process`]).

use std::path::Path;

use anyhow::Context;

/// Makes the process non-dumpable: its /proc/<pid>/environ, mem, maps, fd… are then
/// root's (for readers without CAP_SYS_PTRACE), and a process of the same user (a task
/// run by a worker that is not root) can neither read nor ptrace it. Children start
/// dumpable again at exec. Logged, not fatal, where it cannot be done.
pub fn seal_process() {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot close this process to /proc readers (PR_SET_DUMPABLE)");
    }
}

/// Whether [`seal_process`] holds (Linux); None elsewhere.
pub fn sealed() -> Option<bool> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let sealed = nix::sys::prctl::get_dumpable()
        .ok()
        .map(|dumpable| !dumpable);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let sealed = None;
    sealed
}

/// A folder for the server's user alone (0700): made if missing, tightened if not.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    set_mode(dir, 0o700)
}

/// Tightens a file to its owner alone (0600), if it exists.
pub fn private_file(file: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(file) {
        Ok(meta) if meta.file_type().is_file() => set_mode(file, 0o600),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
    }
}

/// Writes a new file readable by its owner alone (0600 from its creation, not after).
pub fn write_private(file: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut opened = options
        .open(file)
        .with_context(|| format!("writing {}", file.display()))?;
    opened.write_all(contents)?;
    private_file(file)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", path.display()))
    }
    #[cfg(not(unix))]
    {
        let _ = (path, mode);
        Ok(())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn secrets_are_written_private_and_loose_ones_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&data).unwrap();
        assert_eq!(mode(&data), 0o700);
        let secret = data.join("secret");
        write_private(&secret, b"s").unwrap();
        assert_eq!(mode(&secret), 0o600);
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        private_file(&secret).unwrap();
        assert_eq!(mode(&secret), 0o600);
        private_file(&data.join("absent")).unwrap();
    }

    #[test]
    fn a_sealed_process_says_so() {
        seal_process();
        assert_eq!(sealed(), Some(true));
    }
}
