//! The net device's bounce slots: a fixed share receives (posted to the
//! driver as empty buffers, then held with a frame until the client has
//! room for it), the rest transmits (one frame each until the driver
//! completes it). Each use of a slot gets a new request id, so an answer
//! about an earlier use (or an earlier driver VM) never matches.

use guest_abi::channel::{self, CompletionEntry, SLOT_COUNT};
use guest_abi::nic::{MAX_FRAME, MIN_FRAME};

use crate::driver_answers::{self, Expected, Length, Violation};

/// What a net completion means once judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetAnswer {
    /// A frame was sent (or failed to be: `sent` false).
    Sent {
        /// Slot.
        slot: u32,
        /// Whether the card sent it.
        sent: bool,
    },
    /// A frame was received into `slot` (None: the receive failed).
    Received {
        /// Slot.
        slot: u32,
        /// Frame length.
        len: Option<u32>,
    },
}

/// Judges one completion against the slots (`driver_answers::judge`): a
/// frame sent must be answered with its length, a frame received must have
/// a possible length, and only a slot the driver holds can be answered.
pub fn check_net(completion: &CompletionEntry, slots: &NetSlots) -> Result<NetAnswer, Violation> {
    let state = |slot| slots.get(slot).map(|(state, _)| state);
    let answer = driver_answers::judge(completion, |slot| {
        let (state, id) = slots.get(slot)?;
        let length = match state {
            SlotState::TxSending(len) => Length::Exactly(len),
            SlotState::RxPosted => Length::Within { min: MIN_FRAME, max: MAX_FRAME },
            SlotState::Idle | SlotState::RxHeld(_) | SlotState::RxCooling => return None,
        };
        Some(Expected { id, length, may_be_unsupported: false })
    })?;
    let ok = answer.status == channel::status::OK;
    Ok(match state(answer.slot) {
        Some(SlotState::TxSending(_)) => NetAnswer::Sent { slot: answer.slot, sent: ok },
        _ => NetAnswer::Received { slot: answer.slot, len: ok.then_some(answer.len) },
    })
}

/// Slots used for receiving: half, so that a burst in one direction never
/// starves the other.
pub const RX_SLOTS: u32 = SLOT_COUNT / 2;

/// What a slot is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Not with the driver (a free TX slot; an RX slot between driver VMs).
    Idle,
    /// An empty receive buffer the driver holds.
    RxPosted,
    /// A received frame of this length, waiting for client buffers.
    RxHeld(u32),
    /// A frame of this length the driver is sending.
    TxSending(u32),
    /// A receive buffer the driver answered with an error: posted again
    /// only at the next watch period ([`NetSlots::warm`]), so that a driver
    /// answering every buffer with an error at once cannot keep the worker
    /// re-posting them, a host core outside its quota.
    RxCooling,
}

/// The slot table.
pub struct NetSlots {
    ids: Vec<u64>,
    states: Vec<SlotState>,
    free_tx: Vec<u32>,
    /// When each TX slot was last given a frame to send.
    tx_started: Vec<Option<std::time::Instant>>,
}

impl Default for NetSlots {
    fn default() -> Self {
        NetSlots {
            ids: (0..u64::from(SLOT_COUNT)).collect(),
            states: vec![SlotState::Idle; SLOT_COUNT as usize],
            free_tx: (RX_SLOTS..SLOT_COUNT).rev().collect(),
            tx_started: vec![None; SLOT_COUNT as usize],
        }
    }
}

impl NetSlots {
    /// State and current id of `slot`.
    pub fn get(&self, slot: u32) -> Option<(SlotState, u64)> {
        Some((*self.states.get(slot as usize)?, *self.ids.get(slot as usize)?))
    }

    fn next_id(&mut self, slot: u32) -> u64 {
        let id = &mut self.ids[slot as usize];
        *id = id.wrapping_add(u64::from(SLOT_COUNT));
        *id
    }

    /// Whether a TX slot is free.
    pub fn tx_available(&self) -> bool {
        !self.free_tx.is_empty()
    }

    /// Takes a free TX slot for a frame of `len` bytes: (slot, id).
    pub fn start_tx(&mut self, len: u32) -> Option<(u32, u64)> {
        let slot = self.free_tx.pop()?;
        self.states[slot as usize] = SlotState::TxSending(len);
        self.tx_started[slot as usize] = Some(std::time::Instant::now());
        Some((slot, self.next_id(slot)))
    }

    /// The idle RX slots, to post: marks them posted and returns (slot, id).
    pub fn post_idle_rx(&mut self) -> Vec<(u32, u64)> {
        (0..RX_SLOTS)
            .filter(|&slot| self.states[slot as usize] == SlotState::Idle)
            .collect::<Vec<_>>()
            .into_iter()
            .map(|slot| {
                self.states[slot as usize] = SlotState::RxPosted;
                (slot, self.next_id(slot))
            })
            .collect()
    }

