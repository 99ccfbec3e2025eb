//! Where a partition's payloads live: append-only segment files on disk.
//!
//! The replicated [`crate::partition::PartitionState`] keeps only each
//! message's metadata; its payload is appended here when the `Produce`
//! that carries it is applied, and read back (one `pread`) when a message
//! is delivered. So a replica's memory holds an index entry per queued
//! message (offset → segment, position, length, CRC), not the backlog.
//!
//! A segment is named by the first offset written to it and rolls over at
//! [`SEGMENT_BYTES`]. Removing a message (acked by every group, retention,
//! purge) drops its index entry; a segment whose last live message goes is
//! deleted, so acks and retention give the disk back.
//!
//! Durability: the Raft log holds every payload until a snapshot lets it be
//! compacted, and a snapshot carries the live payloads themselves, so the
//! segments need no fsync of their own: after a crash the partition is
//! rebuilt from its snapshot (which rewrites the segments) and the log.
//! Positions are local to a replica; nothing replicated depends on them.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Size at which the active segment is closed and a new one begun.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Where one payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    segment: u64,
    pos: u64,
    len: u32,
    crc: u32,
}

#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    len: u64,
    live: u64,
}

/// The payload store of one partition replica.
#[derive(Debug)]
pub struct Segments {
    dir: PathBuf,
    segments: BTreeMap<u64, Segment>,
    index: BTreeMap<u64, Loc>,
    /// Segment receiving appends (its id), if any.
    active: Option<u64>,
    bytes: u64,
}

impl Segments {
    /// Opens an empty store in `dir`, removing whatever was there (a
    /// partition is always rebuilt from its snapshot and log).
    pub fn create(dir: &Path) -> io::Result<Self> {
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            segments: BTreeMap::new(),
            index: BTreeMap::new(),
            active: None,
            bytes: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Live payloads and their bytes.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Segment files on disk.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Appends the payloads of a batch (offset, payload) with one write.
    pub fn append(&mut self, batch: &[(u64, &[u8])]) -> io::Result<()> {
        let Some(&(first, _)) = batch.first() else {
            return Ok(());
        };
        let segment = match self.active {
            Some(id) if self.segments[&id].len < SEGMENT_BYTES => id,
            _ => {
                let file = OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .read(true)
                    .write(true)
                    .open(self.path(first))?;
                self.segments.insert(
                    first,
                    Segment {
                        file: Arc::new(file),
                        len: 0,
                        live: 0,
                    },
                );
                self.active = Some(first);
                first
            }
        };
        let seg = self.segments.get_mut(&segment).expect("active segment");
        let total: usize = batch.iter().map(|(_, p)| p.len()).sum();
        let mut buf = Vec::with_capacity(total);
        let mut pos = seg.len;
        for &(offset, payload) in batch {
            let len =
                u32::try_from(payload.len()).map_err(|_| io::Error::other("payload over 4 GiB"))?;
            let loc = Loc {
                segment,
                pos,
                len,
                crc: crc32fast::hash(payload),
            };
            if self.index.insert(offset, loc).is_some() {
                // Offsets are never reused: a second payload for one is a
                // bug upstream. Refuse rather than corrupt the counts.
                return Err(io::Error::other(format!("offset {offset} stored twice")));
            }
            buf.extend_from_slice(payload);
            pos += payload.len() as u64;
            seg.live += 1;
            self.bytes += payload.len() as u64;
        }
        seg.file.write_all_at(&buf, seg.len)?;
        seg.len = pos;
        Ok(())
    }

    /// The payload of `offset`, checked against its CRC.
    pub fn read(&self, offset: u64) -> io::Result<Vec<u8>> {
        let loc = self
            .index
            .get(&offset)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("offset {offset}")))?;
        read_at(&self.segments[&loc.segment].file, loc, offset)
    }

    /// Drops `offset`'s payload; deletes its segment once nothing in it
    /// is live (unless it is the active one).
    pub fn remove(&mut self, offset: u64) {
        if let Some(loc) = self.index.remove(&offset) {
            self.release(loc);
        }
    }

    fn release(&mut self, loc: Loc) {
        self.bytes -= u64::from(loc.len);
        let seg = self
            .segments
            .get_mut(&loc.segment)
            .expect("segment of a loc");
        seg.live -= 1;
        if seg.live == 0 && self.active != Some(loc.segment) {
            self.segments.remove(&loc.segment);
            if let Err(e) = fs::remove_file(self.path(loc.segment)) {
                tracing::warn!(error = %e, segment = loc.segment, "cannot delete a segment");
            }
        }
    }

    /// A consistent view of every live payload as of now, readable from
    /// another thread while this store goes on changing (segment files
    /// are append-only and kept open by the view even once deleted).
    pub fn view(&self) -> SegmentsView {
        SegmentsView {
            files: self
                .segments
                .iter()
                .map(|(id, s)| (*id, s.file.clone()))
                .collect(),
            index: self.index.iter().map(|(o, l)| (*o, *l)).collect(),
        }
    }

    fn path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{segment:020}.seg"))
    }
}

