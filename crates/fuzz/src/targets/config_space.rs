//! `config-space`: the virtio-scsi configuration space and everything a device reports at
//! negotiation. `Config::decode` gets arbitrary bytes; then `Controller::open` runs against
//! an in-process device whose offered features, configuration space (num_queues, seg_max,
//! max_sectors, cmd_per_lun, sense_size, cdb_size, max_target, max_lun), queue count, queue
//! sizes and failing calls come from the input, with arbitrary options. It must return a
//! typed error or a controller whose reported setup stays within what the device allows.

use virtio_initiator_core::driver::{Controller, ControllerOptions, DriverError, RequestChannel};
use virtio_initiator_core::memory::HugePages;
use virtio_scsi_proto::{Config, CDB_SIZE, SENSE_SIZE};

use super::fake::{FakeTransport, Script};
use super::Target;
use crate::input::{Input, Seed};
use crate::stats::hit;

/// Features the controller asks for (ANY_LAYOUT, VERSION_1, ACCESS_PLATFORM, INDIRECT_DESC,
/// EVENT_IDX, HOTPLUG, CHANGE).
const WANTED: u64 = 1 << 27 | 1 << 32 | 1 << 33 | 1 << 28 | 1 << 29 | 1 << 1 | 1 << 2;

pub struct ConfigSpace;

impl ConfigSpace {
    pub fn new() -> Self {
        ConfigSpace
    }
}

fn config_checks(b: &[u8]) {
    match Config::decode(b) {
        None => assert!(b.len() < Config::SIZE),
        Some(c) => {
            assert_eq!(&c.encode()[..], &b[..Config::SIZE], "config round trip");
            assert_eq!(Config::decode(&c.encode()), Some(c));
        }
    }
}

/// A queue size: mostly the usual powers of two, sometimes anything.
fn queue_size(inp: &mut Input) -> u16 {
    let v = inp.u16();
    match v % 4 {
        0 | 1 => 1 << ((v >> 2) % 11),
        2 => 256,
        _ => v >> 2,
    }
}

impl Target for ConfigSpace {
    fn seeds(&self) -> Vec<Vec<u8>> {
        let config = |num_queues: u32, max_target: u16| {
            Config {
                num_queues,
                seg_max: 254,
                max_sectors: 0xffff,
                cmd_per_lun: 128,
                event_info_size: 16,
                sense_size: SENSE_SIZE as u32,
                cdb_size: CDB_SIZE as u32,
                max_channel: 0,
                max_target,
                max_lun: 16383,
            }
            .encode()
        };
        let mut seeds = Vec::new();
        // A config-space-only seed, then whole negotiations.
        seeds.push(Seed::new().u8(Config::SIZE as u8).bytes(&config(4, 255)).build());
        let v1 = 1u64 << 32;
        // Features, config, four request queues reported by count, size 256, default queues.
        let s = Seed::new().u8(0).u64(v1 | 1 << 28 | 1 << 29).u8(0).bytes(&config(4, 7));
        seeds.push(s.u8(1).u16(6).u8(0).u8(0).u16(8 << 2).u8(0).u16(3).build());
        // No queue count: num_queues from the config space; one request queue asked for.
        let s = Seed::new().u8(0).u64(v1).u8(0).bytes(&config(2, 255));
        seeds.push(s.u8(0).u8(0).u8(0).u16(2).u8(2).u8(1).u16(3).build());
        // Per-queue maxima below the asked size (100, then 16), hotplug and change offered.
        let s = Seed::new().u8(0).u64(v1 | 1 << 1 | 1 << 2).u8(0).bytes(&config(100, 3));
        let s = s.u8(2).u8(3).u8(2).u8(1).u16(100).u8(2).u16(4 << 2);
        seeds.push(s.u8(0).u16(10 << 2).u8(0).u16(3).build());
        // No configuration space at all (defaults), and a failing transport call.
        let s = Seed::new().u8(0).u64(v1).u8(2).u8(0).u8(0).u8(0xe4).u16(2).u8(0).u16(3);
        seeds.push(s.build());
        seeds
    }

