//! Private files and directories under the data directory.
//!
//! The appliance keeps keys, the admin token and the catalog on local disk. This module is the
//! one place that decides what "private" means, so that every secret is written and checked
//! the same way:
//!
//! - directories the appliance creates are `0700`; an existing one must be ours and not
//!   writable by group or others;
//! - secret files are created `0600`, create-only (a temporary name, synced, then hard-linked
//!   to the final name, which fails if it exists: a crash never leaves a half-written key under
//!   the real name, and an existing file is never overwritten), and the directory is synced;
//! - a secret file the appliance reads back must be a regular file (not a symlink), ours, with
//!   no group or other permission bits;
//! - a secret file the operator points to (`*_file` settings) may be a symlink (mounted
//!   secrets) but must not be readable or writable by others.
//!
//! Every read is bounded.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{DaemonError, Result};

/// The effective user id of this process.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Creates `dir` (and missing parents) as `0700` if absent, then checks it.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| DaemonError::io("create directory", dir, e))?;
    }
    check_dir(dir)
}

/// Checks that `dir` is a directory owned by us and not writable by group or others.
pub fn check_dir(dir: &Path) -> Result<()> {
    let m = fs::symlink_metadata(dir).map_err(|e| DaemonError::io("inspect", dir, e))?;
    if !m.is_dir() {
        return Err(DaemonError::unsafe_perms(
            dir,
            "expected a directory (not a symlink or a file)",
        ));
    }
    if m.uid() != euid() {
        return Err(DaemonError::unsafe_perms(
            dir,
            format!(
                "owned by uid {}, but ferryd runs as uid {}; chown it or pick another data directory",
                m.uid(),
                euid()
            ),
        ));
    }
    if m.mode() & 0o022 != 0 {
        return Err(DaemonError::unsafe_perms(
            dir,
            format!(
                "mode {:04o} lets group or others write into it; run `chmod go-w` on it",
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Checks that `path` is a regular file owned by us with no group or other permission bits.
pub fn check_private_file(path: &Path) -> Result<()> {
    let m = fs::symlink_metadata(path).map_err(|e| DaemonError::io("inspect", path, e))?;
    if !m.is_file() {
        return Err(DaemonError::unsafe_perms(
            path,
            "expected a regular file (not a symlink, directory or device)",
        ));
    }
    if m.uid() != euid() {
        return Err(DaemonError::unsafe_perms(
            path,
            format!(
                "owned by uid {}, but ferryd runs as uid {}",
                m.uid(),
                euid()
            ),
        ));
    }
    if m.mode() & 0o077 != 0 {
        return Err(DaemonError::unsafe_perms(
            path,
            format!(
                "mode {:04o} gives group or others access to a secret; run `chmod 600` on it",
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Checks a secret file named by the operator (`*_file` settings): a regular file (symlinks
/// followed) that others can neither read nor write.
pub fn check_operator_secret_file(path: &Path) -> Result<()> {
    let m = fs::metadata(path).map_err(|e| DaemonError::io("inspect", path, e))?;
    if !m.is_file() {
        return Err(DaemonError::unsafe_perms(path, "expected a regular file"));
    }
    if m.mode() & 0o006 != 0 {
        return Err(DaemonError::unsafe_perms(
            path,
            format!(
                "mode {:04o} lets others read or write a secret; run `chmod o-rw` on it",
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Reads at most `max` bytes of `path`; a longer file is an error.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let f = File::open(path).map_err(|e| DaemonError::io("open", path, e))?;
    let mut out = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| DaemonError::io("read", path, e))?;
    if out.len() as u64 > max {
        return Err(DaemonError::inconsistent(
            path,
            format!("larger than {max} bytes; this is not a file ferryd wrote"),
        ));
    }
    Ok(out)
}

/// Checks `path` with [`check_private_file`] and reads it (bounded).
pub fn read_private(path: &Path, max: u64) -> Result<Vec<u8>> {
    check_private_file(path)?;
    read_bounded(path, max)
}

/// Writes a new private (`0600`) file at `path` with `data`, create-only and durably.
/// Fails if `path` exists.
pub fn write_private_new(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(
        ".{name}.tmp-{}",
        hex::encode(rand::random::<[u8; 6]>())
    ));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // The umask may only remove bits; make sure nothing else was added.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(data)?;
        f.sync_all()
    };
    let r = write()
        .map_err(|e| DaemonError::io("write", &tmp, e))
        .and_then(|()| fs::hard_link(&tmp, path).map_err(|e| DaemonError::io("create", path, e)));
    let _ = fs::remove_file(&tmp);
    r?;
    sync_dir(dir)
}

/// Makes entries created in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| DaemonError::io("sync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_create_only_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret");
        write_private_new(&p, b"abc").unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(read_private(&p, 16).unwrap(), b"abc");
        // Never overwritten.
        let e = write_private_new(&p, b"xyz").unwrap_err();
        assert!(e.to_string().contains("cannot create"), "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"abc");
        // No temporary left behind.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        // Too open.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_private(&p, 16).unwrap_err();
        assert!(
            matches!(e, DaemonError::UnsafePermissions { .. }) && e.to_string().contains("0640"),
            "{e}"
        );
        // Too long.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_private(&p, 2).is_err());
        // A symlink is refused even when its target is fine.
        let l = d.path().join("link");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        assert!(matches!(
            check_private_file(&l),
            Err(DaemonError::UnsafePermissions { .. })
        ));
        // ...but operator-provided files may be symlinks.
        check_operator_secret_file(&l).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_operator_secret_file(&l).is_err());
    }

    #[test]
    fn directories_are_created_private_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("a/b");
        ensure_private_dir(&sub).unwrap();
        assert_eq!(fs::metadata(&sub).unwrap().mode() & 0o777, 0o700);
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure_private_dir(&sub).unwrap_err();
        assert!(e.to_string().contains("chmod go-w"), "{e}");
    }
}