fn read_at(file: &File, loc: &Loc, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; loc.len as usize];
    file.read_exact_at(&mut buf, loc.pos)?;
    if crc32fast::hash(&buf) != loc.crc {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("payload of offset {offset} fails its checksum"),
        ));
    }
    Ok(buf)
}

/// Payloads as of a moment, for a snapshot job.
pub struct SegmentsView {
    files: BTreeMap<u64, Arc<File>>,
    index: Vec<(u64, Loc)>,
}

impl SegmentsView {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Writes `count`, then (offset, length, payload) for each live
    /// payload in offset order.
    pub fn write_to(&self, out: &mut dyn Write) -> io::Result<()> {
        out.write_all(&(self.index.len() as u64).to_le_bytes())?;
        for (offset, loc) in &self.index {
            let payload = read_at(&self.files[&loc.segment], loc, *offset)?;
            out.write_all(&offset.to_le_bytes())?;
            out.write_all(&loc.len.to_le_bytes())?;
            out.write_all(&payload)?;
        }
        Ok(())
    }
}

/// Reads what [`SegmentsView::write_to`] wrote into an empty store,
/// appending in batches of about 4 MiB.
pub fn read_into(store: &mut Segments, input: &mut dyn Read) -> io::Result<()> {
    let mut word = [0u8; 8];
    input.read_exact(&mut word)?;
    let count = u64::from_le_bytes(word);
    let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut pending_bytes = 0usize;
    for _ in 0..count {
        input.read_exact(&mut word)?;
        let offset = u64::from_le_bytes(word);
        let mut len = [0u8; 4];
        input.read_exact(&mut len)?;
        let mut payload = vec![0; u32::from_le_bytes(len) as usize];
        input.read_exact(&mut payload)?;
        pending_bytes += payload.len();
        pending.push((offset, payload));
        if pending_bytes >= 4 << 20 {
            flush(store, &mut pending)?;
            pending_bytes = 0;
        }
    }
    flush(store, &mut pending)
}

fn flush(store: &mut Segments, pending: &mut Vec<(u64, Vec<u8>)>) -> io::Result<()> {
    let batch: Vec<(u64, &[u8])> = pending.iter().map(|(o, p)| (*o, p.as_slice())).collect();
    store.append(&batch)?;
    pending.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_read_back_removed_and_segments_reclaimed() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = Segments::create(&tmp.path().join("p0")).unwrap();
        let big = vec![7u8; (SEGMENT_BYTES / 2 + 1) as usize];
        s.append(&[(0, b"zero"), (1, b"one")]).unwrap();
        s.append(&[(2, &big)]).unwrap();
        s.append(&[(3, &big)]).unwrap(); // rolls: segment 0 is full now
        s.append(&[(4, b"four")]).unwrap();
        assert_eq!(s.segment_count(), 2);
        assert_eq!(s.read(1).unwrap(), b"one");
        assert_eq!(s.read(3).unwrap(), big);
        assert_eq!(s.read(4).unwrap(), b"four");
        assert_eq!(s.len(), 5);
        for o in [0, 1, 2] {
            s.remove(o);
        }
        // Segment 0 still holds offset 3.
        assert_eq!(s.segment_count(), 2);
        s.remove(3);
        assert_eq!(s.segment_count(), 1, "an emptied closed segment is deleted");
        let files = fs::read_dir(s.dir()).unwrap().count();
        assert_eq!(files, 1);
        assert_eq!(s.bytes(), 4);
        assert!(s.read(3).is_err());
    }

    #[test]
    fn a_corrupted_payload_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = Segments::create(tmp.path()).unwrap();
        s.append(&[(0, b"hello")]).unwrap();
        let seg = fs::read_dir(s.dir())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let f = OpenOptions::new().write(true).open(seg).unwrap();
        f.write_all_at(b"j", 0).unwrap();
        let err = s.read(0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_view_survives_later_changes_and_restores_elsewhere() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = Segments::create(&tmp.path().join("a")).unwrap();
        s.append(&[(10, b"ten"), (11, b"eleven"), (12, b"twelve")])
            .unwrap();
        let view = s.view();
        s.remove(10);
        s.remove(11);
        s.remove(12);
        s.append(&[(13, b"later")]).unwrap();
        let mut out = Vec::new();
        view.write_to(&mut out).unwrap();
        let mut t = Segments::create(&tmp.path().join("b")).unwrap();
        read_into(&mut t, &mut out.as_slice()).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.read(11).unwrap(), b"eleven");
        assert_eq!(t.bytes(), 3 + 6 + 6);
    }
}
