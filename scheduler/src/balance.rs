//! Bounded-load allocation on top of the ring (DESIGN.md §3).
//!
//! The ring alone gives every task a preferred worker, but hashing a few hundred task ids
//! is a binomial draw: at 300 tasks over 3 workers a worker's share wanders by ±10 %, and a
//! join takes 1/N ± 20 %. The planner keeps the ring's preferences and bounds the loads
//! ("consistent hashing with bounded loads", Mirrokni, Thorup and Zadimoghaddam, 2018),
//! starting from the assignment that stands:
//!
//! 1. **Keep**: a task whose owner is live and still qualifies stays where it is.
//! 2. **Place** orphans (new tasks, a departed worker's tasks), in input order, clockwise
//!    from the task's key: the first qualifying member below its floor, else the first
//!    below its quota, else the preferred one (labels can force a member over its quota).
//! 3. **Pull**: a member still below its floor (a newcomer, or one whose capacity grew)
//!    takes tasks from members above their share: first the tasks the ring prefers it
//!    for, up to its quota; then, if still below its floor, any task it qualifies for.
//!
//! With `share = eligible tasks × capacity / total capacity`, `quota = ⌈share⌉` and
//! `floor = ⌊share × (1 − SLACK)⌋`. Every step only ever moves a task towards a member
//! that needs it, and each is a fixpoint, so planning the plan changes nothing (no change,
//! no write). A leave creates orphans that the survivors absorb below their raised
//! quotas, so no survivor's task moves; a join creates a receiver that takes only from
//! the others' excess, at most its quota (tested below, and in `tests/allocation.rs`).

use std::collections::{BTreeSet, HashMap};

use crate::ring::Ring;

/// How far below its share a member may sit before it pulls tasks from the others.
pub const SLACK: f64 = 0.1;

/// One task to place: its ring key, the labels it needs, and its owner now (if any).
#[derive(Debug, Clone, Copy)]
pub struct Placement<'a> {
    pub key: &'a str,
    pub labels: &'a BTreeSet<String>,
    pub current: Option<&'a str>,
}

