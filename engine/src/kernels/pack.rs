//! Repacking of GGUF weight blocks into row-interleaved tiles.
//!
//! A tile holds one 32-value block of [`ROWS`] consecutive output rows, arranged so that one
//! 256-bit register carries 4 consecutive k-values of each of the 8 rows: an integer multiply-add
//! against the same 4 activation bytes broadcast to every lane then leaves row `r`'s partial sum
//! in lane `r`, and no horizontal reduction is needed per block.
//!
//! Rows past `n` in the last tile are zero (scale 0), so kernels may compute them and drop them.

use candle_core::quantized::GgmlDType;
use half::f16;

/// Output rows per tile: one 256-bit lane of f32 per row.
pub(crate) const ROWS: usize = 8;
/// Values per quantization block (`QK4_0 == QK4_1 == QK8_0`).
pub(crate) const BLOCK: usize = 32;

/// One block of 8 rows of 4-bit weights (Q4_0 or Q4_1).
///
/// `qs[p][4 * r + j]` is byte `4 * p + j` of row `r`'s GGUF block: its low nibble is value
/// `4 * p + j` and its high nibble value `16 + 4 * p + j`. Dequantized value:
/// `d[r] * nibble + m[r]` (for Q4_0, `m = -8 * d`).
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Q4Tile {
    pub(crate) qs: [[u8; 32]; 4],
    pub(crate) d: [f16; ROWS],
    pub(crate) m: [f16; ROWS],
}

/// One block of 8 rows of 8-bit weights (Q8_0), scales kept apart (see [`Q8Weights`]).
///
/// `qs[p][4 * r + j]` is value `4 * p + j` of row `r`.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Q8Tile {
    pub(crate) qs: [[i8; 32]; 8],
}

/// Q8_0 weights: tiles and their scales in parallel arrays, so tiles stay 256 bytes and aligned.
pub(crate) struct Q8Weights {
    pub(crate) tiles: Vec<Q8Tile>,
    /// `d[t][r]`: scale of row `r` in tile `t`.
    pub(crate) d: Vec<[f16; ROWS]>,
}

/// Packed weights of one matrix; tile `t = group * blocks + block`, `group` = rows `8g..8g+8`.
pub(crate) enum Packed {
    Q4(Vec<Q4Tile>),
    Q8(Q8Weights),
}

impl Packed {
    /// Appends `other`'s tile groups after this matrix's; false (and no change) when the two
    /// layouts differ. Both must have the same number of blocks per row.
    pub(crate) fn append(&mut self, other: Packed) -> bool {
        match (self, other) {
            (Packed::Q4(a), Packed::Q4(b)) => a.extend(b),
            (Packed::Q8(a), Packed::Q8(b)) => {
                a.tiles.extend(b.tiles);
                a.d.extend(b.d);
            }
            _ => return false,
        }
        true
    }
}

const ZERO_Q4: Q4Tile = Q4Tile {
    qs: [[0; 32]; 4],
    d: [f16::ZERO; ROWS],
    m: [f16::ZERO; ROWS],
};

const ZERO_Q8: Q8Tile = Q8Tile { qs: [[0; 32]; 8] };

