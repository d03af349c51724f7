//! The PCI transport without hardware: address parsing, the capability walk, IOMMU info
//! parsing, sysfs discovery on a fake tree, and the virtio-pci transport against an emulated
//! function (the common configuration's registers and status handshake as QEMU implements
//! them). Physical addresses and hugepage pools are checked for real where the machine allows.

use std::fs::{self, File};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{symlink, FileExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use virtio_scsi_proto::Config;

use super::vfio::{parse_iommu_info, IovaRange};
use super::virtio_pci::*;
use super::*;
use crate::driver::{Controller, ControllerOptions, DeviceType, DriverError, RequestChannel};
use crate::memory::{free_hugepages, DmaPool, HugePages, IovaPlacement, PoolConfig, HUGE_PAGE_SIZE};
use crate::transport::{Notifier, RingAddresses, Transport, TransportError};

const MIB: u64 = 1 << 20;

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

// ---------------------------------------------------------------- addresses

#[test]
fn pci_addresses_parse_and_print() {
    let a = addr("0000:00:03.0");
    assert_eq!(a, PciAddress { domain: 0, bus: 0, device: 3, function: 0 });
    assert_eq!(addr("00:1f.7"), PciAddress { domain: 0, bus: 0, device: 0x1f, function: 7 });
    assert_eq!(addr("abcd:fe:10.2").to_string(), "abcd:fe:10.2");
    assert_eq!(addr("00:03.0").to_string(), "0000:00:03.0");
    for bad in
        ["", "0000:00:03", "00:20.0", "00:03.8", "0:0:0:0.0", "g000:00:03.0", "00000:00:03.0", "00:03.0x"]
    {
        match bad.parse::<PciAddress>() {
            Err(PciError::InvalidAddress(s)) => assert_eq!(s, bad),
            other => panic!("{bad:?} parsed as {other:?}"),
        }
    }
    let msg = "nonsense".parse::<PciAddress>().unwrap_err().to_string();
    assert!(msg.contains("'nonsense' is not a PCI address"), "{msg}");
}

// ---------------------------------------------------------------- capabilities

/// A vendor capability: (cfg_type, bar, offset, length, notify multiplier).
type VCap = (u8, u8, u32, u32, Option<u32>);

/// QEMU's layout for virtio-pci modern: everything in BAR4, MSI-X in BAR1.
const QEMU_CAPS: [VCap; 4] = [
    (VIRTIO_PCI_CAP_COMMON_CFG, 4, 0x0000, 0x1000, None),
    (VIRTIO_PCI_CAP_ISR_CFG, 4, 0x1000, 0x1000, None),
    (VIRTIO_PCI_CAP_DEVICE_CFG, 4, 0x2000, 0x1000, None),
    (VIRTIO_PCI_CAP_NOTIFY_CFG, 4, 0x3000, 0x1000, Some(4)),
];

/// A configuration space of device 1af4:`device` with an MSI-X capability first, then the
/// vendor capabilities, chained from 0x40.
fn config_space(device: u16, caps: &[VCap]) -> [u8; 256] {
    let mut cfg = [0u8; 256];
    cfg[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
    cfg[2..4].copy_from_slice(&device.to_le_bytes());
    cfg[6] = 0x10; // capability list
    cfg[0x34] = 0x40;
    // MSI-X: id 0x11, 12 bytes
    cfg[0x40] = 0x11;
    let mut at = 0x40usize;
    let mut next = 0x50usize;
    for &(ty, bar, offset, length, mult) in caps {
        cfg[at + 1] = next as u8;
        at = next;
        let len = if mult.is_some() { 20 } else { 16 };
        cfg[at] = 0x09;
        cfg[at + 2] = len;
        cfg[at + 3] = ty;
        cfg[at + 4] = bar;
        cfg[at + 8..at + 12].copy_from_slice(&offset.to_le_bytes());
        cfg[at + 12..at + 16].copy_from_slice(&length.to_le_bytes());
        if let Some(m) = mult {
            cfg[at + 16..at + 20].copy_from_slice(&m.to_le_bytes());
        }
        next = at + 24;
    }
    cfg[at + 1] = 0;
    cfg
}

#[test]
fn capability_walk_finds_qemus_layout() {
    let a = addr("00:02.0");
    let caps = parse_caps(a, &config_space(0x1048, &QEMU_CAPS)).unwrap();
    assert_eq!(caps.common, CapWindow { bar: 4, offset: 0, length: 0x1000 });
    assert_eq!(caps.isr, CapWindow { bar: 4, offset: 0x1000, length: 0x1000 });
    assert_eq!(caps.device, Some(CapWindow { bar: 4, offset: 0x2000, length: 0x1000 }));
    assert_eq!(caps.notify, CapWindow { bar: 4, offset: 0x3000, length: 0x1000 });
    assert_eq!(caps.notify_off_multiplier, 4);
}

#[test]
fn capability_walk_takes_the_first_usable_of_each_type() {
    let a = addr("00:02.0");
    let mut caps = vec![
        // reserved BAR number: skipped
        (VIRTIO_PCI_CAP_COMMON_CFG, 7, 0x8000, 0x1000, None),
        (VIRTIO_PCI_CAP_COMMON_CFG, 2, 0x100, 0x40, None),
        (VIRTIO_PCI_CAP_COMMON_CFG, 4, 0x0, 0x1000, None),
        // PCI_CFG access capability: not a structure we map
        (5, 0, 0, 0, None),
    ];
    caps.extend_from_slice(&QEMU_CAPS[1..]);
    let found = parse_caps(a, &config_space(0x1004, &caps)).unwrap();
    assert_eq!(found.common, CapWindow { bar: 2, offset: 0x100, length: 0x40 });
}

#[test]
fn legacy_only_and_broken_capability_lists_are_refused() {
    let a = addr("00:05.0");
    // No vendor capabilities at all: a legacy-only device.
    assert!(matches!(parse_caps(a, &config_space(0x1004, &[])), Err(PciError::LegacyOnly(x)) if x == a));
    let mut no_list = config_space(0x1004, &QEMU_CAPS);
    no_list[6] = 0;
    let err = parse_caps(a, &no_list).unwrap_err();
    assert!(err.to_string().contains("only the legacy virtio interface"), "{err}");

    // Missing notification structure.
    let err = parse_caps(a, &config_space(0x1048, &QEMU_CAPS[..3])).unwrap_err();
    assert!(err.to_string().contains("no virtio notification capability"), "{err}");

    // A loop in the list.
    let mut looped = config_space(0x1048, &QEMU_CAPS);
    looped[0x50 + 1] = 0x40;
    let err = parse_caps(a, &looped).unwrap_err();
    assert!(err.to_string().contains("loops"), "{err}");

    // A pointer into the standard header.
    let mut wild = config_space(0x1048, &QEMU_CAPS);
    wild[0x34] = 0x10;
    let err = parse_caps(a, &wild).unwrap_err();
    assert!(err.to_string().contains("points to 0x10"), "{err}");

    // A common configuration window too small for its registers.
    let mut small = QEMU_CAPS;
    small[0].3 = 0x20;
    let err = parse_caps(a, &config_space(0x1048, &small)).unwrap_err();
    assert!(err.to_string().contains("common configuration window"), "{err}");

    // Too short to hold a header.
    assert!(matches!(parse_caps(a, &[0u8; 16]), Err(PciError::BadDevice { .. })));
}

// ---------------------------------------------------------------- IOVA choice

#[test]
fn iova_base_lies_inside_the_iommu_ranges() {
    let intel =
        [IovaRange { start: 0, end: 0xfedf_ffff }, IovaRange { start: 0xfef0_0000, end: 0x7f_ffff_ffff }];
    assert_eq!(choose_iova_base(&intel, 64 * MIB), Some(PoolConfig::DEFAULT_IOVA_BASE));
    assert_eq!(choose_iova_base(&[], 64 * MIB), Some(PoolConfig::DEFAULT_IOVA_BASE));
    // Only low memory: the first 2 MiB-aligned address above 0.
    let low = [IovaRange { start: 0, end: 0xfedf_ffff }];
    assert_eq!(choose_iova_base(&low, 64 * MIB), Some(2 * MIB));
    // An odd start is rounded up to 2 MiB.
    let odd = [IovaRange { start: 0x1234_5678, end: 0x3fff_ffff }];
    assert_eq!(choose_iova_base(&odd, 4 * MIB), Some(0x1240_0000));
    // The largest range is preferred; a pool that fits nowhere has no base.
    let two =
        [IovaRange { start: 0x20_0000, end: 0x5f_ffff }, IovaRange { start: 0x4000_0000, end: 0x7fff_ffff }];
    assert_eq!(choose_iova_base(&two, MIB), Some(0x4000_0000));
    assert_eq!(choose_iova_base(&two, 2 << 30), None);
    let r = IovaRange { start: 0x1000, end: 0x1fff };
    assert!(r.contains(0x1000, 0x1000));
    assert!(!r.contains(0x1000, 0x1001));
    assert!(!r.contains(0x1000, 0));
    assert!(!r.contains(u64::MAX, 2));
}

#[test]
fn iommu_info_reply_is_parsed() {
    // argsz, flags (PGSIZES | CAPS), pgsizes, cap_offset, pad; then the IOVA range cap.
    let mut b = vec![0u8; 24 + 16 + 32];
    let argsz = b.len() as u32;
    b[0..4].copy_from_slice(&argsz.to_ne_bytes());
    b[4..8].copy_from_slice(&3u32.to_ne_bytes());
    b[8..16].copy_from_slice(&0x4020_1000u64.to_ne_bytes());
    b[16..20].copy_from_slice(&24u32.to_ne_bytes());
    b[24..26].copy_from_slice(&1u16.to_ne_bytes()); // IOVA range
    b[28..32].copy_from_slice(&0u32.to_ne_bytes()); // last
    b[32..36].copy_from_slice(&2u32.to_ne_bytes());
    for (i, (s, e)) in [(0u64, 0xfedf_ffffu64), (0xfef0_0000, 0x7f_ffff_ffff)].iter().enumerate() {
        let at = 40 + 16 * i;
        b[at..at + 8].copy_from_slice(&s.to_ne_bytes());
        b[at + 8..at + 16].copy_from_slice(&e.to_ne_bytes());
    }
    let (sizes, ranges) = parse_iommu_info(&b);
    assert_eq!(sizes, 0x4020_1000);
    assert_eq!(
        ranges,
        [IovaRange { start: 0, end: 0xfedf_ffff }, IovaRange { start: 0xfef0_0000, end: 0x7f_ffff_ffff }]
    );
    // A range count beyond the buffer stops at the buffer's end; a cap chain pointing into
    // the fixed part is ignored.
    b[32..36].copy_from_slice(&1000u32.to_ne_bytes());
    assert_eq!(parse_iommu_info(&b).1.len(), 2);
    b[16..20].copy_from_slice(&8u32.to_ne_bytes());
    assert!(parse_iommu_info(&b).1.is_empty());
}

// ---------------------------------------------------------------- sysfs

struct FakeSysfs {
    root: PathBuf,
}

impl FakeSysfs {
    fn new(tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!("pci-sysfs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in [
            "bus/pci/devices",
            "bus/pci/drivers/virtio-pci",
            "bus/pci/drivers/vfio-pci",
            "kernel/iommu_groups",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("bus/pci/drivers_probe"), "").unwrap();
        FakeSysfs { root }
    }

    fn add(&self, bdf: &str, vendor: u16, device: u16, driver: Option<&str>, group: Option<u32>) {
        let dir = self.root.join("bus/pci/devices").join(bdf);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("vendor"), format!("0x{vendor:04x}\n")).unwrap();
        fs::write(dir.join("device"), format!("0x{device:04x}\n")).unwrap();
        fs::write(dir.join("class"), "0x010000\n").unwrap();
        fs::write(dir.join("numa_node"), "-1\n").unwrap();
        fs::write(dir.join("driver_override"), "(null)\n").unwrap();
        let mut config = vec![0u8; 64];
        config[0x0e] = 0;
        fs::write(dir.join("config"), config).unwrap();
        if let Some(d) = driver {
            let drv = self.root.join("bus/pci/drivers").join(d);
            fs::create_dir_all(&drv).unwrap();
            fs::write(drv.join("unbind"), "").unwrap();
            symlink(&drv, dir.join("driver")).unwrap();
        }
        if let Some(g) = group {
            let gdir = self.root.join(format!("kernel/iommu_groups/{g}/devices"));
            fs::create_dir_all(&gdir).unwrap();
            symlink(&dir, gdir.join(bdf)).unwrap();
            symlink(self.root.join(format!("kernel/iommu_groups/{g}")), dir.join("iommu_group")).unwrap();
        }
    }

    fn sysfs(&self) -> Sysfs {
        Sysfs::with_root(&self.root)
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.root.join(rel)).unwrap()
    }
}

