//! The dispatcher against the actor and global-mutex baselines. One criterion group per
//! question; every implementation of a question sits in the same group, so its ratios come
//! from one run. Only the operations are timed (`iter_custom`); setup is not. Multi-threaded
//! cases time the parallel section only, between two barriers.
//!
//! `SWITCHYARD_BENCH_SCALE` (default 1) scales every task count, for quick runs.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use switchyard::{Assignment, Mode, TaskId, TaskSpec, WorkerId};
use switchyard_benches::scenario::{
    balanced, dispatcher, drain, drain_mutex, loaded, loaded_queues, queues, scale, spec,
    two_threads, WORKERS,
};
use switchyard_benches::{Actor, GlobalMutex, Rng};

const NO_TAGS: &[&str] = &[];

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs `f` as a task on `rt` (a worker thread of the runtime, where the actor's callers live
/// in a server) and returns its result.
fn on_runtime<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    rt.block_on(async { tokio::spawn(f).await.expect("bench task") })
}

/// Prints `line` once per process and label (criterion runs each bench many times).
fn note_once(label: &'static str, line: String) {
    static SEEN: std::sync::Mutex<Vec<&str>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap();
    if !seen.contains(&label) {
        seen.push(label);
        eprintln!("{line}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Times `run` on a fresh `setup()` per iteration.
fn timed<S>(iters: u64, mut setup: impl FnMut() -> S, mut run: impl FnMut(S)) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let s = setup();
        let start = Instant::now();
        run(s);
        total += start.elapsed();
    }
    total
}

fn configure<'a>(
    c: &'a mut Criterion,
    name: &str,
    elements: u64,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.throughput(Throughput::Elements(elements));
    g
}

// ----- A: enqueue ---------------------------------------------------------------------------

/// Candidate lists handed to the baselines.
type Lists = Vec<Arc<[u64]>>;

/// The enqueue groups, one row each: the group's name, the dispatcher's mode, and the candidate
/// lists the baselines are handed (task `i` goes to list `i % lists.len()`; built once, outside
/// the timed section).
fn enqueue_groups() -> [(&'static str, Mode, Lists); 2] {
    let one_each = (0..WORKERS).map(|w| Arc::from(vec![w])).collect();
    let all: Arc<[u64]> = (0..WORKERS).collect::<Vec<_>>().into();
    [
        ("A1_enqueue_1_of_64", balanced(), one_each),
        ("A2_fanout_enqueue_64", Mode::Fanout, vec![all]),
    ]
}

fn a_enqueue(c: &mut Criterion) {
    for (name, mode, lists) in enqueue_groups() {
        enqueue_group(c, name, mode, Arc::new(lists));
    }
}

/// One enqueue group: `n` submissions to a dispatcher with `WORKERS` workers in `mode`, one by
/// one and in batches of 1000, against the actor and the global mutex handed `lists`.
fn enqueue_group(c: &mut Criterion, name: &str, mode: Mode, lists: Arc<Lists>) {
    let n = scale(100_000);
    let list = |i: u64| -> usize { (i % lists.len() as u64) as usize };
    let mut g = configure(c, name, n);
    g.bench_function("switchyard", |b| {
        b.iter_custom(|iters| {
            timed(
                iters,
                || dispatcher(mode, WORKERS),
                |d| {
                    for i in 0..n {
                        d.submit(spec(i)).unwrap();
                    }
                },
            )
        })
    });
    g.bench_function("switchyard_batch1000", |b| {
        b.iter_custom(|iters| {
            let specs: Vec<TaskSpec> = (0..n).map(spec).collect();
            timed(
                iters,
                || dispatcher(mode, WORKERS),
                |d| {
                    for chunk in specs.chunks(1000) {
                        d.submit_many(chunk.iter().cloned()).unwrap();
                    }
                },
            )
        })
    });
    let rt = runtime();
    g.bench_function("actor", |b| {
        b.iter_custom(|iters| {
            let lists = lists.clone();
            time_actor(
                &rt,
                iters,
                (WORKERS, 0, |_| Arc::from(Vec::new())),
                move |a| {
                    let lists = lists.clone();
                    async move {
                        for i in 0..n {
                            let l = lists[(i % lists.len() as u64) as usize].clone();
                            a.enqueue(i, (i % 8) as i32, l).await;
                        }
                    }
                },
            )
        })
    });
    g.bench_function("global_mutex", |b| {
        b.iter_custom(|iters| {
            timed(
                iters,
                || GlobalMutex(parking_lot::Mutex::new(queues(WORKERS))),
                |m| {
                    for i in 0..n {
                        m.with(|q| q.enqueue(i, (i % 8) as i32, &lists[list(i)]));
                    }
                },
            )
        })
    });
    g.finish();
}

// ----- B: fetch -----------------------------------------------------------------------------

/// Every worker (fanout) or worker `i % workers` (one holder): task `i`'s candidates.
fn fan_or_one(fanout: bool, workers: u64, i: u64) -> Arc<[u64]> {
    if fanout {
        (0..workers).collect::<Vec<_>>().into()
    } else {
        Arc::from(vec![i % workers])
    }
}

/// An actor with `workers` workers and tasks `0..n`, task `i` queued on `candidates(i)`.
async fn actor_with(workers: u64, n: u64, candidates: impl Fn(u64) -> Arc<[u64]>) -> Actor {
    let a = Actor::spawn();
    for w in 0..workers {
        a.register(w).await;
    }
    for i in 0..n {
        a.enqueue(i, (i % 8) as i32, candidates(i)).await;
    }
    a
}

/// Times `run` on a fresh actor per iteration (`workers` workers, tasks `0..n` queued on
/// `candidates(i)`, untimed), with the callers on the runtime.
fn time_actor<C, R, F>(
    rt: &tokio::runtime::Runtime,
    iters: u64,
    (workers, n, candidates): (u64, u64, C),
    run: R,
) -> Duration
where
    C: Fn(u64) -> Arc<[u64]> + Send + Sync + 'static,
    R: Fn(Actor) -> F + Send + 'static,
    F: std::future::Future<Output = ()> + Send,
{
    on_runtime(rt, async move {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let a = actor_with(workers, n, &candidates).await;
            let start = Instant::now();
            run(a).await;
            total += start.elapsed();
        }
        total
    })
}

