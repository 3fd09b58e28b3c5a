//! What each request asks: synthetic prompts of a chosen token length made from real tokens of
//! the served model's vocabulary, or prompts read from a JSONL file, optionally behind a system
//! prompt every request shares (for prefix-cache work).
//!
//! ```text
//! LengthDist (input, output) + seeded RNG + tokenizer --synthetic--> [RequestSpec]
//! JSONL file --load_jsonl--> [DatasetEntry] --from_dataset--> [RequestSpec]
//! ```
//!
//! Synthetic prompts are built like vLLM's random dataset: random token ids are decoded to text;
//! since re-encoding decoded text does not always give back as many tokens, the id list is
//! trimmed or extended and re-checked until the text encodes to the stated length (a few rounds;
//! the length actually reached is recorded). Lengths count the prompt's own tokens: a server
//! that adds a BOS token sees one more, and reports it in `usage.prompt_tokens`, which each
//! sample keeps too.

use std::io::BufRead;
use std::path::Path;
use std::str::FromStr;

use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Rounds of re-encoding when fitting a prompt to its length.
const FIT_ROUNDS: usize = 8;

/// A distribution of token counts. Parsed from `N` (fixed), `A..B` (uniform, inclusive) or
/// `M~S` (normal with mean M and standard deviation S, rounded and clamped to `1..=2M`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "dist", rename_all = "snake_case")]
pub enum LengthDist {
    /// Always this many tokens.
    Fixed { len: u32 },
    /// Uniform over `min..=max`.
    Uniform { min: u32, max: u32 },
    /// Normal, rounded, clamped to `1..=2 * mean`.
    Normal { mean: f64, std: f64 },
}

impl LengthDist {
    /// One length, at least 1.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u32 {
        match *self {
            LengthDist::Fixed { len } => len.max(1),
            LengthDist::Uniform { min, max } => rng.random_range(min..=max).max(1),
            LengthDist::Normal { mean, std } => {
                let x = Normal::new(mean, std).map_or(mean, |n| n.sample(rng));
                x.round().clamp(1.0, (2.0 * mean).max(1.0)) as u32
            }
        }
    }

    /// The length a reader should think of: the fixed value or the mean.
    pub fn mean(&self) -> f64 {
        match *self {
            LengthDist::Fixed { len } => f64::from(len),
            LengthDist::Uniform { min, max } => (f64::from(min) + f64::from(max)) / 2.0,
            LengthDist::Normal { mean, .. } => mean,
        }
    }
}

impl FromStr for LengthDist {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::invalid("length", s, reason);
        let int = |t: &str| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| bad("expected N, A..B or M~S with token counts"))
        };
        let dist = if let Some((a, b)) = s.split_once("..") {
            let (min, max) = (int(a)?, int(b.trim_start_matches('='))?);
            if min > max {
                return Err(bad("the range is empty"));
            }
            LengthDist::Uniform { min, max }
        } else if let Some((m, sd)) = s.split_once('~') {
            let mean = f64::from(int(m)?);
            let std: f64 = sd
                .trim()
                .parse()
                .map_err(|_| bad("the standard deviation is not a number"))?;
            if !(std.is_finite() && std >= 0.0) {
                return Err(bad("the standard deviation must be finite and >= 0"));
            }
            LengthDist::Normal { mean, std }
        } else {
            LengthDist::Fixed { len: int(s)? }
        };
        let zero = match dist {
            LengthDist::Fixed { len } => len == 0,
            LengthDist::Uniform { max, .. } => max == 0,
            LengthDist::Normal { mean, .. } => mean == 0.0,
        };
        if zero {
            return Err(bad("lengths must be at least 1"));
        }
        Ok(dist)
    }
}

impl std::fmt::Display for LengthDist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LengthDist::Fixed { len } => write!(f, "{len}"),
            LengthDist::Uniform { min, max } => write!(f, "{min}..{max}"),
            LengthDist::Normal { mean, std } => write!(f, "{mean}~{std}"),
        }
    }
}

