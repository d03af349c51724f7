//! The fuzz targets. Each decodes its input with [`crate::input::Input`], drives the code under
//! test, and panics when a property check fails; the code under test must never panic itself.

mod blk_response;
mod config_space;
mod fake;
mod scsi_response;
mod target_request;
mod used_ring;
mod vhost_user_reply;

pub trait Target {
    /// Hand-made valid inputs that mutation starts from, to reach deep paths.
    fn seeds(&self) -> Vec<Vec<u8>>;
    /// One execution.
    fn run(&mut self, data: &[u8]);
}

pub const NAMES: [&str; 6] =
    ["used-ring", "scsi-response", "blk-response", "config-space", "vhost-user-reply", "target-request"];

pub fn create(name: &str) -> Option<Box<dyn Target>> {
    Some(match name {
        "used-ring" => Box::new(used_ring::UsedRing::new()),
        "scsi-response" => Box::new(scsi_response::ScsiResponse::new()),
        "blk-response" => Box::new(blk_response::BlkResponse::new()),
        "config-space" => Box::new(config_space::ConfigSpace::new()),
        "vhost-user-reply" => Box::new(vhost_user_reply::VhostUserReply::new()),
        "target-request" => Box::new(target_request::TargetRequest::new()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{generate, Rng};

    /// Every target survives its own seeds and a few hundred generated inputs.
    #[test]
    fn targets_run_their_seeds() {
        for name in NAMES {
            let mut t = create(name).unwrap();
            let seeds = t.seeds();
            assert!(!seeds.is_empty(), "{name} has seeds");
            for s in &seeds {
                t.run(s);
            }
            let mut rng = Rng::new(1);
            for _ in 0..200 {
                let data = generate(&mut rng, &seeds);
                t.run(&data);
            }
        }
    }
}
