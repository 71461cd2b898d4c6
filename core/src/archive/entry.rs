//! The checks every entry of every format goes through: its path (relative, no `..`,
//! not under a link or a file, not seen before), its type, where a link points, the
//! entry count, and its content counted against the unpacked limit as it streams.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::Path;

use super::limits::{Limits, MAX_LINK_TARGET, is_cap_exceeded};
use super::{ArchiveError, Sink};

/// Type of an entry as read from the archive, before validation.
pub(super) enum EntryKind {
    Dir,
    File {
        executable: bool,
    },
    /// Target as stored (relative to the link's own directory).
    Symlink(String),
    /// Target as stored (relative to the archive root).
    HardLink(String),
    /// Devices, fifos, sockets, unknown types.
    Unsupported,
}

/// A validated entry: `path` is normalised (relative, `/`-separated, no `.`
/// or `..`); link targets are known to stay inside the archive.
struct CheckedEntry {
    path: String,
    kind: CheckedKind,
}

enum CheckedKind {
    Dir,
    File { executable: bool },
    Symlink { target: String },
    HardLink { target: String },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Seen {
    Dir,
    File,
    Link,
}

pub(super) struct Validator {
    pub limits: Limits,
    pub entries: u64,
    pub unpacked: u64,
    /// Every path already created (explicitly or as a parent directory).
    seen: HashMap<String, Seen>,
}

impl Validator {
    pub fn new(limits: Limits) -> Self {
        Validator {
            limits,
            entries: 0,
            unpacked: 0,
            seen: HashMap::new(),
        }
    }

    pub fn too_many_entries(&self) -> ArchiveError {
        ArchiveError::TooManyEntries {
            limit: self.limits.max_entries,
        }
    }

    pub fn too_large(&self) -> ArchiveError {
        ArchiveError::UnpackedTooLarge {
            limit: self.limits.max_unpacked_bytes,
        }
    }

    /// The single check every entry of every format goes through. Returns
    /// `None` for the archive root itself (`./`), which needs no action.
    fn check_entry(
        &mut self,
        name: &str,
        kind: EntryKind,
    ) -> Result<Option<CheckedEntry>, ArchiveError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(self.too_many_entries());
        }
        let components = match normalise(name) {
            Ok(components) => components,
            Err(PathProblem::Absolute) => return Err(ArchiveError::AbsolutePath(shown(name))),
            Err(PathProblem::Parent) => return Err(ArchiveError::ParentTraversal(shown(name))),
            Err(PathProblem::Invalid) => {
                return Err(ArchiveError::Corrupt(format!(
                    "entry name `{}` is invalid",
                    shown(name)
                )));
            }
        };
        if matches!(kind, EntryKind::Unsupported) {
            return Err(ArchiveError::UnsupportedEntry(shown(name)));
        }
        if components.is_empty() {
            return match kind {
                EntryKind::Dir => Ok(None),
                _ => Err(ArchiveError::Corrupt("an entry has an empty name".into())),
            };
        }
        let path = components.join("/");
        self.check_parents(name, &components)?;
        // Never overwrite an earlier entry (only repeated directories are fine).
        match (self.seen.get(&path), &kind) {
            (None, _) | (Some(Seen::Dir), EntryKind::Dir) => {}
            (Some(_), _) => {
                return Err(ArchiveError::Corrupt(format!(
                    "entry `{}` appears more than once",
                    shown(name)
                )));
            }
        }
        let (kind, seen) = self.check_kind(name, &components, kind)?;
        self.seen.insert(path.clone(), seen);
        Ok(Some(CheckedEntry { path, kind }))
    }

    /// Nothing may be placed under a link (it could be redirected anywhere) or under a
    /// file; parents not seen yet become directories.
    fn check_parents(&mut self, name: &str, components: &[&str]) -> Result<(), ArchiveError> {
        for end in 1..components.len() {
            let parent = components[..end].join("/");
            match self.seen.get(&parent) {
                None => {
                    self.seen.insert(parent, Seen::Dir);
                }
                Some(Seen::Dir) => {}
                Some(Seen::Link) => return Err(ArchiveError::LinkEscapes(shown(name))),
                Some(Seen::File) => {
                    return Err(ArchiveError::Corrupt(format!(
                        "entry `{}` is placed under a file",
                        shown(name)
                    )));
                }
            }
        }
        Ok(())
    }

    /// The entry's type once checked: links must stay inside the archive.
    fn check_kind(
        &self,
        name: &str,
        components: &[&str],
        kind: EntryKind,
    ) -> Result<(CheckedKind, Seen), ArchiveError> {
        let invalid_target =
            || ArchiveError::Corrupt(format!("link `{}` has an invalid target", shown(name)));
        Ok(match kind {
            EntryKind::Dir => (CheckedKind::Dir, Seen::Dir),
            EntryKind::File { executable } => (CheckedKind::File { executable }, Seen::File),
            EntryKind::Symlink(target) => {
                if target.is_empty() || target.contains('\0') {
                    return Err(invalid_target());
                }
                if !symlink_stays_inside(components, &target) {
                    return Err(ArchiveError::LinkEscapes(shown(name)));
                }
                (CheckedKind::Symlink { target }, Seen::Link)
            }
            EntryKind::HardLink(target) => {
                let target = match normalise(&target) {
                    Ok(c) if !c.is_empty() => c.join("/"),
                    Ok(_) | Err(PathProblem::Invalid) => return Err(invalid_target()),
                    Err(PathProblem::Absolute | PathProblem::Parent) => {
                        return Err(ArchiveError::LinkEscapes(shown(name)));
                    }
                };
                // Only to a regular file stored earlier: a hard link to a
                // symbolic link would move that link's relative target.
                if self.seen.get(&target) != Some(&Seen::File) {
                    return Err(ArchiveError::Corrupt(format!(
                        "link `{}` does not point to a file stored earlier in the archive",
                        shown(name)
                    )));
                }
                (CheckedKind::HardLink { target }, Seen::Link)
            }
            EntryKind::Unsupported => unreachable!("refused by check_entry"),
        })
    }

    /// Stream an entry's content into `out`, counting the bytes actually
    /// decompressed against the unpacked limit; stops as soon as it is passed.
    fn copy_data(
        &mut self,
        name: &str,
        data: &mut dyn Read,
        out: &mut dyn Write,
    ) -> Result<u64, ArchiveError> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut copied = 0u64;
        loop {
            let n = match data.read(&mut buf) {
                Ok(0) => return Ok(copied),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let what = format!("entry `{}` cannot be read", shown(name));
                    return Err(read_error(&e, self, &what));
                }
            };
            self.unpacked = self.unpacked.saturating_add(n as u64);
            if self.unpacked > self.limits.max_unpacked_bytes {
                return Err(self.too_large());
            }
            out.write_all(&buf[..n]).map_err(|e| io_error(name, &e))?;
            copied += n as u64;
        }
    }

    /// Read a link target stored as entry content (zip), bounded in size.
    pub fn read_link_target(
        &mut self,
        name: &str,
        data: &mut dyn Read,
    ) -> Result<String, ArchiveError> {
        let mut target = Vec::new();
        self.copy_data(name, &mut data.take(MAX_LINK_TARGET + 1), &mut target)?;
        if target.len() as u64 > MAX_LINK_TARGET {
            return Err(ArchiveError::Corrupt(format!(
                "link `{}` has an invalid target",
                shown(name)
            )));
        }
        String::from_utf8(target).map_err(|_| {
            ArchiveError::Corrupt(format!("link `{}` has an invalid target", shown(name)))
        })
    }
}

