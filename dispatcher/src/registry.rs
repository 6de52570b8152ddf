//! Workers, name interning, and the candidate cache per task class.
//!
//! A *class* is a (group, tag set) pair; every task of a class has the same candidates: the
//! workers that serve the group and whose tags include all of the class's tags. Each class keeps
//! its candidate list together with the registry *epoch* it was computed at; registering or
//! unregistering a worker bumps the epoch, and the next placement in a class recomputes that
//! class's list (O(workers in the group)). Placement therefore reads one epoch and one cached
//! list, not the registry.
//!
//! Group and tag names are interned to small integers; classes are interned too, so a task
//! carries one `Arc<Class>`. In fanout mode a class also owns the shared heap its tasks wait in,
//! and each worker keeps a snapshot list of the classes it serves (see `Registry::class` and
//! `Registry::insert` for how the two stay consistent).
//!
//! # Ordering of the epoch
//! The epoch is bumped inside the group table's write lock and read `Relaxed`. Whenever a
//! placement must see a registration (the parked-set hand-off described in
//! `redistribute`), a lock hand-off already orders the bump before the read, and then any
//! ordering returns the bumped value; where there is no hand-off, no ordering could help.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::queue::{Heap, Queue};
use crate::sync::{Arc, AtomicU64, AtomicUsize, CachePadded, Map, Mutex, Ordering, RwLock, Shared};
use crate::WorkerId;

/// An interned group or tag name.
pub(crate) type NameId = u32;

/// A worker's load counters, read without locks by balanced placement.
///
/// `queued` counts the tasks that list this worker as a holder (one per task, not per heap
/// entry: tombstones are not counted); `running` counts tasks assigned to it. Both change only
/// inside a task's critical section, so at rest they equal what the index says. All accesses are
/// `Relaxed`: they are gauges, exact once the operations that moved them have returned (their
/// locks order them), and approximate while operations are in flight, which is all placement
/// needs.
#[derive(Default)]
pub(crate) struct Load {
    pub(crate) queued: Gauge,
    running: Gauge,
    /// Assignments this worker's fetches made, and dead entries they skipped or compacted away
    /// (per worker, so fetches on different workers never share a counter's cache line; folded
    /// into the dispatcher's totals when the worker leaves).
    pub(crate) claimed: AtomicU64,
    pub(crate) stale: AtomicU64,
}

/// A count that placement reads without locks (see [`Load`] for why `Relaxed` suffices).
#[derive(Default)]
pub(crate) struct Gauge(AtomicUsize);

impl Gauge {
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
    pub(crate) fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Load {
    pub(crate) fn queued(&self) -> usize {
        self.queued.get()
    }
    pub(crate) fn running(&self) -> usize {
        self.running.get()
    }
    pub(crate) fn inc_running(&self) {
        self.running.inc();
    }
    pub(crate) fn dec_running(&self) {
        self.running.dec();
    }
    pub(crate) fn add_fetched(&self, claimed: usize, stale: usize) {
        if claimed > 0 {
            self.claimed.fetch_add(claimed as u64, Ordering::Relaxed);
        }
        if stale > 0 {
            self.stale.fetch_add(stale as u64, Ordering::Relaxed);
        }
    }
    /// `queued + running × weight`, in thousandths of a queued task.
    pub(crate) fn weighted(&self, running_weight_milli: u64) -> u64 {
        self.queued() as u64 * 1000 + self.running() as u64 * running_weight_milli
    }
}

/// A registered worker. The queue and the counters sit on separate cache lines: placers on other
/// threads read the counters while the worker's fetch holds its queue lock.
pub(crate) struct Worker {
    pub(crate) id: WorkerId,
    groups: Box<[NameId]>,
    /// Sorted, deduplicated.
    tags: Box<[NameId]>,
    pub(crate) queue: CachePadded<Mutex<Queue>>,
    pub(crate) load: CachePadded<Load>,
    /// Fanout: the classes this worker serves (a snapshot, replaced when a class appears). A
    /// leaf lock: held only to clone or replace the snapshot.
    pub(crate) classes: Mutex<Shared<[Arc<Class>]>>,
    group_names: Box<[Shared<str>]>,
    tag_names: Box<[Shared<str>]>,
}

impl Worker {
    /// Whether this worker may run tasks of `class`.
    pub(crate) fn serves(&self, class: &Class) -> bool {
        self.groups.contains(&class.group) && is_subset(&class.tags, &self.tags)
    }

