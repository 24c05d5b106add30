//! The one place that judges what a driver VM answers. A driver is
//! untrusted (DESIGN.md, invariant 2): a completion with an unknown or
//! already-completed id, an invalid status, a length that does not match the
//! request (block), a received frame of impossible length (net), or ring
//! indices out of range is a protocol violation, and the driver VM is
//! treated as faulty.

use guest_abi::channel::{self, CompletionEntry};
use guest_abi::nic::{MAX_FRAME, MIN_FRAME};

use crate::blk::inflight::{InFlight, InFlightTable};
use crate::blk::marshal::RequestKind;
use crate::hw::FlushCount;
use crate::net::slots::{NetSlots, SlotState};

/// A driver broke the channel protocol.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// The completion ring index moved beyond what was published.
    #[error("completion index {produced} is out of range (consumed {consumed}, published {published})")]
    RingIndex {
        /// Driver's producer index.
        produced: u32,
        /// Reflector's consumer index.
        consumed: u32,
        /// Reflector's request producer index.
        published: u32,
    },
    /// The driver wrote a channel field only the reflector may write.
    #[error("the driver overwrote the reflector's {field} ({found}, expected {expected})")]
    ForeignWrite {
        /// Which field.
        field: &'static str,
        /// What is there now.
        found: u32,
        /// What the reflector wrote.
        expected: u32,
    },
    /// No request with this id is in flight (never sent, or already completed).
    #[error("completion for unknown or already completed request id {0}")]
    UnknownId(u64),
    /// The status is not one the protocol defines.
    #[error("invalid status {status} for request id {id}")]
    BadStatus {
        /// Request id.
        id: u64,
        /// The status.
        status: u32,
    },
    /// A flush acknowledged although no device flush that started after it
    /// was submitted has finished: its writes may not be on the medium.
    #[error(
        "request id {id}: flush acknowledged before the device flushed (flushes finished: {completed}, \
         needed more than {mark})"
    )]
    FlushNotExecuted {
        /// Request id.
        id: u64,
        /// Flushes the device had started when the request was sent.
        mark: u64,
        /// Flushes it had finished when the driver acknowledged.
        completed: u64,
    },
    /// A read returned other data than the reflector wrote to a sector.
    #[error("request id {id}: the data read from sector {sector} is not what was written there")]
    DataMismatch {
        /// Request id.
        id: u64,
        /// The first sector whose data differs.
        sector: u64,
    },
    /// A successful completion whose length is not the request's.
    #[error("request id {id} completed with length {len}, expected {expected}")]
    BadLength {
        /// Request id.
        id: u64,
        /// Length reported.
        len: u32,
        /// Length requested.
        expected: u32,
    },
}

/// A net completion that passed every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetAnswer {
    /// The frame in TX slot `slot` was sent (`sent`) or failed.
    Sent {
        /// Slot.
        slot: u32,
        /// Whether the driver reports success.
        sent: bool,
    },
    /// RX slot `slot` holds a frame of `len` bytes, or (`None`) came back empty.
    Received {
        /// Slot.
        slot: u32,
        /// Frame length.
        len: Option<u32>,
    },
}

/// Checks one net completion against the slot table.
pub fn check_net(completion: &CompletionEntry, slots: &NetSlots) -> Result<NetAnswer, Violation> {
    let slot = channel::slot_of(completion.id);
    let state = match slots.get(slot) {
        Some((state, id)) if id == completion.id => state,
        _ => return Err(Violation::UnknownId(completion.id)),
    };
    let ok = match completion.status {
        channel::status::OK => true,
        channel::status::IO_ERROR => false,
        status => return Err(Violation::BadStatus { id: completion.id, status }),
    };
    match state {
        SlotState::TxSending(len) if ok && completion.len != len => {
            Err(Violation::BadLength { id: completion.id, len: completion.len, expected: len })
        }
        SlotState::TxSending(_) => Ok(NetAnswer::Sent { slot, sent: ok }),
        SlotState::RxPosted if ok && !(MIN_FRAME..=MAX_FRAME).contains(&completion.len) => {
            Err(Violation::BadLength { id: completion.id, len: completion.len, expected: MAX_FRAME })
        }
        SlotState::RxPosted => Ok(NetAnswer::Received { slot, len: ok.then_some(completion.len) }),
        SlotState::Idle | SlotState::RxHeld(_) => Err(Violation::UnknownId(completion.id)),
    }
}

/// A completion that passed every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The bounce slot (and in-flight table index) of the request.
    pub slot: u32,
    /// `channel::status::*`.
    pub status: u32,
}

