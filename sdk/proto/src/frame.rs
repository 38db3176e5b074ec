//! Replication frames, agent ⇄ gateway: the wire format of the data port, as a pure codec.
//!
//! Why one format for two jobs: the agent's frames cross a TLS stream to the gateway, and the
//! gateway then stores the very same bytes in its fsynced journal on the cache disk before it
//! acknowledges them. So every frame is *self-delimiting* (a fixed header gives the body
//! length) and *self-checking* (CRC-32C of the header and of the body): a torn journal record
//! or a corrupted byte is found by the same code that refuses a hostile peer, and a journal
//! replays with nothing but this module.
//!
//! No I/O here, no async runtime: [`encode`] appends a frame to a `Vec<u8>`; [`decode`] looks
//! at a buffer and answers "a frame of `n` bytes", "[`Decoded::NeedMore`] bytes" (the buffer is
//! only short: read more), or a [`FrameError`] saying what is wrong with which field of which
//! frame type. The gateway calls [`decode_agent`] (or [`decode_agent_shared`], which does not
//! copy chunk bytes), refusing anything only a gateway may send; the agent calls
//! [`decode_gateway`].
//!
//! Bounded before trusted: the header carries its own checksum, so a corrupted length is never
//! believed; a declared length is compared with [`Limits`] before the decoder waits for the
//! body, and nothing is allocated beyond the frame it holds in its buffer. Each field is
//! checked (names against the item naming rule, chunk sizes, zero ranges, tags); a decoded
//! frame re-encodes to exactly the bytes it came from (there is one encoding per frame).
//!
//! Not here: sequence numbers are only carried. Whether a `seq` is the expected one (not a
//! duplicate, not out of order, not forged), whether a chunk index is inside the disk or the
//! chunk has the session's size, and whom a certificate may speak for, are the session layer's
//! checks. The layout, byte by byte, and the session rules are in `docs/agent-protocol.md`.

use std::fmt;
use std::ops::Range;

use bytes::Bytes;

/// Version of the frame format written by this build (header byte 2). Negotiated before any
/// frame, by the HTTP/1.1 `Upgrade` token ([`UPGRADE_PROTOCOL`]).
pub const VERSION: u8 = 1;
/// Oldest frame version this build decodes (a journal may hold frames of older versions).
pub const OLDEST_VERSION: u8 = 1;
/// First two bytes of every frame: `"FR"`.
pub const MAGIC: [u8; 2] = *b"FR";
/// Length of the frame header, in every version.
pub const HEADER_LEN: usize = 16;
/// The HTTP/1.1 `Upgrade` protocol token of this version.
pub const UPGRADE_PROTOCOL: &str = "ferry-replication/1";
/// The path the agent asks to upgrade on the data port.
pub const REPLICATION_PATH: &str = "/api/v1/replication";
/// Default TCP port of the gateway's data port (the process role).
pub const DEFAULT_DATA_PORT: u16 = 9443;

/// Smallest chunk size. Copied from `ferry-store` (`MIN_CHUNK_SIZE`, `check_chunk_size` in
/// `gateway/store/src/lib.rs`): the agent depends on no other Ferry crate, and a chunk size
/// the vault refuses is of no use on the wire. Keep the two equal.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size (`ferry-store`'s `MAX_CHUNK_SIZE`; see [`MIN_CHUNK_SIZE`]).
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;
/// Longest name (agent, item, disk, point id, tag key): the item naming rule's 128.
pub const MAX_NAME_LEN: usize = 128;
/// Longest error code of an [`ErrorFrame`].
pub const MAX_CODE_LEN: usize = 64;
/// Most tags the format can carry (the count is one byte).
pub const MAX_TAGS: usize = u8::MAX as usize;
/// Longest tag value and error message the format can carry (two-byte lengths).
pub const MAX_TEXT_LEN: usize = u16::MAX as usize;

/// Bytes of a `Chunk` body before the chunk's bytes: `seq`, `index`.
const CHUNK_FIXED: usize = 16;

/// Stable error codes of [`ErrorFrame::code`]; see `docs/agent-protocol.md` for what an agent
/// does with each. An agent treats a code it does not know as transient.
pub mod error_code {
    /// A frame could not be decoded (the message is the [`super::FrameError`]). Fatal.
    pub const BAD_FRAME: &str = "bad_frame";
    /// The frame version or protocol version is not one the gateway speaks. Fatal.
    pub const UNSUPPORTED_VERSION: &str = "unsupported_version";
    /// The agent's certificate does not name the `Hello`'s agent, or the agent does not act
    /// for the item. Fatal.
    pub const FORBIDDEN: &str = "forbidden";
    /// The item or disk is not known to the gateway. Fatal.
    pub const UNKNOWN_ITEM: &str = "unknown_item";
    /// The `Hello` contradicts what the gateway holds (another disk size or chunk size, a
    /// cycle older than one already committed, an acknowledged sequence the gateway never
    /// gave). Fatal for the cycle: the agent resynchronises the disk.
    pub const BAD_SESSION: &str = "bad_session";
    /// A data frame's `seq` is not the previous one plus one (duplicate, gap, replay). The
    /// frame was not applied; transient: reconnect and resume.
    pub const OUT_OF_SEQUENCE: &str = "out_of_sequence";
    /// A chunk index or zero range passes the end of the disk, or a chunk has the wrong length.
    /// Fatal.
    pub const OUT_OF_RANGE: &str = "out_of_range";
    /// The agent sent nothing for too long while a session was open. Transient.
    pub const STALLED: &str = "stalled";
    /// The gateway is shutting down. Transient.
    pub const SHUTTING_DOWN: &str = "shutting_down";
    /// The gateway failed (its journal could not be written, …). Transient.
    pub const INTERNAL: &str = "internal";
    /// The cycle is larger than the gateway takes in one cycle (its
    /// `process.cache.max_cycle_bytes`): nothing more of it is taken. Fatal until the operator
    /// raises the limit (retrying would send the same cycle again). Added in version 1 after
    /// its first gateways: an agent that does not know it treats it as transient.
    pub const TOO_LARGE: &str = "too_large";
}

/// Who sends a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sender {
    /// The agent on the protected machine.
    Agent,
    /// The gateway (its process role).
    Gateway,
}

impl fmt::Display for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Sender::Agent => "agent",
            Sender::Gateway => "gateway",
        })
    }
}

/// A one-byte enumeration of the wire: its values, their codes and their names.
macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $code:literal => $s:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $v,)+
        }

        impl $name {
            /// Every value, in code order.
            pub const ALL: &'static [$name] = &[$($name::$v),+];

            /// The byte that stands for it on the wire.
            pub fn code(self) -> u8 {
                match self {
                    $($name::$v => $code,)+
                }
            }

            /// The value a wire byte stands for, if any.
            pub fn from_code(code: u8) -> Option<Self> {
                match code {
                    $($code => Some($name::$v),)+
                    _ => None,
                }
            }

            /// Its name, for messages and documents.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$v => $s,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum! {
    /// The type of a frame (header byte 3). The high bit says who sends it: clear from the
    /// agent, set from the gateway.
    FrameType {
        /// Agent: opens a session for one (item, disk, cycle).
        Hello = 0x01 => "Hello",
        /// Agent: one chunk's bytes.
        Chunk = 0x02 => "Chunk",
        /// Agent: a range of all-zero chunks.
        Zero = 0x03 => "Zero",
        /// Agent: the cycle is complete.
        EndOfCycle = 0x04 => "EndOfCycle",
        /// Gateway: answers `Hello`.
        Welcome = 0x81 => "Welcome",
        /// Gateway: the highest durable sequence number.
        Ack = 0x82 => "Ack",
        /// Gateway: a cycle became a recovery point.
        PointCommitted = 0x83 => "PointCommitted",
        /// Gateway: the session is refused or ended, with a stable code.
        Error = 0x84 => "Error",
        /// Gateway: come back later.
        Busy = 0x85 => "Busy",
    }
}

impl FrameType {
    /// Who sends frames of this type.
    pub fn sender(self) -> Sender {
        if self.code() & 0x80 == 0 {
            Sender::Agent
        } else {
            Sender::Gateway
        }
    }
}

wire_enum! {
    /// What kind of cycle a session carries.
    CycleKind {
        /// The first replication of the disk: every allocated extent.
        Initial = 1 => "initial",
        /// The chunks changed since the previous cycle.
        Delta = 2 => "delta",
        /// The chunks that differ between source and replica, after tracking was lost.
        Resync = 3 => "resync",
    }
}

wire_enum! {
    /// The consistency of the point a cycle makes.
    Consistency {
        /// Crash-consistent.
        Crash = 1 => "crash",
        /// Application-consistent (the application's pre/post scripts ran).
        App = 2 => "app",
    }
}

wire_enum! {
    /// How the agent took its point-in-time view of the disk.
    Snapshot {
        /// A copy-on-write clone of an image file (btrfs, xfs).
        Reflink = 1 => "reflink",
        /// An LVM snapshot.
        Lvm = 2 => "lvm",
        /// The configured pre-snapshot command (e.g. `fsfreeze -f`), read, post command.
        Quiesce = 3 => "quiesce",
        /// No snapshot: the disk was read live.
        None = 4 => "none",
    }
}

/// Agent → gateway: opens a session for one (item, disk, cycle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the session; equals the frame header's version.
    pub version: u8,
    /// The agent's name (its certificate's common name).
    pub agent: String,
    /// The protected item.
    pub item: String,
    /// The disk of the item.
    pub disk: String,
    /// Size of the disk in bytes (not 0).
    pub disk_size: u64,
    /// Chunk size in bytes: a power of two from [`MIN_CHUNK_SIZE`] to [`MAX_CHUNK_SIZE`].
    pub chunk_size: u32,
    /// Cycle number, from 1, increasing per (item, disk).
    pub cycle: u64,
    /// What the cycle carries.
    pub cycle_kind: CycleKind,
    /// The highest `Ack` the agent received for this (item, disk, cycle); 0 if none.
    pub last_acked_seq: u64,
}

/// Agent → gateway: the bytes of chunk `index`.
#[derive(Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Sequence number (from 1).
    pub seq: u64,
    /// Chunk index: the chunk covers bytes `index * chunk_size ..` of the disk.
    pub index: u64,
    /// The chunk's bytes: `chunk_size` of them, fewer only for the disk's last chunk
    /// (checked by the session, which knows the chunk size).
    pub bytes: Bytes,
}

impl fmt::Debug for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunk")
            .field("seq", &self.seq)
            .field("index", &self.index)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// Agent → gateway: chunks `first_index .. first_index + count` are all zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zero {
    /// Sequence number (from 1).
    pub seq: u64,
    /// First chunk of the range.
    pub first_index: u64,
    /// Number of chunks (at least 1).
    pub count: u64,
}

/// Agent → gateway: every chunk of the cycle was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndOfCycle {
    /// Sequence number (from 1).
    pub seq: u64,
    /// Consistency of the point.
    pub consistency: Consistency,
    /// How the view was taken.
    pub snapshot: Snapshot,
    /// Free-form tags for the recovery point: keys follow the naming rule and are distinct,
    /// values are UTF-8. Order is kept.
    pub tags: Vec<(String, String)>,
}

/// Gateway → agent: answers `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Protocol version of the session; equals the frame header's version.
    pub version: u8,
    /// The highest sequence number the gateway holds durably for this (item, disk, cycle),
    /// 0 if none: the agent sends `resume_from_seq + 1` next.
    pub resume_from_seq: u64,
}

/// Gateway → agent: every data frame up to `seq` is durable (fsynced in the journal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Highest durable sequence number (from 1).
    pub seq: u64,
}

