//! The one place that judges what a driver VM answers. A driver is
//! untrusted (DESIGN.md, invariant 2): a completion with an unknown or
//! already-completed id, an invalid status, a length that does not match the
//! request (block), a received frame of impossible length (net), or ring
//! indices out of range is a protocol violation, and the driver VM is
//! treated as faulty.

//!
//! It knows no kind of device: a kind says what the answer about one of its
//! slots must look like ([`Expected`]) and what a successful block answer
//! claims ([`Claim`]); nothing here imports `blk` or `net`, which both
//! import this.

use guest_abi::channel::{self, CompletionEntry};

use crate::hw::FlushCount;

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
    /// A write acknowledged although the device did not write every one of
    /// its sectors, from its slot, since it was sent: the write is lost.
    #[error("request id {id}: write acknowledged before the device wrote it")]
    WriteNotExecuted {
        /// Request id.
        id: u64,
    },
    /// A write acknowledged although the medium, read back by the host,
    /// does not hold what was sent: the write is lost.
    #[error("request id {id}: write acknowledged, but the medium does not hold its data (from sector {sector})")]
    WriteNotOnMedium {
        /// Request id.
        id: u64,
        /// The first sector of the part read back that differs.
        sector: u64,
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

/// What the answer about one slot must look like, as the kind that sent
/// the request knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The request's id (an answer with another is unknown).
    pub id: u64,
    /// A successful answer's length.
    pub length: Length,
    /// Whether the driver may refuse the request as unsupported.
    pub may_be_unsupported: bool,
}

/// The length a successful answer must give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    /// Exactly this (a block request's data, a frame being sent).
    Exactly(u32),
    /// Within these bounds (a received frame).
    Within {
        /// Least.
        min: u32,
        /// Most.
        max: u32,
    },
}

/// A completion that passed every protocol check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The bounce slot of the request.
    pub slot: u32,
    /// `channel::status::*`.
    pub status: u32,
    /// The length the driver gave.
    pub len: u32,
}

/// Judges one completion: `expected` says what the answer about its slot
/// must look like (None: no request there).
pub fn judge(
    completion: &CompletionEntry,
    expected: impl FnOnce(u32) -> Option<Expected>,
) -> Result<Answer, Violation> {
    let slot = channel::slot_of(completion.id);
    let expected = expected(slot).filter(|e| e.id == completion.id).ok_or(Violation::UnknownId(completion.id))?;
    match completion.status {
        channel::status::OK => {
            let fits = match expected.length {
                Length::Exactly(len) => completion.len == len,
                Length::Within { min, max } => (min..=max).contains(&completion.len),
            };
            if !fits {
                let shown = match expected.length {
                    Length::Exactly(len) => len,
                    Length::Within { max, .. } => max,
                };
                return Err(Violation::BadLength { id: completion.id, len: completion.len, expected: shown });
            }
        }
        channel::status::IO_ERROR => {}
        channel::status::UNSUPPORTED if expected.may_be_unsupported => {}
        status => return Err(Violation::BadStatus { id: completion.id, status }),
    }
    Ok(Answer { slot, status: completion.status, len: completion.len })
}

/// Checksums of what was written through a block device, one per 512-byte
/// sector (`checksums=on`): the evidence reads are judged against. A sector
/// has no checksum until a write of it completes with no other write of it
/// in flight; a write's submission forgets the checksums of its sectors.
pub struct WrittenSums {
    /// Per sector: 0 for unknown, [`LOST`], else the sector's CRC-32C with
    /// bit 0 set.
    sums: Vec<u32>,
}

/// A sector whose data is lost: reads of it fail at once until it is
/// written again ([`WrittenSums::mark_lost`]). Even: no checksum is.
const LOST: u32 = 2;

/// Bytes per checksummed sector.
const SECTOR: usize = 512;

/// The most sectors whose checksums one device keeps: 128 GiB of medium,
/// a 1 GiB table. The table lives in the reflector, which serves every
/// device: a larger medium (a typo in `size=`, or a real disk behind VFIO)
/// is refused when the device starts, not an allocation that aborts the
/// reflector and every device with it. Within it the table's pages are
/// taken as its sectors are written; a host that does not overcommit
/// (`vm.overcommit_memory=2`), or an address-space limit on the reflector,
/// must still grant the whole table's range, or the start aborts.
pub const MOST_CHECKSUMMED_SECTORS: u64 = 1 << 28;

