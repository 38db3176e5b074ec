//! The point-in-time view a cycle reads: the snapshot providers.
//!
//! A cycle must read one state of the disk, or its recovery point mixes moments. How that
//! state is held depends on what the disk is, so each disk names its method
//! ([`SnapshotMode`]): the live path (`none`), a reflink clone of an image file in the cycle's
//! directory (`reflink`), an LVM snapshot volume (`lvm`), or the live path read while a
//! configured command keeps it still (`quiesce`, e.g. `fsfreeze`). Application consistency
//! wraps taking the view in the disk's `app_pre` / `app_post` commands.
//!
//! Every command that froze something has its undo run on every path: a [`View`] that is
//! released, dropped after an error, or never finished being taken runs the pending
//! `post_snapshot` / `app_post` (the [`Undo`] guard). A reflink clone or an LVM snapshot
//! outlives the process on purpose when the agent stops mid-cycle (the cycle resumes from it);
//! it is removed when the cycle is acknowledged or abandoned.
//!
//! Commands run without a shell, with no standard input, a timeout ([`COMMAND_TIMEOUT`]), and
//! the end of their standard error kept for the error message.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ferry_proto::frame::Consistency;
use tokio::io::AsyncReadExt;

use crate::disks::{DiskConfig, SnapshotMode, lvm_volume};
use crate::source::{self, Reader};
use crate::tracking::VIEW_FILE;

/// Longest a snapshot or application command may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// How much of a failed command's standard error is kept.
const STDERR_TAIL: usize = 512;

/// Why a view could not be taken, reopened or released. Every variant names the disk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ViewError {
    /// The disk's path (or its view) cannot be opened or measured.
    #[error("disk {disk}: cannot {action} {}: {source}", path.display())]
    Io {
        /// `item/disk`.
        disk: String,
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// The file system cannot clone the image file.
    #[error(
        "disk {disk}: cannot make a reflink clone of {} in {}: {source} (snapshot `reflink` needs an image file on a file system with reflink support, such as btrfs or XFS, and the state directory on the same file system; choose another snapshot method otherwise)",
        path.display(), dest.display()
    )]
    Reflink {
        /// `item/disk`.
        disk: String,
        /// The image file.
        path: PathBuf,
        /// The clone.
        dest: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// A configured or LVM command failed.
    #[error("disk {disk}: {what} `{program}` {reason}")]
    Command {
        /// `item/disk`.
        disk: String,
        /// Which command (`pre_snapshot`, `lvcreate`, …).
        what: &'static str,
        /// Its program.
        program: String,
        /// How it failed (exit status and the end of its standard error, or why it did not run).
        reason: String,
    },
    /// The disk container cannot be read through its source adapter.
    #[error("disk {disk}: cannot read {} through its source adapter: {message}", path.display())]
    Adapter {
        /// `item/disk`.
        disk: String,
        /// The container.
        path: PathBuf,
        /// What the adapter or the plugin host said.
        message: String,
    },
    /// The disk is empty.
    #[error("disk {disk}: {} is empty (0 bytes); there is nothing to replicate", path.display())]
    Empty {
        /// `item/disk`.
        disk: String,
        /// The path.
        path: PathBuf,
    },
}

/// Runs `argv` (no shell), waits at most [`COMMAND_TIMEOUT`]; fails on a non-zero exit.
pub async fn run_command(disk: &str, what: &'static str, argv: &[String]) -> Result<(), ViewError> {
    run(disk, what, argv, &[], None).await.map(drop)
}

/// Runs `argv` like [`run_command`], with `env` added to its environment, and returns its
/// standard output, refused past `max_stdout` bytes (the command is killed).
pub async fn command_output(
    disk: &str,
    what: &'static str,
    argv: &[String],
    env: &[(&str, String)],
    max_stdout: usize,
) -> Result<Vec<u8>, ViewError> {
    run(disk, what, argv, env, Some(max_stdout)).await
}

