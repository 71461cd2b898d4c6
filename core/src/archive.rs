//! Validation and unpacking of user-uploaded program archives (zip or tar.gz).
//!
//! Both [`inspect`] (bytes in memory, nothing written) and [`unpack`] (into an
//! empty directory) run the same walk over the archive: every entry goes
//! through [`Validator::check_entry`] (paths, links, entry types, entry count)
//! and every byte of content goes through [`Validator::copy_data`] (actual
//! decompressed bytes, never header sizes). Only the [`Sink`] differs.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::io::{self, Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Supported archive formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    Zip,
    TarGz,
}

impl ArchiveFormat {
    pub fn as_str(&self) -> &'static str {
        match self {
            ArchiveFormat::Zip => "zip",
            ArchiveFormat::TarGz => "tar.gz",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "zip" => Some(ArchiveFormat::Zip),
            "tar.gz" => Some(ArchiveFormat::TarGz),
            _ => None,
        }
    }
}

impl fmt::Display for ArchiveFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Limits applied to an uploaded archive.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Size of the archive itself (compressed).
    pub max_archive_bytes: u64,
    /// Total size of the file contents once decompressed.
    pub max_unpacked_bytes: u64,
    /// Number of entries (files, directories, links).
    pub max_entries: u64,
}

/// What a successful walk over an archive found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSummary {
    pub format: ArchiveFormat,
    pub entries: u64,
    pub unpacked_bytes: u64,
}

/// Why an archive was refused. Messages are shown to users.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchiveError {
    #[error("the archive is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the file is not a zip or tar.gz archive")]
    NotAnArchive,
    #[error("archive entry `{0}` has an absolute path")]
    AbsolutePath(String),
    #[error("archive entry `{0}` refers to a parent directory (`..`)")]
    ParentTraversal(String),
    #[error(
        "archive entry `{0}` is a link pointing outside the archive, or is placed under a link"
    )]
    LinkEscapes(String),
    #[error(
        "archive entry `{0}` has an unsupported type (only files, directories and links are allowed)"
    )]
    UnsupportedEntry(String),
    #[error("the archive unpacks to more than the limit of {limit} bytes")]
    UnpackedTooLarge { limit: u64 },
    #[error("the archive has more than the limit of {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("the archive is damaged or unreadable: {0}")]
    Corrupt(String),
    /// Failure of the local filesystem while unpacking (not the archive's fault).
    #[error("could not unpack the archive: {0}")]
    Io(String),
}

/// Inspect an archive held in memory: detect the format by its magic bytes and
/// walk every entry, refusing anything unsafe. Nothing is written anywhere.
pub fn inspect(bytes: &[u8], limits: &Limits) -> Result<ArchiveSummary, ArchiveError> {
    walk(bytes, limits, &mut InspectSink)
}

/// Unpack into `dest`, which must be an existing, empty directory, with exactly
/// the checks of [`inspect`]. Files keep their executable bit (modes 0o755 or
/// 0o644). On error, whatever was already written into `dest` is removed.
pub fn unpack(bytes: &[u8], dest: &Path, limits: &Limits) -> Result<ArchiveSummary, ArchiveError> {
    let mut listing = std::fs::read_dir(dest).map_err(|e| io_error(dest, &e))?;
    if listing.next().is_some() {
        return Err(ArchiveError::Io(format!(
            "destination {} is not empty",
            dest.display()
        )));
    }
    let mut sink = DirSink {
        root: dest.to_path_buf(),
    };
    let result = walk(bytes, limits, &mut sink);
    if result.is_err() {
        clear_dir(dest);
    }
    result
}

// ---------------------------------------------------------------------------
// Format detection and walkers
// ---------------------------------------------------------------------------

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
const ZIP_EMPTY_MAGIC: &[u8] = b"PK\x05\x06";
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];

const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;

/// Longest accepted symbolic link target (PATH_MAX).
const MAX_LINK_TARGET: u64 = 4096;

