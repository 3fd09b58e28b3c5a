//! The raft log and the state machine, in one redb file per coordinator.
//!
//! | table   | key                                | value (JSON)                              |
//! |---------|------------------------------------|-------------------------------------------|
//! | `log`   | log index (u64)                    | an openraft `Entry`                       |
//! | `meta`  | `vote`, `committed`, `purged`      | openraft's `Vote` / `LogId`               |
//! | `sm`    | `applied`, `membership`, `state`   | the last applied `LogId`, its membership, the [`State`] |
//! | `sm`    | `snapshot`                         | the current snapshot's meta and bytes     |
//!
//! Every write is one redb transaction, durable before it returns (redb fsyncs each commit): a
//! log append before openraft is told it is flushed, a vote before it is acted on, and each
//! applied batch together with the id of its last entry, so a restart never applies an entry
//! twice nor skips one. redb calls block, so they run on tokio's blocking threads.

// openraft's storage traits return its `StorageError`, a large type; the helpers return the same
// type so `?` carries it without conversions.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::TypeConfig;
use crate::state::{Response, State};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SM: TableDefinition<&str, &[u8]> = TableDefinition::new("sm");

type StorageResult<T> = Result<T, StorageError<u64>>;

/// The open file, shared by the log store, the state machine and their readers; when the last
/// of them lets go, the file is closed and `open` says so to whoever waits to reopen it.
pub(crate) struct Db {
    db: Database,
    open: watch::Sender<()>,
}

impl std::ops::Deref for Db {
    type Target = Database;

    fn deref(&self) -> &Database {
        &self.db
    }
}

/// Opens (creating) the replica's database at `path` (an empty path: in memory) and returns
/// its log store and state machine, the state loaded as last applied. Fails if another process
/// holds the file.
pub fn open_storage(path: &Path) -> Result<(LogStore, StateMachine), String> {
    let db = if path.as_os_str().is_empty() {
        // No file: a one-node group whose state ends with the process (validated: a group of
        // several needs its file, or a restarted member would rejoin with no log).
        Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| format!("in-memory database: {e}"))?
    } else {
        Database::create(path).map_err(|e| format!("{}: {e}", path.display()))?
    };
    refuse_single_ledger(&db, path)?;
    let tx = db.begin_write().map_err(|e| e.to_string())?;
    for result in [
        tx.open_table(LOG).map(drop),
        tx.open_table(META).map(drop),
        tx.open_table(SM).map(drop),
    ] {
        result.map_err(|e| format!("{}: creating tables: {e}", path.display()))?;
    }
    tx.commit().map_err(|e| e.to_string())?;
    let db = Arc::new(Db {
        db,
        open: watch::channel(()).0,
    });
    let loaded: Persisted = read_sm(&db, "state")
        .and_then(|state| {
            Ok(Persisted {
                state: state.unwrap_or_default(),
                applied: read_sm(&db, "applied")?.flatten(),
                membership: read_sm(&db, "membership")?.unwrap_or_default(),
            })
        })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let (published, _) = watch::channel(loaded.state.clone());
    Ok((
        LogStore { db: db.clone() },
        StateMachine {
            db,
            applied: loaded.applied,
            membership: loaded.membership,
            state: loaded.state,
            published: Arc::new(published),
        },
    ))
}

/// A file of the single-process budget ledger (baton before the replicated one) has the same
/// default place; its records would be silently ignored here, so it is refused by name.
fn refuse_single_ledger(db: &Database, path: &Path) -> Result<(), String> {
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    let tables = tx.list_tables().map_err(|e| e.to_string())?;
    if tables.into_iter().any(|t| t.name() == "reservations") {
        return Err(format!(
            "{}: holds a budget ledger of the single-process format (an earlier baton), not the \
             coordinators' replicated state; move it aside (its totals are read with that \
             version's `baton budget --offline`)",
            path.display()
        ));
    }
    Ok(())
}

