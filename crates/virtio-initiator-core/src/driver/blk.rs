//! The virtio-blk device layer: the features and configuration the driver takes, and how a
//! request record becomes a virtio-blk request (header, data, status byte).

use virtio_blk_proto::{feature, request, Config, RangeSegment, RequestHeader, SECTOR_SIZE};

use super::records::Request;
use super::DriverError;
use crate::transport::Transport;

/// Device features the driver takes when offered.
pub(super) const FEATURES: [u32; 10] = [
    feature::SIZE_MAX,
    feature::SEG_MAX,
    feature::RO,
    feature::BLK_SIZE,
    feature::FLUSH,
    feature::TOPOLOGY,
    feature::MQ,
    feature::DISCARD,
    feature::WRITE_ZEROES,
    feature::CONFIG_WCE,
];

/// What a virtio-blk device offers, from its configuration space and the features agreed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// The configuration space as read; fields behind features not agreed are left out below.
    pub raw: Config,
    /// 512-byte sectors.
    pub capacity: u64,
    /// Logical block size: `blk_size` with BLK_SIZE, else 512.
    pub block_size: u32,
    /// log2 of physical blocks per logical block (TOPOLOGY), else 0.
    pub physical_block_exp: u8,
    /// Optimal I/O size in logical blocks (TOPOLOGY), 0 when not stated.
    pub opt_io_blocks: u32,
    /// Largest segment in bytes (SIZE_MAX), 0 when not stated.
    pub size_max: u32,
    /// Most data segments per request (SEG_MAX), 0 when not stated.
    pub seg_max: u32,
    pub read_only: bool,
    pub flush: bool,
    /// The write cache is on (writeback): writes need a flush to be on stable storage. Without
    /// CONFIG_WCE, a device with FLUSH is taken to have one.
    pub writeback: bool,
    pub discard: bool,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_alignment: u32,
    pub write_zeroes: bool,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: bool,
    /// Request queues the device has (MQ), else 1.
    pub num_queues: u16,
}

fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

impl BlkConfig {
    /// Interprets the configuration space under the features agreed; errors name what is wrong.
    pub fn new(raw: Config, features: u64) -> Result<Self, DriverError> {
        let block_size = if has(features, feature::BLK_SIZE) { raw.blk_size } else { SECTOR_SIZE as u32 };
        if block_size < SECTOR_SIZE as u32 || !block_size.is_power_of_two() || block_size > 1 << 16 {
            return Err(DriverError::Config(format!(
                "block size {block_size} is not a power of two from 512 to 65536"
            )));
        }
        let topology = has(features, feature::TOPOLOGY);
        let discard = has(features, feature::DISCARD);
        let write_zeroes = has(features, feature::WRITE_ZEROES);
        let flush = has(features, feature::FLUSH);
        Ok(BlkConfig {
            capacity: raw.capacity,
            block_size,
            physical_block_exp: if topology { raw.physical_block_exp.min(16) } else { 0 },
            opt_io_blocks: if topology { raw.opt_io_size } else { 0 },
            size_max: if has(features, feature::SIZE_MAX) { raw.size_max } else { 0 },
            seg_max: if has(features, feature::SEG_MAX) { raw.seg_max } else { 0 },
            read_only: has(features, feature::RO),
            flush,
            writeback: if has(features, feature::CONFIG_WCE) { raw.writeback != 0 } else { flush },
            discard,
            max_discard_sectors: if discard { raw.max_discard_sectors } else { 0 },
            max_discard_seg: if discard { raw.max_discard_seg } else { 0 },
            discard_alignment: if discard { raw.discard_sector_alignment } else { 0 },
            write_zeroes,
            max_write_zeroes_sectors: if write_zeroes { raw.max_write_zeroes_sectors } else { 0 },
            max_write_zeroes_seg: if write_zeroes { raw.max_write_zeroes_seg } else { 0 },
            write_zeroes_may_unmap: write_zeroes && raw.write_zeroes_may_unmap != 0,
            num_queues: if has(features, feature::MQ) { raw.num_queues.max(1) } else { 1 },
            raw,
        })
    }

    /// log2 of 512-byte sectors per logical block.
    pub fn sector_shift(&self) -> u32 {
        self.block_size.trailing_zeros() - SECTOR_SIZE.trailing_zeros()
    }
}

/// Reads and interprets the configuration space.
pub(super) fn read_config(t: &mut dyn Transport, features: u64) -> Result<BlkConfig, DriverError> {
    let mut raw = [0u8; Config::SIZE];
    // vhost-user cannot tell the device type: a backend of another type may not answer for the
    // 60 bytes of a virtio-blk configuration space.
    t.read_config(0, &mut raw).map_err(|e| {
        DriverError::Config(format!(
            "cannot read a virtio-blk configuration space ({e}); is the device a virtio-blk one?"
        ))
    })?;
    let config =
        Config::decode(&raw).ok_or_else(|| DriverError::Config("short configuration space".into()))?;
    BlkConfig::new(config, features)
}

/// Re-reads the capacity (512-byte sectors), which a device may change at any time.
pub(super) fn read_capacity(t: &mut dyn Transport) -> Result<u64, DriverError> {
    let mut raw = [0u8; 8];
    t.read_config(0, &mut raw)?;
    Ok(u64::from_le_bytes(raw))
}

/// A request framed for a virtio-blk device.
pub(super) struct Framed {
    pub header: RequestHeader,
    /// The one range of a DISCARD or WRITE ZEROES, sent as its data.
    pub range: Option<RangeSegment>,
}

