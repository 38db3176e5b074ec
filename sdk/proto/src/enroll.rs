//! Enrollment: how an agent gets its identity.
//!
//! The operator creates a one-time enrollment token for an agent name (and the protected items
//! it may act for) with a time to live; `ferry agent token create` prints the whole command
//! line. The agent generates its private key (it never leaves the machine), sends a PKCS#10
//! certificate signing request with the token to `POST /api/v1/enroll` over TLS it verified
//! against the CA fingerprint it was given, and receives a client certificate signed by the
//! appliance CA. From then on it speaks mTLS with that certificate; the token is spent.

use serde::{Deserialize, Serialize};

/// The path of the enrollment endpoint.
pub const ENROLL_PATH: &str = "/api/v1/enroll";
/// The agent's own record, over mTLS.
pub const AGENT_PATH: &str = "/api/v1/agent";
/// The agent's protected items, over mTLS.
pub const AGENT_ITEMS_PATH: &str = "/api/v1/agent/items";
/// Where an agent reports it is alive (and its host name and version), over mTLS.
pub const HEARTBEAT_PATH: &str = "/api/v1/agent/heartbeat";

/// The replication plan of one of the agent's items, over mTLS: `{AGENT_ITEMS_PATH}/{item}` +
/// this suffix ([`replication_path`]). Answer: [`ReplicationPlan`].
pub const REPLICATION_PLAN_SUFFIX: &str = "/replication";

/// `GET /api/v1/agent/items/{item}/replication`.
pub fn replication_path(item: &str) -> String {
    format!("{AGENT_ITEMS_PATH}/{item}{REPLICATION_PLAN_SUFFIX}")
}

/// Longest PEM CSR accepted.
pub const MAX_CSR_BYTES: usize = 16 << 10;

/// `POST /api/v1/enroll` body. Its `Debug` shows no token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The one-time enrollment token, as `ferry agent token create` printed it.
    pub token: String,
    /// PEM `CERTIFICATE REQUEST` signed by the agent's new key. Its subject is ignored: the
    /// certificate names the agent the token was made for.
    pub csr: String,
    /// The machine's host name, for the operator's listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("token", &"<redacted>")
            .field("csr", &self.csr)
            .field("hostname", &self.hostname)
            .field("agent_version", &self.agent_version)
            .finish()
    }
}

/// `POST /api/v1/enroll` answer (201).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The agent's name (the certificate's common name).
    pub agent: String,
    /// The client certificate, PEM.
    pub certificate: String,
    /// The appliance CA, PEM: the only root the agent trusts from now on.
    pub ca: String,
    /// SHA-256 fingerprint of the client certificate (`AB:CD:…`).
    pub certificate_sha256: String,
    /// When the certificate expires, RFC 3339.
    pub certificate_expires: String,
    /// The protected items this agent acts for.
    pub items: Vec<String>,
}

/// `POST /api/v1/agent/heartbeat` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The machine's host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}

/// What an agent needs to replicate one item: where to send, how often, and the policy's
/// rules. `GET /api/v1/agent/items/{item}/replication` (mTLS) answers it. Unknown members are
/// ignored (a newer gateway may add some).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationPlan {
    /// The protected item.
    pub item: String,
    /// The gateway's data port (`docs/agent-protocol.md` §2) on the same host as its API;
    /// `None` when this appliance does not have the process role.
    pub data_port: Option<u16>,
    /// The operator paused replication of the item (`ferry item pause`): the agent sends
    /// nothing and asks again on its cycle interval.
    pub paused: bool,
    /// The operator asked for a resync (`ferry item resync`): the next cycle of every disk is
    /// a resync (`CycleKind::Resync`).
    pub resync_requested: bool,
    /// A cycle starts this often, seconds (the policy's).
    pub cycle_interval_seconds: u32,
    /// Every this many minutes a cycle is app-consistent (0: never).
    pub app_consistent_frequency_minutes: u32,
    /// Delays between retries after a transient error, seconds; the last repeats.
    pub retry_schedule_seconds: Vec<u32>,
    /// Changes pending above this share of a disk's size force a resync (1–100).
    pub resync_threshold_percent: u32,
    /// The item's disks.
    pub disks: Vec<PlanDisk>,
    /// The policy's off-hours window for resyncs the agent decides itself (tracking lost or
    /// damaged, changed geometry, changes over `resync_threshold_percent`): outside it such a
    /// resync waits, in the agent's local time. A resync the operator asked for
    /// (`resync_requested`) starts at once. Absent: a resync starts whenever it is needed.
    /// Added after the first plans: absent when the policy has none, and an older agent
    /// ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_window: Option<ResyncWindow>,
    /// A planned failover (its job id) waits for this item's final cycle: the agent makes the
    /// next cycle of each disk the final one — application-consistent when the disk has
    /// application scripts — tagged `ferry.final_cycle` = the job id, then runs its
    /// `[failover] stop_command` once every disk of the item has sent it, and sends nothing
    /// more for the item. Added after the first plans: absent otherwise, and an older agent
    /// ignores it (the planned failover then waits until its timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_cycle: Option<String>,
}

