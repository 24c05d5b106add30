//! Self-checking test frames and the receiver's bookkeeping.
//!
//! A frame is an Ethernet header (dst, src, ethertype 0x88b5, "local experimental") followed by
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 14 | 4 | magic `NLD1` |
//! | 18 | 4 | run id (per run and direction: frames of other runs are told apart) |
//! | 22 | 8 | sequence number (from 0, per direction) |
//! | 30 | 8 | send time, ns since the run started |
//! | 38 | 2 | frame length |
//! | 40 | .. | pattern derived from all of the above |
//!
//! all little endian. A frame whose magic and run id match is ours: it is then corrupted if its
//! length or any pattern byte is wrong (a damaged sequence number, time or length changes the
//! expected pattern too). [`Tracker`] counts what arrives: new, duplicated, out of order,
//! corrupted, foreign; what was sent and never arrived is lost.

/// Ethertype of test frames (IEEE 802 local experimental).
pub const ETHERTYPE: u16 = 0x88b5;
/// First bytes of every test frame's payload.
pub const MAGIC: [u8; 4] = *b"NLD1";
/// Ethernet header bytes.
pub const ETH_HDR: usize = 14;
/// Smallest frame we send (Ethernet minimum without FCS).
pub const MIN_FRAME: usize = 60;
/// Largest frame we send (1500-byte MTU).
pub const MAX_FRAME: usize = 1514;
/// Broadcast MAC address.
pub const BROADCAST: [u8; 6] = [0xff; 6];

const OFF_MAGIC: usize = 14;
const OFF_RUN: usize = 18;
const OFF_SEQ: usize = 22;
const OFF_TS: usize = 30;
const OFF_LEN: usize = 38;
const OFF_PAT: usize = 40;

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

const fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn pattern_key(run: u32, seq: u64, ts: u64, len: u16) -> u64 {
    splitmix(splitmix(seq ^ (u64::from(run) << 32) ^ u64::from(len)) ^ ts)
}

/// Pattern words per frame at most.
const PATTERN_WORDS: usize = (MAX_FRAME - OFF_PAT).div_ceil(8);

/// Fixed random words: the pattern of `key` is `key ^ MASKS[k]` for its `k`th 8 bytes, cheap
/// enough to fill and check 1514-byte frames at millions per second, and different in every
/// word between keys (frames).
static MASKS: [u64; PATTERN_WORDS] = {
    let mut t = [0u64; PATTERN_WORDS];
    let mut k = 0;
    while k < PATTERN_WORDS {
        t[k] = splitmix(k as u64 ^ 0x6e65_742d_6c6f_6164);
        k += 1;
    }
    t
};

/// The `k`th 8-byte word of the pattern of `key`.
#[inline]
fn pattern_word(key: u64, k: usize) -> u64 {
    key ^ MASKS[k]
}

fn fill_pattern(buf: &mut [u8], key: u64) {
    let mut chunks = buf.chunks_exact_mut(8);
    let mut k = 0;
    for c in &mut chunks {
        c.copy_from_slice(&pattern_word(key, k).to_le_bytes());
        k += 1;
    }
    let rest = chunks.into_remainder();
    let n = rest.len();
    rest.copy_from_slice(&pattern_word(key, k).to_le_bytes()[..n]);
}

fn pattern_matches(buf: &[u8], key: u64) -> bool {
    let mut chunks = buf.chunks_exact(8);
    let mut k = 0;
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        if u64::from_le_bytes(w) != pattern_word(key, k) {
            return false;
        }
        k += 1;
    }
    let rest = chunks.remainder();
    rest == &pattern_word(key, k).to_le_bytes()[..rest.len()]
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

/// Builds the test frames of one direction of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameBuilder {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// Run id (identifies the run and direction).
    pub run: u32,
    /// Frame length in bytes, [`MIN_FRAME`]..=[`MAX_FRAME`].
    pub len: usize,
}

