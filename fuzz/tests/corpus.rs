//! Every fuzz property over its committed seeds, then over bounded pseudo-random inputs
//! (a fixed-seed generator: the same inputs each run), without libFuzzer: `cargo test` in
//! `fuzz/` checks that the targets build and their properties hold where the fuzzer starts.

use std::path::Path;

type Property = fn(&[u8]);

const TARGETS: &[(&str, Property)] = &[
    ("record_open", sudp_fuzz::record_open),
    ("record_train", sudp_fuzz::record_train),
    ("socks", sudp_fuzz::socks),
    ("sudp_negotiation", sudp_fuzz::sudp_negotiation),
    ("config", sudp_fuzz::config),
    ("users", sudp_fuzz::users),
];

#[test]
fn every_seed_holds_its_property() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for (name, property) in TARGETS {
        let mut seeds = 0;
        for entry in std::fs::read_dir(root.join(name)).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            property(&data);
            seeds += 1;
        }
        assert!(seeds > 0, "no seeds for {name}");
    }
}

#[test]
fn random_inputs_hold_every_property() {
    // xorshift64*: enough spread for inputs, and the same inputs every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for (_, property) in TARGETS {
        for _ in 0..300 {
            let len = (next() % 600) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            property(&data);
        }
    }
}
