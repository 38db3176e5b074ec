//! `ferry vault mount` (instant recovery over NBD) with the real `ferry` binary and QEMU's
//! own NBD client: a real ext4 image is imported, served on a port the server picks
//! (`--listen 127.0.0.1:0`, read back from the first stdout line), and `qemu-img compare`
//! finds the export identical to the original. A raw TCP client sending garbage is cut off
//! (logged) and the server goes on serving; reads past the end fail (`qemu-io`, and
//! `NBD_EINVAL` to a raw client). Writable: `qemu-io` writes through the copy-on-write
//! overlay and a new connection reads the write back; once the server stops, the overlay
//! leaves nothing behind and the point exports bit-exact as imported.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_e2e::{make_ext4, qemu_img, sha256_file};

use ferry_e2e::CliVault as Vault;

/// A running `ferry vault mount`: killed on drop (also when a test panics).
struct Mount {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    stderr: Arc<Mutex<String>>,
    url: String,
    port: u16,
    export: String,
}

impl Mount {
    /// Starts `ferry vault mount --item vm1 --listen 127.0.0.1:0 --json` plus `extra`, and
    /// reads the first stdout line.
    fn start(v: &Vault, extra: &[&str]) -> Self {
        let mut args = vec![
            "mount",
            "--item",
            "vm1",
            "--listen",
            "127.0.0.1:0",
            "--json",
        ];
        args.extend_from_slice(extra);
        let mut child = v
            .command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ferry vault mount");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let mut m = Self {
            child,
            _stdout: stdout,
            stderr,
            url: String::new(),
            port: 0,
            export: String::new(),
        };
        let j: serde_json::Value = serde_json::from_str(&first).unwrap_or_else(|e| {
            std::thread::sleep(Duration::from_millis(200));
            panic!("first stdout line `{first}` ({e}); stderr: {}", m.stderr())
        });
        m.url = j["url"].as_str().unwrap().to_string();
        m.port = u16::try_from(j["port"].as_u64().unwrap()).unwrap();
        m.export = j["export"].as_str().unwrap().to_string();
        assert_ne!(m.port, 0);
        assert_eq!(m.url, format!("nbd://127.0.0.1:{}/{}", m.port, m.export));
        m
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGTERM, then the exit status (within 15 s).
    fn stop(mut self) -> ExitStatus {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "ferry vault mount did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_io(args: &[&str]) -> Output {
    Command::new("qemu-io")
        .args(args)
        .output()
        .expect("qemu-io (installed by scripts/install-test-tools.sh)")
}

/// A raw NBD client: greeting, `NBD_OPT_GO` for `export`, then one read of `len` bytes at
/// `offset`; returns the reply's error number.
fn raw_read(port: u16, export: &str, offset: u64, len: u32) -> u32 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    // Client flags: fixed newstyle, no zeroes; NBD_OPT_GO (7) with the name and no infos.
    let mut m = 3u32.to_be_bytes().to_vec();
    m.extend_from_slice(b"IHAVEOPT");
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&u32::try_from(export.len() + 6).unwrap().to_be_bytes());
    m.extend_from_slice(&u32::try_from(export.len()).unwrap().to_be_bytes());
    m.extend_from_slice(export.as_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&m).unwrap();
    // Option replies until NBD_REP_ACK (1).
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        if typ == 1 {
            break;
        }
        assert_eq!(typ, 3, "NBD_REP_INFO");
    }
    // NBD_CMD_READ.
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&42u64.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    s.write_all(&r).unwrap();
    let mut rep = [0u8; 16];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(
        u32::from_be_bytes(rep[..4].try_into().unwrap()),
        0x6744_6698
    );
    assert_eq!(u64::from_be_bytes(rep[8..].try_into().unwrap()), 42);
    u32::from_be_bytes(rep[4..8].try_into().unwrap())
}

/// Whether the server closes `s` within 10 s.
fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

fn compare(url: &str, img: &Path) -> String {
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        url,
        "-F",
        "raw",
        img.to_str().unwrap(),
    ])
}