impl FrameBuilder {
    /// Writes frame `seq`, sent at `ts` ns, into `buf` (exactly `self.len` bytes).
    pub fn write(&self, buf: &mut [u8], seq: u64, ts: u64) {
        assert_eq!(buf.len(), self.len, "frame buffer of the wrong length");
        assert!((MIN_FRAME..=MAX_FRAME).contains(&self.len), "frame length out of range");
        buf[0..6].copy_from_slice(&self.dst);
        buf[6..12].copy_from_slice(&self.src);
        buf[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        buf[OFF_MAGIC..OFF_RUN].copy_from_slice(&MAGIC);
        buf[OFF_RUN..OFF_SEQ].copy_from_slice(&self.run.to_le_bytes());
        buf[OFF_SEQ..OFF_TS].copy_from_slice(&seq.to_le_bytes());
        buf[OFF_TS..OFF_LEN].copy_from_slice(&ts.to_le_bytes());
        let len = self.len as u16;
        buf[OFF_LEN..OFF_PAT].copy_from_slice(&len.to_le_bytes());
        fill_pattern(&mut buf[OFF_PAT..], pattern_key(self.run, seq, ts, len));
    }

    /// A new frame of `self.len` bytes.
    pub fn build(&self, seq: u64, ts: u64) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.write(&mut v, seq, ts);
        v
    }
}

/// What a received frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A valid test frame of run `run`.
    Ours {
        /// Run id.
        run: u32,
        /// Sequence number.
        seq: u64,
        /// Send time, ns since the run started.
        ts: u64,
    },
    /// A test frame of run `run` whose content is wrong.
    Corrupt {
        /// Run id.
        run: u32,
        /// What is wrong.
        why: Corruption,
    },
    /// Not a test frame (other ethertype or magic, or too short to be one).
    Foreign,
}

/// How a test frame is damaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// Its length field does not match its length (truncated or padded).
    Length {
        /// Length field.
        claimed: u16,
        /// Bytes received.
        got: usize,
    },
    /// A pattern byte (or the sequence number, time or length it derives from) is wrong.
    Pattern,
}

/// Classifies a received frame (`frame` without the virtio-net header).
pub fn parse(frame: &[u8]) -> Parsed {
    if frame.len() < OFF_PAT || frame[12..14] != ETHERTYPE.to_be_bytes() || frame[OFF_MAGIC..OFF_RUN] != MAGIC {
        return Parsed::Foreign;
    }
    let run = u32::from_le_bytes([frame[OFF_RUN], frame[OFF_RUN + 1], frame[OFF_RUN + 2], frame[OFF_RUN + 3]]);
    let seq = u64_at(frame, OFF_SEQ);
    let ts = u64_at(frame, OFF_TS);
    let claimed = u16::from_le_bytes([frame[OFF_LEN], frame[OFF_LEN + 1]]);
    // We never send frames outside MIN_FRAME..=MAX_FRAME (nor could check their pattern).
    if usize::from(claimed) != frame.len() || !(MIN_FRAME..=MAX_FRAME).contains(&frame.len()) {
        return Parsed::Corrupt { run, why: Corruption::Length { claimed, got: frame.len() } };
    }
    if !pattern_matches(&frame[OFF_PAT..], pattern_key(run, seq, ts, claimed)) {
        return Parsed::Corrupt { run, why: Corruption::Pattern };
    }
    Parsed::Ours { run, seq, ts }
}

/// What [`Tracker::record`] made of a sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// First arrival, in order (above everything seen so far).
    New,
    /// First arrival, below a sequence number already seen.
    OutOfOrder,
    /// Seen before.
    Duplicate,
    /// Never sent (only possible if the pattern check was fooled).
    NeverSent,
}

/// The receiver's bookkeeping for one direction: which sequence numbers arrived, how often.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    seen: Vec<u64>,
    /// Distinct frames received intact.
    pub received: u64,
    /// Bytes of those frames.
    pub bytes: u64,
    /// Frames received again.
    pub duplicates: u64,
    /// Frames received after a later one.
    pub out_of_order: u64,
    /// Test frames of this run with a bad length or pattern.
    pub corrupted: u64,
    /// Highest sequence number received (None before the first).
    pub highest: Option<u64>,
}

