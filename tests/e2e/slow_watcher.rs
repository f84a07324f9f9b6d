//! A WatchSecrets client that stops reading does not hold writers back, as docs/api.md's
//! WatchSecrets section documents ("a watcher too slow to keep up recomputes its difference
//! instead of holding writers back"): its HTTP/2 window fills, the server's stream for it
//! blocks, the change broadcast passes it by; puts, and other watchers, carry on. When it
//! reads again it gets the latest state of every secret, even once the broadcast no longer
//! holds their names.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use ward_tests::{next_event, ok, pb, until_synced, TestServer};

use crate::certs::tls_connect;
use crate::put_req;

/// Writers, each putting this many versions (spread over `NAMES` secrets): far more changes
/// than the server buffers for one watcher (its broadcast holds 1,024 names).
const WRITERS: u64 = 4;
const PUTS_PER_WRITER: u64 = 400;
const NAMES: u64 = 40;
/// Puts per writer outside the watched prefix, afterwards (4 × 300 > 1,024).
const ELSEWHERE_PER_WRITER: u64 = 300;
/// The never-reading client's HTTP/2 windows: a few events fill them.
const WINDOW: u32 = 1024;

/// One gRPC message frame (uncompressed) holding `msg`.
fn grpc_frame(msg: &impl Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

/// The complete gRPC messages at the front of `buf`, decoded as watch events.
fn take_events(buf: &mut BytesMut) -> Vec<pb::WatchEvent> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        assert_eq!(buf[0], 0, "a compressed message");
        buf.advance(5);
        let msg = buf.split_to(len);
        out.push(pb::WatchEvent::decode(&msg[..]).expect("a WatchEvent"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_never_reads_does_not_hold_writers_back() {
    // Debug for Ward's own crate: the lagging watcher's recompute is logged at that level.
    let s = TestServer::start_with_env(&[("WARD_LOG", "info,ward_server=debug")]);
    let mut c = s.raw_client("admin").await;
    for n in 0..NAMES {
        ok(
            c.put_secret(put_req(&format!("slow/s{n}"), b"v1")).await,
            "first put",
        );
    }

    // The slow watcher: a bare HTTP/2 client with tiny windows that never releases them.
    let admin = s.identity_files("admin");
    let (_, tls) = tls_connect(&s, &admin.ca, Some((&admin.cert, &admin.key))).await;
    let (h2, conn) = h2::client::Builder::new()
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .handshake::<_, Bytes>(tls.expect("TLS to the server"))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::post(format!("https://{}/ward.v1.Secrets/WatchSecrets", s.addr()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut send) = h2.send_request(req, false).unwrap();
    send.send_data(
        grpc_frame(&pb::WatchSecretsRequest {
            name_prefix: "slow/".into(),
            ..Default::default()
        }),
        true,
    )
    .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("the watch answered")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut slow = resp.into_body();

    // A well-behaved watcher alongside it.
    let mut other = ok(
        c.watch_secrets(pb::WatchSecretsRequest {
            name_prefix: "slow/".into(),
            ..Default::default()
        })
        .await,
        "watch",
    );
    until_synced(&mut other).await;

    // The writers: every put must be answered, with nobody reading the slow stream.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut c = s.raw_client("admin").await;
        tasks.push(tokio::spawn(async move {
            let mut last = BTreeMap::new();
            for i in 0..PUTS_PER_WRITER {
                let name = format!("slow/s{}", (w * PUTS_PER_WRITER + i) % NAMES);
                let r = ok(
                    c.put_secret(put_req(&name, format!("w{w} i{i}").as_bytes()))
                        .await,
                    "put",
                );
                last.insert(name, r.version);
            }
            last
        }));
    }
    let mut newest: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        let last = tokio::time::timeout(Duration::from_secs(180), t)
            .await
            .expect("the writers were held back: 1,600 puts not done within 180 s")
            .unwrap();
        for (name, v) in last {
            let e = newest.entry(name).or_default();
            *e = (*e).max(v);
        }
    }
    // Then changes elsewhere, more than the broadcast holds: none of the slow/ names is left in
    // it, so only recomputing tells the slow watcher where they ended up.
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut c = s.raw_client("admin").await;
        tasks.push(tokio::spawn(async move {
            for i in 0..ELSEWHERE_PER_WRITER {
                let name = format!("busy/w{w}-{}", i % 20);
                ok(c.put_secret(put_req(&name, b"elsewhere")).await, "put");
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(180), t)
            .await
            .expect("the writers were held back: puts elsewhere not done within 180 s")
            .unwrap();
    }
    let took = started.elapsed();
    eprintln!(
        "{} puts with a stuck watcher took {took:?}",
        WRITERS * (PUTS_PER_WRITER + ELSEWHERE_PER_WRITER)
    );

    // The other watcher still hears about a change at once.
    let after = ok(
        c.put_secret(put_req("slow/s0", b"after the load")).await,
        "put after the load",
    );
    newest.insert("slow/s0".into(), after.version);
    loop {
        let e = next_event(&mut other).await;
        if e.name == "slow/s0" && e.version == newest["slow/s0"] {
            break;
        }
    }

    // Reading at last, the slow watcher ends up at the newest version of every secret.
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut buf = BytesMut::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen != newest {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = match tokio::time::timeout(left, slow.data()).await {
            Ok(Some(chunk)) => chunk.expect("slow watch stream"),
            Ok(None) => panic!("the slow watch stream ended"),
            Err(_) => panic!(
                "the slow watcher never caught up\n{:?}",
                newest
                    .iter()
                    .filter(|(n, v)| seen.get(*n) != Some(v))
                    .collect::<Vec<_>>()
            ),
        };
        slow.flow_control().release_capacity(chunk.len()).unwrap();
        buf.extend_from_slice(&chunk);
        for e in take_events(&mut buf) {
            if e.r#type() == pb::WatchEventType::Rotated {
                let v = seen.entry(e.name).or_default();
                *v = (*v).max(e.version);
            }
        }
    }
    // It got there by recomputing, not by the server buffering every change for it.
    s.wait_for_stderr(
        "watcher lagged; recomputing its differences",
        1,
        Duration::from_secs(10),
    );
    drop((slow, h2));
    conn.abort();
}
