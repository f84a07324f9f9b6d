//! VerifyKey end to end: every result code through the SDK (and VALID / MALFORMED through
//! grpcurl), bad input, the rate limit's retry_after, the quota ledger under concurrency and
//! across `kill -9`, usage counters and the stale-key report.
//!
//! REVOKED and DISABLED need RotateSecret / RevokeSecret (the lifecycle work); until then
//! they are covered by the server's unit tests (keys::tests), which write the version states
//! through the store exactly as those RPCs will.

use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::Code;
use ward::keyformat::ApiKey;
use ward_client::Client;
use ward_tests::{pb, TestServer};

fn issue_req(name: &str) -> pb::IssueKeyRequest {
    pb::IssueKeyRequest {
        name: name.to_owned(),
        ..Default::default()
    }
}

fn req(key: &str) -> pb::VerifyKeyRequest {
    pb::VerifyKeyRequest {
        api_key: key.to_owned(),
        ..Default::default()
    }
}

async fn issue(c: &Client, r: pb::IssueKeyRequest) -> String {
    let name = r.name.clone();
    c.issue_key(r)
        .await
        .unwrap_or_else(|e| panic!("issue {name}: {e}"))
        .api_key
}

async fn verify(c: &Client, r: pb::VerifyKeyRequest) -> pb::VerifyKeyResponse {
    c.verify_key(r).await.expect("VerifyKey answers OK")
}

async fn result(c: &Client, r: pb::VerifyKeyRequest) -> pb::VerifyResult {
    let v = verify(c, r).await;
    assert_eq!(v.valid, v.result() == pb::VerifyResult::Valid, "{v:?}");
    v.result()
}

fn now_ts(offset_secs: i64) -> prost_types::Timestamp {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    prost_types::Timestamp {
        seconds: now.as_secs() as i64 + offset_secs,
        nanos: 0,
    }
}

fn expire_now(name: &str) -> pb::UpdateKeyPolicyRequest {
    pb::UpdateKeyPolicyRequest {
        name: name.to_owned(),
        policy: Some(pb::KeyPolicy {
            expire_time: Some(now_ts(0)),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["expire_time".into()],
        }),
        request_id: String::new(),
    }
}

