//! The NVMe core (`nvme`) against a controller that answers anything: its
//! registers (CAP, CSTS and every other dword), the Identify data and every
//! completion are the fuzzer's, posted where the core looks next or
//! anywhere in the area. The reflector runs this core itself against a
//! VFIO function (`VfioNvme::start`), so nothing may panic, hang, or touch
//! memory outside the area it was given; a bring-up that succeeds then
//! submits and reaps I/O. Time moves a millisecond a look at the clock, so
//! every wait reaches its deadline within the run.
#![no_main]

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nvme::{Controller, IoCommand, Layout, PAGE};

/// What the fake controller does at each look at the area.
#[derive(Arbitrary, Debug)]
enum Post {
    /// A completion where the core looks next: its id, status and phase.
    Next { cid: u16, status: u16, phase: bool },
    /// Bytes anywhere in the area (Identify data, queue entries, stale
    /// completions).
    Anywhere { offset: u16, bytes: [u8; 16] },
    /// Nothing this time.
    Nothing,
}

#[derive(Arbitrary, Debug)]
struct Input {
    cap: u64,
    /// CSTS at each read, in turn (the last one kept).
    csts: Vec<u32>,
    /// Any other register's reads, in turn.
    reads: Vec<u32>,
    posts: Vec<Post>,
    /// I/O once it is up: (read or write, block, blocks).
    io: Vec<(bool, u32, u8)>,
}

struct Fake {
    area: RefCell<Vec<u8>>,
    cap: u64,
    csts: RefCell<VecDeque<u32>>,
    reads: RefCell<VecDeque<u32>>,
    posts: RefCell<VecDeque<Post>>,
    now: Cell<u64>,
}

impl nvme::Registers for &Fake {
    fn read32(&self, offset: usize) -> u32 {
        match offset {
            0 => self.cap as u32,
            4 => (self.cap >> 32) as u32,
            0x1c => {
                let mut csts = self.csts.borrow_mut();
                if csts.len() > 1 {
                    csts.pop_front().unwrap_or(0)
                } else {
                    csts.front().copied().unwrap_or(1)
                }
            }
            _ => self.reads.borrow_mut().pop_front().unwrap_or(0),
        }
    }

    fn write32(&self, _offset: usize, _value: u32) {}
}

impl nvme::DmaMemory for &Fake {
    fn device_address(&self, offset: usize) -> u64 {
        0x1_0000_0000 + offset as u64
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        let mut area = self.area.borrow_mut();
        let end = offset.checked_add(bytes.len()).expect("a write's end overflows");
        assert!(end <= area.len(), "a write past the area: {offset:#x}+{}", bytes.len());
        area[offset..end].copy_from_slice(bytes);
    }

    fn read(&self, offset: usize, bytes: &mut [u8]) {
        let mut area = self.area.borrow_mut();
        let end = offset.checked_add(bytes.len()).expect("a read's end overflows");
        assert!(end <= area.len(), "a read past the area: {offset:#x}+{}", bytes.len());
        match self.posts.borrow_mut().pop_front() {
            Some(Post::Next { cid, status, phase }) if bytes.len() == 16 => {
                let dw3 = u32::from(cid) | (u32::from(phase) << 16) | (u32::from(status) << 17);
                area[offset + 12..offset + 16].copy_from_slice(&dw3.to_le_bytes());
            }
            Some(Post::Anywhere { offset: at, bytes: posted }) => {
                let at = usize::from(at) % (area.len() - 16);
                area[at..at + 16].copy_from_slice(&posted);
            }
            _ => {}
        }
        bytes.copy_from_slice(&area[offset..end]);
    }
}

impl nvme::Clock for &Fake {
    fn now_us(&self) -> u64 {
        self.now.set(self.now.get() + 1000);
        self.now.get()
    }
}

fuzz_target!(|input: Input| {
    let fake = Fake {
        area: RefCell::new(vec![0; Layout::AREA]),
        cap: input.cap,
        csts: RefCell::new(input.csts.into_iter().take(64).collect()),
        reads: RefCell::new(input.reads.into_iter().take(64).collect()),
        posts: RefCell::new(input.posts.into_iter().take(4096).collect()),
        now: Cell::new(0),
    };
    let Ok(mut controller) = Controller::start(&fake, &fake, &fake, Layout::at(0)) else { return };
    let namespace = controller.namespace();
    // A namespace whose bytes do not fit u64 is refused (`Error::Format`).
    let shifted = 1u64.checked_shl(namespace.block_shift).and_then(|block| namespace.blocks.checked_mul(block));
    assert!(shifted.is_some(), "a namespace of more than 2^64 bytes was accepted: {namespace:?}");
    for (cid, (write, block, blocks)) in (0u16..).zip(input.io.into_iter().take(64)) {
        let (offset, len) = (u64::from(block) * 512, u32::from(blocks) * 512);
        let buffer = PAGE;
        let command =
            if write { IoCommand::Write { offset, len, buffer } } else { IoCommand::Read { offset, len, buffer } };
        let _ = controller.submit(cid, command);
        controller.ring();
        controller.reap(|_, _| {});
    }
});
