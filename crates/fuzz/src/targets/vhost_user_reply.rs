//! `vhost-user-reply`: the vhost-user frontend (`VhostUserTransport`, its GET_FEATURES probe and
//! the `vhost` crate's reply parsing) against a hostile backend. A thread listens on a unix
//! socket and answers each request from the input: honestly (with arbitrary values), with the
//! honest reply mutated (header code, flags and size, body bytes, truncation, extra bytes), with
//! raw bytes, with a descriptor attached, with silence, or by closing the connection. Every
//! transport call must return, with an error for garbage.
//!
//! The backend knows how many bytes the frontend will read for each request; when it has sent
//! fewer, the frontend would wait for ever (the `vhost` crate retries reads without a
//! deadline), so the backend closes the connection at once and the frontend must fail.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use virtio_initiator_core::memory::{DmaPool, HugePages, PoolConfig};
use virtio_initiator_core::transport::vhost_user::VhostUserTransport;
use virtio_initiator_core::transport::{RingAddresses, Transport};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::Target;
use crate::input::{Input, Seed};
use crate::stats::hit;

mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const GET_VRING_BASE: u32 = 11;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const GET_CONFIG: u32 = 24;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
}
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
const HEADER: usize = 12;

/// VERSION_1, INDIRECT_DESC, EVENT_IDX, HOTPLUG, CHANGE and PROTOCOL_FEATURES.
const FEATURES: u64 = 1 << 32 | 1 << 28 | 1 << 29 | 1 << 1 | 1 << 2 | 1 << 30;
/// MQ, REPLY_ACK, CONFIG, RESET_DEVICE, CONFIGURE_MEM_SLOTS.
const PROTOCOL: u64 = 1 << 0 | 1 << 3 | 1 << 9 | 1 << 13 | 1 << 15;

/// Bounds a read of a request the frontend is sending: it writes whole messages at once.
const REQUEST_PATIENCE: Duration = Duration::from_secs(2);
/// Bounds the wait for the frontend to take the connection and finish with it.
const RUN_PATIENCE: Duration = Duration::from_secs(10);

pub struct VhostUserReply {
    path: PathBuf,
    jobs: Sender<Vec<u8>>,
    done: Receiver<()>,
    pool: DmaPool,
    rings: RingAddresses,
}

