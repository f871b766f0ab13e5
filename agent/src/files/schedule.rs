//! Which file is read next.
//!
//! Files with news wait in the dirty queue, each at most once, in the order
//! their news came. A read takes a bounded slice of a file and, when the
//! file has more, puts it at the back: one busy file cannot starve the
//! others. When the in-flight budget runs out, every file waiting moves to
//! the backlog, to be read once acknowledgements free budget — the file
//! that used it up last. Before a
//! file is read, the older files of its stream are read to their end
//! ([`crate::files::Registry::predecessors`]): lines keep their order
//! across a rotation. A file whose container already has its share of the
//! in-flight budget is held until acknowledgements come, so that one
//! container writing as fast as it can never holds all of the budget.

use std::collections::{HashSet, VecDeque};

use crate::files::FileId;
use crate::tail::ReadEnd;

/// Files waiting, in order, each at most once.
#[derive(Debug, Default)]
struct Queue {
    queue: VecDeque<FileId>,
    members: HashSet<FileId>,
}

impl Queue {
    fn push(&mut self, id: FileId) {
        if self.members.insert(id) {
            self.queue.push_back(id);
        }
    }
    fn pop(&mut self) -> Option<FileId> {
        let id = self.queue.pop_front()?;
        self.members.remove(&id);
        Some(id)
    }
}

#[derive(Debug, Default)]
pub struct Schedule {
    dirty: Queue,
    /// Files with unread bytes that wait for in-flight budget.
    backlog: Queue,
    /// Files whose container holds its share of the budget: read again
    /// when acknowledgements come.
    held: Queue,
}

/// What the reader does after a read of one file.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Go on with the next file.
    Continue,
    /// The budget is used up: stop reading until acknowledgements come.
    Stop,
}

impl Schedule {
    /// The file has news (a write, a rename, a rewind): read it.
    pub fn mark(&mut self, id: FileId) {
        self.dirty.push(id);
    }

    /// Files are waiting to be read now.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.queue.is_empty()
    }

    /// How many files wait to be read now: one pass reads each once.
    pub fn dirty_len(&self) -> usize {
        self.dirty.queue.len()
    }

    /// Files wait for in-flight budget.
    pub fn waits_for_budget(&self) -> bool {
        !self.backlog.queue.is_empty()
    }

    /// Budget is free again: what waited for it is read next.
    pub fn release_backlog(&mut self) {
        while let Some(id) = self.backlog.pop() {
            self.dirty.push(id);
        }
    }

    /// Files wait for their container's acknowledgements.
    pub fn has_held(&self) -> bool {
        !self.held.queue.is_empty()
    }

    /// Acknowledgements came: the files held for their container's share
    /// of the budget are read again (and held again if still over it).
    pub fn release_held(&mut self) {
        while let Some(id) = self.held.pop() {
            self.dirty.push(id);
        }
    }

    /// The next file to read.
    pub fn next_file(&mut self) -> Option<FileId> {
        self.dirty.pop()
    }

    /// Records how the read of `id` ended.
    pub fn after_read(&mut self, id: FileId, end: &ReadEnd) -> Next {
        match end {
            ReadEnd::Quota => self.dirty.push(id),
            ReadEnd::Budget => {
                // The file that used the budget up waits behind every other:
                // when budget comes back, the files that waited for it go
                // first (one file writing as fast as it can must not take
                // every release of budget).
                while let Some(other) = self.dirty.pop() {
                    self.backlog.push(other);
                }
                self.backlog.push(id);
                return Next::Stop;
            }
            ReadEnd::Held => self.held.push(id),
            // The data loop marks it again when the limit allows.
            ReadEnd::Limited(_) | ReadEnd::Eof | ReadEnd::Error(_) => {}
        }
        Next::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(s: &mut Schedule) -> Vec<FileId> {
        std::iter::from_fn(|| s.next_file()).collect()
    }

    #[test]
    fn a_file_waits_once_however_often_it_is_marked() {
        let mut s = Schedule::default();
        for id in [3, 1, 3, 2, 1] {
            s.mark(id);
        }
        assert_eq!(s.dirty_len(), 3);
        assert_eq!(drain(&mut s), vec![3, 1, 2]);
        assert!(!s.has_dirty());
    }

    #[test]
    fn a_file_with_more_to_read_goes_to_the_back() {
        let mut s = Schedule::default();
        s.mark(1);
        s.mark(2);
        let id = s.next_file().unwrap();
        assert_eq!(s.after_read(id, &ReadEnd::Quota), Next::Continue);
        assert_eq!(drain(&mut s), vec![2, 1]);
    }

    #[test]
    fn out_of_budget_everything_waits_and_comes_back_in_order() {
        let mut s = Schedule::default();
        for id in [1, 2, 3] {
            s.mark(id);
        }
        let id = s.next_file().unwrap();
        assert_eq!(s.after_read(id, &ReadEnd::Budget), Next::Stop);
        assert!(!s.has_dirty());
        assert!(s.waits_for_budget());
        s.mark(4);
        s.release_backlog();
        assert!(!s.waits_for_budget());
        assert_eq!(drain(&mut s), vec![4, 2, 3, 1]);
    }
}
