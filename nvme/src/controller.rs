//! Bringing a controller up (reset, admin queue, Identify, the I/O queue
//! pair) and moving I/O through it.

use crate::command::{admin, io, Submission};
use crate::queue::{QueuePair, CQ_ENTRY, SQ_ENTRY};
use crate::regs::{self, Capabilities};
use crate::{Clock, DmaMemory, Error, Registers, PAGE};

/// The namespace block size the driver serves (2^9: 512 bytes, a
/// virtio-blk sector).
const SECTOR_SHIFT: u32 = 9;
/// Entries of the admin queues.
const ADMIN_DEPTH: u16 = 32;
/// Entries of the I/O queues: room for [`MAX_COMMANDS`] outstanding
/// commands (a queue keeps one entry empty), in three pages.
const IO_DEPTH: u16 = 192;
/// Most I/O commands outstanding at once; their ids are `0..MAX_COMMANDS`.
pub const MAX_COMMANDS: u16 = 128;
/// Bytes of PRP list per command: 32 entries, so with PRP1 a command moves
/// up to 33 pages (128 KiB from a page-aligned buffer, the reflector's
/// largest request).
const PRP_LIST: usize = 256;
/// Command id of an admin command (a burst of them takes the next ids).
const ADMIN_CID: u16 = 0;
/// How often the wait for an admin command reads CSTS for a fatal status.
/// The completion itself is polled in memory, which costs nothing, while
/// a register read is a trapped exit and, on QEMU's model, a qtest round
/// trip (about 0.2 ms under kvm-pvm); read on every turn of the wait,
/// as before, CSTS made up a fifth of a failover's bring-up.
const FATAL_CHECK_US: u64 = 1000;

/// Where the driver's queues live in the device area (offsets from its
/// start; 16 pages in all): page 0 the admin submission queue, 1 the admin
/// completion queue (each page aligned, as ASQ and ACQ require), 2 the
/// Identify data and, once identified, the EventIdx buffer, 3 the I/O
/// completion queue, 4-6 the I/O submission queue, 7 the shadow doorbells
/// (where the I/O queue's indices are written before each doorbell, even
/// when the controller does not read them there: a trapped window's posted
/// doorbells take their values from that page), 8-15 the PRP lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    admin_sq: usize,
    admin_cq: usize,
    identify: usize,
    events: usize,
    io_cq: usize,
    io_sq: usize,
    doorbells: usize,
    prp_lists: usize,
}

impl Layout {
    /// Bytes of DMA memory the driver needs for its queues.
    pub const AREA: usize = 16 * PAGE;

    /// The layout of an area starting at DMA offset `base` (page aligned).
    pub const fn at(base: usize) -> Layout {
        Layout {
            admin_sq: base,
            admin_cq: base + PAGE,
            identify: base + 2 * PAGE,
            events: base + 2 * PAGE,
            io_cq: base + 3 * PAGE,
            io_sq: base + 4 * PAGE,
            doorbells: base + 7 * PAGE,
            prp_lists: base + 8 * PAGE,
        }
    }

    /// The DMA offset of the shadow doorbell page.
    pub const fn doorbells(&self) -> usize {
        self.doorbells
    }
}

// The queues fit their pages.
const _: () = assert!(ADMIN_DEPTH as usize * SQ_ENTRY <= PAGE && IO_DEPTH as usize * CQ_ENTRY <= PAGE);
const _: () = assert!(IO_DEPTH as usize * SQ_ENTRY <= 3 * PAGE && MAX_COMMANDS as usize * PRP_LIST <= 8 * PAGE);
const _: () = assert!(MAX_COMMANDS < IO_DEPTH);

/// Namespace 1 as Identify describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Size in logical blocks (NSZE).
    pub blocks: u64,
    /// log2 of the logical block size.
    pub block_shift: u32,
}

impl Namespace {
    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        // Identify's blocks are checked to fit (`Error::Format`).
        self.blocks.saturating_mul(1u64.checked_shl(self.block_shift).unwrap_or(u64::MAX))
    }
}

