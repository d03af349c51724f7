//! The control interface: a unix socket speaking line-delimited JSON, one request per line and
//! one reply line each. Tests and the CLI use it to change LUNs, inject faults, drop the
//! frontend and read statistics while the target runs. A virtio-blk target (one disk) takes
//! the requests that make sense for it: list, stats, disconnect, and its own faults.
//!
//! Replies are `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::warn;
use serde::Deserialize;
use serde_json::{json, Value};
use virtio_scsi_proto::{scsi::asc, LunAddress};

use crate::blk::{BlkBackend, BlkFault};
use crate::device::ScsiBackend;
use crate::scsi::{Fault, LunSpec};
use crate::server::Server;
use crate::storage::parse_size;

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    AddLun {
        spec: String,
    },
    RemoveLun {
        target: u8,
        lun: u16,
    },
    ResizeLun {
        target: u8,
        lun: u16,
        size: Size,
    },
    Inject {
        target: u8,
        lun: u16,
        fault: FaultKind,
        #[serde(default = "one")]
        count: u32,
        #[serde(default)]
        key: u8,
        #[serde(default)]
        asc: u8,
        #[serde(default)]
        ascq: u8,
        #[serde(default)]
        ms: u64,
    },
    ClearFaults {
        target: u8,
        lun: u16,
    },
    List,
    Stats,
    Disconnect,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(self) -> Result<u64, String> {
        match self {
            Size::Bytes(b) => Ok(b),
            Size::Text(t) => parse_size(&t).map_err(|e| format!("size: {e}")),
        }
    }
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum FaultKind {
    CheckCondition,
    Busy,
    TaskSetFull,
    Delay,
    Late,
    Never,
    Corrupt,
    /// virtio-blk: the request is answered IOERR.
    IoError,
}

/// The device the target serves.
#[derive(Clone)]
pub enum Served {
    Scsi(ScsiBackend),
    Blk(BlkBackend),
}

/// Everything a control request may touch.
#[derive(Clone)]
pub struct Control {
    pub device: Served,
    pub socket: PathBuf,
    pub listener_fd: RawFd,
}

impl Control {
    /// Serves the control socket on its own threads.
    pub fn spawn(self, path: &Path) -> std::io::Result<()> {
        if path.symlink_metadata().is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("control socket {}: a file already exists there", path.display()),
            ));
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("control socket {}: {e}", path.display())))?;
        std::thread::Builder::new().name("control".into()).spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let ctl = self.clone();
                        let _ = std::thread::Builder::new()
                            .name("control-conn".into())
                            .spawn(move || ctl.serve(stream));
                    }
                    Err(e) => warn!("control socket accept: {e}"),
                }
            }
        })?;
        Ok(())
    }

    fn serve(&self, stream: UnixStream) {
        let Ok(mut out) = stream.try_clone() else { return };
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            if line.trim().is_empty() {
                continue;
            }
            let reply = match self.handle_line(&line) {
                Ok(Value::Object(mut m)) => {
                    m.insert("ok".into(), Value::Bool(true));
                    Value::Object(m)
                }
                Ok(_) => json!({ "ok": true }),
                Err(e) => json!({ "ok": false, "error": e }),
            };
            if writeln!(out, "{reply}").is_err() {
                return;
            }
        }
    }

    /// Executes one request line.
    pub fn handle_line(&self, line: &str) -> Result<Value, String> {
        let req: Request = serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))?;
        if let Request::Disconnect = req {
            let cut = Server::disconnect(&self.socket, self.listener_fd).map_err(|e| e.to_string())?;
            return Ok(json!({ "connections": cut }));
        }
        match &self.device {
            Served::Scsi(backend) => scsi(backend, req),
            Served::Blk(backend) => blk(backend, req),
        }
    }
}

