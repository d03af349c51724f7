//! A request's buffers as two byte streams: the device-readable part (header, then data-out) and
//! the device-writable part (response, then data-in), however the driver split them into
//! descriptors. The spec lets a driver frame a request any way it likes, so nothing here assumes
//! that the header sits alone in the first descriptor.

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::scsi::{DataError, DataIn, DataOut};

/// Descriptors of one chain, split by direction.
#[derive(Clone, Debug, Default)]
pub struct Segments {
    pub readable: Stream,
    pub writable: Stream,
    /// A readable descriptor followed a writable one, which the spec forbids.
    pub misordered: bool,
}

impl Segments {
    pub fn from_descriptors(descs: impl Iterator<Item = (GuestAddress, u32, bool)>) -> Self {
        let mut s = Segments::default();
        for (addr, len, write_only) in descs {
            if write_only {
                s.writable.push(addr, len);
            } else {
                if !s.writable.parts.is_empty() {
                    s.misordered = true;
                }
                s.readable.push(addr, len);
            }
        }
        s
    }
}

/// A scatter list of guest memory read or written at byte offsets.
#[derive(Clone, Debug, Default)]
pub struct Stream {
    parts: Vec<(GuestAddress, u32)>,
    len: usize,
}

impl Stream {
    fn push(&mut self, addr: GuestAddress, len: u32) {
        if len > 0 {
            self.parts.push((addr, len));
            self.len += len as usize;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f(guest_address, range_in_buf)` for every piece of `[offset, offset + n)`.
    fn for_each_piece(
        &self,
        offset: usize,
        n: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), DataError>,
    ) -> Result<(), DataError> {
        let end = offset.checked_add(n).filter(|&e| e <= self.len).ok_or(DataError::OutOfRange {
            offset,
            len: n,
            capacity: self.len,
        })?;
        let mut base = 0usize;
        let mut done = offset;
        for &(addr, plen) in &self.parts {
            let pend = base + plen as usize;
            if done < pend && done < end {
                let start_in_part = done - base;
                let take = (pend - done).min(end - done);
                // A descriptor at the top of the address space must not wrap around to low memory.
                let at = addr.checked_add(start_in_part as u64).ok_or_else(|| {
                    DataError::Memory(format!("buffer at {:#x} wraps around the address space", addr.0))
                })?;
                f(at, done - offset..done - offset + take)?;
                done += take;
            }
            if done >= end {
                break;
            }
            base = pend;
        }
        Ok(())
    }

    pub fn read<M: GuestMemory>(&self, mem: &M, offset: usize, dst: &mut [u8]) -> Result<(), DataError> {
        self.for_each_piece(offset, dst.len(), |addr, r| {
            let dst = &mut dst[r];
            match within_region(mem, addr, dst.len()) {
                Some((region, at)) => region.read_slice(dst, at),
                None => mem.read_slice(dst, addr),
            }
            .map_err(memory_error)
        })
    }

    pub fn write<M: GuestMemory>(&self, mem: &M, offset: usize, src: &[u8]) -> Result<(), DataError> {
        self.for_each_piece(offset, src.len(), |addr, r| {
            let src = &src[r];
            match within_region(mem, addr, src.len()) {
                Some((region, at)) => region.write_slice(src, at),
                None => mem.write_slice(src, addr),
            }
            .map_err(memory_error)
        })
    }

    /// Whether `[offset, offset + n)` lies within the stream and in mapped memory.
    pub fn check<M: GuestMemory>(&self, mem: &M, offset: usize, n: usize) -> Result<(), DataError> {
        self.for_each_piece(offset, n, |addr, r| {
            if mem.check_range(addr, r.len()) {
                Ok(())
            } else {
                Err(DataError::Memory(format!("{} bytes at {:#x} are not in shared memory", r.len(), addr.0)))
            }
        })
    }
}

/// The region holding all of `[addr, addr + len)`, and where in it the range starts. A piece
/// almost always lies in one region, and is then copied through that region directly: the
/// memory-wide copy walks the regions with an iterator that the compiler does not always inline,
/// which costs the target a third of its request rate when it does not. Pieces that span
/// regions (or fall outside them) take the memory-wide path, which handles and reports them.
fn within_region<M: GuestMemory>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
) -> Option<(&M::R, MemoryRegionAddress)> {
    let (region, at) = mem.to_region_addr(addr)?;
    let end = at.raw_value().checked_add(len as u64)?;
    (end <= region.len()).then_some((region, at))
}

fn memory_error(e: GuestMemoryError) -> DataError {
    DataError::Memory(e.to_string())
}

/// The data-out part of a request: the readable stream past the request header.
pub struct GuestDataOut<'a, M> {
    pub mem: &'a M,
    pub stream: &'a Stream,
    pub skip: usize,
}

impl<M: GuestMemory> DataOut for GuestDataOut<'_, M> {
    fn len(&self) -> usize {
        self.stream.len().saturating_sub(self.skip)
    }

    fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), DataError> {
        self.stream.read(self.mem, self.skip + offset, dst)
    }
}

/// The data-in part of a request: the writable stream past the response header.
pub struct GuestDataIn<'a, M> {
    pub mem: &'a M,
    pub stream: &'a Stream,
    pub skip: usize,
    /// Writes kept aside, by offset, once the command asked to hold them back.
    pub held: Option<Vec<(usize, Vec<u8>)>>,
}

impl<'a, M: GuestMemory> GuestDataIn<'a, M> {
    pub fn new(mem: &'a M, stream: &'a Stream, skip: usize) -> Self {
        GuestDataIn { mem, stream, skip, held: None }
    }

    /// The writes held back so far, to be written with [`Stream::write`] at `skip + offset`.
    pub fn take_held(&mut self) -> Vec<(usize, Vec<u8>)> {
        self.held.take().unwrap_or_default()
    }
}

impl<M: GuestMemory> DataIn for GuestDataIn<'_, M> {
    fn capacity(&self) -> usize {
        self.stream.len().saturating_sub(self.skip)
    }

    fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), DataError> {
        let Some(held) = self.held.as_mut() else {
            return self.stream.write(self.mem, self.skip + offset, src);
        };
        // Fail now, as a direct write would, rather than when the bytes are finally written.
        self.stream.check(self.mem, self.skip + offset, src.len())?;
        held.push((offset, src.to_vec()));
        Ok(())
    }

    fn hold_back(&mut self) {
        self.held.get_or_insert_with(Vec::new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn streams_span_descriptors() {
        let m = mem();
        let s = Segments::from_descriptors(
            [
                (GuestAddress(0x100), 3, false),
                (GuestAddress(0x200), 5, false),
                (GuestAddress(0x300), 4, true),
            ]
            .into_iter(),
        );
        assert!(!s.misordered);
        assert_eq!(s.readable.len(), 8);
        m.write_slice(&[1, 2, 3], GuestAddress(0x100)).unwrap();
        m.write_slice(&[4, 5, 6, 7, 8], GuestAddress(0x200)).unwrap();
        let mut buf = [0u8; 4];
        s.readable.read(&m, 2, &mut buf).unwrap();
        assert_eq!(buf, [3, 4, 5, 6]);
        s.writable.write(&m, 1, &[9, 9]).unwrap();
        let mut out = [0u8; 4];
        m.read_slice(&mut out, GuestAddress(0x300)).unwrap();
        assert_eq!(out, [0, 9, 9, 0]);
        assert!(s.writable.write(&m, 3, &[1, 1]).is_err());
    }

    #[test]
    fn a_piece_may_span_adjacent_regions_but_not_run_off_memory() {
        let m: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
                .unwrap();
        let s = Segments::from_descriptors([(GuestAddress(0xff8), 16, true)].into_iter());
        let data: Vec<u8> = (1..=16).collect();
        s.writable.write(&m, 0, &data).unwrap();
        let mut back = [0u8; 16];
        s.writable.read(&m, 0, &mut back).unwrap();
        assert_eq!(back[..], data[..]);
        let mut raw = [0u8; 8];
        m.read_slice(&mut raw, GuestAddress(0x1000)).unwrap();
        assert_eq!(raw[..], data[8..], "the second half landed in the second region");
        let off_end = Segments::from_descriptors([(GuestAddress(0x1ff8), 16, true)].into_iter());
        assert!(matches!(off_end.writable.write(&m, 0, &data), Err(DataError::Memory(_))));
    }

    #[test]
    fn misordered_and_unmapped() {
        let m = mem();
        let s = Segments::from_descriptors(
            [(GuestAddress(0x100), 4, true), (GuestAddress(0x200), 4, false)].into_iter(),
        );
        assert!(s.misordered);
        let bad = Segments::from_descriptors([(GuestAddress(0xfff0_0000), 16, true)].into_iter());
        assert!(matches!(bad.writable.write(&m, 0, &[0; 16]), Err(DataError::Memory(_))));
        assert!(matches!(bad.writable.check(&m, 0, 16), Err(DataError::Memory(_))));
    }

    #[test]
    fn offsets_into_a_buffer_at_the_top_of_memory_do_not_wrap() {
        let m = mem();
        let top = Segments::from_descriptors([(GuestAddress(u64::MAX - 7), 64, true)].into_iter());
        assert!(matches!(top.writable.write(&m, 16, &[1; 8]), Err(DataError::Memory(_))));
        assert!(matches!(top.writable.read(&m, 16, &mut [0; 8]), Err(DataError::Memory(_))));
        let mut raw = [0u8; 32];
        m.read_slice(&mut raw, GuestAddress(0)).unwrap();
        assert_eq!(raw, [0; 32], "nothing written at the wrapped address");
    }

    #[test]
    fn held_back_data_in_touches_no_memory() {
        let m = mem();
        let s = Segments::from_descriptors(
            [(GuestAddress(0x100), 4, true), (GuestAddress(0x200), 8, true)].into_iter(),
        );
        let mut inp = GuestDataIn::new(&m, &s.writable, 2);
        assert_eq!(inp.capacity(), 10);
        inp.write_at(0, &[1, 2]).unwrap();
        inp.hold_back();
        inp.write_at(2, &[3, 4, 5]).unwrap();
        assert!(inp.write_at(8, &[0; 3]).is_err(), "out of range is reported at once");
        let held = inp.take_held();
        assert_eq!(held, vec![(2, vec![3, 4, 5])]);
        let mut raw = [0u8; 4];
        m.read_slice(&mut raw, GuestAddress(0x100)).unwrap();
        assert_eq!(raw, [0, 0, 1, 2]);
        m.read_slice(&mut raw, GuestAddress(0x200)).unwrap();
        assert_eq!(raw, [0; 4], "held bytes were written");

        let wild = Segments::from_descriptors([(GuestAddress(0xfff0_0000), 64, true)].into_iter());
        let mut inp = GuestDataIn::new(&m, &wild.writable, 0);
        inp.hold_back();
        assert!(matches!(inp.write_at(0, &[1; 8]), Err(DataError::Memory(_))));
    }
}
