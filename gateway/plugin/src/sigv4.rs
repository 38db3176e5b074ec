//! AWS Signature Version 4 for requests a plugin sends through the host's `http` import.
//!
//! An adapter that reads from an AWS API (the EBS direct APIs) must not hold the operator's
//! credentials: a plugin is untrusted code. So the operator gives the credentials to the host,
//! which binds them to one plugin ([`crate::LoadedPlugin::with_http_signer`]) and signs each of
//! that plugin's requests just before sending it. The plugin sees neither the keys nor the
//! signature, and may not set the headers the signature covers for it.
//!
//! The algorithm follows the AWS reference ("Create a signed AWS API request"): canonical
//! request, string to sign, HMAC-SHA256 key derivation from the date, region and service.
//! The unit tests check it against AWS's published examples.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::error::PluginError;

/// Headers the signer sets; a plugin whose requests are signed may not set them.
pub const SIGNED_BY_HOST: &[&str] = &[
    "authorization",
    "x-amz-date",
    "x-amz-security-token",
    "x-amz-content-sha256",
];

/// Credentials and scope for SigV4. `Debug` never prints the secret or the session token.
#[derive(Clone)]
pub struct SigV4 {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    region: String,
    service: String,
}

impl fmt::Debug for SigV4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigV4")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("region", &self.region)
            .field("service", &self.service)
            .finish()
    }
}

