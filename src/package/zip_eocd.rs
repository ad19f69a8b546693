//! What a zip declares about its central directory, read from its end records before
//! anything parses the directory itself.
//!
//! `ZipArchive::new` reads the whole central directory into memory (some 220 bytes per
//! entry, plus names) before renv can count the entries: a zip declaring 2 M entries cost
//! 435 MB per request before it was refused. The directory's entry count and size are
//! declared up front, in the end of central directory record (EOCD: 22 bytes, then a
//! comment of up to 64 KiB, at the end of the file) and, in a ZIP64 archive, in the ZIP64
//! end record that a locator just before the EOCD points to. [`declared`] reads those.
//!
//! A reader tries every EOCD signature in the last 65,557 bytes, latest first, and falls
//! back to an earlier one when a later one does not hold up. So every candidate counts,
//! not only the one a well-formed archive means: [`declared`] returns the largest claims
//! of any of them. A candidate with a field at its 16/32-bit maximum defers to the ZIP64
//! record its locator names, as readers do. `zip_read` opens archives with their offsets
//! as written (no data prepended), so that record is the only one a reader could use,
//! not whatever a search of the file would find.

use std::io::{self, Read, Seek, SeekFrom};

const EOCD_SIGNATURE: u32 = 0x0605_4b50;
const EOCD_LEN: u64 = 22;
const MAX_COMMENT: u64 = u16::MAX as u64;
const LOCATOR_SIGNATURE: u32 = 0x0706_4b50;
const LOCATOR_LEN: u64 = 20;
const EOCD64_SIGNATURE: u32 = 0x0606_4b50;
const EOCD64_LEN: u64 = 56;

/// The most a central directory claims, over every end record a reader might use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Declared {
    pub entries: u64,
    pub directory_bytes: u64,
}

impl Declared {
    fn max(self, other: Declared) -> Declared {
        Declared {
            entries: self.entries.max(other.entries),
            directory_bytes: self.directory_bytes.max(other.directory_bytes),
        }
    }
}

/// Reads the end records of the zip in `reader` (at most 64 KiB and two small records).
/// An archive without any EOCD declares nothing; the zip reader reports it as unreadable.
pub fn declared<R: Read + Seek>(reader: &mut R) -> io::Result<Declared> {
    let len = reader.seek(SeekFrom::End(0))?;
    let tail_start = len.saturating_sub(EOCD_LEN + MAX_COMMENT);
    let mut tail = vec![0; (len - tail_start) as usize];
    reader.seek(SeekFrom::Start(tail_start))?;
    reader.read_exact(&mut tail)?;

    let mut most = Declared::default();
    let last_start = tail.len().saturating_sub(EOCD_LEN as usize - 1);
    for i in (0..last_start).rev() {
        let record = &tail[i..i + EOCD_LEN as usize];
        if le32(record, 0) != EOCD_SIGNATURE {
            continue;
        }
        let offset = tail_start + i as u64;
        // A comment running past the end of the file rules the candidate out for readers.
        if offset + EOCD_LEN + u64::from(le16(record, 20)) > len {
            continue;
        }
        let claim = Declared {
            // Entries on this disk, and in all: a reader may use either.
            entries: u64::from(le16(record, 8).max(le16(record, 10))),
            directory_bytes: u64::from(le32(record, 12)),
        };
        // A field at its maximum means "see the ZIP64 record", if a locator names one.
        let may_be_zip64 =
            le16(record, 10) == u16::MAX || le32(record, 12) == u32::MAX || le32(record, 16) == u32::MAX;
        let zip64 = match offset.checked_sub(LOCATOR_LEN) {
            Some(locator) if may_be_zip64 => zip64_claim(reader, locator, len)?,
            _ => None,
        };
        most = most.max(zip64.unwrap_or(claim));
    }
    Ok(most)
}

/// The claims of the ZIP64 end record named by a locator at `locator`, if both are there.
fn zip64_claim<R: Read + Seek>(reader: &mut R, locator: u64, len: u64) -> io::Result<Option<Declared>> {
    let mut record = [0u8; LOCATOR_LEN as usize];
    if !read_at(reader, locator, len, &mut record)? || le32(&record, 0) != LOCATOR_SIGNATURE {
        return Ok(None);
    }
    let end64 = le64(&record, 8);
    let mut record = [0u8; EOCD64_LEN as usize];
    if !read_at(reader, end64, len, &mut record)? || le32(&record, 0) != EOCD64_SIGNATURE {
        return Ok(None);
    }
    Ok(Some(Declared {
        entries: le64(&record, 24).max(le64(&record, 32)),
        directory_bytes: le64(&record, 40),
    }))
}

