//! The service subscription index: service sessions by the levels of their
//! filters, so a publish visits only the sessions whose filters can match
//! its topic instead of every subscribed service session.
//!
//! A trie over topic levels: a node per literal level, one `+` child, and at
//! each node the sessions whose filter ends there (`exact`) or ends there
//! with `#` (`multi`). The index only narrows: every candidate is checked
//! again against the session's own filters ([`Session::granted`]), which
//! gives the granted QoS and applies §4.7.2 (`$` topics and leading
//! wildcards), so the index may over-report but must never miss.
//!
//! Bounded: one entry per (session, filter), and sessions' filters are
//! bounded in count and bytes. Filters deeper than [`MAX_DEPTH`] levels are
//! kept in a flat list that every publish scans, so a walk never recurses
//! deeper than that whatever a client subscribes to or publishes.

use std::collections::HashMap;
use std::sync::Arc;

use super::session::Session;

/// Levels indexed; a deeper filter is scanned instead (rare: machines'
/// topics have five levels, and the walk recurses once per level).
const MAX_DEPTH: usize = 16;

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Sessions with a filter ending at this node.
    exact: Vec<Arc<Session>>,
    /// Sessions with a filter ending at this node followed by `#`.
    multi: Vec<Arc<Session>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_empty()
            && self.multi.is_empty()
    }

    /// The list a filter's remaining levels end in, creating nodes.
    fn slot<'a, 'f>(
        &mut self,
        mut levels: impl Iterator<Item = &'f str>,
    ) -> &mut Vec<Arc<Session>> {
        match levels.next() {
            None => &mut self.exact,
            Some("#") => &mut self.multi,
            Some("+") => self.plus.get_or_insert_with(Box::default).slot(levels),
            Some(l) => self.children.entry(l.into()).or_default().slot(levels),
        }
    }

    /// Remove `conn_id` from the list the levels end in, pruning nodes left
    /// empty; true when this node is empty afterwards.
    fn remove<'f>(&mut self, mut levels: impl Iterator<Item = &'f str>, conn_id: u64) -> bool {
        match levels.next() {
            None => self.exact.retain(|s| s.conn_id != conn_id),
            Some("#") => self.multi.retain(|s| s.conn_id != conn_id),
            Some("+") => {
                if let Some(p) = self.plus.as_mut() {
                    if p.remove(levels, conn_id) {
                        self.plus = None;
                    }
                }
            }
            Some(l) => {
                if let Some(c) = self.children.get_mut(l) {
                    if c.remove(levels, conn_id) {
                        self.children.remove(l);
                    }
                }
            }
        }
        self.is_empty()
    }

    /// Push every session with a filter that can match the remaining levels.
    fn collect<'t>(
        &self,
        mut levels: impl Iterator<Item = &'t str> + Clone,
        out: &mut Vec<Arc<Session>>,
    ) {
        // `a/#` matches `a` itself and everything below it (§4.7.1.2).
        out.extend(self.multi.iter().cloned());
        match levels.next() {
            None => out.extend(self.exact.iter().cloned()),
            Some(l) => {
                if let Some(c) = self.children.get(l) {
                    c.collect(levels.clone(), out);
                }
                if let Some(p) = &self.plus {
                    p.collect(levels, out);
                }
            }
        }
    }
}

/// Service sessions indexed by their subscriptions.
#[derive(Debug, Default)]
pub(super) struct ServiceIndex {
    /// Each indexed session and the filters it is indexed under.
    by_conn: HashMap<u64, (Arc<Session>, Vec<String>)>,
    root: Node,
    /// Sessions with a filter deeper than [`MAX_DEPTH`] levels, once each
    /// per such filter.
    deep: Vec<Arc<Session>>,
}

fn too_deep(filter: &str) -> bool {
    filter.split('/').nth(MAX_DEPTH).is_some()
}

