//! The access-log record of one TCP connection, written when the
//! connection ends however it ends (closed, failed, cut by a policy
//! change): a guard that holds the record and the connection's byte tally.

use std::{sync::Arc, time::Instant};

use super::copy::Tally;
use crate::telemetry::accesslog::{AccessLog, Record, Resolved};

pub struct ConnLog<'a> {
    log: &'a AccessLog,
    to: Arc<Resolved>,
    record: Option<Record>,
    began: Instant,
    /// The relay counts into it.
    pub tally: Tally,
}

impl<'a> ConnLog<'a> {
    /// `tally`: the one the connection's relay counts into.
    pub fn new(log: &'a AccessLog, to: Arc<Resolved>, record: Record, tally: Tally) -> Self {
        Self {
            log,
            to,
            record: Some(record),
            began: Instant::now(),
            tally,
        }
    }

    /// Why the connection ended, when it was not a clean close.
    pub fn ended_with(&mut self, why: impl ToString) {
        if let Some(r) = &mut self.record {
            r.termination_details = why.to_string();
        }
    }
}

impl Drop for ConnLog<'_> {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.bytes_received = self.tally.from_client();
            r.bytes_sent = self.tally.from_upstream();
            r.duration = self.began.elapsed();
            self.log.log(r, self.to.clone());
        }
    }
}
