//! The wire: a learning Ethernet switch joining the simulated NICs (and
//! optionally a TAP device) that name the same switch. It learns which port
//! each source MAC lives behind and floods frames for unknown, broadcast and
//! multicast destinations to every other port.
//!
//! Port security: a card's port is attached with the card's MAC, which is
//! then pinned to it. Frames from that port with any other source address
//! are dropped, and no port can claim (by sending with it) an address
//! pinned to another: a driver cannot spoof another device's MAC to steal
//! its frames. Ports without an address (a TAP device: the host has many)
//! learn as usual, but cannot claim a pinned address either. Dropped frames
//! are counted (`spoofed`).
//!
//! A unicast frame to an address the switch does not know goes only to the
//! ports that learn (a TAP device's): every card's address is pinned, so it
//! cannot be behind another card, and flooding it to the cards would show
//! one tenant's frames to the others whenever the table forgot a host's
//! address (a flood of made-up source addresses from the TAP's side empties
//! it, [`MAX_LEARNED`]).
//!
//! Storm control: the frames a port floods (broadcast, multicast, unknown
//! destinations) are limited to [`FLOOD_RATE`] a second, in bursts of
//! [`FLOOD_BURST`]; the rest are dropped and counted (`storm_dropped`). A
//! driver flooding broadcasts would otherwise fill every other port's
//! queue, so that their own frames were dropped, on CPU charged to no one
//! (delivery runs on the sender's device thread, in the reflector).
//!
//! Frames are delivered synchronously on the sender's thread, never while
//! the switch's own lock is held, so a port may transmit from inside its
//! receive path without deadlocking.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// Most MAC addresses remembered; the table starts over when it is full (a
/// flood of made-up source addresses must not grow the reflector's memory).
const MAX_LEARNED: usize = 4096;

/// Frames a second a port may flood. A VM's own broadcasts and multicasts
/// (ARP, neighbour discovery, DHCP, mDNS) are a few a second; the whole
/// switch moves about 0.4 M frames a second here (README), so a port
/// flooding at its own rate would take that from every other.
pub const FLOOD_RATE: u64 = 10_000;

/// Frames a port may flood at once, above [`FLOOD_RATE`].
pub const FLOOD_BURST: u64 = 1_000;

/// One port's allowance of flooded frames (a token bucket).
struct FloodAllowance {
    /// Frames it may flood now, in millionths of a frame.
    tokens: u64,
    last: std::time::Instant,
}

impl FloodAllowance {
    const SCALE: u64 = 1_000_000;

    fn new() -> Self {
        FloodAllowance { tokens: FLOOD_BURST * Self::SCALE, last: std::time::Instant::now() }
    }

    /// Whether one more frame may be flooded now (taken if so).
    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let earned = now.saturating_duration_since(self.last).as_micros() as u64 * FLOOD_RATE;
        self.last = now;
        self.tokens = self.tokens.saturating_add(earned).min(FLOOD_BURST * Self::SCALE);
        match self.tokens.checked_sub(Self::SCALE) {
            Some(left) => {
                self.tokens = left;
                true
            }
            None => false,
        }
    }
}

/// Something attached to a switch port.
pub trait SwitchPort: Send + Sync {
    /// Takes one frame from the wire. Must not block for long: it runs on
    /// the sender's thread.
    fn receive(&self, frame: &[u8]);
}

/// An Ethernet address.
pub type Mac = [u8; 6];

/// A port's number on its switch.
pub type PortId = u32;

/// A learning switch.
pub struct Switch {
    name: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_id: PortId,
    /// Each port with the address pinned to it, if any.
    ports: Vec<(PortId, Weak<dyn SwitchPort>, Option<Mac>)>,
    /// Addresses pinned to card ports: never learned, never moved.
    pinned: HashMap<[u8; 6], PortId>,
    learned: HashMap<[u8; 6], PortId>,
    spoofed: u64,
    /// Each port's allowance of flooded frames.
    floods: HashMap<PortId, FloodAllowance>,
    storm_dropped: u64,
}