async fn drain_actor(a: &Actor, workers: std::ops::Range<u64>) -> u64 {
    let mut got = 0;
    let mut live: Vec<u64> = workers.collect();
    while !live.is_empty() {
        let mut next = Vec::with_capacity(live.len());
        for w in live {
            if a.fetch(w).await.is_some() {
                next.push(w);
                got += 1;
            }
        }
        live = next;
    }
    got
}

fn b1_fetch_one_thread(c: &mut Criterion) {
    let n = scale(100_000);
    let mut g = configure(c, "B1_fetch_1_thread", n);
    g.bench_function("switchyard", |b| {
        b.iter_custom(|iters| {
            timed(
                iters,
                || loaded(n),
                |d| {
                    black_box(drain(&d, 0..WORKERS));
                },
            )
        })
    });
    let rt = runtime();
    g.bench_function("actor", |b| {
        b.iter_custom(|iters| {
            time_actor(
                &rt,
                iters,
                (WORKERS, n, |i| Arc::from(vec![i % WORKERS])),
                move |a| async move {
                    black_box(drain_actor(&a, 0..WORKERS).await);
                },
            )
        })
    });
    g.bench_function("global_mutex", |b| {
        b.iter_custom(|iters| {
            timed(
                iters,
                || GlobalMutex(parking_lot::Mutex::new(loaded_queues(n))),
                |m| {
                    black_box(drain_mutex(&m, 0..WORKERS));
                },
            )
        })
    });
    g.finish();
}

fn b2_fetch_two_threads(c: &mut Criterion) {
    let n = scale(100_000);
    let half = WORKERS / 2;
    let mut g = configure(c, "B2_fetch_2_threads", n);
    g.bench_function("switchyard", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let d = loaded(n);
                total += two_threads(|t| {
                    let t = t as u64;
                    black_box(drain(&d, t * half..(t + 1) * half));
                });
            }
            total
        })
    });
    let rt = runtime();
    g.bench_function("actor", |b| {
        b.iter_custom(|iters| {
            time_actor(
                &rt,
                iters,
                (WORKERS, n, |i| Arc::from(vec![i % WORKERS])),
                move |a| async move {
                    let callers: Vec<_> = (0..2)
                        .map(|t| {
                            let a = a.clone();
                            tokio::spawn(
                                async move { drain_actor(&a, t * half..(t + 1) * half).await },
                            )
                        })
                        .collect();
                    for c in callers {
                        black_box(c.await.unwrap());
                    }
                },
            )
        })
    });
    g.bench_function("global_mutex", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let m = GlobalMutex(parking_lot::Mutex::new(loaded_queues(n)));
                total += two_threads(|t| {
                    let t = t as u64;
                    black_box(drain_mutex(&m, t * half..(t + 1) * half));
                });
            }
            total
        })
    });
    g.finish();
}