/// Gateway → agent: cycle `cycle` is now recovery point `point_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointCommitted {
    /// The cycle (from 1).
    pub cycle: u64,
    /// The recovery point's id (`YYYYMMDDTHHMMSS.mmmZ-xxxxxxxx`; checked by the naming rule).
    pub point_id: String,
}

/// Gateway → agent: the session is refused or ended; the gateway closes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// Stable code (see [`error_code`]): 1 to 64 of `a–z 0–9 _`, starting with a letter.
    pub code: String,
    /// For people: UTF-8, may change between versions.
    pub message: String,
}

/// Gateway → agent: the gateway cannot take more now (cache over its limits); the agent
/// reconnects after `retry_after_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy {
    /// How long to wait before reconnecting, in milliseconds.
    pub retry_after_ms: u32,
}

/// A frame the agent sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentFrame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Chunk`].
    Chunk(Chunk),
    /// See [`Zero`].
    Zero(Zero),
    /// See [`EndOfCycle`].
    EndOfCycle(EndOfCycle),
}

/// A frame the gateway sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayFrame {
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`PointCommitted`].
    PointCommitted(PointCommitted),
    /// See [`ErrorFrame`].
    Error(ErrorFrame),
    /// See [`Busy`].
    Busy(Busy),
}

/// Any frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Sent by the agent.
    Agent(AgentFrame),
    /// Sent by the gateway.
    Gateway(GatewayFrame),
}

impl AgentFrame {
    /// Its type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            AgentFrame::Hello(_) => FrameType::Hello,
            AgentFrame::Chunk(_) => FrameType::Chunk,
            AgentFrame::Zero(_) => FrameType::Zero,
            AgentFrame::EndOfCycle(_) => FrameType::EndOfCycle,
        }
    }

    /// The sequence number of a data frame (`Chunk`, `Zero`, `EndOfCycle`); `None` for `Hello`.
    pub fn seq(&self) -> Option<u64> {
        match self {
            AgentFrame::Hello(_) => None,
            AgentFrame::Chunk(c) => Some(c.seq),
            AgentFrame::Zero(z) => Some(z.seq),
            AgentFrame::EndOfCycle(e) => Some(e.seq),
        }
    }
}

impl GatewayFrame {
    /// Its type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            GatewayFrame::Welcome(_) => FrameType::Welcome,
            GatewayFrame::Ack(_) => FrameType::Ack,
            GatewayFrame::PointCommitted(_) => FrameType::PointCommitted,
            GatewayFrame::Error(_) => FrameType::Error,
            GatewayFrame::Busy(_) => FrameType::Busy,
        }
    }
}

impl Frame {
    /// Its type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Agent(a) => a.frame_type(),
            Frame::Gateway(g) => g.frame_type(),
        }
    }
}

macro_rules! frame_from {
    ($($t:ident => $side:ident :: $v:ident => $outer:ident;)+) => {
        $(
            impl From<$t> for $side {
                fn from(f: $t) -> Self {
                    $side::$v(f)
                }
            }
            impl From<$t> for Frame {
                fn from(f: $t) -> Self {
                    Frame::$outer($side::$v(f))
                }
            }
        )+
    };
}

frame_from! {
    Hello => AgentFrame::Hello => Agent;
    Chunk => AgentFrame::Chunk => Agent;
    Zero => AgentFrame::Zero => Agent;
    EndOfCycle => AgentFrame::EndOfCycle => Agent;
    Welcome => GatewayFrame::Welcome => Gateway;
    Ack => GatewayFrame::Ack => Gateway;
    PointCommitted => GatewayFrame::PointCommitted => Gateway;
    ErrorFrame => GatewayFrame::Error => Gateway;
    Busy => GatewayFrame::Busy => Gateway;
}

impl From<AgentFrame> for Frame {
    fn from(f: AgentFrame) -> Self {
        Frame::Agent(f)
    }
}

impl From<GatewayFrame> for Frame {
    fn from(f: GatewayFrame) -> Self {
        Frame::Gateway(f)
    }
}

/// What the decoder accepts. Every length is checked against these before the decoder waits
/// for or allocates anything; limits above what the format can express are clamped to it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Longest chunk (`Chunk` bytes) and largest `Hello` chunk size. Default [`MAX_CHUNK_SIZE`].
    pub max_chunk_size: u32,
    /// Longest frame, header included. Default: a `Chunk` of `MAX_CHUNK_SIZE` bytes
    /// (4 MiB + 32 B).
    pub max_frame_bytes: usize,
    /// Most tags of an `EndOfCycle`. Default 32.
    pub max_tags: usize,
    /// Longest tag value, in bytes. Default 1024.
    pub max_tag_bytes: usize,
    /// Longest name (agent, item, disk, point id, tag key). Default [`MAX_NAME_LEN`].
    pub max_name_len: usize,
    /// Longest `Error` message, in bytes. Default 4096.
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_chunk_size: MAX_CHUNK_SIZE,
            max_frame_bytes: HEADER_LEN + CHUNK_FIXED + MAX_CHUNK_SIZE as usize,
            max_tags: 32,
            max_tag_bytes: 1024,
            max_name_len: MAX_NAME_LEN,
            max_message_bytes: 4096,
        }
    }
}

impl Limits {
    /// The widest limits: whatever the format can express. [`encode`] checks frames against
    /// these; a receiver's limits are usually tighter ([`Limits::default`]).
    pub fn protocol() -> Self {
        let mut l = Self {
            max_chunk_size: MAX_CHUNK_SIZE,
            max_frame_bytes: usize::MAX,
            max_tags: MAX_TAGS,
            max_tag_bytes: MAX_TEXT_LEN,
            max_name_len: MAX_NAME_LEN,
            max_message_bytes: MAX_TEXT_LEN,
        };
        l.max_frame_bytes = l.frame_bound();
        l
    }

    /// These limits for a session whose `Hello` announced `chunk_size`: no chunk longer than
    /// that, and no frame longer than the largest frame the limits then allow.
    pub fn for_chunk_size(&self, chunk_size: u32) -> Self {
        let mut l = self.clone();
        l.max_chunk_size = l.max_chunk_size.min(chunk_size);
        l.max_frame_bytes = l.max_frame_bytes.min(l.frame_bound());
        l
    }

    /// Largest body of a frame of type `ty` these limits allow, before `max_frame_bytes`.
    fn type_bound(&self, ty: FrameType) -> u64 {
        let name = len64(self.max_name_len.min(MAX_NAME_LEN));
        let tags = len64(self.max_tags.min(MAX_TAGS));
        let value = len64(self.max_tag_bytes.min(MAX_TEXT_LEN));
        let message = len64(self.max_message_bytes.min(MAX_TEXT_LEN));
        match ty {
            FrameType::Hello => 1 + 3 * (1 + name) + 8 + 4 + 8 + 1 + 8,
            FrameType::Chunk => {
                len64(CHUNK_FIXED) + u64::from(self.max_chunk_size.min(MAX_CHUNK_SIZE))
            }
            FrameType::Zero => 24,
            FrameType::EndOfCycle => 8 + 1 + 1 + 1 + tags * (1 + name + 2 + value),
            FrameType::Welcome => 9,
            FrameType::Ack => 8,
            FrameType::PointCommitted => 8 + 1 + name,
            FrameType::Error => 1 + len64(MAX_CODE_LEN) + 2 + message,
            FrameType::Busy => 4,
        }
    }

    /// Largest body of a frame of type `ty` accepted.
    fn body_bound(&self, ty: FrameType) -> u64 {
        let frame = u64::try_from(self.max_frame_bytes).unwrap_or(u64::MAX);
        self.type_bound(ty)
            .min(frame.saturating_sub(len64(HEADER_LEN)))
    }

    /// Longest frame of any type these limits allow (ignoring `max_frame_bytes`).
    fn frame_bound(&self) -> usize {
        let body = FrameType::ALL
            .iter()
            .map(|&t| self.type_bound(t))
            .max()
            .unwrap_or(0);
        usize::try_from(body)
            .unwrap_or(usize::MAX)
            .saturating_add(HEADER_LEN)
    }
}

fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// What [`decode`] found at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Decoded<F = Frame> {
    /// A whole frame, and how many bytes of the buffer it took.
    Frame(F, usize),
    /// The buffer holds the start of a frame (or nothing): at least this many more bytes
    /// are needed before the decoder can say more.
    NeedMore(usize),
}

/// Why bytes are not a frame. Every variant names the frame type and field when they are
/// known; none depends on anything but the bytes and the [`Limits`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The bytes do not start with [`MAGIC`]: not a frame, or the stream lost its framing.
    #[error(
        "not a Ferry replication frame: it starts with {:02x} {:02x}, not the magic 46 52 (\"FR\")",
        found[0],
        found[1]
    )]
    BadMagic {
        /// The first two bytes.
        found: [u8; 2],
    },
    /// The header's checksum does not match: the header is corrupted or torn, and its length
    /// cannot be trusted.
    #[error(
        "frame header checksum mismatch (stored {stored:08x}, computed {computed:08x}): the header is corrupted or torn"
    )]
    HeaderCrc {
        /// CRC-32C in the header.
        stored: u32,
        /// CRC-32C of the header's first 12 bytes.
        computed: u32,
    },
    /// The frame was written by a newer protocol version.
    #[error(
        "frame version {met} is newer than this build supports (versions {OLDEST_VERSION} to {supported}): upgrade this side"
    )]
    FutureVersion {
        /// Version in the header.
        met: u8,
        /// Newest version this build decodes.
        supported: u8,
    },
    /// The frame claims a version older than any this build decodes (0 is no version).
    #[error(
        "frame version {met} is not supported (the oldest version this build decodes is {oldest})"
    )]
    ObsoleteVersion {
        /// Version in the header.
        met: u8,
        /// Oldest version this build decodes.
        oldest: u8,
    },
    /// The frame type is not one of this version's.
    #[error("unknown frame type 0x{code:02x} in a version {version} frame")]
    UnknownType {
        /// The type byte.
        code: u8,
        /// The frame's version.
        version: u8,
    },
    /// The frame is one the other side sends (e.g. a `Welcome` from an agent).
    #[error("{frame} frame received from the {from}, but only the {} sends it", frame.sender())]
    WrongDirection {
        /// The frame type.
        frame: FrameType,
        /// Who sent it.
        from: Sender,
    },
    /// The header declares a body longer than the limits allow for its type.
    #[error("{frame} frame declares a {declared}-byte body; at most {max} bytes are accepted")]
    FrameTooLong {
        /// The frame type.
        frame: FrameType,
        /// Declared body length.
        declared: u64,
        /// Largest body accepted for this type.
        max: u64,
    },
    /// The body's checksum does not match: the body is corrupted or torn.
    #[error(
        "{frame} frame body checksum mismatch (stored {stored:08x}, computed {computed:08x}): the body is corrupted or torn"
    )]
    BodyCrc {
        /// The frame type.
        frame: FrameType,
        /// CRC-32C in the header.
        stored: u32,
        /// CRC-32C of the body.
        computed: u32,
    },
    /// The body ends before a field does.
    #[error("{frame} frame body ends inside field `{field}`")]
    Truncated {
        /// The frame type.
        frame: FrameType,
        /// The field cut short.
        field: &'static str,
    },
    /// The body goes on after its last field.
    #[error("{frame} frame has {extra} unexpected bytes after its last field")]
    TrailingBytes {
        /// The frame type.
        frame: FrameType,
        /// How many.
        extra: usize,
    },
    /// A name, tag value, code or message is longer than the limits allow.
    #[error("{frame} frame field `{field}` is {len} bytes long; at most {max} are accepted")]
    FieldTooLong {
        /// The frame type.
        frame: FrameType,
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A name does not follow the item naming rule.
    #[error(
        "{frame} frame field `{field}` ({value:?}) is not a valid name: {reason} (names are 1 to 128 letters, digits, `.`, `_` or `-`, not starting with `.` or `-`)"
    )]
    BadName {
        /// The frame type.
        frame: FrameType,
        /// The field.
        field: &'static str,
        /// The value (at most 64 bytes of it, invalid UTF-8 replaced).
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A text field is not UTF-8.
    #[error("{frame} frame field `{field}` is not valid UTF-8")]
    BadUtf8 {
        /// The frame type.
        frame: FrameType,
        /// The field.
        field: &'static str,
    },
    /// A sequence number, cycle or disk size is 0, which never names anything.
    #[error("{frame} frame field `{field}` is 0, which is reserved (numbering starts at 1)")]
    ZeroField {
        /// The frame type.
        frame: FrameType,
        /// The field.
        field: &'static str,
    },
    /// A chunk size is not a power of two.
    #[error("{frame} frame field `chunk_size` is {value}, which is not a power of two")]
    ChunkSizeNotPowerOfTwo {
        /// The frame type.
        frame: FrameType,
        /// The chunk size.
        value: u32,
    },
    /// A chunk size is a power of two outside the accepted range.
    #[error(
        "{frame} frame field `chunk_size` is {value}; chunk sizes from {min} to {max} bytes are accepted"
    )]
    ChunkSizeOutOfRange {
        /// The frame type.
        frame: FrameType,
        /// The chunk size.
        value: u32,
        /// Smallest accepted.
        min: u32,
        /// Largest accepted (the format's or the limits', whichever is smaller).
        max: u32,
    },
    /// A `Chunk` without bytes.
    #[error("Chunk frame field `bytes` is empty: a chunk carries at least one byte")]
    EmptyChunk,
    /// A `Zero` of zero chunks.
    #[error("Zero frame field `count` is 0: a zero range covers at least one chunk")]
    EmptyZeroRange,
    /// A `Zero` range past the last possible chunk index.
    #[error(
        "Zero frame range of {count} chunks from index {first_index} passes the largest chunk index"
    )]
    ZeroRangeOverflow {
        /// First chunk.
        first_index: u64,
        /// Number of chunks.
        count: u64,
    },
    /// An enumeration byte with no meaning.
    #[error("{frame} frame field `{field}` has unknown value {value}")]
    UnknownValue {
        /// The frame type.
        frame: FrameType,
        /// The field.
        field: &'static str,
        /// The byte.
        value: u8,
    },
    /// A `Hello` or `Welcome` whose protocol version is not its header's.
    #[error("{frame} frame field `version` is {body}, but its header says version {header}")]
    VersionMismatch {
        /// The frame type.
        frame: FrameType,
        /// The header's version.
        header: u8,
        /// The field's version.
        body: u8,
    },
    /// An `EndOfCycle` with more tags than the limits allow.
    #[error("EndOfCycle frame field `tags` has {count} tags; at most {max} are accepted")]
    TooManyTags {
        /// How many.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An `EndOfCycle` with the same tag key twice.
    #[error("EndOfCycle frame field `tags` has key {key:?} twice")]
    DuplicateTag {
        /// The key.
        key: String,
    },
    /// An `Error` whose code does not follow the code rule.
    #[error(
        "Error frame field `code` ({value:?}) is not a valid error code: {reason} (codes are 1 to 64 of `a-z`, `0-9` and `_`, starting with a letter)"
    )]
    BadErrorCode {
        /// The code (at most 64 bytes of it, invalid UTF-8 replaced).
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
}

