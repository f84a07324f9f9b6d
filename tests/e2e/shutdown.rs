//! SIGINT (Ctrl-C) shuts the server down gracefully, like SIGTERM: exit code 0, open watch
//! streams ended with UNAVAILABLE, every acknowledged write (made right up to the signal) and
//! the usage counters kept, as docs/operating.md documents.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Code;
use ward_tests::{ok, pb, until_synced, TestServer, STOP_TIMEOUT};

use crate::{assert_value, put_req};

/// An acknowledged put: name, version, value.
type Acked = (String, u64, Vec<u8>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_cleanly_and_keeps_every_acknowledged_write() {
    let mut s = TestServer::start();
    let mut c = s.raw_client("admin").await;
    let key = ok(
        c.issue_key(pb::IssueKeyRequest {
            name: "sigint/key".into(),
            ..Default::default()
        })
        .await,
        "issue",
    )
    .api_key;
    // Usage counters live in memory between flushes (every usage_flush_seconds): only the
    // shutdown writes these.
    let mut keys = s.keys_client("admin").await;
    for _ in 0..3 {
        let v = ok(
            keys.verify_key(pb::VerifyKeyRequest {
                api_key: key.clone(),
                ..Default::default()
            })
            .await,
            "verify",
        );
        assert!(v.valid, "{v:?}");
    }
    let mut watch = ok(
        c.watch_secrets(pb::WatchSecretsRequest {
            name_prefix: "sigint/".into(),
            ..Default::default()
        })
        .await,
        "watch",
    );
    until_synced(&mut watch).await;

    // Writers run until the server stops answering; each remembers what was acknowledged.
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut c = s.raw_client("admin").await;
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0u64.. {
                let name = format!("sigint/w{w}-{}", i % 20);
                let value = format!("writer {w} write {i}").into_bytes();
                match c.put_secret(put_req(&name, &value)).await {
                    Ok(r) => acked
                        .lock()
                        .unwrap()
                        .push((name, r.into_inner().version, value)),
                    Err(_) => return i,
                }
            }
            unreachable!()
        }));
    }
    // Let them get going, then Ctrl-C.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 40 {
        assert!(Instant::now() < deadline, "the writers did not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.signal("INT");

    // The open watch ends with UNAVAILABLE, telling the client to reconnect.
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(20), watch.message()).await {
            Err(_) => panic!("the watch stream outlived the shutdown by 20 s"),
            Ok(Ok(Some(_))) => continue, // events of the writes before the signal
            Ok(other) => break other,
        }
    };
    match end {
        Err(st) => assert_eq!(st.code(), Code::Unavailable, "watch end: {st:?}"),
        Ok(None) => panic!("the watch stream ended without a status"),
        Ok(Some(_)) => unreachable!(),
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    let code = loop {
        if let Some(code) = s.exit_code() {
            break code;
        }
        assert!(
            Instant::now() < deadline,
            "ward-server did not exit within {STOP_TIMEOUT:?} of SIGINT\n{}",
            s.stderr_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        code,
        Some(0),
        "exit code after SIGINT\n{}",
        s.stderr_tail(30)
    );
    for w in writers {
        w.await.unwrap();
    }
    assert!(s.count_in_stderr("shut down") >= 1, "{}", s.stderr_tail(20));

    // Everything acknowledged is there after a restart, and so are the usage counts.
    drop((c, keys, watch));
    s.restart();
    let mut c = s.raw_client("admin").await;
    let acked = acked.lock().unwrap().clone();
    for (name, version, value) in &acked {
        assert_value(&mut c, name, *version, value).await;
    }
    let usage = ok(
        s.keys_client("admin")
            .await
            .get_key_usage(pb::GetKeyUsageRequest {
                name: "sigint/key".into(),
                version: 0,
            })
            .await,
        "usage after restart",
    );
    let total: u64 = usage.versions.iter().map(|v| v.total).sum();
    assert_eq!(total, 3, "verifications counted before SIGINT: {usage:?}");
}