/// An I/O command as the driver asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoCommand {
    /// Read `len` bytes at byte `offset` of the namespace into DMA memory
    /// at `buffer`.
    Read {
        /// Byte offset in the namespace (block aligned).
        offset: u64,
        /// Bytes (whole blocks).
        len: u32,
        /// DMA offset of the data (page aligned).
        buffer: usize,
    },
    /// Write `len` bytes from DMA memory at `buffer` to byte `offset`.
    Write {
        /// Byte offset in the namespace (block aligned).
        offset: u64,
        /// Bytes (whole blocks).
        len: u32,
        /// DMA offset of the data (page aligned).
        buffer: usize,
    },
    /// Make completed writes durable.
    Flush,
}

/// An enabled controller with one I/O queue pair.
pub struct Controller<R, M, C> {
    registers: R,
    memory: M,
    clock: C,
    layout: Layout,
    caps: Capabilities,
    admin: QueuePair,
    io: QueuePair,
    namespace: Namespace,
    /// Largest transfer (MDTS), in bytes.
    max_transfer: u32,
    /// A volatile write cache is present (flushes matter).
    write_cache: bool,
    /// The controller offers the shadow doorbell buffer (OACS bit 8).
    shadow_doorbells: bool,
}

impl<R: Registers, M: DmaMemory, C: Clock> Controller<R, M, C> {
    /// Resets the controller whatever state a previous driver left it in,
    /// and brings it up with its queues in the area `layout` describes.
    pub fn start(registers: R, memory: M, clock: C, layout: Layout) -> Result<Self, Error> {
        let cap = u64::from(registers.read32(regs::CAP)) | (u64::from(registers.read32(regs::CAP + 4)) << 32);
        let caps = Capabilities::decode(cap);
        // The doorbell mirror and the EventIdx entries of queues 0 and 1
        // are four strides a page: a larger stride (CAP.DSTRD past 8) put
        // them past their pages, over the queues the bring-up writes next
        // (a review found it). Controllers here use 4 bytes (DSTRD 0).
        let strides_fit = caps.doorbell_stride * 4 <= PAGE;
        if !caps.nvm || caps.min_page > PAGE || caps.max_queue_entries < u32::from(IO_DEPTH) || !strides_fit {
            return Err(Error::Unsupported);
        }
        let mut io = QueuePair::new(1, IO_DEPTH, layout.io_sq, layout.io_cq, caps.doorbell_stride);
        io.use_mirror(layout.doorbells);
        let mut controller = Controller {
            admin: QueuePair::new(0, ADMIN_DEPTH, layout.admin_sq, layout.admin_cq, caps.doorbell_stride),
            io,
            registers,
            memory,
            clock,
            layout,
            caps,
            namespace: Namespace { blocks: 0, block_shift: 9 },
            max_transfer: u32::MAX,
            write_cache: false,
            shadow_doorbells: false,
        };
        controller.reset()?;
        controller.identify()?;
        if controller.shadow_doorbells {
            controller.configure_shadow_doorbells()?;
        }
        controller.create_io_queues()?;
        // The admin completions taken, handed back in one write.
        controller.admin.release_taken(&controller.registers, &controller.memory);
        Ok(controller)
    }

    /// Disables the controller (aborting whatever it held), clears the
    /// queues, and enables it with the admin queue.
    fn reset(&mut self) -> Result<(), Error> {
        self.registers.write32(regs::CC, 0);
        self.wait_ready(false)?;
        // A previous driver's completions must not look new to this one.
        let zeros = [0u8; PAGE];
        for page in [self.layout.admin_sq, self.layout.admin_cq, self.layout.io_cq, self.layout.doorbells] {
            self.memory.write(page, &zeros);
        }
        let depth = u32::from(ADMIN_DEPTH - 1);
        self.registers.write32(regs::AQA, depth | (depth << 16));
        for (register, offset) in [(regs::ASQ, self.layout.admin_sq), (regs::ACQ, self.layout.admin_cq)] {
            let address = self.memory.device_address(offset);
            self.registers.write32(register, address as u32);
            self.registers.write32(register + 4, (address >> 32) as u32);
        }
        // Interrupts stay masked until the driver arms them.
        self.registers.write32(regs::INTMS, 1);
        self.registers.write32(regs::CC, regs::CC_CONFIG | regs::CC_ENABLE);
        self.wait_ready(true)
    }