impl Drop for FakeSysfs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

#[test]
fn sysfs_lists_virtio_scsi_and_blk_functions_with_driver_and_group() {
    let fake = FakeSysfs::new("list");
    fake.add("0000:00:00.0", 0x8086, 0x29c0, None, Some(0));
    fake.add("0000:00:02.0", 0x1af4, 0x1048, Some("vfio-pci"), Some(2));
    fake.add("0000:00:03.0", 0x1af4, 0x1004, Some("virtio-pci"), Some(3));
    fake.add("0000:00:04.0", 0x1af4, 0x1009, Some("virtio-pci"), Some(4));
    fake.add("0000:00:05.0", 0x1af4, 0x1042, Some("virtio-pci"), Some(5));
    fake.add("0000:00:06.0", 0x1af4, 0x1001, None, Some(6));
    fake.add("0000:00:07.0", 0x1af4, 0x1041, Some("virtio-pci"), Some(7));
    fs::create_dir_all(fake.root.join("bus/pci/devices/not-an-address")).unwrap();
    let sysfs = fake.sysfs();
    let all = sysfs.functions().unwrap();
    assert_eq!(all.len(), 7);
    let types: Vec<_> = all.iter().map(PciFunction::virtio_device_type).collect();
    assert_eq!(types, [None, Some(8), Some(8), None, Some(2), Some(2), Some(1)]);
    let scsi = sysfs.virtio_storage_functions().unwrap();
    let found: Vec<_> =
        scsi.iter().map(|f| (f.address.to_string(), f.driver.clone(), f.iommu_group)).collect();
    assert_eq!(
        found,
        [
            ("0000:00:02.0".to_string(), Some("vfio-pci".to_string()), Some(2)),
            ("0000:00:03.0".to_string(), Some("virtio-pci".to_string()), Some(3)),
            ("0000:00:05.0".to_string(), Some("virtio-pci".to_string()), Some(5)),
            ("0000:00:06.0".to_string(), None, Some(6)),
        ]
    );
    assert_eq!(scsi[0].interface(), Some(VirtioInterface::Modern));
    assert_eq!(scsi[1].interface(), Some(VirtioInterface::Transitional));
    assert_eq!(scsi[0].numa_node, None);
    assert_eq!(scsi[0].class, 0x010000);
}

