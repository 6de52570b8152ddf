//! Runs one dispatcher hot path in a loop, for a profiler to sample:
//!
//! ```text
//! profile <a2|b2|b3> [seconds]
//! ```
//!
//! * `a2` — fanout submit of 100k tasks to 64 candidates, in batches of 1000;
//! * `b2` — 100k tasks over 64 workers drained by two threads, one task per fetch;
//! * `b3` — 20k tasks fanned out to 64 workers, claimed by two fetchers.
//!
//! `flamegraphs/record.sh` runs it under `perf`.

use std::time::{Duration, Instant};

use switchyard::{Mode, TaskSpec};
use switchyard_benches::scenario::{dispatcher, drain, loaded, spec, two_threads, WORKERS};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_default();
    let seconds: u64 = match args.next().map(|s| s.parse()) {
        None => 5,
        Some(Ok(s)) => s,
        Some(Err(_)) => usage("seconds must be a whole number"),
    };
    let until = Instant::now() + Duration::from_secs(seconds);
    let half = WORKERS / 2;
    let mut rounds = 0u64;
    while Instant::now() < until {
        match which.as_str() {
            "a2" => {
                let d = dispatcher(Mode::Fanout, WORKERS);
                let specs: Vec<TaskSpec> = (0..100_000).map(spec).collect();
                for chunk in specs.chunks(1000) {
                    d.submit_many(chunk.iter().cloned()).expect("submit");
                }
            }
            "b2" => {
                let d = loaded(100_000);
                two_threads(|t| {
                    let t = t as u64;
                    drain(&d, t * half..(t + 1) * half);
                });
            }
            "b3" => {
                let d = dispatcher(Mode::Fanout, WORKERS);
                d.submit_many((0..20_000).map(spec)).expect("submit");
                two_threads(|t| {
                    let t = t as u64;
                    drain(&d, t * half..(t + 1) * half);
                });
            }
            _ => usage("unknown scenario"),
        }
        rounds += 1;
    }
    eprintln!("{which}: {rounds} rounds in {seconds} s");
}

fn usage(why: &str) -> ! {
    eprintln!("profile: {why}\nusage: profile <a2|b2|b3> [seconds]");
    std::process::exit(2);
}
