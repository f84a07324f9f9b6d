//! The usage chart: verifications per hour (last 24 h) or per day (last 7 days), stacked by
//! result, as an SVG drawn by the server (no script, no inline style: presentation attributes
//! only, which the CSP allows). Input is the hourly counts the usage book keeps.

use crate::clock::Millis;
use crate::model::VerifyResult;
use crate::vault::usage::{HourCount, HOUR_MS, RESULTS};
use maud::{html, Markup};

const WIDTH: u64 = 720;
const HEIGHT: u64 = 180;
const LEFT: u64 = 40;
const BOTTOM: u64 = 20;

/// Colour of each result (index = result number).
fn colour(result: usize) -> &'static str {
    match result {
        1 => "#2e7d32",       // VALID
        4..=6 => "#6d4c41",   // REVOKED, EXPIRED, DISABLED
        7..=9 => "#c62828",   // WRONG_ENVIRONMENT, FORBIDDEN_IP, INSUFFICIENT_SCOPE
        10 | 11 => "#ef6c00", // RATE_LIMITED, QUOTA_EXCEEDED
        _ => "#757575",
    }
}

/// Sums `hours` (of every version) into `n` buckets of `width_ms` ending with the one holding
/// `now`; each bucket counts by result number.
pub fn buckets(
    hours: &[&HourCount],
    now: Millis,
    width_ms: u64,
    n: u64,
) -> Vec<(Millis, Vec<u64>)> {
    let last = now - now % width_ms;
    let first = last.saturating_sub((n - 1) * width_ms);
    let mut out: Vec<(Millis, Vec<u64>)> = (0..n)
        .map(|i| (first + i * width_ms, vec![0; RESULTS]))
        .collect();
    for h in hours {
        if h.start_ms < first || h.start_ms >= last + width_ms {
            continue;
        }
        let i = ((h.start_ms - first) / width_ms) as usize;
        if let Some((_, counts)) = out.get_mut(i) {
            for (c, n) in counts.iter_mut().zip(&h.results) {
                *c += n;
            }
        }
    }
    out
}

/// A stacked bar chart of `buckets`, labelled with `label(start)`.
pub fn render(
    title: &str,
    buckets: &[(Millis, Vec<u64>)],
    label: impl Fn(Millis) -> String,
) -> Markup {
    let max = buckets
        .iter()
        .map(|(_, c)| c.iter().sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let plot_h = HEIGHT - BOTTOM - 10;
    let slot = (WIDTH - LEFT) / (buckets.len() as u64).max(1);
    let bar = slot.saturating_sub(2).max(1);
    let seen: Vec<usize> = (0..RESULTS)
        .filter(|r| {
            buckets
                .iter()
                .any(|(_, c)| c.get(*r).copied().unwrap_or(0) > 0)
        })
        .collect();
    let every = (buckets.len() / 8).max(1);
    // (x, top, height, result, count, bucket start), stacked bottom up.
    let mut rects = Vec::new();
    for (i, (start, counts)) in buckets.iter().enumerate() {
        let x = LEFT + i as u64 * slot;
        let mut y = HEIGHT - BOTTOM;
        for (r, n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
            let h = (n * plot_h).div_ceil(max);
            y = y.saturating_sub(h);
            rects.push((x, y, h, r, *n, *start));
        }
    }
    html! {
        figure.chart {
            figcaption { (title) }
            svg xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(HEIGHT)
                viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(title) {
                line x1=(LEFT) y1=(HEIGHT - BOTTOM) x2=(WIDTH) y2=(HEIGHT - BOTTOM) stroke="#999" {}
                text x="0" y="12" font-size="11" fill="#333" { (max) }
                text x="0" y=(HEIGHT - BOTTOM) font-size="11" fill="#333" { "0" }
                @for (x, top, h, r, n, start) in &rects {
                    rect x=(x) y=(top) width=(bar) height=(h) fill=(colour(*r)) {
                        title { (label(*start)) ": " (n) " " (result_name(*r)) }
                    }
                }
                @for (i, (start, _)) in buckets.iter().enumerate().filter(|(i, _)| i % every == 0) {
                    text x=(LEFT + i as u64 * slot) y=(HEIGHT - 5) font-size="10" fill="#333" { (label(*start)) }
                }
            }
            @if seen.is_empty() {
                p.muted { "No verifications in this period." }
            } @else {
                ul.legend {
                    @for r in &seen {
                        li { span.swatch data-result=(result_name(*r)) { "■" } " " (result_name(*r)) ": "
                            (buckets.iter().map(|(_, c)| c.get(*r).copied().unwrap_or(0)).sum::<u64>()) }
                    }
                }
            }
        }
    }
}

fn result_name(n: usize) -> &'static str {
    VerifyResult::from_number(n).map_or("OTHER", VerifyResult::name)
}

/// The hour of `ms` as `HH:00` (UTC).
pub fn hour_label(ms: Millis) -> String {
    format!("{:02}h", (ms / HOUR_MS) % 24)
}

/// The day of `ms` as `MM-DD` (UTC).
pub fn day_label(ms: Millis) -> String {
    crate::clock::rfc3339(ms)
        .get(5..10)
        .unwrap_or("")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_sum_hours_and_render_every_result() {
        let now = 1_000 * HOUR_MS + 5;
        let mut a = HourCount {
            start_ms: 1_000 * HOUR_MS,
            results: vec![0; RESULTS],
        };
        a.results[1] = 3;
        a.results[8] = 2;
        let mut b = a.clone();
        b.start_ms = 990 * HOUR_MS;
        let old = HourCount {
            start_ms: 900 * HOUR_MS,
            ..a.clone()
        };
        let hours = buckets(&[&a, &b, &old], now, HOUR_MS, 24);
        assert_eq!(hours.len(), 24);
        assert_eq!(hours[23].1[1], 3);
        assert_eq!(hours[13].1[8], 2);
        assert_eq!(
            hours.iter().map(|(_, c)| c[1]).sum::<u64>(),
            6,
            "the old hour is out"
        );
        let svg = render("per hour", &hours, hour_label).into_string();
        assert!(svg.contains("<svg"));
        assert!(svg.contains("FORBIDDEN_IP: 4"), "{svg}");
        assert!(svg.contains("VALID: 6"));
        let days = buckets(&[&a, &b, &old], now, 24 * HOUR_MS, 7);
        assert_eq!(days.iter().map(|(_, c)| c[1]).sum::<u64>(), 9);
    }
}
