//! Membership as a backend reports it: who joined, changed or left, and which adverts were
//! refused. [`MemberSet`] turns a backend's raw sightings into those events; it is pure, so
//! every backend shares the same rules (newest advert wins, a replay is refused, a sighting
//! that says nothing new says nothing).

use std::collections::HashMap;

use baton_core::WorkerId;

use crate::advert::{Advert, Role};
use crate::error::Refusal;

/// How a member was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Static,
    Mdns,
    Etcd,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Static => "static",
            Source::Mdns => "mdns",
            Source::Etcd => "etcd",
        }
    }
}

/// A worker the cluster knows of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: WorkerId,
    pub role: Role,
    /// Where its gRPC service listens (`host:port`).
    pub address: String,
    /// What it advertised; `None` for a configured address (its `Info` says the rest).
    pub advert: Option<Advert>,
    pub source: Source,
}

/// A change in membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    Joined(Member),
    /// A member advertised again with something new (address, ports, a restart's issue time).
    Changed(Member),
    /// Its advert is gone (etcd lease expired or deleted, mDNS goodbye or expiry).
    Left {
        id: WorkerId,
        source: Source,
    },
    /// An advert was ignored; `from` names where it came from (an mDNS instance, an etcd key).
    Refused {
        from: String,
        source: Source,
        reason: Refusal,
    },
}

/// The members a backend has reported, newest advert per worker.
#[derive(Debug, Default)]
pub struct MemberSet {
    known: HashMap<WorkerId, Member>,
}

impl MemberSet {
    /// A sighting of `member`; what changed, if anything.
    pub fn observe(&mut self, member: Member) -> Option<Membership> {
        match self.known.get(&member.id) {
            None => {
                self.known.insert(member.id.clone(), member.clone());
                Some(Membership::Joined(member))
            }
            Some(old) if *old == member => None,
            Some(old) => {
                let issued = |m: &Member| m.advert.as_ref().map_or(0, |a| a.issued_ms);
                if issued(&member) < issued(old) {
                    return Some(Membership::Refused {
                        from: member.id.to_string(),
                        source: member.source,
                        reason: Refusal::Replayed,
                    });
                }
                self.known.insert(member.id.clone(), member.clone());
                Some(Membership::Changed(member))
            }
        }
    }

    /// `id`'s advert is gone.
    pub fn forget(&mut self, id: &WorkerId) -> Option<Membership> {
        self.known.remove(id).map(|m| Membership::Left {
            id: m.id,
            source: m.source,
        })
    }

    /// Every member, for a backend that lists its whole state at once (a resynchronised watch):
    /// the members not in `present` left.
    pub fn retain_only(&mut self, present: &[WorkerId]) -> Vec<Membership> {
        let gone: Vec<WorkerId> = self
            .known
            .keys()
            .filter(|id| !present.contains(id))
            .cloned()
            .collect();
        gone.iter().filter_map(|id| self.forget(id)).collect()
    }

    pub fn get(&self, id: &WorkerId) -> Option<&Member> {
        self.known.get(id)
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::Fingerprint;

    fn member(id: &str, port: u16, issued_ms: u64) -> Member {
        let worker_id = WorkerId::parse(id).expect("id");
        Member {
            id: worker_id.clone(),
            role: Role::Decode,
            address: format!("10.0.0.2:{port}"),
            advert: Some(Advert {
                cluster: "lab".into(),
                worker_id,
                role: Role::Decode,
                fingerprint: Fingerprint([1; 32]),
                host_id: "h".into(),
                grpc_port: port,
                event_port: 0,
                host: None,
                issued_ms,
            }),
            source: Source::Mdns,
        }
    }

    #[test]
    fn sightings_become_joins_changes_and_leaves() {
        let mut set = MemberSet::default();
        let a = member("a", 1, 10);
        assert_eq!(set.observe(a.clone()), Some(Membership::Joined(a.clone())));
        assert_eq!(
            set.observe(a.clone()),
            None,
            "the same advert again says nothing"
        );
        let moved = member("a", 2, 20);
        assert_eq!(
            set.observe(moved.clone()),
            Some(Membership::Changed(moved.clone()))
        );
        assert!(matches!(
            set.observe(member("a", 1, 10)),
            Some(Membership::Refused {
                reason: Refusal::Replayed,
                ..
            })
        ));
        assert_eq!(set.get(&moved.id), Some(&moved), "a replay changes nothing");
        let id = moved.id.clone();
        assert_eq!(
            set.forget(&id),
            Some(Membership::Left {
                id: id.clone(),
                source: Source::Mdns
            })
        );
        assert_eq!(set.forget(&id), None);
    }

    #[test]
    fn a_full_listing_drops_the_absent() {
        let mut set = MemberSet::default();
        set.observe(member("a", 1, 1));
        set.observe(member("b", 1, 1));
        let b = WorkerId::parse("b").expect("id");
        let left = set.retain_only(std::slice::from_ref(&b));
        assert_eq!(left.len(), 1);
        assert_eq!(set.len(), 1);
        assert!(set.get(&b).is_some());
    }
}
