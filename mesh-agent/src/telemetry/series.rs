//! Istio's labelled series, kept bounded: every label set of a family
//! (the four TCP metrics share theirs, as do the four request metrics) is
//! admitted against a cap — a set over it is counted as an overflow and
//! not exported — and removed again once the workloads or services it
//! names are gone and no connection uses it. Without this, pod churn in a
//! large cluster grows `/metrics` without end.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use prometheus::IntCounter;

/// Takes a label set out of one metric vector.
pub type Remover = Box<dyn Fn(&[&str]) + Send + Sync>;

/// The label sets of one family.
pub struct Table {
    sets: Mutex<HashMap<Arc<[String]>, usize>>,
    cap: usize,
    overflow: IntCounter,
    removers: Vec<Remover>,
}

/// A label set in use (an open connection); dropping it lets a sweep
/// remove the set.
pub struct InUse {
    table: Arc<Table>,
    key: Arc<[String]>,
}

impl Drop for InUse {
    fn drop(&mut self) {
        if let Some(n) = self
            .table
            .sets
            .lock()
            .expect("series lock")
            .get_mut(&self.key)
        {
            *n = n.saturating_sub(1);
        }
    }
}

impl Table {
    pub fn new(cap: usize, overflow: IntCounter, removers: Vec<Remover>) -> Arc<Self> {
        Arc::new(Self {
            sets: Mutex::new(HashMap::new()),
            cap,
            overflow,
            removers,
        })
    }

    /// Admits `values` for one use: `None` when the family is full and
    /// the set is new (counted as an overflow; the caller records nothing).
    pub fn enter(self: &Arc<Self>, values: &[String]) -> Option<InUse> {
        let mut sets = self.sets.lock().expect("series lock");
        if let Some(key) = sets.get_key_value(values).map(|(k, _)| k.clone()) {
            *sets.get_mut(values).expect("just found") += 1;
            return Some(InUse {
                table: self.clone(),
                key,
            });
        }
        if sets.len() >= self.cap {
            drop(sets);
            self.overflow.inc();
            return None;
        }
        let key: Arc<[String]> = values.into();
        sets.insert(key.clone(), 1);
        Some(InUse {
            table: self.clone(),
            key,
        })
    }

    /// Removes the sets no one uses whose labels `keep` refuses; returns
    /// how many went.
    pub fn sweep(&self, keep: impl Fn(&[String]) -> bool) -> usize {
        let mut sets = self.sets.lock().expect("series lock");
        let gone: Vec<Arc<[String]>> = sets
            .iter()
            .filter(|(k, n)| **n == 0 && !keep(k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            let v: Vec<&str> = k.iter().map(String::as_str).collect();
            for r in &self.removers {
                r(&v);
            }
            sets.remove(k);
        }
        gone.len()
    }
}
