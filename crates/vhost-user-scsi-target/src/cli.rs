//! Command-line arguments of the target.

use std::path::PathBuf;

use crate::device::MAX_QUEUE_SIZE;
use crate::scsi::LunSpec;

pub const USAGE: &str = "\
usage: vhost-user-scsi-target --socket PATH [options]

Serves virtio-scsi (or, with --type blk, virtio-blk) over vhost-user on a unix socket.

options:
  --socket PATH        vhost-user socket to create (must not exist)
  --type TYPE          scsi (default) or blk: one disk, from exactly one --lun 0:0:...; the
                       SCSI-only options (--max-target, --quirk) do not apply
  --control PATH       control socket (line-delimited JSON) to create
  --lun SPEC           a LUN, repeatable:
                         T:L:ram:SIZE[:BS][:ro]    RAM, thin (unmapped blocks use no memory)
                         T:L:null:SIZE[:BS]        reads zeros, discards writes
                         T:L:file:PATH[:BS][:ro]   a file image; its length is the size
                       SIZE takes K, M, G, T suffixes; BS is the block size (default 512)
  --queues N           request queues (default 1, at most 64)
  --queue-size N       entries per queue, a power of two up to 1024 (default 1024)
  --max-target N       highest target id in the config space (default: highest configured)
  --poll               busy-poll the request queues instead of waiting for kicks; the driver
                       is told not to kick, and each poll thread keeps a CPU busy while a
                       frontend has rings running
  --poll-threads N     poll threads sharing the request queues (default 1, at most --queues)
  --quirk NAME         behave like other targets do, for tests of initiators (repeatable):
                         tmf-zero-used-len   task management answers with the response
                                             written but a used length of 0
                         abort-task-ignored  ABORT TASK answers FUNCTION COMPLETE and
                                             leaves the task running
                         tmf-ignored         every task management function does so
  -v, --verbose        log each request (RUST_LOG=debug works too)
  -h, --help           this text
";

#[derive(Debug)]
pub struct Args {
    pub device_type: DeviceType,
    pub socket: PathBuf,
    pub control: Option<PathBuf>,
    pub luns: Vec<LunSpec>,
    pub queues: u16,
    pub queue_size: u16,
    pub max_target: Option<u8>,
    /// Poll threads, when the request queues are polled.
    pub poll_threads: Option<u16>,
    pub quirks: Vec<Quirk>,
    pub verbose: bool,
}

/// The virtio device the target serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceType {
    Scsi,
    Blk,
}

/// Deviations from the virtio specification that other targets have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quirk {
    TmfZeroUsedLen,
    AbortTaskIgnored,
    TmfIgnored,
}