#[test]
fn mount_serves_a_point_over_nbd() {
    let v = Vault::new();
    let img = v.path("disk.img");
    make_ext4(&img, "96M");
    let size = std::fs::metadata(&img).unwrap().len();
    let original = sha256_file(&img);
    v.ok(&["init"]);
    let imported = v.ok(&["import", "--item", "vm1", "--disk", img.to_str().unwrap()]);
    let point = imported["point"].as_str().unwrap().to_string();

    // Read-only.
    let m = Mount::start(&v, &[]);
    assert_eq!(m.export, "vm1-disk0");
    let cmp = compare(&m.url, &img);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let info = qemu_img(&["info", "--output", "json", &m.url]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(size));

    // Garbage from a raw TCP client: that connection is cut, with a log line.
    let mut g = TcpStream::connect(("127.0.0.1", m.port)).unwrap();
    let mut greeting = [0u8; 18];
    g.read_exact(&mut greeting).unwrap();
    g.write_all(&3u32.to_be_bytes()).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(closed(&mut g));
    let mut g = TcpStream::connect(("127.0.0.1", m.port)).unwrap();
    g.write_all(&[0xff; 64]).unwrap();
    assert!(closed(&mut g));
    // Reads past the end: refused to QEMU's client and to a raw one (NBD_EINVAL); the
    // server goes on serving.
    let past = qemu_io(&["-r", "-f", "raw", "-c", &format!("read {size} 64k"), &m.url]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&past.stdout),
        String::from_utf8_lossy(&past.stderr)
    );
    assert!(
        !past.status.success() && out.contains("read failed"),
        "{out}"
    );
    assert_eq!(raw_read(m.port, &m.export, size - 512, 1024), 22);
    assert_eq!(raw_read(m.port, &m.export, 0, 512), 0);
    // The export is read-only: QEMU will not open it for writing.
    let w = qemu_io(&["-f", "raw", "-c", "write -P 0xab 1M 64k", &m.url]);
    let werr = String::from_utf8_lossy(&w.stderr);
    assert!(
        !w.status.success() && werr.contains("Permission denied"),
        "{werr}"
    );
    let cmp = compare(&m.url, &img);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let err = m.stderr();
    assert!(err.contains("qemu-img convert"), "{err}");
    assert!(
        err.contains("unknown client flags") && err.contains("bad option magic"),
        "{err}"
    );
    let st = m.stop();
    assert!(st.success(), "{st:?}");

    // Writable, with an overlay on a "cache disk".
    let overlay = v.path("overlay");
    std::fs::create_dir(&overlay).unwrap();
    let m = Mount::start(
        &v,
        &[
            "--writable",
            "--overlay-dir",
            overlay.to_str().unwrap(),
            "--export-name",
            "rw",
            "--point",
            &point,
        ],
    );
    assert_eq!(m.export, "rw");
    let w = qemu_io(&["-f", "raw", "-c", "write -P 0xab 1M 64k", &m.url]);
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    // A new connection reads the write back; the rest is the point's.
    let r = qemu_io(&["-f", "raw", "-c", "read -P 0xab 1M 64k", &m.url]);
    assert!(
        r.status.success()
            && !String::from_utf8_lossy(&r.stdout).contains("Pattern verification failed"),
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    let differs = Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "raw",
            &m.url,
            "-F",
            "raw",
            img.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(differs.status.code(), Some(1), "the write is visible");
    assert!(
        String::from_utf8_lossy(&differs.stdout).contains("mismatch at offset 1048576"),
        "{}",
        String::from_utf8_lossy(&differs.stdout)
    );
    // Nothing of the overlay is visible in its directory (unlinked at once).
    assert_eq!(std::fs::read_dir(&overlay).unwrap().count(), 0);
    let st = m.stop();
    assert!(st.success(), "{st:?}");

    // The point is unchanged.
    let out = v.path("after.raw");
    v.ok(&[
        "export",
        "--item",
        "vm1",
        "--point",
        &point,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(sha256_file(&out), original);
}

#[test]
fn mount_refuses_bad_arguments() {
    let v = Vault::new();
    let img = v.path("small.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    v.ok(&["init"]);
    v.ok(&["import", "--item", "vm1", "--disk", img.to_str().unwrap()]);
    // --writable needs --overlay-dir (a usage error).
    let o = v
        .command(&["mount", "--item", "vm1", "--writable"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Unknown item, disk; a missing overlay directory: one line, exit 1.
    for (args, needle) in [
        (vec!["mount", "--item", "nope"], "no recovery point"),
        (vec!["mount", "--item", "vm1", "--disk", "disk9"], "disk9"),
        (
            vec![
                "mount",
                "--item",
                "vm1",
                "--writable",
                "--overlay-dir",
                "/nonexistent/dir",
            ],
            "/nonexistent/dir",
        ),
    ] {
        let mut a = args.clone();
        a.extend_from_slice(&["--listen", "127.0.0.1:0"]);
        let o = v.command(&a).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(o.stdout.is_empty());
    }
}
