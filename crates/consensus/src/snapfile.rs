//! Snapshots as files: taken off the driver thread, sent in chunks.
//!
//! A state machine's snapshot can be large (a queue partition's holds its
//! messages), so it never travels as one in-memory blob. The driver asks
//! the state machine for a [`SnapshotJob`] (a cheap capture of its state),
//! runs it on a background thread that writes the file here and fsyncs it,
//! and only then records the snapshot in raft-engine. What raft-engine and
//! raft-rs carry as `Snapshot.data` is a *descriptor*: a magic prefix and
//! the file's path. The gRPC transport recognises a `MsgSnapshot` whose
//! data is a descriptor and streams the file to the peer in chunks on a
//! call of its own; the receiver writes them to a file in its own snapshot
//! directory and steps the message with a descriptor of that file.
//!
//! Data that does not start with the magic is an inline snapshot (the
//! bootstrap snapshot, and any written before this existed).
//!
//! Files are named `g{group}-{index}-{term}[-r{from}].snap`. Invariants:
//! - a descriptor is stored (or stepped) only after its file is fsync'd
//!   and renamed into place, so after a crash every stored descriptor
//!   names a complete file;
//! - `gc` removes only files of a group whose index is below the group's
//!   current snapshot index, so a snapshot being received or installed
//!   (always newer) is never removed under it.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Writes a state machine's captured state. Runs on a background thread.
pub type SnapshotJob = Box<dyn FnOnce(&mut dyn Write) -> io::Result<()> + Send>;

const MAGIC: &[u8] = b"\0dsync-snapshot-file\0";

/// The `Snapshot.data` that stands for the file at `path`.
pub fn descriptor(path: &Path) -> Vec<u8> {
    let mut d = MAGIC.to_vec();
    d.extend_from_slice(path.to_string_lossy().as_bytes());
    d
}

/// The file a `Snapshot.data` stands for, if it is a descriptor.
pub fn file_of(data: &[u8]) -> Option<PathBuf> {
    let rest = data.strip_prefix(MAGIC)?;
    Some(PathBuf::from(String::from_utf8_lossy(rest).into_owned()))
}

/// A reader over a snapshot's state-machine data, inline or in a file.
pub fn reader(data: &[u8]) -> io::Result<Box<dyn Read + '_>> {
    match file_of(data) {
        Some(path) => Ok(Box::new(io::BufReader::with_capacity(
            1 << 20,
            File::open(&path).map_err(|e| {
                io::Error::new(e.kind(), format!("snapshot file {}: {e}", path.display()))
            })?,
        ))),
        None => Ok(Box::new(data)),
    }
}

/// One node's snapshot directory.
#[derive(Clone, Debug)]
pub struct SnapDir {
    dir: PathBuf,
}

