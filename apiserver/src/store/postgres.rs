//! The PostgreSQL backend: any number of apiservers on one database.
//!
//! Every commit takes the row lock of `shoal_meta` first, compares the revision with the
//! one its batch was computed at, and writes the rows, the batch into `shoal_changes` and
//! the new revision before it commits; so commits are serial across replicas and their
//! revisions are their commit order. `NOTIFY shoal_changes` tells the other replicas to
//! read the feed; they also poll it, as a notification is lost with its connection.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{watch, Mutex};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

use super::{Backend, Batch, Committed, Snapshot, StoreError, Table, Write};

/// The schema, in order. A shipped migration is never edited; the next one is added.
const MIGRATIONS: &[(i32, &str, &str)] =
    &[(1, "store", include_str!("../../migrations/0001_store.sql"))];

/// Batches kept in `shoal_changes` for replicas that fall behind; one further behind
/// loads a snapshot instead.
const KEEP_CHANGES: u64 = 100_000;

/// How long one database round trip (or transaction) may take before the connection is
/// dropped and the operation fails: a database that stops answering must not hold
/// every writer of this replica forever.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

const CHANNEL: &str = "shoal_changes";

/// A store in a PostgreSQL database.
pub struct PostgresBackend {
    config: Config,
    /// The connection commits run on (one writer per process at a time).
    writer: Mutex<Option<Client>>,
    /// The connection for snapshots and the feed.
    reader: Mutex<Option<Client>>,
    news: watch::Sender<u64>,
}

fn db_error(e: tokio_postgres::Error) -> StoreError {
    // The server's own message says what is wrong (auth, missing database); keep it.
    let detail = e
        .as_db_error()
        .map(|db| format!("{}: {}", db.code().code(), db.message()))
        .unwrap_or_else(|| e.to_string());
    StoreError::Backend(format!("postgres: {detail}"))
}

fn timed_out(what: &str) -> StoreError {
    StoreError::Backend(format!(
        "postgres: {what} took longer than {}s; the connection was dropped",
        OPERATION_TIMEOUT.as_secs()
    ))
}

async fn connect(config: &Config) -> Result<Client, StoreError> {
    let (client, connection) = tokio::time::timeout(OPERATION_TIMEOUT, config.connect(NoTls))
        .await
        .map_err(|_| timed_out("connecting"))?
        .map_err(db_error)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "postgres connection closed");
        }
    });
    Ok(client)
}

/// The connection in `slot`, connecting first if there is none (or it broke).
async fn connected<'a>(
    config: &Config,
    slot: &'a Mutex<Option<Client>>,
) -> Result<tokio::sync::MutexGuard<'a, Option<Client>>, StoreError> {
    let mut guard = slot.lock().await;
    if guard.as_ref().is_none_or(|c| c.is_closed()) {
        *guard = Some(connect(config).await?);
    }
    Ok(guard)
}

/// The outcome of one timed operation on the connection in `slot`: a failure other than
/// the server refusing a statement, or a timeout, drops the connection so the next call
/// starts afresh.
fn settle<T>(
    slot: &mut Option<Client>,
    what: &str,
    outcome: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
) -> Result<T, StoreError> {
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            if e.as_db_error().is_none() {
                *slot = None;
            }
            Err(db_error(e))
        }
        Err(_) => {
            *slot = None;
            Err(timed_out(what))
        }
    }
}

impl PostgresBackend {
    /// Connects to `url` (`postgres://user:password@host:port/database`), applies the
    /// migrations the database lacks, and starts listening for other replicas' commits.
    pub async fn connect(url: &str) -> Result<Arc<PostgresBackend>, StoreError> {
        let mut config: Config = url.parse().map_err(|e| {
            StoreError::Backend(format!(
                "--store {}: not a PostgreSQL URL ({e}); expected postgres://user:password@host:port/database",
                redact(url)
            ))
        })?;
        config.connect_timeout(OPERATION_TIMEOUT);
        config.application_name("shoal-apiserver");
        let mut client = connect(&config).await.map_err(|e| {
            StoreError::Backend(format!("cannot reach the store at {}: {e}", redact(url)))
        })?;
        migrate(&mut client).await?;
        let (news, _) = watch::channel(0);
        let backend = Arc::new(PostgresBackend {
            config: config.clone(),
            writer: Mutex::new(Some(client)),
            reader: Mutex::new(None),
            news,
        });
        tokio::spawn(listen(config, backend.news.clone()));
        Ok(backend)
    }
}