/// Tar bytes allowed between two entries' contents: padding, headers, long
/// names and pax records (each is buffered in memory by the tar crate).
const MAX_TAR_METADATA: u64 = 1 << 20;

fn detect(bytes: &[u8]) -> Result<ArchiveFormat, ArchiveError> {
    if bytes.starts_with(ZIP_MAGIC) || bytes.starts_with(ZIP_EMPTY_MAGIC) {
        Ok(ArchiveFormat::Zip)
    } else if bytes.starts_with(GZIP_MAGIC) {
        Ok(ArchiveFormat::TarGz)
    } else {
        Err(ArchiveError::NotAnArchive)
    }
}

fn walk(
    bytes: &[u8],
    limits: &Limits,
    sink: &mut dyn Sink,
) -> Result<ArchiveSummary, ArchiveError> {
    if bytes.len() as u64 > limits.max_archive_bytes {
        return Err(ArchiveError::TooLarge {
            limit: limits.max_archive_bytes,
        });
    }
    let format = detect(bytes)?;
    let mut validator = Validator::new(*limits);
    match format {
        ArchiveFormat::Zip => walk_zip(bytes, &mut validator, sink)?,
        ArchiveFormat::TarGz => walk_tar_gz(bytes, &mut validator, sink)?,
    }
    Ok(ArchiveSummary {
        format,
        entries: validator.entries,
        unpacked_bytes: validator.unpacked,
    })
}

fn walk_zip(bytes: &[u8], v: &mut Validator, sink: &mut dyn Sink) -> Result<(), ArchiveError> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| zip_error(&e))?;
    // The central directory is already parsed: refuse early, before any work.
    if zip.len() as u64 > v.limits.max_entries {
        return Err(v.too_many_entries());
    }
    for index in 0..zip.len() {
        let mut file = zip.by_index(index).map_err(|e| zip_error(&e))?;
        let name = file
            .name()
            .map_err(|_| ArchiveError::Corrupt("an entry name cannot be decoded".into()))?
            .into_owned();
        let mode = file.unix_mode();
        let kind = match mode.map(|m| m & S_IFMT) {
            Some(S_IFLNK) => EntryKind::Symlink(v.read_link_target(&name, &mut file)?),
            Some(S_IFDIR) => EntryKind::Dir,
            Some(S_IFREG | 0) | None if name.ends_with(['/', '\\']) => EntryKind::Dir,
            Some(S_IFREG | 0) | None => EntryKind::File {
                executable: mode.is_some_and(|m| m & 0o111 != 0),
            },
            Some(_) => EntryKind::Unsupported,
        };
        process_entry(v, sink, &name, kind, &mut file)?;
    }
    Ok(())
}