async fn run(
    disk: &str,
    what: &'static str,
    argv: &[String],
    env: &[(&str, String)],
    capture: Option<usize>,
) -> Result<Vec<u8>, ViewError> {
    let program = argv.first().cloned().unwrap_or_default();
    let fail = |reason: String| ViewError::Command {
        disk: disk.to_string(),
        what,
        program: program.clone(),
        reason,
    };
    let mut child = tokio::process::Command::new(&program)
        .args(argv.get(1..).unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(if capture.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("could not be started: {e}")))?;
    // Standard error is read on a task of its own, so that the output can be given up at
    // once (the command killed) when it is too long, without waiting for standard error.
    let stderr_tail = child.stderr.take().map(|mut s| {
        tokio::spawn(async move {
            let mut tail = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        tail.extend_from_slice(&buf[..n]);
                        if tail.len() > STDERR_TAIL {
                            tail.drain(..tail.len() - STDERR_TAIL);
                        }
                    }
                }
            }
            tail
        })
    });
    let mut stdout = child.stdout.take();
    let max = capture.unwrap_or(0);
    let deadline = tokio::time::Instant::now() + COMMAND_TIMEOUT;
    let timed_out = || {
        fail(format!(
            "did not finish within {} s and was killed",
            COMMAND_TIMEOUT.as_secs()
        ))
    };
    let read_out = async {
        let mut out = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Err(e) => return Err(format!("its output could not be read: {e}")),
                    Ok(n) if out.len() + n > max => {
                        return Err(format!("printed more than {max} bytes"));
                    }
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        }
        Ok(out)
    };
    let out = match tokio::time::timeout_at(deadline, read_out).await {
        Ok(Ok(out)) => out,
        // Too much output, or too slow: the command is killed now (and reaped by the
        // runtime once it exits).
        Ok(Err(reason)) => {
            let _ = child.start_kill();
            return Err(fail(reason));
        }
        Err(_) => {
            let _ = child.start_kill();
            return Err(timed_out());
        }
    };
    let status = tokio::time::timeout_at(deadline, child.wait())
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| fail(format!("could not be waited for: {e}")))?;
    let tail = match stderr_tail {
        Some(t) => tokio::time::timeout_at(deadline, t)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    if status.success() {
        return Ok(out);
    }
    let text = String::from_utf8_lossy(&tail);
    let text: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Err(fail(if text.is_empty() {
        format!("failed ({status})")
    } else {
        format!("failed ({status}): {text}")
    }))
}

/// Commands still to run to undo what taking a view did, in order. Run by
/// [`Undo::run`]; a guard dropped without it runs them on a fresh thread (best effort, so a
/// frozen file system is thawed even when the task was cancelled).
#[derive(Debug, Default)]
pub struct Undo {
    disk: String,
    steps: Vec<(&'static str, Vec<String>)>,
}

impl Undo {
    fn push(&mut self, what: &'static str, argv: Vec<String>) {
        self.steps.push((what, argv));
    }

