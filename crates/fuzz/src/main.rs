//! `virtio-fuzz TARGET [--count N] [--seed S]`: feeds hostile input to the parts of the project
//! that parse what the other side wrote, on stable Rust. Each execution gets a buffer (random,
//! or a hand-made seed mutated) that the target decodes through `arbitrary`; a panic, a failed
//! property check or an execution that hangs is reported with what reproduces it, and the
//! process exits 1.
//!
//! `--replay HEX` runs one reported input again. `VIRTIO_FUZZ_STATS=1` prints outcome counters
//! per target (how deep the inputs reach); `VIRTIO_FUZZ_SEEDS=1` runs only the hand-made seeds.

mod input;
mod stats;
mod targets;

use std::panic::{self, AssertUnwindSafe};
use std::process::exit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use input::{hex, unhex, Rng};
use targets::Target;

const USAGE: &str = "usage: virtio-fuzz TARGET [--count N] [--seed S] [--replay HEX]
  TARGET: all, or one of: used-ring scsi-response blk-response config-space vhost-user-reply
          target-request";

/// An execution running longer than this is a hang.
const HANG_AFTER: Duration = Duration::from_secs(30);

/// Panics seen by the hook, on any thread (a target's helper threads included).
static PANICS: AtomicU64 = AtomicU64::new(0);
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

/// What the watchdog needs to report a hang: the execution in progress and its input.
struct Current {
    target: &'static str,
    seed: u64,
    iteration: u64,
    started: Option<Instant>,
    input: Vec<u8>,
}

static CURRENT: Mutex<Current> =
    Mutex::new(Current { target: "", seed: 0, iteration: 0, started: None, input: Vec::new() });

struct Args {
    target: String,
    count: u64,
    seed: u64,
    replay: Option<Vec<u8>>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut target = None;
    let (mut count, mut seed, mut replay) = (100_000u64, 0u64, None);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--count" => count = value("--count")?.parse().map_err(|e| format!("--count: {e}"))?,
            "--seed" => seed = value("--seed")?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--replay" => {
                replay = Some(unhex(&value("--replay")?).ok_or("--replay: not a hex string")?);
            }
            "-h" | "--help" => return Err(String::new()),
            _ if a.starts_with('-') => return Err(format!("unknown option {a}")),
            _ if target.is_none() => target = Some(a),
            _ => return Err(format!("unexpected argument {a}")),
        }
    }
    Ok(Args { target: target.ok_or("no target given")?, count, seed, replay })
}

/// The input of iteration `i`: a function of the seed, the target and `i` only, so any
/// iteration can be regenerated.
fn iteration_rng(seed: u64, name: &str, i: u64) -> Rng {
    let name_hash =
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let mut r = Rng::new(seed ^ name_hash);
    let base = r.next_u64();
    Rng::new(base ^ i.wrapping_mul(0xd6e8_feb8_6659_fd93))
}

fn install_hooks() {
    panic::set_hook(Box::new(|info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        let msg = format!("panic in thread '{thread}': {info}");
        if thread != "main" {
            eprintln!("{msg}");
        }
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = msg;
    }));
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(|| loop {
            std::thread::sleep(Duration::from_millis(500));
            let cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(started) = cur.started {
                if started.elapsed() > HANG_AFTER {
                    eprintln!(
                        "HANG: {} iteration {} ran for more than {HANG_AFTER:?}\n  reproduce: virtio-fuzz {} --seed {} --count {}\n  input ({} bytes): {}",
                        cur.target,
                        cur.iteration,
                        cur.target,
                        cur.seed,
                        cur.iteration + 1,
                        cur.input.len(),
                        hex(&cur.input)
                    );
                    exit(1);
                }
            }
        })
        .expect("start the watchdog");
}

fn crash(name: &str, seed: u64, iteration: Option<u64>, data: &[u8]) -> ! {
    let msg = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).clone();
    eprintln!("CRASH: {name}: {msg}");
    match iteration {
        Some(i) => eprintln!(
            "  seed {seed} iteration {i}; reproduce: virtio-fuzz {name} --seed {seed} --count {}",
            i + 1
        ),
        None => eprintln!("  replayed input"),
    }
    eprintln!("  input ({} bytes, also runs with --replay): {}", data.len(), hex(data));
    exit(1);
}

/// Runs one input; false when it panicked anywhere.
fn execute(target: &mut dyn Target, name: &'static str, seed: u64, iteration: u64, data: &[u8]) -> bool {
    {
        let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        cur.target = name;
        cur.seed = seed;
        cur.iteration = iteration;
        cur.input.clear();
        cur.input.extend_from_slice(data);
        cur.started = Some(Instant::now());
    }
    let before = PANICS.load(Ordering::SeqCst);
    let ok = panic::catch_unwind(AssertUnwindSafe(|| target.run(data))).is_ok();
    CURRENT.lock().unwrap_or_else(|e| e.into_inner()).started = None;
    ok && PANICS.load(Ordering::SeqCst) == before
}

fn run_target(name: &'static str, args: &Args) {
    let mut target = targets::create(name).expect("known target");
    let seeds = target.seeds();
    if let Some(data) = &args.replay {
        if !execute(target.as_mut(), name, args.seed, 0, data) {
            crash(name, args.seed, None, data);
        }
        println!("{name:<17} executions=1 seconds=0.0 crashes=0");
        return;
    }
    if std::env::var_os("VIRTIO_FUZZ_SEEDS").is_some_and(|v| v == "1") {
        // The hand-made seeds alone, unmutated: to check what they reach (with the stats).
        for (i, data) in seeds.iter().enumerate() {
            if !execute(target.as_mut(), name, args.seed, i as u64, data) {
                crash(name, args.seed, None, data);
            }
        }
        println!("{name:<17} seeds={} crashes=0", seeds.len());
        stats::report(name);
        return;
    }
    let start = Instant::now();
    for i in 0..args.count {
        let data = input::generate(&mut iteration_rng(args.seed, name, i), &seeds);
        if !execute(target.as_mut(), name, args.seed, i, &data) {
            crash(name, args.seed, Some(i), &data);
        }
    }
    println!("{name:<17} executions={} seconds={:.1} crashes=0", args.count, start.elapsed().as_secs_f64());
    stats::report(name);
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("virtio-fuzz: {e}");
            }
            eprintln!("{USAGE}");
            exit(2);
        }
    };
    let names: Vec<&'static str> = if args.target == "all" {
        targets::NAMES.to_vec()
    } else {
        match targets::NAMES.iter().find(|n| **n == args.target) {
            Some(n) => vec![*n],
            None => {
                eprintln!("virtio-fuzz: unknown target {}\n{USAGE}", args.target);
                exit(2);
            }
        }
    };
    stats::enable_from_env();
    install_hooks();
    for name in names {
        run_target(name, &args);
    }
}
