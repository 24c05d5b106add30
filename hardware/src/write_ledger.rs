//! Which sectors a device has written from each DMA slot since the
//! reflector last handed it a write there: the reflector's evidence that a
//! write a driver acknowledges was done, as the flush count is for flushes.
//!
//! Why: a write's answer claims nothing else the reflector can check. A
//! driver could answer a write OK and never give it to the device (or give
//! it after the next flush): the client's write is lost, and its flush
//! still passes. The device itself records each write it performs, by the
//! slot its data came from (a bounce slot, or a request's DMA window, both
//! `SLOT_SIZE` apart from the DMA base) and the sectors it went to; the
//! reflector says, as it sends a write, which sector the slot's first byte
//! is for ([`WriteLedger::expect`]), and accepts the answer only if every
//! sector of the request has since been written from that slot to its own
//! sector ([`WriteLedger::done`]).
//!
//! Every driver of a device with a ledger is judged by it, from its first
//! answer: a driver configured as keeping no data (`null`, which answers
//! every request at once) is given no ledger by the reflector. Before, a
//! driver that had not enabled the device was taken for such a driver and
//! at its word, so one that answered writes before it enabled the device
//! (at every start) had each acknowledged and lost.
//!
//! What it is not: a check of the data. A driver may change its bounce slot
//! before the device reads it (a driver writes what it likes to its own
//! disk; `checksums=on` catches the reads). Only a device that records its
//! writes here offers a ledger (the simulated controller).

use std::sync::Mutex;

use guest_abi::channel::SLOT_SIZE;

/// Sectors of one slot.
const SECTORS: usize = (SLOT_SIZE / 512) as usize;

/// One slot's record.
#[derive(Default)]
struct SlotRecord {
    /// The sector the slot's first byte is for, while a write is expected.
    sector: Option<u64>,
    /// Sectors of the slot written to their own sector since the expectation.
    written: [u64; SECTORS / 64],
}

/// The record of every slot.
pub struct WriteLedger {
    slots: Vec<Mutex<SlotRecord>>,
}

impl WriteLedger {
    /// A ledger of `slots` slots, none expecting a write.
    pub fn new(slots: u32) -> WriteLedger {
        WriteLedger { slots: (0..slots).map(|_| Mutex::default()).collect() }
    }

    fn lock(&self, slot: usize) -> Option<std::sync::MutexGuard<'_, SlotRecord>> {
        Some(self.slots.get(slot)?.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// The reflector is handing the device a write whose data is in `slot`,
    /// for `sector` on: what was written from the slot before is forgotten.
    pub fn expect(&self, slot: u32, sector: u64) {
        if let Some(mut record) = self.lock(slot as usize) {
            record.sector = Some(sector);
            record.written = [0; SECTORS / 64];
        }
    }

    /// The device wrote `len` bytes, read from `relative` bytes past its
    /// DMA base, to the medium at sector `lba`. Only whole sectors that
    /// went where their slot's expected write puts them count.
    pub fn record(&self, relative: u64, lba: u64, len: u32) {
        if !relative.is_multiple_of(512) {
            return;
        }
        let slot_size = u64::from(SLOT_SIZE);
        let mut done = 0u64;
        let total = u64::from(len) / 512;
        while done < total {
            let position = relative + done * 512;
            let (slot, first) = (position / slot_size, (position % slot_size / 512) as usize);
            let run = (total - done).min((SECTORS - first) as u64);
            let Some(mut record) = self.lock(slot as usize) else { return };
            if record.sector.and_then(|sector| sector.checked_add(first as u64)) == lba.checked_add(done) {
                for sector in first..first + run as usize {
                    record.written[sector / 64] |= 1 << (sector % 64);
                }
            }
            done += run;
        }
    }

    /// Whether every sector of the `len` bytes of the write expected in
    /// `slot` has been written from it to its own sector.
    pub fn done(&self, slot: u32, len: u32) -> bool {
        let Some(record) = self.lock(slot as usize) else { return false };
        let sectors = (len as usize).div_ceil(512);
        record.sector.is_some()
            && sectors <= SECTORS
            && (0..sectors).all(|sector| record.written[sector / 64] & (1 << (sector % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOT: u64 = SLOT_SIZE as u64;

    #[test]
    fn a_write_counts_only_once_the_device_wrote_every_sector_to_its_own_place() {
        let ledger = WriteLedger::new(4);
        ledger.expect(2, 100);
        assert!(!ledger.done(2, 8192), "nothing written yet");
        // The first half, from slot 2 to sectors 100..108.
        ledger.record(2 * SLOT, 100, 4096);
        assert!(!ledger.done(2, 8192));
        // The second half to the wrong sectors, then from the wrong slot.
        ledger.record(2 * SLOT + 4096, 200, 4096);
        ledger.record(3 * SLOT + 4096, 108, 4096);
        assert!(!ledger.done(2, 8192));
        ledger.record(2 * SLOT + 4096, 108, 4096);
        assert!(ledger.done(2, 8192));
        // A new write in the slot forgets the old one's sectors.
        ledger.expect(2, 100);
        assert!(!ledger.done(2, 8192));
        // Unaligned data and slots past the end count nothing.
        ledger.record(2 * SLOT + 1, 100, 8192);
        ledger.record(9 * SLOT, 100, 8192);
        assert!(!ledger.done(2, 8192));
        assert!(!ledger.done(9, 512));
    }

    #[test]
    fn a_transfer_spanning_two_slots_counts_for_each_where_it_belongs() {
        let ledger = WriteLedger::new(4);
        ledger.expect(0, 0);
        ledger.expect(1, 256);
        // The last sector of slot 0 and the first of slot 1, in one write to
        // sectors 255 and 256: each lands where its own slot puts it.
        ledger.record(SLOT - 512, 255, 1024);
        ledger.record(0, 0, SLOT_SIZE - 512);
        assert!(ledger.done(0, SLOT_SIZE));
        assert!(ledger.done(1, 512));
        assert!(!ledger.done(1, 1024));
    }
}