    /// Runs every pending command (all of them, even after one fails); returns the first
    /// failure.
    pub async fn run(&mut self) -> Result<(), ViewError> {
        let mut first = None;
        while let Some((what, argv)) = self.steps.pop() {
            if let Err(e) = run_command(&self.disk, what, &argv).await
                && first.is_none()
            {
                first = Some(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if self.steps.is_empty() {
            return;
        }
        let steps = std::mem::take(&mut self.steps);
        let disk = self.disk.clone();
        // Blocking, on its own thread: the runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            for (what, argv) in steps.into_iter().rev() {
                let r = std::process::Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                if !r.is_ok_and(|s| s.success()) {
                    crate::progress::log(&[
                        ("event", "undo_failed"),
                        ("disk", &disk),
                        ("command", what),
                        ("program", &argv[0]),
                    ]);
                }
            }
        })
        .join();
    }
}

/// The point-in-time view of one disk for one cycle.
#[derive(Debug)]
pub struct View {
    label: String,
    mode: SnapshotMode,
    /// What is read.
    path: PathBuf,
    /// The file at `path`, or the virtual disk its adapter serves.
    reader: Reader,
    size: u64,
    /// The handle recorded in the cycle record: empty, `view` or `VG/LV`.
    handle: String,
    /// Commands to run when the view is released (quiesce's post, app_post).
    undo: Undo,
    consistency: Consistency,
}

fn open_read(label: &str, path: &Path) -> Result<(File, u64), ViewError> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOATIME.bits() as i32)
        .open(path)
        .or_else(|_| File::open(path))
        .map_err(|source| ViewError::Io {
            disk: label.to_string(),
            action: "open",
            path: path.to_path_buf(),
            source,
        })?;
    // The end of a block device is its size (its metadata says 0).
    let size = f.seek(SeekFrom::End(0)).map_err(|source| ViewError::Io {
        disk: label.to_string(),
        action: "measure",
        path: path.to_path_buf(),
        source,
    })?;
    if size == 0 {
        return Err(ViewError::Empty {
            disk: label.to_string(),
            path: path.to_path_buf(),
        });
    }
    Ok((f, size))
}

/// The size of `disk` as it is now (a block device's, an image file's, or a container's
/// virtual disk's).
pub async fn disk_size(disk: &DiskConfig) -> Result<u64, ViewError> {
    let (file, size) = open_read(&disk.label(), &disk.path)?;
    source::open(disk, &disk.path, file, size, false)
        .await
        .map(|(_, s)| s)
}

/// The LVM snapshot volume's name for a cycle.
fn lvm_snapshot_name(lv: &str, cycle: u64) -> String {
    format!("{lv}-ferry-c{cycle}")
}

impl View {
    /// Takes the view of `disk` for `cycle`, the reflink clone (if any) going into
    /// `cycle_dir`. With `app`, the application commands wrap it and the view is
    /// [`Consistency::App`].
    pub async fn take(
        disk: &DiskConfig,
        cycle_dir: &Path,
        cycle: u64,
        app: bool,
    ) -> Result<View, ViewError> {
        let label = disk.label();
        let app = app && disk.app_consistent();
        let mut undo = Undo {
            disk: label.clone(),
            steps: Vec::new(),
        };
        if app {
            run_command(&label, "app_pre", &disk.app_pre).await?;
            undo.push("app_post", disk.app_post.clone());
        }
        let taken = Self::take_view(disk, &label, cycle_dir, cycle, &mut undo).await;
        let (path, handle) = match taken {
            Ok(v) => v,
            Err(e) => {
                let _ = undo.run().await;
                return Err(e);
            }
        };
        // A clone or a snapshot holds the moment: the application may go on at once.
        if app
            && matches!(disk.snapshot, SnapshotMode::Reflink | SnapshotMode::Lvm)
            && let Err(e) = undo.run().await
        {
            let _ = release_handle(&label, disk.snapshot, cycle_dir, &handle).await;
            return Err(e);
        }
        let opened = match open_read(&label, &path) {
            Ok((file, size)) => source::open(disk, &path, file, size, true).await,
            Err(e) => Err(e),
        };
        let (reader, size) = match opened {
            Ok(v) => v,
            Err(e) => {
                let _ = undo.run().await;
                let _ = release_handle(&label, disk.snapshot, cycle_dir, &handle).await;
                return Err(e);
            }
        };
        Ok(View {
            label,
            mode: disk.snapshot,
            path,
            reader,
            size,
            handle,
            undo,
            consistency: if app {
                Consistency::App
            } else {
                Consistency::Crash
            },
        })
    }

