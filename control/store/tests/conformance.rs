//! The conformance suite against the SQLite backend with its default
//! options (WAL, synchronous=FULL).

use kcontrol_store::SqliteStore;
use kcontrol_store::conformance::Fixture;

async fn fixture() -> Fixture<SqliteStore> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = SqliteStore::open(dir.path().join("store.db")).expect("open the store");
    Fixture::with_guard(store, dir)
}

kcontrol_store::conformance_tests!(fixture);
