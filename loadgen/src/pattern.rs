//! Verification patterns. Every 512-byte sector written with `--verify` is self-describing:
//!
//! | words  | content                                            |
//! |--------|----------------------------------------------------|
//! | 0      | sector number                                      |
//! | 1      | generation (high 32 bits) and a magic (low 32)     |
//! | 2      | run seed                                           |
//! | 3..63  | pseudo-random payload derived from the three above |
//! | 63     | checksum of words 0..63                            |
//!
//! So a read can tell a correct sector from a stale one (older generation), a misplaced one
//! (another sector's data), one from another run (other seed) and a corrupt one (checksum).

const WORDS: usize = 64;
/// Bytes per pattern unit (one virtio sector).
pub const UNIT: usize = 512;
const MAGIC: u32 = 0x424c_4b4c; // "BLKL"

/// What is wrong with a sector that failed verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// Checksum or payload does not match: the data is damaged (or never written by us).
    Corrupt,
    /// A well-formed sector, but of another sector number.
    Misplaced {
        /// The sector number found in the data.
        found: u64,
    },
    /// A well-formed sector written by another run (different seed).
    ForeignRun,
    /// A well-formed sector of an older (or newer) generation than expected.
    WrongGeneration {
        /// Generation found in the data.
        found: u32,
    },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::Corrupt => write!(f, "corrupt data (checksum or payload mismatch)"),
            Mismatch::Misplaced { found } => write!(f, "data of sector {found}"),
            Mismatch::ForeignRun => write!(f, "data written by another run"),
            Mismatch::WrongGeneration { found } => write!(f, "stale data (generation {found})"),
        }
    }
}

#[inline]
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[inline]
fn checksum(words: &[u64]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &w in words {
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
    }
    h ^ (h >> 32)
}

fn payload_seed(sector: u64, generation: u32, seed: u64) -> u64 {
    let mut s = seed ^ sector.wrapping_mul(0xd6e8_feb8_6659_fd93) ^ (u64::from(generation) << 17);
    splitmix(&mut s)
}

fn expected_words(sector: u64, generation: u32, seed: u64) -> [u64; WORDS] {
    let mut w = [0u64; WORDS];
    w[0] = sector;
    w[1] = (u64::from(generation) << 32) | u64::from(MAGIC);
    w[2] = seed;
    let mut s = payload_seed(sector, generation, seed);
    for x in &mut w[3..WORDS - 1] {
        *x = splitmix(&mut s);
    }
    w[WORDS - 1] = checksum(&w[..WORDS - 1]);
    w
}

fn to_words(buf: &[u8]) -> [u64; WORDS] {
    let mut w = [0u64; WORDS];
    for (x, c) in w.iter_mut().zip(buf.chunks_exact(8)) {
        *x = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
    }
    w
}

/// Fills `buf` (a whole number of sectors) with the pattern of sectors `first_sector..`.
pub fn fill(buf: &mut [u8], first_sector: u64, generation: u32, seed: u64) {
    assert!(buf.len().is_multiple_of(UNIT), "pattern buffer is not a whole number of sectors");
    for (i, chunk) in buf.chunks_exact_mut(UNIT).enumerate() {
        let w = expected_words(first_sector + i as u64, generation, seed);
        for (c, x) in chunk.chunks_exact_mut(8).zip(w.iter()) {
            c.copy_from_slice(&x.to_le_bytes());
        }
    }
}

/// Checks one sector against the pattern for (`sector`, `generation`, `seed`).
pub fn check_sector(buf: &[u8], sector: u64, generation: u32, seed: u64) -> Result<(), Mismatch> {
    assert_eq!(buf.len(), UNIT, "check_sector takes one sector");
    let w = to_words(buf);
    if checksum(&w[..WORDS - 1]) != w[WORDS - 1] || (w[1] & 0xffff_ffff) as u32 != MAGIC {
        return Err(Mismatch::Corrupt);
    }
    if w[0] != sector {
        return Err(Mismatch::Misplaced { found: w[0] });
    }
    if w[2] != seed {
        return Err(Mismatch::ForeignRun);
    }
    let found = (w[1] >> 32) as u32;
    if found != generation {
        return Err(Mismatch::WrongGeneration { found });
    }
    if w != expected_words(sector, generation, seed) {
        return Err(Mismatch::Corrupt);
    }
    Ok(())
}

/// A small, fast PRNG (xorshift64*) for offsets.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeds the generator (any seed, including 0, works).
    pub fn new(seed: u64) -> Self {
        let mut s = seed;
        Rng(splitmix(&mut s) | 1)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0), with negligible bias for the n we use.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, 1000, 7, 42);
        for i in 0..8 {
            check_sector(&buf[i * UNIT..(i + 1) * UNIT], 1000 + i as u64, 7, 42).unwrap();
        }
    }

    #[test]
    fn detects_each_kind_of_mismatch() {
        let mut buf = vec![0u8; 1024];
        fill(&mut buf, 10, 3, 99);
        let s0 = &buf[..UNIT];
        assert_eq!(check_sector(s0, 10, 4, 99), Err(Mismatch::WrongGeneration { found: 3 }));
        assert_eq!(check_sector(s0, 11, 3, 99), Err(Mismatch::Misplaced { found: 10 }));
        assert_eq!(check_sector(s0, 10, 3, 98), Err(Mismatch::ForeignRun));
        assert_eq!(check_sector(&[0u8; UNIT], 10, 3, 99), Err(Mismatch::Corrupt));
        // A single flipped bit anywhere is caught.
        for byte in [0usize, 9, 100, 300, 503, 504, 511] {
            let mut bad = s0.to_vec();
            bad[byte] ^= 0x10;
            assert!(check_sector(&bad, 10, 3, 99).is_err(), "flip at {byte} not detected");
        }
        // Sector 11 is fine.
        check_sector(&buf[UNIT..], 11, 3, 99).unwrap();
    }

    #[test]
    fn patterns_differ_by_sector_generation_and_seed() {
        let mut a = vec![0u8; UNIT];
        let mut b = vec![0u8; UNIT];
        fill(&mut a, 5, 1, 1);
        fill(&mut b, 5, 2, 1);
        assert_ne!(a[24..504], b[24..504]);
        fill(&mut b, 6, 1, 1);
        assert_ne!(a[24..504], b[24..504]);
        fill(&mut b, 5, 1, 2);
        assert_ne!(a[24..504], b[24..504]);
    }

    #[test]
    fn rng_below_is_in_range_and_spread() {
        let mut r = Rng::new(0);
        let mut hits = [0u32; 10];
        for _ in 0..10_000 {
            let v = r.below(10);
            assert!(v < 10);
            hits[v as usize] += 1;
        }
        assert!(hits.iter().all(|&h| h > 800), "{hits:?}");
    }
}