impl ServiceIndex {
    /// Index `session` under `filters` (its whole subscription set now),
    /// replacing what it was indexed under; no filters removes it.
    pub(super) fn set(&mut self, session: &Arc<Session>, filters: Vec<String>) {
        self.remove(session.conn_id);
        if filters.is_empty() {
            return;
        }
        for f in &filters {
            if too_deep(f) {
                self.deep.push(session.clone());
            } else {
                self.root.slot(f.split('/')).push(session.clone());
            }
        }
        self.by_conn
            .insert(session.conn_id, (session.clone(), filters));
    }

    /// Forget session `conn_id`.
    pub(super) fn remove(&mut self, conn_id: u64) {
        let Some((_, filters)) = self.by_conn.remove(&conn_id) else {
            return;
        };
        for f in &filters {
            if too_deep(f) {
                self.deep.retain(|s| s.conn_id != conn_id);
            } else {
                self.root.remove(f.split('/'), conn_id);
            }
        }
    }

    /// Sessions whose filters may match `topic_name`, appended to `out`
    /// (a session may appear more than once: one per matching filter).
    pub(super) fn candidates(&self, topic_name: &str, out: &mut Vec<Arc<Session>>) {
        if self.by_conn.is_empty() {
            return;
        }
        self.root.collect(topic_name.split('/'), out);
        out.extend(self.deep.iter().cloned());
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_conn.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::acl::ClientClass;

    fn session(conn_id: u64) -> Arc<Session> {
        let (tx, _rx) = crate::edge::router::outbox(1);
        Arc::new(Session::new(
            conn_id,
            format!("c{conn_id}"),
            ClientClass::Service,
            false,
            tx,
        ))
    }

    fn ids(index: &ServiceIndex, topic: &str) -> Vec<u64> {
        let mut out = Vec::new();
        index.candidates(topic, &mut out);
        let mut ids: Vec<u64> = out.iter().map(|s| s.conn_id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    #[test]
    fn finds_exactly_the_sessions_whose_filters_match() {
        let mut index = ServiceIndex::default();
        index.set(&session(1), vec!["a/b".into()]);
        index.set(&session(2), vec!["a/+".into(), "x/#".into()]);
        index.set(&session(3), vec!["#".into()]);
        index.set(&session(4), vec!["a/b/#".into()]);
        index.set(&session(5), vec!["+/+/c".into()]);
        assert_eq!(ids(&index, "a/b"), [1, 2, 3, 4]);
        assert_eq!(ids(&index, "a/c"), [2, 3]);
        assert_eq!(ids(&index, "x"), [2, 3]);
        assert_eq!(ids(&index, "x/y/z"), [2, 3]);
        assert_eq!(ids(&index, "a/b/c"), [3, 4, 5]);
        assert_eq!(ids(&index, "q"), [3]);
    }

    #[test]
    fn replacing_and_removing_prunes_the_trie() {
        let mut index = ServiceIndex::default();
        let s = session(1);
        index.set(&s, vec!["a/+/c".into(), "a/b".into()]);
        index.set(&s, vec!["a/b".into()]);
        assert_eq!(ids(&index, "a/x/c"), Vec::<u64>::new());
        assert_eq!(ids(&index, "a/b"), [1]);
        index.set(&s, Vec::new());
        assert!(index.is_empty());
        assert!(index.root.is_empty(), "no empty nodes left behind");
        index.set(&session(2), vec!["p/q".into()]);
        index.remove(2);
        assert!(index.root.is_empty());
    }

    #[test]
    fn deep_filters_are_scanned_not_walked() {
        let mut index = ServiceIndex::default();
        let deep = vec!["+"; 40].join("/");
        index.set(&session(1), vec![deep]);
        // Over-reported; the session's own filters decide.
        assert_eq!(ids(&index, "a"), [1]);
        let long = vec!["a"; 10_000].join("/");
        assert_eq!(ids(&index, &long), [1]);
        index.remove(1);
        assert!(index.deep.is_empty());
    }
}
