//! A load generator that drives a channel from native code alone: the upper bound that the
//! JavaScript paths are compared with (`bench --api native`). One request per buffer, each
//! resubmitted as soon as it completes, so the queue depth stays constant.

use std::time::{Duration, Instant};

use napi_derive::napi;
use virtio_initiator_core::driver::{
    Controller as CoreController, DataRef, Direction, DriverError, HostBuffer, Request, RequestChannel,
    SubmitRecord,
};
use virtio_scsi_proto::LunAddress;

#[napi(object)]
pub struct LoadSpec {
    pub target: u32,
    pub lun: u32,
    pub block_size: u32,
    /// First block of the region the load touches (default 0).
    pub first_block: Option<f64>,
    /// Blocks of the region, from `first_block`.
    pub blocks: f64,
    /// Bytes per request, a multiple of the block size.
    pub io_bytes: u32,
    pub queue_depth: u32,
    /// Share of reads in percent (100: reads only, 0: writes only).
    pub read_percent: u32,
    /// Random offsets (else sequential, wrapping at the end).
    pub random: bool,
    /// Stop after this long (seconds) ...
    pub seconds: Option<f64>,
    /// ... or after this many requests, whichever comes first.
    pub ios: Option<f64>,
    pub seed: Option<u32>,
}

#[napi(object)]
pub struct LoadLatency {
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[napi(object)]
pub struct LoadResult {
    /// Requests completed.
    pub ios: f64,
    /// Completions that were not GOOD.
    pub errors: f64,
    pub reads: f64,
    pub writes: f64,
    /// Wall time of the run.
    pub seconds: f64,
    /// CPU time of the calling thread during the run.
    pub cpu_seconds: f64,
    /// Per-request latency in microseconds.
    pub latency_us: LoadLatency,
    /// The same latencies as a log-linear histogram in nanoseconds, laid out as the
    /// TypeScript `LatencyHistogram` (so that loads of several threads merge exactly).
    pub latency_histogram: Vec<f64>,
    /// Sum of all latencies, in microseconds.
    pub latency_sum_us: f64,
}

/// Below this many nanoseconds every nanosecond has a bucket of its own; above, each power of
/// two has `SUB_BUCKETS` (ts/bench.ts has the same layout).
const LINEAR_NS: usize = 128;
const SUB_BUCKETS: usize = 64;
const BUCKETS: usize = LINEAR_NS + (32 - 7) * SUB_BUCKETS;

fn bucket(ns: u32) -> usize {
    if (ns as usize) < LINEAR_NS {
        return ns as usize;
    }
    let e = 31 - ns.leading_zeros() as usize;
    LINEAR_NS + (e - 7) * SUB_BUCKETS + ((ns >> (e - 6)) as usize & (SUB_BUCKETS - 1))
}

fn bucket_middle_ns(i: usize) -> f64 {
    if i < LINEAR_NS {
        return i as f64;
    }
    let e = (i - LINEAR_NS) / SUB_BUCKETS + 7;
    let width = (1u64 << (e - 6)) as f64;
    (SUB_BUCKETS + (i - LINEAR_NS) % SUB_BUCKETS) as f64 * width + width / 2.0
}

/// xorshift64*: cheap, and the same sequence for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into memory we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn bad(detail: String) -> DriverError {
    DriverError::BadRequest { index: 0, detail }
}

