//! Authorization: a TOML policy file whose rules grant verbs on secret-name globs (optionally
//! per environment) to identity globs. Anything no rule grants is denied.
//!
//! ```toml
//! [[rule]]
//! identities = ["spiffe://prod/payments/*"]
//! verbs = ["read"]
//! secrets = ["payments/*"]
//! environments = ["prod"]      # optional; default: every environment
//! ```
//!
//! Globs: `*` matches any run of characters (including `/`), `?` any one character.
//!
//! `admin` and `audit` are vault-wide: a backup, a master-key rotation or the audit log covers
//! every environment, so no environment list can narrow them. A rule that lists environments
//! may not name them (the loader refuses it), and `*` in such a rule means every other verb.
//! Without this, `verbs = ["*"], environments = ["dev"]` granted backups of prod.

use serde::Deserialize;
use std::path::Path;

/// What a caller may do. Each RPC needs one verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Verb {
    /// Fetch values.
    Read,
    /// Store caller-supplied values.
    Write,
    /// Generate API keys.
    Issue,
    /// Rotate.
    Rotate,
    /// Revoke.
    Revoke,
    /// Destroy versions.
    Destroy,
    /// See metadata.
    List,
    /// Verify presented API keys.
    Verify,
    /// Read the audit log.
    Audit,
    /// Administer the vault (keyring, master key, backups).
    Admin,
}

impl Verb {
    /// Verbs that act on the whole vault, whatever the environment: never granted by a rule
    /// that lists environments.
    pub const VAULT_WIDE: [Verb; 2] = [Verb::Audit, Verb::Admin];

    /// Every verb.
    pub const ALL: [Verb; 10] = [
        Verb::Read,
        Verb::Write,
        Verb::Issue,
        Verb::Rotate,
        Verb::Revoke,
        Verb::Destroy,
        Verb::List,
        Verb::Verify,
        Verb::Audit,
        Verb::Admin,
    ];

    /// The verb's name in policy files.
    pub fn name(self) -> &'static str {
        match self {
            Verb::Read => "read",
            Verb::Write => "write",
            Verb::Issue => "issue",
            Verb::Rotate => "rotate",
            Verb::Revoke => "revoke",
            Verb::Destroy => "destroy",
            Verb::List => "list",
            Verb::Verify => "verify",
            Verb::Audit => "audit",
            Verb::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Result<Vec<Verb>, String> {
        if s == "*" {
            return Ok(Verb::ALL.to_vec());
        }
        Verb::ALL
            .iter()
            .find(|v| v.name() == s)
            .map(|v| vec![*v])
            .ok_or_else(|| format!("unknown verb {s:?} (expected one of read, write, issue, rotate, revoke, destroy, list, verify, audit, admin, *)"))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    rule: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    identities: Vec<String>,
    verbs: Vec<String>,
    secrets: Vec<String>,
    #[serde(default)]
    environments: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
struct Rule {
    identities: Vec<String>,
    verbs: Vec<Verb>,
    secrets: Vec<String>,
    environments: Option<Vec<String>>,
}

/// The loaded policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// Parses a policy from TOML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut rules = Vec::with_capacity(file.rule.len());
        for (i, r) in file.rule.into_iter().enumerate() {
            let mut verbs = Vec::new();
            for v in &r.verbs {
                let mut named = Verb::parse(v).map_err(|e| format!("rule {}: {e}", i + 1))?;
                if r.environments.is_some() {
                    if v == "*" {
                        named.retain(|v| !Verb::VAULT_WIDE.contains(v));
                    } else if let Some(wide) = named.iter().find(|v| Verb::VAULT_WIDE.contains(v)) {
                        return Err(format!(
                            "rule {}: {:?} is vault-wide (it covers every environment), so a rule \
                             granting it cannot list environments; grant it in a rule without \
                             `environments`",
                            i + 1,
                            wide.name()
                        ));
                    }
                }
                verbs.extend(named);
            }
            if r.identities.is_empty() || verbs.is_empty() || r.secrets.is_empty() {
                return Err(format!(
                    "rule {}: identities, verbs and secrets must each name at least one entry",
                    i + 1
                ));
            }
            rules.push(Rule {
                identities: r.identities,
                verbs,
                secrets: r.secrets,
                environments: r.environments,
            });
        }
        Ok(Self { rules })
    }

    /// Loads a policy file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read policy {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("policy {}: {e}", path.display()))
    }

    /// Whether `identity` may `verb` the secret `name` in `environment`. With `environment`
    /// None, whether it may in at least one environment (used before the secret is looked up,
    /// so a caller with no grant at all learns nothing about existence).
    pub fn allows(
        &self,
        identity: &str,
        verb: Verb,
        name: &str,
        environment: Option<&str>,
    ) -> bool {
        self.rules.iter().any(|r| {
            r.verbs.contains(&verb)
                && r.identities.iter().any(|g| glob(g, identity))
                && r.secrets.iter().any(|g| glob(g, name))
                && match (&r.environments, environment) {
                    (None, _) | (_, None) => true,
                    (Some(envs), Some(env)) => envs.iter().any(|g| glob(g, env)),
                }
        })
    }

    /// Whether `identity` holds `verb` on `name` whatever its environment (a rule without an
    /// environment list, or with `*` in it). Only such a caller may learn that `name` does not
    /// exist: to one whose grant stops at some environments, a missing secret and one in an
    /// environment it may not see must look the same.
    pub fn allows_in_every_environment(&self, identity: &str, verb: Verb, name: &str) -> bool {
        self.rules.iter().any(|r| {
            r.verbs.contains(&verb)
                && r.identities.iter().any(|g| glob(g, identity))
                && r.secrets.iter().any(|g| glob(g, name))
                && r.environments
                    .as_ref()
                    .is_none_or(|envs| envs.iter().any(|g| g == "*"))
        })
    }

