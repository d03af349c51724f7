//! One virtio-blk request against a disk (virtio 1.2, 5.2.6): the header and any data-out in
//! the device-readable stream, any data-in and then the status byte in the device-writable one.
//! Positions and lengths are checked against the disk before anything is read or written, so a
//! bad request changes nothing and is answered with IOERR (or UNSUPP for what the disk does not
//! do).

use log::debug;
use virtio_blk_proto::{request, status, RangeSegment, RequestHeader, ID_BYTES, SECTOR_SIZE};
use vm_memory::GuestMemory;

use crate::device::segments::Segments;
use crate::scsi::DataError;
use crate::storage::{Storage, StorageError};

/// Largest data-in or data-out transfer of one request: bounds what a driver can make the
/// device stage.
pub const MAX_TRANSFER: usize = 32 << 20;

/// What a request runs against.
pub struct Disk<'a> {
    pub storage: &'a Storage,
    /// Logical block size: positions and lengths must be multiples of it.
    pub block_size: u32,
    pub read_only: bool,
    /// GET_ID's answer, NUL-padded.
    pub id: [u8; ID_BYTES],
    /// Ranges one DISCARD or WRITE_ZEROES request may carry.
    pub max_ranges: u32,
    /// WRITE_ZEROES with the unmap flag may deallocate (and reads of the range return zeros).
    pub write_zeroes_may_unmap: bool,
}

/// How a request ended, for the used ring and for statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// Bytes written into the writable stream (data-in and the status byte).
    pub used_len: u32,
    /// None when the request has no room for a status byte: nothing could be answered.
    pub status: Option<u8>,
    pub request_type: u32,
    /// Data bytes moved to or from the disk.
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    /// The request breaks the disk's rules (range, alignment, read-only): IOERR.
    #[error("{0}")]
    Io(String),
    /// The disk does not do this: UNSUPP.
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Memory(#[from] DataError),
}

/// Runs one request and writes its status byte. Never panics on what the driver sends.
pub fn execute<M: GuestMemory>(mem: &M, seg: &Segments, disk: &Disk<'_>) -> Done {
    let writable = seg.writable.len();
    let mut done = Done { used_len: 0, status: None, request_type: u32::MAX, bytes: 0 };
    if writable == 0 || seg.misordered {
        debug!("virtio-blk request without a status byte, or with its buffers out of order: dropped");
        return done;
    }
    let data_in = writable - 1;
    let mut raw = [0u8; RequestHeader::SIZE];
    let header = if seg.readable.len() < RequestHeader::SIZE || seg.readable.read(mem, 0, &mut raw).is_err() {
        None
    } else {
        RequestHeader::decode(&raw)
    };
    let (result, written) = match header {
        None => (Err(Failure::Io("no request header".into())), 0),
        Some(h) => {
            done.request_type = h.request_type;
            run(mem, seg, disk, &h, data_in, &mut done.bytes)
        }
    };
    let code = match &result {
        Ok(()) => status::OK,
        Err(Failure::Unsupported(why)) => {
            debug!("virtio-blk {}: unsupported: {why}", request::name(done.request_type));
            status::UNSUPP
        }
        Err(e) => {
            debug!("virtio-blk {}: {e}", request::name(done.request_type));
            status::IOERR
        }
    };
    if seg.writable.write(mem, data_in, &[code]).is_err() {
        return done;
    }
    done.status = Some(code);
    done.used_len = written as u32 + 1;
    done
}

/// Answers a request with `code` without running it (an injected fault).
pub fn answer<M: GuestMemory>(mem: &M, seg: &Segments, code: u8) -> Done {
    let mut done = Done { used_len: 0, status: None, request_type: u32::MAX, bytes: 0 };
    let mut raw = [0u8; RequestHeader::SIZE];
    if seg.readable.read(mem, 0, &mut raw).is_ok() {
        done.request_type = RequestHeader::decode(&raw).map_or(u32::MAX, |h| h.request_type);
    }
    let len = seg.writable.len();
    if len > 0 && !seg.misordered && seg.writable.write(mem, len - 1, &[code]).is_ok() {
        done.status = Some(code);
        done.used_len = 1;
    }
    done
}

