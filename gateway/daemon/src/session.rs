//! The replication session rules (`docs/agent-protocol.md` §7), as a pure state machine: what
//! the process role answers to an agent's `Hello`, and which data frames it accepts.
//!
//! The codec (`ferry_proto::frame`) only guarantees that a frame is well formed. Whether it
//! may be applied depends on who sent it and what the gateway already holds: the agent's
//! certificate must name the `Hello`'s agent, which must act for the item; the disk's size and
//! chunk size must match earlier cycles; the cycle must be the one being received, the one
//! just completed (a lost ack), or a new one; every data frame's sequence number must be the
//! last durable one + 1; chunk indexes and zero ranges must lie inside the disk and chunks
//! must be whole. Each refusal carries the protocol's stable error code and a message naming
//! the value, and changes nothing: the caller applies a frame (journal write) only after
//! [`Session::accept`] said yes, and the session's own expectation moves only then.
//!
//! Nothing here does I/O; the data-port connection handler feeds it frames and the journal's
//! durable state.

use ferry_proto::frame::{AgentFrame, CycleKind, Hello, error_code};

/// A refusal: the `Error` frame the gateway sends before closing the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    /// The stable code (`ferry_proto::frame::error_code`).
    pub code: &'static str,
    /// What was wrong, for people.
    pub message: String,
}

fn refuse(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

/// What the gateway holds for one (item, disk) when a `Hello` arrives: from its journal and
/// the vault's points.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamState {
    /// Size and chunk size of the disk as earlier cycles recorded them (`None`: no cycle yet).
    pub geometry: Option<(u64, u32)>,
    /// The newest cycle whose `EndOfCycle` is durable, and that frame's `seq`.
    pub complete: Option<(u64, u64)>,
    /// A cycle after it being received, and its highest durable `seq` (0: nothing yet).
    pub receiving: Option<(u64, u64)>,
}

/// Who is on the other end and what it may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The agent name its client certificate was issued for.
    pub agent: String,
    /// The protected items it acts for.
    pub items: Vec<String>,
}

/// The gateway's answer to an accepted `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcomed {
    /// `Welcome.resume_from_seq`: the highest durable `seq` of the `Hello`'s cycle.
    pub resume_from_seq: u64,
    /// An incomplete cycle this `Hello` abandons: its journal is to be dropped.
    pub abandon: Option<u64>,
    /// The session, ready for data frames (`None` when the cycle is already complete: the
    /// agent learns it from `resume_from_seq` and has nothing to send).
    pub session: Option<Session>,
}

/// Decides a `Hello` from `peer` against `state` (§7.1, §7.4). `chunk_size_rule` checks a
/// chunk size the disk has no record of yet (the policy's rule).
pub fn on_hello(
    peer: &Peer,
    hello: &Hello,
    state: &StreamState,
    chunk_size_rule: impl Fn(u32) -> Result<(), String>,
) -> Result<Welcomed, Refusal> {
    if hello.agent != peer.agent {
        return Err(refuse(
            error_code::FORBIDDEN,
            format!(
                "this certificate was issued to agent `{}`, not `{}`",
                peer.agent, hello.agent
            ),
        ));
    }
    if !peer.items.contains(&hello.item) {
        return Err(refuse(
            error_code::FORBIDDEN,
            format!(
                "agent `{}` does not act for protected item `{}`",
                peer.agent, hello.item
            ),
        ));
    }
    match state.geometry {
        Some((size, cs)) => {
            if (size, cs) != (hello.disk_size, hello.chunk_size) {
                return Err(refuse(
                    error_code::BAD_SESSION,
                    format!(
                        "disk `{}` of `{}` is {size} bytes in chunks of {cs}; the agent says {} in chunks of {} (a resized disk needs a resync from a new enable)",
                        hello.disk, hello.item, hello.disk_size, hello.chunk_size
                    ),
                ));
            }
        }
        None => {
            chunk_size_rule(hello.chunk_size).map_err(|m| refuse(error_code::BAD_SESSION, m))?;
            if hello.cycle_kind != CycleKind::Initial {
                return Err(refuse(
                    error_code::BAD_SESSION,
                    format!(
                        "disk `{}` of `{}` has no replica yet: its first cycle must be initial",
                        hello.disk, hello.item
                    ),
                ));
            }
        }
    }
    let session = |resume: u64| Session {
        cycle: hello.cycle,
        disk_size: hello.disk_size,
        chunk_size: hello.chunk_size,
        last_seq: resume,
        ended: false,
    };
    let lost = |durable: u64| {
        refuse(
            error_code::BAD_SESSION,
            format!(
                "the gateway holds cycle {} of `{}`/`{}` up to seq {durable}, below the acknowledged {}: acknowledged frames were lost; resync the disk",
                hello.cycle, hello.item, hello.disk, hello.last_acked_seq
            ),
        )
    };
    if let Some((n, end_seq)) = state.complete {
        if hello.cycle < n {
            return Err(refuse(
                error_code::BAD_SESSION,
                format!(
                    "cycle {} of `{}`/`{}` is older than the newest complete cycle {n}",
                    hello.cycle, hello.item, hello.disk
                ),
            ));
        }
        if hello.cycle == n {
            if end_seq < hello.last_acked_seq {
                return Err(lost(end_seq));
            }
            return Ok(Welcomed {
                resume_from_seq: end_seq,
                abandon: None,
                session: None,
            });
        }
    }
    match state.receiving {
        Some((c, durable)) if c == hello.cycle => {
            if durable < hello.last_acked_seq {
                return Err(lost(durable));
            }
            Ok(Welcomed {
                resume_from_seq: durable,
                abandon: None,
                session: Some(session(durable)),
            })
        }
        // Any other cycle after the newest complete one starts afresh and abandons the
        // incomplete one — also a lower number: an agent that lost its state numbers its next
        // cycle from the newest complete one and cannot know the one being received.
        receiving => {
            // A new cycle: nothing of it is durable, so the agent cannot have acks for it.
            if hello.last_acked_seq != 0 {
                return Err(lost(0));
            }
            Ok(Welcomed {
                resume_from_seq: 0,
                abandon: receiving.map(|(c, _)| c),
                session: Some(session(0)),
            })
        }
    }
}

