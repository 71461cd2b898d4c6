//! Reading a zip: entry types from the Unix mode bits, symbolic link targets from the
//! entry's content; the central directory's entry count is checked before any work.

use std::io::Cursor;

use super::entry::{EntryKind, Validator, process_entry};
use super::{ArchiveError, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Sink};

pub(super) fn walk(
    bytes: &[u8],
    v: &mut Validator,
    sink: &mut dyn Sink,
) -> Result<(), ArchiveError> {
    let mut zip = ::zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| zip_error(&e))?;
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

fn zip_error(e: &::zip::result::ZipError) -> ArchiveError {
    use ::zip::result::ZipError;
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