/// The virtio-blk form of `req`; `data_len` is the bytes of its data buffer. Refusals name why.
pub(super) fn frame(req: &Request, data_len: usize, config: &BlkConfig) -> Result<Framed, String> {
    let shift = config.sector_shift();
    let sectors = |lba: u64| {
        lba.checked_shl(shift)
            .filter(|s| s >> shift == lba)
            .ok_or_else(|| format!("LBA {lba} is beyond any device"))
    };
    let range_of = |lba: u64, blocks: u32, unmap: bool| -> Result<RangeSegment, String> {
        let num_sectors = u32::try_from(u64::from(blocks) << shift)
            .map_err(|_| format!("{blocks} blocks are more than one {} covers", req.name()))?;
        Ok(RangeSegment { sector: sectors(lba)?, num_sectors, unmap })
    };
    let header = |request_type: u32, sector: u64| RequestHeader { request_type, ioprio: 0, sector };
    let transfer = |lba: u64, blocks: u32| -> Result<u64, String> {
        let want = u64::from(blocks) * u64::from(config.block_size);
        if data_len as u64 != want {
            return Err(format!(
                "{} of {blocks} blocks of {} bytes with a {data_len}-byte buffer",
                req.name(),
                config.block_size
            ));
        }
        sectors(lba)
    };
    let changes =
        matches!(req, Request::Write { .. } | Request::Discard { .. } | Request::WriteZeroes { .. });
    if changes && config.read_only {
        return Err("the device is read-only".into());
    }
    Ok(match *req {
        Request::Read { lba, blocks, .. } => {
            Framed { header: header(request::IN, transfer(lba, blocks)?), range: None }
        }
        Request::Write { lba, blocks, fua } => {
            // virtio-blk has no forced unit access; the caller flushes after the write instead.
            if fua {
                return Err("virtio-blk has no forced unit access: write, then flush".into());
            }
            Framed { header: header(request::OUT, transfer(lba, blocks)?), range: None }
        }
        Request::Flush { .. } => Framed { header: header(request::FLUSH, 0), range: None },
        Request::Discard { lba, blocks } => {
            Framed { header: header(request::DISCARD, 0), range: Some(range_of(lba, blocks, false)?) }
        }
        Request::WriteZeroes { lba, blocks, unmap } => {
            Framed { header: header(request::WRITE_ZEROES, 0), range: Some(range_of(lba, blocks, unmap)?) }
        }
        Request::GetId => Framed { header: header(request::GET_ID, 0), range: None },
        Request::Cdb { .. } => {
            return Err("SCSI commands go to virtio-scsi devices; this is a virtio-blk device".into())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(block_size: u32, features: u64) -> BlkConfig {
        let raw = Config { capacity: 1 << 20, blk_size: block_size, ..Default::default() };
        BlkConfig::new(raw, features).unwrap()
    }

    #[test]
    fn block_size_needs_its_feature_and_a_sane_value() {
        assert_eq!(config(4096, 0).block_size, 512, "without BLK_SIZE, 512");
        let c = config(4096, 1 << feature::BLK_SIZE);
        assert_eq!((c.block_size, c.sector_shift()), (4096, 3));
        for bad in [0, 100, 3000, 1 << 20] {
            let raw = Config { blk_size: bad, ..Default::default() };
            let e = BlkConfig::new(raw, 1 << feature::BLK_SIZE).unwrap_err().to_string();
            assert!(e.contains(&format!("block size {bad}")), "{e}");
        }
    }

    #[test]
    fn requests_count_in_sectors() {
        let c = config(4096, 1 << feature::BLK_SIZE | 1 << feature::DISCARD);
        let f = frame(&Request::Read { lba: 10, blocks: 2, fua: false }, 8192, &c).unwrap();
        assert_eq!((f.header.request_type, f.header.sector), (request::IN, 80));
        let e = frame(&Request::Read { lba: 10, blocks: 2, fua: false }, 4096, &c).err().unwrap();
        assert!(e.contains("4096-byte buffer"), "{e}");
        let f = frame(&Request::Discard { lba: 3, blocks: 5 }, 0, &c).unwrap();
        let r = f.range.unwrap();
        assert_eq!(
            (f.header.request_type, r.sector, r.num_sectors, r.unmap),
            (request::DISCARD, 24, 40, false)
        );
        let f = frame(&Request::WriteZeroes { lba: 1, blocks: 1, unmap: true }, 0, &c).unwrap();
        assert!(f.range.unwrap().unmap);
        let e = frame(&Request::Discard { lba: 0, blocks: u32::MAX }, 0, &c).err().unwrap();
        assert!(e.contains("more than one DISCARD covers"), "{e}");
        let e = frame(&Request::Read { lba: u64::MAX >> 2, blocks: 1, fua: false }, 4096, &c).err().unwrap();
        assert!(e.contains("beyond any device"), "{e}");
        let e = frame(&Request::Cdb { cdb: [0; 32], len: 6 }, 0, &c).err().unwrap();
        assert!(e.contains("virtio-scsi"), "{e}");
        let e = frame(&Request::Write { lba: 0, blocks: 1, fua: true }, 4096, &c).err().unwrap();
        assert!(e.contains("forced unit access"), "{e}");
        let ro = config(512, 1 << feature::RO | 1 << feature::DISCARD | 1 << feature::WRITE_ZEROES);
        for req in [
            Request::Write { lba: 0, blocks: 1, fua: false },
            Request::Discard { lba: 0, blocks: 1 },
            Request::WriteZeroes { lba: 0, blocks: 1, unmap: false },
        ] {
            let e = frame(&req, 512, &ro).err().unwrap();
            assert!(e.contains("read-only"), "{}: {e}", req.name());
        }
        assert!(frame(&Request::Read { lba: 0, blocks: 1, fua: false }, 512, &ro).is_ok());
        assert!(frame(&Request::Flush { long: false }, 0, &ro).is_ok());
    }
}