fn walk_tar_gz(bytes: &[u8], v: &mut Validator, sink: &mut dyn Sink) -> Result<(), ArchiveError> {
    // Headers, padding and extension records (pax, GNU long names: the tar
    // crate buffers those in memory) are not file content but still cost
    // memory and CPU. Bound them per entry, and the whole stream overall.
    let total_cap = v
        .limits
        .max_unpacked_bytes
        .saturating_add(v.limits.max_entries.saturating_mul(8 * 1024))
        .saturating_add(MAX_TAR_METADATA);
    let meter = Rc::new(Meter {
        read: Cell::new(0),
        allowed: Cell::new(total_cap.min(512 + MAX_TAR_METADATA)),
    });
    let mut stream = MeteredReader {
        inner: flate2::read::MultiGzDecoder::new(bytes),
        meter: Rc::clone(&meter),
    };

    // A gzip that does not hold a tar is "not an archive", not a damaged one.
    let mut first = [0u8; 512];
    match read_full(&mut stream, &mut first) {
        Ok(512) => {}
        Ok(_) => return Err(ArchiveError::NotAnArchive),
        Err(e) => return Err(read_error(&e, v, "the gzip data is truncated or damaged")),
    }
    if first.iter().any(|b| *b != 0) && !tar_checksum_ok(&first) {
        return Err(ArchiveError::NotAnArchive);
    }

    let mut archive = tar::Archive::new(Cursor::new(first).chain(stream));
    let damaged = "the tar data is truncated or damaged";
    for entry in archive.entries().map_err(|e| read_error(&e, v, damaged))? {
        let mut entry = entry.map_err(|e| read_error(&e, v, damaged))?;
        // From here: this entry's content (counted exactly by `copy_data`),
        // then at most MAX_TAR_METADATA up to and including the next header.
        let content_left = v.limits.max_unpacked_bytes.saturating_sub(v.unpacked);
        let allowed = meter
            .read
            .get()
            .saturating_add(content_left)
            .saturating_add(MAX_TAR_METADATA);
        meter.allowed.set(allowed.min(total_cap));
        let header = entry.header();
        let name = utf8(&entry.path_bytes())?;
        let kind = match header.entry_type() {
            tar::EntryType::XGlobalHeader => continue,
            tar::EntryType::Directory => EntryKind::Dir,
            // Old (v7) archives mark directories by a trailing slash only.
            tar::EntryType::Regular if name.ends_with('/') => EntryKind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mode = header.mode().map_err(|e| read_error(&e, v, damaged))?;
                EntryKind::File {
                    executable: mode & 0o111 != 0,
                }
            }
            kind @ (tar::EntryType::Symlink | tar::EntryType::Link) => {
                let target = match entry.link_name_bytes() {
                    Some(target) => utf8(&target)?,
                    None => String::new(),
                };
                if kind == tar::EntryType::Symlink {
                    EntryKind::Symlink(target)
                } else {
                    EntryKind::HardLink(target)
                }
            }
            _ => EntryKind::Unsupported,
        };
        process_entry(v, sink, &name, kind, &mut entry)?;
    }

    // Read what follows the end-of-archive marker (zero padding, gzip trailer)
    // so that the gzip checksum is verified too.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| read_error(&e, v, damaged))?;
    Ok(())
}

fn tar_checksum_ok(block: &[u8; 512]) -> bool {
    let sum = block[..148]
        .iter()
        .chain(&block[156..])
        .map(|b| u32::from(*b))
        .sum::<u32>()
        + 8 * u32::from(b' ');
    tar::Header::from_byte_slice(block)
        .cksum()
        .is_ok_and(|c| c == sum)
}

fn utf8(bytes: &[u8]) -> Result<String, ArchiveError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        ArchiveError::Corrupt(format!(
            "entry name `{}` is not valid UTF-8",
            shown(&String::from_utf8_lossy(bytes))
        ))
    })
}

fn zip_error(e: &zip::result::ZipError) -> ArchiveError {
    use zip::result::ZipError;
    ArchiveError::Corrupt(match e {
        ZipError::UnsupportedArchive(msg) if *msg == ZipError::PASSWORD_REQUIRED => {
            "password-protected archives are not supported".into()
        }
        ZipError::UnsupportedArchive(_) => "the zip uses a feature that is not supported".into(),
        ZipError::CompressionMethodNotSupported(_) => {
            "the zip uses a compression method that is not supported (use deflate)".into()
        }
        _ => "the zip data is truncated or damaged".into(),
    })
}

// ---------------------------------------------------------------------------
// Shared per-entry validation
// ---------------------------------------------------------------------------

/// Type of an entry as read from the archive, before validation.
enum EntryKind {
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

struct Validator {
    limits: Limits,
    entries: u64,
    unpacked: u64,
    /// Every path already created (explicitly or as a parent directory).
    seen: HashMap<String, Seen>,
}

impl Validator {
    fn new(limits: Limits) -> Self {
        Validator {
            limits,
            entries: 0,
            unpacked: 0,
            seen: HashMap::new(),
        }
    }