    fn wait_ready(&self, ready: bool) -> Result<(), Error> {
        let deadline = self.clock.now_us() + self.caps.timeout_ms * 1000;
        loop {
            let status = self.registers.read32(regs::CSTS);
            if ready && status & regs::CSTS_FATAL != 0 {
                return Err(Error::Fatal);
            }
            if (status & regs::CSTS_READY != 0) == ready {
                return Ok(());
            }
            if self.clock.now_us() > deadline {
                return Err(Error::Timeout { ready });
            }
            core::hint::spin_loop();
        }
    }

    /// Runs a burst of admin commands (one or more), their ids
    /// `ADMIN_CID..`, with one doorbell write, to their completions; the
    /// first failed one in order is the error. The completion queue's head
    /// is not written back here but once at the end of the bring-up
    /// (`start`): each register write is a trapped exit.
    fn admin_commands<const N: usize>(&mut self, mut commands: [Submission; N]) -> Result<(), Error> {
        for (cid, command) in (ADMIN_CID..).zip(commands.iter_mut()) {
            command.cid = cid;
            self.admin.push(&self.memory, command);
        }
        self.admin.ring(&self.registers, &self.memory);
        let start = self.clock.now_us();
        let deadline = start + self.caps.timeout_ms * 1000;
        let mut fatal_check = start + FATAL_CHECK_US;
        // Each command's completion status, once it has one.
        let mut done: [Option<u16>; N] = [None; N];
        while done.iter().any(Option::is_none) {
            if let Some(completion) = self.admin.pop(&self.memory) {
                // An id not of this burst (a stale entry) is skipped.
                let index = usize::from(completion.cid.wrapping_sub(ADMIN_CID));
                if let Some(slot) = done.get_mut(index) {
                    *slot = Some(completion.status);
                }
            }
            // Checked after an entry too: a controller posting entries of
            // other ids without end held the bring-up for ever (a review
            // found it).
            let now = self.clock.now_us();
            // A controller that could not reach its queues says so.
            if now >= fatal_check {
                if self.registers.read32(regs::CSTS) & regs::CSTS_FATAL != 0 {
                    return Err(Error::Fatal);
                }
                fatal_check = now + FATAL_CHECK_US;
            }
            if now > deadline {
                let waiting = commands.iter().zip(&done).find(|(_, done)| done.is_none());
                return Err(Error::AdminTimeout { opcode: waiting.map_or(0, |(command, _)| command.opcode) });
            }
            core::hint::spin_loop();
        }
        match commands.iter().zip(done).find(|(_, status)| *status != Some(0)) {
            Some((command, status)) => Err(Error::Admin { opcode: command.opcode, status: status.unwrap_or(0) }),
            None => Ok(()),
        }
    }

    /// An Identify command for `cns` and `nsid` into the page at `page`.
    fn identify_command(&self, cns: u32, nsid: u32, page: usize) -> Submission {
        let mut command = Submission::new(admin::IDENTIFY, ADMIN_CID);
        command.nsid = nsid;
        command.prp1 = self.memory.device_address(page);
        command.cdw[0] = cns;
        command
    }

