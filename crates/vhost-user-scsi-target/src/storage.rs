//! Backing stores for the target's logical units: sparse RAM, null and regular files.
//!
//! All stores are shared by the request-queue workers, so every method takes `&self`. Data moves
//! through `read_with` / `write_with`, which hand the caller the store's own memory segment by
//! segment; that lets a RAM LUN copy straight between its chunks and guest memory.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// RAM allocation unit; also the granularity at which a discard frees memory.
pub const CHUNK_SIZE: usize = 64 * 1024;
/// Chunk maps are split so that writers to neighbouring chunks rarely share a lock.
const SHARDS: usize = 16;
/// Bounce buffer size for file I/O.
const FILE_SEGMENT: usize = 1024 * 1024;

static ZEROS: [u8; CHUNK_SIZE] = [0; CHUNK_SIZE];

thread_local! {
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("access of {len} bytes at offset {offset} is beyond the end of the store ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{op} failed on '{}': {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open '{}': {source}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("'{}' is not a regular file or block device", .path.display())]
    NotAFile { path: PathBuf },
    #[error("'{}' is opened read-only", .path.display())]
    ReadOnly { path: PathBuf },
}

/// One logical unit's data.
#[derive(Debug)]
pub enum Storage {
    Ram(RamStore),
    Null(NullStore),
    File(FileStore),
}

impl Storage {
    pub fn ram(bytes: u64) -> Storage {
        Storage::Ram(RamStore::new(bytes))
    }

    pub fn null(bytes: u64) -> Storage {
        Storage::Null(NullStore { len: AtomicU64::new(bytes) })
    }

    pub fn open_file(path: &Path, read_only: bool) -> Result<Storage, StorageError> {
        FileStore::open(path, read_only).map(Storage::File)
    }

    /// "ram", "null" or "file".
    pub fn kind(&self) -> &'static str {
        match self {
            Storage::Ram(_) => "ram",
            Storage::Null(_) => "null",
            Storage::File(_) => "file",
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            Storage::Ram(s) => s.len.load(Ordering::Acquire),
            Storage::Null(s) => s.len.load(Ordering::Acquire),
            Storage::File(s) => s.len.load(Ordering::Acquire),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        let size = self.len();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(StorageError::OutOfRange { offset, len, size }),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        self.read_with(offset, buf.len(), |pos, seg: &[u8]| {
            buf[pos..pos + seg.len()].copy_from_slice(seg);
            Ok::<(), StorageError>(())
        })
    }

    /// Writes `buf` at `offset`.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), StorageError> {
        self.write_with(offset, buf.len(), |pos, seg: &mut [u8]| {
            seg.copy_from_slice(&buf[pos..pos + seg.len()]);
            Ok::<(), StorageError>(())
        })
    }

    /// Reads `len` bytes at `offset`, calling `sink(position, bytes)` for consecutive segments,
    /// where `position` counts from the start of the request.
    pub fn read_with<E, F>(&self, offset: u64, len: usize, sink: F) -> Result<(), E>
    where
        E: From<StorageError>,
        F: FnMut(usize, &[u8]) -> Result<(), E>,
    {
        self.check(offset, len as u64)?;
        match self {
            Storage::Ram(s) => s.read_with(offset, len, sink),
            Storage::Null(_) => zeros_with(len, sink),
            Storage::File(s) => s.read_with(offset, len, sink),
        }
    }

    /// Writes `len` bytes at `offset`, calling `source(position, segment)` to fill consecutive
    /// segments of the store before they are committed. A null store never calls `source`.
    pub fn write_with<E, F>(&self, offset: u64, len: usize, source: F) -> Result<(), E>
    where
        E: From<StorageError>,
        F: FnMut(usize, &mut [u8]) -> Result<(), E>,
    {
        self.check(offset, len as u64)?;
        match self {
            Storage::Ram(s) => s.write_with(offset, len, source),
            Storage::Null(_) => Ok(()),
            Storage::File(s) => s.write_with(offset, len, source),
        }
    }

    /// Deallocates a byte range; it reads as zeros afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.check(offset, len)?;
        match self {
            Storage::Ram(s) => s.discard(offset, len),
            Storage::Null(_) => Ok(()),
            Storage::File(s) => s.discard(offset, len),
        }
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> Result<(), StorageError> {
        match self {
            Storage::File(s) => s.file.sync_data().map_err(|e| s.io("fdatasync", e)),
            _ => Ok(()),
        }
    }

    /// Changes the size. Bytes beyond the old size read as zeros after growing.
    pub fn resize(&self, bytes: u64) -> Result<(), StorageError> {
        match self {
            Storage::Ram(s) => {
                s.resize(bytes);
                Ok(())
            }
            Storage::Null(s) => {
                s.len.store(bytes, Ordering::Release);
                Ok(())
            }
            Storage::File(s) => s.resize(bytes),
        }
    }
}

