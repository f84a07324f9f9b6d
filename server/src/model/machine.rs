//! The version state machine, as pure operations on a [`SecretRecord`]: no store, no clock,
//! no I/O, so every rule is unit-tested here.
//!
//! ```text
//!            push_primary / promote (old PRIMARY)
//!   PRIMARY ───────────────────────────────────▶ ACTIVE ──grace ends / set_inactive──▶ INACTIVE
//!      ▲                                           │  ▲                                   │
//!      └──────────────── promote ─────────────────┘  └──────────── set_active ──────────┘
//!   any of the three ──revoke──▶ REVOKED ──destroy──▶ DESTROYED      (both terminal)
//! ```
//!
//! Invariants kept by every operation: at most one stored PRIMARY, and `primary` names it;
//! a live secret keeps exactly one (taking the PRIMARY away needs a successor); a REVOKED or
//! DESTROYED version never changes back; a revoked secret has no usable version.
//! Each operation first settles the record at `now`, so it acts on the states in force.

use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::model::{Revocation, SecretRecord, StateReason, VersionMeta, VersionState};

/// What a new PRIMARY replaced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replaced {
    /// The former PRIMARY's number (0: there was none).
    pub version: u64,
    /// When it stops working (None: retired at once, or none).
    pub grace_until_ms: Option<Millis>,
}

impl SecretRecord {
    /// Appends `meta` as the new PRIMARY. The old PRIMARY becomes ACTIVE until
    /// `now + grace_ms` (INACTIVE at once for 0). Restarts the rotation schedule.
    pub fn push_primary(&mut self, mut meta: VersionMeta, now: Millis, grace_ms: u64) -> Replaced {
        self.settle(now);
        let replaced = self.demote_primary(meta.version, now, grace_ms);
        if replaced.version != 0 {
            meta.life.replaced = Some(replaced.version);
        }
        meta.state = VersionState::Primary;
        meta.grace_until_ms = None;
        self.primary = meta.version;
        self.versions.push(meta);
        self.update_ms = now;
        self.life.rotation_due_ms = None;
        self.life.next_rotation_ms = self.life.rotation_period_ms.map(|p| now.saturating_add(p));
        replaced
    }

    /// Promotes ACTIVE `version` to PRIMARY (rollback); the old PRIMARY becomes ACTIVE for
    /// `grace_ms` (INACTIVE for 0). Promoting the PRIMARY changes nothing.
    pub fn promote(&mut self, version: u64, now: Millis, grace_ms: u64, by: &str) -> Result<()> {
        self.settle(now);
        let i = self.index_of(version)?;
        match self.versions[i].state {
            VersionState::Primary => return Ok(()),
            VersionState::Active => {}
            VersionState::Inactive => {
                return Err(self.refuse(
                    i,
                    now,
                    "only an ACTIVE version can become PRIMARY; make it ACTIVE first",
                ))
            }
            VersionState::Revoked | VersionState::Destroyed => return Err(self.terminal(i, now)),
        }
        self.demote_primary(version, now, grace_ms);
        self.make_primary(i, now, by);
        Ok(())
    }

    /// Makes `version` ACTIVE until `now + grace_ms`: re-activates an INACTIVE version or
    /// moves an ACTIVE one's window. An expired version cannot be re-activated.
    pub fn set_active(&mut self, version: u64, now: Millis, grace_ms: u64, by: &str) -> Result<()> {
        self.settle(now);
        let i = self.index_of(version)?;
        match self.versions[i].state {
            VersionState::Primary => {
                return Err(self.refuse(
                    i,
                    now,
                    "it is the PRIMARY; promote another version or rotate instead",
                ))
            }
            VersionState::Revoked | VersionState::Destroyed => return Err(self.terminal(i, now)),
            VersionState::Active | VersionState::Inactive => {}
        }
        if self
            .expiry_of(&self.versions[i])
            .is_some_and(|at| now >= at)
        {
            return Err(self.refuse(i, now, "an expired version cannot be re-activated"));
        }
        let v = &mut self.versions[i];
        v.state = VersionState::Active;
        v.grace_until_ms = Some(now.saturating_add(grace_ms));
        v.life.reason = Some(StateReason::SetBy { by: by.to_owned() });
        v.life.changed_ms = Some(now);
        self.update_ms = now;
        Ok(())
    }