// --- encoding ----------------------------------------------------------------------------------

/// Appends `frame` to `out`, in this build's [`VERSION`]. Refuses (appending nothing) a frame
/// that breaks a rule of the format or does not fit [`Limits::protocol`]; a receiver may still
/// refuse it under tighter limits.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) -> Result<(), FrameError> {
    match frame {
        Frame::Agent(a) => encode_agent(a, out),
        Frame::Gateway(g) => encode_gateway(g, out),
    }
}

/// [`encode`] of a frame the agent sends.
pub fn encode_agent(frame: &AgentFrame, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let limits = Limits::protocol();
    let ty = frame.frame_type();
    let start = begin(out);
    let mut w = Writer { out, ty };
    let r = match frame {
        AgentFrame::Hello(h) => w.hello(h, &limits),
        AgentFrame::Chunk(c) => w.chunk(c, &limits),
        AgentFrame::Zero(z) => w.zero(z),
        AgentFrame::EndOfCycle(e) => w.end_of_cycle(e, &limits),
    };
    finish(out, start, ty, r)
}

/// [`encode`] of a frame the gateway sends.
pub fn encode_gateway(frame: &GatewayFrame, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let limits = Limits::protocol();
    let ty = frame.frame_type();
    let start = begin(out);
    let mut w = Writer { out, ty };
    let r = match frame {
        GatewayFrame::Welcome(x) => w.welcome(x),
        GatewayFrame::Ack(x) => w.ack(x),
        GatewayFrame::PointCommitted(x) => w.point_committed(x, &limits),
        GatewayFrame::Error(x) => w.error(x, &limits),
        GatewayFrame::Busy(x) => {
            w.u32(x.retry_after_ms);
            Ok(())
        }
    };
    finish(out, start, ty, r)
}

/// Where a `Chunk` frame's bytes start in its encoding (header, `seq`, `index`).
pub const CHUNK_DATA_OFFSET: usize = HEADER_LEN + CHUNK_FIXED;

/// Encodes, in place, the `Chunk` frame whose bytes the caller already put at
/// `frame[CHUNK_DATA_OFFSET..]` (read from the disk straight into the frame, so they are not
/// copied again): writes `seq`, `index` and the header. The result is byte for byte what
/// [`encode_agent`] makes of the same chunk, and is checked the same way.
pub fn seal_chunk(frame: &mut [u8], seq: u64, index: u64) -> Result<(), FrameError> {
    let ty = FrameType::Chunk;
    let Some(data_len) = frame.len().checked_sub(CHUNK_DATA_OFFSET) else {
        return Err(FrameError::Truncated {
            frame: ty,
            field: "bytes",
        });
    };
    check_nonzero(ty, "seq", seq)?;
    check_chunk_len(data_len, &Limits::protocol())?;
    frame[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&seq.to_le_bytes());
    frame[HEADER_LEN + 8..CHUNK_DATA_OFFSET].copy_from_slice(&index.to_le_bytes());
    let body_len =
        u32::try_from(frame.len() - HEADER_LEN).map_err(|_| FrameError::FrameTooLong {
            frame: ty,
            declared: len64(frame.len() - HEADER_LEN),
            max: u64::from(u32::MAX),
        })?;
    seal(frame, VERSION, ty.code(), body_len);
    Ok(())
}

/// Reserves the header; returns where the frame starts.
fn begin(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    start
}

/// Writes the header of the frame at `start`, or removes it if its body was refused.
fn finish(
    out: &mut Vec<u8>,
    start: usize,
    ty: FrameType,
    r: Result<(), FrameError>,
) -> Result<(), FrameError> {
    if let Err(e) = r {
        out.truncate(start);
        return Err(e);
    }
    let body_len = out.len() - start - HEADER_LEN;
    let Ok(len) = u32::try_from(body_len) else {
        out.truncate(start);
        return Err(FrameError::FrameTooLong {
            frame: ty,
            declared: len64(body_len),
            max: u64::from(u32::MAX),
        });
    };
    seal(&mut out[start..], VERSION, ty.code(), len);
    Ok(())
}

/// Fills the 16-byte header of `frame` (header then body), declaring a `body_len`-byte body:
/// magic, version, type, length, body CRC, header CRC.
fn seal(frame: &mut [u8], version: u8, type_code: u8, body_len: u32) {
    let body_crc = crc32c(&frame[HEADER_LEN..]);
    frame[0..2].copy_from_slice(&MAGIC);
    frame[2] = version;
    frame[3] = type_code;
    frame[4..8].copy_from_slice(&body_len.to_le_bytes());
    frame[8..12].copy_from_slice(&body_crc.to_le_bytes());
    let header_crc = crc32c(&frame[0..12]);
    frame[12..16].copy_from_slice(&header_crc.to_le_bytes());
}

/// CRC-32C (Castagnoli, as iSCSI and ext4 use it; hardware-accelerated where available).
fn crc32c(data: &[u8]) -> u32 {
    let c = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data).to_le_bytes();
    u32::from_le_bytes([c[0], c[1], c[2], c[3]])
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
    ty: FrameType,
}

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// A one-byte length and the bytes (`s` was checked to fit).
    fn str8(&mut self, s: &str) {
        self.u8(u8::try_from(s.len()).unwrap_or(u8::MAX));
        self.out.extend_from_slice(s.as_bytes());
    }

    /// A two-byte length and the bytes (`s` was checked to fit).
    fn str16(&mut self, s: &str) {
        self.u16(u16::try_from(s.len()).unwrap_or(u16::MAX));
        self.out.extend_from_slice(s.as_bytes());
    }

    fn name(&mut self, field: &'static str, s: &str, limits: &Limits) -> Result<(), FrameError> {
        check_name(self.ty, field, s.as_bytes(), limits)?;
        self.str8(s);
        Ok(())
    }

    fn hello(&mut self, h: &Hello, limits: &Limits) -> Result<(), FrameError> {
        check_version(self.ty, VERSION, h.version)?;
        check_nonzero(self.ty, "disk_size", h.disk_size)?;
        check_chunk_size(self.ty, h.chunk_size, limits)?;
        check_nonzero(self.ty, "cycle", h.cycle)?;
        self.u8(h.version);
        self.name("agent", &h.agent, limits)?;
        self.name("item", &h.item, limits)?;
        self.name("disk", &h.disk, limits)?;
        self.u64(h.disk_size);
        self.u32(h.chunk_size);
        self.u64(h.cycle);
        self.u8(h.cycle_kind.code());
        self.u64(h.last_acked_seq);
        Ok(())
    }

    fn chunk(&mut self, c: &Chunk, limits: &Limits) -> Result<(), FrameError> {
        check_nonzero(self.ty, "seq", c.seq)?;
        check_chunk_len(c.bytes.len(), limits)?;
        self.u64(c.seq);
        self.u64(c.index);
        self.out.extend_from_slice(&c.bytes);
        Ok(())
    }

    fn zero(&mut self, z: &Zero) -> Result<(), FrameError> {
        check_nonzero(self.ty, "seq", z.seq)?;
        check_zero_range(z.first_index, z.count)?;
        self.u64(z.seq);
        self.u64(z.first_index);
        self.u64(z.count);
        Ok(())
    }

    fn end_of_cycle(&mut self, e: &EndOfCycle, limits: &Limits) -> Result<(), FrameError> {
        check_nonzero(self.ty, "seq", e.seq)?;
        check_tag_count(e.tags.len(), limits)?;
        for (i, (k, v)) in e.tags.iter().enumerate() {
            check_name(self.ty, "tag key", k.as_bytes(), limits)?;
            check_text_len(self.ty, "tag value", v.len(), limits.max_tag_bytes)?;
            check_unique_key(&e.tags[..i], k)?;
        }
        self.u64(e.seq);
        self.u8(e.consistency.code());
        self.u8(e.snapshot.code());
        self.u8(u8::try_from(e.tags.len()).unwrap_or(u8::MAX));
        for (k, v) in &e.tags {
            self.str8(k);
            self.str16(v);
        }
        Ok(())
    }

    fn welcome(&mut self, w: &Welcome) -> Result<(), FrameError> {
        check_version(self.ty, VERSION, w.version)?;
        self.u8(w.version);
        self.u64(w.resume_from_seq);
        Ok(())
    }

    fn ack(&mut self, a: &Ack) -> Result<(), FrameError> {
        check_nonzero(self.ty, "seq", a.seq)?;
        self.u64(a.seq);
        Ok(())
    }

    fn point_committed(&mut self, p: &PointCommitted, limits: &Limits) -> Result<(), FrameError> {
        check_nonzero(self.ty, "cycle", p.cycle)?;
        self.u64(p.cycle);
        self.name("point_id", &p.point_id, limits)
    }

    fn error(&mut self, e: &ErrorFrame, limits: &Limits) -> Result<(), FrameError> {
        check_code(e.code.as_bytes())?;
        check_text_len(
            self.ty,
            "message",
            e.message.len(),
            limits.max_message_bytes,
        )?;
        self.str8(&e.code);
        self.str16(&e.message);
        Ok(())
    }
}