fn code_of<T: std::fmt::Debug>(r: Result<T, ward_client::Error>) -> Code {
    r.expect_err("expected an error").code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_result_code_through_the_sdk() {
    let mut s = TestServer::start();
    // An edge proxy that may verify only edge/* keys.
    let policy = s.data_dir().join("policy.toml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str(
        "\n[[rule]]\nidentities = [\"edge\"]\nverbs = [\"verify\"]\nsecrets = [\"edge/*\"]\n",
    );
    std::fs::write(&policy, text).unwrap();
    s.restart();
    let admin = s.client("admin").await;
    let edge = Client::connect(s.client_config(&s.issue_dev_cert("edge", None)))
        .await
        .unwrap();

    let mut r = issue_req("edge/main");
    r.environment = "prod".into();
    r.owner = "team-orders".into();
    r.scopes = vec!["orders:read".into(), "orders:list".into()];
    r.allowed_cidrs = vec!["10.0.0.0/8".into(), "2001:db8::/32".into()];
    let key = issue(&admin, r).await;
    let good = |key: &str| pb::VerifyKeyRequest {
        required_scopes: vec!["orders:read".into()],
        client_ip: "10.1.2.3".into(),
        environment: "prod".into(),
        endpoint: "/orders".into(),
        ..req(key)
    };

    // VALID, with the key's facts.
    let v = verify(&edge, good(&key)).await;
    assert!(v.valid);
    assert_eq!(v.result(), pb::VerifyResult::Valid);
    assert_eq!(
        (
            v.name.as_str(),
            v.version,
            v.owner.as_str(),
            v.environment.as_str()
        ),
        ("edge/main", 1, "team-orders", "prod")
    );
    assert_eq!(v.scopes, vec!["orders:read", "orders:list"]);
    assert_eq!(v.key_id.len(), 16);
    assert!(v.grace_until.is_none() && v.expire_time.is_none());
    let v6 = pb::VerifyKeyRequest {
        client_ip: "2001:db8::7".into(),
        ..good(&key)
    };
    assert_eq!(result(&edge, v6).await, pb::VerifyResult::Valid);

    // MALFORMED: empty, truncated, over-long, non-ASCII, checksum-broken, padded.
    let mut broken = key.clone();
    let i = broken.len() - 20;
    let c = if &broken[i..=i] == "A" { "B" } else { "A" };
    broken.replace_range(i..=i, c);
    let malformed = [
        String::new(),
        key[..key.len() - 1].to_owned(),
        format!("{key}{}", "A".repeat(300)),
        key.replacen('_', "é", 1),
        broken,
        format!(" {key}"),
    ];
    for m in &malformed {
        let v = verify(&edge, good(m)).await;
        assert_eq!(v.result(), pb::VerifyResult::Malformed, "{} bytes", m.len());
        assert!(v.name.is_empty() && v.key_id.is_empty());
    }

    // NOT_FOUND: an unknown well-formed key, and a real key the caller may not verify.
    let unknown = ApiKey::generate("ward", "prod").unwrap();
    assert_eq!(
        result(&edge, good(unknown.expose())).await,
        pb::VerifyResult::NotFound
    );
    let other = issue(&admin, issue_req("other/key")).await;
    let v = verify(&edge, req(&other)).await;
    assert_eq!(v.result(), pb::VerifyResult::NotFound);
    assert!(v.name.is_empty(), "no existence leak: {v:?}");
    assert_eq!(result(&admin, req(&other)).await, pb::VerifyResult::Valid);

    // Checks after the lookup, each on its own.
    let wrong_env = pb::VerifyKeyRequest {
        environment: "dev".into(),
        ..good(&key)
    };
    assert_eq!(
        result(&edge, wrong_env).await,
        pb::VerifyResult::WrongEnvironment
    );
    for ip in ["11.0.0.1", "2001:db9::1", ""] {
        let r = pb::VerifyKeyRequest {
            client_ip: ip.into(),
            ..good(&key)
        };
        assert_eq!(
            result(&edge, r).await,
            pb::VerifyResult::ForbiddenIp,
            "{ip}"
        );
    }
    let scope = pb::VerifyKeyRequest {
        required_scopes: vec!["orders:write".into()],
        ..good(&key)
    };
    assert_eq!(
        result(&edge, scope).await,
        pb::VerifyResult::InsufficientScope
    );

    // EXPIRED: expire the key now (UpdateKeyPolicy); expiry is judged before environment.
    let exp = issue(&admin, issue_req("edge/expiring")).await;
    assert_eq!(result(&edge, req(&exp)).await, pb::VerifyResult::Valid);
    admin
        .update_key_policy(expire_now("edge/expiring"))
        .await
        .unwrap();
    let v = verify(
        &edge,
        pb::VerifyKeyRequest {
            environment: "prod".into(),
            ..req(&exp)
        },
    )
    .await;
    assert_eq!(v.result(), pb::VerifyResult::Expired);
    assert!(v.expire_time.is_some());

    // RATE_LIMITED: one per minute.
    let mut r = issue_req("edge/rate");
    r.rate_limit = Some(pb::RateLimit {
        requests: 1,
        period: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        burst: 1,
    });
    let rl = issue(&admin, r).await;
    let v = verify(&edge, req(&rl)).await;
    assert!(v.valid);
    let state = v.rate_limit.unwrap();
    assert_eq!((state.limit, state.remaining), (1, 0));
    let v = verify(&edge, req(&rl)).await;
    assert_eq!(v.result(), pb::VerifyResult::RateLimited);
    let wait = v.retry_after.unwrap();
    assert!((55..=60).contains(&wait.seconds), "{wait:?}");

    // QUOTA_EXCEEDED: two units; a cost-2 call spends them.
    let mut r = issue_req("edge/quota");
    r.quota = Some(pb::Quota {
        limit: 2,
        ..Default::default()
    });
    let q = issue(&admin, r).await;
    let v = verify(
        &edge,
        pb::VerifyKeyRequest {
            cost: Some(2),
            ..req(&q)
        },
    )
    .await;
    assert_eq!(
        (v.result(), v.quota_remaining),
        (pb::VerifyResult::Valid, Some(0))
    );
    let v = verify(&edge, req(&q)).await;
    assert_eq!(
        (v.result(), v.quota_remaining),
        (pb::VerifyResult::QuotaExceeded, Some(0))
    );
    assert!(v.retry_after.is_none(), "no refill configured");
    // A zero-cost check of a spent key is still VALID (nothing is charged).
    let check = pb::VerifyKeyRequest {
        cost: Some(0),
        ..req(&q)
    };
    assert_eq!(result(&edge, check).await, pb::VerifyResult::Valid);

    // The caller's own faults are errors.
    for bad in [
        pb::VerifyKeyRequest {
            client_ip: "300.1.1.1".into(),
            ..req(&key)
        },
        pb::VerifyKeyRequest {
            client_ip: "10.0.0.1:443".into(),
            ..req(&key)
        },
        pb::VerifyKeyRequest {
            required_scopes: vec!["Orders Read".into()],
            ..req(&key)
        },
        pb::VerifyKeyRequest {
            cost: Some(10_000_000),
            ..req(&key)
        },
        pb::VerifyKeyRequest {
            environment: "mars".into(),
            ..req(&key)
        },
    ] {
        assert_eq!(
            code_of(edge.verify_key(bad.clone()).await),
            Code::InvalidArgument,
            "{:?}",
            (
                bad.client_ip,
                bad.required_scopes,
                bad.cost,
                bad.environment
            )
        );
    }
    // A caller with no verify grant at all: PERMISSION_DENIED.
    let stranger = Client::connect(s.client_config(&s.issue_dev_cert("stranger", None)))
        .await
        .unwrap();
    assert_eq!(
        code_of(stranger.verify_key(req(&key)).await),
        Code::PermissionDenied
    );

    // Bad key policies are refused at IssueKey.
    let period = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
    let bad_issues: Vec<(&str, pb::IssueKeyRequest)> = vec![
        (
            "host bits in CIDR",
            pb::IssueKeyRequest {
                allowed_cidrs: vec!["10.0.0.1/8".into()],
                ..issue_req("bad/1")
            },
        ),
        (
            "malformed CIDR",
            pb::IssueKeyRequest {
                allowed_cidrs: vec!["10.0.0.0/33".into()],
                ..issue_req("bad/2")
            },
        ),
        (
            "scope characters",
            pb::IssueKeyRequest {
                scopes: vec!["Orders".into()],
                ..issue_req("bad/3")
            },
        ),
        (
            "zero rate",
            pb::IssueKeyRequest {
                rate_limit: Some(pb::RateLimit {
                    requests: 0,
                    period: period(1),
                    burst: 0,
                }),
                ..issue_req("bad/4")
            },
        ),
        (
            "absurd rate",
            pb::IssueKeyRequest {
                rate_limit: Some(pb::RateLimit {
                    requests: 10_000_000,
                    period: period(1),
                    burst: 0,
                }),
                ..issue_req("bad/5")
            },
        ),
        (
            "rate without period",
            pb::IssueKeyRequest {
                rate_limit: Some(pb::RateLimit {
                    requests: 10,
                    period: None,
                    burst: 0,
                }),
                ..issue_req("bad/6")
            },
        ),
        (
            "refill without period",
            pb::IssueKeyRequest {
                quota: Some(pb::Quota {
                    limit: 10,
                    refill: 5,
                    refill_period: None,
                }),
                ..issue_req("bad/7")
            },
        ),
        (
            "expiry in the past",
            pb::IssueKeyRequest {
                expiration: Some(pb::issue_key_request::Expiration::ExpireTime(now_ts(-10))),
                ..issue_req("bad/8")
            },
        ),
    ];
    for (what, r) in bad_issues {
        assert_eq!(
            code_of(admin.issue_key(r).await),
            Code::InvalidArgument,
            "{what}"
        );
    }
    let mut bad_mask = expire_now("edge/main");
    bad_mask.update_mask = Some(prost_types::FieldMask {
        paths: vec!["owner".into()],
    });
    assert_eq!(
        code_of(admin.update_key_policy(bad_mask).await),
        Code::InvalidArgument
    );
    // Only API keys have a policy; the app identity may not change one.
    let mut r = expire_now("edge/main");
    r.name = "nope/missing".into();
    assert_eq!(code_of(admin.update_key_policy(r).await), Code::NotFound);
    let app = s.client("app").await;
    assert_eq!(
        code_of(app.update_key_policy(expire_now("edge/main")).await),
        Code::PermissionDenied
    );
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_verify_valid_and_malformed() {
    let s = TestServer::start();
    let admin = s.client("admin").await;
    let key = issue(&admin, issue_req("g/key")).await;

    let o = s.grpcurl_as(
        "app",
        &["-d", &format!(r#"{{"api_key":"{key}","endpoint":"/x"}}"#)],
        &["ward.v1.Keys/VerifyKey"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["result"], "VERIFY_RESULT_VALID");
    assert_eq!(v["name"], "g/key");

    let o = s.grpcurl_as(
        "app",
        &["-d", r#"{"api_key":"ward_dev_not-a-key"}"#],
        &["ward.v1.Keys/VerifyKey"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["result"], "VERIFY_RESULT_MALFORMED", "{v}");
    assert!(v.get("valid").is_none() || v["valid"] == false);

    let listed = stdout(&s.grpcurl(&[], &["describe", "ward.v1.Keys"]));
    for m in ["VerifyKey", "UpdateKeyPolicy", "GetKeyUsage"] {
        assert!(listed.contains(m), "{m} not described:\n{listed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_retry_after_admits_again() {
    let s = TestServer::start();
    let admin = s.client("admin").await;
    let mut r = issue_req("rl/key");
    // 5 per second, burst 2: one more every 200 ms once the burst is spent.
    r.rate_limit = Some(pb::RateLimit {
        requests: 5,
        period: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        burst: 2,
    });
    let key = issue(&admin, r).await;
    for _ in 0..2 {
        assert_eq!(result(&admin, req(&key)).await, pb::VerifyResult::Valid);
    }
    let v = verify(&admin, req(&key)).await;
    assert_eq!(v.result(), pb::VerifyResult::RateLimited);
    let state = v.rate_limit.unwrap();
    assert_eq!((state.limit, state.remaining), (2, 0));
    let wait = v.retry_after.unwrap();
    let wait = Duration::new(wait.seconds as u64, wait.nanos as u32);
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(200),
        "{wait:?}"
    );
    tokio::time::sleep(wait).await;
    let v = verify(&admin, req(&key)).await;
    assert_eq!(v.result(), pb::VerifyResult::Valid, "{v:?}");
}

/// Runs `workers` concurrent verifiers, each making `each` charged calls; returns how many
/// were VALID (every other answer must be QUOTA_EXCEEDED).
async fn hammer(c: &Client, key: &str, workers: usize, each: usize) -> usize {
    let key: Arc<str> = key.into();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (c, key) = (c.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut valid = 0;
            for _ in 0..each {
                let v = c.verify_key(req(&key)).await.expect("verify");
                match v.result() {
                    pb::VerifyResult::Valid => valid += 1,
                    pb::VerifyResult::QuotaExceeded => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            valid
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

/// Charges `key` from eight verifiers on raw clients (no retries) until `kill_after` VALID
/// answers came back, then SIGKILLs the server with charges in flight. Returns the VALID
/// answers received and how many calls may have been cut off by the kill (at least every call
/// in flight when it landed). Any error before the kill fails the test.
async fn charge_until_killed(s: &mut TestServer, key: &str, kill_after: u64) -> (u64, u64) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    let (valid, in_flight) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let killing = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let mut k = s.keys_client("admin").await;
        let (valid, in_flight, killing) = (valid.clone(), in_flight.clone(), killing.clone());
        let key = key.to_owned();
        workers.push(tokio::spawn(async move {
            loop {
                // Counted in flight before looking at the flag: a call that starts after the
                // main task read the count cannot exist (sequentially consistent order).
                in_flight.fetch_add(1, SeqCst);
                if killing.load(SeqCst) {
                    return;
                }
                let r = k.verify_key(req(&key)).await;
                match r.map(|r| r.into_inner().result()) {
                    Ok(pb::VerifyResult::Valid) => valid.fetch_add(1, SeqCst),
                    Ok(other) => panic!("unexpected {other:?} before the quota is spent"),
                    Err(st) => {
                        assert!(
                            killing.load(SeqCst),
                            "a charge failed before the kill: {:?}: {}",
                            st.code(),
                            st.message()
                        );
                        return;
                    }
                };
                in_flight.fetch_sub(1, SeqCst);
            }
        }));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while valid.load(SeqCst) < kill_after {
        assert!(std::time::Instant::now() < deadline, "too few charges");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    killing.store(true, SeqCst);
    let cut_off = in_flight.load(SeqCst);
    s.kill9();
    for w in workers {
        w.await.unwrap();
    }
    (valid.load(SeqCst), cut_off)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_admits_exactly_its_limit_under_concurrency_and_across_kill_9() {
    const LIMIT: u64 = 1000;
    let mut s = TestServer::start();
    let admin = s.client("admin").await;
    let mut r = issue_req("quota/key");
    r.quota = Some(pb::Quota {
        limit: LIMIT,
        ..Default::default()
    });
    let key = issue(&admin, r).await;
    let check = pb::VerifyKeyRequest {
        cost: Some(0),
        ..req(&key)
    };

    // 16 verifiers, 640 attempts: every one admitted.
    assert_eq!(hammer(&admin, &key, 16, 40).await, 640);
    drop(admin);
    let (mut seen, mut cut_off) = (640, 0);
    // Three crashes with charges in flight: every charge a client saw admitted is on disk
    // after the restart, and the ledger holds no more than that plus the calls the kill cut
    // off (their replies were lost, so they may or may not have been charged).
    for round in 0..3 {
        let (valid, in_flight) = charge_until_killed(&mut s, &key, 30).await;
        assert!(
            in_flight > 0,
            "round {round}: no charge in flight at the kill"
        );
        seen += valid;
        cut_off += in_flight;
        s.restart();
        let admin = s.client("admin").await;
        let left = verify(&admin, check.clone()).await.quota_remaining.unwrap();
        let charged = LIMIT - left;
        assert!(
            seen <= charged && charged <= seen + cut_off,
            "round {round}: {charged} charged, {seen} VALID answers seen, {cut_off} cut off"
        );
    }

    // What is left is admitted exactly, and never more than the limit in all.
    let admin = s.client("admin").await;
    let left = verify(&admin, check.clone()).await.quota_remaining.unwrap();
    let each = (left as usize).div_ceil(16) + 10;
    assert_eq!(hammer(&admin, &key, 16, each).await as u64, left);
    seen += left;
    assert!(
        seen <= LIMIT && seen + cut_off >= LIMIT,
        "{seen} VALID answers seen with a limit of {LIMIT} ({cut_off} cut off by kills)"
    );
    let v = verify(&admin, check).await;
    assert_eq!(v.quota_remaining, Some(0));
    let usage = admin.get_key_usage("quota/key", 0).await.unwrap();
    assert_eq!(usage.quota_remaining, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counters_and_the_stale_key_report() {
    let mut s = TestServer::start();
    let admin = s.client("admin").await;
    let mut r = issue_req("use/busy");
    r.scopes = vec!["a".into()];
    let busy = issue(&admin, r).await;
    issue(&admin, issue_req("use/idle")).await;
    admin
        .put_secret(pb::PutSecretRequest {
            name: "use/static".into(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    let call = |endpoint: &str, scope: &str| pb::VerifyKeyRequest {
        endpoint: endpoint.into(),
        client_ip: "10.0.0.7".into(),
        required_scopes: vec![scope.into()],
        ..req(&busy)
    };
    assert_eq!(
        result(&admin, call("/orders", "a")).await,
        pb::VerifyResult::Valid
    );
    assert_eq!(
        result(&admin, call("/orders", "a")).await,
        pb::VerifyResult::Valid
    );
    assert_eq!(
        result(&admin, call("/refunds", "b")).await,
        pb::VerifyResult::InsufficientScope
    );
    let check = pb::VerifyKeyRequest {
        cost: Some(0),
        ..req(&busy)
    };
    assert_eq!(result(&admin, check).await, pb::VerifyResult::Valid);

    let assert_usage = |u: &pb::GetKeyUsageResponse| {
        assert_eq!(u.versions.len(), 1);
        let v = &u.versions[0];
        assert_eq!((v.version, v.total), (1, 4));
        let counts: Vec<(pb::VerifyResult, u64)> =
            v.results.iter().map(|r| (r.result(), r.count)).collect();
        assert_eq!(
            counts,
            vec![
                (pb::VerifyResult::Valid, 3),
                (pb::VerifyResult::InsufficientScope, 1)
            ]
        );
        let endpoints: Vec<(&str, u64)> = v
            .endpoints
            .iter()
            .map(|e| (e.endpoint.as_str(), e.count))
            .collect();
        assert_eq!(endpoints, vec![("", 1), ("/orders", 2), ("/refunds", 1)]);
        assert_eq!(v.last_client_ip, "10.0.0.7");
        assert!(v.last_used_time.is_some() && u.last_used_time.is_some());
    };
    assert_usage(&admin.get_key_usage("use/busy", 0).await.unwrap());
    let idle = admin.get_key_usage("use/idle", 0).await.unwrap();
    assert!(idle.versions.is_empty() && idle.last_used_time.is_none());
    assert_eq!(
        code_of(admin.get_key_usage("use/static", 0).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code_of(admin.get_key_usage("use/busy", 9).await),
        Code::NotFound
    );

    // Stale report: API keys never used or unused for N days; busy was used just now.
    let stale = admin
        .list_all(pb::ListSecretsRequest {
            name_prefix: "use/".into(),
            unused_keys: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let names: Vec<&str> = stale.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["use/idle"]);
    assert!(stale[0].last_used_time.is_none());
    let m = admin.describe_secret("use/busy").await.unwrap();
    assert!(m.last_used_time.is_some());
    let bad = pb::ListSecretsRequest {
        unused_keys: true,
        unused_days: 100_000,
        ..Default::default()
    };
    assert_eq!(
        code_of(admin.list_secrets(bad).await),
        Code::InvalidArgument
    );

    // wardctl shows the same.
    let o = s.wardctl(&["keys", "stale", "--days", "90", "--prefix", "use/"], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = stdout(&o);
    assert!(out.contains("use/idle") && out.contains("never"), "{out}");
    assert!(!out.contains("use/busy"), "{out}");
    let o = s.wardctl(&["keys", "usage", "use/busy"], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = stdout(&o);
    assert!(
        out.contains("VALID") && out.contains("/orders") && out.contains("10.0.0.7"),
        "{out}"
    );

    // Counters survive a restart (flushed at shutdown).
    drop(admin);
    s.restart();
    let admin = s.client("admin").await;
    assert_usage(&admin.get_key_usage("use/busy", 0).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wardctl_issue_with_policy_verify_and_update() {
    let s = TestServer::start();
    let o = s.wardctl(
        &[
            "issue",
            "cli/key",
            "--scope",
            "s:read",
            "--cidr",
            "127.0.0.0/8",
            "--rate-limit",
            "100/s",
            "--burst",
            "10",
            "--quota",
            "50",
            "--quota-period",
            "1d",
            "--ttl",
            "30d",
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = stdout(&o).trim().to_owned();
    ApiKey::parse(&key).expect("issue prints the key");

    let o = s.wardctl_as(
        "app",
        &["keys", "verify", "--ip", "127.0.0.1", "--scope", "s:read"],
        Some(key.as_bytes()),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = stdout(&o);
    assert!(out.starts_with("VALID"), "{out}");
    assert!(out.contains("quota left   49"), "{out}");
    assert!(!out.contains(&key), "verify output shows the key");
    let o = s.wardctl_as(
        "app",
        &["keys", "verify", "--ip", "10.0.0.1"],
        Some(key.as_bytes()),
    );
    assert_eq!(o.status.code(), Some(3), "{}", stdout(&o));
    assert!(stdout(&o).starts_with("FORBIDDEN_IP"));

    let o = s.wardctl(&["describe", "cli/key"], None);
    let out = stdout(&o);
    for want in [
        "127.0.0.0/8",
        "100/1s burst 10",
        "50 (refilled to 50 every 86400s)",
        "last used",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }

    let o = s.wardctl(
        &["keys", "policy", "cli/key", "--no-cidrs", "--quota", "5"],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = s.wardctl_as(
        "app",
        &["--json", "keys", "verify", "--ip", "10.0.0.1"],
        Some(key.as_bytes()),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["result"], "VALID");
    assert_eq!(
        v["quota_remaining"], 4,
        "a new quota starts at its limit: {v}"
    );
    let o = s.wardctl(&["keys", "policy", "cli/key"], None);
    assert_eq!(
        o.status.code(),
        Some(2),
        "nothing to change is a usage error"
    );
}

/// Issue 11 item 6: a guesser behind a shared NAT (one client IP) spends the unknown-key budget
/// of that IP; the real keys of everyone else behind it must keep verifying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_guard_never_refuses_a_real_key() {
    let mut s = TestServer::start();
    // One unknown key a minute after the burst: at the dev default (600) a token comes back
    // every 100 ms, and a slow machine would let the last guess below through.
    s.edit_config(|c| {
        assert!(c.contains("unknown_keys_per_minute = 600"), "{c}");
        c.replace(
            "unknown_keys_per_minute = 600",
            "unknown_keys_per_minute = 1",
        )
    });
    s.restart();
    let admin = s.client("admin").await;
    let key = issue(&admin, issue_req("nat/real")).await;
    let app = s.client("app").await;
    let from_nat = |k: &str| pb::VerifyKeyRequest {
        client_ip: "198.51.100.7".into(),
        ..req(k)
    };
    // Unknown well-formed keys from the NAT's address until the guard refuses them.
    let mut not_found = 0u32;
    loop {
        let guess = ApiKey::generate("ward", "dev").unwrap();
        let v = verify(&app, from_nat(guess.expose())).await;
        if v.result() == pb::VerifyResult::RateLimited {
            assert!(v.retry_after.is_some(), "{v:?}");
            break;
        }
        assert_eq!(v.result(), pb::VerifyResult::NotFound);
        not_found += 1;
        assert!(not_found <= 1_000, "the guard never engaged");
    }
    // The real key, from the same address, is still VALID (it was RATE_LIMITED) — every time.
    for _ in 0..3 {
        let v = verify(&app, from_nat(&key)).await;
        assert_eq!(v.result(), pb::VerifyResult::Valid, "{v:?}");
        assert_eq!(v.name, "nat/real");
    }
    // Unknown keys from that address stay throttled.
    let guess = ApiKey::generate("ward", "dev").unwrap();
    assert_eq!(
        result(&app, from_nat(guess.expose())).await,
        pb::VerifyResult::RateLimited
    );
}

/// Issue 11 item 10: clearing a quota and setting it again starts a new ledger with the whole
/// new limit (the epoch was recomputed as current + 1 = the old one, so the old, spent ledger
/// was picked up again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_cleared_then_set_again_starts_a_fresh_ledger() {
    let s = TestServer::start();
    let admin = s.client("admin").await;
    let quota = |limit: u64| pb::Quota {
        limit,
        ..Default::default()
    };
    let key = issue(
        &admin,
        pb::IssueKeyRequest {
            quota: Some(quota(3)),
            ..issue_req("quota/epoch")
        },
    )
    .await;
    let set_quota = |q: Option<pb::Quota>| crate::quota_update("quota/epoch", q);
    for left in [2, 1] {
        let v = verify(&admin, req(&key)).await;
        assert_eq!(
            (v.result(), v.quota_remaining),
            (pb::VerifyResult::Valid, Some(left))
        );
    }
    // Cleared: unlimited, no balance reported.
    admin.update_key_policy(set_quota(None)).await.unwrap();
    let v = verify(&admin, req(&key)).await;
    assert_eq!(
        (v.result(), v.quota_remaining),
        (pb::VerifyResult::Valid, None)
    );
    // Set again, to the same limit: the whole limit is there, and exactly that.
    admin
        .update_key_policy(set_quota(Some(quota(3))))
        .await
        .unwrap();
    let usage = admin.get_key_usage("quota/epoch", 0).await.unwrap();
    assert_eq!(usage.quota_remaining, Some(3), "{usage:?}");
    for left in [2, 1, 0] {
        let v = verify(&admin, req(&key)).await;
        assert_eq!(
            (v.result(), v.quota_remaining),
            (pb::VerifyResult::Valid, Some(left))
        );
    }
    assert_eq!(
        result(&admin, req(&key)).await,
        pb::VerifyResult::QuotaExceeded
    );
    // Cleared and set again once more, across a restart: a fresh ledger again.
    admin.update_key_policy(set_quota(None)).await.unwrap();
    admin
        .update_key_policy(set_quota(Some(quota(2))))
        .await
        .unwrap();
    drop(admin);
    let mut s = s;
    s.restart();
    let admin = s.client("admin").await;
    for left in [1, 0] {
        let v = verify(&admin, req(&key)).await;
        assert_eq!(
            (v.result(), v.quota_remaining),
            (pb::VerifyResult::Valid, Some(left))
        );
    }
    assert_eq!(
        result(&admin, req(&key)).await,
        pb::VerifyResult::QuotaExceeded
    );
}