    /// Retires ACTIVE `version` now. Already INACTIVE: nothing changes.
    pub fn set_inactive(&mut self, version: u64, now: Millis, by: &str) -> Result<()> {
        self.settle(now);
        let i = self.index_of(version)?;
        match self.versions[i].state {
            VersionState::Inactive => return Ok(()),
            VersionState::Active => {}
            VersionState::Primary => {
                return Err(self.refuse(
                    i,
                    now,
                    "it is the PRIMARY; promote another version or rotate instead",
                ))
            }
            VersionState::Revoked | VersionState::Destroyed => return Err(self.terminal(i, now)),
        }
        let v = &mut self.versions[i];
        v.state = VersionState::Inactive;
        v.grace_until_ms = None;
        v.life.reason = Some(StateReason::SetBy { by: by.to_owned() });
        v.life.changed_ms = Some(now);
        self.update_ms = now;
        Ok(())
    }

    /// Revokes one version. Revoking the PRIMARY needs `successor`, an ACTIVE version that
    /// becomes PRIMARY in its place.
    pub fn revoke_version(
        &mut self,
        version: u64,
        successor: Option<u64>,
        by: &str,
        reason: &str,
        now: Millis,
    ) -> Result<()> {
        self.settle(now);
        let i = self.index_of(version)?;
        if let VersionState::Revoked | VersionState::Destroyed = self.versions[i].state {
            return Err(self.terminal(i, now));
        }
        self.hand_over(i, successor, now, by, "revoking")?;
        let v = &mut self.versions[i];
        v.state = VersionState::Revoked;
        v.grace_until_ms = None;
        v.life.reason = Some(StateReason::Revoked {
            by: by.to_owned(),
            reason: reason.to_owned(),
        });
        v.life.changed_ms = Some(now);
        self.update_ms = now;
        Ok(())
    }

    /// Revokes the whole secret: every version not yet REVOKED or DESTROYED, and every future
    /// one (the secret accepts no new version). Returns the versions this revoked.
    pub fn revoke_all(&mut self, by: &str, reason: &str, now: Millis) -> Result<Vec<u64>> {
        self.settle(now);
        if let Some(r) = &self.life.revoked {
            return Err(Error::FailedPrecondition(format!(
                "{} is already revoked (by {} at {})",
                self.name,
                r.by,
                crate::clock::rfc3339(r.time_ms)
            )));
        }
        let mut revoked = Vec::new();
        for v in &mut self.versions {
            if !matches!(v.state, VersionState::Revoked | VersionState::Destroyed) {
                v.state = VersionState::Revoked;
                v.grace_until_ms = None;
                v.life.reason = Some(StateReason::Revoked {
                    by: by.to_owned(),
                    reason: reason.to_owned(),
                });
                v.life.changed_ms = Some(now);
                revoked.push(v.version);
            }
        }
        self.life.revoked = Some(Revocation {
            by: by.to_owned(),
            reason: reason.to_owned(),
            time_ms: now,
        });
        self.life.next_rotation_ms = None;
        self.life.rotation_due_ms = None;
        self.update_ms = now;
        Ok(revoked)
    }

    /// Marks `version` DESTROYED (the caller deletes its sealed value in the same batch).
    /// Destroying the PRIMARY needs `successor`, an ACTIVE version that becomes PRIMARY.
    pub fn destroy_version(
        &mut self,
        version: u64,
        successor: Option<u64>,
        by: &str,
        now: Millis,
    ) -> Result<()> {
        self.settle(now);
        let i = self.index_of(version)?;
        if self.versions[i].state == VersionState::Destroyed {
            return Err(self.terminal(i, now));
        }
        self.hand_over(i, successor, now, by, "destroying")?;
        let v = &mut self.versions[i];
        v.state = VersionState::Destroyed;
        v.grace_until_ms = None;
        v.life.reason = Some(StateReason::Destroyed { by: by.to_owned() });
        v.life.changed_ms = Some(now);
        self.update_ms = now;
        Ok(())
    }

