//! [`Daemon`]: the real `ferryd up` on an empty (or reused) data directory and port 0, its
//! banner and log captured, for the tests that drive the appliance (over HTTP in
//! `appliance.rs`, through the `ferry` CLI in `control_cli.rs`). Build the binary first:
//! `cargo build -p ferry-daemon`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ferryd_bin;

/// A running `ferryd up` on 127.0.0.1, killed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// The port it listens on.
    pub port: u16,
    /// The data port (process role), when it has one.
    pub data_port: Option<u16>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

/// A `ferryd` command with `args`, without any `FERRY_*` variable of the caller's
/// environment.
pub fn ferryd(args: &[&str]) -> Command {
    let mut c = Command::new(ferryd_bin());
    c.args(args);
    // Only what the test sets: no FERRY_* from the developer's shell.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FERRY_") {
            c.env_remove(k);
        }
    }
    c
}

impl Daemon {
    /// Starts `ferryd up --data-dir DATA --listen 127.0.0.1:0` with `env` added, and waits
    /// until it reports its port and has printed its whole banner.
    pub fn start(data: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_at(data, env, 0, 0)
    }

    /// [`Daemon::start`] on fixed ports (0: any): a restarted daemon keeps the addresses its
    /// agents were given.
    pub fn start_at(data: &Path, env: &[(&str, &str)], api_port: u16, data_port: u16) -> Self {
        let listen = format!("127.0.0.1:{api_port}");
        let data_listen = format!("127.0.0.1:{data_port}");
        let mut c = ferryd(&[
            "up",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &listen,
            "--data-listen",
            &data_listen,
        ]);
        c.envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("start ferryd");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let data_port = Arc::new(Mutex::new(None));
        let dp = data_port.clone();
        let out = child.stdout.take().unwrap();
        let so = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut s = so.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let err = child.stderr.take().unwrap();
        let se = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(rest) =
                    line.strip_prefix("ferryd: data port listening on https://127.0.0.1:")
                {
                    *dp.lock().unwrap() = rest.parse::<u16>().ok();
                }
                if let Some(rest) = line.strip_prefix("ferryd: listening on https://127.0.0.1:") {
                    let _ = tx.send(rest.parse::<u16>().expect("a port"));
                }
                let mut s = se.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "ferryd did not report its port; stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        // The data port's line comes before the API's.
        let data_port = *data_port.lock().unwrap();
        let d = Daemon {
            child,
            port,
            data_port,
            stdout,
            stderr,
        };
        // The banner is written before the port line; wait until it is all there.
        let t = Instant::now();
        while !d.stdout().contains("Next:") || !d.stdout().contains("openapi.json") {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no banner: {}",
                d.stdout()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// `https://127.0.0.1:PORT` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// What it printed on stdout so far (the banner).
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// SIGTERM, then the exit status (within 15 s) and stderr.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the reader threads catch up.
                std::thread::sleep(Duration::from_millis(50));
                return (st, self.stderr.lock().unwrap().clone());
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "ferryd did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
