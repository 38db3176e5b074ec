//! Agents, their enrollment tokens, and replication groups in the catalog.
//!
//! Three tables:
//!
//! - `enrollment_tokens` (id → record): one-time tokens an operator makes for an agent name
//!   and the protected items it will act for. Only the SHA-256 of the secret is kept. A token
//!   is spent by the enrollment that uses it (in the transaction that records the agent), so
//!   it can never enroll twice; it also ends when it expires or is revoked.
//! - `agents` (name → record): an enrolled agent, the fingerprint, serial and expiry of the
//!   client certificate the appliance CA signed for it, the items it may act for, and whether
//!   it was revoked. The running appliance keeps the fingerprints of the active agents in
//!   memory (`crate::agents`), changed only after the catalog commit.
//! - `groups` (name → record): replication groups, items that are replicated and failed over
//!   together (Site Recovery's multi-VM consistency). An item is in at most one group.
//!
//! When an item is removed (its `disable` job ends) it is also taken out of every agent and
//! group naming it, in the same transaction (`forget_item_in`).
//!
//! Bounds: [`MAX_ENROLL_TOKENS`] token records (ended ones are dropped, oldest first, to make
//! room) of which [`MAX_ACTIVE_ENROLL_TOKENS`] usable; [`MAX_AGENTS`] agents;
//! [`MAX_GROUPS`] groups; [`MAX_MEMBERS`] items per agent, token or group.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::record::{parse, to_vec, version};
use super::{Catalog, CatalogError, Page, RECORD_VERSION, Result, items};

pub(super) const ENROLL_TOKENS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("enrollment_tokens");
pub(super) const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
pub(super) const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");

/// Enrollment token records kept (used, expired and revoked ones are dropped first).
pub const MAX_ENROLL_TOKENS: u64 = 10_000;
/// Enrollment tokens usable at once.
pub const MAX_ACTIVE_ENROLL_TOKENS: usize = 1000;
/// Agents kept (active and revoked).
pub const MAX_AGENTS: u64 = 10_000;
/// Replication groups kept.
pub const MAX_GROUPS: u64 = 1000;
/// Items an agent, an enrollment token or a group names.
pub const MAX_MEMBERS: usize = 256;
/// Shortest enrollment token life, seconds.
pub const MIN_TOKEN_TTL_SECS: u64 = 60;
/// Longest enrollment token life, seconds (30 days).
pub const MAX_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;
/// Longest group description.
pub const MAX_DESCRIPTION: usize = 1024;

/// Where an enrollment token stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollTokenState {
    /// Can enroll its agent.
    Active,
    /// Spent by an enrollment.
    Used,
    /// Past its expiry.
    Expired,
    /// Revoked by an operator.
    Revoked,
}

impl EnrollTokenState {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Used => "used",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }
}

/// A one-time enrollment token. Only the SHA-256 of its secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollToken {
    /// Id (sorts by creation time).
    pub id: String,
    /// The name the enrolled agent gets.
    pub agent: String,
    /// The protected items the agent may act for.
    pub items: Vec<String>,
    /// SHA-256 of the secret.
    pub sha256: [u8; 32],
    /// Creation, Unix milliseconds.
    pub created_ms: u64,
    /// Expiry, Unix milliseconds.
    pub expires_ms: u64,
    /// When an enrollment spent it.
    pub used_ms: Option<u64>,
    /// When it was revoked.
    pub revoked_ms: Option<u64>,
}

impl EnrollToken {
    /// Its state at `now_ms`.
    pub fn state(&self, now_ms: u64) -> EnrollTokenState {
        if self.used_ms.is_some() {
            EnrollTokenState::Used
        } else if self.revoked_ms.is_some() {
            EnrollTokenState::Revoked
        } else if now_ms >= self.expires_ms {
            EnrollTokenState::Expired
        } else {
            EnrollTokenState::Active
        }
    }
}

/// The client certificate issued to an agent, as the catalog keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// SHA-256 of the DER certificate.
    pub sha256: [u8; 32],
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Not after, Unix milliseconds.
    pub expires_ms: u64,
}

/// An enrolled agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// Name (the certificate's common name).
    pub name: String,
    /// The protected items it may act for.
    pub items: Vec<String>,
    /// Host name it reported.
    pub hostname: Option<String>,
    /// Version it reported.
    pub agent_version: Option<String>,
    /// Its client certificate.
    pub cert: CertInfo,
    /// Enrollment time, Unix milliseconds.
    pub enrolled_ms: u64,
    /// Last heartbeat.
    pub last_seen_ms: Option<u64>,
    /// When it was revoked (its certificate is refused from then on).
    pub revoked_ms: Option<u64>,
    /// Catalog-wide revision of the last write (also the ETag).
    pub revision: u64,
}

impl Agent {
    /// Whether its certificate is accepted.
    pub fn is_active(&self) -> bool {
        self.revoked_ms.is_none()
    }
}

/// A replication group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Name.
    pub name: String,
    /// What it is for.
    pub description: Option<String>,
    /// Its protected items.
    pub items: Vec<String>,
    /// Catalog-wide revision of the last write (also the ETag).
    pub revision: u64,
    /// Creation, Unix milliseconds.
    pub created_ms: u64,
    /// Last change, Unix milliseconds.
    pub updated_ms: u64,
}