/// Checks one completion against the in-flight table.
pub fn check(completion: &CompletionEntry, in_flight: &InFlightTable) -> Result<Answer, Violation> {
    let slot = channel::slot_of(completion.id);
    let request = in_flight.get(slot).filter(|r| r.id == completion.id).ok_or(Violation::UnknownId(completion.id))?;
    match completion.status {
        channel::status::OK if completion.len != request.data_len => {
            Err(Violation::BadLength { id: completion.id, len: completion.len, expected: request.data_len })
        }
        channel::status::OK | channel::status::IO_ERROR | channel::status::UNSUPPORTED => {
            Ok(Answer { slot, status: completion.status })
        }
        status => Err(Violation::BadStatus { id: completion.id, status }),
    }
}

/// Checksums of what was written through a block device, one per 512-byte
/// sector (`checksums=on`): the evidence reads are judged against. A sector
/// has no checksum until a write of it completes with no other write of it
/// in flight; a write's submission forgets the checksums of its sectors.
pub struct WrittenSums {
    /// Per sector: 0 for unknown, else the sector's CRC-32C with bit 0 set.
    sums: Vec<u32>,
}

/// Bytes per checksummed sector.
const SECTOR: usize = 512;

impl WrittenSums {
    /// No sector known yet, for a medium of `capacity_sectors`.
    pub fn new(capacity_sectors: u64) -> Self {
        WrittenSums { sums: vec![0; capacity_sectors as usize] }
    }

    /// The checksum of each 512-byte sector of `data`.
    pub fn sums_of(data: &[u8]) -> Vec<u32> {
        data.chunks(SECTOR).map(|sector| crc32fast::hash(sector) | 1).collect()
    }

    /// Forgets the sectors `sector..sector + count` (a write of them starts).
    pub fn forget(&mut self, sector: u64, count: usize) {
        let start = (sector as usize).min(self.sums.len());
        let end = start.saturating_add(count).min(self.sums.len());
        self.sums[start..end].fill(0);
    }

    /// Records the checksums of a completed write at `sector`, except for
    /// the sectors `skip` says another write in flight covers.
    pub fn record(&mut self, sector: u64, sums: &[u32], skip: impl Fn(u64) -> bool) {
        for (i, sum) in sums.iter().enumerate() {
            let at = sector + i as u64;
            if let Some(slot) = self.sums.get_mut(at as usize) {
                *slot = if skip(at) { 0 } else { *sum };
            }
        }
    }

    /// Checks read `data` of sector `sector` on against the known sums; the
    /// first sector that differs.
    fn verify(&self, sector: u64, data: &[u8]) -> Result<(), u64> {
        for (i, chunk) in data.chunks(SECTOR).enumerate() {
            let at = sector + i as u64;
            match self.sums.get(at as usize) {
                Some(0) | None => {}
                Some(sum) if crc32fast::hash(chunk) | 1 == *sum => {}
                Some(_) => return Err(at),
            }
        }
        Ok(())
    }
}

/// What the reflector knows without asking the driver, to judge a
/// successful completion the protocol checks cannot: a flush must have
/// reached the device, and a read must return what was written.
pub struct Evidence<'a> {
    /// The device's flush counts now.
    pub flushes: FlushCount,
    /// Checksums of written sectors, if kept.
    pub written: Option<&'a WrittenSums>,
    /// The data a read returned (its bounce slot), if it is to be checked.
    pub read_data: Option<&'a [u8]>,
}