#[test]
fn sysfs_refuses_what_cannot_be_opened_with_clear_errors() {
    let fake = FakeSysfs::new("errors");
    fake.add("0000:00:00.0", 0x8086, 0x29c0, None, Some(0));
    fake.add("0000:00:03.0", 0x1af4, 0x1004, Some("virtio-pci"), Some(3));
    fake.add("0000:00:04.0", 0x1af4, 0x1009, Some("virtio-pci"), Some(4));
    fake.add("0000:00:05.0", 0x1af4, 0x1048, Some("vfio-pci"), None);
    fake.add("0000:00:06.0", 0x1af4, 0x1048, None, Some(6));
    let s = fake.sysfs();
    let msg = |r: Result<PciFunction, PciError>| r.unwrap_err().to_string();

    let e = msg(s.check_openable(addr("00:1f.7")));
    assert_eq!(e, "no PCI device at 0000:00:1f.7");
    let e = msg(s.check_openable(addr("00:00.0")));
    assert!(e.contains("0000:00:00.0 is not a virtio device (vendor 8086, device 29c0)"), "{e}");
    let e = msg(s.check_openable(addr("00:04.0")));
    assert!(e.contains("neither virtio-scsi (1af4:1004, 1af4:1048) nor virtio-blk"), "{e}");
    assert!(e.contains("device id 1009"), "{e}");
    let e = msg(s.check_openable(addr("00:03.0")));
    assert!(e.contains("0000:00:03.0 is bound to virtio-pci, not to vfio-pci"), "{e}");
    let e = msg(s.check_openable(addr("00:06.0")));
    assert!(e.contains("bound to no driver"), "{e}");
    let e = msg(s.check_openable(addr("00:05.0")));
    assert!(e.contains("has no IOMMU group"), "{e}");
    assert!(matches!(s.bind_vfio(addr("00:05.0")), Err(PciError::NoIommu(_))));
    assert!(matches!(s.bind_vfio(addr("00:04.0")), Err(PciError::NotVirtioStorage { .. })));
}

#[test]
fn binding_goes_through_driver_override_and_checks_the_result() {
    let fake = FakeSysfs::new("bind");
    fake.add("0000:00:03.0", 0x1af4, 0x1004, Some("virtio-pci"), Some(3));
    let s = fake.sysfs();
    // The fake kernel does not move the device: the bind must notice.
    let e = s.bind_vfio(addr("00:03.0")).unwrap_err().to_string();
    assert!(e.contains("binding 0000:00:03.0 to vfio-pci failed"), "{e}");
    assert!(e.contains("bound to virtio-pci"), "{e}");
    assert_eq!(fake.read("bus/pci/devices/0000:00:03.0/driver_override"), "vfio-pci");
    assert_eq!(fake.read("bus/pci/drivers/virtio-pci/unbind"), "0000:00:03.0");
    assert_eq!(fake.read("bus/pci/drivers_probe"), "0000:00:03.0");

    // Without the vfio-pci driver there is nothing to bind to.
    fs::remove_dir_all(fake.root.join("bus/pci/drivers/vfio-pci")).unwrap();
    let e = s.bind_vfio(addr("00:03.0")).unwrap_err().to_string();
    assert!(e.contains("vfio-pci driver is not loaded"), "{e}");

    // Already on vfio-pci: nothing to do. Unbinding clears the override and unbinds.
    let fake = FakeSysfs::new("bound");
    fake.add("0000:00:02.0", 0x1af4, 0x1048, Some("vfio-pci"), Some(2));
    let s = fake.sysfs();
    assert!(s.bind_vfio(addr("00:02.0")).unwrap().bound_to_vfio());
    s.unbind_vfio(addr("00:02.0")).unwrap();
    assert_eq!(fake.read("bus/pci/drivers/vfio-pci/unbind"), "0000:00:02.0");
    assert_eq!(fake.read("bus/pci/devices/0000:00:02.0/driver_override"), "\n");
}

#[test]
fn group_blockers_name_the_other_devices_and_their_drivers() {
    let fake = FakeSysfs::new("group");
    fake.add("0000:01:01.0", 0x1af4, 0x1004, Some("vfio-pci"), Some(7));
    fake.add("0000:01:02.0", 0x1af4, 0x1004, Some("virtio-pci"), Some(7));
    fake.add("0000:01:03.0", 0x1af4, 0x1004, Some("pci-stub"), Some(7));
    fake.add("0000:00:1e.0", 0x1b36, 0x000e, Some("pcieport"), Some(7));
    // The bridge: header type 1.
    let mut bridge_cfg = vec![0u8; 64];
    bridge_cfg[0x0e] = 0x01;
    fs::write(fake.root.join("bus/pci/devices/0000:00:1e.0/config"), bridge_cfg).unwrap();
    let s = fake.sysfs();
    assert_eq!(s.group_members(7).unwrap().len(), 4);
    assert_eq!(s.group_blockers(addr("01:01.0"), 7).unwrap(), "0000:01:02.0 (virtio-pci)");
    let e = PciError::GroupNotViable {
        address: addr("01:01.0"),
        group: 7,
        others: s.group_blockers(addr("01:01.0"), 7).unwrap(),
    };
    assert!(
        e.to_string().contains("IOMMU group 7 of 0000:01:01.0 also holds 0000:01:02.0 (virtio-pci)"),
        "{e}"
    );
}