impl SigV4 {
    /// Signer for `service` (for example `ebs`) in `region`.
    ///
    /// # Errors
    /// [`PluginError::Host`] naming the field that is empty or malformed (never its value
    /// when it is a secret).
    pub fn new(
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        session_token: Option<String>,
        region: impl Into<String>,
        service: impl Into<String>,
    ) -> Result<SigV4, PluginError> {
        let s = SigV4 {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: session_token.filter(|t| !t.is_empty()),
            region: region.into(),
            service: service.into(),
        };
        let bad = |what: &str| PluginError::Host(format!("SigV4 credentials: {what}"));
        let token_ok = |v: &str| {
            !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !token_ok(&s.access_key_id) {
            return Err(bad(
                "the access key id is empty or not made of letters and digits",
            ));
        }
        if s.secret_access_key.is_empty()
            || s.secret_access_key
                .bytes()
                .any(|b| b.is_ascii_control() || b == b' ')
        {
            return Err(bad(
                "the secret access key is empty or contains spaces or control characters",
            ));
        }
        if s.session_token
            .as_ref()
            .is_some_and(|t| t.bytes().any(|b| b.is_ascii_control()))
        {
            return Err(bad("the session token contains control characters"));
        }
        if !token_ok(&s.region) {
            return Err(bad(&format!("region {:?} is not a region name", s.region)));
        }
        if !token_ok(&s.service) {
            return Err(bad(&format!(
                "service {:?} is not a service name",
                s.service
            )));
        }
        Ok(s)
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// Add `host`, `x-amz-date`, `x-amz-security-token` (with temporary credentials) and
    /// `authorization` to `headers` for a request of `method` to `url` with `body`, at `now`.
    /// Every header in `headers` is signed.
    pub fn sign(
        &self,
        method: &str,
        url: &reqwest::Url,
        headers: &mut Vec<(String, String)>,
        body: &[u8],
        now: SystemTime,
    ) {
        let amz_date = amz_date(now);
        let date = &amz_date[..8];
        headers.retain(|(k, _)| !k.eq_ignore_ascii_case("host"));
        headers.push(("host".into(), host_header(url)));
        headers.push(("x-amz-date".into(), amz_date.clone()));
        if let Some(token) = &self.session_token {
            headers.push(("x-amz-security-token".into(), token.clone()));
        }
        let (canonical, signed_headers) = canonical_request(method, url, headers, body);
        let scope = format!("{date}/{}/{}/aws4_request", self.region, self.service);
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let mut key = hmac(
            format!("AWS4{}", self.secret_access_key).as_bytes(),
            date.as_bytes(),
        );
        for part in [self.region.as_str(), self.service.as_str(), "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        let signature = hex::encode(hmac(&key, string_to_sign.as_bytes()));
        headers.push((
            "authorization".into(),
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
                self.access_key_id
            ),
        ));
        // `host` is set by the HTTP client from the URL, identically.
        headers.retain(|(k, _)| k != "host");
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        unreachable!("HMAC takes keys of any length")
    };
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// The `Host` header an HTTP client sends for `url`: the port only when it is not the
/// scheme's default.
pub fn host_header(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// The canonical request and the signed-headers list.
pub fn canonical_request(
    method: &str,
    url: &reqwest::Url,
    headers: &[(String, String)],
    body: &[u8],
) -> (String, String) {
    // Path: each segment of the (already percent-encoded) path encoded again, as AWS requires
    // for every service but S3.
    let path = url.path();
    let uri = if path.is_empty() {
        "/".to_string()
    } else {
        path.split('/')
            .map(uri_encode)
            .collect::<Vec<_>>()
            .join("/")
    };
    let mut query: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (uri_encode(&k), uri_encode(&v)))
        .collect();
    query.sort();
    let query = query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut canon: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        let k = k.to_ascii_lowercase();
        let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
        match canon.iter_mut().find(|(ck, _)| *ck == k) {
            Some((_, cv)) => {
                cv.push(',');
                cv.push_str(&v);
            }
            None => canon.push((k, v)),
        }
    }
    canon.sort();
    let signed = canon
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let header_block: String = canon.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let canonical = format!(
        "{}\n{uri}\n{query}\n{header_block}\n{signed}\n{}",
        method.to_ascii_uppercase(),
        hex::encode(Sha256::digest(body))
    );
    (canonical, signed)
}

/// Percent-encoding of SigV4: everything but `A-Z a-z 0-9 - _ . ~`, as `%XX` in upper case.
pub fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `YYYYMMDDTHHMMSSZ` (UTC) of `t`.
pub fn amz_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// 2015-08-30T12:36:00Z, the time of AWS's SigV4 test suite.
    fn suite_time() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_440_938_160)
    }

    fn suite_signer() -> SigV4 {
        SigV4::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
            "us-east-1",
            "service",
        )
        .unwrap()
    }

    fn authorization(headers: &[(String, String)]) -> &str {
        &headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .unwrap()
            .1
    }

    #[test]
    fn dates() {
        assert_eq!(amz_date(suite_time()), "20150830T123600Z");
        assert_eq!(amz_date(UNIX_EPOCH), "19700101T000000Z");
        // A leap day.
        assert_eq!(
            amz_date(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "20000229T000000Z"
        );
    }

    /// AWS SigV4 test suite, `get-vanilla`.
    #[test]
    fn get_vanilla() {
        let url = reqwest::Url::parse("https://example.amazonaws.com/").unwrap();
        let mut headers = Vec::new();
        suite_signer().sign("GET", &url, &mut headers, b"", suite_time());
        assert_eq!(
            authorization(&headers),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        assert!(headers.iter().all(|(k, _)| k != "host"));
    }

    /// AWS SigV4 test suite, `get-vanilla-query-order-key-case`: parameters are sorted.
    #[test]
    fn query_order() {
        let url = reqwest::Url::parse("https://example.amazonaws.com/?Param2=value2&Param1=value1")
            .unwrap();
        let mut headers = Vec::new();
        suite_signer().sign("GET", &url, &mut headers, b"", suite_time());
        assert!(authorization(&headers).ends_with(
            "Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
        ));
    }

    /// Query values with reserved characters (block tokens carry `+`, `/`, `=`) are encoded the
    /// AWS way whatever encoding the URL used.
    #[test]
    fn query_encoding_is_canonical() {
        let a =
            reqwest::Url::parse("http://h/snapshots/s/blocks/3?blockToken=a%2Bb%2F%3D").unwrap();
        let b =
            reqwest::Url::parse("http://h/snapshots/s/blocks/3?blockToken=a%2bb%2f%3d").unwrap();
        let (ca, _) = canonical_request("GET", &a, &[], b"");
        let (cb, _) = canonical_request("GET", &b, &[], b"");
        assert_eq!(ca, cb);
        assert!(ca.contains("\nblockToken=a%2Bb%2F%3D\n"));
    }

    #[test]
    fn session_token_is_signed_and_secrets_stay_out_of_debug() {
        let s = SigV4::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            Some("TOKEN-SECRET".into()),
            "us-east-1",
            "ebs",
        )
        .unwrap();
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("wJalr") && !dbg.contains("TOKEN-SECRET"),
            "{dbg}"
        );
        let url = reqwest::Url::parse("http://127.0.0.1:5000/snapshots/snap-1/blocks").unwrap();
        let mut headers = vec![("Accept".to_string(), "application/json".to_string())];
        s.sign("GET", &url, &mut headers, b"", suite_time());
        assert!(
            authorization(&headers)
                .contains("SignedHeaders=accept;host;x-amz-date;x-amz-security-token")
        );
        assert!(authorization(&headers).contains("/20150830/us-east-1/ebs/aws4_request"));
    }

    #[test]
    fn bad_credentials_are_named_without_their_value() {
        let e = SigV4::new("AKID", "has space", None, "us-east-1", "ebs").unwrap_err();
        assert!(e.to_string().contains("secret access key"), "{e}");
        assert!(!e.to_string().contains("has space"));
        let e = SigV4::new("", "x", None, "us-east-1", "ebs").unwrap_err();
        assert!(e.to_string().contains("access key id"), "{e}");
        let e = SigV4::new("AKID", "x", None, "us east", "ebs").unwrap_err();
        assert!(e.to_string().contains("region"), "{e}");
    }
}
