//! `webhook`: an example failover hook that POSTs a JSON event to a URL.
//!
//! Attach it as a pre and/or post step of a recovery plan to notify a chat channel, a ticketing
//! system or a runbook service, or to let that service veto a failover.
//!
//! # Config
//!
//! | Key | Meaning |
//! |---|---|
//! | `url` | Required. The `http://` or `https://` URL to POST to (its host must be on the manifest's `http.allow` list). |
//! | `on-failure` | `abort` (default) or `skip`: the outcome when the POST fails or answers non-2xx. |
//! | `header.NAME` | Adds the header `NAME` with this value to the request (secrets belong in the host's credential injection, not here). |
//!
//! # The event
//!
//! `POST <url>` with `content-type: application/json` and the body
//!
//! ```json
//! {"plan": "erp", "run_id": "r-42", "operation": "planned-failover", "phase": "pre",
//!  "step": "notify", "items": [{"name": "erp-db", "recovery_point": "p-7"}],
//!  "parameters": {"ticket": "CHG-1"}, "sent_at_ms": 1764150000000}
//! ```
//!
//! `operation` and `phase` are the WIT names in kebab case; `parameters` is an object (a
//! repeated key keeps its last value). In the `post` phase the event also carries
//! `"pre_sent_at_ms"`: when the `pre` phase of the same step in the same run posted (kept in the
//! run's key-value store under `webhook/<step>/pre-sent-at-ms`), if it got an answer.
//!
//! # The answer
//!
//! - 2xx: `proceed`, unless the body is a JSON object with `"outcome": "skip"` or `"abort"`
//!   (and an optional `"message"`), which the hook returns: an endpoint can veto a failover in
//!   the `pre` phase. `"outcome": "proceed"` is accepted too; any other `outcome` value is treated
//!   as a failed POST.
//! - non-2xx, or the POST failed (host refused, timeout, unreachable): the `on-failure` outcome,
//!   with a message naming the URL and the status or error.
//!
//! Messages name the URL without its query string or user info, which may hold tokens. Each
//! POST logs one `info` line.

use std::collections::BTreeMap;

use ferry_plugin_sdk::hook::{Context, FailoverHook, Outcome, Phase};
use ferry_plugin_sdk::http::{self, Request, Response};
use ferry_plugin_sdk::io::IoError;
use ferry_plugin_sdk::{clock, config, kv};
use serde::Serialize;

/// The hook.
#[derive(Debug)]
pub struct Webhook;

impl FailoverHook for Webhook {
    fn run(context: &Context) -> Outcome {
        match Settings::from_config() {
            Ok(settings) => run(context, &settings),
            Err(message) => Outcome::Abort(message),
        }
    }
}

ferry_plugin_sdk::export_failover_hook!(Webhook);

/// What to answer when the POST fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Stop the plan (the default).
    Abort,
    /// Carry on without this step.
    Skip,
}

impl OnFailure {
    fn outcome(self, message: String) -> Outcome {
        match self {
            Self::Abort => Outcome::Abort(message),
            Self::Skip => Outcome::Skip(message),
        }
    }
}

/// The hook's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Where to POST.
    pub url: String,
    /// The outcome of a failed POST.
    pub on_failure: OnFailure,
    /// Extra request headers from `header.NAME` keys.
    pub headers: Vec<(String, String)>,
}

impl Settings {
    /// Read the settings from the plugin's config.
    ///
    /// # Errors
    /// The abort message naming the missing or bad key.
    pub fn from_config() -> Result<Self, String> {
        let url = config::get("url").ok_or("webhook: config key `url` is not set")?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err("webhook: config key `url` must be an http:// or https:// URL".to_owned());
        }
        let on_failure = match config::get("on-failure").as_deref() {
            None | Some("abort") => OnFailure::Abort,
            Some("skip") => OnFailure::Skip,
            Some(other) => {
                return Err(format!(
                    "webhook: config key `on-failure` must be `abort` or `skip`, not `{other}`"
                ));
            }
        };
        let mut headers = Vec::new();
        for key in config::keys() {
            let Some(name) = key.strip_prefix("header.") else {
                continue;
            };
            if name.is_empty() {
                return Err("webhook: config key `header.` names no header".to_owned());
            }
            let value = config::get(&key).unwrap_or_default();
            headers.push((name.to_owned(), value));
        }
        Ok(Self {
            url,
            on_failure,
            headers,
        })
    }
}