// ---------------------------------------------------------------- an emulated function

#[derive(Default)]
struct FakeQueue {
    max: u16,
    size: u16,
    msix: u16,
    enable: u16,
    desc: u64,
    driver: u64,
    device: u64,
    notify_off: u16,
}

/// The device side of a virtio-pci modern function, as registers.
struct FakeState {
    cfg: [u8; 256],
    offered: u64,
    /// FEATURES_OK is refused when the driver acks bits outside this.
    acceptable: u64,
    dfselect: u32,
    gfselect: u32,
    driver_features: u64,
    status: u8,
    /// Every status value written, in order.
    status_log: Vec<u8>,
    /// Status writes interleaved with queue enables: ("status", v) / ("enable", queue).
    events: Vec<(&'static str, u64)>,
    config_msix: u16,
    queue_select: u16,
    queues: Vec<FakeQueue>,
    device_cfg: Vec<u8>,
    generation: u8,
    /// Bump the generation on the next N device-config reads (a device changing its config).
    churn: u32,
    maps: Vec<(u64, u64, u64)>,
    unmaps: Vec<(u64, u64)>,
    ranges: Vec<IovaRange>,
    notify_file: Option<Arc<File>>,
    /// Fell off the bus: the status reads 0xff and writes go nowhere.
    dead: bool,
}

#[derive(Clone)]
struct FakeDevice {
    state: Arc<Mutex<FakeState>>,
    ranges: Vec<IovaRange>,
}

const COMMON_BASE: u64 = 0x0;
const DEVICE_BASE: u64 = 0x2000;
const NOTIFY_BASE: u64 = 0x3000;

fn memfd() -> File {
    // SAFETY: plain syscall with a valid NUL-terminated name; the fd is owned below.
    let fd = unsafe { libc::memfd_create(c"notify".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(0x4000).unwrap();
    f
}

impl FakeDevice {
    fn new(queue_max: &[u16], offered: u64) -> Self {
        let config = Config {
            num_queues: queue_max.len().saturating_sub(2) as u32,
            seg_max: 126,
            max_sectors: 0xffff,
            cmd_per_lun: 128,
            event_info_size: 16,
            sense_size: 96,
            cdb_size: 32,
            max_channel: 0,
            max_target: 255,
            max_lun: 16383,
        };
        let ranges = vec![
            IovaRange { start: 0, end: 0xfedf_ffff },
            IovaRange { start: 0xfef0_0000, end: 0x7f_ffff_ffff },
        ];
        let state = FakeState {
            cfg: config_space(0x1048, &QEMU_CAPS),
            offered,
            acceptable: offered,
            dfselect: 0,
            gfselect: 0,
            driver_features: 0,
            status: 0x0f, // left running by a previous driver
            status_log: Vec::new(),
            dead: false,
            events: Vec::new(),
            config_msix: 0,
            queue_select: 0,
            queues: queue_max
                .iter()
                .enumerate()
                .map(|(i, &max)| FakeQueue { max, notify_off: i as u16, ..Default::default() })
                .collect(),
            device_cfg: config.encode().to_vec(),
            generation: 0,
            churn: 0,
            maps: Vec::new(),
            unmaps: Vec::new(),
            ranges: ranges.clone(),
            notify_file: Some(Arc::new(memfd())),
        };
        FakeDevice { state: Arc::new(Mutex::new(state)), ranges }
    }

    fn s(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }
}

impl FakeState {
    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        for q in &mut self.queues {
            q.size = q.max;
            q.enable = 0;
            q.msix = 0;
            q.desc = 0;
            q.driver = 0;
            q.device = 0;
        }
    }

    fn queue(&mut self) -> Option<&mut FakeQueue> {
        let i = self.queue_select as usize;
        self.queues.get_mut(i)
    }

    fn common_read(&mut self, off: u64, len: usize) -> u64 {
        let q = |s: &mut FakeState, f: fn(&FakeQueue) -> u64| s.queue().map_or(0, |q| f(q));
        match (off, len) {
            (COMMON_DFSELECT, 4) => u64::from(self.dfselect),
            (COMMON_DF, 4) => match self.dfselect {
                0 => self.offered & 0xffff_ffff,
                1 => self.offered >> 32,
                _ => 0,
            },
            (COMMON_GFSELECT, 4) => u64::from(self.gfselect),
            (COMMON_MSIX, 2) => u64::from(self.config_msix),
            (COMMON_NUMQ, 2) => self.queues.len() as u64,
            (COMMON_STATUS, 1) => u64::from(if self.dead { 0xff } else { self.status }),
            (COMMON_CFGGENERATION, 1) => u64::from(self.generation),
            (COMMON_Q_SELECT, 2) => u64::from(self.queue_select),
            (COMMON_Q_SIZE, 2) => q(self, |q| u64::from(q.size)),
            (COMMON_Q_MSIX, 2) => q(self, |q| u64::from(q.msix)),
            (COMMON_Q_ENABLE, 2) => q(self, |q| u64::from(q.enable)),
            (COMMON_Q_NOFF, 2) => q(self, |q| u64::from(q.notify_off)),
            _ => panic!("driver read {len} bytes at common+{off:#x}"),
        }
    }

    fn common_write(&mut self, off: u64, len: usize, v: u64) {
        let half = |old: u64, hi: bool, v: u64| {
            if hi {
                old & 0xffff_ffff | v << 32
            } else {
                old & !0xffff_ffff | v
            }
        };
        match (off, len) {
            (COMMON_DFSELECT, 4) => self.dfselect = v as u32,
            (COMMON_GFSELECT, 4) => self.gfselect = v as u32,
            (COMMON_GF, 4) => match self.gfselect {
                0 => self.driver_features = half(self.driver_features, false, v),
                1 => self.driver_features = half(self.driver_features, true, v),
                _ => {}
            },
            (COMMON_MSIX, 2) => self.config_msix = v as u16,
            (COMMON_STATUS, 1) if self.dead => {}
            (COMMON_STATUS, 1) => {
                let mut v = v as u8;
                self.status_log.push(v);
                self.events.push(("status", u64::from(v)));
                if v == 0 {
                    self.reset();
                    return;
                }
                if v & STATUS_FEATURES_OK != 0 && self.driver_features & !self.acceptable != 0 {
                    v &= !STATUS_FEATURES_OK;
                }
                self.status = v;
            }
            (COMMON_Q_SELECT, 2) => self.queue_select = v as u16,
            (COMMON_Q_SIZE, 2) => {
                if let Some(q) = self.queue() {
                    q.size = v as u16;
                }
            }
            (COMMON_Q_MSIX, 2) => {
                if let Some(q) = self.queue() {
                    q.msix = v as u16;
                }
            }
            (COMMON_Q_ENABLE, 2) => {
                let sel = self.queue_select;
                self.events.push(("enable", u64::from(sel)));
                if let Some(q) = self.queue() {
                    q.enable = v as u16;
                }
            }
            (o, 4) if (COMMON_Q_DESC..COMMON_Q_DEVICE + 8).contains(&o) => {
                let hi = o % 8 == 4;
                if let Some(q) = self.queue() {
                    let field = match o & !7 {
                        COMMON_Q_DESC => &mut q.desc,
                        COMMON_Q_DRIVER => &mut q.driver,
                        _ => &mut q.device,
                    };
                    *field = half(*field, hi, v);
                }
            }
            _ => panic!("driver wrote {len} bytes ({v:#x}) at common+{off:#x}"),
        }
    }
}

impl PciAccess for FakeDevice {
    fn address(&self) -> PciAddress {
        addr("0000:00:02.0")
    }

    fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), PciError> {
        let s = self.s();
        let o = offset as usize;
        buf.copy_from_slice(&s.cfg[o..o + buf.len()]);
        Ok(())
    }

    fn config_write(&self, offset: u64, data: &[u8]) -> Result<(), PciError> {
        let mut s = self.s();
        let o = offset as usize;
        s.cfg[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn bar_size(&self, bar: u8) -> Option<u64> {
        (bar == 4).then_some(0x4000)
    }

    fn bar_read(&self, bar: u8, offset: u64, buf: &mut [u8]) -> Result<(), PciError> {
        assert_eq!(bar, 4);
        let mut s = self.s();
        if (DEVICE_BASE..DEVICE_BASE + 0x1000).contains(&offset) {
            let o = (offset - DEVICE_BASE) as usize;
            assert_eq!(o % buf.len(), 0, "config field read with a misaligned width");
            buf.copy_from_slice(&s.device_cfg[o..o + buf.len()]);
            if s.churn > 0 {
                s.churn -= 1;
                s.generation = s.generation.wrapping_add(1);
            }
            return Ok(());
        }
        assert!(offset < 0x1000, "read outside the common configuration: {offset:#x}");
        let v = s.common_read(offset - COMMON_BASE, buf.len());
        buf.copy_from_slice(&v.to_le_bytes()[..buf.len()]);
        Ok(())
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> Result<(), PciError> {
        assert_eq!(bar, 4);
        assert!(offset < 0x1000, "write outside the common configuration: {offset:#x}");
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        self.s().common_write(offset - COMMON_BASE, data.len(), u64::from_le_bytes(b));
        Ok(())
    }

    fn notifier(&self, bar: u8, offset: u64, queue: u16) -> Result<Notifier, PciError> {
        assert_eq!(bar, 4);
        let file = self.s().notify_file.clone().unwrap();
        Ok(Notifier::File { file, offset, queue })
    }

    fn iova_ranges(&self) -> &[IovaRange] {
        &self.ranges
    }

    unsafe fn dma_map(&mut self, iova: u64, size: u64, host: *mut u8) -> Result<(), PciError> {
        let mut s = self.s();
        if !s.ranges.iter().any(|r| r.contains(iova, size)) {
            return Err(PciError::Vfio {
                address: addr("00:02.0"),
                operation: "DMA map",
                detail: "EINVAL".into(),
            });
        }
        s.maps.push((iova, size, host as u64));
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), PciError> {
        self.s().unmaps.push((iova, size));
        Ok(())
    }
}

const VERSION_1: u64 = 1 << 32;
const ACCESS_PLATFORM: u64 = 1 << 33;
const EVENT_IDX: u64 = 1 << 29;

fn rings(size: u16, base: u64) -> RingAddresses {
    RingAddresses {
        size,
        desc_iova: base,
        avail_iova: base + 0x1000,
        used_iova: base + 0x2000,
        desc_host: 0,
        avail_host: 0,
        used_host: 0,
    }
}

#[test]
fn handshake_queue_setup_and_notify_follow_the_spec() {
    let dev = FakeDevice::new(&[64, 64, 128], VERSION_1 | ACCESS_PLATFORM | EVENT_IDX);
    let mut t = VirtioPciTransport::new(dev.clone()).unwrap();
    {
        let s = dev.s();
        // reset (it was running), then ACKNOWLEDGE, then DRIVER
        assert_eq!(s.status_log, [0, 1, 3]);
        assert_eq!(s.config_msix, VIRTIO_MSI_NO_VECTOR);
        let cmd = u16::from_le_bytes([s.cfg[4], s.cfg[5]]);
        assert_eq!(cmd & 0x0406, 0x0406, "memory, bus master and INTx disable set: {cmd:#x}");
    }
    assert_eq!(t.device_features().unwrap(), VERSION_1 | ACCESS_PLATFORM | EVENT_IDX);
    assert_eq!(t.queue_count().unwrap(), Some(3));
    assert_eq!(t.max_queue_size(2).unwrap(), Some(128));
    assert_eq!(t.max_queue_size(3).unwrap(), Some(0));
    assert!(matches!(t.set_features(1 << 40), Err(TransportError::FeaturesRejected(f)) if f == 1 << 40));
    t.set_features(ACCESS_PLATFORM | EVENT_IDX).unwrap();
    assert_eq!(dev.s().driver_features, VERSION_1 | ACCESS_PLATFORM | EVENT_IDX, "VERSION_1 always acked");
    assert_eq!(dev.s().status, 0x0b);
    assert_eq!(t.physical_addresses(), Some(false));

    let mut cfg = [0u8; Config::SIZE];
    t.read_config(0, &mut cfg).unwrap();
    let c = Config::decode(&cfg).unwrap();
    assert_eq!((c.num_queues, c.seg_max, c.max_lun), (1, 126, 16383));
    let mut tail = [0u8; 3];
    t.read_config(33, &mut tail).unwrap();
    assert_eq!(tail, cfg[33..36]);
    assert!(t.read_config(0x1000, &mut [0u8; 1]).is_err());

    let too_big = t.setup_queue(0, &rings(128, 0x1_0000_0000)).err().unwrap().to_string();
    assert!(too_big.contains("up to the device's 64"), "{too_big}");
    assert!(t.setup_queue(3, &rings(64, 0x1_0000_0000)).is_err());
    let mut handles = Vec::new();
    for q in 0..3u16 {
        let base = 0x1_0000_0000 + u64::from(q) * 0x10_0000;
        handles.push(t.setup_queue(q, &rings(64, base)).unwrap());
    }
    {
        let s = dev.s();
        for (i, q) in s.queues.iter().enumerate() {
            let base = 0x1_0000_0000 + i as u64 * 0x10_0000;
            assert_eq!((q.size, q.msix, q.enable), (64, VIRTIO_MSI_NO_VECTOR, 1), "queue {i}");
            assert_eq!((q.desc, q.driver, q.device), (base, base + 0x1000, base + 0x2000), "queue {i}");
        }
    }
    t.start().unwrap();
    {
        let s = dev.s();
        assert_eq!(s.status, 0x0f);
        // Every queue was enabled before DRIVER_OK was written.
        let driver_ok = s.events.iter().position(|e| *e == ("status", 0x0f)).unwrap();
        let last_enable = s.events.iter().rposition(|e| e.0 == "enable").unwrap();
        assert!(last_enable < driver_ok, "{:?}", s.events);
    }
    // Doorbell of queue 2: notify base + notify_off (2) * multiplier (4), holding the index.
    handles[2].notifier.notify().unwrap();
    let file = dev.s().notify_file.clone().unwrap();
    let mut b = [0u8; 2];
    file.read_exact_at(&mut b, NOTIFY_BASE + 2 * 4).unwrap();
    assert_eq!(u16::from_le_bytes(b), 2);
    assert!(t.check_alive().is_ok());

    // The device resets itself: noticed.
    dev.s().reset();
    let gone = t.check_alive().unwrap_err().to_string();
    assert!(gone.contains("was reset underneath the driver"), "{gone}");
    dev.s().status = 0x4f;
    assert!(t.check_alive().unwrap_err().to_string().contains("DEVICE_NEEDS_RESET"));
    dev.s().status = 0xff;
    assert!(t.check_alive().unwrap_err().to_string().contains("no longer responds"));
    assert_eq!(t.describe(), "pci 0000:00:02.0 (DMA through the IOMMU)");
    drop(t);
    let s = dev.s();
    assert_eq!(s.status_log.last(), Some(&0), "reset on drop");
    let cmd = u16::from_le_bytes([s.cfg[4], s.cfg[5]]);
    assert_eq!(cmd & 0x4, 0, "bus mastering off after drop");
}

#[test]
fn refused_features_and_changing_config_are_reported() {
    let dev = FakeDevice::new(&[8, 8, 8], VERSION_1 | ACCESS_PLATFORM | EVENT_IDX);
    dev.s().acceptable = VERSION_1 | ACCESS_PLATFORM;
    let mut t = VirtioPciTransport::new(dev.clone()).unwrap();
    assert!(matches!(t.set_features(ACCESS_PLATFORM | EVENT_IDX), Err(TransportError::FeaturesRejected(_))));
    assert_ne!(dev.s().status & STATUS_FAILED, 0, "FAILED set after FEATURES_OK was refused");

    let dev = FakeDevice::new(&[8, 8, 8], VERSION_1);
    let mut t = VirtioPciTransport::new(dev.clone()).unwrap();
    dev.s().churn = 1000;
    let e = t.read_config(0, &mut [0u8; 8]).unwrap_err().to_string();
    assert!(e.contains("keeps changing"), "{e}");
    // A change during one read is retried and the second read is consistent.
    dev.s().churn = 1;
    t.read_config(0, &mut [0u8; 8]).unwrap();

    // A legacy device (no VERSION_1) on a modern interface makes no sense: refused.
    let dev = FakeDevice::new(&[8, 8, 8], 1 << 29);
    let mut t = VirtioPciTransport::new(dev).unwrap();
    assert!(t.set_features(0).unwrap_err().to_string().contains("VIRTIO_F_VERSION_1"));

    // Not a virtio device at all.
    let dev = FakeDevice::new(&[8, 8, 8], VERSION_1);
    dev.s().cfg[0..2].copy_from_slice(&0x8086u16.to_le_bytes());
    assert!(matches!(VirtioPciTransport::new(dev), Err(PciError::NotVirtio { vendor: 0x8086, .. })));

    // A structure outside its BAR.
    let mut caps = QEMU_CAPS;
    caps[3].2 = 0x3ff0;
    let dev = FakeDevice::new(&[8, 8, 8], VERSION_1);
    dev.s().cfg = config_space(0x1048, &caps);
    let e = VirtioPciTransport::new(dev).err().unwrap().to_string();
    assert!(e.contains("lies outside BAR4"), "{e}");
}

#[test]
fn iommu_mode_maps_the_pool_inside_the_ranges_and_unmaps_on_drop() {
    let dev = FakeDevice::new(&[8, 8, 8], VERSION_1 | ACCESS_PLATFORM);
    let mut t = VirtioPciTransport::new(dev.clone()).unwrap();
    assert!(t.pool_config(PoolConfig::new(MIB)).is_err(), "before the features are set");
    t.set_features(ACCESS_PLATFORM).unwrap();
    let cfg = t.pool_config(PoolConfig::new(4 * MIB).hugepages(HugePages::Never)).unwrap();
    assert_eq!(cfg.iova_base, PoolConfig::DEFAULT_IOVA_BASE);
    assert_eq!(cfg.placement, IovaPlacement::Contiguous);
    let pool = DmaPool::new(cfg).unwrap();
    t.set_memory(pool.regions()).unwrap();
    let r = &pool.regions()[0];
    assert_eq!(dev.s().maps, [(r.iova, r.size, r.host_addr)]);
    // Setting the memory again replaces the mappings.
    t.set_memory(pool.regions()).unwrap();
    assert_eq!(dev.s().unmaps, [(r.iova, r.size)]);

    // A region the IOMMU cannot map is refused before the device sees it.
    let outside =
        DmaPool::new(PoolConfig::new(MIB).hugepages(HugePages::Never).iova_base(0xfee0_0000)).unwrap();
    let e = t.add_memory(&outside.regions()[0]).unwrap_err().to_string();
    assert!(e.contains("outside the ranges the IOMMU can map"), "{e}");
    drop(t);
    assert_eq!(dev.s().unmaps, [(r.iova, r.size), (r.iova, r.size)]);
}

#[test]
fn controller_opens_over_the_transport_with_the_devices_queue_limit() {
    // Control, event and two request queues; the device takes at most 128 entries.
    let dev = FakeDevice::new(&[128, 128, 128, 128], VERSION_1 | ACCESS_PLATFORM | EVENT_IDX);
    dev.s().ranges = vec![IovaRange { start: 0, end: 0xfedf_ffff }];
    let mut fake = dev.clone();
    fake.ranges = vec![IovaRange { start: 0, end: 0xfedf_ffff }];
    let t = VirtioPciTransport::new(fake).unwrap();
    let opts = ControllerOptions {
        queue_size: 256,
        memory_bytes: 4 * MIB,
        hugepages: HugePages::Never,
        ..Default::default()
    };
    let c = Controller::open(Box::new(t), &opts).unwrap();
    let info = c.info();
    assert_eq!(info.queue_size, 128);
    assert_eq!(info.request_queues, 2);
    assert_eq!(info.transport, "pci 0000:00:02.0 (DMA through the IOMMU)");
    // Only low IOVAs exist here: the pool went to 2 MiB, and every ring lies inside it.
    let pool = c.pool();
    let region = &pool.regions()[0];
    assert_eq!(region.iova, 2 * MIB);
    {
        let s = dev.s();
        assert_eq!(s.maps.len(), 1);
        for q in &s.queues {
            assert_eq!(q.size, 128);
            assert!(region.contains(q.desc, 16 * 128) && region.contains(q.device, 6 + 8 * 128));
        }
        assert_eq!(s.status, 0x0f);
    }
    c.close();
    assert_eq!(dev.s().status, 0);
}

#[test]
fn a_virtio_blk_function_opens_as_blk_with_request_queues_from_zero() {
    const BLK_SIZE: u64 = 1 << 6;
    let blk_function = || {
        let dev = FakeDevice::new(&[64, 64], VERSION_1 | ACCESS_PLATFORM | BLK_SIZE);
        {
            let mut s = dev.s();
            s.cfg = config_space(0x1042, &QEMU_CAPS);
            let config = virtio_blk_proto::Config { capacity: 1 << 21, blk_size: 4096, ..Default::default() };
            s.device_cfg = config.encode().to_vec();
        }
        let t = VirtioPciTransport::new(dev.clone()).unwrap();
        (dev, t)
    };
    let opts = ControllerOptions { memory_bytes: 4 * MIB, hugepages: HugePages::Never, ..Default::default() };

    // The PCI id says virtio-blk: no control or event queue, both queues serve requests.
    let (dev, t) = blk_function();
    assert_eq!(t.device_type(), Some(VIRTIO_ID_BLOCK));
    let c = Controller::open(Box::new(t), &opts).unwrap();
    let info = c.info();
    assert_eq!(info.device_type(), DeviceType::Blk);
    let blk = info.blk().unwrap();
    assert_eq!((blk.capacity, blk.block_size, blk.sector_shift()), (1 << 21, 4096, 3));
    assert_eq!((info.request_queues, info.hotplug), (2, false));
    assert!(dev.s().queues.iter().all(|q| q.enable == 1 && q.desc != 0), "both queues set up");
    let ch = RequestChannel::open(&c).unwrap();
    assert_eq!(ch.queue_index(), 0);

    // The capacity is read anew each time: a device may change it.
    assert_eq!(c.blk_capacity().unwrap(), 1 << 21);
    dev.s().device_cfg[0..8].copy_from_slice(&(3u64 << 20).to_le_bytes());
    assert_eq!(c.blk_capacity().unwrap(), 3 << 20);
    let e = c.task_management(virtio_scsi_proto::LunAddress::new(0, 0), 0, 0).unwrap_err().to_string();
    assert!(e.contains("task management is for virtio-scsi devices"), "{e}");
    assert!(c.poll_events().unwrap().is_empty());
    drop(ch);
    c.close();

    // Asked to be virtio-scsi, it is refused by name.
    let (_dev, t) = blk_function();
    let scsi = ControllerOptions { device: Some(DeviceType::Scsi), ..opts.clone() };
    let e = Controller::open(Box::new(t), &scsi).err().unwrap().to_string();
    assert!(e.contains("is a virtio-blk device, not virtio-scsi"), "{e}");
}

#[test]
fn a_device_that_needs_a_reset_is_reset_and_set_up_again_in_place() {
    let dev = FakeDevice::new(&[64, 64, 64], VERSION_1 | ACCESS_PLATFORM | EVENT_IDX);
    dev.s().ranges = vec![IovaRange { start: 0, end: 0xfedf_ffff }];
    let mut fake = dev.clone();
    fake.ranges = vec![IovaRange { start: 0, end: 0xfedf_ffff }];
    let t = VirtioPciTransport::new(fake).unwrap();
    let opts = ControllerOptions { memory_bytes: 4 * MIB, hugepages: HugePages::Never, ..Default::default() };
    let c = Controller::open(Box::new(t), &opts).unwrap();
    let generation = c.connection();
    // A channel holds the one request queue through the reset.
    let old = RequestChannel::open(&c).unwrap();
    let control_and_events: Vec<(u64, u64, u64)> =
        dev.s().queues[..2].iter().map(|q| (q.desc, q.driver, q.device)).collect();

    // The device asks for a reset: noticed, and the controller fails.
    dev.s().status |= STATUS_DEVICE_NEEDS_RESET;
    assert!(c.check_alive().unwrap_err().to_string().contains("DEVICE_NEEDS_RESET"));
    assert!(c.failure().is_some());

    dev.s().status_log.clear();
    dev.s().events.clear();
    c.reset_in_place("the device needs a reset".into()).unwrap();
    {
        let s = dev.s();
        // Reset first (stopping all DMA), then the whole handshake again, up to DRIVER_OK.
        assert_eq!(s.status_log, [0, 1, 3, 0x0b, 0x0f], "{:?}", s.status_log);
        assert_eq!(s.driver_features, VERSION_1 | ACCESS_PLATFORM | EVENT_IDX);
        let after: Vec<(u64, u64, u64)> =
            s.queues[..2].iter().map(|q| (q.desc, q.driver, q.device)).collect();
        assert_eq!(after, control_and_events, "the same control and event rings, on the same memory");
        assert!(s.queues.iter().all(|q| q.enable == 1), "every queue, the taken one too");
        // A reset device takes queues before DRIVER_OK only.
        let driver_ok = s.events.iter().rposition(|e| *e == ("status", 0x0f)).unwrap();
        let last_enable = s.events.iter().rposition(|e| e.0 == "enable").unwrap();
        assert!(last_enable < driver_ok, "{:?}", s.events);
    }
    // The request queue was made anew: a channel gets it while the old one still holds its own.
    let new = RequestChannel::open(&c).unwrap();
    drop(old);
    drop(new);
    // One queue, not two: the old one went when it was given back.
    let a = RequestChannel::open(&c).unwrap();
    assert!(matches!(RequestChannel::open(&c), Err(DriverError::NoFreeQueue(1))));
    drop(a);
    assert!(c.failure().is_none(), "working again");
    assert_ne!(c.connection(), generation, "channels opened before fail");
    assert!(c.check_alive().is_ok());

    // A device that no longer responds cannot be brought back: the controller stays failed.
    dev.s().dead = true;
    let e = c.reset_in_place("gone".into()).unwrap_err().to_string();
    assert!(e.contains("did not complete its reset"), "{e}");
    assert!(c.failure().is_some());
    dev.s().dead = false;
    c.close();
}

// ---------------------------------------------------------------- physical addresses

/// Whether this process can see physical addresses and has `pages` free hugepages; says why
/// not (tests then return early, except in CI where the machine is set up for them).
fn physical_memory_available(pages: u64) -> Option<String> {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let free = free_hugepages().unwrap_or(0);
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let why = if !root {
        Some("not root: /proc/self/pagemap hides frame numbers".to_string())
    } else if free < pages {
        Some(format!("{free} free hugepages, {pages} needed"))
    } else {
        None
    };
    if let Some(w) = &why {
        assert!(!ci, "CI must provide root and hugepages: {w}");
    }
    why
}

#[test]
fn pagemap_entries_decode() {
    assert_eq!(pagemap::decode_entry(1 << 63 | 0x1234, 0x7000_0123, 4096).unwrap(), 0x0123_4123);
    let absent = pagemap::decode_entry(0x1234, 0x7000_0000, 4096).unwrap_err();
    assert!(absent.to_string().contains("not present"), "{absent}");
    let hidden = pagemap::decode_entry(1 << 63, 0x7000_0000, 4096).unwrap_err();
    assert!(hidden.to_string().contains("CAP_SYS_ADMIN"), "{hidden}");
    assert!(pagemap::resolve(0x1000, 3000, 1).is_err(), "page size not a multiple of the base page");
}

#[test]
fn hugepages_have_contiguous_physical_addresses() {
    if let Some(why) = physical_memory_available(2) {
        println!("SKIPPED hugepages_have_contiguous_physical_addresses: {why}");
        return;
    }
    let pool = DmaPool::new(PoolConfig::new(4 * MIB).hugepages(HugePages::Require)).unwrap();
    let r = &pool.regions()[0];
    let pa = pagemap::resolve(r.host_addr, HUGE_PAGE_SIZE, 2).unwrap();
    assert_eq!(pa.len(), 2);
    for p in &pa {
        assert_eq!(p % HUGE_PAGE_SIZE, 0, "a hugepage starts 2 MiB aligned: {p:#x}");
    }
    // Inside one hugepage every byte is where its offset says.
    let inside = pagemap::physical_address(r.host_addr + 0x12_3456).unwrap();
    assert_eq!(inside, pa[0] + 0x12_3456);
}

#[test]
fn physical_placement_puts_every_region_at_its_physical_address() {
    if let Some(why) = physical_memory_available(4) {
        println!("SKIPPED physical_placement_puts_every_region_at_its_physical_address: {why}");
        return;
    }
    let dev = FakeDevice::new(&[8, 8, 8], VERSION_1);
    let mut t = VirtioPciTransport::new(dev.clone()).unwrap();
    t.set_features(0).unwrap();
    assert_eq!(t.physical_addresses(), Some(true));
    let never = t.pool_config(PoolConfig::new(MIB).hugepages(HugePages::Never)).unwrap_err().to_string();
    assert!(never.contains("takes physical addresses"), "{never}");
    let cfg = t.pool_config(PoolConfig::new(8 * MIB)).unwrap();
    assert_eq!(cfg.hugepages, HugePages::Require);
    assert!(matches!(cfg.placement, IovaPlacement::Physical(_)));
    let mut pool = DmaPool::new(cfg).unwrap();
    let regions = pool.regions().to_vec();
    assert_eq!(regions.iter().map(|r| r.size).sum::<u64>(), 8 * MIB);
    let mut offsets: Vec<u64> = regions.iter().map(|r| r.fd_offset).collect();
    offsets.sort();
    assert_eq!(offsets[0], 0);
    println!(
        "physical pool: {}",
        regions
            .iter()
            .map(|r| format!("{:#x}+{:#x}@{:#x}", r.iova, r.size, r.fd_offset))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for r in &regions {
        assert!(r.hugepages);
        let pages = (r.size / HUGE_PAGE_SIZE) as usize;
        let pa = pagemap::resolve(r.host_addr, HUGE_PAGE_SIZE, pages).unwrap();
        for (i, p) in pa.iter().enumerate() {
            assert_eq!(*p, r.iova + i as u64 * HUGE_PAGE_SIZE, "region {:#x} page {i}", r.iova);
        }
    }
    // Data written through the host mapping is what the device reads at the IOVA.
    let mut buf = pool.alloc_shared(HUGE_PAGE_SIZE as usize).unwrap();
    buf.fill(0x5a);
    let mut seen = vec![0u8; 16];
    vm_memory::Bytes::read_slice(pool.memory(), &mut seen, vm_memory::GuestAddress(buf.iova() + 1000))
        .unwrap();
    assert_eq!(seen, [0x5a; 16]);
    assert!(matches!(pool.grow(MIB), Err(crate::memory::MemoryError::PhysicalCannotGrow)));

    // Mapped 1:1 where the IOMMU can (everything here), and checked after pinning.
    t.set_memory(&regions).unwrap();
    let maps = dev.s().maps.clone();
    assert_eq!(maps.len(), regions.len());
    for (m, r) in maps.iter().zip(&regions) {
        assert_eq!(*m, (r.iova, r.size, r.host_addr));
    }
}

#[test]
fn physical_runs_merge_only_memory_contiguous_both_ways() {
    use crate::memory::HUGE_PAGE_SIZE as P;
    let runs = crate::memory::physical_runs_for_tests(&[10 * P, 11 * P, 12 * P, 3 * P, 2 * P, 20 * P], P);
    assert_eq!(runs, [(0, 10 * P, 3 * P), (3 * P, 3 * P, P), (4 * P, 2 * P, P), (5 * P, 20 * P, P)]);
    assert!(crate::memory::physical_runs_for_tests(&[], P).is_empty());
}