impl SnapDir {
    /// Opens `dir`, creating it, and removes partial files a crash left.
    pub fn open(dir: PathBuf) -> io::Result<Self> {
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "part") {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// True if `path` is a file of this directory.
    pub fn contains(&self, path: &Path) -> bool {
        path.parent() == Some(self.dir.as_path())
    }

    /// Where the snapshot of `group` at (`index`, `term`) goes; `from` marks
    /// one received from a peer (so it never replaces a local file).
    pub fn file(&self, group: u64, index: u64, term: u64, from: Option<u64>) -> PathBuf {
        let name = match from {
            Some(from) => format!("g{group}-{index}-{term}-r{from}.snap"),
            None => format!("g{group}-{index}-{term}.snap"),
        };
        self.dir.join(name)
    }

    /// A fresh temporary file; [`SnapDir::commit`] moves it into place.
    pub fn temp(&self, group: u64) -> io::Result<(PathBuf, File)> {
        let nonce: u64 = rand::random();
        let path = self.dir.join(format!("g{group}-{nonce:016x}.part"));
        let file = File::create(&path)?;
        Ok((path, file))
    }

    /// Makes a written temporary file durable under its final name.
    pub fn commit(&self, file: File, temp: &Path, to: &Path) -> io::Result<()> {
        file.sync_all()?;
        drop(file);
        fs::rename(temp, to)?;
        File::open(&self.dir)?.sync_all()
    }

    /// Runs `job` into the file of (`group`, `index`, `term`); returns its
    /// size. Called on a background thread.
    pub fn write(&self, group: u64, index: u64, term: u64, job: SnapshotJob) -> io::Result<u64> {
        let (temp, file) = self.temp(group)?;
        let result = (|| {
            let mut out = BufWriter::with_capacity(1 << 20, file);
            job(&mut out)?;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            let size = file.metadata()?.len();
            self.commit(file, &temp, &self.file(group, index, term, None))?;
            Ok(size)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// Copies a snapshot file of another directory into this one (the
    /// in-memory test network delivers descriptors of the sender's files).
    pub fn import(&self, group: u64, from: u64, source: &Path) -> io::Result<PathBuf> {
        let (index, term) = parse_name(source, group).unwrap_or((0, 0));
        let (temp, mut file) = self.temp(group)?;
        let result = (|| {
            io::copy(&mut File::open(source)?, &mut file)?;
            let to = self.file(group, index, term, Some(from));
            self.commit(file, &temp, &to)?;
            Ok(to)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// Removes `group`'s snapshot files older than `keep_index`.
    pub fn gc(&self, group: u64, keep_index: u64) {
        self.remove_where(group, |index| index < keep_index);
    }

    /// Removes every snapshot file of `group`.
    pub fn remove_group(&self, group: u64) {
        self.remove_where(group, |_| true);
    }

    fn remove_where(&self, group: u64, doomed: impl Fn(u64) -> bool) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if let Some((index, _)) = parse_name(&path, group) {
                if doomed(index) {
                    let _ = fs::remove_file(&path);
                }
            }
        }
    }
}

/// (index, term) of a snapshot file of `group`, from its name.
fn parse_name(path: &Path, group: u64) -> Option<(u64, u64)> {
    let name = path.file_name()?.to_str()?.strip_suffix(".snap")?;
    let rest = name.strip_prefix(&format!("g{group}-"))?;
    let mut parts = rest.split('-');
    let index = parts.next()?.parse().ok()?;
    let term = parts.next()?.parse().ok()?;
    Some((index, term))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip_and_inline_data_is_not_one() {
        let p = Path::new("/data/snapshots/g7-100-3.snap");
        assert_eq!(file_of(&descriptor(p)).as_deref(), Some(p));
        assert_eq!(file_of(b"{\"locks\":[]}"), None);
        let mut inline = String::new();
        reader(b"abc").unwrap().read_to_string(&mut inline).unwrap();
        assert_eq!(inline, "abc");
    }

    #[test]
    fn written_files_are_read_back_and_old_ones_collected() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SnapDir::open(tmp.path().join("snapshots")).unwrap();
        for (index, body) in [(10u64, "ten"), (20, "twenty")] {
            let size = dir
                .write(
                    7,
                    index,
                    2,
                    Box::new(move |w: &mut dyn Write| w.write_all(body.as_bytes())),
                )
                .unwrap();
            assert_eq!(size, body.len() as u64);
        }
        let other = dir
            .write(8, 5, 1, Box::new(|w: &mut dyn Write| w.write_all(b"x")))
            .unwrap();
        assert_eq!(other, 1);
        let d = descriptor(&dir.file(7, 20, 2, None));
        let mut s = String::new();
        reader(&d).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "twenty");

        dir.gc(7, 20);
        assert!(!dir.file(7, 10, 2, None).exists());
        assert!(dir.file(7, 20, 2, None).exists());
        assert!(dir.file(8, 5, 1, None).exists(), "other groups untouched");

        let imported = dir.import(7, 3, &dir.file(7, 20, 2, None)).unwrap();
        assert_eq!(imported, dir.file(7, 20, 2, Some(3)));
        assert_eq!(fs::read(&imported).unwrap(), b"twenty");

        dir.remove_group(7);
        assert!(!imported.exists() && !dir.file(7, 20, 2, None).exists());
        assert!(dir.file(8, 5, 1, None).exists());
    }

    #[test]
    fn a_failed_job_leaves_no_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SnapDir::open(tmp.path().to_path_buf()).unwrap();
        let err = dir
            .write(
                1,
                9,
                1,
                Box::new(|_: &mut dyn Write| Err(io::Error::other("boom"))),
            )
            .unwrap_err();
        assert_eq!(err.to_string(), "boom");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
