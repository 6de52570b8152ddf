//! Throwaway PostgreSQL databases for the tests: each test creates its own on the server at
//! `SWITCHYARD_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`, the server
//! every development and CI machine runs) and drops it afterwards. No server is a test failure
//! with a clear message, never a skip.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Whether the suite runs its coordinators on PostgreSQL (`SWITCHYARD_TEST_STORE=postgres`)
/// rather than on the default SQLite store.
pub fn enabled() -> bool {
    match std::env::var("SWITCHYARD_TEST_STORE").as_deref() {
        Ok("postgres") => true,
        Ok("sqlite") | Err(_) => false,
        Ok(other) => panic!("SWITCHYARD_TEST_STORE is sqlite or postgres, not {other:?}"),
    }
}

/// When the suite runs on PostgreSQL: the URL of the database that stands for the data
/// directory `dir` (created on first use, the same on every later call, so a restart on `dir`
/// finds its state). `None` on SQLite.
///
/// These databases outlive the test (a test's directory has no end the harness can see): each
/// process drops those of earlier test processes that have exited when it creates its first.
pub fn database_for(dir: &Path) -> Option<String> {
    static MADE: Mutex<Option<HashMap<PathBuf, String>>> = Mutex::new(None);
    if !enabled() {
        return None;
    }
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    let made = made.get_or_insert_with(|| {
        sweep();
        HashMap::new()
    });
    let url = made.entry(dir.to_path_buf()).or_insert_with(|| {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "switchyard_dir_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        admin(&format!("CREATE DATABASE {name}"));
        url_of(&name)
    });
    Some(url.clone())
}

/// Drops the per-directory databases of test processes that are gone.
fn sweep() {
    let names =
        admin_query("SELECT datname FROM pg_database WHERE datname LIKE 'switchyard_dir_%'");
    for name in names {
        let pid = name.split('_').nth(2).unwrap_or("");
        if !Path::new("/proc").join(pid).exists() {
            admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
    }
}

/// The URL of database `name` on the test server.
fn url_of(name: &str) -> String {
    let base = admin_url();
    let root = base
        .rsplit_once('/')
        .map_or(base.as_str(), |(root, _)| root);
    format!("{root}/{name}")
}

/// The server's administrative URL (a database that exists, to create others from).
pub fn admin_url() -> String {
    std::env::var("SWITCHYARD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Runs `sql` on the administrative database (on a thread of its own, so it works inside and
/// outside an async test).
pub fn admin(sql: &str) {
    admin_query(sql);
}

/// Runs the query `sql` on the administrative database; returns the first column of its rows.
pub fn admin_query(sql: &str) -> Vec<String> {
    query(&admin_url(), sql)
}

/// Runs the query `sql` on the database at `url`; returns the first column of its rows.
pub fn query(url: &str, sql: &str) -> Vec<String> {
    let (url, sql) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || query_here(&url, &sql))
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Everything the database at `url` stores, as text (every row of every table).
pub fn dump(url: &str) -> String {
    let tables = query(
        url,
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename",
    );
    tables
        .iter()
        .flat_map(|t| query(url, &format!("SELECT r::text FROM {t} r")))
        .collect::<Vec<_>>()
        .join("\n")
}

fn query_here(url: &str, sql: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "no PostgreSQL server answers at {url} ({e}); the PostgreSQL tests need one \
                     (set SWITCHYARD_TEST_POSTGRES to another server)"
                )
            });
        let driver = tokio::spawn(conn);
        let rows = client
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        drop(client);
        let _ = driver.await;
        rows.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .collect()
    })
}

/// A database of its own, dropped (with its connections) when this value drops.
pub struct TestDatabase {
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
}

impl TestDatabase {
    /// Creates an empty database.
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "switchyard_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        admin(&format!("CREATE DATABASE {name}"));
        let url = url_of(&name);
        Self { name, url }
    }
}

impl Default for TestDatabase {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        admin(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// Installs the fencing audit: every committed row written to `tasks`, `attempts` or
/// (deleted from) `keys` is checked against the lease of its slot, as the writing transaction
/// declared it (`switchyard.fence`); a write with no declaration, by another coordinator than
/// the owner, or under another epoch is recorded in `fencing_violations`.
pub fn install_audit(url: &str) {
    query(
        url,
        r#"
CREATE TABLE fencing_violations (
    at timestamptz NOT NULL DEFAULT clock_timestamp(), tbl text, slot int, declared text,
    owner bigint, epoch bigint
);
CREATE FUNCTION audit_fence() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    declared text := current_setting('switchyard.fence', true);
    s int;
    l record;
BEGIN
    IF TG_TABLE_NAME NOT IN ('tasks', 'attempts') THEN
        -- The cluster's rows: written only by a coordinator live in the database.
        IF declared IS NULL OR declared = '' OR NOT EXISTS (
            SELECT 1 FROM coordinators c WHERE c.id = split_part(declared, ':', 1)::bigint
               AND c.left_at IS NULL AND c.expires_at > clock_timestamp()) THEN
            INSERT INTO fencing_violations (tbl, slot, declared) VALUES (TG_TABLE_NAME, -1, declared);
        END IF;
        RETURN NULL;
    ELSIF TG_TABLE_NAME = 'tasks' THEN
        s := NEW.slot;
    ELSE
        SELECT t.slot INTO s FROM tasks t WHERE t.id = NEW.task;
    END IF;
    SELECT owner, epoch INTO l FROM leases WHERE slot = s;
    IF declared IS NULL OR declared = ''
       OR split_part(declared, ':', 1)::bigint IS DISTINCT FROM l.owner
       OR (string_to_array(split_part(declared, ':', 2), ',')::bigint[])[s + 1] <> l.epoch THEN
        INSERT INTO fencing_violations (tbl, slot, declared, owner, epoch)
        VALUES (TG_TABLE_NAME, s, declared, l.owner, l.epoch);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER audit_tasks AFTER INSERT OR UPDATE ON tasks
    FOR EACH ROW EXECUTE FUNCTION audit_fence();
CREATE TRIGGER audit_attempts AFTER INSERT OR UPDATE ON attempts
    FOR EACH ROW EXECUTE FUNCTION audit_fence();
CREATE TRIGGER audit_keys AFTER DELETE ON keys
    FOR EACH ROW EXECUTE FUNCTION audit_fence();
CREATE TRIGGER audit_workers AFTER INSERT OR UPDATE ON workers
    FOR EACH ROW EXECUTE FUNCTION audit_fence();
"#,
    );
}

pub fn violations(url: &str) -> usize {
    query(url, "SELECT count(*) FROM fencing_violations")[0]
        .parse()
        .unwrap()
}