impl Tracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records intact frame `seq` of `len` bytes when `sent` frames have been sent so far.
    pub fn record(&mut self, seq: u64, len: usize, sent: u64) -> Arrival {
        if seq >= sent {
            self.corrupted += 1;
            return Arrival::NeverSent;
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.seen.len() {
            self.seen.resize((word + 1).next_power_of_two().max(1024), 0);
        }
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        self.seen[word] |= 1 << bit;
        self.received += 1;
        self.bytes += len as u64;
        match self.highest {
            Some(h) if seq < h => {
                self.out_of_order += 1;
                Arrival::OutOfOrder
            }
            _ => {
                self.highest = Some(seq);
                Arrival::New
            }
        }
    }

    /// Records a corrupted frame.
    pub fn record_corrupt(&mut self) {
        self.corrupted += 1;
    }

    /// True if `seq` arrived.
    pub fn seen(&self, seq: u64) -> bool {
        self.seen.get((seq / 64) as usize).is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    /// The sequence number after the highest received (0 before the first).
    pub fn next_expected(&self) -> u64 {
        self.highest.map_or(0, |h| h + 1)
    }

    /// Frames of the `sent` that never arrived.
    pub fn lost(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.received)
    }

    /// Sequence gaps among the `sent` frames: (number of runs of missing frames, the first few
    /// missing sequence numbers).
    pub fn gaps(&self, sent: u64, first: usize) -> (u64, Vec<u64>) {
        let mut runs = 0;
        let mut list = Vec::new();
        let mut prev_missing = false;
        for seq in 0..sent {
            let missing = !self.seen(seq);
            if missing {
                if !prev_missing {
                    runs += 1;
                }
                if list.len() < first {
                    list.push(seq);
                }
            }
            prev_missing = missing;
        }
        (runs, list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder(len: usize) -> FrameBuilder {
        FrameBuilder { dst: [0x52, 0x54, 0, 0, 0, 2], src: [2, 0, 0, 0, 0, 1], run: 0xabcd_0001, len }
    }

    #[test]
    fn frames_round_trip_at_every_size() {
        for len in MIN_FRAME..=MAX_FRAME {
            let b = builder(len);
            let f = b.build(len as u64 * 7, 123_456);
            assert_eq!(f.len(), len);
            assert_eq!(&f[0..6], &b.dst);
            assert_eq!(&f[6..12], &b.src);
            assert_eq!(&f[12..14], &[0x88, 0xb5]);
            assert_eq!(parse(&f), Parsed::Ours { run: b.run, seq: len as u64 * 7, ts: 123_456 }, "len {len}");
        }
    }

    #[test]
    fn patterns_differ_between_sequence_numbers() {
        let b = builder(1514);
        // Every 8-byte word of the pattern differs between two frames (their keys differ), so
        // a frame holding another's payload never passes.
        for (s1, s2) in [(1, 2), (0, 1 << 40), (7, 7 + 64)] {
            let (f1, f2) = (b.build(s1, 0), b.build(s2, 0));
            for (w1, w2) in f1[OFF_PAT..].chunks(8).zip(f2[OFF_PAT..].chunks(8)) {
                assert_ne!(w1, w2, "seq {s1} and {s2}");
            }
            let mut mixed = f2.clone();
            mixed[OFF_SEQ..OFF_TS].copy_from_slice(&f1[OFF_SEQ..OFF_TS]);
            assert!(matches!(parse(&mixed), Parsed::Corrupt { why: Corruption::Pattern, .. }));
        }
        // A frame of another run is recognised as such.
        let other = FrameBuilder { run: 7, ..b }.build(1, 0);
        assert!(matches!(parse(&other), Parsed::Ours { run: 7, .. }));
    }

    #[test]
    fn every_damaged_byte_is_detected() {
        let b = builder(64);
        let good = b.build(42, 99);
        // Everything after the magic (a damaged run id makes a corrupt frame of another run).
        for i in OFF_RUN..good.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut f = good.clone();
                f[i] ^= flip;
                match parse(&f) {
                    Parsed::Corrupt { run, .. } => assert_eq!(run == b.run, i >= OFF_SEQ, "byte {i}"),
                    p => panic!("byte {i} ^ {flip:#x} not detected: {p:?}"),
                }
            }
        }
        // The MAC addresses are not covered (a forwarder may rewrite them).
        let mut f = good.clone();
        f[0] ^= 1;
        assert!(matches!(parse(&f), Parsed::Ours { .. }));
    }

    #[test]
    fn truncated_and_padded_frames_are_corrupt() {
        let b = builder(100);
        let f = b.build(5, 0);
        assert_eq!(parse(&f[..99]), Parsed::Corrupt { run: b.run, why: Corruption::Length { claimed: 100, got: 99 } });
        let mut padded = f.clone();
        padded.push(0);
        assert!(matches!(parse(&padded), Parsed::Corrupt { why: Corruption::Length { .. }, .. }));
        // Lengths we never send, even when the length field agrees.
        for len in [OFF_PAT, MIN_FRAME - 1, MAX_FRAME + 1, 9000] {
            let mut f = builder(MAX_FRAME).build(5, 0);
            f.resize(len, 0xaa);
            f[OFF_LEN..OFF_PAT].copy_from_slice(&(len as u16).to_le_bytes());
            assert!(matches!(parse(&f), Parsed::Corrupt { why: Corruption::Length { .. }, .. }), "{len}");
        }
    }

    #[test]
    fn foreign_frames() {
        let mut f = builder(60).build(0, 0);
        f[12] = 0x08;
        f[13] = 0x00;
        assert_eq!(parse(&f), Parsed::Foreign);
        let mut f = builder(60).build(0, 0);
        f[OFF_MAGIC] = b'X';
        assert_eq!(parse(&f), Parsed::Foreign);
        assert_eq!(parse(&[0u8; 20]), Parsed::Foreign);
        assert_eq!(parse(&[]), Parsed::Foreign);
    }

    #[test]
    fn tracker_counts_loss_duplicates_and_reordering() {
        let mut t = Tracker::new();
        assert_eq!(t.next_expected(), 0);
        assert_eq!(t.record(0, 64, 10), Arrival::New);
        assert_eq!(t.record(1, 64, 10), Arrival::New);
        assert_eq!(t.record(4, 64, 10), Arrival::New);
        assert_eq!(t.record(3, 64, 10), Arrival::OutOfOrder);
        assert_eq!(t.record(1, 64, 10), Arrival::Duplicate);
        assert_eq!(t.record(4, 64, 10), Arrival::Duplicate);
        assert_eq!(t.record(10, 64, 10), Arrival::NeverSent);
        assert_eq!(t.record(9, 64, 10), Arrival::New);
        assert_eq!((t.received, t.duplicates, t.out_of_order, t.corrupted), (5, 2, 1, 1));
        assert_eq!(t.bytes, 5 * 64);
        assert_eq!(t.next_expected(), 10);
        assert_eq!(t.lost(10), 5);
        assert_eq!(t.gaps(10, 3), (2, vec![2, 5, 6]));
        assert!(t.seen(3) && !t.seen(2) && !t.seen(1 << 40));
    }

    #[test]
    fn tracker_grows_to_large_sequence_numbers() {
        let mut t = Tracker::new();
        let n = 1_000_000u64;
        for seq in (0..n).rev() {
            assert_ne!(t.record(seq, 60, n), Arrival::Duplicate);
        }
        assert_eq!(t.received, n);
        assert_eq!(t.out_of_order, n - 1);
        assert_eq!(t.lost(n), 0);
        assert_eq!(t.gaps(n, 10), (0, vec![]));
    }

    /// A frame's corrupted and duplicated copies as the receiver would count them.
    #[test]
    fn parse_then_track() {
        let b = builder(128);
        let mut t = Tracker::new();
        let mut frames: Vec<Vec<u8>> = (0..8).map(|s| b.build(s, s * 1000)).collect();
        frames[3][100] ^= 0x10;
        frames.push(frames[5].clone());
        for f in &frames {
            match parse(f) {
                Parsed::Ours { seq, .. } => {
                    t.record(seq, f.len(), 8);
                }
                Parsed::Corrupt { .. } => t.record_corrupt(),
                Parsed::Foreign => panic!("foreign"),
            }
        }
        assert_eq!((t.received, t.duplicates, t.corrupted, t.lost(8)), (7, 1, 1, 1));
    }
}
