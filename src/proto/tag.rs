//! Record tags: HMAC-SHA256 (RFC 2104) truncated to 128 bits (RFC 4868), one message at a
//! time or several of equal length in lockstep.
//!
//! SHA-256 is serial within a message: every block waits for the previous one, and with the
//! SHA extensions each pair of rounds waits for the previous pair. A CPU core has room for
//! more than one such chain at a time, so the records of a train (equal lengths, one key)
//! are hashed side by side, [`LANES`] at once, by one routine whose instruction stream
//! interleaves their rounds. On CPUs without the SHA extensions, and for a single message,
//! the `sha2` crate's compression function does the work; the bytes are the same either way
//! (tests compare every path against the `hmac` crate).
//!
//! The key is absorbed once: the states after the inner and outer key blocks are kept
//! (and zeroized on drop), so a tag costs the message's blocks plus two.

use sha2::block_api::compress256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Tag length in bytes.
pub const TAG_LEN: usize = 16;
/// Most messages hashed in lockstep (runs of 2 or 3 go two at a time).
pub const LANES: usize = 4;

const BLOCK: usize = 64;
const INITIAL: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// An HMAC-SHA256 key, absorbed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct TagKey {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl std::fmt::Debug for TagKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TagKey(..)")
    }
}

/// The blocks that end a message: its last partial block, the 0x80 byte, zeros and the bit
/// length (one or two blocks).
struct Tail {
    blocks: [[u8; BLOCK]; 2],
    count: usize,
}

impl Tail {
    /// `rest` is the message's last `len % 64` bytes; `total` counts every hashed byte,
    /// the key block included.
    fn new(rest: &[u8], total: usize) -> Self {
        let mut blocks = [[0u8; BLOCK]; 2];
        let count = if rest.len() + 9 > BLOCK { 2 } else { 1 };
        let flat = blocks.as_flattened_mut();
        flat[..rest.len()].copy_from_slice(rest);
        flat[rest.len()] = 0x80;
        let end = count * BLOCK;
        flat[end - 8..end].copy_from_slice(&((total as u64) * 8).to_be_bytes());
        Tail { blocks, count }
    }

    fn blocks(&self) -> &[[u8; BLOCK]] {
        &self.blocks[..self.count]
    }
}

/// The outer hash's only block: the inner digest, then padding for 64 + 32 bytes.
fn outer_block(inner: &[u32; 8]) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    for (i, w) in inner.iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&w.to_be_bytes());
    }
    b[32] = 0x80;
    b[56..].copy_from_slice(&(((BLOCK + 32) * 8) as u64).to_be_bytes());
    b
}

/// `msg` as whole 64-byte blocks and the bytes after them.
fn split_blocks(msg: &[u8]) -> (&[[u8; BLOCK]], &[u8]) {
    let n = msg.len() / BLOCK;
    let (head, rest) = msg.split_at(n * BLOCK);
    // SAFETY: `[u8; 64]` has size 64 and alignment 1, and `head` holds exactly `n * 64`
    // initialised bytes borrowed for the same lifetime.
    let blocks = unsafe { std::slice::from_raw_parts(head.as_ptr().cast::<[u8; BLOCK]>(), n) };
    (blocks, rest)
}

fn truncate(state: &[u32; 8]) -> [u8; TAG_LEN] {
    let mut t = [0u8; TAG_LEN];
    for (i, w) in state[..4].iter().enumerate() {
        t[4 * i..4 * i + 4].copy_from_slice(&w.to_be_bytes());
    }
    t
}

