//! The operator's settings for this plugin: the `[config]` table of its manifest.
//!
//! Values are strings and never secrets (the host injects credentials itself, for example into
//! HTTP requests). Read config where a call starts (in `open` or `run`) and validate it there, so
//! a typo fails with a message naming the key instead of being ignored.

/// The value of `key`, if set.
#[must_use]
pub fn get(key: &str) -> Option<String> {
    crate::host::config_get(key)
}

/// Every key that is set, sorted.
#[must_use]
pub fn keys() -> Vec<String> {
    crate::host::config_keys()
}

/// A config value that is not what the plugin accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}` must be {expected}, not `{value}`")]
pub struct InvalidConfig {
    /// The key.
    pub key: String,
    /// The value found.
    pub value: String,
    /// What would have been accepted, for example "`true` or `false`".
    pub expected: String,
}

/// The boolean at `key` (`true` or `false`), or `default` when it is not set.
///
/// # Errors
/// [`InvalidConfig`] when the value is anything else.
pub fn get_bool(key: &str, default: bool) -> Result<bool, InvalidConfig> {
    match get(key).as_deref() {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(InvalidConfig {
            key: key.to_owned(),
            value: other.to_owned(),
            expected: "`true` or `false`".to_owned(),
        }),
    }
}
