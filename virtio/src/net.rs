//! virtio-net (virtio spec 5.1) as the reflector serves it: no offloads, one
//! RX/TX queue pair, the 12-byte header of VIRTIO_F_VERSION_1.

/// Receive queue index.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
/// `struct virtio_net_hdr_v1`: flags u8, gso_type u8, hdr_len u16,
/// gso_size u16, csum_start u16, csum_offset u16, num_buffers u16.
pub const HEADER_LEN: usize = 12;
/// Offset of `num_buffers` in the header (mergeable RX buffers).
pub const HEADER_NUM_BUFFERS: usize = 10;
/// `VIRTIO_NET_S_LINK_UP` in the config space's status.
pub const S_LINK_UP: u16 = 1;

/// Configuration space offsets (`struct virtio_net_config`).
pub mod config {
    /// mac[6].
    pub const MAC: usize = 0;
    /// le16 status.
    pub const STATUS: usize = 6;
    /// le16 max_virtqueue_pairs.
    pub const MAX_VIRTQUEUE_PAIRS: usize = 8;
    /// le16 mtu.
    pub const MTU: usize = 10;
    /// Bytes up to and including `mtu`.
    pub const LEN: usize = 12;
}
