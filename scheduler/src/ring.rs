//! Consistent-hash ring that allocates tasks to the workers of one cluster (DESIGN.md §3).
//!
//! Each member (worker) owns `min(capacity, MAX_CAPACITY_UNITS) * VNODES_PER_CAPACITY_UNIT`
//! virtual nodes. The position of virtual node `i` of member `id` is
//! `xxh3_64(id bytes ++ (i as u32).to_le_bytes())`, and a task's key position is
//! `xxh3_64(task id bytes)`. Positions depend only on `(member id, vnode index)`, never on the
//! other members, and vnodes at equal positions are ordered by member id, so:
//!
//! - a member leaving moves only the tasks it owned, each to the next qualifying vnode
//!   clockwise;
//! - a member joining (or raising its capacity) only takes tasks for itself;
//! - required labels keep both properties: the owner is the first vnode clockwise whose
//!   member has every required label.
//!
//! The ring gives each task its preferred owner; [`crate::balance`] keeps those preferences
//! while bounding every worker's load.
//!
//! The hash scheme and `VNODES_PER_CAPACITY_UNIT` are part of the allocation contract:
//! changing either reshuffles every cluster, so they are pinned by tests below.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// One worker's entry in the ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    /// Weight, `>= 1` (0 is treated as 1; values above [`Ring::MAX_CAPACITY_UNITS`] are capped).
    pub capacity: u32,
    #[serde(default)]
    pub labels: BTreeSet<String>,
}

impl Member {
    pub fn new(id: impl Into<String>, capacity: u32) -> Self {
        Member {
            id: id.into(),
            capacity,
            labels: BTreeSet::new(),
        }
    }

    pub fn with_labels<I, S>(mut self, labels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.labels.extend(labels.into_iter().map(Into::into));
        self
    }

    /// True if this member carries every label in `required`.
    pub fn has_labels(&self, required: &BTreeSet<String>) -> bool {
        required.is_subset(&self.labels)
    }

    /// Capacity as the ring counts it: 0 counts as 1, and the maximum caps it.
    pub fn weight(&self) -> u32 {
        self.capacity.clamp(1, Ring::MAX_CAPACITY_UNITS)
    }

    fn vnode_count(&self) -> u32 {
        self.weight() * Ring::VNODES_PER_CAPACITY_UNIT
    }
}

/// A consistent-hash ring of virtual nodes.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    /// Unique by id, sorted by id.
    members: Vec<Member>,
    /// Sorted vnode positions.
    points: Vec<u64>,
    /// `owners[i]` is the index in `members` of the vnode at `points[i]`.
    owners: Vec<u32>,
}

impl Ring {
    /// Virtual nodes per unit of capacity. A member's share of the ring then has a relative
    /// spread of about 1/sqrt(320) = 5.6%: with 20 equal members the busiest stays within
    /// ±25% of the mean (160 vnodes exceeded that in ~4% of random memberships).
    pub const VNODES_PER_CAPACITY_UNIT: u32 = 320;
    /// Capacity above this counts as this many units.
    pub const MAX_CAPACITY_UNITS: u32 = 64;

