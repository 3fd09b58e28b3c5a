//! What a cloud endpoint charges per token, and the exact cost of a request from its token
//! counts. The cloud path uses [`Price::cost`] twice: with the worst case (whole prompt uncached,
//! `max_tokens` of output) to size a reservation, and with the upstream's reported usage to
//! settle it.

use serde::{Deserialize, Serialize};

use crate::money::{Usd, decimal_ceil};

/// Picodollars per token = dollars per million tokens * 1e6.
const PICO_DIGITS: u32 = 6;
const PICOS_PER_NANO: u128 = 1_000;
/// No cloud charges this much; a price above it is a typo (or a per-token price given as
/// per-million).
const MAX_DOLLARS_PER_MILLION: f64 = 1e6;

/// A per-token price list, in picodollars (1e-12 USD) per token, so published prices with up
/// to six decimals of dollars per million tokens are exact.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Price {
    /// Prompt tokens the upstream did not serve from its cache, picodollars each.
    input: u64,
    /// Prompt tokens served from the upstream's prompt cache, picodollars each.
    cached_input: u64,
    /// Generated tokens, picodollars each.
    output: u64,
}

/// A price that is not a price: `field` is one of "input", "cached_input", "output".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} price: {reason}")]
pub struct PriceError {
    /// Which price: "input", "cached_input" or "output".
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Price {
    /// USD per 1M tokens, as clouds publish them. Rounded up to the picodollar per token.
    pub fn per_million(input: f64, cached_input: f64, output: f64) -> Result<Price, PriceError> {
        Ok(Price {
            input: per_token("input", input)?,
            cached_input: per_token("cached_input", cached_input)?,
            output: per_token("output", output)?,
        })
    }

    /// Exact cost of a request with these token counts, rounded up to the nanodollar
    /// (saturating at the largest [`Usd`]).
    pub fn cost(&self, uncached_input: u64, cached_input: u64, output: u64) -> Usd {
        let picos = u128::from(uncached_input) * u128::from(self.input)
            + u128::from(cached_input) * u128::from(self.cached_input)
            + u128::from(output) * u128::from(self.output);
        let nanos = picos.div_ceil(PICOS_PER_NANO);
        Usd::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Uncached prompt tokens, picodollars per token.
    pub fn input_picos(&self) -> u64 {
        self.input
    }

    /// Cached prompt tokens, picodollars per token.
    pub fn cached_input_picos(&self) -> u64 {
        self.cached_input
    }

    /// Generated tokens, picodollars per token.
    pub fn output_picos(&self) -> u64 {
        self.output
    }
}

fn per_token(field: &'static str, dollars_per_million: f64) -> Result<u64, PriceError> {
    let reason = if !dollars_per_million.is_finite() {
        "must be a finite number of dollars per million tokens"
    } else if dollars_per_million < 0.0 {
        "must not be negative"
    } else if dollars_per_million > MAX_DOLLARS_PER_MILLION {
        "is over $1000000 per million tokens, which no cloud charges"
    } else {
        return decimal_ceil(dollars_per_million, PICO_DIGITS)
            .and_then(|p| u64::try_from(p).ok())
            .ok_or(PriceError {
                field,
                reason: "cannot be represented",
            });
    };
    Err(PriceError { field, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: f64, cached: f64, output: f64) -> Price {
        match Price::per_million(input, cached, output) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn per_million_converts_to_exact_picodollars_per_token() {
        let p = price(0.15, 0.075, 0.6);
        assert_eq!(p.input_picos(), 150_000);
        assert_eq!(p.cached_input_picos(), 75_000);
        assert_eq!(p.output_picos(), 600_000);
    }

    #[test]
    fn cost_is_exact_when_it_lands_on_a_nanodollar() {
        // 1M tokens at $2.50/M in, 1M cached at $1.25/M, 1M out at $10/M: $13.75.
        let p = price(2.5, 1.25, 10.0);
        assert_eq!(
            p.cost(1_000_000, 1_000_000, 1_000_000),
            Usd::from_nanos(13_750_000_000)
        );
        assert_eq!(p.cost(0, 0, 0), Usd::ZERO);
    }

    #[test]
    fn cost_rounds_up_to_the_nanodollar() {
        // One token at $0.15/M is 150,000 picodollars = 150 nanodollars exactly.
        let p = price(0.15, 0.0, 0.0);
        assert_eq!(p.cost(1, 0, 0), Usd::from_nanos(150));
        // One token at $0.0001/M is 100 picodollars: a tenth of a nanodollar, charged as one.
        let tiny = price(0.0001, 0.0, 0.0);
        assert_eq!(tiny.cost(1, 0, 0), Usd::from_nanos(1));
        assert_eq!(tiny.cost(10, 0, 0), Usd::from_nanos(1));
        assert_eq!(tiny.cost(11, 0, 0), Usd::from_nanos(2));
    }

    #[test]
    fn cost_saturates_instead_of_overflowing() {
        let p = price(1e6, 1e6, 1e6);
        assert_eq!(
            p.cost(u64::MAX, u64::MAX, u64::MAX),
            Usd::from_nanos(u64::MAX)
        );
    }

    #[test]
    fn per_million_names_the_bad_field() {
        let err = Price::per_million(1.0, -1.0, 1.0).err();
        assert_eq!(err.as_ref().map(|e| e.field), Some("cached_input"));
        let err = Price::per_million(f64::NAN, 1.0, 1.0).err();
        assert_eq!(err.as_ref().map(|e| e.field), Some("input"));
        let err = Price::per_million(1.0, 1.0, 2e6).err();
        assert_eq!(err.as_ref().map(|e| e.field), Some("output"));
        let err = Price::per_million(1.0, 1.0, f64::INFINITY).err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("invalid output price: must be a finite number of dollars per million tokens")
        );
    }
}
