//! Control frames: the framed control channel that follows a secure UDP ASSOCIATE on the
//! TLS control connection (`docs/PROTOCOL.md` §2.4).
//!
//! RFC 1928 leaves the control connection idle after the UDP ASSOCIATE reply. A connection
//! that negotiated the sudp method (0x80) instead carries typed, length-prefixed frames in
//! both directions, each direction independent:
//!
//! ```text
//! +------+------------+---------------------+
//! | TYPE | LEN u16 BE | BODY (LEN bytes)    |
//! +------+------------+---------------------+
//! |  1   |     2      | 0 to 65 535         |
//! +------+------------+---------------------+
//! ```
//!
//! * The first frame each side sends is [`Hello`]: a version, how often the sender will send
//!   [`Frame::Ping`] and the features it speaks. A side sends other frames only after it has
//!   received the peer's HELLO, and of the optional kinds only those both sides listed.
//! * A frame of a type this version does not know is skipped (its LEN says how far) and
//!   counted, never an error: that is what lets a newer peer talk to an older one.
//! * A known type whose body does not parse is a protocol error: the receiver closes the
//!   control connection (and with it every association it carries).
//! * Frames about an association carry its 8-byte id first in the body; frames about the
//!   connection (HELLO, PING, PONG) name none.
//!
//! Parsers take `&[u8]`, tell [`FrameError::Incomplete`] (read more) apart from every other
//! error, reject trailing bytes inside a body, and never panic on peer input.

use crate::proto::keys::AssociationId;

/// Bytes of the frame header (TYPE, LEN).
pub const HEADER_LEN: usize = 3;
/// Largest body a frame carries.
pub const MAX_BODY: usize = u16::MAX as usize;
/// The control-channel version this implementation speaks.
pub const VERSION: u8 = 1;
/// Most features a HELLO may list.
pub const MAX_FEATURES: usize = 32;

/// Frame type bytes (the table of `docs/PROTOCOL.md` §2.4).
pub mod kind {
    /// Capabilities; the first frame of each direction.
    pub const HELLO: u8 = 0x01;
    /// Liveness probe; the peer answers with PONG.
    pub const PING: u8 = 0x02;
    /// Answer to a PING, echoing its body.
    pub const PONG: u8 = 0x03;
    /// The client re-attaches an association to this connection (feature
    /// [`super::feature::REATTACH`]).
    pub const REATTACH: u8 = 0x04;
    /// The gateway accepted a REATTACH: the association's new epoch.
    pub const REATTACHED: u8 = 0x05;
    /// The gateway refused a REATTACH, and why.
    pub const REATTACH_REFUSED: u8 = 0x06;
    /// An association ends, and why (gateway to client; with feature
    /// [`super::feature::ASSOCIATIONS`] also client to gateway, to release one).
    pub const CLOSE: u8 = 0x07;
    /// The client asks for one more association on this connection (feature
    /// [`super::feature::ASSOCIATIONS`]).
    pub const OPEN: u8 = 0x08;
    /// The gateway's answer to an OPEN: the new association's id, or why not.
    pub const OPENED: u8 = 0x09;
    /// A secure-UDP record carried inside TLS (feature [`super::feature::RECORDS`]).
    pub const RECORD: u8 = 0x0A;
    /// A CONNECT tunnel's TLS 1.3 traffic secrets, delegated by the client (feature
    /// [`super::feature::DELEGATION`]).
    pub const DELEGATE: u8 = 0x10;
    /// The gateway's verdict on a DELEGATE (feature [`super::feature::DELEGATION`]).
    pub const DELEGATE_REPLY: u8 = 0x11;
}

/// Length of a tunnel tag (PROTOCOL.md §2.8).
pub const TAG_LEN: usize = 16;

/// Feature ids a HELLO may list.
pub mod feature {
    /// Secure-UDP records inside TLS: RECORD frames, for networks that block UDP.
    pub const RECORDS: u8 = 0x01;
    /// Associations that move: REATTACH, REATTACHED and REATTACH_REFUSED frames (§2.4, §3.1).
    pub const REATTACH: u8 = 0x02;
    /// Many associations on one control connection: OPEN and OPENED frames, CLOSE from the
    /// client, REATTACH adding to the connection (PROTOCOL.md §2.9).
    pub const ASSOCIATIONS: u8 = 0x03;
    /// Delegated inspection: DELEGATE and DELEGATE_REPLY frames (PROTOCOL.md §2.8).
    pub const DELEGATION: u8 = 0x10;
}

/// Why a gateway refused a REATTACH ([`Frame::ReattachRefused`]); unknown codes are kept as
/// [`RefuseReason::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// No such association in the cluster (never existed, ended, or its record expired).
    Unknown,
    /// The association belongs to another identity.
    NotOwner,
    /// The association was opened anonymously: nobody can prove to own it.
    Anonymous,
    /// Another re-attach of it is under way, or the store could not be updated: try again.
    Busy,
    /// This connection already carries a re-attached association.
    AlreadyAttached,
    /// A code this version does not name.
    Other(u8),
}

/// The gateway's answer to an OPEN ([`Frame::Opened`]); unknown codes are kept as
/// [`OpenStatus::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenStatus {
    /// Opened: the frame names the new association.
    Opened,
    /// This connection, or the gateway, holds its most associations.
    Limit,
    /// The gateway could not open one (no outbound socket, no keys): try again later.
    Failed,
    /// A code this version does not name (refused).
    Other(u8),
}

impl OpenStatus {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            OpenStatus::Opened => 0x00,
            OpenStatus::Limit => 0x01,
            OpenStatus::Failed => 0x02,
            OpenStatus::Other(c) => c,
        }
    }

    /// The status of a wire code.
    pub fn from_code(code: u8) -> Self {
        match code {
            0x00 => OpenStatus::Opened,
            0x01 => OpenStatus::Limit,
            0x02 => OpenStatus::Failed,
            c => OpenStatus::Other(c),
        }
    }

    /// Stable snake_case name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            OpenStatus::Opened => "opened",
            OpenStatus::Limit => "limit",
            OpenStatus::Failed => "failed",
            OpenStatus::Other(_) => "other",
        }
    }
}

/// The gateway's verdict on a DELEGATE ([`Frame::DelegateReply`]); unknown codes are kept as
/// [`DelegateStatus::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelegateStatus {
    /// The secrets are held; the tunnel is inspected.
    Accepted,
    /// The gateway does not inspect (no audit log configured).
    InspectionOff,
    /// The tunnel's destination is end-to-end (`e2e`): never inspected.
    EndToEnd,
    /// No live tunnel has this tag.
    UnknownTunnel,
    /// The tunnel is bound to another control session.
    OtherSession,
    /// The tunnel belongs to another identity.
    OtherIdentity,
    /// Secrets for this tunnel were already given.
    Duplicate,
    /// The tunnel is opaque for good (too many bytes before the secrets, not TLS 1.3).
    TooLate,
    /// The secrets do not have the form of §2.8 (length).
    Malformed,
    /// A code this version does not name.
    Other(u8),
}