    pub(crate) fn group_names(&self) -> Vec<String> {
        self.group_names.iter().map(|s| s.to_string()).collect()
    }

    pub(crate) fn tag_names(&self) -> Vec<String> {
        self.tag_names.iter().map(|s| s.to_string()).collect()
    }
}

/// Whether sorted `small` ⊆ sorted `big`.
fn is_subset(small: &[NameId], big: &[NameId]) -> bool {
    let mut big = big.iter();
    small.iter().all(|t| big.any(|b| b == t))
}

/// A class's live candidates: an immutable list, shared by every reader of the cache.
pub(crate) type Candidates = Shared<[Arc<Worker>]>;

/// A (group, tag set) class with its cached candidate list.
pub(crate) struct Class {
    group: NameId,
    tags: Box<[NameId]>,
    pub(crate) group_name: Shared<str>,
    pub(crate) tag_names: Box<[Shared<str>]>,
    cache: RwLock<CandidateCache>,
    /// Rotating cursor for round-robin choices and tie-breaks, and the seed of random draws.
    pub(crate) cursor: AtomicUsize,
    /// Fanout: the class's queued tasks (each held by every live candidate), and the one shared
    /// heap they wait in.
    pub(crate) queued: Gauge,
    pub(crate) heap: CachePadded<Mutex<Heap>>,
}

struct CandidateCache {
    /// `u64::MAX` until first computed.
    epoch: u64,
    workers: Candidates,
}

/// The live workers, by id and by group.
pub(crate) struct Registry {
    workers: Map<WorkerId, Arc<Worker>>,
    by_group: RwLock<HashMap<NameId, Vec<Arc<Worker>>>>,
    epoch: AtomicU64,
    names: Map<Shared<str>, NameId>,
    name_list: Mutex<Vec<Shared<str>>>,
    classes: Map<Box<[NameId]>, Arc<Class>>,
    /// Serialises class creation against worker registration, so each worker's class list is
    /// complete: whichever runs second sees the other.
    topology: Mutex<()>,
    limits: Limits,
}

impl Registry {
    pub(crate) fn new(shards: usize, limits: Limits) -> Self {
        Self {
            workers: Map::with_shards(shards),
            by_group: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            names: Map::with_shards(shards),
            name_list: Mutex::new(Vec::new()),
            classes: Map::with_shards(shards),
            topology: Mutex::new(()),
            limits,
        }
    }

    pub(crate) fn get(&self, id: WorkerId) -> Result<Arc<Worker>> {
        self.workers.get(&id).ok_or(Error::UnknownWorker(id))
    }

    pub(crate) fn workers(&self) -> Vec<Arc<Worker>> {
        self.workers.values()
    }

    pub(crate) fn len(&self) -> usize {
        self.workers.len()
    }

    /// Interns a name its caller has checked. The common case (a known name) is one map read.
    fn intern(&self, name: &str) -> NameId {
        if let Some(id) = self.names.get(name) {
            return id;
        }
        // Slow path: allocate the next id under the name-list lock, so two threads interning
        // the same new name agree on one id.
        let mut names = self.name_list.lock();
        let interned: Shared<str> = Shared::from(name);
        let next = names.len() as NameId;
        let id = self.names.get_or_insert_with(interned.clone(), || next);
        if id == next {
            names.push(interned);
        }
        id
    }

    /// The names of interned ids.
    fn names_of(&self, ids: &[NameId]) -> Box<[Shared<str>]> {
        let names = self.name_list.lock();
        ids.iter().map(|&id| names[id as usize].clone()).collect()
    }

    /// Checks a task's group and tags as [`Registry::class`] would, creating nothing.
    pub(crate) fn check_class<S: AsRef<str>>(&self, group: &str, tags: &[S]) -> Result<()> {
        self.limits.check_task(group, tags)
    }

