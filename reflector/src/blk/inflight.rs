//! The table of requests handed to a driver VM, one per bounce slot. The
//! reflector owns it: it is what makes completions checkable and, after a
//! driver VM dies, replayable. With per-request DMA windows (`dma=direct`)
//! it also owns their lifetime: a slot's window is revoked whenever its
//! request leaves the table, however it leaves, so no path can complete a
//! request to the client while the device can still reach its buffers.

use crate::recovery::{Blame, SILENT_DEATHS_PER_DEATH};
use std::sync::Arc;

use guest_abi::channel::{self, CompletionEntry};
use vm_memory::GuestAddress;

use crate::hw::dma_windows::{DmaWindows, Window};

use super::marshal::{BlkRequest, RequestKind};
use crate::driver_answers::{self, Answer, Claim, Expected, Length, Violation};

/// A request in a driver VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlight {
    /// Channel id (`sequence * SLOT_COUNT + slot`).
    pub id: u64,
    /// Descriptor chain head, to complete it in the client's queue.
    pub head: u16,
    /// The parsed request (client addresses, kind, sector).
    pub request: BlkRequest,
    /// Payload length.
    pub data_len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// The client connection it came from; a completion for an earlier
    /// connection is dropped instead of written into the new client's memory.
    pub client: u64,
    /// Flush: the device's started-flush count when it was sent.
    pub flush_mark: u64,
    /// Write (with checksums): the checksums of the data sent.
    pub sums: Vec<u32>,
    /// Write, where the host reads the medium back: the parts of it read
    /// back, with what was sent there ([`crate::blk::read_back`]).
    pub read_back: Vec<crate::blk::read_back::Stretch>,
    /// Read (with checksums): no write of its sectors was in flight since
    /// it was sent, so its data must match the known checksums.
    pub verifiable: bool,
    /// Driver VMs that died while it was in them: one that reaches the
    /// poison limit is completed with an error instead of being replayed
    /// again (DESIGN.md, invariant 5).
    pub deaths: u32,
    /// Driver VMs that ended without a report while it was in them
    /// (`Blame::Silent`): `SILENT_DEATHS_PER_DEATH` of them count as one
    /// death.
    pub silent_deaths: u32,
    /// A driver answered it (a read) with data other than what was written
    /// to its sectors (`checksums=on`): if it fails as poison, the medium,
    /// not a driver, is taken to hold other data there
    /// ([`crate::driver_answers::WrittenSums::mark_lost`]).
    pub mismatched: bool,
    /// In the current driver VM's channel (false: held back by the
    /// reflector, see [`InFlightTable::next_to_send`]).
    pub sent: bool,
    /// It was in a driver VM that died (blamed or not): each send since is
    /// a replay, and its client has waited since before that fault.
    pub orphaned: bool,
    /// When it was last put into a driver VM's channel (its own deadline
    /// counts from there: `Session`'s withheld-request check).
    pub sent_at: Option<std::time::Instant>,
    /// A write that was in flight beside another write to some of the same
    /// sectors: which of the two the medium holds is the device's order,
    /// not their completions' (NVMe may complete them either way), so
    /// neither's sums are recorded and reads of those sectors go unjudged
    /// until a later write.
    pub raced: bool,
}

impl InFlight {
    /// A request from client connection `client`, chain `head`, about to
    /// be sent for the first time (its id is given by the table).
    pub fn new(head: u16, request: BlkRequest, status: GuestAddress, client: u64) -> Self {
        InFlight {
            id: 0,
            head,
            data_len: request.data_len(),
            request,
            status,
            client,
            flush_mark: 0,
            sums: Vec::new(),
            read_back: Vec::new(),
            verifiable: false,
            deaths: 0,
            silent_deaths: 0,
            mismatched: false,
            sent: true,
            orphaned: false,
            sent_at: None,
            raced: false,
        }
    }

    /// It was in a driver VM whose death counts against it (silently
    /// or not): sent alone until it is answered.
    pub fn suspect(&self) -> bool {
        self.deaths > 0 || self.silent_deaths > 0
    }