impl RefuseReason {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            RefuseReason::Unknown => 0x01,
            RefuseReason::NotOwner => 0x02,
            RefuseReason::Anonymous => 0x03,
            RefuseReason::Busy => 0x04,
            RefuseReason::AlreadyAttached => 0x05,
            RefuseReason::Other(c) => c,
        }
    }

    /// The reason of a wire code.
    pub fn from_code(code: u8) -> Self {
        match code {
            0x01 => RefuseReason::Unknown,
            0x02 => RefuseReason::NotOwner,
            0x03 => RefuseReason::Anonymous,
            0x04 => RefuseReason::Busy,
            0x05 => RefuseReason::AlreadyAttached,
            c => RefuseReason::Other(c),
        }
    }

    /// Stable snake_case name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            RefuseReason::Unknown => "unknown_association",
            RefuseReason::NotOwner => "not_owner",
            RefuseReason::Anonymous => "anonymous",
            RefuseReason::Busy => "busy",
            RefuseReason::AlreadyAttached => "already_attached",
            RefuseReason::Other(_) => "other",
        }
    }
}

impl DelegateStatus {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            DelegateStatus::Accepted => 0x00,
            DelegateStatus::InspectionOff => 0x01,
            DelegateStatus::EndToEnd => 0x02,
            DelegateStatus::UnknownTunnel => 0x03,
            DelegateStatus::OtherSession => 0x04,
            DelegateStatus::OtherIdentity => 0x05,
            DelegateStatus::Duplicate => 0x06,
            DelegateStatus::TooLate => 0x07,
            DelegateStatus::Malformed => 0x08,
            DelegateStatus::Other(c) => c,
        }
    }

    /// The status of a wire code.
    pub fn from_code(code: u8) -> Self {
        match code {
            0x00 => DelegateStatus::Accepted,
            0x01 => DelegateStatus::InspectionOff,
            0x02 => DelegateStatus::EndToEnd,
            0x03 => DelegateStatus::UnknownTunnel,
            0x04 => DelegateStatus::OtherSession,
            0x05 => DelegateStatus::OtherIdentity,
            0x06 => DelegateStatus::Duplicate,
            0x07 => DelegateStatus::TooLate,
            0x08 => DelegateStatus::Malformed,
            c => DelegateStatus::Other(c),
        }
    }

    /// A short snake_case name for logs, metrics labels and audit lines.
    pub fn name(self) -> &'static str {
        match self {
            DelegateStatus::Accepted => "accepted",
            DelegateStatus::InspectionOff => "inspection_off",
            DelegateStatus::EndToEnd => "end_to_end",
            DelegateStatus::UnknownTunnel => "unknown_tunnel",
            DelegateStatus::OtherSession => "other_session",
            DelegateStatus::OtherIdentity => "other_identity",
            DelegateStatus::Duplicate => "duplicate",
            DelegateStatus::TooLate => "too_late",
            DelegateStatus::Malformed => "malformed",
            DelegateStatus::Other(_) => "other",
        }
    }
}

/// Secret bytes borrowed from a frame body; `Debug` never shows them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Secret<'a>(pub &'a [u8]);

impl std::fmt::Debug for Secret<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret([redacted, {} bytes])", self.0.len())
    }
}

/// Why a gateway ended an association ([`Frame::Close`]); unknown codes are kept as
/// [`CloseReason::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// No datagram either way for the idle timeout.
    Idle,
    /// The gateway's sending key reached its record limit (§8).
    KeyExhausted,
    /// The gateway is shutting down.
    Shutdown,
    /// The peer stopped answering heartbeats.
    Heartbeat,
    /// The association was re-attached to another control connection (this node's or
    /// another's).
    Moved,
    /// An end-to-end destination (`e2e`) answered ICMP port unreachable.
    Unreachable,
    /// The client released it (a client's CLOSE, feature ASSOCIATIONS).
    Released,
    /// A code this version does not name.
    Other(u8),
}

impl CloseReason {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            CloseReason::Idle => 0x01,
            CloseReason::KeyExhausted => 0x02,
            CloseReason::Shutdown => 0x03,
            CloseReason::Heartbeat => 0x04,
            CloseReason::Moved => 0x05,
            CloseReason::Unreachable => 0x06,
            CloseReason::Released => 0x07,
            CloseReason::Other(c) => c,
        }
    }

    /// The reason of a wire code.
    pub fn from_code(code: u8) -> Self {
        match code {
            0x01 => CloseReason::Idle,
            0x02 => CloseReason::KeyExhausted,
            0x03 => CloseReason::Shutdown,
            0x05 => CloseReason::Moved,
            0x06 => CloseReason::Unreachable,
            0x07 => CloseReason::Released,
            0x04 => CloseReason::Heartbeat,
            c => CloseReason::Other(c),
        }
    }

    /// A short description for logs.
    pub fn describe(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle timeout",
            CloseReason::KeyExhausted => "sending key exhausted",
            CloseReason::Shutdown => "gateway shutting down",
            CloseReason::Heartbeat => "heartbeat timeout",
            CloseReason::Moved => "re-attached to another connection",
            CloseReason::Unreachable => "an end-to-end destination answered port unreachable",
            CloseReason::Released => "released by the client",
            CloseReason::Other(_) => "unknown reason",
        }
    }
}

/// The capabilities a side announces in its first frame.
///
/// ```text
/// +---------+------------------+-------+----------------+
/// | VERSION | PING_INTERVAL_MS | NFEAT | FEATURES       |
/// +---------+------------------+-------+----------------+
/// |    1    |     2 (BE)       |   1   | NFEAT x 1 byte |
/// +---------+------------------+-------+----------------+
/// ```
///
/// PING_INTERVAL_MS is how often the sender will send PING (0: it sends none); the receiver
/// may then declare the sender dead after a silence several times that long. FEATURES are
/// one-byte ids of optional frame kinds; this version defines none, so it sends NFEAT = 0
/// and ignores ids it does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Highest control-channel version the sender speaks.
    pub version: u8,
    /// How often the sender sends PING, in milliseconds; 0 for never.
    pub ping_interval_ms: u16,
    /// Optional features the sender speaks (ids, at most [`MAX_FEATURES`], no duplicates).
    pub features: Vec<u8>,
}

impl Hello {
    /// Whether the sender listed `feature`.
    pub fn has(&self, feature: u8) -> bool {
        self.features.contains(&feature)
    }
}