/// A change to a group (`None`: unchanged).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupPatch {
    /// New description (`Some(None)` clears it).
    pub description: Option<Option<String>>,
    /// New members.
    pub items: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollTokenV1 {
    v: u8,
    id: String,
    agent: String,
    items: Vec<String>,
    sha256: String,
    created_ms: u64,
    expires_ms: u64,
    used_ms: Option<u64>,
    revoked_ms: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentV1 {
    v: u8,
    name: String,
    items: Vec<String>,
    hostname: Option<String>,
    agent_version: Option<String>,
    cert_sha256: String,
    cert_serial: String,
    cert_expires_ms: u64,
    enrolled_ms: u64,
    last_seen_ms: Option<u64>,
    revoked_ms: Option<u64>,
    revision: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupV1 {
    v: u8,
    name: String,
    description: Option<String>,
    items: Vec<String>,
    revision: u64,
    created_ms: u64,
    updated_ms: u64,
}

fn hash32(table: &'static str, key: &str, h: &str) -> Result<[u8; 32]> {
    hex::decode(h)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| CatalogError::BadRecord {
            table,
            key: key.to_string(),
            reason: "a SHA-256 is 64 hex digits".into(),
        })
}

fn key_mismatch(table: &'static str, key: &str) -> CatalogError {
    CatalogError::BadRecord {
        table,
        key: key.to_string(),
        reason: "the record's name is not its key".into(),
    }
}

/// Encodes an enrollment token record.
pub fn encode_enroll_token(t: &EnrollToken) -> Vec<u8> {
    to_vec(&EnrollTokenV1 {
        v: RECORD_VERSION,
        id: t.id.clone(),
        agent: t.agent.clone(),
        items: t.items.clone(),
        sha256: hex::encode(t.sha256),
        created_ms: t.created_ms,
        expires_ms: t.expires_ms,
        used_ms: t.used_ms,
        revoked_ms: t.revoked_ms,
    })
}

/// Decodes an enrollment token record stored under `key`.
pub fn decode_enroll_token(key: &str, b: &[u8]) -> Result<EnrollToken> {
    const T: &str = "enrollment_tokens";
    version(T, key, b)?;
    let r: EnrollTokenV1 = parse(T, key, b)?;
    if r.id != key {
        return Err(key_mismatch(T, key));
    }
    Ok(EnrollToken {
        sha256: hash32(T, key, &r.sha256)?,
        id: r.id,
        agent: r.agent,
        items: r.items,
        created_ms: r.created_ms,
        expires_ms: r.expires_ms,
        used_ms: r.used_ms,
        revoked_ms: r.revoked_ms,
    })
}

/// Encodes an agent record.
pub fn encode_agent(a: &Agent) -> Vec<u8> {
    to_vec(&AgentV1 {
        v: RECORD_VERSION,
        name: a.name.clone(),
        items: a.items.clone(),
        hostname: a.hostname.clone(),
        agent_version: a.agent_version.clone(),
        cert_sha256: hex::encode(a.cert.sha256),
        cert_serial: a.cert.serial.clone(),
        cert_expires_ms: a.cert.expires_ms,
        enrolled_ms: a.enrolled_ms,
        last_seen_ms: a.last_seen_ms,
        revoked_ms: a.revoked_ms,
        revision: a.revision,
    })
}

/// Decodes an agent record stored under `key`.
pub fn decode_agent(key: &str, b: &[u8]) -> Result<Agent> {
    const T: &str = "agents";
    version(T, key, b)?;
    let r: AgentV1 = parse(T, key, b)?;
    if r.name != key {
        return Err(key_mismatch(T, key));
    }
    Ok(Agent {
        cert: CertInfo {
            sha256: hash32(T, key, &r.cert_sha256)?,
            serial: r.cert_serial,
            expires_ms: r.cert_expires_ms,
        },
        name: r.name,
        items: r.items,
        hostname: r.hostname,
        agent_version: r.agent_version,
        enrolled_ms: r.enrolled_ms,
        last_seen_ms: r.last_seen_ms,
        revoked_ms: r.revoked_ms,
        revision: r.revision,
    })
}

/// Encodes a group record.
pub fn encode_group(g: &Group) -> Vec<u8> {
    to_vec(&GroupV1 {
        v: RECORD_VERSION,
        name: g.name.clone(),
        description: g.description.clone(),
        items: g.items.clone(),
        revision: g.revision,
        created_ms: g.created_ms,
        updated_ms: g.updated_ms,
    })
}

/// Decodes a group record stored under `key`.
pub fn decode_group(key: &str, b: &[u8]) -> Result<Group> {
    const T: &str = "groups";
    version(T, key, b)?;
    let r: GroupV1 = parse(T, key, b)?;
    if r.name != key {
        return Err(key_mismatch(T, key));
    }
    Ok(Group {
        name: r.name,
        description: r.description,
        items: r.items,
        revision: r.revision,
        created_ms: r.created_ms,
        updated_ms: r.updated_ms,
    })
}

/// Checks an agent or group name (the item naming rule).
pub fn check_name(what: &str, name: &str) -> Result<()> {
    crate::item::check_name(what, name).map_err(CatalogError::Invalid)
}

/// Checks a member list: at most [`MAX_MEMBERS`], valid names, no repeats.
fn check_members(what: &str, items: &[String]) -> Result<()> {
    if items.len() > MAX_MEMBERS {
        return Err(CatalogError::Invalid(format!(
            "{what} names at most {MAX_MEMBERS} items, not {}",
            items.len()
        )));
    }
    for (i, it) in items.iter().enumerate() {
        crate::item::check_name("item", it).map_err(CatalogError::Invalid)?;
        if items[..i].contains(it) {
            return Err(CatalogError::Invalid(format!(
                "{what} names item `{it}` twice"
            )));
        }
    }
    Ok(())
}

impl Catalog {
    /// Fails unless every one of `names` is a protected item (in write transaction `w`).
    fn items_exist(&self, w: &redb::WriteTransaction, names: &[String]) -> Result<()> {
        let t = w.open_table(items::ITEMS).map_err(|e| self.err(e))?;
        for n in names {
            if t.get(n.as_str()).map_err(|e| self.err(e))?.is_none() {
                return Err(CatalogError::Invalid(format!(
                    "no protected item `{n}` (only existing items can be named)"
                )));
            }
        }
        Ok(())
    }

    /// Takes removed item `name` out of every agent, enrollment token and group, in write
    /// transaction `w` (so that a later item of the same name is granted to nobody).
    pub(super) fn forget_item_in(&self, w: &redb::WriteTransaction, name: &str) -> Result<()> {
        {
            let mut t = w.open_table(ENROLL_TOKENS).map_err(|e| self.err(e))?;
            let mut changed = Vec::new();
            for entry in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = entry.map_err(|e| self.err(e))?;
                let mut x = decode_enroll_token(k.value(), v.value())?;
                if x.items.iter().any(|i| i == name) {
                    x.items.retain(|i| i != name);
                    changed.push(x);
                }
            }
            for x in changed {
                t.insert(x.id.as_str(), &encode_enroll_token(&x)[..])
                    .map_err(|e| self.err(e))?;
            }
        }
        for (table, def) in [("agents", AGENTS), ("groups", GROUPS)] {
            let mut t = w.open_table(def).map_err(|e| self.err(e))?;
            let mut changed = Vec::new();
            for entry in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = entry.map_err(|e| self.err(e))?;
                let key = k.value().to_string();
                if table == "agents" {
                    let mut a = decode_agent(&key, v.value())?;
                    if a.items.iter().any(|i| i == name) {
                        a.items.retain(|i| i != name);
                        changed.push((key, encode_agent(&a)));
                    }
                } else {
                    let mut g = decode_group(&key, v.value())?;
                    if g.items.iter().any(|i| i == name) {
                        g.items.retain(|i| i != name);
                        changed.push((key, encode_group(&g)));
                    }
                }
            }
            for (k, v) in changed {
                t.insert(k.as_str(), &v[..]).map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }

    // --- enrollment tokens -------------------------------------------------------------

    /// Adds enrollment token `tok`. Refuses an invalid agent name or item list, an item that
    /// does not exist, an agent name that is enrolled and active, and more than
    /// [`MAX_ACTIVE_ENROLL_TOKENS`] usable tokens; drops ended tokens, oldest first, when
    /// [`MAX_ENROLL_TOKENS`] records exist.
    pub fn insert_enroll_token(&self, tok: &EnrollToken, now_ms: u64) -> Result<()> {
        check_name("agent", &tok.agent)?;
        check_members("an enrollment token", &tok.items)?;
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        self.items_exist(&w, &tok.items)?;
        {
            let agents = w.open_table(AGENTS).map_err(|e| self.err(e))?;
            if let Some(v) = agents.get(tok.agent.as_str()).map_err(|e| self.err(e))?
                && decode_agent(&tok.agent, v.value())?.is_active()
            {
                return Err(CatalogError::AgentExists(tok.agent.clone()));
            }
        }
        {
            let mut t = w.open_table(ENROLL_TOKENS).map_err(|e| self.err(e))?;
            let mut active = 0usize;
            let mut ended = Vec::new();
            for entry in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = entry.map_err(|e| self.err(e))?;
                let x = decode_enroll_token(k.value(), v.value())?;
                if x.state(now_ms) == EnrollTokenState::Active {
                    active += 1;
                } else {
                    ended.push(x.id);
                }
            }
            if active >= MAX_ACTIVE_ENROLL_TOKENS {
                return Err(CatalogError::TooMany {
                    what: "usable enrollment tokens",
                    limit: MAX_ACTIVE_ENROLL_TOKENS as u64,
                });
            }
            let len = t.len().map_err(|e| self.err(e))?;
            if len >= MAX_ENROLL_TOKENS {
                let excess = usize::try_from(len - MAX_ENROLL_TOKENS + 1).unwrap_or(usize::MAX);
                for id in ended.iter().take(excess) {
                    t.remove(id.as_str()).map_err(|e| self.err(e))?;
                }
            }
            if t.get(tok.id.as_str()).map_err(|e| self.err(e))?.is_some() {
                return Err(self.err(format!("enrollment token id `{}` exists", tok.id)));
            }
            t.insert(tok.id.as_str(), &encode_enroll_token(tok)[..])
                .map_err(|e| self.err(e))?;
        }
        w.commit().map_err(|e| self.err(e))
    }

    /// (SHA-256, id) of every enrollment token record: the lookup `crate::agents` keeps in
    /// memory so that a presented token is found without a scan.
    pub fn enroll_token_hashes(&self) -> Result<Vec<([u8; 32], String)>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(ENROLL_TOKENS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let x = decode_enroll_token(k.value(), v.value())?;
            out.push((x.sha256, x.id));
        }
        Ok(out)
    }

    /// Enrollment tokens with ids after `after`, at most `limit`.
    pub fn enroll_tokens_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<EnrollToken>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(ENROLL_TOKENS).map_err(|e| self.err(e))?;
        self.page(&t, after, limit, decode_enroll_token, |x| &x.id)
    }

    /// Revokes enrollment token `id` (a token already ended is returned unchanged).
    pub fn revoke_enroll_token(&self, id: &str, now_ms: u64) -> Result<EnrollToken> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let tok = {
            let mut t = w.open_table(ENROLL_TOKENS).map_err(|e| self.err(e))?;
            let mut tok = match t.get(id).map_err(|e| self.err(e))? {
                Some(v) => decode_enroll_token(id, v.value())?,
                None => return Err(CatalogError::EnrollTokenNotFound(id.to_string())),
            };
            if tok.state(now_ms) != EnrollTokenState::Active {
                return Ok(tok);
            }
            tok.revoked_ms = Some(now_ms);
            t.insert(id, &encode_enroll_token(&tok)[..])
                .map_err(|e| self.err(e))?;
            tok
        };
        w.commit().map_err(|e| self.err(e))?;
        Ok(tok)
    }

    /// Enrolls the agent of the token whose secret hashes to `sha256`, in one transaction:
    /// the token must be active and its agent name free (never enrolled, or revoked);
    /// `sign` issues the certificate (and returns what the caller hands back, the PEM);
    /// the agent is recorded with the token's items that still exist, and the token is
    /// spent. Any refusal writes nothing.
    #[allow(
        clippy::too_many_arguments,
        reason = "the token, the agent's report and the signer, named at the call"
    )]
    pub fn enroll<T>(
        &self,
        id: &str,
        sha256: &[u8; 32],
        now_ms: u64,
        hostname: Option<String>,
        agent_version: Option<String>,
        sign: impl FnOnce(&EnrollToken) -> std::result::Result<(CertInfo, T), String>,
    ) -> Result<(Agent, T)> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let out = {
            let mut tokens = w.open_table(ENROLL_TOKENS).map_err(|e| self.err(e))?;
            let found = match tokens.get(id).map_err(|e| self.err(e))? {
                Some(v) => Some(decode_enroll_token(id, v.value())?),
                None => None,
            };
            let Some(mut tok) = found.filter(|x| bool::from(x.sha256.ct_eq(sha256))) else {
                return Err(CatalogError::EnrollRefused(EnrollRefusal::Unknown));
            };
            match tok.state(now_ms) {
                EnrollTokenState::Active => {}
                EnrollTokenState::Used => {
                    return Err(CatalogError::EnrollRefused(EnrollRefusal::Used));
                }
                EnrollTokenState::Expired => {
                    return Err(CatalogError::EnrollRefused(EnrollRefusal::Expired));
                }
                EnrollTokenState::Revoked => {
                    return Err(CatalogError::EnrollRefused(EnrollRefusal::Revoked));
                }
            }
            let agents = w.open_table(AGENTS).map_err(|e| self.err(e))?;
            let previous = match agents.get(tok.agent.as_str()).map_err(|e| self.err(e))? {
                Some(v) => Some(decode_agent(&tok.agent, v.value())?),
                None => None,
            };
            if previous.as_ref().is_some_and(Agent::is_active) {
                return Err(CatalogError::AgentExists(tok.agent.clone()));
            }
            if previous.is_none() && agents.len().map_err(|e| self.err(e))? >= MAX_AGENTS {
                return Err(CatalogError::TooMany {
                    what: "agents",
                    limit: MAX_AGENTS,
                });
            }
            let live_items = {
                let t = w.open_table(items::ITEMS).map_err(|e| self.err(e))?;
                let mut v = Vec::new();
                for i in &tok.items {
                    if t.get(i.as_str()).map_err(|e| self.err(e))?.is_some() {
                        v.push(i.clone());
                    }
                }
                v
            };
            let (cert, payload) = sign(&tok).map_err(CatalogError::Signing)?;
            let agent = Agent {
                name: tok.agent.clone(),
                items: live_items,
                hostname,
                agent_version,
                cert,
                enrolled_ms: now_ms,
                last_seen_ms: Some(now_ms),
                revoked_ms: None,
                revision: 0,
            };
            tok.used_ms = Some(now_ms);
            tokens
                .insert(tok.id.as_str(), &encode_enroll_token(&tok)[..])
                .map_err(|e| self.err(e))?;
            // Other usable tokens for the same name end here: none may re-enroll it later
            // (after a revocation) behind the operator's back.
            let mut others = Vec::new();
            for entry in tokens.iter().map_err(|e| self.err(e))? {
                let (k, v) = entry.map_err(|e| self.err(e))?;
                let x = decode_enroll_token(k.value(), v.value())?;
                if x.agent == tok.agent && x.state(now_ms) == EnrollTokenState::Active {
                    others.push(x);
                }
            }
            for mut x in others {
                x.revoked_ms = Some(now_ms);
                tokens
                    .insert(x.id.as_str(), &encode_enroll_token(&x)[..])
                    .map_err(|e| self.err(e))?;
            }
            drop(tokens);
            drop(agents);
            let agent = Agent {
                revision: self.next_revision(&w)?,
                ..agent
            };
            let mut agents = w.open_table(AGENTS).map_err(|e| self.err(e))?;
            agents
                .insert(agent.name.as_str(), &encode_agent(&agent)[..])
                .map_err(|e| self.err(e))?;
            (agent, payload)
        };
        w.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    // --- agents ----------------------------------------------------------------------

    /// One agent.
    pub fn agent(&self, name: &str) -> Result<Option<Agent>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(AGENTS).map_err(|e| self.err(e))?;
        let v = t.get(name).map_err(|e| self.err(e))?;
        v.map(|v| decode_agent(name, v.value())).transpose()
    }

    /// Agents named after `after`, at most `limit`.
    pub fn agents_page(&self, after: Option<&str>, limit: usize) -> Result<Page<Agent>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(AGENTS).map_err(|e| self.err(e))?;
        self.page(&t, after, limit, decode_agent, |x| &x.name)
    }

    /// Every active agent (at most [`MAX_AGENTS`]).
    pub fn active_agents(&self) -> Result<Vec<Agent>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(AGENTS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let a = decode_agent(k.value(), v.value())?;
            if a.is_active() {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// Reads agent `name` for a change in write transaction `w`, checking `expect`.
    fn agent_for_change(
        &self,
        w: &redb::WriteTransaction,
        name: &str,
        expect: Option<&[u64]>,
    ) -> Result<Agent> {
        let t = w.open_table(AGENTS).map_err(|e| self.err(e))?;
        let a = match t.get(name).map_err(|e| self.err(e))? {
            Some(v) => decode_agent(name, v.value())?,
            None => return Err(CatalogError::AgentNotFound(name.to_string())),
        };
        if let Some(revs) = expect
            && !revs.contains(&a.revision)
        {
            return Err(CatalogError::StaleRevision {
                what: "agent",
                name: name.to_string(),
                current: a.revision,
            });
        }
        Ok(a)
    }

    fn put_agent(&self, w: &redb::WriteTransaction, a: &Agent) -> Result<()> {
        let mut t = w.open_table(AGENTS).map_err(|e| self.err(e))?;
        t.insert(a.name.as_str(), &encode_agent(a)[..])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Sets the items agent `name` may act for (each must exist).
    pub fn set_agent_items(
        &self,
        name: &str,
        expect: Option<&[u64]>,
        items: Vec<String>,
    ) -> Result<Agent> {
        check_members("an agent", &items)?;
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut a = self.agent_for_change(&w, name, expect)?;
        self.items_exist(&w, &items)?;
        a.items = items;
        a.revision = self.next_revision(&w)?;
        self.put_agent(&w, &a)?;
        w.commit().map_err(|e| self.err(e))?;
        Ok(a)
    }

    /// Revokes agent `name` (a revoked agent is returned unchanged).
    pub fn revoke_agent(&self, name: &str, expect: Option<&[u64]>, now_ms: u64) -> Result<Agent> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut a = self.agent_for_change(&w, name, expect)?;
        if !a.is_active() {
            return Ok(a);
        }
        a.revoked_ms = Some(now_ms);
        a.revision = self.next_revision(&w)?;
        self.put_agent(&w, &a)?;
        w.commit().map_err(|e| self.err(e))?;
        Ok(a)
    }

    /// Records a heartbeat of active agent `name`.
    pub fn agent_heartbeat(
        &self,
        name: &str,
        cert_sha256: &[u8; 32],
        hostname: Option<String>,
        agent_version: Option<String>,
        now_ms: u64,
    ) -> Result<Agent> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut a = self.agent_for_change(&w, name, None)?;
        if !a.is_active() || a.cert.sha256 != *cert_sha256 {
            return Err(CatalogError::AgentNotFound(name.to_string()));
        }
        a.last_seen_ms = Some(now_ms);
        if hostname.is_some() {
            a.hostname = hostname;
        }
        if agent_version.is_some() {
            a.agent_version = agent_version;
        }
        self.put_agent(&w, &a)?;
        w.commit().map_err(|e| self.err(e))?;
        Ok(a)
    }

    // --- groups ----------------------------------------------------------------------

    /// One group.
    pub fn group(&self, name: &str) -> Result<Option<Group>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(GROUPS).map_err(|e| self.err(e))?;
        let v = t.get(name).map_err(|e| self.err(e))?;
        v.map(|v| decode_group(name, v.value())).transpose()
    }

    /// Groups named after `after`, at most `limit`.
    pub fn groups_page(&self, after: Option<&str>, limit: usize) -> Result<Page<Group>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(GROUPS).map_err(|e| self.err(e))?;
        self.page(&t, after, limit, decode_group, |x| &x.name)
    }

    /// Checks `items` for group `name`: each exists and is in no other group.
    fn check_group_items(
        &self,
        w: &redb::WriteTransaction,
        name: &str,
        items: &[String],
    ) -> Result<()> {
        check_members("a group", items)?;
        self.items_exist(w, items)?;
        let t = w.open_table(GROUPS).map_err(|e| self.err(e))?;
        for entry in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            if k.value() == name {
                continue;
            }
            let g = decode_group(k.value(), v.value())?;
            if let Some(i) = items.iter().find(|i| g.items.contains(i)) {
                return Err(CatalogError::ItemInGroup {
                    item: i.clone(),
                    group: g.name,
                });
            }
        }
        Ok(())
    }

    fn check_description(d: Option<&str>) -> Result<()> {
        if let Some(d) = d
            && (d.chars().count() > MAX_DESCRIPTION
                || d.chars().any(|c| c.is_control() && c != '\n'))
        {
            return Err(CatalogError::Invalid(format!(
                "a description is at most {MAX_DESCRIPTION} characters, without control characters but newlines"
            )));
        }
        Ok(())
    }

    /// Creates group `name`.
    pub fn create_group(
        &self,
        name: &str,
        description: Option<String>,
        items: Vec<String>,
        now_ms: u64,
    ) -> Result<Group> {
        check_name("group", name)?;
        Self::check_description(description.as_deref())?;
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let t = w.open_table(GROUPS).map_err(|e| self.err(e))?;
            if t.get(name).map_err(|e| self.err(e))?.is_some() {
                return Err(CatalogError::GroupExists(name.to_string()));
            }
            if t.len().map_err(|e| self.err(e))? >= MAX_GROUPS {
                return Err(CatalogError::TooMany {
                    what: "groups",
                    limit: MAX_GROUPS,
                });
            }
        }
        self.check_group_items(&w, name, &items)?;
        let g = Group {
            name: name.to_string(),
            description,
            items,
            revision: self.next_revision(&w)?,
            created_ms: now_ms,
            updated_ms: now_ms,
        };
        {
            let mut t = w.open_table(GROUPS).map_err(|e| self.err(e))?;
            t.insert(name, &encode_group(&g)[..])
                .map_err(|e| self.err(e))?;
        }
        w.commit().map_err(|e| self.err(e))?;
        Ok(g)
    }

    pub(super) fn group_for_change(
        &self,
        w: &redb::WriteTransaction,
        name: &str,
        expect: Option<&[u64]>,
    ) -> Result<Group> {
        let t = w.open_table(GROUPS).map_err(|e| self.err(e))?;
        let g = match t.get(name).map_err(|e| self.err(e))? {
            Some(v) => decode_group(name, v.value())?,
            None => return Err(CatalogError::GroupNotFound(name.to_string())),
        };
        if let Some(revs) = expect
            && !revs.contains(&g.revision)
        {
            return Err(CatalogError::StaleRevision {
                what: "group",
                name: name.to_string(),
                current: g.revision,
            });
        }
        Ok(g)
    }

    /// Changes group `name`.
    pub fn update_group(
        &self,
        name: &str,
        expect: Option<&[u64]>,
        patch: GroupPatch,
        now_ms: u64,
    ) -> Result<Group> {
        if let Some(d) = &patch.description {
            Self::check_description(d.as_deref())?;
        }
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut g = self.group_for_change(&w, name, expect)?;
        if let Some(items) = patch.items {
            self.check_group_items(&w, name, &items)?;
            g.items = items;
        }
        if let Some(d) = patch.description {
            g.description = d;
        }
        g.revision = self.next_revision(&w)?;
        g.updated_ms = now_ms;
        {
            let mut t = w.open_table(GROUPS).map_err(|e| self.err(e))?;
            t.insert(name, &encode_group(&g)[..])
                .map_err(|e| self.err(e))?;
        }
        w.commit().map_err(|e| self.err(e))?;
        Ok(g)
    }

    /// Deletes group `name` (its items stay protected).
    pub fn delete_group(&self, name: &str, expect: Option<&[u64]>) -> Result<Group> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let g = self.group_for_change(&w, name, expect)?;
        {
            let mut t = w.open_table(GROUPS).map_err(|e| self.err(e))?;
            t.remove(name).map_err(|e| self.err(e))?;
        }
        w.commit().map_err(|e| self.err(e))?;
        Ok(g)
    }
}

