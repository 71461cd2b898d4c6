//! Who a run is and where it works. Runs work under `run_dir`, outside the data folder,
//! in `<run_dir>/<cluster id>/<worker name>`. A worker that is root runs them as an
//! unprivileged user of their cluster's own (`run_user`), without supplementary groups,
//! and lays the folders out so that only that user (and root) can reach them:
//!
//! ```text
//! <run_dir>                root 0711; uids/ (root 0700): which cluster holds which id
//!   <cluster>              root:<run group> 0710: the wall between clusters
//!     <worker>             root 0755
//!       packages/          root 0755: the run user cannot swap what is in it
//!         <sha256>/, none/ the run user's: a run's working folder
//!       home/              the run user's, 0700: HOME and TMPDIR
//! ```
//!
//! A worker that is not root runs tasks as itself, in the same folders (0700): they are
//! away from the data folder, but nothing stops a task from reading what its user can.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
#[cfg(unix)]
use anyhow::bail;
use cloudtask_core::config::Config;
#[cfg(unix)]
use cloudtask_core::config::RunUser;
use tokio::process::Command;

/// The user a worker's runs take, and their home.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunIdentity {
    /// User and group id of the runs; None: the worker's own.
    pub user: Option<(u32, u32)>,
    /// HOME and TMPDIR of the runs; None: neither is set.
    pub home: Option<PathBuf>,
}

/// One worker's run folders, ready.
#[derive(Debug, Clone)]
pub struct RunArea {
    /// `<run_dir>/<cluster>/<worker>`.
    pub dir: PathBuf,
    pub identity: Arc<RunIdentity>,
}

impl RunArea {
    /// Where packages are unpacked, one folder each (a run's working folder).
    pub fn packages(&self) -> PathBuf {
        self.dir.join("packages")
    }
}

/// The command that starts `shell` (a program by its path, then its arguments) as the
/// run's user.
///
/// The user is taken by exec'ing `setpriv` (util-linux) in front of the shell, not by the
/// standard library's `uid`/`gid`: with those it forks the whole worker (page tables,
/// copy-on-write faults and all, on a runtime thread) for every run, where otherwise it
/// uses `posix_spawn` (the worker's memory is shared until the exec). Measured: a worker
/// starting `true` for hundreds of tasks a second fell from ~1,500 runs/s to ~100. Where
/// there is no `setpriv`, the standard library's way is used, and said once.
pub(super) fn command_as(identity: &RunIdentity, shell: &[&std::ffi::OsStr]) -> Command {
    let (program, args) = shell.split_first().expect("a program");
    #[cfg(unix)]
    let command = match (identity.user, setpriv()) {
        (Some((uid, gid)), Some(setpriv)) => {
            let mut c = Command::new(setpriv);
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg("--")
                .arg(program)
                .args(args);
            c
        }
        (Some((uid, gid)), None) => {
            let mut c = Command::new(program);
            // As root, the standard library also drops every supplementary group.
            c.args(args).uid(uid).gid(gid);
            c
        }
        (None, _) => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    };
    #[cfg(not(unix))]
    let command = {
        let _ = identity;
        let mut c = Command::new(program);
        c.args(args);
        c
    };
    command
}

/// The path of util-linux's `setpriv`, if this machine has it (looked up once).
#[cfg(unix)]
fn setpriv() -> Option<&'static Path> {
    static FOUND: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            let found = [
                "/usr/bin/setpriv",
                "/bin/setpriv",
                "/usr/sbin/setpriv",
                "/sbin/setpriv",
            ]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file());
            if found.is_none() {
                tracing::warn!(
                    "no setpriv (util-linux) found: runs as the run user are started by forking \
                     the worker, which is slow with many runs"
                );
            }
            found
        })
        .as_deref()
}

/// Makes the worker's run folders (see the module's doc) and settles whom its runs run
/// as: the cluster's id of the `run_user` range, claimed on first use.
#[cfg(unix)]
pub fn prepare(config: &Config, cluster: &str, worker: &str) -> anyhow::Result<RunArea> {
    let root = config.run_dir();
    let as_root = nix::unistd::geteuid().is_root();
    folder_of_ours(&root)?;
    set_mode(&root, if as_root { 0o711 } else { 0o700 })?;
    let user = if as_root {
        let user = run_user(config, &root, cluster)?;
        reachable(&root, user.0)?;
        Some(user)
    } else {
        None
    };
    let cluster_dir = root.join(cluster);
    let area = cluster_dir.join(worker);
    let home = area.join("home");
    for (dir, mode) in [
        (&cluster_dir, if as_root { 0o710 } else { 0o700 }),
        (&area, if as_root { 0o755 } else { 0o700 }),
        (&area.join("packages"), if as_root { 0o755 } else { 0o700 }),
    ] {
        folder_of_ours(dir)?;
        set_mode(dir, mode)?;
    }
    if let Some((_, gid)) = user {
        std::os::unix::fs::lchown(&cluster_dir, Some(0), Some(gid))
            .with_context(|| format!("giving {} to group {gid}", cluster_dir.display()))?;
    }
    make_dir(&home)?;
    hand_over_one(&home, user)?;
    set_mode(&home, 0o700)?;
    Ok(RunArea {
        dir: area,
        identity: Arc::new(RunIdentity {
            user,
            home: Some(home),
        }),
    })
}