    /// Identify Controller and Identify Namespace 1 in one burst, the
    /// namespace's data in the I/O submission queue's first page (not in
    /// use before the queues are created).
    fn identify(&mut self) -> Result<(), Error> {
        let commands =
            [self.identify_command(1, 0, self.layout.identify), self.identify_command(0, 1, self.layout.io_sq)];
        self.admin_commands(commands)?;
        let mut controller = [0u8; PAGE];
        self.memory.read(self.layout.identify, &mut controller);
        let mut namespace = [0u8; PAGE];
        self.memory.read(self.layout.io_sq, &mut namespace);
        let mdts = controller[77];
        if mdts != 0 {
            self.max_transfer = (PAGE as u64)
                .checked_shl(u32::from(mdts))
                .and_then(|bytes| u32::try_from(bytes).ok())
                .unwrap_or(u32::MAX);
        }
        self.write_cache = controller[525] & 1 == 1;
        self.shadow_doorbells = u16::from_le_bytes([controller[256], controller[257]]) & (1 << 8) != 0;
        let blocks = u64::from_le_bytes(namespace[0..8].try_into().unwrap_or([0; 8]));
        let format = usize::from(namespace[26] & 0xf);
        let lbaf = &namespace[128 + 4 * format..132 + 4 * format];
        let (metadata, block_shift) = (u16::from_le_bytes([lbaf[0], lbaf[1]]), u32::from(lbaf[2]));
        // 512-byte blocks only, the sectors the reflector serves: a dying
        // driver could Format NVM the namespace to 4 KiB blocks, which the
        // controller's reset keeps, and every later driver accepting them
        // then failed each request not of whole 4 KiB blocks, for good.
        // Refused, a later driver dies at its start, and the device renews
        // its model (an adversarial review found it).
        // A size past 2^64 bytes wrapped into a small one, told to the
        // client as the disk's (a review found it).
        let whole_bytes = blocks.checked_mul(1 << SECTOR_SHIFT).is_some();
        if metadata != 0 || block_shift != SECTOR_SHIFT || blocks == 0 || !whole_bytes {
            return Err(Error::Format);
        }
        self.namespace = Namespace { blocks, block_shift };
        Ok(())
    }

    /// Doorbell Buffer Config: from here on every queue's indices go to
    /// the shadow doorbells, and a register is written only when the
    /// controller's EventIdx asks (each register write is a trapped exit
    /// on an emulated controller).
    fn configure_shadow_doorbells(&mut self) -> Result<(), Error> {
        // The Identify data is read: its page becomes the EventIdx buffer,
        // zeroed so that no stale index suppresses a doorbell.
        self.memory.write(self.layout.events, &[0u8; PAGE]);
        let mut command = Submission::new(admin::DOORBELL_BUFFER_CONFIG, ADMIN_CID);
        command.prp1 = self.memory.device_address(self.layout.doorbells);
        command.prp2 = self.memory.device_address(self.layout.events);
        self.admin_commands([command])?;
        // The controller now reads the admin queue's indices from the
        // shadow too: publish the current ones before the next command.
        self.admin.use_shadow(self.layout.doorbells, self.layout.events);
        self.admin.sync_shadow(&self.memory);
        self.io.use_shadow(self.layout.doorbells, self.layout.events);
        Ok(())
    }

    /// Whether the shadow doorbell buffer is in use.
    pub fn shadow_doorbells(&self) -> bool {
        self.shadow_doorbells
    }

    fn create_io_queues(&mut self) -> Result<(), Error> {
        let size = u32::from(IO_DEPTH - 1) << 16;
        let mut cq = Submission::new(admin::CREATE_CQ, ADMIN_CID);
        cq.prp1 = self.memory.device_address(self.layout.io_cq);
        // Queue 1, physically contiguous, interrupts enabled on vector 0.
        cq.cdw[0] = 1 | size;
        cq.cdw[1] = 0b11;
        self.admin_commands([cq])?;
        let mut sq = Submission::new(admin::CREATE_SQ, ADMIN_CID);
        sq.prp1 = self.memory.device_address(self.layout.io_sq);
        // Queue 1, physically contiguous, completions to queue 1.
        sq.cdw[0] = 1 | size;
        sq.cdw[1] = 1 | (1 << 16);
        self.admin_commands([sq])?;
        Ok(())
    }

    /// Namespace 1.
    pub fn namespace(&self) -> Namespace {
        self.namespace
    }

    /// Whether the controller has a volatile write cache.
    pub fn write_cache(&self) -> bool {
        self.write_cache
    }

