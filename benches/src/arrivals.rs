//! When requests are sent: an arrival process turned into a schedule of offsets from the start
//! of a run, and the bounds (request count and time limit) that always cut it off.
//!
//! ```text
//! Arrivals + Bounds + seeded RNG --schedule--> [t0, t1, ...] (ascending offsets) --> run
//! ```
//!
//! The process follows vLLM's `benchmark_serving`: intervals are gamma-distributed with shape
//! `burstiness` and mean `1 / rate`, so burstiness 1 is a Poisson process, below 1 is burstier
//! and above 1 is more regular; an infinite rate sends every request at once. A closed loop at
//! concurrency N is an infinite rate with at most N requests in flight ([`Load::closed_loop`]):
//! the next request goes out when one finishes. One difference from vLLM: its first request goes
//! out at 0, here the first arrival comes after one interval, as in a Poisson process started at
//! time 0, so that N requests at rate r span about N / r seconds.

use std::num::NonZeroUsize;
use std::time::Duration;

use rand::Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How request arrivals are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "process", rename_all = "snake_case")]
pub enum Arrivals {
    /// Every request is due at the start (vLLM's `--request-rate inf`).
    Immediate,
    /// Gamma-distributed intervals: shape `burstiness`, mean `1 / rate` seconds.
    Gamma {
        /// Mean requests per second; positive and finite.
        rate: f64,
        /// Gamma shape: 1 is Poisson, below 1 burstier, above 1 more regular.
        burstiness: f64,
    },
}

impl Arrivals {
    /// A Poisson process at `rate` requests per second; an infinite rate is [`Arrivals::Immediate`].
    pub fn poisson(rate: f64) -> Result<Self> {
        Self::gamma(rate, 1.0)
    }

    /// Gamma intervals with mean `1 / rate` and shape `burstiness` (vLLM's `--burstiness`).
    pub fn gamma(rate: f64, burstiness: f64) -> Result<Self> {
        if !(burstiness.is_finite() && burstiness > 0.0) {
            return Err(Error::invalid(
                "burstiness",
                &burstiness.to_string(),
                "must be positive and finite",
            ));
        }
        if rate == f64::INFINITY {
            return Ok(Arrivals::Immediate);
        }
        if !(rate.is_finite() && rate > 0.0) {
            return Err(Error::invalid(
                "rate",
                &rate.to_string(),
                "must be positive (or inf)",
            ));
        }
        Ok(Arrivals::Gamma { rate, burstiness })
    }

    /// The mean rate in requests per second (infinite for [`Arrivals::Immediate`]).
    pub fn rate(&self) -> f64 {
        match self {
            Arrivals::Immediate => f64::INFINITY,
            Arrivals::Gamma { rate, .. } => *rate,
        }
    }
}

/// Limits every run respects: whichever is reached first ends the sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    /// Most requests sent.
    pub max_requests: usize,
    /// No request is sent at or after this offset from the start; requests in flight then are
    /// still awaited (each within its own timeout).
    #[serde(with = "secs_f64")]
    pub max_duration: Duration,
}

/// One offered load: an arrival process, optionally capped in concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// When requests become due.
    pub arrivals: Arrivals,
    /// Most requests in flight; a due request waits for a slot (vLLM's `--max-concurrency`).
    pub max_concurrency: Option<NonZeroUsize>,
}

impl Load {
    /// A closed loop: `concurrency` requests in flight, the next sent as soon as one finishes.
    pub fn closed_loop(concurrency: NonZeroUsize) -> Self {
        Load {
            arrivals: Arrivals::Immediate,
            max_concurrency: Some(concurrency),
        }
    }

    /// A short human label: `rate 2/s`, `concurrency 8`, `rate 2/s b=0.5 c<=4`.
    pub fn label(&self) -> String {
        let mut parts = Vec::new();
        match self.arrivals {
            Arrivals::Immediate if self.max_concurrency.is_some() => {}
            Arrivals::Immediate => parts.push("rate inf".to_string()),
            Arrivals::Gamma { rate, burstiness } => {
                parts.push(format!("rate {}/s", trim(rate)));
                if burstiness != 1.0 {
                    parts.push(format!("b={}", trim(burstiness)));
                }
            }
        }
        match (self.arrivals, self.max_concurrency) {
            (Arrivals::Immediate, Some(c)) => parts.push(format!("concurrency {c}")),
            (_, Some(c)) => parts.push(format!("c<={c}")),
            (_, None) => {}
        }
        parts.join(" ")
    }
}