// --- field rules (shared by encoder and decoder) --------------------------------------------

fn check_version(ty: FrameType, header: u8, body: u8) -> Result<(), FrameError> {
    if header != body {
        return Err(FrameError::VersionMismatch {
            frame: ty,
            header,
            body,
        });
    }
    Ok(())
}

fn check_nonzero(ty: FrameType, field: &'static str, v: u64) -> Result<(), FrameError> {
    if v == 0 {
        return Err(FrameError::ZeroField { frame: ty, field });
    }
    Ok(())
}

fn check_chunk_size(ty: FrameType, v: u32, limits: &Limits) -> Result<(), FrameError> {
    if !v.is_power_of_two() {
        return Err(FrameError::ChunkSizeNotPowerOfTwo {
            frame: ty,
            value: v,
        });
    }
    let max = limits.max_chunk_size.min(MAX_CHUNK_SIZE);
    if !(MIN_CHUNK_SIZE..=max).contains(&v) {
        return Err(FrameError::ChunkSizeOutOfRange {
            frame: ty,
            value: v,
            min: MIN_CHUNK_SIZE,
            max,
        });
    }
    Ok(())
}

/// A chunk's length, for the encoder (the decoder bounds it by the frame length first).
fn check_chunk_len(len: usize, limits: &Limits) -> Result<(), FrameError> {
    if len == 0 {
        return Err(FrameError::EmptyChunk);
    }
    let body = len64(CHUNK_FIXED).saturating_add(len64(len));
    let max = limits.body_bound(FrameType::Chunk);
    if body > max {
        return Err(FrameError::FrameTooLong {
            frame: FrameType::Chunk,
            declared: body,
            max,
        });
    }
    Ok(())
}

fn check_zero_range(first_index: u64, count: u64) -> Result<(), FrameError> {
    if count == 0 {
        return Err(FrameError::EmptyZeroRange);
    }
    if first_index.checked_add(count).is_none() {
        return Err(FrameError::ZeroRangeOverflow { first_index, count });
    }
    Ok(())
}

fn check_tag_count(count: usize, limits: &Limits) -> Result<(), FrameError> {
    let max = limits.max_tags.min(MAX_TAGS);
    if count > max {
        return Err(FrameError::TooManyTags { count, max });
    }
    Ok(())
}

fn check_unique_key(before: &[(String, String)], key: &str) -> Result<(), FrameError> {
    if before.iter().any(|(k, _)| k == key) {
        return Err(FrameError::DuplicateTag {
            key: key.to_owned(),
        });
    }
    Ok(())
}

fn check_text_len(
    ty: FrameType,
    field: &'static str,
    len: usize,
    limit: usize,
) -> Result<(), FrameError> {
    let max = limit.min(MAX_TEXT_LEN);
    if len > max {
        return Err(FrameError::FieldTooLong {
            frame: ty,
            field,
            len,
            max,
        });
    }
    Ok(())
}

/// At most 64 bytes of `raw`, for an error message.
fn excerpt(raw: &[u8]) -> String {
    String::from_utf8_lossy(&raw[..raw.len().min(64)]).into_owned()
}

/// The item naming rule (`ferry_store::check_name`): 1–128 of `A–Z a–z 0–9 . _ -`, not
/// starting with `.` or `-`; and no longer than the limits.
fn check_name(
    ty: FrameType,
    field: &'static str,
    raw: &[u8],
    limits: &Limits,
) -> Result<(), FrameError> {
    let max = limits.max_name_len.min(MAX_NAME_LEN);
    if raw.len() > max {
        return Err(FrameError::FieldTooLong {
            frame: ty,
            field,
            len: raw.len(),
            max,
        });
    }
    let reason = if raw.is_empty() {
        "it is empty"
    } else if raw.starts_with(b".") || raw.starts_with(b"-") {
        "it starts with `.` or `-`"
    } else if !raw
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        "it has a character other than a letter, a digit, `.`, `_` or `-`"
    } else {
        return Ok(());
    };
    Err(FrameError::BadName {
        frame: ty,
        field,
        value: excerpt(raw),
        reason,
    })
}

/// The error code rule: 1–64 of `a–z 0–9 _`, starting with a letter.
fn check_code(raw: &[u8]) -> Result<(), FrameError> {
    if raw.len() > MAX_CODE_LEN {
        return Err(FrameError::FieldTooLong {
            frame: FrameType::Error,
            field: "code",
            len: raw.len(),
            max: MAX_CODE_LEN,
        });
    }
    let reason = match raw.first() {
        None => "it is empty",
        Some(c) if !c.is_ascii_lowercase() => "it does not start with a letter `a-z`",
        Some(_)
            if !raw
                .iter()
                .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') =>
        {
            "it has a character other than `a-z`, `0-9` or `_`"
        }
        Some(_) => return Ok(()),
    };
    Err(FrameError::BadErrorCode {
        value: excerpt(raw),
        reason,
    })
}

// --- decoding ----------------------------------------------------------------------------------

/// Decodes the frame at the start of `buf`, whichever side sent it. Chunk bytes are copied
/// out of `buf` (see [`decode_agent_shared`] for a decoder that does not copy them).
pub fn decode(buf: &[u8], limits: &Limits) -> Result<Decoded, FrameError> {
    decode_with(buf, limits, None, |r| Bytes::copy_from_slice(&buf[r]))
}

/// Decodes a frame the agent sent (what the gateway reads): a frame only the gateway sends
/// is refused as soon as its header is in (before its body is awaited).
pub fn decode_agent(buf: &[u8], limits: &Limits) -> Result<Decoded<AgentFrame>, FrameError> {
    let d = decode_with(buf, limits, Some(Sender::Agent), |r| {
        Bytes::copy_from_slice(&buf[r])
    })?;
    Ok(only_agent(d))
}

/// [`decode_agent`] without copying: a `Chunk`'s bytes are a slice of `buf` (which the
/// gateway read the frame into).
pub fn decode_agent_shared(
    buf: &Bytes,
    limits: &Limits,
) -> Result<Decoded<AgentFrame>, FrameError> {
    let d = decode_with(buf, limits, Some(Sender::Agent), |r| buf.slice(r))?;
    Ok(only_agent(d))
}

/// Decodes a frame the gateway sent (what the agent reads): a frame only the agent sends is
/// refused as soon as its header is in.
pub fn decode_gateway(buf: &[u8], limits: &Limits) -> Result<Decoded<GatewayFrame>, FrameError> {
    let d = decode_with(buf, limits, Some(Sender::Gateway), |r| {
        Bytes::copy_from_slice(&buf[r])
    })?;
    Ok(match d {
        Decoded::Frame(Frame::Gateway(f), n) => Decoded::Frame(f, n),
        Decoded::Frame(Frame::Agent(_), _) => unreachable!("direction checked from the header"),
        Decoded::NeedMore(n) => Decoded::NeedMore(n),
    })
}

fn only_agent(d: Decoded) -> Decoded<AgentFrame> {
    match d {
        Decoded::Frame(Frame::Agent(f), n) => Decoded::Frame(f, n),
        Decoded::Frame(Frame::Gateway(_), _) => unreachable!("direction checked from the header"),
        Decoded::NeedMore(n) => Decoded::NeedMore(n),
    }
}

/// A valid frame header.
struct Header {
    version: u8,
    ty: FrameType,
    /// Whole frame: header and body.
    total: usize,
    body_crc: u32,
}

/// Checks the header at the start of `buf`, in this order: magic (as soon as two bytes are
/// in), header CRC, version, type, direction, length. `Ok(Err(n))`: `n` more bytes needed.
fn decode_header(
    buf: &[u8],
    limits: &Limits,
    from: Option<Sender>,
) -> Result<Result<Header, usize>, FrameError> {
    if let Some(m) = buf.get(0..2)
        && m != MAGIC
    {
        return Err(FrameError::BadMagic {
            found: [m[0], m[1]],
        });
    }
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(Err(HEADER_LEN - buf.len()));
    };
    let word = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    // The header's layout is the same in every version, so its checksum is checked first:
    // a corrupted version byte or length is reported as corruption, never trusted.
    let (stored, computed) = (word(12), crc32c(&h[0..12]));
    if stored != computed {
        return Err(FrameError::HeaderCrc { stored, computed });
    }
    let version = h[2];
    if version > VERSION {
        return Err(FrameError::FutureVersion {
            met: version,
            supported: VERSION,
        });
    }
    if version < OLDEST_VERSION {
        return Err(FrameError::ObsoleteVersion {
            met: version,
            oldest: OLDEST_VERSION,
        });
    }
    let ty = FrameType::from_code(h[3]).ok_or(FrameError::UnknownType {
        code: h[3],
        version,
    })?;
    if let Some(from) = from
        && ty.sender() != from
    {
        return Err(FrameError::WrongDirection { frame: ty, from });
    }
    let declared = word(4);
    let max = limits.body_bound(ty);
    if u64::from(declared) > max {
        return Err(FrameError::FrameTooLong {
            frame: ty,
            declared: u64::from(declared),
            max,
        });
    }
    // `declared` is at most `max_frame_bytes - HEADER_LEN`, itself a `usize`.
    let total = HEADER_LEN + usize::try_from(declared).unwrap_or(usize::MAX - HEADER_LEN);
    Ok(Ok(Header {
        version,
        ty,
        total,
        body_crc: word(8),
    }))
}

fn decode_with(
    buf: &[u8],
    limits: &Limits,
    from: Option<Sender>,
    chunk_bytes: impl FnOnce(Range<usize>) -> Bytes,
) -> Result<Decoded, FrameError> {
    let h = match decode_header(buf, limits, from)? {
        Ok(h) => h,
        Err(need) => return Ok(Decoded::NeedMore(need)),
    };
    let Some(body) = buf.get(HEADER_LEN..h.total) else {
        return Ok(Decoded::NeedMore(h.total - buf.len()));
    };
    let computed = crc32c(body);
    if computed != h.body_crc {
        return Err(FrameError::BodyCrc {
            frame: h.ty,
            stored: h.body_crc,
            computed,
        });
    }
    let mut r = Reader {
        ty: h.ty,
        buf: body,
        pos: 0,
    };
    let frame: Frame = match h.ty {
        FrameType::Hello => r.hello(h.version, limits)?.into(),
        FrameType::Chunk => {
            let seq = r.u64("seq")?;
            let index = r.u64("index")?;
            check_nonzero(h.ty, "seq", seq)?;
            // The length was bounded by the header check (`Limits::max_chunk_size`).
            let rest = r.pos..body.len();
            if rest.is_empty() {
                return Err(FrameError::EmptyChunk);
            }
            r.pos = body.len();
            let bytes = chunk_bytes(HEADER_LEN + rest.start..HEADER_LEN + rest.end);
            Chunk { seq, index, bytes }.into()
        }
        FrameType::Zero => {
            let seq = r.u64("seq")?;
            let first_index = r.u64("first_index")?;
            let count = r.u64("count")?;
            check_nonzero(h.ty, "seq", seq)?;
            check_zero_range(first_index, count)?;
            Zero {
                seq,
                first_index,
                count,
            }
            .into()
        }
        FrameType::EndOfCycle => r.end_of_cycle(limits)?.into(),
        FrameType::Welcome => {
            let version = r.u8("version")?;
            let resume_from_seq = r.u64("resume_from_seq")?;
            check_version(h.ty, h.version, version)?;
            Welcome {
                version,
                resume_from_seq,
            }
            .into()
        }
        FrameType::Ack => {
            let seq = r.u64("seq")?;
            check_nonzero(h.ty, "seq", seq)?;
            Ack { seq }.into()
        }
        FrameType::PointCommitted => {
            let cycle = r.u64("cycle")?;
            check_nonzero(h.ty, "cycle", cycle)?;
            let point_id = r.name("point_id", limits)?;
            PointCommitted { cycle, point_id }.into()
        }
        FrameType::Error => {
            let code = r.str8("code")?;
            check_code(code)?;
            let message = r.text16("message", limits.max_message_bytes)?;
            ErrorFrame {
                code: r.utf8("code", code)?,
                message,
            }
            .into()
        }
        FrameType::Busy => Busy {
            retry_after_ms: r.u32("retry_after_ms")?,
        }
        .into(),
    };
    r.finish()?;
    Ok(Decoded::Frame(frame, h.total))
}

