//! The virtio-scsi device layer: the features and configuration the driver takes. Requests are
//! framed by the channel (`CmdRequest` headers, CDBs from `records::scsi_cdb`); task management
//! and events run on the controller's control and event queues.

use log::debug;
use virtio_scsi_proto::{feature, Config, Event, CDB_SIZE, SENSE_SIZE};

use super::DriverError;
use crate::transport::Transport;

/// Device features the driver takes when offered.
pub(super) const FEATURES: [u32; 2] = [feature::HOTPLUG, feature::CHANGE];

/// Reads the configuration space; a backend without one (no CONFIG protocol feature) gets the
/// spec's defaults and one request queue, unless the transport knows better.
pub(super) fn read_config(t: &mut dyn Transport, queue_size: u16) -> Config {
    let mut raw = [0u8; Config::SIZE];
    let read = t.read_config(0, &mut raw).map_err(DriverError::from).and_then(|()| {
        Config::decode(&raw).ok_or_else(|| DriverError::Config("short configuration space".into()))
    });
    match read {
        Ok(c) => c,
        Err(e) => {
            debug!("no configuration space ({e}); using defaults");
            Config {
                num_queues: 1,
                seg_max: u32::from(queue_size) - 2,
                max_sectors: 0xffff,
                cmd_per_lun: u32::from(queue_size),
                event_info_size: Event::SIZE as u32,
                sense_size: SENSE_SIZE as u32,
                cdb_size: CDB_SIZE as u32,
                max_channel: 0,
                max_target: 255,
                max_lun: u32::from(virtio_scsi_proto::lun::MAX_LUN),
            }
        }
    }
}
