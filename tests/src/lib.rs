//! Support for Ferry's end-to-end tests: real emulators, real disk images, the real binary.
//!
//! - [`Emulator`] starts Azurite (`azurite-blob`) or moto (`moto_server`) on a free loopback
//!   port and stops it when dropped. The tools are installed by `scripts/install-test-tools.sh`
//!   (which the README's test command runs); a missing tool fails the test with that hint.
//! - [`TestRepo`] is one fresh vault location on a backend: a local directory, an Azurite
//!   container or a moto bucket, with the options and environment to reach it.
//! - [`make_ext4`] builds a real ext4 image with `scripts/make-ext4-image.sh`.
//! - [`ferry_bin`] finds the `ferry` binary built next to the test executable.
//! - [`ebs::EbsServer`] is a small EBS direct APIs server (moto's `ListChangedBlocks` is wrong).
//! - [`daemon::Daemon`] runs the real `ferryd up` on port 0 and reads its banner.

pub mod daemon;
pub mod ebs;
pub mod proxy;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// Azurite's documented development account (public, not a secret).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's documented development key (public, not a secret).
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()));
    assert!(
        found,
        "`{name}` is not installed: run scripts/install-test-tools.sh (the README's test command does)"
    );
}

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A local directory.
    Local,
    /// Azure Blob through Azurite.
    Azurite,
    /// S3 through moto.
    Moto,
}

