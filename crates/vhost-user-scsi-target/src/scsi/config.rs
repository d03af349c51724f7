//! Logical unit configuration and the `T:L:KIND:SIZE|PATH[:BS][:ro]` command-line form.

use std::path::PathBuf;
use std::str::FromStr;

use virtio_scsi_proto::lun::{LunAddress, MAX_LUN};

use crate::storage::parse_size;

pub const DEFAULT_BLOCK_SIZE: u32 = 512;
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 65536;

/// What holds a logical unit's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Sparse memory of this many bytes.
    Ram { bytes: u64 },
    /// Reads zeros, drops writes.
    Null { bytes: u64 },
    /// An existing file (or block device); its length is the LUN's size.
    File { path: PathBuf },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunConfig {
    pub backing: Backing,
    pub block_size: u32,
    pub read_only: bool,
}

/// Whether `bs` is a block size this target supports.
pub fn valid_block_size(bs: u32) -> bool {
    bs.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs)
}

/// A parsed `--lun` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunSpec {
    pub addr: LunAddress,
    pub cfg: LunConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("lun spec '{spec}': {reason}")]
pub struct LunSpecError {
    pub spec: String,
    pub reason: String,
}

const FORM: &str = "expected T:L:ram:SIZE[:BS][:ro], T:L:null:SIZE[:BS][:ro] or T:L:file:PATH[:BS][:ro]";

impl FromStr for LunSpec {
    type Err = LunSpecError;

    fn from_str(spec: &str) -> Result<LunSpec, LunSpecError> {
        parse(spec).map_err(|reason| LunSpecError { spec: spec.to_string(), reason })
    }
}

fn parse(spec: &str) -> Result<LunSpec, String> {
    let mut fields: Vec<&str> = spec.split(':').collect();
    if fields.len() < 4 {
        return Err(FORM.to_string());
    }
    let target = parse_id(fields[0], "target", u64::from(u8::MAX))? as u8;
    let lun = parse_id(fields[1], "lun", u64::from(MAX_LUN))? as u16;
    let kind = fields[2];
    let mut rest = fields.split_off(3);

    // Trailing options, from the end: "ro", then a block size.
    let mut read_only = false;
    if rest.len() > 1 && rest.last() == Some(&"ro") {
        read_only = true;
        rest.pop();
    }
    let mut block_size = None;
    match kind {
        "ram" | "null" => {
            if rest.len() > 2 {
                return Err(format!("unexpected field '{}' ({FORM})", rest[2]));
            }
            if rest.len() == 2 {
                block_size = Some(parse_block_size(rest[1])?);
            }
        }
        "file" => {
            // A path may itself contain ':', so the last field is a block size only if it is all
            // digits; anything else stays part of the path.
            if rest.len() > 1 && rest.last().is_some_and(|f| f.bytes().all(|b| b.is_ascii_digit())) {
                block_size = Some(parse_block_size(rest.pop().unwrap_or_default())?);
            }
        }
        _ => return Err(format!("kind '{kind}' is not one of ram, null, file")),
    }
    let block_size = block_size.unwrap_or(DEFAULT_BLOCK_SIZE);

    let backing = match kind {
        "file" => {
            let path = rest.join(":");
            if path.is_empty() {
                return Err("file path is empty".to_string());
            }
            Backing::File { path: PathBuf::from(path) }
        }
        _ => {
            let bytes = parse_size(rest[0])?;
            if bytes < u64::from(block_size) {
                return Err(format!("size '{}' is smaller than one block of {block_size} bytes", rest[0]));
            }
            if kind == "ram" {
                Backing::Ram { bytes }
            } else {
                Backing::Null { bytes }
            }
        }
    };
    Ok(LunSpec { addr: LunAddress::new(target, lun), cfg: LunConfig { backing, block_size, read_only } })
}

fn parse_id(field: &str, name: &str, max: u64) -> Result<u64, String> {
    let v: u64 = field.parse().map_err(|_| format!("target/lun '{field}' is not a number"))?;
    if v > max {
        return Err(format!("{name} '{field}' is out of range (0-{max})"));
    }
    Ok(v)
}

fn parse_block_size(field: &str) -> Result<u32, String> {
    match field.parse::<u32>() {
        Ok(bs) if valid_block_size(bs) => Ok(bs),
        _ => Err(format!(
            "block size '{field}' is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> LunSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        s.parse::<LunSpec>().unwrap_err().to_string()
    }

    #[test]
    fn good_specs() {
        let s = ok("0:1:ram:64M");
        assert_eq!(s.addr, LunAddress::new(0, 1));
        assert_eq!(
            s.cfg,
            LunConfig { backing: Backing::Ram { bytes: 64 << 20 }, block_size: 512, read_only: false }
        );
        let s = ok("3:300:ram:1G:4096:ro");
        assert_eq!(s.addr, LunAddress::new(3, 300));
        assert_eq!(s.cfg.backing, Backing::Ram { bytes: 1 << 30 });
        assert_eq!((s.cfg.block_size, s.cfg.read_only), (4096, true));
        assert!(ok("0:0:ram:2t:ro").cfg.read_only);
        assert_eq!(ok("0:0:ram:2t").cfg.backing, Backing::Ram { bytes: 2 << 40 });
        assert_eq!(ok("1:2:null:1G:4096").cfg.backing, Backing::Null { bytes: 1 << 30 });
        assert_eq!(ok("0:0:null:8192").cfg.backing, Backing::Null { bytes: 8192 });
        let s = ok("0:0:file:/tmp/a.img:4096:ro");
        assert_eq!(s.cfg.backing, Backing::File { path: "/tmp/a.img".into() });
        assert_eq!((s.cfg.block_size, s.cfg.read_only), (4096, true));
        let s = ok("0:0:file:/tmp/a:b.img");
        assert_eq!(s.cfg.backing, Backing::File { path: "/tmp/a:b.img".into() });
        assert_eq!((s.cfg.block_size, s.cfg.read_only), (512, false));
        assert_eq!(ok("0:0:file:ro").cfg.backing, Backing::File { path: "ro".into() });
    }

    #[test]
    fn bad_specs_name_the_field() {
        assert_eq!(err("0:x:ram:1M"), "lun spec '0:x:ram:1M': target/lun 'x' is not a number");
        assert!(err("y:0:ram:1M").contains("target/lun 'y' is not a number"));
        assert!(err("256:0:ram:1M").contains("target '256' is out of range (0-255)"));
        assert!(err("0:16384:ram:1M").contains("lun '16384' is out of range (0-16383)"));
        assert!(err("0:0:disk:1M").contains("kind 'disk' is not one of ram, null, file"));
        assert!(err("0:0:ram").contains("expected T:L:ram:SIZE"));
        assert!(err("0:0:ram:12Q").contains("size '12Q' is not a byte count"));
        assert!(err("0:0:ram:M").contains("size 'M' is not a byte count"));
        assert!(err("0:0:ram:99999999999T").contains("size '99999999999T' is too large"));
        assert!(err("0:0:ram:1M:1000").contains("block size '1000' is not a power of two"));
        assert!(err("0:0:ram:1M:256").contains("block size '256'"));
        assert!(err("0:0:ram:1M:131072").contains("block size '131072'"));
        assert!(err("0:0:ram:1M:4096:rw").contains("unexpected field 'rw'"));
        assert!(err("0:0:ram:100").contains("size '100' is smaller than one block of 512 bytes"));
        assert!(err("0:0:file:/x:3000").contains("block size '3000'"));
        assert!(err("0:0:file:").contains("file path is empty"));
    }
}