    /// A posted RX slot now holds a frame.
    pub fn hold(&mut self, slot: u32, len: u32) {
        self.states[slot as usize] = SlotState::RxHeld(len);
    }

    /// Frees a slot: a TX slot becomes available, an RX slot idle (to be
    /// posted again).
    pub fn release(&mut self, slot: u32) {
        let Some(state) = self.states.get_mut(slot as usize) else { return };
        let was = std::mem::replace(state, SlotState::Idle);
        if slot >= RX_SLOTS && was != SlotState::Idle {
            self.free_tx.push(slot);
        }
    }

    /// A posted RX slot the driver answered with an error cools until the
    /// next [`NetSlots::warm`].
    pub fn cool(&mut self, slot: u32) {
        if slot < RX_SLOTS {
            self.states[slot as usize] = SlotState::RxCooling;
        }
    }

    /// Cooling RX slots become idle, to be posted again; how many.
    pub fn warm(&mut self) -> usize {
        let cooling = self.states.iter_mut().filter(|state| **state == SlotState::RxCooling);
        cooling.map(|state| *state = SlotState::Idle).count()
    }

    /// The driver VM is gone: every slot it held is released (held frames
    /// stay). Returns the number of frames that were being sent (lost).
    pub fn driver_gone(&mut self) -> u64 {
        let mut lost = 0;
        for slot in 0..SLOT_COUNT {
            match self.states[slot as usize] {
                SlotState::TxSending(_) => {
                    lost += 1;
                    self.release(slot);
                }
                SlotState::RxPosted => self.release(slot),
                _ => {}
            }
        }
        lost
    }

    /// When the frame that has been sending longest was given its slot.
    pub fn oldest_tx(&self) -> Option<std::time::Instant> {
        let sending = |slot: &usize| matches!(self.states[*slot], SlotState::TxSending(_));
        (0..SLOT_COUNT as usize).filter(sending).filter_map(|slot| self.tx_started[slot]).min()
    }

    /// Slots the driver holds (TX being sent).
    pub fn tx_in_flight(&self) -> usize {
        (SLOT_COUNT - RX_SLOTS) as usize - self.free_tx.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let unsupported = CompletionEntry { status: channel::status::UNSUPPORTED, ..failed };
        assert!(matches!(check_net(&unsupported, &slots), Err(Violation::BadStatus { .. })));
        let stale = tx_id.wrapping_sub(u64::from(channel::SLOT_COUNT));
        assert_eq!(check_net(&ok(stale, 60), &slots), Err(Violation::UnknownId(stale)));
        slots.hold(rx_slot, 100);
        assert_eq!(check_net(&ok(rx_id, 100), &slots), Err(Violation::UnknownId(rx_id)), "answered twice");
        let idle = CompletionEntry { id: u64::from(channel::SLOT_COUNT) - 1, ..failed };
        assert!(check_net(&idle, &slots).is_err());
    }
    use guest_abi::channel::slot_of;

    #[test]
    fn ids_change_with_every_use_and_tx_slots_run_out() {
        let mut slots = NetSlots::default();
        let posted = slots.post_idle_rx();
        assert_eq!(posted.len(), RX_SLOTS as usize);
        assert!(posted.iter().all(|&(slot, id)| slot_of(id) == slot && slot < RX_SLOTS));
        assert!(slots.post_idle_rx().is_empty(), "posted slots are not posted twice");
        let mut taken = Vec::new();
        while let Some((slot, id)) = slots.start_tx(60) {
            assert!(slot >= RX_SLOTS && slot_of(id) == slot);
            taken.push((slot, id));
        }
        assert_eq!(taken.len(), (SLOT_COUNT - RX_SLOTS) as usize);
        assert!(!slots.tx_available());
        let (slot, id) = taken[0];
        slots.release(slot);
        let (again, new_id) = slots.start_tx(60).unwrap();
        assert_eq!(again, slot);
        assert_ne!(new_id, id);
    }

    #[test]
    fn a_dead_driver_loses_its_sends_and_returns_its_buffers() {
        let mut slots = NetSlots::default();
        slots.post_idle_rx();
        slots.hold(3, 100);
        slots.start_tx(60);
        slots.start_tx(70);
        assert_eq!(slots.driver_gone(), 2);
        assert_eq!(slots.tx_in_flight(), 0);
        assert_eq!(slots.get(3).unwrap().0, SlotState::RxHeld(100), "received frames survive");
        assert_eq!(slots.post_idle_rx().len(), RX_SLOTS as usize - 1);
    }
}