fn trim(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The send times of one run, as offsets from its start: ascending, at most
/// `bounds.max_requests` of them, each before `bounds.max_duration`. Deterministic given the RNG.
pub fn schedule<R: Rng + ?Sized>(
    arrivals: &Arrivals,
    bounds: &Bounds,
    rng: &mut R,
) -> Vec<Duration> {
    match *arrivals {
        Arrivals::Immediate => {
            if bounds.max_duration.is_zero() {
                Vec::new()
            } else {
                vec![Duration::ZERO; bounds.max_requests]
            }
        }
        Arrivals::Gamma { rate, burstiness } => {
            // Validated by the constructors; a hand-built value outside the domain sends nothing
            // rather than panicking.
            let Ok(gamma) = Gamma::new(burstiness, 1.0 / (rate * burstiness)) else {
                return Vec::new();
            };
            let limit = bounds.max_duration.as_secs_f64();
            let mut t = 0.0;
            let mut out = Vec::with_capacity(bounds.max_requests.min(1 << 20));
            while out.len() < bounds.max_requests {
                t += gamma.sample(rng);
                if t >= limit {
                    break;
                }
                out.push(Duration::from_secs_f64(t));
            }
            out
        }
    }
}

/// `Duration` as fractional seconds in JSON.
pub(crate) mod secs_f64 {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn bounds(n: usize, secs: f64) -> Bounds {
        Bounds {
            max_requests: n,
            max_duration: Duration::from_secs_f64(secs),
        }
    }

    /// Mean and (sample) variance of the counts of `seeds` runs.
    fn counts(arrivals: Arrivals, window: f64, seeds: u64) -> (f64, f64) {
        let c: Vec<f64> = (0..seeds)
            .map(|seed| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                schedule(&arrivals, &bounds(usize::MAX, window), &mut rng).len() as f64
            })
            .collect();
        let n = c.len() as f64;
        let mean = c.iter().sum::<f64>() / n;
        let var = c.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var)
    }

    #[test]
    fn poisson_counts_have_the_mean_and_variance_of_rate_times_window() {
        // Count in [0, T) of a Poisson process at rate r: mean rT, variance rT. Over 400 seeds the
        // mean count has standard deviation sqrt(rT / 400); 4 of those is a bound a correct
        // process crosses with probability ~6e-5 (and the seeds are fixed, so it never flakes).
        let (rate, window, seeds) = (5.0, 20.0, 400);
        let (mean, var) = counts(Arrivals::poisson(rate).expect("rate"), window, seeds);
        let expected = rate * window;
        let tolerance = 4.0 * (expected / seeds as f64).sqrt();
        assert!(
            (mean - expected).abs() < tolerance,
            "mean count {mean}, expected {expected} +- {tolerance}"
        );
        // Sample variance of 400 Poisson(100) counts: relative standard error ~ sqrt(2/399) = 7%.
        assert!(
            (var / expected - 1.0).abs() < 0.3,
            "variance {var}, expected about {expected}"
        );
    }

    #[test]
    fn gamma_burstiness_keeps_the_rate_and_scales_the_variance() {
        // A renewal process with gamma(k) intervals has count variance ~ rT / k for large T.
        let (rate, window, seeds) = (5.0, 40.0, 400);
        let expected = rate * window;
        for burstiness in [0.25, 4.0] {
            let (mean, var) = counts(
                Arrivals::gamma(rate, burstiness).expect("gamma"),
                window,
                seeds,
            );
            let tolerance = 4.0 * (expected / burstiness / seeds as f64).sqrt();
            assert!(
                (mean - expected).abs() < tolerance,
                "burstiness {burstiness}: mean {mean}, expected {expected} +- {tolerance}"
            );
            let ratio = var / (expected / burstiness);
            assert!(
                (0.6..1.5).contains(&ratio),
                "burstiness {burstiness}: variance {var}, expected about {}",
                expected / burstiness
            );
        }
    }

    #[test]
    fn same_seed_same_schedule_other_seed_other_schedule() {
        let a = Arrivals::poisson(3.0).expect("rate");
        let b = bounds(50, 1e9);
        let run = |seed| schedule(&a, &b, &mut ChaCha8Rng::seed_from_u64(seed));
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn schedules_are_ascending_and_respect_both_bounds() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let a = Arrivals::poisson(100.0).expect("rate");
        let by_count = schedule(&a, &bounds(10, 1e9), &mut rng);
        assert_eq!(by_count.len(), 10);
        assert!(by_count.windows(2).all(|w| w[0] <= w[1]));
        let by_time = schedule(&a, &bounds(1_000_000, 0.5), &mut rng);
        assert!(by_time.len() < 1_000_000);
        assert!(by_time.iter().all(|t| t.as_secs_f64() < 0.5));
        assert!(
            by_time.len() > 20,
            "about 50 expected, got {}",
            by_time.len()
        );
    }

    #[test]
    fn infinite_rate_sends_everything_at_once() {
        let a = Arrivals::poisson(f64::INFINITY).expect("rate");
        assert_eq!(a, Arrivals::Immediate);
        let s = schedule(&a, &bounds(4, 1.0), &mut ChaCha8Rng::seed_from_u64(0));
        assert_eq!(s, vec![Duration::ZERO; 4]);
        assert!(schedule(&a, &bounds(4, 0.0), &mut ChaCha8Rng::seed_from_u64(0)).is_empty());
    }

    #[test]
    fn invalid_rates_and_burstiness_are_refused() {
        assert!(Arrivals::poisson(0.0).is_err());
        assert!(Arrivals::poisson(-1.0).is_err());
        assert!(Arrivals::poisson(f64::NAN).is_err());
        assert!(Arrivals::gamma(1.0, 0.0).is_err());
        assert!(Arrivals::gamma(1.0, f64::INFINITY).is_err());
    }

    #[test]
    fn labels_read_like_the_flags() {
        let c = NonZeroUsize::new(8).expect("8");
        assert_eq!(Load::closed_loop(c).label(), "concurrency 8");
        let l = Load {
            arrivals: Arrivals::gamma(2.5, 0.5).expect("gamma"),
            max_concurrency: Some(c),
        };
        assert_eq!(l.label(), "rate 2.5/s b=0.5 c<=8");
        let p = Load {
            arrivals: Arrivals::poisson(1.0).expect("rate"),
            max_concurrency: None,
        };
        assert_eq!(p.label(), "rate 1/s");
    }
}
