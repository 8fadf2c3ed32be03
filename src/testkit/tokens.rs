//! Sectors that carry a token: the same 64-bit word repeated over 512 bytes, so a reader can
//! tell which write a sector holds, and that it holds all of one (a torn or mixed sector has no
//! token).

use crate::storage::SECTOR_SIZE;

/// One virtio-blk sector.
pub type Sector = [u8; SECTOR_SIZE as usize];

/// The sector holding `token`. Token 0 is the all-zero sector (what a fresh or discarded range
/// reads as).
pub fn token_sector(token: u64) -> Sector {
    let mut s = [0u8; SECTOR_SIZE as usize];
    for word in s.chunks_exact_mut(8) {
        word.copy_from_slice(&token.to_le_bytes());
    }
    s
}

/// The token a sector holds, or `None` if its words differ (torn, mixed or foreign data).
pub fn sector_token(sector: &[u8]) -> Option<u64> {
    let first: [u8; 8] = sector.get(..8)?.try_into().ok()?;
    sector
        .chunks(8)
        .all(|w| w == first.as_slice())
        .then(|| u64::from_le_bytes(first))
}

/// A token naming writer `writer` (0..256) and its `seq`-th write.
pub fn writer_token(writer: u64, seq: u64) -> u64 {
    (writer << 56) | seq
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_torn_sectors_have_none() {
        for t in [0, 1, writer_token(3, 77), u64::MAX] {
            assert_eq!(sector_token(&token_sector(t)), Some(t));
        }
        let mut torn = token_sector(5);
        torn[300..].copy_from_slice(&token_sector(6)[300..]);
        assert_eq!(sector_token(&torn), None);
        assert_eq!(sector_token(&[0u8; 4]), None);
    }
}