    /// Whether `identity` holds `verb` on every secret in every environment (a rule granting
    /// it on `*` without an environment list): what reading the whole audit log takes.
    pub fn grants_everywhere(&self, identity: &str, verb: Verb) -> bool {
        self.rules.iter().any(|r| {
            r.verbs.contains(&verb)
                && r.environments.is_none()
                && r.secrets.iter().any(|g| g == "*")
                && r.identities.iter().any(|g| glob(g, identity))
        })
    }

    /// Whether `identity` holds `verb` on anything at all.
    pub fn grants_any(&self, identity: &str, verb: Verb) -> bool {
        self.rules
            .iter()
            .any(|r| r.verbs.contains(&verb) && r.identities.iter().any(|g| glob(g, identity)))
    }
}

/// Matches `text` against a glob where `*` is any run of characters and `?` any one.
/// Iterative with one backtrack point: linear in practice, no recursion. Runs on every call,
/// so ASCII input (names always are) is matched without allocating.
pub fn glob(pattern: &str, text: &str) -> bool {
    if pattern.is_ascii() && text.is_ascii() {
        glob_units(pattern.as_bytes(), text.as_bytes(), b'*', b'?')
    } else {
        let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
        glob_units(&p, &t, '*', '?')
    }
}

fn glob_units<T: PartialEq + Copy>(p: &[T], t: &[T], star_unit: T, any: T) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] != star_unit && (p[pi] == any || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == star_unit {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == star_unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        [[rule]]
        identities = ["admin"]
        verbs = ["*"]
        secrets = ["*"]

        [[rule]]
        identities = ["spiffe://ward/app/*"]
        verbs = ["read", "verify"]
        secrets = ["app/*"]
        environments = ["prod"]
    "#;

    #[test]
    fn globs() {
        assert!(glob("*", ""));
        assert!(glob("app/*", "app/db/pw"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "ac"));
        assert!(glob("*b*d", "abcxd"));
        assert!(!glob("app/*", "apps/x"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(glob("spiffe://é/*", "spiffe://é/app"));
        assert!(glob("?", "é"));
        assert!(!glob("a*", "b"));
    }

    #[test]
    fn deny_by_default() {
        let p = Policy::parse(POLICY).unwrap();
        assert!(p.allows("admin", Verb::Destroy, "x", Some("dev")));
        let app = "spiffe://ward/app/web";
        assert!(p.allows(app, Verb::Read, "app/db", Some("prod")));
        assert!(p.allows(app, Verb::Read, "app/db", None));
        assert!(!p.allows(app, Verb::Read, "app/db", Some("dev")));
        assert!(!p.allows(app, Verb::Write, "app/db", Some("prod")));
        assert!(!p.allows(app, Verb::Read, "other", Some("prod")));
        assert!(!p.allows("stranger", Verb::Read, "app/db", Some("prod")));
        assert!(!Policy::default().allows("admin", Verb::Read, "x", None));
        assert!(p.grants_any(app, Verb::Verify));
        assert!(!p.grants_any(app, Verb::List));
        assert!(p.grants_everywhere("admin", Verb::Audit));
        assert!(!p.grants_everywhere(app, Verb::Read));
    }

    #[test]
    fn environment_rules_never_grant_vault_wide_verbs() {
        let p = Policy::parse(
            "[[rule]]\nidentities=['team-dev/*']\nverbs=['*']\nsecrets=['*']\n\
             environments=['dev']",
        )
        .unwrap();
        let dev = "team-dev/ci";
        assert!(p.allows(dev, Verb::Destroy, "x", Some("dev")));
        assert!(!p.allows(dev, Verb::Read, "x", Some("prod")));
        for verb in Verb::VAULT_WIDE {
            assert!(!p.grants_any(dev, verb), "{verb:?}");
            assert!(!p.allows(dev, verb, "*", None), "{verb:?}");
            assert!(!p.grants_everywhere(dev, verb), "{verb:?}");
        }
        assert!(!p.allows_in_every_environment(dev, Verb::Read, "x"));
        for verb in ["admin", "audit"] {
            let e = Policy::parse(&format!(
                "[[rule]]\nidentities=['a']\nverbs=['read','{verb}']\nsecrets=['*']\n\
                 environments=['dev']"
            ))
            .unwrap_err();
            assert!(e.contains("rule 1") && e.contains("vault-wide"), "{e}");
        }
        let all = Policy::parse(POLICY).unwrap();
        assert!(all.allows_in_every_environment("admin", Verb::Read, "x"));
        assert!(!all.allows_in_every_environment("spiffe://ward/app/web", Verb::Read, "app/x"));
        let star = Policy::parse(
            "[[rule]]\nidentities=['a']\nverbs=['read']\nsecrets=['*']\nenvironments=['*']",
        )
        .unwrap();
        assert!(star.allows_in_every_environment("a", Verb::Read, "x"));
    }

    #[test]
    fn bad_policies_are_refused() {
        assert!(Policy::parse("[[rule]]\nidentities=['a']\nverbs=['fly']\nsecrets=['*']").is_err());
        assert!(Policy::parse("[[rule]]\nidentities=[]\nverbs=['read']\nsecrets=['*']").is_err());
        assert!(Policy::parse("[[rule]]\nidentity=['a']").is_err());
    }
}