/// One accepted `Hello`'s stream of data frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The cycle.
    pub cycle: u64,
    /// The disk's size, bytes.
    pub disk_size: u64,
    /// Its chunk size, bytes.
    pub chunk_size: u32,
    /// The last accepted (durable or about to be) `seq`.
    last_seq: u64,
    /// `EndOfCycle` was accepted.
    ended: bool,
}

/// What an accepted data frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// A chunk or zero range: journal it.
    Data(u64),
    /// The cycle's `EndOfCycle`: journal it, then the cycle is complete once durable.
    End(u64),
}

impl Session {
    /// Chunks in the disk.
    pub fn chunks(&self) -> u64 {
        self.disk_size.div_ceil(u64::from(self.chunk_size))
    }

    /// The `seq` the next data frame must carry.
    pub fn expected_seq(&self) -> u64 {
        self.last_seq + 1
    }

    /// Whether `EndOfCycle` was accepted.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Checks data frame `f` (§7.2); on `Ok` the session expects the next `seq`. A refusal
    /// changes nothing.
    pub fn accept(&mut self, f: &AgentFrame) -> Result<Accepted, Refusal> {
        let seq = match f {
            AgentFrame::Hello(_) => {
                return Err(refuse(error_code::BAD_FRAME, "a second Hello on a session"));
            }
            AgentFrame::Chunk(c) => c.seq,
            AgentFrame::Zero(z) => z.seq,
            AgentFrame::EndOfCycle(e) => e.seq,
        };
        if self.ended {
            return Err(refuse(
                error_code::OUT_OF_SEQUENCE,
                format!(
                    "seq {seq} after the EndOfCycle of cycle {} (seq {})",
                    self.cycle, self.last_seq
                ),
            ));
        }
        if seq != self.expected_seq() {
            return Err(refuse(
                error_code::OUT_OF_SEQUENCE,
                format!("expected seq {}, got {seq}", self.expected_seq()),
            ));
        }
        let chunks = self.chunks();
        let out = match f {
            AgentFrame::Chunk(c) => {
                if c.index >= chunks {
                    return Err(refuse(
                        error_code::OUT_OF_RANGE,
                        format!(
                            "chunk {} is past the end of the disk ({chunks} chunks of {})",
                            c.index, self.chunk_size
                        ),
                    ));
                }
                let cs = u64::from(self.chunk_size);
                let want = (self.disk_size - c.index * cs).min(cs);
                if c.bytes.len() as u64 != want {
                    return Err(refuse(
                        error_code::OUT_OF_RANGE,
                        format!(
                            "chunk {} has {} bytes; it must have {want}",
                            c.index,
                            c.bytes.len()
                        ),
                    ));
                }
                Accepted::Data(seq)
            }
            AgentFrame::Zero(z) => {
                let end = z.first_index.checked_add(z.count);
                if end.is_none_or(|e| e > chunks) {
                    return Err(refuse(
                        error_code::OUT_OF_RANGE,
                        format!(
                            "zero range of {} chunks from {} is past the end of the disk ({chunks} chunks)",
                            z.count, z.first_index
                        ),
                    ));
                }
                Accepted::Data(seq)
            }
            AgentFrame::EndOfCycle(_) => Accepted::End(seq),
            AgentFrame::Hello(_) => unreachable!("refused above"),
        };
        self.last_seq = seq;
        if matches!(out, Accepted::End(_)) {
            self.ended = true;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use ferry_proto::frame::{Chunk, Consistency, EndOfCycle, Snapshot, Zero};

    const CS: u32 = 64 << 10;

    fn peer() -> Peer {
        Peer {
            agent: "web-agent".into(),
            items: vec!["web-01".into()],
        }
    }

    fn hello(cycle: u64, kind: CycleKind, last_acked: u64) -> Hello {
        Hello {
            version: 1,
            agent: "web-agent".into(),
            item: "web-01".into(),
            disk: "os".into(),
            // Two and a half chunks.
            disk_size: u64::from(CS) * 5 / 2,
            chunk_size: CS,
            cycle,
            cycle_kind: kind,
            last_acked_seq: last_acked,
        }
    }

    fn any_size(_: u32) -> Result<(), String> {
        Ok(())
    }

    fn chunk(seq: u64, index: u64, len: usize) -> AgentFrame {
        AgentFrame::Chunk(Chunk {
            seq,
            index,
            bytes: Bytes::from(vec![1; len]),
        })
    }

    fn end(seq: u64) -> AgentFrame {
        AgentFrame::EndOfCycle(EndOfCycle {
            seq,
            consistency: Consistency::Crash,
            snapshot: Snapshot::Reflink,
            tags: vec![],
        })
    }

    #[test]
    fn identity_and_item_are_checked() {
        let st = StreamState::default();
        let mut h = hello(1, CycleKind::Initial, 0);
        h.agent = "db-agent".into();
        let e = on_hello(&peer(), &h, &st, any_size).unwrap_err();
        assert_eq!(e.code, error_code::FORBIDDEN);
        let mut h = hello(1, CycleKind::Initial, 0);
        h.item = "db-01".into();
        let e = on_hello(&peer(), &h, &st, any_size).unwrap_err();
        assert_eq!(e.code, error_code::FORBIDDEN);
        assert!(e.message.contains("db-01"), "{e}");
    }

    #[test]
    fn a_first_cycle_is_initial_and_geometry_must_not_change() {
        let st = StreamState::default();
        let e = on_hello(&peer(), &hello(1, CycleKind::Delta, 0), &st, any_size).unwrap_err();
        assert_eq!(e.code, error_code::BAD_SESSION);
        let e = on_hello(&peer(), &hello(1, CycleKind::Initial, 0), &st, |_| {
            Err("chunk size 65536 is not the policy's".into())
        })
        .unwrap_err();
        assert_eq!(e.code, error_code::BAD_SESSION);
        let st = StreamState {
            geometry: Some((u64::from(CS) * 5 / 2, CS * 2)),
            complete: Some((1, 4)),
            receiving: None,
        };
        let e = on_hello(&peer(), &hello(2, CycleKind::Delta, 0), &st, any_size).unwrap_err();
        assert_eq!(e.code, error_code::BAD_SESSION);
        assert!(e.message.contains("chunks of"), "{e}");
    }

    #[test]
    fn cycles_resume_complete_abandon_and_refuse_the_past() {
        let geometry = Some((u64::from(CS) * 5 / 2, CS));
        // Receiving cycle 3 up to seq 5; cycle 2 complete at seq 9.
        let st = StreamState {
            geometry,
            complete: Some((2, 9)),
            receiving: Some((3, 5)),
        };
        // Resume cycle 3: the agent had acks up to 4; the gateway holds 5 (ack lost).
        let w = on_hello(&peer(), &hello(3, CycleKind::Delta, 4), &st, any_size).unwrap();
        assert_eq!(w.resume_from_seq, 5);
        assert_eq!(w.abandon, None);
        assert_eq!(w.session.unwrap().expected_seq(), 6);
        // Acknowledged frames the gateway no longer has.
        let e = on_hello(&peer(), &hello(3, CycleKind::Delta, 6), &st, any_size).unwrap_err();
        assert_eq!(e.code, error_code::BAD_SESSION);
        // The agent missed the EndOfCycle's ack of cycle 2: told it is complete.
        let w = on_hello(&peer(), &hello(2, CycleKind::Delta, 8), &st, any_size).unwrap();
        assert_eq!((w.resume_from_seq, w.session), (9, None));
        // A new cycle abandons the incomplete one.
        let w = on_hello(&peer(), &hello(4, CycleKind::Delta, 0), &st, any_size).unwrap();
        assert_eq!((w.resume_from_seq, w.abandon), (0, Some(3)));
        // ... but may not claim acks for a cycle nothing of which is durable.
        let e = on_hello(&peer(), &hello(4, CycleKind::Delta, 3), &st, any_size).unwrap_err();
        assert_eq!(e.code, error_code::BAD_SESSION);
        // The past.
        for c in [1, 0] {
            let e = on_hello(&peer(), &hello(c, CycleKind::Delta, 0), &st, any_size).unwrap_err();
            assert_eq!(e.code, error_code::BAD_SESSION, "cycle {c}");
        }
        let st = StreamState {
            geometry,
            complete: None,
            receiving: Some((3, 0)),
        };
        // An agent that lost its state numbers below the cycle being received: that one is
        // abandoned.
        let w = on_hello(&peer(), &hello(2, CycleKind::Delta, 0), &st, any_size).unwrap();
        assert_eq!((w.resume_from_seq, w.abandon), (0, Some(3)));
        let e = on_hello(&peer(), &hello(2, CycleKind::Delta, 1), &st, any_size).unwrap_err();
        assert_eq!(e.code, error_code::BAD_SESSION);
    }

    #[test]
    fn data_frames_in_sequence_inside_the_disk() {
        let st = StreamState::default();
        let mut s = on_hello(&peer(), &hello(1, CycleKind::Initial, 0), &st, any_size)
            .unwrap()
            .session
            .unwrap();
        assert_eq!(s.chunks(), 3);
        let full = CS as usize;
        let before = s.clone();
        // Duplicates, gaps and forged numbers change nothing.
        for bad in [0, 2, u64::MAX] {
            let e = s.accept(&chunk(bad, 0, full)).unwrap_err();
            assert_eq!(e.code, error_code::OUT_OF_SEQUENCE, "seq {bad}");
            assert_eq!(s, before);
        }
        assert_eq!(s.accept(&chunk(1, 0, full)), Ok(Accepted::Data(1)));
        let e = s.accept(&chunk(1, 1, full)).unwrap_err();
        assert_eq!(e.code, error_code::OUT_OF_SEQUENCE, "a replay");
        // Past the end, wrong lengths (the last chunk is a half one).
        let e = s.accept(&chunk(2, 3, full)).unwrap_err();
        assert_eq!(e.code, error_code::OUT_OF_RANGE);
        let e = s.accept(&chunk(2, 2, full)).unwrap_err();
        assert_eq!(e.code, error_code::OUT_OF_RANGE);
        let e = s.accept(&chunk(2, 1, full - 1)).unwrap_err();
        assert_eq!(e.code, error_code::OUT_OF_RANGE);
        assert_eq!(s.accept(&chunk(2, 2, full / 2)), Ok(Accepted::Data(2)));
        let zero = |seq, first_index, count| {
            AgentFrame::Zero(Zero {
                seq,
                first_index,
                count,
            })
        };
        for (first, count) in [(2, 2), (u64::MAX, 2), (3, 1)] {
            let e = s.accept(&zero(3, first, count)).unwrap_err();
            assert_eq!(e.code, error_code::OUT_OF_RANGE, "{first}+{count}");
        }
        assert_eq!(s.accept(&zero(3, 1, 1)), Ok(Accepted::Data(3)));
        let e = s
            .accept(&AgentFrame::Hello(hello(1, CycleKind::Initial, 0)))
            .unwrap_err();
        assert_eq!(e.code, error_code::BAD_FRAME);
        assert_eq!(s.accept(&end(4)), Ok(Accepted::End(4)));
        assert!(s.ended());
        let e = s.accept(&chunk(5, 0, full)).unwrap_err();
        assert_eq!(
            e.code,
            error_code::OUT_OF_SEQUENCE,
            "nothing after EndOfCycle"
        );
    }
}