/// Why a device cannot keep checksums of its medium.
#[derive(Debug, thiserror::Error)]
pub enum ChecksumTableError {
    #[error(
        "checksums=on keeps 4 bytes per 512-byte sector, and this medium has {sectors} sectors ({} MiB of checksums); \
         the most is {MOST_CHECKSUMMED_SECTORS} sectors (a 128 GiB medium): turn checksums off for this device or use a smaller one",
        sectors.saturating_mul(4) >> 20
    )]
    /// Past [`MOST_CHECKSUMMED_SECTORS`].
    TooLarge {
        /// The medium's sectors.
        sectors: u64,
    },
}

impl WrittenSums {
    /// No sector known yet, for a medium of `capacity_sectors`; refused past
    /// [`MOST_CHECKSUMMED_SECTORS`].
    pub fn new(capacity_sectors: u64) -> Result<Self, ChecksumTableError> {
        Self::check_capacity(capacity_sectors)?;
        // In range: at most 2^28, which usize holds. Zeroed by the kernel
        // as its pages are first written (`vec!` of zeros allocates zeroed
        // memory), so a table costs what its written sectors take: filled
        // at once, a 100 GiB medium took 800 MiB at start (a review found
        // the first version of this limit did).
        Ok(WrittenSums { sums: vec![0; capacity_sectors as usize] })
    }

    /// Whether a medium of `capacity_sectors` is small enough to keep the
    /// checksums of (the configuration's check, before anything starts).
    pub fn check_capacity(capacity_sectors: u64) -> Result<(), ChecksumTableError> {
        if capacity_sectors > MOST_CHECKSUMMED_SECTORS {
            return Err(ChecksumTableError::TooLarge { sectors: capacity_sectors });
        }
        Ok(())
    }

    /// The checksum of each 512-byte sector of `data`.
    pub fn sums_of(data: &[u8]) -> Vec<u32> {
        data.chunks(SECTOR).map(|sector| crc32fast::hash(sector) | 1).collect()
    }

    /// Forgets the sectors `sector..sector + count` (a write of them starts).
    pub fn forget(&mut self, sector: u64, count: usize) {
        let sectors = self.within(sector, count);
        self.sums[sectors].fill(0);
    }

    /// The sectors `sector..sector + count` of the medium, as indices of
    /// [`WrittenSums::sums`] (what lies past its end left out).
    fn within(&self, sector: u64, count: usize) -> std::ops::Range<usize> {
        let start = (sector as usize).min(self.sums.len());
        start..start.saturating_add(count).min(self.sums.len())
    }

    /// Marks the sectors `sector..sector + count` whose checksums are known
    /// lost: a read of them was answered with other data by driver VM after
    /// driver VM, up to the poison limit, so the medium holds other data
    /// there (a write a dead driver corrupted after its copy was checked).
    /// Reads of them then fail at once ([`WrittenSums::lost`]) instead of
    /// killing each honest driver that reads them (each kill a fault, and
    /// a replay of everything else it held, until the fault budget failed
    /// the device: an adversarial review found it); a write brings them
    /// back. Never their data: that is not what was written.
    pub fn mark_lost(&mut self, sector: u64, count: usize) {
        let sectors = self.within(sector, count);
        for sum in &mut self.sums[sectors] {
            if *sum != 0 {
                *sum = LOST;
            }
        }
    }

    /// Whether any of the sectors `sector..sector + count` is lost.
    pub fn lost(&self, sector: u64, count: usize) -> bool {
        self.sums[self.within(sector, count)].contains(&LOST)
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
/// reached the device, a read must return what was written, and a write
/// must be on the medium.
#[derive(Default)]
pub struct Evidence<'a> {
    /// The device's flush counts now.
    pub flushes: FlushCount,
    /// Checksums of written sectors, if kept.
    pub written: Option<&'a WrittenSums>,
    /// The data a read returned (its bounce slot), if it is to be checked.
    pub read_data: Option<&'a [u8]>,
    /// The device's record of the writes it performed, if it keeps one
    /// and the driver is not configured as keeping no data (`null`).
    pub writes: Option<&'a hardware::write_ledger::WriteLedger>,
    /// Parts of a write read back from the medium as its answer came
    /// (`hardware::BlockHardware::medium`; none where the host cannot read
    /// it, or another write of its sectors was in flight with it and either
    /// may be there).
    pub read_back: &'a [ReadBack],
}

/// A part of a write as the host read it back from the medium.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadBack {
    /// Its first sector on the medium.
    pub sector: u64,
    /// The CRC-32 of what was sent there.
    pub sent: u32,
    /// The CRC-32 of what the medium holds there (None: the medium ends
    /// before it).
    pub found: Option<u32>,
}