/// The key-value key under which the `pre` phase of `step` leaves its `sent_at_ms`.
#[must_use]
pub fn pre_sent_key(step: &str) -> String {
    format!("webhook/{step}/pre-sent-at-ms")
}

/// POST the event for `context` and turn the answer into an outcome.
fn run(context: &Context, settings: &Settings) -> Outcome {
    let key = pre_sent_key(&context.step);
    let pre_sent_at_ms = match context.phase {
        Phase::Pre => None,
        Phase::Post => kv::get(&key)
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse().ok()),
    };
    let sent_at_ms = clock::now_ms();
    let mut request = Request::post_json(
        settings.url.clone(),
        event_json(context, sent_at_ms, pre_sent_at_ms),
    );
    for (name, _) in &settings.headers {
        request
            .headers
            .retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }
    request.headers.extend(settings.headers.iter().cloned());

    let result = http::send(request);
    let url = display_url(&settings.url);
    let answer = match &result {
        Ok(r) => format!("HTTP {}", r.status),
        Err(e) => format!("failed: {e}"),
    };
    ferry_plugin_sdk::info!(
        "webhook: POST {url} for plan `{}` step `{}` ({} {}): {answer}",
        context.plan,
        context.step,
        context.operation,
        context.phase
    );

    match context.phase {
        Phase::Pre if result.is_ok() => {
            if let Err(e) = kv::set(&key, sent_at_ms.to_string().as_bytes()) {
                ferry_plugin_sdk::warn!("webhook: could not keep the pre phase's time: {e}");
            }
        }
        Phase::Pre => {}
        Phase::Post => kv::delete(&key),
    }
    outcome_of(result, &url, settings.on_failure)
}

#[derive(Serialize)]
struct Event<'a> {
    plan: &'a str,
    run_id: &'a str,
    operation: &'static str,
    phase: &'static str,
    step: &'a str,
    items: Vec<EventItem<'a>>,
    parameters: BTreeMap<&'a str, &'a str>,
    sent_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pre_sent_at_ms: Option<u64>,
}

#[derive(Serialize)]
struct EventItem<'a> {
    name: &'a str,
    recovery_point: &'a str,
}

/// The JSON event for `context` (format in the crate docs).
#[must_use]
pub fn event_json(context: &Context, sent_at_ms: u64, pre_sent_at_ms: Option<u64>) -> String {
    let event = Event {
        plan: &context.plan,
        run_id: &context.run_id,
        operation: context.operation.as_str(),
        phase: context.phase.as_str(),
        step: &context.step,
        items: context
            .items
            .iter()
            .map(|i| EventItem {
                name: &i.name,
                recovery_point: &i.recovery_point,
            })
            .collect(),
        parameters: context
            .parameters
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        sent_at_ms,
        pre_sent_at_ms,
    };
    serde_json::to_string(&event).expect("an event of strings and numbers serialises")
}

/// Longest endpoint message or body excerpt put into an outcome.
const MAX_MESSAGE: usize = 1000;

/// The outcome for the POST's `result` (`url` as displayed in messages).
#[must_use]
pub fn outcome_of(result: Result<Response, IoError>, url: &str, on_failure: OnFailure) -> Outcome {
    let response = match result {
        Ok(r) => r,
        Err(e) => return on_failure.outcome(format!("webhook: POST {url} failed: {e}")),
    };
    if !response.is_success() {
        let body = excerpt(&response.text(), 200);
        let body = if body.is_empty() {
            String::new()
        } else {
            format!(": {body}")
        };
        return on_failure.outcome(format!(
            "webhook: POST {url} returned HTTP {}{body}",
            response.status
        ));
    }
    let Ok(serde_json::Value::Object(answer)) = serde_json::from_slice(&response.body) else {
        return Outcome::Proceed;
    };
    let message = answer
        .get("message")
        .and_then(|m| m.as_str())
        .map(|m| format!("webhook {url}: {}", excerpt(m, MAX_MESSAGE)));
    match answer.get("outcome") {
        None => Outcome::Proceed,
        Some(serde_json::Value::String(o)) if o == "proceed" => Outcome::Proceed,
        Some(serde_json::Value::String(o)) if o == "skip" => Outcome::Skip(
            message.unwrap_or_else(|| format!("webhook {url} asked to skip this step")),
        ),
        Some(serde_json::Value::String(o)) if o == "abort" => Outcome::Abort(
            message.unwrap_or_else(|| format!("webhook {url} asked to abort the plan")),
        ),
        Some(other) => on_failure.outcome(format!(
            "webhook: POST {url} answered outcome {}, expected \"proceed\", \"skip\" or \"abort\"",
            excerpt(&other.to_string(), 100)
        )),
    }
}

