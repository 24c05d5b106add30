//! Which parts of a write the host reads back from the medium to judge the
//! driver's answer, where the host can read the medium
//! (`hardware::BlockHardware::medium`: QEMU's NVMe model, the memory
//! disk), and what each part must hold.
//!
//! A write of up to [`WHOLE_UP_TO`] sectors is read back whole. A longer
//! one is read back in three stretches of [`STRETCH`] sectors: its first,
//! its last, and one at a place drawn when it is sent, which the driver
//! cannot know. So a write not done, done to other sectors, done from
//! another buffer, or answered before the device finished it is caught at
//! every answer; one done only in part is caught with the chance that a
//! stretch falls in the part not done. Reading a 128 KiB write back whole
//! cost 13 us of copy and CRC a request here, and a third of QEMU's write
//! throughput (docs/DESIGN.md, "Judging a driver's writes").
//!
//! What it is not: a defence against a driver that forges data. A driver
//! drives its device and can write any sector at any time; this catches
//! writes that are lost, as checksums and the simulated controller's
//! write ledger do.

/// Writes of up to this many sectors (16 KiB) are read back whole: one
/// read of the medium costs about the same up to there (0.5 us for a
/// sector, 0.7 for 4 KiB, 2.8 for 32 KiB, 12.9 for 128 KiB, each with its
/// CRC, measured here).
pub const WHOLE_UP_TO: u32 = 32;

/// Sectors per stretch of a longer write (4 KiB).
pub const STRETCH: u32 = 8;

/// One part of a write: `count` sectors from its sector `first` on
/// (counted from the write's first), and the CRC-32 of what was sent there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stretch {
    /// First sector, from the write's start.
    pub first: u32,
    /// Sectors.
    pub count: u32,
    /// CRC-32 of the data sent there.
    pub crc: u32,
}

/// The parts of a write of `sectors` sectors to read back, as (first,
/// count); `draw` places the middle stretch of a long write.
pub fn stretches(sectors: u32, draw: u64) -> impl Iterator<Item = (u32, u32)> {
    let long = sectors > WHOLE_UP_TO;
    let whole = (!long && sectors > 0).then_some((0, sectors));
    let (head, tail, middle) = match long {
        true => {
            // Anywhere strictly between the head and the tail stretches.
            let room = sectors - 3 * STRETCH + 1;
            let middle = STRETCH + (draw % u64::from(room)) as u32;
            (Some((0, STRETCH)), Some((sectors - STRETCH, STRETCH)), Some((middle, STRETCH)))
        }
        false => (None, None, None),
    };
    whole.into_iter().chain(head).chain(middle).chain(tail)
}

/// The parts of a write of `len` bytes to read back, with the CRC-32 of
/// what was sent there: `read(at, part)` fills `part` with the payload's
/// bytes from offset `at` (at most 4 KiB at a time); `draw` places the
/// middle part of a long write.
pub fn sent(len: usize, draw: u64, mut read: impl FnMut(usize, &mut [u8])) -> Vec<Stretch> {
    let mut chunk = [0u8; 4096];
    let sectors = u32::try_from(len / 512).unwrap_or(u32::MAX);
    stretches(sectors, draw)
        .map(|(first, count)| {
            let mut crc = crc32fast::Hasher::new();
            let (start, end) = (first as usize * 512, (first + count) as usize * 512);
            for at in (start..end).step_by(chunk.len()) {
                let part = &mut chunk[..(end - at).min(4096)];
                read(at, part);
                crc.update(part);
            }
            Stretch { first, count, crc: crc.finalize() }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_was_sent_is_summed_part_by_part() {
        let payload: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
        let parts = sent(payload.len(), 3, |at, part| part.copy_from_slice(&payload[at..at + part.len()]));
        let places: Vec<_> = stretches(128, 3).collect();
        assert_eq!(parts.len(), places.len());
        for (part, (first, count)) in parts.iter().zip(places) {
            let bytes = &payload[first as usize * 512..(first + count) as usize * 512];
            assert_eq!(*part, Stretch { first, count, crc: crc32fast::hash(bytes) });
        }
        let short = sent(1024, 3, |at, part| part.copy_from_slice(&payload[at..at + part.len()]));
        assert_eq!(short, [Stretch { first: 0, count: 2, crc: crc32fast::hash(&payload[..1024]) }]);
    }

    #[test]
    fn short_writes_are_read_back_whole() {
        assert_eq!(stretches(1, 5).collect::<Vec<_>>(), [(0, 1)]);
        assert_eq!(stretches(WHOLE_UP_TO, 5).collect::<Vec<_>>(), [(0, WHOLE_UP_TO)]);
        assert_eq!(stretches(0, 5).count(), 0);
    }

    #[test]
    fn long_writes_are_read_back_at_both_ends_and_a_drawn_place_between() {
        let sectors = 256;
        let mut middles = std::collections::BTreeSet::new();
        for draw in 0..10_000u64 {
            let parts: Vec<_> = stretches(sectors, draw.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
            assert_eq!(parts.len(), 3);
            assert_eq!((parts[0], parts[2]), ((0, STRETCH), (sectors - STRETCH, STRETCH)));
            let (middle, count) = parts[1];
            assert_eq!(count, STRETCH);
            assert!(middle >= STRETCH && middle + STRETCH <= sectors - STRETCH, "{middle} overlaps an end");
            middles.insert(middle);
        }
        // Every place between the ends can be drawn.
        assert_eq!(middles.len() as u32, sectors - 3 * STRETCH + 1);
        let shortest_long = WHOLE_UP_TO + 1;
        assert!(stretches(shortest_long, u64::MAX).all(|(first, count)| first + count <= shortest_long));
    }
}