/// The state as last applied to the database at `path` (a stopped coordinator's), without
/// starting raft: for `baton budget --offline`.
pub fn read_state(path: &Path) -> Result<State, String> {
    if !path.exists() {
        return Err(format!("{}: no such file", path.display()));
    }
    let db = Database::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    refuse_single_ledger(&db, path)?;
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    if tx.open_table(SM).is_err() {
        return Ok(State::default());
    }
    drop(tx);
    read_sm::<State>(&db, "state")
        .map(Option::unwrap_or_default)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn to_json(value: &impl Serialize) -> Result<Vec<u8>, StorageIOError<u64>> {
    serde_json::to_vec(value).map_err(|e| StorageIOError::write(AnyError::new(&e)))
}

fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageIOError<u64>> {
    serde_json::from_slice(bytes).map_err(|e| StorageIOError::read(AnyError::new(&e)))
}

fn read_error(e: impl std::error::Error + 'static) -> StorageIOError<u64> {
    StorageIOError::read(AnyError::new(&e))
}

fn write_error(e: impl std::error::Error + 'static) -> StorageIOError<u64> {
    StorageIOError::write(AnyError::new(&e))
}

fn read_key<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
) -> Result<Option<T>, StorageIOError<u64>> {
    let tx = db.begin_read().map_err(read_error)?;
    let table = tx.open_table(table).map_err(read_error)?;
    match table.get(key).map_err(read_error)? {
        Some(v) => Ok(Some(from_json(v.value())?)),
        None => Ok(None),
    }
}

fn read_sm<T: DeserializeOwned>(
    db: &Database,
    key: &str,
) -> Result<Option<T>, StorageIOError<u64>> {
    read_key(db, SM, key)
}

/// Runs a blocking redb call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageIOError<u64>> + Send + 'static,
) -> StorageResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageIOError::write(AnyError::new(&e)))?
        .map_err(StorageError::from)
}

/// The raft log and vote. Cheap to clone: a clone is a reader of the same file.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Db>,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let db = self.db.clone();
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Some(i.saturating_add(1)),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        blocking(move || {
            let tx = db.begin_read().map_err(read_error)?;
            let table = tx.open_table(LOG).map_err(read_error)?;
            let rows = match end {
                Some(end) if end <= start => return Ok(Vec::new()),
                Some(end) => table.range(start..end),
                None => table.range(start..),
            }
            .map_err(read_error)?;
            let mut entries = Vec::new();
            for row in rows {
                let (_, v) = row.map_err(read_error)?;
                entries.push(from_json(v.value())?);
            }
            Ok(entries)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let db = self.db.clone();
        blocking(move || {
            let purged: Option<LogId<u64>> = read_key(&db, META, "purged")?;
            let tx = db.begin_read().map_err(read_error)?;
            let table = tx.open_table(LOG).map_err(read_error)?;
            let last = match table.last().map_err(read_error)? {
                Some((_, v)) => Some(from_json::<Entry<TypeConfig>>(v.value())?.log_id),
                None => purged,
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        let bytes = to_json(vote)?;
        let db = self.db.clone();
        blocking(move || put(&db, META, "vote", &bytes)).await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        let db = self.db.clone();
        blocking(move || read_key(&db, META, "vote")).await
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StorageResult<()> {
        let bytes = to_json(&committed)?;
        let db = self.db.clone();
        blocking(move || put(&db, META, "committed", &bytes)).await
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<u64>>> {
        let db = self.db.clone();
        blocking(move || Ok(read_key::<Option<LogId<u64>>>(&db, META, "committed")?.flatten()))
            .await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, to_json(&e)?)))
            .collect::<Result<Vec<_>, StorageIOError<u64>>>()?;
        let db = self.db.clone();
        let written = blocking(move || {
            let tx = db.begin_write().map_err(write_error)?;
            {
                let mut table = tx.open_table(LOG).map_err(write_error)?;
                for (index, bytes) in &rows {
                    table
                        .insert(*index, bytes.as_slice())
                        .map_err(write_error)?;
                }
            }
            tx.commit().map_err(write_error)
        })
        .await;
        callback.log_io_completed(
            written
                .as_ref()
                .map(drop)
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        written
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        let db = self.db.clone();
        blocking(move || remove_logs(&db, log_id.index..=u64::MAX, None)).await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        let db = self.db.clone();
        let purged = to_json(&log_id)?;
        blocking(move || remove_logs(&db, 0..=log_id.index, Some(purged))).await
    }
}

fn put(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
    bytes: &[u8],
) -> Result<(), StorageIOError<u64>> {
    let tx = db.begin_write().map_err(write_error)?;
    tx.open_table(table)
        .map_err(write_error)?
        .insert(key, bytes)
        .map_err(write_error)?;
    tx.commit().map_err(write_error)
}

/// Removes the log entries in `range`; with `purged`, records it as the last purged id in the
/// same transaction.
fn remove_logs(
    db: &Database,
    range: std::ops::RangeInclusive<u64>,
    purged: Option<Vec<u8>>,
) -> Result<(), StorageIOError<u64>> {
    let tx = db.begin_write().map_err(write_error)?;
    {
        let mut table = tx.open_table(LOG).map_err(write_error)?;
        let keys: Vec<u64> = table
            .range(range)
            .map_err(write_error)?
            .map(|row| row.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()
            .map_err(write_error)?;
        for key in keys {
            table.remove(key).map_err(write_error)?;
        }
        if let Some(purged) = purged {
            tx.open_table(META)
                .map_err(write_error)?
                .insert("purged", purged.as_slice())
                .map_err(write_error)?;
        }
    }
    tx.commit().map_err(write_error)
}

/// What the `sm` table holds besides the snapshot.
struct Persisted {
    state: State,
    applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, openraft::BasicNode>,
}

/// A snapshot as stored: its meta and the bytes sent to a follower that lags past the log.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, openraft::BasicNode>,
    data: Vec<u8>,
}

/// What a snapshot's bytes hold.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    state: State,
}

/// The replicated [`State`], applied from committed entries and persisted with the id of the
/// last one applied. Readers watch it through [`StateMachine::subscribe`].
pub struct StateMachine {
    db: Arc<Db>,
    applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, openraft::BasicNode>,
    state: State,
    published: Arc<watch::Sender<State>>,
}

impl StateMachine {
    /// The state as last applied here, and every change after.
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.published.subscribe()
    }

    /// Ends (its `changed` fails) once the file is closed: raft's tasks hold the store until
    /// they have all stopped, a little after `Raft::shutdown` returns.
    pub(crate) fn on_close(&self) -> watch::Receiver<()> {
        self.db.open.subscribe()
    }

    /// Persists the state and the ids it reflects, in one transaction.
    async fn persist(&self) -> StorageResult<()> {
        let rows = [
            ("state", to_json(&self.state)?),
            ("applied", to_json(&self.applied)?),
            ("membership", to_json(&self.membership)?),
        ];
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_write().map_err(write_error)?;
            {
                let mut table = tx.open_table(SM).map_err(write_error)?;
                for (key, bytes) in &rows {
                    table.insert(*key, bytes.as_slice()).map_err(write_error)?;
                }
            }
            tx.commit().map_err(write_error)
        })
        .await
    }
}

