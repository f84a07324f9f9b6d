//! ListSecrets: name order, page sizes, every secret exactly once, filters.

use std::collections::{BTreeSet, HashMap};

use ward_tests::{ok, pb, TestServer};

use crate::{labels, list_pages, put_req};

const COUNT: usize = 250;

struct Spec {
    name: String,
    env: &'static str,
    owner: &'static str,
    tier: String,
}

fn specs() -> Vec<Spec> {
    (0..COUNT)
        .map(|i| Spec {
            name: format!("{}/svc-{i:03}", ["alpha", "beta", "gamma"][i % 3]),
            env: match i % 5 {
                0 => "prod",
                1 => "staging",
                _ => "dev",
            },
            owner: if i % 2 == 0 { "team-even" } else { "team-odd" },
            tier: (i % 4).to_string(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_returns_every_secret_once_and_filters() {
    let s = TestServer::start();
    let c = s.raw_client("admin").await;
    let specs = specs();

    // Create them with 16 concurrent writers (the server group-commits their flushes).
    let mut tasks = Vec::new();
    for chunk in specs.chunks(COUNT.div_ceil(16)) {
        let mut c = c.clone();
        let reqs: Vec<pb::PutSecretRequest> = chunk
            .iter()
            .map(|sp| pb::PutSecretRequest {
                environment: sp.env.into(),
                owner: sp.owner.into(),
                labels: labels(&[("tier", &sp.tier), ("all", "yes")]),
                ..put_req(&sp.name, sp.name.as_bytes())
            })
            .collect();
        tasks.push(tokio::spawn(async move {
            for r in reqs {
                let name = r.name.clone();
                ok(c.put_secret(r).await, &format!("put {name}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = c;

    let mut expected: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    expected.sort();

    for size in [1u32, 7, 100, 0, 249, 250, 251, 1000] {
        let got = list_pages(
            &mut c,
            pb::ListSecretsRequest {
                page_size: size,
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("page_size {size}: {e:?}"));
        let names: Vec<String> = got.iter().map(|m| m.name.clone()).collect();
        let unique: BTreeSet<&String> = names.iter().collect();
        assert_eq!(
            unique.len(),
            names.len(),
            "page_size {size}: a secret listed twice"
        );
        assert_eq!(
            names, expected,
            "page_size {size}: every secret once, in name order"
        );
        assert!(
            got.iter().all(|m| m.versions.is_empty()),
            "ListSecrets must leave versions empty"
        );
    }

    // Listed metadata matches what was stored.
    let all = list_pages(&mut c, pb::ListSecretsRequest::default())
        .await
        .unwrap();
    let by_name: HashMap<&str, &pb::SecretMetadata> =
        all.iter().map(|m| (m.name.as_str(), m)).collect();
    for sp in &specs {
        let m = by_name[sp.name.as_str()];
        assert_eq!(m.environment, sp.env, "{}", sp.name);
        assert_eq!(m.owner, sp.owner, "{}", sp.name);
        assert_eq!(m.labels.get("tier"), Some(&sp.tier), "{}", sp.name);
        assert_eq!(m.primary_version, 1, "{}", sp.name);
        assert_eq!(m.kind(), pb::SecretKind::Static);
    }

    // Filters, alone and combined, each walked with a small page size.
    type Pred = Box<dyn Fn(&Spec) -> bool>;
    let cases: Vec<(pb::ListSecretsRequest, Pred)> = vec![
        (
            pb::ListSecretsRequest {
                name_prefix: "beta/".into(),
                ..Default::default()
            },
            Box::new(|s| s.name.starts_with("beta/")),
        ),
        (
            pb::ListSecretsRequest {
                name_prefix: "gamma/svc-1".into(),
                ..Default::default()
            },
            Box::new(|s| s.name.starts_with("gamma/svc-1")),
        ),
        (
            pb::ListSecretsRequest {
                environment: "prod".into(),
                ..Default::default()
            },
            Box::new(|s| s.env == "prod"),
        ),
        (
            pb::ListSecretsRequest {
                environment: "staging".into(),
                ..Default::default()
            },
            Box::new(|s| s.env == "staging"),
        ),
        (
            pb::ListSecretsRequest {
                owner: "team-odd".into(),
                ..Default::default()
            },
            Box::new(|s| s.owner == "team-odd"),
        ),
        (
            pb::ListSecretsRequest {
                labels: labels(&[("tier", "2")]),
                ..Default::default()
            },
            Box::new(|s| s.tier == "2"),
        ),
        (
            pb::ListSecretsRequest {
                labels: labels(&[("tier", "3"), ("all", "yes")]),
                ..Default::default()
            },
            Box::new(|s| s.tier == "3"),
        ),
        (
            pb::ListSecretsRequest {
                labels: labels(&[("tier", "3"), ("all", "no")]),
                ..Default::default()
            },
            Box::new(|_| false),
        ),
        (
            pb::ListSecretsRequest {
                labels: labels(&[("missing", "x")]),
                ..Default::default()
            },
            Box::new(|_| false),
        ),
        (
            pb::ListSecretsRequest {
                name_prefix: "alpha/".into(),
                environment: "dev".into(),
                owner: "team-even".into(),
                labels: labels(&[("tier", "0")]),
                ..Default::default()
            },
            Box::new(|s| {
                s.name.starts_with("alpha/")
                    && s.env == "dev"
                    && s.owner == "team-even"
                    && s.tier == "0"
            }),
        ),
        (
            pb::ListSecretsRequest {
                name_prefix: "nothing/".into(),
                ..Default::default()
            },
            Box::new(|_| false),
        ),
    ];
    for (req, pred) in cases {
        let mut want: Vec<String> = specs
            .iter()
            .filter(|s| pred(s))
            .map(|s| s.name.clone())
            .collect();
        want.sort();
        for size in [7u32, 1000] {
            let got: Vec<String> = list_pages(
                &mut c,
                pb::ListSecretsRequest {
                    page_size: size,
                    ..req.clone()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{req:?}: {e:?}"))
            .into_iter()
            .map(|m| m.name)
            .collect();
            assert_eq!(got, want, "filter {req:?}, page_size {size}");
        }
    }

    // An empty result is one page with an empty token.
    let empty = ok(
        c.list_secrets(pb::ListSecretsRequest {
            name_prefix: "zzz/".into(),
            ..Default::default()
        })
        .await,
        "empty list",
    );
    assert!(empty.secrets.is_empty() && empty.next_page_token.is_empty());
}
