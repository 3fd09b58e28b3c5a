//! The replicated state and the commands that change it, with no IO: every coordinator applies
//! the same commands in the same log order and reaches the same state, so nothing here reads a
//! clock, a random number or the environment (a command carries its own time).
//!
//! A command is proposed with a [`CommandId`] chosen by its proposer; one retried after a
//! leader change (the first try may have been committed before the old leader died) is applied
//! once, and the retry gets the first answer. The state remembers the last [`DEDUP_WINDOW`]
//! ids, far more than a proposer has in flight.

use std::collections::{BTreeMap, VecDeque};

use baton_budget::{CapConfig, Close, ReservationId, Settlement, SharedBook, SharedRefusal, Usd};
use baton_core::WorkerId;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// How many applied command ids the state remembers for deduplication.
pub const DEDUP_WINDOW: usize = 4096;

/// Who proposed a command: a coordinator's raft node id, the incarnation of that process (a
/// random number drawn at each start) and a sequence number within it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CommandId {
    pub node: u64,
    pub incarnation: u64,
    pub seq: u64,
}

/// A change to the shared state: an operator's decision about a worker, or a cloud budget
/// reservation opened or closed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// No new requests go to `worker`; what it runs finishes.
    Drain {
        worker: String,
        reason: String,
        at_unix_ms: u64,
    },
    /// Nothing is placed on `worker`, and it is listed as refused with `reason`.
    Refuse {
        worker: String,
        reason: String,
        at_unix_ms: u64,
    },
    /// Lifts a drain or a refusal of `worker`.
    Restore { worker: String },
    /// Reserves a cloud request's worst-case cost against the current windows (at `at`) of
    /// `caps`, the proposer's budget, in `time_zone`; decided when applied.
    Reserve {
        endpoint: String,
        amount: Usd,
        request_id: String,
        at: Timestamp,
        caps: Vec<CapConfig>,
        time_zone: String,
    },
    /// Ends reservation `id` (settled with its cost, cancelled, or dropped).
    Close {
        id: ReservationId,
        how: Close,
        at: Timestamp,
    },
    /// The proposer's process started (its id's incarnation is new): the reservations its
    /// node's earlier incarnations left open can never be settled (their requests died with
    /// that process) and are closed, charged in full as the upstream may have billed them.
    Started { at: Timestamp },
}

/// Longest request id a reservation keeps, in bytes.
pub const MAX_REQUEST_ID: usize = 256;

impl Command {
    /// Checks what can be checked before proposing: worker ids, a reservation's endpoint and
    /// request id. Names the field.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Command::Drain { worker, .. }
            | Command::Refuse { worker, .. }
            | Command::Restore { worker } => WorkerId::parse(worker)
                .map(drop)
                .map_err(|e| format!("worker: {e}")),
            Command::Reserve {
                endpoint,
                request_id,
                ..
            } => {
                if endpoint.is_empty() {
                    return Err("endpoint: must not be empty".into());
                }
                if request_id.len() > MAX_REQUEST_ID {
                    return Err(format!("request_id: longer than {MAX_REQUEST_ID} bytes"));
                }
                Ok(())
            }
            Command::Close { .. } | Command::Started { .. } => Ok(()),
        }
    }
}

/// What a log entry carries: a command and its id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proposal {
    pub id: CommandId,
    pub command: Command,
}

/// What applying a command did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Raft's own entries (blank, membership) answer nothing.
    #[default]
    None,
    /// The state changed.
    Changed,
    /// The state already said so.
    Unchanged,
    /// A reservation granted, with its id.
    Reserved(ReservationId),
    /// A reservation refused (no room under a cap, or a broken budget in the command).
    Refused(SharedRefusal),
    /// A reservation closed, with what it was charged.
    Closed(Settlement),
    /// The reservation to close is not open (closed before).
    NotOpen,
    /// The proposer's start was recorded; these reservations of its node's earlier
    /// incarnations were closed, charged in full.
    Started(Vec<(ReservationId, Settlement)>),
}

/// An operator's standing decision about one worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    pub kind: DecisionKind,
    pub reason: String,
    pub at_unix_ms: u64,
    /// The coordinator that proposed it.
    pub by_node: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    Drained,
    Refused,
}

/// What the coordinators agree on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Drained and refused workers, by worker id.
    pub workers: BTreeMap<String, Decision>,
    /// The cloud budget ledger.
    pub ledger: SharedBook,
    /// Which process (node and incarnation) holds each open reservation.
    #[serde(default)]
    owners: BTreeMap<ReservationId, Owner>,
    /// Each node's latest incarnation, from its `Started`.
    #[serde(default)]
    incarnations: BTreeMap<u64, u64>,
    /// The latest applied command ids and their answers, oldest first.
    recent: VecDeque<(CommandId, Response)>,
}

