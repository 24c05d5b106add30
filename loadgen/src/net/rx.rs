//! Reassembly of received frames from used RX buffers.
//!
//! Every frame starts with the 12-byte `virtio_net_hdr_v1` in its first buffer. With
//! VIRTIO_NET_F_MRG_RXBUF the header's `num_buffers` says how many used buffers (this one and
//! the next `num_buffers - 1` in used-ring order) the frame spans; the later ones hold frame
//! bytes only. Without it every frame is in one buffer.

use crate::error::{Error, Result};

use super::{HEADER_LEN, HEADER_NUM_BUFFERS};

/// Puts frames back together from the used buffers of one RX queue, in used-ring order.
#[derive(Debug)]
pub struct RxAssembler {
    mrg: bool,
    max_buffers: u16,
    max_frame: usize,
    /// Bytes of the frame being assembled (copied: it spans buffers).
    buf: Vec<u8>,
    /// Buffers still to come for the frame in `buf` (0: none in progress).
    remaining: u16,
    /// Buffers the frame in `buf` spans.
    expected: u16,
    /// Frames that spanned more than one buffer.
    pub multi_buffer_frames: u64,
}

impl RxAssembler {
    /// An assembler for a queue of `queue_size` buffers; `mrg` if MRG_RXBUF was negotiated.
    /// Frames longer than `max_frame` bytes are a protocol violation.
    pub fn new(mrg: bool, queue_size: u16, max_frame: usize) -> Self {
        RxAssembler {
            mrg,
            max_buffers: queue_size,
            max_frame,
            buf: Vec::with_capacity(max_frame),
            remaining: 0,
            expected: 0,
            multi_buffer_frames: 0,
        }
    }

    /// True if a frame is partly assembled (more buffers are due).
    pub fn in_progress(&self) -> bool {
        self.remaining != 0
    }

    /// Feeds the next used buffer (`data`: the bytes the device says it wrote). Returns the
    /// frame, without the virtio-net header, once its last buffer is in.
    pub fn push<'a>(&'a mut self, data: &'a [u8]) -> Result<Option<&'a [u8]>> {
        if self.remaining == 0 {
            if data.len() < HEADER_LEN {
                return Err(Error::Protocol(format!(
                    "RX buffer used with {} bytes, less than the {HEADER_LEN}-byte virtio-net header",
                    data.len()
                )));
            }
            let num =
                if self.mrg { u16::from_le_bytes([data[HEADER_NUM_BUFFERS], data[HEADER_NUM_BUFFERS + 1]]) } else { 1 };
            if num == 0 || num > self.max_buffers {
                return Err(Error::Protocol(format!(
                    "RX header says the frame spans {num} buffers (the queue has {})",
                    self.max_buffers
                )));
            }
            let payload = &data[HEADER_LEN..];
            self.check_len(payload.len(), num)?;
            if num == 1 {
                return Ok(Some(payload));
            }
            self.buf.clear();
            self.buf.extend_from_slice(payload);
            self.remaining = num - 1;
            self.expected = num;
            return Ok(None);
        }
        self.check_len(self.buf.len() + data.len(), self.expected)?;
        self.buf.extend_from_slice(data);
        self.remaining -= 1;
        if self.remaining > 0 {
            return Ok(None);
        }
        self.multi_buffer_frames += 1;
        Ok(Some(&self.buf))
    }