fn b4_fetch_64_async_callers(c: &mut Criterion) {
    let n = scale(100_000);
    let mut g = configure(c, "B4_fetch_64_async_callers", n);
    let rt = runtime();
    g.bench_function("switchyard", |b| {
        b.iter_custom(|iters| {
            on_runtime(&rt, async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let d = Arc::new(loaded(n));
                    let start = Instant::now();
                    let callers: Vec<_> = (0..WORKERS)
                        .map(|w| {
                            let d = d.clone();
                            tokio::spawn(async move {
                                let mut buf = Vec::with_capacity(1);
                                loop {
                                    buf.clear();
                                    if d.fetch_into(WorkerId(w), 1, &mut buf).unwrap() == 0 {
                                        break;
                                    }
                                    tokio::task::yield_now().await;
                                }
                            })
                        })
                        .collect();
                    for c in callers {
                        c.await.unwrap();
                    }
                    total += start.elapsed();
                }
                total
            })
        })
    });
    g.bench_function("actor", |b| {
        b.iter_custom(|iters| {
            time_actor(
                &rt,
                iters,
                (WORKERS, n, |i| Arc::from(vec![i % WORKERS])),
                move |a| async move {
                    let callers: Vec<_> = (0..WORKERS)
                        .map(|w| {
                            let a = a.clone();
                            tokio::spawn(async move { while a.fetch(w).await.is_some() {} })
                        })
                        .collect();
                    for c in callers {
                        c.await.unwrap();
                    }
                },
            )
        })
    });
    g.bench_function("global_mutex", |b| {
        b.iter_custom(|iters| {
            on_runtime(&rt, async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let m = Arc::new(GlobalMutex(parking_lot::Mutex::new(loaded_queues(n))));
                    let start = Instant::now();
                    let callers: Vec<_> = (0..WORKERS)
                        .map(|w| {
                            let m = m.clone();
                            tokio::spawn(async move {
                                while m.with(|q| q.fetch(w)).is_some() {
                                    tokio::task::yield_now().await;
                                }
                            })
                        })
                        .collect();
                    for c in callers {
                        c.await.unwrap();
                    }
                    total += start.elapsed();
                }
                total
            })
        })
    });
    g.finish();
}