fn f16_at(bytes: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// Repacks `n` rows of `k` values of GGUF blocks of type `dtype` from `data`.
///
/// None when the type is not handled, `k` is not a whole number of blocks, `data` has the wrong
/// length, or (Q4_0) a scale is too large for `-8 * d` to fit an f16.
pub(crate) fn pack(dtype: GgmlDType, data: &[u8], n: usize, k: usize) -> Option<Packed> {
    if k == 0 || !k.is_multiple_of(BLOCK) {
        return None;
    }
    let blocks = k / BLOCK;
    let block_bytes = match dtype {
        GgmlDType::Q4_0 => 18,
        GgmlDType::Q4_1 => 20,
        GgmlDType::Q8_0 => 34,
        _ => return None,
    };
    if data.len() != n.checked_mul(blocks)?.checked_mul(block_bytes)? {
        return None;
    }
    let groups = n.div_ceil(ROWS);
    let block_at = |row: usize, b: usize| {
        let at = (row * blocks + b) * block_bytes;
        &data[at..at + block_bytes]
    };
    match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
            let mut tiles = vec![ZERO_Q4; groups * blocks];
            for (t, tile) in tiles.iter_mut().enumerate() {
                let (g, b) = (t / blocks, t % blocks);
                for r in 0..ROWS.min(n - g * ROWS) {
                    let raw = block_at(g * ROWS + r, b);
                    let d = f16_at(raw, 0);
                    let (m, qs) = if dtype == GgmlDType::Q4_1 {
                        (f16_at(raw, 2), &raw[4..20])
                    } else {
                        // Q4_0 values are `d * (nibble - 8)`; -8 * d is exact in f16 unless
                        // it overflows.
                        let m = f16::from_f32(-8.0 * d.to_f32());
                        if m.is_infinite() && d.is_finite() {
                            return None;
                        }
                        (m, &raw[2..18])
                    };
                    tile.d[r] = d;
                    tile.m[r] = m;
                    for (p, reg) in tile.qs.iter_mut().enumerate() {
                        reg[4 * r..4 * r + 4].copy_from_slice(&qs[4 * p..4 * p + 4]);
                    }
                }
            }
            Some(Packed::Q4(tiles))
        }
        GgmlDType::Q8_0 => {
            let mut tiles = vec![ZERO_Q8; groups * blocks];
            let mut d = vec![[f16::ZERO; ROWS]; groups * blocks];
            for (t, (tile, d)) in tiles.iter_mut().zip(d.iter_mut()).enumerate() {
                let (g, b) = (t / blocks, t % blocks);
                for r in 0..ROWS.min(n - g * ROWS) {
                    let raw = block_at(g * ROWS + r, b);
                    d[r] = f16_at(raw, 0);
                    for (p, reg) in tile.qs.iter_mut().enumerate() {
                        for j in 0..4 {
                            reg[4 * r + j] = raw[2 + 4 * p + j] as i8;
                        }
                    }
                }
            }
            Some(Packed::Q8(Q8Weights { tiles, d }))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_tile_places_row_bytes_in_lane_groups() {
        // 9 rows (two groups, the second padded), one block each; byte j of row r = 16 * r + j.
        let n = 9;
        let mut data = Vec::new();
        for r in 0..n {
            data.extend_from_slice(&f16::from_f32(r as f32).to_le_bytes());
            data.extend_from_slice(&f16::from_f32(-(r as f32)).to_le_bytes());
            data.extend((0..16).map(|j| (16 * r + j) as u8));
        }
        let Some(Packed::Q4(tiles)) = pack(GgmlDType::Q4_1, &data, n, 32) else {
            panic!("q4_1 must pack");
        };
        assert_eq!(tiles.len(), 2);
        for r in 0..ROWS {
            for p in 0..4 {
                for j in 0..4 {
                    assert_eq!(tiles[0].qs[p][4 * r + j] as usize, 16 * r + 4 * p + j);
                }
            }
            assert_eq!(tiles[0].d[r].to_f32(), r as f32);
            assert_eq!(tiles[0].m[r].to_f32(), -(r as f32));
        }
        assert_eq!(tiles[1].qs[0][0], 128);
        assert_eq!(tiles[1].d[1], f16::ZERO);
        assert_eq!(tiles[1].qs[3][4..], [0; 28]);
    }

    #[test]
    fn pack_rejects_wrong_length_and_partial_blocks() {
        assert!(pack(GgmlDType::Q4_1, &[0; 40], 2, 32).is_some());
        assert!(pack(GgmlDType::Q4_1, &[0; 39], 2, 32).is_none());
        assert!(pack(GgmlDType::Q4_1, &[0; 40], 1, 48).is_none());
        assert!(pack(GgmlDType::Q4K, &[0; 144], 1, 256).is_none());
    }
}