/// One request's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestSpec {
    /// The prompt text, sent as is (no chat template).
    pub prompt: String,
    /// The prompt's tokens by the local tokenizer, when one was used.
    pub prompt_tokens: Option<u32>,
    /// Most tokens to generate.
    pub max_tokens: u32,
}

/// Text to tokens and back: the served model's tokenizer, or a test double.
pub trait TokenCodec {
    /// The tokens of `text`, without special tokens added.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// The text of `ids`.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// Ids a synthetic prompt may use: ordinary tokens whose text is whole characters.
    fn prompt_ids(&self) -> Result<Vec<u32>>;
}

impl TokenCodec for baton_text::Tokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(baton_text::Tokenizer::encode(self, text, false)?)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(baton_text::Tokenizer::decode(self, ids, false)?)
    }

    fn prompt_ids(&self) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for id in 0..self.vocab_size() as u32 {
            if self.is_special(id) {
                continue;
            }
            // A byte-level token holding part of a character decodes to U+FFFD; it would
            // re-encode as other tokens, so the fitting loop would have to undo it.
            let text = baton_text::Tokenizer::decode(self, &[id], false)?;
            if !text.is_empty() && !text.contains(char::REPLACEMENT_CHARACTER) {
                ids.push(id);
            }
        }
        Ok(ids)
    }
}

/// How to synthesize prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Synthetic {
    /// Tokens of each request's own part of the prompt.
    pub input: LengthDist,
    /// `max_tokens` of each request.
    pub output: LengthDist,
    /// Tokens of a system prompt every request starts with (0: none).
    pub shared_prefix_len: u32,
}

/// `n` synthetic requests: each prompt is the shared prefix then its own tokens, fitted so the
/// whole prompt encodes to `shared_prefix_len + input` tokens. Deterministic given the RNG.
pub fn synthetic<C: TokenCodec + ?Sized, R: Rng + ?Sized>(
    codec: &C,
    spec: &Synthetic,
    n: usize,
    rng: &mut R,
) -> Result<Vec<RequestSpec>> {
    let pool = prompt_pool(codec)?;
    let (prefix, prefix_len) = if spec.shared_prefix_len > 0 {
        fit(codec, &pool, "", 0, spec.shared_prefix_len as usize, rng)?
    } else {
        (String::new(), 0)
    };
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let input = spec.input.sample(rng) as usize;
        let max_tokens = spec.output.sample(rng);
        let (prompt, len) = fit(codec, &pool, &prefix, prefix_len, prefix_len + input, rng)?;
        out.push(RequestSpec {
            prompt,
            prompt_tokens: Some(len as u32),
            max_tokens,
        });
    }
    Ok(out)
}

/// `prefix` (which encodes to `prefix_len` tokens) followed by random tokens, so that the whole
/// encodes to `target` tokens, or as close as [`FIT_ROUNDS`] rounds get. Returns the text and
/// its token count.
/// The token ids prompts are drawn from; an error when the tokenizer has none.
pub(crate) fn prompt_pool<C: TokenCodec + ?Sized>(codec: &C) -> Result<Vec<u32>> {
    let pool = codec.prompt_ids()?;
    if pool.is_empty() {
        return Err(Error::invalid(
            "tokenizer",
            "",
            "has no ordinary tokens to build prompts from",
        ));
    }
    Ok(pool)
}

pub(crate) fn fit<C: TokenCodec + ?Sized, R: Rng + ?Sized>(
    codec: &C,
    pool: &[u32],
    prefix: &str,
    prefix_len: usize,
    target: usize,
    rng: &mut R,
) -> Result<(String, usize)> {
    let pick = |rng: &mut R| pool[rng.random_range(0..pool.len())];
    let mut ids: Vec<u32> = (0..target.saturating_sub(prefix_len))
        .map(|_| pick(rng))
        .collect();
    let mut best: Option<(String, usize)> = None;
    for _ in 0..FIT_ROUNDS {
        let text = format!("{prefix}{}", codec.decode(&ids)?);
        let len = codec.encode(&text)?.len();
        let closer = best
            .as_ref()
            .is_none_or(|(_, b)| len.abs_diff(target) < b.abs_diff(target));
        if closer {
            best = Some((text, len));
        }
        if len == target {
            break;
        }
        if len > target {
            ids.truncate(ids.len().saturating_sub(len - target));
        } else {
            ids.extend((0..target - len).map(|_| pick(rng)));
        }
    }
    Ok(best.unwrap_or_default())
}

