//! F: memory of the A2 shape (100k tasks fanned out to 64 workers), measured with a counting
//! allocator: bytes still allocated after the tasks are queued, minus before. Prints a markdown
//! table. Run: `cargo run --release -p switchyard-benches --bin memory`.
//! `SWITCHYARD_BENCH_SCALE` scales the task count as in the benches.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use switchyard::{Config, Dispatcher, Mode, TaskSpec, WorkerId};
use switchyard_benches::Queues;

/// The system allocator, counting live bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s
// contract; the wrapper only adds an atomic counter.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const WORKERS: u64 = 64;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn main() {
    let scale: f64 = std::env::var("SWITCHYARD_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let n = ((100_000.0 * scale) as u64).max(1_000);
    let copies = (n * WORKERS) as f64;

    let base = live();
    let d = Dispatcher::new(Config {
        mode: Mode::Fanout,
        ..Config::default()
    })
    .unwrap();
    for w in 0..WORKERS {
        d.register(WorkerId(w), &["g"], &[] as &[&str]).unwrap();
    }
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        d.submit_many(
            chunk
                .iter()
                .map(|&i| TaskSpec::new(i, "g").priority((i % 8) as i32)),
        )
        .unwrap();
    }
    let ours = (live() - base) as f64;
    assert_eq!(d.stats().copies as f64, copies);
    drop(d);

    // The actor and the global mutex hold the same `Queues`; the actor's channel is empty at rest.
    let base = live();
    let mut q = Queues::default();
    (0..WORKERS).for_each(|w| q.register(w));
    let all: Vec<u64> = (0..WORKERS).collect();
    (0..n).for_each(|i| q.enqueue(i, (i % 8) as i32, &all));
    let theirs = (live() - base) as f64;
    assert_eq!(q.copies() as f64, copies);

    println!("| implementation | bytes | per task | per copy | vs actor |");
    println!("|---|---:|---:|---:|---:|");
    for (name, bytes) in [("switchyard", ours), ("actor / global mutex", theirs)] {
        println!(
            "| {name} | {:.1} MB | {:.0} B | {:.1} B | {:.2}× |",
            bytes / 1e6,
            bytes / n as f64,
            bytes / copies,
            bytes / theirs
        );
    }
    println!("\n{n} tasks × {WORKERS} candidates (fanout).");
}