    async fn take_view(
        disk: &DiskConfig,
        label: &str,
        cycle_dir: &Path,
        cycle: u64,
        undo: &mut Undo,
    ) -> Result<(PathBuf, String), ViewError> {
        match disk.snapshot {
            SnapshotMode::None => Ok((disk.path.clone(), String::new())),
            SnapshotMode::Quiesce => {
                if let Err(e) = run_command(label, "pre_snapshot", &disk.pre_snapshot).await {
                    // It may have frozen part of what it was asked to: thaw anyway.
                    let _ = run_command(label, "post_snapshot", &disk.post_snapshot).await;
                    return Err(e);
                }
                undo.push("post_snapshot", disk.post_snapshot.clone());
                Ok((disk.path.clone(), String::new()))
            }
            SnapshotMode::Reflink => {
                let dest = cycle_dir.join(VIEW_FILE);
                reflink(label, &disk.path, &dest)?;
                Ok((dest, VIEW_FILE.to_string()))
            }
            SnapshotMode::Lvm => {
                let (vg, lv) = lvm_volume(&disk.path).map_err(|reason| ViewError::Command {
                    disk: label.to_string(),
                    what: "lvcreate",
                    program: "lvcreate".into(),
                    reason,
                })?;
                let name = lvm_snapshot_name(&lv, cycle);
                let size = disk.lvm_size();
                let size_flag = if size.contains('%') { "-l" } else { "-L" };
                let argv: Vec<String> = [
                    "lvcreate",
                    "--snapshot",
                    "--name",
                    &name,
                    size_flag,
                    size,
                    &disk.path.to_string_lossy(),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                run_command(label, "lvcreate", &argv).await?;
                Ok((
                    PathBuf::from("/dev").join(&vg).join(&name),
                    format!("{vg}/{name}"),
                ))
            }
        }
    }

    /// Reopens the view a cycle recorded (`handle`) to resume it: the live path for `none`,
    /// the clone or the snapshot volume if still there. `None` when it is gone, or for
    /// `quiesce` (the freeze ended with the process that made it: the moment is lost).
    pub async fn reopen(
        disk: &DiskConfig,
        cycle_dir: &Path,
        handle: &str,
        consistency: Consistency,
    ) -> Result<Option<View>, ViewError> {
        let label = disk.label();
        let path = match disk.snapshot {
            SnapshotMode::None if handle.is_empty() => disk.path.clone(),
            SnapshotMode::Reflink if handle == VIEW_FILE => cycle_dir.join(VIEW_FILE),
            SnapshotMode::Lvm if handle.contains('/') => PathBuf::from("/dev").join(handle),
            _ => return Ok(None),
        };
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(None);
        }
        let (file, size) = open_read(&label, &path)?;
        // A resumed cycle is not planned again: its reads need no map.
        let (reader, size) = source::open(disk, &path, file, size, false).await?;
        Ok(Some(View {
            label: label.clone(),
            mode: disk.snapshot,
            path,
            reader,
            size,
            handle: handle.to_string(),
            undo: Undo {
                disk: label,
                steps: Vec::new(),
            },
            consistency,
        }))
    }

    /// What is read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What reads the view (shared by clones).
    pub fn reader(&self) -> Reader {
        self.reader.clone()
    }

    /// The disk's size as the view shows it.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The handle to record in the cycle record.
    pub fn handle(&self) -> &str {
        &self.handle
    }

    /// The consistency of the point this view makes.
    pub fn consistency(&self) -> Consistency {
        self.consistency
    }

    /// Whether the view holds a file system frozen (it must not be kept across waits).
    pub fn holds_freeze(&self) -> bool {
        !self.undo.steps.is_empty()
    }

    /// Ends the view: pending undo commands run (thaw, app_post), and with `discard` the clone
    /// or snapshot volume is removed too (the cycle is over); without, it stays for a later
    /// resume.
    pub async fn release(mut self, cycle_dir: &Path, discard: bool) -> Result<(), ViewError> {
        let undone = self.undo.run().await;
        let removed = if discard {
            release_handle(&self.label, self.mode, cycle_dir, &self.handle).await
        } else {
            Ok(())
        };
        undone.and(removed)
    }
}