/// Judges a successful block completion (`check` passed, status OK)
/// against the evidence.
pub fn check_evidence(entry: &InFlight, evidence: &Evidence) -> Result<(), Violation> {
    match entry.request.kind {
        RequestKind::Flush if evidence.flushes.completed <= entry.flush_mark => Err(Violation::FlushNotExecuted {
            id: entry.id,
            mark: entry.flush_mark,
            completed: evidence.flushes.completed,
        }),
        RequestKind::Read if entry.verifiable => match (evidence.written, evidence.read_data) {
            (Some(written), Some(data)) => written
                .verify(entry.request.sector, data)
                .map_err(|sector| Violation::DataMismatch { id: entry.id, sector }),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::inflight::tests::request;

    #[test]
    fn net_answers_must_match_a_slot_in_use_and_its_length() {
        let mut slots = NetSlots::default();
        let (rx_slot, rx_id) = slots.post_idle_rx()[0];
        let (tx_slot, tx_id) = slots.start_tx(60).unwrap();
        let ok = |id, len| CompletionEntry { id, status: channel::status::OK, len };
        assert_eq!(check_net(&ok(tx_id, 60), &slots), Ok(NetAnswer::Sent { slot: tx_slot, sent: true }));
        assert!(matches!(check_net(&ok(tx_id, 61), &slots), Err(Violation::BadLength { .. })));
        assert_eq!(check_net(&ok(rx_id, 1514), &slots), Ok(NetAnswer::Received { slot: rx_slot, len: Some(1514) }));
        assert!(matches!(check_net(&ok(rx_id, 13), &slots), Err(Violation::BadLength { .. })));
        assert!(matches!(check_net(&ok(rx_id, MAX_FRAME + 1), &slots), Err(Violation::BadLength { .. })));
        let failed = CompletionEntry { id: rx_id, status: channel::status::IO_ERROR, len: 0 };
        assert_eq!(check_net(&failed, &slots), Ok(NetAnswer::Received { slot: rx_slot, len: None }));
        assert!(matches!(
            check_net(&CompletionEntry { status: 9, ..failed }, &slots),
            Err(Violation::BadStatus { .. })
        ));
        let stale = tx_id.wrapping_sub(u64::from(channel::SLOT_COUNT));
        assert_eq!(check_net(&ok(stale, 60), &slots), Err(Violation::UnknownId(stale)));
        slots.hold(rx_slot, 100);
        assert_eq!(check_net(&ok(rx_id, 100), &slots), Err(Violation::UnknownId(rx_id)), "answered twice");
        let idle = CompletionEntry { id: u64::from(channel::SLOT_COUNT) - 1, ..failed };
        assert!(check_net(&idle, &slots).is_err());
    }

    #[test]
    fn only_matching_well_formed_answers_pass() {
        let mut table = InFlightTable::default();
        let (slot, id) = table.insert(request(4096)).unwrap();
        let ok = CompletionEntry { id, status: channel::status::OK, len: 4096 };
        assert_eq!(check(&ok, &table), Ok(Answer { slot, status: channel::status::OK }));
        assert_eq!(check(&CompletionEntry { id: id + 1, ..ok }, &table), Err(Violation::UnknownId(id + 1)));
        let other_generation = id + u64::from(channel::SLOT_COUNT);
        assert_eq!(
            check(&CompletionEntry { id: other_generation, ..ok }, &table),
            Err(Violation::UnknownId(other_generation))
        );
        assert!(matches!(check(&CompletionEntry { len: 8192, ..ok }, &table), Err(Violation::BadLength { .. })));
        assert!(matches!(check(&CompletionEntry { len: 0, ..ok }, &table), Err(Violation::BadLength { .. })));
        assert!(matches!(check(&CompletionEntry { status: 7, ..ok }, &table), Err(Violation::BadStatus { .. })));
        let error = CompletionEntry { status: channel::status::IO_ERROR, len: 0, ..ok };
        assert!(check(&error, &table).is_ok());
        table.remove(slot);
        assert_eq!(check(&ok, &table), Err(Violation::UnknownId(id)), "a second completion of the same id");
    }

    #[test]
    fn a_flush_must_reach_the_device_and_a_read_return_what_was_written() {
        let mut flush = request(0);
        flush.request.kind = RequestKind::Flush;
        flush.flush_mark = 3;
        let at = |started, completed| Evidence {
            flushes: FlushCount { started, completed },
            written: None,
            read_data: None,
        };
        assert!(matches!(check_evidence(&flush, &at(3, 3)), Err(Violation::FlushNotExecuted { .. })));
        assert!(matches!(check_evidence(&flush, &at(4, 3)), Err(Violation::FlushNotExecuted { .. })), "still running");
        assert!(check_evidence(&flush, &at(4, 4)).is_ok());

        let mut written = WrittenSums::new(64);
        let data = vec![7u8; 4096];
        written.record(8, &WrittenSums::sums_of(&data), |_| false);
        let mut read = request(4096);
        read.request.kind = RequestKind::Read;
        read.request.sector = 8;
        read.verifiable = true;
        fn with<'a>(written: &'a WrittenSums, data: &'a [u8]) -> Evidence<'a> {
            Evidence { flushes: FlushCount::default(), written: Some(written), read_data: Some(data) }
        }
        assert!(check_evidence(&read, &with(&written, &data)).is_ok());
        let mut lie = data.clone();
        lie[1024] ^= 1;
        assert_eq!(
            check_evidence(&read, &with(&written, &lie)),
            Err(Violation::DataMismatch { id: read.id, sector: 10 })
        );
        // Unknown sectors (never written here, or overlapped) are not judged.
        read.request.sector = 16;
        assert!(check_evidence(&read, &with(&written, &lie)).is_ok());
        read.request.sector = 8;
        read.verifiable = false;
        assert!(check_evidence(&read, &with(&written, &lie)).is_ok());
        written.forget(10, 1);
        read.verifiable = true;
        assert!(check_evidence(&read, &with(&written, &lie)).is_ok(), "a sector being rewritten is unknown");
        written.record(8, &WrittenSums::sums_of(&data), |sector| sector == 9);
        let mut other = data.clone();
        other[600] ^= 1;
        assert!(check_evidence(&read, &with(&written, &other)).is_ok(), "a sector another write covers is unknown");
    }
}
