//! The target binary refuses bad command lines with a clear message and a non-zero exit.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-scsi-target")).args(args).output().expect("run the target")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("vus-cli-{name}-{}", std::process::id()))
}

#[test]
fn usage_errors_exit_2_and_name_the_argument() {
    let o = run(&["--lun", "0:0:ram:1M"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--socket is required"), "{}", stderr(&o));

    let o = run(&["--socket", "/tmp/x.sock", "--lun", "0:0:tape:1M"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("tape"), "{}", stderr(&o));

    let o = run(&["--socket", "/tmp/x.sock", "--queue-size", "100"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--queue-size"), "{}", stderr(&o));

    let o = run(&["--socket", "/tmp/x.sock", "--poll-threads", "2"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--poll-threads needs --poll"), "{}", stderr(&o));

    let o = run(&["--socket", "/tmp/x.sock", "--poll", "--poll-threads", "2"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--poll-threads 2 is more than the 1 request queue(s)"), "{}", stderr(&o));

    let o = run(&["--help"]);
    assert!(o.status.success());
    let usage = String::from_utf8_lossy(&o.stdout);
    assert!(usage.contains("--lun SPEC") && usage.contains("--poll-threads N"), "{usage}");
}

#[test]
fn existing_socket_file_is_refused_and_kept() {
    let path = temp("exists");
    std::fs::write(&path, b"not ours").unwrap();
    let o = run(&["--socket", path.to_str().unwrap(), "--lun", "0:0:ram:1M"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&path).unwrap(), b"not ours");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn missing_or_misaligned_image_is_refused() {
    let sock = temp("img.sock");
    let o = run(&["--socket", sock.to_str().unwrap(), "--lun", "0:0:file:/nonexistent/disk.img:512"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("/nonexistent/disk.img"), "{}", stderr(&o));
    assert!(!sock.exists(), "socket left behind after a failed start");

    let img = temp("odd.img");
    std::fs::write(&img, vec![0u8; 1000]).unwrap();
    let spec = format!("0:0:file:{}:512", img.display());
    let o = run(&["--socket", sock.to_str().unwrap(), "--lun", &spec]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("1000"), "{}", stderr(&o));
    std::fs::remove_file(&img).unwrap();
}
