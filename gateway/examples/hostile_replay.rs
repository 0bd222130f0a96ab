//! Replays every committed fuzz corpus (`fuzz/corpus/<target>/`) through the
//! fuzz targets' bodies, plus pseudo-random inputs, in a binary built with
//! `panic = "abort"` (`--profile release-abort`): a panic anywhere in the
//! gateway (a spawned task included, which tokio would otherwise catch) kills
//! the process, so a zero exit proves none was reached. Test harnesses cannot
//! show this on stable (`cargo test` forces unwinding), hence an example.
//!
//! `cargo run --profile release-abort -p vendgate --example hostile_replay [RANDOM_CASES]`

use std::path::PathBuf;

use vendgate::fuzzing::{self, Harness};

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(d) => d.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) => {
            eprintln!("corpus {}: {e}", dir.display());
            std::process::exit(2);
        }
    };
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// xorshift64*: reproducible inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A corpus input with a few bytes overwritten, or fresh bytes.
    fn input(&mut self, corpus: &[Vec<u8>]) -> Vec<u8> {
        let pick = usize::try_from(self.next()).unwrap_or(0);
        let mut v = match corpus.get(pick % corpus.len().max(1)) {
            Some(c) if !self.next().is_multiple_of(4) => c.clone(),
            _ => (0..self.next() % 128).map(|_| self.next() as u8).collect(),
        };
        for _ in 0..self.next() % 4 {
            if !v.is_empty() {
                let at = usize::try_from(self.next()).unwrap_or(0) % v.len();
                if let Some(b) = v.get_mut(at) {
                    *b = self.next() as u8;
                }
            }
        }
        v
    }
}

fn main() {
    let random: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    if cfg!(panic = "abort") {
        println!("built with panic = \"abort\": any panic ends this process");
    } else {
        println!("warning: built with unwinding; a panic in a spawned task would go unnoticed here (use --profile release-abort)");
    }
    let h = Harness::new();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    type Target<'a> = (&'a str, Box<dyn Fn(&[u8]) + 'a>);
    let targets: [Target; 4] = [
        ("mqtt_decode", Box::new(fuzzing::mqtt_decode)),
        ("edge_session", Box::new(|d| h.edge_session(d))),
        ("device_payload", Box::new(|d| h.device_payload(d))),
        ("http_api", Box::new(|d| h.http_api(d))),
    ];
    for (name, run) in &targets {
        let inputs = corpus(name);
        for d in &inputs {
            run(d);
        }
        let n = if *name == "device_payload" {
            random / 4
        } else {
            random
        };
        for _ in 0..n {
            run(&rng.input(&inputs));
        }
        println!(
            "{name}: {} corpus inputs + {n} random, no panic",
            inputs.len()
        );
    }
}