/// The owner of every task, in input order (None: no live member qualifies). Owner ids
/// borrow from the ring.
///
/// Kept as one function on purpose: its three passes (keep, place, pull; numbered in the
/// body) share one load table and the qualified-member sets, and the proptests check the
/// plan as a whole.
pub fn plan<'r>(ring: &'r Ring, tasks: &[Placement<'_>]) -> Vec<Option<&'r str>> {
    let members = ring.members();
    if members.is_empty() {
        return vec![None; tasks.len()];
    }
    // Label requirements are few and shared by many tasks: qualify each distinct set once.
    let mut masks: HashMap<&BTreeSet<String>, Option<Vec<bool>>> = HashMap::new();
    for task in tasks {
        if !task.labels.is_empty() {
            masks
                .entry(task.labels)
                .or_insert_with(|| ring.qualifying(task.labels));
        }
    }
    let qualifies = |task: &Placement<'_>, member: usize| -> bool {
        task.labels.is_empty() || masks[task.labels].as_ref().is_some_and(|mask| mask[member])
    };
    let eligible =
        |task: &Placement<'_>| -> bool { task.labels.is_empty() || masks[task.labels].is_some() };

    let total_weight: f64 = members.iter().map(|m| m.weight() as f64).sum();
    let eligible_count = tasks.iter().filter(|t| eligible(t)).count() as f64;
    let share: Vec<f64> = members
        .iter()
        .map(|m| eligible_count * m.weight() as f64 / total_weight)
        .collect();
    let quota: Vec<usize> = share.iter().map(|s| s.ceil() as usize).collect();
    let floor: Vec<usize> = share
        .iter()
        .map(|s| (s * (1.0 - SLACK)).floor() as usize)
        .collect();
    let over_share = |load: usize, member: usize| load as f64 > share[member];

    let mut owner: Vec<Option<usize>> = vec![None; tasks.len()];
    let mut load = vec![0usize; members.len()];

    // 1. Keep.
    for (i, task) in tasks.iter().enumerate() {
        if let Some(current) = task.current.and_then(|id| ring.member_index(id))
            && qualifies(task, current)
        {
            owner[i] = Some(current);
            load[current] += 1;
        }
    }

    // 2. Place. Counting the members below their floor (quota) lets an unlabelled task
    // skip a walk round the whole ring when there is none.
    let mut below_floor = (0..members.len()).filter(|&m| load[m] < floor[m]).count();
    let mut below_quota = (0..members.len()).filter(|&m| load[m] < quota[m]).count();
    for (i, task) in tasks.iter().enumerate() {
        if owner[i].is_some() || !eligible(task) {
            continue;
        }
        let hash = Ring::key_hash(task.key);
        let walk = |limit: &[usize], any_below: usize| {
            if task.labels.is_empty() && any_below == 0 {
                return None;
            }
            ring.walk_from(hash, |m| qualifies(task, m) && load[m] < limit[m])
        };
        let chosen = walk(&floor, below_floor)
            .or_else(|| walk(&quota, below_quota))
            .or_else(|| ring.walk_from(hash, |m| qualifies(task, m)))
            .expect("an eligible task has a qualifying member");
        owner[i] = Some(chosen);
        load[chosen] += 1;
        if load[chosen] == floor[chosen] {
            below_floor -= 1;
        }
        if load[chosen] == quota[chosen] {
            below_quota -= 1;
        }
    }

    // 3. Pull.
    let receivers: Vec<usize> = (0..members.len()).filter(|&m| load[m] < floor[m]).collect();
    if !receivers.is_empty() {
        let is_receiver = |m: usize| receivers.binary_search(&m).is_ok();
        // 3a. The tasks the ring prefers a receiver for. Receivers only gain and donors
        // only lose, so a task passed over stays passed over: one sweep is a fixpoint.
        for (i, task) in tasks.iter().enumerate() {
            let Some(current) = owner[i] else { continue };
            let hash = Ring::key_hash(task.key);
            let Some(preferred) = ring.walk_from(hash, |m| qualifies(task, m)) else {
                continue;
            };
            if preferred != current
                && is_receiver(preferred)
                && load[preferred] < quota[preferred]
                && over_share(load[current], current)
            {
                owner[i] = Some(preferred);
                load[preferred] += 1;
                load[current] -= 1;
            }
        }
        // 3b. Still short: any task it qualifies for, from members above their share.
        for &receiver in &receivers {
            for (i, task) in tasks.iter().enumerate() {
                if load[receiver] >= floor[receiver] {
                    break;
                }
                let Some(current) = owner[i] else { continue };
                if current != receiver
                    && qualifies(task, receiver)
                    && over_share(load[current], current)
                {
                    owner[i] = Some(receiver);
                    load[receiver] += 1;
                    load[current] -= 1;
                }
            }
        }
    }

    owner
        .into_iter()
        .map(|m| m.map(|m| members[m].id.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::Member;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// task key → owner.
    type Plan = BTreeMap<String, Option<String>>;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("task-{i:06}")).collect()
    }

    fn run(members: &[Member], tasks: &[(String, BTreeSet<String>)], current: &Plan) -> Plan {
        let ring = Ring::new(members.iter().cloned());
        let input: Vec<Placement<'_>> = tasks
            .iter()
            .map(|(key, labels)| Placement {
                key,
                labels,
                current: current.get(key).and_then(|o| o.as_deref()),
            })
            .collect();
        plan(&ring, &input)
            .into_iter()
            .zip(tasks)
            .map(|(owner, (key, _))| (key.clone(), owner.map(str::to_owned)))
            .collect()
    }

    fn plain(n: usize) -> Vec<(String, BTreeSet<String>)> {
        keys(n).into_iter().map(|k| (k, BTreeSet::new())).collect()
    }

    fn loads(plan: &Plan) -> BTreeMap<String, usize> {
        let mut loads = BTreeMap::new();
        for owner in plan.values().flatten() {
            *loads.entry(owner.clone()).or_default() += 1;
        }
        loads
    }

    fn equal(n: usize) -> Vec<Member> {
        (0..n).map(|i| Member::new(format!("w{i}"), 1)).collect()
    }

    fn moved<'a>(before: &'a Plan, after: &'a Plan) -> Vec<&'a String> {
        before
            .keys()
            .filter(|k| before[*k].is_some() && before[*k] != after[*k])
            .collect()
    }

    #[test]
    fn three_workers_joining_one_by_one_are_balanced() {
        let tasks = plain(300);
        let mut current = Plan::new();
        for n in 1..=3 {
            current = run(&equal(n), &tasks, &current);
        }
        // Below the floor a worker pulls; above its quota it can stay when the newcomer
        // filled up from the others first: within ±10 % either way.
        for (worker, load) in loads(&current) {
            assert!((90..=110).contains(&load), "{worker} holds {load}");
        }
    }

    #[test]
    fn failure_then_join_moves_only_what_it_must() {
        let tasks = plain(300);
        let three = run(&equal(3), &tasks, &Plan::new());
        let survivors: Vec<Member> = equal(3).into_iter().filter(|m| m.id != "w1").collect();
        let after_failure = run(&survivors, &tasks, &three);
        for key in moved(&three, &after_failure) {
            assert_eq!(
                three[key].as_deref(),
                Some("w1"),
                "{key} of a survivor moved"
            );
        }
        assert!(after_failure.values().all(|o| o.as_deref() != Some("w1")));
        let mut joined = survivors;
        joined.push(Member::new("w3", 1));
        let after_join = run(&joined, &tasks, &after_failure);
        let moved = moved(&after_failure, &after_join);
        assert!(moved.len() <= 100, "{} moved", moved.len());
        assert!(
            moved
                .iter()
                .all(|k| after_join[*k].as_deref() == Some("w3"))
        );
    }

    #[test]
    fn capacity_weighs_the_shares() {
        let members = [Member::new("small", 1), Member::new("big", 3)];
        let plan = run(&members, &plain(4000), &Plan::new());
        let loads = loads(&plan);
        assert_eq!((loads["small"], loads["big"]), (1000, 3000));
    }

    #[test]
    fn labels_are_honoured_even_past_the_quota() {
        let gpu: BTreeSet<String> = ["gpu".to_owned()].into();
        let members = [
            Member::new("a", 1).with_labels(["gpu"]),
            Member::new("b", 1),
        ];
        let mut tasks = plain(100);
        for (key, _) in keys(100).into_iter().zip(0..) {
            tasks.push((format!("{key}-gpu"), gpu.clone()));
        }
        tasks.push(("tpu-task".into(), ["tpu".to_owned()].into()));
        let plan = run(&members, &tasks, &Plan::new());
        for (key, labels) in &tasks {
            match labels.iter().next().map(String::as_str) {
                Some("gpu") => assert_eq!(plan[key].as_deref(), Some("a")),
                Some(_) => assert_eq!(plan[key], None),
                None => assert!(plan[key].is_some()),
            }
        }
        // `a` holds every gpu task, so `b` takes the plain ones it can.
        assert!(loads(&plan)["b"] >= 90, "{:?}", loads(&plan));
        assert_eq!(run(&members, &tasks, &plan), plan);
    }

    #[test]
    fn no_members_no_owners() {
        let plan = run(&[], &plain(3), &Plan::new());
        assert!(plan.values().all(Option::is_none));
    }

    const LABELS: [&str; 3] = ["gpu", "ssd", "arm"];

    fn label_set(max: usize) -> impl Strategy<Value = BTreeSet<String>> {
        proptest::sample::subsequence(LABELS.to_vec(), 0..=max)
            .prop_map(|v| v.into_iter().map(String::from).collect())
    }

    /// Up to 5 members of capacity 1–3: with ≥ 1,500 tasks every share is ≥ 100, far
    /// above the rounding the bounds are stated in.
    fn members(labels: usize) -> impl Strategy<Value = Vec<Member>> {
        proptest::collection::btree_map("[a-z]{1,6}", (1u32..=3, label_set(labels)), 2..=5)
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

    fn share(members: &[Member], of: &Member, tasks: usize) -> f64 {
        let total: u32 = members.iter().map(Member::weight).sum();
        tasks as f64 * of.weight() as f64 / total as f64
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn prop_balanced_and_stable(members in members(0), n in 1500usize..2500) {
            let tasks = plain(n);
            let plan = run(&members, &tasks, &Plan::new());
            let loads = loads(&plan);
            for m in &members {
                let share = share(&members, m, n);
                let load = loads.get(&m.id).copied().unwrap_or(0) as f64;
                prop_assert!(load <= share.ceil() && load >= (share * 0.9).floor(),
                    "{} holds {} of share {}", m.id, load, share);
            }
            prop_assert_eq!(run(&members, &tasks, &plan), plan, "planning the plan moved tasks");
        }

        #[test]
        fn prop_leave_moves_only_the_leavers_tasks(
            members in members(0),
            n in 1500usize..2500,
            pick in any::<proptest::sample::Index>(),
        ) {
            let tasks = plain(n);
            let before = run(&members, &tasks, &Plan::new());
            let leaver = members[pick.index(members.len())].id.clone();
            let survivors: Vec<Member> =
                members.iter().filter(|m| m.id != leaver).cloned().collect();
            let after = run(&survivors, &tasks, &before);
            for key in moved(&before, &after) {
                prop_assert_eq!(before[key].as_deref(), Some(leaver.as_str()));
            }
            prop_assert!(after.values().all(|o| o.is_some() && o.as_deref() != Some(leaver.as_str())));
        }

        #[test]
        fn prop_join_moves_about_a_share_only_to_the_newcomer(
            members in members(0),
            n in 1500usize..2500,
            pick in any::<proptest::sample::Index>(),
        ) {
            let tasks = plain(n);
            let newcomer = members[pick.index(members.len())].clone();
            let others: Vec<Member> =
                members.iter().filter(|m| m.id != newcomer.id).cloned().collect();
            let before = run(&others, &tasks, &Plan::new());
            let after = run(&members, &tasks, &before);
            let moved = moved(&before, &after);
            for key in &moved {
                prop_assert_eq!(after[*key].as_deref(), Some(newcomer.id.as_str()));
            }
            let share = share(&members, &newcomer, n);
            prop_assert!(moved.len() as f64 <= share.ceil(), "{} moved, share {}", moved.len(), share);
            prop_assert!(moved.len() as f64 >= (share * 0.9).floor(), "{} moved, share {}", moved.len(), share);
        }

        #[test]
        fn prop_labels_qualify_and_plans_are_fixpoints(
            members in members(3),
            tasks in proptest::collection::btree_map("[a-z0-9]{1,10}", label_set(2), 0..400),
            leaver in any::<proptest::sample::Index>(),
        ) {
            let tasks: Vec<(String, BTreeSet<String>)> = tasks.into_iter().collect();
            let first = run(&members, &tasks, &Plan::new());
            let survivors: Vec<Member> = members.iter().enumerate()
                .filter(|(i, _)| *i != leaver.index(members.len()))
                .map(|(_, m)| m.clone())
                .collect();
            for (set, plan) in [(&members, first.clone()), (&survivors, run(&survivors, &tasks, &first))] {
                for (key, labels) in &tasks {
                    let can = set.iter().any(|m| m.has_labels(labels));
                    match plan[key].as_deref() {
                        Some(owner) => prop_assert!(
                            set.iter().any(|m| m.id == owner && m.has_labels(labels))),
                        None => prop_assert!(!can, "{} has a qualifying member", key),
                    }
                }
                prop_assert_eq!(&run(set, &tasks, &plan), &plan, "planning the plan moved tasks");
            }
        }
    }
}
