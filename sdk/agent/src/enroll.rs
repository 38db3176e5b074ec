//! `ferry-agent enroll`: turns a one-time enrollment token into the agent's lasting identity.
//!
//! In order: the state directory is checked first (an existing enrollment is refused without
//! `--force`, and the directory must be writable), so the token is never spent on an
//! enrollment that cannot be saved; a fresh ECDSA P-256 key and a CSR named after the host are
//! made; the CSR and the token go to `POST /api/v1/enroll` over TLS that accepts only the CA
//! with the fingerprint given on the command line ([`ferry_proto::trust::PinnedCa`]); the
//! answer is checked ([`crate::identity::check_issued`]); only then is the state written.
//! A failure anywhere leaves the state directory as it was. Disks given with
//! `--disk ITEM/DISK=PATH` are checked before the token is spent and recorded in `agent.toml`
//! with the enrollment, each only if the enrollment lists its item.
//!
//! The token is a secret: it lives in a [`Token`] (`Debug` redacted, wiped on drop), is sent
//! only in the request body, and no error or message ever contains it.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_proto::enroll::EnrollRequest;
use ferry_proto::trust::{Fingerprint, PinnedCa};
use time::format_description::well_known::Rfc3339;
use zeroize::{Zeroize, Zeroizing};

use crate::disks::{self, DiskConfig, ReplicationConfig};
use crate::error::AgentError;
use crate::gateway::{self, Gateway};
use crate::identity::{self, Identity};
use crate::state::{AgentFile, Enrollment, FORMAT_VERSION, Files, StateDir};

/// A one-time enrollment token. Its text is never shown: `Debug` redacts it, it is wiped from
/// memory when dropped, and [`Token::check`]'s errors do not contain it.
#[derive(Clone)]
pub struct Token(Zeroizing<String>);

impl Token {
    /// Longest token accepted.
    pub const MAX_LEN: usize = 4096;

    /// Takes the text as given. Infallible on purpose: a clap value parser that failed would
    /// print the value in its error; the checks are in [`Token::check`].
    pub fn from_arg(s: &str) -> Result<Self, std::convert::Infallible> {
        Ok(Self(Zeroizing::new(s.to_string())))
    }

    /// Checks the token's form: one line of printable ASCII, not empty, at most
    /// [`Self::MAX_LEN`] bytes. Surrounding whitespace is dropped.
    pub fn check(&self) -> Result<Self, AgentError> {
        let t = self.0.trim();
        if t.is_empty() {
            return Err(AgentError::Usage(
                "--token: the enrollment token is empty".into(),
            ));
        }
        if t.len() > Self::MAX_LEN {
            return Err(AgentError::Usage(format!(
                "--token: longer than {} bytes, not an enrollment token",
                Self::MAX_LEN
            )));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AgentError::Usage(
                "--token: an enrollment token is one word of printable ASCII characters".into(),
            ));
        }
        Ok(Self(Zeroizing::new(t.to_string())))
    }

    /// The token text, for the enrollment request body only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// What `ferry-agent enroll` was asked.
#[derive(Debug, Clone)]
pub struct EnrollArgs {
    /// The gateway's URL, `https://host:port`.
    pub gateway: String,
    /// The one-time enrollment token.
    pub token: Token,
    /// The appliance CA's fingerprint, as `ferryd up` printed it.
    pub ca_fingerprint: Fingerprint,
    /// The state directory.
    pub state_dir: PathBuf,
    /// Replace an existing enrollment.
    pub force: bool,
    /// Disks to record with the enrollment (`--disk ITEM/DISK=PATH`).
    pub disks: Vec<DiskConfig>,
}

/// A completed enrollment, for the report.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The agent's name.
    pub agent: String,
    /// The gateway's URL.
    pub gateway: String,
    /// The protected items the agent acts for.
    pub items: Vec<String>,
    /// The client certificate's fingerprint.
    pub certificate_sha256: Fingerprint,
    /// When it expires, RFC 3339.
    pub certificate_expires: String,
    /// Where the state was written.
    pub state_dir: PathBuf,
    /// The disks recorded (`item/disk`).
    pub disks: Vec<String>,
}