    /// The 512-byte sectors it covers.
    pub fn sectors(&self) -> std::ops::Range<u64> {
        self.request.sector..self.request.sector + u64::from(self.data_len) / 512
    }

    /// Whether it covers a sector `other` covers.
    pub fn overlaps(&self, other: &InFlight) -> bool {
        let (mine, theirs) = (self.sectors(), other.sectors());
        mine.start < theirs.end && theirs.start < mine.end
    }
}

impl InFlight {
    /// What its answer claims, for the evidence (`driver_answers`); `slot`
    /// is the slot it was sent in.
    pub fn claim(&self, slot: u32) -> Claim {
        match self.request.kind {
            RequestKind::Flush => Claim::Flushed { mark: self.flush_mark },
            RequestKind::Read => Claim::Read { sector: self.request.sector, verifiable: self.verifiable },
            RequestKind::Write => Claim::Written { slot, len: self.data_len },
            _ => Claim::Nothing,
        }
    }
}

/// Judges one completion against the table (`driver_answers::judge`): its
/// id must name a request in the current driver VM's channel (not one the
/// reflector holds back, whose id a driver can predict: an answer to it
/// would complete a write or flush no driver VM was given), and a success
/// must carry the request's length.
pub fn check(completion: &CompletionEntry, table: &InFlightTable) -> Result<Answer, Violation> {
    driver_answers::judge(completion, |slot| {
        let request = table.get(slot).filter(|request| request.sent)?;
        Some(Expected { id: request.id, length: Length::Exactly(request.data_len), may_be_unsupported: true })
    })
}

/// The client of a request no client waits for any more
/// ([`InFlightTable::disown`]); connections are numbered up from 0.
pub const NO_CLIENT: u64 = u64::MAX;

/// Requests in flight, indexed by bounce slot (the first [`channel::BLOCK_SLOTS`]).
pub struct InFlightTable {
    slots: Vec<Option<InFlight>>,
    free: Vec<u32>,
    sequence: u64,
    /// The device's per-request DMA windows, one per slot (`dma=direct`).
    windows: Option<Arc<DmaWindows>>,
}

impl Default for InFlightTable {
    fn default() -> Self {
        InFlightTable::with_windows(None)
    }
}

impl InFlightTable {
    /// An empty table; `windows`, if given, are the device's per-request
    /// DMA windows, indexed by slot.
    pub fn with_windows(windows: Option<Arc<DmaWindows>>) -> Self {
        InFlightTable {
            slots: vec![None; channel::BLOCK_SLOTS as usize],
            free: (0..channel::BLOCK_SLOTS).rev().collect(),
            sequence: 0,
            windows,
        }
    }

    /// Whether payloads go through per-request DMA windows.
    pub fn direct(&self) -> bool {
        self.windows.is_some()
    }

    /// The most a window holds, if payloads go through windows.
    pub fn window_limit(&self) -> Option<u32> {
        self.windows.as_ref().map(|windows| windows.granule())
    }

    /// Lets the device reach `window` through `slot`'s address, while the
    /// request in `slot` stays in the table; false if there is no request
    /// there or no windows.
    pub fn map_window(&self, slot: u32, window: Window) -> bool {
        match (&self.windows, self.get(slot)) {
            (Some(windows), Some(_)) => windows.map(slot, window),
            _ => false,
        }
    }

    /// Revokes every request's window (its driver VM died, and a replay
    /// maps it again; or its client left), each after the device's access
    /// in progress on it ends.
    pub fn revoke_windows(&self) {
        if let Some(windows) = &self.windows {
            windows.unmap_all();
        }
    }

    /// Takes a free slot for `entry` and gives it a fresh id; gives the
    /// entry back (boxed: it is large, and the table is full only under a
    /// deep queue) if every slot is taken.
    pub fn insert(&mut self, mut entry: InFlight) -> Result<(u32, u64), Box<InFlight>> {
        let Some(slot) = self.free.pop() else { return Err(Box::new(entry)) };
        self.sequence += 1;
        entry.id = self.sequence * u64::from(channel::SLOT_COUNT) + u64::from(slot);
        let id = entry.id;
        self.slots[slot as usize] = Some(entry);
        Ok((slot, id))
    }