impl TagKey {
    /// Absorbs `key` (any length; keys longer than a block are hashed first, as RFC 2104).
    pub fn new(key: &[u8]) -> Self {
        let mut k = [0u8; BLOCK];
        if key.len() > BLOCK {
            use sha2::Digest;
            k[..32].copy_from_slice(&sha2::Sha256::digest(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let mut pad = [0u8; BLOCK];
        let mut absorb = |byte: u8| {
            for (p, k) in pad.iter_mut().zip(&k) {
                *p = k ^ byte;
            }
            let mut s = INITIAL;
            compress256(&mut s, std::slice::from_ref(&pad));
            s
        };
        let (inner, outer) = (absorb(0x36), absorb(0x5c));
        k.zeroize();
        pad.zeroize();
        TagKey { inner, outer }
    }

    /// The tag of `msg`.
    pub fn tag(&self, msg: &[u8]) -> [u8; TAG_LEN] {
        let mut s = self.inner;
        let (blocks, rest) = split_blocks(msg);
        compress256(&mut s, blocks);
        compress256(&mut s, Tail::new(rest, BLOCK + msg.len()).blocks());
        let mut o = self.outer;
        compress256(&mut o, &[outer_block(&s)]);
        let t = truncate(&o);
        // Working copies of key-derived state do not outlive the call.
        s.zeroize();
        o.zeroize();
        t
    }

    /// True when `tag` is the tag of `msg`; compared in constant time.
    pub fn verify(&self, msg: &[u8], tag: &[u8]) -> bool {
        tag.len() == TAG_LEN && bool::from(self.tag(msg).ct_eq(tag))
    }

    /// The tags of `msgs` into `tags` (one per message). Runs of [`LANES`] messages of equal
    /// length are hashed in lockstep where the CPU has the SHA extensions.
    pub fn tag_many(&self, msgs: &[&[u8]], tags: &mut [[u8; TAG_LEN]]) {
        assert!(tags.len() >= msgs.len(), "one tag per message");
        let mut i = 0;
        while i < msgs.len() {
            let rest = &msgs[i..];
            let equal = |n: usize| rest.len() >= n && rest[1..n].iter().all(|m| m.len() == rest[0].len());
            if equal(LANES) {
                if let Some(t) = lanes::tag::<LANES>(self, rest[..LANES].try_into().expect("LANES")) {
                    tags[i..i + LANES].copy_from_slice(&t);
                    i += LANES;
                    continue;
                }
            }
            if equal(2) {
                if let Some(t) = lanes::tag::<2>(self, rest[..2].try_into().expect("2")) {
                    tags[i..i + 2].copy_from_slice(&t);
                    i += 2;
                    continue;
                }
            }
            tags[i] = self.tag(msgs[i]);
            i += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod lanes {
    //! Several SHA-256 compressions side by side with the x86 SHA extensions.
    use std::arch::x86_64::*;

    use zeroize::Zeroize;

    use super::{outer_block, split_blocks, truncate, TagKey, Tail, BLOCK, TAG_LEN};

    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    ];

    fn available() -> bool {
        std::is_x86_feature_detected!("sha")
            && std::is_x86_feature_detected!("sse4.1")
            && std::is_x86_feature_detected!("ssse3")
    }

    /// The tags of `N` messages of equal length, or `None` without the SHA extensions.
    pub(super) fn tag<const N: usize>(key: &TagKey, msgs: &[&[u8]; N]) -> Option<[[u8; TAG_LEN]; N]> {
        if !available() {
            return None;
        }
        let len = msgs[0].len();
        let mut states = [key.inner; N];
        let split: [(&[[u8; BLOCK]], &[u8]); N] = std::array::from_fn(|l| split_blocks(msgs[l]));
        let tails: [Tail; N] = std::array::from_fn(|l| Tail::new(split[l].1, BLOCK + len));
        // SAFETY: the CPU has the features `compress` is compiled for (checked above), and
        // every lane has the same number of blocks (equal lengths).
        unsafe {
            compress(&mut states, std::array::from_fn(|l| split[l].0));
            compress(&mut states, std::array::from_fn(|l| tails[l].blocks()));
        }
        let mut outers = [key.outer; N];
        let mut blocks: [[[u8; BLOCK]; 1]; N] = std::array::from_fn(|l| [outer_block(&states[l])]);
        // SAFETY: as above; one block per lane.
        unsafe { compress(&mut outers, std::array::from_fn(|l| &blocks[l][..])) };
        let tags = std::array::from_fn(|l| truncate(&outers[l]));
        // Working copies of key-derived state do not outlive the call.
        states.zeroize();
        outers.zeroize();
        blocks.zeroize();
        Some(tags)
    }

    /// Compresses `blocks[l]` into `states[l]` for every lane, the rounds of all lanes
    /// interleaved.
    ///
    /// # Safety
    /// The CPU must have SHA, SSSE3 and SSE4.1, and every lane as many blocks as lane 0.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn compress<const N: usize>(states: &mut [[u32; 8]; N], blocks: [&[[u8; BLOCK]]; N]) {
        let n = blocks[0].len();
        debug_assert!(blocks.iter().all(|b| b.len() == n));
        let bswap = _mm_set_epi64x(0x0C0D_0E0F_0809_0A0B, 0x0405_0607_0001_0203);
        let mut abef = [_mm_setzero_si128(); N];
        let mut cdgh = [_mm_setzero_si128(); N];
        for l in 0..N {
            let p = states[l].as_ptr().cast::<__m128i>();
            // SAFETY: 8 u32 = two 16-byte loads, unaligned allowed.
            let (dcba, hgfe) = unsafe { (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1))) };
            let cdab = _mm_shuffle_epi32(dcba, 0xB1);
            let efgh = _mm_shuffle_epi32(hgfe, 0x1B);
            abef[l] = _mm_alignr_epi8(cdab, efgh, 8);
            cdgh[l] = _mm_blend_epi16(efgh, cdab, 0xF0);
        }
        #[allow(clippy::needless_range_loop, reason = "block b of every lane")]
        for b in 0..n {
            let (abef0, cdgh0) = (abef, cdgh);
            let mut w = [[_mm_setzero_si128(); 4]; N];
            for l in 0..N {
                let p = blocks[l][b].as_ptr().cast::<__m128i>();
                for (i, wi) in w[l].iter_mut().enumerate() {
                    // SAFETY: a 64-byte block is four 16-byte loads.
                    *wi = _mm_shuffle_epi8(unsafe { _mm_loadu_si128(p.add(i)) }, bswap);
                }
            }
            for r in 0..16 {
                // SAFETY: K has 64 words; 4r+3 < 64.
                let k = unsafe { _mm_loadu_si128(K.as_ptr().add(4 * r).cast::<__m128i>()) };
                for l in 0..N {
                    let i = r % 4;
                    if r >= 4 {
                        // Message schedule: W[4r..4r+4] from the four previous quads.
                        let w = &mut w[l];
                        let t = _mm_add_epi32(
                            _mm_sha256msg1_epu32(w[i], w[(i + 1) % 4]),
                            _mm_alignr_epi8(w[(i + 3) % 4], w[(i + 2) % 4], 4),
                        );
                        w[i] = _mm_sha256msg2_epu32(t, w[(i + 3) % 4]);
                    }
                    let wk = _mm_add_epi32(w[l][i], k);
                    cdgh[l] = _mm_sha256rnds2_epu32(cdgh[l], abef[l], wk);
                    abef[l] = _mm_sha256rnds2_epu32(abef[l], cdgh[l], _mm_shuffle_epi32(wk, 0x0E));
                }
            }
            for l in 0..N {
                abef[l] = _mm_add_epi32(abef[l], abef0[l]);
                cdgh[l] = _mm_add_epi32(cdgh[l], cdgh0[l]);
            }
        }
        for l in 0..N {
            let feba = _mm_shuffle_epi32(abef[l], 0x1B);
            let dchg = _mm_shuffle_epi32(cdgh[l], 0xB1);
            let dcba = _mm_blend_epi16(feba, dchg, 0xF0);
            let hgef = _mm_alignr_epi8(dchg, feba, 8);
            let p = states[l].as_mut_ptr().cast::<__m128i>();
            // SAFETY: two 16-byte stores into 8 u32.
            unsafe {
                _mm_storeu_si128(p, dcba);
                _mm_storeu_si128(p.add(1), hgef);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod lanes {
    use super::{TagKey, TAG_LEN};

    /// No lockstep routine on this architecture: callers hash one message at a time.
    pub(super) fn tag<const N: usize>(_: &TagKey, _: &[&[u8]; N]) -> Option<[[u8; TAG_LEN]; N]> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, KeyInit, Mac};
    use proptest::prelude::*;

    fn reference(key: &[u8], msg: &[u8]) -> [u8; TAG_LEN] {
        let mut m = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).unwrap();
        m.update(msg);
        let full = m.finalize().into_bytes();
        full[..TAG_LEN].try_into().unwrap()
    }

    #[test]
    fn rfc4231_case_2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let t = TagKey::new(b"Jefe").tag(b"what do ya want for nothing?");
        assert_eq!(
            t,
            [
                0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e, 0x6a, 0x04, 0x24, 0x26, 0x08, 0x95, 0x75,
                0xc7
            ]
        );
    }

    #[test]
    fn every_length_around_block_edges_matches_hmac() {
        let key = [0x0bu8; 32];
        let k = TagKey::new(&key);
        let data: Vec<u8> = (0..400u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..400 {
            let msg = &data[..len];
            assert_eq!(k.tag(msg), reference(&key, msg), "len {len}");
            let other: Vec<u8> = msg.iter().map(|b| b ^ 0x5a).collect();
            let mut tags = [[0u8; TAG_LEN]; 3];
            k.tag_many(&[msg, &other, msg], &mut tags);
            assert_eq!(tags[0], reference(&key, msg), "lane 0, len {len}");
            assert_eq!(tags[1], reference(&key, &other), "lane 1, len {len}");
            assert_eq!(tags[2], reference(&key, msg), "single after lanes, len {len}");
        }
    }

    #[test]
    fn long_keys_are_hashed_first() {
        let key = [0xaau8; 131];
        assert_eq!(TagKey::new(&key).tag(b"x"), reference(&key, b"x"));
    }

    #[test]
    fn verify_refuses_any_other_tag() {
        let k = TagKey::new(&[1; 32]);
        let t = k.tag(b"record");
        assert!(k.verify(b"record", &t));
        for i in 0..TAG_LEN {
            let mut bad = t;
            bad[i] ^= 1;
            assert!(!k.verify(b"record", &bad));
        }
        assert!(!k.verify(b"record", &t[..15]));
    }

    proptest! {
        #[test]
        fn tag_many_equals_one_by_one(
            key in proptest::collection::vec(any::<u8>(), 1..80),
            msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..7),
            same_len in any::<bool>(),
        ) {
            let k = TagKey::new(&key);
            let mut msgs = msgs;
            if same_len && !msgs.is_empty() {
                let n = msgs[0].len();
                for m in &mut msgs { m.resize(n, 0x11); }
            }
            let refs: Vec<&[u8]> = msgs.iter().map(|m| &m[..]).collect();
            let mut tags = vec![[0u8; TAG_LEN]; refs.len()];
            k.tag_many(&refs, &mut tags);
            for (m, t) in refs.iter().zip(&tags) {
                prop_assert_eq!(*t, reference(&key, m));
            }
        }
    }

    /// Deterministic filler (xorshift64), so a failure names a reproducible case.
    fn filler(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Message lengths where SHA-256 padding changes shape, for a message hashed after the
    /// 64-byte key block: a tail of 55 bytes still fits one final block, 56 needs two; 64
    /// is a whole block with an empty tail. Every length class up to three blocks, plus
    /// long messages up to the authenticated part of the largest record.
    fn differential_lengths() -> Vec<usize> {
        let largest = crate::proto::record::record_len(crate::proto::record::MAX_PLAINTEXT) - TAG_LEN;
        let mut lens: Vec<usize> = (0..=3 * BLOCK).collect();
        for base in [3 * BLOCK, 1024 - BLOCK, 1472 - 2 * BLOCK, 4096, largest - BLOCK] {
            lens.extend([55, 56, 63, 64, 65, 119, 120].map(|d| base + d));
        }
        lens.extend([1200, 1452, 8192, largest - 1, largest]);
        lens.retain(|&l| l <= largest);
        lens
    }

    /// Differential test against the RustCrypto `hmac` crate: every key length 0..=131
    /// (empty, shorter than, equal to and longer than a block, so hashed first) against
    /// every message length class, one at a time and in trains of 1..=16 equal-length
    /// messages through `tag_many` (which takes the lockstep lanes on SHA-NI CPUs and the
    /// single path elsewhere).
    #[test]
    fn differential_against_the_hmac_crate() {
        let lens = differential_lengths();
        let largest = *lens.last().unwrap();
        let data = filler(1, largest + 16 * 7);
        let mut checked = 0usize;
        for key_len in 0..=131usize {
            let key = filler(1000 + key_len as u64, key_len);
            let k = TagKey::new(&key);
            // Short messages for every key; the long ones (slow in a debug build) for key
            // lengths on either side of the block size.
            let long_too = matches!(key_len, 0 | 1 | 32 | 63 | 64 | 65 | 131);
            for &len in lens.iter().filter(|&&l| l <= 3 * BLOCK + 8 || long_too) {
                let msg = &data[..len];
                assert_eq!(k.tag(msg), reference(&key, msg), "key {key_len}, len {len}");
                assert!(k.verify(msg, &reference(&key, msg)));
                checked += 1;
            }
        }
        // Trains: n equal-length messages with different contents (so a lane mix-up shows),
        // every n in 1..=16, at every boundary length and the largest record.
        let train_lens = [
            0usize, 1, 55, 56, 63, 64, 65, 119, 120, 128, 191, 192, 1200, largest,
        ];
        for key_len in [0usize, 16, 32, 64, 65, 131] {
            let key = filler(7 + key_len as u64, key_len);
            let k = TagKey::new(&key);
            for &len in &train_lens {
                for n in 1..=16usize {
                    if len == largest && !matches!(n, 1 | 4 | 5 | 16) {
                        continue; // the largest size at the lane-count edges is enough
                    }
                    let msgs: Vec<&[u8]> = (0..n).map(|i| &data[7 * i..7 * i + len]).collect();
                    let mut tags = vec![[0u8; TAG_LEN]; n];
                    k.tag_many(&msgs, &mut tags);
                    for (i, (m, t)) in msgs.iter().zip(&tags).enumerate() {
                        assert_eq!(
                            *t,
                            reference(&key, m),
                            "key {key_len}, len {len}, train {n}, #{i}"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 30_000, "{checked} comparisons");
    }

    #[test]
    fn debug_shows_no_key_state() {
        assert_eq!(format!("{:?}", TagKey::new(b"secret")), "TagKey(..)");
    }

    /// The lockstep routine is what `tag_many` uses where the CPU has the SHA extensions
    /// (the differential test above shows its bytes are right; this shows it runs at all,
    /// so a detection bug cannot silently fall back to the slower single path).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn lanes_run_where_the_cpu_has_the_sha_extensions() {
        let k = TagKey::new(b"k");
        let (a, b) = (&[1u8; 100][..], &[2u8; 100][..]);
        let got = lanes::tag::<2>(&k, &[a, b]);
        let has = std::is_x86_feature_detected!("sha")
            && std::is_x86_feature_detected!("sse4.1")
            && std::is_x86_feature_detected!("ssse3");
        assert_eq!(got.is_some(), has);
        if let Some(t) = got {
            assert_eq!(t, [reference(b"k", a), reference(b"k", b)]);
        }
    }
}
