//! Submission and completion queue entries (NVMe base specification 1.4,
//! sections 4.2 and 4.6), as bytes in DMA memory.

/// Admin opcodes.
pub mod admin {
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Doorbell Buffer Config (shadow doorbells and EventIdx).
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
}

/// NVM command set opcodes.
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
}

/// A 64-byte submission queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Submission {
    /// Opcode.
    pub opcode: u8,
    /// Command identifier (unique among the queue's outstanding commands).
    pub cid: u16,
    /// Namespace.
    pub nsid: u32,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2 (a second page, or a PRP list).
    pub prp2: u64,
    /// Command dwords 10 to 15.
    pub cdw: [u32; 6],
}

impl Submission {
    /// A command with nothing but its opcode and id.
    pub const fn new(opcode: u8, cid: u16) -> Self {
        Submission { opcode, cid, nsid: 0, prp1: 0, prp2: 0, cdw: [0; 6] }
    }

    /// Its bytes (PSDT = 0: PRPs; FUSE = 0).
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut bytes = [0u8; 64];
        let dword0 = u32::from(self.opcode) | (u32::from(self.cid) << 16);
        bytes[0..4].copy_from_slice(&dword0.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.prp1.to_le_bytes());
        bytes[32..40].copy_from_slice(&self.prp2.to_le_bytes());
        for (i, dword) in self.cdw.iter().enumerate() {
            bytes[40 + 4 * i..44 + 4 * i].copy_from_slice(&dword.to_le_bytes());
        }
        bytes
    }
}

/// A 16-byte completion queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Command specific dword 0.
    pub result: u32,
    /// The submission queue's head as the controller saw it.
    pub sq_head: u16,
    /// The command's identifier.
    pub cid: u16,
    /// Phase tag.
    pub phase: bool,
    /// Status: SCT << 8 | SC (0: success).
    pub status: u16,
}

impl Completion {
    /// Decodes an entry's bytes.
    pub fn from_bytes(bytes: &[u8; 16]) -> Self {
        let dword = |i: usize| u32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
        let dw3 = dword(3);
        let status_field = dw3 >> 17;
        Completion {
            result: dword(0),
            sq_head: dword(2) as u16,
            cid: dw3 as u16,
            phase: (dw3 >> 16) & 1 == 1,
            status: (((status_field >> 8) & 0x7) << 8) as u16 | (status_field & 0xff) as u16,
        }
    }

    /// The command succeeded.
    pub fn ok(&self) -> bool {
        self.status == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_have_the_spec_layout() {
        let mut command = Submission::new(admin::IDENTIFY, 0x1234);
        command.prp1 = 0x1_0000_2000;
        command.cdw[0] = 1;
        let bytes = command.to_bytes();
        assert_eq!(&bytes[0..4], &[0x06, 0, 0x34, 0x12]);
        assert_eq!(&bytes[24..32], &0x1_0000_2000u64.to_le_bytes());
        assert_eq!(&bytes[40..44], &[1, 0, 0, 0]);
        // The identify completion QEMU's controller wrote: cid 1, phase 1,
        // success, SQ head 1.
        let done: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0];
        let completion = Completion::from_bytes(&done);
        assert_eq!((completion.cid, completion.phase, completion.ok(), completion.sq_head), (1, true, true, 1));
        // Invalid field in command: SCT 0, SC 2, with DNR set.
        let dw3: u32 = (1 << 16) | (2 << 17) | (1 << 31);
        let mut failed = [0u8; 16];
        failed[12..16].copy_from_slice(&dw3.to_le_bytes());
        assert_eq!(Completion::from_bytes(&failed).status, 2);
    }
}