fn zeros_with<E, F>(len: usize, mut sink: F) -> Result<(), E>
where
    F: FnMut(usize, &[u8]) -> Result<(), E>,
{
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(CHUNK_SIZE);
        sink(pos, &ZEROS[..n])?;
        pos += n;
    }
    Ok(())
}

/// Splits `[offset, offset + len)` into pieces that do not cross a chunk boundary:
/// yields (chunk index, offset within chunk, length, position within the request).
fn chunk_pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize, u64)> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let index = at / CHUNK_SIZE as u64;
        let within = (at % CHUNK_SIZE as u64) as usize;
        let n = (CHUNK_SIZE - within).min((end - at) as usize);
        let piece = (index, within, n, at - offset);
        at += n as u64;
        Some(piece)
    })
}

/// Discards nothing; reads zeros.
#[derive(Debug)]
pub struct NullStore {
    len: AtomicU64,
}

/// Sparse memory: chunks are allocated on first write; unallocated chunks read as zeros.
#[derive(Debug)]
pub struct RamStore {
    len: AtomicU64,
    shards: Box<[RwLock<Shard>]>,
}

/// Allocated chunks by index.
type Shard = HashMap<u64, Box<[u8]>>;

impl RamStore {
    fn new(bytes: u64) -> RamStore {
        let shards = (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect();
        RamStore { len: AtomicU64::new(bytes), shards }
    }

    // A panic while holding a shard lock cannot leave a chunk half-allocated, so poisoning is
    // not a reason to fail every later request.
    fn shard_read(&self, index: u64) -> RwLockReadGuard<'_, Shard> {
        self.shards[index as usize % SHARDS].read().unwrap_or_else(|e| e.into_inner())
    }