#[cfg(not(unix))]
pub fn prepare(config: &Config, cluster: &str, worker: &str) -> anyhow::Result<RunArea> {
    let area = config.run_dir().join(cluster).join(worker);
    let home = area.join("home");
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    std::fs::create_dir_all(area.join("packages"))?;
    Ok(RunArea {
        dir: area,
        identity: Arc::new(RunIdentity {
            user: None,
            home: Some(home),
        }),
    })
}

/// Gives a folder made by the worker (a package, unpacked) to the run user: every entry,
/// deepest first, without following links. A folder is handed over only once all it
/// holds is, so the user never holds a folder with an entry the walk has yet to reach
/// (and could swap for a link to elsewhere).
pub fn hand_over(dir: &Path, user: Option<(u32, u32)>) -> std::io::Result<()> {
    if user.is_none() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            hand_over(&entry.path(), user)?;
        } else {
            hand_over_one(&entry.path(), user)?;
        }
    }
    hand_over_one(dir, user)
}

fn hand_over_one(path: &Path, user: Option<(u32, u32)>) -> std::io::Result<()> {
    #[cfg(unix)]
    if let Some((uid, gid)) = user {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    }
    #[cfg(not(unix))]
    let _ = (path, user);
    Ok(())
}

/// A folder only this worker's user controls: made if missing, and refused if it is a
/// link or someone else's (a folder planted in a shared place such as /tmp).
#[cfg(unix)]
fn folder_of_ours(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    make_dir(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.file_type().is_dir() || meta.uid() != me {
        bail!(
            "run_dir: {} must be a folder of this worker's user (uid {me}), not a link or \
             another user's: remove it or set run_dir elsewhere",
            dir.display()
        );
    }
    Ok(())
}

fn make_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// Whether the run user can get to `run_dir`: every folder above it must let others in.
#[cfg(unix)]
fn reachable(root: &Path, uid: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let root = std::fs::canonicalize(root)?;
    for folder in root.ancestors().skip(1) {
        let mode = std::fs::metadata(folder)?.permissions().mode();
        if mode & 0o001 == 0 {
            bail!(
                "run_dir: runs as uid {uid} could not reach {}: {} is closed to other users; \
                 set run_dir to a folder whose parents others may enter (e.g. /var/lib/cloudtask-runs)",
                root.display(),
                folder.display()
            );
        }
    }
    Ok(())
}

/// The user and group of this worker's runs, from `run_user`.
#[cfg(unix)]
fn run_user(config: &Config, root: &Path, cluster: &str) -> anyhow::Result<(u32, u32)> {
    use nix::unistd::{Uid, User};
    let user = match RunUser::parse(&config.run_user).map_err(anyhow::Error::msg)? {
        RunUser::Range { first, last } => claim(root, cluster, first, last)?,
        RunUser::Id { uid, gid } => {
            let primary = || {
                User::from_uid(Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.gid.as_raw())
            };
            (uid, gid.or_else(primary).unwrap_or(uid))
        }
        RunUser::Name(name) => {
            let user = User::from_name(&name)
                .with_context(|| format!("run_user: looking up {name:?}"))?
                .with_context(|| format!("run_user: no user {name:?} on this machine"))?;
            (user.uid.as_raw(), user.gid.as_raw())
        }
    };
    if user.0 == 0 || user.1 == 0 {
        bail!("run_user: tasks never run as root or in group 0 ({user:?})");
    }
    Ok(user)
}

/// The id of the range this cluster holds on this machine, claimed now if it holds none:
/// a file per claimed id under `<run_dir>/uids` names its cluster, and is made by a hard
/// link (atomic, never over another's). An id once a cluster's stays that cluster's, so
/// what a run left behind (in /tmp, say) never falls to another tenant's runs. The search
/// starts at a place given by the cluster's id, and skips ids of the machine's users.
#[cfg(unix)]
fn claim(root: &Path, cluster: &str, first: u32, last: u32) -> anyhow::Result<(u32, u32)> {
    use sha2::{Digest, Sha256};
    let dir = root.join("uids");
    make_dir(&dir)?;
    set_mode(&dir, 0o700)?;
    let size = u64::from(last - first) + 1;
    let digest = Sha256::digest(cluster.as_bytes());
    let start = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) % size;
    let draft = dir.join(format!(".claim-{cluster}-{}", std::process::id()));
    std::fs::write(&draft, cluster).with_context(|| format!("writing {}", draft.display()))?;
    let held = |path: &Path| std::fs::read_to_string(path).map(|holder| holder == cluster);
    let mut found = None;
    for step in 0..size {
        let uid = first + ((start + step) % size) as u32;
        let path = dir.join(uid.to_string());
        match held(&path) {
            Ok(true) => found = Some(uid),
            Ok(false) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid));
                if matches!(user, Ok(Some(_))) {
                    continue;
                }
                match std::fs::hard_link(&draft, &path) {
                    Ok(()) => found = Some(uid),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        if held(&path).unwrap_or(false) {
                            found = Some(uid);
                        }
                    }
                    Err(e) => return Err(e).context(format!("claiming {}", path.display())),
                }
            }
            Err(e) => return Err(e).context(format!("reading {}", path.display())),
        }
        if found.is_some() {
            break;
        }
    }
    let _ = std::fs::remove_file(&draft);
    match found {
        Some(uid) => Ok((uid, uid)),
        None => bail!("run_user: every id of {first}-{last} is another cluster's; widen the range"),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use crate::exec::{ExecLimits, RunSpec, execute, execute_staged, stage};
    use crate::report::{Report, Reporter};
    use cloudtask_core::ids::{RunId, TaskId};
    use cloudtask_core::run::RunStatus;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    /// A user id nobody has, for runs.
    const RUN_UID: u32 = 1_700_000_321;

    async fn output(staged: bool, spec: RunSpec) -> Vec<String> {
        let limits = ExecLimits {
            max_lines: 100,
            max_output_bytes: 1 << 20,
            max_line_bytes: 4096,
            kill_grace: Duration::from_secs(1),
            hurried_grace: Duration::from_secs(1),
            containment: crate::exec::contain::Containment::process_tree(),
        };
        let (reporter, mut reports) = Reporter::capture();
        let never = CancellationToken::new();
        let outcome = if staged {
            let shell = stage(spec, &limits.containment).expect("staged");
            execute_staged(shell, limits, &reporter, &never, &never).await
        } else {
            execute(&spec, limits, &reporter, &never, &never).await
        };
        drop(reporter);
        let mut texts = Vec::new();
        while let Some(report) = reports.recv().await {
            if let Report::Logs { lines, .. } = report {
                texts.extend(lines.into_iter().map(|l| l.text));
            }
        }
        assert_eq!(
            outcome.status,
            RunStatus::Succeeded,
            "{outcome:?} {texts:?}"
        );
        texts
    }

    #[tokio::test]
    async fn staged_and_direct_shells_of_a_root_worker_run_as_the_run_user_without_groups() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: the worker must be root to run tasks as another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(RUN_UID), Some(RUN_UID)).unwrap();
        let spec = RunSpec {
            run_id: RunId::new(),
            task_id: TaskId::new(),
            scheduled_at: chrono::Utc::now(),
            attempt: 0,
            command: "id -u; id -G; echo \"$HOME $TMPDIR ${USER-none}\"".into(),
            env: Default::default(),
            workdir: dir.path().to_path_buf(),
            timeout: None,
            identity: Arc::new(RunIdentity {
                user: Some((RUN_UID, RUN_UID)),
                home: Some(dir.path().to_path_buf()),
            }),
            limits: Default::default(),
        };
        let home = dir.path().display();
        for staged in [true, false] {
            let texts = output(staged, spec.clone()).await;
            assert_eq!(
                texts,
                [
                    RUN_UID.to_string(),
                    RUN_UID.to_string(),
                    format!("{home} {home} none")
                ],
                "staged: {staged}"
            );
        }
    }

    #[test]
    fn each_cluster_keeps_an_id_of_its_own() {
        let root = tempfile::tempdir().unwrap();
        let one = claim(root.path(), "cluster-one", 1_700_000_000, 1_700_000_001).unwrap();
        let two = claim(root.path(), "cluster-two", 1_700_000_000, 1_700_000_001).unwrap();
        assert_ne!(one, two);
        assert_eq!(
            claim(root.path(), "cluster-one", 1_700_000_000, 1_700_000_001).unwrap(),
            one,
            "the same id again"
        );
        let full = claim(root.path(), "cluster-three", 1_700_000_000, 1_700_000_001);
        assert!(full.unwrap_err().to_string().contains("widen"));
    }
}