    /// Puts `entry` back into `slot` (free, after `drain`) with a fresh id:
    /// a replayed request keeps its bounce slot, and answers from the driver
    /// VM that had it cannot match its new id. False if the slot is taken.
    pub fn insert_at(&mut self, slot: u32, mut entry: InFlight) -> bool {
        let Some(position) = self.free.iter().position(|free| *free == slot) else { return false };
        self.free.swap_remove(position);
        self.sequence += 1;
        entry.id = self.sequence * u64::from(channel::SLOT_COUNT) + u64::from(slot);
        self.slots[slot as usize] = Some(entry);
        true
    }

    /// The request in `slot`, to change.
    pub fn get_mut(&mut self, slot: u32) -> Option<&mut InFlight> {
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    /// Every request in flight, with its slot.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &InFlight)> {
        self.slots.iter().enumerate().filter_map(|(slot, entry)| Some((slot as u32, entry.as_ref()?)))
    }

    /// The request in `slot`, if any.
    pub fn get(&self, slot: u32) -> Option<&InFlight> {
        self.slots.get(slot as usize)?.as_ref()
    }

    /// Frees `slot` and returns its request, its DMA window revoked.
    pub fn remove(&mut self, slot: u32) -> Option<InFlight> {
        let entry = self.slots.get_mut(slot as usize)?.take()?;
        if let Some(windows) = &self.windows {
            windows.unmap(slot);
        }
        self.free.push(slot);
        Some(entry)
    }

    /// Number of requests in flight.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Number of requests in flight from client connection `client` (those
    /// of a departed client may still be in the driver VM).
    pub fn len_for(&self, client: u64) -> usize {
        self.slots.iter().flatten().filter(|entry| entry.client == client).count()
    }