    /// The PRIMARY's number if the secret has one in force at `now`, else 0.
    pub fn primary_at(&self, now: Millis) -> u64 {
        match self.version(0) {
            Some(v) if self.standing(v, now).state == VersionState::Primary => v.version,
            _ => 0,
        }
    }

    /// Refuses new versions on a revoked or expired secret.
    pub fn check_accepts_versions(&self, now: Millis) -> Result<()> {
        if let Some(r) = &self.life.revoked {
            return Err(Error::FailedPrecondition(format!(
                "{} is revoked (by {}: {}); it accepts no new version",
                self.name, r.by, r.reason
            )));
        }
        if let Some(at) = self.life.expire_ms.filter(|&at| now >= at) {
            return Err(Error::FailedPrecondition(format!(
                "{} expired at {}; it accepts no new version",
                self.name,
                crate::clock::rfc3339(at)
            )));
        }
        Ok(())
    }

    /// Checks the invariants every operation keeps; a violation describes itself.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        for (i, v) in self.versions.iter().enumerate() {
            if v.version != i as u64 + 1 {
                return Err(format!("version {} at position {i}", v.version));
            }
        }
        let primaries: Vec<u64> = self
            .versions
            .iter()
            .filter(|v| v.state == VersionState::Primary)
            .map(|v| v.version)
            .collect();
        match primaries[..] {
            [] => {}
            [p] if p == self.primary => {}
            _ => {
                return Err(format!(
                    "PRIMARY versions {primaries:?}, primary {}",
                    self.primary
                ))
            }
        }
        if self.life.revoked.is_some()
            && self
                .versions
                .iter()
                .any(|v| !matches!(v.state, VersionState::Revoked | VersionState::Destroyed))
        {
            return Err("revoked secret with a live version".into());
        }
        if let Some(v) = self
            .versions
            .iter()
            .find(|v| v.state == VersionState::Active && v.grace_until_ms.is_none())
        {
            return Err(format!("ACTIVE version {} without grace_until", v.version));
        }
        Ok(())
    }

    // ---- helpers ----------------------------------------------------------------------------

    fn index_of(&self, version: u64) -> Result<usize> {
        self.versions
            .iter()
            .position(|v| v.version == version)
            .ok_or_else(|| Error::NotFound(format!("version {version} of {}", self.name)))
    }

    /// Demotes the stored PRIMARY (if any) in favour of `by_version`.
    fn demote_primary(&mut self, by_version: u64, now: Millis, grace_ms: u64) -> Replaced {
        let Some(v) = self
            .versions
            .iter_mut()
            .find(|v| v.state == VersionState::Primary)
        else {
            return Replaced::default();
        };
        v.life.reason = Some(StateReason::Replaced { by_version });
        v.life.changed_ms = Some(now);
        if grace_ms == 0 {
            v.state = VersionState::Inactive;
            v.grace_until_ms = None;
        } else {
            v.state = VersionState::Active;
            v.grace_until_ms = Some(now.saturating_add(grace_ms));
        }
        Replaced {
            version: v.version,
            grace_until_ms: v.grace_until_ms,
        }
    }

    fn make_primary(&mut self, i: usize, now: Millis, by: &str) {
        let v = &mut self.versions[i];
        v.state = VersionState::Primary;
        v.grace_until_ms = None;
        v.life.reason = Some(StateReason::SetBy { by: by.to_owned() });
        v.life.changed_ms = Some(now);
        self.primary = v.version;
        self.update_ms = now;
    }

    /// Before taking version `i` out of service: if it is the PRIMARY, `successor` (ACTIVE)
    /// takes its place; otherwise no successor may be named.
    fn hand_over(
        &mut self,
        i: usize,
        successor: Option<u64>,
        now: Millis,
        by: &str,
        doing: &str,
    ) -> Result<()> {
        let version = self.versions[i].version;
        let is_primary = self.versions[i].state == VersionState::Primary;
        match (is_primary, successor) {
            (false, None) => Ok(()),
            (false, Some(_)) => Err(Error::invalid(format!(
                "successor_version applies only when {doing} the PRIMARY; version {version} of {} \
                 is {}",
                self.name,
                self.versions[i].state.name()
            ))),
            (true, None) => Err(Error::FailedPrecondition(format!(
                "version {version} of {} is the PRIMARY: name a successor_version (an ACTIVE \
                 version to promote), rotate first, or revoke all_versions",
                self.name
            ))),
            (true, Some(s)) if s == version => Err(Error::invalid(
                "successor_version must differ from the version itself",
            )),
            (true, Some(s)) => {
                let j = self.index_of(s)?;
                if self.versions[j].state != VersionState::Active {
                    return Err(self.refuse(
                        j,
                        now,
                        "only an ACTIVE version can become PRIMARY (successor_version)",
                    ));
                }
                self.make_primary(j, now, by);
                Ok(())
            }
        }
    }

    /// FAILED_PRECONDITION naming version `i`'s state (and why it is in it) and the rule.
    fn refuse(&self, i: usize, now: Millis, rule: &str) -> Error {
        let v = &self.versions[i];
        let standing = self.standing(v, now);
        Error::FailedPrecondition(format!(
            "version {} of {} is {}{}; {rule}",
            v.version,
            self.name,
            standing.state.name(),
            standing.explain()
        ))
    }

    fn terminal(&self, i: usize, now: Millis) -> Error {
        let state = self.versions[i].state.name();
        self.refuse(i, now, &format!("a {state} version never changes back"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;
    use crate::model::{Kind, SecretLife, VersionLife};
    use std::collections::BTreeMap;
    use VersionState::*;

    const H: u64 = 3_600_000;

    fn secret() -> SecretRecord {
        SecretRecord {
            name: "db".into(),
            kind: Kind::Static,
            environment: "dev".into(),
            owner: "admin".into(),
            labels: BTreeMap::new(),
            description: String::new(),
            scopes: Vec::new(),
            created_by: "admin".into(),
            create_ms: 0,
            update_ms: 0,
            primary: 0,
            versions: Vec::new(),
            life: SecretLife::default(),
            key_policy: Default::default(),
        }
    }

    fn meta(version: u64) -> VersionMeta {
        VersionMeta {
            version,
            state: Primary,
            create_ms: 0,
            grace_until_ms: None,
            fingerprint: [0; 16],
            term: 1,
            key_id: None,
            life: VersionLife::default(),
        }
    }

    /// A secret with `n` versions pushed at times 0, 1, … with a one-hour grace.
    fn with_versions(n: u64) -> SecretRecord {
        let mut s = secret();
        for v in 1..=n {
            s.push_primary(meta(v), v - 1, H);
            s.check_invariants().unwrap();
        }
        s
    }

    fn states(s: &SecretRecord) -> Vec<VersionState> {
        s.versions.iter().map(|v| v.state).collect()
    }

    fn code<T: std::fmt::Debug>(r: Result<T>) -> Code {
        r.unwrap_err().code()
    }

    #[test]
    fn transition_table() {
        let all = [Primary, Active, Inactive, Revoked, Destroyed];
        for from in all {
            for to in all {
                let allowed = from.may_become(to);
                let expected = match (from, to) {
                    (Destroyed, _) => false,
                    (Revoked, t) => t == Destroyed,
                    (Inactive, Primary) => false,
                    _ => true,
                };
                assert_eq!(allowed, expected, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn rotation_demotes_with_grace_then_deadline_retires() {
        let mut s = with_versions(2);
        assert_eq!(states(&s), [Active, Primary]);
        assert_eq!(s.versions[0].grace_until_ms, Some(1 + H));
        assert_eq!(s.versions[1].life.replaced, Some(1));
        assert!(s.usable(1, H).is_ok());
        let err = s.usable(1, 1 + H).unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.to_string().contains("grace period ended"), "{err}");
        assert!(s.settle(1 + H));
        assert_eq!(states(&s), [Inactive, Primary]);
        assert!(!s.settle(2 + H), "settling twice changes nothing");

        // Grace 0 retires the old PRIMARY at once.
        let r = s.push_primary(meta(3), 5 * H, 0);
        assert_eq!(
            r,
            Replaced {
                version: 2,
                grace_until_ms: None
            }
        );
        assert_eq!(states(&s), [Inactive, Inactive, Primary]);
        s.check_invariants().unwrap();
    }

    #[test]
    fn rollback_promotes_only_active_versions() {
        let mut s = with_versions(3);
        assert_eq!(states(&s), [Active, Active, Primary]);
        s.promote(2, 10, H, "admin").unwrap();
        assert_eq!(states(&s), [Active, Primary, Active]);
        assert_eq!(s.primary, 2);
        s.check_invariants().unwrap();
        // Promoting the PRIMARY is a no-op.
        s.promote(2, 11, H, "admin").unwrap();
        assert_eq!(s.primary, 2);

        // INACTIVE: re-activate first.
        s.set_inactive(1, 12, "admin").unwrap();
        let before = s.clone();
        assert_eq!(code(s.promote(1, 13, H, "admin")), Code::FailedPrecondition);
        assert_eq!(s, before, "a refused promotion changes nothing");
        s.set_active(1, 14, H, "admin").unwrap();
        s.promote(1, 15, 0, "admin").unwrap();
        assert_eq!(states(&s), [Primary, Inactive, Active]);
        s.check_invariants().unwrap();
        assert_eq!(code(s.promote(9, 16, H, "admin")), Code::NotFound);
    }

    #[test]
    fn set_active_and_inactive_rules() {
        let mut s = with_versions(2);
        assert_eq!(code(s.set_inactive(2, 5, "a")), Code::FailedPrecondition);
        assert_eq!(code(s.set_active(2, 5, H, "a")), Code::FailedPrecondition);
        s.set_inactive(1, 5, "a").unwrap();
        s.set_inactive(1, 6, "a").unwrap();
        assert_eq!(states(&s), [Inactive, Primary]);
        s.set_active(1, 7, 100, "a").unwrap();
        assert_eq!(s.versions[0].grace_until_ms, Some(107));
        assert_eq!(s.usable(1, 106).unwrap().1, Active);
        assert!(s.usable(1, 107).is_err());

        // An expired version stays retired.
        let mut s = with_versions(2);
        s.versions[0].life.expire_ms = Some(50);
        assert_eq!(code(s.set_active(1, 60, H, "a")), Code::FailedPrecondition);
    }

    #[test]
    fn revoked_and_destroyed_never_come_back() {
        let mut s = with_versions(3);
        s.revoke_version(1, None, "admin", "leaked", 10).unwrap();
        let err = s.usable(1, 11).unwrap_err();
        assert!(
            err.to_string()
                .contains("REVOKED: revoked by admin: leaked"),
            "{err}"
        );
        for r in [
            s.clone().promote(1, 12, H, "a"),
            s.clone().set_active(1, 12, H, "a"),
            s.clone().set_inactive(1, 12, "a"),
            s.clone().revoke_version(1, None, "a", "again", 12),
        ] {
            assert_eq!(code(r), Code::FailedPrecondition);
        }
        // A revoked version can still be destroyed (crypto-shredding), and then nothing more.
        s.destroy_version(1, None, "admin", 13).unwrap();
        assert_eq!(
            code(s.clone().destroy_version(1, None, "a", 14)),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(s.clone().set_active(1, 14, H, "a")),
            Code::FailedPrecondition
        );
        assert_eq!(states(&s), [Destroyed, Active, Primary]);
        s.check_invariants().unwrap();
    }

    #[test]
    fn taking_the_primary_away_needs_an_active_successor() {
        let mut s = with_versions(3);
        let before = s.clone();
        assert_eq!(
            code(s.revoke_version(3, None, "a", "r", 10)),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(s.destroy_version(3, None, "a", 10)),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(s.destroy_version(3, Some(3), "a", 10)),
            Code::InvalidArgument
        );
        assert_eq!(code(s.destroy_version(3, Some(7), "a", 10)), Code::NotFound);
        assert_eq!(
            code(s.destroy_version(1, Some(2), "a", 10)),
            Code::InvalidArgument
        );
        s.set_inactive(2, 10, "a").unwrap();
        assert_eq!(
            code(s.destroy_version(3, Some(2), "a", 11)),
            Code::FailedPrecondition
        );
        s = before;
        s.destroy_version(3, Some(2), "a", 11).unwrap();
        assert_eq!(states(&s), [Active, Primary, Destroyed]);
        assert_eq!(s.primary, 2);
        s.revoke_version(2, Some(1), "a", "r", 12).unwrap();
        assert_eq!(states(&s), [Primary, Revoked, Destroyed]);
        s.check_invariants().unwrap();
    }

    #[test]
    fn whole_secret_revocation() {
        let mut s = with_versions(3);
        s.life.rotation_period_ms = Some(H);
        s.life.next_rotation_ms = Some(H);
        s.destroy_version(1, None, "a", 10).unwrap();
        let revoked = s.revoke_all("admin", "compromised", 11).unwrap();
        assert_eq!(revoked, [2, 3]);
        assert_eq!(states(&s), [Destroyed, Revoked, Revoked]);
        assert_eq!(s.primary_at(12), 0);
        assert_eq!(
            s.life.next_rotation_ms, None,
            "a revoked secret is not rotated"
        );
        let err = s.usable(0, 12).unwrap_err();
        assert!(err.to_string().contains("compromised"), "{err}");
        assert_eq!(code(s.check_accepts_versions(12)), Code::FailedPrecondition);
        assert_eq!(
            code(s.clone().revoke_all("a", "again", 13)),
            Code::FailedPrecondition
        );
        s.check_invariants().unwrap();
    }

    #[test]
    fn expiry_is_enforced_when_read_and_settled() {
        let mut s = with_versions(2);
        s.versions[1].life.expire_ms = Some(100);
        assert_eq!(s.usable(0, 99).unwrap().1, Primary);
        let err = s.usable(0, 100).unwrap_err();
        assert!(err.to_string().contains("INACTIVE: expired"), "{err}");
        // The secret's own expiry covers every version.
        let mut t = with_versions(2);
        t.life.expire_ms = Some(50);
        assert!(t.usable(1, 49).is_ok() && t.usable(1, 50).is_err());
        assert_eq!(code(t.check_accepts_versions(50)), Code::FailedPrecondition);
        // Settling stores it; the expired PRIMARY no longer counts as one.
        assert!(s.settle(100));
        assert_eq!(states(&s), [Active, Inactive]);
        assert_eq!(s.versions[1].life.reason, Some(StateReason::Expired));
        assert_eq!(s.primary_at(100), 0);
        s.check_invariants().unwrap();
        // A rotation then makes a new PRIMARY and replaces nothing.
        let r = s.push_primary(meta(3), 101, H);
        assert_eq!(r.version, 0);
        assert_eq!(states(&s), [Active, Inactive, Primary]);
        s.check_invariants().unwrap();
    }

    #[test]
    fn new_versions_restart_the_rotation_schedule() {
        let mut s = with_versions(1);
        s.life.rotation_period_ms = Some(H);
        s.life.rotation_due_ms = Some(5);
        s.push_primary(meta(2), 10, H);
        assert_eq!(s.life.next_rotation_ms, Some(10 + H));
        assert_eq!(s.life.rotation_due_ms, None);
    }
}
