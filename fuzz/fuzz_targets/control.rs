//! The control socket's protocol: any request line against two devices.
//! Nothing may panic; every answer is one response, as JSON.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use reflector::control::{self, ControlTarget};
use reflector::metrics::Metrics;
use reflector::shm::SharedMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

static TARGETS: OnceLock<Vec<ControlTarget>> = OnceLock::new();

fuzz_target!(|line: &str| {
    let targets = TARGETS.get_or_init(|| {
        ["d0", "n0"]
            .iter()
            .zip(["blk", "net"])
            .map(|(name, kind)| ControlTarget {
                kind,
                name: (*name).into(),
                metrics: Arc::new(Metrics::default()),
                channel: Arc::new(SharedMemory::new("fuzz", guest_abi::channel::REGION_SIZE).expect("a channel")),
                recover: EventFd::new(EFD_NONBLOCK).expect("an eventfd"),
                kill: EventFd::new(EFD_NONBLOCK).expect("an eventfd"),
            })
            .collect()
    });
    let answer = control::answer(targets, line);
    assert!(serde_json::from_str::<control::Response>(&answer).is_ok(), "not a response: {answer}");
    for target in targets {
        let _ = target.kill.read();
        let _ = target.recover.read();
    }
});