/// One decoded frame. Bodies of unknown types are borrowed from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Capabilities.
    Hello(Hello),
    /// Liveness probe with an opaque 8-byte body.
    Ping([u8; 8]),
    /// Answer to the PING with this body.
    Pong([u8; 8]),
    /// A secure-UDP record (header, id, nonce, ciphertext, tag), carried in TLS.
    Record(&'a [u8]),
    /// The client asks to carry association `assoc` (opened on an earlier connection) on
    /// this one, sending from UDP `port` (0: not known, the reply path starts at the first
    /// record).
    Reattach {
        /// The association.
        assoc: AssociationId,
        /// The client's UDP port.
        port: u16,
    },
    /// The gateway moved `assoc` to this connection; its keys are those of `epoch` (§3.1).
    Reattached {
        /// The association.
        assoc: AssociationId,
        /// The new epoch, at least 1.
        epoch: u32,
    },
    /// The gateway refused to re-attach `assoc`.
    ReattachRefused {
        /// The association.
        assoc: AssociationId,
        /// Why.
        reason: RefuseReason,
    },
    /// The client asks for one more association on this connection, sending from UDP
    /// `port` (0: not known); `req` is the client's number for the answer.
    Open {
        /// The request's number, echoed by OPENED.
        req: u32,
        /// The client's UDP port.
        port: u16,
    },
    /// The gateway's answer to the OPEN numbered `req`: with [`OpenStatus::Opened`], the
    /// new association `assoc` (keys from this connection's exporter, §3.1); otherwise
    /// `assoc` is zero.
    Opened {
        /// The OPEN's number.
        req: u32,
        /// The verdict.
        status: OpenStatus,
        /// The new association (zero when refused).
        assoc: AssociationId,
    },
    /// Association `assoc` ends (the gateway ended it, or the client releases it).
    Close {
        /// The association.
        assoc: AssociationId,
        /// Why.
        reason: CloseReason,
    },
    /// A tunnel's four TLS 1.3 traffic secrets (client to gateway).
    Delegate {
        /// The tunnel's tag (TLS exporter of the tunnel's own connection).
        tag: [u8; TAG_LEN],
        /// CLIENT_HANDSHAKE, SERVER_HANDSHAKE, CLIENT_APP_0, SERVER_APP_0, each `len / 4`
        /// bytes (32 or 48).
        secrets: Secret<'a>,
    },
    /// The gateway's verdict on the DELEGATE naming `tag`.
    DelegateReply {
        /// The tunnel's tag, as the DELEGATE named it.
        tag: [u8; TAG_LEN],
        /// The verdict.
        status: DelegateStatus,
    },
    /// A type this version does not know; skipped by the receiver.
    Unknown {
        /// The TYPE byte.
        kind: u8,
        /// The body, unread.
        body: &'a [u8],
    },
}

impl Frame<'_> {
    /// The TYPE byte.
    pub fn kind(&self) -> u8 {
        match self {
            Frame::Hello(_) => kind::HELLO,
            Frame::Ping(_) => kind::PING,
            Frame::Pong(_) => kind::PONG,
            Frame::Reattach { .. } => kind::REATTACH,
            Frame::Reattached { .. } => kind::REATTACHED,
            Frame::ReattachRefused { .. } => kind::REATTACH_REFUSED,
            Frame::Close { .. } => kind::CLOSE,
            Frame::Open { .. } => kind::OPEN,
            Frame::Opened { .. } => kind::OPENED,
            Frame::Record(_) => kind::RECORD,
            Frame::Delegate { .. } => kind::DELEGATE,
            Frame::DelegateReply { .. } => kind::DELEGATE_REPLY,
            Frame::Unknown { kind, .. } => *kind,
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let start = out.len();
        out.extend_from_slice(&[self.kind(), 0, 0]);
        match self {
            Frame::Hello(h) => {
                if h.features.len() > MAX_FEATURES {
                    out.truncate(start);
                    return Err(FrameError::TooManyFeatures(h.features.len()));
                }
                out.push(h.version);
                out.extend_from_slice(&h.ping_interval_ms.to_be_bytes());
                out.push(h.features.len() as u8);
                out.extend_from_slice(&h.features);
            }
            Frame::Ping(b) | Frame::Pong(b) => out.extend_from_slice(b),
            Frame::Close { assoc, reason } => {
                out.extend_from_slice(&assoc.to_bytes());
                out.push(reason.code());
            }
            Frame::Reattach { assoc, port } => {
                out.extend_from_slice(&assoc.to_bytes());
                out.extend_from_slice(&port.to_be_bytes());
            }
            Frame::Open { req, port } => {
                out.extend_from_slice(&req.to_be_bytes());
                out.extend_from_slice(&port.to_be_bytes());
            }
            Frame::Opened { req, status, assoc } => {
                out.extend_from_slice(&req.to_be_bytes());
                out.push(status.code());
                out.extend_from_slice(&assoc.to_bytes());
            }
            Frame::Reattached { assoc, epoch } => {
                out.extend_from_slice(&assoc.to_bytes());
                out.extend_from_slice(&epoch.to_be_bytes());
            }
            Frame::ReattachRefused { assoc, reason } => {
                out.extend_from_slice(&assoc.to_bytes());
                out.push(reason.code());
            }
            Frame::Delegate { tag, secrets } => {
                let n = secrets.0.len();
                if n != 4 * 32 && n != 4 * 48 {
                    out.truncate(start);
                    return Err(FrameError::Malformed {
                        kind: kind::DELEGATE,
                        problem: "secrets are 4 x 32 or 4 x 48 bytes",
                    });
                }
                out.extend_from_slice(tag);
                out.push((n / 4) as u8);
                out.extend_from_slice(secrets.0);
            }
            Frame::DelegateReply { tag, status } => {
                out.extend_from_slice(tag);
                out.push(status.code());
            }
            Frame::Unknown { body, .. } | Frame::Record(body) => {
                if body.len() > MAX_BODY {
                    out.truncate(start);
                    return Err(FrameError::TooLong(body.len()));
                }
                out.extend_from_slice(body);
            }
        }
        let len = out.len() - start - HEADER_LEN;
        // Invariant: every known body is far below MAX_BODY and unknown ones were checked.
        let len = u16::try_from(len).expect("body length checked");
        out[start + 1..start + 3].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }
}

/// Why a frame could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More bytes are needed; not an error on a stream.
    #[error("incomplete frame: need at least {need} bytes")]
    Incomplete {
        /// Total bytes needed (a lower bound).
        need: usize,
    },
    /// A known frame type whose body is malformed: close the connection.
    #[error("malformed {kind:#04x} frame: {problem}")]
    Malformed {
        /// The TYPE byte.
        kind: u8,
        /// What is wrong.
        problem: &'static str,
    },
    /// A HELLO listing more than [`MAX_FEATURES`] features (encoding).
    #[error("a HELLO lists at most {MAX_FEATURES} features, not {0}")]
    TooManyFeatures(usize),
    /// A body longer than [`MAX_BODY`] (encoding).
    #[error("a frame body is at most {MAX_BODY} bytes, not {0}")]
    TooLong(usize),
}

/// The TYPE and body length of the frame starting at `buf[0]`, from its 3-byte header.
pub fn parse_header(buf: &[u8]) -> Result<(u8, usize), FrameError> {
    if buf.len() < HEADER_LEN {
        return Err(FrameError::Incomplete { need: HEADER_LEN });
    }
    Ok((buf[0], u16::from_be_bytes([buf[1], buf[2]]) as usize))
}

