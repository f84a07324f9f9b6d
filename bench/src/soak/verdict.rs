//! The soak's verdict: errors, RSS, fds and latency over the run, against their bounds.

use super::*;

/// The judgement of a run.
pub(super) struct Verdict {
    pub(super) errors: u64,
    pub(super) audit_ok: bool,
    pub(super) rss_first_kib: f64,
    pub(super) rss_last_kib: f64,
    pub(super) rss_growth_pct: f64,
    pub(super) fd_first: u64,
    pub(super) fd_last: u64,
    pub(super) disk_mib_per_min: f64,
    pub(super) max_rss_growth: f64,
    pub(super) max_fd_growth: u64,
}

impl Verdict {
    pub(super) fn of(samples: &[Sample], totals: &Window, args: &SoakArgs, audit_ok: bool) -> Self {
        let warm = args.warmup.as_secs_f64();
        let settled = samples.iter().position(|s| s.at_secs >= warm).unwrap_or(0);
        // Judge only what follows the warm-up, unless too little does.
        let samples = if samples.len() - settled >= 3 {
            &samples[settled..]
        } else {
            samples
        };
        let third = (samples.len() / 3).max(1);
        let (first, last) = (&samples[..third], &samples[samples.len() - third..]);
        let mean = |s: &[Sample]| s.iter().map(|x| x.rss_kib as f64).sum::<f64>() / s.len() as f64;
        let (rss_first_kib, rss_last_kib) = (mean(first), mean(last));
        let max_fds = |s: &[Sample]| s.iter().map(|x| x.fds).max().unwrap_or(0);
        let (a, b) = (&samples[0], &samples[samples.len() - 1]);
        let minutes = ((b.at_secs - a.at_secs) / 60.0).max(1e-9);
        Self {
            errors: totals.errors.values().sum(),
            audit_ok,
            rss_first_kib,
            rss_last_kib,
            rss_growth_pct: (rss_last_kib - rss_first_kib) / rss_first_kib.max(1.0) * 100.0,
            fd_first: max_fds(first),
            fd_last: max_fds(last),
            disk_mib_per_min: (b.data_bytes as f64 - a.data_bytes as f64) / 1_048_576.0 / minutes,
            max_rss_growth: args.max_rss_growth,
            max_fd_growth: args.max_fd_growth,
        }
    }

    pub(super) fn rss_flat(&self) -> bool {
        self.rss_growth_pct <= self.max_rss_growth
    }

    pub(super) fn fds_flat(&self) -> bool {
        self.fd_last <= self.fd_first + self.max_fd_growth
    }

    pub(super) fn passed(&self) -> bool {
        self.errors == 0 && self.audit_ok && self.rss_flat() && self.fds_flat()
    }

    pub(super) fn print(&self, totals: &Window, audit_records: u64, elapsed: Duration) {
        let ops: u64 = totals.ops.values().sum();
        println!(
            "ward-bench soak: {ops} operations in {:.0} s ({:.0}/s)",
            elapsed.as_secs_f64(),
            ops as f64 / elapsed.as_secs_f64().max(1e-9)
        );
        let by_op: Vec<String> = totals.ops.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("  operations  {}", by_op.join(", "));
        if self.errors == 0 {
            println!("  errors      none");
        } else {
            println!("  errors      {} (expected none):", self.errors);
            for (label, n) in &totals.errors {
                println!("                {n} × {label}");
            }
        }
        let ok = |b: bool| if b { "ok" } else { "FAILED" };
        println!(
            "  RSS         {:.1} → {:.1} MiB (mean of first vs last third after warm-up): \
             {:+.1} % (limit {} %) {}",
            self.rss_first_kib / 1024.0,
            self.rss_last_kib / 1024.0,
            self.rss_growth_pct,
            self.max_rss_growth,
            ok(self.rss_flat())
        );
        println!(
            "  open fds    {} → {} (max of first vs last third; limit +{}) {}",
            self.fd_first,
            self.fd_last,
            self.max_fd_growth,
            ok(self.fds_flat())
        );
        println!(
            "  data dir    {:+.2} MiB/min (the audit log keeps every call until retention)",
            self.disk_mib_per_min
        );
        println!(
            "  audit chain {} ({audit_records} records verified after the run)",
            if self.audit_ok { "verifies" } else { "BROKEN" }
        );
        println!(
            "  verdict     {}",
            if self.passed() { "PASS" } else { "FAIL" }
        );
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "passed": self.passed(),
            "errors": self.errors,
            "audit_chain_ok": self.audit_ok,
            "rss_first_third_kib": self.rss_first_kib,
            "rss_last_third_kib": self.rss_last_kib,
            "rss_growth_pct": self.rss_growth_pct,
            "rss_flat": self.rss_flat(),
            "fds_first_third_max": self.fd_first,
            "fds_last_third_max": self.fd_last,
            "fds_flat": self.fds_flat(),
            "data_mib_per_min": self.disk_mib_per_min,
        })
    }
}
