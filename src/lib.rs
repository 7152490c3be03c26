//! sudp: a secure-UDP streaming gateway.
//!
//! A gateway speaks SOCKS5 (RFC 1928/1929) inside a TLS control connection and relays UDP
//! datagrams as modified TLS records that each decrypt on their own (explicit nonce, derived
//! IV, AES-CBC + HMAC-SHA256, encrypt-then-MAC) behind a replay window. Conventional
//! ("naked") SOCKS5 UDP clients are served on the same relay socket.
//!
//! [`proto`] is the sans-IO core; `docs/PROTOCOL.md` is the wire contract.

#![warn(missing_docs)]

pub mod audit;
pub mod auth;
pub mod bench;
pub mod cert;
pub mod client;
pub mod config;
pub mod gateway;
pub mod inspect;
pub mod logsafe;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod proto;
pub mod shim;
pub mod store;
pub mod tls;
