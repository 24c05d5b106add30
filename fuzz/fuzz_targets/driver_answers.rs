//! A driver VM's answers: the reflector publishes requests on a channel,
//! the input plays the driver (completion entries, the completion producer
//! index, stray writes into the channel header), and the reflector's
//! channel and `driver_answers` judge every completion, block and net, and
//! the evidence (flush counts, checksums). Nothing may panic; an answer that
//! passes must name a request in flight and match its length.
#![no_main]

use std::sync::{Mutex, OnceLock};

use arbitrary::Arbitrary;
use guest_abi::channel::{self, header, CompletionEntry, RequestEntry};
use libfuzzer_sys::fuzz_target;
use reflector::blk::inflight::{InFlight, InFlightTable};
use reflector::blk::marshal::{BlkRequest, RequestKind};
use reflector::channel::Channel;
use reflector::driver_answers::{self, Evidence, ReadBack, WrittenSums};
use reflector::hw::FlushCount;
use reflector::net::slots::NetSlots;
use vm_memory::GuestAddress;

#[derive(Arbitrary, Debug)]
enum Step {
    /// The reflector sends a block request.
    Send { kind: u8, sector: u16, sectors: u8 },
    /// The driver writes a completion entry at ring position `at`.
    Complete { at: u8, id: u64, status: u32, len: u32 },
    /// The driver moves its completion producer index.
    Produce(u32),
    /// The driver writes any header word.
    Scribble { offset: u8, value: u32 },
    /// The reflector takes and judges the completions.
    Judge { flushes_started: u8, flushes_completed: u8 },
    /// A net slot starts sending, or posts receive buffers.
    Net { tx_len: u16 },
}

static CHANNEL: OnceLock<Mutex<Channel>> = OnceLock::new();

fuzz_target!(|steps: Vec<Step>| {
    let channel = CHANNEL.get_or_init(|| Mutex::new(Channel::new("fuzz").expect("a channel")));
    let mut channel = channel.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    channel.reset();
    let memory = channel.memory().clone();
    let mut table = InFlightTable::default();
    let mut slots = NetSlots::default();
    let Ok(mut written) = WrittenSums::new(1 << 16) else { return };
    let writes = reflector::hw::write_ledger::WriteLedger::new(channel::SLOT_COUNT);
    for step in steps.into_iter().take(256) {
        match step {
            Step::Send { kind, sector, sectors } => {
                let kind = [RequestKind::Read, RequestKind::Write, RequestKind::Flush][usize::from(kind % 3)];
                let len = if kind == RequestKind::Flush { 0 } else { (u32::from(sectors % 64) + 1) * 512 };
                let request = BlkRequest { kind, sector: u64::from(sector), data: vec![(GuestAddress(0x1000), len)] };
                let mut entry = InFlight::new(0, request, GuestAddress(0), 0);
                entry.verifiable = true;
                if let Ok((slot, id)) = table.insert(entry) {
                    let op = match kind {
                        RequestKind::Read => channel::op::READ,
                        RequestKind::Write => channel::op::WRITE,
                        _ => channel::op::FLUSH,
                    };
                    channel.push(RequestEntry { id, op, slot, sector: u64::from(sector), len, reserved: 0 });
                }
            }
            Step::Complete { at, id, status, len } => {
                let offset = channel::COMPLETION_RING_OFFSET
                    + usize::from(at) % channel::RING_SIZE as usize * channel::COMPLETION_ENTRY_SIZE;
                memory.write(offset, CompletionEntry { id, status, len });
            }
            Step::Produce(index) => {
                memory.atomic_u32(header::CMP_PROD).store(index, std::sync::atomic::Ordering::SeqCst)
            }
            Step::Scribble { offset, value } => {
                let offset = usize::from(offset) * 4;
                if offset + 4 <= channel::COMPLETION_RING_OFFSET {
                    memory.atomic_u32(offset).store(value, std::sync::atomic::Ordering::SeqCst);
                }
            }
            Step::Judge { flushes_started, flushes_completed } => {
                let Ok(completions) = channel.take_completions() else {
                    channel.reset();
                    continue;
                };
                let flushes = FlushCount {
                    started: u64::from(flushes_started.max(flushes_completed)),
                    completed: u64::from(flushes_completed),
                    medium_failed: false,
                };
                for completion in completions {
                    if let Ok(answer) = reflector::blk::inflight::check(&completion, &table) {
                        let entry = table.get(answer.slot).expect("a passed answer names a request in flight");
                        assert_eq!(entry.id, completion.id);
                        let data = vec![0u8; entry.data_len as usize];
                        // A part of a write read back: what the medium holds
                        // is the input's (the driver's doing).
                        let read_back = [ReadBack {
                            sector: entry.request.sector,
                            sent: 0,
                            found: Some(u32::from(flushes_completed)),
                        }];
                        let evidence = Evidence {
                            flushes,
                            written: Some(&written),
                            read_data: Some(&data),
                            writes: Some(&writes),
                            read_back: &read_back,
                        };
                        let _ = driver_answers::check_evidence(entry.id, entry.claim(answer.slot), &evidence);
                        if entry.request.kind == RequestKind::Write {
                            let sums = WrittenSums::sums_of(&data);
                            written.record(entry.request.sector, &sums, |_| false);
                        }
                        table.remove(answer.slot);
                    }
                    if let Ok(answer) = reflector::net::slots::check_net(&completion, &slots) {
                        if let reflector::net::slots::NetAnswer::Received { slot, len: Some(len) } = answer {
                            slots.hold(slot, len);
                            slots.release(slot);
                        }
                    }
                }
            }
            Step::Net { tx_len } => {
                let _ = slots.start_tx(u32::from(tx_len % 1600));
                let _ = slots.post_idle_rx();
            }
        }
    }
});
