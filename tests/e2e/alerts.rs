//! Alerts end to end: each signal raised by real verifications against a real server, its
//! audit record streamed by WatchAlerts, and its webhook delivered to a real HTTP receiver
//! that checks the Standard Webhooks signature with its own code; once per threshold and
//! period; retried with the same webhook-id while the receiver is down, and after a kill -9.

use std::collections::BTreeMap;
use std::time::Duration;
use tonic::Code;
use ward_client::proto::{
    IssueKeyRequest, Quota, RevokeSecretRequest, RotateSecretRequest, VerifyKeyRequest,
    VerifyResult,
};
use ward_tests::{pb, Delivery, TestCa, TestServer, WebhookReceiver};

const WAIT: Duration = Duration::from_secs(20);

/// A server with a test clock, fast alert thresholds and retries, and one webhook to `rx`.
fn server_with_webhook(rx: &WebhookReceiver, extra: &str) -> TestServer {
    let mut s = TestServer::start_with_test_clock();
    rx.write_secret(&s.data_dir().join("webhook.secret"));
    let ca = match &rx.ca_pem {
        Some(pem) => {
            std::fs::write(s.data_dir().join("webhook-ca.pem"), pem).unwrap();
            "ca_file = \"webhook-ca.pem\"\n"
        }
        None => "",
    };
    s.append_config(&format!(
        "[alerts]\nlearn_uses = 3\nscope_probe_threshold = 3\nretry_initial = \"200ms\"\n\
         retry_max_interval = \"400ms\"\n{extra}\n\n[[alerts.webhooks]]\nurl = \"{}\"\n\
         secret_file = \"webhook.secret\"\nevents = [\"key.*\", \"secret.*\", \"webhook.*\"]\n{ca}",
        rx.url()
    ));
    s.restart();
    s
}