/// A request to a virtio-scsi target.
fn scsi(backend: &ScsiBackend, req: Request) -> Result<Value, String> {
    {
        let bus = backend.bus();
        match req {
            Request::AddLun { spec } => {
                let spec: LunSpec = spec.parse().map_err(|e| format!("{e}"))?;
                bus.add(spec.addr, spec.cfg).map_err(|e| e.to_string())?;
                backend.post_hotplug(spec.addr, true);
                Ok(json!({}))
            }
            Request::RemoveLun { target, lun } => {
                let addr = LunAddress::new(target, lun);
                bus.remove(addr).map_err(|e| e.to_string())?;
                backend.post_hotplug(addr, false);
                Ok(json!({}))
            }
            Request::ResizeLun { target, lun, size } => {
                let bytes = size.bytes()?;
                let addr = LunAddress::new(target, lun);
                bus.resize(addr, bytes).map_err(|e| e.to_string())?;
                let (a, q) = asc::CAPACITY_DATA_CHANGED;
                backend.post_param_change(addr, a, q);
                Ok(json!({}))
            }
            Request::Inject { target, lun, fault, count, key, asc, ascq, ms } => {
                let fault = match fault {
                    FaultKind::CheckCondition => {
                        if key == 0 || key > 0xf {
                            return Err("check_condition needs a sense key 1..15 in \"key\"".into());
                        }
                        Fault::CheckCondition { key, asc, ascq }
                    }
                    FaultKind::Busy => Fault::Busy,
                    FaultKind::TaskSetFull => Fault::TaskSetFull,
                    FaultKind::Delay => Fault::Delay(Duration::from_millis(ms)),
                    FaultKind::Late => Fault::Late(Duration::from_millis(ms)),
                    FaultKind::Never => Fault::Never,
                    FaultKind::Corrupt => Fault::Corrupt,
                    FaultKind::IoError => {
                        return Err("io_error is for --type blk (use check_condition)".into())
                    }
                };
                bus.inject(LunAddress::new(target, lun), fault, count).map_err(|e| e.to_string())?;
                Ok(json!({}))
            }
            Request::ClearFaults { target, lun } => {
                bus.clear_faults(LunAddress::new(target, lun)).map_err(|e| e.to_string())?;
                Ok(json!({}))
            }
            Request::List => Ok(json!({ "luns": bus.list(), "config": config_json(backend) })),
            Request::Stats => Ok(json!({ "queues": backend.stats() })),
            Request::Disconnect => unreachable!("answered for every device"),
        }
    }
}

/// A request to a virtio-blk target: its one disk is LUN 0:0 in requests that name one.
fn blk(backend: &BlkBackend, req: Request) -> Result<Value, String> {
    let disk_only = |target: u8, lun: u16| {
        if (target, lun) == (0, 0) {
            Ok(())
        } else {
            Err(format!("a virtio-blk target has one disk, 0:0, not {target}:{lun}"))
        }
    };
    match req {
        Request::Inject { target, lun, fault, count, ms, .. } => {
            disk_only(target, lun)?;
            let fault = match fault {
                FaultKind::IoError => BlkFault::IoError,
                FaultKind::Delay => BlkFault::Delay(Duration::from_millis(ms)),
                FaultKind::Never => BlkFault::Never,
                _ => return Err("a virtio-blk disk takes the faults io_error, delay and never".into()),
            };
            backend.inject(fault, count);
            Ok(json!({}))
        }
        Request::ClearFaults { target, lun } => {
            disk_only(target, lun)?;
            backend.clear_faults();
            Ok(json!({}))
        }
        Request::List => {
            let c = backend.config();
            let s = backend.storage();
            Ok(json!({
                "disk": { "kind": s.kind(), "bytes": s.len(), "block_size": c.blk_size },
                "config": { "capacity": c.capacity, "blk_size": c.blk_size, "num_queues": c.num_queues, "seg_max": c.seg_max },
            }))
        }
        Request::Stats => Ok(json!({ "queues": backend.stats() })),
        Request::ResizeLun { target, lun, size } => {
            disk_only(target, lun)?;
            // vhost-user offers no way to announce it here: the frontend finds the new capacity
            // in the configuration space.
            let bytes = backend.resize(size.bytes()?)?;
            Ok(json!({ "bytes": bytes }))
        }
        Request::AddLun { .. } | Request::RemoveLun { .. } => {
            Err("a virtio-blk target has one disk: LUNs are added and removed with --type scsi".into())
        }
        Request::Disconnect => unreachable!("answered for every device"),
    }
}

