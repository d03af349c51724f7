//! Request queues for threads. Each thread that does I/O gets a request queue of its own while
//! there are free ones; when threads outnumber queues, a thread joins the least used queue
//! instead of being refused. A queue's members submit under its lock, and completions are
//! routed to the member that submitted them by the member id in the token's upper 16 bits.
//!
//! A queue with one member never contends: each native call takes its two locks uncontended,
//! and every completion is that member's.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use log::warn;
use virtio_scsi_proto::SENSE_SIZE;

use super::channel::{HostBuffer, RequestChannel};
use super::controller::Controller;
use super::records::{CompletionArea, CompletionRecord, SUBMIT_RECORD_SIZE};
use super::DriverError;

/// Tokens of members carry the member id above this bit; the member's own token below it.
const MEMBER_SHIFT: u32 = 16;
const TOKEN_MASK: u32 = (1 << MEMBER_SHIFT) - 1;
/// How long a member leaving a shared queue waits for its requests to come back before the
/// controller is failed (and the device reset), the only way to stop a device writing into
/// memory that is about to be freed.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A completion reaped for another member of the queue.
struct Routed {
    rec: CompletionRecord,
    sense: [u8; SENSE_SIZE],
}

#[derive(Default)]
struct Member {
    active: bool,
    /// Requests submitted and not yet handed back to this member.
    in_flight: usize,
    inbox: VecDeque<Routed>,
}

/// One request queue and the threads that use it.
pub struct QueueCell {
    channel: Mutex<RequestChannel>,
    members: Mutex<Vec<Member>>,
    /// Members that have not left; routing is needed only above one.
    active: AtomicUsize,
    capacity: usize,
    queue_index: u16,
}

/// A thread's handle on a request queue: exclusive while it is the queue's only member.
pub struct QueueShare {
    cell: Arc<QueueCell>,
    member: u16,
    controller: Arc<Controller>,
    left: bool,
}

// SAFETY: the raw caller pointers held by the channel are only dereferenced under the cell's
// lock, in calls that the caller's safety contract covers (see `RequestChannel::submit`).
unsafe impl Send for QueueCell {}
unsafe impl Sync for QueueCell {}

impl QueueShare {
    /// A free request queue of its own, or, when none is free, a place on the least used one.
    pub fn open(
        controller: &Arc<Controller>,
        cells: &Mutex<Vec<Weak<QueueCell>>>,
    ) -> Result<Self, DriverError> {
        let mut cells = cells.lock().unwrap();
        cells.retain(|c| c.strong_count() > 0);
        match RequestChannel::open(controller) {
            Ok(channel) => {
                let cell = Arc::new(QueueCell {
                    capacity: channel.capacity(),
                    queue_index: channel.queue_index(),
                    channel: Mutex::new(channel),
                    members: Mutex::new(vec![Member { active: true, ..Default::default() }]),
                    active: AtomicUsize::new(1),
                });
                cells.push(Arc::downgrade(&cell));
                Ok(QueueShare { cell, member: 0, controller: controller.clone(), left: false })
            }
            Err(DriverError::NoFreeQueue(n)) => {
                let cell = cells
                    .iter()
                    .filter_map(Weak::upgrade)
                    .filter(|c| c.active.load(Ordering::Acquire) > 0)
                    .min_by_key(|c| c.active.load(Ordering::Acquire))
                    .ok_or(DriverError::NoFreeQueue(n))?;
                let mut members = cell.members.lock().unwrap();
                if cell.active.load(Ordering::Acquire) == 0 {
                    // Its last member left meanwhile and closed it.
                    return Err(DriverError::NoFreeQueue(n));
                }
                let member =
                    match members.iter().position(|m| !m.active && m.in_flight == 0 && m.inbox.is_empty()) {
                        Some(free) => free,
                        None if members.len() <= TOKEN_MASK as usize => {
                            members.push(Member::default());
                            members.len() - 1
                        }
                        None => return Err(DriverError::NoFreeQueue(n)),
                    };
                members[member] = Member { active: true, ..Default::default() };
                cell.active.fetch_add(1, Ordering::AcqRel);
                drop(members);
                Ok(QueueShare { cell, member: member as u16, controller: controller.clone(), left: false })
            }
            Err(e) => Err(e),
        }
    }

