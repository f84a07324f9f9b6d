//! The plain-HTTP listener: `/healthz`, and `/metrics` in the Prometheus text format counting
//! what the test did — without a secret or key in any label. Also the brute-force guard: a
//! caller presenting too many unknown keys is refused before lookup, and it shows.

use std::collections::{HashMap, HashSet};

use ward::keyformat::ApiKey;
use ward_tests::{pb, TestServer};

/// Parses the text exposition format strictly enough to catch malformed output: every sample
/// belongs to a family declared by `# TYPE`, names and labels are well-formed, values are
/// numbers. Returns `name{labels}` → value.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    let is_name = |s: &str| {
        !s.is_empty()
            && s.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, tail) = (parts.next().unwrap(), parts.next().unwrap(), parts.next());
            assert!(is_name(name), "bad family name in {line:?}");
            if kind == "TYPE" {
                let t = tail.unwrap();
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                    "{line:?}"
                );
                assert!(
                    types.insert(name.to_owned(), t.to_owned()).is_none(),
                    "TYPE twice: {line:?}"
                );
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let name = series.split('{').next().unwrap();
        assert!(is_name(name), "bad metric name in {line:?}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .expect(line);
            for pair in inner.split("\",") {
                let (k, v) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad label in {line:?}"));
                assert!(is_name(k), "bad label name in {line:?}");
                assert!(
                    !v.trim_end_matches('"').contains('"') || v.contains("\\\""),
                    "{line:?}"
                );
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample of undeclared family: {line:?}"
        );
        samples.insert(series.to_owned(), value);
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_what_happened() {
    let s = TestServer::start();
    assert_eq!(s.http_get("/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(s.http_get("/nope").0, 404);
    let admin = s.client("admin").await;
    let key = admin
        .issue_key(pb::IssueKeyRequest {
            name: "m/key".into(),
            quota: Some(pb::Quota {
                limit: 3,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .api_key;
    let verify = |k: String| {
        let admin = admin.clone();
        async move {
            admin
                .verify_key(pb::VerifyKeyRequest {
                    api_key: k,
                    ..Default::default()
                })
                .await
                .unwrap()
                .result()
        }
    };
    for _ in 0..3 {
        assert_eq!(verify(key.clone()).await, pb::VerifyResult::Valid);
    }
    assert_eq!(verify(key.clone()).await, pb::VerifyResult::QuotaExceeded);
    assert_eq!(verify("junk".into()).await, pb::VerifyResult::Malformed);

    // Brute force as app: about 100 unknown keys (the dev budget, refilling at 10/s), then
    // refused before lookup.
    let app = s.client("app").await;
    let mut unknown = Vec::new();
    let mut not_found = 0u32;
    loop {
        let guess = ApiKey::generate("ward", "dev").unwrap().expose().to_owned();
        unknown.push(guess.clone());
        let v = app
            .verify_key(pb::VerifyKeyRequest {
                api_key: guess,
                ..Default::default()
            })
            .await
            .unwrap();
        if v.result() == pb::VerifyResult::RateLimited {
            assert!(v.retry_after.is_some());
            break;
        }
        assert_eq!(v.result(), pb::VerifyResult::NotFound);
        not_found += 1;
        assert!(not_found <= 150, "never locked out");
    }
    assert!(not_found >= 100, "locked out after {not_found}");
    // Further unknown keys are refused; the real key never is (issue 11 item 6).
    let v = app
        .verify_key(pb::VerifyKeyRequest {
            api_key: ApiKey::generate("ward", "dev").unwrap().expose().to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(v.result(), pb::VerifyResult::RateLimited);
    let v = app
        .verify_key(pb::VerifyKeyRequest {
            api_key: key.clone(),
            cost: Some(0),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(v.result(), pb::VerifyResult::Valid);

    let (status, text) = s.http_get("/metrics");
    assert_eq!(status, 200);
    let m = parse_prometheus(&text);
    let get = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("{k} missing:\n{text}"))
    };
    assert_eq!(get("ward_key_verifications_total{result=\"VALID\"}"), 4.0);
    assert_eq!(
        get("ward_key_verifications_total{result=\"QUOTA_EXCEEDED\"}"),
        1.0
    );
    assert_eq!(
        get("ward_key_verifications_total{result=\"MALFORMED\"}"),
        1.0
    );
    let n = f64::from(not_found);
    assert_eq!(get("ward_key_verifications_total{result=\"NOT_FOUND\"}"), n);
    assert_eq!(
        get("ward_key_verifications_total{result=\"RATE_LIMITED\"}"),
        2.0
    );
    assert_eq!(get("ward_quota_rejections_total"), 1.0);
    assert_eq!(get("ward_unknown_key_lockouts_total"), 2.0);
    assert_eq!(get("ward_unknown_keys_total{identity=\"app\"}"), n);
    assert_eq!(
        get("ward_rpc_duration_seconds_count{method=\"ward.v1.Keys/VerifyKey\",code=\"OK\"}"),
        n + 8.0
    );
    assert_eq!(
        get("ward_rpc_duration_seconds_count{method=\"ward.v1.Secrets/IssueKey\",code=\"OK\"}"),
        1.0
    );
    assert_eq!(
        get("ward_secret_versions{kind=\"API_KEY\",state=\"PRIMARY\"}"),
        1.0
    );
    assert_eq!(get("ward_indexed_keys"), 1.0);
    assert!(get("ward_audit_write_duration_seconds_count") >= n + 7.0);
    assert!(get("ward_hsm_call_duration_seconds_count{op=\"unwrap\"}") >= 1.0);

    // A call the server does not serve is counted under a bounded label.
    let mut raw = s.raw_client("admin").await;
    let _ = raw
        .describe_secret(pb::DescribeSecretRequest {
            name: "BAD NAME".into(),
        })
        .await;
    let m = parse_prometheus(&s.http_get("/metrics").1);
    assert_eq!(
        m["ward_rpc_duration_seconds_count{method=\"ward.v1.Secrets/DescribeSecret\",code=\"INVALID_ARGUMENT\"}"],
        1.0
    );

    // No key, in full or in part, anywhere in the text.
    let labels: HashSet<&str> = text.lines().collect();
    for k in unknown.iter().chain([&key]) {
        let body = &k[k.len() - 38..];
        assert!(
            !labels.iter().any(|l| l.contains(body)),
            "a key reached /metrics"
        );
    }
}