pub fn run(
    channel: &mut RequestChannel,
    controller: &CoreController,
    spec: &LoadSpec,
) -> Result<LoadResult, DriverError> {
    let bs = u64::from(spec.block_size);
    if bs == 0 || spec.io_bytes == 0 || u64::from(spec.io_bytes) % bs != 0 {
        return Err(bad(format!("ioBytes {} is not a positive multiple of blockSize {bs}", spec.io_bytes)));
    }
    let per_io = u64::from(spec.io_bytes) / bs;
    let first = spec.first_block.map_or(0.0, |b| b.max(0.0)) as u64;
    let slots = (spec.blocks.max(0.0) as u64) / per_io;
    if slots == 0 {
        return Err(bad(format!("{} blocks hold no {}-byte request", spec.blocks, spec.io_bytes)));
    }
    let depth = spec.queue_depth as usize;
    if depth == 0 || depth > channel.capacity() {
        return Err(bad(format!("queue depth {depth} is outside 1..={}", channel.capacity())));
    }
    if spec.read_percent > 100 {
        return Err(bad(format!("readPercent {} is above 100", spec.read_percent)));
    }
    let lun = u16::try_from(spec.lun).map_err(|_| bad(format!("LUN {} is too large", spec.lun)))?;
    let addr = LunAddress::new(u8::try_from(spec.target).map_err(|_| bad("target above 255".into()))?, lun);
    let limit_ios = spec.ios.map_or(u64::MAX, |n| n.max(1.0) as u64);
    let limit_time = spec.seconds.map(Duration::from_secs_f64);
    if spec.ios.is_none() && spec.seconds.is_none() {
        return Err(bad("give seconds or ios".into()));
    }

    let mut buffers = Vec::with_capacity(depth);
    for _ in 0..depth {
        let mut b = controller.alloc_dma(spec.io_bytes as usize, 4096)?;
        b.fill(0xa5);
        buffers.push(b);
    }
    let mut rng = Rng(u64::from(spec.seed.unwrap_or(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut next_seq = 0u64;
    let mut histogram = vec![0u64; BUCKETS];
    let (mut sum_ns, mut max_ns) = (0u64, 0u32);
    let (mut issued, mut done, mut errors, mut reads, mut writes) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut in_flight = 0usize;

    let t0 = Instant::now();
    let cpu0 = thread_cpu_seconds();
    let mut stop = false;
    let mut push = |channel: &mut RequestChannel, token: usize| -> Result<bool, DriverError> {
        let slot = if spec.random { rng.next() % slots } else { (next_seq, next_seq += 1).0 % slots };
        let read = spec.read_percent == 100
            || (spec.read_percent > 0 && rng.next() % 100 < u64::from(spec.read_percent));
        let (lba, blocks) = (first + slot * per_io, per_io as u32);
        let b = &buffers[token];
        let rec = SubmitRecord {
            token: token as u32,
            addr,
            direction: if read { Direction::FromDevice } else { Direction::ToDevice },
            data: DataRef::None,
            task_attr: 0,
            request: if read {
                Request::Read { lba, blocks, fua: false }
            } else {
                Request::Write { lba, blocks, fua: false }
            },
        };
        if read {
            reads += 1;
        } else {
            writes += 1;
        }
        // SAFETY: the buffers live until the end of this function, after every request is back.
        unsafe { channel.push(&rec, Some(HostBuffer { ptr: b.as_ptr(), len: b.len() })) }
    };

    for token in 0..depth.min(limit_ios as usize) {
        if !push(channel, token)? {
            return Err(bad("the ring took fewer requests than the queue depth".into()));
        }
        issued += 1;
        in_flight += 1;
    }
    channel.publish()?;
    let mut finished = Vec::with_capacity(depth);
    while in_flight > 0 {
        finished.clear();
        // The channel times each request from its submission to the poll that found it.
        channel.complete(depth, |_, rec, _| {
            let ns = rec.latency_ns.min(u64::from(u32::MAX)) as u32;
            finished.push((rec.token as usize, rec.response == 0 && rec.status == 0, ns))
        })?;
        if finished.is_empty() {
            continue;
        }
        let now = Instant::now();
        if !stop && (issued >= limit_ios || limit_time.is_some_and(|t| now - t0 >= t)) {
            stop = true;
        }
        for &(token, ok, ns) in &finished {
            histogram[bucket(ns)] += 1;
            sum_ns += u64::from(ns);
            max_ns = max_ns.max(ns);
            done += 1;
            in_flight -= 1;
            if !ok {
                errors += 1;
            }
            if !stop && issued < limit_ios {
                if !push(channel, token)? {
                    return Err(bad("the ring refused a request while below the queue depth".into()));
                }
                issued += 1;
                in_flight += 1;
            }
        }
        channel.publish()?;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let cpu_seconds = thread_cpu_seconds() - cpu0;

    let max_us = f64::from(max_ns) / 1000.0;
    let pct = |q: f64| -> f64 {
        if done == 0 {
            return 0.0;
        }
        let rank = ((q * done as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in histogram.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return (bucket_middle_ns(i) / 1000.0).min(max_us);
            }
        }
        max_us
    };
    let mean = if done == 0 { 0.0 } else { sum_ns as f64 / done as f64 / 1000.0 };
    Ok(LoadResult {
        ios: done as f64,
        errors: errors as f64,
        reads: reads as f64,
        writes: writes as f64,
        seconds,
        cpu_seconds,
        latency_us: LoadLatency { mean, p50: pct(0.5), p99: pct(0.99), p999: pct(0.999), max: max_us },
        latency_histogram: histogram.iter().map(|&n| n as f64).collect(),
        latency_sum_us: sum_ns as f64 / 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_keep_values_within_a_sixty_fourth() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(127), 127);
        assert_eq!(bucket(128), LINEAR_NS);
        assert_eq!(bucket(u32::MAX), BUCKETS - 1);
        for ns in [128u32, 129, 1000, 4095, 4096, 123_456, 9_999_999, u32::MAX / 3] {
            let mid = bucket_middle_ns(bucket(ns));
            assert!((mid - f64::from(ns)).abs() <= f64::from(ns) / 64.0, "{ns} -> {mid}");
        }
        // Buckets are ordered: a larger value never lands in an earlier bucket.
        let mut last = 0;
        for ns in (0..1_000_000u32).step_by(37) {
            assert!(bucket(ns) >= last);
            last = bucket(ns);
        }
    }
}