    fn shard_write(&self, index: u64) -> RwLockWriteGuard<'_, Shard> {
        self.shards[index as usize % SHARDS].write().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of memory currently allocated for data.
    pub fn allocated(&self) -> u64 {
        let chunks: usize =
            self.shards.iter().map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len()).sum();
        (chunks * CHUNK_SIZE) as u64
    }

    fn read_with<E, F>(&self, offset: u64, len: usize, mut sink: F) -> Result<(), E>
    where
        F: FnMut(usize, &[u8]) -> Result<(), E>,
    {
        for (index, within, n, pos) in chunk_pieces(offset, len as u64) {
            let shard = self.shard_read(index);
            match shard.get(&index) {
                Some(chunk) => sink(pos as usize, &chunk[within..within + n])?,
                None => sink(pos as usize, &ZEROS[..n])?,
            }
        }
        Ok(())
    }

    fn write_with<E, F>(&self, offset: u64, len: usize, mut source: F) -> Result<(), E>
    where
        E: From<StorageError>,
        F: FnMut(usize, &mut [u8]) -> Result<(), E>,
    {
        for (index, within, n, pos) in chunk_pieces(offset, len as u64) {
            let mut shard = self.shard_write(index);
            // Re-checked under the shard lock: a concurrent shrink stores the new length before
            // it frees chunks, so a write can never re-create a chunk past the end.
            let size = self.len.load(Ordering::Acquire);
            let start = offset + pos;
            if start + n as u64 > size {
                return Err(StorageError::OutOfRange { offset: start, len: n as u64, size }.into());
            }
            let chunk = shard.entry(index).or_insert_with(|| vec![0u8; CHUNK_SIZE].into_boxed_slice());
            source(pos as usize, &mut chunk[within..within + n])?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        for (index, within, n, _) in chunk_pieces(offset, len) {
            let mut shard = self.shard_write(index);
            if n == CHUNK_SIZE {
                shard.remove(&index);
            } else if let Some(chunk) = shard.get_mut(&index) {
                chunk[within..within + n].fill(0);
            }
        }
        Ok(())
    }

    fn resize(&self, bytes: u64) {
        let old = self.len.swap(bytes, Ordering::AcqRel);
        if bytes >= old {
            return;
        }
        // Drop whatever lies past the new end so that growing again exposes zeros.
        let first_gone = bytes.div_ceil(CHUNK_SIZE as u64);
        for shard in self.shards.iter() {
            shard.write().unwrap_or_else(|e| e.into_inner()).retain(|&index, _| index < first_gone);
        }
        let within = (bytes % CHUNK_SIZE as u64) as usize;
        if within != 0 {
            let index = bytes / CHUNK_SIZE as u64;
            if let Some(chunk) = self.shard_write(index).get_mut(&index) {
                chunk[within..].fill(0);
            }
        }
    }
}

/// A regular file (or block device) accessed with positional I/O.
#[derive(Debug)]
pub struct FileStore {
    file: File,
    path: PathBuf,
    read_only: bool,
    len: AtomicU64,
    /// Cleared once the filesystem refuses hole punching, so later discards write zeros at once.
    punch_holes: AtomicBool,
}

impl FileStore {
    fn open(path: &Path, read_only: bool) -> Result<FileStore, StorageError> {
        let open_err = |source| StorageError::Open { path: path.to_path_buf(), source };
        let mut file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if meta.is_dir() {
            return Err(StorageError::NotAFile { path: path.to_path_buf() });
        }
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let len = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        Ok(FileStore {
            file,
            path: path.to_path_buf(),
            read_only,
            len: AtomicU64::new(len),
            punch_holes: AtomicBool::new(true),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, op: &'static str, source: io::Error) -> StorageError {
        StorageError::Io { op, path: self.path.clone(), source }
    }

    fn read_with<E, F>(&self, offset: u64, len: usize, mut sink: F) -> Result<(), E>
    where
        E: From<StorageError>,
        F: FnMut(usize, &[u8]) -> Result<(), E>,
    {
        with_bounce(len, |buf| {
            let mut pos = 0;
            while pos < len {
                let n = (len - pos).min(buf.len());
                self.file
                    .read_exact_at(&mut buf[..n], offset + pos as u64)
                    .map_err(|e| self.io("read", e))?;
                sink(pos, &buf[..n])?;
                pos += n;
            }
            Ok(())
        })
    }

    fn write_with<E, F>(&self, offset: u64, len: usize, mut source: F) -> Result<(), E>
    where
        E: From<StorageError>,
        F: FnMut(usize, &mut [u8]) -> Result<(), E>,
    {
        if self.read_only {
            return Err(StorageError::ReadOnly { path: self.path.clone() }.into());
        }
        with_bounce(len, |buf| {
            let mut pos = 0;
            while pos < len {
                let n = (len - pos).min(buf.len());
                source(pos, &mut buf[..n])?;
                self.file.write_all_at(&buf[..n], offset + pos as u64).map_err(|e| self.io("write", e))?;
                pos += n;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        if self.read_only {
            return Err(StorageError::ReadOnly { path: self.path.clone() });
        }
        if len == 0 {
            return Ok(());
        }
        if self.punch_holes.load(Ordering::Relaxed) {
            let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
                return Err(StorageError::OutOfRange { offset, len, size: self.len.load(Ordering::Acquire) });
            };
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: fallocate only reads its integer arguments; the descriptor stays open for
            // the duration of the call because `self.file` is borrowed.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                    self.punch_holes.store(false, Ordering::Relaxed);
                }
                _ => return Err(self.io("fallocate", err)),
            }
        }
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(CHUNK_SIZE as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], offset + pos).map_err(|e| self.io("write", e))?;
            pos += n as u64;
        }
        Ok(())
    }