    pub fn queue_index(&self) -> u16 {
        self.cell.queue_index
    }

    /// Most requests in flight on the queue (for all its members together).
    pub fn capacity(&self) -> usize {
        self.cell.capacity
    }

    /// True while other threads use the same queue.
    pub fn is_shared(&self) -> bool {
        self.cell.active.load(Ordering::Acquire) > 1
    }

    /// What this member's tokens become in the tags the device sees: its id above the token.
    pub fn tag_base(&self) -> u32 {
        u32::from(self.member) << MEMBER_SHIFT
    }

    /// This member's requests not yet handed back.
    pub fn in_flight(&self) -> usize {
        self.cell.members.lock().unwrap()[self.member as usize].in_flight
    }

    /// Submits `count` records of `batch` (their tokens must fit 16 bits), then writes this
    /// member's completions into `out` (laid out as a [`CompletionArea`] of `capacity()`
    /// records). Returns (records taken, completions written).
    ///
    /// # Safety
    /// As for [`RequestChannel::submit`].
    pub unsafe fn pump(
        &mut self,
        batch: &mut [u8],
        count: usize,
        buffers: &[Option<HostBuffer>],
        out: &mut [u8],
    ) -> Result<(usize, usize), DriverError> {
        if self.left {
            return Err(DriverError::Closed);
        }
        let count = count.min(batch.len() / SUBMIT_RECORD_SIZE);
        let mut area = CompletionArea::new(out, self.cell.capacity);
        // Member 0's tag is 0, so its records go down as they are; others are always tagged,
        // since a member may join between this call and the completion.
        if self.member != 0 {
            let tag = u32::from(self.member) << MEMBER_SHIFT;
            for i in 0..count {
                let t = &mut batch[i * SUBMIT_RECORD_SIZE..i * SUBMIT_RECORD_SIZE + 4];
                let token = u32::from_le_bytes(t.try_into().unwrap()) & TOKEN_MASK;
                t.copy_from_slice(&(token | tag).to_le_bytes());
            }
        }
        let mut ch = self.cell.channel.lock().unwrap();
        let taken = if count > 0 { ch.submit(batch, count, buffers)? } else { 0 };
        // Uncontended unless the queue is shared: members only take it together with the
        // channel's lock, or to join and leave.
        let mut members = self.cell.members.lock().unwrap();
        let mine = self.member as usize;
        members[mine].in_flight += taken;
        // Completions another member reaped for this one first, then the ring: this member's
        // go into its area, others' into their inboxes (none while it is alone on the queue).
        let mut n = 0;
        while n < area.capacity() {
            let Some(r) = members[mine].inbox.pop_front() else { break };
            let len = r.rec.sense_len as usize;
            area.sense_mut(n)[..len].copy_from_slice(&r.sense[..len]);
            area.put(n, &r.rec);
            n += 1;
        }
        let room = self.cell.capacity;
        route(
            &mut ch,
            &mut members,
            room,
            |rec, sense| {
                if n < area.capacity() {
                    area.sense_mut(n)[..sense.len()].copy_from_slice(sense);
                    area.put(n, rec);
                    n += 1;
                    true
                } else {
                    false
                }
            },
            mine,
        )?;
        members[mine].in_flight = members[mine].in_flight.saturating_sub(n);
        Ok((taken, n))
    }

    /// Runs `f` on the queue, which must not be shared (the native load generator).
    pub fn with_exclusive<T>(
        &mut self,
        f: impl FnOnce(&mut RequestChannel) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        if self.left {
            return Err(DriverError::Closed);
        }
        let mut ch = self.cell.channel.lock().unwrap();
        if self.cell.active.load(Ordering::Acquire) > 1 {
            return Err(DriverError::Config(format!(
                "request queue {} is shared by {} threads; this needs one of its own",
                self.cell.queue_index,
                self.cell.active.load(Ordering::Acquire)
            )));
        }
        f(&mut ch)
    }

