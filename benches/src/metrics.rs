//! Serving metrics as vLLM's `benchmark_serving` defines them, computed from samples alone.
//!
//! - TTFT, E2E: per successful request. TPOT = (E2E - TTFT) / (output tokens - 1), only for
//!   requests with more than one output token. ITL: every gap of every successful request,
//!   pooled.
//! - Each is summarized by mean, population standard deviation, median (p50), p90 and p99.
//!   Percentiles use linear interpolation between closest ranks, numpy's default
//!   (`np.percentile(x, p)`): rank `p / 100 * (n - 1)` in the sorted values.
//! - Request throughput = completed requests / duration; output-token throughput = output tokens
//!   of completed requests / duration; total-token throughput adds their prompt tokens. The
//!   duration is the run's, from its start until the last request finished.
//! - Goodput = completed requests meeting every SLO / duration. As in vLLM, a request with one
//!   output token has TPOT 0 for this purpose.
//! - Failed requests count in `failed` and by kind in `errors`; their timings are in the raw
//!   samples but in no distribution.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sample::{Sample, TokenCountSource};

/// Service-level objectives; a request is good when it meets every one that is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Slo {
    /// Most time to first token.
    #[serde(with = "opt_ms")]
    pub ttft: Option<Duration>,
    /// Most time per output token.
    #[serde(with = "opt_ms")]
    pub tpot: Option<Duration>,
    /// Most end-to-end latency.
    #[serde(with = "opt_ms")]
    pub e2e: Option<Duration>,
}

impl Slo {
    /// No objective set.
    pub fn is_empty(&self) -> bool {
        self.ttft.is_none() && self.tpot.is_none() && self.e2e.is_none()
    }

    /// Whether a request with these latencies (seconds) meets every objective.
    pub fn met(&self, ttft_s: f64, tpot_s: f64, e2e_s: f64) -> bool {
        let within = |limit: Option<Duration>, x: f64| limit.is_none_or(|l| x <= l.as_secs_f64());
        within(self.ttft, ttft_s) && within(self.tpot, tpot_s) && within(self.e2e, e2e_s)
    }
}

/// Parses `ttft=500ms,tpot=50ms,e2e=2s`; units `us`, `ms`, `s`; a bare number is milliseconds
/// (vLLM's `--goodput` unit).
impl FromStr for Slo {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut slo = Slo::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| Error::invalid("slo", s, format!("{part:?} is not NAME=VALUE")))?;
            let d = parse_duration(value.trim()).map_err(|r| Error::invalid("slo", s, r))?;
            let slot = match name.trim() {
                "ttft" => &mut slo.ttft,
                "tpot" => &mut slo.tpot,
                "e2e" | "e2el" => &mut slo.e2e,
                other => {
                    return Err(Error::invalid(
                        "slo",
                        s,
                        format!("{other:?} is not one of ttft, tpot, e2e"),
                    ));
                }
            };
            *slot = Some(d);
        }
        if slo.is_empty() {
            return Err(Error::invalid("slo", s, "no objective given"));
        }
        Ok(slo)
    }
}

/// `250ms`, `1.5s`, `800us`, or a bare number of milliseconds.
pub fn parse_duration(value: &str) -> std::result::Result<Duration, String> {
    let (num, scale) = if let Some(n) = value.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = value.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1.0)
    } else {
        (value, 1e-3)
    };
    let x: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a duration like 500ms or 2s"))?;
    Duration::try_from_secs_f64(x * scale).map_err(|_| format!("{value:?} is out of range"))
}

/// Summary of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Distribution {
    /// Values summarized.
    pub count: usize,
    pub mean_ms: f64,
    /// Population standard deviation (numpy's default `ddof=0`).
    pub std_ms: f64,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Distribution {
    /// Summarizes values given in seconds; all zero when there are none.
    pub fn of_secs(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().map(|s| s * 1e3).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Self::default();
        }
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        Self {
            count: n,
            mean_ms: mean,
            std_ms: var.sqrt(),
            median_ms: percentile(&v, 50.0),
            p90_ms: percentile(&v, 90.0),
            p99_ms: percentile(&v, 99.0),
            max_ms: v[n - 1],
        }
    }
}

/// The `p`-th percentile (0..=100) of ascending `sorted` values by linear interpolation, as
/// `numpy.percentile`'s default method. `NaN` for no values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    let rank = (p / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// The metrics of one run.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Requests the schedule planned (before the time limit cut it).
    pub planned: usize,
    /// Requests sent.
    pub sent: usize,
    /// Requests that finished without an error.
    pub completed: usize,
    /// Requests that failed.
    pub failed: usize,
    /// Failed requests by kind (`ErrorKind`'s display form).
    pub errors: BTreeMap<String, usize>,
    /// Completed requests whose output tokens were counted from chunks (no usage report).
    pub output_tokens_from_chunks: usize,
    /// From the start of the run until the last request finished.
    pub duration_s: f64,
    /// Prompt tokens of completed requests (the server's count, else the local one).
    pub total_input_tokens: u64,
    /// Output tokens of completed requests.
    pub total_output_tokens: u64,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    /// Completed requests per second meeting every SLO; `None` without SLOs.
    pub goodput: Option<f64>,
    /// Completed requests meeting every SLO; `None` without SLOs.
    pub good: Option<usize>,
    pub ttft: Distribution,
    pub tpot: Distribution,
    pub itl: Distribution,
    pub e2e: Distribution,
}