/// Fills `buf` from `offset`; false if the file ends first.
fn read_at<R: Read + Seek>(reader: &mut R, offset: u64, len: u64, buf: &mut [u8]) -> io::Result<bool> {
    if offset.checked_add(buf.len() as u64).is_none_or(|end| end > len) {
        return Ok(false);
    }
    reader.seek(SeekFrom::Start(offset))?;
    reader.read_exact(buf)?;
    Ok(true)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use std::io::{Cursor, Write};

    use super::*;

    fn eocd(entries: u16, directory_bytes: u32, comment: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&EOCD_SIGNATURE.to_le_bytes());
        out.extend_from_slice(&[0; 4]); // disk numbers
        out.extend_from_slice(&entries.to_le_bytes());
        out.extend_from_slice(&entries.to_le_bytes());
        out.extend_from_slice(&directory_bytes.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // directory offset
        out.extend_from_slice(&(comment.len() as u16).to_le_bytes());
        out.extend_from_slice(comment);
        out
    }

    /// A ZIP64 end record and its locator, for an archive whose records start at `at`.
    fn zip64_records(at: u64, entries: u64, directory_bytes: u64) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&EOCD64_SIGNATURE.to_le_bytes());
        out.extend_from_slice(&(EOCD64_LEN - 12).to_le_bytes());
        out.extend_from_slice(&[45, 0, 45, 0]); // versions
        out.extend_from_slice(&[0; 8]); // disk numbers
        out.extend_from_slice(&entries.to_le_bytes());
        out.extend_from_slice(&entries.to_le_bytes());
        out.extend_from_slice(&directory_bytes.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // directory offset
        out.extend_from_slice(&LOCATOR_SIGNATURE.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&at.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out
    }

    fn declared_of(bytes: Vec<u8>) -> Declared {
        declared(&mut Cursor::new(bytes)).unwrap()
    }

    fn real_zip(files: usize) -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default();
        for i in 0..files {
            writer.start_file(format!("f{i}.txt"), options).unwrap();
            writer.write_all(b"hello").unwrap();
        }
        writer.finish().unwrap().into_inner()
    }

    #[test]
    fn a_real_zip_declares_its_entries() {
        let bytes = real_zip(3);
        let declared = declared_of(bytes.clone());
        assert_eq!(declared.entries, 3);
        let archive = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
        assert_eq!(archive.len(), 3);
        assert!(declared.directory_bytes > 0 && declared.directory_bytes < 200);
    }

    #[test]
    fn zip64_records_declare_more_than_16_bits_can() {
        // 2^32 entries: the EOCD says "see ZIP64" (0xFFFF), its record says how many.
        let mut bytes = b"not much of a directory".to_vec();
        let at = bytes.len() as u64;
        bytes.extend(zip64_records(at, 1 << 32, 1 << 40));
        bytes.extend(eocd(u16::MAX, u32::MAX, b""));
        assert_eq!(
            declared_of(bytes),
            Declared {
                entries: 1 << 32,
                directory_bytes: 1 << 40
            }
        );
    }

    #[test]
    fn a_zip64_record_replaces_the_fields_that_point_to_it() {
        let mut bytes = zip64_records(0, 3, 150);
        bytes.extend(eocd(u16::MAX, u32::MAX, b""));
        assert_eq!(
            declared_of(bytes),
            Declared {
                entries: 3,
                directory_bytes: 150
            }
        );
    }

    #[test]
    fn every_candidate_counts_not_only_the_last() {
        // A reader falls back to an earlier EOCD (here inside the last one's comment)
        // when the later one does not hold up.
        let hidden = eocd(60_000, 1 << 30, b"");
        let mut bytes = vec![0u8; 100];
        bytes.extend(eocd(1, 46, &hidden));
        assert_eq!(
            declared_of(bytes),
            Declared {
                entries: 60_000,
                directory_bytes: 1 << 30
            }
        );
    }

    #[test]
    fn a_comment_running_past_the_end_rules_a_candidate_out() {
        let mut bytes = eocd(2, 92, b"");
        let mut liar = eocd(60_000, 1 << 30, b"");
        liar[20..22].copy_from_slice(&100u16.to_le_bytes());
        bytes.extend(liar);
        assert_eq!(
            declared_of(bytes),
            Declared {
                entries: 2,
                directory_bytes: 92
            }
        );
    }

    #[test]
    fn a_locator_pointing_nowhere_leaves_the_32_bit_fields() {
        let mut bytes = zip64_records(1 << 50, 1 << 32, 1 << 40);
        bytes.extend(eocd(u16::MAX, 100, b""));
        assert_eq!(
            declared_of(bytes),
            Declared {
                entries: u16::MAX as u64,
                directory_bytes: 100
            }
        );
    }

    #[test]
    fn without_a_saturated_field_no_zip64_record_is_read() {
        // As readers do: a ZIP64 record is consulted only when a field points to it.
        let mut bytes = zip64_records(0, 1 << 32, 1 << 40);
        bytes.extend(eocd(7, 100, b""));
        assert_eq!(
            declared_of(bytes),
            Declared {
                entries: 7,
                directory_bytes: 100
            }
        );
    }

    #[test]
    fn no_end_record_declares_nothing() {
        assert_eq!(declared_of(Vec::new()), Declared::default());
        assert_eq!(declared_of(b"PK\x05\x06".to_vec()), Declared::default());
    }
}
