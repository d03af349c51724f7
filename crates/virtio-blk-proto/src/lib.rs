//! Wire layouts of virtio-blk (virtio 1.2, section 5.2): feature bits, the configuration space,
//! the request header and status byte, and the discard / write-zeroes segment.
//!
//! As in `virtio-scsi-proto`, every structure is encoded and decoded explicitly in
//! little-endian byte order: no host struct layout, no `unsafe`.

/// Device ID of virtio-blk.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// virtio-blk counts capacity and request positions in 512-byte sectors, whatever the block
/// size.
pub const SECTOR_SIZE: u64 = 512;

/// Bytes of the device ID GET_ID returns (shorter IDs are NUL-padded).
pub const ID_BYTES: usize = 20;

/// Feature bits (virtio 1.2, 5.2.3).
pub mod feature {
    pub const SIZE_MAX: u32 = 1;
    pub const SEG_MAX: u32 = 2;
    pub const GEOMETRY: u32 = 4;
    pub const RO: u32 = 5;
    pub const BLK_SIZE: u32 = 6;
    pub const FLUSH: u32 = 9;
    pub const TOPOLOGY: u32 = 10;
    pub const CONFIG_WCE: u32 = 11;
    pub const MQ: u32 = 12;
    pub const DISCARD: u32 = 13;
    pub const WRITE_ZEROES: u32 = 14;
}

/// Request types (the header's `type`).
pub mod request {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;

    /// Name of a request type, for errors and logs.
    pub fn name(t: u32) -> &'static str {
        match t {
            IN => "IN",
            OUT => "OUT",
            FLUSH => "FLUSH",
            GET_ID => "GET_ID",
            DISCARD => "DISCARD",
            WRITE_ZEROES => "WRITE_ZEROES",
            _ => "UNKNOWN",
        }
    }
}

/// The status byte the device writes last.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;

    /// Name of a status value, for errors and logs.
    pub fn name(s: u8) -> &'static str {
        match s {
            OK => "OK",
            IOERR => "IOERR",
            UNSUPP => "UNSUPP",
            _ => "UNKNOWN",
        }
    }
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// The request header: the first (device-readable) bytes of every request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestHeader {
    pub request_type: u32,
    /// I/O priority; drivers write 0.
    pub ioprio: u32,
    /// Position in 512-byte sectors (IN, OUT; 0 for the others).
    pub sector: u64,
}

impl RequestHeader {
    pub const SIZE: usize = 16;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.request_type.to_le_bytes());
        b[4..8].copy_from_slice(&self.ioprio.to_le_bytes());
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        (b.len() >= Self::SIZE).then(|| RequestHeader {
            request_type: le32(b),
            ioprio: le32(&b[4..]),
            sector: le64(&b[8..]),
        })
    }
}

/// One range of a DISCARD or WRITE_ZEROES request (the request's data is a list of them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeSegment {
    pub sector: u64,
    pub num_sectors: u32,
    /// WRITE_ZEROES only: the device may unmap the range (and read zeros from it after).
    pub unmap: bool,
}

impl RangeSegment {
    pub const SIZE: usize = 16;
    const FLAG_UNMAP: u32 = 1;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        let flags = if self.unmap { Self::FLAG_UNMAP } else { 0 };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b
    }

    /// None for a short buffer; Err with the flags when reserved flag bits are set, which the
    /// spec tells devices to refuse (UNSUPP).
    pub fn decode(b: &[u8]) -> Option<Result<Self, u32>> {
        if b.len() < Self::SIZE {
            return None;
        }
        let flags = le32(&b[12..]);
        if flags & !Self::FLAG_UNMAP != 0 {
            return Some(Err(flags));
        }
        Some(Ok(RangeSegment {
            sector: le64(b),
            num_sectors: le32(&b[8..]),
            unmap: flags & Self::FLAG_UNMAP != 0,
        }))
    }
}