/// What a successful block answer claims, to be judged by the evidence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// A flush sent when the device had started `mark` flushes: done.
    Flushed {
        /// The device's started-flush count when the flush was sent.
        mark: u64,
    },
    /// The data of a read from `sector`; `verifiable` if no write of its
    /// sectors was in flight since it was sent.
    Read {
        /// First sector.
        sector: u64,
        /// Whether its data must match the known checksums.
        verifiable: bool,
    },
    /// A write of `len` bytes whose data is in `slot`: done by the device.
    Written {
        /// Its slot (a bounce slot, or its DMA window).
        slot: u32,
        /// Its length.
        len: u32,
    },
    /// Nothing the evidence can judge.
    Nothing,
}

/// Judges a successful block completion (`judge` passed, status OK) of
/// request `id` against the evidence.
pub fn check_evidence(id: u64, claim: Claim, evidence: &Evidence) -> Result<(), Violation> {
    match claim {
        // A failed sync of the medium fails the flush whatever the driver
        // answered (the block device completes it with an error), and is
        // not the driver's doing.
        Claim::Flushed { .. } if evidence.flushes.medium_failed => Ok(()),
        Claim::Flushed { mark } if evidence.flushes.completed <= mark => {
            Err(Violation::FlushNotExecuted { id, mark, completed: evidence.flushes.completed })
        }
        Claim::Written { slot, len } if evidence.writes.is_some_and(|writes| !writes.done(slot, len)) => {
            Err(Violation::WriteNotExecuted { id })
        }
        Claim::Written { .. } => match evidence.read_back.iter().find(|part| part.found != Some(part.sent)) {
            Some(lost) => Err(Violation::WriteNotOnMedium { id, sector: lost.sector }),
            None => Ok(()),
        },
        Claim::Read { sector, verifiable: true } => match (evidence.written, evidence.read_data) {
            (Some(written), Some(data)) => {
                written.verify(sector, data).map_err(|sector| Violation::DataMismatch { id, sector })
            }
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect(id: u64, length: Length) -> impl FnOnce(u32) -> Option<Expected> {
        move |_| Some(Expected { id, length, may_be_unsupported: false })
    }

    #[test]
    fn only_matching_well_formed_answers_pass() {
        let id = 5 * u64::from(channel::SLOT_COUNT) + 3;
        let ok = CompletionEntry { id, status: channel::status::OK, len: 4096 };
        assert_eq!(
            judge(&ok, expect(id, Length::Exactly(4096))),
            Ok(Answer { slot: 3, status: channel::status::OK, len: 4096 })
        );
        assert_eq!(judge(&ok, |_| None), Err(Violation::UnknownId(id)), "no request in that slot");
        assert_eq!(
            judge(&ok, expect(id + 1, Length::Exactly(4096))),
            Err(Violation::UnknownId(id)),
            "another id there"
        );
        assert!(matches!(judge(&ok, expect(id, Length::Exactly(8192))), Err(Violation::BadLength { .. })));
        assert!(matches!(
            judge(&ok, expect(id, Length::Within { min: 60, max: 1514 })),
            Err(Violation::BadLength { .. })
        ));
        assert!(judge(&CompletionEntry { len: 1514, ..ok }, expect(id, Length::Within { min: 60, max: 1514 })).is_ok());
        assert!(matches!(
            judge(&CompletionEntry { status: 7, ..ok }, expect(id, Length::Exactly(4096))),
            Err(Violation::BadStatus { .. })
        ));
        let error = CompletionEntry { status: channel::status::IO_ERROR, len: 0, ..ok };
        assert!(judge(&error, expect(id, Length::Exactly(4096))).is_ok(), "an error answer carries no length");
        let unsupported = CompletionEntry { status: channel::status::UNSUPPORTED, ..error };
        assert!(matches!(judge(&unsupported, expect(id, Length::Exactly(4096))), Err(Violation::BadStatus { .. })));
        let may = |_| Some(Expected { id, length: Length::Exactly(4096), may_be_unsupported: true });
        assert!(judge(&unsupported, may).is_ok());
    }

    /// A write acknowledged is judged by the device's own record of what
    /// it wrote, where it keeps one (before, on the driver's word: a write
    /// acknowledged and never done was lost).
    #[test]
    fn a_write_must_have_been_done_by_the_device() {
        let writes = hardware::write_ledger::WriteLedger::new(4);
        let evidence = |writes| Evidence { writes, ..Evidence::default() };
        let write = Claim::Written { slot: 1, len: 4096 };
        writes.expect(1, 40);
        // Judged from the driver's first answer: before, the ledger took a
        // driver that had not enabled the device yet at its word.
        assert_eq!(check_evidence(3, write, &evidence(Some(&writes))), Err(Violation::WriteNotExecuted { id: 3 }));
        assert!(check_evidence(3, write, &evidence(None)).is_ok(), "no record: the driver's word");
        writes.record(u64::from(channel::SLOT_SIZE), 40, 4096);
        assert!(check_evidence(3, write, &evidence(Some(&writes))).is_ok());
    }

    /// A write acknowledged on a device whose medium the host reads (QEMU's
    /// NVMe model, the memory disk) must be there, as read back (before, on
    /// the driver's word).
    #[test]
    fn a_write_must_be_on_the_medium() {
        let write = Claim::Written { slot: 1, len: 65536 };
        let part = |sector, found| ReadBack { sector, sent: 7, found };
        let evidence = |read_back| Evidence { read_back, ..Evidence::default() };
        let lost = [part(8, Some(7)), part(40, Some(9)), part(128, Some(7))];
        let (cut, done) = ([part(8, Some(7)), part(128, None)], [part(8, Some(7)), part(128, Some(7))]);
        assert_eq!(check_evidence(3, write, &evidence(&lost)), Err(Violation::WriteNotOnMedium { id: 3, sector: 40 }));
        assert_eq!(check_evidence(3, write, &evidence(&cut)), Err(Violation::WriteNotOnMedium { id: 3, sector: 128 }));
        assert!(check_evidence(3, write, &evidence(&done)).is_ok());
        assert!(check_evidence(3, write, &evidence(&[])).is_ok(), "nothing read back: not judged");
    }

    /// The checksum table of a medium past the most is refused, not
    /// allocated (before: `vec!` of 4 bytes a sector, which aborts the
    /// reflector when the memory is not there).
    #[test]
    fn a_medium_past_the_most_gets_no_checksum_table() {
        assert!(WrittenSums::new(MOST_CHECKSUMMED_SECTORS + 1).is_err());
        let error = WrittenSums::new(u64::MAX).err().unwrap().to_string();
        assert!(error.contains("turn checksums off"), "{error}");
        assert!(WrittenSums::check_capacity(MOST_CHECKSUMMED_SECTORS).is_ok());
        assert_eq!(WrittenSums::new(8).unwrap().sums.len(), 8);
    }

    #[test]
    fn a_flush_must_reach_the_device_and_a_read_return_what_was_written() {
        let flush = Claim::Flushed { mark: 3 };
        let at = |started, completed| Evidence {
            flushes: FlushCount { started, completed, medium_failed: false },
            ..Evidence::default()
        };
        assert!(matches!(check_evidence(1, flush, &at(3, 3)), Err(Violation::FlushNotExecuted { .. })));
        assert!(
            matches!(check_evidence(1, flush, &at(4, 3)), Err(Violation::FlushNotExecuted { .. })),
            "still running"
        );
        assert!(check_evidence(1, flush, &at(4, 4)).is_ok());

        let mut written = WrittenSums::new(64).unwrap();
        let data = vec![7u8; 4096];
        written.record(8, &WrittenSums::sums_of(&data), |_| false);
        let mut read = Claim::Read { sector: 8, verifiable: true };
        fn with<'a>(written: &'a WrittenSums, data: &'a [u8]) -> Evidence<'a> {
            Evidence { written: Some(written), read_data: Some(data), ..Evidence::default() }
        }
        assert!(check_evidence(2, read, &with(&written, &data)).is_ok());
        let mut lie = data.clone();
        lie[1024] ^= 1;
        assert_eq!(check_evidence(2, read, &with(&written, &lie)), Err(Violation::DataMismatch { id: 2, sector: 10 }));
        // Unknown sectors (never written here, or overlapped) are not judged.
        read = Claim::Read { sector: 16, verifiable: true };
        assert!(check_evidence(2, read, &with(&written, &lie)).is_ok());
        read = Claim::Read { sector: 8, verifiable: false };
        assert!(check_evidence(2, read, &with(&written, &lie)).is_ok());
        written.forget(10, 1);
        read = Claim::Read { sector: 8, verifiable: true };
        assert!(check_evidence(2, read, &with(&written, &lie)).is_ok(), "a sector being rewritten is unknown");
        written.record(8, &WrittenSums::sums_of(&data), |sector| sector == 9);
        let mut other = data.clone();
        other[600] ^= 1;
        assert!(check_evidence(2, read, &with(&written, &other)).is_ok(), "a sector another write covers is unknown");
    }
}