    /// Interrupts for a queue of its own (see [`RequestChannel::arm_interrupts`]); a shared
    /// queue is polled, since a signal could be for another member.
    pub fn arm_interrupts(&mut self) -> Result<bool, DriverError> {
        let mut ch = self.cell.channel.lock().unwrap();
        if self.is_shared() {
            return Ok(true);
        }
        ch.arm_interrupts()
    }

    pub fn disarm_interrupts(&mut self) -> Result<(), DriverError> {
        self.cell.channel.lock().unwrap().disarm_interrupts()
    }

    pub fn interrupt_fd(&mut self) -> Result<std::os::fd::OwnedFd, DriverError> {
        self.cell.channel.lock().unwrap().interrupt_fd()
    }

    /// Leaves the queue. The last member closes it (stopping it first when requests are on it,
    /// see [`RequestChannel::close`]); another member waits for its own requests to come back,
    /// since the queue cannot be stopped under the others, and fails the controller when they
    /// do not within a bound, so that the device is reset before the memory of those requests
    /// is let go.
    pub fn leave(&mut self) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        let cell = &self.cell;
        let mine = self.member as usize;
        {
            let mut members = cell.members.lock().unwrap();
            if cell.active.load(Ordering::Acquire) == 1 {
                // The last member: no one joins a cell with none left (see `open`).
                members[mine] = Member::default();
                cell.active.store(0, Ordering::Release);
                drop(members);
                cell.channel.lock().unwrap().close();
                return;
            }
        }
        // Still counted as a member while draining, so that the others keep routing.
        let start = Instant::now();
        loop {
            let mut ch = cell.channel.lock().unwrap();
            let mut members = cell.members.lock().unwrap();
            let pending = members[mine].in_flight - members[mine].inbox.len();
            let mut done = pending == 0 || self.controller.check_usable().is_err();
            if !done {
                let mut got = 0;
                let routed = route(
                    &mut ch,
                    &mut members,
                    cell.capacity,
                    |_, _| {
                        got += 1;
                        true
                    },
                    mine,
                );
                members[mine].in_flight = members[mine].in_flight.saturating_sub(got);
                done = routed.is_err();
            }
            if done || start.elapsed() > LEAVE_TIMEOUT {
                members[mine] = Member::default();
                cell.active.fetch_sub(1, Ordering::AcqRel);
                if !done {
                    drop(members);
                    drop(ch);
                    let reason = format!(
                        "a thread left request queue {} with {pending} requests that did not complete in {LEAVE_TIMEOUT:?}",
                        cell.queue_index
                    );
                    warn!("{reason}");
                    self.controller.fail_and_reset(reason);
                }
                return;
            }
            drop(members);
            drop(ch);
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Reaps up to `max` completions, handing this member's to `mine` (false: no room, route it to
/// the inbox instead) and queueing other members' in their inboxes.
fn route(
    ch: &mut MutexGuard<'_, RequestChannel>,
    members: &mut [Member],
    max: usize,
    mut take: impl FnMut(&CompletionRecord, &[u8]) -> bool,
    me: usize,
) -> Result<usize, DriverError> {
    ch.complete(max, |_, rec, sense| {
        let owner = (rec.token >> MEMBER_SHIFT) as usize;
        let mut rec = *rec;
        rec.token &= TOKEN_MASK;
        if owner == me && take(&rec, sense) {
            return;
        }
        match members.get_mut(owner) {
            Some(m) if m.active || owner == me => {
                let mut buf = [0u8; SENSE_SIZE];
                buf[..sense.len()].copy_from_slice(sense);
                m.inbox.push_back(Routed { rec, sense: buf });
            }
            // The member left and was already accounted for: nobody waits for this one.
            _ => {}
        }
    })
}

impl Drop for QueueShare {
    fn drop(&mut self) {
        self.leave();
    }
}