/// The request's work; returns the data-in bytes written (the used length before the status).
fn run<M: GuestMemory>(
    mem: &M,
    seg: &Segments,
    disk: &Disk<'_>,
    h: &RequestHeader,
    data_in: usize,
    bytes: &mut u64,
) -> (Result<(), Failure>, usize) {
    let data_out = seg.readable.len() - RequestHeader::SIZE;
    match h.request_type {
        request::IN => match range(disk, h.sector, data_in) {
            Err(e) => (Err(e), 0),
            Ok(offset) => {
                let r = disk.storage.read_with(offset, data_in, |pos, bytes: &[u8]| {
                    seg.writable.write(mem, pos, bytes).map_err(Failure::from)
                });
                *bytes = data_in as u64;
                // What reached the buffer counts, whatever happened after.
                (r, if *bytes > 0 { data_in } else { 0 })
            }
        },
        request::OUT => {
            if disk.read_only {
                return (Err(Failure::Io("the disk is read-only".into())), 0);
            }
            let r = range(disk, h.sector, data_out).and_then(|offset| {
                disk.storage.write_with(offset, data_out, |pos, dst: &mut [u8]| {
                    seg.readable.read(mem, RequestHeader::SIZE + pos, dst).map_err(Failure::from)
                })
            });
            if r.is_ok() {
                *bytes = data_out as u64;
            }
            (r, 0)
        }
        request::FLUSH => (disk.storage.flush().map_err(Failure::from), 0),
        request::GET_ID => {
            let n = data_in.min(ID_BYTES);
            (seg.writable.write(mem, 0, &disk.id[..n]).map_err(Failure::from), n)
        }
        request::DISCARD | request::WRITE_ZEROES => {
            (ranges(mem, seg, disk, h.request_type, data_out, bytes), 0)
        }
        t => (Err(Failure::Unsupported(format!("request type {t}"))), 0),
    }
}

/// The byte offset of a transfer of `len` bytes at `sector`: no more than one request may move,
/// and inside the disk.
fn range(disk: &Disk<'_>, sector: u64, len: usize) -> Result<u64, Failure> {
    if len > MAX_TRANSFER {
        return Err(Failure::Io(format!("{len} bytes is more than one request may move ({MAX_TRANSFER})")));
    }
    range_bytes(disk, sector, len as u64)
}

/// DISCARD or WRITE_ZEROES: every range is checked before any is carried out.
fn ranges<M: GuestMemory>(
    mem: &M,
    seg: &Segments,
    disk: &Disk<'_>,
    request_type: u32,
    data_out: usize,
    bytes: &mut u64,
) -> Result<(), Failure> {
    if disk.read_only {
        return Err(Failure::Io("the disk is read-only".into()));
    }
    let count = data_out / RangeSegment::SIZE;
    if data_out % RangeSegment::SIZE != 0 || count == 0 || count > disk.max_ranges as usize {
        return Err(Failure::Unsupported(format!(
            "{data_out} bytes of ranges (whole 16-byte ranges, 1 to {} of them)",
            disk.max_ranges
        )));
    }
    let mut list = Vec::with_capacity(count);
    for i in 0..count {
        let mut raw = [0u8; RangeSegment::SIZE];
        seg.readable.read(mem, RequestHeader::SIZE + i * RangeSegment::SIZE, &mut raw)?;
        let r = match RangeSegment::decode(&raw) {
            Some(Ok(r)) => r,
            Some(Err(flags)) => return Err(Failure::Unsupported(format!("range flags {flags:#x}"))),
            None => unreachable!("a whole range was read"),
        };
        if request_type == request::DISCARD && r.unmap {
            return Err(Failure::Unsupported("the unmap flag on DISCARD".into()));
        }
        let len = u64::from(r.num_sectors) * SECTOR_SIZE;
        let offset = range_bytes(disk, r.sector, len)?;
        list.push((offset, len, r.unmap));
    }
    for (offset, len, unmap) in list {
        if request_type == request::DISCARD || (unmap && disk.write_zeroes_may_unmap) {
            disk.storage.discard(offset, len)?;
        } else {
            write_zeros(disk.storage, offset, len)?;
        }
        *bytes += len;
    }
    Ok(())
}

