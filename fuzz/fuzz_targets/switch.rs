//! The learning switch with port security: ports attach (some with pinned
//! addresses) and detach, and send frames of any content. Nothing may
//! panic; a frame never returns to its sender; a pinned port's frames come
//! only from its own address.
#![no_main]

use std::sync::{Arc, Mutex, Weak};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use reflector::hw::switch::{PortId, Switch, SwitchPort};

#[derive(Arbitrary, Debug)]
enum Step {
    Attach { pinned: Option<u8> },
    Detach(u8),
    Send { port: u8, destination: u8, source: u8, broadcast: bool, rest: Vec<u8> },
    Raw { port: u8, frame: Vec<u8> },
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Vec<u8>>>);

impl SwitchPort for Recorder {
    fn receive(&self, frame: &[u8]) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(frame.to_vec());
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let switch = Switch::new("fuzz");
    let mut ports: Vec<(PortId, Arc<Recorder>, Option<[u8; 6]>)> = Vec::new();
    for step in steps.into_iter().take(512) {
        match step {
            Step::Attach { pinned } => {
                let port = Arc::new(Recorder::default());
                let weak: Weak<dyn SwitchPort> = Arc::downgrade(&(port.clone() as Arc<dyn SwitchPort>));
                let mac = pinned.map(|m| [2, 0, 0, 0, 0, m]);
                if let Ok(id) = switch.attach(weak, mac) {
                    ports.push((id, port, mac));
                }
            }
            Step::Detach(index) if !ports.is_empty() => {
                let (id, _, _) = ports.remove(usize::from(index) % ports.len());
                switch.detach(id);
            }
            Step::Detach(_) => {}
            Step::Send { port, destination, source, broadcast, rest } if !ports.is_empty() => {
                let mut frame = if broadcast { vec![0xff; 6] } else { vec![2, 0, 0, 0, 0, destination] };
                frame.extend([2, 0, 0, 0, 0, source]);
                frame.extend(rest);
                let from = ports[usize::from(port) % ports.len()].0;
                switch.forward(from, &frame);
            }
            Step::Raw { port, frame } if !ports.is_empty() => {
                let from = ports[usize::from(port) % ports.len()].0;
                switch.forward(from, &frame);
            }
            _ => {}
        }
        for (_, recorder, _) in &ports {
            recorder.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }
    let _ = switch.spoofed();
});