    /// Queues I/O command `cid` (below [`MAX_COMMANDS`], not outstanding);
    /// the controller sees it after [`Controller::ring`].
    pub fn submit(&mut self, cid: u16, command: IoCommand) -> Result<(), Error> {
        if cid >= MAX_COMMANDS || !self.io.has_room() {
            return Err(Error::Request);
        }
        let mut entry = match command {
            IoCommand::Flush => Submission::new(io::FLUSH, cid),
            IoCommand::Read { offset, len, buffer } => self.transfer(io::READ, cid, offset, len, buffer)?,
            IoCommand::Write { offset, len, buffer } => self.transfer(io::WRITE, cid, offset, len, buffer)?,
        };
        entry.nsid = 1;
        self.io.push(&self.memory, &entry);
        Ok(())
    }

    /// A read or write: its blocks and PRPs.
    fn transfer(&self, opcode: u8, cid: u16, offset: u64, len: u32, buffer: usize) -> Result<Submission, Error> {
        let block = 1u64 << self.namespace.block_shift;
        let blocks = u64::from(len) >> self.namespace.block_shift;
        let pages = (len as usize).div_ceil(PAGE);
        let fits = offset.is_multiple_of(block)
            && u64::from(len).is_multiple_of(block)
            && blocks > 0
            && blocks <= 0x1_0000
            && (offset >> self.namespace.block_shift) + blocks <= self.namespace.blocks
            && len <= self.max_transfer
            && buffer.is_multiple_of(PAGE)
            && pages <= 1 + PRP_LIST / 8;
        if !fits {
            return Err(Error::Request);
        }
        let mut entry = Submission::new(opcode, cid);
        entry.prp1 = self.memory.device_address(buffer);
        entry.prp2 = match pages {
            1 => 0,
            2 => self.memory.device_address(buffer + PAGE),
            _ => {
                let list = self.layout.prp_lists + usize::from(cid) * PRP_LIST;
                let mut bytes = [0u8; PRP_LIST];
                for page in 1..pages {
                    let address = self.memory.device_address(buffer + page * PAGE);
                    bytes[8 * (page - 1)..8 * page].copy_from_slice(&address.to_le_bytes());
                }
                self.memory.write(list, &bytes[..8 * (pages - 1)]);
                self.memory.device_address(list)
            }
        };
        let lba = offset >> self.namespace.block_shift;
        entry.cdw[0] = lba as u32;
        entry.cdw[1] = (lba >> 32) as u32;
        entry.cdw[2] = (blocks - 1) as u32;
        Ok(entry)
    }

    /// Tells the controller about the commands submitted since the last
    /// ring: one doorbell write per burst.
    pub fn ring(&mut self) {
        self.io.ring(&self.registers, &self.memory);
    }

    /// Hands every posted completion to `done` (its command id and status,
    /// SCT << 8 | SC) and releases their entries; how many there were.
    pub fn reap(&mut self, done: impl FnMut(u16, u16)) -> usize {
        let count = self.take_completions(done);
        self.release();
        count
    }

    /// Hands every posted completion to `done`, as [`Controller::reap`],
    /// but leaves their entries to [`Controller::publish_head`]: a driver
    /// tells its client first.
    pub fn take_completions(&mut self, mut done: impl FnMut(u16, u16)) -> usize {
        let mut count = 0;
        while let Some(completion) = self.io.pop(&self.memory) {
            done(completion.cid, completion.status);
            count += 1;
        }
        count
    }

    /// Hands the completions taken back to the controller: through the
    /// shadow doorbell alone when the controller reads it (no register
    /// write, so no exit on an emulated controller), else by the register.
    /// A pin-based interrupt then stays asserted until
    /// [`Controller::release`].
    pub fn publish_head(&mut self) {
        self.io.publish_head(&self.registers, &self.memory);
    }

    /// Writes the completion queue's head doorbell register if completions
    /// were taken since it was last written: before a driver sleeps, so
    /// that a pin-based interrupt is deasserted and the next completion
    /// raises it again.
    pub fn release(&mut self) {
        self.io.release_taken(&self.registers, &self.memory);
    }

    /// Whether a completion is posted and not yet reaped.
    pub fn completion_posted(&self) -> bool {
        self.io.posted(&self.memory)
    }

    /// I/O commands outstanding.
    pub fn outstanding(&self) -> u16 {
        self.io.outstanding()
    }