/// A running emulator, stopped on drop.
#[derive(Debug)]
pub struct Emulator {
    /// Which one.
    pub kind: Kind,
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Emulator {
    /// Starts the emulator for `kind` (`Local` needs none and panics).
    pub fn start(kind: Kind) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("emulator.log");
        let port = free_port();
        let mut cmd = match kind {
            Kind::Azurite => {
                require_tool("azurite-blob");
                let mut c = Command::new("azurite-blob");
                c.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                    .arg("--location")
                    .arg(dir.path().join("data"))
                    .args(["--disableTelemetry", "--skipApiVersionCheck", "--silent"]);
                c
            }
            Kind::Moto => {
                require_tool("moto_server");
                let mut c = Command::new("moto_server");
                c.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
                c
            }
            Kind::Local => panic!("a local directory needs no emulator"),
        };
        let logf = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {kind:?} emulator: {e}"));
        let mut emu = Self {
            kind,
            port,
            child,
            _dir: dir,
            log,
        };
        emu.wait_ready();
        emu
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{:?} emulator exited ({status}): {}",
                    self.kind,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{:?} emulator did not listen on port {} within 60 s: {}",
                self.kind,
                self.port,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The emulator's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One fresh vault location on a backend.
#[derive(Debug)]
pub struct TestRepo {
    /// Backend kind.
    pub kind: Kind,
    /// Vault URL.
    pub url: String,
    /// Options for `Backend::open` (also usable as `--repo-option`).
    pub options: Vec<(String, String)>,
    /// Environment for the `ferry` binary (credentials).
    pub env: Vec<(String, String)>,
    /// Scratch directory (holds the local vault and anything else the test wants).
    pub dir: tempfile::TempDir,
}

impl TestRepo {
    /// A new, empty location named `name` (lowercase letters, digits and dashes).
    pub fn new(kind: Kind, emu: Option<&Emulator>, name: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (url, options, env) = match kind {
            Kind::Local => (
                dir.path().join("vault").display().to_string(),
                vec![],
                vec![],
            ),
            Kind::Moto => {
                let port = emu.expect("moto emulator").port;
                http_request(
                    port,
                    &format!(
                        "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    ),
                );
                let endpoint = format!("http://127.0.0.1:{port}");
                (
                    format!("s3://{name}"),
                    vec![
                        ("endpoint".into(), endpoint.clone()),
                        ("allow_http".into(), "true".into()),
                        ("region".into(), "us-east-1".into()),
                        ("access_key_id".into(), "testing".into()),
                        ("secret_access_key".into(), "testing".into()),
                    ],
                    vec![
                        ("AWS_ENDPOINT".into(), endpoint),
                        ("AWS_ALLOW_HTTP".into(), "true".into()),
                        ("AWS_REGION".into(), "us-east-1".into()),
                        ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
                        ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
                    ],
                )
            }
            Kind::Azurite => {
                let port = emu.expect("azurite emulator").port;
                azurite_create_container(port, name);
                let endpoint = format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}");
                (
                    format!("az://{name}"),
                    vec![
                        ("account_name".into(), AZURITE_ACCOUNT.into()),
                        ("access_key".into(), AZURITE_KEY.into()),
                        ("endpoint".into(), endpoint.clone()),
                        ("allow_http".into(), "true".into()),
                    ],
                    vec![
                        ("AZURE_STORAGE_ACCOUNT_NAME".into(), AZURITE_ACCOUNT.into()),
                        ("AZURE_STORAGE_ACCOUNT_KEY".into(), AZURITE_KEY.into()),
                        ("AZURE_STORAGE_ENDPOINT".into(), endpoint),
                        ("AZURE_ALLOW_HTTP".into(), "true".into()),
                    ],
                )
            }
        };
        Self {
            kind,
            url,
            options,
            env,
            dir,
        }
    }

    /// Every object name in the location, sorted.
    pub async fn objects(&self) -> std::collections::BTreeSet<String> {
        self.backend()
            .list("")
            .await
            .expect("list test backend")
            .into_iter()
            .map(|m| m.location.to_string())
            .collect()
    }

    /// Opens the location with `ferry_store`.
    pub fn backend(&self) -> ferry_store::Backend {
        ferry_store::Backend::open(&self.url, &self.options, true).expect("open test backend")
    }
}

/// Sends one HTTP/1.1 request to 127.0.0.1:`port`; panics unless the status is 2xx.
fn http_request(port: u16, req: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to emulator");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    s.write_all(req.as_bytes()).expect("send request");
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp.split_whitespace().nth(1).unwrap_or("");
    assert!(
        status.starts_with('2'),
        "emulator refused `{}`: {resp}",
        req.lines().next().unwrap_or("")
    );
    resp
}

/// Creates a container in Azurite with a SharedKey-signed request (object_store cannot).
pub fn azurite_create_container(port: u16, name: &str) {
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let version = "2021-08-06";
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{name}\nrestype:container"
    );
    let key = base64::engine::general_purpose::STANDARD
        .decode(AZURITE_KEY)
        .expect("key is base64");
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).expect("hmac key");
    mac.update(to_sign.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    http_request(
        port,
        &format!(
            "PUT /{AZURITE_ACCOUNT}/{name}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             x-ms-date: {date}\r\nx-ms-version: {version}\r\n\
             Authorization: SharedKey {AZURITE_ACCOUNT}:{sig}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    );
}

/// Runs `qemu-img` (installed by `scripts/install-test-tools.sh`) with `args`, failing the
/// test with its output unless it succeeds; returns its standard output.
pub fn qemu_img(args: &[&str]) -> String {
    let o = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (installed by scripts/install-test-tools.sh)");
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("qemu-img prints UTF-8")
}

/// Builds a real ext4 image of `size` (e.g. "256M") at `out` with `scripts/make-ext4-image.sh`
/// (a debootstrap minbase root when a mirror answers, real files from /usr otherwise).
pub fn make_ext4(out: &Path, size: &str) {
    let script = repo_root().join("scripts/make-ext4-image.sh");
    let o = Command::new("bash")
        .arg(&script)
        .arg(out)
        .arg(size)
        .output()
        .expect("run make-ext4-image.sh");
    assert!(
        o.status.success(),
        "make-ext4-image.sh failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// SHA-256 of a file, hex.
pub fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// Writes `len` bytes of `pattern`-seeded pseudo-random data at `offset` of `file` (in place).
pub fn scribble(file: &Path, offset: u64, len: usize, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open for write");
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    f.write_all_at(&data, offset).expect("write");
}

/// `n` writes of `len` seeded random bytes at seeded random 4 KiB-aligned offsets of `img`, in
/// place; returns the written byte ranges (what a change-tracking source would report).
pub fn random_writes(img: &Path, n: usize, len: usize, seed: u64) -> Vec<std::ops::Range<u64>> {
    let size = std::fs::metadata(img).expect("image").len();
    let mut x = seed | 1;
    (0..n)
        .map(|i| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let off = ((x >> 11) % ((size - len as u64) / 4096)) * 4096;
            scribble(img, off, len, seed.wrapping_mul(1000) + i as u64);
            off..off + len as u64
        })
        .collect()
}

/// The binary `name` of this build, next to the test binaries (`cargo build -p PACKAGE`
/// builds it; the README's test command builds them all).
fn built_bin(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build -p {package}`; the README's test command does)",
        bin.display()
    );
    bin
}

/// The `ferry` binary of this build.
pub fn ferry_bin() -> PathBuf {
    built_bin("ferry", "ferry-cli")
}

/// The `ferryd` binary of this build.
pub fn ferryd_bin() -> PathBuf {
    built_bin("ferryd", "ferry-daemon")
}

/// The `ferry-agent` binary of this build.
pub fn ferry_agent_bin() -> PathBuf {
    built_bin("ferry-agent", "ferry-agent")
}

/// Which wasm target to build a plugin crate for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmTarget {
    /// How Ferry plugins are built: std Rust, no WASI imports.
    Unknown,
    /// wasm32-wasip2 with std: the component imports WASI (which the host refuses).
    WasiP2,
}

/// Build a plugin crate of this workspace for wasm (profile `plugin`, into
/// `target/plugins-wasm`, shared with the built-in plugins' build script) and return the
/// component's path. Concurrent callers are serialised by cargo's own lock.
pub fn plugin_wasm(package: &str, target: WasmTarget) -> PathBuf {
    let root = repo_root();
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t),
        None => root.join("target"),
    }
    .join("plugins-wasm");
    let triple = match target {
        WasmTarget::Unknown => "wasm32-unknown-unknown",
        WasmTarget::WasiP2 => "wasm32-wasip2",
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--locked",
            "--profile",
            "plugin",
            "--target",
            triple,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["-p", package])
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CLIPPY_ARGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .output()
        .expect("running cargo to build a plugin");
    assert!(
        out.status.success(),
        "building {package} for {triple} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = target_dir
        .join(triple)
        .join("plugin")
        .join(format!("{}.wasm", package.replace('-', "_")));
    assert!(path.is_file(), "{} was not produced", path.display());
    path
}

/// A vault in a temporary directory driven by the real `ferry vault …` (a passphrase file,
/// its own cache directory, `FERRY_PASSPHRASE`/`FERRY_REPO` of the caller's environment
/// ignored): what the offline `ferry vault` tests share.
#[derive(Debug)]
pub struct CliVault {
    /// The directory holding the vault (`vault/`), the cache (`cache/`) and what a test adds.
    pub dir: tempfile::TempDir,
    /// The passphrase file.
    pub pass: PathBuf,
}

impl Default for CliVault {
    fn default() -> Self {
        Self::new()
    }
}

impl CliVault {
    /// A new directory with a passphrase file (the vault itself is made by `vault init`).
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let pass = dir.path().join("passphrase");
        std::fs::write(&pass, "a long and secret passphrase\n").expect("write the passphrase");
        Self { dir, pass }
    }

    /// `name` in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ferry vault <args[0]> --repo … --passphrase-file … --cache-dir … <args[1..]>`.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(ferry_bin());
        c.arg("vault")
            .args(&args[..1])
            .arg("--repo")
            .arg(self.path("vault"))
            .arg("--passphrase-file")
            .arg(&self.pass)
            .arg("--cache-dir")
            .arg(self.path("cache"))
            .args(&args[1..])
            .env_remove("FERRY_PASSPHRASE")
            .env_remove("FERRY_REPO");
        c
    }

    /// [`CliVault::command`], run to its end.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().expect("run ferry")
    }

    /// [`CliVault::command`] with `--json`, which must succeed; its JSON output.
    pub fn ok(&self, args: &[&str]) -> serde_json::Value {
        let o = self
            .command(args)
            .arg("--json")
            .output()
            .expect("run ferry");
        assert!(
            o.status.success(),
            "ferry {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).expect("JSON output")
    }
}