/// Removes what a recorded view handle holds (the clone file, the LVM snapshot volume).
pub async fn release_handle(
    label: &str,
    mode: SnapshotMode,
    cycle_dir: &Path,
    handle: &str,
) -> Result<(), ViewError> {
    match mode {
        SnapshotMode::Reflink if handle == VIEW_FILE => {
            let p = cycle_dir.join(VIEW_FILE);
            match std::fs::remove_file(&p) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(ViewError::Io {
                    disk: label.to_string(),
                    action: "remove",
                    path: p,
                    source,
                }),
            }
        }
        SnapshotMode::Lvm if handle.contains('/') => {
            if std::fs::symlink_metadata(PathBuf::from("/dev").join(handle)).is_err() {
                return Ok(());
            }
            let argv = vec!["lvremove".to_string(), "-f".into(), handle.to_string()];
            run_command(label, "lvremove", &argv).await
        }
        _ => Ok(()),
    }
}

/// A copy-on-write clone of `src` at `dest` (`FICLONE`); `dest` is replaced.
pub fn reflink(label: &str, src: &Path, dest: &Path) -> Result<(), ViewError> {
    let err = |source: io::Error| ViewError::Reflink {
        disk: label.to_string(),
        path: src.to_path_buf(),
        dest: dest.to_path_buf(),
        source,
    };
    let from = File::open(src).map_err(|source| ViewError::Io {
        disk: label.to_string(),
        action: "open",
        path: src.to_path_buf(),
        source,
    })?;
    let _ = std::fs::remove_file(dest);
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(err)?;
    if let Err(e) = rustix::fs::ioctl_ficlone(&to, &from) {
        drop(to);
        let _ = std::fs::remove_file(dest);
        return Err(err(e.into()));
    }
    to.sync_all().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn commands_report_their_failure() {
        run_command("w/a", "app_pre", &sh("exit 0")).await.unwrap();
        let e = run_command("w/a", "app_pre", &sh("echo froze badly >&2; exit 3"))
            .await
            .unwrap_err();
        let m = e.to_string();
        assert!(
            m.starts_with("disk w/a: app_pre `/bin/sh` failed (exit status: 3): froze badly"),
            "{m}"
        );
        let e = run_command("w/a", "pre_snapshot", &["/nonexistent/x".to_string()])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("could not be started"), "{e}");
    }

    /// `post_snapshot` and `app_post` run on every path: release, a failed pre command, a
    /// view that cannot be opened, and a view dropped without release.
    #[tokio::test]
    async fn quiesce_always_thaws() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk.img");
        std::fs::write(&img, vec![1u8; 4096]).unwrap();
        let log = t.path().join("log");
        let step = |s: &str| sh(&format!("echo {s} >> {}", log.display()));
        let mut d = DiskConfig::new("w", "a", &img);
        d.snapshot = SnapshotMode::Quiesce;
        d.pre_snapshot = step("pre");
        d.post_snapshot = step("post");
        d.app_pre = step("app_pre");
        d.app_post = step("app_post");
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

        let v = View::take(&d, t.path(), 1, true).await.unwrap();
        assert_eq!(v.consistency(), Consistency::App);
        assert_eq!(v.size(), 4096);
        assert!(v.holds_freeze());
        assert_eq!(read_log(), "app_pre\npre\n");
        v.release(t.path(), true).await.unwrap();
        assert_eq!(read_log(), "app_pre\npre\npost\napp_post\n");

        // Dropped without release (a cancelled task): thawed all the same.
        std::fs::remove_file(&log).unwrap();
        let v = View::take(&d, t.path(), 1, false).await.unwrap();
        assert_eq!(v.consistency(), Consistency::Crash);
        drop(v);
        assert_eq!(read_log(), "pre\npost\n");

        // A failing pre command: the post command runs, the app is thawed too.
        std::fs::remove_file(&log).unwrap();
        d.pre_snapshot = sh(&format!("echo pre >> {}; exit 1", log.display()));
        let e = View::take(&d, t.path(), 1, true).await.unwrap_err();
        assert!(e.to_string().contains("pre_snapshot"), "{e}");
        assert_eq!(read_log(), "app_pre\npre\npost\napp_post\n");

        // The path cannot be opened after freezing: thawed.
        std::fs::remove_file(&log).unwrap();
        d.pre_snapshot = step("pre");
        d.path = t.path().join("missing.img");
        let e = View::take(&d, t.path(), 1, false).await.unwrap_err();
        assert!(e.to_string().contains("cannot open"), "{e}");
        assert_eq!(read_log(), "pre\npost\n");
    }

    #[tokio::test]
    async fn reflink_clones_or_says_why_not() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk.img");
        std::fs::write(&img, vec![7u8; 8192]).unwrap();
        let mut d = DiskConfig::new("w", "a", &img);
        d.snapshot = SnapshotMode::Reflink;
        let cycle = t.path().join("cycle");
        std::fs::create_dir(&cycle).unwrap();
        match View::take(&d, &cycle, 1, false).await {
            Ok(v) => {
                // This file system clones: the view is the clone, and it survives for a
                // resume until discarded.
                assert_eq!(v.path(), cycle.join(VIEW_FILE));
                assert_eq!(v.handle(), VIEW_FILE);
                v.release(&cycle, false).await.unwrap();
                let again = View::reopen(&d, &cycle, VIEW_FILE, Consistency::Crash)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(again.size(), 8192);
                again.release(&cycle, true).await.unwrap();
                assert!(!cycle.join(VIEW_FILE).exists());
            }
            Err(e) => {
                let m = e.to_string();
                assert!(matches!(e, ViewError::Reflink { .. }), "{m}");
                assert!(
                    m.contains("reflink support") && m.contains("disk w/a"),
                    "{m}"
                );
                assert!(!cycle.join(VIEW_FILE).exists());
            }
        }
        assert!(
            View::reopen(&d, &cycle, VIEW_FILE, Consistency::Crash)
                .await
                .unwrap()
                .is_none()
        );
    }

    /// A command's output is returned; one that prints too much is killed at once and said
    /// so (not left to the timeout); its environment is set; a failure keeps its stderr.
    #[tokio::test]
    async fn command_output_is_capped_and_the_command_killed() {
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let out = command_output(
            "w/a",
            "changes",
            &argv(&["sh", "-c", "printf %s \"$X\""]),
            &[("X", "hi".into())],
            16,
        )
        .await
        .unwrap();
        assert_eq!(out, b"hi");
        // Killed for its output, not at the timeout (whose message differs).
        let e = command_output("w/a", "changes", &argv(&["yes"]), &[], 1 << 20)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("printed more than 1048576 bytes"), "{e}");
        let e = command_output(
            "w/a",
            "changes",
            &argv(&["sh", "-c", "echo nope >&2; exit 3"]),
            &[],
            16,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("nope") && e.contains("changes"), "{e}");
    }

    #[tokio::test]
    async fn live_views_and_empty_disks() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk.img");
        std::fs::write(&img, b"").unwrap();
        let d = DiskConfig::new("w", "a", &img);
        let e = View::take(&d, t.path(), 1, false).await.unwrap_err();
        assert!(e.to_string().contains("is empty"), "{e}");
        std::fs::write(&img, [1u8; 10]).unwrap();
        let v = View::reopen(&d, t.path(), "", Consistency::Crash)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((v.size(), v.path()), (10, img.as_path()));
        assert!(!v.holds_freeze());
        // A recorded quiesce view is never resumed.
        let mut q = d.clone();
        q.snapshot = SnapshotMode::Quiesce;
        assert!(
            View::reopen(&q, t.path(), "", Consistency::Crash)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(lvm_snapshot_name("data", 12), "data-ferry-c12");
    }
}
