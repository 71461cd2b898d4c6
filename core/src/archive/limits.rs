//! Size limits of an archive, and the meter that bounds what a decompressed stream may
//! yield: a limit is enforced on bytes actually read, never on sizes the archive claims.

use std::cell::Cell;
use std::fmt;
use std::io::{self, Read};
use std::rc::Rc;

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

/// Longest accepted symbolic link target (PATH_MAX).
pub(super) const MAX_LINK_TARGET: u64 = 4096;

/// Tar bytes allowed between two entries' contents: padding, headers, long
/// names and pax records (each is buffered in memory by the tar crate).
pub(super) const MAX_TAR_METADATA: u64 = 1 << 20;

/// Marker error: the decompressed stream went past what the meter allows.
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
pub(super) struct Meter {
    pub read: Cell<u64>,
    pub allowed: Cell<u64>,
}

pub(super) struct MeteredReader<R> {
    pub inner: R,
    pub meter: Rc<Meter>,
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

/// Whether a read failed because a [`MeteredReader`] below it stopped.
pub(super) fn is_cap_exceeded(e: &io::Error) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::samples::{
        raw_header, tar_gz_bomb, tar_gz_of, tar_gz_raw, zip_bomb, zip_of,
    };
    use crate::archive::tests::{MIB, limits};
    use crate::archive::{ArchiveError, inspect};

    fn assert_bomb_refused(bytes: &[u8]) {
        assert!((bytes.len() as u64) < MIB, "bomb is {} bytes", bytes.len());
        assert_eq!(
            inspect(bytes, &limits()),
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
}
