//! The ledger file: a redb database, written with redb's default durability (each commit is
//! fsynced before it returns). One write transaction per ledger change, so a reservation and
//! the abandoned leftovers it sweeps, or a settle's window and endpoint totals, land together
//! or not at all.
//!
//! Layout (values are JSON, so the file can be read with any redb tool):
//!
//! | table          | key                                  | value                                        |
//! |----------------|--------------------------------------|----------------------------------------------|
//! | `meta`         | `"schema"`, `"next_id"`              | u64                                          |
//! | `reservations` | reservation id (u64)                 | endpoint, amount, request_id, created, windows |
//! | `windows`      | `"<period>\|<start>\|<end>\|<scope>"` | the window and its spent, overrun, settled   |
//! | `endpoints`    | endpoint name                        | lifetime spent, overrun, settled             |
//!
//! A row of `reservations` exists exactly while the reservation is open; what it holds in its
//! windows (`reserved`) is derived from these rows on load, never stored twice. Window rows are
//! kept after their window ends, as history (a few hundred bytes per cap per window: about
//! 9,000 rows a year for an hourly cap); nothing prunes them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::book::{Book, Changes, Charges, OpenEntry, WindowRef};
use crate::error::{Error, Result};
use crate::report::ReservationId;
use crate::window::Scope;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const RESERVATIONS: TableDefinition<u64, &str> = TableDefinition::new("reservations");
const WINDOWS: TableDefinition<&str, &str> = TableDefinition::new("windows");
const ENDPOINTS: TableDefinition<&str, &str> = TableDefinition::new("endpoints");

const SCHEMA_KEY: &str = "schema";
const NEXT_ID_KEY: &str = "next_id";
/// Bumped when a table's key or value format changes incompatibly.
const SCHEMA_VERSION: u64 = 1;

#[derive(Serialize, Deserialize)]
struct WindowRecord {
    window: WindowRef,
    charges: Charges,
}

/// The open ledger file.
pub(crate) struct Store {
    db: Database,
}

