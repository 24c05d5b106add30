//! Trapped windows: a window the vmm does not back with memory. Each guest
//! access to it exits to the vmm, which forwards it over a socket the
//! supervisor gave it (`vmm run --trap GPA,SIZE,fd=N,name=NAME`); the
//! supervisor judges and performs it (a device model's BAR reached over
//! qtest, a register file it mediates). This is the host side's protocol;
//! the guest sees an ordinary window ([`super::WINDOW_TRAPPED`]).
//!
//! A request is [`REQUEST_LEN`] little-endian bytes: kind (u8), size in
//! bytes (u8: 1, 2, 4 or 8), reserved (u16, zero), offset in the window
//! (u32), value written (u64; zero for a read). A read's reply is the
//! value read, [`REPLY_LEN`] bytes; a write has no reply (it is posted, so
//! a burst of doorbell writes costs the guest its exits only). Requests are
//! served in order, so a read after writes sees them done.
//!
//! A window may also have *posted registers* (`posted=OFFSET:FD` on
//! `--trap`): the vmm registers a KVM ioeventfd on each, so a guest write
//! to one (of any width, at its offset) signals that eventfd inside KVM, without the exit to the vmm's
//! userspace a socket request costs (about 23 against 66 us here), and the
//! value written is lost on the way. The supervisor then writes the
//! register itself with the value the driver left in the channel's posted
//! mirror ([`super::channel::POSTED_MIRROR_OFFSET`], the dword at the
//! register's offset modulo 4096) before it wrote the register: a doorbell
//! whose value lives in memory, as an NVMe shadow doorbell does. Reads of a
//! posted register still come as requests. Before each request the supervisor performs the posted writes
//! already signalled, so a read after a posted write sees it done.

/// A guest read.
pub const READ: u8 = 1;
/// A guest write.
pub const WRITE: u8 = 2;
/// Bytes of a request.
pub const REQUEST_LEN: usize = 16;
/// Bytes of a read's reply.
pub const REPLY_LEN: usize = 8;

/// One guest access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// [`READ`] or [`WRITE`].
    pub kind: u8,
    /// Bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// Offset in the window.
    pub offset: u32,
    /// The value written (zero for a read).
    pub value: u64,
}

impl Access {
    /// Its bytes on the socket.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut bytes = [0u8; REQUEST_LEN];
        bytes[0] = self.kind;
        bytes[1] = self.size;
        bytes[4..8].copy_from_slice(&self.offset.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.value.to_le_bytes());
        bytes
    }

    /// Decodes a request; None if it is not one the protocol defines.
    pub fn decode(bytes: &[u8; REQUEST_LEN]) -> Option<Access> {
        let access = Access {
            kind: bytes[0],
            size: bytes[1],
            offset: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            value: u64::from_le_bytes([
                bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15],
            ]),
        };
        let valid = matches!(access.kind, READ | WRITE)
            && matches!(access.size, 1 | 2 | 4 | 8)
            && bytes[2] == 0
            && bytes[3] == 0
            && (access.kind == WRITE || access.value == 0);
        valid.then_some(access)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_round_trip_and_garbage_is_refused() {
        let write = Access { kind: WRITE, size: 4, offset: 0x1008, value: 0x1234_5678 };
        assert_eq!(Access::decode(&write.encode()), Some(write));
        let read = Access { kind: READ, size: 8, offset: 0, value: 0 };
        assert_eq!(Access::decode(&read.encode()), Some(read));
        for bad in [
            Access { kind: 3, ..read },
            Access { size: 3, ..read },
            Access { size: 0, ..write },
            Access { value: 1, ..read },
        ] {
            assert_eq!(Access::decode(&bad.encode()), None, "{bad:?}");
        }
        let mut reserved = write.encode();
        reserved[2] = 1;
        assert_eq!(Access::decode(&reserved), None);
    }
}
