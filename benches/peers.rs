//! Peers measured side by side with bpftail on the same files and broker.

use crate::support::Broker;
use crate::{Run, Workload};

/// syslog-ng: not wired yet.
pub fn syslog_ng(_broker: &Broker, _w: &Workload) -> Result<Run, String> {
    Err("syslog-ng is not installed by this build yet".into())
}