/// The byte offset of `len` bytes at `sector`, checked against the disk: whole blocks, inside it.
/// (A DISCARD or WRITE_ZEROES range has no transfer limit: nothing is staged.)
fn range_bytes(disk: &Disk<'_>, sector: u64, len: u64) -> Result<u64, Failure> {
    let bs = u64::from(disk.block_size);
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| Failure::Io(format!("sector {sector} is past any disk")))?;
    if offset % bs != 0 || len % bs != 0 {
        return Err(Failure::Io(format!("{len} bytes at sector {sector} are not whole {bs}-byte blocks")));
    }
    if offset.checked_add(len).filter(|&e| e <= disk.storage.len()).is_none() {
        return Err(Failure::Io(format!(
            "{len} bytes at sector {sector} run past the end of the disk ({} bytes)",
            disk.storage.len()
        )));
    }
    Ok(offset)
}

fn write_zeros(storage: &Storage, offset: u64, len: u64) -> Result<(), StorageError> {
    const CHUNK: u64 = 1 << 20;
    let mut at = 0;
    while at < len {
        let n = (len - at).min(CHUNK) as usize;
        storage.write_with(offset + at, n, |_, dst: &mut [u8]| {
            dst.fill(0);
            Ok::<(), StorageError>(())
        })?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x9000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn disk(storage: &Storage, block_size: u32) -> Disk<'_> {
        let mut id = [0u8; ID_BYTES];
        id[..6].copy_from_slice(b"DISK-1");
        Disk { storage, block_size, read_only: false, id, max_ranges: 4, write_zeroes_may_unmap: true }
    }

    /// Header at HDR; `out` bytes of data-out at DATA, or `inn` bytes of data-in there; status.
    fn submit(m: &GuestMemoryMmap, d: &Disk<'_>, t: u32, sector: u64, out: Option<&[u8]>, inn: u32) -> Done {
        m.write_slice(&RequestHeader { request_type: t, ioprio: 0, sector }.encode(), GuestAddress(HDR))
            .unwrap();
        let mut descs = vec![(GuestAddress(HDR), RequestHeader::SIZE as u32, false)];
        if let Some(o) = out {
            m.write_slice(o, GuestAddress(DATA)).unwrap();
            descs.push((GuestAddress(DATA), o.len() as u32, false));
        }
        if inn > 0 {
            descs.push((GuestAddress(DATA), inn, true));
        }
        descs.push((GuestAddress(STATUS), 1, true));
        m.write_slice(&[0xee], GuestAddress(STATUS)).unwrap();
        execute(m, &Segments::from_descriptors(descs.into_iter()), d)
    }

    fn status_byte(m: &GuestMemoryMmap) -> u8 {
        let mut b = [0u8; 1];
        m.read_slice(&mut b, GuestAddress(STATUS)).unwrap();
        b[0]
    }

    #[test]
    fn write_then_read_back_flush_and_id() {
        let m = mem();
        let s = Storage::ram(1 << 20);
        let d = disk(&s, 512);
        let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        let w = submit(&m, &d, request::OUT, 8, Some(&data), 0);
        assert_eq!((w.status, w.used_len, w.bytes), (Some(status::OK), 1, 1024));
        let mut on_disk = vec![0u8; 1024];
        s.read(8 * 512, &mut on_disk).unwrap();
        assert_eq!(on_disk, data);

        m.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        let r = submit(&m, &d, request::IN, 8, None, 1024);
        assert_eq!((r.status, r.used_len), (Some(status::OK), 1025));
        let mut back = vec![0u8; 1024];
        m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, data);
        assert_eq!(status_byte(&m), status::OK);

        assert_eq!(submit(&m, &d, request::FLUSH, 0, None, 0).status, Some(status::OK));
        let id = submit(&m, &d, request::GET_ID, 0, None, 20);
        assert_eq!((id.status, id.used_len), (Some(status::OK), 21));
        let mut got = [0u8; 20];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(&got[..7], b"DISK-1\0");
    }

    #[test]
    fn bad_ranges_change_nothing_and_answer_ioerr() {
        let m = mem();
        let s = Storage::ram(64 * 1024);
        let d = disk(&s, 4096);
        let data = vec![0xabu8; 8192];
        // Not whole 4 KiB blocks, past the end, a sector number that overflows.
        for (sector, len) in [(1u64, 4096usize), (0, 512), (120, 8192), (u64::MAX / 256, 4096)] {
            let w = submit(&m, &d, request::OUT, sector, Some(&data[..len]), 0);
            assert_eq!(w.status, Some(status::IOERR), "sector {sector} len {len}");
        }
        let r = submit(&m, &d, request::IN, 128, None, 4096);
        assert_eq!((r.status, r.used_len), (Some(status::IOERR), 1), "read past the end");
        let Storage::Ram(ram) = &s else { unreachable!() };
        assert_eq!(ram.allocated(), 0, "nothing was written");

        let ro = Disk { read_only: true, ..disk(&s, 4096) };
        assert_eq!(submit(&m, &ro, request::OUT, 0, Some(&data[..4096]), 0).status, Some(status::IOERR));
        assert_eq!(submit(&m, &d, 99, 0, None, 0).status, Some(status::UNSUPP));
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = mem();
        let s = Storage::ram(1 << 20);
        let d = disk(&s, 512);
        s.write(0, &vec![0x55u8; 64 * 1024]).unwrap();
        let seg = |sector, n, unmap| RangeSegment { sector, num_sectors: n, unmap }.encode();
        let mut list = Vec::new();
        list.extend_from_slice(&seg(0, 8, false));
        list.extend_from_slice(&seg(64, 8, true));
        let z = submit(&m, &d, request::WRITE_ZEROES, 0, Some(&list), 0);
        assert_eq!((z.status, z.bytes), (Some(status::OK), 8192));
        let mut b = vec![0u8; 4096];
        s.read(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        s.read(64 * 512, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        s.read(8 * 512, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0x55), "between the ranges: untouched");

        assert_eq!(submit(&m, &d, request::DISCARD, 0, Some(&seg(16, 8, false)), 0).status, Some(status::OK));
        // The unmap flag is for WRITE_ZEROES only; reserved flags and too many ranges are refused.
        assert_eq!(
            submit(&m, &d, request::DISCARD, 0, Some(&seg(16, 8, true)), 0).status,
            Some(status::UNSUPP)
        );
        let mut bad = seg(0, 8, false);
        bad[12] = 0x4;
        assert_eq!(submit(&m, &d, request::WRITE_ZEROES, 0, Some(&bad), 0).status, Some(status::UNSUPP));
        let five: Vec<u8> = (0..5).flat_map(|i| seg(i * 8, 8, false)).collect();
        assert_eq!(submit(&m, &d, request::DISCARD, 0, Some(&five), 0).status, Some(status::UNSUPP));
        // One bad range: none of them is carried out.
        s.write(0, &vec![0x66u8; 512]).unwrap();
        let mut mixed = seg(0, 1, false).to_vec();
        mixed.extend_from_slice(&seg(1 << 30, 1, false));
        assert_eq!(submit(&m, &d, request::WRITE_ZEROES, 0, Some(&mixed), 0).status, Some(status::IOERR));
        let mut first = [0u8; 512];
        s.read(0, &mut first).unwrap();
        assert!(first.iter().all(|&x| x == 0x66));
    }

    #[test]
    fn malformed_requests() {
        let m = mem();
        let s = Storage::ram(1 << 20);
        let d = disk(&s, 512);
        // No writable byte: nothing can be answered.
        let none = Segments::from_descriptors([(GuestAddress(HDR), 16, false)].into_iter());
        assert_eq!(execute(&m, &none, &d).status, None);
        // A short header: IOERR.
        let short = Segments::from_descriptors(
            [(GuestAddress(HDR), 8, false), (GuestAddress(STATUS), 1, true)].into_iter(),
        );
        assert_eq!(execute(&m, &short, &d).status, Some(status::IOERR));
        // A header outside memory: IOERR, and the status still lands.
        let wild = Segments::from_descriptors(
            [(GuestAddress(0xfff0_0000), 16, false), (GuestAddress(STATUS), 1, true)].into_iter(),
        );
        assert_eq!(execute(&m, &wild, &d).status, Some(status::IOERR));
        assert_eq!(status_byte(&m), status::IOERR);
    }
}