/// B3: `n` tasks fanned out to 64 holders, drained by two fetchers (each cycling over its 32
/// workers, one task per fetch) until every task is claimed. Prints the stale copies popped.
fn b3_fanout_claim(c: &mut Criterion) {
    let n = scale(20_000);
    let half = WORKERS / 2;
    let all: Arc<[u64]> = (0..WORKERS).collect::<Vec<_>>().into();
    let mut g = configure(c, "B3_fanout_claim_64", n);
    g.bench_function("switchyard", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let d = dispatcher(Mode::Fanout, WORKERS);
                d.submit_many((0..n).map(spec)).unwrap();
                total += two_threads(|t| {
                    let t = t as u64;
                    black_box(drain(&d, t * half..(t + 1) * half));
                });
                let s = d.stats();
                assert_eq!(s.counters.claimed, n);
                let skipped = s.counters.stale_skipped;
                note_once(
                    "B3 switchyard",
                    format!("B3 switchyard: {skipped} dead copies skipped for {n} tasks"),
                );
            }
            total
        })
    });
    let rt = runtime();
    for early_removal in [true, false] {
        // With early removal (as the review describes the replaced design), a successful claim
        // is followed by a request that removes the other copies; without it, every stale copy
        // is popped and refused, one round trip each (as the benchmark issue describes).
        let name = if early_removal {
            "actor"
        } else {
            "actor_no_early_removal"
        };
        let all = all.clone();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let all = all.clone();
                on_runtime(&rt, async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let a = actor_with(WORKERS, n, |_| all.clone()).await;
                        // The database compare-and-set of the replaced design, one flag per task.
                        let claimed: Arc<Vec<AtomicBool>> =
                            Arc::new((0..n).map(|_| AtomicBool::new(false)).collect());
                        let stale = Arc::new(AtomicU64::new(0));
                        let start = Instant::now();
                        let callers: Vec<_> = (0..2)
                            .map(|t| {
                                let (a, claimed, stale) =
                                    (a.clone(), claimed.clone(), stale.clone());
                                tokio::spawn(async move {
                                    let mut live: Vec<u64> = (t * half..(t + 1) * half).collect();
                                    while !live.is_empty() {
                                        let mut next = Vec::new();
                                        for w in live {
                                            let Some(task) = a.pop(w).await else { continue };
                                            next.push(w);
                                            if claimed[task as usize].swap(true, Ordering::AcqRel) {
                                                stale.fetch_add(1, Ordering::Relaxed);
                                            } else if early_removal {
                                                a.remove(task).await;
                                            }
                                        }
                                        live = next;
                                    }
                                })
                            })
                            .collect();
                        for c in callers {
                            c.await.unwrap();
                        }
                        total += start.elapsed();
                        assert!(claimed.iter().all(|c| c.load(Ordering::Relaxed)));
                        let popped = stale.load(Ordering::Relaxed);
                        note_once(
                            name,
                            format!("B3 {name}: {popped} stale copies popped for {n} tasks"),
                        );
                    }
                    total
                })
            })
        });
    }
    g.bench_function("global_mutex", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let m = GlobalMutex::default();
                m.with(|q| {
                    (0..WORKERS).for_each(|w| q.register(w));
                    (0..n).for_each(|i| q.enqueue(i, (i % 8) as i32, &all));
                });
                total += two_threads(|t| {
                    let t = t as u64;
                    black_box(drain_mutex(&m, t * half..(t + 1) * half));
                });
            }
            total
        })
    });
    g.finish();
}

// ----- C: removal ---------------------------------------------------------------------------

fn removal(c: &mut Criterion, name: &str, mode: Mode, workers: u64) {
    let n = scale(100_000);
    let fanout = mode == Mode::Fanout;
    let mut order: Vec<u64> = (0..n).collect();
    Rng(7).shuffle(&mut order);
    let order = Arc::new(order);
    let mut g = configure(c, name, n);
    g.bench_function("switchyard", |b| {
        b.iter_custom(|iters| {
            timed(
                iters,
                || {
                    let d = dispatcher(mode, workers);
                    d.submit_many((0..n).map(spec)).unwrap();
                    d
                },
                |d| {
                    for &i in order.iter() {
                        d.cancel(TaskId(i)).unwrap();
                    }
                },
            )
        })
    });
    let candidates = |i: u64| -> Vec<u64> {
        if fanout {
            (0..workers).collect()
        } else {
            vec![i % workers]
        }
    };
    let rt = runtime();
    g.bench_function("actor", |b| {
        b.iter_custom(|iters| {
            let order = order.clone();
            time_actor(
                &rt,
                iters,
                (workers, n, move |i| fan_or_one(fanout, workers, i)),
                move |a| {
                    let order = order.clone();
                    async move {
                        for &i in order.iter() {
                            a.remove(i).await;
                        }
                    }
                },
            )
        })
    });
    g.bench_function("global_mutex", |b| {
        b.iter_custom(|iters| {
            timed(
                iters,
                || {
                    let mut q = queues(workers);
                    (0..n).for_each(|i| q.enqueue(i, (i % 8) as i32, &candidates(i)));
                    GlobalMutex(parking_lot::Mutex::new(q))
                },
                |m| {
                    for &i in order.iter() {
                        m.with(|q| q.remove(i));
                    }
                },
            )
        })
    });
    g.finish();
}

fn c_removal(c: &mut Criterion) {
    removal(c, "C1_remove_single_holder", balanced(), WORKERS);
    removal(c, "C2_remove_fanout_64", Mode::Fanout, WORKERS);
    removal(c, "C3_remove_single_holder_1024_workers", balanced(), 1024);
}

// ----- D: churn -----------------------------------------------------------------------------

