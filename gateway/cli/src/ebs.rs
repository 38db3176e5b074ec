//! `ferry vault import --source ebs`: which snapshot, which endpoint, whose credentials.
//!
//! The `aws` adapter reads the snapshot through the EBS direct APIs, but it never sees the
//! operator's credentials: they are read here (the standard AWS environment variables, or the
//! shared credentials file) and handed to the plugin host, which signs each request the plugin
//! sends (SigV4). Errors name the variable or file that is missing, never a secret's value.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ferry_plugin_host::{BytesSource, SigV4};

/// An EBS snapshot and how to reach it.
#[derive(Debug)]
pub struct EbsSource {
    pub snapshot: String,
    pub endpoint: String,
    pub signer: SigV4,
}

/// What the command line said.
#[derive(Debug, Default)]
pub struct EbsArgs {
    pub snapshot: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

impl EbsSource {
    /// Resolve the endpoint (`--endpoint`, `AWS_ENDPOINT_URL_EBS`, `AWS_ENDPOINT_URL`, else
    /// `https://ebs.REGION.amazonaws.com`), the region (`--region`, `AWS_REGION`,
    /// `AWS_DEFAULT_REGION`) and the credentials (`AWS_ACCESS_KEY_ID` /
    /// `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, else the `AWS_PROFILE` (or `default`)
    /// profile of `AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`).
    pub fn resolve(args: EbsArgs) -> Result<EbsSource> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let region = args
            .region
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .context("no AWS region: pass --region or set AWS_REGION")?;
        let endpoint = args
            .endpoint
            .or_else(|| env("AWS_ENDPOINT_URL_EBS"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .unwrap_or_else(|| format!("https://ebs.{region}.amazonaws.com"));
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let (key, secret, token) = match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(k), Some(s)) => (k, s, env("AWS_SESSION_TOKEN")),
            (Some(_), None) => bail!("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"),
            _ => shared_credentials()?,
        };
        let signer = SigV4::new(key, secret, token, region, "ebs")?;
        let source = EbsSource {
            snapshot: args.snapshot,
            endpoint,
            signer,
        };
        source.allow_host()?;
        Ok(source)
    }

    /// The `host[:port]` the plugin's HTTP grant allows: the endpoint's, nothing else.
    pub fn allow_host(&self) -> Result<String> {
        let url = reqwest::Url::parse(&self.endpoint)
            .with_context(|| format!("EBS endpoint `{}` is not a URL", self.endpoint))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            bail!(
                "EBS endpoint `{}` must be an http(s) URL with a host",
                self.endpoint
            );
        }
        if !url.username().is_empty() || url.password().is_some() {
            bail!("EBS endpoint must not carry credentials in the URL");
        }
        let host = url.host_str().unwrap_or_default();
        Ok(match url.port_or_known_default() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        })
    }

    /// The object the adapter opens: a JSON reference to the snapshot.
    pub fn reference(&self) -> BytesSource {
        let doc = serde_json::json!({ "SnapshotId": self.snapshot }).to_string();
        BytesSource::new(format!("{}.ebs", self.snapshot), doc.into_bytes())
    }
}

/// The change document for an incremental from `base`: `ListChangedBlocks` between the two.
pub fn changes_since(base: &str) -> Vec<u8> {
    serde_json::json!({ "FirstSnapshotId": base })
        .to_string()
        .into_bytes()
}

/// `(key, secret, token)` of the profile in the shared credentials file.
fn shared_credentials() -> Result<(String, String, Option<String>)> {
    let path = match std::env::var_os("AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".aws/credentials"),
            None => bail!(
                "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_SHARED_CREDENTIALS_FILE"
            ),
        },
    };
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no AWS credentials: AWS_ACCESS_KEY_ID is not set and `{}` cannot be read",
            path.display()
        )
    })?;
    let mut in_profile = false;
    let (mut key, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = name.trim() == profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_string();
            match k.trim() {
                "aws_access_key_id" => key = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    match (key, secret) {
        (Some(k), Some(s)) => Ok((k, s, token)),
        _ => bail!(
            "profile `{profile}` of `{}` has no aws_access_key_id and aws_secret_access_key",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(endpoint: &str) -> EbsSource {
        EbsSource {
            snapshot: "snap-1".into(),
            endpoint: endpoint.into(),
            signer: SigV4::new("AKID", "secret", None, "us-east-1", "ebs").unwrap(),
        }
    }

    #[test]
    fn allow_host_is_the_endpoint_host_and_port() {
        assert_eq!(
            source("https://ebs.us-east-1.amazonaws.com")
                .allow_host()
                .unwrap(),
            "ebs.us-east-1.amazonaws.com:443"
        );
        assert_eq!(
            source("http://127.0.0.1:5000").allow_host().unwrap(),
            "127.0.0.1:5000"
        );
        assert!(source("ftp://x").allow_host().is_err());
        let e = source("http://user:pw@x/").allow_host().unwrap_err();
        assert!(!e.to_string().contains("pw"), "{e}");
    }

    #[test]
    fn reference_document() {
        let r = source("http://x").reference();
        use ferry_plugin_host::SourceObject;
        assert_eq!(r.name(), "snap-1.ebs");
        let text = String::from_utf8(r.read_vec(0, 100).unwrap()).unwrap();
        assert_eq!(text, r#"{"SnapshotId":"snap-1"}"#);
        assert_eq!(
            String::from_utf8(changes_since("snap-0")).unwrap(),
            r#"{"FirstSnapshotId":"snap-0"}"#
        );
    }
}
