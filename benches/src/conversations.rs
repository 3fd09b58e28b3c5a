//! Multi-turn chat, the workload prefix caching is for: each user's turn `k` sends the whole
//! conversation so far (a system prompt every user shares, the earlier messages and the
//! server's own answers to them) plus a new message, and waits for the answer before the next.
//!
//! ```text
//! schedule(arrivals, users) --> user task: for each turn: prompt = system + history + message
//!     Target::send --> Sample (index = user * turns + turn) ; history += message + answer text
//! ```
//!
//! Users start on the arrival schedule (a rate, or a closed loop of at most N users at once);
//! within a user, turns are a closed loop with an optional think time between them (exponential,
//! seeded). The prompt is plain text in a fixed `User:` / `Assistant:` layout, the same bytes for
//! every server, so a server's prefix cache sees exactly the history it answered. Messages are
//! drawn before the run from the seed, so two servers get the same messages; the answers, and so
//! the later prompts, are each server's own.
//!
//! Invariants: every turn that is sent yields one [`Sample`]; a failed turn ends its user's
//! conversation (the later turns are not sent, and count as planned but unsent).

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::arrivals::{Bounds, Load, schedule};
use crate::client::Target;
use crate::metrics::summarize;
use crate::prompts::{LengthDist, RequestSpec, TokenCodec, fit, prompt_pool};
use crate::run::{RunOptions, RunResult, arrival_rng};
use crate::sample::{ErrorKind, Measured, RequestError, Sample};
use crate::{Error, Result};

/// The shape of a multi-turn workload.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Conversations {
    /// Conversations (users), each with its own messages.
    pub users: usize,
    /// Turns per conversation.
    pub turns: usize,
    /// Tokens of the system prompt every conversation starts with.
    pub system_len: u32,
    /// Tokens of each user message.
    pub message: LengthDist,
    /// `max_tokens` of each answer.
    pub answer: LengthDist,
    /// Mean seconds a user waits between an answer and its next message (exponential; 0: none).
    pub think_s: f64,
}

/// One conversation's messages and answer lengths, drawn before the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Script {
    pub messages: Vec<String>,
    pub max_tokens: Vec<u32>,
    /// Think times before turns 1.. (turn 0 starts on the schedule).
    pub think: Vec<Duration>,
}

/// The system prompt and every user's script. Deterministic given the RNG.
pub fn scripts<C: TokenCodec + ?Sized, R: Rng + ?Sized>(
    codec: &C,
    spec: &Conversations,
    rng: &mut R,
) -> Result<(String, Vec<Script>)> {
    if spec.users == 0 || spec.turns == 0 {
        return Err(Error::invalid(
            "conversations",
            &format!("{} x {}", spec.users, spec.turns),
            "needs at least one user and one turn",
        ));
    }
    if !(spec.think_s.is_finite() && spec.think_s >= 0.0) {
        return Err(Error::invalid(
            "think-time",
            &spec.think_s.to_string(),
            "must be a finite number of seconds, 0 or more",
        ));
    }
    let pool = prompt_pool(codec)?;
    let (system, _) = fit(codec, &pool, "", 0, spec.system_len as usize, rng)?;
    let mut out = Vec::with_capacity(spec.users);
    for _ in 0..spec.users {
        let mut script = Script {
            messages: Vec::with_capacity(spec.turns),
            max_tokens: Vec::with_capacity(spec.turns),
            think: Vec::with_capacity(spec.turns),
        };
        for turn in 0..spec.turns {
            let len = spec.message.sample(rng) as usize;
            script.messages.push(fit(codec, &pool, "", 0, len, rng)?.0);
            script.max_tokens.push(spec.answer.sample(rng));
            if turn > 0 {
                // Inverse-CDF exponential; 1 - u is in (0, 1].
                let u: f64 = rng.random();
                script
                    .think
                    .push(Duration::from_secs_f64(-spec.think_s * (1.0 - u).ln()));
            }
        }
        out.push(script);
    }
    Ok((system, out))
}

/// The prompt of a turn: the system prompt, each earlier (message, answer), then the message.
pub fn render(system: &str, history: &[(String, String)], message: &str) -> String {
    let mut out = String::from(system);
    for (m, a) in history {
        out.push_str("\nUser: ");
        out.push_str(m);
        out.push_str("\nAssistant:");
        out.push_str(a);
    }
    out.push_str("\nUser: ");
    out.push_str(message);
    out.push_str("\nAssistant:");
    out
}

