//! Validation of user-uploaded program archives (zip or tar.gz), on bytes in memory.
//!
//! [`walk`] detects the format and reads every entry: each goes through the shared
//! entry checks (paths, links, entry types, entry count) and every byte of content is
//! counted as actually decompressed, never by header sizes. What happens to a checked
//! entry is the [`Sink`]'s business: [`inspect`] discards it (the API validates uploads
//! this way); the worker's package cache writes it into a folder.

mod entry;
mod limits;
#[cfg(any(test, feature = "samples"))]
pub mod samples;
mod tar_gz;
mod zip;

use std::fmt;
use std::io::{self, Write};

pub use limits::Limits;

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
    /// Failure of the sink (the local filesystem while unpacking), not the archive's fault.
    #[error("could not unpack the archive: {0}")]
    Io(String),
}

/// Where checked entries go. Paths are relative, `/`-separated, free of `.` and `..`,
/// never below a link and never seen before in the archive; link targets are known to
/// stay inside it. An error of the sink ends the walk with [`ArchiveError::Io`].
pub trait Sink {
    fn dir(&mut self, path: &str) -> io::Result<()>;
    /// Where the file's content goes (streamed, counted against the unpacked limit).
    fn file(&mut self, path: &str, executable: bool) -> io::Result<Box<dyn Write>>;
    /// `target` is relative to the link's own directory.
    fn symlink(&mut self, path: &str, target: &str) -> io::Result<()>;
    /// `target` is relative to the archive root, a regular file stored earlier.
    fn hard_link(&mut self, path: &str, target: &str) -> io::Result<()>;
}

/// Inspect an archive held in memory: detect the format by its magic bytes and
/// walk every entry, refusing anything unsafe. Nothing is written anywhere.
pub fn inspect(bytes: &[u8], limits: &Limits) -> Result<ArchiveSummary, ArchiveError> {
    walk(bytes, limits, &mut InspectSink)
}

/// Check the archive's size, detect its format, and hand every checked entry to `sink`.
pub fn walk(
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
    let mut validator = entry::Validator::new(*limits);
    match format {
        ArchiveFormat::Zip => zip::walk(bytes, &mut validator, sink)?,
        ArchiveFormat::TarGz => tar_gz::walk(bytes, &mut validator, sink)?,
    }
    Ok(ArchiveSummary {
        format,
        entries: validator.entries,
        unpacked_bytes: validator.unpacked,
    })
}

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
const ZIP_EMPTY_MAGIC: &[u8] = b"PK\x05\x06";
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];

/// Unix file-type bits, as zip entries store them in their external attributes.
const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;

fn detect(bytes: &[u8]) -> Result<ArchiveFormat, ArchiveError> {
    if bytes.starts_with(ZIP_MAGIC) || bytes.starts_with(ZIP_EMPTY_MAGIC) {
        Ok(ArchiveFormat::Zip)
    } else if bytes.starts_with(GZIP_MAGIC) {
        Ok(ArchiveFormat::TarGz)
    } else {
        Err(ArchiveError::NotAnArchive)
    }
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

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;

    use super::samples::{tar_gz_of, zip_of};
    use super::*;

    pub const MIB: u64 = 1024 * 1024;

    pub fn limits() -> Limits {
        Limits {
            max_archive_bytes: 10 * MIB,
            max_unpacked_bytes: 10 * MIB,
            max_entries: 100,
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
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
}