/// Validate one entry and hand it to the sink (shared by every format and every sink).
pub(super) fn process_entry(
    v: &mut Validator,
    sink: &mut dyn Sink,
    name: &str,
    kind: EntryKind,
    data: &mut dyn Read,
) -> Result<(), ArchiveError> {
    let Some(entry) = v.check_entry(name, kind)? else {
        return Ok(());
    };
    let path = entry.path.as_str();
    match entry.kind {
        CheckedKind::Dir => sink.dir(path).map_err(|e| io_error(path, &e)),
        CheckedKind::File { executable } => {
            let mut out = sink
                .file(path, executable)
                .map_err(|e| io_error(path, &e))?;
            v.copy_data(name, data, &mut out)?;
            out.flush().map_err(|e| io_error(path, &e))
        }
        CheckedKind::Symlink { target } => {
            sink.symlink(path, &target).map_err(|e| io_error(path, &e))
        }
        CheckedKind::HardLink { target } => sink
            .hard_link(path, &target)
            .map_err(|e| io_error(path, &e)),
    }
}

/// Map an error met while reading the archive.
pub(super) fn read_error(e: &io::Error, v: &Validator, what: &str) -> ArchiveError {
    if is_cap_exceeded(e) {
        v.too_large()
    } else {
        ArchiveError::Corrupt(what.to_string())
    }
}

fn io_error(path: impl AsRef<Path>, e: &io::Error) -> ArchiveError {
    ArchiveError::Io(format!("{}: {e}", path.as_ref().display()))
}

enum PathProblem {
    Absolute,
    Parent,
    Invalid,
}

/// Split an entry name into its normal components (`/` and `\` both separate;
/// empty and `.` components are dropped).
fn normalise(name: &str) -> Result<Vec<&str>, PathProblem> {
    if name.contains('\0') {
        return Err(PathProblem::Invalid);
    }
    if name.starts_with(['/', '\\']) || has_drive_prefix(name) {
        return Err(PathProblem::Absolute);
    }
    let mut components = Vec::new();
    for component in name.split(['/', '\\']) {
        match component {
            "" | "." => {}
            ".." => return Err(PathProblem::Parent),
            c => components.push(c),
        }
    }
    Ok(components)
}