impl Store {
    /// Opens or creates the file at `path` and checks its schema.
    pub fn open(path: &Path) -> Result<Store> {
        let db = Database::create(path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
                Error::InUse {
                    path: PathBuf::from(path),
                }
            }
            other => Error::storage(&format!("opening {}", path.display()), other),
        })?;
        let tx = db
            .begin_write()
            .map_err(|e| Error::storage("starting the schema check", e))?;
        {
            let mut meta = tx
                .open_table(META)
                .map_err(|e| Error::storage("opening table meta", e))?;
            let found = meta
                .get(SCHEMA_KEY)
                .map_err(|e| Error::storage("reading the schema version", e))?
                .map(|v| v.value());
            match found {
                None => {
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION)
                        .map_err(|e| Error::storage("writing the schema version", e))?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(Error::corrupt(
                        format!("{} schema", path.display()),
                        format!("version {other}, but this build reads version {SCHEMA_VERSION}"),
                    ));
                }
            }
            for (name, result) in [
                ("reservations", tx.open_table(RESERVATIONS).map(drop)),
                ("windows", tx.open_table(WINDOWS).map(drop)),
                ("endpoints", tx.open_table(ENDPOINTS).map(drop)),
            ] {
                result.map_err(|e| Error::storage(&format!("creating table {name}"), e))?;
            }
        }
        tx.commit()
            .map_err(|e| Error::storage("committing the schema", e))?;
        Ok(Store { db })
    }

    /// Reads the whole ledger into a [`Book`] as of `now`; every open reservation is marked
    /// as left over from a previous run.
    pub fn load(&self, now: Timestamp) -> Result<Book> {
        let tx = self
            .db
            .begin_read()
            .map_err(|e| Error::storage("starting the load", e))?;
        let read = |e: redb::Error| Error::storage("loading the ledger", e);

        let meta = tx.open_table(META).map_err(|e| read(e.into()))?;
        let next_id = meta
            .get(NEXT_ID_KEY)
            .map_err(|e| read(e.into()))?
            .map_or(1, |v| v.value());

        let mut open = BTreeMap::new();
        let table = tx.open_table(RESERVATIONS).map_err(|e| read(e.into()))?;
        for row in table.iter().map_err(|e| read(e.into()))? {
            let (id, json) = row.map_err(|e| read(e.into()))?;
            let id = id.value();
            let mut entry: OpenEntry = serde_json::from_str(json.value())
                .map_err(|e| Error::corrupt(format!("reservation {id}"), e))?;
            entry.from_previous_run = true;
            open.insert(ReservationId(id), entry);
        }

        let mut windows = Vec::new();
        let table = tx.open_table(WINDOWS).map_err(|e| read(e.into()))?;
        for row in table.iter().map_err(|e| read(e.into()))? {
            let (key, json) = row.map_err(|e| read(e.into()))?;
            let record: WindowRecord = serde_json::from_str(json.value())
                .map_err(|e| Error::corrupt(format!("window {}", key.value()), e))?;
            windows.push((record.window, record.charges));
        }

        let mut endpoints = BTreeMap::new();
        let table = tx.open_table(ENDPOINTS).map_err(|e| read(e.into()))?;
        for row in table.iter().map_err(|e| read(e.into()))? {
            let (name, json) = row.map_err(|e| read(e.into()))?;
            let charges: Charges = serde_json::from_str(json.value())
                .map_err(|e| Error::corrupt(format!("endpoint {}", name.value()), e))?;
            endpoints.insert(name.value().to_string(), charges);
        }

        Ok(Book::restore(next_id, open, windows, endpoints, now))
    }

    /// Persists `changes` in one durable transaction.
    pub fn commit(&self, changes: &Changes) -> Result<()> {
        let write = |e: redb::Error| Error::storage("writing the ledger", e);
        let tx = self.db.begin_write().map_err(|e| write(e.into()))?;
        {
            let mut reservations = tx.open_table(RESERVATIONS).map_err(|e| write(e.into()))?;
            for (id, entry) in &changes.opened {
                reservations
                    .insert(id.0, to_json(entry)?.as_str())
                    .map_err(|e| write(e.into()))?;
            }
            for closed in &changes.closed {
                reservations
                    .remove(closed.id.0)
                    .map_err(|e| write(e.into()))?;
            }

            let mut windows = tx.open_table(WINDOWS).map_err(|e| write(e.into()))?;
            for (window, totals) in &changes.windows {
                let record = WindowRecord {
                    window: window.clone(),
                    charges: totals.charges,
                };
                windows
                    .insert(window_key(window).as_str(), to_json(&record)?.as_str())
                    .map_err(|e| write(e.into()))?;
            }

            let mut endpoints = tx.open_table(ENDPOINTS).map_err(|e| write(e.into()))?;
            for (name, charges) in &changes.endpoints {
                endpoints
                    .insert(name.as_str(), to_json(charges)?.as_str())
                    .map_err(|e| write(e.into()))?;
            }

            if !changes.opened.is_empty() {
                let mut meta = tx.open_table(META).map_err(|e| write(e.into()))?;
                meta.insert(NEXT_ID_KEY, changes.next_id)
                    .map_err(|e| write(e.into()))?;
            }
        }
        tx.commit().map_err(|e| write(e.into()))
    }
}

/// Scope last: it is the only part that may contain `|`.
fn window_key(window: &WindowRef) -> String {
    let scope = match &window.scope {
        Scope::Global => "global".to_string(),
        Scope::Endpoint(name) => format!("endpoint:{name}"),
    };
    format!("{}|{}|{}|{scope}", window.period, window.start, window.end)
}

fn to_json(value: &impl Serialize) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Storage(format!("encoding a ledger row: {e}")))
}
