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
                verbs.extend(Verb::parse(v).map_err(|e| format!("rule {}: {e}", i + 1))?);
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
    fn bad_policies_are_refused() {
        assert!(Policy::parse("[[rule]]\nidentities=['a']\nverbs=['fly']\nsecrets=['*']").is_err());
        assert!(Policy::parse("[[rule]]\nidentities=[]\nverbs=['read']\nsecrets=['*']").is_err());
        assert!(Policy::parse("[[rule]]\nidentity=['a']").is_err());
    }
}
