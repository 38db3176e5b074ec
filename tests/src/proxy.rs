//! [`FaultProxy`]: a TCP proxy on loopback that injects network faults between an agent and
//! the gateway's data port — a cut connection, a stall, a slow link, a reset in the middle of
//! a frame — so the replication tests see what a real network does to a session. It forwards
//! bytes untouched (TLS passes through it end to end); each fault applies to one connection,
//! the next ones accepted, in the order they were queued.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What happens to one proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Close both sides once this many bytes went from the agent to the gateway.
    CutAfter(u64),
    /// After this many bytes from the agent, forward nothing more in either direction and
    /// keep both sides open (a dead link without a FIN).
    StallAfter(u64),
    /// Forward the agent's bytes at most this fast (bytes per second).
    Slow(u64),
    /// After this many bytes from the agent, reset both sides (RST, not FIN).
    ResetAfter(u64),
}

/// A running proxy; stops accepting when dropped (connections in flight end with their peers).
#[derive(Debug)]
pub struct FaultProxy {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    target: Arc<Mutex<u16>>,
    stop: Arc<AtomicBool>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
}

impl FaultProxy {
    /// A proxy to `127.0.0.1:target`.
    pub fn start(target: u16) -> FaultProxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let faults: Arc<Mutex<VecDeque<Fault>>> = Arc::default();
        let target = Arc::new(Mutex::new(target));
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (f, t, s, a) = (
            faults.clone(),
            target.clone(),
            stop.clone(),
            accepted.clone(),
        );
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((agent, _)) => {
                        let _ = agent.set_nonblocking(false);
                        a.fetch_add(1, Ordering::Relaxed);
                        let fault = f.lock().unwrap().pop_front().unwrap_or(Fault::Pass);
                        let port = *t.lock().unwrap();
                        std::thread::spawn(move || serve(agent, port, fault));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FaultProxy {
            port,
            faults,
            target,
            stop,
            accepted,
        }
    }

    /// Queues `f` for the next connection not yet given a fault.
    pub fn push(&self, f: Fault) {
        self.faults.lock().unwrap().push_back(f);
    }

    /// Points new connections at another port (the gateway restarted on a new one).
    pub fn retarget(&self, port: u16) {
        *self.target.lock().unwrap() = port;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn reset(s: &TcpStream) {
    // SO_LINGER 0 makes close send RST.
    let _ = rustix::net::sockopt::set_socket_linger(s, Some(Duration::ZERO));
    let _ = s.shutdown(Shutdown::Both);
}

fn serve(agent: TcpStream, port: u16, fault: Fault) {
    let Ok(gateway) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let _ = gateway.set_nodelay(true);
    let _ = agent.set_nodelay(true);
    let stalled = Arc::new(AtomicBool::new(false));
    // Gateway → agent: untouched, but silenced by a stall.
    {
        let (mut from, mut to) = (gateway.try_clone().unwrap(), agent.try_clone().unwrap());
        let stalled = stalled.clone();
        std::thread::spawn(move || {
            let mut b = vec![0u8; 64 << 10];
            loop {
                let n = match from.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if stalled.load(Ordering::Relaxed) {
                    continue;
                }
                if to.write_all(&b[..n]).is_err() {
                    break;
                }
            }
            if !stalled.load(Ordering::Relaxed) {
                let _ = to.shutdown(Shutdown::Write);
            }
        });
    }
    // Agent → gateway: where the faults are.
    let (mut from, mut to) = (agent, gateway);
    let mut sent = 0u64;
    let start = Instant::now();
    let mut b = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = &b[..n];
        let limit = match fault {
            Fault::CutAfter(l) | Fault::StallAfter(l) | Fault::ResetAfter(l) => Some(l),
            _ => None,
        };
        if let Some(l) = limit
            && sent + chunk.len() as u64 >= l
        {
            let keep = usize::try_from(l.saturating_sub(sent)).unwrap_or(0);
            chunk = &chunk[..keep];
            let _ = to.write_all(chunk);
            match fault {
                Fault::CutAfter(_) => {
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                }
                Fault::ResetAfter(_) => {
                    reset(&to);
                    reset(&from);
                }
                _ => {
                    // Stall: swallow everything from now on, both ways, until a side closes.
                    stalled.store(true, Ordering::Relaxed);
                    while let Ok(n) = from.read(&mut b) {
                        if n == 0 {
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Both);
                }
            }
            return;
        }
        if to.write_all(chunk).is_err() {
            break;
        }
        sent += chunk.len() as u64;
        if let Fault::Slow(rate) = fault {
            let due = Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