    fn resize(&self, bytes: u64) -> Result<(), StorageError> {
        if self.read_only {
            return Err(StorageError::ReadOnly { path: self.path.clone() });
        }
        self.file.set_len(bytes).map_err(|e| self.io("truncate", e))?;
        self.len.store(bytes, Ordering::Release);
        Ok(())
    }
}

/// Runs `f` with this thread's bounce buffer, sized for at most one file segment.
fn with_bounce<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    let want = len.clamp(1, FILE_SEGMENT);
    BOUNCE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < want {
                buf.resize(want, 0);
            }
            f(&mut buf[..want])
        }
        // Only reachable if a sink re-enters the same store; give it a buffer of its own.
        Err(_) => f(&mut vec![0u8; want]),
    })
}

/// Parses a byte count with an optional binary K/M/G/T suffix.
pub fn parse_size(field: &str) -> Result<u64, String> {
    let bad = || format!("size '{field}' is not a byte count with optional K/M/G/T suffix");
    let (digits, shift) = match field.as_bytes().last().map(u8::to_ascii_uppercase) {
        Some(b'K') => (&field[..field.len() - 1], 10),
        Some(b'M') => (&field[..field.len() - 1], 20),
        Some(b'G') => (&field[..field.len() - 1], 30),
        Some(b'T') => (&field[..field.len() - 1], 40),
        _ => (field, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| format!("size '{field}' is too large"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size '{field}' is too large"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A unique path in the temporary directory, removed on drop.
    pub(crate) struct TempFile(pub PathBuf);

    impl TempFile {
        pub(crate) fn new(tag: &str, bytes: u64) -> TempFile {
            use std::sync::atomic::AtomicU32;
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let name =
                format!("vust-{}-{}-{}.img", tag, std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
            let path = std::env::temp_dir().join(name);
            let f = File::create(&path).unwrap();
            f.set_len(bytes).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    fn round_trip(s: &Storage) {
        let size = s.len();
        // Crosses a chunk boundary and touches the last byte.
        let data = pattern(3 * CHUNK_SIZE / 2, 7);
        s.write(CHUNK_SIZE as u64 / 2, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        s.read(CHUNK_SIZE as u64 / 2, &mut back).unwrap();
        assert_eq!(back, data);
        s.write(size - 4, &[1, 2, 3, 4]).unwrap();
        let mut tail = [0u8; 4];
        s.read(size - 4, &mut tail).unwrap();
        assert_eq!(tail, [1, 2, 3, 4]);
        assert!(matches!(s.write(size - 3, &[0; 4]), Err(StorageError::OutOfRange { .. })));
        assert!(matches!(s.read(size, &mut [0; 1]), Err(StorageError::OutOfRange { .. })));
    }

    #[test]
    fn ram_round_trip_and_sparse_reads() {
        let s = Storage::ram(4 * CHUNK_SIZE as u64);
        let mut buf = vec![0xffu8; 100];
        s.read(10, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        round_trip(&s);
        let Storage::Ram(ram) = &s else { unreachable!() };
        // Chunks 0, 1 and 3 were written.
        assert_eq!(ram.allocated(), 3 * CHUNK_SIZE as u64);
    }

    #[test]
    fn ram_discard_frees_whole_chunks_and_zeroes_partial_ones() {
        let s = Storage::ram(4 * CHUNK_SIZE as u64);
        s.write(0, &vec![0xaa; 4 * CHUNK_SIZE]).unwrap();
        // Partial head of chunk 0, all of chunk 1, partial start of chunk 2.
        s.discard(CHUNK_SIZE as u64 - 8, CHUNK_SIZE as u64 + 16).unwrap();
        let Storage::Ram(ram) = &s else { unreachable!() };
        assert_eq!(ram.allocated(), 3 * CHUNK_SIZE as u64);
        let mut buf = vec![0u8; 4 * CHUNK_SIZE];
        s.read(0, &mut buf).unwrap();
        let start = CHUNK_SIZE - 8;
        let end = 2 * CHUNK_SIZE + 8;
        assert!(buf[..start].iter().all(|&b| b == 0xaa));
        assert!(buf[start..end].iter().all(|&b| b == 0));
        assert!(buf[end..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn ram_shrink_then_grow_reads_zeros() {
        let s = Storage::ram(2 * CHUNK_SIZE as u64);
        s.write(0, &vec![0x55; 2 * CHUNK_SIZE]).unwrap();
        s.resize(100).unwrap();
        assert_eq!(s.len(), 100);
        s.resize(2 * CHUNK_SIZE as u64).unwrap();
        let mut buf = vec![0u8; 2 * CHUNK_SIZE];
        s.read(0, &mut buf).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 0x55));
        assert!(buf[100..].iter().all(|&b| b == 0));
    }

    #[test]
    fn null_reads_zeros_and_ignores_writes() {
        let s = Storage::null(1 << 20);
        s.write(0, &[9; 512]).unwrap();
        let mut buf = [1u8; 512];
        s.read(0, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 512]);
        assert!(s.read((1 << 20) - 1, &mut [0; 2]).is_err());
    }

    #[test]
    fn file_round_trip_punch_and_resize() {
        let tmp = TempFile::new("store", 4 * CHUNK_SIZE as u64);
        let s = Storage::open_file(&tmp.0, false).unwrap();
        assert_eq!(s.len(), 4 * CHUNK_SIZE as u64);
        round_trip(&s);
        s.write(0, &vec![0x77; 3 * CHUNK_SIZE]).unwrap();
        s.discard(4096, 2 * CHUNK_SIZE as u64).unwrap();
        s.flush().unwrap();
        let mut buf = vec![0u8; 3 * CHUNK_SIZE];
        s.read(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0x77));
        assert!(buf[4096..4096 + 2 * CHUNK_SIZE].iter().all(|&b| b == 0));
        assert!(buf[4096 + 2 * CHUNK_SIZE..].iter().all(|&b| b == 0x77));
        s.resize(8 * CHUNK_SIZE as u64).unwrap();
        assert_eq!(std::fs::metadata(&tmp.0).unwrap().len(), 8 * CHUNK_SIZE as u64);
    }

    #[test]
    fn file_read_only_refuses_writes() {
        let tmp = TempFile::new("ro", 8192);
        let s = Storage::open_file(&tmp.0, true).unwrap();
        assert!(matches!(s.write(0, &[1]), Err(StorageError::ReadOnly { .. })));
        assert!(matches!(s.discard(0, 512), Err(StorageError::ReadOnly { .. })));
        let mut buf = [1u8; 16];
        s.read(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 16]);
    }

    #[test]
    fn missing_file_names_the_path() {
        let path = std::env::temp_dir().join("vust-definitely-missing.img");
        let err = Storage::open_file(&path, false).unwrap_err();
        assert!(err.to_string().contains("vust-definitely-missing.img"), "{err}");
        let dir = std::env::temp_dir();
        let err = Storage::open_file(&dir, true).unwrap_err();
        assert!(matches!(err, StorageError::NotAFile { .. }), "{err}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("3M"), Ok(3 << 20));
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1.5G").is_err());
    }
}