    /// Checks a worker's groups and tags as [`Registry::new_worker`] would, creating nothing.
    pub(crate) fn check_worker<S: AsRef<str>, T: AsRef<str>>(
        &self,
        groups: &[S],
        tags: &[T],
    ) -> Result<()> {
        self.limits.check_worker(groups, tags)
    }

    /// Whether the class of `group` and `tags` exists.
    pub(crate) fn has_class<S: AsRef<str>>(&self, group: &str, tags: &[S]) -> bool {
        self.known_key(group, tags)
            .is_some_and(|key| self.classes.contains(key.as_slice()))
    }

    /// How many classes exist.
    pub(crate) fn class_count(&self) -> usize {
        self.classes.len()
    }

    /// The class key of `group` and `tags` if every name is interned already; interns nothing.
    fn known_key<S: AsRef<str>>(&self, group: &str, tags: &[S]) -> Option<Vec<NameId>> {
        let group = self.names.get(group)?;
        let mut tags: Vec<NameId> = tags
            .iter()
            .map(|t| self.names.get(t.as_ref()))
            .collect::<Option<_>>()?;
        tags.sort_unstable();
        tags.dedup();
        let mut key = Vec::with_capacity(tags.len() + 1);
        key.push(group);
        key.extend(tags);
        Some(key)
    }

