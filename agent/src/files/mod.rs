//! The life of a followed file, from the listing that finds it to the
//! sweep that closes it: what the data loop ([`crate::pipeline`]) asks
//! before it opens, reads or closes anything.
//!
//! - [`registry`]: the one owner of the open files and their indexes.
//! - [`lifecycle`]: pure decisions — what to do with a file a listing
//!   found, what a sweep's look at a file means, when a file may close.
//! - [`identity`]: fingerprints, the copytruncate copy rules.
//! - [`pods`]: files that wait for their pod's metadata, and until when.
//! - [`schedule`]: which file is read next (dirty queue, backlog,
//!   predecessors of a stream first).
//! - [`limits`]: how fast a container, and the agent, may read.
//!
//! A file's stream ([`StreamId`]) is the sequence of files a runtime writes
//! one container's log to, rotation after rotation: its lines keep their
//! order across them. It is the container's identity from discovery,
//! independent of the Kafka key records carry.

pub mod identity;
pub mod lifecycle;
pub mod limits;
pub mod pods;
pub mod registry;
pub mod schedule;

use std::sync::Arc;

use crate::discover::Origin;

pub use registry::{FileId, Registry};

/// One container stream: every file a runtime writes one container's log
/// to (or, for an in-container file, one declaration of one container).
/// Its text is the Kafka key of the stream's records: `<pod uid>/<container>`,
/// `<pod uid>/<container>/<declaration>`, or a Docker log's container id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamId(Arc<str>);

impl StreamId {
    /// The stream of a file discovery found at `o`.
    pub fn of(o: &Origin) -> StreamId {
        let id = match &o.declaration {
            Some(name) => format!("{}/{}/{name}", o.pod_uid, o.container),
            // A Docker container id never holds a `/`: no pod's stream
            // looks like it.
            None if o.pod_uid.is_empty() => o.container_id.to_string(),
            None => format!("{}/{}", o.pod_uid, o.container),
        };
        StreamId(id.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    #[cfg(test)]
    pub fn named(s: &str) -> StreamId {
        StreamId(s.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_containers_or_declarations_whatever_the_attempt() {
        let o = |uid: &str, c: &str, id: &str, decl: Option<&str>, attempt| Origin {
            pod_uid: uid.into(),
            container: c.into(),
            container_id: id.into(),
            declaration: decl.map(Into::into),
            attempt,
            ..Default::default()
        };
        let a = StreamId::of(&o("u", "app", "", None, 0));
        assert_eq!(a, StreamId::of(&o("u", "app", "", None, 3)));
        assert_ne!(a, StreamId::of(&o("u", "side", "", None, 0)));
        assert_ne!(a, StreamId::of(&o("u", "app", "", Some("x"), 0)));
        assert_ne!(
            StreamId::of(&o("", "", "abc", None, 0)),
            StreamId::of(&o("", "", "abd", None, 0))
        );
    }
}