fn verify(key: &str, ip: &str, scopes: &[&str]) -> VerifyKeyRequest {
    VerifyKeyRequest {
        api_key: key.to_owned(),
        client_ip: ip.to_owned(),
        required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Issues an API key with no policy; returns it.
async fn issue(admin: &ward_client::Client, name: &str) -> String {
    let req = IssueKeyRequest {
        name: name.into(),
        ..Default::default()
    };
    admin.issue_key(req).await.unwrap().api_key
}

async fn alerts_client(
    s: &TestServer,
    identity: &str,
) -> pb::alerts_client::AlertsClient<tonic::transport::Channel> {
    pb::alerts_client::AlertsClient::new(s.channel(identity).await)
}

/// Every alert in the log, without following.
async fn watched(s: &TestServer, identity: &str, req: pb::WatchAlertsRequest) -> Vec<pb::Alert> {
    let mut c = alerts_client(s, identity).await;
    let mut stream = c.watch_alerts(req).await.expect("WatchAlerts").into_inner();
    let mut out = Vec::new();
    while let Some(item) = stream.message().await.expect("alert stream") {
        if let Some(pb::watch_alerts_response::Item::Alert(a)) = item.item {
            out.push(a);
        }
    }
    out
}

/// Every alert of type (or family) `kind` so far, as admin.
async fn alerts_of(s: &TestServer, kind: &str) -> Vec<pb::Alert> {
    let req = pb::WatchAlertsRequest {
        types: vec![kind.into()],
        ..Default::default()
    };
    watched(s, "admin", req).await
}

fn count_by_type(ds: &[Delivery]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for d in ds {
        *m.entry(d.kind().to_owned()).or_default() += 1;
    }
    m
}

async fn report_leak(s: &TestServer, key: &str) -> pb::ReportLeakResponse {
    alerts_client(s, "admin")
        .await
        .report_leak(pb::ReportLeakRequest {
            api_key: key.to_owned(),
            location: format!("https://paste.example/raw/1?token={key}"),
            source: "e2e-scanner".into(),
            ..Default::default()
        })
        .await
        .expect("ReportLeak")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_signal_fires_once_signed_and_streamed() {
    let rx = WebhookReceiver::start();
    let s = server_with_webhook(&rx, "");
    let admin = s.client("admin").await;
    let key = admin
        .issue_key(IssueKeyRequest {
            name: "edge/partner".into(),
            scopes: vec!["orders:read".into()],
            quota: Some(Quota {
                limit: 10,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .api_key;
    let v = |ip: &'static str, scopes: &'static [&'static str]| {
        let (admin, key) = (admin.clone(), key.clone());
        async move {
            admin
                .verify_key(verify(&key, ip, scopes))
                .await
                .unwrap()
                .result()
        }
    };
    // Learning: three uses from one /24; then a new network, twice (one alert).
    for _ in 0..3 {
        assert_eq!(v("10.0.0.1", &["orders:read"]).await, VerifyResult::Valid);
    }
    assert_eq!(v("10.0.0.200", &["orders:read"]).await, VerifyResult::Valid);
    assert_eq!(
        v("192.168.7.7", &["orders:read"]).await,
        VerifyResult::Valid
    );
    assert_eq!(
        v("192.168.7.8", &["orders:read"]).await,
        VerifyResult::Valid
    );
    // Scope probing: four refusals, one alert.
    for _ in 0..4 {
        assert_eq!(
            v("10.0.0.1", &["orders:write"]).await,
            VerifyResult::InsufficientScope
        );
    }
    // Quota of 10: six used; low at 2 left, exhausted at 0, then refused: one alert each.
    for _ in 0..6 {
        v("10.0.0.1", &["orders:read"]).await;
    }
    for _ in 0..3 {
        assert_eq!(
            v("10.0.0.1", &["orders:read"]).await,
            VerifyResult::QuotaExceeded
        );
    }
    // A leak report, then revocation and use after it (twice: one alert).
    let leak = report_leak(&s, &key).await;
    assert!(leak.found);
    assert_eq!((leak.name.as_str(), leak.version), ("edge/partner", 1));
    admin
        .revoke_secret(RevokeSecretRequest {
            name: "edge/partner".into(),
            all_versions: true,
            reason: "leaked".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(v("10.0.0.1", &["orders:read"]).await, VerifyResult::Revoked);
    }

    let want = [
        "key.new_network",
        "key.scope_probe",
        "key.quota.low",
        "key.quota.exhausted",
        "key.leak_reported",
        "key.used_after_revoke",
    ];
    let seen = rx.wait_until(WAIT, |ds| {
        want.iter()
            .all(|k| ds.iter().any(|d| d.kind() == *k && d.answered == 200))
    });
    // Give a duplicate time to show up, then check: once each, every signature good.
    std::thread::sleep(Duration::from_millis(800));
    let accepted = rx.accepted();
    let counts = count_by_type(&accepted);
    for k in want {
        assert_eq!(counts.get(k), Some(&1), "{k}: {counts:?}");
    }
    assert_eq!(counts.len(), want.len(), "{counts:?}");
    for d in &seen {
        assert!(d.signature_ok, "bad signature: {d:?}");
        assert_eq!(d.signatures, 1);
        assert!(d.id.starts_with("msg_"), "{}", d.id);
        assert!(!d.raw_body.contains(&key), "a webhook carried the key");
        assert_eq!(d.body["data"]["secret"], "edge/partner", "{}", d.raw_body);
        assert!(d.body["timestamp"].is_string());
    }
    let net = &rx.accepted_of("key.new_network")[0];
    assert_eq!(net.body["data"]["details"]["network"], "192.168.7.0/24");
    let leaked = &rx.accepted_of("key.leak_reported")[0];
    assert_eq!(
        leaked.body["data"]["details"]["location"],
        "https://paste.example/raw/1?token=[key]"
    );

    // The same alerts are audit records, streamed with the same ids; filters narrow them.
    let all = watched(&s, "admin", pb::WatchAlertsRequest::default()).await;
    let ids: BTreeMap<String, String> = all
        .iter()
        .map(|a| (a.id.clone(), a.r#type.clone()))
        .collect();
    assert_eq!(all.len(), want.len(), "{all:?}");
    for d in &accepted {
        assert_eq!(ids.get(&d.id).map(String::as_str), Some(d.kind()));
    }
    let quota = alerts_of(&s, "key.quota.*").await;
    assert_eq!(quota.len(), 2);
    assert!(quota
        .iter()
        .all(|a| a.name == "edge/partner" && a.version == 1));
    let resumed = watched(
        &s,
        "admin",
        pb::WatchAlertsRequest {
            from_seq: quota[1].seq + 1,
            ..Default::default()
        },
    )
    .await;
    assert!(resumed.iter().all(|a| a.seq > quota[1].seq));
    assert!(watched(
        &s,
        "admin",
        pb::WatchAlertsRequest {
            name_prefix: "other/".into(),
            ..Default::default()
        },
    )
    .await
    .is_empty());
    // The same through grpcurl (server reflection serves the new service).
    let o = s.grpcurl(
        &["-d", r#"{"types":["key.leak_reported"]}"#],
        &["ward.v1.Alerts/WatchAlerts"],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains(r#""type": "key.leak_reported""#), "{out}");
    assert!(
        out.contains(&rx.accepted_of("key.leak_reported")[0].id),
        "{out}"
    );
    // `app` has no audit grant.
    let denied = alerts_client(&s, "app")
        .await
        .watch_alerts(pb::WatchAlertsRequest::default())
        .await
        .expect_err("app may not watch alerts");
    assert_eq!(denied.code(), Code::PermissionDenied);

    // Neither the key nor the webhook secret reached a log line.
    let logs = s.all_output();
    assert!(!logs.contains(&key[key.len() - 20..]), "the key was logged");
    assert!(
        !logs.contains(&rx.secret_text[6..]),
        "the webhook secret was logged"
    );
    // Metrics count them.
    let (_, metrics) = s.http_get("/metrics");
    assert!(
        metrics.contains("ward_alerts_total{type=\"key.new_network\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ward_webhook_deliveries_total{result=\"delivered\"} 6"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_after_grace_and_after_expiry_follow_the_test_clock() {
    let rx = WebhookReceiver::start();
    let s = server_with_webhook(&rx, "");
    let admin = s.client("admin").await;
    let issue = |name: &str| IssueKeyRequest {
        name: name.into(),
        expiration: Some(pb::issue_key_request::Expiration::Ttl(
            prost_types::Duration {
                seconds: 2 * 3600,
                nanos: 0,
            },
        )),
        ..Default::default()
    };
    let old = admin
        .issue_key(issue("edge/rotated"))
        .await
        .unwrap()
        .api_key;
    admin
        .rotate_secret(RotateSecretRequest {
            name: "edge/rotated".into(),
            grace_period: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let expiring = admin
        .issue_key(issue("edge/expiring"))
        .await
        .unwrap()
        .api_key;
    let r = |k: &str| {
        let (admin, k) = (admin.clone(), k.to_owned());
        async move {
            admin
                .verify_key(verify(&k, "", &[]))
                .await
                .unwrap()
                .result()
        }
    };
    assert_eq!(r(&old).await, VerifyResult::Valid);
    s.advance_clock(Duration::from_secs(3601));
    rx.set_clock_offset(s.clock_offset());
    assert_eq!(r(&old).await, VerifyResult::Disabled);
    assert_eq!(r(&old).await, VerifyResult::Disabled);
    // Delivered before the clock moves on (the receiver checks timestamps against it).
    rx.wait_until(WAIT, |ds| {
        ds.iter().any(|d| d.kind() == "key.used_after_grace")
    });
    s.advance_clock(Duration::from_secs(3600));
    rx.set_clock_offset(s.clock_offset());
    assert_eq!(r(&expiring).await, VerifyResult::Expired);
    let seen = rx.wait_until(WAIT, |ds| {
        ds.iter().any(|d| d.kind() == "key.used_after_grace")
            && ds.iter().any(|d| {
                d.kind() == "key.used_after_revoke" && d.body["data"]["secret"] == "edge/expiring"
            })
    });
    assert!(seen.iter().all(|d| d.signature_ok), "{seen:?}");
    let grace = rx.accepted_of("key.used_after_grace");
    assert_eq!(grace.len(), 1);
    assert_eq!(grace[0].body["data"]["version"], 1);
    let expired = rx.accepted_of("key.used_after_revoke");
    assert_eq!(expired[0].body["data"]["details"]["state"], "EXPIRED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spike_under_load_fires_once() {
    let rx = WebhookReceiver::start();
    let s = server_with_webhook(
        &rx,
        "spike_window = \"2s\"\nspike_factor = 5.0\nspike_min = 20",
    );
    let admin = s.client("admin").await;
    let key = issue(&admin, "edge/busy").await;
    // A baseline of about three per 2-second window…
    for _ in 0..3 {
        for _ in 0..3 {
            admin.verify_key(verify(&key, "", &[])).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(2100)).await;
    }
    assert!(rx.accepted_of("key.spike").is_empty());
    // …then 100 at once.
    let calls = (0..100).map(|_| {
        let (admin, key) = (admin.clone(), key.clone());
        tokio::spawn(async move { admin.verify_key(verify(&key, "", &[])).await.unwrap() })
    });
    for c in calls {
        assert!(c.await.unwrap().valid);
    }
    rx.wait_until(WAIT, |ds| ds.iter().any(|d| d.kind() == "key.spike"));
    std::thread::sleep(Duration::from_millis(800));
    let spikes = rx.accepted_of("key.spike");
    assert_eq!(spikes.len(), 1, "{spikes:?}");
    assert!(spikes[0].body["data"]["details"]["count"].as_u64().unwrap() >= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_then_up_gets_each_alert_once_with_one_id() {
    let rx = WebhookReceiver::start();
    rx.set_up(false);
    let s = server_with_webhook(&rx, "");
    let admin = s.client("admin").await;
    let key = issue(&admin, "edge/down").await;
    assert!(report_leak(&s, &key).await.found);
    let failed = rx.wait_until(WAIT, |ds| ds.len() >= 3);
    let id = failed[0].id.clone();
    assert!(failed
        .iter()
        .all(|d| d.id == id && d.answered == 503 && d.signature_ok));
    rx.set_up(true);
    rx.wait_until(WAIT, |ds| ds.iter().any(|d| d.answered == 200));
    std::thread::sleep(Duration::from_millis(1000));
    let accepted = rx.accepted();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(accepted[0].id, id);
    assert!(rx.attempts().iter().all(|d| d.id == id));
    let (_, metrics) = s.http_get("/metrics");
    assert!(
        metrics.contains("ward_webhook_deliveries_total{result=\"delivered\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("ward_webhook_pending 0"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_pending_at_a_kill_9_arrive_after_restart_with_the_same_id() {
    let rx = WebhookReceiver::start();
    rx.set_up(false);
    let mut s = server_with_webhook(&rx, "");
    let admin = s.client("admin").await;
    let key = issue(&admin, "edge/crash").await;
    assert!(report_leak(&s, &key).await.found);
    let failed = rx.wait_until(WAIT, |ds| !ds.is_empty());
    let id = failed[0].id.clone();
    s.kill9();
    rx.set_up(true);
    s.restart();
    rx.wait_until(WAIT, |ds| ds.iter().any(|d| d.answered == 200));
    std::thread::sleep(Duration::from_millis(800));
    let accepted = rx.accepted();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(accepted[0].id, id);
    assert!(accepted[0].signature_ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_too_long_is_disabled_and_a_test_event_enables_it() {
    let rx = WebhookReceiver::start();
    rx.set_up(false);
    let s = server_with_webhook(&rx, "retry_for = \"1s\"");
    let admin = s.client("admin").await;
    let key = issue(&admin, "edge/gone").await;
    // Two alerts waiting for the endpoint: it is disabled once, with one alert.
    assert!(report_leak(&s, &key).await.found);
    assert!(report_leak(&s, &key).await.found);
    // Disabled after a second of failures, with an alert record saying so.
    let mut disabled = Vec::new();
    for _ in 0..100 {
        disabled = alerts_of(&s, "webhook.disabled").await;
        if !disabled.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(disabled.len(), 1, "no webhook.disabled alert");
    assert!(
        disabled[0].data_json.contains("HTTP 503"),
        "{}",
        disabled[0].data_json
    );
    let attempts = rx.attempts().len();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        rx.attempts().len(),
        attempts,
        "a disabled endpoint is not called"
    );
    let disabled_again = alerts_of(&s, "webhook.disabled").await;
    assert_eq!(
        disabled_again.len(),
        1,
        "disabled twice: {disabled_again:?}"
    );

    // TestWebhook: admin only, configured URLs only; a success enables the endpoint again.
    let mut c = alerts_client(&s, "admin").await;
    let unknown = c
        .test_webhook(pb::TestWebhookRequest {
            url: "http://127.0.0.1:1/nope".into(),
        })
        .await
        .expect_err("unknown URL");
    assert_eq!(unknown.code(), Code::NotFound);
    let denied = alerts_client(&s, "app")
        .await
        .test_webhook(pb::TestWebhookRequest { url: rx.url() })
        .await
        .expect_err("app is no admin");
    assert_eq!(denied.code(), Code::PermissionDenied);
    rx.set_up(true);
    let t = c
        .test_webhook(pb::TestWebhookRequest { url: rx.url() })
        .await
        .unwrap()
        .into_inner();
    assert!(t.delivered, "{t:?}");
    assert_eq!(t.http_status, 200);
    let test = rx.accepted_of("ward.test");
    assert_eq!(test.len(), 1);
    assert_eq!(test[0].id, t.id);
    assert!(test[0].signature_ok);
    // The same through wardctl.
    let out = s.wardctl(&["alerts", "test", &rx.url()], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("delivered: HTTP 200, id msg_"),
        "{stdout}"
    );
    let out = s.wardctl(&["alerts", "test", "http://127.0.0.1:1/nope"], None);
    assert_eq!(out.status.code(), Some(1));
    let out = s.wardctl(&["--json", "alerts", "tail", "--type", "webhook.*"], None);
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(line["type"], "webhook.disabled");
    assert_eq!(line["data"]["details"]["last_error"], "HTTP 503");
    // Enabled again: the next alert is delivered.
    assert!(report_leak(&s, &key).await.found);
    rx.wait_until(WAIT, |ds| {
        ds.iter()
            .any(|d| d.kind() == "key.leak_reported" && d.answered == 200)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_rotation_and_staleness_fire_once_as_the_clock_moves() {
    let rx = WebhookReceiver::start();
    let s = server_with_webhook(&rx, "deadline_interval = \"100ms\"\nstale_after = \"30d\"");
    const DAY: u64 = 24 * 3600;
    let days = |n: u64| prost_types::Duration {
        seconds: (n * DAY) as i64,
        nanos: 0,
    };
    let admin = s.client("admin").await;
    admin
        .issue_key(IssueKeyRequest {
            name: "edge/expiring".into(),
            expiration: Some(pb::issue_key_request::Expiration::Ttl(days(10))),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .issue_key(IssueKeyRequest {
            name: "edge/idle".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let put = pb::PutSecretRequest {
        name: "db/password".into(),
        value: b"hunter2".to_vec(),
        rotation_period: Some(days(20)),
        ..Default::default()
    };
    s.raw_client("admin").await.put_secret(put).await.unwrap();
    let watch = |kind: &'static str| alerts_of(&s, kind);
    let advance = |d: u64| {
        s.advance_clock(Duration::from_secs(d * DAY));
        rx.set_clock_offset(s.clock_offset());
    };
    // Until `n` alerts of `kind` are recorded and delivered (before the clock moves on: the
    // receiver checks each timestamp against the clock as the test moved it).
    let wait_for = |kind: &'static str, n: usize| {
        let (watch, rx) = (&watch, &rx);
        async move {
            for _ in 0..100 {
                let got = watch(kind).await;
                if got.len() >= n {
                    rx.wait_until(WAIT, |ds| {
                        got.iter().all(|a| ds.iter().any(|d| d.id == a.id))
                    });
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("fewer than {n} {kind} alerts");
        }
    };
    // Nothing is due yet (a few passes go by).
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(watch("secret.*").await.is_empty());
    assert!(watch("key.stale").await.is_empty());
    // 7 days before expiry, then 1 day before: one alert each.
    advance(3);
    let first = wait_for("secret.expiring", 1).await;
    assert_eq!(first[0].name, "edge/expiring");
    assert!(
        first[0].data_json.contains("\"within_seconds\":604800"),
        "{}",
        first[0].data_json
    );
    advance(6);
    let both = wait_for("secret.expiring", 2).await;
    assert!(
        both[1].data_json.contains("\"within_seconds\":86400"),
        "{}",
        both[1].data_json
    );
    // Day 21: the static secret's rotation is due; day 31: the unused key is stale.
    advance(12);
    let due = wait_for("secret.rotation_due", 1).await;
    assert_eq!(due[0].name, "db/password");
    advance(10);
    let stale = wait_for("key.stale", 1).await;
    assert!(stale.iter().any(|a| a.name == "edge/idle"), "{stale:?}");
    // Passes go on; nothing fires twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(watch("secret.expiring").await.len(), 2);
    assert_eq!(watch("secret.rotation_due").await.len(), 1);
    let stale = watch("key.stale").await;
    assert_eq!(stale.iter().filter(|a| a.name == "edge/idle").count(), 1);
    // And the webhook got them, signed.
    let delivered = rx.wait_until(WAIT, |ds| {
        ds.iter()
            .filter(|d| d.kind().starts_with("secret.") && d.answered == 200)
            .count()
            == 3
    });
    assert!(delivered.iter().all(|d| d.signature_ok), "{delivered:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_webhook_stops_start_up_and_never_shows_its_secret() {
    let mut s = TestServer::start();
    s.stop();
    let config = s.config_path();
    let base = std::fs::read_to_string(&config).unwrap();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let try_with = |url: &str, secret_text: &str| {
        std::fs::write(s.data_dir().join("hook.secret"), secret_text).unwrap();
        std::fs::write(
            &config,
            format!(
                "{base}\n[[alerts.webhooks]]\nurl = \"{url}\"\nsecret_file = \"hook.secret\"\n"
            ),
        )
        .unwrap();
        s.serve_expect_failure(&config, &[])
    };
    for (url, secret_text, says) in [
        ("http://hooks.example.com/ward", secret, "loopback"),
        ("ftp://127.0.0.1/ward", secret, "https://"),
        (
            "https://127.0.0.1/ward",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_",
        ),
        (
            "https://127.0.0.1/ward",
            "whsec_c2hvcnQ=",
            "at least 24 bytes",
        ),
    ] {
        let f = try_with(url, secret_text);
        assert_eq!(f.code, Some(2), "{url}: {}", f.stderr);
        assert!(f.stderr.contains(says), "{url}: {}", f.stderr);
        assert!(
            !f.stderr.contains("MfKQ9r8GKYqrTwjUPD8IL"),
            "a secret reached stderr"
        );
    }
    // Fixed, it starts.
    std::fs::write(&config, base).unwrap();
    s.restart();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reported_key_can_be_quarantined_to_the_networks_it_learnt() {
    let rx = WebhookReceiver::start();
    let s = server_with_webhook(&rx, "");
    let admin = s.client("admin").await;
    let key = issue(&admin, "edge/quarantine").await;
    let v = |ip: &'static str| {
        let (admin, key) = (admin.clone(), key.clone());
        async move {
            admin
                .verify_key(verify(&key, ip, &[]))
                .await
                .unwrap()
                .result()
        }
    };
    for ip in ["10.1.2.3", "10.1.2.4", "10.9.9.9"] {
        assert_eq!(v(ip).await, VerifyResult::Valid);
    }
    // Seen after learning (a key.new_network alert): known, but not trusted by a quarantine.
    assert_eq!(v("192.168.1.1").await, VerifyResult::Valid);
    let report = |identity: &'static str, quarantine: bool| {
        let (s, key) = (&s, key.clone());
        async move {
            alerts_client(s, identity)
                .await
                .report_leak(pb::ReportLeakRequest {
                    api_key: key,
                    location: "ci log".into(),
                    source: "e2e".into(),
                    quarantine,
                })
                .await
        }
    };
    // Quarantining changes the key's policy: the `issue` verb, which app lacks.
    let denied = report("app", true)
        .await
        .expect_err("app may not change a key's policy");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let r = report("admin", true).await.unwrap().into_inner();
    assert!(r.found && r.quarantined, "{r:?}");
    assert_eq!(r.allowed_cidrs, ["10.1.2.0/24", "10.9.9.0/24"]);
    assert_eq!(v("10.1.2.200").await, VerifyResult::Valid);
    assert_eq!(v("192.168.1.1").await, VerifyResult::ForbiddenIp);
    assert_eq!(v("").await, VerifyResult::ForbiddenIp);
    // A key with no learnt network cannot be quarantined: revoke it instead.
    let fresh = issue(&admin, "edge/unused").await;
    let none = alerts_client(&s, "admin")
        .await
        .report_leak(pb::ReportLeakRequest {
            api_key: fresh,
            quarantine: true,
            ..Default::default()
        })
        .await
        .expect_err("nothing learnt");
    assert_eq!(none.code(), Code::FailedPrecondition);
    // Each report was an alert.
    let leaks = alerts_of(&s, "key.leak_reported").await;
    assert_eq!(leaks.len(), 3, "{leaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_deliveries_check_the_endpoint_certificate() {
    // An endpoint with a certificate from the configured CA gets the alert over TLS.
    let rx = WebhookReceiver::start_tls(&TestCa::new("hooks CA"));
    assert!(rx.url().starts_with("https://127.0.0.1:"));
    let s = server_with_webhook(&rx, "");
    let admin = s.client("admin").await;
    let key = issue(&admin, "edge/tls").await;
    assert!(report_leak(&s, &key).await.found);
    let got = rx.wait_until(WAIT, |ds| ds.iter().any(|d| d.answered == 200));
    assert!(
        got[0].signature_ok && got[0].kind() == "key.leak_reported",
        "{got:?}"
    );

    // One whose certificate another CA issued is never sent the alert: the handshake fails,
    // and the delivery waits in the outbox.
    let impostor = WebhookReceiver::start_tls(&TestCa::new("someone else"));
    let mut s2 = TestServer::start_with_test_clock();
    impostor.write_secret(&s2.data_dir().join("webhook.secret"));
    std::fs::write(
        s2.data_dir().join("webhook-ca.pem"),
        rx.ca_pem.clone().unwrap(),
    )
    .unwrap();
    s2.append_config(&format!(
        "[alerts]\nretry_initial = \"200ms\"\nretry_max_interval = \"400ms\"\n\n\
         [[alerts.webhooks]]\nurl = \"{}\"\nsecret_file = \"webhook.secret\"\n\
         ca_file = \"webhook-ca.pem\"\n",
        impostor.url()
    ));
    s2.restart();
    let admin2 = s2.client("admin").await;
    let key2 = issue(&admin2, "edge/tls").await;
    assert!(report_leak(&s2, &key2).await.found);
    let mut failed = 0;
    for _ in 0..100 {
        let (_, metrics) = s2.http_get("/metrics");
        failed = metrics
            .lines()
            .find_map(|l| l.strip_prefix("ward_webhook_deliveries_total{result=\"failed\"} "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if failed >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failed >= 2, "the impostor's handshake should fail, retried");
    assert!(
        impostor.attempts().is_empty(),
        "the alert reached an endpoint it must not"
    );
    assert!(s2.all_output().contains("TLS"), "the log says why");
}