/// The metrics of a run's samples over its duration.
pub fn summarize(samples: &[Sample], planned: usize, duration: Duration, slo: &Slo) -> Summary {
    let secs = duration.as_secs_f64();
    let per_sec = |x: f64| if secs > 0.0 { x / secs } else { 0.0 };
    let mut s = Summary {
        planned,
        sent: samples.len(),
        duration_s: secs,
        ..Summary::default()
    };
    let (mut ttfts, mut tpots, mut itls, mut e2es) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut good = 0;
    for sample in samples {
        let m = &sample.measured;
        if let Some(e) = &m.error {
            s.failed += 1;
            *s.errors.entry(e.kind.to_string()).or_default() += 1;
            continue;
        }
        s.completed += 1;
        if m.output_tokens_from == TokenCountSource::Chunks {
            s.output_tokens_from_chunks += 1;
        }
        s.total_output_tokens += u64::from(m.output_tokens);
        s.total_input_tokens +=
            u64::from(m.server_prompt_tokens.or(sample.prompt_tokens).unwrap_or(0));
        // A stream that finished without text (zero tokens) has no first token; vLLM would
        // count its TTFT as 0, which flatters the distribution, so it is left out.
        let ttft = m.ttft_s;
        let tpot = match ttft {
            Some(t) if m.output_tokens > 1 => {
                let tpot = (m.e2e_s - t) / f64::from(m.output_tokens - 1);
                tpots.push(tpot);
                tpot
            }
            _ => 0.0,
        };
        if let Some(t) = ttft {
            ttfts.push(t);
        }
        itls.extend_from_slice(&m.itl_s);
        e2es.push(m.e2e_s);
        if slo.met(ttft.unwrap_or(0.0), tpot, m.e2e_s) {
            good += 1;
        }
    }
    s.request_throughput = per_sec(s.completed as f64);
    s.output_throughput = per_sec(s.total_output_tokens as f64);
    s.total_token_throughput = per_sec((s.total_input_tokens + s.total_output_tokens) as f64);
    if !slo.is_empty() {
        s.good = Some(good);
        s.goodput = Some(per_sec(good as f64));
    }
    s.ttft = Distribution::of_secs(&ttfts);
    s.tpot = Distribution::of_secs(&tpots);
    s.itl = Distribution::of_secs(&itls);
    s.e2e = Distribution::of_secs(&e2es);
    s
}

