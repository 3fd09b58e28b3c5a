//! Portable kernels over the packed tiles: the fallback on CPUs without AVX2/FMA/F16C and the
//! reference the SIMD kernels are tested against. Same arithmetic and block order as the SIMD
//! kernels: exact integer block sums, then `acc += sumi * (d_w * d_x) + m_w * s_x` in f32.

use super::pack::{Q4Tile, Q8Tile, ROWS};
use super::quant::Row;
use half::f16;

/// Dot products of one activation row with the 8 weight rows of one group of Q4 tiles.
pub(crate) fn q4_group(tiles: &[Q4Tile], x: Row<'_>, out: &mut [f32; ROWS]) {
    *out = [0.0; ROWS];
    for (b, tile) in tiles.iter().enumerate() {
        let xq = &x.qs[b * 32..b * 32 + 32];
        for (r, acc) in out.iter_mut().enumerate() {
            let mut sumi = 0i32;
            for (p, reg) in tile.qs.iter().enumerate() {
                for j in 0..4 {
                    let byte = reg[4 * r + j];
                    sumi += (byte & 0x0F) as i32 * xq[4 * p + j] as i32;
                    sumi += (byte >> 4) as i32 * xq[16 + 4 * p + j] as i32;
                }
            }
            *acc += sumi as f32 * (tile.d[r].to_f32() * x.d[b]);
            *acc += tile.m[r].to_f32() * x.s[b];
        }
    }
}

/// Dot products of one activation row with the 8 weight rows of one group of Q8 tiles.
pub(crate) fn q8_group(tiles: &[Q8Tile], d: &[[f16; ROWS]], x: Row<'_>, out: &mut [f32; ROWS]) {
    *out = [0.0; ROWS];
    for (b, (tile, d)) in tiles.iter().zip(d).enumerate() {
        let xq = &x.qs[b * 32..b * 32 + 32];
        for (r, acc) in out.iter_mut().enumerate() {
            let mut sumi = 0i32;
            for (p, reg) in tile.qs.iter().enumerate() {
                for j in 0..4 {
                    sumi += reg[4 * r + j] as i32 * xq[4 * p + j] as i32;
                }
            }
            *acc += sumi as f32 * (d[r].to_f32() * x.d[b]);
        }
    }
}
