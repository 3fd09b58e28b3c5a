//! Portable kernels over the packed tiles: the fallback on CPUs without AVX2/FMA/F16C and the
//! reference the SIMD kernels are tested against. Same arithmetic and block order as the SIMD
//! kernels: exact integer block sums, then `acc += sumi * (d_w * d_x) + m_w * s_x` in f32.

use super::pack::{Q4Tile, Q8Tile, ROWS};
use super::quant::{BlockScales, Bytes, Row};
use half::f16;

/// Dot products of one activation row (signed bytes) and its scales (`scales`' row 0) with the
/// 8 weight rows of one group of Q4 tiles.
pub(crate) fn q4_group(
    tiles: &[Q4Tile],
    x: Row<'_>,
    scales: BlockScales<'_>,
    out: &mut [f32; ROWS],
) {
    assert_eq!(x.bytes, Bytes::Signed);
    *out = [0.0; ROWS];
    for (b, tile) in tiles.iter().enumerate() {
        let (dx, sx) = (scales.d[b * scales.stride], scales.s[b * scales.stride]);
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
            *acc += sumi as f32 * (tile.d[r].to_f32() * dx);
            *acc += tile.m[r].to_f32() * sx;
        }
    }
}

/// Dot products of one activation row (signed bytes) and its scales (`scales`' row 0) with the
/// 8 weight rows of one group of Q8 tiles.
pub(crate) fn q8_group(
    tiles: &[Q8Tile],
    d: &[[f16; ROWS]],
    x: Row<'_>,
    scales: BlockScales<'_>,
    out: &mut [f32; ROWS],
) {
    assert_eq!(x.bytes, Bytes::Signed);
    *out = [0.0; ROWS];
    for (b, (tile, d)) in tiles.iter().zip(d).enumerate() {
        let dx = scales.d[b * scales.stride];
        let xq = &x.qs[b * 32..b * 32 + 32];
        for (r, acc) in out.iter_mut().enumerate() {
            let mut sumi = 0i32;
            for (p, reg) in tile.qs.iter().enumerate() {
                for j in 0..4 {
                    sumi += reg[4 * r + j] as i32 * xq[4 * p + j] as i32;
                }
            }
            *acc += sumi as f32 * (d[r].to_f32() * dx);
        }
    }
}
