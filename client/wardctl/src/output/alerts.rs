//! Views of alerts: one alert (a line, or JSON) and the answer of a webhook test.

use std::io::{self, Write};

use serde_json::{json, Value};

use ward_client::proto::{watch_alerts_response, Alert, TestWebhookResponse};

use super::audit::print_gap;
use super::{one_line, or_dash, timestamp_json, timestamp_text};
use crate::failure::Failure;

/// Prints one stream item: an alert line on stdout, or a gap (stderr; a JSON line with --json).
pub fn print_alert_item(
    item: Option<watch_alerts_response::Item>,
    json: bool,
) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    match item {
        Some(watch_alerts_response::Item::Alert(a)) if json => writeln!(out, "{}", alert_json(&a))?,
        Some(watch_alerts_response::Item::Alert(a)) => writeln!(out, "{}", alert_line(&a))?,
        Some(watch_alerts_response::Item::Gap(g)) => print_gap(&mut out, &g, json)?,
        None => {}
    }
    // Followers read this live: one line at a time.
    out.flush()?;
    Ok(())
}

/// The one-line form: `SEQ TIME TYPE NAME@VERSION key_id=K id=ID DATA`.
pub fn alert_line(a: &Alert) -> String {
    let target = if a.name.is_empty() {
        "-".to_owned()
    } else {
        format!("{}@{}", a.name, a.version)
    };
    format!(
        "{}\t{}\t{}\t{}\tkey_id={}\tid={}\t{}",
        a.seq,
        timestamp_text(a.time.as_ref()),
        a.r#type,
        target,
        or_dash(&a.key_id),
        a.id,
        one_line(&a.data_json)
    )
}

/// The JSON form of an alert (its data as an object).
pub fn alert_json(a: &Alert) -> Value {
    json!({
        "seq": a.seq,
        "time": timestamp_json(a.time.as_ref()),
        "type": a.r#type,
        "id": a.id,
        "name": a.name,
        "version": a.version,
        "key_id": a.key_id,
        "data": serde_json::from_str::<Value>(&a.data_json).unwrap_or(Value::Null),
    })
}

/// The JSON form of TestWebhook's answer.
pub fn test_json(t: &TestWebhookResponse) -> Value {
    json!({
        "delivered": t.delivered,
        "http_status": t.http_status,
        "id": t.id,
        "error": t.error,
    })
}