/// A policy's resync window, as the gateway checked it: `from`–`to` (`HH:MM`, local time of
/// the agent; `to` before `from` wraps past midnight, the part after midnight belonging to
/// the day the window started) on `days` (`mon` … `sun`; absent: every day). The same rules
/// as the agent's `[[replication.throttle]]` windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncWindow {
    /// Start, `HH:MM` (included).
    pub from: String,
    /// End, `HH:MM` (excluded); before `from`: the next day.
    pub to: String,
    /// The days the window starts on; absent: every day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<Vec<String>>,
}

/// One disk of a [`ReplicationPlan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanDisk {
    /// The disk's name in the item (the `Hello`'s `disk`).
    pub name: String,
    /// Its size as the operator declared it, bytes.
    pub size_bytes: u64,
    /// The chunk size to send it with (the `Hello`'s `chunk_size`): the one it was first
    /// replicated with, else the policy's.
    pub chunk_size: u32,
    /// The newest cycle the gateway holds complete (its `EndOfCycle` durable), if any.
    pub last_complete_cycle: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_refuse_unknown_members_and_answers_do_not() {
        let r: Result<EnrollRequest, _> =
            serde_json::from_str(r#"{"token":"t","csr":"c","admin":true}"#);
        assert!(r.unwrap_err().to_string().contains("unknown field `admin`"));
        let r: EnrollRequest = serde_json::from_str(r#"{"token":"t","csr":"c"}"#).unwrap();
        assert_eq!(r.hostname, None);
        let a: EnrollResponse = serde_json::from_str(
            r#"{"agent":"a","certificate":"c","ca":"ca","certificate_sha256":"AB",
                "certificate_expires":"2027-01-01T00:00:00Z","items":["x"],"later":1}"#,
        )
        .unwrap();
        assert_eq!(a.items, ["x"]);
    }

    /// The resync window is an optional member: a plan without it reads (older gateways) and
    /// is written without it, one with it round-trips.
    #[test]
    fn plans_carry_an_optional_resync_window() {
        let old = r#"{"item":"web","data_port":9443,"paused":false,"resync_requested":false,
            "cycle_interval_seconds":300,"app_consistent_frequency_minutes":0,
            "retry_schedule_seconds":[60],"resync_threshold_percent":50,"disks":[]}"#;
        let p: ReplicationPlan = serde_json::from_str(old).unwrap();
        assert_eq!(p.resync_window, None);
        assert!(!serde_json::to_string(&p).unwrap().contains("resync_window"));
        let with = ReplicationPlan {
            resync_window: Some(ResyncWindow {
                from: "22:00".into(),
                to: "06:00".into(),
                days: Some(vec!["fri".into()]),
            }),
            ..p
        };
        let j = serde_json::to_string(&with).unwrap();
        assert!(
            j.ends_with(r#""resync_window":{"from":"22:00","to":"06:00","days":["fri"]}}"#),
            "{j}"
        );
        assert_eq!(serde_json::from_str::<ReplicationPlan>(&j).unwrap(), with);
    }

    #[test]
    fn the_token_is_not_in_debug() {
        let r = EnrollRequest {
            token: "s3cr3t-token".into(),
            csr: "c".into(),
            hostname: Some("h".into()),
            agent_version: None,
        };
        let d = format!("{r:?}");
        assert!(!d.contains("s3cr3t"), "{d}");
        assert!(
            d.contains("<redacted>") && d.contains("hostname: Some(\"h\")"),
            "{d}"
        );
    }
}