    fn run(&mut self, data: &[u8]) {
        let mut inp = Input::new(data);
        let n = inp.below(Config::SIZE + 12);
        let raw = inp.bytes(n);
        config_checks(&raw);

        let features = match inp.u64() {
            0 => WANTED | 1 << 32,
            f => f,
        };
        let config = match inp.u8() % 4 {
            0 | 1 => Some(inp.bytes(Config::SIZE)),
            2 => None,
            _ => Some(raw.clone()),
        };
        let queue_count = match inp.u8() % 3 {
            0 => None,
            1 => Some(inp.u16()),
            _ => Some(2 + u16::from(inp.u8() % 20)),
        };
        let maxima = inp.u8() % 8;
        let max_queue_size = (0..maxima)
            .map(|_| match inp.u8() % 3 {
                0 => None,
                1 => Some(inp.u16()),
                _ => Some(queue_size(&mut inp)),
            })
            .collect();
        let fail_call = match inp.u8() {
            f if f < 0xe0 => None,
            f => Some(u32::from(f - 0xe0)),
        };
        let script = Script { features, config: config.clone(), queue_count, max_queue_size, fail_call };
        let asked_size = queue_size(&mut inp);
        let request_queues = match inp.u8() % 4 {
            0 => None,
            1 => Some(inp.u16()),
            _ => Some(u16::from(inp.u8() % 20)),
        };
        let memory_bytes = match inp.u16() % 8 {
            0 => 0,
            1 => 4096,
            2 => 256 << 10,
            _ => 1 << 20,
        };
        let opts = ControllerOptions {
            request_queues,
            queue_size: asked_size,
            memory_bytes,
            max_memory_bytes: Some(memory_bytes),
            hugepages: HugePages::Never,
            device: None,
        };
        let (t, state) = FakeTransport::new(script.clone());
        match Controller::open(Box::new(t), &opts) {
            Err(e) => {
                hit(match e {
                    DriverError::Config(_) => "open: config error",
                    DriverError::Memory(_) => "open: memory error",
                    DriverError::Queue(_) => "open: queue error",
                    DriverError::Transport(_) => "open: transport error",
                    _ => "open: other error",
                });
                if !asked_size.is_power_of_two() || !(4..=1024).contains(&asked_size) {
                    assert!(matches!(e, DriverError::Config(_)), "bad queue size {asked_size}: {e}");
                }
                if request_queues == Some(0)
                    && asked_size.is_power_of_two()
                    && (4..=1024).contains(&asked_size)
                {
                    assert!(!matches!(e, DriverError::Queue(_)), "no request queues: {e}");
                }
            }
            Ok(c) => {
                let info = c.info().clone();
                hit(if state.lock().unwrap().config_read {
                    "open: ok, config read"
                } else {
                    "open: ok, defaults"
                });
                assert!(asked_size.is_power_of_two() && (4..=1024).contains(&asked_size));
                let device_queues = match script.queue_count {
                    Some(n) => {
                        assert!(n >= 3, "opened with {n} virtqueues");
                        n - 2
                    }
                    None => info.scsi().unwrap().num_queues.clamp(1, 256) as u16,
                };
                assert!(info.request_queues >= 1 && info.request_queues <= device_queues, "{info:?}");
                match request_queues {
                    Some(n) => assert_eq!(info.request_queues, n),
                    None => assert_eq!(info.request_queues, device_queues.min(16)),
                }
                let size = info.queue_size;
                assert!(size.is_power_of_two() && size <= asked_size, "queue size {size}");
                for i in 0..2 + info.request_queues {
                    if let Some(Some(max)) = script.max_queue_size.get(i as usize) {
                        assert!(size <= *max, "queue {i}: size {size} above {max}");
                    }
                }
                let config_read = state.lock().unwrap().config_read;
                match script.config.as_deref().and_then(Config::decode) {
                    Some(want) if config_read => {
                        assert_eq!(info.scsi(), Some(&want), "configuration as the device reported it")
                    }
                    _ => {
                        assert_eq!(
                            info.scsi().unwrap().cdb_size,
                            CDB_SIZE as u32,
                            "defaults without a configuration"
                        )
                    }
                }
                let acked = state.lock().unwrap().acked.expect("features were set");
                assert_eq!(acked, features & WANTED, "negotiated features");
                assert_eq!((info.indirect, info.event_idx), (acked & 1 << 28 != 0, acked & 1 << 29 != 0));
                assert!(state.lock().unwrap().started);
                // A channel over the smallest rings must fail cleanly, not panic.
                if let Ok(mut ch) = RequestChannel::open(&c) {
                    assert!(ch.capacity() == size as usize);
                    hit("channel: opened");
                    ch.close();
                }
                c.close();
                assert!(c.check_open().is_err(), "closed");
            }
        }
    }
}
