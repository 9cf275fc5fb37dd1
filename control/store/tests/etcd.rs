//! The etcd backend against real etcd (`/usr/bin/etcd`, Debian's
//! etcd-server) on loopback: the conformance suite, one fresh single-member
//! cluster per behaviour (revisions and compaction are cluster-wide), and
//! what is particular to etcd (unreachable endpoints, a key prefix, a
//! member failure).

use std::time::{Duration, Instant};

use kcontrol_store::conformance::{Fixture, next_event};
use kcontrol_store::{EtcdOptions, EtcdStore, Store, StoreError};
use testbed::etcd::EtcdCluster;

async fn fixture() -> Fixture<EtcdStore> {
    let cluster = tokio::task::spawn_blocking(|| EtcdCluster::start(1))
        .await
        .unwrap()
        .expect("starting etcd");
    let store = EtcdStore::connect(&cluster.endpoints(), EtcdOptions::default())
        .await
        .expect("connecting to etcd");
    Fixture::with_guard(store, cluster)
}

kcontrol_store::conformance_tests!(fixture);

/// The slow-watcher behaviour with more writes than etcd sends in one
/// response and more than the channel holds.
#[test]
fn slow_watcher_many_writes() {
    kcontrol_store::conformance::block_on(async {
        let f = fixture().await;
        kcontrol_store::conformance::slow_watcher_with(&f.store, 2000).await;
    });
}

/// Nothing listens: connecting fails with a clear error within the
/// timeout instead of hanging.
#[test]
fn unreachable_etcd_fails_fast() {
    kcontrol_store::conformance::block_on(async {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let opts = EtcdOptions {
            request_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(1),
            ..Default::default()
        };
        let started = Instant::now();
        let r = EtcdStore::connect(&[format!("http://127.0.0.1:{port}")], opts).await;
        let err = match r {
            Ok(_) => panic!("connected to nothing"),
            Err(e) => e.to_string(),
        };
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        assert!(err.contains(&port.to_string()), "{err}");
        assert!(
            EtcdStore::connect_url("etcd://nohostport", EtcdOptions::default())
                .await
                .is_err()
        );
    });
}

/// etcd goes away under a connected store: operations fail within the
/// request timeout, and work again once it is back.
#[test]
fn etcd_down_then_errors_not_hangs() {
    kcontrol_store::conformance::block_on(async {
        let mut cluster = tokio::task::spawn_blocking(|| EtcdCluster::start(1))
            .await
            .unwrap()
            .unwrap();
        let opts = EtcdOptions {
            request_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(1),
            watch_retry: Duration::from_secs(2),
            ..Default::default()
        };
        let store = EtcdStore::connect(&cluster.endpoints(), opts)
            .await
            .unwrap();
        store.create("/t/a", b"1".to_vec()).await.unwrap();
        let mut w = store.watch("/t/", 0).await.unwrap();
        assert_eq!(next_event(&mut w).await.kv.key, "/t/a");
        cluster.kill(0);
        let started = Instant::now();
        match store.create("/t/b", b"1".to_vec()).await {
            Err(StoreError::Backend(e)) => assert!(e.to_string().contains("gave up"), "{e}"),
            other => panic!("write with etcd down: {other:?}"),
        }
        assert!(store.get("/t/a").await.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "took {:?}",
            started.elapsed()
        );
        // The watch gives up after watch_retry: its stream ends.
        let ended = tokio::time::timeout(Duration::from_secs(10), w.recv())
            .await
            .expect("the watch stream did not end");
        assert!(ended.is_none(), "{ended:?}");
    });
}

/// Two stores with different key prefixes on one etcd do not see each
/// other's keys.
#[test]
fn key_prefixes_are_separate() {
    kcontrol_store::conformance::block_on(async {
        let cluster = tokio::task::spawn_blocking(|| EtcdCluster::start(1))
            .await
            .unwrap()
            .unwrap();
        let a = EtcdStore::connect(
            &cluster.endpoints(),
            EtcdOptions {
                key_prefix: "/a".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let b = EtcdStore::connect(
            &cluster.endpoints(),
            EtcdOptions {
                key_prefix: "/b".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        a.create("/x", b"a".to_vec()).await.unwrap();
        b.create("/x", b"b".to_vec()).await.unwrap();
        assert_eq!(a.get("/x").await.unwrap().unwrap().value, b"a");
        let all = b.list("", None, None, None).await.unwrap();
        assert_eq!(all.items.len(), 1);
        assert_eq!(all.items[0].key, "/x");
        assert_eq!(all.items[0].value, b"b");
    });
}

/// Three members, the leader SIGKILLed: writes and watches go on through
/// the other two, and nothing acknowledged is lost.
#[test]
fn member_failure() {
    kcontrol_store::conformance::block_on(async {
        let mut cluster = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
            .await
            .unwrap()
            .unwrap();
        let store = EtcdStore::connect(&cluster.endpoints(), EtcdOptions::default())
            .await
            .unwrap();
        let r0 = store.current_revision().await.unwrap();
        let mut w = store.watch("/t/", r0).await.unwrap();
        let mut acked = Vec::new();
        for i in 0..50 {
            acked.push(
                store
                    .create(&format!("/t/{i:03}"), b"x".to_vec())
                    .await
                    .unwrap(),
            );
        }
        let leader = cluster.leader().expect("an etcd leader");
        cluster.kill(leader);
        for i in 50..100 {
            acked.push(
                store
                    .create(&format!("/t/{i:03}"), b"x".to_vec())
                    .await
                    .unwrap(),
            );
        }
        let mut got = Vec::new();
        while got.len() < acked.len() {
            got.push(next_event(&mut w).await.kv.mod_revision);
        }
        assert_eq!(got, acked);
        let page = store.list("/t/", None, None, None).await.unwrap();
        assert_eq!(page.items.len(), 100);
    });
}