/// Builds snapshots from a copy of the state taken when it was asked for.
pub struct SnapshotBuilder {
    db: Arc<Db>,
    applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, openraft::BasicNode>,
    state: State,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let data = to_json(&SnapshotBody {
            state: self.state.clone(),
        })?;
        let snapshot_id = match &self.applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, data.len()),
            None => format!("empty-{}", data.len()),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let stored = to_json(&StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        })?;
        let db = self.db.clone();
        blocking(move || put(&db, SM, "snapshot", &stored)).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(
        Option<LogId<u64>>,
        StoredMembership<u64, openraft::BasicNode>,
    )> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        for entry in entries {
            self.applied = Some(entry.log_id);
            responses.push(match &entry.payload {
                EntryPayload::Blank => Response::None,
                EntryPayload::Normal(proposal) => self.state.apply(proposal),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    Response::None
                }
            });
        }
        self.persist().await?;
        self.published.send_replace(self.state.clone());
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            applied: self.applied,
            membership: self.membership.clone(),
            state: self.state.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = serde_json::from_slice(&data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        self.state = body.state;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        let stored = to_json(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })?;
        let db = self.db.clone();
        blocking(move || put(&db, SM, "snapshot", &stored)).await?;
        self.persist().await?;
        self.published.send_replace(self.state.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let db = self.db.clone();
        let stored: Option<StoredSnapshot> = blocking(move || read_sm(&db, "snapshot")).await?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Builder;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir>
        for Builder
    {
        async fn build(&self) -> StorageResult<(tempfile::TempDir, LogStore, StateMachine)> {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let (log, sm) =
                open_storage(&dir.path().join("replica.redb")).expect("a fresh database opens");
            Ok((dir, log, sm))
        }
    }

    /// openraft's own conformance suite for log and state machine storage.
    #[test]
    fn the_redb_storage_passes_openrafts_suite() {
        openraft::testing::Suite::test_all(Builder).expect("every check of the suite passes");
    }
}
