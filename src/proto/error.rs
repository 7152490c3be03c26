//! Typed errors of the protocol core, and the one list of reasons a datagram is dropped.
//!
//! Every datagram the relay refuses is refused for exactly one [`DropReason`]; counters and
//! metrics index by it, so the list of reasons lives here and nowhere else.

use thiserror::Error;

/// Why a datagram was dropped. Stable names (see [`DropReason::name`]) are used as metric
/// labels, so they never change once released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum DropReason {
    /// Shorter than the smallest well-formed datagram of its kind.
    Truncated = 0,
    /// Secure record whose content type or version is not the one this version speaks.
    BadHeader,
    /// Secure record whose length field disagrees with the datagram length.
    LengthMismatch,
    /// Ciphertext length is zero or not a multiple of the block size.
    BadCiphertextLength,
    /// No association with this id.
    UnknownAssociation,
    /// Nonce at or beyond the per-key record limit.
    NonceLimit,
    /// Nonce older than the replay window.
    TooOld,
    /// Nonce already received inside the replay window.
    Duplicate,
    /// Authentication tag did not verify.
    BadMac,
    /// Authenticated record whose padding is malformed (a sender bug).
    BadPadding,
    /// The SOCKS5 address header inside the datagram is malformed.
    BadAddress,
    /// Naked datagram with FRAG != 0 (fragmentation is not supported).
    Fragmented,
    /// Neither a naked SOCKS5 UDP datagram nor a secure record.
    UnknownKind,
    /// Datagram from a source address that is not the association's client.
    ForeignSource,
    /// Destination refused by policy.
    PolicyDenied,
    /// Destination name could not be resolved.
    ResolveFailed,
    /// Reply from a destination the client never sent to (restricted cone).
    UnsolicitedReply,
    /// Payload too large to fit in one record or one datagram.
    TooLarge,
    /// The outbound socket refused the datagram.
    SendFailed,
    /// Authenticated control plaintext (ATYP 0x00) with an unknown KIND, a KIND not sent
    /// in this direction, or a malformed body.
    BadControl,
    /// A datagram that arrived while its flow's association was opening found the flow-start
    /// queue full (client side).
    QueueFull,
    /// A datagram waited in the flow-start queue longer than its age limit, or its flow was
    /// closed before its association came up (client side).
    QueueExpired,
    /// A datagram from a new local source found its UDP forward at its flow limit: refused,
    /// the admitted flows untouched (client side).
    FlowLimit,
}

impl DropReason {
    /// Number of reasons; counters are arrays of this length.
    pub const COUNT: usize = DropReason::FlowLimit as usize + 1;