fn has_drive_prefix(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':'
}

/// Whether a symbolic link target stays inside the archive root, resolved from
/// the link's own directory. Splits on `/` only, exactly as the kernel will.
///
/// `..` is accepted only as a leading run (`../../lib/x`): those steps climb
/// through the link's parent directories, which are real directories (nothing
/// is ever placed under a link). A `..` after a normal component could follow
/// another link first (`a/../../x` with `a -> ..`) and is refused.
fn symlink_stays_inside(link: &[&str], target: &str) -> bool {
    if target.starts_with(['/', '\\']) || has_drive_prefix(target) {
        return false;
    }
    let mut up = 0;
    let mut descended = false;
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." if descended => return false,
            ".." => up += 1,
            _ => descended = true,
        }
    }
    up < link.len()
}

/// Entry names are user-controlled: keep them short and printable in messages.
pub(super) fn shown(name: &str) -> String {
    const MAX: usize = 200;
    let mut out: String = name
        .chars()
        .take(MAX)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if name.chars().count() > MAX {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::inspect;
    use crate::archive::samples::{self, raw_header, tar_gz_of, tar_gz_raw, zip_of};
    use crate::archive::tests::limits;

    #[test]
    fn zip_slip_is_refused() {
        let err = inspect(&samples::zip_slip(), &limits()).unwrap_err();
        assert_eq!(err, ArchiveError::ParentTraversal("../evil".into()));
        let bytes = zip_of(&[("a/../../evil", b"x", 0o644)]);
        assert!(matches!(
            inspect(&bytes, &limits()),
            Err(ArchiveError::ParentTraversal(_))
        ));
        let bytes = zip_of(&[("a\\..\\..\\evil", b"x", 0o644)]);
        assert!(matches!(
            inspect(&bytes, &limits()),
            Err(ArchiveError::ParentTraversal(_))
        ));
    }

    #[test]
    fn tar_slip_is_refused() {
        let bytes = tar_gz_of(&[("../evil", b"x", 0o644)]);
        assert_eq!(
            inspect(&bytes, &limits()),
            Err(ArchiveError::ParentTraversal("../evil".into()))
        );
        let bytes = tar_gz_of(&[("./ok/../../evil", b"x", 0o644)]);
        assert!(matches!(
            inspect(&bytes, &limits()),
            Err(ArchiveError::ParentTraversal(_))
        ));
    }

    #[test]
    fn absolute_paths_are_refused() {
        for name in ["/etc/evil", "\\evil", "C:\\evil", "c:evil"] {
            let bytes = zip_of(&[(name, b"x", 0o644)]);
            assert_eq!(
                inspect(&bytes, &limits()),
                Err(ArchiveError::AbsolutePath(name.into())),
                "zip {name}"
            );
            let bytes = tar_gz_of(&[(name, b"x", 0o644)]);
            assert_eq!(
                inspect(&bytes, &limits()),
                Err(ArchiveError::AbsolutePath(name.into())),
                "tar {name}"
            );
        }
        assert_eq!(
            inspect(&samples::tar_absolute(), &limits()),
            Err(ArchiveError::AbsolutePath("/tmp/evil".into()))
        );
    }

    #[test]
    fn symlinks_out_are_refused() {
        assert_eq!(
            inspect(&samples::zip_symlink_out(), &limits()),
            Err(ArchiveError::LinkEscapes("link".into()))
        );
        for target in ["../../etc", "/etc/passwd", "a/../x", "..", "C:\\x"] {
            let files: [(&str, &[u8], u32); 1] = [("dir/link", target.as_bytes(), 0o120_777)];
            let want = Err(ArchiveError::LinkEscapes("dir/link".into()));
            if target != ".." {
                assert_eq!(inspect(&zip_of(&files), &limits()), want, "zip {target}");
                assert_eq!(inspect(&tar_gz_of(&files), &limits()), want, "tar {target}");
            } else {
                // `dir/..` is the root itself: allowed.
                assert!(inspect(&tar_gz_of(&files), &limits()).is_ok());
            }
        }
        let files: [(&str, &[u8], u32); 1] = [("dir/link", b"../..", 0o120_777)];
        assert!(inspect(&tar_gz_of(&files), &limits()).is_err());
        // Lexically inside, but `dir/a -> ..` makes `a/../../x` climb above the root.
        let bytes = tar_gz_of(&[
            ("dir/a", b"..", 0o120_777),
            ("dir/link", b"a/../../x", 0o120_777),
        ]);
        assert_eq!(
            inspect(&bytes, &limits()),
            Err(ArchiveError::LinkEscapes("dir/link".into()))
        );
        let bytes = tar_gz_of(&[
            ("dir/a", b"..", 0o120_777),
            ("dir/b", b"./../dir/./a", 0o120_777),
        ]);
        assert!(inspect(&bytes, &limits()).is_ok());
    }

    #[test]
    fn nothing_may_be_placed_under_a_symlink() {
        // d/l -> .. is inside, but d/l/m -> .. would then resolve above the root.
        let bytes = tar_gz_of(&[("d/l", b"..", 0o120_777), ("d/l/m", b"..", 0o120_777)]);
        assert_eq!(
            inspect(&bytes, &limits()),
            Err(ArchiveError::LinkEscapes("d/l/m".into()))
        );
        let bytes = zip_of(&[("sub", b".", 0o120_777), ("sub/x", b"x", 0o644)]);
        assert_eq!(
            inspect(&bytes, &limits()),
            Err(ArchiveError::LinkEscapes("sub/x".into()))
        );
    }

    #[test]
    fn hard_links_out_are_refused() {
        for target in ["../etc/passwd", "/etc/passwd"] {
            let bytes = tar_gz_raw(&[(raw_header("h", tar::EntryType::Link, target, 0), b"")]);
            assert_eq!(
                inspect(&bytes, &limits()),
                Err(ArchiveError::LinkEscapes("h".into())),
                "{target}"
            );
        }
        // To a symlink (would move its relative target) or to nothing.
        let bytes = tar_gz_raw(&[
            (raw_header("a/l", tar::EntryType::Symlink, "../x", 0), b""),
            (raw_header("h", tar::EntryType::Link, "a/l", 0), b""),
        ]);
        assert!(matches!(
            inspect(&bytes, &limits()),
            Err(ArchiveError::Corrupt(_))
        ));
        let bytes = tar_gz_raw(&[(raw_header("h", tar::EntryType::Link, "x", 0), b"")]);
        assert!(matches!(
            inspect(&bytes, &limits()),
            Err(ArchiveError::Corrupt(_))
        ));
    }

    #[test]
    fn special_files_are_refused() {
        for kind in [
            tar::EntryType::Fifo,
            tar::EntryType::Char,
            tar::EntryType::Block,
        ] {
            let bytes = tar_gz_raw(&[(raw_header("dev", kind, "", 0), b"")]);
            assert_eq!(
                inspect(&bytes, &limits()),
                Err(ArchiveError::UnsupportedEntry("dev".into()))
            );
        }
        for mode in [0o010_644, 0o020_644, 0o060_644, 0o140_644] {
            let bytes = zip_of(&[("dev", b"", mode)]);
            assert_eq!(
                inspect(&bytes, &limits()),
                Err(ArchiveError::UnsupportedEntry("dev".into())),
                "{mode:o}"
            );
        }
    }

    #[test]
    fn duplicates_are_refused() {
        let bytes = tar_gz_of(&[("a", b"1", 0o644), ("./a", b"2", 0o644)]);
        assert!(matches!(
            inspect(&bytes, &limits()),
            Err(ArchiveError::Corrupt(_))
        ));
        let bytes = tar_gz_of(&[("d/", b"", 0o755), ("d/", b"", 0o755), ("d/x", b"", 0o644)]);
        assert!(inspect(&bytes, &limits()).is_ok());
    }

    #[test]
    fn too_many_entries_are_refused() {
        let names: Vec<String> = (0..101).map(|i| format!("f{i}")).collect();
        let files: Vec<(&str, &[u8], u32)> = names
            .iter()
            .map(|n| (n.as_str(), &b""[..], 0o644))
            .collect();
        for bytes in [zip_of(&files), tar_gz_of(&files)] {
            assert_eq!(
                inspect(&bytes, &limits()),
                Err(ArchiveError::TooManyEntries { limit: 100 })
            );
        }
        assert!(inspect(&zip_of(&files[..100]), &limits()).is_ok());
        assert!(inspect(&tar_gz_of(&files[..100]), &limits()).is_ok());
    }

    #[test]
    fn error_messages_are_user_facing() {
        let err = ArchiveError::ParentTraversal("../evil".into());
        assert_eq!(
            err.to_string(),
            "archive entry `../evil` refers to a parent directory (`..`)"
        );
        // Control characters in names are escaped, long names shortened.
        let name = format!("../{}\n", "x".repeat(300));
        let bytes = tar_gz_of(&[(&name[..99], b"", 0o644)]);
        let msg = inspect(&bytes, &limits()).unwrap_err().to_string();
        assert!(!msg.contains('\n'));
        assert!(shown(&name).chars().count() <= 201);
        assert!(shown("a\nb").contains("\\n"));
    }
}