/// The configuration space. Fields past `blk_size` are meaningful only with the feature that
/// guards them; a device may expose fewer bytes than `SIZE` (an older layout), and the missing
/// fields then decode as 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// In 512-byte sectors.
    pub capacity: u64,
    /// SIZE_MAX: largest segment, in bytes.
    pub size_max: u32,
    /// SEG_MAX: most segments in a request.
    pub seg_max: u32,
    /// GEOMETRY (legacy): cylinders, heads, sectors.
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
    /// BLK_SIZE: the logical block size, in bytes.
    pub blk_size: u32,
    /// TOPOLOGY: logical blocks per physical block, as a power of two.
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    /// TOPOLOGY: in logical blocks.
    pub min_io_size: u16,
    pub opt_io_size: u32,
    /// CONFIG_WCE: 1 for writeback, 0 for writethrough.
    pub writeback: u8,
    /// MQ: request queues.
    pub num_queues: u16,
    /// DISCARD: in sectors, ranges per request, and the alignment of a range, in sectors.
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    /// WRITE_ZEROES: in sectors, ranges per request, and whether the unmap flag may unmap.
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl Config {
    /// Bytes through `write_zeroes_may_unmap` and its padding.
    pub const SIZE: usize = 60;
    /// Offset of `writeback` (a driver with CONFIG_WCE writes it).
    pub const WRITEBACK_OFFSET: usize = 32;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        b[16..18].copy_from_slice(&self.cylinders.to_le_bytes());
        b[18] = self.heads;
        b[19] = self.sectors;
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[25] = self.alignment_offset;
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[32] = self.writeback;
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        b
    }

    /// Decodes what the device exposes; None when it is shorter than `capacity`.
    pub fn decode(raw: &[u8]) -> Option<Self> {
        if raw.len() < 8 {
            return None;
        }
        let mut b = [0u8; Self::SIZE];
        let n = raw.len().min(Self::SIZE);
        b[..n].copy_from_slice(&raw[..n]);
        Some(Config {
            capacity: le64(&b),
            size_max: le32(&b[8..]),
            seg_max: le32(&b[12..]),
            cylinders: le16(&b[16..]),
            heads: b[18],
            sectors: b[19],
            blk_size: le32(&b[20..]),
            physical_block_exp: b[24],
            alignment_offset: b[25],
            min_io_size: le16(&b[26..]),
            opt_io_size: le32(&b[28..]),
            writeback: b[32],
            num_queues: le16(&b[34..]),
            max_discard_sectors: le32(&b[36..]),
            max_discard_seg: le32(&b[40..]),
            discard_sector_alignment: le32(&b[44..]),
            max_write_zeroes_sectors: le32(&b[48..]),
            max_write_zeroes_seg: le32(&b[52..]),
            write_zeroes_may_unmap: b[56],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout() {
        let h = RequestHeader { request_type: request::OUT, ioprio: 0, sector: 0x0102_0304_0506_0708 };
        let b = h.encode();
        assert_eq!(b[0..4], [1, 0, 0, 0]);
        assert_eq!(b[8..16], [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(RequestHeader::decode(&b), Some(h));
        assert_eq!(RequestHeader::decode(&b[..15]), None);
    }

    #[test]
    fn range_segment_layout_and_reserved_flags() {
        let s = RangeSegment { sector: 4096, num_sectors: 8, unmap: true };
        let b = s.encode();
        assert_eq!(b[0..8], 4096u64.to_le_bytes());
        assert_eq!(b[8..12], 8u32.to_le_bytes());
        assert_eq!(b[12..16], [1, 0, 0, 0]);
        assert_eq!(RangeSegment::decode(&b), Some(Ok(s)));
        let mut bad = b;
        bad[12] = 0x3;
        assert_eq!(RangeSegment::decode(&bad), Some(Err(3)));
        assert_eq!(RangeSegment::decode(&b[..12]), None);
    }

    #[test]
    fn config_offsets_follow_the_spec() {
        let c = Config {
            capacity: 1 << 21,
            size_max: 0x10_0000,
            seg_max: 254,
            cylinders: 1024,
            heads: 16,
            sectors: 63,
            blk_size: 4096,
            physical_block_exp: 3,
            alignment_offset: 1,
            min_io_size: 8,
            opt_io_size: 256,
            writeback: 1,
            num_queues: 4,
            max_discard_sectors: 0xffff,
            max_discard_seg: 1,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 0x1000,
            max_write_zeroes_seg: 1,
            write_zeroes_may_unmap: 1,
        };
        let b = c.encode();
        assert_eq!(b[20..24], 4096u32.to_le_bytes(), "blk_size at 20");
        assert_eq!(b[24], 3, "physical_block_exp at 24");
        assert_eq!(b[Config::WRITEBACK_OFFSET], 1);
        assert_eq!(b[34..36], 4u16.to_le_bytes(), "num_queues at 34");
        assert_eq!(b[48..52], 0x1000u32.to_le_bytes(), "max_write_zeroes_sectors at 48");
        assert_eq!(b[56], 1, "write_zeroes_may_unmap at 56");
        assert_eq!(Config::decode(&b), Some(c));
        // An older device exposes only the first fields: the rest reads as 0.
        let short = Config::decode(&b[..24]).unwrap();
        assert_eq!((short.capacity, short.blk_size, short.num_queues), (1 << 21, 4096, 0));
        assert_eq!(Config::decode(&b[..7]), None);
    }

    #[test]
    fn names() {
        assert_eq!(request::name(request::WRITE_ZEROES), "WRITE_ZEROES");
        assert_eq!(status::name(status::UNSUPP), "UNSUPP");
        assert_eq!(status::name(9), "UNKNOWN");
    }
}