/// Runs the enrollment (see the module documentation).
pub async fn enroll(args: EnrollArgs) -> Result<Enrolled, AgentError> {
    let url = gateway::parse_base_url(&args.gateway)
        .map_err(|e| AgentError::Usage(format!("--gateway: {e}")))?;
    let token = args.token.check()?;
    disks::check_all(&args.disks).map_err(|e| AgentError::Usage(format!("--disk: {e}")))?;
    let state = StateDir::new(&args.state_dir);
    let pending = state.prepare(args.force)?;

    let hostname = crate::hostname();
    let id = Identity::generate()?;
    let csr = id.csr_pem(&hostname)?;
    let gw = Gateway::pinned(&url, Arc::new(PinnedCa::new(args.ca_fingerprint)))?;
    let mut req = EnrollRequest {
        token: token.expose().to_string(),
        csr,
        hostname: Some(hostname.clone()),
        agent_version: Some(crate::VERSION.to_string()),
    };
    let answer = gw.enroll(&req).await;
    req.token.zeroize();
    let resp = answer?;

    let issued = identity::check_issued(&resp, &id, args.ca_fingerprint)?;
    let enrolled = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default();
    let e = Enrollment {
        file: AgentFile {
            version: FORMAT_VERSION,
            gateway: gw.shown_url(),
            agent: issued.agent.clone(),
            enrolled,
            hostname,
            ca_sha256: issued.ca_sha256.to_string(),
            certificate_sha256: issued.certificate_sha256.to_string(),
            certificate_expires: issued.certificate_expires.clone(),
            files: Files::default(),
            items: Some(issued.items.clone()),
            disk: Vec::new(),
            replication: ReplicationConfig::default(),
            failover: crate::disks::FailoverConfig::default(),
        },
        key_pem: id.private_key_pem(),
        certificate_pem: issued.certificate_pem,
        ca_pem: issued.ca_pem,
    };
    // A disk of an item the enrollment does not list is not recorded; the enrollment itself
    // is good (the token is spent), so it is saved and the refusal reported after.
    let (listed, unlisted): (Vec<DiskConfig>, Vec<DiskConfig>) = args
        .disks
        .into_iter()
        .partition(|d| disks::check_item_listed(&e.file, &d.item).is_ok());
    let mut e = e;
    e.file.disk = listed;
    pending.commit(&e, args.force)?;
    if let Some(d) = unlisted.first() {
        let why = disks::check_item_listed(&e.file, &d.item).unwrap_err();
        let names: Vec<String> = unlisted.iter().map(DiskConfig::label).collect();
        return Err(AgentError::Usage(format!(
            "enrolled as agent `{}` and saved in {}, but --disk {} not recorded: {why}",
            issued.agent,
            args.state_dir.display(),
            names.join(", ")
        )));
    }
    Ok(Enrolled {
        agent: issued.agent,
        gateway: gw.shown_url(),
        items: issued.items,
        certificate_sha256: issued.certificate_sha256,
        certificate_expires: issued.certificate_expires,
        state_dir: args.state_dir,
        disks: e.file.disk.iter().map(DiskConfig::label).collect(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use ferry_proto::enroll::{ENROLL_PATH, EnrollResponse};

    use super::*;
    use crate::error::{EXIT_OTHER, EXIT_REFUSED, EXIT_STATE, EXIT_UNREACHABLE};
    use crate::state::{CA_FILE, CERT_FILE, CONFIG_FILE, KEY_FILE};
    use crate::testkit::{FakeGateway, TestCa};

    const SECRET: &str = "ferry-enroll-SeCrEt-7f3a9c";

    fn args(gw: &FakeGateway, fp: Fingerprint, dir: &Path) -> EnrollArgs {
        EnrollArgs {
            gateway: gw.url.clone(),
            token: Token::from_arg(SECRET).unwrap(),
            ca_fingerprint: fp,
            state_dir: dir.to_path_buf(),
            force: false,
            disks: Vec::new(),
        }
    }

    /// A fake gateway that enrolls anyone presenting [`SECRET`] as `web-01`.
    async fn gateway(ca: &Arc<TestCa>) -> FakeGateway {
        let signer = ca.clone();
        ca.serve(false, move |r| {
            let body = r.json();
            if r.method != "POST" || r.target != ENROLL_PATH {
                return (404, r#"{"code":"not_found","message":"no such route"}"#.into());
            }
            if body["token"] != SECRET {
                return (
                    403,
                    r#"{"code":"invalid_enrollment_token","message":"the enrollment token is unknown, spent or expired"}"#.into(),
                );
            }
            let resp: EnrollResponse =
                signer.answer("web-01", body["csr"].as_str().unwrap(), 365);
            (201, serde_json::to_string(&resp).unwrap())
        })
        .await
    }

    #[test]
    fn tokens_are_checked_and_never_shown() {
        let t = Token::from_arg(&format!("  {SECRET}\n")).unwrap();
        assert_eq!(t.check().unwrap().expose(), SECRET);
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        let a = EnrollArgs {
            gateway: "https://gw".into(),
            token: t,
            ca_fingerprint: Fingerprint([0; 32]),
            state_dir: "/x".into(),
            force: false,
            disks: Vec::new(),
        };
        assert!(!format!("{a:?}").contains(SECRET));
        for bad in [
            String::new(),
            " \n".into(),
            format!("{SECRET} {SECRET}"),
            format!("{SECRET}\u{e9}"),
            "x".repeat(Token::MAX_LEN + 1),
        ] {
            let e = Token::from_arg(&bad).unwrap().check().unwrap_err();
            let m = e.to_string();
            assert!(m.starts_with("--token: ") && !m.contains(SECRET), "{m}");
            assert_eq!(e.exit_code(), EXIT_OTHER);
        }
    }

    #[tokio::test]
    async fn enrolls_over_the_pinned_ca_and_saves_the_identity() {
        let ca = Arc::new(TestCa::new());
        let gw = gateway(&ca).await;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("state");
        let done = enroll(args(&gw, ca.fingerprint(), &dir)).await.unwrap();
        assert_eq!(done.agent, "web-01");
        assert_eq!(done.items, ["db", "web"]);
        assert_eq!(done.gateway, gw.url);

        // What the gateway received: the token, a CSR of the saved key, host name, version.
        let reqs = gw.requests();
        assert_eq!(reqs.len(), 1);
        let body = reqs[0].json();
        assert_eq!(body["token"], SECRET);
        assert_eq!(body["hostname"], crate::hostname());
        assert_eq!(body["agent_version"], crate::VERSION);
        assert_eq!(reqs[0].client_cert, None);
        let csr = rcgen::CertificateSigningRequestParams::from_pem(body["csr"].as_str().unwrap())
            .unwrap();

        let l = StateDir::new(&dir).load().unwrap();
        assert_eq!(l.file.agent, "web-01");
        assert_eq!(l.file.gateway, gw.url);
        assert_eq!(l.file.hostname, crate::hostname());
        assert_eq!(l.file.ca_sha256, ca.fingerprint().to_string());
        assert!(l.file.enrolled.ends_with('Z'), "{}", l.file.enrolled);
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join(KEY_FILE)).unwrap())
            .unwrap();
        assert_eq!(
            rcgen::PublicKeyData::der_bytes(&csr.public_key),
            key.public_key_raw()
        );
        // The token is stored nowhere.
        for f in [CONFIG_FILE, KEY_FILE, CERT_FILE, CA_FILE] {
            assert!(
                !std::fs::read_to_string(dir.join(f))
                    .unwrap()
                    .contains(SECRET)
            );
        }

        // A second enrollment is refused before the gateway is asked.
        let e = enroll(args(&gw, ca.fingerprint(), &dir)).await.unwrap_err();
        assert_eq!(e.exit_code(), EXIT_STATE, "{e}");
        assert_eq!(gw.requests().len(), 1);
        // With --force it replaces the identity.
        let mut a = args(&gw, ca.fingerprint(), &dir);
        a.force = true;
        enroll(a).await.unwrap();
        assert_eq!(gw.requests().len(), 2);
        assert_ne!(
            std::fs::read_to_string(dir.join(KEY_FILE)).unwrap(),
            key.serialize_pem()
        );
    }

    #[tokio::test]
    async fn a_wrong_fingerprint_is_refused_in_the_handshake_and_nothing_is_written() {
        let ca = Arc::new(TestCa::new());
        let gw = gateway(&ca).await;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("state");
        let other = TestCa::new().fingerprint();
        let e = enroll(args(&gw, other, &dir)).await.unwrap_err();
        let m = e.to_string();
        assert_eq!(e.exit_code(), EXIT_UNREACHABLE, "{m}");
        assert!(
            m.contains(&gw.url) && m.contains(&format!("TLS refused: no certificate the appliance presented has the fingerprint {other}")),
            "{m}"
        );
        assert!(!m.contains(SECRET));
        assert!(gw.requests().is_empty(), "the token was not sent");
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn a_refused_token_names_the_gateway_error_and_writes_nothing() {
        let ca = Arc::new(TestCa::new());
        let gw = gateway(&ca).await;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("state");
        let mut a = args(&gw, ca.fingerprint(), &dir);
        a.token = Token::from_arg("spent-token").unwrap();
        let e = enroll(a).await.unwrap_err();
        assert_eq!(e.exit_code(), EXIT_REFUSED);
        assert_eq!(
            e.to_string(),
            format!(
                "the gateway at {} refused POST /api/v1/enroll: the enrollment token is \
                 unknown, spent or expired (HTTP 403, code invalid_enrollment_token)",
                gw.url
            )
        );
        assert!(!e.to_string().contains("spent-token"));
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn a_bad_answer_writes_nothing() {
        let ca = Arc::new(TestCa::new());
        let stranger = Arc::new(TestCa::new());
        // The gateway answers with a certificate from another CA.
        let gw = ca
            .serve(false, move |r| {
                let resp = stranger.answer("web-01", r.json()["csr"].as_str().unwrap(), 30);
                (201, serde_json::to_string(&resp).unwrap())
            })
            .await;
        let t = tempfile::tempdir().unwrap();
        let e = enroll(args(&gw, ca.fingerprint(), t.path()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("nothing was saved"), "{e}");
        assert!(std::fs::read_dir(t.path()).unwrap().next().is_none());

        // Not JSON, or too large.
        let gw = ca.serve(false, |_| (201, "{".into())).await;
        let e = enroll(args(&gw, ca.fingerprint(), t.path()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not an enrollment answer"), "{e}");
        let gw = ca
            .serve(false, |_| {
                (201, format!("\"{}\"", "x".repeat(gateway::MAX_BODY)))
            })
            .await;
        let e = enroll(args(&gw, ca.fingerprint(), t.path()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        assert!(std::fs::read_dir(t.path()).unwrap().next().is_none());
    }

    #[tokio::test]
    async fn an_unreachable_gateway_is_exit_3() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let t = tempfile::tempdir().unwrap();
        let e = enroll(EnrollArgs {
            gateway: format!("https://127.0.0.1:{port}"),
            token: Token::from_arg(SECRET).unwrap(),
            ca_fingerprint: Fingerprint([1; 32]),
            state_dir: t.path().join("s"),
            force: false,
            disks: Vec::new(),
        })
        .await
        .unwrap_err();
        assert_eq!(e.exit_code(), EXIT_UNREACHABLE, "{e}");
        assert!(
            e.to_string().starts_with(&format!(
                "cannot reach the gateway at https://127.0.0.1:{port}: "
            )),
            "{e}"
        );
        assert!(!e.to_string().contains(SECRET));
        assert!(!t.path().join("s").exists());
    }

    #[tokio::test]
    async fn disks_are_recorded_with_the_enrollment_when_their_item_is_listed() {
        let ca = Arc::new(TestCa::new());
        let gw = gateway(&ca).await;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("state");

        // A malformed disk is refused before the token is spent.
        let mut a = args(&gw, ca.fingerprint(), &dir);
        a.disks = vec![DiskConfig::new("web", "sda", "relative/path")];
        let e = enroll(a).await.unwrap_err();
        assert!(e.to_string().starts_with("--disk: "), "{e}");
        assert!(gw.requests().is_empty());

        let mut a = args(&gw, ca.fingerprint(), &dir);
        a.disks = vec![
            disks::parse_disk_arg("web/sda=/dev/sda").unwrap(),
            disks::parse_disk_arg("db/data=/img/db.raw").unwrap(),
        ];
        let done = enroll(a).await.unwrap();
        assert_eq!(done.disks, ["web/sda", "db/data"]);
        let f = StateDir::new(&dir).read_config().unwrap();
        assert_eq!(
            f.items.as_deref(),
            Some(&["db".to_string(), "web".to_string()][..])
        );
        assert_eq!(f.disk.len(), 2);
        assert_eq!(f.disk[1].path, PathBuf::from("/img/db.raw"));

        // An item the enrollment does not list: the enrollment is saved, the disk is not.
        let mut a = args(&gw, ca.fingerprint(), &dir);
        a.force = true;
        a.disks = vec![
            disks::parse_disk_arg("web/sda=/dev/sda").unwrap(),
            disks::parse_disk_arg("mail/sda=/dev/sdc").unwrap(),
        ];
        let e = enroll(a).await.unwrap_err();
        assert_eq!(e.exit_code(), EXIT_OTHER);
        let m = e.to_string();
        assert!(
            m.contains("saved in")
                && m.contains("--disk mail/sda not recorded")
                && m.contains("does not list item `mail` (it lists: db, web)"),
            "{m}"
        );
        let f = StateDir::new(&dir).read_config().unwrap();
        assert_eq!(
            f.disk.iter().map(DiskConfig::label).collect::<Vec<_>>(),
            ["web/sda"]
        );
        StateDir::new(&dir).load().unwrap();
    }
}