/// A URL with its password replaced, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let txn = client.transaction().await.map_err(db_error)?;
    // Two replicas starting together: one migrates, the other waits and finds it done.
    txn.execute("SELECT pg_advisory_xact_lock(5370001)", &[])
        .await
        .map_err(db_error)?;
    txn.batch_execute(
        "CREATE TABLE IF NOT EXISTS shoal_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(db_error)?;
    let applied: Vec<i32> = txn
        .query("SELECT version FROM shoal_migrations", &[])
        .await
        .map_err(db_error)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if let Some(newer) = applied
        .iter()
        .find(|v| !MIGRATIONS.iter().any(|(m, _, _)| m == *v))
    {
        return Err(StoreError::Backend(format!(
            "the database has schema migration {newer}, which this apiserver does not know: \
             it was upgraded by a newer apiserver; run that version (or restore a backup)"
        )));
    }
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        txn.batch_execute(sql).await.map_err(|e| {
            StoreError::Backend(format!(
                "schema migration {version} ({name}) failed: {}",
                db_error(e)
            ))
        })?;
        txn.execute(
            "INSERT INTO shoal_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(db_error)?;
        tracing::info!(version, name, "applied schema migration");
    }
    txn.commit().await.map_err(db_error)
}

/// Listens for other replicas' commits until the backend is dropped, reconnecting after
/// failures; every (re)connection ticks too, since notifications were lost while down.
async fn listen(config: Config, news: watch::Sender<u64>) {
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(n)) => {
                                if tx.send(n.payload().parse::<u64>().unwrap_or(0)).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                });
                if client
                    .batch_execute(&format!("LISTEN {CHANNEL}"))
                    .await
                    .is_ok()
                {
                    news.send_modify(|n| *n += 1);
                    loop {
                        tokio::select! {
                            message = rx.recv() => match message {
                                Some(_) => news.send_modify(|n| *n += 1),
                                None => break,
                            },
                            _ = news.closed() => {
                                driver.abort();
                                return;
                            }
                        }
                    }
                }
                driver.abort();
            }
            Err(error) => tracing::warn!(%error, "cannot listen for other replicas' changes"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = news.closed() => return,
        }
    }
}

fn revision(value: i64) -> u64 {
    value.max(0) as u64
}

fn signed(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| {
        StoreError::Backend(format!("revision {value} does not fit PostgreSQL's bigint"))
    })
}

fn table_of(name: &str) -> Result<Table, StoreError> {
    Table::from_name(name).ok_or_else(|| StoreError::Corrupt {
        table: "shoal_kv",
        key: name.to_string(),
        reason: "no such table: written by a newer apiserver?".into(),
    })
}

/// The rows of one commit, as statement parameters.
struct CommitRows<'a> {
    base: i64,
    first: i64,
    last: i64,
    put: (Vec<&'static str>, Vec<&'a [u8]>, Vec<&'a [u8]>),
    delete: (Vec<&'static str>, Vec<&'a [u8]>),
    #[allow(clippy::type_complexity)]
    changes: (
        Vec<i32>,
        Vec<&'static str>,
        Vec<&'a [u8]>,
        Vec<Option<&'a [u8]>>,
    ),
    compact_to: Option<i64>,
    payload: String,
}

async fn load_on(
    client: &mut Client,
) -> Result<(i64, Vec<tokio_postgres::Row>), tokio_postgres::Error> {
    let txn = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let meta = txn
        .query_one("SELECT revision FROM shoal_meta WHERE id = 1", &[])
        .await?;
    let rows = txn
        .query("SELECT tbl, key, value FROM shoal_kv", &[])
        .await?;
    txn.commit().await?;
    Ok((meta.get::<_, i64>(0), rows))
}