    /// Unmasks (true) or masks the controller's interrupt.
    pub fn interrupts(&self, on: bool) {
        self.registers.write32(if on { regs::INTMC } else { regs::INTMS }, 1);
    }

    /// The DMA memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }
}

#[cfg(test)]
mod tests {
    //! Bring-up against a fake controller that answers an admin command
    //! only after the driver has looked at its completion queue a few
    //! times (as QEMU's model posts it from its main loop, after the
    //! doorbell write returned), counting every register access: each is
    //! a trapped exit and a qtest round trip on QEMU's model.

    extern crate std;

    use std::cell::{Cell, RefCell};
    use std::rc::Rc;
    use std::vec;
    use std::vec::Vec;

    use super::*;

    /// Device address of DMA offset 0.
    const DMA_BASE: u64 = 0x1_0000_0000;
    /// Looks at the admin completion queue before a command completes.
    const POLLS_PER_COMMAND: u32 = 50;

    #[derive(Default)]
    struct State {
        memory: Vec<u8>,
        now_us: Cell<u64>,
        enabled: bool,
        fatal: bool,
        /// Never answers admin commands.
        mute: bool,
        /// Posts an entry of an id no command has wherever the driver looks
        /// for its next completion.
        babbling: bool,
        /// CAP's upper half, if not the usual one.
        cap_high: Option<u32>,
        /// Identify Namespace's NSZE, if not 2^20.
        blocks: Option<u64>,
        asq: u64,
        acq: u64,
        sq_head: u16,
        sq_tail: u16,
        cq_tail: u16,
        phase: bool,
        polls_left: u32,
        csts_reads: u32,
        admin_cq_head_writes: u32,
        admin_sq_doorbells: u32,
        accesses: u32,
    }

    impl State {
        fn offset(&self, address: u64) -> usize {
            usize::try_from(address - DMA_BASE).unwrap()
        }

        /// Runs every admin command submitted, once the driver has polled
        /// enough.
        fn maybe_complete(&mut self) {
            if self.mute || self.sq_head == self.sq_tail {
                return;
            }
            if self.polls_left > 0 {
                self.polls_left -= 1;
                return;
            }
            while self.sq_head != self.sq_tail {
                let at = self.offset(self.asq) + usize::from(self.sq_head) * SQ_ENTRY;
                let entry: [u8; 64] = self.memory[at..at + 64].try_into().unwrap();
                let (opcode, cid) = (entry[0], u16::from_le_bytes([entry[2], entry[3]]));
                let nsid = u32::from_le_bytes(entry[4..8].try_into().unwrap());
                let prp1 = u64::from_le_bytes(entry[24..32].try_into().unwrap());
                let cns = entry[40];
                if opcode == admin::IDENTIFY {
                    let page = self.offset(prp1);
                    self.memory[page..page + PAGE].fill(0);
                    match (cns, nsid) {
                        // MDTS 5; OACS without the doorbell buffer.
                        (1, 0) => self.memory[page + 77] = 5,
                        // 2^20 blocks of 512 bytes (LBA format 0).
                        (0, 1) => {
                            let blocks = self.blocks.unwrap_or(1 << 20);
                            self.memory[page..page + 8].copy_from_slice(&blocks.to_le_bytes());
                            self.memory[page + 130] = 9;
                        }
                        _ => panic!("unexpected Identify cns {cns} nsid {nsid}"),
                    }
                }
                self.sq_head = (self.sq_head + 1) % ADMIN_DEPTH;
                self.post(cid);
            }
        }

        /// Posts a successful completion of command `cid`.
        fn post(&mut self, cid: u16) {
            let at = self.offset(self.acq) + usize::from(self.cq_tail) * CQ_ENTRY;
            let dw3 = u32::from(cid) | (u32::from(self.phase) << 16);
            self.memory[at + 8..at + 12].copy_from_slice(&u32::from(self.sq_head).to_le_bytes());
            self.memory[at + 12..at + 16].copy_from_slice(&dw3.to_le_bytes());
            self.cq_tail += 1;
            if self.cq_tail == ADMIN_DEPTH {
                (self.cq_tail, self.phase) = (0, !self.phase);
            }
        }
    }