/// Runs every conversation against `target` at `load` (users' arrivals) and measures each turn.
pub async fn run_conversations<T: Target, C: TokenCodec + Send + Sync + 'static>(
    target: Arc<T>,
    codec: Arc<C>,
    system: &str,
    scripts: &[Script],
    load: &Load,
    options: &RunOptions,
) -> RunResult {
    let turns = scripts.iter().map(|s| s.messages.len()).max().unwrap_or(0);
    let bounds = Bounds {
        max_requests: scripts.len(),
        max_duration: options.bounds.max_duration,
    };
    let starts = schedule(&load.arrivals, &bounds, &mut arrival_rng(options.seed));
    let planned = starts.len() * turns;
    let slots = load
        .max_concurrency
        .map(|n| Arc::new(Semaphore::new(n.get())));
    let start = Instant::now();
    let end = start + options.bounds.max_duration;
    let mut users = JoinSet::new();
    for (user, offset) in starts.iter().enumerate() {
        tokio::time::sleep_until(start + *offset).await;
        let permit = match &slots {
            Some(s) => match tokio::time::timeout_at(end, s.clone().acquire_owned()).await {
                Ok(Ok(p)) => Some(p),
                _ => break,
            },
            None => None,
        };
        if Instant::now() >= end {
            break;
        }
        let (target, codec) = (target.clone(), codec.clone());
        let (system, script) = (system.to_string(), scripts[user].clone());
        let (timeout, scheduled_s) = (options.timeout, offset.as_secs_f64());
        users.spawn(async move {
            let mut samples = Vec::with_capacity(script.messages.len());
            let mut history: Vec<(String, String)> = Vec::new();
            for (turn, message) in script.messages.iter().enumerate() {
                if turn > 0 {
                    tokio::time::sleep(script.think[turn - 1]).await;
                }
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let prompt = render(&system, &history, message);
                let spec = RequestSpec {
                    prompt_tokens: codec.encode(&prompt).ok().map(|t| t.len() as u32),
                    prompt,
                    max_tokens: script.max_tokens[turn],
                };
                let measured = target.send(&spec, sent + timeout).await;
                let failed = measured.error.is_some();
                let answer = measured.text.clone();
                samples.push(Sample {
                    index: user * turns + turn,
                    scheduled_s: if turn == 0 {
                        scheduled_s
                    } else {
                        sent.duration_since(start).as_secs_f64()
                    },
                    sent_s: sent.duration_since(start).as_secs_f64(),
                    prompt_tokens: spec.prompt_tokens,
                    max_tokens: spec.max_tokens,
                    measured,
                });
                if failed {
                    break;
                }
                history.push((message.clone(), answer));
            }
            drop(permit);
            samples
        });
    }
    let mut samples = Vec::with_capacity(planned);
    while let Some(joined) = users.join_next().await {
        match joined {
            Ok(mut s) => samples.append(&mut s),
            Err(e) => samples.push(Sample {
                index: usize::MAX,
                scheduled_s: 0.0,
                sent_s: 0.0,
                prompt_tokens: None,
                max_tokens: 0,
                measured: Measured {
                    error: Some(RequestError::new(
                        ErrorKind::Client,
                        format!("conversation task failed: {e}"),
                    )),
                    ..Measured::default()
                },
            }),
        }
    }
    let duration = start.elapsed();
    samples.sort_by_key(|s| s.index);
    let summary = summarize(&samples, planned, duration, &options.slo);
    RunResult {
        label: format!("{} x{turns} turns", load.label()),
        load: *load,
        summary,
        samples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// One token per character of a small alphabet: enough to build and measure prompts.
    struct Chars;

    impl TokenCodec for Chars {
        fn encode(&self, text: &str) -> Result<Vec<u32>> {
            Ok(text.chars().map(|c| c as u32).collect())
        }
        fn decode(&self, ids: &[u32]) -> Result<String> {
            Ok(ids.iter().filter_map(|&i| char::from_u32(i)).collect())
        }
        fn prompt_ids(&self) -> Result<Vec<u32>> {
            Ok(('a'..='z').map(|c| c as u32).collect())
        }
    }

    fn spec() -> Conversations {
        Conversations {
            users: 3,
            turns: 4,
            system_len: 20,
            message: LengthDist::Fixed { len: 5 },
            answer: LengthDist::Fixed { len: 7 },
            think_s: 0.5,
        }
    }

    #[test]
    fn scripts_are_seeded_and_sized() {
        let mut a = ChaCha8Rng::seed_from_u64(3);
        let mut b = ChaCha8Rng::seed_from_u64(3);
        let (sys, s) = scripts(&Chars, &spec(), &mut a).expect("scripts");
        assert_eq!(
            (sys.clone(), s.clone()),
            scripts(&Chars, &spec(), &mut b).expect("again")
        );
        assert_eq!(sys.chars().count(), 20);
        assert_eq!(s.len(), 3);
        for script in &s {
            assert_eq!(script.messages.len(), 4);
            assert!(script.messages.iter().all(|m| m.chars().count() == 5));
            assert_eq!(script.max_tokens, vec![7; 4]);
            assert_eq!(script.think.len(), 3);
        }
        assert_ne!(
            s[0].messages, s[1].messages,
            "users have their own messages"
        );
    }

    #[test]
    fn a_turn_extends_the_previous_prompt() {
        let history = vec![("hi".to_string(), " hello".to_string())];
        let first = render("SYS", &[], "hi");
        let second = render("SYS", &history, "more");
        assert!(second.starts_with(&first), "{second:?} extends {first:?}");
        assert_eq!(
            second,
            "SYS\nUser: hi\nAssistant: hello\nUser: more\nAssistant:"
        );
    }

    #[test]
    fn bad_shapes_are_refused_naming_the_flag() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let err =
            scripts(&Chars, &Conversations { users: 0, ..spec() }, &mut rng).expect_err("no users");
        assert!(err.to_string().contains("conversations"), "{err}");
        let err = scripts(
            &Chars,
            &Conversations {
                think_s: -1.0,
                ..spec()
            },
            &mut rng,
        )
        .expect_err("negative think time");
        assert!(err.to_string().contains("think-time"), "{err}");
    }
}