    /// When the request that has been in the current driver VM longest
    /// was put there (those held back are in none).
    pub fn oldest_sent(&self) -> Option<std::time::Instant> {
        self.slots.iter().flatten().filter(|entry| entry.sent).filter_map(|entry| entry.sent_at).min()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A driver VM died: every request it held is held back until
    /// [`next_to_send`](Self::next_to_send) releases it, and gains a death
    /// or a silent one as `blame` says (`Fault::blame`).
    pub fn blame_sent(&mut self, blame: Blame) {
        for entry in self.slots.iter_mut().flatten() {
            if entry.sent {
                entry.deaths += u32::from(blame == Blame::Death);
                entry.silent_deaths += u32::from(blame == Blame::Silent);
                entry.sent = false;
                entry.orphaned = true;
            }
        }
    }

    /// Removes and returns the requests that were in `limit` or more dying
    /// driver VMs (poison requests), `SILENT_DEATHS_PER_DEATH` silent
    /// deaths counting as one, oldest first.
    pub fn take_poisoned(&mut self, limit: u32) -> Vec<(u32, InFlight)> {
        let poison = |e: &InFlight| e.deaths.saturating_add(e.silent_deaths / SILENT_DEATHS_PER_DEATH) >= limit;
        let mut poisoned: Vec<u32> = self.iter().filter(|(_, e)| poison(e)).map(|(slot, _)| slot).collect();
        poisoned.sort_by_key(|slot| self.get(*slot).map(|e| e.id));
        poisoned.into_iter().filter_map(|slot| Some((slot, self.remove(slot)?))).collect()
    }

    /// Whether a request that was in a dying driver VM is still pending:
    /// until none is, requests go to the driver VM one at a time.
    pub fn serializing(&self) -> bool {
        self.iter().any(|(_, entry)| entry.suspect())
    }

    /// The held requests to send now, marked sent. While a suspect (a
    /// request that was in a dying driver VM) is pending, one suspect at a
    /// time, alone, oldest first: a request that kills every driver VM then
    /// dies alone and reaches the poison limit, while the requests that
    /// merely shared a driver VM with it get through. With no suspect left,
    /// every held request.
    pub fn next_to_send(&mut self) -> Vec<u32> {
        if self.iter().any(|(_, entry)| entry.sent && entry.suspect()) {
            return Vec::new();
        }
        let suspect = self.iter().filter(|(_, e)| !e.sent && e.suspect()).min_by_key(|(_, e)| e.id).map(|(s, _)| s);
        let chosen: Vec<u32> = match suspect {
            Some(_) if self.iter().any(|(_, entry)| entry.sent) => Vec::new(),
            Some(slot) => vec![slot],
            None => {
                let mut held: Vec<(u32, u64)> =
                    self.iter().filter(|(_, e)| !e.sent).map(|(slot, e)| (slot, e.id)).collect();
                held.sort_by_key(|(_, id)| *id);
                held.into_iter().map(|(slot, _)| slot).collect()
            }
        };
        for slot in &chosen {
            if let Some(entry) = self.get_mut(*slot) {
                entry.sent = true;
            }
        }
        chosen
    }

    /// Whether a request that was in a driver VM that died is still
    /// unanswered (a failover's drain is not over).
    pub fn replays_pending(&self) -> bool {
        self.iter().any(|(_, entry)| entry.orphaned)
    }

    /// Removes and returns the requests held back by the reflector (in no
    /// driver VM: see [`blame_sent`](Self::blame_sent)).
    pub fn take_held(&mut self) -> Vec<(u32, InFlight)> {
        let held: Vec<u32> = self.iter().filter(|(_, entry)| !entry.sent).map(|(slot, _)| slot).collect();
        held.into_iter().filter_map(|slot| Some((slot, self.remove(slot)?))).collect()
    }

    /// Gives up on client connection `client`'s requests: those held back
    /// are removed; those in the driver VM stay until it answers or dies
    /// (their slots are the driver's meanwhile) but belong to no client
    /// any more ([`NO_CLIENT`]), so that their answers complete into
    /// nothing and no replay sends them again. Returns each one's chain
    /// head and status address, to complete now.
    pub fn disown(&mut self, client: u64) -> Vec<(u16, GuestAddress)> {
        let mut disowned = Vec::new();
        for slot in 0..channel::BLOCK_SLOTS {
            let Some(entry) = self.get_mut(slot).filter(|entry| entry.client == client) else { continue };
            disowned.push((entry.head, entry.status));
            if entry.sent {
                entry.client = NO_CLIENT;
            } else {
                self.remove(slot);
            }
        }
        disowned
    }

    /// Removes and returns every request, oldest id first.
    pub fn drain(&mut self) -> Vec<(u32, InFlight)> {
        let mut all: Vec<(u32, InFlight)> =
            (0..channel::BLOCK_SLOTS).filter_map(|slot| Some((slot, self.remove(slot)?))).collect();
        all.sort_by_key(|(_, entry)| entry.id);
        all
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::blk::marshal::RequestKind;

    pub(crate) fn request(len: u32) -> InFlight {
        InFlight::new(
            0,
            BlkRequest { kind: RequestKind::Read, sector: 0, data: vec![(GuestAddress(0x1000), len)] },
            GuestAddress(0x2000),
            0,
        )
    }

    /// A table holding `count` requests sent to a driver VM, oldest first.
    fn sent(count: usize) -> (InFlightTable, Vec<u32>) {
        let mut table = InFlightTable::default();
        let slots = (0..count).map(|_| table.insert(request(512)).unwrap().0).collect();
        (table, slots)
    }

    /// Replays after a death as the device does: fresh ids, oldest first.
    fn restart(table: &mut InFlightTable) {
        for (slot, entry) in table.drain() {
            assert!(table.insert_at(slot, entry));
        }
    }

    #[test]
    fn only_answers_about_requests_in_flight_with_their_length_pass() {
        let mut table = InFlightTable::default();
        let (slot, id) = table.insert(request(4096)).unwrap();
        let ok = CompletionEntry { id, status: channel::status::OK, len: 4096 };
        assert_eq!(check(&ok, &table), Ok(Answer { slot, status: channel::status::OK, len: 4096 }));
        let other_generation = id + u64::from(channel::SLOT_COUNT);
        assert_eq!(
            check(&CompletionEntry { id: other_generation, ..ok }, &table),
            Err(Violation::UnknownId(other_generation))
        );
        assert!(matches!(check(&CompletionEntry { len: 0, ..ok }, &table), Err(Violation::BadLength { .. })));
        let unsupported = CompletionEntry { status: channel::status::UNSUPPORTED, len: 0, ..ok };
        assert!(check(&unsupported, &table).is_ok(), "a driver may refuse a block request");
        table.remove(slot);
        assert_eq!(check(&ok, &table), Err(Violation::UnknownId(id)), "a second completion of the same id");
    }

    #[test]
    fn after_a_death_suspects_go_alone_and_a_poison_request_is_found_without_blaming_the_others() {
        // Three requests in a driver VM; the second kills every driver VM
        // that gets it.
        let (mut table, slots) = sent(3);
        let poison = slots[1];
        let mut poisoned = Vec::new();
        let mut completed = Vec::new();
        for _death in 0..10 {
            table.blame_sent(Blame::Death);
            poisoned.extend(table.take_poisoned(3).into_iter().map(|(slot, _)| slot));
            restart(&mut table);
            // The new driver VM serves what it is given until it gets the
            // poison request.
            loop {
                let batch = table.next_to_send();
                if batch.is_empty() {
                    break;
                }
                if batch.contains(&poison) {
                    break;
                }
                for slot in batch {
                    table.remove(slot).unwrap();
                    completed.push(slot);
                }
            }
            if table.is_empty() {
                break;
            }
        }
        assert_eq!(poisoned, vec![poison], "only the poison request fails");
        let mut expected = vec![slots[0], slots[2]];
        expected.sort_unstable();
        completed.sort_unstable();
        assert_eq!(completed, expected, "the others complete");
        assert!(!table.serializing());
    }

    /// After a death, one suspect goes alone and the rest are held back
    /// with fresh ids a driver can predict (consecutive sequence numbers):
    /// an answer naming a held request was taken, completing a write or a
    /// flush no driver VM was given.
    #[test]
    fn an_answer_naming_a_request_held_back_is_an_unknown_id() {
        let (mut table, _) = sent(2);
        table.blame_sent(Blame::Death);
        restart(&mut table);
        let suspect = table.next_to_send();
        assert_eq!(suspect.len(), 1);
        let (held, entry) = table.iter().find(|(slot, _)| *slot != suspect[0]).unwrap();
        assert!(!entry.sent);
        let answer = CompletionEntry { id: entry.id, status: channel::status::OK, len: entry.data_len };
        assert_eq!(
            check(&answer, &table),
            Err(Violation::UnknownId(answer.id)),
            "slot {held}, never sent, was answered"
        );
        let sent = table.get(suspect[0]).unwrap();
        let answer = CompletionEntry { id: sent.id, status: channel::status::OK, len: sent.data_len };
        assert!(check(&answer, &table).is_ok(), "the suspect sent alone is answered");
    }

    #[test]
    fn suspects_are_released_one_at_a_time_then_everything_held() {
        let (mut table, slots) = sent(2);
        table.blame_sent(Blame::Death);
        // A request that arrived after the death: never in a dying driver.
        let (late, _) = table.insert(request(512)).unwrap();
        table.get_mut(late).unwrap().sent = false;
        restart(&mut table);
        assert!(table.serializing());
        let first = table.next_to_send();
        assert_eq!(first.len(), 1);
        assert!(table.next_to_send().is_empty(), "nothing joins a suspect in the driver VM");
        table.remove(first[0]);
        let second = table.next_to_send();
        assert_eq!(second.len(), 1);
        assert_ne!(first, second);
        table.remove(second[0]);
        assert!(!table.serializing());
        assert_eq!(table.next_to_send(), vec![late], "then every held request at once");
        assert!(slots.iter().all(|slot| table.get(*slot).is_none()));
    }

    #[test]
    fn only_requests_in_the_dying_driver_vm_are_blamed() {
        let (mut table, slots) = sent(2);
        table.get_mut(slots[1]).unwrap().sent = false;
        table.blame_sent(Blame::Death);
        assert_eq!(table.get(slots[0]).unwrap().deaths, 1);
        assert_eq!(table.get(slots[1]).unwrap().deaths, 0);
        table.blame_sent(Blame::Death);
        table.blame_sent(Blame::Death);
        assert_eq!(table.get(slots[0]).unwrap().deaths, 1, "held back, it cannot be blamed again");
        assert!(table.take_poisoned(1).iter().map(|(s, _)| *s).eq([slots[0]]));
    }

    #[test]
    fn a_death_that_blames_no_request_only_holds_them_back() {
        let (mut table, slots) = sent(2);
        for _ in 0..10 {
            table.blame_sent(Blame::None);
            assert!(table.take_poisoned(1).is_empty());
            restart(&mut table);
            assert!(!table.serializing(), "no suspect: everything goes at once");
            assert_eq!(table.next_to_send().len(), 2);
        }
        assert!(slots.iter().all(|slot| table.get(*slot).is_some_and(|e| e.deaths == 0)));
    }

    #[test]
    fn slots_are_unique_and_recycled() {
        let mut table = InFlightTable::default();
        let mut ids = Vec::new();
        for _ in 0..channel::BLOCK_SLOTS {
            ids.push(table.insert(request(512)).unwrap());
        }
        assert_eq!(table.insert(request(1024)).unwrap_err().data_len, 1024, "a full table gives the entry back");
        let mut slots: Vec<u32> = ids.iter().map(|(slot, _)| *slot).collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), channel::BLOCK_SLOTS as usize);
        assert!(slots.iter().all(|slot| *slot < channel::BLOCK_SLOTS), "{slots:?}");
        for (slot, id) in &ids {
            assert_eq!(channel::slot_of(*id), *slot);
        }
        let (slot, old_id) = ids[5];
        table.remove(slot).unwrap();
        let (new_slot, new_id) = table.insert(request(512)).unwrap();
        assert_eq!(new_slot, slot);
        assert_ne!(new_id, old_id, "a recycled slot gets a new id");
        let drained = table.drain();
        assert_eq!(drained.len(), channel::BLOCK_SLOTS as usize);
        assert!(drained.windows(2).all(|pair| pair[0].1.id < pair[1].1.id), "oldest first");
        assert!(table.is_empty());
        let (slot, old) = (drained[3].0, drained[3].1.clone());
        assert!(table.insert_at(slot, old.clone()));
        assert!(!table.insert_at(slot, old.clone()), "a slot holds one request");
        let replayed = table.get(slot).unwrap();
        assert_ne!(replayed.id, old.id, "a replayed request gets a new id");
        assert_eq!(channel::slot_of(replayed.id), slot);
    }