/// The process that reserved: a node and one of its incarnations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    pub node: u64,
    pub incarnation: u64,
}

impl State {
    /// Applies one proposal; a proposal whose id was already applied changes nothing and gets
    /// the first answer again.
    pub fn apply(&mut self, proposal: &Proposal) -> Response {
        if let Some((_, response)) = self.recent.iter().find(|(id, _)| *id == proposal.id) {
            return response.clone();
        }
        let response = self.apply_command(proposal.id, &proposal.command);
        if self.recent.len() == DEDUP_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back((proposal.id, response.clone()));
        response
    }

    fn apply_command(&mut self, by: CommandId, command: &Command) -> Response {
        let (worker, kind, reason, at_unix_ms) = match command {
            Command::Reserve {
                endpoint,
                amount,
                request_id,
                at,
                caps,
                time_zone,
            } => {
                return match self
                    .ledger
                    .reserve(caps, time_zone, *at, endpoint, *amount, request_id)
                {
                    Ok(id) => {
                        let owner = Owner {
                            node: by.node,
                            incarnation: by.incarnation,
                        };
                        self.owners.insert(id, owner);
                        Response::Reserved(id)
                    }
                    Err(refusal) => Response::Refused(refusal),
                };
            }
            Command::Close { id, how, at } => {
                self.owners.remove(id);
                return match self.ledger.close(*at, *id, *how) {
                    Some(settlement) => Response::Closed(settlement),
                    None => Response::NotOpen,
                };
            }
            Command::Started { at } => {
                self.incarnations.insert(by.node, by.incarnation);
                let left: Vec<ReservationId> = self
                    .owners
                    .iter()
                    .filter(|(_, o)| o.node == by.node && o.incarnation != by.incarnation)
                    .map(|(id, _)| *id)
                    .collect();
                let closed = left
                    .into_iter()
                    .filter_map(|id| {
                        self.owners.remove(&id);
                        Some((id, self.ledger.close(*at, id, Close::Dropped)?))
                    })
                    .collect();
                return Response::Started(closed);
            }
            Command::Restore { worker } => {
                return match self.workers.remove(worker) {
                    Some(_) => Response::Changed,
                    None => Response::Unchanged,
                };
            }
            Command::Drain {
                worker,
                reason,
                at_unix_ms,
            } => (worker, DecisionKind::Drained, reason, at_unix_ms),
            Command::Refuse {
                worker,
                reason,
                at_unix_ms,
            } => (worker, DecisionKind::Refused, reason, at_unix_ms),
        };
        let decision = Decision {
            kind,
            reason: reason.clone(),
            at_unix_ms: *at_unix_ms,
            by_node: by.node,
        };
        match self.workers.get(worker) {
            // The same decision again keeps the first one's time and proposer.
            Some(d) if d.kind == decision.kind && d.reason == decision.reason => {
                Response::Unchanged
            }
            _ => {
                self.workers.insert(worker.clone(), decision);
                Response::Changed
            }
        }
    }

    /// The decision standing for `worker`, if any.
    pub fn decision(&self, worker: &str) -> Option<&Decision> {
        self.workers.get(worker)
    }

    /// The incarnation of `node` whose start was applied last.
    pub fn incarnation(&self, node: u64) -> Option<u64> {
        self.incarnations.get(&node).copied()
    }