/// One line of a JSONL prompt file. Fields read: `prompt` (string, required) and `max_tokens`
/// (integer, optional: the output length distribution decides when it is absent); any other
/// field is ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetEntry {
    /// The prompt text, sent as is.
    pub prompt: String,
    /// Most tokens to generate for this prompt.
    #[serde(default)]
    pub max_tokens: Option<u32>,
}

/// Reads a JSONL prompt file: one object per line, blank lines skipped.
pub fn load_jsonl(path: &Path) -> Result<Vec<DatasetEntry>> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let entry: DatasetEntry = serde_json::from_str(&line).map_err(|e| Error::Dataset {
            path: path.to_path_buf(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        out.push(entry);
    }
    if out.is_empty() {
        return Err(Error::Dataset {
            path: path.to_path_buf(),
            line: 0,
            reason: "no prompts".into(),
        });
    }
    Ok(out)
}

/// `n` requests from dataset entries, in file order, starting over when the file is shorter
/// than `n`. A shared prefix, when given, is put before every prompt. Entries without
/// `max_tokens` draw one from `output`; prompt tokens are counted when a codec is given.
pub fn from_dataset<C: TokenCodec + ?Sized, R: Rng + ?Sized>(
    entries: &[DatasetEntry],
    n: usize,
    output: &LengthDist,
    shared_prefix: &str,
    codec: Option<&C>,
    rng: &mut R,
) -> Result<Vec<RequestSpec>> {
    let mut out = Vec::with_capacity(n);
    for entry in entries.iter().cycle().take(n) {
        let prompt = format!("{shared_prefix}{}", entry.prompt);
        let prompt_tokens = match codec {
            Some(c) => Some(c.encode(&prompt)?.len() as u32),
            None => None,
        };
        out.push(RequestSpec {
            prompt,
            prompt_tokens,
            max_tokens: entry.max_tokens.unwrap_or_else(|| output.sample(rng)),
        });
    }
    Ok(out)
}

/// A shared system prompt of `len` tokens made like a synthetic prompt (for dataset runs).
pub fn shared_prefix<C: TokenCodec + ?Sized, R: Rng + ?Sized>(
    codec: &C,
    len: u32,
    rng: &mut R,
) -> Result<String> {
    if len == 0 {
        return Ok(String::new());
    }
    let pool = prompt_pool(codec)?;
    Ok(fit(codec, &pool, "", 0, len as usize, rng)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// A codec whose tokens are 26 lowercase letters and "ab", which merges: decoding `a`, `b`
    /// gives "ab", which encodes back as one token, so fitting has to correct for it.
    struct MergingLetters;

    impl TokenCodec for MergingLetters {
        fn encode(&self, text: &str) -> Result<Vec<u32>> {
            let mut ids = Vec::new();
            let b = text.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i..].starts_with(b"ab") {
                    ids.push(26);
                    i += 2;
                } else {
                    ids.push(u32::from(b[i] - b'a'));
                    i += 1;
                }
            }
            Ok(ids)
        }

        fn decode(&self, ids: &[u32]) -> Result<String> {
            Ok(ids
                .iter()
                .map(|&id| {
                    if id == 26 {
                        "ab".to_string()
                    } else {
                        char::from(b'a' + id as u8).to_string()
                    }
                })
                .collect())
        }

        fn prompt_ids(&self) -> Result<Vec<u32>> {
            // Only a and b, so merges are frequent.
            Ok(vec![0, 1])
        }
    }

    fn parse(s: &str) -> LengthDist {
        s.parse().expect("length")
    }

    #[test]
    fn length_specs_parse_and_print_back() {
        assert_eq!(parse("128"), LengthDist::Fixed { len: 128 });
        assert_eq!(parse("64..256"), LengthDist::Uniform { min: 64, max: 256 });
        assert_eq!(parse("64..=256"), LengthDist::Uniform { min: 64, max: 256 });
        assert_eq!(
            parse("100~25"),
            LengthDist::Normal {
                mean: 100.0,
                std: 25.0
            }
        );
        for s in ["128", "64..256", "100~25"] {
            assert_eq!(parse(s).to_string(), s);
        }
        for bad in ["", "0", "x", "10..5", "5..x", "10~-1", "0~3"] {
            assert!(bad.parse::<LengthDist>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn lengths_stay_in_their_ranges() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let u = parse("10..20");
        let n = parse("50~100");
        for _ in 0..1000 {
            assert!((10..=20).contains(&u.sample(&mut rng)));
            assert!((1..=100).contains(&n.sample(&mut rng)));
        }
        assert_eq!(parse("7").sample(&mut rng), 7);
    }

    #[test]
    fn synthetic_prompts_encode_to_the_stated_length_despite_merges() {
        let spec = Synthetic {
            input: parse("5..40"),
            output: parse("16"),
            shared_prefix_len: 0,
        };
        let reqs = synthetic(
            &MergingLetters,
            &spec,
            50,
            &mut ChaCha8Rng::seed_from_u64(1),
        )
        .expect("synthetic");
        assert_eq!(reqs.len(), 50);
        for r in &reqs {
            let len = MergingLetters.encode(&r.prompt).expect("encode").len() as u32;
            assert_eq!(Some(len), r.prompt_tokens, "{:?}", r.prompt);
            assert!((5..=40).contains(&len), "{len}");
            assert_eq!(r.max_tokens, 16);
        }
    }

    #[test]
    fn shared_prefix_starts_every_prompt_and_counts_in_the_length() {
        let spec = Synthetic {
            input: parse("10"),
            output: parse("4"),
            shared_prefix_len: 30,
        };
        let reqs = synthetic(&MergingLetters, &spec, 8, &mut ChaCha8Rng::seed_from_u64(2))
            .expect("synthetic");
        let prefix =
            shared_prefix(&MergingLetters, 30, &mut ChaCha8Rng::seed_from_u64(2)).expect("prefix");
        for r in &reqs {
            assert!(r.prompt.starts_with(&prefix));
            assert_eq!(r.prompt_tokens, Some(40));
        }
    }

    #[test]
    fn synthetic_prompts_are_reproducible_from_the_seed() {
        let spec = Synthetic {
            input: parse("20~5"),
            output: parse("1..64"),
            shared_prefix_len: 4,
        };
        let make = |seed| {
            synthetic(
                &MergingLetters,
                &spec,
                10,
                &mut ChaCha8Rng::seed_from_u64(seed),
            )
            .expect("synthetic")
        };
        assert_eq!(make(9), make(9));
        assert_ne!(make(9), make(10));
    }

    #[test]
    fn jsonl_reads_prompt_and_max_tokens_and_names_the_bad_line() {
        let dir = std::env::temp_dir().join(format!("baton-bench-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let good = dir.join("good.jsonl");
        std::fs::write(
            &good,
            "{\"prompt\": \"hello\", \"max_tokens\": 3}\n\n{\"prompt\": \"ab\", \"other\": 1}\n",
        )
        .expect("write");
        let entries = load_jsonl(&good).expect("load");
        assert_eq!(entries.len(), 2);
        let reqs = from_dataset(
            &entries,
            5,
            &parse("9"),
            "ab",
            Some(&MergingLetters),
            &mut ChaCha8Rng::seed_from_u64(0),
        )
        .expect("dataset");
        let got: Vec<(&str, Option<u32>, u32)> = reqs
            .iter()
            .map(|r| (r.prompt.as_str(), r.prompt_tokens, r.max_tokens))
            .collect();
        assert_eq!(
            got,
            [
                ("abhello", Some(6), 3),
                ("abab", Some(2), 9),
                ("abhello", Some(6), 3),
                ("abab", Some(2), 9),
                ("abhello", Some(6), 3),
            ]
        );
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "{\"prompt\": \"x\"}\n{\"max_tokens\": 3}\n").expect("write");
        let err = load_jsonl(&bad).expect_err("missing prompt");
        assert!(err.to_string().contains("bad.jsonl:2"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
