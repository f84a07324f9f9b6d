//! Policy parsing (`policy.rs`) and key-policy parsing (`keypolicy.rs`). The input is fields
//! split at 0x00: policy TOML, identity, verb, secret name, environment, CIDR. A policy either
//! parses or is refused; a parsed one answers consistently (a grant in one environment is a
//! grant "in some environment"; a grant everywhere is a grant here; any grant means the
//! identity holds the verb at all; admin and audit hold in every environment or nowhere), and
//! its glob agrees with a plain dynamic-programming model.
//! A parsed CIDR prints in a form that parses back to itself and contains its own network.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;
use ward_fuzz::{checked, fields, join, write_seeds};
use ward_server::model::keypolicy::{canonical, parse_client_ip, Cidr};
use ward_server::policy::{glob, Policy, Verb};

fuzz_target!(
    init: {
        write_seeds(seeds());
    },
    |data: &[u8]| {
        let f = fields(data, 6);
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let (toml, identity, name, env, cidr) = (text(f[0]), text(f[1]), text(f[3]), text(f[4]), text(f[5]));
        let verb = Verb::ALL[f[2].first().map_or(0, |b| usize::from(*b)) % Verb::ALL.len()];

        if let Ok(policy) = Policy::parse(&toml) {
            let here = policy.allows(&identity, verb, &name, Some(&env));
            let somewhere = policy.allows(&identity, verb, &name, None);
            assert!(!here || somewhere, "granted in {env:?} but not in some environment");
            assert!(!somewhere || policy.grants_any(&identity, verb));
            if policy.grants_everywhere(&identity, verb) {
                assert!(here, "granted everywhere but not on {name:?} in {env:?}");
            }
            // Told NOT_FOUND only if granted whatever the environment.
            if policy.allows_in_every_environment(&identity, verb, &name) {
                assert!(here, "granted in every environment but not in {env:?}");
            }
            // Vault-wide verbs hold in every environment or nowhere.
            if Verb::VAULT_WIDE.contains(&verb) && somewhere {
                assert!(policy.allows_in_every_environment(&identity, verb, &name));
            }
        }

        // The identity field doubles as a glob pattern over the name.
        if identity.chars().count() <= 64 && name.chars().count() <= 64 {
            let (p, t): (Vec<char>, Vec<char>) = (identity.chars().collect(), name.chars().collect());
            assert_eq!(glob(&identity, &name), glob_model(&p, &t), "{identity:?} {name:?}");
        }

        if let Some(c) = checked(Cidr::parse(&cidr)) {
            let shown = c.to_string();
            assert_eq!(Cidr::parse(&shown).ok(), Some(c), "{cidr:?} shown as {shown:?}");
            let network: IpAddr = shown
                .split_once('/')
                .and_then(|(a, _)| a.parse().ok())
                .expect("a shown CIDR has an address");
            assert!(c.contains(network));
            if let Some(Some(ip)) = checked(parse_client_ip(&env)) {
                assert_eq!(c.contains(ip), c.contains(canonical(ip)));
            }
        }
    }
);

/// `*` any run, `?` any one character, everything else itself: textbook dynamic programming,
/// written apart from `policy::glob`'s backtracking matcher.
fn glob_model(p: &[char], t: &[char]) -> bool {
    // m[i][j]: p[i..] matches t[j..].
    let mut m = vec![vec![false; t.len() + 1]; p.len() + 1];
    m[p.len()][t.len()] = true;
    for i in (0..p.len()).rev() {
        for j in (0..=t.len()).rev() {
            m[i][j] = match p[i] {
                '*' => m[i + 1][j] || (j < t.len() && m[i][j + 1]),
                '?' => j < t.len() && m[i + 1][j + 1],
                c => j < t.len() && t[j] == c && m[i + 1][j + 1],
            };
        }
    }
    m[0][0]
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let policy = br#"
[[rule]]
identities = ["spiffe://prod/payments/*"]
verbs = ["read", "list"]
secrets = ["payments/*"]
environments = ["prod"]

[[rule]]
identities = ["admin"]
verbs = ["*"]
secrets = ["*"]
"#;
    vec![
        (
            "grant".into(),
            join(&[
                policy,
                b"spiffe://prod/payments/api",
                &[10],
                b"payments/db",
                b"prod",
                b"10.0.0.0/8",
            ]),
        ),
        (
            "admin".into(),
            join(&[policy, b"admin", &[9], b"x/y", b"dev", b"2001:db8::/32"]),
        ),
        (
            "mapped".into(),
            join(&[
                b"rule = []",
                b"p?y*",
                &[3],
                b"pay/x",
                b"::ffff:10.1.2.3",
                b"10.1.2.3",
            ]),
        ),
    ]
}
