//! The `frame_decoder` fuzz target's checks over a few thousand seeded inputs: valid streams,
//! their mutations, structured random frames and raw noise. Runs on stable in CI; the real
//! fuzzer (`cargo +nightly fuzz run frame_decoder` in proto/fuzz) explores further.
#![allow(clippy::unwrap_used)]

mod common;

#[path = "../fuzz/common/frame_decoder.rs"]
mod frame_decoder;

use common::*;

/// SplitMix64: a tiny seeded generator, so the inputs are the same on every run.
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
        (self.next() % n.max(1) as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = vec![sample_stream()];
    // The stream without its protocol header, and every method alone.
    seeds.push(sample_stream()[8..].to_vec());
    for method in all_methods() {
        seeds.push(method_frame(1, &method));
    }
    seeds.push(content_bytes(1, &method_by_ids(60, 40), &[7; 300], 64));
    seeds.push(heartbeat_bytes());
    // Deep nesting, at and beyond the limit.
    for depth in [32, 33, 400] {
        let mut value: Vec<u8> = Vec::new();
        for _ in 0..depth {
            let mut outer = vec![b'A'];
            outer.extend_from_slice(&(value.len() as u32).to_be_bytes());
            outer.extend_from_slice(&value);
            value = outer;
        }
        let entry = [&[1, b'k'][..], &value].concat();
        let mut payload = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
        payload.extend_from_slice(&(entry.len() as u32).to_be_bytes());
        payload.extend_from_slice(&entry);
        seeds.push(raw_frame(1, 1, &payload));
    }
    seeds
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.byte();
            }
            2 => {
                let i = rng.below(out.len() + 1);
                out.insert(i, rng.byte());
            }
            3 if !out.is_empty() => {
                let i = rng.below(out.len());
                out.remove(i);
            }
            4 => {
                let cut = rng.below(out.len() + 1);
                out.truncate(cut);
            }
            _ => {
                // Interesting values where sizes and ids live.
                if out.len() >= 7 {
                    let i = rng.below(out.len() - 3);
                    let v: [u8; 4] = match rng.below(4) {
                        0 => [0xFF; 4],
                        1 => [0; 4],
                        2 => 8192u32.to_be_bytes(),
                        _ => 8193u32.to_be_bytes(),
                    };
                    out[i..i + 4].copy_from_slice(&v);
                }
            }
        }
    }
    out
}

fn random_frames(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.below(6) {
        let frame_type = [1u8, 2, 3, 8, rng.byte()][rng.below(5)];
        let channel = [0u16, 1, 2, 65535][rng.below(4)];
        let mut payload = Vec::new();
        if frame_type == 1 {
            let (class_id, method_id, _) = RABBITMQ_METHODS[rng.below(RABBITMQ_METHODS.len())];
            payload.extend_from_slice(&class_id.to_be_bytes());
            payload.extend_from_slice(&method_id.to_be_bytes());
        }
        for _ in 0..rng.below(40) {
            payload.push(if rng.below(2) == 0 { 0 } else { rng.byte() });
        }
        out.extend_from_slice(&raw_frame(frame_type, channel, &payload));
    }
    out
}

/// Writes the seeds (with a control octet) to `WARREN_FUZZ_SEED_DIR`, to start the real
/// fuzzer's corpus: `WARREN_FUZZ_SEED_DIR=$PWD/proto/fuzz/corpus/frame_decoder cargo test
/// -p warren-proto --test amqp_fuzz_stable -- --ignored`.
#[test]
#[ignore = "a tool, not a check: writes the fuzz seed corpus"]
fn write_seed_corpus() {
    let dir = std::env::var_os("WARREN_FUZZ_SEED_DIR").expect("set WARREN_FUZZ_SEED_DIR");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, seed) in seeds().iter().enumerate() {
        let control = if seed.starts_with(b"AMQP") { 6u8 } else { 2 };
        let path = std::path::Path::new(&dir).join(format!("seed-{i:03}"));
        std::fs::write(path, [&[control][..], seed].concat()).unwrap();
    }
}

#[test]
fn fuzz_target_holds_on_seeded_inputs() {
    let mut rng = Rng(0x5EED_0002);
    let seeds = seeds();
    let mut runs = 0;
    let (mut frames, mut errors) = (0, 0);
    let mut count = |(f, e): (usize, usize)| {
        frames += f;
        errors += e;
    };
    for seed in &seeds {
        for control in [0u8, 1, 2, 3, 4, 5, 6, 7, 0xF8, 0xFF] {
            count(frame_decoder::run(&[&[control][..], seed].concat()));
            runs += 1;
        }
    }
    for _ in 0..8000 {
        // Multi-frame streams a third of the time; the decoder set up to match the seed
        // (protocol header expected or not, a usable frame_max) most of the time.
        let seed = if rng.below(3) == 0 {
            &seeds[rng.below(2)]
        } else {
            &seeds[rng.below(seeds.len())]
        };
        let mut control = rng.byte();
        if rng.below(10) != 0 {
            control = if seed.starts_with(b"AMQP") {
                control | 4
            } else {
                control & !4
            };
            if control & 3 == 3 {
                control &= !1;
            }
        }
        let mut input = vec![control];
        input.extend_from_slice(&mutate(&mut rng, seed));
        count(frame_decoder::run(&input));
        runs += 1;
    }
    for _ in 0..3000 {
        let mut input = vec![rng.byte() & !7];
        input.extend_from_slice(&random_frames(&mut rng));
        count(frame_decoder::run(&input));
        runs += 1;
    }
    for _ in 0..1000 {
        let len = rng.below(64);
        let input: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        count(frame_decoder::run(&input));
        runs += 1;
    }
    eprintln!("{runs} inputs, {frames} frames, {errors} errors");
    assert!(runs > 12_000);
    // The inputs reach deep into the decoder, not just its first checks.
    assert!(frames > 3000, "only {frames} frames decoded");
    assert!(errors > 1000, "only {errors} errors found");
}