    /// Interns a list of names its caller has checked; returns their ids sorted and
    /// deduplicated.
    fn intern_set<S: AsRef<str>>(&self, names: &[S]) -> Vec<NameId> {
        let mut ids: Vec<NameId> = names.iter().map(|n| self.intern(n.as_ref())).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The class of tasks in `group` with `tags`, validated and interned. A new class is refused
    /// once `Limits::max_classes` exist, before any of its names is interned.
    pub(crate) fn class<S: AsRef<str>>(&self, group: &str, tags: &[S]) -> Result<Arc<Class>> {
        self.check_class(group, tags)?;
        // The common case: every name is known and so is the class (map reads only).
        if let Some(key) = self.known_key(group, tags) {
            if let Some(class) = self.classes.get(key.as_slice()) {
                return Ok(class);
            }
        }
        let _topology = self.topology.lock();
        // Under the topology lock nobody else creates a class, so the count is exact.
        let existing = self
            .known_key(group, tags)
            .and_then(|key| self.classes.get(key.as_slice()));
        if let Some(class) = existing {
            return Ok(class);
        }
        if self.classes.len() >= self.limits.max_classes {
            return Err(Error::InvalidInput(format!(
                "{} task classes (group and tag set) exist; the limit (max classes) is {}",
                self.classes.len(),
                self.limits.max_classes
            )));
        }
        let group = self.intern(group);
        let tags = self.intern_set(tags);
        let mut key = Vec::with_capacity(tags.len() + 1);
        key.push(group);
        key.extend_from_slice(&tags);
        let class = self.classes.get_or_insert_with(key.into(), || {
            Arc::new(Class {
                group,
                group_name: self.names_of(&[group])[0].clone(),
                tag_names: self.names_of(&tags),
                tags: tags.into(),
                cache: RwLock::new(CandidateCache {
                    epoch: u64::MAX,
                    workers: Shared::from(Vec::new()),
                }),
                cursor: AtomicUsize::new(0),
                queued: Gauge::default(),
                heap: CachePadded::new(Mutex::new(Heap::default())),
            })
        });
        for w in self.workers.values() {
            if w.serves(&class) {
                let mut list = w.classes.lock();
                if !list.iter().any(|c| Arc::ptr_eq(c, &class)) {
                    *list = list.iter().cloned().chain([class.clone()]).collect();
                }
            }
        }
        Ok(class)
    }

    /// Builds a worker from validated input (not yet registered).
    pub(crate) fn new_worker<S: AsRef<str>, T: AsRef<str>>(
        &self,
        id: WorkerId,
        groups: &[S],
        tags: &[T],
    ) -> Result<Arc<Worker>> {
        self.check_worker(groups, tags)?;
        let groups = self.intern_set(groups);
        let tags = self.intern_set(tags);
        Ok(Arc::new(Worker {
            id,
            queue: CachePadded::new(Mutex::new(Queue::default())),
            load: CachePadded::new(Load::default()),
            classes: Mutex::new(Shared::from(Vec::new())),
            group_names: self.names_of(&groups),
            tag_names: self.names_of(&tags),
            groups: groups.into(),
            tags: tags.into(),
        }))
    }

    /// Publishes `worker`; from here on placements may choose it.
    pub(crate) fn insert(&self, worker: &Arc<Worker>) -> Result<()> {
        let _topology = self.topology.lock();
        let served: Vec<Arc<Class>> = self
            .classes
            .values()
            .into_iter()
            .filter(|c| worker.serves(c))
            .collect();
        *worker.classes.lock() = served.into();
        let mut by_group = self.by_group.write();
        if self.workers.insert_new(worker.id, worker.clone()).is_err() {
            return Err(Error::DuplicateWorker(worker.id));
        }
        for g in worker.groups.iter() {
            by_group.entry(*g).or_default().push(worker.clone());
        }
        self.epoch.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Withdraws worker `id`; from here on fresh candidate lists exclude it.
    pub(crate) fn remove(&self, id: WorkerId) -> Result<Arc<Worker>> {
        let mut by_group = self.by_group.write();
        let worker = self.get(id)?;
        self.workers.remove_if(&id, |_| true);
        for g in worker.groups.iter() {
            if let Some(list) = by_group.get_mut(g) {
                list.retain(|w| !Arc::ptr_eq(w, &worker));
                if list.is_empty() {
                    by_group.remove(g);
                }
            }
        }
        self.epoch.fetch_add(1, Ordering::Relaxed);
        Ok(worker)
    }

    /// Breaks the worker ↔ class reference cycles (a worker lists its classes, a class caches
    /// its candidates) when the dispatcher is dropped.
    pub(crate) fn clear(&self) {
        for class in self.classes.values() {
            let mut cache = class.cache.write();
            cache.epoch = u64::MAX;
            cache.workers = Shared::from(Vec::new());
        }
        for w in self.workers.values() {
            *w.classes.lock() = Shared::from(Vec::new());
        }
    }

    /// Every class (fanout statistics and audit).
    pub(crate) fn classes(&self) -> Vec<Arc<Class>> {
        self.classes.values()
    }

    /// The live candidates of `class`, from its cache when the registry has not changed.
    pub(crate) fn candidates(&self, class: &Class) -> Candidates {
        let epoch = self.epoch.load(Ordering::Relaxed);
        {
            let cache = class.cache.read();
            if cache.epoch == epoch {
                return cache.workers.clone();
            }
        }
        // Recompute under the group table's read lock, where the epoch cannot move.
        let by_group = self.by_group.read();
        let epoch = self.epoch.load(Ordering::Relaxed);
        let workers: Candidates = by_group
            .get(&class.group)
            .map(|list| list.iter().filter(|w| w.serves(class)).cloned().collect())
            .unwrap_or_else(|| Shared::from(Vec::new()));
        drop(by_group);
        let mut cache = class.cache.write();
        if cache.epoch == u64::MAX || cache.epoch < epoch {
            cache.epoch = epoch;
            cache.workers = workers.clone();
        }
        workers
    }
}

#[cfg(all(test, not(switchyard_loom)))]
mod tests {
    use crate::{Config, Dispatcher, Error, TaskId, TaskSpec, WorkerId};

    #[test]
    fn validation_and_refused_updates_create_nothing() {
        let d = Dispatcher::new(Config::default()).unwrap();
        d.register(WorkerId(1), &["g"], &["a"]).unwrap();
        let classes = || d.registry.classes().len();
        let before = classes();
        for tags in [vec!["x"], vec!["y", "z"]] {
            d.validate(&TaskSpec::new(TaskId(1), "g").tags(tags))
                .unwrap();
        }
        d.validate_worker(&["h"], &["w"]).unwrap();
        assert_eq!(classes(), before, "validation interned classes");
        assert!(
            d.registry.names.get("w").is_none(),
            "validation interned a name"
        );
        // An update refused because the task runs makes no class either.
        d.submit(TaskSpec::new(TaskId(7), "g")).unwrap();
        d.fetch(WorkerId(1), 1).unwrap();
        let refused = d.update(TaskId(7), None, Some(&["q"][..]));
        assert!(matches!(refused, Err(Error::NotQueued(_))), "{refused:?}");
        assert_eq!(classes(), before + 1, "only the submitted task's class");
    }

    #[test]
    fn classes_are_bounded_and_a_refused_class_interns_nothing() {
        let config = Config {
            limits: crate::Limits {
                max_classes: 2,
                ..crate::Limits::default()
            },
            ..Config::default()
        };
        let d = Dispatcher::new(config).unwrap();
        d.register(WorkerId(1), &["g"], &["a", "b"]).unwrap();
        d.submit(TaskSpec::new(TaskId(1), "g").tags(["a"])).unwrap();
        d.submit(TaskSpec::new(TaskId(2), "g").tags(["b", "a"]))
            .unwrap();
        assert_eq!(d.class_count(), 2);
        assert!(d.has_class("g", &["a", "b", "a"]), "tag order and repeats");
        assert!(!d.has_class("g", &["b"]));
        assert!(!d.has_class("h", &["a"]));
        // Known classes still take tasks; a third class is refused and interns nothing.
        d.submit(TaskSpec::new(TaskId(3), "g").tags(["a", "b"]))
            .unwrap();
        let refused = d.submit(TaskSpec::new(TaskId(4), "g").tags(["fresh"]));
        let Err(Error::InvalidInput(why)) = refused else {
            panic!("{refused:?}")
        };
        assert!(why.contains("max classes") && why.contains("is 2"), "{why}");
        assert!(d.registry.names.get("fresh").is_none(), "interned a name");
        let refused = d.update(TaskId(1), None, Some(&["b"][..]));
        assert!(
            matches!(refused, Err(Error::InvalidInput(_))),
            "{refused:?}"
        );
        assert_eq!(d.class_count(), 2);
        // The refused update left the task where it was.
        assert_eq!(d.get(TaskId(1)).unwrap().tags, vec!["a".to_string()]);
        assert_eq!(d.fetch(WorkerId(1), 10).unwrap().len(), 3);
        d.audit().unwrap();
    }

    #[test]
    fn dropping_the_dispatcher_frees_workers_and_classes() {
        // Workers list their classes and classes cache their candidates: a cycle that the
        // dispatcher's drop breaks.
        let d = Dispatcher::new(Config::default()).unwrap();
        d.register(WorkerId(1), &["g"], &["a"]).unwrap();
        d.submit(TaskSpec::new(TaskId(1), "g").tags(["a"])).unwrap();
        let worker = std::sync::Arc::downgrade(&d.registry.get(WorkerId(1)).unwrap());
        let class = std::sync::Arc::downgrade(&d.registry.classes()[0]);
        drop(d);
        assert!(worker.upgrade().is_none(), "the worker leaked");
        assert!(class.upgrade().is_none(), "the class leaked");
    }

    #[test]
    fn a_candidate_list_is_computed_once_per_registry_change() {
        let d = Dispatcher::new(Config::default()).unwrap();
        d.register(WorkerId(1), &["g"], &["a"]).unwrap();
        d.submit(TaskSpec::new(TaskId(1), "g")).unwrap();
        let class = d.registry.classes()[0].clone();
        let first = d.registry.candidates(&class);
        let again = d.registry.candidates(&class);
        assert!(
            std::sync::Arc::ptr_eq(&first, &again),
            "the second read recomputed"
        );
        assert_eq!(first.len(), 1);
        d.register(WorkerId(2), &["g"], &[] as &[&str]).unwrap();
        let after = d.registry.candidates(&class);
        assert!(
            !std::sync::Arc::ptr_eq(&first, &after),
            "a stale list after a change"
        );
        assert_eq!(after.len(), 2);
        assert!(std::sync::Arc::ptr_eq(
            &after,
            &d.registry.candidates(&class)
        ));
    }
}