/// D: balanced, 64 workers holding `n` queued tasks; each cycle unregisters a worker (its
/// queued tasks move to the others) and registers it again. Counted per cycle.
fn d_churn(c: &mut Criterion) {
    let n = scale(100_000);
    let cycles = WORKERS;
    let mut g = configure(c, "D_churn_balanced", cycles);
    g.bench_function("switchyard", |b| {
        b.iter_custom(|iters| {
            timed(
                iters,
                || loaded(n),
                |d| {
                    for w in 0..cycles {
                        black_box(d.unregister(WorkerId(w)).unwrap());
                        d.register(WorkerId(w), &["g"], NO_TAGS).unwrap();
                    }
                },
            )
        })
    });
    let rt = runtime();
    g.bench_function("actor", |b| {
        b.iter_custom(|iters| {
            time_actor(
                &rt,
                iters,
                (WORKERS, n, |i| Arc::from(vec![i % WORKERS])),
                move |a| async move {
                    for w in 0..cycles {
                        black_box(a.unregister(w).await);
                        a.register(w).await;
                    }
                },
            )
        })
    });
    g.bench_function("global_mutex", |b| {
        b.iter_custom(|iters| {
            timed(
                iters,
                || GlobalMutex(parking_lot::Mutex::new(loaded_queues(n))),
                |m| {
                    for w in 0..cycles {
                        black_box(m.with(|q| q.unregister(w)));
                        m.with(|q| q.register(w));
                    }
                },
            )
        })
    });
    g.finish();
}

// ----- E: scaling ---------------------------------------------------------------------------

/// E: the cost of one fetch as workers and queued tasks grow (the dispatcher alone).
fn e_scaling(c: &mut Criterion) {
    let fetches = 10_000u64;
    let mut shapes = vec![
        (64, 10_000),
        (64, 100_000),
        (64, 1_000_000),
        (1_024, 1_000_000),
        (65_536, 1_000_000),
    ];
    if std::env::var("SWITCHYARD_BENCH_FULL").is_ok() {
        shapes.push((64, 10_000_000));
    }
    let mut g = configure(c, "E_fetch_scaling", fetches);
    // Scaled down, two shapes can coincide; criterion needs distinct ids.
    let mut shapes: Vec<(u64, u64)> = shapes
        .into_iter()
        .map(|(w, t)| (w, scale(t).max(fetches * 2)))
        .collect();
    shapes.dedup();
    for (workers, tasks) in shapes {
        let d = dispatcher(balanced(), workers);
        for chunk in (0..tasks).collect::<Vec<_>>().chunks(100_000) {
            d.submit_many(chunk.iter().map(|&i| spec(i))).unwrap();
        }
        let mut rng = Rng(workers);
        let mut got = Vec::with_capacity(fetches as usize);
        g.bench_function(format!("switchyard/{workers}w_{tasks}t"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let picks: Vec<u64> = (0..fetches).map(|_| rng.next() % workers).collect();
                    got.clear();
                    let start = Instant::now();
                    for &w in &picks {
                        black_box(d.fetch_into(WorkerId(w), 1, &mut got).unwrap());
                    }
                    total += start.elapsed();
                    // Give the tasks back (untimed) so the queues keep their size.
                    let running: Vec<(WorkerId, Assignment)> = got
                        .iter()
                        .map(|a| match d.get(a.task).expect("running").status {
                            switchyard::TaskStatus::Running(w) => (w, *a),
                            other => panic!("{other:?}"),
                        })
                        .collect();
                    for (w, a) in running {
                        d.give_back(w, a.task, a.attempt).unwrap();
                    }
                }
                total
            })
        });
    }
    g.finish();
}

// ----- G: the floor -------------------------------------------------------------------------

/// G: a bare single-threaded binary heap of 24-byte entries — the physical floor of a fetch.
fn g_floor(c: &mut Criterion) {
    let n = scale(100_000);
    let mut g = configure(c, "G_floor_binary_heap", n);
    g.bench_function("heap_pop", |b| {
        b.iter_custom(|iters| {
            timed(
                iters,
                || {
                    let mut h = std::collections::BinaryHeap::with_capacity(n as usize);
                    for i in 0..n {
                        h.push(((i % 8) as i64, std::cmp::Reverse(i), i as u32, 0u32));
                    }
                    h
                },
                |mut h| {
                    while let Some(e) = h.pop() {
                        black_box(e);
                    }
                },
            )
        })
    });
    g.finish();
}

