//! virtio-blk (virtio spec 5.2): request types, status codes, the request
//! header and the configuration space fields the project uses.

use virtio_bindings::virtio_blk as bindings;

/// Request type: read.
pub const T_IN: u32 = bindings::VIRTIO_BLK_T_IN;
/// Request type: write.
pub const T_OUT: u32 = bindings::VIRTIO_BLK_T_OUT;
/// Request type: flush.
pub const T_FLUSH: u32 = bindings::VIRTIO_BLK_T_FLUSH;
/// Request type: device id.
pub const T_GET_ID: u32 = bindings::VIRTIO_BLK_T_GET_ID;
/// Status: success.
pub const S_OK: u8 = bindings::VIRTIO_BLK_S_OK as u8;
/// Status: I/O error.
pub const S_IOERR: u8 = bindings::VIRTIO_BLK_S_IOERR as u8;
/// Status: unsupported request.
pub const S_UNSUPP: u8 = bindings::VIRTIO_BLK_S_UNSUPP as u8;
/// Length of the device id a GET_ID request receives.
pub const ID_BYTES: usize = bindings::VIRTIO_BLK_ID_BYTES as usize;
/// Length of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: usize = 16;
/// Sector size of the protocol (request offsets are in these units).
pub const SECTOR_SIZE: u64 = 512;

/// The request header: type, reserved, sector.
pub fn header(request_type: u32, sector: u64) -> [u8; HEADER_LEN] {
    let mut raw = [0u8; HEADER_LEN];
    raw[0..4].copy_from_slice(&request_type.to_le_bytes());
    raw[8..16].copy_from_slice(&sector.to_le_bytes());
    raw
}

/// Parses a request header into (type, sector).
pub fn parse_header(raw: &[u8; HEADER_LEN]) -> (u32, u64) {
    let mut kind = [0u8; 4];
    kind.copy_from_slice(&raw[0..4]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[8..16]);
    (u32::from_le_bytes(kind), u64::from_le_bytes(sector))
}

/// Byte offsets of configuration space fields (`struct virtio_blk_config`).
pub mod config {
    /// u64 capacity in 512-byte sectors.
    pub const CAPACITY: usize = 0;
    /// u32 largest segment (VIRTIO_BLK_F_SIZE_MAX).
    pub const SIZE_MAX: usize = 8;
    /// u32 most segments per request (VIRTIO_BLK_F_SEG_MAX).
    pub const SEG_MAX: usize = 12;
    /// u32 logical block size (VIRTIO_BLK_F_BLK_SIZE).
    pub const BLK_SIZE: usize = 20;
    /// u16 number of queues (VIRTIO_BLK_F_MQ).
    pub const NUM_QUEUES: usize = 34;
    /// Bytes up to and including num_queues.
    pub const LEN: usize = 36;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_numbers_match_the_spec() {
        let raw = header(T_OUT, 0x1234_5678_9abc);
        assert_eq!(parse_header(&raw), (T_OUT, 0x1234_5678_9abc));
        assert_eq!(raw[4..8], [0; 4]);
        assert_eq!((T_IN, T_OUT, T_FLUSH, T_GET_ID), (0, 1, 4, 8));
        assert_eq!((S_OK, S_IOERR, S_UNSUPP, ID_BYTES), (0, 1, 2, 20));
    }
}