/// Parses the frame at the start of `buf`; returns it and the bytes it took (header and
/// body). Bytes after the frame are left for the next call.
pub fn parse(buf: &[u8]) -> Result<(Frame<'_>, usize), FrameError> {
    let (ty, len) = parse_header(buf)?;
    let total = HEADER_LEN + len;
    if buf.len() < total {
        return Err(FrameError::Incomplete { need: total });
    }
    Ok((parse_body(ty, &buf[HEADER_LEN..total])?, total))
}

/// Decodes the body of a frame of type `ty` (the whole body: trailing bytes are an error).
pub fn parse_body(ty: u8, body: &[u8]) -> Result<Frame<'_>, FrameError> {
    let bad = |problem| FrameError::Malformed { kind: ty, problem };
    match ty {
        kind::HELLO => {
            if body.len() < 4 {
                return Err(bad("shorter than 4 bytes"));
            }
            let version = body[0];
            if version == 0 {
                return Err(bad("version 0"));
            }
            let ping_interval_ms = u16::from_be_bytes([body[1], body[2]]);
            let n = body[3] as usize;
            if n > MAX_FEATURES {
                return Err(bad("more than 32 features"));
            }
            if body.len() != 4 + n {
                return Err(bad("NFEAT disagrees with the body length"));
            }
            let features = body[4..].to_vec();
            if features
                .iter()
                .enumerate()
                .any(|(i, f)| features[..i].contains(f))
            {
                return Err(bad("a feature listed twice"));
            }
            Ok(Frame::Hello(Hello {
                version,
                ping_interval_ms,
                features,
            }))
        }
        kind::PING | kind::PONG => {
            let b: [u8; 8] = body.try_into().map_err(|_| bad("body is not 8 bytes"))?;
            Ok(if ty == kind::PING {
                Frame::Ping(b)
            } else {
                Frame::Pong(b)
            })
        }
        kind::CLOSE => {
            if body.len() != 9 {
                return Err(bad("body is not 9 bytes"));
            }
            let mut id = [0u8; 8];
            id.copy_from_slice(&body[..8]);
            Ok(Frame::Close {
                assoc: AssociationId::from_bytes(id),
                reason: CloseReason::from_code(body[8]),
            })
        }
        kind::REATTACH => {
            if body.len() != 10 {
                return Err(bad("body is not 10 bytes"));
            }
            Ok(Frame::Reattach {
                assoc: assoc_at(body),
                port: u16::from_be_bytes([body[8], body[9]]),
            })
        }
        kind::OPEN => {
            if body.len() != 6 {
                return Err(bad("body is not 6 bytes"));
            }
            Ok(Frame::Open {
                req: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                port: u16::from_be_bytes([body[4], body[5]]),
            })
        }
        kind::OPENED => {
            if body.len() != 13 {
                return Err(bad("body is not 13 bytes"));
            }
            let mut id = [0u8; 8];
            id.copy_from_slice(&body[5..]);
            Ok(Frame::Opened {
                req: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                status: OpenStatus::from_code(body[4]),
                assoc: AssociationId::from_bytes(id),
            })
        }
        kind::REATTACHED => {
            if body.len() != 12 {
                return Err(bad("body is not 12 bytes"));
            }
            let epoch = u32::from_be_bytes([body[8], body[9], body[10], body[11]]);
            if epoch == 0 {
                return Err(bad("epoch 0"));
            }
            Ok(Frame::Reattached {
                assoc: assoc_at(body),
                epoch,
            })
        }
        kind::REATTACH_REFUSED => {
            if body.len() != 9 {
                return Err(bad("body is not 9 bytes"));
            }
            Ok(Frame::ReattachRefused {
                assoc: assoc_at(body),
                reason: RefuseReason::from_code(body[8]),
            })
        }
        // The record layer checks the record (§6.1); an empty one cannot be a record.
        kind::RECORD if body.is_empty() => Err(bad("empty record")),
        kind::RECORD => Ok(Frame::Record(body)),
        kind::DELEGATE => {
            if body.len() < TAG_LEN + 1 {
                return Err(bad("shorter than 17 bytes"));
            }
            let hash_len = body[TAG_LEN] as usize;
            if hash_len != 32 && hash_len != 48 {
                return Err(bad("secret length is not 32 or 48"));
            }
            if body.len() != TAG_LEN + 1 + 4 * hash_len {
                return Err(bad("body is not 17 + 4 x secret length bytes"));
            }
            let mut tag = [0u8; TAG_LEN];
            tag.copy_from_slice(&body[..TAG_LEN]);
            Ok(Frame::Delegate {
                tag,
                secrets: Secret(&body[TAG_LEN + 1..]),
            })
        }
        kind::DELEGATE_REPLY => {
            if body.len() != TAG_LEN + 1 {
                return Err(bad("body is not 17 bytes"));
            }
            let mut tag = [0u8; TAG_LEN];
            tag.copy_from_slice(&body[..TAG_LEN]);
            Ok(Frame::DelegateReply {
                tag,
                status: DelegateStatus::from_code(body[TAG_LEN]),
            })
        }
        kind => Ok(Frame::Unknown { kind, body }),
    }
}

/// The association id at the start of a body the caller checked to be long enough.
fn assoc_at(body: &[u8]) -> AssociationId {
    let mut id = [0u8; 8];
    id.copy_from_slice(&body[..8]);
    AssociationId::from_bytes(id)
}

/// Incremental frame reader over a byte stream (sans-IO): the caller reads from its socket
/// into [`Decoder::space`], reports how much arrived with [`Decoder::filled`], and takes whole
/// frames out with [`Decoder::next_frame`]. It holds at most one partial frame plus one read, and
/// grows its buffer only to the size of the frame being read (a peer announcing a large
/// frame costs memory only as its bytes arrive).
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the bytes not yet taken.
    start: usize,
    /// End of the bytes received.
    end: usize,
}

/// Buffer size a [`Decoder`] starts with and shrinks back to.
const SMALL: usize = 512;

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            buf: vec![0; SMALL],
            start: 0,
            end: 0,
        }
    }
}

