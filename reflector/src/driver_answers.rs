//! The one place that judges what a driver VM answers. A driver is
//! untrusted (DESIGN.md, invariant 2): a completion with an unknown or
//! already-completed id, an invalid status, a length that does not match the
//! request (block), a received frame of impossible length (net), or ring
//! indices out of range is a protocol violation, and the driver VM is
//! treated as faulty.

use guest_abi::channel::{self, CompletionEntry};
use guest_abi::nic::{MAX_FRAME, MIN_FRAME};

use crate::blk::inflight::InFlightTable;
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
}