impl Switch {
    /// A switch with no ports.
    pub fn new(name: &str) -> Arc<Switch> {
        Arc::new(Switch { name: name.to_owned(), state: Mutex::new(State::default()) })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connects `port`; it stays connected until [`Switch::detach`] or until
    /// it is dropped. With `mac`, the port may only send from that (unicast)
    /// address, which is pinned to it; another port may not have it.
    pub fn attach(&self, port: Weak<dyn SwitchPort>, mac: Option<[u8; 6]>) -> Result<PortId, String> {
        let mut state = self.lock();
        if let Some(mac) = mac {
            if is_multicast(&mac) {
                return Err(format!("switch {}: {} is a group address, not a port's", self.name, format_mac(&mac)));
            }
            if state.pinned.contains_key(&mac) {
                return Err(format!("switch {}: another port has address {}", self.name, format_mac(&mac)));
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        state.ports.push((id, port, mac));
        if let Some(mac) = mac {
            state.pinned.insert(mac, id);
            state.learned.remove(&mac);
        }
        Ok(id)
    }

    /// Disconnects a port and forgets the addresses learned behind it.
    pub fn detach(&self, id: PortId) {
        let mut state = self.lock();
        state.ports.retain(|(port, _, _)| *port != id);
        state.pinned.retain(|_, port| *port != id);
        state.learned.retain(|_, port| *port != id);
        state.floods.remove(&id);
    }

    /// Frames dropped because their source address was not their port's.
    pub fn spoofed(&self) -> u64 {
        self.lock().spoofed
    }

    /// Frames dropped because their port flooded more than its allowance.
    pub fn storm_dropped(&self) -> u64 {
        self.lock().storm_dropped
    }

    /// Carries `frame`, sent by port `from`, to its destination port(s).
    /// Frames too short to hold an Ethernet header are dropped.
    pub fn forward(&self, from: PortId, frame: &[u8]) {
        let Some((destination, source)) = addresses(frame) else { return };
        let targets: Vec<Arc<dyn SwitchPort>> = {
            let mut state = self.lock();
            let own = state.ports.iter().find(|(id, _, _)| *id == from).and_then(|(_, _, mac)| *mac);
            let spoofed = match own {
                Some(mac) => source != mac,
                None => is_multicast(&source) || state.pinned.get(&source).is_some_and(|owner| *owner != from),
            };
            if spoofed {
                state.spoofed += 1;
                return;
            }
            if own.is_none() {
                if state.learned.len() >= MAX_LEARNED && !state.learned.contains_key(&source) {
                    state.learned.clear();
                }
                state.learned.insert(source, from);
            }
            let group = is_multicast(&destination);
            let known = if group {
                None
            } else {
                state.pinned.get(&destination).or_else(|| state.learned.get(&destination)).copied()
            };
            let targets: Vec<Arc<dyn SwitchPort>> = state
                .ports
                .iter()
                .filter(|(id, _, pinned)| {
                    *id != from
                        && match known {
                            Some(target) => target == *id,
                            None => group || pinned.is_none(),
                        }
                })
                .filter_map(|(_, port, _)| port.upgrade())
                .collect();
            if known.is_none()
                && targets.len() > 1
                && !state.floods.entry(from).or_insert_with(FloodAllowance::new).take()
            {
                state.storm_dropped += 1;
                return;
            }
            targets
        };
        for target in targets {
            target.receive(frame);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Destination and source MAC of a frame.
fn addresses(frame: &[u8]) -> Option<([u8; 6], [u8; 6])> {
    let destination = frame.get(0..6)?.try_into().ok()?;
    let source = frame.get(6..12)?.try_into().ok()?;
    frame.get(12..14)?;
    Some((destination, source))
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Group addresses (broadcast included) have the low bit of the first octet set.
fn is_multicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 != 0
}

/// The switches of one reflector, by name.
#[derive(Default)]
pub struct Switches {
    by_name: Mutex<HashMap<String, Arc<Switch>>>,
}

impl Switches {
    /// The switch called `name`, created on first use.
    pub fn get(&self, name: &str) -> Arc<Switch> {
        let mut switches = self.by_name.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        switches.entry(name.to_owned()).or_insert_with(|| Switch::new(name)).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Vec<u8>>>);

    impl SwitchPort for Recorder {
        fn receive(&self, frame: &[u8]) {
            self.0.lock().unwrap().push(frame.to_vec());
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<Vec<u8>> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    fn frame(destination: u8, source: u8) -> Vec<u8> {
        let mut frame = vec![0u8; 60];
        frame[0..6].copy_from_slice(&[2, 0, 0, 0, 0, destination]);
        frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, source]);
        frame
    }

    fn rig() -> (Arc<Switch>, Vec<(PortId, Arc<Recorder>)>) {
        let switch = Switch::new("test");
        let ports = (0..3)
            .map(|_| {
                let port = Arc::new(Recorder::default());
                let weak: Weak<dyn SwitchPort> = Arc::downgrade(&(port.clone() as Arc<dyn SwitchPort>));
                (switch.attach(weak, None).unwrap(), port)
            })
            .collect();
        (switch, ports)
    }

    /// A port flooding broadcasts as fast as it can: the others get its
    /// burst and its rate, not all of it, and still get each other's
    /// frames (before, all 10,000 went to every port).
    #[test]
    fn a_port_flooding_broadcasts_is_held_to_its_allowance() {
        let (switch, ports) = rig();
        let mut broadcast = frame(0, 1);
        broadcast[0..6].copy_from_slice(&[0xff; 6]);
        let started = std::time::Instant::now();
        for _ in 0..10_000 {
            switch.forward(ports[0].0, &broadcast);
        }
        let allowed = FLOOD_BURST + started.elapsed().as_micros() as u64 * FLOOD_RATE / 1_000_000 + 1;
        let received = ports[1].1.take().len() as u64;
        assert!(received <= allowed, "{received} flooded frames reached a port, {allowed} allowed");
        assert_eq!(switch.storm_dropped(), 10_000 - received);
        assert_eq!(ports[2].1.take().len() as u64, received);
        // Another port's floods still go through: the allowance is each
        // port's own.
        switch.forward(ports[2].0, &frame(9, 3));
        assert_eq!(ports[1].1.take().len(), 1, "a quiet port's frame was dropped");
    }

    #[test]
    fn unknown_destinations_flood_then_learned_ones_go_to_one_port() {
        let (switch, ports) = rig();
        let (a, b, c) = (&ports[0], &ports[1], &ports[2]);
        switch.forward(a.0, &frame(0xb, 0xa));
        assert_eq!(a.1.take().len(), 0, "never back to the sender");
        assert_eq!(b.1.take().len(), 1);
        assert_eq!(c.1.take().len(), 1);
        // b answers a: a's address was learned, so only a gets it.
        switch.forward(b.0, &frame(0xa, 0xb));
        assert_eq!((a.1.take().len(), c.1.take().len()), (1, 0));
        // Now b is known too.
        switch.forward(a.0, &frame(0xb, 0xa));
        assert_eq!((b.1.take().len(), c.1.take().len()), (1, 0));
    }

    #[test]
    fn broadcast_floods_runts_are_dropped_and_detached_ports_are_forgotten() {
        let (switch, ports) = rig();
        let mut broadcast = frame(0, 0xa);
        broadcast[0..6].copy_from_slice(&[0xff; 6]);
        switch.forward(ports[0].0, &broadcast);
        assert_eq!((ports[1].1.take().len(), ports[2].1.take().len()), (1, 1));
        switch.forward(ports[0].0, &broadcast[..13]);
        assert!(ports[1].1.take().is_empty());
        switch.forward(ports[1].0, &frame(0xa, 0xb));
        switch.detach(ports[0].0);
        switch.forward(ports[1].0, &frame(0xa, 0xb));
        assert!(ports[0].1.take().len() == 1, "only the frame before the detach");
        assert_eq!(ports[2].1.take().len(), 1, "a forgotten address floods again");
    }

    #[test]
    fn a_flood_of_source_addresses_is_bounded() {
        let (switch, ports) = rig();
        for i in 0..(MAX_LEARNED as u32 + 10) {
            let mut f = frame(0xb, 0);
            f[8..12].copy_from_slice(&i.to_be_bytes());
            switch.forward(ports[0].0, &f);
        }
        assert!(switch.lock().learned.len() <= MAX_LEARNED);
    }

    /// A card's frame to a host address the switch forgot (a flood of
    /// made-up source addresses through the TAP emptied its table) goes to
    /// the TAP alone: before, it was flooded to every card, and another
    /// tenant's driver saw it.
    #[test]
    fn a_frame_to_a_forgotten_host_address_reaches_no_other_card() {
        let switch = Switch::new("forgetful");
        let (a, b) = (card(&switch, 0xa), card(&switch, 0xb));
        let tap = {
            let port = Arc::new(Recorder::default());
            let weak: Weak<dyn SwitchPort> = Arc::downgrade(&(port.clone() as Arc<dyn SwitchPort>));
            (switch.attach(weak, None).unwrap(), port)
        };
        switch.forward(tap.0, &frame(0xa, 0x77));
        for i in 0..MAX_LEARNED as u32 {
            let mut churn = frame(0xa, 0);
            churn[8..12].copy_from_slice(&(i + 0x100).to_be_bytes());
            switch.forward(tap.0, &churn);
        }
        assert!(!switch.lock().learned.contains_key(&[2, 0, 0, 0, 0, 0x77]), "the table did not forget");
        a.1.take();
        switch.forward(a.0, &frame(0x77, 0xa));
        assert_eq!(tap.1.take().len(), 1, "the host lost the frame");
        assert!(b.1.take().is_empty(), "another card got a frame to a host address");
        // Broadcasts still reach every other port.
        let mut broadcast = frame(0, 0xa);
        broadcast[0..6].copy_from_slice(&[0xff; 6]);
        switch.forward(a.0, &broadcast);
        assert_eq!((b.1.take().len(), tap.1.take().len()), (1, 1));
    }

    fn card(switch: &Switch, mac: u8) -> (PortId, Arc<Recorder>) {
        let port = Arc::new(Recorder::default());
        let weak: Weak<dyn SwitchPort> = Arc::downgrade(&(port.clone() as Arc<dyn SwitchPort>));
        (switch.attach(weak, Some([2, 0, 0, 0, 0, mac])).unwrap(), port)
    }

    #[test]
    fn a_card_cannot_send_with_another_cards_address_or_steal_its_frames() {
        let switch = Switch::new("secure");
        let (a, b, c) = (card(&switch, 0xa), card(&switch, 0xb), card(&switch, 0xc));
        let host = {
            let port = Arc::new(Recorder::default());
            let weak: Weak<dyn SwitchPort> = Arc::downgrade(&(port.clone() as Arc<dyn SwitchPort>));
            (switch.attach(weak, None).unwrap(), port)
        };
        // c claims to be b: dropped, and b's frames still go to b only.
        switch.forward(c.0, &frame(0xa, 0xb));
        assert!(a.1.take().is_empty() && host.1.take().is_empty());
        switch.forward(a.0, &frame(0xb, 0xa));
        assert_eq!((b.1.take().len(), c.1.take().len(), host.1.take().len()), (1, 0, 0));
        // The host port (no pinned address) cannot claim a card's address either.
        switch.forward(host.0, &frame(0xa, 0xb));
        assert!(a.1.take().is_empty());
        // But it learns its own addresses.
        switch.forward(host.0, &frame(0xa, 0x77));
        assert_eq!(a.1.take().len(), 1);
        switch.forward(a.0, &frame(0x77, 0xa));
        assert_eq!((host.1.take().len(), b.1.take().len()), (1, 0));
        assert_eq!(switch.spoofed(), 2);
        // A second port with a pinned address is refused.
        let port = Arc::new(Recorder::default());
        let weak: Weak<dyn SwitchPort> = Arc::downgrade(&(port as Arc<dyn SwitchPort>));
        assert!(switch.attach(weak.clone(), Some([2, 0, 0, 0, 0, 0xa])).is_err());
        assert!(switch.attach(weak, Some([0xff; 6])).is_err());
    }
}
