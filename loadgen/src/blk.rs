//! virtio-blk: feature bits, the configuration space, request headers and status codes.

use crate::error::{Error, Result};

pub use virtio::blk::{
    ID_BYTES as VIRTIO_BLK_ID_BYTES, SECTOR_SIZE, S_IOERR as VIRTIO_BLK_S_IOERR, S_OK as VIRTIO_BLK_S_OK,
    S_UNSUPP as VIRTIO_BLK_S_UNSUPP, T_FLUSH as VIRTIO_BLK_T_FLUSH, T_GET_ID as VIRTIO_BLK_T_GET_ID,
    T_IN as VIRTIO_BLK_T_IN, T_OUT as VIRTIO_BLK_T_OUT,
};

/// Feature bits we may negotiate.
pub mod features {
    /// Maximum size of any single segment is in `size_max`.
    pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
    /// Maximum number of segments in a request is in `seg_max`.
    pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
    /// Device is read-only.
    pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
    /// Block size of disk is in `blk_size`.
    pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command support.
    pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
    /// Device exports information on optimal I/O alignment.
    pub const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;
    /// Device supports multiqueue.
    pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
    /// Used/avail event index suppression.
    pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
    /// vhost-user protocol features are available.
    pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
    /// Virtio 1.0 (non-legacy) device.
    pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

    /// Names of the bits above, for reports.
    pub fn names(bits: u64) -> Vec<&'static str> {
        let table: &[(u64, &str)] = &[
            (VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"),
            (VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
            (VIRTIO_BLK_F_RO, "RO"),
            (VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
            (VIRTIO_BLK_F_FLUSH, "FLUSH"),
            (VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"),
            (VIRTIO_BLK_F_MQ, "MQ"),
            (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
            (VHOST_USER_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
            (VIRTIO_F_VERSION_1, "VERSION_1"),
        ];
        table.iter().filter(|(b, _)| bits & b != 0).map(|(_, n)| *n).collect()
    }
}

/// Bytes of the config space we read: everything up to and including `num_queues`.
pub const CONFIG_READ_LEN: u32 = 36;

/// The parts of `struct virtio_blk_config` we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Maximum segment size (0 if not offered).
    pub size_max: u32,
    /// Maximum number of data segments per request (0 if not offered).
    pub seg_max: u32,
    /// Logical block size (512 if not offered).
    pub blk_size: u32,
    /// Number of queues (1 if not offered).
    pub num_queues: u16,
}

impl BlkConfig {
    /// Parses the config space (little endian) given the negotiated features, validating it.
    pub fn parse(raw: &[u8], features: u64) -> Result<Self> {
        use features::*;
        if raw.len() < CONFIG_READ_LEN as usize {
            return Err(Error::BadConfig(format!("config space is {} bytes, need {}", raw.len(), CONFIG_READ_LEN)));
        }
        let u32_at = |o: usize| u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
        let mut cap = [0u8; 8];
        cap.copy_from_slice(&raw[0..8]);
        let capacity = u64::from_le_bytes(cap);
        let size_max = if features & VIRTIO_BLK_F_SIZE_MAX != 0 { u32_at(8) } else { 0 };
        let seg_max = if features & VIRTIO_BLK_F_SEG_MAX != 0 { u32_at(12) } else { 0 };
        let blk_size = if features & VIRTIO_BLK_F_BLK_SIZE != 0 { u32_at(20) } else { 512 };
        let num_queues = if features & VIRTIO_BLK_F_MQ != 0 { u16::from_le_bytes([raw[34], raw[35]]) } else { 1 };
        if capacity == 0 {
            return Err(Error::BadConfig("capacity is 0 sectors".into()));
        }
        if capacity.checked_mul(SECTOR_SIZE).is_none() {
            return Err(Error::BadConfig(format!("capacity {capacity} sectors overflows a byte count")));
        }
        if blk_size < 512 || !blk_size.is_power_of_two() || blk_size > 1 << 20 {
            return Err(Error::BadConfig(format!("blk_size {blk_size} is not a power of two in 512..=1MiB")));
        }
        if features & VIRTIO_BLK_F_SEG_MAX != 0 && seg_max == 0 {
            return Err(Error::BadConfig("SEG_MAX offered but seg_max is 0".into()));
        }
        if features & VIRTIO_BLK_F_MQ != 0 && num_queues == 0 {
            return Err(Error::BadConfig("MQ offered but num_queues is 0".into()));
        }
        Ok(BlkConfig { capacity, size_max, seg_max, blk_size, num_queues })
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity * SECTOR_SIZE
    }
}

/// The 16-byte request header (`struct virtio_blk_outhdr`).
pub fn request_header(req_type: u32, sector: u64) -> [u8; 16] {
    virtio::blk::header(req_type, sector)
}

/// Human name of a status byte.
pub fn status_name(status: u8) -> &'static str {
    match status {
        VIRTIO_BLK_S_OK => "OK",
        VIRTIO_BLK_S_IOERR => "IOERR",
        VIRTIO_BLK_S_UNSUPP => "UNSUPP",
        _ => "invalid status",
    }
}

#[cfg(test)]
mod tests {
    use super::features::*;
    use super::*;

    fn raw_config(capacity: u64, seg_max: u32, blk_size: u32, nq: u16) -> Vec<u8> {
        let mut r = vec![0u8; 60];
        r[0..8].copy_from_slice(&capacity.to_le_bytes());
        r[12..16].copy_from_slice(&seg_max.to_le_bytes());
        r[20..24].copy_from_slice(&blk_size.to_le_bytes());
        r[34..36].copy_from_slice(&nq.to_le_bytes());
        r
    }

    #[test]
    fn parse_config() {
        let f = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_MQ;
        let c = BlkConfig::parse(&raw_config(131072, 126, 4096, 2), f).unwrap();
        assert_eq!(c, BlkConfig { capacity: 131072, size_max: 0, seg_max: 126, blk_size: 4096, num_queues: 2 });
        assert_eq!(c.capacity_bytes(), 64 << 20);
        // Fields whose feature is not negotiated are ignored.
        let c = BlkConfig::parse(&raw_config(8, 0, 77, 0), 0).unwrap();
        assert_eq!(c.blk_size, 512);
        assert_eq!(c.num_queues, 1);
    }

    #[test]
    fn bad_configs_are_rejected() {
        let f = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE;
        assert!(BlkConfig::parse(&raw_config(0, 1, 512, 1), f).is_err());
        assert!(BlkConfig::parse(&raw_config(8, 0, 512, 1), f).is_err());
        assert!(BlkConfig::parse(&raw_config(8, 1, 1000, 1), f).is_err());
        assert!(BlkConfig::parse(&raw_config(u64::MAX, 1, 512, 1), f).is_err());
        assert!(BlkConfig::parse(&[0u8; 10], f).is_err());
    }

    #[test]
    fn header_layout() {
        let h = request_header(VIRTIO_BLK_T_OUT, 0x0102_0304_0506_0708);
        assert_eq!(h, [1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(names(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH), vec!["FLUSH", "VERSION_1"]);
    }
}
