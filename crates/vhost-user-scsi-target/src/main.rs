use std::process::ExitCode;
use std::sync::Arc;

use vhost_user_scsi_target::blk::{BlkBackend, BlkOptions};
use vhost_user_scsi_target::cli::{self, Parsed};
use vhost_user_scsi_target::control::{Control, Served};
use vhost_user_scsi_target::device::{DeviceOptions, Quirks, ScsiBackend};
use vhost_user_scsi_target::scsi::{open_storage, Bus};
use vhost_user_scsi_target::server::Server;

fn main() -> ExitCode {
    let args = match cli::parse(std::env::args().skip(1)) {
        Ok((Parsed::Help, _)) => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok((Parsed::Run, Some(a))) => a,
        Ok((Parsed::Run, None)) => unreachable!("parse returns arguments to run with"),
        Err(e) => {
            eprintln!("vhost-user-scsi-target: {e}");
            return ExitCode::from(2);
        }
    };
    let level = if args.verbose { "debug" } else { "info" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-user-scsi-target: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: cli::Args) -> Result<(), String> {
    // Before any thread starts, so that every thread inherits the signal mask.
    let mut sockets = vec![args.socket.clone()];
    sockets.extend(args.control.clone());
    vhost_user_scsi_target::signals::remove_on_exit(sockets).map_err(|e| format!("signal handling: {e}"))?;

    if args.device_type == cli::DeviceType::Blk {
        return run_blk(args);
    }
    let highest = args.luns.iter().map(|l| l.addr.target).max().unwrap_or(0);
    let bus = Arc::new(Bus::new(args.max_target.unwrap_or(highest)));
    for spec in args.luns {
        let (t, l) = (spec.addr.target, spec.addr.lun);
        bus.add(spec.addr, spec.cfg).map_err(|e| format!("--lun {t}:{l}: {e}"))?;
    }
    let opts = DeviceOptions {
        request_queues: args.queues,
        queue_size: args.queue_size,
        poll_threads: args.poll_threads,
        quirks: Quirks {
            tmf_zero_used_len: args.quirks.contains(&cli::Quirk::TmfZeroUsedLen),
            abort_task_ignored: args.quirks.contains(&cli::Quirk::AbortTaskIgnored),
            tmf_ignored: args.quirks.contains(&cli::Quirk::TmfIgnored),
        },
    };
    let backend = ScsiBackend::new(bus.clone(), opts);

    let server = Server::bind(&args.socket).map_err(|e| e.to_string())?;
    serve_control(&args.socket, args.control.as_deref(), &server, Served::Scsi(backend.clone()))?;

    let luns = bus.list();
    println!(
        "{}",
        serde_json::json!({
            "event": "listening",
            "socket": args.socket,
            "control": args.control,
            "queues": args.queues,
            "queue_size": args.queue_size,
            "poll_threads": args.poll_threads,
            "luns": luns,
        })
    );
    server.run(&backend).map_err(|e| e.to_string())
}

/// `--type blk`: one disk over vhost-user-blk.
fn run_blk(args: cli::Args) -> Result<(), String> {
    let spec = &args.luns[0];
    let (storage, path) = open_storage(spec.addr, &spec.cfg).map_err(|e| format!("--lun: {e}"))?;
    let kind = storage.kind();
    let bytes = storage.len();
    // A stable identity, as the SCSI LUNs have: the same disk reports the same ID after a restart.
    let id = match &path {
        Some(p) => {
            use std::os::unix::fs::MetadataExt;
            format!("VIRTINIT-{:x}", std::fs::metadata(p).map_or(0, |m| m.ino()))
        }
        None => format!("VIRTINIT-{kind}"),
    };
    let opts = BlkOptions {
        request_queues: args.queues,
        queue_size: args.queue_size,
        block_size: spec.cfg.block_size,
        read_only: spec.cfg.read_only,
        id,
        poll_threads: args.poll_threads,
    };
    let backend = BlkBackend::new(storage, opts);
    let server = Server::bind(&args.socket).map_err(|e| e.to_string())?;
    serve_control(&args.socket, args.control.as_deref(), &server, Served::Blk(backend.clone()))?;
    println!(
        "{}",
        serde_json::json!({
            "event": "listening",
            "type": "blk",
            "socket": args.socket,
            "control": args.control,
            "queues": args.queues,
            "queue_size": args.queue_size,
            "poll_threads": args.poll_threads,
            "disk": { "kind": kind, "bytes": bytes, "block_size": spec.cfg.block_size,
                      "read_only": spec.cfg.read_only, "path": path },
        })
    );
    server.run(&backend).map_err(|e| e.to_string())
}

/// Starts the control socket when one was asked for; without it, the vhost-user socket goes too.
fn serve_control(
    socket: &std::path::Path,
    control: Option<&std::path::Path>,
    server: &Server,
    device: Served,
) -> Result<(), String> {
    let Some(path) = control else { return Ok(()) };
    let ctl = Control { device, socket: socket.to_owned(), listener_fd: server.listener_fd() };
    ctl.spawn(path).map_err(|e| {
        let _ = std::fs::remove_file(socket);
        e.to_string()
    })
}