    /// Builds the ring. Members with the same id collapse into one (the last given wins);
    /// the input order does not otherwise matter.
    pub fn new(members: impl IntoIterator<Item = Member>) -> Ring {
        let by_id: BTreeMap<String, Member> =
            members.into_iter().map(|m| (m.id.clone(), m)).collect();
        let members: Vec<Member> = by_id.into_values().collect();

        let total: usize = members.iter().map(|m| m.vnode_count() as usize).sum();
        let mut vnodes: Vec<(u64, u32)> = Vec::with_capacity(total);
        let mut buf = Vec::new();
        for (idx, member) in members.iter().enumerate() {
            buf.clear();
            buf.extend_from_slice(member.id.as_bytes());
            let id_len = buf.len();
            buf.extend_from_slice(&[0; 4]);
            for vnode in 0..member.vnode_count() {
                buf[id_len..].copy_from_slice(&vnode.to_le_bytes());
                vnodes.push((xxh3_64(&buf), idx as u32));
            }
        }
        // Ties on position are broken by member index, i.e. by member id: the relative order
        // of any two vnodes never depends on which other members are present.
        vnodes.sort_unstable();
        let (points, owners) = vnodes.into_iter().unzip();
        Ring {
            members,
            points,
            owners,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The members, sorted by id, one per id.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The owner of `key` (a task id): the first virtual node clockwise from hash(key) whose
    /// member has all `required_labels`. None if no member qualifies.
    pub fn owner(&self, key: &str, required_labels: &BTreeSet<String>) -> Option<&str> {
        let idx = if required_labels.is_empty() {
            self.first_from(key_hash(key))
        } else if self.members.iter().any(|m| m.has_labels(required_labels)) {
            self.walk_from(key_hash(key), |m| {
                self.members[m].has_labels(required_labels)
            })
        } else {
            None
        };
        idx.map(|m| self.members[m].id.as_str())
    }

    /// Index in [`Ring::members`] of the member with this id.
    pub(crate) fn member_index(&self, id: &str) -> Option<usize> {
        self.members
            .binary_search_by(|m| m.id.as_str().cmp(id))
            .ok()
    }

    /// A key's position on the ring.
    pub(crate) fn key_hash(key: &str) -> u64 {
        xxh3_64(key.as_bytes())
    }

    /// Index of the first vnode at or after `hash`, wrapping around.
    fn start(&self, hash: u64) -> usize {
        let i = self.points.partition_point(|&p| p < hash);
        if i == self.points.len() { 0 } else { i }
    }

    fn first_from(&self, hash: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        Some(self.owners[self.start(hash)] as usize)
    }

    /// Member index of the first vnode clockwise from `hash` whose member `qualifies`.
    pub(crate) fn walk_from(&self, hash: u64, qualifies: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.start(hash);
        self.owners[start..]
            .iter()
            .chain(&self.owners[..start])
            .map(|&m| m as usize)
            .find(|&m| qualifies(m))
    }

    /// Per-member qualification for `required`, or None if no member qualifies.
    pub(crate) fn qualifying(&self, required: &BTreeSet<String>) -> Option<Vec<bool>> {
        let mask: Vec<bool> = self
            .members
            .iter()
            .map(|m| m.has_labels(required))
            .collect();
        mask.contains(&true).then_some(mask)
    }
}

fn key_hash(key: &str) -> u64 {
    Ring::key_hash(key)
}

/// Assigns every task (id, required labels) to an owner, in input order; tasks no member can
/// take map to None. Owner ids borrow from the ring, so nothing is allocated per task.
pub fn allocate<'a, 'r>(
    ring: &'r Ring,
    tasks: impl IntoIterator<Item = (&'a str, &'a BTreeSet<String>)>,
) -> Vec<(&'a str, Option<&'r str>)> {
    let tasks = tasks.into_iter();
    let mut out = Vec::with_capacity(tasks.size_hint().0);
    // Label requirements are few and shared by many tasks: qualify each distinct set once.
    let mut masks: HashMap<&'a BTreeSet<String>, Option<Vec<bool>>> = HashMap::new();
    for (id, required) in tasks {
        let hash = key_hash(id);
        let owner = if required.is_empty() {
            ring.first_from(hash)
        } else {
            match masks
                .entry(required)
                .or_insert_with(|| ring.qualifying(required))
            {
                Some(mask) => ring.walk_from(hash, |m| mask[m]),
                None => None,
            }
        };
        out.push((id, owner.map(|m| ring.members[m].id.as_str())));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(ls: &[&str]) -> BTreeSet<String> {
        ls.iter().map(|s| s.to_string()).collect()
    }

    fn equal_members(n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member::new(format!("worker-{i}"), 1))
            .collect()
    }

    fn task_ids(n: usize) -> Vec<String> {
        // uuid-ish, deterministic
        (0..n)
            .map(|i| {
                let h = xxh3_64(&(i as u64).to_le_bytes());
                format!("task_{:08x}-{:04x}-{:012x}", h >> 32, (h >> 16) & 0xffff, i)
            })
            .collect()
    }

    fn alloc_map(
        ring: &Ring,
        tasks: &[(String, BTreeSet<String>)],
    ) -> HashMap<String, Option<String>> {
        allocate(ring, tasks.iter().map(|(id, l)| (id.as_str(), l)))
            .into_iter()
            .map(|(id, o)| (id.to_string(), o.map(str::to_string)))
            .collect()
    }

    fn plain(ids: &[String]) -> Vec<(String, BTreeSet<String>)> {
        ids.iter().map(|id| (id.clone(), BTreeSet::new())).collect()
    }

    fn counts(alloc: &HashMap<String, Option<String>>) -> HashMap<String, usize> {
        let mut c = HashMap::new();
        for o in alloc.values() {
            *c.entry(o.clone().expect("every task has an owner"))
                .or_insert(0) += 1;
        }
        c
    }

    fn assert_balanced(members: usize, tasks: usize) {
        let ring = Ring::new(equal_members(members));
        let alloc = alloc_map(&ring, &plain(&task_ids(tasks)));
        let c = counts(&alloc);
        let mean = tasks as f64 / members as f64;
        assert_eq!(c.len(), members, "every member gets tasks: {c:?}");
        for (m, &n) in &c {
            let dev = (n as f64 - mean) / mean;
            assert!(dev.abs() <= 0.25, "{m} has {n} tasks, mean {mean}: {c:?}");
        }
    }

    #[test]
    fn balance_3_members_300_tasks() {
        assert_balanced(3, 300);
    }

    #[test]
    fn balance_20_members_100k_tasks() {
        assert_balanced(20, 100_000);
    }

    #[test]
    fn capacity_weighting() {
        let ring = Ring::new([
            Member::new("small-a", 1),
            Member::new("small-b", 1),
            Member::new("big", 2),
        ]);
        let c = counts(&alloc_map(&ring, &plain(&task_ids(20_000))));
        for small in ["small-a", "small-b"] {
            let ratio = c["big"] as f64 / c[small] as f64;
            assert!((1.5..=2.5).contains(&ratio), "big/{small} = {ratio}: {c:?}");
        }
    }

    #[test]
    fn leave_moves_only_the_leavers_tasks() {
        let members = equal_members(5);
        let tasks = plain(&task_ids(1000));
        let before = alloc_map(&Ring::new(members.clone()), &tasks);
        let leaver = "worker-2";
        let after = alloc_map(
            &Ring::new(members.into_iter().filter(|m| m.id != leaver)),
            &tasks,
        );
        let mut moved = 0;
        for (t, old) in &before {
            let new = &after[t];
            if old.as_deref() == Some(leaver) {
                moved += 1;
                assert!(new.is_some() && new.as_deref() != Some(leaver));
            } else {
                assert_eq!(old, new, "{t} moved though its owner stayed");
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn join_moves_only_to_the_newcomer() {
        let tasks = plain(&task_ids(300));
        let three = equal_members(3);
        let before = alloc_map(&Ring::new(three.clone()), &tasks);
        let mut four = three;
        four.push(Member::new("worker-new", 1));
        let after = alloc_map(&Ring::new(four), &tasks);
        let moved: Vec<_> = before.keys().filter(|t| before[*t] != after[*t]).collect();
        assert!(!moved.is_empty());
        assert!(
            moved.len() as f64 <= 1.2 / 4.0 * 300.0,
            "moved {}",
            moved.len()
        );
        for t in moved {
            assert_eq!(after[t].as_deref(), Some("worker-new"));
        }
    }

    #[test]
    fn capacity_increase_moves_only_to_that_member() {
        let tasks = plain(&task_ids(2000));
        let mut members = equal_members(4);
        let before = alloc_map(&Ring::new(members.clone()), &tasks);
        members[1].capacity = 3;
        let after = alloc_map(&Ring::new(members), &tasks);
        for (t, old) in &before {
            if old != &after[t] {
                assert_eq!(after[t].as_deref(), Some("worker-1"));
            }
        }
    }

    #[test]
    fn labels_restrict_candidates() {
        let members = vec![
            Member::new("a", 1).with_labels(["gpu"]),
            Member::new("b", 2),
            Member::new("c", 1).with_labels(["gpu", "ssd"]),
            Member::new("d", 1).with_labels(["ssd"]),
        ];
        let ring = Ring::new(members.clone());
        let ids = task_ids(500);
        let gpu = labels(&["gpu"]);
        let gpu_ssd = labels(&["gpu", "ssd"]);
        let tpu = labels(&["tpu"]);
        let mut tasks = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let l = match i % 4 {
                0 => gpu.clone(),
                1 => gpu_ssd.clone(),
                2 => tpu.clone(),
                _ => BTreeSet::new(),
            };
            tasks.push((id.clone(), l));
        }
        let alloc = alloc_map(&ring, &tasks);
        let mut gpu_owners = BTreeSet::new();
        for (id, l) in &tasks {
            let owner = alloc[id].as_deref();
            assert_eq!(owner, ring.owner(id, l), "allocate agrees with owner()");
            match l {
                l if *l == gpu => {
                    gpu_owners.insert(owner.unwrap());
                }
                l if *l == gpu_ssd => assert_eq!(owner, Some("c")),
                l if *l == tpu => assert_eq!(owner, None),
                _ => assert!(owner.is_some()),
            }
        }
        assert_eq!(gpu_owners, BTreeSet::from(["a", "c"]));

        // Removing a non-gpu member never moves gpu tasks.
        let without_b = Ring::new(members.into_iter().filter(|m| m.id != "b"));
        let after = alloc_map(&without_b, &tasks);
        for (id, l) in &tasks {
            if l.contains("gpu") {
                assert_eq!(alloc[id], after[id]);
            }
        }
    }

    #[test]
    fn deterministic_regardless_of_input_order() {
        let members: Vec<Member> = (0..7)
            .map(|i| {
                Member::new(format!("w{i}"), 1 + i % 3)
                    .with_labels(["gpu"].into_iter().take(i as usize % 2))
            })
            .collect();
        let mut shuffled = members.clone();
        shuffled.reverse();
        shuffled.rotate_left(3);
        let tasks: Vec<_> = task_ids(1000)
            .into_iter()
            .enumerate()
            .map(|(i, id)| {
                (
                    id,
                    if i % 3 == 0 {
                        labels(&["gpu"])
                    } else {
                        BTreeSet::new()
                    },
                )
            })
            .collect();
        let a = Ring::new(members);
        let b = Ring::new(shuffled);
        assert_eq!(a.members(), b.members());
        assert_eq!(alloc_map(&a, &tasks), alloc_map(&b, &tasks));
    }

    #[test]
    fn edge_cases() {
        let empty = Ring::new([]);
        assert!(empty.is_empty());
        assert_eq!(empty.owner("t", &BTreeSet::new()), None);
        assert_eq!(
            allocate(&empty, [("t", &BTreeSet::new())]),
            vec![("t", None)]
        );

        // Capacity 0 counts as 1; huge capacities are capped.
        let zero = Ring::new([Member::new("z", 0)]);
        assert_eq!(zero.points.len(), Ring::VNODES_PER_CAPACITY_UNIT as usize);
        let huge = Ring::new([Member::new("h", u32::MAX)]);
        assert_eq!(
            huge.points.len(),
            (Ring::MAX_CAPACITY_UNITS * Ring::VNODES_PER_CAPACITY_UNIT) as usize
        );

        // Duplicate ids collapse, the last one wins.
        let dup = Ring::new([
            Member::new("x", 1),
            Member::new("y", 1),
            Member::new("x", 2).with_labels(["gpu"]),
        ]);
        assert_eq!(dup.members().len(), 2);
        assert_eq!(dup.members()[0], Member::new("x", 2).with_labels(["gpu"]));
        assert_eq!(dup.owner("t", &labels(&["gpu"])), Some("x"));
    }

    /// The hash scheme is part of the allocation contract: pin it.
    #[test]
    fn hash_scheme_is_pinned() {
        // Reference XXH3-64 of the empty input, seed 0.
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        assert_eq!(key_hash("task_1"), 0xe35b_66c0_e48f_6fb2);
        let one = Ring::new([Member::new("worker-0", 1)]);
        // vnode i of member id sits at xxh3_64(id ++ (i as u32).to_le_bytes())
        assert!(one.points.contains(&xxh3_64(b"worker-0\x00\x00\x00\x00")));
        assert!(one.points.contains(&xxh3_64(b"worker-0\x3f\x01\x00\x00")));
        assert_eq!(one.points[0], 0x01f3_1c5e_d62a_da9a);
        let ring = Ring::new(equal_members(5));
        let got: Vec<_> = ["task_1", "task_2", "task_3", "task_4", "task_5", "task_6"]
            .iter()
            .map(|t| ring.owner(t, &BTreeSet::new()).unwrap())
            .collect();
        assert_eq!(got, PINNED);
    }
    const PINNED: [&str; 6] = [
        "worker-2", "worker-3", "worker-0", "worker-0", "worker-0", "worker-4",
    ];

    const LABELS: [&str; 4] = ["gpu", "ssd", "arm", "eu"];

    fn label_set(max: usize) -> impl Strategy<Value = BTreeSet<String>> {
        proptest::sample::subsequence(LABELS.to_vec(), 0..=max)
            .prop_map(|v| v.into_iter().map(String::from).collect())
    }

    fn members_strategy() -> impl Strategy<Value = Vec<Member>> {
        proptest::collection::btree_map("[a-z0-9-]{1,12}", (1u32..=8, label_set(4)), 1..=12)
            .prop_map(|m| {
                m.into_iter()
                    .map(|(id, (capacity, labels))| Member {
                        id,
                        capacity,
                        labels,
                    })
                    .collect()
            })
    }

    fn tasks_strategy() -> impl Strategy<Value = Vec<(String, BTreeSet<String>)>> {
        proptest::collection::btree_map("[a-z0-9_]{1,16}", label_set(2), 0..=500)
            .prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn prop_leave_moves_only_the_leavers_tasks(
            members in members_strategy(),
            tasks in tasks_strategy(),
            pick in any::<proptest::sample::Index>(),
        ) {
            let leaver = members[pick.index(members.len())].id.clone();
            let before = alloc_map(&Ring::new(members.clone()), &tasks);
            let after = alloc_map(
                &Ring::new(members.into_iter().filter(|m| m.id != leaver)),
                &tasks,
            );
            for (t, old) in &before {
                if old.as_deref() != Some(leaver.as_str()) {
                    prop_assert_eq!(old, &after[t], "task {} moved", t);
                } else {
                    prop_assert_ne!(after[t].as_deref(), Some(leaver.as_str()));
                }
            }
        }

        #[test]
        fn prop_join_moves_only_to_the_newcomer(
            members in members_strategy(),
            tasks in tasks_strategy(),
            pick in any::<proptest::sample::Index>(),
        ) {
            let newcomer = members[pick.index(members.len())].id.clone();
            let before = alloc_map(
                &Ring::new(members.iter().filter(|m| m.id != newcomer).cloned()),
                &tasks,
            );
            let after = alloc_map(&Ring::new(members), &tasks);
            for (t, old) in &before {
                if old != &after[t] {
                    prop_assert_eq!(after[t].as_deref(), Some(newcomer.as_str()), "task {}", t);
                }
            }
        }

        #[test]
        fn prop_owner_qualifies(members in members_strategy(), tasks in tasks_strategy()) {
            let ring = Ring::new(members.clone());
            let alloc = alloc_map(&ring, &tasks);
            for (t, required) in &tasks {
                let can = members.iter().any(|m| m.has_labels(required));
                let owner = alloc[t].as_deref();
                prop_assert_eq!(owner, ring.owner(t, required));
                match owner {
                    Some(o) => {
                        let m = members.iter().find(|m| m.id == o).unwrap();
                        prop_assert!(m.has_labels(required));
                    }
                    None => prop_assert!(!can, "task {} has a qualifying member", t),
                }
            }
        }

        #[test]
        fn prop_input_order_does_not_matter(
            (members, shuffled) in members_strategy()
                .prop_flat_map(|m| (Just(m.clone()), Just(m).prop_shuffle())),
            tasks in tasks_strategy(),
        ) {
            prop_assert_eq!(
                alloc_map(&Ring::new(members), &tasks),
                alloc_map(&Ring::new(shuffled), &tasks)
            );
        }
    }
}