impl VhostUserReply {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("virtio-fuzz-{}-vhost-user.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("listen on a unix socket");
        let (jobs, job_rx) = mpsc::channel::<Vec<u8>>();
        let (done_tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("hostile-backend".into())
            .spawn(move || {
                while let Ok(script) = job_rx.recv() {
                    match listener.accept() {
                        Ok((stream, _)) => play(stream, &script),
                        Err(e) => panic!("accept: {e}"),
                    }
                    if done_tx.send(()).is_err() {
                        break;
                    }
                }
            })
            .expect("start the backend thread");
        let pool = DmaPool::new(PoolConfig::new(1 << 20).hugepages(HugePages::Never)).expect("DMA pool");
        let r = &pool.regions()[0];
        let rings = RingAddresses {
            size: 64,
            desc_iova: r.iova,
            avail_iova: r.iova + 1024,
            used_iova: r.iova + 2048,
            desc_host: r.host_addr,
            avail_host: r.host_addr + 1024,
            used_host: r.host_addr + 2048,
        };
        VhostUserReply { path, jobs, done, pool, rings }
    }
}

impl Drop for VhostUserReply {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

fn message(code: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER + body.len());
    m.extend_from_slice(&code.to_le_bytes());
    m.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    m
}

/// Bytes the frontend reads in answer to a request (0: it reads nothing).
fn expected_reply(code: u32, flags: u32, size: usize) -> usize {
    match code {
        req::GET_FEATURES
        | req::GET_PROTOCOL_FEATURES
        | req::GET_QUEUE_NUM
        | req::GET_MAX_MEM_SLOTS
        | req::GET_VRING_BASE => HEADER + 8,
        req::GET_CONFIG => HEADER + size,
        _ if flags & NEED_REPLY != 0 => HEADER + 8,
        _ => 0,
    }
}

/// A well-formed reply carrying values from the input; `None` when none is due.
fn honest(code: u32, flags: u32, payload: &[u8], inp: &mut Input) -> Option<Vec<u8>> {
    let value = |inp: &mut Input, usual: u64| match inp.u8() % 4 {
        0 => usual,
        1 => inp.u64(),
        2 => u64::from(inp.u8()),
        _ => 0,
    };
    let body = match code {
        req::GET_FEATURES => match inp.u8() % 4 {
            0 => FEATURES,
            1 => FEATURES & !(1 << 30),
            2 => inp.u64(),
            _ => 0,
        }
        .to_le_bytes()
        .to_vec(),
        req::GET_PROTOCOL_FEATURES => match inp.u8() % 4 {
            0 => PROTOCOL,
            1 => inp.u64(),
            2 => PROTOCOL & !(1 << 3),
            _ => 0,
        }
        .to_le_bytes()
        .to_vec(),
        req::GET_QUEUE_NUM => value(inp, 3).to_le_bytes().to_vec(),
        req::GET_MAX_MEM_SLOTS => value(inp, 32).to_le_bytes().to_vec(),
        req::GET_VRING_BASE => {
            let mut b = payload.get(..4).unwrap_or(&[0; 4]).to_vec();
            b.extend_from_slice(&inp.u32().to_le_bytes());
            b
        }
        req::GET_CONFIG if payload.len() >= 12 => {
            let mut b = payload[..12].to_vec();
            let size = le32(&payload[4..]) as usize;
            if inp.u8() % 8 == 7 {
                // A backend that cannot read its configuration answers with size 0.
                b[4..8].copy_from_slice(&0u32.to_le_bytes());
            }
            b.extend_from_slice(&inp.bytes(size.min(4096)));
            b
        }
        _ if flags & NEED_REPLY != 0 => {
            let status = if inp.u8() % 8 == 7 { inp.u64() } else { 0 };
            status.to_le_bytes().to_vec()
        }
        _ => return None,
    };
    Some(message(code, &body))
}

/// Damages a reply.
fn mutate(m: &mut Vec<u8>, inp: &mut Input) {
    match inp.u8() % 7 {
        0 if !m.is_empty() => {
            let at = inp.below(m.len());
            m[at] ^= inp.u8() | 1;
        }
        1 if m.len() >= HEADER => m[8..12].copy_from_slice(&inp.u32().to_le_bytes()),
        2 if m.len() >= HEADER => m[0..4].copy_from_slice(&(inp.u32() % 48).to_le_bytes()),
        3 if m.len() >= HEADER => m[4..8].copy_from_slice(&inp.u32().to_le_bytes()),
        4 => {
            let n = inp.below(m.len().max(1));
            m.truncate(n);
        }
        5 => {
            let n = inp.below(24);
            m.extend_from_slice(&inp.bytes(n));
        }
        _ => {
            let n = m.len().saturating_sub(HEADER);
            let body = inp.bytes(n);
            m.truncate(HEADER.min(m.len()));
            m.extend_from_slice(&body);
        }
    }
}

/// Plays the backend for one connection.
fn play(mut s: UnixStream, script: &[u8]) {
    let mut inp = Input::new(script);
    let _ = s.set_read_timeout(Some(REQUEST_PATIENCE));
    let _ = s.set_write_timeout(Some(REQUEST_PATIENCE));
    // Bytes sent that the frontend has not read yet.
    let mut surplus = 0usize;
    loop {
        let mut hdr = [0u8; HEADER];
        if s.read_exact(&mut hdr).is_err() {
            return; // the frontend is done (or sent garbage, which it never does)
        }
        let (code, flags, size) = (le32(&hdr), le32(&hdr[4..]), le32(&hdr[8..]) as usize);
        assert_eq!(flags & REPLY, 0, "the frontend sent a reply");
        let mut payload = vec![0u8; size.min(1 << 16)];
        if s.read_exact(&mut payload).is_err() {
            return;
        }
        let action = inp.u8();
        let reply = honest(code, flags, &payload, &mut inp);
        let (bytes, fd) = match action {
            0..=159 => (reply.unwrap_or_default(), false),
            160..=199 => {
                let mut m = reply.unwrap_or_else(|| message(code, &0u64.to_le_bytes()));
                mutate(&mut m, &mut inp);
                (m, false)
            }
            200..=219 => {
                let n = inp.below(48);
                (inp.bytes(n), false)
            }
            220..=227 => (Vec::new(), false),
            228..=239 => (reply.unwrap_or_else(|| message(code, &0u64.to_le_bytes())), true),
            _ => return,
        };
        let sent = if fd && !bytes.is_empty() {
            let efd = EventFd::new(0).expect("eventfd");
            s.send_with_fd(&bytes[..], efd.as_raw_fd()).unwrap_or(0)
        } else {
            match s.write_all(&bytes) {
                Ok(()) => bytes.len(),
                Err(_) => return,
            }
        };
        let available = surplus + sent;
        let want = expected_reply(code, flags, size);
        if available < want {
            // The frontend would wait for bytes that never come: hang up instead.
            return;
        }
        surplus = available - want;
    }
}

impl VhostUserReply {
    fn op(&self, t: &mut VhostUserTransport, op: u8, arg: u8) {
        match op % 11 {
            0 => drop(t.device_features()),
            1 => {
                let offered = t.device_features().unwrap_or(0);
                let _ = t.set_features(offered & (FEATURES | u64::from(arg) << 24));
            }
            2 => {
                if let Ok(Some(n)) = t.queue_count() {
                    assert!(n <= 256, "queue count {n}");
                }
            }
            3 => {
                let mut buf = vec![0u8; 1 + usize::from(arg % 64)];
                let _ = t.read_config(u32::from(arg >> 6) * 4, &mut buf);
            }
            4 => drop(t.set_memory(self.pool.regions())),
            5 => drop(t.add_memory(&self.pool.regions()[0])),
            6 => drop(t.setup_queue(u16::from(arg % 4), &self.rings)),
            7 => drop(t.stop_queue(u16::from(arg % 4))),
            8 => drop(t.reset()),
            9 => drop(t.check_alive()),
            _ => drop(t.protocol_features()),
        }
    }
}

impl Target for VhostUserReply {
    fn seeds(&self) -> Vec<Vec<u8>> {
        // No frontend operations listed: the usual bring-up sequence runs. The backend script
        // follows: all honest with the usual values, then variations.
        let mut seeds = vec![Seed::new().u8(0).build()];
        seeds.push(Seed::new().u8(0).bytes(&[0; 64]).build());
        // Without PROTOCOL_FEATURES, then without REPLY_ACK.
        seeds.push(Seed::new().u8(0).u8(0).u8(0).u8(0).u8(1).build());
        seeds.push(Seed::new().u8(0).u8(0).u8(0).u8(0).u8(0).u8(0).u8(2).build());
        // Explicit operations: config reads, queue setup and stop, reset.
        let ops = [3u8, 0x20, 3, 0x7f, 6, 2, 7, 2, 8, 0, 2, 0, 9, 0];
        seeds.push(Seed::new().u8(ops.len() as u8 / 2).bytes(&ops).bytes(&[0; 32]).build());
        // A mutated reply to the probe, and a reply with a descriptor.
        seeds.push(Seed::new().u8(0).u8(170).u8(0).u8(4).u8(10).build());
        seeds.push(Seed::new().u8(0).u8(0).u8(0).u8(230).u8(0).build());
        seeds
    }

