//! virtio-net over vhost-user, the frontend side: `net-load` sends Ethernet frames on one
//! device's TX queue and receives them on another's (or the same) RX queue, through whatever
//! forwards between the two (a switch, testpmd), and measures rate, loss, integrity and latency.
//!
//! - [`device`]: one virtio-net device (RX and TX queue, buffers, bounded waits).
//! - [`frame`]: self-checking test frames and the receiver's bookkeeping.
//! - [`rx`]: reassembly of frames spanning several RX buffers (VIRTIO_NET_F_MRG_RXBUF).
//! - [`run`]: the throughput and ping-pong workloads.
//! - [`malformed`]: the malformed-chain probe (`net-load --malformed`).
//!
//! The layouts shared with the reflector (queue numbers, header, config offsets) come from the
//! `virtio` crate.

pub mod device;
pub mod frame;
pub mod malformed;
pub mod run;
pub mod rx;

use crate::error::{Error, Result};

pub use virtio::net::{HEADER_LEN, HEADER_NUM_BUFFERS, RX_QUEUE, S_LINK_UP, TX_QUEUE};

/// Feature bits of virtio-net (spec 5.1.3) and the generic ones we negotiate.
pub mod features {
    pub use crate::blk::features::{VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
    /// Checksum offload to the device (never negotiated: no offloads).
    pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
    /// The device has a MAC address in the config space.
    pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
    /// RX frames may span several buffers; the header's `num_buffers` says how many.
    pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
    /// The config space's `status` field (link state) is valid.
    pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
    /// Several queue pairs.
    pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
    /// Descriptors may point to tables of descriptors (negotiated only for the malformed probe).
    pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

    /// Names of the bits above, for reports.
    pub fn names(bits: u64) -> Vec<&'static str> {
        let table: &[(u64, &str)] = &[
            (VIRTIO_NET_F_CSUM, "CSUM"),
            (VIRTIO_NET_F_MAC, "MAC"),
            (VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
            (VIRTIO_NET_F_STATUS, "STATUS"),
            (VIRTIO_NET_F_MQ, "MQ"),
            (VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
            (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
            (VHOST_USER_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
            (VIRTIO_F_VERSION_1, "VERSION_1"),
        ];
        table.iter().filter(|(b, _)| bits & b != 0).map(|(_, n)| *n).collect()
    }
}

/// Bytes of the config space we read: `mac` and `status`.
pub const CONFIG_READ_LEN: u32 = (virtio::net::config::STATUS + 2) as u32;

/// What the device's config space told us (None: not offered or not readable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetConfig {
    /// The device's MAC address (VIRTIO_NET_F_MAC).
    pub mac: Option<[u8; 6]>,
    /// Link up (VIRTIO_NET_F_STATUS).
    pub link_up: Option<bool>,
}

impl NetConfig {
    /// Parses the first [`CONFIG_READ_LEN`] bytes of the config space given the negotiated
    /// features.
    pub fn parse(raw: &[u8], acked: u64) -> Result<Self> {
        use virtio::net::config::{MAC, STATUS};
        if raw.len() < CONFIG_READ_LEN as usize {
            return Err(Error::BadConfig(format!("config space is {} bytes, need {}", raw.len(), CONFIG_READ_LEN)));
        }
        let mac = (acked & features::VIRTIO_NET_F_MAC != 0).then(|| {
            let mut m = [0u8; 6];
            m.copy_from_slice(&raw[MAC..MAC + 6]);
            m
        });
        let link_up = (acked & features::VIRTIO_NET_F_STATUS != 0)
            .then(|| u16::from_le_bytes([raw[STATUS], raw[STATUS + 1]]) & S_LINK_UP != 0);
        Ok(NetConfig { mac, link_up })
    }
}

/// A MAC address as `52:54:00:00:00:01`.
pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Parses `52:54:00:00:00:01` (or with dashes).
pub fn parse_mac(s: &str) -> std::result::Result<[u8; 6], String> {
    let parts: Vec<&str> = s.trim().split([':', '-']).collect();
    let bad = || format!("'{s}' is not a MAC address (example: 52:54:00:00:00:01)");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut m = [0u8; 6];
    for (d, p) in m.iter_mut().zip(&parts) {
        if p.is_empty() || p.len() > 2 {
            return Err(bad());
        }
        *d = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::features::*;
    use super::*;

    #[test]
    fn config_parsing_follows_features() {
        let raw = [0x52, 0x54, 0, 0, 0, 2, 1, 0];
        let c = NetConfig::parse(&raw, VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS).unwrap();
        assert_eq!(c, NetConfig { mac: Some([0x52, 0x54, 0, 0, 0, 2]), link_up: Some(true) });
        let c = NetConfig::parse(&[0, 0, 0, 0, 0, 0, 0, 0], VIRTIO_NET_F_STATUS).unwrap();
        assert_eq!(c, NetConfig { mac: None, link_up: Some(false) });
        assert!(NetConfig::parse(&raw[..7], VIRTIO_NET_F_MAC).is_err());
        assert_eq!(names(VIRTIO_NET_F_MRG_RXBUF | VIRTIO_F_VERSION_1), vec!["MRG_RXBUF", "VERSION_1"]);
    }

    #[test]
    fn macs() {
        assert_eq!(parse_mac("52:54:00:00:00:0a"), Ok([0x52, 0x54, 0, 0, 0, 10]));
        assert_eq!(parse_mac("FF-ff-ff-ff-ff-ff"), Ok([0xff; 6]));
        assert!(parse_mac("52:54:00:00:00").is_err());
        assert!(parse_mac("52:54:00:00:00:100").is_err());
        assert!(parse_mac("52:54:00:00:00:zz").is_err());
        assert_eq!(format_mac(&[0x52, 0x54, 0, 0, 0, 10]), "52:54:00:00:00:0a");
    }
}