/// Why an enrollment token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollRefusal {
    /// No token has this secret.
    Unknown,
    /// The token was spent by an earlier enrollment.
    Used,
    /// The token is past its time to live.
    Expired,
    /// An operator revoked the token.
    Revoked,
}

impl std::fmt::Display for EnrollRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unknown => "the enrollment token is not one this appliance issued",
            Self::Used => {
                "the enrollment token was already used (each token enrolls once); create a new one"
            }
            Self::Expired => "the enrollment token has expired; create a new one",
            Self::Revoked => "the enrollment token was revoked; create a new one",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::Disk;

    fn catalog() -> (tempfile::TempDir, Catalog) {
        let d = tempfile::tempdir().unwrap();
        let (c, _) = Catalog::open(&d.path().join("c.redb")).unwrap();
        c.ensure_default_policy(1).unwrap();
        c.insert_vault(&super::super::VaultEntry {
            name: "v".into(),
            url: "/x".into(),
            created_ms: 1,
        })
        .unwrap();
        (d, c)
    }

    fn add_item(c: &Catalog, name: &str) {
        let disks = vec![Disk {
            name: "disk0".into(),
            size_bytes: 1 << 20,
        }];
        c.create_item(name, None, "v", "default", disks, 1).unwrap();
    }

    fn token(id: &str, agent: &str, items: &[&str], secret: &str, expires_ms: u64) -> EnrollToken {
        EnrollToken {
            id: id.into(),
            agent: agent.into(),
            items: items.iter().map(|s| s.to_string()).collect(),
            sha256: crate::auth::hash(secret),
            created_ms: 1,
            expires_ms,
            used_ms: None,
            revoked_ms: None,
        }
    }

    fn cert(b: u8) -> std::result::Result<(CertInfo, String), String> {
        Ok((
            CertInfo {
                sha256: [b; 32],
                serial: "01".into(),
                expires_ms: 9,
            },
            "PEM".into(),
        ))
    }

    #[test]
    fn enroll_spends_the_token_once_and_refusals_write_nothing() {
        let (_d, c) = catalog();
        add_item(&c, "web01");
        // Unknown items and bad names are refused at creation.
        let bad = token("t0", "a1", &["nope"], "s0", 1000);
        assert!(matches!(
            c.insert_enroll_token(&bad, 10),
            Err(CatalogError::Invalid(_))
        ));
        let bad = token("t0", "-bad", &[], "s0", 1000);
        assert!(matches!(
            c.insert_enroll_token(&bad, 10),
            Err(CatalogError::Invalid(_))
        ));
        c.insert_enroll_token(&token("t1", "a1", &["web01"], "s1", 1000), 10)
            .unwrap();
        c.insert_enroll_token(&token("t2", "a2", &[], "s2", 100), 10)
            .unwrap();
        let h = crate::auth::hash;
        // Unknown and expired.
        assert!(matches!(
            c.enroll("t9", &h("zz"), 20, None, None, |_| cert(1)),
            Err(CatalogError::EnrollRefused(EnrollRefusal::Unknown))
        ));
        assert!(matches!(
            c.enroll("t2", &h("s2"), 200, None, None, |_| cert(1)),
            Err(CatalogError::EnrollRefused(EnrollRefusal::Expired))
        ));
        // A signing failure writes nothing: the token still works after.
        assert!(matches!(
            c.enroll("t1", &h("s1"), 20, None, None, |_| Err::<
                (CertInfo, String),
                _,
            >(
                "no".into()
            )),
            Err(CatalogError::Signing(_))
        ));
        assert!(c.agent("a1").unwrap().is_none());
        // The right id with another secret is unknown.
        assert!(matches!(
            c.enroll("t1", &h("s2"), 20, None, None, |_| cert(1)),
            Err(CatalogError::EnrollRefused(EnrollRefusal::Unknown))
        ));
        // A second usable token for the same name ends with the enrollment.
        c.insert_enroll_token(&token("t1b", "a1", &[], "s1b", 1000), 10)
            .unwrap();
        let (a, pem) = c
            .enroll("t1", &h("s1"), 20, Some("host".into()), None, |t| {
                assert_eq!(t.agent, "a1");
                cert(7)
            })
            .unwrap();
        assert_eq!(pem, "PEM");
        assert_eq!(a.items, ["web01"]);
        assert_eq!(a.cert.sha256, [7; 32]);
        assert_eq!(c.agent("a1").unwrap().unwrap(), a);
        assert!(matches!(
            c.enroll("t1b", &h("s1b"), 20, None, None, |_| cert(2)),
            Err(CatalogError::EnrollRefused(EnrollRefusal::Revoked))
        ));
        // Reused.
        assert!(matches!(
            c.enroll("t1", &h("s1"), 21, None, None, |_| cert(8)),
            Err(CatalogError::EnrollRefused(EnrollRefusal::Used))
        ));
        // A second token for an active agent is refused; after revocation it is allowed and
        // the new enrollment replaces the record.
        assert!(matches!(
            c.insert_enroll_token(&token("t3", "a1", &[], "s3", 1000), 30),
            Err(CatalogError::AgentExists(_))
        ));
        c.revoke_agent("a1", None, 40).unwrap();
        assert!(c.active_agents().unwrap().is_empty());
        c.insert_enroll_token(&token("t3", "a1", &[], "s3", 1000), 50)
            .unwrap();
        let (a2, _) = c
            .enroll("t3", &h("s3"), 60, None, None, |_| cert(9))
            .unwrap();
        assert!(a2.is_active() && a2.items.is_empty() && a2.cert.sha256 == [9; 32]);
        // Revoked tokens are refused.
        c.insert_enroll_token(&token("t4", "a4", &[], "s4", 1000), 60)
            .unwrap();
        c.revoke_enroll_token("t4", 61).unwrap();
        assert!(matches!(
            c.enroll("t4", &h("s4"), 62, None, None, |_| cert(1)),
            Err(CatalogError::EnrollRefused(EnrollRefusal::Revoked))
        ));
        let page = c.enroll_tokens_page(None, 10).unwrap();
        let states: Vec<_> = page.items.iter().map(|t| t.state(200).as_str()).collect();
        assert_eq!(states, ["used", "revoked", "expired", "used", "revoked"]);
    }

    #[test]
    fn groups_hold_existing_items_once_and_removed_items_leave_them() {
        let (_d, c) = catalog();
        add_item(&c, "db01");
        add_item(&c, "web01");
        let g = c
            .create_group("tier1", Some("web + db".into()), vec!["db01".into()], 5)
            .unwrap();
        assert!(matches!(
            c.create_group("tier1", None, vec![], 6),
            Err(CatalogError::GroupExists(_))
        ));
        assert!(matches!(
            c.create_group("other", None, vec!["db01".into()], 6),
            Err(CatalogError::ItemInGroup { .. })
        ));
        assert!(matches!(
            c.create_group("other", None, vec!["ghost".into()], 6),
            Err(CatalogError::Invalid(_))
        ));
        assert!(matches!(
            c.create_group("other", None, vec!["web01".into(), "web01".into()], 6),
            Err(CatalogError::Invalid(_))
        ));
        assert!(matches!(
            c.update_group("tier1", Some(&[g.revision + 100]), GroupPatch::default(), 7),
            Err(CatalogError::StaleRevision { .. })
        ));
        let g2 = c
            .update_group(
                "tier1",
                Some(&[g.revision]),
                GroupPatch {
                    items: Some(vec!["db01".into(), "web01".into()]),
                    description: Some(None),
                },
                7,
            )
            .unwrap();
        assert_eq!(g2.items, ["db01", "web01"]);
        assert_eq!(g2.description, None);
        assert!(g2.revision > g.revision);
        // An agent acting for web01; removing web01 takes it out of both.
        c.insert_enroll_token(&token("t1", "a1", &["web01"], "s1", 1000), 10)
            .unwrap();
        c.enroll("t1", &crate::auth::hash("s1"), 20, None, None, |_| cert(1))
            .unwrap();
        let w = c.db.begin_write().unwrap();
        c.forget_item_in(&w, "web01").unwrap();
        w.commit().unwrap();
        assert_eq!(c.group("tier1").unwrap().unwrap().items, ["db01"]);
        assert!(c.agent("a1").unwrap().unwrap().items.is_empty());
        c.delete_group("tier1", None).unwrap();
        assert!(c.group("tier1").unwrap().is_none());
    }

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/catalog-v1");

    fn v1_enroll_token() -> EnrollToken {
        EnrollToken {
            id: "20261126T180000.000Z-5eed5eed".into(),
            agent: "web-01-agent".into(),
            items: vec!["web-01".into()],
            sha256: [0x5e; 32],
            created_ms: 1_795_716_000_000,
            expires_ms: 1_795_719_600_000,
            used_ms: Some(1_795_716_060_000),
            revoked_ms: None,
        }
    }
    fn v1_agent() -> Agent {
        Agent {
            name: "web-01-agent".into(),
            items: vec!["web-01".into()],
            hostname: Some("web-01.example.net".into()),
            agent_version: Some("0.1.0".into()),
            cert: CertInfo {
                sha256: [0xce; 32],
                serial: "0102030405060708090a0b0c0d0e0f10".into(),
                expires_ms: 1_827_252_060_000,
            },
            enrolled_ms: 1_795_716_060_000,
            last_seen_ms: Some(1_795_716_120_000),
            revoked_ms: None,
            revision: 12,
        }
    }
    fn v1_group() -> Group {
        Group {
            name: "tier-1".into(),
            description: Some("web and database, failed over together".into()),
            items: vec!["db-01".into(), "web-01".into()],
            revision: 13,
            created_ms: 1_795_716_200_000,
            updated_ms: 1_795_716_300_000,
        }
    }

    /// Writes the missing fixtures of these records, by hand
    /// (`cargo test -p ferry-daemon -- --ignored write_v1_agent_fixtures`); existing ones are
    /// frozen.
    #[test]
    #[ignore = "writes the committed fixtures"]
    fn write_v1_agent_fixtures() {
        let dir = std::path::Path::new(FIXTURES);
        for (n, b) in [
            (
                "enrollment-token.json",
                encode_enroll_token(&v1_enroll_token()),
            ),
            ("agent.json", encode_agent(&v1_agent())),
            ("group.json", encode_group(&v1_group())),
        ] {
            let p = dir.join(n);
            if !p.exists() {
                std::fs::write(p, b).unwrap();
            }
        }
    }

    #[test]
    fn v1_agent_records_decode() {
        let read = |n: &str| std::fs::read(std::path::Path::new(FIXTURES).join(n)).unwrap();
        let t = v1_enroll_token();
        assert_eq!(
            decode_enroll_token(&t.id, &read("enrollment-token.json")).unwrap(),
            t
        );
        assert_eq!(
            decode_agent("web-01-agent", &read("agent.json")).unwrap(),
            v1_agent()
        );
        assert_eq!(
            decode_group("tier-1", &read("group.json")).unwrap(),
            v1_group()
        );
        assert_eq!(encode_enroll_token(&t), read("enrollment-token.json"));
        assert_eq!(encode_agent(&v1_agent()), read("agent.json"));
        assert_eq!(encode_group(&v1_group()), read("group.json"));
        // Damage is refused, naming table and key.
        let e = decode_agent("other", &read("agent.json")).unwrap_err();
        assert!(e.to_string().contains("agents/other"), "{e}");
        let mut v: serde_json::Value = serde_json::from_slice(&read("agent.json")).unwrap();
        v["cert_sha256"] = "abc".into();
        let e = decode_agent("web-01-agent", v.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("64 hex digits"), "{e}");
        v["v"] = 2.into();
        assert!(matches!(
            decode_agent("web-01-agent", v.to_string().as_bytes()),
            Err(CatalogError::NewerRecord { .. })
        ));
        let mut v: serde_json::Value = serde_json::from_slice(&read("group.json")).unwrap();
        v["members"] = serde_json::json!([]);
        assert!(decode_group("tier-1", v.to_string().as_bytes()).is_err());
    }

    #[test]
    fn records_round_trip() {
        let t = token("20261126T101112.123Z-0a1b2c3d", "a", &["x"], "s", 5);
        assert_eq!(
            decode_enroll_token(&t.id, &encode_enroll_token(&t)).unwrap(),
            t
        );
        assert!(decode_enroll_token("other", &encode_enroll_token(&t)).is_err());
    }
}
