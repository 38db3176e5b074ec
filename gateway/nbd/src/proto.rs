//! NBD protocol constants, named as in the specification
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>). All integers on
//! the wire are big-endian.
//!
//! Only what this server speaks is listed: the fixed newstyle handshake, option haggling
//! (`NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`, `NBD_OPT_LIST`, `NBD_OPT_INFO`, `NBD_OPT_GO`;
//! every other option is answered `NBD_REP_ERR_UNSUP`) and transmission with simple replies
//! (structured and extended replies are not offered).

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second 8 bytes the server sends (newstyle), and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply (`NBD_REP_MAGIC`, `0x3e889045565a9`).
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: first 4 bytes of every transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`: first 4 bytes of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag `NBD_FLAG_FIXED_NEWSTYLE`: the server speaks fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag `NBD_FLAG_NO_ZEROES`: the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may
/// be left out.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag `NBD_FLAG_C_FIXED_NEWSTYLE`.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag `NBD_FLAG_C_NO_ZEROES`.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// `NBD_OPT_EXPORT_NAME`: choose an export and enter transmission (no error possible: an
/// unknown name closes the connection).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`: the client gives up.
pub const NBD_OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`: list the exports.
pub const NBD_OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS` (not supported: `NBD_REP_ERR_UNSUP`).
pub const NBD_OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`: describe an export.
pub const NBD_OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`: describe an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY` (not supported: `NBD_REP_ERR_UNSUP`).
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;

/// `NBD_REP_ACK`: the option is done.
pub const NBD_REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`: one export of an `NBD_OPT_LIST`.
pub const NBD_REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`: one piece of information of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const NBD_REP_INFO: u32 = 3;
/// Bit set in every error reply type.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: the option is not known to this server.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_POLICY`: forbidden by policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// `NBD_REP_ERR_INVALID`: the option's data is malformed.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_UNKNOWN`: no export of that name.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: the export's canonical name.
pub const NBD_INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: a human-readable description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag `NBD_FLAG_HAS_FLAGS` (always set).
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag `NBD_FLAG_READ_ONLY`.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag `NBD_FLAG_SEND_FLUSH`.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag `NBD_FLAG_SEND_FUA`.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag `NBD_FLAG_SEND_TRIM`.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag `NBD_FLAG_CAN_MULTI_CONN`: several connections see one consistent
/// export.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command flag `NBD_CMD_FLAG_FUA`: the write must be durable before the reply.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;

/// `NBD_CMD_READ`.
pub const NBD_CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const NBD_CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`: the client disconnects.
pub const NBD_CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const NBD_CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const NBD_CMD_TRIM: u16 = 4;
/// `NBD_CMD_WRITE_ZEROES`.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;

/// `NBD_EPERM`: write to a read-only export.
pub const NBD_EPERM: u32 = 1;
/// `NBD_EIO`: the data could not be read or written.
pub const NBD_EIO: u32 = 5;
/// `NBD_ENOMEM`.
pub const NBD_ENOMEM: u32 = 12;
/// `NBD_EINVAL`: bad request (past the end on a read, over the size cap, unknown command).
pub const NBD_EINVAL: u32 = 22;
/// `NBD_ENOSPC`: a write past the end of the export.
pub const NBD_ENOSPC: u32 = 28;

/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Longest export name the specification allows.
pub const MAX_NAME_LEN: usize = 4096;