    fn run(&mut self, data: &[u8]) {
        let mut inp = Input::new(data);
        let nops = usize::from(inp.u8() % 16);
        let ops: Vec<(u8, u8)> = (0..nops).map(|_| (inp.u8(), inp.u8())).collect();
        let used = 1 + 2 * nops;
        let script = data.get(used..).unwrap_or(&[]).to_vec();
        self.jobs.send(script).expect("backend thread");
        let connected = VhostUserTransport::connect(self.path.to_str().unwrap());
        hit(if connected.is_ok() { "connect: ok" } else { "connect: error" });
        if let Ok(mut t) = connected {
            if ops.is_empty() {
                // What a controller does: features, queue count, configuration, memory,
                // queues, then a queue stop and a reset.
                let offered = t.device_features().unwrap_or(0);
                let _ = t.set_features(offered & FEATURES);
                if let Ok(Some(n)) = t.queue_count() {
                    assert!(n <= 256, "queue count {n}");
                }
                let mut cfg = [0u8; 36];
                if t.read_config(0, &mut cfg).is_ok() {
                    hit("config: read");
                }
                let _ = t.set_memory(self.pool.regions());
                for q in 0..3 {
                    let _ = t.setup_queue(q, &self.rings);
                }
                let _ = t.add_memory(&self.pool.regions()[0]);
                if t.stop_queue(2).is_ok() {
                    hit("queue: stopped");
                }
                let _ = t.check_alive();
                let _ = t.reset();
            } else {
                for (op, arg) in ops {
                    self.op(&mut t, op, arg);
                }
            }
        }
        self.done.recv_timeout(RUN_PATIENCE).expect("the backend finished the connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_sizes() {
        assert_eq!(expected_reply(req::GET_FEATURES, VERSION, 0), 20);
        assert_eq!(expected_reply(req::GET_CONFIG, VERSION, 48), 60);
        assert_eq!(expected_reply(2, VERSION, 8), 0);
        assert_eq!(expected_reply(2, VERSION | NEED_REPLY, 8), 20);
    }
}