    /// The process holding open reservation `id`.
    pub fn owner(&self, id: ReservationId) -> Option<Owner> {
        self.owners.get(&id).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> CommandId {
        CommandId {
            node: 1,
            incarnation: 7,
            seq,
        }
    }

    fn drain(worker: &str) -> Command {
        Command::Drain {
            worker: worker.into(),
            reason: "maintenance".into(),
            at_unix_ms: 5,
        }
    }

    #[test]
    fn a_retried_proposal_is_applied_once_and_gets_the_first_answer() {
        let mut s = State::default();
        let p = Proposal {
            id: id(1),
            command: drain("decode-a"),
        };
        assert_eq!(s.apply(&p), Response::Changed);
        // Restored in between by another proposal: the retry of the drain must not drain again.
        assert_eq!(
            s.apply(&Proposal {
                id: id(2),
                command: Command::Restore {
                    worker: "decode-a".into()
                }
            }),
            Response::Changed
        );
        assert_eq!(s.apply(&p), Response::Changed, "the first answer, again");
        assert!(s.decision("decode-a").is_none(), "and no second drain");
    }

    #[test]
    fn decisions_replace_each_other_and_restore_lifts_them() {
        let mut s = State::default();
        assert_eq!(
            s.apply(&Proposal {
                id: id(1),
                command: drain("w")
            }),
            Response::Changed
        );
        assert_eq!(
            s.apply(&Proposal {
                id: id(2),
                command: drain("w")
            }),
            Response::Unchanged
        );
        let refuse = Command::Refuse {
            worker: "w".into(),
            reason: "wrong model".into(),
            at_unix_ms: 9,
        };
        assert_eq!(
            s.apply(&Proposal {
                id: id(3),
                command: refuse
            }),
            Response::Changed
        );
        assert_eq!(
            s.decision("w").expect("as written").kind,
            DecisionKind::Refused
        );
        let restore = Command::Restore { worker: "w".into() };
        assert_eq!(
            s.apply(&Proposal {
                id: id(4),
                command: restore.clone()
            }),
            Response::Changed
        );
        assert_eq!(
            s.apply(&Proposal {
                id: id(5),
                command: restore
            }),
            Response::Unchanged
        );
    }

    #[test]
    fn a_retried_reservation_reserves_once() {
        let mut s = State::default();
        let reserve = Proposal {
            id: id(1),
            command: Command::Reserve {
                endpoint: "cloud".into(),
                amount: Usd::from_dollars(0.6).expect("an amount"),
                request_id: "r".into(),
                at: "2026-12-07T12:00:00Z".parse().expect("a time"),
                caps: vec![CapConfig {
                    period: baton_budget::Period::Day,
                    cap_usd: 1.0,
                    endpoint: None,
                }],
                time_zone: "UTC".into(),
            },
        };
        let first = s.apply(&reserve);
        assert!(matches!(first, Response::Reserved(_)));
        assert_eq!(
            s.apply(&reserve),
            first,
            "the same reservation, not a second"
        );
        let mut again = reserve.clone();
        again.id = id(2);
        assert!(
            matches!(s.apply(&again), Response::Refused(_)),
            "a new request does not fit next to the first"
        );
    }

    #[test]
    fn a_restarted_node_closes_what_its_earlier_incarnation_left_open_and_nothing_else() {
        let mut s = State::default();
        let at: Timestamp = "2026-12-07T12:00:00Z".parse().expect("a time");
        let reserve = |node, incarnation, seq| Proposal {
            id: CommandId {
                node,
                incarnation,
                seq,
            },
            command: Command::Reserve {
                endpoint: "cloud".into(),
                amount: Usd::from_dollars(0.1).expect("an amount"),
                request_id: format!("r{node}-{incarnation}-{seq}"),
                at,
                caps: vec![CapConfig {
                    period: baton_budget::Period::Day,
                    cap_usd: 10.0,
                    endpoint: None,
                }],
                time_zone: "UTC".into(),
            },
        };
        let reserved = |r: Response| match r {
            Response::Reserved(id) => id,
            other => panic!("expected a reservation, got {other:?}"),
        };
        let old = reserved(s.apply(&reserve(1, 7, 0)));
        let other_node = reserved(s.apply(&reserve(2, 3, 0)));
        let restarted = Proposal {
            id: CommandId {
                node: 1,
                incarnation: 8,
                seq: 0,
            },
            command: Command::Started { at },
        };
        let new = {
            let r = s.apply(&restarted);
            let Response::Started(closed) = r else {
                panic!("expected Started, got {r:?}")
            };
            assert_eq!(closed.len(), 1);
            assert_eq!(closed[0].0, old);
            assert_eq!(
                closed[0].1.charged,
                Usd::from_dollars(0.1).expect("an amount")
            );
            reserved(s.apply(&reserve(1, 8, 1)))
        };
        assert_eq!(s.owner(old), None);
        assert_eq!(s.owner(other_node).map(|o| o.node), Some(2));
        assert_eq!(s.owner(new).map(|o| o.incarnation), Some(8));
        let round: State =
            serde_json::from_str(&serde_json::to_string(&s).expect("serializes")).expect("reads");
        assert_eq!(round, s, "owners survive a snapshot");
    }

    #[test]
    fn the_dedup_window_is_bounded() {
        let mut s = State::default();
        for seq in 0..(DEDUP_WINDOW as u64 + 10) {
            s.apply(&Proposal {
                id: id(seq),
                command: Command::Restore { worker: "w".into() },
            });
        }
        assert_eq!(s.recent.len(), DEDUP_WINDOW);
        assert_eq!(s.recent.front().expect("as written").0, id(10));
    }

    #[test]
    fn unknown_fields_and_bad_worker_ids_are_refused() {
        let bad = r#"{"op":"drain","worker":"w","reason":"r","at_unix_ms":1,"extra":2}"#;
        assert!(serde_json::from_str::<Command>(bad).is_err());
        let cmd = Command::Restore {
            worker: "has space".into(),
        };
        assert!(cmd.validate().expect_err("refused").starts_with("worker: "));
    }
}