// ----- H: many classes ----------------------------------------------------------------------

/// H: a fanout worker serving `k` classes (one tag each), all empty but one that holds `n`
/// tasks; one task per fetch. The rows' ratios show what the empty classes cost a fetch.
fn h_many_classes(c: &mut Criterion) {
    let n = scale(20_000);
    let mut g = configure(c, "H_fetch_with_many_empty_classes", n);
    for k in [1usize, 64, 1024] {
        let setup = move || {
            let mut config = switchyard::Config::default();
            config.limits.max_tags = k;
            let d = switchyard::Dispatcher::new(config).expect("config");
            let tags: Vec<String> = (0..k).map(|i| format!("t{i}")).collect();
            d.register(WorkerId(0), &["g"], &tags).expect("register");
            // Make every class, then empty it.
            let specs = (0..k).map(|i| TaskSpec::new(i as u64, "g").tags([tags[i].as_str()]));
            d.submit_many(specs).expect("submit");
            assert_eq!(d.fetch(WorkerId(0), k).expect("fetch").len(), k);
            let specs = (0..n).map(|i| TaskSpec::new(k as u64 + i, "g").tags(["t0"]));
            d.submit_many(specs).expect("submit");
            d
        };
        g.bench_function(format!("classes_{k}"), |b| {
            b.iter_custom(|iters| {
                timed(iters, setup, |d| {
                    let mut out = Vec::with_capacity(1);
                    for _ in 0..n {
                        out.clear();
                        d.fetch_into(WorkerId(0), 1, &mut out).expect("fetch");
                        black_box(&out);
                    }
                })
            })
        });
    }
    g.finish();
}

// ----- I: the candidate cache ---------------------------------------------------------------

/// I: the per-class candidate cache as the registry reads it on every placement (check the
/// epoch, clone the shared list), behind a `parking_lot::RwLock` (what the dispatcher uses)
/// and as an `arc_swap` snapshot (what the design first asked for), read by one thread and
/// by two at once on the same class.
fn i_candidate_cache(c: &mut Criterion) {
    struct Cache {
        epoch: u64,
        workers: Arc<[u64]>,
    }
    let n = scale(1_000_000);
    let list: Arc<[u64]> = (0..8).collect();
    let rw = Arc::new(parking_lot::RwLock::new(Cache {
        epoch: 1,
        workers: list.clone(),
    }));
    let swap = Arc::new(arc_swap::ArcSwap::from_pointee(Cache {
        epoch: 1,
        workers: list,
    }));
    let read_rw = {
        let rw = rw.clone();
        move || {
            for _ in 0..n {
                let cache = rw.read();
                if cache.epoch == black_box(1) {
                    black_box(cache.workers.clone());
                }
            }
        }
    };
    let read_swap = {
        let swap = swap.clone();
        move || {
            for _ in 0..n {
                let cache = swap.load();
                if cache.epoch == black_box(1) {
                    black_box(cache.workers.clone());
                }
            }
        }
    };
    for threads in [1, 2] {
        let mut g = configure(
            c,
            &format!("I_candidate_cache_{threads}_threads"),
            n * threads,
        );
        for (name, read) in [
            (
                "rwlock",
                Arc::new(read_rw.clone()) as Arc<dyn Fn() + Send + Sync>,
            ),
            ("arc_swap", Arc::new(read_swap.clone())),
        ] {
            g.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let barrier = Arc::new(std::sync::Barrier::new(threads as usize));
                        let start = Instant::now();
                        let handles: Vec<_> = (0..threads)
                            .map(|_| {
                                let (read, barrier) = (read.clone(), barrier.clone());
                                std::thread::spawn(move || {
                                    barrier.wait();
                                    read();
                                })
                            })
                            .collect();
                        handles.into_iter().for_each(|h| h.join().expect("reader"));
                        total += start.elapsed();
                    }
                    total
                })
            });
        }
        g.finish();
    }
}

criterion_group!(
    benches,
    a_enqueue,
    b1_fetch_one_thread,
    b2_fetch_two_threads,
    b4_fetch_64_async_callers,
    b3_fanout_claim,
    c_removal,
    d_churn,
    e_scaling,
    g_floor,
    h_many_classes,
    i_candidate_cache
);
criterion_main!(benches);