/// Reads the fields of one body; every error names the frame type and the field.
struct Reader<'a> {
    ty: FrameType,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], FrameError> {
        let s = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or(FrameError::Truncated {
                frame: self.ty,
                field,
            })?;
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FrameError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn str8(&mut self, field: &'static str) -> Result<&'a [u8], FrameError> {
        let n = self.u8(field)?;
        self.take(usize::from(n), field)
    }

    fn utf8(&self, field: &'static str, raw: &[u8]) -> Result<String, FrameError> {
        String::from_utf8(raw.to_vec()).map_err(|_| FrameError::BadUtf8 {
            frame: self.ty,
            field,
        })
    }

    /// A one-byte length and a name.
    fn name(&mut self, field: &'static str, limits: &Limits) -> Result<String, FrameError> {
        let raw = self.str8(field)?;
        check_name(self.ty, field, raw, limits)?;
        self.utf8(field, raw)
    }

    /// A two-byte length and UTF-8 text of at most `limit` bytes (checked before it is read).
    fn text16(&mut self, field: &'static str, limit: usize) -> Result<String, FrameError> {
        let n = usize::from(self.u16(field)?);
        check_text_len(self.ty, field, n, limit)?;
        let raw = self.take(n, field)?;
        self.utf8(field, raw)
    }

    fn enum_byte<T>(
        &mut self,
        field: &'static str,
        from_code: fn(u8) -> Option<T>,
    ) -> Result<T, FrameError> {
        let value = self.u8(field)?;
        from_code(value).ok_or(FrameError::UnknownValue {
            frame: self.ty,
            field,
            value,
        })
    }

    fn finish(&self) -> Result<(), FrameError> {
        if self.pos != self.buf.len() {
            return Err(FrameError::TrailingBytes {
                frame: self.ty,
                extra: self.buf.len() - self.pos,
            });
        }
        Ok(())
    }

    fn hello(&mut self, header_version: u8, limits: &Limits) -> Result<Hello, FrameError> {
        let version = self.u8("version")?;
        check_version(self.ty, header_version, version)?;
        let agent = self.name("agent", limits)?;
        let item = self.name("item", limits)?;
        let disk = self.name("disk", limits)?;
        let disk_size = self.u64("disk_size")?;
        check_nonzero(self.ty, "disk_size", disk_size)?;
        let chunk_size = self.u32("chunk_size")?;
        check_chunk_size(self.ty, chunk_size, limits)?;
        let cycle = self.u64("cycle")?;
        check_nonzero(self.ty, "cycle", cycle)?;
        let cycle_kind = self.enum_byte("cycle_kind", CycleKind::from_code)?;
        let last_acked_seq = self.u64("last_acked_seq")?;
        Ok(Hello {
            version,
            agent,
            item,
            disk,
            disk_size,
            chunk_size,
            cycle,
            cycle_kind,
            last_acked_seq,
        })
    }

    fn end_of_cycle(&mut self, limits: &Limits) -> Result<EndOfCycle, FrameError> {
        let seq = self.u64("seq")?;
        check_nonzero(self.ty, "seq", seq)?;
        let consistency = self.enum_byte("consistency", Consistency::from_code)?;
        let snapshot = self.enum_byte("snapshot", Snapshot::from_code)?;
        let count = usize::from(self.u8("tags")?);
        check_tag_count(count, limits)?;
        let mut tags = Vec::with_capacity(count);
        for _ in 0..count {
            let key = self.name("tag key", limits)?;
            check_unique_key(&tags, &key)?;
            let value = self.text16("tag value", limits.max_tag_bytes)?;
            tags.push((key, value));
        }
        Ok(EndOfCycle {
            seq,
            consistency,
            snapshot,
            tags,
        })
    }
}

/// Entry points for fuzzing the decoder: the cargo-fuzz target `proto_frame` (`fuzz/`) and the
/// mutation smoke test that runs in every `cargo test`. Each asserts the decoder's contract:
/// no panic; a frame re-encodes to exactly the bytes it was decoded from; "need more" asks for
/// at least one byte and never for more than the limits allow; the direction-checking decoders
/// agree with [`decode`]; an error's message is one line of at most 1 KiB.
pub mod fuzzing {
    use super::*;

    /// Limits much tighter than the defaults, so the fuzzer meets them.
    pub fn tight_limits() -> Limits {
        Limits {
            max_chunk_size: MIN_CHUNK_SIZE,
            max_frame_bytes: 4096,
            max_tags: 2,
            max_tag_bytes: 8,
            max_name_len: 8,
            max_message_bytes: 16,
        }
    }

    /// `data` as a stream of frames, under default and tight limits; then `data[1..]` as the
    /// body of a frame of type `data[0]` with correct checksums, so that fuzzing reaches the
    /// body checks behind the CRCs.
    pub fn decode(data: &[u8]) {
        for limits in [Limits::default(), tight_limits()] {
            stream(data, &limits);
        }
        if let Some((&ty, body)) = data.split_first()
            && let Ok(len) = u32::try_from(body.len())
        {
            let mut frame = vec![0; HEADER_LEN];
            frame.extend_from_slice(body);
            seal(&mut frame, VERSION, ty, len);
            for limits in [Limits::default(), tight_limits()] {
                stream(&frame, &limits);
            }
        }
    }

    /// Decodes frames from `data` until it needs more or fails, checking each outcome.
    pub fn stream(mut data: &[u8], limits: &Limits) {
        loop {
            let r = super::decode(data, limits);
            let agent = decode_agent(data, limits);
            let gateway = decode_gateway(data, limits);
            match r {
                Ok(Decoded::Frame(frame, n)) => {
                    assert!((HEADER_LEN..=data.len()).contains(&n), "consumed {n}");
                    assert!(
                        n <= limits.max_frame_bytes,
                        "frame of {n} bytes over the limit"
                    );
                    let mut again = Vec::new();
                    encode(&frame, &mut again).expect("a decoded frame encodes");
                    assert_eq!(again, data[..n], "{frame:?} re-encodes to other bytes");
                    match &frame {
                        Frame::Agent(a) => {
                            assert_eq!(agent, Ok(Decoded::Frame(a.clone(), n)));
                            assert!(matches!(gateway, Err(FrameError::WrongDirection { .. })));
                        }
                        Frame::Gateway(g) => {
                            assert_eq!(gateway, Ok(Decoded::Frame(g.clone(), n)));
                            assert!(matches!(agent, Err(FrameError::WrongDirection { .. })));
                        }
                    }
                    data = &data[n..];
                }
                Ok(Decoded::NeedMore(k)) => {
                    assert!(k >= 1, "asked for 0 more bytes");
                    let bound = limits.max_frame_bytes.max(HEADER_LEN);
                    assert!(
                        data.len() + k <= bound,
                        "asked for {k} more bytes after {} with a {bound}-byte limit",
                        data.len()
                    );
                    for other in [agent.map(|_| ()), gateway.map(|_| ())] {
                        assert!(
                            matches!(other, Ok(()) | Err(FrameError::WrongDirection { .. })),
                            "{other:?}"
                        );
                    }
                    return;
                }
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        !msg.is_empty() && msg.len() <= 1024 && !msg.contains('\n'),
                        "{msg}"
                    );
                    for other in [agent.err(), gateway.err()] {
                        let other = other.expect("the same bytes fail for every decoder");
                        assert!(
                            other == e || matches!(other, FrameError::WrongDirection { .. }),
                            "{other:?} vs {e:?}"
                        );
                    }
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // tests build small fixtures
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// One frame of each type: the committed test vectors below are their encodings.
    fn samples() -> Vec<Frame> {
        vec![
            Hello {
                version: 1,
                agent: "web-01".into(),
                item: "web-01".into(),
                disk: "sda".into(),
                disk_size: 1 << 30,
                chunk_size: 256 << 10,
                cycle: 7,
                cycle_kind: CycleKind::Delta,
                last_acked_seq: 41,
            }
            .into(),
            Chunk {
                seq: 42,
                index: 3,
                bytes: Bytes::from_static(b"ferry"),
            }
            .into(),
            Zero {
                seq: 43,
                first_index: 8,
                count: 4,
            }
            .into(),
            EndOfCycle {
                seq: 44,
                consistency: Consistency::App,
                snapshot: Snapshot::Quiesce,
                tags: vec![
                    ("app".into(), "postgres".into()),
                    ("script".into(), "pre-freeze".into()),
                ],
            }
            .into(),
            Welcome {
                version: 1,
                resume_from_seq: 41,
            }
            .into(),
            Ack { seq: 44 }.into(),
            PointCommitted {
                cycle: 7,
                point_id: "20261126T075405.135Z-1c866aa0".into(),
            }
            .into(),
            ErrorFrame {
                code: "out_of_sequence".into(),
                message: "expected seq 43, got 45".into(),
            }
            .into(),
            Busy {
                retry_after_ms: 5000,
            }
            .into(),
        ]
    }

    /// The encodings of [`samples`], as in `docs/agent-protocol.md`. If this test fails, the
    /// format changed: that needs a new version (see the document), not a new vector.
    const VECTORS: [(&str, &str); 9] = [
        (
            "Hello",
            "46520101300000003a7b7cdb6d6acf8e01067765622d3031067765622d3031037364610000004000000000000004000700000000000000022900000000000000",
        ),
        (
            "Chunk",
            "465201021500000009a668a7295998dc2a0000000000000003000000000000006665727279",
        ),
        (
            "Zero",
            "465201031800000085b7a629072a18d62b0000000000000008000000000000000400000000000000",
        ),
        (
            "EndOfCycle",
            "465201042c000000ec6aebc6f762b7532c00000000000000020302036170700800706f737467726573067363726970740a007072652d667265657a65",
        ),
        (
            "Welcome",
            "46520181090000008fa2dc49243e7b36012900000000000000",
        ),
        ("Ack", "4652018208000000a4510ee206e3b7352c00000000000000"),
        (
            "PointCommitted",
            "4652018326000000d105d1bd0b3510f407000000000000001d3230323631313236543037353430352e3133355a2d3163383636616130",
        ),
        (
            "Error",
            "4652018429000000814152e1b57729430f6f75745f6f665f73657175656e636517006578706563746564207365712034332c20676f74203435",
        ),
        ("Busy", "4652018504000000e75c0f76ab862b1d88130000"),
    ];

    fn enc(f: impl Into<Frame>) -> Vec<u8> {
        let mut v = Vec::new();
        encode(&f.into(), &mut v).expect("valid frame");
        v
    }

    /// A frame of type byte `ty` and version `version` around `body`, with correct checksums.
    fn raw(version: u8, ty: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![0; HEADER_LEN];
        v.extend_from_slice(body);
        seal(&mut v, version, ty, body.len() as u32);
        v
    }

    fn err(buf: &[u8]) -> FrameError {
        err_with(buf, &Limits::default())
    }

    fn err_with(buf: &[u8], limits: &Limits) -> FrameError {
        decode(buf, limits).expect_err("refused")
    }

    /// A body written field by field.
    #[derive(Default)]
    struct B(Vec<u8>);

    impl B {
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn s8(self, s: &[u8]) -> Self {
            let mut b = self.u8(s.len() as u8);
            b.0.extend_from_slice(s);
            b
        }
        fn s16(self, s: &[u8]) -> Self {
            let mut b = self.u16(s.len() as u16);
            b.0.extend_from_slice(s);
            b
        }
        fn frame(&self, ty: FrameType) -> Vec<u8> {
            raw(VERSION, ty.code(), &self.0)
        }
    }

    /// The fields of a `Hello`, raw, to break one at a time.
    struct RawHello {
        version: u8,
        agent: Vec<u8>,
        item: Vec<u8>,
        disk: Vec<u8>,
        disk_size: u64,
        chunk_size: u32,
        cycle: u64,
        kind: u8,
        last: u64,
    }

    fn hello_with(edit: impl FnOnce(&mut RawHello)) -> Vec<u8> {
        let mut h = RawHello {
            version: 1,
            agent: b"web-01".to_vec(),
            item: b"web-01".to_vec(),
            disk: b"sda".to_vec(),
            disk_size: 1 << 30,
            chunk_size: 256 << 10,
            cycle: 7,
            kind: 2,
            last: 41,
        };
        edit(&mut h);
        B::default()
            .u8(h.version)
            .s8(&h.agent)
            .s8(&h.item)
            .s8(&h.disk)
            .u64(h.disk_size)
            .u32(h.chunk_size)
            .u64(h.cycle)
            .u8(h.kind)
            .u64(h.last)
            .frame(FrameType::Hello)
    }

    fn end_of_cycle_with(consistency: u8, snapshot: u8, tags: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut b = B::default()
            .u64(44)
            .u8(consistency)
            .u8(snapshot)
            .u8(tags.len() as u8);
        for (k, v) in tags {
            b = b.s8(k).s16(v);
        }
        b.frame(FrameType::EndOfCycle)
    }

    #[test]
    fn crc_is_crc32c() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn samples_cover_every_frame_type() {
        let types: Vec<FrameType> = samples().iter().map(Frame::frame_type).collect();
        assert_eq!(types, FrameType::ALL);
        for t in FrameType::ALL {
            assert_eq!(FrameType::from_code(t.code()), Some(*t));
        }
    }

    #[test]
    fn every_frame_type_round_trips() {
        let limits = Limits::default();
        for f in samples() {
            let mut v = b"prefix".to_vec();
            encode(&f, &mut v).unwrap();
            let v = v.split_off(6);
            assert_eq!(decode(&v, &limits), Ok(Decoded::Frame(f.clone(), v.len())));
            let mut longer = v.clone();
            longer.extend_from_slice(b"next frame");
            assert_eq!(
                decode(&longer, &limits),
                Ok(Decoded::Frame(f.clone(), v.len()))
            );
            match &f {
                Frame::Agent(a) => {
                    assert_eq!(
                        decode_agent(&v, &limits),
                        Ok(Decoded::Frame(a.clone(), v.len()))
                    );
                    let shared = Bytes::from(v.clone());
                    assert_eq!(
                        decode_agent_shared(&shared, &limits),
                        Ok(Decoded::Frame(a.clone(), v.len()))
                    );
                }
                Frame::Gateway(g) => assert_eq!(
                    decode_gateway(&v, &limits),
                    Ok(Decoded::Frame(g.clone(), v.len()))
                ),
            }
        }
        // Largest chunk under the default limits.
        let big = Chunk {
            seq: 1,
            index: u64::MAX,
            bytes: Bytes::from(vec![0xA5; MAX_CHUNK_SIZE as usize]),
        };
        let v = enc(big.clone());
        assert_eq!(v.len(), limits.max_frame_bytes);
        assert_eq!(
            decode_agent(&v, &limits),
            Ok(Decoded::Frame(AgentFrame::Chunk(big), v.len()))
        );
    }

    /// A chunk sealed in place is what `encode_agent` makes of it, and is checked the same way.
    #[test]
    fn chunks_sealed_in_place() {
        let data = vec![0x5Au8; MIN_CHUNK_SIZE as usize];
        let mut framed = vec![0u8; CHUNK_DATA_OFFSET + data.len()];
        framed[CHUNK_DATA_OFFSET..].copy_from_slice(&data);
        seal_chunk(&mut framed, 7, 42).unwrap();
        let c = AgentFrame::Chunk(Chunk {
            seq: 7,
            index: 42,
            bytes: Bytes::from(data),
        });
        let mut want = Vec::new();
        encode_agent(&c, &mut want).unwrap();
        assert_eq!(framed, want);
        assert!(seal_chunk(&mut framed.clone(), 0, 1).is_err());
        assert!(seal_chunk(&mut [0u8; CHUNK_DATA_OFFSET], 1, 1).is_err());
        assert!(seal_chunk(&mut [0u8; 3], 1, 1).is_err());
    }

    #[test]
    fn shared_decoding_does_not_copy_chunk_bytes() {
        let v = Bytes::from(enc(Chunk {
            seq: 1,
            index: 0,
            bytes: Bytes::from(vec![7; MIN_CHUNK_SIZE as usize]),
        }));
        let Ok(Decoded::Frame(AgentFrame::Chunk(c), _)) =
            decode_agent_shared(&v, &Limits::default())
        else {
            panic!("a chunk");
        };
        assert_eq!(c.bytes.as_ptr(), v[HEADER_LEN + 16..].as_ptr());
    }

    #[test]
    fn test_vectors_are_stable() {
        for (f, (name, hex)) in samples().iter().zip(VECTORS) {
            assert_eq!(f.frame_type().as_str(), name);
            assert_eq!(
                hex::encode(enc(f.clone())),
                hex,
                "{name} encodes differently"
            );
            let bytes = hex::decode(hex).unwrap();
            assert_eq!(
                decode(&bytes, &Limits::default()),
                Ok(Decoded::Frame(f.clone(), bytes.len()))
            );
        }
    }

    #[test]
    fn the_protocol_document_shows_the_same_vectors() {
        let doc = include_str!("../../../docs/agent-protocol.md");
        for (name, hex) in VECTORS {
            assert!(
                doc.contains(&format!("`{hex}`")),
                "{name} vector missing from the document"
            );
        }
    }

    #[test]
    fn incremental_decoding_byte_by_byte_yields_the_same_frames() {
        let mut frames = samples();
        frames.push(
            Chunk {
                seq: 45,
                index: 9,
                bytes: Bytes::from((0..MIN_CHUNK_SIZE).map(|i| i as u8).collect::<Vec<_>>()),
            }
            .into(),
        );
        let mut all = Vec::new();
        for f in &frames {
            encode(f, &mut all).unwrap();
        }
        let limits = Limits::default();
        let (mut got, mut start, mut ready_at) = (Vec::new(), 0, 0);
        for end in 0..=all.len() {
            match decode(&all[start..end], &limits).unwrap() {
                Decoded::NeedMore(k) => {
                    assert!(k >= 1);
                    assert!(
                        end + k >= ready_at,
                        "the decoder asked for less than before"
                    );
                    ready_at = end + k;
                }
                Decoded::Frame(f, n) => {
                    assert_eq!(start + n, end, "a frame as soon as its last byte is in");
                    assert_eq!(end, ready_at, "NeedMore named the exact end of the frame");
                    got.push(f);
                    start = end;
                }
            }
        }
        assert_eq!(start, all.len());
        assert_eq!(got, frames);
        // And all at once.
        let (mut rest, mut again) = (&all[..], Vec::new());
        while let Ok(Decoded::Frame(f, n)) = decode(rest, &limits) {
            again.push(f);
            rest = &rest[n..];
        }
        assert!(rest.is_empty());
        assert_eq!(again, frames);
    }

    #[test]
    fn short_buffers_ask_for_more() {
        let v = enc(Ack { seq: 1 });
        let limits = Limits::default();
        assert_eq!(decode(&[], &limits), Ok(Decoded::NeedMore(HEADER_LEN)));
        assert_eq!(decode(b"F", &limits), Ok(Decoded::NeedMore(HEADER_LEN - 1)));
        assert_eq!(decode(&v[..5], &limits), Ok(Decoded::NeedMore(11)));
        assert_eq!(decode(&v[..HEADER_LEN], &limits), Ok(Decoded::NeedMore(8)));
        assert_eq!(decode(&v[..v.len() - 1], &limits), Ok(Decoded::NeedMore(1)));
        // A chunk frame whose header is in: the exact remainder.
        let c = enc(Chunk {
            seq: 1,
            index: 0,
            bytes: Bytes::from(vec![1; 1000]),
        });
        assert_eq!(
            decode(&c[..20], &limits),
            Ok(Decoded::NeedMore(c.len() - 20))
        );
    }

    #[test]
    fn refuses_what_is_not_a_frame() {
        let mut v = enc(Ack { seq: 1 });
        v[0] = b'G';
        assert_eq!(err(&v), FrameError::BadMagic { found: *b"GR" });
        // Refused from two bytes on: an HTTP answer where frames were expected.
        assert_eq!(err(b"HT"), FrameError::BadMagic { found: *b"HT" });
        assert!(
            err(b"HTTP/1.1 400 Bad Request\r\n")
                .to_string()
                .contains("48 54")
        );
    }

    #[test]
    fn refuses_a_corrupted_header_before_trusting_it() {
        let v = enc(Ack { seq: 1 });
        for at in 2..HEADER_LEN {
            let mut w = v.clone();
            w[at] ^= 0x10;
            assert!(
                matches!(err(&w[..HEADER_LEN]), FrameError::HeaderCrc { .. }),
                "byte {at}"
            );
        }
    }

    #[test]
    fn refuses_a_version_from_the_future() {
        let v = raw(2, FrameType::Ack.code(), &1u64.to_le_bytes());
        let e = err(&v);
        assert_eq!(
            e,
            FrameError::FutureVersion {
                met: 2,
                supported: 1
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("version 2") && msg.contains("versions 1 to 1"),
            "{msg}"
        );
        // Also from the header alone, before any body.
        assert_eq!(err(&v[..HEADER_LEN]), e);
        assert_eq!(
            err(&raw(0, FrameType::Ack.code(), &1u64.to_le_bytes())),
            FrameError::ObsoleteVersion { met: 0, oldest: 1 }
        );
    }

    #[test]
    fn refuses_unknown_frame_types() {
        for code in [0x00, 0x05, 0x7f, 0x80, 0x86, 0xff] {
            assert_eq!(
                err(&raw(1, code, &[])),
                FrameError::UnknownType { code, version: 1 }
            );
        }
    }

    #[test]
    fn each_side_refuses_the_frames_it_sends_itself() {
        let limits = Limits::default();
        let w = enc(Welcome {
            version: 1,
            resume_from_seq: 0,
        });
        let e = FrameError::WrongDirection {
            frame: FrameType::Welcome,
            from: Sender::Agent,
        };
        assert_eq!(decode_agent(&w, &limits), Err(e.clone()));
        // As soon as the header is in.
        assert_eq!(decode_agent(&w[..HEADER_LEN], &limits), Err(e.clone()));
        assert_eq!(
            decode_agent_shared(&Bytes::from(w), &limits),
            Err(e.clone())
        );
        assert!(e.to_string().contains("only the gateway sends it"), "{e}");
        let c = enc(Chunk {
            seq: 1,
            index: 0,
            bytes: Bytes::from_static(b"x"),
        });
        assert_eq!(
            decode_gateway(&c, &limits),
            Err(FrameError::WrongDirection {
                frame: FrameType::Chunk,
                from: Sender::Gateway,
            })
        );
    }

    #[test]
    fn refuses_absurd_lengths_before_reading_or_allocating() {
        let limits = Limits::default();
        let mut v = vec![0; HEADER_LEN];
        seal(&mut v, 1, FrameType::Chunk.code(), u32::MAX);
        let (r, allocated, _) = alloc_meter::measure(|| decode(&v, &limits));
        assert_eq!(
            r,
            Err(FrameError::FrameTooLong {
                frame: FrameType::Chunk,
                declared: u64::from(u32::MAX),
                max: 16 + u64::from(MAX_CHUNK_SIZE),
            })
        );
        assert_eq!(allocated, 0);
        // Fixed-size frames: not one byte more than their fields.
        let mut v = vec![0; HEADER_LEN];
        seal(&mut v, 1, FrameType::Ack.code(), 9);
        assert_eq!(
            err(&v),
            FrameError::FrameTooLong {
                frame: FrameType::Ack,
                declared: 9,
                max: 8
            }
        );
        // Bounded by names: a Hello can be no longer than three 128-byte names allow.
        let mut v = vec![0; HEADER_LEN];
        seal(&mut v, 1, FrameType::Hello.code(), 1000);
        assert!(matches!(
            err(&v),
            FrameError::FrameTooLong {
                frame: FrameType::Hello,
                max: 417,
                ..
            }
        ));
        // Bounded by `max_frame_bytes`.
        let c = enc(Chunk {
            seq: 1,
            index: 0,
            bytes: Bytes::from(vec![1; 200]),
        });
        let small = Limits {
            max_frame_bytes: 100,
            ..Limits::default()
        };
        assert_eq!(
            err_with(&c, &small),
            FrameError::FrameTooLong {
                frame: FrameType::Chunk,
                declared: 216,
                max: 84
            }
        );
        // Bounded by the session's chunk size.
        let session = limits.for_chunk_size(MIN_CHUNK_SIZE);
        let c = enc(Chunk {
            seq: 1,
            index: 0,
            bytes: Bytes::from(vec![1; MIN_CHUNK_SIZE as usize + 1]),
        });
        assert!(matches!(
            err_with(&c, &session),
            FrameError::FrameTooLong {
                frame: FrameType::Chunk,
                ..
            }
        ));
    }

    #[test]
    fn limits_for_a_session_still_fit_every_frame_type() {
        let l = Limits::default().for_chunk_size(MIN_CHUNK_SIZE);
        assert_eq!(l.max_chunk_size, MIN_CHUNK_SIZE);
        assert_eq!(l.max_frame_bytes, HEADER_LEN + 16 + MIN_CHUNK_SIZE as usize);
        for t in FrameType::ALL {
            assert!(l.body_bound(*t) == l.type_bound(*t), "{t}");
        }
        assert!(Limits::protocol().max_frame_bytes > Limits::default().max_frame_bytes);
    }

    #[test]
    fn refuses_a_corrupted_body() {
        let mut v = enc(Chunk {
            seq: 1,
            index: 0,
            bytes: Bytes::from_static(b"data"),
        });
        *v.last_mut().unwrap() ^= 1;
        assert!(matches!(
            err(&v),
            FrameError::BodyCrc {
                frame: FrameType::Chunk,
                ..
            }
        ));
    }

    #[test]
    fn refuses_a_body_cut_inside_a_field() {
        let h = hello_with(|_| {});
        // Cut inside `disk` (1 + 7 + 7 + 1 + 2 body bytes), the header resealed to match.
        let cut = raw(1, FrameType::Hello.code(), &h[HEADER_LEN..HEADER_LEN + 18]);
        assert_eq!(
            err(&cut),
            FrameError::Truncated {
                frame: FrameType::Hello,
                field: "disk"
            }
        );
        assert_eq!(
            err(&raw(1, FrameType::Ack.code(), &[1; 7])),
            FrameError::Truncated {
                frame: FrameType::Ack,
                field: "seq"
            }
        );
        // Cut after the tag count, before the first key.
        let e = end_of_cycle_with(1, 1, &[(b"k", b"v")]);
        assert_eq!(
            err(&raw(
                1,
                FrameType::EndOfCycle.code(),
                &e[HEADER_LEN..HEADER_LEN + 11]
            )),
            FrameError::Truncated {
                frame: FrameType::EndOfCycle,
                field: "tag key"
            }
        );
    }

    #[test]
    fn refuses_trailing_bytes_inside_the_declared_length() {
        let mut body = hello_with(|_| {}).split_off(HEADER_LEN);
        body.push(0);
        assert_eq!(
            err(&raw(1, FrameType::Hello.code(), &body)),
            FrameError::TrailingBytes {
                frame: FrameType::Hello,
                extra: 1
            }
        );
        let mut body = enc(ErrorFrame {
            code: "internal".into(),
            message: "m".into(),
        })
        .split_off(HEADER_LEN);
        body.extend_from_slice(b"xyz");
        assert_eq!(
            err(&raw(1, FrameType::Error.code(), &body)),
            FrameError::TrailingBytes {
                frame: FrameType::Error,
                extra: 3
            }
        );
    }

    #[test]
    fn refuses_names_that_break_the_naming_rule() {
        let bad = |field: &'static str, value: &str, reason: &'static str| FrameError::BadName {
            frame: FrameType::Hello,
            field,
            value: value.into(),
            reason,
        };
        assert_eq!(
            err(&hello_with(|h| h.agent = b"".to_vec())),
            bad("agent", "", "it is empty")
        );
        assert_eq!(
            err(&hello_with(|h| h.item = b".hidden".to_vec())),
            bad("item", ".hidden", "it starts with `.` or `-`")
        );
        assert_eq!(
            err(&hello_with(|h| h.disk = b"-rf".to_vec())),
            bad("disk", "-rf", "it starts with `.` or `-`")
        );
        for name in [&b"a b"[..], b"a/b", "é".as_bytes(), b"a\0", b"\xff"] {
            assert!(matches!(
                err(&hello_with(|h| h.item = name.to_vec())),
                FrameError::BadName { field: "item", reason, .. } if reason.contains("character")
            ));
        }
        assert_eq!(
            err(&hello_with(|h| h.item = vec![b'a'; 129])),
            FrameError::FieldTooLong {
                frame: FrameType::Hello,
                field: "item",
                len: 129,
                max: 128
            }
        );
        // 128 is fine.
        assert!(
            decode(
                &hello_with(|h| h.item = vec![b'a'; 128]),
                &Limits::default()
            )
            .is_ok()
        );
        let short = Limits {
            max_name_len: 5,
            ..Limits::default()
        };
        assert_eq!(
            err_with(&hello_with(|_| {}), &short),
            FrameError::FieldTooLong {
                frame: FrameType::Hello,
                field: "agent",
                len: 6,
                max: 5
            }
        );
        let p = B::default()
            .u64(1)
            .s8(b"../x")
            .frame(FrameType::PointCommitted);
        assert!(matches!(
            err(&p),
            FrameError::BadName {
                frame: FrameType::PointCommitted,
                field: "point_id",
                ..
            }
        ));
        // The value in the message is escaped and bounded.
        let e = err(&hello_with(|h| h.disk = b"\x1b[31m".to_vec())).to_string();
        assert!(e.contains("\\u{1b}[31m") && !e.contains('\x1b'), "{e}");
    }

    #[test]
    fn refuses_chunk_sizes_that_are_not_powers_of_two_or_out_of_range() {
        for v in [0, 3, 100_000, (256 << 10) + 1] {
            assert_eq!(
                err(&hello_with(|h| h.chunk_size = v)),
                FrameError::ChunkSizeNotPowerOfTwo {
                    frame: FrameType::Hello,
                    value: v
                }
            );
        }
        for v in [4 << 10, 32 << 10, 8 << 20, 1 << 31] {
            assert_eq!(
                err(&hello_with(|h| h.chunk_size = v)),
                FrameError::ChunkSizeOutOfRange {
                    frame: FrameType::Hello,
                    value: v,
                    min: MIN_CHUNK_SIZE,
                    max: MAX_CHUNK_SIZE
                }
            );
        }
        for v in [MIN_CHUNK_SIZE, MAX_CHUNK_SIZE] {
            assert!(decode(&hello_with(|h| h.chunk_size = v), &Limits::default()).is_ok());
        }
        let l = Limits {
            max_chunk_size: 128 << 10,
            ..Limits::default()
        };
        assert_eq!(
            err_with(&hello_with(|_| {}), &l),
            FrameError::ChunkSizeOutOfRange {
                frame: FrameType::Hello,
                value: 256 << 10,
                min: MIN_CHUNK_SIZE,
                max: 128 << 10
            }
        );
    }

    #[test]
    fn refuses_zero_where_numbering_starts_at_one() {
        let zero = |frame, field| FrameError::ZeroField { frame, field };
        assert_eq!(
            err(&hello_with(|h| h.disk_size = 0)),
            zero(FrameType::Hello, "disk_size")
        );
        assert_eq!(
            err(&hello_with(|h| h.cycle = 0)),
            zero(FrameType::Hello, "cycle")
        );
        // `last_acked_seq` 0 means "nothing acknowledged yet".
        assert!(decode(&hello_with(|h| h.last = 0), &Limits::default()).is_ok());
        assert_eq!(
            err(&B::default().u64(0).u64(0).u8(1).frame(FrameType::Chunk)),
            zero(FrameType::Chunk, "seq")
        );
        assert_eq!(
            err(&B::default().u64(0).u64(0).u64(1).frame(FrameType::Zero)),
            zero(FrameType::Zero, "seq")
        );
        assert_eq!(
            err(&B::default()
                .u64(0)
                .u8(1)
                .u8(1)
                .u8(0)
                .frame(FrameType::EndOfCycle)),
            zero(FrameType::EndOfCycle, "seq")
        );
        assert_eq!(
            err(&B::default().u64(0).frame(FrameType::Ack)),
            zero(FrameType::Ack, "seq")
        );
        assert_eq!(
            err(&B::default()
                .u64(0)
                .s8(b"p")
                .frame(FrameType::PointCommitted)),
            zero(FrameType::PointCommitted, "cycle")
        );
    }

    #[test]
    fn refuses_empty_chunks_and_empty_or_overflowing_zero_ranges() {
        assert_eq!(
            err(&B::default().u64(1).u64(0).frame(FrameType::Chunk)),
            FrameError::EmptyChunk
        );
        assert_eq!(
            err(&B::default().u64(1).u64(5).u64(0).frame(FrameType::Zero)),
            FrameError::EmptyZeroRange
        );
        assert_eq!(
            err(&B::default()
                .u64(1)
                .u64(u64::MAX)
                .u64(1)
                .frame(FrameType::Zero)),
            FrameError::ZeroRangeOverflow {
                first_index: u64::MAX,
                count: 1
            }
        );
        let last = B::default()
            .u64(1)
            .u64(u64::MAX - 1)
            .u64(1)
            .frame(FrameType::Zero);
        assert!(decode(&last, &Limits::default()).is_ok());
    }

    #[test]
    fn refuses_unknown_enumeration_values() {
        for v in [0, 4, 0xff] {
            assert_eq!(
                err(&hello_with(|h| h.kind = v)),
                FrameError::UnknownValue {
                    frame: FrameType::Hello,
                    field: "cycle_kind",
                    value: v
                }
            );
        }
        assert_eq!(
            err(&end_of_cycle_with(3, 1, &[])),
            FrameError::UnknownValue {
                frame: FrameType::EndOfCycle,
                field: "consistency",
                value: 3
            }
        );
        assert_eq!(
            err(&end_of_cycle_with(1, 0, &[])),
            FrameError::UnknownValue {
                frame: FrameType::EndOfCycle,
                field: "snapshot",
                value: 0
            }
        );
    }

    #[test]
    fn refuses_a_session_version_other_than_the_header_version() {
        assert_eq!(
            err(&hello_with(|h| h.version = 2)),
            FrameError::VersionMismatch {
                frame: FrameType::Hello,
                header: 1,
                body: 2
            }
        );
        assert_eq!(
            err(&B::default().u8(0).u64(0).frame(FrameType::Welcome)),
            FrameError::VersionMismatch {
                frame: FrameType::Welcome,
                header: 1,
                body: 0
            }
        );
    }

    #[test]
    fn refuses_bad_tags() {
        let keys: Vec<String> = (0..33).map(|i| format!("k{i}")).collect();
        let tags: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_bytes(), &b"v"[..])).collect();
        assert_eq!(
            err(&end_of_cycle_with(1, 1, &tags)),
            FrameError::TooManyTags { count: 33, max: 32 }
        );
        assert!(decode(&end_of_cycle_with(1, 1, &tags[..32]), &Limits::default()).is_ok());
        assert_eq!(
            err(&end_of_cycle_with(
                1,
                1,
                &[(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]
            )),
            FrameError::DuplicateTag { key: "a".into() }
        );
        assert_eq!(
            err(&end_of_cycle_with(1, 1, &[(b"a", &[b'x'; 1025])])),
            FrameError::FieldTooLong {
                frame: FrameType::EndOfCycle,
                field: "tag value",
                len: 1025,
                max: 1024
            }
        );
        assert!(matches!(
            err(&end_of_cycle_with(1, 1, &[(b"-a", b"1")])),
            FrameError::BadName {
                frame: FrameType::EndOfCycle,
                field: "tag key",
                ..
            }
        ));
        assert_eq!(
            err(&end_of_cycle_with(1, 1, &[(b"a", b"\xff\xfe")])),
            FrameError::BadUtf8 {
                frame: FrameType::EndOfCycle,
                field: "tag value"
            }
        );
    }

    #[test]
    fn refuses_bad_error_frames() {
        let e = |code: &[u8], message: &[u8]| {
            B::default().s8(code).s16(message).frame(FrameType::Error)
        };
        for (code, reason) in [
            (&b""[..], "it is empty"),
            (b"Out_of_sequence", "it does not start with a letter `a-z`"),
            (b"9lives", "it does not start with a letter `a-z`"),
            (
                b"out-of-sequence",
                "it has a character other than `a-z`, `0-9` or `_`",
            ),
        ] {
            assert_eq!(
                err(&e(code, b"m")),
                FrameError::BadErrorCode {
                    value: String::from_utf8_lossy(code).into_owned(),
                    reason
                }
            );
        }
        assert_eq!(
            err(&e(&[b'a'; 65], b"m")),
            FrameError::FieldTooLong {
                frame: FrameType::Error,
                field: "code",
                len: 65,
                max: 64
            }
        );
        assert_eq!(
            err(&e(b"internal", &[b'm'; 4097])),
            FrameError::FieldTooLong {
                frame: FrameType::Error,
                field: "message",
                len: 4097,
                max: 4096
            }
        );
        assert_eq!(
            err(&e(b"internal", b"\xc3")),
            FrameError::BadUtf8 {
                frame: FrameType::Error,
                field: "message"
            }
        );
    }

    #[test]
    fn encode_refuses_invalid_frames_and_appends_nothing() {
        let mut out = b"kept".to_vec();
        let mut refuse = |f: Frame| {
            let e = encode(&f, &mut out).expect_err("refused");
            assert_eq!(out, b"kept");
            e
        };
        let hello = || Hello {
            version: 1,
            agent: "a".into(),
            item: "i".into(),
            disk: "d".into(),
            disk_size: 1,
            chunk_size: MIN_CHUNK_SIZE,
            cycle: 1,
            cycle_kind: CycleKind::Initial,
            last_acked_seq: 0,
        };
        assert!(matches!(
            refuse(
                Hello {
                    item: "a b".into(),
                    ..hello()
                }
                .into()
            ),
            FrameError::BadName { field: "item", .. }
        ));
        assert!(matches!(
            refuse(
                Hello {
                    version: 2,
                    ..hello()
                }
                .into()
            ),
            FrameError::VersionMismatch { .. }
        ));
        assert!(matches!(
            refuse(
                Hello {
                    chunk_size: 3 << 16,
                    ..hello()
                }
                .into()
            ),
            FrameError::ChunkSizeNotPowerOfTwo { .. }
        ));
        assert_eq!(
            refuse(
                Chunk {
                    seq: 1,
                    index: 0,
                    bytes: Bytes::new()
                }
                .into()
            ),
            FrameError::EmptyChunk
        );
        assert!(matches!(
            refuse(
                Chunk {
                    seq: 1,
                    index: 0,
                    bytes: Bytes::from(vec![0; MAX_CHUNK_SIZE as usize + 1])
                }
                .into()
            ),
            FrameError::FrameTooLong {
                frame: FrameType::Chunk,
                ..
            }
        ));
        assert_eq!(
            refuse(
                Zero {
                    seq: 1,
                    first_index: 0,
                    count: 0
                }
                .into()
            ),
            FrameError::EmptyZeroRange
        );
        let tags = (0..256).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(
            refuse(
                EndOfCycle {
                    seq: 1,
                    consistency: Consistency::Crash,
                    snapshot: Snapshot::None,
                    tags
                }
                .into()
            ),
            FrameError::TooManyTags {
                count: 256,
                max: 255
            }
        );
        assert!(matches!(
            refuse(
                ErrorFrame {
                    code: "Bad".into(),
                    message: String::new()
                }
                .into()
            ),
            FrameError::BadErrorCode { .. }
        ));
        assert!(matches!(
            refuse(Ack { seq: 0 }.into()),
            FrameError::ZeroField { field: "seq", .. }
        ));
    }

    /// Counts what the current thread allocates while armed (the test binary's allocator), so
    /// the mutation test can check that decoding never allocates beyond its limits. Test-only:
    /// the one `unsafe` of this crate forwards to the system allocator unchanged.
    #[allow(unsafe_code)]
    mod alloc_meter {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            /// (bytes allocated, largest allocation) while armed.
            static METER: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
        }

        struct Meter;

        fn note(size: usize) {
            let _ = METER.try_with(|m| {
                if let Some((total, largest)) = m.get() {
                    m.set(Some((total + size, largest.max(size))));
                }
            });
        }

        // SAFETY: every call is forwarded to `System` with the same arguments.
        unsafe impl GlobalAlloc for Meter {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                note(layout.size());
                unsafe { System.alloc(layout) }
            }

            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                note(layout.size());
                unsafe { System.alloc_zeroed(layout) }
            }

            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                note(new_size);
                unsafe { System.realloc(ptr, layout, new_size) }
            }

            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        #[global_allocator]
        static GLOBAL: Meter = Meter;

        /// Runs `f`; returns its result, the bytes it allocated and its largest allocation.
        pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize, usize) {
            METER.with(|m| m.set(Some((0, 0))));
            let r = f();
            let (total, largest) = METER.with(|m| m.replace(None)).unwrap_or((0, 0));
            (r, total, largest)
        }
    }

    /// SplitMix64: a seeded, dependency-free PRNG, so the run is the same everywhere.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn mutate(rng: &mut Rng, d: &mut Vec<u8>) {
        match rng.below(6) {
            0 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
            1 if !d.is_empty() => d.truncate(rng.below(d.len())),
            2 => d.extend((0..1 + rng.below(64)).map(|_| rng.next() as u8)),
            3 if !d.is_empty() => {
                let at = rng.below(d.len());
                let extra: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                d.splice(at..at, extra);
            }
            4 if d.len() >= 8 => {
                // An extreme value over a length, count or number.
                let at = rng.below(d.len() - 7);
                let v = [0, 1, 0xff, u64::MAX, u64::from(u32::MAX), 1 << 32][rng.below(6)];
                let n = [1, 2, 4, 8][rng.below(4)];
                d[at..at + n].copy_from_slice(&v.to_le_bytes()[..n]);
            }
            _ => {
                for _ in 0..1 + rng.below(8) {
                    if d.is_empty() {
                        break;
                    }
                    let i = rng.below(d.len());
                    d[i] = rng.next() as u8;
                }
            }
        }
        // Most mutations would only meet a checksum: often make the checksums right again,
        // so the run reaches the length, type and field checks.
        if d.len() >= HEADER_LEN {
            match rng.below(3) {
                0 => {}
                1 => {
                    let (version, ty, len) = (d[2], d[3], (d.len() - HEADER_LEN) as u32);
                    d[0..2].copy_from_slice(&MAGIC);
                    seal(d, version, ty, len);
                }
                _ => {
                    let crc = crc32c(&d[0..12]);
                    d[12..16].copy_from_slice(&crc.to_le_bytes());
                }
            }
        }
    }

    fn outcome(r: &Result<Decoded, FrameError>) -> String {
        match r {
            Ok(Decoded::Frame(..)) => "Frame".into(),
            Ok(Decoded::NeedMore(_)) => "NeedMore".into(),
            Err(e) => format!("{e:?}")
                .split([' ', '{', '('])
                .next()
                .unwrap_or_default()
                .to_owned(),
        }
    }

    /// A bounded, deterministic mutation run over every frame type: decoding never panics,
    /// never allocates beyond its limits, and either refuses, asks for more, or returns a frame
    /// that re-encodes to the same bytes ([`fuzzing::stream`] asserts the last three).
    #[test]
    fn mutation_smoke() {
        let mut seeds: Vec<Vec<u8>> = samples().into_iter().map(enc).collect();
        seeds.push(enc(Chunk {
            seq: 9,
            index: 1,
            bytes: Bytes::from(
                (0..MIN_CHUNK_SIZE)
                    .map(|i| (i * 7) as u8)
                    .collect::<Vec<_>>(),
            ),
        }));
        seeds.push(seeds.concat());
        let mut rng = Rng(0xF3A1_2026);
        let mut seen = BTreeSet::new();
        let mut runs = 0;
        for seed in &seeds {
            for _ in 0..600 {
                let mut d = seed.clone();
                for _ in 0..1 + rng.below(3) {
                    mutate(&mut rng, &mut d);
                }
                for limits in [Limits::default(), fuzzing::tight_limits()] {
                    let (r, total, largest) = alloc_meter::measure(|| decode(&d, &limits));
                    let bound = d.len().min(limits.max_frame_bytes);
                    // (An error's excerpt of a name is at most 64 bytes, each maybe U+FFFD.)
                    assert!(
                        largest <= bound.max(256),
                        "{largest}-byte allocation for {d:02x?}"
                    );
                    assert!(total <= bound + (16 << 10), "{total} bytes allocated");
                    seen.insert(outcome(&r));
                    fuzzing::stream(&d, &limits);
                }
                fuzzing::decode(&d);
                runs += 1;
            }
        }
        assert!(runs >= 6000);
        // The run reached past the checksums: frames, short buffers and most refusals.
        for must in [
            "Frame",
            "NeedMore",
            "HeaderCrc",
            "BodyCrc",
            "FrameTooLong",
            "UnknownType",
        ] {
            assert!(seen.contains(must), "{must} never met: {seen:?}");
        }
        assert!(seen.len() >= 18, "only {seen:?}");
    }

    #[test]
    fn error_messages_name_the_frame_and_the_field() {
        let e = err(&hello_with(|h| h.chunk_size = 100_000)).to_string();
        assert_eq!(
            e,
            "Hello frame field `chunk_size` is 100000, which is not a power of two"
        );
        let e = err(&B::default().u64(1).u64(5).u64(0).frame(FrameType::Zero)).to_string();
        assert!(e.starts_with("Zero frame field `count` is 0"), "{e}");
    }
}