    fn check_len(&self, len: usize, buffers: u16) -> Result<()> {
        if len > self.max_frame {
            return Err(Error::Protocol(format!(
                "RX frame of at least {len} bytes in {buffers} buffer(s), longer than the {} we can receive",
                self.max_frame
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::frame::{parse, FrameBuilder, Parsed};

    fn hdr(num_buffers: u16) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[HEADER_NUM_BUFFERS..].copy_from_slice(&num_buffers.to_le_bytes());
        h
    }

    /// Splits `frame` into used buffers of at most `buf_size` bytes as a device with
    /// MRG_RXBUF would.
    fn split(frame: &[u8], buf_size: usize) -> Vec<Vec<u8>> {
        let mut all = hdr(0);
        all.extend_from_slice(frame);
        let mut bufs: Vec<Vec<u8>> = all.chunks(buf_size).map(<[u8]>::to_vec).collect();
        let n = bufs.len() as u16;
        bufs[0][HEADER_NUM_BUFFERS..HEADER_LEN].copy_from_slice(&n.to_le_bytes());
        bufs
    }

    #[test]
    fn single_buffer_frames_pass_through() {
        let mut a = RxAssembler::new(true, 256, 1514);
        let mut b = hdr(1);
        b.extend_from_slice(&[1, 2, 3]);
        assert_eq!(a.push(&b).unwrap(), Some(&[1u8, 2, 3][..]));
        assert!(!a.in_progress());
        // Without MRG_RXBUF the field is not looked at.
        let mut a = RxAssembler::new(false, 256, 1514);
        let mut b = hdr(0);
        b.push(9);
        assert_eq!(a.push(&b).unwrap(), Some(&[9u8][..]));
    }

    #[test]
    fn frames_spanning_buffers_are_reassembled() {
        let fb = FrameBuilder { dst: [0xff; 6], src: [2, 0, 0, 0, 0, 1], run: 1, len: 1514 };
        for buf_size in [64usize, 100, 512, 1000, 1526, 2048] {
            let mut a = RxAssembler::new(true, 256, 1514);
            for seq in 0..3u64 {
                let frame = fb.build(seq, seq);
                let bufs = split(&frame, buf_size);
                let n = bufs.len();
                for (i, b) in bufs.iter().enumerate() {
                    let out = a.push(b).unwrap();
                    if i + 1 < n {
                        assert!(out.is_none(), "buffer {i} of {n} completed a frame");
                    } else {
                        let out = out.expect("last buffer completes the frame");
                        assert_eq!(out, &frame[..]);
                        assert_eq!(parse(out), Parsed::Ours { run: 1, seq, ts: seq });
                    }
                }
            }
            let expect_multi = if 1514 + HEADER_LEN > buf_size { 3 } else { 0 };
            assert_eq!(a.multi_buffer_frames, expect_multi, "buf_size {buf_size}");
        }
    }

    #[test]
    fn a_lost_continuation_buffer_shows_as_corruption() {
        // A device that announces 3 buffers but whose second buffer belongs to another frame:
        // the assembled frame does not verify.
        let fb = FrameBuilder { dst: [0xff; 6], src: [2, 0, 0, 0, 0, 1], run: 1, len: 1000 };
        let f1 = split(&fb.build(1, 0), 400);
        let f2 = split(&fb.build(2, 0), 400);
        let mut a = RxAssembler::new(true, 256, 1514);
        assert!(a.push(&f1[0]).unwrap().is_none());
        assert!(a.push(&f2[1]).unwrap().is_none());
        let out = a.push(&f1[2]).unwrap().unwrap().to_vec();
        assert!(matches!(parse(&out), Parsed::Corrupt { .. }));
    }

    #[test]
    fn protocol_violations() {
        let mut a = RxAssembler::new(true, 8, 1514);
        assert!(matches!(a.push(&[0u8; 11]), Err(Error::Protocol(_))), "short header");
        assert!(matches!(a.push(&hdr(0)), Err(Error::Protocol(_))), "num_buffers 0");
        assert!(matches!(a.push(&hdr(9)), Err(Error::Protocol(_))), "more buffers than the queue");
        let mut big = hdr(1);
        big.resize(HEADER_LEN + 1515, 0);
        assert!(matches!(a.push(&big), Err(Error::Protocol(_))), "frame too long");
        let mut first = hdr(2);
        first.resize(HEADER_LEN + 1000, 0);
        assert!(a.push(&first).unwrap().is_none());
        assert!(matches!(a.push(&[0u8; 600]), Err(Error::Protocol(_))), "continuation too long");
    }
}
