//! Wing & Gong style linearizability checker for one register with unique
//! written values. Writes whose outcome is unknown (error/timeout) may take
//! effect at any point after their invocation, or never.

use std::collections::HashSet;

#[derive(Clone, Debug)]
pub enum OpKind {
    Write(u64),
    /// Value read; `None` = the register did not exist.
    Read(Option<u64>),
}

#[derive(Clone, Debug)]
pub struct Op {
    pub kind: OpKind,
    /// Nanoseconds since the start of the test.
    pub invoke: u64,
    /// `None`: outcome unknown (only for writes).
    pub complete: Option<u64>,
}

pub fn check(ops: &[Op]) -> bool {
    let n = ops.len();
    let words = n.div_ceil(64);
    let mut memo: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let mut done = vec![0u64; words];
    search(ops, &mut done, None, &mut memo)
}

fn is_done(done: &[u64], i: usize) -> bool {
    done[i / 64] & (1 << (i % 64)) != 0
}

fn search(
    ops: &[Op],
    done: &mut Vec<u64>,
    value: Option<u64>,
    memo: &mut HashSet<(Vec<u64>, Option<u64>)>,
) -> bool {
    let mut min_complete = u64::MAX;
    let mut remaining_required = false;
    for (i, op) in ops.iter().enumerate() {
        if is_done(done, i) {
            continue;
        }
        if let Some(c) = op.complete {
            remaining_required = true;
            min_complete = min_complete.min(c);
        }
    }
    if !remaining_required {
        return true;
    }
    for (i, op) in ops.iter().enumerate() {
        if is_done(done, i) || op.invoke > min_complete {
            continue;
        }
        let next = match op.kind {
            OpKind::Write(v) => Some(v),
            OpKind::Read(r) => {
                if r != value {
                    continue;
                }
                value
            }
        };
        done[i / 64] |= 1 << (i % 64);
        if memo.insert((done.clone(), next)) && search(ops, done, next, memo) {
            return true;
        }
        done[i / 64] &= !(1 << (i % 64));
    }
    false
}