/// `Option<Duration>` as milliseconds (or null) in JSON.
mod opt_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_secs_f64() * 1e3)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<f64>::deserialize(d)?
            .map(|ms| Duration::try_from_secs_f64(ms / 1e3).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{ErrorKind, Measured, RequestError};

    fn ok(ttft: f64, e2e: f64, out: u32, itl: &[f64], prompt: u32) -> Sample {
        Sample {
            index: 0,
            scheduled_s: 0.0,
            sent_s: 0.0,
            prompt_tokens: Some(prompt),
            max_tokens: out,
            measured: Measured {
                ttft_s: Some(ttft),
                e2e_s: e2e,
                itl_s: itl.to_vec(),
                output_tokens: out,
                output_tokens_from: TokenCountSource::Usage,
                server_prompt_tokens: None,
                error: None,
                text: String::new(),
            },
        }
    }

    fn failed(kind: ErrorKind) -> Sample {
        let mut s = ok(0.0, 9.0, 0, &[], 10);
        s.measured.error = Some(RequestError::new(kind, "x"));
        s
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0, 10.0];
        // np.percentile([1,2,3,4,10], [0, 50, 90, 99, 100]) = [1, 3, 7.6, 9.76, 10]
        for (p, want) in [
            (0.0, 1.0),
            (50.0, 3.0),
            (90.0, 7.6),
            (99.0, 9.76),
            (100.0, 10.0),
        ] {
            assert!(
                close(percentile(&v, p), want),
                "p{p}: {}",
                percentile(&v, p)
            );
        }
        // np.percentile([5, 1], 50) on the sorted pair = 3; a single value is every percentile.
        assert!(close(percentile(&[1.0, 5.0], 50.0), 3.0));
        assert!(close(percentile(&[7.0], 99.0), 7.0));
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn summary_matches_hand_computed_values() {
        // Three completed requests over 4 s, one failure, one timeout.
        //   a: ttft 0.1, e2e 0.5, 5 tokens -> tpot (0.5-0.1)/4 = 0.1;  itl 0.1 x 4
        //   b: ttft 0.2, e2e 1.2, 11 tokens -> tpot 1.0/10 = 0.1;      itl 0.05, 0.15
        //   c: ttft 0.3, e2e 0.3, 1 token -> no tpot (goodput treats it as 0)
        let samples = vec![
            ok(0.1, 0.5, 5, &[0.1, 0.1, 0.1, 0.1], 100),
            failed(ErrorKind::HttpStatus { status: 500 }),
            ok(0.2, 1.2, 11, &[0.05, 0.15], 200),
            failed(ErrorKind::Timeout),
            ok(0.3, 0.3, 1, &[], 300),
        ];
        let s = summarize(&samples, 6, Duration::from_secs(4), &Slo::default());
        assert_eq!((s.planned, s.sent, s.completed, s.failed), (6, 5, 3, 2));
        assert_eq!(
            s.errors,
            BTreeMap::from([("http 500".to_string(), 1), ("timeout".to_string(), 1)])
        );
        assert_eq!((s.total_input_tokens, s.total_output_tokens), (600, 17));
        assert!(close(s.request_throughput, 0.75));
        assert!(close(s.output_throughput, 17.0 / 4.0));
        assert!(close(s.total_token_throughput, 617.0 / 4.0));
        assert_eq!(s.goodput, None);

        // TTFT ms: [100, 200, 300]: mean 200, median 200, p90 280, p99 298, std sqrt(20000/3).
        assert_eq!(s.ttft.count, 3);
        assert!(close(s.ttft.mean_ms, 200.0));
        assert!(close(s.ttft.median_ms, 200.0));
        assert!(close(s.ttft.p90_ms, 280.0));
        assert!(close(s.ttft.p99_ms, 298.0));
        assert!(close(s.ttft.std_ms, (20000.0f64 / 3.0).sqrt()));
        // TPOT ms: [100, 100] from a and b only.
        assert_eq!(s.tpot.count, 2);
        assert!(close(s.tpot.mean_ms, 100.0));
        // ITL ms pooled: [50, 100, 100, 100, 100, 150]: mean 100, median 100,
        // p90 rank 4.5 -> 125, p99 rank 4.95 -> 147.5.
        assert_eq!(s.itl.count, 6);
        assert!(close(s.itl.mean_ms, 100.0));
        assert!(close(s.itl.p90_ms, 125.0));
        assert!(close(s.itl.p99_ms, 147.5));
        // E2E ms: [300, 500, 1200]: median 500, p99 rank 1.98 -> 500 + 0.98 * 700 = 1186.
        assert!(close(s.e2e.median_ms, 500.0));
        assert!(close(s.e2e.p99_ms, 1186.0));
        assert!(close(s.e2e.max_ms, 1200.0));
    }

    #[test]
    fn goodput_counts_completed_requests_meeting_every_slo() {
        let samples = vec![
            ok(0.1, 0.5, 5, &[], 1),    // ttft 100, tpot 100, e2e 500
            ok(0.6, 1.0, 5, &[], 1),    // ttft 600: misses ttft
            ok(0.1, 2.1, 5, &[], 1),    // tpot 500: misses tpot
            ok(0.2, 0.2, 1, &[], 1),    // one token: tpot 0, meets all
            failed(ErrorKind::Connect), // never good
        ];
        let slo: Slo = "ttft=500ms,tpot=0.15s".parse().expect("slo");
        let s = summarize(&samples, 5, Duration::from_secs(2), &slo);
        assert_eq!(s.good, Some(2));
        assert!(close(s.goodput.expect("goodput"), 1.0));
        let e2e_only: Slo = "e2e=600".parse().expect("slo");
        let s = summarize(&samples, 5, Duration::from_secs(2), &e2e_only);
        assert_eq!(
            s.good,
            Some(2),
            "e2e <= 600 ms: the first and the one-token request"
        );
    }

    #[test]
    fn slo_specs_parse_units_and_refuse_nonsense() {
        let slo: Slo = "ttft=500ms, tpot=50, e2e=2s".parse().expect("slo");
        assert_eq!(slo.ttft, Some(Duration::from_millis(500)));
        assert_eq!(slo.tpot, Some(Duration::from_millis(50)));
        assert_eq!(slo.e2e, Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        for bad in ["", "ttft", "ttft=fast", "speed=1s", "ttft=-1s"] {
            assert!(bad.parse::<Slo>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn an_empty_run_summarizes_to_zeros() {
        let s = summarize(&[], 0, Duration::ZERO, &Slo::default());
        assert_eq!(s.completed, 0);
        assert_eq!(s.ttft, Distribution::default());
        assert_eq!(s.request_throughput, 0.0);
    }
}