    /// Every reason, in index order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::Truncated,
        DropReason::BadHeader,
        DropReason::LengthMismatch,
        DropReason::BadCiphertextLength,
        DropReason::UnknownAssociation,
        DropReason::NonceLimit,
        DropReason::TooOld,
        DropReason::Duplicate,
        DropReason::BadMac,
        DropReason::BadPadding,
        DropReason::BadAddress,
        DropReason::Fragmented,
        DropReason::UnknownKind,
        DropReason::ForeignSource,
        DropReason::PolicyDenied,
        DropReason::ResolveFailed,
        DropReason::UnsolicitedReply,
        DropReason::TooLarge,
        DropReason::SendFailed,
        DropReason::BadControl,
        DropReason::QueueFull,
        DropReason::QueueExpired,
        DropReason::FlowLimit,
    ];

    /// Index into a counter array.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Stable snake_case name, used as a metric label.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::BadHeader => "bad_header",
            DropReason::LengthMismatch => "length_mismatch",
            DropReason::BadCiphertextLength => "bad_ciphertext_length",
            DropReason::UnknownAssociation => "unknown_association",
            DropReason::NonceLimit => "nonce_limit",
            DropReason::TooOld => "too_old",
            DropReason::Duplicate => "duplicate",
            DropReason::BadMac => "bad_mac",
            DropReason::BadPadding => "bad_padding",
            DropReason::BadAddress => "bad_address",
            DropReason::Fragmented => "fragmented",
            DropReason::UnknownKind => "unknown_kind",
            DropReason::ForeignSource => "foreign_source",
            DropReason::PolicyDenied => "policy_denied",
            DropReason::ResolveFailed => "resolve_failed",
            DropReason::UnsolicitedReply => "unsolicited_reply",
            DropReason::TooLarge => "too_large",
            DropReason::SendFailed => "send_failed",
            DropReason::BadControl => "bad_control",
            DropReason::QueueFull => "queue_full",
            DropReason::QueueExpired => "queue_expired",
            DropReason::FlowLimit => "flow_limit",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a record could not be opened. Each variant maps to one [`DropReason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum OpenError {
    /// Fewer bytes than the smallest possible record.
    #[error("record truncated: {len} bytes, need at least {min}")]
    Truncated {
        /// Bytes received.
        len: usize,
        /// Smallest valid record.
        min: usize,
    },
    /// Content type or version byte not recognised.
    #[error("bad record header: type {content_type:#04x}, version {version:#06x}")]
    BadHeader {
        /// First byte.
        content_type: u8,
        /// Bytes 1-2.
        version: u16,
    },
    /// Length field disagrees with the datagram.
    #[error("record length field {field} but {actual} bytes follow the header")]
    LengthMismatch {
        /// Value of the length field.
        field: usize,
        /// Bytes actually following the header.
        actual: usize,
    },
    /// Ciphertext not a positive multiple of 16 bytes.
    #[error("ciphertext length {len} is not a positive multiple of 16")]
    BadCiphertextLength {
        /// Ciphertext length.
        len: usize,
    },
    /// Record carries another association id than this opener's.
    #[error("record for association {found:016x}, expected {expected:016x}")]
    WrongAssociation {
        /// Association id in the record.
        found: u64,
        /// This opener's association id.
        expected: u64,
    },
    /// Nonce at or past the per-key limit.
    #[error("nonce {nonce} at or beyond the per-key limit")]
    NonceLimit {
        /// Offending nonce.
        nonce: u64,
    },
    /// Nonce left of the replay window.
    #[error("nonce {nonce} older than the replay window")]
    TooOld {
        /// Offending nonce.
        nonce: u64,
    },
    /// Nonce already seen.
    #[error("nonce {nonce} already received")]
    Duplicate {
        /// Offending nonce.
        nonce: u64,
    },
    /// Tag mismatch.
    #[error("authentication tag mismatch")]
    BadMac,
    /// Padding malformed after a valid tag.
    #[error("malformed padding in an authenticated record")]
    BadPadding,
    /// The plaintext's address header is malformed.
    #[error("malformed address header in plaintext: {0}")]
    BadAddress(SocksError),
    /// A control plaintext (ATYP 0x00) this receiver does not take: unknown KIND, a KIND
    /// of the other direction, or a malformed body.
    #[error("control message of kind {kind:#04x} not accepted")]
    BadControl {
        /// The KIND byte (0 when missing).
        kind: u8,
    },
}

impl OpenError {
    /// The drop reason to count.
    pub fn reason(&self) -> DropReason {
        match self {
            OpenError::Truncated { .. } => DropReason::Truncated,
            OpenError::BadHeader { .. } => DropReason::BadHeader,
            OpenError::LengthMismatch { .. } => DropReason::LengthMismatch,
            OpenError::BadCiphertextLength { .. } => DropReason::BadCiphertextLength,
            OpenError::WrongAssociation { .. } => DropReason::UnknownAssociation,
            OpenError::NonceLimit { .. } => DropReason::NonceLimit,
            OpenError::TooOld { .. } => DropReason::TooOld,
            OpenError::Duplicate { .. } => DropReason::Duplicate,
            OpenError::BadMac => DropReason::BadMac,
            OpenError::BadPadding => DropReason::BadPadding,
            OpenError::BadAddress(_) => DropReason::BadAddress,
            OpenError::BadControl { .. } => DropReason::BadControl,
        }
    }
}

/// Why a record could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SealError {
    /// The plaintext would make a record larger than the largest UDP payload.
    #[error("plaintext of {len} bytes exceeds the largest sealable plaintext of {max} bytes")]
    TooLarge {
        /// Plaintext length asked for.
        len: usize,
        /// Largest plaintext that fits in one record.
        max: usize,
    },
    /// The output buffer is too small for the record.
    #[error("output buffer of {have} bytes, record needs {need}")]
    BufferTooSmall {
        /// Buffer length.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The address cannot be encoded (a domain name empty, longer than 255 bytes or not
    /// printable ASCII).
    #[error("address cannot be encoded: {0}")]
    BadAddress(SocksError),
    /// This key has sealed its maximum number of records (or, AES-128-GCM, of data:
    /// PROTOCOL.md §8); open a new association.
    #[error("key exhausted after {limit} records: a new association is required")]
    KeyExhausted {
        /// The records this key sealed: the per-key record limit, or fewer when
        /// AES-128-GCM's data limit came first.
        limit: u64,
    },
}

impl SealError {
    /// The drop reason to count when a datagram cannot be sealed.
    pub fn reason(&self) -> DropReason {
        match self {
            SealError::TooLarge { .. } | SealError::BufferTooSmall { .. } => DropReason::TooLarge,
            SealError::BadAddress(_) => DropReason::BadAddress,
            SealError::KeyExhausted { .. } => DropReason::NonceLimit,
        }
    }
}

/// Errors of the SOCKS5 codecs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SocksError {
    /// More bytes are needed to decide; not an error on a stream.
    #[error("incomplete message: need at least {need} bytes")]
    Incomplete {
        /// Total bytes needed (a lower bound).
        need: usize,
    },
    /// Wrong protocol version byte.
    #[error("unsupported version {0:#04x}")]
    BadVersion(u8),
    /// Unknown address type.
    #[error("unsupported address type {0:#04x}")]
    BadAddressType(u8),
    /// Domain name empty or not printable ASCII.
    #[error("invalid domain name")]
    BadDomain,
    /// Reserved byte not zero.
    #[error("reserved field is not zero")]
    BadReserved,
    /// Field value outside what the message allows.
    #[error("invalid {field}: {value}")]
    BadField {
        /// Field name.
        field: &'static str,
        /// Offending value.
        value: u64,
    },
    /// Bytes left after a complete message where none may follow.
    #[error("{0} trailing bytes after the message")]
    TrailingData(usize),
    /// Output buffer too small to encode.
    #[error("output buffer too small: need {need} bytes")]
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter_slot_and_name() {
        let mut slots = [false; DropReason::COUNT];
        let mut names = std::collections::HashSet::new();
        for (i, r) in DropReason::ALL.into_iter().enumerate() {
            // `ALL` is in index order, so counter arrays and label lists line up.
            assert_eq!(r.index(), i, "{r:?}");
            assert!(!slots[r.index()], "{r:?} shares a slot");
            slots[r.index()] = true;
            assert!(names.insert(r.name()), "{r:?} shares a name");
            assert_eq!(r.to_string(), r.name());
        }
        assert!(slots.iter().all(|s| *s));
        assert_eq!(DropReason::BadMac.to_string(), "bad_mac");
    }
}