fn config_json(backend: &ScsiBackend) -> Value {
    let c = backend.config();
    json!({
        "num_queues": c.num_queues,
        "seg_max": c.seg_max,
        "max_sectors": c.max_sectors,
        "cmd_per_lun": c.cmd_per_lun,
        "max_target": c.max_target,
        "max_lun": c.max_lun,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use virtio_scsi_proto::scsi::opcode;

    use super::*;
    use crate::device::{DeviceOptions, Quirks};
    use crate::scsi::testutil::{clear_ua, ram_bus, run, rw10};
    use crate::scsi::{Action, CORRUPT_INTERVAL};

    fn control() -> Control {
        let bus = Arc::new(ram_bus(&[(0, 0, 1 << 20, 512)]));
        let opts = DeviceOptions {
            request_queues: 1,
            queue_size: 16,
            poll_threads: None,
            quirks: Quirks::default(),
        };
        Control {
            device: Served::Scsi(ScsiBackend::new(bus, opts)),
            socket: PathBuf::from("/nonexistent"),
            listener_fd: -1,
        }
    }

    const A: LunAddress = LunAddress::new(0, 0);

    #[test]
    fn inject_late_and_corrupt() {
        let ctl = control();
        let Served::Scsi(backend) = &ctl.device else { unreachable!() };
        let bus = backend.bus().clone();
        clear_ua(&bus, A);
        let data: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
        assert_eq!(run(&bus, A, &rw10(opcode::WRITE_10, 0, 2), &data, 0).0.status, 0);

        let r = ctl.handle_line(r#"{"op":"inject","target":0,"lun":0,"fault":"late","ms":25,"count":2}"#);
        assert_eq!(r, Ok(json!({})));
        for _ in 0..2 {
            let (c, d) = run(&bus, A, &rw10(opcode::READ_10, 0, 2), &[], 1024);
            assert_eq!((c.status, c.action), (0, Action::Late(Duration::from_millis(25))));
            assert_eq!(d, data);
        }
        assert_eq!(run(&bus, A, &rw10(opcode::READ_10, 0, 2), &[], 1024).0.action, Action::Now);

        ctl.handle_line(r#"{"op":"inject","target":0,"lun":0,"fault":"corrupt"}"#).unwrap();
        let (c, d) = run(&bus, A, &rw10(opcode::READ_10, 0, 2), &[], 1024);
        assert_eq!((c.status, c.action), (0, Action::Now));
        let flipped: Vec<usize> = (0..1024).filter(|&i| d[i] != data[i]).collect();
        assert_eq!(flipped, vec![0, CORRUPT_INTERVAL]);
        assert!(flipped.iter().all(|&i| d[i] == data[i] ^ 0xff));
        assert_eq!(run(&bus, A, &rw10(opcode::READ_10, 0, 2), &[], 1024).1, data, "count 1 is used up");
    }

    #[test]
    fn inject_errors_are_clear() {
        let ctl = control();
        let e = ctl.handle_line(r#"{"op":"inject","target":0,"lun":0,"fault":"tardy"}"#).unwrap_err();
        assert!(e.contains("unknown variant `tardy`") && e.contains("`late`"), "{e}");
        let e = ctl.handle_line(r#"{"op":"inject","target":0,"lun":5,"fault":"corrupt"}"#).unwrap_err();
        assert_eq!(e, "LUN 0:5 does not exist");
        let e =
            ctl.handle_line(r#"{"op":"inject","target":0,"lun":0,"fault":"late","ms":"soon"}"#).unwrap_err();
        assert!(e.starts_with("bad request:"), "{e}");
    }
}