impl Quirk {
    fn parse(name: &str) -> Result<Quirk, String> {
        match name {
            "tmf-zero-used-len" => Ok(Quirk::TmfZeroUsedLen),
            "abort-task-ignored" => Ok(Quirk::AbortTaskIgnored),
            "tmf-ignored" => Ok(Quirk::TmfIgnored),
            other => Err(format!(
                "--quirk: unknown quirk '{other}' (known: tmf-zero-used-len, abort-task-ignored, tmf-ignored)"
            )),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Help,
    Run,
}

/// Parses the arguments (without the program name).
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<(Parsed, Option<Args>), String> {
    let mut it = args.into_iter();
    let mut socket = None;
    let mut control = None;
    let mut luns = Vec::new();
    let mut queues = 1u16;
    let mut queue_size = MAX_QUEUE_SIZE;
    let mut max_target = None;
    let mut poll = false;
    let mut poll_threads = None;
    let mut quirks = Vec::new();
    let mut verbose = false;
    let mut device_type = DeviceType::Scsi;
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            inline.clone().or_else(|| it.next()).ok_or_else(|| format!("{name} needs {what}"))
        };
        match name.as_str() {
            "-h" | "--help" => return Ok((Parsed::Help, None)),
            "-v" | "--verbose" => verbose = true,
            "--socket" => socket = Some(PathBuf::from(value("a path")?)),
            "--type" => {
                device_type = match value("scsi or blk")?.as_str() {
                    "scsi" => DeviceType::Scsi,
                    "blk" => DeviceType::Blk,
                    v => return Err(format!("--type: '{v}' is not scsi or blk")),
                }
            }
            "--control" => control = Some(PathBuf::from(value("a path")?)),
            "--lun" => {
                let v = value("a LUN spec")?;
                luns.push(v.parse::<LunSpec>().map_err(|e| format!("--lun: {e}"))?);
            }
            "--queues" => {
                let v = value("a number")?;
                queues = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| format!("--queues: '{v}' is not a number from 1 to 64"))?;
            }
            "--queue-size" => {
                let v = value("a number")?;
                queue_size = v
                    .parse()
                    .ok()
                    .filter(|n: &u16| n.is_power_of_two() && *n >= 4 && *n <= MAX_QUEUE_SIZE)
                    .ok_or_else(|| {
                        format!("--queue-size: '{v}' is not a power of two from 4 to {MAX_QUEUE_SIZE}")
                    })?;
            }
            "--max-target" => {
                let v = value("a number")?;
                max_target = Some(
                    v.parse().map_err(|_| format!("--max-target: '{v}' is not a number from 0 to 255"))?,
                );
            }
            "--quirk" => {
                quirks.push(Quirk::parse(&value("a quirk name")?)?);
            }
            "--poll" => {
                if inline.is_some() {
                    return Err("--poll takes no value (use --poll-threads N for the thread count)".into());
                }
                poll = true;
            }
            "--poll-threads" => {
                let v = value("a number")?;
                poll_threads = Some(
                    v.parse::<u16>()
                        .ok()
                        .filter(|&n| n >= 1)
                        .ok_or_else(|| format!("--poll-threads: '{v}' is not a number of at least 1"))?,
                );
            }
            other => return Err(format!("unknown argument '{other}' (see --help)")),
        }
    }
    let socket = socket.ok_or("--socket is required")?;
    if device_type == DeviceType::Blk {
        if luns.len() != 1 || luns[0].addr.target != 0 || luns[0].addr.lun != 0 {
            return Err("--type blk serves one disk: give exactly one --lun 0:0:KIND:...".into());
        }
        let scsi_only = [(max_target.is_some(), "--max-target"), (!quirks.is_empty(), "--quirk")];
        if let Some((_, name)) = scsi_only.iter().find(|(given, _)| *given) {
            return Err(format!("{name} is for --type scsi only"));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for l in &luns {
        if !seen.insert(l.addr) {
            return Err(format!("--lun: target {} LUN {} is given twice", l.addr.target, l.addr.lun));
        }
    }
    let highest = luns.iter().map(|l| l.addr.target).max().unwrap_or(0);
    if let Some(m) = max_target {
        if m < highest {
            return Err(format!("--max-target {m} is below the highest configured target {highest}"));
        }
    }
    let poll_threads = match (poll, poll_threads) {
        (false, Some(_)) => return Err("--poll-threads needs --poll".into()),
        (false, None) => None,
        (true, None) => Some(1),
        (true, Some(n)) if n > queues => {
            return Err(format!(
                "--poll-threads {n} is more than the {queues} request queue(s): each thread needs a queue \
                 (raise --queues or lower --poll-threads)"
            ))
        }
        (true, Some(n)) => Some(n),
    };
    Ok((
        Parsed::Run,
        Some(Args {
            device_type,
            socket,
            control,
            luns,
            queues,
            queue_size,
            max_target,
            poll_threads,
            quirks,
            verbose,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Args, String> {
        parse(args.iter().map(|s| s.to_string())).map(|(_, a)| a.unwrap())
    }

    #[test]
    fn full_command_line() {
        let a = run(&[
            "--socket",
            "/tmp/s",
            "--lun",
            "0:0:ram:64M:512",
            "--lun=1:2:null:1G:4096",
            "--queues",
            "4",
        ])
        .unwrap();
        assert_eq!(a.luns.len(), 2);
        assert_eq!(a.queues, 4);
        assert_eq!(a.queue_size, 1024);
    }

    #[test]
    fn errors_name_the_argument() {
        assert!(run(&[]).unwrap_err().contains("--socket"));
        assert!(run(&["--socket"]).unwrap_err().contains("--socket needs"));
        assert!(run(&["--socket", "s", "--queues", "0"]).unwrap_err().contains("--queues"));
        assert!(run(&["--socket", "s", "--queue-size", "1000"]).unwrap_err().contains("--queue-size"));
        assert!(run(&["--socket", "s", "--lun", "0:0:disk:1M"]).unwrap_err().starts_with("--lun"));
        assert!(run(&["--socket", "s", "--bogus"]).unwrap_err().contains("--bogus"));
        assert!(run(&["--socket", "s", "--lun", "0:0:ram:1M", "--lun", "0:0:null:1M"])
            .unwrap_err()
            .contains("twice"));
        assert!(run(&["--socket", "s", "--lun", "3:0:ram:1M", "--max-target", "1"])
            .unwrap_err()
            .contains("below"));
    }

    #[test]
    fn poll_options() {
        assert_eq!(
            run(&["--socket", "s", "--quirk", "tmf-zero-used-len"]).unwrap().quirks,
            [Quirk::TmfZeroUsedLen]
        );
        assert!(run(&["--socket", "s", "--quirk", "nope"]).unwrap_err().contains("unknown quirk 'nope'"));
        assert_eq!(run(&["--socket", "s"]).unwrap().poll_threads, None);
        assert_eq!(run(&["--socket", "s", "--poll"]).unwrap().poll_threads, Some(1));
        let a = run(&["--socket", "s", "--poll-threads", "3", "--poll", "--queues", "4"]).unwrap();
        assert_eq!((a.poll_threads, a.queues), (Some(3), 4));
        let a = run(&["--socket", "s", "--queues=2", "--poll", "--poll-threads=2"]).unwrap();
        assert_eq!(a.poll_threads, Some(2));
    }

    #[test]
    fn poll_errors_name_the_argument() {
        let e = run(&["--socket", "s", "--poll-threads", "1"]).unwrap_err();
        assert_eq!(e, "--poll-threads needs --poll");
        let e = run(&["--socket", "s", "--poll", "--poll-threads", "0"]).unwrap_err();
        assert!(e.starts_with("--poll-threads: '0' is not a number"), "{e}");
        let e = run(&["--socket", "s", "--poll", "--poll-threads", "many"]).unwrap_err();
        assert!(e.starts_with("--poll-threads: 'many'"), "{e}");
        let e = run(&["--socket", "s", "--poll", "--poll-threads", "3", "--queues", "2"]).unwrap_err();
        assert!(e.starts_with("--poll-threads 3 is more than the 2 request queue(s)"), "{e}");
        assert!(run(&["--socket", "s", "--poll", "--poll-threads"])
            .unwrap_err()
            .contains("--poll-threads needs"));
        assert!(run(&["--socket", "s", "--poll=2"]).unwrap_err().starts_with("--poll takes no value"));
    }

    #[test]
    fn blk_takes_one_disk_and_polls() {
        let a = run(&["--socket", "s", "--type", "blk", "--lun", "0:0:ram:1M", "--poll", "--queues", "2"])
            .unwrap();
        assert_eq!((a.device_type, a.poll_threads, a.queues), (DeviceType::Blk, Some(1), 2));
        let e = run(&["--socket", "s", "--type", "blk", "--lun", "0:1:ram:1M"]).unwrap_err();
        assert!(e.starts_with("--type blk serves one disk"), "{e}");
        let e =
            run(&["--socket", "s", "--type", "blk", "--lun", "0:0:ram:1M", "--max-target", "1"]).unwrap_err();
        assert_eq!(e, "--max-target is for --type scsi only");
        let e = run(&["--socket", "s", "--type", "blk", "--lun", "0:0:ram:1M", "--quirk", "tmf-ignored"])
            .unwrap_err();
        assert_eq!(e, "--quirk is for --type scsi only");
    }
}
