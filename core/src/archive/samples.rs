//! Builders of valid and malicious archives, for tests only: compiled for core's own
//! tests and, through the `samples` feature, for crates that enable it in their
//! dev-dependencies (never in a release build).

use std::io::{self, Read as _, Write};

use ::zip::write::SimpleFileOptions;

use super::{S_IFLNK, S_IFMT};

/// A zip of `(name, content, mode)`. A name ending in `/` is a directory;
/// a mode with file-type bits (e.g. `0o120777`) is stored as is, so a
/// symlink is `(name, target, 0o120777)`. Names are not checked.
pub fn zip_of(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut zip = ::zip::ZipWriter::new(io::Cursor::new(Vec::new()));
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

/// A tar.gz of one file (mode 0o755) whose name may be longer than a header holds:
/// the tar crate writes a GNU long-name record before it.
pub fn tar_gz_long_name(name: &str, content: &[u8]) -> Vec<u8> {
    let mut tar = tar::Builder::new(gz_writer());
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o755);
    tar.append_data(&mut header, name, content)
        .expect("tar entry");
    finish_tar(tar)
}

/// A raw tar header (no checks by the builder): name, type, link target, size.
pub fn raw_header(name: &str, kind: tar::EntryType, link: &str, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o644);
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_cksum();
    header
}

/// A tar.gz of raw headers and their data, as given.
pub fn tar_gz_raw(entries: &[(tar::Header, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(gz_writer());
    for (header, data) in entries {
        tar.append(header, *data).expect("tar entry");
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
    let mut zip = ::zip::ZipWriter::new(io::Cursor::new(Vec::new()));
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