    /// Deaths without a report count a quarter each: twelve in a row make
    /// a request poison at a limit of three, as three deaths do.
    #[test]
    fn silent_deaths_count_as_one_death_per_four() {
        let mut table = InFlightTable::with_windows(None);
        let (slot, _) = table.insert(request(512)).unwrap();
        let limit = 3;
        for death in 1..=limit * SILENT_DEATHS_PER_DEATH {
            assert!(table.take_poisoned(limit).is_empty(), "poison after {} silent deaths", death - 1);
            table.get_mut(slot).unwrap().sent = true;
            table.blame_sent(Blame::Silent);
        }
        assert!(table.take_poisoned(limit).iter().map(|(s, _)| *s).eq([slot]));
    }

    /// A driver replaced for abuse at each watch while it withholds a
    /// request has that request counted against, as a death without a
    /// report is: before, such faults blamed nothing, and the request was
    /// replayed about once a second for ever.
    #[test]
    fn abuse_counts_against_a_request_held_as_a_silent_death() {
        let mut table = InFlightTable::with_windows(None);
        let (slot, _) = table.insert(request(512)).unwrap();
        let limit = 3;
        for _ in 0..limit * SILENT_DEATHS_PER_DEATH {
            table.get_mut(slot).unwrap().sent = true;
            table.blame_sent(crate::recovery::Fault::Abuse("device overwork".into()).blame());
        }
        assert!(table.take_poisoned(limit).iter().map(|(s, _)| *s).eq([slot]), "abuse never made it poison");
        assert_eq!(crate::recovery::Fault::Killed.blame(), Blame::None, "an operator's kill blames nothing");
    }
}
