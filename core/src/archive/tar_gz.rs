//! Reading a tar.gz: a gzip stream (members concatenated) holding a tar. Besides file
//! content, headers, padding and extension records (pax, GNU long names, buffered in
//! memory by the tar crate) are bounded too, per entry and over the whole stream.

use std::cell::Cell;
use std::io::{self, Cursor, Read};
use std::rc::Rc;

use super::entry::{EntryKind, Validator, process_entry, read_error, shown};
use super::limits::{MAX_TAR_METADATA, Meter, MeteredReader};
use super::{ArchiveError, Sink};

const DAMAGED: &str = "the tar data is truncated or damaged";

pub(super) fn walk(
    bytes: &[u8],
    v: &mut Validator,
    sink: &mut dyn Sink,
) -> Result<(), ArchiveError> {
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
    for entry in archive.entries().map_err(|e| read_error(&e, v, DAMAGED))? {
        let mut entry = entry.map_err(|e| read_error(&e, v, DAMAGED))?;
        // From here: this entry's content (counted exactly by `copy_data`),
        // then at most MAX_TAR_METADATA up to and including the next header.
        let content_left = v.limits.max_unpacked_bytes.saturating_sub(v.unpacked);
        let allowed = meter
            .read
            .get()
            .saturating_add(content_left)
            .saturating_add(MAX_TAR_METADATA);
        meter.allowed.set(allowed.min(total_cap));
        let name = utf8(&entry.path_bytes())?;
        let Some(kind) = entry_kind(&entry, &name, v)? else {
            continue;
        };
        process_entry(v, sink, &name, kind, &mut entry)?;
    }

    // Read what follows the end-of-archive marker (zero padding, gzip trailer)
    // so that the gzip checksum is verified too.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| read_error(&e, v, DAMAGED))?;
    Ok(())
}

/// The entry's type; `None` for records that are not entries (pax global headers).
fn entry_kind<R: Read>(
    entry: &tar::Entry<'_, R>,
    name: &str,
    v: &Validator,
) -> Result<Option<EntryKind>, ArchiveError> {
    let header = entry.header();
    Ok(Some(match header.entry_type() {
        tar::EntryType::XGlobalHeader => return Ok(None),
        tar::EntryType::Directory => EntryKind::Dir,
        // Old (v7) archives mark directories by a trailing slash only.
        tar::EntryType::Regular if name.ends_with('/') => EntryKind::Dir,
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            let mode = header.mode().map_err(|e| read_error(&e, v, DAMAGED))?;
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
    }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::inspect;
    use crate::archive::samples::{raw_header, tar_gz_long_name, tar_gz_raw};
    use crate::archive::tests::limits;

    #[test]
    fn tar_long_names_are_handled() {
        let long = format!("{}/run.sh", "d".repeat(150));
        let bytes = tar_gz_long_name(&long, b"hi");
        let summary = inspect(&bytes, &limits()).unwrap();
        assert_eq!((summary.entries, summary.unpacked_bytes), (1, 2));

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
}