    #[derive(Clone)]
    struct Fake(Rc<RefCell<State>>);

    impl Registers for Fake {
        fn read32(&self, offset: usize) -> u32 {
            let mut state = self.0.borrow_mut();
            state.accesses += 1;
            match offset {
                // MQES 2047, TO 15 (7.5 s), DSTRD 0, CSS NVM, MPSMIN 4 KiB.
                regs::CAP => 0x0f00_07ff,
                o if o == regs::CAP + 4 => state.cap_high.unwrap_or(1 << 5),
                regs::CSTS => {
                    state.csts_reads += 1;
                    u32::from(state.enabled) | if state.fatal { regs::CSTS_FATAL } else { 0 }
                }
                _ => 0,
            }
        }

        fn write32(&self, offset: usize, value: u32) {
            let mut state = self.0.borrow_mut();
            state.accesses += 1;
            let low = |old: u64| (old & !0xffff_ffff) | u64::from(value);
            let high = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
            match offset {
                regs::CC => {
                    state.enabled = value & regs::CC_ENABLE != 0;
                    (state.sq_head, state.sq_tail, state.cq_tail, state.phase) = (0, 0, 0, true);
                }
                regs::ASQ => state.asq = low(state.asq),
                o if o == regs::ASQ + 4 => state.asq = high(state.asq),
                regs::ACQ => state.acq = low(state.acq),
                o if o == regs::ACQ + 4 => state.acq = high(state.acq),
                o if o == regs::sq_tail_doorbell(0, 4) => {
                    state.admin_sq_doorbells += 1;
                    state.sq_tail = value as u16;
                    state.polls_left = POLLS_PER_COMMAND;
                }
                o if o == regs::cq_head_doorbell(0, 4) => state.admin_cq_head_writes += 1,
                _ => {}
            }
        }
    }

    impl DmaMemory for Fake {
        fn device_address(&self, offset: usize) -> u64 {
            DMA_BASE + offset as u64
        }

        fn write(&self, offset: usize, bytes: &[u8]) {
            self.0.borrow_mut().memory[offset..offset + bytes.len()].copy_from_slice(bytes);
        }

        fn read(&self, offset: usize, bytes: &mut [u8]) {
            let mut state = self.0.borrow_mut();
            // A look at the admin completion queue: time passes for the
            // controller.
            if state.acq != 0 && (state.offset(state.acq)..state.offset(state.acq) + PAGE).contains(&offset) {
                state.maybe_complete();
                // An entry just where the driver looks next, each time.
                let next = state.offset(state.acq) + usize::from(state.cq_tail) * CQ_ENTRY;
                if state.babbling && offset == next {
                    state.post(0xbabe);
                }
            }
            bytes.copy_from_slice(&state.memory[offset..offset + bytes.len()]);
        }
    }

    impl Clock for Fake {
        /// Every look at the clock is a microsecond later.
        fn now_us(&self) -> u64 {
            let state = self.0.borrow();
            state.now_us.set(state.now_us.get() + 1);
            state.now_us.get()
        }
    }

    fn fake() -> Fake {
        Fake(Rc::new(RefCell::new(State { memory: vec![0; Layout::AREA], phase: true, ..State::default() })))
    }

    fn start(fake: &Fake) -> Result<Controller<Fake, Fake, Fake>, Error> {
        Controller::start(fake.clone(), fake.clone(), fake.clone(), Layout::at(0))
    }

    #[test]
    fn a_bring_up_polls_its_admin_completions_in_memory_and_hands_them_back_once() {
        let fake = fake();
        let controller = start(&fake).unwrap();
        assert_eq!(controller.namespace(), Namespace { blocks: 1 << 20, block_shift: 9 });
        assert_eq!(controller.max_transfer, PAGE as u32 * 32);
        let state = fake.0.borrow();
        // Identify Controller and Namespace in one burst, then the two
        // queue creations.
        assert_eq!(state.admin_sq_doorbells, 3);
        // CSTS only for the two ready waits: a command that completes
        // within FATAL_CHECK_US needs no register read.
        assert_eq!(state.csts_reads, 2);
        assert_eq!(state.admin_cq_head_writes, 1, "the admin completions are handed back in one write");
        // CAP (2), CC, CSTS, AQA, ASQ (2), ACQ (2), INTMS, CC, CSTS, three
        // admin doorbells and one head write.
        assert_eq!(state.accesses, 16);
    }