/// At most `max` characters of `text`, control characters replaced by spaces.
fn excerpt(text: &str, max: usize) -> String {
    let mut out: String = text
        .trim()
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.trim().chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// `url` without user info, query or fragment (which may hold tokens), for messages.
#[must_use]
pub fn display_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    format!("{scheme}://{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_plugin_sdk::hook::{Item, Operation};
    use ferry_plugin_sdk::io::IoErrorKind;
    use ferry_plugin_sdk::testing;

    fn context(phase: Phase) -> Context {
        Context {
            plan: "erp".into(),
            run_id: "r-42".into(),
            operation: Operation::PlannedFailover,
            phase,
            step: "notify".into(),
            items: vec![Item {
                name: "erp-db".into(),
                recovery_point: "p-7".into(),
            }],
            parameters: vec![
                ("ticket".into(), "CHG-0".into()),
                ("ticket".into(), "CHG-1".into()),
            ],
        }
    }

    fn json(s: &str) -> serde_json::Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn event_has_the_documented_shape() {
        let got = json(&event_json(&context(Phase::Pre), 1000, None));
        assert_eq!(
            got,
            json(
                r#"{"plan":"erp","run_id":"r-42","operation":"planned-failover","phase":"pre",
                "step":"notify","items":[{"name":"erp-db","recovery_point":"p-7"}],
                "parameters":{"ticket":"CHG-1"},"sent_at_ms":1000}"#
            )
        );
        let got = json(&event_json(&context(Phase::Post), 2000, Some(1000)));
        assert_eq!(got["phase"], "post");
        assert_eq!(got["pre_sent_at_ms"], 1000);
    }

    fn ok(body: &str) -> Result<Response, IoError> {
        Ok(Response::new(200, body))
    }

    #[test]
    fn mutation_smoke() {
        let seed = br#"{"outcome":"abort","message":"change freeze \u00e9"}"#;
        ferry_plugin_sdk::testing::mutations(seed, 3000, |d| {
            let r = Ok(Response {
                status: 200,
                headers: Vec::new(),
                body: d.to_vec(),
            });
            // Whatever the body, an outcome comes back and never echoes the URL's query.
            let url = display_url("https://h/x?token=secret");
            let o = outcome_of(r, &url, OnFailure::Abort);
            if let Outcome::Skip(m) | Outcome::Abort(m) = o {
                assert!(!m.contains("secret"), "{m}");
            }
        });
    }

    #[test]
    fn answers_become_outcomes() {
        let u = "https://h/x";
        let abort = OnFailure::Abort;
        assert_eq!(outcome_of(ok(""), u, abort), Outcome::Proceed);
        assert_eq!(outcome_of(ok("not json"), u, abort), Outcome::Proceed);
        assert_eq!(outcome_of(ok(r#"{"x":1}"#), u, abort), Outcome::Proceed);
        assert_eq!(outcome_of(ok(r#"["abort"]"#), u, abort), Outcome::Proceed);
        assert_eq!(
            outcome_of(ok(r#"{"outcome":"proceed"}"#), u, abort),
            Outcome::Proceed
        );
        assert_eq!(
            outcome_of(ok(r#"{"outcome":"skip"}"#), u, abort),
            Outcome::skip("webhook https://h/x asked to skip this step")
        );
        assert_eq!(
            outcome_of(
                ok(r#"{"outcome":"abort","message":"change freeze"}"#),
                u,
                abort
            ),
            Outcome::abort("webhook https://h/x: change freeze")
        );
        assert_eq!(
            outcome_of(ok(r#"{"outcome":"nope"}"#), u, OnFailure::Skip),
            Outcome::skip(
                "webhook: POST https://h/x answered outcome \"nope\", expected \"proceed\", \"skip\" or \"abort\""
            )
        );
        assert_eq!(
            outcome_of(Ok(Response::new(503, "down\nfor maintenance")), u, abort),
            Outcome::abort("webhook: POST https://h/x returned HTTP 503: down for maintenance")
        );
        assert_eq!(
            outcome_of(Ok(Response::new(404, "")), u, OnFailure::Skip),
            Outcome::skip("webhook: POST https://h/x returned HTTP 404")
        );
        let e = IoError::new(IoErrorKind::Denied, "host h is not allowed");
        assert_eq!(
            outcome_of(Err(e), u, abort),
            Outcome::abort("webhook: POST https://h/x failed: denied: host h is not allowed")
        );
    }

    #[test]
    fn urls_are_shown_without_secrets() {
        assert_eq!(
            display_url("https://user:pw@hooks.example/a/b?token=s#f"),
            "https://hooks.example/a/b"
        );
        assert_eq!(display_url("http://h:8080"), "http://h:8080");
    }

    #[test]
    fn config_errors_abort() {
        testing::reset();
        assert_eq!(
            Webhook::run(&context(Phase::Pre)),
            Outcome::abort("webhook: config key `url` is not set")
        );
        testing::set_config("url", "ftp://h/");
        assert!(
            matches!(Webhook::run(&context(Phase::Pre)), Outcome::Abort(m) if m.contains("http://"))
        );
        testing::set_config("url", "https://h/");
        testing::set_config("on-failure", "ignore");
        assert_eq!(
            Webhook::run(&context(Phase::Pre)),
            Outcome::abort(
                "webhook: config key `on-failure` must be `abort` or `skip`, not `ignore`"
            )
        );
        assert!(testing::sent_requests().is_empty());
    }

    #[test]
    fn pre_and_post_round_trip() {
        testing::reset();
        testing::set_config("url", "https://hooks.example/ferry?token=secret");
        testing::set_config("header.x-team", "storage");
        testing::set_config("header.Content-Type", "application/vnd.ferry+json");
        testing::set_http_handler(|_| Ok(Response::new(204, "")));

        testing::set_now_ms(1000);
        assert_eq!(Webhook::run(&context(Phase::Pre)), Outcome::Proceed);
        assert_eq!(
            kv::get(&pre_sent_key("notify")).as_deref(),
            Some(&b"1000"[..])
        );
        testing::set_now_ms(5000);
        assert_eq!(Webhook::run(&context(Phase::Post)), Outcome::Proceed);
        assert_eq!(kv::get(&pre_sent_key("notify")), None);

        let sent = testing::sent_requests();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].method, "POST");
        assert_eq!(sent[0].url, "https://hooks.example/ferry?token=secret");
        assert_eq!(sent[0].header("x-team"), Some("storage"));
        assert_eq!(
            sent[0].header("content-type"),
            Some("application/vnd.ferry+json")
        );
        assert_eq!(
            sent[0]
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("content-type"))
                .count(),
            1
        );
        let pre = json(std::str::from_utf8(&sent[0].body).unwrap());
        assert_eq!(pre["sent_at_ms"], 1000);
        assert!(pre.get("pre_sent_at_ms").is_none());
        let post = json(std::str::from_utf8(&sent[1].body).unwrap());
        assert_eq!(
            (post["sent_at_ms"].as_u64(), post["pre_sent_at_ms"].as_u64()),
            (Some(5000), Some(1000))
        );

        let logs = testing::logs();
        assert_eq!(logs.len(), 2);
        assert_eq!(
            logs[0].1,
            "webhook: POST https://hooks.example/ferry for plan `erp` step `notify` (planned-failover pre): HTTP 204"
        );
    }

    #[test]
    fn failures_follow_on_failure() {
        testing::reset();
        testing::set_config("url", "https://h/");
        testing::set_config("on-failure", "skip");
        // No handler: the native http stand-in refuses like a host without the grant.
        let o = Webhook::run(&context(Phase::Pre));
        assert!(
            matches!(&o, Outcome::Skip(m) if m.starts_with("webhook: POST https://h/ failed: denied")),
            "{o:?}"
        );
        assert_eq!(kv::get(&pre_sent_key("notify")), None);

        testing::set_config("on-failure", "abort");
        testing::set_http_handler(|_| {
            Ok(Response::new(
                200,
                r#"{"outcome":"abort","message":"freeze"}"#,
            ))
        });
        assert_eq!(
            Webhook::run(&context(Phase::Pre)),
            Outcome::abort("webhook https://h/: freeze")
        );
    }
}