async fn commit_on(
    client: &mut Client,
    rows: &CommitRows<'_>,
) -> Result<Committed, tokio_postgres::Error> {
    let txn = client.transaction().await?;
    // The row lock serialises commits of every replica until this one ends.
    let current: i64 = txn
        .query_one(
            "SELECT revision FROM shoal_meta WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await?
        .get(0);
    if current != rows.base {
        txn.rollback().await?;
        return Ok(Committed::Conflict);
    }
    let (put_tables, put_keys, put_values) = &rows.put;
    if !put_tables.is_empty() {
        txn.execute(
            "INSERT INTO shoal_kv (tbl, key, value, revision)
             SELECT t, k, v, $4 FROM unnest($1::text[], $2::bytea[], $3::bytea[]) AS u(t, k, v)
             ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value, revision = EXCLUDED.revision",
            &[put_tables, put_keys, put_values, &rows.first],
        )
        .await?;
    }
    let (del_tables, del_keys) = &rows.delete;
    if !del_tables.is_empty() {
        txn.execute(
            "DELETE FROM shoal_kv WHERE (tbl, key) IN
             (SELECT t, k FROM unnest($1::text[], $2::bytea[]) AS u(t, k))",
            &[del_tables, del_keys],
        )
        .await?;
    }
    let (index, tables, keys, values) = &rows.changes;
    txn.execute(
        "INSERT INTO shoal_changes (revision, idx, last, tbl, key, value)
         SELECT $1, i, $2, t, k, v
         FROM unnest($3::integer[], $4::text[], $5::bytea[], $6::bytea[]) AS u(i, t, k, v)",
        &[&rows.first, &rows.last, index, tables, keys, values],
    )
    .await?;
    txn.execute(
        "UPDATE shoal_meta SET revision = $1 WHERE id = 1",
        &[&rows.last],
    )
    .await?;
    if let Some(compact_to) = rows.compact_to {
        txn.execute(
            "DELETE FROM shoal_changes WHERE revision <= $1",
            &[&compact_to],
        )
        .await?;
        txn.execute(
            "UPDATE shoal_meta SET compacted = GREATEST(compacted, $1) WHERE id = 1",
            &[&compact_to],
        )
        .await?;
    }
    txn.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &rows.payload])
        .await?;
    txn.commit().await?;
    Ok(Committed::Done)
}

async fn changes_on(
    client: &mut Client,
    after: i64,
) -> Result<Option<Vec<tokio_postgres::Row>>, tokio_postgres::Error> {
    let meta = client
        .query_one(
            "SELECT revision, compacted FROM shoal_meta WHERE id = 1",
            &[],
        )
        .await?;
    let (current, compacted): (i64, i64) = (meta.get(0), meta.get(1));
    if after < compacted || current - after > KEEP_CHANGES as i64 {
        return Ok(None);
    }
    if current == after {
        return Ok(Some(Vec::new()));
    }
    let rows = client
        .query(
            "SELECT revision, last, tbl, key, value FROM shoal_changes
             WHERE revision > $1 ORDER BY revision, idx",
            &[&after],
        )
        .await?;
    Ok(Some(rows))
}

#[async_trait::async_trait]
impl Backend for PostgresBackend {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn load(&self) -> Result<Snapshot, StoreError> {
        let mut slot = connected(&self.config, &self.reader).await?;
        let client = slot.as_mut().expect("connected");
        let outcome = tokio::time::timeout(OPERATION_TIMEOUT, load_on(client)).await;
        let rows = settle(&mut slot, "loading the store", outcome)?;
        drop(slot);
        let (current, rows) = rows;
        let mut entries = Vec::with_capacity(rows.len());
        for row in rows {
            let table = table_of(row.get(0))?;
            entries.push((table, row.get::<_, Vec<u8>>(1), row.get::<_, Vec<u8>>(2)));
        }
        Ok(Snapshot {
            revision: revision(current),
            entries,
        })
    }