    #[test]
    fn a_controller_that_goes_fatal_during_an_admin_command_is_noticed_without_waiting_for_its_timeout() {
        let fake = fake();
        fake.0.borrow_mut().mute = true;
        let registers = Fatal { inner: fake.clone() };
        let error = Controller::start(registers, fake.clone(), fake.clone(), Layout::at(0)).err();
        assert_eq!(error, Some(Error::Fatal));
        let state = fake.0.borrow();
        assert!(state.now_us.get() < 10 * FATAL_CHECK_US, "noticed after {} us", state.now_us.get());
    }

    /// Goes fatal at the first admin doorbell.
    struct Fatal {
        inner: Fake,
    }

    impl Registers for Fatal {
        fn read32(&self, offset: usize) -> u32 {
            self.inner.read32(offset)
        }

        fn write32(&self, offset: usize, value: u32) {
            self.inner.write32(offset, value);
            if offset == regs::sq_tail_doorbell(0, 4) {
                self.inner.0.borrow_mut().fatal = true;
            }
        }
    }

    #[test]
    fn an_admin_command_that_never_completes_times_out() {
        let fake = fake();
        fake.0.borrow_mut().mute = true;
        assert_eq!(start(&fake).err(), Some(Error::AdminTimeout { opcode: admin::IDENTIFY }));
        // CAP.TO is 7.5 s; the wait read CSTS about once a millisecond.
        let state = fake.0.borrow();
        assert!(state.now_us.get() >= 7_500_000);
        assert!((7_000..=8_000).contains(&state.csts_reads), "{} CSTS reads", state.csts_reads);
    }

    /// A controller that posts entries of other ids without end is given
    /// up on at CAP.TO like a mute one (before, each entry skipped the
    /// deadline's check, and the bring-up never ended: a review found it).
    #[test]
    fn a_controller_posting_entries_of_other_ids_without_end_times_out() {
        let fake = fake();
        {
            let mut state = fake.0.borrow_mut();
            (state.mute, state.babbling) = (true, true);
        }
        assert_eq!(start(&fake).err(), Some(Error::AdminTimeout { opcode: admin::IDENTIFY }));
        assert!(fake.0.borrow().now_us.get() >= 7_500_000);
    }

    /// A namespace of more than 2^64 bytes is refused (before, its size
    /// wrapped into a small one, told to the client as the disk's).
    #[test]
    fn a_namespace_past_two_to_the_sixty_four_bytes_is_refused() {
        for (blocks, expected) in
            [(1u64 << 55, Err(Error::Format)), (u64::MAX, Err(Error::Format)), ((1 << 55) - 1, Ok(()))]
        {
            let fake = fake();
            fake.0.borrow_mut().blocks = Some(blocks);
            let started = start(&fake).map(|controller| assert_eq!(controller.namespace().bytes(), blocks << 9));
            assert_eq!(started, expected, "{blocks} blocks");
        }
    }

    /// A doorbell stride past a quarter page is refused: the mirror and
    /// EventIdx entries of the two queue pairs are four strides (before,
    /// a large CAP.DSTRD put them past their pages, over the queues: a
    /// review found it).
    #[test]
    fn a_doorbell_stride_past_a_quarter_page_is_unsupported() {
        for (dstrd, expected) in [(9, Err(Error::Unsupported)), (15, Err(Error::Unsupported)), (8, Ok(()))] {
            let fake = fake();
            fake.0.borrow_mut().cap_high = Some((1 << 5) | dstrd);
            assert_eq!(start(&fake).map(|_| ()), expected, "DSTRD {dstrd}");
        }
    }
}
