//! Money as integers. [`Usd`] counts nanodollars, so a cap compares exactly and a million small
//! charges add up to exactly what they say; floating point appears only where an operator's
//! config or a cloud's price list hands us dollars.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

const NANOS_PER_DOLLAR: u64 = 1_000_000_000;

/// The largest amount [`Usd::from_dollars`] accepts: far beyond any cap, far below `u64` nanos.
const MAX_DOLLARS: f64 = 1e9;

/// An amount of US dollars, in nanodollars (1e-9 USD). Serializes as the integer nanos.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(transparent)]
pub struct Usd(u64);

impl Usd {
    /// No money.
    pub const ZERO: Usd = Usd(0);

    /// `nanos` nanodollars.
    pub const fn from_nanos(nanos: u64) -> Usd {
        Usd(nanos)
    }

    /// The amount in nanodollars.
    pub const fn nanos(self) -> u64 {
        self.0
    }

    /// Dollars as written in a config, rounded up to the nanodollar. `None` for negative, NaN,
    /// infinite, or more than a billion dollars.
    ///
    /// Rounding works on the shortest decimal that reads back as `dollars` (what the operator
    /// typed), so `0.3` is exactly 300,000,000 nanos although `0.3 * 1e9` is not.
    pub fn from_dollars(dollars: f64) -> Option<Usd> {
        if !(0.0..=MAX_DOLLARS).contains(&dollars) {
            return None;
        }
        let nanos = decimal_ceil(dollars, 9)?;
        u64::try_from(nanos).ok().map(Usd)
    }

    /// The amount in dollars, for display and metrics (not exact past 2^53 nanos).
    pub fn dollars(self) -> f64 {
        self.0 as f64 / NANOS_PER_DOLLAR as f64
    }

    /// The sum, or the largest amount if it would not fit.
    pub const fn saturating_add(self, other: Usd) -> Usd {
        Usd(self.0.saturating_add(other.0))
    }

    /// The difference, or zero if `other` is larger.
    pub const fn saturating_sub(self, other: Usd) -> Usd {
        Usd(self.0.saturating_sub(other.0))
    }
}

/// `$1.234567`: at least two decimals, up to nine, trailing zeros trimmed past two.
impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / NANOS_PER_DOLLAR;
        let mut frac = format!("{:09}", self.0 % NANOS_PER_DOLLAR);
        while frac.len() > 2 && frac.ends_with('0') {
            frac.pop();
        }
        write!(f, "${whole}.{frac}")
    }
}

/// `x * 10^digits`, rounded up, computed on the shortest decimal form of `x` so that values
/// typed in decimal scale exactly. `x` must be finite and non-negative; `None` otherwise.
pub(crate) fn decimal_ceil(x: f64, digits: u32) -> Option<u128> {
    if !x.is_finite() || x < 0.0 {
        return None;
    }
    // `Display` for f64 never uses an exponent and prints the shortest round-trip decimal.
    let text = format!("{}", x.abs());
    let (whole, frac) = text.split_once('.').unwrap_or((&text, ""));
    let whole: u128 = whole.parse().ok()?;
    let scale = 10u128.checked_pow(digits)?;
    let mut scaled = whole.checked_mul(scale)?;
    let kept = frac.len().min(digits as usize);
    let mut frac_value: u128 = 0;
    for c in frac[..kept].chars() {
        frac_value = frac_value * 10 + u128::from(c.to_digit(10)?);
    }
    frac_value *= 10u128.pow(digits - kept as u32);
    scaled = scaled.checked_add(frac_value)?;
    if frac[kept..].chars().any(|c| c != '0') {
        scaled = scaled.checked_add(1)?;
    }
    Some(scaled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_dollars_is_exact_for_decimal_input() {
        assert_eq!(Usd::from_dollars(0.3), Some(Usd::from_nanos(300_000_000)));
        assert_eq!(Usd::from_dollars(0.1), Some(Usd::from_nanos(100_000_000)));
        assert_eq!(Usd::from_dollars(5.0), Some(Usd::from_nanos(5_000_000_000)));
        assert_eq!(Usd::from_dollars(0.000000001), Some(Usd::from_nanos(1)));
        assert_eq!(
            Usd::from_dollars(123.456789012),
            Some(Usd::from_nanos(123_456_789_012))
        );
    }

    #[test]
    fn from_dollars_rounds_sub_nanodollar_up() {
        assert_eq!(Usd::from_dollars(0.0000000001), Some(Usd::from_nanos(1)));
        assert_eq!(
            Usd::from_dollars(1.0000000001),
            Some(Usd::from_nanos(1_000_000_001))
        );
        assert_eq!(Usd::from_dollars(1e-300), Some(Usd::from_nanos(1)));
    }

    #[test]
    fn from_dollars_rejects_what_is_not_an_amount() {
        assert_eq!(Usd::from_dollars(-0.01), None);
        assert_eq!(Usd::from_dollars(f64::NAN), None);
        assert_eq!(Usd::from_dollars(f64::INFINITY), None);
        assert_eq!(Usd::from_dollars(f64::NEG_INFINITY), None);
        assert_eq!(Usd::from_dollars(1e9 + 1.0), None);
        assert_eq!(
            Usd::from_dollars(1e9),
            Some(Usd::from_nanos(1_000_000_000 * 1_000_000_000))
        );
        assert_eq!(Usd::from_dollars(0.0), Some(Usd::ZERO));
        assert_eq!(Usd::from_dollars(-0.0), Some(Usd::ZERO));
    }

    #[test]
    fn display_keeps_two_decimals_and_trims_the_rest() {
        assert_eq!(Usd::from_nanos(5_000_000_000).to_string(), "$5.00");
        assert_eq!(Usd::from_nanos(123_000).to_string(), "$0.000123");
        assert_eq!(Usd::from_nanos(1_234_567_000).to_string(), "$1.234567");
        assert_eq!(Usd::from_nanos(120_000_000).to_string(), "$0.12");
        assert_eq!(Usd::from_nanos(100_000_000).to_string(), "$0.10");
        assert_eq!(Usd::from_nanos(1).to_string(), "$0.000000001");
        assert_eq!(Usd::ZERO.to_string(), "$0.00");
    }

    #[test]
    fn arithmetic_saturates() {
        let max = Usd::from_nanos(u64::MAX);
        assert_eq!(max.saturating_add(Usd::from_nanos(1)), max);
        assert_eq!(Usd::ZERO.saturating_sub(Usd::from_nanos(1)), Usd::ZERO);
        assert_eq!(Usd::from_dollars(2.5).map(Usd::dollars), Some(2.5));
    }

    #[test]
    fn serializes_as_integer_nanos() {
        let json = serde_json::to_string(&Usd::from_nanos(42)).ok();
        assert_eq!(json.as_deref(), Some("42"));
    }
}
