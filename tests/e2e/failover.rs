//! Failover of the SDK and wardctl between Ward servers. Two dev servers share one dev CA (so
//! one client certificate reaches both) but nothing else: each is its own sled vault, so the
//! value of `failover/who` says which server answered. The first is killed with SIGKILL,
//! then restarted on the same port.

use std::time::Duration;

use tonic::Code;
use ward_client::{proto, Cache, CacheConfig, CacheEvent, Client, ClientConfig};
use ward_tests::{ok, run_tool, TestServer};

use crate::lifecycle::{cache_event, rotate_req};
use crate::{assert_code, describe, put, put_req};

/// Holds `a` on the first server and `b` on the second.
const WHO: &str = "failover/who";

/// The SDK configuration for `identity` over `servers`, in that order, with a short failover
/// backoff so that a recovered server is probed soon.
fn config(servers: &[&TestServer], identity: &str) -> ClientConfig {
    let first = servers[0];
    first
        .client_config(&first.identity_files(identity))
        .with_endpoints(servers.iter().map(|s| s.addr().to_string()))
        .expect("two distinct addresses")
        .with_failover_backoff(Duration::from_millis(50), Duration::from_millis(200))
}

/// Which server answered a fetch of [`WHO`].
async fn who(c: &Client) -> String {
    let got = c.fetch_secret(WHO, 0).await.expect("fetch who");
    String::from_utf8(got.value).unwrap()
}

/// Two servers with one CA; `WHO` holds `a` on the first and `b` on the second.
async fn pair() -> (TestServer, TestServer) {
    let a = TestServer::start();
    let b = TestServer::start_with_tls_of(&a);
    for (s, value) in [(&a, b"a"), (&b, b"b")] {
        put(&mut s.raw_client("admin").await, WHO, value).await;
    }
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_and_wardctl_fail_over_when_a_server_is_killed() {
    let (mut a, b) = pair().await;
    let mut on_b = b.raw_client("admin").await;
    // Three clients, each connected to `a` (the first listed) before it dies.
    let reader = Client::connect(config(&[&a, &b], "admin")).await.unwrap();
    let writer = Client::connect(config(&[&a, &b], "admin")).await.unwrap();
    let dedup = Client::connect(config(&[&a, &b], "admin")).await.unwrap();
    for c in [&reader, &writer, &dedup] {
        assert_eq!(who(c).await, "a");
        assert!(c.endpoints().iter().all(|e| e.healthy));
    }

    a.kill9();

    // Reads go on, answered by `b`, with no error surfaced; `a` is now tried last.
    assert_eq!(who(&reader).await, "b");
    let health = reader.endpoints();
    assert!(!health[0].healthy && health[1].healthy, "{health:?}");
    for _ in 0..5 {
        assert_eq!(who(&reader).await, "b");
    }

    // A write without request_id is sent once, to `a`: its failure is returned, not resent.
    let err = writer
        .put_secret(put_req("failover/once", b"x"))
        .await
        .expect_err("a write without request_id to a dead server");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_code(
        describe(&mut on_b, "failover/once").await,
        Code::NotFound,
        "the write was not resent to b",
    );
    // The writer's next call goes to `b` directly.
    assert_eq!(who(&writer).await, "b");

    // With a request_id it is retried on `b`, and applied once.
    let mut req = put_req("failover/dedup", b"x");
    req.request_id = "failover-dedup-1".into();
    let first = dedup
        .put_secret(req.clone())
        .await
        .expect("put with request_id");
    assert_eq!(first.version, 1);
    let again = dedup.put_secret(req).await.expect("the same put again");
    assert_eq!(again, first);
    let meta = ok(
        on_b.describe_secret(proto::DescribeSecretRequest {
            name: "failover/dedup".into(),
        })
        .await,
        "describe on b",
    );
    assert_eq!(meta.versions.len(), 1);

    // wardctl with WARD_ADDR=a,b: the same, from the command line.
    let files = a.identity_files("admin");
    let mut cmd = a.wardctl_command();
    cmd.env("WARD_ADDR", format!("{},{}", a.addr(), b.addr()))
        .env("WARD_CA", &files.ca)
        .env("WARD_CERT", &files.cert)
        .env("WARD_KEY", &files.key)
        .args(["get", WHO]);
    let out = run_tool(cmd, None);
    assert!(
        out.status.success(),
        "wardctl get with a dead first address: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"b");

    // `a` comes back on the same address. It is preferred again only once it has answered:
    // the next call still goes to `b` (and starts a probe of `a`)...
    a.restart_on_same_port();
    assert!(!reader.endpoints()[0].healthy);
    assert_eq!(who(&reader).await, "b");
    // ...and once a probe found it serving, calls go to `a` again.
    for _ in 0..200 {
        if reader.endpoints()[0].healthy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        who(&reader).await;
    }
    assert!(reader.endpoints()[0].healthy, "{:?}", reader.endpoints());
    assert_eq!(who(&reader).await, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_resyncs_from_another_server_when_its_own_dies() {
    let (mut a, b) = pair().await;
    let name = "failover/db";
    put(&mut a.raw_client("admin").await, name, b"one").await;
    // `b` is ahead: it already has version 2 (a cluster's replicas would agree; here the
    // difference shows that the cache resends what it holds and gets the rest from `b`).
    let mut on_b = b.raw_client("admin").await;
    put(&mut on_b, name, b"one").await;
    ok(
        on_b.rotate_secret(rotate_req(name, b"two", Some(3600)))
            .await,
        "rotate on b",
    );

    let client = Client::connect(config(&[&a, &b], "app")).await.unwrap();
    let cfg = CacheConfig::new()
        .with_reconnect_backoff(Duration::from_millis(20), Duration::from_secs(1));
    let cache = Cache::new(client, cfg);
    let mut events = cache.subscribe();
    let got = cache.get(name).await.unwrap();
    assert_eq!((got.version, got.value()), (1, &b"one"[..]));
    cache_event(&mut events, "Synced with a", |e| {
        matches!(e, CacheEvent::Synced)
    })
    .await;

    a.kill9();
    cache_event(&mut events, "Disconnected", |e| {
        matches!(e, CacheEvent::Disconnected(_))
    })
    .await;
    cache_event(&mut events, "Synced with b", |e| {
        matches!(e, CacheEvent::Synced)
    })
    .await;
    assert!(cache.is_synced());
    let got = cache.get(name).await.unwrap();
    assert_eq!((got.version, got.value()), (2, &b"two"[..]));
    assert_eq!(cache.get_version(name, 1).await.unwrap().value(), b"one");
}