impl Decoder {
    /// Room to read into: never empty. Moves pending bytes to the front and grows the buffer
    /// to hold the frame being read when that frame is larger than the buffer.
    pub fn space(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > 8 * SMALL {
                self.buf.truncate(SMALL);
                self.buf.shrink_to(SMALL);
            }
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let need = match parse_header(&self.buf[..self.end]) {
            Ok((_, len)) => HEADER_LEN + len,
            Err(_) => HEADER_LEN,
        };
        if self.buf.len() < need.max(self.end + 1) {
            self.buf.resize(need.max(self.end + 1), 0);
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into the slice [`Decoder::space`] returned.
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The next whole frame, if one has arrived; `Err` on a malformed known frame (close the
    /// connection).
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, FrameError> {
        let (start, end) = (self.start, self.end);
        match parse(&self.buf[start..end]) {
            Ok((frame, n)) => {
                self.start = start + n;
                Ok(Some(frame))
            }
            Err(FrameError::Incomplete { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Overwrites with zeros the bytes of the frames already taken (a DELEGATE's secrets
    /// must not linger in the buffer until it is reused).
    pub fn wipe_taken(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.buf[..self.start]);
    }

    /// Bytes received and not yet taken as frames.
    pub fn pending(&self) -> usize {
        self.end - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(f: &Frame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        f.encode(&mut out).unwrap();
        out
    }

    #[test]
    fn known_bytes() {
        let hello = Frame::Hello(Hello {
            version: 1,
            ping_interval_ms: 500,
            features: vec![],
        });
        assert_eq!(encoded(&hello), [0x01, 0x00, 0x04, 0x01, 0x01, 0xf4, 0x00]);
        let ping = Frame::Ping(*b"\x00\x01\x02\x03\x04\x05\x06\x07");
        assert_eq!(encoded(&ping), [0x02, 0x00, 0x08, 0, 1, 2, 3, 4, 5, 6, 7]);
        let close = Frame::Close {
            assoc: AssociationId(0x5344_5550_0000_0001),
            reason: CloseReason::Idle,
        };
        assert_eq!(
            encoded(&close),
            [0x07, 0x00, 0x09, 0x53, 0x44, 0x55, 0x50, 0, 0, 0, 1, 0x01]
        );
        // The examples of PROTOCOL.md §2.4.
        let id = AssociationId(0x5344_5550_0000_0001);
        let reattach = Frame::Reattach {
            assoc: id,
            port: 40000,
        };
        assert_eq!(
            encoded(&reattach),
            [0x04, 0x00, 0x0a, 0x53, 0x44, 0x55, 0x50, 0, 0, 0, 1, 0x9c, 0x40]
        );
        let done = Frame::Reattached { assoc: id, epoch: 2 };
        assert_eq!(
            encoded(&done),
            [0x05, 0x00, 0x0c, 0x53, 0x44, 0x55, 0x50, 0, 0, 0, 1, 0, 0, 0, 2]
        );
        let no = Frame::ReattachRefused {
            assoc: id,
            reason: RefuseReason::NotOwner,
        };
        assert_eq!(
            encoded(&no),
            [0x06, 0x00, 0x09, 0x53, 0x44, 0x55, 0x50, 0, 0, 0, 1, 0x02]
        );
        for f in [reattach, done, no] {
            let bytes = encoded(&f);
            assert_eq!(parse(&bytes).unwrap(), (f, bytes.len()));
        }
        for c in 0..=255u8 {
            assert_eq!(RefuseReason::from_code(c).code(), c);
            assert_eq!(CloseReason::from_code(c).code(), c);
        }
    }

    #[test]
    fn open_frames_have_the_documented_bytes() {
        // The examples of PROTOCOL.md §2.9.
        let open = Frame::Open { req: 7, port: 40002 };
        assert_eq!(encoded(&open), [0x08, 0x00, 0x06, 0, 0, 0, 7, 0x9c, 0x42]);
        let id = AssociationId(0x5344_5550_0000_0002);
        let opened = Frame::Opened {
            req: 7,
            status: OpenStatus::Opened,
            assoc: id,
        };
        assert_eq!(
            encoded(&opened),
            [0x09, 0x00, 0x0d, 0, 0, 0, 7, 0x00, 0x53, 0x44, 0x55, 0x50, 0, 0, 0, 2]
        );
        let limit = Frame::Opened {
            req: 8,
            status: OpenStatus::Limit,
            assoc: AssociationId(0),
        };
        assert_eq!(
            encoded(&limit),
            [0x09, 0x00, 0x0d, 0, 0, 0, 8, 0x01, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let release = Frame::Close {
            assoc: id,
            reason: CloseReason::Released,
        };
        assert_eq!(
            encoded(&release),
            [0x07, 0x00, 0x09, 0x53, 0x44, 0x55, 0x50, 0, 0, 0, 2, 0x07]
        );
        for f in [open, opened, limit, release] {
            let bytes = encoded(&f);
            assert_eq!(parse(&bytes).unwrap(), (f, bytes.len()));
        }
        for c in 0..=255u8 {
            assert_eq!(OpenStatus::from_code(c).code(), c);
        }
        let names: Vec<_> = [0u8, 1, 2, 3]
            .iter()
            .map(|c| OpenStatus::from_code(*c).name())
            .collect();
        assert_eq!(names, ["opened", "limit", "failed", "other"]);
        assert_eq!(CloseReason::from_code(7), CloseReason::Released);
        assert_eq!(CloseReason::Released.describe(), "released by the client");
    }

    #[test]
    fn delegation_frames_have_the_documented_bytes_and_hide_secrets() {
        let secrets = [0xA5u8; 128];
        let f = Frame::Delegate {
            tag: [7; TAG_LEN],
            secrets: Secret(&secrets),
        };
        let bytes = encoded(&f);
        assert_eq!(&bytes[..3], &[0x10, 0x00, 145]);
        assert_eq!(&bytes[3..19], &[7; 16]);
        assert_eq!(bytes[19], 32);
        assert_eq!(parse(&bytes).unwrap(), (f.clone(), bytes.len()));
        assert!(!format!("{f:?}").contains("165"), "{f:?}");
        let reply = Frame::DelegateReply {
            tag: [7; TAG_LEN],
            status: DelegateStatus::OtherSession,
        };
        let bytes = encoded(&reply);
        assert_eq!(&bytes[..3], &[0x11, 0x00, 17]);
        assert_eq!(bytes[19], 0x04);
        assert_eq!(parse(&bytes).unwrap().0, reply);
        // Wrong lengths are malformed, on both sides.
        let mut short = encoded(&f);
        short[19] = 48;
        assert!(matches!(
            parse(&short),
            Err(FrameError::Malformed { kind: 0x10, .. })
        ));
        let odd = Frame::Delegate {
            tag: [0; TAG_LEN],
            secrets: Secret(&secrets[..100]),
        };
        assert!(odd.encode(&mut Vec::new()).is_err());
        for c in 0..=255u8 {
            assert_eq!(DelegateStatus::from_code(c).code(), c);
        }
    }

    #[test]
    fn incomplete_is_told_apart() {
        let bytes = encoded(&Frame::Pong([9; 8]));
        for cut in 0..bytes.len() {
            let need = if cut < HEADER_LEN { HEADER_LEN } else { bytes.len() };
            assert_eq!(
                parse(&bytes[..cut]),
                Err(FrameError::Incomplete { need }),
                "{cut}"
            );
        }
        assert_eq!(parse(&bytes).unwrap(), (Frame::Pong([9; 8]), bytes.len()));
    }

    #[test]
    fn malformed_known_bodies_are_errors_unknown_types_are_skipped() {
        let cases: &[(&[u8], &str)] = &[
            (&[0x01, 0, 3, 1, 0, 0], "shorter than 4 bytes"),
            (&[0x01, 0, 4, 0, 0, 0, 0], "version 0"),
            (
                &[0x01, 0, 5, 1, 0, 0, 2, 9],
                "NFEAT disagrees with the body length",
            ),
            (
                &[0x01, 0, 5, 1, 0, 0, 0, 9],
                "NFEAT disagrees with the body length",
            ),
            (&[0x01, 0, 6, 1, 0, 0, 2, 9, 9], "a feature listed twice"),
            (&[0x02, 0, 7, 0, 0, 0, 0, 0, 0, 0], "body is not 8 bytes"),
            (&[0x03, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0], "body is not 8 bytes"),
            (&[0x07, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0], "body is not 9 bytes"),
            (&[0x04, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0], "body is not 10 bytes"),
            (&[0x08, 0, 5, 0, 0, 0, 1, 0], "body is not 6 bytes"),
            (&[0x08, 0, 7, 0, 0, 0, 1, 0, 0, 0], "body is not 6 bytes"),
            (
                &[0x09, 0, 12, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                "body is not 13 bytes",
            ),
            (
                &[0x09, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                "body is not 13 bytes",
            ),
            (&[0x05, 0, 12, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0], "epoch 0"),
            (
                &[0x05, 0, 11, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1],
                "body is not 12 bytes",
            ),
            (
                &[0x06, 0, 10, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
                "body is not 9 bytes",
            ),
        ];
        for (bytes, problem) in cases {
            assert_eq!(
                parse(bytes),
                Err(FrameError::Malformed {
                    kind: bytes[0],
                    problem
                }),
                "{bytes:?}"
            );
        }
        let mut many = vec![0x01, 0, 37, 1, 0, 0, 33];
        many.extend(0..33u8);
        assert!(matches!(parse(&many), Err(FrameError::Malformed { .. })));
        // Unknown types, including an empty body, are returned whole so they can be skipped.
        assert_eq!(
            parse(&[kind::RECORD, 0, 0]),
            Err(FrameError::Malformed {
                kind: kind::RECORD,
                problem: "empty record"
            })
        );
        let (f, n) = parse(&[0x7f, 0, 2, 0xaa, 0xbb, 0x02]).unwrap();
        assert_eq!(
            f,
            Frame::Unknown {
                kind: 0x7f,
                body: &[0xaa, 0xbb]
            }
        );
        assert_eq!(n, 5);
        assert_eq!(parse(&[0x00, 0, 0]).unwrap().1, 3);
    }

    #[test]
    fn close_reasons_round_trip() {
        for code in 0..=255u8 {
            assert_eq!(CloseReason::from_code(code).code(), code);
        }
        assert_eq!(CloseReason::from_code(2), CloseReason::KeyExhausted);
    }

    #[test]
    fn encoding_refuses_what_cannot_be_framed() {
        let mut out = vec![0xee];
        let hello = Frame::Hello(Hello {
            version: 1,
            ping_interval_ms: 0,
            features: (0..33).collect(),
        });
        assert_eq!(hello.encode(&mut out), Err(FrameError::TooManyFeatures(33)));
        let big = vec![0u8; MAX_BODY + 1];
        let unknown = Frame::Unknown {
            kind: 0x70,
            body: &big,
        };
        assert_eq!(unknown.encode(&mut out), Err(FrameError::TooLong(MAX_BODY + 1)));
        assert_eq!(out, [0xee], "a refused frame leaves nothing behind");
    }

    #[test]
    fn decoder_takes_frames_from_any_split_of_the_stream() {
        let mut stream = Vec::new();
        Frame::Ping([1; 8]).encode(&mut stream).unwrap();
        Frame::Unknown {
            kind: 0x70,
            body: &[7u8; 3000],
        }
        .encode(&mut stream)
        .unwrap();
        Frame::Pong([2; 8]).encode(&mut stream).unwrap();
        for chunk in [1usize, 2, 3, 7, 100, 5000] {
            let mut d = Decoder::default();
            let mut kinds = Vec::new();
            let mut fed = 0;
            while fed < stream.len() {
                let space = d.space();
                let n = space.len().min(chunk).min(stream.len() - fed);
                space[..n].copy_from_slice(&stream[fed..fed + n]);
                d.filled(n);
                fed += n;
                while let Some(f) = d.next_frame().unwrap() {
                    if let Frame::Unknown { body, .. } = &f {
                        assert_eq!(body.len(), 3000);
                    }
                    kinds.push(f.kind());
                }
            }
            assert_eq!(kinds, [kind::PING, 0x70, kind::PONG], "chunk {chunk}");
            assert_eq!(d.pending(), 0);
            // Back to its small buffer once the large frame is gone.
            d.space();
            assert!(d.buf.len() <= 8 * SMALL);
        }
    }

    #[test]
    fn space_is_never_empty_when_whole_frames_fill_the_buffer() {
        // Frames that end exactly at the end of the buffer, not yet taken: `space` must still
        // give room (an empty slice would make the reader see end of stream), and taking the
        // frames afterwards yields them all.
        for first in [0usize, 8 + HEADER_LEN] {
            let mut stream = Vec::new();
            if first > 0 {
                Frame::Ping([3; 8]).encode(&mut stream).unwrap();
            }
            let body = vec![5u8; SMALL - HEADER_LEN - first];
            Frame::Unknown {
                kind: 0x70,
                body: &body,
            }
            .encode(&mut stream)
            .unwrap();
            assert_eq!(stream.len(), SMALL);
            let mut d = Decoder::default();
            let space = d.space();
            assert_eq!(space.len(), SMALL);
            space.copy_from_slice(&stream);
            d.filled(SMALL);
            assert!(
                !d.space().is_empty(),
                "a full buffer of whole frames ({first}) still has room"
            );
            let mut n = 0;
            while let Some(f) = d.next_frame().unwrap() {
                n += 1;
                if let Frame::Unknown { body: b, .. } = f {
                    assert_eq!(b, &body[..]);
                }
            }
            assert_eq!(n, 1 + usize::from(first > 0));
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn decoder_grows_only_with_the_frame_it_reads() {
        let mut d = Decoder::default();
        let space = d.space();
        space[..3].copy_from_slice(&[0x70, 0xff, 0xff]);
        d.filled(3);
        assert!(d.next_frame().unwrap().is_none());
        assert_eq!(d.space().len(), MAX_BODY, "room for exactly the announced body");
        let mut d = Decoder::default();
        let space = d.space();
        space[..4].copy_from_slice(&[0x02, 0, 7, 0]);
        d.filled(4);
        assert!(d.next_frame().unwrap().is_none());
        let space = d.space();
        space[..6].fill(0);
        d.filled(6);
        assert_eq!(
            d.next_frame(),
            Err(FrameError::Malformed {
                kind: kind::PING,
                problem: "body is not 8 bytes"
            })
        );
    }

    fn any_frame() -> impl Strategy<Value = (u8, Vec<u8>)> {
        // (type, body): every known type with a valid body, and unknown types.
        prop_oneof![
            (
                any::<u16>(),
                proptest::collection::btree_set(any::<u8>(), 0..=MAX_FEATURES),
                1..=255u8
            )
                .prop_map(|(ms, feats, v)| {
                    let mut b = vec![v];
                    b.extend_from_slice(&ms.to_be_bytes());
                    b.push(feats.len() as u8);
                    b.extend(feats);
                    (kind::HELLO, b)
                }),
            any::<[u8; 8]>().prop_map(|b| (kind::PING, b.to_vec())),
            any::<[u8; 8]>().prop_map(|b| (kind::PONG, b.to_vec())),
            any::<[u8; 9]>().prop_map(|b| (kind::CLOSE, b.to_vec())),
            any::<[u8; 10]>().prop_map(|b| (kind::REATTACH, b.to_vec())),
            (any::<[u8; 8]>(), 1..=u32::MAX).prop_map(|(id, e)| {
                let mut b = id.to_vec();
                b.extend_from_slice(&e.to_be_bytes());
                (kind::REATTACHED, b)
            }),
            any::<[u8; 9]>().prop_map(|b| (kind::REATTACH_REFUSED, b.to_vec())),
            any::<[u8; 6]>().prop_map(|b| (kind::OPEN, b.to_vec())),
            any::<[u8; 13]>().prop_map(|b| (kind::OPENED, b.to_vec())),
            proptest::collection::vec(any::<u8>(), 1..200).prop_map(|b| (kind::RECORD, b)),
            (any::<[u8; 16]>(), any::<bool>(), any::<u8>()).prop_map(|(tag, long, fill)| {
                let n: u8 = if long { 48 } else { 32 };
                let mut b = tag.to_vec();
                b.push(n);
                b.extend(std::iter::repeat_n(fill, 4 * n as usize));
                (kind::DELEGATE, b)
            }),
            any::<[u8; 17]>().prop_map(|b| (kind::DELEGATE_REPLY, b.to_vec())),
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64)).prop_filter_map(
                "unknown types only",
                |(t, b)| (![
                    kind::HELLO,
                    kind::PING,
                    kind::PONG,
                    kind::CLOSE,
                    kind::RECORD,
                    kind::REATTACH,
                    kind::REATTACHED,
                    kind::REATTACH_REFUSED,
                    kind::OPEN,
                    kind::OPENED,
                    kind::DELEGATE,
                    kind::DELEGATE_REPLY
                ]
                .contains(&t))
                .then_some((t, b))
            ),
        ]
    }

    proptest! {
        /// A stream of valid frames parses frame by frame, each re-encodes to exactly its
        /// bytes, and cutting the stream anywhere yields `Incomplete`, never a wrong frame.
        #[test]
        fn streams_of_frames_parse_and_re_encode_exactly(frames in proptest::collection::vec(any_frame(), 1..8), cut in any::<prop::sample::Index>()) {
            let mut stream = Vec::new();
            for (t, b) in &frames {
                stream.push(*t);
                stream.extend_from_slice(&(b.len() as u16).to_be_bytes());
                stream.extend_from_slice(b);
            }
            let mut at = 0;
            for (t, b) in &frames {
                let (f, n) = parse(&stream[at..]).unwrap();
                prop_assert_eq!(f.kind(), *t);
                prop_assert_eq!(n, HEADER_LEN + b.len());
                prop_assert_eq!(encoded(&f), &stream[at..at + n]);
                at += n;
            }
            prop_assert_eq!(at, stream.len());
            let c = cut.index(stream.len());
            let (t, b) = &frames[0];
            if c < HEADER_LEN + b.len() {
                let incomplete = matches!(parse(&stream[..c]), Err(FrameError::Incomplete { .. }));
                prop_assert!(incomplete);
            } else {
                prop_assert_eq!(parse(&stream[..c]).unwrap().0.kind(), *t);
            }
        }

        /// Mutating one byte of a valid known frame's body gives either a frame that
        /// re-encodes to the mutated bytes, or `Malformed`; never a panic or a silent change.
        #[test]
        fn one_mutated_byte_is_parsed_faithfully_or_refused((t, b) in any_frame(), pos in any::<prop::sample::Index>(), x in any::<u8>()) {
            let mut bytes = vec![t];
            bytes.extend_from_slice(&(b.len() as u16).to_be_bytes());
            bytes.extend_from_slice(&b);
            let i = HEADER_LEN + pos.index(b.len().max(1)).min(b.len().saturating_sub(1));
            if i < bytes.len() {
                bytes[i] ^= x;
            }
            match parse(&bytes) {
                Ok((f, n)) => {
                    prop_assert_eq!(n, bytes.len());
                    prop_assert_eq!(encoded(&f), bytes);
                }
                Err(FrameError::Malformed { kind, .. }) => prop_assert_eq!(kind, t),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }

    /// Every named code maps to its variant and back (a round trip of `code(from_code(c))`
    /// alone would pass with any named variant turned into `Other`), and every variant has
    /// its own name: the names are metric labels and audit fields.
    #[test]
    fn codes_map_to_their_named_variants_and_names() {
        use std::collections::HashSet;
        let refuse = [
            (0x01, RefuseReason::Unknown, "unknown_association"),
            (0x02, RefuseReason::NotOwner, "not_owner"),
            (0x03, RefuseReason::Anonymous, "anonymous"),
            (0x04, RefuseReason::Busy, "busy"),
            (0x05, RefuseReason::AlreadyAttached, "already_attached"),
            (0x00, RefuseReason::Other(0), "other"),
            (0x06, RefuseReason::Other(6), "other"),
        ];
        for (c, r, name) in refuse {
            assert_eq!((RefuseReason::from_code(c), r.code(), r.name()), (r, c, name));
        }
        let delegate = [
            (0x00, DelegateStatus::Accepted, "accepted"),
            (0x01, DelegateStatus::InspectionOff, "inspection_off"),
            (0x02, DelegateStatus::EndToEnd, "end_to_end"),
            (0x03, DelegateStatus::UnknownTunnel, "unknown_tunnel"),
            (0x04, DelegateStatus::OtherSession, "other_session"),
            (0x05, DelegateStatus::OtherIdentity, "other_identity"),
            (0x06, DelegateStatus::Duplicate, "duplicate"),
            (0x07, DelegateStatus::TooLate, "too_late"),
            (0x08, DelegateStatus::Malformed, "malformed"),
            (0x09, DelegateStatus::Other(9), "other"),
        ];
        for (c, s, name) in delegate {
            assert_eq!((DelegateStatus::from_code(c), s.code(), s.name()), (s, c, name));
        }
        let close = [
            (0x01, CloseReason::Idle),
            (0x02, CloseReason::KeyExhausted),
            (0x03, CloseReason::Shutdown),
            (0x04, CloseReason::Heartbeat),
            (0x05, CloseReason::Moved),
            (0x06, CloseReason::Unreachable),
            (0x00, CloseReason::Other(0)),
        ];
        let mut described = HashSet::new();
        for (c, r) in close {
            assert_eq!((CloseReason::from_code(c), r.code()), (r, c));
            assert!(!r.describe().is_empty());
            assert!(described.insert(r.describe()), "{r:?} shares its description");
        }
        assert_eq!(CloseReason::Idle.describe(), "idle timeout");
        assert_eq!(CloseReason::Other(0x42).describe(), "unknown reason");
    }

    /// `Debug` of a DELEGATE shows how many secret bytes it holds, never which.
    #[test]
    fn secrets_debug_as_their_length_only() {
        let s = [0x5Au8; 128];
        assert_eq!(format!("{:?}", Secret(&s)), "Secret([redacted, 128 bytes])");
    }

    /// `Hello::has` answers for the listed features only.
    #[test]
    fn hello_has_exactly_its_features() {
        let h = Hello {
            version: 1,
            ping_interval_ms: 0,
            features: vec![feature::RECORDS, feature::DELEGATION],
        };
        assert!(h.has(feature::RECORDS) && h.has(feature::DELEGATION));
        assert!(!h.has(feature::REATTACH));
    }

    /// The limits are inclusive: 32 features and a 65 535-byte body are framed and parsed
    /// back; one more is refused on both sides.
    #[test]
    fn limits_are_inclusive_on_both_sides() {
        let hello = Frame::Hello(Hello {
            version: 1,
            ping_interval_ms: 7,
            features: (0..MAX_FEATURES as u8).collect(),
        });
        let bytes = encoded(&hello);
        assert_eq!(parse(&bytes).unwrap(), (hello, bytes.len()));
        let mut many = vec![kind::HELLO, 0, 37, 1, 0, 0, 33];
        many.extend(0..33u8);
        assert_eq!(
            parse(&many),
            Err(FrameError::Malformed {
                kind: kind::HELLO,
                problem: "more than 32 features"
            })
        );
        let body = vec![0x42u8; MAX_BODY];
        for f in [
            Frame::Record(&body),
            Frame::Unknown {
                kind: 0x70,
                body: &body,
            },
        ] {
            let bytes = encoded(&f);
            assert_eq!(&bytes[..3], &[f.kind(), 0xff, 0xff]);
            assert_eq!(parse(&bytes).unwrap(), (f, HEADER_LEN + MAX_BODY));
        }
        let big = vec![0u8; MAX_BODY + 1];
        assert_eq!(
            Frame::Record(&big).encode(&mut Vec::new()),
            Err(FrameError::TooLong(MAX_BODY + 1))
        );
    }

    /// A DELEGATE body too short to hold its tag and length byte, or whose length byte is
    /// not 32 or 48, or whose secrets do not fill 4 x that length: each refused by name.
    #[test]
    fn short_and_odd_delegate_bodies_are_refused_by_name() {
        let frame = |body: &[u8]| {
            let mut b = vec![kind::DELEGATE, 0, body.len() as u8];
            b.extend_from_slice(body);
            b
        };
        let cases: [(Vec<u8>, &str); 5] = [
            (vec![0; 16], "shorter than 17 bytes"),
            (vec![0; 17], "secret length is not 32 or 48"),
            (
                [&[0u8; 16][..], &[32]].concat(),
                "body is not 17 + 4 x secret length bytes",
            ),
            (
                [&[0u8; 16][..], &[48], &[1; 128]].concat(),
                "body is not 17 + 4 x secret length bytes",
            ),
            (
                [&[0u8; 16][..], &[33], &[1; 132]].concat(),
                "secret length is not 32 or 48",
            ),
        ];
        for (body, problem) in cases {
            assert_eq!(
                parse(&frame(&body)),
                Err(FrameError::Malformed {
                    kind: kind::DELEGATE,
                    problem
                }),
                "{} bytes",
                body.len()
            );
        }
        // 48-byte secrets (SHA-384 suites) frame and parse back.
        let secrets = [3u8; 4 * 48];
        let f = Frame::Delegate {
            tag: [1; TAG_LEN],
            secrets: Secret(&secrets),
        };
        let bytes = encoded(&f);
        assert_eq!(bytes[3 + TAG_LEN], 48);
        assert_eq!(parse(&bytes).unwrap(), (f, HEADER_LEN + TAG_LEN + 1 + 4 * 48));
    }

    /// `wipe_taken` zeroes the bytes of the frames already taken (a DELEGATE's secrets) and
    /// leaves the pending ones alone.
    #[test]
    fn wipe_taken_zeroes_only_the_taken_frames() {
        let secrets = [0xA5u8; 128];
        let mut stream = encoded(&Frame::Delegate {
            tag: [7; TAG_LEN],
            secrets: Secret(&secrets),
        });
        let first = stream.len();
        stream.extend_from_slice(&encoded(&Frame::Ping([9; 8]))[..5]);
        let mut d = Decoder::default();
        d.space()[..stream.len()].copy_from_slice(&stream);
        d.filled(stream.len());
        assert!(matches!(d.next_frame(), Ok(Some(Frame::Delegate { .. }))));
        assert!(d.next_frame().unwrap().is_none());
        d.wipe_taken();
        assert!(d.buf[..first].iter().all(|&b| b == 0));
        assert_eq!(&d.buf[first..first + 5], &stream[first..]);
        assert_eq!(d.pending(), 5);
    }

    /// After a frame of up to 8 x 512 bytes the decoder keeps its grown buffer (no
    /// reallocation churn for ordinary frames); after a larger one it shrinks back to 512.
    #[test]
    fn decoder_shrinks_only_after_a_large_frame() {
        for (body, kept) in [
            (8 * SMALL - HEADER_LEN, true),
            (8 * SMALL - HEADER_LEN + 1, false),
        ] {
            let stream = encoded(&Frame::Unknown {
                kind: 0x70,
                body: &vec![1u8; body],
            });
            let mut d = Decoder::default();
            let mut fed = 0;
            while fed < stream.len() {
                let space = d.space();
                let n = space.len().min(stream.len() - fed);
                space[..n].copy_from_slice(&stream[fed..fed + n]);
                d.filled(n);
                fed += n;
            }
            assert!(matches!(d.next_frame(), Ok(Some(Frame::Unknown { .. }))));
            let grown = d.buf.len();
            assert_eq!(grown, HEADER_LEN + body);
            d.space();
            assert_eq!(d.buf.len(), if kept { grown } else { SMALL }, "body {body}");
        }
    }

    /// A frame whose start is not at the front of the buffer is moved there before the
    /// decoder sizes the buffer by its header (not by the header of a frame already taken).
    #[test]
    fn decoder_sizes_the_buffer_by_the_pending_frame() {
        let mut stream = encoded(&Frame::Ping([1; 8]));
        let big = encoded(&Frame::Unknown {
            kind: 0x70,
            body: &[2u8; 2000],
        });
        stream.extend_from_slice(&big[..3]);
        let mut d = Decoder::default();
        d.space()[..stream.len()].copy_from_slice(&stream);
        d.filled(stream.len());
        assert_eq!(d.next_frame(), Ok(Some(Frame::Ping([1; 8]))));
        assert!(d.next_frame().unwrap().is_none());
        assert_eq!(d.space().len(), 2000, "room for the pending frame's body");
        assert_eq!(&d.buf[..3], &big[..3]);
    }
}