    fn too_many_entries(&self) -> ArchiveError {
        ArchiveError::TooManyEntries {
            limit: self.limits.max_entries,
        }
    }

    fn too_large(&self) -> ArchiveError {
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

        // Nothing may be placed under a link (it could be redirected anywhere)
        // or under a file.
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

        let (kind, seen) = match kind {
            EntryKind::Dir => (CheckedKind::Dir, Seen::Dir),
            EntryKind::File { executable } => (CheckedKind::File { executable }, Seen::File),
            EntryKind::Symlink(target) => {
                if target.is_empty() || target.contains('\0') {
                    return Err(ArchiveError::Corrupt(format!(
                        "link `{}` has an invalid target",
                        shown(name)
                    )));
                }
                if !symlink_stays_inside(&components, &target) {
                    return Err(ArchiveError::LinkEscapes(shown(name)));
                }
                (CheckedKind::Symlink { target }, Seen::Link)
            }
            EntryKind::HardLink(target) => {
                let target = match normalise(&target) {
                    Ok(c) if !c.is_empty() => c.join("/"),
                    Ok(_) | Err(PathProblem::Invalid) => {
                        return Err(ArchiveError::Corrupt(format!(
                            "link `{}` has an invalid target",
                            shown(name)
                        )));
                    }
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
            EntryKind::Unsupported => unreachable!("refused above"),
        };
        self.seen.insert(path.clone(), seen);
        Ok(Some(CheckedEntry { path, kind }))
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
    fn read_link_target(
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

/// Validate one entry and hand it to the sink (shared by every format and by
/// both [`inspect`] and [`unpack`]).
fn process_entry(
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
fn shown(name: &str) -> String {
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

// ---------------------------------------------------------------------------
// Reading helpers
// ---------------------------------------------------------------------------

/// Marker error: the decompressed tar stream went past what the meter allows.
#[derive(Debug)]
struct StreamCapExceeded;

impl fmt::Display for StreamCapExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("decompressed stream too large")
    }
}

impl std::error::Error for StreamCapExceeded {}

/// Bytes read from a decompressed stream, and how many may be read so far
/// (raised by the walker as it goes).
struct Meter {
    read: Cell<u64>,
    allowed: Cell<u64>,
}

struct MeteredReader<R> {
    inner: R,
    meter: Rc<Meter>,
}

impl<R: Read> Read for MeteredReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let read = self.meter.read.get().saturating_add(n as u64);
        self.meter.read.set(read);
        if read > self.meter.allowed.get() {
            return Err(io::Error::other(StreamCapExceeded));
        }
        Ok(n)
    }
}

fn is_cap_exceeded(e: &io::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = e
        .get_ref()
        .map(|inner| inner as &(dyn std::error::Error + 'static));
    while let Some(err) = source {
        if err.is::<StreamCapExceeded>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Map an error met while reading the archive.
fn read_error(e: &io::Error, v: &Validator, what: &str) -> ArchiveError {
    if is_cap_exceeded(e) {
        v.too_large()
    } else {
        ArchiveError::Corrupt(what.to_string())
    }
}

fn io_error(path: impl AsRef<Path>, e: &io::Error) -> ArchiveError {
    ArchiveError::Io(format!("{}: {e}", path.as_ref().display()))
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

// ---------------------------------------------------------------------------
// Sinks: where validated entries go
// ---------------------------------------------------------------------------

trait Sink {
    fn dir(&mut self, path: &str) -> io::Result<()>;
    fn file(&mut self, path: &str, executable: bool) -> io::Result<Box<dyn Write>>;
    fn symlink(&mut self, path: &str, target: &str) -> io::Result<()>;
    /// `target` is relative to the archive root.
    fn hard_link(&mut self, path: &str, target: &str) -> io::Result<()>;
}

/// Discards everything (content is still read, to be counted).
struct InspectSink;

impl Sink for InspectSink {
    fn dir(&mut self, _: &str) -> io::Result<()> {
        Ok(())
    }
    fn file(&mut self, _: &str, _: bool) -> io::Result<Box<dyn Write>> {
        Ok(Box::new(io::sink()))
    }
    fn symlink(&mut self, _: &str, _: &str) -> io::Result<()> {
        Ok(())
    }
    fn hard_link(&mut self, _: &str, _: &str) -> io::Result<()> {
        Ok(())
    }
}

/// Writes into a directory. Paths come from [`Validator::check_entry`]: they
/// are relative, free of `..`, never below a link and never seen before.
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

impl Sink for DirSink {
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

// ---------------------------------------------------------------------------
// Sample archives for tests (here and in other crates)
// ---------------------------------------------------------------------------

/// Builders of valid and malicious archives, for tests.
pub mod samples {
    use std::io::{self, Read as _, Write};

    use zip::write::SimpleFileOptions;

    const S_IFMT: u32 = super::S_IFMT;
    const S_IFLNK: u32 = super::S_IFLNK;

    /// A zip of `(name, content, mode)`. A name ending in `/` is a directory;
    /// a mode with file-type bits (e.g. `0o120777`) is stored as is, so a
    /// symlink is `(name, target, 0o120777)`. Names are not checked.
    pub fn zip_of(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
        for (name, content, mode) in files {
            let options = if mode & S_IFMT != 0 {
                SimpleFileOptions::default().external_attributes(mode << 16)
            } else {
                SimpleFileOptions::default().unix_permissions(*mode)
            };
            if name.ends_with('/') {
                zip.add_directory(*name, options).expect("zip dir");
            } else {
                zip.start_file(*name, options).expect("zip entry");
                zip.write_all(content).expect("zip write");
            }
        }
        zip.finish().expect("zip finish").into_inner()
    }

    /// A tar.gz of `(name, content, mode)`. A name ending in `/` is a
    /// directory; mode `0o120xxx` makes a symlink whose target is the content.
    /// Names are written raw into the header (no checks, at most 100 bytes).
    pub fn tar_gz_of(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
        let mut tar = tar::Builder::new(gz_writer());
        for (name, content, mode) in files {
            let mut header = tar::Header::new_gnu();
            if name.ends_with('/') {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
            } else if mode & S_IFMT == S_IFLNK {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_link_name_literal(content).expect("link name");
                header.set_size(0);
            } else {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(content.len() as u64);
            }
            header.set_mode(mode & 0o7777);
            let slot = &mut header.as_old_mut().name;
            assert!(name.len() <= slot.len(), "name too long for a raw header");
            slot[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            let data: &[u8] = if header.entry_type().is_file() {
                content
            } else {
                &[]
            };
            tar.append(&header, data).expect("tar entry");
        }
        finish_tar(tar)
    }

    /// Zip with an entry `../evil`.
    pub fn zip_slip() -> Vec<u8> {
        zip_of(&[("ok.txt", b"ok", 0o644), ("../evil", b"evil", 0o644)])
    }

    /// tar.gz with an entry `/tmp/evil`.
    pub fn tar_absolute() -> Vec<u8> {
        tar_gz_of(&[("/tmp/evil", b"evil", 0o644)])
    }

    /// Zip with a symlink `link -> ../../etc`.
    pub fn zip_symlink_out() -> Vec<u8> {
        zip_of(&[("link", b"../../etc", 0o120_777)])
    }

    /// Zip holding one deflated file of `unpacked` zero bytes.
    pub fn zip_bomb(unpacked: u64) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
        let options = SimpleFileOptions::default()
            .compression_level(Some(1))
            .large_file(unpacked >= u64::from(u32::MAX));
        zip.start_file("zeros.bin", options).expect("zip entry");
        write_zeros(&mut zip, unpacked);
        zip.finish().expect("zip finish").into_inner()
    }

    /// tar.gz holding one file of `unpacked` zero bytes.
    pub fn tar_gz_bomb(unpacked: u64) -> Vec<u8> {
        let mut tar = tar::Builder::new(gz_writer());
        let mut header = tar::Header::new_gnu();
        header.set_size(unpacked);
        header.set_mode(0o644);
        tar.append_data(&mut header, "zeros.bin", io::repeat(0).take(unpacked))
            .expect("tar entry");
        finish_tar(tar)
    }

    fn gz_writer() -> flate2::write::GzEncoder<Vec<u8>> {
        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast())
    }

    fn finish_tar(tar: tar::Builder<flate2::write::GzEncoder<Vec<u8>>>) -> Vec<u8> {
        tar.into_inner()
            .expect("tar finish")
            .finish()
            .expect("gzip finish")
    }

    fn write_zeros(out: &mut dyn Write, mut n: u64) {
        let zeros = [0u8; 64 * 1024];
        while n > 0 {
            let chunk = n.min(zeros.len() as u64) as usize;
            out.write_all(&zeros[..chunk]).expect("write zeros");
            n -= chunk as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::{Path, PathBuf};

    use super::samples::{tar_gz_bomb, tar_gz_of, zip_bomb, zip_of};
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn limits() -> Limits {
        Limits {
            max_archive_bytes: 10 * MIB,
            max_unpacked_bytes: 10 * MIB,
            max_entries: 100,
        }
    }

    /// A raw tar header (no checks by the builder): name, type, link target.
    fn raw_header(name: &str, kind: tar::EntryType, link: &str, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(0o644);
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_cksum();
        header
    }

    fn tar_gz_raw(entries: &[(tar::Header, &[u8])]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        for (header, data) in entries {
            tar.append(header, *data).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "cloudtask-archive-{}-{tag}-{n}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Unpack into `outer/dest` and check nothing appeared in `outer` except `dest`.
    fn unpack_contained(bytes: &[u8]) -> (Result<ArchiveSummary, ArchiveError>, TempDir) {
        let outer = TempDir::new("outer");
        let dest = outer.0.join("a").join("b").join("dest");
        std::fs::create_dir_all(&dest).unwrap();
        let result = unpack(bytes, &dest, &limits());
        assert_eq!(list(&outer.0), vec!["a", "a/b", "a/b/dest"]);
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

    #[test]
    fn format_names() {
        for f in [ArchiveFormat::Zip, ArchiveFormat::TarGz] {
            assert_eq!(ArchiveFormat::parse(f.as_str()), Some(f));
        }
        assert_eq!(ArchiveFormat::TarGz.as_str(), "tar.gz");
        assert_eq!(ArchiveFormat::parse("rar"), None);
    }

    #[test]
    fn valid_zip_is_accepted() {
        let bytes = zip_of(&[
            ("bin/", b"", 0o755),
            ("bin/run.sh", b"#!/bin/sh\necho hi\n", 0o755),
            ("./data/config.json", b"{}", 0o644),
            ("current", b"bin", 0o120_777),
        ]);
        let summary = inspect(&bytes, &limits()).unwrap();
        assert_eq!(
            summary,
            ArchiveSummary {
                format: ArchiveFormat::Zip,
                entries: 4,
                unpacked_bytes: 18 + 2 + 3,
            }
        );
    }

    #[test]
    fn empty_zip_is_accepted() {
        let bytes = zip_of(&[]);
        assert!(bytes.starts_with(b"PK\x05\x06"));
        assert_eq!(inspect(&bytes, &limits()).unwrap().entries, 0);
    }

    #[test]
    fn valid_tar_gz_is_accepted() {
        let bytes = tar_gz_of(&[
            ("./", b"", 0o755),
            ("./bin/", b"", 0o755),
            ("./bin/run.sh", b"#!/bin/sh\n", 0o755),
            ("./lib/a.txt", b"hello", 0o644),
            ("./lib/b", b"a.txt", 0o120_777),
            ("./lib/c", b"../bin/run.sh", 0o120_777),
        ]);
        let summary = inspect(&bytes, &limits()).unwrap();
        assert_eq!(
            summary,
            ArchiveSummary {
                format: ArchiveFormat::TarGz,
                entries: 6,
                unpacked_bytes: 10 + 5,
            }
        );
    }

    #[test]
    fn tar_long_names_are_handled() {
        let long = format!("{}/run.sh", "d".repeat(150));
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let mut header = tar::Header::new_gnu();
        header.set_size(2);
        header.set_mode(0o755);
        tar.append_data(&mut header, &long, &b"hi"[..]).unwrap();
        let bytes = tar.into_inner().unwrap().finish().unwrap();
        let summary = inspect(&bytes, &limits()).unwrap();
        assert_eq!((summary.entries, summary.unpacked_bytes), (1, 2));

        let dest = TempDir::new("long");
        unpack(&bytes, &dest.0, &limits()).unwrap();
        assert_eq!(std::fs::read(dest.0.join(&long)).unwrap(), b"hi");

        // A GNU long name hiding a traversal is still refused.
        let evil = format!("{}/../../../evil", "d".repeat(120));
        let mut name_bytes = evil.clone().into_bytes();
        name_bytes.push(0);
        let mut long_header = raw_header(
            "././@LongLink",
            tar::EntryType::GNULongName,
            "",
            name_bytes.len() as u64,
        );
        long_header.set_cksum();
        let bytes = tar_gz_raw(&[
            (long_header, &name_bytes),
            (raw_header("short", tar::EntryType::Regular, "", 1), b"x"),
        ]);
        assert_eq!(
            inspect(&bytes, &limits()),
            Err(ArchiveError::ParentTraversal(evil))
        );
    }

    #[test]
    fn huge_tar_metadata_is_refused() {
        // A 30 MiB GNU long name: not content, but the tar crate would buffer it.
        let name = vec![b'a'; 30 * MIB as usize];
        let header = raw_header(
            "././@LongLink",
            tar::EntryType::GNULongName,
            "",
            name.len() as u64,
        );
        let bytes = tar_gz_raw(&[
            (header, &name),
            (raw_header("x", tar::EntryType::Regular, "", 0), b""),
        ]);
        let roomy = Limits {
            max_unpacked_bytes: 100 * MIB,
            ..limits()
        };
        assert_eq!(
            inspect(&bytes, &roomy),
            Err(ArchiveError::UnpackedTooLarge { limit: 100 * MIB })
        );
    }

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

    fn assert_bomb_refused(bytes: &[u8]) {
        assert!((bytes.len() as u64) < MIB, "bomb is {} bytes", bytes.len());
        assert_eq!(
            inspect(bytes, &limits()),
            Err(ArchiveError::UnpackedTooLarge { limit: 10 * MIB })
        );
        let (result, _dir) = unpack_contained(bytes);
        assert_eq!(
            result,
            Err(ArchiveError::UnpackedTooLarge { limit: 10 * MIB })
        );
    }

    #[test]
    fn zip_bomb_is_refused() {
        assert_bomb_refused(&zip_bomb(100 * MIB));
    }

    #[test]
    fn tar_gz_bomb_is_refused() {
        assert_bomb_refused(&tar_gz_bomb(100 * MIB));
    }

    #[test]
    fn header_sizes_are_not_trusted() {
        // Many small files that together pass the limit.
        let content = vec![7u8; (MIB / 2) as usize];
        let files: Vec<(String, &[u8], u32)> = (0..30)
            .map(|i| (format!("f{i}"), content.as_slice(), 0o644))
            .collect();
        let files: Vec<(&str, &[u8], u32)> =
            files.iter().map(|(n, c, m)| (n.as_str(), *c, *m)).collect();
        for bytes in [zip_of(&files), tar_gz_of(&files)] {
            assert_eq!(
                inspect(&bytes, &limits()),
                Err(ArchiveError::UnpackedTooLarge { limit: 10 * MIB })
            );
        }
    }

    #[test]
    fn oversize_archive_is_refused() {
        let bytes = zip_of(&[("a", b"0123456789", 0o644)]);
        let small = Limits {
            max_archive_bytes: bytes.len() as u64 - 1,
            ..limits()
        };
        assert_eq!(
            inspect(&bytes, &small),
            Err(ArchiveError::TooLarge {
                limit: bytes.len() as u64 - 1
            })
        );
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
    fn non_archives_are_refused() {
        let text = b"#!/bin/sh\necho this is not an archive\n".repeat(40);
        let mut random = Vec::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            random.push((x >> 24) as u8);
        }
        random[0] = 0x42;
        for bytes in [
            &b""[..],
            &text,
            &random,
            &gzip(&text),
            &gzip(b""),
            &gzip(b"short"),
        ] {
            assert_eq!(inspect(bytes, &limits()), Err(ArchiveError::NotAnArchive));
        }
    }

    #[test]
    fn truncated_archives_are_refused() {
        let content: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let zip = zip_of(&[("a.bin", &content, 0o644), ("b.bin", &content, 0o644)]);
        for cut in [zip.len() / 2, zip.len() - 10, 30] {
            assert!(matches!(
                inspect(&zip[..cut], &limits()),
                Err(ArchiveError::Corrupt(_))
            ));
        }
        let tgz = tar_gz_of(&[("a.bin", &content, 0o644), ("b.bin", &content, 0o644)]);
        for cut in [tgz.len() / 2, tgz.len() - 4] {
            assert!(matches!(
                inspect(&tgz[..cut], &limits()),
                Err(ArchiveError::Corrupt(_))
            ));
        }
        // Damaged (not truncated) zip content fails its checksum.
        let mut damaged = zip.clone();
        damaged[1000] ^= 0xff;
        assert!(matches!(
            inspect(&damaged, &limits()),
            Err(ArchiveError::Corrupt(_))
        ));
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
            let dest = TempDir::new("unpack");
            let summary = unpack(&bytes, &dest.0, &limits()).unwrap();
            assert_eq!(summary.entries, 6);
            assert_eq!(
                summary.unpacked_bytes,
                inspect(&bytes, &limits()).unwrap().unpacked_bytes
            );
            assert_eq!(
                list(&dest.0),
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
                std::fs::symlink_metadata(dest.0.join(p))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o7777
            };
            assert_eq!(mode("bin/run.sh"), 0o755);
            assert_eq!(mode("lib/data.txt"), 0o644);
            assert_eq!(mode("top.txt"), 0o644);
            assert_eq!(
                std::fs::read(dest.0.join("lib/current")).unwrap(),
                b"#!/bin/sh\n"
            );
            assert_eq!(
                std::fs::read_link(dest.0.join("lib/current")).unwrap(),
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
        let dest = TempDir::new("hard");
        unpack(&bytes, &dest.0, &limits()).unwrap();
        assert_eq!(std::fs::read(dest.0.join("g")).unwrap(), b"hi");
    }

    #[test]
    fn unpack_requires_an_empty_destination() {
        let dest = TempDir::new("nonempty");
        std::fs::write(dest.0.join("x"), b"x").unwrap();
        let bytes = zip_of(&[("a", b"a", 0o644)]);
        assert!(matches!(
            unpack(&bytes, &dest.0, &limits()),
            Err(ArchiveError::Io(_))
        ));
        assert!(matches!(
            unpack(&bytes, &dest.0.join("missing"), &limits()),
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
            assert!(list(&outer.0.join("a/b/dest")).is_empty());
        }
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