    async fn commit(&self, batch: &Batch) -> Result<Committed, StoreError> {
        let base = signed(batch.revision - 1)?;
        let first = signed(batch.revision)?;
        let last = signed(batch.last)?;
        let mut put_tables = Vec::new();
        let mut put_keys = Vec::new();
        let mut put_values = Vec::new();
        let mut del_tables = Vec::new();
        let mut del_keys = Vec::new();
        let mut change_tables = Vec::new();
        let mut change_keys = Vec::new();
        let mut change_values: Vec<Option<&[u8]>> = Vec::new();
        let mut change_index = Vec::new();
        for (i, write) in batch.writes.iter().enumerate() {
            let table = write.table.name();
            match &write.value {
                Some(value) => {
                    put_tables.push(table);
                    put_keys.push(write.key.as_slice());
                    put_values.push(value.as_slice());
                }
                None => {
                    del_tables.push(table);
                    del_keys.push(write.key.as_slice());
                }
            }
            change_tables.push(table);
            change_keys.push(write.key.as_slice());
            change_values.push(write.value.as_deref());
            change_index.push(i as i32);
        }
        // Crossing a multiple of 1024 trims the feed: rarely, and by every replica alike.
        let compact_to = (batch.last / 1024 > (batch.revision - 1) / 1024
            && batch.last > KEEP_CHANGES)
            .then(|| signed(batch.last - KEEP_CHANGES))
            .transpose()?;
        let payload = batch.last.to_string();
        let rows = CommitRows {
            base,
            first,
            last,
            put: (put_tables, put_keys, put_values),
            delete: (del_tables, del_keys),
            changes: (change_index, change_tables, change_keys, change_values),
            compact_to,
            payload,
        };
        let mut slot = connected(&self.config, &self.writer).await?;
        let client = slot.as_mut().expect("connected");
        let outcome = tokio::time::timeout(OPERATION_TIMEOUT, commit_on(client, &rows)).await;
        settle(&mut slot, "a commit", outcome)
    }

    async fn changes_after(&self, after: u64) -> Result<Option<Vec<Batch>>, StoreError> {
        let after = signed(after)?;
        let mut slot = connected(&self.config, &self.reader).await?;
        let client = slot.as_mut().expect("connected");
        let outcome = tokio::time::timeout(OPERATION_TIMEOUT, changes_on(client, after)).await;
        let rows = settle(&mut slot, "reading the change feed", outcome)?;
        drop(slot);
        let Some(rows) = rows else {
            return Ok(None);
        };
        let mut batches: Vec<Batch> = Vec::new();
        for row in rows {
            let first = revision(row.get(0));
            let write = Write {
                table: table_of(row.get(2))?,
                key: row.get(3),
                value: row.get(4),
            };
            match batches.last_mut() {
                Some(batch) if batch.revision == first => batch.writes.push(write),
                _ => batches.push(Batch {
                    revision: first,
                    last: revision(row.get(1)),
                    writes: vec![write],
                }),
            }
        }
        Ok(Some(batches))
    }

    fn news(&self) -> Option<watch::Receiver<u64>> {
        Some(self.news.subscribe())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // A PostgreSQL commit is durable when it returns.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::TestPostgres;
    use super::super::{tests, Store};
    use super::*;

    #[test]
    fn urls_are_redacted_in_messages() {
        assert_eq!(
            redact("postgres://shoal:secret@db:5432/shoal"),
            "postgres://shoal:***@db:5432/shoal"
        );
        assert_eq!(redact("postgres://db/shoal"), "postgres://db/shoal");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn meets_the_store_contract_on_one_and_on_two_replicas() {
        let Some(postgres) = TestPostgres::start_or_skip("the PostgreSQL store contract") else {
            return;
        };
        let url = postgres.create_database("contract").await;
        let a = Store::open(PostgresBackend::connect(&url).await.unwrap())
            .await
            .unwrap();
        tests::contract(&a).await;
        // A second replica starts from the same rows, then both write at once.
        let b = Store::open(PostgresBackend::connect(&url).await.unwrap())
            .await
            .unwrap();
        assert_eq!(b.revision(), a.revision());
        assert_eq!(b.len(Table::Revisions), 3);
        tests::shared_contract(&a, &b).await;
        // A restarted replica (migrations already applied) loads what both wrote.
        let c = Store::open(PostgresBackend::connect(&url).await.unwrap())
            .await
            .unwrap();
        assert_eq!(
            c.get(Table::Leases, b"shared-counter").as_deref(),
            Some(&30u64.to_be_bytes()[..])
        );
    }

    #[tokio::test]
    async fn an_unreachable_database_is_a_clear_error() {
        // A port nobody listens on (bound, then released).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let error =
            PostgresBackend::connect(&format!("postgres://shoal:pw@127.0.0.1:{port}/shoal"))
                .await
                .err()
                .unwrap()
                .to_string();
        assert!(
            error.contains("cannot reach the store at postgres://shoal:***@127.0.0.1"),
            "{error}"
        );
        let error = PostgresBackend::connect("mysql://x")
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("not a PostgreSQL URL"), "{error}");
    }
}
