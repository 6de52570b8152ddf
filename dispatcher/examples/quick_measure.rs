//! A quick single-threaded measurement of the two hot paths: fetch, and fanout enqueue of 100k
//! tasks to 64 candidates. Not a benchmark harness (that lives in `benches/`): one pass each,
//! best of three, with the system allocator.
//!
//! ```text
//! cargo run --release -p switchyard --example quick_measure
//! ```

use std::time::{Duration, Instant};

use switchyard::{Config, Dispatcher, Strategy, TaskSpec, WorkerId};

const TASKS: u64 = 100_000;
const WORKERS: u64 = 64;

fn best_of<F: FnMut() -> Duration>(mut f: F) -> Duration {
    (0..3).map(|_| f()).min().unwrap()
}

fn per_op(d: Duration, ops: u64) -> String {
    format!(
        "{:>7.1} ns/op  {:>6.2} M ops/s",
        d.as_nanos() as f64 / ops as f64,
        ops as f64 / d.as_secs_f64() / 1e6
    )
}

fn with_workers(config: Config) -> Dispatcher {
    let d = Dispatcher::new(config).unwrap();
    for w in 0..WORKERS {
        d.register(WorkerId(w), &["g"], &["t"]).unwrap();
    }
    d
}

fn specs() -> impl Iterator<Item = TaskSpec> {
    (0..TASKS).map(|i| TaskSpec::new(i, "g").tags(["t"]).priority((i % 8) as i32))
}

fn main() {
    // Fetch: 100k tasks balanced over 64 workers, fetched one at a time.
    let fetch = best_of(|| {
        let d = with_workers(Config::balanced(Strategy::RoundRobin));
        d.submit_many(specs()).unwrap();
        let start = Instant::now();
        for w in 0..WORKERS {
            while !d.fetch(WorkerId(w), 1).unwrap().is_empty() {}
        }
        let t = start.elapsed();
        assert_eq!(d.stats().counters.claimed, TASKS);
        t
    });
    println!(
        "fetch (1 per call, 100k over 64 workers)      {}",
        per_op(fetch, TASKS)
    );

    let fetch16 = best_of(|| {
        let d = with_workers(Config::balanced(Strategy::RoundRobin));
        d.submit_many(specs()).unwrap();
        let start = Instant::now();
        for w in 0..WORKERS {
            while !d.fetch(WorkerId(w), 16).unwrap().is_empty() {}
        }
        start.elapsed()
    });
    println!(
        "fetch (16 per call)                           {}",
        per_op(fetch16, TASKS)
    );

    // Fanout enqueue: 100k tasks, each copied to 64 candidates.
    let single = best_of(|| {
        let d = with_workers(Config::default());
        let start = Instant::now();
        for s in specs() {
            d.submit(s).unwrap();
        }
        let t = start.elapsed();
        assert_eq!(d.stats().copies as u64, TASKS * WORKERS);
        t
    });
    println!(
        "fanout submit ×64 (one task per call)         {}",
        per_op(single, TASKS)
    );

    let batched = best_of(|| {
        let d = with_workers(Config::default());
        let start = Instant::now();
        let all: Vec<TaskSpec> = specs().collect();
        for chunk in all.chunks(1000) {
            d.submit_many(chunk.iter().cloned()).unwrap();
        }
        start.elapsed()
    });
    println!(
        "fanout submit ×64 (batches of 1000)           {}",
        per_op(batched, TASKS)
    );

    // Fanout claim: 64 candidates each, drained by one worker after another.
    let claim = best_of(|| {
        let d = with_workers(Config::default());
        d.submit_many(specs().take(20_000)).unwrap();
        let start = Instant::now();
        for w in 0..WORKERS {
            while !d.fetch(WorkerId(w), 16).unwrap().is_empty() {}
        }
        let t = start.elapsed();
        assert_eq!(d.stats().counters.claimed, 20_000);
        t
    });
    println!(
        "fanout claim (20k tasks × 64 candidates)      {}",
        per_op(claim, 20_000)
    );
}
