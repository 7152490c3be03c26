//! One AES-128 block (a record's IV) and the CBC decryption of a 176- and a 1200-byte
//! record body, with `aes` 0.9 (which picks its VAES/AVX-512 backend where the CPU has one)
//! and `aes` 0.8 (AES-NI), keys set up once, as sudp's record layer does. Prints ns per
//! operation; run it twice or more on an idle machine and compare within one run.

use std::hint::black_box;
use std::time::Instant;

const BLOCKS: u64 = 5_000_000;
const RECORDS: u64 = 1_000_000;

fn per_op(t: Instant, n: u64) -> f64 {
    t.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    println!(
        "cpu has avx512f+vaes: {}",
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("vaes")
    );
    {
        use aes9::cipher::{Array, BlockCipherEncrypt, KeyInit};
        let k = aes9::Aes128::new(&Array::from([7u8; 16]));
        let mut b = Array::from([1u8; 16]);
        let t = Instant::now();
        for i in 0..BLOCKS {
            b[0] ^= i as u8;
            k.encrypt_block(&mut b);
        }
        black_box(&b);
        println!("aes 0.9 one block:           {:7.1} ns", per_op(t, BLOCKS));
    }
    {
        use aes8::cipher::{generic_array::GenericArray, BlockEncrypt, KeyInit};
        let k = aes8::Aes128::new(&GenericArray::from([7u8; 16]));
        let mut b = GenericArray::from([1u8; 16]);
        let t = Instant::now();
        for i in 0..BLOCKS {
            b[0] ^= i as u8;
            k.encrypt_block(&mut b);
        }
        black_box(&b);
        println!("aes 0.8 one block:           {:7.1} ns", per_op(t, BLOCKS));
    }
    for size in [176usize, 1200] {
        {
            use cbc2::cipher::{Array, BlockModeDecrypt, InnerIvInit, KeyInit};
            let k = aes9::Aes128::new(&Array::from([7u8; 16]));
            let mut data = vec![3u8; size];
            let t = Instant::now();
            for _ in 0..RECORDS {
                let (blocks, _) = Array::<u8, aes9::cipher::consts::U16>::slice_as_chunks_mut(&mut data);
                cbc2::Decryptor::<&aes9::Aes128>::inner_iv_init(&k, &Array::from([1u8; 16]))
                    .decrypt_blocks(blocks);
            }
            black_box(&data);
            println!("aes 0.9 CBC decrypt {size:4} B:  {:7.1} ns", per_op(t, RECORDS));
        }
        {
            use cbc1::cipher::{
                consts::U16, generic_array::GenericArray, inout::InOutBuf, BlockDecryptMut, InnerIvInit,
                KeyInit,
            };
            let k = aes8::Aes128::new(&GenericArray::from([7u8; 16]));
            let mut data = vec![3u8; size];
            let t = Instant::now();
            for _ in 0..RECORDS {
                let (blocks, _) = InOutBuf::from(&mut data[..]).into_chunks::<U16>();
                cbc1::Decryptor::<&aes8::Aes128>::inner_iv_init(&k, &GenericArray::from([1u8; 16]))
                    .decrypt_blocks_inout_mut(blocks);
            }
            black_box(&data);
            println!("aes 0.8 CBC decrypt {size:4} B:  {:7.1} ns", per_op(t, RECORDS));
        }
    }
}
