//! The static backend: the coordinator's configured address lists. Members are named by their
//! address until their `Info` says more; nothing ever leaves (an unreachable worker is only
//! unhealthy), and workers announce nothing.

use baton_core::WorkerId;
use tokio::sync::mpsc;

use crate::advert::{Advert, Role};
use crate::backend::{Announcement, Backend, BoxFuture, Members, WATCH_QUEUE};
use crate::error::{Error, Result};
use crate::membership::{Member, MemberSet, Source};

pub struct StaticBackend {
    members: Vec<Member>,
}

impl StaticBackend {
    pub fn new(prefill: &[String], decode: &[String]) -> Result<Self> {
        let member = |role: Role, field: &'static str, address: &String| {
            let id = WorkerId::parse(address).map_err(|reason| Error::InvalidConfig {
                field,
                reason: format!("{address:?} {reason}"),
            })?;
            Ok(Member {
                id,
                role,
                address: address.clone(),
                advert: None,
                source: Source::Static,
            })
        };
        let members = prefill
            .iter()
            .map(|a| member(Role::Prefill, "prefill_workers", a))
            .chain(
                decode
                    .iter()
                    .map(|a| member(Role::Decode, "decode_workers", a)),
            )
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { members })
    }
}

impl Backend for StaticBackend {
    fn name(&self) -> &'static str {
        "static"
    }

    fn watch(&self) -> BoxFuture<'_, Result<Members>> {
        let mut set = MemberSet::default();
        // Distinct members fit the queue's bound or are sent as the reader reads.
        let changes: Vec<_> = self
            .members
            .iter()
            .filter_map(|m| set.observe(m.clone()))
            .collect();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(WATCH_QUEUE);
            let task = tokio::spawn(async move {
                for change in changes {
                    if tx.send(change).await.is_err() {
                        return;
                    }
                }
                // A static list never changes: hold the stream open until the reader goes.
                tx.closed().await;
            });
            Ok(Members::new(rx, crate::backend::TaskGuard(task)))
        })
    }

    fn announce(&self, _advert: Advert) -> BoxFuture<'_, Result<Announcement>> {
        // Under static discovery the coordinator's config names the worker.
        Box::pin(async { Ok(Announcement::new(None, ())) })
    }
}
